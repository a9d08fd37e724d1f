"""Nested dataclass configs, YAML load/save and ``section.key=value`` command-line overrides.

Every choice the paper (CLIP-ZSS, Chen et al., arXiv 2310.02296) leaves open is a field here with its default,
so any of them can be ablated from the command line. The resolved config is written to every run folder and
stored beside every checkpoint: a checkpoint alone rebuilds its model.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from clipzss.errors import ClipzssError
from clipzss.messages import did_you_mean

logger = logging.getLogger(__name__)

# ZegCLIP's 15-template ensemble.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "a {} in the scene.",
    "a photo of a {} in the scene.",
    "There is a {} in the scene.",
    "There is the {} in the scene.",
    "This is a {} in the scene.",
    "This is the {} in the scene.",
    "This is one {} in the scene.",
)


# The student's input normalisation (ImageNet statistics, as every smp/timm encoder expects). Datasets produce
# images normalised this way; the teacher converts them to CLIP's own statistics itself.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class ConfigError(ClipzssError, ValueError):
    """A config file or override that cannot be applied; the message names the key."""


class ConfigValueError(ConfigError):
    """A value of the right type that no run can use (out of range, not finite); the message names the field."""


# The largest image side any size in a config may ask for (crops, resize targets, the teacher's input, the short
# side at test time), in pixels. A 4096-pixel short side is a 4096 x 16384 input at most (0.8 GB as float32
# before the network sees it), far beyond any benchmark protocol (512) and what one GPU holds in a ViT's
# attention; values such as 200000 come from a typo or from someone else's file and would end in a MemoryError.
MAX_IMAGE_SIDE = 4096


@dataclass
class DataConfig:
    """Which dataset, where, and how training crops are made."""

    dataset: str = "folder"  # voc | coco-stuff | context | ade20k | ade20k-full | folder | synthetic
    root: str = ""
    train_split: str = "train"
    val_split: str = "val"
    # Class names held out as unseen. None = the dataset's standard split (docs/protocols.md); [] = fully
    # supervised.
    unseen: list[str] | None = None
    # Evaluation on another dataset (open-vocabulary transfer, e.g. train COCO-Stuff → evaluate VOC); None = the same.
    eval_dataset: str | None = None
    eval_root: str | None = None
    eval_unseen: list[str] | None = None
    # What training may read of the unseen classes: nothing (inductive: their names are first read at test time),
    # their names but never their labels (transductive: the unseen names above are the targets, text-encoded for
    # named pseudo labels, section `transductive`), or their labels too (supervised, the upper bound: every class
    # is labelled in training, evaluation still reports seen/unseen over the split above).
    setting: Literal["inductive", "transductive", "supervised"] = "inductive"
    crop_size: int = 512
    scale: int = 512  # short side before the random ratio, mmseg's img_scale (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip: bool = True
    photometric: bool = True
    num_workers: int = 4


@dataclass
class TeacherConfig:
    """The frozen CLIP teacher (training only) that also provides the text classifier."""

    model: str = "ViT-B-16"
    # An open_clip pretrained tag (needs the hub), a local .safetensors/.bin/.pt path, or "none" (random weights).
    weights: str = "openai"
    image_size: int = 448
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    # Keys passed to open_clip.create_model over the named config, e.g. a tiny vision_cfg for tests.
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # auto: bf16 on CUDA, fp32 elsewhere.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # The dense tokens of the last block, each as its released code computes it (docs/protocols.md):
    # "clearclip" = q-q attention, no residual, no FFN (Lan et al., ECCV 2024) | "sclip" = softmax(qqᵀ) +
    # softmax(kkᵀ) attention, residual and FFN kept (Wang et al., ECCV 2024) | "naclip" = k-k attention plus a
    # Gaussian neighbourhood prior of std `naclip_std` patches, no residual, no FFN (Hajimiri et al., WACV 2025) |
    # "maskclip" = value path, residual and FFN kept (Zhou et al., ECCV 2022) | "value" = value path alone, no
    # residual, no FFN (the old default; a checkpoint without this field computed it). Default: the best mean
    # published mIoU (clipzss.models.recipes), literature-based, not measured here.
    dense: Literal["value", "maskclip", "clearclip", "sclip", "naclip"] = "clearclip"
    naclip_std: float = 5.0  # NACLIP's released gaussian_std, in patches
    cache_dir: str | None = None  # text-embedding disk cache; None = $XDG_CACHE_HOME/clipzss/text


@dataclass
class StudentConfig:
    """Any segmentation-models-pytorch network whose head outputs ``embed_dim`` channels at stride 4."""

    arch: str = "Segformer"
    encoder: str = "mit_b2"
    weights: str | None = None  # None | "imagenet" | a local path to encoder weights
    embed_dim: int = 512  # must equal the teacher's joint embedding size
    arch_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodConfig:
    """CLIP-ZSS modules, their switches (ablations) and their hyper-parameters."""

    # The parts on by default, each worth unseen mIoU on every seed of the CamVid proxy when taken out of the
    # default (benchmarks/README.md, target (3)): GLM 7.1, NEL 5.6, mask fusion 1.4, token centring 0.9; the last
    # two are also worth 7.3 and 7.6 in the synthetic world.
    glm: bool = True
    # Off by default: taking GLM's bank of past CLS tokens (the paper's) out moved unseen mIoU on the CamVid proxy by
    # -0.1 on average (per seed +0.1, +1.2, -1.5: no worth shown), so GLM uses every rank's in-batch CLS tokens as
    # negatives (benchmarks/README.md, "reference − bank"). `method.bank=true` restores the paper's GLM.
    bank: bool = False
    pseudo_labels: bool = True
    # Off by default: single-scale seeds (the middle window) trained as well and clustered as well in every
    # measurement (benchmarks/README.md: "default + multi-scale" row, window table); the paper's multi-scale seeding
    # stays available. The synthetic world's regions are large for its 16² grid: re-measure on real data.
    multi_scale: bool = False
    mask_fusion: bool = True
    # Off by default: the anchored synthesizer did not beat teacher-token prototypes (benchmarks/README.md).
    synthesizer: bool = False
    nel: bool = True
    ce: bool = True
    # GLM
    tau: float = 0.07
    bank_size: int = 1024
    # The bank never holds more than this fraction of the training set (a 200-image set gets at most 100 entries),
    # and each entry remembers its image, which is never its own negative: on small sets and video frames a
    # 1024-entry bank would hold every image several times [ours].
    bank_fraction: float = 0.5
    # pseudo labels
    kmeans_iters: int = 10
    window_divisors: tuple[int, ...] = (2, 4, 8)
    # K-Means on batch-centred tokens (the shared image-side component removed), where λ = 0.7 fits every world
    # measured; on raw tokens the best λ moves with the modality gap (0.85 without, 0.95 with) [ours,
    # benchmarks/README.md "Token centring"]. center_tokens=false with fusion_threshold=0.85 is the old setting.
    center_tokens: bool = True
    # The centring mean: over the valid tokens of the whole global batch (all-reduced under DDP) or of each image.
    center_scope: Literal["batch", "image"] = "batch"
    fusion_threshold: float = 0.7
    min_region: float = 0.01
    # A pseudo region more than this share of which is one seen class is that class's rim and stays ignored
    # (1.0 keeps every region). Off by default: void pixels (VOC's boundary bands, padding) are kept out of the
    # pseudo labels as void, and the filter also dropped unseen objects that cluster with a similar seen class
    # [ours, benchmarks/README.md "CamVid"].
    max_seen_share: float = 1.0
    # Teacher-token pseudo prototypes: "none" = the region's mean token; "shift" = normalise(region mean - mean
    # image token of the batch + mean seen-text embedding), a parameter-free correction of the modality gap.
    prototype_gap: Literal["none", "shift"] = "none"
    # synthesizer: prototypes start at the teacher's mean token over each region; the decoder adds a correction.
    synth_layers: int = 2
    synth_heads: int = 8
    synth_context: bool = True  # the student's (detached) region means join the queries as extra context
    # Pseudo prototypes detached from NEL/CE, so that the synthesizer's correction learns from L_bce alone.
    synth_detach: bool = False
    # L_bce, prototype → own text: "bce" (multi-label BCE over P_seen × T_seen at bce_scale·cos + bce_bias) or
    # "softmax" (CE over T_seen at 1/tau). SigLIP's initial scale 10 and bias -10, kept fixed: optimising the loss
    # alone then ends at the own text (cos 1.0 for 15 and 156 random texts); learnt (bce_learnable) they drift to a
    # max-margin direction (cos 0.67-0.72), and the old fixed 1/tau with bias 0 ends at cos 0.25 / 0.08 [ours,
    # tests/test_losses.py]. The old behaviour: bce_scale=14.2857, bce_bias=0.
    bce: Literal["bce", "softmax"] = "bce"
    bce_scale: float = 10.0
    bce_bias: float = -10.0
    bce_learnable: bool = False
    # logits and losses
    alpha: float = 1 / 0.07
    beta: float | None = None  # None = alpha
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # NEL as ZegCLIP's released criterion computes it: each (image, class) focal map averaged over its H·W pixels
    # (ignored pixels are negatives), summed, divided by the number of present masks; focal weight 100 as in
    # ZegCLIP's VOC/COCO zero-shot configs. nel_norm=entries focal_weight=20 is our earlier rule (mean over
    # non-ignored pixel × channel entries): within noise in three synthetic worlds, +2.9 unseen mIoU in the fourth,
    # but 2-2.5x less unseen mIoU in the CamVid world (real photographs, real text) [ours, benchmarks/README.md].
    nel_norm: Literal["zegclip", "entries"] = "zegclip"
    # ZegCLIP's criterion counts every 255 pixel as a negative of every class, void (VOC's boundary bands, padding)
    # included; we leave void out (pixels that are no content teach nothing). True restores ZegCLIP exactly.
    nel_void_negatives: bool = False
    focal_weight: float = 100.0
    dice_weight: float = 1.0
    # NEL and CE at the logits' stride (labels brought down by block majority): K-channel maps stay at 1/16 of the
    # pixels; "full" upsamples the logits to the label size first (the paper's and ZegCLIP's way, 16x the memory).
    loss_resolution: Literal["logits", "full"] = "logits"
    w_glm: float = 1.0
    w_nel: float = 1.0
    w_ce: float = 1.0
    w_bce: float = 1.0
    # Dense distillation (0 = off): 1 - cos(student embedding pooled to the teacher's token grid, teacher token) on
    # non-void tokens, "all" of them or only the "unlabelled" ones (no ground truth). The teacher's knowledge of a
    # pixel then reaches the student directly, not only through clusters (PLM) and one global token (GLM).
    # On by default, all pixels, weight 4 [ours]: at weight 1, +1.0 unseen mIoU on the CamVid proxy over the
    # reference, never below it on a seed; weight 4 adds 1.1 more on every seed and 0.9 in the synthetic world, weight
    # 10 falls back (benchmarks/README.md, the CamVid table's distillation rows).
    w_distill: float = 4.0
    distill_pixels: Literal["all", "unlabelled"] = "all"


@dataclass
class TransductiveConfig:
    """Named pseudo labels and self-training, read only under data.setting=transductive.

    Unlabelled pixels (never void) get a target name where a classifier over the seen and target texts is confident:
    the teacher's dense tokens until ``self_train_start`` steps are done, then an EMA copy of the student (mean
    teacher), whose confident predictions refresh the labels for the rest of the run (MaskCLIP+'s self-training).
    """

    # Softmax temperature of the teacher's tokens against the texts: CLIP's own logit scale 100 [ours, as CLIP].
    tau: float = 0.01
    # A teacher's named label is kept where its softmax probability over seen + target texts reaches this and the
    # winner is a target [ours, chosen, not measured].
    threshold: float = 0.5
    # With method.pseudo_labels, how PLM clusters and named labels share the unlabelled pixels: clusters keep only
    # the pixels the teacher cannot name, or a named label replaces the cluster id wherever it is confident.
    clusters: Literal["unnamed", "replace"] = "unnamed"
    # Steps after which the EMA student names the unlabelled pixels instead of the teacher; None = never (no EMA).
    self_train_start: int | None = None
    # The EMA student's softmax (at method.alpha, the scale it is trained at) must reach this [ours, chosen].
    self_threshold: float = 0.5
    ema_decay: float = 0.999  # the EMA copy's decay per step, as mean-teacher methods use [ours]


@dataclass
class TrainConfig:
    """Optimisation, schedule, logging and checkpointing."""

    max_iters: int = 20000
    batch_size: int = 16  # global: split evenly over the processes of a torchrun job
    lr: float = 6e-5
    head_lr_mult: float = 10.0
    weight_decay: float = 0.01
    warmup_iters: int = 1500
    poly_power: float = 0.9
    min_lr: float = 0.0
    grad_clip: float | None = 1.0
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 on CUDA, off on CPU
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    # Steps between loss logs, evaluations and checkpoints. The last step always logs, saves and (with a validation
    # set) evaluates; 0 = at the last step only. eval_interval=0 also means the trainer builds no validation set
    # itself: only a val_set passed to train() is evaluated, once, at the end. Negative values are refused.
    log_interval: int = 50
    eval_interval: int = 2000
    ckpt_interval: int = 2000
    output_dir: str = "runs/default"


@dataclass
class EvalConfig:
    """Test-time protocol: every class name predicted jointly (ZegCLIP), short-side resize, sliding window."""

    mode: Literal["slide", "whole"] = "slide"
    crop_size: int = 512
    stride: int = 341
    short_side: int = 512
    max_images: int | None = None
    # A class absent from an image set's ground truth: "mmseg" scores IoU 0 when it is predicted (NaN when it is
    # neither in the truth nor predicted) and averages with nanmean, as mmseg's and ZegCLIP's evaluation do;
    # "skip" leaves every absent class out of the means.
    absent_classes: Literal["mmseg", "skip"] = "mmseg"
    # ZegCLIP's inductive calibration: sigmoid scores of the seen classes lowered by this much before the argmax
    # (ZegCLIP uses 0.1). When > 0 the calibrated metrics are reported beside the plain ones, never instead.
    seen_gamma: float = 0.0
    # 0: exact labels, the argmax of the upsampled scores. m > 0: approximate and faster (opt-in): where a
    # region's labels are not settled exactly, only each low-resolution point's m best classes compete there
    # (`label_maps.label_map`; agreement and speed in benchmarks/README.md).
    label_candidates: int = 0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    transductive: TransductiveConfig = field(default_factory=TransductiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Config:
        """The config of a plain mapping (a YAML file, a checkpoint's saved config); unknown keys fail, except the
        `REMOVED_KEYS` that older versions wrote, which are dropped."""
        config = _build(cls, _drop_removed_keys(data or {}, source), source)
        config.validate(source)
        return config

    def validate(self, source: str = "config") -> None:
        """Refuse values that have the right type but that no run can use, in one line naming the field.

        Run on every config read (`from_dict`: files, overrides, checkpoints) and by `train` and `evaluate` (a
        config built in Python): every choice one of its field's `Literal` values, every number finite, sizes
        within [1, `MAX_IMAGE_SIDE`], counts and rates of the right sign. A NaN or infinite learning rate
        otherwise trains and saves non-finite weights, a negative step count claims a checkpoint that was never
        written, and a size of 0 or 200000 fails deep inside torch or numpy.
        """
        _check_values(self, "" if source in ("config", "defaults") else f"{source}: ")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# Fields that older versions had and saved in every run folder and checkpoint: dropped on load (one debug line) so
# those files still load. A field removed from the dataclasses above belongs here.
REMOVED_KEYS: dict[str, tuple[str, ...]] = {
    "eval": ("batch_size",),  # never used: evaluation always runs one image at a time
}


# Fields whose default changed after files were saved without them: a saved config (checkpoint, training state)
# that lacks one was computed with this value, not today's default. Files people write keep today's defaults.
SAVED_DEFAULTS: dict[tuple[str, str], Any] = {
    ("teacher", "dense"): "value",  # the only dense path before teacher.dense existed
    ("method", "bank"): True,  # the default until the CamVid table turned it off
    ("method", "w_distill"): 0.0,  # dense distillation did not exist, then was off
}


def pin_saved_defaults(data: Any) -> Any:
    """A saved config ``data`` with every `SAVED_DEFAULTS` field it lacks filled in (a shallow copy)."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for (section, key), value in SAVED_DEFAULTS.items():
        values = data.get(section, {})
        if isinstance(values, dict) and key not in values:
            data[section] = {**values, key: value}
    return data


def _drop_removed_keys(data: Any, source: str) -> Any:
    """``data`` without the `REMOVED_KEYS` (a shallow copy of the sections that held one)."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for section, keys in REMOVED_KEYS.items():
        values = data.get(section)
        if isinstance(values, dict) and any(key in values for key in keys):
            for key in keys:
                if key in values:
                    logger.debug("%s: ignoring %s.%s, a setting older versions had", source, section, key)
            data[section] = {k: v for k, v in values.items() if k not in keys}
    return data


def _to_plain(value: Any) -> Any:
    """Tuples become lists so the YAML stays plain (safe_load can read it back)."""
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    return value


def _check_values(cfg: Config, where: str) -> None:
    """`Config.validate`, with ``where`` (empty, or "file: ") before each message."""
    alpha = cfg.method.alpha  # the logit scale: NaN, infinite or negative turns every score into one class
    if not math.isfinite(alpha) or alpha <= 0:
        raise ConfigValueError(f"{where}method.alpha must be a positive finite number, got {alpha!r}")
    gamma = cfg.eval.seen_gamma  # how much the seen classes' scores are lowered
    if not (math.isfinite(gamma) and gamma >= 0):
        raise ConfigValueError(f"{where}eval.seen_gamma must be a number >= 0, got {gamma!r}")
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for item in dataclasses.fields(values):
            key, value = f"{section.name}.{item.name}", getattr(values, item.name)
            _check_finite(value, key, where)
            allowed = _choice_fields(type(values)).get(item.name)
            if allowed:
                check_choice(value, allowed, f"{where}{key}")
    data, train, ev = cfg.data, cfg.train, cfg.eval
    for key, value in (
        ("data.crop_size", data.crop_size),
        ("data.scale", data.scale),
        ("teacher.image_size", cfg.teacher.image_size),
        ("eval.crop_size", ev.crop_size),
        ("eval.stride", ev.stride),
    ):
        check_side(value, key, where)
    if ev.short_side:  # None or 0: images keep their size
        check_side(ev.short_side, "eval.short_side", where)
    low, high = data.ratio_range
    if not 0 < low <= high:
        raise ConfigValueError(
            f"{where}data.ratio_range={[low, high]} must be two positive ratios, low to high"
        )
    for key, value, minimum, what in (
        ("data.num_workers", data.num_workers, 0, "a number of processes"),
        ("student.embed_dim", cfg.student.embed_dim, 1, "a number of channels"),
        ("train.max_iters", train.max_iters, 1, "the number of training steps"),
        ("train.batch_size", train.batch_size, 1, "a number of images"),
        ("train.warmup_iters", train.warmup_iters, 0, "a number of steps"),
        ("train.weight_decay", train.weight_decay, 0, "a decay factor"),
        ("train.poly_power", train.poly_power, 0, "an exponent"),
        ("train.lr", train.lr, 0, "a learning rate; 0 trains nothing, which diagnostics use"),
        ("train.head_lr_mult", train.head_lr_mult, 0, "a factor of the learning rate"),
        ("train.min_lr", train.min_lr, 0, "a learning rate"),
        ("train.grad_clip", train.grad_clip, 0, "a gradient norm; 0 or null: no clipping"),
        ("eval.max_images", ev.max_images, 0, "a number of images"),
    ):
        if value is not None and value < minimum:
            raise ConfigValueError(f"{where}{key}={value} must be at least {minimum} ({what})")
    method = cfg.method
    for key, value, low, high in (
        ("method.bank_fraction", method.bank_fraction, 0.0, 1.0),
        ("method.max_seen_share", method.max_seen_share, 0.0, 1.0),
        ("method.min_region", method.min_region, 0.0, 1.0),
        ("method.w_distill", method.w_distill, 0.0, math.inf),
        ("method.bank_size", method.bank_size, 0, math.inf),
        ("method.kmeans_iters", method.kmeans_iters, 0, math.inf),
    ):
        if not low <= value <= high:
            raise ConfigValueError(f"{where}{key}={value} must be in [{low}, {high}]")
    if data.cat_max_ratio <= 0:  # mmseg's crop rule: no crop has a class below 0% of its pixels
        raise ConfigValueError(f"{where}data.cat_max_ratio={data.cat_max_ratio} must be positive")
    for name in ("log_interval", "eval_interval", "ckpt_interval"):
        value = getattr(train, name)
        if value < 0:
            raise ConfigValueError(
                f"{where}train.{name}={value} is negative: give a number of steps, or 0 for the last step only"
            )


def check_side(value: object, field: str, where: str = "") -> int:
    """An image size in pixels from a config or a file's metadata: an integer in [1, `MAX_IMAGE_SIDE`]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigValueError(f"{where}{field}={value!r} is not a size in pixels")
    if not 1 <= value <= MAX_IMAGE_SIDE:
        raise ConfigValueError(
            f"{where}{field}={value} is not an image size clipzss handles (1 to {MAX_IMAGE_SIDE} pixels)"
        )
    return value


def _check_finite(value: object, field: str, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigValueError(f"{where}{field}={value} is not a finite number")
    if isinstance(value, list | tuple):
        for item in value:
            _check_finite(item, field, where)


def check_choice(value: str, allowed: tuple[str, ...], field: str) -> str:
    """``value``, or a one-line error naming the field when it is not one of ``allowed`` (e.g. `choices`)."""
    if value not in allowed:
        raise ConfigValueError(f"{field}='{value}' is not one of {', '.join(allowed)}")
    return value


@functools.cache
def _choice_fields(section: type) -> dict[str, tuple[str, ...]]:
    """The `Literal`-typed fields of a config section and their values, in declaration order."""
    hints = typing.get_type_hints(section)
    return {name: typing.get_args(hint) for name, hint in hints.items() if typing.get_origin(hint) is Literal}


def choices(section: type, name: str) -> tuple[str, ...]:
    """The values a config field accepts, read from its `Literal` annotation: each set of choices is declared
    once, on its field, and checks, constants and the CLI's ``choices=`` all read it here."""
    try:
        return _choice_fields(section)[name]
    except KeyError:
        raise TypeError(f"{section.__name__}.{name} is not a field with a fixed set of values") from None


def check_field(value: str, field: str) -> str:
    """``value`` for the config field ``field`` ("section.name"), or one line naming the field when it is not one
    of the field's `choices`: for code given a choice outside a Config (a loss's mode, a recipe's name)."""
    section, _, name = field.partition(".")
    return check_choice(value, choices(_sections()[section], name), field)


@functools.cache
def _sections() -> dict[str, type]:
    return typing.get_type_hints(Config)


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    hint = did_you_mean(key, valid) or f"valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{key}' in {where}; {hint}")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check and convert a YAML value to the field's annotated type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if (
        origin is Literal
    ):  # a string here; `Config.validate` names the field when it is not one of the choices
        return _coerce(value, str, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, where) for v in value]
        if origin is tuple and args and args[-1] is not Ellipsis and len(items) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(items)}")
        return tuple(items) if origin is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(key, list(fields), where)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, f"{where}.{key}")
        else:
            kwargs[key] = _coerce(value, hint, f"{where}.{key}")
    return cls(**kwargs)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the defaults) and apply ``section.key=value`` overrides.

    Unknown sections or keys fail with a did-you-mean, so a typo never silently trains with a default.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        source = str(path)
    data = {k: dict(v or {}) if isinstance(v, dict) else v for k, v in data.items()}
    for item in overrides:
        key, value = parse_override(item)
        _set(data, key, value, f"override '{item}'")
    return Config.from_dict(data, source)


def parse_override(item: str) -> tuple[str, Any]:
    """``"section.key=value"`` as ``("section.key", value)``, the value read as YAML (``1e-4`` as a number)."""
    key, sep, raw = item.partition("=")
    if not sep or "." not in key:
        raise ConfigError(f"override '{item}' must look like section.key=value (e.g. train.lr=1e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(
            f"override '{item}': the value is not valid YAML (quote it, e.g. {key}='[\"a {{}}.\"]')"
        ) from None
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)
    return key.strip(), value


def apply_overrides(cfg: Config, overrides: dict[str, Any], source: str = "config") -> Config:
    """``cfg`` with each ``"section.key": value`` of ``overrides`` set, typed and checked as a file's values are.

    The one way to change fields by name: `load_config`'s ``section.key=value`` strings and the options of a
    command (``clipzss eval --mode whole`` is ``eval.mode: "whole"``) both end here.
    """
    data = cfg.to_dict()
    for key, value in overrides.items():
        _set(data, key, value, f"'{key}'")
    return Config.from_dict(data, source)


def _set(data: dict[str, Any], key: str, value: Any, what: str) -> None:
    """``data[section][name] = value`` for ``key`` = "section.name"; unknown names fail later, in `_build`."""
    section, _, name = key.partition(".")
    data.setdefault(section, {})
    if not isinstance(data[section], dict):
        raise ConfigError(f"{what}: section '{section}' is not a mapping")
    data[section][name] = value


def _looks_like_float(text: str) -> bool:
    # YAML 1.1 reads "1e-4" as a string; users mean a number.
    try:
        float(text)
    except ValueError:
        return False
    return True
