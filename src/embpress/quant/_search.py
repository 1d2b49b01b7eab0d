"""Numba kernels: FBGEMM's greedy clipping-range search
(``greedy_ranges``: numba's parallel kernel; ``greedy_ranges_run``: one thread's rows with
the caller's scratch, compiled ahead of time, see ``_aot``), two rows at a time.

Starting from [min, max] of the row's kept entries, the range is shrunk by one of 200
bins at a time from whichever end lowers the squared quantization error more, for up to
16% of the bins; the range with the lowest error seen is kept (FBGEMM's
``param_search_greedy``, used by its ``optimized_qparams`` prepack at 4 and 2 bits).

The loss pass asks LLVM for 512-bit vectors (``_wide_vectors``) where the CPU has them:
LLVM keeps to 256 bits on x86 CPUs with AVX-512 unless a function says otherwise, and
the search, arithmetic on values in L1, measured faster with them (other kernels keep
the default).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba.core import types
from numba.extending import intrinsic

from .. import _kernel_cache

LANES = 8  # a row's packed values are padded to a multiple of this (weight 0): no scalar tail
ROWS_PER_TASK = 64  # rows one thread searches with one set of scratch rows (an even number)


@intrinsic
def _wide_vectors_intrinsic(typingctx: Any) -> Any:
    """Let LLVM vectorise the calling function with 512-bit vectors where the CPU has them
    (its ``prefer-vector-width``; by default it keeps to 256 bits on x86 CPUs with
    AVX-512). Emits no code."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        attrs = builder.function.attributes
        for attr in ('"prefer-vector-width"="512"', '"min-legal-vector-width"="512"'):
            set.add(attrs, attr)  # string attributes: llvmlite's own add knows only keywords
        return context.get_dummy_value()

    return types.void(), codegen


# called from the kernels only (typed here as such: numba supplies the typing context)
_wide_vectors: Any = _wide_vectors_intrinsic


@numba.njit(cache=True, nogil=True, fastmath=True)  # reductions: let them vectorize
def _losses(
    values: np.ndarray,
    weight: np.ndarray,
    n: int,
    lo: float,
    hi: float,
    step: float,
    lo2: float,
    hi2: float,
    step2: float,
    levels: int,
) -> tuple[float, float, float, float]:
    """Squared errors of two rows' packed values quantized on two ranges each, in one pass:
    row 1 (``values[:n]``, ``weight`` 0 on padding) on [lo + step, hi] and [lo, hi - step],
    row 2 (from ``values[n]`` on) the same with ``lo2``, ``hi2``, ``step2``. Two rows at
    once: each step of a row's search waits for the one before (divisions, sums, a
    compare), and the other row's work fills that wait."""
    _wide_vectors()
    sa = np.float32((hi - (lo + step)) / levels)
    sb = np.float32(((hi - step) - lo) / levels)
    sc = np.float32((hi2 - (lo2 + step2)) / levels)
    sd = np.float32(((hi2 - step2) - lo2) / levels)
    ia = np.float32(1.0 / sa) if sa > 0 else np.float32(0.0)
    ib = np.float32(1.0 / sb) if sb > 0 else np.float32(0.0)
    ic = np.float32(1.0 / sc) if sc > 0 else np.float32(0.0)
    id_ = np.float32(1.0 / sd) if sd > 0 else np.float32(0.0)
    la, lb = np.float32(lo + step), np.float32(lo)
    lc, ld = np.float32(lo2 + step2), np.float32(lo2)
    top = np.float32(levels)
    ta = np.float32(0.0)
    tb = np.float32(0.0)
    tc = np.float32(0.0)
    td = np.float32(0.0)
    for j in range(n):
        x = values[j]
        qa = min(max(np.floor((x - la) * ia + np.float32(0.5)), np.float32(0.0)), top)
        qb = min(max(np.floor((x - lb) * ib + np.float32(0.5)), np.float32(0.0)), top)
        da = x - (qa * sa + la)
        db = x - (qb * sb + lb)
        ta += da * da * weight[j]
        tb += db * db * weight[j]
        y = values[n + j]
        qc = min(max(np.floor((y - lc) * ic + np.float32(0.5)), np.float32(0.0)), top)
        qd = min(max(np.floor((y - ld) * id_ + np.float32(0.5)), np.float32(0.0)), top)
        dc = y - (qc * sc + lc)
        dd = y - (qd * sd + ld)
        tc += dc * dc * weight[n + j]
        td += dd * dd * weight[n + j]
    return float(ta), float(tb), float(tc), float(td)


@numba.njit(cache=True, nogil=True, inline="always")
def _pack_row(
    w: np.ndarray,
    kept: np.ndarray,
    use_keep: bool,
    r: int,
    n: int,
    values: np.ndarray,
    weight: np.ndarray,
    at: int,
) -> None:
    """Row ``r``'s kept values into ``values[at:at + n]`` (then zeros), ``weight`` 1 on them
    (then 0)."""
    count = 0
    for c in range(w.shape[1]):
        if not use_keep or kept[r, c]:
            values[at + count] = w[r, c]
            count += 1
    for j in range(n):
        weight[at + j] = 1.0 if j < count else 0.0
    values[at + count : at + n] = 0.0  # the padding: not an earlier row's values


@numba.njit(cache=True, nogil=True, inline="always")
def _padded_count(kept: np.ndarray, use_keep: bool, r: int, cols: int) -> int:
    """How many values row ``r`` keeps, rounded up to a multiple of ``LANES``."""
    count = cols
    if use_keep:
        count = 0
        for c in range(cols):
            if kept[r, c]:
                count += 1
    return (count + LANES - 1) // LANES * LANES


@numba.njit(cache=True, nogil=True, inline="always")
def _shrink(
    loss_l: float,
    loss_r: float,
    lo: float,
    hi: float,
    step: float,
    min_bins: float,
    best: float,
    best_lo: float,
    best_hi: float,
) -> tuple[float, float, bool, float, float, float]:
    """One step of a row's search: the range shrunk by ``step`` at the end whose loss is
    lower, whether to go on, and the best range so far: (lo, hi, go on, best loss, best
    lo, best hi)."""
    if loss_l < loss_r:
        lo += step
        cur = loss_l
    else:
        hi -= step
        cur = loss_r
    if cur < best:
        best, best_lo, best_hi = cur, lo, hi
    return lo, hi, lo + min_bins * step < hi, best, best_lo, best_hi


@numba.njit(cache=True, inline="always")
def padded_width(cols: int) -> int:
    """Floats of each scratch array of a search over rows of ``cols`` values: two rows'
    packed values, each a multiple of ``LANES`` (``rowwise.search_scratch_width`` is its
    numba-free twin; a test compares)."""
    return 2 * ((cols + LANES - 1) // LANES * LANES)


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
    ahead of time (``_aot``) and callers split the rows across threads, at even rows.
    Rows go two at a time, 2k with 2k + 1 (so a row's partner, and with it the order of
    its sums, is the same however the rows are split)."""
    levels = (1 << bits) - 1
    min_bins = nbins * (1.0 - ratio)
    cols = w.shape[1]
    for r in range(r0, r1, 2):
        second = r + 1 < r1
        n = _padded_count(kept, use_keep, r, cols)
        if second:
            n = max(n, _padded_count(kept, use_keep, r + 1, cols))
        _pack_row(w, kept, use_keep, r, n, values, weight, 0)
        if second:
            _pack_row(w, kept, use_keep, r + 1, n, values, weight, n)
        else:
            values[n : 2 * n] = 0.0
            weight[n : 2 * n] = 0.0
        x1, y1 = float(lo[r]), float(hi[r])
        x2, y2 = (float(lo[r + 1]), float(hi[r + 1])) if second else (0.0, 0.0)
        s1, s2 = (y1 - x1) / nbins, (y2 - x2) / nbins
        go1, go2 = y1 > x1, second and y2 > x2  # a row of one value has nothing to search
        first = _losses(values, weight, n, x1, y1, 0.0, x2, y2, 0.0, levels)  # [min, max]
        best1, best2 = first[0], first[2]
        b_lo1, b_hi1, b_lo2, b_hi2 = x1, y1, x2, y2
        go1 = go1 and x1 + min_bins * s1 < y1
        go2 = go2 and x2 + min_bins * s2 < y2
        while go1 or go2:
            l1, r1_, l2, r2_ = _losses(values, weight, n, x1, y1, s1, x2, y2, s2, levels)
            if go1:
                x1, y1, go1, best1, b_lo1, b_hi1 = _shrink(l1, r1_, x1, y1, s1, min_bins, best1, b_lo1, b_hi1)
            if go2:
                x2, y2, go2, best2, b_lo2, b_hi2 = _shrink(l2, r2_, x2, y2, s2, min_bins, best2, b_lo2, b_hi2)
        lo[r] = b_lo1
        hi[r] = b_hi1
        if second:
            lo[r + 1] = b_lo2
            hi[r + 1] = b_hi2


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
        values = np.zeros(padded, dtype=np.float32)  # two rows' kept values, packed
        weight = np.zeros(padded, dtype=np.float32)
        r0 = task * ROWS_PER_TASK
        r1 = min(rows, r0 + ROWS_PER_TASK)
        greedy_ranges_run(w, kept, use_keep, lo, hi, bits, nbins, ratio, r0, r1, values, weight)


# several processes may compile into one disk cache at once (see ``_kernel_cache``)
_kernel_cache.guard_module(globals())
