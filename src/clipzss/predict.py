"""Zero-shot prediction: a student (or, as a baseline, CLIP itself) classifies pixels against text embeddings.

`Segmenter` is the product of training: the student alone embeds the image and CLIP's *text* embeddings of any class
names are its classifier, so inference costs what the closed-set network costs. `MaskCLIPSegmenter` is the
training-free "CLIP at inference" reference (MaskCLIP's dense tokens against the same classifier), kept for speed
and accuracy comparisons. Both share `predict` / `logits_fn`, so evaluation and the CLI treat them alike.
"""

from __future__ import annotations

import colorsys
import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from clipzss.checkpoint import CheckpointError, load_checkpoint
from clipzss.config import IMAGENET_MEAN, IMAGENET_STD, Config, EvalConfig
from clipzss.evaluate import slide_inference, whole_inference
from clipzss.student import Student, build_student
from clipzss.teacher import CLIPTeacher, Teacher, build_teacher

log = logging.getLogger(__name__)

ImageLike = str | Path | Image.Image | np.ndarray


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto'/None picks CUDA when present; anything else is passed to torch."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def parse_class_names(text: str | Sequence[str]) -> list[str]:
    """Split a comma-separated list (or clean a sequence) and reject empty or duplicate names."""
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else [str(n).strip() for n in text]
    if not names or all(not n for n in names):
        raise ValueError("the class list is empty: give at least one class name, e.g. --classes 'cat,grass'")
    if any(not n for n in names):
        raise ValueError(f"the class list {list(names)} contains an empty name (a stray comma?)")
    seen: set[str] = set()
    dupes = sorted({n for n in names if n in seen or seen.add(n)})
    if dupes:
        raise ValueError(f"duplicate class names: {', '.join(dupes)}")
    return names


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


class ZeroShotSegmenter:
    """Pixels classified by α·cos(dense embedding, text embedding); subclasses say where embeddings come from."""

    def __init__(
        self, text_encoder: Teacher, alpha: float, eval_cfg: EvalConfig, device: torch.device
    ) -> None:
        self.text_encoder = text_encoder
        self.alpha = alpha
        self.eval_cfg = eval_cfg
        self.device = device
        self._text_cache: dict[tuple[str, ...], torch.Tensor] = {}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images → (B, C, h, w) dense embeddings."""
        raise NotImplementedError

    def text_classifier(self, class_names: Sequence[str]) -> torch.Tensor:
        """(K, C) normalised text embeddings, computed once per class list."""
        key = tuple(parse_class_names(class_names))
        if key not in self._text_cache:
            self._text_cache[key] = self.text_encoder.text_embeddings(list(key)).to(self.device)
        return self._text_cache[key]

    @torch.no_grad()
    def logits(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) logits at the embedding resolution: K-channel maps are upsampled, never C-channel ones."""
        emb = F.normalize(self.embed(images.to(self.device)).float(), dim=1)  # (B, C, h, w)
        return self.alpha * torch.einsum("bchw,kc->bkhw", emb, text.to(emb))

    def logits_fn(self, class_names: Sequence[str]) -> Callable[[torch.Tensor], torch.Tensor]:
        text = self.text_classifier(class_names)
        return lambda images: self.logits(images, text)

    @torch.no_grad()
    def predict(self, image: ImageLike, class_names: Sequence[str], mode: str | None = None) -> np.ndarray:
        """Segment one image with any class names → (H, W) int64 ids into ``class_names``, at the input's size."""
        rgb = load_rgb(image)
        x = to_tensor(rgb, self.eval_cfg.short_side).to(self.device)
        fn = self.logits_fn(class_names)
        out_size = (rgb.height, rgb.width)
        mode = mode or self.eval_cfg.mode
        if mode == "slide":
            logits = slide_inference(fn, x, self.eval_cfg.crop_size, self.eval_cfg.stride, out_size=out_size)
        elif mode == "whole":
            logits = whole_inference(fn, x, out_size)
        else:
            raise ValueError(f"unknown inference mode '{mode}'; choose 'slide' or 'whole'")
        return logits.argmax(dim=1)[0].cpu().numpy().astype(np.int64)


class Segmenter(ZeroShotSegmenter):
    """The trained student + text classifier: `Segmenter.from_checkpoint(path).predict(image, names)`."""

    def __init__(
        self, student: Student, text_encoder: Teacher, config: Config, device: torch.device | None = None
    ) -> None:
        device = resolve_device(device)
        super().__init__(text_encoder, config.method.alpha, config.eval, device)
        self.student = student.to(device).eval()
        self.config = config

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
        return cls(student, text_encoder, cfg, device)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(images)


class MaskCLIPSegmenter(ZeroShotSegmenter):
    """Training-free baseline: CLIP's MaskCLIP-style dense tokens against the text classifier."""

    def __init__(
        self, teacher: CLIPTeacher, eval_cfg: EvalConfig | None = None, alpha: float = 1 / 0.07
    ) -> None:
        super().__init__(teacher, alpha, eval_cfg or EvalConfig(), teacher.device)
        self.teacher = teacher

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        # The image is encoded at its own size (positional embedding interpolated), as MaskCLIP does.
        patch = self.teacher.patch_size
        h, w = images.shape[-2:]
        size = (max(patch, round(h / patch) * patch), max(patch, round(w / patch) * patch))
        return self.teacher.encode_image(images, size=size)[1]


# --- visualisation ----------------------------------------------------------------------------------------------


def palette(num_classes: int) -> np.ndarray:
    """Distinct, deterministic colours: hues spaced by the golden ratio, alternating lightness."""
    colours = []
    for i in range(num_classes):
        hue = (i * 0.618033988749895) % 1.0
        light = 0.5 if i % 2 == 0 else 0.38
        colours.append([round(255 * c) for c in colorsys.hls_to_rgb(hue, light, 0.85)])
    return np.asarray(colours, dtype=np.uint8).reshape(-1, 3)


def colorize(mask: np.ndarray, num_classes: int) -> Image.Image:
    """(H, W) ids → RGB image; ignore (255 or out of range) is black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:num_classes] = palette(num_classes)[:256]
    return Image.fromarray(lut[np.clip(mask, 0, 255).astype(np.uint8)])


def overlay(
    image: Image.Image, mask: np.ndarray, class_names: Sequence[str], opacity: float = 0.5
) -> Image.Image:
    """Blend the coloured mask over the photo and add a legend of the classes present with their area."""
    image = image.convert("RGB")
    coloured = colorize(mask, len(class_names)).resize(image.size, Image.NEAREST)
    blended = Image.blend(image, coloured, opacity)
    ids, counts = np.unique(mask, return_counts=True)
    present = [(int(i), c / mask.size) for i, c in zip(ids, counts, strict=True) if i < len(class_names)]
    present.sort(key=lambda item: -item[1])
    font_size = max(12, image.height // 30)
    font = ImageFont.load_default(size=font_size)
    row = font_size + 8
    width = max(
        160, max((int(font.getlength(f"{class_names[i]} 100.0%")) for i, _ in present), default=0) + 40
    )
    legend_h = max(image.height, row * len(present) + 16)
    canvas = Image.new("RGB", (image.width + width, legend_h), "white")
    canvas.paste(blended, (0, 0))
    draw = ImageDraw.Draw(canvas)
    colours = palette(len(class_names))
    for n, (i, share) in enumerate(present):
        y = 8 + n * row
        x = image.width + 8
        draw.rectangle(
            [x, y, x + font_size, y + font_size], fill=tuple(int(c) for c in colours[i]), outline="black"
        )
        draw.text((x + font_size + 8, y), f"{class_names[i]} {100 * share:.1f}%", fill="black", font=font)
    return canvas
