"""Block-sparse layout: only kept (1 x w) blocks' codes are stored, found through bitmaps.

Memory layout (N rows, D columns, block width w, nb = ceil(D / w) blocks per row)::

    codes       uint8 [ceil(C * bits / 8)]     codes of kept blocks, row-major, packed as
                                               one stream (code k at byte k*bits//8, bit
                                               (k*bits)%8); a kept partial edge block is
                                               padded to w codes; C = codes in the stream
    qparams     scale_dtype [N, 2]             per-row (scale, offset), side by side so
                                               one cache line serves a lookup
    block_words intW [N, ceil(nb / W)]         bit k % W of word k // W: block k kept;
                                               W = 8, 16 or 32: the smallest that holds
                                               nb bits, else 32 (int8 / int16 / int32)
    group_ptr   int64 [ceil(N / G) + 1]        code index where row G*g starts (G = 16);
                                               a row's start adds w * popcount of the
                                               bitmaps of the rows before it in its group

Pruned blocks are simply absent, so they decode to exactly 0.0 and the bytes fall with
sparsity: at 8 bits, 80% of (1, 4) blocks pruned and D = 128 costs
``0.2 * 128 + 8 + 4 + 0.5`` bytes per row. Sum/mean bags run in a numba kernel on CPU
(``_kernels.block_sparse_bag``: whole bitmap words decoded with AVX-512 expanding loads
where the CPU has them and D = 4 * bits-per-word * words, else a walk over the set
bits); other devices (and max bags) decode rows with plain torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..quant.packing import packed_length
from ._kernels import GROUP_ROWS, block_sparse_bag, set_threads, vector_decode_supported
from .base import FormatError, QuantizedTable, base_fields, expect_tensor, meta_int, popcount_bytes

__all__ = ["GROUP_ROWS", "BlockSparseTable", "group_pointers", "word_type"]

# use the vector decode where the table and the CPU allow it (tests switch it off to check
# the bit walk against it)
VECTOR_DECODE = True


class BlockSparseTable(QuantizedTable):
    """Kept blocks only; see the module docstring for the byte layout."""

    layout = "block_sparse"
    codes: torch.Tensor
    qparams: torch.Tensor
    block_words: torch.Tensor
    group_ptr: torch.Tensor

    def __init__(
        self,
        codes: torch.Tensor,
        qparams: torch.Tensor,
        block_words: torch.Tensor,
        group_ptr: torch.Tensor,
        num_codes: int,
        embedding_dim: int,
        block_width: int,
        bits: int,
        num_pruned: int,
    ) -> None:
        super().__init__(qparams.shape[0], embedding_dim, bits, qparams.dtype, num_pruned)
        self.block_width = block_width
        self.num_codes = num_codes
        self.register_buffer("codes", codes)
        self.register_buffer("qparams", qparams)
        self.register_buffer("block_words", block_words)
        self.register_buffer("group_ptr", group_ptr)

    @property
    def num_blocks(self) -> int:
        """Blocks per row."""
        return -(-self.embedding_dim // self.block_width)

    def _kept_blocks(self, rows: torch.Tensor) -> torch.Tensor:
        """Bool [n, nb]: which blocks of each row are kept."""
        word_bits = self.block_words.element_size() * 8
        words = self.block_words[rows].long() & ((1 << word_bits) - 1)  # [n, nw]
        shifts = torch.arange(word_bits, device=rows.device)
        bits = (words.unsqueeze(-1) >> shifts) & 1
        return bits.reshape(rows.shape[0], -1)[:, : self.num_blocks].bool()

    def _row_starts(self, rows: torch.Tensor) -> torch.Tensor:
        """Code index where each row's kept blocks start."""
        group = rows // GROUP_ROWS
        neighbours = (group * GROUP_ROWS).unsqueeze(1) + torch.arange(GROUP_ROWS, device=rows.device)
        before = neighbours < rows.unsqueeze(1)
        neighbours = torch.where(before, neighbours, torch.zeros_like(neighbours))
        counts = self._kept_blocks(neighbours.reshape(-1)).sum(-1).view_as(neighbours)
        return self.group_ptr[group] + (counts * before).sum(1) * self.block_width

    def decode_rows(self, indices: torch.Tensor) -> torch.Tensor:
        rows = indices.long()
        w, nb = self.block_width, self.num_blocks
        kept = self._kept_blocks(rows)  # [n, nb]
        rank = torch.cumsum(kept.long(), 1) - 1
        start = self._row_starts(rows)
        pos = (start.unsqueeze(1) + rank * w).unsqueeze(2) + torch.arange(w, device=rows.device)
        pos = torch.where(kept.unsqueeze(2), pos, torch.zeros_like(pos))  # [n, nb, w]
        per_byte = 8 // self.bits
        empty = self.codes.numel() == 0
        byte = torch.zeros_like(pos, dtype=torch.uint8) if empty else self.codes[pos // per_byte]
        code = (byte.long() >> ((pos % per_byte) * self.bits)) & ((1 << self.bits) - 1)
        qp = self.qparams[rows].float()
        values = code.float() * qp[:, 0].view(-1, 1, 1) + qp[:, 1].view(-1, 1, 1)
        values = torch.where(kept.unsqueeze(2), values, torch.zeros_like(values))
        return values.reshape(rows.shape[0], nb * w)[:, : self.embedding_dim]

    def fast_bag(
        self, indices: torch.Tensor, offsets: torch.Tensor, mode: int, per_sample_weights: torch.Tensor | None
    ) -> torch.Tensor | None:
        if self.codes.device.type != "cpu" or mode not in (0, 1):
            return None
        half = self.scale_dtype == torch.float16
        qparam_bits = self.qparams.view(torch.int16 if half else torch.int32)
        out = np.empty((offsets.shape[0] - 1, self.embedding_dim), dtype=np.float32)  # every row written
        psw = (
            per_sample_weights.float().contiguous().numpy()
            if per_sample_weights is not None
            else np.zeros(0, dtype=np.float32)
        )
        threads = set_threads()
        bad = block_sparse_bag(
            self.codes.numpy(),
            qparam_bits.numpy(),
            half,
            self.block_words.numpy().view(_UNSIGNED[self.block_words.dtype]),
            self.group_ptr.numpy(),
            self.embedding_dim,
            self.block_width,
            self.bits,
            self.block_words.element_size() * 8,
            indices.long().contiguous().numpy(),
            offsets.long().contiguous().numpy(),
            psw,
            per_sample_weights is not None,
            mode == 1,
            self._vector_decode(),
            threads,
            out,
        )
        if bad:
            raise IndexError(f"index out of range in self (num_embeddings={self.num_embeddings})")
        return torch.from_numpy(out)

    def _vector_decode(self) -> bool:
        """Whether the kernel decodes whole bitmap words at once (see ``_kernels``)."""
        word_bits = self.block_words.element_size() * 8
        return (
            VECTOR_DECODE
            and self.block_width == 4
            and self.embedding_dim == 4 * word_bits * self.block_words.shape[1]
            and vector_decode_supported(self.bits)
        )

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "block_width": self.block_width, "num_codes": self.num_codes}

    @classmethod
    def from_tensors(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> BlockSparseTable:
        rows, dim, bits, dtype, pruned = base_fields(meta)
        width = meta_int(meta, "block_width", 1, dim)
        nb = -(-dim // width)
        num_codes = meta_int(meta, "num_codes", 0, rows * nb * width)
        codes = expect_tensor(tensors, "codes", torch.uint8, (packed_length(num_codes, bits),))
        qparams = expect_tensor(tensors, "qparams", dtype, (rows, 2))
        word_dtype, word_bits = word_type(nb)
        words = expect_tensor(tensors, "block_words", word_dtype, (rows, -(-nb // word_bits)))
        groups = -(-rows // GROUP_ROWS)
        group_ptr = expect_tensor(tensors, "group_ptr", torch.int64, (groups + 1,))
        if nb % word_bits and bool(
            ((words[:, -1].long() & ((1 << word_bits) - 1)) >> (nb % word_bits)).any()
        ):
            raise FormatError("tensor 'block_words' marks blocks past the row end as kept")
        table = cls(codes, qparams, words, group_ptr, num_codes, dim, width, bits, pruned)
        per_row = popcount_bytes(words.contiguous().view(torch.uint8)).sum(1) * width
        expected = group_pointers(per_row)
        if not torch.equal(expected, group_ptr) or int(expected[-1]) != num_codes:
            raise FormatError("tensor 'group_ptr' does not match 'block_words' and 'num_codes'")
        if not bool(torch.isfinite(qparams).all()):
            raise FormatError("tensor 'qparams' holds NaN or Inf")
        return table


_UNSIGNED = {torch.int8: np.uint8, torch.int16: np.uint16, torch.int32: np.uint32}


def word_type(num_blocks: int) -> tuple[torch.dtype, int]:
    """(dtype, bits) of the bitmap words for rows of ``num_blocks`` blocks."""
    if num_blocks <= 8:
        return torch.int8, 8
    if num_blocks <= 16:
        return torch.int16, 16
    return torch.int32, 32


def group_pointers(codes_per_row: torch.Tensor) -> torch.Tensor:
    """int64 [groups + 1]: code index where each group of GROUP_ROWS rows starts, then the total."""
    rows = codes_per_row.shape[0]
    groups = -(-rows // GROUP_ROWS)
    padded = torch.zeros(groups * GROUP_ROWS, dtype=torch.int64)
    padded[:rows] = codes_per_row
    out = torch.zeros(groups + 1, dtype=torch.int64)
    out[1:] = torch.cumsum(padded.view(groups, GROUP_ROWS).sum(1), 0)
    return out
