"""The argmax of upsampled logits, exactly, without the full-resolution K-channel map.

Every prediction ends as ``argmax_k upsample(logits)_k`` (mmseg's test pipeline): each window's stride-4 logits
are upsampled bilinearly to the window, windows are averaged where they overlap, the canvas is resized to the
original image, and each pixel takes the class with the largest value. Done literally that is K·H·W values
(gigabytes for a large vocabulary on a 1024×2048 canvas) and several passes over them, as much time as the
classifier matmul itself (benchmarks/README.md, "Speed and memory").

Upsampling, averaging and resizing are convex combinations of low-resolution values, so a pixel's value for
class k lies between the smallest and the largest low-resolution value of k that feeds it (and, where windows
overlap, between the means of their bounds). `label_map` groups the output pixels into units (the pixels between
the same low-resolution neighbours) and, in compiled loops (`clipzss.inference._label_kernels`, numba):

- labels a unit k* without computing anything at full resolution when every low-resolution point feeding it
  has k* on top, by a margin (top value minus second value) larger than any float rounding can close;
- elsewhere keeps only the classes that can still win (those reaching a lower bound of the winner's value
  somewhere in the unit), prunes them by their exact ranges, and computes the survivors with the same float32
  operations in the same order as the dense reference `dense_scores`, so the labels equal
  ``dense_scores(...).argmax(-1)`` bit for bit (ties to the lowest class id);
- takes the dense reference, in row tiles of bounded memory, for non-finite logits, for score transforms
  (seen-class calibration) and on a GPU, where K·H·W passes are cheap.

The reference arithmetic is defined here, not borrowed from a kernel: PyTorch's source indices and weights
(`align_corners=False`, the source coordinate computed as one fused multiply-add as PyTorch's CPU kernel does),
rows first, every product and sum rounded to float32 (``t = L[r0]·a0 + L[r1]·a1``, then ``t[c0]·b0 + t[c1]·b1``).
It agrees with ``torch.nn.functional.interpolate`` to float rounding (~1e-6 of the logits); torch's own kernels
round differently for contiguous and channels-last maps and with the CPU's vector width, so no kernel can serve
as the reference of an exact shortcut. numpy and torch give the same bits for these operations, so the ONNX
runner (numpy) and the torch paths share this module and its results.

Layout: the logits of one image are ``(n_windows, h, w, K)``, channels last (what `ZeroShotSegmenter.logits`
returns, permuted for free), windows in `clipzss.inference.inputs.sliding_windows` order.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any, NamedTuple

import numpy as np

from clipzss.errors import UsageError


def _torch() -> Any:
    """The torch module, for a tensor we were given: torch is loaded whenever a tensor exists, so this module never
    imports it (the ONNX runner shares it; `make test`'s import contracts hold it to that)."""
    return sys.modules["torch"]


UNIT_ROUNDOFF = 2.0**-24  # float32
# Float32 values per dense tile: bounds the dense path's memory (32 MB of scores, plus the canvas rows under them).
DENSE_TILE_VALUES = 1 << 23
# Canvas pixels per unit along an axis, where units are not the cells of one upsampling (sliding windows, or a
# canvas resized to the image): 4, one low-resolution step, measured best of 2-6 (benchmarks/README.md).
UNIT_CANVAS = 4

Array = Any  # np.ndarray or torch.Tensor (the dense path runs on either; the shortcut on numpy)
Transform = Callable[[Array], Array]


@dataclass(frozen=True, eq=False)
class AxisMap:
    """Bilinear resampling of one axis, ``in_size`` → ``len(i0)``: output i = w0[i]·x[i0[i]] + w1[i]·x[i1[i]]."""

    in_size: int
    i0: np.ndarray  # (out,) int64, nondecreasing
    i1: np.ndarray  # (out,) int64, min(i0 + 1, in_size - 1)
    w0: np.ndarray  # (out,) float32
    w1: np.ndarray  # (out,) float32

    @property
    def out_size(self) -> int:
        return len(self.i0)

    @classmethod
    def bilinear(cls, in_size: int, out_size: int) -> AxisMap:
        """PyTorch's half-pixel rule (``align_corners=False``), with its float32 scale and fused source index."""
        if in_size < 1 or out_size < 1:
            raise ValueError(f"cannot resample {in_size} values to {out_size}")
        scale = np.float32(in_size) / np.float32(out_size)
        dst = np.arange(out_size, dtype=np.float64)
        # scale·(dst + 0.5) − 0.5 is exact in float64, so one cast rounds once: the fused multiply-add's result.
        src = np.maximum((np.float64(scale) * (dst + 0.5) - 0.5).astype(np.float32), np.float32(0))
        i0 = np.minimum(src.astype(np.int64), in_size - 1)
        i1 = np.minimum(i0 + 1, in_size - 1)
        w1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
        w0 = (np.float32(1) - w1).astype(np.float32)
        return cls(in_size, i0, i1, w0, w1)


@dataclass(frozen=True, eq=False)
class Axis:
    """One axis of the pipeline: windows of ``window.out_size`` placed at ``starts`` on a canvas of ``canvas``
    values, each upsampled from ``window.in_size`` low-resolution values, then the canvas resized by ``final``
    (None: the canvas is the output)."""

    starts: tuple[int, ...]
    window: AxisMap
    canvas: int
    final: AxisMap | None

    @property
    def out_size(self) -> int:
        return self.final.out_size if self.final is not None else self.canvas

    @cached_property
    def coverage(self) -> tuple[np.ndarray, np.ndarray]:
        """(slots, canvas) window index per covering slot (-1: none, ascending), and the count per canvas index."""
        size = self.window.out_size
        inside = np.array(
            [(np.arange(self.canvas) >= s) & (np.arange(self.canvas) < s + size) for s in self.starts]
        )
        count = inside.sum(0)
        slots = np.full((max(int(count.max()), 1), self.canvas), -1, dtype=np.int64)
        rank = np.cumsum(inside, 0) - 1  # slot of window i at each canvas index it covers
        for i in range(len(self.starts)):
            slots[rank[i, inside[i]], np.nonzero(inside[i])[0]] = i
        return slots, count


@dataclass(frozen=True, eq=False)
class Plan:
    """How one image's window logits become its output (the reference computation, mmseg's semantics)."""

    rows: Axis
    cols: Axis

    @property
    def num_windows(self) -> int:
        return len(self.rows.starts) * len(self.cols.starts)

    @property
    def out_size(self) -> tuple[int, int]:
        return (self.rows.out_size, self.cols.out_size)

    @property
    def low_size(self) -> tuple[int, int]:
        return (self.rows.window.in_size, self.cols.window.in_size)


def whole_plan(low_size: Sequence[int], out_size: Sequence[int]) -> Plan:
    """One pass over the whole image: its (h, w) logits upsampled straight to ``out_size``."""
    return _whole_plan(tuple(low_size), tuple(out_size))


@lru_cache(maxsize=64)
def _whole_plan(low_size: tuple[int, int], out_size: tuple[int, int]) -> Plan:
    axes = [
        Axis((0,), AxisMap.bilinear(low, out), out, None) for low, out in zip(low_size, out_size, strict=True)
    ]
    return Plan(*axes)


def slide_plan(
    image_size: Sequence[int],
    windows: Sequence[tuple[int, int, int, int]],
    low_size: Sequence[int],
    out_size: Sequence[int],
) -> Plan:
    """Sliding windows ``(y1, y2, x1, x2)`` (a grid, `sliding_windows` order) on an ``image_size`` canvas.

    Each window's ``low_size`` logits are upsampled to the window, the canvas is averaged and, when ``out_size``
    differs from the image, resized to it.
    """
    rows = sorted({w[0] for w in windows})
    cols = sorted({w[2] for w in windows})
    if [(w[0], w[2]) for w in windows] != [(y, x) for y in rows for x in cols]:
        raise ValueError("sliding windows must form a grid in row-major order")
    size = (windows[0][1] - windows[0][0], windows[0][3] - windows[0][2])
    axes = []
    for starts, win, low, canvas, out in zip((rows, cols), size, low_size, image_size, out_size, strict=True):
        final = AxisMap.bilinear(canvas, out) if canvas != out else None
        axis = Axis(tuple(starts), AxisMap.bilinear(low, win), canvas, final)
        count = axis.coverage[1]
        if not count.all():
            raise ValueError(
                f"sliding windows of {win} leave pixel {int(np.argmin(count))} of {canvas} uncovered "
                "(a stride larger than the crop size)"
            )
        axes.append(axis)
    return Plan(*axes)


@dataclass(frozen=True)
class Band:
    """Output rows ``[out_start, out_stop)`` of a plan, whose values need only window rows ``[first, last]``."""

    first: int
    last: int
    out_start: int
    out_stop: int


def row_bands(plan: Plan) -> list[Band]:
    """The plan's output rows as bands in order, each labelled once its last window row is in (bounded memory).

    Output row y reads canvas rows ``final.i0[y]`` and ``final.i1[y]`` (y itself without a final resize), which
    read the window rows covering them; consecutive output rows that need the same window rows form one band.
    """
    axis = plan.rows
    slots = axis.coverage[0]
    if axis.final is not None:
        reads = np.stack([axis.final.i0, axis.final.i1])
    else:
        reads = np.arange(axis.canvas)[None]
    covering = slots[:, reads.ravel()]  # (slots, reads·out): window rows, -1 for an empty slot
    first = np.where(covering >= 0, covering, len(axis.starts)).min(0).reshape(reads.shape).min(0)
    last = covering.max(0).reshape(reads.shape).max(0)
    bands: list[Band] = []
    for y in range(axis.out_size):
        if bands and (bands[-1].first, bands[-1].last) == (first[y], last[y]):
            bands[-1] = dataclasses.replace(bands[-1], out_stop=y + 1)
        else:
            bands.append(Band(int(first[y]), int(last[y]), y, y + 1))
    return bands


def band_plan(plan: Plan, band: Band) -> Plan:
    """The plan of one band: window rows ``band.first..band.last`` on the canvas rows the band reads.

    The band's values are the full plan's bit for bit: the same windows summed in the same order and divided by
    the same count (no other window covers the rows it reads), and the same final weights. Windows may start
    before that canvas or end after it (only their rows inside are read). A band of a single window keeps the
    window's own canvas and selects its rows with weights (1, 0), which reproduces each value exactly (the
    one-window paths index the canvas as the window).
    """
    rows = plan.rows
    out = slice(band.out_start, band.out_stop)
    f = rows.final
    single = band.first == band.last and len(plan.cols.starts) == 1
    if single:  # one window: its own canvas
        lo = rows.starts[band.first]
        hi = lo + rows.window.out_size
    elif f is not None:  # the canvas rows the band's final rows read
        lo, hi = int(f.i0[out][0]), int(f.i1[out][-1]) + 1
    else:
        lo, hi = band.out_start, band.out_stop
    if f is not None:
        final = AxisMap(hi - lo, f.i0[out] - lo, f.i1[out] - lo, f.w0[out], f.w1[out])
    elif single:  # the band's rows of the window, selected with weights (1, 0)
        i0 = np.arange(band.out_start, band.out_stop, dtype=np.int64) - lo
        one = np.ones(len(i0), dtype=np.float32)
        final = AxisMap(hi - lo, i0, np.minimum(i0 + 1, hi - lo - 1), one, np.zeros_like(one))
    else:
        final = None
    starts = tuple(s - lo for s in rows.starts[band.first : band.last + 1])
    return Plan(Axis(starts, rows.window, hi - lo, final), plan.cols)


# ---------------------------------------------------------------------------------------------------------------
# Running the windows: budgeted batches, and rows of windows streamed into bands (numpy or torch alike).

# At most this many bytes of logits per batch of windows beyond the first: with a large vocabulary (847 names:
# 55 MB per 512² window) the windows then go one or two at a time, so a batch's logits and the network's
# activations add little to the stored windows (peak memory at 1024×2048: benchmarks/README.md).
WINDOW_BATCH_BYTES = 64 << 20

Window = tuple[int, int, int, int]
RunWindows = Callable[[Sequence[Window]], Array]  # windows → their (B, n, h', w', K) logits, channels last


def _nbytes(x: Array) -> int:
    return int(x.nbytes) if isinstance(x, np.ndarray) else x.numel() * x.element_size()


def _empty(like: Array, shape: tuple[int, ...], labels: bool = False) -> Array:
    """An uninitialised array of ``like``'s kind (and device): ``like``'s dtype, or int64 for labels."""
    if isinstance(like, np.ndarray):
        return np.empty(shape, dtype=np.int64 if labels else like.dtype)
    torch = _torch()

    return torch.empty(shape, dtype=torch.int64 if labels else like.dtype, device=like.device)


def window_batch_size(first: Array, window_batch: int) -> int:
    """Windows per call after the ``first`` one's (B, 1, h', w', K) logits: at most ``window_batch``, and
    within `WINDOW_BATCH_BYTES`."""
    return max(1, min(window_batch, WINDOW_BATCH_BYTES // max(_nbytes(first), 1)))


def all_window_logits(run: RunWindows, windows: Sequence[Window], window_batch: int = 8) -> Array:
    """(B, n, h', w', K) logits of every window: the first alone (its size sets the budget), then batches of
    `window_batch_size`."""
    first = run(windows[:1])
    store = _empty(first, (first.shape[0], len(windows), *first.shape[2:]))
    store[:, :1] = first
    batch = window_batch_size(first, window_batch)
    for start in range(1, len(windows), batch):
        chunk = windows[start : start + batch]
        store[:, start : start + len(chunk)] = run(chunk)
    return store


def _fill_labels(
    labels: Sequence[Array],
    plan: Plan,
    logits: Array,
    transforms: Sequence[Transform | None],
    candidates: int,
    rows: slice = slice(None),
) -> None:
    """``labels[t][i, rows] = label_map(plan, logits[i], transforms[t], candidates)`` for every image i."""
    for t, out_labels in zip(transforms, labels, strict=True):
        for i in range(logits.shape[0]):
            out_labels[i, rows] = label_map(plan, logits[i], t, candidates)


def plan_labels(
    plan: Plan, logits: Array, transforms: Sequence[Transform | None] = (None,), candidates: int = 0
) -> list[Array]:
    """`label_map` of each image of (B, n, h', w', K) ``logits`` for each of ``transforms``: (B, H, W) each."""
    labels = [_empty(logits, (logits.shape[0], *plan.out_size), labels=True) for _ in transforms]
    _fill_labels(labels, plan, logits, transforms, candidates)
    return labels


def slide_labels(
    run: RunWindows,
    image_size: Sequence[int],
    windows: Sequence[Window],
    out_size: Sequence[int],
    transforms: Sequence[Transform | None] = (None,),
    window_batch: int = 8,
    candidates: int = 0,
) -> tuple[list[Array], int]:
    """`label_map` of a slide image for each of ``transforms``, running each window once: (B, H, W) labels
    per transform, and K (``candidates``: `label_map`'s).

    With more rows of windows than any output row reads (a 1024×2048 image: three rows, two at a time), the rows
    are run in order and each band of output rows (`row_bands`) is labelled as soon as its last row is in, from
    `band_plan` (the full plan's values bit for bit); rows no later band reads are dropped. So the logits held
    are those rows', not the whole image's (at 847 names 0.67 instead of 1.0 GB). Otherwise every window is run
    (`all_window_logits`) and the full plan labels them.
    """
    image_size, out_size = tuple(image_size), (int(out_size[0]), int(out_size[1]))
    cols = len({x1 for _, _, x1, _ in windows})
    rows = len(windows) // cols
    # Which rows of windows each band of output rows reads depends on the windows and sizes only.
    bands = row_bands(slide_plan(image_size, windows, (1, 1), out_size)) if rows > 1 else []
    depth = max((band.last - band.first + 1 for band in bands), default=rows)
    if depth >= rows:  # every output row reads every row of windows: nothing to stream
        logits = all_window_logits(run, windows, window_batch)
        plan = slide_plan(image_size, windows, logits.shape[2:4], out_size)
        return plan_labels(plan, logits, transforms, candidates), int(logits.shape[-1])
    # Output row 0 reads window row 0, so the first window is always run; its size bounds the batches.
    first = run(windows[:1])
    plan = slide_plan(image_size, windows, first.shape[2:4], out_size)
    labels = [_empty(first, (first.shape[0], *out_size), labels=True) for _ in transforms]
    batch = window_batch_size(first, window_batch)
    held = _HeldRows(first, depth, cols)
    todo = collections.deque(bands)  # the bands not labelled yet, in order
    for row in range(rows):
        if not todo:
            break
        if row < todo[0].first:
            continue  # no output row reads this row of windows
        held.drop_before(todo[0].first)  # rows no later band reads
        row_windows = windows[row * cols : (row + 1) * cols]
        held.add_row(row, _row_chunks(run, row_windows, batch, first if row == 0 else None))
        while todo and todo[0].last <= row:  # the bands whose rows are all in
            band = todo.popleft()
            rows_out = slice(band.out_start, band.out_stop)
            part = held.rows(band.first, band.last)
            _fill_labels(labels, band_plan(plan, band), part, transforms, candidates, rows_out)
    return labels, int(first.shape[-1])


def _row_chunks(
    run: RunWindows, row_windows: Sequence[Window], batch: int, first: Array | None = None
) -> Iterator[Array]:
    """The (B, n, h', w', K) logits of one row of windows, ``batch`` windows per `run` call, in order; ``first``:
    the row's first window's, already run."""
    if first is not None:
        yield first
    for start in range(0 if first is None else 1, len(row_windows), batch):
        yield run(row_windows[start : start + batch])


class _HeldRows:
    """The logits of consecutive rows of windows, oldest first, in one buffer of ``depth`` rows allocated once.

    Rows are added after the newest and dropped from the front, so streaming an image never holds more than the
    ``depth`` rows its deepest band reads.
    """

    def __init__(self, like: Array, depth: int, cols: int) -> None:
        self.cols = cols
        self.start = 0  # the window row in the buffer's first slot
        self.count = 0  # rows held
        self._logits = _empty(like, (like.shape[0], depth * cols, *like.shape[2:]))

    def _slots(self, first: int, stop: int) -> slice:
        return slice(first * self.cols, stop * self.cols)

    def drop_before(self, row: int) -> None:
        """Forget the rows before window row ``row``; those still held move to the front, in order."""
        drop = row - self.start
        if drop <= 0:
            return
        keep = max(self.count - drop, 0)
        for j in range(keep):  # (the slices never overlap)
            self._logits[:, self._slots(j, j + 1)] = self._logits[:, self._slots(j + drop, j + drop + 1)]
        self.start, self.count = row, keep

    def add_row(self, row: int, chunks: Iterable[Array]) -> None:
        """Window row ``row``, the one after the newest held, from its windows' logits in order, chunk by chunk."""
        if row != self.start + self.count:
            raise ValueError(
                f"window row {row} does not follow the held rows, {self.start} to {self.start + self.count - 1}"
            )
        if self.count * self.cols >= self._logits.shape[1]:
            raise ValueError(f"no room for window row {row}: drop rows before adding")
        slot = self.count * self.cols
        for logits in chunks:
            self._logits[:, slot : slot + logits.shape[1]] = logits
            slot += logits.shape[1]
        self.count += 1

    def rows(self, first: int, last: int) -> Array:
        """The logits of held window rows ``first..last``: (B, windows, h', w', K), a view of the buffer."""
        return self._logits[:, self._slots(first - self.start, last - self.start + 1)]


# ---------------------------------------------------------------------------------------------------------------
# The dense reference (and fallback): every class at every pixel, in row tiles.


def _backend_array(values: np.ndarray, like: Array) -> Array:
    """``values`` as an array of ``like``'s kind (numpy, or a torch tensor on its device)."""
    if isinstance(like, np.ndarray):
        return values
    torch = _torch()

    return torch.as_tensor(values, device=like.device)


def _zeros(like: Array, shape: tuple[int, ...]) -> Array:
    return np.zeros(shape, dtype=np.float32) if isinstance(like, np.ndarray) else like.new_zeros(shape)


def _resample_rows(x: Array, amap: AxisMap, rows: np.ndarray, offset: int = 0) -> Array:
    """Rows ``rows`` of ``amap`` applied to axis 0 of ``x`` (whose row 0 is source row ``offset``)."""
    w0 = _backend_array(amap.w0[rows][:, None, None], x)
    w1 = _backend_array(amap.w1[rows][:, None, None], x)
    return (
        x[_backend_array(amap.i0[rows] - offset, x)] * w0 + x[_backend_array(amap.i1[rows] - offset, x)] * w1
    )


def _resample_cols(x: Array, amap: AxisMap) -> Array:
    w0 = _backend_array(amap.w0[None, :, None], x)
    w1 = _backend_array(amap.w1[None, :, None], x)
    return x[:, _backend_array(amap.i0, x)] * w0 + x[:, _backend_array(amap.i1, x)] * w1


def _canvas_rows(plan: Plan, logits: Array, start: int, stop: int) -> Array:
    """Canvas rows [start, stop): the windows' upsampled logits summed in window order (divided by the count)."""
    rows, cols = plan.rows, plan.cols
    if plan.num_windows == 1:
        return _resample_cols(_resample_rows(logits[0], rows.window, np.arange(start, stop)), cols.window)
    k = logits.shape[-1]
    acc = _zeros(logits, (stop - start, cols.canvas, k))
    win_h, win_w = rows.window.out_size, cols.window.out_size
    for w in range(plan.num_windows):
        oy, ox = rows.starts[w // len(cols.starts)], cols.starts[w % len(cols.starts)]
        lo, hi = max(start, oy), min(stop, oy + win_h)
        if lo >= hi:
            continue
        part = _resample_cols(_resample_rows(logits[w], rows.window, np.arange(lo, hi) - oy), cols.window)
        acc[lo - start : hi - start, ox : ox + win_w] += part
    _, row_count = rows.coverage
    _, col_count = cols.coverage
    count = (row_count[start:stop, None] * col_count[None, :]).astype(np.float32)[..., None]
    acc /= _backend_array(count, acc)
    return acc


def dense_scores(plan: Plan, logits: Array, start: int = 0, stop: int | None = None) -> Array:
    """Output rows [start, stop) of every class: (rows, W, K) float32, the reference computation."""
    stop = plan.rows.out_size if stop is None else stop
    final_rows, final_cols = plan.rows.final, plan.cols.final
    if final_rows is None:
        canvas = _canvas_rows(plan, logits, start, stop)
    else:
        out_rows = np.arange(start, stop)
        first, last = int(final_rows.i0[start]), int(final_rows.i1[stop - 1])
        canvas = _resample_rows(
            _canvas_rows(plan, logits, first, last + 1), final_rows, out_rows, offset=first
        )
    return canvas if final_cols is None else _resample_cols(canvas, final_cols)


def _tile_rows(plan: Plan, classes: int) -> int:
    return max(1, DENSE_TILE_VALUES // max(1, classes * plan.cols.out_size))


def dense_labels(plan: Plan, logits: Array, transform: Transform | None = None) -> Array:
    """``argmax(-1)`` of `dense_scores` (after ``transform``) in row tiles: (H, W) int64, numpy or torch."""
    height = plan.rows.out_size
    step = _tile_rows(plan, logits.shape[-1])
    parts = []
    for start in range(0, height, step):
        scores = dense_scores(plan, logits, start, min(height, start + step))
        parts.append((transform(scores) if transform is not None else scores).argmax(-1))
    if isinstance(logits, np.ndarray):
        return np.concatenate(parts).astype(np.int64, copy=False)
    torch = _torch()

    return torch.cat(parts).long()


# ---------------------------------------------------------------------------------------------------------------
# The shortcut.


class AxisTables(NamedTuple):
    """One axis of a plan as `clipzss.inference._label_kernels.label_units` reads it (built by `_axis_tables`).

    The kernel takes plain arrays (numba types a tuple of arrays slowly at every call); `kernel_args` names them
    as its parameters, so no call depends on the order of the fields.
    """

    ustart: np.ndarray  # (units,) first output index of each unit
    ustop: np.ndarray  # (units,) its end
    crange: np.ndarray  # (2, units) first and last canvas index it reads
    lo: np.ndarray  # (slots, units) first low-resolution index it reads per window slot (lo > hi: none)
    hi: np.ndarray  # (slots, units) last
    ints: np.ndarray  # (5, length) int64 rows: final i0, i1, window i0, i1, coverage count
    weights: np.ndarray  # (4, length) float32 rows: final w0, w1, window w0, w1
    slots: np.ndarray  # (slots, canvas) window index per covering slot (-1: none)
    starts: np.ndarray  # (windows,) window starts on the canvas
    final: bool  # whether the canvas is resized to the output

    def kernel_args(self, axis: str) -> dict[str, Any]:
        """The tables as ``label_units`` keyword arguments of ``axis`` ("r": rows, "c": columns)."""
        return {f"{name}_{axis}": value for name, value in self._asdict().items()}


def _axis_tables(axis: Axis) -> AxisTables:
    """One axis of a plan as the kernels' arguments.

    Output indices are grouped into units: the pixels between the same two low-resolution points for a plain
    upsampling, else runs of about `UNIT_CANVAS` canvas pixels. Per unit: its output range, the canvas range it
    reads and, per window slot, the range of low-resolution indices it reads there (lo > hi: none).
    """
    out = np.arange(axis.out_size)
    if axis.final is None and len(axis.starts) == 1:
        key = axis.window.i0[out]  # the pixels between the same two low-resolution points
    else:
        # runs of the output indices that read about UNIT_CANVAS canvas indices
        key = out // max(1, round(UNIT_CANVAS * axis.out_size / axis.canvas))
    edges = np.flatnonzero(np.diff(key)) + 1
    start = np.concatenate([[0], edges]).astype(np.int64)
    stop = np.concatenate([edges, [axis.out_size]]).astype(np.int64)
    if axis.final is not None:  # the canvas indices each unit reads
        cmin, cmax = axis.final.i0[start], axis.final.i1[stop - 1]
    else:
        cmin, cmax = start, stop - 1
    size = axis.window.out_size
    lo = np.ones((len(axis.starts), len(start)), dtype=np.int64)
    hi = np.zeros((len(axis.starts), len(start)), dtype=np.int64)
    for slot, s in enumerate(axis.starts):
        units = (cmax >= s) & (cmin <= s + size - 1)
        lo[slot, units] = axis.window.i0[np.maximum(cmin[units], s) - s]
        hi[slot, units] = axis.window.i1[np.minimum(cmax[units], s + size - 1) - s]
    slots, count = axis.coverage
    maps = [
        axis.final or AxisMap(0, *(np.zeros(0, t) for t in (np.int64, np.int64, np.float32, np.float32))),
        axis.window,
    ]
    length = max(axis.out_size, axis.window.out_size, axis.canvas)
    ints = np.zeros((5, length), dtype=np.int64)  # rows: final i0, i1, window i0, i1, coverage count
    weights = np.zeros((4, length), dtype=np.float32)  # rows: final w0, w1, window w0, w1
    for row, values in enumerate((maps[0].i0, maps[0].i1, maps[1].i0, maps[1].i1, count)):
        ints[row, : len(values)] = values
    for row, values in enumerate((maps[0].w0, maps[0].w1, maps[1].w0, maps[1].w1)):
        weights[row, : len(values)] = values
    return AxisTables(
        ustart=start,
        ustop=stop,
        crange=np.stack([cmin, cmax]),
        lo=lo,
        hi=hi,
        ints=ints,
        weights=weights,
        slots=slots,
        starts=np.asarray(axis.starts, dtype=np.int64),
        final=axis.final is not None,
    )


@lru_cache(maxsize=16)
def _plan_tables(plan: Plan) -> tuple[AxisTables, AxisTables]:
    return _axis_tables(plan.rows), _axis_tables(plan.cols)


@lru_cache(maxsize=16)
def _kernel_tables(plan: Plan) -> tuple[Any, ...]:
    """Both axes' tables as ``label_units``' last arguments, taken by the kernel's own parameter names.

    Positional, as numba dispatches them fastest (keywords add a few microseconds per call), yet in no order
    written by hand; built once per plan.
    """
    from clipzss.inference import _label_kernels as kernels

    rows, cols = _plan_tables(plan)
    by_name = {**rows.kernel_args("r"), **cols.kernel_args("c")}
    params = list(inspect.signature(kernels.label_units.py_func).parameters)
    return tuple(by_name[name] for name in params[-len(by_name) :])


def check_candidates(value: Any, name: str = "candidates") -> int:
    """``value`` as `label_map`'s ``candidates`` (an integer >= 0), or one line naming ``name`` (a config field)."""
    if isinstance(value, bool) or not (isinstance(value, int | np.integer) and value >= 0):
        raise UsageError(f"{name} must be an integer >= 0 (0: exact labels), got {value!r}")
    return int(value)


def label_map(plan: Plan, logits: Array, transform: Transform | None = None, candidates: int = 0) -> Array:
    """``dense_scores(plan, logits).argmax(-1)`` (after ``transform``), computed without the K×H×W scores.

    Args:
        plan: `whole_plan` or `slide_plan` of the image.
        logits: (n_windows, h, w, K) float32 window logits, channels last; numpy or a torch tensor (a CPU tensor
            is read in place; a GPU tensor takes the dense path on its device).
        transform: a per-class map of the scores applied before the argmax (e.g. sigmoid minus a seen-class
            shift); it takes the dense path, on the logits' own backend.
        candidates: 0 (the default): exact. m > 0: approximate, faster: where a unit is not settled exactly, only
            the m best classes of each low-resolution point feeding it compete (see `label_units`); agreement
            with the exact labels is measured in benchmarks/README.md. Ignored by the dense path.

    Returns:
        (H, W) int64 class ids: numpy for numpy input, else a tensor on the logits' device.
    """
    return label_map_with_stats(plan, logits, transform, candidates)[0]


def label_map_with_stats(
    plan: Plan, logits: Array, transform: Transform | None = None, candidates: int = 0
) -> tuple[Array, dict[str, int]]:
    """`label_map` and how it got there: units settled by the statistics, by one candidate, by pixel values."""
    if not isinstance(logits, np.ndarray):
        if logits.device.type != "cpu" or transform is not None:
            return dense_labels(plan, logits, transform), {"dense": 1}
        torch = _torch()

        numpy_logits = logits.detach().float().contiguous().numpy()
        labels, stats = label_map_with_stats(plan, numpy_logits, candidates=candidates)
        return torch.from_numpy(labels), stats
    m = check_candidates(candidates)
    n, h, w, k = logits.shape
    if (n, (h, w)) != (plan.num_windows, plan.low_size):
        raise ValueError(
            f"logits of shape {logits.shape} do not fit the plan's {plan.num_windows} windows of {plan.low_size}"
        )
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    if transform is not None:
        return dense_labels(plan, logits, transform), {"dense": 1}
    from clipzss.inference import _label_kernels as kernels

    top = np.empty((n, h * w), dtype=np.int64)
    best = np.empty((n, h * w), dtype=np.float32)
    second = np.empty((n, h * w), dtype=np.float32)
    finite = kernels.point_stats(logits.reshape(n, h * w, k), top, best, second)
    if not finite:  # NaN / inf: the rounding bounds do not hold; the dense path is the definition
        return dense_labels(plan, logits), {"dense": 1}
    shortlist = np.empty((n, h, w, m), dtype=np.int64)  # (filled by label_units where needed)
    # Every output value is a convex combination of low-res values computed in at most (windows per point + 12)
    # float32 roundings, each off by at most UNIT_ROUNDOFF of the largest magnitude involved, and weights that sum
    # to 1 within 4 more: rel is 4× that bound of (windows per point + 16) roundings.
    depth = int(plan.rows.coverage[1].max() * plan.cols.coverage[1].max()) + 16
    rel = 4.0 * depth * UNIT_ROUNDOFF
    out = np.empty(plan.out_size, dtype=np.int64)
    counters = kernels.label_units(
        logits, top.reshape(n, h, w), best.reshape(n, h, w), second.reshape(n, h, w), shortlist, out, rel,
        *_kernel_tables(plan),
    )  # fmt: skip
    names = ("settled", "one_candidate", "pixel_values", "candidates", "values")
    return out, dict(zip(names, (int(c) for c in counters), strict=True))
