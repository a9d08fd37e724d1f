"""`clipzss predict`."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from clipzss.cli._common import (
    add_baseline_arg,
    add_device_arg,
    add_label_candidates_arg,
    add_teacher_args,
    load_segmenter,
)

HELP = "segment images with any class names"
EPILOG = """examples:
  clipzss predict photo.jpg --checkpoint runs/voc --classes "cat,dog,grass,sky"
  clipzss predict a.jpg b.jpg --baseline clearclip --teacher-weights ViT-B-16.safetensors --classes "road,car,tree"
  clipzss predict photo.jpg --checkpoint runs/voc --text-embeddings names.safetensors"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--classes", default=None, help='comma-separated class names, e.g. "cat,dog,grass"')
    parser.add_argument(
        "--checkpoint", default=None, help="checkpoint file or run folder of a trained student"
    )
    add_baseline_arg(
        parser, "use CLIP itself, training-free, with this recipe's last block and input handling"
    )
    parser.add_argument("--text-embeddings", default=None, help="file written by `clipzss embed-text`")
    parser.add_argument(
        "--onnx", default=None, help="run a model from `clipzss export` with onnxruntime alone"
    )
    parser.add_argument("--mode", choices=["slide", "whole"], default=None, help="inference mode")
    add_label_candidates_arg(parser)
    parser.add_argument("--out", default="outputs/predict", help="output folder (default: outputs/predict)")
    add_teacher_args(parser)
    add_device_arg(parser)


def run(args: argparse.Namespace) -> int:
    from clipzss.inference import load_image
    from clipzss.names import parse_class_names
    from clipzss.prediction_files import prediction_folder, save_prediction

    missing = [path for path in args.images if not Path(path).is_file()]
    if missing:  # before any model is loaded or any file written
        raise FileNotFoundError(f"image not found: {missing[0]}")
    names = parse_class_names(args.classes) if args.classes is not None else None
    if args.onnx:
        # onnxruntime, numpy and PIL alone: this branch never imports torch.
        from clipzss.onnx_runner import OnnxSegmenter

        if args.checkpoint or args.baseline:
            raise ValueError("--onnx runs the exported model on its own: drop --checkpoint / --baseline")
        segmenter = OnnxSegmenter(args.onnx, args.text_embeddings)
        names = names or segmenter.class_names
    else:
        segmenter = load_segmenter(args)
        if names is None:
            if not args.text_embeddings:
                raise ValueError('give the class names to segment, e.g. --classes "cat,dog,grass"')
            names = segmenter.text_encoder.class_names
    if args.label_candidates is not None:
        if args.onnx:
            segmenter.eval["label_candidates"] = args.label_candidates
        else:
            segmenter.eval_cfg = dataclasses.replace(
                segmenter.eval_cfg, label_candidates=args.label_candidates
            )
    out = prediction_folder(args.images, args.out)
    for path in args.images:
        image = load_image(path)
        mask = segmenter.predict(image, names, mode=args.mode)
        print(f"{path}: {save_prediction(out, Path(path).stem, image, mask, names)}")
    return 0
