"""The transductive setting: named pseudo labels for the target classes and the EMA student that refreshes them.

Under ``data.setting=transductive`` the unseen class names (the *targets*) are known in training, their labels
never are. The label space of a step is then seen ids ``0 .. S-1``, target ids ``S .. S+T-1`` (named pseudo labels)
and PLM cluster ids from ``S+T`` on; the text classifier of the losses is the seen texts followed by the target
texts. Only pixels whose training label is unlabelled (255, never void) are ever named, so no target-class label
can reach a pseudo label or a loss: the training masks hold 255 there (`clipzss.data.splits.training_mask`) and
nothing here reads anything else of them.

Schedule: the teacher's dense tokens name the pixels from the first step (MaskCLIP+'s annotation-free labels);
once ``transductive.self_train_start`` steps are done, an exponential moving average of the student names them
instead (MaskCLIP+'s self-training, as a mean teacher: the EMA smooths the student's noise, and its labels change
slowly, so the student never chases its own latest mistakes).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipzss.config import MethodConfig, TransductiveConfig, check_field
from clipzss.data.splits import IGNORE_INDEX
from clipzss.errors import UsageError
from clipzss.method.pseudo_labels import pseudo_labels, upsample_regions


def name_pixels(
    features: torch.Tensor,
    texts: torch.Tensor,
    labels: torch.Tensor,
    num_seen: int,
    scale: float,
    threshold: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fill unlabelled pixels with a target id where a text classifier on ``features`` is confident.

    Each feature vector is classified by softmax(scale·cos(feature, text)) over all texts, seen and target alike:
    a pixel is named only when the winner is a target and its probability reaches ``threshold``, so a token that
    looks like a seen class (the teacher's confusion on unlabelled content) stays unlabelled. The feature grid is
    brought to the label size nearest, as PLM's regions are. Labelled and void pixels keep their label.

    Args:
        features: (B, C, h, w) teacher tokens or student embeddings (any norm).
        texts: (S + T, C) seen then target text embeddings.
        labels: (B, H, W) seen ids, ``IGNORE_INDEX`` on unlabelled (and void) pixels.
        num_seen: S; target t gets id S + t.
        scale: logit scale of the cosines.
        threshold: least softmax probability of a kept name.
        valid: (B, H, W) bool, False on void pixels, which are never named; None = every pixel is image.

    Returns:
        (B, H, W) int64 labels with target ids on the confidently named unlabelled pixels.
    """
    feats = F.normalize(features.detach().float(), dim=1)
    text = F.normalize(texts.detach().float().to(feats.device), dim=-1)
    probs = (scale * torch.einsum("bchw,kc->bkhw", feats, text)).softmax(dim=1)  # (B, K, h, w)
    confidence, winner = probs.max(dim=1)  # (B, h, w)
    named = torch.where((winner >= num_seen) & (confidence >= threshold), winner, IGNORE_INDEX)
    named = upsample_regions(named, tuple(labels.shape[-2:]))  # (B, H, W)
    unlabelled = labels == IGNORE_INDEX
    if valid is not None:
        unlabelled &= valid
    return torch.where(unlabelled & (named != IGNORE_INDEX), named, labels.long())


def transductive_labels(
    named: torch.Tensor,
    labels: torch.Tensor,
    dense: torch.Tensor,
    num_known: int,
    method: MethodConfig,
    cfg: TransductiveConfig,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Named labels and PLM clusters combined on the unlabelled pixels (``transductive.clusters``).

    ``"unnamed"``: the clusters are made on, and fill, only the pixels still unlabelled after naming. ``"replace"``:
    the clusters fill every unlabelled pixel as in the inductive setting, then a named label replaces the cluster id
    wherever it exists (a cluster may then keep no pixel: its slot is padding to the losses). Without
    ``method.pseudo_labels`` the named labels alone.

    Args:
        named: (B, H, W) ``labels`` with target ids filled in (`name_pixels`).
        labels: (B, H, W) seen ids and ``IGNORE_INDEX``, before naming.
        dense: (B, C, h, w) teacher tokens (the clusters').
        num_known: seen + target classes; cluster ids start here.
        method, cfg: the method and transductive configs.
        valid: (B, H, W) bool, False on void pixels.

    Returns:
        fused (B, H, W) int64 and num_pseudo (B,) int64, the cluster slots of each image.
    """
    check_field(cfg.clusters, "transductive.clusters")
    if cfg.clusters == "unnamed" or not method.pseudo_labels:
        return pseudo_labels(dense, named, num_known, method, valid)
    clustered, num_pseudo = pseudo_labels(dense, labels, num_known, method, valid)
    return torch.where(named != labels, named, clustered), num_pseudo


class EMAStudent(nn.Module):
    """An exponential moving average of the student (weights averaged, buffers copied), in eval mode.

    ``steps`` counts the updates, one per training step: it decides when self-training starts and is saved with
    the training state, so a resumed run names the same pixels as an uninterrupted one.
    """

    def __init__(self, student: nn.Module, decay: float) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise UsageError(f"transductive.ema_decay={decay} must be in [0, 1)")
        self.decay = decay
        self.model = copy.deepcopy(student).eval().requires_grad_(False)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.done = 0  # = steps, on the host: the step reads it without waiting for the device

    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False) -> object:
        result = super().load_state_dict(state_dict, strict, assign)
        self.done = int(self.steps)
        return result

    def train(self, mode: bool = True) -> EMAStudent:
        """The copy stays in eval mode: its batch norms use the averaged running statistics."""
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """ema = decay·ema + (1 - decay)·student for every parameter; buffers (norm statistics) copied."""
        for ema, live in zip(self.model.parameters(), student.parameters(), strict=True):
            ema.lerp_(live.detach(), 1.0 - self.decay)
        for ema, live in zip(self.model.buffers(), student.buffers(), strict=True):
            ema.copy_(live)
        self.steps += 1
        self.done += 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)
