"""The resumable state of a run: written beside every checkpoint, read back, checked against a new config, restored.

`save_training_state` writes the inference checkpoint and ``train_state.pt`` (weights, optimizer, scaler, RNG
states, the config) together and atomically; `check_resume_config` compares a saved config with a new one before
anything is built; `restore_training_state` loads a state into freshly built parts, every mismatch one
`ResumeError`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from clipzss.checkpoint import CHECKPOINT_NAME, checkpoint_writes, write_failure
from clipzss.config import Config, pin_saved_defaults
from clipzss.errors import CannotRunError, ClipzssError
from clipzss.files import atomic_write_all
from clipzss.runs import changed_fields, describe_change, is_shape_field
from clipzss.training.step import TrainParts

logger = logging.getLogger(__name__)

STATE_NAME = "train_state.pt"


def unwrap(module: nn.Module | None) -> nn.Module | None:
    """The plain module under DDP and ``torch.compile`` wrappers, whose state dicts would prefix every key
    (``module.``, ``_orig_mod.``) so that a checkpoint could not be loaded into a plain model."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            module = module._orig_mod
        else:
            return module


def save_training_state(
    out: Path,
    step: int,
    parts: TrainParts,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, str],
    scaler: torch.amp.GradScaler | None = None,
) -> Path:
    """The inference checkpoint (safetensors + config) and the resumable state, written together atomically.

    Every file goes to a temporary first and all are renamed only once all are complete, so a failed write (a
    full disk) leaves the previous checkpoint exactly as it was; it is reported as one `CheckpointWriteError`
    naming the folder and the checkpoint kept.
    """
    student = unwrap(parts.student)
    state = {
        "step": step,
        "student": student.state_dict(),
        "synthesizer": unwrap(parts.synthesizer).state_dict() if parts.synthesizer is not None else None,
        "glm": parts.glm.state_dict() if parts.glm is not None else None,
        "ema": parts.ema.state_dict() if parts.ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng_torch": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "config": parts.cfg.to_dict(),
    }
    writes = checkpoint_writes(out / CHECKPOINT_NAME, state["student"], parts.cfg, step=str(step), **meta)
    writes.append((out / STATE_NAME, lambda tmp: torch.save(state, tmp)))
    try:
        atomic_write_all(writes)
    except Exception as err:
        raise write_failure(err, out, f"the checkpoint of step {step}") from err
    return writes[0][0]


def load_training_state(path: Path) -> dict[str, Any]:
    """`weights_only=True`: a training state is tensors and plain values; anything else is refused."""
    if path.is_dir():
        path = path / STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no training state to resume from at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CannotRunError(
            f"cannot resume from {path}: the file is truncated, corrupt or unsafe ({_load_failure(err)})"
        ) from None


def _load_failure(err: Exception) -> str:
    """Why torch refused the file, without its advice to load it with ``weights_only=False`` (which would run
    whatever code the file holds) and without its terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    if "Weights only load failed" not in text:
        return text.strip().splitlines()[0] if text.strip() else type(err).__name__
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(
        r"Unsupported operand \d+", text
    )
    what = f" ({found.group(1) if found.lastindex else found.group(0)})" if found else ""
    return f"not tensors and plain values alone{what}; clipzss never unpickles anything else"


class ResumeError(ClipzssError, ValueError):
    """A resume whose config or model does not fit the saved state; nothing was written."""


def resume_folder(resume: str | Path) -> Path:
    resume = Path(resume)
    return resume if resume.is_dir() else resume.parent


def _optimizer_layout(train: dict[str, Any]) -> tuple[bool, bool] | None:
    """What decides build_optimizer's parameter groups: head lr equal to the encoder's, and no weight decay."""
    try:
        lr, mult, wd = float(train["lr"]), float(train["head_lr_mult"]), float(train["weight_decay"])
    except (KeyError, TypeError, ValueError):
        return None
    return (lr * mult == lr, wd == 0.0)


def check_resume_config(state: dict[str, Any], cfg: Config, resume: str | Path, warn: bool = True) -> None:
    """Compare the config saved in the state with the new one, before anything is built or written.

    A change to a field that decides which tensors exist or their shapes (`clipzss.runs.is_shape_field`, or one
    that regroups the optimizer's parameters) raises `ResumeError` naming every such field in one line; other
    changes (schedule, loss weights, switches without tensors) are logged as one warning, old → new.
    """
    old = state.get("config")
    if not isinstance(old, dict):
        logger.warning("the training state in %s holds no config to compare with; resuming unchecked", resume)
        return
    new = cfg.to_dict()
    changes = changed_fields(pin_saved_defaults(old), new)  # a state without teacher.dense computed "value"
    shape = [c for c in changes if is_shape_field(c[0])]
    old_layout, new_layout = _optimizer_layout(old.get("train", {})), _optimizer_layout(new["train"])
    if old_layout is not None and old_layout != new_layout:
        optimizer_fields = ("train.lr", "train.head_lr_mult", "train.weight_decay")
        shape += [c for c in changes if c[0] in optimizer_fields]
    if shape:
        folder = resume_folder(resume)
        raise ResumeError(
            f"cannot resume from {resume}: the new config changes the model's shape "
            f"({'; '.join(describe_change(*c) for c in shape)}); resume with the run's own config "
            f"(clipzss train {folder / 'config.yaml'} --resume {folder}) or start a new run in another folder"
        )
    if changes and warn:
        logger.warning(
            "resuming %s with changed settings: %s", resume, "; ".join(describe_change(*c) for c in changes)
        )


def _check_fits(what: str, module: nn.Module, saved: dict[str, torch.Tensor], resume: str | Path) -> None:
    """One line when saved weights do not fit a module (instead of load_state_dict's dump of every key)."""
    current = module.state_dict()
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    reshaped = [k for k in current if k in saved and tuple(saved[k].shape) != tuple(current[k].shape)]
    if missing or unexpected or reshaped:
        counts = [
            (len(missing), "missing"),
            (len(unexpected), "unexpected"),
            (len(reshaped), "of another shape"),
        ]
        example = (reshaped or missing or unexpected)[0]
        raise ResumeError(
            f"cannot resume from {resume}: its {what} weights do not fit this config's model "
            f"({', '.join(f'{n} tensors {why}' for n, why in counts if n)}, e.g. {example})"
        )


def restore_training_state(
    state: dict[str, Any],
    parts: TrainParts,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    resume: str | Path = "the training state",
) -> int:
    """Load a training state into freshly built parts; every mismatch is one `ResumeError`, checked first."""
    student = unwrap(parts.student)
    _check_fits("student", student, state["student"], resume)
    for what, module, saved in (
        ("synthesizer", unwrap(parts.synthesizer), state.get("synthesizer")),
        ("GLM", parts.glm, state.get("glm")),
        ("EMA student", parts.ema, state.get("ema")),
    ):
        if (module is None) != (saved is None):
            had = "has" if saved is not None else "has no"
            raise ResumeError(f"cannot resume from {resume}: it {had} {what} state and this config differs")
        if module is not None:
            _check_fits(what, module, saved, resume)
    saved_groups = [len(g["params"]) for g in state["optimizer"]["param_groups"]]
    groups = [len(g["params"]) for g in optimizer.param_groups]
    if saved_groups != groups:
        raise ResumeError(
            f"cannot resume from {resume}: its optimizer has parameter groups of {saved_groups} tensors, this "
            f"config's has {groups} (train.head_lr_mult or train.weight_decay changed?)"
        )
    student.load_state_dict(state["student"])
    if parts.synthesizer is not None:
        unwrap(parts.synthesizer).load_state_dict(state["synthesizer"])
    if parts.glm is not None:
        parts.glm.load_state_dict(state["glm"])
    if parts.ema is not None:
        parts.ema.load_state_dict(state["ema"])
    # load_state_dict takes the saved groups' hyper-parameters; the new config's lr and weight decay count.
    fresh = [{"base_lr": g["base_lr"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    for group, values in zip(optimizer.param_groups, fresh):
        group.update(values)
    if state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_torch"])
    if torch.cuda.is_available() and state.get("rng_cuda"):
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return int(state["step"])
