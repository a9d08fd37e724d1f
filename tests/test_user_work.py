"""Nothing a user made is lost or overwritten silently, and a checkpoint is data, not instructions.

Each test holds one guarantee of docs/reliability.md: same-name images keep every result, bad CLIP weights files and
corrupt images in worker processes are one line naming the file, colours match the legend for any vocabulary, names
CLIP cannot tell apart are refused on every path, the demo bounds its requests and caches, a checkpoint's config is
validated like user input, a rejected resume writes nothing, run folders are refused and locked, stale temporaries
are cleaned and a full disk at a save is one line that keeps the last checkpoint.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from clipzss.checkpoint import CheckpointError, CheckpointWriteError, load_checkpoint, validate_loaded_config
from clipzss.cli import main, user_message
from clipzss.config import load_config
from clipzss.models.segmenter import LRUCache, Segmenter
from clipzss.names import parse_class_names
from clipzss.prediction_files import output_names, prediction_folder, save_prediction
from clipzss.runs import RUN_FILES, RunFolderError, RunLock
from clipzss.training.loop import TrainingInterrupted, train
from clipzss.training.state import ResumeError, check_resume_config, load_training_state
from clipzss.visualize import colorize, overlay, palette
from conftest import one_error_line, tiny_config, tiny_overrides


@pytest.fixture(autouse=True)
def _user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user's default cache, inside the test's folder (checkpoints no longer choose it)."""
    import clipzss.files
    import clipzss.models.text_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    # conftest keeps the text cache of every other test in a tmp folder; here the real default rule is under test.
    monkeypatch.setattr(clipzss.models.text_cache, "user_cache_dir", clipzss.files.user_cache_dir)
    return tmp_path / "xdg"


def _photo(path: Path, seed: int, size: tuple[int, int] = (24, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


# --- 1. outputs of images with the same name ---------------------------------------------------------------------


def test_same_name_images_keep_every_result(
    trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = [
        _photo(tmp_path / "in" / "a" / "x.jpg", 0),
        _photo(tmp_path / "in" / "b" / "x.jpg", 1),
        _photo(tmp_path / "in" / "a" / "x.png", 2, size=(20, 12)),
    ]
    out = tmp_path / "out"
    argv = ["predict", *map(str, images), "--checkpoint", str(trained_checkpoint), "--classes", "a,b,c"]
    assert main([*argv, "--out", str(out), "--device", "cpu", "--mode", "whole"]) == 0
    printed = capsys.readouterr().out
    masks = sorted(p.relative_to(out).as_posix() for p in out.rglob("*_mask.png"))
    assert masks == ["a/x_jpg_mask.png", "a/x_png_mask.png", "b/x_mask.png"]
    assert printed.count("renamed: several inputs are named x") == 3
    assert Image.open(out / "a" / "x_png_mask.png").size == (20, 12)  # its own result, not another's
    seg = Segmenter.from_checkpoint(trained_checkpoint, device="cpu")
    expected = seg.predict(images[1], ["a", "b", "c"], mode="whole")
    np.testing.assert_array_equal(np.asarray(Image.open(out / "b" / "x_mask.png")), expected)


def test_shared_output_step_names_same_stem_inputs_apart(tmp_path: Path) -> None:
    """The call pattern of `predict --onnx` (stems only) gets the same distinct names as `predict`."""
    images = [_photo(tmp_path / d / "x.jpg", i) for i, d in enumerate(("a", "b"))]
    images.append(_photo(tmp_path / "c" / "y.jpg", 3))
    folder = prediction_folder(images, tmp_path / "out")
    names = ["road", "sky"]
    for path in images:
        image = Image.open(path).convert("RGB")
        save_prediction(folder, Path(path).stem, image, np.zeros((16, 24), dtype=np.int64), names)
    found = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png"))
    expected = [
        "a/x_mask.png",
        "a/x_overlay.png",
        "b/x_mask.png",
        "b/x_overlay.png",
        "y_mask.png",
        "y_overlay.png",
    ]
    assert found == expected
    # Unique stems keep their plain name; the same file twice gets one name; names never leave the folder.
    assert output_names([images[2], images[0], images[0]]) == ["y", "x", "x"]
    assert all(".." not in name for name in output_names(images))


# --- 5. unreadable CLIP weights files ----------------------------------------------------------------------------


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize(
    "kind", ["pickle.pt", "torch-pickle.bin", "garbage.safetensors", "garbage.bin", "empty.pt"]
)
def test_bad_teacher_weights_are_one_line(
    kind: str, trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    weights = tmp_path / kind
    if kind == "pickle.pt":
        weights.write_bytes(pickle.dumps({"visual.proj": _Exploit(marker)}))
    elif kind == "torch-pickle.bin":
        torch.save({"visual.proj": _Exploit(marker)}, weights)
    elif kind == "empty.pt":
        weights.write_bytes(b"")
    else:
        weights.write_bytes(b"not weights at all " * 8)
    image = _photo(tmp_path / "a.png", 0)
    line = one_error_line(
        [
            "predict",
            str(image),
            "--checkpoint",
            str(trained_checkpoint),
            "--teacher-weights",
            str(weights),
            "--classes",
            "a,b",
            "--out",
            str(tmp_path / "out"),
        ],
        capsys,
        "cannot read teacher weights",
        kind,
    )
    assert len(line) < 300, line
    assert not marker.exists(), "unpickling ran code from the weights file"


# --- 6. a corrupt image read by a data-loading worker ------------------------------------------------------------


def _folder_with_corrupt_image(root: Path) -> Path:
    for sub in ("images", "masks"):
        (root / "val" / sub).mkdir(parents=True)
    (root / "classes.txt").write_text("road\ncar\nsky\n")
    (root / "val" / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a picture")
    Image.fromarray(np.zeros((12, 16), dtype=np.uint8)).save(root / "val" / "masks" / "broken.png")
    return root


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


# --- 9. colours beyond 256 classes -------------------------------------------------------------------------------


def test_colours_match_the_legend_beyond_256_classes() -> None:
    names = [f"class {i}" for i in range(300)]
    mask = np.array([[255, 299], [0, 300]], dtype=np.int64)
    rgb = np.asarray(colorize(mask, len(names)))
    legend = palette(len(names))  # the colours `overlay` draws in its legend
    assert (rgb[0, 1] != rgb[0, 0]).any()
    np.testing.assert_array_equal(rgb[0, 1], legend[299])
    np.testing.assert_array_equal(rgb[0, 0], legend[255])
    np.testing.assert_array_equal(rgb[1, 1], [0, 0, 0])  # beyond the class list: black
    assert (np.asarray(colorize(np.array([[255]]), 3))[0, 0] == 0).all()  # ignore stays black for small lists
    drawn = np.asarray(overlay(Image.new("RGB", (2, 2)), mask.clip(0, 299), names, opacity=1.0))
    np.testing.assert_array_equal(drawn[0, 1], legend[299])


# --- 10. names CLIP cannot tell apart ----------------------------------------------------------------------------


def test_names_equal_for_clip_are_refused_on_every_path(
    trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match=r"duplicate class names: Cat = cat \(the same name to CLIP"):
        parse_class_names("Cat,dog,cat")
    with pytest.raises(ValueError, match="duplicate class names: potted plant = Potted  Plant"):
        parse_class_names(["potted plant", "Potted  Plant"])
    assert parse_class_names("cat,dog,cats") == ["cat", "dog", "cats"]
    image = _photo(tmp_path / "a.png", 0)
    base = ["predict", str(image), "--classes", "Cat,cat", "--out", str(tmp_path / "out")]
    one_error_line([*base, "--checkpoint", str(trained_checkpoint)], capsys, "Cat = cat")
    one_error_line([*base, "--onnx", str(tmp_path / "model.onnx")], capsys, "Cat = cat")
    code = "import sys; sys.modules['torch'] = None; from clipzss.names import parse_class_names"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0  # torch-free


# --- 11. the demo bounds class names per request and its text cache ----------------------------------------------


def test_demo_bounds_names_per_request_and_its_text_cache(trained_checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("gradio")
    from clipzss.demo import build_app

    seg = Segmenter.from_checkpoint(trained_checkpoint, device="cpu")
    app = build_app(seg, None, example_dir=tmp_path / "examples", max_classes=256, text_cache_size=2)
    on_segment = next(f.fn for f in app.fns.values() if getattr(f.fn, "__name__", "") == "on_segment")
    image = str(_photo(tmp_path / "a.png", 0))
    *_, status = on_segment(image, ",".join(f"class {i}" for i in range(300)), "the model's prompt ensemble")
    assert "300 class names given; this demo accepts at most 256 per request" in status
    for i in range(5):
        result, _, _, status = on_segment(image, f"road,sky{i}", "the model's prompt ensemble")
        assert result is not None and status == ""
    assert isinstance(seg._text_cache, LRUCache) and len(seg._text_cache) == 2
    assert len(seg.text_encoder._text_cache) == 2  # the CLIP teacher's own copies too
    assert list(seg._text_cache)[-1][0] == ("road", "sky4")  # the most recent list is kept


# --- 8. a checkpoint's config is validated like user input --------------------------------------------------------


def _rewrite(checkpoint: Path, out: Path, edit) -> Path:
    with safe_open(str(checkpoint), framework="pt") as handle:
        metadata = dict(handle.metadata())
    config = json.loads(metadata["config"])
    edit(config)
    metadata["config"] = json.dumps(config)
    save_file(load_file(str(checkpoint)), str(out), metadata=metadata)
    return out


def test_long_strings_in_a_checkpoint_are_not_echoed(trained_checkpoint: Path, tmp_path: Path) -> None:
    huge = "x" * 50_000_000

    def long_encoder(cfg: dict) -> None:
        cfg["student"]["encoder"] = huge

    bad = _rewrite(trained_checkpoint, tmp_path / "long.safetensors", long_encoder)
    with pytest.raises(CheckpointError) as caught:
        Segmenter.from_checkpoint(bad, device="cpu")
    message = str(caught.value)
    assert "student.encoder" in message and "50,000,000 characters" in message
    assert len(message) < 400 and "x" * 81 not in message
    with pytest.raises(CheckpointError, match="is not a name") as caught:
        validate_loaded_config({"student": {"encoder": "y" * 500}})
    assert "y" * 81 not in str(caught.value)
    with pytest.raises(CheckpointError) as caught:
        validate_loaded_config({"method": {"alpha": ["z" * 1000] * 1000}})  # a type error quoting the value
    assert len(str(caught.value)) < 500


def test_checkpoint_records_the_teacher_dense_path_and_old_files_read_as_value(
    trained_checkpoint: Path, tmp_path: Path
) -> None:
    assert (
        load_checkpoint(trained_checkpoint).config.teacher.dense == "clearclip"
    )  # today's default, recorded

    def forget(cfg: dict) -> None:  # a checkpoint written before teacher.dense existed
        del cfg["teacher"]["dense"]

    old = _rewrite(trained_checkpoint, tmp_path / "old.safetensors", forget)
    assert load_checkpoint(old).config.teacher.dense == "value"  # what every earlier version computed

    def maskclip(cfg: dict) -> None:
        cfg["teacher"]["dense"] = "maskclip"

    assert load_checkpoint(
        _rewrite(trained_checkpoint, tmp_path / "m.safetensors", maskclip)
    ).config.teacher.dense == ("maskclip")

    def value(cfg: dict) -> None:  # written after teacher.dense existed, before its default changed
        cfg["teacher"]["dense"] = "value"

    assert load_checkpoint(
        _rewrite(trained_checkpoint, tmp_path / "v.safetensors", value)
    ).config.teacher.dense == ("value")


def test_resuming_a_state_saved_without_teacher_dense_names_the_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_config(tmp_path / "run", tmp_path / "cache")
    old = cfg.to_dict()
    del old["teacher"]["dense"]  # a training state saved before teacher.dense existed: it computed "value"
    with caplog.at_level(logging.WARNING, logger="clipzss"):
        check_resume_config({"config": old}, cfg, tmp_path)
    assert "teacher.dense: 'value' → 'clearclip'" in caplog.text


def test_checkpoint_cache_dir_never_chooses_where_predict_writes(
    trained_checkpoint: Path, tmp_path: Path, _user_cache: Path
) -> None:
    planted = tmp_path / "chosen_by_the_file"

    def plant(cfg: dict) -> None:
        cfg["teacher"]["cache_dir"] = str(planted)

    ckpt = _rewrite(trained_checkpoint, tmp_path / "planted.safetensors", plant)
    assert load_checkpoint(ckpt).config.teacher.cache_dir is None
    Segmenter.from_checkpoint(ckpt, device="cpu").predict(np.zeros((16, 16, 3), np.uint8), ["road", "sky"])
    assert not planted.exists()
    assert list((_user_cache / "clipzss" / "text").glob("*.safetensors"))


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), 0.0, -14.3])
def test_bad_alpha_in_a_checkpoint_is_refused(
    alpha: float, trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def set_alpha(cfg: dict) -> None:
        cfg["method"]["alpha"] = alpha

    ckpt = _rewrite(trained_checkpoint, tmp_path / "alpha.safetensors", set_alpha)
    image = _photo(tmp_path / "a.png", 0)
    argv = ["predict", str(image), "--checkpoint", str(ckpt), "--classes", "a", "--out", str(tmp_path / "o")]
    one_error_line(argv, capsys, "method.alpha must be a positive finite number", "alpha.safetensors")


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("teacher", "model_overrides", {"pretrained_image": True}),
        ("teacher", "model_overrides", {"weights_only": False}),
        ("teacher", "model_overrides", {"text_cfg": {"hf_model_name": "bert-base-uncased"}}),
        ("teacher", "model_overrides", {"vision_cfg": {"timm_model_pretrained": True}}),
        ("student", "arch_kwargs", {"pretrained_cfg_overlay": {"url": "https://example.com/w.pth"}}),
        ("student", "arch_kwargs", {"pretrained": True}),
    ],
)
def test_checkpoint_overrides_that_fetch_weights_are_refused(
    section: str, key: str, value: dict, trained_checkpoint: Path, tmp_path: Path
) -> None:
    def plant(cfg: dict) -> None:
        cfg[section][key] = {**cfg[section][key], **value}

    ckpt = _rewrite(trained_checkpoint, tmp_path / "fetch.safetensors", plant)
    with pytest.raises(CheckpointError, match=rf"{section}\.{key}\.\S+ would load pretrained weights"):
        Segmenter.from_checkpoint(ckpt, device="cpu")


# --- 2. a rejected resume leaves the run as it was -----------------------------------------------------------------


def _copy_run(trained_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the session's finished 2-step run (model, state at step 2, config.yaml)."""
    run = tmp_path / "run"
    shutil.copytree(trained_checkpoint.parent, run, ignore=shutil.ignore_patterns("tb"))
    return run


def _snapshot(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


def test_resume_that_changes_the_model_shape_is_refused_before_anything_is_written(
    trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy_run(trained_checkpoint, tmp_path)
    before = _snapshot(run)
    resume = ["train", str(run / "config.yaml"), f"train.output_dir={run}"]
    changed = [
        *resume,
        "student.encoder=mit_b1",
        "method.bank_size=16",
        "train.lr=1e-3",
        "--resume",
        str(run),
    ]
    line = one_error_line(
        changed, capsys, "cannot resume", "student.encoder: 'mit_b0' → 'mit_b1'", "method.bank_size: 8 → 16"
    )
    assert "train.lr" not in line and "state_dict" not in line  # only the fields that refuse, no tensor dump
    assert _snapshot(run) == before  # config.yaml included: the documented resume command still works
    assert not (run / "train.lock").exists()
    with pytest.raises(ResumeError, match=r"student\.arch_kwargs"):
        train(
            load_config(
                run / "config.yaml",
                [f"train.output_dir={run}", 'student.arch_kwargs={"decoder_segmentation_channels": 64}'],
            ),
            resume=run,
        )
    assert _snapshot(run) == before


def test_weights_that_do_not_fit_are_one_line_and_nothing_is_written(
    trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A state without a config to compare (older files) is still checked tensor by tensor, in one line."""
    run = _copy_run(trained_checkpoint, tmp_path)
    state = torch.load(run / "train_state.pt", weights_only=True)
    del state["config"]
    torch.save(state, run / "train_state.pt")
    before = _snapshot(run)
    argv = ["train", str(run / "config.yaml"), f"train.output_dir={run}", "student.encoder=mit_b1"]
    one_error_line(
        [*argv, "--resume", str(run)], capsys, "its student weights do not fit", "of another shape"
    )
    assert _snapshot(run) == before and not (run / "train.lock").exists()


def test_resume_into_a_folder_that_holds_another_run_is_refused(
    trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _copy_run(trained_checkpoint, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"another run")
    argv = ["train", str(source / "config.yaml"), f"train.output_dir={other}", "--resume", str(source)]
    one_error_line(argv, capsys, str(other), "holds another run", "--overwrite")
    assert _snapshot(other) == {"model.safetensors": b"another run"}


def test_resume_that_changes_only_the_schedule_warns_old_to_new_and_continues(
    trained_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = _copy_run(trained_checkpoint, tmp_path)
    argv = [
        "train",
        str(run / "config.yaml"),
        f"train.output_dir={run}",
        "train.max_iters=3",
        "train.lr=1e-4",
    ]
    with caplog.at_level(logging.WARNING, logger="clipzss"):
        assert main([*argv, "method.w_nel=0.5", "method.nel=false", "--resume", str(run)]) == 0
    warnings = [r.getMessage() for r in caplog.records if "changed settings" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    for change in (
        "train.max_iters: 2 → 3",
        "train.lr: 6e-05 → 0.0001",
        "method.w_nel: 1.0 → 0.5",
        "method.nel",
    ):
        assert change in warnings[0], warnings[0]
    state = load_training_state(run)
    assert state["step"] == 3 and state["config"]["train"]["max_iters"] == 3
    # the new lr is the one trained with (not the saved optimizer's): encoder group at lr, head at lr × mult
    assert min(g["base_lr"] for g in state["optimizer"]["param_groups"]) == pytest.approx(1e-4)


# --- 3. run folders are protected ----------------------------------------------------------------------------------


def _train_argv(run: Path, cache: Path, iters: int = 1) -> list[str]:
    extra = {
        "data.dataset": "synthetic",
        "train.max_iters": iters,
        "train.batch_size": 2,
        "train.warmup_iters": 1,
        "train.eval_interval": 0,
        "train.ckpt_interval": 1,
        "train.output_dir": run,
    }
    return ["train", *tiny_overrides(cache, extra)]


def test_fresh_training_refuses_a_folder_that_holds_a_run_unless_told_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in RUN_FILES:
        run = tmp_path / f"holds_{name.replace('.', '_')}"
        run.mkdir()
        (run / name).write_bytes(b"the user's own run")
        argv = _train_argv(run, tmp_path / "cache")
        hint = f"--resume {run}" if name == "train_state.pt" else "no training state to resume"
        one_error_line(argv, capsys, str(run), "already holds a run", name, hint, "--overwrite")
        assert _snapshot(run) == {name: b"the user's own run"}
        with pytest.raises(RunFolderError, match="already holds a run"):
            train(tiny_config(run, tmp_path / "cache"))
        assert _snapshot(run) == {name: b"the user's own run"}
    run = tmp_path / "holds_model_safetensors"
    assert main([*_train_argv(run, tmp_path / "cache"), "--overwrite"]) == 0
    assert load_checkpoint(run).meta["step"] == "1" and not (run / "train.lock").exists()


HOLDER = """
import sys, time
from clipzss.runs import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_training_into_a_busy_folder_fails_at_once_naming_the_pid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:
    import clipzss.training.loop as training

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        tic = time.monotonic()
        one_error_line(_train_argv(run, tmp_path / "cache"), capsys, str(run), "in use", f"PID {holder.pid}")
        assert time.monotonic() - tic < 20, "refused before anything is built"
        with pytest.raises(RunFolderError, match=f"PID {holder.pid}"):
            train(tiny_config(run, tmp_path / "cache"))
    finally:
        holder.kill()
        holder.wait()
    lock = json.loads(
        (run / "train.lock").read_text()
    )  # a dead process's lock: stale, replaced with a log line
    assert lock["pid"] == holder.pid and lock["host"] == socket.gethostname()
    held = {}

    def look_then_stop(*args, **kwargs):
        held.update(json.loads((run / "train.lock").read_text()))
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "build_teacher", look_then_stop)
    with caplog.at_level(logging.INFO, logger="clipzss"), pytest.raises(KeyboardInterrupt):
        train(tiny_config(run, tmp_path / "cache"))
    assert held["pid"] == os.getpid()
    assert "replaced a stale lock" in caplog.text and f"PID {holder.pid} is no longer running" in caplog.text
    assert not (run / "train.lock").exists()


@pytest.mark.parametrize(
    "error",
    [
        KeyboardInterrupt(),
        TrainingInterrupted(1, Path("run"), "SIGTERM"),
        ValueError("bad dataset"),
        MemoryError(),
    ],
    ids=["KeyboardInterrupt", "TrainingInterrupted", "ValueError", "MemoryError"],
)
def test_the_run_lock_is_released_however_training_ends(
    error: BaseException, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import clipzss.training.loop as training

    run = tmp_path / "run"
    held = []

    def fail(*args, **kwargs):
        held.append((run / "train.lock").is_file())
        raise error

    monkeypatch.setattr(training, "build_teacher", fail)
    with pytest.raises(type(error)):
        train(tiny_config(run, tmp_path / "cache"))
    assert held == [True] and not (run / "train.lock").exists()
    assert not (run / "config.yaml").exists(), "a start that failed leaves no run behind"


def test_only_rank_zero_locks_and_every_rank_fails_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torchrun rank 1 never touches the folder (even one rank 0 holds) and learns rank 0's outcome."""
    import clipzss.training.loop as training

    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"x")
    sent = {"message": None}
    monkeypatch.setattr(
        training.dist, "broadcast_object_list", lambda items, src: items.__setitem__(0, sent["message"])
    )
    rank1 = training.DistInfo(rank=1, world_size=2)
    with RunLock(run):  # held by "rank 0"
        assert training._open_run_folder(run, rank1, None, False) is None
        sent["message"] = "refused by rank 0"
        with pytest.raises(RunFolderError, match=r"rank 0 .*refused by rank 0"):
            training._open_run_folder(run, rank1, None, False)
    assert _snapshot(run) == {"model.safetensors": b"x"}


def test_quickstart_moves_on_from_its_default_folder_and_refuses_a_taken_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from clipzss.quickstart import DEFAULT_OUT, output_folder

    monkeypatch.chdir(tmp_path)
    assert output_folder(DEFAULT_OUT) == DEFAULT_OUT  # free: used as it is
    DEFAULT_OUT.mkdir(parents=True)
    (DEFAULT_OUT / "model.safetensors").write_bytes(b"the first quick start")
    assert output_folder(DEFAULT_OUT) == Path("runs/quickstart-2")  # `clipzss quickstart` says so
    Path("runs/quickstart-2").mkdir()
    (Path("runs/quickstart-2") / "train.lock").write_text("{}")  # one running now
    assert output_folder(DEFAULT_OUT) == Path("runs/quickstart-3")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("a run")
    one_error_line(["quickstart", "--out", str(mine)], capsys, str(mine), "already holds a run", "--out")
    assert _snapshot(mine) == {"config.yaml": b"a run"}
    assert (DEFAULT_OUT / "model.safetensors").read_bytes() == b"the first quick start"


# --- 4. temporaries of killed checkpoint writes are cleaned ------------------------------------------------------


STALE = {
    ".train_state.pt.a1b2c3d4.tmp": 3000,
    ".model.safetensors.zz_9x8y7.tmp": 500,
    ".config.yaml.k2j4h6g8.tmp": 7,
}
NOT_TEMPORARIES = [
    "notes.tmp",
    ".train_state.pt.tmp",
    "train_state.pt.abcdefgh.tmp",
    ".hidden",
    ".x.ABCDEFGH.tmp",
]


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resume"])
def test_stale_temporaries_are_removed_at_start_up_and_nothing_else(
    resume: bool,
    trained_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import clipzss.training.loop as training

    run = _copy_run(trained_checkpoint, tmp_path) if resume else tmp_path / "run"
    run.mkdir(exist_ok=True)
    for name, size in STALE.items():
        (run / name).write_bytes(b"\0" * size)
    for name in NOT_TEMPORARIES:
        (run / name).write_text("keep")
    (run / "sub").mkdir()
    (run / "sub" / ".model.safetensors.abcdefgh.tmp").write_text(
        "keep"
    )  # only the run folder itself is cleaned
    (run / ".train_state.pt.dir12345.tmp").mkdir()  # not a file
    kept = {name: data for name, data in _snapshot(run).items() if name not in STALE}

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(training, "build_teacher", stop)
    cfg = (
        load_config(run / "config.yaml", [f"train.output_dir={run}"])
        if resume
        else tiny_config(run, tmp_path)
    )
    with caplog.at_level(logging.INFO, logger="clipzss"), pytest.raises(Stop):
        train(cfg, resume=run if resume else None)
    assert _snapshot(run) == kept
    assert (run / "sub" / ".model.safetensors.abcdefgh.tmp").is_file()
    assert (run / ".train_state.pt.dir12345.tmp").is_dir()
    assert "removed 3 stale temporary files (3,507 bytes)" in caplog.text


# --- 7. a full disk at a checkpoint save -------------------------------------------------------------------------


def _disk_full(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the next checkpoint write fail as a full disk does, after writing part of its temporary file."""
    import clipzss.checkpoint as checkpoint

    def partial(tmp: object) -> None:
        Path(str(tmp)).write_bytes(b"\0" * 1000)

    if kind == "torch":  # the state's writer: torch's zip writer finds the file shorter than it wrote

        def save(obj: object, tmp: object, *args: object, **kwargs: object) -> None:
            partial(tmp)
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos 26755584 vs 26755472"
            )

        monkeypatch.setattr(torch, "save", save)
        return
    error = (
        OSError(errno.ENOSPC, "No space left on device")
        if kind == "oserror"
        else SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )
    )

    def save_file(tensors: object, tmp: str, metadata: object = None) -> None:
        partial(tmp)
        raise error

    monkeypatch.setattr(checkpoint, "save_file", save_file)


@pytest.mark.parametrize("kind", ["oserror", "safetensors", "torch"])
def test_disk_full_at_a_save_is_one_line_and_keeps_the_last_good_checkpoint(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import clipzss.training.loop as training

    cfg = tiny_config(tmp_path / "run", tmp_path / "cache")
    out = Path(cfg.train.output_dir)
    out.mkdir()
    student = torch.nn.Linear(4, 3)
    parts = training.TrainParts(cfg, None, student, None, None, None, None, torch.device("cpu"))
    optimizer = torch.optim.AdamW(student.parameters())
    with monkeypatch.context() as patch:  # the first save
        _disk_full(kind, patch)
        with pytest.raises(CheckpointWriteError) as caught:
            training.save_training_state(out, 2, parts, optimizer, {})
    message = str(caught.value)
    assert "\n" not in message and str(out) in message and "no space left on device" in message
    assert "no checkpoint saved yet" in message
    assert list(out.iterdir()) == [], "no partial temporary, no half checkpoint"
    training.save_training_state(out, 2, parts, optimizer, {})
    good = _snapshot(out)
    with torch.no_grad():
        student.weight.add_(1.0)
    with monkeypatch.context() as patch:  # a later save
        _disk_full(kind, patch)
        with pytest.raises(CheckpointWriteError) as caught:
            training.save_training_state(out, 4, parts, optimizer, {})
    message = str(caught.value)
    assert "\n" not in message and "no space left on device" in message
    assert f"{out / 'model.safetensors'} (step 2)" in message
    assert _snapshot(out) == good, "the previous checkpoint (weights, config, state) is unchanged"


def test_disk_full_during_training_is_one_line_from_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    _disk_full("torch", monkeypatch)
    one_error_line(
        _train_argv(run, tmp_path / "cache"),
        capsys,
        str(run),
        "no space left on device",
        "no checkpoint saved yet",
    )
    assert not list(run.glob(".*.tmp")) and not (run / "train.lock").exists()


# --- a checkpoint's teacher settings that cannot work give one line -----------------------------------------------


def test_unknown_model_override_is_one_line_naming_the_field(tmp_path: Path) -> None:
    from clipzss.config import TeacherConfig
    from clipzss.models.teacher import build_teacher
    from conftest import TINY_CLIP

    cfg = TeacherConfig(weights="none", image_size=64, model_overrides={**TINY_CLIP, "not_a_keyword": 3})
    with pytest.raises(ValueError, match=r"teacher\.model_overrides") as err:
        build_teacher(cfg, device="cpu")
    assert "\n" not in str(err.value) and "not_a_keyword" in str(err.value)


@pytest.mark.parametrize("template", ["a {} {1}.", "a {name}.", "a {} }."])
def test_prompt_template_that_cannot_be_filled_is_one_line(tmp_path: Path, template: str) -> None:
    from clipzss.config import TeacherConfig
    from clipzss.models.teacher import build_teacher
    from conftest import TINY_CLIP

    cfg = TeacherConfig(
        weights="none",
        image_size=64,
        model_overrides=TINY_CLIP,
        cache_dir=str(tmp_path),
        templates=(template,),
    )
    teacher = build_teacher(cfg, device="cpu")
    with pytest.raises(ValueError, match="prompt template") as err:
        teacher.text_embeddings(["cat"])
    assert "\n" not in str(err.value)


def test_text_cache_on_disk_keeps_a_bounded_number_of_class_lists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every new class list typed into the demo writes one cache file; the oldest go beyond the bound."""
    import clipzss.models.teacher as teacher_module
    from clipzss.config import TeacherConfig
    from conftest import TINY_CLIP

    monkeypatch.setattr(teacher_module, "TEXT_CACHE_FILES", 3)
    cache = tmp_path / "text"
    cache.mkdir()
    (cache / "notes.safetensors").write_text("a user's file that is not a cache entry")
    cfg = TeacherConfig(weights="none", image_size=64, model_overrides=TINY_CLIP, cache_dir=str(cache))
    teacher = teacher_module.build_teacher(cfg, device="cpu")
    for i in range(6):
        teacher.text_embeddings([f"class {i}"])
        time.sleep(0.01)  # distinct modification times
    entries = [p for p in cache.glob("*.safetensors") if p.name != "notes.safetensors"]
    assert len(entries) == 3 and (cache / "notes.safetensors").is_file()
    newest = teacher._text_cache_key(("class 5",), tuple(cfg.templates))
    assert (cache / f"{newest}.safetensors").is_file()
