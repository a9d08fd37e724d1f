"""`clipzss train`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "train a student with the frozen CLIP teacher"
EPILOG = """examples:
  clipzss train configs/voc_inductive.yaml data.root=/data/VOCdevkit/VOC2012
  clipzss train configs/camvid.yaml data.root=/data/camvid train.max_iters=200 teacher.weights=none
  torchrun --nproc-per-node 4 -m clipzss train configs/coco_inductive.yaml data.root=/data/coco_stuff164k
  clipzss train runs/voc/config.yaml --resume runs/voc"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", nargs="?", default=None, help="YAML config (configs/*.yaml); defaults when omitted"
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-4")
    parser.add_argument("--resume", default=None, help="run folder (or its train_state.pt) to continue from")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="train into train.output_dir even if it already holds a run, replacing it (refused otherwise)",
    )


def run(args: argparse.Namespace) -> int:
    from clipzss.config import load_config
    from clipzss.training import TrainingInterrupted, train

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).is_file():
        config, overrides = None, [config, *overrides]  # `clipzss train key=value ...` with the defaults
    cfg = load_config(config, overrides)
    try:
        path = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except TrainingInterrupted as stop:
        print(f"clipzss train: {stop}", file=sys.stderr)
        return 130
    print(f"checkpoint: {path}")
    return 0
