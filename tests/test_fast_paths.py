"""Optimised paths equal the plain computations they replace, within the stated tolerances.

Each test pits a speed-up (issue 7) against a straightforward reference written here or the library code it
replaces: the channels-last text classifier (its compiled norms and pixel blocks), the lane-wise point statistics of
the label shortcut, the layout-following slide canvas and its one-window shortcut, the
skipped same-size resize, the re-ordered SegFormer decoder, the joint multi-scale K-Means with CPU index-adds and
early exit, the class-query-only last teacher block, and the deferred non-finite-loss check. Float tolerances:
1e-5 relative on logits and embeddings (fp32 rounding of another summation order); argmax maps equal wherever the
top two classes differ by more than 1e-4; K-Means labels identical. torch.compile is not tested here: compiling
even the tiny student takes minutes on a CPU (it matched eager within 3e-6 when tried by hand).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import nn

from clipzss.config import Config, EvalConfig, StudentConfig, TeacherConfig
from clipzss.inference.inputs import preprocess, sliding_windows
from clipzss.inference.windows import infer_logits
from clipzss.method.pseudo_labels import (
    _cluster_sums,
    _lloyd,
    _lloyd_until_fixed,
    _Points,
    kmeans_sets,
    window_seeds,
)
from clipzss.models.segmenter import PrecomputedText, Segmenter, _classes_last_logits, pixel_norms
from clipzss.models.student import build_student
from clipzss.models.teacher import _last_block, _value_path, build_teacher
from clipzss.training.loop import FiniteWatch, NonFiniteLossError

# --- reference implementations ---------------------------------------------------------------------------------


def plain_slide(logits_fn, images: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """mmseg's slide inference, written plainly: contiguous canvas, every window accumulated, divided by counts."""
    b, _, h, w = images.shape
    canvas, count = None, torch.zeros(1, 1, h, w)
    for y1, y2, x1, x2 in sliding_windows(h, w, crop, stride):
        logits = logits_fn(images[:, :, y1:y2, x1:x2]).contiguous()
        logits = F.interpolate(logits, size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)
        canvas = torch.zeros(b, logits.shape[1], h, w) if canvas is None else canvas
        canvas[:, :, y1:y2, x1:x2] += logits
        count[:, :, y1:y2, x1:x2] += 1
    return canvas / count


def plain_kmeans(
    x: torch.Tensor, init: torch.Tensor, iters: int, spherical: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One set, fixed iterations, one-hot matmul means: the K-Means loop before the speed-ups."""
    centroids = F.normalize(init, dim=-1) if spherical else init.clone()
    k = centroids.shape[1]

    def assign(c: torch.Tensor) -> torch.Tensor:
        dots = x @ c.transpose(1, 2)
        return dots.argmax(-1) if spherical else (c.square().sum(-1)[:, None] - 2 * dots).argmin(-1)

    for _ in range(iters):
        onehot = F.one_hot(assign(centroids), k).to(x.dtype)  # (B, N, K)
        counts = onehot.sum(1)
        means = onehot.transpose(1, 2) @ x / counts.clamp_min(1)[..., None]
        means = F.normalize(means, dim=-1) if spherical else means
        centroids = torch.where(counts[..., None] > 0, means, centroids)
    return assign(centroids), centroids


def token_maps(batch: int, dim: int, grid: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """(B, C, grid, grid) normalised tokens: 4 regions (quadrants shifted per image) + noise, teacher layout."""
    gen = torch.Generator().manual_seed(seed)
    maps = []
    for b in range(batch):
        directions = F.normalize(torch.randn(4, dim, generator=gen, dtype=dtype), dim=1)
        yy, xx = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        owner = ((yy + b) % grid >= grid // 2).long() * 2 + (xx >= grid // 3).long()
        tokens = directions[owner] + 0.4 * torch.randn(grid, grid, dim, generator=gen, dtype=dtype)
        maps.append(F.normalize(tokens, dim=-1))
    return torch.stack(maps).permute(0, 3, 1, 2)  # a (B, h, w, C) tensor viewed as (B, C, h, w)


def near_tie(logits: torch.Tensor, margin: float = 1e-4) -> torch.Tensor:
    top2 = logits.topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1]) < margin


# --- the text classifier and inference ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    torch.manual_seed(0)
    cfg = Config(student=StudentConfig(arch="Segformer", encoder="mit_b0", embed_dim=16))
    names = [f"class {i}" for i in range(7)]
    text = PrecomputedText(names, torch.randn(7, 16))
    return Segmenter(build_student(cfg.student, for_training=False), text, cfg, torch.device("cpu"))


def test_channels_last_logits_equal_normalised_einsum(segmenter: Segmenter) -> None:
    images = torch.randn(2, 3, 40, 56)
    text = segmenter.text_classifier(segmenter.text_encoder.class_names)
    fast = segmenter.logits(images, text)
    with torch.no_grad():
        emb = F.normalize(segmenter.student(images), dim=1)
    plain = segmenter.alpha * torch.einsum("bchw,kc->bkhw", emb, text)
    assert fast.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5 * segmenter.alpha)


def test_pixel_norms_equal_torch_vector_norm() -> None:
    # 700 pixels: two full blocks of the kernel and a partial one; a zero embedding is clamped as F.normalize does.
    flat = torch.randn(2, 33, 700)
    flat[1, :, 5] = 0
    fast = pixel_norms(flat)
    plain = torch.linalg.vector_norm(flat, dim=1).clamp_min(1e-12)
    torch.testing.assert_close(fast, plain, rtol=1e-6, atol=0)
    assert float(fast[1, 5]) == pytest.approx(1e-12)
    torch.testing.assert_close(pixel_norms(flat.double()), plain.double(), rtol=1e-6, atol=0)  # torch's path


def reference_point_stats(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """argmax (first of equal maxima), max, and the max of the other values (the max again on a tie)."""
    top = flat.argmax(-1)
    best = flat.max(-1)
    others = flat.copy()
    np.put_along_axis(others, top[..., None], -np.inf, axis=-1)
    return top, best, others.max(-1)


@pytest.mark.parametrize("classes", [1, 2, 15, 16, 17, 20, 171, 847])  # below, at and past one step of lanes
def test_lane_point_stats_equal_argmax_and_max(classes: int) -> None:
    from clipzss.inference import _label_kernels

    rng = np.random.default_rng(classes)
    flat = rng.standard_normal((2, 300, classes)).astype(np.float32)
    flat[0, :100] = np.round(flat[0, :100] * 2) / 2  # ties everywhere
    flat[0, 100] = 1.0  # all equal: class 0, second = best
    flat[1, 7, classes // 2 :] = 50.0  # a tie between lanes and the tail
    top = np.empty(flat.shape[:2], dtype=np.int64)
    best, second = (np.empty(flat.shape[:2], dtype=np.float32) for _ in range(2))
    assert _label_kernels.point_stats(flat, top, best, second)
    want = reference_point_stats(flat)
    np.testing.assert_array_equal(top, want[0])
    np.testing.assert_array_equal(best, want[1])
    np.testing.assert_array_equal(second, want[2])
    for bad in (np.nan, np.inf, -np.inf):
        for at in (0, classes - 1):
            poisoned = flat.copy()
            poisoned[1, 299, at] = bad
            assert not _label_kernels.point_stats(poisoned, top, best, second), (bad, at)


@pytest.mark.parametrize("classes", [7, 300])  # the two block sizes of the blocked classifier
def test_blocked_classes_last_logits_equal_one_matmul(classes: int) -> None:
    flat = torch.randn(2, 24, 1100)  # not a multiple of either block
    weights = torch.randn(classes, 24)
    norm = pixel_norms(flat)[..., None]
    fast = _classes_last_logits(flat, weights, norm)
    plain = torch.einsum("bcp,kc->bpk", flat, weights) / norm
    assert fast.shape == (2, 1100, classes) and fast.is_contiguous()
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "size", [(40, 56), (70, 90)]
)  # one window (the shortcut), then 2×3 overlapping windows
def test_slide_inference_equals_plain_canvas(size: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(5, 3, generator=gen)

    def logits_fn(
        crops: torch.Tensor,
    ) -> torch.Tensor:  # (N, 5, h/4, w/4), channels last like Segmenter.logits
        small = F.avg_pool2d(crops, 4, ceil_mode=True)
        return torch.einsum("kc,nchw->nkhw", weight, small).contiguous(memory_format=torch.channels_last)

    images = torch.randn(1, 3, *size, generator=gen)
    cfg = EvalConfig(mode="slide", crop_size=48, stride=32)
    fast = infer_logits(logits_fn, images, cfg)
    plain = plain_slide(logits_fn, images, 48, 32)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    same = fast.argmax(1) == plain.argmax(1)
    assert bool((same | near_tie(plain)).all())
    resized = infer_logits(logits_fn, images, cfg, (33, 45))
    expected = F.interpolate(plain, size=(33, 45), mode="bilinear", align_corners=False)
    torch.testing.assert_close(resized, expected, rtol=1e-5, atol=1e-5)


def test_whole_inference_channels_last_equals_contiguous() -> None:
    logits = torch.randn(2, 9, 13, 17)
    whole = EvalConfig(mode="whole")
    fast = infer_logits(
        lambda _: logits.contiguous(memory_format=torch.channels_last), torch.zeros(2, 3, 52, 68), whole
    )
    plain = infer_logits(lambda _: logits, torch.zeros(2, 3, 52, 68), whole)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert bool(((fast.argmax(1) == plain.argmax(1)) | near_tie(plain)).all())


def test_predict_equals_plain_pipeline(segmenter: Segmenter) -> None:
    image = np.random.default_rng(0).integers(0, 256, (45, 60, 3), dtype=np.uint8)
    names = segmenter.text_encoder.class_names
    segmenter.eval_cfg.short_side = 45
    mask = segmenter.predict(image, names, mode="whole")
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.no_grad():
        emb = F.normalize(segmenter.student(x), dim=1)
    text = segmenter.text_classifier(names)
    logits = F.interpolate(
        segmenter.alpha * torch.einsum("bchw,kc->bkhw", emb, text), size=(45, 60), mode="bilinear"
    )
    assert bool(((torch.from_numpy(mask) == logits.argmax(1)[0]) | near_tie(logits)[0]).all())


def test_same_size_resize_is_skipped_exactly() -> None:
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 41, 3), dtype=np.uint8))
    resized = np.asarray(image.resize((41, 30), Image.BILINEAR))  # PIL's same-size resize: a copy
    x = torch.from_numpy(resized.copy()).permute(2, 0, 1).float().div(255)[None]
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    assert torch.equal(torch.from_numpy(preprocess(image, short_side=30))[None], expected)


@pytest.mark.parametrize("training", [False, True])
def test_fused_segformer_decoder_equals_smp(tiny_student_cfg: StudentConfig, training: bool) -> None:
    """Same outputs, same gradients and the same state-dict keys as smp's own SegformerDecoder."""
    from segmentation_models_pytorch.decoders.segformer.decoder import SegformerDecoder

    student = build_student(tiny_student_cfg).train(training)
    fused = student.model.decoder
    assert not isinstance(fused, SegformerDecoder)  # build_student swapped it in
    plain = SegformerDecoder.__new__(SegformerDecoder)
    nn.Module.__init__(plain)
    plain.mlp_stage, plain.fuse_stage = fused.mlp_stage, fused.fuse_stage  # the very same parameters
    images = torch.randn(2, 3, 64, 96)
    outputs, grads = [], []
    for decoder in (plain, fused):
        torch.manual_seed(0)
        student.model.decoder = decoder
        out = student(images)
        out.square().mean().backward()
        outputs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
        student.zero_grad()
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
    keys = set(student.state_dict())
    assert "model.decoder.fuse_stage.0.weight" in keys and "model.decoder.mlp_stage.0.linear.weight" in keys


# --- K-Means ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spherical", [True, False])
def test_joint_multiscale_kmeans_equals_plain_per_scale_runs(spherical: bool) -> None:
    dense = token_maps(3, 12, 12, torch.float64)
    x = dense.flatten(2).transpose(1, 2)
    inits = [window_seeds(dense, w) for w in (6, 3, 2)]
    results = kmeans_sets(x, inits, iters=6, spherical=spherical)
    for init, result in zip(inits, results, strict=True):
        labels, centroids = plain_kmeans(x, init, 6, spherical)
        assert torch.equal(result.labels, labels)
        torch.testing.assert_close(result.centroids, centroids, rtol=0, atol=1e-12)
        assert torch.equal(result.counts, F.one_hot(labels, init.shape[1]).sum(1))


def test_cpu_index_add_sums_equal_the_gpu_one_hot_matmul() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 50, 8, generator=gen, dtype=torch.float64)
    labels = torch.stack(
        [torch.randint(0, 4, (3, 50), generator=gen), torch.randint(4, 9, (3, 50), generator=gen)], -1
    )
    index_add = _cluster_sums(x, labels, 9, matmul=False)
    one_hot = _cluster_sums(x, labels, 9, matmul=True)
    expected = torch.stack(
        [F.one_hot(labels[..., s], 9).to(x.dtype).transpose(1, 2) @ x for s in range(2)]
    ).sum(0)
    torch.testing.assert_close(index_add, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(one_hot, expected, rtol=0, atol=1e-12)


def test_early_exit_equals_fixed_iterations() -> None:
    dense = token_maps(4, 16, 10, torch.float32, seed=3)
    x = dense.flatten(2).transpose(1, 2).contiguous()
    inits = [window_seeds(dense, w) for w in (5, 2)]
    centroids = F.normalize(torch.cat(inits, dim=1), dim=-1)
    sizes = [i.shape[1] for i in inits]
    labels_fixed, centroids_fixed = _lloyd(_Points(x, True, sizes), centroids, 10)
    labels_early, centroids_early = _lloyd_until_fixed(_Points(x, True, sizes), centroids, 10)
    assert torch.equal(labels_early, labels_fixed)
    torch.testing.assert_close(centroids_early, centroids_fixed, rtol=0, atol=1e-6)


def test_batched_multiscale_kmeans_equals_sklearn_loop() -> None:
    dense = token_maps(2, 8, 12, torch.float64, seed=5)
    x = dense.flatten(2).transpose(1, 2)
    windows = (6, 3)
    results = kmeans_sets(x, [window_seeds(dense, w) for w in windows], iters=8, spherical=False)
    compared = 0
    for b in range(2):
        for w, result in zip(windows, results, strict=True):
            if bool((result.counts[b] == 0).any()):
                continue  # scikit-learn relocates an empty cluster, ours keeps it: different by design
            seeds = window_seeds(dense, w)[b].numpy()
            ref = KMeans(len(seeds), init=seeds, n_init=1, max_iter=8, algorithm="lloyd", tol=0).fit(
                x[b].numpy()
            )
            np.testing.assert_array_equal(result.labels[b].numpy(), ref.labels_)
            compared += 1
    assert compared >= 3


# --- teacher and training ---------------------------------------------------------------------------------------


def test_class_query_last_block_equals_full_block(tiny_teacher_cfg: TeacherConfig) -> None:
    teacher = build_teacher(tiny_teacher_cfg, device="cpu")
    visual = teacher.model.visual
    with torch.no_grad():
        x = visual._embeds(teacher.to_clip_input(torch.randn(2, 3, 64, 64)))
        for block in visual.transformer.resblocks[:-1]:
            x = block(x)
        last = visual.transformer.resblocks[-1]
        cls, dense = _last_block(last, x)
        torch.testing.assert_close(cls, last(x)[:, 0], rtol=1e-5, atol=1e-5)
        assert torch.equal(dense, _value_path(last, x))


def test_finite_watch_names_the_first_bad_step_and_term() -> None:
    watch = FiniteWatch()
    good = {"glm": torch.tensor(1.0), "ce": torch.tensor(2.0), "loss": torch.tensor(3.0)}
    watch.update(good, 0)
    watch.check(0)  # all finite: nothing raised
    watch.update({**good, "ce": torch.tensor(float("nan")), "loss": torch.tensor(float("nan"))}, 1)
    watch.update({**good, "glm": torch.tensor(float("inf"))}, 2)  # a later failure does not replace the first
    with pytest.raises(
        NonFiniteLossError, match=r"ce, loss became non-finite at step 1 \(noticed at step 2\)"
    ):
        watch.check(2)
    fresh = FiniteWatch()
    fresh.update({**good, "glm": torch.tensor(float("-inf"))}, 7)
    with pytest.raises(NonFiniteLossError, match=r"glm became non-finite at step 7;"):
        fresh.check(7)
    FiniteWatch().check(8)  # nothing recorded: nothing raised
