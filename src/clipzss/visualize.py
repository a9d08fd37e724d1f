"""Colours, masks and overlays with a legend: numpy and PIL only, so torch-free paths (ONNX prediction) share them.

The demo, the reports and `clipzss predict` (torch or ONNX) draw with them, so a class has the same colour in every
picture the package makes.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def palette(num_classes: int) -> np.ndarray:
    """Distinct, deterministic colours: hues spaced by the golden ratio, alternating lightness."""
    colours = []
    for i in range(num_classes):
        hue = (i * 0.618033988749895) % 1.0
        light = 0.5 if i % 2 == 0 else 0.38
        colours.append([round(255 * c) for c in colorsys.hls_to_rgb(hue, light, 0.85)])
    return np.asarray(colours, dtype=np.uint8).reshape(-1, 3)


def colorize(mask: np.ndarray, num_classes: int) -> Image.Image:
    """(H, W) ids → RGB image in `palette` colours, for any number of classes; ids outside [0, K) are black.

    Ids are never clipped to 255: beyond 256 classes every id keeps its own colour, the one the legend shows.
    """
    mask = np.asarray(mask)
    black = max(num_classes, 0)  # one row past the palette: ignore (255 or 65535) and out-of-range ids
    lut = np.zeros((black + 1, 3), dtype=np.uint8)
    lut[:num_classes] = palette(num_classes)
    ids = np.where((mask >= 0) & (mask < num_classes), mask, black).astype(np.intp)
    return Image.fromarray(lut[ids])


def mask_image(mask: np.ndarray, num_classes: int) -> Image.Image:
    """(H, W) ids → a PNG-ready image whose pixel values are the class ids themselves.

    Up to 256 classes: a palette ("P") image, ids as pixel values and colours for people. Beyond that a palette
    cannot hold the ids, so it is a 16-bit grey image: ids are never clipped or wrapped around.
    """
    if num_classes > 256:
        return Image.fromarray(mask.astype(np.uint16))
    image = Image.fromarray(np.clip(mask, 0, 255).astype(np.uint8))  # mode L; putpalette turns it into P
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:num_classes] = palette(num_classes)[:256]
    image.putpalette(lut.reshape(-1).tolist())
    return image


def class_areas(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """(K,) fraction of the mask's pixels given to each class id (ignore and out-of-range ids count for none)."""
    counts = np.bincount(mask.reshape(-1).clip(0, num_classes), minlength=num_classes + 1)[:num_classes]
    return counts / max(mask.size, 1)


def blend(image: Image.Image, mask: np.ndarray, num_classes: int, opacity: float = 0.5) -> Image.Image:
    """The coloured mask blended over the photo, at the photo's size (no legend)."""
    image = image.convert("RGB")
    coloured = colorize(mask, num_classes).resize(image.size, Image.NEAREST)
    return Image.blend(image, coloured, opacity)


def overlay(
    image: Image.Image, mask: np.ndarray, class_names: Sequence[str], opacity: float = 0.5
) -> Image.Image:
    """Blend the coloured mask over the photo and add a legend of the classes present with their area."""
    image = image.convert("RGB")
    blended = blend(image, mask, len(class_names), opacity)
    shares = class_areas(mask, len(class_names))
    present = sorted(((i, float(s)) for i, s in enumerate(shares) if s > 0), key=lambda item: -item[1])
    font_size = max(12, image.height // 30)
    font = ImageFont.load_default(size=font_size)
    row = font_size + 8
    width = max(
        160, max((int(font.getlength(f"{class_names[i]} 100.0%")) for i, _ in present), default=0) + 40
    )
    legend_h = max(image.height, row * len(present) + 16)
    canvas = Image.new("RGB", (image.width + width, legend_h), "white")
    canvas.paste(blended, (0, 0))
    draw = ImageDraw.Draw(canvas)
    colours = palette(len(class_names))
    for n, (i, share) in enumerate(present):
        y = 8 + n * row
        x = image.width + 8
        draw.rectangle(
            [x, y, x + font_size, y + font_size], fill=tuple(int(c) for c in colours[i]), outline="black"
        )
        draw.text((x + font_size + 8, y), f"{class_names[i]} {100 * share:.1f}%", fill="black", font=font)
    return canvas
