"""Shared fixtures: tiny random models built through the real code paths, and the real sample data."""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from clipzss.config import (
    Config,
    DataConfig,
    EvalConfig,
    MethodConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)

# A tiny OpenCLIP ViT: passed to open_clip.create_model as overrides of the named config, so the model is built by
# exactly the code that builds ViT-B-16. 8x8 patches keep a usable token grid at small image sizes.
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


# The 11 CamVid classes of ../shared/data/camvid/classes.txt, in id order (tests that fake or read CamVid).
CAMVID_CLASSES: tuple[str, ...] = tuple(
    "sky building pole road pavement tree signsymbol fence car pedestrian bicyclist".split()  # noqa: SIM905
)


def shared_data_dir() -> Path | None:
    """../shared/data beside the checkout (or $CLIPZSS_SHARED_DATA); None when absent, e.g. in a user's clone."""
    env = os.environ.get("CLIPZSS_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for path in candidates:
        if path.is_dir():
            return path
    return None


@pytest.fixture
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is not present")
    return path


@pytest.fixture
def tiny_teacher_cfg(tmp_path: Path) -> TeacherConfig:
    return TeacherConfig(
        model="ViT-B-16",
        weights="none",
        image_size=64,
        templates=("a photo of a {}.", "a {} in the scene."),
        model_overrides=TINY_CLIP,
        cache_dir=str(tmp_path / "text_cache"),
    )


@pytest.fixture
def tiny_student_cfg() -> StudentConfig:
    return StudentConfig(arch="Segformer", encoder="mit_b0", weights=None, embed_dim=TINY_CLIP["embed_dim"])


if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per xdist worker: on a 2-core machine two workers with two threads each thrash.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def _text_cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("user_cache")


@pytest.fixture(autouse=True)
def _text_cache_in_tmp(_text_cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Teachers built with the default cache_dir write their text cache here, never into the user's ~/.cache."""
    import clipzss.models.text_cache

    monkeypatch.setattr(clipzss.models.text_cache, "user_cache_dir", lambda name: _text_cache_root / name)


def tiny_config(out: Path, cache_dir: Path, **train_kw: object) -> Config:
    """A complete training config small enough for a CPU test: synthetic 64² crops, tiny teacher, SegFormer-B0."""
    train = dict(
        max_iters=4,
        batch_size=2,
        warmup_iters=2,
        log_interval=2,
        eval_interval=0,
        ckpt_interval=2,
        output_dir=str(out),
        device="cpu",
    )
    train.update(train_kw)
    return Config(
        data=DataConfig(dataset="synthetic", crop_size=64, scale=64, num_workers=0),
        teacher=TeacherConfig(
            weights="none",
            image_size=64,
            templates=("a photo of a {}.", "a {} in the scene."),
            model_overrides=TINY_CLIP,
            cache_dir=str(cache_dir),
        ),
        student=StudentConfig(
            arch="Segformer", encoder="mit_b0", weights=None, embed_dim=TINY_CLIP["embed_dim"]
        ),
        # The bank on (off by default): the resume tests then cover its state.
        method=MethodConfig(bank=True, bank_size=8, synth_heads=2),
        train=TrainConfig(**train),
        eval=EvalConfig(mode="whole", short_side=64, max_images=2),
    )


def tiny_overrides(cache_dir: Path, extra: dict[str, object]) -> list[str]:
    """The command-line twin of `tiny_config`: ``section.key=value`` overrides for `clipzss train` subprocesses."""
    values: dict[str, object] = {
        "data.crop_size": 64,
        "data.scale": 64,
        "data.num_workers": 0,
        "teacher.weights": "none",
        "teacher.image_size": 64,
        "teacher.model_overrides": json.dumps(TINY_CLIP),
        "teacher.cache_dir": cache_dir,
        "student.encoder": "mit_b0",
        "student.weights": "null",
        "student.embed_dim": TINY_CLIP["embed_dim"],
        "method.bank": True,
        "method.bank_size": 8,
        "method.synth_heads": 2,
        "train.device": "cpu",
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A student checkpoint saved by a (very short) real training run, shared by the CLI and predict tests."""
    from clipzss.training.loop import train

    root = tmp_path_factory.mktemp("trained")
    return train(tiny_config(root / "run", root / "text_cache", max_iters=2))


def free_port() -> int:
    """A free TCP port on the loopback interface (for gloo rendezvous and local servers)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_gloo_ranks(worker: Callable[..., None], world: int = 2, timeout: float = 120) -> list[Any]:
    """Run ``worker(rank, port, queue)`` in ``world`` spawned processes; each puts ``(rank, result)`` in the
    queue (after ``dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", ...)``). Returns the
    results in rank order once every process exited cleanly."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(rank, port, results)) for rank in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout)
    assert all(proc.exitcode == 0 for proc in procs), [proc.exitcode for proc in procs]
    return [result for _, result in sorted(results.get() for _ in range(world))]


def one_error_line(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """Run the CLI on ``argv``: it must exit 2 with exactly one ``clipzss ...`` line on stderr, no traceback, and
    every needle in that line (returned)."""
    from clipzss.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("clipzss")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def photo(path: Path, seed: int, size: tuple[int, int] = (24, 16)) -> Path:
    """A random RGB picture of ``size`` (width, height) saved at ``path``: a user's image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def copy_run(trained_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the session's finished 2-step run (model, state at step 2, config.yaml)."""
    run = tmp_path / "run"
    shutil.copytree(trained_checkpoint.parent, run, ignore=shutil.ignore_patterns("tb"))
    return run


def snapshot(run: Path) -> dict[str, bytes]:
    """The files directly in ``run`` by name, with their bytes: what a refused command must leave as it was."""
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


@pytest.fixture
def user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user's default cache, inside the test's folder, found by the real rule (`clipzss.files.user_cache_dir`)
    rather than the text-cache folder every other test uses."""
    import clipzss.files
    import clipzss.models.text_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(clipzss.models.text_cache, "user_cache_dir", clipzss.files.user_cache_dir)
    return tmp_path / "xdg"


def train_until_checkpoint(cfg: Config, step: int) -> None:
    """Run `train` on ``cfg`` and cut it right after its checkpoint of ``step``, as a kill would: the run folder
    then holds that checkpoint and nothing later."""
    import clipzss.training.loop as training

    class Cut(Exception):
        pass

    save = training.save_training_state

    def save_then_cut(out: Path, saved: int, *args: Any, **kwargs: Any) -> Path:
        path = save(out, saved, *args, **kwargs)
        if saved == step:
            raise Cut
        return path

    with pytest.MonkeyPatch.context() as patch, pytest.raises(Cut):
        patch.setattr(training, "save_training_state", save_then_cut)
        training.train(cfg)


def assert_same_tensors(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    """The same names holding bitwise equal tensors (a resumed run against the uninterrupted one)."""
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
