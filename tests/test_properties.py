"""Property-based tests (hypothesis): metrics and pseudo-label fusion keep their invariants on any input."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from clipzss.evaluate import ConfusionMatrix, compute_metrics
from clipzss.method.pseudo_labels import fuse_centroids, fuse_labels

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def label_maps(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    k = draw(st.integers(2, 6))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    target = rng.integers(0, k, (h, w))
    target[rng.random((h, w)) < 0.2] = 255
    pred = rng.integers(0, k, (h, w))
    return pred, target, k


def _metrics(pred: np.ndarray, target: np.ndarray, k: int, seen: list[int], unseen: list[int]) -> dict:
    cm = ConfusionMatrix(k)
    cm.update(torch.from_numpy(pred)[None], torch.from_numpy(target)[None])
    return compute_metrics(cm.matrix, [f"c{i}" for i in range(k)], seen, unseen)


@SETTINGS
@given(label_maps(), st.data())
def test_metrics_are_bounded_and_invariant_to_class_order(sample, data) -> None:
    pred, target, k = sample
    seen, unseen = list(range(k - 1)), [k - 1]
    base = _metrics(pred, target, k, seen, unseen)
    for key in ("pAcc", "mIoU", "mIoU(S)"):
        value = base[key]
        assert math.isnan(value) or 0.0 <= value <= 100.0
    iou = np.asarray(base["IoU"], dtype=float)
    assert np.all(np.isnan(iou) | ((iou >= 0) & (iou <= 100)))
    counted = target != 255
    present = np.isin(np.arange(k), target[counted])
    predicted = np.isin(np.arange(k), pred[counted])
    # mmseg's rule: NaN exactly where the union is empty, 0 for a class predicted but absent from the truth.
    assert np.array_equal(~np.isnan(iou), present | predicted), (
        "NaN exactly for classes neither seen nor predicted"
    )
    assert np.all(iou[predicted & ~present] == 0)

    perm = np.asarray(data.draw(st.permutations(range(k))))
    lut = np.full(256, 255)  # class i becomes perm[i]; ignore stays ignore
    lut[:k] = perm
    moved = _metrics(perm[pred], lut[target], k, [int(perm[i]) for i in seen], [int(perm[i]) for i in unseen])
    np.testing.assert_allclose(np.asarray(moved["IoU"], dtype=float)[perm], iou, equal_nan=True)
    for key in ("pAcc", "mIoU", "mIoU(S)", "mIoU(U)", "hIoU"):
        np.testing.assert_allclose(moved[key], base[key], equal_nan=True)


@SETTINGS
@given(
    st.integers(1, 3), st.integers(1, 10), st.integers(2, 6), st.floats(-0.5, 0.99), st.integers(0, 2**31 - 1)
)
def test_fusion_partitions_the_non_empty_centroids(
    batch: int, m: int, c: int, threshold: float, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    centroids = F.normalize(torch.randn(batch, m, c, generator=gen, dtype=torch.float64), dim=-1)
    counts = torch.randint(0, 4, (batch, m), generator=gen)
    result = fuse_centroids(centroids, counts, threshold, trim=False)
    member = result.membership
    assert torch.equal(member < 0, counts <= 0), "empty centroids join no group, every other one joins one"
    for b in range(batch):
        groups = member[b][member[b] >= 0]
        n = int(result.group_valid[b].sum())
        assert sorted(set(groups.tolist())) == list(range(n)), "groups are numbered 0..G-1 without gaps"
        for g in range(n):
            idx = (member[b] == g).nonzero().flatten()
            leader = idx[torch.argmax(counts[b, idx])]  # the largest member opened the group
            cos = centroids[b, idx] @ centroids[b, leader]
            assert bool(((cos > threshold) | (idx == leader)).all()), "members are above λ to their leader"


@SETTINGS
@given(st.integers(1, 2), st.integers(2, 5), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_fuse_labels_never_overwrites_annotation(batch: int, num_seen: int, scale: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    h, w = 4, 5
    tokens = torch.randint(0, 6, (batch, h, w), generator=gen)
    gt = torch.randint(0, num_seen, (batch, h * scale, w * scale), generator=gen)
    gt[torch.rand(gt.shape, generator=gen) < 0.5] = 255
    fused, num_pseudo = fuse_labels(gt, tokens, num_seen, min_region=0.0)
    annotated = gt != 255
    assert torch.equal(fused[annotated], gt[annotated])
    filled = fused[~annotated]
    assert bool(((filled >= num_seen) | (filled == 255)).all())
    for b in range(batch):
        ids = fused[b][(fused[b] != 255) & (fused[b] >= num_seen)].unique()
        assert ids.tolist() == list(range(num_seen, num_seen + int(num_pseudo[b])))
