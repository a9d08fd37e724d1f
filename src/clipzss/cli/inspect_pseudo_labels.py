"""`clipzss inspect-pseudo-labels`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from clipzss.cli._common import add_device_arg, add_overwrite_arg, add_teacher_args, teacher_config
from clipzss.errors import UsageError

HELP = (
    "cluster images with the teacher's dense tokens (PLM pseudo labels): quality vs ground truth + overlays"
)
EPILOG = """examples:
  clipzss inspect-pseudo-labels /data/camvid/val/images --teacher-weights none
  clipzss inspect-pseudo-labels data/camvid/val/images --teacher-weights ViT-B-16.safetensors \\
      --unseen car,tree,pedestrian
  clipzss inspect-pseudo-labels photo.jpg --teacher-weights ViT-B-16.safetensors method.fusion_threshold=0.9
  clipzss inspect-pseudo-labels /data/camvid/val/images --teacher-weights ViT-B-16.safetensors \\
      --dense value,maskclip,clearclip,sclip,naclip --unseen car,tree,pedestrian
  clipzss inspect-pseudo-labels /data/camvid/val/images --world-teacher camvid --unseen car,tree,pedestrian \\
      --max-images 101

Masks are read from a masks/ folder beside images/ (the folder-dataset layout) or from --masks; class names from
classes.txt in the dataset root or --classes-file. Settings come from an ordinary config (--config) with
section.key=value overrides: method.window_divisors, method.fusion_threshold, method.kmeans_iters,
method.min_region, teacher.image_size, teacher.dense, teacher.naclip_std, eval.short_side. --dense compares
several dense paths on the same images, side by side (default: the config's teacher.dense alone)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs",
        nargs="+",
        help="image files or folders, then optional section.key=value config overrides",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default: outputs/inspect, or the next free outputs/inspect-2 ...)",
    )
    add_overwrite_arg(parser)
    parser.add_argument("--config", default=None, help="YAML config (teacher and method sections are used)")
    parser.add_argument(
        "--masks", default=None, help="ground-truth masks folder (default: ../masks if present)"
    )
    parser.add_argument("--classes-file", default=None, help="class names, one a line (default: classes.txt)")
    parser.add_argument(
        "--unseen", default=None, help="comma-separated class names whose pixels are the unlabelled ones"
    )
    parser.add_argument("--max-images", type=int, default=16, help="inspect at most N images (default 16)")
    add_teacher_args(parser)
    parser.add_argument("--image-size", type=int, default=None, help="teacher input size (default: config's)")
    parser.add_argument(
        "--dense",
        default=None,
        help="comma-separated teacher dense paths to compare side by side: value, maskclip, clearclip, sclip, "
        "naclip (default: the config's teacher.dense)",
    )
    parser.add_argument(
        "--world-teacher",
        choices=("camvid",),
        default=None,
        help="use a world's teacher instead of CLIP: camvid = clipzss.worlds.camvid (needs clipzss[evidence] "
        "or its cache); images go in at the world's short side unless eval.short_side is given",
    )
    add_device_arg(parser)


def _split_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[str]]:
    paths, overrides = [], []
    for item in inputs:
        key = item.partition("=")[0]
        if "=" in item and "." in key and not Path(item).exists():
            overrides.append(item)
        else:
            paths.append(Path(item))
    return paths, overrides


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from clipzss.config import load_config
    from clipzss.data.masks import load_mask
    from clipzss.data.splits import make_split
    from clipzss.files import next_free_path, refuse_existing
    from clipzss.images import load_image
    from clipzss.inspection import class_names_near, find_masks, image_files, inspect_pseudo_labels
    from clipzss.models.teacher import build_teacher
    from clipzss.runtime import resolve_device

    paths, overrides = _split_inputs(args.inputs)
    if not paths:
        raise UsageError("give at least one image file or folder to inspect")
    dense = None
    if args.dense is not None:
        from clipzss.models.recipes import check_dense

        dense = [p.strip() for p in args.dense.split(",") if p.strip()]
        if not dense:
            raise UsageError("--dense: give at least one dense path, e.g. --dense value,clearclip")
        for path in dense:
            check_dense(path)  # before the teacher is built
        if getattr(args, "world_teacher", None):
            raise UsageError("--dense compares CLIP's dense paths: drop --world-teacher")
    cfg = load_config(args.config, overrides)
    teacher_cfg = teacher_config(cfg.teacher, args)
    if args.image_size:
        teacher_cfg = replace(teacher_cfg, image_size=args.image_size)

    files = image_files(paths, args.max_images)
    out = Path(args.out) if args.out is not None else next_free_path("outputs/inspect")
    planned = [out / "report.md", out / "report.json", *(out / f"{f.stem}_clusters.png" for f in files)]
    refuse_existing(planned, args.overwrite)  # before the teacher runs
    mask_files = find_masks(files, args.masks)
    names = class_names_near(files, args.classes_file)
    unseen_ids = None
    if args.unseen is not None:
        if names is None:
            raise FileNotFoundError("--unseen needs the class names: give --classes-file (one name per line)")
        unseen_ids = list(make_split(names, [n.strip() for n in args.unseen.split(",") if n.strip()]).unseen)
    if unseen_ids is not None and not any(mask_files):
        raise FileNotFoundError(
            f"--unseen needs ground-truth masks: none found for {files[0]} (give --masks)"
        )

    short_side = cfg.eval.short_side
    if getattr(args, "world_teacher", None) == "camvid":
        from clipzss.worlds.camvid import load_teacher

        teacher = load_teacher()
        if not any(o.startswith("eval.short_side=") for o in overrides):
            short_side = min(teacher.world.size)  # the size the world's teacher was trained at
    else:
        teacher = build_teacher(teacher_cfg, device=resolve_device(args.device))
    images = [load_image(f) for f in files]
    masks = [load_mask(m) if m is not None else None for m in mask_files]
    report = inspect_pseudo_labels(
        images,
        teacher,
        cfg.method,
        masks,
        unseen_ids,
        out,
        [f.stem for f in files],
        short_side,
        dense,
    )
    scope = (
        f"pixels of the unseen classes {args.unseen}"
        if unseen_ids is not None
        else "every labelled pixel (no --unseen: the whole image is treated as unlabelled)"
    )
    compared = ", ".join(report.by_dense) if dense else getattr(getattr(teacher, "cfg", None), "dense", None)
    settings = (
        f"teacher {getattr(teacher, 'identity', type(teacher).__name__)}"
        + (f" (dense: {compared})" if compared else "")
        + f", {report.grid[0]}x{report.grid[1]} tokens, "
        f"window divisors {tuple(cfg.method.window_divisors)}, λ = {cfg.method.fusion_threshold:g}, "
        f"{cfg.method.kmeans_iters} K-Means iterations, min_region {cfg.method.min_region:g}"
    )
    header = f"{len(files)} images; {settings}; scored on {scope}"
    if not report.has_truth:
        header += "; no ground-truth masks found, so only regions/image is reported"
    report.save(out, header, files, settings, scope)
    print(header)
    print(report.format_table())
    print(f"wrote {out / 'report.md'}, {out / 'report.json'} and {len(report.overlays)} overlay panels")
    return 0
