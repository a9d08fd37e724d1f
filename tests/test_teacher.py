"""The frozen CLIP teacher, on a tiny random open_clip ViT built through the same path as ViT-B-16."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import re
import socket
from pathlib import Path

import huggingface_hub
import open_clip
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors.torch import save_file

from clipzss.config import IMAGENET_MEAN, IMAGENET_STD, TeacherConfig
from clipzss.models.recipes import BASELINE_TITLES, DEFAULT_DENSE, PUBLISHED_MIOU, published_mean
from clipzss.models.teacher import (
    CLIPTeacher,
    Teacher,
    _dense_path,
    _last_block,
    _recipe_attention,
    build_teacher,
    neighbourhood_prior,
    renormalize,
)


@pytest.fixture
def teacher(tiny_teacher_cfg: TeacherConfig) -> CLIPTeacher:
    return build_teacher(tiny_teacher_cfg, device="cpu")


def student_images(batch: int = 2, height: int = 64, width: int = 64, seed: int = 1) -> torch.Tensor:
    """Random pixels in [0, 1], normalised the student's way."""
    pixels = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def test_protocol_and_shapes(teacher: CLIPTeacher) -> None:
    assert isinstance(teacher, Teacher)
    assert teacher.embed_dim == 32 and teacher.patch_size == 8
    assert teacher.device == torch.device("cpu")
    assert teacher.identity.startswith("ViT-B-16/none")
    cls, dense = teacher.encode_image(student_images())
    assert cls.shape == (2, 32) and dense.shape == (2, 32, 8, 8)
    assert cls.dtype == dense.dtype == torch.float32
    torch.testing.assert_close(cls.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(dense.norm(dim=1), torch.ones(2, 8, 8))


def test_frozen_and_always_eval(teacher: CLIPTeacher) -> None:
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    parent = torch.nn.Sequential(teacher)
    parent.train()
    assert not teacher.model.visual.training
    images = student_images().requires_grad_(True)
    cls, dense = teacher.encode_image(images)
    assert cls.grad_fn is None and dense.grad_fn is None


def test_normalisation_conversion_is_exact(teacher: CLIPTeacher) -> None:
    pixels = torch.rand(2, 3, 5, 7)
    student = (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )
    expected = (pixels - torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        OPENAI_DATASET_STD
    ).view(1, 3, 1, 1)
    assert teacher.clip_mean == pytest.approx(OPENAI_DATASET_MEAN)
    torch.testing.assert_close(teacher.to_clip_input(student), expected, atol=1e-6, rtol=0)
    back = renormalize(expected, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(back, student, atol=1e-5, rtol=0)


def test_cls_equals_open_clip_encode_image(teacher: CLIPTeacher) -> None:
    images = student_images()
    cls, _ = teacher.encode_image(images)
    with torch.no_grad():
        expected = F.normalize(teacher.model.encode_image(teacher.to_clip_input(images)), dim=-1)
    torch.testing.assert_close(cls, expected, atol=1e-5, rtol=1e-5)


def test_dense_equals_step_by_step_value_path(teacher: CLIPTeacher) -> None:
    images = student_images()
    _, dense = teacher.encode_image(images, dense="value")
    visual = teacher.model.visual
    with torch.no_grad():
        x = visual._embeds(teacher.to_clip_input(images))  # (B, 1 + 64, 64), open_clip's own embedding
        for block in visual.transformer.resblocks[:-1]:
            x = block(x)
        last = visual.transformer.resblocks[-1]
        width = x.shape[-1]
        y = F.layer_norm(x, (width,), last.ln_1.weight, last.ln_1.bias, last.ln_1.eps)
        w_v = last.attn.in_proj_weight.chunk(3)[2]  # rows: query, key, value
        b_v = last.attn.in_proj_bias.chunk(3)[2]
        v = y @ w_v.T + b_v
        y = v @ last.attn.out_proj.weight.T + last.attn.out_proj.bias  # no attention, no residual, no MLP
        y = F.layer_norm(y[:, 1:], (width,), visual.ln_post.weight, visual.ln_post.bias, visual.ln_post.eps)
        y = F.normalize(y @ visual.proj, dim=-1)  # (B, 64, 32)
        expected = y.reshape(2, 8, 8, 32).permute(0, 3, 1, 2)
    torch.testing.assert_close(dense, expected, atol=1e-5, rtol=1e-5)
    # Sanity: the value path is not the plain last-layer patch tokens.
    plain = F.normalize(visual.ln_post(last(x)[:, 1:]) @ visual.proj, dim=-1).reshape(2, 8, 8, 32)
    assert not torch.allclose(plain.permute(0, 3, 1, 2), dense, atol=1e-3)


def test_dense_maskclip_equals_maskclips_released_last_block(teacher: CLIPTeacher) -> None:
    # MaskCLIP's released code: v = out_proj(v_proj(ln_1(x))); v = v + x; v = v + mlp(ln_2(v)); ln_post; proj.
    images = student_images()
    _, dense = teacher.encode_image(images, dense="maskclip")
    visual = teacher.model.visual
    with torch.no_grad():
        x = visual._embeds(teacher.to_clip_input(images))
        for block in visual.transformer.resblocks[:-1]:
            x = block(x)
        last = visual.transformer.resblocks[-1]
        width = x.shape[-1]
        y = F.layer_norm(x, (width,), last.ln_1.weight, last.ln_1.bias, last.ln_1.eps)
        v = y @ last.attn.in_proj_weight.chunk(3)[2].T + last.attn.in_proj_bias.chunk(3)[2]
        v = v @ last.attn.out_proj.weight.T + last.attn.out_proj.bias
        v = v + x
        h = F.layer_norm(v, (width,), last.ln_2.weight, last.ln_2.bias, last.ln_2.eps)
        h = F.gelu(h @ last.mlp.c_fc.weight.T + last.mlp.c_fc.bias)
        v = v + h @ last.mlp.c_proj.weight.T + last.mlp.c_proj.bias
        v = F.layer_norm(v[:, 1:], (width,), visual.ln_post.weight, visual.ln_post.bias, visual.ln_post.eps)
        expected = F.normalize(v @ visual.proj, dim=-1).reshape(2, 8, 8, 32).permute(0, 3, 1, 2)
    torch.testing.assert_close(dense, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(
        dense, teacher.encode_image(images, dense="value")[1], atol=1e-3
    )  # not the value path
    # The config chooses the default path; the argument overrides it.
    as_config = build_teacher(dataclasses.replace(teacher.cfg, dense="maskclip"), device="cpu")
    torch.testing.assert_close(as_config.encode_image(images)[1], dense)


def test_unknown_dense_path_is_one_line(tiny_teacher_cfg: TeacherConfig) -> None:
    with pytest.raises(
        ValueError,
        match=re.escape("teacher.dense='gem' is not one of value, maskclip, clearclip, sclip, naclip"),
    ):
        build_teacher(dataclasses.replace(tiny_teacher_cfg, dense="gem"), device="cpu")


@pytest.mark.parametrize("std", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_naclip_std_is_one_line(tiny_teacher_cfg: TeacherConfig, std: float) -> None:
    with pytest.raises(ValueError, match=r"^teacher.naclip_std=.* must be a positive number"):
        build_teacher(dataclasses.replace(tiny_teacher_cfg, naclip_std=std), device="cpu")


# ---------------------------------------------------------------------- the recipes' released last blocks
# Literal re-implementations of each recipe's released code, in its own (L, N, D) layout: ClearCLIP
# (mc-lan/ClearCLIP, open_clip/transformer.py: VisionTransformer.forward with ignore_residual=True and
# custom_attn), SCLIP (wangf3014/SCLIP, clip/model.py: VisionTransformer.forward with csa=True and custom_attn)
# and NACLIP (sinahmr/NACLIP, clip/model.py: arch="reduced", attn_strategy="naclip", gaussian_window,
# get_attention_addition, custom_attn).


def released_gaussian_window(dim1: int, dim2: int, std: float = 1.0) -> torch.Tensor:
    constant = 1 / (std * math.sqrt(2))
    ks = list()
    for dim in [dim1, dim2]:
        start = -(dim - 1) / 2.0
        k = torch.linspace(
            start=start * constant, end=(start + (dim - 1)) * constant, steps=dim, dtype=torch.float
        )
        ks.append(k)
    dist_square_to_mu = (torch.stack(torch.meshgrid(*ks, indexing="ij")) ** 2).sum(0)
    return torch.exp(-dist_square_to_mu)


def released_attention_addition(dim1: int, dim2: int, window: torch.Tensor) -> torch.Tensor:
    m = torch.einsum("ij,kl->ijkl", torch.eye(dim1), torch.eye(dim2))
    m = m.permute((0, 3, 1, 2)).contiguous()  # m[ijkl] = 1 iff (i, j) == (k, l)
    out = F.conv2d(
        m.view(-1, dim1, dim2).unsqueeze(1), window.unsqueeze(0).unsqueeze(1), padding="same"
    ).squeeze(1)
    out = out.view(dim1 * dim2, dim1 * dim2)
    v_adjusted = torch.vstack([torch.zeros((1, dim1 * dim2)), out])
    return torch.hstack([torch.zeros((dim1 * dim2 + 1, 1)), v_adjusted])


def released_custom_attn(attn_layer, x, model_type, n_patches=None, gaussian_std=5.0):
    num_heads = attn_layer.num_heads
    _, bsz, embed_dim = x.size()
    head_dim = embed_dim // num_heads
    scale = head_dim**-0.5

    q, k, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    q = q.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)

    if model_type == "ClearCLIP":
        qq_attn = torch.bmm(q, q.transpose(1, 2)) * scale
        attn_weights = F.softmax(qq_attn, dim=-1)
    elif model_type == "SCLIP":  # csa=True
        q_attn = torch.bmm(q, q.transpose(1, 2)) * scale
        k_attn = torch.bmm(k, k.transpose(1, 2)) * scale
        attn_weights = F.softmax(q_attn, dim=-1) + F.softmax(k_attn, dim=-1)
    elif model_type == "NACLIP":  # attn_strategy="naclip"
        window_size = [side * 2 - 1 for side in n_patches]
        window = released_gaussian_window(*window_size, std=gaussian_std)
        addition = released_attention_addition(*n_patches, window).unsqueeze(0).to(x.dtype).to(x.device)
        attn_weights = torch.bmm(k, k.transpose(1, 2)) * scale
        omega = addition
        attn_weights += omega
        attn_weights = F.softmax(attn_weights, dim=-1)

    attn_output = torch.bmm(attn_weights, v)
    attn_output = attn_output.transpose(0, 1).contiguous().view(-1, bsz, embed_dim)
    attn_output = attn_layer.out_proj(attn_output)
    return attn_output


def released_last_block(blk, x, model_type, n_patches=None, gaussian_std=5.0):
    """(N, L, D) input of the last block → what each released forward makes of it, still (N, L, D)."""
    x = x.permute(1, 0, 2)  # NLD -> LND
    if model_type in ("ClearCLIP", "NACLIP"):  # ignore_residual=True / arch="reduced"
        x = released_custom_attn(blk.attn, blk.ln_1(x), model_type, n_patches, gaussian_std)
    else:  # SCLIP
        x = x + released_custom_attn(blk.attn, blk.ln_1(x), model_type)
        x = x + blk.mlp(blk.ln_2(x))
    return x.permute(1, 0, 2)  # LND -> NLD


def released_patch_features(visual, x):
    """ln_post, proj, the patch tokens, normalised as the segmentors do: (N, h·w, C)."""
    image_features = visual.ln_post(x) @ visual.proj
    image_features = image_features[:, 1:]
    return image_features / image_features.norm(dim=-1, keepdim=True)


RELEASED = {"clearclip": "ClearCLIP", "sclip": "SCLIP", "naclip": "NACLIP"}


@pytest.mark.parametrize("mode", ["clearclip", "sclip", "naclip"])
def test_dense_recipe_equals_its_released_last_block_step_by_step_fp64(
    teacher: CLIPTeacher, mode: str
) -> None:
    visual = copy.deepcopy(teacher.model.visual).double()
    last = visual.transformer.resblocks[-1]
    grid = (6, 5)  # not square: rows and columns must not be swapped
    x = torch.randn(
        2, 1 + grid[0] * grid[1], 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3)
    )
    std = 1.5  # small enough for the prior to matter on a 6x5 grid
    with torch.no_grad():
        normed = last.ln_1(x)
        # Step 1: the attention as the recipe replaces it, through out_proj.
        ours = _recipe_attention(last, normed, mode, grid, std)
        theirs = released_custom_attn(last.attn, normed.transpose(0, 1), RELEASED[mode], grid, std).transpose(
            0, 1
        )
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
        # Step 2: the whole block (residual and FFN where the recipe keeps them).
        _, tokens = _last_block(last, x, mode, grid, std)
        block = released_last_block(last, x, RELEASED[mode], grid, std)
        torch.testing.assert_close(tokens, block, atol=1e-6, rtol=0)
        # Step 3: the final tokens.
        final = F.normalize(visual.ln_post(tokens[:, 1:]) @ visual.proj, dim=-1)
        torch.testing.assert_close(final, released_patch_features(visual, block), atol=1e-6, rtol=0)
        # The recipes differ from one another and from the value path.
        others = [m for m in ("value", "maskclip", "clearclip", "sclip", "naclip") if m != mode]
        for other in others:
            assert not torch.allclose(_dense_path(last, x, other, None, grid, std), tokens, atol=1e-4), other
    if mode == "naclip":
        prior = neighbourhood_prior(grid, std)
        window = released_gaussian_window(2 * grid[0] - 1, 2 * grid[1] - 1, std=std)
        torch.testing.assert_close(
            prior, released_attention_addition(*grid, window).double(), atol=1e-6, rtol=0
        )


@pytest.mark.parametrize("mode", ["clearclip", "sclip", "naclip"])
def test_dense_recipe_through_encode_image(teacher: CLIPTeacher, mode: str) -> None:
    """The teacher passes the recipe its own grid (not square here) and σ: its tokens equal the released block's."""
    images = student_images(height=48, width=64)
    captured = {}
    hook = teacher.model.visual.transformer.resblocks[-2].register_forward_hook(
        lambda module, args, output: captured.setdefault("x", output)
    )
    try:
        _, dense = teacher.encode_image(images, size=(48, 64), dense=mode)
    finally:
        hook.remove()
    visual = teacher.model.visual
    with torch.no_grad():
        block = released_last_block(
            visual.transformer.resblocks[-1], captured["x"], RELEASED[mode], (6, 8), 5.0
        )
        expected = released_patch_features(visual, block).reshape(2, 6, 8, 32).permute(0, 3, 1, 2)
    torch.testing.assert_close(dense, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["value", "maskclip", "clearclip", "sclip", "naclip"])
def test_every_dense_path_is_normalised_on_the_expected_grid(
    tiny_teacher_cfg: TeacherConfig, mode: str
) -> None:
    teacher = build_teacher(dataclasses.replace(tiny_teacher_cfg, dense=mode), device="cpu")
    cls, dense = teacher.encode_image(student_images(height=40, width=72), size=(40, 72))
    assert cls.shape == (2, 32) and dense.shape == (2, 32, 5, 9)
    torch.testing.assert_close(dense.norm(dim=1), torch.ones(2, 5, 9))
    assert torch.isfinite(dense).all()


def test_naclip_std_is_the_configs(tiny_teacher_cfg: TeacherConfig) -> None:
    images = student_images()
    wide = build_teacher(dataclasses.replace(tiny_teacher_cfg, dense="naclip"), device="cpu")
    narrow = build_teacher(
        dataclasses.replace(tiny_teacher_cfg, dense="naclip", naclip_std=0.5), device="cpu"
    )
    assert TeacherConfig().naclip_std == 5.0  # NACLIP's released gaussian_std
    assert not torch.allclose(wide.encode_image(images)[1], narrow.encode_image(images)[1], atol=1e-4)


def test_default_dense_path_is_the_best_published_mean() -> None:
    means = {recipe: published_mean(recipe) for recipe in PUBLISHED_MIOU}
    assert means["clearclip"] == pytest.approx(38.08) and means["sclip"] == pytest.approx(37.76)
    assert means["naclip"] == pytest.approx(37.76) and means["maskclip"] == pytest.approx(30.10)
    assert TeacherConfig().dense == DEFAULT_DENSE == max(means, key=means.get) == "clearclip"
    # docs/protocols.md shows the same figures and means.
    doc = (Path(__file__).resolve().parents[1] / "docs" / "protocols.md").read_text()
    for recipe, title in BASELINE_TITLES.items():
        figures = " | ".join(f"{v:.1f}" for v in PUBLISHED_MIOU[recipe])
        row = next(line for line in doc.splitlines() if line.startswith(f"| {title} |"))
        assert f"| {figures} |" in row and f"{means[recipe]:.2f}" in row, row


def test_position_embedding_interpolation(teacher: CLIPTeacher) -> None:
    visual = teacher.model.visual
    pos = visual.positional_embedding
    assert torch.equal(teacher.interpolated_pos_embed((8, 8)), pos)

    resized = teacher.interpolated_pos_embed((12, 16))
    assert resized.shape == (1 + 12 * 16, 64)
    assert torch.equal(resized[0], pos[0])
    grid = pos[1:].reshape(8, 8, 64).permute(2, 0, 1)[None]
    expected = F.interpolate(grid, size=(12, 16), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    torch.testing.assert_close(resized[1:], expected.reshape(-1, 64))
    assert teacher.interpolated_pos_embed((12, 16)) is resized  # cached

    # A 96×128 input at its own size gives a 12×16 grid, and the CLS equals open_clip's forward with the
    # interpolated table swapped in.
    images = student_images(1, 96, 128)
    cls, dense = teacher.encode_image(images, size=(96, 128))
    assert dense.shape == (1, 32, 12, 16)
    original = visual.positional_embedding
    visual.positional_embedding = torch.nn.Parameter(resized.clone(), requires_grad=False)
    try:
        with torch.no_grad():
            expected_cls = F.normalize(teacher.model.encode_image(teacher.to_clip_input(images)), dim=-1)
    finally:
        visual.positional_embedding = original
    torch.testing.assert_close(cls, expected_cls, atol=1e-5, rtol=1e-5)


def test_resize_targets(teacher: CLIPTeacher) -> None:
    images = student_images(1, 40, 40)
    assert teacher.encode_image(images)[1].shape[-2:] == (8, 8)  # None → cfg.image_size = 64
    assert teacher.encode_image(images, size=96)[1].shape[-2:] == (12, 12)
    assert teacher.encode_image(images, size=(30, 50))[1].shape[-2:] == (4, 6)  # rounded to the 8-pixel patch


def test_bad_image_shape(teacher: CLIPTeacher) -> None:
    with pytest.raises(ValueError, match=r"\(3, 64, 64\)"):
        teacher.encode_image(torch.zeros(3, 64, 64))


def test_text_embeddings_equal_template_average(
    teacher: CLIPTeacher, tiny_teacher_cfg: TeacherConfig
) -> None:
    names = ["cat", "traffic light"]
    emb = teacher.text_embeddings(names)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    rows = []
    with torch.no_grad():
        for name in names:
            prompts = [t.format(name) for t in tiny_teacher_cfg.templates]
            per_prompt = F.normalize(teacher.model.encode_text(tokenizer(prompts)), dim=-1)
            rows.append(F.normalize(per_prompt.mean(0), dim=-1))
    assert emb.shape == (2, 32) and emb.dtype == torch.float32
    torch.testing.assert_close(emb, torch.stack(rows), atol=1e-5, rtol=1e-5)


def test_text_cache_memory_disk_and_invalidation(tiny_teacher_cfg: TeacherConfig, monkeypatch) -> None:
    cache = Path(tiny_teacher_cfg.cache_dir)
    first = build_teacher(tiny_teacher_cfg, device="cpu")
    emb = first.text_embeddings(["cat", "dog"])
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))
    assert torch.equal(first.text_embeddings(["cat", "dog"]), emb)

    second = build_teacher(tiny_teacher_cfg, device="cpu")

    def no_encoding(*args, **kwargs):
        raise AssertionError("the text encoder ran although the disk cache holds these classes")

    monkeypatch.setattr(second, "_encode_classes", no_encoding)
    assert torch.equal(second.text_embeddings(["cat", "dog"]), emb)

    changed = build_teacher(dataclasses.replace(tiny_teacher_cfg, templates=("a drawing of a {}.",)), "cpu")
    other = changed.text_embeddings(["cat", "dog"])
    assert len(list(cache.glob("*.safetensors"))) == 2
    assert not torch.allclose(other, emb)
    # An explicit templates argument is a different key too, and matches the config built with it.
    assert torch.equal(first.text_embeddings(["cat", "dog"], templates=("a drawing of a {}.",)), other)


def test_corrupt_text_cache_is_rewritten(tiny_teacher_cfg: TeacherConfig, caplog) -> None:
    emb = build_teacher(tiny_teacher_cfg, "cpu").text_embeddings(["cat"])
    (path,) = Path(tiny_teacher_cfg.cache_dir).glob("*.safetensors")
    path.write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="clipzss.models.text_cache"):
        again = build_teacher(tiny_teacher_cfg, "cpu").text_embeddings(["cat"])
    assert "corrupt" in caplog.text
    torch.testing.assert_close(again, emb)
    assert path.stat().st_size > 100
    third = build_teacher(tiny_teacher_cfg, "cpu")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clipzss.models.text_cache"):
        torch.testing.assert_close(third.text_embeddings(["cat"]), emb)
    assert "corrupt" not in caplog.text


@pytest.mark.parametrize(
    ("names", "fragment"),
    [
        ([], "empty"),
        (["cat", ""], "''"),
        (["cat", "   "], "'   '"),
        (["cat", "dog", "cat"], "duplicate.*cat"),
        (["Cat", "dog", "cat"], r"duplicate class names: Cat = cat \(the same name to CLIP"),
        ("cat", "single"),
    ],
)
def test_bad_class_names(teacher: CLIPTeacher, names, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        teacher.text_embeddings(names)


def test_templates_need_a_placeholder(teacher: CLIPTeacher) -> None:
    with pytest.raises(ValueError, match="a photo"):
        teacher.text_embeddings(["cat"], templates=("a photo",))


def test_random_weights_are_deterministic(tiny_teacher_cfg: TeacherConfig, caplog) -> None:
    torch.manual_seed(123)
    with caplog.at_level(logging.WARNING, logger="clipzss.models.teacher"):
        a = build_teacher(tiny_teacher_cfg, "cpu")
    after_build = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after_build)  # the global RNG is left untouched
    assert "meaningless" in caplog.text

    b = build_teacher(dataclasses.replace(tiny_teacher_cfg, cache_dir=None), "cpu")
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    b.cfg = dataclasses.replace(b.cfg, cache_dir=tiny_teacher_cfg.cache_dir + "_other")
    assert torch.equal(a.text_embeddings(["cat"]), b.text_embeddings(["cat"]))
    assert a.identity == b.identity


def _perturbed_state_dict(teacher: CLIPTeacher) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {
        k: (v + 0.01 * torch.randn(v.shape, generator=gen)).contiguous()
        if v.is_floating_point()
        else v.clone()
        for k, v in teacher.model.state_dict().items()
    }


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_from_local_file(teacher: CLIPTeacher, tiny_teacher_cfg, tmp_path: Path, suffix: str) -> None:
    state = _perturbed_state_dict(teacher)
    path = tmp_path / f"tiny_clip{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = build_teacher(dataclasses.replace(tiny_teacher_cfg, weights=str(path)), "cpu")
    got = loaded.model.state_dict()
    assert all(torch.equal(got[k], state[k]) for k in state)
    assert loaded.identity.startswith(f"ViT-B-16/file:tiny_clip{suffix}")
    assert not any(p.requires_grad for p in loaded.parameters())


def test_weights_file_that_does_not_fit(teacher: CLIPTeacher, tiny_teacher_cfg, tmp_path: Path) -> None:
    state = _perturbed_state_dict(teacher)
    del state["visual.proj"]
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"broken\.safetensors do not fit model 'ViT-B-16'.*visual\.proj"):
        build_teacher(dataclasses.replace(tiny_teacher_cfg, weights=str(path)), "cpu")
    with pytest.raises(ValueError) as info:
        build_teacher(dataclasses.replace(tiny_teacher_cfg, weights=str(path)), "cpu")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("weights", ["/nonexistent/clip.safetensors", "./missing.pt", "weights.bin"])
def test_missing_weights_file_is_one_clear_sentence(tiny_teacher_cfg, weights: str) -> None:
    with pytest.raises(FileNotFoundError) as info:
        build_teacher(dataclasses.replace(tiny_teacher_cfg, weights=weights), "cpu")
    message = str(info.value)
    assert Path(weights).name in message and "teacher.weights=none" in message
    assert "teacher.weights=/path/to/file" in message and "\n" not in message


def test_unknown_tag_lists_valid_tags(tiny_teacher_cfg) -> None:
    with pytest.raises(ValueError, match="not_a_tag") as info:
        build_teacher(dataclasses.replace(tiny_teacher_cfg, weights="not_a_tag"), "cpu")
    assert "openai" in str(info.value) and "laion2b_s34b_b88k" in str(info.value)


def test_unknown_model_and_precision(tiny_teacher_cfg) -> None:
    with pytest.raises(ValueError, match=r"did you mean.*ViT-B-16"):
        build_teacher(dataclasses.replace(tiny_teacher_cfg, model="ViT-B-99"), "cpu")
    with pytest.raises(ValueError, match="ViT-X-99"):
        build_teacher(dataclasses.replace(tiny_teacher_cfg, model="ViT-X-99"), "cpu")
    with pytest.raises(ValueError, match="fp8"):
        build_teacher(dataclasses.replace(tiny_teacher_cfg, precision="fp8"), "cpu")


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch) -> Path:
    """An empty Hugging Face cache, and a hub download that fails the test if it is ever attempted."""
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))

    def no_download(*args, **kwargs):
        raise AssertionError("hf_hub_download was called")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    return cache


def test_offline_tag_fails_fast_with_advice(tiny_teacher_cfg, empty_hub_cache, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_socket(*args, **kwargs):
        raise AssertionError("the hub was probed although HF_HUB_OFFLINE is set")

    monkeypatch.setattr(socket, "create_connection", no_socket)
    with pytest.raises(RuntimeError) as info:
        build_teacher(dataclasses.replace(tiny_teacher_cfg, weights="openai"), "cpu")
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message and "teacher.weights=none" in message and "\n" not in message


def test_unreachable_hub_fails_fast(tiny_teacher_cfg, empty_hub_cache, monkeypatch) -> None:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hf_constants, "is_offline_mode", lambda: False)
    probed = []

    def refuse(address, timeout=None):
        probed.append((address, timeout))
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(RuntimeError, match=r"unreachable.*teacher\.weights=/path/to/file"):
        build_teacher(dataclasses.replace(tiny_teacher_cfg, weights="openai"), "cpu")
    assert len(probed) == 1 and probed[0][1] <= 5


def test_tag_loads_from_hugging_face_cache_offline(
    teacher: CLIPTeacher, tiny_teacher_cfg, empty_hub_cache: Path, monkeypatch
) -> None:
    # Lay the file out as huggingface_hub caches it, so the offline machine finds an earlier download.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo_id = open_clip.get_pretrained_cfg("ViT-B-16", "openai")["hf_hub"].rstrip("/")
    repo = empty_hub_cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    state = _perturbed_state_dict(teacher)
    save_file(state, str(snapshot / "open_clip_model.safetensors"))

    loaded = build_teacher(dataclasses.replace(tiny_teacher_cfg, weights="openai"), "cpu")
    got = loaded.model.state_dict()
    assert all(torch.equal(got[k], state[k]) for k in state)
    assert loaded.identity.startswith("ViT-B-16/openai")
    # OpenAI weights were trained with QuickGELU; the plain ViT-B-16 config must be switched to it.
    assert isinstance(loaded.model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    assert loaded.clip_std == pytest.approx(OPENAI_DATASET_STD)


@pytest.mark.parametrize("vision_override", [{"attentional_pool": True}, {"pool_type": "avg"}])
def test_unsupported_visual_tower(tiny_teacher_cfg, vision_override: dict) -> None:
    overrides = dict(tiny_teacher_cfg.model_overrides)
    overrides["vision_cfg"] = {**overrides["vision_cfg"], **vision_override}
    with pytest.raises(ValueError, match="not supported"):
        build_teacher(dataclasses.replace(tiny_teacher_cfg, model_overrides=overrides), "cpu")


def test_bf16_precision_outputs_float32(tiny_teacher_cfg) -> None:
    fp32 = build_teacher(tiny_teacher_cfg, "cpu")
    bf16 = build_teacher(dataclasses.replace(tiny_teacher_cfg, precision="bf16"), "cpu")
    images = student_images()
    (cls32, dense32), (cls16, dense16) = fp32.encode_image(images), bf16.encode_image(images)
    assert cls16.dtype == dense16.dtype == torch.float32
    assert (cls16 - cls32).abs().max() < 0.05 and (dense16 - dense32).abs().max() < 0.05
