"""QuantizedEmbedding / QuantizedEmbeddingBag: every layout, every nn input form, same answers."""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from embpress import (
    DataNormSparsifier,
    QuantConfig,
    QuantizedEmbedding,
    QuantizedEmbeddingBag,
    post_training_sparse_quantize,
)
from embpress.layouts import TABLE_CLASSES, KernelPolicy, kernel_policy, lookup
from embpress.ops import bag_bounds
from embpress.sparsify import block_norm_mask
from tests.conftest import torch_threads as _torch_threads

LAYOUTS = ["dense", "pruned_rows", "block_sparse"]
ROWS, DIM = 300, 20


def _bag(layout, bits=8, mode="sum", sparsity=0.6, block=(1, 4), **kwargs):
    torch.manual_seed(1)
    float_bag = nn.EmbeddingBag(ROWS, DIM, mode=mode, **kwargs)
    mask = block_norm_mask(float_bag.weight, sparsity, block)
    q = QuantizedEmbeddingBag.from_float(
        float_bag, QuantConfig(bits=bits, layout=layout), mask=mask, block_width=block[1]
    )
    ref = nn.EmbeddingBag.from_pretrained(q.dequantize(), mode=mode, freeze=True, **kwargs)
    return q, ref, mask


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _fast_bag_on_and_off(table, switch, threads, *args):
    """``table.fast_bag(*args)`` with the ``KernelPolicy`` field ``switch`` on, then off, on
    ``threads`` threads, the first by argument, the second in a ``kernel_policy`` block;
    both must have served (not None)."""
    with _torch_threads(threads):
        on = table.fast_bag(*args, policy=KernelPolicy(**{switch: True}))
        with kernel_policy(**{switch: False}):
            off = table.fast_bag(*args)
    assert on is not None and off is not None
    return on, off


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("block", [(1, 4), (1, DIM), (1, 1), (2, 3)])
def test_pruned_entries_decode_to_exact_zero(layout, bits, block):
    q, _, mask = _bag(layout, bits, block=block)
    table = q.dequantize()
    assert q.layout == layout
    assert bool((table[~mask] == 0).all())
    assert q.sparsity == pytest.approx(float((~mask).float().mean()))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_bag_forms_match_nn_on_dequantized(layout, bits, mode):
    q, ref, _ = _bag(layout, bits, mode)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, ROWS, (57,), generator=g)
    offsets = torch.tensor([0, 3, 3, 10, 30, 56])  # includes an empty bag
    _close(q(idx, offsets), ref(idx, offsets))
    _close(q(idx.int(), offsets.int()), ref(idx, offsets))
    two_d = torch.randint(0, ROWS, (6, 5), generator=g)
    _close(q(two_d), ref(two_d))
    if mode == "sum":
        w = torch.rand(57, generator=g)
        _close(q(idx, offsets, per_sample_weights=w), ref(idx, offsets, per_sample_weights=w))
        w2 = torch.rand(6, 5, generator=g)
        _close(q(two_d, per_sample_weights=w2), ref(two_d, per_sample_weights=w2))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_include_last_offset_and_padding_idx(layout):
    for mode in ("sum", "mean", "max"):
        q, ref, _ = _bag(layout, mode=mode, include_last_offset=True, padding_idx=7)
        idx = torch.tensor([7, 1, 2, 7, 7, 4, 5, 7])
        offsets = torch.tensor([0, 2, 5, 5, 8])
        _close(q(idx, offsets), ref(idx, offsets))
        q2, ref2, _ = _bag(layout, mode=mode, padding_idx=7)
        _close(q2(idx, offsets[:-1]), ref2(idx, offsets[:-1]))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_max_norm_matches_nn(layout):
    q, ref, _ = _bag(layout, mode="mean", max_norm=0.5)
    idx = torch.randint(0, ROWS, (20,))
    offsets = torch.tensor([0, 5, 12])
    _close(q(idx, offsets), ref(idx, offsets))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_embedding_any_index_shape(layout, bits):
    torch.manual_seed(3)
    emb = nn.Embedding(ROWS, DIM, padding_idx=0)
    mask = block_norm_mask(emb.weight, 0.7, (1, 4))
    q = QuantizedEmbedding.from_float(emb, QuantConfig(bits=bits, layout=layout), mask=mask, block_width=4)
    table = q.dequantize()
    for shape in [(), (5,), (3, 4), (2, 3, 4), (0,), (2, 0)]:
        idx = torch.randint(0, ROWS, shape)
        out = q(idx)
        assert out.shape == (*shape, DIM)
        assert torch.equal(out, F.embedding(idx, table))


def test_embedding_max_norm():
    emb = nn.Embedding(50, 8, max_norm=1.0)
    q = QuantizedEmbedding.from_float(emb)
    idx = torch.tensor([[1, 2], [3, 49]])
    ref = nn.Embedding.from_pretrained(q.dequantize(), max_norm=1.0)
    _close(q(idx), ref(idx))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_out_of_range_and_bad_dtype(layout):
    q, _, _ = _bag(layout)
    with pytest.raises(IndexError):
        q(torch.tensor([0, ROWS]), torch.tensor([0]))
    with pytest.raises(IndexError):
        q(torch.tensor([-1]), torch.tensor([0]))
    with pytest.raises(TypeError):
        q(torch.tensor([0.0]), torch.tensor([0]))
    emb = QuantizedEmbedding.from_float(nn.Embedding(10, 4), QuantConfig(layout=layout))
    with pytest.raises(IndexError):
        emb(torch.tensor([10]))


def test_bag_argument_errors_mirror_nn():
    q, ref, _ = _bag("dense", mode="mean")
    idx = torch.tensor([1, 2, 3])
    for module in (q, ref):
        with pytest.raises(NotImplementedError):
            module(idx, torch.tensor([0]), per_sample_weights=torch.ones(3))
        with pytest.raises(ValueError):
            module(idx.view(1, 3), torch.tensor([0]))
        with pytest.raises(ValueError):
            module(idx)
        with pytest.raises(ValueError):
            module(idx.view(1, 1, 3))
        with pytest.raises(RuntimeError):
            module(idx, torch.tensor([1, 2]))


def test_layouts_agree_without_sparsity():
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(ROWS, DIM)
    tables = [
        QuantizedEmbeddingBag.from_float(bag, QuantConfig(bits=4, layout=lay)).dequantize() for lay in LAYOUTS
    ]
    for a, b in itertools.combinations(tables, 2):
        assert torch.equal(a, b)


def test_auto_picks_the_smallest_layout():
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(1000, 64)
    for block, expected in [((1, 4), "block_sparse"), ((1, 64), "pruned_rows")]:
        mask = block_norm_mask(bag.weight, 0.8, block)
        sizes = {}
        for lay in [*LAYOUTS, "auto"]:
            q = QuantizedEmbeddingBag.from_float(
                bag, QuantConfig(layout=lay), mask=mask, block_width=block[1]
            )
            sizes[lay] = q.nbytes
            if lay == "auto":
                assert q.layout == expected
        assert sizes["auto"] == min(sizes[lay] for lay in LAYOUTS)
    assert QuantizedEmbeddingBag.from_float(bag).layout == "dense"


def test_bytes_fall_with_sparsity_and_bits():
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(2000, 64)
    sizes = []
    for level in (0.0, 0.5, 0.8, 0.95):
        mask = block_norm_mask(bag.weight, level, (1, 4))
        row = [
            QuantizedEmbeddingBag.from_float(bag, QuantConfig(bits=b), mask=mask, block_width=4).nbytes
            for b in (8, 4, 2)
        ]
        assert row[0] > row[1] > row[2]
        sizes.append(row)
    for earlier, later in itertools.pairwise(sizes):
        assert all(a > b for a, b in zip(earlier, later, strict=True))
    assert sizes[0][0] == 2000 * (64 + 8)  # dense 8-bit: codes + fp32 scale and offset


def test_nbytes_counts_every_buffer_and_repr_reports():
    q, _, _ = _bag("block_sparse")
    assert q.nbytes == sum(b.numel() * b.element_size() for b in q.buffers())
    text = repr(q)
    assert "bits=8" in text and "block_sparse" in text and "ratio_to_float32" in text


def test_fast_kernels_match_generic_path():
    for layout in LAYOUTS:
        for bits in (8, 4, 2):
            for mode in ("sum", "mean"):
                q, _, _ = _bag(layout, bits, mode)
                idx = torch.randint(0, ROWS, (400,))
                offsets = torch.arange(0, 400, 8)
                flat, bounds = bag_bounds(idx, offsets, False)
                fast = q.table.fast_bag(flat, bounds, 0 if mode == "sum" else 1, None)
                assert fast is not None
                _close(fast, q._generic(flat, bounds, None))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_plain_torch_path(layout):
    q, ref, _ = _bag(layout, 4, "mean")
    qc, refc = q.to("cuda"), ref.to("cuda")
    idx = torch.randint(0, ROWS, (50,), device="cuda")
    offsets = torch.tensor([0, 10, 20, 49], device="cuda")
    out = qc(idx, offsets)
    assert out.device.type == "cuda"
    _close(out, refc(idx, offsets))


@settings(max_examples=40, deadline=None)
@given(
    dim=st.sampled_from([32, 64, 128, 256, 36]),
    bits=st.sampled_from([8, 4, 2]),
    sparsity=st.sampled_from([0.0, 0.5, 0.8, 0.97]),
    mode=st.sampled_from(["sum", "mean"]),
    weighted=st.booleans(),
    scale_dtype=st.sampled_from([torch.float32, torch.float16]),
    bag_sizes=st.lists(st.integers(0, 40), min_size=1, max_size=20),
    seed=st.integers(0, 2**16),
    threads_used=st.sampled_from([1, 2]),
)
def test_block_sparse_kernel_both_decodes_match_generic(
    dim, bits, sparsity, mode, weighted, scale_dtype, bag_sizes, seed, threads_used
):
    """The vector decode (whole bitmap words, where the CPU and shape allow) and the bit
    walk both equal the plain-torch bag over the decoded rows, for every word width (8, 16,
    32 bits, and rows of two words), weights, mean, empty bags and repeated ids."""
    gen = torch.Generator().manual_seed(seed)
    rows = 70  # not a multiple of the 16-row group: the last group is partial
    weight = torch.randn(rows, dim, generator=gen)
    weight[3] = 0.0  # a row with every block pruned
    mask = block_norm_mask(weight, sparsity, (1, 4))
    config = QuantConfig(bits=bits, layout="block_sparse", scale_dtype=scale_dtype)
    q = QuantizedEmbeddingBag.from_float(
        nn.EmbeddingBag.from_pretrained(weight, mode=mode), config, mask=mask, block_width=4
    )
    assert q.table.layout == "block_sparse"
    idx = torch.randint(0, rows, (sum(bag_sizes),), generator=gen)
    bounds = torch.tensor([0, *itertools.accumulate(bag_sizes)])
    psw = torch.rand(idx.numel(), generator=gen) if weighted and mode == "sum" else None
    expected = q._generic(idx, bounds, psw)
    code = 0 if mode == "sum" else 1
    # two threads: the bags split into two runs, each primed on its own
    vector, walk = _fast_bag_on_and_off(q.table, "vector_decode", threads_used, idx, bounds, code, psw)
    _close(vector, expected)
    _close(walk, expected)


def test_block_sparse_vector_decode_is_used_where_it_applies():
    """The shapes the vector decode serves take it on a CPU that has it (this test
    machine's CPU does; elsewhere it says so and checks the bit walk is picked)."""
    from embpress.layouts._kernels import vector_decode_supported

    cases = [
        (128, 8, True),
        (64, 4, True),
        (256, 8, True),
        (36, 8, False),
        (128, 2, True),
        (32, 2, True),
        (36, 2, False),
    ]
    for dim, bits, expected in cases:
        weight = torch.randn(40, dim)
        mask = block_norm_mask(weight, 0.5, (1, 4))
        q = QuantizedEmbeddingBag.from_float(
            nn.EmbeddingBag.from_pretrained(weight),
            QuantConfig(bits=bits, layout="block_sparse"),
            mask=mask,
            block_width=4,
        )
        assert q.table._vector_decode() == (expected and vector_decode_supported(bits))


def test_block_sparse_vector_decode_out_of_range():
    weight = torch.randn(40, 128)
    mask = block_norm_mask(weight, 0.8, (1, 4))
    q = QuantizedEmbeddingBag.from_float(
        nn.EmbeddingBag.from_pretrained(weight),
        QuantConfig(bits=8, layout="block_sparse"),
        mask=mask,
        block_width=4,
    )
    for bad in (40, -1):
        with pytest.raises(IndexError, match="out of range"):
            q(torch.tensor([1, bad, 2]), torch.tensor([0, 2]))


@settings(max_examples=30, deadline=None)
@given(
    layout=st.sampled_from(["dense", "pruned_rows"]),
    dim=st.sampled_from([32, 64, 128, 96]),
    mode=st.sampled_from(["sum", "mean"]),
    weighted=st.booleans(),
    bag_sizes=st.lists(st.integers(0, 12), min_size=1, max_size=20),
    seed=st.integers(0, 2**16),
)
def test_fused_rows_own_kernel_matches_fbgemm_and_generic(layout, dim, mode, weighted, bag_sizes, seed):
    """4-bit fused rows on several threads (embpress's kernel where it serves, FBGEMM's
    otherwise) give the plain-torch bag over the decoded rows, as FBGEMM's kernel does."""
    gen = torch.Generator().manual_seed(seed)
    rows = 50
    weight = torch.randn(rows, dim, generator=gen)
    mask = block_norm_mask(weight, 0.5, (1, dim)) if layout == "pruned_rows" else None
    q = QuantizedEmbeddingBag.from_float(
        nn.EmbeddingBag.from_pretrained(weight, mode=mode),
        QuantConfig(bits=4, layout=layout),
        mask=mask,
        block_width=dim,
    )
    idx = torch.randint(0, rows, (sum(bag_sizes),), generator=gen)
    bounds = torch.tensor([0, *itertools.accumulate(bag_sizes)])
    psw = torch.rand(idx.numel(), generator=gen) if weighted and mode == "sum" else None
    code = 0 if mode == "sum" else 1
    expected = q._generic(idx, bounds, psw)
    from embpress.layouts import base

    with (  # every batch splits, and embpress's 4-bit kernel takes it
        mock.patch.object(lookup, "_IDS_PER_THREAD", 1),
        mock.patch.object(base, "OWN_FUSED_IDS_PER_THREAD", 1),
    ):
        own, fbgemm = _fast_bag_on_and_off(q.table, "fused_kernel", 2, idx, bounds, code, psw)
    _close(own, expected)
    _close(fbgemm, expected)


def test_a_batch_too_small_to_split_stays_with_fbgemms_4bit_kernel(monkeypatch):
    """On several threads, embpress's 4-bit kernel takes only batches it splits with
    ``OWN_FUSED_IDS_PER_THREAD`` ids a thread (a thread of it is slower than FBGEMM's
    one-thread kernel); the sums are the same either way."""
    from embpress.layouts import base

    q = QuantizedEmbeddingBag.from_float(nn.EmbeddingBag(60, 64), QuantConfig(bits=4, layout="dense"))
    small = torch.randint(0, 60, (2 * base.OWN_FUSED_IDS_PER_THREAD - 1,))
    large = torch.randint(0, 60, (2 * base.OWN_FUSED_IDS_PER_THREAD,))
    calls = []
    real = base.run_bags
    monkeypatch.setattr(base, "run_bags", lambda *a, **k: calls.append(1) or real(*a, **k))
    with _torch_threads(2):
        for idx in (small, large):
            offsets = torch.arange(0, idx.numel(), 8)
            bounds = torch.cat([offsets, torch.tensor([idx.numel()])])
            assert torch.allclose(q(idx, offsets), q._generic(idx, bounds, None), atol=1e-4)
            assert len(calls) == (idx is large)


@pytest.mark.parametrize("dim", [32, 64, 128])
def test_fused_bag_kernel_counts_bad_ids(dim):
    """The fused-row kernel gives FBGEMM's sums on valid ids and counts out-of-range ones."""
    from embpress.layouts._kernels import fused_bag, vector_decode_supported

    if not vector_decode_supported(4):
        pytest.skip("this CPU lacks the AVX-512 expanding loads the kernel compiles to")
    weight = torch.randn(30, dim)
    bag = nn.EmbeddingBag.from_pretrained(weight, mode="sum")
    q = QuantizedEmbeddingBag.from_float(bag, QuantConfig(bits=4))
    fused = q.table.fused
    idx = torch.randint(0, 30, (60,))
    bounds = torch.arange(0, 61, 6)
    out = torch.empty(10, dim).numpy()
    empty = torch.zeros(0).numpy()
    args = (fused.numpy().reshape(-1), fused.shape[1], dim)
    assert fused_bag(*args, idx.numpy(), bounds.numpy(), empty, False, False, 2, out) == 0
    _close(torch.from_numpy(out), q._generic(idx, bounds, None))
    idx[7] = 30
    idx[50] = -1
    assert fused_bag(*args, idx.numpy(), bounds.numpy(), empty, False, False, 2, out) == 2


def test_fused_rows_own_kernel_out_of_range():
    q = QuantizedEmbeddingBag.from_float(nn.EmbeddingBag(40, 128), QuantConfig(bits=4, layout="dense"))
    with _torch_threads(2):
        for bad in (40, -1):
            with pytest.raises(IndexError, match="out of range"):
                q(torch.tensor([1, bad, 2]), torch.tensor([0, 2]))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("threads", [1, 2])
def test_an_out_of_range_id_anywhere_in_a_dense_batch_is_an_index_error(bits, threads):
    """torch's FBGEMM kernels word the error differently on one thread and on several;
    the modules raise nn.Embedding's IndexError wherever the bad id sits."""
    bag = QuantizedEmbeddingBag.from_float(nn.EmbeddingBag(50, 16), QuantConfig(bits=bits, layout="dense"))
    emb = QuantizedEmbedding.from_float(nn.Embedding(50, 16), QuantConfig(bits=bits, layout="dense"))
    with _torch_threads(threads):
        for pos in (0, 20, 39, 4095):
            ids = torch.zeros(4096, dtype=torch.int64)
            ids[pos] = 50 if pos % 2 else -1
            with pytest.raises(IndexError, match="out of range"):
                bag(ids, torch.arange(0, 4096, 4))
            with pytest.raises(IndexError, match="out of range"):
                emb(ids)


@pytest.mark.parametrize("layout", ["dense", "block_sparse", "pruned_rows"])
def test_strided_ids_look_up_as_nn_does(layout):
    """Ids that are a strided view (a column slice, 1-D or 2-D) give nn's rows: the kernels
    read them as a contiguous copy."""
    g = torch.Generator().manual_seed(0)
    config = QuantConfig(bits=8, layout=layout)
    bag = QuantizedEmbeddingBag.from_float(nn.EmbeddingBag(10, 16, mode="sum"), config)
    emb = QuantizedEmbedding.from_float(nn.Embedding(10, 16), config)
    ids2 = torch.randint(0, 10, (3, 8), generator=g)[:, ::2]
    ids1 = torch.randint(0, 10, (12,), generator=g)[::2]
    assert not ids2.is_contiguous() and not ids1.is_contiguous()
    _close(bag(ids2), F.embedding_bag(ids2, bag.dequantize(), mode="sum"))
    _close(emb(ids2), F.embedding(ids2, emb.dequantize()))
    _close(emb(ids1), F.embedding(ids1, emb.dequantize()))


def test_generic_ir_of_the_vector_decode_gives_the_same_sums(monkeypatch):
    """Where the CPU lacks the AVX-512 expands, the kernels emit generic IR in their place
    (LLVM cannot compile an x86-only intrinsic there, taken or not). That IR is compiled
    afresh here and run through the vector paths: it gives the same sums."""
    import numba

    from embpress.layouts import _kernels, _paths, block_sparse

    if not _kernels.vector_decode_supported(4):
        pytest.skip("this CPU lacks the AVX-512 expands the vector decode compiles to")
    monkeypatch.setattr(_paths, "_host_has", lambda feature: False)
    fused_bag = numba.njit(parallel=True)(_kernels.fused_bag.py_func)
    block_sparse_bag = numba.njit(parallel=True)(_kernels.block_sparse_bag.py_func)
    weight = torch.randn(40, 128)
    idx = torch.randint(0, 40, (90,))
    bounds = torch.arange(0, 91, 9)
    empty = torch.zeros(0).numpy()

    dense = QuantizedEmbeddingBag.from_float(
        nn.EmbeddingBag.from_pretrained(weight, mode="sum"), QuantConfig(bits=4, layout="dense")
    )
    out = torch.empty(10, 128)
    fused = dense.table.fused
    args = (
        fused.numpy().reshape(-1),
        fused.shape[1],
        128,
        idx.numpy(),
        bounds.numpy(),
        empty,
        False,
        False,
        2,
    )
    assert fused_bag(*args, out.numpy()) == 0
    _close(out, dense._generic(idx, bounds, None))

    mask = block_norm_mask(weight, 0.7, (1, 4))
    sparse = QuantizedEmbeddingBag.from_float(
        nn.EmbeddingBag.from_pretrained(weight, mode="sum"), QuantConfig(bits=4), mask=mask, block_width=4
    )
    monkeypatch.setattr(block_sparse, "block_sparse_bag", block_sparse_bag)
    monkeypatch.setattr(block_sparse, "block_sparse_run", None)  # numba's kernel, not a compiled one
    with _torch_threads(2):
        out = sparse.table.fast_bag(idx, bounds, 0, None)
    assert out is not None
    _close(out, sparse._generic(idx, bounds, None))


def test_lookups_compile_and_agree_for_a_cpu_without_avx512(tmp_path):
    """Compiled for a CPU without AVX-512 (numba told to target Haswell, in a fresh process
    with its own kernel cache), the AVX2 path is chosen, AVX-512 cannot be forced, and
    block-sparse lookups on the AVX2 and generic paths match the plain-torch bags: no
    AVX-512 instruction reaches that compile. The tables it encodes (masks, block counts,
    records) are byte for byte the ones this process encodes."""
    script = """
import hashlib
import torch
from torch import nn
from embpress import QuantConfig, QuantizedEmbeddingBag
from embpress.layouts.lookup import KernelPolicy, kernel_path, kernel_paths
from embpress.sparsify import block_norm_mask

assert kernel_paths() == ("avx2", "generic") and kernel_path() == "avx2", kernel_paths()
try:
    KernelPolicy(path="avx512")
    raise SystemExit("avx512 was accepted")
except ValueError:
    pass
torch.manual_seed(0)
weight = torch.randn(50, 128)
mask = block_norm_mask(weight, 0.7, (1, 4))
idx = torch.randint(0, 50, (120,))
bounds = torch.arange(0, 121, 12)
for bits in (8, 4):
    bag = QuantizedEmbeddingBag.from_float(
        nn.EmbeddingBag.from_pretrained(weight, mode="sum"), QuantConfig(bits=bits), mask=mask, block_width=4
    )
    assert bag.table.layout == "block_sparse"
    for path in ("avx2", "generic"):
        out = bag.table.fast_bag(idx, bounds, 0, None, policy=KernelPolicy(path=path))
        torch.testing.assert_close(out, bag._generic(idx, bounds, None), rtol=1e-5, atol=1e-5)
    print(hashlib.sha256(b"".join(t.numpy().tobytes() for t in bag.table.tensors().values())).hexdigest())
print("agree")
"""
    features = "+avx,+avx2,+fma,+f16c,+popcnt,+bmi,+bmi2,+sse4.2,-avx512f,-avx512vl,-avx512bw,-avx512vbmi2"
    env = {
        **os.environ,
        "NUMBA_CPU_NAME": "haswell",
        "NUMBA_CPU_FEATURES": features,
        "NUMBA_CACHE_DIR": str(tmp_path / "numba"),
    }
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    *digests, last = result.stdout.split()
    assert last == "agree"
    torch.manual_seed(0)
    weight = torch.randn(50, 128)
    mask = block_norm_mask(weight, 0.7, (1, 4))
    here = []
    for bits in (8, 4):
        float_bag = nn.EmbeddingBag.from_pretrained(weight, mode="sum")
        bag = QuantizedEmbeddingBag.from_float(float_bag, QuantConfig(bits=bits), mask=mask, block_width=4)
        tensors = bag.table.tensors().values()
        here.append(hashlib.sha256(b"".join(t.numpy().tobytes() for t in tensors)).hexdigest())
    assert digests == here


@pytest.mark.parametrize("layout", list(TABLE_CLASSES))
def test_op_arguments_and_view_rebuild_the_table(layout):
    """``op_tensors`` lists the buffers ``op_tensor_names`` names (the layouts spell them out
    for TorchScript), every buffer of the table; the view the ops build from them looks up as
    the table does (every registered layout)."""
    q, _, _ = _bag(layout, 4, "sum")
    table = q.table
    assert [id(t) for t in table.op_tensors()] == [id(getattr(table, n)) for n in table.op_tensor_names]
    assert set(table.op_tensor_names) == set(table.tensors())
    layout_name, rows, dim, bits, dtype_name, layout_args = table.op_fields()
    assert (layout_name, rows, dim, bits, dtype_name) == (layout, ROWS, DIM, 4, "float16")
    cls, dtype = TABLE_CLASSES[layout], table.scale_dtype
    view = cls.from_op_args(table.op_tensors(), rows, dim, bits, dtype, layout_args)
    ids = torch.randint(0, ROWS, (60,))
    bounds = torch.arange(0, 61, 6)
    assert torch.equal(view.decode_rows(ids), table.decode_rows(ids))
    assert torch.equal(view.fast_bag(ids, bounds, 0, None), table.fast_bag(ids, bounds, 0, None))
    with pytest.raises(ValueError, match="tensors"):
        cls.from_op_args(table.op_tensors()[:-1], rows, dim, bits, dtype, layout_args)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_op_given_a_tables_own_buffers_uses_that_table(layout):
    """The ops find the live table whose own buffers they are given (``owner_of``) and use
    it, kept kernel arguments and all, also after ``.to()`` or a buffer replaced; copies of
    the buffers, other fields or stale buffers get a view, and every answer is the table's."""
    q, _, _ = _bag(layout, 4, "sum")
    table = q.table
    fields = table.op_fields()
    cls, dtype, args = TABLE_CLASSES[layout], table.scale_dtype, fields[5]
    own = table.op_tensors()
    assert cls.owner_of(own, ROWS, DIM, 4, dtype, args) is table
    assert cls.owner_of([t.clone() for t in own], ROWS, DIM, 4, dtype, args) is None
    assert cls.owner_of(own, ROWS, DIM, 8, dtype, args) is None
    assert cls.owner_of([*own, own[0]], ROWS, DIM, 4, dtype, args) is None
    ids = torch.randint(0, ROWS, (60,))
    offsets = torch.arange(0, 60, 6)

    def op(tensors):
        return torch.ops.embpress.embedding_bag(
            tensors, *fields, ids, offsets, None, 0, False, None, None, 2.0
        )

    want = q(ids, offsets)
    assert torch.equal(op(own), want) and torch.equal(op([t.clone() for t in own]), want)
    table.to(torch.float32)  # ``_apply``: the table is found from its buffers as they are now
    assert cls.owner_of(table.op_tensors(), ROWS, DIM, 4, dtype, args) is table
    name = table.op_tensor_names[0]
    old = table.op_tensors()
    setattr(table, name, getattr(table, name).clone())  # a replaced buffer: the table's own now
    assert cls.owner_of(table.op_tensors(), ROWS, DIM, 4, dtype, args) is table
    assert cls.owner_of(old, ROWS, DIM, 4, dtype, args) is None
    assert torch.equal(op(table.op_tensors()), q(ids, offsets))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_ids_after_the_last_offset_are_in_no_bag(layout, mode):
    """include_last_offset with offsets[-1] < len(ids): the trailing ids are in no bag in
    every kernel (fused, and plain torch with padding or max), as in CSR offsets."""
    table_q, _, _ = _bag(layout, 8, mode, include_last_offset=True)
    ids = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])
    offsets = torch.tensor([0, 2, 5])  # two bags over ids[:5]; ids[5:] in none
    expected = F.embedding_bag(ids[:5], table_q.dequantize(), offsets, mode=mode, include_last_offset=True)
    _close(table_q(ids, offsets), expected)
    padded = QuantizedEmbeddingBag(table_q.table, mode=mode, include_last_offset=True, padding_idx=7)
    _close(padded(ids, offsets), expected)  # padding id 7 present: the plain-torch path


def test_kernel_argument_tuples_are_the_kernels_parameters():
    """Each bag kernel is called as ``kernel(*table, *bags, threads, out)`` (``lookup.run_bags``):
    its table NamedTuple and ``Bags`` name its parameters in order. The kernels unpack the
    block-sparse ``RecordShape`` in its field order."""
    import inspect

    from embpress.layouts import _kernels
    from embpress.layouts.block_sparse import RecordShape, record_shape
    from embpress.layouts.lookup import Bags, BlockSparseKernelTable, FusedKernelTable, PackedRowsKernelTable

    kernels = {
        _kernels.block_sparse_bag: BlockSparseKernelTable,
        _kernels.fused_bag: FusedKernelTable,
        _kernels.packed_rows_bag: PackedRowsKernelTable,
    }
    for kernel, table in kernels.items():
        parameters = list(inspect.signature(kernel.py_func).parameters)
        assert parameters == [*table._fields, *Bags._fields, "threads", "out"]
    assert RecordShape._fields == (
        "blocks", "block_width", "bits", "word_bits", "words", "scale_bytes", "bitmap_bytes", "header",
        "group_shift",
    )  # fmt: skip
    shape = record_shape(100, 4, 4, torch.float16)
    assert shape == RecordShape(25, 4, 4, 32, 1, 2, 4, 8, shape.group_shift)
    assert shape.length(25) == 8 + 50 and all(type(v) is int for v in shape)


def test_kernel_policy_blocks_nest_and_stay_in_their_thread():
    import threading

    from embpress.layouts import current_kernel_policy, set_default_kernel_policy

    assert current_kernel_policy() == KernelPolicy(fused_kernel=True, vector_decode=True)
    with kernel_policy(vector_decode=False) as outer:
        assert current_kernel_policy() is outer and not outer.vector_decode and outer.fused_kernel
        with kernel_policy(fused_kernel=False):
            assert current_kernel_policy() == KernelPolicy(fused_kernel=False, vector_decode=False)
        assert current_kernel_policy() is outer
        seen = []
        thread = threading.Thread(target=lambda: seen.append(current_kernel_policy()))
        thread.start()
        thread.join()
        assert seen == [KernelPolicy()]  # another thread keeps the default
    assert current_kernel_policy() == KernelPolicy()
    previous = set_default_kernel_policy(KernelPolicy(fused_kernel=False))
    try:
        assert current_kernel_policy() == KernelPolicy(fused_kernel=False)
        with kernel_policy(KernelPolicy()):
            assert current_kernel_policy() == KernelPolicy()
    finally:
        set_default_kernel_policy(previous)
    with pytest.raises(TypeError, match="must be a bool"):
        KernelPolicy(fused_kernel=1)
    with pytest.raises(TypeError, match="unexpected keyword"), kernel_policy(vector=False):
        pass


def test_kernel_files_use_no_jitted_helper_from_another_file():
    """numba's disk cache is keyed on a jitted function's own file, so a kernel that called
    a jitted helper or intrinsic defined elsewhere would keep running the helper's old code
    after an edit to it (see ``layouts._kernels``)."""
    import importlib

    from numba.core.dispatcher import Dispatcher

    for name in (
        "embpress.layouts._kernels",
        "embpress.layouts._encode_kernels",
        "embpress.quant._search",
        "embpress.sparsify._kernels",
    ):
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if isinstance(value, Dispatcher):
                defined_in = value.py_func.__module__
            elif hasattr(value, "_defn"):  # a numba @intrinsic
                defined_in = value._defn.__module__
            else:
                continue
            assert defined_in == name, f"{name}.{attr} comes from {defined_in}"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(-3, 12), max_size=8),
    st.integers(0, 10),
    st.booleans(),
)
def test_bag_offsets_are_refused_exactly_where_the_rules_say(given_offsets, total, include_last):
    """``ops.bag_bounds`` (a compiled check) against the rules stated plainly, as
    nn.EmbeddingBag has them: bounds with a final total; a first given offset other than 0,
    a bound below the one before it, or the last above the number of ids is a RuntimeError
    naming it; ids after the last bound (or all of them, where there is no bag) are left
    out."""
    ids = torch.zeros(total, dtype=torch.long)
    values = given_offsets if include_last else [*given_offsets, total]
    if not values:
        want = "must not be empty"
    elif given_offsets and given_offsets[0] != 0:
        want = "has to be 0"
    elif values[-1] > total or any(b < a for a, b in itertools.pairwise(values)):
        want = "non-decreasing"
    else:
        want = None
    offsets = torch.tensor(given_offsets, dtype=torch.long)
    if want is None:
        flat, bounds = bag_bounds(ids, offsets, include_last)
        if len(values) == 1:  # no bag: no id is in one
            values = [0]
        assert bounds.tolist() == values and flat.numel() == values[-1]
    else:
        with pytest.raises(RuntimeError, match=want):
            bag_bounds(ids, offsets, include_last)


@pytest.mark.parametrize("cls", [QuantizedEmbedding, QuantizedEmbeddingBag])
def test_constructor_takes_padding_idx_as_torch_does(cls):
    """A negative padding_idx counts from the end (row 49 of 50 for -1), as nn.Embedding /
    nn.EmbeddingBag keep it; one outside [-rows, rows) is refused."""
    table = QuantizedEmbeddingBag.from_float(
        nn.EmbeddingBag(50, 8, mode="sum"), QuantConfig(bits=8, layout="dense")
    ).table
    assert cls(table, padding_idx=-1).padding_idx == nn.Embedding(50, 8, padding_idx=-1).padding_idx == 49
    assert cls(table, padding_idx=0).padding_idx == 0
    assert cls(table, padding_idx=np.int64(-2)).padding_idx == 48  # a NumPy integer, as torch takes
    for bad in (50, -51):
        with pytest.raises(ValueError, match="padding_idx must be within num_embeddings"):
            cls(table, padding_idx=bad)
    with pytest.raises(TypeError, match="padding_idx must be an int"):
        cls(table, padding_idx=1.0)
    if cls is QuantizedEmbeddingBag:  # row 49 is padding: the bag leaves it out
        bag = cls(table, mode="sum", padding_idx=-1)
        ref = nn.EmbeddingBag.from_pretrained(table.dequantize(), mode="sum", padding_idx=-1)
        ids, offsets = torch.tensor([1, 49, 49, 2]), torch.tensor([0, 2])
        torch.testing.assert_close(bag(ids, offsets), ref(ids, offsets))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_meta_modules_give_meta_outputs_of_nn_shapes(layout):
    """On the meta device (shape inference, fake initialisation) the modules return meta
    outputs of nn's shapes, as nn.Embedding(Bag) does, instead of reading ids."""
    q, ref, _ = _bag(layout, padding_idx=0)
    emb = QuantizedEmbedding.from_float(
        nn.Embedding.from_pretrained(ref.weight.detach().clone()), QuantConfig(bits=8, layout=layout)
    )
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]], device="meta")
    for module, args in (
        (q, (ids.reshape(-1), torch.tensor([0, 4], device="meta"))),
        (q, (ids,)),
        (emb, (ids,)),
    ):
        expected = (ref if module is q else nn.Embedding(ROWS, DIM)).to("meta")(*args)
        out = module.to("meta")(*args)
        assert out.is_meta and out.shape == expected.shape and out.dtype == expected.dtype


def test_an_invalid_mode_set_later_is_refused_as_nn_refuses_it():
    q, ref, _ = _bag("dense")
    ids, offsets = torch.tensor([1, 2, 3]), torch.tensor([0])
    for module in (q, ref):
        module.mode = "Sum"
        with pytest.raises(ValueError, match="mode has to be one of sum, mean or max"):
            module(ids, offsets)


def test_repr_shows_the_float_modules_arguments_as_nn_does():
    q, ref, _ = _bag("dense", padding_idx=3, max_norm=1.5, norm_type=1.0, include_last_offset=True)
    text = repr(q)
    for part in ("padding_idx=3", "max_norm=1.5", "norm_type=1.0"):
        assert part in text and part in repr(ref)
    assert "include_last_offset=True" in text  # nn's repr leaves it out; it changes the bags
    plain = repr(_bag("dense")[0])
    assert "padding_idx" not in plain and "max_norm" not in plain and "include_last_offset" not in plain


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_per_sample_weights_of_another_dtype_are_refused_as_torch_refuses_them(dtype):
    """nn.EmbeddingBag takes per_sample_weights of its weight's dtype only; a compressed one
    those of its output dtype (the weight it replaced), with the same error type and a
    message naming that dtype; scripted too."""
    model = nn.Sequential(nn.EmbeddingBag(50, 8, mode="sum").to(dtype))
    post_training_sparse_quantize(model, DataNormSparsifier, sparsity_level=0.5)
    ref = nn.EmbeddingBag(50, 8, mode="sum").to(dtype)
    ids, offsets = torch.arange(10), torch.tensor([0, 5])
    scripted = torch.jit.script(_WeightedBag(model[0]))
    for weights_dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        weights = torch.rand(10).to(weights_dtype)
        if weights_dtype == dtype:
            assert model[0](ids, offsets, per_sample_weights=weights).dtype == dtype
            continue
        with pytest.raises(RuntimeError):
            ref(ids, offsets, per_sample_weights=weights)
        with pytest.raises(RuntimeError, match=f"must have dtype {dtype}, the dtype of the module's output"):
            model[0](ids, offsets, per_sample_weights=weights)
        with pytest.raises(torch.jit.Error, match="must have the dtype of the module's output"):
            scripted(ids, offsets, weights)  # (it took them)


class _WeightedBag(nn.Module):
    def __init__(self, bag: nn.Module) -> None:
        super().__init__()
        self.bag = bag

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.bag(ids, offsets, per_sample_weights=weights)
