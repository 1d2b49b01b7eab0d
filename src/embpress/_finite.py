"""The one NaN / Inf count that the encoders and the codecs both run on a table (a module
of its own, below both: ``layouts`` and ``quant`` import each other's packages)."""

from __future__ import annotations

import numba
import numpy as np

from . import _kernel_cache

__all__ = ["count_nonfinite"]


@numba.njit(cache=True, parallel=True, nogil=True)
def count_nonfinite(x: np.ndarray) -> int:
    """Number of NaN / Inf entries of a 2-D array."""
    total = 0
    for r in numba.prange(x.shape[0]):
        n = 0
        for c in range(x.shape[1]):
            if not np.isfinite(x[r, c]):
                n += 1
        total += n
    return total


# several processes may compile into one disk cache at once (see ``_kernel_cache``)
_kernel_cache.guard(count_nonfinite)
