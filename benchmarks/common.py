"""Timing helpers shared by the benchmarks: paired repetitions, medians, ratios, peak memory, machine description.

Our machines are shared and noisy, so every figure the benchmarks report is a *ratio measured in the same run*:
the candidates of one comparison are timed in interleaved order (A B C, B C A, C A B, ...) after a warm-up, and the
ratio of two candidates is the median over repetitions of their per-repetition ratio, which cancels most of the
drift a neighbour's load causes. Absolute times (medians) are printed too, with the load average beside them.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset before each measurement); on CPU the process's
peak resident set size (``VmHWM`` from /proc/self/status, reset through /proc/self/clear_refs), reported as the
peak above the resident size at the reset (freed heap pages are first returned to the OS with glibc's
``malloc_trim``), so the figure is the measured call's own working set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --- machine ----------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> tuple[float, float, float]:
    """1/5/15-minute load averages (what `uptime` prints); zeros where the OS has none."""
    try:
        return os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)


def machine_info(device: torch.device) -> dict[str, Any]:
    """Everything a reader needs to judge a figure: CPU, cores, threads, torch, GPU name, load."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
        "load_average": [round(v, 2) for v in load_average()],
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def describe(info: dict[str, Any]) -> str:
    where = info.get("gpu") or f"{info['cpu']}, {info['nproc']} cores, {info['torch_threads']} torch threads"
    load = " ".join(f"{v:.2f}" for v in info["load_average"])
    return f"{where}; torch {info['torch']}; load average {load}"


# --- timing -----------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of one call, the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


@dataclass
class Timing:
    """Per-repetition seconds of each candidate of one comparison (same run, interleaved)."""

    seconds: dict[str, list[float]]
    load: tuple[float, float, float] = field(default_factory=load_average)

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def ratio(self, name: str, baseline: str) -> float:
        """Median over repetitions of t(name) / t(baseline) in the same repetition."""
        pairs = zip(self.seconds[name], self.seconds[baseline], strict=True)
        return statistics.median(a / b for a, b in pairs)

    def spread(self, name: str) -> float:
        """(max - min) / median of one candidate's repetitions: how noisy the figure is."""
        values = self.seconds[name]
        return (max(values) - min(values)) / max(statistics.median(values), 1e-12)


def compare(
    candidates: dict[str, Callable[[], Any]], device: torch.device, reps: int = 5, warmup: int = 1
) -> Timing:
    """Time each candidate ``reps`` times after ``warmup`` calls, in rotating order within each repetition."""
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            candidates[name]()
    synchronize(device)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            seconds[name].append(timed(candidates[name], device))
    return Timing(seconds)


# --- memory -----------------------------------------------------------------------------------------------------

_STATUS = Path("/proc/self/status")


def _status_kib(key: str) -> int | None:
    try:
        match = re.search(rf"^{key}:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _release_free_heap() -> None:
    """Give freed heap pages back to the OS (glibc), so an earlier run's retained pages cannot hide a peak."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    _release_free_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class PeakMemory:
    """Filled by `peak_memory`: megabytes above the level at entry (CPU RSS or CUDA allocated)."""

    kind: str = ""
    megabytes: float = float("nan")


@contextmanager
def peak_memory(device: torch.device):
    """Measure the peak memory of the enclosed code: CUDA max allocated, or the CPU peak RSS above the start.

    On CPU without /proc (not Linux) the process-lifetime ``ru_maxrss`` is reported instead (an upper bound).
    """
    result = PeakMemory()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        synchronize(device)
        result.kind = "CUDA max allocated"
        result.megabytes = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return
    resettable = _reset_peak_rss()
    base = _status_kib("VmRSS") if resettable else None
    yield result
    peak = _status_kib("VmHWM")
    if resettable and base is not None and peak is not None:
        result.kind = "CPU peak RSS"
        result.megabytes = (peak - base) / 1024
    else:
        result.kind = "CPU ru_maxrss (process lifetime)"
        result.megabytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- command line and output ------------------------------------------------------------------------------------


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="auto", help="cpu | cuda | auto (default: cuda when present)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)"
    )
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per candidate")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per candidate first")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--dry", action="store_true", help="tiny sizes: checks the script runs, not a figure")
    return parser


def setup(args: argparse.Namespace) -> torch.device:
    """Apply --threads and --device; returns the device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return device


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report(title: str, info: dict[str, Any], table: str, payload: dict[str, Any], path: Path | None) -> None:
    """Print the table under a heading that names the machine; write the JSON when asked."""
    print(f"\n## {title}\n\n{describe(info)}\n\n{table}\n", flush=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"title": title, "machine": info, **payload}, indent=2) + "\n")


def target(met: bool) -> str:
    return "met" if met else "MISSED"


def named_label_quality(
    dense: torch.Tensor,
    texts: torch.Tensor,
    truth: torch.Tensor,
    split: Any,
    tau: float,
    thresholds: Sequence[float],
) -> list[dict[str, float]]:
    """The transductive setting's named labels (`clipzss.method.transductive.name_pixels`, the trainer's code) on
    frames whose ``truth`` (B, H, W) holds every class's id (255 = void): of the unseen pixels, the share named at
    each threshold and the share of those named right. ``texts`` are the seen then the unseen names' embeddings."""
    from clipzss.data import IGNORE_INDEX, seen_lookup
    from clipzss.method.transductive import name_pixels

    valid = truth != IGNORE_INDEX
    labels = torch.where(valid, seen_lookup(split)[truth.clamp(0, IGNORE_INDEX)], IGNORE_INDEX)
    num_seen = len(split.seen)
    true_id = torch.full_like(truth, -1)
    for t, c in enumerate(split.unseen):
        true_id[truth == c] = num_seen + t
    unlabelled = (labels == IGNORE_INDEX) & valid
    rows = []
    for threshold in thresholds:
        named = name_pixels(dense, texts, labels, num_seen, 1 / tau, threshold, valid)
        got = unlabelled & (named != IGNORE_INDEX)
        rows.append(
            {
                "threshold": threshold,
                "named": float(got.sum() / unlabelled.sum().clamp_min(1)),
                "precision": float((got & (named == true_id)).sum() / got.sum().clamp_min(1)),
            }
        )
    return rows
