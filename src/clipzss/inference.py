"""How an image is read, sized and windowed for inference: the one rule for eval, predict, reports, demo and ONNX.

Everything here needs only numpy and PIL, so the onnxruntime runner (`clipzss.onnx_runner.OnnxSegmenter`) shares it
with the torch paths and a mask from `clipzss predict` is the mask `clipzss eval` scored:

- `load_image` / `as_rgb`: any file, array or PIL image → upright 8-bit RGB;
- `inference_size`: mmseg's keep-ratio test rescale (short side to ``short_side``, long side capped at 4× that);
- `preprocess`: resize with PIL's bilinear filter on the 8-bit image (mmseg resizes the 8-bit image too, with
  cv2's bilinear filter, which does not antialias when shrinking; PIL does), then normalise with ImageNet
  statistics;
- `sliding_windows`: mmseg's slide grid; `MODES` are the two test modes (whole, slide).

The torch side (running the network over the windows) is `clipzss.evaluate.window_logits`; the labels at the
original size come from `clipzss.label_maps` (torch and numpy alike).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps

from clipzss.config import IMAGENET_MEAN, IMAGENET_STD

# Files taken as images wherever a folder is read: datasets, the demo's examples, the inspector.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# mmseg's test img_scale (2048, 512): the long side may reach 4× the short-side scale.
LONG_SIDE_FACTOR = 4
MODES = ("slide", "whole")

ImageLike = str | Path | Image.Image | np.ndarray

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F, ...) to 8-bit RGB.

    Integer modes wider than 8 bits are taken as 16-bit data and scaled (65535 → 255) rather than clipped, which is
    what PIL's own ``convert`` would do; alpha is dropped.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and np.nanmax(values) <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.clip(np.nan_to_num(np.rint(values)), 0, 255).astype(np.uint8)).convert(
            "RGB"
        )
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL asks palette images with transparency to go through RGBA
    return image.convert("RGB")


def image_paths(paths: Sequence[str | Path]) -> list[Path]:
    """The images that command-line inputs name: a file is itself, a folder is its images (sorted, not recursive);
    a file named twice (or also inside a folder given) is listed once.

    Raises:
        FileNotFoundError: a path that does not exist, or a folder without images (the message names it).
    """
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise FileNotFoundError(
                    f"no images found in {path} (expected {', '.join('*' + s for s in IMAGE_SUFFIXES)})"
                )
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"image not found: {path}")
    unique: dict[Path, Path] = {}
    for file in files:
        unique.setdefault(file.resolve(), file)
    return list(unique.values())


def load_image(source: str | Path | IO[bytes], exif_transpose: bool = True) -> Image.Image:
    """Open an image file as 8-bit RGB, upright according to its EXIF orientation.

    Raises:
        FileNotFoundError: there is no file at ``source``.
        ValueError: the file is not a readable image (the message names it).
    """
    if isinstance(source, str | Path) and not Path(source).is_file():
        raise FileNotFoundError(f"image not found: {source}")
    try:
        with Image.open(source) as image:
            image.load()
            if exif_transpose:
                image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {source}: {err}") from None


def as_rgb(image: ImageLike) -> Image.Image:
    """An upright 8-bit RGB PIL image from a path, a PIL image or an (H, W), (H, W, 3) or (H, W, 4) array."""
    if isinstance(image, str | Path):
        return load_image(image)
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        if image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise ValueError(f"expected an (H, W, 3) image array, got shape {tuple(image.shape)}")
        return Image.fromarray(np.ascontiguousarray(image[..., :3]).astype(np.uint8))
    if isinstance(image, Image.Image):
        return to_rgb(image)
    raise TypeError(f"cannot read an image from {type(image).__name__}")


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

    A lookup of each byte's value (`_normalize_plain` of 0..255): the same bits as the arithmetic, one pass
    instead of four (2.5 vs 7.3 ms for a 512×683 image), which counts against the 5 % predict may cost beyond
    the student.
    """
    x = np.asarray(image, dtype=np.uint8)
    out = np.empty((3, *x.shape[:2]), dtype=np.float32)
    for c in range(3):
        np.take(_NORMALIZED[c], x[..., c], out=out[c])
    return out


def preprocess(image: Image.Image, short_side: int | None) -> np.ndarray:
    """RGB image → (3, h, w) float32 network input at `inference_size` (the one preprocessing of every path)."""
    return normalize(resize_image(image, inference_size(image.height, image.width, short_side)))


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown inference mode '{mode}'; choose one of: {', '.join(MODES)}")
    return mode


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
        raise ValueError(f"crop_size {crop_size} and stride {stride} must be positive")
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
