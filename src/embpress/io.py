"""save / load: a compressed model as one .safetensors file (no pickle anywhere).

The format is written down in docs/format.md. In short: tensors ``tables.<fqn>.<buffer>``
for each compressed table and ``state.<key>`` for every other entry of the model's
state_dict; the safetensors metadata holds ``format = "embpress"``,
``format_version = "2"`` and a JSON ``index`` describing every table (module arguments,
layout fields, aliases) and the CRC-32 of every tensor. Every field is validated before a
tensor is trusted; the model is changed only after the whole file has been checked.
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .layouts import TABLE_CLASSES, FormatError, QuantizedTable
from .nn import QuantizedEmbedding, QuantizedEmbeddingBag, module_kwargs
from .report import quantized_modules

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "build_table",
    "load",
    "read_index",
    "read_tensors",
    "save",
    "write_file",
]

FORMAT_NAME = "embpress"
FORMAT_VERSION = "2"
TABLE_PREFIX = "tables."
STATE_PREFIX = "state."


def crc32(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes (C order)."""
    flat = t.detach().contiguous().reshape(-1).cpu()
    return zlib.crc32(flat.view(torch.uint8).numpy().data) if flat.numel() else 0


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


def write_file(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], index: dict[str, Any]) -> None:
    """Write tensors + index atomically: a temp file in the same folder, fsync, rename."""
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a directory")
    payload = _unshared(tensors)
    index = {**index, "crc32": {k: crc32(v) for k, v in payload.items()}}
    metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "index": json.dumps(index)}
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
    os.close(fd)
    try:
        save_file(payload, tmp, metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(model: nn.Module, path: str | os.PathLike[str], *, kind_from_model: bool = False) -> None:
    """Write every compressed table of ``model`` and the rest of its state_dict to ``path``.

    ``kind_from_model`` writes the tables with ``kind: "auto"`` and no module arguments:
    ``load`` then builds each one after the float module it replaces (Embedding or
    EmbeddingBag, its mode, padding_idx, max_norm...). For files made from a bare
    state_dict, which does not say what kind of module a table belongs to.
    """
    tables = quantized_modules(model)
    if not tables:
        raise ValueError("model has no QuantizedEmbedding / QuantizedEmbeddingBag to save")
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, Any] = {}
    prefixes: list[str] = []
    for name, (module, aliases) in tables.items():
        qm: Any = module
        kind = "EmbeddingBag" if isinstance(qm, QuantizedEmbeddingBag) else "Embedding"
        entries[name] = {
            "kind": "auto" if kind_from_model else kind,
            "aliases": aliases,
            "module": None if kind_from_model else module_kwargs(qm),
            "table": qm.table.meta(),
            "error": qm.error,
        }
        for buf, t in qm.table.tensors().items():
            tensors[f"{TABLE_PREFIX}{name}.{buf}"] = t
        prefixes.extend(f"{n}." for n in (name, *aliases))
    for key, value in model.state_dict().items():
        if not any(key.startswith(p) for p in prefixes):
            tensors[f"{STATE_PREFIX}{key}"] = value
    write_file(path, tensors, {"tables": entries})


# ---------------------------------------------------------------------------------- reading
def _fail(path: Path, what: str) -> FormatError:
    return FormatError(f"{path}: {what}")


def read_index(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated header of an embpress file: {"tables": ..., "crc32": ..., "format_version"}."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    if not p.is_file():
        raise FormatError(f"{p}: not a regular file")
    try:
        with safe_open(str(p), framework="pt") as f:
            metadata = f.metadata() or {}
            keys = set(f.keys())
    except (SafetensorError, OSError, ValueError) as err:
        raise _fail(p, f"not a readable safetensors file ({err})") from None
    if metadata.get("format") != FORMAT_NAME:
        raise _fail(p, "not an embpress file (no 'format: embpress' in its header)")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise _fail(p, f"unsupported format version {version!r} (this embpress reads {FORMAT_VERSION!r})")
    try:
        index = json.loads(metadata.get("index", ""))
    except json.JSONDecodeError as err:
        raise _fail(p, f"header index is not valid JSON ({err})") from None
    if (
        not isinstance(index, dict)
        or not isinstance(index.get("tables"), dict)
        or not isinstance(index.get("crc32"), dict)
    ):
        raise _fail(p, "header index must hold 'tables' and 'crc32' objects")
    if set(index["crc32"]) != keys:
        raise _fail(p, "the tensors in the file do not match the header's list")
    for name, entry in index["tables"].items():
        _check_entry(p, name, entry)
    index["format_version"] = version
    return index


def _check_entry(p: Path, name: str, entry: Any) -> None:
    where = f"table {name!r}"
    if not isinstance(entry, dict):
        raise _fail(p, f"{where}: entry must be an object")
    if entry.get("kind") not in ("Embedding", "EmbeddingBag", "auto"):
        raise _fail(p, f"{where}: kind must be Embedding, EmbeddingBag or auto, got {entry.get('kind')!r}")
    if not isinstance(entry.get("aliases"), list) or not all(isinstance(a, str) for a in entry["aliases"]):
        raise _fail(p, f"{where}: aliases must be a list of names")
    table, module = entry.get("table"), entry.get("module")
    if not isinstance(table, dict) or table.get("layout") not in TABLE_CLASSES:
        raise _fail(
            p, f"{where}: unknown layout {table.get('layout') if isinstance(table, dict) else None!r}"
        )
    if entry["kind"] == "auto":
        if module is not None:
            raise _fail(p, f"{where}: a table of kind auto takes its module arguments from the model")
        return
    if not isinstance(module, dict):
        raise _fail(p, f"{where}: module arguments must be an object")
    rows = table.get("num_embeddings")
    if not isinstance(rows, int):
        raise _fail(p, f"{where}: num_embeddings must be an integer")
    padding = module.get("padding_idx")
    if padding is not None and (not isinstance(padding, int) or not 0 <= padding < rows):
        raise _fail(p, f"{where}: padding_idx {padding!r} is out of range")
    if entry["kind"] == "EmbeddingBag" and module.get("mode") not in ("sum", "mean", "max"):
        raise _fail(p, f"{where}: mode must be sum, mean or max")


def read_tensors(
    p: Path, index: dict[str, Any], mmap: bool = True, verify: bool = True
) -> dict[str, torch.Tensor]:
    """Every tensor of the file, each CRC-checked against the index (``verify``)."""
    out = {}
    try:
        with safe_open(str(p), framework="pt", backend="mmap" if mmap else "pread") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                t = f.get_tensor(key)
                if verify and crc32(t) != index["crc32"][key]:
                    raise _fail(p, f"tensor {key!r} is corrupted (CRC-32 mismatch)")
                out[key] = t
    except (SafetensorError, OSError) as err:
        raise _fail(p, f"could not read tensors ({err})") from None
    return out


def build_table(
    p: Path, name: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> QuantizedTable:
    """The quantized table of one index entry, its tensors validated."""
    prefix = f"{TABLE_PREFIX}{name}."
    own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        return TABLE_CLASSES[entry["table"]["layout"]].from_tensors(entry["table"], own)
    except FormatError as err:
        raise _fail(p, f"table {name!r}: {err}") from None


def _module_for(
    p: Path, name: str, entry: dict[str, Any], table: QuantizedTable, target: nn.Module
) -> QuantizedEmbedding | QuantizedEmbeddingBag:
    """The quantized module of one entry; kind "auto" copies ``target``'s kind and arguments."""
    kind, kwargs = entry["kind"], entry["module"]
    if kind == "auto":
        bag = isinstance(target, (nn.EmbeddingBag, QuantizedEmbeddingBag))
        kind = "EmbeddingBag" if bag else "Embedding"
        keys: tuple[str, ...] = ("padding_idx", "max_norm", "norm_type")
        if bag:
            keys = (*keys, "mode", "include_last_offset")
        kwargs = {k: getattr(target, k) for k in keys}
        if kwargs["padding_idx"] is not None and not 0 <= kwargs["padding_idx"] < table.num_embeddings:
            raise _fail(p, f"table {name!r}: the model's padding_idx is out of range")
    module: QuantizedEmbedding | QuantizedEmbeddingBag
    try:
        if kind == "EmbeddingBag":
            module = QuantizedEmbeddingBag(table, **kwargs)
        else:
            module = QuantizedEmbedding(table, **kwargs)
    except (TypeError, ValueError) as err:
        raise _fail(p, f"table {name!r}: bad module arguments ({err})") from None
    module.error = entry.get("error")
    return module


def _resolve(
    model: nn.Module, p: Path, table: str, name: str, entry: dict[str, Any]
) -> tuple[nn.Module, str, nn.Module]:
    """(parent, attribute, current module) of ``name`` in ``model``, checked against the table."""
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
    rows, dim = getattr(current, "num_embeddings", None), getattr(current, "embedding_dim", None)
    meta = entry["table"]
    if (rows, dim) != (meta.get("num_embeddings"), meta.get("embedding_dim")):
        raise _fail(
            p,
            f"table {table!r}: the model's table is {rows} x {dim}, the file's is "
            f"{meta.get('num_embeddings')} x {meta.get('embedding_dim')}",
        )
    return parent, attr, current


def load(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    mmap: bool = True,
    verify: bool = True,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Put the tables (and other tensors) of ``path`` into ``model``; return ``model``.

    ``model`` is a freshly built model of the architecture that was saved: its float
    embeddings are replaced by the compressed ones, its other tensors loaded. ``mmap``
    maps the file instead of reading it; ``verify`` checks every tensor's CRC-32.
    Nothing in ``model`` changes unless the whole file is valid for it.
    """
    p = Path(path)
    index = read_index(p)
    tensors = read_tensors(p, index, mmap, verify)
    places: list[tuple[nn.Module, str, nn.Module]] = []
    for name, entry in index["tables"].items():
        table = build_table(p, name, entry, tensors)
        resolved = [_resolve(model, p, name, place, entry) for place in (name, *entry["aliases"])]
        module = _module_for(p, name, entry, table, resolved[0][2])
        if device is not None:
            module = module.to(device)
        places.extend((parent, attr, module) for parent, attr, _ in resolved)
    state = {k[len(STATE_PREFIX) :]: v for k, v in tensors.items() if k.startswith(STATE_PREFIX)}
    replaced = tuple(
        f"{place}." for name, entry in index["tables"].items() for place in (name, *entry["aliases"])
    )
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(replaced)}
    missing = sorted(set(expected) - set(state))
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
    for parent, attr, replacement in places:
        setattr(parent, attr, replacement)
    model.load_state_dict(state, strict=False)
    return model
