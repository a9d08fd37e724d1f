"""Regions of the fused labels F in id-indexed slots: pooling features over them, and the slot layout itself.

F (B, H, W) holds 0 .. S_n-1 for the seen classes, S_n .. S_n+P-1 for pseudo regions and 255 for ignore (crop
padding included). Regions are laid out in *slots indexed by label id*: slot k of every image holds region id k
(seen class k for k < S_n, pseudo region k - S_n after that), padded when the id is absent. Shapes therefore
depend only on host-side counts, never on tensor values, so nothing here forces a host-device sync (except
`count_pseudo_slots`, which says so). The GLM (:mod:`clipzss.method.glm`), the synthesizer (:mod:`clipzss.method.synthesizer`)
and the losses (:mod:`clipzss.method.losses`) all read regions through this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clipzss.data.splits import IGNORE_INDEX


def downsample_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest label map at a feature resolution, sampling each cell's centre ("nearest-exact").

    Centre sampling matches what a stride-s feature cell sees better than the top-left pixel (plain "nearest").
    """
    if labels.ndim != 3:
        raise ValueError(f"labels must be (B, H, W), got shape {tuple(labels.shape)}")
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long()
    # Float interpolation is exact for integer ids below 2**24.
    small = F.interpolate(labels[:, None].float(), size=size, mode="nearest-exact")  # (B, 1, h, w)
    return small[:, 0].long()


def region_means(
    feats: torch.Tensor, labels: torch.Tensor, num_ids: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean feature of every region id 0 .. num_ids-1 in each image, with one one-hot batched matmul.

    Labels outside [0, num_ids) (ignore, negatives, ids beyond the range) belong to no region. Gradients flow into
    ``feats``. Slot k of the output is id k, so shapes are static and no Python loop touches pixels.

    Args:
        feats: (B, C, h, w) features.
        labels: (B, h, w) integer ids at the features' resolution.
        num_ids: number of id slots (exclusive upper bound of the ids pooled).

    Returns:
        means (B, num_ids, C) (zero where absent) and valid (B, num_ids) bool (the id has at least one pixel).
    """
    if feats.ndim != 4 or labels.shape != (feats.shape[0], *feats.shape[2:]):
        raise ValueError(
            f"region_means needs feats (B, C, h, w) and labels (B, h, w) of the same B, h, w; "
            f"got {tuple(feats.shape)} and {tuple(labels.shape)}"
        )
    ids = torch.arange(num_ids, device=feats.device)  # (Q,)
    member = labels.flatten(1)[:, None, :] == ids[None, :, None]  # (B, Q, L)
    counts = member.sum(dim=-1)  # (B, Q) int: exact, unlike a bf16 sum
    sums = torch.bmm(member.to(feats.dtype), feats.flatten(2).transpose(1, 2))  # (B, Q, C)
    means = sums / counts.clamp_min(1)[..., None].to(sums.dtype)
    return means, counts > 0


def teacher_pseudo_prototypes(
    dense: torch.Tensor, labels: torch.Tensor, num_seen: int, num_pseudo: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo classifiers without a synthesizer: normalised means of the teacher's tokens over each pseudo region.

    A CLIP-space prototype of the region, detached (the teacher is frozen), so it trains the student's pixels only.

    Args:
        dense: (B, C, h', w') teacher dense tokens.
        labels: (B, H, W) fused labels at label resolution.
        num_seen: first pseudo id.
        num_pseudo: pseudo slots per image (upper bound on regions of any image).

    Returns:
        prototypes (B, num_pseudo, C) L2-normalised and valid (B, num_pseudo) bool.
    """
    small = downsample_labels(labels, tuple(dense.shape[-2:]))  # (B, h', w')
    local = torch.where(small >= num_seen, small - num_seen, -1)  # pseudo ids → 0 .. P-1; 255 lands beyond P
    means, valid = region_means(dense.detach().float(), local, num_pseudo)
    return F.normalize(means, dim=-1), valid


def count_pseudo_slots(labels: torch.Tensor, num_seen: int, ignore_index: int = IGNORE_INDEX) -> int:
    """Pseudo slots needed for ``labels``: highest non-ignored id - num_seen + 1 (>= 0). Syncs with the device."""
    top = torch.where(labels == ignore_index, -1, labels).max() if labels.numel() else labels.new_tensor(-1)
    return max(0, int(top) - num_seen + 1)


@dataclass
class Regions:
    """The synthesizer's output in id-indexed slots: slot k is region id k of F, for every image."""

    prototypes: torch.Tensor  # (B, Q, C) L2-normalised (meaningless where not valid)
    valid: torch.Tensor  # (B, Q) bool
    num_seen: int
    logit_scale: torch.Tensor | None = None  # () L_bce's learnt scale (method.bce_learnable), else None
    logit_bias: torch.Tensor | None = None  # () L_bce's learnt bias (method.bce_learnable), else None

    def seen(self) -> tuple[torch.Tensor, torch.Tensor]:
        """P_seen (B, S_n, C) and its validity (B, S_n): slot k is seen class k."""
        return self.prototypes[:, : self.num_seen], self.valid[:, : self.num_seen]

    def pseudo(self) -> tuple[torch.Tensor, torch.Tensor]:
        """P_pseudo (B, P, C) and its validity (B, P): slot j is pseudo id num_seen + j (logit channel S_n + j)."""
        return self.prototypes[:, self.num_seen :], self.valid[:, self.num_seen :]
