"""The text-embedding file of `clipzss embed-text`: class names and their CLIP text embeddings, torch-free.

One safetensors file: tensor ``embeddings`` (K, C) float32, metadata ``class_names`` (a JSON list) and ``teacher``
(the CLIP identity that embedded them). `clipzss.models.segmenter.PrecomputedText` and the onnxruntime runner both read it
here, so a file that one accepts the other accepts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from clipzss.errors import UsageError
from clipzss.files import atomic_write
from clipzss.names import parse_class_names


def write_text_embeddings(
    path: str | Path,
    class_names: Sequence[str],
    embeddings: np.ndarray,
    identity: str = "",
    replace: bool = True,
) -> None:
    """Write (atomically) ``embeddings`` (K, C) for ``class_names`` (K names); with ``replace=False`` an existing
    file is never replaced (`clipzss.files.OutputExistsError`)."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(class_names):
        raise UsageError(f"{len(class_names)} class names but embeddings of shape {embeddings.shape}")
    meta = {"class_names": json.dumps(list(class_names)), "teacher": identity}
    atomic_write(
        Path(path),
        lambda tmp: save_file({"embeddings": embeddings}, str(tmp), metadata=meta),
        replace=replace,
    )


def read_text_embeddings(path: str | Path) -> tuple[list[str], np.ndarray, str]:
    """(class names, (K, C) float32 embeddings as written, teacher identity); the message names a bad file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text-embedding file not found: {path}")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            meta = handle.metadata() or {}
            embeddings = handle.get_tensor("embeddings").astype(np.float32)
        names = json.loads(meta["class_names"])
        if (
            not isinstance(names, list)
            or not all(isinstance(n, str) for n in names)
            or embeddings.ndim != 2
            or embeddings.shape[0] != len(names)
        ):
            raise UsageError(f"{len(names)} names for embeddings of shape {embeddings.shape}")
        names = parse_class_names(names)  # duplicates, and at most MAX_CLASS_NAMES
        if not np.isfinite(embeddings).all():
            raise UsageError("its embeddings hold NaN or infinite values")
    except Exception as err:
        raise UsageError(
            f"{path} is not a text-embedding file written by `clipzss embed-text` ({err})"
        ) from None
    return names, embeddings, meta.get("teacher", "")
