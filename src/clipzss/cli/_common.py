"""Arguments and model loading shared by several commands."""

from __future__ import annotations

import argparse
from typing import Any

from clipzss.errors import UsageError


def add_teacher_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher-model", default=None, help="open_clip model name (default: the config's)")
    parser.add_argument(
        "--teacher-weights",
        default=None,
        help="local CLIP weights file, an open_clip pretrained tag (needs the hub), or 'none' (random)",
    )


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)"
    )


def _candidates(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 (0: exact labels), got {text!r}")
    return value


def add_label_candidates_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--label-candidates",
        type=_candidates,
        default=None,
        metavar="M",
        help="approximate, faster labels: only each low-resolution point's M best classes compete where the "
        "exact test cannot settle a region (0: exact, the default; see benchmarks/README.md)",
    )


def add_classes_args(parser: argparse.ArgumentParser, what: str = "class names") -> None:
    """--classes (comma-separated) and --classes-file (one a line: names with commas, long lists)."""
    parser.add_argument("--classes", default=None, help=f'comma-separated {what}, e.g. "cat,dog,grass"')
    parser.add_argument(
        "--classes-file",
        default=None,
        help=f"a UTF-8 text file of {what}, one a line (names may hold commas)",
    )


def class_names_from_args(args: argparse.Namespace) -> list[str] | None:
    """The names of --classes or --classes-file (None when neither is given), checked by one rule."""
    from clipzss.names import parse_class_names, read_names_file

    if args.classes is not None and args.classes_file is not None:
        raise UsageError("give the class names with exactly one of --classes or --classes-file, not both")
    if args.classes_file is not None:
        return read_names_file(args.classes_file)
    return parse_class_names(args.classes) if args.classes is not None else None


def add_overwrite_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite", action="store_true", help="replace existing output files (refused without it)"
    )


def teacher_config(base: Any, args: argparse.Namespace) -> Any:
    """``base`` (a TeacherConfig, or the defaults) with --teacher-model / --teacher-weights applied."""
    from dataclasses import replace

    from clipzss.config import TeacherConfig

    cfg = base or TeacherConfig()
    if args.teacher_model:
        cfg = replace(cfg, model=args.teacher_model)
    if args.teacher_weights:
        cfg = replace(cfg, weights=args.teacher_weights)
    return cfg


def add_baseline_arg(parser: argparse.ArgumentParser, help_text: str) -> None:
    """--baseline {maskclip,clearclip,sclip,naclip}: CLIP itself, its last block changed as the recipe's code."""
    from clipzss.models.recipes import BASELINES

    parser.add_argument("--baseline", choices=BASELINES, default=None, help=help_text)


def load_segmenter(args: argparse.Namespace) -> Any:
    """A student Segmenter from --checkpoint, or a training-free baseline from --baseline."""
    from clipzss.models.recipes import BASELINES
    from clipzss.models.segmenter import PrecomputedText, Segmenter, TrainingFreeSegmenter
    from clipzss.models.teacher import build_teacher
    from clipzss.runtime import resolve_device

    device = resolve_device(args.device)
    text_file = getattr(args, "text_embeddings", None)
    if args.checkpoint and args.baseline:
        raise UsageError(f"give either a checkpoint or --baseline {args.baseline}, not both")
    if args.checkpoint:
        text = PrecomputedText.load(text_file) if text_file else None
        return Segmenter.from_checkpoint(
            args.checkpoint, device=device, teacher_weights=args.teacher_weights, text_encoder=text
        )
    if args.baseline:
        teacher = build_teacher(teacher_config(None, args), device=device)
        return TrainingFreeSegmenter(teacher, recipe=args.baseline)
    raise UsageError(
        f"say which model to use: a checkpoint (run folder or .safetensors) or --baseline {'|'.join(BASELINES)}"
    )
