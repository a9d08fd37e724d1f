"""The readers: where each dataset layout keeps its images, masks, split lists and class names.

A reader turns ``(root, split)`` into a :class:`Listing` (the image/mask file pairs, the class list and how the
label values are read) without opening a single image; :func:`read_listing` is the entry point that datasets
(:mod:`clipzss.data.datasets`), ``prepare-data`` and ``check-data`` share. Roots may be the dataset folder or a
parent holding it.

Label sets wider than 255 classes (PASCAL Context-459, ADE20K-full 847) are stored as 16-bit label files whose
ignore value is :data:`~clipzss.data.splits.WIDE_IGNORE_INDEX`; their listings carry that ``ignore_index``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from clipzss.data.masks import PALETTE_FILE, Palette, read_palette
from clipzss.data.splits import DATASET_CLASSES, IGNORE_INDEX, WIDE_IGNORE_INDEX, validate_class_names
from clipzss.errors import UsageError
from clipzss.images import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)

CONTEXT459_CLASSES_FILE = "context459_classes.txt"
ADE_FULL_FOLDER = "ADE20K_2021_17_01"


@dataclass(frozen=True)
class Sample:
    """One image file, its label file and the name it is reported under."""

    image: Path
    mask: Path
    name: str


@dataclass
class Listing:
    """What a reader found for one split: the file pairs, the class list and how to read the label values.

    ``problems`` collects missing images/masks when the reader runs leniently (the data doctor); ``mask_dirs``
    are folders that hold exactly this split's masks, named ``<image stem><mask_suffix>`` (so a mask without an
    image there is an orphan); ``notes`` say which choices the reader made (e.g. which VOC list).
    """

    samples: list[Sample]
    class_names: tuple[str, ...]
    reduce_zero_label: bool = False
    palette: Palette | None = None
    ignore_index: int = IGNORE_INDEX
    problems: list[str] = field(default_factory=list)
    mask_dirs: tuple[Path, ...] = ()
    notes: list[str] = field(default_factory=list)
    mask_suffix: str = ".png"


def _report(problems: list[str] | None, message: str) -> None:
    """Raise ``message`` (strict readers) or collect it (lenient readers)."""
    if problems is None:
        raise FileNotFoundError(message)
    problems.append(message)


def _first_dir(candidates: Sequence[Path], marker: str, what: str) -> Path:
    for path in candidates:
        if (path / marker).is_dir():
            return path
    tried = ", ".join(str(p / marker) for p in candidates)
    raise FileNotFoundError(f"no {what} found: expected one of {tried}")


def _split_dir(parent: Path, split: str, aliases: dict[str, str]) -> Path:
    for name in (split, aliases.get(split)):
        if name and (parent / name).is_dir():
            return parent / name
    alias = f" (or {parent / aliases[split]})" if split in aliases else ""
    raise FileNotFoundError(f"no images found in {parent / split}{alias}")


def _list_images(folder: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    if not images:
        raise FileNotFoundError(
            f"no images found in {folder} (expected {', '.join('*' + s for s in suffixes)})"
        )
    stems = [p.stem for p in images]
    if len(set(stems)) != len(stems):
        twice = sorted({s for s in stems if stems.count(s) > 1})
        raise UsageError(f"{folder} has several images with the same name stem: {', '.join(twice[:5])}")
    return images


def _pair(
    images: Sequence[Path], mask_of: Callable[[Path], Path], problems: list[str] | None = None
) -> list[Sample]:
    samples = []
    for image in images:
        mask = mask_of(image)
        if not mask.is_file():
            _report(problems, f"no mask for image {image}: expected {mask}")
            continue
        samples.append(Sample(image=image, mask=mask, name=image.stem))
    return samples


def _paired_folders(
    image_dir: Path, mask_dir: Path, mask_suffix: str, problems: list[str] | None
) -> list[Sample]:
    """Every image of ``image_dir`` with its mask ``mask_dir/<stem><mask_suffix>``."""
    return _pair(_list_images(image_dir), lambda p: mask_dir / f"{p.stem}{mask_suffix}", problems)


def _read_list(path: Path) -> list[list[str]]:
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.txt")) if path.parent.is_dir() else []
        raise FileNotFoundError(
            f"split list {path} not found; lists present: {', '.join(available) or 'none'}"
        )
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def _voc_style_samples(
    base: Path,
    lists: Sequence[str],
    list_dir: Path,
    mask_dirs: dict[str, Sequence[str]],
    problems: list[str] | None = None,
) -> list[Sample]:
    """Samples from VOC-style id lists; each list has its mask folders in preference order."""
    samples: dict[str, Sample] = {}
    for list_name in lists:
        for tokens in _read_list(list_dir / list_name):
            if len(tokens) >= 2:  # DeepLab-style "/JPEGImages/x.jpg /SegmentationClassAug/x.png"
                image, mask = base / tokens[0].lstrip("/"), base / tokens[1].lstrip("/")
                name = image.stem
            else:
                name = tokens[0]
                image = base / "JPEGImages" / f"{name}.jpg"
                folders = [base / d for d in mask_dirs[list_name]]
                found = next((f / f"{name}.png" for f in folders if (f / f"{name}.png").is_file()), None)
                if found is None:
                    _report(
                        problems,
                        f"no mask for image {image}: expected {name}.png in {' or '.join(map(str, folders))}",
                    )
                    continue
                mask = found
            if not image.is_file():
                _report(problems, f"image {image} listed in {list_dir / list_name} does not exist")
                continue
            if not mask.is_file():
                _report(problems, f"no mask for image {image}: expected {mask}")
                continue
            samples.setdefault(name, Sample(image=image, mask=mask, name=name))
    return list(samples.values())


def read_classes_txt(path: Path, max_classes: int = IGNORE_INDEX) -> tuple[str, ...]:
    """One class name per line, line i = id i; trailing blank lines are allowed, inner ones are not."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the folder dataset needs one class name per line (line i = id i)"
        )
    lines = path.read_text(
        encoding="utf-8-sig"
    ).splitlines()  # a byte-order mark is not part of line 1's name
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise UsageError(f"{path} is empty: give one class name per line (line i = id i)")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise UsageError(f"{path} line {number} is blank; every id up to the last class needs a name")
    return validate_class_names(lines, max_classes=max_classes)


# ----------------------------------------------------------------------------------------------------------------
# One reader per layout: (root, split, problems) -> Listing


def voc_samples(root: Path, split: str, problems: list[str] | None = None) -> Listing:
    """PASCAL VOC 2012 (+ SBD aug) in the VOC / mmseg layout.

    For ``split == "train"`` the augmented set is used when ``SegmentationClassAug/`` exists: the list
    ``ImageSets/Segmentation/train_aug.txt`` (10,582 ids, DeepLab/ZegCLIP) if present, else mmseg's
    ``train.txt`` ∪ ``aug.txt`` if ``aug.txt`` is present; otherwise ``train.txt`` alone. Other splits read
    ``<split>.txt``. Masks come from ``SegmentationClass/`` (``SegmentationClassAug/`` first for the aug lists).
    """
    base = _first_dir(
        [root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"], "JPEGImages", "VOC 2012 folder"
    )
    list_dir = base / "ImageSets" / "Segmentation"
    plain, aug = ("SegmentationClass", "SegmentationClassAug"), ("SegmentationClassAug", "SegmentationClass")
    lists = [f"{split}.txt"]
    if split == "train" and (base / "SegmentationClassAug").is_dir():
        if (list_dir / "train_aug.txt").is_file():
            lists = ["train_aug.txt"]
        elif (list_dir / "aug.txt").is_file():
            lists = ["train.txt", "aug.txt"]
        if len(lists) > 1 or lists[0] != "train.txt":
            logger.info("VOC train: using the SBD-augmented list(s) %s", " + ".join(lists))
    mask_dirs = {name: aug if "aug" in name else plain for name in lists}
    samples = _voc_style_samples(base, lists, list_dir, mask_dirs, problems)
    listing = Listing(samples, DATASET_CLASSES["voc"], reduce_zero_label=True)
    listing.notes.append(f"list(s): {' + '.join(str(list_dir / n) for n in lists)}")
    return listing


def _context_base(root: Path) -> Path:
    return _first_dir(
        [root, root / "VOC2010", root / "VOCdevkit" / "VOC2010"], "JPEGImages", "VOC 2010 folder"
    )


def _context_split(base: Path, split: str, mask_folder: str, problems: list[str] | None) -> list[Sample]:
    """A PASCAL Context split: the ids of ``ImageSets/SegmentationContext/<split>.txt``, masks in ``mask_folder``
    (the 59- and the 459-class label sets share the lists and images)."""
    list_name = f"{split}.txt"
    list_dir = base / "ImageSets" / "SegmentationContext"
    return _voc_style_samples(base, [list_name], list_dir, {list_name: (mask_folder,)}, problems)


def context_samples(root: Path, split: str, problems: list[str] | None = None) -> Listing:
    """PASCAL Context-59 (mmseg layout): JPEGImages, SegmentationClassContext, ImageSets/SegmentationContext."""
    samples = _context_split(_context_base(root), split, "SegmentationClassContext", problems)
    return Listing(samples, DATASET_CLASSES["context"], reduce_zero_label=True)


def context459_samples(root: Path, split: str, problems: list[str] | None = None) -> Listing:
    """PASCAL Context-459 (written by ``clipzss prepare-data context``): 16-bit ids 0..458, 65535 = ignore.

    Masks in ``SegmentationClassContext459/``, the class names (line i = id i) in ``context459_classes.txt``,
    the lists shared with Context-59. Evaluation only (open-vocabulary transfer).
    """
    base = _context_base(root)
    class_names = read_classes_txt(base / CONTEXT459_CLASSES_FILE, max_classes=WIDE_IGNORE_INDEX)
    samples = _context_split(base, split, "SegmentationClassContext459", problems)
    return Listing(samples, class_names, ignore_index=WIDE_IGNORE_INDEX)


def coco_stuff_samples(root: Path, split: str, problems: list[str] | None = None) -> Listing:
    """COCO-Stuff 164k (mmseg layout): images/<split>2017/*.jpg, annotations/<split>2017/*_labelTrainIds.png."""
    image_dir = _split_dir(root / "images", split, {"train": "train2017", "val": "val2017"})
    mask_dir = root / "annotations" / image_dir.name
    suffix = "_labelTrainIds.png"
    samples = _paired_folders(image_dir, mask_dir, suffix, problems)
    return Listing(samples, DATASET_CLASSES["coco-stuff"], mask_dirs=(mask_dir,), mask_suffix=suffix)


def ade20k_samples(root: Path, split: str, problems: list[str] | None = None) -> Listing:
    """ADE20K-150 (ADEChallengeData2016): images/{training,validation}/*.jpg, annotations/<same>/*.png."""
    base = _first_dir([root, root / "ADEChallengeData2016"], "images", "ADEChallengeData2016 folder")
    image_dir = _split_dir(base / "images", split, {"train": "training", "val": "validation"})
    mask_dir = base / "annotations" / image_dir.name
    samples = _paired_folders(image_dir, mask_dir, ".png", problems)
    return Listing(samples, DATASET_CLASSES["ade20k"], reduce_zero_label=True, mask_dirs=(mask_dir,))


def ade20k_full_samples(root: Path, split: str, problems: list[str] | None = None) -> Listing:
    """ADE20K-full / ADE-847 in detectron2's layout (also what ``clipzss prepare-data ade20k`` writes):
    ``images_detectron2/{training,validation}/*.jpg`` and ``annotations_detectron2/<same>/*.tif`` (16-bit ids
    0..846, 65535 = ignore). Evaluation only (open-vocabulary transfer)."""
    base = _first_dir([root, root / ADE_FULL_FOLDER], "images_detectron2", f"{ADE_FULL_FOLDER} folder")
    image_dir = _split_dir(base / "images_detectron2", split, {"train": "training", "val": "validation"})
    mask_dir = base / "annotations_detectron2" / image_dir.name
    samples = _paired_folders(image_dir, mask_dir, ".tif", problems)
    return Listing(
        samples,
        DATASET_CLASSES["ade20k-full"],
        ignore_index=WIDE_IGNORE_INDEX,
        mask_dirs=(mask_dir,),
        mask_suffix=".tif",
    )


def folder_samples(root: Path, split: str, problems: list[str] | None = None) -> Listing:
    """The folder dataset: classes.txt (+ palette.txt) + <split>/images + <split>/masks, or images + masks."""
    class_names = read_classes_txt(root / "classes.txt")
    palette = read_palette(root / PALETTE_FILE, class_names) if (root / PALETTE_FILE).is_file() else None
    base = root / split
    if not (base / "images").is_dir():
        if not (root / "images").is_dir():
            raise FileNotFoundError(
                f"no images found in {root / split / 'images'} (nor in {root / 'images'})"
            )
        logger.info("%s has no '%s' folder; using %s for this split", root, split, root / "images")
        base = root
    mask_dir = base / "masks"
    samples = _paired_folders(base / "images", mask_dir, ".png", problems)
    listing = Listing(samples, class_names, palette=palette, mask_dirs=(mask_dir,))
    if palette is not None:
        listing.notes.append(f"colour masks are read through {root / PALETTE_FILE}")
    return listing


@dataclass(frozen=True)
class Reader:
    read: Callable[[Path, str, list[str] | None], Listing]
    trainable: bool = True


READERS: dict[str, Reader] = {
    "voc": Reader(voc_samples),
    "coco-stuff": Reader(coco_stuff_samples),
    "context": Reader(context_samples),
    "context-459": Reader(context459_samples, trainable=False),
    "ade20k": Reader(ade20k_samples, trainable=False),
    "ade20k-full": Reader(ade20k_full_samples, trainable=False),
    "folder": Reader(folder_samples),
}


# Image/label pairs per split in the complete official data (after prepare-data), for prepare-data's summary and
# check-data's count check. Two values where two list versions are in use (see docs/protocols.md).
EXPECTED_IMAGES: dict[str, dict[str, tuple[int, ...]]] = {
    "voc": {"train": (10582,), "val": (1449,)},
    "coco-stuff": {"train": (118287,), "val": (5000,)},
    "context": {"train": (4998, 4996), "val": (5105, 5104)},
    "context-459": {"train": (4998, 4996), "val": (5105, 5104)},
    "ade20k": {"train": (20210,), "val": (2000,)},
    "ade20k-full": {"train": (25574,), "val": (2000,)},
}
VOC_PLAIN_TRAIN = 1464  # VOC 2012's own train.txt, without the SBD images


def normalize_dataset_name(name: str) -> str:
    """'COCO_Stuff' → 'coco-stuff': the spelling the readers are registered under."""
    return name.strip().lower().replace("_", "-")


def read_listing(dataset: str, root: Path | str, split: str, strict: bool = True) -> Listing:
    """List one split of a dataset on disk without reading any file.

    Args:
        dataset: a key of :data:`READERS` (any case, ``_`` or ``-``).
        root: the dataset folder (or a parent the reader knows, e.g. the one holding ``VOCdevkit``).
        split: ``train``, ``val`` or any split the layout names.
        strict: raise on the first missing image or mask (datasets); when False, collect them in
            ``Listing.problems`` and keep going (the data doctor).

    Raises:
        ValueError: unknown dataset name.
        FileNotFoundError: the layout is missing (a folder, a split list, or, when strict, a file).
    """
    name = normalize_dataset_name(dataset)
    if name not in READERS:
        raise UsageError(f"unknown dataset '{dataset}'; choose one of: {', '.join(READERS)}")
    problems: list[str] | None = None if strict else []
    listing = READERS[name].read(Path(root).expanduser(), split, problems)
    listing.problems = problems or []
    return listing
