"""COCO-Stuff 164k: COCO 2017 images + the 182-id stuffthingmaps → ``images/{train,val}2017`` and
``annotations/{train,val}2017/*_labelTrainIds.png`` (171 classes)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from clipzss.data.prepare import runner
from clipzss.data.prepare.archives import Entry, iter_entries, open_image
from clipzss.data.prepare.sources import Role, dir_role, has_files
from clipzss.data.splits import IGNORE_INDEX
from clipzss.errors import UsageError

# COCO-Stuff: the 11 COCO thing ids (0-based in the stuffthingmaps, = COCO category id - 1) that have no
# annotations: street sign, hat, shoe, eye glasses, plate, mirror, window, desk, door, blender, hair brush.
COCO_STUFF_UNUSED_IDS: tuple[int, ...] = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCO_STUFF_RAW_CLASSES = 182  # ids 0..181 in the stuffthingmaps, 255 = unlabelled


# The downloads this preparer reads, and how find_sources recognises each among the sources.
def _images_role(split: str) -> Role:
    """COCO 2017 ``split`` images: ``<split>2017.zip`` or the folder it extracts to."""
    return Role(
        f"coco_{split}",
        f"COCO 2017 {split} images",
        (f"{split}2017.zip",),
        rf"^{split}2017/[^/]+\.jpg$",
        dir_role(f"{split}2017", r"\.jpg$"),
        f"http://images.cocodataset.org/zips/{split}2017.zip",
        required=False,
    )


IMAGES = {split: _images_role(split) for split in ("train", "val")}
STUFFTHINGMAPS = Role(
    "stuffthingmaps",
    "COCO-Stuff stuffthingmaps (182-id PNGs)",
    ("stuffthingmaps_trainval2017.zip",),
    r"(^|/)(train|val)2017/\d+\.png$",
    lambda d: any(has_files(d / s, r"^\d+\.png$") for s in ("train2017", "val2017")),
    "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip",
)
ROLES = (IMAGES["train"], IMAGES["val"], STUFFTHINGMAPS)


def coco_stuff_lut() -> np.ndarray:
    """(256,) uint8 table: stuffthingmaps id (0..181, 255) → 171-class trainId, 255 for unused ids and unlabelled.

    The 171 used ids keep their order (person → 0, ..., banner (id 91) → 80, ..., wood (id 181) → 170), which is
    mmseg's ``coco_stuff164k.py`` mapping and the order of ``splits.COCO_STUFF_CLASSES``.
    """
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    used = [i for i in range(COCO_STUFF_RAW_CLASSES) if i not in COCO_STUFF_UNUSED_IDS]
    lut[used] = np.arange(len(used))
    return lut


def stuffthingmap_ids(data: bytes, what: str = "stuffthingmap") -> np.ndarray:
    """A COCO-Stuff stuffthingmaps PNG (ids 0..181, 255 unlabelled) → (H, W) uint8 trainIds (171 classes)."""
    image = open_image(data, what)
    if image.mode not in ("L", "P"):
        raise UsageError(f"{what} has mode {image.mode}; the stuffthingmaps are single-channel id PNGs")
    raw = np.asarray(image, dtype=np.uint8)
    bad = (raw >= COCO_STUFF_RAW_CLASSES) & (raw != 255)
    if bad.any():
        raise UsageError(f"{what} has ids {np.unique(raw[bad])[:10].tolist()} outside 0..181 and 255")
    return coco_stuff_lut()[raw]


def prepare_coco_stuff(sources: dict[str, Path], dst: Path, opts: runner.Options) -> runner.PrepareReport:
    """COCO 2017 images + stuffthingmaps → ``dst/images/*2017`` and ``dst/annotations/*2017/*_labelTrainIds.png``."""
    report = runner.PrepareReport("coco-stuff", dst)
    for split in ("train", "val"):
        source = sources.get(f"coco_{split}")
        target = dst / "images" / f"{split}2017"
        if source is None:
            if not target.is_dir():
                report.notes.append(
                    f"no {split}2017 images found ({IMAGES[split].download}): only the labels are converted"
                )
        elif source.is_dir():
            runner.place_folder(source, target, opts, report.steps)
        else:
            runner.extract_step(
                f"{split}2017 images",
                source,
                rf"(^|/){split}2017/(?P<rel>[^/]+\.jpg)$",
                target,
                opts,
                report.steps,
            )

    regex = re.compile(r"(^|/)(?P<split>train|val)2017/(?P<stem>\d+)\.png$")

    def targets(entry: Entry) -> list[Path]:
        match = regex.search(entry.path)
        if not match:
            return []
        return [dst / "annotations" / f"{match['split']}2017" / f"{match['stem']}_labelTrainIds.png"]

    for split in ("train", "val"):
        runner.remove_stale_temps(dst / "annotations" / f"{split}2017")
    entries = iter_entries(sources["stuffthingmaps"], regex)
    convert = runner.into_first_target(targets, stuffthingmap_ids)
    runner.run_step("stuffthingmaps -> labelTrainIds", entries, targets, convert, opts, report.steps)
    splits = [s for s in ("train", "val") if (dst / "images" / f"{s}2017").is_dir()]
    return runner.finish(report, "coco-stuff", splits)
