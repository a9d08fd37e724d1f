"""`clipzss quickstart` without CLIP weights: the synthetic world, with the teacher and a seen-only reference."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipzss.quickstart import quickstart_config, run_quickstart
from clipzss.worlds import students as ws


def test_quickstart_config_without_weights_is_the_world_student(tmp_path: Path) -> None:
    cfg = quickstart_config(tmp_path, None, None, "cpu")
    assert cfg.train.max_iters == ws.STUDENT_ITERS and cfg.student.encoder == ws.STUDENT_ENCODER
    assert cfg.method == ws.student_config(tmp_path, {}).method  # the package's method defaults
    assert quickstart_config(tmp_path, 5, "clip.safetensors", "cpu").teacher.weights == "clip.safetensors"


def test_world_quickstart_reports_student_teacher_and_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_quickstart(tmp_path / "qs", iters=2, device="cpu")
    text = result.report.read_text()
    assert "synthetic stand-in" in text and "teacher at inference" in text and "seen labels only" in text
    assert (
        capsys.readouterr().out == ""
    )  # the library prints nothing; `clipzss quickstart` prints the summary
    summary = result.summary()
    assert "x the teacher's own mIoU(U)" in summary and "teacher at inference" in summary
    assert summary.splitlines()[-1] == f"  {tmp_path / 'qs' / 'tb'}" and result.report in result.outputs
    assert (tmp_path / "qs" / "model.safetensors").is_file()
    assert (tmp_path / "qs" / "seen_only_reference" / "model.safetensors").is_file()
    assert (tmp_path / "qs" / "world_text.safetensors").is_file()
    assert list((tmp_path / "qs").glob("*_prediction.png"))
