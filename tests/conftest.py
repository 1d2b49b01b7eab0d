"""Shared fixtures: small models shaped like the reference's unit test, and the reference itself."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import pytest
import torch
from hypothesis import settings
from torch import nn

# CI replays the same examples every run (a red CI must be reproducible); locally each run
# draws new ones, which is where new counterexamples are found.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (the kernels follow it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class RefScenarioModel(nn.Module):
    """The model of torch.ao's own post_training_sparse_quantize unit test."""

    def __init__(self) -> None:
        super().__init__()
        self.emb1 = nn.Embedding(100, 3)
        self.embbag1 = nn.EmbeddingBag(200, 32)
        self.emb_seq = nn.Sequential(nn.Embedding(150, 3), nn.EmbeddingBag(100, 3))
        self.linear1 = nn.Linear(32, 32)
        self.linear2 = nn.Linear(16, 16)


@pytest.fixture
def ref_model() -> RefScenarioModel:
    torch.manual_seed(0)
    return RefScenarioModel()


@pytest.fixture
def reference():
    """torch.ao's experimental implementation (tests only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier
        from torch.ao.pruning._experimental.data_sparsifier.quantization_utils import (
            post_training_sparse_quantize,
        )
    return post_training_sparse_quantize, DataNormSparsifier
