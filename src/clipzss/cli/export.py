"""`clipzss export`."""

from __future__ import annotations

import argparse

from clipzss.cli._common import add_classes_args, add_overwrite_arg, class_names_from_args

HELP = "export a trained student to ONNX (embeddings, or logits for a fixed class list)"
EPILOG = """examples:
  clipzss export runs/voc --onnx student.onnx
  clipzss export runs/voc --onnx road.onnx --classes "road,car,tree,sky" --teacher-weights ViT-B-16.safetensors
  clipzss export runs/voc --onnx road.onnx --text-embeddings names.safetensors
  clipzss predict street.jpg --onnx road.onnx --out outputs/onnx

Without class names the graph returns normalised embeddings: `clipzss predict --onnx` then needs
--text-embeddings (from `clipzss embed-text`). With them, the text classifier is baked in and CLIP is not needed
at prediction time. Batch size and image size are dynamic; the export is checked against PyTorch before it is
kept (--no-check skips that). An existing --onnx file is never replaced unless --overwrite is given, and the
file appears only once it is complete."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint file, run folder or save_pretrained folder")
    parser.add_argument("--onnx", required=True, help="output .onnx file")
    add_overwrite_arg(parser)
    add_classes_args(parser, "class names to bake in")
    parser.add_argument(
        "--text-embeddings", default=None, help="bake in these embeddings (file from `clipzss embed-text`)"
    )
    parser.add_argument("--teacher-weights", default=None, help="local CLIP weights for the class names")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's, 17)")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime-against-PyTorch check")


def run(args: argparse.Namespace) -> int:
    from clipzss.export import export_checkpoint

    info = export_checkpoint(
        args.checkpoint,
        args.onnx,
        class_names=class_names_from_args(args),
        text_embeddings=args.text_embeddings,
        teacher_weights=args.teacher_weights,
        **({} if args.opset is None else {"opset": args.opset}),
        check=not args.no_check,
        overwrite=args.overwrite,
    )
    what = f"logits for {len(info.class_names)} classes" if info.class_names else "normalised embeddings"
    checked = f", max |ONNX - PyTorch| {info.max_abs_diff:.2e}" if info.max_abs_diff is not None else ""
    print(f"wrote {info.path} ({what}; dynamic batch and size, multiples of {info.pad_multiple}{checked})")
    return 0
