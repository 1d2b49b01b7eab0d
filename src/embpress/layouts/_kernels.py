"""Numba kernels for lookups that torch has no kernel for (block-sparse bags, row remapping).

Compiled on first use and cached on disk; one bag per parallel iteration, so the thread
count follows ``torch.get_num_threads()``. Indices are bounds-checked inside (a kernel
returns how many were out of range, the caller raises IndexError).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

__all__ = ["block_sparse_bag", "remap_rows", "set_threads"]

_DEBRUIJN = np.array(
    [0, 1, 28, 2, 29, 14, 24, 3, 30, 22, 20, 15, 25, 17, 4, 8,
     31, 27, 13, 23, 21, 19, 16, 7, 26, 12, 18, 6, 11, 5, 10, 9],
    dtype=np.int64,
)  # fmt: skip


def set_threads() -> None:
    """Use as many numba threads as torch uses (within numba's pool)."""
    pool = int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
    numba.set_num_threads(max(1, min(torch.get_num_threads(), pool)))


@numba.njit(cache=True, inline="always")
def _popcount32(x: int) -> int:
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) & 0xFFFFFFFF) >> 24


@numba.njit(cache=True, inline="always")
def _half_bits_to_float(h: int) -> float:
    h = int(h) & 0xFFFF
    sign = -1.0 if h >> 15 else 1.0
    exp = (h >> 10) & 0x1F
    man = h & 0x3FF
    if exp == 0:
        return sign * man * 2.0**-24
    if exp == 31:
        return sign * math.inf if man == 0 else math.nan
    return sign * (man + 1024) * 2.0 ** (exp - 25)


@numba.njit(cache=True, parallel=True, nogil=True)
def block_sparse_bag(
    codes: np.ndarray,
    qparam_bits: np.ndarray,
    half: bool,
    block_words: np.ndarray,
    group_ptr: np.ndarray,
    dim: int,
    width: int,
    bits: int,
    word_bits: int,
    group_rows: int,
    indices: np.ndarray,
    offsets: np.ndarray,
    per_sample_weights: np.ndarray,
    has_weights: bool,
    mean: bool,
    out: np.ndarray,
) -> int:
    """``out[b] = sum / mean over the bag of decoded rows`` (kept blocks only).

    ``qparam_bits``: [rows, 2] (scale, offset) as raw bits, int16 holding float16 when
    ``half``, else int32 holding float32. ``block_words``: [rows, words] bitmaps of
    ``word_bits``-bit unsigned words.
    Returns the number of out-of-range indices (their rows are skipped).
    """
    rows = block_words.shape[0]
    words = block_words.shape[1]
    per_byte = 8 // bits
    shift = 3 if bits == 1 else (0 if bits == 8 else (1 if bits == 4 else 2))
    code_mask = (1 << bits) - 1
    qp32 = np.empty((0, 2), np.float32) if half else qparam_bits.view(np.float32)
    debruijn = _DEBRUIJN
    bad = 0
    for b in numba.prange(offsets.shape[0] - 1):
        start = offsets[b]
        stop = offsets[b + 1]
        acc = out[b]
        for p in range(start, stop):
            r = indices[p]
            if r < 0 or r >= rows:
                bad += 1
                continue
            g = r // group_rows
            c = group_ptr[g]
            for rr in range(g * group_rows, r):
                for k in range(words):
                    c += _popcount32(int(block_words[rr, k])) * width
            if half:
                s = np.float32(_half_bits_to_float(qparam_bits[r, 0]))
                o = np.float32(_half_bits_to_float(qparam_bits[r, 1]))
            else:
                s = qp32[r, 0]
                o = qp32[r, 1]
            if has_weights:
                wgt = per_sample_weights[p]
                s = s * wgt
                o = o * wgt
            for k in range(words):
                word = int(block_words[r, k])
                while word != 0:
                    low = word & (-word)
                    word ^= low
                    blk = k * word_bits + debruijn[((low * 0x077CB531) & 0xFFFFFFFF) >> 27]
                    col0 = blk * width
                    n = min(width, dim - col0)
                    if bits == 8:
                        for j in range(n):
                            acc[col0 + j] += np.float32(codes[c + j]) * s + o
                    else:
                        for j in range(n):
                            pos = c + j
                            code = (codes[pos >> shift] >> ((pos & (per_byte - 1)) * bits)) & code_mask
                            acc[col0 + j] += np.float32(code) * s + o
                    c += width
        if mean and stop > start:
            count = np.float32(stop - start)
            for col in range(dim):
                acc[col] /= count
    return bad


@numba.njit(cache=True, parallel=True, nogil=True)
def remap_rows(
    indices: np.ndarray,
    row_bits: np.ndarray,
    row_rank: np.ndarray,
    rows: int,
    zero_row: int,
    out: np.ndarray,
) -> int:
    """Positions in the compact table of original rows (pruned rows -> ``zero_row``).

    Returns the number of out-of-range indices (mapped to ``zero_row``).
    """
    bad = 0
    for i in numba.prange(indices.shape[0]):
        r = indices[i]
        if r < 0 or r >= rows:
            bad += 1
            out[i] = zero_row
            continue
        byte = int(row_bits[r >> 3])
        bit = r & 7
        if (byte >> bit) & 1:
            out[i] = row_rank[r >> 3] + _popcount32(byte & ((1 << bit) - 1))
        else:
            out[i] = zero_row
    return bad
