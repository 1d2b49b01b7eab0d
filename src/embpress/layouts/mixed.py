"""Mixed layout: every row in one of up to 4 classes, each class with its own codec.

Rows keep their ids: a row's class is a 2-bit id, and its place among its class's rows
comes from a rank directory (per-class counts before every 256-row block, and within
the block before every 64 rows) plus a popcount over at most two words of the
sub-block's earlier ids, so the map costs 0.375 bytes per row. Hot rows
can take 8 bits, cold ones 2 or 1 bit, unused ones nothing (``quant.codecs``; the
planner chooses). Memory layout (N rows, B = ceil(N / 256) blocks, C classes)::

    class_ids   uint8   [64 * B]        row r's class in byte r // 4 at bits 2 * (r % 4);
                                        the ids past row N are 0
    class_rank  int32   [B + 1, 4]      class_rank[k, c] = rows of class c before row 256 k
                                        (row B: the class's total; unused classes 0)
    class_sub   uint8   [B, 4, 4]       class_sub[k, s, c] = rows of class c in rows
                                        [256 k, 256 k + 64 s) (so class_sub[k, 0] = 0)
    payload     uint8   [sum n_c * row_bytes_c]  class 0's rows in row order, then class 1's...
    colbooks    float32 [sum over colbook classes of D * 2**bits]  their books in class order,
                                        each [D, 2**bits] row-major (column j's levels)

A row of class c (codec ``codecs[c]``, see ``quant.codecs``): pruned rows hold nothing
(decode to 0.0); rowwise rows are FBGEMM fused rows (codes, then scale and offset in
``scale_dtype``); levels rows are codes then 2**bits float16 levels; colbook rows are
codes only. Codes are packed in FBGEMM's order (code j in byte ``j * bits // 8`` at bit
``(j * bits) % 8``). The meta adds ``codecs`` (comma-separated codec names, class order)
to the common fields; ``bits`` is the codecs' largest width.

Built from a float table and a per-row class assignment (``MixedTable.build``, what
``embpress.plan`` applies), or through the uniform encoder like the other layouts (rows
with no kept entry in a pruned class, the others in one rowwise class at the config's
bits and scale dtype, pruned entries stored in place as their row's zero code).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, cast

import numpy as np
import torch

from .._aot import KernelRef
from .._buffers import aligned_zeros, empty, empty_tensor
from ..quant.codecs import CODECS, Codec, checked_codecs, encode_rows
from ..quant.packing import packed_length, unpack_codes
from .base import (
    DTYPES_BY_NAME,
    EncodedTable,
    FormatError,
    Piece,
    QuantizedTable,
    RowReader,
    Spec,
    buffer_rows,
    buffer_spec,
    check_fused_qparams,
    check_parts,
    check_pruned,
    decode_fused,
    expect_tensor,
    make_fused,
    meta_int,
    read_checked,
    shard_meta,
    stored_rows_pruned,
    summed_meta,
)
from .lookup import KERNEL_POOLINGS, Bags, KernelPolicy, current_kernel_policy, run_bags
from .stats import MaskStats, RowStats, flagged_rows

# numba kernels, loaded (with numba) on first use (see ``_aot``)
mixed_bag = KernelRef("embpress.layouts._mixed_kernels", "mixed_bag")
mixed_run = KernelRef("embpress.layouts._mixed_kernels", "mixed_run", returns="int64")

__all__ = ["BLOCK_ROWS", "MixedKernelTable", "MixedTable"]

BLOCK_ROWS = 256  # rows per rank-directory entry
SUB_BLOCKS = 4  # sub-blocks of 64 rows per block, each with per-class counts from the block start
MAX_CLASSES = 4
MAX_ROWS = (1 << 31) - 1  # the rank directory is int32
_PRUNED = Codec("pruned", 0)
_SLOT_CHUNK = 1 << 16  # ids whose slots ``_classes_and_slots`` finds at a time
_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
# column books this wide are gathered from by the lookup kernel, as stored (column-major);
# narrower ones are read level-major (``_mixed_kernels.GATHER_BITS``, not imported here)
GATHER_BITS = 4


class MixedKernelTable(NamedTuple):
    """``_mixed_kernels.mixed_bag``'s table arguments (per-class arrays have 4 entries)."""

    words: np.ndarray  # int64: class_ids read as words
    rank: np.ndarray  # int32: class_rank flattened
    sub: np.ndarray  # uint8: class_sub flattened
    payload: np.ndarray  # uint8
    sb: np.ndarray  # float32: colbooks, level-major ([2**bits, dim]) below GATHER_BITS bits
    variant: np.ndarray  # int64 per class: its decoder (_mixed_kernels.VARIANTS, CODECS' order), -1 pruned
    kinds: np.ndarray  # int64 per class: codecs.KINDS index
    bits: np.ndarray  # int64 per class
    base: np.ndarray  # int64 per class: first payload byte
    row_bytes: np.ndarray  # int64 per class
    param_at: np.ndarray  # int64 per class: where a row's scale/offset or levels start
    book_base: np.ndarray  # int64 per class: first value in books
    half: bool  # rowwise scale and offset are float16
    rows: int
    dim: int


def _blocks(rows: int) -> int:
    return -(-rows // BLOCK_ROWS)


def _pack_ids(assignment: np.ndarray) -> np.ndarray:
    """uint8 ``[64 * blocks]``: 2-bit class ids, 4 rows a byte, zero past the last row."""
    ids = np.zeros(_blocks(assignment.shape[0]) * BLOCK_ROWS, dtype=np.uint8)
    ids[: assignment.shape[0]] = assignment
    return ids[0::4] | (ids[1::4] << 2) | (ids[2::4] << 4) | (ids[3::4] << 6)


def _unpack_ids(class_ids: torch.Tensor) -> torch.Tensor:
    """uint8 id of every row slot (padding included) of packed ``class_ids``."""
    return ((class_ids.unsqueeze(-1) >> _SHIFTS.to(class_ids.device)) & 3).reshape(-1)


def _colbook_class(
    x: np.ndarray, members: np.ndarray, codec: Codec, seg: np.ndarray, w: np.ndarray | None
) -> np.ndarray:
    """Write rows ``members`` of ``x`` into ``seg`` with column book ``codec``; their book.

    The book refitted on the class's rows, or the one fitted on every row where that one
    gives the class less weighted error: the planner prices a colbook row with the
    every-row book (it cannot know the class before choosing it), so a table built from a
    plan never has more error than the plan predicts. Weighted k-means from quantiles can
    settle worse on a subset of skewed rows than on the whole."""
    from ..quant.codecs import fit_colbook

    err, fitted = encode_rows(x, members, codec, seg, w)
    book = cast(np.ndarray, fitted)  # a colbook's levels
    if members.shape[0] == x.shape[0]:
        return book  # the class is every row: the same book
    whole = fit_colbook(x, np.arange(x.shape[0], dtype=np.int64), codec.bits, w)
    alt = np.empty_like(seg)
    alt_err, _ = encode_rows(x, members, codec, alt, w, book=whole)
    mine = w[members] if w is not None else np.ones(members.shape[0])
    if float((alt_err * mine).sum()) < float((err * mine).sum()):
        seg[:] = alt
        return whole
    return book


# class ids counted at a time when a shard checks the directory (a quarter of this in bytes)
_COUNT_ROWS = 1 << 24


def _class_counts(read: RowReader, start: int, stop: int) -> torch.Tensor:
    """int64 ``[4]``: the rows of each class among rows ``start:stop`` (both multiples of
    ``BLOCK_ROWS`` but ``stop`` possibly the last row) of a stored table's ``class_ids``,
    read in parts of ``_COUNT_ROWS`` rows."""
    counts = torch.zeros(MAX_CLASSES, dtype=torch.int64)
    for lo in range(start, stop, _COUNT_ROWS):
        hi = min(stop, lo + _COUNT_ROWS)
        ids = _unpack_ids(read_checked(read, "class_ids", lo // 4, -(-hi // 4)))[: hi - lo]
        counts += torch.bincount(ids.long(), minlength=MAX_CLASSES)
    return counts


def _rank_directory(ids: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """int32 ``[blocks + 1, 4]``: rows of each class before each block, then the totals;
    uint8 ``[blocks, 4, 4]``: rows of each class in the block before each sub-block."""
    blocks = _blocks(rows)
    sub_rows = BLOCK_ROWS // SUB_BLOCKS
    per_sub = np.bincount(
        (np.arange(rows) // sub_rows) * MAX_CLASSES + ids[:rows].astype(np.int64),
        minlength=blocks * SUB_BLOCKS * MAX_CLASSES,
    ).reshape(blocks, SUB_BLOCKS, MAX_CLASSES)
    per_block = per_sub.sum(1)
    out = np.zeros((blocks + 1, MAX_CLASSES), dtype=np.int64)
    np.cumsum(per_block, axis=0, out=out[1:])
    sub = np.zeros((blocks, SUB_BLOCKS, MAX_CLASSES), dtype=np.int64)
    np.cumsum(per_sub[:, :-1], axis=1, out=sub[:, 1:])
    return out.astype(np.int32), sub.astype(np.uint8)


class MixedTable(QuantizedTable):
    """Rows in up to 4 classes, each stored with its own ``Codec``."""

    layout = "mixed"
    in_auto = False  # a uniform config is better served by the other layouts' kernels
    op_tensor_names = ("class_ids", "class_rank", "class_sub", "payload", "colbooks")
    row_directory = ("class_ids", "class_rank", "class_sub", "colbooks")
    tensor_kinds = (
        ("class_ids", torch.uint8, 1),
        ("class_rank", torch.int32, 2),
        ("class_sub", torch.uint8, 3),
        ("payload", torch.uint8, 1),
        ("colbooks", torch.float32, 1),
    )
    __jit_unused_properties__: ClassVar[list[str]] = [*QuantizedTable.__jit_unused_properties__, "class_rows"]
    if TYPE_CHECKING:  # buffers; not class annotations, which TorchScript cannot read as strings
        class_ids: torch.Tensor
        class_rank: torch.Tensor
        class_sub: torch.Tensor
        payload: torch.Tensor
        colbooks: torch.Tensor

    def __init__(
        self,
        class_ids: torch.Tensor,
        class_rank: torch.Tensor,
        class_sub: torch.Tensor,
        payload: torch.Tensor,
        colbooks: torch.Tensor,
        num_embeddings: int,
        embedding_dim: int,
        codecs: Sequence[Codec],
        scale_dtype: torch.dtype,
        num_pruned: int,
    ) -> None:
        codecs = tuple(codecs)
        super().__init__(num_embeddings, embedding_dim, max(c.bits for c in codecs), scale_dtype, num_pruned)
        self.register_buffer("class_ids", class_ids)
        self.register_buffer("class_rank", class_rank)
        self.register_buffer("class_sub", class_sub)
        self.register_buffer("payload", payload)
        self.register_buffer("colbooks", colbooks)
        self._set_geometry(codecs, [int(n) for n in class_rank[-1].tolist()])
        self._trust_buffers()

    # ------------------------------------------------------------------ geometry
    def _set_geometry(self, codecs: tuple[Codec, ...], class_rows: list[int] | None) -> None:
        """Per-class byte offsets and sizes; ``class_rows`` None (an op view): the offsets
        come from ``layout_args``, set by the caller."""
        dim = self.embedding_dim
        self.codecs = codecs
        self.row_bytes = [c.row_bytes(dim, self.scale_dtype) for c in codecs]
        self.param_at = [packed_length(dim, c.bits) if c.bits else 0 for c in codecs]
        book_base, at = [], 0
        for codec in codecs:
            book_base.append(at)
            at += codec.shared_bytes(dim) // 4
        self.book_base = book_base
        if class_rows is not None:
            base, start = [], 0
            for c in range(len(codecs)):
                base.append(start)
                start += class_rows[c] * self.row_bytes[c]
            self.base = base
        pad = MAX_CLASSES - len(codecs)

        def arr(values: list[int]) -> np.ndarray:
            return np.array([*values, *([0] * pad)], dtype=np.int64)

        self._kernel_geometry = (
            arr([c.kind_id for c in codecs]),
            arr([c.bits for c in codecs]),
            arr(self.base),
            arr(self.row_bytes),
            arr(self.param_at),
            arr(self.book_base),
        )
        self._args = [v for c, b in zip(codecs, self.base, strict=True) for v in (c.kind_id, c.bits, b)]

    def _buffers_loaded(self) -> None:
        self._set_geometry(self.codecs, [int(n) for n in self.class_rank[-1].tolist()])

    @property
    def class_rows(self) -> tuple[int, ...]:
        """Rows in each class."""
        return tuple(int(n) for n in self.class_rank[-1, : len(self.codecs)].tolist())

    def layout_args(self) -> list[int]:
        """Per class: codec kind id, bits, first payload byte."""
        return self._args

    def _init_view(self, layout_args: list[int]) -> None:
        n = len(layout_args) // 3
        if len(layout_args) % 3 or not 1 <= n <= MAX_CLASSES:
            raise ValueError(
                f"layout 'mixed' takes layout_args [kind, bits, base] per class, got {layout_args}"
            )
        from ..quant.codecs import KINDS

        try:
            codecs = tuple(Codec(KINDS[layout_args[3 * c]], layout_args[3 * c + 1]) for c in range(n))
        except (IndexError, ValueError) as err:
            raise ValueError(f"layout 'mixed': bad codec in layout_args {layout_args} ({err})") from None
        self.base = [layout_args[3 * c + 2] for c in range(n)]
        self._set_geometry(codecs, None)
        # the class payloads' starts follow from the rows of each class (the rank
        # directory's last entry): tensors of another mixed table of the same shapes, as an
        # exported program given another model's state holds, would be read at wrong places
        counts = self.class_rank[-1].tolist()
        starts = [sum(counts[k] * self.row_bytes[k] for k in range(c)) for c in range(n)]
        if starts != self.base:
            raise ValueError(
                f"layout 'mixed': the tensors are not those of the table the op was made for "
                f"(its class payloads start at bytes {starts}, the op's layout_args say "
                f"{self.base}): export or compile the model again after loading another table"
            )

    def op_tensors(self) -> list[torch.Tensor]:
        return [self.class_ids, self.class_rank, self.class_sub, self.payload, self.colbooks]

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "codecs": ",".join(c.name for c in self.codecs)}

    # ------------------------------------------------------------------ sizes
    @staticmethod
    def predicted_size(
        rows: int,
        dim: int,
        class_rows: Sequence[int],
        codecs: Sequence[Codec],
        scale_dtype: torch.dtype = torch.float16,
    ) -> int:
        """Exactly the ``nbytes`` of a table built with these class sizes and codecs
        (``scale_dtype``: of its rowwise classes; float16 in ``build``)."""
        codecs = checked_codecs(codecs)
        if len(class_rows) != len(codecs) or sum(class_rows) != rows:
            raise ValueError(
                f"class_rows {list(class_rows)} must give one count per codec, summing to {rows}"
            )
        blocks = _blocks(rows)
        # class ids, the rank directory, its sub-block counts
        total = (
            blocks * (BLOCK_ROWS // 4) + (blocks + 1) * MAX_CLASSES * 4 + blocks * SUB_BLOCKS * MAX_CLASSES
        )
        for n, codec in zip(class_rows, codecs, strict=True):
            total += int(n) * codec.row_bytes(dim, scale_dtype) + codec.shared_bytes(dim)
        return total

    # ------------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        weight: torch.Tensor,
        assignment: np.ndarray,
        codecs: Sequence[Codec],
        row_weights: np.ndarray | None = None,
    ) -> MixedTable:
        """The table of float ``weight`` [R, D] with row r stored by ``codecs[assignment[r]]``
        (1 to 4 codecs; colbooks fitted on their class's rows, weighted by ``row_weights``,
        or fitted on every row where that does better on the class: see ``_colbook_class``).
        ValueError / TypeError naming the argument for bad input."""
        from ..quant.codecs import _checked_table, _checked_weights

        codecs = checked_codecs(codecs)
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        x = _checked_table(weight)
        rows, dim = x.shape
        if rows > MAX_ROWS:
            raise ValueError(f"a mixed table holds at most {MAX_ROWS} rows, got {rows}")
        a = np.asarray(assignment)
        if a.shape != (rows,) or not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
            raise ValueError(
                f"assignment must be an integer array of shape ({rows},), got {a.dtype} {a.shape}"
            )
        if rows and (int(a.min()) < 0 or int(a.max()) >= len(codecs)):
            raise ValueError(f"assignment values must be in range({len(codecs)})")
        w = _checked_weights(row_weights, rows)
        ids = a.astype(np.uint8)
        class_rows = np.bincount(ids, minlength=len(codecs))
        row_bytes = [c.row_bytes(dim) for c in codecs]
        payload = empty(int(sum(int(n) * b for n, b in zip(class_rows, row_bytes, strict=True))), np.uint8)
        books = []
        start = 0
        for c, codec in enumerate(codecs):
            n, rb = int(class_rows[c]), row_bytes[c]
            members = np.flatnonzero(ids == c)
            seg = payload[start : start + n * rb].reshape(n, rb)
            book: np.ndarray | None = None
            if codec.kind == "colbook" and n:
                book = _colbook_class(x, members, codec, seg, w)
            elif codec.kind != "pruned" and n:
                encode_rows(x, members, codec, seg, w)
            if codec.kind == "colbook":
                books.append(np.zeros((dim, 1 << codec.bits), np.float32) if book is None else book)
            start += n * rb
        colbooks = np.concatenate([b.reshape(-1) for b in books]) if books else np.zeros(0, np.float32)
        pruned = sum(int(class_rows[c]) for c, codec in enumerate(codecs) if codec.kind == "pruned")
        rank, sub = _rank_directory(ids, rows)
        return cls(
            torch.from_numpy(_pack_ids(ids)),
            torch.from_numpy(rank),
            torch.from_numpy(sub),
            torch.from_numpy(payload),
            torch.from_numpy(colbooks.astype(np.float32)),
            rows,
            dim,
            codecs,
            torch.float16,
            pruned * dim,
        )

    # ------------------------------------------------------------------ the uniform encoder
    @staticmethod
    def _uniform_codecs(bits: int) -> tuple[Codec, Codec]:
        return (_PRUNED, Codec("rowwise", bits))

    @classmethod
    def predicted_nbytes(cls, stats: MaskStats, bits: int, scale_dtype: torch.dtype) -> int:
        class_rows = (stats.rows - stats.kept_rows, stats.kept_rows)
        return cls.predicted_size(stats.rows, stats.dim, class_rows, cls._uniform_codecs(bits), scale_dtype)

    @classmethod
    def zero_rows(cls, row_stats: RowStats) -> torch.Tensor | None:
        kept = row_stats.kept
        return flagged_rows((kept > 0) & (kept < row_stats.dim))  # stored rows with a pruned entry

    @classmethod
    def pack(cls, encoded: EncodedTable) -> MixedTable:
        qp, stats, bits = encoded.qparams, encoded.stats, encoded.bits
        kept_np = encoded.row_stats.kept > 0
        kept = torch.from_numpy(kept_np)
        fused = make_fused(encoded.code_rows()[kept], qp.scale[kept], qp.offset[kept], bits, qp.dtype)
        ids = kept_np.astype(np.uint8)
        rank, sub = _rank_directory(ids, stats.rows)
        return cls(
            torch.from_numpy(_pack_ids(ids)),
            torch.from_numpy(rank),
            torch.from_numpy(sub),
            fused.reshape(-1),
            torch.zeros(0, dtype=torch.float32),
            stats.rows,
            stats.dim,
            cls._uniform_codecs(bits),
            qp.dtype,
            stats.pruned,
        )

    # ------------------------------------------------------------------ lookups
    def _classes_and_slots(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class, slot within the class) of in-range row ``indices`` (plain torch): the
        block's and sub-block's counts plus the ids of the same class before the row in its
        sub-block, a chunk of ids at a time (the sub-block's ids are 64 bytes per id)."""
        idx = indices.long()
        cls = ((self.class_ids[idx >> 2].long() >> ((idx & 3) * 2)) & 3).long()
        slots = torch.empty_like(idx)
        sub_rows = BLOCK_ROWS // SUB_BLOCKS
        by_sub = self.class_ids.reshape(-1, sub_rows // 4)
        lanes = torch.arange(sub_rows, device=idx.device)
        for lo in range(0, idx.shape[0], _SLOT_CHUNK):
            r, c = idx[lo : lo + _SLOT_CHUNK], cls[lo : lo + _SLOT_CHUNK]
            ids = _unpack_ids(by_sub[r >> 6]).reshape(-1, sub_rows)
            same = (ids == c.unsqueeze(1).to(torch.uint8)) & (lanes < (r & (sub_rows - 1)).unsqueeze(1))
            block, sub = r >> 8, (r >> 6) & (SUB_BLOCKS - 1)
            slots[lo : lo + _SLOT_CHUNK] = (
                self.class_rank[block, c].long() + self.class_sub[block, sub, c].long() + same.sum(1)
            )
        return cls, slots

    def _decode_class(self, c: int, slots: torch.Tensor) -> torch.Tensor:
        """float32 rows ``[len(slots), D]`` of class ``c`` at ``slots`` (plain torch)."""
        codec, dim, rb = self.codecs[c], self.embedding_dim, self.row_bytes[c]
        n = slots.shape[0]
        if codec.kind == "pruned" or n == 0:
            return torch.zeros(n, dim, device=self.payload.device)
        start = self.base[c] + slots.long() * rb
        rows = self.payload[start.unsqueeze(1) + torch.arange(rb, device=start.device)]
        if codec.kind == "rowwise":
            return decode_fused(rows, dim, codec.bits, self.scale_dtype)
        codes = unpack_codes(rows[:, : self.param_at[c]], codec.bits, dim).long()
        k = 1 << codec.bits
        if codec.kind == "levels":
            raw = torch.empty((n, 2 * k), dtype=torch.uint8, device=rows.device)
            raw.copy_(rows[:, self.param_at[c] : self.param_at[c] + 2 * k])
            return raw.view(torch.float16).float().gather(1, codes)
        book = self.colbooks[self.book_base[c] : self.book_base[c] + dim * k]
        return book[torch.arange(dim, device=codes.device) * k + codes]

    def decode_rows(self, indices: torch.Tensor) -> torch.Tensor:
        cls, slots = self._classes_and_slots(indices)
        out = torch.zeros(indices.shape[0], self.embedding_dim, device=self.payload.device)
        for c in range(len(self.codecs)):
            if self.codecs[c].kind == "pruned":
                continue
            where = (cls == c).nonzero().flatten()
            if where.numel():
                out[where] = self._decode_class(c, slots[where])
        return out

    def dequantize(self, chunk_rows: int = 1 << 16) -> torch.Tensor:
        """The whole table, class by class (no rank lookups)."""
        ids = _unpack_ids(self.class_ids)[: self.num_embeddings]
        out = torch.zeros(self.num_embeddings, self.embedding_dim, device=self.payload.device)
        for c, n in enumerate(self.class_rows):
            if self.codecs[c].kind == "pruned" or n == 0:
                continue
            members = (ids == c).nonzero().flatten()
            for start in range(0, n, chunk_rows):
                slots = torch.arange(start, min(start + chunk_rows, n), device=members.device)
                out[members[slots]] = self._decode_class(c, slots)
        return out

    def kernel_table(self) -> MixedKernelTable:
        """The kernel's view of the table (CPU buffers)."""
        kinds, bits, base, row_bytes, param_at, book_base = self._kernel_geometry
        pad = MAX_CLASSES - len(self.codecs)
        return MixedKernelTable(
            words=self.class_ids.numpy().view(np.int64),
            rank=self.class_rank.numpy().reshape(-1),
            sub=self.class_sub.numpy().reshape(-1),
            payload=self.payload.numpy(),
            sb=self._kernel_books(),
            # the kernel's decoders are CODECS' order without pruned: pruned is -1
            variant=np.array([*(CODECS.index(c) - 1 for c in self.codecs), *([-1] * pad)]),
            kinds=kinds,
            bits=bits,
            base=base,
            row_bytes=row_bytes,
            param_at=param_at,
            book_base=book_base,
            half=self.scale_dtype == torch.float16,
            rows=self.num_embeddings,
            dim=self.embedding_dim,
        )

    def _kernel_books(self) -> np.ndarray:
        """The column books as the lookup kernel reads them: each class's ``[dim, 2**bits]``
        book transposed to ``[2**bits, dim]`` (a level's values of every column in a row),
        except books of ``GATHER_BITS`` bits, which the kernel gathers from as stored; on
        a 64-byte boundary, so that its vector loads of a level's values do not straddle
        cache lines."""
        books = self.colbooks.numpy()
        out = aligned_zeros(books.shape[0], books.dtype, 64)
        out[:] = books
        dim = self.embedding_dim
        for codec, at in zip(self.codecs, self.book_base, strict=True):
            if codec.kind == "colbook" and codec.bits < GATHER_BITS:
                size = dim << codec.bits
                out[at : at + size] = books[at : at + size].reshape(dim, -1).T.reshape(-1)
        return out

    def fast_bag(
        self,
        indices: torch.Tensor,
        offsets: torch.Tensor,
        mode: int,
        per_sample_weights: torch.Tensor | None,
        policy: KernelPolicy | None = None,
    ) -> torch.Tensor | None:
        if self.payload.device.type != "cpu" or mode not in KERNEL_POOLINGS:
            return None
        table = self.kernel_args(policy or current_kernel_policy(), self.kernel_table)
        bags = Bags.of(indices, offsets, mode, per_sample_weights)
        return run_bags(
            mixed_bag, table, bags, self.num_embeddings, self.embedding_dim, run=mixed_run, owner=self
        )

    # ------------------------------------------------------------------ files
    @classmethod
    def from_tensors(
        cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], count_pruned: bool = False
    ) -> MixedTable:
        rows = meta_int(meta, "num_embeddings", 1, MAX_ROWS)
        dim = meta_int(meta, "embedding_dim", 1, 1 << 24)
        names = meta.get("codecs")
        if not isinstance(names, str):
            raise FormatError(
                f"field 'codecs' must be a comma-separated string of codec names, got {names!r}"
            )
        try:
            codecs = checked_codecs([Codec.parse(name) for name in names.split(",")])
        except (TypeError, ValueError) as err:
            raise FormatError(f"field 'codecs': {err}") from None
        bits = meta.get("bits")
        top = max(c.bits for c in codecs)
        if type(bits) is not int or bits != top:  # not a bool, nor a float equal to it
            raise FormatError(f"field 'bits' must be {top} (the codecs' widest), got {bits!r}")
        name = meta.get("scale_dtype")
        has_rowwise = any(c.kind == "rowwise" for c in codecs)
        allowed = ("float16", "float32") if has_rowwise else ("float16",)
        if name not in allowed:
            raise FormatError(f"field 'scale_dtype' must be one of {allowed}, got {name!r}")
        dtype = DTYPES_BY_NAME[str(name)]
        pruned = meta_int(meta, "num_pruned", 0, rows * dim)
        blocks = _blocks(rows)
        class_ids = expect_tensor(tensors, "class_ids", torch.uint8, (blocks * BLOCK_ROWS // 4,))
        class_rank = expect_tensor(tensors, "class_rank", torch.int32, (blocks + 1, MAX_CLASSES))
        class_sub = expect_tensor(tensors, "class_sub", torch.uint8, (blocks, SUB_BLOCKS, MAX_CLASSES))
        ids = _unpack_ids(class_ids)
        if bool(ids[rows:].any()):
            raise FormatError("tensor 'class_ids' holds non-zero ids past num_embeddings")
        if rows and int(ids[:rows].max()) >= len(codecs):
            raise FormatError(f"tensor 'class_ids' holds class ids beyond the {len(codecs)} codecs")
        rank, sub = _rank_directory(ids.numpy(), rows)
        if not np.array_equal(rank, class_rank.numpy()):
            raise FormatError("tensor 'class_rank' does not match 'class_ids'")
        if not np.array_equal(sub, class_sub.numpy()):
            raise FormatError("tensor 'class_sub' does not match 'class_ids'")
        class_rows = [int(n) for n in class_rank[-1, : len(codecs)].tolist()]
        pruned_rows = sum(n for n, c in zip(class_rows, codecs, strict=True) if c.kind == "pruned")
        # a stored row holds a kept entry (else it would be in a pruned class)
        bounds = stored_rows_pruned(rows, dim, rows - pruned_rows)
        pruned = check_pruned(pruned, bounds, "class_ids", count_pruned)
        size = sum(n * c.row_bytes(dim, dtype) for n, c in zip(class_rows, codecs, strict=True))
        payload = expect_tensor(tensors, "payload", torch.uint8, (size,))
        colbooks = expect_tensor(
            tensors, "colbooks", torch.float32, (sum(c.shared_bytes(dim) for c in codecs) // 4,)
        )
        if not bool(torch.isfinite(colbooks).all()):
            raise FormatError("tensor 'colbooks' holds a NaN or Inf level")
        start = 0
        for n, codec in zip(class_rows, codecs, strict=True):
            rb = codec.row_bytes(dim, dtype)
            seg = payload[start : start + n * rb].reshape(n, rb)
            if codec.kind == "rowwise":
                check_fused_qparams(seg, dim, codec.bits, dtype, "payload")
            elif codec.kind == "levels" and n:
                at = packed_length(dim, codec.bits)
                raw = torch.empty((n, rb - at), dtype=torch.uint8)
                raw.copy_(seg[:, at:])
                if not bool(torch.isfinite(raw.view(torch.float16)).all()):
                    raise FormatError("tensor 'payload' holds a NaN or Inf level")
            start += n * rb
        return cls(class_ids, class_rank, class_sub, payload, colbooks, rows, dim, codecs, dtype, pruned)

    # ------------------------------------------------------------------ row chunks and shards
    @classmethod
    def concat_rows(cls, parts: Sequence[QuantizedTable], consume: bool = False) -> MixedTable:
        """Class ids joined, the directory recounted, each class's rows of every part in
        part order; the parts must share their codecs and their column books."""
        check_parts(cls, parts, "codecs")
        tables = [p for p in parts if isinstance(p, MixedTable)]
        first = tables[0]
        for i, t in enumerate(tables):
            if not torch.equal(t.colbooks, first.colbooks):
                raise ValueError(f"part {i} has other column books than part 0 (fitted on other rows)")
        rows = sum(t.num_embeddings for t in tables)
        ids = torch.cat([_unpack_ids(t.class_ids)[: t.num_embeddings] for t in tables]).numpy()
        payload = empty_tensor((sum(int(t.payload.shape[0]) for t in tables),), torch.uint8, populate=False)
        at = 0
        for c in range(len(first.codecs)):  # class by class, each class's rows in part order
            for t in tables:
                n = t.class_rows[c] * t.row_bytes[c]
                payload[at : at + n] = t.payload[t.base[c] : t.base[c] + n]
                at += n
        books, pruned = first.colbooks, sum(t.num_pruned for t in tables)
        if consume:
            for t in tables:
                t.payload = t.payload.new_empty(0)
        rank, sub = _rank_directory(ids, rows)
        return cls(
            torch.from_numpy(_pack_ids(ids)),
            torch.from_numpy(rank),
            torch.from_numpy(sub),
            payload,
            books,
            rows,
            first.embedding_dim,
            first.codecs,
            first.scale_dtype,
            pruned,
        )

    def part_summary(self) -> dict[str, Any]:
        return {**super().part_summary(), "class_rows": list(self.class_rows)}

    @classmethod
    def joined_layout(cls, summaries: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Spec]]:
        first = summaries[0]
        blocks = sum(buffer_rows(s, "class_sub") for s in summaries)
        sizes = {
            "class_ids": sum(buffer_rows(s, "class_ids") for s in summaries),
            "class_rank": blocks + 1,
            "class_sub": blocks,
            "payload": sum(buffer_rows(s, "payload") for s in summaries),
            "colbooks": buffer_rows(first, "colbooks"),
        }
        return summed_meta(summaries), {n: buffer_spec(first, n, sizes[n]) for n in first["buffers"]}

    def join_pieces(self, index: int, summaries: Sequence[dict[str, Any]]) -> list[Piece]:
        """Class ids and sub-block counts as they are; the directory moved by each class's
        rows before; each class's rows after that class's rows in the parts before, in
        the joined payload's run of that class. The first part writes the column books."""
        before = summaries[:index]
        totals = [sum(int(s["class_rows"][c]) for s in summaries) for c in range(len(self.codecs))]
        prior = [sum(int(s["class_rows"][c]) for s in before) for c in range(len(self.codecs))]
        shift = torch.tensor(prior + [0] * (MAX_CLASSES - len(prior)), dtype=self.class_rank.dtype)
        blocks = sum(buffer_rows(s, "class_sub") for s in before)
        pieces = [
            Piece("class_ids", sum(buffer_rows(s, "class_ids") for s in before), self.class_ids),
            Piece("class_rank", blocks, self.class_rank[:-1] + shift),
            Piece("class_sub", blocks, self.class_sub),
        ]
        if index == len(summaries) - 1:
            pieces.append(
                Piece("class_rank", blocks + int(self.class_sub.shape[0]), self.class_rank[-1:] + shift)
            )
        if index == 0:
            pieces.append(Piece("colbooks", 0, self.colbooks))
        start = 0
        for c, rb in enumerate(self.row_bytes):
            n = self.class_rows[c] * rb
            pieces.append(
                Piece("payload", start + prior[c] * rb, self.payload[self.base[c] : self.base[c] + n])
            )
            start += totals[c] * rb
        return pieces

    @classmethod
    def load_rows(cls, meta: dict[str, Any], read: RowReader, start: int, stop: int) -> MixedTable:
        """The class ids of the blocks around ``start:stop``, the directory entry before
        them and the class totals (where each class's rows start), then each class's
        rows of the range and the column books. The two directory entries are checked
        against a count of every class id (a quarter byte a row, read in parts): a
        shard's reads are not CRC-checked, and a wrong entry would place its rows."""
        shard = shard_meta(meta, start, stop)
        rows, dim = meta_int(meta, "num_embeddings", 1, MAX_ROWS), meta_int(meta, "embedding_dim", 1, 1 << 24)
        try:
            codecs = checked_codecs([Codec.parse(n) for n in str(meta.get("codecs")).split(",")])
        except (TypeError, ValueError) as err:
            raise FormatError(f"field 'codecs': {err}") from None
        dtype = DTYPES_BY_NAME.get(str(meta.get("scale_dtype")), torch.float16)
        first_block, end_block = start // BLOCK_ROWS, -(-stop // BLOCK_ROWS)
        ids = _unpack_ids(read_checked(read, "class_ids", first_block * 64, end_block * 64)).long()
        # the shard's own sub-block directory comes from its ids below; the file's is read
        # (whole, CRC-checked, as every row directory tensor) so that damage is found
        read_checked(read, "class_sub", first_block, end_block)
        before = read_checked(read, "class_rank", first_block, first_block + 1)[0].long()
        totals = read_checked(read, "class_rank", _blocks(rows), _blocks(rows) + 1)[0].long()
        if not (
            torch.equal(before, _class_counts(read, 0, first_block * BLOCK_ROWS))
            and torch.equal(totals, before + _class_counts(read, first_block * BLOCK_ROWS, rows))
        ):  # the directory entries the rows' places come from, against the ids they count
            raise FormatError("tensor 'class_rank' does not match 'class_ids'")
        offset = start - first_block * BLOCK_ROWS
        head, local = ids[:offset], ids[offset : offset + stop - start]
        segments, base = [], 0
        for c, codec in enumerate(codecs):
            rb = codec.row_bytes(dim, dtype)
            slot, n = int(before[c]) + int((head == c).sum()), int((local == c).sum())
            if not 0 <= slot <= slot + n <= int(totals[c]):
                raise FormatError("tensor 'class_rank' does not match 'class_ids'")
            segments.append(read_checked(read, "payload", base + slot * rb, base + (slot + n) * rb))
            base += int(totals[c]) * rb
        pruned_rows = sum(int((local == c).sum()) for c, k in enumerate(codecs) if k.kind == "pruned")
        low, high = stored_rows_pruned(stop - start, dim, stop - start - pruned_rows)
        shard["num_pruned"] = min(max(shard["num_pruned"], low), high)
        books = read.shape("colbooks")[0]
        local_ids = local.to(torch.uint8).numpy()
        rank, sub = _rank_directory(local_ids, stop - start)
        tensors = {
            "class_ids": torch.from_numpy(_pack_ids(local_ids)),
            "class_rank": torch.from_numpy(rank),
            "class_sub": torch.from_numpy(sub),
            "payload": torch.cat(segments),
            "colbooks": read_checked(read, "colbooks", 0, books),
        }
        return cls.from_tensors(shard, tensors)
