"""Run folders are protected: a folder holding a run is refused, a busy one is locked, stale temporaries of
killed writes are cleaned, and a full disk at a save is one line that keeps the last good checkpoint
(`clipzss.runs`, `clipzss.training.loop`, `clipzss.checkpoint`)."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from clipzss.checkpoint import CheckpointWriteError, load_checkpoint
from clipzss.cli import main
from clipzss.config import load_config
from clipzss.runs import RUN_FILES, RunFolderError, RunLock
from clipzss.training.loop import TrainingInterrupted, train
from conftest import copy_run, one_error_line, snapshot, tiny_config, tiny_overrides

# The user's default cache lives in the test's folder (`user_cache`): the real rule of where caches go is used.
pytestmark = pytest.mark.usefixtures("user_cache")


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
        assert snapshot(run) == {name: b"the user's own run"}
        with pytest.raises(RunFolderError, match="already holds a run"):
            train(tiny_config(run, tmp_path / "cache"))
        assert snapshot(run) == {name: b"the user's own run"}
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
    assert snapshot(run) == {"model.safetensors": b"x"}


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
    assert snapshot(mine) == {"config.yaml": b"a run"}
    assert (DEFAULT_OUT / "model.safetensors").read_bytes() == b"the first quick start"


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

    run = copy_run(trained_checkpoint, tmp_path) if resume else tmp_path / "run"
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
    kept = {name: data for name, data in snapshot(run).items() if name not in STALE}

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
    assert snapshot(run) == kept
    assert (run / "sub" / ".model.safetensors.abcdefgh.tmp").is_file()
    assert (run / ".train_state.pt.dir12345.tmp").is_dir()
    assert "removed 3 stale temporary files (3,507 bytes)" in caplog.text


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
    good = snapshot(out)
    with torch.no_grad():
        student.weight.add_(1.0)
    with monkeypatch.context() as patch:  # a later save
        _disk_full(kind, patch)
        with pytest.raises(CheckpointWriteError) as caught:
            training.save_training_state(out, 4, parts, optimizer, {})
    message = str(caught.value)
    assert "\n" not in message and "no space left on device" in message
    assert f"{out / 'model.safetensors'} (step 2)" in message
    assert snapshot(out) == good, "the previous checkpoint (weights, config, state) is unchanged"


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
