"""Compress one table in row chunks, in bounded memory, byte for byte as in memory.

``compress_table`` does for one table what ``post_training_sparse_quantize`` does with
``DataNormSparsifier`` (same arguments, both orders) while holding only a few row chunks
of floats at a time, so the table may be a memory-mapped tensor, a tensor in a
safetensors file, or any ``read_rows(start, stop)``. Everything that is not row-local is
settled over the whole table first: the pruning threshold (``StreamingMask``,
exact through histograms), whether the blocks are whole (else entries are counted one by
one, as in memory) and the layout ("auto" from the summed mask statistics). Then each
chunk is encoded alone and the layout joins the parts (``concat_rows``). Memory: about
``chunk_rows`` rows of floats a few times over, plus the output.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import torch

from ._collective import LOCAL, Collective
from .io import FORMAT_NAME, SAFETENSORS_DTYPES
from .layouts.base import ROW_CHUNK_ALIGN, QuantizedTable
from .layouts.encode import (
    ERROR_BLOCK_ROWS,
    ErrorSums,
    choose_layout,
    encode_part,
    fake_quantize_table,
    finite_table,
    plain_qparams,
)
from .layouts.stats import MaskStats, row_stats
from .quant import QuantConfig
from .sparsify.data_norm import StreamingMask, _block_shape

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .checkpoint import CompressedCheckpoint

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "SafetensorsFile",
    "chunk_rows_for",
    "compress_safetensors",
    "compress_table",
    "compress_table_parts",
    "memory_chunk_bytes",
    "safetensors_rows",
    "safetensors_tables",
    "tensor_rows",
]

DEFAULT_CHUNK_BYTES = 32 << 20  # float32 bytes of one row chunk

ReadRows = Callable[[int, int], torch.Tensor]


def tensor_rows(table: torch.Tensor) -> ReadRows:
    """``read_rows`` over a 2-D tensor (a memory-mapped one is read chunk by chunk)."""
    return lambda start, stop: table[start:stop]


class SafetensorsFile:
    """A safetensors file read a row range at a time, whatever its size.

    ``safetensors.safe_open`` validates the header (dtypes, shapes, offsets that tile the
    data exactly); its numpy backend maps the file read-only, which works beyond RAM +
    swap. Rows are then taken at the validated offsets, in any dtype (bfloat16 included,
    which numpy lacks): as views of a copy-on-write mapping of the file (no copy; writes
    stay private), or, where the kernel refuses that mapping (a file beyond RAM + swap)
    or ``mapped`` is False, read with ``pread`` into a new tensor.
    """

    def __init__(self, path: str | os.PathLike[str], *, mapped: bool = True) -> None:
        """Open and validate ``path``; ValueError naming the file if it cannot be read."""
        from safetensors import SafetensorError, safe_open

        from .checkpoint import _safetensors_cause
        from .report import human_bytes

        self.path = p = Path(path)
        try:
            handle = safe_open(str(p), framework="numpy")
            with open(p, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(length))
        except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as err:
            cause = _safetensors_cause(err)
            if cause.startswith("too large"):
                size = human_bytes(p.stat().st_size)
                raise ValueError(f"{p}: too large to map into memory ({size})") from None
            raise ValueError(f"{p}: not a readable safetensors file ({cause})") from None
        self._metadata = dict(handle.metadata() or {})
        self._keys: list[str] = list(handle.offset_keys())
        self._entries: dict[str, tuple[torch.dtype | None, tuple[int, ...], int]] = {}
        for key in self._keys:  # offsets as validated by safe_open, from the data's start
            entry = header[key]
            shape = tuple(int(n) for n in entry["shape"])
            start = 8 + length + int(entry["data_offsets"][0])
            self._entries[key] = (SAFETENSORS_DTYPES.get(entry["dtype"]), shape, start)
        self._fd = os.open(p, os.O_RDONLY)
        del handle  # validated; its read-only mapping gives numpy arrays, not tensors
        self._map: Any = None  # torch.UntypedStorage of the whole file
        if mapped:
            try:
                nbytes = os.fstat(self._fd).st_size
                self._map = torch.UntypedStorage.from_file(str(p), shared=False, nbytes=nbytes)
            except (RuntimeError, MemoryError, OSError):  # beyond RAM + swap: pread
                self._map = None

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    def __iter__(self) -> Iterator[str]:
        """Tensor names in the order of their data."""
        return iter(self._keys)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def dtype(self, name: str) -> torch.dtype | None:
        """The tensor's torch dtype, None for one torch cannot hold (kept as it is)."""
        return self._entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (along the first dimension) of tensor ``name``. A view of the
        private mapping where there is one: writing into it never reaches the file, but
        later reads of those rows through this object return what was written. ValueError
        for a range outside the tensor (it would read other tensors' bytes, or the header)."""
        dtype, shape, offset = self._entries[name]
        if dtype is None:
            raise ValueError(f"{self.path}: tensor {name!r} has a dtype torch cannot hold")
        held = shape[0] if shape else 1  # a scalar is read as one row
        if not 0 <= start <= stop <= held:
            raise ValueError(
                f"{self.path}: rows {start}:{stop} are not a row range of tensor {name!r} ({held} rows)"
            )
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        at = offset + start * row_bytes
        if self._map is not None and at % dtype.itemsize == 0:
            n = (stop - start) * row_bytes
            out = torch.empty(0, dtype=torch.uint8).set_(self._map, at, (n,), (1,))
            return out.view(dtype).view(stop - start, *shape[1:])
        out = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
        view, done = out.numpy().data, 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], at + done)
            if got <= 0:
                raise ValueError(f"{self.path}: truncated while reading tensor {name!r}")
            done += got
        return out.view(dtype).view(stop - start, *shape[1:])

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor ``name``."""
        shape = self.shape(name)
        if not shape:
            return self.rows(name, 0, 1).reshape(())
        return self.rows(name, 0, shape[0])


def _plain_checkpoint(p: Path) -> SafetensorsFile:
    """The open safetensors file ``p``, refused if it is an embpress file already, or not a
    safetensors file (a torch.save checkpoint, say: only a .safetensors input is read in row
    chunks, which is how several processes share one)."""
    from .checkpoint import is_safetensors_file

    if not is_safetensors_file(p):
        raise ValueError(
            f"{p}: not a safetensors file: only a .safetensors checkpoint is read in row chunks, "
            "and so shared by several processes (torchrun); compress it in one process, which "
            "reads it whole"
        )
    handle = SafetensorsFile(p)
    if handle.metadata().get("format") == FORMAT_NAME:
        raise ValueError(f"{p}: already an embpress file (see 'embpress inspect {p}')")
    return handle


def safetensors_rows(path: str | Path, name: str) -> tuple[ReadRows, tuple[int, int]]:
    """``read_rows`` over tensor ``name`` of a safetensors file, read one slice at a time,
    and its shape. KeyError / ValueError for a missing or non-2-D tensor."""
    handle = SafetensorsFile(path)
    if name not in handle:
        raise KeyError(f"{path}: no tensor {name!r}")
    shape = handle.shape(name)
    if len(shape) != 2 or handle.dtype(name) is None:
        raise ValueError(f"{path}: tensor {name!r} has shape {shape}, expected 2-D")

    def read(start: int, stop: int) -> torch.Tensor:
        return handle.rows(name, start, stop)

    return read, (shape[0], shape[1])


MIN_MEMORY = 16 * 2**20  # the least working memory a chunked compression takes


def memory_chunk_bytes(memory: int) -> int:
    """float32 bytes of a row chunk for a working memory of ``memory`` bytes: a chunk is
    held a few times over (the floats, their quantized copy, codes, mask, norms)."""
    if isinstance(memory, bool) or not isinstance(memory, int):
        raise TypeError(f"memory must be a number of bytes (an int), got {type(memory).__name__}")
    if memory < MIN_MEMORY:
        raise ValueError(f"memory must be at least 16 MiB (in bytes), got {memory!r}")
    return memory // 8


def chunk_rows_for(dim: int, block_height: int = 1, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk: about ``chunk_bytes`` of float32, a multiple of ``ROW_CHUNK_ALIGN``
    (how the layouts join parts) and of the sparsifier's block height."""
    step = ROW_CHUNK_ALIGN * block_height // math.gcd(ROW_CHUNK_ALIGN, block_height)
    return max(step, chunk_bytes // (4 * max(dim, 1)) // step * step)


class ChunkOptions(TypedDict, total=False):
    """The keyword arguments of ``compress_table_parts`` (see there)."""

    shape: tuple[int, int] | None
    sparsify_first: bool
    sparsity_level: float
    sparse_block_shape: tuple[int, int]
    zeros_per_block: int | None
    norm: str
    chunk_rows: int | None
    name: str
    row_range: tuple[int, int] | None
    collective: Collective


def compress_table(
    source: torch.Tensor | ReadRows,
    config: QuantConfig | None = None,
    **options: Unpack[ChunkOptions],
) -> tuple[QuantizedTable | None, dict[str, float]]:
    """One table compressed chunk by chunk: the table and its error summary.

    ``source`` is a 2-D float tensor (memory-mapped, say) or ``read_rows(start, stop)``
    with ``shape`` given. The other arguments are those of
    ``post_training_sparse_quantize(model, DataNormSparsifier, sparsify_first, quant=config,
    sparsity_level=..., ...)``, whose result for this table is what comes back, byte for
    byte; ``compress_table_parts`` says what the others mean. The chunks' tables are
    joined (``concat_rows``); None for an empty ``row_range``.
    """
    parts, error = compress_table_parts(source, config, **options)
    return _joined(parts), error


def _joined(parts: list[QuantizedTable]) -> QuantizedTable | None:
    """``concat_rows`` of ``parts`` (None for none), emptying each as it is copied, so that
    the output is held once, not twice."""
    if len(parts) <= 1:
        return parts[0] if parts else None
    return type(parts[0]).concat_rows(parts, consume=True)


def compress_table_parts(
    source: torch.Tensor | ReadRows,
    config: QuantConfig | None = None,
    *,
    shape: tuple[int, int] | None = None,
    sparsify_first: bool = True,
    sparsity_level: float = 0.0,
    sparse_block_shape: tuple[int, int] = (1, 4),
    zeros_per_block: int | None = None,
    norm: str = "L1",
    chunk_rows: int | None = None,
    name: str = "table",
    row_range: tuple[int, int] | None = None,
    collective: Collective = LOCAL,
) -> tuple[list[QuantizedTable], dict[str, float]]:
    """One table compressed chunk by chunk: the table of each chunk, in row order, and
    the whole table's error summary. ``concat_rows`` of the chunks' tables is what
    ``post_training_sparse_quantize`` makes of the table, byte for byte
    (``compress_table``); ``assemble.write_parts`` writes them to a file unjoined.

    ``source`` is a 2-D float tensor (memory-mapped, say) or ``read_rows(start, stop)``
    with ``shape`` given. ``sparsify_first``, ``sparsity_level``, ``sparse_block_shape``,
    ``zeros_per_block`` and ``norm`` are the settings of ``post_training_sparse_quantize``
    with ``DataNormSparsifier``. ``chunk_rows``: rows per chunk, a positive multiple of
    ``ROW_CHUNK_ALIGN`` and of the block height (default: ``chunk_rows_for``).

    Several processes share a table with ``row_range`` (each its own rows; the ranges in
    rank order tile the table, every boundary a multiple of ``chunk_rows``) and a
    ``collective`` (``distributed.TorchCollective``): each gets the chunks of its rows
    (none for an empty range), those of all processes in rank order being the table's;
    the error summary is the whole table's.
    """
    config = config if config is not None else QuantConfig()
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be an embpress.QuantConfig, got {type(config).__name__}")
    if isinstance(source, torch.Tensor):
        if source.dim() != 2:
            raise ValueError(f"{name} is not 2-D (shape {tuple(source.shape)})")
        read_raw, shape = tensor_rows(source), (int(source.shape[0]), int(source.shape[1]))
    elif callable(source):
        if shape is None:
            raise ValueError("shape is needed with a read_rows function")
        read_raw = source
    else:
        raise TypeError(f"source must be a tensor or a read_rows function, got {type(source).__name__}")
    rows, dim = (int(n) for n in shape)
    if rows < 1 or dim < 1:
        raise ValueError(f"{name} is empty (shape {(rows, dim)})")
    block_height, block_width = _block_shape(sparse_block_shape)
    step = chunk_rows if chunk_rows is not None else chunk_rows_for(dim, block_height)
    align = ROW_CHUNK_ALIGN * block_height // math.gcd(ROW_CHUNK_ALIGN, block_height)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1 or step % align:
        raise ValueError(f"chunk_rows must be a positive multiple of {align}, got {chunk_rows!r}")

    def floats(start: int, stop: int) -> torch.Tensor:
        got = read_raw(start, stop)
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != (stop - start, dim):
            found = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise ValueError(f"{name}: rows {start}:{stop} read as {found}, expected {(stop - start, dim)}")
        return finite_table(got, config, f"{name} rows {start}:{stop}")

    def pruned_on(start: int, stop: int) -> torch.Tensor:
        """What the sparsifier sees: the floats, or their row-wise quantization (quantize-first)."""
        x = floats(start, stop)
        return x if sparsify_first else fake_quantize_table(x, plain_qparams(x, config), config.bits)

    lo, hi = (0, rows) if row_range is None else (int(row_range[0]), int(row_range[1]))
    if not 0 <= lo <= hi <= rows or (lo % step and lo != rows) or (hi % step and hi != rows):
        raise ValueError(
            f"row_range {(lo, hi)} must lie in [0, {rows}] with both ends multiples of chunk_rows "
            f"({step}) or the end of the table"
        )
    if collective.size == 1 and (lo, hi) != (0, rows):
        # the threshold, layout and error are settled over the rows the processes hold:
        # alone, this process would take its range for the whole table
        raise ValueError(
            f"row_range {(lo, hi)} covers part of the {rows} rows of {name}, but no collective "
            "shares the others: give the collective of the processes that hold them, or no row_range"
        )

    masks = StreamingMask(
        pruned_on,
        (rows, dim),
        sparsity_level,
        sparse_block_shape,
        zeros_per_block,
        norm,
        step,
        row_range=(lo, hi),
        collective=collective,
    ).chunks  # the threshold is found once; each call is one more pass over the rows

    width = min(max(1, block_width), dim)
    # pass 1: the mask's statistics over the whole table decide block width and layout
    totals, mixed = _count(masks(), dim, width)
    if int(collective.sum(np.array([mixed], dtype=np.int64))[0]):
        width = 1  # a block mixes kept and pruned entries somewhere: count entries
        totals, _ = _count(masks(), dim, width)
    layout = choose_layout(_stats_of(collective.sum(totals), dim, width), config)
    fixed = replace(config, layout=layout.layout)
    # pass 2: encode chunk by chunk, join
    parts: list[QuantizedTable] = []
    sums = ErrorSums(np.zeros(0), np.zeros(0), 0.0)
    for start, mask in masks():
        stop = start + mask.shape[0]
        x = floats(start, stop)
        saved = None if sparsify_first else plain_qparams(x, config)
        w = x if saved is None else fake_quantize_table(x, saved, config.bits)
        try:
            part, part_sums = encode_part(
                w,
                mask,
                fixed,
                block_width=width,
                saved_qparams=saved,
                reference=None if saved is None else x,
                checked=True,
                fixed_width=True,
            )
        except ValueError as err:  # a row the codes cannot hold: which table's, where
            raise ValueError(f"{name} rows {start}:{stop}: {err}") from err
        parts.append(part)
        sums = sums + part_sums
        _return_free_memory()
    return parts, _whole_table_error(sums, lo, rows, collective)


def _libc_trim() -> Callable[[int], int] | None:
    try:
        import ctypes

        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
        return trim
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _libc_trim()


def _return_free_memory() -> None:
    """Hand freed heap pages back to the system (glibc's ``malloc_trim``). Each chunk's
    part stays in memory among the chunk's freed working buffers, which glibc would keep
    otherwise: resident memory then grew with the number of chunks, not the output."""
    if _TRIM is not None:
        _TRIM(0)


def _whole_table_error(sums: ErrorSums, lo: int, rows: int, collective: Collective) -> dict[str, float]:
    """The error summary of the whole table from this process's partial sums (rows from
    ``lo``): every process places its partials in a table-wide array of zeros, and one sum
    over the processes assembles them exactly (x + 0 == x)."""
    if collective.size == 1:
        return sums.summary()
    blocks = -(-rows // ERROR_BLOCK_ROWS)
    both = np.zeros((2, blocks))
    first = lo // ERROR_BLOCK_ROWS
    both[0, first : first + sums.err_sq.shape[0]] = sums.err_sq
    both[1, first : first + sums.ref_sq.shape[0]] = sums.ref_sq
    both = collective.sum(both)
    return ErrorSums(both[0], both[1], collective.max(sums.max_abs)).summary()


def _count(masks: Iterator[tuple[int, torch.Tensor]], dim: int, width: int) -> tuple[np.ndarray, int]:
    """Mask statistics of the chunks as one int64 vector (rows, pruned, kept rows, then rows
    with 0..nb kept blocks), which adds up over chunks and processes; and how many chunks
    had a (1 x ``width``) block mixing kept and pruned entries."""
    nb = -(-dim // width)
    totals = np.zeros(4 + nb, dtype=np.int64)
    mixed = 0
    for _, mask in masks:
        counted = row_stats(mask.numpy(), mask.shape[0], dim, width)
        if counted.width != width:
            mixed += 1
            continue
        stats = counted.summary()
        totals[:3] += (stats.rows, stats.pruned, stats.kept_rows)
        totals[3 : 3 + len(stats.kept_blocks)] += stats.kept_blocks
    return totals, mixed


def _stats_of(totals: np.ndarray, dim: int, width: int) -> MaskStats:
    """The ``MaskStats`` of a table from its summed ``_count`` vector (as ``RowStats.summary``
    gives them: the histogram ends at the largest count present, at least nb entries)."""
    hist = [int(n) for n in totals[3:]]
    while len(hist) > -(-dim // width) and hist[-1] == 0:
        hist.pop()
    return MaskStats(int(totals[0]), dim, int(totals[1]), int(totals[2]), width, tuple(hist))


# ------------------------------------------------------------------------------ checkpoints


def _lazy_state(path: Path, handle: SafetensorsFile) -> dict[str, torch.Tensor]:
    """Every tensor of an open safetensors file as a meta tensor (shape and dtype only), in
    the order of their data, as ``safetensors.torch.load_file`` returns them."""
    out = {}
    for key in handle:
        dtype, shape = handle.dtype(key), handle.shape(key)
        out[key] = torch.empty(shape, dtype=dtype or torch.uint8, device="meta")
        if dtype is None:  # kept as it is, never a table
            out[key] = torch.empty(0, dtype=torch.uint8, device="meta")
    return out


def safetensors_tables(
    src: str | os.PathLike[str], patterns: Sequence[str] = ()
) -> dict[str, tuple[int, ...]]:
    """The tables ``compress_safetensors`` would compress (``checkpoint.find_tables`` on the
    file's header alone) and their shapes."""
    from . import checkpoint as ckpt

    p = Path(src)
    ckpt.check_input_file(p, fits=False)
    lazy = _lazy_state(p, _plain_checkpoint(p))
    return {k: tuple(lazy[k].shape) for k in ckpt.find_tables(lazy, patterns, source=p)}


def _check_output_fits(p: Path, shapes: list[tuple[int, ...]], config: QuantConfig) -> None:
    """ValueError unless the compressed tables, which are held in memory until written,
    fit in this machine's memory: bounded by every row stored whole at the config's bits
    (what "auto" never exceeds) plus a record header per row."""
    from .checkpoint import _memory_bytes
    from .layouts.base import fused_row_bytes
    from .report import human_bytes

    memory = _memory_bytes()
    tables = sum(rows * dim * 4 for rows, dim in shapes)
    bound = sum(
        rows * (fused_row_bytes(dim, config.bits, config.resolved_scale_dtype) + 16) for rows, dim in shapes
    )
    if memory is not None and bound > memory:
        raise ValueError(
            f"{p}: too large: its tables ({human_bytes(tables)} as float32) could take up to "
            f"{human_bytes(bound)} compressed, held in memory until written, more than this "
            f"machine's memory ({human_bytes(memory)})"
        )


def compress_safetensors(
    src: str | os.PathLike[str],
    patterns: Sequence[str] = (),
    *,
    sparsity: float = 0.0,
    block: tuple[int, int] = (1, 4),
    zeros_per_block: int | None = None,
    norm: str = "L1",
    quant: QuantConfig | None = None,
    sparsify_first: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    collective: Collective = LOCAL,
    on_table: Callable[[str, int, bool], None] | None = None,
    out: str | os.PathLike[str] | None = None,
) -> CompressedCheckpoint | None:
    """``checkpoint.compress_state_dict`` for a ``.safetensors`` file of any size: each
    table is read a row chunk at a time and compressed (``compress_table``), the other
    tensors are copied; saved, the result is byte for byte the in-memory one.

    With a ``collective`` of several processes (``distributed.TorchCollective``) every
    process reads and compresses its share of each table's rows. Given ``out``, the file
    is written there: by this process alone, or with several processes by each writing
    its own rows into one file (``assemble.write_parts``; ``out`` on a filesystem they
    all share), and the result is its report. Without ``out``, rank 0 gathers the parts
    and returns the result to save. Rank 0 returns the result, the others None.

    ``quant`` defaults to ``checkpoint.DEFAULT_BITS`` bits, as in ``compress_state_dict``.
    """
    from . import checkpoint as ckpt
    from .assemble import write_parts
    from .distributed import gather_table, row_ranges
    from .nn import QuantizedEmbedding

    config = quant if quant is not None else QuantConfig(bits=ckpt.DEFAULT_BITS)
    if not isinstance(config, QuantConfig):  # before anything reads config's fields
        raise TypeError(f"quant must be an embpress.QuantConfig, got {type(config).__name__}")
    p = Path(src)
    ckpt.check_input_file(p, fits=False)
    handle = _plain_checkpoint(p)
    lazy = _lazy_state(p, handle)
    if not lazy:
        raise ValueError(f"{p}: the file holds no tensors")
    try:
        keys = ckpt.find_tables(lazy, patterns, source=p)
        if not keys:
            raise ValueError(
                f"no embedding table found among {len(lazy)} tensors (choose them with patterns)"
            )
        _check_output_fits(p, [tuple(lazy[k].shape) for k in keys], config)
        chosen = set(keys)
        # the skeleton: other tensors read whole, each table a placeholder of its shape
        state = {k: handle.tensor(k) for k in lazy if k not in chosen}
        for key in keys:
            state[key] = torch.empty(1, dtype=lazy[key].dtype).expand(lazy[key].shape)
        root, modules = ckpt.build_skeleton(state, keys)
        sparse: dict[str, Any] = {"sparsity_level": sparsity, "sparse_block_shape": tuple(block)}
        bh = _block_shape(block)[0]
        held: list[tuple[str, list[QuantizedTable], dict[str, float]]] = []
        for key in keys:
            read, (rows, dim) = safetensors_rows(p, key)
            name = key[: -len(".weight")]
            if on_table is not None:
                on_table(name, rows * dim, False)
            step = chunk_rows_for(dim, bh, chunk_bytes)
            row_range = row_ranges(rows, collective.size, step)[collective.rank]
            parts, error = compress_table_parts(
                read,
                config,
                shape=(rows, dim),
                sparsify_first=sparsify_first,
                zeros_per_block=zeros_per_block,
                norm=norm,
                chunk_rows=step,
                name=f"table {name!r}",
                row_range=row_range,
                collective=collective,
                **sparse,
            )
            if out is not None:  # written unjoined, by each process
                held.append((name, parts, error))
                table = None
            else:
                part = _joined(parts)
                # over the collective's own group (a sub-group), not the default one
                group = getattr(collective, "group", None)
                table = gather_table(part, group=group) if collective.size > 1 else part
            if table is not None:
                module = QuantizedEmbedding(table)
                module.error = error
                *parents, attr = name.split(".")
                node = root.get_submodule(".".join(parents)) if parents else root
                node._modules[attr] = module
                modules[key] = module
            if on_table is not None:
                on_table(name, rows * dim, True)
        copied = {k: v for k, v in state.items() if k not in chosen}
        if out is not None:
            prefixes = tuple(f"{name}." for name, _, _ in held)
            # the other tensors as io.save writes them: the model's state_dict, in order
            rest = {k: v for k, v in root.state_dict().items() if not k.startswith(prefixes)}
            joined = write_parts(out, held, rest, collective)
            if collective.rank != 0:
                return None
            done = [
                (name, meta, sum(math.prod(shape) * dtype.itemsize for dtype, shape in specs.values()), error)
                for (name, _, error), (meta, specs) in zip(held, joined, strict=True)
            ]
            return ckpt.written_checkpoint(out, lazy, done, copied)
    except ValueError as err:
        if str(err).startswith(f"{p}: "):  # named already (SafetensorsFile's own errors)
            raise
        raise ValueError(f"{p}: {err}") from err
    if collective.rank != 0:
        return None
    return ckpt.compressed_checkpoint(root, lazy, copied)
