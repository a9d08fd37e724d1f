"""PLM pseudo labels: multi-scale K-Means on the teacher's dense tokens, mask fusion, fused targets.

The paper (CLIP-ZSS, Chen et al., arXiv 2310.02296) clusters CLIP's dense tokens with K-Means whose seeds are
window averages at several sizes, fuses the resulting masks whose centres are similar ("each seed used once")
and fills the ignored area of the ground truth with the fused regions. The ``MethodConfig`` defaults fix what
the paper leaves open; every function here is pure, batched over images on the input's device and free of
host-device syncs unless stated, so the trainer can run it every step under ``torch.no_grad()``.

Pipeline (``pseudo_labels``): ``window_sizes`` → per scale ``window_seeds``, ``kmeans_sets`` → pool the centroids
of all scales → ``fuse_centroids`` → ``assign_tokens`` (token region map) → ``fuse_labels`` (ground truth + regions).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange, reduce

from clipzss.config import MethodConfig, check_field
from clipzss.errors import UsageError

logger = logging.getLogger(__name__)


class KMeansResult(NamedTuple):
    """Final state of a batched K-Means run."""

    centroids: torch.Tensor  # (B, K, C)
    labels: torch.Tensor  # (B, N) int64, assignment to the final centroids
    counts: torch.Tensor  # (B, K) int64, number of points per final label


class FusionResult(NamedTuple):
    """Groups of fused centroids, padded over the batch."""

    group_means: torch.Tensor  # (B, G, C) normalised; zeros where not valid
    group_valid: torch.Tensor  # (B, G) bool; image b's groups are 0 .. num_groups[b] - 1
    membership: torch.Tensor  # (B, M) int64 group of each centroid; -1 for empty centroids


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (reference tests); everything else (bf16/fp16 teacher output) clusters in float32."""
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return torch.float64 if dtype == torch.float64 else torch.float32


def window_sizes(h: int, w: int, divisors: Sequence[int]) -> list[int]:
    """Seed window size per scale: ``round(min(h, w) / d)``, at least 1, duplicates removed (order kept).

    Rounding is half-up (3.5 → 4, 2.5 → 3), not Python's half-to-even, so the sizes grow monotonically with
    the grid. The 28×28 default grid gives [14, 7, 4].
    """
    if h < 1 or w < 1:
        raise ValueError(f"token grid must be at least 1x1, got {h}x{w}")
    if not divisors:
        raise UsageError("window_divisors is empty; give at least one divisor, e.g. (2, 4, 8)")
    sizes: list[int] = []
    for d in divisors:
        if d <= 0:
            raise UsageError(f"window divisor must be positive, got {d} in {tuple(divisors)}")
        size = max(1, math.floor(min(h, w) / d + 0.5))
        if size not in sizes:
            sizes.append(size)
    if len(sizes) < len(divisors):
        logger.debug(
            "window sizes %s for a %dx%d grid (duplicates of %s removed)", sizes, h, w, tuple(divisors)
        )
    return sizes


def window_seeds(dense: torch.Tensor, window: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised mean token of each non-overlapping ``window``×``window`` cell: the K-Means seeds of one scale.

    The grid of cells is ceil-sized, so partial cells at the right/bottom border average only their valid tokens
    instead of being dropped (no token is left without a nearby seed). Seeds are ordered row-major over the cells.
    Void tokens (``valid`` False) never enter a seed; a cell with no valid token gives a zero seed, which
    :func:`seed_alive` reports dead.

    Args:
        dense: (B, C, h, w) dense tokens.
        window: cell side in tokens (stride = window).
        valid: (B, h, w) bool, False on void tokens; None = all valid.

    Returns:
        (B, K, C) seeds with K = ceil(h / window) * ceil(w / window).
    """
    if dense.ndim != 4:
        raise ValueError(f"dense tokens must be (B, C, h, w), got shape {tuple(dense.shape)}")
    if window < 1:
        raise ValueError(f"window size must be at least 1, got {window}")
    _, _, h, w = dense.shape
    gh, gw = math.ceil(h / window), math.ceil(w / window)
    padding = (0, gw * window - w, 0, gh * window - h)  # zero tokens add nothing to the window sums
    # Channels last: the teacher's tokens are laid out (B, h, w, C) in memory, and summing windows of
    # contiguous C-vectors is several times faster than strided sums over a (B, C, h, w) layout.
    x = rearrange(dense.to(_compute_dtype(dense)), "b c h w -> b h w c")
    if valid is not None:
        x = x * valid[..., None].to(x.dtype)
    if any(padding):
        x = F.pad(x, (0, 0, *padding))  # (B, gh*window, gw*window, C)
    sums = x.unflatten(1, (gh, window)).unflatten(3, (gw, window)).sum(dim=(2, 4)).flatten(1, 2)  # (B, K, C)
    if valid is None:
        ones = F.pad(torch.ones(h, w, dtype=x.dtype, device=x.device), padding)
        counts = reduce(ones, "(gh wh) (gw ww) -> (gh gw)", "sum", wh=window, ww=window)[None, :]  # (1, K)
    else:
        ones = F.pad(valid.to(x.dtype), padding)
        counts = reduce(ones, "b (gh wh) (gw ww) -> b (gh gw)", "sum", wh=window, ww=window)  # (B, K)
    return F.normalize(sums / counts.clamp_min(1)[..., None], dim=-1)


def seed_alive(seeds: torch.Tensor) -> torch.Tensor:
    """(B, K) bool: the seeds that stand for at least one token (a zero seed's cell held only void tokens)."""
    return seeds.abs().amax(dim=-1) > 0


def token_validity(valid: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Pixel validity (B, H, W) → token validity (B, h, w): a token is valid when most of its pixels are.

    Area-averaged, so it fits any ratio between the label and token grids (the teacher may run at another size).
    """
    if valid.ndim != 3:
        raise ValueError(f"valid must be (B, H, W), got shape {tuple(valid.shape)}")
    if tuple(valid.shape[-2:]) == tuple(grid):
        return valid.bool()
    share = F.interpolate(valid[:, None].float(), size=tuple(grid), mode="area")[:, 0]
    return share > 0.5


def _assign(
    x: torch.Tensor,
    centroids: torch.Tensor,
    spherical: bool,
    sizes: Sequence[int],
    alive: torch.Tensor | None = None,
) -> torch.Tensor:
    """Nearest centroid per point within each set of ``sizes`` centroids: max cosine, or min squared distance
    (‖x‖² is constant per point). One matmul serves every set; the argmax runs per set. Dead centroids (``alive``
    False: seeds of void cells) never win.

    Returns:
        (B, N, S) int64 indices into the concatenated centroids, one per set.
    """
    dots = x @ centroids.transpose(1, 2)  # (B, N, M)
    score = dots if spherical else centroids.square().sum(-1)[:, None, :] - 2 * dots
    if alive is not None:
        score = score.masked_fill(~alive[:, None, :], -math.inf if spherical else math.inf)
    labels, start = [], 0
    for size in sizes:
        part = score[..., start : start + size]
        labels.append((part.argmax(dim=-1) if spherical else part.argmin(dim=-1)) + start)
        start += size
    return torch.stack(labels, dim=-1)


def _one_hot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    # Compare with arange instead of F.one_hot, whose range check synchronises with the device on CUDA.
    classes = torch.arange(num_classes, device=labels.device)
    return (labels[..., None] == classes).to(dtype)


def _bincount(labels: torch.Tensor, num_bins: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row histogram of (B, N) labels → (B, num_bins) int64 (integer adds: deterministic on every device).

    ``weights`` (B, N) int64 0/1 counts only the points that are 1 (the valid tokens)."""
    counts = torch.zeros(labels.shape[0], num_bins, dtype=torch.long, device=labels.device)
    return counts.scatter_add_(1, labels, torch.ones_like(labels) if weights is None else weights)


def _cluster_sums(
    x: torch.Tensor, labels: torch.Tensor, num_clusters: int, matmul: bool | None = None
) -> torch.Tensor:
    """(B, M, C) sum of the points of each cluster, for (B, N, S) labels (S disjoint sets of clusters).

    On the CPU an index_add (N·C adds per set, sequential, so deterministic); elsewhere (or ``matmul=True``) a
    one-hot matmul, which costs N·M·C but is bitwise reproducible where float scatter-adds (atomics) are not.
    """
    batch, num, dim = x.shape
    if not (x.device.type != "cpu" if matmul is None else matmul):
        rows = (labels + num_clusters * torch.arange(batch, device=x.device)[:, None, None]).transpose(1, 2)
        sums = x.new_zeros(batch * num_clusters, dim)
        flat = x.reshape(batch * num, dim)
        for index in rows.unbind(dim=1):  # one set at a time: no S-fold copy of x
            sums.index_add_(0, index.reshape(-1), flat)
        return sums.view(batch, num_clusters, dim)
    onehot = x.new_zeros(batch, num, num_clusters).scatter_(2, labels, 1.0)  # (B, N, M), S ones per row
    return onehot.transpose(1, 2) @ x


def _set_weights(weights: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor | None:
    """(B, N) point weights repeated for the S sets of (B, N, S) labels, flattened like ``labels.flatten(1)``."""
    return None if weights is None else weights[..., None].expand_as(labels).flatten(1)


def _update(
    x: torch.Tensor,
    centroids: torch.Tensor,
    labels: torch.Tensor,
    spherical: bool,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """One Lloyd mean update of (B, M, C) centroids from (B, N, S) labels; empty clusters keep their centroid.

    With ``weights`` (B, N) int64 0/1, only the points of weight 1 count (``x`` is then already zero elsewhere).
    """
    num_clusters = centroids.shape[1]
    counts = _bincount(labels.flatten(1), num_clusters, _set_weights(weights, labels))  # (B, M)
    means = _cluster_sums(x, labels, num_clusters) / counts.clamp_min(1)[..., None].to(x.dtype)  # (B, M, C)
    if spherical:
        means = F.normalize(means, dim=-1)
    return torch.where(counts[..., None] > 0, means, centroids)


class _Points(NamedTuple):
    """What every Lloyd iteration of a batched K-Means run reads: the points and how they are scored."""

    x: torch.Tensor  # (B, N, C)
    spherical: bool
    sizes: Sequence[int]  # the number of centroids of each set
    weights: torch.Tensor | None = None  # (B, N) int64 0/1: the points that count in means and counts
    alive: torch.Tensor | None = None  # (B, M) bool: centroids that may win a point

    def assign(self, centroids: torch.Tensor) -> torch.Tensor:
        return _assign(self.x, centroids, self.spherical, self.sizes, self.alive)

    def update(self, centroids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _update(self.x, centroids, labels, self.spherical, self.weights)

    def images(self, keep: torch.Tensor) -> _Points:
        """The same run restricted to the images ``keep`` selects."""
        return self._replace(
            x=self.x[keep],
            weights=None if self.weights is None else self.weights[keep],
            alive=None if self.alive is None else self.alive[keep],
        )


def _lloyd(points: _Points, centroids: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly ``iters`` updates, then the final assignment: no data-dependent control flow, no device sync."""
    for _ in range(iters):
        centroids = points.update(centroids, points.assign(centroids))
    return points.assign(centroids), centroids


def _lloyd_until_fixed(
    points: _Points, centroids: torch.Tensor, iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_lloyd`` with images dropped from the work as soon as their assignment stops changing.

    An image whose new labels equal the previous ones has centroids computed from these very labels: every later
    update would recompute them bit for bit, so its result is final. The same result as ``_lloyd`` for a host
    read per iteration, which only the CPU gets for free.
    """
    labels = torch.empty(*points.x.shape[:2], len(points.sizes), dtype=torch.long)  # (B, N, S)
    centroids = centroids.clone()
    moving = torch.arange(points.x.shape[0])  # images whose assignment may still change
    pts, cs, previous = points, centroids, None
    for _ in range(iters):
        current = pts.assign(cs)  # (b, N, S)
        if previous is not None:
            changed = (current != previous).flatten(1).any(dim=1)  # (b,)
            if not bool(changed.all()):
                labels[moving[~changed]] = current[~changed]
                moving, cs, current = moving[changed], cs[changed], current[changed]
                pts = pts.images(changed)
                if moving.numel() == 0:
                    return labels, centroids
        cs = pts.update(cs, current)
        centroids[moving] = cs
        previous = current
    labels[moving] = pts.assign(cs)
    return labels, centroids


def kmeans_sets(
    x: torch.Tensor,
    inits: Sequence[torch.Tensor],
    iters: int,
    spherical: bool = True,
    valid: torch.Tensor | None = None,
) -> list[KMeansResult]:
    """Independent batched Lloyd K-Means runs (one per seed set, e.g. one per window scale) on the same points.

    ``spherical=True``: cosine assignment (argmax x·c) and centroids renormalised after each mean update; the seeds
    are normalised first. ``spherical=False``: plain Euclidean Lloyd (argmin squared distance, centroid = mean),
    equal to scikit-learn's ``KMeans(init=init, n_init=1, max_iter=iters, algorithm="lloyd", tol=0)`` whenever no
    cluster empties. An empty cluster keeps its previous centroid (scikit-learn instead relocates it to a far point):
    deterministic, and harmless here because an empty cluster gets count 0 and is ignored by the fusion.

    Each set's result is that of a K-Means run of its seeds alone; sharing the points lets one matmul per iteration
    score every set's centroids. Speed-ups that leave the result unchanged: on the CPU the means are index-adds
    rather than one-hot matmuls, and an image leaves the loop once its assignment stops changing (a fixed point:
    further iterations would recompute the same centroids bit for bit), which costs a host read per iteration, free
    on the CPU only; on other devices all ``iters`` iterations run with no sync.

    ``valid`` (B, N) bool leaves void points out of every mean and count: they are still assigned (their labels
    are returned) but move no centroid and make no cluster non-empty. An all-zero initial centroid (a seed of void
    tokens only, :func:`seed_alive`) is dead: it never wins a point, so it stays empty.

    Args:
        x: (B, N, C) points.
        inits: per set, (B, K_s, C) initial centroids.
        iters: maximum number of update steps; the final labels are the assignment to the final centroids.
        spherical: cosine K-Means on the unit sphere (the DESIGN default) instead of Euclidean.
        valid: (B, N) bool, False on void points; None = all valid.

    Returns:
        One KMeansResult(centroids (B, K_s, C), labels (B, N), counts (B, K_s)) per set, in order.
    """
    if not inits:
        raise ValueError("kmeans needs at least one set of initial centroids")
    for init in inits:
        if x.ndim != 3 or init.ndim != 3 or x.shape[0] != init.shape[0] or x.shape[2] != init.shape[2]:
            raise ValueError(
                f"kmeans needs x (B, N, C) and init (B, K, C), got {tuple(x.shape)} and {tuple(init.shape)}"
            )
    if iters < 0:
        raise UsageError(f"kmeans_iters must be >= 0, got {iters}")
    dtype = _compute_dtype(x, *inits)
    x = x.to(dtype).contiguous()  # a strided view would be copied by every matmul
    sizes = [init.shape[1] for init in inits]
    centroids = torch.cat([init.to(dtype) for init in inits], dim=1)  # (B, M, C)
    weights = alive = None
    if valid is not None:
        if valid.shape != x.shape[:2]:
            raise ValueError(f"valid must be (B, N) = {tuple(x.shape[:2])}, got {tuple(valid.shape)}")
        weights = valid.long()
        x = x * valid[..., None].to(dtype)  # void points add nothing to any sum
        alive = seed_alive(centroids)
    if spherical:
        centroids = F.normalize(centroids, dim=-1)
    lloyd = _lloyd_until_fixed if x.device.type == "cpu" else _lloyd
    labels, centroids = lloyd(_Points(x, spherical, sizes, weights, alive), centroids, iters)
    num_clusters = centroids.shape[1]
    counts = _bincount(labels.flatten(1), num_clusters, _set_weights(weights, labels))
    results, start = [], 0
    for s, size in enumerate(sizes):
        part = slice(start, start + size)
        results.append(KMeansResult(centroids[:, part], labels[..., s] - start, counts[:, part]))
        start += size
    return results


def multi_scale_kmeans(
    dense: torch.Tensor,
    windows: Sequence[int],
    iters: int,
    spherical: bool = True,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run K-Means once per window size (seeds from ``window_seeds``) and pool the final centroids of all scales.

    Args:
        dense: (B, C, h, w) dense tokens, L2-normalised along C.
        windows: window sizes, one per scale (see ``window_sizes``).
        iters: K-Means iterations per scale.
        spherical: cosine K-Means (default) or Euclidean.
        valid: (B, h, w) bool, False on void tokens (no seed, no mean, no count); None = all valid.

    Returns:
        centroids (B, M, C) and counts (B, M) int64, M = the number of seeds summed over scales, scales in order.
    """
    if not windows:
        raise ValueError("multi_scale_kmeans needs at least one window size")
    x = rearrange(dense, "b c h w -> b (h w) c")
    seeds = [window_seeds(dense, size, valid) for size in windows]
    flat = None if valid is None else valid.flatten(1)
    results = kmeans_sets(x, seeds, iters, spherical, flat)
    return torch.cat([r.centroids for r in results], dim=1), torch.cat([r.counts for r in results], dim=1)


def fuse_centroids(
    centroids: torch.Tensor, counts: torch.Tensor, threshold: float, trim: bool = True
) -> FusionResult:
    """Greedy mask fusion: merge centroids whose cosine with a group's leader exceeds ``threshold``, each used once.

    Centroids are visited in order of cluster size (counts descending, ties by index). The largest unused non-empty
    centroid opens a group and absorbs every unused centroid with cosine > threshold to *it* (not to the running
    group mean, so the order cannot drift a group across the sphere). A group's mean is the normalised
    count-weighted mean of its members. Empty centroids (count 0) join no group. ``threshold=math.inf`` makes every
    non-empty centroid its own group (no fusion). The loop runs over the M centroids, batched over images.

    Args:
        centroids: (B, M, C) pooled centroids.
        counts: (B, M) cluster sizes.
        threshold: cosine above which a centroid joins the current leader (λ).
        trim: cut G to the largest number of groups in the batch (one host sync); False keeps G = M (sync-free).

    Returns:
        FusionResult(group_means (B, G, C), group_valid (B, G), membership (B, M)), groups numbered in the order
        they were opened, i.e. by leader size.
    """
    if centroids.ndim != 3 or counts.shape != centroids.shape[:2]:
        raise ValueError(
            f"fuse_centroids needs centroids (B, M, C) and counts (B, M), "
            f"got {tuple(centroids.shape)} and {tuple(counts.shape)}"
        )
    batch, num, _ = centroids.shape
    device = centroids.device
    units = F.normalize(centroids.to(_compute_dtype(centroids)), dim=-1)
    cosine = units @ units.transpose(1, 2)  # (B, M, M)
    order = torch.sort(counts, dim=1, descending=True, stable=True).indices  # (B, M)
    positions = torch.arange(num, device=device).expand(batch, num)
    rank = torch.empty_like(order).scatter_(1, order, positions)  # (B, M) rank of each centroid in size order
    membership = torch.full((batch, num), -1, dtype=torch.long, device=device)
    used = counts <= 0  # empty centroids are never leaders nor members
    rows = torch.arange(batch, device=device)
    for group in range(num):
        free = ~used
        leader = torch.where(free, rank, num).argmin(dim=1)  # (B,) largest unused centroid
        opened = free[rows, leader]  # (B,) False once an image has no centroid left
        joins = free & ((cosine[rows, leader] > threshold) | (positions == leader[:, None])) & opened[:, None]
        membership = torch.where(joins, group, membership)
        used = used | joins
    num_groups = membership.max(dim=1).values + 1  # (B,) groups are opened consecutively from 0
    size = int(num_groups.max()) if trim else num
    weights = _one_hot(membership, size, units.dtype) * counts.to(units.dtype)[..., None]  # (B, M, G)
    group_means = F.normalize(weights.transpose(1, 2) @ units, dim=-1)  # (B, G, C); empty groups stay 0
    group_valid = torch.arange(size, device=device) < num_groups[:, None]
    return FusionResult(group_means, group_valid, membership)


def assign_tokens(
    x: torch.Tensor, group_means: torch.Tensor, group_valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label each token with the valid group of highest cosine, renumbered compactly per image.

    Groups that win no token are removed from the numbering, so image b uses ids 0 .. num_regions[b] - 1, in the
    groups' order (largest leader first).

    Args:
        x: (B, N, C) tokens.
        group_means: (B, G, C) normalised group means.
        group_valid: (B, G) bool.

    Returns:
        labels (B, N) int64 and num_regions (B,) int64.
    """
    dtype = _compute_dtype(x, group_means)
    sim = x.to(dtype) @ group_means.to(dtype).transpose(1, 2)  # (B, N, G)
    sim = sim.masked_fill(~group_valid[:, None, :], -math.inf)
    labels = sim.argmax(dim=-1)  # (B, N)
    present = (labels[..., None] == torch.arange(group_means.shape[1], device=x.device)).any(dim=1)  # (B, G)
    new_ids = present.long().cumsum(dim=1) - 1
    return new_ids.gather(1, labels), present.sum(dim=1)


def cluster_regions(
    dense: torch.Tensor,
    windows: Sequence[int],
    iters: int,
    fusion_threshold: float | None,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token region map of each image: multi-scale K-Means, optional mask fusion, argmax assignment.

    ``fusion_threshold=None`` skips fusion: every non-empty centroid of the pooled scales is its own region, so a
    single scale without fusion gives exactly the plain K-Means labels of that scale (renumbered by cluster size).

    Args:
        dense: (B, C, h, w) teacher tokens (renormalised here: bf16 output is only roughly unit length).
        windows: seed window sizes, one per scale.
        iters: K-Means iterations.
        fusion_threshold: λ, or None for no fusion.
        valid: (B, h, w) bool, False on void tokens: they seed, move and size no cluster (they still get the
            id of their nearest region, which no pseudo label reads); None = all valid.

    Returns:
        token_labels (B, h, w) int64 with ids 0 .. num_regions[b] - 1, and num_regions (B,) int64.
    """
    if dense.ndim != 4:
        raise ValueError(f"dense tokens must be (B, C, h, w), got shape {tuple(dense.shape)}")
    _, _, h, w = dense.shape
    dense = F.normalize(dense.to(_compute_dtype(dense)), dim=1)
    centroids, counts = multi_scale_kmeans(dense, windows, iters, valid=valid)  # (B, M, C), (B, M)
    threshold = math.inf if fusion_threshold is None else fusion_threshold
    groups = fuse_centroids(centroids, counts, threshold, trim=False)
    x = rearrange(dense, "b c h w -> b (h w) c")
    labels, num_regions = assign_tokens(x, groups.group_means, groups.group_valid)
    return rearrange(labels, "b (h w) -> b h w", h=h, w=w), num_regions


def mean_token(dense: torch.Tensor, valid: torch.Tensor | None = None, scope: str = "batch") -> torch.Tensor:
    """The mean of the valid tokens: (1, C, 1, 1) over the batch, or (B, C, 1, 1) per image.

    ``scope="batch"`` under torch.distributed takes the mean over every rank's batch (the sums and counts are
    all-reduced), so the result, and the pseudo labels built on it, do not depend on how many processes share the
    global batch. The sums are float64, so the order of the additions hardly matters. An image (or batch) without a
    valid token has a zero mean. Under torch.distributed the batch scope is a collective: every rank must call it.
    """
    check_field(scope, "method.center_scope")
    x = dense.double()
    weights = torch.ones_like(x[:, :1]) if valid is None else valid[:, None].double()  # (B, 1, h, w)
    dims = (0, 2, 3) if scope == "batch" else (2, 3)
    sums = (x * weights).sum(dim=dims, keepdim=True)
    counts = weights.sum(dim=dims, keepdim=True)
    if scope == "batch" and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        packed = torch.cat([sums.flatten(), counts.flatten()])
        dist.all_reduce(packed)
        sums, counts = packed[:-1].view_as(sums), packed[-1:].view_as(counts)
    return (sums / counts.clamp_min(1)).to(_compute_dtype(dense))


def center_tokens(
    dense: torch.Tensor, valid: torch.Tensor | None = None, scope: str = "batch"
) -> torch.Tensor:
    """Subtract the mean token (of the batch, or of each image) and renormalise.

    CLIP's image tokens share a large common component (the modality gap: they sit in a narrow cone away from the
    text embeddings, and MaskCLIP tokens leak the image's global content). It raises every cosine between tokens,
    so a fixed fusion threshold λ merges different classes once the shared part grows: in the synthetic world the
    best λ moved from 0.85 to 0.95 when a gap was added. Centred tokens keep the differences only, and one λ fits
    every world measured (benchmarks/README.md, "Token centring"). The mean (:func:`mean_token`) is over the
    valid tokens of the whole global batch (every rank's), or of each image with ``scope="image"``; void tokens
    (padding, the dataset's void) never enter it.

    Args:
        dense: (B, C, h, w) tokens.
        valid: (B, h, w) bool, False on void tokens; None = all valid.
        scope: "batch" or "image".

    Returns:
        (B, C, h, w) centred tokens, L2-normalised along C.
    """
    x = dense.to(_compute_dtype(dense))
    x = F.normalize(x, dim=1)
    return F.normalize(x - mean_token(x, valid, scope), dim=1)


def training_windows(h: int, w: int, cfg: MethodConfig) -> list[int]:
    """The seed window sizes training uses on an h × w grid: every scale, or the middle one without multi_scale."""
    sizes = window_sizes(h, w, cfg.window_divisors)
    return sizes if cfg.multi_scale else [sizes[len(sizes) // 2]]


def token_regions(
    dense: torch.Tensor, cfg: MethodConfig, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cluster_regions`` configured from ``MethodConfig`` (multi_scale, mask_fusion, kmeans_iters, ...).

    ``center_tokens`` clusters batch-centred tokens (see ``center_tokens``). ``multi_scale=False`` keeps only the
    middle window size (``training_windows``: window 7 of [14, 7, 4] on a 28×28 grid, 16 seeds), the scale between
    too-coarse and too-fragmented. ``mask_fusion=False`` keeps every non-empty
    centroid as its own region (see ``cluster_regions``). ``valid`` (B, h, w) marks the non-void tokens (see
    :func:`token_validity`); void tokens join neither the centring mean nor the clustering.

    Returns:
        token_labels (B, h, w) int64 and num_regions (B,) int64.
    """
    sizes = training_windows(dense.shape[-2], dense.shape[-1], cfg)
    threshold = cfg.fusion_threshold if cfg.mask_fusion else None
    with torch.no_grad():
        if cfg.center_tokens:
            dense = center_tokens(dense, valid, cfg.center_scope)
        return cluster_regions(dense, sizes, cfg.kmeans_iters, threshold, valid)


def upsample_regions(token_labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) token region ids → (B, H, W), nearest (source index floor(i·h/H), as ``F.interpolate``), exact."""
    h, w = token_labels.shape[1:]
    rows = torch.arange(size[0], device=token_labels.device) * h // size[0]
    cols = torch.arange(size[1], device=token_labels.device) * w // size[1]
    return token_labels.long()[:, rows][:, :, cols]


def fuse_labels(
    gt: torch.Tensor,
    token_labels: torch.Tensor,
    num_seen: int,
    min_region: float = 0.01,
    ignore_index: int = 255,
    valid: torch.Tensor | None = None,
    max_seen_share: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill the ignored area of the ground truth with pseudo-region ids ``num_seen + r``.

    The token map is upsampled nearest (source index floor(i·h/H), as ``F.interpolate``) to the label size.
    Annotated pixels keep their ground truth; padded pixels (``valid`` False) never get a pseudo label. A region is
    dropped (its pixels stay ``ignore_index``) when its ignored-area pixels cover less than ``min_region`` of the
    crop (tiny fragments make noisy classes), or when more than ``max_seen_share`` of its image pixels carry one
    seen class: such a region is that seen class's rim (VOC's 255 bands, unlabelled borders), not new content, and
    as a "new class" CE would push the seen class away from its own text. The surviving regions are renumbered
    compactly in their original order, so image b uses num_seen .. num_seen + num_pseudo[b] - 1.

    Args:
        gt: (B, H, W) int64 labels in the seen-index space 0 .. num_seen - 1, ``ignore_index`` elsewhere.
        token_labels: (B, h, w) region ids, each < h·w (compact ids always are).
        num_seen: number of seen classes (first pseudo channel).
        min_region: minimum fraction of the H·W crop a region must cover inside the ignored area.
        ignore_index: the ignore label.
        valid: (B, H, W) bool, False on padding; None = every pixel is image.
        max_seen_share: largest share of a region's image pixels one seen class may hold (1.0 keeps all).

    Returns:
        fused (B, H, W) int64 and num_pseudo (B,) int64.
    """
    if gt.ndim != 3 or token_labels.ndim != 3 or gt.shape[0] != token_labels.shape[0]:
        raise ValueError(
            f"fuse_labels needs gt (B, H, W) and token_labels (B, h, w) with the same B, "
            f"got {tuple(gt.shape)} and {tuple(token_labels.shape)}"
        )
    if valid is not None and valid.shape != gt.shape:
        raise ValueError(f"valid must match gt {tuple(gt.shape)}, got {tuple(valid.shape)}")
    if num_seen < 0:
        raise ValueError(f"num_seen must be >= 0, got {num_seen}")
    batch, height, width = gt.shape
    h, w = token_labels.shape[1:]
    regions = upsample_regions(token_labels, (height, width))  # (B, H, W)
    image = torch.ones_like(gt, dtype=torch.bool) if valid is None else valid.bool()
    ignored = (gt == ignore_index) & image  # (B, H, W): unlabelled image content, the only pixels filled
    num_bins = h * w + 1  # bin h*w collects the pixels that are not counted
    binned = torch.where(ignored, regions, num_bins - 1).flatten(1)  # (B, H*W)
    area = _bincount(binned, num_bins)[:, :-1]  # (B, h*w) ignored pixels per region
    keep = (area > 0) & (area >= min_region * height * width)
    if max_seen_share < 1.0 and num_seen > 0:
        # Joint histogram (region, seen class) over the annotated pixels, plus each region's image pixels.
        annotated = (gt >= 0) & (gt < num_seen) & image
        joint = torch.where(annotated, regions * num_seen + gt.long(), h * w * num_seen).flatten(1)
        per_class = _bincount(joint, h * w * num_seen + 1)[:, :-1].view(batch, h * w, num_seen)
        total = _bincount(torch.where(image, regions, h * w).flatten(1), num_bins)[:, :-1]  # (B, h*w)
        rim = per_class.max(dim=-1).values > max_seen_share * total
        keep &= ~rim
    new_ids = num_seen + keep.long().cumsum(dim=1) - 1  # (B, h*w)
    pseudo = new_ids.gather(1, regions.flatten(1)).view(batch, height, width)
    kept = keep.gather(1, regions.flatten(1)).view(batch, height, width)
    fused = torch.where(ignored & kept, pseudo, gt.long())
    return fused, keep.sum(dim=1)


def pseudo_labels(
    dense: torch.Tensor,
    gt: torch.Tensor,
    num_seen: int,
    cfg: MethodConfig,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's entry point: fused labels F from teacher tokens and ground truth.

    Honours ``cfg.pseudo_labels`` (off: the ground truth unchanged, zero pseudo regions), ``multi_scale``,
    ``mask_fusion``, ``kmeans_iters``, ``window_divisors``, ``fusion_threshold``, ``min_region`` and
    ``max_seen_share``.

    Args:
        dense: (B, C, h, w) teacher dense tokens, L2-normalised along C.
        gt: (B, H, W) int64 labels, seen indices or 255.
        num_seen: number of seen classes.
        cfg: the method config.
        valid: (B, H, W) bool, False on void pixels (padding, the dataset's void): never pseudo-labelled, and the
            tokens that are mostly void join neither the centring nor the clustering; None = all image.

    Returns:
        fused (B, H, W) int64 and num_pseudo (B,) int64.
    """
    with torch.no_grad():
        if not cfg.pseudo_labels:
            return gt.long().clone(), torch.zeros(gt.shape[0], dtype=torch.long, device=gt.device)
        tokens_valid = None if valid is None else token_validity(valid, tuple(dense.shape[-2:]))
        token_labels, _ = token_regions(dense, cfg, tokens_valid)
        return fuse_labels(
            gt, token_labels, num_seen, cfg.min_region, valid=valid, max_seen_share=cfg.max_seen_share
        )
