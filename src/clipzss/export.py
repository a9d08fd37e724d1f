"""`clipzss export`: the student as an ONNX graph, and a runner that needs only onnxruntime, numpy and PIL.

The graph takes (B, 3, H, W) images normalised with the ImageNet statistics, H and W multiples of the network's
``pad_multiple`` (recorded in the file), batch and size dynamic. It returns either L2-normalised embeddings
(B, C, H/4, W/4), so any text classifier can be applied afterwards, or, with a class list baked in, the logits
α·cos(embedding, text) (B, K, H/4, W/4). Everything a runner needs to reproduce `Segmenter.predict` (normalisation,
padding, inference mode, class names, α) is stored in the model's metadata.

`OnnxSegmenter` is that runner: it pads, windows, upsamples and argmaxes in numpy, so `clipzss predict --onnx`
works where torch is not installed. Export uses torch's TorchScript-based exporter, which keeps the sizes dynamic
for smp networks; each export is checked against PyTorch at two sizes before it is accepted.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from clipzss.predict import Segmenter

log = logging.getLogger(__name__)

FORMAT = "clipzss-onnx-v1"
DEFAULT_OPSET = 17

HELP = "export a trained student to ONNX (embeddings, or logits for a fixed class list)"
EPILOG = """examples:
  clipzss export runs/voc --onnx student.onnx
  clipzss export runs/voc --onnx road.onnx --classes "road,car,tree,sky" --teacher-weights ViT-B-16.safetensors
  clipzss export runs/voc --onnx road.onnx --text-embeddings names.safetensors
  clipzss predict street.jpg --onnx road.onnx --out outputs/onnx

Without class names the graph returns normalised embeddings: `clipzss predict --onnx` then needs
--text-embeddings (from `clipzss embed-text`). With them, the text classifier is baked in and CLIP is not needed
at prediction time. Batch size and image size are dynamic; the export is checked against PyTorch before it is
kept (--no-check skips that)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint file, run folder or save_pretrained folder")
    parser.add_argument("--onnx", required=True, help="output .onnx file")
    parser.add_argument("--classes", default=None, help="comma-separated class names to bake in")
    parser.add_argument(
        "--text-embeddings", default=None, help="bake in these embeddings (file from `clipzss embed-text`)"
    )
    parser.add_argument("--teacher-weights", default=None, help="local CLIP weights for the class names")
    parser.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})"
    )
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime-against-PyTorch check")


def run(args: argparse.Namespace) -> int:
    from clipzss.predict import PrecomputedText, Segmenter, parse_class_names

    names = parse_class_names(args.classes) if args.classes is not None else None
    if args.text_embeddings:
        text = PrecomputedText.load(args.text_embeddings)
        names = names or text.class_names
        segmenter = Segmenter.from_checkpoint(args.checkpoint, device="cpu", text_encoder=text)
    elif names is not None:
        segmenter = Segmenter.from_checkpoint(
            args.checkpoint, device="cpu", teacher_weights=args.teacher_weights
        )
    else:
        segmenter = Segmenter.from_checkpoint(args.checkpoint, device="cpu", text_encoder=_NoText())
    info = export_onnx(segmenter, args.onnx, names, opset=args.opset, check=not args.no_check)
    what = f"logits for {len(info.class_names)} classes" if info.class_names else "normalised embeddings"
    checked = f", max |ONNX - PyTorch| {info.max_abs_diff:.2e}" if info.max_abs_diff is not None else ""
    print(f"wrote {info.path} ({what}; dynamic batch and size, multiples of {info.pad_multiple}{checked})")
    return 0


class _NoText:
    """Stands in for the text encoder when only the embeddings are exported: CLIP is never loaded."""

    def text_embeddings(self, class_names: Sequence[str]) -> Any:
        raise ValueError("this export has no text classifier; give --classes or --text-embeddings")


# --- export -----------------------------------------------------------------------------------------------------


@dataclass
class ExportInfo:
    path: Path
    class_names: list[str] | None
    pad_multiple: int
    max_abs_diff: float | None  # ONNX against PyTorch over the check inputs; None when not checked


def _graph_module(segmenter: Segmenter, text: Any | None) -> Any:
    """The exported computation: the smp network (no padding, sizes are the runner's job) and the classifier."""
    import torch
    import torch.nn.functional as F

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
) -> ExportInfo:
    """Export ``segmenter``'s student (with ``class_names``' text classifier baked in when given) to ``path``.

    Raises:
        RuntimeError: the exported graph does not reproduce PyTorch at a second size (an architecture whose
            sizes the tracer froze); the file is removed.
    """
    import onnx
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    student = segmenter.student
    names = list(class_names) if class_names is not None else None
    text = segmenter.text_classifier(names).cpu() if names is not None else None
    graph = _graph_module(segmenter, text)
    multiple = int(student.pad_multiple)
    side = max(2 * multiple, student.min_size)
    example = torch.zeros(1, 3, side, side + multiple)
    output = "logits" if names is not None else "embeddings"
    with warnings.catch_warnings():
        # The TorchScript exporter announces its deprecation and the tracer warns about the smp decoder's shape
        # checks; the size check below is what tells whether the graph stayed dynamic.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (example,),
            str(path),
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
        "mean": json.dumps(list(_imagenet()[0])),
        "std": json.dumps(list(_imagenet()[1])),
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
            }
        ),
        "config": json.dumps(cfg.to_dict()),
        "teacher": getattr(segmenter.text_encoder, "identity", "") or segmenter.meta.get("teacher", ""),
    }
    if names is not None:
        meta["class_names"] = json.dumps(names)
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, meta)
    model.doc_string = (
        f"clipzss student {student.arch}/{student.encoder_name}: image (B,3,H,W) normalised, H and W multiples of "
        f"{multiple} -> {output} (B,{'K' if names else 'C'},H/4,W/4)"
    )
    onnx.save(model, str(path))
    diff = None
    if check:
        try:
            diff = _check(graph, path, multiple, side)
        except RuntimeError:
            path.unlink(missing_ok=True)
            raise
    log.info("exported %s (%s)", path, output)
    return ExportInfo(path, names, multiple, diff)


def _imagenet() -> tuple[tuple[float, ...], tuple[float, ...]]:
    from clipzss.config import IMAGENET_MEAN, IMAGENET_STD

    return IMAGENET_MEAN, IMAGENET_STD


def _check(graph: Any, path: Path, multiple: int, side: int, tolerance: float = 1e-3) -> float:
    """Run onnxruntime and PyTorch on two batch sizes and shapes; the largest absolute difference."""
    import numpy as np
    import torch

    session = _session(path, threads=None)
    worst = 0.0
    generator = torch.Generator().manual_seed(0)
    for shape in ((2, 3, side, side + multiple), (1, 3, side + 2 * multiple, side)):
        x = torch.randn(shape, generator=generator)
        with torch.no_grad():
            expected = graph(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        if got.shape != expected.shape:
            raise RuntimeError(
                f"the exported graph returned {got.shape} for an input of {shape} instead of {expected.shape}: "
                "this architecture's sizes were frozen by the tracer, so it cannot be exported with dynamic sizes"
            )
        worst = max(worst, float(np.abs(got - expected).max()))
    if worst > tolerance:
        raise RuntimeError(f"the exported graph differs from PyTorch by up to {worst:.2e} (> {tolerance:g})")
    return worst


# --- the torch-free runner ---------------------------------------------------------------------------------------


def _session(path: str | Path, threads: int | None) -> Any:
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types
        raise ValueError(f"{path} is not a loadable ONNX model: {str(err).splitlines()[0]}") from None


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(..., h, w) → (..., H, W), bilinear with half-pixel centres: torch's ``interpolate(align_corners=False)``."""
    import numpy as np

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        low = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        high = np.minimum(low + 1, n_in - 1)
        return low, high, (src - low).astype(x.dtype)

    (h, w), (out_h, out_w) = x.shape[-2:], size
    if (h, w) == (out_h, out_w):
        return x
    y0, y1, wy = axis(h, out_h)
    x0, x1, wx = axis(w, out_w)
    rows = x[..., y0, :] * (1 - wy)[:, None] + x[..., y1, :] * wy[:, None]  # (..., H, w)
    return rows[..., x0] * (1 - wx) + rows[..., x1] * wx  # (..., H, W)


def windows(
    height: int, width: int, crop: int | Sequence[int], stride: int | Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """mmseg's slide grid as (y1, y2, x1, x2); the same windows as `clipzss.evaluate.sliding_windows`."""
    crop_h, crop_w = (crop, crop) if isinstance(crop, int) else crop
    stride_h, stride_w = (stride, stride) if isinstance(stride, int) else stride
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    out = []
    for r in range(rows):
        y2 = min(r * stride_h + crop_h, height)
        for c in range(cols):
            x2 = min(c * stride_w + crop_w, width)
            out.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
    return out


def open_rgb(image: str | Path | Image.Image | np.ndarray) -> Image.Image:
    """An upright 8-bit RGB PIL image from a path, a PIL image or an (H, W, 3) array."""
    import numpy as np
    from PIL import Image, ImageOps

    if isinstance(image, np.ndarray):
        return Image.fromarray(np.ascontiguousarray(image[..., :3]).astype(np.uint8)).convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None


class OnnxSegmenter:
    """Runs an exported student with onnxruntime: ``OnnxSegmenter("m.onnx").predict("photo.jpg")``.

    Args:
        path: the .onnx file written by `export_onnx`.
        text_embeddings: for an embeddings-only export, a file from `clipzss embed-text` (its class names and
            rows become the classifier); ignored when the classes are baked in.
        threads: onnxruntime intra-op threads (None: its default, all cores).
    """

    def __init__(
        self, path: str | Path, text_embeddings: str | Path | None = None, threads: int | None = None
    ) -> None:
        import numpy as np

        self.path = Path(path)
        self.session = _session(self.path, threads)
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("clipzss_format") != FORMAT:
            raise ValueError(f"{self.path} is an ONNX model but not one exported by `clipzss export`")
        self.output = meta["output"]
        self.alpha = float(meta["alpha"])
        self.mean = np.asarray(json.loads(meta["mean"]), dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(json.loads(meta["std"]), dtype=np.float32).reshape(3, 1, 1)
        self.pad_multiple = int(meta["pad_multiple"])
        self.min_size = int(meta.get("min_size", "0"))
        self.output_stride = int(meta["output_stride"])
        self.eval = json.loads(meta["eval"])
        self.text: np.ndarray | None = None  # (K, C) for an embeddings-only graph
        if self.output == "logits":
            self.class_names: list[str] = json.loads(meta["class_names"])
        elif text_embeddings is not None:
            self.class_names, self.text = _read_text_embeddings(Path(text_embeddings))
        else:
            self.class_names = []

    def run(self, images: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) normalised float32, any size → the graph's output at (B, ·, ceil(H/4), ceil(W/4))."""
        import numpy as np

        h, w = images.shape[-2:]
        ph = max(h + -h % self.pad_multiple, self.min_size)
        pw = max(w + -w % self.pad_multiple, self.min_size)
        x = np.pad(
            images.astype(np.float32), ((0, 0), (0, 0), (0, ph - h), (0, pw - w))
        )  # zeros = mean colour
        out = self.session.run(None, {"image": x})[0]
        s = self.output_stride
        return out[..., : -(-h // s), : -(-w // s)]

    def _rows(self, class_names: Sequence[str] | None) -> tuple[list[str], list[int]]:
        if not self.class_names:
            raise ValueError(
                f"{self.path} returns embeddings without a classifier: give text embeddings "
                "(--text-embeddings from `clipzss embed-text`) or export with --classes"
            )
        names = list(class_names) if class_names else list(self.class_names)
        if not names or any(not n for n in names) or len(set(names)) != len(names):
            raise ValueError(f"the class list {names} is empty or holds an empty or duplicate name")
        missing = [n for n in names if n not in self.class_names]
        if missing:
            raise ValueError(
                f"class names not in {self.path}: {', '.join(missing)} (it knows: {', '.join(self.class_names)})"
            )
        return names, [self.class_names.index(n) for n in names]

    def logits(self, images: np.ndarray, class_names: Sequence[str] | None = None) -> np.ndarray:
        """(B, 3, H, W) normalised images → (B, K, ceil(H/4), ceil(W/4)) logits over ``class_names``."""
        import numpy as np

        _, rows = self._rows(class_names)
        out = self.run(images)
        if self.text is None:
            return out[:, rows]
        return self.alpha * np.einsum("bchw,kc->bkhw", out, self.text[rows], optimize=True)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """RGB PIL → (1, 3, h, w) float32, short side resized as the checkpoint's evaluation did, normalised."""
        import numpy as np
        from PIL import Image

        short = self.eval.get("short_side")
        channels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0  # (3, H, W)
        if short:
            scale = short / min(image.height, image.width)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            channels = np.stack(
                [np.asarray(Image.fromarray(c, "F").resize(size, Image.BILINEAR)) for c in channels]
            )
        return ((channels - self.mean) / self.std)[None].astype(np.float32)

    def predict(
        self,
        image: str | Path | Image.Image | np.ndarray,
        class_names: Sequence[str] | None = None,
        mode: str | None = None,
    ) -> np.ndarray:
        """(H, W) int64 ids into ``class_names`` (default: all the model's classes), at the input's size."""
        import numpy as np

        names, _ = self._rows(class_names)
        rgb = open_rgb(image)
        x = self.preprocess(rgb)  # (1, 3, h, w)
        out_size = (rgb.height, rgb.width)
        mode = mode or self.eval.get("mode", "whole")
        if mode == "whole":
            logits = resize_bilinear(self.logits(x, names), out_size)
        elif mode == "slide":
            h, w = x.shape[-2:]
            grid = windows(h, w, self.eval["crop_size"], self.eval["stride"])
            win_h, win_w = grid[0][1] - grid[0][0], grid[0][3] - grid[0][2]
            crops = np.concatenate([x[..., y1:y2, x1:x2] for y1, y2, x1, x2 in grid])  # (n, 3, win_h, win_w)
            per_window = resize_bilinear(self.logits(crops, names), (win_h, win_w))  # (n, K, win_h, win_w)
            canvas = np.zeros((len(names), h, w), dtype=np.float32)
            count = np.zeros((1, h, w), dtype=np.float32)
            for (y1, y2, x1, x2), window in zip(grid, per_window, strict=True):
                canvas[:, y1:y2, x1:x2] += window
                count[:, y1:y2, x1:x2] += 1
            logits = resize_bilinear((canvas / count)[None], out_size)
        else:
            raise ValueError(f"unknown inference mode '{mode}'; choose 'slide' or 'whole'")
        return logits[0].argmax(0).astype(np.int64)


def _read_text_embeddings(path: Path) -> tuple[list[str], np.ndarray]:
    import numpy as np
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"text-embedding file not found: {path}")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            names = json.loads((handle.metadata() or {})["class_names"])
            emb = handle.get_tensor("embeddings").astype(np.float32)
    except Exception as err:
        raise ValueError(
            f"{path} is not a text-embedding file written by `clipzss embed-text` ({err})"
        ) from None
    return names, emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)


def predict_onnx(args: argparse.Namespace) -> int:
    """`clipzss predict --onnx MODEL IMAGE...`: mask and overlay PNGs per image, with onnxruntime alone.

    Reads ``args.onnx``, ``images``, ``classes``, ``text_embeddings``, ``mode`` and ``out``.
    """
    from clipzss.visualize import prediction_folder, save_prediction

    if getattr(args, "checkpoint", None) or getattr(args, "baseline", None):
        raise ValueError("--onnx runs the exported model on its own: drop --checkpoint / --baseline")
    model = OnnxSegmenter(args.onnx, getattr(args, "text_embeddings", None))
    from clipzss.names import parse_class_names  # torch-free: the same checks as `clipzss predict`

    names = parse_class_names(args.classes) if args.classes else None
    out = prediction_folder(args.images, args.out)
    for path in args.images:
        image = open_rgb(path)
        mask = model.predict(image, names, mode=getattr(args, "mode", None))
        used = names or model.class_names
        print(f"{path}: {save_prediction(out, Path(path).stem, image, mask, used)}")
    return 0
