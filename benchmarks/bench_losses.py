"""NEL + CE memory and time: the losses at the logits' stride against the losses on full-resolution maps.

    python benchmarks/bench_losses.py [--device cuda] [--batch 8] [--crop 512] [--classes 171] [--json out.json]

One training step's ``compute_losses`` (GLM, NEL, CE; teacher-token prototypes for the pseudo regions), forward
and backward, on COCO-Stuff-sized inputs: K = 156 seen + 15 pseudo channels = 171, 512² label maps, stride-4
student embeddings (512-d, 128²), batch 8. Two settings of ``method.loss_resolution``:

- ``full``: logits upsampled to the label size, then NEL and CE on (B, K, 512, 512) maps (the paper's and ZegCLIP's
  way; ``method.loss_resolution=full``);
- ``logits`` (the default): labels brought down to 128² by block majority, NEL and CE on (B, K, 128, 128) maps.

Peak memory is CPU peak RSS above the level before the call (CUDA max allocated on a GPU); time is the median of
interleaved repetitions in the same run. ``full`` at batch 8 needs about 20 GB of CPU memory; where the machine
has less, ``--full-batch`` measures it at a smaller batch and the per-image figure is scaled (memory is linear in
the batch: the table shows both batches measured for ``logits``).

Target (issue 13): ≥ 8× less memory at K = 171, 512², batch 8.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
import torch.nn.functional as F
from common import base_parser, compare, machine_info, markdown_table, peak_memory, report, setup, target

from clipzss.config import MethodConfig
from clipzss.method.glm import GLM
from clipzss.method.losses import compute_losses


def make_inputs(
    batch: int, crop: int, classes: int, pseudo: int, dim: int, device: torch.device, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Stride-4 embeddings, labels of seen and pseudo ids in 32² blocks (10% ignored), teacher tokens."""
    gen = torch.Generator().manual_seed(seed)
    seen = classes - pseudo
    block = 32
    grid = torch.randint(0, classes, (batch, crop // block, crop // block), generator=gen)
    labels = grid.repeat_interleave(block, 1).repeat_interleave(block, 2)
    labels[torch.rand(batch, crop, crop, generator=gen) < 0.1] = 255
    return {
        "R": torch.randn(batch, dim, crop // 4, crop // 4, generator=gen).to(device).requires_grad_(),
        "labels": labels.to(device),
        "text_seen": F.normalize(torch.randn(seen, dim, generator=gen), dim=-1).to(device),
        "teacher_cls": F.normalize(torch.randn(batch, dim, generator=gen), dim=-1).to(device),
        "teacher_dense": F.normalize(
            torch.randn(batch, dim, crop // 16, crop // 16, generator=gen), dim=1
        ).to(device),
    }


def step(inputs: dict[str, torch.Tensor], cfg: MethodConfig, glm: GLM, num_seen: int, pseudo: int) -> None:
    losses = compute_losses(**inputs, num_seen=num_seen, cfg=cfg, glm=glm, max_pseudo=pseudo)
    losses["loss"].backward()
    inputs["R"].grad = None


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--full-batch", type=int, default=None, help="batch for 'full' (default: --batch)")
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--classes", type=int, default=171, help="K = seen + pseudo channels")
    parser.add_argument("--pseudo", type=int, default=15)
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args()
    if args.dry:
        args.batch, args.crop, args.classes, args.pseudo, args.dim = 2, 64, 20, 5, 32
        args.full_batch = 2
    device = setup(args)
    reps = args.reps or (2 if args.dry else 3)
    full_batch = args.full_batch or args.batch
    num_seen = args.classes - args.pseudo
    base = MethodConfig(bank=False, synthesizer=False)
    glm = GLM(base, args.dim).to(device)

    rows, payload = [], {"settings": vars(args) | {"json": None}, "runs": []}
    measured: dict[tuple[str, int], dict[str, float]] = {}
    for resolution, batch in (("logits", args.batch), ("logits", full_batch), ("full", full_batch)):
        if (resolution, batch) in measured:
            continue
        cfg = dataclasses.replace(base, loss_resolution=resolution)
        inputs = make_inputs(batch, args.crop, args.classes, args.pseudo, args.dim, device)
        step(inputs, cfg, glm, num_seen, args.pseudo)  # warm-up (allocator, kernels)
        with peak_memory(device) as peak:
            step(inputs, cfg, glm, num_seen, args.pseudo)
        timing = compare(
            {resolution: partial(step, inputs, cfg, glm, num_seen, args.pseudo)}, device, reps, 0
        )
        measured[(resolution, batch)] = {"MB": peak.megabytes, "s": timing.median(resolution)}
        payload["runs"].append(
            {
                "resolution": resolution,
                "batch": batch,
                "peak MB": peak.megabytes,
                "memory kind": peak.kind,
                "seconds": timing.median(resolution),
            }
        )
        print(
            f"{resolution} batch {batch}: {peak.megabytes:.0f} MB ({peak.kind}), {timing.median(resolution):.3f} s",
            flush=True,
        )
        del inputs

    full = measured[("full", full_batch)]
    small = measured[("logits", full_batch)]
    per_image = {name: value / full_batch for name, value in full.items()}
    memory_ratio = full["MB"] / small["MB"]
    time_ratio = full["s"] / small["s"]
    for (resolution, batch), value in measured.items():
        rows.append([resolution, batch, value["MB"], value["s"]])
    if full_batch != args.batch:
        scaled = per_image["MB"] * args.batch
        rows.append(
            [f"full (scaled from batch {full_batch})", args.batch, scaled, per_image["s"] * args.batch]
        )
        memory_ratio = scaled / measured[("logits", args.batch)]["MB"]
    payload |= {"memory ratio full/logits": memory_ratio, "time ratio full/logits": time_ratio}
    table = markdown_table(["loss resolution", "batch", "peak MB", "s per forward+backward"], rows)
    table += (
        f"\n\nfull ÷ logits: memory {memory_ratio:.1f}× at batch {args.batch}, time {time_ratio:.1f}× at batch "
        f"{full_batch} (target ≥ 8× less memory: {target(memory_ratio >= 8)})"
    )
    title = f"NEL + CE memory, K = {args.classes}, {args.crop}², batch {args.batch}"
    report(title, machine_info(device), table, payload, args.json)


if __name__ == "__main__":
    main()
