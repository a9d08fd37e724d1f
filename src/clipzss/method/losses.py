"""CLIP-ZSS losses as pure functions: InfoNCE, logits over text + pseudo prototypes, NEL, CE and prototype BCE.

`compute_losses` assembles one training step's terms after the student forward:
``loss = w_glm·L_global + w_nel·L_nel + w_ce·CE + w_bce·L_bce``. Nothing here reads tensor values on the host, so
a step has no hidden host-device sync (the one exception, documented, is not passing ``max_pseudo``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from clipzss.config import MethodConfig, check_field
from clipzss.data.splits import IGNORE_INDEX
from clipzss.errors import UsageError
from clipzss.method.pseudo_labels import mean_token, token_validity
from clipzss.method.regions import Regions, count_pseudo_slots, downsample_labels, teacher_pseudo_prototypes

# A finite "minus infinity" for padded pseudo channels: exp(-1e4) is exactly 0 in fp32/bf16 softmax, while -inf
# would give NaN in a softmax or a loss if every channel of a row were padding. Representable in fp16 too.
NEG_LOGIT = -1e4


def info_nce(
    pred: torch.Tensor,
    target: torch.Tensor,
    negatives: torch.Tensor | None,
    tau: float,
    positives: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE: for each i, -log softmax over [t_i·p_i, t_j·p_i (j≠i), n_k·p_i] / τ at the positive, batch mean.

    Inputs are used as given (the GLM passes L2-normalised vectors).

    Args:
        pred: (B, C) predictions p (gradient flows here).
        target: (T, C) targets t; target ``positives[i]`` is the positive of pred i and a negative of every other
            pred (T = B when every target has its prediction here; T > B when the targets of other processes join).
        negatives: (n, C) extra negatives (the CLS bank), or None / empty.
        tau: temperature.
        positives: (B,) index of each pred's positive among the targets; None = 0 .. B-1.
        exclude: (B, T + n) bool, keys that are no negative of pred i (the same image); its positive is always
            kept. None = every other key is a negative.
    """
    keys = (
        target if negatives is None or negatives.numel() == 0 else torch.cat([target, negatives.to(target)])
    )
    logits = pred @ keys.T / tau  # (B, T + n)
    if positives is None:
        positives = torch.arange(pred.shape[0], device=pred.device)
    if exclude is not None:
        if exclude.shape != logits.shape:
            raise ValueError(f"exclude must be {tuple(logits.shape)}, got {tuple(exclude.shape)}")
        own = torch.zeros_like(exclude).scatter_(1, positives[:, None], True)
        logits = logits.masked_fill(exclude & ~own, -math.inf)
    return F.cross_entropy(logits, positives)


def build_logits(
    R: torch.Tensor,
    text_seen: torch.Tensor,
    pseudo_protos: torch.Tensor | None = None,
    pseudo_valid: torch.Tensor | None = None,
    alpha: float = 1 / 0.07,
    beta: float | None = None,
) -> torch.Tensor:
    """x = cat(α·cos(R, T_seen), β·cos(R, P_pseudo,b)) along channels, at R's resolution.

    Padding pseudo channels (``pseudo_valid`` False) are set to NEG_LOGIT, so they never win a softmax.

    Args:
        R: (B, C, h, w) student embeddings (any norm).
        text_seen: (S_n, C) seen-class text embeddings.
        pseudo_protos: (B, P, C) per-image pseudo prototypes, or None.
        pseudo_valid: (B, P) bool, or None (all valid).
        alpha: scale of the text logits.
        beta: scale of the pseudo logits; None = alpha.

    Returns:
        (B, S_n + P, h, w) logits.
    """
    feats = F.normalize(R, dim=1)  # (B, C, h, w)
    text = F.normalize(text_seen.to(feats), dim=-1)  # (S_n, C)
    seen = alpha * torch.einsum("bchw,kc->bkhw", feats, text)  # (B, S_n, h, w)
    if pseudo_protos is None or pseudo_protos.shape[1] == 0:
        return seen
    protos = F.normalize(pseudo_protos.to(feats), dim=-1)  # (B, P, C)
    pseudo = (alpha if beta is None else beta) * torch.einsum("bchw,bpc->bphw", feats, protos)  # (B, P, h, w)
    if pseudo_valid is not None:
        pseudo = pseudo.masked_fill(~pseudo_valid[:, :, None, None], NEG_LOGIT)
    return torch.cat([seen, pseudo], dim=1)


def upsample_logits(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (B, K, h, w) → (B, K, H, W): logits are upsampled, never the C-channel embeddings."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _one_hot_targets(
    labels: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(B, H, W) ids → (B, K, H, W) one-hot; ids outside [0, K) (ignore) give an all-zero column."""
    classes = torch.arange(num_classes, device=labels.device)
    return (labels[:, None] == classes[None, :, None, None]).to(dtype)


def _channel_mask(valid_channels: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    b, k = logits.shape[:2]
    if valid_channels is None:
        return logits.new_ones(b, k)
    if valid_channels.shape != (b, k):
        raise ValueError(
            f"valid_channels must be {(b, k)} for logits {tuple(logits.shape)}, got {tuple(valid_channels.shape)}"
        )
    return valid_channels.to(logits.dtype)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 → fp32 for the loss arithmetic; fp64 stays fp64 (the reference tests compare in double)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def masked_focal_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    valid_channels: torch.Tensor | None = None,
    alpha: float = 0.25,
    gamma: float = 2.0,
    ignore_index: int = IGNORE_INDEX,
    norm: str = "zegclip",
    pixels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sigmoid focal loss of every (image, class) map against its one-hot target.

    ``norm="zegclip"`` is ZegCLIP's released criterion (``SegPlusCriterion.loss_masks``): each (image, class) map
    is averaged over all H·W pixels, where an ignored pixel is a negative of every class (its one-hot column is
    zero), and the sum over maps is divided by the number of masks present in the labels (at least 1).
    ``norm="entries"`` (our earlier rule) averages over (non-ignored pixel, valid channel) entries and leaves
    ignored pixels out; it is 5·B·K/M times smaller for M present masks of B images with K channels.

    Args:
        logits: (B, K, H, W).
        labels: (B, H, W) ids in [0, K) or ``ignore_index``.
        valid_channels: (B, K) bool, False for padding channels (never counted); None = all valid.
        norm: "zegclip" or "entries".
        pixels: (B, H, W) bool, False on void pixels, which count nowhere (with "zegclip" a map is then averaged
            over its image's non-void pixels); None = every pixel counts (ZegCLIP's criterion exactly).
    """
    check_field(norm, "method.nel_norm")
    logits = _at_least_fp32(logits)
    channels = _channel_mask(valid_channels, logits)  # (B, K)
    target = _one_hot_targets(labels, logits.shape[1], logits.dtype)  # (B, K, H, W)
    focal = sigmoid_focal_loss(logits, target, alpha, gamma, reduction="none")
    if norm == "zegclip" and pixels is not None:
        weights = pixels.to(logits.dtype)  # (B, H, W)
        per_map = torch.einsum("bkhw,bhw->bk", focal, weights) / weights.sum(dim=(1, 2)).clamp_min(1)[:, None]
        present = (target.amax(dim=(2, 3)) * channels).sum()
        return (per_map * channels).sum() / present.clamp_min(1)
    if norm == "zegclip":
        per_map = focal.mean(dim=(2, 3))  # (B, K)
        present = (target.amax(dim=(2, 3)) * channels).sum()
        return (per_map * channels).sum() / present.clamp_min(1)
    pixels = (labels != ignore_index).to(logits.dtype)  # (B, H, W)
    per_channel = torch.einsum("bkhw,bhw->bk", focal, pixels)  # (B, K) summed over non-ignored pixels
    entries = (pixels.sum(dim=(1, 2)) * channels.sum(dim=1)).sum()
    return (per_channel * channels).sum() / entries.clamp_min(1)


def masked_dice_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    valid_channels: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    norm: str = "zegclip",
    pixels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dice loss 1 - (2Σpt + 1)/(Σp + Σt + 1) of sigmoid maps, mean over the (image, class) pairs whose class is
    present in the image (and valid); 0 when there is none.

    ``norm="zegclip"`` sums Σp over all pixels, as ZegCLIP's ``dice_loss`` does (a class predicted on an ignored
    pixel costs), except void pixels (``pixels`` False); ``norm="entries"`` over non-ignored pixels only.

    Args:
        logits: (B, K, H, W).
        labels: (B, H, W) ids in [0, K) or ``ignore_index``.
        valid_channels: (B, K) bool, or None = all valid.
        norm: "zegclip" or "entries".
        pixels: (B, H, W) bool, False on void pixels; None = every pixel counts.
    """
    check_field(norm, "method.nel_norm")
    logits = _at_least_fp32(logits)
    probs = logits.sigmoid()
    target = _one_hot_targets(labels, logits.shape[1], logits.dtype)  # (B, K, H, W)
    inter = (probs * target).sum(dim=(2, 3))  # (B, K)
    if norm == "zegclip" and pixels is not None:
        prob_sum = torch.einsum("bkhw,bhw->bk", probs, pixels.to(logits.dtype))
    elif norm == "zegclip":
        prob_sum = probs.sum(dim=(2, 3))
    else:
        prob_sum = torch.einsum("bkhw,bhw->bk", probs, (labels != ignore_index).to(logits.dtype))
    target_sum = target.sum(dim=(2, 3))
    dice = 1 - (2 * inter + 1) / (prob_sum + target_sum + 1)  # (B, K)
    present = (target_sum > 0).float() * _channel_mask(valid_channels, logits)
    return (dice * present).sum() / present.sum().clamp_min(1)


def nel_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    valid_channels: torch.Tensor | None = None,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    focal_weight: float = 100.0,
    dice_weight: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    norm: str = "zegclip",
    pixels: torch.Tensor | None = None,
) -> torch.Tensor:
    """ZegCLIP's non-mutually-exclusive loss: per-class sigmoid maps, focal_weight·focal + dice_weight·dice.

    With ``norm="zegclip"`` and ``focal_weight=100`` (ZegCLIP's VOC and COCO zero-shot configs set
    ``mask_weight=100``) this is ZegCLIP's ``SegLossPlus`` on one decoder output; see :func:`masked_focal_loss`
    for the normalisations.

    Args:
        logits: (B, K, H, W) at label resolution.
        labels: (B, H, W) ids in [0, K) or ``ignore_index``.
        valid_channels: (B, K) bool (padding pseudo channels False), or None = all valid.
        norm: "zegclip" or "entries".
        pixels: (B, H, W) bool, False on void pixels, which no term reads; None = every pixel counts.
    """
    focal = masked_focal_loss(
        logits, labels, valid_channels, focal_alpha, focal_gamma, ignore_index, norm, pixels
    )
    dice = masked_dice_loss(logits, labels, valid_channels, ignore_index, norm, pixels)
    return focal_weight * focal + dice_weight * dice


def majority_labels(
    labels: torch.Tensor, size: tuple[int, int], ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Labels at a feature resolution: each cell takes the most frequent id of its s×s block (ignore included).

    A block whose commonest id is ``ignore_index`` stays ignored; ties go to the smaller id (``torch.mode``). When
    the label size is not an exact multiple of ``size``, the cell centres are sampled instead
    (:func:`clipzss.method.regions.downsample_labels`). Memory is that of the labels, whatever the number of classes.

    Args:
        labels: (B, H, W) ids.
        size: (h, w) of the logits.
    """
    b, height, width = labels.shape
    h, w = int(size[0]), int(size[1])
    if (height, width) == (h, w):
        return labels.long()
    sy, sx = height // max(h, 1), width // max(w, 1)
    if sy * h != height or sx * w != width:
        return downsample_labels(labels, (h, w))
    blocks = labels.long().view(b, h, sy, w, sx).permute(0, 1, 3, 2, 4).reshape(b, h, w, sy * sx)
    return blocks.mode(dim=-1).values


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy over the concatenated channels, mean over non-ignored pixels; 0 (not NaN) when all ignored.

    Args:
        logits: (B, K, H, W).
        labels: (B, H, W) ids in [0, K) or ``ignore_index``; padding channels are never targets.
    """
    total = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp_min(1)


def prototype_bce_loss(
    p_seen: torch.Tensor,
    p_seen_class: torch.Tensor,
    text_seen: torch.Tensor,
    scale: float | torch.Tensor = 1 / 0.07,
    valid: torch.Tensor | None = None,
    bias: float | torch.Tensor = 0.0,
    mode: str = "bce",
) -> torch.Tensor:
    """L_bce: ties each seen prototype to its own text over the N×S_n matrix scale·cos(P_seen, T_seen) + bias.

    ``mode="bce"``: multi-label BCE-with-logits, target 1 on the matching class and 0 elsewhere, mean over the
    entries of valid rows. Where its optimum lies depends on scale and bias: with 1/τ and bias 0 the negatives
    dominate and optimising P alone ends at cosine 0.25 to the own text for 15 classes and 0.08 for 156; at
    SigLIP's initial values (scale 10, bias -10; Zhai et al. 2023), the trainer's default, a positive pulls until
    its cosine is 1 while negatives push only above cosine 0.5, so P ends at its own text. ``mode="softmax"``:
    cross-entropy over the S_n texts (bias unused), mean over valid rows. 0 when no row is valid.

    Args:
        p_seen: (N, C) seen-class prototypes.
        p_seen_class: (N,) long, the seen class of each prototype (ignored where not valid).
        text_seen: (S_n, C) seen-class text embeddings.
        scale: logit scale, a number or a () tensor (learnable).
        valid: (N,) bool, rows that are real prototypes; None = all. Masking instead of indexing avoids a sync.
        bias: added to the logits, a number or a () tensor (learnable).
        mode: "bce" or "softmax".
    """
    check_field(mode, "method.bce")
    num_classes = text_seen.shape[0]
    cos = F.normalize(p_seen.float(), dim=-1) @ F.normalize(text_seen.float(), dim=-1).T  # (N, S_n)
    weights = torch.ones(cos.shape[0], device=cos.device) if valid is None else valid.float()
    classes = torch.arange(num_classes, device=p_seen.device)
    if mode == "softmax":
        target_ids = torch.where(weights > 0, p_seen_class, 0).clamp(0, max(num_classes - 1, 0))
        rows = F.cross_entropy(scale * cos, target_ids, reduction="none")  # (N,)
        return (rows * weights).sum() / weights.sum().clamp_min(1)
    logits = scale * cos + bias
    # A comparison, not F.one_hot: one_hot validates its input's range on the host (a device sync on CUDA).
    target = (p_seen_class[:, None] == classes).float()  # (N, S_n)
    rows = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(dim=1)  # (N,)
    return (rows * weights).sum() / (weights.sum() * num_classes).clamp_min(1)


def distill_loss(
    R: torch.Tensor,
    teacher_dense: torch.Tensor,
    tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense distillation: mean of 1 - cos(student embedding, teacher token) over the selected tokens.

    The student's embeddings are area-pooled to the teacher's token grid (the tokens' stride), so each term compares
    one teacher token with the student's mean over the same pixels. 0 when no token is selected.

    Args:
        R: (B, C, h, w) student embeddings (gradient flows here).
        teacher_dense: (B, C, h', w') teacher tokens (detached).
        tokens: (B, h', w') bool, the tokens that count; None = all.
    """
    pooled = F.adaptive_avg_pool2d(R.float(), tuple(teacher_dense.shape[-2:]))  # (B, C, h', w')
    cos = F.cosine_similarity(pooled, teacher_dense.detach().float().to(pooled.device), dim=1)  # (B, h', w')
    weights = torch.ones_like(cos) if tokens is None else tokens.to(cos.dtype)
    return ((1 - cos) * weights).sum() / weights.sum().clamp_min(1)


def gap_shifted(prototypes: torch.Tensor, mean_image: torch.Tensor, text_seen: torch.Tensor) -> torch.Tensor:
    """normalise(P - mean image token + mean seen text): a parameter-free correction of the modality gap.

    Teacher region means sit on the image side of CLIP's modality gap while the seen classifier is text; moving
    every prototype by the difference of the two modalities' means puts it where a text of its content would be.

    Args:
        prototypes: (B, P, C) normalised region means.
        mean_image: (C,) mean of the teacher's (normalised) tokens.
        text_seen: (S_n, C) seen texts.
    """
    text_mean = F.normalize(text_seen.float(), dim=-1).mean(dim=0)
    shift = (text_mean.to(prototypes) - mean_image.to(prototypes))[None, None]
    return F.normalize(prototypes + shift, dim=-1)


def restrict_targets(
    labels: torch.Tensor, valid_channels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Ignore every pixel whose id has no valid logit channel (outside [0, K), or a padding/vanished region).

    A pseudo region can vanish when F is downsampled to the feature size (its prototype slot is then padding); its
    pixels must not become targets of a NEG_LOGIT channel.

    Args:
        labels: (B, H, W) ids.
        valid_channels: (B, K) bool.
    """
    num_channels = valid_channels.shape[1]
    inside = (labels >= 0) & (labels < num_channels)
    index = torch.where(inside, labels, 0).flatten(1)  # (B, H*W)
    ok = inside & valid_channels.gather(1, index).view_as(labels)
    return torch.where(ok, labels, ignore_index)


def compute_losses(
    R: torch.Tensor,
    labels: torch.Tensor,
    text_seen: torch.Tensor,
    teacher_cls: torch.Tensor,
    teacher_dense: torch.Tensor,
    num_seen: int,
    cfg: MethodConfig,
    glm: Callable[..., torch.Tensor] | None = None,
    synthesizer: Callable[..., Regions] | None = None,
    max_pseudo: int | None = None,
    valid: torch.Tensor | None = None,
    ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Every loss term of one training step after the student forward, each multiplied by its weight.

    Keys: "glm" (cfg.glm), "bce" (cfg.synthesizer; 0 when a batch has no seen region, so the key set never depends
    on data), "nel" (cfg.nel), "ce" (cfg.ce), "distill" (cfg.w_distill > 0) and "loss" = their sum. With only
    ``ce`` on this is the plain supervised student with a text classifier. Computed in fp32 with autocast off.

    Args:
        R: (B, C, h, w) student embeddings (stride 4, unnormalised).
        labels: (B, H, W) fused labels F: seen ids, pseudo ids >= num_seen (only with cfg.pseudo_labels), 255
            (unlabelled and padding alike).
        text_seen: (S_n, C) seen text embeddings.
        teacher_cls: (B, C) teacher CLS, normalised.
        teacher_dense: (B, C, h', w') teacher dense tokens, normalised.
        num_seen: S_n.
        cfg: the method config (switches, weights, scales).
        glm: the :class:`clipzss.method.glm.GLM`, needed when cfg.glm: ``glm(R, teacher_cls, valid)`` → L_global.
        synthesizer: the :class:`clipzss.method.synthesizer.Synthesizer` (possibly DDP-wrapped), needed when
            cfg.synthesizer: ``synthesizer(R, labels, teacher_cls, teacher_dense, num_seen, num_pseudo, valid)`` →
            :class:`clipzss.method.regions.Regions`.
        max_pseudo: host-side upper bound on pseudo regions per image (e.g. int(num_pseudo.max()) from
            pseudo_labels). None reads it from ``labels``: one host-device sync per step.
        valid: (B, H, W) bool, False on void pixels (crop padding, the dataset's void): excluded from GLM's
            pooling, the synthesizer's keys, NEL (where ZegCLIP's rule would count them as negatives), the
            distillation and the centring of the gap correction (CE ignores them through ``labels``). None = every
            pixel is image.
        ids: (B,) image identities for GLM's negatives (:func:`clipzss.method.glm.image_ids`), or None.
    """
    if not (cfg.glm or cfg.synthesizer or cfg.nel or cfg.ce or cfg.w_distill > 0):
        raise UsageError("every loss is switched off (method.glm, synthesizer, nel and ce are all false)")
    if cfg.glm and glm is None:
        raise ValueError("method.glm is on but no GLM module was given to compute_losses")
    if cfg.synthesizer and synthesizer is None:
        raise ValueError("method.synthesizer is on but no Synthesizer was given to compute_losses")
    if text_seen.shape[0] != num_seen:
        raise ValueError(f"text_seen has {text_seen.shape[0]} rows but num_seen is {num_seen}")

    losses: dict[str, torch.Tensor] = {}
    batch = R.shape[0]
    image = valid  # (B, H, W) non-void pixels; `valid` is reused below for the logit channels
    with torch.autocast(R.device.type, enabled=False):
        R = R.float()
        if cfg.glm:
            feat_valid = (
                None if valid is None else downsample_labels(valid.long(), tuple(R.shape[-2:])).bool()
            )
            losses["glm"] = cfg.w_glm * glm(R, teacher_cls, feat_valid, ids)
        token_valid = (
            None if valid is None else token_validity(valid, tuple(teacher_dense.shape[-2:]))
        )  # (B, h', w')
        if cfg.w_distill > 0:
            check_field(cfg.distill_pixels, "method.distill_pixels")
            tokens = token_valid
            if cfg.distill_pixels == "unlabelled":  # no ground truth: pseudo ids or still unlabelled
                unlabelled = downsample_labels(labels, tuple(teacher_dense.shape[-2:])) >= num_seen
                tokens = unlabelled if tokens is None else tokens & unlabelled
            losses["distill"] = cfg.w_distill * distill_loss(R, teacher_dense, tokens)

        num_pseudo = 0
        if cfg.pseudo_labels:
            num_pseudo = count_pseudo_slots(labels, num_seen) if max_pseudo is None else max_pseudo
        if num_seen + num_pseudo > IGNORE_INDEX:
            raise UsageError(
                f"{num_seen} seen + {num_pseudo} pseudo ids reach the ignore label {IGNORE_INDEX}; lower the number "
                "of pseudo regions (method.min_region)"
            )
        pseudo_protos = pseudo_valid = None
        if cfg.synthesizer:
            regions = synthesizer(R, labels, teacher_cls, teacher_dense, num_seen, num_pseudo, valid)
            seen_protos, seen_valid = regions.seen()  # (B, S_n, C), (B, S_n)
            classes = torch.arange(num_seen, device=R.device).repeat(batch)  # (B*S_n,)
            check_field(cfg.bce, "method.bce")
            scale, bias = (1 / cfg.tau, 0.0) if cfg.bce == "softmax" else (cfg.bce_scale, cfg.bce_bias)
            if regions.logit_scale is not None:  # method.bce_learnable: the synthesizer's own scale and bias
                scale, bias = regions.logit_scale, regions.logit_bias
            losses["bce"] = cfg.w_bce * prototype_bce_loss(
                seen_protos.flatten(0, 1), classes, text_seen, scale, seen_valid.flatten(), bias, cfg.bce
            )
            if num_pseudo:
                pseudo_protos, pseudo_valid = regions.pseudo()
                if cfg.synth_detach:  # the correction then learns from L_bce alone
                    pseudo_protos = pseudo_protos.detach()
        elif num_pseudo:
            pseudo_protos, pseudo_valid = teacher_pseudo_prototypes(
                teacher_dense, labels, num_seen, num_pseudo
            )
        check_field(cfg.prototype_gap, "method.prototype_gap")
        if cfg.prototype_gap == "shift" and cfg.pseudo_labels:
            # Every step on every rank (the mean is all-reduced), whether or not this rank has pseudo regions.
            mean_image = mean_token(teacher_dense.float(), token_valid).flatten()  # (C,)
            if pseudo_protos is not None:
                pseudo_protos = gap_shifted(pseudo_protos, mean_image, text_seen)

        if cfg.nel or cfg.ce:
            check_field(cfg.loss_resolution, "method.loss_resolution")
            logits = build_logits(
                R, text_seen, pseudo_protos, pseudo_valid, cfg.alpha, cfg.beta
            )  # (B, K, h, w)
            if cfg.loss_resolution == "full":
                logits = upsample_logits(logits, tuple(labels.shape[-2:]))  # (B, K, H, W)
                targets = labels
            else:  # the labels come down to the logits instead: K-channel maps stay at stride 4
                targets = majority_labels(labels, tuple(logits.shape[-2:]))
            seen_ok = torch.ones(batch, num_seen, dtype=torch.bool, device=R.device)
            valid = seen_ok if pseudo_valid is None else torch.cat([seen_ok, pseudo_valid], dim=1)  # (B, K)
            targets = restrict_targets(targets, valid)
            pixels = None
            if image is not None and not cfg.nel_void_negatives:  # void pixels at the targets' resolution
                pixels = (
                    image
                    if cfg.loss_resolution == "full"
                    else majority_labels(image.long(), tuple(logits.shape[-2:])).bool()
                )
            if cfg.nel:
                losses["nel"] = cfg.w_nel * nel_loss(
                    logits,
                    targets,
                    valid,
                    cfg.focal_alpha,
                    cfg.focal_gamma,
                    cfg.focal_weight,
                    cfg.dice_weight,
                    norm=cfg.nel_norm,
                    pixels=pixels,
                )
            if cfg.ce:
                losses["ce"] = cfg.w_ce * ce_loss(logits, targets)
    losses["loss"] = torch.stack(list(losses.values())).sum()
    return losses
