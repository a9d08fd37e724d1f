"""CLIP-ZSS training-only modules: the GLM with its CLS-token bank, and the prototype synthesizer (DESIGN.md §1-2).

Shapes: R (B, C, h, w) student embeddings at stride 4 (not normalised); S (B, C) teacher CLS and D (B, C, h', w')
teacher dense tokens, both L2-normalised and without grad; F (B, H, W) fused labels at label resolution with
0 .. S_n-1 seen classes, S_n .. S_n+P-1 pseudo regions and 255 ignore (crop padding included); ``valid``
(B, H, W) bool marks the pixels that are image, not padding.

Regions are laid out in *slots indexed by label id*: slot k of every image holds region id k (seen class k for
k < S_n, pseudo region k - S_n after that), padded when the id is absent. Shapes therefore depend only on host-side
counts, never on tensor values, so nothing here forces a host-device sync.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from clipzss.config import MethodConfig
from clipzss.losses import info_nce

log = logging.getLogger(__name__)

IGNORE_INDEX = 255


# --- region pooling ---------------------------------------------------------------------------------------------


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean feature of every region id 0 .. num_ids-1 in each image, with one one-hot batched matmul.

    Labels outside [0, num_ids) (ignore, negatives, ids beyond the range) belong to no region. Gradients flow into
    ``feats``. Slot k of the output is id k, so shapes are static and no Python loop touches pixels.

    Args:
        feats: (B, C, h, w) features.
        labels: (B, h, w) integer ids at the features' resolution.
        num_ids: number of id slots (exclusive upper bound of the ids pooled).

    Returns:
        means (B, num_ids, C) (zero where absent), ids (B, num_ids) long (the id, -1 where absent) and
        valid (B, num_ids) bool (the id has at least one pixel).
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
    valid = counts > 0
    return means, torch.where(valid, ids, -1), valid


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
    means, _, valid = region_means(dense.detach().float(), local, num_pseudo)
    return F.normalize(means, dim=-1), valid


# --- GLM --------------------------------------------------------------------------------------------------------


class CLSBank(nn.Module):
    """FIFO queue of past teacher CLS tokens used as extra InfoNCE negatives (MoCo-style), never trained.

    The queue, write pointer and fill count are buffers, so the bank is saved in the training state. Host-side
    copies of the pointer and count keep ``enqueue``/``negatives`` free of host-device syncs; they are refreshed
    from the buffers after ``load_state_dict``.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"CLSBank needs size >= 1 and dim >= 1, got size={size}, dim={dim}")
        self.size, self.dim = size, dim
        self.register_buffer("queue", torch.zeros(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self._ptr = 0
        self._filled = 0
        self.register_load_state_dict_post_hook(_refresh_bank_counters)

    @torch.no_grad()
    def enqueue(self, cls: torch.Tensor) -> None:
        """Append a batch of CLS tokens (B, C), overwriting the oldest entries when full.

        Under torch.distributed every rank's batch is all-gathered first (rank order), so all banks stay identical;
        every rank must call this with the same batch size (the trainer's loader drops the last partial batch).
        """
        if cls.ndim != 2 or cls.shape[1] != self.dim:
            raise ValueError(f"CLSBank.enqueue expects (B, {self.dim}) tokens, got shape {tuple(cls.shape)}")
        cls = cls.detach().to(self.queue.dtype)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts = [torch.empty_like(cls) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, cls.contiguous())
            cls = torch.cat(parts)
        n = cls.shape[0]
        if (
            n >= self.size
        ):  # only the newest `size` tokens survive; the oldest of them sits at the pointer (0)
            self.queue.copy_(cls[-self.size :])
            self._ptr = 0
        else:
            first = min(n, self.size - self._ptr)
            self.queue[self._ptr : self._ptr + first] = cls[:first]
            self.queue[: n - first] = cls[first:]
            self._ptr = (self._ptr + n) % self.size
        self._filled = min(self._filled + n, self.size)
        self.ptr.fill_(self._ptr)
        self.filled.fill_(self._filled)

    def negatives(self) -> torch.Tensor:
        """The filled part of the queue, (n, C) with n <= size, in storage order."""
        return self.queue[: self._filled]

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"


def _refresh_bank_counters(module: nn.Module, incompatible_keys: object) -> None:
    # One sync at load time, so that every later step needs none.
    module._ptr = int(module.ptr)
    module._filled = int(module.filled)


class GLM(nn.Module):
    """Global Learning Module: attention-pool the student's features with the teacher CLS, InfoNCE to that CLS.

    W = softmax(S·R/√C) over the L = h·w positions, Ŝ = normalise(W·Rᵀ). No learnable parameters; gradients reach R
    only (S is detached, the bank is a buffer).

    R is pooled *unnormalised* by default (``normalize_keys=False``), as in the paper's formula. With unit S and
    unit R the attention logits would lie in [-1/√C, 1/√C] (±0.044 for C = 512): W would stay uniform to within
    ±9% and the module would reduce to mean pooling with an uninformative attention map. The pixel losses only see
    R's direction (cosine logits), so R's norm is a free per-position degree of freedom the GLM can use to sharpen
    W. ``normalize_keys=True`` pools L2-normalised R instead (an ablation).
    """

    def __init__(self, cfg: MethodConfig, embed_dim: int, normalize_keys: bool = False) -> None:
        super().__init__()
        if cfg.tau <= 0:
            raise ValueError(f"method.tau must be > 0, got {cfg.tau}")
        self.embed_dim = embed_dim
        self.tau = cfg.tau
        self.normalize_keys = normalize_keys
        self.bank = CLSBank(cfg.bank_size, embed_dim) if cfg.bank and cfg.bank_size > 0 else None

    def pool(
        self, R: torch.Tensor, S: torch.Tensor, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted CLS Ŝ (B, C) L2-normalised and attention W (B, h, w) summing to 1 over positions.

        ``valid`` (B, h, w) bool excludes positions (crop padding) from the pooling: W is 0 there.
        """
        if R.ndim != 4 or S.shape != (R.shape[0], R.shape[1]):
            raise ValueError(
                f"GLM needs R (B, C, h, w) and S (B, C) with the same B and C, got {tuple(R.shape)} and "
                f"{tuple(S.shape)}"
            )
        b, c, h, w = R.shape
        feats = R.float().flatten(2)  # (B, C, L)
        if self.normalize_keys:
            feats = F.normalize(feats, dim=1)
        query = S.detach().float()  # (B, C)
        scores = torch.einsum("bc,bcl->bl", query, feats) / math.sqrt(c)  # (B, L)
        if valid is not None:
            keep = valid.flatten(1)
            # An all-padding crop (none in practice) pools uniformly instead of giving NaN.
            keep = keep | ~keep.any(dim=1, keepdim=True)
            scores = scores.masked_fill(~keep, -math.inf)
        attn = torch.softmax(scores, dim=-1)  # (B, L)
        pred = torch.einsum("bl,bcl->bc", attn, feats)  # (B, C)
        return F.normalize(pred, dim=-1), attn.view(b, h, w)

    def forward(self, R: torch.Tensor, S: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """L_global: InfoNCE of Ŝ against S, negatives = the batch's other CLS tokens plus the bank."""
        pred, _ = self.pool(R, S, valid)
        negatives = self.bank.negatives() if self.bank is not None else None
        return info_nce(pred, F.normalize(S.detach().float(), dim=-1), negatives, self.tau)

    @torch.no_grad()
    def update_bank(self, S: torch.Tensor) -> None:
        """Enqueue this step's teacher CLS tokens (after the step, so a batch is never its own negative)."""
        if self.bank is not None:
            self.bank.enqueue(S)


# --- synthesizer ------------------------------------------------------------------------------------------------


@dataclass
class Regions:
    """The synthesizer's output in id-indexed slots: slot k is region id k of F, for every image."""

    prototypes: torch.Tensor  # (B, Q, C) L2-normalised (meaningless where not valid)
    region_ids: torch.Tensor  # (B, Q) long, the F id of each slot, -1 for padding
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


class Synthesizer(nn.Module):
    """Prototypes anchored to the teacher: P = normalise(teacher region mean + Δ), Δ from a transformer decoder.

    A region's prototype starts from the teacher's (detached) mean token over that region, the only channel that
    carries what the teacher knows about a pseudo region; the decoder learns a correction Δ (its output layer is
    zero-initialised, so at the start P *is* the teacher's region mean, exactly ``teacher_pseudo_prototypes``).
    L_bce on P_seen teaches Δ what separates the teacher's image space from text space (e.g. a modality gap), and
    the same Δ is applied to the pseudo regions. Queries: the anchor, plus (``student_context``) a projection of
    the student's detached region mean. Keys/values: the teacher's CLS and dense tokens of the same image (padded
    crop positions masked). Slots of absent ids are padding, masked out of the self-attention keys.

    Regions are found at the teacher's token resolution (F nearest-downsampled to D's grid); a region too small to
    hold a token centre there has no anchor and is invalid (its pixels are then ignored by the losses).

    With ``learn_bce=True`` the module also owns L_bce's logit scale (log-parametrised) and bias as parameters.
    """

    def __init__(
        self,
        embed_dim: int,
        num_layers: int = 2,
        num_heads: int = 8,
        dropout: float = 0.0,
        student_context: bool = True,
        learn_bce: bool = False,
        bce_scale: float = 10.0,
        bce_bias: float = -10.0,
    ) -> None:
        super().__init__()
        if num_layers < 1 or num_heads < 1 or embed_dim % num_heads:
            raise ValueError(
                f"Synthesizer needs num_layers >= 1 and embed_dim divisible by num_heads, got embed_dim={embed_dim}, "
                f"num_layers={num_layers}, num_heads={num_heads}"
            )
        if bce_scale <= 0 or not math.isfinite(bce_scale) or not math.isfinite(bce_bias):
            raise ValueError(
                f"method.bce_scale must be a finite number > 0 and method.bce_bias finite, got {bce_scale} and "
                f"{bce_bias}"
            )
        self.embed_dim = embed_dim
        layer = nn.TransformerDecoderLayer(
            embed_dim,
            num_heads,
            dim_feedforward=4 * embed_dim,
            dropout=dropout,
            batch_first=True,
            norm_first=True,
        )
        self.decoder = nn.TransformerDecoder(layer, num_layers, norm=nn.LayerNorm(embed_dim))
        # Unit-norm teacher tokens have tiny entries (≈1/√C): the memory gets its own LayerNorm.
        self.memory_norm = nn.LayerNorm(embed_dim)
        self.context = nn.Linear(embed_dim, embed_dim) if student_context else None
        # Δ = proj(decoder output), zero at initialisation: prototypes start exactly at the teacher's region means.
        self.proj = nn.Linear(embed_dim, embed_dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.learn_bce = learn_bce
        if learn_bce:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(bce_scale)))
            self.logit_bias = nn.Parameter(torch.tensor(float(bce_bias)))

    @classmethod
    def from_config(cls, cfg: MethodConfig, embed_dim: int) -> Synthesizer:
        return cls(
            embed_dim,
            cfg.synth_layers,
            cfg.synth_heads,
            student_context=cfg.synth_context,
            learn_bce=cfg.bce_learnable,
            bce_scale=cfg.bce_scale,
            bce_bias=cfg.bce_bias,
        )

    def decode(
        self,
        queries: torch.Tensor,
        valid: torch.Tensor,
        memory: torch.Tensor,
        memory_padding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the decoder: queries (B, Q, C), valid (B, Q) bool, memory (B, M, C) → Δ (B, Q, C).

        Padding slots never act as keys, so valid outputs do not depend on them. An image with no valid slot keeps
        slot 0 unmasked: a fully masked attention row would be NaN and leak NaN gradients. ``memory_padding``
        (B, M) bool marks memory tokens to ignore (padded crop positions).
        """
        dtype = self.memory_norm.weight.dtype
        if queries.shape[1] == 0:
            return queries.to(dtype)
        padding = ~valid
        padding[:, 0] &= valid.any(dim=1)
        out = self.decoder(
            queries.to(dtype),
            self.memory_norm(memory.to(dtype)),
            tgt_key_padding_mask=padding,
            memory_key_padding_mask=memory_padding,
        )
        return self.proj(out)  # (B, Q, C)

    def forward(
        self,
        R: torch.Tensor,
        labels: torch.Tensor,
        S: torch.Tensor,
        D: torch.Tensor,
        num_seen: int,
        num_pseudo: int | None = None,
        valid: torch.Tensor | None = None,
    ) -> Regions:
        """Prototypes for every seen class and pseudo region present in each image.

        Args:
            R: (B, C, h, w) student embeddings.
            labels: (B, H, W) fused labels F (padding already 255).
            S: (B, C) teacher CLS.
            D: (B, C, h', w') teacher dense tokens.
            num_seen: number of seen classes S_n.
            num_pseudo: pseudo slots per image, a host-side upper bound on any image's pseudo regions. None reads
                it from ``labels`` (one host-device sync).
            valid: (B, H, W) bool, False on crop padding (those teacher tokens are masked from the keys).

        Returns:
            Regions with Q = num_seen + num_pseudo slots.
        """
        b, c, h, w = R.shape
        if c != self.embed_dim or S.shape != (b, c) or D.shape[:2] != (b, c):
            raise ValueError(
                f"Synthesizer(embed_dim={self.embed_dim}) got R {tuple(R.shape)}, S {tuple(S.shape)}, "
                f"D {tuple(D.shape)}; they must share B and C = embed_dim"
            )
        if num_pseudo is None:
            num_pseudo = count_pseudo_slots(labels, num_seen)
        slots = num_seen + num_pseudo
        grid = tuple(D.shape[-2:])
        D = D.detach().float()
        anchor, ids, present = region_means(D, downsample_labels(labels, grid), slots)  # (B, Q, C)
        anchor = F.normalize(anchor, dim=-1)
        queries = anchor * math.sqrt(c)  # unit-variance entries, like the decoder's other inputs
        if self.context is not None:
            student, _, _ = region_means(R.detach().float(), downsample_labels(labels, (h, w)), slots)
            queries = queries + self.context(F.normalize(student, dim=-1) * math.sqrt(c))
        tokens = D.flatten(2).transpose(1, 2)  # (B, h'w', C)
        memory = torch.cat([S.detach().float()[:, None], tokens], dim=1)  # (B, 1 + h'w', C)
        memory_padding = None
        if valid is not None:
            token_ok = downsample_labels(valid.long(), grid).bool().flatten(1)  # (B, h'w')
            memory_padding = torch.cat([torch.zeros_like(token_ok[:, :1]), ~token_ok], dim=1)
        delta = self.decode(queries, present, memory, memory_padding)
        prototypes = F.normalize(anchor + delta.float(), dim=-1)
        if self.learn_bce:
            return Regions(prototypes, ids, present, num_seen, self.logit_scale.exp(), self.logit_bias)
        return Regions(prototypes, ids, present, num_seen)


def count_pseudo_slots(labels: torch.Tensor, num_seen: int, ignore_index: int = IGNORE_INDEX) -> int:
    """Pseudo slots needed for ``labels``: highest non-ignored id - num_seen + 1 (>= 0). Syncs with the device."""
    top = torch.where(labels == ignore_index, -1, labels).max() if labels.numel() else labels.new_tensor(-1)
    return max(0, int(top) - num_seen + 1)
