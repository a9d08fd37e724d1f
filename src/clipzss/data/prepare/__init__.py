"""The library of ``clipzss prepare-data``: the official downloads → the mmsegmentation layouts clipzss reads
(docs/protocols.md).

Each preparer takes the archives as downloaded (tar/zip, read in place: only what is needed is extracted) or the
folders they were extracted to, and writes:

- ``voc`` (:mod:`.voc`): ``VOCdevkit/VOC2012`` with ``SegmentationClassAug/`` (SBD ``cls/*.mat`` and VOC's own
  masks as index PNGs; VOC's annotation wins where both exist) and ``train_aug.txt`` = VOC train ∪ SBD train ∪
  SBD val − VOC val (10,582 ids), plus mmseg's ``aug.txt``.
- ``coco-stuff`` (:mod:`.coco_stuff`): ``annotations/{train,val}2017/*_labelTrainIds.png`` (171 classes) from the
  182-id stuffthingmaps.
- ``context`` (:mod:`.context`): ``VOCdevkit/VOC2010`` with ``SegmentationClassContext/`` (59 classes + 0
  background), ``SegmentationClassContext459/`` (16-bit, 0..458, 65535 ignore) and
  ``ImageSets/SegmentationContext/``.
- ``ade20k`` (:mod:`.ade20k`): ``ADEChallengeData2016`` as is (the reader applies reduce-zero-label) and, when the
  full release ``ADE20K_2021_17_01`` is given, ADE-847 in detectron2's layout (16-bit ``.tif`` ids, 65535 ignore).

Shared by them: :mod:`.archives` (folders and archives as entries), :mod:`.sources` (finding each input among the
sources), :mod:`.checksums` (the published checksums) and :mod:`.runner` (running the conversions, the report).

Every run is resumable and idempotent: each output file is written through :func:`clipzss.files.atomic_write`
(a temporary renamed when complete), so an interrupted run never leaves a half-written file; re-running skips
finished files and deletes the temporaries a killed run left. Image folders given as folders are linked
(``copy_images=True`` copies them).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipzss.data.prepare import ade20k, coco_stuff, context, voc
from clipzss.data.prepare.archives import is_archive
from clipzss.data.prepare.checksums import ARCHIVE_CHECKSUMS, verify_archive
from clipzss.data.prepare.coco_stuff import COCO_STUFF_UNUSED_IDS, coco_stuff_lut, stuffthingmap_ids
from clipzss.data.prepare.context import CONTEXT59_LABEL_IDS, context_luts, context_mat_ids
from clipzss.data.prepare.runner import Options, PrepareReport, write_bytes
from clipzss.data.prepare.sources import Role, find_sources
from clipzss.data.prepare.voc import sbd_mat_ids, voc_png_ids
from clipzss.data.readers import normalize_dataset_name
from clipzss.errors import UsageError

STATE_FILE = ".clipzss-prepare.json"


@dataclass(frozen=True)
class Preparer:
    prepare: Callable[[dict[str, Path], Path, Options], PrepareReport]
    roles: tuple[Role, ...]


PREPARERS: dict[str, Preparer] = {
    "voc": Preparer(voc.prepare_voc, voc.ROLES),
    "coco-stuff": Preparer(coco_stuff.prepare_coco_stuff, coco_stuff.ROLES),
    "context": Preparer(context.prepare_context, context.ROLES),
    "ade20k": Preparer(ade20k.prepare_ade20k, ade20k.ROLES),
}


def prepare(
    dataset: str,
    srcs: Sequence[Path | str],
    dst: Path | str,
    *,
    workers: int = 4,
    verify: bool = True,
    copy_images: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> PrepareReport:
    """Prepare ``dataset`` from the official downloads in ``srcs`` into ``dst``; safe to re-run at any point.

    Args:
        dataset: a key of :data:`PREPARERS` (any case, ``_`` or ``-``).
        srcs: archives, the folders they were extracted to, or folders holding either.
        dst: the output root (then ``data.root=dst``).
        workers: conversion threads.
        verify: check archives with official names against their published checksums.
        copy_images: copy image folders given as folders instead of linking them.
        overwrite: convert again where the output exists.
        progress: show progress bars.

    Raises:
        ValueError: unknown dataset, a checksum mismatch or an unreadable archive.
        FileNotFoundError: a required download was not found among ``srcs``.
    """
    opts = Options(
        workers=workers, verify=verify, copy_images=copy_images, overwrite=overwrite, progress=progress
    )
    name = normalize_dataset_name(dataset)
    if name not in PREPARERS:
        raise UsageError(
            f"unknown dataset '{dataset}' for prepare-data; choose one of: {', '.join(PREPARERS)}"
        )
    preparer = PREPARERS[name]
    dst = Path(dst).expanduser()
    dst.mkdir(parents=True, exist_ok=True)
    sources = find_sources([Path(s) for s in srcs], preparer.roles, dst=dst)
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
    "voc_png_ids",
]
