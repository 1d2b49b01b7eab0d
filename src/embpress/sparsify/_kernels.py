"""Numba kernels for DataNormSparsifier: block norms, the histograms of the exact k-th
smallest, marking and expanding the pruned blocks.

Each is one pass over its input (the table is read once for the norms), so a
1M x 128 table is masked in a fraction of a second with O(elements) memory.
The block norm reproduces ``F.avg_pool2d(..., ceil_mode=True)`` on ``|x|`` or ``x*x``
bit for bit: float32 sum in row-major window order, divided by the in-bounds count.
"""

from __future__ import annotations

import numba
import numpy as np

from .. import _kernel_cache

__all__ = [
    "add_high_histogram",
    "add_low_histogram",
    "block_norms",
    "block_norms_1x4",
    "count_equal",
    "expand_block_mask",
    "expand_block_mask_1x4",
    "mark_below",
    "mark_ties",
]


@numba.njit(cache=True, parallel=True, nogil=True)
def block_norms(x: np.ndarray, bh: int, bw: int, square: bool, out: np.ndarray) -> None:
    """``out`` = mean of ``|x|`` (or ``x*x``) over each (bh x bw) block (edge: in-bounds mean)."""
    rows, cols = x.shape
    nbr = (rows + bh - 1) // bh
    nbc = (cols + bw - 1) // bw
    for br in numba.prange(nbr):
        r0 = br * bh
        r1 = min(r0 + bh, rows)
        for bc in range(nbc):
            c0 = bc * bw
            c1 = min(c0 + bw, cols)
            acc = np.float32(0.0)
            for r in range(r0, r1):
                for c in range(c0, c1):
                    v = np.float32(x[r, c])
                    acc += v * v if square else abs(v)
            out[br, bc] = acc / np.float32((r1 - r0) * (c1 - c0))


@numba.njit(cache=True, parallel=True, nogil=True)
def block_norms_1x4(x: np.ndarray, square: bool, out: np.ndarray) -> None:
    """``block_norms(x, 1, 4, square, out)`` for a table whose width is a multiple of 4,
    bit for bit (the same adds in the same order), 4-5x faster: the block width is a
    constant, so LLVM unrolls it and vectorises across blocks."""
    rows, cols = x.shape
    for r in numba.prange(rows):
        for bc in range(cols // 4):
            c = bc * 4
            a, b, d, e = x[r, c], x[r, c + 1], x[r, c + 2], x[r, c + 3]
            if square:
                acc = (((np.float32(0.0) + a * a) + b * b) + d * d) + e * e
            else:
                acc = (((np.float32(0.0) + abs(a)) + abs(b)) + abs(d)) + abs(e)
            out[r, bc] = acc / np.float32(4.0)


@numba.njit(cache=True, parallel=True, nogil=True)
def mark_below(norms: np.ndarray, threshold: float, out: np.ndarray) -> None:
    """``out`` = ``norms < threshold`` (flat; float32 compare), each entry on its own."""
    t = np.float32(threshold)
    for i in numba.prange(norms.shape[0]):
        out[i] = norms[i] < t


@numba.njit(cache=True, nogil=True)
def mark_ties(norms: np.ndarray, threshold: float, ties: int, out: np.ndarray) -> None:
    """Set ``out`` at the first ``ties`` entries of ``norms`` equal to ``threshold`` (flat,
    in order; ties are few: the scan stops at the last one needed)."""
    t = np.float32(threshold)
    for i in range(norms.shape[0]):
        if ties == 0:
            break
        if norms[i] == t:
            out[i] = True
            ties -= 1


@numba.njit(cache=True, parallel=True, nogil=True)
def expand_block_mask(pruned: np.ndarray, bh: int, bw: int, out: np.ndarray) -> None:
    """``out`` = element mask (True = kept) of a table from its pruned-block flags."""
    rows, cols = out.shape
    nbc = pruned.shape[1]
    for r in numba.prange(rows):
        br = r // bh
        for bc in range(nbc):
            kept = not pruned[br, bc]
            for c in range(bc * bw, min(bc * bw + bw, cols)):
                out[r, c] = kept


@numba.njit(cache=True, parallel=True, nogil=True)
def expand_block_mask_1x4(pruned: np.ndarray, out: np.ndarray) -> None:
    """``expand_block_mask(pruned, 1, 4, out)`` for a width that is a multiple of 4 (the
    block width a constant: 8x faster)."""
    rows, cols = out.shape
    for r in numba.prange(rows):
        for bc in range(cols // 4):
            kept = not pruned[r, bc]
            c = bc * 4
            out[r, c] = kept
            out[r, c + 1] = kept
            out[r, c + 2] = kept
            out[r, c + 3] = kept


@numba.njit(cache=True, nogil=True)
def add_high_histogram(values: np.ndarray, hist: np.ndarray) -> int:
    """Add the top 16 bits of non-negative float32s to ``hist`` (65536 bins); return how
    many are NaN. For non-negative floats the bit pattern orders as the value does."""
    bits = values.view(np.uint32)
    nans = 0
    for v in bits:
        hist[v >> 16] += 1
        if (v & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
            nans += 1
    return nans


@numba.njit(cache=True, nogil=True)
def add_low_histogram(values: np.ndarray, bucket: int, hist: np.ndarray) -> None:
    """Add the low 16 bits of the float32s whose top 16 bits are ``bucket`` to ``hist``."""
    bits = values.view(np.uint32)
    for v in bits:
        if (v >> 16) == bucket:
            hist[v & 0xFFFF] += 1


@numba.njit(cache=True, nogil=True)
def count_equal(values: np.ndarray, threshold: float) -> int:
    """How many of ``values`` equal ``threshold``."""
    t = np.float32(threshold)
    n = 0
    for v in values:
        if v == t:
            n += 1
    return n


# several processes may compile into one disk cache at once (see ``_kernel_cache``)
_kernel_cache.guard_module(globals())
