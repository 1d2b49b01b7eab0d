"""The contract every registered layout meets, run for each entry of ``TABLE_CLASSES``.

A layout gets this coverage by being registered: the same lookups as the float path on
its dequantized table, exact zeros where pruned, kept entries within half a step of
their grid, predicted bytes equal to the bytes held, a lossless round trip through its
tensors and through a file, and a FormatError for every field that does not fit.
(The mixed layout meets it here through the uniform encoder; ``test_mixed.py`` runs the
same checks on its genuinely mixed tables.)
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import embpress
from embpress import QuantConfig, QuantizedEmbedding, QuantizedEmbeddingBag
from embpress.layouts import (
    TABLE_CLASSES,
    FormatError,
    QuantizedTable,
    encode_table,
    layout_choices,
    layout_sizes,
    register_layout,
    row_stats,
)
from embpress.layouts.base import base_fields, expect_tensor
from embpress.layouts.stats import flagged_rows

LAYOUTS = sorted(TABLE_CLASSES)


def _mask(kind: str, rows: int, dim: int, width: int, g: torch.Generator) -> torch.Tensor | None:
    """Masks of the shapes sparsifiers make: none, whole rows, whole (1 x width) blocks, entries."""
    if kind == "none":
        return None
    if kind == "rows":
        return (torch.rand(rows, 1, generator=g) > 0.4).expand(rows, dim).clone()
    if kind == "blocks":
        nb = -(-dim // width)
        blocks = torch.rand(rows, nb, generator=g) > 0.5
        return blocks.repeat_interleave(width, dim=1)[:, :dim].contiguous()
    return torch.rand(rows, dim, generator=g) > 0.5


def _encoded(layout, bits, rows, dim, kind, width, seed, scale_dtype=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, dim, generator=g)
    mask = _mask(kind, rows, dim, width, g)
    config = QuantConfig(bits=bits, layout=layout, range_search=False, scale_dtype=scale_dtype)
    table, error = encode_table(w, mask, config, block_width=width)
    return w, mask, config, table, error


_CASES = st.tuples(
    st.sampled_from(LAYOUTS),
    st.sampled_from([8, 4, 2]),
    st.integers(1, 24),
    st.integers(1, 40),
    st.sampled_from(["none", "rows", "blocks", "entries"]),
    st.sampled_from([1, 2, 4, 8]),
    st.integers(0, 2**31 - 1),
)


@settings(max_examples=80, deadline=None)
@given(_CASES)
def test_exact_zeros_and_kept_entries_on_their_grid(case):
    layout, bits, rows, dim, kind, width, seed = case
    w, mask, _, table, error = _encoded(layout, bits, rows, dim, kind, min(width, dim), seed)
    assert table.layout == layout
    deq = table.dequantize()
    assert deq.shape == (rows, dim) and deq.dtype == torch.float32
    kept = torch.ones_like(w, dtype=torch.bool) if mask is None else mask
    assert bool((deq[~kept] == 0).all()), "a pruned entry must decode to exactly 0.0"
    if bool(kept.any()):
        # half a step of the row's grid. The grid spans the kept range and 0; putting 0
        # exactly on it (rows that store pruned entries in place) may stretch the step
        # from range / (2^bits - 1) up to range / (2^bits - 2), and the scale is rounded
        # up (float16, and so that zero * scale is exact): 2% covers that, while a code
        # one level off would still be caught.
        lo = torch.where(kept, w, torch.inf).amin(1).clamp(max=0)
        hi = torch.where(kept, w, -torch.inf).amax(1).clamp(min=0)
        step = (hi - lo) / (2**bits - 2)
        err = (deq - w).abs().masked_fill(~kept, 0)
        assert bool((err <= step[:, None] * 0.5 * 1.02 + 1e-5).all())
        assert error["max_abs"] >= float(err.max()) - 1e-6


@settings(max_examples=60, deadline=None)
@given(_CASES, st.sampled_from([torch.float32, torch.float16]))
def test_predicted_bytes_equal_bytes_held(case, scale_dtype):
    layout, bits, rows, dim, kind, width, seed = case
    width = min(width, dim)
    w, mask, config, table, _ = _encoded(layout, bits, rows, dim, kind, width, seed, scale_dtype)
    m = None if mask is None else mask.numpy()
    stats = row_stats(m, rows, dim, width).summary()
    dtype = config.resolved_scale_dtype
    predicted = layout_sizes(stats, bits, dtype)
    assert predicted[layout] == TABLE_CLASSES[layout].predicted_nbytes(stats, bits, dtype)
    assert predicted[layout] == table.nbytes
    auto_config = QuantConfig(bits=bits, range_search=False, scale_dtype=scale_dtype)
    auto, _ = encode_table(w, mask, auto_config, block_width=width)
    # "auto" weighs the layouts that take part in it (``in_auto``; mixed does not)
    candidates = [v for k, v in predicted.items() if TABLE_CLASSES[k].in_auto]
    assert auto.nbytes == min(candidates)


@st.composite
def _bags(draw, rows):
    sizes = draw(st.lists(st.integers(0, 5), min_size=1, max_size=5))
    ids = draw(st.lists(st.integers(0, rows - 1), min_size=sum(sizes), max_size=sum(sizes)))
    offsets = [0]
    for s in sizes[:-1]:
        offsets.append(offsets[-1] + s)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)


@settings(max_examples=60, deadline=None)
@given(_CASES, st.data())
def test_lookups_equal_the_float_path_on_the_dequantized_table(case, data):
    layout, bits, rows, dim, kind, width, seed = case
    w, mask, config, _, _ = _encoded(layout, bits, rows, dim, kind, min(width, dim), seed)
    ids, offsets = data.draw(_bags(rows))
    weights = torch.randn(ids.numel(), generator=torch.Generator().manual_seed(seed))
    padding = data.draw(st.one_of(st.none(), st.integers(0, rows - 1)))
    for mode in ("sum", "mean", "max"):
        bag = nn.EmbeddingBag.from_pretrained(w, mode=mode, padding_idx=padding)
        q = QuantizedEmbeddingBag.from_float(bag, config, mask=mask, block_width=min(width, dim))
        assert q.layout == layout
        table = q.dequantize()
        want = F.embedding_bag(ids, table, offsets, mode=mode, padding_idx=padding)
        torch.testing.assert_close(q(ids, offsets), want, rtol=1e-5, atol=1e-5)
        if mode == "sum":
            want = F.embedding_bag(
                ids, table, offsets, mode=mode, per_sample_weights=weights, padding_idx=padding
            )
            got = q(ids, offsets, per_sample_weights=weights)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain = nn.Embedding.from_pretrained(w, padding_idx=padding)
    emb = QuantizedEmbedding.from_float(plain, config, mask=mask)
    grid = ids.reshape(1, -1)
    torch.testing.assert_close(emb(grid), F.embedding(grid, emb.dequantize(), padding_idx=padding))


@settings(max_examples=25, deadline=None)
@given(_CASES, st.integers(64, 160), st.sampled_from(["sum", "mean"]), st.data())
def test_large_batches_equal_the_float_path_and_refuse_what_nn_refuses(case, bags, mode, data):
    """A batch of many bags (1-D int64 ids and offsets on the CPU, no weights) is checked and
    run in few steps (``ops._plain_bag``): the same sums as the float path, nn.EmbeddingBag's
    errors for bad offsets and ids, and the same as the full path (int32 ids take it)."""
    from embpress import ops

    layout, bits, rows, dim, kind, width, seed = case
    w, mask, config, _, _ = _encoded(layout, bits, rows, dim, kind, min(width, dim), seed)
    q = QuantizedEmbeddingBag.from_float(
        nn.EmbeddingBag.from_pretrained(w, mode=mode), config, mask=mask, block_width=min(width, dim)
    )
    sizes = data.draw(st.lists(st.integers(0, 4), min_size=bags, max_size=bags))
    total = sum(sizes)
    ids = torch.tensor(
        data.draw(st.lists(st.integers(0, rows - 1), min_size=total, max_size=total)), dtype=torch.long
    )
    offsets = torch.tensor([0, *itertools.accumulate(sizes[:-1])], dtype=torch.long)
    served = []
    plain = ops._plain_bag

    def spy(*args):
        out = plain(*args)
        served.append(out is not None)
        return out

    ops._plain_bag = spy
    try:
        got = q(ids, offsets)
        assert served == [True]  # the plain path served it
        want = F.embedding_bag(ids, q.dequantize(), offsets, mode=mode)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(got, q(ids.int(), offsets))  # the full path: the same kernel's sums
        bad_first = offsets.clone()
        bad_first[0] = 1
        with pytest.raises(RuntimeError, match=r"has to be 0.*got 1"):
            q(ids, bad_first)
        if total:
            past = offsets.clone()
            past[-1] = total + 1
            with pytest.raises(RuntimeError, match="non-decreasing"):
                q(ids, past)
            bad_ids = ids.clone()
            bad_ids[data.draw(st.integers(0, total - 1))] = data.draw(st.sampled_from([-1, rows]))
            with pytest.raises(IndexError, match="index out of range"):
                q(bad_ids, offsets)
    finally:
        ops._plain_bag = plain


@pytest.mark.parametrize("layout", LAYOUTS)
def test_lookups_follow_the_buffers_written_in_place_or_replaced(layout):
    """A table's kernels keep their arguments between lookups (``kernel_args``): writing
    its buffers in place (``load_state_dict``), replacing them or their storage (``.data
    =``), moving the table or forcing another kernel path must show in the very next
    lookup."""
    from embpress.layouts.lookup import current_kernel_policy, kernel_path_marker, kernel_paths, kernel_policy

    g = torch.Generator().manual_seed(5)
    w = torch.randn(300, 32, generator=g)
    mask = _mask("blocks", 300, 32, 4, g)
    config = QuantConfig(bits=8, layout=layout, range_search=False)

    def table_of(weight):
        return QuantizedEmbeddingBag.from_float(
            nn.EmbeddingBag.from_pretrained(weight, mode="sum"), config, mask=mask, block_width=4
        ).table

    table, other, third = table_of(w), table_of(3 * w + 1), table_of(-w)
    ids = torch.randint(0, 300, (200,), generator=g)
    bounds = torch.arange(0, 201, 10)

    def bags(t):
        out = t.fast_bag(ids, bounds, 0, None)
        return F.embedding_bag(ids, t.dequantize(), bounds[:-1], mode="sum") if out is None else out

    before = bags(table)
    torch.testing.assert_close(before, F.embedding_bag(ids, table.dequantize(), bounds[:-1], mode="sum"))
    table.load_state_dict(other.state_dict())
    after = bags(table)
    assert not torch.equal(after, before)
    assert torch.equal(after, bags(other))
    for name, buffer in third.named_buffers():
        setattr(table, name, buffer.clone())
    assert torch.equal(bags(table), bags(third))
    for name, buffer in other.named_buffers():  # the same objects, other storage
        table.get_buffer(name).data = buffer.clone()
    assert torch.equal(bags(table), bags(other))
    for name, buffer in third.named_buffers():
        table.get_buffer(name).data = buffer.clone()
    assert torch.equal(bags(table), bags(third))
    table.to(torch.float32)  # ``_apply``: integer buffers are kept, the arguments dropped
    assert torch.equal(bags(table), bags(third))
    for path in kernel_paths():
        with kernel_policy(path=path):
            assert torch.equal(bags(table), bags(third))
            # the arguments the lookup just used are the forced path's, not a cached other's
            kept = table.kernel_args(current_kernel_policy(), lambda: None)
            if hasattr(kept, "path"):
                assert kept.path.dtype == kernel_path_marker().dtype


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cast", ["half", "bfloat16", "double", "float", "type:float16", "type:float64"])
def test_model_dtype_casts_keep_every_buffer_dtype(tmp_path, layout, cast):
    """``model.half()`` / ``.bfloat16()`` / ``.double()`` / ``.float()`` leave a table's
    stored buffers as they are (float ones included: a mixed table's column books), so
    its file is unchanged and its lookups only come out in the new dtype. So does
    ``model.type(dtype)``, which casts a float module's integer buffers too (it re-typed
    the codes)."""
    if layout == "mixed":  # with every kind of codec, column books included
        from embpress.layouts.mixed import MixedTable
        from embpress.quant.codecs import Codec

        g = torch.Generator().manual_seed(1)
        codecs = [Codec.parse(c) for c in ("pruned", "rowwise8", "levels2", "colbook4")]
        ids = torch.randint(0, len(codecs), (60,), generator=g).numpy()
        table = MixedTable.build(torch.randn(60, 12, generator=g), ids, codecs)
    else:
        table = _encoded(layout, 4, 60, 12, "blocks", 4, 1)[3]
    module = QuantizedEmbeddingBag(table, mode="sum")
    dtypes = {name: b.dtype for name, b in module.named_buffers()}
    assert any(d.is_floating_point for d in dtypes.values()) == (layout == "mixed")
    ids, offsets = torch.tensor([0, 5, 59, 7, 7]), torch.tensor([0, 2])
    before, weight = module(ids, offsets), module.dequantize()
    if cast.startswith("type:"):
        module.type(getattr(torch, cast[5:]))
    else:
        getattr(module, cast)()
    assert {name: b.dtype for name, b in module.named_buffers()} == dtypes
    assert torch.equal(module.dequantize(), weight)
    expected = {"half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}
    expected |= {"type:float16": torch.float16, "type:float64": torch.float64}
    assert module.output_dtype == expected.get(cast, torch.float32)
    assert torch.equal(module(ids, offsets), before.to(module.output_dtype))
    embpress.save(nn.Sequential(module), tmp_path / "m.safetensors")
    fresh = embpress.load(nn.Sequential(nn.EmbeddingBag(60, 12, mode="sum")), tmp_path / "m.safetensors")
    assert torch.equal(fresh[0].dequantize(), weight)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_round_trip_through_tensors_and_a_file(tmp_path, layout, bits):
    w, mask, config, table, _ = _encoded(layout, bits, 37, 12, "blocks", 4, 0)
    again = TABLE_CLASSES[layout].from_tensors(table.meta(), table.tensors())
    assert torch.equal(again.dequantize(), table.dequantize())
    assert again.meta() == table.meta()
    model = nn.Sequential(nn.EmbeddingBag.from_pretrained(w, mode="sum"))
    model[0] = QuantizedEmbeddingBag.from_float(model[0], config, mask=mask, block_width=4)
    embpress.save(model, tmp_path / "m.safetensors")
    fresh = embpress.load(nn.Sequential(nn.EmbeddingBag(37, 12, mode="sum")), tmp_path / "m.safetensors")
    assert fresh[0].layout == layout
    assert torch.equal(fresh[0].dequantize(), model[0].dequantize())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_module_round_trips_through_pickle(layout):
    """Plain pickle (what multiprocessing, joblib and Ray send), whatever the buffers'
    dtypes (torch cannot unpickle its unsigned 16- to 64-bit tensors): the same buffers,
    dtypes and lookups after it."""
    import pickle

    w, mask, config, _, _ = _encoded(layout, 4, 37, 12, "blocks", 4, 0)
    module = QuantizedEmbeddingBag.from_float(
        nn.EmbeddingBag.from_pretrained(w, mode="sum"), config, mask=mask, block_width=4
    )
    again = pickle.loads(pickle.dumps(module))
    held, back = module.table.tensors(), again.table.tensors()
    assert held.keys() == back.keys()
    for name, t in held.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    ids, offsets = torch.randint(0, 37, (40,)), torch.arange(0, 40, 5)
    assert torch.equal(again(ids, offsets), module(ids, offsets))


def test_empty_buffers_are_torchs_own():
    """A table's empty buffers (a planned table with no column books) are allocated by
    torch, with no storage behind them: one made from numpy has a storage but no data
    pointer, which ``torch.export.save`` cannot write."""
    w = torch.randn(37, 12, generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(nn.EmbeddingBag.from_pretrained(w, mode="sum"))
    embpress.plan(model, budget_bytes=37 * 12 * 4 // 4).apply(model)
    empty = {n: t for n, t in model[0].table.tensors().items() if t.numel() == 0}
    assert empty, "the plan has no empty buffer to check"
    for name, t in empty.items():
        assert t.untyped_storage().data_ptr() == t.data_ptr() == 0, name


@pytest.mark.parametrize("layout", [*LAYOUTS, "auto"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_values_beyond_float16_row_parameters_are_refused_by_name(layout, sparsity):
    """4-bit rows keep float16 scales and offsets: a table whose values need more is
    refused with one ValueError naming the table and the remedy, in every layout (also
    where pruned entries must sit on the grid), the model unchanged."""
    model = nn.Sequential(nn.Embedding(40, 16))
    with torch.no_grad():
        model[0].weight.mul_(1e5)
    before = model[0]
    config = QuantConfig(bits=4, layout=layout)
    with pytest.raises(ValueError, match=r"table '0'.*float16.*scale_dtype=torch.float32"):
        embpress.post_training_sparse_quantize(
            model,
            embpress.DataNormSparsifier,
            quant=config,
            sparsity_level=sparsity,
            sparse_block_shape=(1, 4),
        )
    assert model[0] is before


@pytest.mark.parametrize("layout", [*LAYOUTS, "auto"])
@pytest.mark.parametrize(("sparsity", "order"), [(0.0, True), (0.5, True), (0.5, False)])
def test_rows_spanning_more_than_float32_are_refused_by_name(layout, sparsity, order):
    """Finite values whose row range exceeds float32's (max - min above 3.4e38) would
    decode the top code to inf (and FBGEMM's fused multiply-add to a finite value): refused
    with one ValueError naming the table, the model unchanged; 9e37 is stored."""
    model = nn.Sequential(nn.Embedding(8, 8))
    with torch.no_grad():
        model[0].weight[:, :2] = torch.tensor([2e38, -2e38])
    before = model[0]
    config = QuantConfig(bits=8, layout=layout, scale_dtype=torch.float32)
    if layout == "mixed":
        config = QuantConfig(bits=8, layout=layout)  # (float16 row parameters: refused as such)
    args = {
        "quant": config,
        "sparsity_level": sparsity,
        "sparse_block_shape": (1, 4),
        "sparsify_first": order,
    }
    with pytest.raises(ValueError, match=r"table '0': .*(float32 holds|float16)"):
        embpress.post_training_sparse_quantize(model, embpress.DataNormSparsifier, **args)
    assert model[0] is before
    if layout != "mixed":
        with torch.no_grad():
            model[0].weight[:, :2] = torch.tensor([9e37, -9e37])
        embpress.post_training_sparse_quantize(model, embpress.DataNormSparsifier, **args)
        assert bool(torch.isfinite(model[0].dequantize()).all())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_buffers_written_outside_embpress_are_validated_before_a_lookup(layout):
    """No kernel reads a table whose offsets nobody checked: a buffer written in place or
    replaced outside embpress (a program's ``load_state_dict`` copies into the buffers it
    shares with its model) is validated at the next lookup, eager or through the op, and
    refused with a FormatError when it no longer holds a table; a valid table written the
    same way is served as that table (what derives from the buffers made again)."""
    g = torch.Generator().manual_seed(6)
    w = torch.randn(300, 32, generator=g)
    mask = _mask("blocks", 300, 32, 4, g)
    config = QuantConfig(bits=8, layout=layout, range_search=False)

    def bag_of(weight):
        return QuantizedEmbeddingBag.from_float(
            nn.EmbeddingBag.from_pretrained(weight, mode="sum"), config, mask=mask, block_width=4
        )

    bag, other = bag_of(w), bag_of(-2 * w)
    ids = torch.randint(0, 300, (400,), generator=g)
    offsets = torch.arange(0, 400, 5)

    def through_op(module):
        t = module.table
        return torch.ops.embpress.embedding_bag(
            t.op_tensors(), *t.op_fields(), ids, offsets, None, 0, False, None, None, 2.0
        )

    before = bag(ids, offsets)
    state = {k: v.clone() for k, v in bag.state_dict().items()}
    for name, buffer in bag.table.named_buffers():
        if buffer.numel() == 0:
            continue  # (a mixed table without column books)
        with torch.no_grad():
            buffer.view(torch.uint8).fill_(0xFF)  # no valid table holds all ones
        with pytest.raises(FormatError, match="written or replaced outside embpress"):
            bag(ids, offsets)
        with pytest.raises(FormatError):
            through_op(bag)
        with pytest.raises(FormatError):  # the op given copies it does not own
            t = bag.table
            torch.ops.embpress.embedding_bag(
                [x.clone() for x in t.op_tensors()],
                *t.op_fields(),
                ids,
                offsets,
                None,
                0,
                False,
                None,
                None,
                2.0,
            )
        bag.load_state_dict(state)  # embpress's own load: validated, trusted again
        assert torch.equal(bag(ids, offsets), before), name
    same_shapes = all(
        a.shape == b.shape for a, b in zip(bag.table.buffers(), other.table.buffers(), strict=True)
    )
    if same_shapes:  # another valid table copied in place: served as that table
        with torch.no_grad():
            for a, b in zip(bag.table.buffers(), other.table.buffers(), strict=True):
                a.copy_(b)
        assert torch.equal(bag(ids, offsets), other(ids, offsets))
        assert torch.equal(through_op(bag), other(ids, offsets))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_damaged_buffers_stay_untrusted_through_copies_moves_and_replacement(layout, monkeypatch):
    """A table damaged in place is not laundered into a trusted one by what copies or
    moves it (``.to()``, ``.half()``, ``share_memory()``, deepcopy, pickle), nor is a
    buffer replaced outside embpress (``setattr``, ``register_buffer``, ``.data =``)
    trusted: the next lookup validates it and raises. A healthy table keeps its trust
    through the same calls (no validation again, which costs a pass over the table),
    but where they put its buffers in new memory (``share_memory``)."""
    import copy
    import pickle

    g = torch.Generator().manual_seed(8)
    w = torch.randn(300, 32, generator=g)
    config = QuantConfig(bits=8, layout=layout, range_search=False)
    bag = QuantizedEmbeddingBag.from_float(
        nn.EmbeddingBag.from_pretrained(w, mode="sum"),
        config,
        mask=_mask("blocks", 300, 32, 4, g),
        block_width=4,
    )
    ids, offsets = torch.randint(0, 300, (400,), generator=g), torch.arange(0, 400, 5)
    validations = []
    cls = type(bag.table)
    real = cls.from_tensors.__func__

    def counted(klass, meta, tensors, count_pruned=False):
        validations.append(klass)
        return real(klass, meta, tensors, count_pruned)

    monkeypatch.setattr(cls, "from_tensors", classmethod(counted))
    expected = bag(ids, offsets)
    moves = {
        "to": lambda m: m.to("cpu"),
        "half": lambda m: m.half(),
        "share_memory": lambda m: m.share_memory(),
        "deepcopy": copy.deepcopy,
        "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    }
    for name, move in moves.items():  # healthy: trusted after, no validation but of new memory
        validations.clear()
        moved = move(copy.deepcopy(bag))
        out = moved(ids, offsets)
        assert torch.equal(out, expected.to(out.dtype)), name  # (half: the output's dtype)
        assert len(validations) == (name == "share_memory"), name  # (it copies into shared memory)
    first = bag.table.op_tensor_names[0]
    for name, move in moves.items():
        damaged = copy.deepcopy(bag)
        with torch.no_grad():
            getattr(damaged.table, first).view(torch.uint8).fill_(0xFF)
        with pytest.raises(FormatError, match="outside embpress"):
            move(damaged)(ids, offsets)
            pytest.fail(name)
    garbage = (
        torch.full_like(getattr(bag.table, first), 0xFF)
        .view(torch.uint8)
        .view(getattr(bag.table, first).dtype)
    )
    replacements = {
        "setattr": lambda t: setattr(t, first, garbage.clone()),
        "register_buffer": lambda t: t.register_buffer(first, garbage.clone()),
        ".data =": lambda t: setattr(getattr(t, first), "data", garbage.clone()),
    }
    for name, replace in replacements.items():
        damaged = copy.deepcopy(bag)
        replace(damaged.table)
        with pytest.raises(FormatError, match="outside embpress"):
            damaged(ids, offsets)
            pytest.fail(name)


def _tampered_tensors(tensors):
    """(what, tensors) pairs, each with one tensor missing, retyped, shortened or added."""
    for name, t in tensors.items():
        yield f"{name} missing", {k: v for k, v in tensors.items() if k != name}
        other = torch.float32 if t.dtype != torch.float32 else torch.int32
        yield f"{name} as {other}", {**tensors, name: t.view(-1)[: t.numel() // 4 * 4].to(other)}
        if t.numel() > 1:
            yield f"{name} shortened", {**tensors, name: t.reshape(-1)[:-1].reshape(-1)}
    yield "an extra tensor", {**tensors, "extra": torch.zeros(3, dtype=torch.uint8)}


def _tampered_meta(meta):
    """Metadata that no longer fits the tensors. (A block-sparse table one column wider can
    be a valid table whose extra column is pruned everywhere: the model's shape catches
    that, so the width is halved here instead.)"""
    for key in ("num_embeddings", "embedding_dim"):
        yield f"{key} a string", {**meta, key: str(meta[key])}
        yield f"{key} 0", {**meta, key: 0}
    yield "num_embeddings + 1", {**meta, "num_embeddings": meta["num_embeddings"] + 1}
    yield "num_embeddings - 1", {**meta, "num_embeddings": meta["num_embeddings"] - 1}
    yield "embedding_dim halved", {**meta, "embedding_dim": meta["embedding_dim"] // 2}
    yield "bits 3", {**meta, "bits": 3}
    yield "bits as a float", {**meta, "bits": float(meta["bits"])}  # the JSON holds an integer
    yield "other bits", {**meta, "bits": 4 if meta["bits"] == 8 else 8}
    yield (
        "other scale dtype",
        {
            **meta,
            "scale_dtype": "float16" if meta["scale_dtype"] == "float32" else "float32",
        },
    )
    yield "unknown scale dtype", {**meta, "scale_dtype": "int8"}
    yield "negative pruned count", {**meta, "num_pruned": -1}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_field_that_does_not_fit_is_refused(layout):
    _, _, _, table, _ = _encoded(layout, 4, 40, 16, "blocks", 4, 1)
    meta, tensors = table.meta(), table.tensors()
    cls = TABLE_CLASSES[layout]
    for what, bad in _tampered_tensors(tensors):
        if what == "an extra tensor":
            continue  # a layout reads the tensors it knows; io refuses strays in the file
        with pytest.raises(FormatError):
            cls.from_tensors(meta, bad)
            pytest.fail(f"{layout}: {what} was accepted")
    for what, bad in _tampered_meta(meta):
        with pytest.raises(FormatError):
            cls.from_tensors(bad, tensors)
            pytest.fail(f"{layout}: {what} was accepted")


def _pruned_count_bounds(table):
    """The least and most pruned entries that ``table``'s stored data allows: exact for
    block-sparse records (blocks are kept or pruned whole), from the unstored rows to all
    but one entry of each stored row for layouts that store whole rows, anything for a
    dense table (a pruned entry and a kept one that rounds to 0 look alike)."""
    rows, dim = table.num_embeddings, table.embedding_dim
    if table.layout == "block_sparse":
        return table.num_pruned, table.num_pruned
    if table.layout == "pruned_rows":
        stored = table.kept_rows
    elif table.layout == "mixed":
        stored = sum(n for n, c in zip(table.class_rows, table.codecs, strict=True) if c.kind != "pruned")
    else:
        return 0, rows * dim
    return (rows - stored) * dim, rows * dim - stored


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("kind", "width", "dim"), [("blocks", 4, 16), ("entries", 1, 12), ("blocks", 3, 10)])
def test_a_pruned_count_that_the_stored_rows_rule_out_is_refused(layout, kind, width, dim):
    # ``inspect`` and ``sparsity`` report the count: a file may not claim a sparsity that
    # its own rows contradict
    _, _, _, table, _ = _encoded(layout, 8, 40, dim, kind, width, 2)
    cls, meta, tensors = TABLE_CLASSES[layout], table.meta(), table.tensors()
    low, high = _pruned_count_bounds(table)
    assert low <= table.num_pruned <= high
    for allowed in (low, high):
        assert cls.from_tensors({**meta, "num_pruned": allowed}, tensors).num_pruned == allowed
    for lie in (low - 1, high + 1):
        with pytest.raises(FormatError, match="num_pruned"):
            cls.from_tensors({**meta, "num_pruned": lie}, tensors)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tensor_kinds_are_the_tensors_a_layout_writes(layout):
    # a row-range load checks the stored tensors against ``tensor_kinds`` before it reads
    # any part of them, so the declaration must be what ``tensors()`` writes
    _, _, _, table, _ = _encoded(layout, 4, 40, 16, "blocks", 4, 1)
    written = {name: (t.dtype, t.dim()) for name, t in table.tensors().items()}
    declared = {name: (dtype, ndim) for name, dtype, ndim in TABLE_CLASSES[layout].tensor_kinds}
    assert declared == written
    assert set(TABLE_CLASSES[layout].row_directory) <= set(declared)


def test_every_layout_the_config_accepts_is_registered_under_its_own_name():
    assert layout_choices() == ("auto", *TABLE_CLASSES)
    for name, cls in TABLE_CLASSES.items():
        assert cls.layout == name
        assert QuantConfig(layout=name).layout == name
    with pytest.raises(ValueError, match="layout must be one of auto, dense"):
        QuantConfig(layout="csr")


# ------------------------------------------------------------------ adding a layout
class _UnpackedTable(QuantizedTable):
    """One code per byte and float32 qparams per row: a layout of one class, registered by
    one line, that nothing else in embpress knows about."""

    layout = "unpacked_for_test"
    op_tensor_names = ("codes", "qparams")

    def __init__(self, codes, qparams, bits, scale_dtype, num_pruned):
        super().__init__(codes.shape[0], codes.shape[1], bits, scale_dtype, num_pruned)
        self.register_buffer("codes", codes)
        self.register_buffer("qparams", qparams)

    @classmethod
    def predicted_nbytes(cls, stats, bits, scale_dtype):
        return stats.rows * (stats.dim + 8)

    @classmethod
    def zero_rows(cls, row_stats):
        return flagged_rows(row_stats.kept < row_stats.dim)  # pruned entries stored in place

    @classmethod
    def pack(cls, encoded):
        qp = encoded.qparams
        qparams = torch.stack([qp.scale, qp.offset], 1).float()
        return cls(encoded.code_rows().clone(), qparams, encoded.bits, qp.dtype, encoded.stats.pruned)

    def decode_rows(self, indices):
        qp = self.qparams[indices]
        return self.codes[indices].float() * qp[:, :1] + qp[:, 1:]

    @classmethod
    def from_tensors(cls, meta, tensors, count_pruned=False):
        # (no ``_trust_buffers`` in ``__init__``: its tables are validated at their first lookup)
        rows, dim, bits, dtype, pruned = base_fields(meta)
        codes = expect_tensor(tensors, "codes", torch.uint8, (rows, dim))
        return cls(codes, expect_tensor(tensors, "qparams", torch.float32, (rows, 2)), bits, dtype, pruned)


@pytest.fixture
def unpacked_layout():
    register_layout(_UnpackedTable)
    try:
        yield _UnpackedTable.layout
    finally:
        del TABLE_CLASSES[_UnpackedTable.layout]


def test_a_registered_class_is_a_whole_layout(unpacked_layout, tmp_path):
    """The config accepts it, encoding packs it with the predicted bytes, "auto" weighs it,
    the modules and the embpress ops look it up, and files hold it."""
    assert layout_choices()[-1] == unpacked_layout
    w, mask, config, table, _ = _encoded(unpacked_layout, 4, 37, 12, "entries", 1, 3)
    assert type(table) is _UnpackedTable and table.nbytes == 37 * (12 + 8)
    deq = table.dequantize()
    assert bool((deq[~mask] == 0).all())
    _, _, _, auto, _ = _encoded("auto", 4, 37, 12, "entries", 1, 3)
    sizes = layout_sizes(row_stats(mask.numpy(), 37, 12, 1).summary(), 4, torch.float16)
    assert unpacked_layout in sizes and auto.nbytes == min(sizes.values())
    bag = QuantizedEmbeddingBag.from_float(nn.EmbeddingBag.from_pretrained(w, mode="sum"), config, mask=mask)
    ids, offsets = torch.tensor([0, 5, 36, 5, 2]), torch.tensor([0, 2])
    want = F.embedding_bag(ids, deq, offsets, mode="sum")
    torch.testing.assert_close(bag(ids, offsets), want)
    fields = bag.table.op_fields()
    got = torch.ops.embpress.embedding_bag(
        bag.table.op_tensors(), *fields, ids, offsets, None, 0, False, None, None, 2.0
    )
    torch.testing.assert_close(got, want)
    model = nn.Sequential(bag)
    embpress.save(model, tmp_path / "m.safetensors")
    fresh = embpress.load(nn.Sequential(nn.EmbeddingBag(37, 12, mode="sum")), tmp_path / "m.safetensors")
    assert fresh[0].layout == unpacked_layout and torch.equal(fresh[0].dequantize(), deq)


def test_only_registered_layouts_are_accepted():
    with pytest.raises(ValueError, match="layout must be one of"):
        QuantConfig(layout=_UnpackedTable.layout)
    with pytest.raises(TypeError, match="QuantizedTable subclass"):
        register_layout(dict)
    with pytest.raises(TypeError, match="does not define zero_rows, pack, from_tensors"):

        class _Partial(QuantizedTable):
            layout = "partial_for_test"

            @classmethod
            def predicted_nbytes(cls, stats, bits, scale_dtype):
                return 0

        register_layout(_Partial)
    for name in ("", "auto", "dense"):
        with pytest.raises(ValueError, match=r"auto|already registered"):
            register_layout(type("_Renamed", (_UnpackedTable,), {"layout": name}))
    assert register_layout(TABLE_CLASSES["dense"]) is TABLE_CLASSES["dense"]  # again: no change
    assert list(TABLE_CLASSES) == ["dense", "pruned_rows", "block_sparse", "mixed"]


def _assembled(parts):
    """The joined buffers built from every part's pieces alone (as processes write them
    into one file), each element written exactly once, and the joined meta."""
    import json

    summaries = [json.loads(json.dumps(p.part_summary())) for p in parts]  # what travels
    meta, specs = type(parts[0]).joined_layout(summaries)
    out = {n: torch.zeros(shape, dtype=dtype) for n, (dtype, shape) in specs.items()}
    writes = {n: torch.zeros(shape[0], dtype=torch.int64) for n, (_, shape) in specs.items()}
    for i, part in enumerate(parts):
        for piece in part.join_pieces(i, summaries):
            stop = piece.start + piece.data.shape[0]
            assert 0 <= piece.start <= stop <= out[piece.name].shape[0], piece.name
            assert piece.data.dtype == out[piece.name].dtype, piece.name
            out[piece.name][piece.start : stop] = piece.data
            writes[piece.name][piece.start : stop] += 1
    for name, count in writes.items():
        assert bool((count == 1).all()), f"{name}: elements written {sorted(set(count.tolist()))} times"
    return meta, out


def _assert_joined_in_place(parts) -> None:
    joined = type(parts[0]).concat_rows(parts)
    meta, buffers = _assembled(parts)
    assert meta == joined.meta()
    want = joined.tensors()
    assert list(buffers) == list(want)
    for name, t in want.items():
        assert buffers[name].dtype == t.dtype and torch.equal(buffers[name], t), name


@settings(max_examples=60, deadline=None)
@given(_CASES, st.integers(1, 4), st.data())
def test_parts_joined_in_place_are_the_concatenated_table(case, nparts, data):
    """Every layout: each part's pieces, placed from the parts' summaries alone, tile the
    joined buffers exactly and equal ``concat_rows`` (how torchrun's processes write one
    file without gathering)."""
    layout, bits, _, dim, kind, width, seed = case
    rows = data.draw(st.integers(1, 256 * nparts + 40))
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, rows // 256)), max_size=nparts - 1))))
    bounds = [0, *(256 * c for c in cuts if 256 * c < rows), rows]
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, dim, generator=g)
    mask = _mask(kind, rows, dim, width, g)
    config = QuantConfig(bits=bits, layout=layout, range_search=False)
    parts = [
        encode_table(w[a:b], None if mask is None else mask[a:b], config, block_width=width)[0]
        for a, b in itertools.pairwise(bounds)
    ]
    _assert_joined_in_place(parts)


def test_genuinely_mixed_parts_joined_in_place() -> None:
    """Several codecs (column books shared by the parts, as a table's shards share them)."""
    import numpy as np

    from embpress.layouts.mixed import MixedTable
    from embpress.quant.codecs import Codec

    g = torch.Generator().manual_seed(3)
    rows, dim = 1000, 12
    codecs = [Codec.parse(c) for c in ("colbook2", "levels1", "rowwise4", "pruned")]
    ids = np.asarray(torch.randint(0, len(codecs), (rows,), generator=g).numpy())
    table = MixedTable.build(torch.randn(rows, dim, generator=g), ids, codecs)
    tensors = table.tensors()

    class Reader:
        def __call__(self, name, lo, hi):
            return tensors[name][lo:hi]

        def shape(self, name):
            return tuple(tensors[name].shape)

    bounds = [(0, 256), (256, 768), (768, 1000)]
    parts = [MixedTable.load_rows(table.meta(), Reader(), a, b) for a, b in bounds]
    _assert_joined_in_place(parts)


def _thp_eligible(tensor: torch.Tensor) -> bool:
    """Whether the memory of ``tensor`` lies in a mapping Linux may back with huge pages
    (``THPeligible: 1`` in /proc/self/smaps for the mapping that holds its first byte)."""
    address, eligible = tensor.data_ptr(), False
    inside = False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "THPeligible:":
                eligible = line.split()[1] == "1"
    return eligible


def _huge_pages_here() -> bool:
    from embpress import _buffers

    return _buffers._huge_pages_on()


@pytest.mark.skipif(not _huge_pages_here(), reason="no transparent huge pages on this system")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_large_tables_are_held_in_huge_pages(tmp_path, layout):
    """A table's large buffers, encoded or loaded, lie in memory advised for transparent
    huge pages (its lookups then miss the TLB less; BENCHMARKS.md, "Lookup throughput")."""
    w = torch.randn(80_000, 128, generator=torch.Generator().manual_seed(0))
    q = QuantizedEmbeddingBag.from_float(
        nn.EmbeddingBag.from_pretrained(w, mode="sum"), QuantConfig(bits=8, layout=layout, range_search=False)
    )
    model = nn.Module()
    model.emb = q
    embpress.save(model, tmp_path / "m.safetensors")
    fresh = nn.Module()
    fresh.emb = nn.EmbeddingBag(80_000, 128, mode="sum")
    loaded = embpress.load(fresh, tmp_path / "m.safetensors")
    for table in (q.table, loaded.emb.table):
        big = [b for b in table.buffers() if b.numel() * b.element_size() >= 8 << 20]
        assert big, "the test table should have a buffer of 8 MB or more"
        assert all(_thp_eligible(b) for b in big)
    plain = torch.empty(8 << 20, dtype=torch.uint8)  # torch's own allocation: not advised
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    assert not _thp_eligible(plain) or "[always]" in mode


@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_state_dict_takes_a_whole_valid_table_of_the_same_fields_or_nothing(tmp_path, layout):
    """``load_state_dict`` writes every buffer or none: a state of a table with other fields
    (bits, scale dtype) or other buffer shapes is refused and leaves the table as it was
    (torch's own copy takes each buffer whose shape matches, and would decode garbage);
    the state carries the fields as a tensor, so it stays all tensors and survives
    ``torch.save`` / ``torch.load(weights_only=True)``."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(300, 32, generator=g)

    def table_of(bits, level, scale_dtype=torch.float16):
        mask = _mask("blocks", 300, 32, 4, torch.Generator().manual_seed(int(level * 100)))
        config = QuantConfig(bits=bits, layout=layout, range_search=False, scale_dtype=scale_dtype)
        return encode_table(w, mask, config, block_width=4)[0]

    table = table_of(8, 0.5)
    state = table.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    torch.save(state, tmp_path / "s.pt")
    again = table_of(8, 0.5)
    again.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(again.buffers(), table.buffers(), strict=True))
    before = {k: v.clone() for k, v in table.state_dict().items()}
    ids = torch.randint(0, 300, (64,), generator=g)
    looked = table.decode_rows(ids)
    for other in (table_of(4, 0.5), table_of(8, 0.5, torch.float32), table_of(8, 0.9)):
        if {**other.meta(), "num_pruned": 0} == {**table.meta(), "num_pruned": 0} and all(
            a.shape == b.shape for a, b in zip(other.buffers(), table.buffers(), strict=True)
        ):  # the same fields and shapes (dense at another sparsity): taken, with its num_pruned
            table.load_state_dict(other.state_dict())
            assert table.num_pruned == other.num_pruned
            assert torch.equal(table.decode_rows(ids), other.decode_rows(ids))
            table.load_state_dict(before)
            assert table.meta() == table_of(8, 0.5).meta()
            continue
        with pytest.raises(RuntimeError, match=r"stored as|size mismatch"):
            table.load_state_dict(other.state_dict())
        after = table.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert torch.equal(table.decode_rows(ids), looked)
    # a state saved without the fields (``_extra_state``) is checked against the table's own
    old = {k: v for k, v in table_of(8, 0.5).state_dict().items() if k != "_extra_state"}
    table.load_state_dict(old)
    assert torch.equal(table.decode_rows(ids), looked)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_state_dict_assigns_and_runs_pre_hooks_as_torch(layout):
    """``assign=True`` makes the state's tensors the table's buffers (a model built on the
    meta device then lives on the state's), and a table's load_state_dict pre-hooks run,
    as ``Module._load_from_state_dict`` does them."""
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(200, 16, mode="sum"))
    embpress.post_training_sparse_quantize(
        model,
        embpress.DataNormSparsifier,
        quant=QuantConfig(layout=layout),
        sparsity_level=0.5,
        sparse_block_shape=(1, 4),
    )
    state = model.state_dict()
    skeleton = copy.deepcopy(model).to("meta")
    calls = []
    skeleton[0].table._register_load_state_dict_pre_hook(lambda *args: calls.append(args[1]))
    skeleton.load_state_dict(state, assign=True)
    assert calls == ["0.table."]
    for name, buffer in skeleton[0].table.named_buffers():
        assert buffer is state[f"0.table.{name}"]
    ids, offsets = torch.randint(0, 200, (30,)), torch.arange(0, 30, 5)
    assert torch.equal(skeleton[0](ids, offsets), model[0](ids, offsets))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_state_dict_assigns_strided_buffers_as_packed_copies(layout):
    """The kernels read a table's buffers as packed: a state of strided views (every other
    element of a larger tensor) assigned with ``assign=True`` is taken as contiguous
    copies, and lookups read the same values (block-sparse lookups read past the stride,
    returning garbage; other layouts failed at the first lookup)."""
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(200, 16, mode="sum"))
    embpress.post_training_sparse_quantize(
        model, embpress.DataNormSparsifier, quant=QuantConfig(layout=layout), sparsity_level=0.5
    )
    state = {}
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor) and value.numel() > 1:
            wide = torch.zeros(2 * value.numel(), dtype=value.dtype)
            wide[::2] = value.reshape(-1)
            value = wide[::2].view(value.shape)
            assert not value.is_contiguous()
        state[key] = value
    other = copy.deepcopy(model)
    for buffer in other[0].table.buffers():
        buffer.zero_()  # what a lookup reads after the load is the state's
    other.load_state_dict(state, assign=True)
    for buffer in other[0].table.buffers():
        assert buffer.is_contiguous()
    ids, offsets = torch.randint(0, 200, (30,)), torch.arange(0, 30, 5)
    assert torch.equal(other[0](ids, offsets), model[0](ids, offsets))


def test_a_bad_mode_is_refused_before_the_offsets_are_read():
    """``embedding_bag_impl`` checks the mode first, as the full path does, also for a
    batch the plain path would take (many int64 offsets): a bad mode with bad offsets
    is a ValueError about the mode."""
    from embpress import ops

    table = encode_table(torch.randn(50, 8), None, QuantConfig(bits=8, layout="dense"))[0]
    ids = torch.randint(0, 50, (300,))
    offsets = torch.arange(0, 300, 3)
    offsets[0] = 2  # bad too
    with pytest.raises(ValueError, match="mode must be 0"):
        ops.embedding_bag_impl(table, ids, offsets, None, 5, False, None, None, 2.0)
    with pytest.raises(RuntimeError, match="has to be 0"):
        ops.embedding_bag_impl(table, ids, offsets, None, 0, False, None, None, 2.0)


def test_large_batches_without_a_fused_kernel_decode_on_the_bounds_made():
    """Where the layout's fused kernel does not serve (8-bit rows with float16 scales with
    embpress's kernels turned off), the plain path decodes the rows and lets torch sum
    them on the bounds it made: the float path's sums, nn's error for bad offsets."""
    from embpress import ops
    from embpress.layouts.lookup import KernelPolicy, kernel_policy

    weight = torch.randn(40, 12)
    config = QuantConfig(bits=8, layout="dense", scale_dtype=torch.float16)
    q = QuantizedEmbeddingBag.from_float(nn.EmbeddingBag.from_pretrained(weight, mode="mean"), config)
    ids = torch.randint(0, 40, (400,))
    offsets = torch.arange(0, 400, 5)
    with kernel_policy(KernelPolicy(fused_kernel=False)):
        assert q.table.fast_bag(ids, torch.arange(0, 401, 5), 1, None) is None
        plain = ops._plain_bag(q.table, ids, offsets, 1, False)
        assert plain is not None
        torch.testing.assert_close(plain, F.embedding_bag(ids, q.dequantize(), offsets, mode="mean"))
        torch.testing.assert_close(q(ids, offsets), plain, rtol=0, atol=0)
        bad = offsets.clone()
        bad[10] = 1
        with pytest.raises(RuntimeError, match="non-decreasing"):
            q(ids, bad)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_huge_per_sample_weights_give_torchs_products(layout):
    """A per_sample_weight too large to fold into a row's scale and offset (the fused
    kernels' way) without overflow takes the plain path: every lookup is finite where
    torch's ``w * row`` on the dequantized table is (a whole bag came out NaN)."""
    table = _encoded(layout, 8, 300, 32, "blocks", 4, 11)[3]
    module = QuantizedEmbeddingBag(table, "sum")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 300, (400,), generator=g)
    weights = torch.tensor([3e38, 1e30, -3e38, 0.5])[torch.arange(400) % 4]
    for offsets in (torch.arange(400), torch.arange(0, 400, 4)):  # one id a bag, four
        ref = F.embedding_bag(ids, table.dequantize(), offsets, mode="sum", per_sample_weights=weights)
        out = module(ids, offsets, weights)
        assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
        finite = torch.isfinite(ref)
        torch.testing.assert_close(out[finite], ref[finite], rtol=1e-5, atol=0.0)
