"""Which kernel path a process runs, without importing numba.

The lookup kernels (``_kernels``) come in three paths that differ in how they expand a
bitmap word's kept blocks (``KERNEL_PATHS``): AVX-512 register expands, AVX2 table
permutes, and generic IR (no x86 intrinsic, what ARM runs). This module answers which of
them the CPU runs and which one the process uses (``process_path``, chosen once; the
``EMBPRESS_KERNEL`` variable can force it), and names each path's marker
(``PATH_MARKERS``: an empty array whose dtype makes the path its own compiled
specialisation of a kernel). It imports neither numba nor the kernels, so that a process
whose kernels are already compiled ahead of time (``_aot``) starts without numba.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from pathlib import Path

import numpy as np

__all__ = [
    "KERNEL_ENV",
    "KERNEL_PATHS",
    "PATH_AVX2",
    "PATH_AVX512",
    "PATH_GENERIC",
    "PATH_MARKERS",
    "START_RING",
    "available_paths",
    "cpuinfo",
    "numba_cpu",
    "path_compiles",
    "process_path",
    "vector_decode_supported",
]


def numba_cpu() -> tuple[str | None, str | None]:
    """The CPU name and features numba is told to compile for (``NUMBA_CPU_NAME``,
    ``NUMBA_CPU_FEATURES``; None, None: the host's). numba's own config where numba is
    loaded (a test may change it), else the variables it reads them from."""
    numba = sys.modules.get("numba")
    config = getattr(numba, "config", None)
    if config is not None:
        return config.CPU_NAME, config.CPU_FEATURES
    return os.environ.get("NUMBA_CPU_NAME") or None, os.environ.get("NUMBA_CPU_FEATURES") or None


# LLVM's names of x86 features where Linux's /proc/cpuinfo spells them otherwise
_CPUINFO_FLAGS = {"avx512vbmi2": "avx512_vbmi2"}


@functools.cache
def cpuinfo() -> tuple[str, frozenset[str]] | None:
    """Linux's description of the first CPU: its identity (vendor, family, model, name and
    flags, one string) and its feature flags; None where ``/proc/cpuinfo`` is missing.
    It says what LLVM's host detection would, without importing llvmlite (about 0.1 s of
    a fresh process's start)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = fields.get("flags", fields.get("Features"))
    if flags is None:
        return None
    keys = ("vendor_id", "cpu family", "model", "model name", "CPU implementer", "CPU part", "CPU variant")
    identity = "|".join(fields.get(k, "") for k in keys) + "|" + flags
    return identity, frozenset(flags.split())


@functools.cache
def _host_is_x86() -> bool:
    """Whether numba compiles for an x86 CPU (it compiles for the machine it runs on).
    Generic IR that LLVM lowers differently by architecture asks (``_kernels._byte_flow``)."""
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def _host_has(feature: str) -> bool:
    """Whether the CPU numba compiles for has ``feature`` (an LLVM name such as
    ``avx512vbmi2``). Where numba is told to compile for a named CPU (``NUMBA_CPU_NAME``,
    e.g. a portable cache or a test that compiles for an older CPU) with features
    (``NUMBA_CPU_FEATURES``), only those it switches on (``+avx2``) count; a name alone
    compiles with the host's features (numba's rule), so the host's answer counts.

    Code generation asks before it emits an x86-only intrinsic: every branch of a kernel is
    compiled, taken or not, and LLVM cannot compile such an intrinsic for a CPU without
    the instruction. (Numba's disk cache is keyed on the CPU, so this is safe to cache.)
    On x86 Linux the answer comes from ``cpuinfo`` (the same CPUID bits LLVM reads),
    elsewhere from LLVM's host detection.
    """
    name, features = numba_cpu()
    if name not in (None, "host") and features is not None:
        return f"+{feature}" in (f.strip() for f in features.split(","))
    info = cpuinfo()
    if info is not None and platform.machine().lower() in ("x86_64", "amd64"):
        return _CPUINFO_FLAGS.get(feature, feature) in info[1]
    from llvmlite import binding as llvm_binding

    return bool(llvm_binding.get_host_cpu_features().get(feature, False))


def _has_expands(element_bits: int) -> bool:
    """Whether the CPU numba compiles for has the AVX-512 register expand of 32-bit (F, VL)
    or 16- and 8-bit (also VBMI2) elements. Not cached: tests that hide features see the
    change."""
    if not (_host_has("avx512f") and _host_has("avx512vl")):
        return False
    return element_bits == 32 or _host_has("avx512vbmi2")


# The kernel paths by number (the kernels take them as ``PATH_MARKERS``): which
# instructions expand a bitmap word's kept blocks. "avx512": the register expands
# (``vpexpandd``/``vpexpandw``/``vpexpandb``); "avx2": a permutation from a 256-entry table
# per bitmap byte (``vpermd`` of 32-bit blocks); "generic": LLVM's generic vector IR only
# (a network of fixed lane shifts and selects per bitmap byte), what a CPU without x86
# vectors (ARM) runs. 16- and 8-bit blocks (4- and 2-bit codes) take a byte shuffle in
# generic IR on the avx2 and generic paths (``pshufb`` on x86, ``tbl`` on ARM), and so do
# 32-bit blocks on the generic path of a CPU without AVX-512 (``_kernels._byte_flow``).
PATH_GENERIC = 0
PATH_AVX2 = 1
PATH_AVX512 = 2
KERNEL_PATHS: dict[str, int] = {"avx512": PATH_AVX512, "avx2": PATH_AVX2, "generic": PATH_GENERIC}


def path_compiles(path: int) -> bool:
    """Whether the CPU numba compiles for can run kernel path ``path`` (a ``KERNEL_PATHS``
    number). Not cached, as ``_has_expands``."""
    if path == PATH_AVX512:
        return _host_has("avx512f") and _host_has("avx512vl")
    if path == PATH_AVX2:
        return _host_has("avx2")
    return path == PATH_GENERIC


def available_paths() -> tuple[str, ...]:
    """The kernel paths this CPU can run, fastest first (the first is the automatic choice)."""
    return tuple(name for name, number in KERNEL_PATHS.items() if path_compiles(number))


KERNEL_ENV = "EMBPRESS_KERNEL"


def process_path() -> str:
    """The kernel path of this process, chosen once: ``EMBPRESS_KERNEL`` (avx512, avx2 or
    generic; unset, empty or "auto": the first of ``available_paths``). ValueError names
    the variable when it asks for an unknown path or one this CPU cannot run."""
    return process_choice()[0]


@functools.cache
def process_choice() -> tuple[str, str]:
    """(``process_path``, why: "cpu" or ``EMBPRESS_KERNEL=<value>``), read once: a later
    change of the variable changes neither."""
    given = os.environ.get(KERNEL_ENV, "")
    forced = given.strip().lower()
    available = available_paths()
    if forced in ("", "auto"):
        return available[0], "cpu"
    if forced not in KERNEL_PATHS:
        raise ValueError(f"{KERNEL_ENV}={forced!r}: expected auto or one of {', '.join(KERNEL_PATHS)}")
    if forced not in available:
        raise ValueError(
            f"{KERNEL_ENV}={forced!r}: this CPU cannot run that kernel path (it runs {', '.join(available)})"
        )
    return forced, f"{KERNEL_ENV}={given}"


# A kernel takes its path as a marker: an empty array whose dtype names the path. Each path
# is then its own specialisation of a kernel, compiled (and cached on disk) when a process
# first uses it, and the code generation of an intrinsic sees its path as a constant.
_PATH_DTYPES = {PATH_GENERIC: np.uint8, PATH_AVX2: np.uint16, PATH_AVX512: np.uint32}
PATH_MARKERS: dict[int, np.ndarray] = {n: np.zeros(0, dtype=d) for n, d in _PATH_DTYPES.items()}


# slots of the ring of record starts in the one-pass block-sparse decode (``_kernels``),
# a power of two above its RECORD_PREFETCH; callers of ``block_sparse_run`` allocate it
START_RING = 64


def vector_decode_supported(bits: int) -> bool:
    """Whether block-sparse rows of ``bits`` can be decoded whole bitmap words at a time
    (8, 4 and 2 bits; every kernel path has an expand for them)."""
    return bits in (8, 4, 2)
