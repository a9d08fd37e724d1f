"""Look at the teacher's pseudo-label clusters on real images, and measure them.

The PLM pseudo labels of training (multi-scale K-Means on the teacher's dense tokens, mask fusion, regions below
``min_region`` dropped) are computed here with the very functions of :mod:`clipzss.method.pseudo_labels`, per K-Means scale,
for all scales without fusion, and after fusion. Each image gets a panel of coloured cluster overlays. When ground-
truth masks are present, each variant is scored on the *unlabelled* pixels (those of the ``--unseen`` classes, or
every labelled pixel when no split is given) by

- **purity**: the share of pixels whose region's majority class is their own class (1 = no region mixes classes;
  over-segmentation is not penalised);
- **NMI**: normalised mutual information between regions and classes per image (arithmetic mean of the entropies,
  scikit-learn's default), averaged over images weighted by pixels; splitting one class into several regions lowers
  it, so purity and NMI together show both failure modes;
- **coverage**: the share of unlabelled pixels that receive a pseudo label (small regions are dropped);
- **regions / image** against **classes / image**.

Works with any :class:`~clipzss.models.teacher.Teacher` from Python (:func:`inspect_pseudo_labels`); the command builds the
CLIP teacher from the config and ``--teacher-*`` options, or takes a world's teacher (``--world-teacher camvid``).
With a CLIP teacher, several dense paths (``teacher.dense``: ClearCLIP, SCLIP, NACLIP, ...) are scored on the same
images side by side (``--dense``): how a user with real weights checks the literature-based default.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from clipzss.config import MethodConfig
from clipzss.data.readers import read_classes_txt
from clipzss.data.splits import IGNORE_INDEX
from clipzss.errors import UsageError
from clipzss.files import atomic_write
from clipzss.images import image_paths
from clipzss.inference.inputs import preprocess
from clipzss.messages import fmt_number
from clipzss.method.pseudo_labels import (
    center_tokens,
    cluster_regions,
    fuse_labels,
    training_windows,
    window_sizes,
)
from clipzss.models.recipes import check_dense
from clipzss.models.teacher import CLIPTeacher, Teacher
from clipzss.visualize import palette

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Scores


def contingency(truth: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """(classes, regions) pixel counts of two 1-D label arrays of the same length (values: any integers)."""
    truth, regions = np.asarray(truth).ravel(), np.asarray(regions).ravel()
    if truth.shape != regions.shape:
        raise ValueError(f"truth has {truth.size} pixels but regions has {regions.size}")
    _, t = np.unique(truth, return_inverse=True)
    _, r = np.unique(regions, return_inverse=True)
    table = np.zeros((int(t.max(initial=-1)) + 1, int(r.max(initial=-1)) + 1), dtype=np.int64)
    np.add.at(table, (t, r), 1)
    return table


def purity(table: np.ndarray) -> float:
    """Share of pixels in their region's majority class; NaN for an empty table."""
    total = table.sum()
    return float(table.max(axis=0).sum() / total) if total else math.nan


def nmi(table: np.ndarray) -> float:
    """Normalised mutual information (arithmetic normalisation), with scikit-learn's conventions.

    One class and one region is a perfect match (1.0); otherwise zero mutual information gives 0.0 (e.g. one class
    split into several regions). NaN for an empty table.
    """
    total = float(table.sum())
    if total == 0:
        return math.nan
    rows, cols = table.sum(axis=1), table.sum(axis=0)
    if len(rows) == 1 and len(cols) == 1:
        return 1.0
    p = table / total
    pr, pc = rows / total, cols / total
    nz = p > 0
    mi = float((p[nz] * (np.log(p[nz]) - np.log(np.outer(pr, pc)[nz]))).sum())
    if mi <= 1e-15:
        return 0.0
    h_r = -float((pr * np.log(pr)).sum())
    h_c = -float((pc * np.log(pc)).sum())
    return mi / ((h_r + h_c) / 2)


@dataclass
class QualityAccumulator:
    """Streaming sums for one clustering variant over many images (pixel-weighted means)."""

    pure: float = 0.0  # pixels in their region's majority class
    labelled: int = 0  # evaluated pixels that received a pseudo label
    evaluated: int = 0  # unlabelled pixels with a ground-truth class
    nmi_sum: float = 0.0  # per-image NMI × its labelled pixels
    regions: int = 0
    classes: int = 0
    images: int = 0

    def add(self, truth: np.ndarray, regions: np.ndarray) -> None:
        """One image: ``truth`` class ids with IGNORE_INDEX where not evaluated, ``regions`` ids with -1 where no
        pseudo label; same shape."""
        evaluated = truth != IGNORE_INDEX
        labelled = evaluated & (regions >= 0)
        self.evaluated += int(evaluated.sum())
        if not evaluated.any():
            return
        self.images += 1
        self.classes += len(set(truth[evaluated].tolist()))
        if not labelled.any():
            return
        table = contingency(truth[labelled], regions[labelled])
        count = int(labelled.sum())
        self.labelled += count
        self.pure += purity(table) * count
        self.nmi_sum += nmi(table) * count
        self.regions += table.shape[1]

    def summary(self) -> dict[str, float]:
        def ratio(a: float, b: float) -> float:
            return a / b if b else math.nan

        return {
            "purity": ratio(self.pure, self.labelled),
            "NMI": ratio(self.nmi_sum, self.labelled),
            "coverage": ratio(self.labelled, self.evaluated),
            "regions/image": ratio(self.regions, self.images),
            "classes/image": ratio(self.classes, self.images),
            "images": float(self.images),
        }


# ----------------------------------------------------------------------------------------------------------------
# Clustering variants


def clustering_variants(
    method: MethodConfig, grid: tuple[int, int]
) -> dict[str, tuple[list[int], float | None]]:
    """Name → (window sizes, fusion threshold or None) for each K-Means scale, all scales unfused, all scales fused
    and, last, the training pseudo labels (the scales ``method.multi_scale`` selects, fused with λ =
    ``method.fusion_threshold``) on an h × w token grid."""
    sizes = window_sizes(grid[0], grid[1], method.window_divisors)
    variants: dict[str, tuple[list[int], float | None]] = {f"window {s}": ([s], None) for s in sizes}
    lam = method.fusion_threshold
    if len(sizes) > 1:
        variants["all scales, no fusion"] = (sizes, None)
        variants[f"all scales + fusion λ={lam:g}"] = (sizes, lam)
    train = training_windows(grid[0], grid[1], method)
    name = "all scales" if len(train) > 1 else f"window {train[0]}"
    variants.pop(f"{name} + fusion λ={lam:g}", None)
    variants[f"{name} + fusion λ={lam:g} (training)"] = (train, lam)
    return variants


def pseudo_regions(
    dense: torch.Tensor,
    unlabelled: torch.Tensor,
    windows: Sequence[int],
    fusion_threshold: float | None,
    method: MethodConfig,
) -> torch.Tensor:
    """Pseudo-region id of every unlabelled pixel as training makes it (K-Means, fusion, fuse_labels with
    ``min_region``), -1 elsewhere and where the region was dropped. Regions are scored before training's seen-rim
    filter (``max_seen_share``), which needs per-class seen labels that this view does not have.

    Args:
        dense: (B, C, h, w) teacher tokens.
        unlabelled: (B, H, W) bool, the pixels training would fill (ground truth 255).
        windows, fusion_threshold: the variant (see ``clustering_variants``).
        method: kmeans_iters, min_region and center_tokens.

    Returns:
        (B, H, W) int64.
    """
    if method.center_tokens:  # as training does (there over each batch, here over the images given)
        dense = center_tokens(dense)
    token_labels, _ = cluster_regions(dense, list(windows), method.kmeans_iters, fusion_threshold)
    annotated = torch.where(unlabelled, IGNORE_INDEX, 0).long()  # one "seen" id for every annotated pixel
    fused, _ = fuse_labels(annotated, token_labels, 1, method.min_region)
    return torch.where(unlabelled & (fused != IGNORE_INDEX), fused - 1, -1)


# ----------------------------------------------------------------------------------------------------------------
# Images


@dataclass
class InspectReport:
    """Quality per clustering variant (NaN without ground truth) and the overlay files written."""

    quality: dict[str, dict[str, float]]
    overlays: list[Path] = field(default_factory=list)
    grid: tuple[int, int] = (0, 0)
    has_truth: bool = False
    # Dense path → its quality per variant, when several paths were compared (``quality`` is the first one's).
    by_dense: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)

    def format_table(self) -> str:
        if len(self.by_dense) > 1:
            return self.format_comparison()
        head = f"{'variant':<32} {'purity':>7} {'NMI':>7} {'coverage':>9} {'regions/img':>12} {'classes/img':>12}"
        lines = [head, "-" * len(head)]
        for name, q in self.quality.items():
            lines.append(
                f"{name:<32} {fmt_number(q['purity'], 3):>7} {fmt_number(q['NMI'], 3):>7} {fmt_number(q['coverage'], 3):>9} "
                f"{fmt_number(q['regions/image'], 1):>12} {fmt_number(q['classes/image'], 1):>12}"
            )
        return "\n".join(lines)

    def format_comparison(self) -> str:
        """One block per measure, a row per variant, the dense paths side by side as columns."""
        paths = list(self.by_dense)
        width = max(len(name) for name in [*self.quality, "regions/image"])
        blocks = []
        for measure, digits in MEASURES:
            head = f"{measure:<{width}}" + "".join(f" {p:>10}" for p in paths)
            rows = [head, "-" * len(head)]
            for variant in self.quality:
                values = [self.by_dense[p][variant][measure] for p in paths]
                rows.append(f"{variant:<{width}}" + "".join(f" {fmt_number(v, digits):>10}" for v in values))
            blocks.append("\n".join(rows))
        return "\n\n".join(blocks)

    def to_markdown(self) -> str:
        if len(self.by_dense) > 1:
            paths = list(self.by_dense)
            lines = []
            for measure, digits in MEASURES:
                lines += [f"| {measure} | " + " | ".join(paths) + " |", "|---" * (1 + len(paths)) + "|"]
                for variant in self.quality:
                    values = [fmt_number(self.by_dense[p][variant][measure], digits) for p in paths]
                    lines.append(f"| {variant} | " + " | ".join(values) + " |")
                lines.append("")
            return "\n".join(lines).rstrip()
        lines = [
            "| variant | purity | NMI | coverage | regions / image | classes / image |",
            "|---|---|---|---|---|---|",
        ]
        for name, q in self.quality.items():
            lines.append(
                f"| {name} | {fmt_number(q['purity'], 3)} | {fmt_number(q['NMI'], 3)} | {fmt_number(q['coverage'], 3)} "
                f"| {fmt_number(q['regions/image'], 1)} | {fmt_number(q['classes/image'], 1)} |"
            )
        return "\n".join(lines)

    def save(
        self, out: str | Path, header: str, images: Sequence[Path], settings: str, scope: str
    ) -> list[Path]:
        """Write report.md (``header``, the table, the overlay panels) and report.json into ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        markdown = out / "report.md"
        text = (
            f"# Pseudo-label clusters\n\n{header}.\n\n{self.to_markdown()}\n\n"
            + "\n".join(f"- `{p.name}`" for p in self.overlays)
            + "\n"
        )
        atomic_write(markdown, lambda tmp: tmp.write_text(text))
        payload = {
            "images": [str(f) for f in images],
            "settings": settings,
            "scope": scope,
            "quality": {
                k: {m: (v if math.isfinite(v) else None) for m, v in q.items()}
                for k, q in self.quality.items()
            },
        }
        if len(self.by_dense) > 1:
            payload["dense"] = {
                path: {
                    k: {m: (v if math.isfinite(v) else None) for m, v in q.items()}
                    for k, q in quality.items()
                }
                for path, quality in self.by_dense.items()
            }
        atomic_write(out / "report.json", lambda tmp: tmp.write_text(json.dumps(payload, indent=2) + "\n"))
        return [markdown, out / "report.json"]


MEASURES: tuple[tuple[str, int], ...] = (
    ("purity", 3),
    ("NMI", 3),
    ("coverage", 3),
    ("regions/image", 1),
    ("classes/image", 1),
)


def inspect_pseudo_labels(
    images: Sequence[Image.Image],
    teacher: Teacher,
    method: MethodConfig,
    masks: Sequence[np.ndarray | None] | None = None,
    unseen: Sequence[int] | None = None,
    out: str | Path | None = None,
    names: Sequence[str] | None = None,
    short_side: int | None = 512,
    dense: Sequence[str] | None = None,
) -> InspectReport:
    """Cluster each image's teacher tokens as PLM does and score the variants against the ground truth.

    Args:
        images: RGB images.
        teacher: any Teacher; only ``encode_image`` is called.
        method: window_divisors, fusion_threshold, kmeans_iters, min_region.
        masks: (H, W) class-id arrays (255 = void) at each image's size, or None per image / overall.
        unseen: class ids whose pixels are the unlabelled ones; None = every labelled pixel (all unlabelled).
        out: folder for ``<name>_clusters.png`` panels; None writes nothing.
        names: file stems for the panels (default image_000, ...).
        short_side: images are resized to this short side (at most) before the teacher, as at evaluation.
        dense: dense paths of a CLIP teacher (``teacher.dense`` values) to compare on the same images; None = the
            teacher's own. Each path gets its own scores (``by_dense``) and, with several, its own panels.
    """
    paths: list[str | None] = [None]
    if dense is not None:
        paths = list(dict.fromkeys(dense))
        if not paths:
            raise UsageError("--dense: give at least one dense path")
        for path in paths:
            check_dense(path)
        if not isinstance(teacher, CLIPTeacher):
            raise UsageError(f"--dense needs the CLIP teacher; {type(teacher).__name__} has one dense path")
    masks = list(masks) if masks is not None else [None] * len(images)
    if len(masks) != len(images):
        raise UsageError(f"{len(images)} images but {len(masks)} masks")
    names = list(names) if names is not None else [f"image_{i:03d}" for i in range(len(images))]
    folder = Path(out) if out is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    quality: dict[str | None, dict[str, QualityAccumulator]] = {path: {} for path in paths}
    overlays: list[Path] = []
    grid = (0, 0)
    for image, mask, name in zip(images, masks, names, strict=True):
        size = (image.height, image.width)
        if mask is not None and tuple(mask.shape) != size:
            raise UsageError(
                f"mask of {name} is {mask.shape[0]}x{mask.shape[1]} but the image is {size[0]}x{size[1]} (H x W)"
            )
        short = min(short_side, min(size)) if short_side else None
        x = torch.from_numpy(preprocess(image, short))[None]  # (1, 3, H', W') normalised the student's way
        truth = np.full(size, IGNORE_INDEX, dtype=np.int64) if mask is None else mask.astype(np.int64)
        if unseen is None:
            unlabelled = torch.ones(1, *size, dtype=torch.bool)
        else:
            unlabelled = torch.from_numpy(np.isin(truth, list(unseen)))[None]
        evaluated = np.where(unlabelled[0].numpy(), truth, IGNORE_INDEX)
        for path in paths:
            chosen = {} if path is None else {"dense": path}
            _, tokens = teacher.encode_image(x.to(_device_of(teacher)), **chosen)  # (1, C, h, w)
            tokens = tokens.float().cpu()
            grid = tuple(tokens.shape[-2:])
            maps: dict[str, np.ndarray] = {}
            for variant, (windows, threshold) in clustering_variants(method, grid).items():
                regions = pseudo_regions(tokens, unlabelled, windows, threshold, method)[0].numpy()
                quality[path].setdefault(variant, QualityAccumulator()).add(evaluated, regions)
                maps[variant] = regions
            if folder is not None:
                panel_path = folder / (
                    f"{name}_clusters.png" if len(paths) == 1 else f"{name}_{path}_clusters.png"
                )
                panel = _panel(image, maps, None if mask is None else evaluated)
                atomic_write(panel_path, lambda tmp, panel=panel: panel.save(tmp, "PNG"))
                overlays.append(panel_path)
    summaries = {path: {k: acc.summary() for k, acc in q.items()} for path, q in quality.items()}
    has_truth = any(m is not None for m in masks)
    by_dense = {str(path): q for path, q in summaries.items()} if dense is not None else {}
    return InspectReport(summaries[paths[0]], overlays, grid, has_truth, by_dense)


def _device_of(teacher: Any) -> torch.device:
    device = getattr(teacher, "device", None)
    return device if isinstance(device, torch.device) else torch.device("cpu")


def _panel(image: Image.Image, maps: dict[str, np.ndarray], truth: np.ndarray | None) -> Image.Image:
    """Photo, ground truth of the evaluated pixels (when known) and one overlay per variant, side by side."""
    height = min(image.height, 320)
    width = max(1, round(image.width * height / image.height))
    photo = image.convert("RGB").resize((width, height), Image.BILINEAR)
    tiles = [("image", photo)]
    if truth is not None:
        tiles.append(("ground truth (evaluated)", _overlay(photo, truth)))
    tiles += [(name, _overlay(photo, regions)) for name, regions in maps.items()]
    font_size = 14
    font = ImageFont.load_default(size=font_size)
    bar = font_size + 8
    canvas = Image.new("RGB", (width * len(tiles), height + bar), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (title, tile) in enumerate(tiles):
        canvas.paste(tile, (i * width, bar))
        # The default bitmap font has no Greek letters.
        draw.text((i * width + 4, 3), title.replace("λ", "lambda "), fill="black", font=font)
    return canvas


def _overlay(photo: Image.Image, ids: np.ndarray) -> Image.Image:
    """Regions (ids >= 0; -1 / 255 = none, shown as the photo) blended over the photo."""
    valid = (ids >= 0) & (ids != IGNORE_INDEX)
    colours = palette(int(ids[valid].max()) + 1 if valid.any() else 1)
    rgb = np.zeros((*ids.shape, 3), dtype=np.uint8)
    rgb[valid] = colours[ids[valid]]
    coloured = Image.fromarray(rgb).resize(photo.size, Image.NEAREST)
    alpha = Image.fromarray((valid * 140).astype(np.uint8)).resize(photo.size, Image.NEAREST)
    return Image.composite(coloured, photo, alpha)


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def image_files(paths: Sequence[Path], limit: int) -> list[Path]:
    if limit < 1:
        raise UsageError(f"--max-images must be at least 1, got {limit}")
    return image_paths(paths)[:limit]


def find_masks(files: Sequence[Path], masks_dir: str | None) -> list[Path | None]:
    """Each image's mask: --masks/<stem>.png, else the folder-dataset sibling ../masks/<stem>.png, else None."""
    found: list[Path | None] = []
    for file in files:
        folder = Path(masks_dir) if masks_dir else file.parent.parent / "masks"
        candidate = folder / f"{file.stem}.png"
        if masks_dir and not candidate.is_file():
            raise FileNotFoundError(f"no mask for image {file}: expected {candidate}")
        found.append(candidate if candidate.is_file() else None)
    return found


def class_names_near(files: Sequence[Path], classes_file: str | None) -> tuple[str, ...] | None:
    if classes_file:
        return read_classes_txt(Path(classes_file))
    folder = files[0].parent
    for candidate in (folder.parent / "classes.txt", folder.parent.parent / "classes.txt"):
        if candidate.is_file():
            return read_classes_txt(candidate)
    return None
