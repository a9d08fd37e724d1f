"""prepare-data on tiny downloads in the official formats (tar/zip archives, SBD and Context .mat files, 182-id
stuffthingmaps), built here: exact id maps, lists, resumability, checksums, and the readers reading the output."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from clipzss.cli import main, prepare_data
from clipzss.config import Config, DataConfig, EvalConfig
from clipzss.data import build_dataset
from clipzss.data import prepare as prep
from clipzss.data.masks import voc_colormap
from clipzss.data.prepare import checksums, runner
from clipzss.data.splits import COCO_STUFF_CLASSES, CONTEXT59_CLASSES, STANDARD_UNSEEN
from clipzss.evaluate import evaluate

H, W = 6, 8


def _ids(values: list[int], dtype: type = np.uint8) -> np.ndarray:
    return np.resize(np.array(values), H * W).reshape(H, W).astype(dtype)


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _png(ids: np.ndarray, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(ids)
    if mode == "P":  # VOC's SegmentationClass: palette indices with the VOC colours
        image = image.convert("P")
        image.putpalette(voc_colormap().reshape(-1).tolist())
        image.frombytes(ids.astype(np.uint8).tobytes())
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _mat(variables: dict) -> bytes:
    buffer = io.BytesIO()
    savemat(buffer, variables)
    return buffer.getvalue()


def _archive(path: Path, files: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in files.items():
                archive.writestr(name, data)
        return path
    with tarfile.open(path, "w:gz" if path.name.endswith(("gz", "tgz")) else "w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _prepare(*args: str) -> int:
    return main(["prepare-data", *args, "--no-progress", "--workers", "2"])


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def _cfg(dataset: str, root: Path) -> Config:
    return Config(
        data=DataConfig(dataset=dataset, root=str(root), unseen=[]), eval=EvalConfig(short_side=None)
    )


# ---------------------------------------------------------------------------------------------------- mappings


def test_coco_stuff_mapping_has_171_targets_in_order() -> None:
    lut = prep.coco_stuff_lut()
    used = [i for i in range(182) if lut[i] != 255]
    assert len(used) == 171 and lut[used].tolist() == list(range(171))  # order kept
    assert (
        sorted(set(range(182)) - set(used)) == list(prep.COCO_STUFF_UNUSED_IDS)
        and len(prep.COCO_STUFF_UNUSED_IDS) == 11
    )
    assert (lut[182:] == 255).all()
    # COCO category ids (1-based) → stuffthingmap id (id - 1) → class name, checked against independent facts.
    by_coco_id = {1: "person", 13: "stop sign", 21: "cow", 25: "giraffe", 33: "suitcase", 34: "frisbee"}
    by_coco_id |= {41: "skateboard", 57: "carrot", 87: "scissors", 92: "banner", 182: "wood"}
    for coco_id, name in by_coco_id.items():
        assert COCO_STUFF_CLASSES[lut[coco_id - 1]] == name
    # The standard unseen COCO-Stuff indices (ZegCLIP's split) are the trainIds of those classes.
    assert [COCO_STUFF_CLASSES.index(n) for n in STANDARD_UNSEEN["coco-stuff"]][:7] == [
        19,
        23,
        28,
        29,
        36,
        51,
        76,
    ]


def test_context_tables() -> None:
    to59, to459 = prep.context_luts()
    assert len(prep.CONTEXT59_LABEL_IDS) == 59 == len(CONTEXT59_CLASSES)
    assert list(prep.CONTEXT59_LABEL_IDS) == sorted(prep.CONTEXT59_LABEL_IDS)  # alphabetical = id order
    assert [to59[i] for i in prep.CONTEXT59_LABEL_IDS] == list(range(1, 60))
    others = [i for i in range(460) if i not in prep.CONTEXT59_LABEL_IDS]
    assert (to59[others] == 0).all()  # unlabelled and the 400 other classes: background
    assert to459[0] == 65535 and to459[1:].tolist() == list(range(459))


def test_voc_colormap_known_colours() -> None:
    colours = voc_colormap()
    assert colours[0].tolist() == [0, 0, 0] and colours[1].tolist() == [128, 0, 0]
    assert colours[15].tolist() == [192, 128, 128] and colours[255].tolist() == [224, 224, 192]
    rgb = Image.fromarray(colours[_ids([0, 15, 255, 20])])  # a VOC mask re-saved as colour
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG")
    assert np.array_equal(prep.voc_png_ids(buffer.getvalue()), _ids([0, 15, 255, 20]))


def test_the_command_offers_every_preparer() -> None:
    # The command lists the datasets itself (its module imports no library); it must list exactly the preparers.
    assert tuple(prep.PREPARERS) == prepare_data.DATASETS


# ---------------------------------------------------------------------------------------------------- VOC + SBD

VOC_TRAIN, VOC_VAL = ["2008_000001", "2008_000002"], ["2008_000003"]
SBD_TRAIN, SBD_VAL = ["2008_000002", "2008_000003", "2008_000004"], ["2008_000005"]
ALL_IDS = [f"2008_00000{i}" for i in range(1, 6)]
VOC_MASKS = {i: _ids([0, 1 + k, 255]) for k, i in enumerate(VOC_TRAIN + VOC_VAL)}
SBD_MASKS = {
    i: _ids([0, 10 + k, 20])
    for k, i in enumerate(["2008_000002", "2008_000003", "2008_000004", "2008_000005"])
}


def _voc_files() -> dict[str, bytes]:
    base = "VOCdevkit/VOC2012/"
    files = {f"{base}JPEGImages/{i}.jpg": _jpeg(k) for k, i in enumerate(ALL_IDS)}
    files |= {f"{base}SegmentationClass/{i}.png": _png(m, "P") for i, m in VOC_MASKS.items()}
    files |= {f"{base}Annotations/{i}.xml": b"<annotation/>" for i in ALL_IDS}  # not needed: not extracted
    for name, ids in (("train", VOC_TRAIN), ("val", VOC_VAL), ("trainval", VOC_TRAIN + VOC_VAL)):
        files[f"{base}ImageSets/Segmentation/{name}.txt"] = "".join(f"{i}\n" for i in ids).encode()
    return files


def _sbd_files() -> dict[str, bytes]:
    base = "benchmark_RELEASE/dataset/"
    files = {
        f"{base}cls/{i}.mat": _mat({"GTcls": {"Segmentation": m, "CategoriesPresent": np.unique(m[m > 0])}})
        for i, m in SBD_MASKS.items()
    }
    files |= {f"{base}inst/{i}.mat": _mat({"GTinst": {"Segmentation": m}}) for i, m in SBD_MASKS.items()}
    files[f"{base}train.txt"] = "".join(f"{i}\n" for i in SBD_TRAIN).encode()
    files[f"{base}val.txt"] = "".join(f"{i}\n" for i in SBD_VAL).encode()
    return files


def _check_voc_output(dst: Path) -> None:
    base = dst / "VOCdevkit" / "VOC2012"
    lists = base / "ImageSets" / "Segmentation"
    # (VOC train ∪ SBD train ∪ SBD val) − VOC val, and mmseg's aug = SBD − VOC train − VOC val
    assert lists.joinpath("train_aug.txt").read_text().split() == [
        "2008_000001",
        "2008_000002",
        "2008_000004",
        "2008_000005",
    ]
    assert lists.joinpath("aug.txt").read_text().split() == ["2008_000004", "2008_000005"]
    aug = base / "SegmentationClassAug"
    assert sorted(p.stem for p in aug.glob("*.png")) == ALL_IDS
    for name, ids in VOC_MASKS.items():  # VOC's annotation wins over SBD's for 2008_000002 and _000003
        assert np.array_equal(_read(aug / f"{name}.png"), ids)
    for name in ("2008_000004", "2008_000005"):
        assert np.array_equal(_read(aug / f"{name}.png"), SBD_MASKS[name])
    train = build_dataset(_cfg("voc", dst), "train", train=False)
    assert [s.name for s in train.samples] == ["2008_000001", "2008_000002", "2008_000004", "2008_000005"]
    mask = train[2]["mask"].numpy()  # SBD 2008_000004: raw [0, 12, 20] → reduce_zero_label → [255, 11, 19]
    assert np.array_equal(mask, _ids([255, 11, 19]).astype(np.int64))
    assert len(build_dataset(_cfg("voc", dst), "val", train=False)) == 1


def test_prepare_voc_from_archives_then_idempotent(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    voc = _archive(tmp_path / "dl" / "voc2012.tar", _voc_files())
    sbd = _archive(tmp_path / "dl" / "sbd.tgz", _sbd_files())
    dst = tmp_path / "voc"
    assert _prepare("voc", "--src", str(voc), str(sbd), "--dst", str(dst)) == 0
    out = capsys.readouterr().out
    _check_voc_output(dst)
    assert not (dst / "VOCdevkit" / "VOC2012" / "Annotations").exists()  # only what is needed is extracted
    assert "SBD .mat -> SegmentationClassAug: 2 written" in out  # 2008_000002/3 come from VOC instead
    assert "split train: 4 image/label pairs  (expected 10,582: a subset?)" in out
    assert "= 4 ids" in out and "no published checksum" in out

    stamps = {p: p.stat().st_mtime_ns for p in dst.rglob("*.png")}
    assert _prepare("voc", "--src", str(tmp_path / "dl"), "--dst", str(dst)) == 0  # the folder holding both
    out = capsys.readouterr().out
    assert "SBD .mat -> SegmentationClassAug: 0 written, 2 already done" in out
    assert "VOC masks -> SegmentationClassAug: 0 written, 3 already done" in out
    assert {p: p.stat().st_mtime_ns for p in dst.rglob("*.png")} == stamps
    _check_voc_output(dst)


def test_prepare_voc_from_extracted_folders_links_images(tmp_path: Path) -> None:
    src = _write_tree(tmp_path / "src", _voc_files() | _sbd_files())
    dst = tmp_path / "out"
    assert _prepare("voc", "--src", str(src), "--dst", str(dst)) == 0
    images = dst / "VOCdevkit" / "VOC2012" / "JPEGImages"
    assert (
        images.is_symlink() and images.resolve() == (src / "VOCdevkit" / "VOC2012" / "JPEGImages").resolve()
    )
    _check_voc_output(dst)
    copied = tmp_path / "copied"
    assert _prepare("voc", "--src", str(src), "--dst", str(copied), "--copy-images") == 0
    images = copied / "VOCdevkit" / "VOC2012" / "JPEGImages"
    assert not images.is_symlink() and len(list(images.glob("*.jpg"))) == 5


def test_prepare_voc_without_sbd_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    voc = _archive(tmp_path / "voc2012.tar", _voc_files())
    assert _prepare("voc", "--src", str(voc), "--dst", str(tmp_path / "out")) == 0
    out = capsys.readouterr().out
    assert "no SBD found (benchmark.tgz)" in out and "1,464 images" in out
    assert "split train: 2 image/label pairs" in out


def test_interrupted_run_leaves_no_partial_file_and_resumes(tmp_path: Path, monkeypatch, capsys) -> None:
    voc = _archive(tmp_path / "voc2012.tar", _voc_files())
    sbd = _archive(tmp_path / "sbd.tgz", _sbd_files())
    dst = tmp_path / "out"
    aug = dst / "VOCdevkit" / "VOC2012" / "SegmentationClassAug"
    aug.mkdir(parents=True)
    stale = aug / ".2008_000004.png.0badf00d.tmp"  # what a killed run leaves behind (clipzss.files' name)
    stale.write_bytes(b"\x89PNG half a file")
    save = Image.Image.save

    def dies_halfway(self: Image.Image, fp, *args, **kwargs) -> None:
        if "2008_000005" in str(fp):
            Path(fp).write_bytes(b"\x89PNG trunc")
            raise OSError("disk full")
        save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", dies_halfway)
    assert _prepare("voc", "--src", str(voc), str(sbd), "--dst", str(dst)) == 1
    out = capsys.readouterr().out
    assert "FAILED benchmark_RELEASE/dataset/cls/2008_000005.mat: disk full" in out
    assert not (aug / "2008_000005.png").exists()  # never a half-written label file
    assert not stale.exists() and not list(aug.glob(".*.tmp"))
    assert (aug / "2008_000004.png").is_file()

    monkeypatch.setattr(Image.Image, "save", save)
    assert _prepare("voc", "--src", str(voc), str(sbd), "--dst", str(dst)) == 0
    assert "SBD .mat -> SegmentationClassAug: 1 written, 1 already done" in capsys.readouterr().out
    _check_voc_output(dst)


def test_output_files_get_the_permissions_of_the_umask(tmp_path: Path) -> None:
    # The atomic writer's temporaries are private (0600); a prepared dataset is often shared, so its files are not.
    umask = os.umask(0o022)
    os.umask(umask)
    runner.write_bytes(tmp_path / "list.txt", b"2008_000001\n")
    assert (tmp_path / "list.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_checksums_of_official_archives(tmp_path: Path, monkeypatch, capsys) -> None:
    voc = _archive(tmp_path / "VOCtrainval_11-May-2012.tar", _voc_files())
    dst = tmp_path / "out"
    assert _prepare("voc", "--src", str(voc), "--dst", str(dst)) == 2
    err = capsys.readouterr().err
    assert (
        "VOCtrainval_11-May-2012.tar: md5" in err
        and "differs from the published 6cd6e144f989b92b3379bac3b3de84fd" in err
    )
    assert not (dst / "VOCdevkit").exists()  # nothing written from a bad download

    actual = hashlib.md5(voc.read_bytes()).hexdigest()
    monkeypatch.setitem(prep.ARCHIVE_CHECKSUMS, voc.name, ("md5", actual))
    assert _prepare("voc", "--src", str(voc), "--dst", str(dst)) == 0
    monkeypatch.setattr(checksums, "file_digest", lambda *a, **k: pytest.fail("verified twice"))
    assert _prepare("voc", "--src", str(voc), "--dst", str(dst)) == 0  # remembered per size and mtime
    assert _prepare("voc", "--src", str(voc), "--dst", str(dst), "--no-verify") == 0
    assert "checksum not verified (--no-verify)" in capsys.readouterr().out


def test_missing_and_corrupt_sources(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sbd = _archive(tmp_path / "benchmark.tgz", _sbd_files())
    assert _prepare("voc", "--src", str(sbd), "--dst", str(tmp_path / "out"), "--no-verify") == 2
    err = capsys.readouterr().err
    assert "PASCAL VOC 2012 trainval (VOCtrainval_11-May-2012.tar, from http://host.robots.ox.ac.uk" in err
    assert _prepare("voc", "--src", str(tmp_path / "nowhere"), "--dst", str(tmp_path / "out")) == 2
    assert "source" in capsys.readouterr().err
    broken = tmp_path / "voc.tar"
    broken.write_bytes(_archive(tmp_path / "whole.tar", _voc_files()).read_bytes()[:3000])
    with pytest.raises(ValueError, match=r"cannot read archive .*voc\.tar"):
        prep.prepare("voc", [broken, sbd], tmp_path / "out", verify=False, progress=False)


def test_archive_cut_inside_a_member_is_one_line_with_no_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Cut in the middle of a file's bytes, a tar is first noticed when that entry is read, after the listing."""
    whole = _archive(tmp_path / "whole.tar", _voc_files())
    jpeg = next(name for name in _voc_files() if name.endswith(".jpg"))
    with tarfile.open(whole) as archive:
        member = archive.getmember(jpeg)
    cut = tmp_path / "VOCtrainval_11-May-2012.tar"
    cut.write_bytes(whole.read_bytes()[: member.offset_data + member.size // 2])
    sbd = _archive(tmp_path / "benchmark.tgz", _sbd_files())
    assert _prepare("voc", "--src", str(cut), str(sbd), "--dst", str(tmp_path / "out"), "--no-verify") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(
        f"clipzss prepare-data: error: cannot read archive {cut} (corrupt or truncated"
    ), err
    assert not any("Traceback" in line or "ReadError" in line for line in err), err


# ---------------------------------------------------------------------------------------------------- COCO-Stuff


def test_prepare_coco_stuff(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    raw = _ids([0, 11, 12, 91, 181, 255, 20])  # 11 is an unused COCO id
    maps = {"train2017/000000000001.png": _png(raw), "val2017/000000000002.png": _png(_ids([24, 255]))}
    maps["train2017/000000000003.png"] = _png(_ids([1, 200]))  # not a stuffthingmap id
    stuff = _archive(tmp_path / "dl" / "stuff.zip", maps)
    val = _archive(tmp_path / "dl" / "val2017.zip", {"val2017/000000000002.jpg": _jpeg(2)})
    train = _write_tree(tmp_path / "coco", {"train2017/000000000001.jpg": _jpeg(1)}) / "train2017"
    dst = tmp_path / "coco_stuff164k"
    assert (
        _prepare("coco-stuff", "--src", str(stuff), str(val), str(train), "--dst", str(dst), "--no-verify")
        == 1
    )
    out = capsys.readouterr().out
    assert "FAILED train2017/000000000003.png" in out and "[200]" in out
    ann = dst / "annotations"
    assert np.array_equal(
        _read(ann / "train2017" / "000000000001_labelTrainIds.png"), _ids([0, 255, 11, 80, 170, 255, 19])
    )
    assert np.array_equal(_read(ann / "val2017" / "000000000002_labelTrainIds.png"), _ids([23, 255]))
    assert not (ann / "train2017" / "000000000003_labelTrainIds.png").exists()
    assert (dst / "images" / "train2017").is_symlink() and (
        dst / "images" / "val2017" / "000000000002.jpg"
    ).is_file()
    dataset = build_dataset(_cfg("coco-stuff", dst), "val", train=False)
    assert np.array_equal(dataset[0]["mask"].numpy(), _ids([23, 255]).astype(np.int64))  # "giraffe"


def test_prepare_coco_stuff_in_place(tmp_path: Path) -> None:
    # mmseg's instructions unzip the stuffthingmaps into annotations/ and convert there.
    root = _write_tree(
        tmp_path / "coco_stuff164k",
        {
            "images/val2017/000000000002.jpg": _jpeg(2),
            "annotations/val2017/000000000002.png": _png(_ids([0, 181])),
        },
    )
    assert _prepare("coco-stuff", "--src", str(root), "--dst", str(root)) == 0
    assert np.array_equal(_read(root / "annotations/val2017/000000000002_labelTrainIds.png"), _ids([0, 170]))
    assert not (root / "images" / "val2017").is_symlink()


# ---------------------------------------------------------------------------------------------------- Context


def _context_files(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    ids = ["2008_000001", "2008_000002", "2008_000003"]
    base = "VOCdevkit/VOC2010/"
    files = {f"{base}JPEGImages/{i}.jpg": _jpeg(k) for k, i in enumerate([*ids, "2008_000009"])}
    files[f"{base}ImageSets/Main/train.txt"] = b"2008_000001\n2008_000002\n2008_000009\n"  # 9: no annotation
    files[f"{base}ImageSets/Main/val.txt"] = b"2008_000003\n"
    voc = _archive(tmp_path / "dl" / "VOCtrainval_03-May-2010.tar", files)
    labels = {
        "2008_000001": _ids([0, 2, 9, 458, 1, 100], np.uint16),  # unlabelled, aeroplane, bag, wood, 2 others
        "2008_000002": _ids([427, 459], np.uint16),  # tvmonitor and the last of the 459
        "2008_000003": _ids([65, 0], np.uint16),  # cat
    }
    names = [f"other{i}" for i in range(1, 460)]
    for label_id, name in zip(prep.CONTEXT59_LABEL_IDS, CONTEXT59_CLASSES, strict=True):
        names[label_id - 1] = name
    mats = {f"trainval/{i}.mat": _mat({"LabelMap": m}) for i, m in labels.items()}
    mats["labels.txt"] = "".join(f"{i}: {n}\n" for i, n in enumerate(names, start=1)).encode()
    return voc, _archive(tmp_path / "dl" / "trainval.tar.gz", mats), labels


def test_prepare_context_59_and_459(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    voc, context, _ = _context_files(tmp_path)
    dst = tmp_path / "context"
    assert _prepare("context", "--src", str(voc), str(context), "--dst", str(dst), "--no-verify") == 0
    out = capsys.readouterr().out
    base = dst / "VOCdevkit" / "VOC2010"
    assert np.array_equal(_read(base / "SegmentationClassContext/2008_000001.png"), _ids([0, 1, 2, 59, 0, 0]))
    wide = _read(base / "SegmentationClassContext459/2008_000001.png")
    assert wide.dtype == np.uint16 and np.array_equal(wide, _ids([65535, 1, 8, 457, 0, 99], np.uint16))
    lists = base / "ImageSets" / "SegmentationContext"
    assert lists.joinpath("train.txt").read_text().split() == ["2008_000001", "2008_000002"]
    assert lists.joinpath("val.txt").read_text().split() == ["2008_000003"]
    assert "split train: 2 image/label pairs" in out and "context-459" in out

    ctx59 = build_dataset(_cfg("context", dst), "train", train=False)
    assert np.array_equal(ctx59[1]["mask"].numpy(), _ids([54, 255]).astype(np.int64))  # tvmonitor, background
    ctx459 = build_dataset(_cfg("context-459", dst), "train", train=False)
    assert len(ctx459.class_names) == 459 and ctx459.ignore_index == 65535
    assert ctx459.class_names[426] == "tvmonitor"
    assert np.array_equal(ctx459[1]["mask"].numpy(), _ids([426, 458], np.int64))
    with pytest.raises(ValueError, match="evaluation-only"):
        build_dataset(_cfg("context-459", dst), "train", train=True)

    def predict_tvmonitor(images: torch.Tensor) -> torch.Tensor:  # (N, 3, h, w) → (N, 459, h, w)
        logits = torch.zeros(images.shape[0], 459, *images.shape[-2:])
        logits[:, 426] = 1.0
        return logits

    result = evaluate(
        predict_tvmonitor, ctx459, EvalConfig(mode="whole", short_side=None)
    )  # 65535 is ignored
    iou = {row["name"]: row["IoU"] for row in result.per_class}
    # tvmonitor: 24 true pixels, predicted on all 88 labelled ones (40 + 48; the 8 pixels at 65535 do not count)
    assert result.num_images == 2 and iou["tvmonitor"] == pytest.approx(100 * 24 / 88)


def test_context_labels_mismatch_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    voc, context, _ = _context_files(tmp_path)
    shifted = tmp_path / "labels.txt"
    shifted.write_text("".join(f"{i}: name{i}\n" for i in range(1, 460)))
    dst = tmp_path / "context"
    with tarfile.open(context) as archive:  # the same annotations without their labels.txt
        members = {m.name: archive.extractfile(m).read() for m in archive if m.name != "labels.txt"}
    bare = _archive(tmp_path / "bare.tar.gz", members)
    assert _prepare("context", "--src", str(voc), str(bare), "--dst", str(dst), "--no-verify") == 0
    assert "no labels.txt" in capsys.readouterr().out
    assert (
        _prepare("context", "--src", str(voc), str(bare), str(shifted), "--dst", str(dst), "--no-verify") == 0
    )
    assert "id 2 is 'name2', expected Context-59 class 'aeroplane'" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- ADE20K


def test_prepare_ade20k_zip(tmp_path: Path) -> None:
    base = "ADEChallengeData2016/"
    files = {
        f"{base}images/validation/ADE_val_00000001.jpg": _jpeg(1),
        f"{base}annotations/validation/ADE_val_00000001.png": _png(_ids([0, 1, 150])),
        f"{base}images/training/ADE_train_00000001.jpg": _jpeg(2),
        f"{base}annotations/training/ADE_train_00000001.png": _png(_ids([3])),
        f"{base}objectInfo150.txt": b"Idx\tRatio\tTrain\tVal\tName\n",
    }
    archive = _archive(tmp_path / "ADEChallengeData2016.zip", files)
    dst = tmp_path / "ade"
    assert _prepare("ade20k", "--src", str(archive), "--dst", str(dst), "--no-verify") == 0
    dataset = build_dataset(_cfg("ade20k", dst), "val", train=False)
    assert np.array_equal(dataset[0]["mask"].numpy(), _ids([255, 0, 149]).astype(np.int64))
    assert (dst / "ADEChallengeData2016" / "objectInfo150.txt").is_file()


def _ade_seg(object_ids: np.ndarray) -> bytes:
    """ADE20K's *_seg.png encoding: R = id // 256 * 10, G = id % 256, B = instance (anything)."""
    rgb = np.stack([object_ids // 256 * 10, object_ids % 256, np.full_like(object_ids, 7)], -1).astype(
        np.uint8
    )
    return _png(rgb)


def test_prepare_ade20k_full_847(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from clipzss.data.ade847 import ADE847_CLASSES, ADE847_OBJECT_IDS

    assert len(ADE847_CLASSES) == len(set(ADE847_CLASSES)) == len(set(ADE847_OBJECT_IDS)) == 847
    assert (ADE847_OBJECT_IDS[0], ADE847_CLASSES[0]) == (2978, "wall")
    assert (ADE847_OBJECT_IDS[255], ADE847_CLASSES[255]) == (1857, "pier")  # a real class at 255
    objects = _ids(
        [2978, 1857, 3148, 5, 0], np.int64
    )  # wall, pier, adding machine, not in the 847, unlabelled
    big = np.resize(np.array([2978, 3148]), (513, 600))
    base = "ADE20K_2021_17_01/images/ADE/"
    files = {
        f"{base}validation/urban/street/ADE_val_00000001.jpg": _jpeg(1),
        f"{base}validation/urban/street/ADE_val_00000001_seg.png": _ade_seg(objects),
        f"{base}validation/urban/street/ADE_val_00000001_parts_1.png": _png(_ids([0])),
        f"{base}training/home/kitchen/ADE_train_00000001.jpg": _png(np.zeros((513, 600, 3), np.uint8)),
        f"{base}training/home/kitchen/ADE_train_00000001_seg.png": _ade_seg(big),
    }
    archive = _archive(tmp_path / "ADE20K_2021_17_01.zip", files)
    dst = tmp_path / "ade"
    assert _prepare("ade20k", "--src", str(archive), "--dst", str(dst), "--no-verify") == 0
    out = capsys.readouterr().out
    assert "ADE20K full -> ADE-847: 2 written" in out and "split ade20k-full val: 1 image/label pairs" in out
    root = dst / "ADE20K_2021_17_01"
    ids = _read(root / "annotations_detectron2/validation/ADE_val_00000001.tif")
    assert ids.dtype == np.uint16 and np.array_equal(ids, _ids([0, 255, 846, 65535, 65535], np.uint16))
    resized = _read(root / "annotations_detectron2/training/ADE_train_00000001.tif")
    assert resized.shape == (512, 599) and set(np.unique(resized).tolist()) == {0, 846}  # detectron2's rule
    assert Image.open(root / "images_detectron2/training/ADE_train_00000001.jpg").size == (599, 512)
    dataset = build_dataset(_cfg("ade20k-full", dst), "val", train=False)
    assert (
        dataset.class_names[846] == "adding machine, totalizer, totaliser" and dataset.ignore_index == 65535
    )
    assert np.array_equal(dataset[0]["mask"].numpy(), _ids([0, 255, 846, 65535, 65535], np.int64))
    assert _prepare("ade20k", "--src", str(archive), "--dst", str(dst), "--no-verify") == 0
    assert "ADE20K full -> ADE-847: 0 written, 2 already done" in capsys.readouterr().out
