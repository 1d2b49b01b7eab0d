"""Deploying compressed models: torch.compile(fullgraph=True), torch.export with a dynamic
batch, save and load in a fresh process, TorchScript, and torch.library.opcheck of the
embpress ops.

The model is the issue's: an EmbeddingBag (sum, with per-sample weights), an EmbeddingBag
(mean, 2-D ids) and an Embedding (padding_idx 0), compressed with embpress in every
layout at every bit width. Programs are exported and saved once per test process (a
module fixture); one child process loads all of them.
"""

from __future__ import annotations

import io
import subprocess
import sys
from typing import Any

import pytest
import torch
from torch import nn

import embpress
from embpress import ops
from embpress.layouts import TABLE_CLASSES

LAYOUTS = list(TABLE_CLASSES)  # every registered layout gets the ops
CASES = [(layout, bits) for layout in LAYOUTS for bits in (8, 4, 2)]
DIM = 16
SIZES = (5, 11)  # two batch sizes, neither the one the programs were exported at (4)
ROWS = {"by_sum": 300, "by_mean": 200, "tokens": 100}


class DeployModel(nn.Module):
    """The issue's model: sum bag, mean bag, token embedding with padding_idx 0."""

    def __init__(self) -> None:
        super().__init__()
        self.by_sum = nn.EmbeddingBag(ROWS["by_sum"], DIM, mode="sum")
        self.by_mean = nn.EmbeddingBag(ROWS["by_mean"], DIM, mode="mean")
        self.tokens = nn.Embedding(ROWS["tokens"], DIM, padding_idx=0)
        self.head = nn.Linear(3 * DIM, 4)

    def forward(
        self,
        ids: torch.Tensor,
        offsets: torch.Tensor,
        weights: torch.Tensor,
        ids_2d: torch.Tensor,
        tokens: torch.Tensor,
    ) -> torch.Tensor:
        features = [
            self.by_sum(ids, offsets, per_sample_weights=weights),
            self.by_mean(ids_2d),
            self.tokens(tokens).mean(1),
        ]
        return self.head(torch.cat(features, 1))


def compressed_model(layout: str, bits: int) -> DeployModel:
    """The model with every table compressed in ``layout`` (whole-row blocks for pruned
    rows, so that rows really are dropped; (1, 4) blocks otherwise)."""
    torch.manual_seed(0)
    model = DeployModel().eval()
    embpress.post_training_sparse_quantize(
        model,
        embpress.DataNormSparsifier,
        quant=embpress.QuantConfig(bits=bits, layout=layout),
        sparsity_level=0.6,
        sparse_block_shape=(1, DIM) if layout == "pruned_rows" else (1, 4),
    )
    for name in ROWS:
        module = getattr(model, name)
        assert isinstance(module, (embpress.QuantizedEmbedding, embpress.QuantizedEmbeddingBag))
        assert module.layout == layout and module.bits == bits
    return model


def batch(size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs for ``size`` samples: bags of 0..6 ids (empty ones too), padded tokens."""
    gen = torch.Generator().manual_seed(seed * 1000 + size)
    lengths = torch.randint(0, 7, (size,), generator=gen)
    offsets = torch.cumsum(lengths, 0) - lengths
    ids = torch.randint(0, ROWS["by_sum"], (int(lengths.sum()),), generator=gen)
    weights = torch.rand(ids.shape, generator=gen)
    ids_2d = torch.randint(0, ROWS["by_mean"], (size, 5), generator=gen)
    tokens = torch.randint(0, ROWS["tokens"], (size, 7), generator=gen)
    tokens[:, -2:] = 0  # padding
    return ids, offsets, weights, ids_2d, tokens


def dynamic_shapes() -> dict[str, dict[int, Any]]:
    b = torch.export.Dim("batch", min=2, max=4096)
    n = torch.export.Dim("ids", min=2, max=1 << 20)
    return {"ids": {0: n}, "offsets": {0: b}, "weights": {0: n}, "ids_2d": {0: b}, "tokens": {0: b}}


def case_name(layout: str, bits: int) -> str:
    return f"{layout}-{bits}"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every case built, exported with a dynamic batch and saved (with its inputs and eager
    outputs at both sizes, and TorchScript traced and scripted versions)."""
    root = tmp_path_factory.mktemp("deployed")
    out: dict[str, Any] = {"root": root, "cases": {}}
    for layout, bits in CASES:
        name = case_name(layout, bits)
        model = compressed_model(layout, bits)
        with torch.inference_mode():
            inputs = {size: batch(size) for size in SIZES}
            eager = {size: model(*inputs[size]) for size in SIZES}
        program = torch.export.export(model, batch(4, seed=1), dynamic_shapes=dynamic_shapes())
        torch.export.save(program, root / f"{name}.pt2")
        torch.jit.trace(model, batch(4, seed=1)).save(str(root / f"{name}.trace.pt"))
        torch.jit.script(model).save(str(root / f"{name}.script.pt"))
        torch.save({"inputs": inputs, "eager": eager}, root / f"{name}.expected.pt")
        out["cases"][name] = {"model": model, "program": program, "inputs": inputs, "eager": eager}
    return out


# ------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize(("layout", "bits"), CASES)
def test_compile_fullgraph_gives_the_eager_outputs(layout, bits):
    """Dynamo captures the whole forward (fullgraph: a graph break raises) and the compiled
    model gives the eager outputs bit for bit, at two batch sizes, in inference mode."""
    torch.compiler.reset()
    model = compressed_model(layout, bits)
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=True)
    with torch.inference_mode():
        for size in SIZES:
            inputs = batch(size)
            assert torch.equal(compiled(*inputs), model(*inputs))


@pytest.mark.slow
def test_compile_with_inductor_gives_the_eager_outputs():
    """The default backend too (one case: it compiles C++, which takes a while)."""
    torch.compiler.reset()
    model = compressed_model("block_sparse", 4)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    with torch.inference_mode():
        for size in SIZES:
            inputs = batch(size)
            torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ torch.export
@pytest.mark.parametrize(("layout", "bits"), CASES)
def test_export_with_a_dynamic_batch(deployed, layout, bits):
    """The exported graph holds one embpress op per table and plain aten ops, no Python
    callback; the tables are the program's buffers; it runs at other batch sizes."""
    case = deployed["cases"][case_name(layout, bits)]
    program, model = case["program"], case["model"]
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    embpress_ops = [t for t in targets if getattr(t, "namespace", None) == "embpress"]
    assert sorted(str(t) for t in embpress_ops) == [
        "embpress.embedding.default",
        "embpress.embedding_bag.default",
        "embpress.embedding_bag.default",
    ]
    others = [t for t in targets if t not in embpress_ops]
    assert all(getattr(t, "namespace", None) == "aten" for t in others), others

    buffers = program.graph_signature.inputs_to_buffers.values()
    for name in ROWS:
        table = getattr(model, name).table
        for tensor_name in table.op_tensor_names:
            assert f"{name}.table.{tensor_name}" in buffers
            assert torch.equal(program.state_dict[f"{name}.table.{tensor_name}"], getattr(table, tensor_name))

    module = program.module()
    for size in SIZES:
        assert torch.equal(module(*case["inputs"][size]), case["eager"][size])


_LOAD_SCRIPT = """
import sys
from pathlib import Path

import torch

import embpress  # registers the embpress ops the programs call

root = Path(sys.argv[1])
for expected_file in sorted(root.glob("*.expected.pt")):
    name = expected_file.name.removesuffix(".expected.pt")
    expected = torch.load(expected_file, weights_only=True)
    program = torch.export.load(root / f"{name}.pt2").module()
    traced = torch.jit.load(str(root / f"{name}.trace.pt"))
    scripted = torch.jit.load(str(root / f"{name}.script.pt"))
    with torch.inference_mode():
        for size, inputs in expected["inputs"].items():
            for kind, runner in (("export", program), ("trace", traced), ("script", scripted)):
                if not torch.equal(runner(*inputs), expected["eager"][size]):
                    raise SystemExit(f"{name} {kind} batch {size}: outputs differ from eager")
    print("ok", name)
"""


def test_saved_programs_reproduce_eager_in_a_fresh_process(deployed):
    """torch.export.save -> torch.export.load (and TorchScript save -> load) in a fresh
    process that imports embpress: the eager outputs, bit for bit, at both batch sizes."""
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, str(deployed["root"])],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-2000:]
    assert sorted(result.stdout.splitlines()) == sorted(f"ok {case_name(*case)}" for case in CASES)


def test_loading_without_embpress_fails_naming_it(deployed):
    """Without ``import embpress`` the ops are unknown: torch.export.load fails and its log
    names the op and says to import it; torch.jit.load fails naming the op."""
    program = deployed["root"] / f"{case_name('dense', 8)}.pt2"
    script = deployed["root"] / f"{case_name('dense', 8)}.script.pt"
    for code in (
        f"import torch; torch.export.load({str(program)!r})",
        f"import torch; torch.jit.load({str(script)!r})",
    ):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert result.returncode != 0
        assert "embpress" in result.stderr and "embedding_bag" in result.stderr, result.stderr[-2000:]


# ------------------------------------------------------------------ the ops themselves
def _table_args(table) -> tuple:
    return (table.op_tensors(), *table.op_fields())


def _op_forms(layout: str) -> list[tuple[Any, tuple]]:
    """(op, args) for every forward form of both ops, on a small table of ``layout``."""
    torch.manual_seed(2)
    weight = torch.randn(40, 12)
    mask = embpress.sparsify.block_norm_mask(weight, 0.5, (1, 12) if layout == "pruned_rows" else (1, 4))
    config = embpress.QuantConfig(bits=4, layout=layout)
    module = nn.Embedding.from_pretrained(weight)
    table = embpress.QuantizedEmbedding.from_float(module, config, mask=mask, block_width=4).table
    assert table.layout == layout
    t = _table_args(table)
    ids = torch.tensor([3, 0, 7, 7, 39, 1, 0, 22])
    offsets = torch.tensor([0, 2, 2, 5])
    last = torch.tensor([0, 2, 2, 5, 8])
    weights = torch.rand(8)
    grid = ids.view(2, 4)
    bag, emb = torch.ops.embpress.embedding_bag.default, torch.ops.embpress.embedding.default
    forms = []
    for mode in (ops.SUM, ops.MEAN, ops.MAX):
        forms += [
            (bag, (*t, ids, offsets, None, mode, False, None, None, 2.0)),  # 1-D with offsets
            (bag, (*t, ids.int(), last.int(), None, mode, True, None, None, 2.0)),  # include_last_offset
            (bag, (*t, grid, None, None, mode, False, None, None, 2.0)),  # 2-D
            (bag, (*t, ids, offsets, None, mode, False, 0, None, 2.0)),  # padding_idx
            (bag, (*t, ids, offsets, None, mode, False, None, 0.5, 1.0)),  # max_norm
        ]
    forms += [
        (bag, (*t, ids, offsets, weights, ops.SUM, False, None, None, 2.0)),  # per_sample_weights
        (bag, (*t, ids, last, weights.clone().requires_grad_(), ops.SUM, True, 0, 0.5, 2.0)),  # + gradient
        (bag, (*t, grid, None, weights.view(2, 4), ops.SUM, False, 7, None, 2.0)),
        (bag, (*t, ids[:0], torch.tensor([0, 0]), None, ops.MEAN, False, None, None, 2.0)),  # empty bags
    ]
    for shape in [(), (5,), (2, 3), (2, 0, 3), (2, 2, 2)]:
        forms.append((emb, (*t, torch.randint(0, 40, shape), None, 2.0)))
    forms.append((emb, (*t, grid.int(), 0.3, 2.0)))  # max_norm
    return forms


def _to_meta(arg: Any) -> Any:
    if isinstance(arg, list):
        return [_to_meta(a) for a in arg]
    return arg.to("meta") if isinstance(arg, torch.Tensor) else arg


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_every_op_and_form(layout):
    """torch.library.opcheck (schema, fake tensors, AOT dispatch with dynamic shapes) over
    every forward form of both ops; the fake output shape is the real one."""
    for op, args in _op_forms(layout):
        torch.library.opcheck(op, args)
        real = op(*args)
        meta_args = [_to_meta(a) for a in args]
        fake = op(*meta_args)
        assert fake.device.type == "meta" and fake.shape == real.shape and fake.dtype == real.dtype


@pytest.mark.parametrize("layout", LAYOUTS)
def test_plain_torch_kernel_matches_the_cpu_kernel(layout):
    """The kernel registered for every device but CPU (CompositeExplicitAutograd: plain
    torch ops) gives the CPU kernel's outputs; run here on CPU tensors."""
    key = torch._C.DispatchKey.CompositeExplicitAutograd
    for op, args in _op_forms(layout):
        torch.testing.assert_close(op._op_dk(key, *args), op(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bag_op_outside_inference_mode_is_still_seen_by_traces_and_modes(layout):
    """The bag op's autograd kernel calls the CPU kernel itself when nothing needs a
    gradient and nothing lies between it and the CPU kernel; a trace or a dispatch mode
    must still see the op, and the outputs match inference mode's."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[Any] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    bag = torch.ops.embpress.embedding_bag.default
    for op, args in _op_forms(layout):
        if op is not bag:
            continue
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        with torch.inference_mode():
            expected = op(*args)
        assert torch.equal(op(*args), expected)  # grad mode on: the autograd kernel runs
        with Seen() as seen:
            out = op(*args)
        assert bag in seen.ops and torch.equal(out, expected)
        graph = make_fx(lambda *a: bag(*a), tracing_mode="real")(*args)
        assert any(node.target is bag for node in graph.graph.nodes)
        weights = args[9]
        if weights is not None:  # a weight that wants a gradient gets one, except under no_grad
            wanting = (*args[:9], weights.clone().requires_grad_(), *args[10:])
            assert op(*wanting).grad_fn is not None
            with torch.no_grad():
                assert op(*wanting).grad_fn is None


def test_op_refuses_unknown_layouts_and_bad_arguments():
    table = compressed_model("block_sparse", 8).by_sum.table
    t = list(_table_args(table))
    ids, offsets = torch.tensor([1, 2]), torch.tensor([0])
    bag = torch.ops.embpress.embedding_bag.default
    rest = (ids, offsets, None, ops.SUM, False, None, None, 2.0)
    with pytest.raises(ValueError, match="unknown embpress layout 'csr'"):
        bag(t[0], "csr", *t[2:], *rest)
    with pytest.raises(ValueError, match="takes 3 tensors"):
        bag(t[0][:2], *t[1:], *rest)
    with pytest.raises(ValueError, match="block_width"):
        bag(*t[:6], [], *rest)
    with pytest.raises(ValueError, match="mode"):
        bag(*t, ids, offsets, None, 3, False, None, None, 2.0)
    with pytest.raises(IndexError, match="out of range"):
        bag(*t, torch.tensor([1, 300]), offsets, None, ops.SUM, False, None, None, 2.0)
    assert TABLE_CLASSES["block_sparse"] is type(table)


def test_modules_call_the_op_whenever_something_observes_them():
    """Plain eager calls run the op's kernel directly; under a dispatch mode (as make_fx,
    FakeTensorMode and profilers use) the modules call the op itself, with the same outputs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    for layout in LAYOUTS:
        model = compressed_model(layout, 4)
        inputs = batch(6)
        plain = model(*inputs)
        with Record() as record:
            observed = model(*inputs)
        assert torch.equal(observed, plain)
        assert record.ops.count("embpress.embedding_bag.default") == 2
        assert record.ops.count("embpress.embedding.default") == 1


def _reference_bag(table, ids, offsets, weights, last, padding_idx, max_norm):
    """F.embedding_bag on the dequantized table; ids past the last offset are dropped
    first (torch's backward gives them a gradient although its forward skips them)."""
    import torch.nn.functional as F

    used = int(offsets[-1]) if last else ids.numel()
    out = F.embedding_bag(
        ids[:used],
        table.clone(),  # max_norm renormalises the weight in place
        offsets,
        mode="sum",
        per_sample_weights=weights[:used],
        include_last_offset=last,
        padding_idx=padding_idx,
        max_norm=max_norm,
    )
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_per_sample_weights_get_their_gradient(layout):
    """The op's autograd formula: d out / d per_sample_weights as nn.EmbeddingBag's on the
    dequantized table (padding ids 0, renormed rows, ids after the last bag 0)."""
    torch.manual_seed(3)
    float_bag = nn.EmbeddingBag(50, 8, mode="sum", padding_idx=3)
    q = embpress.QuantizedEmbeddingBag.from_float(
        float_bag, embpress.QuantConfig(bits=4, layout=layout), mask=torch.rand(50, 8) > 0.5
    )
    table = q.dequantize()
    ids = torch.tensor([3, 0, 7, 7, 39, 1, 3, 22])
    for last, offsets in ((False, torch.tensor([0, 2, 2, 5])), (True, torch.tensor([0, 2, 2, 5, 7]))):
        for max_norm in (None, 0.5):
            q.include_last_offset, q.max_norm = last, max_norm
            weights = torch.rand(8, requires_grad=True)
            ref_weights = weights.detach().clone().requires_grad_()
            out = q(ids, offsets, per_sample_weights=weights)
            ref = _reference_bag(table, ids, offsets, ref_weights, last, 3, max_norm)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            grad = torch.randn_like(ref)
            (out * grad).sum().backward()
            (ref * grad).sum().backward()
            expected = torch.zeros(8)
            expected[: ref_weights.grad.numel()] = ref_weights.grad
            torch.testing.assert_close(weights.grad, expected, rtol=1e-5, atol=1e-5)
            assert weights.grad[0] == 0 and weights.grad[6] == 0  # padding ids


@pytest.mark.parametrize("layout", LAYOUTS)
def test_per_sample_weights_gradient_under_torch_func(layout):
    """torch.func.grad and jacrev take d out / d per_sample_weights as they take
    nn.EmbeddingBag's (the module hands them an autograd.Function, which no custom op's
    autograd kernel can)."""
    torch.manual_seed(5)
    q = embpress.QuantizedEmbeddingBag.from_float(
        nn.EmbeddingBag(60, 8, mode="sum", padding_idx=2),
        embpress.QuantConfig(bits=4, layout=layout),
        mask=torch.rand(60, 8) > 0.5,
    )
    ref = nn.EmbeddingBag(60, 8, mode="sum", padding_idx=2)
    ref.weight.data = q.dequantize()
    ids = torch.tensor([2, 0, 7, 7, 39, 1, 2, 22, 59])
    offsets = torch.tensor([0, 2, 2, 5])
    weights = torch.rand(9)
    scale = torch.randn(4, 8)

    def loss(module):
        return lambda w: (module(ids, offsets, per_sample_weights=w) * scale).sum()

    got = torch.func.grad(loss(q))(weights)
    torch.testing.assert_close(got, torch.func.grad(loss(ref))(weights), rtol=1e-5, atol=1e-5)
    assert got[0] == 0 and got[6] == 0  # padding ids
    jacobian = torch.func.jacrev(lambda w: q(ids, offsets, per_sample_weights=w))(weights)
    expected = torch.func.jacrev(lambda w: ref(ids, offsets, per_sample_weights=w))(weights)
    torch.testing.assert_close(jacobian, expected, rtol=1e-5, atol=1e-5)
    # and compiled, either way round (the op's autograd kernel failed under both)
    torch._dynamo.reset()
    compiled = torch.func.grad(torch.compile(loss(q), fullgraph=True, backend="eager"))(weights)
    torch.testing.assert_close(compiled, got, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()
    compiled = torch.compile(torch.func.grad(loss(q)), fullgraph=True, backend="eager")(weights)
    torch.testing.assert_close(compiled, got, rtol=1e-6, atol=1e-6)


def test_gradient_skips_ids_after_the_last_bag():
    """With include_last_offset, ids after the last offset belong to no bag: the forward
    does not look them up (nor range-check them, as torch), and neither does the gradient,
    which is 0 there."""
    q = embpress.QuantizedEmbeddingBag.from_float(
        nn.EmbeddingBag(50, 8, mode="sum"), embpress.QuantConfig(bits=4, layout="dense")
    )
    q.include_last_offset = True
    ids = torch.tensor([1, 2, 4, 50])  # 50 is out of range, after the last offset (3)
    weights = torch.rand(4, requires_grad=True)
    out = q(ids, torch.tensor([0, 2, 3]), per_sample_weights=weights)
    out.sum().backward()
    rows = q.dequantize()
    expected = torch.stack([rows[1].sum(), rows[2].sum(), rows[4].sum(), torch.tensor(0.0)])
    torch.testing.assert_close(weights.grad, expected)


@pytest.mark.parametrize("last", [False, True])
def test_gradient_of_ids_in_no_bag_at_all_is_zero(last):
    """Ids but no bag (empty offsets; [0] with include_last_offset): the output has no
    rows, so no weight changes it and each gradient is 0 (the backward indexed the empty
    gradient and raised; nn.EmbeddingBag's own backward gives these ids nonzero gradients,
    which no output depends on)."""
    float_bag = nn.EmbeddingBag(50, 8, mode="sum", include_last_offset=last)
    q = embpress.QuantizedEmbeddingBag.from_float(
        float_bag, embpress.QuantConfig(bits=4, layout="block_sparse")
    )
    ids, offsets = torch.tensor([1, 2]), torch.tensor([0] if last else [], dtype=torch.long)
    weights = torch.ones(2, requires_grad=True)
    out = q(ids, offsets, per_sample_weights=weights)
    assert out.shape == float_bag(ids, offsets, per_sample_weights=weights.detach()).shape == (0, 8)
    out.sum().backward()
    assert torch.equal(weights.grad, torch.zeros(2))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fx_symbolic_trace_records_the_ops(layout):
    """``torch.fx.symbolic_trace`` (FX quantization of the rest of a model, Hugging Face's
    fx) traces a compressed model as it traces the float one: the graph calls the embpress
    ops on the tables' buffers and gives the eager outputs (it raised on the proxies)."""
    model = compressed_model(layout, 4)
    graph_module = torch.fx.symbolic_trace(model)
    targets = {str(n.target) for n in graph_module.graph.nodes if n.op == "call_function"}
    assert {"embpress.embedding_bag.default", "embpress.embedding.default"} <= {
        t if t.endswith(".default") else t + ".default" for t in targets
    }
    for size in SIZES:
        inputs = batch(size)
        assert torch.equal(graph_module(*inputs), model(*inputs))


def test_fx_traced_bag_checks_its_weights_as_it_runs():
    """A bag traced on its own: its optional ``per_sample_weights`` may be None when the
    graph runs (the traced cast failed on None), and weights of another dtype than the
    module's output are refused as eagerly."""
    torch.manual_seed(3)
    bag = embpress.QuantizedEmbeddingBag.from_float(
        nn.EmbeddingBag(60, 8, mode="sum").half(),
        embpress.QuantConfig(bits=8, layout="block_sparse"),
        mask=torch.rand(60, 8) > 0.5,
    )
    graph_module = torch.fx.symbolic_trace(bag)
    ids, offsets = torch.randint(0, 60, (12,)), torch.tensor([0, 4, 9])
    weights = torch.rand(12).half()
    assert torch.equal(graph_module(ids, offsets), bag(ids, offsets))
    assert torch.equal(graph_module(ids, offsets, weights), bag(ids, offsets, per_sample_weights=weights))
    with pytest.raises(RuntimeError, match=r"must have dtype torch\.float16"):
        graph_module(ids, offsets, weights.double())


def test_a_loaded_program_of_many_tables_checks_each_once(monkeypatch):
    """Each table a loaded program's ops are given is validated the first time only,
    however many tables the program holds (a bounded cache of 64 made a program of more
    validate every table on every call)."""

    class Many(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bags = nn.ModuleList(nn.EmbeddingBag(40, 8, mode="sum") for _ in range(70))

        def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
            return torch.stack([bag(ids, offsets) for bag in self.bags]).sum(0)

    torch.manual_seed(4)
    model = Many()
    embpress.post_training_sparse_quantize(
        model,
        embpress.DataNormSparsifier,
        quant=embpress.QuantConfig(bits=8, layout="block_sparse"),
        sparsity_level=0.5,
    )
    ids, offsets = torch.randint(0, 40, (20,)), torch.tensor([0, 7, 13])
    saved = io.BytesIO()
    torch.export.save(torch.export.export(model, (ids, offsets)), saved)
    saved.seek(0)
    program = torch.export.load(saved).module()
    from embpress.layouts.block_sparse import BlockSparseTable

    calls = []
    real = BlockSparseTable.from_tensors.__func__

    def counted(cls, meta, tensors, count_pruned=False):
        calls.append(cls)
        return real(cls, meta, tensors, count_pruned)

    monkeypatch.setattr(BlockSparseTable, "from_tensors", classmethod(counted))
    first = program(ids, offsets)
    assert len(calls) == 70
    assert torch.equal(program(ids, offsets), first) and len(calls) == 70
    monkeypatch.undo()
    assert torch.equal(first, model(ids, offsets))


class _OneBag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.e = nn.EmbeddingBag(400, 32, mode="sum")

    def forward(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        return self.e(x, o)


def test_an_exported_mixed_table_refuses_another_tables_state():
    """A mixed table's op arguments say where each class's rows start in its payload, which
    depends on the table: an exported program given another mixed table's state of the
    same shapes (``strict=False``) raises instead of reading that state at the first
    table's places (it returned wrong values); the program's own state still runs."""

    def mixed(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = _OneBag()
        embpress.plan(model, budget_bytes=2000).apply(model)
        return model

    first, other = mixed(0), mixed(1)
    first_args, other_args = first.e.table.layout_args(), other.e.table.layout_args()
    assert first_args != other_args  # the seeds give other class sizes
    assert {k: v.shape for k, v in first.state_dict().items()} == {
        k: v.shape for k, v in other.state_dict().items()
    }
    x, o = torch.randint(0, 400, (64,)), torch.arange(0, 64, 4)
    saved = io.BytesIO()  # saved and loaded, as a server gets it: its own buffers
    torch.export.save(torch.export.export(first, (x, o)), saved)
    saved.seek(0)
    program = torch.export.load(saved).module()
    assert torch.equal(program(x, o), first(x, o))
    program.load_state_dict(other.state_dict(), strict=False)
    with pytest.raises(ValueError, match="not those of the table the op was made for"):
        program(x, o)


def test_an_exported_mixed_table_in_its_models_process_refuses_another_tables_state():
    """Not saved, the program shares its buffers with the model: the other table's state
    copied into them is validated (against the model's fields) before any kernel reads
    it; the program refuses it as another table, and the model serves what its buffers
    now hold, that table (both returned NaN, reading it at the first table's places)."""

    def mixed(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = _OneBag()
        with torch.no_grad():
            model.e.weight.mul_(torch.rand(400, 1) * 3)
        embpress.plan(model, budget_bytes=2000, codecs=["rowwise4", "levels2"]).apply(model)
        return model

    first, other = mixed(0), mixed(1)
    assert first.e.table.meta()["codecs"] == other.e.table.meta()["codecs"]
    assert first.e.table.layout_args() != other.e.table.layout_args()  # other class sizes
    assert [t.shape for t in first.e.table.buffers()] == [t.shape for t in other.e.table.buffers()]
    x, o = torch.randint(0, 400, (64,)), torch.arange(0, 64, 4)
    program = torch.export.export(first, (x, o)).module()
    assert torch.equal(program(x, o), first(x, o))
    program.load_state_dict(other.state_dict(), strict=False)
    with pytest.raises(ValueError, match="not those of the table the op was made for"):
        program(x, o)
    assert torch.equal(first(x, o), other(x, o))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_exported_program_refuses_a_damaged_table_instead_of_reading_it(layout):
    """A state loaded into a saved and loaded program (``strict=False``, as the README
    puts a state into one), or a tampered program file, reaches the op as tensors the
    program owns: they are validated as a table before a kernel reads them (a damaged
    block-sparse offset crashed the process, others gave NaN or garbage)."""
    model = compressed_model(layout, 8)
    inputs = batch(17)
    saved = io.BytesIO()
    torch.export.save(torch.export.export(model, inputs), saved)
    saved.seek(0)
    program = torch.export.load(saved).module()
    expected = program(*inputs)
    good = {k: v.clone() for k, v in program.state_dict().items()}
    for key in [k for k in good if ".table." in k and good[k].numel()]:
        damaged = {**good, key: good[key].clone()}
        damaged[key].view(torch.uint8).fill_(0xFF)
        program.load_state_dict(damaged, strict=False)
        with pytest.raises(embpress.FormatError, match="not a valid"):
            program(*inputs)
        program.load_state_dict(good, strict=False)
        assert torch.equal(program(*inputs), expected)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("odd", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_give_what_torch_gives_on_the_dequantized_table(layout, odd):
    """A NaN or infinite per-sample weight reaches every column of its bag as in torch's
    sum over the dequantized rows (NaN where it meets a pruned entry's 0.0): the fused
    kernels skip pruned entries and fold the weight into the scale, so such bags take the
    plain path."""
    torch.manual_seed(0)
    float_bag = nn.EmbeddingBag(64, 16, mode="sum")
    q = embpress.QuantizedEmbeddingBag.from_float(
        float_bag, embpress.QuantConfig(bits=8, layout=layout), mask=torch.rand(64, 16) > 0.5
    )
    ref = nn.EmbeddingBag.from_pretrained(q.dequantize(), mode="sum")
    ids, offsets = torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([0, 4])
    weights = torch.tensor([odd, 1.0, 1.0, 1.0, 0.5, 2.0])
    got, want = q(ids, offsets, per_sample_weights=weights), ref(ids, offsets, per_sample_weights=weights)
    torch.testing.assert_close(got, want, equal_nan=True)
