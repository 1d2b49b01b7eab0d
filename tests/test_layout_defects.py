"""Regression tests for defects of the layouts and modules: unaligned fused rows, NaN/Inf
qparams on load, per_sample_weights dtypes, concurrent lookups under numba's workqueue
layer, block widths numba cannot take, and bad module inputs (each layout the same)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from embpress import QuantConfig, QuantizedEmbedding, QuantizedEmbeddingBag
from embpress.layouts import FormatError, encode_table
from embpress.layouts.base import fused_row_bytes
from embpress.quant import RowQParams, packed_length

LAYOUTS = ["dense", "pruned_rows", "block_sparse"]


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _bag_module(layout: str, bits: int = 8, rows: int = 30, dim: int = 8, **kwargs) -> QuantizedEmbeddingBag:
    torch.manual_seed(0)
    weight = torch.randn(rows, dim)
    mask = torch.rand(rows, dim) > 0.3
    mask[0] = True
    return QuantizedEmbeddingBag.from_float(
        nn.EmbeddingBag.from_pretrained(weight, **kwargs), QuantConfig(bits=bits, layout=layout), mask=mask
    )


# ------------------------------------------------------------------ 1. unaligned fused rows
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("bits", "dim"), [(8, 5), (8, 7), (4, 6), (2, 3)])
def test_unaligned_row_bytes_one_row_dequantize_and_max_bag(layout, bits, dim):
    """Rows whose scale sits at a byte offset not a multiple of its size: a one-row table
    dequantizes and a max bag over one distinct id works (both viewed bytes as floats)."""
    torch.manual_seed(0)
    weight = torch.randn(1, dim)
    q = QuantizedEmbeddingBag.from_float(
        nn.EmbeddingBag.from_pretrained(weight, mode="max"), QuantConfig(bits=bits, layout=layout)
    )
    if layout == "dense":
        assert fused_row_bytes(dim, bits, q.table.scale_dtype) % q.table.scale_dtype.itemsize
    table = q.dequantize()
    assert (table - weight).abs().max() <= q.error["max_abs"] + 1e-6
    out = q(torch.tensor([0, 0, 0]), torch.tensor([0, 1]))
    _close(out, F.embedding_bag(torch.tensor([0, 0, 0]), table, torch.tensor([0, 1]), mode="max"))


@st.composite
def _bags(draw, rows: int, max_bags: int = 4, max_len: int = 5):
    sizes = draw(st.lists(st.integers(0, max_len), min_size=1, max_size=max_bags))
    ids = draw(st.lists(st.integers(0, rows - 1), min_size=sum(sizes), max_size=sum(sizes)))
    return torch.tensor(ids, dtype=torch.int64), sizes


@settings(max_examples=120, deadline=None)
@given(
    data=st.data(),
    layout=st.sampled_from(LAYOUTS),
    dim=st.integers(1, 40),
    bits=st.sampled_from([8, 4, 2]),
    scale_dtype=st.sampled_from([torch.float32, torch.float16]),
    rows=st.integers(1, 5),
    pruned=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_every_forward_form_matches_torch_on_the_dequantized_table(
    data, layout, dim, bits, scale_dtype, rows, pruned, seed
):
    """Any dim 1..40 (so every alignment of the fused scale), bits, scale dtype and tiny
    table: Embedding and every EmbeddingBag form equal torch's functional ops on the
    dequantized table, and that table is within the encoder's own max error of the float."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, dim, generator=gen)
    mask = torch.rand(rows, dim, generator=gen) > 0.4 if pruned else None
    config = QuantConfig(bits=bits, layout=layout, scale_dtype=scale_dtype)
    emb = QuantizedEmbedding.from_float(nn.Embedding.from_pretrained(weight), config, mask=mask)
    table = emb.dequantize()
    assert table.shape == (rows, dim)
    assert emb.error is not None  # measured by the encoder against the float table
    assert float((table - weight).abs().max()) == pytest.approx(emb.error["max_abs"], rel=1e-5, abs=1e-6)

    ids, sizes = data.draw(_bags(rows))
    offsets = torch.tensor([0, *itertools.accumulate(sizes)][:-1], dtype=torch.int64)
    _close(emb(ids), F.embedding(ids, table))
    grid = ids[: (ids.numel() // 2) * 2].view(-1, 2) if ids.numel() >= 2 else ids.view(-1, 1)
    _close(emb(grid), F.embedding(grid, table))
    weights = torch.rand(ids.numel(), generator=gen)
    for mode in ("sum", "mean", "max"):
        for last in (False, True):
            bag = QuantizedEmbeddingBag(emb.table, mode=mode, include_last_offset=last)
            offs = torch.cat([offsets, offsets.new_tensor([ids.numel()])]) if last else offsets
            expected = F.embedding_bag(ids, table, offs, mode=mode, include_last_offset=last)
            _close(bag(ids, offs), expected)
            _close(bag(ids.int(), offs.int()), expected)
            if mode == "sum":
                expected = F.embedding_bag(
                    ids, table, offs, mode=mode, per_sample_weights=weights, include_last_offset=last
                )
                _close(bag(ids, offs, per_sample_weights=weights), expected)
        bag = QuantizedEmbeddingBag(emb.table, mode=mode)
        _close(bag(grid), F.embedding_bag(grid, table, mode=mode))
        if mode == "sum":
            w2 = torch.rand(grid.shape, generator=gen)
            expected = F.embedding_bag(grid, table, mode="sum", per_sample_weights=w2)
            _close(bag(grid, per_sample_weights=w2), expected)


# ------------------------------------------------------------------ 2. NaN/Inf qparams on load
@pytest.mark.parametrize("layout", ["dense", "pruned_rows", "block_sparse"])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("field", ["scale", "offset"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_from_tensors_refuses_nonfinite_qparams(layout, scale_dtype, field, bad):
    torch.manual_seed(0)
    weight = torch.randn(9, 7)
    mask = torch.ones(9, 7, dtype=torch.bool)
    mask[2] = False  # a pruned row (pruned_rows stores it as the zero row)
    table, _ = encode_table(weight, mask, QuantConfig(bits=4, layout=layout, scale_dtype=scale_dtype))
    meta = table.meta()
    good = {k: v.clone() for k, v in table.tensors().items()}
    type(table).from_tensors(meta, good)  # the untouched tensors load
    tensors = {k: v.clone() for k, v in good.items()}
    value = torch.tensor([bad], dtype=scale_dtype).view(torch.uint8)
    size = value.numel()
    if layout == "block_sparse":
        at = table.shape.bitmap_bytes + (size if field == "offset" else 0)  # row 0's record
        tensors["records"][at : at + size] = value
    else:
        at = packed_length(7, 4) + (size if field == "offset" else 0)
        tensors["fused"][1, at : at + size] = value
    name = "records" if layout == "block_sparse" else "fused"
    with pytest.raises(FormatError, match=f"'{name}'.*(NaN|Inf)"):
        type(table).from_tensors(meta, tensors)


# ------------------------------------------------------------------ 3. per_sample_weights dtype
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.int64, torch.float64, torch.float16, torch.bool])
def test_per_sample_weights_must_be_float32_in_every_layout(layout, bits, dtype):
    """nn.EmbeddingBag refuses weights of another dtype than its float32 weight; every
    layout does the same, with the same error (the block-sparse kernel used to cast)."""
    q = _bag_module(layout, bits, dim=32, mode="sum")
    ref = nn.EmbeddingBag.from_pretrained(q.dequantize(), mode="sum")
    idx, offsets = torch.tensor([1, 2, 3]), torch.tensor([0])
    weights = torch.ones(3, dtype=dtype)
    with pytest.raises(RuntimeError):
        ref(idx, offsets, per_sample_weights=weights)
    with pytest.raises(RuntimeError, match=r"per_sample_weights.*float32.*" + str(dtype).split(".")[1]):
        q(idx, offsets, per_sample_weights=weights)
    with pytest.raises(TypeError, match="per_sample_weights"):
        q(idx, offsets, per_sample_weights=[1.0, 1.0, 1.0])


# ------------------------------------------------------------------ 4. workqueue threading layer
_CONCURRENT_SCRIPT = """
import threading

import numba
import torch
from torch import nn

from embpress import DataNormSparsifier, QuantConfig, QuantizedEmbedding, QuantizedEmbeddingBag
from embpress.sparsify import streaming_block_norm_mask

torch.set_num_threads(2)
torch.manual_seed(0)
weight = torch.randn(500, 64)
mask = torch.rand(500, 64) > 0.5
mask[::3] = False  # whole pruned rows, for the pruned-row layout
modules = []
for layout in ("dense", "pruned_rows", "block_sparse"):
    for bits in (8, 4):
        config = QuantConfig(bits=bits, layout=layout)
        bag = nn.EmbeddingBag.from_pretrained(weight, mode="sum")
        modules.append(QuantizedEmbeddingBag.from_float(bag, config, mask=mask))
        modules.append(QuantizedEmbedding.from_float(nn.Embedding.from_pretrained(weight), config, mask=mask))
idx = torch.randint(0, 500, (2000,))
offsets = torch.arange(0, 2000, 10)
args = [(m, (idx, offsets) if isinstance(m, QuantizedEmbeddingBag) else (idx,)) for m in modules]
expected = [m(*a) for m, a in args]
assert numba.threading_layer() == "workqueue", numba.threading_layer()
failures = []

def lookups():
    try:
        for _ in range(25):
            for (m, a), want in zip(args, expected):
                if not torch.equal(m(*a), want):
                    failures.append("differs")
    except BaseException as err:
        failures.append(repr(err))

def encodes():
    try:
        for bits in (8, 4, 2):
            QuantizedEmbeddingBag.from_float(
                nn.EmbeddingBag.from_pretrained(weight), QuantConfig(bits=bits), mask=mask, block_width=4
            )
            sparsifier = DataNormSparsifier(sparsity_level=0.5)
            sparsifier.add_data("w", weight)
            sparsifier.step()
            list(streaming_block_norm_mask(lambda a, b: weight[a:b], (500, 64), 0.5, chunk_rows=64))
    except BaseException as err:
        failures.append(repr(err))

threads = [threading.Thread(target=lookups) for _ in range(3)] + [threading.Thread(target=encodes)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert not failures, failures
print("agree")
"""


def test_concurrent_forwards_under_the_workqueue_threading_layer():
    """numba's workqueue layer (its fallback without OpenMP or TBB) aborts the process when
    two threads launch parallel kernels at once; lookups, masks and encodes serialise there.
    The kernels run under numba here (``EMBPRESS_AOT=0``): compiled ahead of time, they
    launch none of numba's parallel kernels."""
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue", "NUMBA_NUM_THREADS": "2", "EMBPRESS_AOT": "0"}
    result = subprocess.run(
        [sys.executable, "-c", _CONCURRENT_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    assert result.stdout.strip() == "agree"


# ------------------------------------------------------------------ 5. block widths
@pytest.mark.parametrize("width", [2**70, 2**31, 2**40, 0, -3, True, 2.0, "4", None])
def test_block_width_outside_a_sane_int_is_refused(width):
    weight = torch.randn(10, 8)
    mask = torch.rand(10, 8) > 0.5
    with pytest.raises(ValueError, match="block_width"):
        encode_table(weight, mask, QuantConfig(layout="block_sparse"), block_width=width)
    with pytest.raises(ValueError, match="block_width"):
        QuantizedEmbeddingBag.from_float(nn.EmbeddingBag.from_pretrained(weight), block_width=width)


def test_block_width_limits_accepted():
    import numpy as np

    weight = torch.randn(10, 8)
    for width in (1, 8, 2**31 - 1, np.int64(4)):
        table, _ = encode_table(weight, None, QuantConfig(layout="block_sparse"), block_width=width)
        assert table.meta()["block_width"] in (1, 4, 8) and type(table.meta()["block_width"]) is int


# ------------------------------------------------------------------ other bad inputs
def _bad_inputs() -> list:
    """(ids, offsets, include_last_offset, the error), one pytest.param each."""
    t = torch.tensor
    long = torch.int64
    cases = [
        ("float ids", t([1.0, 2.0]), t([0]), False, TypeError),
        ("int16 ids", t([1, 2], dtype=torch.int16), t([0]), False, TypeError),
        ("negative id", t([1, -1]), t([0]), False, IndexError),
        ("id == num_embeddings", t([1, 30]), t([0]), False, IndexError),
        ("huge id", t([1, 2**40]), t([0]), False, IndexError),
        ("offsets[0] != 0", t([1, 2, 3]), t([1, 2]), False, RuntimeError),
        ("decreasing offsets", t([1, 2, 3]), t([0, 2, 1]), False, RuntimeError),
        ("decreasing offsets, include_last_offset", t([1, 2, 3]), t([0, 2, 1]), True, RuntimeError),
        ("negative offset", t([1, 2, 3]), t([0, -1]), False, RuntimeError),
        ("offsets past the input", t([1, 2, 3]), t([0, 5]), False, RuntimeError),
        ("last offset past the input", t([1, 2, 3]), t([0, 4]), True, RuntimeError),
        ("float offsets", t([1, 2]), t([0.0]), False, TypeError),
        ("2-D offsets", t([1, 2]), t([[0]]), False, ValueError),
        ("0-D offsets", t([1, 2]), t(0), False, ValueError),
        ("1-D input without offsets", t([1, 2]), None, False, ValueError),
        ("2-D input with offsets", t([[1, 2]]), t([0]), False, ValueError),
        ("3-D input", t([[[1]]]), None, False, ValueError),
        ("0-D input", t(1), t([0]), False, ValueError),
        ("empty offsets, include_last_offset", t([], dtype=long), t([], dtype=long), True, RuntimeError),
        ("ids not a tensor", [1, 2], t([0]), False, TypeError),
    ]
    return [pytest.param(*case[1:], id=case[0]) for case in cases]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize(("ids", "offsets", "last", "error"), _bad_inputs())
def test_bad_bag_inputs_raise_one_clear_error_in_every_layout(layout, mode, ids, offsets, last, error):
    """Bad EmbeddingBag inputs never reach a kernel: each raises one error type in every
    layout and mode (nn.EmbeddingBag's, except TypeError for dtypes and IndexError for ids,
    as nn.Embedding)."""
    q = _bag_module(layout, mode=mode, include_last_offset=last)
    args = (ids,) if offsets is None else (ids, offsets)
    with pytest.raises(error):
        q(*args)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("extra", [{}, {"max_norm": 1.0}, {"padding_idx": 3}, {"weighted": True}])
def test_ids_with_no_bag_give_no_rows_on_every_path(layout, mode, extra):
    """Empty offsets with ids: no bag, so a (0, dim) result (nn.EmbeddingBag's in sum and
    mean mode; torch 2.13 crashes in max mode), whichever kernel runs: the fused ones, or
    decode + torch.nn.functional (max_norm, padding_idx), not an offsets error there."""
    extra = dict(extra)
    weighted = extra.pop("weighted", False)
    if weighted and mode != "sum":
        pytest.skip("per_sample_weights are for sum mode")
    q = _bag_module(layout, mode=mode, **extra)
    ids = torch.tensor([1, 2, 3])
    empty = torch.tensor([], dtype=torch.int64)
    kwargs = {"per_sample_weights": torch.ones(3)} if weighted else {}
    out = q(ids, empty, **kwargs)
    assert out.shape == (0, q.embedding_dim)
    if mode != "max" and not weighted:
        ref = nn.EmbeddingBag.from_pretrained(q.dequantize(), mode=mode)
        assert ref(ids, empty).shape == out.shape


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_empty_and_edge_inputs_match_nn(layout, mode):
    q = _bag_module(layout, mode=mode)
    ref = nn.EmbeddingBag.from_pretrained(q.dequantize(), mode=mode)
    empty = torch.tensor([], dtype=torch.int64)
    cases = [
        (empty, torch.tensor([0])),  # one empty bag
        (empty, empty),  # no bag
        (torch.tensor([3, 4]), torch.tensor([0, 2])),  # a trailing empty bag
        (torch.zeros(0, 3, dtype=torch.int64), None),  # no 2-D bag
    ]
    for ids, offsets in cases:
        args = (ids,) if offsets is None else (ids, offsets)
        _close(q(*args), ref(*args))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bits", [8, 4])
def test_non_contiguous_inputs_and_weights_needing_grad(layout, bits):
    """Strided ids/offsets/weights (torch's FBGEMM ops refuse them) and weights that require
    grad (numpy() refuses them) are taken as nn.EmbeddingBag takes them."""
    q = _bag_module(layout, bits, dim=32, mode="sum")
    ref = nn.EmbeddingBag.from_pretrained(q.dequantize(), mode="sum")
    ids = torch.tensor([1, 9, 2, 9, 3, 9, 4, 9])[::2]
    offsets = torch.tensor([0, 0, 2, 0])[::2]
    weights = torch.rand(8)[::2]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # 4-bit dense rows go to embpress's kernel on several threads
    try:
        _close(q(ids, offsets), ref(ids, offsets))
        _close(q(ids, offsets, per_sample_weights=weights), ref(ids, offsets, per_sample_weights=weights))
        needs_grad = torch.rand(4, requires_grad=True)
        _close(
            q(ids, offsets, per_sample_weights=needs_grad).detach(),
            ref(ids, offsets, per_sample_weights=needs_grad).detach(),
        )
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("bits", [8.0, 4.0, "8", None])
def test_config_bits_must_be_an_int(bits):
    """A float ``bits`` used to pass (8.0 == 8) and fail in numba with a TypingError."""
    with pytest.raises(ValueError, match="bits"):
        QuantConfig(bits=bits)


def test_config_bits_numpy_int_is_stored_as_int():
    import numpy as np

    config = QuantConfig(bits=np.int64(4))
    assert type(config.bits) is int and config.bits == 4


@pytest.mark.parametrize("rows", [5, 40])
def test_saved_qparams_of_another_length_are_refused(rows):
    """Saved row parameters for another number of rows used to be read past their end."""
    weight = torch.randn(20, 8)
    saved = RowQParams(torch.ones(rows), torch.zeros(rows), torch.float32)
    with pytest.raises(ValueError, match="saved_qparams"):
        encode_table(weight, None, QuantConfig(layout="dense"), saved_qparams=saved)


def test_saved_qparams_of_another_dtype_are_refused():
    weight = torch.randn(20, 8)
    saved = RowQParams(torch.ones(20), torch.zeros(20), torch.float16)
    with pytest.raises(ValueError, match="saved_qparams"):
        encode_table(weight, None, QuantConfig(bits=8, layout="dense"), saved_qparams=saved)


def test_from_float_refuses_a_config_of_another_type():
    with pytest.raises(TypeError, match="config"):
        QuantizedEmbeddingBag.from_float(nn.EmbeddingBag(5, 4), {"bits": 4})  # type: ignore[arg-type]
