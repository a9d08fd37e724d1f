"""Evaluation reports: per-class IoU bars, a confusion heat map with the top confusions, predictions next to the truth.

`write_report` renders them as PNGs with a `report.md` linking them to the metrics table (`clipzss eval --report`);
`log_to_tensorboard` draws the same figures into TensorBoard at each evaluation during training. Figures are built
on matplotlib's object API (no pyplot, no global backend switch), so they render headless and in worker threads.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from clipzss.config import IMAGENET_MEAN, IMAGENET_STD, EvalConfig
from clipzss.errors import UsageError
from clipzss.evaluate import RESULT_FILES, EvalResult
from clipzss.files import atomic_write
from clipzss.inference.windows import infer_labels
from clipzss.messages import fmt_number
from clipzss.visualize import colorize, palette

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
SPLIT_COLOURS = {"seen": "#1f77b4", "unseen": "#e8590c", "other": "#8c8c8c"}
FIGURE_NAMES = {"iou": "per_class_iou.png", "confusion": "confusion_matrix.png", "examples": "examples.png"}
REPORT_NAME = "report.md"
# Every file `write_report` may write, for the overwrite check a command makes before it evaluates.
REPORT_FILES = (*RESULT_FILES, *FIGURE_NAMES.values(), REPORT_NAME)


@dataclass(frozen=True)
class Confusion:
    """Pixels of class ``truth`` predicted as ``predicted``; ``share`` is their % of ``truth``'s pixels."""

    truth: str
    predicted: str
    pixels: int
    share: float


@dataclass
class Example:
    """One qualitative example: the photo at mask resolution, the ground truth and the prediction."""

    name: str
    image: np.ndarray  # (H, W, 3) uint8
    truth: np.ndarray  # (H, W) class ids, 255 = ignore
    prediction: np.ndarray  # (H, W) class ids


# --- numbers ----------------------------------------------------------------------------------------------------


def _confusion_matrix(result: EvalResult) -> np.ndarray:
    if result.confusion is None:
        raise UsageError(
            "this EvalResult carries no confusion matrix; build it with EvalResult.from_matrix (as evaluate does)"
        )
    return np.asarray(result.confusion, dtype=np.int64)


def top_confusions(matrix: np.ndarray, class_names: Sequence[str], k: int = 10) -> list[Confusion]:
    """The ``k`` largest off-diagonal cells of a (K, K) confusion matrix (rows = truth), by pixel count."""
    matrix = np.asarray(matrix, dtype=np.int64)
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(off, axis=None, kind="stable")[::-1][:k]
    rows = matrix.sum(1)
    out = []
    for flat in order:
        t, p = divmod(int(flat), matrix.shape[1])
        if off[t, p] == 0:
            break
        out.append(Confusion(class_names[t], class_names[p], int(off[t, p]), 100.0 * off[t, p] / rows[t]))
    return out


def _splits(result: EvalResult) -> list[str]:
    return [row["split"] for row in result.per_class]


# --- figures ----------------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("reports and TensorBoard figures need matplotlib: pip install matplotlib") from None
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def iou_figure(result: EvalResult, title: str | None = None) -> Figure:
    """Horizontal bars of per-class IoU, coloured seen / unseen, with the two split means as dashed lines."""
    names = list(result.class_names)
    ious = np.array([row["IoU"] for row in result.per_class], dtype=float)
    splits = _splits(result)
    fig = _new_figure(8.0, 1.4 + 0.26 * len(names))
    ax = fig.add_subplot()
    y = np.arange(len(names))
    ax.barh(y, np.nan_to_num(ious), color=[SPLIT_COLOURS[s] for s in splits], height=0.7)
    accs = [row["Acc"] for row in result.per_class]  # NaN exactly where the class has no ground truth
    for i, value in enumerate(ious):
        if math.isnan(value):
            label, colour = "absent", "#8c8c8c"
        elif accs[i] is None or math.isnan(accs[i]):  # mmseg's rule: absent but predicted scores 0
            label, colour = "0.0 (absent, predicted)", "#8c8c8c"
        else:
            label, colour = f"{value:.1f}", "black"
        ax.text((0 if math.isnan(value) else value) + 1, i, label, va="center", fontsize=8, color=colour)
    m = result.metrics
    for split, key in (("seen", "mIoU(S)"), ("unseen", "mIoU(U)")):
        if split in splits and not math.isnan(m[key]):
            ax.axvline(m[key], color=SPLIT_COLOURS[split], linestyle="--", linewidth=1.2)
    handles = [
        _patch(SPLIT_COLOURS[split], f"{split} classes" + (f" (mean {fmt_number(m[key], 1)})" if key else ""))
        for split, key in (("seen", "mIoU(S)"), ("unseen", "mIoU(U)"), ("other", ""))
        if split in splits
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=9, frameon=False)
    ax.set_yticks(y, names, fontsize=9)
    for tick, split in zip(ax.get_yticklabels(), splits, strict=True):
        tick.set_color(SPLIT_COLOURS[split] if split == "unseen" else "black")
    ax.invert_yaxis()
    ax.set_xlim(0, 108)
    ax.set_xlabel("IoU (%)")
    ax.set_ylabel("class")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(
        title
        or f"Per-class IoU: mIoU(S) {fmt_number(m['mIoU(S)'], 1)}, mIoU(U) {fmt_number(m['mIoU(U)'], 1)}, hIoU {fmt_number(m['hIoU'], 1)} "
        f"({result.num_images} images)",
        fontsize=10,
    )
    return fig


def _patch(colour: str, label: str) -> Any:
    from matplotlib.patches import Patch

    return Patch(facecolor=colour, label=label)


def _shown_classes(
    matrix: np.ndarray, confusions: list[Confusion], names: Sequence[str], limit: int
) -> list[int]:
    """Every class when they fit; otherwise those in the top confusions, then the most frequent, in id order."""
    if len(names) <= limit:
        return list(range(len(names)))
    index = {name: i for i, name in enumerate(names)}
    chosen: list[int] = []
    for c in confusions:
        for i in (index[c.truth], index[c.predicted]):
            if i not in chosen and len(chosen) < limit:
                chosen.append(i)
    for i in np.argsort(-matrix.sum(1), kind="stable"):
        if len(chosen) >= limit:
            break
        if int(i) not in chosen:
            chosen.append(int(i))
    return sorted(chosen)


def confusion_figure(result: EvalResult, max_classes: int = 30, top: int = 8) -> Figure:
    """Row-normalised confusion heat map (% of each true class's pixels) with the top confusions listed beside it.

    With more than ``max_classes`` classes only those in the top confusions and then the most frequent are drawn,
    so the class names stay legible; the title says so.
    """
    matrix = _confusion_matrix(result)
    names = list(result.class_names)
    splits = _splits(result)
    confusions = top_confusions(matrix, names, top)
    shown = _shown_classes(matrix, confusions, names, max_classes)
    rows = matrix.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(rows > 0, 100.0 * matrix / np.maximum(rows, 1), np.nan)  # (K, K)
    sub = share[np.ix_(shown, shown)]
    n = len(shown)
    lines = ["Top confusions by pixels", "(true → predicted: % of the true class)", ""]
    lines += [f"{k}. {c.truth} → {c.predicted}: {c.share:.1f}%" for k, c in enumerate(confusions, 1)] or [
        "none"
    ]
    if "unseen" in splits:
        lines += ["", "orange names: unseen classes"]
    side = max(4.5, 0.34 * n + 2.2)
    text_width = 0.5 + 0.068 * max(len(line) for line in lines)  # inches at 9 pt
    fig = _new_figure(side + 0.8 + text_width, side)
    grid = fig.add_gridspec(1, 2, width_ratios=[side + 0.8, text_width])
    ax = fig.add_subplot(grid[0, 0])
    from matplotlib import colormaps

    cmap = colormaps["Blues"].with_extremes(bad="#eeeeee")
    image = ax.imshow(np.ma.masked_invalid(sub), cmap=cmap, vmin=0, vmax=100, interpolation="nearest")
    labels = [names[i] for i in shown]
    ax.set_xticks(range(n), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
        for tick, i in zip(ticks, shown, strict=True):
            tick.set_color(SPLIT_COLOURS["unseen"] if splits[i] == "unseen" else "black")
    if n <= 15:
        for r in range(n):
            for c in range(n):
                if not math.isnan(sub[r, c]) and sub[r, c] >= 0.5:
                    colour = "white" if sub[r, c] > 55 else "black"
                    ax.text(c, r, f"{sub[r, c]:.0f}", ha="center", va="center", fontsize=7, color=colour)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("ground-truth class")
    subset = "" if n == len(names) else f" ({n} of {len(names)} classes)"
    ax.set_title(f"Confusion matrix, % of each true class's pixels{subset}", fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.6, label="% of ground-truth pixels")
    text_ax = fig.add_subplot(grid[0, 1])
    text_ax.axis("off")
    text_ax.text(0, 1, "\n".join(lines), va="top", ha="left", fontsize=9, linespacing=1.5)
    return fig


def collect_examples(
    dataset: Dataset,
    logits_fn: LogitsFn,
    eval_cfg: EvalConfig | None = None,
    num_examples: int = 4,
    indices: Sequence[int] | None = None,
) -> list[Example]:
    """Predict a few images the way `evaluate` does (mode, joint argmax, mask resolution) for the qualitative grid.

    Without ``indices`` the images are spread evenly over the evaluated part of the dataset.
    """
    from PIL import Image

    cfg = eval_cfg or EvalConfig()
    if indices is None:
        count = min(len(dataset), cfg.max_images or len(dataset))
        indices = sorted(
            set(np.linspace(0, count - 1, min(num_examples, count)).round().astype(int).tolist())
        )
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    examples = []
    for index in indices:
        item = dataset[index]
        image = item["image"][None].float()  # (1, 3, h, w) normalised
        mask = item["mask"]  # (H, W)
        size = tuple(mask.shape[-2:])
        with torch.inference_mode():
            prediction = infer_labels(logits_fn, image, cfg, size)[0].cpu().numpy()
        photo = ((item["image"].float() * std + mean).clamp(0, 1) * 255).round().byte()  # (3, h, w)
        pil = Image.fromarray(photo.permute(1, 2, 0).numpy()).resize((size[1], size[0]), Image.BILINEAR)
        examples.append(Example(str(item.get("name", index)), np.asarray(pil), mask.numpy(), prediction))
    return examples


def examples_figure(examples: Sequence[Example], class_names: Sequence[str], splits: Sequence[str]) -> Figure:
    """Rows of image | ground truth | prediction with one legend of the classes that appear."""
    if not examples:
        raise UsageError("no examples to draw")
    k = len(class_names)
    aspect = examples[0].image.shape[0] / examples[0].image.shape[1]
    fig = _new_figure(10.5, 0.9 + len(examples) * 3.4 * aspect + 0.35 * math.ceil(k / 4))
    axes = fig.subplots(len(examples), 3, squeeze=False)
    present: set[int] = set()
    for row, ex in zip(axes, examples, strict=True):
        labelled = ex.truth != 255
        acc = 100.0 * float((ex.prediction == ex.truth)[labelled].mean()) if labelled.any() else math.nan
        panels = (
            (ex.image, ex.name),
            (np.asarray(colorize(ex.truth, k)), "ground truth (black: ignored)"),
            (np.asarray(colorize(ex.prediction, k)), f"prediction (pixel acc. {fmt_number(acc, 1)}%)"),
        )
        for ax, (picture, title) in zip(row, panels, strict=True):
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        present |= {int(i) for i in np.unique(ex.truth) if i < k} | {int(i) for i in np.unique(ex.prediction)}
    colours = palette(k) / 255.0
    handles = [
        _patch(colours[i], class_names[i] + (" (unseen)" if splits[i] == "unseen" else ""))
        for i in sorted(present)
    ]
    fig.legend(
        handles=handles, loc="outside lower center", ncol=min(4, len(handles)), fontsize=9, frameon=False
    )
    fig.suptitle("Predictions next to the ground truth", fontsize=11)
    return fig


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a figure to an (H, W, 3) uint8 array (for TensorBoard), exactly as it is saved."""
    from PIL import Image

    buffer = io.BytesIO()
    save_figure(fig, buffer)
    buffer.seek(0)
    with Image.open(buffer) as image:
        return np.asarray(image.convert("RGB"))


def save_figure(fig: Figure, target: str | Path | io.BytesIO) -> None:
    """PNG at 100 dpi, cropped to what was drawn (long rotated class names never fall off the edge)."""
    fig.savefig(target, format="png", dpi=100, bbox_inches="tight", pad_inches=0.15)


# --- outputs ----------------------------------------------------------------------------------------------------


def _markdown(
    result: EvalResult,
    confusions: list[Confusion],
    figures: dict[str, str],
    title: str,
    description: str,
) -> str:
    m = result.metrics
    keys = ("pAcc", "mAcc", "mIoU(S)", "mIoU(U)", "hIoU", "mIoU")
    pixels = _confusion_matrix(result).sum(1)
    lines = [f"# {title}", ""]
    if description:
        lines += [description, ""]
    lines += [
        f"{result.num_images} images; every class, seen and unseen, competes in one argmax (generalised "
        "zero-shot protocol). Values in %.",
        "",
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
        "| " + " | ".join(fmt_number(m[key], 1) for key in keys) + " |",
        "",
        "## Per-class IoU",
        "",
        f"![per-class IoU]({figures['iou']})",
        "",
        "## Confusions",
        "",
        f"![confusion matrix]({figures['confusion']})",
        "",
        "| # | ground truth | predicted as | % of its pixels | pixels |",
        "|---|---|---|---|---|",
        *(
            f"| {k} | {c.truth} | {c.predicted} | {c.share:.1f} | {c.pixels:,} |"
            for k, c in enumerate(confusions, 1)
        ),
        "",
    ]
    if "examples" in figures:
        lines += ["## Examples", "", f"![predictions next to the ground truth]({figures['examples']})", ""]
    lines += ["## Per class", "", "| class | split | IoU | Acc | pixels |", "|---|---|---|---|---|"]
    lines += [
        f"| {row['name']} | {row['split']} | {fmt_number(row['IoU'], 1)} | {fmt_number(row['Acc'], 1)} | {int(pixels[i]):,} |"
        for i, row in enumerate(result.per_class)
    ]
    lines += ["", "Raw numbers: `metrics.json`, `per_class.csv`.", ""]
    return "\n".join(lines)


def write_report(
    result: EvalResult,
    dataset: Dataset | None,
    logits_fn: LogitsFn | None,
    out_dir: str | Path,
    eval_cfg: EvalConfig | None = None,
    num_examples: int = 4,
    title: str = "clipzss evaluation report",
    description: str = "",
) -> Path:
    """Write per_class_iou.png, confusion_matrix.png, examples.png, metrics.json/per_class.csv and report.md.

    ``dataset`` and ``logits_fn`` (the ones evaluated) give the qualitative grid; pass None for either to skip it.
    Returns the path of report.md.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result.save(out)
    figures = {"iou": iou_figure(result), "confusion": confusion_figure(result)}
    if dataset is not None and logits_fn is not None and num_examples > 0:
        examples = collect_examples(dataset, logits_fn, eval_cfg, num_examples)
        figures["examples"] = examples_figure(examples, result.class_names, _splits(result))
    for key, fig in figures.items():
        atomic_write(out / FIGURE_NAMES[key], partial(save_figure, fig))
    confusions = top_confusions(_confusion_matrix(result), result.class_names, 10)
    report = out / REPORT_NAME
    text = _markdown(result, confusions, {k: FIGURE_NAMES[k] for k in figures}, title, description)
    atomic_write(report, lambda tmp: tmp.write_text(text))
    logger.info("report written to %s", report)
    return report


def log_to_tensorboard(
    writer: Any,
    result: EvalResult,
    step: int,
    dataset: Dataset | None = None,
    logits_fn: LogitsFn | None = None,
    eval_cfg: EvalConfig | None = None,
    num_examples: int = 2,
    prefix: str = "val",
) -> None:
    """Draw the report's figures (and per-class IoU curves) into a TensorBoard ``SummaryWriter`` at ``step``.

    Call it where the model is still in eval mode when ``logits_fn`` is given: it predicts ``num_examples`` images.
    A missing matplotlib costs the figures (with a warning), never the training run.
    """
    for row in result.per_class:
        if not math.isnan(row["IoU"]):
            writer.add_scalar(f"{prefix}_class_iou/{row['name']}", row["IoU"], step)
    try:
        figures = {"per_class_iou": iou_figure(result), "confusion_matrix": confusion_figure(result)}
        if dataset is not None and logits_fn is not None and num_examples > 0:
            examples = collect_examples(dataset, logits_fn, eval_cfg, num_examples)
            figures["examples"] = examples_figure(examples, result.class_names, _splits(result))
    except ImportError as err:
        logger.warning("no TensorBoard figures: %s", err)
        return
    for name, fig in figures.items():
        writer.add_image(f"{prefix}/{name}", figure_to_array(fig), step, dataformats="HWC")
