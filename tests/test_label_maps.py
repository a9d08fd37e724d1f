"""Labels straight from low-resolution logits (`clipzss.inference.label_maps`) equal the dense reference's argmax exactly.

The reference (`dense_scores`) is checked against torch's own bilinear kernels (its weights bitwise, its values to
float rounding); the shortcut (`label_map`) is checked against the reference bit for bit on smooth, tied,
near-tied, extreme and non-finite logits, on every plan shape (whole, one window, overlapping windows, a canvas
resized up or down), and on the logits of a student on real CamVid and VOC images.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import clipzss.inference.label_maps as lm
from clipzss.config import EvalConfig, StudentConfig
from clipzss.inference.inputs import preprocess, sliding_windows
from clipzss.inference.label_maps import (
    AxisMap,
    dense_labels,
    dense_scores,
    label_map,
    label_map_with_stats,
    slide_plan,
    whole_plan,
)
from clipzss.inference.windows import infer_labels, infer_logits, window_logits
from clipzss.models.student import build_student


def smooth_logits(k: int, h: int, w: int, n: int = 1, cell: int = 6, scale: float = 3.0, seed: int = 0):
    """(n, h, w, K) logits that vary over ``cell`` low-resolution points: class boundaries everywhere."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, k, max(2, h // cell), max(2, w // cell), generator=gen)
    logits = F.interpolate(base, size=(h, w), mode="bilinear", align_corners=False) * scale
    return logits.permute(0, 2, 3, 1).contiguous().numpy()


def torch_pipeline(logits: np.ndarray, plan_kind: str, image: tuple[int, int], out: tuple[int, int], windows):
    """The pipeline written with torch's F.interpolate: the computation the reference is defined to follow."""
    t = torch.from_numpy(logits).permute(0, 3, 1, 2)
    if plan_kind == "whole":
        return F.interpolate(t, size=out, mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    win_h, win_w = windows[0][1] - windows[0][0], windows[0][3] - windows[0][2]
    canvas, count = torch.zeros(t.shape[1], *image), torch.zeros(1, *image)
    for i, (y1, y2, x1, x2) in enumerate(windows):
        canvas[:, y1:y2, x1:x2] += F.interpolate(
            t[i : i + 1], size=(win_h, win_w), mode="bilinear", align_corners=False
        )[0]
        count[:, y1:y2, x1:x2] += 1
    canvas = canvas / count
    if tuple(out) != tuple(image):
        canvas = F.interpolate(canvas[None], size=out, mode="bilinear", align_corners=False)[0]
    return canvas.permute(1, 2, 0).numpy()


# (kind, image size (slide) or low-res size (whole), output size, crop, stride)
GEOMETRIES = [
    ("whole", (32, 32), (128, 128), None, None),  # the student's stride 4
    ("whole", (32, 43), (90, 120), None, None),  # a CamVid frame's proportions, upsampled by 2.8
    ("whole", (13, 17), (50, 70), None, None),
    ("whole", (40, 50), (30, 41), None, None),  # downsampling
    ("whole", (5, 7), (5, 7), None, None),  # same size
    ("slide", (128, 171), (90, 120), 128, 85),  # two windows, the canvas resized down (CamVid in eval)
    ("slide", (60, 90), (60, 90), 32, 20),  # a 3×4 grid, no resize
    ("slide", (60, 90), (45, 70), 32, 20),
    ("slide", (40, 40), (50, 50), 48, 32),  # one window (the image), resized up
    ("slide", (100, 37), (100, 37), 32, 11),  # deep overlaps (up to 3 windows per axis)
]


def build(kind, size, out, crop, stride, k: int, **kw):
    if kind == "whole":
        return whole_plan(size, out), smooth_logits(k, *size, **kw), None
    windows = sliding_windows(size[0], size[1], crop, stride)
    win_h, win_w = windows[0][1] - windows[0][0], windows[0][3] - windows[0][2]
    low = (-(-win_h // 4), -(-win_w // 4))
    return slide_plan(size, windows, low, out), smooth_logits(k, *low, n=len(windows), **kw), windows


# ---------------------------------------------------------------------------------------------- the reference


@pytest.mark.parametrize(("n_in", "n_out"), [(128, 360), (171, 480), (128, 512), (50, 30), (7, 7), (1, 5)])
def test_axis_map_weights_are_torchs(n_in: int, n_out: int) -> None:
    # One-hot rows through torch's kernel give its weights exactly: ours must be the same floats.
    basis = torch.eye(n_in)[:, None, None, :]
    weights = F.interpolate(basis, size=(1, n_out), mode="bilinear", align_corners=False)[
        :, 0, 0, :
    ].T.numpy()
    amap = AxisMap.bilinear(n_in, n_out)
    ours = np.zeros((n_out, n_in), dtype=np.float32)
    np.add.at(ours, (np.arange(n_out), amap.i0), amap.w0)
    np.add.at(ours, (np.arange(n_out), amap.i1), amap.w1)
    np.testing.assert_array_equal(ours, weights)


@pytest.mark.parametrize(("kind", "size", "out", "crop", "stride"), GEOMETRIES)
def test_dense_scores_follow_torch_interpolate(kind, size, out, crop, stride) -> None:
    plan, logits, windows = build(kind, size, out, crop, stride, k=7)
    expected = torch_pipeline(logits, kind, size, out, windows)
    got = dense_scores(plan, logits)
    assert got.shape == (*out, 7) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * np.abs(logits).max())


def test_dense_scores_run_on_torch_tensors_and_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    plan, logits, _ = build("slide", (60, 90), (45, 70), 32, 20, k=5)
    full = dense_scores(plan, logits)
    np.testing.assert_array_equal(dense_scores(plan, torch.from_numpy(logits)).numpy(), full)
    monkeypatch.setattr(lm, "DENSE_TILE_VALUES", 5 * 70 * 3)  # three output rows per tile
    np.testing.assert_array_equal(dense_labels(plan, logits), full.argmax(-1))


# ----------------------------------------------------------------------------------------------- the shortcut


def assert_exact(plan, logits) -> dict[str, int]:
    labels, stats = label_map_with_stats(plan, logits.copy())
    expected = dense_scores(plan, logits).argmax(-1)
    assert labels.dtype == np.int64 and labels.shape == plan.out_size
    mismatch = int((labels != expected).sum())
    assert mismatch == 0, f"{mismatch} pixels differ from the reference ({stats})"
    return stats


@pytest.mark.parametrize(("kind", "size", "out", "crop", "stride"), GEOMETRIES)
@pytest.mark.parametrize("k", [2, 20, 171])
@pytest.mark.parametrize("cell", [3, 30])
def test_label_map_equals_reference(kind, size, out, crop, stride, k: int, cell: int) -> None:
    plan, logits, _ = build(kind, size, out, crop, stride, k=k, cell=cell, seed=k + cell)
    stats = assert_exact(plan, logits)
    units = stats["settled"] + stats["one_candidate"] + stats["pixel_values"]
    assert units > 0 and "dense" not in stats


@pytest.mark.parametrize(("kind", "size", "out", "crop", "stride"), GEOMETRIES[:2] + GEOMETRIES[5:7])
def test_label_map_breaks_ties_like_argmax(kind, size, out, crop, stride) -> None:
    plan, logits, _ = build(kind, size, out, crop, stride, k=6)
    quantised = np.round(logits).astype(np.float32)  # few distinct values: exact ties everywhere
    assert_exact(plan, quantised)
    assert_exact(plan, np.zeros_like(logits))  # all classes equal: class 0 everywhere
    assert (label_map(plan, np.zeros_like(logits)) == 0).all()
    doubled = np.concatenate([logits, logits], axis=-1)  # classes k and k + 6 always tie: the lower id wins
    labels = label_map(plan, doubled)
    assert labels.max() < 6
    assert_exact(plan, doubled)


@pytest.mark.parametrize(("kind", "size", "out", "crop", "stride"), GEOMETRIES[:2] + GEOMETRIES[5:7])
def test_label_map_near_ties_and_extreme_magnitudes(kind, size, out, crop, stride) -> None:
    plan, logits, _ = build(kind, size, out, crop, stride, k=8, cell=30)
    near = logits.copy()
    near[..., 1] = np.nextafter(near[..., 0], np.float32(np.inf))  # class 1 one ulp above class 0 everywhere
    near[..., 2] = np.nextafter(near[..., 0], np.float32(-np.inf))
    assert_exact(plan, near)
    rng = np.random.default_rng(0)
    noisy = logits + rng.uniform(-1e-6, 1e-6, logits.shape).astype(np.float32)
    noisy[..., 3] = noisy[..., 4]  # an exact tie on top of the noise
    assert_exact(plan, noisy)
    for scale in (1e30, 1e-30, 1e-40):  # huge, tiny and subnormal logits
        assert_exact(plan, (logits * np.float32(scale)).astype(np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_label_map_non_finite_logits_take_the_dense_path(bad: float) -> None:
    plan, logits, _ = build("whole", (13, 17), (50, 70), None, None, k=4)
    logits[0, 3, 5, 2] = bad
    labels, stats = label_map_with_stats(plan, logits)
    assert stats == {"dense": 1}
    np.testing.assert_array_equal(labels, dense_labels(plan, logits))


@settings(max_examples=25, deadline=None)
@given(
    low=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    out=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    k=st.integers(1, 9),
    levels=st.integers(2, 6),
    seed=st.integers(0, 2**16),
)
def test_label_map_equals_reference_on_random_whole_plans(low, out, k, levels, seed) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.integers(0, levels, (1, *low, k)).astype(np.float32) * np.float32(0.5)  # coarse: many ties
    assert_exact(whole_plan(low, out), logits)


@settings(max_examples=15, deadline=None)
@given(
    image=st.tuples(st.integers(8, 60), st.integers(8, 60)),
    crop=st.integers(8, 32),
    stride=st.integers(3, 24),
    out=st.tuples(st.integers(4, 70), st.integers(4, 70)),
    seed=st.integers(0, 2**16),
)
def test_label_map_equals_reference_on_random_slide_plans(image, crop, stride, out, seed) -> None:
    stride = min(stride, crop)  # a larger stride leaves gaps (slide_plan refuses it)
    windows = sliding_windows(image[0], image[1], crop, stride)
    win_h, win_w = windows[0][1] - windows[0][0], windows[0][3] - windows[0][2]
    low = (-(-win_h // 4), -(-win_w // 4))
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(windows), *low, 5)).astype(np.float32)
    assert_exact(slide_plan(image, windows, low, out), logits)


def test_label_map_inputs() -> None:
    plan, logits, _ = build("whole", (13, 17), (50, 70), None, None, k=4)
    from_torch = label_map(plan, torch.from_numpy(logits))
    assert isinstance(from_torch, torch.Tensor) and from_torch.dtype == torch.int64
    np.testing.assert_array_equal(from_torch.numpy(), label_map(plan, logits))
    assert (label_map(plan, logits[..., :1]) == 0).all()  # one class
    with pytest.raises(ValueError, match=r"do not fit the plan's 1 windows of \(13, 17\)"):
        label_map(plan, logits[:, :5])
    with pytest.raises(ValueError, match="leave pixel 8 of 20 uncovered"):
        slide_plan((8, 20), sliding_windows(8, 20, 8, 9), (2, 2), (8, 20))
    with pytest.raises(ValueError, match="grid"):
        slide_plan((40, 40), [(0, 20, 0, 20), (20, 40, 20, 40)], (5, 5), (40, 40))
    # A transform (ZegCLIP's seen-class calibration) takes the dense path on the logits' own backend.
    shift = torch.tensor([0.0, 0.5, 0.0, 0.5])
    calibrated = label_map(plan, torch.from_numpy(logits), lambda s: s.sigmoid() - shift)
    expected = (torch.from_numpy(dense_scores(plan, logits)).sigmoid() - shift).argmax(-1)
    assert torch.equal(calibrated, expected)


@pytest.mark.parametrize(("kind", "size", "out", "crop", "stride"), GEOMETRIES)
def test_approximate_labels_with_every_class_shortlisted_are_exact(kind, size, out, crop, stride) -> None:
    # candidates = m: only each point's m best classes compete where a unit is open. With m >= K nothing is left
    # out, so the labels are the exact ones (ties included); with m = 2 nearly all are.
    plan, logits, _ = build(kind, size, out, crop, stride, k=7, cell=3)
    exact = label_map(plan, logits)
    np.testing.assert_array_equal(label_map(plan, logits, candidates=7), exact)
    np.testing.assert_array_equal(
        label_map(plan, logits, candidates=9), exact
    )  # more than K: the best repeats
    quantised = np.round(logits).astype(np.float32)
    np.testing.assert_array_equal(label_map(plan, quantised, candidates=7), label_map(plan, quantised))
    labels, stats = label_map_with_stats(plan, logits, candidates=2)
    assert stats["settled"] > 0 and (labels == exact).mean() >= 0.98
    one = label_map(plan, logits, candidates=1)  # a class can win only where it is some point's best
    tops = set(np.unique(logits.argmax(-1)))
    assert set(np.unique(one)) <= tops


def test_approximate_labels_inputs() -> None:
    plan, logits, _ = build("whole", (13, 17), (50, 70), None, None, k=4)
    from_torch = label_map(plan, torch.from_numpy(logits), candidates=2)
    np.testing.assert_array_equal(from_torch.numpy(), label_map(plan, logits, candidates=2))
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=r"candidates must be an integer >= 0 \(0: exact labels\)"):
            label_map(plan, logits, candidates=bad)
    logits[0, 0, 0, 0] = np.nan  # the dense path is exact whatever the candidates
    np.testing.assert_array_equal(label_map(plan, logits, candidates=1), dense_labels(plan, logits))


# ------------------------------------------------------------------------------------------------- real images


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    cfg = StudentConfig(arch="Segformer", encoder="mit_b0", weights=None, embed_dim=32)
    return build_student(cfg, for_training=False).eval()


@pytest.fixture(scope="module")
def embed(student) -> Callable[[torch.Tensor], torch.Tensor]:
    """The student's normalised embeddings of a batch of crops, each distinct crop run through it once.

    Every path compared below (labels, reference scores, approximate labels, torch's kernels) then reads the same
    window logits, whatever its batches of windows, and the network runs once per window for all class counts.
    """
    seen: dict[tuple[tuple[int, ...], bytes], torch.Tensor] = {}

    def run(crops: torch.Tensor) -> torch.Tensor:
        keys = [(tuple(c.shape), c.contiguous().numpy().tobytes()) for c in crops]
        missing = list(dict.fromkeys(key for key in keys if key not in seen))
        if missing:
            fresh = F.normalize(student(crops[[keys.index(key) for key in missing]]), dim=1)
            seen.update(zip(missing, fresh, strict=True))
        return torch.stack([seen[key] for key in keys])

    return run


def real_images(shared: Path) -> list[Image.Image]:
    camvid = sorted((shared / "camvid" / "val" / "images").glob("*"))[:2]
    voc = sorted((shared / "voc-sample" / "VOC2012" / "JPEGImages").glob("*.jpg"))[:1]
    return [Image.open(p).convert("RGB") for p in camvid + voc]


@pytest.mark.parametrize("mode", ["whole", "slide"])
@pytest.mark.parametrize("k", [20, 171])
def test_real_images_labels_equal_reference_and_torch(shared_data: Path, embed, mode: str, k: int) -> None:
    text = F.normalize(torch.randn(k, 32, generator=torch.Generator().manual_seed(k)), dim=1) / 0.07

    def logits_fn(x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,kc->bkhw", embed(x), text).contiguous(memory_format=torch.channels_last)

    cfg = EvalConfig(mode=mode, crop_size=192, stride=128, short_side=192)
    with torch.inference_mode():
        for image in real_images(shared_data):
            x = torch.from_numpy(preprocess(image, cfg.short_side))[None]
            size = (image.height, image.width)
            labels = infer_labels(logits_fn, x, cfg, size)
            scores = infer_logits(logits_fn, x, cfg, size)
            assert labels.shape == (1, *size)
            assert torch.equal(labels, scores.argmax(1))  # the shortcut is the reference's argmax, exactly
            approximate = infer_labels(logits_fn, x, dataclasses.replace(cfg, label_candidates=2), size)
            assert (approximate == labels).float().mean() >= 0.995  # opt-in approximate labels (m = 2)
            # ... and torch's kernels give the same masks except where the top two scores are within rounding.
            _plan, low = window_logits(logits_fn, x, cfg, size)
            t = torch.from_numpy(
                torch_pipeline(low[0].numpy(), mode, tuple(x.shape[-2:]), size, _windows(x, cfg))
            )
            top2 = t.topk(2, dim=-1).values
            close = (top2[..., 0] - top2[..., 1]) < 1e-4
            assert bool(((t.argmax(-1) == labels[0]) | close).all())


def _windows(x: torch.Tensor, cfg: EvalConfig):
    return sliding_windows(x.shape[-2], x.shape[-1], cfg.crop_size, cfg.stride)


def test_row_bands_of_a_cityscapes_image() -> None:
    windows = sliding_windows(1024, 2048, 512, 341)
    bands = lm.row_bands(lm.slide_plan((1024, 2048), windows, (128, 128), (1024, 2048)))
    assert [(b.first, b.last, b.out_start, b.out_stop) for b in bands] == [
        (0, 0, 0, 341), (0, 1, 341, 512), (1, 2, 512, 853), (2, 2, 853, 1024)
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("width", "out"), [(45, (70, 45)), (45, (97, 45)), (45, (40, 60)), (16, (70, 16)), (16, (51, 9))]
)  # 16: one column of windows, single-window bands
def test_band_plans_give_the_full_scores_bit_for_bit(width: int, out: tuple[int, int]) -> None:
    windows = sliding_windows(70, width, 16, 7)
    plan = lm.slide_plan((70, width), windows, (4, 4), out)
    logits = np.random.default_rng(1).standard_normal((plan.num_windows, 4, 4, 6)).astype(np.float32)
    cols = len(plan.cols.starts)
    full = lm.dense_scores(plan, logits)
    bands = lm.row_bands(plan)
    assert bands[0].out_start == 0 and bands[-1].out_stop == out[0]
    assert all(a.out_stop == b.out_start for a, b in itertools.pairwise(bands))
    for band in bands:
        part = logits[band.first * cols : (band.last + 1) * cols]
        scores = lm.dense_scores(lm.band_plan(plan, band), part)
        np.testing.assert_array_equal(scores, full[band.out_start : band.out_stop])
        assert np.array_equal(lm.label_map(lm.band_plan(plan, band), part), scores.argmax(-1))


def test_held_rows_keep_the_rows_later_bands_read() -> None:
    first = np.full((1, 1, 2, 2, 3), 0.0, np.float32)
    held = lm._HeldRows(first, depth=2, cols=2)

    def row(r: int) -> np.ndarray:  # the logits of a row of two windows, all equal to r
        return np.full((1, 2, 2, 2, 3), r, np.float32)

    held.add_row(0, [first, row(0)[:, 1:]])
    held.add_row(1, [row(1)])
    with pytest.raises(ValueError, match="no room for window row 2"):
        held.add_row(2, [row(2)])
    held.drop_before(1)
    held.add_row(2, [row(2)[:, :1], row(2)[:, 1:]])
    assert held._logits.shape[1] == 4  # two rows, never more
    np.testing.assert_array_equal(held.rows(1, 2)[0, :, 0, 0, 0], [1, 1, 2, 2])
    with pytest.raises(ValueError, match="window row 4 does not follow the held rows, 1 to 2"):
        held.add_row(4, [row(4)])
    held.drop_before(4)  # rows 1..3 are read by no later band (row 3 never run)
    held.add_row(4, [row(4)])
    np.testing.assert_array_equal(held.rows(4, 4)[0, :, 0, 0, 0], [4, 4])
