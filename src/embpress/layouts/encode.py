"""Float table + mask -> quantized table in the smallest (or the requested) layout.

The data flow of one table: choose the layout from the mask's statistics alone, derive
which rows must hold an exact zero in place (``quant.rowwise``), compute per-row qparams
over kept entries, quantize in row chunks (bounded extra memory), then pack.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..quant.config import QuantConfig
from ..quant.packing import pack_codes, packed_length
from ..quant.rowwise import RowQParams, choose_qparams, quantize_rows, row_ranges, search_ranges
from .base import QuantizedTable, fused_row_bytes, make_fused
from .block_sparse import GROUP_ROWS, BlockSparseTable
from .dense import DenseTable
from .pruned_rows import PrunedRowsTable, rank_directory

__all__ = ["MaskStats", "encode_table", "layout_sizes", "mask_stats"]

_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class MaskStats:
    """What the layout choice needs to know about a mask."""

    rows: int
    dim: int
    pruned: int
    kept_rows: int
    block_width: int
    kept_blocks: int
    rows_with_pruned: int


def _chunks(rows: int, dim: int) -> range:
    return range(0, rows, max(1, _CHUNK_ELEMENTS // max(dim, 1)))


def _block_view(mask: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(any kept, all kept) per (1 x width) block; the padding of an edge block is ignored."""
    rows, dim = mask.shape
    nb = -(-dim // width)
    pad = nb * width - dim
    any_kept = torch.nn.functional.pad(mask, (0, pad), value=False).view(rows, nb, width).any(2)
    all_kept = torch.nn.functional.pad(mask, (0, pad), value=True).view(rows, nb, width).all(2)
    return any_kept, all_kept


def mask_stats(mask: torch.Tensor | None, rows: int, dim: int, block_width: int) -> MaskStats:
    """Counts for layout sizing; ``block_width`` falls back to 1 where blocks are mixed."""
    if mask is None:
        nb = -(-dim // block_width)
        return MaskStats(rows, dim, 0, rows, block_width, rows * nb, 0)
    pruned = kept_rows = kept_blocks = with_pruned = 0
    uniform = True
    step = _chunks(rows, dim).step
    for start in range(0, rows, step):
        part = mask[start : start + step]
        pruned += int((~part).sum())
        kept_rows += int(part.any(1).sum())
        with_pruned += int((~part.all(1)).sum())
        any_kept, all_kept = _block_view(part, block_width)
        uniform = uniform and bool(torch.equal(any_kept, all_kept))
        kept_blocks += int(any_kept.sum())
    if not uniform:  # pruned entries do not fill whole blocks: store per element
        return (
            mask_stats(mask, rows, dim, 1)
            if block_width != 1
            else MaskStats(rows, dim, pruned, kept_rows, 1, rows * dim - pruned, with_pruned)
        )
    return MaskStats(rows, dim, pruned, kept_rows, block_width, kept_blocks, with_pruned)


def layout_sizes(stats: MaskStats, bits: int, scale_dtype: torch.dtype) -> dict[str, int]:
    """Bytes each layout would take for a table with these statistics."""
    row_bytes = fused_row_bytes(stats.dim, bits, scale_dtype)
    size = torch.empty((), dtype=scale_dtype).element_size()
    nb = -(-stats.dim // stats.block_width)
    groups = -(-stats.rows // GROUP_ROWS)
    return {
        "dense": stats.rows * row_bytes,
        "pruned_rows": (stats.kept_rows + 1) * row_bytes + 5 * ((stats.rows + 7) // 8),
        "block_sparse": packed_length(stats.kept_blocks * stats.block_width, bits)
        + 2 * size * stats.rows
        + stats.rows * ((nb + 7) // 8)
        + 8 * (groups + 1),
    }


def _choose_layout(stats: MaskStats, config: QuantConfig) -> str:
    if config.layout != "auto":
        return config.layout
    sizes = layout_sizes(stats, config.bits, config.resolved_scale_dtype)
    return min(sizes, key=lambda name: (sizes[name], list(sizes).index(name)))


def _zero_rows(layout: str, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Rows that store pruned entries in place (and so need 0 on their grid)."""
    if mask is None or layout == "block_sparse":
        return None
    partial = ~mask.all(1)
    if layout == "pruned_rows":
        partial &= mask.any(1)
    return partial


def _qparams(
    w: torch.Tensor,
    mask: torch.Tensor | None,
    config: QuantConfig,
    zero_rows: torch.Tensor | None,
    saved: RowQParams | None,
) -> RowQParams:
    dtype = config.resolved_scale_dtype
    lo_parts, hi_parts = [], []
    step = _chunks(w.shape[0], w.shape[1]).step
    for start in range(0, w.shape[0], step):
        stop = start + step
        part_mask = None if mask is None else mask[start:stop]
        lo, hi = row_ranges(w[start:stop], part_mask)
        if config.resolved_range_search and saved is None:
            lo, hi = search_ranges(w[start:stop], part_mask, lo, hi, config.bits)
        lo_parts.append(lo)
        hi_parts.append(hi)
    lo, hi = torch.cat(lo_parts), torch.cat(hi_parts)
    fresh = choose_qparams(lo, hi, config.bits, dtype, zero_rows)
    if saved is None:
        return fresh
    # quantize-first: keep the saved row parameters; rows that must hold 0 in place get
    # the smallest grid around their (already quantized) kept values that has an exact 0.
    keep = torch.ones(w.shape[0], dtype=torch.bool) if zero_rows is None else ~zero_rows
    scale = torch.where(keep, saved.scale, fresh.scale)
    offset = torch.where(keep, saved.offset, fresh.offset)
    return RowQParams(scale, offset, dtype)


def encode_table(
    w: torch.Tensor,
    mask: torch.Tensor | None,
    config: QuantConfig,
    *,
    block_width: int = 1,
    saved_qparams: RowQParams | None = None,
) -> QuantizedTable:
    """Quantize float ``w`` [N, D] keeping ``mask`` (True = kept; None = all) into a table.

    ``block_width`` is the width of the sparsifier's blocks, used by the block-sparse
    layout when the pruned entries fill whole (1 x width) blocks. ``saved_qparams`` are
    the row parameters of an earlier quantization (quantize-first order).
    """
    w = w.detach()
    rows, dim = w.shape
    stats = mask_stats(mask, rows, dim, max(1, min(block_width, dim)))
    layout = _choose_layout(stats, config)
    zero_rows = _zero_rows(layout, mask)
    qp = _qparams(w, mask, config, zero_rows, saved_qparams)
    zero_codes = qp.zero_codes()
    bits, dtype = config.bits, config.resolved_scale_dtype

    def codes_of(start: int, stop: int) -> torch.Tensor:
        part = RowQParams(qp.scale[start:stop], qp.offset[start:stop], dtype)
        codes = quantize_rows(w[start:stop], part, bits)
        if mask is not None:
            codes = torch.where(mask[start:stop], codes, zero_codes[start:stop].unsqueeze(1))
        return codes

    step = _chunks(rows, dim).step
    if layout == "dense":
        fused = torch.cat(
            [
                make_fused(
                    codes_of(s, s + step), qp.scale[s : s + step], qp.offset[s : s + step], bits, dtype
                )
                for s in range(0, rows, step)
            ]
        )
        return DenseTable(fused, dim, bits, dtype, stats.pruned)
    if layout == "pruned_rows":
        kept = torch.ones(rows, dtype=torch.bool) if mask is None else mask.any(1)
        parts = []
        for s in range(0, rows, step):
            sel = kept[s : s + step]
            parts.append(
                make_fused(
                    codes_of(s, s + step)[sel],
                    qp.scale[s : s + step][sel],
                    qp.offset[s : s + step][sel],
                    bits,
                    dtype,
                )
            )
        parts.append(torch.zeros(1, fused_row_bytes(dim, bits, dtype), dtype=torch.uint8))
        row_bits = pack_codes(kept.to(torch.uint8), 1)
        return PrunedRowsTable(
            torch.cat(parts), row_bits, rank_directory(row_bits), rows, dim, bits, dtype, stats.pruned
        )
    return _encode_block_sparse(w, mask, stats, qp, codes_of, step, bits, dtype)


def _encode_block_sparse(
    w: torch.Tensor,
    mask: torch.Tensor | None,
    stats: MaskStats,
    qp: RowQParams,
    codes_of: Callable[[int, int], torch.Tensor],
    step: int,
    bits: int,
    dtype: torch.dtype,
) -> BlockSparseTable:
    rows, dim = w.shape
    width = stats.block_width
    nb = -(-dim // width)
    pad = nb * width - dim
    streams, bitmaps, per_row = [], [], []
    for s in range(0, rows, step):
        codes = torch.nn.functional.pad(codes_of(s, s + step), (0, pad)).view(-1, nb, width)
        if mask is None:
            kept = torch.ones(codes.shape[:2], dtype=torch.bool)
        else:
            kept = _block_view(mask[s : s + step], width)[0]
        streams.append(codes[kept].reshape(-1))
        bitmaps.append(pack_codes(kept.to(torch.uint8), 1))
        per_row.append(kept.sum(1) * width)
    stream = torch.cat(streams)
    counts = torch.cat(per_row)
    groups = -(-rows // GROUP_ROWS)
    padded = torch.zeros(groups * GROUP_ROWS, dtype=torch.int64)
    padded[:rows] = counts
    group_ptr = torch.zeros(groups + 1, dtype=torch.int64)
    group_ptr[1:] = torch.cumsum(padded.view(groups, GROUP_ROWS).sum(1), 0)
    return BlockSparseTable(
        pack_codes(stream.unsqueeze(0), bits).reshape(-1),
        qp.scale.to(dtype),
        qp.offset.to(dtype),
        torch.cat(bitmaps),
        group_ptr,
        int(stream.numel()),
        dim,
        width,
        bits,
        stats.pruned,
    )
