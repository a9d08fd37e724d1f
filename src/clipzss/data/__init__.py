"""Datasets, seen/unseen splits and transforms.

Where each concept lives: :mod:`~clipzss.data.splits` (class lists, splits, the ignore values),
:mod:`~clipzss.data.masks` (label files → class ids, palettes), :mod:`~clipzss.data.readers` (each layout's
files), :mod:`~clipzss.data.datasets` (the dataset classes), :mod:`~clipzss.data.scenes` (synthetic scenes),
:mod:`~clipzss.data.build` (the dataset a config names), :mod:`~clipzss.data.transforms`; the data commands'
libraries are :mod:`~clipzss.data.prepare` (``prepare-data``) and :mod:`~clipzss.data.doctor` (``check-data``).
"""

from clipzss.data.build import DATASET_NAMES, build_dataset, build_eval_dataset
from clipzss.data.datasets import FileDataset, SegmentationDataset
from clipzss.data.masks import Palette, read_palette
from clipzss.data.readers import EXPECTED_IMAGES, Listing, Sample, read_listing
from clipzss.data.scenes import SYNTHETIC_CLASSES, SyntheticScenes
from clipzss.data.splits import (
    DATASET_CLASSES,
    IGNORE_INDEX,
    PAD_INDEX,
    STANDARD_UNSEEN,
    VOID_INDEX,
    WIDE_IGNORE_INDEX,
    Split,
    make_split,
    relabel_unseen,
    seen_lookup,
    training_mask,
)
from clipzss.data.transforms import build_eval_transform, build_train_transform, build_transforms

__all__ = [
    "DATASET_CLASSES",
    "DATASET_NAMES",
    "EXPECTED_IMAGES",
    "IGNORE_INDEX",
    "PAD_INDEX",
    "STANDARD_UNSEEN",
    "SYNTHETIC_CLASSES",
    "VOID_INDEX",
    "WIDE_IGNORE_INDEX",
    "FileDataset",
    "Listing",
    "Palette",
    "Sample",
    "SegmentationDataset",
    "Split",
    "SyntheticScenes",
    "build_dataset",
    "build_eval_dataset",
    "build_eval_transform",
    "build_train_transform",
    "build_transforms",
    "make_split",
    "read_listing",
    "read_palette",
    "relabel_unseen",
    "seen_lookup",
    "training_mask",
]
