"""inspect-pseudo-labels: purity/NMI against scikit-learn, the training pseudo labels reproduced, the CLI end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from sklearn.metrics import normalized_mutual_info_score

from clipzss.cli import main
from clipzss.config import MethodConfig
from clipzss.inspection import (
    QualityAccumulator,
    clustering_variants,
    contingency,
    inspect_pseudo_labels,
    nmi,
    pseudo_regions,
    purity,
)
from clipzss.method.pseudo_labels import pseudo_labels, training_windows
from conftest import TINY_CLIP


def test_contingency_and_purity_by_hand() -> None:
    truth = np.array([0, 0, 0, 1, 1, 2])
    regions = np.array([7, 7, 9, 9, 9, 9])
    table = contingency(truth, regions)
    assert table.tolist() == [[2, 1], [0, 2], [0, 1]]
    assert purity(table) == pytest.approx(4 / 6)  # region 7 → class 0 (2 px), region 9 → class 1 (2 px)


@pytest.mark.parametrize("seed", range(6))
def test_nmi_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 200))
    truth = rng.integers(0, int(rng.integers(1, 5)), n)
    regions = np.where(rng.random(n) < 0.7, truth * 3 + 1, rng.integers(0, 6, n))  # correlated labelings
    assert nmi(contingency(truth, regions)) == pytest.approx(
        normalized_mutual_info_score(truth, regions), abs=1e-9
    )


@pytest.mark.parametrize(
    ("truth", "regions"),
    [
        ([0, 0, 0, 0], [5, 5, 5, 5]),
        ([0, 0, 0, 0], [0, 1, 2, 3]),
        ([0, 1, 0, 1], [3, 3, 3, 3]),
        ([1, 1, 2, 2], [2, 2, 1, 1]),
    ],
)
def test_nmi_edge_cases_follow_sklearn(truth: list[int], regions: list[int]) -> None:
    assert nmi(contingency(np.array(truth), np.array(regions))) == pytest.approx(
        normalized_mutual_info_score(truth, regions)
    )


def test_quality_accumulator_by_hand() -> None:
    acc = QualityAccumulator()
    truth = np.array([[0, 0, 1, 1], [255, 255, 255, 255]])  # second row not evaluated
    regions = np.array([[4, 4, 6, -1], [1, 1, 1, 1]])  # last evaluated pixel got no pseudo label
    acc.add(truth, regions)
    acc.add(np.full((2, 4), 255), np.zeros((2, 4), dtype=np.int64))  # an image with nothing to evaluate
    q = acc.summary()
    assert q["purity"] == 1.0 and q["coverage"] == 0.75
    assert q["NMI"] == 1.0 and q["regions/image"] == 2 and q["classes/image"] == 2 and q["images"] == 1
    assert math.isnan(QualityAccumulator().summary()["purity"])


def test_clustering_variants_on_the_default_grid() -> None:
    variants = clustering_variants(MethodConfig(), (28, 28))
    assert variants == {
        "window 14": ([14], None),
        "window 7": ([7], None),
        "window 4": ([4], None),
        "all scales, no fusion": ([14, 7, 4], None),
        "all scales + fusion λ=0.7": ([14, 7, 4], 0.7),
        "window 7 + fusion λ=0.7 (training)": ([7], 0.7),  # single-scale seeds: the default
    }
    multi = clustering_variants(MethodConfig(multi_scale=True), (28, 28))
    assert list(multi)[-1] == "all scales + fusion λ=0.7 (training)" and len(multi) == 5


def test_pseudo_regions_are_the_training_pseudo_labels() -> None:
    """The fused variant must be exactly what `pseudo_labels` gives the trainer, up to the seen-id offset (before the
    seen-rim filter, which needs the seen classes that inspect does not know)."""
    torch.manual_seed(3)
    num_seen, method = 3, MethodConfig(min_region=0.02, max_seen_share=1.0)
    dense = F.normalize(torch.randn(2, 16, 8, 8), dim=1)
    gt = torch.randint(0, num_seen, (2, 32, 32))
    gt[:, 8:24, 4:30] = 255  # the ignored (unlabelled) area
    fused, _ = pseudo_labels(dense, gt, num_seen, method)
    sizes = training_windows(8, 8, method)
    regions = pseudo_regions(dense, gt == 255, sizes, method.fusion_threshold, method)
    expected = torch.where((gt == 255) & (fused != 255), fused - num_seen, -1)
    assert torch.equal(regions, expected)
    assert (regions >= 0).any(), "the test must exercise real pseudo regions"


class _StripesTeacher:
    """A teacher whose tokens say which vertical half of the image they are in: two perfect clusters."""

    embed_dim = 4

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = images.shape
        dense = torch.zeros(b, 4, h // 4, w // 4)
        dense[:, 0, :, : w // 8] = 1
        dense[:, 1, :, w // 8 :] = 1
        return F.normalize(dense.mean(dim=(2, 3)), dim=-1), dense

    def text_embeddings(self, names: list[str]) -> torch.Tensor:
        return torch.eye(4)[: len(names)]


def test_inspect_with_any_teacher_scores_perfect_clusters(tmp_path: Path) -> None:
    image = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))
    mask = np.zeros((32, 32), dtype=np.int64)
    mask[:, 16:] = 1
    mask[0, 0] = 255  # void pixels are never scored
    report = inspect_pseudo_labels(
        [image], _StripesTeacher(), MethodConfig(), [mask], out=tmp_path, names=["a"]
    )
    fused = report.quality[list(report.quality)[-1]]  # the training pseudo labels
    assert list(report.quality)[-1].endswith("(training)")
    assert fused["purity"] == 1.0 and fused["NMI"] == pytest.approx(1.0) and fused["coverage"] == 1.0
    assert fused["regions/image"] == 2 and fused["classes/image"] == 2
    panel = Image.open(report.overlays[0])
    assert panel.width == 32 * (2 + len(report.quality))  # image, ground truth, one tile per variant


def _folder_dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)
    (root / "val" / "images").mkdir(parents=True)
    (root / "val" / "masks").mkdir()
    (root / "classes.txt").write_text("sky\nroad\ncar\n")
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(
            root / "val" / "images" / f"im{i}.png"
        )
        mask = np.zeros((48, 64), dtype=np.uint8)
        mask[24:] = 1
        mask[30:40, 10:30] = 2
        Image.fromarray(mask).save(root / "val" / "masks" / f"im{i}.png")
    return root / "val" / "images"


def _tiny_config(path: Path, cache: Path) -> Path:
    cfg = {
        "teacher": {
            "weights": "none",
            "image_size": 64,
            "model_overrides": TINY_CLIP,
            "templates": ["a {}."],
            "cache_dir": str(cache),
        },
        "eval": {"short_side": 48},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_writes_report_and_overlays(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = _folder_dataset(tmp_path / "data")
    config = _tiny_config(tmp_path / "cfg.yaml", tmp_path / "cache")
    out = tmp_path / "out"
    argv = ["inspect-pseudo-labels", str(images), "method.fusion_threshold=0.9", "--config", str(config)]
    rc = main([*argv, "--out", str(out), "--unseen", "road,car", "--device", "cpu"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    fused = report["quality"]["all scales + fusion λ=0.9"]  # the override reached the method config
    assert 0 < fused["purity"] <= 1 and 0 <= fused["NMI"] <= 1 and fused["classes/image"] == 2
    assert sorted(p.name for p in out.glob("*_clusters.png")) == ["im0_clusters.png", "im1_clusters.png"]
    assert "purity" in capsys.readouterr().out
    assert "λ = 0.9" in (out / "report.md").read_text()


def test_cli_compares_dense_paths_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = _folder_dataset(tmp_path / "data")
    config = _tiny_config(tmp_path / "cfg.yaml", tmp_path / "cache")
    base = [
        "inspect-pseudo-labels",
        str(images),
        "--config",
        str(config),
        "--unseen",
        "road,car",
        "--device",
        "cpu",
    ]
    out = tmp_path / "all"
    assert main([*base, "--dense", "value,clearclip,naclip", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("purity"))
    assert header.split() == ["purity", "value", "clearclip", "naclip"]  # the paths are the columns
    assert all(f"\n{m}" in printed for m in ("NMI", "coverage", "regions/image"))
    report = json.loads((out / "report.json").read_text())
    assert list(report["dense"]) == ["value", "clearclip", "naclip"]
    assert report["quality"] == report["dense"]["value"]
    assert len(list(out.glob("im0_*_clusters.png"))) == 3  # one panel per path
    assert "| purity | value | clearclip | naclip |" in (out / "report.md").read_text()
    # Each column is what that path alone gives.
    assert main([*base, "--dense", "naclip", "--out", str(tmp_path / "one")]) == 0
    alone = json.loads((tmp_path / "one" / "report.json").read_text())
    assert alone["quality"] == report["dense"]["naclip"] and "dense" not in alone
    assert "(dense: naclip)" in alone["settings"]
    capsys.readouterr()
    assert main([*base, "--dense", "value,gem", "--out", str(tmp_path / "bad")]) == 2
    assert (
        "teacher.dense='gem' is not one of value, maskclip, clearclip, sclip, naclip"
        in capsys.readouterr().err
    )
    with pytest.raises(ValueError, match="--dense needs the CLIP teacher"):
        inspect_pseudo_labels(
            [Image.new("RGB", (32, 32))], _StripesTeacher(), MethodConfig(), dense=["value"]
        )


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect-pseudo-labels", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    images = _folder_dataset(tmp_path / "data")
    rc = main(["inspect-pseudo-labels", str(images), "--unseen", "boat", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "unseen class 'boat' is not in the class list" in capsys.readouterr().err
