"""`clipzss quickstart`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from clipzss.cli._common import add_device_arg

HELP = "train, evaluate and predict on a small generated dataset (a few CPU minutes)"
EPILOG = """Trains a small student on a generated dataset for a few minutes on CPU, evaluates it on seen and unseen
classes, and writes a prediction overlay and a short report. Set CLIPZSS_CLIP_WEIGHTS=/path/to/ViT-B-16 weights
(or pass --teacher-weights) to use real CLIP; otherwise it trains in the synthetic world, whose aligned teacher is a
stand-in for CLIP, and prints the student's unseen mIoU next to the teacher's own and a seen-only student's."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    parser.add_argument(
        "--iters", type=int, default=None, help="training iterations (default: the quick start's)"
    )
    parser.add_argument(
        "--teacher-weights",
        default=None,
        help="real CLIP ViT-B-16 weights (file); default: the synthetic world's stand-in teacher",
    )
    add_device_arg(parser)


def run(args: argparse.Namespace) -> int:
    from clipzss.quickstart import WORLD_NOTE, output_folder, run_quickstart, uses_world

    weights = args.teacher_weights or os.environ.get("CLIPZSS_CLIP_WEIGHTS")
    out = output_folder(Path(args.out))
    if out != Path(args.out):
        print(f"{args.out} holds an earlier quick start: this one writes to {out}")
    if uses_world(weights):
        print(WORLD_NOTE)
    result = run_quickstart(out, iters=args.iters, teacher_weights=weights, device=args.device)
    print(result.summary())
    return 0
