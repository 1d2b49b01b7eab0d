"""Per-row codecs: how one row of a table is stored in the mixed layout, and its error.

A ``Codec`` names a way to store a row, with its bytes per row and the bytes its class
shares:

- ``pruned``: nothing stored; the row decodes to exact 0.0.
- ``rowwise{8,4,2}``: uniform codes with a float16 scale and offset per row (FBGEMM's
  fused row: ``ceil(D * bits / 8) + 4`` bytes) over the row's range: at 4 bits FBGEMM's
  greedy clipping-range search, as ``QuantConfig``'s uniform 4-bit codes (a class of
  rowwise4 rows holds exactly the uniform table's rows, so wherever uniform 4-bit fits a
  budget the planner can do at least as well by its own measure), else min/max (the
  search at 2 bits too measured no better, for a second more of planning per 1M rows);
  the scale and offset are chosen in float16 first and the codes against them, so a row
  decodes to exactly ``code * scale + offset`` of the stored values.
- ``levels{2,1}``: 2**bits float16 levels per row, fitted by 1-D k-means over the row's
  values (``ceil(D * bits / 8) + 2 * 2**bits`` bytes): non-uniform levels where a row's
  values are (trained tables are not uniform within a row).
- ``colbook{4,2,1}``: one book of 2**bits float32 levels per column, shared by every row
  of the class and fitted by 1-D k-means over the column (rows weighted by
  ``row_weights``), plus ``ceil(D * bits / 8)`` bytes of codes per row.

``row_errors`` gives each row's squared error under a codec, the planner's input;
``encode_rows`` writes a class's rows (the mixed layout's build) with the same kernels,
so the predicted errors are the errors of the stored table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .._aot import KernelRef
from .._parallel import parallel_call, rows_call
from .packing import packed_length
from .rowwise import row_ranges, search_ranges

# numba kernels, loaded (with numba) on first use (see ``_aot``)
count_nonfinite = KernelRef("embpress._finite", "count_nonfinite", returns="int64")
colbook_codes = KernelRef("embpress.quant._codec_kernels", "colbook_codes")
colbook_fit = KernelRef("embpress.quant._codec_kernels", "colbook_fit")
levels_codes = KernelRef("embpress.quant._codec_kernels", "levels_codes")
levels_fit = KernelRef("embpress.quant._codec_kernels", "levels_fit")
row_sqnorm = KernelRef("embpress.quant._codec_kernels", "row_sqnorm")
rowwise_codes = KernelRef("embpress.quant._codec_kernels", "rowwise_codes")

__all__ = [
    "CODECS",
    "KINDS",
    "Codec",
    "encode_rows",
    "fit_colbook",
    "row_errors",
]

KINDS = ("pruned", "rowwise", "levels", "colbook")  # a kind's index is its id in files and kernels
_BITS = {"pruned": (0,), "rowwise": (8, 4, 2), "levels": (2, 1), "colbook": (4, 2, 1)}
_F16_MAX = 65504.0
LEVELS_ITERS = 12  # Lloyd steps of a row's levels (most rows settle in fewer)
COLBOOK_ITERS = 40  # Lloyd steps of a column's book (each costs O(2**bits log n))
COLBOOK_SAMPLE = 8192  # rows a column book is fitted on, at most
_SEARCH_BYTES = 32 << 20  # bytes of rows whose clipping ranges are searched at a time (a copy)
# rowwise codes of this width code each row on its searched clipping range (QuantConfig's
# uniform 4-bit codes); the others on min/max: searching at 2 bits too adds about a second
# to planning 1M x 128 rows and measured no better on the benchmark models
SEARCHED_BITS = 4


@dataclass(frozen=True)
class Codec:
    """How one row is stored: ``kind`` (pruned, rowwise, levels, colbook) at ``bits``."""

    kind: str
    bits: int

    def __post_init__(self) -> None:
        if self.kind not in _BITS:
            raise ValueError(f"codec kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)):
            raise ValueError(f"codec bits must be an int, got {self.bits!r}")
        if int(self.bits) not in _BITS[self.kind]:
            allowed = ", ".join(str(b) for b in _BITS[self.kind])
            raise ValueError(f"codec {self.kind!r} takes bits {allowed}, got {self.bits!r}")
        object.__setattr__(self, "bits", int(self.bits))

    @property
    def name(self) -> str:
        """``"pruned"``, or kind and bits: ``"rowwise8"``, ``"levels2"``, ``"colbook1"``."""
        return "pruned" if self.kind == "pruned" else f"{self.kind}{self.bits}"

    @property
    def kind_id(self) -> int:
        """The kind's index in ``KINDS`` (how files and kernels name it)."""
        return KINDS.index(self.kind)

    @classmethod
    def parse(cls, name: str) -> Codec:
        """The codec called ``name`` (as :attr:`name` writes it); ValueError otherwise."""
        if not isinstance(name, str):
            raise ValueError(f"codec name must be a string, got {name!r}")
        for codec in CODECS:
            if codec.name == name:
                return codec
        raise ValueError(f"unknown codec {name!r}; known: {', '.join(c.name for c in CODECS)}")

    def param_bytes(self, scale_dtype: torch.dtype = torch.float16) -> int:
        """Bytes after a row's codes: scale and offset (rowwise), levels (levels)."""
        if self.kind == "rowwise":
            return 2 * torch.empty((), dtype=scale_dtype).element_size()
        if self.kind == "levels":
            return 2 * (1 << self.bits)
        return 0

    def row_bytes(self, dim: int, scale_dtype: torch.dtype = torch.float16) -> int:
        """Bytes of one row of ``dim`` values (``scale_dtype``: rowwise's scale and offset;
        float16 unless a table is packed from float32 qparams)."""
        if self.kind == "pruned":
            return 0
        return packed_length(dim, self.bits) + self.param_bytes(scale_dtype)

    def shared_bytes(self, dim: int) -> int:
        """Bytes the class shares (a colbook's ``dim x 2**bits`` float32 levels)."""
        return dim * (1 << self.bits) * 4 if self.kind == "colbook" else 0


CODECS: tuple[Codec, ...] = tuple(Codec(kind, bits) for kind in KINDS for bits in _BITS[kind])


def _checked_table(weight: np.ndarray | torch.Tensor) -> np.ndarray:
    """``weight`` as finite C-contiguous float32 numpy; ValueError / TypeError otherwise."""
    if isinstance(weight, torch.Tensor):
        weight = weight.detach().to("cpu", torch.float32).numpy()
    if not isinstance(weight, np.ndarray) or weight.ndim != 2 or 0 in weight.shape:
        shape = getattr(weight, "shape", type(weight).__name__)
        raise ValueError(f"weight must be a non-empty 2-D float array, got {shape}")
    if not np.issubdtype(weight.dtype, np.floating):
        raise TypeError(f"weight must be a float array, got dtype {weight.dtype}")
    x = np.ascontiguousarray(weight, dtype=np.float32)
    if rows_call(count_nonfinite, x, rows=(0,)):
        raise ValueError("weight holds NaN or Inf values")
    return x


def _checked_weights(row_weights: np.ndarray | None, rows: int) -> np.ndarray | None:
    """``row_weights`` as float64 ``[rows]``, finite and >= 0 (None stays None)."""
    if row_weights is None:
        return None
    w = np.asarray(row_weights, dtype=np.float64)
    if w.shape != (rows,):
        raise ValueError(f"row_weights must have shape ({rows},), got {w.shape}")
    if not bool(np.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("row_weights must be finite and >= 0")
    return w


def fit_colbook(
    x: np.ndarray, rows: np.ndarray, bits: int, row_weights: np.ndarray | None, seed: int = 0
) -> np.ndarray:
    """float32 ``[D, 2**bits]``: per column, sorted levels fitted by weighted 1-D k-means
    on the table rows ``rows`` (at most ``COLBOOK_SAMPLE`` of them: drawn in proportion to
    their weight where weights are given and not all 0, else uniformly, with a fixed seed)."""
    n, dim = rows.shape[0], x.shape[1]
    k = 1 << bits
    weights = None if row_weights is None else row_weights[rows]
    if n <= COLBOOK_SAMPLE:
        chosen = rows
        fit_weights = np.ones(n) if weights is None else weights
        weighted = weights is not None
    else:
        total = 0.0 if weights is None else float(weights.sum())
        if total > 0 and weights is not None:
            cum = np.cumsum(weights)
            start = np.random.default_rng(seed).random()
            marks = (np.arange(COLBOOK_SAMPLE) + start) * (total / COLBOOK_SAMPLE)
            chosen = rows[np.minimum(np.searchsorted(cum, marks, side="right"), n - 1)]
        else:
            chosen = rows[np.sort(np.random.default_rng(seed).choice(n, COLBOOK_SAMPLE, replace=False))]
        fit_weights = np.ones(chosen.shape[0])
        weighted = False
    book = np.empty((dim, k), dtype=np.float32)
    if chosen.shape[0] == 0:
        book[:] = 0.0
        return book
    parallel_call(colbook_fit, np.ascontiguousarray(x[chosen]), fit_weights, weighted, k, COLBOOK_ITERS, book)
    return book


def colbook_midpoints(book: np.ndarray) -> np.ndarray:
    """float32 ``[2**bits - 1, D]``: the midpoints between a book's adjacent levels."""
    b = book.astype(np.float64)
    return np.ascontiguousarray((0.5 * (b[:, :-1] + b[:, 1:])).T.astype(np.float32))


def _rowwise_qparams(x: np.ndarray, rows: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 scale and offset (float16 values) of a rowwise codec's codes (on searched
    ranges at ``SEARCHED_BITS``, min/max otherwise), and the rows whose range float16
    cannot hold (their qparams are 0); ``rowwise_codes`` finds them with the codes."""
    n = rows.shape[0]
    scale, offset = np.empty(n, dtype=np.float32), np.empty(n, dtype=np.float32)
    bad = np.empty(n, dtype=np.bool_)
    err = np.empty(n, dtype=np.float64)
    idx = np.ascontiguousarray(rows, np.int64)
    ranges, ranged = _coded_ranges(x, idx, bits)
    none = np.zeros((1, 1), np.uint8)
    parallel_call(rowwise_codes, x, idx, bits, ranges, ranged, scale, offset, bad, none, False, err)
    return scale, offset, bad


def _coded_ranges(x: np.ndarray, idx: np.ndarray, bits: int) -> tuple[np.ndarray, bool]:
    """The ranges a rowwise codec of ``bits`` codes rows ``idx`` on, as ``rowwise_codes``
    takes them: at ``SEARCHED_BITS`` FBGEMM's greedy clipping-range search (``rowwise
    .search_ranges``, what ``QuantConfig``'s uniform codes of that width use), else none
    (the kernel takes min and max).

    The search takes rows two at a time, 2k with 2k + 1, and a row's result can depend on
    which of the two it is (the order of its sums), so each row is searched at a
    position of its table row's parity (``_parity_order``): a row's range is the one a
    search of the whole table gives it, whichever rows it is coded with. Rows are
    searched in place where they are a run of the table, else about ``_SEARCH_BYTES`` of
    them at a time (a copy of each part, an even number of rows)."""
    if bits != SEARCHED_BITS or idx.shape[0] == 0:
        return np.zeros((1, 2), dtype=np.float32), False
    seq, pos = _parity_order(idx)
    found = np.empty((seq.shape[0], 2), dtype=np.float32)
    if bool((np.diff(seq) == 1).all()):
        parts = [(0, seq.shape[0], x[seq[0] : seq[-1] + 1])]  # a run of rows: no copy
    else:
        step = max(2, _SEARCH_BYTES // (8 * max(1, x.shape[1])) * 2)  # even: parities kept
        parts = [
            (start, min(start + step, seq.shape[0]), x[seq[start : start + step]])
            for start in range(0, seq.shape[0], step)
        ]
    for start, stop, rows in parts:
        part = torch.from_numpy(rows)
        lo, hi = row_ranges(part, None)
        lo, hi = search_ranges(part, None, lo, hi, bits)
        found[start:stop, 0] = lo.numpy()
        found[start:stop, 1] = hi.numpy()
    return np.ascontiguousarray(found[pos]), True


def _parity_order(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows to search, where each of ``idx`` is among them): ``idx`` in order, each at a
    position of its own parity, a copy of the next row filling each gap this leaves."""
    odd = idx & 1
    pos = np.empty(idx.shape[0], dtype=np.int64)
    pos[0] = odd[0]
    pos[1:] = odd[0] + np.cumsum(1 + (odd[1:] == odd[:-1]))
    seq = np.empty(int(pos[-1]) + 1, dtype=np.int64)
    gap = np.ones(seq.shape[0], dtype=np.bool_)
    gap[pos] = False
    seq[pos] = idx
    holes = np.flatnonzero(gap)
    seq[holes] = seq[holes + 1]  # a hole is always followed by a row of idx
    return seq, pos


def encode_rows(
    weight: np.ndarray,
    rows: np.ndarray | None,
    codec: Codec,
    out: np.ndarray | None = None,
    row_weights: np.ndarray | None = None,
    book: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Store table rows ``rows`` (None: all) with ``codec``: (squared error per row, the
    colbook's levels or None).

    ``out`` (uint8 ``[len(rows), codec.row_bytes(D)]``, C-contiguous): where the rows are
    written (codes, then float16 scale and offset or levels); None computes the errors
    only. A colbook is fitted on ``rows`` weighted by ``row_weights`` unless ``book`` is
    given. A row float16 cannot hold (|value| > 65504) gets error inf under the float16
    codecs, and ValueError where it would be written. ``weight`` must be finite float32.
    """
    x = weight
    idx = np.arange(x.shape[0], dtype=np.int64) if rows is None else np.ascontiguousarray(rows, np.int64)
    n, dim = idx.shape[0], x.shape[1]
    err = np.empty(n, dtype=np.float64)
    write = out is not None
    if write:
        shape = (n, codec.row_bytes(dim))
        if out is None or out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous uint8 array of shape {shape}")
    target = out if out is not None else np.zeros((1, 1), dtype=np.uint8)
    codes_at = packed_length(dim, codec.bits) if codec.bits else 0
    if codec.kind == "pruned":
        parallel_call(row_sqnorm, x, idx, err)
        return err, None
    if codec.kind == "rowwise":
        scale, offset = np.empty(n, dtype=np.float32), np.empty(n, dtype=np.float32)
        bad = np.empty(n, dtype=np.bool_)
        ranges, ranged = _coded_ranges(x, idx, codec.bits)
        qparams = (scale, offset, bad)
        parallel_call(rowwise_codes, x, idx, codec.bits, ranges, ranged, *qparams, target, write, err)
        _mark_infeasible(err, bad, write)
        if out is not None:
            params = np.stack([scale.astype(np.float16), offset.astype(np.float16)], 1)
            out[:, codes_at:] = params.view(np.uint8).reshape(n, 4)
        return err, None
    if codec.kind == "levels":
        k = 1 << codec.bits
        lv = np.empty((n, k), dtype=np.float32)
        parallel_call(levels_fit, x, idx, k, LEVELS_ITERS, lv)
        too_big = np.asarray((np.abs(lv) > _F16_MAX).any(1))
        lv[too_big] = 0.0
        lv16 = lv.astype(np.float16)
        parallel_call(levels_codes, x, idx, lv16.astype(np.float32), codec.bits, target, write, err)
        _mark_infeasible(err, too_big, write)
        if out is not None:
            out[:, codes_at:] = lv16.view(np.uint8).reshape(n, 2 * k)
        return err, None
    if book is None:
        book = fit_colbook(x, idx, codec.bits, row_weights)
    parallel_call(colbook_codes, x, idx, book, colbook_midpoints(book), codec.bits, target, write, err)
    return err, book


def _mark_infeasible(err: np.ndarray, bad: np.ndarray, write: bool) -> None:
    if bad.any():
        if write:
            raise ValueError(
                f"{int(bad.sum())} row(s) hold values beyond float16's range (65504): "
                "store them with a codec without float16 parameters (colbook)"
            )
        err[bad] = np.inf


def row_errors(weight: np.ndarray, codec: Codec, row_weights: np.ndarray | None = None) -> np.ndarray:
    """float64 ``[R]``: each row's squared L2 error when the whole table ``weight`` (float32
    ``[R, D]``) is stored with ``codec`` (a colbook fitted on all rows, weighted by
    ``row_weights``). inf where the codec cannot hold the row (float16 range)."""
    if not isinstance(codec, Codec):
        raise TypeError(f"codec must be a Codec, got {type(codec).__name__}")
    x = _checked_table(weight)
    w = _checked_weights(row_weights, x.shape[0])
    return encode_rows(x, None, codec, None, w)[0]


def checked_codecs(codecs: Sequence[Codec]) -> tuple[Codec, ...]:
    """``codecs`` as a tuple of 1 to 4 Codecs; TypeError / ValueError naming the problem."""
    if isinstance(codecs, (str, Codec)) or not isinstance(codecs, Sequence):
        raise TypeError(f"codecs must be a sequence of Codec, got {type(codecs).__name__}")
    out = tuple(codecs)
    if not 1 <= len(out) <= 4:
        raise ValueError(f"a mixed table takes 1 to 4 codecs, got {len(out)}")
    for c in out:
        if not isinstance(c, Codec):
            raise TypeError(f"codecs must be Codec instances, got {type(c).__name__}")
    return out
