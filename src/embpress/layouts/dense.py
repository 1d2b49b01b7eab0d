"""Dense layout: every row stored as one fused row.

Memory layout::

    fused   uint8 [num_embeddings, row_bytes]   FBGEMM fused rows (see layouts.base)

Pruned entries are stored in place as the row's zero code (exact 0.0, see
``quant.rowwise``). Best when little or nothing is pruned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .base import (
    EncodedTable,
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
    decode_fused,
    expect_tensor,
    fused_row_bytes,
    fused_rows_bag,
    make_fused,
    read_checked,
    shard_meta,
    summed_meta,
)
from .lookup import KernelPolicy, current_kernel_policy
from .stats import MaskStats, RowStats, flagged_rows

__all__ = ["DenseTable"]


class DenseTable(QuantizedTable):
    """All rows as fused rows: ``fused[i]`` is row ``i``."""

    layout = "dense"
    op_tensor_names = ("fused",)
    tensor_kinds = (("fused", torch.uint8, 2),)
    if TYPE_CHECKING:  # buffers; not class annotations, which TorchScript cannot read as strings
        fused: torch.Tensor

    def __init__(
        self, fused: torch.Tensor, embedding_dim: int, bits: int, scale_dtype: torch.dtype, num_pruned: int
    ) -> None:
        super().__init__(fused.shape[0], embedding_dim, bits, scale_dtype, num_pruned)
        self.register_buffer("fused", fused)
        self._trust_buffers()

    @classmethod
    def predicted_nbytes(cls, stats: MaskStats, bits: int, scale_dtype: torch.dtype) -> int:
        return stats.rows * fused_row_bytes(stats.dim, bits, scale_dtype)

    @classmethod
    def zero_rows(cls, row_stats: RowStats) -> torch.Tensor | None:
        return flagged_rows(row_stats.kept < row_stats.dim)  # every row with a pruned entry

    @classmethod
    def pack(cls, encoded: EncodedTable) -> DenseTable:
        qp, stats = encoded.qparams, encoded.stats
        fused = make_fused(encoded.code_rows(), qp.scale, qp.offset, encoded.bits, qp.dtype)
        return cls(fused, stats.dim, encoded.bits, qp.dtype, stats.pruned)

    @classmethod
    def concat_rows(cls, parts: Sequence[QuantizedTable], consume: bool = False) -> DenseTable:
        check_parts(cls, parts)
        tables = [p for p in parts if isinstance(p, DenseTable)]
        first, pruned = tables[0], sum(t.num_pruned for t in tables)
        fused = cat_rows(tables, "fused", consume=consume)
        return cls(fused, first.embedding_dim, first.bits, first.scale_dtype, pruned)

    @classmethod
    def joined_layout(cls, summaries: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Spec]]:
        rows = sum(buffer_rows(s, "fused") for s in summaries)
        return summed_meta(summaries), {"fused": buffer_spec(summaries[0], "fused", rows)}

    def join_pieces(self, index: int, summaries: Sequence[dict[str, Any]]) -> list[Piece]:
        return [Piece("fused", sum(buffer_rows(s, "fused") for s in summaries[:index]), self.fused)]

    @classmethod
    def load_rows(cls, meta: dict[str, Any], read: RowReader, start: int, stop: int) -> DenseTable:
        shard = shard_meta(meta, start, stop)
        return cls.from_tensors(shard, {"fused": read_checked(read, "fused", start, stop)})

    def op_tensors(self) -> list[torch.Tensor]:
        return [self.fused]

    def decode_rows(self, indices: torch.Tensor) -> torch.Tensor:
        return decode_fused(self.fused[indices], self.embedding_dim, self.bits, self.scale_dtype)

    def fast_bag(
        self,
        indices: torch.Tensor,
        offsets: torch.Tensor,
        mode: int,
        per_sample_weights: torch.Tensor | None,
        policy: KernelPolicy | None = None,
    ) -> torch.Tensor | None:
        self.check_buffers()
        return fused_rows_bag(
            self.fused,
            self.embedding_dim,
            self.bits,
            self.scale_dtype,
            indices,
            offsets,
            mode,
            per_sample_weights,
            policy or current_kernel_policy(),
        )

    @classmethod
    def from_tensors(
        cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], count_pruned: bool = False
    ) -> DenseTable:
        rows, dim, bits, dtype, pruned = base_fields(meta)  # any count fits a dense table
        fused = expect_tensor(tensors, "fused", torch.uint8, (rows, fused_row_bytes(dim, bits, dtype)))
        check_fused_qparams(fused, dim, bits, dtype)
        return cls(fused, dim, bits, dtype, pruned)
