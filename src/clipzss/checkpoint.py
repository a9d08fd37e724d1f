"""Inference checkpoints: one safetensors file holding the student's weights and the resolved config.

Loading never unpickles: weights are safetensors tensors and the config is JSON in the file's metadata, so a shared
checkpoint cannot execute code. A ``config.yaml`` is written beside the file for people to read; the copy inside
the file is the one that counts, so a checkpoint alone rebuilds its model.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from clipzss.config import Config, ConfigError

log = logging.getLogger(__name__)

FORMAT = "clipzss-student-v1"
CHECKPOINT_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, tampered with or from an incompatible config."""


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    config: Config
    meta: dict[str, str] = field(default_factory=dict)


def atomic_write(path: Path, write: callable) -> None:
    """Write through a temporary file in the same folder and rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    path: str | Path, state_dict: dict[str, torch.Tensor], config: Config, **meta: str
) -> Path:
    """Save student weights + config atomically; ``meta`` adds string fields (step, teacher identity, ...)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / CHECKPOINT_NAME
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    metadata = {"format": FORMAT, "config": json.dumps(config.to_dict())}
    metadata.update({k: str(v) for k, v in meta.items()})
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    atomic_write(path.with_name("config.yaml"), config.save)
    return path


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or a run folder holding ``model.safetensors``."""
    path = Path(path)
    if path.is_dir():
        candidate = path / CHECKPOINT_NAME
        if not candidate.is_file():
            raise CheckpointError(f"no {CHECKPOINT_NAME} in the folder {path}")
        return candidate
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Read weights and config; every failure is one sentence naming the file."""
    path = resolve_checkpoint_path(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state_dict = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors checkpoint (truncated or corrupt?): {err}"
        ) from None
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise CheckpointError(
            f"{path} is a safetensors file but not a clipzss checkpoint (no '{FORMAT}' metadata)"
        )
    try:
        config = Config.from_dict(json.loads(metadata["config"]), source=str(path))
    except (json.JSONDecodeError, ConfigError) as err:
        raise CheckpointError(f"{path} holds a config this version of clipzss cannot read: {err}") from None
    meta = {k: v for k, v in metadata.items() if k not in ("format", "config")}
    return Checkpoint(state_dict=state_dict, config=config, meta=meta)
