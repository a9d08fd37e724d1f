"""The settings in the synthetic world: inductive, transductive (teacher names, both cluster modes, self-training),
supervised, and the teacher itself, through the ordinary ``clipzss.training.loop.train`` (one row per setting and seed).

    python benchmarks/transductive_world.py --seeds 1 --iters 300 --json benchmarks/transductive_runs.json

The student recipe is the evidence table's (`clipzss.worlds.students.student_config`); only ``data.setting`` and
the ``transductive`` section change. Self-training starts halfway, with an EMA decay whose horizon (1 / (1 - decay)
= 50 steps) fits a 300-step run; the shipped configs' 0.999 is for runs of tens of thousands of steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
from common import named_label_quality

from clipzss.data.transforms import build_transforms
from clipzss.worlds.students import student_config, teacher_metrics, train_and_evaluate
from clipzss.worlds.synthetic import WorldConfig, WorldScenes, load_teacher, world_datasets

KEYS = ("mIoU(S)", "mIoU(U)", "hIoU")


def rows(iters: int) -> dict[str, dict[str, object]]:
    """Row name → (data.setting, transductive fields)."""
    half = iters // 2
    return {
        "inductive (default)": {"setting": "inductive"},
        "transductive, teacher names, clusters unnamed": {"setting": "transductive"},
        "transductive, teacher names, names replace clusters": {
            "setting": "transductive",
            "clusters": "replace",
        },
        "transductive + EMA self-training from the half": {
            "setting": "transductive",
            "self_train_start": half,
            "ema_decay": 0.98,
        },
        "supervised (upper bound)": {"setting": "supervised"},
    }


@torch.no_grad()
def label_quality(
    thresholds: tuple[float, ...] = (0.0, 0.5, 0.7, 0.9), images: int = 64
) -> list[dict[str, float]]:
    """The teacher's named labels on the unlabelled pixels of training scenes (whole images): the share named and
    the share of those named with their true class, per `transductive.threshold` (at `transductive.tau`)."""
    cfg, world = student_config("unused"), WorldConfig()
    teacher = load_teacher(world)
    scenes = WorldScenes(world, "train", images, transform=build_transforms(cfg.data, False, world.size))
    items = [scenes[i] for i in range(images)]
    truth = torch.stack([item["mask"] for item in items])  # (N, H, W) class ids, every class
    names, split = list(scenes.class_names), scenes.split
    texts = teacher.text_embeddings([names[i] for i in (*split.seen, *split.unseen)])
    _, dense = teacher.encode_image(torch.stack([item["image"] for item in items]))
    return named_label_quality(dense, texts, truth, split, cfg.transductive.tau, thresholds)


def run(name: str, spec: dict[str, object], seed: int, iters: int, out: Path) -> dict[str, float]:
    cfg = student_config(out / f"{abs(hash(name)) % 10**8}_{seed}", seed=seed, iters=iters)
    spec = dict(spec)
    cfg.data.setting = str(spec.pop("setting"))
    cfg.transductive = dataclasses.replace(cfg.transductive, **spec)
    world = WorldConfig()
    train_set, val_set = world_datasets(cfg)
    if cfg.data.setting == "supervised":  # every class labelled in training; evaluation keeps the split
        transform = build_transforms(cfg.data, True)
        train_set = WorldScenes(world, "train", len(train_set), unseen=[], transform=transform, train=True)
    return train_and_evaluate(cfg, load_teacher(world), train_set, val_set)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument(
        "--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1"
    )
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--rows", nargs="*", default=None, help="row names (default: all)")
    parser.add_argument("--json", default=None, help="write the runs here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: list[dict[str, object]] = []
    cfg = student_config("unused")
    _, val_set = world_datasets(cfg)
    teacher = teacher_metrics(load_teacher(WorldConfig()), val_set, cfg.eval)
    print(f"{'teacher (zero-shot, every name)':<55}" + "  ".join(f"{k} {teacher[k]:6.2f}" for k in KEYS))
    quality = label_quality()
    for row in quality:
        print(
            f"teacher names at threshold {row['threshold']:.1f}: {100 * row['named']:.1f}% of unlabelled pixels, "
            f"{100 * row['precision']:.1f}% of them right"
        )
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in rows(args.iters).items():
            if args.rows and name not in args.rows:
                continue
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                tic = time.perf_counter()
                metrics = run(name, spec, seed, args.iters, Path(tmp))
                seconds = time.perf_counter() - tic
                results.append(
                    {"row": name, "seed": seed, "iters": args.iters, "seconds": seconds, **metrics}
                )
                print(
                    f"{name:<55}" + "  ".join(f"{k} {metrics[k]:6.2f}" for k in KEYS) + f"  ({seconds:.0f} s)"
                )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"teacher": teacher, "label_quality": quality, "runs": results}, indent=1)
        )


if __name__ == "__main__":
    main()
