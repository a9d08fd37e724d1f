"""How an image is sized and windowed for inference: the one rule for eval, predict, reports, demo and ONNX.

Everything here needs only numpy and PIL, so the onnxruntime runner (`clipzss.inference.onnx_runner`) shares it
with the torch paths, and a mask from `clipzss predict` is the mask `clipzss eval` scored (reading an image into
8-bit RGB is `clipzss.images`):

- `inference_size`: mmseg's keep-ratio test rescale (short side to ``short_side``, long side capped at 4× that);
- `preprocess`: resize with PIL's bilinear filter on the 8-bit image (mmseg resizes the 8-bit image too, with
  cv2's bilinear filter, which does not antialias when shrinking; PIL does), then normalise with ImageNet
  statistics;
- `sliding_windows`: mmseg's slide grid (``eval.mode`` slide; whole runs the image at once).

The torch side (running the network over the windows) is `clipzss.inference.windows`; the labels at the original
size come from `clipzss.inference.label_maps` (torch and numpy alike).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from clipzss.config import IMAGENET_MEAN, IMAGENET_STD
from clipzss.errors import UsageError

# mmseg's test img_scale (2048, 512): the long side may reach 4× the short-side scale.
LONG_SIDE_FACTOR = 4


def rescale_size(height: int, width: int, short: float, long: float) -> tuple[int, int]:
    """mmseg's keep-ratio rescale: the largest size with short side ≤ ``short`` and long side ≤ ``long``."""
    factor = min(long / max(height, width), short / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def inference_size(height: int, width: int, short_side: int | None) -> tuple[int, int]:
    """The size the network sees at test time: mmseg's ``Resize(scale=(4·s, s), keep_ratio=True)``; None keeps it."""
    if not short_side:
        return height, width
    return rescale_size(height, width, short_side, short_side * LONG_SIDE_FACTOR)


def resize_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """An RGB image at ``size`` = (height, width), bilinear (antialiased when shrinking); the same size is a no-op."""
    if (image.height, image.width) == tuple(size):
        return image
    return image.resize((size[1], size[0]), Image.BILINEAR)


def _normalize_plain(image: Image.Image | np.ndarray) -> np.ndarray:
    """`normalize` written as its definition: ((x / 255) − mean) / std in float32, per channel."""
    x = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray((x - mean) / std)


# `_normalize_plain` of every 8-bit value, per channel: (3, 256) float32, the same float32 operations.
_NORMALIZED = _normalize_plain(np.arange(256, dtype=np.uint8).reshape(1, 256, 1).repeat(3, axis=2))[:, 0]


def normalize(image: Image.Image | np.ndarray) -> np.ndarray:
    """8-bit RGB (H, W, 3) → (3, H, W) float32 with ImageNet statistics, the students' input convention.

    A lookup of each byte's value (`_normalize_plain` of 0..255): the same bits as the arithmetic in one pass
    instead of four, which counts against what predict may cost beyond the student (benchmarks/README.md).
    """
    x = np.asarray(image, dtype=np.uint8)
    out = np.empty((3, *x.shape[:2]), dtype=np.float32)
    for c in range(3):
        np.take(_NORMALIZED[c], x[..., c], out=out[c])
    return out


def preprocess(image: Image.Image, short_side: int | None) -> np.ndarray:
    """RGB image → (3, h, w) float32 network input at `inference_size` (the one preprocessing of every path)."""
    return normalize(resize_image(image, inference_size(image.height, image.width, short_side)))


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int | np.integer) else (int(value[0]), int(value[1]))


def sliding_windows(
    height: int, width: int, crop_size: int | Sequence[int], stride: int | Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """mmseg's slide grid as ``(y1, y2, x1, x2)`` windows.

    ceil((H - crop) / stride) + 1 rows (likewise columns); the last window is shifted back to end at the border
    and windows are clipped to the image when it is smaller than the crop, so every window has the same size
    ``(min(crop_h, H), min(crop_w, W))`` and every pixel is covered.
    """
    (crop_h, crop_w), (stride_h, stride_w) = _pair(crop_size), _pair(stride)
    if min(crop_h, crop_w, stride_h, stride_w) < 1:
        raise UsageError(f"crop_size {crop_size} and stride {stride} must be positive")
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    windows = []
    for r in range(rows):
        y2 = min(r * stride_h + crop_h, height)
        y1 = max(y2 - crop_h, 0)
        for c in range(cols):
            x2 = min(c * stride_w + crop_w, width)
            x1 = max(x2 - crop_w, 0)
            windows.append((y1, y2, x1, x2))
    return windows
