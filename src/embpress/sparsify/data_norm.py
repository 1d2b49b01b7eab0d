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
import numbers
import operator
from collections.abc import Callable, Iterator
from typing import Any, cast

import numpy as np
import torch

from .._aot import KernelRef
from .._buffers import empty
from .._collective import LOCAL, Collective
from .._parallel import parts_call, rows_call, split_call
from .base import BaseDataSparsifier

# numba kernels (``sparsify._kernels``), loaded with numba on first use; those with a
# return type may run compiled ahead of time instead (see ``_aot``)
_KERNELS = "embpress.sparsify._kernels"
add_high_histogram = KernelRef(_KERNELS, "add_high_histogram", returns="int64")
add_low_histogram = KernelRef(_KERNELS, "add_low_histogram", returns="none")
count_equal = KernelRef(_KERNELS, "count_equal", returns="int64")
_mark_below = KernelRef(_KERNELS, "mark_below", returns="none")
_mark_ties = KernelRef(_KERNELS, "mark_ties", returns="none")
_block_norms_kernel = KernelRef(_KERNELS, "block_norms", returns="none")
_block_norms_1x4_kernel = KernelRef(_KERNELS, "block_norms_1x4", returns="none")
_expand_kernel = KernelRef(_KERNELS, "expand_block_mask", returns="none")
_expand_1x4_kernel = KernelRef(_KERNELS, "expand_block_mask_1x4", returns="none")


def norms_of_blocks(x: np.ndarray, bh: int, bw: int, square: bool, out: np.ndarray) -> None:
    """``out`` = mean of ``|x|`` (or ``x*x``) over each (bh x bw) block (the (1, 4) case by
    its own kernel; row ranges on several threads)."""
    if (bh, bw) == (1, 4) and x.shape[1] % 4 == 0:
        rows_call(_block_norms_1x4_kernel, x, square, out, rows=(0, 2))
    else:

        def part(lo: int, hi: int) -> tuple[Any, ...]:
            return x[lo * bh : hi * bh], bh, bw, square, out[lo:hi]

        parts_call(_block_norms_kernel, out.shape[0], part, minimum=max(1, 256 // bh))


def expand_mask(pruned: np.ndarray, bh: int, bw: int, out: np.ndarray) -> None:
    """``out`` = element mask of a table from its pruned-block flags (the (1, 4) case by
    its own kernel; row ranges on several threads)."""
    if (bh, bw) == (1, 4) and out.shape[1] % 4 == 0:
        rows_call(_expand_1x4_kernel, pruned, out, rows=(0, 1))
    else:

        def part(lo: int, hi: int) -> tuple[Any, ...]:
            return pruned[lo:hi], bh, bw, out[lo * bh : hi * bh]

        parts_call(_expand_kernel, pruned.shape[0], part, minimum=max(1, 256 // bh))


# block norms one thread takes at least in the threshold's passes (fewer: one thread)
_VALUES_PER_THREAD = 1 << 20


def _histogram(kernel: KernelRef, values: np.ndarray, *before: Any) -> tuple[np.ndarray, int]:
    """``kernel(values, *before, hist)`` into a zeroed 65536-bin histogram, the values split
    across threads where the kernel runs compiled (a histogram per part, then summed);
    returns the histogram and the sum of the kernel's results."""
    parts: list[np.ndarray] = []

    def part(lo: int, hi: int) -> tuple[Any, ...]:
        parts.append(np.zeros(65536, dtype=np.int64))
        return (values[lo:hi], *before, parts[-1])

    compiled = kernel.compiled(part(0, 0))
    parts.clear()
    if compiled is None:
        hist = np.zeros(65536, dtype=np.int64)
        return hist, int(kernel(values, *before, hist) or 0)
    total = split_call(compiled, values.shape[0], part, minimum=_VALUES_PER_THREAD)
    return np.sum(parts, axis=0), total


def kth_smallest_nonnegative(values: np.ndarray, k: int) -> tuple[float, int, int, int]:
    """(k-th smallest value (1-based), how many values are smaller, how many are NaN, how
    many are NaN or infinite) of non-negative float32s: a radix select on the float bit
    patterns (which order as the values do), a histogram of the top 16 bits, then one of
    the low 16 bits within the bucket holding the k-th; no sort and no copy."""
    high, nans = _histogram(add_high_histogram, values)
    threshold, below = _select_from_histograms(
        high, lambda bucket: _histogram(add_low_histogram, values, bucket)[0], k
    )
    # NaN and Inf are the bit patterns from 0x7F800000 up, of either sign
    nonfinite = int(high[0x7F80:0x8000].sum() + high[0xFF80:].sum())
    return threshold, below, nans, nonfinite


def mark_pruned(norms: np.ndarray, threshold: float, ties: int) -> np.ndarray:
    """Bool of ``norms``' shape: blocks with norm < threshold, plus the first ``ties``
    equal to it in row-major order."""
    flat = np.ascontiguousarray(norms).reshape(-1)
    out = np.empty(flat.shape[0], dtype=np.bool_)
    rows_call(_mark_below, flat, threshold, out, rows=(0, 2), minimum=_VALUES_PER_THREAD)
    if ties:
        _mark_ties.run(flat, threshold, ties, out)
    return out.reshape(norms.shape)


__all__ = ["DataNormSparsifier", "StreamingMask", "block_norm_mask", "streaming_block_norm_mask"]

_NAN_MESSAGE = "data contains NaN: block norms are undefined"

# Rows of the table handled at once (rounded to a multiple of the block height).
_CHUNK_ELEMENTS = 1 << 22


# Largest block side accepted: the kernels index with int32-sized block counts.
MAX_BLOCK_SIDE = (1 << 31) - 1


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
        if not 1 <= value <= MAX_BLOCK_SIDE:
            raise ValueError(f"{message} (each side from 1 to {MAX_BLOCK_SIDE})")
        out.append(value)
    return out[0], out[1]


def _validate(
    sparsity_level: Any, sparse_block_shape: Any, zeros_per_block: Any, norm: str
) -> tuple[int, int]:
    """The block shape, after checking all four settings.

    Any real number (NumPy scalars too, as torch takes them) is a ``sparsity_level`` and
    any integer a ``zeros_per_block``, bools not. Unlike torch's sparsifier, which clamps,
    a ``sparsity_level`` outside [0, 1] is refused.
    """
    if (
        isinstance(sparsity_level, bool)
        or not isinstance(sparsity_level, numbers.Real)
        or not 0 <= cast(float, sparsity_level) <= 1  # (as it is: a huge int has no float)
    ):
        raise ValueError(f"sparsity_level must be a number in [0, 1], got {sparsity_level!r}")
    bh, bw = _block_shape(sparse_block_shape)
    if (
        isinstance(zeros_per_block, bool)
        or not isinstance(zeros_per_block, numbers.Integral)
        or operator.index(zeros_per_block) < 0
    ):
        raise ValueError(f"zeros_per_block must be a non-negative integer, got {zeros_per_block!r}")
    if operator.index(zeros_per_block) > bh * bw:
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
    norms_of_blocks(x, shape[0], shape[1], norm == "L2", out)
    return torch.from_numpy(out)


def _blocks_to_prune(sparsity_level: Any, num_blocks: int) -> int:
    """``round(sparsity_level * num_blocks)`` in the level's own type, as the reference
    (a float32 level multiplies in float32)."""
    return int(round(sparsity_level * num_blocks))  # noqa: RUF046 - may be a NumPy integer


def _pruned_blocks(norms: torch.Tensor, sparsity_level: Any) -> tuple[torch.Tensor, int | None]:
    """Bool [block rows, block cols]: True where the block is among the k smallest norms;
    and how many norms are infinite where the threshold's histogram counted them (else
    None)."""
    num_blocks = norms.numel()
    k = _blocks_to_prune(sparsity_level, num_blocks)
    if k <= 0 or k >= num_blocks:
        if bool(torch.isnan(norms).any()):
            raise ValueError(_NAN_MESSAGE)
        return torch.full_like(norms, k > 0, dtype=torch.bool), None
    flat = norms.contiguous().numpy().ravel()
    threshold, smaller, nans, nonfinite = kth_smallest_nonnegative(flat, k)
    if nans:  # a NaN entry makes its block's norm NaN
        raise ValueError(_NAN_MESSAGE)
    # ties at the threshold: the first ones in row-major order
    return torch.from_numpy(mark_pruned(norms.numpy(), threshold, k - smaller)), nonfinite


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
    return _block_norm_mask(data, sparsity_level, sparse_block_shape, zeros_per_block, norm)[0]


def _block_norm_mask(
    data: torch.Tensor,
    sparsity_level: float,
    sparse_block_shape: tuple[int, int] = (1, 4),
    zeros_per_block: int | None = None,
    norm: str = "L1",
) -> tuple[torch.Tensor, int | None]:
    """:func:`block_norm_mask`, and how many block norms are infinite where that was
    counted on the way (else None): none means the data holds no NaN or Inf (a NaN's
    norm is refused, an Inf's is infinite; a finite block's may overflow)."""
    shape = _validate(
        sparsity_level,
        sparse_block_shape,
        zeros_per_block if zeros_per_block is not None else math.prod(_block_shape(sparse_block_shape)),
        norm,
    )
    zeros = shape[0] * shape[1] if zeros_per_block is None else operator.index(zeros_per_block)
    squeezed = data.detach().squeeze()
    if squeezed.dim() > 2:
        raise ValueError(f"only 2-D data is supported, got shape {tuple(data.shape)}")
    if squeezed.dim() < 2:
        squeezed = squeezed.reshape(1, -1)
    height, width = squeezed.shape
    if sparsity_level <= 0 or zeros == 0 or squeezed.numel() == 0:
        return torch.ones(data.shape, dtype=torch.bool, device=data.device), None
    norms = _block_norms(squeezed, shape, norm)
    pruned, infinite = _pruned_blocks(norms, sparsity_level)
    bh, bw = shape
    spent = norms.numpy()
    if spent.nbytes == height * width:  # blocks of 4 entries: the norms' memory takes the mask
        mask_np = spent.reshape(-1).view(np.bool_).reshape(height, width)
    else:
        mask_np = empty((height, width), np.bool_)
    del norms, spent
    expand_mask(pruned.numpy(), bh, bw, mask_np)
    mask = torch.from_numpy(mask_np)
    if zeros < bh * bw:  # inside a pruned block only its smallest entries go
        step = _chunk_rows(width, bh)
        for start in range(0, height, step):
            rows = slice(start, start + step)
            if bool((~mask[rows]).any()):
                norms = _elementwise_norm(squeezed[rows].float(), norm)
                mask[rows] |= _smallest_in_block(norms, shape, zeros)
    return mask.reshape(data.shape).to(data.device), infinite


def _select_from_histograms(
    high: np.ndarray, low_of: Callable[[int], np.ndarray], k: int
) -> tuple[float, int]:
    """(k-th smallest value, how many are smaller) from a histogram of the top 16 bits and,
    for the bucket that holds the k-th, one of the low 16 bits (``low_of(bucket)``)."""
    cum = np.cumsum(high)
    bucket = int(np.searchsorted(cum, k))
    below = int(cum[bucket - 1]) if bucket else 0
    cum_low = np.cumsum(low_of(bucket))
    low = int(np.searchsorted(cum_low, k - below))
    below += int(cum_low[low - 1]) if low else 0
    value = np.array([(bucket << 16) | low], dtype=np.uint32).view(np.float32)[0]
    return float(value), below


def streaming_block_norm_mask(
    read_rows: Callable[[int, int], torch.Tensor],
    shape: tuple[int, int],
    sparsity_level: float,
    sparse_block_shape: tuple[int, int] = (1, 4),
    zeros_per_block: int | None = None,
    norm: str = "L1",
    chunk_rows: int | None = None,
    *,
    row_range: tuple[int, int] | None = None,
    collective: Collective = LOCAL,
) -> Iterator[tuple[int, torch.Tensor]]:
    """The mask of :func:`block_norm_mask`, row chunk by row chunk, in bounded memory.

    ``read_rows(start, stop)`` returns rows ``start:stop`` of a 2-D table of ``shape`` (a
    slice of a memory-mapped tensor, say). Yields ``(start, bool mask of those rows)``.
    See :class:`StreamingMask`, which this runs once (to go over the masks several times,
    use it directly: the threshold is then found once).
    """
    mask = StreamingMask(
        read_rows,
        shape,
        sparsity_level,
        sparse_block_shape,
        zeros_per_block,
        norm,
        chunk_rows,
        row_range=row_range,
        collective=collective,
    )
    yield from mask.chunks()


class StreamingMask:
    """The mask of :func:`block_norm_mask` of a table read in row chunks, in bounded memory.

    The global threshold stays exact without holding every block norm: one pass builds a
    histogram of the norms' top 16 bits, a second one of the low 16 bits inside the bin of
    the k-th norm (both when the object is made); then each :meth:`chunks` pass writes the
    masks (ties at the threshold go to the first blocks in row-major order, as in
    :func:`block_norm_mask`). Memory: a few chunks plus two 65536-bin histograms.

    Several processes can share the work: each reads only its ``row_range`` (start a
    multiple of the block height; the ranges of all processes, in rank order, tile the
    table) and ``collective`` sums the histograms, so every process finds the same
    threshold; one more pass counts the ties each holds, which go to the lowest ranks
    first. The masks together are the one-process mask.
    """

    def __init__(
        self,
        read_rows: Callable[[int, int], torch.Tensor],
        shape: tuple[int, int],
        sparsity_level: float,
        sparse_block_shape: tuple[int, int] = (1, 4),
        zeros_per_block: int | None = None,
        norm: str = "L1",
        chunk_rows: int | None = None,
        *,
        row_range: tuple[int, int] | None = None,
        collective: Collective = LOCAL,
    ) -> None:
        height, width = (int(v) for v in shape)
        bh, bw = _validate(
            sparsity_level,
            sparse_block_shape,
            zeros_per_block if zeros_per_block is not None else math.prod(_block_shape(sparse_block_shape)),
            norm,
        )
        self.zeros = bh * bw if zeros_per_block is None else operator.index(zeros_per_block)
        step = chunk_rows if chunk_rows is not None else _chunk_rows(width, bh)
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
        self.step = max(bh, step // bh * bh)  # chunks hold whole block rows
        lo, hi = (0, height) if row_range is None else (int(row_range[0]), int(row_range[1]))
        if not 0 <= lo <= hi <= height or (lo % bh and lo != height) or (hi % bh and hi != height):
            raise ValueError(
                f"row_range {(lo, hi)} must lie in [0, {height}] and start and end on a block row "
                f"(multiples of {bh}, or the end of the table)"
            )
        if collective.size == 1 and (lo, hi) != (0, height):
            # alone, this process would take its rows' norms for the whole table's
            raise ValueError(
                f"row_range {(lo, hi)} covers part of the table's {height} rows, but no collective "
                "shares the others: give the collective of the processes that hold them, or no row_range"
            )
        self.read_rows, self.height, self.width = read_rows, height, width
        self.lo, self.hi, self.block, self.norm = lo, hi, (bh, bw), norm
        self.sparsity_level = sparsity_level
        self.starts = range(lo, hi, self.step)
        # what the passes decide: "squeezed" (1-D data, one piece), "keep", "prune all" or
        # "threshold" (with self.threshold and this process's self.ties)
        self.threshold, self.ties = 0.0, 0
        if height <= 1 or width <= 1:  # squeezed to 1-D by the sparsifier: one piece
            self.how = "squeezed"
            return
        num_blocks = -(-height // bh) * -(-width // bw)
        k = _blocks_to_prune(sparsity_level, num_blocks)
        prune_some = sparsity_level > 0 and self.zeros > 0
        high = np.zeros(65536, dtype=np.int64)
        if prune_some or k >= num_blocks:  # the in-memory path refuses NaN in these cases too
            nans = np.zeros(1, dtype=np.int64)
            for start in self.starts:
                nans[0] += add_high_histogram.run(self._norms(start).ravel(), high)
            counts = collective.sum(np.append(high, nans))
            high, nans = counts[:-1], counts[-1:]
            if int(nans[0]):
                raise ValueError(_NAN_MESSAGE)
        if not prune_some or k <= 0:
            self.how = "keep"
            return
        if k >= num_blocks:
            self.how = "prune all"
            return

        def low_of(bucket: int) -> np.ndarray:
            low = np.zeros(65536, dtype=np.int64)
            for start in self.starts:
                add_low_histogram.run(self._norms(start).ravel(), bucket, low)
            return collective.sum(low)

        self.how = "threshold"
        self.threshold, smaller = _select_from_histograms(high, low_of, k)
        ties = k - smaller
        if collective.size > 1:  # this process's share of the ties
            equal = sum(count_equal.run(self._norms(start).ravel(), self.threshold) for start in self.starts)
            ties = max(0, min(equal, ties - collective.before(equal)))
        self.ties = ties

    def _chunk(self, start: int) -> torch.Tensor:
        stop = min(start + self.step, self.hi)
        rows = self.read_rows(start, stop)
        if tuple(rows.shape) != (stop - start, self.width):
            raise ValueError(
                f"read_rows({start}, ...) gave shape {tuple(rows.shape)}, "
                f"expected {(stop - start, self.width)}"
            )
        return rows

    def _norms(self, start: int, rows: torch.Tensor | None = None) -> np.ndarray:
        chunk = self._chunk(start) if rows is None else rows
        return _block_norms(chunk, self.block, self.norm).numpy()

    def chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, bool mask of the rows from start)`` over this process's rows; one read
        of them per call."""
        if self.how == "squeezed":
            if self.lo < self.hi:
                whole = self.read_rows(0, self.height)
                mask = block_norm_mask(whole, self.sparsity_level, self.block, self.zeros, self.norm)
                yield self.lo, mask[self.lo : self.hi]
            return
        if self.how == "keep":
            for start in self.starts:
                yield start, torch.ones(min(self.step, self.hi - start), self.width, dtype=torch.bool)
            return
        bh, bw = self.block
        ties = self.ties
        for start in self.starts:
            rows = self._chunk(start)
            norms = self._norms(start, rows)
            if self.how == "prune all":
                pruned = np.ones(norms.shape, dtype=np.bool_)
            else:
                pruned = mark_pruned(norms, self.threshold, ties)
                ties -= min(ties, count_equal.run(norms.ravel(), self.threshold))
            mask_np = empty(tuple(rows.shape), np.bool_)
            expand_mask(pruned, bh, bw, mask_np)
            mask = torch.from_numpy(mask_np)
            if self.zeros < bh * bw and not bool(mask.all()):
                mask |= _smallest_in_block(
                    _elementwise_norm(rows.detach().float(), self.norm), self.block, self.zeros
                )
            yield start, mask


class DataNormSparsifier(BaseDataSparsifier):
    """Zero the blocks whose mean L1/L2 norm is smallest, ``sparsity_level`` of them.

    Args:
        sparsity_level: fraction of blocks removed (``round(level * blocks)`` of them).
        sparse_block_shape: block shape; blocks start at index (0, 0), edge blocks may be partial.
        zeros_per_block: zeros inside a removed block (default: the whole block); the
            smallest-norm elements of the block are the ones zeroed.
        norm: ``"L1"`` (absolute value) or ``"L2"`` (square).
    The first three may be overridden per data in ``add_data``. ``norm`` is one for the
    whole sparsifier (torch's also reads it only from the constructor, and ignores one
    given to ``add_data``): ``add_data`` refuses a different ``norm`` rather than ignore it.
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
        # name -> how many of its block norms the last step found infinite (None: not
        # counted); read by api.post_training_sparse_quantize in place of a NaN/Inf pass
        self._infinite_norms: dict[str, int | None] = {}
        super().__init__(
            data_list=data_list,
            sparsity_level=sparsity_level,
            sparse_block_shape=sparse_block_shape,
            zeros_per_block=zeros_per_block,
        )

    def _check_config(self, config: dict[str, Any]) -> None:
        """Refuse a bad per-data config at ``add_data``, before ``step`` meets it."""
        if "norm" in config and config["norm"] != self.norm:
            raise ValueError(
                f"norm is set per sparsifier, not per data: this one uses norm={self.norm!r}, "
                f"add_data got norm={config['norm']!r} (make a DataNormSparsifier with that norm)"
            )
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
        """Set the mask of ``name`` to the block-norm mask of ``data`` (int8, as torch's).
        A mask still all ones from ``add_data`` is freed first (the new one does not read
        it), and put back if this fails."""
        released = self._release_all_ones(name)
        self._infinite_norms.pop(name, None)
        try:
            kept, infinite = _block_norm_mask(
                data, sparsity_level, sparse_block_shape, zeros_per_block, self.norm
            )
        except BaseException:
            if released is not None:
                self._restore_all_ones(name, released)
            raise
        self._set_kept(name, kept)
        self._infinite_norms[name] = infinite
