"""`clipzss predict`."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from clipzss.cli._common import (
    add_baseline_arg,
    add_classes_args,
    add_device_arg,
    add_label_candidates_arg,
    add_overwrite_arg,
    add_teacher_args,
    class_names_from_args,
    load_segmenter,
)
from clipzss.errors import UsageError

HELP = "segment images with any class names"
EPILOG = """examples:
  clipzss predict photo.jpg --checkpoint runs/voc --classes "cat,dog,grass,sky"
  clipzss predict photos/ --checkpoint runs/voc --classes-file classes.txt --out outputs/photos
  clipzss predict a.jpg b.jpg --baseline clearclip --teacher-weights ViT-B-16.safetensors --classes "road,car,tree"
  clipzss predict photo.jpg --checkpoint runs/voc --text-embeddings names.safetensors

Without --out, results go to outputs/predict, or to the next free outputs/predict-2, -3, ... An existing --out
folder is written into, but a mask or overlay already there is never replaced unless --overwrite is given. Each
mask records its class list in its PNG metadata, and predictions.json in the folder lists every run's class list,
model and files. An image that cannot be read is reported and skipped; the command then exits with code 2."""

DEFAULT_OUT = "outputs/predict"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from clipzss.config import EvalConfig, choices

    parser.add_argument("images", nargs="+", help="image files, or folders of images")
    add_classes_args(parser)
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
    parser.add_argument("--mode", choices=choices(EvalConfig, "mode"), default=None, help="inference mode")
    add_label_candidates_arg(parser)
    parser.add_argument(
        "--out",
        default=None,
        help=f"output folder (default: {DEFAULT_OUT}, or the next free {DEFAULT_OUT}-2 ...)",
    )
    add_overwrite_arg(parser)
    add_teacher_args(parser)
    add_device_arg(parser)


def _model_name(args: argparse.Namespace) -> str:
    if args.onnx:
        return f"onnx:{args.onnx}"
    if args.checkpoint:
        return f"checkpoint:{args.checkpoint}"
    return f"baseline:{args.baseline}"


def run(args: argparse.Namespace) -> int:
    import sys

    from clipzss.files import next_free_path
    from clipzss.images import image_paths, load_image
    from clipzss.prediction_files import prediction_folder, save_prediction

    images = image_paths(args.images)  # before any model is loaded or any file written
    names = class_names_from_args(args)
    out_dir = Path(args.out) if args.out is not None else next_free_path(DEFAULT_OUT)
    out = prediction_folder(images, out_dir, overwrite=args.overwrite)  # refuses existing outputs now
    if args.out is None:
        print(f"writing to {out_dir}")
    if args.onnx:
        # onnxruntime, numpy and PIL alone: this branch never imports torch.
        from clipzss.inference.onnx_runner import OnnxSegmenter

        if args.checkpoint or args.baseline:
            raise UsageError("--onnx runs the exported model on its own: drop --checkpoint / --baseline")
        segmenter = OnnxSegmenter(args.onnx, args.text_embeddings)
        names = names or segmenter.class_names
    else:
        segmenter = load_segmenter(args)
        if names is None:
            if not args.text_embeddings:
                raise UsageError('give the class names to segment, e.g. --classes "cat,dog,grass"')
            names = segmenter.text_encoder.class_names
    if args.label_candidates is not None:
        if args.onnx:
            segmenter.eval["label_candidates"] = args.label_candidates
        else:
            segmenter.eval_cfg = dataclasses.replace(
                segmenter.eval_cfg, label_candidates=args.label_candidates
            )
    failed: list[str] = []
    try:
        for path in images:
            try:
                image = load_image(path)
            except (ValueError, FileNotFoundError) as err:  # one unreadable image never stops the batch
                print(f"skipped {path}: {err}", file=sys.stderr)
                failed.append(str(err))
                continue
            mask = segmenter.predict(image, names, mode=args.mode)
            summary = save_prediction(
                out, path.stem, image, mask, names, source=path, model=_model_name(args)
            )
            print(f"{path}: {summary}")
    finally:
        out.write_record(names, _model_name(args))
    if failed:  # exit code 2 once every other image is written
        others = f"; the other {len(images) - len(failed)} were written" if len(images) > len(failed) else ""
        more = f" (and {len(failed) - 1} more unreadable images, listed above)" if len(failed) > 1 else ""
        raise UsageError(f"{failed[0]}{more}{others}")
    return 0
