"""Reports: what compression did to each table (:class:`TableReport`), and what a file holds.

One table report serves every path: :func:`compression_report` (a model in memory),
:func:`embpress.compress_state_dict` (a checkpoint's tables) and :func:`embpress.inspect`
(an embpress file); the command line renders these same objects.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, cast

from torch import nn

from .nn import QuantizedEmbedding, QuantizedEmbeddingBag

__all__ = [
    "CheckpointReport",
    "FileReport",
    "TableReport",
    "TensorInfo",
    "compression_report",
    "human_bytes",
    "quantized_modules",
]


@dataclass(frozen=True)
class TableReport:
    """One compressed table, as a user would compare it with its float32 original.

    ``kind`` is "Embedding", "EmbeddingBag", or "auto" (a table made from a bare
    state_dict: ``embpress.load`` builds it after the model's own module). ``aliases``
    are the other names of a shared (tied) table; ``mode`` is a bag's mode where known.
    ``dtype`` and ``original_nbytes`` describe the table before compression where it is
    known (a checkpoint's tables; a model or a file no longer says).
    """

    name: str
    kind: str
    rows: int
    dim: int
    layout: str
    bits: int
    sparsity: float
    nbytes: int
    float_nbytes: int
    rel_frobenius: float | None
    max_abs_error: float | None
    aliases: tuple[str, ...] = ()
    mode: str | None = None
    dtype: str | None = None
    original_nbytes: int | None = None

    @property
    def ratio(self) -> float:
        """Bytes held / float32 bytes (smaller is better)."""
        return self.nbytes / self.float_nbytes if self.float_nbytes else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form, ratio included."""
        return {**asdict(self), "aliases": list(self.aliases), "ratio": self.ratio}


@dataclass(frozen=True)
class FileReport:
    """An embpress file as :func:`embpress.inspect` read it (every checksum verified)."""

    path: str
    format: str
    format_version: str
    file_bytes: int
    tables: tuple[TableReport, ...]
    other_tensors: int
    other_nbytes: int

    @property
    def nbytes(self) -> int:
        """Bytes of every table as stored."""
        return sum(t.nbytes for t in self.tables)

    @property
    def float_nbytes(self) -> int:
        """Bytes of every table in float32."""
        return sum(t.float_nbytes for t in self.tables)

    @property
    def ratio(self) -> float:
        """Stored / float32 bytes of all tables."""
        return self.nbytes / self.float_nbytes if self.float_nbytes else 0.0


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint: key, shape, dtype, torch layout ("strided", "sparse_coo"...);
    ``tied_to``: the earlier key holding the same data (tied weights), whose bytes these are."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    layout: str
    nbytes: int
    tied_to: str | None = None


@dataclass(frozen=True)
class CheckpointReport:
    """A plain checkpoint as :func:`embpress.inspect_checkpoint` read it: the tensors that
    compress would take as tables and those it would copy unchanged."""

    path: str
    format: str
    tables: tuple[TensorInfo, ...]
    copied: tuple[TensorInfo, ...]


def quantized_modules(model: nn.Module) -> dict[str, tuple[nn.Module, list[str]]]:
    """First name -> (quantized module, its other names), each shared module once."""
    found: dict[int, tuple[str, nn.Module, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, (QuantizedEmbedding, QuantizedEmbeddingBag)):
            if id(module) in found:
                found[id(module)][2].append(name)
            else:
                found[id(module)] = (name, module, [])
    return {name: (module, aliases) for name, module, aliases in found.values()}


def compression_report(model: nn.Module) -> list[TableReport]:
    """A :class:`TableReport` for each compressed table of ``model`` (shared tables once)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    reports = []
    for name, (found, aliases) in quantized_modules(model).items():
        module = cast(QuantizedEmbedding | QuantizedEmbeddingBag, found)
        error = module.error or {}
        bag = isinstance(module, QuantizedEmbeddingBag)
        reports.append(
            TableReport(
                name=name,
                kind="EmbeddingBag" if bag else "Embedding",
                rows=module.num_embeddings,
                dim=module.embedding_dim,
                layout=module.layout,
                bits=module.bits,
                sparsity=module.sparsity,
                nbytes=module.nbytes,
                float_nbytes=module.float_nbytes,
                rel_frobenius=error.get("rel_frobenius"),
                max_abs_error=error.get("max_abs"),
                aliases=tuple(aliases),
                mode=cast(QuantizedEmbeddingBag, module).mode if bag else None,
            )
        )
    return reports


def printable(text: str) -> str:
    """``text`` with every character that does not print (control characters such as ESC,
    which a terminal would obey; bidirectional overrides; line breaks) as its Python
    escape: names read from a file are shown, never run by the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB' (binary units)."""
    if n < 1024:
        return f"{int(n)} B"
    units = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    power = min(int(math.log(n, 1024)), len(units))
    if n >= 1024 ** (len(units) + 4):  # beyond what a float division takes: whole EiB
        return f"{int(n) // 1024**power} {units[power - 1]}"
    return f"{n / 1024**power:.2f} {units[power - 1]}"
