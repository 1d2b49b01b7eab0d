"""numba's on-disk kernel cache, made safe for several processes at once.

numba keeps one index file per jitted function (signature -> data file) and saves a new
entry by reading the index, picking a free data-file name and writing both back. Each
write is atomic (a temporary file, then a rename), but the read-modify-write is not: two
processes that compile different signatures of one kernel at the same moment (e.g. two
kernel paths, ``layouts._kernels.PATH_MARKERS``) can both pick the same data file, and
the index can then point one signature at the other's machine code. :func:`guard` puts
an exclusive ``flock`` on a lock file next to the index around each save and load of the
kernels it is given, so one process's save is whole before another reads or saves.
Where ``fcntl`` is missing (Windows) the kernels keep numba's own behaviour.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["guard", "guard_module", "locked"]


@contextlib.contextmanager
def locked(index_path: str) -> Iterator[None]:
    """Hold an exclusive lock on ``<index_path>.lock`` (made if missing) in the block."""
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(index_path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # a read-only cache directory: numba saves nothing there either
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class _Guarded:
    """Mixin over a numba ``Cache``: its loads and saves under the index's lock; an entry
    that does not load (numba would raise ``UnpicklingError`` in every later process) is
    compiled again."""

    _cache_file: Any

    def load_overload(self, sig: Any, target_context: Any) -> Any:
        with locked(self._cache_file._index_path):
            try:
                return super().load_overload(sig, target_context)  # type: ignore[misc]
            except Exception:  # a damaged entry (truncated, say) is a miss: numba compiles
                return None  # the kernel again and its save replaces the entry

    def save_overload(self, sig: Any, data: Any) -> None:
        with locked(self._cache_file._index_path):
            super().save_overload(sig, data)  # type: ignore[misc]


_GUARDED: dict[type, type] = {}


def guard(*kernels: Any) -> None:
    """Make the disk caches of these ``cache=True`` numba kernels safe under several
    processes (see the module docstring); kernels without a disk cache are left alone."""
    for kernel in kernels:
        cache = getattr(kernel, "_cache", None)
        if cache is None or not hasattr(cache, "_cache_file") or isinstance(cache, _Guarded):
            continue
        cls = type(cache)
        if cls not in _GUARDED:
            _GUARDED[cls] = type(f"Guarded{cls.__name__}", (_Guarded, cls), {})
        cache.__class__ = _GUARDED[cls]


def guard_module(namespace: dict[str, Any]) -> None:
    """:func:`guard` every numba kernel defined in a module (pass its ``globals()``)."""
    guard(*(v for v in namespace.values() if hasattr(v, "_cache") and hasattr(v, "py_func")))
