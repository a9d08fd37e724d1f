"""The shipped configs load, follow the documented schedules, and train end to end on real data (tiny teacher)."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipzss.cli import main
from clipzss.config import load_config
from clipzss.data import DATASET_NAMES
from conftest import tiny_overrides

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
SCHEDULES = {"voc_inductive": 20000, "coco_inductive": 80000, "context_inductive": 40000}


def test_all_expected_configs_exist() -> None:
    names = {p.stem for p in CONFIGS}
    assert {
        "voc_inductive",
        "coco_inductive",
        "context_inductive",
        "coco_to_voc",
        "coco_to_context",
        "coco_to_ade",
        "camvid",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_with_known_datasets(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.data.dataset in DATASET_NAMES
    assert cfg.data.eval_dataset is None or cfg.data.eval_dataset in DATASET_NAMES
    assert cfg.student.embed_dim == 512 and cfg.teacher.model == "ViT-B-16"
    if path.stem in SCHEDULES:
        assert cfg.train.max_iters == SCHEDULES[path.stem]
        assert (cfg.data.crop_size, cfg.train.batch_size, cfg.train.warmup_iters) == (512, 16, 1500)
        assert (cfg.eval.mode, cfg.eval.crop_size, cfg.eval.stride) == ("slide", 512, 341)
    if path.stem.startswith("coco_to_"):
        assert cfg.data.dataset == "coco-stuff" and cfg.data.eval_unseen == []


def test_train_camvid_config_end_to_end_then_eval(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`clipzss train configs/camvid.yaml data.root=...` on the real CamVid images, with a tiny random teacher."""
    camvid = shared_data / "camvid"
    overrides = tiny_overrides(
        tmp_path / "cache",
        {
            "data.root": camvid,
            "data.scale": 72,
            "teacher.templates": '["a photo of a {}."]',
            "train.max_iters": 2,
            "train.batch_size": 2,
            "train.warmup_iters": 1,
            "train.eval_interval": 2,
            "train.output_dir": tmp_path / "run",
            "eval.short_side": 64,
            "eval.max_images": 2,
        },
    )
    assert (
        main(["train", str(Path(__file__).resolve().parents[1] / "configs" / "camvid.yaml"), *overrides]) == 0
    )
    assert (tmp_path / "run" / "model.safetensors").is_file()
    capsys.readouterr()
    assert (
        main(["eval", str(tmp_path / "run"), "--max-images", "2", "--workers", "0", "--device", "cpu"]) == 0
    )
    out = capsys.readouterr().out
    assert "mIoU(U)" in out and "car" in out and "unseen" in out
