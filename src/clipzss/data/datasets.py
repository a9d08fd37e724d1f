"""The dataset classes: the base class every dataset shares and the one that reads image/label file pairs.

Every dataset yields ``{"image": (3, H, W) float32 normalised, "mask": (H, W) int64 with 255 = ignore,
"name": str}`` and carries its ``class_names`` and :class:`~clipzss.data.splits.Split`. Masks are read as class
ids (after each layout's reduce-zero-label rule, :func:`~clipzss.data.masks.class_ids`); with ``train=True``
:func:`~clipzss.data.splits.training_mask`, the one place that happens, turns the unseen classes into 255
(unlabelled) and the files' own ignore pixels into ``VOID_INDEX`` (-1, as crop padding is). Bad
files fail when read, with the file named; a missing mask fails when the dataset is built.

Where the files are comes from :mod:`clipzss.data.readers`, how labels decode from :mod:`clipzss.data.masks`, the
synthetic scenes from :mod:`clipzss.data.scenes`, and building a dataset from a config from
:mod:`clipzss.data.build`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from clipzss.data.masks import Palette, class_ids, load_mask
from clipzss.data.readers import Sample, read_classes_txt
from clipzss.data.splits import IGNORE_INDEX, Split, training_mask
from clipzss.data.transforms import EvalTransform, SegTransform, build_eval_transform, pil_to_tensor
from clipzss.errors import UsageError
from clipzss.images import to_rgb

# Still imported from here by modules outside clipzss.data (their new homes are clipzss.data.masks / .readers).
__all__ = ["FileDataset", "SegmentationDataset", "load_mask", "read_classes_txt"]


class SegmentationDataset(Dataset):
    """Base class: a class list with its split, a joint transform, and the training-only unseen relabelling.

    Subclasses implement :meth:`load` (class-id image and mask, untransformed) and ``__len__``.
    """

    ignore_index: int = IGNORE_INDEX  # the mask value that means "no label"; 65535 for 16-bit label sets

    def __init__(
        self, split: Split, transform: SegTransform | EvalTransform | None = None, train: bool = False
    ) -> None:
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
            mask = training_mask(mask, self.split, self.ignore_index)
        image, mask = self.transform(image, mask)
        return {"image": image, "mask": mask, "name": name}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self)} images, {self.split.num_classes} classes, "
            f"{len(self.unseen)} unseen, train={self.train})"
        )


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
        raise UsageError(f"cannot read image {path}: {err}") from None
    if (image.height, image.width) != size_hw:
        raise UsageError(
            f"image {path} is {image.height}x{image.width} but its mask is {size_hw[0]}x{size_hw[1]} (H x W)"
        )
    return image


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
            raise UsageError(
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
