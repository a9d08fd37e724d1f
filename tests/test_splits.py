"""Class lists, standard splits, split validation and the unseen relabelling."""

from __future__ import annotations

import pytest
import torch

from clipzss.data.splits import (
    DATASET_CLASSES,
    STANDARD_UNSEEN,
    Split,
    make_split,
    relabel_unseen,
    seen_lookup,
    validate_class_names,
)


@pytest.mark.parametrize(
    ("dataset", "count", "first", "last"),
    [
        ("voc", 20, "aeroplane", "tvmonitor"),
        ("coco-stuff", 171, "person", "wood"),
        ("context", 59, "aeroplane", "wood"),
        ("ade20k", 150, "wall", "flag"),
    ],
)
def test_class_lists_have_mmseg_counts_and_ends(dataset: str, count: int, first: str, last: str) -> None:
    names = DATASET_CLASSES[dataset]
    assert len(names) == count
    assert (names[0], names[-1]) == (first, last)
    assert validate_class_names(names) == names  # unique, non-blank, already stripped


def test_class_list_spot_checks() -> None:
    coco = DATASET_CLASSES["coco-stuff"]
    assert coco.index("banner") == 80  # first stuff class after the 80 things
    assert coco.index("playingfield") == 133
    assert coco.index("wall-concrete") == 160
    assert DATASET_CLASSES["ade20k"][7] == "bed"
    assert DATASET_CLASSES["ade20k"].index("chest of drawers") == 44
    assert DATASET_CLASSES["context"].index("bedclothes") == 3


def test_standard_unseen_indices() -> None:
    expected = {
        "voc": [15, 16, 17, 18, 19],
        "coco-stuff": [19, 23, 28, 29, 36, 51, 76, 88, 94, 112, 133, 136, 137, 157, 160],
        "context": [0, 6, 7, 14, 19, 24, 31, 33, 48, 54],
    }
    assert set(STANDARD_UNSEEN) == set(expected)
    for dataset, indices in expected.items():
        names = DATASET_CLASSES[dataset]
        assert [names.index(n) for n in STANDARD_UNSEEN[dataset]] == indices
        split = make_split(names, None, dataset=dataset)
        assert list(split.unseen) == indices
        assert split.seen == tuple(i for i in range(len(names)) if i not in indices)


def test_make_split_defaults() -> None:
    assert make_split(DATASET_CLASSES["ade20k"], None, dataset="ade20k").unseen == ()
    assert make_split(["a", "b"], None).unseen == ()
    assert make_split(DATASET_CLASSES["voc"], [], dataset="voc").unseen == ()


def test_make_split_custom_names_case_insensitive_and_sorted() -> None:
    split = make_split(["sky", " building", "car", "tree"], ["Tree", "car"])
    assert split.class_names == ("sky", "building", "car", "tree")
    assert split.unseen == (2, 3)
    assert split.seen == (0, 1)
    assert split.unseen_names == ("car", "tree")
    assert split.seen_names == ("sky", "building")
    assert split.num_classes == 4


@pytest.mark.parametrize(
    ("names", "unseen", "message"),
    [
        ([], None, "empty"),
        (["a", "  ", "c"], None, "index 1"),
        (["a", "b", "A"], None, "duplicate class names: a"),
        (["cat", "dog"], ["dgo"], "did you mean 'dog'"),
        (["cat", "dog"], ["zebra"], "'zebra' is not in the class list"),
        (["cat", "dog"], ["cat", "dog"], "every class is unseen"),
        (["cat", "dog"], ["cat", "Cat"], "listed twice"),
        (["cat", "dog"], "cat", "string"),
        ([f"c{i}" for i in range(256)], None, "ignore index 255"),
    ],
)
def test_make_split_errors(names: list[str], unseen: list[str] | str | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_split(names, unseen)


def test_split_requires_a_partition() -> None:
    with pytest.raises(ValueError, match="partition"):
        Split(class_names=("a", "b", "c"), seen=(0, 1), unseen=(1,))


def test_relabel_unseen_pixelwise() -> None:
    split = make_split(DATASET_CLASSES["voc"], None, dataset="voc")
    mask = torch.randint(0, 20, (2, 17, 23))
    mask[0, :3] = 255
    original = mask.clone()
    out = relabel_unseen(mask, split)
    assert torch.equal(mask, original)  # the input is never modified
    expected = original.clone()
    for class_id in (15, 16, 17, 18, 19):
        expected[original == class_id] = 255
    assert torch.equal(out, expected)
    assert (out == 255).sum() > (original == 255).sum()


def test_seen_lookup_hand_computed() -> None:
    split = make_split(["a", "b", "c", "d", "e"], ["b", "d"])
    table = seen_lookup(split)
    assert table.shape == (256,) and table.dtype == torch.long
    assert table[:5].tolist() == [0, 255, 1, 255, 2]
    assert (table[5:] == 255).all()
    mask = torch.tensor([[0, 1, 2], [3, 4, 255]])
    assert table[relabel_unseen(mask, split)].tolist() == [[0, 255, 1], [255, 2, 255]]


def test_wide_class_lists_need_the_wide_ignore_value() -> None:
    names = DATASET_CLASSES["ade20k-full"]
    assert len(names) == 847 and names[0] == "wall" and names[-1] == "adding machine, totalizer, totaliser"
    assert validate_class_names(names, max_classes=65535) == names
    with pytest.raises(ValueError, match="847 classes do not fit: ids must stay below the ignore index 255"):
        validate_class_names(names)
    split = make_split(names, ["pier"], max_classes=65535)
    assert split.unseen == (255,)  # a real class id, not "ignore", in a 16-bit label set
