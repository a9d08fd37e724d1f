"""Running a preparer's steps: converting or copying entries on worker threads into files that are either complete
or absent (:func:`clipzss.files.atomic_write`), skipping what a previous run finished, and the report of it all.

A killed run can leave only the writer's temporaries (``.<name>.<8 characters>.tmp``); each preparer removes
them from its label folders (:func:`remove_stale_temps`) before converting, and no step takes one for input.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from clipzss.data.prepare.archives import Entry, iter_entries
from clipzss.data.readers import EXPECTED_IMAGES, read_listing
from clipzss.errors import UsageError
from clipzss.files import atomic_write, remove_stale_temporaries

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Output files


def write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda temp: temp.write_bytes(data))


def write_label_png(path: Path, ids: np.ndarray) -> None:
    """Write (H, W) ids as a grey PNG (or TIFF for a ``.tif`` path): 8-bit for uint8, 16-bit for uint16 ids."""
    if ids.dtype.name not in ("uint8", "uint16"):
        raise UsageError(f"label maps are written as uint8 or uint16, got {ids.dtype} for {path}")
    image = Image.fromarray(ids)
    file_format = "TIFF" if path.suffix.lower() in (".tif", ".tiff") else "PNG"
    atomic_write(path, lambda temp: image.save(temp, format=file_format))


def write_image(path: Path, image: Image.Image) -> None:
    """Write a PIL image; JPEG at PIL's default quality, as detectron2's ADE-847 preparation does."""
    atomic_write(
        path, lambda temp: image.save(temp, format="JPEG" if path.suffix.lower() == ".jpg" else None)
    )


def remove_stale_temps(folder: Path) -> int:
    """Delete the temporaries a killed run left in ``folder``; they are never taken for finished output.

    A linked folder (the user's own images, see :func:`place_folder`) is not ours to clean and is left alone.
    """
    if not folder.is_dir() or folder.is_symlink():
        return 0
    return remove_stale_temporaries(folder)[0]


# ----------------------------------------------------------------------------------------------------------------
# Steps


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


# output path → uint8/uint16 id array (label file), PIL image, or bytes (copied as is)
Outputs = dict[Path, Any]


def run_step(
    name: str,
    entries: Iterator[Entry],
    targets: Callable[[Entry], list[Path]],
    convert: Callable[[Any, Entry], Outputs],
    opts: Options,
    steps: list[Step],
) -> Step:
    """A step named ``name``, added to ``steps``: convert every entry whose ``targets`` are not all present, on
    ``opts.workers`` threads.

    Archive entries are read on this thread (the stream cannot be shared), folder entries on the workers. A failing
    file is recorded in ``step.failed`` and the others go on.
    """
    step = Step(name)
    steps.append(step)

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
    return step


def into_first_target(
    targets: Callable[[Entry], list[Path]], decode: Callable[[Any, str], Any]
) -> Callable[[Any, Entry], Outputs]:
    """The converter of a step with one output an entry: ``decode(data, entry.path)``, written to its first target."""
    return lambda data, entry: {targets(entry)[0]: decode(data, entry.path)}


def extract_step(name: str, source: Path, pattern: str, dst: Path, opts: Options, steps: list[Step]) -> Step:
    """Copy the files of ``source`` whose path matches ``pattern`` (group ``rel`` = path under ``dst``)."""
    regex = re.compile(pattern)

    def targets(entry: Entry) -> list[Path]:
        match = regex.search(entry.path)
        if not match:
            return []
        path = dst / match.group("rel")
        if path.is_file() and path.stat().st_size != entry.size:
            path.unlink()  # a different or damaged copy: take it again
        return [path]

    copy = into_first_target(targets, lambda data, _: data)
    return run_step(name, iter_entries(source, regex), targets, copy, opts, steps)


def place_folder(source: Path, target: Path, opts: Options, steps: list[Step]) -> None:
    """Make ``target`` hold the files of the folder ``source``: a symlink (default) or a resumable copy."""
    if target.resolve() == source.resolve():
        return
    if target.is_symlink():
        if target.resolve() != source.resolve():
            raise UsageError(
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
# The report


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


def finish(report: PrepareReport, dataset: str, splits: Sequence[str], label: str = "") -> PrepareReport:
    """Count what clipzss' own reader sees in the output: the proof that training will find it."""
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
