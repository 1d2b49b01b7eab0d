"""compression_report: per-table layout, bits, exact sparsity, bytes, ratio and error."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, cast

from torch import nn

from .nn import QuantizedEmbedding, QuantizedEmbeddingBag

__all__ = ["TableReport", "compression_report", "human_bytes", "quantized_modules"]


@dataclass(frozen=True)
class TableReport:
    """One compressed table, as a user would compare it with its float32 original."""

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

    @property
    def ratio(self) -> float:
        """Bytes held / float32 bytes (smaller is better)."""
        return self.nbytes / self.float_nbytes if self.float_nbytes else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form, ratio included."""
        return {**asdict(self), "ratio": self.ratio}


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
    reports = []
    for name, (found, _) in quantized_modules(model).items():
        module = cast(QuantizedEmbedding | QuantizedEmbeddingBag, found)
        error = module.error or {}
        reports.append(
            TableReport(
                name=name,
                kind="EmbeddingBag" if isinstance(module, QuantizedEmbeddingBag) else "Embedding",
                rows=module.num_embeddings,
                dim=module.embedding_dim,
                layout=module.layout,
                bits=module.bits,
                sparsity=module.sparsity,
                nbytes=module.nbytes,
                float_nbytes=module.float_nbytes,
                rel_frobenius=error.get("rel_frobenius"),
                max_abs_error=error.get("max_abs"),
            )
        )
    return reports


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB' (binary units)."""
    if n < 1024:
        return f"{int(n)} B"
    units = ("KiB", "MiB", "GiB", "TiB")
    power = min(int(math.log(n, 1024)), len(units))
    return f"{n / 1024**power:.2f} {units[power - 1]}"
