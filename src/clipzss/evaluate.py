"""Evaluation under the ZegCLIP generalised zero-shot protocol: joint argmax, one confusion matrix, split means.

Every class, seen and unseen, competes in one argmax (a model is never told which classes are unseen); the
per-class IoUs of the resulting confusion matrix are then averaged separately over the seen and the unseen
ids, and hIoU is their harmonic mean (docs/protocols.md). The matrix streams over the dataset and sums across
processes, so the numbers do not depend on how many GPUs ran the evaluation. Model code is not imported here:
callers pass a ``logits_fn``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from clipzss.config import Config, EvalConfig, check_field
from clipzss.data.splits import IGNORE_INDEX
from clipzss.errors import UsageError
from clipzss.files import atomic_write_all
from clipzss.inference.label_maps import check_candidates
from clipzss.inference.windows import LogitsFn, seen_calibrated, window_labels
from clipzss.messages import fmt_number

logger = logging.getLogger(__name__)

SUMMARY_KEYS: tuple[str, ...] = ("pAcc", "mAcc", "mIoU(S)", "mIoU(U)", "hIoU", "mIoU")


class ConfusionMatrix:
    """A streaming (K, K) confusion matrix: rows are ground truth, columns are predictions.

    Pixels whose target is ``ignore_index`` are never counted. One ``bincount`` per update keeps it at GPU speed.
    """

    def __init__(
        self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: torch.device | str | None = None
    ):
        if num_classes < 1:
            raise UsageError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.matrix.zero_()

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Count one batch of predicted ids against ground-truth ids, both (B, H, W) integer tensors."""
        if pred.shape != target.shape:
            raise UsageError(
                f"pred shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}"
            )
        for name, tensor in (("pred", pred), ("target", target)):
            if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
                raise UsageError(f"{name} must hold integer class ids, got dtype {tensor.dtype} (logits?)")
        device = self.matrix.device
        pred = pred.to(device).long().flatten()
        target = target.to(device).long().flatten()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        k = self.num_classes
        for name, ids in (("target", target), ("pred", pred)):
            bad = (ids < 0) | (ids >= k)
            if bool(bad.any()):
                value = int(ids[bad][0])
                raise UsageError(
                    f"{name} holds class id {value}, outside [0, {k}) and not the ignore index {self.ignore_index}"
                )
        counts = torch.bincount(target * k + pred, minlength=k * k)  # (K*K,)
        self.matrix += counts.view(k, k)

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the matrices of every process when torch.distributed is initialised; a no-op otherwise."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)
        return self


def _mean(values: Tensor, ids: Sequence[int]) -> float:
    """Mean over ``ids`` skipping NaN (absent classes); NaN when nothing is left to average."""
    if len(ids) == 0:
        return math.nan
    return float(torch.nanmean(values[list(ids)]))


RESULT_FILES = ("metrics.json", "per_class.csv")  # what `EvalResult.save` writes


def compute_metrics(
    matrix: Tensor,
    class_names: Sequence[str],
    seen: Sequence[int],
    unseen: Sequence[int],
    absent: str = "mmseg",
) -> dict[str, Any]:
    """pAcc, mAcc, mIoU, mIoU(S), mIoU(U), hIoU and per-class IoU/accuracy from a confusion matrix.

    All values are percentages (0-100), as in mmseg and ZegCLIP tables. ``absent="mmseg"`` is mmseg's rule
    (``intersect_and_union`` then ``total_area_intersect / total_area_union`` and nanmean): a class absent from the
    ground truth but predicted scores IoU 0, one neither present nor predicted is NaN (0/0) and left out of the
    means. ``absent="skip"`` leaves every class absent from the ground truth out (IoU NaN even when predicted). On
    full validation sets every class is present and the two agree. Accuracy is NaN for an absent class under both
    (0/0 in mmseg too). hIoU = 2·S·U/(S+U), 0 when S+U == 0; with no unseen classes mIoU(U) and hIoU are NaN.

    Args:
        matrix: (K, K) counts, rows = ground truth, columns = prediction.
        class_names: K names, in class-id order.
        seen: ids of the seen classes.
        unseen: ids of the unseen classes (disjoint from ``seen``).
        absent: "mmseg" or "skip".

    Returns:
        Scalars under ``SUMMARY_KEYS`` plus ``"IoU"`` and ``"Acc"``: lists of K per-class values (NaN when absent).
    """
    matrix = torch.as_tensor(matrix)
    k = len(class_names)
    if matrix.shape != (k, k):
        raise UsageError(f"confusion matrix shape {tuple(matrix.shape)} does not match {k} class names")
    seen, unseen = [int(i) for i in seen], [int(i) for i in unseen]
    for name, ids in (("seen", seen), ("unseen", unseen)):
        out = [i for i in ids if not 0 <= i < k]
        if out:
            raise UsageError(f"{name} class id {out[0]} is outside [0, {k})")
    both = sorted(set(seen) & set(unseen))
    if both:
        raise UsageError(f"class '{class_names[both[0]]}' (id {both[0]}) is listed as both seen and unseen")

    matrix = matrix.double()
    tp = matrix.diagonal()  # (K,)
    gt = matrix.sum(1)  # (K,)
    union = gt + matrix.sum(0) - tp
    check_field(absent, "eval.absent_classes")
    missing = gt == 0
    no_iou = union == 0 if absent == "mmseg" else missing
    iou = torch.where(no_iou, math.nan, tp / union.clamp_min(1)) * 100
    acc = torch.where(missing, math.nan, tp / gt.clamp_min(1)) * 100
    total = float(gt.sum())

    miou_s, miou_u = _mean(iou, seen), _mean(iou, unseen)
    if math.isnan(miou_s) or math.isnan(miou_u):
        hiou = math.nan
    elif miou_s + miou_u == 0:
        hiou = 0.0
    else:
        hiou = 2 * miou_s * miou_u / (miou_s + miou_u)
    return {
        "pAcc": float(tp.sum()) / total * 100 if total > 0 else math.nan,
        "mAcc": _mean(acc, range(k)),
        "mIoU(S)": miou_s,
        "mIoU(U)": miou_u,
        "hIoU": hiou,
        "mIoU": _mean(iou, range(k)),
        "IoU": iou.tolist(),
        "Acc": acc.tolist(),
    }


@dataclass
class EvalResult:
    """Summary metrics (percentages), one row per class, and how many images were evaluated."""

    metrics: dict[str, float]
    per_class: list[dict[str, Any]]  # {"name", "split": seen | unseen | other, "IoU", "Acc"}
    class_names: tuple[str, ...]
    num_images: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # (K, K) int64 counts (rows = ground truth) for reports; not written by `save`.
    confusion: Tensor | None = field(default=None, repr=False, compare=False)
    # With eval.seen_gamma > 0: the same images scored after ZegCLIP's seen-score calibration, reported beside.
    calibrated: EvalResult | None = field(default=None, compare=False)
    seen_gamma: float = 0.0

    @classmethod
    def from_matrix(
        cls,
        matrix: Tensor,
        class_names: Sequence[str],
        seen: Sequence[int],
        unseen: Sequence[int],
        num_images: int = 0,
        absent: str = "mmseg",
    ) -> EvalResult:
        full = compute_metrics(matrix, class_names, seen, unseen, absent)
        seen_set, unseen_set = set(seen), set(unseen)
        rows = [
            {
                "name": name,
                "split": "seen" if i in seen_set else "unseen" if i in unseen_set else "other",
                "IoU": full["IoU"][i],
                "Acc": full["Acc"][i],
            }
            for i, name in enumerate(class_names)
        ]
        summary = {key: full[key] for key in SUMMARY_KEYS}
        return cls(
            metrics=summary,
            per_class=rows,
            class_names=tuple(class_names),
            num_images=num_images,
            confusion=torch.as_tensor(matrix).cpu(),
        )

    def summary_line(self) -> str:
        line = "  ".join(
            f"{key} {fmt_number(self.metrics[key])}" for key in ("pAcc", "mIoU(S)", "mIoU(U)", "hIoU", "mIoU")
        )
        if self.calibrated is not None:
            line += f"  |  calibrated (seen - {self.seen_gamma:g}): " + self.calibrated.summary_line()
        if "approximate_labels" in self.extra:
            line += (
                f"  (approximate labels, {self.extra['approximate_labels']['label_candidates']} candidates)"
            )
        return line

    def format_table(self) -> str:
        """A fixed-width table: the summary line, then per-class IoU and accuracy (``-`` for absent classes)."""
        width = max([5, *(len(row["name"]) for row in self.per_class)])
        lines = [f"{self.num_images} images  " + self.summary_line(), ""]
        lines.append(f"{'class':<{width}}  {'split':<6}  {'IoU':>6}  {'Acc':>6}")
        lines.append("-" * (width + 24))
        for row in self.per_class:
            lines.append(
                f"{row['name']:<{width}}  {row['split']:<6}  {fmt_number(row['IoU']):>6}  {fmt_number(row['Acc']):>6}"
            )
        return "\n".join(lines)

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write metrics.json (summary + per class, NaN as null) and per_class.csv (NaN as an empty cell)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        payload = {
            "summary": self.metrics,
            "num_images": self.num_images,
            "per_class": self.per_class,
            **self.extra,
        }
        if self.calibrated is not None:
            payload["calibrated"] = {
                "seen_gamma": self.seen_gamma,
                "summary": self.calibrated.metrics,
                "per_class": self.calibrated.per_class,
            }
        json_path, csv_path = (out_dir / name for name in RESULT_FILES)
        text = json.dumps(_nan_to_none(payload), indent=2, allow_nan=False) + "\n"

        def write_csv(tmp: Path) -> None:
            with tmp.open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["class_id", "name", "split", "IoU", "Acc"])
                for i, row in enumerate(self.per_class):
                    writer.writerow(
                        [i, row["name"], row["split"], _csv_num(row["IoU"]), _csv_num(row["Acc"])]
                    )

        atomic_write_all([(json_path, lambda tmp: tmp.write_text(text)), (csv_path, write_csv)])
        return [json_path, csv_path]


def _csv_num(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.4f}"


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    return value


def _split_ids(dataset: Dataset) -> tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...]]:
    missing = [attr for attr in ("class_names", "seen", "unseen") if not hasattr(dataset, attr)]
    if missing:
        raise UsageError(
            f"dataset {type(dataset).__name__} has no attribute '{missing[0]}' needed for evaluation"
        )
    return tuple(dataset.class_names), tuple(dataset.seen), tuple(dataset.unseen)


@torch.inference_mode()
def evaluate(
    logits_fn: LogitsFn,
    dataset: Dataset,
    cfg: EvalConfig,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    progress: bool = True,
) -> EvalResult:
    """Run ``logits_fn`` over ``dataset`` with every class predicted jointly and return the metrics.

    Images go one at a time (they differ in size); logits come from ``cfg.mode`` (slide or whole) and are labelled
    at the mask's original resolution by `clipzss.inference.label_maps.label_map` (exactly the argmax of the bilinearly
    upsampled logits, without that K-channel map). Under torch.distributed each rank takes
    ``indices[rank::world_size]`` (no padding duplicates) and the matrix is all-reduced, so every rank returns the
    same result.
    """
    Config(eval=cfg).validate()  # before any image: an EvalConfig built in Python was never read from a file
    m = check_candidates(cfg.label_candidates, "eval.label_candidates")
    if m:
        logger.warning(
            "eval.label_candidates=%d: approximate labels (the %d best classes of each low-resolution point "
            "compete), not the protocol's exact argmax; do not report these as benchmark numbers",
            m,
            m,
        )
    class_names, seen, unseen = _split_ids(dataset)
    device = torch.device(device)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

    indices = list(range(len(dataset)))
    if cfg.max_images is not None:
        indices = indices[: cfg.max_images]
    loader = DataLoader(
        Subset(dataset, indices[rank::world]),
        batch_size=1,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    # 16-bit label sets (PC-459, ADE-847) mark ignore with 65535: the dataset says which value it uses.
    ignore_index = getattr(dataset, "ignore_index", IGNORE_INDEX)
    confusion = ConfusionMatrix(len(class_names), ignore_index=ignore_index, device=device)
    calibrated = None  # a second matrix (and its all-reduce) only when the calibration is asked for
    if cfg.seen_gamma > 0:
        calibrated = ConfusionMatrix(len(class_names), ignore_index=ignore_index, device=device)
        seen_shift = torch.zeros(len(class_names), device=device)
        seen_shift[list(seen)] = cfg.seen_gamma
    seen_images = torch.zeros((), dtype=torch.int64, device=device)
    calibration = partial(seen_calibrated, shift=seen_shift) if calibrated is not None else None
    transforms = (None,) if calibration is None else (None, calibration)
    for item in tqdm(loader, desc="eval", disable=not progress or rank != 0, dynamic_ncols=True):
        image = item["image"].to(device, non_blocking=True)  # (1, 3, H, W)
        mask = item["mask"].to(device, non_blocking=True).long()  # (1, H0, W0)
        # Labels straight from the low-resolution logits: no K-channel map at the mask's size is ever kept.
        labels, classes = window_labels(logits_fn, image, cfg, tuple(mask.shape[-2:]), transforms)
        if classes != len(class_names):
            raise UsageError(
                f"logits_fn returned {classes} channels for image '{item['name'][0]}' "
                f"but the dataset has {len(class_names)} classes"
            )
        confusion.update(labels[0], mask)
        if calibrated is not None:
            calibrated.update(labels[1], mask)
        seen_images += 1

    confusion.all_reduce()
    if calibrated is not None:
        calibrated.all_reduce()
    if distributed:
        dist.all_reduce(seen_images, op=dist.ReduceOp.SUM)
    num = int(seen_images)
    result = EvalResult.from_matrix(
        confusion.matrix.cpu(), class_names, seen, unseen, num, cfg.absent_classes
    )
    if calibrated is not None:
        result.calibrated = EvalResult.from_matrix(
            calibrated.matrix.cpu(), class_names, seen, unseen, num, cfg.absent_classes
        )
        result.seen_gamma = cfg.seen_gamma
    # Saved in metrics.json beside the numbers, so approximate results are never mistaken for exact ones.
    if m:
        result.extra["approximate_labels"] = {"label_candidates": m}
    if rank == 0:
        logger.info("eval: %d images  %s", result.num_images, result.summary_line())
    return result
