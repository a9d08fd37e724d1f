"""Evaluation: confusion matrix and metrics against torchmetrics and hand-computed values, slide inference, the loop."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import re
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clipzss.config import EvalConfig
from clipzss.evaluate import ConfusionMatrix, EvalResult, compute_metrics, evaluate
from clipzss.inference.inputs import sliding_windows
from clipzss.inference.label_maps import dense_scores, label_map
from clipzss.inference.windows import (
    infer_labels,
    infer_logits,
    seen_calibrated,
    window_labels,
    window_logits,
)

# ---------------------------------------------------------------------------------------------------------------
# confusion matrix and metrics


def _random_batch(k: int, seed: int, shape=(2, 17, 23), ignore_frac: float = 0.2):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, k, shape, generator=gen)
    target[torch.rand(shape, generator=gen) < ignore_frac] = 255
    pred = torch.randint(0, k, shape, generator=gen)
    # bias towards correct so IoUs are not all tiny
    agree = torch.rand(shape, generator=gen) < 0.5
    pred = torch.where(agree & (target != 255), target, pred)
    return pred, target


def test_metrics_match_torchmetrics():
    # imported here: the spawned workers of the distributed test re-import this module and should start fast
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    k = 6
    pred, target = _random_batch(k, seed=1)
    assert set(target[target != 255].unique().tolist()) == set(range(k))
    confusion = ConfusionMatrix(k)
    confusion.update(pred[:1], target[:1])
    confusion.update(pred[1:], target[1:])  # streaming over batches sums up
    metrics = compute_metrics(confusion.matrix, [f"c{i}" for i in range(k)], seen=(0, 1, 2, 3), unseen=(4, 5))

    iou = MulticlassJaccardIndex(num_classes=k, average=None, ignore_index=255)(pred, target) * 100
    acc = MulticlassAccuracy(num_classes=k, average=None, ignore_index=255)(pred, target) * 100
    pacc = MulticlassAccuracy(num_classes=k, average="micro", ignore_index=255)(pred, target) * 100
    macc = MulticlassAccuracy(num_classes=k, average="macro", ignore_index=255)(pred, target) * 100
    torch.testing.assert_close(torch.tensor(metrics["IoU"]), iou.float(), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(metrics["Acc"]), acc.float(), atol=1e-4, rtol=0)
    assert metrics["pAcc"] == pytest.approx(float(pacc), abs=1e-4)
    assert metrics["mAcc"] == pytest.approx(float(macc), abs=1e-4)
    assert metrics["mIoU"] == pytest.approx(float(iou.mean()), abs=1e-4)
    s, u = float(iou[:4].mean()), float(iou[4:].mean())
    assert metrics["mIoU(S)"] == pytest.approx(s, abs=1e-4)
    assert metrics["mIoU(U)"] == pytest.approx(u, abs=1e-4)
    assert metrics["hIoU"] == pytest.approx(2 * s * u / (s + u), abs=1e-4)


def _mmseg_intersect_and_union(pred, label, num_classes, ignore_index=255):
    """mmseg's ``intersect_and_union`` for one image, as released (histc over the non-ignored pixels)."""
    mask = label != ignore_index
    pred, label = pred[mask], label[mask]
    intersect = pred[pred == label]
    area_intersect = torch.histc(intersect.float(), bins=num_classes, min=0, max=num_classes - 1)
    area_pred = torch.histc(pred.float(), bins=num_classes, min=0, max=num_classes - 1)
    area_label = torch.histc(label.float(), bins=num_classes, min=0, max=num_classes - 1)
    return area_intersect, area_pred + area_label - area_intersect, area_pred, area_label


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_default_metrics_equal_mmsegs_on_subsets_with_absent_classes(seed):
    # A few images of a 9-class problem where classes 6-8 never occur in the ground truth; 6 and 7 are predicted
    # (IoU 0 in mmseg), 8 is neither present nor predicted (NaN, left out by nanmean).
    k = 9
    gen = torch.Generator().manual_seed(seed)
    confusion = ConfusionMatrix(k)
    totals = [torch.zeros(k, dtype=torch.float64) for _ in range(4)]
    for _ in range(3):
        label = torch.randint(0, 6, (13, 17), generator=gen)
        label[torch.rand(13, 17, generator=gen) < 0.2] = 255
        pred = torch.randint(0, 8, (13, 17), generator=gen)
        pred = torch.where(torch.rand(13, 17, generator=gen) < 0.6, label.clamp(max=5), pred)
        confusion.update(pred[None], label[None])
        for total, area in zip(totals, _mmseg_intersect_and_union(pred, label, k)):
            total += area.double()
    inter, union, _, area_label = totals
    iou, acc = inter / union * 100, inter / area_label * 100  # total_area_to_metrics: 0/0 -> NaN
    seen, unseen = (0, 1, 2, 3, 6, 8), (4, 5, 7)
    m = compute_metrics(confusion.matrix, [f"c{i}" for i in range(k)], seen=seen, unseen=unseen)
    torch.testing.assert_close(torch.tensor(m["IoU"], dtype=torch.float64), iou, equal_nan=True)
    torch.testing.assert_close(torch.tensor(m["Acc"], dtype=torch.float64), acc, equal_nan=True)
    assert m["IoU"][6] == 0 and m["IoU"][7] == 0 and math.isnan(m["IoU"][8])
    assert m["mIoU"] == pytest.approx(float(torch.nanmean(iou)))
    assert m["mIoU(S)"] == pytest.approx(float(torch.nanmean(iou[list(seen)])))
    assert m["mIoU(U)"] == pytest.approx(float(torch.nanmean(iou[list(unseen)])))
    assert m["pAcc"] == pytest.approx(float(inter.sum() / area_label.sum() * 100))
    skip = compute_metrics(confusion.matrix, [f"c{i}" for i in range(k)], seen, unseen, absent="skip")
    assert math.isnan(skip["IoU"][6]) and skip["mIoU"] == pytest.approx(float(torch.nanmean(iou[:6])))
    with pytest.raises(ValueError, match=re.escape("eval.absent_classes='none' is not one of mmseg, skip")):
        compute_metrics(confusion.matrix, [f"c{i}" for i in range(k)], seen, unseen, absent="none")


def test_hand_computed_with_absent_class():
    # rows = ground truth, columns = prediction; class 1 never occurs in the ground truth but is predicted twice.
    matrix = torch.tensor([[6, 2, 0], [0, 0, 0], [1, 0, 3]])
    mmseg = compute_metrics(matrix, ["a", "b", "c"], seen=(0, 1), unseen=(2,))
    assert mmseg["IoU"][1] == 0 and math.isnan(mmseg["Acc"][1])  # predicted but absent: a false positive
    assert mmseg["mIoU(S)"] == pytest.approx(100 * 2 / 3 / 2)
    m = compute_metrics(matrix, ["a", "b", "c"], seen=(0, 1), unseen=(2,), absent="skip")
    assert m["IoU"][0] == pytest.approx(100 * 6 / 9)  # union = 8 gt + 7 pred - 6
    assert math.isnan(m["IoU"][1]) and math.isnan(m["Acc"][1])
    assert m["IoU"][2] == pytest.approx(75.0)  # 3 / (4 + 3 - 3)
    assert m["mIoU(S)"] == pytest.approx(100 * 2 / 3)  # class 1 left out, not counted as 0
    assert m["mIoU(U)"] == pytest.approx(75.0)
    assert m["hIoU"] == pytest.approx(100 * 12 / 17)  # 2·(2/3)·(3/4) / (2/3 + 3/4)
    assert m["mIoU"] == pytest.approx((100 * 2 / 3 + 75) / 2)
    assert m["pAcc"] == pytest.approx(75.0)  # 9 / 12
    assert m["mAcc"] == pytest.approx(75.0)


def test_hiou_edge_cases():
    names = ["a", "b"]
    no_unseen = compute_metrics(torch.tensor([[3, 1], [1, 3]]), names, seen=(0, 1), unseen=())
    assert math.isnan(no_unseen["mIoU(U)"]) and math.isnan(no_unseen["hIoU"])
    assert no_unseen["mIoU(S)"] == pytest.approx(60.0)
    all_wrong = compute_metrics(torch.tensor([[0, 4], [5, 0]]), names, seen=(0,), unseen=(1,))
    assert all_wrong["mIoU(S)"] == 0 and all_wrong["mIoU(U)"] == 0 and all_wrong["hIoU"] == 0
    with pytest.raises(ValueError, match="both seen and unseen"):
        compute_metrics(torch.eye(2), names, seen=(0, 1), unseen=(1,))
    with pytest.raises(ValueError, match="does not match 3 class names"):
        compute_metrics(torch.eye(2), ["a", "b", "c"], seen=(0,), unseen=(1,))


def test_iou_invariant_to_class_permutation():
    k = 5
    pred, target = _random_batch(k, seed=2)
    perm = torch.tensor([3, 0, 4, 1, 2])
    target_p = torch.where(target == 255, target, perm[target.clamp(max=k - 1)])
    names = [str(i) for i in range(k)]
    a, b = ConfusionMatrix(k), ConfusionMatrix(k)
    a.update(pred, target)
    b.update(perm[pred], target_p)
    iou_a = torch.tensor(compute_metrics(a.matrix, names, (0, 1, 2), (3, 4))["IoU"])
    iou_b = torch.tensor(compute_metrics(b.matrix, names, (0, 1, 2), (3, 4))["IoU"])
    torch.testing.assert_close(iou_b[perm], iou_a)


def test_ignore_pixels_never_counted():
    k = 4
    pred, target = _random_batch(k, seed=3, ignore_frac=0.5)
    confusion = ConfusionMatrix(k)
    confusion.update(pred, target)
    keep = target != 255
    assert int(confusion.matrix.sum()) == int(keep.sum())
    # whatever is predicted on ignored pixels changes nothing
    other = ConfusionMatrix(k)
    other.update(torch.where(keep, pred, (pred + 1) % k), target)
    assert torch.equal(other.matrix, confusion.matrix)
    # a custom ignore index works the same way
    custom = ConfusionMatrix(k, ignore_index=-1)
    custom.update(pred, torch.where(keep, target, -1))
    assert torch.equal(custom.matrix, confusion.matrix)
    confusion.reset()
    assert int(confusion.matrix.sum()) == 0


@pytest.mark.parametrize(
    ("pred_value", "target_value", "message"),
    [(0, 7, "target holds class id 7"), (0, -3, "target holds class id -3"), (9, 1, "pred holds class id 9")],
)
def test_update_rejects_out_of_range_ids(pred_value, target_value, message):
    confusion = ConfusionMatrix(5)
    pred = torch.zeros(1, 2, 2, dtype=torch.long)
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    pred[0, 1, 1], target[0, 1, 1] = pred_value, target_value
    with pytest.raises(ValueError, match=message):
        confusion.update(pred, target)


def test_update_rejects_bad_inputs():
    confusion = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="does not match target shape"):
        confusion.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer class ids"):
        confusion.update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------------
# inference


def _conv_fn(k: int = 4):
    """A fixed pointwise (1x1 conv) logits_fn: translation-equivariant, so slide and whole inference agree."""
    conv = torch.nn.Conv2d(3, k, 1)
    return lambda x: conv(x).detach()


def _stride4_fn(k: int = 4):
    """A 1x1 conv on a 4x average-pooled image: logits at output stride 4 like the student."""
    conv = torch.nn.Conv2d(3, k, 1)
    return lambda x: conv(F.avg_pool2d(x, 4, ceil_mode=True)).detach()


def whole_inference(fn, images, out_size=None):
    return infer_logits(fn, images, EvalConfig(mode="whole"), out_size)


def slide_inference(fn, images, crop_size, stride, out_size=None, window_batch=8):
    cfg = EvalConfig(mode="slide", crop_size=crop_size, stride=stride)
    plan, logits = window_logits(fn, images, cfg, out_size, window_batch=window_batch)
    scores = torch.stack([torch.as_tensor(dense_scores(plan, x)) for x in logits]).permute(0, 3, 1, 2)
    labels = infer_labels(fn, images, cfg, out_size)
    assert torch.equal(labels, scores.argmax(1))  # the labels every path uses are these scores' argmax
    return scores


@pytest.mark.parametrize(("h", "w"), [(37, 53), (16, 16), (10, 12), (9, 40)])
def test_slide_equals_whole_for_equivariant_fn(h, w):
    fn = _conv_fn()
    images = torch.randn(2, 3, h, w)
    whole = whole_inference(fn, images)
    slide = slide_inference(fn, images, crop_size=16, stride=11, window_batch=3)
    assert slide.shape == (2, 4, h, w)
    torch.testing.assert_close(slide, whole, atol=1e-5, rtol=1e-5)
    out = (2 * h + 1, w + 3)
    torch.testing.assert_close(
        slide_inference(fn, images, 16, 11, out_size=out),
        whole_inference(fn, images, out),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize(("h", "w", "crop", "stride"), [(10, 12, 16, 11), (37, 53, 16, 11), (50, 50, 20, 7)])
def test_sliding_windows_cover_every_pixel(h, w, crop, stride):
    windows = sliding_windows(h, w, crop, stride)
    rows = max(math.ceil((h - crop) / stride), 0) + 1
    cols = max(math.ceil((w - crop) / stride), 0) + 1
    assert len(windows) == rows * cols
    count = torch.zeros(h, w)
    for y1, y2, x1, x2 in windows:
        assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
        assert (y2 - y1, x2 - x1) == (min(crop, h), min(crop, w))
        count[y1:y2, x1:x2] += 1
    assert bool((count > 0).all())
    assert max(y2 for _, y2, _, _ in windows) == h and max(x2 for *_, x2 in windows) == w
    # a logits_fn of ones gives exactly one everywhere only if the overlap count divides correctly
    ones = slide_inference(
        lambda x: x.new_ones(x.shape[0], 2, x.shape[2], x.shape[3]), torch.zeros(1, 3, h, w), crop, stride
    )
    torch.testing.assert_close(ones, torch.ones(1, 2, h, w))


def test_stride4_logits():
    fn = _stride4_fn()
    # a constant image: pooled features are constant, so every pixel gets the same logits in both modes
    images = torch.randn(1, 3, 1, 1).expand(1, 3, 30, 45).contiguous()
    expected = fn(images[:, :, :4, :4])[:, :, :1, :1].expand(1, 4, 30, 45)
    slide = slide_inference(fn, images, crop_size=16, stride=10)
    torch.testing.assert_close(slide, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(whole_inference(fn, images, (30, 45)), expected, atol=1e-5, rtol=1e-5)
    random = slide_inference(fn, torch.randn(2, 3, 30, 45), crop_size=16, stride=10, out_size=(61, 90))
    assert random.shape == (2, 4, 61, 90) and bool(torch.isfinite(random).all())


# ---------------------------------------------------------------------------------------------------------------
# evaluate()


class TinySegDataset(torch.utils.data.Dataset):
    """Images at half the mask resolution; channel 0 holds the class id so an oracle can read it back."""

    class_names = ("sky", "road", "cow")
    seen = (0, 1)
    unseen = (2,)

    def __init__(self):
        self.labels, self.masks = [], []
        for i in range(3):
            labels = torch.zeros(16, 24, dtype=torch.long)  # class 0 (sky): top half
            labels[8:, :] = 1  # road: bottom half
            labels[8:, 8 * i : 8 * i + 8] = 2  # cow: one 8x8 block, somewhere else in each image
            mask = labels.clone()
            mask[0, :4] = 255  # a few ignored pixels (the image still shows sky there)
            self.labels.append(labels)
            self.masks.append(mask)

    def __len__(self):
        return len(self.masks)

    def __getitem__(self, index):
        mask = self.masks[index]
        ids = self.labels[index][
            ::2, ::2
        ].float()  # (8, 12): the resized image keeps the class blocks aligned
        image = torch.stack([ids, torch.zeros_like(ids), torch.ones_like(ids)])
        return {"image": image, "mask": mask, "name": f"img{index}"}


def _oracle(x):
    return F.one_hot(x[:, 0].round().long(), 3).permute(0, 3, 1, 2).float() * 10  # (B, 3, h, w)


def _always_sky(x):
    logits = torch.zeros(x.shape[0], 3, x.shape[2] // 4 + 1, x.shape[3] // 4 + 1)
    logits[:, 0] = 1
    return logits


@pytest.mark.parametrize("mode", ["slide", "whole"])
def test_evaluate_oracle_is_perfect(mode):
    cfg = EvalConfig(mode=mode, crop_size=6, stride=4)
    result = evaluate(_oracle, TinySegDataset(), cfg, progress=False)
    assert result.num_images == 3
    for key in ("pAcc", "mAcc", "mIoU(S)", "mIoU(U)", "hIoU", "mIoU"):
        assert result.metrics[key] == pytest.approx(100.0), key
    assert [row["split"] for row in result.per_class] == ["seen", "seen", "unseen"]


def test_evaluate_constant_prediction_and_save(tmp_path: Path):
    # per image: 192 sky (minus 4 ignored) = 188, road 128, cow 64 -> over 3 images 564 / 384 / 192 pixels
    result = evaluate(
        _always_sky, TinySegDataset(), EvalConfig(mode="slide", crop_size=8, stride=5), progress=False
    )
    sky = 564 / (564 + 384 + 192) * 100
    assert result.metrics["pAcc"] == pytest.approx(sky)
    assert [row["IoU"] for row in result.per_class] == pytest.approx([sky, 0.0, 0.0])
    assert result.metrics["mAcc"] == pytest.approx(100 / 3)
    assert result.metrics["mIoU(S)"] == pytest.approx(sky / 2)
    assert result.metrics["mIoU(U)"] == 0 and result.metrics["hIoU"] == 0
    assert result.metrics["mIoU"] == pytest.approx(sky / 3)

    # max_images: only the first image, where the cow block sits in columns 0-7 of the mask
    one = evaluate(_always_sky, TinySegDataset(), EvalConfig(mode="whole", max_images=1), progress=False)
    assert one.num_images == 1 and one.metrics["pAcc"] == pytest.approx(188 / 380 * 100)

    # a class absent from the ground truth: NaN in memory, null in JSON, empty in CSV
    result = EvalResult.from_matrix(
        torch.tensor([[5, 1], [0, 0]]), ["sky", "cow"], seen=(0,), unseen=(1,), absent="skip"
    )
    table = result.format_table()
    assert "hIoU" in table and "cow" in table and "unseen" in table
    json_path, csv_path = result.save(tmp_path / "out")
    data = json.loads(json_path.read_text())
    assert data["summary"]["mIoU(U)"] is None and data["summary"]["hIoU"] is None
    assert data["summary"]["mIoU(S)"] == pytest.approx(500 / 6)
    assert data["per_class"][1] == {"name": "cow", "split": "unseen", "IoU": None, "Acc": None}
    rows = list(csv.DictReader(csv_path.open()))
    assert rows[0]["name"] == "sky" and float(rows[0]["IoU"]) == pytest.approx(500 / 6)
    assert rows[1]["IoU"] == ""


def test_evaluate_rejects_wrong_class_count():
    with pytest.raises(ValueError, match="returned 2 channels"):
        evaluate(lambda x: x[:, :2], TinySegDataset(), EvalConfig(mode="whole"), progress=False)


# ---------------------------------------------------------------------------------------------------------------
# distributed


def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        confusion = ConfusionMatrix(4)
        pred, target = _random_batch(4, seed=10 + rank)
        confusion.update(pred, target)
        confusion.all_reduce()
        result = evaluate(_always_sky, TinySegDataset(), EvalConfig(mode="whole"), progress=False)
        torch.save(
            {"matrix": confusion.matrix, "metrics": result.metrics, "n": result.num_images},
            f"{out_dir}/{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_all_reduce_across_two_processes(tmp_path: Path):
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    expected = ConfusionMatrix(4)
    for rank in range(2):
        expected.update(*_random_batch(4, seed=10 + rank))
    single = evaluate(_always_sky, TinySegDataset(), EvalConfig(mode="whole"), progress=False)
    for rank in range(2):
        out = torch.load(tmp_path / f"{rank}.pt")
        assert torch.equal(out["matrix"], expected.matrix)
        assert out["n"] == 3  # ranks split the 3 images 2 + 1 and the count is summed
        assert out["metrics"] == pytest.approx(single.metrics)
    local = ConfusionMatrix(4)
    local.update(*_random_batch(4, seed=10))
    assert not torch.equal(local.matrix, expected.matrix)  # the ranks really saw different data


def test_seen_calibration_is_reported_beside_the_plain_figures(tmp_path: Path):
    # Cow (unseen, id 2) scores just below sky (seen) everywhere: plain argmax says sky, ZegCLIP's calibration
    # (sigmoid, seen classes lowered by γ) says cow, and the plain figures stay as they were.
    def close_call(x):
        logits = torch.full((x.shape[0], 3, x.shape[2], x.shape[3]), -5.0)
        logits[:, 0], logits[:, 2] = 0.3, 0.0
        return logits

    data = TinySegDataset()
    plain = evaluate(close_call, data, EvalConfig(mode="whole"), progress=False)
    both = evaluate(close_call, data, EvalConfig(mode="whole", seen_gamma=0.1), progress=False)
    assert plain.calibrated is None and both.metrics == plain.metrics
    assert both.calibrated is not None and both.seen_gamma == 0.1
    assert plain.metrics["mIoU(U)"] == 0 and both.calibrated.metrics["mIoU(U)"] > 0
    assert both.calibrated.metrics["mIoU(S)"] == 0  # every pixel went to cow
    assert "calibrated (seen - 0.1)" in both.summary_line()
    saved = json.loads(both.save(tmp_path)[0].read_text())
    assert saved["calibrated"]["seen_gamma"] == 0.1 and saved["summary"]["mIoU(U)"] == 0
    with pytest.raises(ValueError, match=re.escape("eval.seen_gamma must be a number >= 0")):
        evaluate(close_call, data, EvalConfig(mode="whole", seen_gamma=-1.0), progress=False)


def test_approximate_labels_are_opt_in_and_marked(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    # eval.label_candidates = m > 0 trades exactness for speed: the result says so in its line and its file,
    # and with m >= K (every class a candidate) the figures are the exact ones.
    fn = _stride4_fn(k=3)
    data = TinySegDataset()
    exact = evaluate(fn, data, EvalConfig(mode="whole"), progress=False)
    with caplog.at_level(logging.WARNING, logger="clipzss.evaluate"):
        approx = evaluate(fn, data, EvalConfig(mode="whole", label_candidates=3), progress=False)
    assert "approximate labels" in caplog.text
    assert approx.metrics == exact.metrics and "approximate_labels" not in exact.extra
    assert approx.summary_line().endswith("(approximate labels, 3 candidates)")
    saved = json.loads(approx.save(tmp_path)[0].read_text())
    assert saved["approximate_labels"] == {"label_candidates": 3}
    for bad in (-1, 2.0):
        with pytest.raises(ValueError, match=re.escape("eval.label_candidates must be an integer >= 0")):
            evaluate(fn, data, EvalConfig(mode="whole", label_candidates=bad), progress=False)
    with pytest.raises(ValueError, match=re.escape("eval.label_candidates must be an integer >= 0")):
        window_labels(
            fn, torch.randn(1, 3, 16, 16), EvalConfig(mode="whole", label_candidates=-2)
        )  # predict's
    # slide labels streamed in bands take the same option: m >= K gives the exact labels
    images = torch.randn(1, 3, 60, 40)
    cfg = EvalConfig(mode="slide", crop_size=16, stride=11)
    fn5 = _stride4_fn(k=5)
    (plain,), _ = window_labels(fn5, images, cfg)
    (all_five,), _ = window_labels(fn5, images, dataclasses.replace(cfg, label_candidates=5))
    (two,), _ = window_labels(fn5, images, dataclasses.replace(cfg, label_candidates=2))
    assert torch.equal(all_five, plain) and (two == plain).float().mean() >= 0.98


def test_window_batches_shrink_to_the_logits_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    # A first window alone, then batches bounded by WINDOW_BATCH_BYTES; the logits do not depend on the batching.
    import clipzss.inference.label_maps as label_maps_module

    fn = _stride4_fn(k=6)
    calls: list[int] = []

    def counted(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return fn(x)

    images = torch.randn(2, 3, 40, 70)
    cfg = EvalConfig(mode="slide", crop_size=16, stride=11)
    _, default = window_logits(counted, images, cfg, window_batch=4)
    windows = len(sliding_windows(40, 70, 16, 11))
    assert calls[0] == 2 and max(calls) == 2 * 4 and sum(calls) == 2 * windows  # B = 2 images per window
    per_window = 2 * 4 * 4 * 6 * 4  # B × (16/4)² × K float32 bytes
    monkeypatch.setattr(label_maps_module, "WINDOW_BATCH_BYTES", 2 * per_window)
    calls.clear()
    _, bounded = window_logits(counted, images, cfg, window_batch=4)
    assert calls == [2] + [4] * ((windows - 1) // 2) + [2] * ((windows - 1) % 2)
    torch.testing.assert_close(bounded, default, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("size", "crop", "stride", "out"),
    [
        ((60, 40), 16, 11, None),  # 5 rows of windows, two read at a time
        ((60, 40), 16, 11, (83, 29)),  # resized up in rows, down in columns
        ((61, 30), 16, 6, (40, 30)),  # deep overlap: up to three rows per output row
        ((48, 20), 16, 16, None),  # no overlap: every band reads one row
        ((60, 16), 16, 11, None),  # one column: single-window bands
        ((60, 16), 16, 11, (45, 20)),
    ],
)
def test_streamed_rows_of_windows_equal_the_whole_image_labels(size, crop, stride, out) -> None:
    # window_labels runs the rows of windows in order and labels bands as their rows come in; the labels must be
    # those of the whole image's logits, for plain and transformed scores, and every window runs exactly once.
    fn = _stride4_fn(k=5)
    images = torch.randn(2, 3, *size)
    calls: list[int] = []

    def counted(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return (fn(x) * 4).round() / 4  # quantised: ties between classes everywhere

    cfg = EvalConfig(mode="slide", crop_size=crop, stride=stride)
    shift = partial(seen_calibrated, shift=torch.tensor([0.0, 0.5, 0.0, 0.0, 0.5]))
    (plain, shifted), classes = window_labels(counted, images, cfg, out, (None, shift))
    windows = sliding_windows(*size, crop, stride)
    assert classes == 5 and sum(calls) == 2 * len(windows)
    plan, logits = window_logits(counted, images, cfg, out)
    for i in range(2):
        assert torch.equal(plain[i], torch.as_tensor(label_map(plan, logits[i])))
        assert torch.equal(shifted[i], torch.as_tensor(label_map(plan, logits[i], shift)))
        assert torch.equal(plain[i], torch.as_tensor(dense_scores(plan, logits[i])).argmax(-1))
