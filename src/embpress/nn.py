"""QuantizedEmbedding and QuantizedEmbeddingBag: nn.Embedding / nn.EmbeddingBag over a quantized table.

``forward`` takes what the float modules take and returns what they return on
``self.dequantize()``. Sum and mean bags use a fused kernel where the layout has one on
the device (torch's FBGEMM ops, or numba for block-sparse); everything else decodes only
the distinct rows a batch touches and hands them to ``torch.nn.functional``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layouts import QuantizedTable, encode_table
from .quant import QuantConfig, RowQParams

__all__ = ["QuantizedEmbedding", "QuantizedEmbeddingBag"]

_MODES = {"sum": 0, "mean": 1, "max": 2}


def _check_dtype(indices: torch.Tensor) -> None:
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a Tensor, got {type(indices).__name__}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")


def _check_range(indices: torch.Tensor, num_embeddings: int) -> None:
    """IndexError as nn.Embedding raises it (the fused kernels check inside)."""
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_embeddings):
        raise IndexError(f"index out of range in self (num_embeddings={num_embeddings})")


def _renorm(rows: torch.Tensor, max_norm: float | None, norm_type: float) -> torch.Tensor:
    """What nn.Embedding's ``max_norm`` does to the rows it returns."""
    if max_norm is None:
        return rows
    norms = torch.linalg.vector_norm(rows, ord=norm_type, dim=-1, keepdim=True)
    scale = torch.where(norms > max_norm, max_norm / (norms + 1e-7), torch.ones_like(norms))
    return rows * scale


class _QuantizedModule(nn.Module):
    """Shared by both modules: the table, sizes, and the report of how it was made."""

    table: QuantizedTable

    def __init__(self, table: QuantizedTable) -> None:
        super().__init__()
        self.table = table
        self.error: dict[str, float] | None = None

    @property
    def num_embeddings(self) -> int:
        return self.table.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.table.embedding_dim

    @property
    def bits(self) -> int:
        return self.table.bits

    @property
    def layout(self) -> str:
        return self.table.layout

    @property
    def sparsity(self) -> float:
        """Fraction of entries pruned; each decodes to exactly 0.0."""
        return self.table.sparsity

    @property
    def nbytes(self) -> int:
        """Every byte held for the table (codes, qparams, bitmaps, index maps)."""
        return self.table.nbytes

    @property
    def float_nbytes(self) -> int:
        """Bytes of the same table in float32."""
        return self.num_embeddings * self.embedding_dim * 4

    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``[num_embeddings, embedding_dim]`` this module computes with."""
        return self.table.dequantize()

    def _lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return self.table.decode_rows(indices)

    def extra_repr(self) -> str:
        ratio = self.nbytes / self.float_nbytes if self.float_nbytes else 0.0
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, layout={self.layout}, "
            f"sparsity={self.sparsity:.3f}, nbytes={self.nbytes}, ratio_to_float32={ratio:.4f}"
        )

    @staticmethod
    def _encode(
        weight: torch.Tensor,
        config: QuantConfig | None,
        mask: torch.Tensor | None,
        block_width: int,
        saved_qparams: RowQParams | None,
    ) -> tuple[QuantizedTable, dict[str, float]]:
        config = config if config is not None else QuantConfig()
        if not isinstance(config, QuantConfig):
            raise TypeError(f"config must be an embpress.QuantConfig or None, got {type(config).__name__}")
        if mask is not None and tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(weight.shape)}")
        table, error = encode_table(
            weight,
            None if mask is None else mask.to("cpu", torch.bool),
            config,
            block_width=block_width,
            saved_qparams=saved_qparams,
        )
        return table.to(weight.device), error


class QuantizedEmbedding(_QuantizedModule):
    """Drop-in for ``nn.Embedding`` (inference): any index shape in, ``[*shape, D]`` out."""

    def __init__(
        self,
        table: QuantizedTable,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
    ) -> None:
        super().__init__(table)
        self.padding_idx = padding_idx
        self.max_norm = max_norm
        self.norm_type = norm_type

    @classmethod
    def from_float(
        cls,
        module: nn.Embedding,
        config: QuantConfig | None = None,
        *,
        mask: torch.Tensor | None = None,
        block_width: int = 1,
        saved_qparams: RowQParams | None = None,
    ) -> QuantizedEmbedding:
        """Quantize ``module`` (entries where ``mask`` is False are pruned to exact 0.0)."""
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"expected nn.Embedding, got {type(module).__name__}")
        table, error = cls._encode(module.weight, config, mask, block_width, saved_qparams)
        out = cls(table, module.padding_idx, module.max_norm, module.norm_type)
        out.error = error
        return out

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        _check_dtype(input)
        flat = input.reshape(-1).long()
        out = None
        if self.max_norm is None:
            bounds = torch.arange(flat.numel() + 1, device=flat.device)
            out = self.table.fast_bag(flat, bounds, 0, None)
        if out is None:
            _check_range(flat, self.num_embeddings)
            out = _renorm(self._lookup(flat), self.max_norm, self.norm_type)
        return out.reshape(*input.shape, self.embedding_dim)


class QuantizedEmbeddingBag(_QuantizedModule):
    """Drop-in for ``nn.EmbeddingBag`` (inference): sum / mean / max bags."""

    def __init__(
        self,
        table: QuantizedTable,
        mode: str = "mean",
        padding_idx: int | None = None,
        include_last_offset: bool = False,
        max_norm: float | None = None,
        norm_type: float = 2.0,
    ) -> None:
        super().__init__(table)
        if mode not in _MODES:
            raise ValueError(f"mode must be 'sum', 'mean' or 'max', got {mode!r}")
        self.mode = mode
        self.padding_idx = padding_idx
        self.include_last_offset = include_last_offset
        self.max_norm = max_norm
        self.norm_type = norm_type

    @classmethod
    def from_float(
        cls,
        module: nn.EmbeddingBag,
        config: QuantConfig | None = None,
        *,
        mask: torch.Tensor | None = None,
        block_width: int = 1,
        saved_qparams: RowQParams | None = None,
    ) -> QuantizedEmbeddingBag:
        """Quantize ``module`` (entries where ``mask`` is False are pruned to exact 0.0)."""
        if not isinstance(module, nn.EmbeddingBag):
            raise TypeError(f"expected nn.EmbeddingBag, got {type(module).__name__}")
        table, error = cls._encode(module.weight, config, mask, block_width, saved_qparams)
        out = cls(
            table,
            module.mode,
            module.padding_idx,
            module.include_last_offset,
            module.max_norm,
            module.norm_type,
        )
        out.error = error
        return out

    def _bags(
        self, input: torch.Tensor, offsets: torch.Tensor | None, per_sample_weights: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Flat int64 indices, bag bounds with a final total, flat weights (nn's checks)."""
        _check_dtype(input)
        if per_sample_weights is not None:
            if not isinstance(per_sample_weights, torch.Tensor):
                raise TypeError(
                    f"per_sample_weights must be a Tensor or None, got {type(per_sample_weights).__name__}"
                )
            if self.mode != "sum":
                raise NotImplementedError(
                    "embedding_bag: per_sample_weights was not None. per_sample_weights is only "
                    f"supported for mode='sum' (got mode='{self.mode}')"
                )
            if per_sample_weights.shape != input.shape:
                raise ValueError(
                    f"per_sample_weights shape {tuple(per_sample_weights.shape)} must match "
                    f"input shape {tuple(input.shape)}"
                )
            if per_sample_weights.dtype != torch.float32:
                # nn.EmbeddingBag's error type, the same in every layout (the kernels would
                # otherwise cast, or refuse, each in its own way)
                raise RuntimeError(
                    "per_sample_weights must have dtype torch.float32, the dtype of the "
                    f"dequantized weight; got {per_sample_weights.dtype}"
                )
            per_sample_weights = per_sample_weights.reshape(-1).contiguous()
        if input.dim() == 2:
            if offsets is not None:
                raise ValueError(
                    "if input is 2D, then offsets has to be None, as input is "
                    "treated as a mini-batch of fixed length sequences"
                )
            batch, length = input.shape
            bounds = torch.arange(0, batch * length + 1, max(length, 1), device=input.device)
            if length == 0:
                bounds = torch.zeros(batch + 1, dtype=torch.int64, device=input.device)
            return input.reshape(-1).long(), bounds, per_sample_weights
        if input.dim() != 1:
            raise ValueError(f"input has to be 1D or 2D Tensor, but got Tensor of dimension {input.dim()}")
        if offsets is None or offsets.dim() != 1:
            raise ValueError("offsets has to be a 1D Tensor when input is 1D")
        if offsets.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"offsets must be int32 or int64, got {offsets.dtype}")
        # contiguous: torch's FBGEMM bag ops refuse strided ids and offsets
        flat = input.long().contiguous()
        bounds = offsets.long().contiguous()
        if not self.include_last_offset:
            bounds = torch.cat([bounds, bounds.new_tensor([flat.numel()])])
        if bounds.numel() == 0:  # nn.EmbeddingBag's error type
            raise RuntimeError("offsets must not be empty when include_last_offset=True")
        if bounds.numel() > 1 and int(bounds[0]) != 0:
            raise RuntimeError(
                "offsets[0] has to be 0, i.e., the first sequence in the mini-batch has to "
                f"start from position 0. However, got {int(bounds[0])}"
            )
        if bool((bounds[1:] < bounds[:-1]).any()) or int(bounds[-1]) > flat.numel():
            raise RuntimeError("offsets must be non-decreasing and within the number of indices")
        return flat, bounds, per_sample_weights

    def forward(
        self,
        input: torch.Tensor,
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        flat, bounds, weights = self._bags(input, offsets, per_sample_weights)
        mode = _MODES[self.mode]
        has_padding = self.padding_idx is not None and bool((flat == self.padding_idx).any())
        if mode != 2 and self.max_norm is None and not has_padding:
            out = self.table.fast_bag(flat, bounds, mode, weights)
            if out is not None:
                return out.to(flat.device)
        return self._generic(flat, bounds, weights)

    def _generic(
        self, flat: torch.Tensor, bounds: torch.Tensor, weights: torch.Tensor | None
    ) -> torch.Tensor:
        """Decode the distinct rows once, then let torch.nn.functional do the bag."""
        _check_range(flat, self.num_embeddings)
        if flat.numel() == 0:
            return torch.zeros(bounds.numel() - 1, self.embedding_dim, device=flat.device)
        unique, inverse = torch.unique(flat, return_inverse=True)
        rows = _renorm(self._lookup(unique), self.max_norm, self.norm_type)
        padding = None
        if self.padding_idx is not None:
            hit = (unique == self.padding_idx).nonzero()
            padding = int(hit[0, 0]) if hit.numel() else None
        return F.embedding_bag(
            inverse,
            rows,
            bounds,
            mode=self.mode,
            per_sample_weights=weights,
            include_last_offset=True,
            padding_idx=padding,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode!r}"


def module_kwargs(module: _QuantizedModule) -> dict[str, Any]:
    """Constructor arguments besides the table (for saving)."""
    keys: tuple[str, ...] = ("padding_idx", "max_norm", "norm_type")
    if isinstance(module, QuantizedEmbeddingBag):
        keys = (*keys, "mode", "include_last_offset")
    return {k: getattr(module, k) for k in keys}
