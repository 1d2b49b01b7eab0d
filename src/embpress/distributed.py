"""Several processes compress one table together (``torch.distributed``: gloo on CPU).

Each process takes a contiguous range of rows (``row_ranges``), and ``compress_table``
(``streaming.py``) runs on it with a ``TorchCollective``: the histograms of the block
norms, the mask statistics and the error sums are all-reduced, so every process finds the
same threshold and layout without gathering any norm. ``gather_table`` then hands every
part to one process, which joins them in rank order (``concat_rows``): byte for byte the
table one process makes. Parts travel as a JSON header (the part's ``part_summary``: meta,
each buffer's dtype and shape) plus raw tensor bytes, never as pickles, and each is
validated (``from_tensors``) before it is joined.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .layouts.base import BUFFER_DTYPES, FormatError, QuantizedTable
from .layouts.registry import table_class

__all__ = ["TorchCollective", "check_same", "from_environment", "gather_table", "leave", "row_ranges"]


class TorchCollective:
    """The reductions ``streaming.compress_table`` needs, over a ``torch.distributed`` group
    (the default one unless given); the process group must be initialised.

    What travels is small and on the CPU (histograms, counts, sizes, JSON), so it goes
    through gloo: where ``group`` has another backend (NCCL, on GPU hosts), a gloo group of
    the same processes is made for it, as TorchRec does for its CPU-side metadata. Every
    process of the default group must then construct a TorchCollective (``new_group`` is
    collective).
    """

    def __init__(self, group: Any = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised (call init_process_group first)")
        if str(dist.get_backend(group)).lower() != "gloo":
            ranks = dist.get_process_group_ranks(group) if group is not None else None
            group = dist.new_group(ranks, backend="gloo")
        self.group = group
        self.made_group = False  # whether from_environment initialised the default group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def sum(self, values: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.array(values, copy=True))
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t.numpy()

    def before(self, value: int) -> int:
        t = torch.zeros(self.size, dtype=torch.int64)
        t[self.rank] = int(value)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return int(t[: self.rank].sum())

    def max(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return float(t[0])


def row_ranges(rows: int, processes: int, step: int) -> list[tuple[int, int]]:
    """Contiguous row ranges, one per process in rank order, each a multiple of ``step``
    rows but the last (some may be empty when the table is small)."""
    if processes < 1 or step < 1:
        raise ValueError(f"need processes >= 1 and step >= 1, got {processes}, {step}")
    chunks = -(-rows // step)
    per = -(-chunks // processes) * step
    return [(min(r * per, rows), min((r + 1) * per, rows)) for r in range(processes)]


def _send_bytes(data: bytes, dst: int, group: Any) -> None:
    dist.send(torch.tensor([len(data)], dtype=torch.int64), dst, group=group)
    if data:
        dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), dst, group=group)


def _recv_bytes(src: int, group: Any, limit: int = 1 << 24) -> bytes:
    size = torch.zeros(1, dtype=torch.int64)
    dist.recv(size, src, group=group)
    n = int(size[0])
    if not 0 <= n <= limit:
        raise FormatError(f"rank {src} announced a header of {n} bytes")
    buf = torch.empty(n, dtype=torch.uint8)
    if n:
        dist.recv(buf, src, group=group)
    return buf.numpy().tobytes()


def _send_table(table: QuantizedTable | None, dst: int, group: Any) -> None:
    if table is None:
        _send_bytes(json.dumps({"empty": True}).encode(), dst, group)
        return
    tensors = {name: t.detach().cpu().contiguous() for name, t in table.tensors().items()}
    _send_bytes(json.dumps(table.part_summary()).encode(), dst, group)
    for t in tensors.values():
        if t.numel():
            dist.send(t.view(-1).view(torch.uint8), dst, group=group)


def _recv_table(src: int, group: Any) -> QuantizedTable | None:
    header = json.loads(_recv_bytes(src, group))
    if header.get("empty"):
        return None
    tensors = {}
    for name, (dtype_name, shape) in header["buffers"].items():
        dtype = BUFFER_DTYPES.get(dtype_name)
        if dtype is None or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise FormatError(f"rank {src} sent tensor {name!r} as {dtype_name} {shape}")
        t = torch.empty(shape, dtype=dtype)
        if t.numel():
            dist.recv(t.view(-1).view(torch.uint8), src, group=group)
        tensors[name] = t
    meta = header["meta"]
    return table_class(meta.get("layout")).from_tensors(meta, tensors)


def global_rank(group: Any, rank: int) -> int:
    """The default group's rank of ``group``'s process ``rank``: what ``send`` / ``recv``
    take as peer, whatever group they are given."""
    return rank if group is None else dist.get_global_rank(group, rank)


def gather_table(part: QuantizedTable | None, dst: int = 0, group: Any = None) -> QuantizedTable | None:
    """Every process's part of one table, joined in rank order on ``dst`` (None elsewhere);
    ``dst`` and the order are ranks within ``group`` (default: the default group)."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    if rank != dst:
        _send_table(part, global_rank(group, dst), group)
        return None
    parts = [part if r == dst else _recv_table(global_rank(group, r), group) for r in range(size)]
    present = [p for p in parts if p is not None]
    if not present:
        raise ValueError("no process holds rows of this table")
    return present[0] if len(present) == 1 else type(present[0]).concat_rows(present)


def from_environment(timeout_s: float = 300.0) -> TorchCollective | None:
    """The collective of the processes ``torchrun`` started (gloo; its ``RANK`` /
    ``WORLD_SIZE`` / ``MASTER_*`` variables), or None when this process runs alone."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return None
    made = not dist.is_initialized()
    if made:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    collective = TorchCollective()
    collective.made_group = made
    return collective


def leave(collective: TorchCollective | None) -> None:
    """Destroy the process group ``from_environment`` made (one it found is the caller's).

    A gloo group left to the interpreter's exit can abort the process ("terminate called
    without an active exception") when its worker threads outlive the interpreter."""
    if collective is not None and collective.made_group and dist.is_initialized():
        dist.destroy_process_group()


def check_same(collective: TorchCollective, what: str, fingerprint: bytes) -> None:
    """ValueError on every process unless all passed the same ``fingerprint`` (a digest of
    their inputs and options): processes that disagree must not start any work."""
    digest = hashlib.sha256(fingerprint).digest()
    mine = torch.frombuffer(bytearray(digest), dtype=torch.uint8)
    every = [torch.empty_like(mine) for _ in range(collective.size)]
    dist.all_gather(every, mine, group=collective.group)
    differ = [r for r, d in enumerate(every) if not torch.equal(d, every[0])]
    if differ:
        ranks = ", ".join(str(r) for r in differ)
        raise ValueError(f"processes disagree on {what}: rank(s) {ranks} differ from rank 0")
