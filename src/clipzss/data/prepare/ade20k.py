"""ADE20K: ``ADEChallengeData2016`` (150 classes) as it is (the reader applies reduce-zero-label) and, when the full
release ``ADE20K_2021_17_01`` is given, ADE-847 in detectron2's layout (16-bit ``.tif`` ids, 65535 ignore, short
side at most 512)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from clipzss.data.ade847 import ADE847_OBJECT_IDS
from clipzss.data.prepare import runner
from clipzss.data.prepare.archives import Entry, iter_entries, open_image
from clipzss.data.prepare.sources import Role
from clipzss.data.readers import ADE_FULL_FOLDER
from clipzss.data.splits import WIDE_IGNORE_INDEX
from clipzss.errors import UsageError

ADE_FULL_MAX_SIDE = 512  # detectron2's preparation resizes so that the short side is at most 512

# The downloads this preparer reads, and how find_sources recognises each among the sources.
ADE150 = Role(
    "ade150",
    "ADE20K scene parsing (ADEChallengeData2016)",
    ("ADEChallengeData2016.zip",),
    r"ADEChallengeData2016/annotations/",
    lambda d: (d / "images/validation").is_dir() and (d / "annotations/validation").is_dir(),
    "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
    required=False,
)
ADE_FULL = Role(
    "ade_full",
    "ADE20K full release (ADE20K_2021_17_01, for ADE-847)",
    ("ADE20K_2021_17_01.zip",),
    r"(^|/)images/ADE/(training|validation)/",
    lambda d: (d / "index_ade20k.pkl").is_file() or (d / "images" / "ADE").is_dir(),
    "https://ade20k.csail.mit.edu/ (registration required)",
    required=False,
)
ROLES = (ADE150, ADE_FULL)


def ade_full_lut() -> np.ndarray:
    """(max object id + 1,) uint16 table: ADE20K object id → ADE-847 trainId, 65535 for every other id (and 0)."""
    lut = np.full(max(ADE847_OBJECT_IDS) + 1, WIDE_IGNORE_INDEX, dtype=np.uint16)
    lut[list(ADE847_OBJECT_IDS)] = np.arange(len(ADE847_OBJECT_IDS))
    return lut


def ade_full_object_ids(data: bytes, what: str = "ADE20K _seg.png") -> np.ndarray:
    """An ADE20K ``*_seg.png`` → (H, W) int64 object ids, encoded as ``R / 10 * 256 + G`` (B holds instances)."""
    image = open_image(data, what)
    if image.mode != "RGB":
        raise UsageError(f"{what} has mode {image.mode}; ADE20K's _seg.png files are RGB")
    rgb = np.asarray(image).astype(np.int64)
    return (rgb[..., 0] // 10) * 256 + rgb[..., 1]


def ade_full_ids(data: bytes, what: str = "ADE20K _seg.png") -> np.ndarray:
    """An ADE20K ``*_seg.png`` → (H, W) uint16 ADE-847 ids (65535 = ignore: unlabelled or not among the 847)."""
    objects = ade_full_object_ids(data, what)
    lut = ade_full_lut()
    return np.where(objects < len(lut), lut[np.minimum(objects, len(lut) - 1)], WIDE_IGNORE_INDEX).astype(
        np.uint16
    )


def detectron2_size(height: int, width: int, max_side: int = ADE_FULL_MAX_SIDE) -> tuple[int, int] | None:
    """The (H, W) detectron2's ADE-847 preparation resizes to (short side → ``max_side``), or None to keep."""
    if width >= height > max_side:
        return max_side, round(width / height * max_side)
    if height >= width > max_side:
        return round(height / width * max_side), max_side
    return None


def _ade_full_step(source: Path, base: Path, opts: runner.Options, steps: list[runner.Step]) -> None:
    """ADE20K_2021_17_01 → detectron2's ADE-847 layout: images and 16-bit .tif ids, short side at most 512."""
    regex = re.compile(
        r"(^|/)images/ADE/(training|validation)/(.*/)?(?P<name>ADE_(?P<split>train|val)_\d+)_seg\.png$"
    )
    for folder in ("images_detectron2", "annotations_detectron2"):
        for split in ("training", "validation"):
            runner.remove_stale_temps(base / folder / split)

    def targets(entry: Entry) -> list[Path]:
        match = regex.search(entry.path)
        if not match:
            return []
        split = "validation" if match["split"] == "val" else "training"
        return [
            base / "images_detectron2" / split / f"{match['name']}.jpg",
            base / "annotations_detectron2" / split / f"{match['name']}.tif",
        ]

    def pairs() -> Iterator[Entry]:
        for entry in iter_entries(source, regex):
            if entry.sibling is None:
                raise UsageError(f"{source}: ADE20K_2021_17_01 must be the .zip or its extracted folder")
            image_path = entry.path[: -len("_seg.png")] + ".jpg"
            read = partial(lambda e, other: (e.sibling(other), e.read()), entry, image_path)
            yield Entry(entry.path, entry.size, read, entry.streamed, entry.local, entry.sibling)

    def convert(data: tuple[bytes, bytes], entry: Entry) -> runner.Outputs:
        image = open_image(data[0], entry.path[: -len("_seg.png")] + ".jpg").convert("RGB")
        ids = ade_full_ids(data[1], entry.path)
        if ids.shape != (image.height, image.width):
            raise UsageError(
                f"{entry.path} is {ids.shape[0]}x{ids.shape[1]} but its image is {image.height}x{image.width}"
            )
        size = detectron2_size(image.height, image.width)
        if size is not None:
            image = image.resize((size[1], size[0]), Image.BILINEAR)
            ids = np.asarray(Image.fromarray(ids).resize((size[1], size[0]), Image.NEAREST))
        image_out, label_out = targets(entry)
        return {image_out: image, label_out: ids}

    runner.run_step("ADE20K full -> ADE-847", pairs(), targets, convert, opts, steps)


def prepare_ade20k(sources: dict[str, Path], dst: Path, opts: runner.Options) -> runner.PrepareReport:
    """ADEChallengeData2016 → ``dst/ADEChallengeData2016`` as is (the reader applies reduce-zero-label), and, when
    the full release is given, ADE-847 in detectron2's layout under ``dst/ADE20K_2021_17_01``."""
    if "ade150" not in sources and "ade_full" not in sources:
        raise FileNotFoundError(
            f"neither {ADE150.title} ({ADE150.download}) nor the {ADE_FULL.title} was found in the sources"
        )
    report = runner.PrepareReport("ade20k", dst)
    if "ade150" in sources:
        source, base = sources["ade150"], dst / "ADEChallengeData2016"
        if source.is_dir():
            for sub in ("images", "annotations"):
                runner.place_folder(source / sub, base / sub, opts, report.steps)
        else:
            runner.extract_step(
                "ADEChallengeData2016",
                source,
                r"ADEChallengeData2016/(?P<rel>((images|annotations)/(training|validation)/[^/]+\.(jpg|png))|"
                r"objectInfo150\.txt|sceneCategories\.txt)$",
                base,
                opts,
                report.steps,
            )
        runner.finish(report, "ade20k", ("train", "val"))
    if "ade_full" in sources:
        _ade_full_step(sources["ade_full"], dst / ADE_FULL_FOLDER, opts, report.steps)
        runner.finish(report, "ade20k-full", ("train", "val"), label="ade20k-full ")
    else:
        report.notes.append(
            "ADE20K-full (ADE-847) not found: to evaluate on it, add ADE20K_2021_17_01.zip "
            f"({ADE_FULL.download}) to --src and re-run"
        )
    return report
