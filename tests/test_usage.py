"""record_usage: per-row lookup counts of every table, saved and loaded as safetensors."""

from __future__ import annotations

import json
import os
import stat
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import embpress
from embpress import Usage, UsageError, record_usage


class TwoTables(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 4, padding_idx=0)
        self.bag = nn.EmbeddingBag(30, 4, mode="sum")
        self.head = nn.Linear(4, 1)

    def forward(self, ids, bag_ids, offsets, weights=None):
        return self.head(self.emb(ids).sum(1) + self.bag(bag_ids, offsets, per_sample_weights=weights))


def _expected(ids, rows, weights=None, skip=None):
    flat = ids.reshape(-1)
    ones = torch.ones(flat.numel(), dtype=torch.float64)
    w = ones if weights is None else weights.reshape(-1).abs().double()
    out = torch.zeros(rows, dtype=torch.float64)
    for i, v in zip(flat.tolist(), w.tolist(), strict=True):
        if i != skip:
            out[i] += v
    return out


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(0, 2**31 - 1), st.booleans())
def test_counts_equal_a_plain_tally_over_batches(batches, seed, weighted):
    g = torch.Generator().manual_seed(seed)
    model = TwoTables()
    want_emb, want_bag = torch.zeros(20, dtype=torch.float64), torch.zeros(30, dtype=torch.float64)
    with record_usage(model) as usage:
        for _ in range(batches):
            ids = torch.randint(0, 20, (3, 5), generator=g)
            bag_ids = torch.randint(0, 30, (7,), generator=g)
            offsets = torch.tensor([0, 3, 5])
            w = torch.randn(7, generator=g) if weighted else None
            model(ids, bag_ids, offsets, w)
            want_emb += _expected(ids, 20, skip=0)
            want_bag += _expected(bag_ids, 30, w)
    assert torch.allclose(usage["emb"], want_emb)
    assert torch.allclose(usage["bag"], want_bag)
    assert usage.calls["emb"] == usage.calls["bag"] == batches


def test_hooks_are_gone_after_the_block_and_counts_accumulate():
    model = TwoTables()
    ids, bag_ids, offsets = torch.tensor([[1, 2]]), torch.tensor([3, 3]), torch.tensor([0])
    with record_usage(model) as usage:
        model(ids, bag_ids, offsets)
    model(ids, bag_ids, offsets)  # outside: not counted
    assert float(usage["bag"][3]) == 2.0
    with record_usage(model, usage):
        model(ids, bag_ids, offsets)
    assert float(usage["bag"][3]) == 4.0
    assert not model.bag._forward_pre_hooks and not model.emb._forward_pre_hooks


def test_a_block_that_counts_nothing_warns_and_one_that_counts_does_not():
    """A block in which no table is looked up warns, naming the usual cause (a model
    compiled before recording runs without the hooks); a block with lookups is silent."""
    import warnings

    model = TwoTables()
    ids, bag_ids, offsets = torch.tensor([[1, 2]]), torch.tensor([3, 3]), torch.tensor([0])
    with pytest.warns(UserWarning, match="counted no lookup.*torch.compile"), record_usage(model) as usage:
        pass
    assert float(usage["bag"].sum()) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with record_usage(model, usage):
            model(ids, bag_ids, offsets)


def test_include_last_offset_ignores_ids_past_the_last_offset():
    bag = nn.EmbeddingBag(10, 2, include_last_offset=True)
    model = nn.ModuleDict({"bag": bag})
    with record_usage(model) as usage:
        bag(torch.tensor([1, 2, 3, 4]), torch.tensor([0, 2, 3]))
    assert usage["bag"].tolist()[:5] == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_quantized_tables_are_counted_too():
    model = TwoTables()
    embpress.post_training_sparse_quantize(model, embpress.DataNormSparsifier, sparsity_level=0.5)
    with record_usage(model) as usage:
        model(torch.tensor([[5, 5]]), torch.tensor([7]), torch.tensor([0]))
    assert float(usage["emb"][5]) == 2.0 and float(usage["bag"][7]) == 1.0


def test_save_load_round_trip_and_check(tmp_path):
    model = TwoTables()
    with record_usage(model) as usage:
        model(torch.tensor([[1, 2]]), torch.tensor([3]), torch.tensor([0]))
    path = tmp_path / "usage.safetensors"
    usage.save(path)
    back = Usage.load(path)
    assert set(back.counts) == {"emb", "bag"}
    for name in back.counts:
        assert torch.equal(back[name], usage[name])
    back.check(model)
    assert back.seen_fraction("bag") == pytest.approx(1 / 30)


def test_saved_usage_file_mode_follows_the_umask(tmp_path):
    """As open() creates files (safetensors' save_file alone leaves them 0o600); no temp
    file is left beside it."""
    model = TwoTables()
    with record_usage(model) as usage:
        model(torch.tensor([[1, 2]]), torch.tensor([3]), torch.tensor([0]))
    path = tmp_path / "usage.safetensors"
    old = os.umask(0o022)
    try:
        usage.save(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["usage.safetensors"]


def _write_raw(path, tensors, metadata):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize(
    "counts, match",
    [
        ({"counts.emb": torch.tensor([1.0, float("nan")], dtype=torch.float64)}, "NaN"),
        ({"counts.emb": torch.tensor([1.0, -2.0], dtype=torch.float64)}, "negative"),
        ({"counts.emb": torch.ones(2, 2, dtype=torch.float64)}, "1-D"),
        ({"other": torch.ones(2, dtype=torch.float64)}, "unexpected tensor"),
    ],
)
def test_bad_counts_are_refused_naming_the_file(tmp_path, counts, match):
    path = tmp_path / "u.safetensors"
    _write_raw(path, counts, {"format": "embpress-usage", "format_version": "1"})
    with pytest.raises(UsageError, match=match) as info:
        Usage.load(path)
    assert str(path) in str(info.value)


def test_files_that_are_not_usage_files_are_refused(tmp_path):
    other = tmp_path / "other.safetensors"
    _write_raw(other, {"counts.emb": torch.ones(2, dtype=torch.float64)}, {"format": "embpress"})
    with pytest.raises(UsageError, match="not an embpress usage file"):
        Usage.load(other)
    garbage = tmp_path / "garbage.safetensors"
    header = json.dumps({"x": {"dtype": "F64", "shape": [10**12], "data_offsets": [0, 8 * 10**12]}}).encode()
    garbage.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(UsageError, match="not a readable safetensors file"):
        Usage.load(garbage)
    with pytest.raises(UsageError, match="not a regular file"):
        Usage.load(tmp_path)


def test_usage_that_does_not_match_the_model_is_refused():
    model = TwoTables()
    with pytest.raises(UsageError, match="'bag': usage has 5 rows, the model's table 30"):
        Usage({"emb": torch.zeros(20), "bag": torch.zeros(5)}).check(model)
    with pytest.raises(UsageError, match="does not have: nope"):
        Usage({"nope": torch.zeros(3)}).check(model)
    with pytest.raises(UsageError, match="no counts for table 'bag'"):
        Usage({"emb": torch.zeros(20)}).check(model)
    Usage({"emb": torch.zeros(20)}).check(model, names=["emb"])
    with pytest.raises(UsageError, match="rows"), record_usage(model, Usage({"bag": torch.zeros(5)})):
        pass


def test_counts_recorded_in_inference_mode_can_be_added_to_outside_it():
    """Counts are normal tensors whatever the mode they were made in: a later block
    outside torch.inference_mode() adds to them (an inference tensor refuses in-place
    updates there, from inside the model's forward)."""
    model = nn.Sequential(nn.Embedding(10, 4))
    ids = torch.tensor([1, 2, 3])
    with torch.inference_mode(), record_usage(model) as usage:
        model(ids)
    with torch.no_grad(), record_usage(model, usage):
        model(ids)
    assert usage["0"].tolist() == [0, 2, 2, 2, 0, 0, 0, 0, 0, 0]
    with torch.inference_mode():
        given = Usage({"0": torch.ones(10, dtype=torch.float64)})
    with record_usage(model, given):
        model(ids)
    assert float(given["0"].sum()) == 13.0


def test_a_refused_usage_is_left_as_it_was():
    """record_usage checks every table before it adds zero counts for any: a usage refused
    for one table gains no counts for the others."""
    model = TwoTables()  # emb first, then bag
    given = Usage({"bag": torch.ones(29)})
    with pytest.raises(UsageError, match="'bag': usage has 29 rows"), record_usage(model, given):
        pass
    assert list(given.counts) == ["bag"] and given.calls == {"bag": 0}
    with pytest.raises(TypeError, match=r"usage must be an embpress\.Usage"), record_usage(model, {}):  # type: ignore[arg-type]
        pass


def test_non_finite_weights_count_as_lookups_and_saved_counts_load(tmp_path):
    """A NaN or infinite per-sample weight still looks its row up: the row counts as used,
    every count stays finite, and what save writes, load reads."""
    bag = nn.EmbeddingBag(6, 2, mode="sum")
    w = torch.tensor([float("nan"), float("inf"), 1e308, 1e308, 2.0])
    with record_usage(bag) as usage:
        bag(torch.tensor([0, 1, 2, 2, 3]), torch.tensor([0]), per_sample_weights=w)
    counts = usage[""]
    assert bool(torch.isfinite(counts).all())
    assert counts[0] > 0 and counts[1] > 0 and counts[2] > 0 and float(counts[3]) == 2.0
    assert float(counts[4]) == 0.0
    path = tmp_path / "u.safetensors"
    usage.save(path)
    back = Usage.load(path)
    assert torch.equal(back[""], counts)
    back.check(bag)


def test_a_bare_module_is_the_table_named_by_the_empty_path(tmp_path):
    emb = nn.Embedding(5, 2)
    with record_usage(emb) as usage:
        emb(torch.tensor([1, 1, 4]))
    assert usage[""].tolist() == [0.0, 2.0, 0.0, 0.0, 1.0]
    usage.save(tmp_path / "u.safetensors")
    Usage.load(tmp_path / "u.safetensors").check(emb)
    Usage({"": torch.zeros(5)}).check(emb)


def test_a_call_that_fails_counts_nothing():
    model = TwoTables()
    with record_usage(model) as usage:
        model(torch.tensor([[1, 2]]), torch.tensor([3]), torch.tensor([0]))
        with pytest.raises((IndexError, RuntimeError)):
            model.bag(torch.tensor([3, 99]), torch.tensor([0]))  # 99 is out of range: torch refuses
        with pytest.raises(ValueError):
            model.bag(torch.tensor([3, 4]), torch.tensor([0]), per_sample_weights=torch.ones(3))
    assert float(usage["bag"].sum()) == 1.0 and usage.calls["bag"] == 1


def test_nested_blocks_with_one_usage_count_each_lookup_once():
    model = TwoTables()
    ids, bag_ids, offsets = torch.tensor([[1, 2]]), torch.tensor([3, 3]), torch.tensor([0])
    with record_usage(model) as usage:
        with record_usage(model, usage):
            model(ids, bag_ids, offsets)
        model(ids, bag_ids, offsets)  # the outer block still counts after the inner one ends
    assert float(usage["bag"][3]) == 4.0 and usage.calls["bag"] == 2
    with record_usage(model) as other, record_usage(model, usage):
        model(ids, bag_ids, offsets)  # two usages: each counts the call
    assert float(other["bag"][3]) == 2.0 and float(usage["bag"][3]) == 6.0
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_usage_copies_the_counts_it_is_given():
    given = torch.zeros(10, dtype=torch.float64)
    usage = Usage({"0": given})
    model = nn.Sequential(nn.Embedding(10, 4))
    with record_usage(model, usage):
        model(torch.tensor([1, 2]))
    assert float(given.sum()) == 0.0 and float(usage["0"].sum()) == 2.0
