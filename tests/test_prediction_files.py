"""Outputs of images with the same name: every input keeps its own result, on `predict` and `predict --onnx`
alike (`clipzss.prediction_files`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipzss.cli import main
from clipzss.models.segmenter import Segmenter
from clipzss.prediction_files import output_names, prediction_folder, save_prediction
from conftest import photo

# The user's default cache lives in the test's folder (`user_cache`): the real rule of where caches go is used.
pytestmark = pytest.mark.usefixtures("user_cache")


def test_same_name_images_keep_every_result(
    trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = [
        photo(tmp_path / "in" / "a" / "x.jpg", 0),
        photo(tmp_path / "in" / "b" / "x.jpg", 1),
        photo(tmp_path / "in" / "a" / "x.png", 2, size=(20, 12)),
    ]
    out = tmp_path / "out"
    argv = ["predict", *map(str, images), "--checkpoint", str(trained_checkpoint), "--classes", "a,b,c"]
    assert main([*argv, "--out", str(out), "--device", "cpu", "--mode", "whole"]) == 0
    printed = capsys.readouterr().out
    masks = sorted(p.relative_to(out).as_posix() for p in out.rglob("*_mask.png"))
    assert masks == ["a/x_jpg_mask.png", "a/x_png_mask.png", "b/x_mask.png"]
    assert printed.count("renamed: several inputs are named x") == 3
    assert Image.open(out / "a" / "x_png_mask.png").size == (20, 12)  # its own result, not another's
    seg = Segmenter.from_checkpoint(trained_checkpoint, device="cpu")
    expected = seg.predict(images[1], ["a", "b", "c"], mode="whole")
    np.testing.assert_array_equal(np.asarray(Image.open(out / "b" / "x_mask.png")), expected)


def test_shared_output_step_names_same_stem_inputs_apart(tmp_path: Path) -> None:
    """The call pattern of `predict --onnx` (stems only) gets the same distinct names as `predict`."""
    images = [photo(tmp_path / d / "x.jpg", i) for i, d in enumerate(("a", "b"))]
    images.append(photo(tmp_path / "c" / "y.jpg", 3))
    folder = prediction_folder(images, tmp_path / "out")
    names = ["road", "sky"]
    for path in images:
        image = Image.open(path).convert("RGB")
        save_prediction(folder, Path(path).stem, image, np.zeros((16, 24), dtype=np.int64), names)
    found = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png"))
    expected = [
        "a/x_mask.png",
        "a/x_overlay.png",
        "b/x_mask.png",
        "b/x_overlay.png",
        "y_mask.png",
        "y_overlay.png",
    ]
    assert found == expected
    # Unique stems keep their plain name; the same file twice gets one name; names never leave the folder.
    assert output_names([images[2], images[0], images[0]]) == ["y", "x", "x"]
    assert all(".." not in name for name in output_names(images))
