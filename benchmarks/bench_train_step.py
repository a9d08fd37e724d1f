"""Training step: the real CLIP-ZSS step against a plain supervised step of the same student, with each stage's share.

    python benchmarks/bench_train_step.py [--device cuda] [--batch 2] [--crop 256] [--students mit_b2] [--json out.json]
    python benchmarks/bench_train_step.py --dry    # tiny sizes on the CPU: checks the script runs, gives no figure

Both steps see the same batch (crops with seen classes 0-14 of VOC's 20, the unseen ones and 30% of the pixels
ignored, so the pseudo labels have area to fill), the same student and the same optimiser (AdamW, head ×10,
grad-clip 1.0, the AMP scaler of ``train.amp``):

- ``supervised``: student forward, CE over the seen text embeddings (``compute_losses`` with only ``ce`` on), then
  ``clipzss.training.step.apply_gradients`` (backward, clip, optimiser step): the closed-set network trained with
  a text classifier;
- ``clip-zss``: ``clipzss.training.step.train_step``, the function the training loop runs (frozen teacher, pseudo
  labels, student, GLM + bank, NEL + CE, backward, clip, step, bank update), with the method's default switches.

The teacher is OpenCLIP ViT-B/16 with random weights (the same computation as the real ones) at the proportional
size: ``teacher.image_size = 448 × crop / 512`` (448 at the paper's 512 crop, 224 at a 256 crop). The stage shares
come from ``torch.profiler`` runs of the same ``train_step``, whose stages are profiler scopes
(``clipzss.training.step.STEP_SCOPES``): on the CPU a stage's wall time, on CUDA the device time of the kernels
launched while it ran (the backward's too, which autograd launches from its own thread). The ratio comes from
unprofiled steps. Peak memory: CUDA max allocated, or CPU peak RSS above the level before the step.

Target (issue 7): clip-zss ≤ 1.6× supervised.
"""

from __future__ import annotations

import dataclasses
import statistics

import common
import torch
import torch.nn.functional as F

from clipzss.config import Config, DataConfig, MethodConfig, StudentConfig, TeacherConfig, TrainConfig
from clipzss.method.glm import GLM
from clipzss.method.losses import compute_losses
from clipzss.method.synthesizer import Synthesizer
from clipzss.models.student import build_student
from clipzss.models.teacher import build_teacher
from clipzss.training.step import (
    STEP_SCOPES,
    TrainParts,
    apply_gradients,
    autocast_context,
    build_optimizer,
    grad_scaler,
    train_step,
)

NUM_CLASSES, NUM_SEEN = 20, 15
DRY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def make_batch(batch: int, crop: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Images and Voronoi masks of VOC-like class ids; 30% of the pixels ignored (255)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, crop, crop, generator=gen)
    yy, xx = torch.meshgrid(torch.arange(crop), torch.arange(crop), indexing="ij")
    coords = torch.stack([yy, xx], dim=-1).float().view(-1, 2)
    masks = []
    for _ in range(batch):
        sites = torch.rand(8, 2, generator=gen) * crop
        classes = torch.randint(0, NUM_CLASSES, (8,), generator=gen)
        mask = classes[torch.cdist(coords, sites).argmin(dim=1)].view(crop, crop)
        mask[torch.rand(crop, crop, generator=gen) < 0.3] = 255
        masks.append(mask)
    return {"image": images, "mask": torch.stack(masks)}


@dataclasses.dataclass
class Setup:
    """What both steps run with: the parts of `train_step`, its optimizer and AMP scaler."""

    parts: TrainParts
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler

    def clip_zss(self, batch: dict[str, torch.Tensor]) -> None:
        train_step(self.parts, batch, self.optimizer, self.scaler)

    def supervised(self, batch: dict[str, torch.Tensor]) -> None:
        parts = self.parts
        cfg, device = parts.cfg, parts.device
        images = batch["image"].to(device, non_blocking=True)
        labels = parts.label_lut[batch["mask"].to(device, non_blocking=True)]
        off = {name: False for name in ("glm", "bank", "pseudo_labels", "synthesizer", "nel")}
        method = dataclasses.replace(cfg.method, **off)
        with autocast_context(cfg, device):
            embeddings = parts.student(images)
        losses = compute_losses(embeddings.float(), labels, parts.text_seen, None, None, NUM_SEEN, method)
        apply_gradients(cfg, self.optimizer, self.scaler, losses["loss"])


def build(cfg: Config, device: torch.device, dim: int) -> Setup:
    teacher = build_teacher(cfg.teacher, device=device)
    student = build_student(cfg.student).to(device).train()
    glm = GLM(cfg.method, dim).to(device) if cfg.method.glm else None
    synth = Synthesizer.from_config(cfg.method, dim).to(device) if cfg.method.synthesizer else None
    optimizer = build_optimizer(student, [synth] if synth is not None else [], cfg)
    if cfg.train.compile:
        student = torch.compile(student)
    gen = torch.Generator().manual_seed(1)
    text_seen = F.normalize(torch.randn(NUM_SEEN, dim, generator=gen), dim=1).to(device)
    lut = torch.full((256,), 255, dtype=torch.long)
    lut[:NUM_SEEN] = torch.arange(NUM_SEEN)
    parts = TrainParts(cfg, teacher, student, glm, synth, text_seen, lut.to(device), device)
    return Setup(parts, optimizer, grad_scaler(cfg, device))


def stage_seconds(setup: Setup, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    """Seconds of each `STEP_SCOPES` stage in one profiled `train_step` (see the module docstring)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    common.synchronize(device)
    with profile(activities=activities) as prof:
        setup.clip_zss(batch)
        common.synchronize(device)
    events = [e for e in prof.events() if e.device_type == DeviceType.CPU]
    scopes = [e for e in events if e.name in STEP_SCOPES]
    seconds = dict.fromkeys(dict.fromkeys(e.name for e in scopes), 0.0)  # the stages that ran, in order
    if device.type != "cuda":
        for scope in scopes:
            seconds[scope.name] += scope.cpu_time_total / 1e6
    else:  # each kernel counts for the stage during which the op that launched it started, on any thread
        for event in events:
            launched = sum(kernel.duration for kernel in event.kernels)
            if launched:
                start = event.time_range.start
                stage = next((s.name for s in scopes if s.time_range.start <= start < s.time_range.end), None)
                if stage is not None:
                    seconds[stage] += launched / 1e6
    return {name.removeprefix("train_step: "): value for name, value in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--students", default="mit_b2", help="Segformer encoders, comma-separated")
    parser.add_argument("--compile", action="store_true", help="torch.compile the student (train.compile)")
    parser.add_argument(
        "--teacher-precision", default="auto", help="teacher.precision: auto (bf16 on CUDA) | fp32 | bf16"
    )
    args = parser.parse_args(argv)
    device = common.setup(args)
    dim = 512
    teacher_size = max(16, round(448 * args.crop / 512 / 16) * 16)
    teacher_cfg = TeacherConfig(weights="none", image_size=teacher_size, precision=args.teacher_precision)
    if args.dry:
        args.batch, args.crop, dim = 2, 64, DRY_CLIP["embed_dim"]
        teacher_cfg = TeacherConfig(weights="none", image_size=64, model_overrides=DRY_CLIP)
    reps = args.reps or (1 if args.dry else 5)
    batch = make_batch(args.batch, args.crop)

    rows, share_rows, results = [], [], {}
    for encoder in [e.strip() for e in args.students.split(",") if e.strip()]:
        cfg = Config(
            data=DataConfig(crop_size=args.crop),
            teacher=teacher_cfg,
            student=StudentConfig(arch="Segformer", encoder=encoder, embed_dim=dim),
            method=MethodConfig(synth_heads=2 if args.dry else 8, bank_size=8 if args.dry else 1024),
            train=TrainConfig(batch_size=args.batch, compile=args.compile),
        )
        setup = build(cfg, device, dim)
        timing = common.compare(
            {
                "supervised": lambda s=setup: s.supervised(batch),
                "clip-zss": lambda s=setup: s.clip_zss(batch),
            },
            device,
            reps=reps,
            warmup=args.warmup,
        )
        stages = [stage_seconds(setup, batch, device) for _ in range(reps)]
        memory = {}
        for name, step in (("supervised", setup.supervised), ("clip-zss", setup.clip_zss)):
            with common.peak_memory(device) as peak:
                step(batch)
            memory[name] = peak.megabytes
        ratio = timing.ratio("clip-zss", "supervised")
        rows.append(
            [
                encoder,
                args.batch / timing.median("supervised"),
                args.batch / timing.median("clip-zss"),
                ratio,
                memory["supervised"],
                memory["clip-zss"],
                common.target(ratio <= 1.6),
            ]
        )
        medians = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
        total = sum(medians.values())
        share_rows += [[encoder, k, v * 1e3, 100 * v / total] for k, v in medians.items()]
        results[encoder] = {
            "seconds": timing.seconds,
            "ratio": ratio,
            "stages_seconds": medians,
            "peak_mb": memory,
            "peak_kind": peak.kind,
        }
        print(f"done: {encoder} (load {timing.load[0]:.2f})", flush=True)

    info = common.machine_info(device)
    table = common.markdown_table(
        [
            "student",
            "supervised img/s",
            "clip-zss img/s",
            "clip-zss / supervised",
            "peak MB sup.",
            "peak MB clip-zss",
            "≤ 1.6×",
        ],
        rows,
    )
    stage_time = "CUDA kernel time" if device.type == "cuda" else "wall time"
    table += (
        f"\n\nbatch {args.batch} at {args.crop}², teacher ViT-B/16 at {teacher_cfg.image_size}² "
        f"(precision {teacher_cfg.precision}), "
        f"AMP {'bf16' if device.type == 'cuda' else 'off'}, compile {args.compile}, {reps} repetitions after "
        f"{args.warmup} warm-up, device {device}; peak memory: {peak.kind}. Stages of train_step (profiler "
        f"scopes, {stage_time}, median of {reps} profiled steps):\n\n"
    )
    table += common.markdown_table(["student", "stage", "ms", "share %"], share_rows)
    config = {"batch": args.batch, "crop": args.crop, "teacher_size": teacher_cfg.image_size, "reps": reps}
    common.report(
        "Training step: CLIP-ZSS vs supervised",
        info,
        table,
        {"config": config, "results": results},
        args.json,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
