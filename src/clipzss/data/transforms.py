"""The mmseg-style training pipeline on torchvision.transforms.v2, and the evaluation pipeline.

Images travel as ``tv_tensors.Image`` and label maps as ``tv_tensors.Mask``, so torchvision's dispatch resizes masks
with nearest-neighbour only: a label map never gains a value it did not have. All randomness comes from torch's
global RNG (seed it with ``torch.manual_seed``; DataLoader workers get distinct seeds).

Training (mmseg's ZegCLIP/SegFormer pipeline): random rescale with ``img_scale = (4·scale, scale)`` and a ratio in
``ratio_range`` → random crop with the ``cat_max_ratio`` rule → horizontal flip → photometric distortion →
normalise → pad to the crop size (image 0 after normalisation, i.e. the mean colour, as mmseg does; mask
``PAD_INDEX`` = -1, not 255, so the trainer can tell padding from unlabelled image content).
Evaluation: `clipzss.inference.inputs.preprocess` (the resize rule and normalisation every inference path shares); the
mask keeps its original resolution because the evaluator upsamples logits to it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from clipzss.config import IMAGENET_MEAN, IMAGENET_STD, DataConfig
from clipzss.data.splits import IGNORE_INDEX, PAD_INDEX
from clipzss.images import to_rgb
from clipzss.inference.inputs import LONG_SIDE_FACTOR, preprocess, rescale_size

logger = logging.getLogger(__name__)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a (3, H, W) uint8 tensor."""
    array = np.asarray(to_rgb(image), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _image_of(flat_inputs: Sequence[Any]) -> torch.Tensor:
    for item in flat_inputs:
        if isinstance(item, tv_tensors.Image):
            return item
    raise TypeError("this transform needs a tv_tensors.Image among its inputs")


def _mask_of(flat_inputs: Sequence[Any]) -> torch.Tensor:
    for item in flat_inputs:
        if isinstance(item, tv_tensors.Mask):
            return item
    raise TypeError("this transform needs a tv_tensors.Mask among its inputs")


class RandomRescale(v2.Transform):
    """Rescale (keeping the aspect) to mmseg's ``img_scale = (long_factor·scale, scale)`` × r, r ~ U(ratio_range)."""

    def __init__(
        self, scale: int, ratio_range: tuple[float, float], long_factor: int = LONG_SIDE_FACTOR
    ) -> None:
        super().__init__()
        self.scale = scale
        self.ratio_range = ratio_range
        self.long_factor = long_factor

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = _image_of(flat_inputs).shape[-2:]
        low, high = self.ratio_range
        ratio = low + (high - low) * torch.rand(()).item()
        short = self.scale * ratio
        return {"size": list(rescale_size(height, width, short, short * self.long_factor))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.resize(inpt, params["size"], antialias=True)  # masks dispatch to nearest


def cat_max_ratio_ok(mask: torch.Tensor, cat_max_ratio: float, ignore_index: int = IGNORE_INDEX) -> bool:
    """mmseg's crop acceptance: at least two labelled classes, none above ``cat_max_ratio`` of the labelled pixels.

    Unlabelled (``ignore_index``) and void (negative) pixels are not labelled, as for mmseg, whose masks have 255
    for both."""
    _, counts = torch.unique(mask[(mask != ignore_index) & (mask >= 0)], return_counts=True)
    return len(counts) > 1 and counts.max().item() / counts.sum().item() < cat_max_ratio


def random_crop_box(
    mask: torch.Tensor, crop_size: int, cat_max_ratio: float = 1.0, max_tries: int = 10
) -> tuple[int, int, int, int]:
    """Pick ``(top, left, height, width)`` of a random crop, retried up to ``max_tries`` times for cat_max_ratio.

    A crop larger than the mask is clipped to it (the pad step restores the size). If no try passes, the last one
    is used, as in mmseg; ``cat_max_ratio >= 1`` disables the rule.
    """
    height, width = mask.shape[-2:]
    crop_h, crop_w = min(crop_size, height), min(crop_size, width)

    def draw() -> tuple[int, int, int, int]:
        top = int(torch.randint(0, height - crop_h + 1, ()).item())
        left = int(torch.randint(0, width - crop_w + 1, ()).item())
        return top, left, crop_h, crop_w

    box = draw()
    if cat_max_ratio >= 1.0:
        return box
    for _ in range(max_tries - 1):
        top, left, h, w = box
        if cat_max_ratio_ok(mask[..., top : top + h, left : left + w], cat_max_ratio):
            break
        box = draw()
    return box


class RandomCropCatMax(v2.Transform):
    """Random crop of ``crop_size`` that avoids crops dominated by one class (mmseg's ``cat_max_ratio``)."""

    def __init__(self, crop_size: int, cat_max_ratio: float = 0.75, max_tries: int = 10) -> None:
        super().__init__()
        self.crop_size = crop_size
        self.cat_max_ratio = cat_max_ratio
        self.max_tries = max_tries

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        box = random_crop_box(_mask_of(flat_inputs), self.crop_size, self.cat_max_ratio, self.max_tries)
        return {"box": box}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        top, left, height, width = params["box"]
        return F.crop(inpt, top, left, height, width)


class PadTo(v2.Transform):
    """Pad bottom/right up to ``size`` × ``size``: images with ``image_fill``, masks with ``PAD_INDEX``.

    Padding is marked apart from the ignore label: padded pixels must never receive pseudo labels, enter GLM's
    pooling or region means, or count in any loss (masks with 255 there made padding a pseudo class).
    """

    def __init__(self, size: int, image_fill: float = 0.0, mask_fill: int = PAD_INDEX) -> None:
        super().__init__()
        self.size = size
        self.image_fill = image_fill
        self.mask_fill = mask_fill

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        height, width = inpt.shape[-2:]
        bottom, right = max(self.size - height, 0), max(self.size - width, 0)
        if not bottom and not right:
            return inpt
        fill = self.mask_fill if isinstance(inpt, tv_tensors.Mask) else self.image_fill
        return F.pad(inpt, [0, 0, right, bottom], fill=fill)


class PhotometricDistortion(v2.Transform):
    """mmseg's PhotoMetricDistortion on float images in [0, 1]; each step with probability 1/2.

    Additive brightness (±32/255), multiplicative contrast (×U(0.5, 1.5)) before or after the colour steps,
    saturation (×U(0.5, 1.5)) and hue (±18/180 of a turn, mmseg's OpenCV units). Masks pass through.
    """

    def __init__(
        self,
        brightness_delta: float = 32 / 255,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: float = 18 / 180,
    ) -> None:
        super().__init__()
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta

    @staticmethod
    def _uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand(()).item()

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        coin = (torch.rand(5) < 0.5).tolist()
        return {
            "brightness": self._uniform(-self.brightness_delta, self.brightness_delta) if coin[0] else None,
            "contrast": self._uniform(*self.contrast_range) if coin[1] else None,
            "contrast_first": coin[2],
            "saturation": self._uniform(*self.saturation_range) if coin[3] else None,
            "hue": self._uniform(-self.hue_delta, self.hue_delta) if coin[4] else None,
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        if not inpt.is_floating_point():
            raise TypeError("PhotometricDistortion expects a float image in [0, 1]; put ToDtype before it")
        image = inpt
        if params["brightness"] is not None:
            image = (image + params["brightness"]).clamp(0, 1)
        if params["contrast"] is not None and params["contrast_first"]:
            image = (image * params["contrast"]).clamp(0, 1)
        if params["saturation"] is not None:
            image = F.adjust_saturation(image, params["saturation"])
        if params["hue"] is not None:
            image = F.adjust_hue(image, params["hue"])
        if params["contrast"] is not None and not params["contrast_first"]:
            image = (image * params["contrast"]).clamp(0, 1)
        return tv_tensors.wrap(image, like=inpt)


class SegTransform:
    """A v2 pipeline applied jointly to a (3, H, W) uint8 image and an (H, W) int64 mask; returns plain tensors."""

    def __init__(self, transforms: Sequence[v2.Transform]) -> None:
        self.pipeline = v2.Compose(list(transforms))

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_image, out_mask = self.pipeline(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return out_image.as_subclass(torch.Tensor), out_mask.as_subclass(torch.Tensor).long()

    def __repr__(self) -> str:
        return f"SegTransform({self.pipeline})"


def _to_float() -> v2.Transform:
    # Images to float in [0, 1]; masks keep their integer dtype.
    return v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)


def build_train_transform(
    crop_size: int = 512,
    scale: int = 512,
    ratio_range: tuple[float, float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    *,
    flip: bool = True,
    photometric: bool = True,
) -> SegTransform:
    """The training pipeline: rescale, cat_max_ratio crop, flip, photometric distortion, normalise, pad."""
    steps: list[v2.Transform] = [
        RandomRescale(scale, ratio_range),
        RandomCropCatMax(crop_size, cat_max_ratio),
    ]
    if flip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    steps.append(_to_float())
    if photometric:
        steps.append(PhotometricDistortion())
    steps += [v2.Normalize(IMAGENET_MEAN, IMAGENET_STD), PadTo(crop_size)]
    return SegTransform(steps)


class EvalTransform:
    """The evaluation pipeline: `clipzss.inference.inputs.preprocess` on the image (the rule every inference path uses),
    the mask untouched at its own resolution, so scores are computed where the labels are."""

    def __init__(self, short_side: int | None = 512) -> None:
        self.short_side = short_side

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rgb = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())  # (3, H, W) uint8 → PIL RGB
        return torch.from_numpy(preprocess(rgb, self.short_side)), mask.long()

    def __repr__(self) -> str:
        return f"EvalTransform(short_side={self.short_side})"


def build_eval_transform(short_side: int | None = 512) -> EvalTransform:
    """The evaluation pipeline: resize the image (short side ``short_side``; None keeps it), normalise."""
    return EvalTransform(short_side)


def build_transforms(
    data_cfg: DataConfig, train: bool, short_side: int | None = 512
) -> SegTransform | EvalTransform:
    """The training pipeline from ``data_cfg`` when ``train``, else the evaluation one at ``short_side``."""
    if train:
        return build_train_transform(
            crop_size=data_cfg.crop_size,
            scale=data_cfg.scale,
            ratio_range=tuple(data_cfg.ratio_range),
            cat_max_ratio=data_cfg.cat_max_ratio,
            flip=data_cfg.flip,
            photometric=data_cfg.photometric,
        )
    return build_eval_transform(short_side)
