"""The mixed layout on genuinely mixed tables (several classes, pruned, levels, colbook) and
the per-row codecs it stores.

The layout contract suite (``test_layout_contract.py``) covers the mixed layout through the
uniform encoder (a pruned and a rowwise class); here the tables come from
``MixedTable.build``: decoding equals a numpy decoder written from docs/format.md, pruned
rows are exact zeros, bytes equal ``predicted_size``, bags equal torch's on the dequantized
table, files round-trip, every field that does not fit is refused, the ops and
torch.compile serve it, and the codecs' errors are what the built tables hold.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_layout_contract import _tampered_meta, _tampered_tensors
from torch import nn

import embpress
from embpress import QuantConfig, QuantizedEmbedding, QuantizedEmbeddingBag
from embpress.layouts import TABLE_CLASSES, FormatError, mixed
from embpress.layouts.lookup import Bags
from embpress.layouts.mixed import MixedKernelTable, MixedTable
from embpress.quant.codecs import CODECS, KINDS, Codec, row_errors
from embpress.quant.rowwise import choose_qparams, row_ranges, search_ranges

P = Codec.parse
MIXES = [
    ("pruned", "rowwise8", "levels2", "colbook4"),
    ("levels1", "colbook1", "rowwise2", "colbook2"),
    ("rowwise4", "pruned"),
    ("levels2",),
    ("pruned",),
]


def _table(names, rows=700, dim=20, seed=0, row_weights=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, dim, generator=g) * torch.rand(rows, 1, generator=g) * 3
    codecs = [P(n) for n in names]
    a = np.random.default_rng(seed).integers(0, len(codecs), rows)
    return w, a, codecs, MixedTable.build(w, a, codecs, row_weights)


def _reference_decode(meta, tensors):
    """The whole table decoded by numpy from the tensors, as docs/format.md describes them."""
    rows, dim = meta["num_embeddings"], meta["embedding_dim"]
    codecs = [P(n) for n in meta["codecs"].split(",")]
    half = meta["scale_dtype"] == "float16"
    packed = tensors["class_ids"].numpy()
    ids = ((packed[:, None] >> np.array([0, 2, 4, 6], dtype=np.uint8)) & 3).reshape(-1)[:rows]
    payload, books = tensors["payload"].numpy(), tensors["colbooks"].numpy()
    out = np.zeros((rows, dim), dtype=np.float32)
    start = book = 0
    for c, codec in enumerate(codecs):
        members = np.flatnonzero(ids == c)
        rb = codec.row_bytes(dim, torch.float16 if half else torch.float32)
        seg = payload[start : start + len(members) * rb].reshape(len(members), rb)
        start += len(members) * rb
        if codec.kind == "pruned":
            continue
        b = codec.bits
        j = np.arange(dim)
        codes = (seg[:, j * b // 8] >> ((j * b) % 8).astype(np.uint8)) & ((1 << b) - 1)
        at = (dim * b + 7) // 8
        if codec.kind == "rowwise":
            params = seg[:, at:].copy().view(np.float16 if half else np.float32).astype(np.float32)
            out[members] = codes.astype(np.float32) * params[:, :1] + params[:, 1:]
        elif codec.kind == "levels":
            levels = seg[:, at:].copy().view(np.float16).astype(np.float32)
            out[members] = np.take_along_axis(levels, codes.astype(np.int64), 1)
        else:
            k = 1 << b
            table = books[book : book + dim * k].reshape(dim, k)
            book += dim * k
            out[members] = table[j, codes]
    return torch.from_numpy(out)


# ------------------------------------------------------------------ codecs
def test_codec_names_sizes_and_parsing():
    names = "pruned rowwise8 rowwise4 rowwise2 levels2 levels1 colbook4 colbook2 colbook1"
    assert [c.name for c in CODECS] == names.split()
    for c in CODECS:
        assert Codec.parse(c.name) == c and KINDS[c.kind_id] == c.kind
    assert P("rowwise4").row_bytes(13) == 7 + 4 and P("levels2").row_bytes(13) == 4 + 8
    assert P("levels1").row_bytes(13) == 2 + 4 and P("colbook1").row_bytes(13) == 2
    assert P("colbook4").shared_bytes(13) == 13 * 16 * 4 and P("levels2").shared_bytes(13) == 0
    assert P("pruned").row_bytes(13) == 0 and P("rowwise8").row_bytes(13, torch.float32) == 13 + 8
    for bad in ("rowwise3", "levels4", "", "pruned0", "colbook8"):
        with pytest.raises(ValueError):
            Codec.parse(bad)
    for kind, bits in (("rowwise", 1), ("levels", 8), ("hash", 2), ("rowwise", True), ("rowwise", 8.0)):
        with pytest.raises(ValueError):
            Codec(kind, bits)


def test_rowwise_qparams_are_choose_qparams_in_float16():
    """The fused scale/offset kernel gives ``choose_qparams``' float16 values exactly, on
    the searched clipping ranges at 4 bits and on min/max otherwise."""
    from embpress.quant.codecs import _rowwise_qparams

    g = np.random.default_rng(1)
    x = (g.standard_normal((3000, 9)) * np.exp(g.uniform(-20, 9, (3000, 1)))).astype(np.float32)
    x[:4] = 0.0
    rows = np.arange(3000)
    for bits in (8, 4, 2):
        scale, offset, bad = _rowwise_qparams(x, rows, bits)
        assert not bad.any()
        lo, hi = row_ranges(torch.from_numpy(x), None)
        if bits == 4:
            searched = search_ranges(torch.from_numpy(x), None, lo, hi, bits)
            assert bool((searched[0] > lo).any())  # the search clips some rows
            lo, hi = searched
        qp = choose_qparams(lo, hi, bits, torch.float16)
        assert np.array_equal(qp.scale.numpy(), scale) and np.array_equal(qp.offset.numpy(), offset)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 400), min_size=1, max_size=60, unique=True))
def test_rowwise_rows_code_as_in_the_whole_table_whatever_rows_are_with_them(rows):
    """The clipping-range search pairs rows (2k, 2k + 1) and a row's sums can depend on
    which of the pair it is: a class of any rows, in any order, holds the errors (and so
    the ranges) the whole table's search gives those rows."""
    from embpress.quant import codecs
    from embpress.quant.codecs import _parity_order, encode_rows

    g = np.random.default_rng(0)
    x = g.standard_normal((401, 16)).astype(np.float32)
    idx = np.array(rows, dtype=np.int64)
    seq, pos = _parity_order(idx)
    assert np.array_equal(seq[pos], idx) and np.array_equal(pos % 2, idx % 2)
    assert seq.shape[0] <= 2 * idx.shape[0]
    whole = encode_rows(x, None, Codec("rowwise", 4))[0]
    assert np.array_equal(encode_rows(x, idx, Codec("rowwise", 4))[0], whole[idx])
    kept = codecs._SEARCH_BYTES
    codecs._SEARCH_BYTES = 3 * 2 * 16 * 4  # the rows copied and searched 6 at a time
    try:
        assert np.array_equal(encode_rows(x, idx, Codec("rowwise", 4))[0], whole[idx])
    finally:
        codecs._SEARCH_BYTES = kept


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_rowwise_rows_are_the_uniform_tables_rows(bits):
    """A class of rowwise rows stores what ``QuantConfig``'s uniform dense codes store
    (float16 scales): at 4 bits with the clipping-range search, which the planner's
    rowwise4 rows share (wherever uniform 4-bit fits a budget, the planner can do at
    least as well); at 8 and 2 bits on min/max."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(300, 24, generator=g) * torch.rand(300, 1, generator=g) * 3
    table = MixedTable.build(w, np.zeros(300, np.int64), [Codec("rowwise", bits)])
    bag = nn.EmbeddingBag.from_pretrained(w, mode="sum")
    uniform = QuantizedEmbeddingBag.from_float(
        bag, QuantConfig(bits=bits, scale_dtype=torch.float16, layout="dense", range_search=bits == 4)
    )
    assert torch.equal(table.dequantize(), uniform.table.dequantize())


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_row_errors_are_the_errors_of_the_built_table(codec):
    """row_errors predicts, row by row, the squared error of the table built with that codec
    for every row (colbook: the same book, fitted on all rows with the same weights)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(500, 24, generator=g) * torch.rand(500, 1, generator=g)
    weights = np.random.default_rng(0).random(500)
    errors = row_errors(w.numpy(), codec, weights)
    table = MixedTable.build(w, np.zeros(500, np.int64), [codec], weights)
    actual = ((table.dequantize().double() - w.double()) ** 2).sum(1).numpy()
    np.testing.assert_allclose(errors, actual, rtol=1e-4, atol=1e-9)


def test_row_errors_refuse_bad_input():
    w = np.ones((4, 3), np.float32)
    with pytest.raises(TypeError, match="codec"):
        row_errors(w, "rowwise8")
    with pytest.raises(ValueError, match="NaN"):
        row_errors(np.full((4, 3), np.nan, np.float32), P("levels2"))
    with pytest.raises(ValueError, match="row_weights"):
        row_errors(w, P("colbook2"), np.ones(3))
    with pytest.raises(ValueError, match="row_weights"):
        row_errors(w, P("colbook2"), -np.ones(4))
    with pytest.raises(ValueError, match="2-D"):
        row_errors(np.ones(3, np.float32), P("rowwise4"))
    big = np.full((2, 3), 1e6, np.float32)  # beyond float16: infeasible, not an error
    assert np.isinf(row_errors(big, P("rowwise4"))).all() and np.isinf(row_errors(big, P("levels1"))).all()
    assert np.isfinite(row_errors(big, P("colbook1"))).all()


def _uniform_error(x: np.ndarray, bits: int) -> float:
    """Squared error of uniform min/max codes with float16 scale and offset (``bits`` 1 or 2)."""
    lo, hi = x.min(1), x.max(1)
    qp = choose_qparams(torch.from_numpy(lo), torch.from_numpy(hi), bits, torch.float16)
    s, o = qp.scale.numpy()[:, None], qp.offset.numpy()[:, None]
    codes = np.clip(np.rint((x - o) / np.where(s == 0, 1, s)), 0, (1 << bits) - 1)
    return float(((codes * s + o - x) ** 2).sum())


@settings(max_examples=25, deadline=None)
@given(st.integers(8, 256), st.sampled_from(["gauss", "laplace", "t3"]), st.integers(0, 2**31 - 1))
def test_levels_beat_uniform_codes_on_non_uniform_rows(dim, kind, seed):
    """On Gaussian and heavier-tailed rows, k-means levels have a lower squared error than
    uniform min/max codes at the same bits: at 1 bit in the same bytes (D/8 + 4), at 2 bits
    with 4 more bytes per row (4 float16 levels instead of scale and offset)."""
    g = np.random.default_rng(seed)
    x = {
        "gauss": lambda: g.standard_normal((200, dim)),
        "laplace": lambda: g.laplace(size=(200, dim)),
        "t3": lambda: g.standard_t(3, size=(200, dim)),
    }[kind]().astype(np.float32)
    assert P("levels1").row_bytes(dim) == (dim + 7) // 8 + 4  # = uniform 1-bit with float16 scale, offset
    assert row_errors(x, P("levels1")).sum() < _uniform_error(x, 1)
    assert row_errors(x, P("levels2")).sum() < row_errors(x, P("rowwise2")).sum()
    assert row_errors(x, P("rowwise2")).sum() == pytest.approx(_uniform_error(x, 2), rel=1e-4)


# ------------------------------------------------------------------ building and decoding
@pytest.mark.parametrize("names", MIXES, ids="/".join)
def test_decode_equals_a_numpy_decoder_and_pruned_rows_are_zero(names):
    _, a, codecs, table = _table(names)
    ref = _reference_decode(table.meta(), table.tensors())
    deq = table.dequantize()
    assert torch.equal(deq, ref)
    ids = torch.randint(0, 700, (300,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(table.decode_rows(ids), ref[ids])
    # one id per bag, unweighted: the kernel's sum is the decoded row, bit for bit
    assert torch.equal(table.fast_bag(ids, torch.arange(301), 0, None), ref[ids])
    for c, codec in enumerate(codecs):
        rows = torch.from_numpy(a == c)
        if codec.kind == "pruned":
            assert bool((deq[rows] == 0).all())
        else:
            assert bool((deq[rows] != 0).any())
    assert table.class_rows == tuple(np.bincount(a, minlength=len(codecs)).tolist())
    assert (
        table.num_pruned == sum(int((a == c).sum()) for c, k in enumerate(codecs) if k.kind == "pruned") * 20
    )


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.sampled_from(CODECS), min_size=1, max_size=4),
    st.integers(1, 600),
    st.integers(1, 40),
    st.integers(0, 2**31 - 1),
    st.booleans(),
)
def test_built_tables_hold_their_predicted_bytes_and_decode_as_documented(codecs, rows, dim, seed, weighted):
    g = np.random.default_rng(seed)
    w = torch.from_numpy(g.standard_normal((rows, dim)).astype(np.float32))
    a = g.integers(0, len(codecs), rows)
    row_weights = g.random(rows) if weighted else None
    table = MixedTable.build(w, a, codecs, row_weights)
    class_rows = np.bincount(a, minlength=len(codecs)).tolist()
    assert table.nbytes == MixedTable.predicted_size(rows, dim, class_rows, codecs)
    ref = _reference_decode(table.meta(), table.tensors())
    assert torch.equal(table.dequantize(), ref)
    ids = torch.from_numpy(g.integers(0, rows, 50))
    bounds = torch.tensor([0, 0, 7, 20, 50])
    weights = torch.from_numpy(g.standard_normal(50).astype(np.float32))
    for mode, psw in ((0, None), (1, None), (0, weights)):
        got = table.fast_bag(ids, bounds, mode, psw)
        want = F.embedding_bag(
            ids, ref, bounds[:-1], mode="sum" if mode == 0 else "mean", per_sample_weights=psw
        )
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


CHUNK_MIXES = [MIXES[0], MIXES[1], ("colbook4", "rowwise4"), ("colbook1", "rowwise8"), ("levels1", "levels2")]


@pytest.mark.parametrize("dim", [5, 16, 37, 64, 80, 128, 136, 208, 256])
@pytest.mark.parametrize("names", CHUNK_MIXES, ids="/".join)
def test_bag_kernels_vector_chunks_at_every_width(names, dim):
    """Every split of a row into the kernel's walks (128, 64 and 16 values at a time, the
    last ``dim % 16`` values id by id): one-id bags are the decoded rows bit for bit;
    longer, empty, weighted and mean bags, and bags shorter than the walk's look-ahead,
    equal torch's on the decoded table."""
    _, _, _, table = _table(names, rows=300, dim=dim, seed=dim)
    ref = _reference_decode(table.meta(), table.tensors())
    g = torch.Generator().manual_seed(dim)
    ids = torch.randint(0, 300, (400,), generator=g)
    assert torch.equal(table.fast_bag(ids, torch.arange(401), 0, None), ref[ids])
    bounds = torch.tensor([0, 1, 3, 40, 40, 341, 400])
    weights = torch.randn(400, generator=g)
    for mode, psw in ((0, None), (1, None), (0, weights)):
        got = table.fast_bag(ids, bounds, mode, psw)
        want = F.embedding_bag(
            ids, ref, bounds[:-1], mode="sum" if mode == 0 else "mean", per_sample_weights=psw
        )
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)  # 300-id sums: rounding order


def test_bags_count_out_of_range_ids():
    _, _, _, table = _table(MIXES[0])
    for bad in (700, -1):
        with pytest.raises(IndexError, match="out of range"):
            table.fast_bag(torch.tensor([0, bad, 3]), torch.tensor([0, 2, 3]), 0, None)


def test_kernel_table_fields_are_the_kernels_parameters():
    from embpress.layouts._mixed_kernels import mixed_bag

    parameters = list(inspect.signature(mixed_bag.py_func).parameters)
    assert parameters == [*MixedKernelTable._fields, *Bags._fields, "threads", "out"]


@pytest.mark.parametrize("seed", range(6))
def test_the_kernels_books_start_on_a_cache_line_and_hold_the_books(seed):
    """The kernel reads a level's values of 16 columns at a time: its copy of the books
    starts on a 64-byte boundary (whatever numpy's allocator gave), level-major below
    ``GATHER_BITS`` bits, as stored at that width."""
    *_, table = _table(["colbook2", "colbook4", "colbook1", "rowwise8"], dim=16, seed=seed)
    sb = table.kernel_table().sb
    assert sb.ctypes.data % 64 == 0
    books = table.colbooks.numpy()
    for codec, at in zip(table.codecs, table.book_base, strict=True):
        if codec.kind != "colbook":
            continue
        size = 16 << codec.bits
        book = books[at : at + size].reshape(16, 1 << codec.bits)
        expect = book if codec.bits >= mixed.GATHER_BITS else book.T
        np.testing.assert_array_equal(sb[at : at + size], expect.reshape(-1))


def test_the_tables_decoder_ids_are_the_kernels_order():
    """``MixedTable.kernel_table`` names each class's decoder by its place in ``CODECS``
    (pruned first, -1); the kernel's ``VARIANTS`` are that order (the kernel file is not
    imported to build the table)."""
    from embpress.layouts import _mixed_kernels

    kernel_order = [(KINDS[kind], bits) for kind, bits in _mixed_kernels.VARIANTS]
    assert [(c.kind, c.bits) for c in CODECS] == [("pruned", 0), *kernel_order]
    assert mixed.GATHER_BITS == _mixed_kernels.GATHER_BITS  # which books kernel_table transposes
    _, _, _, table = _table(MIXES[0])
    assert table.kernel_table().variant.tolist() == [-1, 0, 3, 5]


def test_build_refuses_bad_input():
    w = torch.randn(10, 4)
    codecs = [P("rowwise8"), P("pruned")]
    with pytest.raises(ValueError, match="assignment"):
        MixedTable.build(w, np.zeros(9, np.int64), codecs)
    with pytest.raises(ValueError, match="assignment"):
        MixedTable.build(w, np.full(10, 2), codecs)
    with pytest.raises(ValueError, match="assignment"):
        MixedTable.build(w, np.zeros(10, np.float32), codecs)
    with pytest.raises(ValueError, match="1 to 4 codecs"):
        MixedTable.build(w, np.zeros(10, np.int64), [P("pruned")] * 5)
    with pytest.raises(TypeError, match="Codec"):
        MixedTable.build(w, np.zeros(10, np.int64), ["rowwise8"])
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        MixedTable.build(w.numpy(), np.zeros(10, np.int64), codecs)
    with pytest.raises(ValueError, match="NaN"):
        MixedTable.build(torch.full((10, 4), float("nan")), np.zeros(10, np.int64), codecs)
    with pytest.raises(ValueError, match="row_weights"):
        MixedTable.build(w, np.zeros(10, np.int64), codecs, np.full(10, np.nan))
    with pytest.raises(ValueError, match="float16"):
        MixedTable.build(w * 1e6, np.zeros(10, np.int64), codecs)
    with pytest.raises(ValueError, match="class_rows"):
        MixedTable.predicted_size(10, 4, [5, 4], codecs)


# ------------------------------------------------------------------ files and fields
@pytest.mark.parametrize("names", MIXES, ids="/".join)
def test_round_trip_through_tensors_and_a_file(tmp_path, names):
    _, _, _, table = _table(names)
    again = MixedTable.from_tensors(table.meta(), table.tensors())
    assert torch.equal(again.dequantize(), table.dequantize()) and again.meta() == table.meta()
    model = nn.Sequential(QuantizedEmbeddingBag(table, mode="sum"), QuantizedEmbedding(table))
    embpress.save(model, tmp_path / "m.safetensors")
    fresh = embpress.load(
        nn.Sequential(nn.EmbeddingBag(700, 20, mode="sum"), nn.Embedding(700, 20)), tmp_path / "m.safetensors"
    )
    assert fresh[0].layout == "mixed" and torch.equal(fresh[0].dequantize(), table.dequantize())
    assert fresh[0].nbytes == table.nbytes
    ids = torch.tensor([[1, 699, 5], [0, 0, 300]])
    assert torch.equal(fresh[1](ids), model[1](ids))


def _mixed_tampering(meta, tensors):
    """Mixed-specific fields that do not fit: (what, meta, tensors)."""
    ids, rank = tensors["class_ids"], tensors["class_rank"]
    yield "codecs not a string", {**meta, "codecs": 3}, tensors
    yield "unknown codec", {**meta, "codecs": meta["codecs"].replace("levels2", "levels3")}, tensors
    yield "codecs reordered", {**meta, "codecs": ",".join(reversed(meta["codecs"].split(",")))}, tensors
    yield "five codecs", {**meta, "codecs": meta["codecs"] + ",pruned"}, tensors
    yield "bits 2", {**meta, "bits": 2}, tensors
    yield "bits true", {**meta, "bits": True}, tensors
    yield "num_pruned below the pruned rows", {**meta, "num_pruned": 0}, tensors
    padded = ids.clone()
    padded[-1] = 0x40  # the last padding slot (700 rows: 768 slots) set to class 1
    yield "a padding id", meta, {**tensors, "class_ids": padded}
    swapped = ids.clone()
    swapped[0] = (swapped[0] & 0xFC) | ((swapped[0] + 1) & 3)
    yield "an id changed", meta, {**tensors, "class_ids": swapped}
    off = rank.clone()
    off[1, 0] += 1
    yield "a rank entry", meta, {**tensors, "class_rank": off}
    for name, where in (("payload", None), ("colbooks", 5)):
        t = tensors[name].clone()
        if name == "colbooks":
            t[where] = float("nan")
        else:  # the first rowwise8 row's scale: after class 0 (pruned), codes of 20 bytes
            t.view(-1)[20:24] = torch.tensor([float("inf")]).view(torch.uint8)
        yield f"{name} non-finite", meta, {**tensors, name: t}


def test_every_field_that_does_not_fit_is_refused():
    _, _, _, table = _table(MIXES[0])
    meta, tensors = table.meta(), table.tensors()
    for what, bad in _tampered_tensors(tensors):
        if what == "an extra tensor":
            continue
        with pytest.raises(FormatError):
            MixedTable.from_tensors(meta, bad)
            pytest.fail(f"{what} was accepted")
    for what, bad in _tampered_meta(meta):
        with pytest.raises(FormatError):
            MixedTable.from_tensors(bad, tensors)
            pytest.fail(f"{what} was accepted")
    for what, bad_meta, bad_tensors in _mixed_tampering(meta, tensors):
        with pytest.raises(FormatError):
            MixedTable.from_tensors(bad_meta, bad_tensors)
            pytest.fail(f"{what} was accepted")
    # a table without a rowwise class has no use for a float32 scale dtype
    _, _, _, plain = _table(("levels2", "colbook1"))
    with pytest.raises(FormatError, match="scale_dtype"):
        MixedTable.from_tensors({**plain.meta(), "scale_dtype": "float32"}, plain.tensors())


# ------------------------------------------------------------------ ops and compile
def test_ops_views_and_compile_serve_mixed_tables():
    _, _, _, table = _table(MIXES[0])
    assert TABLE_CLASSES["mixed"] is MixedTable
    bag = QuantizedEmbeddingBag(table, mode="mean", padding_idx=3)
    emb = QuantizedEmbedding(table)
    deq = table.dequantize()
    ids = torch.tensor([3, 0, 7, 7, 699, 1, 0, 22])
    offsets = torch.tensor([0, 2, 2, 5])
    want = F.embedding_bag(ids, deq, offsets, mode="mean", padding_idx=3)
    torch.testing.assert_close(bag(ids, offsets), want, rtol=1e-5, atol=1e-5)
    view = MixedTable.from_op_args(
        table.op_tensors(), 700, 20, table.bits, table.scale_dtype, table.layout_args()
    )
    assert torch.equal(view.decode_rows(ids), deq[ids])
    assert torch.equal(view.fast_bag(ids, torch.arange(9), 0, None), deq[ids])
    with pytest.raises(ValueError, match="layout_args"):
        MixedTable.from_op_args(table.op_tensors(), 700, 20, table.bits, table.scale_dtype, [9, 9])
    got = torch.ops.embpress.embedding_bag(
        table.op_tensors(), *table.op_fields(), ids, offsets, None, 0, False, None, None, 2.0
    )
    torch.testing.assert_close(got, F.embedding_bag(ids, deq, offsets, mode="sum"), rtol=1e-5, atol=1e-5)
    key = torch._C.DispatchKey.CompositeExplicitAutograd  # the plain-torch kernel (other devices)
    plain = torch.ops.embpress.embedding_bag.default._op_dk(
        key, table.op_tensors(), *table.op_fields(), ids, offsets, None, 0, False, None, None, 2.0
    )
    torch.testing.assert_close(plain, got, rtol=1e-5, atol=1e-5)
    torch.compiler.reset()
    model = nn.ModuleDict({"bag": bag, "emb": emb})

    def forward(ids, offsets, grid):
        return model["bag"](ids, offsets) + model["emb"](grid).sum(1)

    compiled = torch.compile(forward, fullgraph=True, backend="eager", dynamic=True)
    grid = ids.view(4, 2)
    with torch.inference_mode():
        assert torch.equal(compiled(ids, offsets, grid), forward(ids, offsets, grid))


def test_load_state_dict_of_other_class_rows_takes_their_geometry():
    """Two tables with the same codecs and buffer shapes but other rows in each class (7
    rows of 24 bytes against 12 of 14): after ``load_state_dict`` lookups use the loaded
    table's class offsets, not the ones derived from the buffers before."""
    codecs = [P("pruned"), P("rowwise8"), P("rowwise4")]
    w = torch.randn(700, 20, generator=torch.Generator().manual_seed(1))
    a, b = np.zeros(700, dtype=np.int64), np.zeros(700, dtype=np.int64)
    a[::100] = 1
    b[5:65:5] = 2
    table, other = MixedTable.build(w, a, codecs), MixedTable.build(w * 2, b, codecs)
    assert [t.shape for t in table.buffers()] == [t.shape for t in other.buffers()]
    table.load_state_dict(other.state_dict())
    ids = torch.arange(700)
    assert table.class_rows == other.class_rows and table.num_pruned == other.num_pruned
    assert torch.equal(table.decode_rows(ids), other.decode_rows(ids))
    bounds = torch.arange(0, 701, 7)
    assert torch.equal(table.fast_bag(ids, bounds, 0, None), other.fast_bag(ids, bounds, 0, None))


def test_plain_torch_slots_in_chunks_equal_the_whole_table(monkeypatch):
    """The plain-torch path (max pooling, padding_idx, other devices) finds each id's slot
    from the block and sub-block counts a chunk of ids at a time: any chunking gives the
    rows ``dequantize`` gives, across blocks and sub-blocks."""
    import embpress.layouts.mixed as mixed

    _, _, _, table = _table(("pruned", "rowwise8", "levels2", "colbook2"), rows=1500)
    ids = torch.randint(0, 1500, (500,), generator=torch.Generator().manual_seed(2))
    whole = table.dequantize()[ids]
    for chunk in (1, 7, 1 << 16):
        monkeypatch.setattr(mixed, "_SLOT_CHUNK", chunk)
        assert torch.equal(table.decode_rows(ids), whole)
