"""A checkpoint's config is data, not instructions: it is validated like user input, never echoed at length,
never chooses where files go and never makes clipzss fetch weights (`clipzss.checkpoint`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from clipzss.checkpoint import CheckpointError, load_checkpoint, validate_loaded_config
from clipzss.models.segmenter import Segmenter
from conftest import one_error_line, photo

# The user's default cache lives in the test's folder (`user_cache`): the real rule of where caches go is used.
pytestmark = pytest.mark.usefixtures("user_cache")


def _rewrite(checkpoint: Path, out: Path, edit) -> Path:
    with safe_open(str(checkpoint), framework="pt") as handle:
        metadata = dict(handle.metadata())
    config = json.loads(metadata["config"])
    edit(config)
    metadata["config"] = json.dumps(config)
    save_file(load_file(str(checkpoint)), str(out), metadata=metadata)
    return out


def test_long_strings_in_a_checkpoint_are_not_echoed(trained_checkpoint: Path, tmp_path: Path) -> None:
    huge = "x" * 50_000_000

    def long_encoder(cfg: dict) -> None:
        cfg["student"]["encoder"] = huge

    bad = _rewrite(trained_checkpoint, tmp_path / "long.safetensors", long_encoder)
    with pytest.raises(CheckpointError) as caught:
        Segmenter.from_checkpoint(bad, device="cpu")
    message = str(caught.value)
    assert "student.encoder" in message and "50,000,000 characters" in message
    assert len(message) < 400 and "x" * 81 not in message
    with pytest.raises(CheckpointError, match="is not a name") as caught:
        validate_loaded_config({"student": {"encoder": "y" * 500}})
    assert "y" * 81 not in str(caught.value)
    with pytest.raises(CheckpointError) as caught:
        validate_loaded_config({"method": {"alpha": ["z" * 1000] * 1000}})  # a type error quoting the value
    assert len(str(caught.value)) < 500


def test_checkpoint_records_the_teacher_dense_path_and_old_files_read_as_value(
    trained_checkpoint: Path, tmp_path: Path
) -> None:
    assert (
        load_checkpoint(trained_checkpoint).config.teacher.dense == "clearclip"
    )  # today's default, recorded

    def forget(cfg: dict) -> None:  # a checkpoint written before teacher.dense existed
        del cfg["teacher"]["dense"]

    old = _rewrite(trained_checkpoint, tmp_path / "old.safetensors", forget)
    assert load_checkpoint(old).config.teacher.dense == "value"  # what every earlier version computed

    def maskclip(cfg: dict) -> None:
        cfg["teacher"]["dense"] = "maskclip"

    assert load_checkpoint(
        _rewrite(trained_checkpoint, tmp_path / "m.safetensors", maskclip)
    ).config.teacher.dense == ("maskclip")

    def value(cfg: dict) -> None:  # written after teacher.dense existed, before its default changed
        cfg["teacher"]["dense"] = "value"

    assert load_checkpoint(
        _rewrite(trained_checkpoint, tmp_path / "v.safetensors", value)
    ).config.teacher.dense == ("value")


def test_checkpoint_cache_dir_never_chooses_where_predict_writes(
    trained_checkpoint: Path, tmp_path: Path, user_cache: Path
) -> None:
    planted = tmp_path / "chosen_by_the_file"

    def plant(cfg: dict) -> None:
        cfg["teacher"]["cache_dir"] = str(planted)

    ckpt = _rewrite(trained_checkpoint, tmp_path / "planted.safetensors", plant)
    assert load_checkpoint(ckpt).config.teacher.cache_dir is None
    Segmenter.from_checkpoint(ckpt, device="cpu").predict(np.zeros((16, 16, 3), np.uint8), ["road", "sky"])
    assert not planted.exists()
    assert list((user_cache / "clipzss" / "text").glob("*.safetensors"))


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), 0.0, -14.3])
def test_bad_alpha_in_a_checkpoint_is_refused(
    alpha: float, trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def set_alpha(cfg: dict) -> None:
        cfg["method"]["alpha"] = alpha

    ckpt = _rewrite(trained_checkpoint, tmp_path / "alpha.safetensors", set_alpha)
    image = photo(tmp_path / "a.png", 0)
    argv = ["predict", str(image), "--checkpoint", str(ckpt), "--classes", "a", "--out", str(tmp_path / "o")]
    one_error_line(argv, capsys, "method.alpha must be a positive finite number", "alpha.safetensors")


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("teacher", "model_overrides", {"pretrained_image": True}),
        ("teacher", "model_overrides", {"weights_only": False}),
        ("teacher", "model_overrides", {"text_cfg": {"hf_model_name": "bert-base-uncased"}}),
        ("teacher", "model_overrides", {"vision_cfg": {"timm_model_pretrained": True}}),
        ("student", "arch_kwargs", {"pretrained_cfg_overlay": {"url": "https://example.com/w.pth"}}),
        ("student", "arch_kwargs", {"pretrained": True}),
    ],
)
def test_checkpoint_overrides_that_fetch_weights_are_refused(
    section: str, key: str, value: dict, trained_checkpoint: Path, tmp_path: Path
) -> None:
    def plant(cfg: dict) -> None:
        cfg[section][key] = {**cfg[section][key], **value}

    ckpt = _rewrite(trained_checkpoint, tmp_path / "fetch.safetensors", plant)
    with pytest.raises(CheckpointError, match=rf"{section}\.{key}\.\S+ would load pretrained weights"):
        Segmenter.from_checkpoint(ckpt, device="cpu")
