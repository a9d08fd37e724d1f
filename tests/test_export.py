"""ONNX export: parity with PyTorch on real images, dynamic batch and size, and a runner that needs no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from clipzss.cli import build_parser, main
from clipzss.export import export_onnx
from clipzss.images import load_image
from clipzss.inference.inputs import preprocess
from clipzss.inference.onnx_runner import OnnxSegmenter
from clipzss.models.segmenter import PrecomputedText, Segmenter
from conftest import CAMVID_CLASSES

CAMVID = list(CAMVID_CLASSES)


@pytest.fixture(scope="module")
def segmenter(trained_checkpoint: Path) -> Segmenter:
    return Segmenter.from_checkpoint(trained_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def exported(segmenter: Segmenter, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One export with CamVid's class names baked in, one of the bare embeddings (each is checked on export)."""
    folder = tmp_path_factory.mktemp("onnx")
    logits = export_onnx(segmenter, folder / "camvid.onnx", CAMVID)
    embeddings = export_onnx(segmenter, folder / "student.onnx")
    assert logits.max_abs_diff is not None and logits.max_abs_diff < 1e-3
    assert embeddings.class_names is None and embeddings.pad_multiple == 32
    return {"logits": logits.path, "embeddings": embeddings.path}


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(1) == b.argmax(1)).mean())


def test_onnx_matches_pytorch_on_real_images(
    segmenter: Segmenter, exported: dict[str, Path], shared_data: Path
) -> None:
    model = OnnxSegmenter(exported["logits"], threads=1)
    reference = segmenter.logits_fn(CAMVID)
    paths = sorted((shared_data / "camvid" / "val" / "images").glob("*.jpg"))[::40][:3]
    batch = []
    for path in paths:
        x = torch.from_numpy(preprocess(load_image(path), 128))[
            None
        ]  # (1, 3, 128, 171): not a multiple of 32
        with torch.no_grad():
            expected = reference(x).numpy()
        got = model.logits(x.numpy())
        assert got.shape == expected.shape == (1, len(CAMVID), 32, 43)
        assert np.abs(got - expected).max() < 1e-3
        assert _agreement(got, expected) >= 0.999
        batch.append(x)
    both = torch.cat(batch[:2])  # dynamic batch: two real images at once
    with torch.no_grad():
        expected = reference(both).numpy()
    got = model.logits(both.numpy())
    assert np.abs(got - expected).max() < 1e-3 and _agreement(got, expected) >= 0.999


@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (2, 3, 70, 97), (1, 3, 33, 150)])
def test_dynamic_batch_and_size(
    segmenter: Segmenter, exported: dict[str, Path], shape: tuple[int, ...]
) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = segmenter.logits_fn(CAMVID)(x).numpy()
    got = OnnxSegmenter(exported["logits"], threads=1).logits(x.numpy())
    assert got.shape == expected.shape == (shape[0], len(CAMVID), -(-shape[2] // 4), -(-shape[3] // 4))
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_onnx_predict_reproduces_segmenter(
    segmenter: Segmenter, exported: dict[str, Path], mode: str
) -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((75, 101, 3)) * 255).astype(np.uint8))
    model = OnnxSegmenter(exported["logits"], threads=1)
    model.eval.update(short_side=96, crop_size=64, stride=40)  # several overlapping windows in slide mode
    cfg = segmenter.eval_cfg
    old = (cfg.short_side, cfg.crop_size, cfg.stride)
    cfg.short_side, cfg.crop_size, cfg.stride = 96, 64, 40
    try:
        expected = segmenter.predict(image, CAMVID, mode=mode)
    finally:
        cfg.short_side, cfg.crop_size, cfg.stride = old
    got = model.predict(image, mode=mode)
    assert got.shape == expected.shape == (75, 101)
    assert (got == expected).mean() >= 0.999
    subset = model.predict(image, ["road", "sky"], mode=mode)  # a subset of the baked classes
    assert set(np.unique(subset)) <= {0, 1}


def test_onnx_slide_streams_rows_of_windows_with_the_full_plans_labels(
    segmenter: Segmenter, exported: dict[str, Path]
) -> None:
    # 5 rows of windows, at most 3 read per output row: the runner labels bands as rows come in
    # (label_maps.slide_labels); its labels must be those of every window's logits under the full plan.
    from clipzss.inference.inputs import sliding_windows
    from clipzss.inference.label_maps import label_map, row_bands, slide_plan

    rng = np.random.default_rng(3)
    image = Image.fromarray((rng.random((200, 60, 3)) * 255).astype(np.uint8))
    model = OnnxSegmenter(exported["logits"], threads=1)
    model.eval.update(short_side=0, crop_size=64, stride=40)
    windows = sliding_windows(200, 60, 64, 40)
    bands = row_bands(slide_plan((200, 60), windows, (1, 1), (200, 60)))
    assert len(windows) == 5 and max(b.last - b.first + 1 for b in bands) == 3  # streamed, not whole
    x = model.preprocess(image)
    rows = list(range(len(CAMVID)))
    logits = np.stack([model._logits(x[..., a:b, c:d], rows)[0].transpose(1, 2, 0) for a, b, c, d in windows])
    expected = label_map(slide_plan((200, 60), windows, logits.shape[1:3], (200, 60)), logits)
    got = model.predict(image, mode="slide")
    assert got.dtype == np.int64 and np.array_equal(got, expected)
    cfg = segmenter.eval_cfg
    old = (cfg.short_side, cfg.crop_size, cfg.stride)
    cfg.short_side, cfg.crop_size, cfg.stride = 0, 64, 40
    try:
        torch_labels = segmenter.predict(image, CAMVID, mode="slide")
    finally:
        cfg.short_side, cfg.crop_size, cfg.stride = old
    assert (torch_labels == got).mean() >= 0.999


def test_embeddings_export_with_text_file_equals_baked_classes(
    segmenter: Segmenter, exported: dict[str, Path], tmp_path: Path
) -> None:
    text_file = tmp_path / "names.safetensors"
    PrecomputedText.from_teacher(segmenter.text_encoder, CAMVID).save(text_file)
    bare = OnnxSegmenter(exported["embeddings"], text_embeddings=text_file, threads=1)
    baked = OnnxSegmenter(exported["logits"], threads=1)
    x = np.random.default_rng(2).standard_normal((1, 3, 64, 96)).astype(np.float32)
    np.testing.assert_allclose(bare.logits(x, ["car", "road"]), baked.logits(x, ["car", "road"]), atol=1e-4)
    with pytest.raises(ValueError, match="text embeddings"):
        OnnxSegmenter(exported["embeddings"]).logits(x)
    with pytest.raises(ValueError, match=r"not in .*: zebra"):
        baked.logits(x, ["road", "zebra"])


BLOCK_TORCH = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "open_clip", "segmentation_models_pytorch", "timm"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from clipzss.cli import main
code = main(["predict", sys.argv[2], "--onnx", sys.argv[1], "--classes", "road,sky,car", "--mode", "whole",
             "--out", sys.argv[3]])
assert code == 0, code
assert not any(m.split(".")[0] == "torch" for m in sys.modules)
"""


def test_predict_onnx_runs_without_torch(exported: dict[str, Path], tmp_path: Path) -> None:
    image = tmp_path / "street.png"
    Image.fromarray((np.random.default_rng(3).random((48, 64, 3)) * 255).astype(np.uint8)).save(image)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH, str(exported["logits"]), str(image), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    mask = np.asarray(Image.open(out / "street_mask.png"))
    expected = OnnxSegmenter(exported["logits"]).predict(image, ["road", "sky", "car"], mode="whole")
    np.testing.assert_array_equal(mask, expected)
    overlay = Image.open(out / "street_overlay.png")
    assert overlay.width > 64 and overlay.height >= 48  # the photo plus a legend on its right


def test_cli_export(trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "two.onnx"
    assert main(["export", str(trained_checkpoint), "--onnx", str(path), "--classes", "road, sky"]) == 0
    assert "logits for 2 classes" in capsys.readouterr().out
    assert OnnxSegmenter(path).class_names == ["road", "sky"]
    assert main(["export", str(trained_checkpoint), "--onnx", str(path), "--classes", "road,road"]) == 2
    assert "duplicate class names: road" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing"), "--onnx", str(path)]) == 2


def test_cli_predict_onnx(exported: dict[str, Path], tmp_path: Path) -> None:
    if "--onnx" not in build_parser()._subparsers._group_actions[0].choices["predict"].format_help():
        pytest.skip("`clipzss predict` has no --onnx option in this build")
    image = tmp_path / "a.png"
    Image.fromarray(np.full((40, 60, 3), 128, dtype=np.uint8)).save(image)
    out = tmp_path / "pred"
    argv = [
        "predict",
        str(image),
        "--onnx",
        str(exported["logits"]),
        "--classes",
        "road,car",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert (out / "a_mask.png").is_file() and (out / "a_overlay.png").is_file()
    assert main([*argv[:-4], "--classes", "road,zebra", "--out", str(out)]) == 2
