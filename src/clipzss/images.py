"""Reading images: any file, array or PIL image becomes upright 8-bit RGB, the one rule for every path.

Numpy and PIL only, so the datasets, the ONNX runner and the demo share it with the torch paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps

from clipzss.errors import UsageError

# Files taken as images wherever a folder is read: datasets, the demo's examples, the inspector.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


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
        raise UsageError(f"cannot read image {source}: {err}") from None


def as_rgb(image: ImageLike) -> Image.Image:
    """An upright 8-bit RGB PIL image from a path, a PIL image or an (H, W), (H, W, 3) or (H, W, 4) array."""
    if isinstance(image, str | Path):
        return load_image(image)
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        if image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise UsageError(f"expected an (H, W, 3) image array, got shape {tuple(image.shape)}")
        return Image.fromarray(np.ascontiguousarray(image[..., :3]).astype(np.uint8))
    if isinstance(image, Image.Image):
        return to_rgb(image)
    raise TypeError(f"cannot read an image from {type(image).__name__}")
