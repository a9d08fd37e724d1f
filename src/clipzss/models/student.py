"""The student: any segmentation-models-pytorch network that returns C-channel pixel embeddings at stride 4.

smp models upsample their last map to full resolution. With ``classes = C = 512`` that map costs 1 GB per 512x512
image, so every architecture is re-wired here to stop at stride 4; the caller computes K-class
logits there and upsamples those. How each architecture gets there is listed in ``SUPPORTED_ARCHS``.

The encoder's starting weights (``StudentConfig.weights``: none, a hub tag or a local file) are resolved by
:mod:`clipzss.models.student_weights` before the network is built.
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any

import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base.heads import SegmentationHead
from segmentation_models_pytorch.base.initialization import initialize_head
from segmentation_models_pytorch.decoders.dpt.decoder import DPTSegmentationHead
from segmentation_models_pytorch.decoders.segformer.decoder import SegformerDecoder
from torch import nn

from clipzss.config import StudentConfig
from clipzss.errors import UsageError
from clipzss.messages import did_you_mean
from clipzss.models.student_weights import load_encoder_state, resolve_weights

logger = logging.getLogger(__name__)

# Every smp 0.6 architecture this module accepts, and how it reaches stride 4. smp models end at full resolution,
# so the head's upsampling factor is the decoder's output stride; the factor is read from the built model.
SUPPORTED_ARCHS: dict[str, str] = {
    "Segformer": "its MLP decoder fuses at 1/4; the head's x4 upsampling is dropped",
    "FPN": "its pyramid is merged at 1/4; the head's x4 upsampling is dropped",
    "UPerNet": "its FPN fuses at 1/4; the head's x4 upsampling is dropped",
    "PAN": "its last attention-upsampling block is at 1/4; the head's x4 upsampling is dropped",
    "DeepLabV3Plus": "its decoder fuses ASPP with the 1/4 features; the head's x4 upsampling is dropped",
    "DeepLabV3": "ASPP runs at the encoder's output stride (8 by default); the head upsamples x2 instead of x8",
    "PSPNet": "the pyramid pooling runs at 2**encoder_depth (1/8 by default); the head upsamples x2 instead of x8",
    "DPT": "its fusion ends at 1/2; that map is average-pooled x2 before the head, the head's x2 upsampling dropped",
    "Unet": "the decoder stops after the block that fuses the 1/4 skip (its 1/2 and 1/1 blocks are removed)",
    "MAnet": "the decoder stops after the block that fuses the 1/4 skip (its 1/2 and 1/1 blocks are removed)",
    "Linknet": "the decoder stops after the block that fuses the 1/4 skip (its 1/2 and 1/1 blocks are removed)",
}
_TRUNCATED_DECODERS = ("Unet", "MAnet", "Linknet")
_REJECTED_ARCHS: dict[str, str] = {
    "UnetPlusPlus": "its nested decoder only finishes at full resolution and cannot be cut at 1/4 (use Unet)",
}
# smp arguments this module sets itself: the student always maps RGB to raw (not activated) embeddings.
_RESERVED_KWARGS = ("encoder_name", "encoder_weights", "classes", "activation", "in_channels", "upsampling")


class Student(nn.Module):
    """An smp model re-wired to return (B, embed_dim, ceil(H/4), ceil(W/4)) embeddings, not normalised.

    Inputs are images normalised with IMAGENET_MEAN/STD; sizes the encoder cannot take are padded at the bottom
    and right with zeros (the mean colour) and the output is cropped back. Channels-last inputs stay channels-last.
    """

    output_stride: int = 4

    def __init__(
        self, model: nn.Module, embed_dim: int, pad_multiple: int, arch: str, encoder: str, min_size: int = 0
    ) -> None:
        super().__init__()
        self.model = model
        self.embed_dim = embed_dim
        self.pad_multiple = pad_multiple
        self.min_size = min_size
        self.arch = arch
        self.encoder_name = encoder
        # Names of parameters smp builds but the forward never uses, frozen by build_student (for training).
        self.unused_parameters: tuple[str, ...] = ()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, embed_dim, ceil(H/4), ceil(W/4)) embeddings."""
        height, width = images.shape[-2:]
        padded_h, padded_w = self.padded_size(height, width)
        pad_h, pad_w = padded_h - height, padded_w - width
        x = images
        if pad_h or pad_w:
            x = F.pad(images, (0, pad_w, 0, pad_h))  # (B, 3, H', W'), zeros = mean colour after normalisation
            if images.is_contiguous(memory_format=torch.channels_last):
                x = x.contiguous(memory_format=torch.channels_last)
        out = self.model(x)  # (B, C, H'/4, W'/4)
        static = all(isinstance(size, int) for size in out.shape[-2:])  # not under symbolic export shapes
        if static and not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            expected = (padded_h // 4, padded_w // 4)
            if tuple(out.shape[-2:]) != expected:
                raise UsageError(
                    f"student {self.arch}/{self.encoder_name} returned a {tuple(out.shape[-2:])} map for a "
                    f"{tuple(x.shape[-2:])} input instead of {expected} (stride 4); its arch_kwargs change the "
                    "decoder's stride in a way this module does not handle"
                )
        return out[..., : math.ceil(height / 4), : math.ceil(width / 4)]

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """The input size the network actually runs at: the next multiple it needs, at least its minimum."""
        return (
            max(height + -height % self.pad_multiple, self.min_size),
            max(width + -width % self.pad_multiple, self.min_size),
        )

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The backbone's parameters (base learning rate)."""
        return list(self.model.encoder.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        """Every other parameter (decoder and head, learning rate x head_lr_mult)."""
        return [p for name, p in self.named_parameters() if not name.startswith("model.encoder.")]


class _Stride4Head(nn.Module):
    """The smp head's convolutions between an optional pooling of a finer map and an upsampling of a coarser one."""

    def __init__(self, core: nn.Module, pool: int = 1, upsample: int = 1) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(pool) if pool > 1 else nn.Identity()
        self.core = core
        self.upsample = (
            nn.Upsample(scale_factor=upsample, mode="bilinear", align_corners=False)
            if upsample > 1
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.core(self.pool(x)))


class _FusedSegformerDecoder(nn.Module):
    """smp's Segformer decoder computed in a cheaper order: the same function, parameters and state-dict keys.

    smp maps each stage to 256 channels (a linear layer), upsamples all of them to 1/4, concatenates them (1024
    channels) and fuses them with a 1×1 convolution. Linear maps commute with bilinear upsampling, so each stage's
    linear layer and its block of the fusion weights are multiplied first (a 256 × C_i matrix, tiny) and applied
    at the stage's own resolution; the stages are then upsampled and summed. The 1024-channel map at 1/4 and the
    4.3 GMAC fusion convolution at 512² disappear: SegFormer-B0 runs about twice as fast on a CPU (B2 ~7%), equal
    to smp's forward up to float rounding (summation order). BatchNorm and ReLU of the fusion stage follow as before.
    """

    def __init__(self, decoder: SegformerDecoder) -> None:
        super().__init__()
        self.mlp_stage = decoder.mlp_stage
        self.fuse_stage = decoder.fuse_stage

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        target = [size // 4 for size in features[0].shape[2:]]
        features = features[2:] if features[1].size(1) == 0 else features[1:]  # as smp: skip an empty stage
        conv = self.fuse_stage[0]
        blocks = conv.weight.flatten(1).split(conv.weight.shape[0], dim=1)  # one (256, 256) block per stage
        out, bias = None, conv.bias
        for block, mlp, feature in zip(blocks, self.mlp_stage, features[::-1], strict=False):
            weight = block @ mlp.linear.weight  # (256, C_i)
            stage = torch.einsum("oc,bchw->bohw", weight, feature)  # (B, 256, h_i, w_i)
            if list(stage.shape[2:]) != target:
                stage = F.interpolate(stage, size=target, mode="bilinear", align_corners=False)
            out = stage if out is None else out + stage
            stage_bias = block @ mlp.linear.bias  # constant maps upsample to themselves
            bias = stage_bias if bias is None else bias + stage_bias
        out = out + bias[None, :, None, None]  # (B, 256, H/4, W/4): the fusion convolution's output
        for module in list(self.fuse_stage)[1:]:  # norm, activation
            out = module(out)
        return out


def build_student(cfg: StudentConfig, *, for_training: bool = True) -> Student:
    """Build the smp network ``cfg.arch`` / ``cfg.encoder`` with ``cfg.embed_dim`` output channels at stride 4.

    A small probe image runs through the new network, so an encoder that cannot take the sizes the student gives
    it fails here, in one line. For training the probe also runs backward and freezes the parameters that get no
    gradient (`Student.unused_parameters`; DDP refuses trainable parameters outside the loss). With
    ``for_training=False`` (prediction, evaluation, export) the probe is a forward pass alone, without autograd,
    and nothing is frozen.

    Raises:
        ValueError: unknown or unsupported architecture / encoder, bad ``arch_kwargs``, weights that do not fit.
        FileNotFoundError: a weights file that does not exist.
        OfflineError: hub weights that are neither cached nor downloadable (offline).
    """
    arch_cls = _resolve_arch(cfg.arch)
    _check_encoder(cfg.encoder)
    model = _weighted_network(arch_cls, cfg)
    student = _stride4_student(model, arch_cls.__name__, cfg)
    _probe(student, backward=for_training)
    if for_training:
        student.unused_parameters = _freeze_unused(student)
    return student


def _weighted_network(arch_cls: type[nn.Module], cfg: StudentConfig) -> nn.Module:
    """The smp network ``cfg`` names, its encoder holding the weights ``cfg.weights`` names."""
    kwargs = _arch_kwargs(cfg, arch_cls)
    weights = resolve_weights(cfg)
    model = _create(arch_cls, cfg, kwargs, pretrained=weights.timm, timm_checkpoint=weights.timm_state)
    if weights.encoder_state is None:
        return model
    loaded = load_encoder_state(model.encoder, weights.encoder_state, weights.where)
    if not loaded and cfg.encoder.startswith("tu-"):
        # Not the encoder's own keys: let timm load it as a checkpoint of the classification model.
        try:
            model = _create(arch_cls, cfg, kwargs, pretrained=True, timm_checkpoint=weights.encoder_state)
        except ValueError as err:
            raise ValueError(
                f"{weights.where} is neither a state dict of encoder '{cfg.encoder}' nor a timm checkpoint of "
                f"'{cfg.encoder[3:]}' ({err.__cause__ or err})"
            ) from None
    logger.info("student encoder %s: weights loaded from %s", cfg.encoder, weights.where)
    return model


def _stride4_student(model: nn.Module, arch: str, cfg: StudentConfig) -> Student:
    """Re-wire ``model`` to end at stride 4 (`SUPPORTED_ARCHS`) and wrap it with the input sizes it needs."""
    _make_stride4(model, arch, cfg.embed_dim)
    if isinstance(model.decoder, SegformerDecoder) and model.decoder.fuse_stage[0].kernel_size == (1, 1):
        model.decoder = _FusedSegformerDecoder(model.decoder)
    multiple = _pad_multiple(model, arch)
    # PAN's feature pyramid attention pools its coarsest map three more times: it needs 8 pixels there.
    min_size = 8 * int(model.encoder.output_stride) if arch == "PAN" else 0
    return Student(model, cfg.embed_dim, multiple, arch, cfg.encoder, min_size=min_size)


def _probe(student: Student, backward: bool) -> None:
    """Run the smallest image the student takes through it (and back, with ``backward``), or fail in one line."""
    size = max(2 * student.pad_multiple, student.min_size)
    was_training = student.training
    student.eval()  # a probe must not move BatchNorm statistics; eval runs every branch that training does
    try:
        with torch.enable_grad() if backward else torch.no_grad():
            out = student(torch.zeros(1, 3, size, size))
            if backward:
                out.sum().backward()
    except (RuntimeError, AssertionError) as err:  # e.g. a fixed-size ViT told dynamic_img_size=False
        raise UsageError(
            f"student {student.arch}/{student.encoder_name} cannot run a {size}x{size} image: {err}"
        ) from err
    finally:
        student.train(was_training)


def _freeze_unused(student: Student) -> tuple[str, ...]:
    """Freeze the parameters that got no gradient in the probe's backward; return their names.

    smp keeps modules the forward never runs (the deeper stages of a depth-3 encoder, a ViT's final norm and
    classifier); DDP fails on trainable parameters that take no part in the loss.
    """
    unused = []
    for name, param in student.named_parameters():
        if param.requires_grad and param.grad is None:
            param.requires_grad_(False)
            unused.append(name)
        param.grad = None
    if unused:
        logger.info(
            "student %s/%s: froze %d unused parameters (%s, ...)",
            student.arch,
            student.encoder_name,
            len(unused),
            unused[0],
        )
    return tuple(unused)


def _did_you_mean(name: str, choices: list[str]) -> str:
    hint = did_you_mean(name, choices)
    return f" ({hint})" if hint else ""


def _resolve_arch(name: str) -> type[nn.Module]:
    supported = list(SUPPORTED_ARCHS)
    by_lower = {a.__name__.lower(): a for a in smp._MODEL_ARCHITECTURES}
    arch_cls = by_lower.get(name.lower())
    if arch_cls is None:
        raise UsageError(
            f"unknown student architecture '{name}'; choose one of {', '.join(supported)}"
            + _did_you_mean(name, supported)
        )
    if arch_cls.__name__ not in SUPPORTED_ARCHS:
        reason = _REJECTED_ARCHS.get(arch_cls.__name__, "it has no stride-4 output")
        raise UsageError(
            f"student architecture '{arch_cls.__name__}' is not supported: {reason}; "
            f"choose one of {', '.join(supported)}"
        )
    return arch_cls


def _check_encoder(name: str) -> None:
    if name.startswith("tu-"):
        if not timm.is_model(name[3:]):
            hint = _did_you_mean(name, [f"tu-{model}" for model in timm.list_models()])
            raise UsageError(f"unknown timm encoder '{name}': '{name[3:]}' is not a timm model{hint}")
        try:
            timm.models.get_pretrained_cfg(name[3:])
        except RuntimeError as err:  # a tag the architecture does not have, e.g. tu-convnext_atto.nope
            raise UsageError(f"unknown timm encoder '{name}': {err}") from None
        return
    names = smp.encoders.get_encoder_names()
    if name not in names:
        raise UsageError(
            f"unknown student encoder '{name}'; choose one of {', '.join(names)}, or any timm model as "
            f"tu-<timm name> (e.g. tu-convnext_tiny)" + _did_you_mean(name, names)
        )


def _arch_kwargs(cfg: StudentConfig, arch_cls: type[nn.Module]) -> dict[str, Any]:
    arch = arch_cls.__name__
    kwargs = dict(cfg.arch_kwargs)
    for key in (*_RESERVED_KWARGS, "aux_params"):
        if key in kwargs:
            raise UsageError(
                f"student.arch_kwargs may not set '{key}': the student sets it itself "
                "(encoder and weights have their own fields, the output is always embed_dim raw channels)"
            )
    if cfg.encoder.startswith("tu-"):
        pretrained_cfg = timm.models.get_pretrained_cfg(cfg.encoder[3:], allow_unregistered=True)
        if pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
            # ViT/Swin-style timm models take only their pretraining size unless told otherwise; training crops,
            # padded odd sizes and sliding windows are not that size.
            kwargs.setdefault("dynamic_img_size", True)
    else:
        # smp passes unknown keys to the encoder, and its own encoders silently ignore them: catch typos here.
        valid = [
            k
            for k in inspect.signature(arch_cls).parameters
            if k not in (*_RESERVED_KWARGS, "aux_params", "kwargs")
        ]
        for key in kwargs:
            if key not in valid:
                raise UsageError(
                    f"unknown student.arch_kwargs key '{key}' for {arch} with an smp encoder; valid keys: "
                    f"{', '.join(valid)}" + _did_you_mean(key, valid)
                )
    return kwargs


def _create(
    arch_cls: type[nn.Module],
    cfg: StudentConfig,
    kwargs: dict[str, Any],
    pretrained: bool = False,
    timm_checkpoint: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """The smp network; ``pretrained`` builds a ``tu-`` encoder by timm's loader, from ``timm_checkpoint`` if given."""
    if timm_checkpoint is not None:
        kwargs = {**kwargs, "pretrained_cfg_overlay": {"state_dict": timm_checkpoint}}
    try:
        return arch_cls(
            encoder_name=cfg.encoder,
            encoder_weights=True if pretrained else None,
            in_channels=3,
            classes=cfg.embed_dim,
            activation=None,
            **kwargs,
        )
    except (ValueError, KeyError, TypeError, RuntimeError, AssertionError) as err:
        raise UsageError(
            f"cannot build student {arch_cls.__name__} with encoder '{cfg.encoder}' and arch_kwargs "
            f"{ {k: v for k, v in kwargs.items() if k != 'pretrained_cfg_overlay'} }: {err}"
        ) from err


def _make_stride4(model: nn.Module, arch: str, embed_dim: int) -> None:
    """Replace the model's segmentation head so its output has stride 4 (see SUPPORTED_ARCHS)."""
    head = model.segmentation_head
    if isinstance(head, SegmentationHead):
        core, factor = head[0], head[1].scale_factor if isinstance(head[1], nn.Upsample) else 1
    elif isinstance(head, DPTSegmentationHead):
        core, factor = head.head, head.upsampling_factor
    else:
        raise UsageError(f"student {arch}: unexpected smp head {type(head).__name__}")
    stride = int(factor)  # the decoder's output stride: smp heads upsample it to full resolution
    if stride == 1 and arch in _TRUNCATED_DECODERS:
        blocks = model.decoder.blocks
        keep = len(blocks) - 2  # the blocks after this one work at 1/2 and 1/1
        if keep < 1:
            raise UsageError(f"student {arch} needs encoder_depth >= 3 to have a stride-4 decoder stage")
        model.decoder.blocks = blocks[:keep]
        channels = _last_conv_channels(blocks[keep - 1])
        kernel = core.kernel_size[0]
        core = nn.Conv2d(channels, embed_dim, kernel_size=kernel, padding=kernel // 2)
        initialize_head(core)
        stride = 4
    if stride not in (2, 4, 8, 16, 32):
        raise UsageError(
            f"student {arch}: its decoder works at stride {stride}, which cannot be brought to 4"
        )
    model.segmentation_head = _Stride4Head(core, pool=max(4 // stride, 1), upsample=max(stride // 4, 1))


def _last_conv_channels(block: nn.Module) -> int:
    """Output channels of a decoder block: its last convolution outside attention modules."""
    convs = [
        m
        for name, m in block.named_modules()
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d) and "attention" not in name
    ]
    return convs[-1].out_channels


def _pad_multiple(model: nn.Module, arch: str) -> int:
    """The input size multiple the encoder and decoder need so every feature map aligns (usually 32)."""
    multiple = max(int(model.encoder.output_stride), 4)
    if arch == "DPT":
        # DPT resamples its ViT features to 1/4 ... 1/2**(n+1) and fuses them by x2 steps.
        multiple = max(multiple, 2 ** (len(model.encoder.output_strides) + 1))
    return multiple
