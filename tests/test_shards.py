"""Loading one row range of a table (row-wise sharding): the shard holds exactly those rows,
answers lookups for them with local ids, and only what they need is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import embpress
from embpress import io as eio
from embpress.layouts import TABLE_CLASSES

# layouts that a uniform config can produce (the contract suite builds the others)
LAYOUTS = [name for name, cls in TABLE_CLASSES.items() if cls.in_auto]


class Model(nn.Module):
    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(rows, dim, mode="sum")
        self.other = nn.Embedding(7, 3)
        self.head = nn.Linear(dim, 1)


def saved_model(tmp_path, layout: str, rows: int, dim: int, bits: int, seed: int):
    torch.manual_seed(seed)
    model = Model(rows, dim)
    with torch.no_grad():
        model.emb.weight[::5] = 0.0
    block = (1, 4) if layout != "pruned_rows" else (1, dim)
    embpress.post_training_sparse_quantize(
        model,
        embpress.DataNormSparsifier,
        True,
        [model.emb],
        quant=embpress.QuantConfig(bits=bits, layout=layout),
        sparsity_level=0.6,
        sparse_block_shape=block,
    )
    path = tmp_path / f"{layout}-{rows}-{dim}-{bits}-{seed}.safetensors"
    embpress.save(model, path)
    return model, path


@settings(max_examples=15, deadline=None)
@given(
    layout=st.sampled_from(LAYOUTS),
    rows=st.integers(1, 700),
    dim=st.sampled_from([4, 8, 12, 128]),
    bits=st.sampled_from([8, 4, 2]),
    bounds=st.tuples(st.floats(0, 1), st.floats(0, 1)),
    seed=st.integers(0, 1000),
)
def test_shard_is_the_rows_of_the_table(tmp_path_factory, layout, rows, dim, bits, bounds, seed) -> None:
    full, path = saved_model(tmp_path_factory.mktemp("s"), layout, rows, dim, bits, seed)
    a, b = sorted(int(x * rows) for x in bounds)
    start, stop = min(a, rows - 1), max(b, min(a, rows - 1) + 1)
    shard = embpress.load(Model(stop - start, dim), path, shards={"emb": (start, stop)})
    assert shard.emb.layout == full.emb.layout and shard.emb.num_embeddings == stop - start
    assert torch.equal(shard.emb.table.dequantize(), full.emb.table.dequantize()[start:stop])
    ids = torch.randint(0, stop - start, (50,), generator=torch.Generator().manual_seed(seed))
    offsets = torch.arange(0, 50, 5)
    assert torch.equal(shard.emb(ids, offsets), full.emb(ids + start, offsets))
    assert torch.equal(shard.other.weight, full.other.weight)  # the rest of the model as saved


@settings(max_examples=10, deadline=None)
@given(layout=st.sampled_from(LAYOUTS), split=st.floats(0, 1), seed=st.integers(0, 1000))
def test_shards_pruned_counts_fit_their_rows(tmp_path_factory, layout, split, seed) -> None:
    # the file counts the whole table's pruned entries; a shard's count is its own rows'
    # exactly where the layout's data says it (block-sparse bitmaps), else within what its
    # rows allow, and loads as a valid table either way
    rows, dim = 300, 12
    full, path = saved_model(tmp_path_factory.mktemp("p"), layout, rows, dim, 8, seed)
    cut = min(rows - 1, max(1, int(split * rows)))
    ranges = ((0, cut), (cut, rows))
    parts = [embpress.load(Model(b - a, dim), path, shards={"emb": (a, b)}).emb for a, b in ranges]
    counts = [p.table.num_pruned for p in parts]
    assert all(0 <= n <= p.num_embeddings * dim for n, p in zip(counts, parts, strict=True))
    if layout == "block_sparse":
        assert sum(counts) == full.emb.table.num_pruned
        table = full.emb.table  # each part's count is its rows' pruned blocks (4 entries each)
        for (a, b), n in zip(ranges, counts, strict=True):
            kept = table._kept_blocks(table._record_starts(torch.arange(a, b)))
            assert n == int((~kept).sum()) * 4


def _flip_byte(path, key: str) -> None:
    """Invert the first byte of tensor ``key`` in the safetensors file at ``path`` in place
    (the index's CRC-32 left as it was)."""
    raw = bytearray(path.read_bytes())
    size = int.from_bytes(raw[:8], "little")
    start, _ = json.loads(raw[8 : 8 + size])[key]["data_offsets"]
    raw[8 + size + start] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if TABLE_CLASSES[name].row_directory])
def test_a_shard_reads_the_tensors_that_place_rows_whole_and_checks_them(tmp_path, layout) -> None:
    # a shard's reads are not covered by the tensors' CRC-32, but the few bytes a row
    # that say where rows lie are: one changed byte there would load other rows
    _, path = saved_model(tmp_path, layout, 600, 8, 8, 3)
    for name in TABLE_CLASSES[layout].row_directory:
        bad = tmp_path / f"bad-{name}.safetensors"
        bad.write_bytes(path.read_bytes())
        _flip_byte(bad, f"tables.emb.{name}")
        model = Model(100, 8)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(embpress.FormatError, match=rf"rows 300:400: tensor '{name}' is corrupted"):
            embpress.load(model, bad, shards={"emb": (300, 400)})
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        embpress.load(Model(100, 8), path, shards={"emb": (300, 400)})  # the intact file loads


def test_a_mixed_shard_checks_every_row_directory_tensor(tmp_path) -> None:
    """As above for the mixed layout (built by plans, not by ``layout="auto"``): each
    tensor of its row directory is read whole and CRC-checked, also the sub-block
    directory, which the shard computes again from its class ids."""
    from embpress.layouts.mixed import MixedTable
    from embpress.quant.codecs import Codec

    g = torch.Generator().manual_seed(1)
    codecs = [Codec.parse(c) for c in ("rowwise8", "levels2", "colbook1", "pruned")]
    full = Model(1000, 16)
    full.emb = embpress.QuantizedEmbeddingBag(
        MixedTable.build(
            torch.randn(1000, 16, generator=g), torch.randint(0, 4, (1000,), generator=g).numpy(), codecs
        ),
        mode="sum",
    )
    path = tmp_path / "mixed.safetensors"
    embpress.save(full, path)
    for name in MixedTable.row_directory:
        bad = tmp_path / f"bad-{name}.safetensors"
        bad.write_bytes(path.read_bytes())
        _flip_byte(bad, f"tables.emb.{name}")
        with pytest.raises(embpress.FormatError, match=rf"rows 300:400: tensor '{name}' is corrupted"):
            embpress.load(Model(100, 16), bad, shards={"emb": (300, 400)})
    shard = embpress.load(Model(100, 16), path, shards={"emb": (300, 400)})
    assert torch.equal(shard.emb.table.dequantize(), full.emb.table.dequantize()[300:400])


@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_shard_counts_padding_idx_from_its_first_row(tmp_path, mode) -> None:
    """A shard's padding row is the file's padding_idx in local ids, or none where the
    shard does not hold it: its bags leave out the same row as the whole table's."""
    torch.manual_seed(0)
    model = nn.Module()
    model.emb = nn.EmbeddingBag(200, 8, mode=mode, padding_idx=120)
    embpress.post_training_sparse_quantize(model, embpress.DataNormSparsifier, sparsity_level=0.5)
    path = tmp_path / "p.safetensors"
    embpress.save(model, path)
    for start, stop, local in [(100, 150, 20), (0, 50, None), (150, 200, None), (120, 121, 0)]:
        shell = nn.Module()
        shell.emb = nn.EmbeddingBag(stop - start, 8, mode=mode)
        shard = embpress.load(shell, path, shards={"emb": (start, stop)})
        assert shard.emb.padding_idx == local
        ids = torch.arange(stop - start).repeat(2)
        offsets = torch.tensor([0, stop - start])
        assert torch.equal(shard.emb(ids, offsets), model.emb(ids + start, offsets))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_only_what_the_rows_need_is_read(tmp_path, monkeypatch, layout) -> None:
    # the rows' own bytes in part; the tensors that place rows (``row_directory``, about a
    # byte a row) whole, so that their CRC-32 can be checked
    full, path = saved_model(tmp_path, layout, 4096, 64, 8, 0)
    read: list[tuple[str, int, int]] = []
    whole: list[str] = []
    original, original_whole = eio._SliceReader.__call__, eio._SliceReader._whole

    def spy(self, name, lo, hi):
        read.append((name, lo, hi))
        return original(self, name, lo, hi)

    def spy_whole(self, name):
        whole.append(name)
        return original_whole(self, name)

    monkeypatch.setattr(eio._SliceReader, "__call__", spy)
    monkeypatch.setattr(eio._SliceReader, "_whole", spy_whole)
    embpress.load(Model(300, 64), path, shards={"emb": (1000, 1300)})
    stored = {k: v for k, v in full.emb.table.tensors().items()}
    directory = TABLE_CLASSES[layout].row_directory
    assert set(whole) == set(directory)
    assert sum(stored[n].numel() * stored[n].element_size() for n in directory) <= 4096 + 1024
    for name, lo, hi in read:
        if name not in directory:
            assert hi - lo <= max(400, stored[name].shape[0] * 400 // 4096 + 64), (name, lo, hi)


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's /proc/self/io")
@pytest.mark.parametrize("mmap", [False, True])
def test_a_shard_of_a_large_table_reads_its_rows_not_the_table(tmp_path, monkeypatch, mmap) -> None:
    # a shard of a table larger than memory must load: the bytes this process reads from
    # files while loading 1,000 of 300,000 rows stay far below the table's 39 MB, and a
    # machine of 8 MiB takes the shard (not the whole file)
    torch.manual_seed(0)
    model = nn.Module()
    model.emb = nn.EmbeddingBag(300_000, 128, mode="sum")
    dense = embpress.QuantConfig(bits=8, layout="dense")
    embpress.post_training_sparse_quantize(model, embpress.DataNormSparsifier, quant=dense, sparsity_level=0)
    path = tmp_path / "big.safetensors"
    embpress.save(model, path)
    shell = nn.Module()
    shell.emb = nn.EmbeddingBag(1000, 128, mode="sum")

    def bytes_read() -> int:
        fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        return int(fields["rchar"])

    monkeypatch.setattr(eio, "_memory_bytes", lambda: 8 * 2**20)
    if not mmap:
        with pytest.raises(embpress.FormatError, match="more than this machine's memory"):
            embpress.load(model, path)
    before = bytes_read()
    embpress.load(shell, path, shards={"emb": (150_000, 151_000)}, mmap=mmap)
    assert bytes_read() - before < 4 * 2**20
    assert torch.equal(shell.emb.dequantize(), model.emb.dequantize()[150_000:151_000])


def test_bad_shards_refused(tmp_path) -> None:
    _, path = saved_model(tmp_path, "dense", 100, 8, 8, 0)
    with pytest.raises(ValueError, match="start < stop"):
        embpress.load(Model(10, 8), path, shards={"emb": (10, 10)})
    with pytest.raises(ValueError, match=r"\(start, stop\)"):
        embpress.load(Model(10, 8), path, shards={"emb": 10})
    with pytest.raises(TypeError, match="dict"):
        embpress.load(Model(10, 8), path, shards=[("emb", (0, 10))])
    with pytest.raises(embpress.FormatError, match="no table 'nope'"):
        embpress.load(Model(10, 8), path, shards={"nope": (0, 10)})
    with pytest.raises(ValueError, match=r"\(90, 110\) reaches past the 100 rows of table 'emb'") as past:
        embpress.load(Model(20, 8), path, shards={"emb": (90, 110)})
    assert not isinstance(past.value, embpress.FormatError)  # the caller's range, not a damaged file
    model = Model(10, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # the model's module is not the shard's size: the message gives the shard's rows
    with pytest.raises(
        embpress.FormatError, match="model's table is 10 x 8, the file's rows 0:20 are 20 x 8"
    ):
        embpress.load(model, path, shards={"emb": (0, 20)})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    np = pytest.importorskip("numpy")
    shard = embpress.load(Model(10, 8), path, shards={"emb": (np.int64(5), np.int64(15))})  # any integers
    full = embpress.load(Model(100, 8), path)
    assert torch.equal(shard.emb.table.dequantize(), full.emb.table.dequantize()[5:15])


@settings(max_examples=15, deadline=None)
@given(
    rows=st.integers(1, 900),
    dim=st.sampled_from([4, 16, 33]),
    codecs=st.sampled_from(
        [
            ("rowwise8", "pruned"),
            ("colbook2", "levels1", "rowwise4", "pruned"),
            ("colbook1",),
            ("levels2", "rowwise2"),
        ]
    ),
    bounds=st.tuples(st.floats(0, 1), st.floats(0, 1)),
    seed=st.integers(0, 1000),
)
def test_mixed_shard_is_the_rows_of_the_table(tmp_path_factory, rows, dim, codecs, bounds, seed) -> None:
    from embpress.layouts.mixed import MixedTable
    from embpress.quant.codecs import Codec

    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, dim, generator=g)
    assignment = torch.randint(0, len(codecs), (rows,), generator=g).numpy()
    table = MixedTable.build(weight, assignment, [Codec.parse(c) for c in codecs])
    full = Model(rows, dim)
    full.emb = embpress.QuantizedEmbeddingBag(table, mode="sum")
    path = tmp_path_factory.mktemp("m") / "mixed.safetensors"
    embpress.save(full, path)
    a, b = sorted(int(x * rows) for x in bounds)
    start, stop = min(a, rows - 1), max(b, min(a, rows - 1) + 1)
    shard = embpress.load(Model(stop - start, dim), path, shards={"emb": (start, stop)})
    assert shard.emb.layout == "mixed"
    assert torch.equal(shard.emb.table.dequantize(), table.dequantize()[start:stop])
    ids = torch.randint(0, stop - start, (40,), generator=g)
    offsets = torch.arange(0, 40, 4)
    assert torch.equal(shard.emb(ids, offsets), full.emb(ids + start, offsets))


@pytest.mark.parametrize("entry", ["before", "total"])
def test_a_mixed_shard_refuses_a_directory_that_does_not_match_its_class_ids(tmp_path, entry) -> None:
    """A shard places its rows by the directory entry before its first block and by the
    class totals; where either disagrees with the class ids, loading refuses: by the
    directory's CRC-32, and without it (``verify=False``) by a count of the class ids."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from embpress.layouts.mixed import MixedTable
    from embpress.quant.codecs import Codec

    rows, dim = 1000, 16
    g = torch.Generator().manual_seed(0)
    codecs = [Codec.parse(c) for c in ("rowwise8", "levels2", "colbook1", "pruned")]
    assignment = torch.randint(0, 4, (rows,), generator=g).numpy()
    full = Model(rows, dim)
    full.emb = embpress.QuantizedEmbeddingBag(
        MixedTable.build(torch.randn(rows, dim, generator=g), assignment, codecs), mode="sum"
    )
    path = tmp_path / "mixed.safetensors"
    embpress.save(full, path)
    with safe_open(str(path), "pt") as f:
        names, metadata = f.keys(), f.metadata()
        tensors = {k: f.get_tensor(k) for k in names}
    rank = tensors["tables.emb.class_rank"].clone()
    row = 1 if entry == "before" else rank.shape[0] - 1  # the entry before block 1, or the totals
    rank[row, 0] -= 1  # one row moved from class 0 to class 1: the sums still add up
    rank[row, 1] += 1
    save_file({**tensors, "tables.emb.class_rank": rank}, str(path), metadata=metadata)
    model = Model(256, dim)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(embpress.FormatError, match="'class_rank' is corrupted"):  # its CRC-32
        embpress.load(model, path, shards={"emb": (256, 512)})
    with pytest.raises(embpress.FormatError, match="'class_rank' does not match 'class_ids'"):
        embpress.load(model, path, shards={"emb": (256, 512)}, verify=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
