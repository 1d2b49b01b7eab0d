"""Several processes (torch.distributed, gloo) compress one table: the joined table is byte
for byte the one-process table, for any number of processes."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import embpress
from embpress import io as eio
from embpress.assemble import write_parts
from embpress.distributed import TorchCollective, gather_table, row_ranges
from embpress.streaming import compress_table

CASES = [
    # rows, dim, bits, layout, sparsify_first, sparsity, block
    (1500, 16, 8, "auto", True, 0.8, (1, 4)),
    (1300, 12, 4, "block_sparse", False, 0.5, (1, 4)),
    (1100, 8, 2, "pruned_rows", True, 0.6, (1, 8)),
    (900, 10, 8, "dense", True, 0.3, (2, 4)),
    (700, 16, 4, "auto", True, 0.5, (1, 3)),  # blocks mixing kept and pruned entries: width 1
    (200, 6, 8, "auto", True, 0.5, (1, 2)),  # fewer chunks than processes
]


def table(rows: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, dim, generator=g) * torch.rand(rows, 1, generator=g)
    w[::5] = w[3]  # many equal block norms: ties at the threshold cross process boundaries
    return w


def _worker(rank: int, size: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        collective = TorchCollective()
        results = []
        held, reference = [], nn.Module()
        for i, (rows, dim, bits, layout, first, sparsity, block) in enumerate(CASES):
            w = table(rows, dim, i)
            config = embpress.QuantConfig(bits=bits, layout=layout)
            sparse = {"sparsity_level": sparsity, "sparse_block_shape": block}
            step = 256 * (2 if block[0] == 2 else 1)
            lo, hi = row_ranges(rows, size, step)[rank]
            part, error = compress_table(
                w,
                config,
                sparsify_first=first,
                chunk_rows=step,
                row_range=(lo, hi),
                collective=collective,
                **sparse,
            )
            whole = gather_table(part)
            held.append((f"t{i}", [] if part is None else [part], error))
            if rank == 0:
                alone, alone_error = compress_table(
                    w, config, sparsify_first=first, chunk_rows=step, **sparse
                )
                same = type(whole) is type(alone) and whole.meta() == alone.meta()
                ta, tb = whole.tensors(), alone.tensors()
                same = same and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
                exact = error == alone_error  # the whole table's error, bit for bit
                results.append({"case": i, "same": same, "error_same": exact, "layout": whole.layout})
                module = embpress.QuantizedEmbedding(alone)
                module.error = alone_error
                setattr(reference, f"t{i}", module)
        # every layout, some processes without rows: written in place, the file io.save writes
        joined = write_parts(
            Path(out).with_name("parts.safetensors"), held, {"step": torch.tensor(3)}, collective
        )
        if rank == 0:
            reference.register_buffer("step", torch.tensor(3))
            eio.save(reference, Path(out).with_name("one.safetensors"), kind_from_model=True)
            tables = [reference.get_submodule(f"t{i}").table for i in range(len(CASES))]
            results.append({"metas": [meta for meta, _ in joined] == [t.meta() for t in tables]})
            Path(out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("size", [2, 3])
def test_processes_make_the_one_process_table(tmp_path, size) -> None:
    """Gathered, the parts are the one-process table; written in place (``write_parts``),
    the file is byte for byte the one ``io.save`` writes of the one-process tables."""
    out = tmp_path / "result.json"
    mp.start_processes(
        _worker, args=(size, f"file://{tmp_path / 'rendezvous'}", str(out)), nprocs=size, start_method="spawn"
    )
    results = json.loads(out.read_text())
    assert results.pop() == {"metas": True}
    assert (tmp_path / "parts.safetensors").read_bytes() == (tmp_path / "one.safetensors").read_bytes()
    assert len(results) == len(CASES)
    assert all(r["same"] for r in results), results
    assert all(r["error_same"] for r in results), results


def _worker_beside_nccl(rank: int, size: int, init: str, out: str) -> None:
    """A default group of another backend (NCCL on GPU hosts; its name stood in for here):
    the collective makes its own gloo group and the table is still the one-process one."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        real = dist.get_backend
        dist.get_backend = lambda group=None: "nccl" if group is None else real(group)
        collective = TorchCollective()
        dist.get_backend = real
        w = table(1300, 12, 7)
        config = embpress.QuantConfig(bits=4)
        lo, hi = row_ranges(1300, size, 256)[rank]
        part, error = compress_table(
            w, config, chunk_rows=256, row_range=(lo, hi), collective=collective, sparsity_level=0.6
        )
        whole = gather_table(part, group=collective.group)
        if rank == 0:
            alone, alone_error = compress_table(w, config, chunk_rows=256, sparsity_level=0.6)
            same = whole.meta() == alone.meta() and all(
                torch.equal(a, b)
                for a, b in zip(whole.tensors().values(), alone.tensors().values(), strict=True)
            )
            own = collective.group is not None and dist.get_backend(collective.group) == "gloo"
            Path(out).write_text(
                json.dumps({"same": same, "error_same": error == alone_error, "own_gloo_group": own})
            )
    finally:
        dist.destroy_process_group()


def test_a_default_group_of_another_backend_gets_a_gloo_group(tmp_path) -> None:
    out = tmp_path / "result.json"
    mp.start_processes(
        _worker_beside_nccl,
        args=(2, f"file://{tmp_path / 'rendezvous'}", str(out)),
        nprocs=2,
        start_method="spawn",
    )
    assert json.loads(out.read_text()) == {"same": True, "error_same": True, "own_gloo_group": True}


def test_row_ranges_tile_the_table() -> None:
    for rows in (1, 255, 256, 1000, 4097):
        for size in (1, 2, 3, 5):
            ranges = row_ranges(rows, size, 256)
            assert len(ranges) == size and ranges[0][0] == 0 and ranges[-1][1] == rows
            for (a, b), (c, _) in itertools.pairwise(ranges):
                assert b == c and a <= b and (b % 256 == 0 or b == rows)
    with pytest.raises(ValueError):
        row_ranges(10, 0, 256)


def _worker_sub_group(rank: int, size: int, init: str, d: str) -> None:
    """Ranks 1 and 2 share a table over their own group (group ranks 0 and 1), rank 0 does
    other work: the parts are gathered over that group, on its rank 0 (global rank 1), and
    written in place by both."""
    import datetime

    from embpress.streaming import compress_safetensors

    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=size, timeout=datetime.timedelta(seconds=30)
    )
    try:
        sub = dist.new_group([1, 2], backend="gloo")
        if rank != 0:
            collective = TorchCollective(sub)
            result = compress_safetensors(
                Path(d) / "in.safetensors",
                quant=embpress.QuantConfig(bits=4),
                sparsity=0.5,
                chunk_bytes=1,
                collective=collective,
            )
            assert (result is None) == (rank == 2)
            if result is not None:
                result.save(Path(d) / "gathered.safetensors")
            # and written in place by both (the header from group rank 0, the CRCs passed on)
            compress_safetensors(
                Path(d) / "in.safetensors",
                quant=embpress.QuantConfig(bits=4),
                sparsity=0.5,
                chunk_bytes=1,
                collective=collective,
                out=Path(d) / "in_place.safetensors",
            )
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_gathering_goes_over_the_collective_s_group(tmp_path) -> None:
    from safetensors.torch import save_file

    w = {"emb.weight": table(1000, 8, 9), "head.weight": torch.randn(2, 2)}
    save_file(w, str(tmp_path / "in.safetensors"))
    mp.start_processes(
        _worker_sub_group,
        args=(3, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)),
        nprocs=3,
        start_method="spawn",
    )
    embpress.compress_state_dict(w, sparsity=0.5, quant=embpress.QuantConfig(bits=4)).save(
        tmp_path / "one.safetensors"
    )
    one = (tmp_path / "one.safetensors").read_bytes()
    assert (tmp_path / "gathered.safetensors").read_bytes() == one
    assert (tmp_path / "in_place.safetensors").read_bytes() == one
