"""Masks: parity with torch.ao's DataNormSparsifier and the BaseDataSparsifier contract."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from embpress import BaseDataSparsifier, DataNormSparsifier
from embpress.sparsify import block_norm_mask, streaming_block_norm_mask

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torch.ao.pruning._experimental.data_sparsifier import BaseDataSparsifier as RefBase
    from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as RefSparsifier

BOTH = pytest.mark.parametrize("norm_cls", [RefSparsifier, DataNormSparsifier], ids=["torch", "embpress"])


def _ref_mask(x, **cfg):
    ref = RefSparsifier(**cfg)
    ref.add_data("t", x.clone())
    ref.step()
    return ref.get_mask("t").reshape(x.shape).bool()


def _our_mask(x, **cfg):
    ours = DataNormSparsifier(**cfg)
    ours.add_data("t", x.clone())
    ours.step()
    return ours.get_mask("t").bool()


@pytest.mark.parametrize("shape", [(37, 13), (64, 32), (5, 7), (9, 1)])
@pytest.mark.parametrize("block", [(1, 1), (1, 4), (2, 3), (3, 3), (4, 1), "row"])
@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_mask_equals_reference(shape, block, norm):
    torch.manual_seed(hash((shape, str(block), norm)) % 1000)
    x = torch.randn(shape)
    block = (1, shape[1]) if block == "row" else block
    for level in (0.0, 0.3, 0.5, 0.8, 1.0):
        for zeros in (None, 1, 2):
            if zeros is not None and zeros > block[0] * block[1]:
                continue
            cfg = dict(sparsity_level=level, sparse_block_shape=block, zeros_per_block=zeros, norm=norm)
            assert torch.equal(_our_mask(x, **cfg), _ref_mask(x, **cfg)), cfg


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    bh=st.integers(1, 4),
    bw=st.integers(1, 6),
    level=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_mask_equals_reference_property(rows, cols, bh, bw, level, seed, data):
    assume(rows * cols > 1)  # the reference squeezes a 1x1 table to a scalar and fails
    zeros = data.draw(st.one_of(st.none(), st.integers(0, bh * bw)))
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    cfg = dict(sparsity_level=level, sparse_block_shape=(bh, bw), zeros_per_block=zeros)
    assert torch.equal(_our_mask(x, **cfg), _ref_mask(x, **cfg))


def test_pruned_block_count_is_rounded_fraction():
    x = torch.randn(250, 64)
    mask = block_norm_mask(x, 0.8, (1, 4))
    blocks = mask.view(250, 16, 4)
    pruned = (~blocks).all(-1)
    assert torch.equal((~blocks).any(-1), pruned)  # whole blocks only
    assert int(pruned.sum()) == round(0.8 * 250 * 16)


def test_pruned_blocks_have_the_smallest_norms():
    x = torch.randn(100, 8)
    mask = block_norm_mask(x, 0.5, (1, 2), norm="L2")
    norms = (x * x).view(100, 4, 2).mean(-1)
    pruned = ~mask.view(100, 4, 2).any(-1)
    assert norms[pruned].max() < norms[~pruned].min()


def test_ties_prune_exactly_k_blocks():
    x = torch.ones(10, 8)  # every block has the same norm
    mask = block_norm_mask(x, 0.5, (1, 4))
    assert int((~mask).sum()) == 4 * round(0.5 * 20)


def test_one_dimensional_data_keeps_its_shape():
    x = torch.randn(30)
    mask = _our_mask(x, sparsity_level=0.5, sparse_block_shape=(1, 3))
    assert mask.shape == x.shape
    assert int((~mask).sum()) == 3 * 5


@pytest.mark.parametrize(
    "cfg",
    [
        dict(sparsity_level=1.5),
        dict(sparsity_level=-0.1),
        dict(sparse_block_shape=(0, 4)),
        dict(sparse_block_shape=(1, 4), zeros_per_block=5),
        dict(zeros_per_block=-1),
        dict(norm="L3"),
        dict(sparsity_level=True),
        dict(sparsity_level=float("nan")),
        dict(sparse_block_shape=(1.5, 4)),
        dict(sparse_block_shape=(2**70, 1)),
        dict(sparse_block_shape=(1, 2**31)),
        dict(sparse_block_shape=(True, 4)),
        dict(sparse_block_shape=(1, 2, 3)),
        dict(sparse_block_shape="14"),
        dict(zeros_per_block=2.0),
    ],
)
def test_bad_config_raises_value_error(cfg):
    with pytest.raises(ValueError):
        DataNormSparsifier(**cfg)


def test_nan_data_is_refused():
    x = torch.randn(4, 4)
    x[1, 1] = float("nan")
    s = DataNormSparsifier()
    s.add_data("t", x)
    with pytest.raises(ValueError, match="NaN"):
        s.step()


def test_per_data_config_overrides_defaults():
    s = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 1))
    a, b = torch.randn(10, 10), torch.randn(10, 10)
    s.add_data("a", a)
    s.add_data("b", b, sparsity_level=0.9)
    s.step()
    assert int((s.get_mask("a") == 0).sum()) == 50
    assert int((s.get_mask("b") == 0).sum()) == 90
    assert s.data_groups["b"]["sparsity_level"] == 0.9


def test_get_data_and_squash_mask():
    x = torch.randn(8, 8)
    s = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 2))
    s.add_data("x", x)
    s.step()
    mask = s.get_mask("x")
    assert s.get_data("x", return_original=True) is x
    assert torch.equal(s.get_data("x", return_original=False), x * mask)
    s.squash_mask()
    assert torch.equal(x == 0, mask == 0)  # the data object holds the masked values, as torch's
    with pytest.raises(ValueError, match="squashed"):
        s.get_data("x", return_original=True)


def test_add_data_accepts_embedding_modules_and_replaces_with_warning():
    emb = torch.nn.Embedding(10, 4)
    s = DataNormSparsifier()
    assert s.add_data("e", emb) is emb.weight
    s.step()
    old_mask = s.get_mask("e")
    with pytest.warns(UserWarning, match="Replacing"):
        s.add_data("e", torch.randn(10, 4))
    assert s.get_mask("e") is old_mask
    with pytest.raises(ValueError, match="shape"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s.add_data("e", torch.randn(3, 3))
    with pytest.raises(TypeError):
        s.add_data("bad", [1, 2, 3])


def test_state_dict_round_trip():
    s = DataNormSparsifier(sparsity_level=0.7, sparse_block_shape=(1, 2))
    s.add_data("a", torch.randn(6, 8))
    s.add_data("b", torch.randn(4, 4), sparsity_level=0.25)
    s.step()
    state = s.state_dict()
    assert state["state"]["a"]["mask"].is_sparse
    t = DataNormSparsifier()
    t.load_state_dict(state)
    for name in ("a", "b"):
        assert torch.equal(t.get_mask(name), s.get_mask(name))
        assert torch.equal(t.get_data(name), s.get_data(name))
        assert t.data_groups[name] == s.data_groups[name]


def test_load_state_dict_refuses_masks_that_do_not_fit_their_data():
    """As add_data checks a given mask and torch's load refuses it: a mask of another shape
    (one that broadcasts too) or one that would change the data's dtype is refused, naming
    the entry, and the sparsifier keeps what it held."""
    s = DataNormSparsifier()
    s.add_data("emb", nn.Embedding(6, 8))
    for bad in (torch.ones(1, 6, 8), torch.ones(6, 4), torch.ones(6, 8, dtype=torch.float64)):
        state = s.state_dict()
        state["state"]["emb"]["mask"] = bad.to_sparse_coo()
        t = DataNormSparsifier()
        t.add_data("kept", torch.randn(3, 4))
        with pytest.raises(ValueError, match="Error loading emb: "):
            t.load_state_dict(state)
        assert list(t.data_groups) == ["kept"] and "emb" not in t.state


def test_a_sparsifier_saves_whole_with_torch_save(tmp_path):
    """torch.save of the sparsifier itself (as torch's allows): the masks, int8 views of
    bool tensors, are saved without those, and load with the same masks, which step on."""
    s = DataNormSparsifier(sparsity_level=0.5)
    s.add_data("a", torch.randn(6, 8))
    s.add_data("fresh", torch.randn(4, 4))  # before step: its all-ones starting mask
    s.step()
    s.add_data("b", torch.randn(5, 4))
    torch.save(s, tmp_path / "s.pt")
    t = torch.load(tmp_path / "s.pt", weights_only=False)
    for name in ("a", "fresh", "b"):
        assert torch.equal(t.get_mask(name), s.get_mask(name))
        assert torch.equal(t.kept_mask(name), s.kept_mask(name))
    t.step()
    s.step()
    assert all(torch.equal(t.get_mask(n), s.get_mask(n)) for n in ("a", "fresh", "b"))


def test_the_sparsifier_works_under_inference_mode():
    """Under torch.inference_mode its tensors have no version counter: the masks come out
    as outside it, an edit in place is still seen, and squash_mask applies it."""
    torch.manual_seed(0)
    w = torch.randn(50, 16)
    outside = DataNormSparsifier(sparsity_level=0.5)
    outside.add_data("x", w.clone())
    outside.step()
    with torch.inference_mode():
        s = DataNormSparsifier(sparsity_level=0.5)
        s.add_data("x", w.clone())
        assert bool(s.kept_mask("x").all())
        s.step()
        assert torch.equal(s.get_mask("x"), outside.get_mask("x"))
        s.get_mask("x")[0] = 0
        assert not bool(s.kept_mask("x")[0].any())
        s.squash_mask()
        assert s.get_data("x", return_original=False)[0].abs().sum() == 0


def test_user_sparsifier_overrides_update_mask():
    class EveryOtherRow(BaseDataSparsifier):
        def update_mask(self, name, data, **kwargs):
            mask = torch.ones_like(data, dtype=torch.bool)
            mask[::2] = False
            self.state[name]["mask"] = mask

    s = EveryOtherRow()
    s.add_data("x", torch.randn(6, 3))
    s.step()
    assert torch.equal(s.get_mask("x")[:, 0], torch.tensor([False, True] * 3))


def test_disabled_mask_update_keeps_masks():
    s = DataNormSparsifier(sparsity_level=0.9)
    s.add_data("x", torch.randn(8, 8))
    s.enable_mask_update = False
    s.step()
    assert bool(s.get_mask("x").all())
    assert math.isclose(s.defaults["sparsity_level"], 0.9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_mask_dtype_and_identity_follow_torch(dtype):
    """Before step a mask is ones (torch: of the data's dtype; here int8, one byte an entry),
    after step int8 in both, the same object throughout. The data's (1, 4) blocks have
    distinct whole means, exact in every dtype (torch averages half-precision data in
    its own precision, where random data's masks can differ: see README)."""
    gen = torch.Generator().manual_seed(0)
    means = (torch.randperm(12, generator=gen) + 1).float().repeat_interleave(4)
    signs = torch.randint(0, 2, (48,), generator=gen).float() * 2 - 1
    x = (means * signs).reshape(6, 8).to(dtype)
    ref, ours = RefSparsifier(sparsity_level=0.5), DataNormSparsifier(sparsity_level=0.5)
    for s in (ref, ours):
        s.add_data("t", x.clone())
    before = [s.get_mask("t") for s in (ref, ours)]
    assert before[0].dtype == dtype and before[1].dtype == torch.int8
    assert torch.equal(before[1].to(dtype), before[0])
    assert (before[1] * x).dtype == dtype  # the mask keeps the data's dtype
    assert float(1.0 - before[1].float().mean()) == 0.0 and int((1 - before[1]).sum()) == 0
    for s in (ref, ours):
        s.step()
    after = [s.get_mask("t") for s in (ref, ours)]
    assert after[1] is before[1]
    assert after[0].dtype == after[1].dtype == torch.int8
    assert torch.equal(after[0], after[1])


def test_mask_written_in_place_is_what_the_api_sees():
    """An in-place edit of the int8 mask after step is not hidden by the bool fast path."""
    x = torch.randn(8, 8)
    s = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 1))
    s.add_data("t", x)
    s.step()
    assert torch.equal(s.kept_mask("t"), s.get_mask("t") != 0)
    s.get_mask("t")[0] = 0
    s.get_mask("t")[1] = 1
    kept = s.kept_mask("t")
    assert kept.dtype == torch.bool
    assert not bool(kept[0].any()) and bool(kept[1].all())
    assert torch.equal(kept, s.get_mask("t") != 0)


def test_starting_mask_is_one_byte_an_entry_and_needs_no_copy():
    x = torch.randn(1000, 64)
    s = DataNormSparsifier()
    s.add_data("t", x)
    mask = s.state["t"]["mask"]
    assert mask is s.get_mask("t") and mask.element_size() == 1 and 0 not in mask.stride()
    kept = s.kept_mask("t")  # the bool view of the same memory, no copy
    assert kept.dtype == torch.bool and kept.data_ptr() == mask.data_ptr() and bool(kept.all())
    mask[0, 0] = 0  # writable, and seen by kept_mask
    assert s.get_mask("t") is mask and int(mask.sum()) == x.numel() - 1
    assert not bool(s.kept_mask("t")[0, 0]) and int(s.kept_mask("t").sum()) == x.numel() - 1


def _seen_during_step(monkeypatch, s, fail=False):
    """The size of mask "t" while ``s.step()`` computes its new one (``fail``: which then
    raises)."""
    from embpress.sparsify import data_norm

    seen = []

    real = data_norm._block_norm_mask

    def spy(data, *args):
        seen.append(s.get_mask("t").numel())
        if fail:
            raise MemoryError("no room for the norms")
        return real(data, *args)

    monkeypatch.setattr(data_norm, "_block_norm_mask", spy)
    if fail:
        with pytest.raises(MemoryError):
            s.step()
    else:
        s.step()
    monkeypatch.undo()
    return seen[0]


def test_the_starting_mask_is_freed_while_the_first_mask_is_computed(monkeypatch):
    """Its memory then serves the new mask (a large table's peak falls by the mask's size);
    the object stays the one the API returned, and holds the new mask afterwards."""
    x = torch.randn(64, 16)
    s = DataNormSparsifier(sparsity_level=0.5)
    s.add_data("t", x)
    mask = s.get_mask("t")
    assert _seen_during_step(monkeypatch, s) == 0
    assert s.get_mask("t") is mask and mask.shape == x.shape and mask.dtype == torch.int8
    assert torch.equal(mask.bool(), block_norm_mask(x, 0.5)) and torch.equal(s.kept_mask("t"), mask.bool())
    assert _seen_during_step(monkeypatch, s) == x.numel()  # a computed mask is never freed


def test_a_failed_first_mask_leaves_the_starting_mask_as_it_was(monkeypatch):
    x = torch.randn(64, 16)
    s = DataNormSparsifier(sparsity_level=0.5)
    s.add_data("t", x)
    mask = s.get_mask("t")
    assert _seen_during_step(monkeypatch, s, fail=True) == 0
    assert s.get_mask("t") is mask and mask.shape == x.shape and mask.dtype == torch.int8
    assert bool((mask == 1).all()) and bool(s.kept_mask("t").all())
    assert s.kept_mask("t").data_ptr() == mask.data_ptr()
    assert _seen_during_step(monkeypatch, s) == 0  # still the untouched starting mask
    assert torch.equal(mask.bool(), block_norm_mask(x, 0.5))


def test_an_unmade_starting_mask_holds_no_memory_and_step_or_failure_gives_a_real_one(monkeypatch):
    """Within ``_starting_masks_unmade`` (what ``post_training_sparse_quantize`` uses), the
    starting mask reads as all ones without memory of its own; ``step`` gives the mask a
    sparsifier made the usual way gives, and a failed first ``step`` a writable all-ones one."""
    x = torch.randn(64, 16)
    made = DataNormSparsifier(sparsity_level=0.5)
    made.add_data("t", x)
    s = DataNormSparsifier(sparsity_level=0.5)
    with s._starting_masks_unmade():
        s.add_data("t", x)
    s.add_data("u", x)  # after the block: made as usual
    mask = s.get_mask("t")
    assert mask.shape == x.shape and mask.dtype == torch.int8 and bool((mask == 1).all())
    assert mask.stride() == (0, 0) and s.get_mask("u").stride() == (16, 1)
    assert torch.equal(s.get_data("t", return_original=False), x)
    assert _seen_during_step(monkeypatch, s, fail=True) == 0
    assert s.get_mask("t") is mask and mask.stride() == (16, 1) and bool((mask == 1).all())
    mask[0, 0] = 0  # writable now
    with s._starting_masks_unmade():
        s.add_data("v", x)
    s.step()
    made.step()
    assert torch.equal(s.get_mask("v"), made.get_mask("t"))
    assert s.get_mask("v").stride() == (16, 1)


def test_compression_makes_no_starting_mask_with_our_sparsifier_only(monkeypatch):
    """``post_training_sparse_quantize`` skips writing the starting masks with
    DataNormSparsifier itself (its step frees them unread), not with a subclass, whose
    ``update_mask`` may write into them; both give the same model."""
    import embpress

    class Sub(DataNormSparsifier):
        pass

    seen: list[bool] = []
    real = BaseDataSparsifier._all_kept

    def spy(weight, unmade=False):
        seen.append(unmade)
        return real(weight, unmade)

    monkeypatch.setattr(BaseDataSparsifier, "_all_kept", staticmethod(spy))
    weight = torch.randn(40, 8)
    outs = []
    for cls in (DataNormSparsifier, Sub):
        model = nn.Sequential(nn.Embedding.from_pretrained(weight.clone()))
        embpress.post_training_sparse_quantize(model, cls, sparsity_level=0.5, sparse_block_shape=(1, 4))
        outs.append(model[0](torch.arange(40)))
    assert seen == [True, False]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("block", [(1, 4), (2, 3), (1, 1)])
def test_the_step_counts_infinite_block_norms_where_it_makes_norms(block):
    """What ``post_training_sparse_quantize`` reads in place of a NaN/Inf pass: per data,
    the infinite block norms the threshold's histogram saw (an Inf makes its block's;
    two finite 3e38 in one block overflow), None where the step made no norms."""
    from embpress.sparsify import data_norm

    x = torch.randn(40, 12)
    assert data_norm._block_norm_mask(x, 0.5, block)[1] == 0
    assert data_norm._block_norm_mask(x, 0.0, block)[1] is None
    assert data_norm._block_norm_mask(x, 1.0, block)[1] is None  # every block pruned: no threshold
    x[5, 0] = float("-inf")
    x[9, 3] = float("inf")
    assert data_norm._block_norm_mask(x, 0.5, block)[1] == 2
    y = torch.randn(40, 12)
    y[0, 0] = y[0, 1] = y[1, 0] = 3e38
    expect = {(1, 4): 1, (2, 3): 1, (1, 1): 0}[block]
    assert data_norm._block_norm_mask(y, 0.5, block)[1] == expect
    s = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=block)
    s.add_data("t", x)
    s.add_data("u", torch.randn(40, 12))
    s.step()
    assert s._infinite_norms == {"t": 2, "u": 0}
    assert torch.equal(s.kept_mask("t"), block_norm_mask(x, 0.5, block))


def test_a_starting_mask_written_by_the_user_is_kept_while_the_first_is_computed(monkeypatch):
    x = torch.randn(64, 16)
    s = DataNormSparsifier(sparsity_level=0.5)
    s.add_data("t", x)
    s.get_mask("t")[0, 0] = 0  # in place: no longer the mask add_data made
    assert _seen_during_step(monkeypatch, s) == x.numel()
    held = DataNormSparsifier(sparsity_level=0.5)
    held.add_data("t", x)
    held.state["t"]["mask"] = torch.ones(64, 16, dtype=torch.int8)  # replaced by the user
    assert _seen_during_step(monkeypatch, held) == x.numel()


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_starting_mask_keeps_any_data_dtype(dtype):
    """Where int8 would change the data's dtype in ``mask * data`` the mask has the data's."""
    x = torch.ones(4, 4, dtype=dtype)
    s = DataNormSparsifier()
    s.add_data("t", x)
    assert s.get_data("t", return_original=False).dtype == dtype
    assert bool(s.kept_mask("t").all())
    s.squash_mask()
    assert x.dtype == dtype and bool((x == 1).all())


def test_block_shape_errors_name_the_block_shape():
    with pytest.raises(ValueError, match="sparse_block_shape must be two positive integers"):
        DataNormSparsifier(sparse_block_shape=(1.5, 4))
    with pytest.raises(ValueError, match="sparse_block_shape"):
        DataNormSparsifier(sparse_block_shape=(2**70, 1))


@pytest.mark.parametrize("level", [-1.0, 2.0, True])
def test_out_of_range_sparsity_level_is_refused_not_clamped(level):
    """torch clamps; embpress refuses, at add_data and at step (config changed after)."""
    s = DataNormSparsifier()
    with pytest.raises(ValueError, match="sparsity_level"):
        s.add_data("t", torch.randn(4, 4), sparsity_level=level)
    assert "t" not in s.data_groups
    s.add_data("t", torch.randn(4, 4))
    s.data_groups["t"]["sparsity_level"] = level
    with pytest.raises(ValueError, match="sparsity_level"):
        s.step()


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 24),
    bh=st.integers(1, 4),
    bw=st.integers(1, 6),
    level=st.sampled_from([0.0, 0.1, 0.5, 0.8, 1.0]),
    zeros=st.integers(0, 24),
    chunk=st.integers(1, 16),
    ties=st.booleans(),
    norm=st.sampled_from(["L1", "L2"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_streaming_mask_equals_the_in_memory_mask(rows, cols, bh, bw, level, zeros, chunk, ties, norm, seed):
    """Same mask chunk by chunk, for any chunk size, with ties at the threshold too."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    if ties:  # few distinct values: many equal block norms
        x = torch.randint(-2, 3, (rows, cols), generator=g).float()
    zpb = min(zeros, bh * bw)
    want = block_norm_mask(x, level, (bh, bw), zpb, norm)
    pieces = list(
        streaming_block_norm_mask(
            lambda a, b: x[a:b], (rows, cols), level, (bh, bw), zpb, norm, chunk_rows=chunk
        )
    )
    starts = [s for s, _ in pieces]
    assert starts == sorted(starts) and starts[0] == 0
    got = torch.cat([m for _, m in pieces]) if rows > 1 and cols > 1 else pieces[0][1]
    assert torch.equal(got, want)


def test_streaming_mask_reads_only_what_it_is_given_and_refuses_nan():
    x = torch.randn(64, 8)
    reads = []

    def read(a, b):
        reads.append((a, b))
        return x[a:b]

    list(streaming_block_norm_mask(read, (64, 8), 0.5, (1, 4), chunk_rows=16))
    assert max(b - a for a, b in reads) == 16
    x[10, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        list(streaming_block_norm_mask(lambda a, b: x[a:b], (64, 8), 0.5, (1, 4), chunk_rows=16))
    with pytest.raises(ValueError, match="gave shape"):
        list(streaming_block_norm_mask(lambda a, b: x[a : b + 1], (63, 8), 0.5, (1, 4), chunk_rows=16))


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 300),
    quads=st.integers(1, 40),
    square=st.booleans(),
    specials=st.lists(
        st.sampled_from([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -3e38]), max_size=6
    ),
    seed=st.integers(0, 2**16),
)
def test_the_1x4_kernels_are_the_general_ones_bit_for_bit(rows, quads, square, specials, seed) -> None:
    """The (1, 4) block norms and mask expansion (constant block width) equal the general
    kernels bit for bit, special values included."""
    from embpress._parallel import parallel_call
    from embpress.sparsify._kernels import (
        block_norms,
        block_norms_1x4,
        expand_block_mask,
        expand_block_mask_1x4,
    )

    g = torch.Generator().manual_seed(seed)
    x = (
        torch.randn(rows, 4 * quads, generator=g) * 10 ** torch.randint(-3, 4, (rows, 1), generator=g)
    ).numpy()
    flat = x.reshape(-1)
    for i, v in enumerate(specials):
        flat[(i * 7919) % flat.size] = v
    want, got = (np.empty((rows, quads), np.float32) for _ in range(2))
    parallel_call(block_norms, x, 1, 4, square, want)
    parallel_call(block_norms_1x4, x, square, got)
    assert np.array_equal(want.view(np.uint32), got.view(np.uint32))
    pruned = torch.rand(rows, quads, generator=g).numpy() < 0.5
    want_mask, got_mask = (np.empty((rows, 4 * quads), np.bool_) for _ in range(2))
    parallel_call(expand_block_mask, pruned, 1, 4, want_mask)
    parallel_call(expand_block_mask_1x4, pruned, got_mask)
    assert np.array_equal(want_mask, got_mask)


def test_streaming_mask_of_part_of_the_rows_needs_a_collective():
    """One process reading part of the rows would take their norms for the whole table's
    (every row of a low half pruned): refused; the whole range is the in-memory mask."""
    x = torch.randn(64, 8)
    with pytest.raises(ValueError, match=r"row_range \(0, 32\) covers part of the table's 64 rows"):
        list(streaming_block_norm_mask(lambda a, b: x[a:b], (64, 8), 0.5, (1, 4), row_range=(0, 32)))
    whole = list(streaming_block_norm_mask(lambda a, b: x[a:b], (64, 8), 0.5, (1, 4), row_range=(0, 64)))
    assert torch.equal(torch.cat([m for _, m in whole]), block_norm_mask(x, 0.5, (1, 4)))


# ---------------------------------------------------------------- squash and state, as torch's


@BOTH
def test_squash_gives_the_data_new_memory_and_leaves_its_aliases(norm_cls):
    """The registered object (the embedding's Parameter) sees the pruned values; a view
    of its old memory and a state_dict taken before squash keep the original ones."""
    torch.manual_seed(0)
    emb = nn.Embedding(8, 8)
    weight, original = emb.weight, emb.weight.detach().clone()
    view = emb.weight.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = norm_cls(sparsity_level=0.5)
        s.add_data("e", emb)
        s.step()
        saved = s.state_dict()["_container"]["parametrizations.e.original"]
        s.squash_mask()
    assert emb.weight is weight and s.get_data("e", return_original=False) is weight
    assert int((weight == 0).sum()) == 32
    assert torch.equal(weight, original * (weight != 0))
    assert torch.equal(view, original) and torch.equal(saved, original)


@BOTH
def test_squashing_a_loaded_sparsifier_leaves_the_first_one_and_the_model(norm_cls):
    torch.manual_seed(0)
    emb = nn.Embedding(8, 8)
    original = emb.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = norm_cls(sparsity_level=0.5)
        a.add_data("e", emb)
        a.step()
        b = norm_cls(sparsity_level=0.5)
        b.load_state_dict(a.state_dict())
        b.squash_mask()
        assert int((b.get_data("e", return_original=False) == 0).sum()) == 32
        assert torch.equal(emb.weight, original) and torch.equal(a.get_data("e"), original)
        assert b.get_mask("e") is not a.get_mask("e")


def test_squash_refuses_a_mask_that_changes_the_dtype_before_changing_anything():
    """torch's squash fails in ``set_`` (RuntimeError); embpress checks every name first."""

    class FloatMask(BaseDataSparsifier):
        def update_mask(self, name, data, **kwargs):
            self.get_mask(name).data = torch.ones(data.shape)

    x, y = torch.randn(4, 4), torch.randn(4, 4).bfloat16()
    s = FloatMask()
    s.add_data("x", x)
    s.add_data("y", y)
    s.step()
    with pytest.raises(RuntimeError, match="dtype"):
        s.squash_mask()
    assert s.get_data("x", return_original=True) is x  # nothing squashed


@pytest.mark.parametrize("base", [RefBase, BaseDataSparsifier], ids=["torch", "embpress"])
def test_state_mask_is_a_normal_tensor_and_the_one_get_mask_returns(base):
    class FirstRow(base):  # type: ignore[misc, valid-type]
        def update_mask(self, name, data, **kwargs):
            self.state[name]["mask"][0] = 0  # in place, through state

    s = FirstRow()
    s.add_data("x", torch.randn(3, 4))
    mask = s.state["x"]["mask"]
    assert mask is s.get_mask("x")
    s.step()
    assert s.get_mask("x") is mask
    assert mask.tolist() == [[0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "cfg",
    [
        dict(sparsity_level=np.float32(0.5)),
        dict(sparsity_level=np.float64(0.3)),
        dict(zeros_per_block=np.int64(2)),
        dict(sparsity_level=np.float32(0.1), sparse_block_shape=(1, 4)),  # 0.1f * 5 blocks = 0.5
    ],
    ids=str,
)
def test_numpy_scalars_are_taken_as_torch_takes_them(cfg):
    x = torch.randn(5, 4)
    assert torch.equal(_our_mask(x, **cfg), _ref_mask(x, **cfg))
    level, zeros = cfg.get("sparsity_level", 0.5), cfg.get("zeros_per_block")
    whole = torch.cat(
        [m for _, m in streaming_block_norm_mask(lambda a, b: x[a:b], (5, 4), level, (1, 4), zeros)]
    )
    assert torch.equal(whole, block_norm_mask(x, level, (1, 4), zeros))


@pytest.mark.parametrize("cfg", [dict(sparsity_level=np.bool_(True)), dict(zeros_per_block=np.float64(2.0))])
def test_numpy_bools_and_non_integral_zeros_are_refused(cfg):
    with pytest.raises(ValueError):
        DataNormSparsifier(**cfg)


def test_norm_is_per_sparsifier():
    """torch's DataNormSparsifier ignores a ``norm`` given to add_data; embpress refuses a
    different one (its docstring says so) and takes the same one."""
    assert "All four" not in (DataNormSparsifier.__doc__ or "")
    s = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 2))
    for bad in ("L2", "bogus"):
        with pytest.raises(ValueError, match="norm is set per sparsifier"):
            s.add_data("x", torch.randn(2, 4), norm=bad)
    assert "x" not in s.data_groups
    s.add_data("x", torch.tensor([[3.0, 0.0, 1.6, 1.6]]), norm="L1")
    s.step()
    assert s.get_mask("x").tolist() == [[0, 0, 1, 1]]


# ---------------------------------------------------------------- smaller API points


def test_add_data_returns_the_masked_data_as_torch():
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    got = []
    for cls in (RefSparsifier, DataNormSparsifier):
        s = cls(sparsity_level=0.5)
        assert torch.equal(s.add_data("x", x.clone()), x)
        s.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got.append(s.add_data("x", y.clone()))  # replacing, the mask reused
    assert int((got[1] == 0).sum()) == 16 and torch.equal(got[0], got[1])


@BOTH
def test_prepare_is_not_implemented(norm_cls):
    with pytest.raises(NotImplementedError):
        norm_cls().prepare(nn.Linear(2, 2), None)


def test_repr_is_torch_s():
    for populate in (False, True):
        texts = []
        for cls in (RefSparsifier, DataNormSparsifier):
            s = cls(sparsity_level=0.5)
            if populate:
                s.add_data("a", torch.randn(4, 4))
                s.add_data("b", torch.randn(4, 4), sparsity_level=0.25)
            texts.append(repr(s))
        assert texts[0] == texts[1]


@BOTH
@pytest.mark.parametrize(
    "mask", [torch.ones(4, 4), torch.ones(3, 4, dtype=torch.bfloat16)], ids=["float32-mask", "bad-shape"]
)
def test_a_mask_that_changes_dtype_or_shape_is_refused_at_add_data(norm_cls, mask):
    weight = nn.Embedding(4, 4).to(torch.bfloat16)
    s = norm_cls()
    # torch: ValueError (dtype) or AssertionError (shape); embpress: ValueError
    with pytest.raises(ValueError if norm_cls is DataNormSparsifier else (ValueError, AssertionError)):
        s.add_data("e", weight, mask=mask)
    s.add_data("e", weight, mask=torch.ones(4, 4, dtype=torch.int8))  # int8 keeps bfloat16
