"""The encode kernel against a plain numpy statement of its rules, bit for bit: each row's
qparams from its kept range, codes, packed kept blocks, and the error figures in their
documented fixed order (so a file's reports are the same on every CPU)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from embpress.layouts._encode_kernels import (
    count_blocks,
    count_blocks_of_4,
    encode_rows,
    fake_quantize,
    kept_minmax,
)


def _fold_sum(values: np.ndarray) -> np.float32:
    """The kernel's order: zero-padded to a power of two (at least 8), halves folded onto
    each other down to 8 lanes, then ((0+1)+(2+3))+((4+5)+(6+7))."""
    span = 8
    while span < values.size:
        span *= 2
    p = np.zeros(span, dtype=np.float32)
    p[: values.size] = values
    h = span // 2
    while h >= 8:
        p[:h] = p[:h] + p[h : 2 * h]
        h //= 2
    return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]))


def _expected(w, ref, mask, bits, width, block_stream):
    rows, cols = w.shape
    levels = (1 << bits) - 1
    scale = np.zeros(rows, np.float32)
    offset = np.zeros(rows, np.float32)
    out: list[np.ndarray] = []
    err_sq, ref_sq, max_abs = np.zeros(rows), np.zeros(rows), np.zeros(rows, np.float32)
    for r in range(rows):
        kept = w[r][mask[r]]
        a, z = (kept.min(), kept.max()) if kept.size else (np.float32(0), np.float32(0))
        if a == 0:  # -0.0 orders below 0.0
            a = np.float32(-0.0) if np.signbit(kept[kept == 0]).any() else np.float32(0.0)
        if z == 0:
            z = np.float32(0.0) if (~np.signbit(kept[kept == 0])).any() else np.float32(-0.0)
        step = np.float32((np.float64(z) - np.float64(a)) / levels)
        if step == 0 and z > a:
            step = np.float32(2.0**-149)
        scale[r], offset[r] = step, a
        if step != 0:
            t = np.clip(np.rint((w[r] - a) / step), 0, levels).astype(np.float32)
        else:
            t = np.zeros(cols, np.float32)
        d = np.where(mask[r], (t * step + a) - ref[r], -ref[r]).astype(np.float32)
        err_sq[r] = _fold_sum(d * d)
        ref_sq[r] = _fold_sum(ref[r] * ref[r])
        max_abs[r] = np.abs(d).max() if cols else 0
        q = t.astype(np.uint8)
        if block_stream:
            for c0 in range(0, cols, width):
                if mask[r, c0]:
                    block = np.zeros(width, np.uint8)
                    block[: min(width, cols - c0)] = q[c0 : c0 + width]
                    out.append(block)
        else:
            out.append(np.where(mask[r], q, 0).astype(np.uint8))
    codes = np.concatenate(out) if out else np.zeros(0, np.uint8)
    return scale, offset, codes, err_sq, ref_sq, max_abs


@settings(max_examples=120, deadline=None)
@given(
    rows=st.integers(1, 70),  # past one task of ROWS_PER_TASK rows
    cols=st.integers(1, 70),  # below, at and past the 8 lanes and powers of two
    bits=st.sampled_from([8, 4, 2]),
    width=st.sampled_from([1, 3, 4, 8]),
    block_stream=st.booleans(),
    kind=st.sampled_from(["none", "blocks", "zeros"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_encode_rows_is_its_rules_bit_for_bit(rows, cols, bits, width, block_stream, kind, seed):
    rng = np.random.default_rng(seed)
    width = min(width, cols)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    if kind == "zeros":  # signed zeros, constant rows (scale 0) and all-pruned rows
        w[rng.random((rows, cols)) < 0.3] = -0.0
        w[::5] = 1.5
    ref = (w + rng.standard_normal((rows, cols)).astype(np.float32) * 0.01).astype(np.float32)
    nb = -(-cols // width)
    if kind == "none":
        mask = np.ones((rows, cols), bool)
    else:
        mask = np.repeat(rng.random((rows, nb)) < 0.5, width, axis=1)[:, :cols].copy()
    blocks = mask[:, ::width].sum(1)
    row_start = np.zeros(rows, np.int64)
    np.cumsum(blocks[:-1] * width, out=row_start[1:])
    size = int(blocks.sum()) * width if block_stream else rows * cols
    got_scale, got_offset = np.empty(rows, np.float32), np.empty(rows, np.float32)
    got_codes = np.full(size, 99, np.uint8)
    got_err, got_ref, got_max = np.empty(rows), np.empty(rows), np.empty(rows, np.float32)
    encode_rows(
        w, ref, mask, kind != "none", got_scale, got_offset, np.zeros(rows, np.uint8),
        bits, width, block_stream, row_start, got_codes, got_err, got_ref, got_max, True,
    )  # fmt: skip
    scale, offset, codes, err_sq, ref_sq, max_abs = _expected(w, ref, mask, bits, width, block_stream)
    np.testing.assert_array_equal(got_offset.view(np.int32), offset.view(np.int32))  # -0.0 too
    np.testing.assert_array_equal(got_scale, scale)
    np.testing.assert_array_equal(got_codes, codes)
    np.testing.assert_array_equal(got_err, err_sq)
    np.testing.assert_array_equal(got_ref, ref_sq)
    np.testing.assert_array_equal(got_max, max_abs)


def test_kept_range_orders_signed_zeros_and_skips_pruned_entries() -> None:
    w = np.array([[0.0, -0.0, 2.0], [-3.0, 5.0, 1.0], [7.0, 8.0, 9.0]], np.float32)
    mask = np.array([[1, 1, 1], [0, 0, 1], [0, 0, 0]], bool)
    lo, hi = np.full(3, np.nan, np.float32), np.full(3, np.nan, np.float32)
    kept_minmax(w, mask, True, lo, hi)
    assert lo.view(np.int32).tolist() == np.array([-0.0, 1.0, 0.0], np.float32).view(np.int32).tolist()
    assert hi.tolist() == [2.0, 1.0, 0.0]
    kept_minmax(w, mask, False, lo, hi)
    assert lo.tolist() == [-0.0, -3.0, 7.0] and hi.tolist() == [2.0, 5.0, 9.0]


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(0, 40), blocks=st.integers(1, 80), p=st.floats(0, 1), seed=st.integers(0, 2**31 - 1))
def test_counts_of_4_wide_blocks_are_the_general_counts(rows, blocks, p, seed):
    """Per row: kept entries, blocks with a kept entry, mixed blocks, the bitmap (past one
    32-block word, with blocks that mix kept and pruned entries)."""
    mask = np.random.default_rng(seed).random((rows, 4 * blocks)) < p

    def outputs():
        counts = [np.full(rows, -1, dtype=np.int64) for _ in range(3)]
        return [*counts, np.zeros((rows, -(-blocks // 32)), dtype=np.uint32)]

    got, want = outputs(), outputs()
    got[3][:] = 0xFFFFFFFF  # every word is written, whatever it held
    count_blocks_of_4(mask.view(np.uint32), *got)
    count_blocks(mask, 4, *want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(0, 20), cols=st.integers(1, 40), bits=st.sampled_from([8, 4, 2]),
    seed=st.integers(0, 2**31 - 1),
)  # fmt: skip
def test_fake_quantize_is_dequantize_of_quantize(rows, cols, bits, seed):
    """Codes round half to even and clamp to [0, levels]; a zero scale gives code 0 (the
    row's offset); ranges narrower than the row clip it."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    lo = (w.min(1, initial=0) * rng.uniform(0.5, 1.0, rows)).astype(np.float32)
    scale = ((w.max(1, initial=0) - lo) * rng.uniform(0.5, 1.0, rows) / (2**bits - 1)).astype(np.float32)
    scale[::3] = 0
    levels = 2**bits - 1
    safe = np.where(scale == 0, 1, scale)[:, None]
    codes = np.where(scale[:, None] == 0, 0, np.clip(np.rint((w - lo[:, None]) / safe), 0, levels))
    want = codes.astype(np.float32) * scale[:, None] + lo[:, None]
    out = np.full_like(w, np.nan)
    fake_quantize(w, scale, lo, bits, out)
    np.testing.assert_array_equal(out, want)
