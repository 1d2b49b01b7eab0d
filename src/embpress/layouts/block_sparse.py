"""Block-sparse layout: only kept (1 x w) blocks' codes are stored, found through bitmaps.

Memory layout (N rows, D columns, block width w, nb = ceil(D / w) blocks per row)::

    codes      uint8 [ceil(C * bits / 8)]     codes of kept blocks, row-major, packed as
                                              one stream (code k at byte k*bits//8, bit
                                              (k*bits)%8); a kept partial edge block is
                                              padded to w codes; C = codes in the stream
    scale      scale_dtype [N]                per-row scale
    offset     scale_dtype [N]                per-row offset
    block_bits uint8 [N, ceil(nb / 8)]        bit k % 8 of byte k // 8: block k kept
    group_ptr  int64 [ceil(N / G) + 1]        code index where row G*g starts (G = 16);
                                              a row's start adds the popcounts of the
                                              rows before it in its group

Pruned blocks are simply absent, so they decode to exactly 0.0 and the bytes fall with
sparsity: at 8 bits, 80% of (1, 4) blocks pruned and D = 128 costs
``0.2 * 128 + 8 + 4 + 0.5`` bytes per row. Sum/mean bags run in a numba kernel on CPU;
other devices (and max bags) decode rows with plain torch ops.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..quant.packing import packed_length, unpack_codes
from ._kernels import block_sparse_bag, set_threads
from .base import (
    FormatError,
    QuantizedTable,
    base_fields,
    expect_tensor,
    meta_int,
    popcount_bytes,
)

__all__ = ["GROUP_ROWS", "BlockSparseTable"]

GROUP_ROWS = 16


class BlockSparseTable(QuantizedTable):
    """Kept blocks only; see the module docstring for the byte layout."""

    layout = "block_sparse"
    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    block_bits: torch.Tensor
    group_ptr: torch.Tensor

    def __init__(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        offset: torch.Tensor,
        block_bits: torch.Tensor,
        group_ptr: torch.Tensor,
        num_codes: int,
        embedding_dim: int,
        block_width: int,
        bits: int,
        num_pruned: int,
    ) -> None:
        super().__init__(scale.shape[0], embedding_dim, bits, scale.dtype, num_pruned)
        self.block_width = block_width
        self.num_codes = num_codes
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)
        self.register_buffer("block_bits", block_bits)
        self.register_buffer("group_ptr", group_ptr)

    @property
    def num_blocks(self) -> int:
        """Blocks per row."""
        return -(-self.embedding_dim // self.block_width)

    def _row_starts(self, rows: torch.Tensor) -> torch.Tensor:
        """Code index where each row's kept blocks start."""
        group = rows // GROUP_ROWS
        first = group * GROUP_ROWS
        span = torch.arange(GROUP_ROWS, device=rows.device)
        neighbours = first.unsqueeze(1) + span  # [n, G]
        before = neighbours < rows.unsqueeze(1)
        neighbours = torch.where(before, neighbours, torch.zeros_like(neighbours))
        counts = popcount_bytes(self.block_bits[neighbours]).sum(-1) * self.block_width
        return self.group_ptr[group] + (counts * before).sum(1)

    def decode_rows(self, indices: torch.Tensor) -> torch.Tensor:
        rows = indices.long()
        w, nb = self.block_width, self.num_blocks
        bits_bytes = self.block_bits[rows]  # [n, nb8]
        kept = unpack_codes(bits_bytes, 1, nb).bool()  # [n, nb]
        rank = torch.cumsum(kept.long(), 1) - 1
        start = self._row_starts(rows)
        pos = (start.unsqueeze(1) + rank * w).unsqueeze(2) + torch.arange(w, device=rows.device)
        pos = torch.where(kept.unsqueeze(2), pos, torch.zeros_like(pos))  # [n, nb, w]
        per_byte = 8 // self.bits
        byte = self.codes[pos // per_byte] if self.codes.numel() else torch.zeros_like(pos, dtype=torch.uint8)
        code = (byte.long() >> ((pos % per_byte) * self.bits)) & ((1 << self.bits) - 1)
        values = code.float() * self.scale[rows].float().view(-1, 1, 1) + self.offset[rows].float().view(
            -1, 1, 1
        )
        values = torch.where(kept.unsqueeze(2), values, torch.zeros_like(values))
        return values.reshape(rows.shape[0], nb * w)[:, : self.embedding_dim]

    def fast_bag(
        self, indices: torch.Tensor, offsets: torch.Tensor, mode: int, per_sample_weights: torch.Tensor | None
    ) -> torch.Tensor | None:
        if self.codes.device.type != "cpu" or mode not in (0, 1):
            return None
        half = self.scale_dtype == torch.float16
        raw = torch.int16 if half else torch.int32
        scale, offset = self.scale.view(raw), self.offset.view(raw)
        bags = offsets.shape[0] - 1
        out = np.zeros((bags, self.embedding_dim), dtype=np.float32)
        psw = (
            per_sample_weights.float().contiguous().numpy()
            if per_sample_weights is not None
            else np.zeros(0, dtype=np.float32)
        )
        set_threads()
        block_sparse_bag(
            self.codes.numpy(),
            scale.numpy(),
            offset.numpy(),
            half,
            self.block_bits.numpy(),
            self.group_ptr.numpy(),
            self.embedding_dim,
            self.block_width,
            self.num_blocks,
            self.bits,
            GROUP_ROWS,
            indices.long().contiguous().numpy(),
            offsets.long().contiguous().numpy(),
            psw,
            per_sample_weights is not None,
            mode == 1,
            out,
        )
        return torch.from_numpy(out)

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "block_width": self.block_width, "num_codes": self.num_codes}

    @classmethod
    def from_tensors(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> BlockSparseTable:
        rows, dim, bits, dtype, pruned = base_fields(meta)
        width = meta_int(meta, "block_width", 1, dim)
        nb = -(-dim // width)
        num_codes = meta_int(meta, "num_codes", 0, rows * nb * width)
        codes = expect_tensor(tensors, "codes", torch.uint8, (packed_length(num_codes, bits),))
        scale = expect_tensor(tensors, "scale", dtype, (rows,))
        offset = expect_tensor(tensors, "offset", dtype, (rows,))
        block_bits = expect_tensor(tensors, "block_bits", torch.uint8, (rows, (nb + 7) // 8))
        groups = -(-rows // GROUP_ROWS)
        group_ptr = expect_tensor(tensors, "group_ptr", torch.int64, (groups + 1,))
        if nb % 8 and bool((block_bits[:, -1].long() >> (nb % 8)).any()):
            raise FormatError("tensor 'block_bits' marks blocks past the row end as kept")
        per_row = popcount_bytes(block_bits).sum(1) * width
        padded = torch.zeros(groups * GROUP_ROWS, dtype=torch.int64)
        padded[:rows] = per_row
        expected = torch.zeros(groups + 1, dtype=torch.int64)
        expected[1:] = torch.cumsum(padded.view(groups, GROUP_ROWS).sum(1), 0)
        if not torch.equal(expected, group_ptr) or int(expected[-1]) != num_codes:
            raise FormatError("tensor 'group_ptr' does not match 'block_bits' and 'num_codes'")
        for name, t in (("scale", scale), ("offset", offset)):
            if not bool(torch.isfinite(t).all()):
                raise FormatError(f"tensor {name!r} holds NaN or Inf")
        return cls(codes, scale, offset, block_bits, group_ptr, num_codes, dim, width, bits, pruned)
