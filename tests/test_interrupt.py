"""Interrupted training: SIGTERM saves and exits cleanly; SIGKILL at random moments, then --resume, ends bit-identical;
a kill mid-write leaves temporaries the resume removes; a second training into a busy folder fails at once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipzss.training.state import STATE_NAME
from conftest import tiny_overrides

ITERS = 6


def _cmd(out: Path, cache: Path, iters: int = ITERS, resume: bool = False) -> list[str]:
    overrides = tiny_overrides(
        cache,
        {
            "data.dataset": "synthetic",
            "train.max_iters": iters,
            "train.batch_size": 2,
            "train.warmup_iters": 2,
            "train.eval_interval": 0,
            "train.ckpt_interval": 1,
            "train.log_interval": 1,
            "train.output_dir": out,
        },
    )
    cmd = [sys.executable, "-m", "clipzss", "train", *overrides]
    return [*cmd, "--resume", str(out)] if resume else cmd


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)


def _start(cmd: list[str], stdout: int = subprocess.DEVNULL) -> subprocess.Popen:
    """A training in the background, its stderr (text) captured."""
    return subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, env=ENV)


def _wait_for_state(out: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (out / STATE_NAME).exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "training exited early"
        assert time.monotonic() < deadline, "training never wrote its first checkpoint"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    root = tmp_path_factory.mktemp("straight")
    done = _run(_cmd(root / "run", root / "cache"))
    assert done.returncode == 0, done.stderr[-2000:]
    return load_file(str(root / "run" / "model.safetensors"))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_then_resumes_exactly(straight, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _start(_cmd(out, tmp_path / "cache", iters=400), stdout=subprocess.PIPE)
    _wait_for_state(out, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "SIGTERM received: stopped after step" in err and "--resume" in err and "Traceback" not in err
    step = torch.load(out / STATE_NAME, weights_only=True)["step"]
    assert 1 <= step < 400
    assert not list(out.glob(".*.tmp")), "no half-written files"
    assert not (out / "train.lock").exists(), "the lock goes with the process"


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(straight, tmp_path: Path) -> None:
    rng = random.Random(1234)
    for trial in range(3):
        out = tmp_path / f"trial{trial}"
        proc = _start(_cmd(out, tmp_path / "cache"))
        _wait_for_state(out, proc)
        time.sleep(rng.uniform(0.0, 1.5))  # lands anywhere: mid-step, mid-checkpoint-write, or after the end
        proc.kill()
        proc.wait()
        while True:  # resume until it finishes (it is never killed again here)
            done = _run(_cmd(out, tmp_path / "cache", resume=True))
            assert done.returncode == 0, done.stderr[-2000:]
            if torch.load(out / STATE_NAME, weights_only=True)["step"] == ITERS:
                break
        _assert_same(straight, load_file(str(out / "model.safetensors")))
        assert not list(out.glob(".*.tmp")), "resume removes what a kill mid-write left"
        assert not (out / "train.lock").exists()


SITECUSTOMIZE = """
import os
if os.environ.get("RANK") == "1":  # make rank 1 crash on its second step
    import clipzss.training.loop as training
    real_step = training.train_step
    calls = [0]
    def failing_step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("simulated failure on rank 1")
        return real_step(*args, **kwargs)
    training.train_step = failing_step
"""


@pytest.mark.slow
def test_ddp_rank_failure_ends_every_rank(tmp_path: Path) -> None:
    """One rank dies mid-training: torchrun ends the others (no hang) and the failure is named."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    cmd = _cmd(tmp_path / "run", tmp_path / "cache", iters=50)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *cmd[1:]]
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(hook), ENV.get("PYTHONPATH", "")])}
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode != 0
    assert "simulated failure on rank 1" in done.stdout + done.stderr
    assert time.monotonic() - start < 200, "the surviving rank did not hang until a collective timeout"


STALL_SECOND_STATE_WRITE = """
import os
if os.environ.get("STALL_MARKER"):  # the second training-state write stops after writing its temporary file
    import time
    import torch
    real_save = torch.save
    calls = [0]
    def stalling_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if isinstance(obj, dict) and "rng_torch" in obj:
            calls[0] += 1
            if calls[0] == 2:
                open(os.environ["STALL_MARKER"], "w").close()
                time.sleep(300)
    torch.save = stalling_save
"""


@pytest.mark.slow
def test_kill_mid_checkpoint_write_leaves_temporaries_that_the_resume_removes(tmp_path: Path) -> None:
    """A SIGKILL while the step-2 checkpoint is being written orphans its temporaries (tens of MB for a real
    student) and the lock; the resume replaces the stale lock, removes the temporaries and says how many bytes."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(STALL_SECOND_STATE_WRITE)
    out, marker = tmp_path / "run", tmp_path / "stalled"
    env = {
        **ENV,
        "STALL_MARKER": str(marker),
        "PYTHONPATH": os.pathsep.join([str(hook), ENV.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        _cmd(out, tmp_path / "cache"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the second checkpoint write never started"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    orphans = list(out.glob(".*.tmp"))
    assert any(p.name.startswith(".train_state.pt.") for p in orphans), orphans
    size = sum(p.stat().st_size for p in orphans)
    assert (out / "train.lock").exists() and torch.load(out / STATE_NAME, weights_only=True)["step"] == 1
    done = _run(_cmd(out, tmp_path / "cache", resume=True))
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"removed {len(orphans)} stale temporary files ({size:,} bytes)" in done.stderr
    assert f"PID {proc.pid} is no longer running" in done.stderr
    assert not list(out.glob(".*.tmp")) and not (out / "train.lock").exists()
    assert torch.load(out / STATE_NAME, weights_only=True)["step"] == ITERS


@pytest.mark.slow
def test_two_trainings_into_one_folder_the_second_fails_at_once(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = _start(_cmd(out, tmp_path / "cache", iters=400))
    try:
        deadline = time.monotonic() + 120
        while not (out / "train.lock").exists():
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        second = _run(_cmd(out, tmp_path / "cache", iters=400))
        assert second.returncode == 2
        lines = [line for line in second.stderr.splitlines() if line.startswith("clipzss train: error:")]
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
        assert str(out) in lines[0] and f"PID {first.pid}" in lines[0]
        _wait_for_state(out, first)
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
        assert first.returncode == 130, err[-2000:]  # the first training was not disturbed
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert not (out / "train.lock").exists()
