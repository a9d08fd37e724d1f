"""Module paths of the flat layout that moved into packages: they keep importing, with a DeprecationWarning, for one
release.

`clipzss.predict` (and the others below) resolve to the module's new home, the same module object, so a user's
``from clipzss.predict import Segmenter`` or ``monkeypatch.setattr("clipzss.teacher....")`` behaves as before. The
two old modules whose names are now packages (`clipzss.training`, `clipzss.inference`) forward their old names from
the package itself (`OLD_NAMES`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

REMOVED_IN = "0.3"

MOVED: dict[str, str] = {
    "clipzss.predict": "clipzss.models.segmenter",
    "clipzss.teacher": "clipzss.models.teacher",
    "clipzss.student": "clipzss.models.student",
    "clipzss.text_cache": "clipzss.models.text_cache",
    "clipzss.recipes": "clipzss.models.recipes",
    "clipzss.pseudo_labels": "clipzss.method.pseudo_labels",
    "clipzss.regions": "clipzss.method.regions",
    "clipzss.glm": "clipzss.method.glm",
    "clipzss.synthesizer": "clipzss.method.synthesizer",
    "clipzss.losses": "clipzss.method.losses",
    "clipzss.transductive": "clipzss.method.transductive",
    "clipzss.label_maps": "clipzss.inference.label_maps",
    "clipzss.onnx_runner": "clipzss.inference.onnx_runner",
    "clipzss.embeddings_file": "clipzss.inference.embeddings_file",
    "clipzss.training_step": "clipzss.training.step",
    "clipzss.training_state": "clipzss.training.state",
}


def warn_moved(old: str, new: str, stacklevel: int = 3) -> None:
    """``stacklevel`` counts from here to the user's line (importlib's own frames are skipped by `warnings`)."""
    warnings.warn(
        f"{old} moved to {new}; import it from there ({old} goes in clipzss {REMOVED_IN})",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module path and loads it as its new module (one warning: the module is then in sys.modules)."""

    def find_spec(
        self, fullname: str, path: object, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warn_moved(spec.name, MOVED[spec.name])
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """The new module is already executed."""


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (after the path finders: a real module of the name always wins)."""
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedFinder())


def forward(
    namespace: dict[str, object], name: str, homes: tuple[str, ...], public: frozenset[str] = frozenset()
) -> object:
    """An old module-level ``name`` of a package that was a flat module, from the first of ``homes`` that has it.

    The value is then kept in the package's ``namespace``, so each old name warns once; names in ``public`` are the
    package's own API and never warn.
    """
    package = str(namespace["__name__"])
    if not name.startswith("__"):
        for home in homes:
            module = importlib.import_module(home)
            if hasattr(module, name):
                if name not in public:
                    warn_moved(f"{package}.{name}", f"{home}.{name}", stacklevel=4)
                namespace[name] = value = getattr(module, name)
                return value
    raise AttributeError(f"module '{package}' has no attribute '{name}'")
