"""Every kernel path (avx512, avx2, generic) this CPU runs, forced one by one, against the
plain-torch decoder (``decode_rows`` + ``torch.nn.functional.embedding_bag``).

The paths differ only in how a bitmap word's kept blocks are moved to their columns (an
exact data movement), so they agree with each other bit for bit. The set-bit walk does
the decoder's arithmetic (``code * scale + offset`` then a sum in id order) and matches it
bit for bit on unweighted bags; the whole-word decode sums centred codes with FMAs and
matches it to float rounding.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from embpress import QuantConfig, QuantizedEmbeddingBag
from embpress.layouts import _kernels, _paths
from embpress.layouts.lookup import (
    KernelPolicy,
    kernel_path,
    kernel_path_number,
    kernel_paths,
    kernel_policy,
    system_info,
)
from embpress.sparsify import block_norm_mask

PATHS = ["avx512", "avx2", "generic"]


def _runs(path: str) -> None:
    """Skip unless this CPU runs kernel ``path`` (the generic path runs everywhere)."""
    if path not in kernel_paths():
        pytest.skip(f"this CPU cannot run the {path} kernel path")


def _torch_bags(table, idx, bounds, mode, psw):
    """The plain-torch reference: every row decoded, then ``F.embedding_bag``."""
    return F.embedding_bag(
        idx, table.dequantize(), bounds, mode=mode, per_sample_weights=psw, include_last_offset=True
    )


def _threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    return before


def _bags_on(table, path, vector, threads, idx, bounds, code, psw):
    before = _threads(threads)
    try:
        out = table.fast_bag(idx, bounds, code, psw, policy=KernelPolicy(path=path, vector_decode=vector))
    finally:
        torch.set_num_threads(before)
    assert out is not None
    return out


def _lookups(gen, rows, bag_sizes, weighted):
    idx = torch.randint(0, rows, (sum(bag_sizes),), generator=gen)
    bounds = torch.tensor([0, *itertools.accumulate(bag_sizes)])
    psw = torch.rand(idx.numel(), generator=gen) if weighted else None
    return idx, bounds, psw


@settings(max_examples=40, deadline=None)
@given(
    dim=st.sampled_from([32, 64, 128, 256, 36, 20]),
    bits=st.sampled_from([8, 4, 2]),
    width=st.sampled_from([4, 1, 3, 8]),
    sparsity=st.sampled_from([0.0, 0.5, 0.8, 0.97]),
    mode=st.sampled_from(["sum", "mean"]),
    weighted=st.booleans(),
    scale_dtype=st.sampled_from([torch.float32, torch.float16]),
    bag_sizes=st.lists(st.integers(0, 30), min_size=1, max_size=16),
    seed=st.integers(0, 2**16),
    threads=st.sampled_from([1, 2]),
)
def test_block_sparse_paths_match_the_torch_decoder(
    dim, bits, width, sparsity, mode, weighted, scale_dtype, bag_sizes, seed, threads
):
    """Block-sparse bags on every path this CPU runs, whole-word decode and set-bit walk:
    the paths agree bit for bit; the walk equals the torch decoder bit for bit on
    unweighted bags; everything equals it to float rounding."""
    gen = torch.Generator().manual_seed(seed)
    rows = 70  # a partial last group of rows
    weight = torch.randn(rows, dim, generator=gen)
    weight[3] = 0.0  # every block pruned
    mask = block_norm_mask(weight, sparsity, (1, width))
    config = QuantConfig(bits=bits, layout="block_sparse", scale_dtype=scale_dtype)
    q = QuantizedEmbeddingBag.from_float(
        nn.EmbeddingBag.from_pretrained(weight, mode=mode), config, mask=mask, block_width=width
    )
    weighted = weighted and mode == "sum"
    idx, bounds, psw = _lookups(gen, rows, bag_sizes, weighted)
    expected = _torch_bags(q.table, idx, bounds, mode, psw)
    code = 0 if mode == "sum" else 1
    for vector in (True, False):
        outs = {p: _bags_on(q.table, p, vector, threads, idx, bounds, code, psw) for p in kernel_paths()}
        first = next(iter(outs.values()))
        for path, out in outs.items():
            assert torch.equal(out, first), (path, vector)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
            if not vector and not weighted:
                assert torch.equal(out, expected), path


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dim", [32, 64, 128, 256])
def test_each_path_serves_the_whole_word_decode(path, bits, dim):
    """(1, 4) blocks with D = 4 * W * words take the whole-word decode on every path, and
    its sums (weighted, mean, empty bags, repeated ids) equal the torch decoder's."""
    _runs(path)
    gen = torch.Generator().manual_seed(dim + bits)
    weight = torch.randn(90, dim, generator=gen)
    mask = block_norm_mask(weight, 0.8, (1, 4))
    q = QuantizedEmbeddingBag.from_float(
        nn.EmbeddingBag.from_pretrained(weight), QuantConfig(bits=bits), mask=mask, block_width=4
    )
    assert q.table.layout == "block_sparse"
    policy = KernelPolicy(path=path)
    assert q.table._vector_decode(policy)
    idx, bounds, psw = _lookups(gen, 90, [0, 5, 40, 1, 0, 33, 90], True)
    idx[:20] = 7  # a hot row
    for mode, weights in (("sum", None), ("sum", psw), ("mean", None)):
        code = 0 if mode == "sum" else 1
        expected = _torch_bags(q.table, idx, bounds, mode, weights)
        for threads in (1, 2):
            out = _bags_on(q.table, path, True, threads, idx, bounds, code, weights)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["dense", "pruned_rows"])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_fused_rows_on_each_path_match_the_torch_decoder(path, layout, bits):
    """Dense and pruned-row bags (FBGEMM's kernels, embpress's 4-bit kernel on several
    threads) under each path equal the torch decoder."""
    _runs(path)
    gen = torch.Generator().manual_seed(bits)
    dim = 64
    weight = torch.randn(60, dim, generator=gen)
    mask = block_norm_mask(weight, 0.5, (1, dim)) if layout == "pruned_rows" else None
    q = QuantizedEmbeddingBag.from_float(
        nn.EmbeddingBag.from_pretrained(weight),
        QuantConfig(bits=bits, layout=layout),
        mask=mask,
        block_width=dim,
    )
    assert q.table.layout == layout
    idx, bounds, psw = _lookups(gen, 60, [3, 0, 17, 8, 40], True)
    for mode, weights in (("sum", None), ("sum", psw), ("mean", None)):
        code = 0 if mode == "sum" else 1
        expected = _torch_bags(q.table, idx, bounds, mode, weights)
        for threads in (1, 2):
            out = _bags_on(q.table, path, True, threads, idx, bounds, code, weights)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_each_path_refuses_out_of_range_ids(path):
    _runs(path)
    weight = torch.randn(40, 128)
    mask = block_norm_mask(weight, 0.8, (1, 4))
    q = QuantizedEmbeddingBag.from_float(
        nn.EmbeddingBag.from_pretrained(weight), QuantConfig(bits=8), mask=mask, block_width=4
    )
    with kernel_policy(path=path):
        for bad in (40, -1):
            with pytest.raises(IndexError, match="out of range"):
                q(torch.tensor([1, bad, 2]), torch.tensor([0, 2]))


def test_the_policy_names_the_path_and_refuses_bad_ones():
    assert kernel_paths()[-1] == "generic" and set(kernel_paths()) <= set(PATHS)
    assert KernelPolicy().path is None
    for path in kernel_paths():
        with kernel_policy(path=path):
            assert kernel_path() == path
            assert kernel_path_number() == _kernels.KERNEL_PATHS[path]
    with pytest.raises(ValueError, match=r"KernelPolicy\.path must be one of"):
        KernelPolicy(path="sse2")
    with pytest.raises(TypeError, match=r"KernelPolicy\.path must be a str"):
        KernelPolicy(path=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be one of"), kernel_policy(path="neon"):
        pass


def test_a_path_the_cpu_lacks_is_never_chosen_and_cannot_be_forced(monkeypatch):
    """With AVX-512 (then AVX2 too) hidden, the automatic choice falls to the next path,
    and forcing a hidden one raises a clear ValueError (by policy or by environment)."""
    host = _paths._host_has
    try:
        monkeypatch.delenv(_kernels.KERNEL_ENV, raising=False)
        monkeypatch.setattr(_paths, "_host_has", lambda f: not f.startswith("avx512") and host(f))
        _paths.process_choice.cache_clear()
        assert "avx512" not in kernel_paths()
        assert kernel_path() == kernel_paths()[0] != "avx512"
        with pytest.raises(ValueError, match="cannot run that kernel path"):
            KernelPolicy(path="avx512")
        monkeypatch.setenv(_kernels.KERNEL_ENV, "avx512")
        _paths.process_choice.cache_clear()
        with pytest.raises(ValueError, match=r"EMBPRESS_KERNEL='avx512'.*cannot run"):
            kernel_path()
        monkeypatch.setattr(_paths, "_host_has", lambda f: False)
        monkeypatch.setenv(_kernels.KERNEL_ENV, "auto")
        _paths.process_choice.cache_clear()
        assert kernel_paths() == ("generic",) and kernel_path() == "generic"
    finally:
        _paths.process_choice.cache_clear()


def test_the_environment_forces_the_process_path(monkeypatch):
    try:
        for path in kernel_paths():
            monkeypatch.setenv(_kernels.KERNEL_ENV, f" {path.upper()} ")
            _paths.process_choice.cache_clear()
            assert kernel_path() == path
            info = system_info()
            assert info["kernel_path"] == path and info["kernel_path_source"].startswith("EMBPRESS_KERNEL")
            with kernel_policy(path="generic"):  # a policy's path overrides the process's
                assert kernel_path() == "generic" and system_info()["kernel_path_source"] == "policy"
            monkeypatch.setenv(_kernels.KERNEL_ENV, "nonsense")  # read once: no change now
            info = system_info()
            assert info["kernel_path"] == path
            assert info["kernel_path_source"] == f"EMBPRESS_KERNEL= {path.upper()} "
        monkeypatch.setenv(_kernels.KERNEL_ENV, "fastest")
        _paths.process_choice.cache_clear()
        with pytest.raises(ValueError, match=r"EMBPRESS_KERNEL='fastest': expected auto or one of"):
            kernel_path()
        weight = torch.randn(10, 32)
        q = QuantizedEmbeddingBag.from_float(
            nn.EmbeddingBag.from_pretrained(weight),
            QuantConfig(bits=8),
            mask=block_norm_mask(weight, 0.5, (1, 4)),
            block_width=4,
        )
        with pytest.raises(ValueError, match="EMBPRESS_KERNEL"):
            q(torch.tensor([1, 2]), torch.tensor([0]))
    finally:
        _paths.process_choice.cache_clear()


def test_system_info_says_what_runs():
    info = system_info()
    assert info["kernel_path"] == kernel_path() and info["available_paths"] == list(kernel_paths())
    assert info["kernel_path_source"] in ("cpu", "policy") or info["kernel_path_source"].startswith(
        "EMBPRESS_KERNEL"
    )
    for key in ("cpu", "numba", "llvmlite", "llvm", "torch"):
        assert isinstance(info[key], str) and info[key]
    assert info["torch_threads"] >= 1 and info["numba_threads"] >= 1
    assert all(isinstance(v, bool) for v in info["cpu_features"].values())
    assert info["cpu_features"]["avx2"] == ("avx2" in kernel_paths())
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists():  # the bracketed mode of "always [madvise] never"
        assert f"[{info['transparent_huge_pages']}]" in thp.read_text()
    else:
        assert info["transparent_huge_pages"] is None


def test_avx512_path_without_vbmi2_expands_16_bit_blocks_with_avx2(monkeypatch):
    """On an AVX-512 CPU without VBMI2 (Skylake-X, Cascade Lake: no 16-bit expand), the
    AVX-512 path decodes 4- and 2-bit rows with AVX2's table permutes (8-bit rows keep the
    32-bit expand); compiled afresh for such a CPU, it matches the torch decoder."""
    import numba

    from embpress.layouts import block_sparse

    _runs("avx512")
    host = _paths._host_has
    monkeypatch.setattr(_paths, "_host_has", lambda f: f != "avx512vbmi2" and host(f))
    assert _paths._has_expands(32) and not _paths._has_expands(16)
    fresh = numba.njit(parallel=True)(_kernels.block_sparse_bag.py_func)
    monkeypatch.setattr(block_sparse, "block_sparse_bag", fresh)
    monkeypatch.setattr(block_sparse, "block_sparse_run", None)  # numba's kernel, not a compiled one
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(60, 128, generator=gen)
    idx, bounds, psw = _lookups(gen, 60, [7, 0, 30, 12], True)
    for bits in (4, 8, 2):
        q = QuantizedEmbeddingBag.from_float(
            nn.EmbeddingBag.from_pretrained(weight),
            QuantConfig(bits=bits, layout="block_sparse"),
            mask=block_norm_mask(weight, 0.7, (1, 4)),
            block_width=4,
        )
        out = _bags_on(q.table, "avx512", True, 2, idx, bounds, 0, psw)
        torch.testing.assert_close(out, _torch_bags(q.table, idx, bounds, "sum", psw), rtol=1e-5, atol=1e-5)


_TWO_PROCESSES = """
import sys
import torch
from torch import nn
from embpress import QuantConfig, QuantizedEmbeddingBag
from embpress.layouts.lookup import KernelPolicy
from embpress.sparsify import block_norm_mask

torch.manual_seed(0)
weight = torch.randn(50, 64)
q = QuantizedEmbeddingBag.from_float(
    nn.EmbeddingBag.from_pretrained(weight), QuantConfig(bits=8), mask=block_norm_mask(weight, 0.7, (1, 4)),
    block_width=4,
)
idx = torch.randint(0, 50, (100,))
bounds = torch.arange(0, 101, 10)
out = q.table.fast_bag(idx, bounds, 0, None, policy=KernelPolicy(path=sys.argv[1]))
torch.save(out, sys.argv[2])
"""


@pytest.mark.slow
def test_two_processes_share_an_empty_kernel_cache(tmp_path):
    """Two fresh processes compile into one empty numba cache at once (each writes its
    cache files whole, under names of its own, then renames them), and a third process
    then loads what they left: all three give the same sums."""
    import os
    import subprocess
    import sys

    path = kernel_paths()[0]
    # numba's own cache: the kernels compiled ahead of time (tests/test_aot.py) stay out
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "EMBPRESS_AOT": "0"}
    cmd = [sys.executable, "-c", _TWO_PROCESSES, path]
    procs = [subprocess.Popen([*cmd, str(tmp_path / f"{i}.pt")], env=env) for i in range(2)]
    assert [p.wait(timeout=900) for p in procs] == [0, 0]
    subprocess.run([*cmd, str(tmp_path / "2.pt")], env=env, check=True, timeout=900)
    outs = [torch.load(tmp_path / f"{i}.pt", weights_only=True) for i in range(3)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert any((tmp_path / "cache").rglob("*.nbc"))


@pytest.mark.slow
def test_generic_path_has_no_x86_vector_intrinsic_and_avx2_no_avx512(monkeypatch):
    """The LLVM IR of the block-sparse kernel compiled afresh for the generic path names no
    x86 vector intrinsic (what an ARM CPU compiles); the AVX2 path's names AVX2's permute
    (8-bit blocks) and nothing of AVX-512. 4-bit codes, shuffled as bytes in generic IR on
    both paths, become byte shuffles in the machine code, not one byte moved at a time
    (x86's instruction selection finds the shuffle only in the shape ``_emit_byte_codes``
    writes it)."""
    import re

    import numba

    from embpress.layouts import block_sparse

    _runs("avx2")
    fresh = numba.njit(parallel=True)(_kernels.block_sparse_bag.py_func)  # uncached: inspectable
    monkeypatch.setattr(block_sparse, "block_sparse_bag", fresh)
    monkeypatch.setattr(block_sparse, "block_sparse_run", None)  # numba's kernel, not a compiled one
    weight = torch.randn(50, 128)
    found, asm = {}, {}
    for bits in (8, 4):
        q = QuantizedEmbeddingBag.from_float(
            nn.EmbeddingBag.from_pretrained(weight),
            QuantConfig(bits=bits, scale_dtype=torch.float16 if bits == 4 else torch.float32),
            mask=block_norm_mask(weight, 0.7, (1, 4)),
            block_width=4,
        )
        for path in ("generic", "avx2"):
            policy = KernelPolicy(path=path)
            q.table.fast_bag(torch.tensor([1, 2]), torch.tensor([0, 2]), 0, None, policy=policy)
            marker = numba.typeof(_kernels.PATH_MARKERS[_kernels.KERNEL_PATHS[path]])
            shape = numba.typeof(tuple(q.table.shape))
            (sig,) = [s for s in fresh.signatures if s[8] == marker and s[3] == shape]
            names = set(re.findall(r"llvm\.x86\.(?:avx|sse|ssse3)[\w.]*", fresh.inspect_llvm(sig)))
            found[path] = found.get(path, set()) | names
            asm[bits, path] = fresh.inspect_asm(sig)
    assert found["generic"] == set()
    assert "llvm.x86.avx2.permd" in found["avx2"]
    assert not any("avx512" in name for name in found["avx2"])
    for path in ("generic", "avx2"):
        assert "pshufb" in asm[4, path]
        assert asm[4, path].count("pextrb") < 16, "the byte shuffle was split into single bytes"


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize(
    ("triple", "cpu", "shuffle", "single"),
    [
        ("x86_64-unknown-linux-gnu", "haswell", "vpshufb", "pextrb"),
        ("x86_64-unknown-linux-gnu", "skylake-avx512", "vpshufb", "pextrb"),
        ("aarch64-unknown-linux-gnu", "neoverse-n1", "tbl", "umov"),
    ],
)
def test_byte_codes_compile_to_one_shuffle_per_piece(bits, triple, cpu, shuffle, single):
    """``_emit_byte_codes``' IR for a 128-value row, optimised and compiled by the LLVM that
    numba uses, for an AVX2 CPU, an AVX-512 one and an ARM Neoverse N1: one byte shuffle
    (``pshufb`` / ``tbl``) per 16-byte piece (on ARM two for a piece of 2-bit codes, one
    per bitmap byte), and no byte moved alone (what x86's instruction selection did when
    the pieces were joined as bytes, and ARM's when one shuffle's index was joined from two
    bitmap bytes' entries)."""
    from llvmlite import binding as llvm
    from llvmlite import ir

    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    try:
        target = llvm.Target.from_triple(triple)
    except RuntimeError:
        pytest.skip(f"this llvmlite has no {triple} target")
    i8p, i64, i32 = ir.IntType(8).as_pointer(), ir.IntType(64), ir.IntType(32)
    module = ir.Module(name="byte_codes")
    module.triple = triple
    word_bits = 32
    fields = 8 // bits * len(_kernels._byte_pieces(bits, word_bits))
    out_ty = ir.VectorType(i32, 16)
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [i8p, i64, out_ty.as_pointer()]), "decode")
    builder = ir.IRBuilder(fn.append_basic_block())
    cptr, word, out = fn.args
    joined = triple.startswith("x86")  # as ``_emit_strided_codes`` chooses on such a CPU
    for k, field in enumerate(_kernels._emit_byte_codes(builder, cptr, word, bits, word_bits, joined)):
        builder.store(field, builder.gep(out, [ir.Constant(i64, k)]))
    builder.ret_void()
    assert len(_kernels._byte_order(bits, word_bits)) == 16 * fields
    machine = target.create_target_machine(cpu=cpu, opt=3)
    parsed = llvm.parse_assembly(str(module))
    passes = llvm.create_pass_builder(machine, llvm.create_pipeline_tuning_options(3))
    passes.getModulePassManager().run(parsed, passes)
    asm = machine.emit_assembly(parsed)
    ops = [
        line.split()[0] for line in asm.splitlines() if line.startswith("\t") and not line.startswith("\t.")
    ]
    shuffles = sum(
        2 if blocks == 16 and not joined else 1 for _, blocks in _kernels._byte_pieces(bits, word_bits)
    )
    assert ops.count(shuffle) == shuffles
    assert ops.count(single) == 0


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("word_bits", [8, 16, 32])
def test_every_lane_order_is_a_permutation_of_the_columns(bits, word_bits):
    """The lane order of every decode flavour (x86 paths, generic, rows that keep every
    block) holds each of the word's 4W columns once: restoring the columns
    (``_emit_unstride``) loses and duplicates nothing."""
    for path in (*_kernels.KERNEL_PATHS.values(), _kernels.ALL_KEPT):
        order = _kernels._strided_order(bits, word_bits, path)
        assert sorted(order) == list(range(4 * word_bits)), (bits, word_bits, path)


_SPLIT_SHUFFLES = """
import sys
import torch
from embpress.layouts import _paths
if sys.argv[1] == "arm":
    _paths._host_is_x86 = lambda: False  # the formulation an ARM CPU compiles, here on x86
from embpress.layouts.lookup import KernelPolicy
sys.path.insert(0, sys.argv[3])
from test_kernel_paths import _arm_cases

outs = []
for q, idx, bounds, want in _arm_cases():
    got = q.table.fast_bag(idx, bounds, 0, None, policy=KernelPolicy(path="generic"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    outs.append(got)
torch.save(outs, sys.argv[2])
"""


def _arm_cases() -> list[tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Block-sparse tables at 8, 4 and 2 bits of rows of 1, 2, 4 and 8 bitmap bytes, their
    lookups, and the sums of decoding them in torch."""
    gen = torch.Generator().manual_seed(0)
    cases = []
    for bits in (8, 4, 2):
        for dim in (32, 64, 128, 256):
            weight = torch.randn(70, dim, generator=gen)
            q = QuantizedEmbeddingBag.from_float(
                nn.EmbeddingBag.from_pretrained(weight),
                QuantConfig(bits=bits),
                mask=block_norm_mask(weight, 0.6, (1, 4)),
                block_width=4,
            )
            idx = torch.randint(0, 70, (200,), generator=gen)
            bounds = torch.arange(0, 201, 8)
            want = nn.functional.embedding_bag(idx, q.table.dequantize(), bounds[:-1], mode="sum")
            cases.append((q, idx, bounds, want))
    return cases


@pytest.mark.slow
def test_generic_path_with_the_arm_shuffles_matches_the_decoder(tmp_path):
    """The generic path's decode as an ARM CPU compiles it (``_emit_byte_codes`` for 8-bit
    codes too, and two shuffles per piece of 2-bit codes), compiled afresh in a process
    of its own on this CPU, sums the same bags as decoding the table and summing in
    torch, at 8, 4 and 2 bits, for rows of 1, 2, 4 and 8 bitmap bytes, and bit for bit
    as the x86 formulation does (only the moves of the codes differ)."""
    import os
    import subprocess
    import sys

    here = str(Path(__file__).resolve().parent)
    outs = {}
    for flavour in ("arm", "x86"):  # each compiles afresh, into a cache of its own
        env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / flavour), "EMBPRESS_AOT": "0"}
        cmd = [sys.executable, "-c", _SPLIT_SHUFFLES, flavour, str(tmp_path / f"{flavour}.pt"), here]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
        outs[flavour] = torch.load(tmp_path / f"{flavour}.pt", weights_only=True)
    assert len(outs["arm"]) == 12
    for arm, x86 in zip(outs["arm"], outs["x86"], strict=True):
        assert torch.equal(arm, x86)


_HALF_ROWS = """
import sys
import torch
from embpress.layouts import _kernels
from embpress.layouts.lookup import KernelPolicy, kernel_paths
split = sys.argv[1] == "halves"
_kernels._split_rows = lambda word_bits: split and word_bits == 32  # before any kernel compiles
sys.path.insert(0, sys.argv[3])
from test_kernel_paths import _half_row_cases

outs = []
for q, idx, bounds, psw, want in _half_row_cases():
    for path in kernel_paths():
        got = q.table.fast_bag(idx, bounds, 0, psw, policy=KernelPolicy(path=path))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
        outs.append(got)
torch.save(outs, sys.argv[2])
"""


def _half_row_cases() -> list[tuple[Any, torch.Tensor, torch.Tensor, Any, torch.Tensor]]:
    """Block-sparse 128-value rows at 8, 4 and 2 bits, float32 and float16 row parameters,
    bags of 0 to 100 ids (across the split decode's chunks of 32), with and without
    per-sample weights, and the sums of decoding the table in torch."""
    gen = torch.Generator().manual_seed(3)
    sizes = [0, 1, 31, 32, 33, 64, 100, 5]
    cases = []
    for bits in (8, 4, 2):
        for scale_dtype in (torch.float32, torch.float16):
            weight = torch.randn(90, 128, generator=gen)
            q = QuantizedEmbeddingBag.from_float(
                nn.EmbeddingBag.from_pretrained(weight),
                QuantConfig(bits=bits, scale_dtype=scale_dtype),
                mask=block_norm_mask(weight, 0.75, (1, 4)),
                block_width=4,
            )
            for weighted in (False, True):
                idx, bounds, psw = _lookups(gen, 90, sizes, weighted)
                want = _torch_bags(q.table, idx, bounds, "sum", psw)
                cases.append((q, idx, bounds, psw, want))
    return cases


@pytest.mark.slow
def test_half_row_walks_sum_as_whole_rows(tmp_path):
    """The decode in halves of a row (``_kernels._split_rows``: CPUs without AVX-512, whose
    vector registers cannot hold a 128-value row's sums), forced on and off in processes
    of their own on this CPU, sums the same bags as decoding the table in torch, and bit
    for bit as the whole-row decode, on every kernel path: bags shorter and longer than
    its chunks, weighted or not, float32 and float16 row parameters, 8, 4 and 2 bits."""
    import os
    import subprocess
    import sys

    here = str(Path(__file__).resolve().parent)
    outs = {}
    for flavour in ("halves", "whole"):
        env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / flavour), "EMBPRESS_AOT": "0"}
        cmd = [sys.executable, "-c", _HALF_ROWS, flavour, str(tmp_path / f"{flavour}.pt"), here]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
        outs[flavour] = torch.load(tmp_path / f"{flavour}.pt", weights_only=True)
    assert len(outs["halves"]) == 12 * len(kernel_paths())
    for halves, whole in zip(outs["halves"], outs["whole"], strict=True):
        assert torch.equal(halves, whole)


def test_a_named_cpu_without_features_compiles_with_the_hosts_as_numba_does(monkeypatch):
    """numba told a CPU name alone (NUMBA_CPU_NAME) compiles with the host's features: the
    paths follow the host's then (they had fallen to the generic one alone); with
    NUMBA_CPU_FEATURES too, only the features it switches on count."""
    host = kernel_paths()
    monkeypatch.setattr(_paths, "numba_cpu", lambda: ("skylake-avx512", None))
    assert _paths.available_paths() == host
    monkeypatch.setattr(_paths, "numba_cpu", lambda: ("haswell", "+avx,+avx2,+fma,-avx512f"))
    expected = ("avx2", "generic") if "avx2" in host else ("generic",)
    assert _paths.available_paths() == expected
