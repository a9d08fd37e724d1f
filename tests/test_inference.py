"""The one inference rule (`clipzss.inference.inputs`): image loading, the mmseg test resize, preprocessing, and the
guarantee it exists for — `clipzss eval`, `clipzss predict` and `clipzss predict --onnx` see the same pixels."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipzss.checkpoint import load_checkpoint, save_checkpoint
from clipzss.cli import main
from clipzss.data.transforms import pil_to_tensor
from clipzss.evaluate import EvalResult
from clipzss.images import load_image, to_rgb
from clipzss.inference.inputs import inference_size, normalize, preprocess, rescale_size
from clipzss.inference.windows import infer_logits
from clipzss.models.segmenter import Segmenter
from conftest import shared_data_dir

# ---------------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize(
    ("image", "pixel"),
    [
        (Image.new("L", (5, 4), 100), (100, 100, 100)),
        (Image.new("LA", (5, 4), (100, 7)), (100, 100, 100)),
        (Image.new("RGBA", (5, 4), (10, 20, 30, 0)), (10, 20, 30)),
        (Image.new("CMYK", (5, 4), (0, 0, 0, 0)), (255, 255, 255)),
        (Image.new("1", (5, 4), 1), (255, 255, 255)),
        (Image.fromarray(np.full((4, 5), 65535, np.uint16)), (255, 255, 255)),
        (Image.fromarray(np.full((4, 5), 32896, np.uint16)), (128, 128, 128)),
        (Image.fromarray(np.full((4, 5), 0.5, np.float32)), (128, 128, 128)),
    ],
)
def test_to_rgb_modes(image: Image.Image, pixel: tuple[int, int, int]) -> None:
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (5, 4)
    assert rgb.getpixel((2, 1)) == pixel


def test_to_rgb_palette_with_transparency() -> None:
    image = Image.frombytes("P", (3, 2), bytes([0, 1, 1, 0, 1, 0]))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.info["transparency"] = 0
    rgb = to_rgb(image)
    assert rgb.getpixel((0, 0)) == (255, 0, 0) and rgb.getpixel((1, 0)) == (0, 0, 255)


def test_load_image_sixteen_bit_png(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 65535], [257, 25700]], np.uint16)).save(path)
    tensor = pil_to_tensor(load_image(path))
    assert tensor.shape == (3, 2, 2) and tensor.dtype == torch.uint8
    assert tensor[0].tolist() == [[0, 255], [1, 100]]


def test_load_image_applies_exif_orientation(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    Image.new("RGB", (40, 20), (200, 10, 10)).save(path, exif=exif)
    assert load_image(path).size == (20, 40)
    assert load_image(path, exif_transpose=False).size == (40, 20)


def test_load_image_corrupt_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"broken\.jpg"):
        load_image(path)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, format="JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[:200])
    with pytest.raises(ValueError, match=r"truncated\.jpg"):
        load_image(truncated)


# ---------------------------------------------------------------------------------------------------- sizes


def test_rescale_size_matches_mmseg_rule() -> None:
    assert rescale_size(360, 480, 512, 2048) == (512, 683)
    assert rescale_size(100, 1000, 512, 2048) == (205, 2048)  # the long side binds
    assert rescale_size(600, 400, 256, 1024) == (384, 256)


def test_test_size_caps_the_long_side_at_four_times_the_short() -> None:
    assert inference_size(360, 480, 64) == (64, 85)
    assert inference_size(360, 1800, 64) == (
        51,
        256,
    )  # 5:1: the long side binds, the short side ends below 64
    assert inference_size(360, 480, None) == (360, 480)


def test_preprocess_is_pil_bilinear_then_imagenet_normalisation() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    image = Image.fromarray(rgb)
    got = preprocess(image, 20)
    resized = np.asarray(image.resize((29, 20), Image.BILINEAR))  # inference_size(37, 53, 20) = (20, 29)
    x = torch.from_numpy(resized.copy()).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (x - mean.view(3, 1, 1)) / std.view(3, 1, 1)
    assert got.dtype == np.float32 and got.shape == (3, 20, 29)
    assert torch.equal(torch.from_numpy(got), expected)  # bit for bit: the same float32 operations
    assert np.array_equal(normalize(rgb), preprocess(image, None))
    # normalize looks bytes up in a table: every value of every channel gives the arithmetic's bits
    every = np.stack([np.arange(256, dtype=np.uint8).reshape(16, 16)] * 3, axis=-1)
    every[..., 1] = every[..., 1][::-1]
    x = torch.from_numpy(every.copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(torch.from_numpy(normalize(every)), (x - mean.view(3, 1, 1)) / std.view(3, 1, 1))
    assert normalize(Image.fromarray(every)).flags.c_contiguous


# ------------------------------------------------------------------------------------------- one rule, every path


def _camvid_with_panorama(shared_data: Path, root: Path) -> list[str]:
    """A folder dataset of three real CamVid val images and a 5:1 panorama tiled from one of them."""
    source = shared_data / "camvid"
    (root / "val" / "images").mkdir(parents=True)
    (root / "val" / "masks").mkdir(parents=True)
    shutil.copy(source / "classes.txt", root / "classes.txt")
    images = sorted((source / "val" / "images").glob("*.jpg"))[::30][:3]
    for path in images:
        shutil.copy(path, root / "val" / "images" / path.name)
        shutil.copy(
            source / "val" / "masks" / f"{path.stem}.png", root / "val" / "masks" / f"{path.stem}.png"
        )
    photo = np.asarray(Image.open(images[0]).convert("RGB"))
    mask = np.asarray(Image.open(source / "val" / "masks" / f"{images[0].stem}.png"))
    height = photo.shape[0]
    reps = -(-5 * height // photo.shape[1])
    Image.fromarray(np.tile(photo, (1, reps, 1))[:, : 5 * height]).save(
        root / "val" / "images" / "panorama.png"
    )
    Image.fromarray(np.tile(mask, (1, reps))[:, : 5 * height]).save(root / "val" / "masks" / "panorama.png")
    return [line.strip() for line in (root / "classes.txt").read_text().splitlines() if line.strip()]


def _confusion(truth: np.ndarray, pred: np.ndarray, k: int) -> torch.Tensor:
    keep = truth != 255
    return torch.from_numpy(np.bincount(truth[keep] * k + pred[keep], minlength=k * k).reshape(k, k))


@dataclasses.dataclass(frozen=True)
class CamvidModel:
    """What both modes of the eval/predict comparison read: none of it depends on the mode."""

    data: Path  # three CamVid val photos and a panorama, with their masks
    names: list[str]
    model: Path  # the trained checkpoint with small windows
    onnx_file: Path  # its ONNX export with every class baked in
    segmenter: Segmenter  # the reference's network, loaded once


@pytest.fixture(scope="module")
def camvid_model(trained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> CamvidModel:
    shared_data = shared_data_dir()
    if shared_data is None:
        pytest.skip("../shared/data is not present")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    root = tmp_path_factory.mktemp("camvid_model")
    data = root / "camvid4"
    names = _camvid_with_panorama(shared_data, data)
    ckpt = load_checkpoint(trained_checkpoint)
    # Small windows so that slide mode really slides (2×3 windows per photo, 2×8 on the panorama).
    cfg = dataclasses.replace(
        ckpt.config, eval=dataclasses.replace(ckpt.config.eval, crop_size=48, stride=32)
    )
    model = save_checkpoint(root / "model", ckpt.state_dict, cfg, **ckpt.meta)
    onnx_file = root / "model.onnx"
    assert main(["export", str(model), "--onnx", str(onnx_file), "--classes", ",".join(names)]) == 0
    segmenter = Segmenter.from_checkpoint(model, device="cpu")
    return CamvidModel(data, names, model, onnx_file, segmenter)


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_predict_masks_score_exactly_what_eval_scores(
    camvid_model: CamvidModel, tmp_path: Path, mode: str
) -> None:
    data, names, model = camvid_model.data, camvid_model.names, camvid_model.model
    unseen = "car,tree,pedestrian"

    common = ["--mode", mode, "--device", "cpu"]
    evaluated = ["eval", str(model), "--dataset", "folder", "--data-root", str(data), "--split", "val"]
    assert (
        main([*evaluated, "--unseen", unseen, "--max-images", "10", "--out", str(tmp_path / "eval"), *common])
        == 0
    )
    scored = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert scored["num_images"] == 4

    photos = sorted((data / "val" / "images").iterdir())
    classes = ",".join(names)
    assert main(["predict", *map(str, photos), "--checkpoint", str(model), "--classes", classes,
                 "--out", str(tmp_path / "torch"), *common]) == 0  # fmt: skip
    assert main(["predict", *map(str, photos), "--onnx", str(camvid_model.onnx_file),
                 "--out", str(tmp_path / "onnx"), "--mode", mode]) == 0  # fmt: skip

    segmenter = camvid_model.segmenter
    eval_cfg = dataclasses.replace(segmenter.eval_cfg, mode=mode)
    k = len(names)
    confusion = torch.zeros(k, k, dtype=torch.int64)
    for photo in photos:
        truth = np.asarray(Image.open(data / "val" / "masks" / f"{photo.stem}.png")).astype(np.int64)
        pred = np.asarray(Image.open(tmp_path / "torch" / f"{photo.stem}_mask.png")).astype(np.int64)
        assert pred.shape == truth.shape
        confusion += _confusion(truth, pred, k)
        # ONNX against torch: the same pixels but for float rounding, and exactly where the top two are apart.
        onnx_pred = np.asarray(Image.open(tmp_path / "onnx" / f"{photo.stem}_mask.png")).astype(np.int64)
        image = load_image(photo)
        x = torch.from_numpy(preprocess(image, eval_cfg.short_side))[None]
        with torch.no_grad():
            logits = infer_logits(segmenter.logits_fn(names), x, eval_cfg, (image.height, image.width))
        top2 = logits[0].topk(2, dim=0).values
        clear = (top2[0] - top2[1] > 1e-3).numpy()
        assert np.array_equal(logits[0].argmax(0).numpy(), pred)
        assert (onnx_pred == pred).mean() >= 0.999
        assert np.array_equal(onnx_pred[clear], pred[clear])
    split = {n: ("unseen" if n in unseen.split(",") else "seen") for n in names}
    seen = [i for i, n in enumerate(names) if split[n] == "seen"]
    unseen_ids = [i for i, n in enumerate(names) if split[n] == "unseen"]
    from_masks = EvalResult.from_matrix(confusion, names, seen, unseen_ids, len(photos), "mmseg")
    ious_eval = [row["IoU"] for row in scored["per_class"]]
    ious_masks = [None if row["IoU"] != row["IoU"] else row["IoU"] for row in from_masks.per_class]
    assert ious_masks == ious_eval  # exactly: the same confusion matrix
    assert sum(v is not None and v > 0 for v in ious_eval) >= 2  # a real comparison, not of empty scores
