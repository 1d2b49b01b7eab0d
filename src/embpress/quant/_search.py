"""Numba kernels: FBGEMM's greedy clipping-range search, one row per iteration
(``greedy_ranges``: numba's parallel kernel; ``greedy_ranges_run``: one thread's rows with
the caller's scratch, compiled ahead of time, see ``_aot``).

Starting from [min, max] of the row's kept entries, the range is shrunk by one of 200
bins at a time from whichever end lowers the squared quantization error more, for up to
16% of the bins; the range with the lowest error seen is kept (FBGEMM's
``param_search_greedy``, used by its ``optimized_qparams`` prepack at 4 and 2 bits).
"""

from __future__ import annotations

import numba
import numpy as np

from .. import _kernel_cache


@numba.njit(cache=True, nogil=True, fastmath=True)  # reductions: let them vectorize
def _loss_pair(
    values: np.ndarray, weight: np.ndarray, n: int, lo: float, hi: float, step: float, levels: int
) -> tuple[float, float]:
    """Squared error of ``values[:n]`` (``weight`` 0 on padding) quantized on [lo + step,
    hi] and on [lo, hi - step], in one pass over the values."""
    sa = np.float32((hi - (lo + step)) / levels)
    sb = np.float32(((hi - step) - lo) / levels)
    ia = np.float32(1.0 / sa) if sa > 0 else np.float32(0.0)
    ib = np.float32(1.0 / sb) if sb > 0 else np.float32(0.0)
    la = np.float32(lo + step)
    lb = np.float32(lo)
    top = np.float32(levels)
    ta = np.float32(0.0)
    tb = np.float32(0.0)
    for j in range(n):
        x = values[j]
        qa = min(max(np.floor((x - la) * ia + np.float32(0.5)), np.float32(0.0)), top)
        qb = min(max(np.floor((x - lb) * ib + np.float32(0.5)), np.float32(0.0)), top)
        da = x - (qa * sa + la)
        db = x - (qb * sb + lb)
        ta += da * da * weight[j]
        tb += db * db * weight[j]
    return float(ta), float(tb)


ROWS_PER_TASK = 64  # rows one thread searches with one set of scratch rows
LANES = 8  # the packed values are padded to a multiple of this (weight 0): no scalar tail


@numba.njit(cache=True, nogil=True, fastmath=True, inline="always")
def _search_rows(
    w: np.ndarray,
    kept: np.ndarray,
    use_keep: bool,
    lo: np.ndarray,
    hi: np.ndarray,
    bits: int,
    nbins: int,
    ratio: float,
    r0: int,
    r1: int,
    values: np.ndarray,
    weight: np.ndarray,
) -> None:
    """Rows [r0, r1) of ``greedy_ranges``, with scratch ``values`` and ``weight`` (each
    ``padded_width(cols)`` float32)."""
    levels = (1 << bits) - 1
    min_bins = nbins * (1.0 - ratio)
    cols = w.shape[1]
    for r in range(r0, r1):
        xmin = float(lo[r])
        xmax = float(hi[r])
        if xmax <= xmin:
            continue
        count = 0
        for c in range(cols):
            if not use_keep or kept[r, c]:
                values[count] = w[r, c]
                count += 1
        n = (count + LANES - 1) // LANES * LANES
        for j in range(n):
            weight[j] = 1.0 if j < count else 0.0
        values[count:n] = 0.0  # the padding: not an earlier row's values
        step = (xmax - xmin) / nbins
        cur_min, cur_max = xmin, xmax
        best = _loss_pair(values, weight, n, xmin, xmax, 0.0, levels)[0]  # [xmin, xmax]
        best_min, best_max = xmin, xmax
        while cur_min + min_bins * step < cur_max:
            loss_l, loss_r = _loss_pair(values, weight, n, cur_min, cur_max, step, levels)
            if loss_l < loss_r:
                cur_min += step
                cur = loss_l
            else:
                cur_max -= step
                cur = loss_r
            if cur < best:
                best, best_min, best_max = cur, cur_min, cur_max
        lo[r] = best_min
        hi[r] = best_max


@numba.njit(cache=True, inline="always")
def padded_width(cols: int) -> int:
    """Floats of each scratch row of a search over rows of ``cols`` values
    (``rowwise.search_scratch_width`` is its numba-free twin; a test compares)."""
    return (cols + LANES - 1) // LANES * LANES


@numba.njit(cache=True, parallel=True, fastmath=True)
def greedy_ranges(
    w: np.ndarray,
    kept: np.ndarray,
    use_keep: bool,
    lo: np.ndarray,
    hi: np.ndarray,
    bits: int,
    nbins: int,
    ratio: float,
) -> None:
    """Narrow ``lo``/``hi`` (in place) to each row's least-error clipping range."""
    rows, cols = w.shape
    padded = padded_width(cols)
    for task in numba.prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        values = np.zeros(padded, dtype=np.float32)  # the row's kept values, packed
        weight = np.zeros(padded, dtype=np.float32)
        r0 = task * ROWS_PER_TASK
        r1 = min(rows, r0 + ROWS_PER_TASK)
        _search_rows(w, kept, use_keep, lo, hi, bits, nbins, ratio, r0, r1, values, weight)


@numba.njit(cache=True, nogil=True, fastmath=True)
def greedy_ranges_run(
    w: np.ndarray,
    kept: np.ndarray,
    use_keep: bool,
    lo: np.ndarray,
    hi: np.ndarray,
    bits: int,
    nbins: int,
    ratio: float,
    r0: int,
    r1: int,
    values: np.ndarray,
    weight: np.ndarray,
) -> None:
    """Rows [r0, r1) of ``greedy_ranges`` on one thread, with the caller's scratch (each
    ``padded_width(cols)`` float32): nothing here allocates or raises, so it compiles
    ahead of time (``_aot``) and callers split the rows across threads."""
    _search_rows(w, kept, use_keep, lo, hi, bits, nbins, ratio, r0, r1, values, weight)


# several processes may compile into one disk cache at once (see ``_kernel_cache``)
_kernel_cache.guard_module(globals())
