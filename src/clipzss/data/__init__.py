"""Datasets, seen/unseen splits and transforms (DESIGN.md §3)."""

from clipzss.data.datasets import (
    DATASET_NAMES,
    SYNTHETIC_CLASSES,
    FileDataset,
    Sample,
    SegmentationDataset,
    SyntheticScenes,
    build_dataset,
    build_eval_dataset,
)
from clipzss.data.splits import (
    DATASET_CLASSES,
    IGNORE_INDEX,
    STANDARD_UNSEEN,
    Split,
    make_split,
    relabel_unseen,
    seen_lookup,
)
from clipzss.data.transforms import build_eval_transform, build_train_transform, build_transforms, load_image

__all__ = [
    "DATASET_CLASSES",
    "DATASET_NAMES",
    "IGNORE_INDEX",
    "STANDARD_UNSEEN",
    "SYNTHETIC_CLASSES",
    "FileDataset",
    "Sample",
    "SegmentationDataset",
    "Split",
    "SyntheticScenes",
    "build_dataset",
    "build_eval_dataset",
    "build_eval_transform",
    "build_train_transform",
    "build_transforms",
    "load_image",
    "make_split",
    "relabel_unseen",
    "seen_lookup",
]
