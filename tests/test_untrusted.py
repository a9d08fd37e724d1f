"""Values and files from someone else are checked like user input: a checkpoint's or an ONNX file's settings never
reach the network, never choose where we write and never end in a traceback; sizes, weights and training values
out of range are one line naming the field; a resumed run stays in its own folder.

Each test holds one row of docs/reliability.md.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import clipzss.training.loop
from clipzss.cli import main
from clipzss.training.state import load_training_state
from conftest import one_error_line


def _copy_run(trained_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the session's finished 2-step run (model, state at step 2, config.yaml)."""
    run = tmp_path / "run"
    shutil.copytree(trained_checkpoint.parent, run, ignore=shutil.ignore_patterns("tb"))
    return run


def _rewrite(checkpoint: Path, out: Path, edit, tensors=None) -> Path:
    """A copy of the checkpoint whose config (a dict) ``edit`` changed, and optionally other tensors."""
    with safe_open(str(checkpoint), framework="pt") as handle:
        metadata = dict(handle.metadata())
    config = json.loads(metadata["config"])
    edit(config)
    metadata["config"] = json.dumps(config)
    save_file(tensors or load_file(str(checkpoint)), str(out), metadata=metadata)
    return out


# --- resuming ---------------------------------------------------------------------------------------------------


def test_resume_continues_in_the_run_folder_whatever_its_config_says(
    trained_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A run folder that moved, or came from someone else, names another train.output_dir in its config."""
    run = _copy_run(trained_checkpoint, tmp_path / "a" / "b")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["train"]["output_dir"] = "../../somewhere"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    cwd = tmp_path / "a" / "b" / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with caplog.at_level(logging.INFO, logger="clipzss"):
        assert main(["train", str(run / "config.yaml"), "train.max_iters=3", "--resume", str(run)]) == 0
    assert load_training_state(run)["step"] == 3
    assert not (tmp_path / "somewhere").exists()
    assert "in place" in caplog.text and "'../../somewhere' is not used" in caplog.text


def test_overrides_after_resume_are_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_train(cfg, resume=None, overwrite=False):
        seen.update(cfg=cfg, resume=resume)
        return tmp_path / "model.safetensors"

    monkeypatch.setattr(clipzss.training.loop, "train", fake_train)
    run = tmp_path / "run"
    run.mkdir()
    argv = ["train", "train.lr=1e-4", "--resume", str(run), "train.max_iters=30", "eval.stride=100"]
    assert main(argv) == 0
    assert seen["resume"] == str(run)
    assert (seen["cfg"].train.max_iters, seen["cfg"].train.lr, seen["cfg"].eval.stride) == (30, 1e-4, 100)
    assert seen["cfg"].train.output_dir == str(run)  # resumed in place


def test_unknown_options_after_overrides_show_the_commands_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["train", "train.lr=1e-4", "--resume", "x", "train.max_iters=30", "--bogus"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "usage: clipzss train" in err and "unrecognized arguments: train.max_iters=30 --bogus" in err


# --- training values --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.lr=inf", "train.lr=inf is not a finite number"),
        ("train.lr=nan", "train.lr=nan is not a finite number"),
        ("train.lr=-1e-4", "train.lr=-0.0001 must be at least 0"),
        ("train.max_iters=-5", "train.max_iters=-5 must be at least 1"),
        ("train.max_iters=0", "train.max_iters=0 must be at least 1"),
        ("data.crop_size=0", "data.crop_size=0 is not an image size"),
        ("eval.short_side=200000", "eval.short_side=200000 is not an image size clipzss handles (1 to 4096"),
        ("method.tau=.nan", "method.tau=nan is not a finite number"),
        ("data.ratio_range=[2,1]", "data.ratio_range=[2.0, 1.0] must be two positive ratios"),
    ],
)
def test_training_values_no_run_can_use_are_refused_naming_the_key(
    override: str, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    short = ["train.max_iters=2", "train.eval_interval=0", "data.num_workers=0", "train.device=cpu"]
    argv = [
        "train",
        "data.dataset=synthetic",
        "teacher.weights=none",
        f"train.output_dir={out}",
        *short,
        override,
    ]
    one_error_line(argv, capsys, needle)
    assert not out.exists()


def test_a_config_built_in_python_is_checked_by_train(tmp_path: Path) -> None:
    import dataclasses

    from clipzss.config import ConfigValueError
    from conftest import tiny_config

    cfg = tiny_config(tmp_path / "run", tmp_path / "cache")
    cfg.train = dataclasses.replace(cfg.train, lr=float("inf"))
    with pytest.raises(ConfigValueError, match=r"train\.lr=inf is not a finite number"):
        clipzss.training.loop.train(cfg)
    assert not (tmp_path / "run").exists()


# --- a checkpoint's config never reaches the network -----------------------------------------------------------


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every attempt to open a network connection, refused and recorded (the test machine has no network)."""
    import socket

    attempts: list[object] = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError("network access in a test")

    def resolve(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    return attempts


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (
            lambda c: c["teacher"]["model_overrides"]["vision_cfg"].update(
                timm_model_name="hf-hub:timm/vit_x"
            ),
            "teacher.model_overrides.vision_cfg.timm_model_name",
        ),
        (
            lambda c: c["teacher"]["model_overrides"]["vision_cfg"].update(
                timm_model_name="HF_HUB:timm/vit_x"
            ),
            "teacher.model_overrides.vision_cfg.timm_model_name",
        ),
        (lambda c: c["student"].update(encoder="tu-hf-hub:timm/resnet18.a1_in1k"), "student.encoder"),
        (lambda c: c["teacher"].update(model="hf-hub:laion/CLIP-ViT-B-32"), "teacher.model"),
        (lambda c: c["teacher"].update(weights="hf-hub:laion/CLIP-ViT-B-32"), "teacher.weights"),
        (lambda c: c["student"].update(weights="https://example.com/encoder.pth"), "student.weights"),
        (
            lambda c: c["student"]["arch_kwargs"].update(decoder={"backbone": "local-dir:/tmp/m"}),
            "student.arch_kwargs.decoder.backbone",
        ),
    ],
)
def test_checkpoint_names_of_hub_models_are_refused(
    edit, field: str, trained_checkpoint: Path, tmp_path: Path, connections: list[object]
) -> None:
    from clipzss.checkpoint import CheckpointError
    from clipzss.models.segmenter import Segmenter

    ckpt = _rewrite(trained_checkpoint, tmp_path / "hub.safetensors", edit)
    with pytest.raises(CheckpointError, match=rf"{field}=.* names a model on the Hugging Face hub"):
        Segmenter.from_checkpoint(ckpt, device="cpu")
    assert connections == []


def test_checkpoint_teacher_with_a_hub_text_tower_is_refused(
    trained_checkpoint: Path, tmp_path: Path, connections: list[object], capsys: pytest.CaptureFixture[str]
) -> None:
    """roberta-ViT-B-32 is in open_clip's registry, but transformers fetches its text tower's config."""
    ckpt = _rewrite(
        trained_checkpoint, tmp_path / "roberta.safetensors", _set("teacher", "model", "roberta-ViT-B-32")
    )
    image = _photo(tmp_path / "a.png")
    argv = [
        "predict",
        str(image),
        "--checkpoint",
        str(ckpt),
        "--classes",
        "a,b",
        "--out",
        str(tmp_path / "o"),
    ]
    one_error_line(argv, capsys, "'roberta-base'", "never makes clipzss reach the network")
    assert connections == []


def test_checkpoint_clip_tag_is_read_from_the_cache_only(
    trained_checkpoint: Path, tmp_path: Path, connections: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user may download a tag (teacher_weights=); the checkpoint's own tag never starts a download."""
    import clipzss.hub
    from clipzss.models.segmenter import Segmenter

    monkeypatch.setattr(clipzss.hub.huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(clipzss.hub, "offline", lambda: False)
    ckpt = _rewrite(trained_checkpoint, tmp_path / "tag.safetensors", _set("teacher", "weights", "openai"))
    with pytest.raises(RuntimeError, match=r"not in the Hugging Face cache.*--teacher-weights openai"):
        Segmenter.from_checkpoint(ckpt, device="cpu")
    assert connections == []
    with pytest.raises(RuntimeError, match="unreachable"):
        Segmenter.from_checkpoint(ckpt, device="cpu", teacher_weights="openai")
    assert connections, "a tag the caller names is downloaded as before"


# --- sizes and weights from a checkpoint ------------------------------------------------------------------------


def _set(section: str, key: str, value: object):
    def edit(config: dict) -> None:
        config[section][key] = value

    return edit


def _predict_argv(image: Path, ckpt: Path, out: Path) -> list[str]:
    return ["predict", str(image), "--checkpoint", str(ckpt), "--classes", "road,sky", "--out", str(out)]


def _photo(path: Path) -> Path:
    import numpy as np
    from PIL import Image

    pixels = (np.random.default_rng(0).random((16, 24, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("short_side", 200000, "eval.short_side=200000 is not an image size clipzss handles"),
        ("short_side", -5, "eval.short_side=-5 is not an image size"),
        ("crop_size", 0, "eval.crop_size=0 is not an image size"),
        ("stride", 10**9, "eval.stride=1000000000 is not an image size"),
    ],
)
def test_checkpoint_sizes_out_of_range_are_one_line(
    key: str,
    value: int,
    needle: str,
    trained_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt = _rewrite(trained_checkpoint, tmp_path / "size.safetensors", _set("eval", key, value))
    image = _photo(tmp_path / "a.png")
    argv = _predict_argv(image, ckpt, tmp_path / "o")
    one_error_line(argv, capsys, "size.safetensors", needle)
    assert not (tmp_path / "o").exists()


def test_checkpoint_with_non_finite_weights_is_refused_naming_the_tensor(
    trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tensors = load_file(str(trained_checkpoint))
    name = sorted(tensors)[-1]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[:3] = float("nan")
    ckpt = _rewrite(trained_checkpoint, tmp_path / "nan.safetensors", lambda c: None, tensors)
    image = _photo(tmp_path / "a.png")
    argv = _predict_argv(image, ckpt, tmp_path / "o")
    one_error_line(argv, capsys, "nan.safetensors", repr(name), "3 non-finite values")
    assert not (tmp_path / "o").exists()


# --- an ONNX file's metadata ------------------------------------------------------------------------------------

GOOD_METADATA = {
    "clipzss_format": "clipzss-onnx-v1",
    "output": "logits",
    "alpha": "14.28",
    "pad_multiple": "32",
    "min_size": "0",
    "output_stride": "4",
    "eval": json.dumps(
        {"mode": "whole", "crop_size": 64, "stride": 40, "short_side": 64, "label_candidates": 0}
    ),
    "class_names": json.dumps(["road", "sky"]),
}


def _onnx(path: Path, **changes: str | None) -> Path:
    """A tiny graph (a 4x4 average pool, channels kept) carrying the given clipzss metadata; None drops a key."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    node = helper.make_node("AveragePool", ["image"], ["out"], kernel_shape=[4, 4], strides=[4, 4])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["b", 3, "h", "w"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", 3, "h4", "w4"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = {k: v for k, v in {**GOOD_METADATA, **changes}.items() if v is not None}
    helper.set_model_props(model, meta)
    onnx.save(model, str(path))
    return path


def test_a_well_formed_onnx_file_still_predicts(tmp_path: Path) -> None:
    from clipzss.inference.onnx_runner import OnnxSegmenter

    model = OnnxSegmenter(_onnx(tmp_path / "m.onnx", class_names=json.dumps(["road", "sky", "tree"])))
    mask = model.predict(_photo(tmp_path / "a.png"), ["road", "sky"])
    assert mask.shape == (16, 24) and set(mask.ravel().tolist()) <= {0, 1}
    sparse = OnnxSegmenter(_onnx(tmp_path / "s.onnx", eval=json.dumps({"mode": "slide", "short_side": 32})))
    assert sparse.predict(_photo(tmp_path / "a.png"), mode="slide").shape == (16, 24)  # window defaults


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"pad_multiple": "0"}, "pad_multiple=0 is not an image size"),
        ({"output_stride": "0"}, "output_stride=0 is not an image size"),
        ({"output_stride": "four"}, "output_stride='four' is not a whole number of pixels"),
        ({"min_size": "10000000"}, "min_size=10000000 is not an image size"),
        ({"alpha": "nan"}, "alpha='nan' is not a positive number"),
        ({"class_names": json.dumps({"road": 0, "sky": 1})}, "'class_names' is not a list of names"),
        ({"class_names": "[road"}, "'class_names' is not valid JSON"),
        ({"class_names": json.dumps(["road", "Road"])}, "duplicate class names"),
        ({"output": None}, "has no 'output'"),
        ({"output": "masks"}, "output='masks' is not one of logits, embeddings"),
        (
            {"eval": json.dumps({"mode": "whole", "short_side": 200000})},
            "eval.short_side=200000 is not an image",
        ),
        (
            {"eval": json.dumps({"mode": "slide", "crop_size": 64, "stride": 0})},
            "eval.stride=0 is not an image",
        ),
        ({"eval": json.dumps([1, 2])}, "'eval' is not a mapping"),
        ({"eval": None}, "has no 'eval'"),
    ],
)
def test_odd_onnx_metadata_is_one_line_naming_the_file_and_key(
    changes: dict, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _onnx(tmp_path / "odd.onnx", **changes)
    image = _photo(tmp_path / "a.png")
    one_error_line(["predict", str(image), "--onnx", str(path), "--out", str(tmp_path / "o")], capsys, needle)
    assert not (tmp_path / "o").exists()


def test_onnx_class_lists_are_bounded_like_the_demos(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """100,000 names once took minutes (a list search per name); now they are refused at once, by count."""
    from clipzss.names import MAX_CLASS_NAMES

    names = [f"class {i}" for i in range(100_000)]
    path = _onnx(tmp_path / "many.onnx", class_names=json.dumps(names))
    image = _photo(tmp_path / "a.png")
    argv = ["predict", str(image), "--onnx", str(path), "--out", str(tmp_path / "o")]
    one_error_line(argv, capsys, "100,000 class names", f"at most {MAX_CLASS_NAMES:,}")
    too_many = str(MAX_CLASS_NAMES + 1)
    one_error_line(
        ["demo", "--baseline", "maskclip", "--max-classes", too_many], capsys, "more than clipzss handles"
    )


def test_eval_options_are_bounded_like_the_config_fields_they_set(
    trained_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--max-images -5 once evaluated all images but the last five, silently."""
    argv = [
        "eval",
        str(trained_checkpoint),
        "--dataset",
        "synthetic",
        "--device",
        "cpu",
        "--max-images",
        "-5",
    ]
    one_error_line(argv, capsys, "eval.max_images=-5 must be at least 0")


@pytest.mark.parametrize(
    ("count", "bad", "needle"),
    [(2, True, "NaN or infinite"), (100_000, False, "100,000 class names given"), (2, False, None)],
)
def test_text_embedding_files_are_checked_like_onnx_metadata(
    count: int, bad: bool, needle: str | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np
    from safetensors.numpy import save_file as save_numpy

    embeddings = np.random.default_rng(0).standard_normal((count, 3)).astype(np.float32)
    if bad:
        embeddings[1, 2] = np.nan
    text = tmp_path / "names.safetensors"
    names = ["road", "sky"] if count == 2 else [f"class {i}" for i in range(count)]
    save_numpy({"embeddings": embeddings}, str(text), metadata={"class_names": json.dumps(names)})
    model = _onnx(tmp_path / "bare.onnx", output="embeddings", class_names=None)
    argv = ["predict", str(_photo(tmp_path / "a.png")), "--onnx", str(model), "--text-embeddings", str(text)]
    argv += ["--out", str(tmp_path / "o")]
    if needle is None:
        assert main(argv) == 0  # a sound file still works
    else:
        one_error_line(argv, capsys, "names.safetensors", needle)
