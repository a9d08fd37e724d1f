"""Compiled loops of `clipzss.inference.label_maps` (numba): the per-point statistics and the per-unit labelling, and the
per-pixel embedding norms of the classifier that feeds them.

Plain float32 arithmetic in the order of `label_maps.dense_scores` (no fast-math, so no fused multiply-adds):
the values a kernel computes are bitwise those of the dense reference, which the tests check.
"""

from __future__ import annotations

import numba
import numpy as np

_F32 = np.float32


# Lanes of `point_stats`: classes c, c + 16, c + 32, ... share a lane, so one step over 16 consecutive classes is
# branch-free selects the compiler vectorises (one AVX-512 or two AVX2 registers); 8 lanes were slower and 32 no
# faster (benchmarks/README.md, "Zero-shot labels at any vocabulary size").
_LANES = 16


@numba.njit(cache=True, nogil=True)
def point_stats(flat: np.ndarray, top: np.ndarray, best: np.ndarray, second: np.ndarray) -> bool:
    """Top class, top value and second value of every (window, point) of (n, N, K) logits; False if non-finite.

    The top class is the first of equal maxima (argmax's rule); the second value is the largest of the others
    (equal to the top value on a tie). Each lane keeps its own first maximum and second value over its classes,
    then the lanes merge; the classes past the last full step follow in order. Values of non-finite rows are
    unspecified: the sum of ``v - v`` over all values, 0 unless some value is NaN or ±inf, reports them.
    """
    n, points, k = flat.shape
    full = k - k % _LANES
    lane_best = np.empty(_LANES, dtype=np.float32)
    lane_second = np.empty(_LANES, dtype=np.float32)
    lane_top = np.empty(_LANES, dtype=np.int64)
    poison = np.zeros(_LANES, dtype=np.float32)
    for win in range(n):
        for p in range(points):
            row = flat[win, p]
            if full == 0:
                b, s, t = row[0], _F32(-np.inf), 0
                poison[0] = poison[0] + (b - b)
                tail = 1
            else:
                for j in range(_LANES):
                    lane_best[j] = -np.inf
                    lane_second[j] = -np.inf
                    lane_top[j] = 0
                for c0 in range(0, full, _LANES):
                    for j in range(_LANES):
                        v = row[c0 + j]
                        lb = lane_best[j]
                        lane_second[j] = max(lane_second[j], min(v, lb))
                        lane_top[j] = c0 + j if v > lb else lane_top[j]
                        lane_best[j] = max(lb, v)
                        poison[j] = poison[j] + (v - v)
                b, s, t = lane_best[0], lane_second[0], lane_top[0]
                for j in range(1, _LANES):
                    v = lane_best[j]
                    if v > b:
                        s = max(b, lane_second[j])
                        b, t = v, lane_top[j]
                    else:
                        if v == b and lane_top[j] < t:
                            t = lane_top[j]
                        s = max(s, v)
                tail = full
            for c in range(tail, k):
                v = row[c]
                poison[0] = poison[0] + (v - v)
                if v > b:
                    s, b, t = b, v, c
                elif v > s:
                    s = v
            top[win, p] = t
            best[win, p] = b
            second[win, p] = s
    total = _F32(0)
    for j in range(_LANES):
        total = total + poison[j]
    return total == 0


@numba.njit(cache=True, nogil=True, inline="always")
def _shortlist(row, ids, values):
    """The m = ``len(ids)`` largest classes of one point's logits into ``ids``, best first (the first of equal
    values first); fewer classes than m repeat the best."""
    m = len(ids)
    filled = 0
    for c in range(len(row)):
        v = row[c]
        if filled == m and not v > values[m - 1]:
            continue
        a = min(filled, m - 1)  # insert after the values at least as large (ties keep class order)
        while a > 0 and v > values[a - 1]:
            values[a], ids[a] = values[a - 1], ids[a - 1]
            a -= 1
        values[a], ids[a] = v, c
        filled = min(filled + 1, m)
    for a in range(filled, m):
        ids[a] = ids[0]


# Pixels per block of `pixel_norms`: its running sums (1 KiB) stay in L1 while the channels stream past.
_NORM_BLOCK = 256


@numba.njit(cache=True, nogil=True)
def pixel_norms(flat: np.ndarray, out: np.ndarray) -> None:
    """``out[b, p] = max(‖flat[b, :, p]‖, 1e-12)`` of (B, C, P) float32 embeddings, in one pass over them.

    Squares summed over the channels in order, then the square root: the arithmetic of torch's float32
    ``vector_norm(flat, dim=1)``, which on the CPU reduces over that strided dimension ~10× slower than this.
    """
    batch, channels, points = flat.shape
    for b in range(batch):
        for start in range(0, points, _NORM_BLOCK):
            stop = min(start + _NORM_BLOCK, points)
            acc = out[b, start:stop]
            acc[:] = 0
            for c in range(channels):
                row = flat[b, c, start:stop]
                for i in range(stop - start):
                    acc[i] = acc[i] + row[i] * row[i]
            for i in range(stop - start):
                acc[i] = max(np.sqrt(acc[i]), _F32(1e-12))


# Per-axis tables (`label_maps.AxisTables`): ints rows FINAL_I0, FINAL_I1, WIN_I0, WIN_I1, COUNT and
# weights rows FINAL_W0, FINAL_W1, WIN_W0, WIN_W1, each padded to one length.
FINAL_I0, FINAL_I1, WIN_I0, WIN_I1, COUNT = 0, 1, 2, 3, 4
FINAL_W0, FINAL_W1, WIN_W0, WIN_W1 = 0, 1, 2, 3


@numba.njit(cache=True, nogil=True, inline="always")
def _window_value(logits, win, ly, lx, k, ri, rw, ci, cw):
    r0, r1, a0, a1 = ri[WIN_I0, ly], ri[WIN_I1, ly], rw[WIN_W0, ly], rw[WIN_W1, ly]
    c0, c1, b0, b1 = ci[WIN_I0, lx], ci[WIN_I1, lx], cw[WIN_W0, lx], cw[WIN_W1, lx]
    left = logits[win, r0, c0, k] * a0 + logits[win, r1, c0, k] * a1
    right = logits[win, r0, c1, k] * a0 + logits[win, r1, c1, k] * a1
    return left * b0 + right * b1


@numba.njit(cache=True, nogil=True, inline="always")
def _canvas_value(logits, y, x, k, ri, rw, rslots, rstarts, ci, cw, cslots, cstarts):
    if logits.shape[0] == 1:
        return _window_value(logits, 0, y, x, k, ri, rw, ci, cw)
    # (No ``break`` or ``+=`` here: numba compiles that form of the loop several times slower.)
    acc = _F32(0)
    n_cols = len(cstarts)
    for a in range(rslots.shape[0]):
        i = rslots[a, y]
        if i >= 0:
            for b in range(cslots.shape[0]):
                j = cslots[b, x]
                if j >= 0:
                    win = i * n_cols + j
                    acc = acc + _window_value(logits, win, y - rstarts[i], x - cstarts[j], k, ri, rw, ci, cw)
    return acc / _F32(ri[COUNT, y] * ci[COUNT, x])


@numba.njit(cache=True, nogil=True, inline="always")
def _final_value(canvas, y, x, y_lo, x_lo, ri, rw, rfinal, ci, cw, cfinal):
    """Output pixel (y, x) from canvas values (a rectangle whose corner is canvas (y_lo, x_lo)): the final resize."""
    if not rfinal and not cfinal:
        return canvas[y - y_lo, x - x_lo]
    if not cfinal:
        y0, y1 = ri[FINAL_I0, y] - y_lo, ri[FINAL_I1, y] - y_lo
        return canvas[y0, x - x_lo] * rw[FINAL_W0, y] + canvas[y1, x - x_lo] * rw[FINAL_W1, y]
    if not rfinal:
        x0, x1 = ci[FINAL_I0, x] - x_lo, ci[FINAL_I1, x] - x_lo
        return canvas[y - y_lo, x0] * cw[FINAL_W0, x] + canvas[y - y_lo, x1] * cw[FINAL_W1, x]
    y0, y1, a0, a1 = ri[FINAL_I0, y] - y_lo, ri[FINAL_I1, y] - y_lo, rw[FINAL_W0, y], rw[FINAL_W1, y]
    x0, x1, b0, b1 = ci[FINAL_I0, x] - x_lo, ci[FINAL_I1, x] - x_lo, cw[FINAL_W0, x], cw[FINAL_W1, x]
    left = canvas[y0, x0] * a0 + canvas[y1, x0] * a1
    right = canvas[y0, x1] * a0 + canvas[y1, x1] * a1
    return left * b0 + right * b1


@numba.njit(cache=True, nogil=True)
def _distinct_masks(slots, lo, hi, masks):
    """The distinct sets of window slots covering canvas indices lo..hi, as bit masks in ``masks``; their count."""
    n = 0
    for y in range(lo, hi + 1):
        mask = 0
        for a in range(slots.shape[0]):
            if slots[a, y] >= 0:
                mask |= 1 << slots[a, y]
        seen = False
        for b in range(n):
            if masks[b] == mask:
                seen = True
        if not seen:
            masks[n] = mask
            n += 1
    return n


# The loops over the low-resolution points a unit (ur, uc) reads: for window (i, j) of the grid (window
# i * n_cols + j), its points lo_r[i, ur]..hi_r[i, ur] × lo_c[j, uc]..hi_c[j, uc]. Inlined into `label_units`.


@numba.njit(cache=True, nogil=True, inline="always")
def _unit_stats(top, best, second, k, lo_r, hi_r, lo_c, hi_c, n_cols, ur, uc):
    """Over the unit's points: (min, max top class; min top value; max second value; max |top or second value|)."""
    t_min, t_max = k, -1
    b_min, s_max, scale = np.inf, -np.inf, 0.0
    for i in range(lo_r.shape[0]):
        for j in range(lo_c.shape[0]):
            win = i * n_cols + j
            for r in range(lo_r[i, ur], hi_r[i, ur] + 1):
                for c in range(lo_c[j, uc], hi_c[j, uc] + 1):
                    t = top[win, r, c]
                    t_min, t_max = min(t_min, t), max(t_max, t)
                    b, sec = best[win, r, c], second[win, r, c]
                    b_min, s_max = min(b_min, b), max(s_max, sec)
                    scale = max(scale, abs(b), abs(sec))
    return t_min, t_max, b_min, s_max, scale


@numba.njit(cache=True, nogil=True, inline="always")
def _unit_worst(logits, ref, lo_r, hi_r, lo_c, hi_c, n_cols, ur, uc):
    """The smallest value of class ``ref`` over the unit's points."""
    worst = np.inf
    for i in range(lo_r.shape[0]):
        for j in range(lo_c.shape[0]):
            win = i * n_cols + j
            for r in range(lo_r[i, ur], hi_r[i, ur] + 1):
                for c in range(lo_c[j, uc], hi_c[j, uc] + 1):
                    worst = min(worst, logits[win, r, c, ref])
    return worst


@numba.njit(cache=True, nogil=True, inline="always")
def _lower_point_bounds(point_bound, bound, lo_r, hi_r, lo_c, hi_c, n_cols, ur, uc):
    """``point_bound`` lowered to ``bound`` at the unit's points."""
    for i in range(lo_r.shape[0]):
        for j in range(lo_c.shape[0]):
            win = i * n_cols + j
            for r in range(lo_r[i, ur], hi_r[i, ur] + 1):
                for c in range(lo_c[j, uc], hi_c[j, uc] + 1):
                    point_bound[win, r, c] = min(point_bound[win, r, c], bound)


@numba.njit(cache=True, nogil=True, inline="always")
def _collect_candidates(
    top, best, shortlist, hit_start, hit_class, hit_value, bound, uid, mark, cand,
    lo_r, hi_r, lo_c, hi_c, n_cols, ur, uc,
):  # fmt: skip
    """The unit's candidates into ``cand`` (``mark[q] == uid`` once q is in), in the order met; their count."""
    _, h, w = top.shape
    count = 0
    for i in range(lo_r.shape[0]):
        for j in range(lo_c.shape[0]):
            win = i * n_cols + j
            for r in range(lo_r[i, ur], hi_r[i, ur] + 1):
                for c in range(lo_c[j, uc], hi_c[j, uc] + 1):
                    t = top[win, r, c]
                    if best[win, r, c] >= bound and mark[t] != uid:
                        mark[t] = uid
                        cand[count] = t
                        count += 1
                    for a in range(shortlist.shape[3]):
                        q = shortlist[win, r, c, a]
                        if mark[q] != uid:
                            mark[q] = uid
                            cand[count] = q
                            count += 1
                    p = (win * h + r) * w + c
                    for a in range(hit_start[p], hit_start[p + 1]):
                        q = hit_class[a]
                        if hit_value[a] >= bound and mark[q] != uid:
                            mark[q] = uid
                            cand[count] = q
                            count += 1
    return count


@numba.njit(cache=True, nogil=True, inline="always")
def _window_ranges(logits, q, win_lo, win_hi, lo_r, hi_r, lo_c, hi_c, n_cols, ur, uc):
    """Class ``q``'s smallest and largest value over the unit's points of each window, into ``win_lo``/``win_hi``."""
    for i in range(lo_r.shape[0]):
        for j in range(lo_c.shape[0]):
            win = i * n_cols + j
            lo, hi = np.inf, -np.inf
            for r in range(lo_r[i, ur], hi_r[i, ur] + 1):
                for c in range(lo_c[j, uc], hi_c[j, uc] + 1):
                    v = logits[win, r, c, q]
                    lo, hi = min(lo, v), max(hi, v)
            win_lo[i, j], win_hi[i, j] = lo, hi


@numba.njit(cache=True, nogil=True, inline="always")
def _settle_units(
    logits, top, best, second, out, rel, m, ustart_r, ustop_r, lo_r, hi_r, ustart_c, ustop_c, lo_c, hi_c, n_cols
):  # fmt: skip
    """Step 1: writes the settled units; (unit bounds, inf where settled; unit scales; point bounds; number settled)."""
    n_win, h, w, k = logits.shape
    n_ur, n_uc = len(ustart_r), len(ustart_c)
    settled = 0
    threshold = np.full((n_ur, n_uc), np.inf)
    scale_of = np.zeros((n_ur, n_uc))
    point_bound = np.full((n_win, h, w), np.inf)
    for ur in range(n_ur):
        for uc in range(n_uc):
            t_min, t_max, b_min, s_max, scale = _unit_stats(
                top, best, second, k, lo_r, hi_r, lo_c, hi_c, n_cols, ur, uc
            )
            if t_min == t_max and b_min - s_max > 2 * rel * scale:
                settled += 1
                for y in range(ustart_r[ur], ustop_r[ur]):
                    for x in range(ustart_c[uc], ustop_c[uc]):
                        out[y, x] = t_min
                continue
            if m > 0:  # approximate: no bound (-inf marks the points whose shortlists are wanted)
                bound = -np.inf
            else:
                tau = -np.inf
                for ref in (t_min, t_max):
                    tau = max(tau, _unit_worst(logits, ref, lo_r, hi_r, lo_c, hi_c, n_cols, ur, uc))
                bound = tau - 2 * rel * max(scale, abs(tau))
            threshold[ur, uc] = bound
            scale_of[ur, uc] = scale
            _lower_point_bounds(point_bound, bound, lo_r, hi_r, lo_c, hi_c, n_cols, ur, uc)
    return threshold, scale_of, point_bound, settled


@numba.njit(cache=True, nogil=True, inline="always")
def _point_hits(logits, second, point_bound, shortlist):
    """Step 2: each point's classes reaching its bound (start per point, classes, values); approximate: shortlists."""
    n_win, h, w, k = logits.shape
    m = shortlist.shape[3]
    hit_start = np.zeros(n_win * h * w + 1, dtype=np.int64)
    values = np.empty(max(m, 1), dtype=np.float32)
    for win in range(n_win):
        for r in range(h):
            for c in range(w):
                bound = point_bound[win, r, c]
                if m > 0:  # approximate mode: the shortlists of the points that open units read
                    if bound == -np.inf:
                        _shortlist(logits[win, r, c], shortlist[win, r, c], values)
                    continue
                n_hits = 0
                if second[win, r, c] >= bound:
                    for q in range(k):
                        if logits[win, r, c, q] >= bound:
                            n_hits += 1
                hit_start[(win * h + r) * w + c + 1] = n_hits
    for p in range(n_win * h * w):
        hit_start[p + 1] += hit_start[p]
    hit_class = np.empty(hit_start[-1], dtype=np.int64)
    hit_value = np.empty(hit_start[-1], dtype=np.float32)
    for win in range(n_win):
        for r in range(h):
            for c in range(w):
                p = (win * h + r) * w + c
                at = hit_start[p]
                if at == hit_start[p + 1]:
                    continue
                bound = point_bound[win, r, c]
                for q in range(k):
                    v = logits[win, r, c, q]
                    if v >= bound:
                        hit_class[at] = q
                        hit_value[at] = v
                        at += 1
    return hit_start, hit_class, hit_value


@numba.njit(cache=True, nogil=True)
def label_units(
    logits, top, best, second, shortlist, out, rel,
    ustart_r, ustop_r, crange_r, lo_r, hi_r, ints_r, weights_r, slots_r, starts_r, final_r,
    ustart_c, ustop_c, crange_c, lo_c, hi_c, ints_c, weights_c, slots_c, starts_c, final_c,
):  # fmt: skip
    """Label every output pixel, unit by unit; returns counters (settled, one candidate, pixel values, ...).

    A unit reads the low-resolution points lo..hi (rows × columns) of each window that covers it.
    1. It is settled when all of them have the same top class with a margin beyond rounding.
    2. Otherwise tau, a lower bound on its winner's value, is the worst value over its points of its smallest
       and its largest top class; each point is searched once over all K classes for those reaching the lowest
       bound of the units that read it (only where its second value reaches that bound).
    3. A unit's candidates are the classes reaching its own bound at one of its points; their exact ranges over
       the points prune them, then their exact canvas values over the unit's canvas rectangle prune again, and
       the survivors' reference values decide each pixel (lowest class id on ties).

    Approximate mode (``shortlist``: (n, h, w, m) scratch, m > 0): step 1 still settles units exactly, but an
    unsettled unit's candidates are its points' m best classes (step 2 finds those of the points that open units
    read, instead of searching for a bound); among them step 3 is exact. A class outside every shortlist of the
    unit cannot win.
    """
    k = logits.shape[3]
    n_cols = len(starts_c)
    n_ur, n_uc = len(ustart_r), len(ustart_c)
    n_rs, n_cs = lo_r.shape[0], lo_c.shape[0]
    single = multi = n_cand = n_values = 0
    m = shortlist.shape[3]

    # 1. Unit statistics; settled units are written at once.
    threshold, scale_of, point_bound, settled = _settle_units(
        logits, top, best, second, out, rel, m, ustart_r, ustop_r, lo_r, hi_r, ustart_c, ustop_c, lo_c, hi_c, n_cols,
    )  # fmt: skip
    # 2. One search over K per point whose second value reaches its bound: the other classes that reach it (or,
    # approximate, the m best classes of the points that open units read).
    hit_start, hit_class, hit_value = _point_hits(logits, second, point_bound, shortlist)

    # 3. The units left.
    mark = np.full(k, -1, dtype=np.int64)
    cand = np.empty(k, dtype=np.int64)
    cand_lo = np.empty(k, dtype=np.float32)
    cand_hi = np.empty(k, dtype=np.float32)
    keep = np.empty(k, dtype=np.int64)
    rect_r = int((crange_r[1] - crange_r[0]).max()) + 1
    rect_c = int((crange_c[1] - crange_c[0]).max()) + 1
    scratch = np.empty((k, rect_r, rect_c), dtype=np.float32)
    win_lo = np.empty((n_rs, n_cs))
    win_hi = np.empty((n_rs, n_cs))
    row_masks = np.empty(rect_r, dtype=np.int64)
    col_masks = np.empty(rect_c, dtype=np.int64)
    for ur in range(n_ur):
        for uc in range(n_uc):
            bound = threshold[ur, uc]
            if bound == np.inf:
                continue
            uid = ur * n_uc + uc
            scale = scale_of[ur, uc]
            count = _collect_candidates(
                top, best, shortlist, hit_start, hit_class, hit_value, bound, uid, mark, cand,
                lo_r, hi_r, lo_c, hi_c, n_cols, ur, uc,
            )  # fmt: skip
            # Which windows cover the unit's canvas points: the distinct sets (as bit masks over window rows and
            # columns) along its canvas rows and columns.
            y_lo, y_hi = crange_r[0, ur], crange_r[1, ur]
            x_lo, x_hi = crange_c[0, uc], crange_c[1, uc]
            n_rm = _distinct_masks(slots_r, y_lo, y_hi, row_masks)
            n_cm = _distinct_masks(slots_c, x_lo, x_hi, col_masks)
            # Each candidate's range over the unit: per window over the points it reads there, then averaged over
            # the windows that cover a canvas point (the canvas is their mean), worst and best over the unit.
            best_lo = -np.inf
            for q in range(count):
                _window_ranges(logits, cand[q], win_lo, win_hi, lo_r, hi_r, lo_c, hi_c, n_cols, ur, uc)
                lo, hi = np.inf, -np.inf
                for a in range(n_rm):
                    for b in range(n_cm):
                        s_lo, s_hi, n_in = 0.0, 0.0, 0
                        for i in range(n_rs):
                            if row_masks[a] >> i & 1:
                                for j in range(n_cs):
                                    if col_masks[b] >> j & 1:
                                        s_lo += win_lo[i, j]
                                        s_hi += win_hi[i, j]
                                        n_in += 1
                        lo, hi = min(lo, s_lo / n_in), max(hi, s_hi / n_in)
                cand_lo[q], cand_hi[q] = lo, hi
                best_lo = max(best_lo, lo)
            alive = 0
            for q in range(count):
                if cand_hi[q] >= best_lo - 2 * rel * max(scale, abs(best_lo), abs(cand_hi[q])):
                    cand[alive] = cand[q]
                    alive += 1
            for q in range(1, alive):  # ascending class ids: the first of equal values wins, as in argmax
                c, a = cand[q], q
                while a > 0 and cand[a - 1] > c:
                    cand[a] = cand[a - 1]
                    a -= 1
                cand[a] = c
            # The survivors' exact canvas values over the unit's canvas rectangle: their ranges prune again (the
            # final resize is convex too), then they decide each pixel.
            best_lo = -np.inf
            for q in range(alive):
                lo, hi = np.inf, -np.inf
                for y in range(y_lo, y_hi + 1):
                    for x in range(x_lo, x_hi + 1):
                        v = _canvas_value(
                            logits, y, x, cand[q], ints_r, weights_r, slots_r, starts_r,
                            ints_c, weights_c, slots_c, starts_c,
                        )  # fmt: skip
                        scratch[q, y - y_lo, x - x_lo] = v
                        lo, hi = min(lo, v), max(hi, v)
                cand_lo[q], cand_hi[q] = lo, hi
                best_lo = max(best_lo, lo)
            n_cand += alive
            survivors = 0
            for q in range(alive):
                if cand_hi[q] >= best_lo - 2 * rel * max(scale, abs(best_lo), abs(cand_hi[q])):
                    keep[survivors] = q
                    survivors += 1
            if survivors == 1:
                single += 1
                for y in range(ustart_r[ur], ustop_r[ur]):
                    for x in range(ustart_c[uc], ustop_c[uc]):
                        out[y, x] = cand[keep[0]]
                continue
            multi += 1
            for y in range(ustart_r[ur], ustop_r[ur]):
                for x in range(ustart_c[uc], ustop_c[uc]):
                    winner, top_value = -1, _F32(0)
                    for q in range(survivors):
                        v = _final_value(
                            scratch[keep[q]], y, x, y_lo, x_lo, ints_r, weights_r, final_r,
                            ints_c, weights_c, final_c,
                        )  # fmt: skip
                        if winner < 0 or v > top_value:
                            top_value, winner = v, cand[keep[q]]
                    out[y, x] = winner
                    n_values += survivors
    return settled, single, multi, n_cand, n_values
