"""One error base: every error clipzss raises on purpose is a ClipzssError; anything else is a bug, reported as one."""

from __future__ import annotations

import ast
import builtins
import importlib
from pathlib import Path

import pytest

from clipzss.errors import ClipzssError, OfflineError

SRC = Path(__file__).resolve().parents[1] / "src"


def _exception_classes() -> list[tuple[str, str]]:
    """(module, class) of every exception class defined in src/clipzss, found in the source (no module imported)."""
    exceptions = {name for name in dir(builtins) if isinstance(getattr(builtins, name), type)}
    exceptions = {name for name in exceptions if issubclass(getattr(builtins, name), BaseException)}
    classes = []
    for path in sorted((SRC / "clipzss").rglob("*.py")):
        module = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
                classes.append((module, node.name, bases))
    found: dict[str, str] = {}
    while True:  # a class deriving from an exception class is one
        new = {
            name: module for module, name, bases in classes if name not in found and exceptions & set(bases)
        }
        if not new:
            break
        found.update(new)
        exceptions |= set(new)
    return sorted((module, name) for name, module in found.items())


def test_every_custom_error_is_a_clipzss_error() -> None:
    classes = _exception_classes()
    assert ("clipzss.config", "ConfigError") in classes and ("clipzss.hub", "HubUnavailable") in classes
    for module, name in classes:
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, ClipzssError), f"{module}.{name} does not derive from ClipzssError"


def test_errors_keep_their_builtin_bases() -> None:
    from clipzss.checkpoint import CheckpointError
    from clipzss.config import ConfigError
    from clipzss.errors import UsageError

    assert issubclass(ConfigError, ValueError) and issubclass(CheckpointError, ValueError)
    assert issubclass(UsageError, ValueError)
    assert issubclass(OfflineError, FileNotFoundError) and issubclass(OfflineError, RuntimeError)


def test_offline_teacher_and_student_raise_the_same_class(monkeypatch: pytest.MonkeyPatch) -> None:
    from clipzss import hub
    from clipzss.models import student_weights, teacher

    def unreachable(*args: object, **kwargs: object) -> Path:
        raise hub.HubUnavailable("the hub is unreachable (test)")

    monkeypatch.setattr(hub, "fetch", unreachable)
    with pytest.raises(OfflineError, match="teacher weights 'openai'"):
        teacher._tag_checkpoint("ViT-B-16", "openai", {"hf_hub": "org/repo/"})
    with pytest.raises(OfflineError, match="offline"):
        student_weights._hub_download(
            "org/repo", ("model.safetensors",), None, "'imagenet' weights for resnet18"
        )


@pytest.mark.parametrize(
    "bug",
    [
        KeyError("num_classes"),
        RuntimeError(
            "The size of tensor a (3) must match the size of tensor b (4) at non-singleton dimension 1"
        ),
    ],
)
def test_a_bug_keeps_its_traceback_and_says_how_to_report_it(
    bug: Exception, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import clipzss
    from clipzss.cli import main, quickstart

    def broken(args: object) -> int:
        raise bug

    monkeypatch.setattr(quickstart, "run", broken)
    assert main(["quickstart"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and type(bug).__name__ in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("clipzss quickstart: this is a bug in clipzss") and clipzss.__version__ in last


def test_a_user_error_stays_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from clipzss.cli import main, quickstart
    from clipzss.errors import UsageError

    def wrong(args: object) -> int:
        raise UsageError("--classes: give at least one name")

    monkeypatch.setattr(quickstart, "run", wrong)
    assert main(["quickstart"]) == 2
    assert capsys.readouterr().err.strip() == "clipzss quickstart: error: --classes: give at least one name"
    monkeypatch.setenv("CLIPZSS_DEBUG", "1")
    with pytest.raises(UsageError):
        main(["quickstart"])
