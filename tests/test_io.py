"""save / load: exact round trips, atomic writes, strict validation, no pickle."""

from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import safetensors.torch
import torch
from torch import nn

import embpress
from embpress import DataNormSparsifier, FormatError, QuantConfig
from embpress import post_training_sparse_quantize as ptsq


class TwoTables(nn.Module):
    def __init__(self, rows: int = 300, dim: int = 16) -> None:
        super().__init__()
        self.user = nn.Embedding(rows, dim, padding_idx=0)
        self.items = nn.EmbeddingBag(rows + 50, dim, mode="sum")
        self.head = nn.Linear(2 * dim, 1)

    def forward(self, users, items):
        return self.head(torch.cat([self.user(users), self.items(items)], dim=1))


def _compressed(layout="auto", bits=8, block=(1, 4), seed=0):
    torch.manual_seed(seed)
    model = TwoTables()
    ptsq(
        model,
        DataNormSparsifier,
        sparsity_level=0.7,
        sparse_block_shape=block,
        quant=QuantConfig(bits=bits, layout=layout),
    )
    return model


def _fresh(seed=123):
    torch.manual_seed(seed)
    return TwoTables()


def _inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 300, (8,), generator=g), torch.randint(0, 350, (8, 3), generator=g)


@pytest.mark.parametrize("layout", ["dense", "pruned_rows", "block_sparse"])
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip_is_exact(tmp_path, layout, bits, mmap):
    model = _compressed(layout, bits)
    path = tmp_path / "m.safetensors"
    embpress.save(model, path)
    loaded = embpress.load(_fresh(), path, mmap=mmap)
    for name in ("user", "items"):
        a, b = getattr(model, name), getattr(loaded, name)
        assert type(a) is type(b) and b.layout == layout
        for (ka, va), (kb, vb) in zip(a.table.named_buffers(), b.table.named_buffers(), strict=True):
            assert ka == kb and torch.equal(va, vb)
        assert b.error == pytest.approx(a.error)
    assert loaded.user.padding_idx == 0 and loaded.items.mode == "sum"
    assert torch.equal(loaded.head.weight, model.head.weight)
    assert torch.equal(loaded(*_inputs()), model(*_inputs()))


def test_shared_table_is_saved_once_and_restored_shared(tmp_path):
    def build():
        m = nn.Module()
        m.a = nn.Embedding(40, 8)
        m.b = nn.Sequential(m.a)
        return m

    model = build()
    ptsq(model, DataNormSparsifier, sparsity_level=0.5)
    path = tmp_path / "shared.safetensors"
    embpress.save(model, path)
    with safetensors.safe_open(str(path), "pt") as f:
        stored = [k for k in f.keys() if k.startswith("tables.")]  # noqa: SIM118 - not a dict
    assert len(stored) == len(model.a.table.tensors())
    loaded = embpress.load(build(), path)
    assert loaded.a is loaded.b[0]
    assert torch.equal(loaded.a.dequantize(), model.a.dequantize())


def test_file_size_is_the_bytes_plus_a_header(tmp_path):
    model = _compressed("block_sparse")
    path = tmp_path / "m.safetensors"
    embpress.save(model, path)
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    tensor_bytes = (
        model.user.nbytes
        + model.items.nbytes
        + sum(p.numel() * p.element_size() for p in model.head.parameters())
    )
    assert os.path.getsize(path) == 8 + header_len + tensor_bytes


def test_load_touches_no_pickle(tmp_path):
    model = _compressed()
    path = tmp_path / "m.safetensors"
    embpress.save(model, path)

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used on the load path")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pickle, "load", forbidden)
        patch.setattr(pickle, "loads", forbidden)
        patch.setattr(pickle, "Unpickler", forbidden)
        patch.setattr(torch, "load", forbidden)
        loaded = embpress.load(_fresh(), path)
    # the lookups run outside the guard: the first call of a numba kernel in a process may
    # read numba's own compile cache (its index is a pickle numba wrote in __pycache__),
    # which is code caching, not data from the file being loaded
    assert torch.equal(loaded(*_inputs()), model(*_inputs()))


def test_failed_save_leaves_the_earlier_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    embpress.save(_compressed(seed=0), path)
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("embpress.io.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        embpress.save(_compressed(seed=1), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def _saved(tmp_path):
    path = tmp_path / "m.safetensors"
    embpress.save(_compressed(), path)
    return path


def _assert_refused(path, *patterns, model=None):
    model = model if model is not None else _fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    with pytest.raises((FormatError, FileNotFoundError)) as info:
        embpress.load(model, path)
    message = str(info.value)
    assert str(path) in message
    for pattern in patterns:
        assert pattern in message
    assert [type(m) for m in model.modules()] == types
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_missing_file(tmp_path):
    _assert_refused(tmp_path / "nope.safetensors", "no such file")


def test_truncated_file(tmp_path):
    path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    _assert_refused(path)


def test_corrupted_tensor_bytes(tmp_path):
    path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    _assert_refused(path, "corrupted")


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"hello world, not a tensor file at all")
    _assert_refused(path, "safetensors")


def _rewrite_metadata(path, edit):
    tensors = safetensors.torch.load_file(str(path))
    with safetensors.safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata())
    edit(metadata)
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def test_unknown_format_version(tmp_path):
    path = _saved(tmp_path)
    _rewrite_metadata(path, lambda m: m.update(format_version="99"))
    _assert_refused(path, "format version", "99")


def test_plain_safetensors_is_not_an_embpress_file(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(path))
    _assert_refused(path, "not an embpress file")


def _edit_table(path, table, edit):
    def change(metadata):
        index = json.loads(metadata["index"])
        edit(index["tables"][table])
        metadata["index"] = json.dumps(index)

    _rewrite_metadata(path, change)


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda e: e["table"].update(layout="csr"), ["'user'", "layout"]),
        (lambda e: e["table"].update(bits=3), ["'user'", "bits"]),
        (lambda e: e["table"].update(embedding_dim=17), ["'user'"]),
        (lambda e: e["table"].update(block_width=0), ["'user'", "block_width"]),
        (lambda e: e.update(kind="Linear"), ["'user'", "kind"]),
        (lambda e: e["module"].update(padding_idx=10**6), ["'user'", "padding_idx"]),
        (lambda e: e["table"].update(scale_dtype="int8"), ["'user'", "scale_dtype"]),
    ],
)
def test_bad_header_fields_name_the_table(tmp_path, edit, words):
    torch.manual_seed(0)
    model = TwoTables()
    ptsq(model, DataNormSparsifier, sparsity_level=0.7, quant=QuantConfig(layout="block_sparse"))
    path = tmp_path / "m.safetensors"
    embpress.save(model, path)
    _edit_table(path, "user", edit)
    _assert_refused(path, *words)


def _edit_tensors(path, edit):
    """Rewrite the file's tensors with ``edit(tensors)`` and fresh checksums (so only the
    content checks can catch the change)."""
    tensors = safetensors.torch.load_file(str(path))
    with safetensors.safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata())
    edit(tensors)
    index = json.loads(metadata["index"])
    index["crc32"] = {k: embpress.io.crc32(v) for k, v in tensors.items()}
    metadata["index"] = json.dumps(index)
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def _bump(name, position, delta):
    def edit(tensors):
        t = tensors[f"tables.user.{name}"]
        bumped = t.long()
        bumped[position] += delta
        tensors[f"tables.user.{name}"] = bumped.to(t.dtype)

    return edit


def _set_record_bytes(position, values):
    def edit(tensors):
        records = tensors["tables.user.records"]
        first = position % records.numel()  # a negative position counts from the end
        records[first : first + len(values)] = torch.tensor(values, dtype=torch.uint8)

    return edit


def _move_group_start(tensors):
    """Every record start unchanged, but group 1's offset no longer its first record's."""
    tensors["tables.user.group_offsets"][1] -= 1
    offsets = tensors["tables.user.row_offsets"]  # 16 columns at 8 bits: 256 rows (128 pairs) a group
    tensors["tables.user.row_offsets"] = (offsets.int() + (torch.arange(150) >= 128).int()).to(torch.uint16)


def _claim_a_block_in_the_last_row(tensors):
    """Mark a pruned block of the last row kept: its record would need 4 more bytes."""
    from embpress.layouts.block_sparse import BlockSparseTable

    parts = [tensors[f"tables.user.{name}"] for name in ("records", "row_offsets", "group_offsets")]
    table = BlockSparseTable(*parts, 300, 16, 4, 8, torch.float32, 0)
    start = int(table._record_starts(torch.tensor([299]))[0])
    bitmap = int(parts[0][start])
    assert bitmap != 0x0F  # a pruned block to claim (the edit assumes it)
    parts[0][start] = bitmap | (~bitmap & (bitmap + 1))  # its lowest clear bit set


def _truncate_records(tensors):
    tensors["tables.user.records"] = tensors["tables.user.records"][:-1].clone()


@pytest.mark.parametrize(
    "edit, words",
    [
        (_bump("row_offsets", 5, 1), "do not match the records' bitmaps"),
        (_bump("row_offsets", 7, 60000), "points past the end"),
        (_bump("group_offsets", 1, 2), "do not match the records' bitmaps"),
        (_move_group_start, "does not point at its groups' first records"),
        (_bump("group_offsets", -1, -1), "does not start at 0 and end 64 bytes before"),
        (_truncate_records, "does not start at 0 and end 64 bytes before"),
        # 16 columns in (1, 4) blocks: one bitmap byte of which bits 4..7 lie past the row
        (_set_record_bytes(0, [0x10]), "past the row end"),
        # a block marked kept whose codes the record does not hold: the lengths no longer add up
        (_claim_a_block_in_the_last_row, "do not match the records' bitmaps"),
        (_set_record_bytes(-1, [1]), "does not end with 64 zero bytes"),
        # row 0's scale (float32, after its bitmap byte) set to NaN
        (_set_record_bytes(1, [0x00, 0x00, 0xC0, 0x7F]), "NaN"),
    ],
)
def test_inconsistent_block_sparse_records_are_refused(tmp_path, edit, words):
    model = _compressed("block_sparse")
    path = tmp_path / "m.safetensors"
    embpress.save(model, path)
    records = safetensors.torch.load_file(str(path))["tables.user.records"]
    assert int(records[0]) == 0  # the padding row's bitmap: nothing kept (the edits assume it)
    _edit_tensors(path, edit)
    _assert_refused(path, "'user'", words)


def test_other_architecture_is_refused(tmp_path):
    path = _saved(tmp_path)

    class Wider(TwoTables):
        def __init__(self):
            super().__init__(rows=301)

    _assert_refused(path, "'user'", "301", model=Wider())

    class Renamed(nn.Module):
        def __init__(self):
            super().__init__()
            self.users = nn.Embedding(300, 16)

    _assert_refused(path, "'user'", model=Renamed())


def test_inconsistent_index_structures_are_refused(tmp_path):
    model = _compressed("pruned_rows", block=(1, 16))
    path = tmp_path / "m.safetensors"
    embpress.save(model, path)
    tensors = safetensors.torch.load_file(str(path))
    with safetensors.safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata())
    tensors["tables.user.row_rank"][3] += 1
    index = json.loads(metadata["index"])
    index["crc32"]["tables.user.row_rank"] = embpress.io.crc32(tensors["tables.user.row_rank"])
    metadata["index"] = json.dumps(index)
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    _assert_refused(path, "'user'", "row_rank")


def test_save_without_compressed_tables_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no QuantizedEmbedding"):
        embpress.save(nn.Linear(2, 2), tmp_path / "x.safetensors")


def test_kind_from_model_takes_module_arguments_from_the_model(tmp_path):
    model = _compressed()
    path = tmp_path / "auto.safetensors"
    embpress.save(model, path, kind_from_model=True)
    index = embpress.io.read_index(path)
    assert {e["kind"] for e in index["tables"].values()} == {"auto"}

    target = _fresh()
    target.items = nn.EmbeddingBag(350, 16, mode="max", padding_idx=3)
    loaded = embpress.load(target, path)
    assert isinstance(loaded.items, embpress.QuantizedEmbeddingBag)
    assert (loaded.items.mode, loaded.items.padding_idx) == ("max", 3)
    assert isinstance(loaded.user, embpress.QuantizedEmbedding) and loaded.user.padding_idx == 0
    assert torch.equal(loaded.items.dequantize(), model.items.dequantize())
