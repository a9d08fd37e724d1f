"""Where `clipzss predict` writes: one mask and one overlay PNG per input, under names that never collide, never
over a file this run did not create (unless told to), and recorded: each mask's PNG metadata and the folder's
``predictions.json`` say which class list and model made it."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from clipzss.files import OutputExistsError, atomic_write, inside, refuse_existing
from clipzss.visualize import mask_image, overlay

RECORD_NAME = "predictions.json"
RECORD_FORMAT = "clipzss-predictions/1"
# The PNG text chunk of each mask: JSON with the class list (id i = class_names[i]), the model and the input.
MASK_TEXT_KEY = "clipzss"


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

    def planned_files(self) -> list[Path]:
        """Every file the planned inputs will write (masks and overlays)."""
        return [
            self / f"{name}{suffix}"
            for queue in getattr(self, "_queues", {}).values()
            for name, _ in queue
            for suffix in ("_mask.png", "_overlay.png")
        ]

    def note_written(self, source: str | Path, mask: Path, overlay_path: Path) -> None:
        self.__dict__.setdefault("_written", []).append(
            {
                "image": str(source),
                "mask": mask.relative_to(self).as_posix(),
                "overlay": overlay_path.relative_to(self).as_posix(),
            }
        )

    def write_record(self, class_names: Sequence[str], model: str) -> Path | None:
        """Add this run (class list, model, the files it wrote) to the folder's ``predictions.json``.

        The record only grows: earlier runs' entries are kept as they were. None when this run wrote nothing.
        """
        written = self.__dict__.get("_written", [])
        if not written:
            return None
        path = self / RECORD_NAME
        runs = _read_record(path, getattr(self, "_overwrite", False))
        runs.append(
            {
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "model": model,
                "class_names": list(class_names),
                "outputs": written,
            }
        )
        payload = {"format": RECORD_FORMAT, "runs": runs}
        atomic_write(
            path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
        )
        return path


def _read_record(path: Path, overwrite: bool) -> list[dict[str, Any]]:
    """The runs an existing ``predictions.json`` records; a file of that name that is not ours is refused (or,
    with ``overwrite``, replaced)."""
    if not os.path.lexists(path):
        return []
    try:
        if path.is_symlink() or not path.is_file():
            raise ValueError("not a regular file")
        payload = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(payload, dict) or payload.get("format") != RECORD_FORMAT:
            raise ValueError("not a clipzss prediction record")
        runs = payload.get("runs")
        if not isinstance(runs, list):
            raise ValueError("no list of runs")
        return runs
    except (OSError, ValueError, UnicodeDecodeError):
        if overwrite:
            return []
        raise OutputExistsError(
            f"{path} exists and is not a clipzss prediction record: choose another --out, or pass --overwrite "
            "to replace it"
        ) from None


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


def prediction_folder(
    images: Sequence[str | Path], out: str | Path, overwrite: bool = False
) -> PredictionFolder:
    """Plan the output folder of `clipzss predict` (torch or ONNX) for these input images.

    The folder returned plans a distinct output name per input (`output_names`), so no result overwrites another,
    and refuses, before anything is computed, a planned file that already exists (unless ``overwrite``) or a path
    that a symbolic link inside the folder leads elsewhere.
    """
    folder = PredictionFolder(out).plan(images)
    folder._overwrite = overwrite
    planned = folder.planned_files()
    outside = next((p for p in planned if not inside(p.parent, folder)), None)
    if outside is not None:
        raise OutputExistsError(
            f"{outside.parent} leads outside {folder} through a symbolic link: predictions are written only inside "
            "--out; choose another --out"
        )
    refuse_existing(planned, overwrite)
    _read_record(folder / RECORD_NAME, overwrite)  # a foreign predictions.json is refused now, not at the end
    return folder  # created with the first prediction: a model that fails to load leaves nothing behind


def mask_record(class_names: Sequence[str], model: str = "", source: str | Path | None = None) -> str:
    """The JSON a mask PNG carries: its class list (pixel value i is ``class_names[i]``), model and input."""
    record: dict[str, Any] = {"class_names": list(class_names)}
    if model:
        record["model"] = model
    if source is not None:
        record["image"] = str(source)
    return json.dumps(record, ensure_ascii=False)


def save_prediction(
    out: Path,
    stem: str,
    image: Image.Image,
    mask: np.ndarray,
    class_names: Sequence[str],
    source: str | Path | None = None,
    model: str = "",
) -> str:
    """Write ``<name>_mask.png`` and ``<name>_overlay.png`` into ``out``; return a two-line summary for the CLI.

    ``name`` is ``stem``, or the distinct name `prediction_folder` planned when several inputs share that stem
    (the summary then says so). Both files are written atomically (an existing symbolic link is replaced, never
    written through); the mask records its class list, ``model`` and ``source`` in its PNG metadata.
    """
    name, note = out.take(stem) if isinstance(out, PredictionFolder) else (stem, "")
    mask_path, overlay_path = out / f"{name}_mask.png", out / f"{name}_overlay.png"
    info = PngImagePlugin.PngInfo()
    info.add_itxt(MASK_TEXT_KEY, mask_record(class_names, model, source), zip=True)
    replace = getattr(out, "_overwrite", True)  # a planned folder replaces nothing it was not told to
    mask_png = mask_image(mask, len(class_names))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(mask_path, lambda tmp: mask_png.save(tmp, "PNG", pnginfo=info), replace=replace)
    atomic_write(
        overlay_path, lambda tmp: overlay(image, mask, class_names).save(tmp, "PNG"), replace=replace
    )
    if isinstance(out, PredictionFolder):
        out.note_written(source if source is not None else stem, mask_path, overlay_path)
    ids, counts = np.unique(mask, return_counts=True)
    areas = ", ".join(
        f"{class_names[i]} {100 * c / mask.size:.1f}%"
        for i, c in zip(ids, counts, strict=True)
        if 0 <= i < len(class_names)
    )
    return f"{areas}\n  wrote {mask_path} and {overlay_path}{note}"
