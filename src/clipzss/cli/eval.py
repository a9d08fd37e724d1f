"""`clipzss eval`."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipzss.cli._common import add_device_arg, add_label_candidates_arg, add_teacher_args, load_segmenter

HELP = "evaluate a checkpoint (or the MaskCLIP baseline) on a dataset: pAcc, mIoU(S/U), hIoU"
EPILOG = """examples:
  clipzss eval runs/voc --dataset voc --data-root /data/VOCdevkit/VOC2012 --split val
  clipzss eval runs/camvid/model.safetensors --dataset folder --data-root ../shared/data/camvid \\
      --unseen car,tree,pedestrian --seen-gamma 0.1
  clipzss eval --baseline maskclip --teacher-weights ViT-B-16.safetensors --dataset folder --data-root DIR"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", nargs="?", default=None, help="checkpoint file or run folder")
    parser.add_argument("--baseline", choices=["maskclip"], default=None, help="evaluate CLIP itself instead")
    parser.add_argument(
        "--dataset",
        default=None,
        help="voc, coco-stuff, context, context-459, ade20k, ade20k-full, folder, synthetic",
    )
    parser.add_argument("--data-root", default=None, help="dataset root folder")
    parser.add_argument(
        "--split", default=None, help="which split to evaluate (default: the config's val split)"
    )
    parser.add_argument(
        "--unseen", default=None, help="comma-separated unseen class names (default: standard split)"
    )
    parser.add_argument("--mode", choices=["slide", "whole"], default=None, help="inference mode")
    parser.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument(
        "--seen-gamma",
        type=float,
        default=None,
        help="also report ZegCLIP's seen-score calibration: seen sigmoid scores lowered by G (ZegCLIP: 0.1)",
    )
    parser.add_argument(
        "--absent-classes",
        choices=["mmseg", "skip"],
        default=None,
        help="a class absent from the ground truth: mmseg = IoU 0 if predicted (default), skip = left out",
    )
    add_label_candidates_arg(parser)
    parser.add_argument("--out", default=None, help="folder for metrics.json / per_class.csv")
    parser.add_argument(
        "--report",
        default=None,
        help="folder for a report: per-class IoU, confusion matrix, examples, report.md",
    )
    parser.add_argument("--workers", type=int, default=None, help="data-loading workers")
    add_teacher_args(parser)
    add_device_arg(parser)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from clipzss.checkpoint import resolve_checkpoint_path
    from clipzss.config import Config
    from clipzss.data import build_eval_dataset
    from clipzss.evaluate import evaluate
    from clipzss.names import parse_class_names
    from clipzss.predict import Segmenter

    segmenter = load_segmenter(args)
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
    if args.label_candidates is not None:
        eval_cfg = replace(eval_cfg, label_candidates=args.label_candidates)
    cfg = replace(cfg, data=data, eval=eval_cfg)
    if not (data.eval_root or data.root) and (data.eval_dataset or data.dataset) != "synthetic":
        raise ValueError("say where the dataset is: --data-root DIR")
    dataset = build_eval_dataset(cfg, args.split)
    segmenter.eval_cfg = eval_cfg
    logits_fn = segmenter.logits_fn(dataset.class_names)
    result = evaluate(
        logits_fn,
        dataset,
        eval_cfg,
        device=segmenter.device,
        num_workers=data.num_workers,
    )
    if isinstance(segmenter, Segmenter):  # a checkpoint saved before settings existed trained inductively
        result.extra["setting"] = segmenter.config.data.setting
        print(f"trained in the {result.extra['setting']} setting")
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
        print(f"wrote {write_report(result, dataset, logits_fn, args.report, eval_cfg, title=title)}")
    return 0
