"""Row-wise quantization: error bounds, exact zeros, representable qparams, packing, range search."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from embpress import QuantConfig
from embpress.quant import (
    choose_qparams,
    dequantize_codes,
    pack_codes,
    quantize_rows,
    row_ranges,
    search_ranges,
    unpack_codes,
)

DTYPES = [torch.float32, torch.float16]
# smallest positive value of each scale dtype: below it a row's range cannot be resolved
RESOLUTION = {torch.float32: 2.0**-149, torch.float16: 2.0**-24}
finite = st.floats(-50.0, 50.0, allow_nan=False, width=32)


def tables(max_rows=6, max_cols=24):
    return st.tuples(st.integers(1, max_rows), st.integers(1, max_cols)).flatmap(
        lambda s: arrays(np.float32, s, elements=finite)
    )


@settings(max_examples=150, deadline=None)
@given(w=tables(), bits=st.sampled_from([8, 4, 2]), dtype=st.sampled_from(DTYPES))
@example(w=np.array([[0.0, 2.1869e-41]], dtype=np.float32), bits=8, dtype=torch.float32)
def test_kept_entries_within_half_a_step(w, bits, dtype):
    x = torch.from_numpy(w)
    lo, hi = row_ranges(x, None)
    qp = choose_qparams(lo, hi, bits, dtype)
    decoded = dequantize_codes(quantize_rows(x, qp, bits), qp.scale, qp.offset)
    # the stored scale is exact only to the scale dtype's resolution (a subnormal scale,
    # as for the example's row, is far coarser than its range over 2**bits - 1), and the
    # top code multiplies that rounding 2**bits - 1 times
    resolution = ((1 << bits) - 1) * RESOLUTION[dtype]
    bound = qp.scale.unsqueeze(1) / 2 * (1 + 1e-5) + 1e-6 * x.abs().amax(1, keepdim=True) + resolution
    assert bool(((decoded - x).abs() <= bound).all())


@settings(max_examples=150, deadline=None)
@given(w=tables(), bits=st.sampled_from([8, 4, 2]), dtype=st.sampled_from(DTYPES))
def test_zero_rows_decode_zero_exactly_and_keep_the_bound(w, bits, dtype):
    x = torch.from_numpy(w)
    lo, hi = row_ranges(x, None)
    qp = choose_qparams(lo, hi, bits, dtype, zero_rows=torch.ones(x.shape[0], dtype=torch.bool))
    # stored values are exact in the storage dtype, so no rounding happens when written
    assert torch.equal(qp.scale.to(dtype).float(), qp.scale)
    assert torch.equal(qp.offset.to(dtype).float(), qp.offset)
    zero = dequantize_codes(qp.zero_codes().unsqueeze(1), qp.scale, qp.offset)
    assert bool((zero == 0).all())
    # also with a fused multiply-add, as FBGEMM kernels may compute it
    z = qp.zero_codes().double()
    assert bool((z * qp.scale.double() + qp.offset.double() == 0).all())
    decoded = dequantize_codes(quantize_rows(x, qp, bits), qp.scale, qp.offset)
    bound = qp.scale.unsqueeze(1) / 2 * (1 + 1e-5) + 1e-6 * x.abs().amax(1, keepdim=True) + RESOLUTION[dtype]
    assert bool(((decoded - x).abs() <= bound).all())


def test_zero_grid_costs_little_at_eight_bits():
    x = torch.randn(2000, 64)
    lo, hi = row_ranges(x, None)
    plain = choose_qparams(lo, hi, 8, torch.float32)
    zero = choose_qparams(lo, hi, 8, torch.float32, zero_rows=torch.ones(2000, dtype=torch.bool))
    assert float((zero.scale / plain.scale).mean()) < 1.01


def test_constant_row_decodes_exactly():
    x = torch.full((3, 5), 0.375)
    lo, hi = row_ranges(x, None)
    qp = choose_qparams(lo, hi, 4, torch.float16)
    assert torch.equal(dequantize_codes(quantize_rows(x, qp, 4), qp.scale, qp.offset), x)


def test_ranges_ignore_pruned_entries():
    x = torch.tensor([[5.0, 1.0, 2.0, -7.0]])
    kept = torch.tensor([[False, True, True, False]])
    lo, hi = row_ranges(x, kept)
    assert (float(lo[0]), float(hi[0])) == (1.0, 2.0)
    lo, hi = row_ranges(x, torch.zeros_like(kept))
    assert (float(lo[0]), float(hi[0])) == (0.0, 0.0)


@pytest.mark.parametrize("bits", [4, 2])
def test_range_search_lowers_squared_error(bits):
    torch.manual_seed(0)
    x = torch.randn(500, 64) * torch.rand(500, 1)
    x[:, 0] *= 6  # outliers: where clipping pays
    lo, hi = row_ranges(x, None)
    plain = choose_qparams(lo, hi, bits, torch.float32)
    slo, shi = search_ranges(x, None, lo, hi, bits)
    searched = choose_qparams(slo, shi, bits, torch.float32)
    assert bool((slo >= lo).all() and (shi <= hi).all())

    def sq_err(qp):
        return ((dequantize_codes(quantize_rows(x, qp, bits), qp.scale, qp.offset) - x) ** 2).sum(1)

    e_plain, e_search = sq_err(plain), sq_err(searched)
    assert float(e_search.sum()) < 0.95 * float(e_plain.sum())
    assert float((e_search <= e_plain * 1.02 + 1e-9).float().mean()) > 0.97


@settings(max_examples=100, deadline=None)
@given(
    bits=st.sampled_from([1, 2, 4, 8]),
    shape=st.tuples(st.integers(0, 5), st.integers(0, 33)),
    seed=st.integers(0, 1000),
)
def test_pack_round_trip(bits, shape, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape[-1] == -(-shape[1] * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, shape[1]), codes)


def test_packing_matches_fbgemm_nibble_order():
    w = torch.randn(4, 8)
    fused = torch.ops.quantized.embedding_bag_4bit_prepack(w)
    scale = fused[:, 4:6].contiguous().view(torch.float16).float()
    offset = fused[:, 6:8].contiguous().view(torch.float16).float()
    codes = unpack_codes(fused[:, :4], 4, 8)
    ours = codes.float() * scale + offset
    unpacked = torch.ops.quantized.embedding_bag_4bit_unpack(fused)
    assert torch.allclose(ours, unpacked)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(bits=3),
        dict(bits=True),
        dict(scale_dtype=torch.bfloat16),
        dict(layout="csr"),
        dict(nonfinite="ignore"),
        dict(range_search="yes"),
    ],
)
def test_bad_config(kwargs):
    with pytest.raises(ValueError):
        QuantConfig(**kwargs)


def test_config_defaults_follow_fbgemm():
    assert QuantConfig(bits=8).resolved_scale_dtype == torch.float32
    assert QuantConfig(bits=4).resolved_scale_dtype == torch.float16
    assert not QuantConfig(bits=8).resolved_range_search
    assert QuantConfig(bits=2).resolved_range_search


def test_fp16_overflow_is_a_clear_error():
    x = torch.tensor([[-1e6, 1e6]])
    lo, hi = row_ranges(x, None)
    with pytest.raises(ValueError, match="float32"):
        choose_qparams(lo, hi, 4, torch.float16)


@settings(max_examples=100, deadline=None)
@given(w=tables(max_rows=5, max_cols=12), bits=st.sampled_from([8, 4, 2]))
def test_encode_kernel_matches_the_torch_reference_path(w, bits):
    """The numba encoder (float32 qparams derived in-kernel) equals choose_qparams + quantize_rows."""
    from embpress.layouts import encode_table

    x = torch.from_numpy(w)
    table, _ = encode_table(
        x, None, QuantConfig(bits=bits, scale_dtype=torch.float32, range_search=False, layout="block_sparse")
    )
    lo, hi = row_ranges(x, None)
    qp = choose_qparams(lo, hi, bits, torch.float32)
    expected = dequantize_codes(quantize_rows(x, qp, bits), qp.scale, qp.offset)
    assert torch.equal(table.dequantize(), expected)
