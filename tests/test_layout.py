"""The package layout: old module paths keep importing (with one warning), stored artefacts name no module, and
docs/architecture.md is the packages' own docstrings (run this file to rewrite it: ``python tests/test_layout.py``)."""

from __future__ import annotations

import importlib
import pickletools
import re
import shutil
import sys
import warnings
import zipfile
from pathlib import Path

import pytest

import clipzss
from clipzss._moved import MOVED

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "clipzss"
DOC = REPO / "docs" / "architecture.md"
BEGIN, END = "<!-- packages:start -->", "<!-- packages:end -->"
PACKAGES = ("models", "method", "inference", "training", "data", "cli", "worlds")


def _first_paragraph(docstring: str | None) -> str:
    return " ".join((docstring or "").strip().split("\n\n")[0].split())


def _module_doc(path: Path) -> str:
    import ast

    return _first_paragraph(ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))))


def render_packages() -> str:
    """One paragraph per package (its ``__init__`` docstring) with its modules, then the top-level modules."""
    out = []
    for package in PACKAGES:
        init = SRC / package / "__init__.py"
        text = " ".join(
            " ".join(p.split())
            for p in (importlib.import_module(f"clipzss.{package}").__doc__ or "").split("\n\n")
        )
        modules = sorted(p.stem for p in (SRC / package).glob("*.py") if p.stem != "__init__")
        subpackages = sorted(p.name + "/" for p in (SRC / package).iterdir() if (p / "__init__.py").is_file())
        assert init.is_file(), init
        out.append(
            f"### `clipzss.{package}`\n\n{text}\n\nModules: {', '.join(f'`{m}`' for m in modules + subpackages)}."
        )
    top = sorted(p for p in SRC.glob("*.py") if p.stem not in ("__init__", "__main__"))
    lines = [f"- `{p.stem}`: {_module_doc(p)}" for p in top]
    out.append("### Top-level modules\n\n" + "\n".join(lines))
    return "\n\n".join(out)


def _doc_block() -> str:
    text = DOC.read_text(encoding="utf-8")
    return text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()


def test_architecture_doc_is_the_packages_docstrings() -> None:
    assert _doc_block() == render_packages(), (
        "docs/architecture.md is stale: run `python tests/test_layout.py`"
    )


def test_every_module_has_a_docstring_and_every_package_is_described() -> None:
    for path in SRC.rglob("*.py"):
        if path.stem != "__main__" and "prepare" not in path.parts:
            assert _module_doc(path), f"{path.relative_to(SRC)} has no docstring"
    described = {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    assert described == set(PACKAGES)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_path_is_the_new_module_and_warns_once(old: str) -> None:
    new = importlib.import_module(MOVED[old])
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=re.escape(f"{old} moved to {MOVED[old]}")) as record:
        module = importlib.import_module(old)
    assert module is new and len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert importlib.import_module(old) is new  # once: it is in sys.modules now


def test_old_names_of_the_modules_that_became_packages() -> None:
    import clipzss.images as images
    import clipzss.inference as inference
    import clipzss.inference.inputs as inputs
    import clipzss.training as training
    import clipzss.training.loop as loop

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert training.train is loop.train  # the package's entry point: no warning
        assert clipzss.train is loop.train
    for package, name, home in [
        (training, "due", loop),
        (inference, "load_image", images),
        (inference, "preprocess", inputs),
    ]:
        package.__dict__.pop(name, None)
        with pytest.warns(
            DeprecationWarning, match=re.escape(f"{package.__name__}.{name} moved to {home.__name__}")
        ):
            assert getattr(package, name) is getattr(home, name)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert getattr(package, name) is getattr(home, name)  # warned once
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        training.nothing_here  # noqa: B018


def _pickle_globals(state: Path) -> tuple[set[str], set[str]]:
    with zipfile.ZipFile(state) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    names, strings = set(), set()
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            names.add(str(arg).split()[0])
        elif isinstance(arg, str):
            strings.add(arg)
    return names, strings


def test_a_run_folder_names_no_module_so_it_outlives_the_layout(
    trained_checkpoint: Path, tmp_path: Path
) -> None:
    """What a run folder stores (safetensors + YAML, and train_state.pt read with weights_only) names torch and
    collections only, never a clipzss module: a folder written by the flat layout (checked by hand on one, at the
    move) loads, resumes and predicts under this one. The round trip itself is then the ordinary one."""
    from safetensors import safe_open

    from clipzss.cli import main
    from clipzss.training.state import load_training_state

    run = tmp_path / "run"
    shutil.copytree(trained_checkpoint.parent, run)
    modules, strings = _pickle_globals(run / "train_state.pt")
    assert modules <= {"torch", "torch._utils", "collections"}, modules
    assert not [s for s in strings if "clipzss" in s]
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        metadata = f.metadata()
    module_path = re.compile(r"clipzss\.\w")
    assert not [k for k, v in metadata.items() if module_path.search(v)]
    assert not module_path.search((run / "config.yaml").read_text())
    steps = load_training_state(run)["step"]
    assert (
        main(["train", str(run / "config.yaml"), f"train.max_iters={steps + 1}", "--resume", str(run)]) == 0
    )
    assert load_training_state(run)["step"] == steps + 1
    from PIL import Image

    Image.new("RGB", (40, 30), (120, 60, 30)).save(tmp_path / "x.png")
    out = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                str(tmp_path / "x.png"),
                "--checkpoint",
                str(run / "model.safetensors"),
                "--classes",
                "cat,dog",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "x_mask.png").is_file()


if __name__ == "__main__":
    text = DOC.read_text(encoding="utf-8")
    head, tail = text.split(BEGIN)[0], text.split(END)[1]
    DOC.write_text(f"{head}{BEGIN}\n{render_packages()}\n{END}{tail}", encoding="utf-8")
    print(f"wrote {DOC}")
