"""The training and evaluation pipelines."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision import tv_tensors

from clipzss.config import IMAGENET_MEAN, IMAGENET_STD, DataConfig
from clipzss.data.splits import PAD_INDEX
from clipzss.data.transforms import (
    PhotometricDistortion,
    build_eval_transform,
    build_train_transform,
    build_transforms,
    cat_max_ratio_ok,
    random_crop_box,
)

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _normalised(image_u8: torch.Tensor) -> torch.Tensor:
    return (image_u8.float() / 255 - MEAN) / STD


# ---------------------------------------------------------------------------------------------------- training


@settings(max_examples=25, deadline=None)
@given(
    height=st.integers(6, 70),
    width=st.integers(6, 70),
    crop=st.integers(8, 40),
    scale=st.integers(8, 40),
    num_values=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_train_transform_exact_crop_and_nearest_masks(
    height: int, width: int, crop: int, scale: int, num_values: int, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    values = torch.tensor([3, 7, 11, 42, 255][:num_values])
    mask = values[torch.randint(0, num_values, (height, width), generator=gen)]
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=gen)
    torch.manual_seed(seed)
    out_image, out_mask = build_train_transform(crop_size=crop, scale=scale)(image, mask)
    assert out_image.shape == (3, crop, crop) and out_image.dtype == torch.float32
    assert out_mask.shape == (crop, crop) and out_mask.dtype == torch.int64
    assert type(out_image) is torch.Tensor and type(out_mask) is torch.Tensor
    assert set(out_mask.unique().tolist()) <= set(values.tolist()) | {PAD_INDEX}


def test_train_transform_pads_image_with_zero_and_mask_with_the_pad_value() -> None:
    """Padding is marked -1, not 255: an ignored pixel may get a pseudo label, a padded one never."""
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    mask = torch.randint(0, 4, (20, 30))
    transform = build_train_transform(
        crop_size=48, scale=20, ratio_range=(1.0, 1.0), flip=False, photometric=False
    )
    out_image, out_mask = transform(image, mask)
    assert out_image.shape == (3, 48, 48)
    assert (out_mask[20:] == PAD_INDEX).all() and (out_mask[:, 30:] == PAD_INDEX).all()
    assert PAD_INDEX != 255 and not (out_mask == 255).any()
    assert (out_image[:, 20:] == 0).all() and (out_image[:, :, 30:] == 0).all()
    assert torch.equal(out_mask[:20, :30], mask)  # short side already 20: no resize, whole image kept
    assert torch.allclose(out_image[:, :20, :30], _normalised(image), atol=1e-5)


def test_train_transform_is_seedable() -> None:
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    mask = torch.randint(0, 5, (40, 50))
    transform = build_train_transform(crop_size=24, scale=32)
    torch.manual_seed(3)
    first = transform(image, mask)
    torch.manual_seed(3)
    second = transform(image, mask)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_flip_moves_image_and_mask_together() -> None:
    image = torch.zeros(3, 16, 16, dtype=torch.uint8)
    image[:, :, :4] = 255
    mask = torch.zeros(16, 16, dtype=torch.long)
    mask[:, :4] = 1
    transform = build_train_transform(crop_size=16, scale=16, ratio_range=(1.0, 1.0), photometric=False)
    flipped = 0
    for seed in range(8):
        torch.manual_seed(seed)
        out_image, out_mask = transform(image, mask)
        assert torch.equal(out_image[0] > 0, out_mask == 1)
        flipped += bool(out_mask[0, -1] == 1)
    assert 0 < flipped < 8


def test_cat_max_ratio_ok_hand_cases() -> None:
    assert not cat_max_ratio_ok(torch.zeros(4, 4, dtype=torch.long), 0.75)  # one class only
    half = torch.tensor([[0, 0, 1, 1]])
    assert cat_max_ratio_ok(half, 0.75)
    assert not cat_max_ratio_ok(torch.tensor([[0, 0, 0, 0, 1]]), 0.75)  # 80 %
    assert cat_max_ratio_ok(torch.tensor([[0, 0, 0, 1, 255, 255]]), 0.8)  # ignore does not count: 75 %
    assert not cat_max_ratio_ok(torch.tensor([[0, 0, 0, 1, 255, 255]]), 0.75)


def test_random_crop_box_respects_cat_max_ratio() -> None:
    # 32 x 96 mask: columns < 48 class 0, the rest class 1 then class 2. A 32 x 32 crop at offset x passes
    # (max share < 0.75) for about half of the 65 offsets, so 10 tries almost always find one.
    mask = torch.zeros(32, 96, dtype=torch.long)
    mask[:, 48:72] = 1
    mask[:, 72:] = 2

    def passing(cat_max_ratio: float) -> int:
        accepted = 0
        for seed in range(100):
            torch.manual_seed(seed)
            top, left, height, width = random_crop_box(mask, 32, cat_max_ratio)
            assert (height, width) == (32, 32) and top == 0
            accepted += cat_max_ratio_ok(mask[:, left : left + width], 0.75)
        return accepted

    assert passing(0.75) == 100
    assert passing(1.0) < 75  # the rule off: plain random crops often fail it


def test_photometric_distortion_bounds_and_mask_passthrough() -> None:
    torch.manual_seed(0)
    distort = PhotometricDistortion()
    image = tv_tensors.Image(torch.rand(3, 8, 8))
    mask = tv_tensors.Mask(torch.randint(0, 3, (8, 8)))
    changed = 0
    for _ in range(10):
        out_image, out_mask = distort(image, mask)
        assert out_image.min() >= 0 and out_image.max() <= 1
        assert torch.equal(out_mask, mask)
        changed += not torch.allclose(out_image, image)
    assert changed >= 8  # each of five steps fires with p = 1/2


# ---------------------------------------------------------------------------------------------------- eval


def test_eval_transform_keeps_mask_and_resizes_short_side() -> None:
    image = torch.full((3, 30, 40), 128, dtype=torch.uint8)
    mask = torch.randint(0, 6, (30, 40))
    out_image, out_mask = build_eval_transform(60)(image, mask)
    assert out_image.shape == (3, 60, 80)
    assert torch.equal(out_mask, mask)
    assert torch.allclose(out_image, _normalised(image[:, :1, :1]).expand(3, 60, 80), atol=1e-5)


def test_eval_transform_without_resize_only_normalises() -> None:
    image = torch.randint(0, 256, (3, 9, 7), dtype=torch.uint8)
    mask = torch.randint(0, 6, (9, 7))
    out_image, out_mask = build_eval_transform(None)(image, mask)
    assert torch.allclose(out_image, _normalised(image), atol=1e-5)
    assert torch.equal(out_mask, mask)


def test_build_transforms_uses_the_config() -> None:
    cfg = DataConfig(crop_size=24, scale=16, ratio_range=(1.0, 1.0), flip=False, photometric=False)
    image = torch.randint(0, 256, (3, 16, 20), dtype=torch.uint8)
    mask = torch.randint(0, 3, (16, 20))
    assert build_transforms(cfg, train=True)(image, mask)[0].shape == (3, 24, 24)
    assert build_transforms(cfg, train=False, short_side=32)(image, mask)[0].shape == (3, 32, 40)
