"""`clipzss export`: the student as an ONNX graph, checked against PyTorch before it is kept.

The graph takes (B, 3, H, W) images normalised with the ImageNet statistics, H and W multiples of the network's
``pad_multiple`` (recorded in the file), batch and size dynamic. It returns either L2-normalised embeddings
(B, C, H/4, W/4), so any text classifier can be applied afterwards, or, with a class list baked in, the logits
α·cos(embedding, text) (B, K, H/4, W/4). Everything a runner needs to reproduce `Segmenter.predict` (normalisation,
padding, inference mode, class names, α) is stored in the model's metadata; `clipzss.inference.onnx_runner.OnnxSegmenter`
is that runner. Export uses torch's TorchScript-based exporter, which keeps the sizes dynamic for smp networks; each
export is checked against PyTorch at two sizes before it is accepted.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from clipzss.config import IMAGENET_MEAN, IMAGENET_STD
from clipzss.errors import CannotRunError, UsageError
from clipzss.files import atomic_write, refuse_existing
from clipzss.inference.onnx_runner import FORMAT, open_session
from clipzss.models.segmenter import PrecomputedText, Segmenter
from clipzss.names import parse_class_names

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17


def export_checkpoint(
    checkpoint: str | Path,
    onnx_path: str | Path,
    class_names: Sequence[str] | None = None,
    text_embeddings: str | Path | None = None,
    teacher_weights: str | None = None,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    overwrite: bool = False,
) -> ExportInfo:
    """Export a checkpoint (file, run folder or saved folder) to ONNX: with ``class_names`` (encoded by the
    checkpoint's CLIP, or taken from ``text_embeddings``) the classifier is baked in, else the graph returns
    embeddings and CLIP is never loaded. An existing ``onnx_path`` is refused unless ``overwrite``."""
    names = parse_class_names(class_names) if class_names is not None else None
    refuse_existing([onnx_path], overwrite, option="--onnx")  # before any model is loaded
    if text_embeddings:
        text = PrecomputedText.load(text_embeddings)
        names = names or text.class_names
        segmenter = Segmenter.from_checkpoint(checkpoint, device="cpu", text_encoder=text)
    elif names is not None:
        segmenter = Segmenter.from_checkpoint(checkpoint, device="cpu", teacher_weights=teacher_weights)
    else:
        segmenter = Segmenter.from_checkpoint(checkpoint, device="cpu", text_encoder=_NoText())
    return export_onnx(segmenter, onnx_path, names, opset=opset, check=check, overwrite=overwrite)


class _NoText:
    """Stands in for the text encoder when only the embeddings are exported: CLIP is never loaded."""

    def text_embeddings(self, class_names: Sequence[str]) -> Any:
        raise UsageError("this export has no text classifier; give --classes or --text-embeddings")


# --- export -----------------------------------------------------------------------------------------------------


@dataclass
class ExportInfo:
    path: Path
    class_names: list[str] | None
    pad_multiple: int
    max_abs_diff: float | None  # ONNX against PyTorch over the check inputs; None when not checked


def _graph_module(segmenter: Segmenter, text: Any | None) -> Any:
    """The exported computation: the smp network (no padding, sizes are the runner's job) and the classifier."""

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # A CPU copy: exporting must not move the caller's model off its device.
            self.net = copy.deepcopy(segmenter.student.model).cpu().eval()
            self.alpha = float(segmenter.alpha)
            self.register_buffer(
                "text", None if text is None else text.float()[:, :, None, None]
            )  # (K, C, 1, 1)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            emb = F.normalize(self.net(image), dim=1)  # (B, C, H/4, W/4)
            if self.text is None:
                return emb
            return self.alpha * F.conv2d(emb, self.text)  # (B, K, H/4, W/4)

    return Graph().eval()


def export_onnx(
    segmenter: Segmenter,
    path: str | Path,
    class_names: Sequence[str] | None = None,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    overwrite: bool = False,
) -> ExportInfo:
    """Export ``segmenter``'s student (with ``class_names``' text classifier baked in when given) to ``path``.

    The graph is written and checked in a temporary file beside ``path`` and renamed only once it passed, so a
    failed export or a full disk never leaves a half file, nor touches an existing one. An existing ``path`` is
    refused unless ``overwrite``.

    Raises:
        RuntimeError: the exported graph does not reproduce PyTorch at a second size (an architecture whose
            sizes the tracer froze); nothing is written.
    """

    path = Path(path)
    refuse_existing([path], overwrite, option="--onnx")
    student = segmenter.student
    names = list(class_names) if class_names is not None else None
    text = segmenter.text_classifier(names).cpu() if names is not None else None
    graph = _graph_module(segmenter, text)
    multiple = int(student.pad_multiple)
    side = max(2 * multiple, student.min_size)
    example = torch.zeros(1, 3, side, side + multiple)
    output = "logits" if names is not None else "embeddings"
    diff: float | None = None

    def write(tmp: Path) -> None:
        nonlocal diff
        with warnings.catch_warnings():
            # The TorchScript exporter announces its deprecation and the tracer warns about the smp decoder's shape
            # checks; the size check below is what tells whether the graph stayed dynamic.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph,
                (example,),
                str(tmp),
                input_names=["image"],
                output_names=[output],
                dynamic_axes={
                    "image": {0: "batch", 2: "height", 3: "width"},
                    output: {0: "batch", 2: "h", 3: "w"},
                },
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        cfg = segmenter.config
        meta = {
            "clipzss_format": FORMAT,
            "output": output,
            "alpha": repr(float(segmenter.alpha)),
            "mean": json.dumps(list(IMAGENET_MEAN)),
            "std": json.dumps(list(IMAGENET_STD)),
            "pad_multiple": str(multiple),
            "min_size": str(int(student.min_size)),
            "output_stride": str(int(student.output_stride)),
            "embed_dim": str(int(student.embed_dim)),
            "eval": json.dumps(
                {
                    "mode": cfg.eval.mode,
                    "crop_size": cfg.eval.crop_size,
                    "stride": cfg.eval.stride,
                    "short_side": cfg.eval.short_side,
                    "label_candidates": cfg.eval.label_candidates,
                }
            ),
            "config": json.dumps(cfg.to_dict()),
            "teacher": getattr(segmenter.text_encoder, "identity", "") or segmenter.meta.get("teacher", ""),
        }
        if names is not None:
            meta["class_names"] = json.dumps(names)
        model = onnx.load(str(tmp))
        onnx.helper.set_model_props(model, meta)
        model.doc_string = (
            f"clipzss student {student.arch}/{student.encoder_name}: image (B,3,H,W) normalised, H and W multiples of "
            f"{multiple} -> {output} (B,{'K' if names else 'C'},H/4,W/4)"
        )
        onnx.save(model, str(tmp))
        if check:
            diff = _check(graph, tmp, multiple, side)

    atomic_write(path, write, replace=overwrite)
    logger.info("exported %s (%s)", path, output)
    return ExportInfo(path, names, multiple, diff)


def _check(graph: Any, path: Path, multiple: int, side: int, tolerance: float = 1e-3) -> float:
    """Run onnxruntime and PyTorch on two batch sizes and shapes; the largest absolute difference."""

    session = open_session(path, threads=None)
    worst = 0.0
    generator = torch.Generator().manual_seed(0)
    for shape in ((2, 3, side, side + multiple), (1, 3, side + 2 * multiple, side)):
        x = torch.randn(shape, generator=generator)
        with torch.no_grad():
            expected = graph(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        if got.shape != expected.shape:
            raise CannotRunError(
                f"the exported graph returned {got.shape} for an input of {shape} instead of {expected.shape}: "
                "this architecture's sizes were frozen by the tracer, so it cannot be exported with dynamic sizes"
            )
        worst = max(worst, float(np.abs(got - expected).max()))
    if worst > tolerance:
        raise CannotRunError(
            f"the exported graph differs from PyTorch by up to {worst:.2e} (> {tolerance:g})"
        )
    return worst
