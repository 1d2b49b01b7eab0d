"""What a mask says about a table before it is encoded, in no layout's terms.

One pass over the mask gives per-row counts (``RowStats``: kept entries, kept blocks, the
kept-block bitmap) and their summary (``MaskStats``). A layout predicts its bytes from the
summary alone (``QuantizedTable.predicted_nbytes``), so "auto" can choose before anything
is quantized; packing reads the per-row counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .._aot import KernelRef
from .._parallel import rows_call

# numba kernels, loaded (with numba) on first use (see ``_aot``)
count_blocks = KernelRef("embpress.layouts._encode_kernels", "count_blocks", returns="none")
count_blocks_of_4 = KernelRef("embpress.layouts._encode_kernels", "count_blocks_of_4", returns="none")

__all__ = ["BITMAP_WORD_BITS", "MaskStats", "RowStats", "flagged_rows", "merge_stats", "row_stats"]

BITMAP_WORD_BITS = 32  # RowStats.bitmap's words: uint32, bit k % 32 of word k // 32 is block k


@dataclass(frozen=True)
class MaskStats:
    """What a layout's size depends on: counts over the mask."""

    rows: int
    dim: int
    pruned: int
    kept_rows: int  # rows with a kept entry
    block_width: int
    kept_blocks: tuple[int, ...]  # rows with 0, 1, ... nb kept (1 x block_width) blocks


@dataclass(frozen=True)
class RowStats:
    """Per-row counts of one pass over a mask, in (1 x ``width``) blocks."""

    dim: int
    width: int  # the block width asked for, or 1 where the mask's blocks were mixed
    kept: np.ndarray  # int64 [rows]: kept entries
    blocks: np.ndarray  # int64 [rows]: blocks with a kept entry
    # uint32 [rows, ceil(nb / 32)]: bit k % 32 of word k // 32 set iff block k is kept; read
    # as little-endian bytes, bit k sits at bit k % 8 of byte k // 8
    bitmap: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.kept.shape[0])

    def summary(self) -> MaskStats:
        """The counts a layout's predicted size depends on."""
        return MaskStats(
            rows=self.rows,
            dim=self.dim,
            pruned=self.rows * self.dim - int(self.kept.sum()),
            kept_rows=int((self.kept > 0).sum()),
            block_width=self.width,
            kept_blocks=tuple(int(n) for n in np.bincount(self.blocks, minlength=-(-self.dim // self.width))),
        )


def row_stats(mask: np.ndarray | None, rows: int, dim: int, width: int) -> RowStats:
    """Counts of bool ``mask`` [rows, dim] (True = kept; None = all kept) in (1 x ``width``)
    blocks, ``width`` in [1, dim]; it falls back to 1 where a block mixes kept and pruned
    entries (the block-sparse layout stores whole blocks only)."""
    nb = -(-dim // width)
    if mask is None:
        bitmap = np.zeros((rows, -(-nb // BITMAP_WORD_BITS)), dtype=np.uint32)
        for k in range(nb):
            bitmap[:, k // BITMAP_WORD_BITS] |= np.uint32(1 << (k % BITMAP_WORD_BITS))
        kept = np.full(rows, dim, dtype=np.int64)
        return RowStats(dim, width, kept, np.full(rows, nb, dtype=np.int64), bitmap)
    kept, blocks, mixed = (np.empty(rows, dtype=np.int64) for _ in range(3))
    bitmap = np.zeros((rows, -(-nb // BITMAP_WORD_BITS)), dtype=np.uint32)
    if width == 4 and dim % 4 == 0:
        rows_call(count_blocks_of_4, mask.view(np.uint32), kept, blocks, mixed, bitmap, rows=(0, 1, 2, 3, 4))
    else:
        rows_call(count_blocks, mask, width, kept, blocks, mixed, bitmap, rows=(0, 2, 3, 4, 5))
    if width > 1 and int(mixed.sum()) > 0:
        return row_stats(mask, rows, dim, 1)
    return RowStats(dim, width, kept, blocks, bitmap)


def merge_stats(parts: list[MaskStats]) -> MaskStats:
    """The statistics of a table from those of its row chunks (same dim and block width)."""
    if not parts:
        raise ValueError("merge_stats needs at least one part")
    first = parts[0]
    for part in parts:
        if (part.dim, part.block_width) != (first.dim, first.block_width):
            raise ValueError(
                f"row chunks of one table differ: dim/block width {(part.dim, part.block_width)} "
                f"!= {(first.dim, first.block_width)}"
            )
    kept_blocks = np.zeros(max(len(p.kept_blocks) for p in parts), dtype=np.int64)
    for part in parts:
        kept_blocks[: len(part.kept_blocks)] += part.kept_blocks
    return MaskStats(
        rows=sum(p.rows for p in parts),
        dim=first.dim,
        pruned=sum(p.pruned for p in parts),
        kept_rows=sum(p.kept_rows for p in parts),
        block_width=first.block_width,
        kept_blocks=tuple(int(n) for n in kept_blocks),
    )


def flagged_rows(flags: np.ndarray) -> torch.Tensor | None:
    """Bool tensor of the rows ``flags`` marks, or None if it marks none (what
    ``quant.rowwise.choose_qparams`` takes as ``zero_rows``)."""
    return torch.from_numpy(flags) if bool(flags.any()) else None
