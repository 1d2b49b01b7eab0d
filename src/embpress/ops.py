"""The lookups of every layout as torch custom ops: ``torch.ops.embpress.embedding_bag`` and
``torch.ops.embpress.embedding``.

Compiled and exported graphs (``torch.compile(fullgraph=True)``, ``torch.export``,
``torch.jit.trace``) cannot follow the lookups into numba or through their checks on id
values; as ops they are one opaque node, with a fake implementation that gives the output
shape from the input shapes alone (``[bags, D]`` or ``[*input.shape, D]``). A table
enters an op as its tensors plus static fields, so the tensors stay the program's buffers::

    embpress::embedding_bag(Tensor[] tensors, str layout, int num_embeddings,
        int embedding_dim, int bits, str scale_dtype, int[] layout_args,
        Tensor input, Tensor? offsets, Tensor? per_sample_weights, int mode,
        bool include_last_offset, int? padding_idx, float? max_norm, float norm_type) -> Tensor
    embpress::embedding(Tensor[] tensors, str layout, int num_embeddings,
        int embedding_dim, int bits, str scale_dtype, int[] layout_args,
        Tensor input, float? max_norm, float norm_type) -> Tensor

``layout`` names a class of the layout registry (``layouts.TABLE_CLASSES``); ``tensors``
and the static fields are what the table's ``op_tensors()`` and ``op_fields()`` return,
and the kernels rebuild a lookup-only view of it with ``from_op_args``, so a layout added
to the registry is served by both ops. ``scale_dtype`` is "float32" or "float16" (a string: a ``ScalarType``
argument costs the dispatcher more than the rest of the table together); ``mode`` is a
``Pooling``: ``SUM`` (0), ``MEAN`` (1) or ``MAX`` (2).

Kernels: on CPU, the layout's fused kernel (``fast_bag``: FBGEMM's or embpress's numba
ones) where it serves, else the distinct rows decoded and ``torch.nn.functional``; on any
other device (``CompositeExplicitAutograd``) only the latter, in plain torch ops. Both
check every input as ``nn.EmbeddingBag`` does (ids in range, offsets non-decreasing from
0) inside the op, so that no Python code outside it branches on data. The fake
implementations run the checks that need no data. ``import embpress`` registers the ops;
a saved program that holds them needs it before ``torch.export.load`` / ``torch.jit.load``.

The ops are for inference; the one gradient they give is ``per_sample_weights``' (the
tables are codes, the ids integers), with ``nn.EmbeddingBag``'s formula.
"""

from __future__ import annotations

import ctypes
import functools
import operator
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from . import _aot
from ._aot import KernelRef
from .layouts import Pooling, QuantizedTable, table_class
from .layouts.base import DTYPES_BY_NAME

# numba kernels, loaded (with numba) on first use (see ``_aot``)
offsets_status = KernelRef("embpress.layouts._kernels", "offsets_status", returns="int64")
offsets_bounds = KernelRef("embpress.layouts._kernels", "offsets_bounds", returns="int64")

__all__ = [
    "MAX",
    "MEAN",
    "MODES",
    "SUM",
    "Pooling",
    "bag_bounds",
    "embedding_bag_impl",
    "embedding_impl",
    "generic_bag",
]

SUM, MEAN, MAX = Pooling.SUM, Pooling.MEAN, Pooling.MAX
MODES = {p.name.lower(): p for p in Pooling}  # nn.EmbeddingBag's mode names
_MODE_NAMES: dict[int, str] = {int(v): k for k, v in MODES.items()}

_TABLE_ARGS = (
    "Tensor[] tensors, str layout, int num_embeddings, int embedding_dim, int bits, "
    "str scale_dtype, int[] layout_args"
)
_LIB = torch.library.Library("embpress", "DEF")
_LIB.define(
    f"embedding_bag({_TABLE_ARGS}, Tensor input, Tensor? offsets, Tensor? per_sample_weights, "
    "int mode, bool include_last_offset, int? padding_idx, float? max_norm, float norm_type) -> Tensor"
)
_LIB.define(f"embedding({_TABLE_ARGS}, Tensor input, float? max_norm, float norm_type) -> Tensor")


# ------------------------------------------------------------------ checks (fake and real)
def _check_indices(input: torch.Tensor) -> None:
    if input.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be int32 or int64, got {input.dtype}")


def _check_bag_args(
    input: torch.Tensor,
    offsets: torch.Tensor | None,
    per_sample_weights: torch.Tensor | None,
    mode: int,
) -> None:
    """nn.EmbeddingBag's checks that need no data (dtypes, ranks, shapes), in its order."""
    _check_indices(input)
    if mode not in _MODE_NAMES:
        raise ValueError(f"mode must be 0 (sum), 1 (mean) or 2 (max), got {mode}")
    if per_sample_weights is not None:
        if mode != SUM:
            raise NotImplementedError(
                "embedding_bag: per_sample_weights was not None. per_sample_weights is only "
                f"supported for mode='sum' (got mode='{_MODE_NAMES[mode]}')"
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
    if input.dim() == 2:
        if offsets is not None:
            raise ValueError(
                "if input is 2D, then offsets has to be None, as input is "
                "treated as a mini-batch of fixed length sequences"
            )
        return
    if input.dim() != 1:
        raise ValueError(f"input has to be 1D or 2D Tensor, but got Tensor of dimension {input.dim()}")
    if offsets is None or offsets.dim() != 1:
        raise ValueError("offsets has to be a 1D Tensor when input is 1D")
    if offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"offsets must be int32 or int64, got {offsets.dtype}")


# ------------------------------------------------------------------ fake implementations
def _bag_fake(
    tensors: list[torch.Tensor],
    layout: str,
    num_embeddings: int,
    embedding_dim: int,
    bits: int,
    scale_dtype: str,
    layout_args: list[int],
    input: torch.Tensor,
    offsets: torch.Tensor | None,
    per_sample_weights: torch.Tensor | None,
    mode: int,
    include_last_offset: bool,
    padding_idx: int | None,
    max_norm: float | None,
    norm_type: float,
) -> torch.Tensor:
    """``[bags, D]`` float32 on the input's device: bags = rows of a 2-D input, else the
    number of offsets (less one with ``include_last_offset``)."""
    table_class(layout)
    _check_bag_args(input, offsets, per_sample_weights, mode)
    if input.dim() == 2:
        bags = input.shape[0]
    else:
        bags = cast(torch.Tensor, offsets).shape[0]  # not None: checked above
        if include_last_offset:
            torch._check(bags >= 1, lambda: "offsets must not be empty when include_last_offset=True")
            bags = bags - 1
    return input.new_empty((bags, embedding_dim), dtype=torch.float32)


def _embedding_fake(
    tensors: list[torch.Tensor],
    layout: str,
    num_embeddings: int,
    embedding_dim: int,
    bits: int,
    scale_dtype: str,
    layout_args: list[int],
    input: torch.Tensor,
    max_norm: float | None,
    norm_type: float,
) -> torch.Tensor:
    """``[*input.shape, D]`` float32 on the input's device."""
    table_class(layout)
    _check_indices(input)
    return input.new_empty((*input.shape, embedding_dim), dtype=torch.float32)


torch.library.register_fake("embpress::embedding_bag", _bag_fake, lib=_LIB)
torch.library.register_fake("embpress::embedding", _embedding_fake, lib=_LIB)


# ------------------------------------------------------------------ the lookups
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


# sample arguments of the offset kernels' compiled forms: C-contiguous int64 arrays, ints
# and a bool (``_aot.pack`` lays out an array as its address and length, then each scalar)
_ENTRY_SAMPLES: dict[str, tuple[KernelRef, tuple[Any, ...]]] = {
    "offsets_status": (offsets_status, (np.zeros(1, dtype=np.int64), 0, False)),
    "offsets_bounds": (offsets_bounds, (np.zeros(1, dtype=np.int64), 0, np.zeros(2, dtype=np.int64))),
}


@functools.cache
def _c_entry(name: str) -> Callable[[int, int], int] | None:
    """The C entry of the offset kernel ``name`` compiled for its sample's argument kinds
    (None where it has no compiled form)."""
    ref, sample = _ENTRY_SAMPLES[name]
    compiled = ref.compiled(sample)
    return None if compiled is None else compiled.call


def _call_entry(name: str, *slots: int) -> int | None:
    """The compiled kernel ``name`` on an argument block of ``slots`` (then its raise
    flag), through its C entry: its result, or None where it has no compiled form, AOT
    is off, or it raised. The offset checks of large lookups call it on every lookup,
    right after the one before has filled the caches with its rows, where the general
    path (``KernelRef.run``: argument kinds, the library's lookup, packing) costs several
    times as much (BENCHMARKS.md, bench/meaning.md)."""
    entry = _c_entry(name) if _aot.enabled() else None
    if entry is None:
        return None
    block = (ctypes.c_int64 * (len(slots) + 1))(*slots, 0)
    at = ctypes.addressof(block)
    result = entry(at, at + 8 * len(slots))
    return None if block[len(slots)] else int(result)


def _offsets_status(values: np.ndarray, total: int, include_last: bool) -> int:
    """``_kernels.offsets_status``: in Python for a small batch's few bounds (a call into
    a compiled kernel costs more there), else compiled, through its C entry straight
    (``_call_entry``)."""
    if values.shape[0] > 64:
        if values.dtype == np.int64 and values.flags.c_contiguous:
            status = _call_entry(
                "offsets_status", _aot.address(values), values.shape[0], total, int(include_last)
            )
            if status is not None:  # else ``run`` decides (numba, which raises its own error)
                return status
        return int(offsets_status.run(values, total, include_last))
    v = values.tolist()
    n = len(v)
    if n > (0 if include_last else 1) and v[0] != 0:
        return 1
    if not all(map(operator.le, v, v[1:])):  # non-decreasing (map: no Python frame per pair)
        return 2
    return 2 if n and v[-1] > total else 0


# from this many offsets on, a batch's bounds are made and checked by a compiled pass
# (below, Python's own check of a few bounds costs less than the call)
_BOUNDS_IN_C = 64


def _made_bounds(given: torch.Tensor, total: int) -> tuple[int, torch.Tensor] | None:
    """Offsets ``given`` (contiguous int64 CPU) then ``total``, and ``offsets_status`` of
    them, by one call of the compiled ``offsets_bounds`` on the tensors' own memory; None
    where it is not compiled (or raised). A large lookup makes its bounds here: right
    after the lookup before, numpy's conversions and a second pass cost more than this."""
    n = given.shape[0]
    out = torch.from_numpy(np.empty(n + 1, dtype=np.int64))  # (torch.empty's dispatch costs more)
    status = _call_entry("offsets_bounds", given.data_ptr(), n, total, out.data_ptr(), n + 1)
    return None if status is None else (status, out)


def _raise_for_offsets(status: int, first: int) -> None:
    """nn.EmbeddingBag's error for an ``offsets_status`` (nothing for 0)."""
    if status == 1:
        raise RuntimeError(
            "offsets[0] has to be 0, i.e., the first sequence in the mini-batch has to "
            f"start from position 0. However, got {first}"
        )
    if status:
        raise RuntimeError("offsets must be non-decreasing and within the number of indices")


def bag_bounds(
    input: torch.Tensor, offsets: torch.Tensor | None, include_last_offset: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat int64 ids (those in a bag) and bag bounds with a final total, offsets checked
    as nn.EmbeddingBag checks them (input and offsets already passed ``_check_bag_args``)."""
    if input.dim() == 2:
        batch, length = input.shape
        if length == 0:
            bounds = torch.zeros(batch + 1, dtype=torch.int64, device=input.device)
        else:
            bounds = torch.arange(0, batch * length + 1, length, device=input.device)
        return input.reshape(-1).long().contiguous(), bounds  # a strided view's reshape may be one too
    # contiguous: torch's FBGEMM bag ops refuse strided ids and offsets
    flat = input.long().contiguous()
    total = flat.numel()
    bounds = cast(torch.Tensor, offsets).long().contiguous()
    if bounds.is_cpu and not include_last_offset and bounds.shape[0] >= _BOUNDS_IN_C:
        made = _made_bounds(bounds, total)
        if made is not None:
            _raise_for_offsets(made[0], int(bounds[0]) if made[0] == 1 else 0)
            return flat, made[1]
    if bounds.is_cpu:
        given = bounds.numpy()
        if include_last_offset:
            values = given
        else:
            values = np.empty(given.size + 1, dtype=np.int64)
            values[:-1] = given
            values[-1] = total
            bounds = torch.from_numpy(values)
    else:
        if not include_last_offset:
            bounds = torch.cat([bounds, bounds.new_tensor([total])])
        values = bounds.cpu().numpy()
    if values.size == 0:  # nn.EmbeddingBag's error type
        raise RuntimeError("offsets must not be empty when include_last_offset=True")
    status = _offsets_status(values, total, include_last_offset)
    _raise_for_offsets(status, int(values[0]) if status == 1 else 0)
    if values.size == 1:  # no bag (empty offsets): no id is in one, the output is (0, dim)
        return flat[:0], bounds.new_zeros(1)
    if values[-1] < total:
        # include_last_offset with ids after the last offset: they are in no bag (CSR, as
        # FBGEMM and the docs of nn.EmbeddingBag have it; torch's own CPU kernel would add
        # them to the last bag, its backward likewise), in every kernel here
        flat = flat[: int(values[-1])]
    return flat, bounds


def generic_bag(
    table: QuantizedTable,
    flat: torch.Tensor,
    bounds: torch.Tensor,
    weights: torch.Tensor | None,
    mode: int,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
) -> torch.Tensor:
    """Decode the distinct rows once, then let torch.nn.functional do the bag (any device)."""
    table.check_buffers()
    _check_range(flat, table.num_embeddings)
    if flat.numel() == 0:
        return torch.zeros(bounds.numel() - 1, table.embedding_dim, device=flat.device)
    unique, inverse = torch.unique(flat, return_inverse=True)
    rows = _renorm(table.decode_rows(unique), max_norm, norm_type)
    padding = None
    if padding_idx is not None:
        hit = (unique == padding_idx).nonzero()
        padding = int(hit[0, 0]) if hit.numel() else None
    return F.embedding_bag(
        inverse,
        rows,
        bounds,
        mode=_MODE_NAMES[mode],
        per_sample_weights=weights,
        include_last_offset=True,
        padding_idx=padding,
    )


def _plain_bag(
    table: QuantizedTable,
    input: torch.Tensor,
    offsets: torch.Tensor | None,
    mode: int,
    include_last_offset: bool,
) -> torch.Tensor | None:
    """Sum or mean bags of the usual large lookup, 1-D contiguous int64 ids and many
    offsets on the CPU, checked and run in few steps; None for any other call (which
    ``embedding_bag_impl`` goes on to check and run in full, with the same results).

    A large lookup leaves the caches cold, where each step of Python costs about a
    microsecond: here the arguments' checks reduce to their dtypes and ranks, the bounds
    are made and checked by one compiled pass (``_made_bounds``) and the layout's fused
    kernel follows (``fast_bag``; where it has none, the decoded rows and torch's bag on
    the same bounds, as ``embedding_bag_impl``'s full path)."""
    if (
        offsets is None
        or include_last_offset
        or input.dtype is not torch.int64
        or offsets.dtype is not torch.int64
        or input.dim() != 1
        or offsets.dim() != 1
        or offsets.shape[0] < _BOUNDS_IN_C
        or not (offsets.is_cpu and input.is_contiguous() and offsets.is_contiguous())
        or not _aot.enabled()  # (the bounds' compiled pass: without it the full path makes them)
    ):
        return None
    made = _made_bounds(offsets, input.shape[0])
    if made is None:
        return None
    if made[0]:
        _raise_for_offsets(made[0], int(offsets[0]))
    out = table.fast_bag(input, made[1], mode, None)
    return generic_bag(table, input, made[1], None, mode) if out is None else out


def embedding_bag_impl(
    table: QuantizedTable,
    input: torch.Tensor,
    offsets: torch.Tensor | None,
    per_sample_weights: torch.Tensor | None,
    mode: int,
    include_last_offset: bool,
    padding_idx: int | None,
    max_norm: float | None,
    norm_type: float,
    fast: bool = True,
) -> torch.Tensor:
    """What ``embpress::embedding_bag`` computes, without the op boundary.

    ``fast``: use the layout's fused kernel where it serves (the CPU kernel of the op);
    False keeps to plain torch ops (the op's kernel for every other device).
    """
    plain = mode == SUM or mode == MEAN  # (any other mode is refused by the full checks)
    if fast and plain and per_sample_weights is None and padding_idx is None and max_norm is None:
        out = _plain_bag(table, input, offsets, mode, include_last_offset)
        if out is not None:
            return out
    _check_bag_args(input, offsets, per_sample_weights, mode)
    flat, bounds = bag_bounds(input, offsets, include_last_offset)
    weights = None
    if per_sample_weights is not None:
        weights = per_sample_weights.reshape(-1)[: flat.numel()].contiguous()
    if fast and mode != MAX and max_norm is None:
        padded = padding_idx is not None and bool((flat == padding_idx).any())
        # a NaN or infinite weight times a pruned entry's 0.0 is NaN in torch's sum, which the
        # fused kernels (they skip pruned entries, fold weights into scales) do not give; and
        # a huge one folded into a row's scale and offset can overflow where w * row does not
        odd = weights is not None and weights.numel() > 0 and not _foldable(weights)
        out = None if padded or odd else table.fast_bag(flat, bounds, mode, weights)
        if out is not None:
            return out.to(flat.device)
    return generic_bag(table, flat, bounds, weights, mode, padding_idx, max_norm, norm_type)


# per_sample_weights up to this size are folded into the fused kernels' row parameters;
# beyond it (no model's weight) the lookup takes the plain path, whose products are torch's
_FOLDED_WEIGHT_LIMIT = 2.0**64


def _foldable(weights: torch.Tensor) -> bool:
    """Whether every weight is within ``_FOLDED_WEIGHT_LIMIT`` (False for NaN): one pass,
    no copy of the weights."""
    lo, hi = torch.aminmax(weights)
    return bool((lo >= -_FOLDED_WEIGHT_LIMIT) & (hi <= _FOLDED_WEIGHT_LIMIT))


def embedding_impl(
    table: QuantizedTable,
    input: torch.Tensor,
    max_norm: float | None,
    norm_type: float,
    fast: bool = True,
) -> torch.Tensor:
    """What ``embpress::embedding`` computes, without the op boundary (``fast`` as in
    :func:`embedding_bag_impl`)."""
    _check_indices(input)
    flat = input.reshape(-1).long().contiguous()  # FBGEMM's kernels refuse strided ids
    out = None
    if fast and max_norm is None:
        # one id per bag: the fused kernels check the ids and decode in one pass
        bounds = torch.arange(flat.numel() + 1, device=flat.device)
        out = table.fast_bag(flat, bounds, SUM, None)
    if out is None:
        table.check_buffers()
        _check_range(flat, table.num_embeddings)
        out = _renorm(table.decode_rows(flat), max_norm, norm_type)
    return out.reshape(*input.shape, table.embedding_dim)


# ------------------------------------------------------------------ op kernels
def _view(
    tensors: list[torch.Tensor],
    layout: str,
    num_embeddings: int,
    embedding_dim: int,
    bits: int,
    scale_dtype: str,
    layout_args: list[int],
) -> QuantizedTable:
    dtype = DTYPES_BY_NAME.get(scale_dtype)
    if dtype is None:
        raise ValueError(f"scale_dtype must be 'float32' or 'float16', got {scale_dtype!r}")
    cls = table_class(layout)
    owner = cls.owner_of(tensors, num_embeddings, embedding_dim, bits, dtype, layout_args)
    if owner is not None:  # a module's own table: its kernel arguments are kept
        return owner
    return cls.checked_view(tensors, num_embeddings, embedding_dim, bits, dtype, layout_args)


def _bag_kernel(fast: bool) -> Callable[..., torch.Tensor]:
    def kernel(
        tensors: list[torch.Tensor],
        layout: str,
        num_embeddings: int,
        embedding_dim: int,
        bits: int,
        scale_dtype: str,
        layout_args: list[int],
        input: torch.Tensor,
        offsets: torch.Tensor | None,
        per_sample_weights: torch.Tensor | None,
        mode: int,
        include_last_offset: bool,
        padding_idx: int | None,
        max_norm: float | None,
        norm_type: float,
    ) -> torch.Tensor:
        table = _view(tensors, layout, num_embeddings, embedding_dim, bits, scale_dtype, layout_args)
        return embedding_bag_impl(
            table,
            input,
            offsets,
            per_sample_weights,
            mode,
            include_last_offset,
            padding_idx,
            max_norm,
            norm_type,
            fast,
        )

    return kernel


def _embedding_kernel(fast: bool) -> Callable[..., torch.Tensor]:
    def kernel(
        tensors: list[torch.Tensor],
        layout: str,
        num_embeddings: int,
        embedding_dim: int,
        bits: int,
        scale_dtype: str,
        layout_args: list[int],
        input: torch.Tensor,
        max_norm: float | None,
        norm_type: float,
    ) -> torch.Tensor:
        table = _view(tensors, layout, num_embeddings, embedding_dim, bits, scale_dtype, layout_args)
        return embedding_impl(table, input, max_norm, norm_type, fast)

    return kernel


# CPU: the fused kernels; every other device (CompositeExplicitAutograd is the default
# for backends without a kernel of their own): plain torch ops.
_cpu_bag = _bag_kernel(fast=True)
_LIB.impl("embedding_bag", _cpu_bag, "CPU")
_LIB.impl("embedding_bag", _bag_kernel(fast=False), "CompositeExplicitAutograd")
_LIB.impl("embedding", _embedding_kernel(fast=True), "CPU")
_LIB.impl("embedding", _embedding_kernel(fast=False), "CompositeExplicitAutograd")


# ------------------------------------------------------------------ gradient
# per_sample_weights is the one differentiable input (the tables are codes, the ids
# integers): d out[bag(i)] / d weights[i] = row(ids[i]) (renormed as the forward renorms),
# zero for padding ids and for ids after the last bag of include_last_offset.
_WEIGHTS = 9  # per_sample_weights' place among the op's arguments
_BELOW_AUTOGRAD = torch._C._after_autograd_keyset
_CPU = torch._C.DispatchKey.CPU
_BAG_OP = torch.ops.embpress.embedding_bag.default


class _BagWithGradient(torch.autograd.Function):
    """The op where ``per_sample_weights`` needs a gradient: the op itself as the forward
    (run with autograd off, it takes the kernel below autograd), and the formula above as
    its backward. ``forward`` and ``setup_context`` apart, as ``torch.func`` transforms
    (``grad``, ``jacrev``) require."""

    @staticmethod
    def forward(*args: Any) -> torch.Tensor:
        with torch.no_grad():
            return cast(torch.Tensor, _BAG_OP(*args))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        tensors, *table, input, offsets, weights, _mode, last, padding_idx, max_norm, norm_type = inputs
        ctx.table = (len(tensors), *table)
        ctx.forms = (last, padding_idx, max_norm, norm_type)
        ctx.args = len(inputs)
        ctx.weights_shape = weights.shape
        ctx.save_for_backward(*tensors, input, offsets)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        none: list[Any] = [None] * ctx.args  # one per op argument
        if not ctx.needs_input_grad[_WEIGHTS]:
            return tuple(none)
        if grad.shape[0] == 0:  # no bag: no id falls in one, each gets a zero gradient
            none[_WEIGHTS] = grad.new_zeros(ctx.weights_shape)
            return tuple(none)
        count, *table = ctx.table
        last, padding_idx, max_norm, norm_type = ctx.forms
        saved = ctx.saved_tensors
        tensors, input, offsets = list(saved[:count]), saved[count], saved[count + 1]
        flat = input.reshape(-1)
        position = torch.arange(flat.numel(), device=flat.device)
        if input.dim() == 2:
            bag = position // max(input.shape[1], 1)
            inside = torch.ones_like(position, dtype=torch.bool)
        else:
            starts = offsets[:-1] if last else offsets
            bag = (torch.searchsorted(starts, position, right=True) - 1).clamp(min=0)
            inside = position < offsets[-1] if last else torch.ones_like(position, dtype=torch.bool)
        # ids after the last bag were never range-checked (the forward skips them): row 0 in their place
        looked_up = torch.where(inside, flat, torch.zeros_like(flat))
        rows = torch.ops.embpress.embedding.default(tensors, *table, looked_up, max_norm, norm_type)
        if padding_idx is not None:
            inside = inside & (flat != padding_idx)
        per_id = (grad.index_select(0, bag) * rows).sum(1) if flat.numel() else rows.sum(1)
        none[_WEIGHTS] = torch.where(inside, per_id, torch.zeros_like(per_id)).reshape(ctx.weights_shape)
        return tuple(none)


def bag_with_gradient(*args: Any) -> torch.Tensor:
    """The bag op's arguments -> its output, with ``per_sample_weights``' gradient, as an
    ``autograd.Function`` called from Python: what ``torch.func`` transforms can take
    (they refuse it from within an op's autograd kernel)."""
    return cast(torch.Tensor, _BagWithGradient.apply(*args))


def _bag_autograd(keyset: Any, *args: Any) -> torch.Tensor:
    """The op's autograd kernel. With a gradient to give, ``_BagWithGradient``; without
    one, what lies below autograd: when that is the CPU kernel (plain CPU tensors, nothing
    tracing, no mode or subclass) it is called here, since a redispatch from Python parses
    every argument a second time (about as long again as the rest of the op's boundary);
    anything else (a trace, a mode, fake tensors, another device) gets the redispatch."""
    below = keyset & _BELOW_AUTOGRAD
    weights = args[_WEIGHTS]
    if weights is not None and weights.requires_grad and torch.is_grad_enabled():
        return cast(torch.Tensor, _BagWithGradient.apply(*args))
    with torch._C._AutoDispatchBelowAutograd():
        if below.highestPriorityTypeId() == _CPU:
            return _cpu_bag(*args)
        return _BAG_OP.redispatch(below, *args)


_LIB.impl("embedding_bag", _bag_autograd, "Autograd", with_keyset=True)
