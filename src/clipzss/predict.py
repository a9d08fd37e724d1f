"""Zero-shot prediction: a student (or, as a baseline, CLIP itself) classifies pixels against text embeddings.

`Segmenter` is the product of training: the student alone embeds the image and CLIP's *text* embeddings of any class
names are its classifier, so inference costs what the closed-set network costs. `MaskCLIPSegmenter` is the
training-free "CLIP at inference" reference (MaskCLIP's dense tokens against the same classifier), kept for speed
and accuracy comparisons. Both share `predict` / `logits_fn`, so evaluation and the CLI treat them alike.
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
from huggingface_hub import ModelCard, ModelHubMixin
from PIL import Image

from clipzss.checkpoint import CheckpointError, load_checkpoint
from clipzss.config import IMAGENET_MEAN, IMAGENET_STD, Config, EvalConfig
from clipzss.evaluate import EvalResult, slide_inference, whole_inference
from clipzss.names import parse_class_names
from clipzss.student import Student, build_student
from clipzss.teacher import CLIPTeacher, Teacher, build_teacher

# Re-exported: drawing lives in the torch-free clipzss.visualize, these names predate it.
from clipzss.visualize import colorize, overlay, palette  # noqa: F401

log = logging.getLogger(__name__)

ImageLike = str | Path | Image.Image | np.ndarray

# Text classifiers kept in memory per segmenter (one per class list and template set); the least recently used
# goes first, so a long-running server asked for ever new class lists keeps a bounded amount of memory.
TEXT_CACHE_SIZE = 64


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto'/None picks CUDA when present; anything else is passed to torch."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_rgb(image: ImageLike) -> Image.Image:
    """Open an image from a path, array or PIL image as EXIF-upright RGB, naming the file when it cannot."""
    from clipzss.data.transforms import load_image

    if isinstance(image, str | Path):
        return load_image(Path(image))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        if image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise ValueError(f"expected an (H, W, 3) image array, got shape {tuple(image.shape)}")
        return Image.fromarray(image[..., :3].astype(np.uint8))
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    raise TypeError(f"cannot read an image from {type(image).__name__}")


def to_tensor(image: Image.Image, short_side: int | None) -> torch.Tensor:
    """PIL RGB → (1, 3, H, W) normalised the student's way, short side resized when asked."""
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
    if short_side:
        h, w = x.shape[-2:]
        scale = short_side / min(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        if size != (h, w):  # resizing to the same size is an exact identity: skip the pass
            x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x - mean) / std)[None]


class PrecomputedText:
    """Text embeddings saved by `clipzss embed-text`: predict with a fixed class list without loading CLIP."""

    def __init__(self, class_names: Sequence[str], embeddings: torch.Tensor, identity: str = "") -> None:
        if embeddings.ndim != 2 or embeddings.shape[0] != len(class_names):
            raise ValueError(
                f"{len(class_names)} class names but embeddings of shape {tuple(embeddings.shape)}"
            )
        self.class_names = list(class_names)
        self.embeddings = F.normalize(embeddings.float(), dim=-1)
        self.embed_dim = int(embeddings.shape[1])
        self.identity = identity

    @classmethod
    def from_teacher(cls, teacher: Teacher, class_names: Sequence[str]) -> PrecomputedText:
        names = parse_class_names(class_names)
        return cls(names, teacher.text_embeddings(names).cpu(), getattr(teacher, "identity", ""))

    def text_embeddings(self, class_names: Sequence[str]) -> torch.Tensor:
        index = {name: i for i, name in enumerate(self.class_names)}
        missing = [n for n in class_names if n not in index]
        if missing:
            raise ValueError(
                f"class names not in the text-embedding file: {', '.join(missing)} "
                f"(it holds: {', '.join(self.class_names)})"
            )
        return self.embeddings[[index[n] for n in class_names]]

    def save(self, path: str | Path) -> None:
        import json

        from safetensors.torch import save_file

        from clipzss.checkpoint import atomic_write

        meta = {"class_names": json.dumps(self.class_names), "teacher": self.identity}
        atomic_write(
            Path(path),
            lambda tmp: save_file({"embeddings": self.embeddings.contiguous()}, str(tmp), metadata=meta),
        )

    @classmethod
    def load(cls, path: str | Path) -> PrecomputedText:
        import json

        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"text-embedding file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                embeddings = handle.get_tensor("embeddings")
            names = json.loads(meta["class_names"])
        except Exception as err:
            raise ValueError(
                f"{path} is not a text-embedding file written by `clipzss embed-text` ({err})"
            ) from None
        return cls(names, embeddings, meta.get("teacher", ""))


class LRUCache(MutableMapping):
    """A mapping that keeps its ``max_size`` most recently used entries and drops the oldest beyond that."""

    def __init__(self, max_size: int = TEXT_CACHE_SIZE) -> None:
        if max_size < 1:
            raise ValueError(f"a cache needs room for at least one entry, got max_size={max_size}")
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
                raise ValueError(
                    f"prompt templates cannot be changed with a {type(self.text_encoder).__name__} text encoder "
                    "(precomputed embeddings); load CLIP to use other templates"
                )
            self._text_cache[key] = text.to(self.device)
        return self._text_cache[key]

    @torch.no_grad()
    def logits(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) logits at the embedding resolution: K-channel maps are upsampled, never C-channel ones.

        α·cos(R, T) as one (K, C) @ (C, h·w) matmul divided by ‖R‖ per pixel, never normalising the C-channel map
        itself, and returned channels last in memory: the upsampling and the argmax over K that follow then run
        several times faster on the CPU than on contiguous (B, K, h, w) maps. The values equal
        ``α·einsum(normalize(R), T)`` up to float rounding.
        """
        emb = self.embed(images.to(self.device)).float()  # (B, C, h, w)
        batch, _, height, width = emb.shape
        flat = emb.flatten(2)  # (B, C, h·w)
        norm = (flat * flat).sum(dim=1, keepdim=True).sqrt_().clamp_min_(1e-12)  # (B, 1, h·w), as F.normalize
        logits = torch.matmul(self.alpha * text.to(flat), flat).div_(norm)  # (B, K, h·w)
        return logits.view(batch, -1, height, width).contiguous(memory_format=torch.channels_last)

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
        rgb = load_rgb(image)
        x = to_tensor(rgb, self.eval_cfg.short_side).to(self.device)
        fn = self.logits_fn(class_names, templates)
        out_size = (rgb.height, rgb.width)
        mode = mode or self.eval_cfg.mode
        if mode == "slide":
            logits = slide_inference(fn, x, self.eval_cfg.crop_size, self.eval_cfg.stride, out_size=out_size)
        elif mode == "whole":
            logits = whole_inference(fn, x, out_size)
        else:
            raise ValueError(f"unknown inference mode '{mode}'; choose 'slide' or 'whole'")
        return logits.argmax(dim=1)[0].cpu().numpy().astype(np.int64)


class Segmenter(
    ZeroShotSegmenter,
    ModelHubMixin,
    library_name="clipzss",
    pipeline_tag="image-segmentation",
    tags=["clipzss", "zero-shot-segmentation", "open-vocabulary-segmentation", "clip"],
):
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
        """
        device = resolve_device(device)
        ckpt = load_checkpoint(path)
        cfg = ckpt.config
        # The checkpoint holds every weight: never fetch the encoder's initial weights again (offline, or slow).
        student = build_student(dataclasses.replace(cfg.student, weights=None))
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
            text_encoder = build_teacher(cfg.teacher, device=device)
        return cls(student, text_encoder, cfg, device, meta=ckpt.meta)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(images)

    # --- sharing (huggingface_hub) ---------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        eval_results: EvalResult | None = None,
        model_card_kwargs: dict[str, object] | None = None,
        **hub_kwargs: object,
    ) -> str | None:
        """Write model.safetensors (weights + config), config.yaml, config.json and a model card (README.md).

        ``eval_results`` (from `clipzss.evaluate.evaluate`) go into the card's tables and its model-index; an
        existing README.md in the folder is replaced. ``push_to_hub=True, repo_id=...`` also uploads the folder
        (needs the network and a token).
        """
        card = {"eval_results": eval_results, **(model_card_kwargs or {})}
        return super().save_pretrained(save_directory, model_card_kwargs=card, **hub_kwargs)

    def push_to_hub(
        self, repo_id: str, *, eval_results: EvalResult | None = None, **hub_kwargs: object
    ) -> str:
        """Upload what `save_pretrained` writes to the hub repository ``repo_id`` (created when missing)."""
        card = {"eval_results": eval_results, **(hub_kwargs.pop("model_card_kwargs", None) or {})}
        return super().push_to_hub(repo_id, model_card_kwargs=card, **hub_kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        import json

        from clipzss.checkpoint import FORMAT, save_checkpoint

        save_checkpoint(save_directory, self.student.state_dict(), self.config, **self.meta)
        payload = {"format": FORMAT, "clipzss_config": self.config.to_dict(), "training": self.meta}
        (save_directory / "config.json").write_text(json.dumps(payload, indent=2) + "\n")
        (save_directory / "README.md").unlink(missing_ok=True)  # the mixin writes a card only where none is

    def generate_model_card(self, eval_results: EvalResult | None = None, **_: object) -> ModelCard:
        """The card the hub shows: how to use the model, how it was trained, and how it scored."""
        return model_card(self.config, self.meta, eval_results)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        device: str | torch.device | None = None,
        teacher_weights: str | None = None,
        text_encoder: Teacher | None = None,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
    ) -> Segmenter:
        """Load a folder written by `save_pretrained` (no network), or a hub repo id such as ``"user/model"``.

        The text side is rebuilt from the saved CLIP config as in `from_checkpoint`; ``teacher_weights`` points it
        at local CLIP weights, ``text_encoder`` replaces it (e.g. a `PrecomputedText`).
        """
        from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

        source = str(pretrained_model_name_or_path)
        local = Path(source).expanduser()
        if local.is_file():
            return cls.from_checkpoint(local, device, teacher_weights, text_encoder)
        if not local.is_dir() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
            raise FileNotFoundError(f"no saved model folder at {source}")
        try:
            return super().from_pretrained(
                str(local) if local.is_dir() else source,
                force_download=force_download,
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                revision=revision,
                device=device,
                teacher_weights=teacher_weights,
                text_encoder=text_encoder,
            )
        except (HFValidationError, LocalEntryNotFoundError, HfHubHTTPError) as err:
            reason = str(err).strip().splitlines()[0]
            raise FileNotFoundError(
                f"'{source}' is neither a local model folder nor a reachable hub repository ({reason})"
            ) from None

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        device: str | torch.device | None = None,
        teacher_weights: str | None = None,
        text_encoder: Teacher | None = None,
        **_config_json: object,  # the mixin passes config.json as `config`; the weights file's copy counts
    ) -> Segmenter:
        from huggingface_hub import hf_hub_download

        from clipzss.checkpoint import CHECKPOINT_NAME

        if Path(model_id).is_dir():
            path = Path(model_id) / CHECKPOINT_NAME
        else:
            path = hf_hub_download(
                repo_id=model_id,
                filename=CHECKPOINT_NAME,
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                token=token,
                local_files_only=local_files_only,
            )
        return cls.from_checkpoint(path, device, teacher_weights, text_encoder)


class MaskCLIPSegmenter(ZeroShotSegmenter):
    """Training-free baseline: MaskCLIP (Zhou et al., ECCV 2022) as released, its dense tokens against the text.

    The tokens take MaskCLIP's released last-block path (residual and MLP kept, ``teacher.dense="maskclip"``)
    whatever the teacher's own ``dense`` setting for pseudo labels; ``dense`` chooses another path.
    """

    def __init__(
        self,
        teacher: CLIPTeacher,
        eval_cfg: EvalConfig | None = None,
        alpha: float = 1 / 0.07,
        dense: str = "maskclip",
    ) -> None:
        super().__init__(teacher, alpha, eval_cfg or EvalConfig(), teacher.device)
        self.teacher = teacher
        self.dense = dense

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        # The image is encoded at its own size (positional embedding interpolated), as MaskCLIP does.
        patch = self.teacher.patch_size
        h, w = images.shape[-2:]
        size = (max(patch, round(h / patch) * patch), max(patch, round(w / patch) * patch))
        return self.teacher.encode_image(images, size=size, dense=self.dense)[1]


# --- model card -------------------------------------------------------------------------------------------------

_CARD_METRICS = ("pAcc", "mIoU(S)", "mIoU(U)", "hIoU", "mIoU")


def _card_number(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, float) and value == value else "-"


def model_card(config: Config, meta: dict[str, str], eval_results: EvalResult | None = None) -> ModelCard:
    """A model card from the training config (and evaluation results when given), with a hub model-index.

    Local paths (data root, teacher weights file) are reduced to their last component: a card is for sharing.
    """
    import yaml
    from huggingface_hub import EvalResult as HubEvalResult
    from huggingface_hub import ModelCardData

    data, teacher, student, train = config.data, config.teacher, config.student, config.train
    dataset = data.eval_dataset or data.dataset
    names = [n for n in meta.get("class_names", "").split(",") if n]
    unseen = [n for n in meta.get("unseen", "").split(",") if n]
    teacher_weights = Path(teacher.weights).name if teacher.weights else "none"
    off = [f.name for f in dataclasses.fields(config.method) if getattr(config.method, f.name) is False]
    model_name = f"clipzss-{student.arch}-{student.encoder}".lower()
    hub_results = None
    if eval_results is not None:
        hub_results = [
            HubEvalResult(
                task_type="image-segmentation",
                dataset_type=dataset,
                dataset_name=dataset,
                metric_type=key,
                metric_value=round(eval_results.metrics[key], 2),
            )
            for key in _CARD_METRICS
            if isinstance(eval_results.metrics.get(key), float)
            and eval_results.metrics[key] == eval_results.metrics[key]
        ]
    card_data = ModelCardData(
        library_name="clipzss",
        pipeline_tag="image-segmentation",
        tags=["clipzss", "zero-shot-segmentation", "open-vocabulary-segmentation", "clip", "model_hub_mixin"],
        model_name=model_name,
        eval_results=hub_results or None,
    )
    example = ", ".join(f'"{n}"' for n in (names or ["cat", "grass", "sky"])[:4])
    lines = [
        f"# {model_name}",
        "",
        f"A [CLIP-ZSS](https://arxiv.org/abs/2310.02296) student: a {student.arch} / {student.encoder} network trained "
        f"with a frozen CLIP {teacher.model} teacher. At inference the student alone embeds the image and CLIP's text "
        "embeddings of any class names are its classifier, so it segments classes it never saw labelled.",
        "",
        "## Use",
        "",
        "```python",
        "from clipzss import Segmenter",
        "",
        'segmenter = Segmenter.from_pretrained("path/to/this/folder")  # or a hub id; works offline from a folder',
        f'mask = segmenter.predict("photo.jpg", [{example}])  # (H, W) class ids',
        "```",
        "",
        f"The text classifier needs the CLIP {teacher.model} text tower (`teacher_weights=` a local weights file, or "
        "precomputed embeddings from `clipzss embed-text` as `text_encoder=`).",
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        f"| dataset | {data.dataset} (train split `{data.train_split}`) |",
        f"| classes | {len(names) or '?'}: {', '.join(names) or 'not recorded'} |",
        f"| unseen (never labelled) | {', '.join(unseen) or 'none'} |",
        f"| student | {student.arch} / {student.encoder}, {student.embed_dim}-d embeddings at stride 4 |",
        f"| teacher | CLIP {teacher.model} ({teacher_weights}), input {teacher.image_size} px |",
        f"| schedule | {train.max_iters} iterations × batch {train.batch_size}, crop {data.crop_size}, lr {train.lr:g} |",
        f"| steps done | {meta.get('step', '?')} |",
        f"| switched off (ablations) | {', '.join(off) or 'none'} |",
        f"| inference | {config.eval.mode}, short side {config.eval.short_side}, crop {config.eval.crop_size} |",
        "",
        "## Evaluation",
        "",
    ]
    if eval_results is None:
        lines += ["No evaluation results were given when this model was saved.", ""]
    else:
        m = eval_results.metrics
        lines += [
            f"{dataset}, {eval_results.num_images} images, every class predicted jointly (generalised zero-shot).",
            "",
            "| " + " | ".join(_CARD_METRICS) + " |",
            "|" + "---|" * len(_CARD_METRICS),
            "| " + " | ".join(_card_number(m.get(k)) for k in _CARD_METRICS) + " |",
            "",
            "| class | split | IoU | Acc |",
            "|---|---|---|---|",
            *(
                f"| {row['name']} | {row['split']} | {_card_number(row['IoU'])} | {_card_number(row['Acc'])} |"
                for row in eval_results.per_class
            ),
            "",
        ]
    plain = config.to_dict()
    plain["data"]["root"] = Path(data.root).name if data.root else ""
    if plain["data"].get("eval_root"):
        plain["data"]["eval_root"] = Path(plain["data"]["eval_root"]).name
    plain["teacher"]["weights"] = teacher_weights
    plain["teacher"]["cache_dir"] = None
    plain["train"]["output_dir"] = Path(train.output_dir).name
    lines += [
        "<details><summary>Full training config</summary>",
        "",
        "```yaml",
        yaml.safe_dump(plain, sort_keys=False).rstrip(),
        "```",
        "",
        "</details>",
        "",
    ]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))
