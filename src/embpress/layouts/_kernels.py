"""Numba kernels for lookups that torch has no kernel for (block-sparse bags, 4-bit fused
rows on several threads, row remapping).

Compiled on first use and cached on disk; the thread count follows
``torch.get_num_threads()`` (each thread takes a contiguous run of bags). Indices are
bounds-checked (a kernel returns how many were out of range, the caller raises
IndexError). The layouts call the bag kernels through one typed boundary,
``layouts.lookup`` (``run_bags``: the table's arguments as a NamedTuple, the lookups as
``Bags``); a block-sparse table's geometry arrives as its ``RecordShape``, a plain tuple
the kernels unpack, so no kernel derives the layout's constants itself.

The block-sparse bag is written for the memory system first: a lookup needs its row's
offset, then from it the row's record (bitmap, qparams and codes side by side), two
dependent trips to memory. A single pass per bag keeps both in flight with prefetch
streams and a ring of pair starts computed ahead (``_block_sparse_pass_intrinsic``),
and decodes a row without branches on its bitmap (``_emit_expand``,
``_emit_strided_codes``); rows of several bitmap words decode word by word, other shapes
walk the set bits (``_decode_bag``). Vector steps are written as LLVM IR (numba
``@intrinsic``) because numba does not vectorise them on its own.

Kernel paths: the expand of a bitmap word's kept blocks comes in three flavours
(``KERNEL_PATHS``): AVX-512 register expands, AVX2 table permutes, and generic IR (no x86
intrinsic, what ARM runs); 4- and 2-bit codes without a register expand are shuffled as
bytes in generic IR on both other paths, and on ARM the generic path's 8-bit codes too
(``_byte_flow``). A kernel takes its path as a
marker array (``PATH_MARKERS``) whose dtype makes each path its own specialisation,
compiled and cached when first used: a process compiles only the path it runs.
``process_path`` picks that path once (the fastest the CPU runs, or ``EMBPRESS_KERNEL``);
``lookup.KernelPolicy.path`` overrides it per call, block or process, so tests run every
path on one machine.

The IR emitters and intrinsics stay in this file with the kernels that use them, on
purpose. numba's disk cache is keyed on the jitted function's own file (its modification
time and size): an intrinsic's code generation runs only when a kernel is compiled, and
its output is then frozen into the cached kernel, so a helper edited in another file
would leave every cached kernel running the old IR, silently. Splitting safely would
need the cache off (every process then compiles these kernels afresh: about 16 s before
the first lookup on a 2-core benchmark machine), numba's private cache-locator API, or a
hash of the helper file pinned here and checked by hand; none is worth a shorter file.
For the same reason no other kernel file imports a jitted helper or intrinsic from here
(``tests/test_nn.py`` checks it).
"""

from __future__ import annotations

import threading
from typing import Any

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from .. import _kernel_cache
from . import _paths
from ._paths import (
    _PATH_DTYPES,
    KERNEL_ENV,
    KERNEL_PATHS,
    PATH_AVX512,
    PATH_GENERIC,
    PATH_MARKERS,
    START_RING,
    available_paths,
    path_compiles,
    process_path,
    vector_decode_supported,
)

__all__ = [
    "KERNEL_ENV",
    "KERNEL_PATHS",
    "PATH_MARKERS",
    "available_paths",
    "block_sparse_bag",
    "block_sparse_run",
    "fused_bag",
    "fused_run",
    "offsets_bounds",
    "offsets_status",
    "packed_rows_bag",
    "packed_rows_run",
    "path_compiles",
    "process_path",
    "remap_rows",
    "set_threads",
    "vector_decode_supported",
]


_THREADS_SET = threading.local()  # the count set_threads last gave numba in this thread


def set_threads() -> int:
    """Use as many numba threads as torch uses (within numba's pool); return that count.
    numba's count is per thread; it is set only when torch's has changed since this
    thread last set it (setting it costs a small batch's lookup more than its kernel).

    The first call may start numba's OpenMP pool, which sets the OpenMP thread count of
    the libgomp torch shares: torch's own count is put back, or a process pinned to one
    thread (``torch.set_num_threads(1)``, as forked workers must be) would run on all
    of them from its first lookup on."""
    pool = int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
    wanted = torch.get_num_threads()
    threads = max(1, min(wanted, pool))
    if getattr(_THREADS_SET, "count", 0) != threads:
        numba.set_num_threads(threads)
        _THREADS_SET.count = threads
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)
    return threads


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


def _item_pointer(context: Any, builder: Any, signature: Any, args: Any) -> Any:
    """IR pointer to ``ary[idx]`` for an intrinsic called as ``(ary, idx, ...)``."""
    aryty = signature.args[0]
    arr = context.make_array(aryty)(context, builder, args[0])
    return cgutils.get_item_pointer(context, builder, aryty, arr, [args[1]], wraparound=False)


def _prefetch_intrinsic(locality: int) -> Any:
    """Hint the CPU to load ``ary[idx]`` into cache (no effect on results).

    ``locality`` 3 fetches into every level (L1 too), 2 stops at L2: lines needed a while
    from now wait there instead of crowding L1.
    """

    @intrinsic
    def prefetch(typingctx: Any, ary: Any, idx: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            i8p = builder.bitcast(
                _item_pointer(context, builder, signature, args), ir.IntType(8).as_pointer()
            )
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(ir.VoidType(), [i8p.type, i32, i32, i32])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
            builder.call(fn, [i8p, ir.Constant(i32, 0), ir.Constant(i32, locality), ir.Constant(i32, 1)])
            return context.get_dummy_value()

        return types.void(ary, types.intp), codegen

    return prefetch


_prefetch: Any = _prefetch_intrinsic(3)


def _block4_intrinsic(bits: int) -> Any:
    """``acc[col:col+4] += float(4 codes from code index pos) * s + o`` as vector IR.

    The compiler does not vectorise this step on its own (it cannot prove that the table
    and the accumulator do not overlap), so the four lanes are written out: one load of
    the block's bytes, one conversion, a multiply and an add (not fused, as in
    ``dequantize``), and one load/add/store of the accumulator. ``bits`` is 8 (four bytes),
    4 (two bytes, low nibble first) or 2 (one byte, low bits first: a block's four codes
    start at a code index that is a multiple of 4).
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
            elif bits == 2:
                byte_index = builder.lshr(args[3], ir.Constant(args[3].type, 2))
                cptr = cgutils.get_item_pointer(
                    context, builder, codesty, codes_arr, [byte_index], wraparound=False
                )
                one = builder.insert_element(ir.Constant(b4, ir.Undefined), builder.load(cptr), i32(0))
                spread = builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(i32, 4), [0, 0, 0, 0]))
                shifted = builder.lshr(spread, ir.Constant(b4, [0, 2, 4, 6]))
                lanes = builder.and_(shifted, ir.Constant(b4, [3, 3, 3, 3]))
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
_add_block4_u2 = _block4_intrinsic(2)


def _path_of(marker: Any) -> int:
    """The kernel path (``KERNEL_PATHS`` number) that a marker's numba type names."""
    for number, dtype in _PATH_DTYPES.items():
        if isinstance(marker, types.Array) and marker.dtype == numba.from_dtype(np.dtype(dtype)):
            return number
    raise TypeError(f"a kernel path marker is one of PATH_MARKERS' arrays, got {marker}")


def _call(builder: Any, name: str, ret: Any, args: list[Any]) -> Any:
    """Call the LLVM intrinsic ``name`` (declared on first use)."""
    fnty = ir.FunctionType(ret, [a.type for a in args])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args)


def _splat(builder: Any, x: Any, vty: Any) -> Any:
    i32 = ir.IntType(32)
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), x, ir.Constant(i32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, vty.count), [0] * vty.count))


def _emit_expand(builder: Any, cptr: Any, word: Any, block: Any, word_bits: int, fill: int, path: int) -> Any:
    """<W x block>: the kept blocks (set bits of ``word``), read back to back from ``cptr``,
    at their block positions; pruned blocks hold ``fill``. ``path``: which instructions
    do it (``KERNEL_PATHS``).

    A row of all kept blocks is one plain load. Else AVX-512's register expands
    (``_emit_register_expand``) where the CPU has the expand of this element width; on the
    generic path generic IR, a network of fixed lane shifts and selects
    (``_emit_network_expand``); else AVX2's table permutes of 4-byte blocks
    (``_emit_table_expand``). Codes that ``_byte_flow`` shuffles as bytes do not come
    here. A gather (``llvm.masked.gather``) in its place measured
    slower for 16-bit blocks (4-bit codes) on AMD Zen 5 (bench/meaning.md), and ARM
    compiles it to one load per lane. Every flavour may read up to 64 bytes past the kept
    blocks' codes: the caller guarantees them (the block-sparse records end with a 64-byte
    tail for this). ``block`` is i32 (8-bit codes), i16 (4-bit codes) or i8 (2-bit codes).
    """
    if isinstance(word, ir.Constant) and word.constant & ((1 << word_bits) - 1) == (1 << word_bits) - 1:
        vty = ir.VectorType(block, word_bits)  # every block kept: a plain load
        return builder.load(builder.bitcast(cptr, vty.as_pointer()), align=1)
    if path == PATH_AVX512 and _paths._has_expands(block.width) and block.width * word_bits >= 128:
        return _emit_register_expand(builder, cptr, word, block, word_bits, fill)
    if path == PATH_GENERIC:
        return _emit_network_expand(builder, cptr, word, block, word_bits, fill)
    return _emit_table_expand(builder, cptr, word, block, word_bits, fill)


def _network_table(module: Any) -> Any:
    """The 256-entry table of ``_emit_network_expand`` in ``module`` (one global per
    module, made on first use): entry m (an int32) holds, in bytes 0, 1, 2, the lanes that
    take the lane 4, 2 and 1 below them at each stage of the expand of bitmap byte m, and
    in byte 3 m itself."""
    entries = []
    for m in range(256):
        kept = [j for j in range(8) if m >> j & 1]
        moves = [j - r for r, j in enumerate(kept)]  # how far block r moves
        at = list(range(len(kept)))
        masks = []
        for s in (4, 2, 1):  # the largest moves first: no block lands on one yet to move
            mask = 0
            for r, d in enumerate(moves):
                if d & s:
                    at[r] += s
                    mask |= 1 << at[r]
            masks.append(mask)
        entries.append(masks[0] | masks[1] << 8 | masks[2] << 16 | m << 24)
    i32 = ir.IntType(32)
    return _constant_table(module, "embpress.network_table", [ir.Constant(i32, e) for e in entries])


def _constant_table(module: Any, name: str, entries: list[Any]) -> Any:
    """The internal constant global ``name`` of ``module`` holding ``entries`` (IR
    constants of one type) as an array: made on first use, the same global after."""
    if name in module.globals:
        return module.globals[name]
    table_ty = ir.ArrayType(entries[0].type, len(entries))
    table = ir.GlobalVariable(module, table_ty, name)
    table.linkage = "internal"
    table.global_constant = True
    table.initializer = ir.Constant(table_ty, entries)
    return table


def _kept_lanes(m: int, blocks: int, block_bytes: int) -> list[int]:
    """For each byte of ``blocks`` blocks of ``block_bytes`` bytes whose bitmap is ``m``:
    where it sits among the kept blocks' bytes packed back to back, or 0x80 (top bit set)
    in a pruned block."""
    rank, lanes = 0, []
    for j in range(blocks):
        if (m >> j) & 1:
            lanes += [rank * block_bytes + t for t in range(block_bytes)]
            rank += 1
        else:
            lanes += [0x80] * block_bytes
    return lanes


def _emit_network_expand(builder: Any, cptr: Any, word: Any, block: Any, word_bits: int, fill: int) -> Any:
    """``_emit_expand`` in generic IR without gathers or variable shuffles: per 8 blocks
    (one bitmap byte), one unaligned load of the next 8 blocks' worth of bytes, then three
    stages that move each block 4, 2 and 1 lanes up where its distance to its place has
    that bit (a fixed lane shift and a select by a mask from ``_network_table``: the
    largest moves first never land a block on one still to move), then a select that puts
    ``fill`` in the pruned lanes; the next byte's blocks start after this byte's kept ones
    (a popcount). No gather: what ARM compiles to lane moves and bit selects, where a
    gather would be one load per lane."""
    i8, i64 = ir.IntType(8), ir.IntType(64)
    i32 = ir.IntType(32)
    block_bytes = block.width // 8
    table = _network_table(builder.module)
    bits = builder.zext(builder.trunc(word, ir.IntType(word_bits)), i64)
    first = builder.bitcast(cptr, i8.as_pointer())
    v8 = ir.VectorType(block, 8)
    lanes8 = ir.VectorType(i32, 8)
    pieces = []
    for lo in range(0, word_bits, 8):
        byte = builder.and_(builder.lshr(bits, ir.Constant(i64, lo)), ir.Constant(i64, 255))
        entry = builder.load(builder.gep(table, [ir.Constant(i64, 0), byte]), align=4)
        v = builder.load(builder.bitcast(first, v8.as_pointer()), align=1)
        for k, s in enumerate((4, 2, 1)):
            mask = builder.trunc(builder.lshr(entry, ir.Constant(i32, 8 * k)), i8)
            moved = builder.shuffle_vector(v, v, ir.Constant(lanes8, [0] * s + list(range(8 - s))))
            v = builder.select(builder.bitcast(mask, ir.VectorType(ir.IntType(1), 8)), moved, v)
        kept = builder.bitcast(builder.trunc(byte, i8), ir.VectorType(ir.IntType(1), 8))
        pieces.append(builder.select(kept, v, ir.Constant(v8, [fill] * 8)))
        if lo + 8 < word_bits:
            first = _byte_start(builder, cptr, bits, lo + 8, block_bytes)
    return _concat(builder, pieces)


def _byte_table(module: Any, block_bytes: int) -> Any:
    """The table of ``_emit_byte_codes`` in ``module`` (one global per module, made on first
    use): one <16 x i8> entry per bitmap byte m (4-byte blocks: per half byte), holding
    for each byte of its blocks where it sits among the kept blocks' bytes, or 0x80 in a
    pruned block. 1-byte blocks take 8 bytes: entry m fills the first 8 lanes (the rest
    0x80), entry 256 + m the last 8 (the first 0x80), for the second byte of a piece."""
    v16 = ir.VectorType(ir.IntType(8), 16)
    per = _entry_blocks(block_bytes)
    entries = []
    for upper in (False, True) if block_bytes == 1 else (False,):
        for m in range(1 << per):
            lanes = _kept_lanes(m, per, block_bytes)
            pad = [0x80] * (16 - len(lanes))
            entries.append(ir.Constant(v16, pad + lanes if upper else lanes + pad))
    return _constant_table(module, f"embpress.byte_table.{block_bytes}", entries)


def _entry_blocks(block_bytes: int) -> int:
    """Blocks one entry of ``_byte_table`` covers: 16 bytes' worth, at most a bitmap byte."""
    return min(16 // block_bytes, 8)


def _byte_pieces(bits: int, word_bits: int) -> list[tuple[int, int]]:
    """(first block, blocks) of each 16-byte piece of ``_emit_byte_codes``: 4 blocks of
    8-bit codes, 8 of 4-bit, 16 of 2-bit (two bitmap bytes; 8 in a row of 8 blocks)."""
    per = min({8: 4, 4: 8, 2: 16}[bits], word_bits)
    return [(lo, per) for lo in range(0, word_bits, per)]


def _emit_byte_codes(
    builder: Any, cptr: Any, word: Any, bits: int, word_bits: int, joined_index: bool
) -> list[Any]:
    """The byte-shuffle decode of one bitmap word's codes (``_emit_strided_codes``, where
    ``_byte_flow`` says): per 16-byte piece of the expanded row (``_byte_pieces``),
    one unaligned load from the piece's first kept block (a popcount of the bitmap bits
    below it), a byte shuffle by the piece's entries of ``_byte_table``, and code z's
    bytes selected into the pruned blocks (the entries' top bit); the piece is then
    widened byte by byte to int32 lanes and each code field of a byte taken out
    (``_byte_order``). The shuffle is a vector built of bytes extracted at variable
    indices, no intrinsic: LLVM makes it one ``pshufb`` on x86 and one ``tbl`` on ARM, as
    long as each piece is widened before the pieces meet (joined as bytes, x86's
    instruction selection merges them into one wide vector and extracts every byte
    alone). A piece of 2-bit codes spans two bitmap bytes: with ``joined_index`` (x86)
    one shuffle by an index joined from both bytes' entries, else two shuffles, each
    byte's from its own start, merged by a select (LLVM's AArch64 selection makes ``tbl``
    only of an index as loaded, and moves each byte alone otherwise; on x86 the two
    shuffles took 1.04-1.08x the time). Returns the pieces' fields, as int32 vectors of
    ``2**23 + code``'s bits, in ``_byte_order``. On the benchmark CPUs it took 0.65-0.76x
    the time of the lane network for 4-bit codes; 8-bit codes, a piece of 4 blocks, took
    1.00-1.06x, so AVX-512 code keeps the network for them (bench/meaning.md)."""
    i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
    block_bytes = 4 * bits // 8
    z = 1 << (bits - 1)
    fill = sum(z << (bits * k) for k in range(8 // bits)) & 255  # a byte of codes z
    table = _byte_table(builder.module, block_bytes)
    bitmap = builder.zext(builder.trunc(word, ir.IntType(word_bits)), i64)
    v16 = ir.VectorType(i8, 16)
    v16i32 = ir.VectorType(i32, 16)

    def entry(lo: int, upper: bool = False) -> Any:
        m = builder.and_(
            builder.lshr(bitmap, ir.Constant(i64, lo)),
            ir.Constant(i64, (1 << _entry_blocks(block_bytes)) - 1),
        )
        if upper:
            m = builder.add(m, ir.Constant(i64, 256))
        return builder.load(builder.gep(table, [ir.Constant(i64, 0), m]), align=16)

    def shuffled(lo: int, index: Any) -> tuple[Any, Any]:
        """The 16 bytes from the first kept block at or after bitmap bit ``lo``, moved by
        ``index``; and the lanes ``index`` marks pruned."""
        start = cptr if lo == 0 else _byte_start(builder, cptr, bitmap, lo, block_bytes)
        packed = builder.load(builder.bitcast(start, v16.as_pointer()), align=1)
        at = builder.and_(index, ir.Constant(v16, [15] * 16))
        moved = ir.Constant(v16, ir.Undefined)
        for t in range(16):
            byte = builder.extract_element(packed, builder.extract_element(at, ir.Constant(i32, t)))
            moved = builder.insert_element(moved, byte, ir.Constant(i32, t))
        return moved, builder.icmp_signed("<", index, ir.Constant(v16, [0] * 16))

    fields = []
    for lo, blocks in _byte_pieces(bits, word_bits):
        if blocks == 16 and joined_index:  # two bitmap bytes, one shuffle: the second's
            # blocks follow the first's kept ones, so its indices move up by their count
            low = builder.and_(builder.lshr(bitmap, ir.Constant(i64, lo)), ir.Constant(i64, 255))
            kept = builder.trunc(_call(builder, "llvm.ctpop.i64", i64, [low]), i8)
            high = builder.add(entry(lo + 8, upper=True), _splat(builder, kept, v16))
            first = ir.Constant(ir.VectorType(i32, 16), list(range(8)) + list(range(24, 32)))
            moved, pruned = shuffled(lo, builder.shuffle_vector(entry(lo), high, first))
        else:
            moved, pruned = shuffled(lo, entry(lo))
        if blocks == 16 and not joined_index:  # each bitmap byte from its own start
            high, high_pruned = shuffled(lo + 8, entry(lo + 8, upper=True))
            moved = builder.select(pruned, high, moved)
            pruned = builder.and_(pruned, high_pruned)
        wide = builder.zext(builder.select(pruned, ir.Constant(v16, [fill] * 16), moved), v16i32)
        lanes = blocks * 4 * bits // 8  # bytes of this piece that hold codes
        for m in range(8 // bits):
            field = builder.lshr(wide, ir.Constant(v16i32, [bits * m] * 16)) if m else wide
            if m < 8 // bits - 1:
                field = builder.and_(field, ir.Constant(v16i32, [(1 << bits) - 1] * 16))
            field = builder.or_(field, ir.Constant(v16i32, [0x4B000000] * 16))
            if lanes < 16:
                field = builder.shuffle_vector(
                    field, field, ir.Constant(ir.VectorType(i32, lanes), list(range(lanes)))
                )
            fields.append(field)
    return fields


def _byte_order(bits: int, word_bits: int) -> list[int]:
    """The column of each lane of ``_emit_byte_codes``' fields end to end: per piece, per
    code field m of a byte, the piece's bytes in order."""
    per_byte = 8 // bits
    order = []
    for lo, blocks in _byte_pieces(bits, word_bits):
        nbytes = blocks * 4 // per_byte
        order += [4 * lo + per_byte * b + m for m in range(per_byte) for b in range(nbytes)]
    return order


def _byte_start(builder: Any, cptr: Any, bits: Any, lo: int, block_bytes: int) -> Any:
    """i8* to the codes of the blocks from bitmap bit ``lo`` on: ``cptr`` plus the kept
    blocks below bit ``lo`` (a popcount of the bits below it, each byte's from the word
    itself, not chained through the bytes before it, so that the loads of a word's bytes
    do not wait on each other)."""
    i64 = ir.IntType(64)
    below = builder.and_(bits, ir.Constant(i64, (1 << lo) - 1))
    count = _call(builder, "llvm.ctpop.i64", i64, [below])
    first = builder.bitcast(cptr, ir.IntType(8).as_pointer())
    return builder.gep(first, [builder.mul(count, ir.Constant(i64, block_bytes))])


def _concat(builder: Any, pieces: list[Any]) -> Any:
    """IR for the vectors ``pieces`` (a power of two of them, one type) end to end."""
    while len(pieces) > 1:
        n = pieces[0].type.count
        pieces = [
            builder.shuffle_vector(
                a, b, ir.Constant(ir.VectorType(ir.IntType(32), 2 * n), list(range(2 * n)))
            )
            for a, b in zip(pieces[0::2], pieces[1::2], strict=True)
        ]
    return pieces[0]


def _lane_bits(builder: Any, bits: Any, lanes: int) -> Any:
    """<lanes x i1>: bit i of the integer ``bits`` (at least ``lanes`` wide) in lane i."""
    return builder.bitcast(builder.trunc(bits, ir.IntType(lanes)), ir.VectorType(ir.IntType(1), lanes))


def _emit_register_expand(builder: Any, cptr: Any, word: Any, block: Any, word_bits: int, fill: int) -> Any:
    """``_emit_expand`` with AVX-512's register expands.

    Per piece of up to 512 bits (a word's blocks: 128 bits and up): one plain vector
    load and the x86 expand (``vpexpandd``/``vpexpandw``/``vpexpandb``; LLVM may fold the
    load into it), which takes only as many leading
    elements as there are kept blocks. Measured on the benchmark machine (AMD Zen 5,
    cache-hot lookups): LLVM's generic ``llvm.masked.expandload`` in its place was about
    25% slower, and a load masked to the kept blocks 12% slower (its mask waits for the
    bitmap).
    """
    i64 = ir.IntType(64)
    per = min(word_bits, 512 // block.width)
    vty = ir.VectorType(block, per)
    bits = builder.zext(builder.trunc(word, ir.IntType(word_bits)), i64)
    first = builder.bitcast(cptr, block.as_pointer())
    pieces = []
    for lo in range(0, word_bits, per):
        kept = builder.and_(builder.lshr(bits, ir.Constant(i64, lo)), ir.Constant(i64, (1 << per) - 1))
        fill_lanes = ir.Constant(vty, [fill] * per)
        packed = builder.load(builder.bitcast(first, vty.as_pointer()), align=1)
        name = f"llvm.x86.avx512.mask.expand.v{per}i{block.width}"
        pieces.append(_call(builder, name, vty, [packed, fill_lanes, _lane_bits(builder, kept, per)]))
        if lo + per < word_bits:
            first = builder.gep(first, [_call(builder, "llvm.ctpop.i64", i64, [kept])])
    return _concat(builder, pieces)


def _expand_table(module: Any) -> Any:
    """The 256-entry permutation table of ``_emit_table_expand`` in ``module`` (one global
    per module, made on first use): entry m holds, per lane j of 8 blocks, where block j's
    value sits among the kept blocks of bitmap byte m (<8 x i8> lane numbers for
    ``vpermd``). A pruned block's entry is 0x80: the top bit marks it (``vpermd`` reads
    only the low three bits), so the blend that fills pruned lanes takes its mask from the
    entry, in vector registers."""
    v8 = ir.VectorType(ir.IntType(8), 8)
    entries = [ir.Constant(v8, _kept_lanes(m, 8, 1)) for m in range(256)]  # lanes, not bytes
    return _constant_table(module, "embpress.expand_table", entries)


def _emit_table_expand(builder: Any, cptr: Any, word: Any, block: Any, word_bits: int, fill: int) -> Any:
    """``_emit_expand`` of 4-byte blocks with AVX2: per 8 blocks (one bitmap byte), one
    unaligned load of the next 8 blocks' worth of bytes, a ``vpermd`` by the byte's entry
    of ``_expand_table`` and a blend that puts ``fill`` in the pruned lanes (marked by the
    entry's top bits, so the mask is made in vector registers, not moved over from the
    bitmap byte in a general one); each byte's blocks start after the kept ones below it
    (a popcount)."""
    i32, i64 = ir.IntType(32), ir.IntType(64)
    if block.width != 32:
        raise ValueError(f"_emit_table_expand: 4-byte blocks only, got i{block.width}")
    table = _expand_table(builder.module)
    bits = builder.zext(builder.trunc(word, ir.IntType(word_bits)), i64)
    first = builder.bitcast(cptr, ir.IntType(8).as_pointer())
    v8 = ir.VectorType(block, 8)
    pieces = []
    for lo in range(0, word_bits, 8):
        byte = builder.and_(builder.lshr(bits, ir.Constant(i64, lo)), ir.Constant(i64, 255))
        entry = builder.load(builder.gep(table, [ir.Constant(i64, 0), byte]), align=8)
        packed = builder.load(builder.bitcast(first, v8.as_pointer()), align=1)
        lanes = builder.sext(entry, ir.VectorType(i32, 8))
        moved = _call(builder, "llvm.x86.avx2.permd", v8, [packed, lanes])
        pruned = builder.icmp_signed("<", lanes, ir.Constant(lanes.type, [0] * 8))
        pieces.append(builder.select(pruned, ir.Constant(v8, [fill] * 8), moved))
        if lo + 8 < word_bits:
            first = _byte_start(builder, cptr, bits, lo + 8, 4)
    return _concat(builder, pieces)


# ``_emit_strided_codes``' path for a row whose blocks are all kept (a constant word): no
# expand, one plain load, the x86 paths' lane order whatever the kernel path
ALL_KEPT = -1


def _byte_flow(bits: int, word_bits: int, path: int) -> bool:
    """Whether ``_emit_strided_codes`` decodes by byte shuffles in 16-byte pieces
    (``_emit_byte_codes``): 4- and 2-bit codes wherever the CPU has no AVX-512 register
    expand of their blocks (it measured faster than an AVX2 table permute of 8 blocks
    and the generic lane network, on AVX-512 and on AVX2 code generation alike), and
    8-bit codes on the generic path of a CPU without AVX-512 (compiled for an ARM
    Neoverse N1, the lane network's decode of a 128-value row took 679 instructions, the
    byte shuffles' 289; compiled for Haswell, the shuffles took 0.64-0.70x the network's
    time; with AVX-512's mask registers the network measured faster). Other 8-bit codes
    expand 4-byte blocks (``_emit_expand``; on the AVX2 path ``vpermd``, which measured
    faster than the shuffles under a Haswell build too: 1.10-1.13x)."""
    if path == ALL_KEPT:
        return False
    if bits == 8:  # the lane network with AVX-512, where it measured faster (bench/meaning.md)
        return path == PATH_GENERIC and not _avx512_registers()
    block = 4 * bits
    return not (path == PATH_AVX512 and _paths._has_expands(block) and block * word_bits >= 128)


def _strided_order(bits: int, word_bits: int, path: int) -> list[int]:
    """The lane (column) each position of ``_emit_strided_codes``'s vector decodes.

    On the x86 paths: 8 bits: for each group of up to 16 blocks, the k-th code of every
    block (k = 0..3); 4 bits: for each pair of blocks (a 32-bit word of 8 codes), the m-th
    code of every pair (m = 0..7); 2 bits: for each four blocks (a 32-bit word of 16
    codes), the m-th code of every four (m = 0..15). Where ``_byte_flow`` says,
    ``_byte_order``.
    """
    if _byte_flow(bits, word_bits, path):
        return _byte_order(bits, word_bits)
    if bits == 8:
        n = min(word_bits, 16)
        return [4 * (n * g + i) + k for g in range(word_bits // n) for k in range(4) for i in range(n)]
    per = 32 // bits  # codes in a 32-bit word
    return [per * j + m for m in range(per) for j in range(word_bits * bits // 8)]


def _emit_strided_codes(builder: Any, cptr: Any, word: Any, bits: int, word_bits: int, path: int) -> Any:
    """IR for the codes of one bitmap word's blocks, centred, as <4W x float> in
    ``_strided_order``: ``code - z`` (``z = 2**(bits-1)``) in a kept lane, exactly 0 in a
    pruned one. A row then decodes as ``(code - z) * s + (o + z * s)``
    (``_centred_offset``).

    The kept blocks' codes sit back to back from the byte ``cptr`` points at; an expand
    (``_emit_expand``) spreads them to their block positions and fills pruned blocks with
    code z. 8-bit blocks are 4 bytes, 4-bit blocks 2 bytes (low nibble first), 2-bit
    blocks 1 byte (low bits first). Every code
    is then taken out of its 32-bit word into the mantissa of the float ``2**23 + code``
    (``_emit_field``: a shift and an and-or) and one exact subtraction of ``2**23 + z``
    gives ``code - z``, so the k-th code of 16 words fills one vector: no cross-lane
    shuffle per row, which measured as the bottleneck of the decode, and no int-to-float
    conversion (conversions and shifts share one execution port on x86). A byte shuffle
    with the exponent byte from a second operand, in place of the shift and and-or,
    measured slower: it competes with the expand's shuffles. The codes ``_byte_flow``
    picks (4- and 2-bit ones without a register expand; on a CPU that is not x86, the
    generic path's 8-bit ones too) are shuffled as bytes in 16-byte pieces instead, each
    widened to 16 int32 lanes (``_emit_byte_codes``), so their fields come in another order.
    Callers sum rows in this order (``path`` names it; ``ALL_KEPT`` for rows that keep
    every block) and restore the columns once per bag (``_emit_unstride``). No branch
    depends on which blocks are kept.

    Centring keeps a bag's running sums near the size of its values: a kernel that adds
    the codes' part and the offsets' part of a bag in separate sums (``_emit_scaled_sum``)
    would otherwise carry two large sums of opposite sign and lose digits when they meet.
    """
    lanes = 4 * word_bits
    i32 = ir.IntType(32)
    z = 1 << (bits - 1)
    fill = sum(z << (bits * k) for k in range(4))  # a pruned block: four codes z
    if _byte_flow(bits, word_bits, path):
        pieces = _emit_byte_codes(builder, cptr, word, bits, word_bits, _paths._host_is_x86())
    elif bits == 8:
        blocks = _emit_expand(builder, cptr, word, i32, word_bits, fill, path)
        n = min(word_bits, 16)
        vn = ir.VectorType(i32, n)
        pieces = []
        for g in range(word_bits // n):
            group = blocks
            if n < word_bits:
                group = builder.shuffle_vector(blocks, blocks, ir.Constant(vn, list(range(n * g, n * g + n))))
            for k in range(4):
                pieces.append(_emit_field(builder, group, 8 * k, 8))
    else:  # 4 or 2 bits: the blocks read as 32-bit words of 32 // bits codes each
        blocks = _emit_expand(builder, cptr, word, ir.IntType(4 * bits), word_bits, fill, path)
        words32 = builder.bitcast(blocks, ir.VectorType(i32, word_bits * bits // 8))
        pieces = [_emit_field(builder, words32, bits * m, bits) for m in range(32 // bits)]
    while len(pieces) > 1:
        n = pieces[0].type.count
        pieces = [
            builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, 2 * n), list(range(2 * n))))
            for a, b in zip(pieces[0::2], pieces[1::2], strict=True)
        ]
    vf = ir.VectorType(ir.FloatType(), lanes)
    biased = builder.bitcast(pieces[0], vf)  # 2**23 + code, exactly
    return builder.fsub(biased, ir.Constant(vf, [float((1 << 23) + z)] * lanes))


def _emit_field(builder: Any, words: Any, shift: int, width: int) -> Any:
    """IR for ``(words >> shift) & (2**width - 1) | 0x4B000000``: each lane's field as the
    bits of the float ``2**23 + field`` (its mantissa's low bits), so that one exact
    subtraction turns it into a centred float. A shift and an and-or (one ``vpternlogd``
    on AVX-512) per vector instead of a shift pair and an int-to-float conversion: the
    conversions and shifts all ran on one execution port of the x86 CPUs measured."""
    vn = words.type
    n = vn.count
    field = words
    if shift:
        field = builder.lshr(field, ir.Constant(vn, [shift] * n))
    if shift + width < 32:
        field = builder.and_(field, ir.Constant(vn, [(1 << width) - 1] * n))
    return builder.or_(field, ir.Constant(vn, [0x4B000000] * n))


def _emit_unstride(builder: Any, strided: Any, bits: int, word_bits: int, path: int) -> Any:
    """IR for the <4W x float> vector in column order from one in ``_strided_order``."""
    order = _strided_order(bits, word_bits, path)
    position = [0] * len(order)
    for p, lane in enumerate(order):
        position[lane] = p
    return builder.shuffle_vector(
        strided, strided, ir.Constant(ir.VectorType(ir.IntType(32), len(order)), position)
    )


def _emit_block_spread(builder: Any, by_block: Any, bits: int, word_bits: int, path: int) -> Any:
    """IR for a <4W x float> vector in ``_strided_order`` holding each lane's block's
    value of ``by_block`` (<W x float>)."""
    blocks = [lane // 4 for lane in _strided_order(bits, word_bits, path)]
    return builder.shuffle_vector(
        by_block, by_block, ir.Constant(ir.VectorType(ir.IntType(32), len(blocks)), blocks)
    )


def _centred_offset(builder: Any, s: Any, o: Any, bits: int) -> Any:
    """IR for ``o + 2**(bits-1) * s`` (one rounding): the offset of centred codes."""
    f32 = ir.FloatType()
    return _call(builder, "llvm.fma.f32", f32, [ir.Constant(f32, float(1 << (bits - 1))), s, o])


def _emit_word_decode(
    builder: Any, acc: Any, cptr: Any, word: Any, s: Any, o: Any, bits: int, word_bits: int, path: int
) -> Any:
    """IR for ``acc`` (a <4W x float> vector) plus the decoded blocks of one bitmap word:
    each kept lane adds ``fma(float(code - z), s, o + z * s)``, a pruned lane adds nothing
    (a masked add)."""
    lanes = 4 * word_bits
    vf = ir.VectorType(ir.FloatType(), lanes)
    values = _emit_strided_codes(builder, cptr, word, bits, word_bits, path)
    offset = _splat(builder, _centred_offset(builder, s, o, bits), vf)
    decoded = _emit_unstride(
        builder, _emit_scaled_sum(builder, offset, values, _splat(builder, s, vf)), bits, word_bits, path
    )
    kept = builder.bitcast(
        builder.trunc(word, ir.IntType(word_bits)), ir.VectorType(ir.IntType(1), word_bits)
    )
    lane_kept = builder.shuffle_vector(
        kept, kept, ir.Constant(ir.VectorType(ir.IntType(32), lanes), [i // 4 for i in range(lanes)])
    )
    return builder.select(lane_kept, builder.fadd(acc, decoded), acc)


def _emit_scaled_sum(builder: Any, total: Any, values: Any, scale: Any) -> Any:
    """IR for ``total + values * scale`` with one rounding per lane (an FMA)."""
    return _call(builder, f"llvm.fma.v{total.type.count}f32", total.type, [values, scale, total])


def _word_decode_intrinsic(bits: int, word_bits: int) -> Any:
    """``acc[col:col+4W] += decoded blocks of one bitmap word`` (rows of several words)."""
    lanes = 4 * word_bits

    @intrinsic
    def decode_word(
        typingctx: Any, acc: Any, col: Any, codes: Any, pos: Any, word: Any, s: Any, o: Any, path: Any
    ) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            accty, _, codesty, _, _, _, _, _ = signature.args
            pos, word, s, o = args[3:7]
            codes = context.make_array(codesty)(context, builder, args[2])
            per_byte = 8 // bits  # codes in a byte: a block's start is a byte's
            byte = builder.lshr(pos, ir.Constant(pos.type, per_byte.bit_length() - 1))
            cptr = cgutils.get_item_pointer(context, builder, codesty, codes, [byte], wraparound=False)
            acc_arr = context.make_array(accty)(context, builder, args[0])
            aptr = cgutils.get_item_pointer(context, builder, accty, acc_arr, [args[1]], wraparound=False)
            vptr = builder.bitcast(aptr, ir.VectorType(ir.FloatType(), lanes).as_pointer())

            chosen = _path_of(signature.args[-1])
            summed = _emit_word_decode(
                builder, builder.load(vptr, align=4), cptr, word, s, o, bits, word_bits, chosen
            )
            builder.store(summed, vptr, align=4)
            return context.get_dummy_value()

        _path_of(path)  # a marker, or a typing error here
        sig = types.void(acc, types.intp, codes, types.intp, types.int64, types.float32, types.float32, path)
        return sig, codegen

    return decode_word


def _emit_weight(builder: Any, is_weighted: Any, weights_ptr: Any, p: Any) -> Any:
    """IR for ``weights[p]`` if ``is_weighted`` (an i1) else 1.0; the array is read only
    when weighted (it is empty otherwise)."""
    f32 = ir.FloatType()
    with builder.if_else(is_weighted) as (then, otherwise):
        with then:
            read = builder.load(builder.gep(weights_ptr, [p]))
            from_read = builder.block
        with otherwise:
            from_default = builder.block
    w = builder.phi(f32)
    w.add_incoming(read, from_read)
    w.add_incoming(ir.Constant(f32, 1.0), from_default)
    return w


def _fused_bag_intrinsic(word_bits: int) -> Any:
    """``acc[:4W] = sum over lookups [lo, hi) of their 4-bit fused rows`` (float16 qparams).

    One pass in the style of FBGEMM's kernels: each iteration reads the id, adds its row
    (codes then scale and offset, one row is ``row_bytes``) to two sums held in registers
    (centred codes times scale per lane, ``_emit_strided_codes``; centred offsets, one
    number: every lane of a fused row is kept), and prefetches the row of the id
    ``FUSED_PREFETCH`` places further on (across bag boundaries, up to ``pf_end``). Ids
    must be in range (checked before). ``weights`` is read only when ``weighted``.
    """
    lanes = 4 * word_bits
    code_bytes = lanes // 2

    @intrinsic
    def decode_fused_bag(
        typingctx: Any,
        acc: Any,
        fused: Any,
        indices: Any,
        lo: Any,
        hi: Any,
        pf_end: Any,
        row_bytes: Any,
        weights: Any,
        weighted: Any,
    ) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            accty, fusedty, indty, _, _, _, _, wty, _ = signature.args
            acc_v, fused_v, ind_v, lo, hi, pf_end, row_bytes, w_v, weighted = args
            i64 = ir.IntType(64)
            i32 = ir.IntType(32)
            i8p = ir.IntType(8).as_pointer()
            f32 = ir.FloatType()
            vf = ir.VectorType(f32, lanes)
            fused_arr = context.make_array(fusedty)(context, builder, fused_v)
            ind_arr = context.make_array(indty)(context, builder, ind_v)
            w_arr = context.make_array(wty)(context, builder, w_v)
            base = builder.bitcast(fused_arr.data, i8p)
            fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
            prefetch = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
            # the bag's sum of code * scale per lane, and of the rows' offsets (every lane
            # of a fused row is kept, so one sum serves them all): added at the end
            total = cgutils.alloca_once_value(builder, ir.Constant(vf, [0.0] * lanes))
            offsets = cgutils.alloca_once_value(builder, ir.Constant(f32, 0.0))
            count = builder.sub(hi, lo)
            all_kept = ir.Constant(i64, (1 << word_bits) - 1)
            with cgutils.for_range(builder, count) as loop:
                p = builder.add(lo, loop.index)
                ahead = builder.add(p, ir.Constant(i64, FUSED_PREFETCH))
                with builder.if_then(builder.icmp_signed("<", ahead, pf_end)):
                    r_ahead = builder.load(
                        cgutils.get_item_pointer(context, builder, indty, ind_arr, [ahead], wraparound=False)
                    )
                    row_ahead = builder.gep(base, [builder.mul(r_ahead, row_bytes)])
                    for delta in (0, 63):
                        ptr = builder.gep(row_ahead, [ir.Constant(i64, delta)])
                        builder.call(
                            prefetch, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)]
                        )
                r = builder.load(
                    cgutils.get_item_pointer(context, builder, indty, ind_arr, [p], wraparound=False)
                )
                start = builder.mul(r, row_bytes)
                qptr = builder.bitcast(
                    builder.gep(base, [builder.add(start, ir.Constant(i64, code_bytes))]),
                    ir.IntType(16).as_pointer(),
                )
                s = builder.fpext(builder.bitcast(builder.load(qptr, align=1), ir.HalfType()), f32)
                o = builder.fpext(
                    builder.bitcast(
                        builder.load(builder.gep(qptr, [ir.Constant(i64, 1)]), align=1), ir.HalfType()
                    ),
                    f32,
                )
                is_weighted = builder.icmp_unsigned("!=", weighted, ir.Constant(weighted.type, 0))
                w = _emit_weight(builder, is_weighted, w_arr.data, p)
                s = builder.fmul(s, w)
                o = builder.fmul(o, w)
                row = builder.gep(base, [start])
                # every block kept: a plain load on every path
                values = _emit_strided_codes(builder, row, all_kept, 4, word_bits, ALL_KEPT)
                builder.store(
                    _emit_scaled_sum(builder, builder.load(total), values, _splat(builder, s, vf)), total
                )
                offset = _centred_offset(builder, s, o, 4)
                builder.store(builder.fadd(builder.load(offsets), offset), offsets)
            aptr = cgutils.get_item_pointer(
                context,
                builder,
                accty,
                context.make_array(accty)(context, builder, acc_v),
                [ir.Constant(i64, 0)],
            )
            summed = builder.fadd(builder.load(total), _splat(builder, builder.load(offsets), vf))
            builder.store(
                _emit_unstride(builder, summed, 4, word_bits, ALL_KEPT),
                builder.bitcast(aptr, vf.as_pointer()),
                align=4,
            )
            return context.get_dummy_value()

        sig = types.void(
            acc, fused, indices, types.intp, types.intp, types.intp, types.intp, weights, types.boolean
        )
        return sig, codegen

    return decode_fused_bag


def _load_intrinsic(kind: str) -> Any:
    """Read one little-endian value at byte ``pos`` of a uint8 array, at any alignment.

    ``kind``: "u16" / "u32" (zero-extended to int64), "f16" (widened to float32) or "f32".
    The block-sparse records hold their bitmap words and qparams at byte offsets that need
    not be aligned to the value's size.
    """
    irty = {"u16": ir.IntType(16), "u32": ir.IntType(32), "f16": ir.HalfType(), "f32": ir.FloatType()}[kind]
    ret = types.int64 if kind[0] == "u" else types.float32

    @intrinsic
    def load(typingctx: Any, ary: Any, pos: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            ptr = _item_pointer(context, builder, signature, args)
            value = builder.load(builder.bitcast(ptr, irty.as_pointer()), align=1)
            if kind[0] == "u":
                return builder.zext(value, ir.IntType(64))
            return builder.fpext(value, ir.FloatType()) if kind == "f16" else value

        return ret(ary, types.intp), codegen

    return load


_load_u16: Any = _load_intrinsic("u16")
_load_u32: Any = _load_intrinsic("u32")
_load_f16: Any = _load_intrinsic("f16")
_load_f32: Any = _load_intrinsic("f32")


def _emit_pair_start(builder: Any, row_offsets: Any, group_offsets: Any, shift: Any, r: Any) -> Any:
    """IR for the byte where the record of row ``r & ~1`` (the even row of ``r``'s pair)
    starts: ``group_offsets[r >> shift] + row_offsets[r >> 1]``."""
    i64 = ir.IntType(64)
    base = builder.load(builder.gep(group_offsets, [builder.lshr(r, shift)]))
    pair = builder.load(builder.gep(row_offsets, [builder.lshr(r, ir.Constant(i64, 1))]))
    return builder.add(base, builder.zext(pair, i64))


# lookups per chunk of the split-row decode (``_split_rows``): its second walk's state
SPLIT_CHUNK = 32


def _avx512_registers() -> bool:
    """Whether the CPU numba compiles for has AVX-512's vector and mask registers (32 of
    512 bits), which every path's code then uses, whatever its expands: what decides how
    rows are walked (``_split_rows``) and 8-bit codes moved on the generic path
    (``_byte_flow``)."""
    return _paths._host_is_x86() and _paths._host_has("avx512f")


def _split_rows(word_bits: int) -> bool:
    """Whether the one-pass block-sparse decode adds a row of ``word_bits`` blocks in two
    halves (``_block_sparse_pass_intrinsic``): rows of 32 blocks (128 values) where the CPU
    numba compiles for has no AVX-512. A row's 128 sums and 32 offset sums take 20 of
    AVX2's 16 vector registers (and 40 of NEON's 32): LLVM stored and reloaded most of
    them on every lookup. With AVX-512 they take 10 of 32."""
    return word_bits == 32 and not _avx512_registers()


def _emit_memory_barrier(builder: Any, pointers: tuple[Any, ...]) -> None:
    """An empty inline assembly statement that may read and write any memory, that of
    ``pointers`` included: values stored there before it are in memory, and loads after
    it read memory again. It emits no instruction on any CPU; it keeps LLVM from carrying
    values in registers across it (``_split_rows``: one half's sums across the other
    half's walk)."""
    fnty = ir.FunctionType(ir.VoidType(), [p.type for p in pointers])
    constraint = ",".join(["r"] * len(pointers) + ["~{memory}"])
    builder.asm(fnty, "", constraint, list(pointers), side_effect=True)


# ids ahead whose row offset (HEADER_PREFETCH) and record (RECORD_PREFETCH) the one-pass
# block-sparse decode prefetches; the pair's start is computed RECORD_PREFETCH ids ahead
# and waits in a ring of START_RING slots
HEADER_PREFETCH = 96
RECORD_PREFETCH = 48
# (START_RING, from ``_paths``: callers of ``block_sparse_run`` allocate the ring)


def _block_sparse_pass_intrinsic(bits: int, word_bits: int) -> Any:
    """``acc[:4W] = sum over lookups [lo, hi) of their rows`` (one-word (1, 4)-block rows).

    The whole lookup in one pass, FBGEMM-style. Iteration p prefetches the row offset of
    the id ``HEADER_PREFETCH`` places on; computes where the record of the id
    ``RECORD_PREFETCH`` places on starts, or for an odd row its pair's even record (from
    the line prefetched earlier), into ``ring`` and prefetches those lines (an odd row's
    ``skip`` bytes further, the mean record length); then finds its own record (an odd
    row's starts where its even neighbour's ends, by that one's bitmap word), reads it
    (bitmap word, scale, offset, codes: lines prefetched long before) and adds it to two
    sums held in registers: the centred
    codes times the scale (``_emit_strided_codes``, one FMA per 16 lanes) and the centred
    offset per block (one add masked by the bitmap word itself: pruned blocks add
    nothing). The two meet, and the columns are put back in order, once per bag. Where
    the CPU's vector registers cannot hold a row's sums (``_split_rows``), each chunk of
    lookups is walked twice, a half row each time, with the same sums bit for bit. The
    ring carries starts across the bags of a run; ``prime`` fills it for a run's first
    bag. Prefetches run across bag boundaries up to ``pf_end``. Ids must
    be in range (checked before). ``shift``, ``header`` and ``half`` come from the table's
    ``RecordShape`` (``group_shift``, ``header``, ``scale_bytes == 2``: float16 qparams).
    """

    @intrinsic
    def decode_pass(
        typingctx: Any,
        acc: Any,
        records: Any,
        row_offsets: Any,
        group_offsets: Any,
        shift: Any,
        skip: Any,
        header: Any,
        indices: Any,
        lo: Any,
        hi: Any,
        pf_end: Any,
        weights: Any,
        weighted: Any,
        half: Any,
        ring: Any,
        prime: Any,
        path: Any,
    ) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            accty, recty, offty, gty, _, _, _, indty, _, _, _, wty, _, _, ringty, _, _ = signature.args
            acc_v, rec_v, off_v, g_v, shift, skip, header, ind_v, lo, hi, pf_end = args[:11]
            w_v, weighted, half, ring_v, prime, _ = args[11:]
            i64 = ir.IntType(64)
            i32 = ir.IntType(32)
            i8p = ir.IntType(8).as_pointer()
            f32 = ir.FloatType()

            def data(ty: Any, value: Any) -> Any:
                return context.make_array(ty)(context, builder, value).data

            def const(n: int) -> Any:
                return ir.Constant(i64, n)

            rec_p = builder.bitcast(data(recty, rec_v), i8p)
            off_p = data(offty, off_v)
            g_p = data(gty, g_v)
            ind_p = data(indty, ind_v)
            w_p = data(wty, w_v)
            ring_p = data(ringty, ring_v)
            ring_mask = const(START_RING - 1)
            is_half = builder.icmp_unsigned("!=", half, ir.Constant(half.type, 0))
            is_weighted = builder.icmp_unsigned("!=", weighted, ir.Constant(weighted.type, 0))
            word_bytes = word_bits // 8
            fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
            prefetch = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")

            def fetch(ptr: Any) -> None:
                hint = [ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)]
                builder.call(prefetch, [builder.bitcast(ptr, i8p), *hint])

            def start_ahead(q: Any) -> None:
                """Pair start and parity of lookup ``q`` into ring slot ``q % START_RING``
                (``2 * start + odd``); prefetch the lines its decode reads: the pair's
                first line, and the record's from where it is expected (an odd row's
                ``skip`` bytes on). The decode's vector loads read 64 bytes from the codes
                (two of them at 8 bits, the second after the first 16 blocks' codes),
                not only the kept codes, so their lines count too: at 8 bits the third
                point covers the second load for up to 8 kept blocks in the first 16
                (measured on uniform ids: a third line at +127 instead costs 25%, none
                doubles the time)."""
                r = builder.load(builder.gep(ind_p, [q]))
                pair = _emit_pair_start(builder, off_p, g_p, shift, r)
                odd = builder.and_(r, const(1))
                slot = builder.gep(ring_p, [builder.and_(q, ring_mask)])
                builder.store(builder.or_(builder.shl(pair, const(1)), odd), slot)
                fetch(builder.gep(rec_p, [pair]))
                expected = builder.add(pair, builder.mul(odd, skip))
                for delta in (0, 63, 111) if bits == 8 else (0, 63):
                    fetch(builder.gep(rec_p, [builder.add(expected, const(delta))]))

            with builder.if_then(builder.icmp_unsigned("!=", prime, ir.Constant(prime.type, 0))):
                end = builder.add(lo, const(RECORD_PREFETCH))
                primed = builder.sub(builder.select(builder.icmp_signed("<", end, pf_end), end, pf_end), lo)
                with cgutils.for_range(builder, primed) as first_loop:
                    start_ahead(builder.add(lo, first_loop.index))

            word_ty = ir.IntType(word_bits)

            def locate(p: Any, weighted: bool) -> tuple[Any, Any, Any, Any]:
                """Lookup ``p``'s prefetches ahead, then its record: (bitmap word, scale
                times weight, centred offset times weight, i8* to its first code)."""
                ahead = builder.add(p, const(HEADER_PREFETCH))
                with builder.if_then(builder.icmp_signed("<", ahead, pf_end)):
                    r_ahead = builder.load(builder.gep(ind_p, [ahead]))
                    fetch(builder.gep(off_p, [builder.lshr(r_ahead, const(1))]))
                ahead = builder.add(p, const(RECORD_PREFETCH))
                with builder.if_then(builder.icmp_signed("<", ahead, pf_end)):
                    start_ahead(ahead)
                slot = builder.load(builder.gep(ring_p, [builder.and_(p, ring_mask)]))
                pair = builder.lshr(slot, const(1))
                first = builder.load(
                    builder.bitcast(builder.gep(rec_p, [pair]), word_ty.as_pointer()), align=1
                )
                first_kept = builder.zext(_call(builder, f"llvm.ctpop.i{word_bits}", word_ty, [first]), i64)
                first_length = builder.add(header, builder.mul(first_kept, const(4 * bits // 8)))
                start = builder.add(pair, builder.mul(builder.and_(slot, const(1)), first_length))
                rec = builder.gep(rec_p, [start])
                word = builder.load(builder.bitcast(rec, word_ty.as_pointer()), align=1)
                qp = builder.gep(rec, [const(word_bytes)])
                with builder.if_else(is_half) as (then, otherwise):
                    with then:
                        hp = builder.bitcast(qp, ir.HalfType().as_pointer())
                        s_h = builder.fpext(builder.load(hp, align=1), f32)
                        o_h = builder.fpext(builder.load(builder.gep(hp, [const(1)]), align=1), f32)
                        from_half = builder.block
                    with otherwise:
                        fp = builder.bitcast(qp, f32.as_pointer())
                        s_f = builder.load(fp, align=1)
                        o_f = builder.load(builder.gep(fp, [const(1)]), align=1)
                        from_single = builder.block
                s = builder.phi(f32)
                s.add_incoming(s_h, from_half)
                s.add_incoming(s_f, from_single)
                o = builder.phi(f32)
                o.add_incoming(o_h, from_half)
                o.add_incoming(o_f, from_single)
                if weighted:  # (unweighted: s and o as they are, what times 1.0 gave)
                    w = builder.load(builder.gep(w_p, [p]))
                    s, o = builder.fmul(s, w), builder.fmul(o, w)
                offset = _centred_offset(builder, s, o, bits)
                return word, s, offset, builder.gep(rec, [header])

            def add_row(
                total: Any, offsets: Any, codes: Any, word: Any, s: Any, offset: Any, wb: int
            ) -> None:
                """Add one row's ``wb`` blocks (``word``, an i<wb> bitmap; codes from
                ``codes``) to the sums in allocas ``total`` (<4wb x float>: the centred
                codes times the scale, one FMA per 16 lanes, in ``_strided_order``) and
                ``offsets`` (<wb x float>: the centred offset per block, one add masked by
                the bitmap word itself: pruned blocks add nothing)."""
                values = _emit_strided_codes(builder, codes, builder.zext(word, i64), bits, wb, chosen)
                vrow = ir.VectorType(f32, 4 * wb)
                builder.store(
                    _emit_scaled_sum(builder, builder.load(total), values, _splat(builder, s, vrow)), total
                )
                kept = builder.bitcast(word, ir.VectorType(ir.IntType(1), wb))
                by_block = builder.load(offsets)
                added = builder.fadd(by_block, _splat(builder, offset, ir.VectorType(f32, wb)))
                builder.store(builder.select(kept, added, by_block), offsets)

            def sums(wb: int) -> tuple[Any, Any]:
                """Zeroed allocas for ``add_row``'s two sums."""
                return (
                    cgutils.alloca_once_value(
                        builder, ir.Constant(ir.VectorType(f32, 4 * wb), [0.0] * 4 * wb)
                    ),
                    cgutils.alloca_once_value(builder, ir.Constant(ir.VectorType(f32, wb), [0.0] * wb)),
                )

            def finish(total: Any, offsets: Any, wb: int, col: int) -> None:
                """``acc[col:col+4wb]`` = the sums met: the offsets spread to their
                blocks' lanes, the columns put back in order."""
                aptr = builder.gep(data(accty, acc_v), [const(col)])
                by_lane = _emit_block_spread(builder, builder.load(offsets), bits, wb, chosen)
                summed = builder.fadd(builder.load(total, align=4), by_lane)
                vrow = ir.VectorType(f32, 4 * wb)
                builder.store(
                    _emit_unstride(builder, summed, bits, wb, chosen),
                    builder.bitcast(aptr, vrow.as_pointer()),
                    align=4,
                )

            def whole_rows(weighted: bool) -> None:
                """The bag in one walk, a row's sums in registers."""
                total, offsets = sums(word_bits)
                with cgutils.for_range(builder, builder.sub(hi, lo)) as loop:
                    word, s, offset, codes = locate(builder.add(lo, loop.index), weighted)
                    add_row(total, offsets, codes, word, s, offset, word_bits)
                finish(total, offsets, word_bits, 0)

            def half_rows(weighted: bool) -> None:
                """The bag in halves of a row (``_split_rows``): per chunk of
                ``SPLIT_CHUNK`` lookups, a first walk locates each record, adds its first
                16 blocks and keeps where the rest start (with the word's upper half,
                scale and offset); a second walk adds those. Each half's sums fit in the
                registers, where a whole row's were stored and reloaded on every lookup;
                between walks they wait in memory (an empty asm statement keeps LLVM from
                carrying both halves in registers through both walks). Each lane adds
                the same values in the same order as ``whole_rows``: the same sums, bit
                for bit."""
                hb = word_bits // 2
                block_bytes = 4 * bits // 8
                halves = [sums(hb), sums(hb)]
                waiting = [sums(hb) for _ in range(2)]  # (allocas the barrier keeps in memory)
                kept_codes = cgutils.alloca_once(builder, i8p, size=SPLIT_CHUNK)
                kept_words = cgutils.alloca_once(builder, i64, size=SPLIT_CHUNK)
                kept_scales = cgutils.alloca_once(builder, f32, size=SPLIT_CHUNK)
                kept_offsets = cgutils.alloca_once(builder, f32, size=SPLIT_CHUNK)

                def park(h: int) -> None:
                    """Half ``h``'s sums into memory, out of the registers."""
                    for held, kept in zip(halves[h], waiting[h], strict=True):
                        builder.store(builder.load(held), kept)
                    _emit_memory_barrier(builder, waiting[h])

                def unpark(h: int) -> None:
                    for held, kept in zip(halves[h], waiting[h], strict=True):
                        builder.store(builder.load(kept), held)

                n = builder.sub(hi, lo)
                chunks = builder.sdiv(builder.add(n, const(SPLIT_CHUNK - 1)), const(SPLIT_CHUNK))
                park(1)
                with cgutils.for_range(builder, chunks) as chunk:
                    c0 = builder.add(lo, builder.mul(chunk.index, const(SPLIT_CHUNK)))
                    left = builder.sub(hi, c0)
                    m = builder.select(
                        builder.icmp_signed("<", left, const(SPLIT_CHUNK)), left, const(SPLIT_CHUNK)
                    )
                    with cgutils.for_range(builder, m) as first_walk:
                        j = first_walk.index
                        word, s, offset, codes = locate(builder.add(c0, j), weighted)
                        wide = builder.zext(word, i64)
                        add_row(*halves[0], codes, builder.trunc(wide, ir.IntType(hb)), s, offset, hb)
                        builder.store(
                            _byte_start(builder, codes, wide, hb, block_bytes), builder.gep(kept_codes, [j])
                        )
                        builder.store(builder.lshr(wide, const(hb)), builder.gep(kept_words, [j]))
                        builder.store(s, builder.gep(kept_scales, [j]))
                        builder.store(offset, builder.gep(kept_offsets, [j]))
                    park(0)
                    unpark(1)
                    with cgutils.for_range(builder, m) as second_walk:
                        j = second_walk.index
                        add_row(
                            *halves[1],
                            builder.load(builder.gep(kept_codes, [j])),
                            builder.trunc(builder.load(builder.gep(kept_words, [j])), ir.IntType(hb)),
                            builder.load(builder.gep(kept_scales, [j])),
                            builder.load(builder.gep(kept_offsets, [j])),
                            hb,
                        )
                    park(1)
                    unpark(0)
                for h in range(2):
                    finish(*halves[h], hb, 4 * hb * h)

            chosen = _path_of(signature.args[-1])
            walk = half_rows if _split_rows(word_bits) else whole_rows
            with builder.if_else(is_weighted) as (with_weights, without):  # a walk for each
                with with_weights:
                    walk(True)
                with without:
                    walk(False)
            return context.get_dummy_value()

        sig = types.void(
            acc, records, row_offsets, group_offsets, types.int64, types.int64, types.int64, indices,
            types.intp, types.intp, types.intp, weights, types.boolean, types.boolean, ring, types.boolean,
            path,
        )  # fmt: skip
        _path_of(path)  # a marker, or a typing error here
        return sig, codegen

    return decode_pass


_decode_pass_8x8 = _block_sparse_pass_intrinsic(8, 8)
_decode_pass_8x16 = _block_sparse_pass_intrinsic(8, 16)
_decode_pass_8x32 = _block_sparse_pass_intrinsic(8, 32)
_decode_pass_4x8 = _block_sparse_pass_intrinsic(4, 8)
_decode_pass_4x16 = _block_sparse_pass_intrinsic(4, 16)
_decode_pass_4x32 = _block_sparse_pass_intrinsic(4, 32)
_decode_pass_2x8 = _block_sparse_pass_intrinsic(2, 8)
_decode_pass_2x16 = _block_sparse_pass_intrinsic(2, 16)
_decode_pass_2x32 = _block_sparse_pass_intrinsic(2, 32)


# ids ahead whose fused rows are prefetched (FBGEMM's kernels use 16)
FUSED_PREFETCH = 16
_decode_fused_4x8 = _fused_bag_intrinsic(8)
_decode_fused_4x16 = _fused_bag_intrinsic(16)
_decode_fused_4x32 = _fused_bag_intrinsic(32)


_decode_word_8x8 = _word_decode_intrinsic(8, 8)
_decode_word_8x16 = _word_decode_intrinsic(8, 16)
_decode_word_8x32 = _word_decode_intrinsic(8, 32)
_decode_word_4x8 = _word_decode_intrinsic(4, 8)
_decode_word_4x16 = _word_decode_intrinsic(4, 16)
_decode_word_4x32 = _word_decode_intrinsic(4, 32)
_decode_word_2x8 = _word_decode_intrinsic(2, 8)
_decode_word_2x16 = _word_decode_intrinsic(2, 16)
_decode_word_2x32 = _word_decode_intrinsic(2, 32)


@numba.njit(cache=True, inline="always")
def _split_bags(bags: int, threads: int) -> tuple[int, int]:
    """(runs, bags per run): one contiguous run of bags per thread."""
    runs = max(1, min(bags, threads))
    return runs, -(-bags // runs)


@numba.njit(cache=True, inline="always")
def _divide(acc: np.ndarray, count: int) -> None:
    """``acc /= count`` (a mean bag), for ``count > 0``."""
    if count > 0:
        c = np.float32(count)
        for col in range(acc.shape[0]):
            acc[col] /= c


@numba.njit(cache=True, inline="always")
def _pair_start(row_offsets: np.ndarray, group_offsets: np.ndarray, shift: int, r: int) -> int:
    """Byte where the record of row ``r & ~1`` starts (see ``layouts.block_sparse``)."""
    return group_offsets[np.uint64(r >> shift)] + np.int64(row_offsets[np.uint64(r >> 1)])


@numba.njit(cache=True, inline="always")
def _read_word(records: np.ndarray, pos: int, word_bits: int) -> int:
    """The bitmap word of ``word_bits`` bits at byte ``pos``."""
    if word_bits == 32:
        return _load_u32(records, pos)
    if word_bits == 16:
        return _load_u16(records, pos)
    return int(records[np.uint64(pos)])


@numba.njit(cache=True, inline="always")
def _read_qparam(records: np.ndarray, pos: int, half: bool) -> np.float32:
    """The float16 (``half``) or float32 value at byte ``pos``, as float32."""
    if half:
        return _load_f16(records, pos)
    return _load_f32(records, pos)


@numba.njit(cache=True, inline="always")
def _record_start(
    records: np.ndarray,
    row_offsets: np.ndarray,
    group_offsets: np.ndarray,
    shape: tuple[int, ...],
    r: int,
) -> int:
    """Byte where row ``r``'s record starts: its pair's start, plus for an odd row the
    length of the even row's record (``RecordShape.length`` of its bitmap's kept blocks)."""
    _, width, bits, word_bits, words, _, _, header, group_shift = shape
    start = _pair_start(row_offsets, group_offsets, group_shift, r)
    if r & 1:
        kept = 0
        for k in range(words):
            kept += _popcount(_read_word(records, start + k * (word_bits // 8), word_bits))
        start += header + (kept * width * bits + 7) // 8
    return start


@numba.njit(cache=True, inline="always")
def _decode_bag(
    records: np.ndarray,
    row_offsets: np.ndarray,
    group_offsets: np.ndarray,
    shape: tuple[int, ...],
    skip: int,
    dim: int,
    vector: bool,
    path: int,
    indices: np.ndarray,
    lo: int,
    hi: int,
    pf_end: int,
    weights: np.ndarray,
    weighted: bool,
    acc: np.ndarray,
) -> None:
    """``acc = sum over lookups [lo, hi) of their decoded rows`` (kept blocks only).

    The path for rows of several bitmap words (whole words decoded as vectors) and for
    CPUs or shapes without the vector decode (the set bits walked). Each iteration
    prefetches the row offset of the id ``HEADER_PREFETCH`` places on and the record of
    the id ``RECORD_PREFETCH`` places on (up to ``pf_end``). Ids must be in range.
    """
    _, width, bits, word_bits, words, scale_bytes, qparams_at, header, group_shift = shape
    half = scale_bytes == 2
    per_byte = 8 // bits
    shift_codes = 0 if bits == 8 else (1 if bits == 4 else 2)
    code_mask = (1 << bits) - 1
    word_bytes = word_bits // 8
    acc[:] = 0.0
    for p in range(lo, hi):
        if p + HEADER_PREFETCH < pf_end:
            _prefetch(row_offsets, indices[np.uint64(p + HEADER_PREFETCH)] >> 1)
        if p + RECORD_PREFETCH < pf_end:
            r_ahead = indices[np.uint64(p + RECORD_PREFETCH)]
            ahead = _pair_start(row_offsets, group_offsets, group_shift, r_ahead)
            _prefetch(records, ahead)
            ahead += (r_ahead & 1) * skip  # where an odd row's record is expected
            _prefetch(records, ahead)
            _prefetch(records, ahead + 63)
            _prefetch(records, ahead + 127)
        r = indices[np.uint64(p)]
        a = _record_start(records, row_offsets, group_offsets, shape, r)
        s = _read_qparam(records, a + qparams_at, half)
        o = _read_qparam(records, a + qparams_at + scale_bytes, half)
        if weighted:
            s = s * weights[np.uint64(p)]
            o = o * weights[np.uint64(p)]
        c = (a + header) * per_byte  # code index of the row's first kept code
        for k in range(words):
            word = _read_word(records, a + k * word_bytes, word_bits)
            if vector:
                col = k * word_bits * 4
                if bits == 8:
                    if word_bits == 32:
                        _decode_word_8x32(acc, col, records, c, word, s, o, path)
                    elif word_bits == 16:
                        _decode_word_8x16(acc, col, records, c, word, s, o, path)
                    else:
                        _decode_word_8x8(acc, col, records, c, word, s, o, path)
                elif bits == 4:
                    if word_bits == 32:
                        _decode_word_4x32(acc, col, records, c, word, s, o, path)
                    elif word_bits == 16:
                        _decode_word_4x16(acc, col, records, c, word, s, o, path)
                    else:
                        _decode_word_4x8(acc, col, records, c, word, s, o, path)
                else:
                    if word_bits == 32:
                        _decode_word_2x32(acc, col, records, c, word, s, o, path)
                    elif word_bits == 16:
                        _decode_word_2x16(acc, col, records, c, word, s, o, path)
                    else:
                        _decode_word_2x8(acc, col, records, c, word, s, o, path)
                c += _popcount(word) * 4
                continue
            while word != 0:  # walk the set bits
                blk = k * word_bits + _trailing_zeros(word)
                word &= word - 1
                col0 = blk * width
                if width == 4 and col0 + 4 <= dim:
                    if bits == 8:
                        _add_block4_u8(acc, col0, records, c, s, o)
                    elif bits == 4:
                        _add_block4_u4(acc, col0, records, c, s, o)
                    else:
                        _add_block4_u2(acc, col0, records, c, s, o)
                else:
                    for j in range(min(width, dim - col0)):
                        pos = c + j
                        if bits == 8:
                            code = records[np.uint64(pos)]
                        else:
                            byte = records[np.uint64(pos >> shift_codes)]
                            code = (byte >> ((pos & (per_byte - 1)) * bits)) & code_mask
                        acc[col0 + j] += np.float32(code) * s + o
                c += width


@numba.njit(cache=True, inline="always")
def _count_bad(offsets: np.ndarray, indices: np.ndarray, b0: int, b1: int, rows: int) -> int:
    """How many ids of bags [b0, b1) are outside ``[0, rows)``."""
    bad = 0
    if b0 < b1:
        for p in range(offsets[b0], offsets[b1]):
            r = indices[p]
            if r < 0 or r >= rows:
                bad += 1
    return bad


@numba.njit(cache=True, inline="always")
def _block_sparse_bags(
    records: np.ndarray,
    row_offsets: np.ndarray,
    group_offsets: np.ndarray,
    shape: tuple[int, ...],
    dim: int,
    skip: int,
    vector: bool,
    path: int,
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
) -> None:
    """Bags [b0, b1) of ``block_sparse_bag`` (ids checked before) with the caller's
    scratch: ``ring`` (int64, ``START_RING``; zeroed, so that a slot read before it is
    written decodes record 0, not wild memory) and ``acc`` (float32, ``dim``; private,
    so the compiler sees no aliasing)."""
    _, _, bits, word_bits, words, scale_bytes, _, header, group_shift = shape
    half = scale_bytes == 2
    one_pass = vector and words == 1
    pf_end = offsets[b1]
    for b in range(b0, b1):
        lo = offsets[b]
        hi = offsets[b + 1]
        if one_pass:
            row = out[b]  # the sum is stored straight into the output row
            args = (row, records, row_offsets, group_offsets, group_shift, skip, header, indices, lo, hi)
            if bits == 8:
                if word_bits == 32:
                    _decode_pass_8x32(*args, pf_end, weights, weighted, half, ring, b == b0, path)
                elif word_bits == 16:
                    _decode_pass_8x16(*args, pf_end, weights, weighted, half, ring, b == b0, path)
                else:
                    _decode_pass_8x8(*args, pf_end, weights, weighted, half, ring, b == b0, path)
            elif bits == 4:
                if word_bits == 32:
                    _decode_pass_4x32(*args, pf_end, weights, weighted, half, ring, b == b0, path)
                elif word_bits == 16:
                    _decode_pass_4x16(*args, pf_end, weights, weighted, half, ring, b == b0, path)
                else:
                    _decode_pass_4x8(*args, pf_end, weights, weighted, half, ring, b == b0, path)
            else:
                if word_bits == 32:
                    _decode_pass_2x32(*args, pf_end, weights, weighted, half, ring, b == b0, path)
                elif word_bits == 16:
                    _decode_pass_2x16(*args, pf_end, weights, weighted, half, ring, b == b0, path)
                else:
                    _decode_pass_2x8(*args, pf_end, weights, weighted, half, ring, b == b0, path)
        else:
            _decode_bag(
                records, row_offsets, group_offsets, shape, skip, dim, vector, path, indices, lo,
                hi, pf_end, weights, weighted, acc,
            )  # fmt: skip
            for col in range(dim):  # a loop, not a slice copy: nothing here may allocate
                out[b, col] = acc[col]
        if mean:
            _divide(out[b], hi - lo)


@numba.njit(cache=True, parallel=True, nogil=True)
def block_sparse_bag(
    records: np.ndarray,
    row_offsets: np.ndarray,
    group_offsets: np.ndarray,
    shape: tuple[int, ...],
    rows: int,
    dim: int,
    skip: int,
    vector: bool,
    path: int,
    indices: np.ndarray,
    offsets: np.ndarray,
    weights: np.ndarray,
    weighted: bool,
    mean: bool,
    threads: int,
    out: np.ndarray,
) -> int:
    """``out[b] = sum / mean over the bag of decoded rows`` (kept blocks only).

    The table is the block-sparse layout's three arrays (``layouts.block_sparse``): the
    records as bytes, the uint16 pair offsets and the int64 group offsets, for ``rows``
    rows; ``shape`` is its ``RecordShape`` as a plain tuple (the kernels unpack its fields
    in their order) and ``skip`` the mean record length (where an odd row's record is
    expected, for prefetching).
    ``vector``: decode whole bitmap words with vector expands (needs ``block_width == 4``,
    ``bits`` 8 or 4 and ``dim == 4 * word_bits * words``); else walk the set bits.
    ``path``: the expands' kernel path, one of ``PATH_MARKERS``. The lookups are
    ``lookup.Bags``' fields, from ``indices`` to ``mean``.

    Each thread takes a contiguous run of bags; its ids are checked first. One-word rows
    with the vector decode go through ``_block_sparse_pass_intrinsic`` (one pass per bag,
    the sum in registers), other rows through ``_decode_bag``. Returns the number of
    out-of-range indices (then nothing is computed: the caller raises).
    """
    bags = offsets.shape[0] - 1
    runs, per_run = _split_bags(bags, threads)
    bad = np.zeros(runs, dtype=np.int64)
    for run in numba.prange(runs):
        b0 = run * per_run
        b1 = min(bags, b0 + per_run)
        bad[run] = _count_bad(offsets, indices, b0, b1, rows)
        if bad[run] or b0 >= b1:
            continue
        ring = np.zeros(START_RING, dtype=np.int64)
        acc = np.empty(dim, dtype=np.float32)
        _block_sparse_bags(
            records, row_offsets, group_offsets, shape, dim, skip, vector, path, indices, offsets,
            weights, weighted, mean, b0, b1, ring, acc, out,
        )  # fmt: skip
    return int(bad.sum())


@numba.njit(cache=True, nogil=True)
def block_sparse_run(
    records: np.ndarray,
    row_offsets: np.ndarray,
    group_offsets: np.ndarray,
    shape: tuple[int, ...],
    rows: int,
    dim: int,
    skip: int,
    vector: bool,
    path: int,
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
    """One thread's run of ``block_sparse_bag``: bags [b0, b1) into ``out``'s rows, with
    the caller's scratch (``ring``: START_RING zeroed int64; ``acc``: ``dim`` float32).
    Nothing here allocates or raises, so it compiles ahead of time (``_aot``); the caller
    splits the bags across its threads. Returns the run's out-of-range ids (then nothing
    is computed)."""
    bad = _count_bad(offsets, indices, b0, b1, rows)
    if bad == 0 and b0 < b1:
        _block_sparse_bags(
            records, row_offsets, group_offsets, shape, dim, skip, vector, path, indices, offsets,
            weights, weighted, mean, b0, b1, ring, acc, out,
        )  # fmt: skip
    return bad


@numba.njit(cache=True, inline="always")
def _fused_bags(
    fused: np.ndarray,
    row_bytes: int,
    dim: int,
    indices: np.ndarray,
    offsets: np.ndarray,
    weights: np.ndarray,
    weighted: bool,
    mean: bool,
    b0: int,
    b1: int,
    out: np.ndarray,
) -> None:
    """Bags [b0, b1) of ``fused_bag`` (ids checked before)."""
    pf_end = offsets[b1]
    for b in range(b0, b1):
        lo = offsets[b]
        hi = offsets[b + 1]
        acc = out[b]  # the sum is stored straight into the output row
        if dim == 128:
            _decode_fused_4x32(acc, fused, indices, lo, hi, pf_end, row_bytes, weights, weighted)
        elif dim == 64:
            _decode_fused_4x16(acc, fused, indices, lo, hi, pf_end, row_bytes, weights, weighted)
        else:
            _decode_fused_4x8(acc, fused, indices, lo, hi, pf_end, row_bytes, weights, weighted)
        if mean:
            _divide(acc, hi - lo)


@numba.njit(cache=True, parallel=True, nogil=True)
def fused_bag(
    fused: np.ndarray,
    row_bytes: int,
    dim: int,
    indices: np.ndarray,
    offsets: np.ndarray,
    weights: np.ndarray,
    weighted: bool,
    mean: bool,
    threads: int,
    out: np.ndarray,
) -> int:
    """Sum / mean bags of a 4-bit fused-row table (float16 qparams; see ``layouts.base``).

    The vector decode of ``block_sparse_bag`` with every block kept, in one pass per bag
    (``_fused_bag_intrinsic``), each thread on a contiguous run of bags. For ``dim`` 32, 64
    or 128 on any CPU (every block is kept, so the decode needs no expand and no x86
    intrinsic: one code for every kernel path): it serves 4-bit tables on several threads, where torch's
    FBGEMM 4-bit kernel runs on one. ``fused`` is the table flattened to bytes; the
    lookups are ``lookup.Bags``' fields, from ``indices`` to ``mean``. Returns the number
    of out-of-range indices (then nothing is computed: the caller raises).
    """
    rows = fused.shape[0] // row_bytes
    bags = offsets.shape[0] - 1
    runs, per_run = _split_bags(bags, threads)
    bad = np.zeros(runs, dtype=np.int64)
    for run in numba.prange(runs):
        b0 = run * per_run
        b1 = min(bags, b0 + per_run)
        bad[run] = _count_bad(offsets, indices, b0, b1, rows)
        if bad[run] or b0 >= b1:
            continue
        _fused_bags(fused, row_bytes, dim, indices, offsets, weights, weighted, mean, b0, b1, out)
    return int(bad.sum())


@numba.njit(cache=True, nogil=True)
def fused_run(
    fused: np.ndarray,
    row_bytes: int,
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
    """One thread's run of ``fused_bag`` (bags [b0, b1)), as ``block_sparse_run`` (the
    scratch arrays are not used: every run kernel takes the same arguments)."""
    rows = fused.shape[0] // row_bytes
    bad = _count_bad(offsets, indices, b0, b1, rows)
    if bad == 0 and b0 < b1:
        _fused_bags(fused, row_bytes, dim, indices, offsets, weights, weighted, mean, b0, b1, out)
    return bad


@numba.njit(cache=True, inline="always")
def _packed_rows_bags(
    fused: np.ndarray,
    row_bytes: int,
    dim: int,
    bits: int,
    half: bool,
    indices: np.ndarray,
    offsets: np.ndarray,
    weights: np.ndarray,
    weighted: bool,
    mean: bool,
    b0: int,
    b1: int,
    out: np.ndarray,
) -> None:
    """Bags [b0, b1) of ``packed_rows_bag`` (ids checked before): each row's codes times
    its scale plus its offset (both times the id's weight), summed into the bag's row.
    (Byte positions are unsigned: numba then checks no negative index, and the loops
    over a row vectorize.)"""
    packed = (dim * bits + 7) // 8
    step = 2 if half else 4
    pairs, quads = dim // 2, dim // 4
    pf_end = offsets[b1]
    for b in range(b0, b1):
        acc = out[b]
        for j in range(dim):
            acc[j] = 0.0
        lo = offsets[b]
        hi = offsets[b + 1]
        for p in range(lo, hi):
            if p + FUSED_PREFETCH < pf_end:  # the row of the id FUSED_PREFETCH on, first and last line
                ahead = indices[np.uint64(p + FUSED_PREFETCH)] * row_bytes
                _prefetch(fused, ahead)
                _prefetch(fused, ahead + row_bytes - 1)
            at = indices[np.uint64(p)] * row_bytes
            w = weights[p] if weighted else np.float32(1.0)
            s = _read_qparam(fused, at + packed, half) * w
            o = _read_qparam(fused, at + packed + step, half) * w
            r = np.uint64(at)
            row = fused[r : r + np.uint64(packed)]
            if bits == 8:
                for j in range(dim):
                    acc[j] += np.float32(row[j]) * s + o
            elif bits == 4:
                for k in range(pairs):
                    byte = row[k]
                    acc[2 * k] += np.float32(byte & 15) * s + o
                    acc[2 * k + 1] += np.float32(byte >> 4) * s + o
                if dim % 2:
                    acc[dim - 1] += np.float32(row[pairs] & 15) * s + o
            else:
                for k in range(quads):
                    byte = row[k]
                    acc[4 * k] += np.float32(byte & 3) * s + o
                    acc[4 * k + 1] += np.float32((byte >> 2) & 3) * s + o
                    acc[4 * k + 2] += np.float32((byte >> 4) & 3) * s + o
                    acc[4 * k + 3] += np.float32(byte >> 6) * s + o
                for j in range(4 * quads, dim):
                    acc[j] += np.float32((row[j // 4] >> (2 * (j % 4))) & 3) * s + o
        if mean:
            _divide(acc, hi - lo)


@numba.njit(cache=True, parallel=True, nogil=True)
def packed_rows_bag(
    fused: np.ndarray,
    row_bytes: int,
    dim: int,
    bits: int,
    half: bool,
    indices: np.ndarray,
    offsets: np.ndarray,
    weights: np.ndarray,
    weighted: bool,
    mean: bool,
    threads: int,
    out: np.ndarray,
) -> int:
    """Sum / mean bags of fused rows (``layouts.base``: codes of ``bits`` 8, 4 or 2, low
    bits first, then scale and offset in float16 where ``half``, else float32) of any
    width: the formats FBGEMM's kernels do not take (8-bit rows with float16 qparams,
    4- and 2-bit rows with float32 ones). Plain loops, no intrinsic: every kernel path
    and CPU. Arguments and result as ``fused_bag``'s."""
    rows = fused.shape[0] // row_bytes
    bags = offsets.shape[0] - 1
    runs, per_run = _split_bags(bags, threads)
    bad = np.zeros(runs, dtype=np.int64)
    for run in numba.prange(runs):
        b0 = run * per_run
        b1 = min(bags, b0 + per_run)
        bad[run] = _count_bad(offsets, indices, b0, b1, rows)
        if bad[run] or b0 >= b1:
            continue
        _packed_rows_bags(
            fused, row_bytes, dim, bits, half, indices, offsets, weights, weighted, mean, b0, b1, out
        )
    return int(bad.sum())


@numba.njit(cache=True, nogil=True)
def packed_rows_run(
    fused: np.ndarray,
    row_bytes: int,
    dim: int,
    bits: int,
    half: bool,
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
    """One thread's run of ``packed_rows_bag`` (bags [b0, b1)), as ``fused_run``."""
    rows = fused.shape[0] // row_bytes
    bad = _count_bad(offsets, indices, b0, b1, rows)
    if bad == 0 and b0 < b1:
        _packed_rows_bags(
            fused, row_bytes, dim, bits, half, indices, offsets, weights, weighted, mean, b0, b1, out
        )
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
            out[i] = row_rank[r >> 3] + _popcount(byte & ((1 << bit) - 1))
        else:
            out[i] = zero_row
    return bad


@numba.njit(cache=True, nogil=True)
def offsets_status(values: np.ndarray, total: int, include_last: bool) -> int:
    """What is wrong with int64 bag bounds ``values`` over ``total`` ids (the given
    offsets, then ``total`` unless ``include_last``), in ``nn.EmbeddingBag``'s order of
    checks: 1, offsets were given and the first is not 0; 2, a bound below the one before
    it or the last above ``total``; 0, nothing. (One compiled pass: numpy's comparisons
    cost a small batch's lookup more than its kernel.)"""
    n = values.shape[0]
    if n > (0 if include_last else 1) and values[0] != 0:
        return 1
    for i in range(1, n):
        if values[i] < values[i - 1]:
            return 2
    if n and values[n - 1] > total:
        return 2
    return 0


@numba.njit(cache=True, nogil=True)
def offsets_bounds(given: np.ndarray, total: int, out: np.ndarray) -> int:
    """``out`` = offsets ``given`` then ``total`` (``out`` holds one more), and
    ``offsets_status`` of those bounds (``include_last`` False), in one pass: the bag
    bounds of every large lookup, made where the check reads them."""
    n = given.shape[0]
    if n and given[0] != 0:
        return 1
    previous = 0
    for i in range(n):
        value = given[i]
        out[i] = value
        if value < previous:
            return 2
        previous = value
    out[n] = total
    return 2 if previous > total else 0


# several processes may compile into one disk cache at once (see ``_kernel_cache``)
_kernel_cache.guard(
    block_sparse_bag,
    block_sparse_run,
    fused_bag,
    fused_run,
    packed_rows_bag,
    packed_rows_run,
    remap_rows,
    offsets_status,
    offsets_bounds,
)
