"""Class names CLIP cannot tell apart are refused on every path, by one torch-free check (`clipzss.names`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from clipzss.names import parse_class_names
from conftest import one_error_line, photo

# The user's default cache lives in the test's folder (`user_cache`): the real rule of where caches go is used.
pytestmark = pytest.mark.usefixtures("user_cache")


def test_names_equal_for_clip_are_refused_on_every_path(
    trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match=r"duplicate class names: Cat = cat \(the same name to CLIP"):
        parse_class_names("Cat,dog,cat")
    with pytest.raises(ValueError, match="duplicate class names: potted plant = Potted  Plant"):
        parse_class_names(["potted plant", "Potted  Plant"])
    assert parse_class_names("cat,dog,cats") == ["cat", "dog", "cats"]
    image = photo(tmp_path / "a.png", 0)
    base = ["predict", str(image), "--classes", "Cat,cat", "--out", str(tmp_path / "out")]
    one_error_line([*base, "--checkpoint", str(trained_checkpoint)], capsys, "Cat = cat")
    one_error_line([*base, "--onnx", str(tmp_path / "model.onnx")], capsys, "Cat = cat")
    code = "import sys; sys.modules['torch'] = None; from clipzss.names import parse_class_names"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0  # torch-free
