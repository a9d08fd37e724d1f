"""The CLIP-ZSS training loop: one readable `train(cfg)` around `train_step` (:mod:`clipzss.training.step`).

`train` opens and locks the run folder, builds the parts, then steps: it logs, saves checkpoints
(:mod:`clipzss.training.state`) and evaluates on the schedule of `due`, and stops cleanly on SIGINT/SIGTERM or a
non-finite loss. Multi-GPU runs come from torchrun (DDP); resume is exact because the data stream, the
augmentation seeds and every RNG are functions of (seed, step) or are restored from the training state.

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

from clipzss.checkpoint import CHECKPOINT_NAME
from clipzss.config import Config, TrainConfig, check_field
from clipzss.data import Split, build_dataset, build_eval_dataset, seen_lookup
from clipzss.errors import ClipzssError, UsageError
from clipzss.evaluate import evaluate
from clipzss.files import atomic_write, remove_stale_temporaries
from clipzss.method.glm import GLM
from clipzss.method.synthesizer import Synthesizer
from clipzss.method.transductive import EMAStudent
from clipzss.models.segmenter import Segmenter
from clipzss.models.student import build_student
from clipzss.models.teacher import Teacher, build_teacher
from clipzss.runs import RunFolderError, RunLock, check_fresh, same_folder
from clipzss.runtime import resolve_device
from clipzss.training.state import (
    check_resume_config,
    load_training_state,
    restore_training_state,
    resume_folder,
    save_training_state,
    unwrap,
)
from clipzss.training.step import TrainParts, build_optimizer, grad_scaler, set_lr, train_step

logger = logging.getLogger(__name__)


class TrainingInterrupted(ClipzssError):
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


class NonFiniteLossError(ClipzssError, RuntimeError):
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
            raise UsageError(f"the training set has {size} images, fewer than the {world_size} processes")
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


# --- the schedule -----------------------------------------------------------------------------------------------


def due(done: int, interval: int, max_iters: int) -> bool:
    """Whether the step that makes ``done`` steps logs, saves or evaluates on ``interval``: every ``interval``-th
    step and always the last one; ``interval=0`` means the last step only."""
    return done == max_iters or (interval > 0 and done % interval == 0)


def check_schedule(t: TrainConfig) -> None:
    """Refuse negative intervals in one line naming the field (0 is allowed: at the last step only)."""
    Config(train=t).validate()


def check_setting(cfg: Config, split: Split) -> None:
    """One line naming the field when ``data.setting`` or the transductive section does not fit (a training set
    passed to `train` decides the split; `EMAStudent` checks its decay)."""
    check_field(cfg.data.setting, "data.setting")
    if cfg.data.setting == "supervised" and split.unseen:
        raise UsageError(
            f"data.setting=supervised trains on every class's labels, but the training set holds out "
            f"{len(split.unseen)} classes as unlabelled: build it with unseen=[]"
        )
    if cfg.data.setting != "transductive":
        return
    if not split.unseen:
        raise UsageError("data.setting=transductive needs target names: list them in data.unseen")
    t = cfg.transductive
    check_field(t.clusters, "transductive.clusters")
    if not t.tau > 0:
        raise UsageError(f"transductive.tau={t.tau} must be positive")
    for name in ("threshold", "self_threshold"):
        if not 0.0 <= getattr(t, name) <= 1.0:
            raise UsageError(
                f"transductive.{name}={getattr(t, name)} is a probability: give a value in [0, 1]"
            )
    if t.self_train_start is not None and t.self_train_start < 0:
        raise UsageError(
            f"transductive.self_train_start={t.self_train_start} is negative: give a number of steps, or null"
        )


# --- the run folder ---------------------------------------------------------------------------------------------


def _open_run_folder(out: Path, info: DistInfo, resume: str | Path | None, overwrite: bool) -> RunLock | None:
    """Rank 0 locks the run folder, refuses one that holds another run, and clears stale temporaries.

    Under torchrun only rank 0 touches the folder; every rank learns its outcome, so all fail together.
    """
    lock, error = None, None
    if info.main:
        try:
            lock = RunLock(out).acquire()
            try:
                check_fresh(out, resume_folder(resume) if resume is not None else None, overwrite)
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


# --- training ---------------------------------------------------------------------------------------------------


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

    ``val_set`` (by default the config's evaluation set when ``train.eval_interval`` > 0) is evaluated every
    ``eval_interval`` steps and after the last one; with ``eval_interval=0`` no evaluation set is built, and a
    ``val_set`` passed here is evaluated once, after the last step.
    """
    cfg.validate()  # a config built in Python was never read through Config.from_dict
    state = load_training_state(Path(resume)) if resume is not None else None  # fail before building anything
    info, device = setup_distributed(cfg.train.device)
    if state is not None:
        check_resume_config(state, cfg, resume, warn=info.main)
    out = Path(cfg.train.output_dir)
    if resume is not None and info.main and not same_folder(out, resume_folder(resume)):
        logger.warning(
            "resuming %s into another folder, %s (train.output_dir); %s itself stays as it is",
            resume,
            out,
            resume_folder(resume),
        )
    lock = _open_run_folder(out, info, resume, overwrite)
    try:
        run = _build_run(cfg, info, device, teacher, train_set, val_set)
        if state is not None:
            run.start = restore_training_state(state, run.parts, run.optimizer, run.scaler, resume)
            if info.main:
                logger.info("resumed from %s at step %d", resume, run.start)
        if cfg.train.batch_size % info.world_size:
            raise UsageError(
                f"train.batch_size={cfg.train.batch_size} is the global batch and must divide evenly over "
                f"{info.world_size} processes"
            )
        if info.main:  # only now, with everything checked: a refused start leaves the folder as it was
            atomic_write(out / "config.yaml", cfg.save)
        return _loop(run, out, info)
    finally:
        if lock is not None:
            lock.release()


# --- building ---------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """One run, built and checked: what the loop steps, with what, from which step, and what it evaluates."""

    parts: TrainParts
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_set: Dataset
    val_set: Dataset | None
    start: int = 0  # the first step: 0, or the step a resumed state stopped at


def _build_run(
    cfg: Config,
    info: DistInfo,
    device: torch.device,
    teacher: Teacher | None,
    train_set: Dataset | None,
    val_set: Dataset | None,
) -> _Run:
    """Build what `train` was not given (teacher, datasets), then the networks, the optimizer and the scaler.

    The global RNG is seeded first and everything is built in one fixed order, so the initial weights are a
    function of the seed and the rank.
    """
    seed_everything(cfg.train.seed + info.rank)
    teacher = teacher or build_teacher(cfg.teacher, device=device)
    if teacher.embed_dim != cfg.student.embed_dim:
        raise UsageError(
            f"student.embed_dim={cfg.student.embed_dim} but the teacher's embeddings have {teacher.embed_dim} "
            f"dimensions: set student.embed_dim={teacher.embed_dim}"
        )
    train_set = train_set or build_dataset(cfg, cfg.data.train_split, train=True)
    if val_set is None and cfg.train.eval_interval > 0:
        val_set = build_eval_dataset(cfg)
    split = train_set.split
    check_setting(cfg, split)
    text_seen, text_target = _class_texts(cfg, teacher, split, device)
    if info.main:
        _log_classes(len(train_set), split, transductive=text_target is not None)
    student, glm, synth, optimizer = _build_networks(cfg, teacher.embed_dim, len(train_set), info, device)
    ema = None
    if text_target is not None and cfg.transductive.self_train_start is not None:
        ema = EMAStudent(unwrap(student), cfg.transductive.ema_decay).to(device)
    parts = TrainParts(
        cfg, teacher, student, glm, synth, text_seen, seen_lookup(split).to(device), device, text_target, ema
    )
    return _Run(parts, optimizer, grad_scaler(cfg, device), train_set, val_set)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs, of which a run's initial weights are a function."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _class_texts(
    cfg: Config, teacher: Teacher, split: Split, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The seen names' text embeddings (S, C) and, in the transductive setting, the target names' (T, C).

    Only these names are encoded: under the inductive protocol an unseen name is first read at test time, and a
    transductive target is a name whose labels stay unread.
    """
    names = split.class_names
    text_seen = teacher.text_embeddings([names[i] for i in split.seen]).to(device)
    if cfg.data.setting != "transductive":
        return text_seen, None
    return text_seen, teacher.text_embeddings([names[i] for i in split.unseen]).to(device)


def _log_classes(size: int, split: Split, transductive: bool) -> None:
    names = split.class_names
    logger.info(
        "training on %d images: %d seen classes, %d unseen held out (%s)",
        size,
        len(split.seen),
        len(split.unseen),
        ", ".join(names[i] for i in split.unseen) or "none",
    )
    if transductive:
        logger.info(
            "transductive: the held-out names are targets of named pseudo labels, their labels unread"
        )


def _build_networks(
    cfg: Config, embed_dim: int, dataset_size: int, info: DistInfo, device: torch.device
) -> tuple[nn.Module, GLM | None, nn.Module | None, torch.optim.Optimizer]:
    """The student, the GLM bank and the synthesizer (each on ``device``), and the optimizer of their weights.

    The optimizer is built on the plain modules; under DDP the student and the synthesizer are then wrapped.
    """
    student = build_student(cfg.student).to(device)
    glm = GLM(cfg.method, embed_dim, dataset_size=dataset_size).to(device) if cfg.method.glm else None
    synth = Synthesizer.from_config(cfg.method, embed_dim).to(device) if cfg.method.synthesizer else None
    if info.enabled and device.type == "cuda":  # batch statistics over all GPUs (SyncBatchNorm is CUDA-only)
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    if cfg.train.compile:
        student = torch.compile(student)
    optimizer = build_optimizer(unwrap(student), [synth] if synth is not None else [], cfg)
    if info.enabled:
        ids = [device.index] if device.type == "cuda" else None
        student = nn.parallel.DistributedDataParallel(student, device_ids=ids)
        if synth is not None:
            synth = nn.parallel.DistributedDataParallel(synth, device_ids=ids)
    return student, glm, synth, optimizer


def _batches(run: _Run, info: DistInfo) -> DataLoader:
    """This rank's share of the seeded stream, from the run's first step on."""
    cfg, device = run.parts.cfg, run.parts.device
    per_rank = cfg.train.batch_size // info.world_size
    sampler = StreamSampler(
        len(run.train_set), cfg.train.seed, info.rank, info.world_size, run.start * per_rank
    )
    return DataLoader(
        SeededDataset(run.train_set),
        batch_size=per_rank,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.data.num_workers > 0,
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )


def _checkpoint_meta(teacher: Teacher, split: Split) -> dict[str, str]:
    """What every checkpoint of the run records about its teacher and classes."""
    names = split.class_names
    return {
        "teacher": getattr(teacher, "identity", type(teacher).__name__),
        "class_names": ",".join(names),
        "unseen": ",".join(names[i] for i in split.unseen),
    }


# --- the loop ---------------------------------------------------------------------------------------------------


def _loop(run: _Run, out: Path, info: DistInfo) -> Path:
    """Step from ``run.start`` to ``train.max_iters``; log, save and evaluate when `due`; stop on a signal."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    parts, optimizer, scaler, val_set = run.parts, run.optimizer, run.scaler, run.val_set
    cfg, t = parts.cfg, parts.cfg.train
    loader = _batches(run, info)
    meta = _checkpoint_meta(parts.teacher, run.train_set.split)
    ckpt = out / CHECKPOINT_NAME
    watch = FiniteWatch()
    # On any exit, in this order: the signal handlers, the progress bar, the TensorBoard writer.
    with contextlib.ExitStack() as opened:
        writer = opened.enter_context(SummaryWriter(str(out / "tb"))) if info.main else None
        parts.student.train()
        bar = tqdm(
            total=t.max_iters, initial=run.start, disable=not info.main, desc="train", dynamic_ncols=True
        )
        opened.enter_context(bar)  # an error then starts on a line of its own
        batches = iter(loader)
        speed = _Speed(run.start)
        stop = opened.enter_context(StopRequest())
        for step in range(run.start, t.max_iters):
            lr = set_lr(optimizer, step, cfg)
            losses = train_step(parts, next(batches), optimizer, scaler)
            watch.update(losses, step)
            done = step + 1
            bar.update(1)
            logs, saves = due(done, t.log_interval, t.max_iters), due(done, t.ckpt_interval, t.max_iters)
            evaluates = val_set is not None and due(done, t.eval_interval, t.max_iters)
            if logs or saves or evaluates:
                watch.check(step)  # before anything logs, saves or evaluates what a bad step produced
            if writer is not None and logs:
                _log_step(writer, bar, losses, lr, done, speed)
            if saves:
                if info.main:
                    ckpt = save_training_state(out, done, parts, optimizer, meta, scaler)
                if info.enabled:
                    dist.barrier()
            if evaluates:
                metrics = _evaluate_student(parts, val_set, info, writer, done)
                if writer is not None:
                    _log_metrics(writer, metrics, done)
            if stop.requested(info, parts.device) and done < t.max_iters:
                watch.check(step)
                if info.main:
                    save_training_state(out, done, parts, optimizer, meta, scaler)
                raise TrainingInterrupted(done, out, stop.signal_name or "signal")
    if info.enabled:
        dist.barrier()
    return ckpt


def _evaluate_student(
    parts: TrainParts, val_set: Dataset, info: DistInfo, writer: Any = None, step: int = 0
) -> dict[str, float]:
    student = unwrap(parts.student)
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


class _Speed:
    """Steps per second since it was last read (the host waits for the device when it reads the losses)."""

    def __init__(self, step: int) -> None:
        self.tic, self.step = time.perf_counter(), step

    def read(self, done: int) -> float:
        rate = (done - self.step) / max(1e-9, time.perf_counter() - self.tic)
        self.tic, self.step = time.perf_counter(), done
        return rate


def _log_step(
    writer: Any, bar: Any, losses: dict[str, torch.Tensor], lr: float, done: int, speed: _Speed
) -> None:
    """The losses, learning rate and speed after step ``done``: to TensorBoard, the progress bar and the debug log."""
    scalars = {k: float(v.detach()) for k, v in losses.items()}
    for name, value in scalars.items():
        writer.add_scalar(f"loss/{name}", value, done)
    writer.add_scalar("lr", lr, done)
    writer.add_scalar("it_per_s", speed.read(done), done)
    bar.set_postfix(loss=f"{scalars['loss']:.3f}", lr=f"{lr:.2e}")
    logger.debug("step %d %s", done, scalars)


def _log_metrics(writer: Any, metrics: dict[str, Any], done: int) -> None:
    """An evaluation's finite numbers to TensorBoard, and its headline metrics to the log."""
    for name, value in metrics.items():
        if isinstance(value, float) and math.isfinite(value):
            writer.add_scalar(f"val/{name}", value, done)
    logger.info("step %d: %s", done, _summary(metrics))


def _summary(metrics: dict[str, Any]) -> str:
    keys = ("pAcc", "mIoU(S)", "mIoU(U)", "hIoU")
    return " ".join(f"{k} {metrics[k]:.2f}" for k in keys if isinstance(metrics.get(k), float))
