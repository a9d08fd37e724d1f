"""Label files as class ids: decoding masks (ids in one channel, or colours through an explicit palette), palette
files, the VOC colour table, and the raw value → class id rule with its checks.

Colour-coded masks are read only through an explicit palette (``palette.txt`` beside the folder dataset's
``classes.txt``), never guessed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clipzss.data.splits import IGNORE_INDEX
from clipzss.errors import UsageError

PALETTE_FILE = "palette.txt"
# Modes whose second channel is alpha: the first channel holds the ids.
_ALPHA_MODES = ("LA", "La", "PA")


def colour_keys(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 colours → (H, W) int64 keys ``r << 16 | g << 8 | b``, one integer per colour."""
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def format_colour_key(key: int) -> str:
    """A :func:`colour_keys` key as ``(r, g, b)``."""
    return f"({key >> 16}, {(key >> 8) & 255}, {key & 255})"


@dataclass(frozen=True)
class Palette:
    """Colour → class id table for colour-coded masks; colours it does not list are an error, never a guess.

    Attributes:
        keys: (N,) sorted :func:`colour_keys` of the listed colours.
        ids: (N,) class id of each key (255 for the colours listed as ignore).
        source: where the table came from, for messages.
    """

    keys: np.ndarray
    ids: np.ndarray
    source: str = "palette"

    def to_ids(self, rgb: np.ndarray, path: Path | str = "mask") -> np.ndarray:
        """(H, W, 3) colours → (H, W) int64 class ids.

        Raises:
            ValueError: the mask holds colours the palette does not list (the message names them and the file).
        """
        keys = colour_keys(rgb[..., :3])  # (H, W)
        index = np.clip(np.searchsorted(self.keys, keys), 0, len(self.keys) - 1)  # (H, W)
        known = self.keys[index] == keys
        if not known.all():
            values, counts = np.unique(keys[~known], return_counts=True)
            order = np.argsort(-counts)[:5]
            listed = ", ".join(f"{format_colour_key(int(values[i]))} × {counts[i]} px" for i in order)
            raise UsageError(
                f"mask {path} has {len(values)} colour(s) not in {self.source}: {listed}; add them to the "
                "palette (as a class or, after the last class, as an ignore colour)"
            )
        return self.ids[index].astype(np.int64)


def _parse_colour(text: str) -> tuple[tuple[int, int, int], str] | None:
    """'R G B [name]', 'R,G,B [name]' or '#RRGGBB [name]' → ((r, g, b), name); None when it is none of these."""
    text = text.strip()
    if text.startswith("#"):
        code, _, rest = text[1:].partition(" ")
        if len(code) != 6:
            return None
        try:
            value = int(code, 16)
        except ValueError:
            return None
        return ((value >> 16, (value >> 8) & 255, value & 255), rest.strip())
    parts = text.replace(",", " ").split(None, 3)
    if len(parts) < 3 or not all(p.isdigit() for p in parts[:3]):
        return None
    rgb = tuple(int(p) for p in parts[:3])
    if max(rgb) > 255:
        return None
    return (rgb, parts[3].strip() if len(parts) > 3 else "")  # type: ignore[return-value]


def read_palette(path: Path, class_names: Sequence[str]) -> Palette:
    """Read a palette file: line i colours class i, then optional extra lines of ignore colours.

    Each line is ``R G B``, ``R,G,B`` or ``#RRGGBB``, optionally followed by a name. A class line's name, when
    given, must be that class's name (a shifted palette is the usual mistake); the lines after the last class map
    their colour to 255 (ignore).

    Raises:
        ValueError: a malformed line, a name that does not match ``class_names``, a repeated colour, or fewer
            lines than classes.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    keys: list[int] = []
    ids: list[int] = []
    for number, line in enumerate(lines, start=1):
        parsed = _parse_colour(line)
        if parsed is None:
            raise UsageError(
                f"{path} line {number} is not a colour: {line.strip()!r} (expected 'R G B', 'R,G,B' or '#RRGGBB', "
                "optionally followed by the class name)"
            )
        (r, g, b), name = parsed
        class_id = number - 1 if number <= len(class_names) else IGNORE_INDEX
        if name and class_id != IGNORE_INDEX and name.lower() != class_names[class_id].strip().lower():
            raise UsageError(
                f"{path} line {number} names '{name}' but class id {class_id} is '{class_names[class_id]}'; "
                "line i of the palette must colour class i of classes.txt"
            )
        key = (r << 16) | (g << 8) | b
        if key in keys:
            other = keys.index(key) + 1
            raise UsageError(
                f"{path} line {number} repeats the colour {format_colour_key(key)} of line {other}"
            )
        keys.append(key)
        ids.append(class_id)
    if len(lines) < len(class_names):
        raise UsageError(
            f"{path} has {len(lines)} colours for {len(class_names)} classes; give one line per class, "
            "in classes.txt order"
        )
    order = np.argsort(keys)
    return Palette(np.asarray(keys, np.int64)[order], np.asarray(ids, np.int64)[order], source=str(path))


def voc_colormap() -> np.ndarray:
    """(256, 3) uint8: the PASCAL VOC palette (class k's colour from the bits of k, spread over R, G, B)."""
    colours = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        value, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colours[index] = (r, g, b)
    return colours


def voc_palette() -> Palette:
    """The VOC colours of ids 0..20 and 255 (boundary) as a :class:`Palette`: reads VOC masks saved as RGB."""
    ids = np.array([*range(21), 255])
    keys = colour_keys(voc_colormap()[ids][:, None, :])[:, 0]
    order = np.argsort(keys)
    return Palette(keys[order], ids[order], source="the VOC palette")


def single_channel(
    array: np.ndarray, mode: str, palette: Palette | None, path: Path | str
) -> np.ndarray | None:
    """A decoded label image's (H, W) raw values, or None for a colour mask that no palette translates.

    Ids with an alpha channel keep the ids; RGB(A) files whose channels agree are grey id maps saved as colour;
    other colour masks go through ``palette`` when there is one.

    Raises:
        ValueError: colours ``palette`` does not list.
    """
    if array.ndim != 3:
        return array
    if mode in _ALPHA_MODES:
        return array[..., 0]  # ids plus an alpha channel that carries no labels
    if palette is not None:
        return palette.to_ids(array, path)
    if np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2]):
        return array[..., 0]
    return None


def load_mask(path: Path, palette: Palette | None = None) -> np.ndarray:
    """Read a label PNG as an (H, W) int64 array of raw ids (palette indices for "P" PNGs).

    With ``palette``, colour (RGB/RGBA) masks are translated through it; single-channel masks are ids either way.

    Raises:
        ValueError: unreadable file, a colour mask without a palette (class ids must be single-channel), or
            colours the palette does not list.
    """
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            array = np.asarray(image)
    except (OSError, SyntaxError, ValueError) as err:
        raise UsageError(f"cannot read mask {path}: {err}") from None
    values = single_channel(array, mode, palette, path)
    if values is None:
        raise UsageError(
            f"mask {path} is a colour ({mode}) image; masks must hold class ids in one channel "
            f"(mode L, P or I;16), with 255 = ignore; for colour-coded masks put a {PALETTE_FILE} "
            "(one 'R G B' line per class, in classes.txt order) beside classes.txt"
        )
    if mode == "F" or values.dtype.kind == "f":
        raise UsageError(f"mask {path} holds floating-point values; masks must hold integer class ids")
    return values.astype(np.int64)


def class_ids(
    raw: np.ndarray,
    num_classes: int,
    reduce_zero_label: bool,
    ignore_index: int = IGNORE_INDEX,
    path: Path | str = "mask",
) -> np.ndarray:
    """Raw label values → class ids (``ignore_index`` = ignore), checking every value against the class list.

    ``reduce_zero_label`` is mmseg's rule: 0 (background) → ignore, k → k-1, ignore stays.

    Raises:
        ValueError: values that are neither a class nor the ignore value (the first ten are listed).
    """
    top = num_classes + (1 if reduce_zero_label else 0)  # raw ids must be < top or the ignore value
    bad = (raw < 0) | ((raw >= top) & (raw != ignore_index))
    if bad.any():
        values = np.unique(raw[bad])[:10].tolist()
        rule = " after reduce_zero_label (0 = background)" if reduce_zero_label else ""
        raise UsageError(
            f"mask {path} has ids {values} beyond the {num_classes} classes{rule}; "
            f"valid raw ids are 0..{top - 1} and {ignore_index} (ignore)"
        )
    if not reduce_zero_label:
        return raw
    ids = raw - 1
    ids[(raw == 0) | (raw == ignore_index)] = ignore_index
    return ids
