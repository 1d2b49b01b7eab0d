"""A one-line numba kernel cached on disk: timing its first call in a fresh process gives
what any numba program pays before its first kernel runs (numba's own set-up), the floor
under embpress's cold start."""

from __future__ import annotations

import numba


@numba.njit(cache=True)
def one(x: int) -> int:
    return x + 1
