"""What the chunked and multi-process paths need from their peers, and nothing more.

Compressing one table across processes needs three reductions: elementwise sums (the
block-norm histograms, the mask statistics, the error sums), an exclusive prefix sum
(how many threshold ties the lower ranks take) and a max. ``LOCAL`` is the one-process
answer; ``distributed.TorchCollective`` does them with ``torch.distributed``.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

__all__ = ["LOCAL", "Collective", "LocalCollective"]


class Collective(Protocol):
    """Reductions over the processes compressing one table; every process calls each one
    in the same order."""

    rank: int
    size: int

    def sum(self, values: np.ndarray) -> np.ndarray:
        """``values`` (int64 or float64) summed elementwise over the processes."""
        ...

    def before(self, value: int) -> int:
        """The sum of ``value`` over the processes of lower rank."""
        ...

    def max(self, value: float) -> float:
        """The largest ``value`` of all processes."""
        ...


class LocalCollective:
    """One process: every reduction is the identity."""

    rank = 0
    size = 1

    def sum(self, values: np.ndarray) -> np.ndarray:
        return values

    def before(self, value: int) -> int:
        return 0

    def max(self, value: float) -> float:
        return value


LOCAL: Collective = LocalCollective()
