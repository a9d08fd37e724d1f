"""Evidence that CLIP-ZSS works, in the synthetic world where the answer is known (see synthetic_world.py).

One command reproduces the ablation table and the pseudo-label quality report:

    .venv/bin/python benchmarks/evidence.py --seeds 3 --guard-iters 120 --jobs 2

Every student is trained by the ordinary ``clipzss.training.train`` with the aligned teacher and evaluated by
``clipzss.evaluate`` (all 16 class names predicted jointly). The results go between the markers of
benchmarks/README.md (text outside the markers, e.g. the findings, is kept).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import synthetic_world as sw

from clipzss.config import MethodConfig
from clipzss.inspect import QualityAccumulator, clustering_variants, pseudo_regions
from clipzss.pseudo_labels import window_sizes

log = logging.getLogger("evidence")

BEGIN, END = "<!-- evidence:begin -->", "<!-- evidence:end -->"
METRICS = ("mIoU(S)", "mIoU(U)", "hIoU")
LAMBDAS = (0.5, 0.7, 0.8, 0.85, 0.9, 0.95)
DIVISORS = ((2,), (4,), (8,), (2, 4), (4, 8), (2, 4, 8), (2, 4, 8, 16))


# ----------------------------------------------------------------------------------------------------------------
# Pseudo-label quality


def pseudo_label_quality(
    teacher: sw.AlignedTeacher, world: sw.WorldConfig, num_images: int
) -> dict[str, dict[str, dict[str, float]]]:
    """Purity / NMI / coverage of the pseudo regions on the unseen (ignored) pixels of training scenes.

    Returns tables: "variants" (each scale, all scales unfused, fused: the training default), "lambda" (fused, λ
    sweep) and "windows" (fused, window-divisor sweep).
    """
    scenes = sw.WorldScenes(world, "train", num_images)
    items = [scenes.load(i) for i in range(num_images)]
    images = sw._normalise(torch.stack([it[0] for it in items]))  # (N, 3, H, W)
    truth = torch.stack([it[1] for it in items])  # (N, H, W) every class
    unlabelled = torch.isin(truth, torch.tensor(scenes.unseen))  # what training fills with pseudo labels
    evaluated = torch.where(unlabelled, truth, 255).numpy()
    _, dense = teacher.encode_image(images)  # (N, C, h, w)
    grid = tuple(dense.shape[-2:])
    method = MethodConfig()

    def score(windows: list[int], threshold: float | None) -> dict[str, float]:
        acc = QualityAccumulator()
        regions = pseudo_regions(dense, unlabelled, windows, threshold, method).numpy()
        for i in range(num_images):
            acc.add(evaluated[i], regions[i])
        return acc.summary()

    tables: dict[str, dict[str, dict[str, float]]] = {"variants": {}, "lambda": {}, "windows": {}}
    for name, (windows, threshold) in clustering_variants(method, grid).items():
        tables["variants"][name] = score(windows, threshold)
    sizes = window_sizes(*grid, method.window_divisors)
    for lam in LAMBDAS:
        tables["lambda"][f"λ = {lam:g}"] = score(sizes, lam)
    for divisors in DIVISORS:
        windows = window_sizes(*grid, divisors)
        tables["windows"][f"divisors {divisors} → windows {tuple(windows)}"] = score(
            windows, method.fusion_threshold
        )
    return tables


# ----------------------------------------------------------------------------------------------------------------
# Ablation runs


@dataclasses.dataclass(frozen=True)
class Job:
    variant: str
    seed: int
    iters: int
    batch_size: int
    cache_dir: str | None
    workdir: str
    guard: bool = False  # a run of the CI guard's short setting


def run_job(job: Job) -> dict[str, object]:
    """Train and evaluate one (variant, seed); runs in a worker process with one thread."""
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # the random-teacher / smp warnings of 24 runs would drown the table
    world = sw.WorldConfig()
    teacher = sw.load_teacher(world, cache_dir=job.cache_dir)
    out = Path(job.workdir) / f"{abs(hash(job.variant)) % 10**8}_{job.seed}_{job.iters}"
    cfg = sw.student_config(out, sw.VARIANTS[job.variant], job.seed, job.iters, job.batch_size, world)
    train_set, val_set = sw.world_datasets(cfg, world)
    tic = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # progress bars
        metrics = sw.train_and_evaluate(cfg, teacher, train_set, val_set)
    seconds = time.perf_counter() - tic
    return {
        "variant": job.variant,
        "seed": job.seed,
        "iters": job.iters,
        "guard": job.guard,
        "seconds": seconds,
        **metrics,
    }


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


# ----------------------------------------------------------------------------------------------------------------
# Report


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


def _q(value: float, digits: int = 3) -> str:
    return "-" if not math.isfinite(value) else f"{value:.{digits}f}"


def quality_table(rows: dict[str, dict[str, float]], title: str) -> list[str]:
    lines = [
        f"| {title} | purity | NMI | coverage | regions / image | unseen classes / image |",
        "|---|---|---|---|---|---|",
    ]
    for name, q in rows.items():
        lines.append(
            f"| {name} | {_q(q['purity'])} | {_q(q['NMI'])} | {_q(q['coverage'])} | {_q(q['regions/image'], 2)} "
            f"| {_q(q['classes/image'], 2)} |"
        )
    return lines


def report(
    args: argparse.Namespace,
    results: list[dict[str, object]],
    teacher_row: dict[str, float],
    quality: dict[str, dict[str, dict[str, float]]],
    elapsed: float,
) -> str:
    world, spec = sw.WorldConfig(), sw.TeacherSpec()
    cfg = sw.student_config("run", {}, 0, args.iters, args.batch_size, world)
    seeds = sorted({int(r["seed"]) for r in results})
    by_variant: dict[str, list[dict[str, object]]] = {}
    for r in results:
        if r.get("guard"):
            continue
        by_variant.setdefault(str(r["variant"]), []).append(r)
    lines = [
        BEGIN,
        "",
        f"Command: `python benchmarks/evidence.py --seeds {args.seeds} --iters {args.iters} --batch-size "
        f"{args.batch_size} --guard-iters {args.guard_iters} --jobs {args.jobs}` — {elapsed / 60:.1f} min wall-clock on {machine()}.",
        "",
        f"World: {len(sw.WORLD_CLASSES)} classes ({len(sw.WORLD_UNSEEN)} unseen: {', '.join(sw.WORLD_UNSEEN)}), "
        f"{world.size}² scenes of {world.cells[0]}–{world.cells[1]} Voronoi cells; 8192 training scenes (none repeats in a run), 64 "
        f"validation scenes. Teacher: {spec.embed_dim}-d tokens at stride 4 ({world.size // 4}² grid), nuisance "
        f"{spec.nuisance}, leak {spec.leak}. Student: {cfg.student.arch}/{cfg.student.encoder} from scratch, "
        f"embed_dim {cfg.student.embed_dim}, {args.iters} iterations × batch {args.batch_size}, AdamW lr "
        f"{cfg.train.lr:g}, method hyper-parameters at their defaults (λ = {cfg.method.fusion_threshold}, window "
        f"divisors {tuple(cfg.method.window_divisors)}, bank {cfg.method.bank_size}). Seeds {seeds} (student init "
        "and data order; world, teacher and validation set fixed). Mean ± sample std over seeds.",
        "",
        "### Ablations (validation mIoU, %)",
        "",
        "| method | mIoU(S) | mIoU(U) | hIoU | s / run |",
        "|---|---|---|---|---|",
        f"| teacher at inference (its dense tokens vs text; reference, not a student) | {teacher_row['mIoU(S)']:.1f} "
        f"| {teacher_row['mIoU(U)']:.1f} | {teacher_row['hIoU']:.1f} | - |",
    ]
    for variant in sw.VARIANTS:
        runs = by_variant.get(variant)
        if not runs:
            continue
        cells = [mean_std([float(r[m]) for r in runs]) for m in METRICS]
        seconds = statistics.mean(float(r["seconds"]) for r in runs)
        lines.append(f"| {variant} | {' | '.join(cells)} | {seconds:.0f} |")
    if sw.BASELINE in by_variant and sw.FULL in by_variant:
        base = {int(r["seed"]): float(r["mIoU(U)"]) for r in by_variant[sw.BASELINE]}
        full = {int(r["seed"]): float(r["mIoU(U)"]) for r in by_variant[sw.FULL]}
        margins = [full[s] - base[s] for s in sorted(base) if s in full]
        lines += [
            "",
            f"Full − baseline mIoU(U) per seed: {', '.join(f'{m:.1f}' for m in margins)} "
            f"(min {min(margins):.1f}, mean {statistics.mean(margins):.1f}).",
        ]
    lines += guard_section(args, results, seeds)
    lines += [
        "",
        "Per seed (mIoU(S) / mIoU(U) / hIoU):",
        "",
        "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |",
    ]
    lines.append("|---|" + "---|" * len(seeds))
    for variant in sw.VARIANTS:
        runs = {int(r["seed"]): r for r in by_variant.get(variant, [])}
        if runs:
            cells = [
                " / ".join(f"{float(runs[s][m]):.1f}" for m in METRICS) if s in runs else "-" for s in seeds
            ]
            lines.append(f"| {variant} | {' | '.join(cells)} |")
    lines += [
        "",
        f"### Pseudo-label quality (teacher tokens of {args.quality_images} training scenes, scored on the unseen "
        "= ignored pixels)",
        "",
        "Purity: share of pixels in their region's majority class. NMI: per image, pixel-weighted mean (a class split "
        "over several regions scores low). Coverage: share of ignored pixels that get a pseudo label (regions under "
        "min_region = 1 % of the crop are dropped). Computed with `clipzss.inspect` (the functions behind "
        "`clipzss inspect-pseudo-labels`) on `clipzss.pseudo_labels`.",
        "",
        *quality_table(quality["variants"], "clustering (training default last)"),
        "",
        *quality_table(quality["lambda"], "fusion threshold (all scales)"),
        "",
        *quality_table(quality["windows"], "window divisors (fused, λ = 0.85)"),
        "",
        END,
    ]
    return "\n".join(lines)


def guard_section(args: argparse.Namespace, results: list[dict[str, object]], seeds: list[int]) -> list[str]:
    """Baseline vs full mIoU(U) per seed at the CI guard's short setting: the margin the test relies on."""
    rows = {(str(r["variant"]), int(r["seed"])): r for r in results if r.get("guard")}
    if not rows:
        return []
    lines = [
        "",
        f"### CI guard setting ({args.guard_iters} iterations, tests/test_synthetic_world.py)",
        "",
        "| seed | baseline mIoU(U) | full mIoU(U) | margin | baseline mIoU(S) | full mIoU(S) |",
        "|---|---|---|---|---|---|",
    ]
    margins = []
    for seed in seeds:
        base, full = rows.get((sw.BASELINE, seed)), rows.get((sw.FULL, seed))
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


def write_between_markers(path: Path, block: str) -> None:
    """Replace the text between the markers, keeping what surrounds them (the written findings)."""
    text = path.read_text() if path.is_file() else ""
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head + block + tail
    else:
        text = "# Evidence in a synthetic world\n\n" + block + "\n" + text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3, help="student seeds per variant (default 3)")
    parser.add_argument("--iters", type=int, default=200, help="training iterations per run (default 200)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--variants", default="all", help="comma-separated rows of synthetic_world.VARIANTS")
    parser.add_argument("--jobs", type=int, default=1, help="training runs in parallel, one thread each")
    parser.add_argument(
        "--guard-iters",
        type=int,
        default=120,
        help="also run baseline and full at the CI guard's setting (0: skip)",
    )
    parser.add_argument("--quality-images", type=int, default=64)
    parser.add_argument("--cache-dir", default=None, help="aligned-teacher cache (default ~/.cache/clipzss)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "README.md"))
    parser.add_argument("--json", default=None, help="also write every run's metrics to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    variants = list(sw.VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in sw.VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(sw.VARIANTS)}")

    tic = time.perf_counter()
    world = sw.WorldConfig()
    teacher = sw.load_teacher(world, cache_dir=args.cache_dir)
    _, val_set = sw.world_datasets(sw.student_config("unused", {}, world=world), world)
    teacher_row = sw.teacher_metrics(teacher, val_set, sw.student_config("unused", {}, world=world).eval)
    log.info("teacher at inference: %s", {m: round(teacher_row[m], 1) for m in METRICS})
    quality = pseudo_label_quality(teacher, world, args.quality_images)
    log.info("pseudo-label quality done (%.0f s)", time.perf_counter() - tic)

    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="clipzss_evidence_") as workdir:
        jobs = [
            Job(v, seed, args.iters, args.batch_size, args.cache_dir, workdir)
            for seed in range(args.seeds)
            for v in variants
        ]
        if args.guard_iters:
            jobs += [
                Job(v, seed, args.guard_iters, args.batch_size, args.cache_dir, workdir, guard=True)
                for seed in range(args.seeds)
                for v in (sw.BASELINE, sw.FULL)
            ]
        if args.jobs > 1:
            with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
                for r in pool.imap_unordered(run_job, jobs):
                    results.append(r)
                    log.info("%s seed %d: %s (%.0f s)", r["variant"], r["seed"], _short(r), r["seconds"])
        else:
            for job in jobs:
                r = run_job(job)
                results.append(r)
                log.info("%s seed %d: %s (%.0f s)", r["variant"], r["seed"], _short(r), r["seconds"])
    elapsed = time.perf_counter() - tic
    block = report(args, results, teacher_row, quality, elapsed)
    write_between_markers(Path(args.out), block)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"runs": results, "teacher": teacher_row, "quality": quality}, indent=1)
        )
    print(block)
    print(f"\nwrote {args.out} ({elapsed / 60:.1f} min)")
    return 0


def _short(r: dict[str, object]) -> str:
    guard = f" [guard, {r['iters']} iterations]" if r.get("guard") else ""
    return " ".join(f"{m} {float(r[m]):.1f}" for m in METRICS) + guard


if __name__ == "__main__":
    sys.exit(main())
