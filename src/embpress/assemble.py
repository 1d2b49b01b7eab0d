"""One embpress file written from tables held in parts, without joining them anywhere.

A table compressed in row chunks, or by several processes, exists as parts (each a table
of consecutive rows). Joining them (``concat_rows``) holds the output twice and, across
processes, sends it to one of them. ``write_parts`` instead writes every part's pieces of
the joined buffers straight into the file, where the layout says they go
(``QuantizedTable.part_summary`` / ``joined_layout`` / ``join_pieces``), under the header
``io.safetensors_layout`` computes from dtypes and shapes alone: byte for byte the file
``io.save`` writes of the joined tables. With several processes the parts exchange only
their summaries (JSON, no pickle), the CRC-32 of each buffer is chained through the
processes in the buffer's order, and each process ``pwrite``s its own pieces into one
temp file on a filesystem they all share.
"""

from __future__ import annotations

import errno
import json
import math
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ._collective import Collective
from .io import raw_bytes as _raw
from .layouts.base import Piece, QuantizedTable, Spec
from .layouts.registry import table_class

__all__ = ["write_parts"]

# (name, this process's parts in row order, the whole table's error)
HeldTable = tuple[str, Sequence[QuantizedTable], dict[str, float]]


def _group(collective: Collective) -> Any:
    return getattr(collective, "group", None)


def _all_gather_bytes(data: bytes, collective: Collective) -> list[bytes]:
    """Every process's ``data``, in rank order (lengths first, then the padded bytes)."""
    if collective.size == 1:
        return [data]
    import torch.distributed as dist

    group = _group(collective)
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(collective.size)]
    dist.all_gather(lengths, torch.tensor([len(data)], dtype=torch.int64), group=group)
    mine = torch.zeros(max(1, *(int(n[0]) for n in lengths)), dtype=torch.uint8)
    if data:
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    every = [torch.empty_like(mine) for _ in range(collective.size)]
    dist.all_gather(every, mine, group=group)
    return [t[: int(n[0])].numpy().tobytes() for t, n in zip(every, lengths, strict=True)]


def _broadcast_bytes(data: bytes, collective: Collective) -> bytes:
    """``data`` of rank 0 on every process."""
    if collective.size == 1:
        return data
    import torch.distributed as dist

    from .distributed import global_rank

    group = _group(collective)
    first = global_rank(group, 0)  # torch names the source by its rank in the default group
    n = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(n, first, group=group)
    buf = torch.empty(int(n[0]), dtype=torch.uint8)
    if collective.rank == 0 and data:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if int(n[0]):
        dist.broadcast(buf, first, group=group)
    return buf.numpy().tobytes()


def _all_min(value: int, collective: Collective) -> int:
    if collective.size == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_group(collective))
    return int(t[0])


def _pass_value(value: int, src: int, dst: int, collective: Collective) -> int:
    """``value`` handed from process ``src`` to ``dst`` (no message when they are one)."""
    if src == dst or collective.rank not in (src, dst):
        return value
    import torch.distributed as dist

    from .distributed import global_rank

    group = _group(collective)
    t = torch.tensor([value], dtype=torch.int64)
    if collective.rank == src:  # send / recv name the peer by its rank in the default group
        dist.send(t, global_rank(group, dst), group=group)
    else:
        dist.recv(t, global_rank(group, src), group=group)
    return int(t[0])


def _chained_crc32(
    rows: dict[str, int],
    mine: dict[str, list[Piece]],
    placed: list[dict[str, list[list[int]]]],
    collective: Collective,
) -> dict[str, int]:
    """CRC-32 of every joined buffer (``rows``: its length), piece by piece in the buffer's
    order: the running value passes from the process holding one piece to the one
    holding the next (``zlib.crc32`` continues from a value). ``placed[r][key]``: where
    process r's pieces of ``key`` start and how long they are. Exact on rank 0."""
    out = {}
    for key, length in rows.items():
        order = sorted(
            (start, n, r, i)
            for r in range(collective.size)
            for i, (start, n) in enumerate(placed[r].get(key, []))
        )
        at = 0
        for start, n, _, _ in order:  # the same check on every process: all stop, or none
            if start != at:
                raise ValueError(f"the parts of {key!r} do not tile it (a gap or an overlap at row {at})")
            at += n
        if at != length:
            raise ValueError(f"the parts of {key!r} cover {at} of its {length} rows")
        value, holder = 0, 0
        for _, n, r, i in order:
            if n:
                value, holder = _pass_value(value, holder, r, collective), r
                if collective.rank == r:
                    value = zlib.crc32(_raw(mine[key][i].data), value)
        out[key] = _pass_value(value, holder, 0, collective)
    return out


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _write_pieces(tmp: str, pieces: list[tuple[int, Piece]]) -> None:
    """This process's pieces into the pre-sized file ``tmp``, each at its byte offset."""
    try:
        fd = os.open(tmp, os.O_WRONLY)
    except FileNotFoundError:
        raise FileNotFoundError(
            errno.ENOENT,
            "rank 0's temp file is not visible here: OUT must be on a filesystem every process shares",
        ) from None
    try:
        for offset, piece in pieces:
            _pwrite_all(fd, _raw(piece.data), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_parts(
    path: str | os.PathLike[str],
    tables: Sequence[HeldTable],
    state: dict[str, torch.Tensor],
    collective: Collective,
) -> list[tuple[dict[str, Any], dict[str, Spec]]]:
    """Write the embpress file of tables held in parts, byte for byte the file ``io.save``
    writes of the joined tables (kind "auto"), without joining them.

    ``tables``: (name, this process's parts in row order, the whole table's error) in the
    model's order, the same names on every process; a table's parts are those of rank 0,
    then rank 1, ... ``state``: the other tensors in state_dict order (read on rank 0).
    Rank 0 writes the header and ``state`` into a temp file beside ``path``, sized whole;
    each process writes its pieces there and syncs; rank 0 renames it to ``path`` once
    all have. A failure anywhere leaves ``path`` as it was and no temp file. Returns each
    table's joined meta and buffers (dtype, shape), on every process.
    """
    from . import io as eio

    target, me = Path(path), collective.rank
    ours = [[p.part_summary() for p in parts] for _, parts, _ in tables]
    every = [json.loads(b) for b in _all_gather_bytes(json.dumps(ours).encode(), collective)]
    joined: list[tuple[dict[str, Any], dict[str, Spec]]] = []
    mine: dict[str, list[Piece]] = {}
    specs_of: dict[str, Spec] = {}  # every joined buffer by its key in the file
    for t, (name, parts, _) in enumerate(tables):
        summaries = [s for r in range(collective.size) for s in every[r][t]]
        if not summaries:
            raise ValueError(f"no process holds rows of table {name!r}")
        meta, specs = table_class(summaries[0]["meta"].get("layout")).joined_layout(summaries)
        joined.append((meta, specs))
        specs_of.update({f"{eio.TABLE_PREFIX}{name}.{b}": spec for b, spec in specs.items()})
        first = sum(len(every[r][t]) for r in range(me))  # this process's first part, in all
        for i, part in enumerate(parts):
            for piece in part.join_pieces(first + i, summaries):
                mine.setdefault(f"{eio.TABLE_PREFIX}{name}.{piece.name}", []).append(piece)
    placed_mine = {k: [[p.start, int(p.data.shape[0])] for p in ps] for k, ps in mine.items()}
    placed = [json.loads(b) for b in _all_gather_bytes(json.dumps(placed_mine).encode(), collective)]
    crcs = _chained_crc32({k: shape[0] for k, (_, shape) in specs_of.items()}, mine, placed, collective)

    # rank 0 lays out the file and writes all but the parts; the others learn where
    # their pieces go, or that rank 0 could not start (then every process stops)
    tmp, plan, failure = "", b"", None
    if me == 0:
        try:
            tmp, starts = _start_file(target, tables, joined, specs_of, state, crcs)
            plan = json.dumps({"tmp": tmp, "starts": {k: starts[k] for k in specs_of}}).encode()
        except Exception as err:  # the others are told first
            failure = err
    try:
        got = json.loads(_broadcast_bytes(plan, collective) or b"null")
        if failure is not None:
            raise failure
        if got is None:
            raise RuntimeError(f"rank 0 could not start writing {target}")
        tmp, starts = got["tmp"], got["starts"]
        at: list[tuple[int, Piece]] = []
        for key, pieces in mine.items():
            dtype, shape = specs_of[key]
            row_bytes = math.prod(shape[1:]) * dtype.itemsize
            at.extend((int(starts[key]) + p.start * row_bytes, p) for p in pieces)
        try:
            _write_pieces(tmp, at)
        except OSError as err:
            failure = err
        everyone = _all_min(0 if failure else 1, collective)
        if failure is not None:
            raise failure
        if not everyone:
            raise RuntimeError(f"another process could not write its part of {target}")
        renamed = 1
        if me == 0:
            try:
                os.replace(tmp, target)
            except OSError:
                renamed = 0
                raise
            finally:
                _all_min(renamed, collective)
        elif not _all_min(renamed, collective):
            raise RuntimeError(f"rank 0 could not rename its temp file to {target}")
    except BaseException:
        if me == 0 and tmp:
            Path(tmp).unlink(missing_ok=True)
        raise
    return joined


def _start_file(
    target: Path,
    tables: Sequence[HeldTable],
    joined: list[tuple[dict[str, Any], dict[str, Spec]]],
    table_specs: dict[str, Spec],
    state: dict[str, torch.Tensor],
    crcs: dict[str, int],
) -> tuple[str, dict[str, int]]:
    """Rank 0: the temp file beside ``target``, sized whole, holding the header (the index
    with every CRC) and ``state``; and where each tensor's data starts. ``table_specs``:
    the tables' joined buffers by their keys in the file."""
    from . import io as eio

    entries = {}
    for (name, _, error), (meta, _) in zip(tables, joined, strict=True):
        entries[name] = eio.table_entry(meta, error, [], None)
        eio.check_entry(target, name, entries[name])
    specs_all = dict(table_specs)
    copied = {f"{eio.STATE_PREFIX}{k}": v.detach().cpu().contiguous() for k, v in state.items()}
    specs_all.update({k: (v.dtype, tuple(v.shape)) for k, v in copied.items()})
    crcs = {**crcs, **{k: eio.crc32(v) for k, v in copied.items()}}
    index = {"tables": entries, "crc32": {k: crcs[k] for k in specs_all}}
    head, starts = eio.safetensors_layout(specs_all, eio.file_metadata(index))
    end = max(
        (starts[k] + math.prod(shape) * dtype.itemsize for k, (dtype, shape) in specs_all.items()),
        default=len(head),
    )
    tmp = eio.temp_file_for(target)
    try:
        fd = os.open(tmp, os.O_WRONLY)
        try:
            os.ftruncate(fd, end)
            _pwrite_all(fd, memoryview(head), 0)
            for key, value in copied.items():
                _pwrite_all(fd, _raw(value), starts[key])
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp, starts
