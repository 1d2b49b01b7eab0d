"""Float table + mask -> quantized table in the smallest (or the requested) layout.

The data flow of one table: count the mask (``stats.row_stats``), choose the layout from
those counts alone (each registered layout predicts its bytes), ask it which rows must
hold an exact zero in place (``quant.rowwise``), compute per-row qparams over kept
entries, quantize and measure the error in one numba pass, then let the layout pack the
codes. Nothing here knows a layout by name: it reads ``registry.TABLE_CLASSES``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch

from .._aot import KernelRef
from .._buffers import empty
from .._parallel import parallel_call, rows_call, split_call
from ..quant.config import QuantConfig
from ..quant.rowwise import RowQParams, check_span, choose_qparams, search_ranges
from .base import EncodedTable, QuantizedTable
from .registry import AUTO, TABLE_CLASSES, table_class
from .stats import MaskStats, row_stats

# numba kernels, loaded (with numba) on first use (see ``_aot``)
count_nonfinite = KernelRef("embpress._finite", "count_nonfinite", returns="int64")
encode_rows = KernelRef("embpress.layouts._encode_kernels", "encode_rows")
encode_rows_run = KernelRef("embpress.layouts._encode_kernels", "encode_rows_run", returns="none")
fake_quantize = KernelRef("embpress.layouts._encode_kernels", "fake_quantize", returns="none")
kept_minmax = KernelRef("embpress.layouts._encode_kernels", "kept_minmax", returns="none")

__all__ = [
    "ERROR_BLOCK_ROWS",
    "ErrorSums",
    "choose_layout",
    "encode_part",
    "encode_table",
    "fake_quantize_table",
    "finite_table",
    "layout_sizes",
    "nonfinite_count",
    "plain_qparams",
]


def layout_sizes(stats: MaskStats, bits: int, scale_dtype: torch.dtype) -> dict[str, int]:
    """Bytes each registered layout would take for a table with these statistics."""
    return {name: cls.predicted_nbytes(stats, bits, scale_dtype) for name, cls in TABLE_CLASSES.items()}


def choose_layout(stats: MaskStats, config: QuantConfig) -> type[QuantizedTable]:
    """The layout ``config`` asks for; for "auto", the one predicting the fewest bytes among
    those that take part in "auto" (``in_auto``; the first registered of those that tie)."""
    if config.layout != AUTO:
        return table_class(config.layout)
    sizes = {
        name: size
        for name, size in layout_sizes(stats, config.bits, config.resolved_scale_dtype).items()
        if TABLE_CLASSES[name].in_auto
    }
    return TABLE_CLASSES[min(sizes, key=sizes.__getitem__)]  # min keeps the first of a tie


def _qparams(
    w: np.ndarray,
    mask: np.ndarray | None,
    config: QuantConfig,
    zero_rows: torch.Tensor | None,
    saved: RowQParams | None,
) -> RowQParams:
    dtype = config.resolved_scale_dtype
    if saved is not None and zero_rows is None:
        return saved
    lo_np, hi_np = np.zeros(w.shape[0], np.float32), np.zeros(w.shape[0], np.float32)
    if mask is None:
        rows_call(kept_minmax, w, _NO_MASK, False, lo_np, hi_np, rows=(0, 3, 4))
    else:
        rows_call(kept_minmax, w, mask, True, lo_np, hi_np, rows=(0, 1, 3, 4))
    lo, hi = torch.from_numpy(lo_np), torch.from_numpy(hi_np)
    if config.resolved_range_search and saved is None:
        lo, hi = search_ranges(
            torch.from_numpy(w), None if mask is None else torch.from_numpy(mask), lo, hi, config.bits
        )
    fresh = choose_qparams(lo, hi, config.bits, dtype, zero_rows)
    if saved is None:
        return fresh
    # quantize-first: keep the saved row parameters; rows that must hold 0 in place get
    # the smallest grid around their (already quantized) kept values that has an exact 0.
    keep = torch.ones(w.shape[0], dtype=torch.bool) if zero_rows is None else ~zero_rows
    scale = torch.where(keep, saved.scale, fresh.scale)
    offset = torch.where(keep, saved.offset, fresh.offset)
    return RowQParams(scale, offset, dtype)


_NO_MASK = np.ones((1, 1), dtype=np.bool_)


def plain_qparams(w: torch.Tensor, config: QuantConfig) -> RowQParams:
    """Row parameters of the whole rows (no mask): what quantize-first saves."""
    return _qparams(_as_numpy(w), None, config, None, None)


def fake_quantize_table(w: torch.Tensor, qp: RowQParams, bits: int) -> torch.Tensor:
    """``dequantize(quantize(w))`` with the given row parameters."""
    x = _as_numpy(w)
    out = empty(x.shape, np.float32)
    rows_call(fake_quantize, x, qp.scale.numpy(), qp.offset.numpy(), bits, out, rows=(0, 1, 2, 4))
    return torch.from_numpy(out)


def encode_scratch_sizes(cols: int, width: int) -> tuple[int, int]:
    """(bytes of the code rows, floats of the folded sum rows) of one thread's scratch in
    ``encode_rows_run`` (as ``_encode_kernels.scratch_sizes``)."""
    nb = -(-cols // width)
    span = 8  # the padded row the sums fold: a power of two
    while span < cols:
        span *= 2
    return 4 * ((nb * width + 3) // 4), span


def _encode(args: tuple[Any, ...], rows: int, cols: int, width: int) -> None:
    """``encode_rows(*args)``: compiled ahead of time where it can be, row ranges on
    several threads with scratch rows of their own; else numba's parallel kernel."""
    whole, span = encode_scratch_sizes(cols, width)

    def part(r0: int, r1: int) -> tuple[Any, ...]:
        scratch = (np.zeros(whole, np.uint8), np.zeros(whole, np.uint8), np.zeros(span, np.float32))
        return (*args, r0, r1, *scratch, np.zeros(span, np.float32), np.zeros(cols, np.float32))

    compiled = encode_rows_run.compiled(part(0, 0))
    if compiled is None:
        parallel_call(encode_rows, *args)
    else:
        split_call(compiled, rows, part, minimum=256)


def finite_table(
    w: torch.Tensor, config: QuantConfig, name: str = "table", count: bool = True, remedy: str | None = None
) -> torch.Tensor:
    """``w`` as contiguous float32 on CPU; NaN/Inf refused (or zeroed, per
    ``config.nonfinite``); not looked for where not ``count`` (the caller learns of them
    otherwise). ``remedy``: what the refusal suggests, where the caller cannot zero them."""
    if w.dim() != 2 or w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"{name} is empty or not 2-D (shape {tuple(w.shape)})")
    if not w.is_floating_point():
        raise TypeError(f"{name} has dtype {w.dtype}, expected a float dtype")
    out = w.detach().to("cpu", torch.float32).contiguous()
    if not count:
        return out
    found = nonfinite_count(out)
    if found:
        beyond = found - int((~torch.isfinite(w)).sum()) if w.dtype == torch.float64 else 0
        if beyond:  # finite, but inf once float32: not what nonfinite='zero' is for
            raise ValueError(
                f"{name} holds {beyond} finite value(s) beyond float32's range (magnitude above "
                "3.4e38), which no code can hold; scale the table down"
            )
        if config.nonfinite == "raise":
            fix = remedy or "fix the table or pass QuantConfig(nonfinite='zero') to treat them as 0.0"
            raise ValueError(f"{name} holds {found} NaN/Inf value(s); {fix}")
        out = torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
    return out


def nonfinite_count(w: torch.Tensor) -> int:
    """How many NaN/Inf a contiguous float32 CPU table holds (row ranges on several threads)."""
    return int(rows_call(count_nonfinite, w.numpy(), rows=(0,)))


MAX_BLOCK_WIDTH = (1 << 31) - 1


def checked_block_width(block_width: object) -> int:
    """``block_width`` as an int in [1, MAX_BLOCK_WIDTH]; ValueError otherwise.

    The width reaches numba kernels (as an int64) and array sizes: a float, a bool or a
    Python int beyond int64 would fail there with a TypingError or OverflowError.
    """
    if isinstance(block_width, bool) or not isinstance(block_width, (int, np.integer)):
        raise ValueError(f"block_width must be an integer, got {block_width!r}")
    if not 1 <= int(block_width) <= MAX_BLOCK_WIDTH:
        raise ValueError(f"block_width must be in [1, {MAX_BLOCK_WIDTH}], got {int(block_width)}")
    return int(block_width)


def _checked_saved(saved: RowQParams, rows: int, dtype: torch.dtype) -> RowQParams:
    """``saved`` as contiguous float32 CPU tensors of ``rows`` entries; ValueError if they
    do not belong to this table (the encode kernel reads one entry per row, unchecked)."""
    if not isinstance(saved, RowQParams):
        raise TypeError(f"saved_qparams must be a RowQParams, got {type(saved).__name__}")
    for name in ("scale", "offset"):
        value = getattr(saved, name)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (rows,):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"saved_qparams.{name} must have shape ({rows},), got {shape}")
    if saved.dtype != dtype:
        raise ValueError(f"saved_qparams are for scale dtype {saved.dtype}, the config uses {dtype}")
    return RowQParams(_as_cpu_float(saved.scale), _as_cpu_float(saved.offset), dtype)


def _as_cpu_float(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).contiguous()


def _as_numpy(w: torch.Tensor) -> np.ndarray:
    return w.detach().to("cpu", torch.float32).contiguous().numpy()


ERROR_BLOCK_ROWS = 256  # rows per partial error sum: a divisor of every row chunk's size


class ErrorSums(NamedTuple):
    """A table's error as partial sums per ``ERROR_BLOCK_ROWS`` rows, so that a table
    encoded in row chunks (or by several processes) reports exactly the same figures as
    one encoded at once: the partials are the same numbers, added up the same way."""

    err_sq: np.ndarray  # float64 per block of rows: squared errors against the reference
    ref_sq: np.ndarray  # float64 per block of rows: the reference's squares
    max_abs: float  # largest |error|

    @classmethod
    def of_rows(cls, err_sq: np.ndarray, ref_sq: np.ndarray, max_abs: np.ndarray) -> ErrorSums:
        """The partial sums of per-row figures."""
        starts = np.arange(0, err_sq.shape[0], ERROR_BLOCK_ROWS)
        if not starts.size:
            return cls(np.zeros(0), np.zeros(0), 0.0)
        return cls(np.add.reduceat(err_sq, starts), np.add.reduceat(ref_sq, starts), float(max_abs.max()))

    def __add__(self, other: object) -> ErrorSums:
        """The partials of the rows of ``self`` followed by those of ``other``."""
        if not isinstance(other, ErrorSums):
            return NotImplemented
        return ErrorSums(
            np.concatenate([self.err_sq, other.err_sq]),
            np.concatenate([self.ref_sq, other.ref_sq]),
            max(self.max_abs, other.max_abs),
        )

    def summary(self) -> dict[str, float]:
        """Relative Frobenius error (absolute for an all-zero reference) and max |error|;
        the partials are added with ``math.fsum`` (exact, whatever their grouping)."""
        err, ref = math.fsum(self.err_sq), math.fsum(self.ref_sq)
        rel = math.sqrt(err / ref) if ref > 0 else math.sqrt(err)
        return {"rel_frobenius": rel, "max_abs": self.max_abs}


def encode_table(
    w: torch.Tensor,
    mask: torch.Tensor | None,
    config: QuantConfig,
    *,
    block_width: int = 1,
    saved_qparams: RowQParams | None = None,
    reference: torch.Tensor | None = None,
    checked: bool = False,
) -> tuple[QuantizedTable, dict[str, float]]:
    """Quantize float ``w`` [N, D] keeping ``mask`` (True = kept; None = all) into a table.

    ``block_width`` is the width of the sparsifier's blocks (an int in [1, 2**31 - 1],
    ValueError otherwise), used by the block-sparse layout when the pruned entries fill
    whole (1 x width) blocks; a width past the row is the whole row. ``saved_qparams`` are
    the row parameters of an earlier quantization (quantize-first order). Returns the
    table and its error (relative Frobenius, max |error|) against ``reference``
    (default ``w``), measured while encoding. ``checked``: ``w`` already went through
    :func:`finite_table`.
    """
    table, sums = encode_part(
        w,
        mask,
        config,
        block_width=block_width,
        saved_qparams=saved_qparams,
        reference=reference,
        checked=checked,
    )
    return table, sums.summary()


def encode_part(
    w: torch.Tensor,
    mask: torch.Tensor | None,
    config: QuantConfig,
    *,
    block_width: int = 1,
    saved_qparams: RowQParams | None = None,
    reference: torch.Tensor | None = None,
    checked: bool = False,
    fixed_width: bool = False,
) -> tuple[QuantizedTable, ErrorSums]:
    """:func:`encode_table` with the error as sums, for tables encoded in row chunks.

    ``fixed_width``: count the mask in (1 x ``block_width``) blocks as given (the caller
    checked that no block mixes kept and pruned entries anywhere in the table), so every
    chunk of one table agrees on it.
    """
    block_width = checked_block_width(block_width)
    x = _as_numpy(w) if checked else finite_table(w, config).numpy()
    ref = x if reference is None else _as_numpy(reference)
    rows, dim = x.shape
    # the kernels index the mask and the reference by the table's shape, unchecked
    for name, other in (("mask", mask), ("reference", reference)):
        if other is not None and tuple(other.shape) != (rows, dim):
            raise ValueError(f"{name} shape {tuple(other.shape)} != table shape {(rows, dim)}")
    if saved_qparams is not None:
        saved_qparams = _checked_saved(saved_qparams, rows, config.resolved_scale_dtype)
    m = None if mask is None else mask.to("cpu", torch.bool).contiguous().numpy()
    rs = row_stats(m, rows, dim, min(block_width, dim))
    if fixed_width and rs.width != min(block_width, dim):
        raise ValueError(f"the mask mixes kept and pruned entries in (1 x {block_width}) blocks")
    stats = rs.summary()
    layout = choose_layout(stats, config)
    zero_rows = layout.zero_rows(rs)
    bits, dtype = config.bits, config.resolved_scale_dtype
    # the common case (float32 qparams from the kept range) is derived inside the encode
    # kernel, which then reads the table once instead of twice
    derive = (
        dtype == torch.float32
        and zero_rows is None
        and saved_qparams is None
        and not config.resolved_range_search
    )
    if derive:
        qp = RowQParams(torch.empty(rows), torch.empty(rows), dtype)
    else:
        qp = _qparams(x, m, config, zero_rows, saved_qparams)
    by_block = layout.codes_per_block
    width = rs.width if by_block else dim
    code_start = np.zeros(rows, dtype=np.int64)
    if by_block:
        np.cumsum(rs.blocks[:-1] * width, out=code_start[1:])
        codes = empty(int(rs.blocks.sum()) * width, np.uint8)
    else:
        codes = empty(rows * dim, np.uint8)
    err_sq, ref_sq = np.empty(rows), np.empty(rows)
    max_abs = np.empty(rows, dtype=np.float32)
    args = (
        x,
        ref,
        _NO_MASK if m is None else m,
        m is not None,
        qp.scale.numpy(),
        qp.offset.numpy(),
        np.zeros(rows, dtype=np.uint8) if derive else qp.zero_codes().numpy(),
        bits,
        width,
        by_block,
        code_start,
        codes,
        err_sq,
        ref_sq,
        max_abs,
        derive,
    )
    _encode(args, rows, dim, width)
    if derive:  # (choose_qparams checks the others)
        check_span(qp.scale.double() * ((1 << bits) - 1))
    sums = ErrorSums.of_rows(err_sq, ref_sq, max_abs)
    return layout.pack(EncodedTable(codes, code_start, qp, bits, rs, stats)), sums
