"""Zero-shot prediction, the MaskCLIP baseline, checkpoints and overlays."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from clipzss.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from clipzss.config import Config, EvalConfig
from clipzss.inference.inputs import preprocess
from clipzss.models.recipes import baseline_eval_config
from clipzss.models.segmenter import MaskCLIPSegmenter, PrecomputedText, Segmenter, TrainingFreeSegmenter
from clipzss.models.student import build_student
from clipzss.models.teacher import build_teacher
from clipzss.names import parse_class_names
from clipzss.visualize import colorize, overlay, palette

NAMES = ["red horizontal stripes", "a cat", "grass"]


@pytest.fixture(scope="module")
def segmenter(trained_checkpoint: Path) -> Segmenter:
    return Segmenter.from_checkpoint(trained_checkpoint, device="cpu")


def test_logits_are_alpha_cosine(segmenter: Segmenter) -> None:
    images = torch.randn(2, 3, 40, 56)
    text = segmenter.text_classifier(NAMES)
    logits = segmenter.logits(images, text)
    with torch.no_grad():
        emb = F.normalize(segmenter.student(images), dim=1)
    expected = segmenter.alpha * torch.einsum("bchw,kc->bkhw", emb, text)
    assert logits.shape == (2, 3, 10, 14)
    torch.testing.assert_close(logits, expected)
    assert text.shape == (3, segmenter.student.embed_dim)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_predict_returns_ids_at_input_size(segmenter: Segmenter, mode: str) -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (75, 101, 3), dtype=np.uint8))
    mask = segmenter.predict(image, NAMES, mode=mode)
    assert mask.shape == (75, 101) and mask.dtype == np.int64
    assert mask.min() >= 0 and mask.max() < len(NAMES)


def test_prediction_is_argmax_of_upsampled_logits(segmenter: Segmenter) -> None:
    rgb = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    mask = segmenter.predict(rgb, NAMES, mode="whole")
    x = torch.from_numpy(preprocess(Image.fromarray(rgb), segmenter.eval_cfg.short_side))[None]
    logits = segmenter.logits(x, segmenter.text_classifier(NAMES))
    up = F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False)
    np.testing.assert_array_equal(mask, up.argmax(1)[0].numpy())


def test_maskclip_baseline_uses_maskclips_released_dense_path(tiny_teacher_cfg) -> None:
    teacher = build_teacher(tiny_teacher_cfg, device="cpu")  # teacher.dense = "clearclip" for pseudo labels
    baseline = MaskCLIPSegmenter(teacher)
    images = torch.randn(1, 3, 48, 72)
    text = baseline.text_classifier(NAMES)
    logits = baseline.logits(images, text)
    _, dense = teacher.encode_image(images, size=(48, 72), dense="maskclip")
    torch.testing.assert_close(logits, baseline.alpha * torch.einsum("bchw,kc->bkhw", dense, text))
    _, value = teacher.encode_image(images, size=(48, 72), dense="value")
    assert not torch.allclose(logits, baseline.alpha * torch.einsum("bchw,kc->bkhw", value, text), atol=1e-3)
    mask = baseline.predict(np.zeros((30, 40, 3), dtype=np.uint8), NAMES, mode="whole")
    assert mask.shape == (30, 40)
    assert baseline.eval_cfg == EvalConfig()  # MaskCLIP keeps this project's protocol


@pytest.mark.parametrize("recipe", ["clearclip", "sclip", "naclip"])
def test_training_free_baseline_uses_the_recipes_tokens_and_input(tiny_teacher_cfg, recipe: str) -> None:
    teacher = build_teacher(
        dataclasses.replace(tiny_teacher_cfg, dense="value", naclip_std=2.0), device="cpu"
    )
    baseline = TrainingFreeSegmenter(teacher, recipe=recipe)
    images = torch.randn(1, 3, 48, 72)
    text = baseline.text_classifier(NAMES)
    _, dense = teacher.encode_image(images, size=(48, 72), dense=recipe)  # σ: the teacher config's
    torch.testing.assert_close(
        baseline.logits(images, text), baseline.alpha * torch.einsum("bchw,kc->bkhw", dense, text)
    )
    assert baseline.eval_cfg == baseline_eval_config(recipe) != EvalConfig()
    assert (baseline.eval_cfg.crop_size, baseline.eval_cfg.stride) == {
        "clearclip": (448, 224),
        "sclip": (224, 112),
        "naclip": (224, 112),
    }[recipe]
    given = EvalConfig(mode="whole")
    assert TrainingFreeSegmenter(teacher, given, recipe=recipe).eval_cfg is given  # an explicit protocol wins
    with pytest.raises(
        ValueError, match=r"^baseline='value' is not one of maskclip, clearclip, sclip, naclip$"
    ):
        TrainingFreeSegmenter(teacher, recipe="value")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("cat,,dog", "empty name"),
        ("cat, dog,cat", "duplicate class names: cat"),
        (" , ", "empty"),
    ],
)
def test_bad_class_lists(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_class_names(text)


def test_class_names_are_stripped() -> None:
    assert parse_class_names(" cat , potted plant,sky") == ["cat", "potted plant", "sky"]


def test_precomputed_text_round_trip(tmp_path: Path, segmenter: Segmenter) -> None:
    stored = PrecomputedText.from_teacher(segmenter.text_encoder, NAMES)
    stored.save(tmp_path / "t.safetensors")
    loaded = PrecomputedText.load(tmp_path / "t.safetensors")
    assert loaded.class_names == NAMES
    torch.testing.assert_close(loaded.text_embeddings(["grass", "a cat"]), stored.embeddings[[2, 1]])
    with pytest.raises(ValueError, match="not in the text-embedding file: dog"):
        loaded.text_embeddings(["dog"])
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a text-embedding file"):
        PrecomputedText.load(tmp_path / "bad.safetensors")


# --- checkpoints --------------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_is_exact(tmp_path: Path, tiny_student_cfg) -> None:
    cfg = Config(student=tiny_student_cfg)
    student = build_student(cfg.student)
    path = save_checkpoint(tmp_path / "run", student.state_dict(), cfg, step="7")
    assert path.name == "model.safetensors" and (tmp_path / "run" / "config.yaml").is_file()
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.config == cfg and ckpt.meta["step"] == "7"
    for name, value in student.state_dict().items():
        assert torch.equal(ckpt.state_dict[name], value), name
    assert not list((tmp_path / "run").glob(".*tmp")), "no temporary files left behind"


def test_truncated_and_foreign_checkpoints_are_refused(tmp_path: Path, trained_checkpoint: Path) -> None:
    data = trained_checkpoint.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a clipzss checkpoint"):
        load_checkpoint(tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_checkpoint(tmp_path)


def test_checkpoint_with_incompatible_config(tmp_path: Path, trained_checkpoint: Path) -> None:
    ckpt = load_checkpoint(trained_checkpoint)
    config = ckpt.config.to_dict()
    config["train"]["no_such_key"] = 1
    save_file(
        ckpt.state_dict,
        str(tmp_path / "a.safetensors"),
        metadata={"format": "clipzss-student-v1", "config": json.dumps(config)},
    )
    with pytest.raises(CheckpointError, match=r"cannot read.*no_such_key"):
        load_checkpoint(tmp_path / "a.safetensors")
    other = ckpt.config
    other.student.encoder = "mit_b1"  # weights of a b0 under a b1 config
    save_checkpoint(tmp_path / "b", ckpt.state_dict, other)
    with pytest.raises(CheckpointError, match="does not match its config's student Segformer/mit_b1"):
        Segmenter.from_checkpoint(tmp_path / "b", device="cpu")


# --- visualisation ------------------------------------------------------------------------------------------------


def test_palette_is_distinct_and_stable() -> None:
    colours = palette(171)
    assert colours.shape == (171, 3)
    assert len({tuple(c) for c in colours}) == 171
    np.testing.assert_array_equal(colours, palette(171))


def test_overlay_has_legend_with_present_classes() -> None:
    image = Image.new("RGB", (80, 60), "white")
    mask = np.zeros((60, 80), dtype=np.int64)
    mask[:, 40:] = 2
    out = overlay(image, mask, NAMES)
    assert out.width > 80 and out.height >= 60
    legend = np.asarray(out)[:, 80:]
    colours = palette(3)
    present = {tuple(c) for c in legend.reshape(-1, 3)}
    assert tuple(colours[0]) in present and tuple(colours[2]) in present
    assert tuple(colours[1]) not in present, "absent classes are not listed"
    np.testing.assert_array_equal(np.asarray(colorize(mask, 3))[0, 0], colours[0])


def test_a_text_encoder_of_another_width_is_one_clear_error(segmenter: Segmenter) -> None:
    width = segmenter.config.student.embed_dim
    other = PrecomputedText(["road", "sky"], F.normalize(torch.randn(2, width + 3), dim=-1))
    segmenter.text_encoder = other
    with pytest.raises(ValueError, match=rf"gives {width + 3}-d embeddings but this model's are {width}-d"):
        segmenter.text_classifier(["road", "sky"])
