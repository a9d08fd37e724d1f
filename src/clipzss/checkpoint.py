"""Inference checkpoints: one safetensors file holding the student's weights and the resolved config.

Loading never unpickles: weights are safetensors tensors and the config is JSON in the file's metadata, so a shared
checkpoint cannot execute code. A ``config.yaml`` is written beside the file for people to read; the copy inside
the file is the one that counts, so a checkpoint alone rebuilds its model.
"""

from __future__ import annotations

import errno
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from clipzss.config import Config, ConfigError, ConfigValueError, pin_saved_defaults
from clipzss.errors import ClipzssError
from clipzss.files import atomic_write_all
from clipzss.messages import shorten

logger = logging.getLogger(__name__)

FORMAT = "clipzss-student-v1"
CHECKPOINT_NAME = "model.safetensors"


class CheckpointError(ClipzssError, ValueError):
    """A checkpoint that is missing, truncated, tampered with or from an incompatible config."""


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    config: Config
    meta: dict[str, str] = field(default_factory=dict)


def checkpoint_writes(
    path: str | Path, state_dict: dict[str, torch.Tensor], config: Config, **meta: str
) -> list[tuple[Path, callable]]:
    """The files of an inference checkpoint (weights + config, and ``config.yaml`` beside it), for `atomic_write_all`."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / CHECKPOINT_NAME
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    metadata = {"format": FORMAT, "config": json.dumps(config.to_dict())}
    metadata.update({k: str(v) for k, v in meta.items()})
    return [
        (path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata)),
        (path.with_name("config.yaml"), config.save),
    ]


def save_checkpoint(
    path: str | Path, state_dict: dict[str, torch.Tensor], config: Config, **meta: str
) -> Path:
    """Save student weights + config atomically; ``meta`` adds string fields (step, teacher identity, ...)."""
    writes = checkpoint_writes(path, state_dict, config, **meta)
    atomic_write_all(writes)
    return writes[0][0]


class CheckpointWriteError(ClipzssError, RuntimeError):
    """A checkpoint could not be written (disk full, ...); the previous checkpoint is kept unchanged."""


# How a full disk shows: OSError ENOSPC/EDQUOT, safetensors' "IoError(Os { code: 28, kind: StorageFull ...",
# torch's "[enforce fail at inline_container.cc:672] . unexpected pos ..." / "... file write failed".
_DISK_FULL = re.compile(
    r"no space left|storagefull|os error 28|disk quota|quotaexceeded|unexpected pos|file write failed",
    re.IGNORECASE,
)


def is_disk_full(err: BaseException) -> bool:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if _DISK_FULL.search(str(err)):
            return True
        err = err.__cause__ or err.__context__
    return False


def last_checkpoint(folder: str | Path) -> str:
    """The checkpoint a run folder holds, e.g. ``runs/x/model.safetensors (step 400)``, or "no checkpoint saved yet"."""
    path = Path(folder) / CHECKPOINT_NAME
    if not path.is_file():
        return "no checkpoint saved yet"
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            step = (handle.metadata() or {}).get("step")
    except Exception:  # naming the file is enough
        step = None
    return f"the last good checkpoint is {path}" + (f" (step {step}), kept unchanged" if step else "")


def write_failure(err: BaseException, folder: str | Path, what: str) -> CheckpointWriteError:
    """One line for a failed checkpoint write: the folder, why (disk full or the error's first line), what is kept."""
    if is_disk_full(err):
        why = "no space left on device"
    else:
        lines = str(err).strip().splitlines()
        why = shorten(lines[0] if lines else type(err).__name__)
    return CheckpointWriteError(f"cannot save {what} in {folder}: {why}; {last_checkpoint(folder)}")


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
        data = json.loads(metadata["config"])
    except (json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path} holds a config that is not valid JSON: {shorten(str(err))}") from None
    config = validate_loaded_config(data, source=str(path))
    check_finite_tensors(state_dict, str(path))
    meta = {k: v for k, v in metadata.items() if k not in ("format", "config")}
    return Checkpoint(state_dict=state_dict, config=config, meta=meta)


# A checkpoint's config comes from whoever made the file: it is checked like user input before anything uses it.
MAX_CONFIG_STRING = 4096  # a path or a prompt template; nothing a config holds is longer
MAX_NAME = 128  # architecture, encoder, CLIP model and other names (timm's longest are about 60 characters)
QUOTE = 80  # error messages quote at most this much of a value from the file
_NAME_FIELDS = (
    ("student", "arch"),
    ("student", "encoder"),
    ("teacher", "model"),
    ("teacher", "precision"),
    ("teacher", "dense"),
    ("data", "dataset"),
    ("data", "setting"),
    ("transductive", "clusters"),
    ("eval", "mode"),
    ("eval", "absent_classes"),
    ("method", "bce"),
    ("method", "nel_norm"),
    ("method", "loss_resolution"),
    ("train", "amp"),
    ("train", "device"),
)
# Keys of teacher.model_overrides / student.arch_kwargs that would make open_clip, timm or transformers fetch or
# unpickle weights (pretrained=, pretrained_cfg_overlay={"url": ...}, weights_only=False, hf_model_name=...).
_FETCHING_KEYS = frozenset({"checkpoint_path", "cache_dir", "url", "file", "state_dict"})


def check_finite_tensors(state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or infinity, naming the first such tensor: a student with them labels every
    pixel as one class (argmax over NaN scores) and looks confident doing it."""
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"{source}: its weights {_quote(name)} hold {bad:,} non-finite values (NaN or infinity) of "
                f"{tensor.numel():,}; the model that saved them had diverged"
            )


# A name that points a library at a hub repository or a folder instead of its own registry: timm's and open_clip's
# "hf-hub:org/repo" (timm also "hf_hub:" and "local-dir:"), smp's "tu-" prefix before any of them, and URLs.
_HUB_NAME = re.compile(r"^\s*(tu-)?\s*(hf[-_]hub|local-dir)\s*:|://", re.IGNORECASE)


def validate_loaded_config(data: object, source: str = "checkpoint") -> Config:
    """The config stored in a checkpoint as a `Config`, refused with a one-line `CheckpointError` when unsafe.

    Refused: strings longer than any real config holds (quoted by a short prefix only), values no run can use
    (`clipzss.config.Config.validate`: sizes beyond `MAX_IMAGE_SIDE`, non-finite numbers, an ``alpha`` that is not
    positive, ...), override keys that would fetch pretrained weights from a network or unpickle them, and any
    string of the teacher or student that names a hub repository, a folder or a URL (``hf-hub:org/repo`` as a
    timm tower, ``tu-hf-hub:...`` as an encoder): a checkpoint never makes clipzss reach the network (see also
    `clipzss.models.teacher.build_teacher`'s ``download``). Ignored: ``teacher.cache_dir``, so a file never chooses where
    prediction writes; the user's own cache (``$XDG_CACHE_HOME/clipzss/text``) is used instead.
    """
    if not isinstance(data, dict):
        raise CheckpointError(f"{source}: its config is not a mapping of sections")
    try:
        _check_strings(data, "config", source)
    except RecursionError:
        raise CheckpointError(f"{source}: its config is nested too deeply to be a clipzss config") from None
    try:
        config = Config.from_dict(pin_saved_defaults(data), source=source)
    except ConfigValueError as err:  # the message names the file and the field
        raise CheckpointError(shorten(str(err), 300)) from None
    except ConfigError as err:
        raise CheckpointError(
            f"{source} holds a config this version of clipzss cannot read: {shorten(str(err), 300)}"
        ) from None
    for section, key in _NAME_FIELDS:
        value = getattr(getattr(config, section), key)
        if isinstance(value, str) and len(value) > MAX_NAME:
            raise CheckpointError(f"{source}: {section}.{key} is not a name: {_quote(value)}")
    for where, mapping in (
        ("teacher.model_overrides", config.teacher.model_overrides),
        ("student.arch_kwargs", config.student.arch_kwargs),
    ):
        key = _fetching_key(mapping, where)
        if key:
            raise CheckpointError(
                f"{source}: {key} would load pretrained weights from outside the checkpoint; refused "
                "(a checkpoint holds every weight its student needs)"
            )
    for section in ("teacher", "student"):
        found = _hub_name(data.get(section), section)
        if found:
            field, value = found
            raise CheckpointError(
                f"{source}: {field}={_quote(value)} names a model on the Hugging Face hub or elsewhere, which "
                "would make clipzss reach the network; refused (a checkpoint's config names models of the "
                "installed libraries only)"
            )
    if config.teacher.cache_dir is not None:
        logger.debug("%s: ignoring its teacher.cache_dir; text embeddings go to the user's cache", source)
        config.teacher.cache_dir = None
    return config


def _check_strings(value: object, where: str, source: str) -> None:
    if isinstance(value, str):
        if len(value) > MAX_CONFIG_STRING:
            raise CheckpointError(f"{source}: {where} is {len(value):,} characters long: {_quote(value)}")
    elif isinstance(value, dict):
        for key, item in value.items():
            if len(key) > MAX_NAME:
                raise CheckpointError(
                    f"{source}: {where} has a key of {len(key):,} characters: {_quote(key)}"
                )
            _check_strings(item, f"{where}.{key}", source)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_strings(item, f"{where}[{index}]", source)


def _fetching_key(value: object, where: str) -> str | None:
    """The dotted path of the first key that asks for outside weights, or None."""
    if isinstance(value, dict):
        for key, item in value.items():
            name = str(key).lower()
            if "pretrained" in name or "weights" in name or name.startswith("hf_") or name in _FETCHING_KEYS:
                return f"{where}.{key}"
            found = _fetching_key(item, f"{where}.{key}")
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _fetching_key(item, f"{where}[{index}]")
            if found:
                return found
    return None


def _hub_name(value: object, where: str) -> tuple[str, str] | None:
    """The first ``(dotted field, value)`` whose string value names a hub repository, a folder or a URL."""
    if isinstance(value, str):
        return (where, value) if _HUB_NAME.search(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _hub_name(item, f"{where}.{key}" if isinstance(value, dict) else f"{where}[{key}]")
        if found:
            return found
    return None


def _quote(value: str) -> str:
    """A value from a file, quoted by its first `QUOTE` characters."""
    return repr(value) if len(value) <= QUOTE else f"{value[:QUOTE]!r}... ({len(value):,} characters)"
