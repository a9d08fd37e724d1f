"""Training step: the full CLIP-ZSS step against a plain supervised step of the same student, with the parts' shares.

    python benchmarks/bench_train_step.py [--device cuda] [--batch 2] [--crop 256] [--students mit_b2] [--json out.json]

Both steps see the same batch (crops with seen classes 0-14 of VOC's 20, the unseen ones and 30% of the pixels
ignored, so the pseudo labels have area to fill), the same student and the same optimiser (AdamW, head ×10,
grad-clip 1.0):

- ``supervised``: student forward, CE over the seen text embeddings (``compute_losses`` with only ``ce`` on),
  backward, clip, optimiser step: the closed-set network trained with a text classifier;
- ``clip-zss``: ``clipzss.training.train_step`` (frozen teacher, pseudo labels, student, GLM + bank, synthesizer,
  NEL + CE + BCE) then the same backward, clip, step and the bank update, as the training loop runs it.

The teacher is OpenCLIP ViT-B/16 with random weights (the same computation as the real ones) at the proportional
size: ``teacher.image_size = 448 × crop / 512`` (448 at the paper's 512 crop, 224 at a 256 crop). An instrumented
copy of the step times each part with the device drained in between (teacher, pseudo labels, student forward, GLM,
synthesizer, the other losses, backward, optimiser) to give the shares; the ratio comes from the real, unsplit steps.
Peak memory: CUDA max allocated, or CPU peak RSS above the level before the step.

Target (issue 7): clip-zss ≤ 1.6× supervised.
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F
from common import (
    base_parser,
    compare,
    machine_info,
    markdown_table,
    peak_memory,
    report,
    setup,
    synchronize,
    target,
)

from clipzss.config import Config, DataConfig, MethodConfig, StudentConfig, TeacherConfig, TrainConfig
from clipzss.losses import compute_losses
from clipzss.glm import GLM
from clipzss.synthesizer import Synthesizer
from clipzss.pseudo_labels import pseudo_labels
from clipzss.student import build_student
from clipzss.teacher import build_teacher
from clipzss.training import TrainParts, autocast_context, build_optimizer, train_step

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


def build(cfg: Config, device: torch.device, dim: int) -> tuple[TrainParts, torch.optim.Optimizer]:
    teacher = build_teacher(cfg.teacher, device=device)
    student = build_student(cfg.student).to(device).train()
    glm = GLM(cfg.method, dim).to(device) if cfg.method.glm else None
    synth = Synthesizer.from_config(cfg.method, dim).to(device) if cfg.method.synthesizer else None
    if cfg.train.compile:
        student = torch.compile(student)
    gen = torch.Generator().manual_seed(1)
    text_seen = F.normalize(torch.randn(NUM_SEEN, dim, generator=gen), dim=1).to(device)
    lut = torch.full((256,), 255, dtype=torch.long)
    lut[:NUM_SEEN] = torch.arange(NUM_SEEN)
    parts = TrainParts(cfg, teacher, student, glm, synth, text_seen, lut.to(device), device)
    optimizer = build_optimizer(
        getattr(student, "_orig_mod", student), [synth] if synth is not None else [], cfg
    )
    return parts, optimizer


def optimise(parts: TrainParts, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    torch.nn.utils.clip_grad_norm_(params, parts.cfg.train.grad_clip)
    optimizer.step()


def full_step(parts: TrainParts, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> None:
    losses, cls = train_step(parts, batch)
    optimise(parts, optimizer, losses["loss"])
    if parts.glm is not None and parts.cfg.method.bank:
        parts.glm.update_bank(cls)


def supervised_step(
    parts: TrainParts, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]
) -> None:
    cfg, device = parts.cfg, parts.device
    images = batch["image"].to(device, non_blocking=True)
    labels = parts.label_lut[batch["mask"].to(device, non_blocking=True)]
    off = {name: False for name in ("glm", "bank", "pseudo_labels", "synthesizer", "nel")}
    method = dataclasses.replace(cfg.method, **off)
    with autocast_context(cfg, device):
        embeddings = parts.student(images)
    losses = compute_losses(embeddings.float(), labels, parts.text_seen, None, None, NUM_SEEN, method)
    optimise(parts, optimizer, losses["loss"])


class _ModuleTimer:
    """Forward hooks that add a module's forward time (device drained at both ends) to a counter."""

    def __init__(self, module: torch.nn.Module | None, device: torch.device) -> None:
        self.seconds, self.device, self._start = 0.0, device, 0.0
        self.handles = []
        if module is not None:
            self.handles = [
                module.register_forward_pre_hook(self._pre),
                module.register_forward_hook(self._post),
            ]

    def _pre(self, *_: object) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def _post(self, *_: object) -> None:
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._start

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def split_step(
    parts: TrainParts, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]
) -> dict[str, float]:
    """The full step cut into its parts, each timed with the device drained (the same work as ``full_step``)."""
    cfg, device = parts.cfg, parts.device
    times: dict[str, float] = {}

    def lap(name: str, start: float) -> float:
        synchronize(device)
        now = time.perf_counter()
        times[name] = now - start
        return now

    synchronize(device)
    t = time.perf_counter()
    images = batch["image"].to(device, non_blocking=True)
    labels = parts.label_lut[batch["mask"].to(device, non_blocking=True)]
    with torch.no_grad():
        cls, dense = parts.teacher.encode_image(images)
        t = lap("teacher", t)
        labels, num_pseudo = pseudo_labels(dense, labels, NUM_SEEN, cfg.method)
        max_pseudo = int(num_pseudo.max())
        t = lap("pseudo labels", t)
    with autocast_context(cfg, device):
        embeddings = parts.student(images)
    t = lap("student forward", t)
    glm_timer, synth_timer = _ModuleTimer(parts.glm, device), _ModuleTimer(parts.synthesizer, device)
    try:
        losses = compute_losses(
            embeddings.float(),
            labels,
            parts.text_seen,
            cls,
            dense,
            NUM_SEEN,
            cfg.method,
            parts.glm,
            parts.synthesizer,
            max_pseudo=max_pseudo,
        )
        t = lap("losses", t)
    finally:
        glm_timer.remove()
        synth_timer.remove()
    times["GLM"], times["synthesizer"] = glm_timer.seconds, synth_timer.seconds
    times["losses"] -= glm_timer.seconds + synth_timer.seconds
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    t = lap("backward", t)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
    optimizer.step()
    if parts.glm is not None:
        parts.glm.update_bank(cls)
    lap("optimiser", t)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--students", default="mit_b2", help="Segformer encoders, comma-separated")
    parser.add_argument("--compile", action="store_true", help="torch.compile the student (train.compile)")
    parser.add_argument(
        "--teacher-precision", default="auto", help="teacher.precision: auto (bf16 on CUDA) | fp32 | bf16"
    )
    args = parser.parse_args(argv)
    device = setup(args)
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
        parts, optimizer = build(cfg, device, dim)
        timing = compare(
            {
                "supervised": lambda p=parts, o=optimizer: supervised_step(p, o, batch),
                "clip-zss": lambda p=parts, o=optimizer: full_step(p, o, batch),
            },
            device,
            reps=reps,
            warmup=args.warmup,
        )
        splits = [split_step(parts, optimizer, batch) for _ in range(reps)]
        memory = {}
        for name, fn in (("supervised", supervised_step), ("clip-zss", full_step)):
            with peak_memory(device) as peak:
                fn(parts, optimizer, batch)
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
                target(ratio <= 1.6),
            ]
        )
        medians = {k: sorted(s[k] for s in splits)[len(splits) // 2] for k in splits[0]}
        total = sum(medians.values())
        share_rows += [[encoder, k, v * 1e3, 100 * v / total] for k, v in medians.items()]
        results[encoder] = {
            "seconds": timing.seconds,
            "ratio": ratio,
            "parts_seconds": medians,
            "peak_mb": memory,
            "peak_kind": peak.kind,
        }
        print(f"done: {encoder} (load {timing.load[0]:.2f})", flush=True)

    info = machine_info(device)
    table = markdown_table(
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
    table += (
        f"\n\nbatch {args.batch} at {args.crop}², teacher ViT-B/16 at {teacher_cfg.image_size}² "
        f"(precision {teacher_cfg.precision}), "
        f"AMP {'bf16' if device.type == 'cuda' else 'off'}, compile {args.compile}, {reps} repetitions after "
        f"{args.warmup} warm-up, device {device}; peak memory: {peak.kind}.\n\n"
    )
    table += markdown_table(["student", "part", "ms", "share %"], share_rows)
    config = {"batch": args.batch, "crop": args.crop, "teacher_size": teacher_cfg.image_size, "reps": reps}
    report(
        "Training step: CLIP-ZSS vs supervised",
        info,
        table,
        {"config": config, "results": results},
        args.json,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
