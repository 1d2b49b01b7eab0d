"""A reader of embpress files written from docs/format.md alone, importing nothing of
embpress: the test that the document is enough to read every table bit for bit.

``decode(path) -> (index, {module path: float32 array [N, D]})``. It parses the
safetensors container by hand and checks what the document says a file holds (the
metadata keys, CRC-32s, tensor dtypes and shapes, the directories against the rows they
place) with ``FormatMismatch``: a failure means the file and the document disagree.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from typing import Any

import numpy as np

__all__ = ["LAYOUTS", "FormatMismatch", "decode"]

_DTYPES = {"U8": "<u1", "U16": "<u2", "I32": "<i4", "I64": "<i8", "F16": "<f2", "F32": "<f4", "F64": "<f8"}
_SCALE = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
_METADATA_KEYS = {"format", "format_version", "index", "index_crc32"}
_ENTRY_KEYS = {"kind", "aliases", "module", "table", "error"}
_TABLE_FIELDS = {"layout", "num_embeddings", "embedding_dim", "bits", "scale_dtype", "num_pruned"}
_LAYOUT_FIELDS = {"block_sparse": {"block_width"}, "mixed": {"codecs"}}
_CODECS = {
    "pruned": ("pruned", 0),
    **{f"rowwise{b}": ("rowwise", b) for b in (8, 4, 2)},
    **{f"levels{b}": ("levels", b) for b in (2, 1)},
    **{f"colbook{b}": ("colbook", b) for b in (4, 2, 1)},
}


class FormatMismatch(AssertionError):
    """The file holds something the document does not say it holds."""


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise FormatMismatch(what)


def _container(path: str) -> tuple[dict[str, str], dict[str, np.ndarray], dict[str, bytes]]:
    """safetensors by hand: an 8-byte little-endian header length, a JSON header, raw bytes."""
    with open(path, "rb") as f:
        blob = f.read()
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length])
    meta = header.pop("__metadata__", {})
    data = blob[8 + length :]
    arrays, raw = {}, {}
    for name, info in header.items():
        start, stop = info["data_offsets"]
        raw[name] = data[start:stop]
        arrays[name] = np.frombuffer(raw[name], dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])
    return meta, arrays, raw


def _index(meta: dict[str, str], raw: dict[str, bytes]) -> dict[str, Any]:
    _check(meta.get("format") == "embpress" and meta.get("format_version") == "2", "format")
    _check(set(meta) <= _METADATA_KEYS, f"metadata keys {sorted(meta)}")
    if "index_crc32" in meta:
        _check(int(meta["index_crc32"]) == zlib.crc32(meta["index"].encode()), "index_crc32")
    index = json.loads(meta["index"])
    _check(set(index) == {"tables", "crc32"}, "index keys")
    _check(set(index["crc32"]) == set(raw), "crc32 lists exactly the file's tensors")
    for name, crc in index["crc32"].items():
        _check(zlib.crc32(raw[name]) == crc, f"CRC-32 of {name}")
    return index


def _codes(buf: np.ndarray, start: int, count: int, bits: int) -> np.ndarray:
    """Code ``j`` at byte ``start + j*b/8``, bit ``(j*b)%8``."""
    j = np.arange(count)
    return (buf[start + j * bits // 8].astype(np.uint32) >> (j * bits % 8)) & ((1 << bits) - 1)


def _fused_row(row: np.ndarray, dim: int, bits: int, scale_dtype: np.dtype) -> np.ndarray:
    """Codes, then scale, then offset; ``code * scale + offset`` rounded twice in float32."""
    packed, s = math.ceil(dim * bits / 8), scale_dtype.itemsize
    scale = np.float32(np.frombuffer(row[packed : packed + s].tobytes(), scale_dtype)[0])
    offset = np.float32(np.frombuffer(row[packed + s : packed + 2 * s].tobytes(), scale_dtype)[0])
    product = (_codes(row, 0, dim, bits).astype(np.float32) * scale).astype(np.float32)
    return (product + offset).astype(np.float32)


def _shape(a: np.ndarray, dtype: str, shape: tuple[int, ...], name: str) -> None:
    _check(a.dtype == np.dtype(dtype) and a.shape == shape, f"{name}: {a.dtype} {a.shape}")


def dense(t: dict[str, np.ndarray], f: dict[str, Any]) -> np.ndarray:
    n, d, b, sd = f["num_embeddings"], f["embedding_dim"], f["bits"], _SCALE[f["scale_dtype"]]
    fused = t["fused"]
    _shape(fused, "<u1", (n, math.ceil(d * b / 8) + 2 * sd.itemsize), "fused")
    return np.stack([_fused_row(fused[i], d, b, sd) for i in range(n)])


def pruned_rows(t: dict[str, np.ndarray], f: dict[str, Any]) -> np.ndarray:
    n, d, b, sd = f["num_embeddings"], f["embedding_dim"], f["bits"], _SCALE[f["scale_dtype"]]
    fused, row_bits, row_rank = t["fused"], t["row_bits"], t["row_rank"]
    kept = fused.shape[0] - 1
    _shape(fused, "<u1", (kept + 1, math.ceil(d * b / 8) + 2 * sd.itemsize), "fused")
    _shape(row_bits, "<u1", (math.ceil(n / 8),), "row_bits")
    _shape(row_rank, "<i4", (math.ceil(n / 8),), "row_rank")
    _check(not fused[kept].any(), "the last fused row is all zero")
    counts = [bin(int(x)).count("1") for x in row_bits]
    _check(list(row_rank) == list(np.cumsum([0, *counts[:-1]])), "row_rank")
    out = np.empty((n, d), np.float32)
    for i in range(n):
        byte = int(row_bits[i // 8])
        r = kept
        if byte >> (i % 8) & 1:
            r = int(row_rank[i // 8]) + bin(byte & ((1 << (i % 8)) - 1)).count("1")
        out[i] = _fused_row(fused[r], d, b, sd)
    return out


def block_sparse(t: dict[str, np.ndarray], f: dict[str, Any]) -> np.ndarray:
    n, d, b, w = f["num_embeddings"], f["embedding_dim"], f["bits"], f["block_width"]
    sd = _SCALE[f["scale_dtype"]]
    s = sd.itemsize
    nb = math.ceil(d / w)
    word_bits = 8 if nb <= 8 else 16 if nb <= 16 else 32
    nw = math.ceil(nb / word_bits)
    head = nw * word_bits // 8
    records, row_offsets, group_offsets = t["records"], t["row_offsets"], t["group_offsets"]
    _check(records.dtype == np.uint8 and records.ndim == 1, "records")
    end = records.shape[0] - 64
    _check(not records[end:].any(), "64 zero bytes after the records")
    _shape(row_offsets, "<u2", (math.ceil(n / 2),), "row_offsets")
    longest = head + 2 * s + math.ceil(nb * w * b / 8)
    group = max(2**k for k in range(1, 9) if (2**k - 2) * longest <= 65535)
    _shape(group_offsets, "<i8", (math.ceil(n / group) + 1,), "group_offsets")
    _check(int(group_offsets[-1]) == end, "group_offsets ends at R")
    words_dtype = np.dtype(f"<u{word_bits // 8}")
    out = np.zeros((n, d), np.float32)
    pos = 0
    for i in range(n):
        if i % 2 == 0:
            pos = int(group_offsets[i // group]) + int(row_offsets[i // 2])
            _check(i % group != 0 or row_offsets[i // 2] == 0, "a group's first offset is 0")
        words = np.frombuffer(records[pos : pos + head].tobytes(), words_dtype)
        bit = [(int(words[k // word_bits]) >> (k % word_bits)) & 1 for k in range(nw * word_bits)]
        _check(not any(bit[nb:]), "no bit past the row's end")
        kept = [k for k in range(nb) if bit[k]]
        scale = np.float32(np.frombuffer(records[pos + head : pos + head + s].tobytes(), sd)[0])
        offset = np.float32(np.frombuffer(records[pos + head + s : pos + head + 2 * s].tobytes(), sd)[0])
        codes = _codes(records, pos + head + 2 * s, len(kept) * w, b).reshape(len(kept), w)
        for slot, k in enumerate(kept):
            cols = range(k * w, min(k * w + w, d))
            values = (codes[slot, : len(cols)].astype(np.float32) * scale).astype(np.float32) + offset
            out[i, k * w : k * w + len(cols)] = values
        pos += head + 2 * s + math.ceil(len(kept) * w * b / 8)
    _check(pos == end, "the last record ends at R")
    return out


def mixed(t: dict[str, np.ndarray], f: dict[str, Any]) -> np.ndarray:
    n, d = f["num_embeddings"], f["embedding_dim"]
    codecs = [_CODECS[name] for name in f["codecs"].split(",")]
    _check(1 <= len(codecs) <= 4, "1 to 4 classes")
    _check(f["bits"] == max(bits for _, bits in codecs), "bits is the codecs' widest")
    blocks = math.ceil(n / 256)
    class_ids, class_rank, class_sub = t["class_ids"], t["class_rank"], t["class_sub"]
    payload, colbooks = t["payload"], t["colbooks"]
    _shape(class_ids, "<u1", (64 * blocks,), "class_ids")
    _shape(class_rank, "<i4", (blocks + 1, 4), "class_rank")
    _shape(class_sub, "<u1", (blocks, 4, 4), "class_sub")
    ids = ((class_ids[:, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3).reshape(-1)
    as_words = np.frombuffer(class_ids.tobytes(), "<u8")
    _check(
        all(((int(as_words[i // 32]) >> (2 * (i % 32))) & 3) == ids[i] for i in range(ids.size)),
        "class_ids read as 64-bit words",
    )
    _check(not ids[n:].any(), "ids past row N are 0")
    cls = ids[:n]
    _check(bool((cls < len(codecs)).all()), "class ids within the codecs")
    for k in range(blocks + 1):
        _check(list(class_rank[k]) == [int((cls[: 256 * k] == c).sum()) for c in range(4)], "class_rank")
    for k in range(blocks):
        for sub in range(4):
            rows = cls[256 * k : 256 * k + 64 * sub]
            _check(list(class_sub[k, sub]) == [int((rows == c).sum()) for c in range(4)], "class_sub")
    s = 4 if f["scale_dtype"] == "float32" else 2
    _check(s == 2 or any(kind == "rowwise" for kind, _ in codecs), "float32 scales need a rowwise class")
    row_bytes, starts, books = [], [], []
    payload_at = book_at = 0
    for c, (kind, bits) in enumerate(codecs):
        packed = math.ceil(d * bits / 8)
        tail = {"rowwise": 2 * s, "levels": 2 * 2**bits}.get(kind, 0)  # scale and offset, or levels
        size = 0 if kind == "pruned" else packed + tail
        row_bytes.append(size)
        starts.append(payload_at)
        payload_at += int((cls == c).sum()) * size
        books.append(book_at)
        book_at += d * 2**bits if kind == "colbook" else 0
    _shape(payload, "<u1", (payload_at,), "payload")
    _shape(colbooks, "<f4", (book_at,), "colbooks")
    out = np.zeros((n, d), np.float32)
    for i in range(n):
        c = int(cls[i])
        kind, bits = codecs[c]
        slot = int(class_rank[i // 256, c]) + int(class_sub[i // 256, (i % 256) // 64, c])
        slot += int((cls[64 * (i // 64) : i] == c).sum())
        row = payload[starts[c] + slot * row_bytes[c] : starts[c] + (slot + 1) * row_bytes[c]]
        if kind == "rowwise":
            out[i] = _fused_row(row, d, bits, np.dtype("<f4") if s == 4 else np.dtype("<f2"))
        elif kind == "levels":
            packed = math.ceil(d * bits / 8)
            levels = np.frombuffer(row[packed:].tobytes(), "<f2").astype(np.float32)
            out[i] = levels[_codes(row, 0, d, bits)]
        elif kind == "colbook":
            book = colbooks[books[c] : books[c] + d * 2**bits].reshape(d, 2**bits)
            out[i] = book[np.arange(d), _codes(row, 0, d, bits)]
    return out


LAYOUTS = {"dense": dense, "pruned_rows": pruned_rows, "block_sparse": block_sparse, "mixed": mixed}


def decode(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The file's index and every table decoded to float32."""
    meta, arrays, raw = _container(path)
    index = _index(meta, raw)
    tables, claimed = {}, set()
    for name, entry in index["tables"].items():
        _check(set(entry) == _ENTRY_KEYS, f"{name}: entry keys")
        fields = entry["table"]
        _check(set(fields) == _TABLE_FIELDS | _LAYOUT_FIELDS.get(fields["layout"], set()), f"{name}: fields")
        prefix = f"tables.{name}."
        mine = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
        claimed |= {prefix + k for k in mine}
        tables[name] = LAYOUTS[fields["layout"]](mine, fields)
    _check(all(k in claimed or k.startswith("state.") for k in arrays), "every tensor is a table's or state")
    return index, tables
