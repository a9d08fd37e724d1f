"""`clipzss prepare-data`."""

from __future__ import annotations

import argparse
import os

HELP = "convert the official downloads of VOC+SBD, COCO-Stuff, PASCAL Context or ADE20K into clipzss' layouts"
EPILOG = """examples:
  clipzss prepare-data voc --src ~/Downloads/VOCtrainval_11-May-2012.tar ~/Downloads/benchmark.tgz --dst /data/voc
  clipzss prepare-data voc --src /data/VOCdevkit /data/benchmark_RELEASE --dst /data/voc
  clipzss prepare-data coco-stuff --src ~/Downloads --dst /data/coco_stuff164k
  clipzss prepare-data context --src VOCtrainval_03-May-2010.tar trainval.tar.gz labels.txt --dst /data/context
  clipzss prepare-data ade20k --src ADEChallengeData2016.zip ADE20K_2021_17_01.zip --dst /data/ade

--src takes archives, the folders they were extracted to, or a folder holding either. Re-running the same command
resumes an interrupted run (finished files are skipped). Archives with their official names are checked against
the published checksums listed in docs/protocols.md; --no-verify skips that. Then: clipzss check-data DST."""

# The keys of clipzss.data.prepare.PREPARERS (tests/test_prepare.py checks), named here so --help stays light.
DATASETS = ("voc", "coco-stuff", "context", "ade20k")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", choices=DATASETS, help="which benchmark to prepare")
    parser.add_argument(
        "--src",
        nargs="+",
        required=True,
        help="downloaded archives, their extracted folders, or a folder holding them",
    )
    parser.add_argument("--dst", required=True, help="output root (then data.root=DST)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="conversion threads")
    parser.add_argument("--no-verify", action="store_true", help="skip the archive checksums")
    parser.add_argument(
        "--copy-images", action="store_true", help="copy image folders instead of linking them"
    )
    parser.add_argument("--overwrite", action="store_true", help="convert again even where output exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from clipzss.data.prepare import prepare

    report = prepare(
        args.dataset,
        args.src,
        args.dst,
        workers=args.workers,
        verify=not args.no_verify,
        copy_images=args.copy_images,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(report.format())
    return 0 if report.ok else 1
