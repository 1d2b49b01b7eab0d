"""Block-sparse layout: one record per row, holding its bitmap, qparams and kept codes.

Memory layout (N rows, D columns, block width w, nb = ceil(D / w) blocks per row; bitmap
words of W = 8, 16 or 32 bits, the smallest that holds nb bits, else 32; nw = ceil(nb / W)
words per row; s = bytes of the scale dtype; G rows per group)::

    records        uint8 [R + 64]          the rows' records back to back, then 64 zero
                                           bytes (a vector load from any record's codes
                                           stays inside the tensor); row r's record is
                                           nw bitmap words, little-endian (bit k % W of
                                             word k // W set: block k kept)
                                           scale, offset (s bytes each)
                                           the kept blocks' codes packed from the next
                                             byte: code j at byte j*bits//8, bit
                                             (j*bits)%8, padded to a whole byte (a kept
                                             partial edge block is padded to w codes)
    row_offsets    uint16 [ceil(N/2)]      where row 2i's record starts, in bytes from
                                           the start of its group's first record; row
                                           2i+1's record follows row 2i's
    group_offsets  int64 [ceil(N/G) + 1]   where row G*g's record starts; the last is R

G is the largest power of two from 2 to 256 for which G - 2 records of the largest size
still fit a uint16 offset, so it follows from (D, w, bits, s) alone. An even row r starts
at ``group_offsets[r // G] + row_offsets[r // 2]``, an odd row where its even neighbour's
record ends (known from that record's bitmap): a lookup reads one offset, then one record
whose header sits next to its codes (one to three cache lines at 128 columns; an odd
row's usually shares one with its neighbour's), with no search. One offset per pair of
rows rather than per row saves a byte a row, which at 4 bits is what keeps the table
near half the 8-bit one. Pruned blocks are simply absent, so they decode to exactly 0.0
and the bytes fall with sparsity: at 8 bits, 80% of (1, 4) blocks pruned and D = 128
cost ``0.2 * 128 + 4 + 8 + 1`` bytes per row (codes, bitmap, qparams, offset).
Sum/mean bags run in a numba kernel on CPU (``_kernels.block_sparse_bag``: whole bitmap
words decoded at once where D = 4 * W * nw, with the expands of the kernel path, AVX-512,
AVX2 or generic; else a walk over the set bits); other devices (and max bags) decode rows
with plain torch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from .._aot import KernelRef
from .._buffers import empty
from .._parallel import parallel_call, split_call
from ._paths import vector_decode_supported
from .base import (
    EncodedTable,
    FormatError,
    Piece,
    QuantizedTable,
    RowReader,
    Spec,
    base_fields,
    buffer_rows,
    buffer_spec,
    cat_rows,
    check_parts,
    expect_tensor,
    meta_int,
    popcount_bytes,
    read_checked,
    shard_meta,
    summed_meta,
)
from .lookup import (
    KERNEL_POOLINGS,
    Bags,
    BlockSparseKernelTable,
    KernelPolicy,
    current_kernel_policy,
    kernel_path_marker,
    run_bags,
)
from .stats import MaskStats, RowStats

# numba kernels, loaded (with numba) on first use (see ``_aot``)
assemble_records = KernelRef("embpress.layouts._encode_kernels", "assemble_records", returns="none")
block_sparse_bag = KernelRef("embpress.layouts._kernels", "block_sparse_bag")
block_sparse_run = KernelRef("embpress.layouts._kernels", "block_sparse_run", returns="int64")

__all__ = ["RECORD_TAIL", "BlockSparseTable", "RecordShape", "bitmap_word_bits", "record_shape"]

MAX_GROUP_SHIFT = 8  # at most 256 rows per group offset
RECORD_TAIL = 64  # zero bytes after the last record: one vector load from anywhere fits


class RecordShape(NamedTuple):
    """Where the parts of a row's record sit, for one (D, w, bits, scale dtype).

    Computed once per table (``record_shape``) and read by everything that touches the
    records: the size prediction, packing (``_encode_kernels.assemble_records``), the
    validator, the plain-torch decode and the lookup kernels, which take it as a plain
    tuple and unpack the fields in this order.
    """

    blocks: int  # nb, blocks per row
    block_width: int  # w
    bits: int
    word_bits: int  # W
    words: int  # nw
    scale_bytes: int  # s
    bitmap_bytes: int  # nw * W / 8: where the scale starts
    header: int  # bitmap, scale and offset: where the codes start
    group_shift: int  # log2(G): every pair offset of a group fits a uint16

    def length(self, kept_blocks: Any) -> Any:
        """Bytes of the record of a row with ``kept_blocks`` kept blocks (an int, or
        elementwise for an integer tensor or array): header, then the packed codes."""
        return self.header + (kept_blocks * self.block_width * self.bits + 7) // 8

    def groups(self, rows: int) -> int:
        """Number of group offsets (without the final total)."""
        return -(-rows // (1 << self.group_shift))


def bitmap_word_bits(blocks: int) -> int:
    """Bits of the bitmap words of rows of ``blocks`` blocks: the smallest of 8, 16, 32
    that holds them, else 32."""
    return 8 if blocks <= 8 else (16 if blocks <= 16 else 32)


def _group_shift(largest_record: int) -> int:
    """log2 of the rows per group offset: the largest power of two from 2 to 256 for which
    G - 2 records of ``largest_record`` bytes still fit a uint16 offset."""
    shift = 1
    while shift < MAX_GROUP_SHIFT and ((2 << shift) - 2) * largest_record <= 0xFFFF:
        shift += 1
    return shift


def _in_row_bits(sh: RecordShape, device: torch.device | None = None) -> torch.Tensor:
    """int64 [bitmap bytes]: the bits of each bitmap byte that are blocks of the row."""
    return torch.tensor(
        [(1 << min(8, max(0, sh.blocks - 8 * j))) - 1 for j in range(sh.bitmap_bytes)], device=device
    )


def _pruned_entries(sh: RecordShape, dim: int, bitmaps: torch.Tensor) -> int:
    """Entries pruned in the rows of these bitmap bytes (int64 ``[rows, bitmap_bytes]``, no
    bit set past a row's end): all but those of the kept blocks, a row's last block
    holding ``dim - (blocks - 1) * block_width`` of them. Blocks are kept or pruned whole
    (``stats.row_stats``), so this is the table's ``num_pruned`` exactly."""
    last = sh.blocks - 1
    kept_blocks = int(popcount_bytes(bitmaps).sum())
    last_kept = int(((bitmaps[:, last // 8] >> (last % 8)) & 1).sum())
    kept = kept_blocks * sh.block_width - last_kept * (sh.blocks * sh.block_width - dim)
    return int(bitmaps.shape[0]) * dim - kept


@functools.lru_cache(maxsize=256)
def record_shape(dim: int, block_width: int, bits: int, scale_dtype: torch.dtype) -> RecordShape:
    """The record geometry of a block-sparse table."""
    nb = -(-dim // block_width)
    word_bits = bitmap_word_bits(nb)
    words = -(-nb // word_bits)
    scale_bytes = torch.empty((), dtype=scale_dtype).element_size()
    bitmap_bytes = words * word_bits // 8
    header = bitmap_bytes + 2 * scale_bytes
    largest = header + (nb * block_width * bits + 7) // 8
    return RecordShape(
        nb, block_width, bits, word_bits, words, scale_bytes, bitmap_bytes, header, _group_shift(largest)
    )


def _assemble(
    shape: tuple[int, ...],
    records: np.ndarray,
    starts: np.ndarray,
    bitmap: np.ndarray,
    qparams: np.ndarray,
    encoded: EncodedTable,
) -> None:
    """``assemble_records``: compiled ahead of time where it can be, row ranges on several
    threads (each writes its own rows' records); else numba's parallel kernel."""
    rs = encoded.row_stats
    args = (shape, records, starts, bitmap, qparams, encoded.codes, encoded.code_start, rs.blocks)
    compiled = assemble_records.compiled(args)
    if compiled is None:
        parallel_call(assemble_records, *args)
        return

    def part(lo: int, hi: int) -> tuple[Any, ...]:
        return (
            shape, records, starts[lo : hi + 1], bitmap[lo:hi], qparams[lo:hi], encoded.codes,
            encoded.code_start[lo:hi], rs.blocks[lo:hi],
        )  # fmt: skip

    split_call(compiled, starts.shape[0] - 1, part, minimum=1024)


class BlockSparseTable(QuantizedTable):
    """Kept blocks only, one record per row; see the module docstring for the byte layout."""

    layout = "block_sparse"
    op_tensor_names = ("records", "row_offsets", "group_offsets")
    row_directory = ("row_offsets", "group_offsets")
    tensor_kinds = (
        ("records", torch.uint8, 1),
        ("row_offsets", torch.uint16, 1),
        ("group_offsets", torch.int64, 1),
    )
    codes_per_block = True
    if TYPE_CHECKING:  # buffers; not class annotations, which TorchScript cannot read as strings
        records: torch.Tensor
        row_offsets: torch.Tensor
        group_offsets: torch.Tensor
        # plain attributes set in ``__dict__`` (``_set_shape``, ``_init_view``)
        block_width: int
        shape: RecordShape
        _kernel_shape: tuple[int, ...]

    def __init__(
        self,
        records: torch.Tensor,
        row_offsets: torch.Tensor,
        group_offsets: torch.Tensor,
        num_embeddings: int,
        embedding_dim: int,
        block_width: int,
        bits: int,
        scale_dtype: torch.dtype,
        num_pruned: int,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, bits, scale_dtype, num_pruned)
        self.block_width = block_width
        self._set_shape()
        self.register_buffer("records", records)
        self.register_buffer("row_offsets", row_offsets)
        self.register_buffer("group_offsets", group_offsets)
        self._trust_buffers()

    # --------------------------------------------------------------- encoding
    @classmethod
    def predicted_nbytes(cls, stats: MaskStats, bits: int, scale_dtype: torch.dtype) -> int:
        shape = record_shape(stats.dim, stats.block_width, bits, scale_dtype)
        records = sum(n * shape.length(k) for k, n in enumerate(stats.kept_blocks))
        offsets = 2 * ((stats.rows + 1) // 2) + 8 * (shape.groups(stats.rows) + 1)
        return records + RECORD_TAIL + offsets

    @classmethod
    def zero_rows(cls, row_stats: RowStats) -> torch.Tensor | None:
        return None  # pruned blocks are absent, never stored in place

    @classmethod
    def pack(cls, encoded: EncodedTable) -> BlockSparseTable:
        """Records from the kept blocks' codes (one per byte, row r's from
        ``encoded.code_start[r]``), the row bitmaps and the qparams."""
        rs, stats, qp = encoded.row_stats, encoded.stats, encoded.qparams
        shape = record_shape(stats.dim, rs.width, encoded.bits, qp.dtype)
        starts = np.zeros(stats.rows + 1, dtype=np.int64)
        np.cumsum(shape.length(rs.blocks), out=starts[1:])
        group = 1 << shape.group_shift
        group_offsets = np.append(starts[:-1:group], starts[-1])
        pair_groups = np.repeat(group_offsets[:-1], group // 2)[: (stats.rows + 1) // 2]
        row_offsets = (starts[:-1:2] - pair_groups).astype(np.uint16)
        # the kept-block bitmap words' little-endian bytes: block k at bit k % 8 of byte k // 8
        bitmap = rs.bitmap.view(np.uint8)
        qparams = torch.stack([qp.scale, qp.offset], dim=1).to(qp.dtype).contiguous().view(torch.uint8)
        records = empty(int(starts[-1]) + RECORD_TAIL, np.uint8)  # every record byte is written
        records[int(starts[-1]) :] = 0
        _assemble(tuple(shape), records, starts, bitmap, qparams.numpy(), encoded)
        return cls(
            torch.from_numpy(records),
            torch.from_numpy(row_offsets),
            torch.from_numpy(group_offsets),
            stats.rows,
            stats.dim,
            rs.width,
            encoded.bits,
            qp.dtype,
            stats.pruned,
        )

    @classmethod
    def concat_rows(cls, parts: Sequence[QuantizedTable], consume: bool = False) -> BlockSparseTable:
        """Records back to back (one zero tail), pair offsets as they are (each part but the
        last holds whole groups), group offsets moved by the records before them."""
        check_parts(cls, parts, "block_width")
        tables = [p for p in parts if isinstance(p, BlockSparseTable)]
        first, rows = tables[0], sum(t.num_embeddings for t in tables)
        pruned = sum(t.num_pruned for t in tables)
        groups, base = [], 0
        for t in tables:
            groups.append(t.group_offsets[:-1] + base)
            base += int(t.group_offsets[-1])
        groups.append(torch.tensor([base], dtype=torch.int64))
        row_offsets = torch.cat([t.row_offsets for t in tables])
        records = cat_rows(tables, "records", lambda r: r[:-RECORD_TAIL], extra=RECORD_TAIL, consume=consume)
        return cls(
            records,
            row_offsets,
            torch.cat(groups),
            rows,
            first.embedding_dim,
            first.block_width,
            first.bits,
            first.scale_dtype,
            pruned,
        )

    def part_summary(self) -> dict[str, Any]:
        return {**super().part_summary(), "records_end": int(self.group_offsets[-1])}

    @classmethod
    def joined_layout(cls, summaries: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Spec]]:
        records = sum(buffer_rows(s, "records") - RECORD_TAIL for s in summaries) + RECORD_TAIL
        pairs = sum(buffer_rows(s, "row_offsets") for s in summaries)
        groups = sum(buffer_rows(s, "group_offsets") - 1 for s in summaries) + 1
        first = summaries[0]
        return summed_meta(summaries), {
            "records": buffer_spec(first, "records", records),
            "row_offsets": buffer_spec(first, "row_offsets", pairs),
            "group_offsets": buffer_spec(first, "group_offsets", groups),
        }

    def join_pieces(self, index: int, summaries: Sequence[dict[str, Any]]) -> list[Piece]:
        """Records after those before (the last part adds the zero tail), pair offsets as
        they are, group offsets moved by the records before (the last adds the total)."""
        before = summaries[:index]
        at = sum(buffer_rows(s, "records") - RECORD_TAIL for s in before)
        base = sum(int(s["records_end"]) for s in before)
        groups = sum(buffer_rows(s, "group_offsets") - 1 for s in before)
        own = int(self.records.shape[0]) - RECORD_TAIL
        pieces = [
            Piece("records", at, self.records[:own]),
            Piece("row_offsets", sum(buffer_rows(s, "row_offsets") for s in before), self.row_offsets),
            Piece("group_offsets", groups, self.group_offsets[:-1] + base),
        ]
        if index == len(summaries) - 1:
            pieces.append(Piece("records", at + own, torch.zeros_like(self.records[own:])))
            end = int(self.group_offsets.shape[0]) - 1
            pieces.append(Piece("group_offsets", groups + end, self.group_offsets[-1:] + base))
        return pieces

    @classmethod
    def load_rows(cls, meta: dict[str, Any], read: RowReader, start: int, stop: int) -> BlockSparseTable:
        """The records of rows ``start:stop`` (found from the pair and group offsets around
        them and the bitmaps of the records), with offsets rebuilt for those rows alone."""
        shard = shard_meta(meta, start, stop)
        rows, dim, bits, dtype, _ = base_fields(meta)
        sh = record_shape(dim, meta_int(meta, "block_width", 1, dim), bits, dtype)
        shift, group = sh.group_shift, 1 << sh.group_shift
        first, end = start & ~1, min((stop + 1) & ~1, rows)  # whole pairs around the range

        def pair_starts(lo: int, hi: int) -> torch.Tensor:  # where pairs lo//2 .. hi//2 start
            pairs = read_checked(read, "row_offsets", lo >> 1, (hi + 1) >> 1).view(torch.int16).long()
            groups = read_checked(read, "group_offsets", lo >> shift, ((hi - 1) >> shift) + 1)
            return groups[(torch.arange(lo, hi, 2) >> shift) - (lo >> shift)] + (pairs & 0xFFFF)

        even_starts = pair_starts(first, end)
        # the region ends where the next pair starts, or at the end of the records
        if end < rows:
            size = int(pair_starts(end, end + 1)[0])
        else:
            size = int(read_checked(read, "group_offsets", sh.groups(rows), sh.groups(rows) + 1)[0])
        base = int(even_starts[0])
        if not 0 <= base <= size or bool((even_starts > size).any()) or bool((even_starts < base).any()):
            raise FormatError("tensors 'row_offsets' / 'group_offsets' point outside 'records'")
        region = read_checked(read, "records", base, size)
        in_row = _in_row_bits(sh)

        def lengths(at: torch.Tensor) -> torch.Tensor:
            if bool((at + sh.header > region.shape[0]).any()):
                raise FormatError("tensors 'row_offsets' / 'group_offsets' do not match the records' bitmaps")
            bitmap = region[at.unsqueeze(1) + torch.arange(sh.bitmap_bytes)].long()
            return sh.length(popcount_bytes(bitmap & in_row).sum(1))

        rel = even_starts - base
        starts = torch.stack([rel, rel + lengths(rel)], dim=1).reshape(-1)[start - first : stop - first]
        s0, last = int(starts[0]), int(starts[-1]) + int(lengths(starts[-1:])[0])
        if last > region.shape[0]:
            raise FormatError("tensors 'row_offsets' / 'group_offsets' do not match the records' bitmaps")
        starts = starts - s0
        group_offsets = torch.cat([starts[::group], torch.tensor([last - s0])])
        pair_groups = group_offsets[:-1].repeat_interleave(group // 2)[: (stop - start + 1) // 2]
        tensors = {
            "records": torch.cat([region[s0:last], torch.zeros(RECORD_TAIL, dtype=torch.uint8)]),
            "row_offsets": (starts[::2] - pair_groups).to(torch.int32).to(torch.uint16),
            "group_offsets": group_offsets,
        }
        # the file counts the whole table's pruned entries: these rows' come from their bitmaps
        return cls._validated(shard, tensors, count_pruned=True)

    # --------------------------------------------------------------- lookups
    def _pair_starts(self, rows: torch.Tensor) -> torch.Tensor:
        """Byte where the record of each row's even pair member starts (int64)."""
        groups = self.group_offsets[rows >> self.shape.group_shift]
        # read as int16: torch's uint16 lacks kernels on some devices; the bits are the same
        return groups + (self.row_offsets.view(torch.int16)[rows >> 1].long() & 0xFFFF)

    def _record_starts(self, rows: torch.Tensor) -> torch.Tensor:
        """Byte where each row's record starts (int64): an odd row's follows its pair's."""
        starts = self._pair_starts(rows)
        odd = (rows & 1).bool()
        if bool(odd.any()):
            starts[odd] += self.shape.length(self._kept_count(starts[odd]))
        return starts

    def _bytes_at(self, starts: torch.Tensor, first: int, count: int) -> torch.Tensor:
        """uint8 [n, count]: bytes ``first .. first+count-1`` of the records at ``starts``
        (as rows of a sliding-window view: one index per record, not one per byte)."""
        if count > self.records.numel():  # no window fits (then no record does either)
            return self.records[starts.unsqueeze(1) + first + torch.arange(count, device=starts.device)]
        return self.records.unfold(0, count, 1)[starts + first]

    def _in_row(self, device: torch.device) -> torch.Tensor:
        """int64 [bitmap bytes]: the bits of each bitmap byte that are blocks of the row."""
        return _in_row_bits(self.shape, device)

    def _kept_count(self, starts: torch.Tensor) -> torch.Tensor:
        """Kept blocks of the records at ``starts`` (bits past the row end not counted)."""
        bitmap = self._bytes_at(starts, 0, self.shape.bitmap_bytes).long()
        return popcount_bytes(bitmap & self._in_row(starts.device)).sum(1)

    def _kept_blocks(self, starts: torch.Tensor) -> torch.Tensor:
        """Bool [n, nb]: which blocks of the records at ``starts`` are kept."""
        bitmap = self._bytes_at(starts, 0, self.shape.bitmap_bytes).long()
        bits = (bitmap.unsqueeze(-1) >> torch.arange(8, device=starts.device)) & 1
        return bits.reshape(starts.shape[0], 8 * self.shape.bitmap_bytes)[:, : self.shape.blocks].bool()

    def op_tensors(self) -> list[torch.Tensor]:
        return [self.records, self.row_offsets, self.group_offsets]

    def decode_rows(self, indices: torch.Tensor) -> torch.Tensor:
        sh = self.shape
        rows = indices.long()
        starts = self._record_starts(rows)
        kept = self._kept_blocks(starts)  # [n, nb]
        qp = self._bytes_at(starts, sh.bitmap_bytes, 2 * sh.scale_bytes).view(self.scale_dtype).float()
        w = self.block_width
        rank = torch.cumsum(kept.long(), 1) - 1
        code = (rank * w).unsqueeze(2) + torch.arange(w, device=rows.device)  # [n, nb, w]
        bit = code * self.bits
        byte = starts.view(-1, 1, 1) + sh.header + bit // 8
        byte = torch.where(kept.unsqueeze(2), byte, starts.view(-1, 1, 1))  # a pruned block reads nothing
        value = (self.records[byte].long() >> (bit % 8)) & ((1 << self.bits) - 1)
        values = value.float() * qp[:, 0].view(-1, 1, 1) + qp[:, 1].view(-1, 1, 1)
        values = torch.where(kept.unsqueeze(2), values, torch.zeros_like(values))
        return values.reshape(rows.shape[0], sh.blocks * w)[:, : self.embedding_dim]

    def fast_bag(
        self,
        indices: torch.Tensor,
        offsets: torch.Tensor,
        mode: int,
        per_sample_weights: torch.Tensor | None,
        policy: KernelPolicy | None = None,
    ) -> torch.Tensor | None:
        records = self.records  # a buffer: each read goes through nn.Module.__getattr__
        if records.device.type != "cpu" or mode not in KERNEL_POOLINGS:
            return None
        rows, dim = self.num_embeddings, self.embedding_dim
        policy = policy or current_kernel_policy()
        table = self.kernel_args(policy, lambda: self._kernel_table(policy))
        bags = Bags.of(indices, offsets, mode, per_sample_weights)
        return run_bags(block_sparse_bag, table, bags, rows, dim, run=block_sparse_run, owner=self)

    def _kernel_table(self, policy: KernelPolicy) -> BlockSparseKernelTable:
        """The kernel's view of the table (CPU buffers) under ``policy``."""
        records, rows = self.records, self.num_embeddings
        return BlockSparseKernelTable(
            records=records.numpy(),
            row_offsets=self.row_offsets.numpy(),
            group_offsets=self.group_offsets.numpy(),
            shape=self._kernel_shape,
            rows=rows,
            dim=self.embedding_dim,
            skip=(records.numel() - RECORD_TAIL) // rows,
            vector=self._vector_decode(policy),
            path=kernel_path_marker(policy),
        )

    def _vector_decode(self, policy: KernelPolicy | None = None) -> bool:
        """Whether the kernel decodes whole bitmap words at once (see ``_kernels``)."""
        sh = self.shape
        return (
            (policy or current_kernel_policy()).vector_decode
            and self.block_width == 4
            and self.embedding_dim == 4 * sh.word_bits * sh.words
            and vector_decode_supported(self.bits)
        )

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "block_width": self.block_width}

    def layout_args(self) -> list[int]:
        return [self.block_width]

    def _init_view(self, layout_args: list[int]) -> None:
        if len(layout_args) != 1 or not 1 <= layout_args[0] <= self.embedding_dim:
            raise ValueError(f"layout {self.layout!r} takes layout_args [block_width], got {layout_args}")
        self.__dict__["block_width"] = layout_args[0]  # plain, as ``from_op_args`` sets fields
        self._set_shape()

    def _set_shape(self) -> None:
        """The table's ``RecordShape``, and the plain tuple of it the kernels take (plain
        attributes, set without ``nn.Module.__setattr__``'s checks: an op makes a view per
        call)."""
        shape = record_shape(self.embedding_dim, self.block_width, self.bits, self.scale_dtype)
        self.__dict__.update(shape=shape, _kernel_shape=tuple(shape))

    @classmethod
    def from_tensors(
        cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], count_pruned: bool = False
    ) -> BlockSparseTable:
        return cls._validated(meta, tensors, count_pruned)

    @classmethod
    def _validated(
        cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], count_pruned: bool
    ) -> BlockSparseTable:
        """``from_tensors``; ``count_pruned``: ``num_pruned`` taken from the records'
        bitmaps (a row range's, which the file does not count) instead of checked against
        them."""
        rows, dim, bits, dtype, pruned = base_fields(meta)
        width = meta_int(meta, "block_width", 1, dim)
        sh = record_shape(dim, width, bits, dtype)
        row_offsets = expect_tensor(tensors, "row_offsets", torch.uint16, ((rows + 1) // 2,))
        group_offsets = expect_tensor(tensors, "group_offsets", torch.int64, (sh.groups(rows) + 1,))
        if "records" not in tensors:
            raise FormatError("tensor 'records' is missing")
        size = tensors["records"].numel()
        records = expect_tensor(tensors, "records", torch.uint8, (size,))
        if size < RECORD_TAIL or int(group_offsets[0]) != 0 or int(group_offsets[-1]) != size - RECORD_TAIL:
            raise FormatError(
                f"tensor 'group_offsets' does not start at 0 and end {RECORD_TAIL} bytes before "
                "the end of 'records'"
            )
        if bool((group_offsets < 0).any()) or bool((group_offsets > size).any()):  # no sum below overflows
            raise FormatError("tensor 'group_offsets' points outside 'records'")
        if bool(records[size - RECORD_TAIL :].any()):
            raise FormatError(f"tensor 'records' does not end with {RECORD_TAIL} zero bytes")
        size -= RECORD_TAIL  # the records themselves
        table = cls(records, row_offsets, group_offsets, rows, dim, width, bits, dtype, pruned)
        # every record's start: each pair's even row from the offsets (checked to lie
        # inside the tensor before anything is read there), its odd row after it
        even = table._pair_starts(torch.arange(0, rows, 2))
        if bool((even < 0).any()) or bool((even + sh.header > size).any()):
            raise FormatError("tensor 'row_offsets' points past the end of 'records'")
        in_row = table._in_row(even.device)

        def bitmaps_and_lengths(at: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            bitmap = table._bytes_at(at, 0, sh.bitmap_bytes).long()
            return bitmap, sh.length(popcount_bytes(bitmap & in_row).sum(1))

        even_bitmap, even_lengths = bitmaps_and_lengths(even)
        odd = even[: rows // 2] + even_lengths[: rows // 2]
        if bool((odd + sh.header > size).any()):
            raise FormatError("tensors 'row_offsets' / 'group_offsets' do not match the records' bitmaps")
        odd_bitmap, odd_lengths = bitmaps_and_lengths(odd)
        starts = torch.empty(rows, dtype=torch.int64)
        lengths = torch.empty(rows, dtype=torch.int64)
        starts[0::2], starts[1::2] = even, odd
        lengths[0::2], lengths[1::2] = even_lengths, odd_lengths
        # then: every record starts where the one before it ends, and the last one ends
        # the tensor
        expected = torch.cumsum(lengths, 0) - lengths
        if not torch.equal(expected, starts) or int(lengths.sum()) != size:
            raise FormatError("tensors 'row_offsets' / 'group_offsets' do not match the records' bitmaps")
        if not torch.equal(group_offsets[:-1], expected[:: 1 << sh.group_shift]):
            raise FormatError("tensor 'group_offsets' does not point at its groups' first records")
        if bool((even_bitmap & ~in_row).any()) or bool((odd_bitmap & ~in_row).any()):
            raise FormatError("tensor 'records' marks blocks past the row end as kept")
        exact = _pruned_entries(sh, dim, torch.cat([even_bitmap, odd_bitmap]))
        if count_pruned:
            table.num_pruned = exact
        elif exact != pruned:
            raise FormatError(
                f"field 'num_pruned' is {pruned}, but the records' bitmaps prune {exact} entries"
            )
        qparams = table._bytes_at(starts, sh.bitmap_bytes, 2 * sh.scale_bytes).view(dtype)
        if not bool(torch.isfinite(qparams).all()):
            raise FormatError("tensor 'records' holds a NaN or Inf scale or offset")
        return table
