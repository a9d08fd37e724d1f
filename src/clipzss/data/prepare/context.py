"""PASCAL Context: VOC 2010 + the 459-class ``trainval/*.mat`` annotations → ``VOCdevkit/VOC2010`` with
``SegmentationClassContext/`` (59 classes + 0 background), ``SegmentationClassContext459/`` (16-bit, 0..458,
65535 ignore), ``ImageSets/SegmentationContext/`` and, from ``labels.txt``, the 459 class names."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from clipzss.data.prepare import runner
from clipzss.data.prepare.archives import Entry, iter_entries, load_mat
from clipzss.data.prepare.sources import Role, mat_variables
from clipzss.data.readers import CONTEXT459_CLASSES_FILE
from clipzss.data.splits import CONTEXT59_CLASSES, WIDE_IGNORE_INDEX
from clipzss.errors import UsageError

# PASCAL Context-59: the ids (in the 459-class LabelMap, 1-based, 0 = unlabelled) of the 59 classes, in the
# alphabetical order of splits.CONTEXT59_CLASSES; the selection used by detail-api and mmseg's converter.
CONTEXT59_LABEL_IDS: tuple[int, ...] = (
    2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113, 115, 144, 158,
    159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324, 326, 347, 349, 354, 355, 360, 366,
    368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458,
)  # fmt: skip
CONTEXT_FULL_CLASSES = 459

# The downloads this preparer reads, and how find_sources recognises each among the sources.
VOC2010 = Role(
    "voc2010",
    "PASCAL VOC 2010 trainval",
    ("VOCtrainval_03-May-2010.tar",),
    r"VOC2010/ImageSets/Main/",
    lambda d: d.name == "VOC2010" and (d / "JPEGImages").is_dir() and (d / "ImageSets/Main").is_dir(),
    "http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar",
)
CONTEXT = Role(
    "context",
    "PASCAL Context annotations (459 classes)",
    ("trainval.tar.gz",),
    r"(^|/)trainval/\d{4}_\d{6}\.mat$",
    lambda d: d.name != "cls" and "LabelMap" in mat_variables(d),
    "https://cs.stanford.edu/~roozbeh/pascal-context/trainval.tar.gz",
)
CONTEXT_LABELS = Role(
    "context_labels",
    "PASCAL Context class names (labels.txt)",
    ("labels.txt",),
    r"(^|/)labels\.txt$",
    lambda d: False,
    "https://cs.stanford.edu/~roozbeh/pascal-context/ (labels.txt)",
    required=False,
)
ROLES = (VOC2010, CONTEXT, CONTEXT_LABELS)


def context_luts() -> tuple[np.ndarray, np.ndarray]:
    """Tables over the 459-class LabelMap values (0..459): → Context-59 (0 background, 1..59) and → 459 ids.

    Context-59 keeps mmseg's file convention (0 = background and every class outside the 59, read with
    reduce-zero-label); Context-459 is 0..458 with 65535 for unlabelled (detectron2's convention).
    """
    to59 = np.zeros(CONTEXT_FULL_CLASSES + 1, dtype=np.uint8)
    to59[list(CONTEXT59_LABEL_IDS)] = np.arange(1, len(CONTEXT59_LABEL_IDS) + 1)
    to459 = np.arange(-1, CONTEXT_FULL_CLASSES, dtype=np.int64)
    to459[0] = WIDE_IGNORE_INDEX
    return to59, to459.astype(np.uint16)


def context_mat_ids(data: bytes, what: str = "Context .mat") -> tuple[np.ndarray, np.ndarray]:
    """A PASCAL Context ``trainval/*.mat`` (``LabelMap``, 459 classes, 0 unlabelled) → (Context-59, Context-459)."""
    mat = load_mat(data, what)
    if "LabelMap" not in mat:
        raise UsageError(
            f"{what} has no 'LabelMap' (keys: {', '.join(sorted(mat))}); is it a PASCAL Context file?"
        )
    labels = np.asarray(mat["LabelMap"])
    if labels.ndim != 2 or labels.dtype.kind not in "iu":
        raise UsageError(f"{what}: LabelMap is not a 2-D integer map (shape {labels.shape}, {labels.dtype})")
    if labels.max(initial=0) > CONTEXT_FULL_CLASSES:
        bad = np.unique(labels[labels > CONTEXT_FULL_CLASSES])[:10].tolist()
        raise UsageError(f"{what}: LabelMap values {bad} exceed the {CONTEXT_FULL_CLASSES} classes")
    to59, to459 = context_luts()
    labels = labels.astype(np.int64)
    return to59[labels], to459[labels]


def _context_names(text: str, source: str) -> tuple[list[str], list[str]]:
    """labels.txt ('id: name' per line, ids 1..459) → (459 names in id order, notes on the 59-class check)."""
    names: dict[int, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, name = line.partition(":")
        if not sep or not key.strip().isdigit() or not name.strip():
            raise UsageError(f"{source} line {number} is not 'id: name': {line.strip()!r}")
        names[int(key)] = name.strip()
    if sorted(names) != list(range(1, CONTEXT_FULL_CLASSES + 1)):
        raise UsageError(f"{source} lists {len(names)} ids; PASCAL Context's labels.txt has ids 1..459")
    notes = []
    for class_id, expected in zip(CONTEXT59_LABEL_IDS, CONTEXT59_CLASSES, strict=True):
        if names[class_id].replace(" ", "").lower() != expected.replace(" ", "").lower():
            notes.append(
                f"{source}: id {class_id} is '{names[class_id]}', expected Context-59 class '{expected}'"
            )
    return [names[i] for i in range(1, CONTEXT_FULL_CLASSES + 1)], notes


def prepare_context(sources: dict[str, Path], dst: Path, opts: runner.Options) -> runner.PrepareReport:
    """VOC 2010 + the 459-class .mat annotations → Context-59 and Context-459 under ``dst/VOCdevkit/VOC2010``."""
    base = dst / "VOCdevkit" / "VOC2010"
    report = runner.PrepareReport("context", dst)
    voc = sources["voc2010"]
    if voc.is_dir():
        runner.place_folder(voc / "JPEGImages", base / "JPEGImages", opts, report.steps)
        runner.extract_step(
            "VOC 2010 lists",
            voc / "ImageSets" / "Main",
            r"^(?P<rel>(train|val)\.txt)$",
            base / "ImageSets/Main",
            opts,
            report.steps,
        )
    else:
        runner.extract_step(
            "VOC 2010",
            voc,
            r"VOC2010/(?P<rel>(JPEGImages/[^/]+\.jpg|ImageSets/Main/(train|val)\.txt))$",
            base,
            opts,
            report.steps,
        )
    out59, out459 = base / "SegmentationClassContext", base / "SegmentationClassContext459"
    for folder in (out59, out459):
        runner.remove_stale_temps(folder)
    regex = re.compile(r"(^|/)(?P<id>\d{4}_\d{6})\.mat$")
    labels_regex = re.compile(r"(^|/)labels\.txt$")
    label_text: dict[str, str] = {}

    def targets(entry: Entry) -> list[Path]:
        if labels_regex.search(entry.path):
            label_text[entry.path] = entry.read().decode("utf-8", errors="replace")
            return []
        match = regex.search(entry.path)
        return [out59 / f"{match['id']}.png", out459 / f"{match['id']}.png"] if match else []

    def convert(data: bytes, entry: Entry) -> runner.Outputs:
        ids59, ids459 = context_mat_ids(data, entry.path)
        paths = targets(entry)
        return {paths[0]: ids59, paths[1]: ids459}

    wanted = re.compile(rf"{regex.pattern}|{labels_regex.pattern}")
    runner.run_step(
        "Context .mat -> 59 / 459 classes",
        iter_entries(sources["context"], wanted),
        targets,
        convert,
        opts,
        report.steps,
    )

    annotated = {p.stem for p in out59.glob("*.png")} & {p.stem for p in out459.glob("*.png")}
    for split in ("train", "val"):
        ids = [i for i in runner.read_id_list(base / "ImageSets" / "Main" / f"{split}.txt") if i in annotated]
        runner.write_id_list(base / "ImageSets" / "SegmentationContext" / f"{split}.txt", ids)

    if "context_labels" in sources:
        label_text[str(sources["context_labels"])] = sources["context_labels"].read_text(errors="replace")
    if label_text:
        source, text = next(iter(label_text.items()))
        names, notes = _context_names(text, source)
        report.notes += notes
        runner.write_bytes(base / CONTEXT459_CLASSES_FILE, "".join(f"{n}\n" for n in names).encode())
    elif not (base / CONTEXT459_CLASSES_FILE).is_file():
        report.notes.append(
            "no labels.txt (the 459 class names) found: Context-59 is ready, but evaluating on context-459 needs "
            f"it; download it from {CONTEXT_LABELS.download} and re-run"
        )
    runner.finish(report, "context", ("train", "val"))
    if (base / CONTEXT459_CLASSES_FILE).is_file():
        report.notes.append("context-459 (open-vocabulary evaluation) uses the same lists and images")
    return report
