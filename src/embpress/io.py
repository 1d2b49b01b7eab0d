"""save / load: a compressed model as one .safetensors file (no pickle anywhere).

The format is written down in docs/format.md. In short: tensors ``tables.<fqn>.<buffer>``
for each compressed table and ``state.<key>`` for every other entry of the model's
state_dict; the safetensors metadata holds ``format = "embpress"``,
``format_version = "2"``, a JSON ``index`` describing every table (module arguments,
layout fields, aliases) and the CRC-32 of every tensor, and ``index_crc32``, the index's
own CRC-32. Every field is validated before a tensor is trusted; the model is changed only
after the whole file has been checked.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import numbers
import os
import re
import reprlib
import secrets
import stat
import tempfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from safetensors.torch import save_file
from torch import nn

from ._buffers import empty_tensor, on_huge_pages, wants_huge_pages
from .layouts import TABLE_CLASSES, FormatError, QuantizedTable
from .layouts.base import Spec
from .nn import (
    QuantizedEmbedding,
    QuantizedEmbeddingBag,
    embedding_scale,
    module_arguments,
    module_kwargs,
    output_dtype_of,
)
from .report import human_bytes, quantized_modules

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "build_table",
    "load",
    "read_file",
    "read_index",
    "read_tensors",
    "save",
    "write_file",
]

FORMAT_NAME = "embpress"
FORMAT_VERSION = "2"
TABLE_PREFIX = "tables."
STATE_PREFIX = "state."


def raw_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes (C order), without a copy where it is a contiguous CPU tensor."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")


def crc32(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes (C order)."""
    return zlib.crc32(raw_bytes(t))


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, copying only those whose memory another entry (or a wider
    tensor) also uses, which safetensors refuses (tied weights); the rest are not copied."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        t = value.detach().cpu().contiguous()
        storage = t.untyped_storage()
        whole = t.storage_offset() == 0 and t.numel() * t.element_size() == storage.nbytes()
        if storage.data_ptr() in seen or not whole:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


_TEMP_SUFFIX = ".tmp"
_TEMP_TAIL = re.compile(r"(\d+)\.[a-z0-9_]+")  # "<pid>.<random part>"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` may still exist (True when unsure: then its file is kept)."""
    if pid <= 0 or os.name != "posix":  # kill(0) signals a group; on Windows os.kill terminates
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # not ours to signal (so it exists), or no valid pid
        return True
    return True


def _remove_stale_temps(target: Path) -> None:
    """Delete the temp files of earlier saves to ``target`` whose process is gone.

    A save killed with SIGKILL (or a power cut) cannot remove its temp file; its name
    carries the writer's pid, so the next save to the same path can tell it is stale.
    """
    prefix = f".{target.name}."
    try:
        names = os.listdir(target.parent)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(_TEMP_SUFFIX)):
            continue
        tail = _TEMP_TAIL.fullmatch(name[len(prefix) : -len(_TEMP_SUFFIX)])
        if tail is not None and not _alive(int(tail.group(1))):
            with contextlib.suppress(OSError):
                (target.parent / name).unlink()


def _sort_metadata(fh: Any) -> None:
    """Rewrite the header of the safetensors file open in ``fh`` with its metadata keys in
    sorted order, so that equal contents make equal bytes (safetensors writes the metadata
    map in an order that changes from process to process). The JSON keeps its length, so
    it is rewritten in place."""
    fh.seek(0)
    size = int.from_bytes(fh.read(8), "little")
    raw = fh.read(size)
    text = raw.decode("utf-8").rstrip(" ")
    header = json.loads(text, object_pairs_hook=dict)
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    ordered = {"__metadata__": header.pop("__metadata__"), **header}
    out = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(out) != len(text.encode("utf-8")):  # not the JSON safetensors writes: leave it
        return
    fh.seek(8)
    fh.write(out)


def file_metadata(index: dict[str, Any]) -> dict[str, str]:
    """The safetensors metadata of an embpress file whose ``index`` (with its crc32) is given,
    with the CRC-32 of the index text itself (the tensors' CRC-32s do not cover it). Keys
    are sorted: the same tables make the same bytes, whatever order the input held them in."""
    text = json.dumps(index, allow_nan=False, sort_keys=True)
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "index": text,
        "index_crc32": str(index_crc32(text)),
    }


def index_crc32(text: str) -> int:
    """The CRC-32 of the index's UTF-8 text, as the ``index_crc32`` metadata key holds it."""
    return zlib.crc32(text.encode("utf-8"))


# safetensors' dtype names, in the order of its Dtype enum: it writes tensors by dtype,
# from the last of these to the first, then by name
SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E8M0": torch.float8_e8m0fnu,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "I16": torch.int16,
    "U16": torch.uint16, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32,
    "U32": torch.uint32, "F32": torch.float32, "C64": torch.complex64, "F64": torch.float64,
    "I64": torch.int64, "U64": torch.uint64,
}  # fmt: skip
_ST_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_ST_ORDER = {dtype: i for i, dtype in enumerate(SAFETENSORS_DTYPES.values())}


def _check_tensor_names(names: Any) -> None:
    """ValueError for a tensor named ``__metadata__``: safetensors keeps its metadata
    under that key of the header, and a file holding both cannot be read back."""
    if "__metadata__" in names:
        raise ValueError("a tensor cannot be named '__metadata__' (safetensors' metadata key)")


def safetensors_layout(specs: dict[str, Spec], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """What ``write_file`` writes before the data of tensors of these dtypes and shapes
    (safetensors' header, metadata keys sorted), and where each tensor's data starts in
    the file: how processes that each hold a piece of the tensors write one file."""
    _check_tensor_names(specs)
    order = sorted(specs, key=lambda n: (-_ST_ORDER[specs[n][0]], n))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    at, starts = 0, {}
    for name in order:
        dtype, shape = specs[name]
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [at, at + size]}
        starts[name] = at
        at += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    head = len(text).to_bytes(8, "little") + text
    return head, {name: len(head) + at for name, at in starts.items()}


def temp_file_for(target: Path) -> str:
    """A new empty temp file beside ``target`` (``.<name>.<pid>.<random>.tmp``), after
    removing the temp files of earlier saves to ``target`` whose process is gone.

    Created with mode 0o666 less the umask, as ``open`` (and ``torch.save``) create
    files: the renamed file is readable by whom the user's umask allows (``mkstemp``'s
    0o600 would make every output private). An existing ``target`` must be a regular file
    (or a link to one): renaming over ``/dev/null`` would replace the device."""
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a directory")
    if target.exists() and not target.is_file():  # the rename would replace the node itself
        raise ValueError(
            f"{target} exists and is not a regular file (a device, pipe or socket): write to a file"
        )
    if not target.parent.is_dir():
        raise FileNotFoundError(f"{target}: folder {target.parent} does not exist")
    _remove_stale_temps(target)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(tempfile.TMP_MAX):
        tmp = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(6)}{_TEMP_SUFFIX}"
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return str(tmp)
    raise FileExistsError(f"no free temporary file name beside {target}")


def save_safetensors(tensors: dict[str, torch.Tensor], tmp: str, metadata: dict[str, str]) -> None:
    """safetensors' ``save_file`` into ``tmp``, a file made by :func:`temp_file_for`, which
    keeps the mode it was created with (``save_file`` leaves every file it writes 0o600)."""
    mode = stat.S_IMODE(os.stat(tmp).st_mode)
    save_file(tensors, tmp, metadata=metadata)
    os.chmod(tmp, mode)


def write_file(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], index: dict[str, Any]) -> None:
    """Write tensors + index atomically: a temp file in the same folder, fsync, rename.

    The temp file is ``.<name>.<pid>.<random>.tmp``; temp files of earlier saves to the
    same path whose process no longer runs (killed mid-save) are removed first.
    """
    target = Path(path)
    _check_tensor_names(tensors)
    payload = _unshared(tensors)
    metadata = file_metadata({**index, "crc32": {k: crc32(v) for k, v in payload.items()}})
    tmp = temp_file_for(target)
    try:
        save_safetensors(payload, tmp, metadata)
        with open(tmp, "r+b") as fh:
            _sort_metadata(fh)
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def table_entry(meta: dict[str, Any], error: Any, aliases: list[str], module: Any = None) -> dict[str, Any]:
    """The index entry of one table: built after the model's module (``kind: "auto"``)
    when ``module`` is None, else after the quantized ``module``'s kind and arguments."""
    if module is None:
        kind = "auto"
    else:
        kind = "EmbeddingBag" if isinstance(module, QuantizedEmbeddingBag) else "Embedding"
    entry = {
        "kind": kind,
        "aliases": aliases,
        "module": None if module is None else module_kwargs(module),
        "table": meta,
        # a report, not needed to decode: left out rather than written unreadable
        "error": error if _error_problem(error) is None else None,
    }
    return entry


def save(model: nn.Module, path: str | os.PathLike[str], *, kind_from_model: bool = False) -> None:
    """Write every compressed table of ``model`` and the rest of its state_dict to ``path``.

    ``kind_from_model`` writes the tables with ``kind: "auto"`` and no module arguments:
    ``load`` then builds each one after the float module it replaces (Embedding or
    EmbeddingBag, its mode, padding_idx, max_norm...). For files made from a bare
    state_dict, which does not say what kind of module a table belongs to. Every entry is
    checked as ``load`` will check it (a FormatError here, not a file that cannot be read).
    """
    _check_model(model)
    tables = quantized_modules(model)
    if not tables:
        raise ValueError("model has no QuantizedEmbedding / QuantizedEmbeddingBag to save")
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, Any] = {}
    prefixes: list[str] = []
    for name, (module, aliases) in tables.items():
        qm: Any = module
        entries[name] = table_entry(qm.table.meta(), qm.error, aliases, None if kind_from_model else qm)
        check_entry(Path(path), name, entries[name])
        for buf, t in qm.table.tensors().items():
            tensors[f"{TABLE_PREFIX}{name}.{buf}"] = t
        prefixes.extend(f"{n}." for n in (name, *aliases))
    written: set[tuple[Any, ...]] = set()
    for key, value in model.state_dict().items():
        if any(key.startswith(p) for p in prefixes):
            continue
        _check_state_value(key, value)
        view = view_key(value)
        if view in written:  # a tied weight: once, under its first key (load ties it again)
            continue
        written.add(view)
        tensors[f"{STATE_PREFIX}{key}"] = value
    write_file(path, tensors, {"tables": entries})


def unstorable(t: torch.Tensor) -> str | None:
    """Why an embpress (safetensors) file cannot hold ``t`` as it is, or None: it stores
    dense tensors of the dtypes safetensors knows, with their values."""
    if t.layout != torch.strided:
        return f"a sparse tensor ({str(t.layout).removeprefix('torch.')})"
    if t.is_quantized:
        return "a quantized tensor"
    if t.is_meta:
        return "on the meta device (it holds no values)"
    if not _storable_dtype(t.dtype):
        return f"of dtype {str(t.dtype).removeprefix('torch.')}, which safetensors cannot store"
    return None


@functools.cache
def _storable_dtype(dtype: torch.dtype) -> bool:
    try:
        safetensors_bytes({"t": torch.zeros(1, dtype=dtype)})
    except Exception:
        return False
    return True


def _check_state_value(key: str, value: Any) -> None:
    """ValueError, before anything is written, for state the file cannot hold."""
    if not isinstance(value, torch.Tensor):
        kind = type(value).__name__
        raise ValueError(f"state entry {key!r} is a {kind}: an embpress file holds tensors only")
    problem = unstorable(value)
    if problem is not None:
        raise ValueError(
            f"state tensor {key!r} is {problem}, which an embpress file cannot hold (make it a dense "
            "tensor of a plain dtype, .to_dense() / .dequantize(), before saving)"
        )


def view_key(t: torch.Tensor) -> tuple[Any, ...]:
    """Equal for two tensors that are one tensor's data (tied weights); distinct for any
    tensor without data to share (empty, meta, not strided), whose address says nothing."""
    if t.layout != torch.strided or t.device.type == "meta" or t.numel() == 0:
        return (id(t),)
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


# ---------------------------------------------------------------------------------- reading
def _fail(path: Path, what: str) -> FormatError:
    return FormatError(f"{path}: {what}")


def _open_regular(p: Path) -> int:
    """A read-only descriptor of the regular file at ``p`` (never blocks on a FIFO)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(p, flags)
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: no such file") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _fail(p, "not a regular file")
    return fd


def _fd_name(fd: int, p: Path) -> str:
    """A name that opens the file behind ``fd`` itself, not what ``p`` names by now.

    safetensors (and torch, which maps the file for it) open the file by name; through
    /proc/self/fd every read sees the version the descriptor holds even if a save replaces
    ``p`` meanwhile. Where there is no /proc, ``p`` (and the race) remains.
    """
    name = f"/proc/self/fd/{fd}"
    return name if os.path.exists(name) else str(p)


def _memory_bytes() -> int | None:
    """This machine's physical memory, where the OS says."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def _shown(value: Any) -> str:
    """A short repr of a value read from a file (bounded in length and nesting depth)."""
    return reprlib.repr(value)


def _is_number(value: Any) -> bool:
    """A finite JSON number (bool excluded; an int too large for a float excluded)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


# the metadata of a file: without index_crc32 (written before it existed), or with it
_METADATA_KEYS = ({"format", "format_version", "index"}, {"format", "format_version", "index", "index_crc32"})
_INDEX_KEYS = {"tables", "crc32"}
_ENTRY_KEYS = {"kind", "aliases", "module", "table", "error"}
_ERROR_KEYS = {"rel_frobenius", "max_abs"}
_MODULE_KEYS = {
    "Embedding": {"padding_idx", "max_norm", "norm_type"},
    "EmbeddingBag": {"padding_idx", "max_norm", "norm_type", "mode", "include_last_offset"},
}


def _parse_index(p: Path, metadata: dict[str, str], keys: set[str]) -> dict[str, Any]:
    """The validated index of a file whose ``__metadata__`` and tensor names are given."""
    if metadata.get("format") != FORMAT_NAME:
        raise _fail(p, "not an embpress file (no 'format: embpress' in its header)")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise _fail(
            p, f"unsupported format version {_shown(version)} (this embpress reads {FORMAT_VERSION!r})"
        )
    if set(metadata) not in _METADATA_KEYS:
        unknown = sorted(set(metadata) - _METADATA_KEYS[-1])
        what = f"unknown key(s) {_shown(unknown)}" if unknown else "no 'index'"
        raise _fail(p, f"header metadata has {what} (expected {sorted(_METADATA_KEYS[-1])})")
    if "index_crc32" in metadata:  # absent from files written before it was: read unchecked
        stored = metadata["index_crc32"]
        if not (stored.isascii() and stored.isdigit() and len(stored) <= 10 and int(stored) < 1 << 32):
            raise _fail(p, f"index_crc32 must be an integer in [0, 2**32), got {_shown(stored)}")
        if int(stored) != index_crc32(metadata["index"]):
            raise _fail(p, "header index is corrupted (its CRC-32 does not match index_crc32)")
    try:
        index = strict_json(metadata["index"])
    except RecursionError:  # cannot happen below MAX_JSON_DEPTH; kept as a guard
        raise _fail(p, "header index is not valid JSON (nested too deeply)") from None
    except ValueError as err:  # JSONDecodeError, or an integer of too many digits
        raise _fail(p, f"header index is not valid JSON ({err})") from None
    if (
        not isinstance(index, dict)
        or set(index) != _INDEX_KEYS
        or not isinstance(index["tables"], dict)
        or not isinstance(index["crc32"], dict)
    ):
        raise _fail(p, "header index must hold exactly 'tables' and 'crc32' objects")
    if set(index["crc32"]) != keys:
        raise _fail(p, "the tensors in the file do not match the header's list")
    for key, value in index["crc32"].items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 32:
            raise _fail(p, f"crc32 of tensor {key!r} must be an integer in [0, 2**32), got {_shown(value)}")
    for name, entry in index["tables"].items():
        check_entry(p, name, entry)
    _check_places(p, index["tables"])
    index["format_version"] = version
    return index


MAX_JSON_DEPTH = 64
# possessive: a long string is matched in runs, not one backtracking state per character
# (which took gigabytes for a header of tens of megabytes)
_JSON_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def strict_json(text: str) -> Any:
    """``text`` parsed as JSON, or ValueError: a key given twice in one object, or arrays and
    objects nested deeper than ``MAX_JSON_DEPTH`` (refused before parsing, so whether a file
    reads never depends on how deep Python's stack already is)."""
    depth = deepest = 0
    for match in _JSON_BRACKET.finditer(_JSON_STRING.sub("", text)):
        depth += 1 if match.group() in "[{" else -1
        deepest = max(deepest, depth)
    if deepest > MAX_JSON_DEPTH:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    return json.loads(text, object_pairs_hook=unique_keys)


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``' object hook that refuses a key given twice (ValueError): JSON itself
    keeps the last one silently, so a file could say two things of one field."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def _check_places(p: Path, tables: dict[str, Any]) -> None:
    """Each module path is one table's, once: a path given twice (as a table's name or
    among aliases) would be loaded from whichever came last; and a path has no empty
    component (``.emb`` and ``emb`` would both be the root's ``emb``)."""
    owner: dict[str, str] = {}
    for name, entry in tables.items():
        for place in (name, *entry["aliases"]):
            if not all(place.split(".")):  # '.emb' would be the root's 'emb', as 'emb' is
                raise _fail(p, f"module path {place!r} has an empty component")
            if place in owner:
                first = owner[place]
                where = f"table {first!r}" if first == name else f"tables {first!r} and {name!r}"
                raise _fail(p, f"module {place!r} is claimed twice, by {where}")
            owner[place] = name


def check_fields(p: Path, name: str, fields: dict[str, Any], table: QuantizedTable) -> None:
    """A stored table's fields are exactly those its layout writes (``meta()``): a field
    the layout does not read (a block width on a dense table) is not silently dropped."""
    unknown = sorted(set(fields) - set(table.meta()))
    if unknown:
        raise _fail(
            p, f"table {name!r}: unknown table field(s) {_shown(unknown)} for layout {table.layout!r}"
        )


def _error_problem(error: Any) -> str | None:
    """Why ``error`` is not a valid ``error`` field (None if it is)."""
    if error is None:
        return None
    if not isinstance(error, dict) or set(error) != _ERROR_KEYS:
        return f"error must be null or an object with exactly {sorted(_ERROR_KEYS)}, got {_shown(error)}"
    for key in sorted(_ERROR_KEYS):
        if not _is_number(error[key]) or error[key] < 0:
            return f"error field {key!r} must be a finite number >= 0, got {_shown(error[key])}"
    return None


def _check_module(where: str, kind: str, module: Any, rows: int) -> str | None:
    """Why ``module`` is not valid for a table of ``kind`` with ``rows`` rows (None if it is)."""
    if not isinstance(module, dict):
        return f"{where}: module arguments must be an object"
    expected = _MODULE_KEYS[kind]
    if set(module) != expected:
        missing, unknown = sorted(expected - set(module)), sorted(set(module) - expected)
        return f"{where}: module arguments of an {kind} (missing: {missing}, unknown: {unknown})"
    padding = module["padding_idx"]
    if padding is not None and (isinstance(padding, bool) or not isinstance(padding, int)):
        return f"{where}: padding_idx must be an integer or null, got {_shown(padding)}"
    if padding is not None and not 0 <= padding < rows:
        return f"{where}: padding_idx {padding} is out of range"
    max_norm = module["max_norm"]
    if max_norm is not None and (not _is_number(max_norm) or max_norm <= 0):
        return f"{where}: max_norm must be a finite number > 0 or null, got {_shown(max_norm)}"
    if not _is_number(module["norm_type"]) and module["norm_type"] not in ("inf", "-inf"):
        return (
            f'{where}: norm_type must be a finite number, "inf" or "-inf", got {_shown(module["norm_type"])}'
        )
    if kind == "EmbeddingBag":
        if module["mode"] not in ("sum", "mean", "max"):
            return f"{where}: mode must be sum, mean or max, got {_shown(module['mode'])}"
        last = module["include_last_offset"]
        if not isinstance(last, bool):
            return f"{where}: include_last_offset must be true or false, got {_shown(last)}"
    return None


def check_entry(p: Path, name: str, entry: Any) -> None:
    """One table's index entry, every field checked (the layout's own fields by the layout)."""
    where = f"table {name!r}"
    if not isinstance(entry, dict):
        raise _fail(p, f"{where}: entry must be an object")
    if set(entry) != _ENTRY_KEYS:
        raise _fail(p, f"{where}: entry must hold exactly {sorted(_ENTRY_KEYS)}, got {_shown(sorted(entry))}")
    kind = entry["kind"]
    if kind not in ("Embedding", "EmbeddingBag", "auto"):
        raise _fail(p, f"{where}: kind must be Embedding, EmbeddingBag or auto, got {_shown(kind)}")
    if not isinstance(entry["aliases"], list) or not all(isinstance(a, str) for a in entry["aliases"]):
        raise _fail(p, f"{where}: aliases must be a list of names")
    table = entry["table"]
    if not isinstance(table, dict):
        raise _fail(p, f"{where}: table fields must be an object")
    for key, value in table.items():  # the layouts check the values (no list or object among them)
        if value is not None and not isinstance(value, (str, int, float)):
            raise _fail(p, f"{where}: table field {key!r} must be a number or a string")
    if table.get("layout") not in TABLE_CLASSES:
        raise _fail(p, f"{where}: unknown layout {_shown(table.get('layout'))}")
    rows = table.get("num_embeddings")
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise _fail(p, f"{where}: num_embeddings must be a positive integer, got {_shown(rows)}")
    problem = _error_problem(entry["error"])
    if problem is not None:
        raise _fail(p, f"{where}: {problem}")
    if kind == "auto":
        if entry["module"] is not None:
            raise _fail(p, f"{where}: a table of kind auto takes its module arguments from the model")
        return
    problem = _check_module(where, kind, entry["module"], rows)
    if problem is not None:
        raise _fail(p, problem)


_SAFETENSORS_DTYPES = {
    "U8": torch.uint8, "I8": torch.int8, "U16": torch.uint16, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "F32": torch.float32,
}  # fmt: skip


class _SliceReader:
    """Parts of one table's tensors from an open safetensors file (``QuantizedTable.load_rows``).

    The tensors in ``whole`` (the layout's ``row_directory``) are read whole on first use
    and, given their ``crcs``, CRC-checked; their parts come from that copy. Rows of a
    tensor in ``spans`` (``_spans``: where it lies in the file behind ``fd``) are read
    alone with ``pread``; other reads slice safetensors' view (a mapped file's pages)."""

    def __init__(
        self,
        p: Path,
        handle: Any,
        prefix: str,
        keys: set[str],
        whole: tuple[str, ...] = (),
        crcs: dict[str, int] | None = None,
        fd: int | None = None,
        spans: dict[str, tuple[torch.dtype, tuple[int, ...], int]] | None = None,
    ) -> None:
        self.p, self.handle, self.prefix, self.keys = p, handle, prefix, keys
        self.whole, self.crcs = whole, crcs
        self.fd, self.spans = fd, spans or {}
        self._read_whole: dict[str, torch.Tensor] = {}

    def _whole(self, name: str) -> torch.Tensor:
        if name not in self._read_whole:
            key = self.prefix + name
            if key not in self.keys:
                raise FormatError(f"tensor {name!r} is missing")
            try:
                t: torch.Tensor = self.handle.get_tensor(key)
            except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as err:
                raise FormatError(f"could not read tensor {name!r} ({err})") from None
            if self.crcs is not None and crc32(t) != self.crcs[key]:
                raise FormatError(f"tensor {name!r} is corrupted (CRC-32 mismatch)")
            self._read_whole[name] = t
        return self._read_whole[name]

    def _slice(self, name: str) -> Any:
        key = self.prefix + name
        if key not in self.keys:
            raise FormatError(f"tensor {name!r} is missing")
        return self.handle.get_slice(key)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in self._slice(name).get_shape())

    def __call__(self, name: str, lo: int, hi: int) -> torch.Tensor:
        if name in self.whole:
            t = self._whole(name)
            if t.dim() == 0 or not 0 <= lo <= hi <= t.shape[0]:
                raise FormatError(f"tensor {name!r} (shape {tuple(t.shape)}) has no rows {lo}:{hi}")
            return t[lo:hi]
        span = self.spans.get(self.prefix + name)
        if span is not None and self.fd is not None and span[1] and 0 <= lo < hi <= span[1][0]:
            # the rows alone, by pread (safetensors' pread backend reads the whole tensor
            # for a slice: a shard of a table larger than memory would not load)
            dtype, dims, start = span
            row = math.prod(dims[1:]) * dtype.itemsize
            try:
                return _pread_into(self.fd, torch.empty((hi - lo, *dims[1:]), dtype=dtype), start + lo * row)
            except OSError as err:
                raise FormatError(f"could not read rows {lo}:{hi} of tensor {name!r} ({err})") from None
        view = self._slice(name)
        if lo >= hi:  # safetensors refuses an empty slice of an empty tensor
            shape = [0, *self.shape(name)[1:]]
            return torch.empty(shape, dtype=_SAFETENSORS_DTYPES.get(view.get_dtype(), torch.uint8))
        try:
            out: torch.Tensor = view[lo:hi]
        except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as err:
            raise _fail(self.p, f"could not read rows {lo}:{hi} of tensor {name!r} ({err})") from None
        return out


def _header_entries(p: Path, fd: int) -> tuple[int, dict[str, Any]]:
    """The safetensors header of the file behind ``fd`` read again, for the tensors' file
    offsets: (its length, its entries). ``safe_open`` validated it; a header that no
    longer parses means the file changed meanwhile (FormatError)."""
    try:
        size = int.from_bytes(os.pread(fd, 8, 0), "little")
        entries = json.loads(os.pread(fd, size, 8))
        if not isinstance(entries, dict):
            raise ValueError("not an object")
    except (ValueError, RecursionError, OSError):
        raise _fail(p, "the file changed while it was being read; read it again") from None
    return size, entries


def _spans(
    p: Path, header: tuple[int, dict[str, Any]], handle: Any, keys: list[str]
) -> dict[str, tuple[torch.dtype, tuple[int, ...], int]]:
    """(dtype, shape, file offset) of each of ``keys`` that has a torch dtype here, for
    reading it (or some of its rows) with ``pread``. Dtypes and shapes are what ``handle``
    (``safe_open`` on the same open file) validated; the offsets come from the header read
    again (``_header_entries``), which must agree with them (else the file changed
    meanwhile: FormatError)."""
    size, entries = header
    spans = {}
    try:
        for key in keys:
            view = handle.get_slice(key)
            name = view.get_dtype()
            dtype, shape = _SAFETENSORS_DTYPES.get(name), tuple(int(n) for n in view.get_shape())
            if dtype is None:
                continue
            entry = entries[key]
            first, last = (int(v) for v in entry["data_offsets"])
            if (
                entry["dtype"] != name
                or tuple(entry["shape"]) != shape
                or last - first != math.prod(shape) * dtype.itemsize
            ):
                raise ValueError(key)
            spans[key] = (dtype, shape, 8 + size + first)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        raise _fail(p, "the file changed while it was being read; read it again") from None
    return spans


def _stored_bytes(p: Path, header: tuple[int, dict[str, Any]], keys: list[str]) -> int:
    """Bytes the tensors ``keys`` take in the file, from the header's offsets."""
    entries = header[1]
    try:
        return sum(int(entries[k]["data_offsets"][1]) - int(entries[k]["data_offsets"][0]) for k in keys)
    except (ValueError, KeyError, TypeError, IndexError):
        raise _fail(p, "the file changed while it was being read; read it again") from None


def _pread_into(fd: int, out: torch.Tensor, start: int) -> torch.Tensor:
    """``out`` (contiguous) filled with the file's bytes from offset ``start``."""
    view = out.reshape(-1).view(torch.uint8).numpy().data
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], start + done)
        if n <= 0:
            raise OSError("the file ends before the tensor's last byte")
        done += n
    return out


def _read_span(fd: int, dtype: torch.dtype, shape: tuple[int, ...], start: int) -> torch.Tensor:
    """The tensor stored at file offset ``start``, read into a buffer on huge pages."""
    return _pread_into(fd, empty_tensor(shape, dtype), start)


def _read(
    p: Path,
    *,
    tensors: bool,
    mmap: bool,
    verify: bool,
    expect: dict[str, Any] | None = None,
    shards: dict[str, tuple[int, int]] | None = None,
    built: dict[str, QuantizedTable] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(validated index, tensors) of ``p``, both from one opened file (see ``_fd_name``).

    ``tensors=False`` reads the header only. ``expect``: the index the caller read
    before; a file whose index differs now was replaced in between (FormatError).
    ``shards``: tables read by row range (``QuantizedTable.load_rows``) into ``built``
    instead of whole; their tensors are not in the result (those that place rows are
    CRC-checked whole, the rest, read in part, are not).
    """
    fd = _open_regular(p)
    try:
        name = _fd_name(fd, p)
        backend = "mmap" if tensors and mmap else "pread"
        try:
            handle = safe_open(name, framework="pt", backend=backend)
        except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as err:
            detail = str(err).replace(name, str(p))
            raise _fail(p, f"not a readable safetensors file ({detail})") from None
        with handle as f:
            keys = list(f.keys())
            index = _parse_index(p, dict(f.metadata() or {}), set(keys))
            if expect is not None and any(index[k] != expect.get(k) for k in _INDEX_KEYS):
                raise _fail(p, "the file was replaced while it was being read; read it again")
            if not tensors:
                return index, {}
            skip: set[str] = set()
            header: tuple[int, dict[str, Any]] | None = None  # read once, where needed
            for table, (start, stop) in (shards or {}).items():
                if table not in index["tables"]:
                    raise _fail(
                        p, f"has no table {table!r} to load rows of (tables: {sorted(index['tables'])})"
                    )
                prefix = f"{TABLE_PREFIX}{table}."
                meta = index["tables"][table]["table"]
                rows = meta.get("num_embeddings")
                if isinstance(rows, int) and stop > rows:  # the caller's range, not the file's damage
                    raise ValueError(
                        f"shards[{table!r}] = ({start}, {stop}) reaches past the {rows} rows of table "
                        f"{table!r} in {p}"
                    )
                cls = TABLE_CLASSES[meta["layout"]]
                for tensor, dtype, ndim in cls.tensor_kinds:
                    key = prefix + tensor
                    if key not in keys:
                        raise _fail(p, f"table {table!r}: tensor {tensor!r} is missing")
                    view = f.get_slice(key)
                    got = _SAFETENSORS_DTYPES.get(view.get_dtype())
                    if got != dtype or len(view.get_shape()) != ndim:
                        raise _fail(
                            p,
                            f"table {table!r}: tensor {tensor!r} is {view.get_dtype()} of "
                            f"{len(view.get_shape())} dimension(s), expected {dtype} of {ndim}",
                        )
                row_spans = {}
                if not mmap:  # a mapped file is sliced in place; else the rows are read by pread
                    header = header or _header_entries(p, fd)
                    row_spans = _spans(p, header, f, [k for k in keys if k.startswith(prefix)])
                crcs = index["crc32"] if verify else None
                reader = _SliceReader(p, f, prefix, set(keys), cls.row_directory, crcs, fd, row_spans)
                try:
                    built[table] = cls.load_rows(meta, reader, start, stop)  # type: ignore[index]
                except FormatError as err:
                    raise _fail(p, f"table {table!r} rows {start}:{stop}: {err}") from None
                skip.update(k for k in keys if k.startswith(prefix))
            keys = [k for k in keys if k not in skip]
            spans: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
            if not mmap:
                memory = _memory_bytes()
                header = header or _header_entries(p, fd)
                data = _stored_bytes(p, header, keys)  # what is read whole (not a shard's table)
                if memory is not None and data > memory:
                    raise _fail(
                        p,
                        f"its tensors take {human_bytes(data)}, more than this machine's memory "
                        f"({human_bytes(memory)}); load it with mmap=True",
                    )
                # tensors that belong on huge pages are read straight into them (one copy)
                huge = [k for k in keys if wants_huge_pages(_stored_bytes(p, header, [k]))]
                spans = _spans(p, header, f, huge)
            out = {}
            for key in keys:
                try:
                    t = _read_span(fd, *spans[key]) if key in spans else f.get_tensor(key)
                except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as err:
                    detail = str(err).replace(name, str(p))
                    raise _fail(p, f"could not read tensor {key!r} ({detail})") from None
                if verify and crc32(t) != index["crc32"][key]:
                    raise _fail(p, f"tensor {key!r} is corrupted (CRC-32 mismatch)")
                out[key] = t if mmap or key in spans else on_huge_pages(t)  # a mapped file stays mapped
            return index, out
    finally:
        os.close(fd)


def read_index(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated header of an embpress file: {"tables": ..., "crc32": ..., "format_version"}."""
    return _read(Path(path), tensors=False, mmap=False, verify=False)[0]


def read_tensors(
    p: str | os.PathLike[str], index: dict[str, Any], mmap: bool = True, verify: bool = True
) -> dict[str, torch.Tensor]:
    """Every tensor of the file, each CRC-checked against the index (``verify``).

    ``index`` is what ``read_index`` returned: if the file was replaced since (a save to
    the same path), FormatError. ``read_file`` reads both from one opened file.
    """
    return _read(Path(p), tensors=True, mmap=mmap, verify=verify, expect=index)[1]


def read_file(
    path: str | os.PathLike[str], *, mmap: bool = False, verify: bool = True
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(validated index, every tensor) of an embpress file, both from one opened file: a
    save that replaces ``path`` meanwhile cannot mix two versions."""
    return _read(Path(path), tensors=True, mmap=mmap, verify=verify)


def claim_tensors(p: Path, name: str, table: QuantizedTable, owned: set[str]) -> None:
    """Add the file keys of table ``name``'s tensors to ``owned``; FormatError where
    another table already holds one."""
    for buf in table.tensors():
        key = f"{TABLE_PREFIX}{name}.{buf}"
        if key in owned:
            raise _fail(p, f"tensor {key!r} belongs to two tables")
        owned.add(key)


def check_no_stray(p: Path, tensors: Mapping[str, torch.Tensor], owned: set[str]) -> None:
    """FormatError where the file holds a tensor that is neither a table's (``owned``) nor
    the model's other state: a file that says less than it holds is not trusted."""
    stray = sorted(k for k in tensors if k not in owned and not k.startswith(STATE_PREFIX))
    if stray:
        raise _fail(p, f"tensors {stray[:5]} belong to no table")


def build_table(
    p: Path, name: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> QuantizedTable:
    """The quantized table of one index entry, its tensors validated."""
    prefix = f"{TABLE_PREFIX}{name}."
    own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        table = TABLE_CLASSES[entry["table"]["layout"]].from_tensors(entry["table"], own)
    except FormatError as err:
        raise _fail(p, f"table {name!r}: {err}") from None
    check_fields(p, name, entry["table"], table)
    return table


_QUANTIZED = (QuantizedEmbedding, QuantizedEmbeddingBag)


def _module_for(
    p: Path, name: str, entry: dict[str, Any], table: QuantizedTable, target: nn.Module
) -> QuantizedEmbedding | QuantizedEmbeddingBag:
    """The quantized module of one entry; kind "auto" copies ``target``'s kind and arguments.
    It returns ``target``'s dtype (a float module's weight dtype)."""
    kind, kwargs = entry["kind"], dict(entry["module"] or {})
    if kind == "auto":
        bag = isinstance(target, (nn.EmbeddingBag, QuantizedEmbeddingBag))
        kind = "EmbeddingBag" if bag else "Embedding"
        kwargs = {k: getattr(target, k) for k in sorted(_MODULE_KEYS[kind])}  # the constructor checks them
    else:  # checked by _check_entry: numbers as floats (as nn's modules hold them)
        kwargs["norm_type"] = float(kwargs["norm_type"])
        if kwargs["max_norm"] is not None:
            kwargs["max_norm"] = float(kwargs["max_norm"])
    module: QuantizedEmbedding | QuantizedEmbeddingBag
    # what the model's module returns, not stored: its dtype, and its scale (a ScaledWordEmbedding's)
    kwargs["output_dtype"] = output_dtype_of(target)
    scale = target.output_scale if isinstance(target, _QUANTIZED) else embedding_scale(target)
    kwargs["output_scale"] = 1.0 if scale is None else scale
    try:
        if kind == "EmbeddingBag":
            module = QuantizedEmbeddingBag(table, **kwargs)
        else:
            module = QuantizedEmbedding(table, **kwargs)
    except (TypeError, ValueError) as err:
        raise _fail(p, f"table {name!r}: bad module arguments ({err})") from None
    module.error = entry["error"]
    return module


def _module_key(module: QuantizedEmbedding | QuantizedEmbeddingBag) -> tuple[Any, ...]:
    """What tells two compressed modules on one table apart: their kind and arguments."""
    kind = "EmbeddingBag" if isinstance(module, QuantizedEmbeddingBag) else "Embedding"
    args = tuple(getattr(module, k) for k in sorted(_MODULE_KEYS[kind]))
    return (kind, args, module.output_dtype, module.output_scale)


def _shard_module(module: dict[str, Any] | None, start: int, stop: int) -> dict[str, Any] | None:
    """A table's module arguments for its rows ``start:stop`` alone: ``padding_idx`` counted
    from ``start``, or none where the padding row is not among them."""
    if module is None or module.get("padding_idx") is None:
        return module
    index = module["padding_idx"]
    return {**module, "padding_idx": index - start if start <= index < stop else None}


def _resolve(
    model: nn.Module,
    p: Path,
    table: str,
    name: str,
    entry: dict[str, Any],
    shard: tuple[int, int] | None = None,
) -> tuple[nn.Module, str, nn.Module]:
    """(parent, attribute, current module) of ``name`` in ``model``, checked against the
    table (``shard``: the rows of it that ``entry`` describes)."""
    parent_name, _, attr = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        raise _fail(
            p, f"table {table!r}: the model has no module {parent_name!r} (another architecture?)"
        ) from None
    current = parent._modules.get(attr)
    kinds = {
        "Embedding": (nn.Embedding, QuantizedEmbedding),
        "EmbeddingBag": (nn.EmbeddingBag, QuantizedEmbeddingBag),
        "auto": (nn.Embedding, QuantizedEmbedding, nn.EmbeddingBag, QuantizedEmbeddingBag),
    }[entry["kind"]]
    if current is None or not isinstance(current, kinds):
        found = type(current).__name__ if current is not None else "nothing"
        expected = "an embedding" if entry["kind"] == "auto" else entry["kind"]
        raise _fail(p, f"table {table!r}: the model has {found} at {name!r}, expected {expected}")
    if not isinstance(current, _QUANTIZED) and embedding_scale(current) is None:
        raise _fail(
            p,
            f"table {table!r}: the model's {type(current).__name__} at {name!r} has its own forward, "
            "which a compressed table cannot stand in for",
        )
    rows, dim = getattr(current, "num_embeddings", None), getattr(current, "embedding_dim", None)
    meta = entry["table"]
    if (rows, dim) != (meta.get("num_embeddings"), meta.get("embedding_dim")):
        raise _fail(
            p,
            f"table {table!r}: the model's table is {rows} x {dim}, the file's "
            + (f"rows {shard[0]}:{shard[1]} are " if shard is not None else "is ")
            + f"{meta.get('num_embeddings')} x {meta.get('embedding_dim')}",
        )
    return parent, attr, current


def _tied_to_loaded(params: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> set[str]:
    """Keys of the model (``params``: its state_dict with its Parameters themselves) that the
    file leaves out because they are tied to a key it holds (one Parameter under several
    names: it is loaded through that key)."""
    keys: dict[int, list[str]] = {}
    for k, v in params.items():
        keys.setdefault(id(v), []).append(k)
    return {k for group in keys.values() if any(g in state for g in group) for k in group}


def _retied(
    p: Path,
    model: nn.Module,
    params: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    places: list[tuple[nn.Module, str, nn.Module]],
    replaced: tuple[str, ...],
) -> tuple[list[tuple[nn.Module, str, nn.Module]], tuple[str, ...]]:
    """``places`` and ``replaced`` with the model's other embedding modules that share a
    replaced module's weight (tied token tables a file names once, as Hugging Face's
    safetensors files do) and have its kind and arguments: they take the same compressed
    module. Any other tensor of the model tied to a compressed table's weight (an output
    head) has no float weight left to load: FormatError."""
    weights: dict[int, tuple[nn.Module, nn.Module]] = {}
    for holder, name, new in places:
        current = holder._modules.get(name)
        weight = getattr(current, "weight", None)
        if current is not None and isinstance(weight, torch.Tensor) and not isinstance(current, _QUANTIZED):
            weights[id(weight)] = (current, new)
    if not weights:
        return places, replaced
    extra: list[tuple[nn.Module, str, nn.Module]] = []
    more: list[str] = []
    for key, value in params.items():
        hit = weights.get(id(value))
        if hit is None or key.startswith(replaced) or key in state:
            continue
        current, new = hit
        path = key[: -len(".weight")] if key.endswith(".weight") else ""
        parent_name, _, attr = path.rpartition(".")
        parent: nn.Module | None = model.get_submodule(parent_name) if path else None
        module: nn.Module | None = None if parent is None else parent._modules.get(attr)
        if (
            parent is None
            or module is None
            or embedding_scale(module) is None
            or module_arguments(module) != module_arguments(current)
        ):
            raise _fail(
                p,
                f"the model's {key!r} is tied to the weight of a table the file holds compressed, "
                "so it has no float weight to load (an output head: compress the checkpoint without "
                "that table, or untie it in the model)",
            )
        extra.append((parent, attr, new))
        more.append(f"{path}.")
    return places + extra, (*replaced, *more)


def _checked_shards(shards: Any) -> dict[str, tuple[int, int]] | None:
    """``shards`` as {table: (start, stop)} with int bounds; TypeError / ValueError otherwise."""
    if shards is None:
        return None
    if not isinstance(shards, dict):
        raise TypeError(f"shards must be a dict {{table: (start, stop)}}, got {type(shards).__name__}")
    out = {}
    for name, bounds in shards.items():
        try:
            start, stop = bounds
        except (TypeError, ValueError):
            raise ValueError(f"shards[{name!r}] must be (start, stop), got {bounds!r}") from None
        if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in (start, stop)) or not (
            0 <= start < stop
        ):
            raise ValueError(f"shards[{name!r}] must be integers 0 <= start < stop, got {bounds!r}")
        out[str(name)] = (int(start), int(stop))
    return out


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _checked_device(device: Any) -> torch.device:
    """``device`` as a torch.device that this torch can put tensors on; ValueError naming
    it otherwise (torch's own errors for an unknown or absent device are an
    AssertionError or a list of every device type)."""
    try:
        checked = torch.device(device)
        torch.empty(0, device=checked)
    except (RuntimeError, AssertionError, TypeError) as err:
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"device {device!r} cannot hold tensors here: {why[:200]}") from None
    return checked


def load(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    mmap: bool = False,
    verify: bool = True,
    device: str | torch.device | None = None,
    shards: dict[str, tuple[int, int]] | None = None,
) -> nn.Module:
    """Put the tables (and other tensors) of ``path`` into ``model``; return ``model``.

    ``model`` is a freshly built model of the architecture that was saved: its float
    embeddings are replaced by the compressed ones, its other tensors loaded. ``verify``
    checks every tensor's CRC-32. Nothing in ``model`` changes unless the whole file is
    valid for it. The header and the tensors come from one opened file, so a save that
    replaces ``path`` meanwhile is seen whole or not at all.

    ``mmap=True`` maps the file instead of reading it (less memory, faster start), but the
    model then reads the file on every lookup: if the file is truncated or overwritten in
    place while the model lives, the next lookup dies with SIGBUS (replacing it by rename,
    as ``save`` does, is safe). The default reads it into memory.

    ``shards`` loads tables by row range, as row-wise sharding (TorchRec's) places them:
    ``{"emb": (start, stop)}`` reads only what rows ``start:stop`` of table ``emb`` need,
    into a model whose module there has ``stop - start`` rows and takes local ids
    (``id - start``). What is read is validated as a table of those rows, but not
    CRC-checked (the CRC-32 covers whole tensors).
    """
    _check_model(model)
    for name, flag in (("mmap", mmap), ("verify", verify)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if device is not None:
        device = _checked_device(device)
    p = Path(path)
    ranges = _checked_shards(shards)
    built: dict[str, QuantizedTable] = {}
    index, tensors = _read(p, tensors=True, mmap=mmap, verify=verify, shards=ranges, built=built)
    places: list[tuple[nn.Module, str, nn.Module]] = []
    owned: set[str] = set()
    for name, entry in index["tables"].items():
        if name in built:
            table = built[name]
            check_fields(p, name, entry["table"], table)
            # the model holds the shard's rows, whose ids start at 0
            start, stop = (ranges or {})[name]
            entry = {**entry, "table": table.meta(), "module": _shard_module(entry["module"], start, stop)}
        else:
            table = build_table(p, name, entry, tensors)
            claim_tensors(p, name, table, owned)
        shard = (ranges or {}).get(name) if name in built else None
        resolved = [_resolve(model, p, name, place, entry, shard) for place in (name, *entry["aliases"])]
        # places whose modules take the same arguments share one module; a place whose own
        # module differs (another kind, mode or padding row over the same tied weight) gets
        # its own, on the same table
        made: dict[tuple[Any, ...], QuantizedEmbedding | QuantizedEmbeddingBag] = {}
        for parent, attr, current in resolved:
            module = _module_for(p, name, entry, table, current)
            kind = _module_key(module)
            if kind not in made:
                made[kind] = module if device is None else module.to(device)
            places.append((parent, attr, made[kind]))
    check_no_stray(p, tensors, owned)
    state = {k[len(STATE_PREFIX) :]: v for k, v in tensors.items() if k.startswith(STATE_PREFIX)}
    replaced = tuple(
        f"{place}." for name, entry in index["tables"].items() for place in (name, *entry["aliases"])
    )
    params = model.state_dict(keep_vars=True)  # Parameters themselves: tied ones are one object
    places, replaced = _retied(p, model, params, state, places, replaced)
    expected = {k: v for k, v in params.items() if not k.startswith(replaced)}
    missing = sorted(set(expected) - set(state) - _tied_to_loaded(params, state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise _fail(
            p, f"state does not match the model (missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise _fail(
                p,
                f"tensor {key!r} has shape {tuple(value.shape)}, the model's is {tuple(expected[key].shape)}",
            )
        if value.dtype != expected[key].dtype:
            raise _fail(p, f"tensor {key!r} has dtype {value.dtype}, the model's is {expected[key].dtype}")
    for parent, attr, replacement in places:
        setattr(parent, attr, replacement)
    model.load_state_dict(state, strict=False)
    return model
