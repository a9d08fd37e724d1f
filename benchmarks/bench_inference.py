"""Inference speed: the bare student, clipzss zero-shot predict, and CLIP at inference (the training-free baselines).

    python benchmarks/bench_inference.py [--device cuda] [--students mit_b0,mit_b2] [--baselines maskclip,naclip]
        [--json out.json]

Candidates, timed interleaved in the same run for each image case:

- ``<encoder> bare``: the student network's forward alone on the already-normalised input (whole image), or on the
  same sliding windows that predict cuts, batched the same way (slide);
- ``<encoder> predict``: ``Segmenter.predict(uint8 image, class names)``, the public API: image → tensor, student,
  text classifier α·cos(R, T), K-channel upsampling, argmax, back to a numpy mask;
- ``MaskCLIP``, ``ClearCLIP``, ``SCLIP``, ``NACLIP``: ``TrainingFreeSegmenter.predict`` with an OpenCLIP ViT-B/16
  (random weights: the same computation as the real ones), the training-free "CLIP at inference" baselines the
  method is compared with (``--baselines``). Each is timed under the case's protocol below, like the student, not
  under its released input handling (`clipzss.models.recipes.BASELINE_INPUT`), which would time other pixel counts.

Image cases (ZegCLIP's protocol: slide 512 / 341): a 512×512 image in one pass; 512×1024 (H×W) slid at its own
size; 1024×2048 (a Cityscapes-size frame) slid at full resolution (``short_side`` off), each the first CamVid val
frame resized to it (`bench_labels.photo`: uniform noise would make every pixel a class boundary, which costs the
exact label stage more than any photo does). Text embeddings are random
unit vectors given as precomputed embeddings (computing 847 × 15 prompts through a random text tower would only
slow the set-up; predict caches them per class list in any case). A second table measures predict as the class
list grows (VOC 20, COCO-Stuff 171, ADE-847 names) against the bare student.

Targets (issue 7): predict ≤ 1.05× the bare student; ≥ 4× faster than MaskCLIP on CPU with mit_b0; flat in the
number of class names.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from bench_labels import photo
from common import (
    base_parser,
    compare,
    machine_info,
    markdown_table,
    peak_memory,
    report,
    setup,
    target,
)

from clipzss.config import Config, EvalConfig, StudentConfig, TeacherConfig
from clipzss.data import DATASET_CLASSES
from clipzss.inference.inputs import preprocess, sliding_windows
from clipzss.models.recipes import BASELINE_TITLES, BASELINES, check_baseline
from clipzss.models.segmenter import PrecomputedText, Segmenter, TrainingFreeSegmenter
from clipzss.models.student import build_student
from clipzss.models.teacher import build_teacher

# (name, height, width, eval short side or None, mode)
CASES = [
    ("512x512 whole", 512, 512, 512, "whole"),
    ("512x1024 slide", 512, 1024, 512, "slide"),
    ("1024x2048 slide", 1024, 2048, None, "slide"),
]
DRY_CASES = [("64x64 whole", 64, 64, 64, "whole"), ("64x128 slide", 64, 128, 64, "slide")]


def random_text(names: list[str], dim: int, seed: int = 0) -> PrecomputedText:
    gen = torch.Generator().manual_seed(seed)
    return PrecomputedText(names, F.normalize(torch.randn(len(names), dim, generator=gen), dim=1))


def bare_forward(
    student: torch.nn.Module, x: torch.Tensor, eval_cfg: EvalConfig, mode: str, window_batch: int = 8
):
    """The student alone on what predict feeds it: the whole image, or the sliding windows in the same batches."""
    if mode == "whole":
        return lambda: student(x)
    windows = sliding_windows(x.shape[-2], x.shape[-1], eval_cfg.crop_size, eval_cfg.stride)
    crops = [x[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in windows]
    batches = [torch.cat(crops[i : i + window_batch]) for i in range(0, len(crops), window_batch)]

    def run() -> None:
        for batch in batches:
            student(batch)

    return run


def class_names(count: int) -> list[str]:
    for names in DATASET_CLASSES.values():
        if len(names) == count:
            return list(names)
    return [f"class {i}" for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--students", default="mit_b0,mit_b2", help="Segformer encoders, comma-separated")
    parser.add_argument("--classes", default="20,171,847", help="class-list sizes for the scaling table")
    parser.add_argument("--num-classes", type=int, default=171, help="class names in the speed table")
    parser.add_argument(
        "--baselines", default=",".join(BASELINES), help="training-free recipes to time, comma-separated"
    )
    parser.add_argument(
        "--cases", default=None, help="comma-separated subset of the image cases by name (default all)"
    )
    args = parser.parse_args(argv)
    device = setup(args)
    encoders = [e.strip() for e in args.students.split(",") if e.strip()]
    cases = DRY_CASES if args.dry else CASES
    if args.cases:
        wanted = {c.strip() for c in args.cases.split(",")}
        cases = [c for c in cases if c[0] in wanted]
    reps = args.reps or (1 if args.dry else 3)
    dim = 512
    teacher_cfg = TeacherConfig(weights="none")
    if args.dry:
        dim = 32
        teacher_cfg = TeacherConfig(
            weights="none",
            image_size=64,
            model_overrides={
                "embed_dim": dim,
                "vision_cfg": {
                    "image_size": 64,
                    "layers": 2,
                    "width": 64,
                    "patch_size": 16,
                    "head_width": 32,
                },
                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
            },
        )
    teacher = build_teacher(teacher_cfg, device=device)
    names = class_names(args.num_classes)
    text = random_text(names, dim)

    segmenters: dict[str, Segmenter] = {}
    for encoder in encoders:
        cfg = Config(student=StudentConfig(arch="Segformer", encoder=encoder, embed_dim=dim))
        segmenters[encoder] = Segmenter(build_student(cfg.student, for_training=False), text, cfg, device)
    baselines: dict[str, TrainingFreeSegmenter] = {}
    for recipe in [r.strip() for r in args.baselines.split(",") if r.strip()]:
        check_baseline(recipe)
        baselines[BASELINE_TITLES[recipe]] = TrainingFreeSegmenter(teacher, recipe=recipe)
        baselines[BASELINE_TITLES[recipe]].text_encoder = text  # the same precomputed classifier (docstring)
    if "MaskCLIP" not in baselines:
        raise SystemExit("--baselines must include maskclip (the speed table's reference)")

    speed_rows, baseline_rows, memory_rows, results = [], [], [], {}
    with torch.inference_mode():
        for case, height, width, short_side, mode in cases:
            eval_cfg = EvalConfig(mode=mode, short_side=short_side or 0)
            image = photo(height, width)
            x = torch.from_numpy(preprocess(pil_image(image), short_side or None))[None].to(device)
            for seg in [*segmenters.values(), *baselines.values()]:
                seg.eval_cfg = eval_cfg
            candidates = {}
            for encoder, seg in segmenters.items():
                candidates[f"{encoder} bare"] = bare_forward(seg.student, x, eval_cfg, mode)
                candidates[f"{encoder} predict"] = lambda seg=seg, image=image: seg.predict(image, names)
            for title, base in baselines.items():
                candidates[title] = lambda base=base, image=image: base.predict(image, names)
            timing = compare(candidates, device, reps=reps, warmup=args.warmup)
            results[case] = {"seconds": timing.seconds, "load": timing.load}
            for encoder in encoders:
                bare, pred = f"{encoder} bare", f"{encoder} predict"
                speed_rows.append(
                    [
                        case,
                        encoder,
                        1 / timing.median(bare),
                        1 / timing.median(pred),
                        1 / timing.median("MaskCLIP"),
                        timing.ratio(pred, bare),
                        timing.ratio("MaskCLIP", pred),
                    ]
                )
                results[case][encoder] = {
                    "predict_over_bare": timing.ratio(pred, bare),
                    "maskclip_over_predict": timing.ratio("MaskCLIP", pred),
                    **{f"{t.lower()}_over_predict": timing.ratio(t, pred) for t in baselines},
                }
            for title in baselines:
                baseline_rows.append(
                    [case, title, 1 / timing.median(title)]
                    + [timing.ratio(title, f"{encoder} predict") for encoder in encoders]
                )
            for name, fn in candidates.items():
                with peak_memory(device) as peak:
                    fn()
                memory_rows.append([case, name, peak.megabytes])
            print(f"done: {case} (load {timing.load[0]:.2f})", flush=True)

        scaling_rows = []
        encoder = encoders[0]
        seg = segmenters[encoder]
        for case, height, width, short_side, mode in cases[:2]:
            eval_cfg = EvalConfig(mode=mode, short_side=short_side or 0)
            seg.eval_cfg = eval_cfg
            image = photo(height, width)
            x = torch.from_numpy(preprocess(pil_image(image), short_side or None))[None].to(device)
            lists = {int(k): class_names(int(k)) for k in args.classes.split(",")}
            candidates = {"bare": bare_forward(seg.student, x, eval_cfg, mode)}
            for k, list_names in lists.items():
                seg.text_encoder = random_text(list_names, dim, seed=k)
                seg.text_classifier(list_names)  # cached once per list, as in a real session
                candidates[f"K={k}"] = lambda list_names=list_names, image=image: seg.predict(
                    image, list_names
                )
            timing = compare(candidates, device, reps=reps, warmup=args.warmup)
            results[f"classes {case}"] = {"seconds": timing.seconds, "load": timing.load}
            first = f"K={next(iter(lists))}"
            for k in lists:
                name = f"K={k}"
                scaling_rows.append(
                    [
                        case,
                        encoder,
                        k,
                        timing.median(name) * 1e3,
                        timing.ratio(name, "bare"),
                        timing.ratio(name, first),
                    ]
                )
            seg.text_encoder = text

    info = machine_info(device)
    table = markdown_table(
        [
            "image",
            "student",
            "bare img/s",
            "predict img/s",
            "MaskCLIP img/s",
            "predict / bare",
            "MaskCLIP / predict",
        ],
        speed_rows,
    )
    table += f"\n\n{args.num_classes} class names, {reps} repetitions after {args.warmup} warm-up, device {device}.\n\n"
    table += markdown_table(
        ["image", "student", "classes", "predict ms", "/ bare", f"/ K={args.classes.split(',')[0]}"],
        scaling_rows,
    )
    table += (
        "\n\nCLIP at inference, each recipe's last block, timed under the same protocol as the student:\n\n"
    )
    table += markdown_table(
        ["image", "baseline", "img/s", *[f"/ {encoder} predict" for encoder in encoders]], baseline_rows
    )
    table += "\n\n" + markdown_table(["image", "candidate", "peak MB"], memory_rows)
    verdicts = []
    for row in speed_rows:
        verdicts.append(f"{row[0]} {row[1]}: predict/bare {row[5]:.3f} ({target(row[5] <= 1.05)})")
        if row[1] == "mit_b0":
            verdicts.append(f"{row[0]} mit_b0: MaskCLIP/predict {row[6]:.2f}× ({target(row[6] >= 4)})")
    table += "\n\nTargets: " + "; ".join(verdicts)
    report(
        "Inference: student vs zero-shot predict vs CLIP at inference",
        info,
        table,
        {"results": results},
        args.json,
    )
    return 0


def pil_image(image: np.ndarray):
    from PIL import Image

    return Image.fromarray(image)


if __name__ == "__main__":
    raise SystemExit(main())
