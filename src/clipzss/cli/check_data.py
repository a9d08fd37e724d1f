"""`clipzss check-data`."""

from __future__ import annotations

import argparse
import os

HELP = "check a dataset before training: layout, pairing, counts, label values, sizes, per-class histogram"
EPILOG = """examples:
  clipzss check-data /data/camvid --unseen car,tree,pedestrian
  clipzss check-data /data/voc --dataset voc
  clipzss check-data /data/coco_stuff164k --split val --workers 16

Exit code 0 when the data is usable (warnings allowed; --strict fails on warnings too), 1 with a report naming
every problem file otherwise."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", help="dataset folder (what data.root will be)")
    parser.add_argument(
        "--dataset",
        default=None,
        help="voc, coco-stuff, context, context-459, ade20k, ade20k-full or folder (default: detected)",
    )
    parser.add_argument(
        "--split", default=None, help="comma-separated splits (default: train,val / the folders)"
    )
    parser.add_argument(
        "--unseen", default=None, help="comma-separated unseen class names (default: the standard split)"
    )
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="reader threads")
    parser.add_argument("--max-images", type=int, default=None, help="check only the first N pairs per split")
    parser.add_argument("--decode-images", action="store_true", help="decode images fully (slower)")
    parser.add_argument("--strict", action="store_true", help="fail on warnings too")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [n.strip() for n in text.split(",") if n.strip()]


def run(args: argparse.Namespace) -> int:
    from clipzss.data.doctor import check_data

    report = check_data(
        args.root,
        dataset=args.dataset,
        splits=_names(args.split),
        unseen=_names(args.unseen),
        workers=args.workers,
        max_images=args.max_images,
        decode_images=args.decode_images,
        progress=not args.no_progress,
    )
    print(report.format(strict=args.strict))
    return 0 if report.ok and not (args.strict and report.warnings) else 1
