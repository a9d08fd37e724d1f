"""The data doctor behind ``clipzss check-data`` (:func:`check_data`): finds what would otherwise surface hours
into training, or never.

It lists each split with clipzss' own readers (so what passes here is what training reads), then checks every
image/label pair on worker threads, streaming: image headers only (size, EXIF orientation; ``--decode-images``
decodes them fully), label files decoded once into a value histogram. It reports missing or orphan files, counts
against the official sizes, label values outside the class list (with the usual causes: 1-based ids, colour
masks, a forgotten reduce-zero-label), colour-coded masks where ids are expected, image/label size mismatches, and
gives the per-class pixel histogram of the seen and unseen classes; :attr:`DataReport.ok` is False (the command
exits 1) when anything is wrong.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from clipzss.data.masks import Palette, colour_keys, format_colour_key, single_channel, voc_colormap
from clipzss.data.readers import (
    EXPECTED_IMAGES,
    VOC_PLAIN_TRAIN,
    Listing,
    Sample,
    normalize_dataset_name,
    read_listing,
)
from clipzss.data.splits import IGNORE_INDEX, Split, make_split

logger = logging.getLogger(__name__)

EXAMPLES_PER_PROBLEM = 5
ORIENTATION_TAG = 0x0112  # EXIF orientation; 5..8 swap height and width

# What each kind of problem means, as the report's heading for it.
PROBLEM_TITLES = {
    "layout": "layout (folders, lists, class names)",
    "missing": "images or labels missing",
    "unreadable": "unreadable files",
    "colour": "colour-coded labels where class ids are expected",
    "palette": "label colours not in the palette",
    "size": "image and label sizes differ",
    "ids": "label values outside the class list",
}


@dataclass
class PairResult:
    """What one image/label pair contributed: problems and a raw label-value histogram."""

    problems: list[tuple[str, str]] = field(default_factory=list)
    # The raw label values present and their pixel counts (sparse: 16-bit labels span 65,536 values); None when
    # the label file was unusable.
    values: Any = None
    counts: Any = None
    rotated: bool = False


@dataclass
class SplitReport:
    """One split: how many pairs, how many were checked, and its class histogram."""

    name: str
    pairs: int
    checked: int
    expected: tuple[int, ...]
    pixels: Any  # (K,) labelled pixels per class
    images: Any  # (K,) images containing each class
    ignored: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class DataReport:
    """Everything check-data found; :meth:`format` is the text the command prints."""

    root: Path
    dataset: str
    split: Split | None = None
    ignore_index: int = IGNORE_INDEX
    reduce_zero_label: bool = False
    splits: list[SplitReport] = field(default_factory=list)
    problems: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def problem(self, kind: str, message: str) -> None:
        self.problems.setdefault(kind, []).append(message)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self, strict: bool = False) -> str:
        lines = [self._header()]
        for report in self.splits:
            scope = (
                "all checked"
                if report.checked == report.pairs
                else f"{report.checked:,} checked (--max-images)"
            )
            lines.append(f"  {report.name}: {report.pairs:,} image/label pairs, {scope}")
            lines += [f"    {note}" for note in report.notes]
        if self.split is not None and self.splits:
            lines += ["", *self._histogram()]
        if self.warnings:
            lines += ["", f"warnings ({len(self.warnings)}):"]
            lines += [f"  - {w}" for w in self.warnings]
        if self.problems:
            total = sum(len(v) for v in self.problems.values())
            lines += ["", f"problems ({total}):"]
            for kind, messages in self.problems.items():
                lines.append(f"  {PROBLEM_TITLES.get(kind, kind)} ({len(messages)}):")
                lines += [f"    - {m}" for m in messages[:EXAMPLES_PER_PROBLEM]]
                if len(messages) > EXAMPLES_PER_PROBLEM:
                    lines.append(f"    ... and {len(messages) - EXAMPLES_PER_PROBLEM} more")
        lines.append("")
        if not self.ok:
            lines.append(
                f"RESULT: FAILED — {sum(len(v) for v in self.problems.values())} problem(s) listed above"
            )
        elif strict and self.warnings:
            lines.append(f"RESULT: FAILED (--strict) — {len(self.warnings)} warning(s) listed above")
        else:
            extra = f" ({len(self.warnings)} warning(s))" if self.warnings else ""
            lines.append(f"RESULT: OK — the data can be used for training and evaluation{extra}")
        return "\n".join(lines)

    def _header(self) -> str:
        head = f"check-data: {self.dataset} dataset at {self.root}"
        if self.split is not None:
            s = self.split
            head += f" ({s.num_classes} classes: {len(s.seen)} seen, {len(s.unseen)} unseen)"
        return head

    def _histogram(self) -> list[str]:
        split = self.split
        assert split is not None
        width = min(28, max(5, *(len(n) for n in split.class_names)))
        column = 22
        header = f"  {'id':>4}  {'class':<{width}}" + "".join(
            f"{r.name[:column]:>{column}}" for r in self.splits
        )
        lines = ["class histogram (share of labelled pixels, images containing the class):", header]
        for title, ids in (("seen", split.seen), ("unseen", split.unseen)):
            if not ids:
                continue
            lines.append(f"  {title}:")
            for i in ids:
                cells = "".join(
                    f"{100 * r.pixels[i] / max(int(r.pixels.sum()), 1):>10.2f}% {int(r.images[i]):>6,} img"
                    for r in self.splits
                )
                lines.append(f"  {i:>4}  {split.class_names[i][:width]:<{width}}{cells}")
        cells = "".join(
            f"{100 * r.ignored / max(int(r.pixels.sum()) + r.ignored, 1):>10.2f}% of all px"
            for r in self.splits
        )
        label = f"ignore ({self.ignore_index})"
        lines.append(f"  {'':>4}  {label:<{width}}{cells}")
        if self.reduce_zero_label:
            lines.append(
                f"  {'':>4}  (ignore includes the background, label value 0, as the benchmark defines)"
            )
        return lines


# ----------------------------------------------------------------------------------------------------------------
# One pair


def _colour_summary(rgb: np.ndarray, limit: int = 4) -> str:
    keys, counts = np.unique(colour_keys(rgb[..., :3]), return_counts=True)
    order = np.argsort(-counts)[:limit]
    shown = ", ".join(format_colour_key(k) for k in keys[order].tolist())
    return f"{len(keys)} colours, e.g. {shown}"


def _is_voc_colours(rgb: np.ndarray) -> bool:
    voc = colour_keys(voc_colormap()[None])[0]
    return bool(np.isin(np.unique(colour_keys(rgb[..., :3])), voc).all())


def check_pair(
    sample: Sample,
    palette: Palette | None = None,
    decode_images: bool = False,
    voc_colours: bool = False,
) -> PairResult:
    """Check one image/label pair: readable, same size (EXIF-aware), ids in one channel; histogram its values.

    ``voc_colours``: a colour label in the VOC colours is named as such (VOC-layout datasets).
    """
    result = PairResult()
    image_hw = None
    try:
        with Image.open(sample.image) as image:
            image_hw = (image.height, image.width)
            result.rotated = image.getexif().get(ORIENTATION_TAG, 1) in (5, 6, 7, 8)
            if decode_images:
                image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        result.problems.append(("unreadable", f"image {sample.image}: {err}"))
    try:
        with Image.open(sample.mask) as label:
            label.load()
            mode = label.mode
            raw = np.asarray(label)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        result.problems.append(("unreadable", f"label {sample.mask}: {err}"))
        return result
    try:
        values = single_channel(raw, mode, palette, sample.mask)
    except ValueError as err:
        result.problems.append(("palette", str(err)))
        return result
    if values is None:
        if voc_colours and _is_voc_colours(raw):
            hint = "VOC's colour palette saved as RGB (keep the palette 'P' PNG, or run prepare-data voc)"
        else:
            hint = "labels must be single-channel id PNGs; for colour labels put a palette.txt beside classes.txt"
        result.problems.append(("colour", f"{sample.mask}: {mode} image with {_colour_summary(raw)}; {hint}"))
        return result
    raw = values
    if raw.dtype.kind == "f":
        result.problems.append(("ids", f"{sample.mask}: floating-point values; labels must be integer ids"))
        return result
    if image_hw is not None and image_hw != raw.shape:
        swapped = result.rotated and image_hw[::-1] == raw.shape
        if not swapped:
            result.problems.append(
                (
                    "size",
                    f"{sample.image} is {image_hw[0]}x{image_hw[1]} but its label {sample.mask.name} is "
                    f"{raw.shape[0]}x{raw.shape[1]} (H x W)",
                )
            )
    hist = np.bincount(raw.astype(np.int64).ravel())
    result.values = np.nonzero(hist)[0]
    result.counts = hist[result.values]
    return result


# ----------------------------------------------------------------------------------------------------------------
# A whole dataset


def detect_dataset(root: Path) -> str:
    """Guess the dataset layout of ``root`` from its marker folders.

    Raises:
        FileNotFoundError: nothing recognisable (the message lists what each layout needs).
    """
    candidates = {
        "folder": [root / "classes.txt"],
        "voc": [root / d / "SegmentationClass" for d in ("", "VOC2012", "VOCdevkit/VOC2012")],
        "context": [root / d / "SegmentationClassContext" for d in ("", "VOC2010", "VOCdevkit/VOC2010")],
        "coco-stuff": [root / "annotations" / s for s in ("train2017", "val2017")],
        "ade20k-full": [root / d / "annotations_detectron2" for d in ("", "ADE20K_2021_17_01")],
        "ade20k": [root / d / "annotations" / "validation" for d in ("", "ADEChallengeData2016")],
    }
    for name, markers in candidates.items():
        if any(m.exists() for m in markers):
            return name
    raise FileNotFoundError(
        f"cannot tell which dataset is in {root}: expected classes.txt (folder dataset), VOCdevkit/VOC2012, "
        "VOCdevkit/VOC2010/SegmentationClassContext, annotations/val2017 (COCO-Stuff), ADEChallengeData2016 or "
        "ADE20K_2021_17_01/annotations_detectron2; pass --dataset"
    )


def _default_splits(dataset: str, root: Path) -> list[str]:
    if dataset != "folder":
        return ["train", "val"]
    named = [d.name for d in sorted(root.iterdir()) if d.is_dir() and (d / "images").is_dir()]
    return named or ["all"]


def _orphans(listing: Listing) -> list[Path]:
    """Label files in the split's label folder(s) that no image uses (a renamed or deleted image)."""
    used = {s.mask.name for s in listing.samples}
    orphans = []
    for folder in listing.mask_dirs:
        if folder.is_dir():
            suffix = listing.mask_suffix
            orphans += [p for p in sorted(folder.iterdir()) if p.name.endswith(suffix) and p.name not in used]
    return orphans


def _count_note(dataset: str, split: str, listing: Listing, count: int) -> str | None:
    expected = EXPECTED_IMAGES.get(dataset, {}).get(split)
    if not expected or count in expected:
        return None
    plain_voc = (
        dataset == "voc"
        and split == "train"
        and not any("train_aug" in n or "aug.txt" in n for n in listing.notes)
    )
    sbd_hint = (
        f"; the zero-shot protocol trains on the {expected[0]:,}-image train_aug (VOC + SBD): "
        "run clipzss prepare-data voc with benchmark.tgz"
        if plain_voc
        else ""
    )
    if plain_voc and count == VOC_PLAIN_TRAIN:
        return f"voc train has {count:,} images: the plain VOC train.txt{sbd_hint}"
    share = f"{100 * count / expected[0]:.1f}%"
    kind = "a subset" if count < expected[0] else "more than the official split"
    return (
        f"{dataset} {split} has {count:,} image/label pairs, {share} of the official {expected[0]:,}: {kind}; "
        f"numbers on it are not comparable with published ones{sbd_hint}"
    )


def _classify_values(
    report: DataReport,
    split_name: str,
    raw_total: np.ndarray,
    examples: dict[int, str],  # raw value → "N file(s), e.g. name.png"
    listing: Listing,
) -> tuple[Any, Any]:
    """Turn raw label values into class counts, reporting the values outside the class list with their cause."""
    num_classes = len(listing.class_names)
    offset = 1 if listing.reduce_zero_label else 0
    ignore = listing.ignore_index
    values = np.nonzero(raw_total)[0]
    valid = (values < num_classes + offset) | (values == ignore)
    bad = values[~valid].tolist()
    if bad:
        causes = []
        if not listing.reduce_zero_label and raw_total[0] == 0 and num_classes in bad:
            causes.append(
                f"no pixel has id 0 and id {num_classes} appears: the ids look 1-based (id 0 is line 1 of "
                "classes.txt); add a first class (e.g. 'background') or subtract 1 from the labels"
            )
        if max(bad) > 255 and ignore == IGNORE_INDEX:
            causes.append(
                "values above 255: 16-bit labels of a wider class list, or colours packed as integers?"
            )
        shown = ", ".join(f"{v} (in {examples[v]})" for v in bad[:8])
        rule = " after reduce-zero-label (0 = background)" if listing.reduce_zero_label else ""
        report.problem(
            "ids",
            f"{split_name}: values {shown} are not among the {num_classes} classes{rule} "
            f"(valid: 0..{num_classes + offset - 1} and {ignore} = ignore)"
            + (f"; {' '.join(causes)}" if causes else ""),
        )
    pixels = np.zeros(num_classes, dtype=np.int64)
    covered = min(len(raw_total), num_classes + offset)
    pixels[: covered - offset] = raw_total[offset:covered]
    return pixels, int(raw_total.sum() - pixels.sum())


def check_data(
    root: Path | str,
    dataset: str | None = None,
    splits: Sequence[str] | None = None,
    unseen: Sequence[str] | None = None,
    workers: int = 4,
    max_images: int | None = None,
    decode_images: bool = False,
    progress: bool = True,
) -> DataReport:
    """Check a dataset on disk; see the module docstring for what is checked.

    Args:
        root: the dataset folder (what ``data.root`` will be).
        dataset: a reader name (``voc``, ``coco-stuff``, ``context``, ``context-459``, ``ade20k``, ``folder``);
            None detects it from the layout.
        splits: which splits to check (default: train and val, or the folder dataset's split folders).
        unseen: class names held out as unseen for the histogram (None = the dataset's standard split).
        workers: threads reading files.
        max_images: check only the first N pairs of each split (the counts still cover all of them).
        decode_images: decode each image fully (finds truncated files) instead of reading its header.
        progress: show a progress bar.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    name = normalize_dataset_name(dataset) if dataset else detect_dataset(root)
    report = DataReport(root=root, dataset=name)
    for split_name in splits or _default_splits(name, root):
        try:
            listing = read_listing(name, root, split_name, strict=False)
        except (FileNotFoundError, ValueError) as err:
            report.problem("layout", f"{split_name}: {err}")
            continue
        if report.split is None and not _take_classes(report, listing, unseen):
            return report
        for message in listing.problems:
            report.problem("missing", message)
        samples = listing.samples[:max_images] if max_images else listing.samples
        check = partial(
            check_pair,
            palette=listing.palette,
            decode_images=decode_images,
            voc_colours=name in ("voc", "context"),
        )
        tally = _scan_pairs(report, split_name, samples, check, _Tally.of(listing), workers, progress)
        report.splits.append(_split_report(report, split_name, listing, len(samples), tally))
        _listing_warnings(report, split_name, listing)
    _class_warnings(report)
    return report


def _take_classes(report: DataReport, listing: Listing, unseen: Sequence[str] | None) -> bool:
    """Set the report's class split from the first split listed; False (a layout problem) when it cannot be made."""
    try:
        report.split = make_split(
            listing.class_names, unseen, dataset=report.dataset, max_classes=listing.ignore_index
        )
    except ValueError as err:
        report.problem("layout", str(err))
        return False
    report.ignore_index = listing.ignore_index
    report.reduce_zero_label = listing.reduce_zero_label
    return True


@dataclass
class _Tally:
    """A split's label files summed: pixels per raw value, files per class and per value, rotated images."""

    raw_total: np.ndarray  # pixels per raw label value (grows with the largest value seen)
    present: np.ndarray  # (K,) files containing each class
    offset: int  # 1 under reduce-zero-label: raw value v is class v - 1
    files_by_value: dict[int, str] = field(default_factory=dict)  # raw value → the first file holding it
    files_with_value: Counter[int] = field(default_factory=Counter)
    rotated: int = 0

    @classmethod
    def of(cls, listing: Listing) -> _Tally:
        """An empty tally sized for the listing's classes and ignore value."""
        num_classes = len(listing.class_names)
        offset = 1 if listing.reduce_zero_label else 0
        raw_total = np.zeros(max(listing.ignore_index, num_classes + offset) + 1, dtype=np.int64)
        return cls(raw_total, np.zeros(num_classes, dtype=np.int64), offset)

    def add(self, mask_name: str, result: PairResult) -> None:
        self.rotated += result.rotated
        if result.values is None:
            return
        if result.values[-1] >= len(self.raw_total):
            self.raw_total = np.pad(self.raw_total, (0, int(result.values[-1]) + 1 - len(self.raw_total)))
        self.raw_total[result.values] += result.counts
        for value in result.values.tolist():
            self.files_by_value.setdefault(value, mask_name)
        self.files_with_value.update(result.values.tolist())
        num_classes = len(self.present)
        ids = result.values[(result.values >= self.offset) & (result.values < num_classes + self.offset)]
        self.present[ids - self.offset] += 1

    def examples(self) -> dict[int, str]:
        """Raw value → "N file(s), e.g. name.png", for the report's messages."""
        return {v: f"{self.files_with_value[v]} file(s), e.g. {f}" for v, f in self.files_by_value.items()}


def _scan_pairs(
    report: DataReport,
    split_name: str,
    samples: Sequence[Sample],
    check: Callable[[Sample], PairResult],
    tally: _Tally,
    workers: int,
    progress: bool,
) -> _Tally:
    """Check every pair on ``workers`` threads, streaming (bounded work in flight, the split never held); the
    problems go to ``report``, the label values to ``tally``."""
    chunk = 64 * max(1, workers)
    with (
        ThreadPoolExecutor(max(1, workers)) as pool,
        tqdm(total=len(samples), desc=f"check {split_name}", disable=not progress) as bar,
    ):
        for start in range(0, len(samples), chunk):
            batch = samples[start : start + chunk]
            for sample, result in zip(batch, pool.map(check, batch)):
                bar.update(1)
                for kind, message in result.problems:
                    report.problem(kind, message)
                tally.add(sample.mask.name, result)
    return tally


def _split_report(
    report: DataReport, split_name: str, listing: Listing, checked: int, tally: _Tally
) -> SplitReport:
    """The split's class histogram; its label values outside the class list go to ``report`` as problems."""
    pixels, ignored = _classify_values(report, split_name, tally.raw_total, tally.examples(), listing)
    split_report = SplitReport(
        split_name, len(listing.samples), checked, (), pixels, tally.present, ignored, list(listing.notes)
    )
    if tally.rotated:
        split_report.notes.append(
            f"{tally.rotated} image(s) carry an EXIF rotation; they are read in whichever orientation fits the label"
        )
    return split_report


def _listing_warnings(report: DataReport, split_name: str, listing: Listing) -> None:
    """What the split's file list says besides its pairs: an unofficial size, orphan labels, no pairs at all."""
    if note := _count_note(report.dataset, split_name, listing, len(listing.samples)):
        report.warnings.append(note)
    orphans = _orphans(listing)
    if orphans:
        report.warnings.append(
            f"{split_name}: {len(orphans)} label file(s) without an image, e.g. {orphans[0]} (ignored)"
        )
    if not listing.samples and not listing.problems:
        report.problem("layout", f"{split_name}: no image/label pairs found")


def _listed(names: Sequence[str], limit: int = 10) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _class_warnings(report: DataReport) -> None:
    """Seen classes never labelled in training; unseen classes absent from evaluation."""
    split = report.split
    if split is None:
        return
    by_name = {r.name: r for r in report.splits}
    train, val = by_name.get("train"), by_name.get("val")
    if train is not None and train.checked == train.pairs:
        never = [split.class_names[i] for i in split.seen if train.pixels[i] == 0]
        if never:
            report.warnings.append(
                f"seen class(es) with no labelled pixel in train: {_listed(never)}; the student cannot "
                "learn them from labels"
            )
        hidden = int(train.pixels[list(split.unseen)].sum()) if split.unseen else 0
        if hidden:
            share = 100 * hidden / max(int(train.pixels.sum()), 1)
            train.notes.append(
                f"{share:.1f}% of the labelled train pixels are unseen classes: training relabels them to ignore"
            )
    if val is not None and val.checked == val.pairs:
        absent = [split.class_names[i] for i in range(split.num_classes) if val.pixels[i] == 0]
        if absent:
            kinds = {i: "unseen" if i in split.unseen else "seen" for i in range(split.num_classes)}
            listed = _listed([f"{n} ({kinds[split.class_names.index(n)]})" for n in absent])
            report.warnings.append(
                f"class(es) absent from val: {listed}; their IoU is NaN and the means skip them"
            )
