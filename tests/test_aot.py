"""Kernels compiled ahead of time (``embpress._aot``): the same sums as numba's kernels,
bit for bit, on every kernel path; a fresh process that finds them in the cache looks
up without importing numba; the cache is keyed on what the code depends on, safe under
two processes at once, and anything that fails falls back to numba with the reason kept.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from embpress import QuantConfig, QuantizedEmbeddingBag, _aot
from embpress.layouts import _kernels, lookup
from embpress.layouts.lookup import Bags, KernelPolicy, kernel_paths
from embpress.sparsify import block_norm_mask
from tests.conftest import torch_threads as _torch_threads

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def _env(**values: str | None):
    before = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _aot.enabled.cache_clear()  # (read once per process)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _aot.enabled.cache_clear()


@pytest.fixture(autouse=True)
def _aot_env_read_afresh():
    """``EMBPRESS_AOT`` is read once per process: each test here reads what it set."""
    _aot.enabled.cache_clear()
    yield
    _aot.enabled.cache_clear()


def _table(gen, rows, dim, bits, width, sparsity, layout="block_sparse"):
    weight = torch.randn(rows, dim, generator=gen)
    mask = block_norm_mask(weight, sparsity, (1, width)) if sparsity else None
    config = QuantConfig(bits=bits, layout=layout)
    return QuantizedEmbeddingBag.from_float(
        nn.EmbeddingBag.from_pretrained(weight), config, mask=mask, block_width=width
    ).table


def _bags(gen, rows, sizes, weighted):
    idx = torch.randint(0, rows, (sum(sizes),), generator=gen)
    bounds = torch.tensor([0, *itertools.accumulate(sizes)])
    psw = torch.rand(idx.numel(), generator=gen) if weighted else None
    return idx, bounds, psw


def _both(table, path, threads, idx, bounds, mode, psw):
    """The table's bags compiled ahead of time, then under numba (``EMBPRESS_AOT=0``)."""
    policy = KernelPolicy(path=path)
    with _torch_threads(threads):
        used = set(_aot.status()["compiled_kernels_used"])
        ahead = table.fast_bag(idx, bounds, mode, psw, policy=policy)
        with _env(EMBPRESS_AOT="0"):
            under_numba = table.fast_bag(idx, bounds, mode, psw, policy=policy)
    assert ahead is not None and under_numba is not None
    return ahead, under_numba, set(_aot.status()["compiled_kernels_used"]) - used


@pytest.fixture(autouse=True)
def _split_small_batches(monkeypatch):
    """Hand every bag run to its own thread, however small the batch (the tests' batches
    are small; the split is what they check)."""
    from embpress.layouts import base

    monkeypatch.setattr(lookup, "_IDS_PER_THREAD", 1)
    monkeypatch.setattr(base, "OWN_FUSED_IDS_PER_THREAD", 1)  # embpress's 4-bit kernel takes them


@settings(max_examples=30, deadline=None)
@given(
    path=st.sampled_from(["avx512", "avx2", "generic"]),
    dim=st.sampled_from([32, 64, 128, 256, 36]),
    bits=st.sampled_from([8, 4, 2]),
    width=st.sampled_from([4, 1, 3]),
    sparsity=st.sampled_from([0.0, 0.5, 0.8]),
    mode=st.sampled_from([0, 1]),
    weighted=st.booleans(),
    threads=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**16),
)
def test_block_sparse_bags_compiled_ahead_equal_numbas_bit_for_bit(
    path, dim, bits, width, sparsity, mode, weighted, threads, seed
):
    if path not in kernel_paths():
        return
    gen = torch.Generator().manual_seed(seed)
    table = _table(gen, 70, dim, bits, width, sparsity)
    idx, bounds, psw = _bags(gen, 70, [5, 0, 17, 1, 9, 30, 2], weighted)
    assert table.layout == "block_sparse"
    ahead, under_numba, _ = _both(table, path, threads, idx, bounds, mode, psw)
    assert torch.equal(ahead, under_numba)
    assert "block_sparse_run" in _aot.status()["compiled_kernels_used"]


@pytest.mark.parametrize("dim", [32, 64, 128])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_4bit_bags_compiled_ahead_equal_numbas(dim, threads):
    gen = torch.Generator().manual_seed(dim + threads)
    table = _table(gen, 50, dim, 4, 4, 0.0, layout="dense")
    idx, bounds, psw = _bags(gen, 50, [9, 3, 0, 21, 4], True)
    for mode, weights in ((0, None), (1, None), (0, psw)):
        ahead, under_numba, _ = _both(table, None, max(threads, 2), idx, bounds, mode, weights)
        assert torch.equal(ahead, under_numba)
    assert "fused_run" in _aot.status()["compiled_kernels_used"]


@settings(max_examples=25, deadline=None)
@given(
    layout=st.sampled_from(["dense", "pruned_rows"]),
    dim=st.sampled_from([1, 3, 5, 6, 16, 37, 128]),
    bits=st.sampled_from([8, 4, 2]),
    threads=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**16),
)
def test_packed_rows_bags_compiled_ahead_equal_numbas_and_the_float_path(layout, dim, bits, threads, seed):
    """Fused rows whose qparams FBGEMM does not take (8-bit with float16, 4/2-bit with
    float32) are summed by embpress's ``packed_rows_run``: compiled ahead, bit for bit as
    under numba, and the float path's sums on the dequantized table."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(60, dim, generator=gen)
    mask = (torch.rand(60, 1, generator=gen) > 0.5).expand(60, dim) if layout == "pruned_rows" else None
    scale_dtype = torch.float16 if bits == 8 else torch.float32
    config = QuantConfig(bits=bits, layout=layout, scale_dtype=scale_dtype)
    module = QuantizedEmbeddingBag.from_float(nn.EmbeddingBag.from_pretrained(weight), config, mask=mask)
    table = module.table
    idx, bounds, psw = _bags(gen, 60, [5, 0, 17, 1, 9, 30, 2], True)
    dequantized = module.dequantize()
    for mode, weights in ((0, None), (1, None), (0, psw)):
        ahead, under_numba, _ = _both(table, None, threads, idx, bounds, mode, weights)
        assert torch.equal(ahead, under_numba)
        want = F.embedding_bag(
            idx,
            dequantized,
            bounds,
            mode=("sum", "mean")[mode],
            per_sample_weights=weights,
            include_last_offset=True,
        )
        torch.testing.assert_close(ahead, want, rtol=1e-5, atol=1e-5)
    assert "packed_rows_run" in _aot.status()["compiled_kernels_used"]


@settings(max_examples=20, deadline=None)
@given(
    dim=st.sampled_from([5, 16, 37, 64, 128, 136, 256]),
    names=st.sampled_from(
        [
            ("pruned", "rowwise8", "levels2", "colbook4"),
            ("levels1", "colbook1", "rowwise2", "colbook2"),
            ("rowwise4", "pruned"),
        ]
    ),
    threads=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**16),
)
def test_mixed_bags_compiled_ahead_equal_numbas_bit_for_bit(dim, names, threads, seed):
    from embpress.layouts.mixed import MixedTable
    from embpress.quant.codecs import Codec

    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(90, dim, generator=gen)
    classes = np.random.default_rng(seed).integers(0, len(names), 90)
    table = MixedTable.build(weight, classes, [Codec.parse(n) for n in names])
    idx, bounds, psw = _bags(gen, 90, [5, 0, 17, 1, 9, 30, 2, 40], True)
    for mode, weights in ((0, None), (1, None), (0, psw)):
        ahead, under_numba, _ = _both(table, None, threads, idx, bounds, mode, weights)
        assert torch.equal(ahead, under_numba)
    assert "mixed_run" in _aot.status()["compiled_kernels_used"]


@pytest.mark.parametrize("threads", [1, 2])
def test_out_of_range_ids_raise_from_compiled_runs(threads):
    gen = torch.Generator().manual_seed(3)
    table = _table(gen, 40, 128, 8, 4, 0.8)
    idx, bounds, _ = _bags(gen, 40, [6, 6, 6, 6], False)
    for bad in (40, -1):
        wrong = idx.clone()
        wrong[-2] = bad  # in the last run: another thread's
        with _torch_threads(threads), pytest.raises(IndexError, match="index out of range"):
            table.fast_bag(wrong, bounds, 0, None)


def test_run_kernels_take_the_tables_fields_then_the_bags_then_a_run():
    """The run kernels' parameters are what ``lookup.run_bags`` passes, in order."""
    import inspect

    from embpress.layouts import _mixed_kernels
    from embpress.layouts.lookup import BlockSparseKernelTable, FusedKernelTable, PackedRowsKernelTable
    from embpress.layouts.mixed import MixedKernelTable

    for kernel, table in (
        (_kernels.block_sparse_run, BlockSparseKernelTable),
        (_kernels.fused_run, FusedKernelTable),
        (_kernels.packed_rows_run, PackedRowsKernelTable),
        (_mixed_kernels.mixed_run, MixedKernelTable),
    ):
        parameters = list(inspect.signature(kernel.py_func).parameters)
        assert parameters == [*table._fields, *Bags._fields, "b0", "b1", "ring", "acc", "out"]


def test_the_mixed_walks_ring_fits_the_scratch_every_caller_allocates():
    """The mixed walk keeps its located ids in ``ring[p % RING]``: RING must exceed how
    far ahead it locates, be a power of two, and fit the ring ``run_bags`` allocates."""
    from embpress.layouts import _mixed_kernels
    from embpress.layouts._paths import START_RING

    ring, ahead = _mixed_kernels.RING, _mixed_kernels.AHEAD
    assert ahead < ring <= START_RING and ring & (ring - 1) == 0


def test_offsets_check_compiled_ahead_matches_numba_on_any_input():
    ref = _aot.KernelRef("embpress.layouts._kernels", "offsets_status", returns="int64")
    rng = np.random.default_rng(0)
    cases = [np.array([], np.int64), np.array([0], np.int64), np.array([1, 2], np.int64)]
    cases += [np.sort(rng.integers(0, 50, size=n)).astype(np.int64) for n in range(1, 12)]
    cases += [rng.integers(-3, 50, size=8).astype(np.int64) for _ in range(20)]
    for values in cases:
        for total in (0, 10, 49, 60):
            for last in (False, True):
                compiled = ref.compiled((values, total, last))
                assert compiled is not None
                assert compiled(values, total, last) == ref.numba(values, total, last)
    strided = np.arange(20, dtype=np.int64)[::2]  # not contiguous: numba runs it
    assert ref.compiled((strided, 40, False)) is None
    assert ref.run(strided, 40, False) == ref.numba(strided, 40, False) == 0
    assert ref.compiled((np.arange(3, dtype=np.int32), 40, False)) is not None  # its own build
    assert ref.compiled((np.arange(3), np.int32(40), False)) is None  # numba types it int32


@pytest.mark.parametrize("aot", ["1", "0"])
def test_the_offsets_check_of_large_batches_equals_numbas(monkeypatch, aot):
    # ``ops._offsets_status`` calls the compiled kernel's C entry with a block it packs
    # itself; it must give numba's answer on any bounds, and numba's own where AOT is off
    from embpress import ops

    monkeypatch.setenv("EMBPRESS_AOT", aot)
    ref = _aot.KernelRef("embpress.layouts._kernels", "offsets_status", returns="int64")
    rng = np.random.default_rng(1)
    for _ in range(60):
        n = int(rng.integers(65, 300))
        values = np.sort(rng.integers(0, 500, size=n)).astype(np.int64)
        values[0] = int(rng.choice([0, 0, 3]))
        if rng.random() < 0.3:
            values[rng.integers(1, n)] = -1  # out of order
        for total in (0, int(values.max()), int(values.max()) + 5):
            for last in (False, True):
                assert ops._offsets_status(values, total, last) == ref.numba(values, total, last)
    strided = np.arange(400, dtype=np.int64)[::2]  # not contiguous: not through the C entry
    assert ops._offsets_status(strided, 800, True) == ref.numba(strided, 800, True) == 0


def test_the_bounds_kernel_compiled_ahead_equals_numba_and_offsets_status():
    # ``offsets_bounds`` copies the offsets, appends the total and checks them in one pass:
    # its status is ``offsets_status``'s (include_last False) and, where it is 0, ``out``
    # holds exactly the offsets then the total
    ref = _aot.KernelRef("embpress.layouts._kernels", "offsets_bounds", returns="int64")
    status = _aot.KernelRef("embpress.layouts._kernels", "offsets_status", returns="int64")
    rng = np.random.default_rng(2)
    cases = [np.array([], np.int64), np.array([0], np.int64), np.array([4], np.int64)]
    cases += [np.sort(rng.integers(0, 50, size=n)).astype(np.int64) for n in range(1, 12)]
    cases += [rng.integers(-3, 50, size=8).astype(np.int64) for _ in range(20)]
    for values in cases:
        for total in (0, 10, 49, 60):
            compiled = ref.compiled((values, total, np.zeros(values.size + 1, np.int64)))
            assert compiled is not None
            outs = [np.full(values.size + 1, -7, np.int64) for _ in range(2)]
            got = compiled(values, total, outs[0])
            bounds = np.append(values, total)  # what ``offsets_status`` checks
            assert got == ref.numba(values, total, outs[1]) == status.numba(bounds, total, False)
            if got == 0:
                assert outs[0].tolist() == outs[1].tolist() == [*values.tolist(), total]


@pytest.mark.parametrize("aot", ["1", "0"])
def test_bag_bounds_of_large_batches_are_the_offsets_then_the_total(monkeypatch, aot):
    # a large batch's bounds are made by the compiled ``offsets_bounds`` (AOT on) or by
    # numpy (off): the same bounds, and nn.EmbeddingBag's errors for bad offsets
    from embpress import ops

    monkeypatch.setenv("EMBPRESS_AOT", aot)
    rng = np.random.default_rng(3)
    for n in (64, 65, 200):
        offsets = torch.from_numpy(np.sort(rng.integers(0, 900, size=n)).astype(np.int64))
        offsets[0] = 0
        ids = torch.randint(0, 10, (1000,))
        flat, bounds = ops.bag_bounds(ids, offsets, False)
        assert (ops._made_bounds(offsets, 1000) is not None) == (aot == "1")  # the path taken
        assert torch.equal(flat, ids) and bounds.tolist() == [*offsets.tolist(), 1000]
        assert bounds.data_ptr() != offsets.data_ptr()  # the caller's offsets stay its own
        with pytest.raises(RuntimeError, match=r"has to be 0.*got 5"):
            ops.bag_bounds(ids, torch.cat([offsets[:1] + 5, offsets[1:]]), False)
        bad = offsets.clone()
        bad[n // 2] = -1
        with pytest.raises(RuntimeError, match="non-decreasing"):
            ops.bag_bounds(ids, bad, False)
        with pytest.raises(RuntimeError, match="within the number of indices"):
            ops.bag_bounds(ids[: int(offsets[-1]) - 1], offsets, False)
        reference = nn.EmbeddingBag(10, 3, mode="sum")
        with pytest.raises(RuntimeError):  # torch agrees that these are errors
            reference(ids, bad)


def test_the_key_changes_with_the_source_the_cpu_and_the_argument_kinds(monkeypatch):
    key = _aot.kernel_key("m", "k", ["a1<i8", "i"], "int64")
    assert _aot.kernel_key("m", "k", ["a1<i8", "b"], "int64") != key
    assert _aot.kernel_key("m", "k", ["a1<i8", "i"], "none") != key
    monkeypatch.setattr(_aot, "_source_hash", lambda: "edited")
    assert _aot.kernel_key("m", "k", ["a1<i8", "i"], "int64") != key
    monkeypatch.undo()
    _aot._toolchain.cache_clear()
    monkeypatch.setenv("NUMBA_OPT", "1")  # numba's code settings
    assert _aot.kernel_key("m", "k", ["a1<i8", "i"], "int64") != key
    monkeypatch.undo()
    _aot._toolchain.cache_clear()
    toolchain = dict(_aot._toolchain())
    toolchain["cpu"] = ["another", "+avx2"]
    monkeypatch.setattr(_aot, "_toolchain", lambda: toolchain)
    assert _aot.kernel_key("m", "k", ["a1<i8", "i"], "int64") != key


def _fresh(monkeypatch, cache: Path) -> None:
    """This process forgets the libraries it loaded, and keeps new ones in ``cache``."""
    monkeypatch.setattr(_aot, "_loaded", {})
    monkeypatch.setattr(_aot, "_failures", {})
    monkeypatch.setattr(_aot, "_touched", set())
    monkeypatch.setenv(_aot.CACHE_ENV, str(cache))


def test_without_a_compiler_numba_runs_the_kernel_and_status_says_why(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    gen = torch.Generator().manual_seed(1)
    table = _table(gen, 30, 64, 8, 4, 0.5)
    idx, bounds, _ = _bags(gen, 30, [4, 4], False)
    out = table.fast_bag(idx, bounds, 0, None)
    monkeypatch.delenv("CC")
    monkeypatch.setenv(_aot.AOT_ENV, "0")
    _aot.enabled.cache_clear()
    assert torch.equal(out, table.fast_bag(idx, bounds, 0, None))
    assert "C compiler" in _aot.status()["numba_fallbacks"]["block_sparse_run"]
    assert not list((tmp_path / "kernels").rglob("*.so"))


def _offsets_library(ref):
    return _aot.version_dir() / (_aot.kernel_key(ref.module, ref.name, ["a1<i8", "i", "b"], "int64") + ".so")


def test_a_damaged_library_in_the_cache_is_built_again(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path)
    args = (np.array([0, 2, 5], np.int64), 5, True)
    ref = _aot.KernelRef("embpress.layouts._kernels", "offsets_status", returns="int64")
    path = _offsets_library(ref)
    path.parent.mkdir(parents=True, mode=0o700)
    path.write_bytes(b"\x7fELF not really")
    compiled = ref.compiled(args)
    assert compiled is not None and compiled(*args) == 0
    assert path.read_bytes()[:4] == b"\x7fELF" and len(path.read_bytes()) > 1000
    assert "offsets_status" not in _aot.status()["numba_fallbacks"]


def test_a_library_others_may_write_is_not_loaded(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path)
    args = (np.array([0, 2, 5], np.int64), 5, True)
    ref = _aot.KernelRef("embpress.layouts._kernels", "offsets_status", returns="int64")
    assert ref.compiled(args) is not None  # built and loaded
    os.chmod(_offsets_library(ref), 0o777)
    _fresh(monkeypatch, tmp_path)
    assert ref.compiled(args) is None
    assert ref.run(*args) == 0  # numba's
    assert "writable by others" in _aot.status()["numba_fallbacks"]["offsets_status"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the C wrapper's print
def test_a_compiled_kernel_that_raises_gives_numbas_exception():
    """Arguments no caller passes (a block width of 0) make the kernel raise: the compiled
    call reruns it under numba, whose exception reaches the caller (not a value computed
    half-way)."""
    ref = _aot.KernelRef("embpress.layouts._encode_kernels", "count_blocks", returns="none")
    mask = np.ones((3, 8), dtype=np.bool_)
    outs = [np.zeros(3, np.int64) for _ in range(3)] + [np.zeros((3, 1), np.uint32)]
    compiled = ref.compiled((mask, 4, *outs))
    assert compiled is not None
    compiled(mask, 4, *outs)
    assert outs[0].tolist() == [8, 8, 8]
    with pytest.raises(ZeroDivisionError):
        compiled(mask, 0, *outs)


def test_arguments_without_a_faithful_compiled_form_go_to_numba():
    values = np.arange(4, dtype=np.int64)
    assert _aot.arg_spec(values) == "a1<i8"
    values.flags.writeable = False
    assert _aot.arg_spec(values) is None
    assert (
        _aot.arg_spec(2**63 - 1) == "i"
        and _aot.arg_spec(2**63) is None
        and _aot.arg_spec(-(2**63) - 1) is None
    )
    assert _aot.arg_spec((1, 2**64)) is None and _aot.arg_spec((1, 2)) == "t2"
    assert _aot.arg_spec(np.float32(1.0)) is None and _aot.arg_spec(np.int32(1)) is None


def test_runs_go_on_this_thread_once_the_pool_refuses_work(monkeypatch):
    """At interpreter exit the Python pool takes no new work: a split over rows runs every
    part here (the compression's kernels; lookups split in C)."""
    from concurrent.futures import ThreadPoolExecutor

    from embpress import _finite, _parallel

    closed = ThreadPoolExecutor(max_workers=1)
    closed.shutdown()
    monkeypatch.setattr(_parallel, "thread_pool", lambda: closed)
    values = np.ones((900, 8), dtype=np.float32)
    values[[3, 450, 899], [0, 5, 7]] = np.nan
    ref = _aot.KernelRef("embpress._finite", "count_nonfinite", returns="int64")
    with _torch_threads(3):
        assert _parallel.rows_call(ref, values, rows=(0,), minimum=1) == 3
    assert _finite.count_nonfinite(values) == 3


# a kernel over a range of items, for the split's own tests: out[i] = 10 // values[i]
_RANGED = textwrap.dedent(
    """
    import numba

    @numba.njit(nogil=True)
    def ranged(values, lo, hi, scratch, out):
        for i in range(lo, hi):
            scratch[0] += 1  # this thread's own row: counts the items it took
            out[i] = 10 // values[i]
        return hi - lo
    """
)


@pytest.fixture(scope="module")
def ranged(tmp_path_factory):
    """``ranged`` compiled ahead of time (in a cache of the tests' own) and bound to
    nothing; and its KernelRef."""
    where = tmp_path_factory.mktemp("ranged")
    (where / "embpress_test_ranged.py").write_text(_RANGED)
    sys.path.insert(0, str(where))
    try:
        with _env(**{_aot.CACHE_ENV: str(where / "cache")}):
            ref = _aot.KernelRef("embpress_test_ranged", "ranged", returns="int64")
            sample = (np.ones(1, np.int64), 0, 1, np.zeros(1, np.int64), np.zeros(1, np.int64))
            compiled = ref.compiled(sample)
        assert compiled is not None, _aot.status()["numba_fallbacks"]
        yield compiled.bind(()), ref
    finally:
        sys.path.remove(str(where))


def _split_ranged(bound, values, threads, chunk, tensors=False):
    """``ranged`` split over ``values``; ``tensors``: its input and output given as torch
    tensors (of the same memory), as the lookups hand theirs over."""
    count = values.shape[0]
    scratch = lookup._per_thread(max(1, threads), 1, np.int64)
    out = np.zeros(count, np.int64)
    given = (torch.from_numpy(values), torch.from_numpy(out)) if tensors else (values, out)
    total = bound.split((given[0], 0, 0, scratch[0], given[1]), (1, 2), count, threads, chunk, {3: scratch})
    return total, out, scratch[:, 0].copy()


@settings(max_examples=40, deadline=None)
@given(count=st.integers(0, 300), threads=st.integers(1, 6), chunk=st.integers(1, 400), tensors=st.booleans())
def test_a_split_in_c_covers_every_item_once_on_any_threads_and_chunks(
    ranged, count, threads, chunk, tensors
):
    bound, _ = ranged
    values = np.arange(1, count + 1, dtype=np.int64)
    total, out, taken = _split_ranged(bound, values, threads, chunk, tensors)
    assert total == count  # the chunks' results summed
    assert out.tolist() == (10 // values).tolist()
    assert taken.sum() == count and (taken[threads:] == 0).all()  # each thread wrote its own row


def test_a_split_from_several_python_threads_at_once_gives_each_its_own_result(ranged):
    """A split started while another runs goes serially on its caller's thread."""
    from concurrent.futures import ThreadPoolExecutor

    bound, _ = ranged
    inputs = [np.arange(1, 5000 + k, dtype=np.int64) for k in range(8)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda v: _split_ranged(bound, v, 3, 17), inputs))
    for values, (total, out, _) in zip(inputs, results, strict=True):
        assert total == values.shape[0] and out.tolist() == (10 // values).tolist()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the C wrapper's print
@pytest.mark.parametrize("tensors", [False, True])
def test_a_kernel_that_raises_in_a_split_gives_numbas_exception(ranged, tensors):
    bound, _ = ranged
    values = np.arange(1, 101, dtype=np.int64)
    values[77] = 0  # in a chunk another thread may take
    with pytest.raises(ZeroDivisionError):
        _split_ranged(bound, values, 3, 5, tensors)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_split_runs_in_a_child_forked_after_its_threads_started(ranged):
    bound, _ = ranged
    values = np.arange(1, 1001, dtype=np.int64)
    assert _split_ranged(bound, values, 3, 7)[0] == 1000  # the library's threads started
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: none of the parent's threads
        ok = False
        with contextlib.suppress(BaseException):
            total, out, taken = _split_ranged(bound, values, 3, 7)
            ok = total == 1000 and out.tolist() == (10 // values).tolist() and taken.sum() == 1000
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.close(read)
    os.waitpid(pid, 0)
    assert answer == b"1"


def test_an_arrays_address_is_numpys_for_every_kind_of_array():
    arrays = [np.arange(10, dtype=np.int64), np.zeros((3, 4), np.float32), np.zeros(0, np.float32)]
    arrays.append(np.zeros((8, 8), np.uint8)[2])  # a row: its own start, not the base's
    fixed = np.ones(5, np.int32)
    fixed.flags.writeable = False  # no writable buffer: numpy's answer
    for a in [*arrays, fixed]:
        assert _aot.address(a) == a.ctypes.data
    tensor = torch.arange(6, dtype=torch.int64).view(2, 3)  # a tensor in an array's place
    assert _aot.pack(["a2<i8"], [tensor]) == [tensor.data_ptr(), 2, 3]
    assert _aot.pack(["a2<f4", "i", "f", "t2", "b"], [arrays[1], 7, -2.5, (4, 5), True]) == [
        arrays[1].ctypes.data,
        3,
        4,
        7,
        int(np.float64(-2.5).view(np.int64)),
        4,
        5,
        1,
    ]


def test_scratch_rows_of_different_threads_never_share_a_line():
    for threads, length, dtype in (
        (1, 1, np.int64),
        (3, 64, np.int64),
        (4, 36, np.float32),
        (5, 3, np.float32),
    ):
        rows = lookup._per_thread(threads, length, dtype)
        assert rows.shape == (threads, length) and not rows.any()
        starts = [rows[t].ctypes.data for t in range(threads)]
        assert all(start % lookup._LINE == 0 for start in starts)
        assert all(b - a >= length * rows.itemsize for a, b in itertools.pairwise(starts))
        assert rows.strides[0] % lookup._LINE == 0 and rows[0].flags.c_contiguous


_CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from embpress import _aot
    ref = _aot.KernelRef("embpress.layouts._kernels", "offsets_status", returns="int64")
    values = np.array([0, 3, 2], np.int64)
    compiled = ref.compiled((values, 5, True))
    status = compiled(values, 5, True) if compiled else None
    failures = _aot.status()["numba_fallbacks"]
    print(json.dumps({"compiled": compiled is not None, "status": status, "failures": failures}))
    """
)


def test_two_processes_building_one_kernel_at_once_both_get_it(tmp_path):
    env = {**os.environ, _aot.CACHE_ENV: str(tmp_path)}
    children = [
        subprocess.Popen([sys.executable, "-c", _CHILD], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [json.loads(child.communicate(timeout=300)[0]) for child in children]
    assert all(r == {"compiled": True, "status": 2, "failures": {}} for r in results), results
    assert len(list((tmp_path / "kernels").rglob("offsets_status-*.so"))) == 1
    assert not list((tmp_path / "kernels").rglob(".build-*"))  # no build left behind


_BOUNDS_CHILD = textwrap.dedent(
    """
    import numpy as np
    from embpress import _aot
    ref = _aot.KernelRef("embpress.layouts._kernels", "offsets_bounds", returns="int64")
    out = np.empty(3, np.int64)
    assert ref.compiled((np.array([0, 3], np.int64), 5, out)) is not None
    """
)


@pytest.mark.parametrize("damage", ["truncated", "bytes zeroed", "another kernel's"])
def test_a_library_damaged_after_it_was_built_is_built_again_not_run(tmp_path, damage):
    """A truncated library in the cache faulted the process in ``dlopen`` (SIGBUS), a
    damaged one or another kernel's under its name crashed it in the call (SIGSEGV):
    every library is sealed with a hash of its bytes and name, checked before it is
    opened, so such a file is built again (in a process of its own: a crash would be
    that process's)."""
    env = {**os.environ, _aot.CACHE_ENV: str(tmp_path)}

    def child(source: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", source], env=env, capture_output=True, text=True, timeout=300, check=False
        )

    assert json.loads(child(_CHILD).stdout) == {"compiled": True, "status": 2, "failures": {}}
    (path,) = (tmp_path / "kernels").rglob("offsets_status-*.so")
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "bytes zeroed":
        path.write_bytes(data[:4096] + bytes(64) + data[4096 + 64 :])
    else:
        assert child(_BOUNDS_CHILD).returncode == 0
        (other,) = (tmp_path / "kernels").rglob("offsets_bounds-*.so")
        path.write_bytes(other.read_bytes())
    with pytest.raises(OSError, match="seal does not match"):
        _aot._check_seal(path)
    done = child(_CHILD)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == {"compiled": True, "status": 2, "failures": {}}
    _aot._check_seal(path)  # built again, sealed


def test_a_truncated_entry_of_numbas_cache_is_compiled_again(tmp_path):
    """numba raised ``UnpicklingError`` on a truncated cache entry, in every later process:
    the guarded caches take it for a miss and compile the kernel again."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), _aot.AOT_ENV: "0"}
    source = textwrap.dedent(
        """
        import numpy as np
        from embpress.layouts import _kernels
        print(_kernels.offsets_status(np.array([0, 3, 2], np.int64), 5, True))
        """
    )

    def child() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", source], env=env, capture_output=True, text=True, timeout=300, check=False
        )

    assert child().stdout.strip() == "2"
    entries = list(tmp_path.rglob("*offsets_status*.nbc"))
    assert entries
    for entry in entries:
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    for _ in range(2):  # compiled again, then its new entry loads
        done = child()
        assert done.returncode == 0 and done.stdout.strip() == "2", done.stderr[-2000:]


def test_a_fresh_process_looks_up_without_importing_numba(tmp_path):
    """Once the kernels are in the cache, ``import embpress``, ``load`` and a lookup of a
    block-sparse table (on two threads) run without numba, and give the same sums."""
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(300, 128, generator=gen)
    model = nn.Sequential(nn.EmbeddingBag.from_pretrained(weight, mode="sum"))
    import embpress

    embpress.post_training_sparse_quantize(
        model,
        embpress.DataNormSparsifier,
        quant=QuantConfig(bits=8),
        sparsity_level=0.8,
        sparse_block_shape=(1, 4),
    )
    file = tmp_path / "m.safetensors"
    embpress.save(model, file)
    idx = torch.randint(0, 300, (5000,), generator=gen)
    bounds = torch.arange(0, 5000, 50)
    expected = model[0](idx, bounds)
    torch.save({"idx": idx, "bounds": bounds}, tmp_path / "ids.pt")
    child = textwrap.dedent(
        f"""
        import sys, torch
        from torch import nn
        import embpress
        torch.set_num_threads(2)
        with torch.device("meta"):
            model = nn.Sequential(nn.EmbeddingBag(300, 128, mode="sum"))
        embpress.load(model, {str(file)!r})
        ids = torch.load({str(tmp_path / "ids.pt")!r}, weights_only=True)
        torch.save(model[0](ids["idx"], ids["bounds"]), {str(tmp_path / "out.pt")!r})
        print("numba" in sys.modules, "llvmlite" in sys.modules)
        """
    )
    for _ in range(2):  # the first child may build what this process has not
        done = subprocess.run(
            [sys.executable, "-c", child], capture_output=True, text=True, timeout=300, check=True
        )
    assert done.stdout.split() == ["False", "False"], done.stdout + done.stderr
    assert torch.equal(torch.load(tmp_path / "out.pt", weights_only=True), expected)


def test_import_loads_neither_numba_nor_llvmlite():
    code = "import sys, embpress; print('numba' in sys.modules, 'llvmlite' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert done.stdout.split() == ["False", "False"]


@pytest.mark.parametrize(
    "bits, block, sparsify_first",
    [(8, (1, 4), True), (4, (1, 4), False), (8, (2, 3), True), (2, (1, 1), True)],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_compression_compiled_ahead_equals_numbas_bit_for_bit(bits, block, sparsify_first, threads):
    """The whole compression (mask, row stats, codes, records) with the kernels compiled
    ahead of time, rows split across threads, gives numba's table byte for byte."""
    import embpress

    gen = torch.Generator().manual_seed(bits + threads)
    weight = torch.randn(2600, 64, generator=gen)  # enough rows for every kernel to split
    weight[::7] = weight[::7].round()  # ties at the threshold
    tables = []
    for aot in ("1", "0"):
        model = nn.Sequential(nn.EmbeddingBag.from_pretrained(weight.clone(), mode="sum"))
        with _env(EMBPRESS_AOT=aot), _torch_threads(threads):
            embpress.post_training_sparse_quantize(
                model, embpress.DataNormSparsifier, sparsify_first, quant=QuantConfig(bits=bits),
                sparsity_level=0.7, sparse_block_shape=block,
            )  # fmt: skip
        tables.append(model[0].table)
    ahead, under_numba = tables
    assert ahead.layout == under_numba.layout
    for name, tensor in ahead.tensors().items():
        assert torch.equal(tensor, under_numba.tensors()[name]), name
    used = set(_aot.status()["compiled_kernels_used"])
    assert "encode_rows_run" in used and (sparsify_first or "count_nonfinite" in used)


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("threads", [1, 2])
def test_dense_compression_compiled_ahead_equals_numbas_bit_for_bit(bits, threads):
    """``compress``'s default path (no pruning, 4 or 2 bits: each row's min and max, then
    FBGEMM's clipping-range search) with the kernels compiled ahead of time, rows split
    across threads, gives numba's table byte for byte; rows of one value (nothing to
    search) and constant columns included."""
    import embpress

    gen = torch.Generator().manual_seed(bits + 10 * threads)
    weight = torch.randn(700, 37, generator=gen) * torch.rand(700, 1, generator=gen)
    weight[::9] = 0.5  # rows of one value
    weight[:, 3] *= 8  # outliers: where clipping pays
    tables = []
    for aot in ("1", "0"):
        model = nn.Sequential(nn.EmbeddingBag.from_pretrained(weight.clone(), mode="sum"))
        with _env(EMBPRESS_AOT=aot), _torch_threads(threads):
            embpress.post_training_sparse_quantize(
                model, embpress.DataNormSparsifier, quant=QuantConfig(bits=bits), sparsity_level=0.0
            )
        tables.append(model[0].table)
    ahead, under_numba = tables
    assert ahead.layout == under_numba.layout == "dense"
    for name, tensor in ahead.tensors().items():
        assert torch.equal(tensor, under_numba.tensors()[name]), name
    assert {"kept_minmax", "greedy_ranges_run"} <= set(_aot.status()["compiled_kernels_used"])


def test_search_scratch_width_agrees_with_the_kernel():
    from embpress.quant import _search
    from embpress.quant.rowwise import search_scratch_width

    for cols in (1, 7, 8, 9, 64, 100, 128, 129):
        assert search_scratch_width(cols) == _search.padded_width.py_func(cols)


@pytest.mark.parametrize("masked", [False, True])
def test_range_search_is_the_same_however_rows_are_split(masked):
    """Rows are searched in pairs (2k with 2k + 1), so a row's range does not depend on
    where a thread's rows start or end (at even rows), nor on the thread count, and the
    compiled kernel gives numba's parallel kernel's ranges; a row of one value keeps its
    range."""
    from embpress.quant import _search

    gen = np.random.default_rng(5)
    rows, cols = 301, 40
    w = gen.standard_normal((rows, cols)).astype(np.float32)
    w[7] = 1.5  # nothing to search
    kept = gen.random((rows, cols)) < (0.4 if masked else 1.0)
    kept[:, 0] = True
    lo = np.where(kept, w, np.inf).min(1).astype(np.float32)
    hi = np.where(kept, w, -np.inf).max(1).astype(np.float32)
    width = _search.padded_width.py_func(cols)
    results = []
    for cuts in ([0, rows], [0, 2, 150, 300, rows], [0, 64, 128, 192, 256, rows]):
        a, b = lo.copy(), hi.copy()
        for r0, r1 in itertools.pairwise(cuts):
            scratch = (np.zeros(width, np.float32), np.zeros(width, np.float32))
            _search.greedy_ranges_run(w, kept, masked, a, b, 4, 200, 0.16, r0, r1, *scratch)
        results.append((a, b))
    a, b = lo.copy(), hi.copy()
    _search.greedy_ranges(w, kept, masked, a, b, 4, 200, 0.16)
    results.append((a, b))
    for a, b in results[1:]:
        np.testing.assert_array_equal(a, results[0][0])
        np.testing.assert_array_equal(b, results[0][1])
    assert results[0][0][7] == results[0][1][7] == 1.5
    assert bool((results[0][0] >= lo).all() and (results[0][1] <= hi).all())
    assert bool((results[0][0] > lo).any() or (results[0][1] < hi).any())


# settings of post_training_sparse_quantize: sparsify_first, bits, block, sparsity
_UNIFORM_SETTINGS = [
    (True, 4, (1, 4), 0.0),  # embpress compress's default: 4 bits, no pruning
    (True, 8, (1, 4), 0.8),
    (False, 4, (1, 4), 0.5),  # quantize-first
    (True, 8, (2, 3), 0.5),  # a block shape of its own kernels
    (True, 2, (1, 64), 0.5),
]


def test_a_fresh_process_compresses_without_importing_numba(tmp_path):
    """Uniform compressions (both orders, several block shapes, ``compress``'s default) in
    a fresh process, once the kernels are in the cache: no numba, and the tables this
    process makes."""
    import embpress

    weight = torch.randn(500, 64, generator=torch.Generator().manual_seed(4))
    torch.save(weight, tmp_path / "w.pt")
    expected = []
    for first, bits, block, level in _UNIFORM_SETTINGS:
        model = nn.Sequential(nn.EmbeddingBag.from_pretrained(weight.clone(), mode="sum"))
        embpress.post_training_sparse_quantize(
            model, embpress.DataNormSparsifier, first, quant=QuantConfig(bits=bits),
            sparsity_level=level, sparse_block_shape=block,
        )  # fmt: skip
        expected.append(model[0].table)
    child = textwrap.dedent(
        f"""
        import sys, torch
        from torch import nn
        import embpress
        weight = torch.load({str(tmp_path / "w.pt")!r}, weights_only=True)
        for i, (first, bits, block, level) in enumerate({_UNIFORM_SETTINGS!r}):
            model = nn.Sequential(nn.EmbeddingBag.from_pretrained(weight.clone(), mode="sum"))
            embpress.post_training_sparse_quantize(
                model, embpress.DataNormSparsifier, first, quant=embpress.QuantConfig(bits=bits),
                sparsity_level=level, sparse_block_shape=block,
            )
            embpress.save(model, {str(tmp_path)!r} + f"/m{{i}}.safetensors")
        print("numba" in sys.modules)
        """
    )
    for _ in range(2):  # the first child may build what this process has not
        done = subprocess.run(
            [sys.executable, "-c", child], capture_output=True, text=True, timeout=300, check=True
        )
    assert done.stdout.split() == ["False"], done.stdout + done.stderr
    for i, table in enumerate(expected):
        loaded = nn.Sequential(nn.EmbeddingBag(500, 64, mode="sum"))
        embpress.load(loaded, tmp_path / f"m{i}.safetensors")
        assert loaded[0].table.layout == table.layout
        for name, tensor in table.tensors().items():
            assert torch.equal(tensor, loaded[0].table.tensors()[name]), (i, name)


def test_encode_scratch_sizes_agree_with_the_kernels():
    from embpress.layouts import _encode_kernels
    from embpress.layouts.encode import encode_scratch_sizes

    for cols in (1, 3, 7, 8, 9, 64, 100, 128, 129, 1000):
        for width in (1, 3, 4, 8, cols):
            assert encode_scratch_sizes(cols, width) == _encode_kernels.scratch_sizes.py_func(cols, width)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_pruned_row_remap_compiled_ahead_equals_numbas(monkeypatch, threads):
    from embpress.layouts import pruned_rows

    monkeypatch.setattr(pruned_rows, "_IDS_PER_THREAD", 1)
    gen = torch.Generator().manual_seed(threads)
    weight = torch.randn(200, 16, generator=gen)
    weight[::3] = 0  # whole rows pruned
    table = QuantizedEmbeddingBag.from_float(
        nn.EmbeddingBag.from_pretrained(weight), QuantConfig(bits=8, layout="pruned_rows"), mask=weight != 0
    ).table
    idx, bounds, psw = _bags(gen, 200, [40, 3, 0, 77], True)
    with _torch_threads(threads):
        ahead = table.fast_bag(idx, bounds, 0, psw)
        with _env(EMBPRESS_AOT="0"):
            under_numba = table.fast_bag(idx, bounds, 0, psw)
        assert torch.equal(ahead, under_numba)
        wrong = idx.clone()
        wrong[-1] = 200
        with pytest.raises(IndexError, match="index out of range"):
            table.fast_bag(wrong, bounds, 0, None)
    assert "remap_rows" in _aot.status()["compiled_kernels_used"]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_threshold_split_across_threads_gives_the_same_mask(monkeypatch, threads):
    """The k-th smallest block norm (histograms per thread, summed) and the marks (ties:
    the first ones in row-major order) do not depend on how the values are split."""
    from embpress.sparsify import data_norm

    gen = torch.Generator().manual_seed(threads)
    weight = torch.randn(300, 16, generator=gen).round(decimals=1)  # many ties
    whole = block_norm_mask(weight, 0.6, (1, 4))
    monkeypatch.setattr(data_norm, "_VALUES_PER_THREAD", 7)
    with _torch_threads(threads):
        split = block_norm_mask(weight, 0.6, (1, 4))
        with _env(EMBPRESS_AOT="0"):
            under_numba = block_norm_mask(weight, 0.6, (1, 4))
    assert torch.equal(split, whole) and torch.equal(split, under_numba)
    assert int((~split).sum()) == round(0.6 * 300 * 4) * 4


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mapped files")
@pytest.mark.skipif(not torch.backends.openmp.is_available(), reason="torch without OpenMP")
def test_the_team_is_torchs_own_openmp_runtime_unless_turned_off(monkeypatch):
    _aot._openmp_team.cache_clear()
    try:
        team = _aot._openmp_team()
        assert team is not None
        name, parallel, thread_num = team
        assert Path(name).name.startswith(_aot._OPENMP_RUNTIMES) and parallel and thread_num
        assert Path(name).resolve().is_relative_to(Path(torch.__file__).resolve().parent)
        assert _aot.status()["thread_team"] == name
        _aot._openmp_team.cache_clear()
        monkeypatch.setenv("EMBPRESS_OPENMP_TEAM", "0")
        assert _aot._openmp_team() is None and _aot.status()["thread_team"] is None
    finally:
        _aot._openmp_team.cache_clear()
        monkeypatch.undo()
        _aot._openmp_team()  # this process's libraries keep the team they were given


# a two-thread block-sparse lookup's table and ids, split into every batch (scripts below)
_SPLIT_SETUP = """
import os, sys
import numpy as np, torch
from torch import nn
from embpress import QuantConfig, QuantizedEmbeddingBag, _aot
from embpress.layouts import lookup
from embpress.sparsify import block_norm_mask

lookup._IDS_PER_THREAD = 1  # every batch split
torch.set_num_threads(2)
gen = torch.Generator().manual_seed(5)
weight = torch.randn(3000, 64, generator=gen)
bag = QuantizedEmbeddingBag.from_float(
    nn.EmbeddingBag.from_pretrained(weight, mode="sum"), QuantConfig(bits=4, layout="block_sparse"),
    mask=block_norm_mask(weight, 0.8, (1, 4)), block_width=4,
)
ids = torch.randint(0, 3000, (20000,), generator=gen)
offsets = torch.arange(0, 20000, 10)
"""

_TEAM_SCRIPT = (
    _SPLIT_SETUP
    + """
torch.mm(torch.randn(600, 600), torch.randn(600, 600))  # torch's OpenMP threads are up
tasks = len(os.listdir("/proc/self/task"))
with torch.inference_mode():
    out = bag(ids, offsets)
    plain = bag._generic(ids, torch.cat([offsets, torch.tensor([20000])]), None)
grew = len(os.listdir("/proc/self/task")) - tasks  # threads the split started
child = -1
if sys.argv[1] == "fork":  # a forked child splits too (libgomp's team does not survive a fork)
    pid = os.fork()
    if pid == 0:
        import faulthandler
        faulthandler.dump_traceback_later(60, exit=True)  # a hang fails the test
        same = np.array_equal(bag(ids, offsets).numpy(), out.numpy())  # no torch op: torch's own would hang
        os._exit(0 if same else 3)
    child = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
np.save(sys.argv[2], out.numpy())
print("team", _aot.status()["thread_team"] is not None, "grew", grew, "child", child,
      "close", bool(torch.allclose(out, plain, rtol=1e-5, atol=1e-5)))
"""
)


_FIRST_IN_CHILD_SCRIPT = (
    _SPLIT_SETUP
    + """
if sys.argv[2] == "warm":  # a process of its own builds the library into the cache
    with torch.inference_mode():
        bag(ids, offsets)
    sys.exit(0)
torch.mm(torch.randn(600, 600), torch.randn(600, 600))  # torch's OpenMP threads are up
pid = os.fork()  # before any lookup: the child opens the lookup's library first
if pid == 0:
    import faulthandler
    faulthandler.dump_traceback_later(60, exit=True)  # a hang fails the test
    with torch.inference_mode():
        out = bag(ids, offsets)  # no other torch op: torch's own would hang
    np.save(sys.argv[1], out.numpy())
    os._exit(0 if _aot.status()["thread_team"] is None else 4)
child = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
with torch.inference_mode():
    same = np.array_equal(np.load(sys.argv[1]), bag(ids, offsets).numpy())
print("child", child, "same", same, "team", _aot.status()["thread_team"] is not None)
"""
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
@pytest.mark.skipif(not torch.backends.openmp.is_available(), reason="torch without OpenMP")
def test_a_child_that_opens_a_kernel_first_splits_on_the_pool(tmp_path):
    # a library first opened in a fork's child must not take up torch's OpenMP team
    # (libgomp's threads did not survive the fork: its parallel call hung): the child's
    # lookup splits on the pool, with the parent's sums bit for bit
    for step in ("warm", "fork"):  # (a child that had to build it might outlast its watchdog)
        done = subprocess.run(
            [sys.executable, "-c", _FIRST_IN_CHILD_SCRIPT, str(tmp_path / "child.npy"), step],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "EMBPRESS_OPENMP_TEAM": "1"},
        )
        assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["child", "0", "same", "True", "team", "True"]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
@pytest.mark.skipif(not torch.backends.openmp.is_available(), reason="torch without OpenMP")
def test_splits_run_on_torchs_openmp_team_else_on_the_pool_with_the_same_sums(tmp_path):
    # with torch's OpenMP team the split starts no thread of its own; with
    # EMBPRESS_OPENMP_TEAM=0 the library's pool starts one; the sums are the same bit for
    # bit, and a child forked after a split on the team splits on the pool
    runs = {}
    for team in ("1", "0"):
        env = {**os.environ, "EMBPRESS_OPENMP_TEAM": team}
        out = tmp_path / f"{team}.npy"
        mode = "fork" if team == "1" else "plain"
        done = subprocess.run(
            [sys.executable, "-c", _TEAM_SCRIPT, mode, str(out)],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        runs[team] = (done.stdout.split(), np.load(out))
    team_says, pool_says = runs["1"][0], runs["0"][0]
    assert team_says == ["team", "True", "grew", "0", "child", "0", "close", "True"]
    assert pool_says == ["team", "False", "grew", "1", "child", "-1", "close", "True"]
    assert np.array_equal(runs["1"][1], runs["0"][1])
