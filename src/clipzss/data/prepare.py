"""`clipzss prepare-data`: the official downloads → the mmsegmentation layouts that clipzss reads (DESIGN.md §3).

Each preparer takes the archives as downloaded (tar/zip, read in place: only what is needed is extracted) or the
folders they were extracted to, and writes:

- ``voc``: ``VOCdevkit/VOC2012`` with ``SegmentationClassAug/`` (SBD ``cls/*.mat`` and VOC's own masks as index
  PNGs; VOC's annotation wins where both exist) and ``train_aug.txt`` = VOC train ∪ SBD train ∪ SBD val − VOC val
  (10,582 ids), plus mmseg's ``aug.txt``.
- ``coco-stuff``: ``annotations/{train,val}2017/*_labelTrainIds.png`` (171 classes) from the 182-id stuffthingmaps.
- ``context``: ``VOCdevkit/VOC2010`` with ``SegmentationClassContext/`` (59 classes + 0 background),
  ``SegmentationClassContext459/`` (16-bit, 0..458, 65535 ignore) and ``ImageSets/SegmentationContext/``.
- ``ade20k``: ``ADEChallengeData2016`` as is (the reader applies reduce-zero-label) and, when the full release
  ``ADE20K_2021_17_01`` is given, ADE-847 in detectron2's layout (16-bit ``.tif`` ids, 65535 ignore).

Every run is resumable and idempotent: a label file is written to a temporary name and renamed when complete, so
an interrupted run never leaves a half-written file; re-running skips finished files and deletes temporary files
left by a killed run. Image folders given as folders are linked (``--copy-images`` copies them).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import uuid
import zipfile
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

HELP = "convert the official downloads of VOC+SBD, COCO-Stuff, PASCAL Context or ADE20K into clipzss' layouts"
EPILOG = """examples:
  clipzss prepare-data voc --src ~/Downloads/VOCtrainval_11-May-2012.tar ~/Downloads/benchmark.tgz --dst /data/voc
  clipzss prepare-data voc --src /data/VOCdevkit /data/benchmark_RELEASE --dst /data/voc
  clipzss prepare-data coco-stuff --src ~/Downloads --dst /data/coco_stuff164k
  clipzss prepare-data context --src VOCtrainval_03-May-2010.tar trainval.tar.gz labels.txt --dst /data/context
  clipzss prepare-data ade20k --src ADEChallengeData2016.zip ADE20K_2021_17_01.zip --dst /data/ade

--src takes archives, the folders they were extracted to, or a folder holding either. Re-running the same command
resumes an interrupted run (finished files are skipped). Archives with their official names are checked against
the published checksums listed in docs/protocols.md; --no-verify skips that. Then: clipzss check-data DST."""

ARCHIVE_SUFFIXES = (".tar", ".tgz", ".tar.gz", ".zip")
TEMP_SUFFIX = ".part"
STATE_FILE = ".clipzss-prepare.json"

# Published checksums of the official archives (algorithm, digest). docs/protocols.md says where each comes from.
ARCHIVE_CHECKSUMS: dict[str, tuple[str, str]] = {
    "VOCtrainval_11-May-2012.tar": ("md5", "6cd6e144f989b92b3379bac3b3de84fd"),
    "benchmark.tgz": ("md5", "82b4d87ceb2ed10f6038a1cba92111cb"),
    "VOCtrainval_03-May-2010.tar": ("md5", "da459979d0c395079b5c75ee67908abb"),
    "trainval.tar.gz": ("md5", "df034edb2c12aa7d33b42b20bb1796e3"),
    "train2017.zip": ("md5", "cced6f7f71b7629ddf16f17bbcfab6b2"),
    "val2017.zip": ("md5", "442b8da7639aecaf257c1dceb8ba8c80"),
    "ADEChallengeData2016.zip": ("md5", "7328b3957e407ddae1d3cbf487f149ef"),
}

# COCO-Stuff: the 11 COCO thing ids (0-based in the stuffthingmaps, = COCO category id - 1) that have no
# annotations: street sign, hat, shoe, eye glasses, plate, mirror, window, desk, door, blender, hair brush.
COCO_STUFF_UNUSED_IDS: tuple[int, ...] = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCO_STUFF_RAW_CLASSES = 182  # ids 0..181 in the stuffthingmaps, 255 = unlabelled

# PASCAL Context-59: the ids (in the 459-class LabelMap, 1-based, 0 = unlabelled) of the 59 classes, in the
# alphabetical order of splits.CONTEXT59_CLASSES; the selection used by detail-api and mmseg's converter.
CONTEXT59_LABEL_IDS: tuple[int, ...] = (
    2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113, 115, 144, 158,
    159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324, 326, 347, 349, 354, 355, 360, 366,
    368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458,
)  # fmt: skip
CONTEXT_FULL_CLASSES = 459
WIDE_IGNORE = 65535


# ----------------------------------------------------------------------------------------------------------------
# Label conversions: pure functions from the official encodings to class-id arrays


def coco_stuff_lut() -> np.ndarray:
    """(256,) uint8 table: stuffthingmaps id (0..181, 255) → 171-class trainId, 255 for unused ids and unlabelled.

    The 171 used ids keep their order (person → 0, ..., banner (id 91) → 80, ..., wood (id 181) → 170), which is
    mmseg's ``coco_stuff164k.py`` mapping and the order of ``splits.COCO_STUFF_CLASSES``.
    """
    import numpy as np

    lut = np.full(256, 255, dtype=np.uint8)
    used = [i for i in range(COCO_STUFF_RAW_CLASSES) if i not in COCO_STUFF_UNUSED_IDS]
    lut[used] = np.arange(len(used))
    return lut


def context_luts() -> tuple[np.ndarray, np.ndarray]:
    """Tables over the 459-class LabelMap values (0..459): → Context-59 (0 background, 1..59) and → 459 ids.

    Context-59 keeps mmseg's file convention (0 = background and every class outside the 59, read with
    reduce-zero-label); Context-459 is 0..458 with 65535 for unlabelled (detectron2's convention).
    """
    import numpy as np

    to59 = np.zeros(CONTEXT_FULL_CLASSES + 1, dtype=np.uint8)
    to59[list(CONTEXT59_LABEL_IDS)] = np.arange(1, len(CONTEXT59_LABEL_IDS) + 1)
    to459 = np.arange(-1, CONTEXT_FULL_CLASSES, dtype=np.int64)
    to459[0] = WIDE_IGNORE
    return to59, to459.astype(np.uint16)


def voc_colormap() -> np.ndarray:
    """(256, 3) uint8: the PASCAL VOC palette (class k's colour from the bits of k, spread over R, G, B)."""
    import numpy as np

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


def _open_image(data: bytes, what: str) -> Any:
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read {what}: {err}") from None
    return image


def voc_png_ids(data: bytes, what: str = "VOC mask") -> np.ndarray:
    """A VOC ``SegmentationClass`` PNG → (H, W) uint8 ids (0 background, 1..20, 255 boundary).

    The official files are palette ("P") PNGs whose indices are the ids; grey (L) files pass as they are, and
    RGB files in the VOC colours (a palette PNG re-saved as colour) are mapped back through the VOC palette.
    """
    import numpy as np

    image = _open_image(data, what)
    if image.mode in ("P", "L"):
        return np.asarray(image, dtype=np.uint8)
    if image.mode in ("RGB", "RGBA"):
        from clipzss.data.masks import Palette, colour_keys

        colours = voc_colormap()[[*range(21), 255]]
        keys = colour_keys(colours[:, None, :])[:, 0]
        order = np.argsort(keys)
        ids = np.array([*range(21), 255])[order]
        return (
            Palette(keys[order], ids, source="the VOC palette")
            .to_ids(np.asarray(image), what)
            .astype(np.uint8)
        )
    raise ValueError(f"{what} has mode {image.mode}; expected a palette (P) PNG of class indices")


def sbd_mat_ids(data: bytes, what: str = "SBD .mat") -> np.ndarray:
    """An SBD ``cls/*.mat`` (struct ``GTcls`` with field ``Segmentation``) → (H, W) uint8 ids 0..20."""
    import numpy as np

    mat = _load_mat(data, what)
    if "GTcls" not in mat:
        raise ValueError(
            f"{what} has no 'GTcls' struct (keys: {', '.join(sorted(mat))}); is it an SBD cls file?"
        )
    gt = mat["GTcls"]
    try:
        segmentation = gt.Segmentation if hasattr(gt, "Segmentation") else gt["Segmentation"]
    except (KeyError, ValueError, IndexError):
        raise ValueError(f"{what}: GTcls has no 'Segmentation' field") from None
    ids = np.asarray(segmentation)
    if ids.ndim != 2 or ids.dtype.kind not in "iu" or ids.size == 0:
        raise ValueError(
            f"{what}: GTcls.Segmentation is not a 2-D integer map (shape {ids.shape}, {ids.dtype})"
        )
    if ids.max() > 20 and not ((ids <= 20) | (ids == 255)).all():
        raise ValueError(f"{what}: ids {np.unique(ids[ids > 20])[:10].tolist()} are not VOC classes (0..20)")
    return ids.astype(np.uint8)


def context_mat_ids(data: bytes, what: str = "Context .mat") -> tuple[np.ndarray, np.ndarray]:
    """A PASCAL Context ``trainval/*.mat`` (``LabelMap``, 459 classes, 0 unlabelled) → (Context-59, Context-459)."""
    import numpy as np

    mat = _load_mat(data, what)
    if "LabelMap" not in mat:
        raise ValueError(
            f"{what} has no 'LabelMap' (keys: {', '.join(sorted(mat))}); is it a PASCAL Context file?"
        )
    labels = np.asarray(mat["LabelMap"])
    if labels.ndim != 2 or labels.dtype.kind not in "iu":
        raise ValueError(f"{what}: LabelMap is not a 2-D integer map (shape {labels.shape}, {labels.dtype})")
    if labels.max(initial=0) > CONTEXT_FULL_CLASSES:
        bad = np.unique(labels[labels > CONTEXT_FULL_CLASSES])[:10].tolist()
        raise ValueError(f"{what}: LabelMap values {bad} exceed the {CONTEXT_FULL_CLASSES} classes")
    to59, to459 = context_luts()
    labels = labels.astype(np.int64)
    return to59[labels], to459[labels]


def stuffthingmap_ids(data: bytes, what: str = "stuffthingmap") -> np.ndarray:
    """A COCO-Stuff stuffthingmaps PNG (ids 0..181, 255 unlabelled) → (H, W) uint8 trainIds (171 classes)."""
    import numpy as np

    image = _open_image(data, what)
    if image.mode not in ("L", "P"):
        raise ValueError(f"{what} has mode {image.mode}; the stuffthingmaps are single-channel id PNGs")
    raw = np.asarray(image, dtype=np.uint8)
    bad = (raw >= COCO_STUFF_RAW_CLASSES) & (raw != 255)
    if bad.any():
        raise ValueError(f"{what} has ids {np.unique(raw[bad])[:10].tolist()} outside 0..181 and 255")
    return coco_stuff_lut()[raw]


ADE_FULL_MAX_SIDE = 512  # detectron2's preparation resizes so that the short side is at most 512


def ade_full_lut() -> np.ndarray:
    """(max object id + 1,) uint16 table: ADE20K object id → ADE-847 trainId, 65535 for every other id (and 0)."""
    import numpy as np

    from clipzss.data.ade847 import ADE847_OBJECT_IDS

    lut = np.full(max(ADE847_OBJECT_IDS) + 1, WIDE_IGNORE, dtype=np.uint16)
    lut[list(ADE847_OBJECT_IDS)] = np.arange(len(ADE847_OBJECT_IDS))
    return lut


def ade_full_object_ids(data: bytes, what: str = "ADE20K _seg.png") -> np.ndarray:
    """An ADE20K ``*_seg.png`` → (H, W) int64 object ids, encoded as ``R / 10 * 256 + G`` (B holds instances)."""
    import numpy as np

    image = _open_image(data, what)
    if image.mode != "RGB":
        raise ValueError(f"{what} has mode {image.mode}; ADE20K's _seg.png files are RGB")
    rgb = np.asarray(image).astype(np.int64)
    return (rgb[..., 0] // 10) * 256 + rgb[..., 1]


def ade_full_ids(data: bytes, what: str = "ADE20K _seg.png") -> np.ndarray:
    """An ADE20K ``*_seg.png`` → (H, W) uint16 ADE-847 ids (65535 = ignore: unlabelled or not among the 847)."""
    import numpy as np

    objects = ade_full_object_ids(data, what)
    lut = ade_full_lut()
    return np.where(objects < len(lut), lut[np.minimum(objects, len(lut) - 1)], WIDE_IGNORE).astype(np.uint16)


def detectron2_size(height: int, width: int, max_side: int = ADE_FULL_MAX_SIDE) -> tuple[int, int] | None:
    """The (H, W) detectron2's ADE-847 preparation resizes to (short side → ``max_side``), or None to keep."""
    if width >= height > max_side:
        return max_side, round(width / height * max_side)
    if height >= width > max_side:
        return round(height / width * max_side), max_side
    return None


def _load_mat(data: bytes, what: str) -> dict[str, Any]:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ValueError(
            "reading the .mat annotations needs scipy: pip install scipy (or clipzss[data])"
        ) from None
    try:
        return loadmat(io.BytesIO(data), squeeze_me=True, struct_as_record=False)
    except (ValueError, TypeError, OSError, NotImplementedError, zlib.error) as err:
        raise ValueError(f"cannot read {what}: {err}") from None


# ----------------------------------------------------------------------------------------------------------------
# Atomic, resumable file output


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(temp)`` and rename the temp file to ``path``: ``path`` is either complete or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")
    try:
        write(temp)
        os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()


def write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda temp: temp.write_bytes(data))


def write_label_png(path: Path, ids: np.ndarray) -> None:
    """Write (H, W) ids as a grey PNG (or TIFF for a ``.tif`` path): 8-bit for uint8, 16-bit for uint16 ids."""
    from PIL import Image

    if ids.dtype.name not in ("uint8", "uint16"):
        raise ValueError(f"label maps are written as uint8 or uint16, got {ids.dtype} for {path}")
    image = Image.fromarray(ids)
    file_format = "TIFF" if path.suffix.lower() in (".tif", ".tiff") else "PNG"
    atomic_write(path, lambda temp: image.save(temp, format=file_format))


def write_image(path: Path, image: Any) -> None:
    """Write a PIL image; JPEG at PIL's default quality, as detectron2's ADE-847 preparation does."""
    atomic_write(
        path, lambda temp: image.save(temp, format="JPEG" if path.suffix.lower() == ".jpg" else None)
    )


def remove_stale_temps(folder: Path) -> int:
    """Delete the temporary files a killed run left in ``folder``; they are never taken for finished output."""
    if not folder.is_dir() or folder.is_symlink():
        return 0
    removed = 0
    for temp in folder.glob(f".*{TEMP_SUFFIX}"):
        temp.unlink(missing_ok=True)
        removed += 1
    if removed:
        logger.info("removed %d unfinished file(s) left by an interrupted run in %s", removed, folder)
    return removed


# ----------------------------------------------------------------------------------------------------------------
# Sources: folders and archives, read as a stream of entries


@dataclass(frozen=True)
class Entry:
    """One file inside a source. ``read`` of a streamed entry (archives) is valid only until the next entry."""

    path: str  # posix path inside the source
    size: int
    read: Callable[[], Any]
    streamed: bool
    local: Path | None = None
    # Reads another file of the same source by its path (folders and zips; a tar stream cannot go back).
    sibling: Callable[[str], bytes] | None = None


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = archive.extractfile(member)
    if handle is None:
        raise ValueError(f"cannot read {member.name} from the archive")
    return handle.read()


def iter_entries(source: Path, wanted: re.Pattern[str]) -> Iterator[Entry]:
    """The files of a folder or archive whose posix path matches ``wanted``, in storage order.

    Tar archives (also gzip-compressed) are read as one stream, so a ``.tgz`` is decompressed once.

    Raises:
        ValueError: a corrupt or truncated archive (the message names it).
    """
    try:
        if source.is_dir():

            def sibling(other: str) -> bytes:
                return (source / other).read_bytes()

            for dirpath, dirnames, filenames in os.walk(source, followlinks=True):
                dirnames.sort()
                rel_dir = Path(dirpath).relative_to(source).as_posix()
                for name in sorted(filenames):
                    rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                    if wanted.search(rel) and not name.endswith(TEMP_SUFFIX):
                        path = Path(dirpath) / name
                        yield Entry(rel, path.stat().st_size, path.read_bytes, False, path, sibling)
        elif source.name.lower().endswith(".zip"):
            with zipfile.ZipFile(source) as archive:
                for info in archive.infolist():
                    if not info.is_dir() and wanted.search(info.filename):
                        read = partial(archive.read, info)
                        yield Entry(info.filename, info.file_size, read, True, None, archive.read)
        else:
            with tarfile.open(source, "r|*") as archive:
                for member in archive:
                    if member.isfile() and wanted.search(member.name):
                        yield Entry(member.name, member.size, partial(_read_member, archive, member), True)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise ValueError(f"cannot read archive {source} (corrupt or truncated download?): {err}") from None


def _archive_names(path: Path, limit: int) -> list[str]:
    """The first ``limit`` member names of an archive (all of them for zip, whose index is at the end)."""
    try:
        if path.name.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as archive:
                return archive.namelist()
        names = []
        with tarfile.open(path, "r|*") as archive:
            for member in archive:
                names.append(member.name)
                if len(names) >= limit:
                    break
        return names
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise ValueError(f"cannot read archive {path} (corrupt or truncated download?): {err}") from None


# ----------------------------------------------------------------------------------------------------------------
# Finding what each preparer needs among the given sources


def _some_files(folder: Path, count: int = 20) -> list[str]:
    names: list[str] = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file():
                    names.append(entry.name)
                    if len(names) >= count:
                        break
    except OSError:
        return []
    return names


def _has_files(folder: Path, pattern: str) -> bool:
    """Whether one of the first files of ``folder`` matches: enough to recognise a folder without listing it."""
    regex = re.compile(pattern)
    return any(regex.search(name) for name in _some_files(folder, 200))


def _mat_variables(folder: Path) -> set[str]:
    """The variable names of one .mat file in ``folder`` (cheap: scipy reads only the headers)."""
    mats = [n for n in _some_files(folder, 50) if n.endswith(".mat")]
    if not mats:
        return set()
    try:
        from scipy.io import whosmat

        return {name for name, _, _ in whosmat(str(folder / mats[0]))}
    except (ImportError, OSError, ValueError, TypeError, NotImplementedError):  # then it identifies nothing
        return set()


@dataclass(frozen=True)
class Role:
    """One input a preparer needs, and how to recognise it as a folder or an archive."""

    key: str
    title: str
    archives: tuple[str, ...]  # official file names
    marker: str  # regex on member paths that only this input's archive has
    is_root: Callable[[Path], bool]  # is this folder the extracted input?
    download: str
    required: bool = True


def _dir_role(name: str, suffix_regex: str) -> Callable[[Path], bool]:
    return lambda d: d.name == name and _has_files(d, suffix_regex)


ROLES: dict[str, Role] = {
    role.key: role
    for role in (
        Role(
            "voc2012",
            "PASCAL VOC 2012 trainval",
            ("VOCtrainval_11-May-2012.tar",),
            r"VOC2012/SegmentationClass/",
            lambda d: all(
                (d / s).is_dir() for s in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation")
            ),
            "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
        ),
        Role(
            "sbd",
            "SBD (Hariharan et al.) benchmark",
            ("benchmark.tgz",),
            r"(^|/)cls/[^/]+\.mat$",
            lambda d: (
                (d / "cls").is_dir() and (d / "train.txt").is_file() and "GTcls" in _mat_variables(d / "cls")
            ),
            "https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz",
            required=False,
        ),
        Role(
            "coco_train",
            "COCO 2017 train images",
            ("train2017.zip",),
            r"^train2017/[^/]+\.jpg$",
            _dir_role("train2017", r"\.jpg$"),
            "http://images.cocodataset.org/zips/train2017.zip",
            required=False,
        ),
        Role(
            "coco_val",
            "COCO 2017 val images",
            ("val2017.zip",),
            r"^val2017/[^/]+\.jpg$",
            _dir_role("val2017", r"\.jpg$"),
            "http://images.cocodataset.org/zips/val2017.zip",
            required=False,
        ),
        Role(
            "stuffthingmaps",
            "COCO-Stuff stuffthingmaps (182-id PNGs)",
            ("stuffthingmaps_trainval2017.zip",),
            r"(^|/)(train|val)2017/\d+\.png$",
            lambda d: any(_has_files(d / s, r"^\d+\.png$") for s in ("train2017", "val2017")),
            "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip",
        ),
        Role(
            "voc2010",
            "PASCAL VOC 2010 trainval",
            ("VOCtrainval_03-May-2010.tar",),
            r"VOC2010/ImageSets/Main/",
            lambda d: d.name == "VOC2010" and (d / "JPEGImages").is_dir() and (d / "ImageSets/Main").is_dir(),
            "http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar",
        ),
        Role(
            "context",
            "PASCAL Context annotations (459 classes)",
            ("trainval.tar.gz",),
            r"(^|/)trainval/\d{4}_\d{6}\.mat$",
            lambda d: d.name != "cls" and "LabelMap" in _mat_variables(d),
            "https://cs.stanford.edu/~roozbeh/pascal-context/trainval.tar.gz",
        ),
        Role(
            "context_labels",
            "PASCAL Context class names (labels.txt)",
            ("labels.txt",),
            r"(^|/)labels\.txt$",
            lambda d: False,
            "https://cs.stanford.edu/~roozbeh/pascal-context/ (labels.txt)",
            required=False,
        ),
        Role(
            "ade150",
            "ADE20K scene parsing (ADEChallengeData2016)",
            ("ADEChallengeData2016.zip",),
            r"ADEChallengeData2016/annotations/",
            lambda d: (d / "images/validation").is_dir() and (d / "annotations/validation").is_dir(),
            "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
            required=False,
        ),
        Role(
            "ade_full",
            "ADE20K full release (ADE20K_2021_17_01, for ADE-847)",
            ("ADE20K_2021_17_01.zip",),
            r"(^|/)images/ADE/(training|validation)/",
            lambda d: (d / "index_ade20k.pkl").is_file() or (d / "images" / "ADE").is_dir(),
            "https://ade20k.csail.mit.edu/ (registration required)",
            required=False,
        ),
    )
}


def _inside(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def find_sources(
    srcs: Sequence[Path], roles: Sequence[Role], dst: Path | None = None, max_dirs: int = 5000
) -> dict[str, Path]:
    """Assign each role a folder or archive among ``srcs`` (and the folders inside them, 3 levels deep).

    Extracted folders win over archives. Archives are recognised by their official names or, failing that, by
    their member paths. ``dst`` (when inside a source) is not searched, so earlier output is never taken as input.

    Raises:
        FileNotFoundError: a source does not exist, or a required role was found nowhere (the message says what
            is missing and where to download it).
    """
    found: dict[str, Path] = {}
    archives: list[Path] = []
    files: list[Path] = []
    dst = dst.resolve() if dst else None
    for src in srcs:
        src = Path(src).expanduser()
        if not src.exists():
            raise FileNotFoundError(f"source {src} does not exist")
        if src.is_file():
            (archives if is_archive(src) else files).append(src)
            continue
        skip_dst = dst is not None and not _inside(src.resolve(), dst)
        queue: deque[tuple[Path, int]] = deque([(src, 0)])
        visited = 0
        while queue and visited < max_dirs:
            folder, depth = queue.popleft()
            visited += 1
            if skip_dst and _inside(folder.resolve(), dst):  # type: ignore[arg-type]
                continue
            for role in roles:
                if role.key not in found and role.is_root(folder):
                    found[role.key] = folder
            try:
                children = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            for child in children:
                path = Path(child.path)
                if child.is_file() and depth < 2:
                    (archives if is_archive(path) else files).append(path)
                elif child.is_dir() and depth < 3:
                    queue.append((path, depth + 1))
    for path in files:
        for role in roles:
            if role.key not in found and path.name in role.archives:
                found[role.key] = path
    for path in archives:
        by_name = [r for r in roles if r.key not in found and path.name in r.archives]
        if by_name:
            found[by_name[0].key] = path
    for path in archives:
        if path in found.values() or any(path.name in r.archives for r in roles):
            continue
        open_roles = [r for r in roles if r.key not in found]
        if not open_roles:
            break
        names = _archive_names(path, 500)
        for role in open_roles:
            if any(re.search(role.marker, n) for n in names):
                found[role.key] = path
                break
    missing = [r for r in roles if r.required and r.key not in found]
    if missing:
        where = ", ".join(str(s) for s in srcs)
        details = "; ".join(f"{r.title} ({' or '.join(r.archives)}, from {r.download})" for r in missing)
        raise FileNotFoundError(f"not found in {where}: {details}")
    for key, path in found.items():
        logger.info("%s: %s", ROLES[key].title if key in ROLES else key, path)
    return found


# ----------------------------------------------------------------------------------------------------------------
# Checksums


def file_digest(path: Path, algorithm: str = "md5", progress: bool = True) -> str:
    """Hash a file in 8 MiB chunks (with a progress bar for big archives)."""
    from tqdm.auto import tqdm

    digest = hashlib.new(algorithm)
    size = path.stat().st_size
    with (
        path.open("rb") as handle,
        tqdm(
            total=size, unit="B", unit_scale=True, desc=f"{algorithm} {path.name}", disable=not progress
        ) as bar,
    ):
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def verify_archive(path: Path, state: dict[str, Any], progress: bool = True) -> str | None:
    """Check an archive against its published checksum; the result is remembered in ``state`` per size+mtime.

    Returns:
        A note for the summary when there is nothing to check against, else None.

    Raises:
        ValueError: the checksum differs (an incomplete or corrupt download).
    """
    if path.name not in ARCHIVE_CHECKSUMS:
        return f"{path.name}: no published checksum to verify against"
    algorithm, expected = ARCHIVE_CHECKSUMS[path.name]
    stat = path.stat()
    key = str(path.resolve())
    record = state.setdefault("verified", {}).get(key)
    if record and record == [stat.st_size, stat.st_mtime_ns, expected]:
        return None
    actual = file_digest(path, algorithm, progress)
    if actual != expected:
        raise ValueError(
            f"{path}: {algorithm} {actual} differs from the published {expected}; the download is incomplete "
            "or corrupt: download it again (or pass --no-verify to use it anyway)"
        )
    state["verified"][key] = [stat.st_size, stat.st_mtime_ns, expected]
    return None


# ----------------------------------------------------------------------------------------------------------------
# Running conversions


@dataclass
class Step:
    """Counts of one conversion or copy step."""

    name: str
    written: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)

    def line(self) -> str:
        failed = f", {len(self.failed)} failed" if self.failed else ""
        return f"{self.name}: {self.written} written, {self.skipped} already done{failed}"


@dataclass
class Options:
    workers: int = 4
    verify: bool = True
    copy_images: bool = False
    overwrite: bool = False
    progress: bool = True


Outputs = dict[
    Path, Any
]  # output path → uint8/uint16 id array (label file), PIL image, or bytes (copied as is)


def run_step(
    step: Step,
    entries: Iterator[Entry],
    targets: Callable[[Entry], list[Path]],
    convert: Callable[[Any, Entry], Outputs],
    opts: Options,
) -> None:
    """Convert every entry whose ``targets`` are not all present, on ``opts.workers`` threads.

    Archive entries are read on this thread (the stream cannot be shared), folder entries on the workers. A failing
    file is recorded in ``step.failed`` and the others go on.
    """
    from tqdm.auto import tqdm

    def work(entry: Entry, data: bytes | None) -> int:
        outputs = convert(entry.read() if data is None else data, entry)
        for path, value in outputs.items():
            if isinstance(value, bytes):
                write_bytes(path, value)
            elif hasattr(value, "save"):
                write_image(path, value)
            else:
                write_label_png(path, value)
        return len(outputs)

    pending: deque[tuple[Entry, Future[int]]] = deque()

    def collect(block: bool) -> None:
        while pending and (block or pending[0][1].done()):
            entry, future = pending.popleft()
            try:
                future.result()
                step.written += 1
            except (ValueError, OSError) as err:
                step.failed.append(f"{entry.path}: {err}")

    with (
        ThreadPoolExecutor(max(1, opts.workers)) as pool,
        tqdm(desc=step.name, unit="file", disable=not opts.progress, dynamic_ncols=True) as bar,
    ):
        for entry in entries:
            outputs = targets(entry)
            if not outputs:
                continue
            bar.update(1)
            if not opts.overwrite and all(p.is_file() for p in outputs):
                step.skipped += 1
                continue
            data = entry.read() if entry.streamed else None
            pending.append((entry, pool.submit(work, entry, data)))
            if len(pending) >= 4 * max(1, opts.workers):
                collect(block=False)
                if len(pending) >= 8 * max(1, opts.workers):
                    collect(block=True)
        collect(block=True)


def extract_step(name: str, source: Path, pattern: str, dst: Path, opts: Options, steps: list[Step]) -> Step:
    """Copy the files of ``source`` whose path matches ``pattern`` (group ``rel`` = path under ``dst``)."""
    regex = re.compile(pattern)
    step = Step(name)

    def targets(entry: Entry) -> list[Path]:
        match = regex.search(entry.path)
        if not match:
            return []
        path = dst / match.group("rel")
        if path.is_file() and path.stat().st_size != entry.size:
            path.unlink()  # a different or damaged copy: take it again
        return [path]

    run_step(step, iter_entries(source, regex), targets, lambda data, e: {targets(e)[0]: data}, opts)
    steps.append(step)
    return step


def place_folder(source: Path, target: Path, opts: Options, steps: list[Step]) -> None:
    """Make ``target`` hold the files of the folder ``source``: a symlink (default) or a resumable copy."""
    if target.resolve() == source.resolve():
        return
    if target.is_symlink():
        if target.resolve() != source.resolve():
            raise ValueError(
                f"{target} is a link to {target.resolve()}, not to {source}; remove it or use another --dst"
            )
        return
    if not target.exists() and not opts.copy_images:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source.resolve(), target_is_directory=True)
        logger.info("linked %s -> %s", target, source)
        return
    extract_step(f"copy {source.name}", source, r"^(?P<rel>.+)$", target, opts, steps)


def read_id_list(path: Path) -> list[str]:
    """Ids from a VOC-style list (one per line; only the first token counts)."""
    if not path.is_file():
        raise FileNotFoundError(f"list {path} not found")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def write_id_list(path: Path, ids: Sequence[str]) -> None:
    write_bytes(path, "".join(f"{i}\n" for i in ids).encode())


# ----------------------------------------------------------------------------------------------------------------
# The preparers


@dataclass
class PrepareReport:
    """What a preparer did: its steps, the resulting split sizes (read back with clipzss' own reader), notes."""

    dataset: str
    root: Path
    steps: list[Step] = field(default_factory=list)
    splits: dict[str, int] = field(default_factory=dict)
    expected: dict[str, tuple[int, ...]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and not any(s.failed for s in self.steps)

    def format(self) -> str:
        lines = [f"prepare-data {self.dataset}: {self.root}"]
        lines += [f"  {step.line()}" for step in self.steps]
        for split, count in self.splits.items():
            expected = self.expected.get(split, ())
            status = ""
            if expected:
                status = "  (complete)" if count in expected else f"  (expected {expected[0]:,}: a subset?)"
            lines.append(f"  split {split}: {count:,} image/label pairs{status}")
        lines += [f"  note: {note}" for note in self.notes]
        for step in self.steps:
            lines += [f"  FAILED {failure}" for failure in step.failed[:20]]
            if len(step.failed) > 20:
                lines.append(f"  ... and {len(step.failed) - 20} more failures in {step.name}")
        lines += [f"  ERROR {error}" for error in self.errors]
        verdict = "done" if self.ok else "finished with errors (re-run to retry the failed files)"
        if self.dataset in ("ade20k",):  # evaluation-only benchmarks
            use = f"evaluate with data.eval_dataset=ade20k (or ade20k-full) data.eval_root={self.root}"
        else:
            use = f"train with data.dataset={self.dataset} data.root={self.root}"
        lines.append(f"{verdict}; check with: clipzss check-data {self.root} --dataset {self.dataset}; {use}")
        return "\n".join(lines)


def _finish(report: PrepareReport, dataset: str, splits: Sequence[str], label: str = "") -> PrepareReport:
    """Count what clipzss' own reader sees in the output: the proof that training will find it."""
    from clipzss.data.readers import EXPECTED_IMAGES, read_listing

    for split in splits:
        try:
            listing = read_listing(dataset, report.root, split, strict=False)
        except FileNotFoundError as err:  # the sources hold no such split (e.g. a validation-only download)
            report.notes.append(f"{dataset} {split} not prepared: {err}")
            continue
        except ValueError as err:
            report.errors.append(f"{dataset} {split}: {err}")
            continue
        report.splits[label + split] = len(listing.samples)
        report.expected[label + split] = EXPECTED_IMAGES.get(dataset, {}).get(split, ())
        report.errors += listing.problems[:10]
        if len(listing.problems) > 10:
            report.errors.append(f"... and {len(listing.problems) - 10} more missing files in {split}")
    return report


def prepare_voc(sources: dict[str, Path], dst: Path, opts: Options) -> PrepareReport:
    """VOC 2012 + SBD → ``dst/VOCdevkit/VOC2012`` with SegmentationClassAug and train_aug.txt (10,582 ids)."""
    base = dst / "VOCdevkit" / "VOC2012"
    report = PrepareReport("voc", dst)
    steps = report.steps
    voc = sources["voc2012"]
    lists = base / "ImageSets" / "Segmentation"
    if voc.is_dir():
        place_folder(voc / "JPEGImages", base / "JPEGImages", opts, steps)
        place_folder(voc / "SegmentationClass", base / "SegmentationClass", opts, steps)
        extract_step(
            "VOC lists", voc / "ImageSets" / "Segmentation", r"^(?P<rel>[^/]+\.txt)$", lists, opts, steps
        )
    else:
        extract_step(
            "VOC 2012",
            voc,
            r"VOC2012/(?P<rel>(JPEGImages/[^/]+\.jpg|SegmentationClass/[^/]+\.png|ImageSets/Segmentation/[^/]+\.txt))$",
            base,
            opts,
            steps,
        )
    voc_train, voc_val = read_id_list(lists / "train.txt"), read_id_list(lists / "val.txt")

    if "sbd" not in sources:
        report.notes.append(
            "no SBD found (benchmark.tgz): train.txt has 1,464 images instead of the 10,582 of train_aug; "
            f"download it from {ROLES['sbd'].download} and re-run"
        )
        return _finish(report, "voc", ("train", "val"))

    aug_dir = base / "SegmentationClassAug"
    remove_stale_temps(aug_dir)
    voc_annotated = {p.stem for p in (base / "SegmentationClass").glob("*.png")}
    step = Step("VOC masks -> SegmentationClassAug")
    run_step(
        step,
        iter_entries(base / "SegmentationClass", re.compile(r"^[^/]+\.png$")),
        lambda e: [aug_dir / Path(e.path).name],
        lambda data, e: {aug_dir / Path(e.path).name: voc_png_ids(data, e.path)},
        opts,
    )
    steps.append(step)

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

    step = Step("SBD .mat -> SegmentationClassAug")
    wanted = re.compile(rf"{cls_regex.pattern}|{list_regex.pattern}")
    run_step(
        step,
        iter_entries(sources["sbd"], wanted),
        sbd_targets,
        lambda data, e: {sbd_targets(e)[0]: sbd_mat_ids(data, e.path)},
        opts,
    )
    steps.append(step)
    if set(sbd_lists) != {"train", "val"}:
        report.errors.append(f"SBD source {sources['sbd']} has no dataset/train.txt and val.txt")
        return report

    sbd_all = set(sbd_lists["train"]) | set(sbd_lists["val"])
    train_aug = sorted((set(voc_train) | sbd_all) - set(voc_val))
    write_id_list(lists / "train_aug.txt", train_aug)
    write_id_list(lists / "aug.txt", sorted(sbd_all - set(voc_train) - set(voc_val)))  # mmseg's aug list
    report.notes.append(
        f"train_aug.txt = VOC train ({len(voc_train):,}) ∪ SBD train+val ({len(sbd_all):,}) − VOC val "
        f"({len(voc_val):,}) = {len(train_aug):,} ids"
    )
    return _finish(report, "voc", ("train", "val"))


def prepare_coco_stuff(sources: dict[str, Path], dst: Path, opts: Options) -> PrepareReport:
    """COCO 2017 images + stuffthingmaps → ``dst/images/*2017`` and ``dst/annotations/*2017/*_labelTrainIds.png``."""
    report = PrepareReport("coco-stuff", dst)
    for split in ("train", "val"):
        source = sources.get(f"coco_{split}")
        target = dst / "images" / f"{split}2017"
        if source is None:
            if not target.is_dir():
                report.notes.append(
                    f"no {split}2017 images found ({ROLES[f'coco_{split}'].download}): only the labels are converted"
                )
        elif source.is_dir():
            place_folder(source, target, opts, report.steps)
        else:
            extract_step(
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
        remove_stale_temps(dst / "annotations" / f"{split}2017")
    step = Step("stuffthingmaps -> labelTrainIds")
    run_step(
        step,
        iter_entries(sources["stuffthingmaps"], regex),
        targets,
        lambda data, e: {targets(e)[0]: stuffthingmap_ids(data, e.path)},
        opts,
    )
    report.steps.append(step)
    splits = [s for s in ("train", "val") if (dst / "images" / f"{s}2017").is_dir()]
    return _finish(report, "coco-stuff", splits)


def _context_names(text: str, source: str) -> tuple[list[str], list[str]]:
    """labels.txt ('id: name' per line, ids 1..459) → (459 names in id order, notes on the 59-class check)."""
    from clipzss.data.splits import CONTEXT59_CLASSES

    names: dict[int, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, name = line.partition(":")
        if not sep or not key.strip().isdigit() or not name.strip():
            raise ValueError(f"{source} line {number} is not 'id: name': {line.strip()!r}")
        names[int(key)] = name.strip()
    if sorted(names) != list(range(1, CONTEXT_FULL_CLASSES + 1)):
        raise ValueError(f"{source} lists {len(names)} ids; PASCAL Context's labels.txt has ids 1..459")
    notes = []
    for class_id, expected in zip(CONTEXT59_LABEL_IDS, CONTEXT59_CLASSES, strict=True):
        if names[class_id].replace(" ", "").lower() != expected.replace(" ", "").lower():
            notes.append(
                f"{source}: id {class_id} is '{names[class_id]}', expected Context-59 class '{expected}'"
            )
    return [names[i] for i in range(1, CONTEXT_FULL_CLASSES + 1)], notes


def prepare_context(sources: dict[str, Path], dst: Path, opts: Options) -> PrepareReport:
    """VOC 2010 + the 459-class .mat annotations → Context-59 and Context-459 under ``dst/VOCdevkit/VOC2010``."""
    from clipzss.data.readers import CONTEXT459_CLASSES_FILE

    base = dst / "VOCdevkit" / "VOC2010"
    report = PrepareReport("context", dst)
    voc = sources["voc2010"]
    if voc.is_dir():
        place_folder(voc / "JPEGImages", base / "JPEGImages", opts, report.steps)
        extract_step(
            "VOC 2010 lists",
            voc / "ImageSets" / "Main",
            r"^(?P<rel>(train|val)\.txt)$",
            base / "ImageSets/Main",
            opts,
            report.steps,
        )
    else:
        extract_step(
            "VOC 2010",
            voc,
            r"VOC2010/(?P<rel>(JPEGImages/[^/]+\.jpg|ImageSets/Main/(train|val)\.txt))$",
            base,
            opts,
            report.steps,
        )
    out59, out459 = base / "SegmentationClassContext", base / "SegmentationClassContext459"
    for folder in (out59, out459):
        remove_stale_temps(folder)
    regex = re.compile(r"(^|/)(?P<id>\d{4}_\d{6})\.mat$")
    labels_regex = re.compile(r"(^|/)labels\.txt$")
    label_text: dict[str, str] = {}

    def targets(entry: Entry) -> list[Path]:
        if labels_regex.search(entry.path):
            label_text[entry.path] = entry.read().decode("utf-8", errors="replace")
            return []
        match = regex.search(entry.path)
        return [out59 / f"{match['id']}.png", out459 / f"{match['id']}.png"] if match else []

    def convert(data: bytes, entry: Entry) -> Outputs:
        ids59, ids459 = context_mat_ids(data, entry.path)
        paths = targets(entry)
        return {paths[0]: ids59, paths[1]: ids459}

    step = Step("Context .mat -> 59 / 459 classes")
    wanted = re.compile(rf"{regex.pattern}|{labels_regex.pattern}")
    run_step(step, iter_entries(sources["context"], wanted), targets, convert, opts)
    report.steps.append(step)

    annotated = {p.stem for p in out59.glob("*.png")} & {p.stem for p in out459.glob("*.png")}
    for split in ("train", "val"):
        ids = [i for i in read_id_list(base / "ImageSets" / "Main" / f"{split}.txt") if i in annotated]
        write_id_list(base / "ImageSets" / "SegmentationContext" / f"{split}.txt", ids)

    if "context_labels" in sources:
        label_text[str(sources["context_labels"])] = sources["context_labels"].read_text(errors="replace")
    if label_text:
        source, text = next(iter(label_text.items()))
        names, notes = _context_names(text, source)
        report.notes += notes
        write_bytes(base / CONTEXT459_CLASSES_FILE, "".join(f"{n}\n" for n in names).encode())
    elif not (base / CONTEXT459_CLASSES_FILE).is_file():
        report.notes.append(
            "no labels.txt (the 459 class names) found: Context-59 is ready, but evaluating on context-459 needs "
            f"it; download it from {ROLES['context_labels'].download} and re-run"
        )
    _finish(report, "context", ("train", "val"))
    if (base / CONTEXT459_CLASSES_FILE).is_file():
        report.notes.append("context-459 (open-vocabulary evaluation) uses the same lists and images")
    return report


def _ade_full_step(source: Path, base: Path, opts: Options, steps: list[Step]) -> None:
    """ADE20K_2021_17_01 → detectron2's ADE-847 layout: images and 16-bit .tif ids, short side at most 512."""
    import numpy as np
    from PIL import Image

    regex = re.compile(
        r"(^|/)images/ADE/(training|validation)/(.*/)?(?P<name>ADE_(?P<split>train|val)_\d+)_seg\.png$"
    )
    for folder in ("images_detectron2", "annotations_detectron2"):
        for split in ("training", "validation"):
            remove_stale_temps(base / folder / split)

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
                raise ValueError(f"{source}: ADE20K_2021_17_01 must be the .zip or its extracted folder")
            image_path = entry.path[: -len("_seg.png")] + ".jpg"
            read = partial(lambda e, other: (e.sibling(other), e.read()), entry, image_path)
            yield Entry(entry.path, entry.size, read, entry.streamed, entry.local, entry.sibling)

    def convert(data: tuple[bytes, bytes], entry: Entry) -> Outputs:
        image = _open_image(data[0], entry.path[: -len("_seg.png")] + ".jpg").convert("RGB")
        ids = ade_full_ids(data[1], entry.path)
        if ids.shape != (image.height, image.width):
            raise ValueError(
                f"{entry.path} is {ids.shape[0]}x{ids.shape[1]} but its image is {image.height}x{image.width}"
            )
        size = detectron2_size(image.height, image.width)
        if size is not None:
            image = image.resize((size[1], size[0]), Image.BILINEAR)
            ids = np.asarray(Image.fromarray(ids).resize((size[1], size[0]), Image.NEAREST))
        image_out, label_out = targets(entry)
        return {image_out: image, label_out: ids}

    step = Step("ADE20K full -> ADE-847")
    run_step(step, pairs(), targets, convert, opts)
    steps.append(step)


def prepare_ade20k(sources: dict[str, Path], dst: Path, opts: Options) -> PrepareReport:
    """ADEChallengeData2016 → ``dst/ADEChallengeData2016`` as is (the reader applies reduce-zero-label), and, when
    the full release is given, ADE-847 in detectron2's layout under ``dst/ADE20K_2021_17_01``."""
    from clipzss.data.readers import ADE_FULL_FOLDER

    if "ade150" not in sources and "ade_full" not in sources:
        raise FileNotFoundError(
            f"neither {ROLES['ade150'].title} ({ROLES['ade150'].download}) nor the {ROLES['ade_full'].title} "
            "was found in the sources"
        )
    report = PrepareReport("ade20k", dst)
    if "ade150" in sources:
        source, base = sources["ade150"], dst / "ADEChallengeData2016"
        if source.is_dir():
            for sub in ("images", "annotations"):
                place_folder(source / sub, base / sub, opts, report.steps)
        else:
            extract_step(
                "ADEChallengeData2016",
                source,
                r"ADEChallengeData2016/(?P<rel>((images|annotations)/(training|validation)/[^/]+\.(jpg|png))|"
                r"objectInfo150\.txt|sceneCategories\.txt)$",
                base,
                opts,
                report.steps,
            )
        _finish(report, "ade20k", ("train", "val"))
    if "ade_full" in sources:
        _ade_full_step(sources["ade_full"], dst / ADE_FULL_FOLDER, opts, report.steps)
        _finish(report, "ade20k-full", ("train", "val"), label="ade20k-full ")
    else:
        report.notes.append(
            "ADE20K-full (ADE-847) not found: to evaluate on it, add ADE20K_2021_17_01.zip "
            f"({ROLES['ade_full'].download}) to --src and re-run"
        )
    return report


@dataclass(frozen=True)
class Preparer:
    prepare: Callable[[dict[str, Path], Path, Options], PrepareReport]
    roles: tuple[str, ...]


PREPARERS: dict[str, Preparer] = {
    "voc": Preparer(prepare_voc, ("voc2012", "sbd")),
    "coco-stuff": Preparer(prepare_coco_stuff, ("coco_train", "coco_val", "stuffthingmaps")),
    "context": Preparer(prepare_context, ("voc2010", "context", "context_labels")),
    "ade20k": Preparer(prepare_ade20k, ("ade150", "ade_full")),
}


def prepare(
    dataset: str, srcs: Sequence[Path | str], dst: Path | str, opts: Options | None = None
) -> PrepareReport:
    """Prepare ``dataset`` from the official downloads in ``srcs`` into ``dst``; safe to re-run at any point.

    Raises:
        ValueError: unknown dataset, a checksum mismatch or an unreadable archive.
        FileNotFoundError: a required download was not found among ``srcs``.
    """
    from clipzss.data.readers import normalize_dataset_name as normalise_dataset_name

    opts = opts or Options()
    name = normalise_dataset_name(dataset)
    if name not in PREPARERS:
        raise ValueError(
            f"unknown dataset '{dataset}' for prepare-data; choose one of: {', '.join(PREPARERS)}"
        )
    preparer = PREPARERS[name]
    dst = Path(dst).expanduser()
    dst.mkdir(parents=True, exist_ok=True)
    sources = find_sources([Path(s) for s in srcs], [ROLES[r] for r in preparer.roles], dst=dst)
    state_path = dst / STATE_FILE
    state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.is_file() else {}
    notes = []
    for path in sources.values():
        if is_archive(path):
            if not opts.verify:
                notes.append(f"{path.name}: checksum not verified (--no-verify)")
            elif note := verify_archive(path, state, opts.progress):
                notes.append(note)
            write_bytes(state_path, json.dumps(state, indent=1).encode())
    report = preparer.prepare(sources, dst, opts)
    report.notes = notes + report.notes
    return report


# ----------------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", choices=list(PREPARERS), help="which benchmark to prepare")
    parser.add_argument(
        "--src",
        nargs="+",
        required=True,
        help="downloaded archives, their extracted folders, or a folder holding them",
    )
    parser.add_argument("--dst", required=True, help="output root (then data.root=DST)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="conversion threads")
    parser.add_argument("--no-verify", action="store_true", help="skip the archive checksums")
    parser.add_argument(
        "--copy-images", action="store_true", help="copy image folders instead of linking them"
    )
    parser.add_argument("--overwrite", action="store_true", help="convert again even where output exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    opts = Options(
        workers=args.workers,
        verify=not args.no_verify,
        copy_images=args.copy_images,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    report = prepare(args.dataset, args.src, args.dst, opts)
    print(report.format())
    return 0 if report.ok else 1


__all__ = [
    "ARCHIVE_CHECKSUMS",
    "COCO_STUFF_UNUSED_IDS",
    "CONTEXT59_LABEL_IDS",
    "PREPARERS",
    "Options",
    "PrepareReport",
    "coco_stuff_lut",
    "context_luts",
    "context_mat_ids",
    "find_sources",
    "prepare",
    "sbd_mat_ids",
    "stuffthingmap_ids",
    "voc_colormap",
    "voc_png_ids",
]
