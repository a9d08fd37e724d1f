"""PASCAL VOC 2012 + SBD → ``VOCdevkit/VOC2012`` with ``SegmentationClassAug/`` (SBD ``cls/*.mat`` and VOC's own
masks as index PNGs; VOC's annotation wins where both exist) and ``train_aug.txt`` = VOC train ∪ SBD train ∪ SBD
val − VOC val (10,582 ids), plus mmseg's ``aug.txt``."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from clipzss.data.masks import voc_palette
from clipzss.data.prepare import runner
from clipzss.data.prepare.archives import Entry, iter_entries, load_mat, open_image
from clipzss.data.prepare.sources import Role, mat_variables
from clipzss.errors import UsageError

# The downloads this preparer reads, and how find_sources recognises each among the sources.
VOC2012 = Role(
    "voc2012",
    "PASCAL VOC 2012 trainval",
    ("VOCtrainval_11-May-2012.tar",),
    r"VOC2012/SegmentationClass/",
    lambda d: all((d / s).is_dir() for s in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation")),
    "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
)
SBD = Role(
    "sbd",
    "SBD (Hariharan et al.) benchmark",
    ("benchmark.tgz",),
    r"(^|/)cls/[^/]+\.mat$",
    lambda d: (d / "cls").is_dir() and (d / "train.txt").is_file() and "GTcls" in mat_variables(d / "cls"),
    "https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz",
    required=False,
)
ROLES = (VOC2012, SBD)


def voc_png_ids(data: bytes, what: str = "VOC mask") -> np.ndarray:
    """A VOC ``SegmentationClass`` PNG → (H, W) uint8 ids (0 background, 1..20, 255 boundary).

    The official files are palette ("P") PNGs whose indices are the ids; grey (L) files pass as they are, and
    RGB files in the VOC colours (a palette PNG re-saved as colour) are mapped back through the VOC palette.
    """
    image = open_image(data, what)
    if image.mode in ("P", "L"):
        return np.asarray(image, dtype=np.uint8)
    if image.mode in ("RGB", "RGBA"):
        return voc_palette().to_ids(np.asarray(image), what).astype(np.uint8)
    raise UsageError(f"{what} has mode {image.mode}; expected a palette (P) PNG of class indices")


def sbd_mat_ids(data: bytes, what: str = "SBD .mat") -> np.ndarray:
    """An SBD ``cls/*.mat`` (struct ``GTcls`` with field ``Segmentation``) → (H, W) uint8 ids 0..20."""
    mat = load_mat(data, what)
    if "GTcls" not in mat:
        raise UsageError(
            f"{what} has no 'GTcls' struct (keys: {', '.join(sorted(mat))}); is it an SBD cls file?"
        )
    gt = mat["GTcls"]
    try:
        segmentation = gt.Segmentation if hasattr(gt, "Segmentation") else gt["Segmentation"]
    except (KeyError, ValueError, IndexError):
        raise UsageError(f"{what}: GTcls has no 'Segmentation' field") from None
    ids = np.asarray(segmentation)
    if ids.ndim != 2 or ids.dtype.kind not in "iu" or ids.size == 0:
        raise UsageError(
            f"{what}: GTcls.Segmentation is not a 2-D integer map (shape {ids.shape}, {ids.dtype})"
        )
    if ids.max() > 20 and not ((ids <= 20) | (ids == 255)).all():
        raise UsageError(f"{what}: ids {np.unique(ids[ids > 20])[:10].tolist()} are not VOC classes (0..20)")
    return ids.astype(np.uint8)


def prepare_voc(sources: dict[str, Path], dst: Path, opts: runner.Options) -> runner.PrepareReport:
    """VOC 2012 + SBD → ``dst/VOCdevkit/VOC2012`` with SegmentationClassAug and train_aug.txt (10,582 ids)."""
    base = dst / "VOCdevkit" / "VOC2012"
    report = runner.PrepareReport("voc", dst)
    steps = report.steps
    voc = sources["voc2012"]
    lists = base / "ImageSets" / "Segmentation"
    if voc.is_dir():
        runner.place_folder(voc / "JPEGImages", base / "JPEGImages", opts, steps)
        runner.place_folder(voc / "SegmentationClass", base / "SegmentationClass", opts, steps)
        runner.extract_step(
            "VOC lists", voc / "ImageSets" / "Segmentation", r"^(?P<rel>[^/]+\.txt)$", lists, opts, steps
        )
    else:
        runner.extract_step(
            "VOC 2012",
            voc,
            r"VOC2012/(?P<rel>(JPEGImages/[^/]+\.jpg|SegmentationClass/[^/]+\.png|ImageSets/Segmentation/[^/]+\.txt))$",
            base,
            opts,
            steps,
        )
    voc_train, voc_val = runner.read_id_list(lists / "train.txt"), runner.read_id_list(lists / "val.txt")

    if "sbd" not in sources:
        report.notes.append(
            "no SBD found (benchmark.tgz): train.txt has 1,464 images instead of the 10,582 of train_aug; "
            f"download it from {SBD.download} and re-run"
        )
        return runner.finish(report, "voc", ("train", "val"))

    aug_dir = base / "SegmentationClassAug"
    runner.remove_stale_temps(aug_dir)
    voc_annotated = {p.stem for p in (base / "SegmentationClass").glob("*.png")}

    def voc_targets(entry: Entry) -> list[Path]:
        return [aug_dir / Path(entry.path).name]

    entries = iter_entries(base / "SegmentationClass", re.compile(r"^[^/]+\.png$"))
    convert = runner.into_first_target(voc_targets, voc_png_ids)
    runner.run_step("VOC masks -> SegmentationClassAug", entries, voc_targets, convert, opts, steps)

    sbd_lists: dict[str, list[str]] = {}
    cls_regex = re.compile(r"(^|/)cls/(?P<id>[^/]+)\.mat$")
    list_regex = re.compile(r"(^|/)(?P<split>train|val)\.txt$")

    def sbd_targets(entry: Entry) -> list[Path]:
        if (match := list_regex.search(entry.path)) and entry.path.count("/") <= 2:
            sbd_lists[match.group("split")] = entry.read().decode().split()
            return []
        match = cls_regex.search(entry.path)
        if not match or match.group("id") in voc_annotated:  # VOC's own annotation is preferred
            return []
        return [aug_dir / f"{match.group('id')}.png"]

    wanted = re.compile(rf"{cls_regex.pattern}|{list_regex.pattern}")
    entries = iter_entries(sources["sbd"], wanted)
    convert = runner.into_first_target(sbd_targets, sbd_mat_ids)
    runner.run_step("SBD .mat -> SegmentationClassAug", entries, sbd_targets, convert, opts, steps)
    if set(sbd_lists) != {"train", "val"}:
        report.errors.append(f"SBD source {sources['sbd']} has no dataset/train.txt and val.txt")
        return report

    sbd_all = set(sbd_lists["train"]) | set(sbd_lists["val"])
    train_aug = sorted((set(voc_train) | sbd_all) - set(voc_val))
    runner.write_id_list(lists / "train_aug.txt", train_aug)
    runner.write_id_list(
        lists / "aug.txt", sorted(sbd_all - set(voc_train) - set(voc_val))
    )  # mmseg's aug list
    report.notes.append(
        f"train_aug.txt = VOC train ({len(voc_train):,}) ∪ SBD train+val ({len(sbd_all):,}) − VOC val "
        f"({len(voc_val):,}) = {len(train_aug):,} ids"
    )
    return runner.finish(report, "voc", ("train", "val"))
