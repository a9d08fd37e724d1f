"""Pseudo labels: K-Means against scikit-learn / NumPy references, seeds, fusion, fused targets, batching."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans

from clipzss.config import MethodConfig
from clipzss.method.pseudo_labels import (
    assign_tokens,
    center_tokens,
    fuse_centroids,
    fuse_labels,
    kmeans_sets,
    pseudo_labels,
    token_regions,
    window_seeds,
    window_sizes,
)

# ---------------------------------------------------------------------------------------------------------------
# helpers


def blobs(rng: np.random.Generator, centers: np.ndarray, per_blob: int, noise: float) -> np.ndarray:
    points = np.concatenate([c + noise * rng.standard_normal((per_blob, centers.shape[1])) for c in centers])
    return points[rng.permutation(len(points))]


def three_patch_grid(
    seed: int, c: int = 16, size: int = 12, noise: float = 0.05
) -> tuple[torch.Tensor, np.ndarray]:
    """(C, h, w) normalised tokens made of three constant patches + noise, and the (h, w) true patch map."""
    gen = torch.Generator().manual_seed(seed)
    patches = F.normalize(torch.randn(3, c, generator=gen), dim=1)
    truth = np.zeros((size, size), dtype=np.int64)
    truth[size // 2 :, : size // 2 - 1] = 1
    truth[size // 2 :, size // 2 - 1 :] = 2
    tokens = patches[torch.from_numpy(truth)] + noise * torch.randn(size, size, c, generator=gen)  # (h, w, C)
    return F.normalize(tokens.permute(2, 0, 1), dim=0), truth


def spherical_reference(x: np.ndarray, init: np.ndarray, iters: int) -> tuple[np.ndarray, np.ndarray]:
    """Straightforward spherical Lloyd loop: cosine assignment, mean, renormalise; empty clusters stay put."""
    centroids = init / np.linalg.norm(init, axis=1, keepdims=True)
    for _ in range(iters):
        labels = (x @ centroids.T).argmax(axis=1)
        for k in range(len(centroids)):
            members = x[labels == k]
            if len(members):
                mean = members.mean(axis=0)
                centroids[k] = mean / np.linalg.norm(mean)
    return centroids, (x @ centroids.T).argmax(axis=1)


def greedy_reference(
    centroids: np.ndarray, counts: np.ndarray, threshold: float
) -> tuple[list[int], np.ndarray]:
    """One image's fusion written as the plain loop it describes: membership and group means."""
    units = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    membership = [-1] * len(counts)
    order = sorted(range(len(counts)), key=lambda i: (-counts[i], i))
    group = 0
    for lead in order:
        if counts[lead] <= 0 or membership[lead] != -1:
            continue
        for j in range(len(counts)):
            if counts[j] > 0 and membership[j] == -1 and (j == lead or units[lead] @ units[j] > threshold):
                membership[j] = group
        group += 1
    means = []
    for g in range(group):
        members = [j for j in range(len(counts)) if membership[j] == g]
        mean = sum(counts[j] * units[j] for j in members)
        means.append(mean / np.linalg.norm(mean))
    return membership, np.array(means)


# ---------------------------------------------------------------------------------------------------------------
# seeds and window sizes


def test_window_sizes_rounding_and_duplicates() -> None:
    assert window_sizes(28, 28, (2, 4, 8)) == [14, 7, 4]  # 3.5 rounds up
    assert window_sizes(20, 20, (2, 4, 8)) == [10, 5, 3]  # 2.5 rounds half-up, not to even
    assert window_sizes(28, 40, (2, 4, 8)) == [14, 7, 4]  # the shorter side decides
    assert window_sizes(4, 4, (2, 4, 8)) == [2, 1]  # 4/8 → 1 (at least 1), duplicate removed
    with pytest.raises(ValueError, match="divisor"):
        window_sizes(28, 28, (2, 0))


def test_window_seeds_equal_hand_computed_means_with_partial_borders() -> None:
    dense = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    seeds = window_seeds(dense, 3)
    assert seeds.shape == (2, 2 * 3, 3)  # ceil(5/3) x ceil(7/3) windows
    expected = []
    for r in range(0, 5, 3):
        for c in range(0, 7, 3):
            cell = dense[:, :, r : r + 3, c : c + 3]  # slicing clips the border cells to their valid tokens
            expected.append(cell.mean(dim=(2, 3)))
    expected = F.normalize(torch.stack(expected, dim=1), dim=-1)
    torch.testing.assert_close(seeds, expected)
    # the bottom-right cell holds only 2x1 valid tokens: their mean, not a zero-padded average
    corner = dense[0, :, 3:5, 6].mean(dim=1)
    torch.testing.assert_close(seeds[0, -1], corner / corner.norm())


def test_window_seeds_window_one_is_every_token() -> None:
    dense = F.normalize(torch.randn(1, 4, 3, 2), dim=1)
    torch.testing.assert_close(window_seeds(dense, 1), dense.flatten(2).transpose(1, 2))


# ---------------------------------------------------------------------------------------------------------------
# K-Means


@pytest.mark.parametrize("data", ["random", "clustered"])
def test_euclidean_kmeans_equals_sklearn(data: str) -> None:
    rng = np.random.default_rng(1)
    k, iters = 6, 15
    points, inits = [], []
    for _ in range(2):  # two images, clustered independently in one batch
        if data == "random":
            x = rng.standard_normal((240, 5))
        else:
            x = blobs(rng, 4 * rng.standard_normal((k, 5)), per_blob=40, noise=1.0)
        points.append(x)
        inits.append(x[rng.choice(len(x), k, replace=False)])
    (result,) = kmeans_sets(
        torch.from_numpy(np.stack(points)), [torch.from_numpy(np.stack(inits))], iters, spherical=False
    )
    for b in range(2):
        ref = KMeans(n_clusters=k, init=inits[b], n_init=1, max_iter=iters, algorithm="lloyd", tol=0).fit(
            points[b]
        )
        assert (result.counts[b] > 0).all()  # no empty cluster: sklearn would relocate it
        np.testing.assert_array_equal(result.labels[b].numpy(), ref.labels_)
        np.testing.assert_allclose(result.centroids[b].numpy(), ref.cluster_centers_, atol=1e-10)
        np.testing.assert_array_equal(result.counts[b].numpy(), np.bincount(ref.labels_, minlength=k))


def test_spherical_kmeans_equals_numpy_reference() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 150, 6))
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    init = rng.standard_normal((3, 7, 6))  # unnormalised on purpose: both normalise the seeds
    (result,) = kmeans_sets(torch.from_numpy(x), [torch.from_numpy(init)], iters=8, spherical=True)
    for b in range(3):
        centroids, labels = spherical_reference(x[b], init[b].copy(), iters=8)
        np.testing.assert_array_equal(result.labels[b].numpy(), labels)
        np.testing.assert_allclose(result.centroids[b].numpy(), centroids, atol=1e-12)


def test_spherical_agrees_with_sklearn_on_separated_normalised_data() -> None:
    rng = np.random.default_rng(3)
    directions = rng.standard_normal((4, 8))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    x = blobs(rng, directions, per_blob=30, noise=0.05)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    init = np.stack([x[np.argmax(x @ d)] for d in directions[::-1]])  # one seed per blob, shuffled order
    (ours,) = kmeans_sets(torch.from_numpy(x)[None], [torch.from_numpy(init)[None]], iters=10, spherical=True)
    ref = KMeans(n_clusters=4, init=init, n_init=1, max_iter=10, algorithm="lloyd", tol=0).fit(x)
    np.testing.assert_array_equal(ours.labels[0].numpy(), ref.labels_)


def test_kmeans_empty_cluster_keeps_its_centroid() -> None:
    x = F.normalize(torch.tensor([[[1.0, 0.1], [1.0, -0.1], [0.9, 0.0]]]), dim=-1)
    init = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])  # the second seed is far from every point
    (result,) = kmeans_sets(x, [init], iters=5)
    assert result.counts.tolist() == [[3, 0]]
    torch.testing.assert_close(result.centroids[0, 1], torch.tensor([-1.0, 0.0]))
    assert result.labels.tolist() == [[0, 0, 0]]


# ---------------------------------------------------------------------------------------------------------------
# mask fusion


def rotated(angle_deg: float, axis: int = 0, dim: int = 6) -> torch.Tensor:
    """Unit vector at ``angle`` from e_axis towards e_(axis+1)."""
    v = torch.zeros(dim, dtype=torch.float64)
    v[axis] = math.cos(math.radians(angle_deg))
    v[axis + 1] = math.sin(math.radians(angle_deg))
    return v


def test_fusion_threshold_merges_09_not_08() -> None:
    angle_09, angle_08 = math.degrees(math.acos(0.9)), math.degrees(math.acos(0.8))
    centroids = torch.stack([rotated(0, 0), rotated(angle_09, 0), rotated(0, 2), rotated(angle_08, 2)])[None]
    counts = torch.tensor([[10, 9, 8, 7]])
    result = fuse_centroids(centroids, counts, threshold=0.85)
    assert result.membership.tolist() == [[0, 0, 1, 2]]
    assert result.group_valid.tolist() == [[True, True, True]]
    # group mean = normalised count-weighted mean of its members
    merged = 10 * centroids[0, 0] + 9 * centroids[0, 1]
    torch.testing.assert_close(result.group_means[0, 0], merged / merged.norm())


def test_fusion_follows_size_order_and_breaks_ties_by_index() -> None:
    # a–b and b–c are similar (cos 20° ≈ 0.94), a–c are not (cos 40° ≈ 0.77): the leader decides the grouping
    centroids = torch.stack([rotated(0), rotated(20), rotated(40)])[None].repeat(3, 1, 1)
    counts = torch.tensor([[5, 9, 5], [9, 5, 5], [5, 5, 5]])
    result = fuse_centroids(centroids, counts, threshold=0.85)
    assert result.membership[0].tolist() == [0, 0, 0]  # b leads and absorbs both neighbours
    assert result.membership[1].tolist() == [0, 0, 1]  # a leads and takes b; c is left alone
    assert result.membership[2].tolist() == [0, 0, 1]  # tie: the lowest index (a) leads
    assert result.group_valid.tolist() == [[True, False], [True, True], [True, True]]


def test_fusion_matches_greedy_reference_and_partitions_nonempty_centroids() -> None:
    gen = torch.Generator().manual_seed(4)
    centroids = F.normalize(torch.randn(3, 24, 3, generator=gen, dtype=torch.float64), dim=-1)
    counts = torch.randint(0, 6, (3, 24), generator=gen)  # many ties and some empty centroids
    result = fuse_centroids(centroids, counts, threshold=0.85)
    for b in range(3):
        membership, means = greedy_reference(centroids[b].numpy(), counts[b].numpy(), 0.85)
        assert result.membership[b].tolist() == membership
        groups = result.membership[b]
        assert ((groups == -1) == (counts[b] == 0)).all()  # empties join nothing, every other centroid once
        num_groups = len(means)
        assert set(groups[groups >= 0].tolist()) == set(range(num_groups))
        assert result.group_valid[b].tolist() == [g < num_groups for g in range(result.group_valid.shape[1])]
        np.testing.assert_allclose(result.group_means[b, :num_groups].numpy(), means, atol=1e-12)
    untrimmed = fuse_centroids(centroids, counts, threshold=0.85, trim=False)
    assert untrimmed.group_valid.shape == (3, 24)
    width = result.group_valid.shape[1]
    assert not untrimmed.group_valid[:, width:].any()
    torch.testing.assert_close(untrimmed.group_means[:, :width], result.group_means)


def test_fusion_infinite_threshold_keeps_every_nonempty_centroid() -> None:
    centroids = torch.stack([rotated(0), rotated(1), rotated(2)])[None]
    result = fuse_centroids(centroids, torch.tensor([[1, 0, 3]]), threshold=math.inf)
    assert result.membership.tolist() == [[1, -1, 0]]


def test_assign_tokens_renumbers_compactly_and_skips_invalid_groups() -> None:
    means = torch.eye(4)[None]  # groups 0..3, group 3 padding
    valid = torch.tensor([[True, True, True, False]])
    x = torch.tensor(
        [[[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.1], [0.0, 0.0, 0.0, 1.0], [0.0, 0.1, 0.9, 0.0]]]
    )
    labels, num = assign_tokens(x, means, valid)
    # group 1 wins no token, so group 2 becomes region 1; the token nearest the padding group goes elsewhere
    assert labels.tolist() == [[1, 0, 0, 1]]
    assert num.tolist() == [2]


# ---------------------------------------------------------------------------------------------------------------
# fused labels


def test_fuse_labels_drops_small_regions_and_renumbers() -> None:
    token_labels = torch.tensor([[[0, 1], [2, 3]]])  # 2x2 tokens → 5x5-pixel cells on a 10x10 crop
    gt = torch.full((1, 10, 10), 3)
    gt[0, :5, :5] = 255  # region 0: 25 ignored pixels (25 %)
    gt[0, 5, 0:2] = 255  # region 2: 2 ignored pixels (2 %)
    gt[0, 9, 9] = 255  # region 3: 1 ignored pixel (1 %); region 1: fully annotated
    fused, num_pseudo = fuse_labels(gt, token_labels, num_seen=15, min_region=0.015)
    expected = gt.clone()
    expected[0, :5, :5] = 15
    expected[0, 5, 0:2] = 16  # region 2 becomes the second pseudo id (no gap for region 1)
    assert torch.equal(fused, expected)  # region 3's pixel stays 255
    assert num_pseudo.tolist() == [2]


def test_fuse_labels_upsamples_nearest() -> None:
    token_labels = torch.arange(63).view(1, 7, 9)  # every id covers at least one pixel
    gt = torch.full((1, 30, 40), 255)
    fused, num_pseudo = fuse_labels(gt, token_labels, num_seen=4, min_region=0.0)
    nearest = F.interpolate(token_labels[:, None].float(), size=(30, 40), mode="nearest")[:, 0].long()
    assert torch.equal(fused, nearest + 4)
    assert num_pseudo.tolist() == [63]


def test_pseudo_labels_never_overwrite_annotations() -> None:
    gen = torch.Generator().manual_seed(5)
    dense = torch.stack([three_patch_grid(s)[0] for s in range(2)])  # (2, 16, 12, 12)
    gt = torch.randint(0, 6, (2, 48, 48), generator=gen)
    gt[torch.rand(2, 48, 48, generator=gen) < 0.6] = 255
    fused, num_pseudo = pseudo_labels(dense, gt, num_seen=6, cfg=MethodConfig())
    annotated = gt != 255
    assert torch.equal(fused[annotated], gt[annotated])
    for b in range(2):
        ids = fused[b][~annotated[b]]
        pseudo = ids[ids != 255]
        assert (pseudo >= 6).all()
        assert sorted(pseudo.unique().tolist()) == list(range(6, 6 + int(num_pseudo[b])))  # compact
    assert (num_pseudo > 0).all()


def test_pseudo_labels_switched_off_returns_ground_truth() -> None:
    gt = torch.full((1, 8, 8), 255)
    fused, num_pseudo = pseudo_labels(torch.randn(1, 4, 4, 4), gt, 3, MethodConfig(pseudo_labels=False))
    assert torch.equal(fused, gt) and num_pseudo.tolist() == [0]


# ---------------------------------------------------------------------------------------------------------------
# the whole pipeline


def test_three_patches_are_recovered_as_three_regions() -> None:
    dense, truth = three_patch_grid(seed=6)
    labels, num = token_regions(dense[None], MethodConfig())
    assert num.tolist() == [3]
    labels = labels[0].numpy()
    region_of_patch = [np.unique(labels[truth == p]) for p in range(3)]
    assert all(len(r) == 1 for r in region_of_patch)  # each patch is one region
    assert sorted(int(r[0]) for r in region_of_patch) == [0, 1, 2]  # and the regions differ


def test_no_fusion_single_scale_is_plain_kmeans() -> None:
    dense, _ = three_patch_grid(seed=7)
    cfg = MethodConfig(multi_scale=False, mask_fusion=False, kmeans_iters=4, center_tokens=False)
    labels, num = token_regions(dense[None], cfg)
    middle = window_sizes(12, 12, cfg.window_divisors)[1]  # [6, 3, 2] → 3
    (plain,) = kmeans_sets(dense.flatten(1).T[None], [window_seeds(dense[None], middle)], iters=4)
    # same partition: one region per non-empty K-Means cluster
    assert int(num) == int((plain.counts > 0).sum()) > 3
    pairs = set(zip(labels.flatten().tolist(), plain.labels.flatten().tolist()))
    assert len(pairs) == int(num)


def test_batched_equals_per_image_and_is_deterministic() -> None:
    gen = torch.Generator().manual_seed(8)
    dense = torch.stack([three_patch_grid(9)[0], three_patch_grid(10, noise=0.3)[0], torch.randn(16, 12, 12)])
    dense = F.normalize(dense, dim=1)
    gt = torch.randint(0, 5, (3, 36, 36), generator=gen)
    gt[:, :, 10:30] = 255
    cfg = MethodConfig(center_tokens=False)  # centring uses the batch mean: batching then changes the tokens
    labels, num = token_regions(dense, cfg)
    fused, num_pseudo = pseudo_labels(dense, gt, 5, cfg)
    for b in range(3):
        labels_b, num_b = token_regions(dense[b : b + 1], cfg)
        fused_b, num_pseudo_b = pseudo_labels(dense[b : b + 1], gt[b : b + 1], 5, cfg)
        assert torch.equal(labels_b[0], labels[b]) and int(num_b) == int(num[b])
        assert torch.equal(fused_b[0], fused[b]) and int(num_pseudo_b) == int(num_pseudo[b])
    again, again_num = pseudo_labels(dense, gt, 5, cfg)
    assert torch.equal(again, fused) and torch.equal(again_num, num_pseudo)
    assert len(set(num.tolist())) > 1  # the images really differ, so padding was exercised


def test_fuse_labels_never_labels_crop_padding() -> None:
    """Padding (PadTo's -1, carried as ``valid``) is not image: it gets no pseudo id and no region area."""
    token_labels = torch.tensor([[[0, 1], [2, 3]]])  # 5x5-pixel cells on a 10x10 crop
    gt = torch.full((1, 10, 10), 255)
    valid = torch.ones(1, 10, 10, dtype=torch.bool)
    valid[0, :, 6:] = False  # the right 4 columns are padding
    fused, num_pseudo = fuse_labels(gt, token_labels, num_seen=3, min_region=0.04, valid=valid)
    assert (fused[~valid] == 255).all()
    # Regions 1 and 3 keep only their 5x1 image column (5 % of the crop), above min_region: still pseudo ids.
    assert num_pseudo.tolist() == [4]
    assert set(fused[valid].unique().tolist()) == {3, 4, 5, 6}
    # Without the mask, the padding would have become part of regions 1 and 3 (today's bug).
    unmasked, _ = fuse_labels(gt, token_labels, num_seen=3, min_region=0.04)
    assert (unmasked[~valid] != 255).all()


def test_fuse_labels_drops_regions_lying_mostly_on_one_seen_class() -> None:
    """A region whose pixels are mostly one seen class (an object's 255 rim) is not new content."""
    token_labels = torch.tensor([[[0, 1], [2, 3]]])  # 5x5-pixel cells on a 10x10 crop
    gt = torch.full((1, 10, 10), 255)
    gt[0, :4, :5] = 0  # region 0: 20 of 25 pixels are seen class 0, a 5-pixel rim is ignored
    gt[0, :2, 5:] = 1  # region 1: 10 of 25 pixels seen class 1 (40 %), 15 ignored
    gt[0, 5, :5] = 0  # region 2: 10 of 25 pixels seen, split over two classes (20 % each)
    gt[0, 7, :5] = 2
    fused, num_pseudo = fuse_labels(gt, token_labels, num_seen=3, min_region=0.0, max_seen_share=0.5)
    assert (fused[0, 4, :5] == 255).all()  # region 0's rim stays ignored
    assert num_pseudo.tolist() == [3]  # regions 1, 2 and the fully ignored region 3 remain
    assert torch.equal(fused[gt != 255], gt[gt != 255])  # annotation never changes
    kept, kept_num = fuse_labels(gt, token_labels, num_seen=3, min_region=0.0, max_seen_share=1.0)
    assert kept_num.tolist() == [4] and (kept[0, 4, :5] == 3).all()  # 1.0 = the old behaviour
    _, strict_num = fuse_labels(gt, token_labels, num_seen=3, min_region=0.0, max_seen_share=0.3)
    assert strict_num.tolist() == [2]  # region 1 (40 %) goes too; region 2 (20 % per class) stays


def test_center_tokens_removes_the_batch_mean_and_undoes_a_shared_offset() -> None:
    """A shared image-side direction (CLIP's modality gap) makes two classes look alike (cosine 0.9 > λ = 0.7);
    centred on the batch mean they are two regions again."""
    a, b, g = torch.eye(8)[:3]
    dense = torch.zeros(2, 8, 4, 4)
    dense[:, :, :, :2] = (a + 3 * g)[None, :, None, None]
    dense[:, :, :, 2:] = (b + 3 * g)[None, :, None, None]
    dense = F.normalize(
        dense + 0.01 * torch.randn(dense.shape, generator=torch.Generator().manual_seed(0)), dim=1
    )
    centred = center_tokens(dense)
    torch.testing.assert_close(centred.norm(dim=1), torch.ones(2, 4, 4))
    x = F.normalize(dense.double(), dim=1)
    expected = F.normalize(x - x.mean(dim=(0, 2, 3), keepdim=True), dim=1).float()
    torch.testing.assert_close(centred, expected)
    _, raw_num = token_regions(dense, MethodConfig(center_tokens=False, fusion_threshold=0.7))
    labels, num = token_regions(dense, MethodConfig(center_tokens=True, fusion_threshold=0.7))
    assert raw_num.tolist() == [1, 1]  # merged by the shared component
    assert num.tolist() == [2, 2] and (labels[:, :, :2] != labels[:, :, 2:3]).all()
