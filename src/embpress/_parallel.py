"""Launching numba's parallel kernels safely from several Python threads.

numba's workqueue threading layer (its fallback where neither OpenMP nor TBB loads) is not
thread-safe: two Python threads launching parallel kernels at once abort the process.
Every ``parallel=True`` kernel of embpress (sparsify, quant, layouts) is called through
:func:`parallel_call`, which serialises launches under that layer alone. Under the OpenMP
layer a launch also sets the OpenMP thread count that torch shares (a model set to one
thread would run on all of them afterwards), so torch's count is put back after each one.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import numba
import torch

__all__ = ["parallel_call"]

_LAUNCH_LOCK = threading.Lock()


@functools.cache
def _serialise_launches() -> bool:
    """Whether parallel kernels must be launched one at a time (the workqueue layer).

    ``numba.get_num_threads`` starts numba's thread pool, which settles the layer (the
    configured one, or the first of TBB, OpenMP and workqueue that loads), so the answer is
    known before the first launch and never changes afterwards.
    """
    numba.get_num_threads()
    return bool(numba.threading_layer() == "workqueue")


def parallel_call(kernel: Callable[..., Any], *args: Any) -> Any:
    """``kernel(*args)`` for a ``parallel=True`` numba kernel, safe from several threads.

    Under the workqueue layer the launches of every caller go through one lock (each one
    still runs on all of numba's threads); under OpenMP and TBB, which are thread-safe,
    this is a plain call. Every parallel kernel of embpress is called through here.
    """
    threads = torch.get_num_threads()
    try:
        if _serialise_launches():
            with _LAUNCH_LOCK:
                return kernel(*args)
        return kernel(*args)
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
