"""`clipzss <command>`: a thin layer over the Python API. `main(argv)` runs in-process, so tests call it directly."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("clipzss")

EPILOGS = {
    "train": """examples:
  clipzss train configs/voc_inductive.yaml data.root=/data/VOCdevkit/VOC2012
  clipzss train configs/camvid.yaml data.root=../shared/data/camvid train.max_iters=200 teacher.weights=none
  torchrun --nproc-per-node 4 -m clipzss train configs/coco_inductive.yaml data.root=/data/coco_stuff164k
  clipzss train runs/voc/config.yaml --resume runs/voc""",
    "eval": """examples:
  clipzss eval runs/voc --dataset voc --data-root /data/VOCdevkit/VOC2012 --split val
  clipzss eval runs/camvid/model.safetensors --dataset folder --data-root ../shared/data/camvid \\
      --unseen car,tree,pedestrian --seen-gamma 0.1
  clipzss eval --baseline maskclip --teacher-weights ViT-B-16.safetensors --dataset folder --data-root DIR""",
    "predict": """examples:
  clipzss predict photo.jpg --checkpoint runs/voc --classes "cat,dog,grass,sky"
  clipzss predict a.jpg b.jpg --baseline maskclip --teacher-weights ViT-B-16.safetensors --classes "road,car,tree"
  clipzss predict photo.jpg --checkpoint runs/voc --text-embeddings names.safetensors""",
    "embed-text": """examples:
  clipzss embed-text --classes "cat,dog,grass" --out names.safetensors --teacher-weights ViT-B-16.safetensors
  clipzss embed-text --classes-file classes.txt --out names.safetensors""",
    "quickstart": """Trains a small student on a generated dataset for a few minutes on CPU, evaluates it on seen and unseen
classes, and writes a prediction overlay and a short report. Set CLIPZSS_CLIP_WEIGHTS=/path/to/ViT-B-16 weights
(or pass --teacher-weights) to use real CLIP; otherwise it trains in the synthetic world, whose aligned teacher is a
stand-in for CLIP, and prints the student's unseen mIoU next to the teacher's own and a seen-only student's.""",
}


def _add_teacher_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher-model", default=None, help="open_clip model name (default: the config's)")
    parser.add_argument(
        "--teacher-weights",
        default=None,
        help="local CLIP weights file, an open_clip pretrained tag (needs the hub), or 'none' (random)",
    )


def _add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)"
    )


# Commands that live in their own modules. Each module keeps its top-level imports light (stdlib, clipzss.config)
# and defines HELP, optional EPILOG, add_arguments(parser) and run(args) -> int.
EXTENSION_COMMANDS = {
    "prepare-data": "clipzss.data.prepare",
    "check-data": "clipzss.data.doctor",
    "inspect-pseudo-labels": "clipzss.inspect",
    "export": "clipzss.export",
    "demo": "clipzss.demo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipzss",
        description="Zero-shot semantic segmentation with a CLIP teacher (CLIP-ZSS): train, evaluate, predict.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EPILOGS.get(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = command("train", "train a student with the frozen CLIP teacher")
    p.add_argument(
        "config", nargs="?", default=None, help="YAML config (configs/*.yaml); defaults when omitted"
    )
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-4")
    p.add_argument("--resume", default=None, help="run folder (or its train_state.pt) to continue from")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="train into train.output_dir even if it already holds a run, replacing it (refused otherwise)",
    )

    p = command(
        "eval", "evaluate a checkpoint (or the MaskCLIP baseline) on a dataset: pAcc, mIoU(S/U), hIoU"
    )
    p.add_argument("checkpoint", nargs="?", default=None, help="checkpoint file or run folder")
    p.add_argument("--baseline", choices=["maskclip"], default=None, help="evaluate CLIP itself instead")
    p.add_argument(
        "--dataset",
        default=None,
        help="voc, coco-stuff, context, context-459, ade20k, ade20k-full, folder, synthetic",
    )
    p.add_argument("--data-root", default=None, help="dataset root folder")
    p.add_argument("--split", default=None, help="which split to evaluate (default: the config's val split)")
    p.add_argument(
        "--unseen", default=None, help="comma-separated unseen class names (default: standard split)"
    )
    p.add_argument("--mode", choices=["slide", "whole"], default=None, help="inference mode")
    p.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images")
    p.add_argument(
        "--seen-gamma",
        type=float,
        default=None,
        help="also report ZegCLIP's seen-score calibration: seen sigmoid scores lowered by G (ZegCLIP: 0.1)",
    )
    p.add_argument(
        "--absent-classes",
        choices=["mmseg", "skip"],
        default=None,
        help="a class absent from the ground truth: mmseg = IoU 0 if predicted (default), skip = left out",
    )
    p.add_argument("--out", default=None, help="folder for metrics.json / per_class.csv")
    p.add_argument(
        "--report",
        default=None,
        help="folder for a report: per-class IoU, confusion matrix, examples, report.md",
    )
    p.add_argument("--workers", type=int, default=None, help="data-loading workers")
    _add_teacher_args(p)
    _add_device_arg(p)

    p = command("predict", "segment images with any class names")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--classes", default=None, help='comma-separated class names, e.g. "cat,dog,grass"')
    p.add_argument("--checkpoint", default=None, help="checkpoint file or run folder of a trained student")
    p.add_argument("--baseline", choices=["maskclip"], default=None, help="use CLIP itself (MaskCLIP)")
    p.add_argument("--text-embeddings", default=None, help="file written by `clipzss embed-text`")
    p.add_argument("--onnx", default=None, help="run a model from `clipzss export` with onnxruntime alone")
    p.add_argument("--mode", choices=["slide", "whole"], default=None, help="inference mode")
    p.add_argument("--out", default="outputs/predict", help="output folder (default: outputs/predict)")
    _add_teacher_args(p)
    _add_device_arg(p)

    p = command("embed-text", "precompute CLIP text embeddings of class names to a file")
    p.add_argument("--classes", default=None, help="comma-separated class names")
    p.add_argument("--classes-file", default=None, help="a file with one class name per line")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--checkpoint", default=None, help="take the teacher config from this checkpoint")
    _add_teacher_args(p)
    _add_device_arg(p)

    p = command("quickstart", "train, evaluate and predict on a small generated dataset (a few CPU minutes)")
    p.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    p.add_argument("--iters", type=int, default=None, help="training iterations (default: the quick start's)")
    p.add_argument(
        "--teacher-weights",
        default=None,
        help="real CLIP ViT-B-16 weights (file); default: the synthetic world's stand-in teacher",
    )
    _add_device_arg(p)

    for name, module_name in EXTENSION_COMMANDS.items():
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        p = command(name, module.HELP)
        if getattr(module, "EPILOG", None):
            p.epilog = module.EPILOG
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def _teacher_cfg(base, args: argparse.Namespace):
    from dataclasses import replace

    from clipzss.config import TeacherConfig

    cfg = base or TeacherConfig()
    if args.teacher_model:
        cfg = replace(cfg, model=args.teacher_model)
    if args.teacher_weights:
        cfg = replace(cfg, weights=args.teacher_weights)
    return cfg


def _segmenter(args: argparse.Namespace):
    """A student Segmenter from --checkpoint, or the MaskCLIP baseline from --baseline."""
    from clipzss.predict import MaskCLIPSegmenter, PrecomputedText, Segmenter, resolve_device
    from clipzss.teacher import build_teacher

    device = resolve_device(args.device)
    text_file = getattr(args, "text_embeddings", None)
    if args.checkpoint and args.baseline:
        raise ValueError("give either a checkpoint or --baseline maskclip, not both")
    if args.checkpoint:
        text = PrecomputedText.load(text_file) if text_file else None
        return Segmenter.from_checkpoint(
            args.checkpoint, device=device, teacher_weights=args.teacher_weights, text_encoder=text
        )
    if args.baseline == "maskclip":
        teacher = build_teacher(_teacher_cfg(None, args), device=device)
        return MaskCLIPSegmenter(teacher)
    raise ValueError(
        "say which model to use: a checkpoint (run folder or .safetensors) or --baseline maskclip"
    )


def cmd_predict(args: argparse.Namespace) -> int:
    from clipzss.names import parse_class_names  # torch-free: shared with the onnxruntime-only path

    if args.onnx:
        from clipzss.export import predict_onnx

        if args.classes is not None:  # the same checks as below; the runner then splits the checked list
            args.classes = ",".join(parse_class_names(args.classes))
        return predict_onnx(args)

    from clipzss.predict import load_rgb
    from clipzss.visualize import prediction_folder, save_prediction

    segmenter = _segmenter(args)
    if args.classes is None:
        if args.text_embeddings:
            names = segmenter.text_encoder.class_names
        else:
            raise ValueError('give the class names to segment, e.g. --classes "cat,dog,grass"')
    else:
        names = parse_class_names(args.classes)
    out = prediction_folder(args.images, args.out)
    for path in args.images:
        image = load_rgb(path)
        mask = segmenter.predict(image, names, mode=args.mode)
        print(f"{path}: {save_prediction(out, Path(path).stem, image, mask, names)}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from clipzss.checkpoint import resolve_checkpoint_path
    from clipzss.config import Config
    from clipzss.data import build_eval_dataset
    from clipzss.evaluate import evaluate
    from clipzss.predict import Segmenter, parse_class_names

    segmenter = _segmenter(args)
    cfg = segmenter.config if isinstance(segmenter, Segmenter) else Config()
    data = cfg.data
    if (
        args.dataset or args.data_root or args.unseen is not None
    ):  # explicit data replace the config's eval set
        data = replace(data, eval_dataset=None, eval_root=None, eval_unseen=None)
    if args.dataset:
        data = replace(data, dataset=args.dataset, root="" if not args.data_root else data.root)
    if args.data_root:
        data = replace(data, root=args.data_root)
    if args.unseen is not None:
        data = replace(data, unseen=parse_class_names(args.unseen) if args.unseen.strip() else [])
    if args.workers is not None:
        data = replace(data, num_workers=args.workers)
    eval_cfg = cfg.eval
    if args.mode:
        eval_cfg = replace(eval_cfg, mode=args.mode)
    if args.max_images:
        eval_cfg = replace(eval_cfg, max_images=args.max_images)
    if args.seen_gamma is not None:
        eval_cfg = replace(eval_cfg, seen_gamma=args.seen_gamma)
    if args.absent_classes:
        eval_cfg = replace(eval_cfg, absent_classes=args.absent_classes)
    cfg = replace(cfg, data=data, eval=eval_cfg)
    if not (data.eval_root or data.root) and (data.eval_dataset or data.dataset) != "synthetic":
        raise ValueError("say where the dataset is: --data-root DIR")
    dataset = build_eval_dataset(cfg, args.split)
    segmenter.eval_cfg = eval_cfg
    result = evaluate(
        segmenter.logits_fn(dataset.class_names),
        dataset,
        eval_cfg,
        device=segmenter.device,
        num_workers=data.num_workers,
    )
    print(result.format_table())
    if args.out:
        out = Path(args.out)
    elif args.checkpoint:
        out = (
            resolve_checkpoint_path(args.checkpoint).parent
            / f"eval_{data.eval_dataset or data.dataset}_{args.split or data.val_split}"
        )
    else:
        out = Path("outputs") / f"eval_maskclip_{data.dataset}"
    for path in result.save(out):
        print(f"wrote {path}")
    if args.report:
        from clipzss.report import write_report

        source = Path(args.checkpoint).name if args.checkpoint else "MaskCLIP baseline"
        title = f"{source} on {data.eval_dataset or data.dataset} {args.split or data.val_split}"
        logits_fn = segmenter.logits_fn(dataset.class_names)
        print(f"wrote {write_report(result, dataset, logits_fn, args.report, eval_cfg, title=title)}")
    return 0


def cmd_embed_text(args: argparse.Namespace) -> int:
    from clipzss.checkpoint import load_checkpoint
    from clipzss.predict import PrecomputedText, parse_class_names, resolve_device
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
    teacher = build_teacher(_teacher_cfg(base, args), device=resolve_device(args.device))
    PrecomputedText.from_teacher(teacher, names).save(args.out)
    print(f"wrote {len(names)} text embeddings ({teacher.embed_dim}-d) to {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
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


def cmd_quickstart(args: argparse.Namespace) -> int:
    from clipzss.quickstart import run_quickstart

    weights = args.teacher_weights or os.environ.get("CLIPZSS_CLIP_WEIGHTS")
    run_quickstart(Path(args.out), iters=args.iters, teacher_weights=weights, device=args.device)
    return 0


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "predict": cmd_predict,
    "embed-text": cmd_embed_text,
    "quickstart": cmd_quickstart,
}


_WORKER_ERROR = re.compile(r"Caught (?P<type>\w+) in DataLoader worker process \d+\.")


def user_message(err: BaseException) -> str:
    """The one line a user sees for an error: its message's first line, whatever process raised it.

    An error in a data-loading worker reaches us re-raised by torch as "Caught ValueError in DataLoader worker
    process 0." followed by the worker's traceback; the line that matters (the file and what is wrong with it) is
    the original exception's message at the end of that traceback.
    """
    text = str(err).strip()
    if not text:
        return type(err).__name__
    lines = text.splitlines()
    found = _WORKER_ERROR.match(lines[0])
    if found and len(lines) > 1 and lines[1].startswith("Original Traceback"):
        # The traceback ends with "[module.]Type: message"; a message of several lines starts on that line.
        head = re.compile(rf"^(?:[\w.]+\.)?{re.escape(found['type'])}: (?P<message>.+)$")
        for line in reversed(lines[2:]):
            original = head.match(line)
            if original:
                return original["message"].strip()
    return lines[0]


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; user errors print one line on stderr and return 2 (CLIPZSS_DEBUG=1 shows the traceback)."""
    args = build_parser().parse_args(argv)
    # Our own messages at INFO; third-party libraries (open_clip logs at INFO on the root logger) at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("clipzss").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        handler = getattr(args, "func", None) or COMMANDS[args.command]
        return handler(args)
    except (ValueError, OSError, RuntimeError, KeyError) as err:
        if os.environ.get("CLIPZSS_DEBUG"):
            raise
        print(f"clipzss {args.command}: error: {user_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"clipzss {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
