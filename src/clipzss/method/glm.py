"""The Global Learning Module: attention-pool the student's features with the teacher's CLS token and pull the
pooled vector to that CLS with InfoNCE, the negatives including a bank of past CLS tokens.

Negatives are honest: every CLS token carries the identity of its image (:func:`image_ids`), and an image is never
its own negative, neither in the batch nor in the bank; the bank holds at most ``bank_fraction`` of the training
set; under torch.distributed the in-batch CLS tokens of every rank are the negatives, so the loss does not depend on
how many processes share the global batch.

Shapes: R (B, C, h, w) student embeddings at stride 4 (not normalised); S (B, C) teacher CLS, L2-normalised and
without grad; ``valid`` (B, h, w) bool marks the positions that are image, not void (crop padding, the dataset's
void).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from clipzss.config import MethodConfig
from clipzss.errors import UsageError
from clipzss.method.losses import info_nce

UNKNOWN_IMAGE = -1  # the id of a CLS token whose image is not known (never equal to any other id)


def image_ids(names: Sequence[str] | None, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """(B,) int64 identities of a batch's images from their names (CRC-32: stable across runs and processes).

    None when the batch carries no names (a user's dataset may not): then no negative can be recognised as the
    image itself, as before identities existed.
    """
    if names is None or isinstance(names, str):
        return None
    return torch.tensor([zlib.crc32(str(n).encode()) for n in names], dtype=torch.long, device=device)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """Every rank's (B, ...) tensor concatenated in rank order (no gradient); ``x`` itself outside torch.distributed.

    Every rank must call it with the same B (the trainer's loader drops the last partial batch).
    """
    if not _distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class CLSBank(nn.Module):
    """FIFO queue of past teacher CLS tokens and their images' ids, used as extra InfoNCE negatives (MoCo-style).

    The queue, ids, write pointer and fill count are buffers, so the bank is saved in the training state (a state
    saved before ids existed loads with every id unknown). Host-side copies of the pointer and count keep
    ``enqueue``/``negatives`` free of host-device syncs; they are refreshed from the buffers after
    ``load_state_dict``. ``capacity`` (at most ``size``) is how many entries the FIFO uses: the buffers keep the
    configured size, so a training state saved with another capacity (e.g. before the cap by dataset size) loads.
    """

    def __init__(self, size: int, dim: int, capacity: int | None = None) -> None:
        super().__init__()
        capacity = size if capacity is None else capacity
        if size < 1 or dim < 1 or not 1 <= capacity <= size:
            raise ValueError(
                f"CLSBank needs size >= 1, dim >= 1 and 1 <= capacity <= size, got size={size}, dim={dim}, "
                f"capacity={capacity}"
            )
        self.size, self.dim, self.capacity = size, dim, capacity
        self.register_buffer("queue", torch.zeros(size, dim))
        self.register_buffer("ids", torch.full((size,), UNKNOWN_IMAGE, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self._ptr = 0
        self._filled = 0
        self.register_load_state_dict_pre_hook(_ids_of_old_states)
        self.register_load_state_dict_post_hook(_refresh_bank_counters)

    @torch.no_grad()
    def enqueue(self, cls: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Append a batch of CLS tokens (B, C) with their image ids (B,), overwriting the oldest entries when full.

        Under torch.distributed every rank's batch is all-gathered first (rank order), so all banks stay identical;
        every rank must call this with the same batch size (the trainer's loader drops the last partial batch).
        """
        if cls.ndim != 2 or cls.shape[1] != self.dim:
            raise ValueError(f"CLSBank.enqueue expects (B, {self.dim}) tokens, got shape {tuple(cls.shape)}")
        if ids is None:
            ids = torch.full((cls.shape[0],), UNKNOWN_IMAGE, dtype=torch.long, device=cls.device)
        if ids.shape != (cls.shape[0],):
            raise ValueError(f"CLSBank.enqueue expects ({cls.shape[0]},) ids, got shape {tuple(ids.shape)}")
        cls = gather_batch(cls.detach().to(self.queue.dtype))
        ids = gather_batch(ids.to(self.ids.device, torch.long))
        n, cap = cls.shape[0], self.capacity
        if n >= cap:  # only the newest `capacity` tokens survive; the oldest of them sits at the pointer (0)
            self.queue[:cap] = cls[-cap:]
            self.ids[:cap] = ids[-cap:]
            self._ptr = 0
        else:
            first = min(n, cap - self._ptr)
            self.queue[self._ptr : self._ptr + first] = cls[:first]
            self.queue[: n - first] = cls[first:]
            self.ids[self._ptr : self._ptr + first] = ids[:first]
            self.ids[: n - first] = ids[first:]
            self._ptr = (self._ptr + n) % cap
        self._filled = min(self._filled + n, cap)
        self.ptr.fill_(self._ptr)
        self.filled.fill_(self._filled)

    def negatives(self) -> torch.Tensor:
        """The filled part of the queue, (n, C) with n <= size, in storage order."""
        return self.queue[: self._filled]

    def negative_ids(self) -> torch.Tensor:
        """The image ids of :meth:`negatives`, (n,)."""
        return self.ids[: self._filled]

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, capacity={self.capacity}"


def _ids_of_old_states(module: CLSBank, state_dict: dict, prefix: str, *args: object) -> None:
    # A training state saved before the bank kept image ids: every stored entry's image is unknown.
    key = prefix + "ids"
    if key not in state_dict and prefix + "queue" in state_dict:
        state_dict[key] = torch.full_like(module.ids, UNKNOWN_IMAGE)


def _refresh_bank_counters(module: CLSBank, incompatible_keys: object) -> None:
    # One sync at load time, so that every later step needs none. A state saved with a larger capacity keeps the
    # entries of its first `capacity` slots.
    module._filled = min(int(module.filled), module.capacity)
    module._ptr = int(module.ptr) % module.capacity


def bank_capacity(cfg: MethodConfig, dataset_size: int | None = None) -> int:
    """The entries the bank uses: ``bank_size``, capped at ``bank_fraction`` of the training set when its size is
    known (0: no bank)."""
    if not cfg.bank or cfg.bank_size <= 0:
        return 0
    if dataset_size is None:
        return cfg.bank_size
    return min(cfg.bank_size, int(cfg.bank_fraction * dataset_size))


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

    def __init__(
        self,
        cfg: MethodConfig,
        embed_dim: int,
        normalize_keys: bool = False,
        dataset_size: int | None = None,
    ) -> None:
        super().__init__()
        if cfg.tau <= 0:
            raise UsageError(f"method.tau must be > 0, got {cfg.tau}")
        if not 0 <= cfg.bank_fraction <= 1:
            raise UsageError(f"method.bank_fraction must be in [0, 1], got {cfg.bank_fraction}")
        self.embed_dim = embed_dim
        self.tau = cfg.tau
        self.normalize_keys = normalize_keys
        capacity = bank_capacity(cfg, dataset_size)
        self.bank = CLSBank(cfg.bank_size, embed_dim, capacity) if capacity > 0 else None

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

    def forward(
        self,
        R: torch.Tensor,
        S: torch.Tensor,
        valid: torch.Tensor | None = None,
        ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """L_global: InfoNCE of Ŝ against S, negatives = every rank's other CLS tokens plus the bank.

        ``ids`` (B,) are the images' identities (:func:`image_ids`): a key of the same image as the anchor (a
        repeat in the batch, an earlier visit in the bank) is not a negative. Under torch.distributed the loss is
        each rank's mean over its own anchors; DDP's average of the ranks' gradients is then the gradient of the
        single-process loss over the global batch.
        """
        pred, _ = self.pool(R, S, valid)
        target = F.normalize(S.detach().float(), dim=-1)
        keys = gather_batch(target)  # (W·B, C)
        offset = dist.get_rank() * S.shape[0] if _distributed() else 0
        positives = torch.arange(S.shape[0], device=S.device) + offset
        negatives = self.bank.negatives() if self.bank is not None else None
        exclude = None
        if ids is not None:
            ids = ids.to(S.device, torch.long)
            key_ids = gather_batch(ids)
            if negatives is not None:
                key_ids = torch.cat([key_ids, self.bank.negative_ids()])
            exclude = (ids[:, None] == key_ids[None, :]) & (ids[:, None] != UNKNOWN_IMAGE)
        return info_nce(pred, keys, negatives, self.tau, positives=positives, exclude=exclude)

    @torch.no_grad()
    def update_bank(self, S: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Enqueue this step's teacher CLS tokens (after the step, so a batch is never its own negative)."""
        if self.bank is not None:
            self.bank.enqueue(S, ids)
