"""Row-wise asymmetric quantization: per-row qparams, codes, and how zero stays exact.

A row decodes as ``x = code * scale + offset`` with ``code`` in ``[0, 2**bits - 1]``;
``scale`` and ``offset`` are stored in the row's scale dtype (float32 or float16), and
every value computed here is already exactly representable in it.

Exact zeros. A pruned entry is either not stored at all (block-sparse and pruned-row
layouts drop it: the lookup adds nothing for it) or, where a layout stores it in place,
it gets the row's *zero code* ``z``. Such rows get qparams with ``offset == -(z * scale)``
exactly, and ``scale`` rounded up to ``m - bits`` significant bits (``m`` = 24 for
float32, 11 for float16), so that ``z * scale`` needs at most ``m`` bits: the product is
exact in float32 and ``offset`` holds its negation exactly. Then ``z * scale + offset``
is exactly ``0.0`` whether the kernel multiplies and adds or uses a fused multiply-add.
Rows without stored pruned entries use plain min/max (or the searched range) of their
kept entries, which is tighter than a range that must include 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._aot import KernelRef
from .._parallel import parallel_call, split_call

# numba kernels, loaded (with numba) on first use (see ``_aot``)
greedy_ranges = KernelRef("embpress.quant._search", "greedy_ranges")
greedy_ranges_run = KernelRef("embpress.quant._search", "greedy_ranges_run", returns="none")
_NBINS, _RATIO = 200, 0.16  # FBGEMM's search: 200 bins, up to 16% of them clipped

__all__ = [
    "RowQParams",
    "choose_qparams",
    "dequantize_codes",
    "quantize_rows",
    "row_ranges",
    "search_ranges",
]

_MANTISSA_BITS = {torch.float32: 24, torch.float16: 11}
_MIN_SPACING_LOG2 = {torch.float32: -149, torch.float16: -24}
_MIN_NORMAL_LOG2 = {torch.float32: -126, torch.float16: -14}
_MAX_VALUE = {torch.float32: float(torch.finfo(torch.float32).max), torch.float16: 65504.0}


@dataclass
class RowQParams:
    """Per-row scale and offset as float32 tensors holding values exact in ``dtype``."""

    scale: torch.Tensor
    offset: torch.Tensor
    dtype: torch.dtype

    def zero_codes(self) -> torch.Tensor:
        """The code that decodes to exactly 0.0 in rows built with ``zero_rows`` (0 if scale is 0)."""
        safe = torch.where(self.scale == 0, torch.ones_like(self.scale), self.scale)
        return torch.where(self.scale == 0, 0.0, torch.round(-self.offset / safe)).to(torch.uint8)


def row_ranges(w: torch.Tensor, kept: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of each row over its kept entries (0, 0 for a row with none)."""
    if kept is None:
        if w.shape[1] == 0:
            zeros = torch.zeros(w.shape[0], dtype=torch.float32)
            return zeros, zeros.clone()
        return w.amin(1).float(), w.amax(1).float()
    inf = torch.tensor(float("inf"), dtype=w.dtype)
    lo = torch.where(kept, w, inf).amin(1).float()
    hi = torch.where(kept, w, -inf).amax(1).float()
    empty = ~kept.any(1)
    lo[empty] = 0.0
    hi[empty] = 0.0
    return lo, hi


def search_scratch_width(cols: int) -> int:
    """Floats of each scratch array of ``greedy_ranges_run`` on rows of ``cols`` values (as
    ``_search.padded_width``: two rows, each a multiple of its 8 lanes; a test compares)."""
    return 2 * (-(-cols // 8) * 8)


def search_ranges(
    w: torch.Tensor, kept: torch.Tensor | None, lo: torch.Tensor, hi: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """FBGEMM-style greedy clipping-range search per row, on kept entries only."""
    w_np = w.detach().float().contiguous().numpy()
    kept_np = np.ones((1, 1), dtype=np.bool_) if kept is None else kept.contiguous().numpy()
    lo_np, hi_np = lo.numpy().copy(), hi.numpy().copy()
    args = (w_np, kept_np, kept is not None, lo_np, hi_np, bits, _NBINS, _RATIO)
    padded = search_scratch_width(w_np.shape[1])

    rows = w_np.shape[0]

    def part(p0: int, p1: int) -> tuple[Any, ...]:  # pairs of rows: parts start at even rows
        r0, r1 = 2 * p0, min(rows, 2 * p1)
        return (*args, r0, r1, np.zeros(padded, np.float32), np.zeros(padded, np.float32))

    compiled = greedy_ranges_run.compiled(part(0, 0))
    if compiled is None:
        parallel_call(greedy_ranges, *args)
    else:
        split_call(compiled, (rows + 1) // 2, part, minimum=32)
    return torch.from_numpy(lo_np), torch.from_numpy(hi_np)


def _round_sig(x: torch.Tensor, sig_bits: int, dtype: torch.dtype, up: bool | None) -> torch.Tensor:
    """Round float64 ``x`` up, down or (``up=None``) to nearest, to ``sig_bits`` significant bits."""
    _, exp = torch.frexp(x)  # x = mant * 2**exp, 0.5 <= |mant| < 1
    step_log2 = torch.clamp(exp.double() - sig_bits, min=_MIN_SPACING_LOG2[dtype])
    step = torch.exp2(step_log2)
    scaled = x / step
    rounding = {None: torch.round, True: torch.ceil, False: torch.floor}[up]
    rounded = rounding(scaled)
    return torch.where(x == 0, x, rounded * step)


def _check_range(values: torch.Tensor, dtype: torch.dtype) -> None:
    if bool((values.abs() > _MAX_VALUE[dtype]).any()):
        raise ValueError(
            f"row scale or offset does not fit in {dtype}: table values are too large; "
            "use QuantConfig(scale_dtype=torch.float32)"
        )


def choose_qparams(
    lo: torch.Tensor,
    hi: torch.Tensor,
    bits: int,
    dtype: torch.dtype,
    zero_rows: torch.Tensor | None = None,
) -> RowQParams:
    """Scale and offset per row covering ``[lo, hi]``; rows in ``zero_rows`` also hold an exact 0."""
    levels = (1 << bits) - 1
    mant = _MANTISSA_BITS[dtype]
    lo64, hi64 = lo.double(), hi.double()
    # Offset at or below the row minimum. A float32 scale is rounded to nearest (a top value
    # an ulp past the grid is clamped to the last code); a float16 one is rounded up, since
    # near its subnormal range nearest rounding could lose most of the range.
    offset = _round_sig(lo64, mant, dtype, up=False)
    scale = _round_sig((hi64 - offset) / levels, mant, dtype, up=None if dtype == torch.float32 else True)
    # a range below the dtype's resolution still needs a non-zero step
    scale = torch.where(
        (scale == 0) & (hi64 > offset),
        torch.exp2(torch.tensor(_MIN_SPACING_LOG2[dtype], dtype=torch.float64)),
        scale,
    )
    if zero_rows is not None and bool(zero_rows.any()):
        rows = zero_rows.nonzero().flatten()
        z_scale, z_offset = _zero_grid(lo64[rows], hi64[rows], bits, dtype)
        scale[rows] = z_scale
        offset[rows] = z_offset
    _check_range(scale, dtype)
    _check_range(offset, dtype)
    check_span(scale * levels)
    return RowQParams(scale=scale.float(), offset=offset.float(), dtype=dtype)


def check_span(span: torch.Tensor) -> None:
    """Refuse rows whose grid spans more than float32 holds: decoding the top code as
    ``code * scale + offset`` would overflow to inf (FBGEMM's fused multiply-add would not,
    so lookups and ``dequantize()`` would disagree)."""
    if bool((span > _MAX_VALUE[torch.float32]).any()):
        raise ValueError(
            "a row's values span more than float32 holds (its largest minus its smallest value "
            "is above 3.4e38): scale the table down"
        )


def _zero_grid(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest scale whose grid ``{(c - z) * scale}`` covers ``[lo, hi]`` with 0 on it exactly."""
    levels = (1 << bits) - 1
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    span = hi - lo
    frac = torch.where(span > 0, -lo / torch.where(span > 0, span, 1.0), 0.0)
    best_scale = torch.full_like(lo, math.inf)
    best_z = torch.zeros_like(lo)
    base = torch.floor(frac * levels)
    for delta in (-1.0, 0.0, 1.0, 2.0):
        z = torch.clamp(base + delta, 0, levels)
        need_lo = torch.where(z > 0, -lo / torch.where(z > 0, z, 1.0), torch.where(lo < 0, math.inf, 0.0))
        need_hi = torch.where(
            z < levels, hi / torch.where(z < levels, levels - z, 1.0), torch.where(hi > 0, math.inf, 0.0)
        )
        s = torch.maximum(need_lo, need_hi)
        better = s < best_scale
        best_scale = torch.where(better, s, best_scale)
        best_z = torch.where(better, z, best_z)
    scale = _round_sig(best_scale, _MANTISSA_BITS[dtype] - bits, dtype, up=True)
    for _ in range(64):  # fp16 subnormal corner: make z * scale land on dtype's grid
        offset = -(best_z * scale)
        _check_range(scale, dtype)  # (beyond the dtype's range no offset lands on its grid)
        _check_range(offset, dtype)
        bad = offset.to(dtype).double() != offset
        if not bool(bad.any()):
            return scale, offset
        spacing = _spacing(offset[bad], dtype)
        scale[bad] = torch.ceil(scale[bad] / spacing) * spacing + spacing * (scale[bad] % spacing == 0)
    raise RuntimeError("could not place an exact zero on the quantization grid")  # pragma: no cover


def _spacing(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Distance between adjacent ``dtype`` values around float64 ``x``."""
    _, exp = torch.frexp(x.abs())
    e = torch.clamp(exp.double() - 1, min=_MIN_NORMAL_LOG2[dtype])
    return torch.exp2(e - (_MANTISSA_BITS[dtype] - 1))


def quantize_rows(w: torch.Tensor, qp: RowQParams, bits: int) -> torch.Tensor:
    """uint8 codes ``round((w - offset) / scale)`` clamped to the b-bit range (0 where scale is 0)."""
    levels = (1 << bits) - 1
    scale = qp.scale.unsqueeze(1)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.round((w.float() - qp.offset.unsqueeze(1)) / safe).clamp_(0, levels)
    codes = torch.where(scale == 0, torch.zeros_like(codes), codes)
    return codes.to(torch.uint8)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """float32 ``codes * scale + offset`` row-wise (``scale``/``offset`` of shape [rows])."""
    return codes.float() * scale.float().unsqueeze(-1) + offset.float().unsqueeze(-1)
