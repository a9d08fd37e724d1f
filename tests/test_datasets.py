"""Dataset readers on tiny layouts written here, the real sample data, bad-data errors and synthetic scenes."""

from __future__ import annotations

import pickle
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from clipzss.cli import user_message
from clipzss.config import Config, DataConfig, EvalConfig
from clipzss.data.build import build_dataset
from clipzss.data.datasets import FileDataset
from clipzss.data.masks import class_ids, read_palette
from clipzss.data.readers import Sample, read_listing
from clipzss.data.scenes import SYNTHETIC_CLASSES, SYNTHETIC_UNSEEN, SyntheticScenes
from clipzss.data.splits import DATASET_CLASSES, VOID_INDEX, make_split
from clipzss.data.transforms import build_eval_transform
from conftest import one_error_line

H, W = 6, 8


def _cfg(dataset: str, root: Path | str, **data: object) -> Config:
    return Config(
        data=DataConfig(dataset=dataset, root=str(root), crop_size=8, scale=8, **data),
        eval=EvalConfig(short_side=12),
    )


def _raw_ids(values: list[int]) -> np.ndarray:
    """An (H, W) id map that holds every value of ``values`` (tiled in order)."""
    return np.resize(np.array(values, dtype=np.int64), H * W).reshape(H, W)


def _write_image(path: Path, size_hw: tuple[int, int] = (H, W)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    Image.fromarray(rng.integers(0, 256, (*size_hw, 3), dtype=np.uint8)).save(path)


def _write_mask(path: Path, ids: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":  # VOC style: palette indices
        image = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.astype(np.uint8).tobytes())
        image.putpalette([(i * 37) % 256 for i in range(768)])
    elif mode == "I;16":
        image = Image.fromarray(ids.astype(np.uint16))
    else:
        image = Image.fromarray(ids.astype(np.uint8))
    image.save(path)


def _write_voc(base: Path, raw: np.ndarray, ids=("a", "b"), folder="SegmentationClass", mode="P") -> None:
    sets = base / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        (sets / f"{split}.txt").write_text("\n".join(ids) + "\n")
    for name in ids:
        _write_image(base / "JPEGImages" / f"{name}.jpg")
        _write_mask(base / folder / f"{name}.png", raw, mode)


def _mask_of(dataset, index: int = 0) -> np.ndarray:
    return dataset[index]["mask"].numpy()


# ---------------------------------------------------------------------------------------------------- layouts


VOC_RAW = [0, 1, 15, 20, 255]
VOC_IDS = [255, 0, 14, 19, 255]  # reduce_zero_label: 0 → 255, k → k - 1, 255 stays


@pytest.mark.parametrize("where", ["VOC2012", "", "VOCdevkit/VOC2012"])
def test_voc_reduce_zero_label_and_roots(tmp_path: Path, where: str) -> None:
    base = tmp_path / "VOCdevkit" / "VOC2012"
    _write_voc(base, _raw_ids(VOC_RAW))
    root = {"VOC2012": base, "": tmp_path / "VOCdevkit", "VOCdevkit/VOC2012": tmp_path}[where]
    dataset = build_dataset(_cfg("voc", root), "val", train=False)
    assert len(dataset) == 2 and dataset.class_names == DATASET_CLASSES["voc"]
    assert dataset.unseen == (15, 16, 17, 18, 19)
    item = dataset[0]
    assert item["name"] == "a" and item["image"].shape == (3, 12, 16) and item["image"].dtype == torch.float32
    assert item["mask"].dtype == torch.int64
    assert np.array_equal(item["mask"].numpy(), _raw_ids(VOC_IDS))


def test_voc_train_aug_list_preferred(tmp_path: Path) -> None:
    base = tmp_path / "VOC2012"
    _write_voc(base, _raw_ids([1]), ids=("a",))
    _write_voc(base, _raw_ids([2]), ids=("a", "c"), folder="SegmentationClassAug", mode="L")
    (base / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("a\nc\n")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("a\n")
    train = build_dataset(_cfg("voc", base, unseen=[]), "train", train=False)
    assert [s.name for s in train.samples] == ["a", "c"]
    assert set(_mask_of(train).ravel()) == {1}  # SegmentationClassAug's id 2 → 1
    val = build_dataset(_cfg("voc", base), "val", train=False)
    assert [s.name for s in val.samples] == ["a"]
    assert set(_mask_of(val).ravel()) == {0}  # val reads SegmentationClass


def test_voc_mmseg_aug_union_and_deeplab_lines(tmp_path: Path) -> None:
    base = tmp_path / "VOC2012"
    _write_voc(base, _raw_ids([1]), ids=("a", "b"))
    _write_voc(base, _raw_ids([3]), ids=("b", "c"), folder="SegmentationClassAug", mode="L")
    sets = base / "ImageSets" / "Segmentation"
    sets.joinpath("aug.txt").write_text("b\n/JPEGImages/c.jpg /SegmentationClassAug/c.png\n")
    sets.joinpath("train.txt").write_text("a\nb\n")
    dataset = build_dataset(_cfg("voc", base), "train", train=False)
    assert [s.name for s in dataset.samples] == ["a", "b", "c"]  # train.txt ∪ aug.txt, first occurrence wins
    assert dataset.samples[1].mask.parent.name == "SegmentationClass"
    assert set(_mask_of(dataset, 2).ravel()) == {2}


def test_coco_stuff_label_train_ids(tmp_path: Path) -> None:
    _write_image(tmp_path / "images" / "val2017" / "000001.jpg")
    _write_mask(
        tmp_path / "annotations" / "val2017" / "000001_labelTrainIds.png", _raw_ids([0, 19, 170, 255])
    )
    dataset = build_dataset(_cfg("coco_stuff", tmp_path), "val", train=False)  # "_" works too
    assert len(DATASET_CLASSES["coco-stuff"]) == 171 and len(dataset.unseen) == 15
    assert np.array_equal(_mask_of(dataset), _raw_ids([0, 19, 170, 255]))  # no offset for the 164k trainIds


def test_context59_reduce_zero_label(tmp_path: Path) -> None:
    base = tmp_path / "VOCdevkit" / "VOC2010"
    (base / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (base / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000001\n")
    _write_image(base / "JPEGImages" / "2008_000001.jpg")
    _write_mask(base / "SegmentationClassContext" / "2008_000001.png", _raw_ids([0, 1, 59, 255]))
    dataset = build_dataset(_cfg("context", tmp_path), "val", train=False)
    assert dataset.class_names == DATASET_CLASSES["context"] and len(dataset.seen) == 49
    assert np.array_equal(_mask_of(dataset), _raw_ids([255, 0, 58, 255]))


def test_ade20k_reduce_zero_label_and_eval_only(tmp_path: Path) -> None:
    base = tmp_path / "ADEChallengeData2016"
    _write_image(base / "images" / "validation" / "ADE_val_00000001.jpg")
    _write_mask(base / "annotations" / "validation" / "ADE_val_00000001.png", _raw_ids([0, 1, 150]))
    dataset = build_dataset(_cfg("ade20k", tmp_path), "val", train=False)
    assert dataset.unseen == () and len(dataset.class_names) == 150
    assert np.array_equal(_mask_of(dataset), _raw_ids([255, 0, 149]))
    with pytest.raises(ValueError, match="evaluation-only"):
        build_dataset(_cfg("ade20k", tmp_path), "train", train=True)


def _write_folder(root: Path, split: str | None, ids: np.ndarray, mode: str = "L") -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("sky\nroad\ncar\ntree\n\n")
    base = root / split if split else root
    for name in ("x", "y"):
        _write_image(base / "images" / f"{name}.png")
        _write_mask(base / "masks" / f"{name}.png", ids, mode)


@pytest.mark.parametrize("split_folder", [True, False])
def test_folder_dataset(tmp_path: Path, split_folder: bool) -> None:
    _write_folder(tmp_path, "val" if split_folder else None, _raw_ids([0, 1, 2, 3, 255]))
    dataset = build_dataset(_cfg("folder", tmp_path, unseen=["car"]), "val", train=False)
    assert dataset.class_names == ("sky", "road", "car", "tree")
    assert dataset.seen == (0, 1, 3) and dataset.unseen == (2,)
    assert [dataset[i]["name"] for i in range(len(dataset))] == ["x", "y"]
    assert np.array_equal(_mask_of(dataset), _raw_ids([0, 1, 2, 3, 255]))


def test_folder_dataset_sixteen_bit_masks(tmp_path: Path) -> None:
    _write_folder(tmp_path, "train", _raw_ids([3, 255, 1]), mode="I;16")
    dataset = build_dataset(_cfg("folder", tmp_path), "train", train=False)
    assert np.array_equal(_mask_of(dataset), _raw_ids([3, 255, 1]))


# ---------------------------------------------------------------------------------------------------- relabelling


def test_train_items_hide_unseen_pixelwise(tmp_path: Path) -> None:
    raw = _raw_ids([0, 1, 2, 3, 255, 2])
    _write_folder(tmp_path, "train", raw)
    cfg = _cfg("folder", tmp_path, unseen=["car", "sky"])
    dataset = build_dataset(cfg, "train", train=True)
    dataset.transform = build_eval_transform(None)  # keep the geometry so pixels can be compared
    original = dataset.load(0)[1]
    mask = dataset[0]["mask"]
    hidden = (original == 0) | (original == 2)
    void = original == 255
    # Unseen classes become unlabelled (255); the files' own ignore pixels become void (-1), never unlabelled.
    assert torch.equal(mask == 255, hidden)
    assert torch.equal(mask == VOID_INDEX, void)
    assert torch.equal(mask[~hidden & ~void], original[~hidden & ~void])
    assert np.array_equal(_mask_of(build_dataset(cfg, "train", train=False)), raw)  # eval keeps every class


def test_exif_rotated_image_follows_its_mask(tmp_path: Path) -> None:
    # A photo stored 8 wide x 6 high with "rotate 90°": its upright view is 6 wide x 8 high. Whichever of the two
    # shapes the mask has decides, so annotation made on either view loads.
    _write_folder(tmp_path, None, _raw_ids([0, 1]))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = np.zeros((H, W, 3), np.uint8)
    stored[0, 0] = 255  # top-left when stored; top-right when upright
    Image.fromarray(stored).save(tmp_path / "images" / "x.png", exif=exif)
    dataset = build_dataset(_cfg("folder", tmp_path), "val", train=False)
    dataset.transform = build_eval_transform(None)
    image, mask, _ = dataset.load(0)
    assert image.shape == (3, H, W) and mask.shape == (H, W) and image[0, 0, 0] == 255
    _write_mask(tmp_path / "masks" / "x.png", np.zeros((W, H), np.int64))
    image, _, _ = dataset.load(0)
    assert image.shape == (3, W, H) and image[0, 0, H - 1] == 255


def test_mask_with_alpha_channel(tmp_path: Path) -> None:
    _write_folder(tmp_path, None, _raw_ids([0, 1]))
    ids = _raw_ids([2, 3])
    Image.fromarray(np.stack([ids, np.full_like(ids, 255)], -1).astype(np.uint8), mode="LA").save(
        tmp_path / "masks" / "x.png"
    )
    dataset = build_dataset(_cfg("folder", tmp_path), "val", train=False)
    assert np.array_equal(dataset.load(0)[1].numpy(), ids)


# ---------------------------------------------------------------------------------------------------- errors


def test_missing_mask_fails_at_construction(tmp_path: Path) -> None:
    _write_folder(tmp_path, "val", _raw_ids([0]))
    (tmp_path / "val" / "masks" / "y.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"y\.png"):
        build_dataset(_cfg("folder", tmp_path), "val", train=False)


def test_missing_voc_mask_names_the_image(tmp_path: Path) -> None:
    base = tmp_path / "VOC2012"
    _write_voc(base, _raw_ids([1]))
    (base / "SegmentationClass" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"b\.jpg"):
        build_dataset(_cfg("voc", base), "val", train=False)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("corrupt", r"cannot read image .*x\.png"),
        ("size", r"image .*x\.png is 6x8 but its mask is 5x8"),
        ("colour", r"mask .*x\.png is a colour"),
        ("ids", r"mask .*x\.png has ids \[4, 9\] beyond the 4 classes"),
    ],
)
def test_bad_files_raise_naming_the_file(tmp_path: Path, damage: str, message: str) -> None:
    _write_folder(tmp_path, "val", _raw_ids([0, 1]))
    image, mask = tmp_path / "val" / "images" / "x.png", tmp_path / "val" / "masks" / "x.png"
    if damage == "corrupt":
        image.write_bytes(b"\x89PNG garbage")
    elif damage == "size":
        _write_mask(mask, np.zeros((H - 1, W), np.int64))
    elif damage == "colour":
        Image.fromarray(np.stack([_raw_ids([0, 1])] * 2 + [_raw_ids([5])], -1).astype(np.uint8)).save(mask)
    else:
        _write_mask(mask, _raw_ids([0, 4, 9, 255]))
    dataset = build_dataset(_cfg("folder", tmp_path), "val", train=False)
    with pytest.raises(ValueError, match=message):
        dataset[0]
    assert dataset[1]["mask"].shape == (H, W)  # the other item still loads


def test_voc_ids_beyond_classes_mention_reduce_zero_label(tmp_path: Path) -> None:
    base = tmp_path / "VOC2012"
    _write_voc(base, _raw_ids([0, 21]))
    with pytest.raises(ValueError, match=r"ids \[21\].*reduce_zero_label"):
        build_dataset(_cfg("voc", base), "val", train=False)[0]


def test_root_and_name_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'cityscapes'.*voc, coco-stuff.*synthetic"):
        build_dataset(_cfg("cityscapes", tmp_path), "val", train=False)
    with pytest.raises(FileNotFoundError, match=r"data\.root is empty"):
        build_dataset(_cfg("voc", ""), "val", train=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(_cfg("voc", tmp_path / "nowhere"), "val", train=False)
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        build_dataset(_cfg("voc", tmp_path), "val", train=False)
    with pytest.raises(FileNotFoundError, match=r"classes\.txt"):
        build_dataset(_cfg("folder", tmp_path), "val", train=False)
    (tmp_path / "classes.txt").write_text("a\nb\n")
    (tmp_path / "val" / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no images found in .*val/images"):
        build_dataset(_cfg("folder", tmp_path), "val", train=False)
    with pytest.raises(FileNotFoundError, match=r"no images found in .*images/val"):
        build_dataset(_cfg("coco-stuff", tmp_path), "val", train=False)


def test_voc_missing_split_list_lists_the_others(tmp_path: Path) -> None:
    _write_voc(tmp_path / "VOC2012", _raw_ids([1]))
    with pytest.raises(FileNotFoundError, match=r"test\.txt not found; lists present: train, val"):
        build_dataset(_cfg("voc", tmp_path), "test", train=False)


def test_classes_txt_validation(tmp_path: Path) -> None:
    _write_folder(tmp_path, None, _raw_ids([0]))
    (tmp_path / "classes.txt").write_text("sky\n\nroad\n")
    with pytest.raises(ValueError, match="line 2 is blank"):
        build_dataset(_cfg("folder", tmp_path), "val", train=False)
    (tmp_path / "classes.txt").write_text("sky\nroad\nsky\n")
    with pytest.raises(ValueError, match="duplicate class names: sky"):
        build_dataset(_cfg("folder", tmp_path), "val", train=False)
    (tmp_path / "classes.txt").write_text("sky\nroad\n")
    with pytest.raises(ValueError, match="did you mean 'road'"):
        build_dataset(_cfg("folder", tmp_path, unseen=["raod"]), "val", train=False)


# ---------------------------------------------------------------------------------------------------- real data


def test_voc_sample_real_files(shared_data: Path) -> None:
    dataset = build_dataset(_cfg("voc", shared_data / "voc-sample"), "val", train=False)
    names = DATASET_CLASSES["voc"]
    present = {item["name"]: set(item["mask"].unique().tolist()) - {255} for item in dataset}
    assert present == {
        "2011_000003": {names.index("bottle"), names.index("person")},
        "2011_000006": {names.index("chair"), names.index("person"), names.index("sofa")},
        "2011_000025": {names.index("bus"), names.index("car")},
    }
    assert {4, 14, 8, 17, 5, 6} == set().union(*present.values())
    assert dataset[0]["mask"].shape == (338, 500)  # eval masks keep their resolution
    train = build_dataset(_cfg("voc", shared_data / "voc-sample"), "train", train=True)
    assert 17 not in train[1]["mask"].unique().tolist()  # sofa is unseen in the standard VOC split


def test_camvid_real_files(shared_data: Path) -> None:
    root = shared_data / "camvid"
    cfg = _cfg("folder", root, unseen=["car", "tree", "pedestrian"])
    cfg.eval.short_side = 512
    dataset = build_dataset(cfg, "val", train=False)
    assert len(dataset) == 101
    assert dataset.class_names == tuple((root / "classes.txt").read_text().split())
    assert dataset.unseen == (5, 8, 9)
    for index in range(2):
        item = dataset[index]
        assert item["image"].shape == (3, 512, 683) and item["mask"].shape == (360, 480)
        assert set(item["mask"].unique().tolist()) <= set(range(11)) | {255}
    train = build_dataset(cfg, "val", train=True)
    train.transform = build_eval_transform(None)
    original = train.load(0)[1]
    assert torch.isin(original, torch.tensor([5, 8, 9])).any()  # the check below is not vacuous
    masked = train[0]["mask"]
    assert torch.equal(masked == 255, torch.isin(original, torch.tensor([5, 8, 9])))
    assert torch.equal(masked == VOID_INDEX, original == 255)  # CamVid's void stays void, not unlabelled


# ---------------------------------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_covers_all_classes() -> None:
    first, again, other = (
        SyntheticScenes(8, 32, seed=5),
        SyntheticScenes(8, 32, seed=5),
        SyntheticScenes(8, 32, 6),
    )
    assert first.class_names == SYNTHETIC_CLASSES and len(SYNTHETIC_CLASSES) == 8
    assert tuple(first.class_names[i] for i in first.unseen) == SYNTHETIC_UNSEEN
    covered: set[int] = set()
    for index in range(8):
        image, mask, name = first.load(index)
        image2, mask2, _ = again.load(index)
        assert torch.equal(image, image2) and torch.equal(mask, mask2)
        assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and mask.shape == (32, 32)
        assert index % 8 in mask.unique().tolist()
        covered |= set(mask.unique().tolist())
        assert name == f"synthetic_5_{index:06d}"
    assert covered == set(range(8))
    assert not torch.equal(first.load(0)[0], other.load(0)[0])


def test_synthetic_classes_look_different() -> None:
    # Mean colour per class across scenes must separate the classes, or nothing could learn them.
    scenes = SyntheticScenes(16, 48, seed=0, unseen=[])
    sums, counts = torch.zeros(8, 3), torch.zeros(8)
    for index in range(16):
        image, mask, _ = scenes.load(index)
        for c in mask.unique().tolist():
            sums[c] += image[:, mask == c].float().mean(1)
            counts[c] += 1
    means = sums / counts[:, None]
    distances = torch.cdist(means, means) + torch.eye(8) * 1e3
    assert distances.min() > 15


def test_build_synthetic_train_and_loader() -> None:
    cfg = _cfg("synthetic", "")
    train = build_dataset(cfg, "train", train=True)
    val = build_dataset(cfg, "val", train=False)
    assert len(train) == 256 and len(val) == 32
    assert not torch.equal(train.load(0)[0], val.load(0)[0])  # splits use different scenes
    unseen = torch.tensor(train.unseen)
    for index in range(4):
        item = train[index]
        assert item["image"].shape == (3, 8, 8)
        assert not torch.isin(item["mask"], unseen).any()
    clone = pickle.loads(pickle.dumps(train))  # DataLoader workers receive a pickled copy
    torch.manual_seed(1)
    expected = train[5]
    torch.manual_seed(1)
    copied = clone[5]
    assert torch.equal(copied["image"], expected["image"]) and torch.equal(copied["mask"], expected["mask"])
    batch = next(iter(DataLoader(val, batch_size=2)))
    assert batch["image"].shape == (2, 3, 12, 12) and batch["mask"].shape == (2, 128, 128)
    assert batch["name"] == [val[0]["name"], val[1]["name"]]


def test_file_dataset_default_transform_only_normalises(tmp_path: Path) -> None:
    _write_folder(tmp_path, None, _raw_ids([0, 1]))
    dataset = build_dataset(_cfg("folder", tmp_path), "val", train=False)
    plain = FileDataset(dataset.samples, make_split(dataset.class_names, []))
    assert plain[0]["image"].shape == (3, H, W)


# ---------------------------------------------------------------------------------------------------- palettes

PALETTE = np.array([[128, 128, 128], [128, 64, 128], [0, 0, 192], [64, 64, 0], [0, 0, 0]], np.uint8)


def test_folder_dataset_reads_colour_masks_through_palette_txt(tmp_path: Path) -> None:
    ids = _raw_ids([0, 1, 2, 3, 4])  # 4 = the ignore colour
    _write_folder(tmp_path, "val", ids)
    for name in ("x", "y"):
        Image.fromarray(PALETTE[ids]).save(tmp_path / "val" / "masks" / f"{name}.png")
    with pytest.raises(ValueError, match=r"is a colour \(RGB\) image.*palette\.txt"):
        build_dataset(_cfg("folder", tmp_path), "val", train=False)[0]
    (tmp_path / "palette.txt").write_text(
        "128 128 128 sky\n128,64,128 Road\n#0000C0\n64 64 0 tree\n0 0 0 void\n"
    )
    dataset = build_dataset(_cfg("folder", tmp_path), "val", train=False)
    expected = np.where(ids == 4, 255, ids)
    assert np.array_equal(_mask_of(dataset), expected)
    _write_mask(tmp_path / "val" / "masks" / "y.png", expected)  # grey id masks still work beside colour ones
    assert np.array_equal(_mask_of(dataset, 1), expected)
    rgb = PALETTE[ids].copy()
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "val" / "masks" / "x.png")
    with pytest.raises(
        ValueError, match=r"x\.png has 1 colour\(s\) not in .*palette\.txt: \(1, 2, 3\) × 1 px"
    ):
        dataset[0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1 2 3\n4 5 6\n7 8 9\n", r"3 colours for 4 classes"),
        ("1 2 3\n4 5\n7 8 9\n10 11 12\n", r"line 2 is not a colour: '4 5'"),
        ("1 2 3 sky\n4 5 6 car\n7 8 9\n10 11 12\n", r"line 2 names 'car' but class id 1 is 'road'"),
        ("1 2 3\n4 5 6\n1 2 3\n10 11 12\n", r"line 3 repeats the colour \(1, 2, 3\) of line 1"),
        ("1 2 3\n4 5 600\n7 8 9\n10 11 12\n", r"line 2 is not a colour"),
        ("#12345\n4 5 6\n7 8 9\n10 11 12\n", r"line 1 is not a colour"),
    ],
)
def test_palette_file_errors_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "palette.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_palette(path, ("sky", "road", "car", "tree"))


def test_palette_lookup_hand_computed(tmp_path: Path) -> None:
    path = tmp_path / "palette.txt"
    path.write_text("#ff0000 a\n0 255 0\n0,0,255 c\n255 255 255\n")
    palette = read_palette(path, ("a", "b", "c"))
    rgb = np.array([[[0, 0, 255], [255, 0, 0]], [[255, 255, 255], [0, 255, 0]]], np.uint8)
    assert palette.to_ids(rgb).tolist() == [[2, 0], [255, 1]]


# ---------------------------------------------------------------------------------------------------- listings


def test_read_listing_lenient_collects_missing_files(tmp_path: Path) -> None:
    _write_folder(tmp_path, "val", _raw_ids([0]))
    (tmp_path / "val" / "masks" / "x.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"no mask for image .*x\.png"):
        read_listing("folder", tmp_path, "val")
    listing = read_listing("folder", tmp_path, "val", strict=False)
    assert [s.name for s in listing.samples] == ["y"] and len(listing.problems) == 1
    assert "x.png" in listing.problems[0] and listing.mask_dirs == (tmp_path / "val" / "masks",)
    base = tmp_path / "VOC2012"
    _write_voc(base, _raw_ids([1]), ids=("a", "b"))
    (base / "JPEGImages" / "a.jpg").unlink()
    listing = read_listing("VOC", tmp_path, "val", strict=False)
    assert [s.name for s in listing.samples] == ["b"] and "a.jpg" in listing.problems[0]
    assert listing.reduce_zero_label and "val.txt" in listing.notes[0]


def test_voc_segmentation_class_aug_without_lists_uses_train(tmp_path: Path) -> None:
    base = tmp_path / "VOC2012"
    _write_voc(base, _raw_ids([1]), ids=("a",))
    (base / "SegmentationClassAug").mkdir()
    assert [s.name for s in build_dataset(_cfg("voc", base), "train", train=False).samples] == ["a"]


def test_wide_label_sets_use_65535_as_ignore(tmp_path: Path) -> None:
    raw = _raw_ids([0, 300, 65535])
    _write_mask(tmp_path / "m.png", raw, mode="I;16")
    _write_image(tmp_path / "i.png")
    names = [f"class {i}" for i in range(400)]
    split = make_split(names, [], max_classes=65535)
    dataset = FileDataset([Sample(tmp_path / "i.png", tmp_path / "m.png", "i")], split, ignore_index=65535)
    assert dataset.ignore_index == 65535 and np.array_equal(_mask_of(dataset), raw)
    with pytest.raises(ValueError, match="classes do not fit"):
        make_split(names, [])
    with pytest.raises(ValueError, match="evaluation only"):
        FileDataset([], split, train=True, ignore_index=65535)
    assert class_ids(np.array([0, 1, 255]), 3, reduce_zero_label=True).tolist() == [255, 0, 255]


def _folder_with_corrupt_image(root: Path) -> Path:
    for sub in ("images", "masks"):
        (root / "val" / sub).mkdir(parents=True)
    (root / "classes.txt").write_text("road\ncar\nsky\n")
    (root / "val" / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a picture")
    Image.fromarray(np.zeros((12, 16), dtype=np.uint8)).save(root / "val" / "masks" / "broken.png")
    return root


@pytest.mark.usefixtures("user_cache")
def test_worker_errors_name_the_file(
    trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from clipzss.config import Config, DataConfig
    from clipzss.data import build_eval_dataset
    from clipzss.errors import UsageError

    root = _folder_with_corrupt_image(tmp_path / "d")
    dataset = build_eval_dataset(Config(data=DataConfig(dataset="folder", root=str(root), unseen=[])), "val")
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=1)
    with pytest.raises(
        UsageError
    ) as caught:  # torch re-raises the worker's error class, wrapping its message
        next(iter(loader))
    assert str(caught.value).startswith("Caught UsageError in DataLoader worker process 0.")
    message = user_message(caught.value)
    assert message.startswith("cannot read image") and "broken.png" in message and "\n" not in message
    argv = ["eval", str(trained_checkpoint), "--dataset", "folder", "--data-root", str(root)]
    one_error_line([*argv, "--unseen", "car", "--workers", "1", "--device", "cpu"], capsys, "broken.png")
