"""Numba bag kernel of the mixed layout (``layouts.mixed``).

A lookup finds its row's class in the packed 2-bit class ids (read as int64 words, 32
rows each), its slot in the class from the rank directory (per-class counts before each
256-row block and, within it, before each 64-row sub-block) plus a popcount of the
sub-block's earlier ids of that class (at most two words), and decodes the row with its
class's codec. A thread's bags are summed in one walk over their ids (``_walk_intrinsic``,
LLVM IR): each id is located a fixed number of ids before it is added, so its row is
prefetched by then (and what its locate reads, further ahead still), and each row is
decoded by a switch on its class straight into the bag's sums, held in vector registers
(up to 128 values of a row per walk).

The helpers (the row's location, unaligned float loads, the IR of the walk) are defined here, not
imported: numba's disk cache is keyed on the jitted function's own file (see
``layouts._kernels``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from .. import _kernel_cache

__all__ = ["mixed_bag", "mixed_run"]

PRUNED, ROWWISE, LEVELS, COLBOOK = 0, 1, 2, 3  # codecs.KINDS' order
_M55 = 0x5555555555555555  # 01 in every 2-bit field
AHEAD = 32  # ids ahead (across bags) that a walk locates and whose rows it prefetches
GATHER_BITS = 4  # column books this wide are read by a gather (a select tree takes 15 selects)
# (``layouts.mixed.GATHER_BITS`` is the same number: it decides which books it transposes)
RING = 64  # located ids a walk holds (a power of two, above AHEAD)
META_AHEAD = 64  # ids ahead whose class-id word and rank-directory entries a walk prefetches


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


@intrinsic
def _fma_intrinsic(typingctx: Any, x: Any, y: Any, z: Any) -> Any:
    """``x * y + z`` in float32 with one rounding (``llvm.fma``): a rowwise lane's step."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        f32 = ir.FloatType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32] * 3), "llvm.fma.f32")
        return builder.call(fn, list(args))

    return types.float32(types.float32, types.float32, types.float32), codegen


# called from the kernels only (typed here as such: numba supplies the typing context)
_fma: Any = _fma_intrinsic


def _emit_locate(builder: Any, words: Any, rank: Any, sub: Any, r: Any) -> tuple[Any, Any]:
    """IR of (class, slot in its class) of row ``r`` (int64 values) from pointers to the
    class-id words (int64), the rank directory's block counts (int32) and its sub-block
    counts (uint8), without branches: the block's count, the sub-block's, the ids of the
    class in the sub-block's first word when ``r`` is in its second, and those below ``r``
    in its own word."""
    b = builder
    i64 = ir.IntType(64)

    def k(value: int) -> Any:
        return ir.Constant(i64, value)

    def item(ptr: Any, index: Any) -> Any:
        return b.load(b.gep(ptr, [index]))

    def popcount(x: Any) -> Any:
        return b.call(b.module.declare_intrinsic("llvm.ctpop", [i64]), [x])

    def same(y: Any) -> Any:  # the 2-bit fields of y that are 0 (class c's rows), as their low bits
        return b.and_(b.not_(b.or_(y, b.lshr(y, k(1)))), k(_M55))

    word = item(words, b.lshr(r, k(5)))
    sh = b.shl(b.and_(r, k(31)), k(1))
    c = b.and_(b.lshr(word, sh), k(3))
    pat = b.mul(c, k(_M55))  # the class id in every 2-bit field
    block_rank = b.sext(item(rank, b.add(b.shl(b.lshr(r, k(8)), k(2)), c)), i64)
    sub_rank = b.zext(item(sub, b.add(b.shl(b.lshr(r, k(6)), k(2)), c)), i64)
    first = b.xor(item(words, b.shl(b.lshr(r, k(6)), k(1))), pat)
    in_second = b.sub(k(0), b.and_(b.lshr(r, k(5)), k(1)))
    below = b.sub(b.shl(k(1), sh), k(1))
    slot = b.add(b.add(block_rank, sub_rank), popcount(b.and_(same(first), in_second)))
    return c, b.add(slot, popcount(b.and_(same(b.xor(word, pat)), below)))


@intrinsic
def _locate_intrinsic(typingctx: Any, words: Any, rank: Any, sub: Any, r: Any) -> Any:
    """(class, slot in the class) of row ``r`` (``_emit_locate``), for numba code."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ptrs = [
            context.make_array(ty)(context, builder, v).data
            for ty, v in zip(signature.args[:3], args[:3], strict=True)
        ]
        words, rank, sub = ptrs
        c, slot = _emit_locate(builder, words, rank, sub, args[3])
        return context.make_tuple(builder, signature.return_type, [c, slot])

    return types.UniTuple(types.int64, 2)(words, rank, sub, types.int64), codegen


# called from the kernels only (typed here as such: numba supplies the typing context)
_locate: Any = _locate_intrinsic


VARIANTS = (  # quant.codecs.CODECS' order, pruned left out: MixedKernelTable.variant indexes it
    (ROWWISE, 8),
    (ROWWISE, 4),
    (ROWWISE, 2),
    (LEVELS, 2),
    (LEVELS, 1),
    (COLBOOK, 4),
    (COLBOOK, 2),
    (COLBOOK, 1),
)
WIDTHS = (128, 64, 16)  # values of a row a walk adds at a time: the widest that fits what is left
STEP = WIDTHS[-1]  # the last dim % STEP values are added in scalar code (``_add_tail``)


def _splat(builder: Any, x: Any, lanes: int) -> Any:
    """The scalar ``x`` in every one of ``lanes`` lanes."""
    vx = ir.VectorType(x.type, lanes)
    one = builder.insert_element(ir.Constant(vx, ir.Undefined), x, ir.IntType(32)(0))
    zeros = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
    return builder.shuffle_vector(one, ir.Constant(vx, ir.Undefined), zeros)


def _vector_gep(builder: Any, ptr: Any, index: Any) -> Any:
    """IR of ``ptr + index`` per lane (a scalar pointer, a vector of int32 element indices):
    the one ``getelementptr`` that x86's gathers read as base plus 32-bit index (llvmlite's
    ``gep`` takes scalar indices only)."""
    gep = ir.instructions.GEPInstr(
        builder.block, ptr, [index], inbounds=False, name="", source_etype=ptr.type.pointee
    )
    gep.type = ir.VectorType(ptr.type, index.type.count)
    builder._insert(gep)
    return gep


class _Walk:
    """IR helpers of one walk's code generation: array data pointers by argument name,
    constants, loads at any alignment."""

    def __init__(
        self, context: Any, builder: Any, names: Sequence[str], tys: Sequence[Any], args: Sequence[Any]
    ) -> None:
        self.builder = builder
        self.arg = dict(zip(names, args, strict=True))
        self.ptr = {
            name: context.make_array(ty)(context, builder, value).data
            for name, ty, value in zip(names, tys, args, strict=True)
            if isinstance(ty, types.Array)
        }
        self.i64, self.i32, self.f32 = ir.IntType(64), ir.IntType(32), ir.FloatType()
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()] + [self.i32] * 3)
        self._prefetch = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")

    def int(self, value: int) -> Any:
        return ir.Constant(self.i64, value)

    def item(self, name: str, index: Any) -> Any:
        """``name[index]`` as stored (an array argument)."""
        return self.builder.load(self.builder.gep(self.ptr[name], [index]))

    def flag(self, name: str) -> Any:
        value = self.arg[name]
        return self.builder.icmp_unsigned("!=", value, ir.Constant(value.type, 0))

    def load_at(self, ptr: Any, ty: Any) -> Any:
        return self.builder.load(self.builder.bitcast(ptr, ty.as_pointer()), align=1)

    def byte(self, at: Any) -> Any:
        """Pointer to payload byte ``at``."""
        return self.builder.gep(self.ptr["payload"], [at])

    def f16(self, at: Any) -> Any:
        """The float16 at payload byte ``at``, as float32."""
        half = self.builder.bitcast(self.load_at(self.byte(at), ir.IntType(16)), ir.HalfType())
        return self.builder.fpext(half, self.f32)

    def prefetch(self, at: Any) -> Any:
        self.prefetch_ptr(self.byte(at))

    def prefetch_ptr(self, ptr: Any) -> Any:
        """Prefetch the line of ``ptr`` (any pointer) into every cache level."""
        line = self.builder.bitcast(ptr, ir.IntType(8).as_pointer())
        self.builder.call(self._prefetch, [line, self.i32(0), self.i32(3), self.i32(1)])

    def locate(self, r: Any) -> tuple[Any, Any]:
        """(class, slot in its class) of row ``r`` (``_emit_locate``)."""
        return _emit_locate(self.builder, self.ptr["words"], self.ptr["rank"], self.ptr["sub"], r)


_WALK_ARGS = (
    "out",
    "b0",
    "b1",
    "j0",
    "indices",
    "offsets",
    "weights",
    "weighted",
    "words",
    "rank",
    "sub",
    "payload",
    "sb",
    "variant",
    "base",
    "row_bytes",
    "param_at",
    "book_base",
    "half",
    "dim",
    "ring",
)


def _emit_walk(w_: _Walk, width: int) -> None:
    """IR of ``out[b, j0:j0 + width] = `` the sum over bag b's ids of their rows' values there,
    for every bag b in ``[b0, b1)``, in one walk over the run's ids (the arguments are
    ``_WALK_ARGS``: the table as ``mixed_bag`` takes it, with ``variant`` each class's
    index in ``VARIANTS``, -1 for pruned, and ``sb`` the column books, level-major,
    ``sb[book_base[c] + level * dim + j]``, below ``GATHER_BITS`` bits, else as stored,
    ``sb[book_base[c] + j * 2**bits + level]``; ``ring``: ``RING`` int64 of scratch).

    Each id is located ``AHEAD`` ids before it is added (``_Walk.locate``: class and
    payload position, kept in ``ring`` as ``pos * 4 + class``), and its row prefetched
    then; the class-id word and rank-directory entries that the locate reads are
    prefetched ``META_AHEAD`` ids before, so that it does not wait on memory. Its class
    then picks its codec's decoder by a switch: 8-bit codes are widened 16 at a time
    straight from memory; narrower codes are read in one load and each
    lane gets the byte holding its code (one byte shuffle of the loaded bytes).
    The codes become values: ``code * scale`` added by one FMA per lane (rowwise; the
    offsets, one per row, summed apart and added to every value once, at the end of the
    bag), or a level picked by a tree of vector selects on the code's bits, each bit
    tested where it lies in the lane's byte (levels: the row's own float16 levels;
    colbook: the class's book, times the weight by an FMA), or for books of
    ``2**GATHER_BITS`` levels a gather with 32-bit indices from the book as stored
    (column-major: ``(j0 + lane) * 2**bits + code``). Each lane does the float
    operations of ``_add_tail``'s scalar loop, in its order, and a bag's ``width`` sums
    stay in vector registers."""
    builder = b = w_.builder
    i64 = w_.int
    f32, i32, i8 = w_.f32, w_.i32, ir.IntType(8)
    vf, vi32 = ir.VectorType(f32, width), ir.VectorType(i32, width)
    arg = w_.arg
    dim, j0 = arg["dim"], arg["j0"]
    is_half, is_weighted = w_.flag("half"), w_.flag("weighted")
    p_end = w_.item("offsets", arg["b1"])
    ring_mask = i64(RING - 1)

    def locate_ahead(q: Any) -> None:
        """Id ``q``'s class and payload position into the ring; its row prefetched."""
        c, slot = w_.locate(w_.item("indices", q))
        rb = w_.item("row_bytes", c)
        at = b.add(w_.item("base", c), b.mul(slot, rb))
        b.store(b.or_(b.shl(at, i64(2)), c), b.gep(w_.ptr["ring"], [b.and_(q, ring_mask)]))
        last = b.add(at, b.sub(rb, i64(1)))
        for delta in (0, 64, 128):  # a fixed four lines, so no branch depends on where the row starts
            line = b.add(at, i64(delta))
            w_.prefetch(b.select(b.icmp_signed("<", line, last), line, last))
        w_.prefetch(last)

    def prefetch_meta(q: Any) -> None:
        """Id ``q``'s class-id word and rank-directory entries into the cache (what
        ``locate_ahead`` reads ``META_AHEAD - AHEAD`` ids later)."""
        r = w_.item("indices", q)
        w_.prefetch_ptr(b.gep(w_.ptr["words"], [b.lshr(r, i64(5))]))
        w_.prefetch_ptr(b.gep(w_.ptr["rank"], [b.shl(b.lshr(r, i64(8)), i64(2))]))
        w_.prefetch_ptr(b.gep(w_.ptr["sub"], [b.shl(b.lshr(r, i64(6)), i64(2))]))

    p_start = w_.item("offsets", arg["b0"])
    span = b.sub(p_end, p_start)
    lead = b.select(b.icmp_signed("<", span, i64(META_AHEAD)), span, i64(META_AHEAD))
    with cgutils.for_range(builder, lead) as first:
        prefetch_meta(b.add(p_start, first.index))
    lead = b.select(b.icmp_signed("<", span, i64(AHEAD)), span, i64(AHEAD))
    with cgutils.for_range(builder, lead) as first:
        locate_ahead(b.add(p_start, first.index))

    total = cgutils.alloca_once(builder, vf)
    offsets = cgutils.alloca_once(builder, f32)

    def codes_of(at: Any, bits: int) -> Any:
        """The row's codes of values [j0, j0 + width), one per int32 lane."""
        first = b.lshr(b.mul(j0, i64(bits)), i64(3))
        if bits == 8:  # 16 codes a load: each widened straight from memory (no extracts)
            v16 = ir.VectorType(i8, 16)
            pieces = [
                b.zext(w_.load_at(w_.byte(b.add(at, b.add(first, i64(k)))), v16), ir.VectorType(i32, 16))
                for k in range(0, width, 16)
            ]
            while len(pieces) > 1:
                n = pieces[0].type.count
                pieces = [
                    b.shuffle_vector(x, y, ir.Constant(ir.VectorType(i32, 2 * n), list(range(2 * n))))
                    for x, y in zip(pieces[0::2], pieces[1::2], strict=True)
                ]
            return pieces[0]
        raw = w_.load_at(w_.byte(b.add(at, first)), ir.VectorType(i8, width * bits // 8))
        return b.and_(
            b.lshr(spread_of(raw, bits), ir.Constant(vi32, [lane * bits % 8 for lane in range(width)])),
            ir.Constant(vi32, [(1 << bits) - 1] * width),
        )

    def spread_of(raw: Any, bits: int) -> Any:
        """<width x i32>: lane i holds, in its low byte, the byte of ``raw`` that holds code
        i (codes of ``bits`` < 8 bits, low bits first): one byte shuffle from ``raw`` alone,
        so that x86 can use a one-source permute (AVX-512 VBMI's ``vpermb``), which keeps
        its index register from row to row (a two-source one overwrites it). The lane's
        upper bytes hold copies of that byte: every reader takes only bits of the low byte
        (a shift below 8, then a mask of the rest)."""
        order = [lane * bits // 8 for lane in range(width) for _ in range(4)]
        undef = ir.Constant(raw.type, ir.Undefined)
        moved = b.shuffle_vector(raw, undef, ir.Constant(ir.VectorType(i32, 4 * width), order))
        return b.bitcast(moved, vi32)

    def code_bits(at: Any, bits: int) -> list[Any]:
        """Per bit k of the row's codes of values [j0, j0 + width): <width x i1>, the bit
        tested where it lies in each lane's byte (``spread_of``), no shift."""
        first = b.lshr(b.mul(j0, i64(bits)), i64(3))
        spread = spread_of(w_.load_at(w_.byte(b.add(at, first)), ir.VectorType(i8, width * bits // 8)), bits)
        zeros = ir.Constant(vi32, [0] * width)
        masks = [ir.Constant(vi32, [1 << (i * bits % 8 + k) for i in range(width)]) for k in range(bits)]
        return [b.icmp_unsigned("!=", b.and_(spread, mask), zeros) for mask in masks]

    def pick(on: list[Any], candidates: list[Any]) -> Any:
        """Per lane, ``candidates[code]``: a tree of selects on the code's bits (``on``)."""
        for bit in on:
            candidates = [
                b.select(bit, candidates[m + 1], candidates[m]) for m in range(0, len(candidates), 2)
            ]
        return candidates[0]

    def added(kind: int, bits: int, c: Any, at: Any, w: Any, so_far: Any) -> Any:
        """``so_far`` plus the row's values [j0, j0 + width) (weighted); a rowwise row's
        offset (weighted) is added to ``offsets``."""
        fma = cgutils.get_or_insert_function(b.module, ir.FunctionType(vf, [vf] * 3), f"llvm.fma.v{width}f32")
        if kind == COLBOOK and bits >= GATHER_BITS:  # sb[bb + (j0 + lane) * 2**bits + code]
            start = b.gep(w_.ptr["sb"], [b.add(w_.item("book_base", c), b.shl(j0, i64(bits)))])
            lane = b.or_(codes_of(at, bits), ir.Constant(vi32, [lane << bits for lane in range(width)]))
            ptrs = _vector_gep(b, start, lane)
            every = ir.Constant(ir.VectorType(ir.IntType(1), width), [1] * width)
            gty = ir.FunctionType(vf, [ptrs.type, i32, every.type, vf])
            gather = cgutils.get_or_insert_function(
                b.module, gty, f"llvm.masked.gather.v{width}f32.v{width}p0"
            )
            found = b.call(gather, [ptrs, i32(4), every, ir.Constant(vf, ir.Undefined)])
            return b.call(fma, [found, _splat(b, w, width), so_far])
        if kind == COLBOOK:
            bb = b.add(w_.item("book_base", c), j0)
            found = [
                b.load(
                    b.bitcast(b.gep(w_.ptr["sb"], [b.add(bb, b.mul(dim, i64(v)))]), vf.as_pointer()),
                    align=4,
                )
                for v in range(1 << bits)
            ]
            return b.call(fma, [pick(code_bits(at, bits), found), _splat(b, w, width), so_far])
        q = b.add(at, w_.item("param_at", c))
        if kind == LEVELS:
            found = [_splat(b, b.fmul(w_.f16(b.add(q, i64(2 * v))), w), width) for v in range(1 << bits)]
            return b.fadd(so_far, pick(code_bits(at, bits), found))
        code = codes_of(at, bits)
        with b.if_else(is_half) as (then, otherwise):
            with then:
                s16, o16 = w_.f16(q), w_.f16(b.add(q, i64(2)))
                from_half = b.block
            with otherwise:
                s32 = w_.load_at(w_.byte(q), f32)
                o32 = w_.load_at(w_.byte(b.add(q, i64(4))), f32)
                from_full = b.block
        s, o = b.phi(f32), b.phi(f32)
        s.add_incoming(s16, from_half)
        s.add_incoming(s32, from_full)
        o.add_incoming(o16, from_half)
        o.add_incoming(o32, from_full)
        s, o = b.fmul(s, w), b.fmul(o, w)
        b.store(b.fadd(b.load(offsets), o), offsets)
        return b.call(fma, [b.sitofp(code, vf), _splat(b, s, width), so_far])

    with cgutils.for_range(builder, b.sub(arg["b1"], arg["b0"])) as bags:
        bag = b.add(arg["b0"], bags.index)
        lo, hi = w_.item("offsets", bag), w_.item("offsets", b.add(bag, i64(1)))
        b.store(ir.Constant(vf, [0.0] * width), total)
        b.store(ir.Constant(f32, 0.0), offsets)
        with cgutils.for_range(builder, b.sub(hi, lo)) as ids:
            p = b.add(lo, ids.index)
            q = b.add(p, i64(META_AHEAD))
            with b.if_then(b.icmp_signed("<", q, p_end)):
                prefetch_meta(q)
            q = b.add(p, i64(AHEAD))
            with b.if_then(b.icmp_signed("<", q, p_end)):
                locate_ahead(q)
            e = b.load(b.gep(w_.ptr["ring"], [b.and_(p, ring_mask)]))
            c, at = b.and_(e, i64(3)), b.ashr(e, i64(2))
            with b.if_else(is_weighted) as (then, otherwise):
                with then:
                    read = w_.item("weights", p)
                    from_read = b.block
                with otherwise:
                    from_one = b.block
            w = b.phi(f32)
            w.add_incoming(read, from_read)
            w.add_incoming(ir.Constant(f32, 1.0), from_one)
            done = b.append_basic_block("id_done")
            switch = b.switch(w_.item("variant", c), done)
            for index, (kind, bits) in enumerate(VARIANTS):
                block = b.append_basic_block(f"variant{index}")
                switch.add_case(i64(index), block)
                b.position_at_end(block)
                b.store(added(kind, bits, c, at, w, b.load(total)), total)
                b.branch(done)
            b.position_at_end(done)
        start = b.add(b.mul(bag, dim), j0)
        into = b.bitcast(b.gep(w_.ptr["out"], [start]), vf.as_pointer())
        b.store(b.fadd(b.load(total), _splat(b, b.load(offsets), width)), into, align=4)


@intrinsic
def _walk_intrinsic(
    typingctx: Any,
    out: Any,
    b0: Any,
    b1: Any,
    j0: Any,
    indices: Any,
    offsets: Any,
    weights: Any,
    weighted: Any,
    words: Any,
    rank: Any,
    sub: Any,
    payload: Any,
    sb: Any,
    variant: Any,
    base: Any,
    row_bytes: Any,
    param_at: Any,
    book_base: Any,
    half: Any,
    dim: Any,
    ring: Any,
) -> Any:
    """One walk (``_emit_walk``) over the widest of ``WIDTHS`` that the row has left from
    ``j0``, or the narrowest; returns that width."""
    tys: tuple[Any, ...] = (out, b0, b1, j0, indices, offsets, weights, weighted, words, rank, sub)
    tys = (*tys, payload, sb, variant, base, row_bytes, param_at, book_base, half, dim, ring)
    if out.layout != "C" or sb.layout != "C":
        return None  # the vector loads and stores assume contiguous values: no typing

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        w_ = _Walk(context, builder, _WALK_ARGS, signature.args, args)
        left = builder.sub(w_.arg["dim"], w_.arg["j0"])
        taken = cgutils.alloca_once(builder, w_.i64)

        def walk_from(k: int) -> None:
            if k == len(WIDTHS) - 1:
                _emit_walk(w_, WIDTHS[k])
                builder.store(w_.int(WIDTHS[k]), taken)
                return
            with builder.if_else(builder.icmp_signed(">=", left, w_.int(WIDTHS[k]))) as (fits, narrower):
                with fits:
                    _emit_walk(w_, WIDTHS[k])
                    builder.store(w_.int(WIDTHS[k]), taken)
                with narrower:
                    walk_from(k + 1)

        walk_from(0)
        return builder.load(taken)

    return types.intp(*tys), codegen


# called from the kernels only (typed here as such: numba supplies the typing context)
_walk: Any = _walk_intrinsic


@numba.njit(cache=True, inline="always", boundscheck=False)
def _add_tail(
    row: np.ndarray,
    j_lo: int,
    words: np.ndarray,
    rank: np.ndarray,
    sub: np.ndarray,
    payload: np.ndarray,
    sb: np.ndarray,
    kinds: np.ndarray,
    bits: np.ndarray,
    base: np.ndarray,
    row_bytes: np.ndarray,
    param_at: np.ndarray,
    book_base: np.ndarray,
    half: bool,
    dim: int,
    indices: np.ndarray,
    weights: np.ndarray,
    weighted: bool,
    lo: int,
    hi: int,
    tail: np.ndarray,
) -> None:
    """``row[j_lo:dim] =`` the sum of ids ``[lo, hi)``'s values there, value by value (the
    last ``dim % STEP`` values of a row): what each lane of a walk computes."""
    tail[:] = 0.0
    o_sum = np.float32(0.0)
    for p in range(lo, hi):
        c, slot = _locate(words, rank, sub, indices[p])
        kind = kinds[c]
        if kind == PRUNED:
            continue
        at = base[c] + slot * row_bytes[c]
        w = weights[p] if weighted else np.float32(1.0)
        nb = bits[c]
        mask = (1 << nb) - 1
        q = at + param_at[c]
        s = np.float32(0.0)
        if kind == ROWWISE:
            if half:
                s = _f16(payload, q)
                o = _f16(payload, q + 2)
            else:
                s = _f32(payload, q)
                o = _f32(payload, q + 4)
            s = s * w
            o_sum += o * w
        for j in range(j_lo, dim):
            code = (np.int64(payload[np.uint64(at + ((j * nb) >> 3))]) >> ((j * nb) & 7)) & mask
            if kind == ROWWISE:
                tail[j - j_lo] = _fma(np.float32(code), s, tail[j - j_lo])
            elif kind == LEVELS:
                tail[j - j_lo] += _f16(payload, q + 2 * code) * w
            else:
                # below GATHER_BITS level-major, else column-major (a column's levels together)
                at_j = (j << nb) + code if nb >= GATHER_BITS else code * dim + j
                tail[j - j_lo] = _fma(sb[np.uint64(book_base[c] + at_j)], w, tail[j - j_lo])
    for j in range(j_lo, dim):
        row[j] = tail[j - j_lo] + o_sum


@numba.njit(cache=True, inline="always", boundscheck=False)
def _mixed_bags(
    words: np.ndarray,
    rank: np.ndarray,
    sub: np.ndarray,
    payload: np.ndarray,
    sb: np.ndarray,
    variant: np.ndarray,
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
    b0: int,
    b1: int,
    ring: np.ndarray,
    tail: np.ndarray,
    out: np.ndarray,
) -> int:
    """Bags ``[b0, b1)`` of ``mixed_bag`` (``ring``: at least ``RING`` int64, ``tail``: at
    least ``STEP`` float32 of scratch); returns how many of their ids are out of range
    (then nothing is computed). Allocates nothing, raises nothing: ``mixed_run`` is this
    body compiled ahead of time."""
    n_bad = 0
    for p in range(offsets[b0], offsets[b1]):
        if indices[p] < 0 or indices[p] >= rows:
            n_bad += 1
    if n_bad:
        return n_bad
    j0 = 0
    while j0 + STEP <= dim:
        j0 += _walk(
            out,
            b0,
            b1,
            j0,
            indices,
            offsets,
            weights,
            weighted,
            words,
            rank,
            sub,
            payload,
            sb,
            variant,
            base,
            row_bytes,
            param_at,
            book_base,
            half,
            dim,
            ring,
        )
    for b in range(b0, b1):
        lo = offsets[b]
        hi = offsets[b + 1]
        row = out[b]
        if j0 < dim:
            _add_tail(
                row,
                j0,
                words,
                rank,
                sub,
                payload,
                sb,
                kinds,
                bits,
                base,
                row_bytes,
                param_at,
                book_base,
                half,
                dim,
                indices,
                weights,
                weighted,
                lo,
                hi,
                tail,
            )
        if mean and hi > lo:
            cnt_b = np.float32(hi - lo)
            for j in range(dim):
                row[j] /= cnt_b
    return 0


@numba.njit(cache=True, parallel=True, nogil=True, boundscheck=False)
def mixed_bag(
    words: np.ndarray,
    rank: np.ndarray,
    sub: np.ndarray,
    payload: np.ndarray,
    sb: np.ndarray,
    variant: np.ndarray,
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

    The table (``layouts.mixed``, ``MixedKernelTable``): ``words``, the class ids as
    int64 words; ``rank`` and ``sub``, the rank directory's block and sub-block counts,
    flattened; ``payload``; ``sb``, the column books (level-major below ``GATHER_BITS``
    bits, ``sb[book_base[c] + level * dim + j]``, else as stored, ``sb[book_base[c] +
    j * 2**bits + level]``); per class: its decoder (index in ``VARIANTS``, -1 for pruned),
    kind, bits, first payload byte, bytes per row, where its parameters start in a row,
    first book value. ``half``: rowwise scales are float16 (else float32). The lookups
    are ``lookup.Bags``' fields, from ``indices`` to ``mean``. Each thread takes a
    contiguous run of bags, summed in walks over its ids (``_walk_intrinsic``), one per
    ``WIDTHS`` slice of the row, the last ``dim % STEP`` values id by id
    (``_add_tail``). Returns the number of out-of-range ids (then nothing is computed:
    the caller raises).
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
        ring = np.empty(RING, dtype=np.int64)
        tail = np.empty(STEP, dtype=np.float32)
        bad[run] = _mixed_bags(
            words,
            rank,
            sub,
            payload,
            sb,
            variant,
            kinds,
            bits,
            base,
            row_bytes,
            param_at,
            book_base,
            half,
            rows,
            dim,
            indices,
            offsets,
            weights,
            weighted,
            mean,
            b0,
            b1,
            ring,
            tail,
            out,
        )
    return int(bad.sum())


@numba.njit(cache=True, nogil=True, boundscheck=False)
def mixed_run(
    words: np.ndarray,
    rank: np.ndarray,
    sub: np.ndarray,
    payload: np.ndarray,
    sb: np.ndarray,
    variant: np.ndarray,
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
    b0: int,
    b1: int,
    ring: np.ndarray,
    acc: np.ndarray,
    out: np.ndarray,
) -> int:
    """One thread's run of ``mixed_bag`` (bags ``[b0, b1)``), as ``lookup.run_bags`` calls a
    run kernel (``ring``: at least ``RING`` int64, ``acc``: ``dim`` float32 of scratch,
    the tail's when ``dim`` is at least ``STEP``); returns the out-of-range ids."""
    return _mixed_bags(
        words,
        rank,
        sub,
        payload,
        sb,
        variant,
        kinds,
        bits,
        base,
        row_bytes,
        param_at,
        book_base,
        half,
        rows,
        dim,
        indices,
        offsets,
        weights,
        weighted,
        mean,
        b0,
        b1,
        ring,
        acc,
        out,
    )


# several processes may compile into one disk cache at once (see ``_kernel_cache``)
_kernel_cache.guard_module(globals())
