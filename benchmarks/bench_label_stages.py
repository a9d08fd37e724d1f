"""Where predict's time beyond the student goes, stage by stage (issue 15: why a target is missed).

    python benchmarks/bench_label_stages.py [--threads 1] [--classes 171,847] [--reps 5]

The same student, photo and text as `bench_labels.py` (random-weight SegFormer-B0, seeded; the first CamVid
frame), at 512² whole and in CamVid's slide geometry. Each stage of `Segmenter.predict` is timed alone on its own
inputs, interleaved with ``bare`` (the student) and ``predict`` (end to end): preprocessing, the per-pixel norms,
the classifier as predict runs it (blocked, with the division by the norms) against the plain matmul, and the
two kernels of the exact label stage (`point_stats`, `label_units`).
"""

# ruff: noqa: B023  (each candidate closure is timed within the iteration that defines it)
from __future__ import annotations

import numpy as np
import torch
from bench_labels import case_inputs, random_text
from common import base_parser, compare, machine_info, markdown_table, report, setup
from PIL import Image

from clipzss.config import Config, EvalConfig, StudentConfig
from clipzss.inference import _label_kernels as kernels
from clipzss.inference.inputs import preprocess
from clipzss.inference.label_maps import UNIT_ROUNDOFF, _kernel_tables
from clipzss.inference.windows import window_logits
from clipzss.models.segmenter import Segmenter, _classes_last_logits, pixel_norms
from clipzss.models.student import build_student


def label_kernels(plan, low: np.ndarray):
    """The exact label stage as `label_map_with_stats` calls it: (point_stats call, label_units call)."""
    n, h, w, k = low.shape
    top = np.empty((n, h * w), dtype=np.int64)
    best, second = (np.empty((n, h * w), dtype=np.float32) for _ in range(2))
    flat = low.reshape(n, h * w, k)
    kernels.point_stats(flat, top, best, second)
    depth = int(plan.rows.coverage[1].max() * plan.cols.coverage[1].max()) + 16
    out = np.empty(plan.out_size, dtype=np.int64)
    stats = (top.reshape(n, h, w), best.reshape(n, h, w), second.reshape(n, h, w))
    args = (
        low,
        *stats,
        np.empty((n, h, w, 0), dtype=np.int64),
        out,
        4.0 * depth * UNIT_ROUNDOFF,
        *_kernel_tables(plan),
    )
    return (lambda: kernels.point_stats(flat, top, best, second)), (lambda: kernels.label_units(*args))


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--classes", default="171,847")
    args = parser.parse_args(argv)
    device = setup(args)
    reps = args.reps or (1 if args.dry else 5)
    dim = 32 if args.dry else 512
    cfg = Config(student=StudentConfig(arch="Segformer", encoder="mit_b0", embed_dim=dim))
    torch.manual_seed(0)  # bench_labels.py's student
    student = build_student(cfg.student, for_training=False).to(device).eval()
    cases = [("512x512 whole", (512, 512), EvalConfig(mode="whole", short_side=512))]
    cases.append(("360x480 slide (CamVid eval)", (360, 480), EvalConfig(mode="slide", short_side=512)))
    if args.dry:
        cases = [("64x64 whole", (64, 64), EvalConfig(mode="whole", short_side=64))]
    stages = ["bare", "predict", "matmul", "classifier", "norms", "preprocess", "point_stats", "label_units"]
    rows, results = [], {}
    with torch.inference_mode():
        for case, (height, width), eval_cfg in cases:
            image, x, _, crops = case_inputs(height, width, eval_cfg, device)
            flat = student(crops).flatten(2).contiguous()  # (n, C, hw)
            for k in (int(k) for k in args.classes.split(",")):
                text = random_text(k, dim)
                seg = Segmenter(student, text, cfg, device)
                seg.eval_cfg = eval_cfg
                names = text.class_names
                weights = seg.alpha * seg.text_classifier(names)
                norm = pixel_norms(flat)[..., None]
                plan, low = window_logits(seg.logits_fn(names), x, eval_cfg, (height, width))
                stats_call, units_call = label_kernels(plan, np.ascontiguousarray(low[0].cpu().numpy()))
                candidates = {
                    "bare": lambda: student(crops),
                    "predict": lambda seg=seg, names=names: seg.predict(image, names),
                    "matmul": lambda w=weights: torch.matmul(w, flat),
                    "classifier": lambda w=weights, norm=norm: _classes_last_logits(flat, w, norm),
                    "norms": lambda: pixel_norms(flat),
                    "preprocess": lambda image=image, s=eval_cfg.short_side: preprocess(
                        Image.fromarray(image), s
                    ),
                    "point_stats": stats_call,
                    "label_units": units_call,
                }
                timing = compare(candidates, device, reps=reps, warmup=args.warmup)
                rows.append([case, k, *(timing.median(name) * 1e3 for name in stages)])
                results[f"{case} K={k}"] = {"seconds": timing.seconds}
    header = ["image", "classes", "bare", "predict", "matmul", "classifier (blocked, with the division)"]
    header += ["norms", "preprocess", "point_stats", "label_units"]
    table = "Medians, ms:\n\n" + markdown_table(header, rows)
    report(
        "predict's stages beyond the student", machine_info(device), table, {"results": results}, args.json
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
