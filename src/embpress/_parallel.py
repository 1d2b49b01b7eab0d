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

import numba
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
    numba.get_num_threads()
    layer = numba.threading_layer()
    _omp_started = layer == "omp"
    return bool(layer == "workqueue")


def parallel_call(kernel: Callable[..., Any], *args: Any) -> Any:
    """``kernel(*args)`` for a ``parallel=True`` numba kernel, safe from several threads.

    Under the workqueue layer the launches of every caller go through one lock (each one
    still runs on all of numba's threads); under OpenMP and TBB, which are thread-safe,
    this is a plain call. Every parallel kernel of embpress is called through here.
    """
    if _forked_after_omp:
        raise RuntimeError(FORK_ERROR)
    threads = torch.get_num_threads()
    try:
        if _serialise_launches():
            with _LAUNCH_LOCK:
                return kernel(*args)
        return kernel(*args)
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
