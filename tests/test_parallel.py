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
