"""`clipzss export`."""

from __future__ import annotations

import argparse

HELP = "export a trained student to ONNX (embeddings, or logits for a fixed class list)"
EPILOG = """examples:
  clipzss export runs/voc --onnx student.onnx
  clipzss export runs/voc --onnx road.onnx --classes "road,car,tree,sky" --teacher-weights ViT-B-16.safetensors
  clipzss export runs/voc --onnx road.onnx --text-embeddings names.safetensors
  clipzss predict street.jpg --onnx road.onnx --out outputs/onnx

Without class names the graph returns normalised embeddings: `clipzss predict --onnx` then needs
--text-embeddings (from `clipzss embed-text`). With them, the text classifier is baked in and CLIP is not needed
at prediction time. Batch size and image size are dynamic; the export is checked against PyTorch before it is
kept (--no-check skips that)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint file, run folder or save_pretrained folder")
    parser.add_argument("--onnx", required=True, help="output .onnx file")
    parser.add_argument("--classes", default=None, help="comma-separated class names to bake in")
    parser.add_argument(
        "--text-embeddings", default=None, help="bake in these embeddings (file from `clipzss embed-text`)"
    )
    parser.add_argument("--teacher-weights", default=None, help="local CLIP weights for the class names")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's, 17)")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime-against-PyTorch check")


def run(args: argparse.Namespace) -> int:
    from clipzss.export import export_checkpoint
    from clipzss.names import parse_class_names

    info = export_checkpoint(
        args.checkpoint,
        args.onnx,
        class_names=parse_class_names(args.classes) if args.classes is not None else None,
        text_embeddings=args.text_embeddings,
        teacher_weights=args.teacher_weights,
        **({} if args.opset is None else {"opset": args.opset}),
        check=not args.no_check,
    )
    what = f"logits for {len(info.class_names)} classes" if info.class_names else "normalised embeddings"
    checked = f", max |ONNX - PyTorch| {info.max_abs_diff:.2e}" if info.max_abs_diff is not None else ""
    print(f"wrote {info.path} ({what}; dynamic batch and size, multiples of {info.pad_multiple}{checked})")
    return 0
