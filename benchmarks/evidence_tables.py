"""The tables of benchmarks/evidence.py: plain functions from run results to Markdown rows, and the machine line."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
from pathlib import Path

import torch

from clipzss.worlds import students as ws

METRICS = ("mIoU(S)", "mIoU(U)", "hIoU")
LAMBDAS = (0.6, 0.7, 0.8, 0.85, 0.9, 0.95)  # the fusion thresholds of the token-centring table
SHARES = (0.3, 0.5, 0.7, 0.9, 1.0)  # the max_seen_share values of the seen-rim table


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()} CPU cores ({model}), torch {torch.__version__}, Python {platform.python_version()}"
    )


def fmt(value: float, digits: int = 3) -> str:
    return "-" if not math.isfinite(value) else f"{value:.{digits}f}"


def quality_table(rows: dict[str, dict[str, float]], title: str) -> list[str]:
    lines = [
        f"| {title} | purity | NMI | coverage | regions / image | unseen classes / image |",
        "|---|---|---|---|---|---|",
    ]
    for name, q in rows.items():
        lines.append(
            f"| {name} | {fmt(q['purity'])} | {fmt(q['NMI'])} | {fmt(q['coverage'])} | {fmt(q['regions/image'], 2)} "
            f"| {fmt(q['classes/image'], 2)} |"
        )
    return lines


def centring_table(rows: dict[str, dict[str, float]], worlds: list[str]) -> list[str]:
    lines = [
        "| world | tokens | " + " | ".join(f"λ = {lam:g}" for lam in LAMBDAS) + " |",
        "|---|---|" + "---|" * len(LAMBDAS),
    ]
    for world in worlds:
        for mode in ("raw", "centred"):
            cells = []
            for lam in LAMBDAS:
                q = rows[f"{world} | {mode} | {lam:g}"]
                cells.append(f"{fmt(q['NMI'], 2)} / {fmt(q['purity'], 2)}")
            lines.append(f"| {world} | {mode} | {' | '.join(cells)} |")
    return lines


def rim_table(rims: dict[str, dict[float, dict[str, float]]]) -> list[str]:
    lines = [
        "| data | " + " | ".join(f"share ≤ {s:g}" for s in SHARES) + " |",
        "|---|" + "---|" * len(SHARES),
    ]
    for name, rows in rims.items():
        cells = [f"{fmt(rows[s]['rim labelled'], 2)} / {fmt(rows[s]['other labelled'], 2)}" for s in SHARES]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return lines


def world_table(
    world: str, runs: list[dict[str, object]], teacher_row: dict[str, float], variants: list[str]
) -> list[str]:
    by_variant: dict[str, list[dict[str, object]]] = {}
    for r in runs:
        by_variant.setdefault(str(r["variant"]), []).append(r)
    lines = [
        f"#### {world}",
        "",
        "| method | mIoU(S) | mIoU(U) | hIoU | U ÷ teacher U | s / run |",
        "|---|---|---|---|---|---|",
        f"| teacher at inference (its dense tokens vs text; reference, not a student) | {teacher_row['mIoU(S)']:.1f} "
        f"| {teacher_row['mIoU(U)']:.1f} | {teacher_row['hIoU']:.1f} | 1.00 | - |",
    ]
    for variant in variants:
        rows = by_variant.get(variant)
        if not rows:
            continue
        cells = [mean_std([float(r[m]) for r in rows]) for m in METRICS]
        ratio = statistics.mean(float(r["mIoU(U)"]) for r in rows) / max(teacher_row["mIoU(U)"], 1e-9)
        seconds = statistics.mean(float(r["seconds"]) for r in rows)
        name = f"**{variant}**" if variant == ws.FULL else variant
        lines.append(f"| {name} | {' | '.join(cells)} | {ratio:.2f} | {seconds:.0f} |")
    return lines


def per_seed_table(runs: list[dict[str, object]], variants: list[str], seeds: list[int]) -> list[str]:
    lines = ["| method | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for variant in variants:
        rows = {int(r["seed"]): r for r in runs if r["variant"] == variant}
        if rows:
            cells = [
                " / ".join(f"{float(rows[s][m]):.1f}" for m in METRICS) if s in rows else "-" for s in seeds
            ]
            lines.append(f"| {variant} | {' | '.join(cells)} |")
    return lines


def alignment_table(runs: list[dict[str, object]]) -> list[str]:
    lines = [
        "| run | regions | cos(teacher region mean, true text) | top-1 | cos(P_pseudo, true text) | top-1 |",
        "|---|---|---|---|---|---|",
    ]
    shown: set[str] = set()
    for r in sorted(runs, key=lambda r: (str(r["variant"]), int(r["seed"]))):
        a = r.get("alignment")
        if not isinstance(a, dict):
            continue
        name = f"{r['variant']}, seed {r['seed']}"
        if "synth cos" not in a:  # teacher region means do not depend on the student: one row per variant
            if r["variant"] in shown:
                continue
            shown.add(str(r["variant"]))
            name = f"{r['variant']} (every seed)"
        lines.append(
            f"| {name} | {a['regions']:.0f} | {fmt(a['teacher cos'])} | "
            f"{fmt(a['teacher top-1'], 2)} | {fmt(a.get('synth cos', math.nan))} | {fmt(a.get('synth top-1', math.nan), 2)} |"
        )
    return lines


def guard_section(results: list[dict[str, object]], guard_iters: int, seeds: list[int]) -> list[str]:
    """Baseline vs default mIoU(U) per seed at the CI guard's short setting: the margin the test relies on."""
    rows = {(str(r["variant"]), int(r["seed"])): r for r in results if r.get("guard")}
    if not rows:
        return []
    lines = [
        "",
        f"### CI guard setting ({guard_iters} iterations, default world, tests/test_world_synthetic.py)",
        "",
        "| seed | baseline mIoU(U) | default mIoU(U) | margin | baseline mIoU(S) | default mIoU(S) |",
        "|---|---|---|---|---|---|",
    ]
    margins = []
    for seed in seeds:
        base, full = rows.get((ws.BASELINE, seed)), rows.get((ws.FULL, seed))
        if base is None or full is None:
            continue
        margin = float(full["mIoU(U)"]) - float(base["mIoU(U)"])
        margins.append(margin)
        lines.append(
            f"| {seed} | {float(base['mIoU(U)']):.1f} | {float(full['mIoU(U)']):.1f} | {margin:.1f} "
            f"| {float(base['mIoU(S)']):.1f} | {float(full['mIoU(S)']):.1f} |"
        )
    if margins:
        lines += [
            "",
            f"Margin min {min(margins):.1f}, mean {statistics.mean(margins):.1f} over {len(margins)} seeds.",
        ]
    return lines
