"""Launching numba's parallel kernels (``embpress._parallel``): torch's thread count is the
user's before and after, and a failing kernel still puts it back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embpress._finite import count_nonfinite
from embpress._parallel import parallel_call


@pytest.mark.parametrize("threads", [1, 2])
def test_torch_thread_count_survives_a_launch(threads: int) -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        x = np.zeros((4096, 8), np.float32)
        x[3, 2] = np.nan
        assert parallel_call(count_nonfinite, x) == 1
        assert torch.get_num_threads() == threads
        with pytest.raises(Exception):  # noqa: B017 (numba's typing error for a bad argument)
            parallel_call(count_nonfinite, "not an array")
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_forked_child_of_an_openmp_parent_gets_a_clear_error() -> None:
    """GNU OpenMP does not survive a fork: numba stops a child that launches a kernel after
    its parent did. embpress raises RuntimeError in that child instead (and under the
    fork-safe layers, workqueue and TBB, the child's launch just works)."""
    import os

    import numba

    from embpress import _parallel

    x = np.zeros((4096, 8), np.float32)
    x[1, 1] = np.inf
    assert parallel_call(count_nonfinite, x) == 1  # the parent's threads have started
    pid = os.fork()
    if pid == 0:  # the child: report by exit status only
        code = 3
        try:
            code = 0 if parallel_call(count_nonfinite, x) == 1 else 4
        except RuntimeError as err:
            code = 7 if str(err) == _parallel.FORK_ERROR else 5
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), f"the child was stopped by signal {os.WTERMSIG(status)}"
    expected = 7 if numba.threading_layer() == "omp" else 0
    assert os.WEXITSTATUS(status) == expected


_SERVER = """
import os, sys, torch, embpress
from torch import nn
torch.set_num_threads(1)  # a worker pinned to one thread, as the README asks of forked ones
model = nn.Module()
model.bag = nn.EmbeddingBag(300, 32, mode="sum")
model = embpress.load(model, sys.argv[1])  # no kernel has run in this process yet
ids, offsets = torch.randint(0, 300, (400,)), torch.arange(0, 400, 10)
counts = []
for _ in range(3):
    model.bag(ids, offsets)
    counts.append(torch.get_num_threads())
print("threads", counts)
"""


@pytest.mark.parametrize("layout", ["block_sparse", "mixed"])
def test_a_first_lookup_keeps_a_process_on_its_torch_thread_count(tmp_path, layout) -> None:
    """A fresh process pinned to one torch thread whose first numba kernel is a lookup:
    starting numba's OpenMP pool set the OpenMP count torch shares to all cores (and a
    forked worker then hung in its next two-thread launch). It stays at one."""
    import subprocess
    import sys

    from torch import nn

    import embpress

    torch.manual_seed(0)
    model = nn.Module()
    model.bag = nn.EmbeddingBag(300, 32, mode="sum")
    if layout == "mixed":
        embpress.plan(model, 300 * 32 * 4 // 8).apply(model)
    else:
        embpress.post_training_sparse_quantize(
            model, embpress.DataNormSparsifier, quant=embpress.QuantConfig(layout=layout), sparsity_level=0.8
        )
    assert model.bag.layout == layout
    embpress.save(model, tmp_path / "m.safetensors")
    done = subprocess.run(
        [sys.executable, "-c", _SERVER, str(tmp_path / "m.safetensors")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "threads [1, 1, 1]" in done.stdout, done.stdout
