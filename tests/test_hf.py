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


def _bart(scale_embedding: bool):
    cfg = transformers.BartConfig(
        vocab_size=200,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        scale_embedding=scale_embedding,
    )
    torch.manual_seed(0)
    return transformers.BartForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("scale_embedding", [False, True])
def test_scaled_word_embeddings_are_replaced_with_their_scale(tmp_path, scale_embedding):
    """BART's token tables are ScaledWordEmbedding modules (nn.Embedding times embed_scale,
    sqrt(d_model) in mBART / M2M100 style configs): one compressed table for the shared,
    encoder and decoder ones, looking up what they looked up on its dequantized weight,
    scale included; its learned positions (a forward of their own) are left alone. A
    fresh BART loads the file with the scale; an embedding subclass with another forward
    refuses it instead of silently losing that forward."""
    model = _bart(scale_embedding)
    ids = torch.randint(0, 200, (2, 9))
    scale = model.model.encoder.embed_tokens.embed_scale
    with pytest.warns(UserWarning, match="embed_positions"):
        embpress.post_training_sparse_quantize(model, embpress.DataNormSparsifier, sparsity_level=0.5)
    enc = model.model.encoder.embed_tokens
    assert isinstance(enc, embpress.QuantizedEmbedding) and enc is model.model.shared
    assert enc.output_scale == pytest.approx(scale)
    torch.testing.assert_close(enc(ids), torch.nn.functional.embedding(ids, enc.dequantize()) * scale)
    assert type(model.model.encoder.embed_positions) is not embpress.QuantizedEmbedding
    path = tmp_path / "bart.safetensors"
    embpress.save(model, path)
    fresh = embpress.load(_bart(scale_embedding), path)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids, decoder_input_ids=ids).logits,
                           model(input_ids=ids, decoder_input_ids=ids).logits)  # fmt: skip

    class Shifted(torch.nn.Embedding):
        def forward(self, input_ids):
            return super().forward(input_ids + 1)

    other = _bart(scale_embedding)
    other.model.shared = Shifted(200, 32, padding_idx=1)
    with pytest.raises(embpress.FormatError, match="has its own forward"):
        embpress.load(other, path)
    assert type(other.model.shared) is Shifted


def test_gemma3_scaled_embedding_in_bfloat16():
    """Gemma 3 scales its token lookup by embed_scale cast to the weight's dtype: the
    compressed module does the same, in bfloat16."""
    cfg = transformers.Gemma3TextConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).eval().to(torch.bfloat16)
    ids = torch.randint(0, 256, (2, 7))
    table = model.model.embed_tokens
    scale = float(table.embed_scale.to(torch.bfloat16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        embpress.post_training_sparse_quantize(model, embpress.DataNormSparsifier, sparsity_level=0.0)
    q = model.model.embed_tokens
    assert isinstance(q, embpress.QuantizedEmbedding) and q.output_scale == scale
    out = q(ids)
    assert out.dtype == torch.bfloat16
    want = torch.nn.functional.embedding(ids, q.dequantize()).to(torch.bfloat16) * table.embed_scale.to(
        torch.bfloat16
    )
    torch.testing.assert_close(out, want)  # float32 lookups may differ in the last bit
    with torch.no_grad():
        assert model(ids).logits.dtype == torch.bfloat16


def test_generate_keeps_its_tokens_and_resizing_says_what_to_do():
    """A compressed GPT-2 generates the float model's tokens (8 bits, nothing pruned, greedy),
    and resizing its embeddings, which reads a float ``weight``, says what to do instead."""
    cfg = transformers.GPT2Config(vocab_size=500, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(3, 100, (1, 8))
    before = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        embpress.post_training_sparse_quantize(
            model, embpress.DataNormSparsifier, sparsity_level=0.0, quant=embpress.QuantConfig(bits=8)
        )
        after = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert torch.equal(after, before)
    with pytest.raises(AttributeError, match=r"compressed table, not a float 'weight'.*before compressing"):
        model.resize_token_embeddings(508)
    assert not hasattr(model.transformer.wte, "weight")


def test_a_save_pretrained_folder_keeps_the_token_table_its_head_is_tied_to(tmp_path):
    """save_pretrained writes GPT-2's tied head once, as transformer.wte.weight; only
    config.json says the head computes with it. Compressing the folder's file leaves that
    table float (with a warning) so that the result loads into GPT2LMHeadModel again."""
    cfg = transformers.GPT2Config(vocab_size=500, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "gpt2.embp.safetensors"
    tied = r"transformer\.wte\.weight \(tied to the output head by .*config\.json"
    with pytest.warns(UserWarning, match=tied):
        result = embpress.compress_checkpoint(tmp_path / "gpt2" / "model.safetensors", out)
    assert result is not None and [t.name for t in result.tables] == ["transformer.wpe"]
    fresh = embpress.load(transformers.GPT2LMHeadModel(cfg).eval(), out)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    assert isinstance(fresh.transformer.wpe, embpress.QuantizedEmbedding)
    ids = torch.randint(0, 500, (2, 10))
    with torch.no_grad():
        assert torch.allclose(fresh(ids).logits, model(ids).logits, atol=0.05)
