"""Nothing a user made is lost or overwritten silently, and a checkpoint is data, not instructions.

Each test holds one guarantee of docs/reliability.md: same-name images keep every result, bad CLIP weights files and
corrupt images in worker processes are one line naming the file, colours match the legend for any vocabulary, names
CLIP cannot tell apart are refused on every path, the demo bounds its requests and caches, and a checkpoint's
config is validated like user input.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from clipzss.checkpoint import CheckpointError, load_checkpoint, validate_loaded_config
from clipzss.cli import main, user_message
from clipzss.names import parse_class_names
from clipzss.predict import LRUCache, Segmenter
from clipzss.visualize import colorize, output_names, overlay, palette, prediction_folder, save_prediction


@pytest.fixture(autouse=True)
def _user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user's default cache, inside the test's folder (checkpoints no longer choose it)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg"


def _one_error_line(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("clipzss")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _photo(path: Path, seed: int, size: tuple[int, int] = (24, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


# --- 1. outputs of images with the same name ---------------------------------------------------------------------


def test_same_name_images_keep_every_result(
    trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = [
        _photo(tmp_path / "in" / "a" / "x.jpg", 0),
        _photo(tmp_path / "in" / "b" / "x.jpg", 1),
        _photo(tmp_path / "in" / "a" / "x.png", 2, size=(20, 12)),
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
    images = [_photo(tmp_path / d / "x.jpg", i) for i, d in enumerate(("a", "b"))]
    images.append(_photo(tmp_path / "c" / "y.jpg", 3))
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


# --- 5. unreadable CLIP weights files ----------------------------------------------------------------------------


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize(
    "kind", ["pickle.pt", "torch-pickle.bin", "garbage.safetensors", "garbage.bin", "empty.pt"]
)
def test_bad_teacher_weights_are_one_line(
    kind: str, trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    weights = tmp_path / kind
    if kind == "pickle.pt":
        weights.write_bytes(pickle.dumps({"visual.proj": _Exploit(marker)}))
    elif kind == "torch-pickle.bin":
        torch.save({"visual.proj": _Exploit(marker)}, weights)
    elif kind == "empty.pt":
        weights.write_bytes(b"")
    else:
        weights.write_bytes(b"not weights at all " * 8)
    image = _photo(tmp_path / "a.png", 0)
    line = _one_error_line(
        [
            "predict",
            str(image),
            "--checkpoint",
            str(trained_checkpoint),
            "--teacher-weights",
            str(weights),
            "--classes",
            "a,b",
            "--out",
            str(tmp_path / "out"),
        ],
        capsys,
        "cannot read teacher weights",
        kind,
    )
    assert len(line) < 300, line
    assert not marker.exists(), "unpickling ran code from the weights file"


# --- 6. a corrupt image read by a data-loading worker ------------------------------------------------------------


def _folder_with_corrupt_image(root: Path) -> Path:
    for sub in ("images", "masks"):
        (root / "val" / sub).mkdir(parents=True)
    (root / "classes.txt").write_text("road\ncar\nsky\n")
    (root / "val" / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a picture")
    Image.fromarray(np.zeros((12, 16), dtype=np.uint8)).save(root / "val" / "masks" / "broken.png")
    return root


def test_worker_errors_name_the_file(
    trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from clipzss.config import Config, DataConfig
    from clipzss.data import build_eval_dataset

    root = _folder_with_corrupt_image(tmp_path / "d")
    dataset = build_eval_dataset(Config(data=DataConfig(dataset="folder", root=str(root), unseen=[])), "val")
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=1)
    with pytest.raises(ValueError) as caught:
        next(iter(loader))
    assert str(caught.value).startswith(
        "Caught ValueError in DataLoader worker process 0."
    )  # torch's wrapping
    message = user_message(caught.value)
    assert message.startswith("cannot read image") and "broken.png" in message and "\n" not in message
    argv = ["eval", str(trained_checkpoint), "--dataset", "folder", "--data-root", str(root)]
    _one_error_line([*argv, "--unseen", "car", "--workers", "1", "--device", "cpu"], capsys, "broken.png")


# --- 9. colours beyond 256 classes -------------------------------------------------------------------------------


def test_colours_match_the_legend_beyond_256_classes() -> None:
    names = [f"class {i}" for i in range(300)]
    mask = np.array([[255, 299], [0, 300]], dtype=np.int64)
    rgb = np.asarray(colorize(mask, len(names)))
    legend = palette(len(names))  # the colours `overlay` draws in its legend
    assert (rgb[0, 1] != rgb[0, 0]).any()
    np.testing.assert_array_equal(rgb[0, 1], legend[299])
    np.testing.assert_array_equal(rgb[0, 0], legend[255])
    np.testing.assert_array_equal(rgb[1, 1], [0, 0, 0])  # beyond the class list: black
    assert (np.asarray(colorize(np.array([[255]]), 3))[0, 0] == 0).all()  # ignore stays black for small lists
    drawn = np.asarray(overlay(Image.new("RGB", (2, 2)), mask.clip(0, 299), names, opacity=1.0))
    np.testing.assert_array_equal(drawn[0, 1], legend[299])


# --- 10. names CLIP cannot tell apart ----------------------------------------------------------------------------


def test_names_equal_for_clip_are_refused_on_every_path(
    trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match=r"duplicate class names: Cat = cat \(the same name to CLIP"):
        parse_class_names("Cat,dog,cat")
    with pytest.raises(ValueError, match="duplicate class names: potted plant = Potted  Plant"):
        parse_class_names(["potted plant", "Potted  Plant"])
    assert parse_class_names("cat,dog,cats") == ["cat", "dog", "cats"]
    image = _photo(tmp_path / "a.png", 0)
    base = ["predict", str(image), "--classes", "Cat,cat", "--out", str(tmp_path / "out")]
    _one_error_line([*base, "--checkpoint", str(trained_checkpoint)], capsys, "Cat = cat")
    _one_error_line([*base, "--onnx", str(tmp_path / "model.onnx")], capsys, "Cat = cat")
    code = "import sys; sys.modules['torch'] = None; from clipzss.names import parse_class_names"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0  # torch-free


# --- 11. the demo bounds class names per request and its text cache ----------------------------------------------


def test_demo_bounds_names_per_request_and_its_text_cache(trained_checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("gradio")
    from clipzss.demo import build_app

    seg = Segmenter.from_checkpoint(trained_checkpoint, device="cpu")
    app = build_app(seg, None, example_dir=tmp_path / "examples", max_classes=256, text_cache_size=2)
    on_segment = next(f.fn for f in app.fns.values() if getattr(f.fn, "__name__", "") == "on_segment")
    image = str(_photo(tmp_path / "a.png", 0))
    *_, status = on_segment(image, ",".join(f"class {i}" for i in range(300)), "the model's prompt ensemble")
    assert "300 class names given; this demo accepts at most 256 per request" in status
    for i in range(5):
        result, _, _, status = on_segment(image, f"road,sky{i}", "the model's prompt ensemble")
        assert result is not None and status == ""
    assert isinstance(seg._text_cache, LRUCache) and len(seg._text_cache) == 2
    assert len(seg.text_encoder._text_cache) == 2  # the CLIP teacher's own copies too
    assert list(seg._text_cache)[-1][0] == ("road", "sky4")  # the most recent list is kept


# --- 8. a checkpoint's config is validated like user input --------------------------------------------------------


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


def test_checkpoint_cache_dir_never_chooses_where_predict_writes(
    trained_checkpoint: Path, tmp_path: Path, _user_cache: Path
) -> None:
    planted = tmp_path / "chosen_by_the_file"

    def plant(cfg: dict) -> None:
        cfg["teacher"]["cache_dir"] = str(planted)

    ckpt = _rewrite(trained_checkpoint, tmp_path / "planted.safetensors", plant)
    assert load_checkpoint(ckpt).config.teacher.cache_dir is None
    Segmenter.from_checkpoint(ckpt, device="cpu").predict(np.zeros((16, 16, 3), np.uint8), ["road", "sky"])
    assert not planted.exists()
    assert list((_user_cache / "clipzss" / "text").glob("*.safetensors"))


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), 0.0, -14.3])
def test_bad_alpha_in_a_checkpoint_is_refused(
    alpha: float, trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def set_alpha(cfg: dict) -> None:
        cfg["method"]["alpha"] = alpha

    ckpt = _rewrite(trained_checkpoint, tmp_path / "alpha.safetensors", set_alpha)
    image = _photo(tmp_path / "a.png", 0)
    argv = ["predict", str(image), "--checkpoint", str(ckpt), "--classes", "a", "--out", str(tmp_path / "o")]
    _one_error_line(argv, capsys, "method.alpha must be a positive finite number", "alpha.safetensors")


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
