"""QuantConfig: how a table's kept entries are quantized and stored."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["QuantConfig"]

_SCALE_DTYPES = (torch.float32, torch.float16)


def _layout_choices() -> tuple[str, ...]:
    """The layout names a config accepts ("auto" first). The registry is imported when a
    config is checked, not with this module: the layouts, which encode by a config, import
    this module."""
    from ..layouts.registry import layout_choices

    return layout_choices()


@dataclass(frozen=True)
class QuantConfig:
    """Row-wise quantization settings (one config, one handler: ``post_training_sparse_quantize``).

    Args:
        bits: 8, 4 or 2 bits per kept entry.
        scale_dtype: dtype of each row's scale and offset. ``None`` picks FBGEMM's
            convention (float32 at 8 bits, float16 at 4 and 2 bits), which lets the
            dense and pruned-row layouts use torch's FBGEMM lookup kernels.
        range_search: search each row for the clipping range with the least squared
            error (FBGEMM's greedy search: 200 bins, up to 16% trimmed). ``None`` turns
            it on at 4 and 2 bits, where it pays; at 8 bits plain min/max is as good.
        layout: ``"auto"`` (the smallest, table by table) or a registered layout's name
            (``embpress.layouts.layout_choices()``: ``"dense"``, ``"pruned_rows"``,
            ``"block_sparse"``, and ``"mixed"``, which "auto" never picks: with one
            config it holds every row in the rowwise codec of ``bits``).
        nonfinite: ``"raise"`` refuses a table with NaN/Inf (the default);
            ``"zero"`` replaces them by 0.0 before compression.
    """

    bits: int = 8
    scale_dtype: torch.dtype | None = None
    range_search: bool | None = None
    layout: str = "auto"
    nonfinite: str = "raise"

    def __post_init__(self) -> None:
        # an int (a float 8.0 equals 8 but would reach the numba kernels as a float)
        if (
            isinstance(self.bits, bool)
            or not isinstance(self.bits, (int, np.integer))
            or self.bits not in (8, 4, 2)
        ):
            raise ValueError(f"bits must be 8, 4 or 2 (an int), got {self.bits!r}")
        object.__setattr__(self, "bits", int(self.bits))  # a numpy int as a plain int (JSON)
        if self.scale_dtype is not None and self.scale_dtype not in _SCALE_DTYPES:
            raise ValueError(
                f"scale_dtype must be torch.float32, torch.float16 or None, got {self.scale_dtype!r}"
            )
        if self.range_search not in (None, True, False):
            raise ValueError(f"range_search must be True, False or None, got {self.range_search!r}")
        choices = _layout_choices()
        if not isinstance(self.layout, str) or self.layout not in choices:
            raise ValueError(f"layout must be one of {', '.join(choices)}; got {self.layout!r}")
        if self.nonfinite not in ("raise", "zero"):
            raise ValueError(f"nonfinite must be 'raise' or 'zero', got {self.nonfinite!r}")

    @property
    def resolved_scale_dtype(self) -> torch.dtype:
        """The scale/offset dtype actually used."""
        if self.scale_dtype is not None:
            return self.scale_dtype
        return torch.float32 if self.bits == 8 else torch.float16

    @property
    def resolved_range_search(self) -> bool:
        """Whether the clipping-range search runs."""
        return self.bits < 8 if self.range_search is None else self.range_search
