"""What zero-shot prediction costs beyond the student, as the vocabulary grows (issue 15).

    python benchmarks/bench_labels.py [--threads 1] [--classes 20,171,847] [--json out.json]

On one real photo (the first CamVid val frame from ../shared/data, else a smooth synthetic image: uniform noise
would make every pixel a class boundary, unlike any photo), with a random-weight SegFormer-B0 student (no trained
weights exist here) and random unit text embeddings, timed interleaved in the same run:

- ``bare``: the student's forward on the normalised input (the whole image, or the windows predict cuts);
- ``matmul``: the classifier alone, α·T @ R on the student's stride-4 embeddings (K·C·hw/16 multiply-adds),
  the one cost an exact argmax cannot avoid;
- ``predict``: ``Segmenter.predict(uint8 image, names)``, end to end;
- label stage on the same low-resolution logits: ``label_map`` (the shortcut), ``dense`` (the reference it
  equals, `label_maps.dense_labels`), ``torch interpolate`` (the path before issue 15: F.interpolate of the
  channels-last logits then argmax; its masks differ from the reference only within float rounding) and the
  opt-in approximate labels (``candidates=2``: each point's 2 best classes), with their pixel agreement.

Cases: 512² whole (predict's input is the image), CamVid's eval geometry (360×480 → 512×683, two 512 windows,
resized back), with ``--large`` 1024×2048 slide (18 windows in 3 rows, labelled in bands; the label stage times
``label_map`` only), and the peak memory of predict at 1024×2048 slide against the bare student. ``bare`` runs the
windows in batches of 8, as predict does below 64 MB of logits per batch.
"""

# ruff: noqa: B023  (each candidate closure is timed within the iteration that defines it)
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import base_parser, compare, machine_info, markdown_table, peak_memory, report, setup, target
from PIL import Image

from clipzss.config import Config, EvalConfig, StudentConfig
from clipzss.inference.inputs import preprocess, sliding_windows
from clipzss.inference.label_maps import dense_labels, label_map, label_map_with_stats
from clipzss.inference.windows import window_logits
from clipzss.models.segmenter import PrecomputedText, Segmenter
from clipzss.models.student import build_student

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def photo(height: int, width: int) -> np.ndarray:
    files = sorted((SHARED / "camvid" / "val" / "images").glob("*"))
    if files:
        return np.asarray(Image.open(files[0]).convert("RGB").resize((width, height), Image.BILINEAR))
    print("(../shared/data absent: a smooth synthetic image instead of a photo)", file=sys.stderr)
    gen = torch.Generator().manual_seed(0)
    small = torch.rand(1, 3, max(2, height // 32), max(2, width // 32), generator=gen)
    big = F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)[0]
    return (big.permute(1, 2, 0) * 255).byte().numpy()


def case_inputs(
    height: int, width: int, eval_cfg: EvalConfig, device: torch.device
) -> tuple[np.ndarray, torch.Tensor, list[tuple[int, int, int, int]], torch.Tensor]:
    """A case's photo, its network input, predict's windows on it and their crops (the input itself if whole)."""
    image = photo(height, width)
    x = torch.from_numpy(preprocess(Image.fromarray(image), eval_cfg.short_side))[None].to(device)
    windows = sliding_windows(x.shape[-2], x.shape[-1], eval_cfg.crop_size, eval_cfg.stride)
    whole = eval_cfg.mode == "whole"
    crops = x if whole else torch.cat([x[:, :, a:b, c:d] for a, b, c, d in windows])
    return image, x, windows, crops


def random_text(k: int, dim: int) -> PrecomputedText:
    gen = torch.Generator().manual_seed(k)
    return PrecomputedText(
        [f"class {i}" for i in range(k)], F.normalize(torch.randn(k, dim, generator=gen), dim=1)
    )


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--classes", default="20,171,847")
    parser.add_argument("--encoder", default="mit_b0")
    parser.add_argument("--no-memory", action="store_true", help="skip the 1024×2048 memory case")
    parser.add_argument("--memory-only", action="store_true", help="only the 1024×2048 memory case")
    parser.add_argument(
        "--large", action="store_true", help="also time 1024×2048 slide (18 windows; label_map only)"
    )
    args = parser.parse_args(argv)
    device = setup(args)
    reps = args.reps or (1 if args.dry else 3)
    dim = 32 if args.dry else 512
    ks = [int(k) for k in args.classes.split(",")]
    cfg = Config(student=StudentConfig(arch="Segformer", encoder=args.encoder, embed_dim=dim))
    torch.manual_seed(0)  # the same random student in every run: its logits decide how many units settle
    student = build_student(cfg.student, for_training=False).to(device).eval()
    cases = [("512x512 whole", (512, 512), EvalConfig(mode="whole", short_side=512))]
    cases.append(("360x480 slide (CamVid eval)", (360, 480), EvalConfig(mode="slide", short_side=512)))
    if args.large:
        cases.append(("1024x2048 slide (18 windows)", (1024, 2048), EvalConfig(mode="slide", short_side=0)))
    if args.dry:
        cases = [("64x64 whole", (64, 64), EvalConfig(mode="whole", short_side=64))]
    if args.memory_only:
        cases = []
    rows, label_rows, results, verdicts = [], [], {}, []
    with torch.inference_mode():
        for case, (height, width), eval_cfg in cases:
            image, x, windows, crops = case_inputs(height, width, eval_cfg, device)
            large = height * width > 1 << 20  # the dense reference and the torch path would take minutes here
            bare_batches = crops.split(8)  # predict's window batches
            emb = torch.cat([student(batch) for batch in bare_batches]).flatten(2)  # (n, C, hw)
            for k in ks:
                text = random_text(k, dim)
                seg = Segmenter(student, text, cfg, device)
                seg.eval_cfg = eval_cfg
                names = text.class_names
                classifier = seg.text_classifier(names)
                alpha_text = seg.alpha * classifier
                logits_fn = seg.logits_fn(names)
                plan, low = window_logits(logits_fn, x, eval_cfg, (height, width))
                low_np = low[0].cpu().numpy()
                cl = torch.from_numpy(low_np).permute(0, 3, 1, 2)  # (n, K, h, w) channels-last view

                def old_path(cl=cl, plan=plan) -> torch.Tensor:
                    if plan.num_windows == 1 and plan.rows.final is None and plan.cols.final is None:
                        return F.interpolate(cl, size=(height, width), mode="bilinear").argmax(1)
                    win = (windows[0][1] - windows[0][0], windows[0][3] - windows[0][2])
                    up = F.interpolate(cl, size=win, mode="bilinear")
                    canvas = up.new_zeros(1, k, x.shape[-2], x.shape[-1]).contiguous(
                        memory_format=torch.channels_last
                    )
                    count = torch.zeros(1, 1, x.shape[-2], x.shape[-1])
                    for i, (a, b, c, d) in enumerate(windows):
                        canvas[:, :, a:b, c:d] += up[i : i + 1]
                        count[:, :, a:b, c:d] += 1
                    canvas /= count
                    return F.interpolate(canvas, size=(height, width), mode="bilinear").argmax(1)

                candidates = {
                    "bare": lambda: [student(batch) for batch in bare_batches],
                    "matmul": lambda t=alpha_text: torch.matmul(t, emb),
                    "predict": lambda seg=seg, names=names: seg.predict(image, names),
                    "label_map": lambda plan=plan, low_np=low_np: label_map(plan, low_np),
                    "approximate": lambda plan=plan, low_np=low_np: label_map(plan, low_np, candidates=2),
                }
                if not large:
                    candidates["dense"] = lambda plan=plan, low_np=low_np: dense_labels(plan, low_np)
                    candidates["torch interpolate"] = old_path
                timing = compare(candidates, device, reps=reps, warmup=args.warmup)
                exact_labels, stats = label_map_with_stats(plan, low_np)
                agreement = float((label_map(plan, low_np, candidates=2) == exact_labels).mean()) * 100
                exact = "(tests)" if large else bool((exact_labels == dense_labels(plan, low_np)).all())
                over = (timing.median("predict") - timing.median("bare")) / timing.median("matmul")
                rows.append(
                    [case, k, timing.median("bare") * 1e3, timing.median("matmul") * 1e3,
                     timing.median("predict") * 1e3, timing.ratio("predict", "bare"), over]
                )  # fmt: skip
                slow = (
                    ["—", "—"] if large else [timing.median(n) * 1e3 for n in ("dense", "torch interpolate")]
                )
                label_rows.append(
                    [case, k, timing.median("label_map") * 1e3, *slow, stats.get("settled", 0),
                     stats.get("one_candidate", 0), stats.get("pixel_values", 0), exact,
                     timing.median("approximate") * 1e3, f"{agreement:.3f}"]
                )  # fmt: skip
                results[f"{case} K={k}"] = {
                    "seconds": timing.seconds,
                    "stats": stats,
                    "exact": exact,
                    "approximate_agreement": agreement,
                }
                if k == ks[0]:
                    verdicts.append(
                        f"{case} K={k}: predict/bare {rows[-1][5]:.3f} ({target(rows[-1][5] <= 1.05)})"
                    )
                else:
                    verdicts.append(f"{case} K={k}: (predict-bare)/matmul {over:.2f} ({target(over <= 1.2)})")
                print(f"done {case} K={k}", flush=True)
        memory_rows = []
        if not (args.no_memory or args.dry):
            eval_cfg = EvalConfig(mode="slide", short_side=0)
            image, _, _, crops = case_inputs(1024, 2048, eval_cfg, device)
            batches = crops.split(8)  # predict's window batches
            warm = Segmenter(student, random_text(ks[0], dim), cfg, device)
            warm.eval_cfg = eval_cfg
            # loads the compiled kernels (not counted below)
            warm.predict(image, warm.text_encoder.class_names)
            with peak_memory(device) as bare_peak:
                for batch in batches:
                    student(batch)
            for k in ks:
                seg = Segmenter(student, random_text(k, dim), cfg, device)
                seg.eval_cfg = eval_cfg
                names = seg.text_encoder.class_names
                seg.text_classifier(names)
                with peak_memory(device) as pred_peak:
                    seg.predict(image, names)
                memory_rows.append(
                    ["1024x2048 slide (18 windows)", k, bare_peak.megabytes, pred_peak.megabytes]
                )
                ratio = pred_peak.megabytes / max(bare_peak.megabytes, 1e-9)
                verdicts.append(
                    f"1024x2048 K={k}: predict/bare peak memory {ratio:.2f} ({target(ratio < 2)})"
                )
    info = machine_info(device)
    table = markdown_table(
        [
            "image",
            "classes",
            "bare ms",
            "matmul ms",
            "predict ms",
            "predict / bare",
            "(predict − bare) / matmul",
        ],
        rows,
    )
    table += (
        "\n\nLabel stage on the same low-resolution logits (ms), and how the shortcut settled its units:\n\n"
    )
    table += markdown_table(
        ["image", "classes", "label_map", "dense reference", "torch interpolate + argmax", "units settled",
         "one candidate", "pixel values", "== reference", "approximate (M = 2) ms", "its agreement %"],
        label_rows,
    )  # fmt: skip
    if memory_rows:
        table += "\n\n" + markdown_table(["image", "classes", "bare peak MB", "predict peak MB"], memory_rows)
    table += "\n\nTargets: " + "; ".join(verdicts)
    report("Zero-shot labels: cost beyond the student", info, table, {"results": results}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
