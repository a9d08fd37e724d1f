"""clipzss: train any segmentation network with a frozen CLIP teacher for zero-shot segmentation (CLIP-ZSS).

The public API is re-exported here lazily, so `clipzss --help` does not pay for importing torch models.
"""

from __future__ import annotations

import importlib
from typing import Any

from clipzss import _moved

__version__ = "0.1.0"
_moved.install()  # the flat layout's module paths (clipzss.predict, ...) import for one more release

_EXPORTS = {
    "Config": "clipzss.config",
    "load_config": "clipzss.config",
    "build_teacher": "clipzss.models.teacher",
    "CLIPTeacher": "clipzss.models.teacher",
    "Teacher": "clipzss.models.teacher",
    "build_student": "clipzss.models.student",
    "build_dataset": "clipzss.data",
    "make_split": "clipzss.data",
    "evaluate": "clipzss.evaluate",
    "Segmenter": "clipzss.models.segmenter",
    "MaskCLIPSegmenter": "clipzss.models.segmenter",
    "TrainingFreeSegmenter": "clipzss.models.segmenter",
    "OnnxSegmenter": "clipzss.inference.onnx_runner",
    "train": "clipzss.training.loop",  # the module is not named train.py: it would shadow this function
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'clipzss' has no attribute '{name}'")
