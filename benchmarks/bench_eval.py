"""Evaluation throughput: ``evaluate()`` (what ``clipzss eval`` runs) against the raw model forward on the same images.

    python benchmarks/bench_eval.py [--device cuda] [--root ../shared/data/camvid] [--images 8] [--workers 2]

The dataset is a folder dataset (CamVid's val split by default; a synthetic JPEG folder when ``--root`` is absent)
read with the evaluation protocol (short side 512, slide 512 / 341, every class predicted jointly). Candidates,
timed interleaved in the same run over the same first ``--images`` images:

- ``evaluate``: ``clipzss.evaluate.evaluate`` with ``--workers`` DataLoader workers: JPEG/PNG decoding, resizing,
  sliding windows, the text classifier, K-channel upsampling to the mask size, argmax and the confusion matrix;
- ``logits only``: the same windows + ``infer_labels`` (classifier, labels at the mask's size) on images already
  loaded and transformed;
- ``raw forward``: the student alone on the same windows, batched as ``window_logits`` batches them.

``evaluate / raw`` is the whole overhead of evaluation; ``evaluate / logits only`` the part due to data loading.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from bench_inference import bare_forward, random_text
from common import base_parser, compare, machine_info, markdown_table, report, setup
from PIL import Image

from clipzss.config import Config, DataConfig, EvalConfig, StudentConfig
from clipzss.data import build_eval_dataset
from clipzss.evaluate import evaluate
from clipzss.inference.windows import infer_labels
from clipzss.models.segmenter import Segmenter
from clipzss.models.student import build_student

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"


def synthetic_folder(root: Path, count: int, size: tuple[int, int] = (360, 480)) -> Path:
    """A folder dataset of random JPEG images and PNG masks (11 classes), CamVid-sized."""
    rng = np.random.default_rng(0)
    (root / "val" / "images").mkdir(parents=True, exist_ok=True)
    (root / "val" / "masks").mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(f"class{i}" for i in range(11)) + "\n")
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
            root / "val/images" / f"{i}.jpg"
        )
        Image.fromarray(rng.integers(0, 11, size, dtype=np.uint8)).save(root / "val/masks" / f"{i}.png")
    return root


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="a folder dataset with a val split")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--student", default="mit_b0")
    args = parser.parse_args(argv)
    device = setup(args)
    reps = args.reps or (1 if args.dry else 3)
    short_side, dim = 512, 512
    if args.dry:
        args.images, short_side, dim = 2, 64, 32
    eval_cfg = EvalConfig(
        mode="slide", short_side=short_side, crop_size=min(512, short_side), max_images=args.images
    )

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root if args.root.is_dir() else synthetic_folder(Path(tmp), args.images)
        cfg = Config(
            data=DataConfig(dataset="folder", root=str(root), unseen=[]),
            student=StudentConfig(arch="Segformer", encoder=args.student, embed_dim=dim),
            eval=eval_cfg,
        )
        dataset = build_eval_dataset(cfg)
        names = list(dataset.class_names)
        seg = Segmenter(build_student(cfg.student, for_training=False), random_text(names, dim), cfg, device)
        logits_fn = seg.logits_fn(names)
        items = [dataset[i] for i in range(min(args.images, len(dataset)))]
        images = [item["image"][None].to(device) for item in items]
        masks = [item["mask"] for item in items]
        raws = [bare_forward(seg.student, x, eval_cfg, "slide") for x in images]

        def logits_only() -> None:
            for x, mask in zip(images, masks, strict=True):
                infer_labels(logits_fn, x, eval_cfg, tuple(mask.shape[-2:])).cpu()

        def raw_forward() -> None:
            for run in raws:
                run()

        def run_eval() -> None:
            evaluate(logits_fn, dataset, eval_cfg, device=device, num_workers=args.workers, progress=False)

        with torch.inference_mode():
            timing = compare(
                {"evaluate": run_eval, "logits only": logits_only, "raw forward": raw_forward},
                device,
                reps=reps,
                warmup=args.warmup,
            )
        sizes = sorted({tuple(x.shape[-2:]) for x in images})

    n = len(images)
    rows = [[name, n / timing.median(name), timing.ratio(name, "raw forward")] for name in timing.seconds]
    info = machine_info(device)
    table = markdown_table(["candidate", "images/s", "/ raw forward"], rows)
    table += (
        f"\n\n{n} images of {root.name if args.root.is_dir() else 'synthetic JPEGs'} (network input {sizes}), "
        f"slide {eval_cfg.crop_size}/{eval_cfg.stride}, {len(names)} classes, student Segformer {args.student}, "
        f"{args.workers} workers, {reps} repetitions after {args.warmup} warm-up, device {device}. "
        f"evaluate / logits only = {timing.ratio('evaluate', 'logits only'):.3f} (data loading and metrics)."
    )
    payload = {
        "seconds": timing.seconds,
        "images": n,
        "eval_over_raw": timing.ratio("evaluate", "raw forward"),
        "eval_over_logits": timing.ratio("evaluate", "logits only"),
    }
    report("Evaluation throughput: evaluate() vs the raw forward", info, table, payload, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
