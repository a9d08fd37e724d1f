"""The bad-input catalogue (docs/reliability.md): every user error is one line naming the problem, exit code 2, no
traceback; odd-but-valid inputs (grayscale, RGBA, palette, 16-bit, CMYK, EXIF-rotated, 1x1) just work."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipzss.cli import main
from clipzss.config import ConfigError, load_config
from clipzss.data import make_split
from clipzss.models.segmenter import Segmenter
from conftest import one_error_line


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height: enough to trip the decompression-bomb guard without the pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


@pytest.fixture
def predict(trained_checkpoint: Path, tmp_path: Path):
    def run(image: Path, classes: str = "cat,grass,sky") -> list[str]:
        return [
            "predict",
            str(image),
            "--checkpoint",
            str(trained_checkpoint),
            "--classes",
            classes,
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cpu",
        ]

    return run


# --- images that are not images ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty.jpg", b""),
        ("text.jpg", b"this is not a picture\n"),
        ("truncated.jpg", "truncated"),
        ("bomb.png", "bomb"),
    ],
)
def test_unreadable_images_are_named(name: str, content, predict, tmp_path: Path, capsys) -> None:
    path = tmp_path / name
    if content == "truncated":
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
            buf, "JPEG"
        )
        content = buf.getvalue()[: len(buf.getvalue()) // 3]
    elif content == "bomb":
        content = _png_header_only(20000, 20000)
    path.write_bytes(content)
    one_error_line(predict(path), capsys, "cannot read image", name)


def test_missing_image_and_folder_without_images(predict, tmp_path: Path, capsys) -> None:
    one_error_line(predict(tmp_path / "nope.jpg"), capsys, "image not found", "nope.jpg")
    (tmp_path / "empty").mkdir()
    one_error_line(predict(tmp_path / "empty"), capsys, "no images found in", "empty")


# --- odd but valid images ---------------------------------------------------------------------------------------


def _cmyk(path: Path) -> Image.Image:
    Image.new("CMYK", (30, 20), (0, 128, 128, 0)).save(path, "JPEG")
    return Image.open(path)


@pytest.mark.parametrize(
    ("mode", "size"),
    [
        ("L", (33, 21)),
        ("RGBA", (33, 21)),
        ("P", (33, 21)),
        ("I;16", (33, 21)),
        ("CMYK", (30, 20)),
        ("RGB", (1, 1)),
        ("LA", (5, 40)),
    ],
)
def test_any_image_mode_and_size_is_segmented(
    mode: str, size: tuple[int, int], predict, tmp_path: Path
) -> None:
    path = tmp_path / f"img_{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}"
    if mode == "CMYK":
        _cmyk(path)
    else:
        Image.new(mode, size).save(path)
    assert main(predict(path)) == 0
    mask = Image.open(tmp_path / "out" / f"{path.stem}_mask.png")
    assert mask.size == size


def test_exif_rotated_photo_is_segmented_upright(predict, tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": stored 40x20, shown 20x40
    Image.new("RGB", (40, 20), "red").save(path, exif=exif.tobytes())
    assert main(predict(path)) == 0
    assert Image.open(tmp_path / "out" / "rotated_mask.png").size == (20, 40)


# --- class lists ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("classes", "needle"),
    [
        ("", "class list is empty"),
        ("  ,  ", "class list is empty"),
        ("cat,,dog", "empty name"),
        ("cat,dog,cat", "duplicate class names: cat"),
    ],
)
def test_bad_class_lists(classes: str, needle: str, predict, tmp_path: Path, capsys) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    one_error_line(predict(image, classes), capsys, needle)


def test_unicode_and_very_long_class_lists(predict, tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (16, 12)).save(image)
    assert main(predict(image, "ñandú, 猫, café au lait, 🌳 tree")) == 0
    many = ",".join(f"class {i}" for i in range(300))  # more ids than a palette PNG holds
    assert main([*predict(image, many), "--overwrite"]) == 0  # the same image again: replacing is asked for
    mask = np.asarray(Image.open(tmp_path / "out" / "a_mask.png"))
    assert mask.shape == (12, 16) and mask.max() < 300 and mask.dtype != np.uint8


def test_api_rejects_bad_arrays_and_names(trained_checkpoint: Path) -> None:
    seg = Segmenter.from_checkpoint(trained_checkpoint, device="cpu")
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) image array, got shape \(4, 4, 5\)"):
        seg.predict(np.zeros((4, 4, 5), dtype=np.uint8), ["cat"])
    with pytest.raises(ValueError, match="class list is empty"):
        seg.predict(np.zeros((4, 4, 3), dtype=np.uint8), [])
    with pytest.raises(ValueError, match="did you mean 'pottedplant'"):
        make_split(["aeroplane", "pottedplant", "sofa"], ["potted plant x"], dataset=None)


# --- configs ----------------------------------------------------------------------------------------------------


def test_config_typos_suggest_the_right_key(capsys) -> None:
    one_error_line(["train", "train.max_iter=3"], capsys, "did you mean 'max_iters'")
    one_error_line(["train", "techer.weights=none"], capsys, "did you mean 'teacher'")
    with pytest.raises(ConfigError, match=r"method\.tau: expected a number"):
        load_config(None, ["method.tau=warm"])


# --- datasets ---------------------------------------------------------------------------------------------------


def _folder(root: Path, image_size=(16, 12), mask: np.ndarray | None = None) -> Path:
    (root / "val" / "images").mkdir(parents=True)
    (root / "val" / "masks").mkdir(parents=True)
    (root / "classes.txt").write_text("road\ncar\nsky\n")
    Image.new("RGB", image_size).save(root / "val" / "images" / "a.png")
    if mask is None:
        mask = np.zeros(image_size[::-1], dtype=np.uint8)
    Image.fromarray(mask).save(root / "val" / "masks" / "a.png")
    return root


def _eval(ckpt: Path, root: Path) -> list[str]:
    return [
        "eval",
        str(ckpt),
        "--dataset",
        "folder",
        "--data-root",
        str(root),
        "--unseen",
        "car",
        "--workers",
        "0",
        "--device",
        "cpu",
    ]


def test_empty_dataset_root(trained_checkpoint: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    one_error_line(_eval(trained_checkpoint, tmp_path / "empty"), capsys, "empty")


def test_mask_of_wrong_size(trained_checkpoint: Path, tmp_path: Path, capsys) -> None:
    root = _folder(tmp_path / "d", mask=np.zeros((5, 5), dtype=np.uint8))
    one_error_line(_eval(trained_checkpoint, root), capsys, "a.png")


def test_mask_ids_beyond_the_class_list(trained_checkpoint: Path, tmp_path: Path, capsys) -> None:
    mask = np.zeros((12, 16), dtype=np.uint8)
    mask[0, 0] = 7
    root = _folder(tmp_path / "d", mask=mask)
    one_error_line(_eval(trained_checkpoint, root), capsys, "a.png", "7")


def test_colour_mask_where_ids_are_expected(trained_checkpoint: Path, tmp_path: Path, capsys) -> None:
    root = _folder(tmp_path / "d")
    colour = np.zeros((12, 16, 3), dtype=np.uint8)
    colour[..., 0] = 128
    colour[:6, :, 1] = 64
    Image.fromarray(colour).save(root / "val" / "masks" / "a.png")
    one_error_line(_eval(trained_checkpoint, root), capsys, "a.png")


# --- outputs and checkpoints ------------------------------------------------------------------------------------


def test_output_folder_that_cannot_be_created(trained_checkpoint: Path, tmp_path: Path, capsys) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    one_error_line(
        [
            "predict",
            str(image),
            "--checkpoint",
            str(trained_checkpoint),
            "--classes",
            "a",
            "--out",
            str(blocker / "sub"),
        ],
        capsys,
        "file.txt",
    )


def test_tampered_checkpoint_header(trained_checkpoint: Path, tmp_path: Path, capsys) -> None:
    data = bytearray(trained_checkpoint.read_bytes())
    data[10:20] = b"}}}}}}}}}}"  # inside the JSON header
    bad = tmp_path / "tampered.safetensors"
    bad.write_bytes(bytes(data))
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    one_error_line(
        ["predict", str(image), "--checkpoint", str(bad), "--classes", "a"],
        capsys,
        "not a readable safetensors checkpoint",
        "tampered.safetensors",
    )


def test_resume_without_state(tmp_path: Path, capsys) -> None:
    one_error_line(
        ["train", "data.dataset=synthetic", "teacher.weights=none", "--resume", str(tmp_path)],
        capsys,
        "no training state to resume from",
    )


def test_malicious_training_state_is_refused_and_never_runs(tmp_path: Path, capsys) -> None:
    """A pickle that would run code when unpickled: weights_only loading refuses it, and nothing executes."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "run").mkdir()
    torch.save({"step": 1, "student": Exploit()}, tmp_path / "run" / "train_state.pt")
    one_error_line(
        ["train", "data.dataset=synthetic", "teacher.weights=none", "--resume", str(tmp_path / "run")],
        capsys,
        "cannot resume",
        "unsafe",
    )
    assert not marker.exists()
