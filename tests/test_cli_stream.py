"""`embpress compress` on a .safetensors input: read by memory map in row chunks, alone or
shared among torchrun's processes; the file is byte for byte the in-memory one, and a
failed or inconsistent run writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import embpress
from embpress.cli import cli

ARGS = ["--sparsity", "0.5", "--bits", "8"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    g = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "in.safetensors"
    save_file(
        {
            "user_emb.weight": torch.randn(70_000, 16, generator=g),  # several chunks at --memory 16MiB
            "item_emb.weight": torch.randn(3007, 24, generator=g).half(),
            "mlp.0.weight": torch.randn(8, 40, generator=g),
            "step": torch.tensor(3),
        },
        str(path),
    )
    return path


@pytest.fixture(scope="module")
def in_memory(checkpoint, tmp_path_factory) -> bytes:
    """The file the in-memory path writes (what every other way must write too)."""
    out = tmp_path_factory.mktemp("mem") / "out.safetensors"
    result = embpress.compress_state_dict(
        load_file(str(checkpoint)), sparsity=0.5, quant=embpress.QuantConfig(bits=8)
    )
    result.save(out)
    return out.read_bytes()


def test_streamed_file_is_the_in_memory_file(checkpoint, in_memory, tmp_path) -> None:
    out = tmp_path / "out.safetensors"
    got = CliRunner().invoke(cli, ["compress", str(checkpoint), str(out), *ARGS, "--memory", "16MiB"])
    assert got.exit_code == 0, got.output
    assert out.read_bytes() == in_memory


def test_memory_option_is_checked(checkpoint, tmp_path) -> None:
    got = CliRunner().invoke(cli, ["compress", str(checkpoint), str(tmp_path / "o"), "--memory", "1/2"])
    assert got.exit_code == 2 and "is not a size" in got.output
    got = CliRunner().invoke(cli, ["compress", str(checkpoint), str(tmp_path / "o"), "--memory", "1MB"])
    assert got.exit_code != 0 and "at least 16 MiB" in got.output
    assert not (tmp_path / "o").exists()


def test_a_row_the_codes_cannot_hold_is_named_by_its_table_on_both_paths(tmp_path) -> None:
    """A value too large for a row's float16 scale: the row-chunk path (.safetensors) names
    the table and its rows, as the in-memory path (.pt) names the table."""
    tables = {"a_emb.weight": torch.randn(40, 8), "b_emb.weight": torch.randn(30, 8)}
    tables["b_emb.weight"][7, 0] = 1e30
    save_file(tables, str(tmp_path / "in.safetensors"))
    torch.save(tables, tmp_path / "in.pt")
    for name, where in (("in.safetensors", "table 'b_emb' rows 0:30: "), ("in.pt", "table 'b_emb': ")):
        got = CliRunner().invoke(cli, ["compress", str(tmp_path / name), str(tmp_path / "o.safetensors")])
        assert got.exit_code == 1
        assert f"{name}: {where}row scale or offset does not fit in torch.float16" in got.output
        assert not (tmp_path / "o.safetensors").exists()


def torchrun(
    nproc: int, checkpoint: Path, out: Path, hook: str | None = None, tmp: Path | None = None, extra=()
):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if hook is not None and tmp is not None:  # code every process runs at start-up
        (tmp / "sitecustomize.py").write_text(textwrap.dedent(hook))
        env["PYTHONPATH"] = os.pathsep.join([str(tmp), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command += ["-m", "embpress", "compress", str(checkpoint), str(out), *ARGS, *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


NO_GATHERING = """
    import atexit, os, pathlib
    import torch.distributed as dist
    import embpress.distributed as d
    def gather(*args, **kwargs):
        raise AssertionError("a part was gathered")
    d.gather_table = gather
    def left():  # runs after the CLI's own exit handlers (registered first, so called last)
        if not dist.is_initialized():
            (pathlib.Path(__file__).parent / ("left-" + os.environ["RANK"])).touch()
    atexit.register(left)
"""


@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_writes_the_one_process_file(checkpoint, in_memory, tmp_path, nproc) -> None:
    """Each process writes its own rows into the one file; no part travels to rank 0."""
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"the previous OUT")
    done = torchrun(nproc, checkpoint, out, NO_GATHERING, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.read_bytes() == in_memory
    # each process destroyed its gloo group before exit (one left to the interpreter's
    # teardown can abort the process: "terminate called without an active exception")
    assert sorted(p.name for p in tmp_path.glob("left-*")) == [f"left-{r}" for r in range(nproc)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.safetensors")]


NO_WRITING_IN_PLACE = """
    import embpress.assemble as a
    def write(*args, **kwargs):
        raise AssertionError("a part was written in place")
    a._write_pieces = write
"""


def test_torchrun_gather_writes_the_one_process_file(checkpoint, in_memory, tmp_path) -> None:
    """--gather (no filesystem shared by the hosts): the parts travel to rank 0, which writes OUT."""
    out = tmp_path / "out.safetensors"
    done = torchrun(2, checkpoint, out, NO_WRITING_IN_PLACE, tmp_path, extra=["--gather"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.read_bytes() == in_memory


KILL_RANK_1 = """
    import os, signal
    if os.environ.get("RANK") == "1":
        import embpress.assemble as a
        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        a._write_pieces = die  # once rank 0 has made its temp file
"""


def test_killed_rank_writes_nothing_and_a_rerun_succeeds(checkpoint, in_memory, tmp_path) -> None:
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"the previous OUT")
    done = torchrun(2, checkpoint, out, KILL_RANK_1, tmp_path)
    assert done.returncode != 0
    assert out.read_bytes() == b"the previous OUT"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.safetensors")]  # no temp file
    log = done.stdout + done.stderr
    assert "rank" in log and ("SIGKILL" in log or "-9" in log), log[-3000:]
    (tmp_path / "sitecustomize.py").unlink()
    again = torchrun(2, checkpoint, out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert out.read_bytes() == in_memory


ANOTHER_HOST_FOR_RANK_1 = """
    import os
    if os.environ.get("RANK") == "1":
        import embpress.assemble as a
        write = a._write_pieces
        a._write_pieces = lambda tmp, pieces: write(tmp + ".on-another-host", pieces)
"""


def test_out_not_shared_by_every_process_writes_nothing(checkpoint, tmp_path) -> None:
    """A process that cannot see rank 0's temp file (OUT not on a shared filesystem): every
    process stops, that one says why, and neither OUT nor a temp file is left."""
    out = tmp_path / "out.safetensors"
    done = torchrun(2, checkpoint, out, ANOTHER_HOST_FOR_RANK_1, tmp_path)
    assert done.returncode != 0
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.safetensors")]
    assert "rank 1: " in done.stderr and "must be on a filesystem every process shares" in done.stderr
    assert "another process could not write its part" in done.stderr  # rank 0's line


OTHER_BITS_ON_RANK_1 = """
    import os, sys
    if os.environ.get("RANK") == "1":
        sys.argv = [a if a != "8" else "4" for a in sys.argv]
"""


def test_processes_that_disagree_stop_before_work(checkpoint, tmp_path) -> None:
    out = tmp_path / "out.safetensors"
    done = torchrun(2, checkpoint, out, OTHER_BITS_ON_RANK_1, tmp_path)
    assert done.returncode != 0
    assert not out.exists()
    assert "processes disagree on IN, OUT and the options: rank(s) 1 differ from rank 0" in done.stderr


def test_inspect_system_says_which_kernel_path_runs() -> None:
    env = {**os.environ, "EMBPRESS_KERNEL": "generic"}
    done = subprocess.run(
        [sys.executable, "-m", "embpress", "inspect", "--system", "--json"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    import json

    info = json.loads(done.stdout)
    assert info["kernel_path"] == "generic" and info["kernel_path_source"] == "EMBPRESS_KERNEL=generic"
    assert "generic" in info["available_paths"]
    got = CliRunner().invoke(cli, ["inspect", "--system", "x.pt"])
    assert got.exit_code == 2 and "--system takes no FILE" in got.output


def test_torchrun_with_a_pt_input_says_it_needs_a_safetensors_one(tmp_path) -> None:
    """Several processes read IN in row chunks, which a torch.save checkpoint cannot be:
    said so, rather than that its (safetensors) header is too large."""
    src = tmp_path / "in.pt"
    torch.save({"user_emb.weight": torch.randn(3000, 16)}, src)
    out = tmp_path / "out.safetensors"
    done = torchrun(2, src, out)
    assert done.returncode != 0
    assert not out.exists()
    assert "in.pt: not a safetensors file" in done.stderr and "several processes" in done.stderr
    assert "header is too large" not in done.stderr


def test_the_file_does_not_depend_on_the_order_of_the_input_keys(checkpoint, in_memory, tmp_path) -> None:
    """A .pt checkpoint keeps its keys in the order they were saved, a .safetensors one
    sorts them: the same tensors give the same file either way."""
    state = load_file(str(checkpoint))
    reordered = dict(reversed(list(state.items())))
    assert list(reordered) != list(state)
    out = tmp_path / "out.safetensors"
    embpress.compress_state_dict(reordered, sparsity=0.5, quant=embpress.QuantConfig(bits=8)).save(out)
    assert out.read_bytes() == in_memory
    pt = tmp_path / "in.pt"
    torch.save(reordered, pt)
    got = CliRunner().invoke(cli, ["compress", str(pt), str(tmp_path / "cli.safetensors"), *ARGS])
    assert got.exit_code == 0, got.output
    assert (tmp_path / "cli.safetensors").read_bytes() == in_memory
