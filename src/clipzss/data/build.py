"""Building the dataset a config names: the reader's listing as a :class:`~clipzss.data.datasets.FileDataset`, or
the synthetic scenes, with the training or evaluation transforms."""

from __future__ import annotations

import dataclasses
import logging
import zlib
from pathlib import Path

from clipzss.config import Config, DataConfig, check_field
from clipzss.data.datasets import FileDataset, SegmentationDataset
from clipzss.data.readers import READERS, normalize_dataset_name, read_listing
from clipzss.data.scenes import SyntheticScenes
from clipzss.data.splits import make_split
from clipzss.data.transforms import build_transforms
from clipzss.errors import UsageError

logger = logging.getLogger(__name__)

DATASET_NAMES: tuple[str, ...] = (*READERS, "synthetic")
_SYNTHETIC_LENGTH = {True: 256, False: 32}


def training_unseen(data: DataConfig) -> list[str] | None:
    """The classes a training set holds out: the configured unseen ones, none under ``data.setting=supervised``
    (every class labelled: the upper bound, still evaluated seen/unseen over the configured split)."""
    check_field(data.setting, "data.setting")
    return [] if data.setting == "supervised" else data.unseen


def build_dataset(cfg: Config, split: str, train: bool) -> SegmentationDataset:
    """The dataset named by ``cfg.data.dataset`` for ``split``, with training or evaluation transforms.

    The split comes from ``cfg.data.unseen`` (None = the dataset's standard split; for training, `training_unseen`).
    Training items have unseen classes set to 255; evaluation items keep every class and have the image resized to
    ``cfg.eval.short_side``.

    Raises:
        ValueError: an unknown dataset name, or training on an evaluation-only dataset.
        FileNotFoundError: ``cfg.data.root`` is missing or holds no data for ``split``.
    """
    name = normalize_dataset_name(cfg.data.dataset)
    if name not in DATASET_NAMES:
        raise UsageError(f"unknown dataset '{cfg.data.dataset}'; choose one of: {', '.join(DATASET_NAMES)}")
    transform = build_transforms(cfg.data, train, short_side=cfg.eval.short_side)
    unseen = training_unseen(cfg.data) if train else cfg.data.unseen
    if name == "synthetic":
        # The split name picks the scenes, so train and val never share images.
        return SyntheticScenes(
            num_images=_SYNTHETIC_LENGTH[train],
            seed=zlib.crc32(split.encode()),
            unseen=unseen,
            transform=transform,
            train=train,
        )
    reader = READERS[name]
    if train and not reader.trainable:
        raise UsageError(
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
    data_split = make_split(listing.class_names, unseen, dataset=name, max_classes=listing.ignore_index)
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
