"""Hugging Face models (skipped where transformers is not installed; it is not a dependency)."""

from __future__ import annotations

import warnings

import pytest
import torch

import embpress

transformers = pytest.importorskip("transformers", reason="transformers is not installed")


def test_bert_embeddings_are_replaced_and_outputs_stay_close():
    cfg = transformers.BertConfig(
        vocab_size=500,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 500, (2, 12))
    with torch.no_grad():
        before = model(ids).last_hidden_state
    embpress.post_training_sparse_quantize(model, embpress.DataNormSparsifier, sparsity_level=0.0)
    assert isinstance(model.embeddings.word_embeddings, embpress.QuantizedEmbedding)
    with torch.no_grad():
        after = model(ids).last_hidden_state
    assert float((after - before).abs().max()) < 0.1


def test_gpt2_with_tied_head_round_trips_through_a_file(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=500, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        embpress.post_training_sparse_quantize(model, embpress.DataNormSparsifier, sparsity_level=0.5)
    path = tmp_path / "gpt2.safetensors"
    embpress.save(model, path)
    fresh = embpress.load(transformers.GPT2LMHeadModel(cfg).eval(), path)
    ids = torch.randint(0, 500, (2, 10))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
