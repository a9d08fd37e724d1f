"""Pseudo labels: batched multi-scale K-Means (+ mask fusion) against a per-image scikit-learn KMeans loop.

    python benchmarks/bench_pseudo_labels.py [--device cuda] [--batch 16] [--grid 28] [--dim 512] [--json out.json]

The input is a batch of teacher-like token maps (B × C × grid × grid, L2-normalised): each image is a Voronoi
layout of a few regions, every token its region's direction plus noise, so the clusters are real and the seeds
(window means) fall inside them, as with CLIP's dense tokens. Candidates, timed in the same run:

- ``sklearn loop``: for each image and each seed scale, ``KMeans(init=window seeds, n_init=1, max_iter=iters,
  algorithm="lloyd", tol=0)`` on the CPU, its thread pool limited to torch's thread count (the baseline);
- ``batched euclidean``: ``clipzss.method.pseudo_labels.kmeans_sets(..., spherical=False)``, every scale over the whole
  batch in one call, the same computation (its assignments are compared with scikit-learn's, token by token);
- ``batched spherical + fusion``: the production path ``cluster_regions`` (cosine K-Means at every scale, mask
  fusion, token assignment), i.e. everything the trainer runs per step.

Identity is checked in float64 (ties cannot flip there); the timings use float32, the trainer's dtype. A run in
which scikit-learn meets an empty cluster is reported apart: scikit-learn relocates it, ours keeps it in place (see
``kmeans_sets``), so assignments may differ by design there.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from common import base_parser, compare, machine_info, markdown_table, report, setup, target
from einops import rearrange
from threadpoolctl import threadpool_limits

from clipzss.config import MethodConfig
from clipzss.method.pseudo_labels import cluster_regions, kmeans_sets, window_seeds, window_sizes


def token_maps(batch: int, dim: int, grid: int, regions: int = 8, noise: float = 1.0, seed: int = 0):
    """(B, C, grid, grid) normalised tokens: a Voronoi layout of ``regions`` directions + Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    coords = torch.stack([yy, xx], dim=-1).float().view(-1, 2)  # (N, 2)
    maps = []
    for _ in range(batch):
        sites = torch.rand(regions, 2, generator=gen) * grid
        owner = torch.cdist(coords, sites).argmin(dim=1)  # (N,)
        directions = F.normalize(torch.randn(regions, dim, generator=gen), dim=1)
        tokens = directions[owner] + noise * torch.randn(grid * grid, dim, generator=gen) / math.sqrt(dim)
        maps.append(F.normalize(tokens, dim=1))
    # The teacher's layout: (B, N, C) tokens viewed as (B, C, h, w), i.e. channels last in memory.
    return rearrange(torch.stack(maps), "b (h w) c -> b c h w", h=grid)


def sklearn_loop(dense: torch.Tensor, windows: list[int], iters: int) -> list[list[np.ndarray]]:
    """Per image, per scale: scikit-learn's Lloyd K-Means from the same window seeds. Returns labels[b][scale]."""
    from sklearn.cluster import KMeans

    x = dense.flatten(2).transpose(1, 2).cpu().numpy()  # (B, N, C)
    seeds = [window_seeds(dense, w).cpu().numpy() for w in windows]  # per scale (B, K, C)
    out = []
    for b in range(x.shape[0]):
        per_scale = []
        for s in seeds:
            km = KMeans(n_clusters=s.shape[1], init=s[b], n_init=1, max_iter=iters, algorithm="lloyd", tol=0)
            per_scale.append(km.fit(x[b]).labels_)
        out.append(per_scale)
    return out


def batched_euclidean(dense: torch.Tensor, windows: list[int], iters: int):
    x = dense.flatten(2).transpose(1, 2)  # (B, N, C)
    return kmeans_sets(x, [window_seeds(dense, w) for w in windows], iters, spherical=False)


def identity_check(dense: torch.Tensor, windows: list[int], iters: int) -> dict[str, int]:
    """Compare assignments token by token in float64; runs with an empty cluster are counted apart."""
    dense64 = dense.double().cpu()
    ours = batched_euclidean(dense64, windows, iters)
    with threadpool_limits(limits=torch.get_num_threads()):
        ref = sklearn_loop(dense64, windows, iters)
    stats = {"runs": 0, "runs_identical": 0, "runs_with_empty_cluster": 0, "tokens": 0, "tokens_identical": 0}
    for b in range(dense.shape[0]):
        for s in range(len(windows)):
            labels = ours[s].labels[b].numpy()
            if bool((ours[s].counts[b] == 0).any()):
                stats["runs_with_empty_cluster"] += 1
                continue
            same = int((labels == ref[b][s]).sum())
            stats["runs"] += 1
            stats["runs_identical"] += int(same == labels.size)
            stats["tokens"] += labels.size
            stats["tokens_identical"] += same
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--grid", type=int, default=28, help="token grid side (448 / 16 = 28)")
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args(argv)
    if args.dry:
        args.batch, args.grid, args.dim = 2, 8, 16
    device = setup(args)
    reps = args.reps or (2 if args.dry else 7)
    cfg = MethodConfig()
    windows = window_sizes(args.grid, args.grid, cfg.window_divisors)
    dense = token_maps(args.batch, args.dim, args.grid).to(device)  # (B, C, h, w) float32

    identity = identity_check(dense, windows, cfg.kmeans_iters)
    pool = threadpool_limits(limits=torch.get_num_threads())
    try:
        timing = compare(
            {
                "sklearn loop": lambda: sklearn_loop(dense, windows, cfg.kmeans_iters),
                "batched euclidean": lambda: batched_euclidean(dense, windows, cfg.kmeans_iters),
                "batched spherical + fusion": lambda: cluster_regions(
                    dense, windows, cfg.kmeans_iters, cfg.fusion_threshold
                ),
            },
            device,
            reps=reps,
            warmup=args.warmup,
        )
    finally:
        pool.unregister()
    info = machine_info(device)
    base = "sklearn loop"
    rows = []
    for name in timing.seconds:
        speedup = 1 / timing.ratio(name, base)
        rows.append([name, timing.median(name) * 1e3, args.batch / timing.median(name), speedup])
    euclid_speedup = 1 / timing.ratio("batched euclidean", base)
    production_speedup = 1 / timing.ratio("batched spherical + fusion", base)
    identical = identity["runs"] > 0 and identity["runs_identical"] == identity["runs"]
    table = markdown_table(["candidate", "median ms / batch", "images/s", "speed-up vs sklearn"], rows)
    table += (
        f"\n\nbatch {args.batch} × {args.grid}×{args.grid} tokens × {args.dim} dims, seed windows {windows}, "
        f"{cfg.kmeans_iters} iterations, {reps} repetitions, device {device}.\n"
        f"Assignments (float64) equal to scikit-learn's in {identity['runs_identical']}/{identity['runs']} "
        f"(image, scale) runs ({identity['tokens_identical']}/{identity['tokens']} tokens); "
        f"{identity['runs_with_empty_cluster']} runs with an empty cluster left out.\n"
        f"Target ≥ 20× with identical assignments: euclidean {euclid_speedup:.1f}× "
        f"({target(euclid_speedup >= 20 and identical)}), production path {production_speedup:.1f}×."
    )
    payload = {
        "config": {
            "batch": args.batch,
            "grid": args.grid,
            "dim": args.dim,
            "windows": windows,
            "iters": cfg.kmeans_iters,
            "reps": reps,
        },
        "seconds": timing.seconds,
        "speedup_euclidean": euclid_speedup,
        "speedup_production": production_speedup,
        "identity": identity,
    }
    report("Pseudo labels: batched K-Means vs a scikit-learn loop", info, table, payload, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
