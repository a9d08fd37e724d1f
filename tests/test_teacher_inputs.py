"""The teacher's inputs from users and checkpoints: unreadable CLIP weights files, model overrides and prompt
templates that cannot work are one line; the text cache on disk stays bounded (`clipzss.models.teacher`)."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import pytest
import torch

from conftest import one_error_line, photo

# The user's default cache lives in the test's folder (`user_cache`): the real rule of where caches go is used.
pytestmark = pytest.mark.usefixtures("user_cache")


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
    image = photo(tmp_path / "a.png", 0)
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
