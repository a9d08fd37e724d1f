"""check-data: passes on the real sample data, names every problem of a corrupted copy, histograms match a direct
count, and the usual label mistakes (1-based ids, colour masks, VOC colours) get their specific hint."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipzss.cli import main
from clipzss.data.doctor import check_data, detect_dataset
from clipzss.data.masks import voc_colormap


def _check(*args: str) -> int:
    return main(["check-data", *args, "--no-progress", "--workers", "2"])


def _camvid_copy(shared: Path, dst: Path, count: int = 8) -> list[str]:
    """A small copy of CamVid's val split in tmp_path (never touch ../shared)."""
    source = shared / "camvid"
    (dst / "val" / "images").mkdir(parents=True)
    (dst / "val" / "masks").mkdir(parents=True)
    shutil.copy(source / "classes.txt", dst / "classes.txt")
    stems = sorted(p.stem for p in (source / "val" / "images").glob("*.jpg"))[:count]
    for stem in stems:
        shutil.copy(source / "val" / "images" / f"{stem}.jpg", dst / "val" / "images")
        shutil.copy(source / "val" / "masks" / f"{stem}.png", dst / "val" / "masks")
    return stems


def test_passes_on_camvid_with_exact_histogram(shared_data: Path, capsys: pytest.CaptureFixture) -> None:
    root = shared_data / "camvid"
    assert _check(str(root), "--unseen", "car,tree,pedestrian") == 0
    out = capsys.readouterr().out
    assert "folder dataset at" in out and "(11 classes: 8 seen, 3 unseen)" in out
    assert "train: 367 image/label pairs, all checked" in out and "val: 101 image/label pairs" in out
    assert "unseen:" in out and "pedestrian" in out and "RESULT: OK" in out

    report = check_data(root, unseen=["car", "tree", "pedestrian"], splits=["val"], progress=False)
    pixels, images = np.zeros(11, np.int64), np.zeros(11, np.int64)
    ignored = 0
    for path in sorted((root / "val" / "masks").glob("*.png")):
        counts = np.bincount(np.asarray(Image.open(path)).ravel(), minlength=256)
        pixels += counts[:11]
        images += counts[:11] > 0
        ignored += int(counts[255])
    (val,) = report.splits
    assert val.pixels.tolist() == pixels.tolist() and val.images.tolist() == images.tolist()
    assert val.ignored == ignored and report.split.unseen == (5, 8, 9) and not report.warnings


def test_passes_on_voc_sample_and_says_it_is_a_subset(
    shared_data: Path, capsys: pytest.CaptureFixture
) -> None:
    root = shared_data / "voc-sample"
    assert detect_dataset(root) == "voc"
    assert _check(str(root)) == 0
    out = capsys.readouterr().out
    assert "voc val has 3 image/label pairs, 0.2% of the official 1,449: a subset" in out
    assert "train_aug (VOC + SBD)" in out and "RESULT: OK" in out and "(4 warning(s))" in out
    report = check_data(root, splits=["val"], progress=False)
    assert set(np.nonzero(report.splits[0].pixels)[0].tolist()) == {4, 5, 6, 8, 14, 17}  # from the masks
    assert _check(str(root), "--strict") == 1


def test_fails_precisely_on_a_corrupted_copy(shared_data: Path, tmp_path: Path, capsys) -> None:
    root = tmp_path / "camvid"
    a, b, c, d, e, *_ = _camvid_copy(shared_data, root)
    masks, images = root / "val" / "masks", root / "val" / "images"
    colours = np.array([[128, 128, 128], [128, 0, 0]], np.uint8)[
        np.asarray(Image.open(masks / f"{a}.png")) % 2
    ]
    Image.fromarray(colours).save(masks / f"{a}.png")  # a colour-coded label
    Image.fromarray(np.asarray(Image.open(masks / f"{b}.png"))[:-1]).save(masks / f"{b}.png")  # one row short
    ids = np.asarray(Image.open(masks / f"{c}.png")).copy()
    ids[0, :5] = 11  # one past the 11 classes
    Image.fromarray(ids).save(masks / f"{c}.png")
    (images / f"{d}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (masks / f"{e}.png").unlink()
    shutil.copy(masks / f"{b}.png", masks / "orphan.png")

    assert _check(str(root)) == 1
    out = capsys.readouterr().out
    assert "colour-coded labels where class ids are expected (1):" in out
    assert f"{a}.png: RGB image with 2 colours, e.g." in out and "palette.txt" in out
    assert f"{b}.jpg is 360x480 but its label {b}.png is 359x480 (H x W)" in out
    assert (
        f"values 11 (in 1 file(s), e.g. {c}.png) are not among the 11 classes (valid: 0..10 and 255 = ignore)"
        in out
    )
    assert f"unreadable files (1):\n    - image {images / d}.jpg" in out
    assert f"no mask for image {images / e}.jpg" in out
    assert "1 label file(s) without an image" in out and "orphan.png" in out
    assert "RESULT: FAILED — 5 problem(s)" in out


def _folder(root: Path, classes: list[str], masks: dict[str, np.ndarray]) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for name, mask in masks.items():
        Image.fromarray(np.zeros((*mask.shape[:2], 3), np.uint8)).save(root / "images" / f"{name}.png")
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    return root


def test_one_based_ids_are_named_as_such(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ids = np.array([[1, 2], [3, 3]], np.uint8)
    root = _folder(tmp_path / "d", ["road", "car", "tree"], {"x": ids, "y": ids})
    assert _check(str(root)) == 1
    out = capsys.readouterr().out
    assert "values 3 (in 2 file(s), e.g. x.png)" in out and "the ids look 1-based" in out


def test_palette_reads_colour_masks_and_names_unknown_colours(tmp_path: Path, capsys) -> None:
    palette = np.array([[128, 128, 128], [128, 64, 128], [0, 0, 192], [0, 0, 0]], np.uint8)
    ids = np.array([[0, 1, 1], [2, 3, 0]])
    root = _folder(tmp_path / "d", ["sky", "road", "car"], {"x": palette[ids], "y": palette[ids]})
    (root / "palette.txt").write_text("128 128 128 sky\n128,64,128\n#0000c0 car\n0 0 0 void\n")
    assert _check(str(root)) == 0
    report = check_data(root, progress=False)
    assert report.splits[0].pixels.tolist() == [4, 4, 2] and report.splits[0].ignored == 2
    rgb = palette[ids].copy()
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(root / "masks" / "y.png")
    capsys.readouterr()
    assert _check(str(root)) == 1
    out = capsys.readouterr().out
    assert "label colours not in the palette (1):" in out
    assert "y.png has 1 colour(s) not in" in out and "(1, 2, 3) × 1 px" in out


def test_voc_colours_saved_as_rgb_get_the_voc_hint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = tmp_path / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / folder).mkdir(parents=True)
    (base / "ImageSets/Segmentation/val.txt").write_text("2008_000001\n")
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(base / "JPEGImages/2008_000001.jpg")
    Image.fromarray(voc_colormap()[np.array([[0, 15, 255, 15, 0]] * 4)]).save(
        base / "SegmentationClass/2008_000001.png"
    )
    assert _check(str(tmp_path), "--dataset", "voc", "--split", "val") == 1
    assert "VOC's colour palette saved as RGB" in capsys.readouterr().out


def test_layout_errors_and_options(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _check(str(tmp_path)) == 2
    assert "cannot tell which dataset is in" in capsys.readouterr().err
    assert _check(str(shared_data / "voc-sample"), "--dataset", "voc", "--split", "test") == 1
    assert "test.txt not found; lists present: train, val" in capsys.readouterr().out
    assert _check(str(shared_data / "camvid"), "--unseen", "cars") == 1
    assert "unseen class 'cars' is not in the class list; did you mean 'car'?" in capsys.readouterr().out
    report = check_data(shared_data / "camvid", splits=["train"], max_images=5, progress=False)
    assert (report.splits[0].pairs, report.splits[0].checked) == (367, 5)


@pytest.mark.parametrize("command", ["check-data", "prepare-data"])
def test_help_shows_examples(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_sixteen_bit_label_sets(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # ADE-847 as detectron2 writes it: 16-bit .tif ids, 65535 = ignore, and 255 is a real class ("pier").
    base = tmp_path / "ADE20K_2021_17_01"
    (base / "images_detectron2" / "validation").mkdir(parents=True)
    (base / "annotations_detectron2" / "validation").mkdir(parents=True)
    ids = np.array([[0, 255, 846, 65535]] * 3, np.uint16)
    Image.fromarray(np.zeros((3, 4, 3), np.uint8)).save(base / "images_detectron2/validation/ADE_val_1.jpg")
    Image.fromarray(ids).save(base / "annotations_detectron2/validation/ADE_val_1.tif")
    assert detect_dataset(tmp_path) == "ade20k-full"
    report = check_data(tmp_path, splits=["val"], progress=False)
    pixels = report.splits[0].pixels
    assert report.ok and (pixels[0], pixels[255], pixels[846], report.splits[0].ignored) == (3, 3, 3, 3)
    assert report.split.num_classes == 847 and "ignore (65535)" in report.format()
    ids[0, 0] = 847
    Image.fromarray(ids).save(base / "annotations_detectron2/validation/ADE_val_1.tif")
    assert _check(str(tmp_path), "--split", "val") == 1
    assert (
        "values 847 (in 1 file(s), e.g. ADE_val_1.tif) are not among the 847 classes"
        in capsys.readouterr().out
    )
