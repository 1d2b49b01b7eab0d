"""Numba kernels for encoding a table: mask statistics, kept ranges, codes and errors.

One pass each over the table (rows in parallel), so encoding costs a few reads of the
float table instead of a dozen torch temporaries of its size.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["count_nonfinite", "encode_rows", "fake_quantize", "kept_minmax", "mask_row_stats"]


@numba.njit(cache=True, parallel=True, nogil=True)
def count_nonfinite(w: np.ndarray) -> int:
    """Number of NaN / Inf entries."""
    total = 0
    for r in numba.prange(w.shape[0]):
        n = 0
        for c in range(w.shape[1]):
            if not np.isfinite(w[r, c]):
                n += 1
        total += n
    return total


@numba.njit(cache=True, parallel=True, nogil=True)
def mask_row_stats(mask: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: kept entries, (1 x width) blocks with a kept entry, and mixed blocks."""
    rows, cols = mask.shape
    kept = np.zeros(rows, dtype=np.int64)
    blocks = np.zeros(rows, dtype=np.int64)
    mixed = np.zeros(rows, dtype=np.int64)
    for r in numba.prange(rows):
        k = 0
        b = 0
        m = 0
        for c0 in range(0, cols, width):
            n = 0
            c1 = min(c0 + width, cols)
            for c in range(c0, c1):
                if mask[r, c]:
                    n += 1
            k += n
            if n > 0:
                b += 1
                if n < c1 - c0:
                    m += 1
        kept[r] = k
        blocks[r] = b
        mixed[r] = m
    return kept, blocks, mixed


@numba.njit(cache=True, parallel=True, nogil=True)
def kept_minmax(w: np.ndarray, mask: np.ndarray, use_mask: bool) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of each row over kept entries (0, 0 where none is kept)."""
    rows, cols = w.shape
    lo = np.zeros(rows, dtype=np.float32)
    hi = np.zeros(rows, dtype=np.float32)
    for r in numba.prange(rows):
        found = False
        a = np.float32(0.0)
        b = np.float32(0.0)
        for c in range(cols):
            if use_mask and not mask[r, c]:
                continue
            v = w[r, c]
            if not found:
                a = v
                b = v
                found = True
            else:
                a = min(a, v)
                b = max(b, v)
        lo[r] = a
        hi[r] = b
    return lo, hi


@numba.njit(cache=True, inline="always")
def _code(x: np.float32, s: np.float32, o: np.float32, levels: int) -> int:
    if s == 0:
        return 0
    q = np.rint((x - o) / s)
    if q < 0:
        return 0
    if q > levels:
        return levels
    return int(q)


@numba.njit(cache=True, parallel=True, nogil=True)
def encode_rows(
    w: np.ndarray,
    ref: np.ndarray,
    mask: np.ndarray,
    use_mask: bool,
    scale: np.ndarray,
    offset: np.ndarray,
    zero_code: np.ndarray,
    bits: int,
    width: int,
    block_stream: bool,
    row_start: np.ndarray,
    out: np.ndarray,
    err_sq: np.ndarray,
    ref_sq: np.ndarray,
    max_abs: np.ndarray,
) -> None:
    """Quantize each row of ``w`` into ``out`` and measure the error against ``ref``.

    ``block_stream``: ``out`` is the code stream of kept (1 x width) blocks, row ``r``
    starting at ``row_start[r]`` (edge blocks padded with code 0); else ``out`` is
    ``rows * cols`` codes, row-major, and pruned entries get the row's ``zero_code``.
    """
    rows, cols = w.shape
    levels = (1 << bits) - 1
    for r in numba.prange(rows):
        s = scale[r]
        o = offset[r]
        e2 = 0.0
        r2 = 0.0
        mx = np.float32(0.0)
        pos = row_start[r]
        for c0 in range(0, cols, width):
            c1 = min(c0 + width, cols)
            block_kept = True
            if use_mask:
                block_kept = False
                for c in range(c0, c1):
                    if mask[r, c]:
                        block_kept = True
                        break
            for c in range(c0, c1):
                kept = (not use_mask) or mask[r, c]
                if kept:
                    q = _code(w[r, c], s, o, levels)
                    value = np.float32(q) * s + o
                else:
                    q = zero_code[r]
                    value = np.float32(0.0)
                if block_stream:
                    if block_kept:
                        out[pos + c - c0] = q
                else:
                    out[r * cols + c] = q
                x = ref[r, c]
                d = value - x
                e2 += float(d) * float(d)
                r2 += float(x) * float(x)
                if abs(d) > mx:
                    mx = abs(d)
            if block_stream and block_kept:
                for j in range(c1 - c0, width):
                    out[pos + j] = 0
                pos += width
        err_sq[r] = e2
        ref_sq[r] = r2
        max_abs[r] = mx


@numba.njit(cache=True, parallel=True, nogil=True)
def fake_quantize(w: np.ndarray, scale: np.ndarray, offset: np.ndarray, bits: int) -> np.ndarray:
    """``dequantize(quantize(w))`` row-wise, in float32."""
    rows, cols = w.shape
    levels = (1 << bits) - 1
    out = np.empty((rows, cols), dtype=np.float32)
    for r in numba.prange(rows):
        s = scale[r]
        o = offset[r]
        for c in range(cols):
            out[r, c] = np.float32(_code(w[r, c], s, o, levels)) * s + o
    return out


@numba.njit(cache=True, parallel=True, nogil=True)
def block_bitmap(mask: np.ndarray, width: int) -> np.ndarray:
    """uint8 [rows, ceil(nb / 8)]: bit k % 8 of byte k // 8 set iff block k has a kept entry."""
    rows, cols = mask.shape
    nb = (cols + width - 1) // width
    out = np.zeros((rows, (nb + 7) // 8), dtype=np.uint8)
    for r in numba.prange(rows):
        for k in range(nb):
            for c in range(k * width, min((k + 1) * width, cols)):
                if mask[r, c]:
                    out[r, k >> 3] |= np.uint8(1 << (k & 7))
                    break
    return out
