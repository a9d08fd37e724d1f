"""`clipzss quickstart`: the whole pipeline in a few CPU minutes — train, evaluate seen/unseen/hIoU, predict, report.

Without CLIP weights (the default on an offline machine) it trains in the synthetic world of
:mod:`clipzss.worlds.synthetic`: generated textured scenes and an *aligned teacher* that plays CLIP (it knows every
class, seen and unseen, and has CLIP's modality gap), a synthetic stand-in, not CLIP. The student is trained by the
ordinary ``clipzss.train`` with four classes held out, and its unseen-class mIoU is printed next to the teacher's
own and a seen-only student's, so the first run shows the method transferring what the teacher knows. With real
CLIP ViT-B/16 weights (``--teacher-weights`` or ``$CLIPZSS_CLIP_WEIGHTS``) it trains on the generated `synthetic`
dataset with real CLIP as the teacher.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from clipzss.config import Config
from clipzss.messages import fmt_number

DEFAULT_ITERS = 300
DEFAULT_OUT = Path("runs/quickstart")  # `clipzss quickstart`'s --out default
WORLD_NOTE = (
    "No CLIP weights given: training in the synthetic world, whose aligned teacher is a stand-in for CLIP "
    "(it knows every class, seen and unseen). Set CLIPZSS_CLIP_WEIGHTS=/path/to/ViT-B-16 weights for real CLIP."
)


@dataclass(frozen=True)
class QuickstartResult:
    """What a quick start made, for the command line to show: the library computes, the CLI prints."""

    out: Path
    report: Path
    train_s: float  # seconds of training, student and reference together
    table: str  # the evaluation's table (`EvalResult.format_table`)
    outputs: tuple[Path, ...]  # every file and folder written, in the order the summary lists them
    comparison: tuple[str, ...] = ()  # synthetic world: a markdown table of student, teacher and reference
    finding: str = ""  # synthetic world: the student's unseen mIoU against the teacher's, in one sentence

    def summary(self) -> str:
        """The text `clipzss quickstart` prints when done."""
        parts = [self.table]
        if self.comparison:
            parts += ["", "\n".join(self.comparison)]
        if self.finding:
            parts.append(f"\n{self.finding}")
        parts.append(f"\nquick start done in {self.train_s:.0f} s of training. Outputs in {self.out}/:")
        parts += [f"  {path}" for path in self.outputs]
        return "\n".join(parts)


def uses_world(teacher_weights: str | None) -> bool:
    """Whether the quick start runs in the synthetic world (no CLIP weights given)."""
    return not teacher_weights or teacher_weights == "none"


def output_folder(out: Path) -> Path:
    """The folder the quick start writes: `out` when it holds no run. The default folder moves on to the next
    free one (runs/quickstart-2, -3, ...); any other folder that holds a run is refused."""
    from clipzss.runs import RunFolderError, next_free_folder, run_files, taken

    out = Path(out)
    if not taken(out):
        return out
    if out != DEFAULT_OUT:
        held = ", ".join(run_files(out)) or "a training lock"
        raise RunFolderError(
            f"{out} already holds a run ({held}): choose another --out, or remove that folder"
        )
    return next_free_folder(out)


def quickstart_config(
    out: Path, iters: int | None = None, teacher_weights: str | None = None, device: str = "auto"
) -> Config:
    """The quick start's config with real CLIP: synthetic 128² scenes, SegFormer-B0 student, CLIP ViT-B/16 at 224.

    Without weights (``teacher_weights`` None or "none") the config of the synthetic world's student instead.
    """
    if uses_world(teacher_weights):
        from clipzss.worlds import students as ws

        return ws.student_config(out, {}, iters=iters or ws.STUDENT_ITERS, device=device)
    iters = iters or DEFAULT_ITERS
    sections = {
        "data": {
            "dataset": "synthetic",
            "crop_size": 128,
            "scale": 128,
            "ratio_range": (0.75, 1.5),
            "num_workers": 2,
        },
        "teacher": {"model": "ViT-B-16", "weights": teacher_weights, "image_size": 224},
        "student": {"arch": "Segformer", "encoder": "mit_b0", "weights": None, "embed_dim": 512},
        "method": {"bank_size": 256},
        # No ImageNet weights offline: the student starts from scratch, so a higher lr than the paper recipe's.
        "train": {
            "max_iters": iters,
            "batch_size": 8,
            "lr": 3e-4,
            "head_lr_mult": 1.0,
            "warmup_iters": min(30, iters // 10),
            "log_interval": 10,
            "eval_interval": 0,
            "ckpt_interval": max(iters, 1),
            "output_dir": str(out),
            "device": device,
        },
        "eval": {"mode": "whole", "short_side": 128, "crop_size": 128, "stride": 96},
    }
    return Config.from_dict(sections, "quickstart_config")


def run_quickstart(
    out: Path, iters: int | None = None, teacher_weights: str | None = None, device: str = "auto"
) -> QuickstartResult:
    """Run the quick start (in the synthetic world without ``teacher_weights``); what it made, to show."""
    out = output_folder(out)
    if uses_world(teacher_weights):
        return _world_quickstart(out, iters, device)
    return _clip_quickstart(out, iters, teacher_weights, device)


def _save_example(segmenter, val, out: Path) -> tuple[Path, Path]:
    """Prediction and ground-truth overlays of the first validation scene."""
    from PIL import Image

    from clipzss.visualize import overlay

    image, mask, name = val.load(0)
    photo = Image.fromarray(image.permute(1, 2, 0).numpy())
    pred = segmenter.predict(photo, val.class_names)
    overlay_path = out / f"{name}_prediction.png"
    overlay(photo, pred, val.class_names).save(overlay_path)
    truth_path = out / f"{name}_ground_truth.png"
    overlay(photo, mask.numpy(), val.class_names).save(truth_path)
    return overlay_path, truth_path


def _world_quickstart(out: Path, iters: int | None, device: str) -> QuickstartResult:
    """Student, teacher and seen-only reference in the synthetic world (no CLIP weights needed)."""
    from clipzss.evaluate import evaluate
    from clipzss.models.segmenter import PrecomputedText, Segmenter
    from clipzss.training.loop import train
    from clipzss.worlds import students as ws
    from clipzss.worlds import synthetic as sw

    teacher = sw.load_teacher()  # trained once and cached
    cfg = quickstart_config(out, iters, None, device)
    train_set, val_set = sw.world_datasets(cfg)
    tic = time.perf_counter()
    ckpt = train(cfg, teacher=teacher, train_set=train_set)
    train_s = time.perf_counter() - tic
    segmenter = Segmenter.from_checkpoint(ckpt, device=device, text_encoder=teacher)
    result = evaluate(
        segmenter.logits_fn(val_set.class_names), val_set, cfg.eval, device=segmenter.device, progress=False
    )
    metric_files = result.save(out / "eval")

    reference_cfg = ws.student_config(
        out / "seen_only_reference", ws.VARIANTS[ws.BASELINE], iters=cfg.train.max_iters, device=device
    )
    tic = time.perf_counter()
    reference = ws.train_and_evaluate(reference_cfg, teacher, train_set, val_set)
    train_s += time.perf_counter() - tic
    teacher_row = ws.teacher_metrics(teacher, val_set, cfg.eval)

    rows = {
        "teacher at inference (the stand-in for CLIP)": teacher_row,
        "student, CLIP-ZSS defaults (no teacher at inference)": result.metrics,
        "student, seen labels only (reference)": reference,
    }
    table = _table(rows)
    ratio = result.metrics["mIoU(U)"] / max(teacher_row["mIoU(U)"], 1e-9)
    finding = (
        f"The student segments the {len(val_set.unseen)} classes it never saw labelled at {ratio:.2f}x the "
        "teacher's own mIoU(U); the seen-only student cannot name them."
    )
    text_path = out / "world_text.safetensors"
    PrecomputedText.from_teacher(teacher, val_set.class_names).save(text_path)
    overlay_path, truth_path = _save_example(segmenter, val_set, out)
    unseen = [val_set.class_names[i] for i in val_set.unseen]
    report = out / "report.md"
    lines = [
        "# clipzss quick start (synthetic world)",
        "",
        f"Student {cfg.student.arch}/{cfg.student.encoder} trained from scratch for {cfg.train.max_iters} "
        f"iterations on generated scenes, with the synthetic world's aligned teacher, **a synthetic stand-in for "
        f"CLIP** (no CLIP weights on this machine). Unseen (never labelled in training): {', '.join(unseen)}. "
        f"Training took {train_s:.0f} s in all (student and reference).",
        "",
        *table,
        "",
        "What this shows: the pipeline transfers what the teacher knows about classes without labels into an "
        "ordinary segmentation network that runs without the teacher. What it cannot show: how well real CLIP "
        "teaches on real photographs (benchmarks/README.md says what the worlds can and cannot tell).",
        "",
        f"- checkpoint: `{ckpt}`; predict with the world's text vectors: `clipzss predict IMAGE --checkpoint "
        f"{ckpt.parent} --text-embeddings {text_path}`",
        f"- metrics: {', '.join(f'`{p}`' for p in metric_files)}",
        f"- prediction: `{overlay_path}`, ground truth: `{truth_path}`",
        f"- curves: `tensorboard --logdir {Path(cfg.train.output_dir) / 'tb'}`",
        "",
    ]
    report.write_text("\n".join(lines))
    outputs = (ckpt, *metric_files, text_path, overlay_path, truth_path, report, out / "tb")
    return QuickstartResult(out, report, train_s, result.format_table(), outputs, tuple(table), finding)


def _table(rows: dict[str, dict]) -> list[str]:
    lines = ["| model | pAcc | mIoU(S) | mIoU(U) | hIoU |", "|---|---|---|---|---|"]
    for name, m in rows.items():
        cells = " | ".join(fmt_number(m.get(k), 1) for k in ("pAcc", "mIoU(S)", "mIoU(U)", "hIoU"))
        lines.append(f"| {name} | {cells} |")
    return lines


def _clip_quickstart(out: Path, iters: int | None, teacher_weights: str, device: str) -> QuickstartResult:
    """The generated `synthetic` dataset with real CLIP as the teacher."""
    from clipzss.data import build_dataset
    from clipzss.evaluate import evaluate
    from clipzss.models.segmenter import Segmenter
    from clipzss.training.loop import train

    cfg = quickstart_config(out, iters, teacher_weights, device)
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
    overlay_path, truth_path = _save_example(segmenter, val, out)
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
        )
    )
    outputs = (ckpt, *metric_files, overlay_path, truth_path, report, out / "tb")
    return QuickstartResult(out, report, train_s, result.format_table(), outputs)


def _report(
    cfg: Config,
    metrics: dict,
    train_s: float,
    ckpt: Path,
    metric_files: list[Path],
    overlay_path: Path,
    truth_path: Path,
    unseen: list[str],
) -> str:
    teacher = f"CLIP {cfg.teacher.model} from `{cfg.teacher.weights}`"
    lines = [
        "# clipzss quick start",
        "",
        f"Student {cfg.student.arch}/{cfg.student.encoder} trained for {cfg.train.max_iters} iterations "
        f"({train_s:.0f} s) on generated scenes with teacher {teacher}. Unseen (never labelled in training): "
        f"{', '.join(unseen)}.",
        "",
        "| pAcc | mIoU(S) | mIoU(U) | hIoU |",
        "|---|---|---|---|",
        f"| {fmt_number(metrics.get('pAcc'), 1)} | {fmt_number(metrics.get('mIoU(S)'), 1)} | {fmt_number(metrics.get('mIoU(U)'), 1)} "
        f"| {fmt_number(metrics.get('hIoU'), 1)} |",
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
