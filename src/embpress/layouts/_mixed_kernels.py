"""Numba bag kernel of the mixed layout (``layouts.mixed``).

A lookup finds its row's class in the packed 2-bit class ids (read as int64 words, 32
rows each), its slot in the class from the rank directory (per-class counts before each
256-row block and, within it, before each 64-row sub-block) plus a popcount of the
sub-block's earlier ids of that class (at most two words), and decodes the
row with its class's codec. Each bag is done in two passes: first every id's class and
payload position, grouped by class (the rank lookups of a bag are independent, so their
cache misses overlap; each row's bytes are prefetched, and the rank entries of ids further
on), then the decode and sum, one decoder call per class into an accumulator per code
width, put back in row order in vector steps (``_merge_bag``). The first pass of the next
bag runs before the second of this one, so its rows arrive while this bag is decoded.

The helpers (popcount, prefetch, unaligned float loads, the vector steps) are defined
here, not imported: numba's disk cache is keyed on the jitted function's own file (see
``layouts._kernels``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from .. import _kernel_cache

__all__ = ["mixed_bag"]

PRUNED, ROWWISE, LEVELS, COLBOOK = 0, 1, 2, 3  # codecs.KINDS' order
_M55 = np.int64(0x5555555555555555)
MAX_BAG_SCRATCH = 256  # ids whose positions are computed ahead, at most, per pass
DIR_AHEAD = 24  # ids ahead (across bags) whose class-id word and rank entries are prefetched
# code width -> accumulator: 8 bits (1 code a byte) 0, 4 bits 1, 2 bits 2, 1 bit 3
_WIDTH_SLOT = np.array([0, 3, 2, 0, 1, 0, 0, 0, 0], dtype=np.int64)


@intrinsic
def _popcount_intrinsic(typingctx: Any, x: Any) -> Any:
    """Set bits of an int64 (one instruction where the CPU has it)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        fn = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)])
        return builder.call(fn, [args[0]])

    return types.int64(types.int64), codegen


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


# called from the kernels only (typed here as such: numba supplies the typing context)
_popcount: Any = _popcount_intrinsic
_prefetch: Any = _prefetch_intrinsic


def _load_intrinsic(kind: str) -> Any:
    """``ary[idx:idx + n]``'s bytes read as one little-endian float16 (``kind`` "f16",
    widened to float32: one conversion instruction where the CPU has F16C) or float32
    ("f32"), at any alignment."""
    width, ir_type = (16, ir.HalfType()) if kind == "f16" else (32, ir.FloatType())

    @intrinsic
    def load(typingctx: Any, ary: Any, idx: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            aryty = signature.args[0]
            arr = context.make_array(aryty)(context, builder, args[0])
            ptr = cgutils.get_item_pointer(context, builder, aryty, arr, [args[1]], wraparound=False)
            raw = builder.load(builder.bitcast(ptr, ir.IntType(width).as_pointer()), align=1)
            value = builder.bitcast(raw, ir_type)
            return builder.fpext(value, ir.FloatType()) if kind == "f16" else value

        return types.float32(ary, types.intp), codegen

    return load


_f16: Any = _load_intrinsic("f16")
_f32: Any = _load_intrinsic("f32")


@numba.njit(cache=True, inline="always")
def _locate(words: np.ndarray, rank: np.ndarray, sub: np.ndarray, r: int) -> tuple[int, int]:
    """(class, slot in the class) of row ``r``, without branches: the block's count, the
    sub-block's, the sub-block's first word when ``r`` is in its second, and the ids below
    ``r`` in its own word."""
    word = words[np.uint64(r >> 5)]
    sh = (r & 31) << 1
    c = (word >> sh) & 3
    pat = c * _M55  # the class id in every 2-bit field
    slot = np.int64(rank[np.uint64(((r >> 8) << 2) + c)]) + np.int64(sub[np.uint64(((r >> 6) << 2) + c)])
    y = words[np.uint64((r >> 6) << 1)] ^ pat
    slot += _popcount(~(y | (y >> 1)) & _M55 & -((r >> 5) & 1))
    y = word ^ pat
    slot += _popcount(~(y | (y >> 1)) & _M55 & ((np.int64(1) << sh) - 1))
    return c, slot


@numba.njit(cache=True, inline="always")
def _split_pos(j: int, dim: int, per: int) -> int:
    """Where value j of a row sits in an accumulator of codes ``per`` a byte: split by the
    code's place in its byte (``t * n + q`` for j = q * per + t, n = dim // per full
    bytes), the values of a last partial byte at their own place."""
    n = dim // per
    if j >= n * per:
        return j
    return (j % per) * n + j // per


# The decoders of one class's rows of a bag, one compiled function per codec and width
# (the width a constant: the loops unroll and vectorise), not inlined into the kernel,
# where LLVM vectorises them worse; called once per class and bag, so the call costs little.
# Each adds the rows at payload bytes ``pos[k0:k0 + cnt]`` (weights ``wts[k0:k0 + cnt]``)
# into ``acc[off:off + dim]`` in the split order of its width (``_split_pos``), reading
# each code byte once for all the codes it holds. They take a run of code bytes of every
# row of the class at a time (16; 64 values for 8- and 4-bit rowwise rows) with the sums
# in vector registers (LLVM IR intrinsics below: numba's own vectorisation keeps ``acc``
# in memory, a load and a store per value and row).


CHUNK = 16  # code bytes a vector step of the adders reads from each row


def _splat(builder: Any, x: Any, lanes: int) -> Any:
    """The float ``x`` in every one of ``lanes`` lanes."""
    vf = ir.VectorType(ir.FloatType(), lanes)
    one = builder.insert_element(ir.Constant(vf, ir.Undefined), x, ir.IntType(32)(0))
    zeros = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
    return builder.shuffle_vector(one, ir.Constant(vf, ir.Undefined), zeros)


class _Emit:
    """IR helpers of the adders' vector steps, for one intrinsic's code generation. Every
    step takes the same first arguments, ``(acc, off, n, payload, pos, scl, k0, cnt, i)``:
    it adds a value per lane to ``acc[off + t * n + i : ... + lanes]`` (split position t)
    for every row k in ``[k0, k0 + cnt)``, whose code bytes start at ``pos[k] + i`` and
    whose scale or weight is ``scl[k]``."""

    def __init__(self, context: Any, builder: Any, lanes: int, types_: Any, args: Any) -> None:
        self.context, self.builder, self.lanes = context, builder, lanes
        self.i32 = ir.IntType(32)
        self.vi32 = ir.VectorType(self.i32, lanes)
        self.vf = ir.VectorType(ir.FloatType(), lanes)
        accty, _, _, payty, posty, sclty, _, _, _ = types_
        acc, self.off, self.n, pay, pos, scl, self.k0, self.cnt, self.i = args
        self.acc_at, self.pay_at = self.items(accty, acc), self.items(payty, pay)
        self.pos_at, self.scl_at = self.items(posty, pos), self.items(sclty, scl)

    @staticmethod
    def signature(acc: Any, payload: Any, pos: Any, scl: Any, *more: Any) -> Any:
        """A step's numba signature: the common first arguments, then ``more``."""
        intp = types.intp
        return types.void(acc, intp, intp, payload, pos, scl, intp, intp, intp, *more)

    def items(self, aryty: Any, value: Any) -> Any:
        """``index -> pointer to ary[index]`` for the numba array ``value`` of type ``aryty``."""
        arr = self.context.make_array(aryty)(self.context, self.builder, value)
        return lambda index: cgutils.get_item_pointer(
            self.context, self.builder, aryty, arr, [index], wraparound=False
        )

    def floats(self, ptr: Any) -> Any:
        """``ptr`` (to a float32 item) as a pointer to ``lanes`` floats."""
        return self.builder.bitcast(ptr, self.vf.as_pointer())

    def split(self, t: int) -> Any:
        """Where split position t of this step starts in a row: ``t * n + i``."""
        return self.builder.add(self.builder.mul(self.n, self.n.type(t)), self.i)

    def splat(self, x: Any) -> Any:
        return _splat(self.builder, x, self.lanes)

    def consts(self, value: int) -> Any:
        return ir.Constant(self.vi32, [value] * self.lanes)

    def code(self, codes: Any, t: int, bits: int) -> Any:
        """The t-th ``bits``-bit code of each byte lane (its bits above ``bits`` left set
        where ``bits`` is 8 or the code is the byte's top one)."""
        if t:
            codes = self.builder.lshr(codes, self.consts(t * bits))
        if (t + 1) * bits < 8:
            codes = self.builder.and_(codes, self.consts((1 << bits) - 1))
        return codes

    def pick(self, code: Any, candidates: list[Any], bits: int) -> Any:
        """Per lane, ``candidates[code]``: a tree of selects on the code's ``bits`` bits."""
        for b in range(bits):
            on = self.builder.icmp_unsigned(
                "!=", self.builder.and_(code, self.consts(1 << b)), self.consts(0)
            )
            candidates = [
                self.builder.select(on, candidates[m + 1], candidates[m])
                for m in range(0, len(candidates), 2)
            ]
        return candidates[0]

    def add_rows(self, ts: Sequence[int], values: Callable[[Any, Any, Any], list[Any]]) -> None:
        """For every row in order, ``values(at, w, codes)`` (one vector per split position
        of ``ts``; ``at`` = ``pos[k]``, ``w`` = ``scl[k]``, ``codes``: the row's ``lanes``
        code bytes from ``i`` as int32 lanes) added to those accumulator slices, which are
        held in registers: loaded once before the rows and stored once after."""
        builder = self.builder
        slices = [self.floats(self.acc_at(builder.add(self.off, self.split(t)))) for t in ts]
        sums = [cgutils.alloca_once_value(builder, builder.load(p, align=4)) for p in slices]
        vi8 = ir.VectorType(ir.IntType(8), self.lanes)
        with cgutils.for_range(builder, self.cnt) as loop:
            k = builder.add(self.k0, loop.index)
            at = builder.load(self.pos_at(k))
            raw = builder.bitcast(self.pay_at(builder.add(at, self.i)), vi8.as_pointer())
            codes = builder.zext(builder.load(raw, align=1), self.vi32)
            for total, value in zip(sums, values(at, builder.load(self.scl_at(k)), codes), strict=True):
                builder.store(builder.fadd(builder.load(total), value), total)
        for total, ptr in zip(sums, slices, strict=True):
            builder.store(builder.load(total), ptr, align=4)


def _row_chunk_intrinsic(bits: int, levels: bool, width: int = CHUNK) -> Any:
    """``acc[off + t * n + i + l] += value(k, code(t, l))`` for every row k in ``[k0, k0 +
    cnt)`` (payload bytes from ``pos[k]``), every ``t < 8 // bits`` and lane ``l <
    width``, where code(t, l) is the t-th ``bits``-bit code of the row's byte ``i + l``:
    ``width`` code bytes of each row added in vector registers (``_Emit.add_rows``).
    Rowwise rows (``levels`` False): value = ``float32(code) * scl[k]``. Levels rows:
    value = the row's float16 level ``code`` (at payload byte ``pos[k] + pa + 2 * code``)
    times ``scl[k]``, picked by a tree of vector selects. Each accumulator slice is loaded
    once, takes the rows in order and is stored once, so every lane does the float
    operations of the scalar loops of ``_rowwise_adder`` / ``_levels_adder`` in their
    order (``scl`` is 1.0 for unweighted levels rows, and ``x * 1.0 == x``)."""
    per = 8 // bits

    @intrinsic
    def add_chunk(
        typingctx: Any,
        acc: Any,
        off: Any,
        n: Any,
        payload: Any,
        pos: Any,
        scl: Any,
        k0: Any,
        cnt: Any,
        i: Any,
        pa: Any,
    ) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            e = _Emit(context, builder, width, signature.args[:9], args[:9])
            pa = args[9]

            def values(at: Any, w: Any, codes: Any) -> list[Any]:
                if not levels:
                    s = e.splat(w)
                    return [builder.fmul(builder.sitofp(e.code(codes, t, bits), e.vf), s) for t in range(per)]
                q = builder.add(at, pa)
                lev = []
                for v in range(1 << bits):
                    ptr = builder.bitcast(
                        e.pay_at(builder.add(q, q.type(2 * v))), ir.IntType(16).as_pointer()
                    )
                    half = builder.bitcast(builder.load(ptr, align=1), ir.HalfType())
                    lev.append(e.splat(builder.fmul(builder.fpext(half, ir.FloatType()), w)))
                return [e.pick(e.code(codes, t, bits), lev, bits) for t in range(per)]

            e.add_rows(range(per), values)
            return context.get_dummy_value()

        return _Emit.signature(acc, payload, pos, scl, types.intp), codegen

    return add_chunk


_CHUNK8: Any = _row_chunk_intrinsic(8, False)
_CHUNK4: Any = _row_chunk_intrinsic(4, False)
_CHUNK2: Any = _row_chunk_intrinsic(2, False)
# wider steps (64 values of a row per step: fewer loads of each row's position and scale)
_WIDE8: Any = _row_chunk_intrinsic(8, False, 64)
_WIDE4: Any = _row_chunk_intrinsic(4, False, 32)
_LEVCHUNK2: Any = _row_chunk_intrinsic(2, True)
_LEVCHUNK1: Any = _row_chunk_intrinsic(1, True)

MERGE_STEP = 16  # split positions per code of a vector step of the bag merge


def _merge_intrinsic(per: int) -> Any:
    """``row[q * per + t] += acc[a + t * n + q] + o`` for ``q`` in ``[q0, q0 + MERGE_STEP)``
    and every ``t < per``: a bag's accumulator of codes ``per`` a byte put back in row
    order (``_split_pos``'s inverse), ``MERGE_STEP * per`` values in vector registers: a
    load per split position, one shuffle that interleaves them, one add into the row.
    Each value takes the float operations of the scalar loop, in its order."""
    step = MERGE_STEP

    @intrinsic
    def merge(typingctx: Any, row: Any, acc: Any, a: Any, n: Any, o: Any, q0: Any) -> Any:
        if row.layout != "C" or acc.layout != "C":
            return None  # the vector loads and stores assume contiguous values: no typing

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            rowty, accty = signature.args[0], signature.args[1]
            row_arr = context.make_array(rowty)(context, builder, args[0])
            acc_arr = context.make_array(accty)(context, builder, args[1])
            a_, n_, o_, q0_ = args[2], args[3], args[4], args[5]
            vf = ir.VectorType(ir.FloatType(), step)
            i32 = ir.IntType(32)
            splat = _splat(builder, o_, step)
            pieces = []
            for t in range(per):
                at = builder.add(builder.add(a_, builder.mul(n_, n_.type(t))), q0_)
                ptr = cgutils.get_item_pointer(context, builder, accty, acc_arr, [at], wraparound=False)
                v = builder.load(builder.bitcast(ptr, vf.as_pointer()), align=4)
                pieces.append(builder.fadd(v, splat))
            whole = _concat(builder, pieces)  # split position t's values at t * step + q
            width = step * per
            order = [t * step + q for q in range(step) for t in range(per)]
            interleaved = builder.shuffle_vector(
                whole, ir.Constant(whole.type, ir.Undefined), ir.Constant(ir.VectorType(i32, width), order)
            )
            start = builder.mul(q0_, q0_.type(per))
            ptr = cgutils.get_item_pointer(context, builder, rowty, row_arr, [start], wraparound=False)
            wide = builder.bitcast(ptr, ir.VectorType(ir.FloatType(), width).as_pointer())
            builder.store(builder.fadd(builder.load(wide, align=4), interleaved), wide, align=4)
            return context.get_dummy_value()

        return types.void(row, acc, types.intp, types.intp, types.float32, types.intp), codegen

    return merge


def _concat(builder: Any, pieces: list[Any]) -> Any:
    """The vectors ``pieces`` (a power of two of them, one type) end to end."""
    while len(pieces) > 1:
        count = pieces[0].type.count
        mask = ir.Constant(ir.VectorType(ir.IntType(32), 2 * count), list(range(2 * count)))
        pieces = [builder.shuffle_vector(x, y, mask) for x, y in zip(pieces[0::2], pieces[1::2], strict=True)]
    return pieces[0]


_MERGE1: Any = _merge_intrinsic(1)
_MERGE2: Any = _merge_intrinsic(2)
_MERGE4: Any = _merge_intrinsic(4)
_MERGE8: Any = _merge_intrinsic(8)


def _rowwise_adder(bits: int) -> Any:
    per = 8 // bits
    mask = (1 << bits) - 1
    chunk = _CHUNK8 if bits == 8 else _CHUNK4 if bits == 4 else _CHUNK2
    wide = _WIDE8 if bits == 8 else _WIDE4 if bits == 4 else _CHUNK2
    step = 64 // per

    @numba.njit(cache=True, inline="never", boundscheck=False)
    def add(
        acc: np.ndarray,
        off: int,
        payload: np.ndarray,
        pos: np.ndarray,
        k0: int,
        cnt: int,
        wts: np.ndarray,
        weighted: bool,
        dim: int,
        pa: int,
        half: bool,
        scl: np.ndarray,
    ) -> Any:
        """``+= code * s``; returns the rows' summed offsets ``o`` (every value of a row
        has the same one: the caller adds the sum once). The rows' scales (weighted) go to
        ``scl[k0:k0 + cnt]``; the codes are added 64 values (then ``CHUNK`` bytes) of every
        row at a time in registers (``_row_chunk_intrinsic``), a last partial chunk
        value by value."""
        n = dim // per
        o_sum = np.float32(0.0)
        for k in range(k0, k0 + cnt):
            q = pos[k] + pa
            if half:
                s = _f16(payload, q)
                o = _f16(payload, q + 2)
            else:
                s = _f32(payload, q)
                o = _f32(payload, q + 4)
            if weighted:
                s = s * wts[k]
                o = o * wts[k]
            scl[k] = s
            o_sum += o
        wide_end = n - n % step
        for i in range(0, wide_end, step):
            wide(acc, off, n, payload, pos, scl, k0, cnt, i, pa)
        full = n - n % CHUNK
        for i in range(wide_end, full, CHUNK):
            chunk(acc, off, n, payload, pos, scl, k0, cnt, i, pa)
        if full == n and n * per == dim:
            return o_sum
        for k in range(k0, k0 + cnt):
            s = scl[k]
            a = np.uint64(pos[k])
            base = np.uint64(off)
            for i in range(full, n):
                byte = np.int32(payload[a + np.uint64(i)])
                for t in range(per):
                    code = (byte >> np.int32(t * bits)) & np.int32(mask)
                    acc[base + np.uint64(t * n + i)] += np.float32(code) * s
            for j in range(n * per, dim):
                code = (np.int32(payload[a + np.uint64(j // per)]) >> ((j % per) * bits)) & mask
                acc[np.uint64(off + j)] += np.float32(code) * s
        return o_sum

    return add


def _levels_adder(bits: int) -> Any:
    per = 8 // bits
    mask = (1 << bits) - 1
    four = bits == 2
    chunk = _LEVCHUNK2 if bits == 2 else _LEVCHUNK1

    @numba.njit(cache=True, inline="never", boundscheck=False)
    def add(
        acc: np.ndarray,
        off: int,
        payload: np.ndarray,
        pos: np.ndarray,
        k0: int,
        cnt: int,
        wts: np.ndarray,
        weighted: bool,
        dim: int,
        pa: int,
        scl: np.ndarray,
    ) -> None:
        """``+= lev[code]`` (2**bits <= 4 float16 levels after the codes), ``CHUNK`` code
        bytes of every row at a time in registers (``_row_chunk_intrinsic``; the rows'
        weights go to ``scl[k0:k0 + cnt]``), a last partial chunk value by value."""
        n = dim // per
        for k in range(k0, k0 + cnt):
            scl[k] = wts[k] if weighted else np.float32(1.0)
        full = n - n % CHUNK
        for i in range(0, full, CHUNK):
            chunk(acc, off, n, payload, pos, scl, k0, cnt, i, pa)
        if full == n and n * per == dim:
            return
        for k in range(k0, k0 + cnt):
            at = pos[k]
            q = at + pa
            w = scl[k]
            l0 = _f16(payload, q)
            l1 = _f16(payload, q + 2)
            l2 = _f16(payload, q + 4) if four else np.float32(0.0)
            l3 = _f16(payload, q + 6) if four else np.float32(0.0)
            if weighted:
                l0 = l0 * w
                l1 = l1 * w
                l2 = l2 * w
                l3 = l3 * w
            a = np.uint64(at)
            base = np.uint64(off)
            for i in range(full, n):
                byte = np.int32(payload[a + np.uint64(i)])
                for t in range(per):
                    code = (byte >> np.int32(t * bits)) & np.int32(mask)
                    low = l1 if code & 1 else l0
                    high = l3 if code & 1 else l2
                    acc[base + np.uint64(t * n + i)] += high if code & 2 else low
            for j in range(n * per, dim):
                code = (np.int32(payload[a + np.uint64(j // per)]) >> ((j % per) * bits)) & mask
                low = l1 if code & 1 else l0
                high = l3 if code & 1 else l2
                acc[np.uint64(off + j)] += high if code & 2 else low

    return add


def _book_chunk_intrinsic(bits: int) -> Any:
    """``acc[off + t * n + i + l] += book(t, l, code(t, l)) * scl[k]`` for every row k in
    ``[k0, k0 + cnt)`` (payload bytes from ``pos[k]``), every ``t < 8 // bits`` and lane
    ``l < CHUNK``: code(t, l) is the t-th ``bits``-bit code of the row's byte ``i + l``
    and book(t, l, v) = ``sb[bb + v * dim + t * n + i + l]``, level v of that split
    position. The levels of a chunk are loaded once for all the rows and each code picks
    its level by a tree of vector selects on its bits (no gather); as in
    ``_row_chunk_intrinsic`` (``_Emit.add_rows``) each accumulator slice takes the rows
    in order, so every lane computes what a scalar ``acc[p] += sb[...] * w`` loop
    computes. Split positions are taken a few at a time, so the levels held stay within
    16 vectors."""
    per = 8 // bits
    levels = 1 << bits
    group = max(1, min(per, 16 // levels))  # split positions per pass over the rows

    @intrinsic
    def add_chunk(
        typingctx: Any,
        acc: Any,
        off: Any,
        n: Any,
        payload: Any,
        pos: Any,
        scl: Any,
        k0: Any,
        cnt: Any,
        i: Any,
        sb: Any,
        bb: Any,
        dim: Any,
    ) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            e = _Emit(context, builder, CHUNK, signature.args[:9], args[:9])
            sb_at = e.items(signature.args[9], args[9])
            bb, dim = args[10], args[11]
            for t0 in range(0, per, group):
                ts = range(t0, min(per, t0 + group))
                book = [  # the chunk's levels of each split position, for all the rows
                    [
                        builder.load(
                            e.floats(
                                sb_at(builder.add(builder.add(bb, builder.mul(dim, dim.type(v))), e.split(t)))
                            ),
                            align=4,
                        )
                        for v in range(levels)
                    ]
                    for t in ts
                ]

                def values(
                    at: Any, w: Any, codes: Any, ts: range = ts, book: list[list[Any]] = book
                ) -> list[Any]:
                    ws = e.splat(w)
                    return [
                        builder.fmul(e.pick(e.code(codes, t, bits), book[g], bits), ws)
                        for g, t in enumerate(ts)
                    ]

                e.add_rows(ts, values)
            return context.get_dummy_value()

        return _Emit.signature(acc, payload, pos, scl, sb, types.intp, types.intp), codegen

    return add_chunk


_BOOK4: Any = _book_chunk_intrinsic(4)
_BOOK2: Any = _book_chunk_intrinsic(2)
_BOOK1: Any = _book_chunk_intrinsic(1)


def _colbook_adder(bits: int) -> Any:
    per = 8 // bits
    mask = (1 << bits) - 1
    chunk = _BOOK4 if bits == 4 else _BOOK2 if bits == 2 else _BOOK1

    @numba.njit(cache=True, inline="never", boundscheck=False)
    def add(
        acc: np.ndarray,
        off: int,
        payload: np.ndarray,
        pos: np.ndarray,
        k0: int,
        cnt: int,
        wts: np.ndarray,
        weighted: bool,
        dim: int,
        sb: np.ndarray,
        bb: int,
        scl: np.ndarray,
    ) -> None:
        """``+= w * book[code]``; ``sb[bb + level * dim + p]``: the book's level for split
        position p. ``CHUNK`` code bytes of every row at a time in registers
        (``_book_chunk_intrinsic``; the rows' weights go to ``scl[k0:k0 + cnt]``), a last
        partial chunk value by value."""
        n = dim // per
        for k in range(k0, k0 + cnt):
            scl[k] = wts[k] if weighted else np.float32(1.0)
        full = n - n % CHUNK
        for i in range(0, full, CHUNK):
            chunk(acc, off, n, payload, pos, scl, k0, cnt, i, sb, bb, dim)
        if full == n and n * per == dim:
            return
        d = np.uint64(dim)
        b0 = np.uint64(bb)
        for k in range(k0, k0 + cnt):
            w = scl[k]
            a = np.uint64(pos[k])
            into = np.uint64(off)
            for i in range(full, n):
                byte = np.int32(payload[a + np.uint64(i)])
                for t in range(per):
                    code = (byte >> np.int32(t * bits)) & np.int32(mask)
                    p = np.uint64(t * n + i)
                    acc[into + p] += sb[b0 + np.uint64(code) * d + p] * w
            for j in range(n * per, dim):
                tail = (np.int32(payload[a + np.uint64(j // per)]) >> ((j % per) * bits)) & mask
                acc[np.uint64(off + j)] += sb[np.uint64(bb + tail * dim + j)] * w

    return add


_ROWWISE8, _ROWWISE4, _ROWWISE2 = (_rowwise_adder(b) for b in (8, 4, 2))
_LEVELS2, _LEVELS1 = (_levels_adder(b) for b in (2, 1))
_COLBOOK4, _COLBOOK2, _COLBOOK1 = (_colbook_adder(b) for b in (4, 2, 1))


@numba.njit(cache=True, inline="always", boundscheck=False)
def _add_class(
    acc: np.ndarray,
    o_sum: np.ndarray,
    payload: np.ndarray,
    sb: np.ndarray,
    pos: np.ndarray,
    k0: int,
    cnt: int,
    wts: np.ndarray,
    scl: np.ndarray,
    weighted: bool,
    kind: int,
    nb: int,
    pa: int,
    bb: int,
    half: bool,
    dim: int,
) -> None:
    """Add a bag's ``cnt`` rows of one class (codec ``kind``, ``nb`` bits) into the
    accumulator of its width; a rowwise class's offsets go to ``o_sum`` of that width."""
    u = _WIDTH_SLOT[nb]
    a = u * dim
    if kind == ROWWISE:
        if nb == 8:
            o_sum[u] += _ROWWISE8(acc, a, payload, pos, k0, cnt, wts, weighted, dim, pa, half, scl)
        elif nb == 4:
            o_sum[u] += _ROWWISE4(acc, a, payload, pos, k0, cnt, wts, weighted, dim, pa, half, scl)
        else:
            o_sum[u] += _ROWWISE2(acc, a, payload, pos, k0, cnt, wts, weighted, dim, pa, half, scl)
    elif kind == LEVELS:
        if nb == 2:
            _LEVELS2(acc, a, payload, pos, k0, cnt, wts, weighted, dim, pa, scl)
        else:
            _LEVELS1(acc, a, payload, pos, k0, cnt, wts, weighted, dim, pa, scl)
    elif nb == 4:
        _COLBOOK4(acc, a, payload, pos, k0, cnt, wts, weighted, dim, sb, bb, scl)
    elif nb == 2:
        _COLBOOK2(acc, a, payload, pos, k0, cnt, wts, weighted, dim, sb, bb, scl)
    else:
        _COLBOOK1(acc, a, payload, pos, k0, cnt, wts, weighted, dim, sb, bb, scl)


@numba.njit(cache=True, inline="always", boundscheck=False)
def _gather(
    words: np.ndarray,
    rank: np.ndarray,
    sub: np.ndarray,
    payload: np.ndarray,
    kinds: np.ndarray,
    base: np.ndarray,
    row_bytes: np.ndarray,
    indices: np.ndarray,
    weights: np.ndarray,
    weighted: bool,
    lo: int,
    hi: int,
    pf_end: int,
    pos: np.ndarray,
    wts: np.ndarray,
    cnt: np.ndarray,
    s0: int,
) -> None:
    """Pass 1 over ids ``[lo, hi)`` (at most ``MAX_BAG_SCRATCH``): the payload position and
    weight of each kept id, by class, into set ``s0`` (0 or 4) of ``pos`` / ``wts`` /
    ``cnt``; each row is prefetched, and the rank entries of the id ``DIR_AHEAD`` on. The
    counts are kept in one register while the ids are read (16 bits a class), so no id
    waits for the previous one's count to go through memory."""
    counts = np.uint64(0)
    scratch = np.uint64(MAX_BAG_SCRATCH)
    first = np.uint64(s0)
    for p in range(np.uint64(lo), np.uint64(hi)):
        if p + np.uint64(DIR_AHEAD) < np.uint64(pf_end):
            r_ahead = indices[p + np.uint64(DIR_AHEAD)]
            _prefetch(words, r_ahead >> 5)
            _prefetch(rank, (r_ahead >> 8) << 2)
            _prefetch(sub, (r_ahead >> 6) << 2)
        c, slot = _locate(words, rank, sub, indices[p])
        uc = np.uint64(c)
        if kinds[uc] == PRUNED:
            continue
        at = base[uc] + slot * row_bytes[uc]
        field = uc << np.uint64(4)
        k = (first + uc) * scratch + ((counts >> field) & np.uint64(0xFFFF))
        counts += np.uint64(1) << field
        pos[k] = at
        if weighted:
            wts[k] = weights[p]
        # every cache line the row touches: its first and last byte and every 64th between
        # (a fixed four for rows up to 192 bytes, so no branch depends on the row's alignment)
        last = at + row_bytes[uc] - 1
        _prefetch(payload, at)
        _prefetch(payload, min(at + 64, last))
        _prefetch(payload, min(at + 128, last))
        _prefetch(payload, last)
        for line in range(at + 192, last, 64):
            _prefetch(payload, line)
    for c in range(4):
        cnt[s0 + c] = np.int64((counts >> np.uint64(16 * c)) & np.uint64(0xFFFF))


@numba.njit(cache=True, inline="always", boundscheck=False)
def _add_set(
    acc: np.ndarray,
    o_sum: np.ndarray,
    payload: np.ndarray,
    sb: np.ndarray,
    pos: np.ndarray,
    wts: np.ndarray,
    scl: np.ndarray,
    cnt: np.ndarray,
    s0: int,
    weighted: bool,
    kinds: np.ndarray,
    bits: np.ndarray,
    param_at: np.ndarray,
    book_base: np.ndarray,
    half: bool,
    dim: int,
) -> None:
    """Pass 2: add the rows of set ``s0`` (``_gather``), a class at a time."""
    for c in range(4):
        if cnt[s0 + c]:
            _add_class(
                acc,
                o_sum,
                payload,
                sb,
                pos,
                (s0 + c) * MAX_BAG_SCRATCH,
                cnt[s0 + c],
                wts,
                scl,
                weighted,
                kinds[c],
                bits[c],
                param_at[c],
                book_base[c],
                half,
                dim,
            )


@numba.njit(cache=True, inline="always", boundscheck=False)
def _merge_bag(row: np.ndarray, acc: np.ndarray, o_sum: np.ndarray, used: np.ndarray, dim: int) -> None:
    """``row += `` each used width's accumulator in row order, plus its summed offsets:
    ``MERGE_STEP`` split positions at a time in vector registers (``_merge_intrinsic``),
    the rest value by value, the same float operations either way."""
    for u in range(4):
        if not used[u]:
            continue
        per = 1 << u
        n = dim // per
        o = o_sum[u]
        a = u * dim
        q_end = n - n % MERGE_STEP
        for q0 in range(0, q_end, MERGE_STEP):
            if u == 0:
                _MERGE1(row, acc, a, n, o, q0)
            elif u == 1:
                _MERGE2(row, acc, a, n, o, q0)
            elif u == 2:
                _MERGE4(row, acc, a, n, o, q0)
            else:
                _MERGE8(row, acc, a, n, o, q0)
        for t in range(per):
            for q in range(q_end, n):
                row[np.uint64(q * per + t)] += acc[np.uint64(a + t * n + q)] + o
        for j in range(n * per, dim):
            row[np.uint64(j)] += acc[np.uint64(a + j)] + o


@numba.njit(cache=True, parallel=True, nogil=True, boundscheck=False)
def mixed_bag(
    words: np.ndarray,
    rank: np.ndarray,
    sub: np.ndarray,
    payload: np.ndarray,
    books: np.ndarray,
    kinds: np.ndarray,
    bits: np.ndarray,
    base: np.ndarray,
    row_bytes: np.ndarray,
    param_at: np.ndarray,
    book_base: np.ndarray,
    half: bool,
    rows: int,
    dim: int,
    indices: np.ndarray,
    offsets: np.ndarray,
    weights: np.ndarray,
    weighted: bool,
    mean: bool,
    threads: int,
    out: np.ndarray,
) -> int:
    """``out[b]`` = sum / mean over bag b of its decoded rows (pruned rows add 0).

    The table (``layouts.mixed``): ``words``, the class ids as int64 words; ``rank``, the
    flattened rank directory and its sub-block counts; ``payload`` and ``books``; per class: kind, bits, first
    payload byte, bytes per row, where its parameters start in a row, first book value.
    ``half``: rowwise scales are float16 (else float32). The lookups are
    ``lookup.Bags``' fields, from ``indices`` to ``mean``. Each thread takes a contiguous
    run of bags; its ids are checked first. A bag's ids are sorted by class (their payload
    positions and weights, rows prefetched), then each class's rows are added by its
    codec's decoder in one call. A bag is summed in one accumulator per code width, each
    in the split order of its width (``_split_pos``: the decode loops then read and write
    contiguously, which vectorises), put back in order once per bag (``_merge_bag``) with the width's
    summed rowwise offsets. Returns the number of out-of-range ids (then nothing is
    computed: the caller raises).
    """
    bags = offsets.shape[0] - 1
    runs = max(1, min(bags, threads))
    per_run = -(-bags // runs)
    bad = np.zeros(runs, dtype=np.int64)
    for run in numba.prange(runs):
        b0 = run * per_run
        b1 = min(bags, b0 + per_run)
        if b0 >= b1:
            continue
        n_bad = 0
        for p in range(offsets[b0], offsets[b1]):
            if indices[p] < 0 or indices[p] >= rows:
                n_bad += 1
        bad[run] = n_bad
        if n_bad:
            continue
        # which accumulators (by code width: 8, 4, 2, 1 bits) the classes use, and the
        # colbooks' levels in split order
        used = np.zeros(4, dtype=np.bool_)
        sb = np.empty(books.shape[0], dtype=np.float32)
        for c in range(4):
            if kinds[c] == PRUNED:
                continue
            used[_WIDTH_SLOT[bits[c]]] = True
            if kinds[c] == COLBOOK:
                k = 1 << bits[c]
                per = 8 // bits[c]
                for j in range(dim):
                    p_ = _split_pos(j, dim, per)
                    for t in range(k):
                        sb[book_base[c] + t * dim + p_] = books[book_base[c] + j * k + t]
        # per class: payload positions and weights of the chunk's ids of that class
        # (two sets: the bag being decoded and the next one)
        pos = np.empty(8 * MAX_BAG_SCRATCH, dtype=np.int64)
        wts = np.ones(8 * MAX_BAG_SCRATCH, dtype=np.float32)
        scl = np.empty(8 * MAX_BAG_SCRATCH, dtype=np.float32)  # rowwise rows' scales
        cnt = np.zeros(8, dtype=np.int64)
        ready = False  # whether set (b & 1) holds bag b already
        acc = np.zeros(4 * dim, dtype=np.float32)  # one accumulator per code width
        o_sum = np.zeros(4, dtype=np.float32)  # summed rowwise offsets per code width
        pf_end = offsets[b1]
        for b in range(b0, b1):
            for u in range(4):
                o_sum[u] = 0.0
                if used[u]:
                    acc[u * dim : (u + 1) * dim] = 0.0
            lo = offsets[b]
            hi = offsets[b + 1]
            cur = b & 1
            if hi - lo <= MAX_BAG_SCRATCH:
                if not ready:
                    _gather(
                        words,
                        rank,
                        sub,
                        payload,
                        kinds,
                        base,
                        row_bytes,
                        indices,
                        weights,
                        weighted,
                        lo,
                        hi,
                        pf_end,
                        pos,
                        wts,
                        cnt,
                        4 * cur,
                    )
                # the next bag's rows are located and prefetched before this one is decoded
                ready = b + 1 < b1 and offsets[b + 2] - hi <= MAX_BAG_SCRATCH
                if ready:
                    _gather(
                        words,
                        rank,
                        sub,
                        payload,
                        kinds,
                        base,
                        row_bytes,
                        indices,
                        weights,
                        weighted,
                        hi,
                        offsets[b + 2],
                        pf_end,
                        pos,
                        wts,
                        cnt,
                        4 - 4 * cur,
                    )
                _add_set(
                    acc,
                    o_sum,
                    payload,
                    sb,
                    pos,
                    wts,
                    scl,
                    cnt,
                    4 * cur,
                    weighted,
                    kinds,
                    bits,
                    param_at,
                    book_base,
                    half,
                    dim,
                )
            else:
                for c_lo in range(lo, hi, MAX_BAG_SCRATCH):
                    c_hi = min(c_lo + MAX_BAG_SCRATCH, hi)
                    _gather(
                        words,
                        rank,
                        sub,
                        payload,
                        kinds,
                        base,
                        row_bytes,
                        indices,
                        weights,
                        weighted,
                        c_lo,
                        c_hi,
                        pf_end,
                        pos,
                        wts,
                        cnt,
                        4 * cur,
                    )
                    _add_set(
                        acc,
                        o_sum,
                        payload,
                        sb,
                        pos,
                        wts,
                        scl,
                        cnt,
                        4 * cur,
                        weighted,
                        kinds,
                        bits,
                        param_at,
                        book_base,
                        half,
                        dim,
                    )
            row = out[b]
            row[:] = 0.0
            _merge_bag(row, acc, o_sum, used, dim)
            if mean and offsets[b + 1] > offsets[b]:
                cnt_b = np.float32(offsets[b + 1] - offsets[b])
                for j in range(dim):
                    row[j] /= cnt_b
    return int(bad.sum())


# several processes may compile into one disk cache at once (see ``_kernel_cache``)
_kernel_cache.guard_module(globals())
