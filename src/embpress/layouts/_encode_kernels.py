"""Numba kernels for encoding a table: mask statistics, kept ranges, codes and errors.

One pass each over the table (rows in parallel), so encoding costs a few reads of the
float table instead of a dozen torch temporaries of its size. These kernels use no helper
from another file (numba's disk cache is keyed on the jitted function's own file, see
``_kernels``).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import _kernel_cache

__all__ = [
    "assemble_records",
    "count_blocks",
    "count_blocks_of_4",
    "encode_rows",
    "encode_rows_run",
    "fake_quantize",
    "kept_minmax",
]


@numba.njit(cache=True, parallel=True, nogil=True)
def count_blocks(
    mask: np.ndarray, width: int, kept: np.ndarray, blocks: np.ndarray, mixed: np.ndarray, bitmap: np.ndarray
) -> None:
    """One pass over the mask. Per row: kept entries, (1 x width) blocks with a kept entry,
    blocks with kept and pruned entries mixed (int64 each), and the kept-block bitmap
    (zeroed uint32 words: bit k % 32 of word k // 32, see ``stats.RowStats``), into the
    caller's arrays (each row's own: row ranges may run on several threads)."""
    rows, cols = mask.shape
    nb = (cols + width - 1) // width
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


@intrinsic
def _blocks_of_32_intrinsic(typingctx: Any, row: Any, lo: Any) -> Any:
    """(bitmap word, kept entries, blocks with a kept entry, mixed blocks) of the 32
    (1 x 4) blocks ``row[lo:lo + 32]`` (uint32: a block's 4 bool bytes), as vector code:
    a block's kept count is the top byte of ``word * 0x01010101``. A contiguous row only
    (its 32 words are read in one load): another does not compile."""
    if not (isinstance(row, types.Array) and row.layout == "C" and row.dtype == types.uint32):
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        b = builder
        i32, i64 = ir.IntType(32), ir.IntType(64)
        v32 = ir.VectorType(i32, 32)

        def splat(x: int) -> Any:
            return ir.Constant(v32, [x] * 32)

        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        v = b.load(b.bitcast(b.gep(data, [args[1]]), v32.as_pointer()), align=1)
        n = b.lshr(b.mul(v, splat(0x01010101)), splat(24))
        on = b.icmp_unsigned("!=", n, splat(0))
        word = b.bitcast(on, i32)
        mixed = b.bitcast(b.and_(on, b.icmp_unsigned("<", n, splat(4))), i32)
        add = cgutils.get_or_insert_function(
            b.module, ir.FunctionType(i32, [v32]), "llvm.vector.reduce.add.v32i32"
        )
        popcount = b.module.declare_intrinsic("llvm.ctpop", [i32])
        out = [word, b.call(add, [n]), b.call(popcount, [word]), b.call(popcount, [mixed])]
        return context.make_tuple(b, signature.return_type, [b.zext(x, i64) for x in out])

    return types.UniTuple(types.int64, 4)(row, types.intp), codegen


# called from the kernels only (typed here as such: numba supplies the typing context)
_blocks_of_32: Any = _blocks_of_32_intrinsic


@numba.njit(cache=True, parallel=True, nogil=True)
def count_blocks_of_4(
    mask_words: np.ndarray, kept: np.ndarray, blocks: np.ndarray, mixed: np.ndarray, bitmap: np.ndarray
) -> None:
    """:func:`count_blocks` for (1 x 4) blocks, reading the bool mask as one uint32 per
    block (a True byte is 0x01, so the top byte of ``word * 0x01010101`` is the block's
    kept count). Branch-free; 32 blocks at a time in vector code (``_blocks_of_32``), the
    rest one by one; each bitmap word is built in a register (every word of ``bitmap``
    is written)."""
    rows, nb = mask_words.shape
    words = (nb + 31) // 32
    for r in numba.prange(rows):
        row = mask_words[r]
        k = np.int64(0)
        b = np.int64(0)
        m = np.int64(0)
        for wd in range(words):
            lo = wd * 32
            if lo + 32 <= nb:
                word, kk, bb, mm = _blocks_of_32(row, lo)
                k += kk
                b += bb
                m += mm
            else:
                word = np.int64(0)
                for blk in range(lo, nb):
                    n = ((np.int64(row[blk]) * 0x01010101) >> 24) & 0xFF
                    on = np.int64(n > 0)
                    k += n
                    b += on
                    m += on & np.int64(n < 4)
                    word |= on << (blk - lo)
            bitmap[r, wd] = word
        kept[r] = k
        blocks[r] = b
        mixed[r] = m


@intrinsic
def _bits_intrinsic(typingctx: Any, x: Any) -> Any:
    """The bits of a float32 as an int32 (no instruction: a reinterpretation)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _float_intrinsic(typingctx: Any, x: Any) -> Any:
    """The float32 whose bits are an int32 (the inverse of ``_bits``)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def _copy_intrinsic(typingctx: Any, dst: Any, at: Any, src: Any, start: Any, n: Any) -> Any:
    """``dst[at:at + n] = src[start:start + n]`` (byte arrays that do not overlap there) as
    one ``memcpy``: a loop of a few dozen bytes would run byte by byte. Contiguous
    arrays only (it indexes their data by bytes): others do not compile."""
    if not (dst.layout == src.layout == "C" and dst.dtype == src.dtype == types.uint8):
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        d = context.make_array(signature.args[0])(context, builder, args[0])
        s = context.make_array(signature.args[2])(context, builder, args[2])
        to = builder.gep(d.data, [args[1]])
        of = builder.gep(s.data, [args[3]])
        cgutils.raw_memcpy(builder, to, of, args[4], 1)
        return context.get_dummy_value()

    return types.none(dst, types.intp, src, types.intp, types.intp), codegen


# called from the kernels only (typed here as such: numba supplies the typing context)
_bits: Any = _bits_intrinsic
_float: Any = _float_intrinsic
_copy: Any = _copy_intrinsic
_KEY_LOW, _KEY_HIGH = np.int32(0x7FFFFFFF), np.int32(-0x80000000)


@numba.njit(cache=True, inline="always")
def _order_key(i: np.int32) -> np.int32:
    """A float's bits as an integer that orders as the float does (finite floats; -0.0
    below 0.0): negatives' magnitude bits flipped. Its own inverse."""
    return np.int32(i ^ ((i >> 31) & 0x7FFFFFFF))


@numba.njit(cache=True, inline="always")
def _row_minmax(w: np.ndarray, mask: np.ndarray, use_mask: bool, r: int) -> tuple[np.float32, np.float32]:
    """Min and max of row ``r`` over its kept entries (0, 0 where none is kept).

    Compared as integer keys (``_order_key``): integer min/max loops vectorise where
    float ones do not without reassociating."""
    lo = _KEY_LOW
    hi = _KEY_HIGH
    for c in range(w.shape[1]):
        key = _order_key(_bits(w[r, c]))
        keep = (not use_mask) or mask[r, c]
        kl = key if keep else _KEY_LOW
        kh = key if keep else _KEY_HIGH
        if kl < lo:
            lo = kl
        if kh > hi:
            hi = kh
    if lo > hi:  # nothing kept
        return np.float32(0.0), np.float32(0.0)
    return _float(_order_key(lo)), _float(_order_key(hi))


@numba.njit(cache=True, parallel=True, nogil=True)
def kept_minmax(w: np.ndarray, mask: np.ndarray, use_mask: bool, lo: np.ndarray, hi: np.ndarray) -> None:
    """Min and max of each row over its kept entries (0, 0 where none is kept) into
    ``lo`` and ``hi`` (float32, a row each). Allocating nothing, it compiles ahead of time
    (``_aot``); callers split the rows (``mask`` too where ``use_mask``) across threads."""
    for r in numba.prange(w.shape[0]):
        a, z = _row_minmax(w, mask, use_mask, r)
        lo[r] = a
        hi[r] = z


ROWS_PER_TASK = 64  # rows one thread encodes with one set of scratch rows
# a row's float32 sums of squares are kept where the reference's lies in this range and the
# error's below its top: squares then neither overflow nor lose what the relative error
# shows by underflowing (a row of values near 1e-20 or 1e20 is summed in float64 instead)
_SQUARES_LOW, _SQUARES_HIGH = 2.0**-60, 2.0**60


@numba.njit(cache=True, inline="always")
def _encode_range(
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
    r0: int,
    r1: int,
    codes: np.ndarray,
    packed: np.ndarray,
    e2: np.ndarray,
    r2: np.ndarray,
    err: np.ndarray,
) -> None:
    """Rows [r0, r1) of ``encode_rows`` with the caller's scratch rows: ``codes`` and
    ``packed`` (uint8, the whole blocks rounded up to uint32 words), ``e2`` and ``r2``
    (float32, the padded power-of-two row the sums fold) and ``err`` (float32, a row)."""
    cols = w.shape[1]
    levels = (1 << bits) - 1
    top = np.float32(levels)
    nb = (cols + width - 1) // width
    span = e2.shape[0]
    codes4 = codes.view(np.uint32)
    packed4 = packed.view(np.uint32)
    for r in range(r0, r1):
        if derive_qparams:
            a, z = _row_minmax(w, mask, use_mask, r)
            offset[r] = a
            step = np.float32((np.float64(z) - np.float64(a)) / levels)
            if step == 0 and z > a:  # below float32's resolution: the smallest step
                step = np.float32(2.0**-149)
            scale[r] = step
        s = scale[r]
        o = offset[r]
        divisor = s if s != 0 else np.float32(1.0)  # scale 0: every code 0
        live = np.float32(1.0) if s != 0 else np.float32(0.0)
        base = r * cols
        zc = zero_code[r]
        # the row's views, indexed in 1-D: the loop below then compiles to vector code
        wr = w[r]
        xr = ref[r]
        mr = mask[r] if use_mask else mask[0]
        outr = out[0:0] if block_stream else out[base : base + cols]
        for c in range(cols):
            x = xr[c]
            t = min(max(np.rint((wr[c] - o) / divisor) * live, np.float32(0.0)), top)
            kept = (not use_mask) or mr[c]
            d = (t * s + o) - x if kept else -x
            e2[c] = d * d
            r2[c] = x * x
            err[c] = abs(d)
            if block_stream:
                codes[c] = np.uint8(t)
            else:
                outr[c] = np.uint8(t) if kept else zc
        if block_stream:  # kept blocks packed without a branch, then one copy
            n = nb
            kept_codes = codes  # no mask: every block is kept
            if use_mask:
                n = 0
                kept_codes = packed
                if width == 4:
                    for b in range(nb):
                        packed4[n] = codes4[b]
                        n += np.int64(mask[r, 4 * b])
                else:
                    for b in range(nb):
                        for j in range(width):
                            packed[n * width + j] = codes[b * width + j]
                        n += np.int64(mask[r, b * width])
            _copy(out, row_start[r], kept_codes, 0, n * width)
        h = span // 2
        while h >= 8:
            for i in range(h):
                e2[i] += e2[i + h]
                r2[i] += r2[i + h]
            h //= 2
        es = float(((e2[0] + e2[1]) + (e2[2] + e2[3])) + ((e2[4] + e2[5]) + (e2[6] + e2[7])))
        rs = float(((r2[0] + r2[1]) + (r2[2] + r2[3])) + ((r2[4] + r2[5]) + (r2[6] + r2[7])))
        if not (_SQUARES_LOW <= rs <= _SQUARES_HIGH and es <= _SQUARES_HIGH):
            es = 0.0  # float32 squares under- or overflowed: the row's sums again in float64
            rs = 0.0
            for c in range(cols):
                es += np.float64(err[c]) * np.float64(err[c])
                rs += np.float64(xr[c]) * np.float64(xr[c])
        err_sq[r] = es
        ref_sq[r] = rs
        m = np.int32(0)  # |d| compared as bits: non-negative floats order as integers
        for c in range(cols):
            v = _bits(err[c])
            if v > m:
                m = v
        max_abs[r] = _float(m)


@numba.njit(cache=True, inline="always")
def scratch_sizes(cols: int, width: int) -> tuple[int, int]:
    """(bytes of ``codes``/``packed``, floats of ``e2``/``r2``) of ``encode_rows``' scratch
    (``layouts.encode`` sizes ``encode_rows_run``'s the same way: a test compares)."""
    nb = (cols + width - 1) // width
    span = 8  # the padded row the sums fold: a power of two
    while span < cols:
        span *= 2
    return 4 * ((nb * width + 3) // 4), span


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

    Each row is worked in per-thread scratch rows by loops without a branch or a float
    reduction, which the compiler vectorises: codes and errors, then the kept blocks
    packed, then the sums. A row's sums have a fixed order on every CPU: the halves of a
    zero-padded power-of-two row folded onto each other down to 8 lanes, then a tree.
    """
    rows, cols = w.shape
    whole, span = scratch_sizes(cols, width)
    for task in numba.prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        codes = np.zeros(whole, dtype=np.uint8)
        packed = np.zeros(whole, dtype=np.uint8)
        e2 = np.zeros(span, dtype=np.float32)
        r2 = np.zeros(span, dtype=np.float32)
        err = np.zeros(cols, dtype=np.float32)
        _encode_range(
            w, ref, mask, use_mask, scale, offset, zero_code, bits, width, block_stream, row_start, out,
            err_sq, ref_sq, max_abs, derive_qparams, task * ROWS_PER_TASK,
            min(rows, (task + 1) * ROWS_PER_TASK), codes, packed, e2, r2, err,
        )  # fmt: skip


@numba.njit(cache=True, nogil=True)
def encode_rows_run(
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
    r0: int,
    r1: int,
    codes: np.ndarray,
    packed: np.ndarray,
    e2: np.ndarray,
    r2: np.ndarray,
    err: np.ndarray,
) -> None:
    """Rows [r0, r1) of ``encode_rows`` on one thread, with the caller's zeroed scratch
    (sizes from ``scratch_sizes``; ``err``: a row): nothing here allocates or raises, so
    it compiles ahead of time (``_aot``) and callers split the rows across threads."""
    _encode_range(
        w, ref, mask, use_mask, scale, offset, zero_code, bits, width, block_stream, row_start, out,
        err_sq, ref_sq, max_abs, derive_qparams, r0, r1, codes, packed, e2, r2, err,
    )  # fmt: skip


@numba.njit(cache=True, parallel=True, nogil=True)
def fake_quantize(w: np.ndarray, scale: np.ndarray, offset: np.ndarray, bits: int, out: np.ndarray) -> None:
    """``out`` = ``dequantize(quantize(w))`` row-wise, in float32 (``out`` the caller's, so
    that it compiles ahead of time, see ``_aot``; callers split the rows across threads)."""
    rows, cols = w.shape
    top = np.float32((1 << bits) - 1)
    for r in numba.prange(rows):
        s = scale[r]
        o = offset[r]
        divisor = s if s != 0 else np.float32(1.0)  # scale 0: t * s is 0, the offset stays
        for c in range(cols):  # branch-free: vectorised
            t = min(max(np.rint((w[r, c] - o) / divisor), np.float32(0.0)), top)
            out[r, c] = t * s + o


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
        _copy(records, a, bitmap[r], 0, bitmap_bytes)
        _copy(records, a + bitmap_bytes, qparams[r], 0, 2 * scale_bytes)
        a += header
        c0 = code_start[r]
        n = kept_blocks[r] * width
        if bits == 8:
            _copy(records, a, codes, c0, n)
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
    encode_rows_run,
    fake_quantize,
    assemble_records,
)
