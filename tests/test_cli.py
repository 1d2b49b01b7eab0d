"""The ``embpress`` command: compress / inspect / demo, and every user error as one line."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import save_file
from torch import nn

import embpress
import embpress.checkpoint as embpress_checkpoint
import embpress.cli as embpress_cli
from embpress import DataNormSparsifier, FormatError, QuantConfig, post_training_sparse_quantize
from embpress.checkpoint import find_tables, looks_like_embedding
from embpress.cli import cli
from embpress.demo import DemoSettings, binary_auc, run_demo

_SCRIPT = Path(sys.executable).with_name("embpress")
EMBPRESS = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "embpress.cli"]


class TwoTables(nn.Module):
    """An nn.Embedding, an nn.EmbeddingBag (sum) and a linear layer on their outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(300, 16)
        self.emb_bag = nn.EmbeddingBag(200, 8, mode="sum")
        self.fc = nn.Linear(24, 3)

    def forward(self, ids: torch.Tensor, bags: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.emb(ids), self.emb_bag(bags)], dim=1))


def _weights() -> dict[str, torch.Tensor]:
    """Fixed weights; table entries are at least 0.5 away from 0, so only pruning makes exact zeros."""
    torch.manual_seed(0)
    model = TwoTables()
    with torch.no_grad():
        for table in (model.emb, model.emb_bag):
            w = table.weight
            w.copy_(torch.sign(torch.randn_like(w)) * (0.5 + torch.rand_like(w)))
    return {k: v.clone() for k, v in model.state_dict().items()}


def _fresh(state: dict[str, torch.Tensor] | None = None) -> TwoTables:
    torch.manual_seed(123)  # different init: everything must come from the file
    model = TwoTables()
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    torch.save(_weights(), path)
    return path


def _run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ------------------------------------------------------------------------------ compress
@pytest.mark.parametrize(
    ("bits", "order", "block", "sparsity"),
    [
        (8, "sparsify-first", "1x4", 0.8),
        (4, "quantize-first", "1x4", 0.5),
        (2, "sparsify-first", "2x2", 0.9),
    ],
)
def test_compress_equals_python_api(ckpt: Path, bits: int, order: str, block: str, sparsity: float) -> None:
    out = ckpt.with_name("model.embp.safetensors")
    result = _run(
        "compress", ckpt, out, "--bits", bits, "--order", order, "--block", block,
        "--sparsity", sparsity, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)

    loaded = embpress.load(_fresh(), out)
    assert isinstance(loaded.emb, embpress.QuantizedEmbedding)
    assert isinstance(loaded.emb_bag, embpress.QuantizedEmbeddingBag)
    assert loaded.emb_bag.mode == "sum"

    reference = post_training_sparse_quantize(
        _fresh(_weights()),
        DataNormSparsifier,
        order == "sparsify-first",
        quant=QuantConfig(bits=bits),
        sparsity_level=sparsity,
        sparse_block_shape=tuple(int(v) for v in block.split("x")),
    )
    for name in ("emb", "emb_bag"):
        got, want = getattr(loaded, name), getattr(reference, name)
        assert torch.equal(got.dequantize(), want.dequantize()), name
        assert got.layout == want.layout and got.nbytes == want.nbytes
    assert torch.equal(loaded.fc.weight, reference.fc.weight)
    ids = torch.randint(0, 300, (64,), generator=torch.Generator().manual_seed(1))
    bags = torch.randint(0, 200, (64, 3), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(ids, bags), reference(ids, bags))

    rows = {t["name"]: t for t in report["tables"]}
    assert set(rows) == {"emb", "emb_bag"}
    for name, row in rows.items():
        module = getattr(reference, name)
        table = module.dequantize()
        assert row["sparsity"] == module.sparsity
        assert row["bits"] == bits and row["layout"] == module.layout
        assert (row["rows"], row["dim"]) == tuple(table.shape)
        assert row["bytes_before"] == table.numel() * 4 and row["bytes_after"] == module.nbytes
        assert row["ratio"] == pytest.approx(module.nbytes / (table.numel() * 4))
        assert row["rel_frobenius"] == pytest.approx(module.error["rel_frobenius"])
        assert row["max_abs_error"] == pytest.approx(module.error["max_abs"])
        # pruned entries are exact zeros; 8-bit grids cannot round an entry >= 0.5 to 0
        zeros = float((table == 0).double().mean())
        assert zeros >= row["sparsity"] - 1e-12
        if bits == 8:
            assert zeros == row["sparsity"]
    assert rows["emb"]["kind"] == rows["emb_bag"]["kind"] == "auto"  # the model decides at load
    assert report["copied"]["count"] == 2
    total = report["total"]
    assert total["bytes_after"] == sum(r["bytes_after"] for r in rows.values())
    assert total["ratio"] == pytest.approx(total["bytes_after"] / total["bytes_before"])
    assert report["settings"]["bits"] == bits and report["settings"]["order"] == order


def test_values_beyond_float16_scales_get_a_remedy_the_cli_has(tmp_path: Path) -> None:
    """4-bit rows keep float16 scales: a table too large for them is refused with the
    option that stores it (8-bit rows keep float32 scales), which then works."""
    src = tmp_path / "in.pt"
    torch.save({"emb.weight": torch.full((10, 4), 3e38)}, src)
    refused = _run("compress", src, tmp_path / "out.safetensors")
    assert refused.exit_code == 1 and "use --bits 8" in refused.stderr and "QuantConfig" not in refused.stderr
    assert _run("compress", src, tmp_path / "out.safetensors", "--bits", "8").exit_code == 0


def test_tied_tensors_copied_are_reported_as_the_file_stores_them(tmp_path: Path) -> None:
    """Two keys over one tensor (a tied head) are stored once: the report counts what the
    file holds, as `inspect` does."""
    shared = torch.randn(100, 16)
    src = tmp_path / "in.pt"
    torch.save({"emb.weight": torch.randn(10, 4), "a.weight": shared, "b.weight": shared}, src)
    out = tmp_path / "out.safetensors"
    done = _run("compress", src, out, "--json")
    assert done.exit_code == 0, done.stderr
    copied = json.loads(done.stdout)["copied"]
    assert copied == {"count": 1, "bytes": shared.numel() * 4}
    shown = _run("inspect", out).stdout
    assert "other tensors: 1 (6.25 KiB)" in shown


def test_compress_prints_a_table(ckpt: Path) -> None:
    out = ckpt.with_name("out.safetensors")
    result = _run("compress", ckpt, out, "--sparsity", "0.8", "--bits", "4", "--layout", "block_sparse")
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    for word in ("emb_bag", "block_sparse", "0.8000", "total", "ratio", "rel err", "copied 2 other tensor"):
        assert word in text, word
    # a state_dict does not say which table is a bag: the loaded model's modules decide
    loaded = embpress.load(_fresh(), out)
    assert isinstance(loaded.emb, embpress.QuantizedEmbedding)
    assert isinstance(loaded.emb_bag, embpress.QuantizedEmbeddingBag) and loaded.emb_bag.mode == "sum"
    with pytest.raises(FormatError, match="expected an embedding"):
        embpress.load(nn.ModuleDict({"emb": nn.Linear(16, 300), "emb_bag": nn.Linear(8, 200)}), out)


def test_wrapped_checkpoint_and_safetensors_input(tmp_path: Path) -> None:
    state = _weights()
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": state, "epoch": 3}, wrapped)
    flat = tmp_path / "flat.safetensors"
    save_file(state, str(flat))
    outs = []
    for src in (wrapped, flat):
        out = tmp_path / f"{src.stem}.out.safetensors"
        assert _run("compress", src, out).exit_code == 0
        outs.append(embpress.load(_fresh(), out))
    assert torch.equal(outs[0].emb.dequantize(), outs[1].emb.dequantize())


def test_tied_tables_are_stored_once(tmp_path: Path) -> None:
    shared = torch.randn(100, 8)
    state = {
        "enc.embed_tokens.weight": shared,
        "dec.embed_tokens.weight": shared,
        "head.bias": torch.zeros(3),
    }
    src, out = tmp_path / "tied.pt", tmp_path / "tied.safetensors"
    torch.save(state, src)
    result = _run("compress", src, out, "--json")
    assert result.exit_code == 0, result.stderr
    (row,) = json.loads(result.stdout)["tables"]
    assert {row["name"], *row["aliases"]} == {"enc.embed_tokens", "dec.embed_tokens"}

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            emb = nn.Embedding(100, 8)
            self.enc, self.dec = nn.Module(), nn.Module()
            self.enc.embed_tokens = self.dec.embed_tokens = emb
            self.head = nn.Module()
            self.head.register_buffer("bias", torch.ones(3))

    model = embpress.load(Tied(), out)
    assert model.enc.embed_tokens is model.dec.embed_tokens


def test_tied_token_tables_of_an_encoder_decoder_checkpoint_are_one_table(tmp_path: Path) -> None:
    """T5's state dict: ``shared`` and the encoder's and decoder's token tables are one
    tensor; all three are the one compressed table (no float copy of it is kept), and a
    model whose three modules share one weight loads it with the three still tied."""
    w = torch.randn(300, 16)
    head = torch.randn(300, 16)
    state = {"shared.weight": w, "encoder.embed_tokens.weight": w, "decoder.embed_tokens.weight": w}
    result = embpress.compress_state_dict({**state, "lm_head.weight": head})
    assert [(t.name, t.aliases) for t in result.tables] == [
        ("shared", ("encoder.embed_tokens", "decoder.embed_tokens"))
    ]
    assert result.copied == ["lm_head.weight"]
    out = tmp_path / "t5.safetensors"
    result.save(out)
    model = nn.Module()
    model.shared, model.lm_head = nn.Embedding(300, 16), nn.Linear(16, 300, bias=False)
    model.encoder, model.decoder = nn.Module(), nn.Module()
    model.encoder.embed_tokens, model.decoder.embed_tokens = nn.Embedding(300, 16), nn.Embedding(300, 16)
    model.encoder.embed_tokens.weight = model.decoder.embed_tokens.weight = model.shared.weight
    embpress.load(model, out)
    assert model.shared is model.encoder.embed_tokens is model.decoder.embed_tokens
    assert torch.equal(model.lm_head.weight, head)


def test_selecting_one_of_tied_tables_compresses_their_one_table(tmp_path: Path) -> None:
    """--tables naming one of two embedding tables over one tensor compresses that one
    table (the other name an alias, no float copy kept), as a model whose two modules share
    the weight would; a selected table tied to a tensor of another kind is compressed as
    asked, with one warning line saying the tie is broken."""
    w = torch.randn(100, 16)
    src = tmp_path / "in.pt"
    torch.save({"enc_emb.weight": w, "dec_emb.weight": w, "fc.weight": torch.randn(4, 16)}, src)
    out = tmp_path / "out.safetensors"
    done = _run("compress", src, out, "--tables", "dec_emb", "--json")
    assert done.exit_code == 0, done.stderr
    report = json.loads(done.stdout)
    (row,) = report["tables"]
    assert {row["name"], *row["aliases"]} == {"enc_emb", "dec_emb"}
    assert report["copied"]["count"] == 1  # fc.weight alone
    assert "warning" not in done.stderr
    state = torch.load(src, weights_only=True)
    api = embpress_checkpoint.compress_state_dict(state, tables=["enc_emb.weight"])
    assert [(t.name, t.aliases) for t in api.tables] == [("enc_emb", ("dec_emb",))]

    torch.save({"emb.weight": w, "lm_head.weight": w}, src)
    done = _run("compress", src, out, "--tables", "emb")
    assert done.exit_code == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1 and "emb.weight (tied to lm_head.weight, which stays float" in lines[0]
    assert "untied" in lines[0]


def _hf_dir(tmp_path: Path, config: dict[str, object] | str | None) -> Path:
    """A folder as Hugging Face's save_pretrained leaves it: the tied head's weight is not
    in model.safetensors, only config.json says the head computes with the token table."""
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    tables = {"tok_emb.weight": torch.randn(50, 8), "pos_emb.weight": torch.randn(16, 8)}
    save_file(tables, str(folder / "model.safetensors"))
    if isinstance(config, dict):
        (folder / "config.json").write_text(json.dumps(config))
    elif isinstance(config, str):
        (folder / "config.json").write_text(config)
    return folder / "model.safetensors"


_LM = {"model_type": "x", "architectures": ["XForCausalLM"]}


@pytest.mark.parametrize(
    ("config", "tied"),
    [
        ({**_LM, "vocab_size": 50}, True),  # tie_word_embeddings: Hugging Face's default
        ({**_LM, "architectures": ["XLMHeadModel"], "vocab_size": 50, "tie_word_embeddings": True}, True),
        ({"model_type": "x", "text_config": {"vocab_size": 50}}, True),  # no classes named: may have a head
        ({**_LM, "vocab_size": 50, "tie_word_embeddings": False}, False),
        ({**_LM, "architectures": ["XModel"], "vocab_size": 50}, False),  # no head
        ({**_LM, "vocab_size": 51}, False),  # another table's size
        ({"architectures": ["XForCausalLM"], "vocab_size": 50}, False),  # not a Hugging Face config
        ({**_LM, "architectures": 5, "vocab_size": 50, "text_config": [1]}, True),  # odd fields: ignored
        ("{not json", False),
        (None, False),
    ],
)
def test_a_token_table_a_hugging_face_config_ties_to_a_head_stays_float(
    tmp_path: Path, config: dict[str, object] | str | None, tied: bool
) -> None:
    src = _hf_dir(tmp_path, config)
    out = tmp_path / "out.safetensors"
    done = _run("compress", src, out, "--json")
    assert done.exit_code == 0, done.stderr
    names = [t["name"] for t in json.loads(done.stdout)["tables"]]
    assert sorted(names) == (["pos_emb"] if tied else ["pos_emb", "tok_emb"])
    warned = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    if tied:
        assert len(warned) == 1 and "tok_emb.weight (tied to the output head by" in warned[0]
        assert "config.json" in warned[0]
        state = {"tok_emb.weight": torch.zeros(50, 8), "pos_emb.weight": torch.zeros(16, 8)}
        with pytest.warns(UserWarning, match="left float"):
            assert find_tables(state, source=src) == ["pos_emb.weight"]
        assert find_tables(state) == ["tok_emb.weight", "pos_emb.weight"]  # no file: no config
        asked = _run("compress", src, out, "--tables", "tok_emb", "--json")  # asked for: compressed
        assert [t["name"] for t in json.loads(asked.stdout)["tables"]] == ["tok_emb"]
        assert "compressed as selected" in asked.stderr
    else:
        assert not warned


def test_without_the_model_a_position_table_of_as_many_rows_is_not_the_token_table(tmp_path: Path) -> None:
    """Read from config.json alone (a model transformers cannot build), the token table is
    the table of ``vocab_size`` rows that is not a position or type table."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**_LM, "vocab_size": 50}))
    state = {
        "wpe.weight": torch.zeros(50, 8),
        "wte.weight": torch.zeros(50, 8),
        "type_emb.weight": torch.zeros(50, 8),
    }
    with pytest.warns(UserWarning, match=r"left float.*wte\.weight"):
        assert find_tables(state, source=folder / "model.safetensors") == ["wpe.weight", "type_emb.weight"]


@pytest.mark.parametrize(
    "state",
    [{"emb.weight": [[1.0]]}, {1: torch.ones(2, 2)}, [("emb.weight", torch.ones(2, 2))]],
    ids=["list value", "int key", "list of pairs"],
)
def test_find_tables_refuses_what_is_not_a_state_dict(state: object) -> None:
    with pytest.raises(TypeError, match="state must"):
        find_tables(state)  # type: ignore[arg-type]


def test_select_tables_and_name_heuristic() -> None:
    for name in ("emb", "emb1", "embedding", "embeddings", "bert.embeddings.word_embeddings", "embed_tokens"):
        assert looks_like_embedding(name), name
    for name in ("transformer.wte", "sparse.embedding_bags.3", "tok_emb", "shared", "model.shared"):
        assert looks_like_embedding(name), name
    for name in ("fc", "layers.3", "lm_head", "encoder.layer.0.attention"):
        assert not looks_like_embedding(name), name
    state = {
        "emb.weight": torch.randn(4, 4),
        "emb_proj.weight": torch.randn(4, 4),
        "emb_proj.bias": torch.randn(4),
        "emb_norm.weight": torch.randn(4),
        "ids_emb.weight": torch.zeros(4, 4, dtype=torch.int64),
        "fc.weight": torch.randn(4, 4),
    }
    assert find_tables(state) == ["emb.weight"]
    assert find_tables(state, ["fc"]) == ["fc.weight"]
    assert find_tables(state, ["fc.weight", "emb"]) == ["emb.weight", "fc.weight"]


def test_progress_stays_off_stdout(tmp_path: Path) -> None:
    src, out = tmp_path / "big.pt", tmp_path / "big.safetensors"
    torch.save({"big_emb.weight": torch.randn(70_000, 16)}, src)  # > 1M elements: progress shown
    result = _run("compress", src, out, "--json", "--bits", "8")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["tables"][0]["rows"] == 70_000
    assert "compressing big_emb" in result.stderr


# ------------------------------------------------------------------------------ inspect
def test_inspect_embpress_file(ckpt: Path) -> None:
    out = ckpt.with_name("model.embp.safetensors")
    assert _run("compress", ckpt, out, "--bits", "4", "--sparsity", "0.8").exit_code == 0
    result = _run("inspect", out, "--json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["format"] == "embpress" and info["format_version"] == "2"
    tables = {t["name"]: t for t in info["tables"]}
    assert tables["emb"]["kind"] == tables["emb_bag"]["kind"] == "auto"
    assert tables["emb"]["sparsity"] == 0.8 and tables["emb"]["bits"] == 4
    assert (tables["emb"]["rows"], tables["emb"]["dim"]) == (300, 16)
    loaded = embpress.load(_fresh(), out)
    assert tables["emb"]["bytes"] == loaded.emb.nbytes
    assert tables["emb"]["ratio"] == pytest.approx(loaded.emb.nbytes / (300 * 16 * 4))
    assert info["other_tensors"] == {"count": 2, "bytes": (24 * 3 + 3) * 4}

    text = _run("inspect", out).stdout
    for word in ("format version 2", "emb_bag", "auto", tables["emb"]["layout"], "other tensors: 2"):
        assert word in text, word
    picked = _run("inspect", out, "--tables", "emb")  # picks a checkpoint's tables: refused, not ignored
    assert picked.exit_code == 2 and "an embpress file shows all it holds" in picked.stderr


def test_inspect_plain_checkpoint(ckpt: Path) -> None:
    result = _run("inspect", ckpt, "--json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert [t["key"] for t in info["tables"]] == ["emb.weight", "emb_bag.weight"]
    assert [t["key"] for t in info["copied"]] == ["fc.weight", "fc.bias"]
    assert info["tables"][0]["shape"] == [300, 16]
    text = _run("inspect", ckpt, "--tables", "emb").stdout
    assert "1 tensor(s) compressed" in text and "emb_bag.weight" in text


# ------------------------------------------------------------------------------ errors
def _error_cases(tmp: Path, ckpt: Path) -> list[tuple[list[str | Path], int, str]]:
    text = tmp / "notes.pt"
    text.write_text("not a checkpoint\n")
    evil = tmp / "evil.pt"
    torch.save({"emb.weight": torch.randn(4, 4), "hook": _Payload()}, evil)
    pickled = tmp / "plain.pkl"
    pickled.write_bytes(pickle.dumps(_Payload()))
    linear = tmp / "linear.pt"
    torch.save(nn.Linear(4, 4).state_dict(), linear)
    odd = tmp / "odd.pt"
    torch.save({"emb.weight": torch.ones(4, 4, dtype=torch.int32), "ln.weight": torch.ones(4)}, odd)
    nan = tmp / "nan.pt"
    torch.save({"emb.weight": torch.tensor([[1.0, float("nan")], [0.0, 1.0]])}, nan)
    done = tmp / "done.safetensors"
    assert _run("compress", ckpt, done).exit_code == 0
    corrupt = tmp / "corrupt.safetensors"
    data = bytearray(done.read_bytes())
    data[-1] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    empty = tmp / "empty.pt"
    torch.save({}, empty)
    out = tmp / "out.safetensors"
    return [
        (["compress", tmp / "missing.pt", out], 1, "no such file"),
        (["compress", tmp, out], 1, "is a directory"),
        (["compress", text, out], 1, "not a PyTorch checkpoint"),
        (["compress", evil, out], 1, "refused"),
        (["compress", pickled, out], 1, "not a PyTorch checkpoint"),
        (["compress", done, out], 1, "already an embpress file"),
        (["compress", ckpt, out, "--tables", "nothing*"], 1, "matches no table"),
        (["compress", linear, out], 1, "no embedding table found"),
        (["compress", odd, out, "--tables", "ln"], 1, "not a 2-D table"),
        (["compress", odd, out, "--tables", "emb"], 1, "not a float table"),
        (["compress", ckpt, out, "--tables", "fc"], 1, "also holds 'fc.bias'"),
        (["compress", nan, out], 1, "NaN/Inf"),
        (["compress", ckpt, out, "--sparsity", "1.5"], 2, "--sparsity"),
        (["compress", ckpt, out, "--sparsity", "nan"], 2, "--sparsity"),
        (["compress", ckpt, out, "--bits", "3"], 2, "--bits"),
        (["compress", ckpt, out, "--block", "0x4"], 2, "--block"),
        (["compress", ckpt, out, "--block", "wide"], 2, "--block"),
        (["compress", ckpt, out, "--zeros-per-block", "5"], 2, "larger than the block"),
        (["compress", ckpt, tmp / "sub" / ".." / ckpt.name], 2, "is the input file"),
        (["compress", ckpt, tmp / "no" / "such" / "dir.safetensors"], 1, "does not exist"),
        (["compress", empty, out], 1, "the checkpoint is empty"),
        (["inspect", text], 1, "not a PyTorch checkpoint"),
        (["inspect", corrupt], 1, "CRC-32 mismatch"),
        (["frobnicate"], 2, "No such command"),
    ]


class _Payload:
    """An arbitrary object: a weights-only load must refuse to build it."""


def test_user_errors_are_one_line(tmp_path: Path, ckpt: Path) -> None:
    (tmp_path / "sub").mkdir()
    before = ckpt.read_bytes()
    for args, code, message in _error_cases(tmp_path, ckpt):
        result = _run(*args)
        where = " ".join(str(a) for a in args)
        assert result.exit_code == code, (where, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (where, result.stderr)
        assert message in lines[0], (where, lines[0])
        assert "Traceback" not in result.output
        assert not (tmp_path / "out.safetensors").exists(), where
    assert ckpt.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_nonfinite_zero_is_accepted(tmp_path: Path) -> None:
    src, out = tmp_path / "nan.pt", tmp_path / "nan.safetensors"
    torch.save({"emb.weight": torch.tensor([[1.0, float("inf"), 2.0, 3.0]] * 8)}, src)
    assert _run("compress", src, out, "--nonfinite", "zero", "--sparsity", "0").exit_code == 0
    loaded = embpress.load(nn.ModuleDict({"emb": nn.Embedding(8, 4)}), out)
    assert float(loaded["emb"].dequantize()[0, 1]) == 0.0


def test_interrupt_leaves_nothing(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted_write(tensors: object, path: str, metadata: object = None) -> None:
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(embpress.io, "save_file", interrupted_write)
    out = ckpt.with_name("out.safetensors")
    result = _run("compress", ckpt, out)
    assert result.exit_code == 130
    assert result.stderr.strip().splitlines() == ["error: interrupted; nothing was written"]
    assert not out.exists() and _leftovers(ckpt.parent) == []


def test_help_texts() -> None:
    top = _run("--help")
    assert top.exit_code == 0
    for word in ("compress", "inspect", "demo", "Examples"):
        assert word in top.stdout
    options = {
        "compress": ("--sparsity", "--block", "--zeros-per-block", "--norm", "--bits", "--order",
                     "--tables", "--layout", "--json", "[default: 0.0]", "1x4", "Examples"),
        "inspect": ("FILE", "--json", "--tables", "Examples"),
        "demo": ("--out", "--seed", "--quick", "out/demo", "Example"),
    }  # fmt: skip
    for command, words in options.items():
        result = _run(command, "--help")
        assert result.exit_code == 0
        text = " ".join(result.stdout.split())
        for word in words:
            assert word in text, (command, word)


def test_console_script(ckpt: Path) -> None:
    """The installed entry point: clean JSON on stdout; an error is one line, no traceback."""
    out = ckpt.with_name("cli.safetensors")
    done = subprocess.run(
        [*EMBPRESS, "compress", ckpt, out, "--json"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["out"] == str(out)
    failed = subprocess.run([*EMBPRESS, "inspect", ckpt.with_name("nope.pt")], capture_output=True, text=True)
    assert failed.returncode == 1
    assert failed.stderr.strip() == f"error: {ckpt.with_name('nope.pt')}: no such file"


# ------------------------------------------------------------------------------ hostile input
# Raw text of torch / safetensors / json / numba, or a Python exception class name.
_RAW = re.compile(
    r"Traceback|Errno|unable to mmap|Expecting value|line 1 column|deserializ|Unsupported operand"
    r"|HeaderTooLarge|\b[A-Z][A-Za-z]*(Error|Exception|Interrupt)\b"
)


def _one_error_line(result: Result, *names: str) -> str:
    """The single non-empty stderr line of a failed run; it names one of ``names``, no raw text."""
    assert result.exit_code not in (0, None), result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    assert lines[0].startswith("error: "), lines[0]
    assert any(name in lines[0] for name in names), (names, lines[0])
    assert not _RAW.search(lines[0]), lines[0]
    return lines[0]


def _safetensors_bytes(header: object) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw


def _huge_safetensors(path: Path, metadata: dict[str, str] | None = None) -> Path:
    """A sparse file (no disk used) with a valid header claiming a 4 TiB float32 tensor."""
    rows = (1 << 42) // 4096
    header: dict[str, object] = {
        "emb.weight": {"dtype": "F32", "shape": [rows, 1024], "data_offsets": [0, rows * 4096]}
    }
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = _safetensors_bytes(header)
    with open(path, "wb") as fh:
        fh.write(raw)
        fh.truncate(len(raw) + rows * 4096)
    return path


def _hostile(tmp: Path, case: str, ckpt: Path) -> tuple[list[str | Path], str, str]:
    """(arguments, the file or option the error must name, a phrase it must hold) of a case."""
    out = tmp / "out.safetensors"
    path = tmp / f"{case}.pt"
    if case == "empty":
        path.write_bytes(b"")
        return ["compress", path, out], str(path), "empty"
    if case == "random":
        path.write_bytes(bytes(range(256)) * 7)
        return ["inspect", path], str(path), "not a PyTorch checkpoint"
    if case == "truncated-safetensors":
        path = tmp / "t.safetensors"
        save_file({"emb.weight": torch.randn(64, 8)}, str(path))
        path.write_bytes(path.read_bytes()[:-100])
        return ["compress", path, out], str(path), "truncated"
    if case == "header-not-object":
        path = tmp / "list.safetensors"
        path.write_bytes(_safetensors_bytes([1, 2, 3]))
        return ["inspect", path], str(path), "not a readable safetensors file"
    if case == "header-bad-entry":
        path = tmp / "entry.safetensors"
        path.write_bytes(_safetensors_bytes({"emb.weight": "nope"}))
        return ["compress", path, out], str(path), "not a readable safetensors file"
    if case == "pickle-of-object":
        path.write_bytes(pickle.dumps({"emb.weight": [1.0, 2.0]}))
        return ["compress", path, out], str(path), "not a PyTorch checkpoint"
    if case == "not-a-state-dict":
        torch.save([torch.randn(4, 4)], path)
        return ["inspect", path], str(path), "not a state_dict"
    if case == "state-dict-with-a-number":
        torch.save({"emb.weight": torch.randn(4, 4), "epoch": 3}, path)
        return ["compress", path, out], str(path), "entry 'epoch' is int, not a tensor"
    if case == "directory":
        return ["inspect", tmp], str(tmp), "directory"
    if case == "missing":
        return ["compress", path, out], str(path), "no such file"
    if case == "dev-zero":
        return ["inspect", "/dev/zero"], "/dev/zero", "not a regular file"
    if case == "socket":
        path = tmp / "s.sock"
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.bind(str(path))
        except OSError:
            pytest.skip("cannot bind a unix socket here")
        finally:
            sock.close()
        return ["compress", path, out], str(path), "not a regular file"
    if case == "out-folder-missing":
        return ["compress", ckpt, tmp / "no" / "out.safetensors"], "out.safetensors", "does not exist"
    if case == "out-is-in":
        return ["compress", ckpt, ckpt], "OUT", "is the input file"
    if case == "out-is-fifo":
        os.mkfifo(tmp / "pipe")
        return ["compress", ckpt, tmp / "pipe"], "OUT", "not a regular file"
    if case == "nested-tensor":
        nested = torch.nested.nested_tensor([torch.randn(2), torch.randn(3)])
        torch.save({"emb.weight": torch.randn(4, 4), "nt": nested}, path)
        return ["inspect", path], str(path), "nested tensor"
    if case == "quantized-buffer":
        q = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.quint8)
        torch.save({"emb.weight": torch.randn(8, 4), "q": q}, path)
        return ["compress", path, out], str(path), "'q' is a quantized tensor"
    if case == "sparse-buffer":
        torch.save({"emb.weight": torch.randn(8, 4), "s": torch.randn(4, 4).to_sparse()}, path)
        return ["compress", path, out], str(path), "'s' is a sparse tensor"
    raise AssertionError(case)


_HOSTILE = [
    "empty", "random", "truncated-safetensors", "header-not-object", "header-bad-entry",
    "pickle-of-object", "not-a-state-dict", "state-dict-with-a-number", "directory", "missing",
    "dev-zero", "socket",
    "out-folder-missing", "out-is-in", "out-is-fifo", "nested-tensor", "quantized-buffer", "sparse-buffer",
]  # fmt: skip


@pytest.mark.filterwarnings("ignore:.*quantize_per_tensor:UserWarning")
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
@pytest.mark.parametrize("case", _HOSTILE)
def test_hostile_inputs_are_one_line(tmp_path: Path, ckpt: Path, case: str) -> None:
    """Bad input: one 'error:' line naming the file or argument, in our words; files untouched."""
    before = ckpt.read_bytes()
    args, name, phrase = _hostile(tmp_path, case, ckpt)
    line = _one_error_line(_run(*args), name)
    assert phrase in line, line
    assert ckpt.read_bytes() == before
    assert not (tmp_path / "out.safetensors").exists() and _leftovers(tmp_path) == []


def test_fifo_input_is_refused_without_hanging(tmp_path: Path) -> None:
    """A named pipe is never opened (that would block forever): both commands refuse it at once."""
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    runs = [
        subprocess.Popen([*EMBPRESS, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for args in (["inspect", str(fifo)], ["compress", str(fifo), str(tmp_path / "out.safetensors")])
    ]
    try:
        results = [run.communicate(timeout=60) for run in runs]
    finally:
        for run in runs:
            run.kill()
            run.wait()
    for run, (stdout, stderr) in zip(runs, results, strict=True):
        assert run.returncode == 1 and stdout == ""
        assert stderr.strip() == (
            f"error: {fifo}: not a regular file (a named pipe), expected a checkpoint file"
        )


@pytest.mark.parametrize("embpress_header", [False, True])
@pytest.mark.parametrize("command", ["inspect", "compress"])
def test_huge_sparse_file_is_refused_before_reading(
    tmp_path: Path, command: str, embpress_header: bool
) -> None:
    """A 4 TiB sparse file with a valid header: one line, never mmap's or MemoryError. inspect
    and compress of a plain checkpoint say 'too large'; compress reads only the header of an
    embpress file (by pread) and refuses it as one."""
    metadata = {"format": "embpress", "format_version": "2", "index": "{}"} if embpress_header else None
    huge = _huge_safetensors(tmp_path / "huge.safetensors", metadata)
    args = ["inspect", huge] if command == "inspect" else ["compress", huge, tmp_path / "out.safetensors"]
    line = _one_error_line(_run(*args), str(huge))
    if command == "compress" and embpress_header:
        assert "already an embpress file" in line, line
    else:
        assert "too large" in line and "TiB" in line, line
    assert not (tmp_path / "out.safetensors").exists()


def test_out_of_memory_while_reading_is_one_line(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MemoryError or torch's mmap failure while loading IN: one line naming IN."""
    for error in (MemoryError(), RuntimeError("unable to mmap 1099511627880 bytes from file <x>: (12)")):

        def fail(*args: object, _error: BaseException = error, **kwargs: object) -> None:
            raise _error

        monkeypatch.setattr(embpress_checkpoint.torch, "load", fail)
        line = _one_error_line(_run("compress", ckpt, ckpt.with_name("out.safetensors")), str(ckpt))
        assert "too large" in line, line


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta:UserWarning")
@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse_table_is_made_dense(tmp_path: Path, layout: str) -> None:
    """A sparse COO/CSR table compresses exactly as its dense form would."""
    torch.manual_seed(0)
    table = torch.randn(40, 8) * (torch.rand(40, 8) < 0.5)
    sparse = table.to_sparse() if layout == "coo" else table.to_sparse_csr()
    src, dense_src = tmp_path / "sparse.pt", tmp_path / "dense.pt"
    torch.save({"emb.weight": sparse, "fc.bias": torch.ones(3)}, src)
    torch.save({"emb.weight": table, "fc.bias": torch.ones(3)}, dense_src)
    out, dense_out = tmp_path / "sparse.safetensors", tmp_path / "dense.safetensors"
    assert _run("compress", src, out, "--bits", "4").exit_code == 0
    assert _run("compress", dense_src, dense_out, "--bits", "4").exit_code == 0

    def model() -> nn.Module:
        m = nn.Module()
        m.emb, m.fc = nn.Embedding(40, 8), nn.Module()
        m.fc.register_buffer("bias", torch.zeros(3))
        return m

    got, want = embpress.load(model(), out), embpress.load(model(), dense_out)
    assert torch.equal(got.emb.dequantize(), want.emb.dequantize())
    assert torch.equal(got.fc.bias, torch.ones(3))
    info = json.loads(_run("inspect", src, "--json").stdout)
    assert info["tables"][0]["dtype"] == f"float32 (sparse_{layout})"


def test_sparse_table_larger_than_memory_is_refused(tmp_path: Path) -> None:
    """A sparse table whose dense form could not fit in memory: refused, naming the key."""
    rows = 1 << 40  # 4 PiB dense
    index = torch.tensor([[rows - 1], [3]])
    huge = torch.sparse_coo_tensor(index, torch.tensor([1.0]), (rows, 1024), check_invariants=True)
    src = tmp_path / "huge_sparse.pt"
    torch.save({"emb.weight": huge}, src)
    line = _one_error_line(_run("compress", src, tmp_path / "out.safetensors"), str(src))
    assert "'emb.weight'" in line and "too large" in line, line


def test_torch_load_is_weights_only(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every torch.load of the CLI refuses to unpickle arbitrary objects."""
    calls: list[dict[str, object]] = []
    real = torch.load

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(kwargs)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(embpress_checkpoint.torch, "load", spy)
    assert _run("inspect", ckpt).exit_code == 0
    assert _run("compress", ckpt, ckpt.with_name("out.safetensors")).exit_code == 0
    assert len(calls) == 2 and all(c.get("weights_only") is True for c in calls)


_BIG = "9" * 5000
_BAD_OPTIONS: list[tuple[list[str], str]] = [
    (["--block", "99999999999999999999x1"], "--block"),
    (["--block", "1x99999999999999999999"], "--block"),
    (["--block", "2147483648x1"], "--block"),
    (["--block", f"1x{_BIG}"], "--block"),
    (["--block", "\uff11x\uff14"], "--block"),  # full-width digits
    (["--block", "-1x4"], "--block"),
    (["--block", "true"], "--block"),
    (["--sparsity", "inf"], "--sparsity"),
    (["--sparsity", "-inf"], "--sparsity"),
    (["--sparsity", "nan"], "--sparsity"),
    (["--sparsity", "1e400"], "--sparsity"),
    (["--sparsity", "-0.5"], "--sparsity"),
    (["--sparsity", "true"], "--sparsity"),
    (["--sparsity", _BIG], "--sparsity"),
    (["--zeros-per-block", _BIG], "--zeros-per-block"),
    (["--zeros-per-block", "99999999999999999999"], "--zeros-per-block"),
    (["--zeros-per-block", "-1"], "--zeros-per-block"),
    (["--zeros-per-block", "true"], "--zeros-per-block"),
    (["--bits", "true"], "--bits"),
    (["--bits", "8.0"], "--bits"),
    (["--tables", ""], "--tables"),
    (["--tables", " , "], "--tables"),
]


@pytest.mark.parametrize(("options", "name"), _BAD_OPTIONS)
def test_bad_numbers_are_usage_errors(ckpt: Path, options: list[str], name: str) -> None:
    """Out-of-range, overflowing, NaN/inf and bool-like option values: exit 2 naming the option."""
    result = _run("compress", ckpt, ckpt.with_name("out.safetensors"), *options)
    assert result.exit_code == 2
    _one_error_line(result, f"'{name}'")
    assert not ckpt.with_name("out.safetensors").exists()


@pytest.mark.parametrize("seed", ["99999999999999999999", "-1", "1.5", "true"])
def test_bad_seed_is_a_usage_error(tmp_path: Path, seed: str) -> None:
    result = _run("demo", "--quick", "--seed", seed, "--out", tmp_path / "demo")
    assert result.exit_code == 2
    _one_error_line(result, "'--seed'")


def test_negative_zero_sparsity_is_zero(ckpt: Path) -> None:
    result = _run("compress", ckpt, ckpt.with_name("out.safetensors"), "--sparsity", "-0", "--json")
    assert result.exit_code == 0, result.stderr
    assert '"sparsity": -0.0' not in result.stdout
    assert json.loads(result.stdout)["settings"]["sparsity"] == 0.0


class _NumbaLikeError(Exception):
    """Stands for an error type the CLI does not know (numba's TypingError, a bug...)."""


_ESCAPES: list[tuple[BaseException, int, str]] = [
    (FormatError("the index is broken"), 1, "the index is broken"),
    (ValueError("bad value"), 1, "bad value"),
    (TypeError("bad type"), 1, "bad type"),
    (OSError(errno.ENOSPC, "No space left on device"), 1, "no space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "/x/in.pt"), 1, "/x/in.pt: permission denied"),
    (RuntimeError("something\nspread over\nlines"), 1, "something spread over lines"),
    (MemoryError(), 1, "not enough memory"),
    (RecursionError("maximum recursion depth exceeded"), 1, "nested too deeply"),
    (_NumbaLikeError("Failed in nopython mode pipeline\n...\nlong"), 1, "EMBPRESS_DEBUG=1"),
    (KeyError("x"), 1, "EMBPRESS_DEBUG=1"),
    (KeyboardInterrupt(), 130, "interrupted"),
]


@pytest.mark.parametrize(("error", "code", "phrase"), _ESCAPES)
def test_escaping_errors_are_one_line(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException, code: int, phrase: str
) -> None:
    """Whatever the library raises becomes one line naming IN (or the OSError's file)."""

    def fail(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.delenv("EMBPRESS_DEBUG", raising=False)
    for command in ("compress", "inspect"):
        monkeypatch.setattr(embpress_checkpoint, "find_tables", fail)
        args = [command, ckpt] + ([ckpt.with_name("out.safetensors")] if command == "compress" else [])
        result = _run(*args)
        assert result.exit_code == code
        name = "/x/in.pt" if isinstance(error, PermissionError) else str(ckpt)
        line = _one_error_line(result, "interrupted" if code == 130 else name)
        assert phrase in line, line


def test_debug_env_shows_the_traceback(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise _NumbaLikeError("boom")

    monkeypatch.setattr(embpress_checkpoint, "find_tables", fail)
    monkeypatch.setenv("EMBPRESS_DEBUG", "1")
    with pytest.raises(_NumbaLikeError, match="boom"):
        _run("inspect", ckpt)


def test_internal_error_outside_a_command_is_one_line(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in option parsing (outside any command body) is still one line and a hint."""

    def broken(*args: object, **kwargs: object) -> None:
        raise _NumbaLikeError("boom")

    monkeypatch.delenv("EMBPRESS_DEBUG", raising=False)
    monkeypatch.setattr(embpress_cli._BlockShape, "convert", broken)
    result = _run("compress", ckpt, ckpt.with_name("out.safetensors"), "--block", "1x4")
    assert result.exit_code == 1
    assert "EMBPRESS_DEBUG=1" in _one_error_line(result, "internal error")


def _failing_source(failure: str, ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """IN for a compress that fails in the given way (writes fail halfway through, if asked)."""
    if failure == "bad input":
        ckpt.with_name("bad.pt").write_bytes(b"junk" * 10)
        return ckpt.with_name("bad.pt")
    if failure == "nan table":
        torch.save({"emb.weight": torch.tensor([[float("nan"), 1.0]])}, ckpt.with_name("nan.pt"))
        return ckpt.with_name("nan.pt")
    error = MemoryError() if failure == "out of memory" else OSError(errno.ENOSPC, "No space left on device")

    def half_write(tensors: object, path: str, metadata: object = None) -> None:
        Path(path).write_bytes(b"half a file")
        raise error

    monkeypatch.setattr(embpress.io, "save_file", half_write)
    return ckpt


@pytest.mark.parametrize("failure", ["bad input", "nan table", "disk full", "out of memory"])
def test_failed_compress_keeps_existing_out(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """A compress that fails (bad input, NaN, disk full, out of memory) leaves OUT byte-identical."""
    out = ckpt.with_name("previous.safetensors")
    assert _run("compress", ckpt, out).exit_code == 0
    before = out.read_bytes()
    src = _failing_source(failure, ckpt, monkeypatch)
    line = _one_error_line(_run("compress", src, out), str(src), str(out))
    assert out.read_bytes() == before, line
    assert _leftovers(ckpt.parent) == []
    if failure in ("disk full", "out of memory"):
        assert line.startswith(f"error: {out}: could not write") and "nothing was written" in line, line


# ------------------------------------------------------------------------------ demo
def test_demo_quick(tmp_path: Path) -> None:
    result = _run("demo", "--quick", "--out", tmp_path / "demo")
    assert result.exit_code == 0, result.stderr
    png = tmp_path / "demo" / "tradeoff.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in result.stdout
    lines = [line for line in result.stdout.splitlines() if line.startswith("│")]
    cells = [[c.strip() for c in line.strip("│").split("│")] for line in lines]
    assert [c[:2] for c in cells] == [["float32", "32"], ["0", "8"], ["0", "2"], ["0.8", "8"], ["0.8", "2"]]
    aucs = [float(c[4]) for c in cells]
    assert aucs[0] > 0.7  # the model learned the planted signal
    assert all(abs(a - aucs[0]) < 0.1 for a in aucs)
    ratios = [float(c[3]) for c in cells]
    assert ratios[0] == 1.0 and ratios[1] > ratios[2] > ratios[4] and ratios[3] > ratios[4]


def test_demo_is_deterministic(tmp_path: Path) -> None:
    tiny = DemoSettings(
        table_rows=(300, 200), table_dims=(8, 8), bag_lengths=(1, 2), samples=2_000, epochs=1,
        sparsities=(0.5,), bits=(4,),
    )  # fmt: skip
    a = run_demo(tmp_path / "a", seed=3, settings=tiny)
    b = run_demo(tmp_path / "b", seed=3, settings=tiny)
    assert a.rows == b.rows and a.baseline == b.baseline


def test_binary_auc_matches_pair_counting() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (200,), generator=g).float()  # many ties
    labels = torch.randint(0, 2, (200,), generator=g).float()
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    expected = float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())
    assert binary_auc(scores, labels) == pytest.approx(expected, abs=1e-12)
    assert binary_auc(torch.tensor([0.1, 0.9]), torch.tensor([0.0, 1.0])) == 1.0


def test_library_warnings_are_one_warning_line(tmp_path: Path) -> None:
    """A token table tied to an output head is left float: the command says so in one
    'warning:' line (not Python's file:line: UserWarning form) and still succeeds."""
    w = torch.randn(50, 8)
    state = {"wte.weight": w, "lm_head.weight": w, "pos_emb.weight": torch.randn(10, 8)}
    torch.save(state, tmp_path / "lm.pt")
    result = _run("compress", tmp_path / "lm.pt", tmp_path / "out.safetensors")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "left float" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "UserWarning" not in result.output
    assert "wte.weight (tied to lm_head.weight)" in lines[0]


def test_sigterm_under_torchrun_ends_through_clean_up(tmp_path):
    """torchrun stops the other ranks with SIGTERM when one fails: a rank then leaves
    through Python's clean-up (its finally blocks remove the temp file beside OUT)."""
    import signal
    import subprocess
    import sys

    marker = tmp_path / "cleaned"
    code = (
        "import os, signal, pathlib\n"
        "from embpress import cli\n"
        "cli._exit_on_sigterm()\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    signal.pause()\n"
        "finally:\n"
        f"    pathlib.Path({str(marker)!r}).write_text('yes')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert marker.read_text() == "yes"


def test_demo_refuses_an_output_folder_it_cannot_write_before_training() -> None:
    """--out naming something that is not a folder (a device here) is refused in one
    line before the model trains (the plot was the last step, after the whole sweep)."""
    result = _run("demo", "--quick", "--out", "/dev/null")
    assert result.exit_code == 1 and result.stderr.strip() == "error: /dev/null: file exists"


def test_names_from_a_file_are_shown_escaped_not_run_by_the_terminal(tmp_path: Path) -> None:
    """A table name holding control characters (clear screen, set title) or a line break
    reaches stdout escaped in every table the commands print (--json escapes by itself)."""
    name = "x\x1b[2J\x1b]0;pwned\x07\nline_emb"
    ckpt = tmp_path / "esc.pt"
    torch.save({f"{name}.weight": torch.randn(40, 8), "head.bias": torch.randn(3)}, ckpt)
    out = tmp_path / "esc.safetensors"
    runs = [
        _run("compress", ckpt, out),
        _run("inspect", out),
        _run("inspect", ckpt),
        _run("plan", ckpt, "--budget", "1/8"),
    ]
    for result in runs:
        assert result.exit_code == 0, result.output
        assert not any(c in result.stdout for c in "\x1b\x07"), result.stdout
        assert r"x\x1b[2J\x1b]0;pwned\x07\nline_emb" in result.stdout, result.stdout
    assert name in embpress.inspect(out).tables[0].name  # the name itself is kept
