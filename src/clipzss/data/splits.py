"""Class lists of the benchmark datasets and seen/unseen splits (docs/protocols.md lists both).

The class orders are mmsegmentation's, so label files prepared for mmseg index them directly. The unseen lists are
the standard inductive zero-shot splits (ZS3Net/ZegCLIP); docs/protocols.md tags each with its source.
:func:`relabel_unseen` is the single place where unseen pixels become ``ignore`` (training only): the files on disk
are never rewritten.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from clipzss.data.ade847 import ADE847_CLASSES
from clipzss.errors import UsageError
from clipzss.messages import did_you_mean
from clipzss.names import normalize_class_name, parse_class_names

IGNORE_INDEX = 255
# The ignore value of 16-bit label maps, whose class ids may pass 255 (detectron2's convention for ADE-847 and
# PASCAL Context-459).
WIDE_IGNORE_INDEX = 65535
# The mask value of *void* pixels in training masks: pixels the dataset's own files leave without a label (VOC's
# boundary bands, CamVid's void) and training-crop padding (PadTo). Distinct from IGNORE_INDEX, which in a training
# mask means *unlabelled* content (an unseen class relabelled by `training_mask`): an unlabelled pixel may get a
# pseudo label, a void one never does, and no loss, clustering or pooling reads it.
VOID_INDEX = -1
PAD_INDEX = VOID_INDEX  # padding is void

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

COCO_STUFF_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush", "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet",
    "cage", "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter",
    "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other",
    "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass",
    "gravel", "ground-other", "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss",
    "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform",
    "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf",
    "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw", "structural-other", "table",
    "tent", "textile-other", "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other",
    "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind",
    "window-other", "wood",
)  # fmt: skip

# mmseg's PascalContextDataset59 order (alphabetical, background removed by reduce_zero_label).
CONTEXT59_CLASSES: tuple[str, ...] = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building",
    "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog",
    "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike",
    "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall",
    "water", "window", "wood",
)  # fmt: skip

# mmseg's ADE20KDataset order (mmseg spells index 7 "bed " with a trailing space; stripped here).
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier",
    "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

DATASET_CLASSES: dict[str, tuple[str, ...]] = {
    "voc": VOC_CLASSES,
    "coco-stuff": COCO_STUFF_CLASSES,
    "context": CONTEXT59_CLASSES,
    "ade20k": ADE20K_CLASSES,
    "ade20k-full": ADE847_CLASSES,  # 847 classes, 16-bit labels (ignore WIDE_IGNORE_INDEX); evaluation only
}

# Standard inductive splits. ADE20K has none: it is used for open-vocabulary evaluation only.
# fmt: off
STANDARD_UNSEEN: dict[str, tuple[str, ...]] = {
    "voc": ("pottedplant", "sheep", "sofa", "train", "tvmonitor"),
    "coco-stuff": (
        "cow", "giraffe", "suitcase", "frisbee", "skateboard", "carrot", "scissors", "cardboard", "clouds", "grass",
        "playingfield", "river", "road", "tree", "wall-concrete",
    ),
    "context": ("aeroplane", "bird", "boat", "cat", "cow", "fence", "keyboard", "motorbike", "sofa", "tvmonitor"),
}
# fmt: on


@dataclass(frozen=True)
class Split:
    """A class list and its partition into seen (labelled in training) and unseen ids (sorted, disjoint)."""

    class_names: tuple[str, ...]
    seen: tuple[int, ...]
    unseen: tuple[int, ...]

    def __post_init__(self) -> None:
        ids = sorted(self.seen + self.unseen)
        if ids != list(range(len(self.class_names))):
            raise UsageError(
                f"seen {self.seen} and unseen {self.unseen} must partition the ids 0..{len(self.class_names) - 1}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def seen_names(self) -> tuple[str, ...]:
        return tuple(self.class_names[i] for i in self.seen)

    @property
    def unseen_names(self) -> tuple[str, ...]:
        return tuple(self.class_names[i] for i in self.unseen)


def validate_class_names(class_names: Sequence[str], max_classes: int = IGNORE_INDEX) -> tuple[str, ...]:
    """Check a class list (non-empty, named, unique, fewer ids than the ignore value) and return it stripped.

    Empty and duplicate names are judged by :func:`clipzss.names.parse_class_names`, the one rule for every class
    list (duplicates ignore case and extra whitespace, as CLIP does). ``max_classes`` is the ignore value the labels
    use: :data:`IGNORE_INDEX`, or :data:`WIDE_IGNORE_INDEX` for 16-bit label sets (ADE-847, PC-459).
    """
    if isinstance(class_names, str):
        raise UsageError(f"class_names must be a sequence of names, got the string {class_names!r}")
    names = tuple(class_names)
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise UsageError(f"class name at index {i} is not a string: {name!r}")
    names = tuple(parse_class_names(names))
    if len(names) > max_classes:
        raise UsageError(
            f"{len(names)} classes do not fit: ids must stay below the ignore index {max_classes}"
        )
    return names


def make_split(
    class_names: Sequence[str],
    unseen_names: Sequence[str] | None,
    dataset: str | None = None,
    max_classes: int = IGNORE_INDEX,
) -> Split:
    """Build a validated :class:`Split` from class names and the names held out as unseen.

    Args:
        class_names: all classes, in label-id order.
        unseen_names: names to hold out; ``None`` takes the standard split of ``dataset`` (none if it has no
            standard split); ``[]`` means fully supervised.
        dataset: a key of :data:`STANDARD_UNSEEN`, consulted only when ``unseen_names`` is None.
        max_classes: the labels' ignore value (:data:`IGNORE_INDEX`; :data:`WIDE_IGNORE_INDEX` for 16-bit label sets).
    """
    names = validate_class_names(class_names, max_classes)
    if unseen_names is None:
        unseen_names = STANDARD_UNSEEN.get(dataset, ()) if dataset is not None else ()
    if isinstance(unseen_names, str):
        raise UsageError(f"unseen names must be a list of class names, got the string {unseen_names!r}")
    index = {normalize_class_name(n): i for i, n in enumerate(names)}
    unseen: list[int] = []
    for name in unseen_names:
        if not isinstance(name, str) or normalize_class_name(name) not in index:
            hint = did_you_mean(str(name), names)
            hint = f"; {hint}" if hint else ""
            raise UsageError(f"unseen class '{name}' is not in the class list{hint}")
        i = index[normalize_class_name(name)]
        if i in unseen:
            raise UsageError(f"unseen class '{name}' is listed twice")
        unseen.append(i)
    if len(unseen) == len(names):
        raise UsageError("every class is unseen; at least one class must stay seen for training")
    unseen_set = set(unseen)
    seen = tuple(i for i in range(len(names)) if i not in unseen_set)
    return Split(class_names=names, seen=seen, unseen=tuple(sorted(unseen)))


def relabel_unseen(mask: torch.Tensor, split: Split) -> torch.Tensor:
    """Return a copy of ``mask`` with every unseen class id set to 255 (ignore); the training-only relabelling."""
    out = mask.clone()
    if split.unseen:
        unseen = torch.tensor(split.unseen, dtype=mask.dtype, device=mask.device)
        out[torch.isin(mask, unseen)] = IGNORE_INDEX
    return out


def training_mask(mask: torch.Tensor, split: Split, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The training form of a class-id mask: void (``ignore_index`` in the files) → VOID_INDEX, unseen → 255.

    The one place where a training mask is made: it keeps the dataset's own void apart from the unlabelled area
    that the unseen classes leave, which pseudo labels fill.
    """
    void = mask == ignore_index
    out = relabel_unseen(mask, split)
    return out.masked_fill(void, VOID_INDEX)


def seen_lookup(split: Split) -> torch.Tensor:
    """A (256,) int64 table mapping a class id to its index among the seen classes (255 for unseen and ignore).

    ``seen_lookup(split)[mask]`` turns a training mask into the seen-class label space of the text classifier.
    """
    table = torch.full((IGNORE_INDEX + 1,), IGNORE_INDEX, dtype=torch.long)
    table[list(split.seen)] = torch.arange(len(split.seen))
    return table
