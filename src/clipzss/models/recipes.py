"""The training-free recipes for CLIP's dense tokens: their names, published results and released input handling.

Each recipe changes only CLIP's last vision block (`clipzss.models.teacher`); that change is what ``teacher.dense``
selects for pseudo labels and what ``--baseline`` runs at inference. The released code of each recipe also
chooses how images are fed (short side, sliding-window crop and stride): that belongs to the training-free
baseline alone (:func:`baseline_eval_config`), never to the teacher used for training, which sees the training
crops. Torch-free, so command-line help can list the choices.
"""

from __future__ import annotations

import dataclasses

from clipzss.config import SAVED_DEFAULTS, EvalConfig, TeacherConfig, check_choice, check_field, choices

# teacher.dense: "value" (the value path without attention, residual or FFN; the default before the recipes
# below were added, so a checkpoint that records no path computed it) and the four released recipes.
LEGACY_DENSE: str = SAVED_DEFAULTS[("teacher", "dense")]
DENSE_PATHS: tuple[str, ...] = choices(TeacherConfig, "dense")
BASELINES: tuple[str, ...] = ("maskclip", "clearclip", "sclip", "naclip")

# Published mIoU (%) of each recipe with CLIP ViT-B/16, no background class, mostly as re-reported in later papers'
# tables; literature, not measured here (docs/protocols.md gives each row's source).
BENCHMARKS: tuple[str, ...] = ("VOC-20", "Context-59", "COCO-Obj", "COCO-Stuff", "ADE")
PUBLISHED_MIOU: dict[str, tuple[float, ...]] = {
    "maskclip": (74.9, 26.4, 20.6, 16.7, 11.9),
    "sclip": (81.5, 34.5, 33.5, 22.8, 16.5),
    "clearclip": (80.9, 35.9, 33.0, 23.9, 16.7),
    "naclip": (79.7, 35.2, 33.2, 23.3, 17.4),
}


def published_mean(recipe: str) -> float:
    """The mean of `PUBLISHED_MIOU` over `BENCHMARKS`: how the pseudo-label default was chosen."""
    values = PUBLISHED_MIOU[recipe]
    return sum(values) / len(values)


# The pseudo-label default: no CLIP weights exist where this was written, so it is the best published mean
# (clearclip 38.08 > sclip 37.76 = naclip 37.76 > maskclip 30.10), not a measurement.
DEFAULT_DENSE = max(PUBLISHED_MIOU, key=published_mean)

# Each recipe's released evaluation input (its segmentor's and configs' defaults): short side of the resized image
# and the sliding window. MaskCLIP keeps this project's protocol (EvalConfig's defaults). Not carried over:
# NACLIP's PAMR refinement (on in its README's results, off in its paper's main table), per-dataset exceptions
# (NACLIP: whole image on VOC; SCLIP: short side 448 on COCO-Stuff; Cityscapes 560), ClearCLIP's padding of
# crops to a multiple of the patch (we resize instead), the logit scales 40/50 (an argmax does not see them).
BASELINE_INPUT: dict[str, dict[str, object]] = {
    "maskclip": {},
    "clearclip": {"mode": "slide", "short_side": 448, "crop_size": 448, "stride": 224},
    "sclip": {"mode": "slide", "short_side": 336, "crop_size": 224, "stride": 112},
    "naclip": {"mode": "slide", "short_side": 336, "crop_size": 224, "stride": 112},
}

BASELINE_TITLES: dict[str, str] = {
    "maskclip": "MaskCLIP",
    "clearclip": "ClearCLIP",
    "sclip": "SCLIP",
    "naclip": "NACLIP",
}


def check_dense(path: str) -> None:
    """One line naming ``teacher.dense`` when the path is not one of `DENSE_PATHS`."""
    check_field(path, "teacher.dense")


def check_baseline(name: str) -> None:
    """One line naming the baseline when it is not one of `BASELINES` (a library call can pass anything)."""
    check_choice(name, BASELINES, "baseline")


def baseline_eval_config(name: str, base: EvalConfig | None = None) -> EvalConfig:
    """``base`` (default: EvalConfig()) with the recipe's released input handling (short side, windows)."""
    check_baseline(name)
    base = base or EvalConfig()
    if not BASELINE_INPUT[name]:
        return base
    return dataclasses.replace(base, **BASELINE_INPUT[name])  # type: ignore[arg-type]
