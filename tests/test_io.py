"""save / load: exact round trips, atomic writes, strict validation, no pickle."""

from __future__ import annotations

import json
import math
import os
import pickle
import stat
import struct
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
import safetensors.torch
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import embpress
import embpress.checkpoint as embpress_checkpoint
import embpress.io as eio
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


def _rewrite_metadata(path, edit, resign=True):
    """Edit the file's metadata; ``resign``: with the index's CRC-32 made to match the
    edited index (so that the field checks behind it are what the test reaches)."""
    tensors = safetensors.torch.load_file(str(path))
    with safetensors.safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata())
    edit(metadata)
    if resign and "index_crc32" in metadata:
        metadata["index_crc32"] = str(eio.index_crc32(metadata["index"]))
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
        # found by tests/test_fuzz.py: unhashable values where a field is looked up in a dict
        (lambda e: e["table"].update(layout=[]), ["'user'", "'layout'"]),
        (lambda e: e["table"].update(scale_dtype={}), ["'user'", "'scale_dtype'"]),
        (lambda e: e.update(table=[]), ["'user'", "table fields"]),
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
    metadata["index_crc32"] = str(eio.index_crc32(metadata["index"]))
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
        # a value whose sum with a row offset would overflow int64 (it raised IndexError)
        (_bump("group_offsets", 1, 2**63 - 1 - 200_000), "points outside 'records'"),
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

    _assert_refused(path, "'items'", "351", model=Wider())  # tables are checked in name order

    class Renamed(nn.Module):
        def __init__(self):
            super().__init__()
            self.users = nn.Embedding(300, 16)

    _assert_refused(path, "the model has nothing at 'items'", model=Renamed())


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
    metadata["index_crc32"] = str(eio.index_crc32(metadata["index"]))
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


# ------------------------------------------------------------------ defects found by fuzzing
def _set_index(path, text):
    _rewrite_metadata(path, lambda m: m.update(index=text))


@pytest.mark.parametrize("text", ["[" * 1000 + "]" * 1000, '{"a": ' * 5000 + "1" + "}" * 5000, "1" * 5000])
def test_pathological_index_json_is_a_format_error(tmp_path, text):
    path = _saved(tmp_path)
    _set_index(path, text)
    with pytest.raises(FormatError, match="header index is not valid JSON") as info:
        embpress.io.read_index(path)
    assert str(path) in str(info.value)
    _assert_refused(path, "header index")


def test_json_nesting_is_limited_by_a_fixed_depth_not_by_the_stack():
    """Whether a header reads may not depend on how deep the caller's stack is: past
    MAX_JSON_DEPTH it is refused before parsing, at any depth up to it the text parses, and
    brackets inside strings do not count."""
    limit = embpress.io.MAX_JSON_DEPTH
    assert embpress.io.strict_json("[" * limit + "]" * limit) is not None
    assert embpress.io.strict_json('{"a": "' + "[" * 500 + '"}') == {"a": "[" * 500}
    assert embpress.io.strict_json(r'["\\", "]"]') == ["\\", "]"]
    with pytest.raises(ValueError, match=f"nested deeper than {limit} levels"):
        embpress.io.strict_json("[" * (limit + 1) + "]" * (limit + 1))


@pytest.mark.parametrize("depth", [800, 950, 980])
def test_deeply_nested_field_value_is_a_format_error(tmp_path, depth):
    """A value nested almost as deep as Python's recursion limit allows: refused whether the
    JSON parser or a field check sees it first (neither may overflow the stack)."""
    path = _saved(tmp_path)

    def nest(metadata):
        index = json.loads(metadata["index"])
        index["tables"]["user"]["error"] = "@deep@"
        metadata["index"] = json.dumps(index).replace('"@deep@"', "[" * depth + "]" * depth)

    _rewrite_metadata(path, nest)
    _assert_refused(path)


@pytest.mark.parametrize(
    "error",
    [
        "x",
        [],
        {"rel_frobenius": 0.1},
        {"rel_frobenius": "0.1", "max_abs": 0.2},
        {"rel_frobenius": True, "max_abs": 0.2},
        {"rel_frobenius": float("nan"), "max_abs": 0.2},
        {"rel_frobenius": 0.1, "max_abs": float("inf")},
        {"rel_frobenius": 0.1, "max_abs": -1.0},
        {"rel_frobenius": 0.1, "max_abs": 10**400},
        {"rel_frobenius": 0.1, "max_abs": 0.2, "other": 1},
    ],
)
def test_bad_error_field_is_refused(tmp_path, error):
    path = _saved(tmp_path)
    _edit_table(path, "user", lambda e: e.update(error=error))
    with pytest.raises(FormatError, match=r"'user'.*error") as info:
        embpress.io.read_index(path)  # what `embpress inspect` reads first
    assert str(path) in str(info.value)
    _assert_refused(path, "'user'", "error")


def test_null_error_field_loads_and_reports_none(tmp_path):
    path = _saved(tmp_path)
    _edit_table(path, "user", lambda e: e.update(error=None))
    loaded = embpress.load(_fresh(), path)
    reports = {r.name: r for r in embpress.compression_report(loaded)}
    assert reports["user"].rel_frobenius is None and reports["user"].max_abs_error is None
    assert reports["items"].rel_frobenius is not None


def _module_edit(**changes):
    return lambda e: e["module"].update(changes)


def _drop_module_key(key):
    return lambda e: e["module"].pop(key)


@pytest.mark.parametrize(
    "table, edit, field",
    [
        ("user", _module_edit(max_norm="max"), "max_norm"),
        ("user", _module_edit(max_norm=0), "max_norm"),
        ("user", _module_edit(max_norm=-1.0), "max_norm"),
        ("user", _module_edit(max_norm=float("nan")), "max_norm"),
        ("user", _module_edit(max_norm=float("inf")), "max_norm"),
        ("user", _module_edit(max_norm=True), "max_norm"),
        ("user", _module_edit(max_norm=10**400), "max_norm"),
        ("user", _module_edit(norm_type="x"), "norm_type"),
        ("user", _module_edit(norm_type=None), "norm_type"),
        ("user", _module_edit(norm_type=float("-inf")), "norm_type"),
        ("user", _module_edit(norm_type=False), "norm_type"),
        ("user", _module_edit(padding_idx=True), "padding_idx"),
        ("user", _module_edit(padding_idx=1.0), "padding_idx"),
        ("user", _module_edit(padding_idx=-1), "padding_idx"),
        ("user", _module_edit(padding_idx="0"), "padding_idx"),
        ("user", _module_edit(mode="sum"), "unknown: ['mode']"),
        ("user", _module_edit(sparse=False), "unknown: ['sparse']"),
        ("user", _drop_module_key("norm_type"), "missing: ['norm_type']"),
        ("items", _module_edit(include_last_offset=1e-30, norm_type="x"), "'items'"),
        ("items", _module_edit(include_last_offset=1e-30), "include_last_offset"),
        ("items", _module_edit(include_last_offset=1), "include_last_offset"),
        ("items", _module_edit(include_last_offset="true"), "include_last_offset"),
        ("items", _module_edit(include_last_offset=None), "include_last_offset"),
        ("items", _module_edit(mode="MAX"), "mode"),
        ("items", _module_edit(mode=2), "mode"),
        ("items", _drop_module_key("mode"), "missing: ['mode']"),
        ("items", lambda e: e.update(module=[]), "module arguments must be an object"),
        ("items", lambda e: e.update(extra=1), "entry must hold exactly"),
    ],
)
def test_bad_module_arguments_are_refused(tmp_path, table, edit, field):
    path = _saved(tmp_path)
    _edit_table(path, table, edit)
    _assert_refused(path, f"{table!r}", field)


def test_integral_module_numbers_load_as_floats(tmp_path):
    path = _saved(tmp_path)
    _edit_table(path, "user", _module_edit(max_norm=1, norm_type=1))
    loaded = embpress.load(_fresh(), path)
    assert (loaded.user.max_norm, loaded.user.norm_type) == (1.0, 1.0)
    assert isinstance(loaded.user.max_norm, float)
    assert torch.isfinite(loaded(*_inputs())).all()


def _raw_header(path):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _relabel(path, name, dtype):
    """Change a tensor's dtype in the safetensors header, keeping its bytes (and CRC)."""
    header, body = _raw_header(path)
    header[name]["dtype"] = dtype
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


@pytest.mark.parametrize(
    "layout, name, dtype, words",
    [
        ("dense", "state.head.weight", "I32", ["'head.weight'", "dtype"]),
        ("dense", "state.head.bias", "I32", ["'head.bias'", "dtype"]),
        ("dense", "tables.user.fused", "I8", ["'user'", "'fused'", "dtype"]),
        ("pruned_rows", "tables.user.row_rank", "F32", ["'user'", "'row_rank'", "dtype"]),
        ("block_sparse", "tables.items.row_offsets", "I16", ["'items'", "'row_offsets'", "dtype"]),
        ("block_sparse", "tables.items.group_offsets", "F64", ["'items'", "'group_offsets'", "dtype"]),
        ("block_sparse", "tables.user.records", "BOOL", ["'user'", "'records'", "dtype"]),
    ],
)
def test_relabelled_tensor_dtype_is_refused(tmp_path, layout, name, dtype, words):
    path = tmp_path / "m.safetensors"
    embpress.save(_compressed(layout), path)
    _relabel(path, name, dtype)
    _assert_refused(path, *words)


class _Narrow(TwoTables):
    """The same tensors as TwoTables, of other table sizes (a different model)."""

    def __init__(self) -> None:
        super().__init__(rows=200)


def test_load_racing_atomic_saves_sees_one_whole_file(tmp_path, monkeypatch):
    """Saves of two different models to one path, loads of it meanwhile: each load sees one
    file version whole (a model, or a clean refusal when it is the other model's)."""
    from safetensors import safe_open

    def slow_open(*args, **kwargs):  # a slow disk: a reader that opened the file twice
        time.sleep(0.002)  # would see two versions in about a third of its loads
        return safe_open(*args, **kwargs)

    monkeypatch.setattr("embpress.io.safe_open", slow_open)
    torch.manual_seed(0)
    wide, narrow = TwoTables(), _Narrow()
    for m in (wide, narrow):
        ptsq(m, DataNormSparsifier, sparsity_level=0.7, quant=QuantConfig(layout="block_sparse"))
    inputs = (torch.arange(0, 200, 25), torch.arange(0, 240, 10).reshape(8, 3))
    expected = {TwoTables: wide(*inputs), _Narrow: narrow(*inputs)}
    path = tmp_path / "m.safetensors"
    embpress.save(wide, path)
    stop, saves = threading.Event(), [0]

    def writer():
        while not stop.is_set():
            embpress.save(narrow if saves[0] % 2 else wide, path)
            saves[0] += 1

    thread = threading.Thread(target=writer)
    thread.start()
    loaded, refused = 0, 0
    try:
        for i in range(60):
            for mmap in (False, True):
                build = (TwoTables, _Narrow)[i % 2]
                try:
                    model = embpress.load(build(), path, mmap=mmap)
                except FormatError as err:
                    assert "the model's table is" in str(err), err
                    refused += 1
                    continue
                assert torch.equal(model(*inputs), expected[build])
                loaded += 1
    finally:
        stop.set()
        thread.join()
    assert loaded and refused and saves[0] > 10


def _huge_sparse_file(path):
    """An embpress header claiming a 2**40-byte tensor, the rest a hole (no disk used)."""
    size = 1 << 40
    index = {"tables": {}, "crc32": {"state.x": 0}}
    metadata = {"format": "embpress", "format_version": "2", "index": json.dumps(index)}
    header = {
        "__metadata__": metadata,
        "state.x": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + size)


def test_huge_sparse_file_is_a_format_error(tmp_path):
    path = tmp_path / "huge.safetensors"
    _huge_sparse_file(path)
    index = embpress.io.read_index(path)  # the header alone is fine (nothing is mapped)
    assert index["crc32"] == {"state.x": 0}
    with pytest.raises(FormatError, match="more than this machine's memory") as info:
        embpress.io.read_tensors(path, index, mmap=False)
    assert str(path) in str(info.value)
    _assert_refused(path, "memory")


def test_huge_sparse_file_that_cannot_be_mapped_is_a_format_error(tmp_path):
    """mmap=True where the mapping fails (here: an address-space limit in a child)."""
    path = tmp_path / "huge.safetensors"
    _huge_sparse_file(path)
    script = f"""
import resource
resource.setrlimit(resource.RLIMIT_AS, (1 << 36, resource.RLIM_INFINITY))
import embpress.io as eio
from embpress import FormatError
try:
    index = eio.read_index({str(path)!r})
    eio.read_tensors({str(path)!r}, index, mmap=True)
except FormatError as err:
    assert {str(path)!r} in str(err), err
    print("refused:", err)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "refused:" in done.stdout


def test_temp_files_of_killed_saves_are_removed(tmp_path, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "m.safetensors"
    stale = tmp_path / f".m.safetensors.{dead.pid}.abcd1234.tmp"
    live = tmp_path / f".m.safetensors.{os.getpid()}.efgh5678.tmp"  # another save, running
    other = tmp_path / f".n.safetensors.{dead.pid}.abcd1234.tmp"  # another file's
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    names = []

    def record(tensors, filename, metadata=None):
        names.append(os.path.basename(filename))
        safetensors.torch.save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr("embpress.io.save_file", record)
    embpress.save(_compressed(), path)
    assert not stale.exists() and live.exists() and other.exists()
    assert names[0].startswith(f".m.safetensors.{os.getpid()}.") and names[0].endswith(".tmp")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.safetensors", live.name, other.name])


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_file_mode_follows_the_umask(tmp_path, umask):
    """The file is created as open() and torch.save create theirs, 0o666 less the umask,
    not private whatever the umask (mkstemp's 0o600)."""
    path = tmp_path / "m.safetensors"
    old = os.umask(umask)
    try:
        embpress.save(_compressed(), path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_default_load_survives_the_file_being_truncated(tmp_path):
    """load reads the file by default: truncating it afterwards (in place) cannot crash a
    lookup with SIGBUS, as it would under mmap=True (in a child process)."""
    path = _saved(tmp_path)
    script = f"""
import os, torch, embpress
from tests.test_io import _fresh, _inputs
model = embpress.load(_fresh(), {str(path)!r})
os.truncate({str(path)!r}, 100)
out = model(*_inputs())
out2 = model.items(torch.arange(350).reshape(-1, 1))
print("ok", bool(torch.isfinite(out).all() and torch.isfinite(out2).all()))
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=root
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "ok True" in done.stdout


@pytest.mark.parametrize("name", ["tables.user.extra", "tables.nobody.fused", "junk"])
def test_tensors_of_no_table_are_refused(tmp_path, name):
    path = _saved(tmp_path)
    _edit_tensors(path, lambda tensors: tensors.update({name: torch.zeros(3, dtype=torch.uint8)}))
    _assert_refused(path, "belong to no table", name)
    with pytest.raises(FormatError, match="belong to no table"):  # inspect says what load says
        embpress_checkpoint.inspect(path)


def test_save_refuses_what_load_would_refuse_and_drops_a_bad_error_report(tmp_path):
    path = tmp_path / "m.safetensors"
    model = _compressed()
    model.user.max_norm = float("inf")
    with pytest.raises(FormatError, match=r"'user'.*max_norm"):
        embpress.save(model, path)
    assert list(tmp_path.iterdir()) == []
    model.user.max_norm = None
    model.user.error = {"rel_frobenius": float("nan"), "max_abs": 1.0}  # a report, not data
    embpress.save(model, path)
    loaded = embpress.load(_fresh(), path)
    assert loaded.user.error is None and loaded.items.error == pytest.approx(model.items.error)


_SPEC_DTYPES = list(eio.SAFETENSORS_DTYPES.values())  # every dtype a file can hold


@settings(max_examples=40, deadline=None)
@given(
    st.dictionaries(
        st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12).filter(
            lambda name: name != "__metadata__"  # refused: test_the_metadata_key_is_no_tensor_name
        ),
        st.tuples(st.sampled_from(_SPEC_DTYPES), st.lists(st.integers(0, 5), max_size=3)),
        min_size=1,
        max_size=8,
    ),
    st.dictionaries(st.text(min_size=1, max_size=5), st.text(max_size=20), max_size=3),
)
@example(specs={f"t{i}": (dtype, [3]) for i, dtype in enumerate(_SPEC_DTYPES)}, index={})
def test_safetensors_layout_is_what_write_file_writes(tmp_path_factory, specs, index) -> None:
    """The header and data offsets computed from dtypes and shapes alone are byte for byte
    those of ``write_file`` (what lets processes write one file in pieces)."""
    tensors = {
        name: (torch.arange(math.prod(shape)) % 7).to(dtype).reshape(shape)
        for name, (dtype, shape) in specs.items()
    }
    path = tmp_path_factory.mktemp("h") / "f.safetensors"
    eio.write_file(path, tensors, index)
    raw = path.read_bytes()
    crcs = {k: eio.crc32(v) for k, v in tensors.items()}
    head, starts = eio.safetensors_layout(
        {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()},
        eio.file_metadata({**index, "crc32": crcs}),
    )
    assert raw[: len(head)] == head
    for name, t in tensors.items():
        data = raw[starts[name] : starts[name] + t.numel() * t.element_size()]
        assert data == t.contiguous().view(-1).view(torch.uint8).numpy().tobytes(), name


def test_the_metadata_key_is_no_tensor_name(tmp_path):
    """A tensor named ``__metadata__`` would give a header with that key twice, a file
    safetensors cannot read: refused before anything is written."""
    tensors = {"__metadata__": torch.zeros(0, dtype=torch.bool)}
    with pytest.raises(ValueError, match="cannot be named '__metadata__'"):
        eio.write_file(tmp_path / "f.safetensors", tensors, {})
    with pytest.raises(ValueError, match="cannot be named '__metadata__'"):
        eio.safetensors_layout({"__metadata__": (torch.bool, (0,))}, {})
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_every_single_bit_flip_in_the_header_is_refused_or_harmless(tmp_path):
    """The header (safetensors' JSON with the index) is covered too: flipping any one bit
    of it gives a FormatError, or a file that loads exactly as the original (a flip the
    JSON does not see). Without ``index_crc32``, flips in fields such as ``padding_idx``,
    ``num_pruned`` or ``error`` loaded silently."""
    path = _saved(tmp_path)
    data = path.read_bytes()
    size = 8 + int.from_bytes(data[:8], "little")
    original = _fresh()
    embpress.load(original, path)
    want = original.state_dict()
    flipped = tmp_path / "flipped.safetensors"
    outcomes = Counter()
    for bit in range(8 * size):
        if bit < 64 and bit // 8 >= 3:  # the header length's high bytes: a 2**24+ byte header
            continue
        raw = bytearray(data)
        raw[bit // 8] ^= 1 << (bit % 8)
        flipped.write_bytes(bytes(raw))
        model = _fresh()
        try:
            embpress.load(model, flipped)
        except FormatError:
            outcomes["refused"] += 1
            continue
        got = model.state_dict()
        assert got.keys() == want.keys(), bit
        for key, value in want.items():
            assert torch.equal(got[key], value), (bit, key)
        assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()], bit
        for a, b in zip(model.modules(), original.modules(), strict=True):
            if isinstance(a, (embpress.QuantizedEmbedding, embpress.QuantizedEmbeddingBag)):
                assert a.extra_repr() == b.extra_repr(), bit
        outcomes["same"] += 1
    assert outcomes["refused"] > 0.95 * sum(outcomes.values()), outcomes


class _TiedLM(nn.Module):
    """A language model's tables as Hugging Face ties them: token table and head share
    one weight; ``tied_tables`` adds encoder / decoder token modules on it too (T5)."""

    def __init__(self, tied_tables: bool = False, head: bool = True) -> None:
        super().__init__()
        self.shared = nn.Embedding(50, 8)
        self.pos_emb = nn.Embedding(10, 8)
        if tied_tables:
            self.encoder, self.decoder = nn.Embedding(50, 8), nn.Embedding(50, 8)
            self.encoder.weight = self.decoder.weight = self.shared.weight
        if head:
            self.lm_head = nn.Linear(8, 50, bias=False)
            self.lm_head.weight = self.shared.weight


def test_a_checkpoint_table_tied_to_a_head_stays_float_and_is_written_once(tmp_path):
    """Found by name, the token table is tied to the head: left float with a warning (the
    head keeps computing with it); the copied pair is written once, not twice, and a tied
    model loads it back tied."""
    torch.manual_seed(0)
    state = _TiedLM().state_dict()
    with pytest.warns(UserWarning, match=r"left float.*shared\.weight \(tied to lm_head\.weight\)"):
        result = embpress.compress_state_dict(state)
    assert [t.name for t in result.tables] == ["pos_emb"]
    out = tmp_path / "lm.safetensors"
    result.save(out)
    with safetensors.safe_open(str(out), "pt") as f:
        held = [k for k in f.keys() if k.startswith("state.")]  # noqa: SIM118 (not a dict)
    assert held == ["state.shared.weight"]  # lm_head.weight is the same tensor
    model = embpress.load(_TiedLM(), out)
    assert model.lm_head.weight is model.shared.weight
    assert torch.equal(model.shared.weight, state["shared.weight"])
    broken = r"compressed as selected.*shared\.weight \(tied to lm_head\.weight, which stays float"
    with pytest.warns(UserWarning, match=broken):
        named = embpress.compress_state_dict(state, tables=["shared.weight"])  # asked for: compressed
    assert [t.name for t in named.tables] == ["shared"]
    assert sorted(named.copied) == ["lm_head.weight", "pos_emb.weight"]


def test_load_ties_modules_that_share_a_compressed_weight_and_refuses_a_tied_head(tmp_path):
    """A file naming a token table once (as Hugging Face's safetensors files do): the
    model's other embedding modules on that weight take the same compressed module; a head
    tied to it has no float weight left to load, which is refused, the model unchanged."""
    torch.manual_seed(0)
    source = _TiedLM(tied_tables=True, head=False)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith(("encoder.", "decoder."))}
    out = tmp_path / "t5.safetensors"
    embpress.compress_state_dict(state).save(out)
    model = embpress.load(_TiedLM(tied_tables=True, head=False), out)
    assert model.shared is model.encoder is model.decoder
    assert isinstance(model.shared, embpress.QuantizedEmbedding)
    headed = _TiedLM(tied_tables=True, head=True)
    before = {k: v.clone() for k, v in headed.state_dict().items()}
    with pytest.raises(FormatError, match=r"'lm_head\.weight' is tied to the weight of a table"):
        embpress.load(headed, out)
    assert type(headed.shared) is nn.Embedding
    assert all(torch.equal(v, before[k]) for k, v in headed.state_dict().items())


class _TwoOnOneWeight(nn.Module):
    """Two modules over one weight: a bag summing and one of ``second`` ("mean", "sum" or
    "embedding")."""

    def __init__(self, second: str) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(200, 16, mode="sum")
        self.x_emb = nn.Embedding(200, 16) if second == "embedding" else nn.EmbeddingBag(200, 16, mode=second)
        self.x_emb.weight = self.emb.weight


@pytest.mark.parametrize("second", ["mean", "embedding", "sum"])
def test_tied_places_that_differ_each_get_their_own_module_on_the_one_table(tmp_path, second):
    """A checkpoint does not say what each tied name's module is: loading builds each
    place after its own module (kind, mode), all on the one table; places whose modules
    agree share one module. They came out as the first place's module (a mean bag summing,
    an Embedding returning bags), silently."""
    torch.manual_seed(0)
    source = _TwoOnOneWeight(second)
    result = embpress.compress_state_dict(source.state_dict(), quant=QuantConfig(bits=8))
    assert [(t.name, t.aliases) for t in result.tables] == [("emb", ("x_emb",))]
    out = tmp_path / "m.safetensors"
    result.save(out)
    model = embpress.load(_TwoOnOneWeight(second), out)
    assert model.emb.table is model.x_emb.table
    assert (model.emb is model.x_emb) == (second == "sum")
    ids = torch.randint(0, 200, (3, 4))
    with torch.no_grad():
        for name in ("emb", "x_emb"):
            got, want = getattr(model, name)(ids), getattr(source, name)(ids)
            assert got.shape == want.shape
            assert torch.allclose(got, want, atol=0.05), name


def test_distinct_empty_tensors_are_each_written(tmp_path):
    """Tied tensors are written once, but two empty buffers are not tied, whatever their
    (shared, meaningless) address: both are in the file and the model loads."""
    model = _compressed()
    model.register_buffer("a", torch.zeros(0, 3))
    model.register_buffer("b", torch.zeros(0, 3))
    path = tmp_path / "m.safetensors"
    embpress.save(model, path)
    fresh = _fresh()
    fresh.register_buffer("a", torch.zeros(0, 3))
    fresh.register_buffer("b", torch.zeros(0, 3))
    embpress.load(fresh, path)
    assert fresh.a.shape == fresh.b.shape == (0, 3)


@pytest.mark.parametrize("layout", ["dense", "pruned_rows", "block_sparse"])
def test_large_tensors_read_straight_into_buffers_match_safetensors(tmp_path, monkeypatch, layout):
    """Tensors that belong on huge pages are read from the file into their buffer at the
    offsets safetensors validated (here every tensor, forced): the same tensors as
    safetensors reads, the same model, and a read that ends early is a FormatError."""
    model = _compressed(layout)
    path = tmp_path / "m.safetensors"
    embpress.save(model, path)
    _, expected = eio.read_file(path)
    monkeypatch.setattr(eio, "wants_huge_pages", lambda nbytes: True)
    calls = []
    read_span = eio._read_span
    monkeypatch.setattr(eio, "_read_span", lambda *a: calls.append(a) or read_span(*a))
    _, got = eio.read_file(path)
    assert len(calls) == len(expected) and got.keys() == expected.keys()
    for key, t in expected.items():
        assert got[key].dtype == t.dtype and torch.equal(got[key], t), key
    loaded = embpress.load(_fresh(), path)
    assert torch.equal(loaded(*_inputs()), model(*_inputs()))
    monkeypatch.setattr(eio.os, "preadv", lambda fd, bufs, at: 0)
    with pytest.raises(FormatError, match=r"could not read tensor .*ends before"):
        eio.read_file(path)
    assert torch.equal(loaded(*_inputs()), model(*_inputs()))


@pytest.mark.parametrize("norm_type", [math.inf, -math.inf])
def test_infinite_norm_type_is_saved_as_a_string_and_loads_back(tmp_path, norm_type):
    """torch takes ``norm_type=inf`` (the max norm); JSON has no infinity, so the file
    holds "inf" / "-inf", and the loaded module renormalises as the saved one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 8, max_norm=0.5, norm_type=norm_type))
    ptsq(model, DataNormSparsifier, sparsity_level=0.5, sparse_block_shape=(1, 4))
    path = tmp_path / "m.safetensors"
    embpress.save(model, path)
    assert eio.read_index(path)["tables"]["0"]["module"]["norm_type"] == str(norm_type)
    loaded = embpress.load(nn.Sequential(nn.Embedding(50, 8)), path)
    ids = torch.arange(50)
    assert loaded[0].norm_type == norm_type
    assert torch.equal(loaded[0](ids), model[0](ids))


def test_a_header_changed_while_the_file_is_read_is_a_format_error(tmp_path, monkeypatch):
    """The offsets of tensors read straight into huge pages come from the header read a
    second time; a file rewritten in place between the two reads is a FormatError, not a
    raw JSON or key error."""
    path = _saved(tmp_path)
    monkeypatch.setattr(eio, "wants_huge_pages", lambda nbytes: True)

    def rewritten(*args):
        path.write_bytes(b"\0" * 64)  # in place, as `cp new old` does
        return None

    monkeypatch.setattr(eio, "_memory_bytes", rewritten)
    with pytest.raises(FormatError, match="changed while it was being read"):
        eio.read_file(path)


def test_a_field_given_twice_is_refused(tmp_path):
    """JSON keeps the last of two equal keys silently: a header that says two things of one
    field is not trusted."""
    path = _saved(tmp_path)

    def twice(metadata):
        text = metadata["index"]
        metadata["index"] = text.replace('"kind":', '"kind": "Embedding", "kind":', 1)

    _rewrite_metadata(path, twice)
    _assert_refused(path, "header index is not valid JSON", "'kind' appears twice")


@pytest.mark.parametrize("layout", ["dense", "pruned_rows", "block_sparse"])
def test_a_table_field_the_layout_does_not_read_is_refused(tmp_path, layout):
    torch.manual_seed(0)
    model = TwoTables()
    ptsq(model, DataNormSparsifier, sparsity_level=0.7, quant=QuantConfig(layout=layout))
    path = tmp_path / "m.safetensors"
    embpress.save(model, path)
    _edit_table(path, "user", lambda e: e["table"].update(block_width=4, colour="red"))
    words = ["'user'", "unknown table field", "'colour'"]
    _assert_refused(path, *words, *(["'block_width'"] if layout != "block_sparse" else []))
    with pytest.raises(FormatError, match="unknown table field"):
        embpress.load(_fresh(), path, shards={"user": (0, 100)})


def test_a_module_claimed_by_two_tables_is_refused(tmp_path):
    path = _saved(tmp_path)
    _edit_table(path, "items", lambda e: e.update(aliases=["user"]))
    _assert_refused(path, "module 'user' is claimed twice, by tables 'items' and 'user'")
    path = _saved(tmp_path)
    _edit_table(path, "user", lambda e: e.update(aliases=["user"]))
    _assert_refused(path, "module 'user' is claimed twice, by table 'user'")
    for alias in (".user", "user.", "a..b"):  # '.user' would be the root's 'user' again
        path = _saved(tmp_path)
        _edit_table(path, "items", lambda e, alias=alias: e.update(aliases=[alias]))
        _assert_refused(path, f"module path '{alias}' has an empty component")


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr"])
def test_save_refuses_state_a_file_cannot_hold_by_name_and_writes_nothing(tmp_path, layout):
    model = _compressed()
    model.register_buffer("extra", torch.eye(3).to_sparse(layout=getattr(torch, layout)))
    words = f"'extra' is a sparse tensor ({layout})"
    path = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match="which an embpress file cannot hold") as info:
        embpress.save(model, path)
    assert words in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_save_into_a_missing_folder_names_the_folder(tmp_path):
    target = tmp_path / "missing" / "m.safetensors"
    with pytest.raises(FileNotFoundError, match=f"folder {tmp_path / 'missing'} does not exist"):
        embpress.save(_compressed(), target)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", [torch.bool, torch.bfloat16, torch.complex64, torch.float64, torch.int8])
def test_state_tensors_of_every_plain_dtype_round_trip(tmp_path, dtype):
    model = _compressed()
    value = (torch.arange(6).reshape(2, 3) % 2).to(dtype)
    model.register_buffer("extra", value.t())  # not contiguous either
    path = tmp_path / "m.safetensors"
    embpress.save(model, path)
    fresh = _fresh()
    fresh.register_buffer("extra", torch.zeros(3, 2, dtype=dtype))
    embpress.load(fresh, path)
    assert fresh.extra.dtype == dtype and torch.equal(fresh.extra, value.t())


def test_load_and_save_refuse_what_is_not_a_model_or_a_device(tmp_path):
    """A model that is not a module, flags that are not booleans and a device this torch
    cannot use get a TypeError or ValueError naming them (torch's own was an
    AssertionError for CUDA on a CPU build), the model unchanged."""
    model = nn.Sequential(nn.EmbeddingBag(30, 8, mode="sum"))
    embpress.post_training_sparse_quantize(model, embpress.DataNormSparsifier, sparsity_level=0.5)
    path = tmp_path / "m.safetensors"
    embpress.save(model, path)
    for bad in (None, "model"):
        with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
            embpress.load(bad, path)
        with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
            embpress.save(bad, tmp_path / "other.safetensors")
    with pytest.raises(TypeError, match="verify must be True or False"):
        embpress.load(model, path, verify="no")
    fresh = nn.Sequential(nn.EmbeddingBag(30, 8, mode="sum"))
    before = fresh[0]
    devices = ["bogus"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in devices:
        with pytest.raises(ValueError, match=f"device '{device}' cannot hold tensors here"):
            embpress.load(fresh, path, device=device)
    assert fresh[0] is before


def test_a_long_json_string_is_read_in_bounded_memory():
    """The nesting check before parsing skips strings without a backtracking state per
    character: a header string of 4 million characters took about 500 MB (gigabytes for
    a header of tens of megabytes)."""
    import tracemalloc

    from embpress.io import strict_json

    text = '{"a": "' + "x" * 4_000_000 + '\\"", "b": [1, {"c": "d\\\\"}]}'
    tracemalloc.start()
    try:
        parsed = strict_json(text)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert parsed["b"] == [1, {"c": "d\\"}] and len(parsed["a"]) == 4_000_001
    assert peak < 64 * 2**20, peak


def test_compress_checkpoint_refuses_to_write_over_its_input(tmp_path):
    """dst naming src (or a link to it) is refused before anything is read or written."""
    src = tmp_path / "in.pt"
    torch.save({"emb.weight": torch.randn(20, 8)}, src)
    link = tmp_path / "link.pt"
    link.symlink_to(src)
    before = src.read_bytes()
    for dst in (src, link):
        with pytest.raises(ValueError, match="is the checkpoint src"):
            embpress.compress_checkpoint(src, dst)
    assert src.read_bytes() == before


def test_writers_refuse_a_target_that_is_not_a_regular_file(tmp_path):
    """Every writer renames a finished temp file over its target: over a device or a named
    pipe that would replace the node itself (``save(model, "/dev/null")`` as root removed
    the device). Refused with a ValueError naming it; the node stays, no temp file is left."""
    model = nn.Sequential(nn.Embedding(30, 8), nn.EmbeddingBag(20, 8))
    state = tmp_path / "ck.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, state)
    pt = tmp_path / "ck.pt"
    torch.save(model.state_dict(), pt)
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    usage = embpress.Usage({"0": torch.ones(30), "1": torch.ones(20)})
    the_plan = embpress.plan(model, 600)
    embpress.post_training_sparse_quantize(
        compressed := nn.Sequential(nn.Embedding(30, 8)), embpress.DataNormSparsifier
    )
    writers = {
        "save": lambda: embpress.save(compressed, pipe),
        "compress .pt": lambda: embpress.compress_checkpoint(pt, pipe, ["0", "1"]),
        "compress .safetensors": lambda: embpress.compress_checkpoint(state, pipe, ["0", "1"]),
        "usage": lambda: usage.save(pipe),
        "plan": lambda: the_plan.save(pipe),
    }
    for what, write in writers.items():
        with pytest.raises(ValueError, match=f"{pipe} exists and is not a regular file"):
            write()
        assert stat.S_ISFIFO(os.lstat(pipe).st_mode), what
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt", "ck.safetensors", "pipe"]
