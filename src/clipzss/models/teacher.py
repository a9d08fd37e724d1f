"""The frozen CLIP teacher: a CLS embedding and dense tokens per image, and text embeddings per class.

The dense tokens come from CLIP's last block changed as one training-free recipe's released code changes it
(``teacher.dense``: ClearCLIP, SCLIP, NACLIP, MaskCLIP, or the bare value path; `clipzss.models.recipes`).

Training and evaluation depend only on the :class:`Teacher` protocol; :class:`CLIPTeacher` wraps an open_clip
ViT built by :func:`build_teacher` from a :class:`~clipzss.config.TeacherConfig`. Weights come from a local file,
an open_clip tag (only when the hub is reachable or the file is already in the Hugging Face cache), or a fixed-seed
random init. Text embeddings are cached in memory and on disk because the student's classifier is made of them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import typing
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from einops import rearrange
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from clipzss import hub
from clipzss.config import IMAGENET_MEAN, IMAGENET_STD, TeacherConfig, check_field
from clipzss.errors import OfflineError, UsageError
from clipzss.messages import did_you_mean, shorten
from clipzss.models.recipes import DENSE_PATHS, check_dense
from clipzss.models.text_cache import read_text_cache, text_cache_dir, write_text_cache
from clipzss.names import parse_class_names
from clipzss.runtime import resolve_device

logger = logging.getLogger(__name__)

# Seed of the random teacher (weights="none"): fixed so that every process builds the same weights, and so a
# checkpoint trained against a random teacher stays reproducible.
RANDOM_TEACHER_SEED = 0
TEXT_CHUNK = 256  # prompts per text-encoder batch
# The disk cache keeps this many class lists (each a small file): every new list a demo user types adds one.
TEXT_CACHE_FILES = 256
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz")
_HOW_TO_GET_WEIGHTS = (
    "give a local file with teacher.weights=/path/to/file, use an open_clip tag on a machine that reaches the "
    "Hugging Face hub (the download is cached for offline use), or set teacher.weights=none for a random teacher"
)


@typing.runtime_checkable
class Teacher(typing.Protocol):
    """What training and evaluation need from a teacher; any object with these members works."""

    embed_dim: int

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) normalised the student's way → (CLS (B, C), dense (B, C, h, w)), L2-normalised."""
        ...

    def text_embeddings(self, class_names: Sequence[str]) -> torch.Tensor:
        """Class names → (K, C) L2-normalised text embeddings."""
        ...


class FrozenModule(nn.Module):
    """A module that stays frozen after `freeze`: gradients off, and eval mode whatever `train()` is asked, so a
    parent module's `train()` cannot switch on dropout or BatchNorm updates in it. Every teacher is one."""

    def freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenModule:
        """Stay in eval mode whatever is asked: the module is frozen."""
        return super().train(False)


@dataclass(frozen=True)
class _Weights:
    """Where the teacher weights come from, resolved before the model is built."""

    kind: str  # none | file | tag
    path: str | None  # the file to load (file, or a tag's resolved checkpoint)
    key: str  # identity of the weights inside the text-cache key
    label: str  # short human name for `identity`
    quick_gelu: bool = False
    mean: tuple[float, ...] = OPENAI_DATASET_MEAN
    std: tuple[float, ...] = OPENAI_DATASET_STD


def renormalize(
    images: torch.Tensor,
    mean_in: Sequence[float],
    std_in: Sequence[float],
    mean_out: Sequence[float],
    std_out: Sequence[float],
) -> torch.Tensor:
    """Re-express images normalised with (mean_in, std_in) as if normalised with (mean_out, std_out).

    The student and the teacher expect different statistics; undoing one and applying the other is exact, so the
    data pipeline normalises once, the student's way.
    """

    def col(values: Sequence[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)

    pixels = images * col(std_in) + col(mean_in)  # (B, 3, H, W) in [0, 1]
    return (pixels - col(mean_out)) / col(std_out)


class CLIPTeacher(FrozenModule):
    """A frozen open_clip ViT: CLS + dense tokens (``cfg.dense``) from one image pass, and cached text embeddings."""

    def __init__(self, model: nn.Module, cfg: TeacherConfig, weights: _Weights) -> None:
        super().__init__()
        _check_visual_tower(getattr(model, "visual", None), cfg.model)
        check_field(cfg.precision, "teacher.precision")
        _check_dense(cfg.dense)
        _check_naclip_std(cfg.naclip_std)
        self.model = model
        self.cfg = cfg
        self.weights = weights
        visual = model.visual
        preprocess = getattr(visual, "preprocess_cfg", None) or {}
        self.clip_mean = tuple(float(v) for v in preprocess.get("mean", weights.mean))
        self.clip_std = tuple(float(v) for v in preprocess.get("std", weights.std))
        self.embed_dim = int(visual.proj.shape[1])
        self.patch_size = int(visual.patch_size[0])
        self.native_grid = (int(visual.grid_size[0]), int(visual.grid_size[1]))
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}
        self._text_cache: dict[str, torch.Tensor] = {}
        self._tokenizer: Any = None
        self.freeze()

    # ------------------------------------------------------------------ module plumbing
    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> CLIPTeacher:
        # .to()/.cuda() move the parameters; cached position embeddings must follow, so drop them.
        self._pos_cache.clear()
        return super()._apply(fn, *args, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.visual.proj.device

    @property
    def identity(self) -> str:
        """Short name of model + weights, stored in checkpoints (e.g. ``ViT-B-16/openai``)."""
        name = f"{self.cfg.model}/{self.weights.label}"
        if self.cfg.model_overrides:
            overrides = json.dumps(self.cfg.model_overrides, sort_keys=True, default=str)
            name += f"+overrides:{hashlib.sha256(overrides.encode()).hexdigest()[:8]}"
        return name

    def _autocast(self) -> AbstractContextManager[Any]:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.precision)
        if self.cfg.precision == "auto" and self.device.type == "cuda":
            dtype = torch.bfloat16
        if dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    # ------------------------------------------------------------------ image side
    def forward(
        self, images: torch.Tensor, size: int | tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images, size)

    def interpolated_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        """The positional embedding (1 + h·w, width) for a token grid, bicubic over the grid, class slot kept.

        Cached per grid size: training calls it with the same grid every step.
        """
        grid = (int(grid[0]), int(grid[1]))
        pos = self.model.visual.positional_embedding  # (1 + h0·w0, width)
        if grid == self.native_grid:
            return pos
        if grid not in self._pos_cache:
            h0, w0 = self.native_grid
            cls_pos, patch_pos = pos[:1], pos[1:]
            patch_pos = rearrange(patch_pos.float(), "(h w) c -> 1 c h w", h=h0, w=w0)
            patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False)
            patch_pos = rearrange(patch_pos, "1 c h w -> (h w) c").to(pos.dtype)
            self._pos_cache[grid] = torch.cat([cls_pos, patch_pos], dim=0)
        return self._pos_cache[grid]

    def _target_size(self, size: int | tuple[int, int] | None) -> tuple[int, int]:
        if size is None:
            size = self.cfg.image_size
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        # A multiple of the patch so that no border pixels fall outside the token grid.
        p = self.patch_size
        return max(p, round(h / p) * p), max(p, round(w / p) * p)

    def to_clip_input(self, images: torch.Tensor) -> torch.Tensor:
        """Student-normalised images → the teacher's own normalisation (exact affine map)."""
        return renormalize(images, IMAGENET_MEAN, IMAGENET_STD, self.clip_mean, self.clip_std)

    @torch.no_grad()
    def encode_image(
        self, images: torch.Tensor, size: int | tuple[int, int] | None = None, dense: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of the vision tower → CLS (B, C) and dense tokens (B, C, h, w), float32, normalised.

        Args:
            images: (B, 3, H, W) normalised with IMAGENET_MEAN/STD, as the student sees them.
            size: resize target: None = cfg.image_size square, an int = square, (h, w) as given (rounded to a
                multiple of the patch size); the positional embedding is interpolated to the resulting grid.
            dense: the dense path, one of `clipzss.models.recipes.DENSE_PATHS` (:func:`_dense_path`); None = ``cfg.dense``.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"teacher images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        dense_mode = self.cfg.dense if dense is None else dense
        _check_dense(dense_mode)
        x = self.to_clip_input(images.to(self.device, torch.float32))
        target = self._target_size(size)
        if tuple(x.shape[-2:]) != target:
            x = F.interpolate(x, size=target, mode="bilinear", align_corners=False, antialias=True)
        visual = self.model.visual
        with self._autocast():
            tokens = visual.conv1(x)  # (B, width, h, w)
            grid = (tokens.shape[-2], tokens.shape[-1])
            tokens = rearrange(tokens, "b c h w -> b (h w) c")
            cls_token = visual.class_embedding.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
            tokens = torch.cat([cls_token, tokens], dim=1) + self.interpolated_pos_embed(grid).to(
                tokens.dtype
            )
            tokens = visual.ln_pre(visual.patch_dropout(tokens))  # (B, 1 + h·w, width)

            blocks = visual.transformer.resblocks
            batch_first = getattr(visual.transformer, "batch_first", True)
            h = tokens if batch_first else tokens.transpose(0, 1)
            for block in blocks[:-1]:
                h = block(h)
            if not batch_first:
                h = h.transpose(0, 1)  # (B, 1 + h·w, width)
            # (B, width), (B, 1 + h·w, width)
            cls, tokens = _last_block(blocks[-1], h, dense_mode, grid, self.cfg.naclip_std)

            cls = visual.ln_post(cls) @ visual.proj  # (B, C)
            patches = visual.ln_post(tokens[:, 1:]) @ visual.proj  # (B, h·w, C)
        cls = F.normalize(cls.float(), dim=-1)
        patches = F.normalize(patches.float(), dim=-1)
        return cls, rearrange(patches, "b (h w) c -> b c h w", h=grid[0], w=grid[1])

    # ------------------------------------------------------------------ text side
    def text_embeddings(
        self, class_names: Sequence[str], templates: Sequence[str] | None = None
    ) -> torch.Tensor:
        """(K, C) float32 normalised class embeddings: the prompt-template ensemble, averaged and renormalised.

        Cached in memory and on disk (:mod:`clipzss.models.text_cache`, under cfg.cache_dir): the student's classifier is
        these rows, and recomputing 15 prompts × 171 classes at every evaluation is wasted work.
        """
        names = _check_class_names(class_names)
        templates = tuple(self.cfg.templates if templates is None else templates)
        _check_templates(templates)
        key = self._text_cache_key(names, templates)
        if key not in self._text_cache:
            path = text_cache_dir(self.cfg) / f"{key}.safetensors"
            emb = read_text_cache(path, len(names), self.embed_dim)
            if emb is None:
                emb = self._encode_classes(names, templates).cpu()
                metadata = {"model": self.identity, "classes": str(len(names))}
                write_text_cache(path, emb, metadata, keep=TEXT_CACHE_FILES)
            self._text_cache[key] = emb
        return self._text_cache[key].clone().to(self.device)

    def _text_cache_key(self, names: tuple[str, ...], templates: tuple[str, ...]) -> str:
        payload = {
            "version": 1,
            "model": self.cfg.model,
            "weights": self.weights.key,
            "overrides": self.cfg.model_overrides,
            "templates": list(templates),
            "names": list(names),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts → (N, context_length) token ids with the model's own tokenizer (the BPE vocab ships with open_clip)."""
        if self._tokenizer is None:
            context = getattr(self.model, "context_length", None)
            self._tokenizer = open_clip.get_tokenizer(self.cfg.model, context_length=context)
        return self._tokenizer(list(prompts))

    @torch.no_grad()
    def _encode_classes(self, names: tuple[str, ...], templates: tuple[str, ...]) -> torch.Tensor:
        # Text runs in fp32 even under bf16 image precision: it is computed once, cached, and becomes the classifier.
        prompts = [template.format(name) for name in names for template in templates]
        chunks = [
            F.normalize(self.model.encode_text(self.tokenize(chunk).to(self.device)).float(), dim=-1)
            for chunk in _chunks(prompts, TEXT_CHUNK)
        ]
        per_prompt = torch.cat(chunks).view(len(names), len(templates), -1)  # (K, T, C)
        return F.normalize(per_prompt.mean(dim=1), dim=-1)  # (K, C)


# ---------------------------------------------------------------------- building
def build_teacher(
    cfg: TeacherConfig, device: str | torch.device | None = None, *, download: bool = True
) -> CLIPTeacher:
    """Build the frozen teacher from its config; never touches the network unless a tag must be downloaded.

    ``download=False`` is for a config from someone else's file (a checkpoint's): a tag's weights come from the
    local cache only, and a model whose text tower or tokenizer open_clip fetches from the hub is refused.

    Raises:
        ValueError: unknown model, tag, precision or an unsupported vision tower; with ``download=False``, a
            model that needs the hub.
        FileNotFoundError: `cfg.weights` looks like a path that does not exist.
        OfflineError: a tag's weights are neither cached nor downloadable (offline), or not cached and
            ``download`` is false.
    """
    check_field(cfg.precision, "teacher.precision")
    _check_dense(cfg.dense)
    _check_naclip_std(cfg.naclip_std)
    models = open_clip.list_models()
    if cfg.model not in models:
        hint = did_you_mean(cfg.model, models, n=5, cutoff=0.5) or "see open_clip.list_models()"
        raise UsageError(f"unknown teacher model '{cfg.model}'; {hint}")
    needs_hub = hub_models(cfg) if not download else []
    if needs_hub:
        part, name = needs_hub[0]
        raise UsageError(
            f"teacher.model '{cfg.model}' takes its {part} from the Hugging Face hub model '{name}', and a "
            "checkpoint's config never makes clipzss reach the network; give the text side yourself "
            "(--text-embeddings from `clipzss embed-text`)"
        )
    weights = resolve_weights(cfg, download=download)
    if weights.kind == "none":
        logger.warning(
            "teacher '%s' has RANDOM weights (teacher.weights=none, seed %d): zero-shot results with a random "
            "teacher are meaningless; use it for tests and smoke runs only",
            cfg.model,
            RANDOM_TEACHER_SEED,
        )
    return CLIPTeacher(_create_clip(cfg, weights), cfg, weights).to(resolve_device(device))


def _create_clip(cfg: TeacherConfig, weights: _Weights) -> nn.Module:
    """open_clip's ``cfg.model`` with ``weights`` loaded, or initialised from `RANDOM_TEACHER_SEED` (leaving the
    caller's RNG alone) when there are none; every way the build fails is one UsageError line."""
    random_init = weights.kind == "none"
    if random_init:
        source: dict[str, Any] = {"pretrained": None}
    else:
        source = {
            "pretrained": weights.path,
            "force_quick_gelu": weights.quick_gelu,
            "force_preprocess_cfg": {"mean": weights.mean, "std": weights.std},
        }
    with _seeded(RANDOM_TEACHER_SEED) if random_init else nullcontext():
        try:
            return open_clip.create_model(cfg.model, **source, **dict(cfg.model_overrides))
        except TypeError as err:  # an override keyword open_clip does not take
            raise UsageError(
                f"teacher.model_overrides do not fit open_clip's '{cfg.model}': {shorten(str(err), 300)}"
            ) from None
        except (RuntimeError, KeyError) as err:
            if random_init:
                raise
            reason = " ".join(str(err).split())  # torch's load_state_dict message spans lines
            raise UsageError(
                f"teacher weights {weights.path} do not fit model '{cfg.model}': {reason}"
            ) from err
        except Exception as err:  # unpickling, safetensors and truncated files raise many types: not weights
            if random_init:
                raise
            raise UsageError(
                f"cannot read teacher weights {weights.path}: {_unreadable_reason(err)}"
            ) from None


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """The CPU RNG seeded with ``seed`` inside, and as it was outside."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _unreadable_reason(err: Exception) -> str:
    """One line saying why a weights file could not be read (torch's refusal of a pickle spans a page)."""
    import pickle

    if isinstance(err, pickle.UnpicklingError):
        if "allowed global" in str(err) or "GLOBAL" in str(err):
            return (
                "it is a pickle that holds more than tensors, refused because unpickling it could run code "
                "(save the state dict as .safetensors)"
            )
        return (
            "not a PyTorch weights file that loads as tensors alone (corrupt, or a pickle of other objects)"
        )
    if isinstance(err, EOFError):
        return "the file is empty or truncated"
    reason = " ".join(str(err).split()) or type(err).__name__
    return f"not a readable weights file ({type(err).__name__}: {shorten(reason)})"


def hub_models(cfg: TeacherConfig) -> list[tuple[str, str]]:
    """``(field, hub model)`` for each part of the model that open_clip builds from a Hugging Face hub model (a
    transformers text tower or tokenizer, e.g. roberta-ViT-B-32's 'roberta-base'), even with random weights."""
    text = dict((open_clip.get_model_config(cfg.model) or {}).get("text_cfg") or {})
    overrides = cfg.model_overrides.get("text_cfg")
    if isinstance(overrides, dict):
        text.update(overrides)
    return [
        (f"text_cfg.{key}", str(text[key])) for key in ("hf_model_name", "hf_tokenizer_name") if text.get(key)
    ]


def resolve_weights(cfg: TeacherConfig, download: bool = True) -> _Weights:
    """Decide what `cfg.weights` means (random, local file, or open_clip tag) and locate the file to load.

    ``download=False``: a tag's file from the local Hugging Face cache only (see `build_teacher`).
    """
    spec = cfg.weights.strip()
    if spec.lower() == "none":
        return _Weights("none", None, f"none:seed={RANDOM_TEACHER_SEED}", f"none(seed={RANDOM_TEACHER_SEED})")
    path = Path(spec).expanduser()
    if path.is_file():
        stat = path.stat()
        key = f"file:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        return _Weights("file", str(path), key, f"file:{path.name}")
    if _looks_like_path(spec):
        raise FileNotFoundError(f"teacher weights file not found: {path}; {_HOW_TO_GET_WEIGHTS}")
    tags = open_clip.list_pretrained_tags_by_model(cfg.model)
    tag = spec.lower().replace("-", "_")
    if tag not in tags:
        valid = ", ".join(tags) if tags else "none for this model"
        raise UsageError(
            f"unknown teacher weights '{spec}' for {cfg.model}: not a file and not an open_clip tag "
            f"(valid tags: {valid}); {_HOW_TO_GET_WEIGHTS}"
        )
    pretrained = open_clip.get_pretrained_cfg(cfg.model, tag)
    return _Weights(
        "tag",
        _tag_checkpoint(cfg.model, tag, pretrained, download),
        f"tag:{tag}",
        tag,
        quick_gelu=bool(pretrained.get("quick_gelu", False)),
        mean=tuple(pretrained.get("mean", OPENAI_DATASET_MEAN)),
        std=tuple(pretrained.get("std", OPENAI_DATASET_STD)),
    )


def _looks_like_path(spec: str) -> bool:
    return (
        any(sep in spec for sep in ("/", "\\"))
        or spec.startswith(("~", "."))
        or spec.lower().endswith(_WEIGHT_SUFFIXES)
    )


def _tag_checkpoint(model: str, tag: str, pretrained: dict[str, Any], download: bool = True) -> str:
    """A local file for an open_clip tag: the Hugging Face cache first, a download only when the hub answers
    (and ``download`` allows it)."""
    if pretrained.get("file"):
        return str(pretrained["file"])
    hub_entry = pretrained.get("hf_hub", "")
    if not hub_entry:
        raise UsageError(
            f"open_clip tag '{tag}' for {model} has no Hugging Face hub entry; {_HOW_TO_GET_WEIGHTS}"
        )
    # open_clip's convention: "org/repo/" = the default weights file, "org/repo/file.pt" = that file.
    repo_id, filename = os.path.split(hub_entry)
    candidates = [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME] if not filename else _safe_first(filename)
    try:
        path = hub.fetch(repo_id, candidates, download=download)
    except hub.NotDownloaded:
        raise OfflineError(
            f"the checkpoint's teacher weights '{tag}' for {model} are not in the Hugging Face cache, and a "
            f"checkpoint's config never makes clipzss download: pass --teacher-weights {tag} to download them "
            "yourself (teacher_weights= in Python), or a local weights file"
        ) from None
    except hub.HubUnavailable as err:
        raise OfflineError(
            f"cannot load teacher weights '{tag}' for {model}: they are not in the Hugging Face cache and {err}; "
            f"{_HOW_TO_GET_WEIGHTS}"
        ) from None
    logger.info("teacher weights %s/%s: %s", model, tag, path)
    return str(path)


def _safe_first(filename: str) -> list[str]:
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def _check_visual_tower(visual: nn.Module | None, model_name: str) -> None:
    """The dense path needs the standard open_clip ViT: class-token pooling, nn.MultiheadAttention blocks."""

    def unsupported(why: str) -> UsageError:
        return UsageError(
            f"teacher model '{model_name}' is not supported: {why}; use a standard open_clip ViT (e.g. ViT-B-16)"
        )

    if not isinstance(visual, VisionTransformer):
        raise unsupported(f"its vision tower is {type(visual).__name__}, not open_clip's VisionTransformer")
    if getattr(visual, "attn_pool", None) is not None:
        raise unsupported("its vision tower pools with attention (attn_pool)")
    if visual.pool_type != "tok":
        raise unsupported(f"its vision tower pools with '{visual.pool_type}', not the class token")
    if visual.proj is None:
        raise unsupported("its vision tower has no output projection")
    if visual.patch_size[0] != visual.patch_size[1]:
        raise unsupported(f"its patches are not square ({visual.patch_size})")
    for block in visual.transformer.resblocks:
        attn = getattr(block, "attn", None)
        if not isinstance(block, ResidualAttentionBlock) or getattr(attn, "in_proj_weight", None) is None:
            raise unsupported(f"its transformer blocks are {type(block).__name__} with a custom attention")


def _value_path(block: nn.Module, x: torch.Tensor, normed: torch.Tensor | None = None) -> torch.Tensor:
    """Dense tokens without attention mixing: ln_1 → value projection → out_proj (→ layer scale).

    Raw last-layer patch tokens are dominated by the global attention; the value path keeps each token local.
    ``normed`` is ``block.ln_1(x)`` when the caller has it already.
    """
    width = x.shape[-1]
    attn = block.attn
    normed = block.ln_1(x) if normed is None else normed
    value = F.linear(normed, attn.in_proj_weight[2 * width :], attn.in_proj_bias[2 * width :])
    return block.ls_1(attn.out_proj(value))


def _recipe_attention(
    block: nn.Module, normed: torch.Tensor, mode: str, grid: tuple[int, int] | None, naclip_std: float
) -> torch.Tensor:
    """The last block's attention as a recipe replaces it: (B, 1 + N, width) → out_proj (→ layer scale).

    Every token attends to every token (class token included) with the block's own projections and heads, scaled
    by head_dim^-0.5 as CLIP's attention is. "clearclip": softmax(q qᵀ); "sclip": softmax(q qᵀ) + softmax(k kᵀ)
    (two normalised maps summed, not renormalised); "naclip": softmax(k kᵀ + ω) with ω the Gaussian neighbourhood
    prior (:func:`neighbourhood_prior`). Fused attention kernels keep the (T, T) maps out of memory.
    """
    attn = block.attn
    q, k, v = F.linear(normed, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (rearrange(t, "b t (h d) -> b h t d", h=attn.num_heads) for t in (q, k, v))
    if mode == "clearclip":
        mixed = F.scaled_dot_product_attention(q, q, v)
    elif mode == "sclip":
        mixed = F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)
    elif mode == "naclip":
        if grid is None:
            raise ValueError("the NACLIP path needs the token grid (h, w)")
        prior = neighbourhood_prior(grid, naclip_std).to(device=k.device, dtype=k.dtype)
        mixed = F.scaled_dot_product_attention(k, k, v, attn_mask=prior)
    else:
        raise ValueError(f"no attention recipe for teacher.dense='{mode}'")
    return block.ls_1(attn.out_proj(rearrange(mixed, "b h t d -> b t (h d)")))


@lru_cache(maxsize=16)
def neighbourhood_prior(grid: tuple[int, int], std: float) -> torch.Tensor:
    """NACLIP's additive attention prior (1 + h·w, 1 + h·w), float64 on the CPU: exp(-d² / 2σ²) between patches.

    d is the distance of two patches on the grid, in patches; rows and columns of the class token are 0 (no
    prior), as in NACLIP's released code. Cached: the grid is the same for every training step.
    """
    h, w = grid
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    rows, cols = rows.flatten(), cols.flatten()
    squared = (rows[:, None] - rows[None]) ** 2 + (cols[:, None] - cols[None]) ** 2  # (h·w, h·w)
    prior = torch.zeros(1 + h * w, 1 + h * w, dtype=torch.float64)
    prior[1:, 1:] = torch.exp(-squared / (2 * std**2))
    return prior


def _dense_path(
    block: nn.Module,
    x: torch.Tensor,
    mode: str,
    normed: torch.Tensor | None = None,
    grid: tuple[int, int] | None = None,
    naclip_std: float = 5.0,
) -> torch.Tensor:
    """The last block's dense tokens (B, 1 + N, width) for ``teacher.dense``, as each recipe's released code.

    "value": :func:`_value_path` alone. "maskclip": MaskCLIP, ``v = x + value; v + mlp(ln_2(v))``. "clearclip"
    and "naclip": their attention (:func:`_recipe_attention`) alone, no residual and no MLP (ClearCLIP's
    ``ignore_residual``, NACLIP's "reduced" block). "sclip": its attention with the residual and MLP kept.
    Layer scales apply where the block has them (CLIP's ViTs have none). ``grid`` is the token grid (h, w).
    """
    _check_dense(mode)
    normed = block.ln_1(x) if normed is None else normed
    if mode in ("value", "maskclip"):
        mixed = _value_path(block, x, normed)
    else:
        mixed = _recipe_attention(block, normed, mode, grid, naclip_std)
    if mode in ("value", "clearclip", "naclip"):
        return mixed
    v = x + mixed
    return v + block.ls_2(block.mlp(block.ln_2(v)))


def _last_block(
    block: nn.Module,
    x: torch.Tensor,
    dense: str = "value",
    grid: tuple[int, int] | None = None,
    naclip_std: float = 5.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The last block's outputs the teacher uses, for batch-first (B, 1 + N, width) input.

    Returns the class token's block output (B, width), computed with the class query alone: the patch tokens'
    own attention outputs are never used (the dense tokens take the ``dense`` path), which saves most of the
    block, about 1/12 of the tower. Equal to ``block(x)[:, 0]`` up to float rounding. And the dense tokens of every
    token (B, 1 + N, width) by :func:`_dense_path`.
    """
    normed = block.ln_1(x)  # (B, 1 + N, width)
    query, keys = normed[:, :1], normed
    if not block.attn.batch_first:
        query, keys = query.transpose(0, 1), keys.transpose(0, 1)
    attended = block.attn(query, keys, keys, need_weights=False)[0]  # (B, 1, width) or (1, B, width)
    if not block.attn.batch_first:
        attended = attended.transpose(0, 1)
    cls = x[:, :1] + block.ls_1(attended)
    cls = cls + block.ls_2(block.mlp(block.ln_2(cls)))
    return cls[:, 0], _dense_path(block, x, dense, normed, grid, naclip_std)


DENSE_MODES = DENSE_PATHS


def _check_dense(mode: str) -> None:
    check_dense(mode)


def _check_naclip_std(std: float) -> None:
    if isinstance(std, bool) or not isinstance(std, int | float) or not math.isfinite(std) or std <= 0:
        raise UsageError(f"teacher.naclip_std={std!r} must be a positive number of patches (NACLIP's is 5)")


# ---------------------------------------------------------------------- text helpers
def _check_class_names(class_names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(class_names, str):
        raise UsageError(f"class_names must be a list of names, got the single string '{class_names}'")
    names = tuple(class_names)
    if not names:
        raise UsageError("class_names is empty; give at least one class name")
    bad = [repr(n) for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise UsageError(f"class names must be non-empty strings; got {', '.join(bad)}")
    parse_class_names(names)  # duplicates, including names CLIP cannot tell apart ("Cat" and "cat")
    return names


def _check_templates(templates: tuple[str, ...]) -> None:
    if not templates:
        raise UsageError("no prompt templates given; each template needs a '{}' for the class name")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise UsageError(f"prompt templates without a '{{}}' for the class name: {bad}")
    for template in templates:  # "{} {1}" or "{name}" would fail inside the text encoder with a traceback
        try:
            template.format("x")
        except (IndexError, KeyError, ValueError) as err:
            raise UsageError(
                f"prompt template {shorten(template, 80)!r} cannot be filled with a class name ({err!r}); use a "
                "single '{}' and write literal braces as '{{' and '}}'"
            ) from None


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
