"""``embpress plan`` and ``embpress compress --budget / --plan``: budgets parsed and met, plans
saved and applied, the new defaults of compress, and every user error as one line."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from torch import nn

import embpress
from embpress.checkpoint import parse_budget, resolve_budget
from embpress.cli import cli


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(600, 16)
        self.emb_bag = nn.EmbeddingBag(200, 8, mode="sum")
        self.fc = nn.Linear(24, 3)

    def forward(self, ids: torch.Tensor, bags: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.emb(ids), self.emb_bag(bags)], dim=1))


FLOAT32 = (600 * 16 + 200 * 8) * 4


def _model() -> Model:
    torch.manual_seed(0)
    model = Model()
    with torch.no_grad():
        model.emb.weight.mul_(torch.rand(600, 1) * 2)
    return model.eval()


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    torch.save(_model().state_dict(), path)
    return path


@pytest.fixture
def usage_file(tmp_path: Path) -> Path:
    model = _model()
    with embpress.record_usage(model) as usage:
        model(torch.randint(0, 100, (400,)), torch.randint(0, 200, (400, 2)))
    path = tmp_path / "usage.safetensors"
    usage.save(path)
    return path


def _run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _one_error(result: Result, code: int, *words: str) -> None:
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


# ------------------------------------------------------------------------------ budgets
@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("20MB", 20_000_000),
        ("1.5kB", 1500),
        ("512 kb", 512_000),
        ("2GB", 2_000_000_000),
        ("64KiB", 65536),
        ("2 MiB", 2 * 2**20),
        ("1GiB", 2**30),
        ("123456", 123456),
        ("100B", 100),
        ("1/16", Fraction(1, 16)),
        (" 3 / 4 ", Fraction(3, 4)),
        ("1/1", Fraction(1)),
    ],
)
def test_parse_budget(text: str, value: int | Fraction) -> None:
    got = parse_budget(text)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    "text", ["", "0", "0MB", "1.5B", "1.5", "2/1", "1/0", "0/3", "x", "-5MB", "5 XB", "1e6"]
)
def test_parse_budget_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_budget(text)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("0", "the size must be at least 16 MiB"),
        ("1/2", "'1/2' is not a size"),
        ("abc", "'abc' is not a size"),
        ("4KiB", "must be at least 16 MiB"),
        ("99999999999999999999TB", "must be at most 9223372036854775807 bytes"),
    ],
)
def test_memory_option_errors_speak_of_a_size_not_a_budget(tmp_path: Path, value: str, words: str) -> None:
    """--memory takes bytes only, at least what a chunked compression needs; its errors say
    so, as a usage error, without the budget's wording."""
    from embpress import streaming
    from embpress.cli import compress

    memory = next(p for p in compress.params if p.name == "memory")
    assert memory.type.minimum == streaming.MIN_MEMORY  # type: ignore[attr-defined]
    result = _run("compress", tmp_path / "in.pt", tmp_path / "out.safetensors", "--memory", value)
    assert result.exit_code == 2
    assert words in result.output and "budget" not in result.output and "share" not in result.output
    assert "--memory" in result.output


def test_resolve_budget() -> None:
    assert resolve_budget(Fraction(1, 16), 1600) == 100
    assert resolve_budget(Fraction(1, 3), 100) == 33  # rounded down: never over
    assert resolve_budget(5000, 100) == 5000
    with pytest.raises(TypeError):
        resolve_budget(0.5, 100)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ plan
def test_plan_prints_and_saves(ckpt: Path, usage_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    result = _run("plan", ckpt, "--budget", "1/16", "--usage", usage_file, "--json", out)
    assert result.exit_code == 0, result.stderr
    for word in ("plan: 2 table(s)", "emb_bag", "total", "usage-weighted", "%", f"wrote {out}"):
        assert word in result.stdout, word
    saved = embpress.Plan.load(out)
    assert saved.predicted_bytes <= FLOAT32 // 16 and saved.with_usage
    assert saved.budget_bytes == FLOAT32 // 16
    assert {t.name for t in saved.tables} == {"emb", "emb_bag"}

    only_json = _run("plan", ckpt, "--budget", "1/16", "--usage", usage_file, "--json", "-")
    assert only_json.exit_code == 0
    assert json.loads(only_json.stdout) == saved.to_json()

    # the same plan from Python, on the model itself
    model = _model()
    direct = embpress.plan(model, FLOAT32 // 16, usage=embpress.Usage.load(usage_file))
    assert direct.to_json() == saved.to_json()


def test_plan_max_error_and_tables(ckpt: Path) -> None:
    result = _run("plan", ckpt, "--max-error", "1.0", "--tables", "emb", "--json", "-")
    assert result.exit_code == 0, result.stderr
    obj = json.loads(result.stdout)
    assert [t["name"] for t in obj["tables"]] == ["emb"]
    assert obj["max_error"] == 1.0 and obj["budget_bytes"] is None
    assert sum(t["predicted_error"] for t in obj["tables"]) <= 1.0


# ------------------------------------------------------------------------------ compress
def test_compress_with_budget_meets_it(ckpt: Path, usage_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    result = _run("compress", ckpt, out, "--budget", "3kB", "--usage", usage_file, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["settings"]["planned"] and report["settings"]["budget_bytes"] == 3000
    assert report["total"]["bytes_after"] <= 3000
    loaded = embpress.load(Model(), out)
    assert loaded.emb.layout == loaded.emb_bag.layout == "mixed"
    assert loaded.emb.nbytes + loaded.emb_bag.nbytes == report["total"]["bytes_after"]
    assert isinstance(loaded.emb_bag, embpress.QuantizedEmbeddingBag) and loaded.emb_bag.mode == "sum"
    # the same as planning and applying in Python
    model = _model()
    embpress.plan(model, 3000, usage=embpress.Usage.load(usage_file)).apply(
        model, embpress.Usage.load(usage_file)
    )
    assert torch.equal(model.emb.dequantize(), loaded.emb.dequantize())
    assert torch.equal(model.fc.weight, loaded.fc.weight)
    text = " ".join(_run("compress", ckpt, tmp_path / "o2.safetensors", "--budget", "3kB").stdout.split())
    assert "planned for budget 2.93 KiB, no usage" in text and "%" in text  # (lines wrap with long paths)


def test_compress_applies_a_saved_plan(ckpt: Path, tmp_path: Path) -> None:
    plan_path = tmp_path / "plan.json"
    assert _run("plan", ckpt, "--budget", "1/8", "--json", plan_path).exit_code == 0
    planned = embpress.Plan.load(plan_path)
    out = tmp_path / "out.safetensors"
    result = _run("compress", ckpt, out, "--plan", plan_path, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["total"]["bytes_after"] == planned.predicted_bytes
    rows = {r["name"]: r for r in report["tables"]}
    for t in planned.tables:
        assert rows[t.name]["bytes_after"] == t.predicted_bytes
        assert rows[t.name]["choice"] == t.summary()
    info = json.loads(_run("inspect", out, "--json").stdout)
    assert info["total"]["bytes"] == planned.predicted_bytes


def test_tied_tables_with_a_plan(tmp_path: Path) -> None:
    shared = torch.randn(100, 8)
    src = tmp_path / "tied.pt"
    torch.save({"enc.embed_tokens.weight": shared, "dec.embed_tokens.weight": shared}, src)
    plan_path = tmp_path / "plan.json"
    assert _run("plan", src, "--budget", "1/8", "--json", plan_path).exit_code == 0
    result = _run("compress", src, tmp_path / "out.safetensors", "--plan", plan_path, "--json")
    assert result.exit_code == 0, result.stderr
    (row,) = json.loads(result.stdout)["tables"]
    assert row["aliases"] == ["dec.embed_tokens"]
    assert json.loads(result.stdout)["copied"]["count"] == 0
    # a plan of the two as separate tables does not fit the checkpoint that ties them
    apart = tmp_path / "apart.pt"
    torch.save({"enc.embed_tokens.weight": shared.clone(), "dec.embed_tokens.weight": shared.clone()}, apart)
    assert _run("plan", apart, "--budget", "1/8", "--json", plan_path).exit_code == 0
    refused = _run("compress", src, tmp_path / "out.safetensors", "--plan", plan_path)
    assert refused.exit_code == 1
    assert "the plan names 'enc.embed_tokens' and 'dec.embed_tokens' as two tables" in refused.stderr
    assert "ties them" in refused.stderr


def test_compress_defaults_are_4_bits_no_pruning(ckpt: Path, tmp_path: Path) -> None:
    result = _run("compress", ckpt, tmp_path / "out.safetensors", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["settings"]["bits"] == 4 and report["settings"]["sparsity"] == 0.0
    for row in report["tables"]:
        assert row["bits"] == 4 and row["sparsity"] == 0.0 and row["layout"] == "dense"
    lib = embpress.compress_state_dict(_model().state_dict())
    assert [(t.bits, t.sparsity) for t in lib.tables] == [(4, 0.0), (4, 0.0)]


# ------------------------------------------------------------------------------ errors
def test_user_errors_are_one_line(ckpt: Path, usage_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    wrong_rows = tmp_path / "wrong.safetensors"
    embpress.Usage({"emb": torch.ones(599), "emb_bag": torch.ones(200)}).save(wrong_rows)
    other_plan = tmp_path / "other.json"
    small = nn.ModuleDict({"emb": nn.Embedding(10, 16), "emb_bag": nn.Embedding(200, 8)})
    embpress.plan(small, 2000).save(other_plan)
    broken_plan = tmp_path / "broken.json"
    broken_plan.write_text('{"format": "embpress-plan"')
    not_usage = tmp_path / "notusage.safetensors"
    not_usage.write_bytes(b"garbage")
    extra_table = tmp_path / "extra.safetensors"  # counts a table the checkpoint lacks
    embpress.Usage({**embpress.Usage.load(usage_file).counts, "other": torch.ones(3)}).save(extra_table)
    left_out = tmp_path / "leftout.safetensors"  # wrong rows for a table --tables leaves out
    embpress.Usage({"emb": embpress.Usage.load(usage_file).counts["emb"], "emb_bag": torch.ones(999)}).save(
        left_out
    )
    left_out_words = ("leftout.safetensors", "'emb_bag'", "999 rows")
    cases: list[tuple[list[str | Path], int, tuple[str, ...]]] = [
        (
            ["plan", ckpt, "--budget", "10"],
            1,
            ("the budget, 10 bytes (10 B), is below the smallest possible size", "bytes"),
        ),
        (["plan", ckpt], 2, ("--budget",)),
        (["plan", ckpt, "--budget", "1MB", "--max-error", "1"], 2, ("one of --budget and --max-error",)),
        (["plan", ckpt, "--budget", "12XB"], 2, ("--budget", "not a budget")),
        (["plan", ckpt, "--budget", "3/2"], 2, ("--budget", "(0, 1]")),
        (["plan", ckpt, "--budget", "9999999999999999999TB"], 2, ("--budget", "at most 9223372036854775807")),
        (["plan", ckpt, "--budget", "1/8", "--usage", wrong_rows], 1, ("wrong.safetensors", "599 rows")),
        (
            ["compress", ckpt, out, "--budget", "1/8", "--usage", wrong_rows],
            1,
            ("wrong.safetensors", "599 rows"),
        ),
        (["plan", ckpt, "--budget", "1/8", "--tables", "emb", "--usage", left_out], 1, left_out_words),
        (
            ["compress", ckpt, out, "--budget", "1/8", "--tables", "emb", "--usage", left_out],
            1,
            left_out_words,
        ),
        (["plan", ckpt, "--budget", "1/8", "--usage", tmp_path / "none.safetensors"], 1, ("no such file",)),
        (["plan", ckpt, "--budget", "1/8", "--usage", not_usage], 1, ("notusage.safetensors",)),
        (
            ["plan", ckpt, "--budget", "1/8", "--usage", extra_table],
            1,
            ("extra.safetensors", "does not have: other"),
        ),
        (
            ["compress", ckpt, out, "--budget", "1/8", "--usage", extra_table],
            1,
            ("extra.safetensors", "does not have: other"),
        ),
        (["plan", ckpt, "--budget", "1/8", "--unseen-weight", "0.5"], 2, ("--unseen-weight",)),
        (["plan", ckpt, "--budget", "1/8", "--codecs", "rowwise8,rowwise3"], 2, ("--codecs", "'rowwise3'")),
        (["plan", ckpt, "--budget", "1/8", "--codecs", ","], 2, ("--codecs", "one codec name or more")),
        (["compress", ckpt, out, "--codecs", "rowwise8"], 2, ("--codecs", "with --budget or --max-error")),
        (
            ["compress", ckpt, out, "--plan", other_plan, "--codecs", "rowwise8"],
            2,
            ("--codecs", "a plan keeps"),
        ),
        (["plan", ckpt, "--budget", "1/8", "--json", tmp_path], 2, ("--json", "directory")),
        (["compress", ckpt, out, "--budget", "1/8", "--bits", "2"], 2, ("--bits", "do not combine")),
        (["compress", ckpt, out, "--budget", "1/8", "--sparsity", "0.5"], 2, ("--sparsity",)),
        (["compress", ckpt, out, "--budget", "1/8", "--plan", other_plan], 2, ("--plan", "one of")),
        (["compress", ckpt, out, "--usage", usage_file], 2, ("--usage", "only with")),
        (["compress", ckpt, out, "--plan", other_plan], 1, ("the plan is for 10 x 16",)),
        (["compress", ckpt, out, "--plan", broken_plan], 1, ("broken.json", "not a JSON file")),
        (["compress", ckpt, out, "--plan", other_plan, "--tables", "emb"], 2, ("--tables",)),
        (["compress", ckpt, out, "--budget", "1"], 1, ("smallest possible size",)),
        (["compress", ckpt, out, "--budget", "1/8", "--memory", "1GiB"], 2, ("--memory", "uniform settings")),
        (["compress", ckpt, out, "--plan", other_plan, "--gather"], 2, ("--gather", "uniform settings")),
        (["compress", ckpt, out, "--memory", "1GiB"], 2, ("--memory", "read whole")),
        (
            ["plan", ckpt, "--budget", "1/8", "--usage", tmp_path],
            1,
            ("is a directory, expected a usage file",),
        ),
        (["compress", ckpt, out, "--plan", tmp_path], 1, ("is a directory, expected a plan JSON file",)),
        (["compress", ckpt, out, "--budget", "1/8", "--usage", tmp_path], 1, ("expected a usage file",)),
    ]
    before = ckpt.read_bytes()
    for args, code, words in cases:
        _one_error(_run(*args), code, *words)
        assert not out.exists(), args
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_help_texts() -> None:
    text = " ".join(_run("plan", "--help").stdout.split())
    for word in (
        "--budget",
        "--max-error",
        "--usage",
        "--unseen-weight",
        "--codecs",
        "--tables",
        "--json",
        "1/16",
        "KiB",
    ):
        assert word in text, word
    text = " ".join(_run("compress", "--help").stdout.split())
    for word in ("--budget", "--plan", "--usage", "4 bits per entry", "[default: 4]"):
        assert word in text, word


def test_codecs_limit_what_plan_and_compress_choose(ckpt: Path, tmp_path: Path) -> None:
    """--codecs: the plan mixes only those codecs (and pruning), and compress builds that
    plan: the same tables as the library's plan with the same codecs."""
    names = ["rowwise8", "rowwise4", "rowwise2"]
    allowed = {*names, "pruned"}
    default = embpress.plan(_model(), FLOAT32 // 8)
    assert {c.name for t in default.tables for c in t.codecs} - allowed  # the limit binds here
    plan_file = tmp_path / "plan.json"
    result = _run("plan", ckpt, "--budget", "1/8", "--codecs", ",".join(names), "--json", plan_file)
    assert result.exit_code == 0, result.stderr
    chosen = {c.name for t in embpress.Plan.load(plan_file).tables for c in t.codecs}
    assert chosen <= allowed and len(chosen) > 1
    out = tmp_path / "out.safetensors"
    result = _run("compress", ckpt, out, "--budget", "1/8", "--codecs", ",".join(names), "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["settings"]["codecs"] == names
    loaded = embpress.load(_model(), out)
    for table in embpress.plan(_model(), FLOAT32 // 8, codecs=names).tables:
        got = loaded.get_submodule(table.name).table
        assert [c.name for c in got.codecs] == [c.name for c in table.codecs]


def test_planned_compress_refuses_several_processes(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torchrun (WORLD_SIZE > 1) a planned compress is refused, as the library refuses
    it, before anything is read or written."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "out.safetensors"
    for goal in (["--budget", "1/8"], ["--max-error", "1.0"]):
        _one_error(_run("compress", ckpt, out, *goal), 1, goal[0], "several processes", "uniform settings")
    assert not out.exists()


def test_a_plan_made_with_usage_is_applied_with_the_same_usage(
    ckpt: Path, usage_file: Path, tmp_path: Path
) -> None:
    """plan --usage U, then compress --plan needs --usage U (and then writes what
    compress --budget --usage U writes); without it, or with other counts, one error line;
    a plan made without usage takes no --usage."""
    plan_path = tmp_path / "plan.json"
    made = _run("plan", ckpt, "--budget", "1/16", "--usage", usage_file, "--json", plan_path)
    assert made.exit_code == 0, made.stderr
    assert f"--plan {plan_path} --usage {usage_file}" in " ".join(made.stdout.split())
    other = tmp_path / "other.safetensors"
    counts = embpress.Usage.load(usage_file).counts
    counts["emb"][5] += 1.0
    embpress.Usage(counts).save(other)
    out = tmp_path / "out.safetensors"
    _one_error(_run("compress", ckpt, out, "--plan", plan_path), 1, str(plan_path), "pass the same --usage")
    _one_error(
        _run("compress", ckpt, out, "--plan", plan_path, "--usage", other),
        1,
        "table 'emb'",
        "not the one the plan was made with",
        "--usage",
    )
    assert not out.exists()
    no_usage = tmp_path / "no_usage.json"
    assert _run("plan", ckpt, "--budget", "1/16", "--json", no_usage).exit_code == 0
    _one_error(
        _run("compress", ckpt, out, "--plan", no_usage, "--usage", usage_file), 2, "--usage", "without usage"
    )

    applied = _run("compress", ckpt, out, "--plan", plan_path, "--usage", usage_file)
    assert applied.exit_code == 0, applied.stderr
    direct = tmp_path / "direct.safetensors"
    assert _run("compress", ckpt, direct, "--budget", "1/16", "--usage", usage_file).exit_code == 0
    a, b = embpress.load(Model(), out), embpress.load(Model(), direct)
    assert torch.equal(a.emb.dequantize(), b.emb.dequantize())
    assert torch.equal(a.emb_bag.dequantize(), b.emb_bag.dequantize())


def test_plan_help_promises_at_most_the_budget() -> None:
    """The plan's bytes are at most BUDGET (a few bytes may be left), not exactly BUDGET."""
    text = " ".join(_run("plan", "--help").stdout.split())
    assert "at most BUDGET" in text and "exactly BUDGET" not in text and "fit BUDGET exactly" not in text


def test_the_printed_apply_command_runs_as_pasted(ckpt: Path, usage_file: Path, tmp_path: Path) -> None:
    """plan --json prints the command that applies the plan, each path quoted for the shell:
    paths with spaces included, it runs as printed (OUT replaced) and writes what compress
    --budget --usage writes."""
    import shlex

    spaced = tmp_path / "a dir"
    spaced.mkdir()
    src, usage, plan_path = spaced / "my model.pt", spaced / "u s.safetensors", spaced / "p p.json"
    src.write_bytes(ckpt.read_bytes())
    usage.write_bytes(usage_file.read_bytes())
    made = _run("plan", src, "--budget", "1/16", "--usage", usage, "--json", plan_path)
    assert made.exit_code == 0, made.stderr
    line = next(x for x in made.stdout.splitlines() if "apply it with: " in x)
    words = shlex.split(line.split("apply it with: ", 1)[1])
    assert words[:2] == ["embpress", "compress"] and words.count("OUT") == 1
    out = tmp_path / "out file.safetensors"
    applied = _run(*[str(out) if w == "OUT" else w for w in words[1:]])
    assert applied.exit_code == 0, applied.stderr
    direct = tmp_path / "direct.safetensors"
    assert _run("compress", src, direct, "--budget", "1/16", "--usage", usage).exit_code == 0
    assert out.read_bytes() == direct.read_bytes()


def test_outputs_that_are_files_the_command_reads_are_refused(
    ckpt: Path, usage_file: Path, tmp_path: Path
) -> None:
    """OUT or --json naming the --usage or --plan file is refused in one line, before any
    work: the file read stays as it was (it used to be overwritten by the result)."""
    plan_file = tmp_path / "plan.json"
    made = _run("plan", ckpt, "--budget", "1/8", "--usage", usage_file, "--json", plan_file)
    assert made.exit_code == 0, made.stderr
    usage_bytes, plan_bytes = usage_file.read_bytes(), plan_file.read_bytes()
    for args, flag in (
        (("plan", ckpt, "--budget", "1/8", "--usage", usage_file, "--json", usage_file), "--usage"),
        (("compress", ckpt, usage_file, "--budget", "1/8", "--usage", usage_file), "--usage"),
        (("compress", ckpt, plan_file, "--plan", plan_file, "--usage", usage_file), "--plan"),
    ):
        refused = _run(*args)
        assert refused.exit_code == 2, refused.stderr
        assert f"is the {flag} file" in refused.stderr and len(refused.stderr.strip().splitlines()) <= 3
    assert usage_file.read_bytes() == usage_bytes and plan_file.read_bytes() == plan_bytes


def test_a_plan_of_a_table_with_nan_names_what_can_zero_it(tmp_path: Path) -> None:
    """A plan needs finite tables: the refusal names the uniform compress that can zero
    them (--nonfinite zero, which --budget does not take), and that command works."""
    src = tmp_path / "nan.pt"
    weight = torch.randn(50, 8)
    weight[3, 2] = float("nan")
    torch.save({"emb.weight": weight}, src)
    for args in (
        ("plan", src, "--budget", "1/8"),
        ("compress", src, tmp_path / "o.safetensors", "--budget", "1/8"),
    ):
        refused = _run(*args)
        assert refused.exit_code == 1
        assert (
            "compress without --budget, --max-error or --plan can zero them: --nonfinite zero"
            in refused.stderr
        )
    assert _run("compress", src, tmp_path / "o.safetensors", "--nonfinite", "zero").exit_code == 0
