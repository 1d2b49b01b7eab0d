"""What every storage layout provides, and the fused row format two of them share.

Fused row format (FBGEMM's ``FusedNBitRowwise``; the dense and pruned-row layouts)::

    one row, ``row_bytes = ceil(D * bits / 8) + 2 * sizeof(scale_dtype)`` bytes:
    [ packed codes: element j in byte j*bits//8 at bit (j*bits)%8 | scale | offset ]

With float32 scale/offset at 8 bits and float16 at 4 and 2 bits this is byte for byte
what ``torch.ops.quantized.embedding_bag_{byte,4bit,2bit}_rowwise_offsets`` read, so
those kernels serve the lookups on CPU (4-bit bags on several threads go to embpress's
``_kernels.fused_bag``, see ``own_kernel_serves``); rows with the other qparam dtype
(``QuantConfig.scale_dtype``) go to embpress's plain kernel ``_kernels.packed_rows_bag``;
any other device decodes with plain torch ops.
"""

from __future__ import annotations

import functools
import json
import operator
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

from .._aot import KernelRef
from .._buffers import empty_tensor
from ..quant.packing import pack_codes, packed_length, unpack_codes
from ..quant.rowwise import RowQParams
from ..sparsify.base import _version_of
from .lookup import (
    Bags,
    FusedKernelTable,
    KernelPolicy,
    PackedRowsKernelTable,
    Pooling,
    kernel_path,
    run_bags,
    run_threads,
)
from .stats import MaskStats, RowStats

# numba kernels, loaded (with numba) on first use (see ``_aot``)
fused_bag = KernelRef("embpress.layouts._kernels", "fused_bag")
fused_run = KernelRef("embpress.layouts._kernels", "fused_run", returns="int64")
packed_rows_bag = KernelRef("embpress.layouts._kernels", "packed_rows_bag")
packed_rows_run = KernelRef("embpress.layouts._kernels", "packed_rows_run", returns="int64")

__all__ = [
    "BUFFER_DTYPES",
    "ROW_CHUNK_ALIGN",
    "EncodedTable",
    "FormatError",
    "Piece",
    "QuantizedTable",
    "RowReader",
    "cat_rows",
    "check_fused_qparams",
    "check_parts",
    "decode_fused",
    "fused_qparams",
    "fused_row_bytes",
    "fused_rows_bag",
    "make_fused",
    "read_checked",
    "shard_meta",
]

_T = TypeVar("_T")
# the integer dtype of each float width, for moving a float buffer without re-typing it
_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# per table: the policy, the buffers, their addresses and the kernel arguments of its last
# fast lookup (``QuantizedTable.kernel_args``); outside the module, so copies and pickles
# skip it
_Stamps = tuple[Any, ...]  # ``_stamps`` of a table's buffers
_KERNEL_ARGS: weakref.WeakKeyDictionary[Any, tuple[Any, tuple[Any, ...], _Stamps, Any]] = (
    weakref.WeakKeyDictionary()
)
# each table by the id of its first op tensor (``QuantizedTable.owner_of``)
_OWNERS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
# the table attribute holding its buffers as embpress last set or validated them, with
# what torch counts of each (``QuantizedTable.check_buffers``); pickled as a flag
_TRUSTED = "_embpress_trusted_buffers"
# op tensors validated as a table (``QuantizedTable.checked_view``), by the id of their
# first tensor (one entry per table while that tensor lives; a weak reference to it, whose
# death removes the entry): what was validated, and the other tensors (tensors compare
# by value, so they cannot be the keys of a WeakKeyDictionary)
_CHECKED_VIEWS: dict[int, tuple[weakref.ReferenceType[torch.Tensor], tuple[Any, ...], tuple[Any, ...]]] = {}


def _stamps(tensors: Sequence[torch.Tensor | None]) -> _Stamps:
    """Each tensor's version, data address, shape and strides (None for a missing one):
    an in-place write changes the version, a new storage (``.data = other``) the address.
    An inference tensor has no version (None): it may be written in place only under
    ``torch.inference_mode``."""
    return tuple(None if t is None else (_version_of(t), t.data_ptr(), t.shape, t.stride()) for t in tensors)


# buffer dtypes a pickled table holds as signed views of their width (``__getstate__``)
_UNPICKLABLE = (torch.uint16, torch.uint32, torch.uint64)
_PICKLE_VIEWS = "_embpress_unsigned_buffers"

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16"}
# every dtype a layout's buffers use, by name (how parts describe their buffers)
BUFFER_DTYPES = {
    "uint8": torch.uint8,
    "int16": torch.int16,
    "uint16": torch.uint16,
    "int32": torch.int32,
    "int64": torch.int64,
    "float16": torch.float16,
    "float32": torch.float32,
}
_BUFFER_NAMES = {v: k for k, v in BUFFER_DTYPES.items()}
DTYPES_BY_NAME = {v: k for k, v in _DTYPE_NAMES.items()}
_FBGEMM_OPS = {
    8: "embedding_bag_byte_rowwise_offsets",
    4: "embedding_bag_4bit_rowwise_offsets",
    2: "embedding_bag_2bit_rowwise_offsets",
}
_FBGEMM_SCALE = {8: torch.float32, 4: torch.float16, 2: torch.float16}
_SUM, _MEAN = Pooling.SUM, Pooling.MEAN


@functools.cache
def _fbgemm_op(bits: int) -> Any:
    """torch's FBGEMM bag op for fused rows of ``bits`` (looked up once)."""
    return getattr(torch.ops.quantized, _FBGEMM_OPS[bits])


def _fields_of(extra: Any) -> Any:
    """A table's fields from its state_dict entry (``get_extra_state``), None if unreadable."""
    if not isinstance(extra, torch.Tensor) or extra.dtype != torch.uint8 or extra.dim() != 1:
        return None
    try:
        return json.loads(bytes(extra.cpu().numpy()).decode())
    except (ValueError, RecursionError):
        return None


def _fields_text(fields: Any) -> str:
    """A table's fields (``meta``), briefly, for an error message."""
    if not isinstance(fields, dict):
        return "unreadable fields"
    shown = {k: v for k, v in fields.items() if k not in ("num_embeddings", "embedding_dim", "num_pruned")}
    return ", ".join(f"{k}={v}" for k, v in shown.items())


class FormatError(ValueError):
    """A stored table or file does not have the shape, dtype or content its header promises."""


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' / 'float16'."""
    return _DTYPE_NAMES[dtype]


def fused_row_bytes(dim: int, bits: int, scale_dtype: torch.dtype) -> int:
    """Bytes of one fused row."""
    return packed_length(dim, bits) + 2 * torch.empty((), dtype=scale_dtype).element_size()


def make_fused(
    codes: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    bits: int,
    dtype: torch.dtype,
    zero_rows: int = 0,
) -> torch.Tensor:
    """Fused rows ``[rows + zero_rows, row_bytes]`` from uint8 codes ``[rows, D]`` and
    per-row qparams, then ``zero_rows`` rows of zero bytes (on CPU in huge pages, see
    ``_buffers``)."""
    parts = [
        pack_codes(codes, bits),
        scale.to(dtype).reshape(-1, 1).view(torch.uint8),
        offset.to(dtype).reshape(-1, 1).view(torch.uint8),
    ]
    rows, row_bytes = parts[0].shape[0], sum(p.shape[1] for p in parts)
    if codes.device.type == "cpu":
        out = empty_tensor((rows + zero_rows, row_bytes), torch.uint8)
    else:
        out = torch.empty((rows + zero_rows, row_bytes), dtype=torch.uint8, device=codes.device)
    torch.cat(parts, dim=1, out=out[:rows])
    out[rows:] = 0
    return out


def fused_qparams(rows: torch.Tensor, dim: int, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """``[n, 2]`` (scale, offset) in ``dtype`` of fused rows ``[n, row_bytes]``.

    The bytes are copied into a fresh buffer before they are viewed as ``dtype``: a row's
    scale starts at byte ``ceil(D * bits / 8)`` of a ``row_bytes``-long row, which need not
    be a multiple of the dtype's size, and torch views bytes as floats only at aligned
    storage offsets (a slice of one row is "contiguous" and would not be copied).
    """
    packed = packed_length(dim, bits)
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.empty((rows.shape[0], 2 * size), dtype=torch.uint8, device=rows.device)
    raw.copy_(rows[:, packed : packed + 2 * size])
    return raw.view(dtype)


def decode_fused(rows: torch.Tensor, dim: int, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """float32 ``[n, D]`` from fused rows ``[n, row_bytes]`` (plain torch, any device)."""
    qparams = fused_qparams(rows, dim, bits, dtype).float()
    codes = unpack_codes(rows[:, : packed_length(dim, bits)], bits, dim)
    return codes.float() * qparams[:, :1] + qparams[:, 1:]


def check_fused_qparams(
    fused: torch.Tensor, dim: int, bits: int, dtype: torch.dtype, name: str = "fused", chunk: int = 1 << 20
) -> None:
    """FormatError unless every scale and offset of the fused rows is finite (a NaN or Inf
    one makes every lookup of its row NaN). Vectorised over the qparam columns only, in
    chunks of rows so the temporary stays small for tables of any size."""
    for start in range(0, fused.shape[0], chunk):
        qparams = fused_qparams(fused[start : start + chunk], dim, bits, dtype)
        if not bool(torch.isfinite(qparams).all()):
            row = start + int((~torch.isfinite(qparams)).any(1).nonzero()[0, 0])
            raise FormatError(f"tensor {name!r} holds a NaN or Inf scale or offset (row {row})")


# embpress's 4-bit kernel takes a batch on several threads only where each gets this many
# ids: a thread of it decodes rows slower than FBGEMM's one-thread kernel, so the split
# must make up for that (two threads, Zen 5, 1M x 128: 8,192 ids took 1.13-1.15x the time
# of FBGEMM's kernel, 12,288 ids 0.97-1.06x, 16,384 ids 0.90-0.94x)
OWN_FUSED_IDS_PER_THREAD = 8192


def own_kernel_serves(fused: torch.Tensor, dim: int, bits: int, threads: int, policy: KernelPolicy) -> bool:
    """Whether ``fused_bag`` (embpress's numba kernel) serves these fused rows.

    torch's FBGEMM 4-bit bag kernel runs on one thread whatever ``torch.get_num_threads()``
    says (torch 2.13; its 8-bit kernel splits the bags across threads). With several
    threads, 4-bit tables of 32, 64 or 128 columns therefore use embpress's vector kernel,
    which splits them (generic vector IR, no x86 intrinsic: it serves on every kernel path
    and CPU). On one thread FBGEMM's kernel is the faster one and keeps the work, as it
    does wherever ``policy`` turns embpress's off. ``threads``: those the batch would take
    at ``OWN_FUSED_IDS_PER_THREAD`` ids each (``lookup.run_threads``), one for a batch too
    small: where embpress's kernel serves, ``run_bags`` then splits it as any run kernel's.
    (The rows must carry float16 qparams, FBGEMM's 4-bit format; ``fused_rows_bag``
    checks that first.)
    """
    return (
        policy.fused_kernel and threads > 1 and bits == 4 and dim in (32, 64, 128) and fused.is_contiguous()
    )


def fused_rows_bag(
    fused: torch.Tensor,
    dim: int,
    bits: int,
    dtype: torch.dtype,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    mode: int,
    per_sample_weights: torch.Tensor | None,
    policy: KernelPolicy,
) -> torch.Tensor | None:
    """Sum/mean bags over fused rows on CPU; None where no kernel serves (another device,
    max pooling, or embpress's kernels turned off for rows FBGEMM does not take).

    torch's FBGEMM kernel, or embpress's (``own_kernel_serves``) where FBGEMM would leave
    threads idle; embpress's ``packed_rows_bag`` for rows FBGEMM does not take (their
    qparams not in FBGEMM's dtype for ``bits``), unless ``policy`` turns embpress's
    kernels off.
    """
    # (the cheap tests first: a large lookup leaves the caches cold, see ops._plain_bag)
    if not fused.is_cpu or (mode != _SUM and mode != _MEAN):
        return None
    if _FBGEMM_SCALE[bits] is not dtype:  # rows FBGEMM's kernels do not take
        if not (policy.fused_kernel and fused.is_contiguous()):
            return None
        rows, row_bytes = fused.shape
        half = dtype is torch.float16
        packed = PackedRowsKernelTable(fused.numpy().reshape(-1), row_bytes, dim, bits, half)
        bags = Bags.of(indices, offsets, mode, per_sample_weights)
        return run_bags(packed_rows_bag, packed, bags, rows, dim, run=packed_rows_run)
    # (only 4-bit rows may take embpress's kernel: ``threads`` is asked for those alone)
    threads = run_threads(indices.numel(), OWN_FUSED_IDS_PER_THREAD) if bits == 4 else 1
    if threads > 1 and own_kernel_serves(fused, dim, bits, threads, policy):
        rows, row_bytes = fused.shape
        table = FusedKernelTable(fused=fused.numpy().reshape(-1), row_bytes=row_bytes, dim=dim)
        bags = Bags.of(indices, offsets, mode, per_sample_weights)
        return run_bags(fused_bag, table, bags, rows, dim, run=fused_run)
    op = _fbgemm_op(bits)
    # The op sums whatever ``mode`` says (seen with torch 2.13), so mean is divided here.
    try:
        out: torch.Tensor = op(fused, indices, offsets, False, 0, False, per_sample_weights, None, True)
    except RuntimeError:  # the kernel checks every index; say it as nn.Embedding does
        # (its message differs between its one- and multi-threaded kernels: the ids decide)
        rows = fused.shape[0]
        if bool(((indices < 0) | (indices >= rows)).any()):
            raise IndexError(f"index out of range in self (num_embeddings={rows})") from None
        raise
    if out.shape[1] != dim:
        out = out[:, :dim]
    if mode == _MEAN:
        counts = (offsets[1:] - offsets[:-1]).clamp(min=1).to(out.dtype)
        out = out / counts.unsqueeze(1)
    return out


@dataclass(frozen=True)
class EncodedTable:
    """What the encoder hands a layout's ``pack``: the codes, the rows' qparams and what
    the mask said about each row."""

    # uint8, one code per byte: every entry, rows x dim row-major (pruned entries as their
    # row's zero code); or, for a layout with ``codes_per_block``, the codes of the kept
    # (1 x row_stats.width) blocks, row after row, an edge block padded with code 0
    codes: np.ndarray
    code_start: np.ndarray  # int64 [rows]: where row r's codes start (``codes_per_block``)
    qparams: RowQParams  # float32 scale / offset per row, exact in ``qparams.dtype``
    bits: int
    row_stats: RowStats
    stats: MaskStats  # ``row_stats.summary()``

    def code_rows(self) -> torch.Tensor:
        """uint8 ``[rows, dim]``: the codes of a layout without ``codes_per_block``."""
        return torch.from_numpy(self.codes).view(self.stats.rows, self.stats.dim)


class QuantizedTable(nn.Module):
    """A quantized table in one storage layout, which owns its whole life: predicted bytes
    and which rows need an exact zero (before encoding), packing the encoder's codes,
    validating stored tensors (``from_tensors``), decoding rows and fast bag lookups.

    A subclass in its own file, registered in ``layouts/__init__.py``, is all a new
    layout takes (see docs/architecture.md).
    """

    layout: ClassVar[str] = ""
    # the buffers the embpress ops take, in this order (see ``op_tensors``)
    op_tensor_names: ClassVar[tuple[str, ...]] = ()
    # what the encoder writes for ``pack`` (``EncodedTable.codes``): False, every entry of
    # every row, pruned ones as their row's zero code; True, only the kept blocks' codes
    codes_per_block: ClassVar[bool] = False
    # whether "auto" weighs this layout for a uniform config (False for a layout that only
    # pays off when something plans it row by row)
    in_auto: ClassVar[bool] = True
    # the tensors that place rows (a byte or less a row): a row-range load reads them
    # whole and checks their CRC-32, so that a shard's rows come from where the table
    # put them (the rows' own bytes, read in part, are checked as a table of their own)
    row_directory: ClassVar[tuple[str, ...]] = ()
    # each tensor's name, dtype and number of dimensions, checked before a row-range load
    # reads any of it (a whole table's tensors are checked in full by ``from_tensors``)
    tensor_kinds: ClassVar[tuple[tuple[str, torch.dtype, int], ...]] = ()
    # for TorchScript: properties it must not compile, class attributes it may read
    __jit_unused_properties__: ClassVar[list[str]] = ["nbytes", "sparsity"]
    __constants__: ClassVar[list[str]] = ["layout"]

    def __init__(
        self, num_embeddings: int, embedding_dim: int, bits: int, scale_dtype: torch.dtype, num_pruned: int
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.bits = bits
        self.scale_dtype = scale_dtype
        self.num_pruned = num_pruned

    # --------------------------------------------------------------- encoding
    @classmethod
    def predicted_nbytes(cls, stats: MaskStats, bits: int, scale_dtype: torch.dtype) -> int:
        """Exactly the ``nbytes`` of a table with these mask statistics in this layout,
        known before anything is quantized (how "auto" chooses)."""
        raise NotImplementedError

    @classmethod
    def zero_rows(cls, row_stats: RowStats) -> torch.Tensor | None:
        """Bool per row: the rows that store pruned entries in place, whose grid must hold
        an exact 0 (``quant.rowwise.choose_qparams``); None where no row does."""
        raise NotImplementedError

    @classmethod
    def pack(cls, encoded: EncodedTable) -> QuantizedTable:
        """The table holding the encoder's codes and qparams in this layout's buffers."""
        raise NotImplementedError

    @classmethod
    def concat_rows(cls, parts: Sequence[QuantizedTable], consume: bool = False) -> QuantizedTable:
        """One table of the rows of ``parts``, in order: byte for byte what encoding all the
        rows at once gives (how row chunks and ranks are joined; see ``streaming.py``).

        The parts are tables of this layout with the same geometry, every one but the last
        a multiple of ``ROW_CHUNK_ALIGN`` rows (ValueError otherwise, ``check_parts``).
        ``consume``: the parts' buffers may be emptied as they are copied (``cat_rows``).
        """
        raise NotImplementedError

    # The same join without meeting: each process holds one part and writes its pieces of
    # the joined buffers where they go (``assemble.write_parts``). The parts exchange
    # only their summaries; the pieces of all parts tile every joined buffer exactly, and
    # the joined buffers are those of ``concat_rows`` (the layout contract checks both).
    def part_summary(self) -> dict[str, Any]:
        """What the other parts need to place theirs (JSON): meta, and each buffer's dtype
        name and shape."""
        return {
            "meta": self.meta(),
            "buffers": {n: [_BUFFER_NAMES[t.dtype], list(t.shape)] for n, t in self.tensors().items()},
        }

    @classmethod
    def joined_layout(cls, summaries: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Spec]]:
        """The meta and the buffers' (dtype, shape) of ``concat_rows`` of parts with these
        summaries, in ``tensors()`` order."""
        raise NotImplementedError(f"layout {cls.layout!r} cannot be joined in place")

    def join_pieces(self, index: int, summaries: Sequence[dict[str, Any]]) -> list[Piece]:
        """This part's pieces of the joined buffers; ``index``: its place among the parts
        whose ``summaries`` are given."""
        raise NotImplementedError(f"layout {type(self).layout!r} cannot be joined in place")

    @classmethod
    def load_rows(cls, meta: dict[str, Any], read: RowReader, start: int, stop: int) -> QuantizedTable:
        """The table of rows ``start:stop`` of a stored table, reading only what those rows
        need (row-wise sharding): ``read(name, lo, hi)`` gives ``tensor[lo:hi]`` along the
        first dimension of the stored tensor ``name`` and ``read.shape(name)`` its shape.
        What is read is validated as a table of its own (``from_tensors``); the tensors
        named in ``row_directory`` come from reads of the whole tensor, CRC-checked.
        ``num_pruned`` of the shard is its own where its rows tell it, else the table's in
        proportion to its rows, within what they allow.
        """
        raise NotImplementedError(f"layout {cls.layout!r} cannot load a row range")

    # --------------------------------------------------------------- lookups
    def decode_rows(self, indices: torch.Tensor) -> torch.Tensor:
        """float32 rows ``[len(indices), D]`` for in-range int64 ``indices``."""
        raise NotImplementedError

    def fast_bag(
        self,
        indices: torch.Tensor,
        offsets: torch.Tensor,
        mode: int,
        per_sample_weights: torch.Tensor | None,
        policy: KernelPolicy | None = None,
    ) -> torch.Tensor | None:
        """``Pooling.SUM`` / ``MEAN`` of bags given ``offsets`` with a final total, by a fused
        kernel that checks the ids (IndexError); None where none serves. ``policy``: which
        of embpress's kernel paths may serve (default: ``lookup.current_kernel_policy()``)."""
        return None

    def kernel_args(self, policy: KernelPolicy, build: Callable[[], _T]) -> _T:
        """``build()``, a layout's kernel arguments (numpy views of its buffers and what
        derives from them), made once per policy and set of buffers rather than at every
        lookup, where it would cost a small batch more than its kernel (the key is the
        policy and the path it resolves to, which a test may change). In-place writes
        (``load_state_dict``) keep the buffers, which the views show; ``_apply`` (``.to()``,
        ``.half()``...) drops the arguments, and a buffer replaced otherwise (or its storage,
        by ``.data =``) makes the next lookup build them again."""
        held = self.__dict__.get("_buffers")
        if held is None:  # an op's view of tensors (``ops._view``): made for one call
            return build()
        key = (policy, kernel_path(policy))
        buffers = tuple(held.values())
        # a buffer's ``.data = other`` keeps the object and swaps its storage: the views'
        # memory may be gone, so its address is part of the key; a write in place changes
        # its version
        addresses = _stamps(buffers)
        hit = _KERNEL_ARGS.get(self)
        if (
            hit is not None
            and hit[0] == key
            and len(hit[1]) == len(buffers)
            and all(map(operator.is_, hit[1], buffers))
            and hit[2] == addresses
        ):
            return hit[3]
        self.check_buffers()  # anything written since embpress set the buffers: validated
        value = build()
        _KERNEL_ARGS[self] = (key, buffers, addresses, value)
        return value

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        """``fn`` on every buffer, each keeping its dtype: a stored table's dtypes are part of
        its format, so ``model.half()`` or ``.double()`` must not re-type a float buffer (a
        mixed table's column books), while moves between devices still apply. A float
        buffer goes through ``fn`` viewed as integers of its width (which the dtype casts
        of ``Module.to`` / ``half`` / ``double`` leave alone) and is viewed back; where
        ``fn`` casts integers too (``Module.type``), a buffer only moves to its device.
        Trusted buffers that ``fn`` left in their memory (a cast that integers ignore) stay
        trusted; new memory (a move, ``share_memory_``, ``to_empty``'s uninitialised
        buffers) is validated at the next lookup."""
        _KERNEL_ARGS.pop(self, None)
        kept = self._buffers_trusted()
        before = {n: (b.data_ptr(), b.nbytes) for n, b in self._buffers.items() if b is not None}

        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            viewed = t.view(_SAME_WIDTH_INT[t.element_size()]) if t.is_floating_point() else t
            out = fn(viewed)
            if out.dtype != viewed.dtype:  # a cast of integers too (Module.type): the move alone
                out = viewed.to(out.device)
            return out.view(t.dtype)

        out = super()._apply(keep_dtype, recurse)
        self._own_op_tensors()
        after = {n: (b.data_ptr(), b.nbytes) for n, b in self._buffers.items() if b is not None}
        if kept and after == before:
            self._trust_buffers()
        return out

    # --------------------------------------------------------------- state_dict
    def get_extra_state(self) -> torch.Tensor:
        """The table's fields (``meta``) as JSON in a uint8 tensor, which ``state_dict()``
        carries beside the buffers (the same buffers mean another table under other
        fields: bits, codecs...); a tensor, so that a state_dict stays all tensors for
        safetensors and other tensor-only writers."""
        return torch.frombuffer(
            bytearray(json.dumps(self.meta(), sort_keys=True).encode()), dtype=torch.uint8
        )

    def set_extra_state(self, state: Any) -> None:
        """Nothing: ``_load_from_state_dict`` checks the fields against this table's."""

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Every buffer at once, or none: the state must hold a valid table (``from_tensors``)
        with this table's fields and buffer shapes. torch's own copy would take each
        buffer whose shape matches even when another does not, and a table stored
        otherwise under the same shapes, leaving lookups to read past the buffers or
        decode garbage. A state without fields (saved before they were kept) is checked
        against this table's; ``num_pruned`` is taken from the state's. ``assign=True``
        makes the state's tensors the buffers, as torch does (a non-contiguous one as a
        contiguous copy)."""
        for hook in self._load_state_dict_pre_hooks.values():  # as Module._load_from_state_dict
            hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        names = list(self._buffers)
        extra = prefix + "_extra_state"
        if strict:
            for key in state_dict:
                if (
                    key.startswith(prefix)
                    and key != extra
                    and key[len(prefix) :].split(".", 1)[0] not in names
                ):
                    unexpected_keys.append(key)
        missing = [prefix + n for n in names if prefix + n not in state_dict]
        if missing:
            missing_keys.extend(missing)
            return
        own, where = self.meta(), prefix.rstrip(".") or "table"
        fields = _fields_of(state_dict[extra]) if extra in state_dict else own
        if not isinstance(fields, dict) or {**fields, "num_pruned": 0} != {**own, "num_pruned": 0}:
            error_msgs.append(
                f"{where}: the state holds a table stored as {_fields_text(fields)}; this module's "
                f"is {_fields_text(own)} (load the file with embpress.load, or build the module "
                "from that table)"
            )
            return
        incoming: dict[str, torch.Tensor] = {}
        for name in names:
            value, mine = state_dict[prefix + name], self._buffers[name]
            if not isinstance(value, torch.Tensor) or mine is None:
                error_msgs.append(f"{where}: {prefix + name} is not a tensor")
                return
            if value.shape != mine.shape or value.dtype != mine.dtype:
                error_msgs.append(
                    f"size mismatch for {prefix + name}: copying a {value.dtype} buffer of shape "
                    f"{tuple(value.shape)} from checkpoint, the {mine.dtype} buffer in the current "
                    f"model has shape {tuple(mine.shape)}."
                )
                return
            incoming[name] = value
        pruned = fields.get("num_pruned", own["num_pruned"])
        try:
            type(self).from_tensors(
                {**own, "num_pruned": pruned}, {n: t.detach().to("cpu") for n, t in incoming.items()}
            )
        except (FormatError, ValueError, TypeError, IndexError, RuntimeError) as err:
            error_msgs.append(f"{where}: the state's buffers are not a valid table ({err})")
            return
        if local_metadata.get("assign_to_params_buffers", False):
            for name, value in incoming.items():
                # the kernels read buffers as packed: a strided view is assigned as a copy
                self._buffers[name] = value.contiguous()
            self._own_op_tensors()
        else:
            with torch.no_grad():
                for name, value in incoming.items():
                    self._buffers[name].copy_(value)  # type: ignore[union-attr]
        self.num_pruned = int(pruned)
        _KERNEL_ARGS.pop(self, None)
        self._buffers_loaded()
        self._trust_buffers()

    def _buffers_loaded(self) -> None:
        """Recompute whatever a layout derives from its buffers' values, after
        ``load_state_dict`` wrote new ones in place (nothing by default)."""

    def __getstate__(self) -> dict[str, Any]:
        """The module's state for pickle, its unsigned 16- to 64-bit buffers as signed views
        of the same bytes (torch 2.13 pickles those dtypes but cannot unpickle them)."""
        state = dict(self.__dict__)
        # the copy is trusted where this table was (else validated at its first lookup)
        state[_TRUSTED] = self._buffers_trusted()
        buffers = dict(state["_buffers"])
        viewed = {}
        for name, t in buffers.items():
            if t is not None and t.dtype in _UNPICKLABLE:
                buffers[name], viewed[name] = t.view(_SAME_WIDTH_INT[t.element_size()]), t.dtype
        state["_buffers"], state[_PICKLE_VIEWS] = buffers, viewed
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        for name, dtype in state.pop(_PICKLE_VIEWS, {}).items():
            state["_buffers"][name] = state["_buffers"][name].view(dtype)
        trusted = state.pop(_TRUSTED, False) is True
        super().__setstate__(state)
        self._own_op_tensors()
        if trusted:
            self._trust_buffers()

    def register_buffer(self, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        if tensor is not None and tensor.numel() == 0:
            # an empty tensor of torch's own (one from numpy has a storage but no data
            # pointer, which ``torch.export.save`` cannot write)
            tensor = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
        super().register_buffer(name, tensor, persistent)
        if self.op_tensor_names and name == self.op_tensor_names[0]:
            self._own_op_tensors()

    def _own_op_tensors(self) -> None:
        """Let ``owner_of`` find this table from its first op tensor."""
        first = self._buffers.get(self.op_tensor_names[0]) if self.op_tensor_names else None
        if first is not None:
            _OWNERS[id(first)] = self

    def _buffer_record(self) -> tuple[tuple[Any, ...], _Stamps]:
        """The buffers as they are now: the objects and their ``_stamps``."""
        held = tuple(self._buffers.values())
        return held, _stamps(held)

    def _trust_buffers(self, record: tuple[tuple[Any, ...], _Stamps] | None = None) -> None:
        """Trust the buffers as ``record`` (default: now) found them: what embpress made
        or validated. Layouts call it at the end of ``__init__`` (a table built by its
        constructor is embpress's own: ``from_tensors`` validates before it builds)."""
        self.__dict__[_TRUSTED] = self._buffer_record() if record is None else record

    def _buffers_trusted(self) -> bool:
        """Whether the buffers are the ones embpress last trusted, unwritten since (by
        what torch counts: in-place ops, a new storage, a new shape)."""
        state = self.__dict__
        trusted = state.get(_TRUSTED)
        if trusted is None:
            return False
        held, stamps = trusted
        now = tuple(state["_buffers"].values())
        return len(now) == len(held) and all(map(operator.is_, now, held)) and _stamps(now) == stamps

    def check_buffers(self) -> None:
        """Validate the buffers if anything replaced them or wrote into them since embpress
        set or validated them (a program's ``load_state_dict`` copies into the buffers it
        shares with its model; a user may write a buffer): a FormatError if they no longer
        hold a valid table of these fields, else what derives from them is made again.
        Lookups call it first, so that no kernel reads a table whose offsets nobody checked;
        when nothing changed it reads each buffer's version counter."""
        buffers = self.__dict__.get("_buffers")
        if buffers is None:  # an op's view (``checked_view``): checked when made
            return
        if self._buffers_trusted():
            return
        record = self._buffer_record()  # before reading them: a write meanwhile is not trusted
        names = [n for n, b in buffers.items() if b is not None]
        try:
            checked = type(self).from_tensors(
                self.meta(), {n: buffers[n].detach().to("cpu") for n in names}, True
            )
        except (FormatError, ValueError, TypeError, IndexError, RuntimeError) as err:
            raise FormatError(
                f"the buffers of this {self.layout} table were written or replaced outside "
                f"embpress and no longer hold a valid table ({err}); load a table with "
                "embpress.load or load_state_dict on the module"
            ) from None
        self.num_pruned = checked.num_pruned
        _KERNEL_ARGS.pop(self, None)
        self._buffers_loaded()
        self._trust_buffers(record)

    @classmethod
    def checked_view(
        cls,
        tensors: list[torch.Tensor],
        num_embeddings: int,
        embedding_dim: int,
        bits: int,
        scale_dtype: torch.dtype,
        layout_args: list[int],
    ) -> QuantizedTable:
        """``from_op_args``, its tensors validated as a table of these fields the first
        time they are seen (then remembered while they live, by object and version): an
        exported program's constants, or a state loaded into it, are checked before a
        kernel reads them, as a file is."""
        view = cls.from_op_args(tensors, num_embeddings, embedding_dim, bits, scale_dtype, layout_args)
        key = (cls, num_embeddings, embedding_dim, bits, scale_dtype, tuple(layout_args), _stamps(tensors))
        hit = _CHECKED_VIEWS.get(id(tensors[0])) if tensors else None
        if (
            hit is not None
            and hit[0]() is tensors[0]
            and hit[1] == key
            and all(map(operator.is_, hit[2], tensors[1:]))
        ):
            return view
        named = {n: t.detach().to("cpu") for n, t in zip(cls.op_tensor_names, tensors, strict=True)}
        try:
            cls.from_tensors(view.meta(), named, True)
        except (FormatError, ValueError, TypeError, IndexError, RuntimeError) as err:
            raise FormatError(
                f"the op was given tensors that are not a valid {cls.layout} table: {err}"
            ) from None
        if tensors:  # (the rest held strongly: they live as long as the first, a table's)
            first = id(tensors[0])

            def forget(ref: weakref.ReferenceType[torch.Tensor], first: int = first) -> None:
                entry = _CHECKED_VIEWS.get(first)
                if entry is not None and entry[0] is ref:
                    del _CHECKED_VIEWS[first]

            _CHECKED_VIEWS[first] = (weakref.ref(tensors[0], forget), key, tuple(tensors[1:]))
        return view

    @classmethod
    def owner_of(
        cls,
        tensors: Sequence[torch.Tensor],
        num_embeddings: int,
        embedding_dim: int,
        bits: int,
        scale_dtype: torch.dtype,
        layout_args: Sequence[int],
    ) -> QuantizedTable | None:
        """The live table of this layout whose own buffers ``tensors`` are (the very
        objects, in ``op_tensor_names`` order) and whose fields these are, else None.

        An op given a module's table (what compiled and exported graphs pass) then uses
        the table itself, with its kernel arguments kept between calls (``kernel_args``),
        instead of a view made for the call (``from_op_args``)."""
        table = _OWNERS.get(id(tensors[0])) if tensors else None
        if (
            table is None
            or type(table) is not cls
            or len(tensors) != len(cls.op_tensor_names)
            or (table.num_embeddings, table.embedding_dim, table.bits, table.scale_dtype)
            != (num_embeddings, embedding_dim, bits, scale_dtype)
            or list(table.layout_args()) != list(layout_args)
        ):
            return None
        held = table._buffers
        if any(held.get(n) is not t for n, t in zip(cls.op_tensor_names, tensors, strict=True)):
            return None
        table.check_buffers()  # written since: validated, what derives from them made again
        if list(table.layout_args()) != list(layout_args):
            return None  # now another table's: the op's own fields decide (``checked_view``)
        return table

    def dequantize(self, chunk_rows: int = 1 << 16) -> torch.Tensor:
        """The whole table as float32 ``[num_embeddings, embedding_dim]``."""
        device = next(self.buffers()).device
        out = torch.empty(self.num_embeddings, self.embedding_dim, device=device)
        for start in range(0, self.num_embeddings, chunk_rows):
            stop = min(start + chunk_rows, self.num_embeddings)
            out[start:stop] = self.decode_rows(torch.arange(start, stop, device=device))
        return out

    # --------------------------------------------------------------- sizes and metadata
    @property
    def nbytes(self) -> int:
        """Every byte held for the table."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @property
    def sparsity(self) -> float:
        """Fraction of entries pruned (they decode to exactly 0.0)."""
        total = self.num_embeddings * self.embedding_dim
        return self.num_pruned / total if total else 0.0

    def meta(self) -> dict[str, Any]:
        """JSON-able description that, with the buffers, rebuilds the table."""
        return {
            "layout": self.layout,
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "bits": self.bits,
            "scale_dtype": dtype_name(self.scale_dtype),
            "num_pruned": self.num_pruned,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """The buffers by name (what is written to disk)."""
        return dict(self.named_buffers())

    @classmethod
    def from_tensors(
        cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], count_pruned: bool = False
    ) -> QuantizedTable:
        """Rebuild from :meth:`meta` and :meth:`tensors`, checking every field first.
        ``count_pruned``: tensors whose ``num_pruned`` no file gave (an op's, buffers
        written in place): it is counted from them, or brought within what they allow,
        instead of checked."""
        raise NotImplementedError

    # --------------------------------------------------------------- the embpress ops
    def layout_args(self) -> list[int]:
        """Integers besides the base fields that a lookup needs (e.g. the block width)."""
        none: list[int] = []  # typed for TorchScript
        return none

    def op_fields(self) -> tuple[str, int, int, int, str, list[int]]:
        """The embpress ops' static table arguments: layout, num_embeddings, embedding_dim,
        bits, scale dtype name and ``layout_args()``."""
        dtype = "float16" if self.scale_dtype == torch.float16 else "float32"
        return self.layout, self.num_embeddings, self.embedding_dim, self.bits, dtype, self.layout_args()

    def op_tensors(self) -> list[torch.Tensor]:
        """The buffers named by ``op_tensor_names``, in order: what the embpress ops take.

        The layouts here spell theirs out, which TorchScript can compile (this loop it
        cannot); a layout that does not works everywhere but in ``torch.jit.script``.
        """
        return [getattr(self, name) for name in self.op_tensor_names]

    @classmethod
    def from_op_args(
        cls,
        tensors: list[torch.Tensor],
        num_embeddings: int,
        embedding_dim: int,
        bits: int,
        scale_dtype: torch.dtype,
        layout_args: list[int],
    ) -> QuantizedTable:
        """A lookup-only view of the table an op was given, built in about a microsecond.

        The embpress ops (``embpress.ops``) get a table as tensors plus fields, once per
        call; ``nn.Module.__init__`` and ``from_tensors``' validation would cost more than
        a small lookup. The view has the attributes ``decode_rows`` and ``fast_bag`` read
        and nothing else (no module state: it is not for ``.to()``, ``state_dict()`` or
        printing), and it is not validated: the tensors come from a table that was.
        """
        if len(tensors) != len(cls.op_tensor_names):
            raise ValueError(
                f"layout {cls.layout!r} takes {len(cls.op_tensor_names)} tensors "
                f"{cls.op_tensor_names}, got {len(tensors)}"
            )
        view = cls.__new__(cls)
        view.__dict__.update(
            num_embeddings=num_embeddings,
            embedding_dim=embedding_dim,
            bits=bits,
            scale_dtype=scale_dtype,
            num_pruned=0,
        )
        view.__dict__.update(zip(cls.op_tensor_names, tensors, strict=True))
        view._init_view(layout_args)
        return view

    def _init_view(self, layout_args: list[int]) -> None:
        """Set what ``__init__`` derives from ``layout_args`` on a ``from_op_args`` view."""
        if layout_args:
            raise ValueError(f"layout {self.layout!r} takes no layout_args, got {layout_args}")

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}x{self.embedding_dim}, layout={self.layout}, bits={self.bits}, "
            f"sparsity={self.sparsity:.3f}, nbytes={self.nbytes}"
        )


# ------------------------------------------------------------------- validation helpers
def expect_tensor(
    tensors: dict[str, torch.Tensor], name: str, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    """The tensor ``name`` if it has exactly ``dtype`` and ``shape``; FormatError otherwise."""
    if name not in tensors:
        raise FormatError(f"tensor {name!r} is missing")
    t = tensors[name]
    if t.dtype != dtype:
        raise FormatError(f"tensor {name!r} has dtype {t.dtype}, expected {dtype}")
    if tuple(t.shape) != shape:
        raise FormatError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
    return t


def meta_int(meta: dict[str, Any], key: str, low: int = 0, high: int = 1 << 40) -> int:
    """An integer field of ``meta`` in [low, high]; FormatError otherwise."""
    value = meta.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise FormatError(f"field {key!r} must be an integer in [{low}, {high}], got {value!r}")
    return value


def base_fields(meta: dict[str, Any]) -> tuple[int, int, int, torch.dtype, int]:
    """Validated (num_embeddings, embedding_dim, bits, scale_dtype, num_pruned)."""
    rows = meta_int(meta, "num_embeddings", 1)
    dim = meta_int(meta, "embedding_dim", 1, 1 << 24)
    bits = meta.get("bits")
    if type(bits) is not int or bits not in (8, 4, 2):  # not a bool, nor a float equal to one
        raise FormatError(f"field 'bits' must be 8, 4 or 2, got {bits!r}")
    name = meta.get("scale_dtype")
    if name not in DTYPES_BY_NAME:
        raise FormatError(f"field 'scale_dtype' must be float32 or float16, got {name!r}")
    pruned = meta_int(meta, "num_pruned", 0, rows * dim)
    return rows, dim, int(bits), DTYPES_BY_NAME[name], pruned


def stored_rows_pruned(rows: int, dim: int, stored: int) -> tuple[int, int]:
    """The least and most ``num_pruned`` of a table of ``rows`` rows of which ``stored``
    are kept whole (layouts that leave a row out where it has no kept entry): every entry
    of the other rows, and at most all but one entry of each stored row."""
    return (rows - stored) * dim, rows * dim - stored


def check_pruned(pruned: int, bounds: tuple[int, int], source: str, count: bool = False) -> int:
    """``pruned``, or a FormatError unless it lies within ``bounds``
    (``stored_rows_pruned``), which tensor ``source`` says; with ``count`` (tensors that
    no file counted: ``from_tensors(count_pruned=True)``) it is brought within them."""
    low, high = bounds
    if count:
        return min(max(pruned, low), high)
    if not low <= pruned <= high:
        raise FormatError(
            f"field 'num_pruned' ({pruned}) is outside what {source!r} allows: from {low} (the "
            f"rows it leaves out) to {high} (all but one entry of each stored row)"
        )
    return pruned


POPCOUNT8 = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def popcount_bytes(x: torch.Tensor) -> torch.Tensor:
    """Set bits of each uint8 (int64 result), by table lookup (works on every device)."""
    return POPCOUNT8.to(x.device)[x.long()]


# Row chunks joined by ``concat_rows`` hold a multiple of this many rows (all but the last):
# a multiple of every layout's own row grouping (pruned rows: 8 per bitmap byte;
# block-sparse: at most 256 rows per group offset).
ROW_CHUNK_ALIGN = 256


Spec = tuple[torch.dtype, tuple[int, ...]]


@dataclass(frozen=True)
class Piece:
    """Rows ``start : start + len(data)`` (first dimension) of joined buffer ``name``."""

    name: str
    start: int
    data: torch.Tensor


def summed_meta(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The first part's meta with the rows and pruned entries of all parts."""
    meta = dict(summaries[0]["meta"])
    meta["num_embeddings"] = sum(int(s["meta"]["num_embeddings"]) for s in summaries)
    meta["num_pruned"] = sum(int(s["meta"]["num_pruned"]) for s in summaries)
    return meta


def buffer_spec(summary: dict[str, Any], name: str, rows: int) -> Spec:
    """Buffer ``name`` of a part, as a joined buffer of ``rows`` rows."""
    dtype, shape = summary["buffers"][name]
    return BUFFER_DTYPES[dtype], (rows, *(int(n) for n in shape[1:]))


def buffer_rows(summary: dict[str, Any], name: str) -> int:
    """Rows (first dimension) of a part's buffer ``name``."""
    return int(summary["buffers"][name][1][0])


def cat_rows(
    parts: Sequence[QuantizedTable],
    name: str,
    piece: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    extra: int = 0,
    consume: bool = False,
) -> torch.Tensor:
    """``torch.cat`` of ``piece(buffer)`` of every part, with ``extra`` more rows left
    zero at the end; ``consume`` empties each part's buffer once it is copied, so that the
    parts and the result are not both held whole (how ``concat_rows`` joins row chunks)."""
    first = getattr(parts[0], name)
    total = sum(int(piece(getattr(p, name)).shape[0]) for p in parts)
    # uninitialised: its pages are taken only as they are written, while the parts go
    out = empty_tensor((total + extra, *first.shape[1:]), first.dtype, populate=False)
    out[total:] = 0
    at = 0
    for part in parts:
        chunk = piece(getattr(part, name))
        out[at : at + chunk.shape[0]] = chunk
        at += int(chunk.shape[0])
        if consume:
            setattr(part, name, chunk.new_empty((0, *chunk.shape[1:])))
        del chunk
    return out


def check_parts(cls: type[QuantizedTable], parts: Sequence[QuantizedTable], *fields: str) -> None:
    """ValueError unless ``parts`` are one or more ``cls`` tables agreeing on the base
    fields and ``fields``, all but the last a multiple of ``ROW_CHUNK_ALIGN`` rows."""
    if not parts:
        raise ValueError("concat_rows needs at least one part")
    first = parts[0]
    names = ("embedding_dim", "bits", "scale_dtype", *fields)
    for i, part in enumerate(parts):
        if type(part) is not cls:
            raise ValueError(f"part {i} is a {type(part).__name__}, expected {cls.__name__}")
        for name in names:
            if getattr(part, name) != getattr(first, name):
                got, want = getattr(part, name), getattr(first, name)
                raise ValueError(f"part {i} has {name} {got!r}, part 0 {want!r}")
        if i < len(parts) - 1 and part.num_embeddings % ROW_CHUNK_ALIGN:
            raise ValueError(
                f"part {i} has {part.num_embeddings} rows; every part but the last needs a multiple "
                f"of {ROW_CHUNK_ALIGN}"
            )


class RowReader(Protocol):
    """Reads parts of a stored table's tensors (see ``QuantizedTable.load_rows``)."""

    def __call__(self, name: str, lo: int, hi: int) -> torch.Tensor: ...

    def shape(self, name: str) -> tuple[int, ...]: ...


def shard_meta(meta: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    """``meta`` of rows ``start:stop`` of a table (FormatError for a range outside it)."""
    rows = meta_int(meta, "num_embeddings", 1)
    dim = meta_int(meta, "embedding_dim", 1, 1 << 24)
    pruned = meta_int(meta, "num_pruned", 0, rows * dim)
    if not 0 <= start < stop <= rows:
        raise FormatError(f"row range {start}:{stop} is not a non-empty range of the table's {rows} rows")
    return {
        **meta,
        "num_embeddings": stop - start,
        "num_pruned": min(pruned * (stop - start) // rows, (stop - start) * dim),
    }


def read_checked(read: RowReader, name: str, lo: int, hi: int) -> torch.Tensor:
    """``read(name, lo, hi)`` after checking the range lies inside the stored tensor (the
    range comes from offsets in the file, which are not trusted before they are checked)."""
    shape = read.shape(name)
    if not shape or not 0 <= lo <= hi <= shape[0]:
        raise FormatError(f"tensor {name!r} (shape {tuple(shape)}) has no rows {lo}:{hi}")
    return read(name, lo, hi)
