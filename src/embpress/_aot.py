"""Kernels compiled ahead of time: numba's machine code kept as a shared library per CPU,
loaded by later processes through ctypes, without importing numba.

numba's own disk cache still needs numba in the process: its import and compiler set-up
cost about half a second before the first kernel runs, most of a fresh process's first
lookup. A kernel made for this (a :class:`KernelRef` with a ``returns`` type: it neither
allocates nor raises, and takes C-contiguous arrays, ints, bools, floats and int tuples)
is compiled once per CPU, argument types and source: numba compiles it serially inside a
C-callable wrapper (``_aot_build``), the LLVM module is emitted as position-independent
object code and linked by the system C compiler into
``<cache>/kernels/<version>/<key>.so``. A later process finds the file by its key and
calls it through ctypes with one packed block of arguments (:func:`pack`); ctypes
releases the GIL. A kernel over a range of items (the lookups' runs of bags) can also be
split across the library's own threads in C (:meth:`Bound.split`); the compression's
kernels are split over rows on Python threads (``_parallel.rows_call``).

The version hashes the package's source, numba's and llvmlite's versions and the code
settings numba reads from ``NUMBA_*`` variables, the CPU numba compiles for and the
Python version; the key adds the kernel and its argument kinds: an edit, an upgrade or
another CPU never loads stale code. A version directory no process has used for 30 days
is removed by the next build. A build holds a lock beside its file and writes under a
temporary name renamed into place, so two processes never read a partial file and build
a kernel once between them; a file that does not load is rebuilt over. Only files and
directories that belong to the user and that no one else may write are loaded. Where
anything fails (no C compiler, a read-only cache, a symbol the loader cannot bind), the
kernel runs under numba as before, and :func:`status` says why. Should a compiled kernel
raise (arguments its callers never pass), it is rerun under numba, which raises its own
exception.

``EMBPRESS_AOT=0`` turns it off (read once per process); ``EMBPRESS_CACHE_DIR`` moves the cache (default
``$XDG_CACHE_HOME/embpress``, else ``~/.cache/embpress``).
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import functools
import hashlib
import importlib
import itertools
import json
import os
import platform
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

__all__ = ["AOT_ENV", "CACHE_ENV", "KernelRef", "cache_dir", "enabled", "status"]

AOT_ENV = "EMBPRESS_AOT"
CACHE_ENV = "EMBPRESS_CACHE_DIR"

_RETURNS = ("int64", "none")
_FLOAT_BITS_OF, _FLOAT_BITS = struct.Struct("<d"), struct.Struct("<q")
_CHAR = ctypes.c_char
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _switched_off(name: str) -> bool:
    """Whether the environment variable ``name`` says 0 (or false, no, off)."""
    value = os.environ.get(name)
    return value is not None and value.strip().lower() in ("0", "false", "no", "off")


@functools.cache
def enabled() -> bool:
    """Whether kernels may run from compiled libraries (``EMBPRESS_AOT`` is not 0). Read
    once per process, at its first lookup, as ``EMBPRESS_KERNEL`` is: every lookup asks,
    and reading the environment costs it several microseconds with cold caches."""
    return not _switched_off(AOT_ENV)


def cache_dir() -> Path:
    """Where the compiled kernels are kept: ``EMBPRESS_CACHE_DIR``, else the user's cache."""
    given = os.environ.get(CACHE_ENV, "").strip()
    if given:
        return Path(given) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(base) / "embpress" / "kernels"


def arg_spec(value: Any) -> str | None:
    """The kind of one kernel argument as the key and the wrapper see it, or None where
    it has no ahead-of-time form (numba then runs the kernel): ``a<ndim><dtype>`` for a
    C-contiguous array, ``b`` bool, ``i`` int64, ``f`` float64, ``t<n>`` a tuple of ints.
    Refused: scalars of other widths (numpy int32, float32; numba would type them
    otherwise than the wrapper, and the arithmetic could differ), ints outside int64, and
    read-only arrays."""
    if isinstance(value, np.ndarray):
        flags = value.flags
        if not (flags.c_contiguous and flags.writeable) or value.ndim > 9 or value.dtype.hasobject:
            return None  # numba types a read-only array otherwise, and refuses writes to it
        return f"a{value.ndim}{value.dtype.str}"
    if isinstance(value, (bool, np.bool_)):
        return "b"
    if isinstance(value, np.integer) and value.dtype == np.int64:
        return "i"
    if isinstance(value, int):
        return "i" if _INT64_MIN <= value <= _INT64_MAX else None
    if isinstance(value, float) or (isinstance(value, np.floating) and value.dtype == np.float64):
        return "f"
    if isinstance(value, tuple) and all(
        isinstance(v, int) and not isinstance(v, bool) and _INT64_MIN <= v <= _INT64_MAX for v in value
    ):
        return f"t{len(value)}"
    return None


def slot_count(spec: str) -> int:
    """How many int64 slots an argument of this kind takes in an argument block: an array
    its address and its shape, a tuple its items, anything else one."""
    kind = spec[0]
    return 1 + int(spec[1]) if kind == "a" else int(spec[1:]) if kind == "t" else 1


def address(array: np.ndarray) -> int:
    """The address of an array's first byte (a third of the cost of ``ndarray.ctypes.data``,
    which serves where the buffer is empty or cannot be written)."""
    try:
        return ctypes.addressof(_CHAR.from_buffer(cast(Any, array)))
    except (TypeError, ValueError, BufferError):
        return int(array.ctypes.data)


def numpy_args(values: Sequence[Any]) -> list[Any]:
    """``values`` with each tensor as its numpy view: the arguments as numba and the
    kinds of :func:`arg_spec` take them (a tensor has ``numpy``, an array does not)."""
    return [v.numpy() if hasattr(v, "numpy") else v for v in values]


def pack(specs: Sequence[str], args: Sequence[Any]) -> list[int]:
    """The argument block of ``args`` (of kinds ``specs``) as the library's
    ``embpress_call`` reads it (``_aot_build``): int64 slots, a float as its IEEE bits.

    An array argument may also come as a contiguous CPU torch tensor of the same dtype
    and rank as the numpy array its kind was taken from (its ``data_ptr``: a tenth of
    the cost of a numpy array's address, which a small lookup would pay per array)."""
    out: list[int] = []
    for spec, value in zip(specs, args, strict=True):
        kind = spec[0]
        if kind == "a":
            out.append(address(value) if isinstance(value, np.ndarray) else value.data_ptr())
            out.extend(value.shape)
        elif kind == "t":
            out.extend(value)
        elif kind == "f":
            out.append(_FLOAT_BITS.unpack(_FLOAT_BITS_OF.pack(float(value)))[0])
        else:
            out.append(int(value))
    return out


@functools.cache
def _source_hash() -> str:
    """A hash of every source file of the package (any edit gives new keys)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@functools.cache
def _toolchain() -> dict[str, Any]:
    """What the compiled code depends on beyond the source: numba's and llvmlite's versions,
    the CPU numba compiles for (a named one, else the host's name and features) and Python."""
    from importlib.metadata import version

    from .layouts._paths import cpuinfo, numba_cpu

    name, features = numba_cpu()
    info = cpuinfo()
    if name in (None, "host") and info is not None:
        name, features = "host", info[0]
    elif name in (None, "host"):
        from llvmlite import binding as llvm_binding

        name = llvm_binding.get_host_cpu_name()
        features = llvm_binding.get_host_cpu_features().flatten()
    return {
        "numba": version("numba"),
        "llvmlite": version("llvmlite"),
        "cpu": [name, features],
        "numba_settings": _numba_settings(),
        "python": sys.version,
        "machine": platform.machine(),
    }


# numba's settings that change the code it generates (beyond the CPU's name and features)
_CODE_SETTINGS = ("CPU_FEATURES", "OPT", "BOUNDSCHECK", "FASTMATH", "DEBUGINFO_DEFAULT")


def _numba_settings() -> dict[str, str]:
    """numba's code-generation settings, as the ``NUMBA_*`` variables numba reads them
    from (the same in a process that has loaded numba and one that has not)."""
    return {k: os.environ.get(f"NUMBA_{k}", "").strip() for k in _CODE_SETTINGS}


def kernel_key(module: str, name: str, specs: Sequence[str], returns: str) -> str:
    """The file name (without ``.so``) of a kernel compiled for these argument kinds, in
    this version of the code (``version_dir``)."""
    what = [module, name, list(specs), returns, _source_hash(), _toolchain()]
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]
    return f"{name}-{digest}"


@functools.cache
def _version() -> str:
    what = [_source_hash(), _toolchain()]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]


def version_dir() -> Path:
    """The cache's directory for this version of the code (the package's source and the
    toolchain): each version's libraries apart, so that old versions can be pruned."""
    return cache_dir() / _version()


# a version directory no process has used for this long is removed (by the next build)
_PRUNE_AFTER_S = 30 * 24 * 3600


def _prune(keep: Path) -> None:
    """Remove the cache's version directories (and abandoned build folders) that no
    process has used in ``_PRUNE_AFTER_S``; errors are ignored (another process may be
    pruning too)."""
    import shutil
    import time

    limit = time.time() - _PRUNE_AFTER_S
    for entry in keep.parent.iterdir():
        try:
            if entry != keep and entry.is_dir() and entry.stat().st_mtime < limit:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue


def _check_trusted(path: Path) -> None:
    """PermissionError unless ``path`` and its directory belong to this user and no one
    else may write them: a library found there runs in this process."""
    if not hasattr(os, "getuid"):
        return
    for where in (path.parent, path):
        info = where.stat()
        if info.st_uid != os.getuid() or info.st_mode & 0o022:
            raise PermissionError(f"{where} is not owned by this user or is writable by others: not loaded")


_LOCK = threading.Lock()
_loaded: dict[tuple[str, str, tuple[str, ...]], Compiled | None] = {}
_failures: dict[str, str] = {}  # kernel name -> why it runs under numba
_used: set[str] = set()  # kernel names that ran from a compiled library
_numba_loaded: set[str] = set()  # kernel names whose numba dispatcher was loaded
_touched: set[Path] = set()  # version directories marked as used by this process


_forked = False  # whether this process is a fork's child (see _team)


def _after_fork_in_child() -> None:
    global _LOCK, _forked
    _LOCK = threading.Lock()  # a fork during another thread's build leaves it held
    _forked = True


os.register_at_fork(after_in_child=_after_fork_in_child)


TEAM_ENV = "EMBPRESS_OPENMP_TEAM"
# file names of the OpenMP runtimes torch links (GNU's; LLVM's and Intel's export the same
# GOMP_* entry points)
_OPENMP_RUNTIMES = ("libgomp", "libomp", "libiomp")


@functools.cache
def _openmp_team() -> tuple[str, int, int] | None:
    """The file, and the addresses of ``GOMP_parallel`` and ``omp_get_thread_num``, of the OpenMP
    library torch runs its parallel ops on, as this process loaded it (found among the
    mapped files; never loaded here); None where there is none (torch built without
    OpenMP, no ``/proc``) or ``EMBPRESS_OPENMP_TEAM`` is 0. Compiled kernels split their
    bags on that team: its threads poll for a while after each of torch's ops, and a pool
    of embpress's own would compete with them for the cores."""
    if _switched_off(TEAM_ENV):
        return None
    import torch

    if not torch.backends.openmp.is_available():
        return None
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    paths = {line.split(None, 5)[5] for line in maps if len(line.split(None, 5)) == 6}
    runtimes = [p for p in paths if Path(p).name.startswith(_OPENMP_RUNTIMES)]
    torch_lib = str(Path(torch.__file__).resolve().parent)
    for name in sorted(runtimes, key=lambda p: (not p.startswith(torch_lib), p)):  # torch's own first
        try:
            library = ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_NOW)
            parallel, thread_num = library.GOMP_parallel, library.omp_get_thread_num
        except (OSError, AttributeError):
            continue
        return (
            name,
            ctypes.cast(parallel, ctypes.c_void_p).value or 0,
            ctypes.cast(thread_num, ctypes.c_void_p).value or 0,
        )
    return None


def _team() -> tuple[str, int, int] | None:
    """``_openmp_team()``, or None in a fork's child: libgomp's team threads do not
    survive a fork, and its parallel call there hangs. Libraries open at the fork forget
    the team in the child (their own atfork handler); this keeps a library first opened
    in the child from taking it up again."""
    return None if _forked else _openmp_team()


# a built library ends with SEAL_MAGIC and a SHA-256 of its bytes and its file name
# (``seal``): checked before ``dlopen``, which maps a truncated file's missing pages and
# faults (SIGBUS) on them, and runs a damaged or another kernel's library (SIGSEGV)
SEAL_MAGIC = b"embpress-kernel\x01"
_SEAL_BYTES = len(SEAL_MAGIC) + 32


def _seal_digest(body: bytes, name: str) -> bytes:
    return hashlib.sha256(body + b"\0" + name.encode()).digest()


def seal(path: Path, name: str) -> None:
    """Append the seal of the library at ``path``, to be kept under the file ``name``
    (the ELF loader ignores bytes past what its headers map)."""
    body = path.read_bytes()
    with open(path, "ab") as fh:
        fh.write(SEAL_MAGIC + _seal_digest(body, name))


def _check_seal(path: Path) -> None:
    """OSError unless the file at ``path`` is a whole library built for its name."""
    data = path.read_bytes()
    body, magic, digest = data[:-_SEAL_BYTES], data[-_SEAL_BYTES:-32], data[-32:]
    if len(data) < _SEAL_BYTES or magic != SEAL_MAGIC or digest != _seal_digest(body, path.name):
        raise OSError(f"{path}: damaged or another kernel's library (its seal does not match)")


def _open(path: Path) -> Any:
    """The library and its two entry points, typed (``_aot_build`` describes them;
    OSError / AttributeError where the file cannot be loaded, is not sealed as this
    kernel's (``seal``) or lacks them); its splits run on torch's OpenMP team where there
    is one (``_openmp_team``)."""
    _check_trusted(path)
    _check_seal(path)
    library = ctypes.CDLL(str(path))
    call = library.embpress_call
    call.argtypes, call.restype = [ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int64
    split = library.embpress_split
    split.argtypes, split.restype = [ctypes.c_int64] * 8, ctypes.c_int64
    team = _team()
    if team is not None:
        use_team = library.embpress_use_team
        use_team.argtypes, use_team.restype = [ctypes.c_void_p, ctypes.c_void_p], None
        use_team(*team[1:])
    return library, call, split


class KernelRef:
    """A numba kernel named by module and attribute, imported (with numba) only when
    numba must run it; with ``returns`` ("int64" or "none") the kernel may also run from
    a library compiled ahead of time (:meth:`compiled`).

    Calling the reference runs the numba kernel; ``numba`` is the dispatcher itself (for
    ``_parallel.parallel_call``)."""

    def __init__(self, module: str, name: str, returns: str | None = None) -> None:
        if returns is not None and returns not in _RETURNS:
            raise ValueError(f"returns must be one of {', '.join(_RETURNS)} or None, got {returns!r}")
        self.module = module
        self.name = name
        self.returns = returns

    def __repr__(self) -> str:
        return f"KernelRef({self.module}.{self.name})"

    @functools.cached_property
    def numba(self) -> Any:
        """The numba dispatcher (importing its module, and numba, on first use)."""
        _numba_loaded.add(self.name)
        return getattr(importlib.import_module(self.module), self.name)

    def __call__(self, *args: Any) -> Any:
        return self.numba(*args)

    def run(self, *args: Any) -> Any:
        """The kernel on ``args``: compiled ahead of time where it can be, else numba's."""
        compiled = self.compiled(args)
        return compiled(*args) if compiled is not None else self.numba(*args)

    def compiled(self, args: Sequence[Any]) -> Compiled | None:
        """The kernel compiled ahead of time for arguments like ``args`` (loaded, or built
        and cached first), as a function of the same arguments; None where it cannot be
        (then numba runs it)."""
        if self.returns is None or not enabled():
            return None
        specs: list[str] = []
        for value in args:
            spec = arg_spec(value)
            if spec is None:
                return None
            specs.append(spec)
        entry = (self.module, self.name, tuple(specs))
        try:
            return _loaded[entry]
        except KeyError:
            pass
        with _LOCK:
            if entry not in _loaded:
                _loaded[entry] = self._load(specs)
        return _loaded[entry]

    def _load(self, specs: list[str]) -> Compiled | None:
        returns = self.returns or "none"
        try:
            where = version_dir()
            path = where / f"{kernel_key(self.module, self.name, specs, returns)}.so"
            try:
                library, call, split = _open(path)
            except (OSError, AttributeError) as err:
                if isinstance(err, PermissionError):
                    raise
                from . import _aot_build  # missing or damaged: (re)built, under a lock

                _aot_build.build(self.module, self.name, specs, returns, path, replace=path.exists())
                library, call, split = _open(path)
                _prune(where)
            if where not in _touched:  # marks the version as in use (see _prune)
                _touched.add(where)
                with contextlib.suppress(OSError):
                    os.utime(where)
        except Exception as err:  # any failure: numba runs the kernel, status() says why
            _failures[self.name] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            return None
        _failures.pop(self.name, None)
        _used.add(self.name)
        return Compiled(self, library, call, split, tuple(specs))


def _run(compiled: Compiled, flat: Sequence[int], args: Sequence[Any]) -> Any:
    """Call a compiled kernel on its argument block; where it raised, run it again under
    numba, which raises its own exception."""
    block = array.array("q", flat)
    block.append(0)  # the raise flag
    address = block.buffer_info()[0]
    result = compiled.call(address, address + 8 * len(flat))
    if block[-1]:
        return compiled.ref.numba(*args)
    return None if compiled.ref.returns == "none" else result


class Compiled:
    """A kernel compiled ahead of time for arguments of kinds ``specs``: called with the
    same arguments as the numba kernel. A kernel that raised is rerun under numba, whose
    exception the caller gets (the C wrapper can only print one)."""

    def __init__(self, ref: KernelRef, library: Any, call: Any, split: Any, specs: tuple[str, ...]) -> None:
        self.ref = ref
        self.library = library  # keeps it loaded
        self.call = call
        self.split = split
        self.specs = specs
        # each argument's first slot in the argument block
        self.slots = tuple(itertools.accumulate((slot_count(s) for s in specs[:-1]), initial=0))

    def __call__(self, *args: Any) -> Any:
        return self.prepare(*args)()

    def prepare(self, *args: Any) -> Callable[[], Any]:
        """The call on ``args`` with its argument block made here, to run later (on
        another thread: only the C call and the raise check are left to it)."""
        return functools.partial(_run, self, pack(self.specs, args), args)

    def bind(self, prefix: Sequence[Any]) -> Bound:
        """This kernel with its leading arguments fixed (packed once: a table's arrays
        and fields, called again and again with new lookups)."""
        return Bound(self, tuple(prefix))


class Bound:
    """A :class:`Compiled` kernel with its leading arguments packed once; run with the
    rest over a range of items split across threads (:meth:`split`)."""

    def __init__(self, compiled: Compiled, prefix: tuple[Any, ...]) -> None:
        self.compiled = compiled
        self.prefix = prefix  # keeps the arrays the addresses below point into alive
        self.flat_prefix = pack(compiled.specs[: len(prefix)], prefix)
        self.rest_specs = compiled.specs[len(prefix) :]

    def split(
        self,
        rest: Sequence[Any],
        bounds: tuple[int, int],
        count: int,
        threads: int,
        chunk: int,
        scratch: dict[int, Any],
    ) -> Any:
        """The kernel over items ``[0, count)`` in chunks of ``chunk`` handed to
        ``threads`` threads in C (the library's ``embpress_split``), with ``rest`` after
        the bound arguments: ``rest[bounds[0]]`` and ``rest[bounds[1]]`` are replaced by
        each chunk's bounds; ``scratch`` maps a position of ``rest`` to an array with a
        row per thread (``rest`` holds its row 0), each thread using its own row.

        ``rest`` must be of the kinds this was bound with (the caller made its arrays:
        they are not checked again). Returns the sum of the chunks' results (None for a
        kernel that returns nothing); a kernel that raised is rerun under numba on the
        whole range, which raises its own exception."""
        compiled = self.compiled
        first = len(self.prefix)
        flat = [*self.flat_prefix, *pack(self.rest_specs, rest)]
        stride = len(flat) + 1  # each thread's block, then a slot (row 0's: the raise flag)
        threads = max(1, threads)
        block = array.array("q", [*flat, 0] * threads)
        for position, rows in scratch.items():
            slot = compiled.slots[first + position]
            base, step = block[slot], rows.strides[0]  # ``rest`` holds row 0
            for t in range(1, threads):
                block[t * stride + slot] = base + t * step
        address = block.buffer_info()[0]
        lo, hi = (compiled.slots[first + p] for p in bounds)
        result = compiled.split(address, stride, threads, lo, hi, count, chunk, address + 8 * (stride - 1))
        if block[stride - 1]:
            full = numpy_args(rest)
            full[bounds[0]], full[bounds[1]] = 0, count
            return compiled.ref.numba(*self.prefix, *full)
        return None if compiled.ref.returns == "none" else result


def status() -> dict[str, Any]:
    """Whether kernels run from compiled libraries, where those are kept, the C compiler
    that links them, which kernels ran so in this process, which numba kernels it loaded
    (kernels with no compiled form, arguments that have none, or fallbacks), and why any
    compiled kernel runs under numba instead (JSON-able)."""
    from ._aot_build import compiler

    team = _team()
    return {
        "enabled": enabled(),
        "cache_dir": str(cache_dir()),
        "c_compiler": compiler(),
        "compiled_kernels_used": sorted(_used),
        "numba_kernels_loaded": sorted(_numba_loaded),
        "numba_fallbacks": dict(sorted(_failures.items())),
        # where compiled kernels split their bags: torch's OpenMP library (its team), or
        # None for the libraries' own pools
        "thread_team": None if team is None else team[0],
    }
