"""The checkpoint API the CLI is built on (embpress.compress_state_dict, inspect, ...), and
the split of dependencies: the library without the cli extra, the entry point's hint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import embpress
from embpress import FormatError, QuantConfig
from embpress import io as eio
from embpress.checkpoint import is_embpress_file
from embpress.cli import cli

_CLI_EXTRA = ("click", "rich", "matplotlib")


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "emb.weight": torch.randn(300, 16),
        "emb_bag.weight": torch.randn(200, 8),
        "fc.weight": torch.randn(3, 24),
        "fc.bias": torch.randn(3),
    }


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(300, 16)
        self.emb_bag = nn.EmbeddingBag(200, 8, mode="sum")
        self.fc = nn.Linear(24, 3)


def _python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, timeout=timeout
    )


def _block(*names: str) -> str:
    """Code that makes ``import NAME`` fail (ModuleNotFoundError) for each name, as if not installed."""
    return "import sys\n" + "".join(f"sys.modules[{n!r}] = None\n" for n in names)


# ------------------------------------------------------------------------------ dependencies
def test_library_works_without_the_cli_extra(tmp_path: Path) -> None:
    """click, rich and matplotlib not installed: import, compress, save, inspect, load all work."""
    torch.save(_state(), tmp_path / "model.pt")
    code = _block(*_CLI_EXTRA) + textwrap.dedent(
        """
        from pathlib import Path
        import torch
        from torch import nn
        import embpress
        import embpress.demo

        folder = Path(sys.argv[1])
        result = embpress.compress_checkpoint(folder / "model.pt", folder / "a.safetensors", sparsity=0.5)
        assert [t.name for t in result.tables] == ["emb", "emb_bag"], result.tables
        state, fmt = embpress.load_checkpoint(folder / "model.pt")
        assert fmt == "pytorch" and embpress.find_tables(state) == ["emb.weight", "emb_bag.weight"]
        embpress.compress_state_dict(state, quant=embpress.QuantConfig(bits=4)).save(folder / "b.safetensors")
        report = embpress.inspect(folder / "b.safetensors")
        assert [t.bits for t in report.tables] == [4, 4] and report.other_tensors == 2
        model = nn.Module()
        model.emb, model.emb_bag, model.fc = nn.Embedding(300, 16), nn.EmbeddingBag(200, 8), nn.Linear(24, 3)
        embpress.load(model, folder / "b.safetensors")
        assert isinstance(model.emb_bag, embpress.QuantizedEmbeddingBag)
        try:
            embpress.demo.run_demo(folder / "demo", quick=True)
        except ImportError as err:
            assert "pip install 'embpress[cli]'" in str(err), err
        else:
            raise AssertionError("the demo ran without matplotlib")
        assert all(sys.modules[name] is None for name in ("click", "rich", "matplotlib"))
        print("ok")
        """
    )
    done = _python(code, str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_import_embpress_loads_no_cli_module() -> None:
    done = _python(
        f"""
        import sys
        import embpress
        loaded = [name for name in {_CLI_EXTRA!r} if name in sys.modules]
        assert not loaded, loaded
        """
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("missing", ["click", "rich"])
def test_entry_point_without_the_extra_is_one_line(missing: str) -> None:
    """The console script without click or rich: one line naming the extra, exit 1, no traceback."""
    done = _python(_block(missing) + "from embpress.__main__ import main\nmain()\n", "--help")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.strip() == (
        f"error: the embpress command needs {missing}, which is not installed: pip install 'embpress[cli]'"
    )


def test_python_dash_m_embpress_runs_the_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "embpress", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "compress" in done.stdout and "inspect" in done.stdout


def test_demo_without_matplotlib_is_one_line(tmp_path: Path) -> None:
    code = _block("matplotlib") + textwrap.dedent(
        """
        from embpress.cli import cli
        cli(["demo", "--quick", "--out", sys.argv[1]], prog_name="embpress")
        """
    )
    done = _python(code, str(tmp_path / "demo"))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: the demo plots with matplotlib, which is not installed: pip install 'embpress[cli]'"
    ]


# ------------------------------------------------------------------------------ compress
def test_compress_checkpoint_writes_what_the_command_writes(tmp_path: Path) -> None:
    src = tmp_path / "model.pt"
    torch.save(_state(), src)
    settings = {"sparsity": 0.5, "block": (2, 2), "quant": QuantConfig(bits=4), "sparsify_first": False}
    result = embpress.compress_checkpoint(src, tmp_path / "api.safetensors", **settings)  # type: ignore[arg-type]
    done = CliRunner().invoke(
        cli,
        [
            "compress", str(src), str(tmp_path / "cli.safetensors"), "--sparsity", "0.5", "--block", "2x2",
            "--bits", "4", "--order", "quantize-first", "--json",
        ],
    )  # fmt: skip
    assert done.exit_code == 0, done.stderr
    index_api, tensors_api = eio.read_file(tmp_path / "api.safetensors")
    index_cli, tensors_cli = eio.read_file(tmp_path / "cli.safetensors")
    assert index_api == index_cli
    assert tensors_api.keys() == tensors_cli.keys()
    assert all(torch.equal(tensors_api[k], tensors_cli[k]) for k in tensors_api)
    rows = json.loads(done.stdout)["tables"]
    assert [r["bytes_after"] for r in rows] == [t.nbytes for t in result.tables]
    assert result.copied == ["fc.weight", "fc.bias"] and result.copied_nbytes == (72 + 3) * 4


def test_planned_compress_checkpoint_refuses_a_memory_bound(tmp_path: Path) -> None:
    """``memory`` bounds the row-chunk path of uniform settings; a plan reads the input
    whole, so a memory bound with a budget is refused (as the command refuses it), not
    ignored, and nothing is written."""
    src = tmp_path / "model.pt"
    torch.save(_state(), src)
    with pytest.raises(ValueError, match="memory bounds the row-chunk path"):
        embpress.compress_checkpoint(
            src, tmp_path / "out.safetensors", budget=Fraction(1, 16), memory=1 << 30
        )
    assert not (tmp_path / "out.safetensors").exists()


def test_compress_checkpoint_checks_memory_on_every_path(tmp_path: Path) -> None:
    """A memory bound with a .pt src, which is read whole, is refused as the command
    refuses it (not ignored); a bound that is not an int is a TypeError, one below the
    minimum a ValueError, on both inputs; nothing is written."""
    from safetensors.torch import save_file

    pt, st = tmp_path / "model.pt", tmp_path / "model.safetensors"
    torch.save(_state(), pt)
    save_file(_state(), str(st))
    out = tmp_path / "out.safetensors"
    with pytest.raises(ValueError, match=r"memory bounds the row-chunk path of a \.safetensors src"):
        embpress.compress_checkpoint(pt, out, memory=1 << 30)
    for src in (pt, st):
        for bad in ("16MiB", 32e6, True):
            with pytest.raises(TypeError, match="memory must be a number of bytes"):
                embpress.compress_checkpoint(src, out, memory=bad)
        with pytest.raises(ValueError, match="at least 16 MiB"):
            embpress.compress_checkpoint(src, out, memory=1 << 20)
    assert not out.exists()
    embpress.compress_checkpoint(st, out, memory=1 << 30)
    assert out.exists()


def test_float64_values_beyond_float32_are_refused_not_zeroed(tmp_path: Path) -> None:
    """A finite float64 value that float32 cannot hold is said as such, not counted as a
    NaN/Inf, and refused also under nonfinite='zero' (which is for NaN/Inf), on the
    in-memory and the row-chunk path."""
    from safetensors.torch import save_file

    state = {"emb.weight": torch.randn(20, 8, dtype=torch.float64)}
    state["emb.weight"][3, 1] = 1e300
    src = tmp_path / "model.safetensors"
    save_file(state, str(src))
    for nonfinite in ("raise", "zero"):
        quant = embpress.QuantConfig(bits=8, nonfinite=nonfinite)
        with pytest.raises(ValueError, match=r"holds 1 finite value\(s\) beyond float32's range"):
            embpress.compress_state_dict(state, quant=quant)
        with pytest.raises(ValueError, match=r"holds 1 finite value\(s\) beyond float32's range"):
            embpress.compress_checkpoint(src, tmp_path / "out.safetensors", quant=quant)
    state["emb.weight"][3, 1] = float("inf")  # a true Inf is still zeroed where asked
    zeroed = embpress.compress_state_dict(state, quant=embpress.QuantConfig(bits=8, nonfinite="zero"))
    assert zeroed.tables[0].nbytes > 0


def test_codecs_are_for_making_a_plan(tmp_path: Path) -> None:
    """``codecs`` limits the planner; with uniform settings or a finished plan it would be
    ignored, so it is refused there (in memory and from a file), and nothing is written."""
    from embpress.checkpoint import plan_state_dict

    state = _state()
    plan = plan_state_dict(state, budget=Fraction(1, 8), codecs=["rowwise4", "rowwise2"])
    assert {c.name for t in plan.tables for c in t.codecs} <= {"rowwise4", "rowwise2", "pruned"}
    src, out = tmp_path / "model.pt", tmp_path / "out.safetensors"
    torch.save(state, src)
    for kwargs in ({}, {"plan": plan}):
        with pytest.raises(ValueError, match="codecs= is for making a plan"):
            embpress.compress_state_dict(state, codecs=["rowwise4"], **kwargs)
        with pytest.raises(ValueError, match="codecs= is for making a plan"):
            embpress.compress_checkpoint(src, out, codecs=["rowwise4"], **kwargs)
    assert not out.exists()
    usage = embpress.Usage({"zz": torch.ones(3)})  # a table the state does not have: unread
    for kwargs in ({"usage": usage}, {"unseen_weight": 0.9}):  # as codecs: for planning only
        with pytest.raises(ValueError, match="usage= and unseen_weight= are for planning"):
            embpress.compress_state_dict(state, **kwargs)
        with pytest.raises(ValueError, match="usage= and unseen_weight= are for planning"):
            embpress.compress_checkpoint(src, out, **kwargs)
    assert not out.exists()
    with pytest.raises(ValueError, match="unknown codec 'rowwise3'"):
        plan_state_dict(state, budget=Fraction(1, 8), codecs=["rowwise3"])


def test_compress_state_dict_reports_and_round_trip(tmp_path: Path) -> None:
    state = _state()
    state["emb.weight"] = state["emb.weight"].to(torch.bfloat16)
    result = embpress.compress_state_dict(state, sparsity=0.8, quant=QuantConfig(bits=8))
    emb, bag = result.tables
    assert (emb.name, emb.kind, emb.dtype, emb.original_nbytes) == ("emb", "auto", "bfloat16", 300 * 16 * 2)
    assert (bag.name, bag.dtype, bag.original_nbytes, bag.float_nbytes) == (
        "emb_bag", "float32", 200 * 8 * 4, 200 * 8 * 4
    )  # fmt: skip
    assert result.original_nbytes == 300 * 16 * 2 + 200 * 8 * 4
    assert result.nbytes == emb.nbytes + bag.nbytes
    assert state["emb.weight"].dtype == torch.bfloat16  # the input is not changed
    result.save(tmp_path / "out.safetensors")
    model = embpress.load(_Model(), tmp_path / "out.safetensors")
    loaded = {r.name: r for r in embpress.compression_report(model)}
    for r in result.tables:
        got = loaded[r.name]
        assert (got.layout, got.bits, got.sparsity, got.nbytes) == (r.layout, r.bits, r.sparsity, r.nbytes)
        assert got.rel_frobenius == pytest.approx(r.rel_frobenius)
    assert loaded["emb_bag"].kind == "EmbeddingBag" and loaded["emb_bag"].mode == "sum"
    assert torch.equal(model.fc.bias, state["fc.bias"])


def test_tied_tables_report_aliases(tmp_path: Path) -> None:
    shared = torch.randn(50, 8)
    state = {"enc.embed_tokens.weight": shared, "dec.embed_tokens.weight": shared}
    result = embpress.compress_state_dict(state)
    (table,) = result.tables
    assert (table.name, table.aliases) == ("enc.embed_tokens", ("dec.embed_tokens",))
    result.save(tmp_path / "tied.safetensors")
    (inspected,) = embpress.inspect(tmp_path / "tied.safetensors").tables
    assert inspected.aliases == ("dec.embed_tokens",)


@pytest.mark.filterwarnings("ignore:.*quantize_per_tensor:UserWarning")
def test_compress_state_dict_refuses_bad_arguments() -> None:
    state = _state()
    cases: list[tuple[object, object, type[Exception], str]] = [
        ([1, 2], None, TypeError, "state must be a dict"),
        ({"emb.weight": [1.0]}, None, TypeError, "'emb.weight' maps to list"),
        (state, "emb.weight", TypeError, "tables must be a list"),
        (state, [], ValueError, "tables is empty"),
        (state, ["nope.weight"], ValueError, "'nope.weight' is not a key"),
        (state, ["fc.bias"], ValueError, "'fc.bias' is not a '<module>.weight' tensor"),
        (state, ["fc.weight"], ValueError, "also holds 'fc.bias'"),
        # no module holds a tensor named as itself (the in-memory path dropped that tensor)
        (
            {"a_emb.weight": torch.randn(10, 8), "a_emb": torch.ones(2)},
            ["a_emb.weight"],
            ValueError,
            "a tensor is named 'a_emb', as its module",
        ),
        ({"a_emb.weight": torch.randn(10, 8), "a_emb": torch.ones(2)}, None, ValueError, "no embedding"),
        ({"fc.weight": torch.randn(3, 3)}, None, ValueError, "no embedding table found among 1 tensors"),
        (
            {
                "emb.weight": torch.randn(8, 4),
                "q": torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.quint8),
            },
            None,
            ValueError,
            "'q' is a quantized tensor",
        ),
    ]
    for bad_state, tables, error, phrase in cases:
        with pytest.raises(error, match=phrase.replace("(", r"\(").replace("[", r"\[")):
            embpress.compress_state_dict(bad_state, tables)  # type: ignore[arg-type]


def test_sparse_table_is_made_dense() -> None:
    table = torch.randn(40, 8) * (torch.rand(40, 8) < 0.5)
    sparse = embpress.compress_state_dict({"emb.weight": table.to_sparse()}, quant=QuantConfig(bits=4))
    dense = embpress.compress_state_dict({"emb.weight": table}, quant=QuantConfig(bits=4))
    got, want = sparse.module.get_submodule("emb"), dense.module.get_submodule("emb")
    assert torch.equal(got.dequantize(), want.dequantize())


# ------------------------------------------------------------------------------ inspect
def test_inspect_reports_each_table(tmp_path: Path) -> None:
    torch.save(_state(), tmp_path / "model.pt")
    out = tmp_path / "model.embp.safetensors"
    embpress.compress_checkpoint(tmp_path / "model.pt", out, ["emb*"], quant=QuantConfig(bits=4))
    assert is_embpress_file(out) and not is_embpress_file(tmp_path / "model.pt")
    report = embpress.inspect(out)
    assert (report.path, report.format, report.format_version) == (str(out), "embpress", "2")
    assert report.file_bytes == out.stat().st_size
    assert (report.other_tensors, report.other_nbytes) == (2, (72 + 3) * 4)
    loaded = {r.name: r for r in embpress.compression_report(embpress.load(_Model(), out))}
    for r in report.tables:
        want = loaded[r.name]
        assert r.kind == "auto" and r.mode is None and r.dtype is None
        for field in ("rows", "dim", "layout", "bits", "sparsity", "nbytes", "float_nbytes", "ratio"):
            assert getattr(r, field) == getattr(want, field), field
        assert r.rel_frobenius == pytest.approx(want.rel_frobenius)
    assert report.nbytes == sum(r.nbytes for r in report.tables)
    assert report.ratio == pytest.approx(report.nbytes / report.float_nbytes)


def test_inspect_refuses_a_plain_or_damaged_file(tmp_path: Path) -> None:
    torch.save(_state(), tmp_path / "model.pt")
    with pytest.raises(FormatError, match="not a readable safetensors file"):
        embpress.inspect(tmp_path / "model.pt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        embpress.inspect(tmp_path / "missing.safetensors")


def test_inspect_checkpoint(tmp_path: Path) -> None:
    state = _state()
    state["emb_bag.weight"] = state["emb_bag.weight"].to_sparse()
    torch.save(state, tmp_path / "model.pt")
    report = embpress.inspect_checkpoint(tmp_path / "model.pt")
    assert report.format == "pytorch"
    assert [t.key for t in report.tables] == ["emb.weight", "emb_bag.weight"]
    assert [t.key for t in report.copied] == ["fc.weight", "fc.bias"]
    assert (report.tables[1].shape, report.tables[1].layout) == ((200, 8), "sparse_coo")
    assert report.tables[0].nbytes == 300 * 16 * 4 and report.tables[0].dtype == "float32"
    only = embpress.inspect_checkpoint(tmp_path / "model.pt", ["emb"])
    assert [t.key for t in only.tables] == ["emb.weight"]


# ------------------------------------------------------------------------------ reading safely
def test_library_refuses_a_fifo_without_hanging(tmp_path: Path) -> None:
    """A Python caller handing a named pipe to any reading function gets a ValueError at once."""
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    code = """
        import sys
        import embpress
        from embpress.checkpoint import is_embpress_file
        for fn in (embpress.load_checkpoint, embpress.inspect, embpress.inspect_checkpoint, is_embpress_file):
            try:
                fn(sys.argv[1])
            except ValueError as err:
                print(err)
        """
    done = _python(code, str(fifo), timeout=60)
    assert done.returncode == 0, done.stderr
    line = f"{fifo}: not a regular file (a named pipe), expected a checkpoint file"
    assert done.stdout.splitlines() == [line] * 4


def test_load_checkpoint_errors_name_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        embpress.load_checkpoint(folder)
    with pytest.raises(ValueError, match=f"{empty}: the file is empty"):
        embpress.load_checkpoint(empty)
    torch.save({"emb.weight": torch.randn(2, 2), "x": nn.Linear(2, 2)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refused: the checkpoint holds Python objects"):
        embpress.load_checkpoint(tmp_path / "evil.pt")
    # a global torch blocks outright (its message says "unsupported GLOBAL"), never run
    torch.save({"emb.weight": torch.randn(2, 2), "run": os.system}, tmp_path / "system.pt")
    with pytest.raises(ValueError, match="refused: the checkpoint holds Python objects"):
        embpress.load_checkpoint(tmp_path / "system.pt")
