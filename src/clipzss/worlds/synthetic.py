"""A controlled world where the zero-shot answer is known: textured scenes and a teacher that has seen every class.

No pretrained CLIP weights can be obtained on our machines, so the claim "the student learns to segment unseen
classes from the teacher" is tested here, where the truth is known:

- **Scenes** (:class:`WorldScenes`): Voronoi cells, each filled with one of 16 classes = 4 colours × 4 textures
  ("red stripes", "blue dots", ...), with per-image jitter of colour, brightness, texture period/angle/phase and
  per-pixel noise. Four classes are unseen, one per colour and one per texture, so every unseen class shares its
  colour with three seen classes and its texture with three others: a student that never saw it tends to call it
  by a neighbour's name.
- **Text embeddings** (``TeacherSpec.text``): ``"structured"`` (the default) composes a class's vector from shared
  attribute vectors, normalise(colour + texture + 0.5·own), so "red dots" is related to "red stripes" and "blue
  dots" as real class names are related (cosine ≈ 0.44 for one shared attribute); ``"random"`` gives one random
  unit vector per name, so nothing about an unseen class can be inferred from the seen texts.
- **The aligned teacher** (:class:`AlignedTeacher`) plays CLIP's role. A small conv net trained once on *all* 16
  classes (CLIP has seen the internet) maps local appearance to its class's text vector (cross-entropy over the
  cosines to the 16 text vectors, as CLIP's image tower is trained against text). It is imperfect in realistic
  ways: coarse tokens (stride 4, 16×16 on a 64² image) whose receptive field straddles cell borders, a short
  training run, and a fixed *nuisance* component (the normalised output of a frozen random conv net of the same
  shape, weight ``nuisance``) standing for everything CLIP's tokens encode besides the class (lighting, texture
  phase, position). A **modality gap** (``TeacherSpec.gap``): every image token is offset by one shared direction
  orthogonal to the class texts, as CLIP's image embeddings sit apart from its text embeddings (cosine of an image
  token to its own class text ≈ 0.29 with the default gap, 0.47 without). The CLS token is the normalised mean of
  the dense tokens. It implements the :class:`clipzss.models.teacher.Teacher` protocol and is passed to the ordinary
  ``clipzss.training.loop.train``; :mod:`clipzss.worlds.students` holds the students' recipe and measurements.

Teacher training is cached (safetensors under ``$XDG_CACHE_HOME/clipzss/synthetic_world``, keyed by every world and
teacher parameter), so benchmarks and tests train it once. The world's parameters were fixed before any student was
trained and were not changed afterwards to favour the method.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from clipzss.config import IMAGENET_MEAN, IMAGENET_STD, Config
from clipzss.data import SegmentationDataset, make_split
from clipzss.data.transforms import SegTransform, build_transforms
from clipzss.errors import UsageError
from clipzss.files import atomic_write, user_cache_dir
from clipzss.models.teacher import FrozenModule

logger = logging.getLogger(__name__)

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.20, 0.20),
    "green": (0.20, 0.70, 0.25),
    "blue": (0.20, 0.35, 0.90),
    "yellow": (0.90, 0.80, 0.20),
}
TEXTURES: tuple[str, ...] = ("stripes", "dots", "checker", "waves")
WORLD_CLASSES: tuple[str, ...] = tuple(f"{c} {t}" for c in COLOURS for t in TEXTURES)
# A Latin-square diagonal: each colour and each texture is held out exactly once.
WORLD_UNSEEN: tuple[str, ...] = ("red dots", "green checker", "blue waves", "yellow stripes")
CACHE_VERSION = 2  # bump when the teacher's architecture or training changes (2: seeded initialisation)
TEXT_MODES = ("structured", "random")


@dataclass(frozen=True)
class WorldConfig:
    """Everything that defines the scenes; part of the teacher's cache key."""

    size: int = 64  # images are size × size
    cells: tuple[int, int] = (3, 6)  # inclusive range of Voronoi cells per image
    period: tuple[float, float] = (6.0, 10.0)  # range of the class texture periods (pixels)
    amplitude: float = 0.35  # texture contrast around the class colour
    colour_jitter: float = 0.05  # per-image, per-channel colour noise (std)
    brightness: tuple[float, float] = (0.85, 1.15)  # per-image illumination factor
    noise: float = 0.05  # per-pixel noise (std)
    seed: int = 0  # draws each class's texture period and angle


@dataclass(frozen=True)
class TeacherSpec:
    """The aligned teacher's size and training recipe; part of the cache key."""

    embed_dim: int = 64
    width: int = 64
    text: str = "structured"  # the world's "text encoder": structured (shared attributes) | random
    # Not learnt, so not part of the cache key: how far the tokens are from clean class vectors.
    nuisance: float = 1.0  # weight of the frozen random-net component (as large as the semantic part)
    leak: float = 0.5  # weight of the image's mean semantic token mixed into every token (MaskCLIP-like leak)
    gap: float = 2.0  # weight of the shared image-side offset (the modality gap), set from teacher statistics
    steps: int = 400
    crop: int = 32  # the net is local, so it trains on small scenes (4x cheaper than 64² ones)
    batch_size: int = 16
    lr: float = 2e-3
    tau: float = 0.07
    seed: int = 0


@dataclass(frozen=True)
class _Look:
    colour: tuple[float, float, float]
    texture: str
    period: float
    angle: float  # degrees


def class_looks(world: WorldConfig) -> tuple[_Look, ...]:
    """Each class's colour, texture, period and angle (fixed per world seed)."""
    rng = np.random.default_rng((world.seed, 7))
    looks = []
    for colour in COLOURS.values():
        for texture in TEXTURES:
            period = float(rng.uniform(*world.period))
            angle = float(rng.uniform(0.0, 180.0))
            looks.append(_Look(colour, texture, period, angle))
    return tuple(looks)


def _pattern(look: _Look, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """(H, W) texture in about [-1, 1] with per-image jitter of period (±10 %), angle (±10°) and phase."""
    period = look.period * rng.uniform(0.9, 1.1)
    angle = math.radians(look.angle + rng.uniform(-10.0, 10.0))
    phase_a, phase_b = rng.uniform(0, 2 * math.pi, 2)
    k = 2 * math.pi / period
    u = xx * math.cos(angle) + yy * math.sin(angle)  # rotated coordinates
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    if look.texture == "stripes":
        return np.sign(np.sin(k * u + phase_a))
    if look.texture == "dots":
        return np.where(np.sin(k * u + phase_a) * np.sin(k * v + phase_b) > 0.5, 1.0, -0.4)
    if look.texture == "checker":
        return np.sign(np.sin(k * u + phase_a) * np.sin(k * v + phase_b))
    if look.texture == "waves":
        return np.sin(k * (u + 0.25 * period * np.sin(math.pi * v / period)) + phase_a)
    raise ValueError(f"unknown texture '{look.texture}'")


def render_scene(world: WorldConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (3, H, W) uint8 image and (H, W) int64 class ids, deterministic given ``rng``."""
    looks = class_looks(world)
    size = world.size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)  # (H, W)
    num_cells = int(rng.integers(world.cells[0], world.cells[1] + 1))
    points = rng.uniform(0, size, (num_cells, 2))
    cell = ((yy[..., None] - points[:, 0]) ** 2 + (xx[..., None] - points[:, 1]) ** 2).argmin(-1)  # (H, W)
    cell_class = rng.integers(0, len(looks), num_cells)
    mask = cell_class[cell]  # (H, W)
    image = np.zeros((size, size, 3))
    light = rng.uniform(*world.brightness)
    for class_id in np.unique(mask):
        look = looks[class_id]
        colour = np.clip(np.array(look.colour) + rng.normal(0, world.colour_jitter, 3), 0, 1) * light
        fill = colour * (1 + world.amplitude * _pattern(look, rng, yy, xx))[..., None]  # (H, W, 3)
        inside = mask == class_id
        image[inside] = fill[inside]
    image += rng.normal(0, world.noise, image.shape)
    pixels = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8).transpose(2, 0, 1)
    return np.ascontiguousarray(pixels), mask.astype(np.int64)


class WorldScenes(SegmentationDataset):
    """A split of the world as an ordinary clipzss dataset (image, mask, name; class_names, split, seen, unseen).

    Scenes are a pure function of (world seed, split name, index); different split names never share scenes.

    Args:
        world: the world's parameters.
        split: the split name (e.g. "train", "val", "teacher"); it selects the scenes.
        num_images: dataset length.
        unseen: class names held out (default :data:`WORLD_UNSEEN`).
        transform, train: as for every :class:`~clipzss.data.SegmentationDataset` (``train=True`` relabels the
            unseen classes to 255).
    """

    def __init__(
        self,
        world: WorldConfig | None = None,
        split: str = "train",
        num_images: int = 256,
        unseen: Sequence[str] | None = None,
        transform: SegTransform | None = None,
        train: bool = False,
    ) -> None:
        if num_images < 1:
            raise UsageError(f"WorldScenes needs num_images >= 1, got {num_images}")
        data_split = make_split(WORLD_CLASSES, WORLD_UNSEEN if unseen is None else unseen)
        super().__init__(data_split, transform, train)
        self.world = world or WorldConfig()
        self.split_name = split
        self.num_images = num_images
        self._split_seed = zlib.crc32(split.encode())

    def __len__(self) -> int:
        return self.num_images

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} world scenes")
        rng = np.random.default_rng((self.world.seed, self._split_seed, index))
        image, mask = render_scene(self.world, rng)
        return torch.from_numpy(image), torch.from_numpy(mask), f"world_{self.split_name}_{index:06d}"


# ----------------------------------------------------------------------------------------------------------------
# The aligned teacher


def _unit_vector(key: str, dim: int) -> torch.Tensor:
    digest = hashlib.sha256(key.encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFFFFFFFFFFFFFF)
    return F.normalize(torch.randn(dim, generator=gen), dim=0)


def text_vector(name: str, dim: int, seed: int = 0, mode: str = "random") -> torch.Tensor:
    """The world's "text encoder": a unit vector for a class name, fixed by (name, dim, seed, mode).

    ``mode="random"``: one random vector per name. ``mode="structured"``: a name "<colour> <texture>" of the world
    gets normalise(a_colour + a_texture + 0.5·r_name) from shared attribute vectors, so names sharing an attribute
    are related (cosine ≈ 0.44); any other name gets its own random vector.
    """
    if mode not in TEXT_MODES:
        raise UsageError(f"unknown text mode '{mode}'; choose one of {', '.join(TEXT_MODES)}")
    key = name.strip().lower()
    own = _unit_vector(f"{seed}:{dim}:{key}", dim)
    words = key.split()
    if mode == "random" or len(words) != 2 or words[0] not in COLOURS or words[1] not in TEXTURES:
        return own
    colour = _unit_vector(f"{seed}:{dim}:colour:{words[0]}", dim)
    texture = _unit_vector(f"{seed}:{dim}:texture:{words[1]}", dim)
    return F.normalize(colour + texture + 0.5 * own, dim=0)


def gap_direction(dim: int, texts: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A fixed unit vector orthogonal to every row of ``texts``: the shared offset of image tokens (the gap).

    Orthogonal, so adding it lowers every token-text cosine by the same factor and never reorders the classes: the
    teacher's own segmentation is unchanged, only the cosine level (and so the use of image-space prototypes)."""
    g = _unit_vector(f"{seed}:{dim}:modality-gap", dim)
    basis = torch.linalg.qr(texts.T.double()).Q.float()  # (C, K) orthonormal span of the texts
    return F.normalize(g - basis @ (basis.T @ g), dim=0)


def _token_net(width: int, out_dim: int) -> nn.Sequential:
    """Conv net at output stride 4 with a 27-pixel receptive field (three or four texture periods)."""
    return nn.Sequential(
        nn.Conv2d(3, width // 2, 3, padding=1),
        nn.GELU(),
        nn.Conv2d(width // 2, width, 3, stride=2, padding=1),
        nn.GELU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.GELU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1),
        nn.GELU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.GELU(),
        nn.Conv2d(width, out_dim, 1),
    )


class AlignedTeacher(FrozenModule):
    """The world's CLIP: dense tokens aligned with the class text vectors, for seen and unseen classes alike.

    Implements :class:`clipzss.models.teacher.Teacher`: ``embed_dim``, ``encode_image(images)`` → (CLS (B, C), dense
    (B, C, H/4, W/4)), both L2-normalised, for images normalised with IMAGENET_MEAN/STD, and
    ``text_embeddings(names)`` → (K, C). Frozen: gradients off and always in eval mode.
    """

    def __init__(self, spec: TeacherSpec | None = None, world: WorldConfig | None = None) -> None:
        super().__init__()
        self.spec = spec or TeacherSpec()
        self.world = world or WorldConfig()
        self.embed_dim = self.spec.embed_dim
        if self.spec.text not in TEXT_MODES:
            raise UsageError(f"unknown text mode '{self.spec.text}'; choose one of {', '.join(TEXT_MODES)}")
        # Both nets are initialised from the spec's seed, never from the global RNG: a teacher trained on another
        # machine, or after other code drew random numbers, is the same teacher.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.spec.seed)
            self.semantic = _token_net(self.spec.width, self.spec.embed_dim)
            torch.manual_seed(self.spec.seed + 1)
            self.nuisance_net = _token_net(self.spec.width, self.spec.embed_dim)
        world_text = torch.stack(
            [text_vector(n, self.spec.embed_dim, self.spec.seed, self.spec.text) for n in WORLD_CLASSES]
        )
        self.register_buffer("gap_dir", gap_direction(self.spec.embed_dim, world_text, self.spec.seed))
        self.freeze()

    @property
    def identity(self) -> str:
        spec = self.spec
        return (
            f"aligned-teacher(text={spec.text},nuisance={spec.nuisance},leak={spec.leak},gap={spec.gap})/"
            f"{cache_key(self.world, spec)[:12]}"
        )

    @property
    def device(self) -> torch.device:
        return self.semantic[0].weight.device

    def semantic_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, C, H/4, W/4) normalised semantic tokens (the trained part, gradients allowed)."""
        return F.normalize(self.semantic(images), dim=1)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images normalised the student's way → (CLS (B, C), dense (B, C, h, w)), L2-normalised."""
        images = images.to(self.device, torch.float32)
        nuisance = F.normalize(self.nuisance_net(images), dim=1)
        semantic = self.semantic_tokens(images)  # (B, C, h, w)
        context = F.normalize(semantic.mean(dim=(2, 3), keepdim=True), dim=1)  # (B, C, 1, 1)
        gap = self.spec.gap * self.gap_dir.view(1, -1, 1, 1)
        dense = F.normalize(semantic + self.spec.leak * context + self.spec.nuisance * nuisance + gap, dim=1)
        cls = F.normalize(dense.mean(dim=(2, 3)), dim=-1)
        return cls, dense

    def text_embeddings(self, class_names: Sequence[str]) -> torch.Tensor:
        """Class names → (K, C) unit vectors; any name works (unknown names get their own random vector)."""
        if isinstance(class_names, str) or not class_names:
            raise UsageError(f"class_names must be a non-empty list of names, got {class_names!r}")
        rows = [text_vector(name, self.embed_dim, self.spec.seed, self.spec.text) for name in class_names]
        return torch.stack(rows).to(self.device)


def cache_key(world: WorldConfig, spec: TeacherSpec) -> str:
    learnt = {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("nuisance", "leak", "gap")}
    payload = {"version": CACHE_VERSION, "world": dataclasses.asdict(world), "teacher": learnt}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def default_cache_dir(world: str = "synthetic_world") -> Path:
    """The folder of a world's cached teachers (and text tables): ``$XDG_CACHE_HOME/clipzss/<world>``."""
    return user_cache_dir(world)


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 → normalised the student's way."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels.float() / 255 - mean) / std


def fit_teacher(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int,
    lr: float,
    seed: int,
    losses: Callable[[], Iterator[torch.Tensor]],
) -> None:
    """Train a world teacher's ``net`` on the ``steps`` losses that ``losses()`` yields, then freeze it again.

    The loop of both worlds' teachers: the RNG is seeded with ``seed`` (in a fork, so the caller's stream is left
    alone) before ``losses()`` starts, so the batches it draws are a function of the seed; each loss takes one
    optimizer step, and the learning rate follows a cosine decay from ``lr`` to 0.
    """
    net.requires_grad_(True)
    net.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step, loss in enumerate(losses()):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))
    net.requires_grad_(False)
    net.train(False)


def train_teacher(teacher: AlignedTeacher) -> dict[str, float]:
    """Fit the semantic net on scenes of *all* classes (its own split, never the students'); returns the final
    token accuracy. Cross-entropy over cos(token, text_k)/τ for the 16 class names, labels at token resolution."""
    spec, world = teacher.spec, teacher.world
    small = dataclasses.replace(world, size=spec.crop)
    scenes = WorldScenes(small, split="teacher", num_images=spec.steps * spec.batch_size, unseen=[])
    text = teacher.text_embeddings(WORLD_CLASSES).cpu()  # (K, C)
    accuracy = [0.0]

    def losses() -> Iterator[torch.Tensor]:
        for step in range(spec.steps):
            items = [scenes.load(step * spec.batch_size + i) for i in range(spec.batch_size)]
            images = normalize_pixels(torch.stack([item[0] for item in items]))  # (B, 3, crop, crop)
            masks = torch.stack([item[1] for item in items])  # (B, crop, crop)
            tokens = teacher.semantic_tokens(images)  # (B, C, h, w)
            labels = F.interpolate(masks[:, None].float(), size=tokens.shape[-2:], mode="nearest-exact")
            labels = labels[:, 0].long()  # (B, h, w)
            logits = torch.einsum("bchw,kc->bkhw", tokens, text) / spec.tau
            if step >= spec.steps - 20:
                accuracy[0] += float((logits.argmax(1) == labels).float().mean()) / 20
            yield F.cross_entropy(logits, labels)

    optimizer = torch.optim.Adam(teacher.semantic.parameters(), lr=spec.lr)
    fit_teacher(teacher.semantic, optimizer, spec.steps, spec.lr, spec.seed, losses)
    return {"token_accuracy": accuracy[0]}


def load_teacher(
    world: WorldConfig | None = None, spec: TeacherSpec | None = None, cache_dir: str | Path | None = None
) -> AlignedTeacher:
    """The aligned teacher for ``world``: read from the cache, or trained once (seconds on a CPU) and cached."""
    teacher = AlignedTeacher(spec, world)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"aligned_teacher_{cache_key(teacher.world, teacher.spec)[:16]}.safetensors"
    if path.is_file():
        try:
            teacher.semantic.load_state_dict(load_file(str(path)))
            return teacher
        except Exception as err:  # a corrupt cache is retrained, never trusted
            logger.warning("ignoring unreadable teacher cache %s (%s); retraining", path, err)
    stats = train_teacher(teacher)
    logger.info("aligned teacher trained (token accuracy %.3f); cached at %s", stats["token_accuracy"], path)
    state = {k: v.contiguous() for k, v in teacher.semantic.state_dict().items()}
    meta = {k: str(v) for k, v in stats.items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))
    return teacher


def world_datasets(
    cfg: Config, world: WorldConfig | None = None, num_train: int = 8192, num_val: int = 64
) -> tuple[WorldScenes, WorldScenes]:
    """Training scenes (unseen relabelled to 255, the config's training transforms) and validation scenes.

    Scenes are rendered on the fly, so the training set is large enough that no scene comes back within a run:
    with a few hundred scenes, GLM's bank of 1024 past CLS tokens would hold the CLS of the very scene being
    trained on as a "negative", which cannot happen at the scale of real datasets.
    """
    world = world or WorldConfig()
    train_set = WorldScenes(world, "train", num_train, transform=build_transforms(cfg.data, True), train=True)
    val_set = WorldScenes(world, "val", num_val, transform=build_transforms(cfg.data, False, world.size))
    return train_set, val_set
