"""Evidence that CLIP-ZSS works, in the synthetic worlds where the answer is known (clipzss.worlds.synthetic).

One command reproduces the ablation tables, the prototype diagnostic and the pseudo-label quality report:

    .venv/bin/python benchmarks/evidence.py --seeds 3 --jobs 2

Four worlds: structured or random text vectors, with or without a modality gap. The default world (structured text
with a gap, the most CLIP-like) gets every ablation row; the other three get the key rows. Every student is trained
by the ordinary ``clipzss.training.loop.train`` with the aligned teacher and evaluated by ``clipzss.evaluate`` (all 16
class names predicted jointly). The results go between the markers of benchmarks/README.md (text outside the
markers, e.g. the findings, is kept).
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
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from evidence_tables import (
    LAMBDAS,
    METRICS,
    SHARES,
    alignment_table,
    centring_table,
    guard_section,
    machine,
    per_seed_table,
    quality_table,
    rim_table,
    world_table,
)

from clipzss.config import MethodConfig
from clipzss.data import relabel_unseen, seen_lookup
from clipzss.inspection import QualityAccumulator, clustering_variants, pseudo_regions
from clipzss.method.pseudo_labels import (
    center_tokens,
    cluster_regions,
    fuse_labels,
    training_windows,
    upsample_regions,
    window_sizes,
)
from clipzss.worlds import students as ws
from clipzss.worlds import synthetic as sw

logger = logging.getLogger("evidence")

BEGIN, END = "<!-- evidence:begin -->", "<!-- evidence:end -->"
DEFAULT_WORLD = "structured text + gap"
WORLDS: dict[str, dict[str, object]] = {  # TeacherSpec fields of each world
    DEFAULT_WORLD: {},
    "structured text, no gap": {"gap": 0.0},
    "random text + gap": {"text": "random"},
    "random text, no gap": {"text": "random", "gap": 0.0},
}
# Rows that never read the teacher's image tokens (CE on the seen texts alone) train identically with and without the
# modality gap (the gap only offsets image tokens; measured equal to the last digit): run once, reported for both.
GAP_FREE_ROWS = ("seen-only baseline (CE)",)
GAP_TWIN = {"structured text, no gap": "structured text + gap", "random text, no gap": "random text + gap"}
VOC_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc-sample" / "VOC2012"


def world_spec(world: str) -> sw.TeacherSpec:
    return dataclasses.replace(sw.TeacherSpec(), **WORLDS[world])


# ----------------------------------------------------------------------------------------------------------------
# Pseudo-label quality


def _scenes_and_tokens(
    teacher: sw.AlignedTeacher, num_images: int
) -> tuple[sw.WorldScenes, torch.Tensor, torch.Tensor]:
    scenes = sw.WorldScenes(teacher.world, "train", num_images)
    items = [scenes.load(i) for i in range(num_images)]
    images = sw.normalize_pixels(torch.stack([it[0] for it in items]))  # (N, 3, H, W)
    truth = torch.stack([it[1] for it in items])  # (N, H, W) every class
    return scenes, truth, teacher.encode_image(images)[1]


def _score(
    dense: torch.Tensor, truth: torch.Tensor, unseen: list[int], windows: list[int], lam: float | None, method
) -> dict[str, float]:
    unlabelled = torch.isin(truth, torch.tensor(unseen))  # what training fills with pseudo labels
    evaluated = torch.where(unlabelled, truth, 255).numpy()
    acc = QualityAccumulator()
    regions = pseudo_regions(dense, unlabelled, windows, lam, method).numpy()
    for i in range(len(truth)):
        acc.add(evaluated[i], regions[i])
    return acc.summary()


def pseudo_label_quality(num_images: int, cache_dir: str | None) -> dict[str, dict[str, dict[str, float]]]:
    """Purity / NMI / coverage of the pseudo regions on the unseen (ignored) pixels of training scenes.

    Tables: "centring" (every world, raw vs batch-centred tokens over a λ sweep; centred in batches of 8 as in
    training), "variants" (default world: each scale, all scales unfused, fused: the training default), "windows"
    (default world, window-divisor sweep).
    """
    method = MethodConfig()
    tables: dict[str, dict[str, dict[str, float]]] = {"centring": {}, "variants": {}, "windows": {}}
    for world in WORLDS:
        teacher = sw.load_teacher(spec=world_spec(world), cache_dir=cache_dir)
        scenes, truth, dense = _scenes_and_tokens(teacher, num_images)
        centred = torch.cat([center_tokens(dense[i : i + 8]) for i in range(0, len(dense), 8)])
        raw = dataclasses.replace(method, center_tokens=False)
        sizes = window_sizes(*dense.shape[-2:], method.window_divisors)
        for lam in LAMBDAS:
            tables["centring"][f"{world} | raw | {lam:g}"] = _score(
                dense, truth, scenes.unseen, sizes, lam, raw
            )
            tables["centring"][f"{world} | centred | {lam:g}"] = _score(
                centred, truth, scenes.unseen, sizes, lam, raw
            )
        if world != DEFAULT_WORLD:
            continue
        grid = tuple(dense.shape[-2:])
        for name, (windows, lam) in clustering_variants(method, grid).items():
            tables["variants"][name] = _score(centred, truth, scenes.unseen, windows, lam, raw)
        for divisors in ((2,), (4,), (8,), (2, 4), (4, 8), (2, 4, 8), (2, 4, 8, 16)):
            windows = window_sizes(*grid, divisors)
            tables["windows"][f"divisors {divisors} → windows {tuple(windows)}"] = _score(
                centred, truth, scenes.unseen, windows, method.fusion_threshold, raw
            )
    return tables


# ----------------------------------------------------------------------------------------------------------------
# Seen rims: how much of a pseudo region lies on one seen class


def _rim_stats(
    train_labels: torch.Tensor,
    token_labels: torch.Tensor,
    num_seen: int,
    rim: torch.Tensor,
) -> dict[float, dict[str, float]]:
    """For each max_seen_share: share of rim pixels (``rim``: unlabelled pixels that belong to a seen object) and of
    the other unlabelled pixels that receive a pseudo label."""
    out = {}
    other = (train_labels == 255) & ~rim
    for share in SHARES:
        fused, _ = fuse_labels(train_labels, token_labels, num_seen, 0.01, max_seen_share=share)
        pseudo = (fused >= num_seen) & (fused != 255)
        out[share] = {
            "rim labelled": float(pseudo[rim].float().mean()) if rim.any() else math.nan,
            "other labelled": float(pseudo[other].float().mean()) if other.any() else math.nan,
        }
    return out


def seen_rim_measurements(num_images: int, cache_dir: str | None) -> dict[str, dict[float, dict[str, float]]]:
    """The max_seen_share sweep on (a) the default synthetic world with its teacher's regions, where a rim pixel is
    an unseen pixel whose token region is mostly one seen class's cells, and (b) the real VOC sample masks with an
    oracle 16-pixel token grid (each token takes its cell's majority class, 255 bands given to the object they
    surround), where a rim pixel is a 255 boundary-band pixel around a seen object."""
    results: dict[str, dict[float, dict[str, float]]] = {}
    teacher = sw.load_teacher(spec=world_spec(DEFAULT_WORLD), cache_dir=cache_dir)
    scenes, truth, dense = _scenes_and_tokens(teacher, num_images)
    method = MethodConfig()
    sizes = window_sizes(*dense.shape[-2:], method.window_divisors)
    tokens, _ = cluster_regions(center_tokens(dense), sizes, method.kmeans_iters, method.fusion_threshold)
    labels = seen_lookup(scenes.split)[relabel_unseen(truth, scenes.split)]
    num_seen = len(scenes.split.seen)
    # A rim pixel: unseen, and its token region's pixels are mostly (> 50 %) seen classes in the full truth.
    up = upsample_regions(tokens, tuple(truth.shape[1:]))  # (N, H, W), as fuse_labels sees the regions
    rim = torch.zeros_like(labels, dtype=torch.bool)
    for b in range(len(truth)):
        for r in up[b].unique():
            inside = up[b] == r
            if float((labels[b][inside] != 255).float().mean()) > 0.5:
                rim[b] |= inside & (labels[b] == 255)
    results["synthetic world (teacher regions)"] = _rim_stats(labels, tokens, num_seen, rim)
    voc = _voc_rims()
    if voc is not None:
        results["VOC samples (oracle tokens)"] = voc
    return results


def _voc_rims() -> dict[float, dict[str, float]] | None:
    if not VOC_SAMPLE.is_dir():
        return None
    from PIL import Image

    from clipzss.data.splits import STANDARD_UNSEEN, VOC_CLASSES

    unseen = {VOC_CLASSES.index(n) for n in STANDARD_UNSEEN["voc"]}
    seen = [i for i in range(20) if i not in unseen]
    lut = torch.full((256,), 255, dtype=torch.long)
    # VOC ids 1..20 → seen index; background and unseen → 255.
    lut[torch.tensor(seen) + 1] = torch.arange(len(seen))
    merged: dict[float, list[dict[str, float]]] = {}
    for path in sorted((VOC_SAMPLE / "SegmentationClass").glob("*.png")):
        raw = torch.from_numpy(np.array(Image.open(path))).long()  # 0 background, 1..20, 255 band
        h, w = (raw.shape[0] // 16) * 16, (raw.shape[1] // 16) * 16
        raw = raw[:h, :w]
        # Bands belong to the object they surround: fill each 255 pixel with its nearest non-band class (dilation).
        filled = raw.clone()
        for _ in range(10):
            band = filled == 255
            if not band.any():
                break
            shifted = [torch.roll(filled, s, d) for s in (1, -1) for d in (0, 1)]
            for other in shifted:
                take = band & (other != 255) & (other != 0)
                filled = torch.where(take, other, filled)
                band = filled == 255
        filled[filled == 255] = 0
        cells = filled.view(h // 16, 16, w // 16, 16).permute(0, 2, 1, 3).reshape(h // 16, w // 16, -1)
        tokens = torch.mode(cells, dim=-1).values[None]  # (1, h/16, w/16) oracle regions = classes
        labels = lut[raw][None]
        rim = ((raw == 255) & torch.isin(filled, torch.tensor(seen) + 1))[None]
        for share, row in _rim_stats(labels, tokens, len(seen), rim).items():
            merged.setdefault(share, []).append(row)
    return {
        share: {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]} for share, rows in merged.items()
    }


# ----------------------------------------------------------------------------------------------------------------
# Ablation runs


@dataclasses.dataclass(frozen=True)
class Job:
    world: str
    variant: str
    seed: int
    iters: int
    batch_size: int
    cache_dir: str | None
    workdir: str
    guard: bool = False  # a run of the CI guard's short setting
    probe: bool = False  # also measure prototype alignment (runs with a synthesizer)


def run_job(job: Job) -> dict[str, object]:
    """Train and evaluate one (world, variant, seed); runs in a worker process with one thread."""
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # the smp warnings of 60 runs would drown the table
    teacher = sw.load_teacher(spec=world_spec(job.world), cache_dir=job.cache_dir)
    tag = f"{abs(hash((job.world, job.variant))) % 10**8}_{job.seed}_{job.iters}"
    out = Path(job.workdir) / tag
    cfg = ws.student_config(out, ws.VARIANTS[job.variant], job.seed, job.iters, job.batch_size)
    train_set, val_set = sw.world_datasets(cfg)
    tic = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # progress bars
        metrics = ws.train_and_evaluate(cfg, teacher, train_set, val_set)
    seconds = time.perf_counter() - tic
    result: dict[str, object] = {
        "world": job.world,
        "variant": job.variant,
        "seed": job.seed,
        "iters": job.iters,
        "guard": job.guard,
        "seconds": seconds,
        **metrics,
    }
    if job.probe:
        probe = sw.WorldScenes(teacher.world, "probe", 32)
        result["alignment"] = ws.prototype_alignment(out, cfg, teacher, probe)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Report


def report(
    args: argparse.Namespace,
    results: list[dict[str, object]],
    teachers: dict[str, dict[str, float]],
    quality: dict[str, dict[str, dict[str, float]]],
    rims: dict[str, dict[float, dict[str, float]]],
    elapsed: float,
) -> str:
    world, spec = sw.WorldConfig(), sw.TeacherSpec()
    cfg = ws.student_config("run", {}, 0, args.iters, args.batch_size, world)
    main = [r for r in results if not r.get("guard")]
    seeds = sorted({int(r["seed"]) for r in main})
    m = cfg.method
    command = (
        f"`python benchmarks/evidence.py --seeds {args.seeds} --iters {args.iters} --batch-size {args.batch_size} "
        f"--guard-iters {args.guard_iters} --jobs {args.jobs}`"
    )
    if args.from_json:
        command = (
            "the stored runs of `python benchmarks/evidence.py --seeds 3 --jobs 2 --json benchmarks/evidence_runs.json`"
            ", assembled with `--from-json` (no training)"
        )
    lines = [
        BEGIN,
        "",
        f"Command: {command} — {elapsed / 60:.1f} min wall-clock of training on {machine()}.",
        "",
        f"World: {len(sw.WORLD_CLASSES)} classes ({len(sw.WORLD_UNSEEN)} unseen: {', '.join(sw.WORLD_UNSEEN)}), "
        f"{world.size}² scenes of {world.cells[0]}–{world.cells[1]} Voronoi cells; 8192 training scenes (none repeats "
        f"in a run), 64 validation scenes. Teacher: {spec.embed_dim}-d tokens at stride 4 ({world.size // 4}² grid), "
        f"nuisance {spec.nuisance}, leak {spec.leak}, gap {spec.gap} in the worlds with a gap. Student: "
        f"{cfg.student.arch}/{cfg.student.encoder} from scratch, embed_dim {cfg.student.embed_dim}, {args.iters} "
        f"iterations × batch {args.batch_size}, AdamW lr {cfg.train.lr:g}; method at the package defaults "
        f"(centred tokens {m.center_tokens}, λ = {m.fusion_threshold}, window divisors {tuple(m.window_divisors)}, "
        f"max seen share {m.max_seen_share}, bank {m.bank_size}, L_bce {m.bce} scale {m.bce_scale:g} bias "
        f"{m.bce_bias:g}, synthesizer {m.synthesizer}, NEL normalised over {m.nel_norm} with focal weight "
        f"{m.focal_weight:g}, NEL and CE at {m.loss_resolution} resolution). Seeds {seeds} (student init and data order; world, teacher "
        "and validation set fixed). Mean ± sample std over seeds. **default** = `MethodConfig()` as shipped.",
        "",
        "### Ablations (validation mIoU, %)",
        "",
    ]
    for name in WORLDS:
        runs = [r for r in main if r["world"] == name]
        if runs:
            variants = (
                list(ws.VARIANTS) if name == DEFAULT_WORLD else [v for v in ws.VARIANTS if v in args.key]
            )
            lines += [*world_table(name, runs, teachers[name], variants), ""]
    default_runs = [r for r in main if r["world"] == DEFAULT_WORLD]
    if default_runs:
        lines += [
            f"Per seed, {DEFAULT_WORLD} (mIoU(S) / mIoU(U) / hIoU):",
            "",
            *per_seed_table(default_runs, list(ws.VARIANTS), seeds),
            "",
            f"### Prototype diagnostic ({DEFAULT_WORLD}, 32 probe scenes, pseudo regions that are mostly one unseen "
            "class)",
            "",
            "How close a pseudo region's classifier is to the text of the unseen class it stands for; top-1: that "
            "text is the nearest of all 16 class texts.",
            "",
            *alignment_table(default_runs),
        ]
    lines += guard_section(results, args.guard_iters, seeds)
    lines += [
        "",
        f"### Pseudo-label quality (teacher tokens of {args.quality_images} training scenes, scored on the unseen "
        "= ignored pixels)",
        "",
        "Purity: share of pixels in their region's majority class. NMI: per image, pixel-weighted mean (a class split "
        "over several regions scores low). Coverage: share of ignored pixels that get a pseudo label. Computed with "
        "`clipzss.inspection` (the functions behind `clipzss inspect-pseudo-labels`) on `clipzss.method.pseudo_labels`.",
        "",
        "**Token centring** — NMI / purity of the fused regions (all scales) by fusion threshold λ, raw tokens vs "
        "tokens centred on their batch mean (batches of 8, as in training):",
        "",
        *centring_table(quality["centring"], list(WORLDS)),
        "",
        f"Clustering variants, {DEFAULT_WORLD}, centred tokens. The training default clusters from window "
        f"{training_windows(world.size // 4, world.size // 4, m)[0]} alone (single-scale seeds), fused: the row "
        f"'divisors ({m.window_divisors[len(m.window_divisors) // 2]},)' of the second table.",
        "",
        *quality_table(quality["variants"], "clustering"),
        "",
        *quality_table(quality["windows"], f"window divisors (fused, λ = {m.fusion_threshold})"),
        "",
        "**Seen rims** — share of rim pixels / of other unlabelled pixels that get a pseudo label, by the largest "
        "share of a region one seen class may hold (`method.max_seen_share`; 1.0 keeps every region):",
        "",
        *rim_table(rims),
        "",
        END,
    ]
    return "\n".join(lines)


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
    parser.add_argument("--seeds", type=int, default=3, help="student seeds per row (default 3)")
    parser.add_argument("--iters", type=int, default=ws.STUDENT_ITERS, help="training iterations per run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--worlds", default="all", help=f"';'-separated worlds of {list(WORLDS)}")
    parser.add_argument(
        "--variants",
        default="table",
        help="';'-separated rows of the default world; table = synthetic.TABLE_VARIANTS, all = every row",
    )
    parser.add_argument(
        "--key", default=";".join(ws.KEY_VARIANTS), help="';'-separated rows run in the other worlds"
    )
    parser.add_argument("--jobs", type=int, default=1, help="training runs in parallel, one thread each")
    parser.add_argument(
        "--guard-iters", type=int, default=120, help="also run the CI guard's setting (0: skip)"
    )
    parser.add_argument("--quality-images", type=int, default=64)
    parser.add_argument("--cache-dir", default=None, help="aligned-teacher cache (default ~/.cache/clipzss)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "README.md"))
    parser.add_argument("--json", default=None, help="also write every run's metrics to this JSON file")
    parser.add_argument(
        "--from-json",
        default=None,
        help="no training: report the runs of this --json file, renaming rows by students.RENAMED",
    )
    parser.add_argument(
        "--add-json", nargs="*", default=(), help="with --from-json: more runs, names as they are"
    )
    parser.add_argument(
        "--minutes", type=float, default=None, help="with --from-json: training time to report"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already in --json and train only the missing ones",
    )
    args = parser.parse_args(argv)
    if args.quality_images < 1 and not args.from_json:
        parser.error(
            "--quality-images must be at least 1: the report's pseudo-label and seen-rim tables need scenes"
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    worlds = list(WORLDS) if args.worlds == "all" else [w.strip() for w in args.worlds.split(";")]
    named = {"all": list(ws.VARIANTS), "table": list(ws.TABLE_VARIANTS)}
    variants = named.get(args.variants) or [v.strip() for v in args.variants.split(";")]
    args.key = [v.strip() for v in args.key.split(";") if v.strip()]
    unknown = [v for v in [*variants, *args.key] if v not in ws.VARIANTS] + [
        w for w in worlds if w not in WORLDS
    ]
    if unknown:
        parser.error(
            f"unknown world(s)/variant(s) {unknown}; choose from {list(WORLDS)} and {list(ws.VARIANTS)}"
        )

    if args.from_json:
        return report_from_json(args)
    tic = time.perf_counter()
    teachers = {}
    eval_cfg = ws.student_config("unused", {}).eval
    for name in worlds:
        teacher = sw.load_teacher(spec=world_spec(name), cache_dir=args.cache_dir)
        _, val_set = sw.world_datasets(ws.student_config("unused", {}))
        teachers[name] = ws.teacher_metrics(teacher, val_set, eval_cfg)
        logger.info("teacher at inference, %s: %s", name, {m: round(teachers[name][m], 1) for m in METRICS})
    quality = pseudo_label_quality(args.quality_images, args.cache_dir)
    rims = seen_rim_measurements(args.quality_images, args.cache_dir)
    logger.info("pseudo-label quality done (%.0f s)", time.perf_counter() - tic)

    results: list[dict[str, object]] = []
    done: set[tuple[object, ...]] = set()
    if args.resume and args.json and Path(args.json).is_file():
        results = list(json.loads(Path(args.json).read_text())["runs"])
        done = {_key(r) for r in results}
        logger.info("resuming: %d runs kept from %s", len(results), args.json)
    with tempfile.TemporaryDirectory(prefix="clipzss_evidence_") as workdir:
        # Row by row in the order given (every seed and world of a row before the next row), the key rows first,
        # so that a run stopped early has complete rows; the stored JSON grows after every run.
        jobs = []
        order = [v for v in variants if v in args.key] + [v for v in variants if v not in args.key]
        for v in order:
            for seed in range(args.seeds):
                for world in worlds:
                    if world != DEFAULT_WORLD and v not in args.key:
                        continue
                    if v in GAP_FREE_ROWS and GAP_TWIN.get(world) in worlds:
                        continue  # copied from its twin world below
                    probe = world == DEFAULT_WORLD and bool(ws.VARIANTS[v].get("synthesizer", True))
                    jobs.append(
                        Job(world, v, seed, args.iters, args.batch_size, args.cache_dir, workdir, probe=probe)
                    )
            if v in args.key and v == args.key[-1] and args.guard_iters and DEFAULT_WORLD in worlds:
                jobs += [
                    Job(
                        DEFAULT_WORLD,
                        g,
                        seed,
                        args.guard_iters,
                        args.batch_size,
                        args.cache_dir,
                        workdir,
                        guard=True,
                    )
                    for seed in range(args.seeds)
                    for g in (ws.BASELINE, ws.FULL)
                ]
        jobs = [j for j in jobs if (j.world, j.variant, j.seed, j.guard) not in done]
        logger.info("%d training runs", len(jobs))
        pool = multiprocessing.get_context("spawn").Pool(args.jobs) if args.jobs > 1 else None
        stream = pool.imap_unordered(run_job, jobs) if pool is not None else map(run_job, jobs)
        partial = Path(args.json or Path(workdir) / "runs.json")
        partial.parent.mkdir(parents=True, exist_ok=True)
        for r in stream:
            results.append(r)
            twins = [w for w, twin in GAP_TWIN.items() if twin == r["world"] and w in worlds]
            if r["variant"] in GAP_FREE_ROWS and not r.get("guard"):
                copies = [{**r, "world": w, "copied_from": r["world"]} for w in twins]
                results += [c for c in copies if _key(c) not in {_key(x) for x in results}]
            logger.info(
                "%s | %s seed %d: %s (%.0f s)", r["world"], r["variant"], r["seed"], _short(r), r["seconds"]
            )
            partial.write_text(
                json.dumps(
                    {"runs": results, "teachers": teachers, "quality": quality, "rims": rims}, indent=1
                )
            )
        if pool is not None:
            pool.close()
    elapsed = time.perf_counter() - tic
    block = report(args, results, teachers, quality, rims, elapsed)
    write_between_markers(Path(args.out), block)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"runs": results, "teachers": teachers, "quality": quality, "rims": rims}, indent=1)
        )
    print(block)
    print(f"\nwrote {args.out} ({elapsed / 60:.1f} min)")
    return 0


def report_from_json(args: argparse.Namespace) -> int:
    """Rebuild the README block from stored runs (no training): rows of ``--from-json`` are renamed by
    ``students.RENAMED`` (they were run under the names of an earlier set of defaults); ``--add-json`` runs are
    taken as they are and replace stored runs of the same (world, variant, seed, guard)."""
    stored = json.loads(Path(args.from_json).read_text())
    runs = {}
    for r in stored["runs"]:
        r = {**r, "variant": ws.RENAMED.get(str(r["variant"]), r["variant"])}
        runs[(r["world"], r["variant"], r["seed"], bool(r.get("guard")))] = r
    for extra in args.add_json:
        data = json.loads(Path(extra).read_text())
        for r in data["runs"] if isinstance(data, dict) else data:
            runs[(r["world"], r["variant"], r["seed"], bool(r.get("guard")))] = r
    results = list(runs.values())
    unknown = sorted({str(r["variant"]) for r in results} - set(ws.VARIANTS))
    if unknown:
        raise SystemExit(f"runs of unknown rows {unknown}: add them to students.RENAMED or VARIANTS")
    minutes = (
        args.minutes
        if args.minutes is not None
        else sum(float(r["seconds"]) for r in results) / 60 / args.jobs
    )
    rims = {
        name: {float(k): v for k, v in rows.items()} for name, rows in stored["rims"].items()
    }  # JSON keys
    block = report(args, results, stored["teachers"], stored["quality"], rims, minutes * 60)
    write_between_markers(Path(args.out), block)
    print(block)
    print(f"\nwrote {args.out}")
    return 0


def _key(r: dict[str, object]) -> tuple[object, ...]:
    return (r["world"], r["variant"], r["seed"], bool(r.get("guard")))


def _short(r: dict[str, object]) -> str:
    guard = f" [guard, {r['iters']} iterations]" if r.get("guard") else ""
    return " ".join(f"{m} {float(r[m]):.1f}" for m in METRICS) + guard


if __name__ == "__main__":
    sys.exit(main())
