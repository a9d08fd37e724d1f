"""Zero-shot prediction: a student (or, as a baseline, CLIP itself) classifies pixels against text embeddings.

`Segmenter` is the product of training: the student alone embeds the image and CLIP's *text* embeddings of any class
names are its classifier, so inference costs what the closed-set network costs. `TrainingFreeSegmenter` is the
training-free "CLIP at inference" reference (one recipe's dense tokens, MaskCLIP, ClearCLIP, SCLIP or NACLIP,
against the same classifier), kept for speed and accuracy comparisons. Both share `predict` / `logits_fn`, so
evaluation and the CLI treat them alike.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, MutableMapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clipzss.checkpoint import CheckpointError, load_checkpoint
from clipzss.config import Config, EvalConfig
from clipzss.errors import UsageError
from clipzss.images import ImageLike, as_rgb
from clipzss.inference.embeddings_file import read_text_embeddings, write_text_embeddings
from clipzss.inference.inputs import preprocess
from clipzss.inference.windows import infer_labels
from clipzss.models.recipes import BASELINE_TITLES, baseline_eval_config, check_baseline
from clipzss.models.student import Student, build_student
from clipzss.models.teacher import CLIPTeacher, Teacher, build_teacher
from clipzss.names import parse_class_names
from clipzss.runtime import resolve_device
from clipzss.sharing import SegmenterHubMixin

logger = logging.getLogger(__name__)


# Text classifiers kept in memory per segmenter (one per class list and template set); the least recently used
# goes first, so a long-running server asked for ever new class lists keeps a bounded amount of memory.
TEXT_CACHE_SIZE = 64


class PrecomputedText:
    """Text embeddings saved by `clipzss embed-text`: predict with a fixed class list without loading CLIP."""

    def __init__(self, class_names: Sequence[str], embeddings: torch.Tensor, identity: str = "") -> None:
        if embeddings.ndim != 2 or embeddings.shape[0] != len(class_names):
            raise UsageError(
                f"{len(class_names)} class names but embeddings of shape {tuple(embeddings.shape)}"
            )
        self.class_names = list(class_names)
        self.embeddings = F.normalize(embeddings.float(), dim=-1)
        self.embed_dim = int(embeddings.shape[1])
        self.identity = identity

    @classmethod
    def from_teacher(
        cls, teacher: Teacher, class_names: Sequence[str], progress: bool = False, chunk: int = 256
    ) -> PrecomputedText:
        """Embed the names ``chunk`` at a time (each name's embedding is its own), with a progress bar when asked:
        ten thousand names take minutes on a CPU."""
        from tqdm.auto import tqdm

        names = parse_class_names(class_names)
        parts = []
        with tqdm(total=len(names), desc="embed-text", unit="name", disable=not progress) as bar:
            for start in range(0, len(names), chunk):
                parts.append(teacher.text_embeddings(names[start : start + chunk]).cpu())
                bar.update(len(parts[-1]))
        return cls(names, torch.cat(parts), getattr(teacher, "identity", ""))

    def text_embeddings(self, class_names: Sequence[str]) -> torch.Tensor:
        index = {name: i for i, name in enumerate(self.class_names)}
        missing = [n for n in class_names if n not in index]
        if missing:
            raise UsageError(
                f"class names not in the text-embedding file: {', '.join(missing)} "
                f"(it holds: {', '.join(self.class_names)})"
            )
        return self.embeddings[[index[n] for n in class_names]]

    def save(self, path: str | Path, overwrite: bool = True) -> None:
        """Write the file `load` reads; ``overwrite=False`` never replaces an existing file."""
        write_text_embeddings(
            path, self.class_names, self.embeddings.numpy(), self.identity, replace=overwrite
        )

    @classmethod
    def load(cls, path: str | Path) -> PrecomputedText:
        names, embeddings, identity = read_text_embeddings(path)
        return cls(names, torch.from_numpy(embeddings), identity)


class LRUCache(MutableMapping):
    """A mapping that keeps its ``max_size`` most recently used entries and drops the oldest beyond that."""

    def __init__(self, max_size: int = TEXT_CACHE_SIZE) -> None:
        if max_size < 1:
            raise UsageError(f"a cache needs room for at least one entry, got max_size={max_size}")
        self.max_size = max_size
        self._items: OrderedDict[Hashable, object] = OrderedDict()

    def __getitem__(self, key: Hashable) -> object:
        value = self._items[key]
        self._items.move_to_end(key)
        return value

    def __setitem__(self, key: Hashable, value: object) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_size:
            self._items.popitem(last=False)

    def __delitem__(self, key: Hashable) -> None:
        del self._items[key]

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def pixel_norms(flat: torch.Tensor) -> torch.Tensor:
    """(B, C, P) embeddings → (B, P) norms over C, clamped at 1e-12 as ``F.normalize`` does.

    On the CPU, torch's ``vector_norm(flat, dim=1)`` (a reduction over a strided dimension) costs about a tenth
    of the whole SegFormer-B0 forward; the compiled loop (`clipzss.inference._label_kernels.pixel_norms`) is one pass over
    the embeddings with the same float32 arithmetic.
    """
    if flat.device.type != "cpu" or flat.dtype != torch.float32:
        return torch.linalg.vector_norm(flat, dim=1).clamp_min_(1e-12)
    from clipzss.inference import _label_kernels

    out = torch.empty(flat.shape[0], flat.shape[2])
    _label_kernels.pixel_norms(flat.detach().contiguous().numpy(), out.numpy())
    return out


def _classes_last_logits(flat: torch.Tensor, weights: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """(B, P, K) = (weights @ flat) / norm, on the CPU in blocks of pixels.

    Each block is a (K, C) @ (C, n) matmul whose (K, n) result is still in cache when one pass transposes and
    divides it into the classes-last output: faster than the single (K, C) @ (C, P) matmul alone, let alone the
    one-matmul classes-last form plus its division (the measurements are in benchmarks/README.md).
    """
    batch, _, points = flat.shape
    classes = weights.shape[0]
    block = 512 if classes <= 256 else 256  # the (C, n) slice and the (K, n) block stay within L2
    out = flat.new_empty(batch, points, classes)
    buffer = flat.new_empty(classes, block)
    for b in range(batch):
        for start in range(0, points, block):
            stop = min(start + block, points)
            part = torch.matmul(
                weights, flat[b, :, start:stop], out=buffer if stop - start == block else None
            )
            torch.div(part.T, norm[b, start:stop], out=out[b, start:stop])
    return out


class ZeroShotSegmenter:
    """Pixels classified by α·cos(dense embedding, text embedding); subclasses say where embeddings come from."""

    def __init__(
        self, text_encoder: Teacher, alpha: float, eval_cfg: EvalConfig, device: torch.device
    ) -> None:
        self.text_encoder = text_encoder
        self.alpha = alpha
        self.eval_cfg = eval_cfg
        self.device = device
        # (names, templates) -> (K, C) text classifier on the device, bounded (see TEXT_CACHE_SIZE).
        self._text_cache: LRUCache = LRUCache(TEXT_CACHE_SIZE)
        self.embed_dim: int | None = None  # the dense embeddings' width, when known before the first image

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images → (B, C, h, w) dense embeddings."""
        raise NotImplementedError

    def text_classifier(
        self, class_names: Sequence[str], templates: Sequence[str] | None = None
    ) -> torch.Tensor:
        """(K, C) normalised text embeddings, computed once per class list (and prompt templates, when given).

        ``templates`` replaces the config's prompt ensemble, e.g. ``["a photo of a {}."]``; only a text encoder
        that embeds prompts (a CLIP teacher) can honour it, precomputed embeddings cannot.
        """
        names = tuple(parse_class_names(class_names))
        key = (names, tuple(templates) if templates is not None else None)
        if key not in self._text_cache:
            if templates is None:
                text = self.text_encoder.text_embeddings(list(names))
            elif isinstance(self.text_encoder, CLIPTeacher):
                text = self.text_encoder.text_embeddings(list(names), templates=list(templates))
            else:
                raise UsageError(
                    f"prompt templates cannot be changed with a {type(self.text_encoder).__name__} text encoder "
                    "(precomputed embeddings); load CLIP to use other templates"
                )
            if self.embed_dim is not None and text.shape[-1] != self.embed_dim:
                raise UsageError(
                    f"the text encoder ({getattr(self.text_encoder, 'identity', type(self.text_encoder).__name__)})"
                    f" gives {text.shape[-1]}-d embeddings but this model's are {self.embed_dim}-d: it is not the "
                    "text encoder the model was trained with; pass that one's weights (--teacher-weights) or its "
                    "embeddings (--text-embeddings FILE, e.g. the world_text.safetensors beside a quick-start run)"
                )
            self._text_cache[key] = text.to(self.device)
        return self._text_cache[key]

    @torch.no_grad()
    def logits(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) logits at the embedding resolution: K-channel maps are upsampled, never C-channel ones.

        α·cos(R, T) as (K, C) @ (C, h·w) matmuls divided by ‖R‖ per pixel, never normalising the C-channel map
        itself, and returned channels last in memory (the layout `clipzss.inference.label_maps` reads). The values equal
        ``α·einsum(normalize(R), T)`` up to float rounding.
        """
        emb = self.embed(images.to(self.device)).float()  # (B, C, h, w)
        batch, _, height, width = emb.shape
        flat = emb.flatten(2)  # (B, C, h·w)
        norm = pixel_norms(flat)[..., None]  # (B, h·w, 1)
        weights = self.alpha * text.to(flat)  # (K, C)
        if flat.device.type != "cpu":
            logits = torch.matmul(flat.transpose(1, 2), weights.T).div_(norm)  # (B, h·w, K)
        else:
            logits = _classes_last_logits(flat, weights, norm)
        return logits.view(batch, height, width, -1).permute(0, 3, 1, 2)  # channels last in memory

    def logits_fn(
        self, class_names: Sequence[str], templates: Sequence[str] | None = None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        text = self.text_classifier(class_names, templates)
        return lambda images: self.logits(images, text)

    @torch.no_grad()
    def predict(
        self,
        image: ImageLike,
        class_names: Sequence[str],
        mode: str | None = None,
        templates: Sequence[str] | None = None,
    ) -> np.ndarray:
        """Segment one image with any class names → (H, W) int64 ids into ``class_names``, at the input's size."""
        rgb = as_rgb(image)
        x = torch.from_numpy(preprocess(rgb, self.eval_cfg.short_side))[None].to(self.device)
        cfg = dataclasses.replace(self.eval_cfg, mode=mode) if mode else self.eval_cfg
        labels = infer_labels(self.logits_fn(class_names, templates), x, cfg, (rgb.height, rgb.width))
        return labels[0].cpu().numpy().astype(np.int64, copy=False)


class Segmenter(ZeroShotSegmenter, SegmenterHubMixin):
    """The trained student + text classifier: `Segmenter.from_checkpoint(path).predict(image, names)`.

    Shareable through huggingface_hub's mixin: `save_pretrained(dir)` writes the checkpoint (safetensors weights
    with the config inside), `config.json` and a model card; `from_pretrained(dir_or_hub_id)` reads them back,
    from a local folder without any network access.
    """

    def __init__(
        self,
        student: Student,
        text_encoder: Teacher,
        config: Config,
        device: torch.device | None = None,
        meta: dict[str, str] | None = None,
    ) -> None:
        device = resolve_device(device)
        super().__init__(text_encoder, config.method.alpha, config.eval, device)
        self.student = student.to(device).eval()
        self.config = config
        self.embed_dim = config.student.embed_dim
        # What the training run recorded beside the weights: step, teacher identity, class names, unseen names.
        self.meta = dict(meta or {})

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        teacher_weights: str | None = None,
        text_encoder: Teacher | None = None,
    ) -> Segmenter:
        """Rebuild the student from a checkpoint; the text side comes from the checkpoint's CLIP config.

        ``teacher_weights`` points the text encoder at local CLIP weights when the checkpoint names a hub tag.
        The checkpoint's own tag is read from the local Hugging Face cache only; a tag given as ``teacher_weights``
        may be downloaded.
        """
        device = resolve_device(device)
        ckpt = load_checkpoint(path)
        cfg = ckpt.config
        # The checkpoint holds every weight: never fetch the encoder's initial weights again (offline, or slow).
        student = build_student(dataclasses.replace(cfg.student, weights=None), for_training=False)
        try:
            missing, unexpected = student.load_state_dict(ckpt.state_dict, strict=False)
            problem = (
                f"{len(missing)} missing and {len(unexpected)} unexpected weights "
                f"(e.g. {(missing or unexpected)[:3]})"
                if missing or unexpected
                else ""
            )
        except RuntimeError as err:  # shape mismatches
            problem = str(err).strip().splitlines()[-1].strip()
        if problem:
            raise CheckpointError(
                f"{path} does not match its config's student {cfg.student.arch}/{cfg.student.encoder}: {problem}"
            )
        if text_encoder is None:
            if teacher_weights is not None:
                cfg.teacher.weights = teacher_weights
            # The file's own teacher settings never reach the network; weights the caller names may.
            text_encoder = build_teacher(cfg.teacher, device=device, download=teacher_weights is not None)
        return cls(student, text_encoder, cfg, device, meta=ckpt.meta)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(images)


class TrainingFreeSegmenter(ZeroShotSegmenter):
    """Training-free baseline: one recipe's dense tokens (`clipzss.models.recipes.BASELINES`) against the text.

    The tokens take the recipe's released last block (``teacher.encode_image(dense=recipe)``) whatever the
    teacher's own ``dense`` setting for pseudo labels, and NACLIP's σ is ``teacher.cfg.naclip_std``. Without an
    ``eval_cfg`` the images are fed as the recipe's released code feeds them (short side, sliding windows:
    `clipzss.models.recipes.baseline_eval_config`); MaskCLIP keeps this project's protocol.
    """

    def __init__(
        self,
        teacher: CLIPTeacher,
        eval_cfg: EvalConfig | None = None,
        alpha: float = 1 / 0.07,
        recipe: str = "maskclip",
    ) -> None:
        check_baseline(recipe)
        super().__init__(teacher, alpha, eval_cfg or baseline_eval_config(recipe), teacher.device)
        self.teacher = teacher
        self.recipe = recipe

    @property
    def title(self) -> str:
        """The recipe's name as its authors write it, e.g. "ClearCLIP"."""
        return BASELINE_TITLES[self.recipe]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        # The image (or window) is encoded at its own size, positional embedding interpolated, as the recipes do.
        patch = self.teacher.patch_size
        h, w = images.shape[-2:]
        size = (max(patch, round(h / patch) * patch), max(patch, round(w / patch) * patch))
        return self.teacher.encode_image(images, size=size, dense=self.recipe)[1]


# The name of the baseline class before the recipes other than MaskCLIP existed; it still builds MaskCLIP.
MaskCLIPSegmenter = TrainingFreeSegmenter
