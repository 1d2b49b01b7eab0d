"""record_usage: count how often each row of every embedding table is looked up.

``with embpress.record_usage(model) as usage: model(batch) ...`` puts a forward pre-hook on
every ``nn.Embedding`` / ``nn.EmbeddingBag`` (and embpress's quantized ones) and adds, per
call that returns, the ids into a float64 count per row (``index_add_``: the cost follows
the batch, not the table). An id adds its ``|per_sample_weight|`` where the bag has
weights (1 where that weight is NaN: the row was still looked up), else 1; ``padding_idx``
ids add nothing (they add nothing to the output either). Counts stay finite (an infinite
sum stops at float64's largest value). The hooks go when the block ends; a table already
counted into the same ``Usage`` by an enclosing block is not counted twice.

``usage.save(path)`` writes one safetensors file (no pickle): a 1-D float64 tensor
``counts.<module path>`` per table (``counts.`` alone for a bare module, whose path is
empty), and metadata ``format = "embpress-usage"``,
``format_version = "1"``. ``Usage.load`` checks every field before it returns, and
``usage.check(model)`` that names and row counts match a model's tables.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .io import save_safetensors, temp_file_for
from .nn import QuantizedEmbedding, QuantizedEmbeddingBag

__all__ = ["Usage", "UsageError", "record_usage"]

FORMAT_NAME = "embpress-usage"
FORMAT_VERSION = "1"
_PREFIX = "counts."
_TABLES = (nn.Embedding, nn.EmbeddingBag, QuantizedEmbedding, QuantizedEmbeddingBag)
_BAGS = (nn.EmbeddingBag, QuantizedEmbeddingBag)


class UsageError(ValueError):
    """A usage file or count that cannot be trusted, or that does not fit the model."""


def _check_counts(name: str, counts: torch.Tensor, where: str) -> torch.Tensor:
    if not isinstance(counts, torch.Tensor) or counts.dim() != 1:
        raise UsageError(f"{where}table {name!r}: counts must be a 1-D tensor")
    if counts.is_meta or counts.layout != torch.strided:
        raise UsageError(f"{where}table {name!r}: counts must be a dense tensor holding values")
    if not counts.is_floating_point() and counts.dtype not in (torch.int32, torch.int64):
        raise UsageError(
            f"{where}table {name!r}: counts have dtype {counts.dtype}, expected a float dtype, int32 or int64"
        )
    # always a copy: recording adds in place, and the caller's tensor stays theirs; a normal
    # tensor even when made in torch.inference_mode(), so that it can be added to outside it
    with torch.inference_mode(False):
        out = counts.detach().to("cpu", torch.float64, copy=True).contiguous()
    if not bool(torch.isfinite(out).all()):
        raise UsageError(f"{where}table {name!r}: counts hold NaN or Inf")
    if bool((out < 0).any()):
        raise UsageError(f"{where}table {name!r}: counts are negative")
    return out


class Usage:
    """Lookups per row of each table (float64, weighted by ``|per_sample_weights|``)."""

    def __init__(self, counts: Mapping[str, torch.Tensor] | None = None) -> None:
        self.counts: dict[str, torch.Tensor] = {}
        if counts is not None and not isinstance(counts, Mapping):
            raise TypeError(
                f"counts must be a mapping of table name -> 1-D tensor, got {type(counts).__name__}"
            )
        for name, value in (counts or {}).items():
            if not isinstance(name, str):
                raise UsageError(f"table names must be strings (module paths), got {name!r}")
            self.counts[name] = _check_counts(name, value, "")
        self.calls: dict[str, int] = dict.fromkeys(self.counts, 0)
        self._recording: set[int] = set()  # ids of modules a block is counting into this usage

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.counts[name]

    def __contains__(self, name: object) -> bool:
        return name in self.counts

    def __repr__(self) -> str:
        parts = [f"{n}: {int(c.numel())} rows, {float(c.sum()):.0f} lookups" for n, c in self.counts.items()]
        return "Usage(" + "; ".join(parts) + ")"

    def seen_fraction(self, name: str) -> float:
        """Share of the rows of ``name`` looked up at least once."""
        c = self.counts[name]
        return float((c > 0).double().mean()) if c.numel() else 0.0

    def check(self, model: nn.Module, names: list[str] | None = None) -> None:
        """Refuse (UsageError) unless every table of ``model`` named here (all, by default)
        has counts, every count has its table's row count, and no counts name a table the
        model lacks. A module at several paths is one table: counts under any of its paths
        are its counts."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if names is not None and (isinstance(names, str) or not isinstance(names, (list, tuple))):
            raise TypeError(f"names must be a list of table names, got {type(names).__name__}")
        tables = {n: m for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, _TABLES)}
        unknown = sorted(set(self.counts) - set(tables))
        if unknown:
            raise UsageError(f"usage names tables the model does not have: {', '.join(unknown[:5])}")
        for name, counts in self.counts.items():
            rows = _rows(tables[name])
            if counts.numel() != rows:
                raise UsageError(f"table {name!r}: usage has {counts.numel()} rows, the model's table {rows}")
        paths: dict[int, list[str]] = {}
        for n, m in tables.items():
            paths.setdefault(id(m), []).append(n)
        for name in dict.fromkeys(n[0] for n in paths.values()) if names is None else names:
            if name not in tables:
                raise UsageError(f"the model has no table {name!r}")
            if not any(n in self.counts for n in paths[id(tables[name])]):
                raise UsageError(f"usage has no counts for table {name!r}")

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the counts as a safetensors file (atomically: temp file, then rename)."""
        target = Path(path)
        tensors = {f"{_PREFIX}{n}": c.contiguous() for n, c in self.counts.items()}
        tmp = temp_file_for(target)
        try:
            save_safetensors(tensors, tmp, {"format": FORMAT_NAME, "format_version": FORMAT_VERSION})
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Usage:
        """Read a file written by :meth:`save`; every field is checked (UsageError names it)."""
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file")
        if not p.is_file():
            raise UsageError(f"{p}: not a regular file")
        counts: dict[str, torch.Tensor] = {}
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT_NAME:
                    raise UsageError(f"{p}: not an embpress usage file (no 'format: {FORMAT_NAME}')")
                if meta.get("format_version") != FORMAT_VERSION:
                    raise UsageError(f"{p}: unsupported usage format version {meta.get('format_version')!r}")
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    if not key.startswith(_PREFIX):
                        raise UsageError(f"{p}: unexpected tensor {key!r}")
                    counts[key[len(_PREFIX) :]] = f.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as err:
            detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UsageError(f"{p}: not a readable safetensors file ({detail})") from None
        try:
            return cls(counts)
        except UsageError as err:
            raise UsageError(f"{p}: {err}") from None


def _ids_of(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """(ids that reach the table, their weights or None) of one forward call."""
    ids = args[0] if args else kwargs.get("input")
    if not isinstance(module, _BAGS):
        return ids, None
    offsets = args[1] if len(args) > 1 else kwargs.get("offsets")
    weights = args[2] if len(args) > 2 else kwargs.get("per_sample_weights")
    last = getattr(module, "include_last_offset", False)
    if isinstance(ids, torch.Tensor) and ids.dim() == 1 and isinstance(offsets, torch.Tensor) and last:
        end = int(offsets[-1]) if offsets.numel() else ids.numel()  # later ids belong to no bag
        ids = ids[:end]
        weights = weights[:end] if isinstance(weights, torch.Tensor) else weights
    return ids, weights


class _Recorder:
    def __init__(self, usage: Usage, name: str, rows: int, padding_idx: int | None) -> None:
        self.usage, self.name, self.rows = usage, name, rows
        self.padding_idx = padding_idx
        self.total = float(usage.counts[name].sum())

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        # a forward hook: it runs only after the call returned, so a refused call counts nothing
        ids, weights = _ids_of(module, args, kwargs)
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
            return  # the module itself will refuse it
        flat = ids.detach().reshape(-1)
        w = None
        if isinstance(weights, torch.Tensor) and weights.numel() == flat.numel():
            w = weights.detach().reshape(-1).abs().to(torch.float64)
            w = torch.where(torch.isnan(w), 1.0, w)  # looked up all the same
        valid = (flat >= 0) & (flat < self.rows)
        if self.padding_idx is not None:
            valid &= flat != self.padding_idx
        if not bool(valid.all()):  # out-of-range ids raise in the module; padding adds nothing
            flat = flat[valid]
            w = None if w is None else w[valid]
        if w is None:
            w = torch.ones(flat.numel(), dtype=torch.float64)
        # O(batch), not O(rows): a small batch on a large table costs little
        counts = self.usage.counts[self.name]
        counts.index_add_(0, flat.cpu(), w.cpu())
        # no count exceeds the running total; only when that overflows are the counts clamped
        # (O(rows), rare), so that they stay finite: what save writes, load reads
        self.total += float(w.sum())
        if not math.isfinite(self.total):
            counts.clamp_(max=torch.finfo(torch.float64).max)
        self.usage.calls[self.name] += 1


def _rows(module: nn.Module) -> int:
    return int(getattr(module, "num_embeddings"))  # noqa: B009 - typed as Any for mypy


def _padding_idx(module: nn.Module) -> int | None:
    p = getattr(module, "padding_idx", None)
    if p is None:
        return None
    return int(p) % _rows(module) if p < 0 else int(p)


@contextlib.contextmanager
def record_usage(model: nn.Module, usage: Usage | None = None) -> Iterator[Usage]:
    """Count the rows that each embedding table of ``model`` looks up inside the block.

    Pass ``usage`` to add to earlier counts (for example across several blocks).
    A table shared at several paths is counted once, under its first path. A block in
    which no table was looked up warns (a ``torch.compile``'d model's graph runs without
    the hooks that count).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if usage is not None and not isinstance(usage, Usage):
        raise TypeError(f"usage must be an embpress.Usage, got {type(usage).__name__}")
    usage = usage if usage is not None else Usage()
    tables: dict[int, tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():
        if isinstance(module, _TABLES) and id(module) not in tables:
            tables[id(module)] = (name, module)
    for name, module in tables.values():  # every check first: a refused usage stays as it was
        rows = _rows(module)
        if name in usage.counts and usage.counts[name].numel() != rows:
            raise UsageError(f"table {name!r}: usage has {usage.counts[name].numel()} rows, the model {rows}")
    for name, module in tables.values():
        rows = _rows(module)
        if name not in usage.counts:  # (setdefault would allocate the zeros every time)
            # a normal tensor even inside torch.inference_mode(): later blocks outside it add to it
            with torch.inference_mode(False):
                usage.counts[name] = torch.zeros(rows, dtype=torch.float64)
        usage.calls.setdefault(name, 0)
    mine = [(name, module) for name, module in tables.values() if id(module) not in usage._recording]
    handles = [
        module.register_forward_hook(
            _Recorder(usage, name, _rows(module), _padding_idx(module)), with_kwargs=True
        )
        for name, module in mine
    ]
    usage._recording.update(id(module) for _, module in mine)
    before = {name: usage.calls[name] for name, _ in tables.values()}
    try:
        yield usage
    finally:
        for h in handles:
            h.remove()
        usage._recording.difference_update(id(module) for _, module in mine)
    if before and all(usage.calls[name] == n for name, n in before.items()):
        warnings.warn(
            "record_usage counted no lookup: no embedding module of the model was called in its "
            "block (a model compiled with torch.compile before recording runs its compiled graph, "
            "which the recording hooks do not see: record on the model itself, uncompiled)",
            stacklevel=3,
        )
