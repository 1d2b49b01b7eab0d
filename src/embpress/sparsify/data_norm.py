"""DataNormSparsifier: prune the blocks with the smallest mean L1 (or L2) norm.

The masks equal those of torch's experimental ``DataNormSparsifier``
(``torch/ao/pruning/_experimental/data_sparsifier/data_norm_sparsifier.py``) on data
without ties: the same block norms (bit for bit what its ``avg_pool2d`` computes), the
same ``round(sparsity_level * num_blocks)`` blocks removed, the same elements zeroed inside
a removed block when ``zeros_per_block`` is smaller than the block. The reference sorts a
copy of the norm array repeated ``block size`` times (the cause of its ~14x memory); here
numba kernels (``_kernels.py``) take one pass for the norms, two histogram passes for the
exact threshold and one to write the mask: memory O(number of elements), small constant.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
import torch

from .._buffers import empty
from ._kernels import block_norms, expand_block_mask, kth_smallest_nonnegative, mark_pruned
from .base import BaseDataSparsifier

__all__ = ["DataNormSparsifier", "block_norm_mask"]

_NAN_MESSAGE = "data contains NaN: block norms are undefined"

# Rows of the table handled at once (rounded to a multiple of the block height).
_CHUNK_ELEMENTS = 1 << 22


# Largest block side accepted: the kernels index with int32-sized block counts.
_MAX_BLOCK_SIDE = (1 << 31) - 1


def _block_shape(sparse_block_shape: Any) -> tuple[int, int]:
    """Two positive integers (bools and non-integral numbers refused), each < 2**31."""
    message = f"sparse_block_shape must be two positive integers, got {sparse_block_shape!r}"
    try:
        sides = tuple(sparse_block_shape)
    except TypeError:
        raise ValueError(message) from None
    if len(sides) != 2:
        raise ValueError(message)
    out = []
    for side in sides:
        if isinstance(side, bool):
            raise ValueError(message)
        try:
            value = operator.index(side)
        except TypeError:
            raise ValueError(message) from None
        if not 1 <= value <= _MAX_BLOCK_SIDE:
            raise ValueError(f"{message} (each side from 1 to {_MAX_BLOCK_SIDE})")
        out.append(value)
    return out[0], out[1]


def _validate(
    sparsity_level: Any, sparse_block_shape: Any, zeros_per_block: Any, norm: str
) -> tuple[int, int]:
    """The block shape, after checking all four settings.

    Unlike torch's sparsifier, which clamps, a ``sparsity_level`` outside [0, 1] is refused.
    """
    if (
        isinstance(sparsity_level, bool)
        or not isinstance(sparsity_level, (int, float))
        or not 0.0 <= float(sparsity_level) <= 1.0
    ):
        raise ValueError(f"sparsity_level must be a number in [0, 1], got {sparsity_level!r}")
    bh, bw = _block_shape(sparse_block_shape)
    if isinstance(zeros_per_block, bool) or not isinstance(zeros_per_block, int) or zeros_per_block < 0:
        raise ValueError(f"zeros_per_block must be a non-negative integer, got {zeros_per_block!r}")
    if zeros_per_block > bh * bw:
        raise ValueError(
            f"zeros_per_block={zeros_per_block} is larger than the block {bh}x{bw} ({bh * bw} elements)"
        )
    if norm not in ("L1", "L2"):
        raise ValueError(f"norm must be 'L1' or 'L2', got {norm!r}")
    return bh, bw


def _elementwise_norm(x: torch.Tensor, norm: str) -> torch.Tensor:
    return x.abs() if norm == "L1" else x * x


def _chunk_rows(width: int, block_height: int) -> int:
    """Rows handled at once: about _CHUNK_ELEMENTS entries, a multiple of the block height."""
    return max(block_height, (_CHUNK_ELEMENTS // max(width, 1)) // block_height * block_height)


def _block_norms(data: torch.Tensor, shape: tuple[int, int], norm: str) -> torch.Tensor:
    """Mean elementwise norm of each block (partial edge blocks: mean of what is there)."""
    x = data.detach().to("cpu", torch.float32).contiguous().numpy()
    out = empty((-(-x.shape[0] // shape[0]), -(-x.shape[1] // shape[1])), np.float32)
    block_norms(x, shape[0], shape[1], norm == "L2", out)
    return torch.from_numpy(out)


def _pruned_blocks(norms: torch.Tensor, sparsity_level: float) -> torch.Tensor:
    """Bool [block rows, block cols]: True where the block is among the k smallest norms."""
    num_blocks = norms.numel()
    k = round(sparsity_level * num_blocks)  # Python rounding, as the reference
    if k <= 0 or k >= num_blocks:
        if bool(torch.isnan(norms).any()):
            raise ValueError(_NAN_MESSAGE)
        return torch.full_like(norms, k > 0, dtype=torch.bool)
    flat = norms.contiguous().numpy().ravel()
    threshold, smaller, nans = kth_smallest_nonnegative(flat, k)
    if nans:  # a NaN entry makes its block's norm NaN
        raise ValueError(_NAN_MESSAGE)
    # ties at the threshold: the first ones in row-major order
    return torch.from_numpy(mark_pruned(norms.numpy(), threshold, k - smaller))


def _smallest_in_block(
    chunk_norm: torch.Tensor, shape: tuple[int, int], zeros_per_block: int
) -> torch.Tensor:
    """Bool mask of a row chunk: False at the ``zeros_per_block`` smallest entries of each block."""
    height, width = chunk_norm.shape
    bh, bw = shape
    hp, wp = math.ceil(height / bh) * bh, math.ceil(width / bw) * bw
    padded = torch.full((hp, wp), float("nan"), dtype=chunk_norm.dtype)
    padded[:height, :width] = chunk_norm
    blocks = padded.view(hp // bh, bh, wp // bw, bw).permute(0, 2, 1, 3).reshape(-1, bh * bw)
    order = torch.sort(blocks, dim=1).indices[:, :zeros_per_block]
    keep = torch.ones_like(blocks, dtype=torch.bool)
    keep.scatter_(1, order, False)
    keep = keep.view(hp // bh, wp // bw, bh, bw).permute(0, 2, 1, 3).reshape(hp, wp)
    return keep[:height, :width]


def block_norm_mask(
    data: torch.Tensor,
    sparsity_level: float,
    sparse_block_shape: tuple[int, int] = (1, 4),
    zeros_per_block: int | None = None,
    norm: str = "L1",
) -> torch.Tensor:
    """The DataNormSparsifier mask of a 2-D (or 1-D) tensor as bool (True = kept)."""
    shape = _validate(
        sparsity_level,
        sparse_block_shape,
        zeros_per_block if zeros_per_block is not None else math.prod(_block_shape(sparse_block_shape)),
        norm,
    )
    zeros = shape[0] * shape[1] if zeros_per_block is None else zeros_per_block
    squeezed = data.detach().squeeze()
    if squeezed.dim() > 2:
        raise ValueError(f"only 2-D data is supported, got shape {tuple(data.shape)}")
    if squeezed.dim() < 2:
        squeezed = squeezed.reshape(1, -1)
    height, width = squeezed.shape
    if sparsity_level <= 0 or zeros == 0 or squeezed.numel() == 0:
        return torch.ones(data.shape, dtype=torch.bool, device=data.device)
    norms = _block_norms(squeezed, shape, norm)
    pruned = _pruned_blocks(norms, float(sparsity_level))
    bh, bw = shape
    mask_np = empty((height, width), np.bool_)
    expand_block_mask(pruned.numpy(), bh, bw, mask_np)
    mask = torch.from_numpy(mask_np)
    if zeros < bh * bw:  # inside a pruned block only its smallest entries go
        step = _chunk_rows(width, bh)
        for start in range(0, height, step):
            rows = slice(start, start + step)
            if bool((~mask[rows]).any()):
                norms = _elementwise_norm(squeezed[rows].float(), norm)
                mask[rows] |= _smallest_in_block(norms, shape, zeros)
    return mask.reshape(data.shape).to(data.device)


class DataNormSparsifier(BaseDataSparsifier):
    """Zero the blocks whose mean L1/L2 norm is smallest, ``sparsity_level`` of them.

    Args:
        sparsity_level: fraction of blocks removed (``round(level * blocks)`` of them).
        sparse_block_shape: block shape; blocks start at index (0, 0), edge blocks may be partial.
        zeros_per_block: zeros inside a removed block (default: the whole block); the
            smallest-norm elements of the block are the ones zeroed.
        norm: ``"L1"`` (absolute value) or ``"L2"`` (square).
    All four may be overridden per data in ``add_data``.
    """

    def __init__(
        self,
        data_list: list[tuple[str, Any]] | None = None,
        sparsity_level: float = 0.5,
        sparse_block_shape: tuple[int, int] = (1, 4),
        zeros_per_block: int | None = None,
        norm: str = "L1",
    ) -> None:
        if zeros_per_block is None:
            zeros_per_block = math.prod(_block_shape(sparse_block_shape))
        _validate(sparsity_level, sparse_block_shape, zeros_per_block, norm)
        self.norm = norm
        super().__init__(
            data_list=data_list,
            sparsity_level=sparsity_level,
            sparse_block_shape=sparse_block_shape,
            zeros_per_block=zeros_per_block,
        )

    def _check_config(self, config: dict[str, Any]) -> None:
        """Refuse a bad per-data config at ``add_data``, before ``step`` meets it."""
        _validate(
            config.get("sparsity_level"),
            config.get("sparse_block_shape"),
            config.get("zeros_per_block"),
            self.norm,
        )

    def update_mask(  # type: ignore[override]
        self,
        name: str,
        data: torch.Tensor,
        sparsity_level: float,
        sparse_block_shape: tuple[int, int],
        zeros_per_block: int,
        **kwargs: Any,
    ) -> None:
        """Set the mask of ``name`` to the block-norm mask of ``data`` (int8, as torch's)."""
        self._set_kept(
            name, block_norm_mask(data, sparsity_level, sparse_block_shape, zeros_per_block, self.norm)
        )
