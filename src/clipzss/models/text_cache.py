"""The teacher's text-embedding cache on disk: one small safetensors file per (model, weights, templates, class list).

The student's classifier is made of text embeddings, and recomputing 15 prompts × 171 classes at every evaluation is
wasted work, so :class:`clipzss.models.teacher.CLIPTeacher` keeps them here (and in memory). A corrupt file is ignored
and recomputed, a failed write only warns, and the folder keeps a bounded number of files.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from clipzss.config import TeacherConfig
from clipzss.files import atomic_write, user_cache_dir

logger = logging.getLogger(__name__)


def text_cache_dir(cfg: TeacherConfig) -> Path:
    """cfg.cache_dir, else $XDG_CACHE_HOME/clipzss/text, else ~/.cache/clipzss/text."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return user_cache_dir("text")


def read_text_cache(path: Path, num_classes: int, dim: int) -> torch.Tensor | None:
    """The (num_classes, dim) float32 embeddings stored at ``path``, or None when absent or corrupt (warned)."""
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        emb = load_file(str(path))["embeddings"]
        if emb.shape != (num_classes, dim) or emb.dtype != torch.float32 or not torch.isfinite(emb).all():
            raise ValueError(f"shape {tuple(emb.shape)}, dtype {emb.dtype}")
    except Exception as err:
        logger.warning("ignoring corrupt text-embedding cache %s (%s); recomputing it", path, err)
        return None
    return emb


def _trim(folder: Path, keep: int) -> None:
    """Remove the least recently written cache files beyond ``keep`` (only ``<32 hex>.safetensors`` files, never
    anything else in the folder)."""
    files = [
        p
        for p in folder.glob("*.safetensors")
        if len(p.stem) == 32 and all(c in "0123456789abcdef" for c in p.stem)
    ]
    if len(files) <= keep:
        return
    files.sort(key=lambda p: p.stat().st_mtime_ns)
    for old in files[: len(files) - keep]:
        with contextlib.suppress(OSError):
            old.unlink()


def write_text_cache(path: Path, emb: torch.Tensor, metadata: dict[str, str], keep: int) -> None:
    """Write atomically (concurrent ranks never read half a file), then keep the ``keep`` newest files of the
    folder; failures only warn."""
    from safetensors.torch import save_file

    try:
        atomic_write(
            path, lambda tmp: save_file({"embeddings": emb.contiguous()}, str(tmp), metadata=metadata)
        )
        _trim(path.parent, keep)
    except OSError as err:
        logger.warning("could not write the text-embedding cache %s (%s); continuing without it", path, err)
