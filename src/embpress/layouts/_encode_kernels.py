"""Numba kernels for encoding a table: mask statistics, kept ranges, codes and errors.

One pass each over the table (rows in parallel), so encoding costs a few reads of the
float table instead of a dozen torch temporaries of its size. These kernels use no helper
from another file (numba's disk cache is keyed on the jitted function's own file, see
``_kernels``).
"""

from __future__ import annotations

import numba
import numpy as np

from .. import _kernel_cache

__all__ = [
    "assemble_records",
    "count_blocks",
    "count_blocks_of_4",
    "encode_rows",
    "fake_quantize",
    "kept_minmax",
]


@numba.njit(cache=True, parallel=True, nogil=True)
def count_blocks(mask: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One pass over the mask. Per row: kept entries, (1 x width) blocks with a kept entry,
    blocks with kept and pruned entries mixed, and the kept-block bitmap (uint32 words: bit
    k % 32 of word k // 32, see ``stats.RowStats``)."""
    rows, cols = mask.shape
    nb = (cols + width - 1) // width
    kept = np.zeros(rows, dtype=np.int64)
    blocks = np.zeros(rows, dtype=np.int64)
    mixed = np.zeros(rows, dtype=np.int64)
    bitmap = np.zeros((rows, (nb + 31) // 32), dtype=np.uint32)
    for r in numba.prange(rows):
        k = 0
        b = 0
        m = 0
        for blk in range(nb):
            c0 = blk * width
            c1 = min(c0 + width, cols)
            n = 0
            for c in range(c0, c1):
                n += mask[r, c]
            k += n
            if n > 0:
                b += 1
                bitmap[r, blk // 32] |= np.uint32(1 << (blk % 32))
                if n < c1 - c0:
                    m += 1
        kept[r] = k
        blocks[r] = b
        mixed[r] = m
    return kept, blocks, mixed, bitmap


@numba.njit(cache=True, parallel=True, nogil=True)
def count_blocks_of_4(mask_words: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`count_blocks` for (1 x 4) blocks, reading the bool mask as one uint32 per
    block (a True byte is 0x01, so the top byte of ``word * 0x01010101`` is the block's
    kept count)."""
    rows, nb = mask_words.shape
    kept = np.zeros(rows, dtype=np.int64)
    blocks = np.zeros(rows, dtype=np.int64)
    mixed = np.zeros(rows, dtype=np.int64)
    bitmap = np.zeros((rows, (nb + 31) // 32), dtype=np.uint32)
    for r in numba.prange(rows):
        k = 0
        b = 0
        m = 0
        for blk in range(nb):
            n = ((int(mask_words[r, blk]) * 0x01010101) >> 24) & 0xFF
            k += n
            if n > 0:
                b += 1
                bitmap[r, blk // 32] |= np.uint32(1 << (blk % 32))
                m += n < 4
        kept[r] = k
        blocks[r] = b
        mixed[r] = m
    return kept, blocks, mixed, bitmap


@numba.njit(cache=True, inline="always")
def _row_minmax(w: np.ndarray, mask: np.ndarray, use_mask: bool, r: int) -> tuple[float, float]:
    a = np.float32(np.inf)
    z = np.float32(-np.inf)
    for c in range(w.shape[1]):
        if (not use_mask) or mask[r, c]:
            v = w[r, c]
            a = min(a, v)
            z = max(z, v)
    if a > z:  # nothing kept
        return 0.0, 0.0
    return float(a), float(z)


@numba.njit(cache=True, parallel=True, nogil=True)
def kept_minmax(w: np.ndarray, mask: np.ndarray, use_mask: bool) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of each row over its kept entries (0, 0 where none is kept)."""
    rows = w.shape[0]
    lo = np.zeros(rows, dtype=np.float32)
    hi = np.zeros(rows, dtype=np.float32)
    for r in numba.prange(rows):
        a, z = _row_minmax(w, mask, use_mask, r)
        lo[r] = a
        hi[r] = z
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
    derive_qparams: bool,
) -> None:
    """Quantize each row of ``w`` into ``out`` and measure the error against ``ref``.

    ``derive_qparams``: first set ``scale``/``offset`` of the row from its kept range,
    float32 rule (offset = min, scale = (max - min) / levels rounded to nearest), which is
    what ``quant.rowwise.choose_qparams`` gives for float32 rows without a zero constraint;
    the row is read once, while it is in cache.

    ``block_stream``: ``out`` is the code stream of kept (1 x width) blocks, row ``r``
    starting at ``row_start[r]`` (edge blocks padded with code 0; blocks are wholly kept
    or wholly pruned); else ``out`` is ``rows * cols`` codes, row-major, and pruned
    entries get the row's ``zero_code``.
    """
    rows, cols = w.shape
    levels = (1 << bits) - 1
    for r in numba.prange(rows):
        if derive_qparams:
            a, z = _row_minmax(w, mask, use_mask, r)
            offset[r] = a
            step = np.float32((float(z) - float(a)) / levels)
            if step == 0 and z > a:  # below float32's resolution: the smallest step
                step = np.float32(2.0**-149)
            scale[r] = step
        s = scale[r]
        o = offset[r]
        inv_ok = s != 0
        e2 = np.float32(0.0)  # one row's sums fit float32; the table's are float64
        r2 = np.float32(0.0)
        mx = np.float32(0.0)
        pos = row_start[r] if block_stream else r * cols
        for c0 in range(0, cols, width):
            c1 = min(c0 + width, cols)
            if block_stream and use_mask and not mask[r, c0]:  # a pruned block: only errors
                for c in range(c0, c1):
                    x = ref[r, c]
                    e2 += x * x
                    r2 += x * x
                    mx = max(mx, abs(x))
                continue
            for c in range(c0, c1):
                x = ref[r, c]
                r2 += x * x
                if block_stream or (not use_mask) or mask[r, c]:
                    q = 0
                    if inv_ok:
                        t = np.rint((w[r, c] - o) / s)
                        q = 0 if t < 0 else (levels if t > levels else int(t))
                    d = (np.float32(q) * s + o) - x
                    out[pos + c - c0 if block_stream else pos + c] = q
                else:
                    d = -x
                    out[pos + c] = zero_code[r]
                e2 += d * d
                mx = max(mx, abs(d))
            if block_stream:
                for j in range(c1 - c0, width):
                    out[pos + j] = 0
                pos += width
        err_sq[r] = float(e2)
        ref_sq[r] = float(r2)
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
def assemble_records(
    shape: tuple[int, ...],
    records: np.ndarray,
    starts: np.ndarray,
    bitmap: np.ndarray,
    qparams: np.ndarray,
    codes: np.ndarray,
    code_start: np.ndarray,
    kept_blocks: np.ndarray,
) -> None:
    """Write each row's block-sparse record at ``records[starts[r]:starts[r+1]]`` (every
    byte of it: the array need not be zeroed).

    ``shape`` is the table's ``block_sparse.RecordShape`` as a plain tuple. A record is the
    first ``bitmap_bytes`` bytes of the row's ``bitmap`` (uint8 [rows, >= bitmap_bytes]),
    its ``2 * scale_bytes`` ``qparams`` bytes, then the codes of its ``kept_blocks[r]``
    blocks (one per byte in ``codes`` from ``code_start[r]``, ``block_width`` a block)
    packed from the next byte: code j at byte j*bits//8, bit (j*bits)%8.
    """
    _, width, bits, _, _, scale_bytes, bitmap_bytes, header, _ = shape
    per_byte = 8 // bits
    for r in numba.prange(starts.shape[0] - 1):
        a = starts[r]
        for j in range(bitmap_bytes):
            records[a + j] = bitmap[r, j]
        for j in range(2 * scale_bytes):
            records[a + bitmap_bytes + j] = qparams[r, j]
        a += header
        c0 = code_start[r]
        n = kept_blocks[r] * width
        if bits == 8:
            for j in range(n):
                records[a + j] = codes[c0 + j]
        else:
            for byte in range((n + per_byte - 1) // per_byte):
                value = 0
                for k in range(min(per_byte, n - byte * per_byte)):
                    value |= int(codes[c0 + byte * per_byte + k]) << (k * bits)
                records[a + byte] = value


# several processes may compile into one disk cache at once (see ``_kernel_cache``)
_kernel_cache.guard(
    count_blocks,
    count_blocks_of_4,
    kept_minmax,
    encode_rows,
    fake_quantize,
    assemble_records,
)
