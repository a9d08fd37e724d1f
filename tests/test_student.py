"""build_student: every supported smp architecture at stride 4, padding, parameter groups, weights, errors."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file

from clipzss import hub
from clipzss.config import StudentConfig
from clipzss.models import student as student_module
from clipzss.models.student import SUPPORTED_ARCHS, Student, build_student

EMBED = 24  # unlike any decoder width below, so hooks can tell embedding maps from decoder maps

# One small encoder (and narrow decoder) per supported architecture; the finest stride its decoder computes.
CASES: dict[str, tuple[str, dict, int]] = {
    "Segformer": ("mit_b0", {"decoder_segmentation_channels": 32}, 4),
    "FPN": ("resnet18", {"decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32}, 4),
    "UPerNet": ("tu-convnext_atto", {"decoder_channels": 32}, 4),
    "PAN": ("resnet18", {}, 4),
    "DeepLabV3Plus": ("resnet18", {"decoder_channels": 32}, 4),
    "DeepLabV3": ("resnet18", {"decoder_channels": 32}, 4),
    "PSPNet": ("resnet18", {"psp_out_channels": 32}, 4),
    "DPT": (
        "tu-vit_tiny_patch16_224",
        {"decoder_intermediate_channels": (16, 16, 16, 16), "decoder_fusion_channels": 16},
        2,  # its fusion ends at 1/2 (pooled before the head)
    ),
    "Unet": ("resnet18", {"decoder_channels": (64, 32, 16, 16, 16)}, 4),
    "MAnet": ("resnet18", {"decoder_channels": (64, 32, 16, 16, 16)}, 4),
    "Linknet": ("resnet18", {}, 4),
}
# Parameters smp builds but never runs, which build_student freezes (DDP rejects trainable unused parameters).
UNUSED: dict[str, tuple[str, ...]] = {
    "PSPNet": ("model.encoder.layer3.", "model.encoder.layer4."),  # encoder_depth=3 keeps the deeper stages
    "DPT": ("model.encoder.model.norm.", "model.encoder.model.head."),  # the ViT's final norm and classifier
}


def _cfg(arch: str, weights: str | None = None) -> StudentConfig:
    encoder, kwargs, _ = CASES[arch]
    return StudentConfig(arch=arch, encoder=encoder, weights=weights, embed_dim=EMBED, arch_kwargs=kwargs)


@pytest.fixture(scope="module")
def _built() -> dict[str, Student]:
    """The module's students by architecture: building is the slow part, and tests only run them."""
    return {}


@pytest.fixture
def students(_built: dict[str, Student]) -> Iterator[Callable[[str], Student]]:
    """``students(arch)``: the module's student of ``arch``, built on first use; whatever mode a test puts it in
    and whatever gradients it leaves, the next test gets it in training mode without gradients."""
    used: list[Student] = []

    def get(arch: str) -> Student:
        if arch not in _built:
            torch.manual_seed(0)
            _built[arch] = build_student(_cfg(arch))
        used.append(_built[arch])
        return _built[arch]

    yield get
    for model in used:
        model.train()
        model.zero_grad(set_to_none=True)


def test_every_supported_architecture_has_a_case() -> None:
    assert set(CASES) == set(SUPPORTED_ARCHS)


@pytest.mark.parametrize("arch", list(CASES))
def test_output_is_stride_4_and_never_finer(arch: str, students: Callable[[str], Student]) -> None:
    model = students(arch).eval()
    finest = CASES[arch][2]
    seen: list[tuple[str, int, int, int]] = []

    def record(name: str):
        def hook(_module, _inputs, output) -> None:
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                seen.append((name, output.shape[1], output.shape[2], output.shape[3]))

        return hook

    handles = [
        m.register_forward_hook(record(n))
        for n, m in model.model.named_modules()
        if n.startswith(("decoder", "segmentation_head"))
    ]
    try:
        for h, w in [(64, 64), (70, 45)]:
            seen.clear()
            with torch.no_grad():
                out = model(torch.randn(1, 3, h, w))
            assert out.shape == (1, EMBED, math.ceil(h / 4), math.ceil(w / 4))
            padded_h = model.padded_size(h, w)[0]
            for name, channels, oh, _ in seen:
                assert oh <= padded_h // finest, f"{name} works at stride {padded_h / oh:g}"
                if name.startswith("segmentation_head") and channels == EMBED:
                    assert oh <= padded_h // 4, f"{name} makes embed_dim channels at stride {padded_h / oh:g}"
    finally:
        for handle in handles:
            handle.remove()
    assert model.output_stride == 4 and model.embed_dim == EMBED


@pytest.mark.parametrize("arch", list(CASES))
def test_parameter_groups_cover_everything_once_and_all_get_gradients(
    arch: str, students: Callable[[str], Student]
) -> None:
    model = students(arch).train()
    encoder_ids = [id(p) for p in model.encoder_parameters()]
    head_ids = [id(p) for p in model.head_parameters()]
    all_ids = [id(p) for p in model.parameters()]
    assert len(set(encoder_ids)) == len(encoder_ids) and len(set(head_ids)) == len(head_ids)
    assert not set(encoder_ids) & set(head_ids)
    assert sorted(encoder_ids + head_ids) == sorted(all_ids)
    assert encoder_ids and head_ids

    model.zero_grad(set_to_none=True)
    out = model(torch.randn(2, 3, 64, 64))  # batch 2: ASPP / PSP pool to 1x1 under BatchNorm
    (out * torch.randn_like(out)).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"trainable parameters without a gradient: {no_grad[:5]}"
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == list(model.unused_parameters)
    expected_unused = UNUSED.get(arch, ())
    assert bool(frozen) == bool(expected_unused)
    assert all(name.startswith(expected_unused) for name in frozen), frozen
    for group in (model.encoder_parameters(), model.head_parameters()):
        assert any(p.grad.abs().sum() > 0 for p in group)
    model.zero_grad(set_to_none=True)


def test_odd_image_is_padded_bottom_right_with_zeros_and_cropped(students: Callable[[str], Student]) -> None:
    model = students("Segformer").eval()
    image = torch.randn(1, 3, 375, 500)
    with torch.no_grad():
        out = model(image)
        padded = model(F.pad(image, (0, 12, 0, 9)))  # 384 x 512 is what the student pads to
    assert out.shape == (1, EMBED, 94, 125)
    assert padded.shape == (1, EMBED, 96, 128)
    torch.testing.assert_close(out, padded[..., :94, :125])


def test_channels_last_gives_the_same_embeddings() -> None:
    torch.manual_seed(0)
    model = build_student(_cfg("FPN")).eval()
    image = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        expected = model(image)
        model = model.to(memory_format=torch.channels_last)
        out = model(image.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def _encoder_state(model: Student) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.model.encoder.state_dict().items()}


def _assert_same_encoder(model: Student, expected: dict[str, torch.Tensor]) -> None:
    state = model.model.encoder.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("form", ["encoder.safetensors", "student.pt"])
def test_local_weights_round_trip(tmp_path: Path, form: str, students: Callable[[str], Student]) -> None:
    source = students("Segformer")
    path = tmp_path / form
    if form.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in source.model.encoder.state_dict().items()}, str(path))
    else:
        torch.save(source.state_dict(), path)  # a whole student: its model.encoder.* keys are used
    torch.manual_seed(1)  # another random init, which the file must overwrite
    loaded = build_student(_cfg("Segformer", weights=str(path)))
    _assert_same_encoder(loaded, _encoder_state(source))


def test_timm_checkpoint_loads_into_a_tu_encoder(tmp_path: Path) -> None:
    torch.manual_seed(3)
    classifier = timm.create_model("convnext_atto")  # keys as in timm's own model.safetensors
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(path))
    loaded = build_student(_cfg("UPerNet", weights=str(path)))
    encoder = loaded.model.encoder.model
    torch.testing.assert_close(encoder.stem_0.weight, classifier.stem[0].weight, rtol=0, atol=0)
    torch.testing.assert_close(
        encoder.stages_3.blocks[1].mlp.fc2.weight,
        classifier.stages[3].blocks[1].mlp.fc2.weight,
        rtol=0,
        atol=0,
    )


def test_weights_that_do_not_fit_name_the_keys(tmp_path: Path, students: Callable[[str], Student]) -> None:
    state = dict(students("Segformer").model.encoder.state_dict())
    state.pop("norm4.weight")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(ValueError, match=r"broken\.safetensors") as err:
        build_student(_cfg("Segformer", weights=str(path)))
    assert "1 missing keys (norm4.weight)" in str(err.value)
    assert "1 unexpected keys (extra.weight)" in str(err.value)


def test_weights_of_another_encoder_fail_with_a_size_mismatch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    other = build_student(StudentConfig(arch="Segformer", encoder="mit_b0", embed_dim=EMBED))
    state = {k: v.contiguous() for k, v in other.model.encoder.state_dict().items()}
    state["patch_embed1.proj.weight"] = torch.zeros(8, 3, 7, 7)
    path = tmp_path / "wrong.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"size mismatch for patch_embed1\.proj\.weight"):
        build_student(_cfg("Segformer", weights=str(path)))


def test_missing_weights_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "encoder.safetensors"
    with pytest.raises(FileNotFoundError, match=r"nowhere/encoder\.safetensors"):
        build_student(_cfg("Segformer", weights=str(missing)))


def test_none_string_means_random_init() -> None:
    assert isinstance(build_student(_cfg("Linknet", weights="none")), Student)


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.mark.parametrize("arch", ["Segformer", "UPerNet"])  # an smp encoder and a timm one
@pytest.mark.parametrize("why", ["HF_HUB_OFFLINE", "unreachable"])
def test_imagenet_weights_offline_fail_fast_with_advice(
    arch: str, why: str, empty_hf_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if why == "HF_HUB_OFFLINE":
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    else:
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub, "reachable", lambda url: (False, "test"))
    with pytest.raises(FileNotFoundError, match=r"offline.*student\.weights=/path/to/"):
        build_student(_cfg(arch, weights="imagenet"))


def _put_in_hf_cache(cache: Path, repo_id: str, revision: str, filename: str, state: dict) -> None:
    commit = revision if len(revision) == 40 else "0" * 40
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    (folder / "snapshots" / commit).mkdir(parents=True)
    if commit != revision:
        (folder / "refs").mkdir()
        (folder / "refs" / revision).write_text(commit)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "snapshots" / commit / filename))


def test_imagenet_weights_come_from_the_local_cache_offline(
    empty_hf_cache: Path, monkeypatch: pytest.MonkeyPatch, students: Callable[[str], Student]
) -> None:
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    settings = student_module.smp.encoders.encoders["mit_b0"]["pretrained_settings"]["imagenet"]
    expected = _encoder_state(students("Segformer"))
    _put_in_hf_cache(empty_hf_cache, settings["repo_id"], settings["revision"], "model.safetensors", expected)
    _assert_same_encoder(build_student(_cfg("Segformer", weights="imagenet")), expected)

    torch.manual_seed(5)
    classifier = timm.create_model("convnext_atto")
    hub_id = timm.models.get_pretrained_cfg("convnext_atto").hf_hub_id
    _put_in_hf_cache(empty_hf_cache, hub_id, "main", "model.safetensors", classifier.state_dict())
    loaded = build_student(_cfg("UPerNet", weights="imagenet"))
    torch.testing.assert_close(
        loaded.model.encoder.model.stem_0.weight, classifier.stem[0].weight, rtol=0, atol=0
    )


@pytest.mark.parametrize(
    ("arch", "encoder", "kwargs", "message"),
    [
        (
            "Segfromer",
            "mit_b0",
            {},
            r"unknown student architecture 'Segfromer'; choose one of Segformer, FPN.*did you mean 'Segformer'",
        ),
        (
            "UnetPlusPlus",
            "resnet18",
            {},
            r"'UnetPlusPlus' is not supported: .*full resolution.*choose one of .*Unet",
        ),
        (
            "FPN",
            "resnet181",
            {},
            r"unknown student encoder 'resnet181'; choose one of resnet18, .*tu-<timm name>.*did you mean 'resnet18'",
        ),
        (
            "FPN",
            "tu-convnext_atoo",
            {},
            r"unknown timm encoder 'tu-convnext_atoo'.*did you mean 'tu-convnext_atto'",
        ),
        ("FPN", "tu-convnext_atto.nope", {}, r"unknown timm encoder 'tu-convnext_atto.nope'.*tag"),
        ("FPN", "resnet18", {"classes": 3}, r"arch_kwargs may not set 'classes'"),
        (
            "FPN",
            "tu-convnext_atto",
            {"bogus": 3},
            r"cannot build student FPN with encoder 'tu-convnext_atto'.*bogus",
        ),
        (
            "FPN",
            "resnet18",
            {"decoder_wrong": 1},
            r"unknown student.arch_kwargs key 'decoder_wrong' for FPN.*did you mean 'decoder_dropout'",
        ),
    ],
)
def test_bad_names_explain_themselves(arch: str, encoder: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_student(StudentConfig(arch=arch, encoder=encoder, embed_dim=EMBED, arch_kwargs=kwargs))


def test_unknown_hub_tag_is_named() -> None:
    with pytest.raises(
        ValueError, match="mit_b0' has no 'ssl' weights; its pretrained weights are: imagenet"
    ):
        build_student(StudentConfig(arch="Segformer", encoder="mit_b0", weights="ssl", embed_dim=EMBED))


def test_fixed_size_timm_encoders_take_any_size() -> None:
    # Swin is built for 224x224 only; build_student asks timm for dynamic sizes (shrunk here to stay fast).
    tiny_swin = {"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1), "decoder_channels": 32}
    cfg = StudentConfig(
        arch="UPerNet", encoder="tu-swin_tiny_patch4_window7_224", embed_dim=EMBED, arch_kwargs=tiny_swin
    )
    model = build_student(cfg).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 70, 45))
    assert out.shape == (1, EMBED, 18, 12)


def test_an_inference_build_probes_forward_only_and_freezes_nothing(
    monkeypatch: pytest.MonkeyPatch, students: Callable[[str], Student]
) -> None:
    """Segmenter.from_checkpoint and export build students that never train: no backward, nothing frozen."""
    calls = {"forward": 0}
    real_forward = Student.forward

    def counting_forward(self, images):
        calls["forward"] += 1
        assert not torch.is_grad_enabled(), "the inference probe runs without autograd"
        return real_forward(self, images)

    def no_backward(*args, **kwargs):
        raise AssertionError("an inference build runs no backward")

    monkeypatch.setattr(Student, "forward", counting_forward)
    monkeypatch.setattr(torch.Tensor, "backward", no_backward)
    model = build_student(_cfg("Linknet"), for_training=False)
    assert calls["forward"] == 1 and model.training
    assert model.unused_parameters == ()
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    monkeypatch.undo()
    trained = build_student(_cfg("Linknet"))  # a training build: the same tensors, the unused ones frozen
    assert trained.unused_parameters == students("Linknet").unused_parameters
    assert model.state_dict().keys() == trained.state_dict().keys()


@pytest.mark.parametrize("for_training", [True, False])
def test_an_encoder_that_cannot_take_the_probe_size_fails_in_one_line(for_training: bool) -> None:
    tiny_swin = {"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1), "decoder_channels": 32}
    cfg = StudentConfig(
        arch="UPerNet",
        encoder="tu-swin_tiny_patch4_window7_224",
        embed_dim=EMBED,
        arch_kwargs={**tiny_swin, "dynamic_img_size": False},
    )
    with pytest.raises(
        ValueError, match=r"student UPerNet/tu-swin_tiny_patch4_window7_224 cannot run a \d+x\d+ image"
    ):
        build_student(cfg, for_training=for_training)
