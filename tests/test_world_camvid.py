"""The CamVid world's building blocks (clipzss.worlds.camvid) on tiny sizes: text table, images, teacher, cache.

No test trains beyond a few steps. Tests that need the real MiniLM encoder (the ``evidence`` extra) or the real
CamVid folder skip cleanly when they are absent; the rest run on a fake encoder and a tiny fake CamVid folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipzss.config import MethodConfig
from clipzss.data import VOID_INDEX
from clipzss.models.teacher import Teacher
from clipzss.worlds import camvid as cw
from conftest import CAMVID_CLASSES

CLASSES = (*cw.CAMVID_UNSEEN, "sky", "road", "signsymbol")
REAL_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"


class FakeEncoder:
    """Prompts → deterministic unit vectors (hash-seeded), counting calls: a stand-in for MiniLM."""

    def __init__(self, dim: int = cw.TEXT_DIM) -> None:
        self.dim = dim
        self.prompts: list[str] = []

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        self.prompts += list(prompts)
        rows = []
        for p in prompts:
            seed = int.from_bytes(hashlib.sha256(p.encode()).digest()[:4], "little")
            rows.append(torch.randn(self.dim, generator=torch.Generator().manual_seed(seed)))
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


# Two frames of each stretch the world tells apart, named as CamVid names them, in the folder CamVid keeps them in.
FAKE_FRAMES = {
    "train": (
        "0001TP_006690",
        "0001TP_006720",
        "0006R0_f00930",
        "0006R0_f00960",
        "0016E5_00390",
        "0016E5_00420",
        "0016E5_04350",
        "0016E5_04380",
    ),
    "val": ("0016E5_07959", "0016E5_07961"),
}


def fake_camvid(root: Path, size: tuple[int, int] = (36, 48)) -> Path:
    """A CamVid-shaped folder: classes.txt and train/val images of the three sequences, random masks."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(CAMVID_CLASSES) + "\n")
    for split, stems in FAKE_FRAMES.items():
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for stem in stems:
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / "images" / f"{stem}.png")
            mask = rng.integers(0, 11, size, dtype=np.uint8)
            mask[0, 0] = 255
            Image.fromarray(mask).save(root / split / "masks" / f"{stem}.png")
    return root


@pytest.fixture()
def text(tmp_path: Path) -> cw.TextTable:
    return cw.TextTable(
        tmp_path / "cache", templates=("a photo of a {}.", "a {} in the scene."), encoder=FakeEncoder()
    )


TINY = cw.CamVidTeacherSpec(width=8, steps=2, batch_size=2, crop=16)
TINY_WORLD = cw.CamVidWorld(size=(24, 32))


def test_text_table_is_unit_prompt_averaged_and_cached(tmp_path: Path) -> None:
    encoder = FakeEncoder()
    templates = ("a photo of a {}.", "a {} in the scene.")
    table = cw.TextTable(tmp_path, templates=templates, encoder=encoder)
    emb = table(CLASSES)
    assert emb.shape == (len(CLASSES), cw.TEXT_DIM) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(CLASSES)), atol=1e-5)
    assert "a photo of a sign symbol." in encoder.prompts  # the readable name, not "signsymbol"
    mean = encoder(["a photo of a car.", "a car in the scene."]).mean(0)
    assert torch.allclose(emb[0], mean / mean.norm(), atol=1e-5)
    calls = len(encoder.prompts)
    table(["car", "sky"])
    assert len(encoder.prompts) == calls  # cached in memory
    # A new table over the same folder reads the file and never needs the encoder (nor the extra).
    again = cw.TextTable(tmp_path, templates=templates, encoder=lambda prompts: pytest.fail("encoder used"))
    assert torch.allclose(again(CLASSES), emb)
    other = cw.TextTable(tmp_path, templates=templates[:1], encoder=FakeEncoder())
    assert other.path != table.path  # the templates are part of the file name
    with pytest.raises(ValueError, match="non-empty list"):
        table("car")


def test_missing_extra_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, cw.TEXT_PACKAGE, None)  # import fails as if not installed
    with pytest.raises(ModuleNotFoundError, match=r"clipzss\[evidence\]"):
        cw.minilm_encoder()
    with pytest.raises(ModuleNotFoundError, match=r"clipzss\[evidence\]"):
        cw.TextTable(tmp_path)(["car"])  # an empty table needs the encoder


def test_missing_data_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        cw.CamVidImages(tmp_path / "nowhere")
    message = str(err.value)
    assert "\n" not in message and "CamVid not found" in message and "nowhere" in message


def test_images_split_by_sequence_and_resized(tmp_path: Path) -> None:
    root = fake_camvid(tmp_path / "camvid")
    split = cw.split_sequences(root)
    assert split == {
        "teacher": ["0001TP_006690", "0001TP_006720", "0016E5_00390", "0016E5_00420"],
        "student": ["0016E5_04350", "0016E5_04380", "0016E5_07959", "0016E5_07961"],  # both folders
        "eval": ["0006R0_f00930", "0006R0_f00960"],
    }
    images = cw.CamVidImages(root, cw.FOLDERS, cw.STUDENT_SEQUENCES, size=(12, 16), train=True)
    assert len(images) == 4 and images.names == split["student"]
    image, mask, _ = images.load(0)
    assert image.shape == (3, 12, 16) and image.dtype == torch.uint8 and mask.shape == (12, 16)
    assert set(torch.unique(mask).tolist()) <= set(range(11)) | {255}
    item = images[0]
    unseen = torch.tensor(images.unseen)
    assert sorted(images.class_names[i] for i in images.unseen) == sorted(cw.CAMVID_UNSEEN)
    assert not torch.isin(item["mask"], unseen).any()  # training hides car, tree, pedestrian
    assert torch.equal(item["mask"] == VOID_INDEX, mask == 255)  # CamVid's void stays void, apart from unseen
    with pytest.raises(ValueError, match="overlap"):
        cw.split_sequences(root, cw.CamVidWorld(teacher_sequences=("0016E5",)))


def test_teacher_follows_the_protocol(text: cw.TextTable) -> None:
    names = ("sky", "road", "car")
    teacher = cw.CamVidTeacher(TINY, TINY_WORLD, text, names)
    assert isinstance(teacher, Teacher) and teacher.embed_dim == cw.TEXT_DIM
    cls, dense = teacher.encode_image(torch.randn(2, 3, 24, 32))
    assert cls.shape == (2, cw.TEXT_DIM) and dense.shape == (2, cw.TEXT_DIM, 3, 4)
    assert torch.allclose(dense.norm(dim=1), torch.ones(2, 3, 4), atol=1e-5)
    assert torch.allclose(cls.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training
    assert torch.allclose(teacher.text_embeddings(["car"]), text(["car"]))
    # The gap is orthogonal to the texts: it lowers the cosines but never changes the teacher's own argmax.
    gapped = cw.CamVidTeacher(dataclasses.replace(TINY, gap=2.0), TINY_WORLD, text, names)
    gapped.semantic.load_state_dict(teacher.semantic.state_dict())
    texts = text(names)
    plain = torch.einsum("bchw,kc->bkhw", dense, texts)
    shifted = torch.einsum("bchw,kc->bkhw", gapped.encode_image(torch.randn(2, 3, 24, 32))[1], texts)
    assert shifted.abs().max() < 1.0
    x = torch.randn(1, 3, 24, 32)
    a = torch.einsum("bchw,kc->bkhw", teacher.encode_image(x)[1], texts).argmax(1)
    b = torch.einsum("bchw,kc->bkhw", gapped.encode_image(x)[1], texts).argmax(1)
    assert torch.equal(a, b) and plain.shape == (2, 3, 3, 4)


def test_cache_key_follows_every_learnt_parameter(text: cw.TextTable) -> None:
    names = ("sky", "road", "car")

    def key(
        spec: cw.CamVidTeacherSpec = TINY, world: cw.CamVidWorld = TINY_WORLD, images: Sequence[str] = ("a",)
    ):
        return cw.CamVidTeacher(spec, world, text, names).key(images)

    base = key()
    assert base == key()
    assert key(dataclasses.replace(TINY, steps=3)) != base
    assert key(dataclasses.replace(TINY, width=16)) != base
    assert key(world=dataclasses.replace(TINY_WORLD, size=(48, 64))) != base
    assert key(images=("a", "b")) != base
    assert key(dataclasses.replace(TINY, gap=1.0)) == base  # not learnt
    assert cw.CamVidTeacher(TINY, TINY_WORLD, text, ("sky", "road")).key(("a",)) != base


def test_teacher_trains_a_few_steps_and_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = fake_camvid(tmp_path / "camvid")
    text = cw.TextTable(tmp_path / "cache", templates=("a photo of a {}.",), encoder=FakeEncoder())
    teacher = cw.load_teacher(root, TINY, TINY_WORLD, tmp_path / "cache", text)
    files = list((tmp_path / "cache").glob("teacher_*.safetensors"))
    assert len(files) == 1
    monkeypatch.setattr(cw, "train_teacher", lambda *a, **k: pytest.fail("the cached teacher was retrained"))
    again = cw.load_teacher(root, TINY, TINY_WORLD, tmp_path / "cache", text)
    x = torch.randn(1, 3, 24, 32)
    assert torch.allclose(teacher.encode_image(x)[1], again.encode_image(x)[1])


def test_student_config_uses_method_defaults(tmp_path: Path) -> None:
    cfg = cw.camvid_student_config(tmp_path, {"nel": False}, seed=3, iters=5, world=TINY_WORLD)
    assert cfg.student.embed_dim == cw.TEXT_DIM and cfg.train.seed == 3 and cfg.train.max_iters == 5
    assert cfg.data.crop_size == 24 and cfg.eval.short_side == 24 and cfg.eval.mode == "whole"
    assert cfg.method == dataclasses.replace(MethodConfig(), nel=False)


@pytest.mark.skipif(not REAL_ROOT.is_dir(), reason="CamVid is not in ../shared/data/camvid")
def test_real_camvid_sequences_are_disjoint() -> None:
    split = cw.split_sequences(REAL_ROOT)
    assert (len(split["teacher"]), len(split["student"]), len(split["eval"])) == (130, 237, 101)
    assert all(n.startswith("0006R0") for n in split["eval"])  # a sequence no one trains on
    groups = [set(names) for names in split.values()]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])


def test_real_minilm_text_has_language_structure(tmp_path: Path) -> None:
    pytest.importorskip(cw.TEXT_PACKAGE)
    pytest.importorskip("sentence_transformers")
    emb = cw.TextTable(tmp_path, templates=("a photo of a {}.",))(["road", "pavement", "sky"])
    assert emb.shape == (3, cw.TEXT_DIM)
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2])  # road is nearer pavement than sky


def test_inspect_command_takes_the_world_teacher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from clipzss.cli import main

    root = fake_camvid(tmp_path / "camvid")
    text = cw.TextTable(tmp_path / "cache", templates=("a photo of a {}.",), encoder=FakeEncoder())
    teacher = cw.load_teacher(root, TINY, TINY_WORLD, tmp_path / "cache", text)
    monkeypatch.setattr(cw, "load_teacher", lambda *a, **k: teacher)
    out = tmp_path / "out"
    command = [
        str(root / "val" / "images"),
        "--world-teacher",
        "camvid",
        "--unseen",
        "car,tree",
        "--out",
        str(out),
    ]
    assert main(["inspect-pseudo-labels", *command]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (
        "camvid-teacher" in report["settings"] and "3x4 tokens" in report["settings"]
    )  # world's short side 24
    assert len(list(out.glob("*_clusters.png"))) == 2
