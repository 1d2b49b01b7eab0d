"""Hugging Face models (skipped where transformers is not installed; it is not a dependency)."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors import safe_open

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


def _tiny(name: str):
    """A small Hugging Face model of class ``name`` and what a compress of its
    save_pretrained folder leaves float (a token table its head is tied to, a position
    table with a forward of its own)."""
    t = transformers
    if name == "gpt2-square":  # as many positions as tokens: the row count alone cannot tell
        cfg = t.GPT2Config(vocab_size=64, n_positions=64, n_embd=16, n_layer=1, n_head=2)
        return t.GPT2LMHeadModel(cfg), {"transformer.wte.weight"}
    if name == "marian":  # a class name with no 'LM' or 'ForCausalLM' in it
        cfg = t.MarianConfig(
            vocab_size=60, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, pad_token_id=0,
            decoder_start_token_id=0, max_position_embeddings=32,
        )  # fmt: skip
        return t.MarianMTModel(cfg), {"model.shared.weight"}
    if name == "opt":  # learned positions with an offset: a forward of their own
        cfg = t.OPTConfig(
            vocab_size=60, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
            max_position_embeddings=20, word_embed_proj_dim=16,
        )  # fmt: skip
        return t.OPTForCausalLM(cfg), {
            "model.decoder.embed_tokens.weight",
            "model.decoder.embed_positions.weight",
        }
    cfg = t.ElectraConfig(  # "ForPreTraining" without a head tied to the token table
        vocab_size=60, embedding_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32,
    )  # fmt: skip
    return t.ElectraForPreTraining(cfg), set()


@pytest.mark.parametrize("name", ["gpt2-square", "marian", "opt", "electra"])
def test_a_model_folder_is_compressed_as_its_model_can_load_it(tmp_path, name):
    """With transformers installed, the model built from the folder's config (on the meta
    device) says which table its head is tied to and which modules a compressed one
    cannot replace: those stay float with a warning naming them, every other table is
    compressed, and the result loads into a model built from the same config (where
    nothing is left, the error says none was found)."""
    torch.manual_seed(0)
    model, float_kept = _tiny(name)
    model.eval().save_pretrained(tmp_path / "m")
    src = tmp_path / "m" / "model.safetensors"
    with safe_open(str(src), "pt") as f:
        assert float_kept <= set(f.keys())
    out = tmp_path / "out.safetensors"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = embpress.compress_checkpoint(src, out)
        except ValueError as err:
            assert "no embedding table found" in str(err) and name in ("marian", "opt")
            result = None
    if float_kept:
        assert any(
            "left float" in str(w.message) and all(k in str(w.message) for k in float_kept) for w in caught
        )
    if result is None:
        return
    compressed = {f"{t.name}.weight" for t in result.tables}
    assert compressed and not compressed & float_kept
    if name == "electra":  # its class name says "ForPreTraining", its head is not tied
        assert "electra.embeddings.word_embeddings.weight" in compressed
    fresh = type(model)(model.config).eval()
    embpress.load(fresh, out)
    for key in compressed:
        assert isinstance(fresh.get_submodule(key[: -len(".weight")]), embpress.QuantizedEmbedding)
