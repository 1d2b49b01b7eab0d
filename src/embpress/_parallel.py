"""Launching numba's parallel kernels safely from several Python threads.

numba's workqueue threading layer (its fallback where neither OpenMP nor TBB loads) is not
thread-safe: two Python threads launching parallel kernels at once abort the process.
Every ``parallel=True`` kernel of embpress (sparsify, quant, layouts) is called through
:func:`parallel_call`, which serialises launches under that layer alone. Under the OpenMP
layer a launch also sets the OpenMP thread count that torch shares (a model set to one
thread would run on all of them afterwards), so torch's count is put back after each one.

GNU OpenMP does not survive a fork: in a child forked after its threads started, numba
stops the process at the next launch, or the launch hangs. A child of a process that has
launched embpress's kernels under that layer gets a RuntimeError saying what to do instead.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["parallel_call"]

_LAUNCH_LOCK = threading.Lock()
_omp_started = False  # whether this process has started numba's OpenMP threads
_forked_after_omp = False  # whether this process was forked from one that had started them
FORK_ERROR = (
    "embpress: this process was forked from one that had run embpress's parallel kernels on "
    "numba's OpenMP threading layer, which cannot run again in a forked child. Start worker "
    "processes with the 'spawn' or 'forkserver' method, or load the model after the fork, or "
    "set NUMBA_THREADING_LAYER=workqueue (or install tbb) before the parent starts"
)


def _after_fork_in_child() -> None:
    global _forked_after_omp
    _forked_after_omp = _omp_started


os.register_at_fork(after_in_child=_after_fork_in_child)


@functools.cache
def _serialise_launches() -> bool:
    """Whether parallel kernels must be launched one at a time (the workqueue layer).

    ``numba.get_num_threads`` starts numba's thread pool, which settles the layer (the
    configured one, or the first of TBB, OpenMP and workqueue that loads), so the answer is
    known before the first launch and never changes afterwards.
    """
    global _omp_started
    import numba

    numba.get_num_threads()
    layer = numba.threading_layer()
    _omp_started = layer == "omp"
    return bool(layer == "workqueue")


def parallel_call(kernel: Callable[..., Any], *args: Any) -> Any:
    """``kernel(*args)`` for a ``parallel=True`` numba kernel, safe from several threads.

    Under the workqueue layer the launches of every caller go through one lock (each one
    still runs on all of numba's threads); under OpenMP and TBB, which are thread-safe,
    this is a plain call. Every parallel kernel of embpress is called through here, as
    a dispatcher or as an ``_aot.KernelRef`` (whose module, and numba, load on first use).
    """
    if _forked_after_omp:
        raise RuntimeError(FORK_ERROR)
    kernel = getattr(kernel, "numba", kernel)  # an ``_aot.KernelRef``: its dispatcher
    threads = torch.get_num_threads()
    try:
        if _serialise_launches():
            with _LAUNCH_LOCK:
                return kernel(*args)
        return kernel(*args)
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


_pool: Any = None
_pool_lock = threading.Lock()


def thread_pool() -> Any:
    """The process's pool of Python threads for the compression's kernels compiled ahead
    of time (``_aot``: ctypes releases the GIL while one runs), made on first use. Lookups
    split their bags in C instead (``_aot.Bound.split``)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            from concurrent.futures import ThreadPoolExecutor

            workers = max(1, (os.cpu_count() or 1) - 1)  # the caller's thread runs a part too
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="embpress")
        return _pool


def _after_fork_reset_pool() -> None:
    global _pool, _pool_lock
    _pool = None  # a forked child has none of the parent's threads
    _pool_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_reset_pool)


def split_call(
    compiled: Callable[..., Any], count: int, part: Callable[[int, int], tuple[Any, ...]], minimum: int = 1
) -> int:
    """Run ``compiled(*part(lo, hi))`` over ``[0, count)`` in contiguous parts, one per
    thread (torch's count; fewer, so that each part has at least ``minimum`` items): the
    first part on this thread, the others on :func:`thread_pool`. Returns the sum of the
    parts' results (None counts 0), for kernels that count what they refuse. A compiled
    kernel's arguments are all converted here (``prepare``), so the pool's threads only
    make the C calls."""
    parts = max(1, min(torch.get_num_threads(), count // max(1, minimum)))
    if parts == 1:
        return int(compiled(*part(0, count)) or 0)
    size = -(-count // parts)
    prepare = getattr(compiled, "prepare", None)
    calls = []
    for lo in range(0, count, size):
        args = part(lo, min(count, lo + size))
        calls.append(prepare(*args) if prepare is not None else functools.partial(compiled, *args))
    pool = thread_pool()
    futures = []
    here = [calls[0]]  # calls this thread makes: the first, and any the pool refuses
    for call in calls[1:]:
        try:
            futures.append(pool.submit(call))
        except RuntimeError:  # the interpreter is shutting down: no new work for the pool
            here.append(call)
    total = sum(int(call() or 0) for call in here)
    return total + sum(int(f.result() or 0) for f in futures)


def rows_call(kernel: Any, *args: Any, rows: tuple[int, ...], minimum: int = 256) -> Any:
    """``kernel(*args)`` for a kernel (an ``_aot.KernelRef``) whose work is independent
    per row of the arguments at positions ``rows`` (their first axis, one length): from
    a library compiled ahead of time where it can be, those arguments split into row
    ranges across threads (:func:`parts_call`; the int results summed); else numba's
    parallel kernel through :func:`parallel_call`."""

    def part(lo: int, hi: int) -> tuple[Any, ...]:
        return tuple(a[lo:hi] if i in rows else a for i, a in enumerate(args))

    return parts_call(kernel, args[rows[0]].shape[0], part, minimum)


def parts_call(kernel: Any, count: int, part: Callable[[int, int], tuple[Any, ...]], minimum: int = 1) -> Any:
    """``kernel(*part(0, count))`` for a kernel (an ``_aot.KernelRef``) over ``count``
    independent items, ``part(lo, hi)`` being its arguments for items ``[lo, hi)``:
    compiled ahead of time where it can be, in parts across threads (:func:`split_call`,
    at least ``minimum`` items each; the int results summed); else numba's parallel
    kernel on the whole through :func:`parallel_call`."""
    whole = part(0, count)
    compiled = kernel.compiled(whole)
    if compiled is None:
        return parallel_call(kernel, *whole)
    total = split_call(compiled, count, part, minimum)
    return None if kernel.returns == "none" else total
