"""The CLIP-ZSS training loop: one readable `train(cfg)` around a `train_step` that returns a dict of losses.

Per step (DESIGN.md §1): the frozen teacher gives CLS + dense tokens; pseudo labels fill the ignored pixels; the
student embeds the crop; `compute_losses` adds GLM, NEL, CE and the synthesizer's BCE. Multi-GPU runs come from
torchrun (DDP); resume is exact because the data stream, the augmentation seeds and every RNG are functions of
(seed, step) or are restored from the training state.

The module is ``training`` rather than ``train`` so that ``clipzss.train`` stays the function.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Sampler

from clipzss.checkpoint import CHECKPOINT_NAME, checkpoint_writes, write_failure
from clipzss.config import Config
from clipzss.data import IGNORE_INDEX, PAD_INDEX, build_dataset, build_eval_dataset, seen_lookup
from clipzss.evaluate import evaluate
from clipzss.files import atomic_write, atomic_write_all, remove_stale_temporaries
from clipzss.losses import compute_losses
from clipzss.glm import GLM
from clipzss.synthesizer import Synthesizer
from clipzss.predict import Segmenter
from clipzss.pseudo_labels import pseudo_labels
from clipzss.runs import RunFolderError, RunLock, changed_fields, check_fresh, describe_change, is_shape_field
from clipzss.runtime import resolve_device
from clipzss.student import Student, build_student
from clipzss.teacher import Teacher, build_teacher

log = logging.getLogger(__name__)

STATE_NAME = "train_state.pt"


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM: a checkpoint was saved at ``step`` and ``--resume`` continues from it."""

    def __init__(self, step: int, out: Path, signal_name: str) -> None:
        super().__init__(
            f"{signal_name} received: stopped after step {step}; the state is saved in {out} "
            f"(continue with: clipzss train {out / 'config.yaml'} --resume {out})"
        )
        self.step = step


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps, so a stop never cuts a step or a write."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self, info: DistInfo, device: torch.device) -> bool:
        """True on every rank as soon as any rank got a signal (one tiny all-reduce per step under DDP)."""
        if not info.enabled:
            return self.signal_name is not None
        flag = torch.tensor([float(self.signal_name is not None)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signal_name is None:
            self.signal_name = "SIGTERM (another rank)"
        return bool(flag.item())


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN/inf; training stops and the last good checkpoint is kept."""


# --- distributed ------------------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_pref: str) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes in the environment (nothing to do for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), resolve_device(device_pref)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local), device


# --- data stream ------------------------------------------------------------------------------------------------


def _mix(*values: int) -> int:
    """A deterministic 63-bit seed from integers (splitmix-style), stable across processes and runs."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x ^= (v + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2)) & 0xFFFFFFFFFFFFFFFF
        x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


class StreamSampler(Sampler):
    """An endless stream of (index, sample seed): epochs are seeded permutations, sharded by rank.

    Sample k of the stream is a pure function of (seed, rank, k), so resuming at step s only needs the offset
    s × batch size: no data is replayed and augmentations are identical to the uninterrupted run.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0) -> None:
        if size < world_size:
            raise ValueError(f"the training set has {size} images, fewer than the {world_size} processes")
        self.size, self.seed, self.rank, self.world, self.start = size, seed, rank, world_size, start
        self.per_rank = size // world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(self.start, self.per_rank)
        position = self.start
        while True:
            gen = torch.Generator().manual_seed(_mix(self.seed, epoch))
            perm = torch.randperm(self.size, generator=gen)[
                self.rank : self.per_rank * self.world : self.world
            ]
            for index in perm[offset:].tolist():
                yield index, _mix(self.seed, self.rank, position)
                position += 1
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # endless; DataLoader only needs it for len(), which we never call
        return 2**62


class SeededDataset(Dataset):
    """Runs each item's random augmentation under its own seed, whichever worker loads it."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        return self.dataset[index]


# --- optimisation -----------------------------------------------------------------------------------------------


def build_optimizer(student: Student, extra: list[nn.Module], cfg: Config) -> torch.optim.Optimizer:
    """AdamW; decoder, head and synthesizer at lr × head_lr_mult; no weight decay on norms and biases."""
    t = cfg.train
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}

    def add(params: Any, lr: float) -> None:
        for p in params:
            if p.requires_grad:
                wd = 0.0 if p.ndim <= 1 else t.weight_decay
                groups.setdefault((lr, wd), []).append(p)

    add(student.encoder_parameters(), t.lr)
    add(student.head_parameters(), t.lr * t.head_lr_mult)
    for module in extra:
        add(module.parameters(), t.lr * t.head_lr_mult)
    param_groups = [
        {"params": ps, "lr": lr, "base_lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()
    ]
    return torch.optim.AdamW(param_groups, lr=t.lr, weight_decay=t.weight_decay)


def lr_factor(step: int, cfg: Config) -> float:
    """Linear warm-up (from 1e-6) then poly decay to min_lr, as in the SegFormer / ZegCLIP recipes."""
    t = cfg.train
    poly = (1 - min(step, t.max_iters) / max(1, t.max_iters)) ** t.poly_power
    base = max(t.min_lr / t.lr, poly) if t.lr > 0 else poly
    if step < t.warmup_iters:
        warm = 1e-6 + (1 - 1e-6) * step / t.warmup_iters
        return base * warm
    return base


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: Config) -> float:
    factor = lr_factor(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]


# --- the step ---------------------------------------------------------------------------------------------------


@dataclass
class TrainParts:
    """Everything a step needs; built once by `train`, or by tests and benchmarks directly."""

    cfg: Config
    teacher: Teacher
    student: nn.Module  # the Student, possibly DDP-wrapped
    glm: GLM | None
    synthesizer: nn.Module | None  # possibly DDP-wrapped
    text_seen: torch.Tensor  # (S, C)
    label_lut: torch.Tensor  # (256,) class id → seen index, 255 otherwise
    device: torch.device


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def amp_mode(cfg: Config, device: torch.device) -> str:
    """bf16 autocast on CUDA by default, fp32 on CPU (CPU autocast is slower than fp32 for these nets)."""
    amp = cfg.train.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    if amp not in AMP_DTYPES:
        raise ValueError(f"train.amp='{cfg.train.amp}' is not one of auto, {', '.join(AMP_DTYPES)}")
    return amp


def autocast_context(cfg: Config, device: torch.device) -> torch.autocast:
    dtype = AMP_DTYPES[amp_mode(cfg, device)]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def train_step(
    parts: TrainParts, batch: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One forward of teacher, pseudo labels, student and losses; returns (losses, teacher CLS for the bank)."""
    cfg, device = parts.cfg, parts.device
    images = batch["image"].to(device, non_blocking=True)  # (B, 3, H, W)
    masks = batch["mask"].to(device, non_blocking=True)  # (B, H, W) dataset ids, unseen already 255, pad -1
    valid = masks != PAD_INDEX  # (B, H, W) image pixels (PadTo marks crop padding apart from "unlabelled")
    labels = parts.label_lut[masks.clamp(0, 255)]  # (B, H, W) seen index or 255
    labels = torch.where(valid, labels, IGNORE_INDEX)
    num_seen = parts.text_seen.shape[0]
    with torch.no_grad():
        cls, dense = parts.teacher.encode_image(images)  # (B, C), (B, C, h, w)
        num_pseudo = None
        if cfg.method.pseudo_labels:
            labels, num_pseudo = pseudo_labels(dense, labels, num_seen, cfg.method, valid)
    with autocast_context(cfg, device):
        embeddings = parts.student(images)  # (B, C, H/4, W/4)
    # The step's one host read (it spares compute_losses from scanning the labels), made once the student forward
    # is queued, so the GPU keeps working while the host waits for the count.
    max_pseudo = int(num_pseudo.max()) if num_pseudo is not None else 0
    synth = parts.synthesizer
    losses = compute_losses(
        embeddings.float(),
        labels,
        parts.text_seen,
        cls,
        dense,
        num_seen,
        cfg.method,
        parts.glm,
        synth,
        max_pseudo=max_pseudo,
        valid=valid,
    )
    return losses, cls


class FiniteWatch:
    """Records on the device the first step at which a loss term became non-finite; the host reads it in `check`.

    Reading the losses on the host every step would stall the GPU's queue once per step; the loop instead calls
    `check` only where it reads values anyway or must not go on with bad weights (logging, checkpoints, evaluation,
    the end). The error still names the term(s) and the step where they first went bad.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self.first_bad: torch.Tensor | None = None  # () int64, -1 while every term is finite
        self.bad_terms: torch.Tensor | None = None  # (T,) bool, the terms that were bad at first_bad

    def update(self, losses: dict[str, torch.Tensor], step: int) -> None:
        bad = ~torch.isfinite(torch.stack([v.detach().float() for v in losses.values()]))  # (T,)
        if self.first_bad is None:
            self.names = list(losses)
            self.first_bad = torch.full((), -1, dtype=torch.long, device=bad.device)
            self.bad_terms = torch.zeros_like(bad)
        first = bad.any() & (self.first_bad < 0)
        self.first_bad = torch.where(first, step, self.first_bad)
        self.bad_terms = torch.where(first, bad, self.bad_terms)

    def check(self, now: int | None = None) -> None:
        """Raise NonFiniteLossError naming the first bad step and its terms (one host sync)."""
        if self.first_bad is None:
            return
        step = int(self.first_bad)
        if step >= 0:
            bad = [name for name, flag in zip(self.names, self.bad_terms.tolist(), strict=True) if flag]
            seen = f" (noticed at step {now})" if now is not None and now != step else ""
            raise NonFiniteLossError(
                f"loss term(s) {', '.join(bad)} became non-finite at step {step}{seen}; training stopped and the "
                "last good checkpoint was kept (lower train.lr, check the data, or disable the term to find the "
                "cause)"
            )


def check_finite(losses: dict[str, torch.Tensor], step: int) -> None:
    """Stop at once with the name of the offending term (one host sync); the loop uses the lazier FiniteWatch."""
    watch = FiniteWatch()
    watch.update(losses, step)
    watch.check()


# --- checkpoints ------------------------------------------------------------------------------------------------


def _unwrap(module: nn.Module | None) -> nn.Module | None:
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
    student = _unwrap(parts.student)
    state = {
        "step": step,
        "student": student.state_dict(),
        "synthesizer": _unwrap(parts.synthesizer).state_dict() if parts.synthesizer is not None else None,
        "glm": parts.glm.state_dict() if parts.glm is not None else None,
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
        raise RuntimeError(
            f"cannot resume from {path}: the file is truncated, corrupt or unsafe ({err})"
        ) from None


class ResumeError(ValueError):
    """A resume whose config or model does not fit the saved state; nothing was written."""


def _resume_folder(resume: str | Path) -> Path:
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
        log.warning("the training state in %s holds no config to compare with; resuming unchecked", resume)
        return
    new = cfg.to_dict()
    changes = changed_fields(old, new)
    shape = [c for c in changes if is_shape_field(c[0])]
    old_layout, new_layout = _optimizer_layout(old.get("train", {})), _optimizer_layout(new["train"])
    if old_layout is not None and old_layout != new_layout:
        optimizer_fields = ("train.lr", "train.head_lr_mult", "train.weight_decay")
        shape += [c for c in changes if c[0] in optimizer_fields]
    if shape:
        folder = _resume_folder(resume)
        raise ResumeError(
            f"cannot resume from {resume}: the new config changes the model's shape "
            f"({'; '.join(describe_change(*c) for c in shape)}); resume with the run's own config "
            f"(clipzss train {folder / 'config.yaml'} --resume {folder}) or start a new run in another folder"
        )
    if changes and warn:
        log.warning(
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


def _restore(
    state: dict[str, Any],
    parts: TrainParts,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    resume: str | Path = "the training state",
) -> int:
    """Load a training state into freshly built parts; every mismatch is one `ResumeError`, checked first."""
    student = _unwrap(parts.student)
    _check_fits("student", student, state["student"], resume)
    for what, module, saved in (
        ("synthesizer", _unwrap(parts.synthesizer), state.get("synthesizer")),
        ("GLM", parts.glm, state.get("glm")),
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
        _unwrap(parts.synthesizer).load_state_dict(state["synthesizer"])
    if parts.glm is not None:
        parts.glm.load_state_dict(state["glm"])
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


def _open_run_folder(out: Path, info: DistInfo, resume: str | Path | None, overwrite: bool) -> RunLock | None:
    """Rank 0 locks the run folder, refuses one that holds another run, and clears stale temporaries.

    Under torchrun only rank 0 touches the folder; every rank learns its outcome, so all fail together.
    """
    lock, error = None, None
    if info.main:
        try:
            lock = RunLock(out).acquire()
            try:
                check_fresh(out, _resume_folder(resume) if resume is not None else None, overwrite)
                remove_stale_temporaries(out)
            except BaseException:
                lock.release()
                raise
        except (RunFolderError, OSError) as err:
            error = err
    if info.enabled:
        message = [None if error is None else str(error)]
        dist.broadcast_object_list(message, src=0)
        if error is None and message[0] is not None:
            raise RunFolderError(f"rank 0 could not open the run folder: {message[0]}")
    if error is not None:
        raise error
    return lock


# --- the loop ---------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _evaluate_student(
    parts: TrainParts, val_set: Dataset, info: DistInfo, writer: Any = None, step: int = 0
) -> dict[str, float]:
    student = _unwrap(parts.student)
    segmenter = Segmenter(student, parts.teacher, parts.cfg, parts.device)
    logits_fn = segmenter.logits_fn(val_set.class_names)
    result = evaluate(
        logits_fn,
        val_set,
        parts.cfg.eval,
        device=parts.device,
        num_workers=min(2, parts.cfg.data.num_workers),
        progress=info.main,
    )
    if writer is not None:  # rank 0: the report's figures, drawn while the student is still in eval mode
        from clipzss.report import log_to_tensorboard

        log_to_tensorboard(
            writer, result, step, dataset=val_set, logits_fn=logits_fn, eval_cfg=parts.cfg.eval
        )
    student.train()
    return result.metrics


def train(
    cfg: Config,
    teacher: Teacher | None = None,
    train_set: Dataset | None = None,
    val_set: Dataset | None = None,
    resume: str | Path | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Train a student; objects passed here replace the ones the config would build. Returns the checkpoint path.

    ``train.output_dir`` must not hold another run (model.safetensors, train_state.pt or config.yaml) unless
    ``resume`` continues that run or ``overwrite`` is true; it is locked (``train.lock``) while training runs, and
    temporaries left there by a killed checkpoint write are removed. A resume is checked against the saved config
    before anything is written (`check_resume_config`).
    """
    state = load_training_state(Path(resume)) if resume is not None else None  # fail before building anything
    info, device = setup_distributed(cfg.train.device)
    if state is not None:
        check_resume_config(state, cfg, resume, warn=info.main)
    out = Path(cfg.train.output_dir)
    with contextlib.ExitStack() as cleanup:  # on any exit: progress bar, TensorBoard writer, then the lock
        lock = _open_run_folder(out, info, resume, overwrite)
        if lock is not None:
            cleanup.callback(lock.release)
        return _train(cfg, teacher, train_set, val_set, state, resume, info, device, out, cleanup)


def _train(
    cfg: Config,
    teacher: Teacher | None,
    train_set: Dataset | None,
    val_set: Dataset | None,
    state: dict[str, Any] | None,
    resume: str | Path | None,
    info: DistInfo,
    device: torch.device,
    out: Path,
    cleanup: contextlib.ExitStack,
) -> Path:
    """The body of `train`, with the run folder checked and locked; `cleanup` closes what it opens."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    seed_everything(cfg.train.seed + info.rank)
    teacher = teacher or build_teacher(cfg.teacher, device=device)
    if teacher.embed_dim != cfg.student.embed_dim:
        raise ValueError(
            f"student.embed_dim={cfg.student.embed_dim} but the teacher's embeddings have {teacher.embed_dim} "
            f"dimensions: set student.embed_dim={teacher.embed_dim}"
        )
    train_set = train_set or build_dataset(cfg, cfg.data.train_split, train=True)
    if val_set is None and cfg.train.eval_interval > 0:
        val_set = build_eval_dataset(cfg)
    split = train_set.split
    class_names = list(split.class_names)
    # Only the seen names are encoded: under the inductive protocol an unseen name is first read at test time.
    text_seen = teacher.text_embeddings([class_names[i] for i in split.seen]).to(device)  # (S, C)
    if info.main:
        log.info(
            "training on %d images: %d seen classes, %d unseen held out (%s)",
            len(train_set),
            len(split.seen),
            len(split.unseen),
            ", ".join(class_names[i] for i in split.unseen) or "none",
        )

    student = build_student(cfg.student).to(device)
    glm = GLM(cfg.method, teacher.embed_dim).to(device) if cfg.method.glm else None
    synth = (
        Synthesizer.from_config(cfg.method, teacher.embed_dim).to(device) if cfg.method.synthesizer else None
    )
    if info.enabled and device.type == "cuda":  # batch statistics over all GPUs (SyncBatchNorm is CUDA-only)
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    if cfg.train.compile:
        student = torch.compile(student)
    optimizer = build_optimizer(_unwrap(student), [synth] if synth is not None else [], cfg)
    if info.enabled:
        ids = [device.index] if device.type == "cuda" else None
        student = nn.parallel.DistributedDataParallel(student, device_ids=ids)
        if synth is not None:
            synth = nn.parallel.DistributedDataParallel(synth, device_ids=ids)
    parts = TrainParts(cfg, teacher, student, glm, synth, text_seen, seen_lookup(split).to(device), device)

    # fp16 needs loss scaling; bf16 and fp32 do not (the scaler is then a no-op).
    scaler = torch.amp.GradScaler(device.type, enabled=amp_mode(cfg, device) == "fp16")
    start = 0
    if state is not None:
        start = _restore(state, parts, optimizer, scaler, resume)
        if info.main:
            log.info("resumed from %s at step %d", resume, start)
    if cfg.train.batch_size % info.world_size:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} is the global batch and must divide evenly over "
            f"{info.world_size} processes"
        )
    if info.main:  # only now, with everything checked: a refused start leaves the folder as it was
        atomic_write(out / "config.yaml", cfg.save)
    per_rank = cfg.train.batch_size // info.world_size
    sampler = StreamSampler(len(train_set), cfg.train.seed, info.rank, info.world_size, start * per_rank)
    loader = DataLoader(
        SeededDataset(train_set),
        batch_size=per_rank,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.data.num_workers > 0,
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
    meta = {
        "teacher": getattr(teacher, "identity", type(teacher).__name__),
        "class_names": ",".join(class_names),
        "unseen": ",".join(class_names[i] for i in split.unseen),
    }
    writer = SummaryWriter(str(out / "tb")) if info.main else None
    if writer is not None:
        cleanup.callback(writer.close)
    student.train()
    bar = tqdm(
        total=cfg.train.max_iters, initial=start, disable=not info.main, desc="train", dynamic_ncols=True
    )
    cleanup.callback(bar.close)  # an error then starts on a line of its own
    batches = iter(loader)
    tic = time.perf_counter()
    ckpt = out / CHECKPOINT_NAME
    watch = FiniteWatch()
    with StopRequest() as stop:
        for step in range(start, cfg.train.max_iters):
            lr = set_lr(optimizer, step, cfg)
            losses, cls = train_step(parts, next(batches))
            watch.update(losses, step)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            if cfg.train.grad_clip:
                scaler.unscale_(optimizer)
                params = [p for g in optimizer.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if glm is not None and cfg.method.bank:
                glm.update_bank(cls)
            done = step + 1
            bar.update(1)
            if done % cfg.train.log_interval == 0 or done == cfg.train.max_iters or _due(done, cfg, val_set):
                watch.check(step)  # before anything logs, saves or evaluates what a bad step produced
            if writer is not None and (done % cfg.train.log_interval == 0 or done == cfg.train.max_iters):
                scalars = {k: float(v.detach()) for k, v in losses.items()}
                for name, value in scalars.items():
                    writer.add_scalar(f"loss/{name}", value, done)
                writer.add_scalar("lr", lr, done)
                writer.add_scalar(
                    "it_per_s", cfg.train.log_interval / max(1e-9, time.perf_counter() - tic), done
                )
                tic = time.perf_counter()
                bar.set_postfix(loss=f"{scalars['loss']:.3f}", lr=f"{lr:.2e}")
                log.debug("step %d %s", done, scalars)
            if done % cfg.train.ckpt_interval == 0 or done == cfg.train.max_iters:
                if info.main:
                    ckpt = save_training_state(out, done, parts, optimizer, meta, scaler)
                if info.enabled:
                    dist.barrier()
            if val_set is not None and (done % cfg.train.eval_interval == 0 or done == cfg.train.max_iters):
                metrics = _evaluate_student(parts, val_set, info, writer, done)
                if writer is not None:
                    for name, value in metrics.items():
                        if isinstance(value, float) and math.isfinite(value):
                            writer.add_scalar(f"val/{name}", value, done)
                    log.info("step %d: %s", done, _summary(metrics))
            if stop.requested(info, device) and done < cfg.train.max_iters:
                watch.check(step)
                if info.main:
                    save_training_state(out, done, parts, optimizer, meta, scaler)
                raise TrainingInterrupted(done, out, stop.signal_name or "signal")
    bar.close()
    if writer is not None:
        writer.close()
    if info.enabled:
        dist.barrier()
    return ckpt


def _due(done: int, cfg: Config, val_set: Dataset | None) -> bool:
    """Whether step ``done`` saves a checkpoint or evaluates."""
    evaluates = val_set is not None and cfg.train.eval_interval > 0 and done % cfg.train.eval_interval == 0
    return done % cfg.train.ckpt_interval == 0 or evaluates


def _summary(metrics: dict[str, Any]) -> str:
    keys = ("pAcc", "mIoU(S)", "mIoU(U)", "hIoU")
    return " ".join(f"{k} {metrics[k]:.2f}" for k in keys if isinstance(metrics.get(k), float))
