"""Synthetic scenes for the quick start and the tests: Voronoi cells of eight textured looks, generated on the fly.

Not to be confused with :mod:`clipzss.worlds.synthetic`, the benchmark world with its own trained text encoder;
these scenes are an ordinary dataset whose class names describe the look, so CLIP has something to match.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from clipzss.data.datasets import SegmentationDataset
from clipzss.data.splits import make_split
from clipzss.data.transforms import EvalTransform, SegTransform
from clipzss.errors import UsageError


@dataclass(frozen=True)
class _Look:
    colour: tuple[float, float, float]
    texture: str  # stripes | checker | dots | noise | waves | plain
    period: float = 8.0  # pixels per texture cycle
    angle: float = 0.0  # degrees, direction of variation
    amplitude: float = 0.35
    noise: float = 0.03


# Names describe the look, so a text encoder has something to match.
_SYNTHETIC: tuple[tuple[str, _Look], ...] = (
    ("red horizontal stripes", _Look((0.80, 0.15, 0.15), "stripes", 8.0, 90.0)),
    ("green vertical stripes", _Look((0.20, 0.65, 0.20), "stripes", 8.0, 0.0)),
    ("blue diagonal stripes", _Look((0.20, 0.30, 0.85), "stripes", 10.0, 45.0)),
    ("yellow checkerboard", _Look((0.90, 0.80, 0.20), "checker", 16.0)),
    ("purple dots", _Look((0.55, 0.25, 0.70), "dots", 10.0)),
    ("orange noise", _Look((0.95, 0.55, 0.10), "noise", amplitude=0.0, noise=0.15)),
    ("cyan waves", _Look((0.15, 0.75, 0.80), "waves", 16.0)),
    ("plain grey", _Look((0.55, 0.55, 0.55), "plain", amplitude=0.0, noise=0.02)),
)
SYNTHETIC_CLASSES: tuple[str, ...] = tuple(name for name, _ in _SYNTHETIC)
SYNTHETIC_UNSEEN: tuple[str, ...] = ("purple dots", "cyan waves")


def _texture(look: _Look, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A (H, W) pattern in about [-1, 1] with a random phase and slightly jittered period and angle."""
    period = look.period * rng.uniform(0.85, 1.15)
    angle = math.radians(look.angle + rng.uniform(-10.0, 10.0))
    phase_a, phase_b = rng.uniform(0, 2 * math.pi, 2)
    k = 2 * math.pi / period
    if look.texture == "stripes":
        return np.sign(np.sin(k * (xx * math.cos(angle) + yy * math.sin(angle)) + phase_a))
    if look.texture == "checker":
        return np.sign(np.sin(k * xx + phase_a) * np.sin(k * yy + phase_b))
    if look.texture == "dots":
        return np.where(np.sin(k * xx + phase_a) * np.sin(k * yy + phase_b) > 0.5, 1.0, -0.4)
    if look.texture == "waves":
        return np.sin(k * (xx + 4.0 * np.sin(2 * math.pi * yy / (2 * period))) + phase_a)
    return np.zeros_like(xx)  # plain and noise: the per-pixel noise does the work


class SyntheticScenes(SegmentationDataset):
    """Procedural scenes for the quick start: Voronoi cells, each filled with one class's colour and texture.

    Deterministic from ``(seed, index)``; the largest cell of image ``i`` has class ``i % 8``, so any 8 consecutive
    images cover every class.

    Args:
        num_images: dataset length.
        size: images are ``size`` × ``size``.
        seed: selects the scenes (use different seeds for train and val).
        cells: inclusive range of Voronoi cells per image.
        unseen: class names held out (default :data:`SYNTHETIC_UNSEEN`; ``[]`` for none).
        transform, train: as for every :class:`SegmentationDataset`.
    """

    def __init__(
        self,
        num_images: int = 64,
        size: int = 128,
        seed: int = 0,
        cells: tuple[int, int] = (3, 7),
        unseen: Sequence[str] | None = None,
        transform: SegTransform | EvalTransform | None = None,
        train: bool = False,
    ) -> None:
        if num_images < 1 or size < 8:
            raise UsageError(
                f"SyntheticScenes needs num_images >= 1 and size >= 8, got {num_images} and {size}"
            )
        if not 1 <= cells[0] <= cells[1]:
            raise UsageError(f"cells must be an increasing range of at least 1, got {cells}")
        split = make_split(SYNTHETIC_CLASSES, SYNTHETIC_UNSEEN if unseen is None else unseen)
        super().__init__(split, transform, train)
        self.num_images = num_images
        self.size = size
        self.seed = seed
        self.cells = cells

    def __len__(self) -> int:
        return self.num_images

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} synthetic scenes")
        rng = np.random.default_rng((self.seed, index))
        yy, xx = np.mgrid[0 : self.size, 0 : self.size].astype(np.float64)  # (H, W) each
        num_cells = int(rng.integers(self.cells[0], self.cells[1] + 1))
        points = rng.uniform(0, self.size, (num_cells, 2))
        dist = (yy[..., None] - points[:, 0]) ** 2 + (xx[..., None] - points[:, 1]) ** 2  # (H, W, n)
        cell = dist.argmin(-1)  # (H, W)
        cell_class = rng.integers(0, len(_SYNTHETIC), num_cells)
        cell_class[np.bincount(cell.ravel(), minlength=num_cells).argmax()] = index % len(_SYNTHETIC)
        mask = cell_class[cell]  # (H, W)
        image = np.zeros((self.size, self.size, 3))
        for class_id in np.unique(mask):
            look = _SYNTHETIC[class_id][1]
            colour = np.clip(np.array(look.colour) + rng.normal(0, 0.04, 3), 0, 1)
            pattern = 1 + look.amplitude * _texture(look, rng, yy, xx)  # (H, W)
            fill = colour * pattern[..., None] + rng.normal(0, look.noise, (self.size, self.size, 3))
            image[mask == class_id] = fill[mask == class_id]
        pixels = torch.from_numpy(np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)).permute(2, 0, 1)
        return (
            pixels.contiguous(),
            torch.from_numpy(mask.astype(np.int64)),
            f"synthetic_{self.seed}_{index:06d}",
        )
