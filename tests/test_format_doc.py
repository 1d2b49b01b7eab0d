"""docs/format.md is enough to read a file: ``format_reader`` (written from the document,
importing nothing of embpress) decodes every registered layout, bit width, scale dtype
and mixed codec exactly as the module dequantizes it, and reads the file's tied state
as the document says."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from format_reader import LAYOUTS, decode
from torch import nn

import embpress
from embpress import QuantizedEmbeddingBag
from embpress.layouts import TABLE_CLASSES
from embpress.layouts.mixed import MixedTable
from embpress.quant.codecs import CODECS, Codec

SHAPES = [  # rows, columns, block, sparsity: partial edge blocks, 8/16/32-bit bitmap words
    (37, 30, (1, 4), 0.6),
    (300, 16, (1, 1), 0.5),
    (41, 70, (1, 2), 0.3),
    (130, 64, (4, 4), 0.7),
]


def _model(rows: int, dim: int, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    m = nn.Module()
    m.emb = nn.EmbeddingBag(rows, dim, mode="sum")
    m.tok = nn.Embedding(20, 8, padding_idx=3)
    m.head = nn.Linear(4, 2)
    with torch.no_grad():
        m.emb.weight.copy_(torch.randn(rows, dim, generator=g) * torch.rand(rows, 1, generator=g) * 3)
        m.emb.weight[::5] = 0  # whole rows pruned
    return m


def _assert_decodes(model: nn.Module, path) -> dict:
    index, tables = decode(str(path))
    modules = dict(model.named_modules())
    compressed = (embpress.QuantizedEmbedding, embpress.QuantizedEmbeddingBag)
    assert set(tables) == {n for n, m in modules.items() if isinstance(m, compressed)}
    for name, values in tables.items():
        expected = modules[name].dequantize().numpy()
        assert values.shape == expected.shape
        assert np.array_equal(values.view(np.uint32), expected.view(np.uint32)), name
    return index


def test_the_reader_knows_every_registered_layout():
    assert set(LAYOUTS) == set(TABLE_CLASSES)


@pytest.mark.parametrize(
    "layout, bits, scale_dtype, shape",
    list(itertools.product(sorted(TABLE_CLASSES), [8, 4, 2], [None, torch.float16], SHAPES)),
)
def test_uniform_tables_decode_as_documented(tmp_path, layout, bits, scale_dtype, shape):
    rows, dim, block, sparsity = shape
    model = _model(rows, dim, seed=rows + bits)
    quant = embpress.QuantConfig(bits=bits, scale_dtype=scale_dtype, layout=layout)
    embpress.post_training_sparse_quantize(
        model,
        embpress.DataNormSparsifier,
        select_embeddings=[model.emb],
        quant=quant,
        sparsity_level=sparsity,
        sparse_block_shape=block,
    )
    embpress.save(model, tmp_path / "m.safetensors")
    index = _assert_decodes(model, tmp_path / "m.safetensors")
    assert index["tables"]["emb"]["table"]["layout"] == layout


MIXES = [
    ["pruned", "rowwise8", "levels2", "colbook4"],
    ["levels1", "colbook1", "rowwise2", "colbook2"],
    ["rowwise4", "levels1"],
    ["colbook1"],
]


def test_the_mixes_hold_every_codec():
    assert {name for mix in MIXES for name in mix} == {c.name for c in CODECS}


@pytest.mark.parametrize("codecs", MIXES)
def test_mixed_tables_decode_as_documented(tmp_path, codecs):
    """Built with several classes at random (the uniform test above covers a mixed table's
    float32 scales: one rowwise class at 8 bits)."""
    g = torch.Generator().manual_seed(len(codecs))
    weight = torch.randn(700, 24, generator=g) * torch.rand(700, 1, generator=g) * 3
    classes = np.random.default_rng(len(codecs)).integers(0, len(codecs), 700)
    table = MixedTable.build(weight, classes, [Codec.parse(n) for n in codecs])
    model = nn.Sequential(QuantizedEmbeddingBag(table, mode="sum"))
    embpress.save(model, tmp_path / "m.safetensors")
    index = _assert_decodes(model, tmp_path / "m.safetensors")
    assert index["tables"]["0"]["table"]["codecs"] == ",".join(codecs)


def test_a_planned_mixed_table_decodes_as_documented(tmp_path):
    model = _model(700, 24, seed=1)
    budget = model.emb.weight.numel() * 4 // 10
    embpress.plan(model, budget_bytes=budget, select_embeddings=[model.emb]).apply(model)
    embpress.save(model, tmp_path / "m.safetensors")
    index = _assert_decodes(model, tmp_path / "m.safetensors")
    assert index["tables"]["emb"]["table"]["layout"] == "mixed"


def test_every_codec_is_decoded_by_the_reader():
    from format_reader import _CODECS

    assert set(_CODECS) == {c.name for c in CODECS}


def test_a_tied_state_tensor_is_written_once_under_its_first_key(tmp_path):
    model = _model(40, 8, seed=0)
    model.head2 = nn.Linear(4, 2)
    model.head2.weight = model.head.weight
    embpress.post_training_sparse_quantize(
        model, embpress.DataNormSparsifier, select_embeddings=[model.emb], sparsity_level=0.5
    )
    embpress.save(model, tmp_path / "m.safetensors")
    _assert_decodes(model, tmp_path / "m.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "state.head.weight" in keys and "state.head2.weight" not in keys
    assert "state.head2.bias" in keys
