"""Where `clipzss predict` writes: one mask and one overlay PNG per input, under names that never collide."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from clipzss.visualize import mask_image, overlay


class PredictionFolder(type(Path())):
    """The output folder of one prediction run, which knows the output name of each input image.

    Inputs that share a file stem (``a/x.jpg``, ``b/x.jpg``, ``a/x.png``) would all write ``x_mask.png``: each of
    them gets its own name instead (see `output_names`), handed out by `take` in input order.
    """

    def plan(self, images: Sequence[str | Path]) -> PredictionFolder:
        self._queues: dict[str, list[tuple[str, str]]] = {}
        for path, name in zip(images, output_names(images), strict=True):
            stem = Path(path).stem
            note = "" if name == stem else f" (renamed: several inputs are named {stem}.*)"
            self._queues.setdefault(stem, []).append((name, note))
        return self

    def take(self, stem: str) -> tuple[str, str]:
        """The next planned output name for an input with this stem, and a note when it is not the stem itself."""
        queue = getattr(self, "_queues", {}).get(stem)
        return queue.pop(0) if queue else (stem, "")


def output_names(images: Sequence[str | Path]) -> list[str]:
    """One distinct, predictable output name (no suffix) per input image, in input order.

    An image whose stem no other input has keeps its stem (``photos/cat.jpg`` → ``cat``). Images sharing a stem
    mirror their folders relative to the group's common folder (``a/x.jpg``, ``b/x.jpg`` → ``a/x``, ``b/x``), and
    those still alike (same folder, other extension) add their extension (``a/x_jpg``, ``a/x_png``). The same
    file given twice keeps one name; a name that is still taken gets ``_2``, ``_3``, ...
    """
    resolved = [Path(p).resolve() for p in images]
    groups: dict[str, list[Path]] = {}
    for path in dict.fromkeys(resolved):  # the same file twice writes the same result: one name for both
        groups.setdefault(path.stem, []).append(path)
    chosen = {paths[0]: stem for stem, paths in groups.items() if len(paths) == 1}
    taken = set(chosen.values())  # a stem no other input has is never renamed
    for stem, paths in groups.items():
        if len(paths) == 1:
            continue
        common = Path(os.path.commonpath([str(p.parent) for p in paths]))
        mirrored = {p: (p.parent.relative_to(common) / stem).as_posix() for p in paths}
        for path, name in mirrored.items():
            if sum(other == name for other in mirrored.values()) > 1 and path.suffix:
                name = f"{name}_{path.suffix.lstrip('.')}"
            unique, n = name, 1
            while unique in taken:
                n += 1
                unique = f"{name}_{n}"
            taken.add(unique)
            chosen[path] = unique
    return [chosen[p] for p in resolved]


def prediction_folder(images: Sequence[str | Path], out: str | Path) -> PredictionFolder:
    """Create the output folder of `clipzss predict` (torch or ONNX) for these input images.

    The folder returned plans a distinct output name per input (`output_names`), so no result overwrites another.
    """
    folder = PredictionFolder(out).plan(images)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_prediction(
    out: Path, stem: str, image: Image.Image, mask: np.ndarray, class_names: Sequence[str]
) -> str:
    """Write ``<name>_mask.png`` and ``<name>_overlay.png`` into ``out``; return a two-line summary for the CLI.

    ``name`` is ``stem``, or the distinct name `prediction_folder` planned when several inputs share that stem
    (the summary then says so).
    """
    name, note = out.take(stem) if isinstance(out, PredictionFolder) else (stem, "")
    mask_path, overlay_path = out / f"{name}_mask.png", out / f"{name}_overlay.png"
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    mask_image(mask, len(class_names)).save(mask_path)
    overlay(image, mask, class_names).save(overlay_path)
    ids, counts = np.unique(mask, return_counts=True)
    areas = ", ".join(
        f"{class_names[i]} {100 * c / mask.size:.1f}%"
        for i, c in zip(ids, counts, strict=True)
        if 0 <= i < len(class_names)
    )
    return f"{areas}\n  wrote {mask_path} and {overlay_path}{note}"
