"""Colours, masks and overlays with a legend: numpy and PIL only, so torch-free paths (ONNX prediction) share them.

The demo, the reports and `clipzss predict` (torch or ONNX) draw with them, so a class has the same colour in every
picture the package makes.

Legend text is drawn in the first font that has a glyph for every character of the name: DejaVu Sans (shipped with
matplotlib, a dependency: Latin, Greek, Cyrillic, Hebrew, Arabic, ...), then the CJK fonts a system may have
(Debian's ``fonts-noto-cjk``, ``fonts-wqy-*``, ``fonts-droid-fallback``). A name no font covers is never drawn as
boxes: its row shows the class id (``#3``) instead, and a warning names the name and the font package to install.
"""

from __future__ import annotations

import colorsys
import functools
import importlib.util
import logging
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

# Fonts tried for legend text, in order; missing files are skipped.
SYSTEM_FONTS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJKsc-Regular.otf",
    "/usr/share/fonts/truetype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/usr/share/fonts/truetype/arphic/uming.ttc",
)


def _matplotlib_font() -> str | None:
    """matplotlib's DejaVu Sans, found without importing matplotlib."""
    spec = importlib.util.find_spec("matplotlib")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if path.is_file():
            return str(path)
    return None


def font_candidates() -> list[str]:
    """The legend's font files present here, in the order they are tried."""
    found = [_matplotlib_font(), *SYSTEM_FONTS]
    return list(dict.fromkeys(p for p in found if p and Path(p).is_file()))


@functools.lru_cache(maxsize=16)
def _coverage(path: str) -> frozenset[int]:
    """The code points `path` has glyphs for (empty when the file cannot be read)."""
    try:
        from fontTools.ttLib import TTFont  # matplotlib's dependency

        with TTFont(path, fontNumber=0, lazy=True) as font:
            return frozenset(font.getBestCmap() or {})
    except Exception:  # a font that cannot be read is skipped, never fatal for a picture
        return frozenset()


@functools.lru_cache(maxsize=64)
def _truetype(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def font_for(text: str, size: int) -> ImageFont.FreeTypeFont | None:
    """The first candidate font with a glyph for every visible character of ``text``; None when none has."""
    needed = {ord(c) for c in text if not c.isspace() and unicodedata.category(c) not in ("Cf", "Mn")}
    for path in font_candidates():
        if needed <= _coverage(path):
            return _truetype(path, size)
    return None


_warned: set[str] = set()


def legend_label(
    index: int, name: str, size: int
) -> tuple[str, ImageFont.ImageFont | ImageFont.FreeTypeFont]:
    """The text and font of a legend row: the name, or ``#index`` when no font here can draw it (warned once)."""
    font = font_for(name, size)
    if font is not None:
        return name, font
    if name not in _warned:
        _warned.add(name)
        logger.warning(
            "no font here has glyphs for the class name %r: its legend row shows #%d instead (install a font "
            "that covers it, e.g. Debian's fonts-noto-cjk for Chinese, Japanese and Korean)",
            name,
            index,
        )
    fallback = font_for(f"#{index}", size)
    return f"#{index}", fallback if fallback is not None else ImageFont.load_default(size=size)


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
    labels = {i: legend_label(i, class_names[i], font_size) for i, _ in present}
    row = font_size + 8
    width = max(
        160, max((int(font.getlength(f"{text} 100.0%")) for text, font in labels.values()), default=0) + 40
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
        text, font = labels[i]
        draw.text((x + font_size + 8, y), f"{text} {100 * share:.1f}%", fill="black", font=font)
    return canvas
