"""`clipzss eval`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from clipzss.cli._common import (
    add_baseline_arg,
    add_device_arg,
    add_label_candidates_arg,
    add_overwrite_arg,
    add_teacher_args,
    load_segmenter,
)
from clipzss.errors import UsageError

HELP = "evaluate a checkpoint (or a training-free baseline) on a dataset: pAcc, mIoU(S/U), hIoU"
EPILOG = """examples:
  clipzss eval runs/voc --dataset voc --data-root /data/VOCdevkit/VOC2012 --split val
  clipzss eval runs/camvid/model.safetensors --dataset folder --data-root /data/camvid \\
      --unseen car,tree,pedestrian --seen-gamma 0.1
  clipzss eval --baseline clearclip --teacher-weights ViT-B-16.safetensors --dataset folder --data-root DIR

Without --out, the metrics go to <run folder>/eval_<dataset>_<split> (outputs/eval_<baseline>_<dataset> for a
baseline), or to the next free <that>-2, -3, ...; --report alone writes the report there too. Files already in a
folder given with --out or --report are never replaced unless --overwrite is given (checked before evaluating)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from clipzss.config import EvalConfig, choices

    parser.add_argument("checkpoint", nargs="?", default=None, help="checkpoint file or run folder")
    add_baseline_arg(parser, "evaluate CLIP itself instead, training-free, with this recipe")
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
    parser.add_argument("--mode", choices=choices(EvalConfig, "mode"), default=None, help="inference mode")
    parser.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument(
        "--seen-gamma",
        type=float,
        default=None,
        help="also report ZegCLIP's seen-score calibration: seen sigmoid scores lowered by G (ZegCLIP: 0.1)",
    )
    parser.add_argument(
        "--absent-classes",
        choices=choices(EvalConfig, "absent_classes"),
        default=None,
        help="a class absent from the ground truth: mmseg = IoU 0 if predicted (default), skip = left out",
    )
    add_label_candidates_arg(parser)
    parser.add_argument("--out", default=None, help="folder for metrics.json / per_class.csv")
    parser.add_argument(
        "--report",
        nargs="?",
        const="",
        default=None,
        metavar="DIR",
        help="also write a report (per-class IoU, confusion matrix, examples, report.md) to DIR "
        "(default: the metrics' folder)",
    )
    add_overwrite_arg(parser)
    parser.add_argument("--workers", type=int, default=None, help="data-loading workers")
    add_teacher_args(parser)
    add_device_arg(parser)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields this command's options set, as ``section.key`` overrides (`config.apply_overrides`)."""
    from clipzss.names import parse_class_names

    out: dict[str, Any] = {}
    if (
        args.dataset or args.data_root or args.unseen is not None
    ):  # explicit data replace the config's eval set
        out.update({"data.eval_dataset": None, "data.eval_root": None, "data.eval_unseen": None})
    if args.dataset:
        out["data.dataset"] = args.dataset
        if not args.data_root:
            out["data.root"] = ""
    if args.data_root:
        out["data.root"] = args.data_root
    if args.unseen is not None:
        out["data.unseen"] = parse_class_names(args.unseen) if args.unseen.strip() else []
    if args.workers is not None:
        out["data.num_workers"] = args.workers
    if args.max_images:  # 0 means no limit, as when the option is left out
        out["eval.max_images"] = args.max_images
    for option, key in (
        ("mode", "eval.mode"),
        ("seen_gamma", "eval.seen_gamma"),
        ("absent_classes", "eval.absent_classes"),
        ("label_candidates", "eval.label_candidates"),
    ):
        if getattr(args, option) is not None:
            out[key] = getattr(args, option)
    return out


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from clipzss.checkpoint import resolve_checkpoint_path
    from clipzss.config import Config, apply_overrides
    from clipzss.data import build_eval_dataset
    from clipzss.evaluate import RESULT_FILES, evaluate
    from clipzss.files import next_free_path, refuse_existing
    from clipzss.models.segmenter import Segmenter

    segmenter = load_segmenter(args)
    cfg = segmenter.config if isinstance(segmenter, Segmenter) else Config()
    # The eval section is the checkpoint's, or the baseline recipe's input handling; the options set fields of both.
    cfg = apply_overrides(replace(cfg, eval=segmenter.eval_cfg), config_overrides(args))
    data, eval_cfg = cfg.data, cfg.eval
    if not (data.eval_root or data.root) and (data.eval_dataset or data.dataset) != "synthetic":
        raise UsageError("say where the dataset is: --data-root DIR")
    if args.out:
        out = Path(args.out)
    else:
        if args.checkpoint:
            default = (
                resolve_checkpoint_path(args.checkpoint).parent
                / f"eval_{data.eval_dataset or data.dataset}_{args.split or data.val_split}"
            )
        else:
            default = Path("outputs") / f"eval_{args.baseline}_{data.dataset}"
        out = next_free_path(default)  # a re-run writes beside the earlier results
    report_dir = None if args.report is None else Path(args.report) if args.report else out
    planned = [out / name for name in RESULT_FILES]
    if report_dir is not None:
        from clipzss.report import REPORT_FILES

        planned += [report_dir / name for name in REPORT_FILES]
    refuse_existing(dict.fromkeys(planned), args.overwrite)  # before hours of evaluation, not after
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
    result.extra["made_by"] = {  # what made these numbers, recorded in metrics.json
        "model": str(args.checkpoint) if args.checkpoint else f"baseline:{args.baseline}",
        "dataset": data.eval_dataset or data.dataset,
        "data_root": str(data.eval_root or data.root),
        "split": args.split or data.val_split,
    }
    for path in result.save(out):
        print(f"wrote {path}")
    if report_dir is not None:
        from clipzss.report import write_report

        source = Path(args.checkpoint).name if args.checkpoint else f"{segmenter.title} baseline"
        title = f"{source} on {data.eval_dataset or data.dataset} {args.split or data.val_split}"
        print(f"wrote {write_report(result, dataset, logits_fn, report_dir, eval_cfg, title=title)}")
    return 0
