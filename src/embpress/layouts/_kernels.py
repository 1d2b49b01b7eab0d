"""Numba kernels for the block-sparse layout (torch has no kernel for it).

Compiled on first use and cached on disk; one bag per parallel iteration, so the
thread count follows ``torch.get_num_threads()``.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

__all__ = ["block_sparse_bag", "set_threads"]

_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def set_threads() -> None:
    """Use as many numba threads as torch uses (within numba's pool)."""
    pool = int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
    numba.set_num_threads(max(1, min(torch.get_num_threads(), pool)))


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
    scale_bits: np.ndarray,
    offset_bits: np.ndarray,
    half: bool,
    block_bits: np.ndarray,
    group_ptr: np.ndarray,
    dim: int,
    width: int,
    num_blocks: int,
    bits: int,
    group_rows: int,
    indices: np.ndarray,
    offsets: np.ndarray,
    per_sample_weights: np.ndarray,
    has_weights: bool,
    mean: bool,
    out: np.ndarray,
) -> None:
    """``out[b] = sum / mean over the bag of decoded rows`` (kept blocks only).

    ``scale_bits`` / ``offset_bits`` are the row qparams as raw bits: int16 holding
    float16 when ``half``, else int32 holding float32.
    """
    popcount = _POPCOUNT8
    per_byte = 8 // bits
    code_mask = (1 << bits) - 1
    row_bytes = block_bits.shape[1]
    scale32 = np.empty(0, np.float32) if half else scale_bits.view(np.float32)
    offset32 = np.empty(0, np.float32) if half else offset_bits.view(np.float32)
    for b in numba.prange(offsets.shape[0] - 1):
        start = offsets[b]
        stop = offsets[b + 1]
        acc = out[b]
        for p in range(start, stop):
            r = indices[p]
            g = r // group_rows
            c = group_ptr[g]
            for rr in range(g * group_rows, r):
                for k in range(row_bytes):
                    c += popcount[block_bits[rr, k]] * width
            if half:
                s = np.float32(_half_bits_to_float(scale_bits[r]))
                o = np.float32(_half_bits_to_float(offset_bits[r]))
            else:
                s = scale32[r]
                o = offset32[r]
            if has_weights:
                wgt = per_sample_weights[p]
                s = s * wgt
                o = o * wgt
            for k in range(num_blocks):
                if (block_bits[r, k >> 3] >> (k & 7)) & 1:
                    col0 = k * width
                    for j in range(width):
                        col = col0 + j
                        if col < dim:
                            pos = c + j
                            if bits == 8:
                                code = codes[pos]
                            else:
                                code = (codes[pos // per_byte] >> ((pos % per_byte) * bits)) & code_mask
                            acc[col] += np.float32(code) * s + o
                    c += width
        if mean and stop > start:
            count = np.float32(stop - start)
            for col in range(dim):
                acc[col] /= count
