"""One CLIP-ZSS optimisation step: the parts it needs, the optimizer and its schedule, mixed precision, `train_step`.

Per step: the frozen teacher gives CLS + dense tokens; pseudo labels fill the ignored pixels; the
student embeds the crop; `compute_losses` adds GLM, NEL, CE and the synthesizer's BCE; the loss is back-propagated
through the AMP scaler, the gradients clipped and the optimizer stepped; the teacher's CLS tokens join the GLM's
bank. Each stage runs in a ``torch.profiler`` scope named in `STEP_SCOPES` (free when no profiler listens), so a
profile of the real step gives every stage's time (benchmarks/bench_train_step.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.profiler import record_function

from clipzss.config import Config, check_field
from clipzss.data import IGNORE_INDEX, VOID_INDEX
from clipzss.method.glm import GLM, image_ids
from clipzss.method.losses import compute_losses
from clipzss.method.pseudo_labels import pseudo_labels
from clipzss.method.transductive import EMAStudent, name_pixels, transductive_labels
from clipzss.models.student import Student
from clipzss.models.teacher import Teacher

# --- the parts and the optimizer --------------------------------------------------------------------------------


@dataclass
class TrainParts:
    """Everything a step needs; built once by `train`, or by tests and benchmarks directly."""

    cfg: Config
    teacher: Teacher
    student: nn.Module  # the Student, possibly DDP-wrapped or compiled
    glm: GLM | None
    synthesizer: nn.Module | None  # possibly DDP-wrapped
    text_seen: torch.Tensor  # (S, C)
    label_lut: torch.Tensor  # (256,) class id → seen index, 255 otherwise
    device: torch.device
    # data.setting=transductive: the target names' texts (T, C), the text classifier's rows after the seen ones
    text_target: torch.Tensor | None = None
    ema: EMAStudent | None = None  # the self-training student (transductive.self_train_start set)

    @property
    def texts(self) -> torch.Tensor:
        """The text classifier of the losses: the seen texts, then the target texts when there are any."""
        if self.text_target is None:
            return self.text_seen
        return torch.cat([self.text_seen, self.text_target.to(self.text_seen)])


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


# --- mixed precision --------------------------------------------------------------------------------------------

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def amp_mode(cfg: Config, device: torch.device) -> str:
    """bf16 autocast on CUDA by default, fp32 on CPU (CPU autocast is slower than fp32 for these nets)."""
    amp = check_field(cfg.train.amp, "train.amp")
    return ("bf16" if device.type == "cuda" else "off") if amp == "auto" else amp


def autocast_context(cfg: Config, device: torch.device) -> torch.autocast:
    dtype = AMP_DTYPES[amp_mode(cfg, device)]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def grad_scaler(cfg: Config, device: torch.device) -> torch.amp.GradScaler:
    """fp16 needs loss scaling; bf16 and fp32 do not (the scaler is then a no-op)."""
    return torch.amp.GradScaler(device.type, enabled=amp_mode(cfg, device) == "fp16")


# --- the step ---------------------------------------------------------------------------------------------------

# The profiler scopes of a step, in the order they run ("pseudo labels" only with method.pseudo_labels or in the
# transductive setting, whose named labels it includes; "bank" only with the GLM's bank).
STEP_SCOPES = tuple(
    f"train_step: {stage}"
    for stage in (
        "inputs",
        "teacher",
        "pseudo labels",
        "student forward",
        "losses",
        "backward",
        "optimizer",
        "bank",
    )
)


def _scope(stage: str) -> record_function:
    return record_function(f"train_step: {stage}")


def train_step(
    parts: TrainParts,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> dict[str, torch.Tensor]:
    """One step on ``batch``: teacher, pseudo labels, student, losses, backward and update, the bank.

    Returns the losses, still on the device: nothing here reads a value on the host except the pseudo-region
    count (see below), so the caller decides when to sync (`clipzss.training.loop.FiniteWatch`).
    """
    cfg, device = parts.cfg, parts.device
    with _scope("inputs"):
        images = batch["image"].to(device, non_blocking=True)  # (B, 3, H, W)
        # (B, H, W) dataset ids; unseen already 255 (unlabelled), void -1 (the files' ignore and crop padding)
        masks = batch["mask"].to(device, non_blocking=True)
        valid = masks != VOID_INDEX  # (B, H, W) pixels that are image content, labelled or not
        labels = parts.label_lut[masks.clamp(0, 255)]  # (B, H, W) seen index or 255
        labels = torch.where(valid, labels, IGNORE_INDEX)
        ids = image_ids(batch.get("name"), device)  # (B,) for GLM's honest negatives, or None
    texts = parts.texts  # (S [+ T], C)
    num_known = texts.shape[0]  # the classes with a text: seen, and the targets in the transductive setting
    with torch.no_grad():
        with _scope("teacher"):
            cls, dense = parts.teacher.encode_image(images)  # (B, C), (B, C, h, w)
        num_pseudo = None
        if parts.text_target is not None:
            with _scope("pseudo labels"):
                named = _named_labels(parts, images, dense, labels, valid)
                labels, num_pseudo = transductive_labels(
                    named, labels, dense, num_known, cfg.method, cfg.transductive, valid
                )
        elif cfg.method.pseudo_labels:
            with _scope("pseudo labels"):
                labels, num_pseudo = pseudo_labels(dense, labels, num_known, cfg.method, valid)
    with _scope("student forward"), autocast_context(cfg, device):
        embeddings = parts.student(images)  # (B, C, H/4, W/4)
    with _scope("losses"):
        # The step's one host read (it spares compute_losses from scanning the labels), made once the student
        # forward is queued, so the GPU keeps working while the host waits for the count.
        max_pseudo = int(num_pseudo.max()) if num_pseudo is not None else 0
        losses = compute_losses(
            embeddings.float(),
            labels,
            texts,
            cls,
            dense,
            num_known,
            cfg.method,
            parts.glm,
            parts.synthesizer,
            max_pseudo=max_pseudo,
            valid=valid,
            ids=ids,
        )
    apply_gradients(cfg, optimizer, scaler, losses["loss"])
    if parts.ema is not None:
        parts.ema.update(parts.student)
    if parts.glm is not None and cfg.method.bank:
        with _scope("bank"):  # after the update, so a batch is never its own negative
            parts.glm.update_bank(cls, ids)
    return losses


def _named_labels(
    parts: TrainParts,
    images: torch.Tensor,
    dense: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    """Target names on the unlabelled pixels: the teacher's, or the EMA student's once self-training has begun."""
    cfg, t = parts.cfg, parts.cfg.transductive
    num_seen = parts.text_seen.shape[0]
    start = t.self_train_start
    if parts.ema is not None and start is not None and parts.ema.done >= start:
        with autocast_context(cfg, parts.device):
            embeddings = parts.ema(images)  # (B, C, H/4, W/4)
        return name_pixels(
            embeddings, parts.texts, labels, num_seen, cfg.method.alpha, t.self_threshold, valid
        )
    return name_pixels(dense, parts.texts, labels, num_seen, 1.0 / t.tau, t.threshold, valid)


def apply_gradients(
    cfg: Config, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loss: torch.Tensor
) -> None:
    """Back-propagate ``loss`` through the scaler, clip the gradients' norm to train.grad_clip, step the optimizer."""
    with _scope("backward"):
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
    with _scope("optimizer"):
        if cfg.train.grad_clip:
            scaler.unscale_(optimizer)
            params = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        scaler.step(optimizer)
        scaler.update()
