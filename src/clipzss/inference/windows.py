"""Running a torch network over an image as mmseg does: whole, or in sliding windows, then labels at full size.

The one prediction path of evaluate, predict, reports and the demo. The labels themselves come from
`clipzss.inference.label_maps` (shared with the ONNX runner), so a mask from `clipzss predict` is the mask that
`clipzss eval` scored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor

from clipzss.config import EvalConfig, check_field
from clipzss.inference.inputs import sliding_windows
from clipzss.inference.label_maps import (
    Plan,
    all_window_logits,
    check_candidates,
    dense_scores,
    plan_labels,
    slide_labels,
    slide_plan,
    whole_plan,
)

LogitsFn = Callable[[Tensor], Tensor]


def seen_calibrated(scores: Tensor, shift: Tensor) -> Tensor:
    """ZegCLIP's inductive calibration: sigmoid scores with ``shift`` (γ on seen classes, 0 elsewhere) subtracted.

    Args:
        scores: (..., K) class scores, classes last (what `clipzss.inference.label_maps` hands a transform).
        shift: (K,) per-class amount.
    """
    return scores.float().sigmoid() - shift.to(scores.device)


def _classes_last(logits: Tensor) -> Tensor:
    """(N, K, h, w) logits as (N, h, w, K) float32: free for the channels-last maps `ZeroShotSegmenter` returns."""
    return logits.float().permute(0, 2, 3, 1).contiguous()


def _run_windows(logits_fn: LogitsFn, images: Tensor, chunk: Sequence[tuple[int, int, int, int]]) -> Tensor:
    """The logits of windows ``chunk`` of every image, in one ``logits_fn`` call: (B, n, h', w', K)."""
    crops = torch.cat([images[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])  # (n·B, 3, win_h, win_w)
    logits = _classes_last(logits_fn(crops))  # (n·B, h', w', K)
    return logits.view(len(chunk), images.shape[0], *logits.shape[1:]).transpose(0, 1)


def window_logits(
    logits_fn: LogitsFn,
    images: Tensor,
    cfg: EvalConfig,
    out_size: tuple[int, int] | None = None,
    window_batch: int = 8,
) -> tuple[Plan, Tensor]:
    """Run the network as ``cfg.mode`` says: the image's `Plan` and its (B, windows, h', w', K) logits.

    Whole: the image in one pass (one "window"). Slide: mmseg's windows (`sliding_windows`), up to
    ``window_batch`` of them per ``logits_fn`` call (they all have the same size; fewer when their logits would
    pass `label_maps.WINDOW_BATCH_BYTES`). The logits stay at the network's resolution; `clipzss.inference.label_maps`
    turns them into labels (or reference scores) at ``out_size`` (default: the image size).
    """
    _, _, h, w = images.shape
    out_size = (h, w) if out_size is None else (int(out_size[0]), int(out_size[1]))
    if check_field(cfg.mode, "eval.mode") == "whole":
        logits = _classes_last(logits_fn(images))[:, None]  # (B, 1, h', w', K)
        return whole_plan(logits.shape[2:4], out_size), logits
    windows = sliding_windows(h, w, cfg.crop_size, cfg.stride)
    store = all_window_logits(partial(_run_windows, logits_fn, images), windows, window_batch)
    return slide_plan((h, w), windows, store.shape[2:4], out_size), store


def infer_labels(
    logits_fn: LogitsFn,
    images: Tensor,
    cfg: EvalConfig,
    out_size: tuple[int, int] | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The one prediction of every torch path (evaluate, predict, reports, demo): (B, H, W) int64 class ids.

    Exactly ``infer_logits(...).argmax(1)`` (the mmseg pipeline: windows upsampled, averaged, resized to
    ``out_size``), computed by `clipzss.inference.label_maps.label_map` without the K×H×W scores. ``images`` come from
    `clipzss.inference.inputs.preprocess`; ``out_size`` is the original image's (or mask's) size; ``transform`` maps
    the scores before the argmax (seen-class calibration).
    """
    return window_labels(logits_fn, images, cfg, out_size, (transform,))[0][0]


def window_labels(
    logits_fn: LogitsFn,
    images: Tensor,
    cfg: EvalConfig,
    out_size: tuple[int, int] | None = None,
    transforms: Sequence[Callable[[Tensor], Tensor] | None] = (None,),
    window_batch: int = 8,
) -> tuple[list[Tensor], int]:
    """`infer_labels` for each of ``transforms`` (None: the plain argmax) from one network pass, and the K.

    Slide mode goes through `label_maps.slide_labels` (shared with the ONNX runner): with more rows of windows
    than any output row reads (a 1024×2048 image) it streams them in bands, holding two rows' logits, not three.
    """
    _, _, h, w = images.shape
    out_size = (h, w) if out_size is None else (int(out_size[0]), int(out_size[1]))
    # (checked here too: predict runs a checkpoint's config without going through evaluate)
    candidates = check_candidates(cfg.label_candidates, "eval.label_candidates")
    if check_field(cfg.mode, "eval.mode") == "slide":
        windows = sliding_windows(h, w, cfg.crop_size, cfg.stride)
        run = partial(_run_windows, logits_fn, images)
        return slide_labels(run, (h, w), windows, out_size, transforms, window_batch, candidates)
    plan, logits = window_logits(logits_fn, images, cfg, out_size)
    return plan_labels(plan, logits, transforms, candidates), logits.shape[-1]


def infer_logits(
    logits_fn: LogitsFn, images: Tensor, cfg: EvalConfig, out_size: tuple[int, int] | None = None
) -> Tensor:
    """(B, K, H, W) scores of the reference pipeline, whose argmax `infer_labels` returns.

    K·H·W floats (1.4 GB for 171 classes on a 1024×2048 image): for scores and probabilities; predictions
    should use `infer_labels`.
    """
    plan, logits = window_logits(logits_fn, images, cfg, out_size)
    scores = [torch.as_tensor(dense_scores(plan, logits[i])) for i in range(logits.shape[0])]
    return torch.stack(scores).permute(0, 3, 1, 2)
