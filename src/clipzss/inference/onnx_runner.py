"""Run a student exported by `clipzss export` with onnxruntime, numpy and PIL alone (no torch).

`OnnxSegmenter` pads and windows in numpy with the same preprocessing, windows and modes as the torch paths
(`clipzss.inference.inputs`), and runs and labels the windows with the same `clipzss.inference.label_maps` code (`slide_labels`,
`label_map`), so `clipzss predict --onnx` gives the masks `clipzss predict` gives (up to the float rounding of the
two runtimes' networks) where torch is not installed, without a K-channel map at the image's size and with the
same bounded memory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from clipzss.config import Config, ConfigError, check_choice, check_field, check_side
from clipzss.errors import UsageError
from clipzss.images import ImageLike, as_rgb
from clipzss.inference.embeddings_file import read_text_embeddings
from clipzss.inference.inputs import preprocess, sliding_windows
from clipzss.inference.label_maps import check_candidates, label_map, slide_labels, whole_plan
from clipzss.names import parse_class_names

FORMAT = "clipzss-onnx-v1"


def open_session(path: str | Path, threads: int | None) -> Any:
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
        raise UsageError(f"{path} is not a loadable ONNX model: {str(err).splitlines()[0]}") from None


OUTPUTS = ("logits", "embeddings")  # what `clipzss export` writes: with class names baked in, or without


class _Metadata:
    """An ONNX file's clipzss metadata, checked like a config: the file may come from anyone, so each value is
    parsed and bounded here (with the config's own rules) and a bad one is one line naming the file and key."""

    def __init__(self, meta: dict[str, str], path: Path) -> None:
        self.meta, self.path = meta, path

    def _raw(self, key: str, default: str | None = None) -> str:
        if key not in self.meta:
            if default is not None:
                return default
            raise UsageError(f"{self.path}: its clipzss metadata has no '{key}' (not a complete export)")
        return self.meta[key]

    def _json(self, key: str) -> Any:
        try:
            return json.loads(self._raw(key))
        except (json.JSONDecodeError, RecursionError):
            raise UsageError(f"{self.path}: metadata '{key}' is not valid JSON") from None

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        value = self._raw(key)
        try:
            check_choice(value, choices, key)
        except ValueError as err:
            raise UsageError(f"{self.path}: metadata {err}") from None
        return value

    def number(self, key: str) -> float:
        try:
            value = float(self._raw(key))
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise UsageError(f"{self.path}: metadata {key}={self._raw(key)[:40]!r} is not a positive number")
        return value

    def side(self, key: str, default: int | None = None) -> int:
        raw = self._raw(key, None if default is None else str(default))
        try:
            value = int(raw)
        except ValueError:
            raise UsageError(
                f"{self.path}: metadata {key}={raw[:40]!r} is not a whole number of pixels"
            ) from None
        if default is not None and value == default:
            return value
        try:
            return check_side(value, key)
        except ConfigError as err:
            raise UsageError(f"{self.path}: metadata {err}") from None

    def eval(self) -> dict[str, Any]:
        """The export's test-time settings (mode, windows, short side), refused as a config's would be."""
        data = self._json("eval")
        if not isinstance(data, dict):
            raise UsageError(f"{self.path}: metadata 'eval' is not a mapping of settings")
        try:
            checked = Config.from_dict({"eval": data}, source=f"{self.path}: metadata").eval
        except ConfigError as err:
            raise UsageError(
                str(err) if str(err).startswith(str(self.path)) else f"{self.path}: {err}"
            ) from None
        values = {key: getattr(checked, key) for key in data}
        for key in ("crop_size", "stride"):  # the sliding window's, checked defaults where the file has none
            values.setdefault(key, getattr(checked, key))
        return values

    def class_names(self) -> list[str]:
        names = self._json("class_names")
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise UsageError(f"{self.path}: metadata 'class_names' is not a list of names")
        try:
            return parse_class_names(names)
        except ValueError as err:
            raise UsageError(f"{self.path}: metadata 'class_names': {err}") from None


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
        self.path = Path(path)
        self.session = open_session(self.path, threads)
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("clipzss_format") != FORMAT:
            raise UsageError(f"{self.path} is an ONNX model but not one exported by `clipzss export`")
        inputs = [node.name for node in self.session.get_inputs()]
        if inputs != ["image"]:
            raise UsageError(
                f"{self.path}: the graph's inputs are {inputs[:4]}, not the one 'image' of an export"
            )
        checked = _Metadata(meta, self.path)
        self.output = checked.choice("output", OUTPUTS)
        self.alpha = checked.number("alpha")
        self.pad_multiple = checked.side("pad_multiple")
        self.min_size = checked.side("min_size", default=0)
        self.output_stride = checked.side("output_stride")
        self.eval = checked.eval()
        self.text: np.ndarray | None = None  # (K, C) for an embeddings-only graph
        if self.output == "logits":
            self.class_names: list[str] = checked.class_names()
        elif text_embeddings is not None:
            self.class_names, text, _ = read_text_embeddings(text_embeddings)
            self.text = text / np.linalg.norm(text, axis=1, keepdims=True).clip(1e-12)
        else:
            self.class_names = []

    def run(self, images: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) normalised float32, any size → the graph's output at (B, ·, ceil(H/4), ceil(W/4))."""
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
            raise UsageError(
                f"{self.path} returns embeddings without a classifier: give text embeddings "
                "(--text-embeddings from `clipzss embed-text`) or export with --classes"
            )
        names = parse_class_names(class_names) if class_names else list(self.class_names)
        index = {name: row for row, name in enumerate(self.class_names)}
        missing = [n for n in names if n not in index]
        if missing:
            raise UsageError(
                f"class names not in {self.path}: {', '.join(missing)} (it knows: {', '.join(self.class_names)})"
            )
        return names, [index[n] for n in names]

    def logits(self, images: np.ndarray, class_names: Sequence[str] | None = None) -> np.ndarray:
        """(B, 3, H, W) normalised images → (B, K, ceil(H/4), ceil(W/4)) logits over ``class_names``."""
        return self._logits(images, self._rows(class_names)[1])

    def _logits(self, images: np.ndarray, rows: list[int]) -> np.ndarray:
        out = self.run(images)
        if self.text is None:
            return out[:, rows]
        return self.alpha * np.einsum("bchw,kc->bkhw", out, self.text[rows], optimize=True)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """RGB PIL → (1, 3, h, w) float32: `clipzss.inference.inputs.preprocess`, as the checkpoint's evaluation did."""
        return preprocess(image, self.eval.get("short_side"))[None]

    def predict(
        self,
        image: ImageLike,
        class_names: Sequence[str] | None = None,
        mode: str | None = None,
    ) -> np.ndarray:
        """(H, W) int64 ids into ``class_names`` (default: all the model's classes), at the input's size.

        The numpy twin of `clipzss.inference.windows.infer_labels`: the same windows, batched and streamed in bands by the
        same `clipzss.inference.label_maps.slide_labels`, then `label_map`.
        """
        _, rows = self._rows(class_names)  # checked once, not per window
        # (exports before the option had exact labels only)
        candidates = check_candidates(
            self.eval.get("label_candidates", 0), f"{self.path}: eval.label_candidates"
        )
        rgb = as_rgb(image)
        x = self.preprocess(rgb)  # (1, 3, h, w)
        out_size = (rgb.height, rgb.width)
        if check_field(mode or self.eval.get("mode", "whole"), "eval.mode") == "whole":
            logits = self._logits(x, rows).transpose(0, 2, 3, 1)  # (1, h', w', K): one window
            return label_map(whole_plan(logits.shape[1:3], out_size), logits, candidates=candidates)
        h, w = x.shape[-2:]
        grid = sliding_windows(h, w, self.eval["crop_size"], self.eval["stride"])

        def run(windows: Sequence[tuple[int, int, int, int]]) -> np.ndarray:  # (1, n, h', w', K)
            crops = np.concatenate([x[..., y1:y2, x1:x2] for y1, y2, x1, x2 in windows])
            return self._logits(crops, rows).transpose(0, 2, 3, 1)[None]

        return slide_labels(run, (h, w), grid, out_size, candidates=candidates)[0][0][0]
