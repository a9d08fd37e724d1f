"""`clipzss embed-text`."""

from __future__ import annotations

import argparse

from clipzss.cli._common import (
    add_classes_args,
    add_device_arg,
    add_overwrite_arg,
    add_teacher_args,
    class_names_from_args,
    teacher_config,
)
from clipzss.errors import UsageError

HELP = "precompute CLIP text embeddings of class names to a file"
EPILOG = """examples:
  clipzss embed-text --classes "cat,dog,grass" --out names.safetensors --teacher-weights ViT-B-16.safetensors
  clipzss embed-text --classes-file classes.txt --out names.safetensors

An existing --out file is never replaced unless --overwrite is given."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_classes_args(parser)
    parser.add_argument("--out", required=True, help="output .safetensors file")
    add_overwrite_arg(parser)
    parser.add_argument("--checkpoint", default=None, help="take the teacher config from this checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_teacher_args(parser)
    add_device_arg(parser)


def run(args: argparse.Namespace) -> int:
    from clipzss.checkpoint import load_checkpoint
    from clipzss.files import refuse_existing
    from clipzss.models.segmenter import PrecomputedText
    from clipzss.models.teacher import build_teacher
    from clipzss.runtime import resolve_device

    names = class_names_from_args(args)
    if names is None:
        raise UsageError("give the class names with exactly one of --classes or --classes-file")
    refuse_existing([args.out], args.overwrite)  # before CLIP is loaded: minutes of work never thrown away
    base = load_checkpoint(args.checkpoint).config.teacher if args.checkpoint else None
    # A checkpoint's own teacher settings never reach the network; weights named on the command line may.
    download = base is None or bool(args.teacher_weights)
    teacher = build_teacher(teacher_config(base, args), device=resolve_device(args.device), download=download)
    text = PrecomputedText.from_teacher(teacher, names, progress=not args.no_progress)
    text.save(args.out, overwrite=args.overwrite)
    print(f"wrote {len(names)} text embeddings ({teacher.embed_dim}-d) to {args.out}")
    return 0
