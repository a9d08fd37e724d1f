"""`clipzss embed-text`."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipzss.cli._common import add_device_arg, add_teacher_args, teacher_config

HELP = "precompute CLIP text embeddings of class names to a file"
EPILOG = """examples:
  clipzss embed-text --classes "cat,dog,grass" --out names.safetensors --teacher-weights ViT-B-16.safetensors
  clipzss embed-text --classes-file classes.txt --out names.safetensors"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classes", default=None, help="comma-separated class names")
    parser.add_argument("--classes-file", default=None, help="a file with one class name per line")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--checkpoint", default=None, help="take the teacher config from this checkpoint")
    add_teacher_args(parser)
    add_device_arg(parser)


def run(args: argparse.Namespace) -> int:
    from clipzss.checkpoint import load_checkpoint
    from clipzss.names import parse_class_names
    from clipzss.predict import PrecomputedText
    from clipzss.runtime import resolve_device
    from clipzss.teacher import build_teacher

    if bool(args.classes) == bool(args.classes_file):
        raise ValueError("give the class names with exactly one of --classes or --classes-file")
    if args.classes_file:
        path = Path(args.classes_file)
        if not path.is_file():
            raise FileNotFoundError(f"class file not found: {path}")
        names = parse_class_names([line for line in path.read_text().splitlines() if line.strip()])
    else:
        names = parse_class_names(args.classes)
    base = load_checkpoint(args.checkpoint).config.teacher if args.checkpoint else None
    # A checkpoint's own teacher settings never reach the network; weights named on the command line may.
    download = base is None or bool(args.teacher_weights)
    teacher = build_teacher(teacher_config(base, args), device=resolve_device(args.device), download=download)
    PrecomputedText.from_teacher(teacher, names).save(args.out)
    print(f"wrote {len(names)} text embeddings ({teacher.embed_dim}-d) to {args.out}")
    return 0
