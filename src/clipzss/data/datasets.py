"""Segmentation datasets in the mmsegmentation folder layouts, the generic folder dataset and synthetic scenes.

Every dataset yields ``{"image": (3, H, W) float32 normalised, "mask": (H, W) int64 with 255 = ignore,
"name": str}`` and carries its ``class_names`` and :class:`~clipzss.data.splits.Split`. Masks are read as class
ids (after each layout's reduce-zero-label rule); with ``train=True`` the unseen classes become 255 through
:func:`~clipzss.data.splits.relabel_unseen`, the one place that happens. Bad files fail when read, with the file
named; a missing mask fails when the dataset is built.

Colour-coded masks are read only through an explicit palette (``palette.txt`` beside the folder dataset's
``classes.txt``), never guessed. Label sets wider than 255 classes (PASCAL Context-459, ADE20K-full 847) are stored
as 16-bit PNGs whose ignore value is 65535 (:data:`WIDE_IGNORE_INDEX`); their datasets carry that ``ignore_index``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from clipzss.config import Config
from clipzss.data.splits import (
    DATASET_CLASSES,
    IGNORE_INDEX,
    Split,
    make_split,
    relabel_unseen,
    validate_class_names,
)
from clipzss.data.transforms import (
    EvalTransform,
    SegTransform,
    build_eval_transform,
    build_transforms,
    pil_to_tensor,
)
from clipzss.inference import IMAGE_SUFFIXES, to_rgb

logger = logging.getLogger(__name__)

PALETTE_FILE = "palette.txt"
# The ignore value of 16-bit label maps, whose class ids may pass 255 (detectron2's convention for ADE-847/PC-459).
WIDE_IGNORE_INDEX = 65535


@dataclass(frozen=True)
class Sample:
    """One image file, its label file and the name it is reported under."""

    image: Path
    mask: Path
    name: str


# ----------------------------------------------------------------------------------------------------------------
# Datasets


class SegmentationDataset(Dataset):
    """Base class: a class list with its split, a joint transform, and the training-only unseen relabelling.

    Subclasses implement :meth:`load` (class-id image and mask, untransformed) and ``__len__``.
    """

    ignore_index: int = IGNORE_INDEX  # the mask value that means "no label"; 65535 for 16-bit label sets

    def __init__(self, split: Split, transform: SegTransform | EvalTransform | None = None, train: bool = False) -> None:
        self.split = split
        self.transform = transform if transform is not None else build_eval_transform(None)
        self.train = train

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.split.class_names

    @property
    def seen(self) -> tuple[int, ...]:
        return self.split.seen

    @property
    def unseen(self) -> tuple[int, ...]:
        return self.split.unseen

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        """The untransformed item: (3, H, W) uint8 image, (H, W) int64 class ids (255 ignore), name."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        image, mask, name = self.load(index)
        if self.train:
            mask = relabel_unseen(mask, self.split)
        image, mask = self.transform(image, mask)
        return {"image": image, "mask": mask, "name": name}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self)} images, {self.split.num_classes} classes, "
            f"{len(self.unseen)} unseen, train={self.train})"
        )


# ----------------------------------------------------------------------------------------------------------------
# Label files


def colour_keys(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 colours → (H, W) int64 keys ``r << 16 | g << 8 | b``, one integer per colour."""
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _format_key(key: int) -> str:
    return f"({key >> 16}, {(key >> 8) & 255}, {key & 255})"


@dataclass(frozen=True)
class Palette:
    """Colour → class id table for colour-coded masks; colours it does not list are an error, never a guess.

    Attributes:
        keys: (N,) sorted :func:`colour_keys` of the listed colours.
        ids: (N,) class id of each key (255 for the colours listed as ignore).
        source: where the table came from, for messages.
    """

    keys: np.ndarray
    ids: np.ndarray
    source: str = "palette"

    def to_ids(self, rgb: np.ndarray, path: Path | str = "mask") -> np.ndarray:
        """(H, W, 3) colours → (H, W) int64 class ids.

        Raises:
            ValueError: the mask holds colours the palette does not list (the message names them and the file).
        """
        keys = colour_keys(rgb[..., :3])  # (H, W)
        index = np.clip(np.searchsorted(self.keys, keys), 0, len(self.keys) - 1)  # (H, W)
        known = self.keys[index] == keys
        if not known.all():
            values, counts = np.unique(keys[~known], return_counts=True)
            order = np.argsort(-counts)[:5]
            listed = ", ".join(f"{_format_key(int(values[i]))} × {counts[i]} px" for i in order)
            raise ValueError(
                f"mask {path} has {len(values)} colour(s) not in {self.source}: {listed}; add them to the "
                "palette (as a class or, after the last class, as an ignore colour)"
            )
        return self.ids[index].astype(np.int64)


def _parse_colour(text: str) -> tuple[tuple[int, int, int], str] | None:
    """'R G B [name]', 'R,G,B [name]' or '#RRGGBB [name]' → ((r, g, b), name); None when it is none of these."""
    text = text.strip()
    if text.startswith("#"):
        code, _, rest = text[1:].partition(" ")
        if len(code) != 6:
            return None
        try:
            value = int(code, 16)
        except ValueError:
            return None
        return ((value >> 16, (value >> 8) & 255, value & 255), rest.strip())
    parts = text.replace(",", " ").split(None, 3)
    if len(parts) < 3 or not all(p.isdigit() for p in parts[:3]):
        return None
    rgb = tuple(int(p) for p in parts[:3])
    if max(rgb) > 255:
        return None
    return (rgb, parts[3].strip() if len(parts) > 3 else "")  # type: ignore[return-value]


def read_palette(path: Path, class_names: Sequence[str]) -> Palette:
    """Read a palette file: line i colours class i, then optional extra lines of ignore colours.

    Each line is ``R G B``, ``R,G,B`` or ``#RRGGBB``, optionally followed by a name. A class line's name, when
    given, must be that class's name (a shifted palette is the usual mistake); the lines after the last class map
    their colour to 255 (ignore).

    Raises:
        ValueError: a malformed line, a name that does not match ``class_names``, a repeated colour, or fewer
            lines than classes.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    keys: list[int] = []
    ids: list[int] = []
    for number, line in enumerate(lines, start=1):
        parsed = _parse_colour(line)
        if parsed is None:
            raise ValueError(
                f"{path} line {number} is not a colour: {line.strip()!r} (expected 'R G B', 'R,G,B' or '#RRGGBB', "
                "optionally followed by the class name)"
            )
        (r, g, b), name = parsed
        class_id = number - 1 if number <= len(class_names) else IGNORE_INDEX
        if name and class_id != IGNORE_INDEX and name.lower() != class_names[class_id].strip().lower():
            raise ValueError(
                f"{path} line {number} names '{name}' but class id {class_id} is '{class_names[class_id]}'; "
                "line i of the palette must colour class i of classes.txt"
            )
        key = (r << 16) | (g << 8) | b
        if key in keys:
            other = keys.index(key) + 1
            raise ValueError(f"{path} line {number} repeats the colour {_format_key(key)} of line {other}")
        keys.append(key)
        ids.append(class_id)
    if len(lines) < len(class_names):
        raise ValueError(
            f"{path} has {len(lines)} colours for {len(class_names)} classes; give one line per class, "
            "in classes.txt order"
        )
    order = np.argsort(keys)
    return Palette(np.asarray(keys, np.int64)[order], np.asarray(ids, np.int64)[order], source=str(path))


def load_mask(path: Path, palette: Palette | None = None) -> np.ndarray:
    """Read a label PNG as an (H, W) int64 array of raw ids (palette indices for "P" PNGs).

    With ``palette``, colour (RGB/RGBA) masks are translated through it; single-channel masks are ids either way.

    Raises:
        ValueError: unreadable file, a colour mask without a palette (class ids must be single-channel), or
            colours the palette does not list.
    """
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            array = np.asarray(image)
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read mask {path}: {err}") from None
    if array.ndim == 3 and mode in ("LA", "La", "PA"):
        array = array[..., 0]  # ids plus an alpha channel that carries no labels
    elif array.ndim == 3 and palette is not None:
        return palette.to_ids(array, path)
    elif array.ndim == 3:
        # An RGB(A) file whose channels agree is a grey id map saved as colour; anything else is a colour mask.
        if np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2]):
            array = array[..., 0]
        else:
            raise ValueError(
                f"mask {path} is a colour ({mode}) image; masks must hold class ids in one channel "
                f"(mode L, P or I;16), with 255 = ignore; for colour-coded masks put a {PALETTE_FILE} "
                "(one 'R G B' line per class, in classes.txt order) beside classes.txt"
            )
    if mode == "F" or array.dtype.kind == "f":
        raise ValueError(f"mask {path} holds floating-point values; masks must hold integer class ids")
    return array.astype(np.int64)


def _image_matching(path: Path, size_hw: tuple[int, int]) -> Image.Image:
    """Load an image upright by EXIF, unless only its stored orientation matches the mask (then keep that)."""
    try:
        with Image.open(path) as raw:
            raw.load()
            upright = ImageOps.exif_transpose(raw)
            if (upright.height, upright.width) != size_hw and (raw.height, raw.width) == size_hw:
                upright = raw
            image = to_rgb(upright)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None
    if (image.height, image.width) != size_hw:
        raise ValueError(
            f"image {path} is {image.height}x{image.width} but its mask is {size_hw[0]}x{size_hw[1]} (H x W)"
        )
    return image


def class_ids(
    raw: np.ndarray,
    num_classes: int,
    reduce_zero_label: bool,
    ignore_index: int = IGNORE_INDEX,
    path: Path | str = "mask",
) -> np.ndarray:
    """Raw label values → class ids (``ignore_index`` = ignore), checking every value against the class list.

    ``reduce_zero_label`` is mmseg's rule: 0 (background) → ignore, k → k-1, ignore stays.

    Raises:
        ValueError: values that are neither a class nor the ignore value (the first ten are listed).
    """
    top = num_classes + (1 if reduce_zero_label else 0)  # raw ids must be < top or the ignore value
    bad = (raw < 0) | ((raw >= top) & (raw != ignore_index))
    if bad.any():
        values = np.unique(raw[bad])[:10].tolist()
        rule = " after reduce_zero_label (0 = background)" if reduce_zero_label else ""
        raise ValueError(
            f"mask {path} has ids {values} beyond the {num_classes} classes{rule}; "
            f"valid raw ids are 0..{top - 1} and {ignore_index} (ignore)"
        )
    if not reduce_zero_label:
        return raw
    ids = raw - 1
    ids[(raw == 0) | (raw == ignore_index)] = ignore_index
    return ids


class FileDataset(SegmentationDataset):
    """Image/mask file pairs. ``reduce_zero_label`` applies mmseg's rule: 0 → ignore, k → k-1, ignore stays.

    ``palette`` translates colour-coded masks; ``ignore_index`` is 255, or 65535 for 16-bit label sets wider than
    255 classes (evaluation only: training relabels with 255).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        split: Split,
        transform: SegTransform | EvalTransform | None = None,
        train: bool = False,
        reduce_zero_label: bool = False,
        palette: Palette | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__(split, transform, train)
        if train and ignore_index != IGNORE_INDEX:
            raise ValueError(
                f"training needs labels with ignore = {IGNORE_INDEX}; this label set uses {ignore_index} "
                f"({split.num_classes} classes) and is for evaluation only"
            )
        self.samples = list(samples)
        self.reduce_zero_label = reduce_zero_label
        self.palette = palette
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        sample = self.samples[index]
        raw = load_mask(sample.mask, self.palette)  # (H, W)
        image = _image_matching(sample.image, raw.shape)
        ids = class_ids(raw, self.split.num_classes, self.reduce_zero_label, self.ignore_index, sample.mask)
        return pil_to_tensor(image), torch.from_numpy(ids), sample.name


# ----------------------------------------------------------------------------------------------------------------
# Readers: (root, split) -> Listing. Roots may be the dataset folder or a parent holding it.


@dataclass
class Listing:
    """What a reader found for one split: the file pairs, the class list and how to read the label values.

    ``problems`` collects missing images/masks when the reader runs leniently (the data doctor); ``mask_dirs``
    are folders that hold exactly this split's masks (so a mask without an image there is an orphan); ``notes``
    say which choices the reader made (e.g. which VOC list).
    """

    samples: list[Sample]
    class_names: tuple[str, ...]
    reduce_zero_label: bool = False
    palette: Palette | None = None
    ignore_index: int = IGNORE_INDEX
    problems: list[str] = field(default_factory=list)
    mask_dirs: tuple[Path, ...] = ()
    notes: list[str] = field(default_factory=list)


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
        raise ValueError(f"{folder} has several images with the same name stem: {', '.join(twice[:5])}")
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


def _voc_base(root: Path) -> Path:
    return _first_dir(
        [root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"], "JPEGImages", "VOC 2012 folder"
    )


def voc_samples(root: Path, split: str, problems: list[str] | None = None) -> Listing:
    """PASCAL VOC 2012 (+ SBD aug) in the VOC / mmseg layout.

    For ``split == "train"`` the augmented set is used when ``SegmentationClassAug/`` exists: the list
    ``ImageSets/Segmentation/train_aug.txt`` (10,582 ids, DeepLab/ZegCLIP) if present, else mmseg's
    ``train.txt`` ∪ ``aug.txt`` if ``aug.txt`` is present; otherwise ``train.txt`` alone. Other splits read ``<split>.txt``. Masks come from
    ``SegmentationClass/`` (``SegmentationClassAug/`` first for the aug lists).
    """
    base = _voc_base(root)
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


def context_samples(root: Path, split: str, problems: list[str] | None = None) -> Listing:
    """PASCAL Context-59 (mmseg layout): JPEGImages, SegmentationClassContext, ImageSets/SegmentationContext."""
    base = _context_base(root)
    lists = [f"{split}.txt"]
    samples = _voc_style_samples(
        base,
        lists,
        base / "ImageSets" / "SegmentationContext",
        {lists[0]: ("SegmentationClassContext",)},
        problems,
    )
    return Listing(samples, DATASET_CLASSES["context"], reduce_zero_label=True)


CONTEXT459_CLASSES_FILE = "context459_classes.txt"


def context459_samples(root: Path, split: str, problems: list[str] | None = None) -> Listing:
    """PASCAL Context-459 (written by ``clipzss prepare-data context``): 16-bit ids 0..458, 65535 = ignore.

    Masks in ``SegmentationClassContext459/``, the class names (line i = id i) in ``context459_classes.txt``,
    the lists shared with Context-59. Evaluation only (open-vocabulary transfer).
    """
    base = _context_base(root)
    class_names = read_classes_txt(base / CONTEXT459_CLASSES_FILE, max_classes=WIDE_IGNORE_INDEX)
    lists = [f"{split}.txt"]
    samples = _voc_style_samples(
        base,
        lists,
        base / "ImageSets" / "SegmentationContext",
        {lists[0]: ("SegmentationClassContext459",)},
        problems,
    )
    return Listing(samples, class_names, ignore_index=WIDE_IGNORE_INDEX)


def coco_stuff_samples(root: Path, split: str, problems: list[str] | None = None) -> Listing:
    """COCO-Stuff 164k (mmseg layout): images/<split>2017/*.jpg, annotations/<split>2017/*_labelTrainIds.png."""
    aliases = {"train": "train2017", "val": "val2017"}
    image_dir = _split_dir(root / "images", split, aliases)
    mask_dir = root / "annotations" / image_dir.name
    samples = _pair(_list_images(image_dir), lambda p: mask_dir / f"{p.stem}_labelTrainIds.png", problems)
    return Listing(samples, DATASET_CLASSES["coco-stuff"], mask_dirs=(mask_dir,))


def ade20k_samples(root: Path, split: str, problems: list[str] | None = None) -> Listing:
    """ADE20K-150 (ADEChallengeData2016): images/{training,validation}/*.jpg, annotations/<same>/*.png."""
    base = _first_dir([root, root / "ADEChallengeData2016"], "images", "ADEChallengeData2016 folder")
    image_dir = _split_dir(base / "images", split, {"train": "training", "val": "validation"})
    mask_dir = base / "annotations" / image_dir.name
    samples = _pair(_list_images(image_dir), lambda p: mask_dir / f"{p.stem}.png", problems)
    return Listing(samples, DATASET_CLASSES["ade20k"], reduce_zero_label=True, mask_dirs=(mask_dir,))


ADE_FULL_FOLDER = "ADE20K_2021_17_01"


def ade20k_full_samples(root: Path, split: str, problems: list[str] | None = None) -> Listing:
    """ADE20K-full / ADE-847 in detectron2's layout (also what ``clipzss prepare-data ade20k`` writes):
    ``images_detectron2/{training,validation}/*.jpg`` and ``annotations_detectron2/<same>/*.tif`` (16-bit ids
    0..846, 65535 = ignore). Evaluation only (open-vocabulary transfer)."""
    base = _first_dir([root, root / ADE_FULL_FOLDER], "images_detectron2", f"{ADE_FULL_FOLDER} folder")
    image_dir = _split_dir(base / "images_detectron2", split, {"train": "training", "val": "validation"})
    mask_dir = base / "annotations_detectron2" / image_dir.name
    samples = _pair(_list_images(image_dir), lambda p: mask_dir / f"{p.stem}.tif", problems)
    return Listing(
        samples, DATASET_CLASSES["ade20k-full"], ignore_index=WIDE_IGNORE_INDEX, mask_dirs=(mask_dir,)
    )


def read_classes_txt(path: Path, max_classes: int = IGNORE_INDEX) -> tuple[str, ...]:
    """One class name per line, line i = id i; trailing blank lines are allowed, inner ones are not."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the folder dataset needs one class name per line (line i = id i)"
        )
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise ValueError(f"{path} line {number} is blank; every id up to the last class needs a name")
    return validate_class_names(lines, max_classes=max_classes)


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
    samples = _pair(_list_images(base / "images"), lambda p: mask_dir / f"{p.stem}.png", problems)
    listing = Listing(samples, class_names, palette=palette, mask_dirs=(mask_dir,))
    if palette is not None:
        listing.notes.append(f"colour masks are read through {root / PALETTE_FILE}")
    return listing


@dataclass(frozen=True)
class _Reader:
    read: Callable[[Path, str, list[str] | None], Listing]
    trainable: bool = True


READERS: dict[str, _Reader] = {
    "voc": _Reader(voc_samples),
    "coco-stuff": _Reader(coco_stuff_samples),
    "context": _Reader(context_samples),
    "context-459": _Reader(context459_samples, trainable=False),
    "ade20k": _Reader(ade20k_samples, trainable=False),
    "ade20k-full": _Reader(ade20k_full_samples, trainable=False),
    "folder": _Reader(folder_samples),
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


def normalise_dataset_name(name: str) -> str:
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
    name = normalise_dataset_name(dataset)
    if name not in READERS:
        raise ValueError(f"unknown dataset '{dataset}'; choose one of: {', '.join(READERS)}")
    problems: list[str] | None = None if strict else []
    listing = READERS[name].read(Path(root).expanduser(), split, problems)
    listing.problems = problems or []
    return listing


# ----------------------------------------------------------------------------------------------------------------
# Synthetic scenes


@dataclass(frozen=True)
class _Look:
    colour: tuple[float, float, float]
    texture: str  # stripes | checker | dots | noise | waves | plain
    period: float = 8.0  # pixels per texture cycle
    angle: float = 0.0  # degrees, direction of variation
    amplitude: float = 0.35
    noise: float = 0.03


# Names describe the look, so a text encoder has something to match.
_SYNTHETIC: tuple[tuple[str, _Look], ...] = (
    ("red horizontal stripes", _Look((0.80, 0.15, 0.15), "stripes", 8.0, 90.0)),
    ("green vertical stripes", _Look((0.20, 0.65, 0.20), "stripes", 8.0, 0.0)),
    ("blue diagonal stripes", _Look((0.20, 0.30, 0.85), "stripes", 10.0, 45.0)),
    ("yellow checkerboard", _Look((0.90, 0.80, 0.20), "checker", 16.0)),
    ("purple dots", _Look((0.55, 0.25, 0.70), "dots", 10.0)),
    ("orange noise", _Look((0.95, 0.55, 0.10), "noise", amplitude=0.0, noise=0.15)),
    ("cyan waves", _Look((0.15, 0.75, 0.80), "waves", 16.0)),
    ("plain grey", _Look((0.55, 0.55, 0.55), "plain", amplitude=0.0, noise=0.02)),
)
SYNTHETIC_CLASSES: tuple[str, ...] = tuple(name for name, _ in _SYNTHETIC)
SYNTHETIC_UNSEEN: tuple[str, ...] = ("purple dots", "cyan waves")


def _texture(look: _Look, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A (H, W) pattern in about [-1, 1] with a random phase and slightly jittered period and angle."""
    period = look.period * rng.uniform(0.85, 1.15)
    angle = math.radians(look.angle + rng.uniform(-10.0, 10.0))
    phase_a, phase_b = rng.uniform(0, 2 * math.pi, 2)
    k = 2 * math.pi / period
    if look.texture == "stripes":
        return np.sign(np.sin(k * (xx * math.cos(angle) + yy * math.sin(angle)) + phase_a))
    if look.texture == "checker":
        return np.sign(np.sin(k * xx + phase_a) * np.sin(k * yy + phase_b))
    if look.texture == "dots":
        return np.where(np.sin(k * xx + phase_a) * np.sin(k * yy + phase_b) > 0.5, 1.0, -0.4)
    if look.texture == "waves":
        return np.sin(k * (xx + 4.0 * np.sin(2 * math.pi * yy / (2 * period))) + phase_a)
    return np.zeros_like(xx)  # plain and noise: the per-pixel noise does the work


class SyntheticScenes(SegmentationDataset):
    """Procedural scenes for the quick start: Voronoi cells, each filled with one class's colour and texture.

    Deterministic from ``(seed, index)``; the largest cell of image ``i`` has class ``i % 8``, so any 8 consecutive
    images cover every class.

    Args:
        num_images: dataset length.
        size: images are ``size`` × ``size``.
        seed: selects the scenes (use different seeds for train and val).
        cells: inclusive range of Voronoi cells per image.
        unseen: class names held out (default :data:`SYNTHETIC_UNSEEN`; ``[]`` for none).
        transform, train: as for every :class:`SegmentationDataset`.
    """

    def __init__(
        self,
        num_images: int = 64,
        size: int = 128,
        seed: int = 0,
        cells: tuple[int, int] = (3, 7),
        unseen: Sequence[str] | None = None,
        transform: SegTransform | EvalTransform | None = None,
        train: bool = False,
    ) -> None:
        if num_images < 1 or size < 8:
            raise ValueError(
                f"SyntheticScenes needs num_images >= 1 and size >= 8, got {num_images} and {size}"
            )
        if not 1 <= cells[0] <= cells[1]:
            raise ValueError(f"cells must be an increasing range of at least 1, got {cells}")
        split = make_split(SYNTHETIC_CLASSES, SYNTHETIC_UNSEEN if unseen is None else unseen)
        super().__init__(split, transform, train)
        self.num_images = num_images
        self.size = size
        self.seed = seed
        self.cells = cells

    def __len__(self) -> int:
        return self.num_images

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} synthetic scenes")
        rng = np.random.default_rng((self.seed, index))
        yy, xx = np.mgrid[0 : self.size, 0 : self.size].astype(np.float64)  # (H, W) each
        num_cells = int(rng.integers(self.cells[0], self.cells[1] + 1))
        points = rng.uniform(0, self.size, (num_cells, 2))
        dist = (yy[..., None] - points[:, 0]) ** 2 + (xx[..., None] - points[:, 1]) ** 2  # (H, W, n)
        cell = dist.argmin(-1)  # (H, W)
        cell_class = rng.integers(0, len(_SYNTHETIC), num_cells)
        cell_class[np.bincount(cell.ravel(), minlength=num_cells).argmax()] = index % len(_SYNTHETIC)
        mask = cell_class[cell]  # (H, W)
        image = np.zeros((self.size, self.size, 3))
        for class_id in np.unique(mask):
            look = _SYNTHETIC[class_id][1]
            colour = np.clip(np.array(look.colour) + rng.normal(0, 0.04, 3), 0, 1)
            pattern = 1 + look.amplitude * _texture(look, rng, yy, xx)  # (H, W)
            fill = colour * pattern[..., None] + rng.normal(0, look.noise, (self.size, self.size, 3))
            image[mask == class_id] = fill[mask == class_id]
        pixels = torch.from_numpy(np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)).permute(2, 0, 1)
        return (
            pixels.contiguous(),
            torch.from_numpy(mask.astype(np.int64)),
            f"synthetic_{self.seed}_{index:06d}",
        )


# ----------------------------------------------------------------------------------------------------------------
# Building from the config

DATASET_NAMES: tuple[str, ...] = (*READERS, "synthetic")
_SYNTHETIC_LENGTH = {True: 256, False: 32}


def build_dataset(cfg: Config, split: str, train: bool) -> SegmentationDataset:
    """The dataset named by ``cfg.data.dataset`` for ``split``, with training or evaluation transforms.

    The split comes from ``cfg.data.unseen`` (None = the dataset's standard split). Training items have unseen
    classes set to 255; evaluation items keep every class and have the image resized to ``cfg.eval.short_side``.

    Raises:
        ValueError: an unknown dataset name, or training on an evaluation-only dataset.
        FileNotFoundError: ``cfg.data.root`` is missing or holds no data for ``split``.
    """
    name = normalise_dataset_name(cfg.data.dataset)
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset '{cfg.data.dataset}'; choose one of: {', '.join(DATASET_NAMES)}")
    transform = build_transforms(cfg.data, train, short_side=cfg.eval.short_side)
    if name == "synthetic":
        # The split name picks the scenes, so train and val never share images.
        return SyntheticScenes(
            num_images=_SYNTHETIC_LENGTH[train],
            seed=zlib.crc32(split.encode()),
            unseen=cfg.data.unseen,
            transform=transform,
            train=train,
        )
    reader = READERS[name]
    if train and not reader.trainable:
        raise ValueError(
            f"dataset '{name}' is evaluation-only (open-vocabulary transfer); train on another one"
        )
    if not cfg.data.root:
        raise FileNotFoundError(
            f"data.root is empty: set it to the {name} dataset folder (data.root=/path/...)"
        )
    root = Path(cfg.data.root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist (data.root for dataset '{name}')")
    listing = read_listing(name, root, split)
    data_split = make_split(
        listing.class_names, cfg.data.unseen, dataset=name, max_classes=listing.ignore_index
    )
    logger.info(
        "%s/%s: %d images, %d classes (%d unseen)",
        name,
        split,
        len(listing.samples),
        len(listing.class_names),
        len(data_split.unseen),
    )
    return FileDataset(
        listing.samples,
        data_split,
        transform,
        train=train,
        reduce_zero_label=listing.reduce_zero_label,
        palette=listing.palette,
        ignore_index=listing.ignore_index,
    )


def build_eval_dataset(cfg: Config, split: str | None = None) -> SegmentationDataset:
    """The evaluation set: ``data.eval_dataset`` / ``eval_root`` / ``eval_unseen`` when set (cross-dataset
    transfer), otherwise the training dataset's ``val_split``."""
    data = cfg.data
    if data.eval_dataset:
        data = dataclasses.replace(
            data, dataset=data.eval_dataset, root=data.eval_root or "", unseen=data.eval_unseen
        )
    return build_dataset(dataclasses.replace(cfg, data=data), split or data.val_split, train=False)
