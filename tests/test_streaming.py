"""Chunked compression (``embpress.streaming``): byte for byte the in-memory result, reading
no more than a chunk at a time; and ``concat_rows`` of every registered layout."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import embpress
from embpress.layouts import TABLE_CLASSES, encode_table
from embpress.layouts.base import ROW_CHUNK_ALIGN
from embpress.streaming import SafetensorsFile, chunk_rows_for, compress_table, safetensors_rows

LAYOUTS = ("auto", *TABLE_CLASSES)


def in_memory(w: torch.Tensor, config: embpress.QuantConfig, sparsify_first: bool, **sparse: object):
    """The table ``post_training_sparse_quantize`` makes of ``w`` (the contract)."""
    model = nn.Module()
    model.emb = nn.Embedding.from_pretrained(w.clone())
    embpress.post_training_sparse_quantize(
        model, embpress.DataNormSparsifier, sparsify_first, quant=config, **sparse
    )
    return model.emb.table, model.emb.error


def assert_same_table(a, b) -> None:
    assert type(a) is type(b)
    assert a.meta() == b.meta()
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


def table(rows: int, dim: int, seed: int) -> torch.Tensor:
    """A table with ties (repeated rows), zero rows and a spread of row norms."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, dim, generator=g) * torch.rand(rows, 1, generator=g) * 3
    w[::7] = 0.0
    w[1::11] = w[rows // 2].clone()
    return w


@settings(max_examples=20, deadline=None)
@given(
    rows=st.integers(1, 900),
    dim=st.sampled_from([1, 3, 8, 16, 33]),
    layout=st.sampled_from(LAYOUTS),
    bits=st.sampled_from([8, 4, 2]),
    sparsify_first=st.booleans(),
    sparsity=st.sampled_from([0.0, 0.3, 0.8, 1.0]),
    block=st.sampled_from([(1, 1), (1, 4), (1, 16), (2, 4)]),
    chunks=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**16),
)
def test_chunked_equals_in_memory(
    rows, dim, layout, bits, sparsify_first, sparsity, block, chunks, seed
) -> None:
    w = table(rows, dim, seed)
    config = embpress.QuantConfig(bits=bits, layout=layout)
    sparse = {"sparsity_level": sparsity, "sparse_block_shape": block}
    expected, expected_error = in_memory(w, config, sparsify_first, **sparse)
    step = ROW_CHUNK_ALIGN * chunks * (2 if block[0] == 2 else 1)
    got, error = compress_table(w, config, sparsify_first=sparsify_first, chunk_rows=step, **sparse)
    assert_same_table(expected, got)
    assert error == expected_error  # the same partial sums, added exactly


def test_reads_one_chunk_at_a_time() -> None:
    """Bounded memory: no read asks for more than ``chunk_rows`` rows."""
    w = table(3000, 16, 1)
    widest = []

    def read(start: int, stop: int) -> torch.Tensor:
        widest.append(stop - start)
        return w[start:stop]

    got, _ = compress_table(
        read, embpress.QuantConfig(bits=4), shape=(3000, 16), sparsity_level=0.5, chunk_rows=512
    )
    assert max(widest) <= 512 and len(widest) > 6
    assert_same_table(in_memory(w, embpress.QuantConfig(bits=4), True, sparsity_level=0.5)[0], got)


def test_safetensors_source_is_read_by_slices(tmp_path) -> None:
    from safetensors.torch import save_file

    w = table(1300, 24, 2)
    path = tmp_path / "t.safetensors"
    save_file({"emb.weight": w.contiguous()}, str(path))
    read, shape = safetensors_rows(path, "emb.weight")
    assert shape == (1300, 24)
    config = embpress.QuantConfig(bits=8, layout="block_sparse")
    got, _ = compress_table(
        read, config, shape=shape, sparsity_level=0.8, sparse_block_shape=(1, 4), chunk_rows=256
    )
    assert_same_table(in_memory(w, config, True, sparsity_level=0.8, sparse_block_shape=(1, 4))[0], got)
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        safetensors_rows(path, "nope")


@pytest.mark.parametrize("mapped", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_safetensors_file_reads_row_ranges_of_any_dtype(tmp_path, dtype, mapped) -> None:
    """Rows (views of a private mapping, or read by pread) equal safetensors' own tensors,
    in every dtype (bfloat16, which numpy cannot hold, included), for whole tensors,
    scalars and empty ranges; writing into them leaves the file as it was."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(5)
    tensors = {
        "a.weight": torch.randn(37, 5, generator=g).to(dtype),
        "b.bias": torch.randn(3, generator=g).to(dtype),
        "c.scalar": torch.tensor(7, dtype=torch.int64),
        "d.emb.weight": torch.randn(300, 11, generator=g).to(dtype),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"k": "v"})
    f = SafetensorsFile(path, mapped=mapped)
    want = load_file(str(path))
    assert list(f) == list(want) and f.metadata() == {"k": "v"} and "a.weight" in f and "z" not in f
    for name, t in want.items():
        assert f.dtype(name) == t.dtype and f.shape(name) == tuple(t.shape)
        got = f.tensor(name)
        assert got.dtype == t.dtype and torch.equal(got, t), name
    big = want["d.emb.weight"]
    for lo, hi in [(0, 0), (0, 1), (17, 256), (299, 300), (0, 300)]:
        assert torch.equal(f.rows("d.emb.weight", lo, hi), big[lo:hi])
    before = path.read_bytes()
    f.rows("d.emb.weight", 3, 9).fill_(42)  # a private write: it never reaches the file
    assert path.read_bytes() == before
    assert torch.equal(SafetensorsFile(path, mapped=mapped).rows("d.emb.weight", 0, 300), big)


def test_safetensors_file_beyond_memory_is_read_without_mapping_it_whole(tmp_path) -> None:
    """A (sparse) file far larger than RAM + swap: safetensors' torch backend cannot map it,
    but its rows are read, a slice at a time, after a validated header."""
    rows, dim = (1 << 42) // 4096, 1024  # 4 TiB of float32, then a small tensor
    tail = torch.arange(6, dtype=torch.float32)
    table_bytes = rows * dim * 4
    header = {
        "emb.weight": {"dtype": "F32", "shape": [rows, dim], "data_offsets": [0, table_bytes]},
        "z.tail": {"dtype": "F32", "shape": [6], "data_offsets": [table_bytes, table_bytes + 24]},
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text)
        fh.truncate(8 + len(text) + table_bytes)
        fh.seek(0, 2)
        fh.write(tail.numpy().tobytes())
    f = SafetensorsFile(path)
    assert f.shape("emb.weight") == (rows, dim)
    assert torch.equal(f.tensor("z.tail"), tail)  # data after 4 TiB of table, at its offset
    last = f.rows("emb.weight", rows - 3, rows)
    assert last.shape == (3, dim) and not last.any()
    read, shape = safetensors_rows(path, "emb.weight")
    assert shape == (rows, dim) and read(5, 9).shape == (4, dim)


def test_safetensors_file_refuses_damaged_headers(tmp_path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match=r"bad\.safetensors: not a readable safetensors file"):
        SafetensorsFile(path)


def test_chunk_rows_default_is_aligned() -> None:
    for dim, height in [(1, 1), (128, 1), (7, 3), (100_000, 2)]:
        step = chunk_rows_for(dim, height)
        assert step > 0 and step % ROW_CHUNK_ALIGN == 0 and step % height == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chunk_rows": 100}, "multiple of 256"),
        ({"chunk_rows": 256, "sparse_block_shape": (3, 4)}, "multiple of 768"),
        ({"chunk_rows": True}, "multiple of 256"),
    ],
)
def test_bad_chunk_rows_refused(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        compress_table(table(300, 8, 0), **kwargs)


def test_bad_reads_and_values_refused() -> None:
    w = table(600, 8, 0)
    with pytest.raises(ValueError, match="shape is needed"):
        compress_table(lambda a, b: w[a:b])
    with pytest.raises(ValueError, match=r"rows 0:256 read as \(255, 8\)"):
        compress_table(lambda a, b: w[a : b - 1], shape=(600, 8), chunk_rows=256)
    bad = w.clone()
    bad[400, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        compress_table(bad, chunk_rows=256, sparsity_level=0.5)
    with pytest.raises(TypeError, match="QuantConfig"):
        compress_table(w, config="8")  # type: ignore[arg-type]


@pytest.mark.parametrize("layout", list(TABLE_CLASSES))
def test_concat_rows_checks_its_parts(layout) -> None:
    cls = TABLE_CLASSES[layout]
    w = table(700, 16, 3)
    mask = torch.rand(700, 16, generator=torch.Generator().manual_seed(0)) > 0.5
    config = embpress.QuantConfig(bits=4, layout=layout)
    a, _ = encode_table(w[:300], mask[:300], config)
    b, _ = encode_table(w[300:], mask[300:], config)
    with pytest.raises(ValueError, match="multiple of 256"):
        cls.concat_rows([a, b])
    c, _ = encode_table(w[:256], mask[:256], embpress.QuantConfig(bits=8, layout=layout))
    with pytest.raises(ValueError, match="bits"):
        cls.concat_rows([c, b])
    with pytest.raises(ValueError, match="at least one"):
        cls.concat_rows([])


def test_row_range_without_a_collective_refused() -> None:
    """One process, part of the rows: the threshold would be that part's alone (every row
    pruned at sparsity 0.5), so it is refused; the whole range still works."""
    w = table(1024, 16, 4)
    config = embpress.QuantConfig(bits=8)
    with pytest.raises(ValueError, match=r"row_range \(0, 512\) covers part of the 1024 rows.*collective"):
        compress_table(w, config, sparsity_level=0.5, chunk_rows=256, row_range=(0, 512))
    with pytest.raises(ValueError, match=r"row_range \(512, 1024\) covers part"):
        compress_table(w, config, sparsity_level=0.5, chunk_rows=256, row_range=(512, 1024))
    got, _ = compress_table(w, config, sparsity_level=0.5, chunk_rows=256, row_range=(0, 1024))
    assert_same_table(in_memory(w, config, True, sparsity_level=0.5)[0], got)


@pytest.mark.parametrize("mapped", [True, False])
def test_safetensors_rows_outside_the_tensor_refused(tmp_path, mapped) -> None:
    """A range past the tensor (the next tensor's bytes), before it (the header's) or
    reversed is refused, naming the range and the tensor's rows."""
    from safetensors.torch import save_file

    path = tmp_path / "t.safetensors"
    save_file({"a_emb.weight": torch.zeros(4, 2), "b_emb.weight": torch.full((4, 2), 7.0)}, str(path))
    f = SafetensorsFile(path, mapped=mapped)
    for lo, hi in [(2, 6), (-2, 1), (3, 2), (4, 5)]:
        said = rf"rows {lo}:{hi} are not a row range of tensor 'a_emb\.weight' \(4 rows\)"
        with pytest.raises(ValueError, match=said):
            f.rows("a_emb.weight", lo, hi)
    read, _ = safetensors_rows(path, "a_emb.weight")
    with pytest.raises(ValueError, match=r"t\.safetensors: rows 2:6 are not a row range"):
        read(2, 6)
    assert torch.equal(f.rows("a_emb.weight", 4, 4), torch.zeros(0, 2))


def _checkpoint(tmp_path):
    from safetensors.torch import save_file

    w = {"emb.weight": table(600, 8, 6), "head.weight": torch.randn(2, 3)}
    src = tmp_path / "in.safetensors"
    save_file(w, str(src))
    return src, w


def test_compress_safetensors_defaults_are_compress_state_dict_s(tmp_path) -> None:
    """quant=None is DEFAULT_BITS (4) bits, as in memory: the same file, byte for byte."""
    from embpress.streaming import compress_safetensors

    src, w = _checkpoint(tmp_path)
    compress_safetensors(src, out=tmp_path / "stream.safetensors")
    embpress.compress_state_dict(w).save(tmp_path / "mem.safetensors")
    assert embpress.inspect(tmp_path / "stream.safetensors").tables[0].bits == 4
    assert (tmp_path / "stream.safetensors").read_bytes() == (tmp_path / "mem.safetensors").read_bytes()


def test_quant_of_another_type_refused_on_every_path(tmp_path) -> None:
    from embpress.streaming import compress_safetensors

    src, w = _checkpoint(tmp_path)
    torch.save(w, tmp_path / "in.pt")
    out = tmp_path / "out.safetensors"
    for path in (src, tmp_path / "in.pt"):
        with pytest.raises(TypeError, match=r"quant must be an embpress\.QuantConfig, got int"):
            embpress.compress_checkpoint(path, out, quant=8)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"quant must be an embpress\.QuantConfig, got str"):
        compress_safetensors(src, quant="8", out=out)  # type: ignore[arg-type]
    assert not out.exists()


def test_errors_of_the_file_name_it_once(tmp_path) -> None:
    """A tensor torch cannot hold (FP4, which safetensors accepts) is refused with the
    file named once, not again by compress_safetensors."""
    from embpress.streaming import compress_safetensors

    emb = table(300, 8, 7)
    header = {
        "emb.weight": {"dtype": "F32", "shape": [300, 8], "data_offsets": [0, 9600]},
        "packed": {"dtype": "F4", "shape": [4, 2], "data_offsets": [9600, 9604]},
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    src = tmp_path / "in.safetensors"
    src.write_bytes(struct.pack("<Q", len(text)) + text + emb.numpy().tobytes() + bytes(4))
    with pytest.raises(ValueError, match="tensor 'packed' has a dtype torch cannot hold") as caught:
        compress_safetensors(src, out=tmp_path / "out.safetensors")
    assert str(caught.value).count("in.safetensors") == 1, caught.value
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float8_e8m0fnu, torch.float8_e4m3fnuz])
def test_other_tensors_of_every_safetensors_dtype_are_copied(tmp_path, dtype) -> None:
    """A .safetensors checkpoint holding a non-table tensor of a dtype safetensors writes
    (rotary frequencies in complex64, say) compresses as the same state dict in memory."""
    from safetensors.torch import save_file

    from embpress.streaming import compress_safetensors

    w = {"emb.weight": table(300, 8, 1), "freqs": torch.arange(6).to(dtype)}
    save_file(w, str(tmp_path / "in.safetensors"))
    compress_safetensors(tmp_path / "in.safetensors", out=tmp_path / "stream.safetensors")
    embpress.compress_state_dict(w).save(tmp_path / "mem.safetensors")
    assert (tmp_path / "stream.safetensors").read_bytes() == (tmp_path / "mem.safetensors").read_bytes()
