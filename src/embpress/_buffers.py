"""Large table buffers on pre-faulted anonymous memory, in transparent huge pages.

A fresh 128 MB array costs tens of thousands of page faults on first write, a large
share of compressing a 1M-row table (measured on the benchmark machine: 0.27 s for
``np.empty`` + fill, 0.04 s with ``MAP_POPULATE``). And a lookup of scattered rows of a
table on 4 kB pages misses the TLB on most rows: on 2 MB pages the same FBGEMM kernel
ran 1.5x as fast on the benchmark table. So a big buffer is mapped on its own, advised
for transparent huge pages (``MADV_HUGEPAGE``, which Linux honours unless THP is off
altogether) and faulted in at once (``MADV_POPULATE_WRITE``; ``MAP_POPULATE`` where
there are no huge pages); small ones and other platforms use ``np.empty``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import mmap
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["aligned_zeros", "empty", "empty_tensor", "huge_pages_mode", "on_huge_pages", "wants_huge_pages"]

_POPULATE_FROM = 8 << 20
_MADV_POPULATE_WRITE = 23  # Linux 5.14; Python's mmap module names it from 3.13 on
_THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_mode() -> str | None:
    """This system's transparent huge page mode ("always", "madvise" or "never"), None
    where it has none (not Linux)."""
    try:
        text = _THP_ENABLED.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


@functools.cache
def _huge_pages_on() -> bool:
    """Whether this system may back an advised mapping with huge pages (THP "always" or
    "madvise"; not "never", nor a system without THP)."""
    mode = huge_pages_mode()
    return hasattr(mmap, "MADV_HUGEPAGE") and mode is not None and mode != "never"


def _mapped(nbytes: int, populate: bool) -> mmap.mmap:
    """``nbytes`` of fresh private anonymous memory, in huge pages where the system has
    them; faulted in at once if ``populate``, else page by page as it is written."""
    anonymous = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if _huge_pages_on():
        region = mmap.mmap(-1, nbytes, flags=anonymous)
        try:
            region.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # not honoured here: plain pages, faulted in the old way below
            region.close()
        else:
            if populate:  # before Linux 5.14 it is faulted in 2 MB at a time as it is written
                with contextlib.suppress(OSError):
                    region.madvise(_MADV_POPULATE_WRITE)
            return region
    flags = anonymous | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
    return mmap.mmap(-1, nbytes, flags=flags)


def empty(shape: int | tuple[int, ...], dtype: Any, populate: bool = True) -> np.ndarray:
    """Uninitialised C-contiguous array, on huge pages when large and pre-faulted unless
    ``populate`` is False (then its pages are taken only as they are written)."""
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    dt = np.dtype(dtype)
    nbytes = math.prod(dims) * dt.itemsize
    if nbytes < _POPULATE_FROM or not hasattr(mmap, "MAP_ANONYMOUS"):
        return np.empty(dims, dtype=dt)
    return np.frombuffer(_mapped(nbytes, populate), dtype=dt).reshape(dims)


def aligned_zeros(count: int, dtype: Any, align: int) -> np.ndarray:
    """Zeroed 1-D array of ``count`` items whose first starts on an ``align``-byte boundary
    (a multiple of the item size): vector loads of a kernel's small tables then do not
    straddle cache lines, and rows of different threads' scratch share none."""
    dt = np.dtype(dtype)
    raw = np.zeros(count + align // dt.itemsize, dtype=dt)
    shift = (-raw.ctypes.data % align) // dt.itemsize
    return raw[shift : shift + count]


def empty_tensor(shape: tuple[int, ...], dtype: torch.dtype, populate: bool = True) -> torch.Tensor:
    """:func:`empty` as a CPU tensor of any dtype."""
    nbytes = math.prod(shape) * dtype.itemsize
    return torch.from_numpy(empty(nbytes, np.uint8, populate)).view(dtype).view(shape)


def wants_huge_pages(nbytes: int) -> bool:
    """Whether a CPU tensor of ``nbytes`` belongs on huge pages (:func:`on_huge_pages`)."""
    return nbytes >= _POPULATE_FROM and _huge_pages_on()


def on_huge_pages(tensor: torch.Tensor) -> torch.Tensor:
    """A large CPU tensor copied into a buffer from :func:`empty` (where this system has
    huge pages; a table's lookups then miss the TLB less), else ``tensor`` itself."""
    nbytes = tensor.numel() * tensor.element_size()
    if tensor.device.type != "cpu" or not wants_huge_pages(nbytes):
        return tensor
    out = empty_tensor(tuple(tensor.shape), tensor.dtype)
    out.copy_(tensor)
    return out
