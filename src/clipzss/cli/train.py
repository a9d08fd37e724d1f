"""`clipzss train`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

HELP = "train a student with the frozen CLIP teacher"
EPILOG = """examples:
  clipzss train configs/voc_inductive.yaml data.root=/data/VOCdevkit/VOC2012
  clipzss train configs/camvid.yaml data.root=/data/camvid train.max_iters=200 teacher.weights=none
  torchrun --nproc-per-node 4 -m clipzss train configs/coco_inductive.yaml data.root=/data/coco_stuff164k
  clipzss train runs/voc/config.yaml --resume runs/voc train.max_iters=40000

--resume continues a run in its own folder, whatever train.output_dir its config holds; name
train.output_dir=NEW on the command line to continue it in another, empty folder instead."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", nargs="?", default=None, help="YAML config (configs/*.yaml); defaults when omitted"
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-4")
    parser.add_argument(
        "--resume", default=None, help="run folder (or its train_state.pt) to continue, in that folder"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="train into train.output_dir even if it already holds a run, replacing it (refused otherwise)",
    )


def run(args: argparse.Namespace) -> int:
    from clipzss.config import load_config
    from clipzss.training.loop import TrainingInterrupted, train

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).is_file():
        config, overrides = None, [config, *overrides]  # `clipzss train key=value ...` with the defaults
    cfg = load_config(config, overrides)
    if args.resume is not None and not any(_key(item) == "train.output_dir" for item in overrides):
        cfg.train.output_dir = _in_place(cfg.train.output_dir, args.resume)
    try:
        path = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except TrainingInterrupted as stop:
        print(f"clipzss train: {stop}", file=sys.stderr)
        return 130
    print(f"checkpoint: {path}")
    return 0


def _key(override: str) -> str:
    return override.partition("=")[0].strip()


def _in_place(output_dir: str, resume: str) -> str:
    """The folder a resume writes to: the run's own, never the one its config names (the run may have moved, or
    come from someone else, and a config file never chooses where we write)."""
    from clipzss.runs import same_folder
    from clipzss.training.state import resume_folder

    folder = resume_folder(resume)
    if not same_folder(output_dir, folder):
        logging.getLogger("clipzss").info(
            "resuming %s in place (its config's train.output_dir %r is not used)", folder, output_dir
        )
    return str(folder)
