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

import clipzss.training
from clipzss.cli import main
from clipzss.training_state import load_training_state


def _one_error_line(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("clipzss")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


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

    monkeypatch.setattr(clipzss.training, "train", fake_train)
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
