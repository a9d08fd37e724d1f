"""The prototype synthesizer: a prototype per seen class and pseudo region of each image, from the teacher's
region means corrected by a small transformer decoder.

Shapes: R (B, C, h, w) student embeddings at stride 4; S (B, C) teacher CLS and D (B, C, h', w') teacher dense
tokens, both L2-normalised and without grad; F (B, H, W) fused labels; ``valid`` (B, H, W) bool marks the pixels
that are image, not padding. Prototypes come out in the id-indexed slots of :mod:`clipzss.method.regions`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clipzss.config import MethodConfig
from clipzss.errors import UsageError
from clipzss.method.regions import Regions, count_pseudo_slots, downsample_labels, region_means


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
            raise UsageError(
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
        anchor, present = region_means(D, downsample_labels(labels, grid), slots)  # (B, Q, C)
        anchor = F.normalize(anchor, dim=-1)
        queries = anchor * math.sqrt(c)  # unit-variance entries, like the decoder's other inputs
        if self.context is not None:
            student, _ = region_means(R.detach().float(), downsample_labels(labels, (h, w)), slots)
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
            return Regions(prototypes, present, num_seen, self.logit_scale.exp(), self.logit_bias)
        return Regions(prototypes, present, num_seen)
