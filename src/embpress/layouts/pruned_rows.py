"""Pruned-row layout: only rows with a kept entry are stored, found through a rank bitmap.

Memory layout (K kept rows out of N)::

    fused     uint8 [K + 1, row_bytes]  kept rows in order, then one all-zero row
                                        (codes 0, scale 0, offset 0: decodes to 0.0)
    row_bits  uint8 [ceil(N / 8)]       bit i % 8 of byte i // 8 set iff row i is kept
    row_rank  int32 [ceil(N / 8)]       kept rows before row 8 * k (prefix count)

Row ``i`` maps to ``row_rank[i >> 3] + popcount(row_bits[i >> 3] & ((1 << (i & 7)) - 1))``
if its bit is set, else to the zero row ``K``; 5 bits per row instead of a 32-bit index
map. Indices are remapped with plain torch ops, then torch's FBGEMM kernels (CPU) or the
plain-torch decoder run on the compact table. A pruned row stays in its bag (it adds 0
and counts toward a mean), exactly as the zero row it is in the dequantized table.
Partially pruned kept rows store their pruned entries in place as the zero code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .._aot import KernelRef
from .._parallel import rows_call
from ..quant.packing import pack_codes
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
    check_fused_qparams,
    check_parts,
    check_pruned,
    decode_fused,
    expect_tensor,
    fused_row_bytes,
    fused_rows_bag,
    make_fused,
    popcount_bytes,
    read_checked,
    shard_meta,
    stored_rows_pruned,
    summed_meta,
)
from .lookup import KernelPolicy, check_ids, current_kernel_policy, int64_ids
from .stats import MaskStats, RowStats, flagged_rows

# numba kernels, loaded (with numba) on first use (see ``_aot``)
remap_rows = KernelRef("embpress.layouts._kernels", "remap_rows", returns="int64")
_IDS_PER_THREAD = 16384  # ids one thread remaps at least (fewer: one thread)

__all__ = ["PrunedRowsTable", "rank_directory"]


def rank_directory(row_bits: torch.Tensor) -> torch.Tensor:
    """int32 exclusive prefix count of set bits, one entry per byte of ``row_bits``."""
    counts = popcount_bytes(row_bits)
    return (torch.cumsum(counts, 0) - counts).to(torch.int32)


class PrunedRowsTable(QuantizedTable):
    """Kept rows only, plus a zero row, addressed through ``row_bits`` / ``row_rank``."""

    layout = "pruned_rows"
    op_tensor_names = ("fused", "row_bits", "row_rank")
    row_directory = ("row_bits", "row_rank")
    tensor_kinds = (("fused", torch.uint8, 2), ("row_bits", torch.uint8, 1), ("row_rank", torch.int32, 1))
    __jit_unused_properties__: ClassVar[list[str]] = [*QuantizedTable.__jit_unused_properties__, "kept_rows"]
    if TYPE_CHECKING:  # buffers; not class annotations, which TorchScript cannot read as strings
        fused: torch.Tensor
        row_bits: torch.Tensor
        row_rank: torch.Tensor

    def __init__(
        self,
        fused: torch.Tensor,
        row_bits: torch.Tensor,
        row_rank: torch.Tensor,
        num_embeddings: int,
        embedding_dim: int,
        bits: int,
        scale_dtype: torch.dtype,
        num_pruned: int,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, bits, scale_dtype, num_pruned)
        self.register_buffer("fused", fused)
        self.register_buffer("row_bits", row_bits)
        self.register_buffer("row_rank", row_rank)
        self._trust_buffers()

    @classmethod
    def predicted_nbytes(cls, stats: MaskStats, bits: int, scale_dtype: torch.dtype) -> int:
        row_bytes = fused_row_bytes(stats.dim, bits, scale_dtype)
        return (stats.kept_rows + 1) * row_bytes + 5 * ((stats.rows + 7) // 8)  # + row_bits, row_rank

    @classmethod
    def zero_rows(cls, row_stats: RowStats) -> torch.Tensor | None:
        kept = row_stats.kept
        return flagged_rows((kept > 0) & (kept < row_stats.dim))  # stored rows with a pruned entry

    @classmethod
    def pack(cls, encoded: EncodedTable) -> PrunedRowsTable:
        qp, stats, bits = encoded.qparams, encoded.stats, encoded.bits
        kept = torch.from_numpy(encoded.row_stats.kept > 0)
        codes = encoded.code_rows()[kept]
        fused = make_fused(codes, qp.scale[kept], qp.offset[kept], bits, qp.dtype, zero_rows=1)
        row_bits = pack_codes(kept.to(torch.uint8), 1)
        return cls(
            fused, row_bits, rank_directory(row_bits), stats.rows, stats.dim, bits, qp.dtype, stats.pruned
        )

    @classmethod
    def concat_rows(cls, parts: Sequence[QuantizedTable], consume: bool = False) -> PrunedRowsTable:
        """Kept rows in order then one zero row; the row bitmaps joined (each part but the
        last a whole number of bytes) and their rank directory recounted."""
        check_parts(cls, parts)
        tables = [p for p in parts if isinstance(p, PrunedRowsTable)]
        first = tables[0]
        rows, row_bits = sum(t.num_embeddings for t in tables), torch.cat([t.row_bits for t in tables])
        pruned = sum(t.num_pruned for t in tables)
        fused = cat_rows(tables, "fused", lambda f: f[:-1], extra=1, consume=consume)  # + the zero row
        return cls(
            fused,
            row_bits,
            rank_directory(row_bits),
            rows,
            first.embedding_dim,
            first.bits,
            first.scale_dtype,
            pruned,
        )

    @classmethod
    def joined_layout(cls, summaries: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Spec]]:
        kept = sum(buffer_rows(s, "fused") - 1 for s in summaries)
        nbits = sum(buffer_rows(s, "row_bits") for s in summaries)
        first = summaries[0]
        return summed_meta(summaries), {
            "fused": buffer_spec(first, "fused", kept + 1),
            "row_bits": buffer_spec(first, "row_bits", nbits),
            "row_rank": buffer_spec(first, "row_rank", nbits),
        }

    def join_pieces(self, index: int, summaries: Sequence[dict[str, Any]]) -> list[Piece]:
        """Kept rows after those of the parts before (the last part adds the zero row);
        bitmap bytes as they are; ranks moved by the kept rows before."""
        kept = sum(buffer_rows(s, "fused") - 1 for s in summaries[:index])
        at = sum(buffer_rows(s, "row_bits") for s in summaries[:index])
        own = int(self.fused.shape[0]) - 1
        pieces = [
            Piece("fused", kept, self.fused[:own]),
            Piece("row_bits", at, self.row_bits),
            Piece("row_rank", at, self.row_rank + kept),
        ]
        if index == len(summaries) - 1:
            pieces.append(Piece("fused", kept + own, torch.zeros_like(self.fused[own:])))
        return pieces

    @classmethod
    def load_rows(cls, meta: dict[str, Any], read: RowReader, start: int, stop: int) -> PrunedRowsTable:
        """The bitmap bytes and ranks over ``start:stop``, the kept rows between the first
        and last of them, and the zero row."""
        shard = shard_meta(meta, start, stop)
        lo, hi = start >> 3, (stop + 7) >> 3
        bits = read_checked(read, "row_bits", lo, hi)
        ranks = read_checked(read, "row_rank", lo, hi)
        flags = ((bits.long().unsqueeze(1) >> torch.arange(8)) & 1).reshape(-1)
        first = int(ranks[0]) + int(flags[: start - 8 * lo].sum())
        flags = flags[start - 8 * lo : stop - 8 * lo]
        kept = int(flags.sum())
        total = read.shape("fused")[0] - 1
        if not 0 <= first <= first + kept <= total:
            raise FormatError("tensor 'row_rank' points past the stored rows")
        fused = torch.cat(
            [read_checked(read, "fused", first, first + kept), read_checked(read, "fused", total, total + 1)]
        )
        row_bits = pack_codes(flags.to(torch.uint8), 1)
        # the file counts the whole table's pruned entries: these rows get their share,
        # held within what their bitmap allows
        low, high = stored_rows_pruned(stop - start, int(meta["embedding_dim"]), kept)
        shard["num_pruned"] = min(max(shard["num_pruned"], low), high)
        return cls.from_tensors(
            shard, {"fused": fused, "row_bits": row_bits, "row_rank": rank_directory(row_bits)}
        )

    @property
    def kept_rows(self) -> int:
        """Rows stored (the zero row not counted)."""
        return int(self.fused.shape[0]) - 1

    def remap(self, indices: torch.Tensor) -> torch.Tensor:
        """Positions in ``fused`` of the original row ``indices``."""
        idx = indices.long()
        byte = self.row_bits[idx >> 3].long()
        bit = idx & 7
        kept = ((byte >> bit) & 1).bool()
        below = byte & ((1 << bit) - 1)
        rank = self.row_rank[idx >> 3].long() + popcount_bytes(below)
        return torch.where(kept, rank, torch.full_like(rank, self.kept_rows))

    def op_tensors(self) -> list[torch.Tensor]:
        return [self.fused, self.row_bits, self.row_rank]

    def decode_rows(self, indices: torch.Tensor) -> torch.Tensor:
        rows = self.fused[self.remap(indices)]
        return decode_fused(rows, self.embedding_dim, self.bits, self.scale_dtype)

    def _remap_checked(self, indices: torch.Tensor, zero_row: int) -> torch.Tensor:
        """:meth:`remap` in one compiled pass (``zero_row``: ``kept_rows``; the ids split
        across threads), raising IndexError for out-of-range indices."""
        out = torch.empty(indices.shape[0], dtype=torch.int64)
        ids = int64_ids(indices)
        row_bits, row_rank = self.row_bits.numpy(), self.row_rank.numpy()
        args = (ids, row_bits, row_rank, self.num_embeddings, zero_row, out.numpy())
        bad = rows_call(remap_rows, *args, rows=(0, 5), minimum=_IDS_PER_THREAD)
        check_ids(bad, self.num_embeddings)
        return out

    def fast_bag(
        self,
        indices: torch.Tensor,
        offsets: torch.Tensor,
        mode: int,
        per_sample_weights: torch.Tensor | None,
        policy: KernelPolicy | None = None,
    ) -> torch.Tensor | None:
        fused = self.fused  # a buffer: each read goes through nn.Module.__getattr__
        if fused.device.type != "cpu":
            return None
        self.check_buffers()
        return fused_rows_bag(
            fused,
            self.embedding_dim,
            self.bits,
            self.scale_dtype,
            self._remap_checked(indices, fused.shape[0] - 1),
            offsets.long(),
            mode,
            per_sample_weights,
            policy or current_kernel_policy(),
        )

    @classmethod
    def from_tensors(
        cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], count_pruned: bool = False
    ) -> PrunedRowsTable:
        rows, dim, bits, dtype, pruned = base_fields(meta)
        nbytes = (rows + 7) // 8
        row_bits = expect_tensor(tensors, "row_bits", torch.uint8, (nbytes,))
        row_rank = expect_tensor(tensors, "row_rank", torch.int32, (nbytes,))
        if rows % 8 and int(row_bits[-1]) >> (rows % 8):
            raise FormatError("tensor 'row_bits' marks rows past num_embeddings as kept")
        if not torch.equal(rank_directory(row_bits), row_rank):
            raise FormatError("tensor 'row_rank' does not match 'row_bits'")
        kept = int(popcount_bytes(row_bits).sum())
        pruned = check_pruned(pruned, stored_rows_pruned(rows, dim, kept), "row_bits", count_pruned)
        fused = expect_tensor(tensors, "fused", torch.uint8, (kept + 1, fused_row_bytes(dim, bits, dtype)))
        if bool(fused[-1].any()):
            raise FormatError("the last row of 'fused' must be the all-zero row")
        check_fused_qparams(fused, dim, bits, dtype)
        return cls(fused, row_bits, row_rank, rows, dim, bits, dtype, pruned)
