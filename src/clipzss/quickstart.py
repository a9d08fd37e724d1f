"""`clipzss quickstart`: the whole pipeline in a few CPU minutes — train, evaluate seen/unseen/hIoU, predict, report.

It trains on the generated `synthetic` scenes (no download) with two classes held out as unseen. With real CLIP
ViT-B/16 weights (``--teacher-weights`` or ``$CLIPZSS_CLIP_WEIGHTS``) the teacher is real CLIP; without them it is a
small random ViT, and the report says plainly that unseen-class numbers are then meaningless.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from clipzss.config import (
    Config,
    DataConfig,
    EvalConfig,
    MethodConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)

log = logging.getLogger(__name__)

# A small random OpenCLIP ViT built through the ViT-B-16 code path: random weights carry no knowledge, so there is
# no point paying for 86M parameters on a CPU.
RANDOM_TEACHER_OVERRIDES = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 128, "layers": 3, "width": 96, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 96, "heads": 2, "layers": 3},
}
DEFAULT_ITERS = 300


def quickstart_config(
    out: Path, iters: int | None = None, teacher_weights: str | None = None, device: str = "auto"
) -> Config:
    """The quick start's config: synthetic 128² scenes, SegFormer-B0 student, real or small random teacher."""
    real = bool(teacher_weights) and teacher_weights != "none"
    teacher = (
        TeacherConfig(model="ViT-B-16", weights=teacher_weights, image_size=224)
        if real
        else TeacherConfig(weights="none", image_size=128, model_overrides=RANDOM_TEACHER_OVERRIDES)
    )
    embed_dim = 512 if real else RANDOM_TEACHER_OVERRIDES["embed_dim"]
    iters = iters or DEFAULT_ITERS
    return Config(
        data=DataConfig(
            dataset="synthetic", crop_size=128, scale=128, ratio_range=(0.75, 1.5), num_workers=2
        ),
        teacher=teacher,
        student=StudentConfig(arch="Segformer", encoder="mit_b0", weights=None, embed_dim=embed_dim),
        method=MethodConfig(bank_size=256),
        # No ImageNet weights offline: the student starts from scratch, so a higher lr than the paper recipe's.
        train=TrainConfig(
            max_iters=iters,
            batch_size=8,
            lr=3e-4,
            head_lr_mult=1.0,
            warmup_iters=min(30, iters // 10),
            log_interval=10,
            eval_interval=0,
            ckpt_interval=max(iters, 1),
            output_dir=str(out),
            device=device,
        ),
        eval=EvalConfig(mode="whole", short_side=128, crop_size=128, stride=96),
    )


def run_quickstart(
    out: Path, iters: int | None = None, teacher_weights: str | None = None, device: str = "auto"
) -> Path:
    """Run the quick start and return the path of its report."""
    from clipzss.data import build_dataset
    from clipzss.evaluate import evaluate
    from clipzss.predict import Segmenter, overlay
    from clipzss.training import train

    cfg = quickstart_config(out, iters, teacher_weights, device)
    random_teacher = cfg.teacher.weights == "none"
    if random_teacher:
        log.warning(
            "no CLIP weights given: the quick start runs a small RANDOM teacher. It shows the pipeline working; "
            "unseen-class numbers are meaningless. Set CLIPZSS_CLIP_WEIGHTS=/path/to/ViT-B-16 weights for real CLIP."
        )
    tic = time.perf_counter()
    ckpt = train(cfg)
    train_s = time.perf_counter() - tic

    segmenter = Segmenter.from_checkpoint(ckpt, device=device)
    val = build_dataset(cfg, "val", train=False)
    result = evaluate(
        segmenter.logits_fn(val.class_names),
        val,
        cfg.eval,
        device=segmenter.device,
        num_workers=0,
        progress=False,
    )
    metric_files = result.save(out / "eval")
    print(result.format_table())

    image, mask, name = val.load(0)
    from PIL import Image

    photo = Image.fromarray(image.permute(1, 2, 0).numpy())
    pred = segmenter.predict(photo, val.class_names)
    overlay_path = out / f"{name}_prediction.png"
    overlay(photo, pred, val.class_names).save(overlay_path)
    truth_path = out / f"{name}_ground_truth.png"
    overlay(photo, mask.numpy(), val.class_names).save(truth_path)

    report = out / "report.md"
    report.write_text(
        _report(
            cfg,
            result.metrics,
            train_s,
            ckpt,
            metric_files,
            overlay_path,
            truth_path,
            [val.class_names[i] for i in val.unseen],
            random_teacher,
        )
    )
    print(f"\nquick start done in {train_s:.0f} s of training. Outputs in {out}/:")
    for path in (ckpt, *metric_files, overlay_path, truth_path, report, out / "tb"):
        print(f"  {path}")
    if random_teacher:
        print(
            "NOTE: random teacher (no CLIP weights on this machine): the unseen-class numbers are meaningless."
        )
    return report


def _fmt(value: object) -> str:
    return f"{value:.1f}" if isinstance(value, float) and math.isfinite(value) else "n/a"


def _report(
    cfg: Config,
    metrics: dict,
    train_s: float,
    ckpt: Path,
    metric_files: list[Path],
    overlay_path: Path,
    truth_path: Path,
    unseen: list[str],
    random_teacher: bool,
) -> str:
    teacher = (
        "a small **random** ViT (no CLIP weights given)"
        if random_teacher
        else (f"CLIP {cfg.teacher.model} from `{cfg.teacher.weights}`")
    )
    lines = [
        "# clipzss quick start",
        "",
        f"Student {cfg.student.arch}/{cfg.student.encoder} trained for {cfg.train.max_iters} iterations "
        f"({train_s:.0f} s) on generated scenes with teacher {teacher}. Unseen (never labelled in training): "
        f"{', '.join(unseen)}.",
        "",
        "| pAcc | mIoU(S) | mIoU(U) | hIoU |",
        "|---|---|---|---|",
        f"| {_fmt(metrics.get('pAcc'))} | {_fmt(metrics.get('mIoU(S)'))} | {_fmt(metrics.get('mIoU(U)'))} "
        f"| {_fmt(metrics.get('hIoU'))} |",
        "",
    ]
    if random_teacher:
        lines += [
            "**A random teacher knows nothing**: its text embeddings of the unseen names are random vectors, so",
            "mIoU(U) is at chance. Run again with real CLIP weights (`CLIPZSS_CLIP_WEIGHTS=...`) for a real result.",
            "",
        ]
    lines += [
        f"- checkpoint: `{ckpt}` (safetensors + config; `clipzss predict IMAGE --checkpoint {ckpt.parent} ...`)",
        f"- metrics: {', '.join(f'`{p}`' for p in metric_files)}",
        f"- prediction: `{overlay_path}`, ground truth: `{truth_path}`",
        f"- curves: `tensorboard --logdir {Path(cfg.train.output_dir) / 'tb'}`",
        "",
    ]
    return "\n".join(lines)
