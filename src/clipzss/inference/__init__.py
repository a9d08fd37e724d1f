"""Inference: from an image to a label map, the one path of eval, predict, reports, the demo and ONNX.

`inputs` sizes and normalises an image (numpy and PIL only) and lays out mmseg's sliding windows; `windows`
runs a torch network over them; `label_maps` (with its numba kernels, `_label_kernels`) turns window logits into
labels at the original size without the K×H×W scores; `onnx_runner` does all of it with onnxruntime alone, and
`embeddings_file` reads the class-name embeddings that such a model needs. `label_maps`, `onnx_runner`,
`embeddings_file` and `inputs` never import torch.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # `clipzss.inference` was one module (image reading and preprocessing) before it was a package.
    from clipzss._moved import forward

    return forward(globals(), name, ("clipzss.inference.inputs", "clipzss.images"))
