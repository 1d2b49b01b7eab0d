"""numba kernels of the planner (embpress.planner): per-row codec choice at a Lagrange
multiplier, and the marginal moves (drop a codec, upgrade or downgrade one row).

``err[c, r]`` (float64 ``[codecs, rows]``) is row r's weighted squared error when stored
with codec c, ``row_bytes[c]`` its bytes per row, ``allowed[c]`` whether
the table may use codec c. The parallel kernels are launched through
``embpress._parallel.parallel_call``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import _kernel_cache


@njit(cache=True, inline="always")
def _choose_one(
    err: np.ndarray,
    order: np.ndarray,
    penalty: np.ndarray,
    choice: np.ndarray,
    chosen_err: np.ndarray,
    r: int,
) -> None:
    best = order[0]
    best_cost = err[best, r] + penalty[0]
    for k in range(1, order.shape[0]):
        c = order[k]
        cost = err[c, r] + penalty[k]
        if cost < best_cost:
            best = c
            best_cost = cost
    choice[r] = best
    chosen_err[r] = err[best, r]


@njit(parallel=True, cache=True)
def choose_rows(
    err: np.ndarray, order: np.ndarray, penalty: np.ndarray, choice: np.ndarray, chosen_err: np.ndarray
) -> None:
    """Each row's codec among ``order`` (the allowed codecs, fewest bytes first) minimising
    ``err + penalty`` (``penalty[k] = lam * bytes of codec order[k]``; ties go to fewer
    bytes) into ``choice``, and its error into ``chosen_err``."""
    for r in prange(err.shape[1]):
        _choose_one(err, order, penalty, choice, chosen_err, r)


@njit(cache=True)
def choose_rows_serial(
    err: np.ndarray, order: np.ndarray, penalty: np.ndarray, choice: np.ndarray, chosen_err: np.ndarray
) -> None:
    """``choose_rows`` on one thread (small tables: a parallel launch costs more)."""
    for r in range(err.shape[1]):
        _choose_one(err, order, penalty, choice, chosen_err, r)


@njit(cache=True, inline="always")
def _drop_one(
    err: np.ndarray,
    row_bytes: np.ndarray,
    allowed: np.ndarray,
    lam: float,
    choice: np.ndarray,
    out: np.ndarray,
    r: int,
) -> None:
    cur = choice[r]
    here = err[cur, r] + lam * row_bytes[cur]
    second = np.inf
    for c in range(err.shape[0]):
        if allowed[c] and c != cur:
            cost = err[c, r] + lam * row_bytes[c]
            if cost < second:
                second = cost
    out[r] = second - here


@njit(parallel=True, cache=True)
def drop_cost(
    err: np.ndarray,
    row_bytes: np.ndarray,
    allowed: np.ndarray,
    lam: float,
    choice: np.ndarray,
    out: np.ndarray,
) -> None:
    """``out[r]``: how much row r's ``err + lam * bytes`` grows if its chosen codec were
    taken away (it moves to its next-best allowed codec; inf when it has none)."""
    for r in prange(err.shape[1]):
        _drop_one(err, row_bytes, allowed, lam, choice, out, r)


@njit(cache=True)
def drop_cost_serial(
    err: np.ndarray,
    row_bytes: np.ndarray,
    allowed: np.ndarray,
    lam: float,
    choice: np.ndarray,
    out: np.ndarray,
) -> None:
    """``drop_cost`` on one thread."""
    for r in range(err.shape[1]):
        _drop_one(err, row_bytes, allowed, lam, choice, out, r)


@njit(parallel=True, cache=True)
def best_moves(
    err: np.ndarray,
    row_bytes: np.ndarray,
    allowed: np.ndarray,
    choice: np.ndarray,
    upward: bool,
    target: np.ndarray,
    ratio: np.ndarray,
) -> None:
    """Each row's best single move to another allowed codec.

    ``upward``: to a codec with more bytes and less error, the largest error drop per
    added byte (``ratio``, larger is better). Else: to a codec with fewer bytes, the
    smallest error rise per saved byte (``ratio``, smaller is better). ``target[r] = -1``
    where the row has no such move.
    """
    codecs, rows = err.shape
    for r in prange(rows):
        cur = choice[r]
        best = -1
        best_ratio = 0.0
        for c in range(codecs):
            if not allowed[c] or c == cur:
                continue
            db = row_bytes[c] - row_bytes[cur]
            de = err[cur, r] - err[c, r]
            if upward:
                if db <= 0 or de <= 0.0:
                    continue
                q = de / db
                if best < 0 or q > best_ratio:
                    best = c
                    best_ratio = q
            else:
                if db >= 0:
                    continue
                q = -de / -db  # error added per byte saved (>= 0 unless the cheaper codec is better)
                if best < 0 or q < best_ratio:
                    best = c
                    best_ratio = q
        target[r] = best
        ratio[r] = best_ratio


@njit(cache=True)
def take_greedy(order: np.ndarray, cost: np.ndarray, allowance: float) -> np.ndarray:
    """Walk ``order`` and take each move whose ``cost`` still fits ``allowance`` (moves
    that do not fit are skipped, later smaller ones may still fit); returns a bool per move."""
    taken = np.zeros(cost.shape[0], dtype=np.bool_)
    left = allowance
    for i in order:
        if cost[i] <= left:
            taken[i] = True
            left -= cost[i]
    return taken


@njit(parallel=True, cache=True)
def table_error(
    weight: np.ndarray, decoded: np.ndarray, err_sq: np.ndarray, ref_sq: np.ndarray, max_abs: np.ndarray
) -> None:
    """Per row: squared error of ``decoded`` against ``weight``, squared norm of ``weight``
    and the largest absolute error (float64 sums)."""
    rows, dim = weight.shape
    for r in prange(rows):
        e = 0.0
        n = 0.0
        m = 0.0
        for j in range(dim):
            x = np.float64(weight[r, j])
            d = np.float64(decoded[r, j]) - x
            e += d * d
            n += x * x
            if abs(d) > m:
                m = abs(d)
        err_sq[r] = e
        ref_sq[r] = n
        max_abs[r] = m


@njit(cache=True)
def smallest_positive(err: np.ndarray, allowed: np.ndarray) -> float:
    """The smallest finite ``err[c, r] > 0`` over the allowed codecs (inf when none)."""
    out = np.inf
    for c in range(err.shape[0]):
        if allowed[c]:
            for r in range(err.shape[1]):
                v = err[c, r]
                if 0.0 < v < out:
                    out = v
    return out


@njit(cache=True)
def count_codes(choice: np.ndarray, codecs: int) -> np.ndarray:
    """Rows per codec (``np.bincount`` without its passes and conversions)."""
    out = np.zeros(codecs, dtype=np.int64)
    for r in range(choice.shape[0]):
        out[choice[r]] += 1
    return out


# several processes may compile into one disk cache at once (see ``_kernel_cache``)
_kernel_cache.guard_module(globals())
