"""Evaluation reports and TensorBoard figures: hand-computed confusions, readable figures, camvid val end to end."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("matplotlib")

from clipzss.cli import build_parser, main
from clipzss.config import DataConfig, EvalConfig
from clipzss.data import SyntheticScenes, build_eval_dataset
from clipzss.evaluate import EvalResult, evaluate
from clipzss.models.segmenter import Segmenter
from clipzss.report import (
    SPLIT_COLOURS,
    collect_examples,
    confusion_figure,
    figure_to_array,
    iou_figure,
    log_to_tensorboard,
    top_confusions,
    write_report,
)

NAMES = ("road", "car", "tree")


def _result() -> EvalResult:
    matrix = torch.tensor([[80, 15, 5], [30, 60, 0], [0, 0, 0]])  # tree absent from the ground truth
    return EvalResult.from_matrix(matrix, NAMES, seen=[0, 2], unseen=[1], num_images=3)


@pytest.fixture(scope="module")
def segmenter(trained_checkpoint: Path) -> Segmenter:
    return Segmenter.from_checkpoint(trained_checkpoint, device="cpu")


def test_top_confusions_by_pixels() -> None:
    matrix = np.array([[80, 15, 5], [30, 60, 0], [0, 0, 0]])
    top = top_confusions(matrix, NAMES, k=5)
    assert [(c.truth, c.predicted, c.pixels) for c in top] == [
        ("car", "road", 30),
        ("road", "car", 15),
        ("road", "tree", 5),
    ]
    assert top[0].share == pytest.approx(100 * 30 / 90)
    assert top[1].share == pytest.approx(15.0)


def test_iou_figure_is_labelled_and_coloured_by_split() -> None:
    from matplotlib.colors import to_rgba

    fig = iou_figure(_result())
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(NAMES)
    assert ax.get_xlabel() == "IoU (%)" and "hIoU" in ax.get_title()
    bars = ax.patches
    assert bars[0].get_width() == pytest.approx(100 * 80 / 130)  # road: 80 / (100 + 110 - 80)
    assert bars[1].get_facecolor() == pytest.approx(to_rgba(SPLIT_COLOURS["unseen"]))  # car is unseen
    assert bars[0].get_facecolor() == pytest.approx(to_rgba(SPLIT_COLOURS["seen"]))
    # tree: no ground truth, but predicted
    assert any(t.get_text() == "0.0 (absent, predicted)" for t in ax.texts)
    skipped = iou_figure(EvalResult.from_matrix(_result().confusion, NAMES, [0, 2], [1], absent="skip"))
    assert any(t.get_text() == "absent" for t in skipped.axes[0].texts)
    image = figure_to_array(fig)
    assert image.dtype == np.uint8 and image.shape[2] == 3
    assert 600 < image.shape[1] < 900 and 150 < image.shape[0] < 400  # about 8 × 2.2 in at 100 dpi, cropped


def test_confusion_figure_lists_top_confusions_and_keeps_names_legible() -> None:
    fig = confusion_figure(_result())
    heat = fig.axes[0]
    assert heat.get_xlabel() == "predicted class" and heat.get_ylabel() == "ground-truth class"
    assert [t.get_text() for t in heat.get_xticklabels()] == list(NAMES)
    listing = "\n".join(t.get_text() for ax in fig.axes for t in ax.texts)
    assert "1. car → road: 33.3%" in listing
    # Many classes: only the ones in the top confusions, then the most frequent, are drawn.
    k = 60
    matrix = torch.diag(torch.arange(1, k + 1) * 10)
    matrix[5, 50] = 400
    names = tuple(f"class{i}" for i in range(k))
    fig = confusion_figure(EvalResult.from_matrix(matrix, names, range(k), []), max_classes=20)
    shown = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert len(shown) == 20 and "class5" in shown and "class50" in shown and "class59" in shown
    assert "20 of 60 classes" in fig.axes[0].get_title()


def test_write_report_on_camvid_val(segmenter: Segmenter, shared_data: Path, tmp_path: Path) -> None:
    cfg = dataclasses.replace(
        segmenter.config,
        data=DataConfig(
            dataset="folder",
            root=str(shared_data / "camvid"),
            unseen=["car", "tree", "pedestrian"],
            num_workers=0,
        ),
        eval=EvalConfig(mode="whole", short_side=64, max_images=2),
    )
    dataset = build_eval_dataset(cfg, "val")
    logits_fn = segmenter.logits_fn(dataset.class_names)
    result = evaluate(logits_fn, dataset, cfg.eval, progress=False)
    report = write_report(
        result, dataset, logits_fn, tmp_path / "report", cfg.eval, num_examples=2, title="camvid"
    )
    text = report.read_text()
    for name in ("per_class_iou.png", "confusion_matrix.png", "examples.png"):
        assert f"]({name})" in text
        with Image.open(tmp_path / "report" / name) as png:
            assert png.width >= 600 and png.height >= 300
    assert f"| {result.metrics['pAcc']:.1f} |" in text
    assert "| pedestrian | unseen |" in text
    assert (tmp_path / "report" / "metrics.json").is_file()
    # The examples are predicted exactly as evaluate predicts: same argmax at mask resolution.
    example = collect_examples(dataset, logits_fn, cfg.eval, indices=[1])[0]
    assert example.truth.shape == example.prediction.shape == example.image.shape[:2] == (360, 480)


def test_log_to_tensorboard_writes_figures_and_class_curves(segmenter: Segmenter, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    data = SyntheticScenes(num_images=2, size=64, seed=5)
    logits_fn = segmenter.logits_fn(data.class_names)
    cfg = EvalConfig(mode="whole", short_side=64)
    result = evaluate(logits_fn, data, cfg, progress=False)
    with SummaryWriter(str(tmp_path / "tb")) as writer:
        log_to_tensorboard(writer, result, 7, dataset=data, logits_fn=logits_fn, eval_cfg=cfg)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0}).Reload()
    assert set(events.Tags()["images"]) == {"val/per_class_iou", "val/confusion_matrix", "val/examples"}
    assert events.Images("val/examples")[0].step == 7
    present = [row["name"] for row in result.per_class if row["IoU"] == row["IoU"]]
    assert {f"val_class_iou/{n}" for n in present} <= set(events.Tags()["scalars"])


def test_cli_eval_report(trained_checkpoint: Path, shared_data: Path, tmp_path: Path) -> None:
    if "--report" not in build_parser()._subparsers._group_actions[0].choices["eval"].format_help():
        pytest.skip("`clipzss eval` has no --report option in this build")
    out = tmp_path / "rep"
    root = str(shared_data / "camvid")
    argv = ["eval", str(trained_checkpoint), "--dataset", "folder", "--data-root", root]
    argv += ["--unseen", "car,tree", "--mode", "whole", "--max-images", "1", "--report", str(out)]
    assert main(argv) == 0
    assert (out / "report.md").is_file() and (out / "confusion_matrix.png").is_file()
