"""Numba kernels of the per-row codecs (``quant.codecs``): fitting, codes and errors.

Each kernel takes the float table, the rows to work on (``rows``: table row of item i)
and writes one result per item, items in parallel in chunks (one scratch buffer per
chunk). Codes are packed into ``out[i]`` (one row of the class's payload, FBGEMM's bit
order: code j in byte ``j * bits // 8`` at bit ``(j * bits) % 8``) when ``write`` is set;
``err[i]`` is the squared L2 error of the decoded row, decoded exactly as the layout
decodes it (float32 arithmetic from the stored values). These kernels use no helper from
another file (numba's disk cache is keyed on the jitted function's own file, see
``layouts._kernels``).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .. import _kernel_cache

__all__ = [
    "colbook_codes",
    "colbook_fit",
    "levels_codes",
    "levels_fit",
    "row_sqnorm",
    "rowwise_codes",
]

CHUNK = 512  # items per parallel task (one scratch buffer each)


@numba.njit(cache=True, inline="always")
def _chunks(n: int) -> int:
    return (n + CHUNK - 1) // CHUNK


@numba.njit(cache=True, inline="always")
def _pack(codes: np.ndarray, dim: int, bits: int, out: np.ndarray, i: int) -> None:
    """Pack ``codes[:dim]`` (each < 2**bits) into ``out[i, :ceil(dim * bits / 8)]``."""
    per_byte = 8 // bits
    full = dim // per_byte
    for q in range(full):
        byte = 0
        for t in range(per_byte):
            byte |= codes[q * per_byte + t] << (t * bits)
        out[i, q] = byte
    if full * per_byte < dim:
        byte = 0
        for j in range(full * per_byte, dim):
            byte |= codes[j] << ((j - full * per_byte) * bits)
        out[i, full] = byte


@numba.njit(cache=True, parallel=True, nogil=True)
def row_sqnorm(x: np.ndarray, rows: np.ndarray, err: np.ndarray) -> None:
    """``err[i]`` = squared L2 norm of row ``rows[i]`` (a pruned row's error)."""
    for i in numba.prange(rows.shape[0]):
        r = rows[i]
        e = 0.0
        for j in range(x.shape[1]):
            v = np.float64(x[r, j])
            e += v * v
        err[i] = e


F16_MAX = 65504.0


@numba.njit(cache=True, inline="always")
def _round_f16(x: float, up: bool) -> float:
    """``x`` rounded up or down to float16's grid (11 significant bits, spacing at least
    2**-24): ``quant.rowwise._round_sig`` for float16."""
    if x == 0.0:
        return 0.0
    _, e = math.frexp(x)
    step = math.ldexp(1.0, max(e - 11, -24))
    q = x / step
    return (math.ceil(q) if up else math.floor(q)) * step


@numba.njit(cache=True, parallel=True, nogil=True, fastmath={"reassoc", "nsz", "nnan"})
def rowwise_codes(
    x: np.ndarray,
    rows: np.ndarray,
    bits: int,
    ranges: np.ndarray,
    ranged: bool,
    scale: np.ndarray,
    offset: np.ndarray,
    bad: np.ndarray,
    out: np.ndarray,
    write: bool,
    err: np.ndarray,
) -> None:
    """Row ``rows[i]``'s float16 scale and offset, its codes and error in one read of the
    row.

    The range coded is the row's [min, max], or where ``ranged`` ``[ranges[i, 0],
    ranges[i, 1]]`` (float32, the clipping range a search chose: values outside are
    clamped to the end codes). Qparams as ``quant.rowwise.choose_qparams`` gives them for
    float16 (offset rounded down, scale up, a non-zero range keeps a non-zero scale);
    ``bad[i]`` where float16 cannot hold the range (then 0, 0). Codes ``round((x -
    offset) / scale)`` clamped to [0, 2**bits - 1] (0 where the scale is 0), decoded as
    ``code * scale + offset`` in float32. The table is finite (``nnan`` lets the min/max
    vectorise; min and max are exact in any order, and a zero's sign does not change the
    qparams).
    """
    n = rows.shape[0]
    dim = x.shape[1]
    levels = (1 << bits) - 1
    top = np.float32(levels)
    zero = np.float32(0.0)
    for ch in numba.prange(_chunks(n)):
        codes = np.empty(dim, dtype=np.int32)
        for i in range(ch * CHUNK, min(n, (ch + 1) * CHUNK)):
            r = rows[i]
            row = x[r]
            if ranged:
                a = ranges[i, 0]
                b = ranges[i, 1]
            else:
                a = row[0]
                b = row[0]
                for j in range(1, dim):
                    a = min(a, row[j])
                    b = max(b, row[j])
            lo = np.float64(a)
            hi = np.float64(b)
            if abs(lo) > F16_MAX or abs(hi) > F16_MAX:
                bad[i] = True
                s = np.float32(0.0)
                o = np.float32(0.0)
            else:
                bad[i] = False
                o64 = _round_f16(lo, False)
                s64 = _round_f16((hi - o64) / levels, True)
                if s64 == 0.0 and hi > o64:
                    s64 = math.ldexp(1.0, -24)
                s = np.float32(s64)
                o = np.float32(o64)
            scale[i] = s
            offset[i] = o
            e = np.float32(0.0)
            if s == 0:
                for j in range(dim):
                    codes[j] = 0
                    d = o - x[r, j]
                    e += d * d
            else:
                inv = np.float32(1.0) / s
                for j in range(dim):
                    v = x[r, j]
                    q = min(max(np.rint((v - o) * inv), zero), top)
                    codes[j] = np.int32(q)
                    d = q * s + o - v
                    e += d * d
            err[i] = e
            if write:
                _pack(codes, dim, bits, out, i)


# Lloyd-Max levels of a unit Gaussian: the starting levels of a row's k-means (scaled by
# the row's standard deviation around its mean)
_GAUSS2 = np.array([-0.7979, 0.7979], dtype=np.float64)
_GAUSS4 = np.array([-1.510, -0.4528, 0.4528, 1.510], dtype=np.float64)


@numba.njit(cache=True, parallel=True, nogil=True, fastmath={"reassoc", "nsz"})
def levels_fit(x: np.ndarray, rows: np.ndarray, k: int, iters: int, levels: np.ndarray) -> None:
    """``levels[i]``: k (2 or 4) sorted levels of row ``rows[i]`` by 1-D k-means (Lloyd).

    Start: the Gaussian Lloyd-Max levels scaled to the row's mean and standard deviation,
    clamped to the row's range; then up to ``iters`` Lloyd steps (assign each value to the
    nearest level, move each level to the mean of its values; a level with no values
    stays), stopping when no level moves. Clusters are intervals of the sorted values, so
    the levels stay sorted. One step is one pass over the row: the sums and counts of the
    values above each midpoint.
    """
    n = rows.shape[0]
    dim = x.shape[1]
    start = _GAUSS2 if k == 2 else _GAUSS4
    zero = np.float32(0.0)
    for ch in numba.prange(_chunks(n)):
        c = np.empty(4, dtype=np.float64)
        sums = np.zeros(4, dtype=np.float64)
        counts = np.zeros(4, dtype=np.float64)
        for i in range(ch * CHUNK, min(n, (ch + 1) * CHUNK)):
            row = x[rows[i]]
            total = np.float32(0.0)
            sq = np.float32(0.0)
            lo = row[0]
            hi = row[0]
            for j in range(dim):
                v = row[j]
                total += v
                sq += v * v
                lo = min(lo, v)
                hi = max(hi, v)
            mean = np.float64(total) / dim
            std = np.sqrt(max(np.float64(sq) / dim - mean * mean, 0.0))
            for t in range(k):
                c[t] = min(max(mean + start[t] * std, np.float64(lo)), np.float64(hi))
            for _ in range(iters):
                if k == 2:
                    m0 = np.float32(0.5 * (c[0] + c[1]))
                    s0 = zero
                    n0 = zero
                    for j in range(dim):
                        v = row[j]
                        a0 = np.float32(v > m0)
                        s0 += a0 * v
                        n0 += a0
                    sums[0] = s0
                    counts[0] = n0
                else:
                    m0 = np.float32(0.5 * (c[0] + c[1]))
                    m1 = np.float32(0.5 * (c[1] + c[2]))
                    m2 = np.float32(0.5 * (c[2] + c[3]))
                    s0 = zero
                    s1 = zero
                    s2 = zero
                    n0 = zero
                    n1 = zero
                    n2 = zero
                    for j in range(dim):
                        v = row[j]
                        a0 = np.float32(v > m0)
                        a1 = np.float32(v > m1)
                        a2 = np.float32(v > m2)
                        s0 += a0 * v
                        s1 += a1 * v
                        s2 += a2 * v
                        n0 += a0
                        n1 += a1
                        n2 += a2
                    sums[0] = s0
                    sums[1] = s1
                    sums[2] = s2
                    counts[0] = n0
                    counts[1] = n1
                    counts[2] = n2
                moved = False
                for t in range(k):
                    above_s = sums[t] if t < k - 1 else 0.0
                    above_m = counts[t] if t < k - 1 else 0.0
                    below_s = np.float64(total) if t == 0 else sums[t - 1]
                    below_m = np.float64(dim) if t == 0 else counts[t - 1]
                    m = below_m - above_m
                    if m > 0.5:
                        new = (below_s - above_s) / m
                        if new != c[t]:
                            moved = True
                            c[t] = new
                if not moved:
                    break
            for t in range(k):
                levels[i, t] = np.float32(c[t])


@numba.njit(cache=True, parallel=True, nogil=True, fastmath={"reassoc", "nsz"})
def levels_codes(
    x: np.ndarray,
    rows: np.ndarray,
    levels: np.ndarray,
    bits: int,
    out: np.ndarray,
    write: bool,
    err: np.ndarray,
) -> None:
    """Codes of the nearest of row i's sorted ``levels[i]`` (float32 values of the stored
    float16 levels), decoded as ``levels[i, code]``."""
    n = rows.shape[0]
    dim = x.shape[1]
    k = 1 << bits
    for ch in numba.prange(_chunks(n)):
        codes = np.empty(dim, dtype=np.int32)
        for i in range(ch * CHUNK, min(n, (ch + 1) * CHUNK)):
            r = rows[i]
            e = np.float32(0.0)
            if k == 2:
                m0 = np.float32(0.5 * (np.float64(levels[i, 0]) + np.float64(levels[i, 1])))
                a0 = levels[i, 0]
                a1 = levels[i, 1]
                for j in range(dim):
                    v = x[r, j]
                    up = v > m0
                    codes[j] = np.int32(up)
                    d = (a1 if up else a0) - v
                    e += d * d
            else:
                m0 = np.float32(0.5 * (np.float64(levels[i, 0]) + np.float64(levels[i, 1])))
                m1 = np.float32(0.5 * (np.float64(levels[i, 1]) + np.float64(levels[i, 2])))
                m2 = np.float32(0.5 * (np.float64(levels[i, 2]) + np.float64(levels[i, 3])))
                a0 = levels[i, 0]
                a1 = levels[i, 1]
                a2 = levels[i, 2]
                a3 = levels[i, 3]
                for j in range(dim):
                    v = x[r, j]
                    c = np.int32(v > m0) + np.int32(v > m1) + np.int32(v > m2)
                    codes[j] = c
                    lv = a0 if c == 0 else (a1 if c == 1 else (a2 if c == 2 else a3))
                    d = lv - v
                    e += d * d
            err[i] = e
            if write:
                _pack(codes, dim, bits, out, i)


@numba.njit(cache=True, parallel=True, nogil=True)
def colbook_fit(
    sample: np.ndarray, weights: np.ndarray, weighted: bool, k: int, iters: int, book: np.ndarray
) -> None:
    """``book[j]``: k sorted levels of column j of ``sample`` by weighted 1-D k-means.

    Per column: the values sorted with prefix sums of weight and weight * value, so that a
    Lloyd step costs O(k log n): levels start at the weighted quantiles (i + 0.5) / k, then
    each step finds the clusters' bounds by bisection at the midpoints and moves each
    level to its cluster's weighted mean (an empty cluster keeps its level). Unweighted
    (``weighted`` False, ``weights`` unread) or weights summing to 0: equal weights.
    """
    n, dim = sample.shape
    for j in numba.prange(dim):
        col = sample[:, j].copy()
        total = 0.0
        if weighted:
            for q in range(n):
                total += weights[q]
        equal = not total > 0.0
        if equal:
            xs = np.sort(col)
            order = np.empty(0, dtype=np.int64)
        else:
            order = np.argsort(col)
            xs = col[order]
        cw = np.empty(n + 1, dtype=np.float64)
        cwx = np.empty(n + 1, dtype=np.float64)
        cw[0] = 0.0
        cwx[0] = 0.0
        for q in range(n):
            w = 1.0 if equal else weights[order[q]]
            cw[q + 1] = cw[q] + w
            cwx[q + 1] = cwx[q] + w * np.float64(xs[q])
        whole = cw[n]
        c = np.empty(k, dtype=np.float64)
        for t in range(k):
            at = int(np.searchsorted(cw, (t + 0.5) / k * whole, side="left")) - 1
            c[t] = np.float64(xs[min(max(at, 0), n - 1)])
        bounds = np.empty(k + 1, dtype=np.int64)
        bounds[0] = 0
        bounds[k] = n
        for _ in range(iters):
            for t in range(k - 1):
                mid = np.float32(0.5 * (c[t] + c[t + 1]))
                bounds[t + 1] = np.searchsorted(xs, mid, side="right")
            moved = False
            for t in range(k):
                w = cw[bounds[t + 1]] - cw[bounds[t]]
                if w > 0.0:
                    new = (cwx[bounds[t + 1]] - cwx[bounds[t]]) / w
                    if new != c[t]:
                        moved = True
                        c[t] = new
            if not moved:
                break
        # Lloyd keeps the levels sorted; the float32 rounding below keeps them so too
        for t in range(k):
            book[j, t] = np.float32(c[t])


@numba.njit(cache=True, parallel=True, nogil=True, fastmath={"reassoc", "nsz"})
def colbook_codes(
    x: np.ndarray,
    rows: np.ndarray,
    book: np.ndarray,
    mids: np.ndarray,
    bits: int,
    out: np.ndarray,
    write: bool,
    err: np.ndarray,
) -> None:
    """Codes of the nearest of column j's sorted levels ``book[j]``: the number of the
    column's midpoints ``mids[t, j]`` (t < 2**bits - 1) below the value; decoded as
    ``book[j, code]``."""
    n = rows.shape[0]
    dim = x.shape[1]
    k = 1 << bits
    for ch in numba.prange(_chunks(n)):
        codes = np.empty(dim, dtype=np.int32)
        flat = book.reshape(-1)
        for i in range(ch * CHUNK, min(n, (ch + 1) * CHUNK)):
            r = rows[i]
            for j in range(dim):
                codes[j] = 0
            for t in range(k - 1):  # vectorised across the columns
                for j in range(dim):
                    codes[j] += np.int32(x[r, j] > mids[t, j])
            e = np.float32(0.0)
            for j in range(dim):
                d = flat[j * k + codes[j]] - x[r, j]
                e += d * d
            err[i] = e
            if write:
                _pack(codes, dim, bits, out, i)


# several processes may compile into one disk cache at once (see ``_kernel_cache``)
_kernel_cache.guard_module(globals())
