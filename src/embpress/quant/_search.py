"""Numba kernel: FBGEMM's greedy clipping-range search, one row per iteration.

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
    levels = (1 << bits) - 1
    min_bins = nbins * (1.0 - ratio)
    rows, cols = w.shape
    padded = (cols + LANES - 1) // LANES * LANES
    for task in numba.prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        values = np.zeros(padded, dtype=np.float32)  # the row's kept values, packed
        weight = np.zeros(padded, dtype=np.float32)
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
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


# several processes may compile into one disk cache at once (see ``_kernel_cache``)
_kernel_cache.guard_module(globals())
