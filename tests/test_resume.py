"""A resume is checked against the saved run before anything is written: a rejected one leaves the run as it
was, a schedule change warns old → new and continues (`clipzss.training.state`)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from clipzss.cli import main
from clipzss.config import load_config
from clipzss.training.loop import train
from clipzss.training.state import ResumeError, check_resume_config, load_training_state
from conftest import copy_run, one_error_line, snapshot, tiny_config

# The user's default cache lives in the test's folder (`user_cache`): the real rule of where caches go is used.
pytestmark = pytest.mark.usefixtures("user_cache")


def test_resuming_a_state_saved_without_teacher_dense_names_the_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_config(tmp_path / "run", tmp_path / "cache")
    old = cfg.to_dict()
    del old["teacher"]["dense"]  # a training state saved before teacher.dense existed: it computed "value"
    with caplog.at_level(logging.WARNING, logger="clipzss"):
        check_resume_config({"config": old}, cfg, tmp_path)
    assert "teacher.dense: 'value' → 'clearclip'" in caplog.text


def test_resume_that_changes_the_model_shape_is_refused_before_anything_is_written(
    trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(trained_checkpoint, tmp_path)
    before = snapshot(run)
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
    assert snapshot(run) == before  # config.yaml included: the documented resume command still works
    assert not (run / "train.lock").exists()
    with pytest.raises(ResumeError, match=r"student\.arch_kwargs"):
        train(
            load_config(
                run / "config.yaml",
                [f"train.output_dir={run}", 'student.arch_kwargs={"decoder_segmentation_channels": 64}'],
            ),
            resume=run,
        )
    assert snapshot(run) == before


def test_weights_that_do_not_fit_are_one_line_and_nothing_is_written(
    trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A state without a config to compare (older files) is still checked tensor by tensor, in one line."""
    run = copy_run(trained_checkpoint, tmp_path)
    state = torch.load(run / "train_state.pt", weights_only=True)
    del state["config"]
    torch.save(state, run / "train_state.pt")
    before = snapshot(run)
    argv = ["train", str(run / "config.yaml"), f"train.output_dir={run}", "student.encoder=mit_b1"]
    one_error_line(
        [*argv, "--resume", str(run)], capsys, "its student weights do not fit", "of another shape"
    )
    assert snapshot(run) == before and not (run / "train.lock").exists()


def test_resume_into_a_folder_that_holds_another_run_is_refused(
    trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = copy_run(trained_checkpoint, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"another run")
    argv = ["train", str(source / "config.yaml"), f"train.output_dir={other}", "--resume", str(source)]
    one_error_line(argv, capsys, str(other), "holds another run", "--overwrite")
    assert snapshot(other) == {"model.safetensors": b"another run"}


def test_resume_that_changes_only_the_schedule_warns_old_to_new_and_continues(
    trained_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = copy_run(trained_checkpoint, tmp_path)
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
