"""The Global Learning Module (DESIGN.md §1-2): attention-pool the student's features with the teacher's CLS
token and pull the pooled vector to that CLS with InfoNCE, the negatives including a bank of past CLS tokens.

Shapes: R (B, C, h, w) student embeddings at stride 4 (not normalised); S (B, C) teacher CLS, L2-normalised and
without grad; ``valid`` (B, h, w) bool marks the positions that are image, not crop padding.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from clipzss.config import MethodConfig
from clipzss.losses import info_nce


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
