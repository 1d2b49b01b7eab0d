"""The typed boundary between the layouts and the numba lookup kernels.

A layout's ``fast_bag`` gives a bag kernel two things: the table's arguments as the
kernel's own NamedTuple (``BlockSparseKernelTable``, ``FusedKernelTable``: geometry and
arrays, built by keyword) and the lookups as a ``Bags`` (CPU tensors, made in one place by
``Bags.of``). ``run_bags`` makes the one call: output allocated, threads as torch's,
launched safely from any Python thread, and the kernel's count of out-of-range ids turned
into IndexError (``check_ids``). The fields of each NamedTuple are the kernel's parameters
in order, and ``tests/test_nn.py`` checks that they are.

Which kernel paths may serve is a ``KernelPolicy``: a process default
(``set_default_kernel_policy``), overridden in a block by ``kernel_policy(...)`` (for the
current thread or task only) or per call (``fast_bag(..., policy=...)``). Its ``path``
picks the instruction set of the block-sparse decode ("avx512", "avx2", "generic"; None:
the process's, chosen once from the CPU or forced by ``EMBPRESS_KERNEL``, see
``kernel_path``); ``system_info`` says which path runs and why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from enum import IntEnum
from typing import Any, NamedTuple

import numpy as np
import torch

from .. import _aot
from .._buffers import aligned_zeros, huge_pages_mode
from .._parallel import parallel_call
from . import _paths
from ._paths import KERNEL_PATHS, START_RING, available_paths, process_choice, process_path

__all__ = [
    "KERNEL_POOLINGS",
    "Bags",
    "BlockSparseKernelTable",
    "FusedKernelTable",
    "KernelPolicy",
    "Pooling",
    "check_ids",
    "current_kernel_policy",
    "int64_ids",
    "kernel_path",
    "kernel_path_marker",
    "kernel_path_number",
    "kernel_paths",
    "kernel_policy",
    "run_bags",
    "run_threads",
    "set_default_kernel_policy",
    "system_info",
]


class Pooling(IntEnum):
    """How a bag combines its rows: the embpress ops' ``mode`` (``nn.EmbeddingBag``'s names)."""

    SUM = 0
    MEAN = 1
    MAX = 2


# what the bag kernels compute; module constants, as an enum member's lookup on its class
# costs more than the comparison, on a path whose fixed cost is measured in microseconds
KERNEL_POOLINGS = (Pooling.SUM, Pooling.MEAN)
_MEAN = Pooling.MEAN
# what the kernels get unweighted: empty, never read (and writable, as the weights of a
# weighted call are: a read-only array would be another numba signature to compile)
_NO_WEIGHTS = torch.zeros(0, dtype=torch.float32)


@dataclasses.dataclass(frozen=True)
class KernelPolicy:
    """Which of embpress's own kernel paths may serve a lookup where they apply.

    fused_kernel: 4-bit fused rows (dense, pruned rows) on several threads go to embpress's
        numba kernel, which splits the bags across threads (else FBGEMM's, on one thread);
        fused rows whose qparams FBGEMM does not take go to embpress's plain kernel (else
        the distinct rows are decoded in torch).
    vector_decode: block-sparse rows are decoded whole bitmap words at a time where the
        shape allows (else the set bits are walked).
    path: the instructions of that decode: "avx512" (register expands), "avx2" (table
        permutes), "generic" (no x86 intrinsic: what ARM runs); None, the process's path
        (``kernel_path``). A path this CPU cannot run is refused (ValueError).

    Switching a path never changes a result beyond float rounding; tests do it to check
    each path against the others.
    """

    fused_kernel: bool = True
    vector_decode: bool = True
    path: str | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "path":
                _check_path(value)
            elif not isinstance(value, bool):
                raise TypeError(f"KernelPolicy.{field.name} must be a bool, got {value!r}")


def _check_path(path: object) -> None:
    """TypeError / ValueError unless ``path`` is None or a kernel path this CPU runs."""
    if path is None:
        return
    if not isinstance(path, str):
        raise TypeError(f"KernelPolicy.path must be a str or None, got {path!r}")
    if path not in KERNEL_PATHS:
        raise ValueError(f"KernelPolicy.path must be one of {', '.join(KERNEL_PATHS)} or None, got {path!r}")
    if not _paths.path_compiles(KERNEL_PATHS[path]):
        raise ValueError(
            f"KernelPolicy.path={path!r}: this CPU cannot run that kernel path "
            f"(it runs {', '.join(available_paths())})"
        )


_default_policy = KernelPolicy()
_policy: ContextVar[KernelPolicy | None] = ContextVar("embpress_kernel_policy", default=None)


def current_kernel_policy() -> KernelPolicy:
    """The policy in force here: the innermost ``kernel_policy`` block, else the default."""
    return _policy.get() or _default_policy


def set_default_kernel_policy(policy: KernelPolicy) -> KernelPolicy:
    """Make ``policy`` the process default (where no ``kernel_policy`` block is open);
    returns the one it replaces."""
    global _default_policy
    if not isinstance(policy, KernelPolicy):
        raise TypeError(f"policy must be a KernelPolicy, got {type(policy).__name__}")
    previous, _default_policy = _default_policy, policy
    return previous


@contextlib.contextmanager
def kernel_policy(policy: KernelPolicy | None = None, **changes: bool | str | None) -> Iterator[KernelPolicy]:
    """Use ``policy`` (default: the current one) with ``changes`` applied in this block, in
    this thread or task only; e.g. ``with kernel_policy(vector_decode=False): ...`` or
    ``kernel_policy(path="generic")``."""
    if policy is not None and not isinstance(policy, KernelPolicy):
        raise TypeError(f"policy must be a KernelPolicy or None, got {type(policy).__name__}")
    try:
        chosen = dataclasses.replace(policy or current_kernel_policy(), **changes)  # type: ignore[arg-type]
    except TypeError as err:  # an unknown field or a wrong type
        raise TypeError(f"kernel_policy: {err}") from None
    token = _policy.set(chosen)
    try:
        yield chosen
    finally:
        _policy.reset(token)


def kernel_paths() -> tuple[str, ...]:
    """The kernel paths this CPU runs, fastest first: what ``KernelPolicy.path`` accepts."""
    return available_paths()


def kernel_path(policy: KernelPolicy | None = None) -> str:
    """The kernel path a lookup under ``policy`` (default: the current one) runs: its
    ``path``, else the process's (``EMBPRESS_KERNEL`` if set, else the fastest this CPU
    runs; ValueError names the variable if it asks for an unknown or unavailable path)."""
    return (policy or current_kernel_policy()).path or process_path()


def kernel_path_number(policy: KernelPolicy | None = None) -> int:
    """``kernel_path(policy)`` as its number (``_kernels.KERNEL_PATHS``)."""
    return KERNEL_PATHS[kernel_path(policy)]


def kernel_path_marker(policy: KernelPolicy | None = None) -> np.ndarray:
    """``kernel_path(policy)`` as the kernels take it (``_paths.PATH_MARKERS``: an empty
    array whose dtype selects the kernel's compiled specialisation)."""
    return _paths.PATH_MARKERS[KERNEL_PATHS[kernel_path(policy)]]


# the CPU features the kernel paths use (LLVM names), reported by ``system_info``
_FEATURES = ("avx512f", "avx512vl", "avx512bw", "avx512vbmi2", "avx2", "fma", "f16c", "bmi2", "neon")


def system_info() -> dict[str, Any]:
    """What the lookup kernels run on, as JSON-able values: the kernel path of the current
    policy and where it came from, the paths this CPU runs, the CPU and the features the
    paths need, numba / llvmlite / LLVM / torch versions and thread counts. For
    ``embpress inspect --system`` and the benchmarks' headers."""
    import llvmlite
    import numba
    from llvmlite import binding as llvm_binding

    policy = current_kernel_policy()
    path = kernel_path(policy)
    source = "policy" if policy.path else process_choice()[1]
    host = llvm_binding.get_host_cpu_features()
    try:
        layer: str | None = str(numba.threading_layer())
    except ValueError:  # no parallel kernel has run yet
        layer = None
    return {
        "kernel_path": path,
        "kernel_path_source": source,
        "available_paths": list(available_paths()),
        "cpu": llvm_binding.get_host_cpu_name(),
        "cpu_features": {name: bool(host.get(name, False)) for name in _FEATURES},
        # the CPU numba compiles for when told one (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES), else None
        "numba_cpu_name": numba.config.CPU_NAME,  # type: ignore[attr-defined]
        "numba_cpu_features": numba.config.CPU_FEATURES or None,  # type: ignore[attr-defined]
        "numba": numba.__version__,
        "llvmlite": llvmlite.__version__,
        "llvm": ".".join(str(v) for v in llvm_binding.llvm_version_info),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numba_threads": int(numba.config.NUMBA_NUM_THREADS),  # type: ignore[attr-defined]
        "numba_threading_layer": layer,
        # tables of 8 MB and more are advised for huge pages (``_buffers``): used unless "never"
        "transparent_huge_pages": huge_pages_mode(),
        # kernels compiled ahead of time (``_aot``): where kept, which ran, why any did not
        "compiled_kernels": _aot.status(),
    }


def int64_ids(ids: torch.Tensor) -> np.ndarray:
    """Ids as the contiguous int64 numpy array the kernels read (a CPU tensor's own memory
    where it already is one)."""
    return ids.long().contiguous().numpy()


class Bags(NamedTuple):
    """Sum or mean bags as every bag kernel takes them (its parameters after the table's):
    contiguous CPU tensors, whose addresses a compiled kernel takes directly (``_aot.pack``);
    numba's kernels take them as ``arrays()``."""

    indices: torch.Tensor  # int64 ids (the kernels check their range)
    offsets: torch.Tensor  # int64 bag bounds with a final total
    weights: torch.Tensor  # float32, one per id; empty when unweighted
    weighted: bool
    mean: bool

    @classmethod
    def of(
        cls,
        indices: torch.Tensor,
        offsets: torch.Tensor,
        mode: int,
        per_sample_weights: torch.Tensor | None,
    ) -> Bags:
        """The bags of CPU tensors: flat ids, bounds with a final total, ``Pooling.SUM`` or
        ``MEAN``, optional float weights."""
        if mode not in KERNEL_POOLINGS:
            raise ValueError(f"the bag kernels sum or average, got mode {mode!r}")
        if per_sample_weights is None:
            weights = _NO_WEIGHTS
        else:
            weights = per_sample_weights.detach().float().contiguous()
        weighted = per_sample_weights is not None
        return cls(indices.long().contiguous(), offsets.long().contiguous(), weights, weighted, mode == _MEAN)

    def arrays(self) -> tuple[Any, ...]:
        """The fields as numba's kernels take them: numpy views of the same memory."""
        return (self.indices.numpy(), self.offsets.numpy(), self.weights.numpy(), self.weighted, self.mean)


class BlockSparseKernelTable(NamedTuple):
    """``_kernels.block_sparse_bag``'s table arguments (see ``layouts.block_sparse``)."""

    records: np.ndarray  # uint8: the records, then RECORD_TAIL zero bytes
    row_offsets: np.ndarray  # uint16 pair offsets
    group_offsets: np.ndarray  # int64 group offsets
    shape: tuple[int, ...]  # the table's RecordShape as a plain tuple (numba types it fastest)
    rows: int
    dim: int
    skip: int  # mean record length: where an odd row's record is expected (prefetching)
    vector: bool  # decode whole bitmap words (block width 4, dim == 4 * word_bits * words)
    path: np.ndarray  # the kernel path's marker (``kernel_path_marker``)


class FusedKernelTable(NamedTuple):
    """``_kernels.fused_bag``'s table arguments: 4-bit fused rows, float16 qparams."""

    fused: np.ndarray  # uint8: the rows back to back
    row_bytes: int
    dim: int  # 32, 64 or 128


class PackedRowsKernelTable(NamedTuple):
    """``_kernels.packed_rows_bag``'s table arguments: fused rows FBGEMM does not take."""

    fused: np.ndarray  # uint8: the rows back to back
    row_bytes: int
    dim: int
    bits: int  # 8, 4 or 2
    half: bool  # float16 qparams (else float32)


def check_ids(bad: int, num_embeddings: int) -> None:
    """IndexError, worded as ``nn.Embedding``'s, if a kernel counted out-of-range ids."""
    if bad:
        raise IndexError(f"index out of range in self (num_embeddings={num_embeddings})")


def run_bags(
    kernel: Callable[..., int] | _aot.KernelRef,
    table: tuple[Any, ...],
    bags: Bags,
    num_embeddings: int,
    dim: int,
    run: _aot.KernelRef | None = None,
    owner: Any = None,
) -> torch.Tensor:
    """float32 ``[bags, dim]`` from ``kernel(*table, *bags, threads, out)``, a parallel bag
    kernel that writes every output row and returns how many ids were out of range.

    ``run``: the same computation for one thread's bags, ``run(*table, *bags, b0, b1,
    ring, acc, out)`` (ring: ``START_RING`` zeroed int64, acc: ``dim`` float32 scratch).
    Where it is compiled ahead of time (``_aot``), it serves instead of ``kernel``, its
    bags handed in chunks to torch's thread count of threads in C (``Bound.split``);
    numba is then not needed. ``owner``: the table the arguments are of; the compiled
    kernel bound to them (table arguments packed once) is kept with it while they stay
    the same.
    """
    count = bags.offsets.shape[0] - 1
    out = torch.from_numpy(np.empty((count, dim), dtype=np.float32))  # half torch.empty's cost
    if run is not None and _aot.enabled():
        threads, chunk = _threads_and_chunk(bags, count)
        at = len(bags)  # where the run's own arguments start in ``rest``
        if threads == 1:
            scratch: dict[int, np.ndarray] = {}
            rest = (*bags, 0, count, np.zeros(START_RING, np.int64), np.empty(dim, np.float32), out)
        else:
            rings = _per_thread(threads, START_RING, np.int64)
            accs = _per_thread(threads, dim, np.float32)
            scratch = {at + 2: rings, at + 3: accs}
            rest = (*bags, 0, count, rings[0], accs[0], out)
        bound = _bound(run, table, rest, owner)
        if bound is not None:
            check_ids(bound.split(rest, (at, at + 1), count, threads, chunk, scratch), num_embeddings)
            return out
    from ._kernels import set_threads

    check_ids(parallel_call(kernel, *table, *bags.arrays(), set_threads(), out.numpy()), num_embeddings)
    return out


# a batch gets a thread for each this many ids (below twice as many, the calling thread
# alone): waking another thread and waiting for it must cost less than it saves (with the
# splits on torch's OpenMP team, Zen 5, 2 vCPUs: block-sparse batches of 3,072 to 6,144
# ids took 0.75-0.94x their one-thread time on two threads, 2,048 ids 0.96-1.02x)
_IDS_PER_THREAD = 1536
# a compiled run kernel's bags go to its threads in chunks, about this many per thread, so
# that a thread that finishes early takes more (Zipf ids make some bags slower)
_CHUNKS_PER_THREAD = 8


# scratch rows of different threads never share a cache line pair (the adjacent-line
# prefetcher fetches 128 bytes): a line two cores write in turn slows them both
_LINE = 128


def _per_thread(threads: int, length: int, dtype: type) -> np.ndarray:
    """Zeroed scratch, a row of ``length`` items per thread, each row on lines of its own."""
    itemsize = np.dtype(dtype).itemsize
    row = -(-length * itemsize // _LINE) * _LINE // itemsize
    return aligned_zeros(threads * row, dtype, _LINE).reshape(threads, row)[:, :length]


def run_threads(ids: int, per_thread: int | None = None) -> int:
    """How many threads ``run_bags`` splits a batch of ``ids`` ids across when its run
    kernel is compiled: torch's count, fewer so that each has ``per_thread`` ids (default
    ``_IDS_PER_THREAD``)."""
    per = _IDS_PER_THREAD if per_thread is None else per_thread
    return max(1, min(torch.get_num_threads(), ids // per))


def _threads_and_chunk(bags: Bags, count: int) -> tuple[int, int]:
    """How many threads a compiled run kernel uses on these bags (``run_threads``), and
    how many bags each of its chunks takes."""
    threads = run_threads(bags.indices.shape[0] if count else 0)
    if threads == 1:
        return 1, max(1, count)
    return threads, max(1, -(-count // (threads * _CHUNKS_PER_THREAD)))


# run kernels bound to a table's arguments (packed once), by the table that owns them; an
# entry lasts while the table does, and serves while its arguments are the same
_BOUND: weakref.WeakKeyDictionary[Any, tuple[tuple[Any, ...], _aot.KernelRef, _aot.Bound | None]] = (
    weakref.WeakKeyDictionary()
)


def _bound(
    run: _aot.KernelRef, table: tuple[Any, ...], rest: tuple[Any, ...], owner: Any
) -> _aot.Bound | None:
    """``run`` compiled and bound to ``table`` (None where it has no compiled form)."""
    entry = None if owner is None else _BOUND.get(owner)
    if entry is not None and entry[0] is table and entry[1] is run:
        return entry[2]
    compiled = run.compiled((*table, *_aot.numpy_args(rest)))
    bound = None if compiled is None else compiled.bind(table)
    if owner is not None:
        _BOUND[owner] = (table, run, bound)
    return bound
