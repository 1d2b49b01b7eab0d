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


@numba.njit(cache=True, nogil=True, fastmath=True)  # a reduction: let it vectorize
def _loss(values: np.ndarray, count: int, lo: float, hi: float, levels: int) -> float:
    scale = np.float32((hi - lo) / levels)
    inv = np.float32(1.0 / scale) if scale > 0 else np.float32(0.0)
    lo32 = np.float32(lo)
    top = np.float32(levels)
    total = np.float32(0.0)
    for j in range(count):
        x = values[j]
        q = np.floor((x - lo32) * inv + np.float32(0.5))
        q = min(max(q, np.float32(0.0)), top)
        d = x - (q * scale + lo32)
        total += d * d
    return float(total)


@numba.njit(cache=True, parallel=True)
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
    cols = w.shape[1]
    for r in numba.prange(w.shape[0]):
        xmin = float(lo[r])
        xmax = float(hi[r])
        if xmax <= xmin:
            continue
        values = np.empty(cols, dtype=np.float32)  # the row's kept values, packed
        count = 0
        for c in range(cols):
            if not use_keep or kept[r, c]:
                values[count] = w[r, c]
                count += 1
        step = (xmax - xmin) / nbins
        cur_min, cur_max = xmin, xmax
        best = _loss(values, count, xmin, xmax, levels)
        best_min, best_max = xmin, xmax
        while cur_min + min_bins * step < cur_max:
            loss_l = _loss(values, count, cur_min + step, cur_max, levels)
            loss_r = _loss(values, count, cur_min, cur_max - step, levels)
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
