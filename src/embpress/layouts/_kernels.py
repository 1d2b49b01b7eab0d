"""Numba kernels for lookups that torch has no kernel for (block-sparse bags, row remapping).

Compiled on first use and cached on disk; one bag per parallel iteration, so the thread
count follows ``torch.get_num_threads()``. Indices are bounds-checked inside (a kernel
returns how many were out of range, the caller raises IndexError).
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

__all__ = ["block_sparse_bag", "remap_rows", "set_threads"]


def set_threads() -> None:
    """Use as many numba threads as torch uses (within numba's pool)."""
    pool = int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
    numba.set_num_threads(max(1, min(torch.get_num_threads(), pool)))


def _int64_intrinsic(name: str) -> Any:
    """An int64 -> int64 LLVM bit intrinsic (one instruction where the CPU has it)."""

    @intrinsic
    def bit_op(typingctx: Any, x: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            value = builder.sext(args[0], ir.IntType(64)) if args[0].type.width < 64 else args[0]
            if name == "llvm.cttz":
                fn = builder.module.declare_intrinsic(name, [ir.IntType(64), ir.IntType(1)])
                return builder.call(fn, [value, ir.Constant(ir.IntType(1), 0)])
            fn = builder.module.declare_intrinsic(name, [ir.IntType(64)])
            return builder.call(fn, [value])

        return types.int64(types.int64), codegen

    return bit_op


_popcount = _int64_intrinsic("llvm.ctpop")
_trailing_zeros = _int64_intrinsic("llvm.cttz")


@intrinsic
def _prefetch_intrinsic(typingctx: Any, ary: Any, idx: Any) -> Any:
    """Hint the CPU to load ``ary[idx]`` into cache (no effect on results)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        aryty = signature.args[0]
        arr = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, arr, [args[1]], wraparound=False)
        i8p = builder.bitcast(ptr, ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [i8p, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(ary, types.intp), codegen


_prefetch: Any = _prefetch_intrinsic


def _block4_intrinsic(bits: int) -> Any:
    """``acc[col:col+4] += float(4 codes from code index pos) * s + o`` as vector IR.

    The compiler does not vectorise this step on its own (it cannot prove that the table
    and the accumulator do not overlap), so the four lanes are written out: one load of
    the block's bytes, one conversion, a multiply and an add (not fused, as in
    ``dequantize``), and one load/add/store of the accumulator. ``bits`` is 8 (four bytes)
    or 4 (two bytes, low nibble first).
    """

    @intrinsic
    def block4(typingctx: Any, acc: Any, col: Any, codes: Any, pos: Any, s: Any, o: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            accty, _, codesty, _, _, _ = signature.args
            acc_arr = context.make_array(accty)(context, builder, args[0])
            codes_arr = context.make_array(codesty)(context, builder, args[2])
            f4 = ir.VectorType(ir.FloatType(), 4)
            b4 = ir.VectorType(ir.IntType(8), 4)
            i32 = ir.IntType(32)
            if bits == 8:
                cptr = cgutils.get_item_pointer(
                    context, builder, codesty, codes_arr, [args[3]], wraparound=False
                )
                lanes = builder.load(builder.bitcast(cptr, b4.as_pointer()), align=1)
            else:
                byte_index = builder.lshr(args[3], ir.Constant(args[3].type, 1))
                cptr = cgutils.get_item_pointer(
                    context, builder, codesty, codes_arr, [byte_index], wraparound=False
                )
                b2 = ir.VectorType(ir.IntType(8), 2)
                pair = builder.load(builder.bitcast(cptr, b2.as_pointer()), align=1)
                order = ir.Constant(ir.VectorType(i32, 4), [0, 0, 1, 1])
                spread = builder.shuffle_vector(pair, pair, order)
                shifted = builder.lshr(spread, ir.Constant(b4, [0, 4, 0, 4]))
                lanes = builder.and_(shifted, ir.Constant(b4, [15, 15, 15, 15]))
            values = builder.uitofp(lanes, f4)

            def splat(x: Any) -> Any:
                v = ir.Constant(f4, ir.Undefined)
                for i in range(4):
                    v = builder.insert_element(v, x, ir.Constant(i32, i))
                return v

            decoded = builder.fadd(builder.fmul(values, splat(args[4])), splat(args[5]))
            aptr = cgutils.get_item_pointer(context, builder, accty, acc_arr, [args[1]], wraparound=False)
            vptr = builder.bitcast(aptr, f4.as_pointer())
            builder.store(builder.fadd(builder.load(vptr, align=4), decoded), vptr, align=4)
            return context.get_dummy_value()

        return types.void(acc, types.intp, codes, types.intp, types.float32, types.float32), codegen

    return block4


_add_block4_u8 = _block4_intrinsic(8)
_add_block4_u4 = _block4_intrinsic(4)


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


@numba.njit(cache=True, inline="always")
def _prefetch_headers(
    indices: np.ndarray,
    lo: int,
    hi: int,
    rows: int,
    group_rows: int,
    words: int,
    flat_words: np.ndarray,
    group_ptr: np.ndarray,
    flat_qparams: np.ndarray,
) -> None:
    for p in range(lo, hi):
        r = indices[p]
        if 0 <= r < rows:
            g = r // group_rows
            _prefetch(flat_words, g * group_rows * words)
            _prefetch(group_ptr, g)
            _prefetch(flat_qparams, 2 * r)


@numba.njit(cache=True, inline="always")
def _row_headers(
    indices: np.ndarray,
    weights: np.ndarray,
    has_weights: bool,
    lo: int,
    hi: int,
    rows: int,
    group_rows: int,
    words: int,
    width: int,
    bits: int,
    half: bool,
    flat_words: np.ndarray,
    group_ptr: np.ndarray,
    qparam_bits: np.ndarray,
    qp32: np.ndarray,
    codes: np.ndarray,
    start_out: np.ndarray,
    s_out: np.ndarray,
    o_out: np.ndarray,
) -> int:
    """Code start, scale and offset of each lookup in [lo, hi); prefetch its codes.

    Returns the number of out-of-range indices (their start is -1)."""
    bad = 0
    for i in range(hi - lo):
        p = lo + i
        r = indices[p]
        if r < 0 or r >= rows:
            bad += 1
            start_out[i] = -1
            continue
        g = r // group_rows
        first = g * group_rows * words
        before = (r - g * group_rows) * words
        kept_before = 0
        if words == 1 and first + group_rows <= flat_words.shape[0]:
            # fixed trip count and no branch: cheaper than a mispredicted loop exit
            for e in range(group_rows):
                kept_before += _popcount(int(flat_words[np.uint64(first + e)])) * (e < before)
        else:
            for e in range(first, first + before):
                kept_before += _popcount(int(flat_words[e]))
        c = group_ptr[g] + kept_before * width
        start_out[i] = c
        if half:
            sc = np.float32(_half_bits_to_float(qparam_bits[r, 0]))
            of = np.float32(_half_bits_to_float(qparam_bits[r, 1]))
        else:
            sc = qp32[r, 0]
            of = qp32[r, 1]
        if has_weights:
            sc = sc * weights[p]
            of = of * weights[p]
        s_out[i] = sc
        o_out[i] = of
        _prefetch(codes, c * bits // 8)
    return bad


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
    ``word_bits``-bit unsigned words. The row headers of bag b+1 are prefetched while
    bag b is decoded, and a bag's codes are prefetched before they are decoded.
    Returns the number of out-of-range indices (their rows are skipped).
    """
    rows = block_words.shape[0]
    words = block_words.shape[1]
    per_byte = 8 // bits
    shift = 0 if bits == 8 else (1 if bits == 4 else 2)
    code_mask = (1 << bits) - 1
    qp32 = np.empty((0, 2), np.float32) if half else qparam_bits.view(np.float32)
    flat_words = block_words.ravel()
    flat_qparams = qparam_bits.ravel()
    bags = offsets.shape[0] - 1
    max_bag = 0
    for b in range(bags):
        max_bag = max(max_bag, offsets[b + 1] - offsets[b])
    bad = np.zeros(bags, dtype=np.int64)
    for b in numba.prange(bags):
        if b + 1 < bags:  # the next bag's row headers travel while this bag is decoded
            _prefetch_headers(
                indices,
                offsets[b + 1],
                offsets[b + 2],
                rows,
                group_rows,
                words,
                flat_words,
                group_ptr,
                flat_qparams,
            )
        starts = np.empty(max_bag, dtype=np.int64)
        scales = np.empty(max_bag, dtype=np.float32)
        shifts = np.empty(max_bag, dtype=np.float32)
        acc = np.zeros(dim, dtype=np.float32)  # private: the compiler sees no aliasing
        # phase 1 reads every row header of the bag and prefetches its codes (independent
        # loads, so their latencies overlap); phase 2 decodes
        bad[b] = _row_headers(
            indices,
            per_sample_weights,
            has_weights,
            offsets[b],
            offsets[b + 1],
            rows,
            group_rows,
            words,
            width,
            bits,
            half,
            flat_words,
            group_ptr,
            qparam_bits,
            qp32,
            codes,
            starts,
            scales,
            shifts,
        )
        start = offsets[b]
        stop = offsets[b + 1]
        for i in range(stop - start):
            c = starts[i]
            if c < 0:
                continue
            r = indices[start + i]
            s = scales[i]
            o = shifts[i]
            for k in range(words):
                word = int(block_words[r, k])
                while word != 0:
                    blk = k * word_bits + _trailing_zeros(word)
                    word &= word - 1
                    col0 = blk * width
                    if width == 4 and col0 + 4 <= dim and bits != 2:
                        # the common block, four lanes at once
                        if bits == 8:
                            _add_block4_u8(acc, col0, codes, c, s, o)
                        else:
                            _add_block4_u4(acc, col0, codes, c, s, o)
                    else:
                        n = min(width, dim - col0)
                        for j in range(n):
                            pos = c + j
                            if bits == 8:
                                code = codes[pos]
                            else:
                                code = (codes[pos >> shift] >> ((pos & (per_byte - 1)) * bits)) & code_mask
                            acc[col0 + j] += np.float32(code) * s + o
                    c += width
        if mean and stop > start:
            count = np.float32(stop - start)
            for col in range(dim):
                acc[col] /= count
        out[b, :] = acc
    return int(bad.sum())


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
            out[i] = row_rank[r >> 3] + _popcount(byte & ((1 << bit) - 1))
        else:
            out[i] = zero_row
    return bad
