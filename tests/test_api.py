"""post_training_sparse_quantize: drop-in behaviour, exact zeros in both orders, clear errors."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import embpress
from embpress import DataNormSparsifier, QuantConfig, QuantizedEmbedding, QuantizedEmbeddingBag
from embpress import post_training_sparse_quantize as ptsq

EMB_NAMES = ["emb1", "embbag1", "emb_seq.0", "emb_seq.1"]


def _tables(model):
    return {
        n: m for n, m in model.named_modules() if isinstance(m, (QuantizedEmbedding, QuantizedEmbeddingBag))
    }


def _zero_fraction(t):
    return float((t == 0).float().mean())


@pytest.mark.parametrize("sparsify_first", [True, False])
@pytest.mark.parametrize("select", [False, True])
def test_reference_scenario_gives_exact_zeros(ref_model, reference, sparsify_first, select):
    """The reference's own unit-test scenario: 80% exact zeros where it gets near-zeros."""
    ref_ptsq, ref_sparsifier = reference
    cfg = dict(sparsity_level=0.8, sparse_block_shape=(1, 1))
    selected = [ref_model.emb1, ref_model.emb_seq[1]] if select else None
    theirs = copy.deepcopy(ref_model)
    their_sel = [theirs.emb1, theirs.emb_seq[1]] if select else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_ptsq(theirs, ref_sparsifier, sparsify_first, their_sel, **cfg)
    ptsq(ref_model, DataNormSparsifier, sparsify_first, selected, **cfg)
    tables = _tables(ref_model)
    expected = ["emb1", "emb_seq.1"] if select else EMB_NAMES
    assert sorted(tables) == sorted(expected)
    for name, module in tables.items():
        table = module.dequantize()
        rows, dim = table.shape
        pruned = round(0.8 * rows * dim)
        assert int((table == 0).sum()) >= pruned
        assert module.sparsity == pytest.approx(pruned / (rows * dim))
        their = dict(theirs.named_modules())[name]
        their_table = torch.dequantize(their.weight())
        # the reference only reaches "near zero"; count its exact zeros for contrast
        assert _zero_fraction(their_table) < 0.8 <= _zero_fraction(table) + 1e-9
    assert isinstance(ref_model.linear1, nn.Linear) and isinstance(ref_model.linear2, nn.Linear)


def test_sparsify_first_prunes_the_reference_mask(ref_model, reference):
    _, ref_sparsifier = reference
    weights = {n: dict(ref_model.named_modules())[n].weight.detach().clone() for n in EMB_NAMES}
    ptsq(ref_model, DataNormSparsifier, True, sparsity_level=0.6, sparse_block_shape=(1, 2))
    for name, module in _tables(ref_model).items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = ref_sparsifier(sparsity_level=0.6, sparse_block_shape=(1, 2))
            s.add_data("t", weights[name].clone())
            s.step()
        ref_mask = s.get_mask("t").bool()
        table = module.dequantize()
        assert bool((table[~ref_mask] == 0).all())
        # kept entries: within half a quantization step of the float weights (8-bit)
        # (rows that keep pruned entries in place have 0 on their grid: range widened to 0)
        w = weights[name]
        err = (table - w).abs()[ref_mask]
        span = w.amax(1, keepdim=True).clamp(min=0) - w.amin(1, keepdim=True).clamp(max=0)
        assert bool((err <= (span / 254 / 2 * 1.01).expand_as(table)[ref_mask] + 1e-7).all())


def test_eight_bit_error_no_worse_than_reference(reference):
    ref_ptsq, ref_sparsifier = reference
    torch.manual_seed(0)
    for level in (0.0, 0.8):
        model = nn.Sequential(nn.EmbeddingBag(2000, 64))
        weight = model[0].weight.detach().clone()
        theirs = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref_ptsq(theirs, ref_sparsifier, True, sparsity_level=level, sparse_block_shape=(1, 4))
        ptsq(model, DataNormSparsifier, True, sparsity_level=level, sparse_block_shape=(1, 4))
        ours = model[0].dequantize()
        their = torch.dequantize(theirs[0].weight())
        ours_mse = float(((ours - weight) ** 2).mean())
        their_mse = float(((their - weight) ** 2).mean())
        if level == 0.0:  # same min/max grid: equal up to float rounding of ties
            assert ours_mse <= their_mse * (1 + 1e-5)
        else:  # pruned entries are exactly 0 in ours, near 0 in the reference
            assert ours_mse <= their_mse
            kept = ours != 0
            ours_kept = float(((ours - weight)[kept] ** 2).mean())
            assert ours_kept <= float(((their - weight)[kept] ** 2).mean()) * (1 + 1e-5)
        assert float((ours - weight).abs().max()) <= float((their - weight).abs().max()) * 1.001


def test_quantize_first_keeps_saved_row_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(500, 32))
    weight = model[0].weight.detach().clone()
    only_q = nn.Sequential(nn.EmbeddingBag.from_pretrained(weight.clone()))
    ptsq(only_q, DataNormSparsifier, True, sparsity_level=0.0, quant=QuantConfig(bits=4, layout="dense"))
    ptsq(
        model,
        DataNormSparsifier,
        False,
        sparsity_level=0.7,
        sparse_block_shape=(1, 4),
        quant=QuantConfig(bits=4, layout="block_sparse"),
    )
    table, plain = model[0].dequantize(), only_q[0].dequantize()
    kept = table != 0
    assert int((table == 0).sum()) >= round(0.7 * 500 * 8) * 4
    assert torch.equal(table[kept], plain[kept])  # kept entries requantize to the same codes


@pytest.mark.parametrize("layout", ["dense", "pruned_rows", "block_sparse"])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantize_first_exact_zeros_every_layout(layout, bits):
    torch.manual_seed(1)
    model = nn.ModuleDict({"a": nn.Embedding(300, 16)})
    ptsq(
        model,
        DataNormSparsifier,
        False,
        sparsity_level=0.5,
        sparse_block_shape=(1, 4),
        quant=QuantConfig(bits=bits, layout=layout),
    )
    assert model["a"].layout == layout
    assert int((model["a"].dequantize() == 0).sum()) >= round(0.5 * 300 * 4) * 4


def test_shared_module_is_compressed_once_and_stays_shared():
    shared = nn.Embedding(50, 8)
    model = nn.Module()
    model.a = shared
    model.blocks = nn.ModuleList([nn.Sequential(shared, nn.ReLU())])
    model.lin = nn.Linear(8, 2)
    lin = model.lin
    ptsq(model, DataNormSparsifier, sparsity_level=0.5)
    assert isinstance(model.a, QuantizedEmbedding)
    assert model.a is model.blocks[0][0]
    assert model.lin is lin
    assert len(embpress.compression_report(model)) == 1


def test_nested_containers_and_error_report():
    torch.manual_seed(0)  # the edge blocks' share of what is pruned varies with the weights
    model = nn.ModuleDict(
        {
            "towers": nn.ModuleList([nn.Sequential(nn.EmbeddingBag(40, 4, mode="max")) for _ in range(2)]),
            "deep": nn.ModuleDict({"x": nn.Embedding(30, 6)}),
        }
    )
    ptsq(model, DataNormSparsifier, sparsity_level=0.5, quant=QuantConfig(bits=4))
    report = {r.name: r for r in embpress.compression_report(model)}
    assert set(report) == {"towers.0.0", "towers.1.0", "deep.x"}
    assert report["towers.0.0"].kind == "EmbeddingBag"
    assert model["towers"][0][0].mode == "max"
    for r in report.values():
        assert r.bits == 4 and 0.45 < r.sparsity < 0.55  # partial edge blocks: not exactly 0.5
        assert r.nbytes < r.float_nbytes and 0 < r.rel_frobenius < 1 and r.max_abs_error > 0


@pytest.mark.parametrize("magnitude", [1e-39, 1e-20, 1e-3, 1.0, 1e20, 1e36])
@pytest.mark.parametrize(
    ("layout", "sparsity"), [("dense", 0.0), ("block_sparse", 0.5), ("pruned_rows", 0.5)]
)
def test_the_reported_error_is_the_decoded_tables_at_any_magnitude(magnitude, layout, sparsity):
    """The report's relative error is the decoded table's, computed in float64, for tables
    whose squares a float32 sum cannot hold (subnormal rows, rows near 1e20: it read 0.0)."""
    torch.manual_seed(0)
    weight = torch.randn(64, 16) * magnitude
    model = nn.Sequential(nn.Embedding.from_pretrained(weight.clone()))
    block = (1, 16) if layout == "pruned_rows" else (1, 4)
    ptsq(model, DataNormSparsifier, sparsity_level=sparsity, sparse_block_shape=block,
         quant=QuantConfig(bits=8, layout=layout))  # fmt: skip
    (report,) = embpress.compression_report(model)
    assert report.layout == layout
    exact = (model[0].dequantize().double() - weight.double()).norm() / weight.double().norm()
    assert report.rel_frobenius == pytest.approx(float(exact), rel=1e-6)


def _snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], copy.deepcopy(model.state_dict())


def _unchanged(model, snap):
    mods, state = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == mods
    for k, v in model.state_dict().items():
        assert torch.equal(v.nan_to_num(), state[k].nan_to_num())


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda m: ptsq(m, DataNormSparsifier, True, m.emb1), TypeError),
        (lambda m: ptsq(m, DataNormSparsifier, True, [m.linear1]), TypeError),
        (lambda m: ptsq(m, DataNormSparsifier, True, [nn.Embedding(3, 3)]), ValueError),
        (lambda m: ptsq(m, DataNormSparsifier, sparsity_level=1.2), ValueError),
        (lambda m: ptsq(m, DataNormSparsifier, sparsity_level=-0.2), ValueError),
        (lambda m: ptsq(m, DataNormSparsifier, sparse_block_shape=(1, 2), zeros_per_block=3), ValueError),
        (lambda m: ptsq(m, DataNormSparsifier, quant=QuantConfig(bits=3)), ValueError),
        (lambda m: ptsq(m, DataNormSparsifier, quant={"bits": 4}), TypeError),
        (lambda m: ptsq("model", DataNormSparsifier), TypeError),
        (lambda m: ptsq(m, DataNormSparsifier, sparse_block_shape=(2**70, 1)), ValueError),
        (lambda m: ptsq(m, DataNormSparsifier, sparse_block_shape=(1.5, 4)), ValueError),
        (lambda m: ptsq(m, DataNormSparsifier, sparsity_level=True), ValueError),
        (lambda m: ptsq(m, object), TypeError),
        (lambda m: ptsq(m, type("NoAddData", (), {"step": lambda s: None})), TypeError),
        (lambda m: ptsq(m, DataNormSparsifier()), TypeError),  # an instance, not the class
    ],
)
def test_bad_input_raises_and_leaves_model_unchanged(ref_model, call, error):
    snap = _snapshot(ref_model)
    with pytest.raises(error):
        call(ref_model)
    _unchanged(ref_model, snap)


def test_compressing_under_inference_mode_gives_the_same_tables():
    torch.manual_seed(0)
    w = torch.randn(60, 16)
    models = []
    for inference in (False, True):
        model = nn.Sequential(nn.EmbeddingBag.from_pretrained(w.clone(), freeze=False))
        with torch.inference_mode(inference):
            ptsq(model, DataNormSparsifier, sparsity_level=0.5)
        models.append(model)
    assert torch.equal(models[0][0].dequantize(), models[1][0].dequantize())


def test_a_sparsifier_instance_is_refused_with_what_to_pass(ref_model):
    with pytest.raises(TypeError, match=r"not DataNormSparsifier\(\)"):
        ptsq(ref_model, DataNormSparsifier(sparsity_level=0.5))


def test_nonfinite_table_is_named_and_model_unchanged(ref_model):
    with torch.no_grad():
        ref_model.emb_seq[0].weight[3, 1] = float("nan")
    snap = _snapshot(ref_model)
    with pytest.raises(ValueError, match=r"emb_seq\.0.*NaN"):
        ptsq(ref_model, DataNormSparsifier, sparsity_level=0.5)
    _unchanged(ref_model, snap)
    ptsq(ref_model, DataNormSparsifier, sparsity_level=0.5, quant=QuantConfig(nonfinite="zero"))
    assert ref_model.emb_seq[0].dequantize()[3, 1] == 0


class _CountingFirst(DataNormSparsifier):
    """DataNormSparsifier under another name: compression counts NaN/Inf first with it."""


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 3e38])
@pytest.mark.parametrize("block", [(1, 4), (1, 1)])
@pytest.mark.parametrize("level", [0.5, 0.0])
def test_nonfinite_values_found_without_counting_first(ref_model, bad, block, level):
    """With DataNormSparsifier (sparsify-first) the NaN/Inf pass is left out: a NaN (the
    sparsifier refuses its norm) or an Inf (an infinite norm) is still refused with the
    count and the model unchanged, or zeroed as the config says, also where nothing is
    pruned (no norms: counted then); finite values whose block norm overflows (3e38 twice
    in a block) compress as they do counted first."""
    with torch.no_grad():
        ref_model.emb_seq[0].weight[3, 1] = bad
        ref_model.emb_seq[0].weight[3, 2] = bad
    twin = copy.deepcopy(ref_model)
    snap = _snapshot(ref_model)
    kwargs = {"sparsity_level": level, "sparse_block_shape": block}
    if not math.isfinite(bad):
        with pytest.raises(ValueError, match=r"emb_seq\.0.* holds 2 NaN/Inf"):
            ptsq(ref_model, DataNormSparsifier, **kwargs)
        _unchanged(ref_model, snap)
    quant = QuantConfig(nonfinite="zero")
    ptsq(ref_model, DataNormSparsifier, quant=quant, **kwargs)
    ptsq(twin, _CountingFirst, quant=quant, **kwargs)
    others = dict(twin.named_modules())
    compared = 0
    for name, module in ref_model.named_modules():
        if hasattr(module, "table"):
            other = others[name].table
            for key, tensor in module.table.tensors().items():
                assert torch.equal(tensor, other.tensors()[key]), (name, key)
            compared += 1
    assert compared >= 2


def test_finite_tables_are_counted_later_only_with_our_sparsifier(monkeypatch, ref_model):
    """The upfront NaN/Inf pass is left out with DataNormSparsifier itself, sparsify-first
    (its step refuses NaN norms and counts infinite ones); a subclass, whose step may do
    neither, and quantize-first, which quantizes before the sparsifier runs, count first."""
    from embpress import api

    seen: list[bool] = []
    real = api.finite_table

    def spy(w, config, name="table", count=True, remedy=None):
        seen.append(count)
        return real(w, config, name, count, remedy)

    monkeypatch.setattr(api, "finite_table", spy)
    tables = sum(1 for m in ref_model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)))
    for cls, first, expect in ((DataNormSparsifier, True, False), (_CountingFirst, True, True),
                               (DataNormSparsifier, False, True)):  # fmt: skip
        seen.clear()
        ptsq(copy.deepcopy(ref_model), cls, first, sparsity_level=0.5)
        assert seen == [expect] * tables


def test_meta_device_model_is_refused_and_unchanged():
    with torch.device("meta"):
        model = nn.Sequential(nn.Embedding(10, 4), nn.EmbeddingBag(12, 4))
    with pytest.raises(ValueError, match=r"table '0' is on the meta device"):
        ptsq(model, DataNormSparsifier, sparsity_level=0.5)
    assert type(model[0]) is nn.Embedding and model[0].weight.is_meta


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"max_norm": 0.0}, "max_norm must be a finite number > 0 or None, got 0.0"),
        ({"max_norm": -1.0}, "got -1.0"),
        ({"max_norm": math.inf}, "got inf"),
        ({"max_norm": math.nan}, "got nan"),
        ({"max_norm": 1.0, "norm_type": math.nan}, "norm_type must be a number"),
    ],
)
def test_norm_arguments_the_file_cannot_hold_are_refused_first(kwargs, words):
    """torch's modules take any float max_norm / norm_type; a compressed module (and its file)
    takes a finite max_norm > 0 and a norm_type that is not NaN: compressing a table with
    another is refused, naming it, before anything changes (saving it had failed after)."""
    model = nn.Sequential(nn.Embedding(20, 8), nn.EmbeddingBag(20, 8, **kwargs))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"table '1': .*" + words.replace(".", r"\.")):
        ptsq(model, DataNormSparsifier, sparsity_level=0.5)
    with pytest.raises(ValueError, match=r"table '1': "):
        embpress.plan(model, 1000)
    assert type(model[0]) is nn.Embedding and type(model[1]) is nn.EmbeddingBag
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    table = embpress.layouts.encode_table(torch.randn(20, 8), None, QuantConfig())[0]
    with pytest.raises(ValueError, match=words.replace(".", r"\.")):
        QuantizedEmbeddingBag(table, "sum", **kwargs)
    with pytest.raises(TypeError, match="max_norm must be a number"):
        QuantizedEmbedding(table, max_norm="1")  # type: ignore[arg-type]
    fine = nn.Sequential(nn.Embedding(20, 8, max_norm=2), nn.EmbeddingBag(20, 8, norm_type=math.inf))
    ptsq(fine, DataNormSparsifier, sparsity_level=0.5)
    assert fine[0].max_norm == 2.0 and isinstance(fine[0].max_norm, float) and fine[1].norm_type == math.inf


def test_sparsifier_without_add_data_names_what_is_missing():
    class StepOnly:
        def step(self):
            pass

    with pytest.raises(TypeError, match=r"StepOnly.*add_data, get_mask"):
        ptsq(nn.Sequential(nn.Embedding(4, 4)), StepOnly)


def test_paths_that_meet_after_dots_become_underscores_get_their_own_masks():
    """``a.b`` and ``a_b`` were one sparsifier key: the second replaced the first."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.ModuleDict({"b": nn.Embedding(10, 4)}), "a_b": nn.Embedding(12, 4)})
    floats = {"a.b": model["a"]["b"].weight.detach().clone(), "a_b": model["a_b"].weight.detach().clone()}
    ptsq(model, DataNormSparsifier, sparsity_level=0.5, sparse_block_shape=(1, 1))
    for name, module in (("a.b", model["a"]["b"]), ("a_b", model["a_b"])):
        expected = embpress.sparsify.block_norm_mask(floats[name], 0.5, (1, 1))
        assert torch.equal(module.dequantize() != 0, expected), name


def test_empty_table_is_refused():
    model = nn.Sequential(nn.Embedding(0, 4))
    with pytest.raises(ValueError, match="empty"):
        ptsq(model, DataNormSparsifier)


def test_subclass_with_own_forward_is_skipped_with_warning():
    class Scaled(nn.Embedding):
        def forward(self, x):
            return super().forward(x) * 2.0

    class Plain(nn.Embedding):
        pass

    model = nn.ModuleDict({"scaled": Scaled(10, 4), "plain": Plain(10, 4)})
    with pytest.warns(UserWarning, match="scaled"):
        ptsq(model, DataNormSparsifier, sparsity_level=0.5)
    assert isinstance(model["scaled"], Scaled)
    assert isinstance(model["plain"], QuantizedEmbedding)


def test_reference_sparsifier_class_is_accepted(reference):
    _, ref_sparsifier = reference
    model = nn.Sequential(nn.EmbeddingBag(200, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ptsq(model, ref_sparsifier, sparsity_level=0.5, sparse_block_shape=(1, 4))
    assert model[0].sparsity == pytest.approx(0.5)
    assert model[0].layout == "block_sparse"


def test_custom_sparsifier_through_the_api():
    class FirstHalfRows(embpress.BaseDataSparsifier):
        def update_mask(self, name, data, **kwargs):
            mask = torch.ones_like(data, dtype=torch.bool)
            mask[: data.shape[0] // 2] = False
            self.state[name]["mask"] = mask

    model = nn.Sequential(nn.EmbeddingBag(100, 16))
    ptsq(model, FirstHalfRows)
    table = model[0].dequantize()
    assert bool((table[:50] == 0).all()) and bool((table[50:] != 0).any())
    assert model[0].layout == "pruned_rows"


def test_model_that_is_an_embedding_is_refused():
    with pytest.raises(ValueError, match="from_float"):
        ptsq(nn.Embedding(4, 4), DataNormSparsifier)


def test_forward_of_compressed_model_matches_dequantized_float_model(ref_model):
    ptsq(ref_model, DataNormSparsifier, sparsity_level=0.5, quant=QuantConfig(bits=4))
    idx = torch.randint(0, 100, (4, 7))
    ref = nn.EmbeddingBag.from_pretrained(ref_model.emb_seq[1].dequantize(), mode="mean")
    torch.testing.assert_close(ref_model.emb_seq[1](idx), ref(idx))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_model_stays_on_cuda(ref_model):
    ref_model = ref_model.cuda()
    ptsq(ref_model, DataNormSparsifier, sparsity_level=0.8)
    out = ref_model.embbag1(torch.randint(0, 200, (3, 4), device="cuda"))
    assert out.device.type == "cuda"


def test_tied_weights_are_reported():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(50, 8)
            self.lm_head = nn.Linear(8, 50, bias=False)
            self.lm_head.weight = self.wte.weight

    model = Tied()
    with pytest.warns(UserWarning, match=r"wte \(also lm_head.weight\)"):
        ptsq(model, DataNormSparsifier, sparsity_level=0.5)
    assert isinstance(model.wte, QuantizedEmbedding)
    assert isinstance(model.lm_head.weight, nn.Parameter)  # the head still computes in float


class _TiedModules(nn.Module):
    """Separate modules over one Parameter, as Hugging Face T5 ties its token tables."""

    def __init__(self, bag_mode: str | None = None) -> None:
        super().__init__()
        self.shared = nn.Embedding(60, 8)
        self.encoder = nn.Embedding(60, 8)
        self.decoder = nn.Embedding(60, 8) if bag_mode is None else nn.EmbeddingBag(60, 8, mode=bag_mode)
        self.encoder.weight = self.decoder.weight = self.shared.weight


def test_modules_sharing_one_weight_become_one_compressed_module(tmp_path):
    """Compressed once (not once per module), the places share the result, the report and
    the file hold one table with aliases, and a fresh tied model loads it back."""
    model = _TiedModules()
    ids = torch.tensor([[1, 5, 59]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no tied-weight warning: no float user is left
        ptsq(model, DataNormSparsifier, sparsity_level=0.5)
    assert isinstance(model.shared, QuantizedEmbedding)
    assert model.shared is model.encoder is model.decoder
    report = embpress.compression_report(model)
    assert [(r.name, r.aliases) for r in report] == [("shared", ("encoder", "decoder"))]
    path = tmp_path / "tied.safetensors"
    embpress.save(model, path)
    fresh = embpress.load(_TiedModules(), path)
    assert fresh.shared is fresh.encoder is fresh.decoder
    assert torch.equal(fresh.decoder(ids), model.shared(ids))


def test_modules_sharing_one_weight_with_other_arguments_are_compressed_apart():
    model = _TiedModules(bag_mode="sum")
    with pytest.warns(UserWarning, match="differing in kind or arguments are compressed apart"):
        ptsq(model, DataNormSparsifier, sparsity_level=0.5)
    assert model.shared is model.encoder and isinstance(model.decoder, QuantizedEmbeddingBag)
    ids = torch.tensor([[1, 5, 59]])
    torch.testing.assert_close(model.decoder(ids)[0], model.shared(ids)[0].sum(0))


def test_select_embeddings_joins_only_the_selected_tied_modules():
    model = _TiedModules()
    with pytest.warns(UserWarning, match=r"shared \(also (de|en)coder.weight\)"):
        ptsq(model, DataNormSparsifier, select_embeddings=[model.shared], sparsity_level=0.5)
    assert isinstance(model.shared, QuantizedEmbedding)
    assert type(model.encoder) is nn.Embedding and type(model.decoder) is nn.Embedding


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_half_or_double_model_keeps_its_dtype(tmp_path, dtype):
    """The compressed modules return their float weight's dtype (as the module they
    replace did), take per_sample_weights of that dtype, follow later casts of the model,
    and a model of that dtype loads the file with it; the stored codes are the same."""
    torch.manual_seed(0)
    model = nn.Module()
    model.emb, model.bag = nn.Embedding(40, 8), nn.EmbeddingBag(40, 8, mode="sum")
    model.to(dtype)
    ptsq(model, DataNormSparsifier, sparsity_level=0.5)
    ids, offsets = torch.tensor([1, 4, 39, 7]), torch.tensor([0, 2])
    weights = torch.tensor([0.5, 1.0, 2.0, -1.0], dtype=dtype)
    assert model.emb.output_dtype == model.bag.output_dtype == dtype
    assert model.emb(ids).dtype == dtype
    table = model.bag.dequantize()
    expect = F.embedding_bag(ids, table, offsets, mode="sum", per_sample_weights=weights.float())
    got = model.bag(ids, offsets, per_sample_weights=weights)
    assert got.dtype == dtype
    torch.testing.assert_close(got, expect.to(dtype), rtol=1e-5, atol=1e-5)
    assert f"output_dtype={dtype}" in repr(model.emb)
    path = tmp_path / "m.safetensors"
    embpress.save(model, path)
    shell = nn.Module()
    shell.emb, shell.bag = nn.Embedding(40, 8), nn.EmbeddingBag(40, 8, mode="sum")
    fresh = embpress.load(shell.to(dtype), path)
    assert torch.equal(fresh.emb(ids), model.emb(ids))
    model.float()
    assert model.emb(ids).dtype == torch.float32 and model.bag.table.dequantize().dtype == torch.float32
    exported = torch.export.export(model.emb.to(dtype), (ids,))
    assert exported.module()(ids).dtype == dtype


def test_output_dtype_must_be_a_float_dtype_the_modules_return():
    table = QuantizedEmbedding.from_float(nn.Embedding(10, 4)).table
    with pytest.raises(TypeError, match="output_dtype"):
        QuantizedEmbedding(table, output_dtype=torch.int32)
    with pytest.raises(TypeError, match="output_dtype"):
        QuantizedEmbeddingBag(table, output_dtype="float16")  # type: ignore[arg-type]


@pytest.mark.parametrize("sparsify_first", [True, False])
def test_an_encoding_error_names_its_table_in_either_order(sparsify_first):
    model = nn.ModuleDict({"user": nn.Embedding(30, 8), "item": nn.Embedding(20, 8)})
    with torch.no_grad():
        model["item"].weight[3] *= 1e6  # beyond float16 scales at 4 bits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^table 'item': .*float16"):
        ptsq(model, DataNormSparsifier, sparsify_first, quant=QuantConfig(bits=4), sparsity_level=0.5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class _ScaledWordEmbedding(nn.Embedding):
    """Hugging Face's ScaledWordEmbedding, as BART and M2M100 write it."""

    def __init__(self, rows: int, dim: int, embed_scale: float) -> None:
        super().__init__(rows, dim)
        self.embed_scale = embed_scale

    def forward(self, input_ids: torch.Tensor):
        return super().forward(input_ids) * self.embed_scale


class _AlmostScaled(_ScaledWordEmbedding):
    def forward(self, input_ids: torch.Tensor):
        return super().forward(input_ids) * self.embed_scale + 1.0


def test_only_a_forward_that_scales_the_lookup_is_replaced():
    """A ScaledWordEmbedding becomes a compressed module with its scale; a subclass with any
    other forward is left alone with a warning (it cannot be stood in for)."""
    from embpress.nn import embedding_scale

    torch.manual_seed(0)
    model = nn.Module()
    model.scaled, model.other = _ScaledWordEmbedding(30, 8, 4.0), _AlmostScaled(30, 8, 4.0)
    assert embedding_scale(model.scaled) == 4.0 and embedding_scale(model.other) is None
    assert embedding_scale(nn.Embedding(3, 2)) == 1.0
    ids = torch.tensor([[0, 5, 29]])
    with pytest.warns(UserWarning, match="own forward.*other"):
        ptsq(model, DataNormSparsifier, sparsity_level=0.5)
    assert isinstance(model.scaled, QuantizedEmbedding) and type(model.other) is _AlmostScaled
    assert model.scaled.output_scale == 4.0 and "output_scale=4" in repr(model.scaled)
    torch.testing.assert_close(model.scaled(ids), F.embedding(ids, model.scaled.dequantize()) * 4.0)
    with pytest.raises(TypeError, match="overrides forward"):
        QuantizedEmbedding.from_float(_AlmostScaled(30, 8, 4.0))
    with pytest.raises(ValueError, match="output_scale must be finite"):
        QuantizedEmbedding(model.scaled.table, output_scale=float("inf"))


def _one_table() -> nn.Module:
    model = nn.Module()
    model.emb = nn.Embedding(50, 16)
    return model


def _meta_embedding() -> nn.Embedding:
    with torch.device("meta"):
        return nn.Embedding(5, 4)


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        # a huge int has no float: refused as out of range, not by an OverflowError
        (lambda: embpress.plan(_one_table(), max_error=10**400), ValueError, "max_error must be a finite"),
        (
            lambda: embpress.plan(_one_table(), budget_bytes=2000, unseen_weight=10**400),
            ValueError,
            "unseen_weight",
        ),
        (
            lambda: ptsq(_one_table(), DataNormSparsifier, sparsity_level=10**400),
            ValueError,
            "sparsity_level",
        ),
        # wrong types: a TypeError naming the argument, not an AttributeError from inside
        (lambda: embpress.compression_report(None), TypeError, "model must be a torch.nn.Module"),
        (lambda: embpress.Usage([("a", torch.ones(3))]), TypeError, "counts must be a mapping"),
        (lambda: embpress.Usage({"emb": torch.ones(50)}).check(None), TypeError, "model must be"),
        (
            lambda: embpress.Usage({"emb": torch.ones(50)}).check(_one_table(), names="emb"),
            TypeError,
            "names",
        ),
        (
            lambda: QuantizedEmbedding.from_float(nn.Embedding(20, 8), mask=[[1] * 8] * 20),
            TypeError,
            "mask must",
        ),
        # tensors that hold no values
        (lambda: QuantizedEmbedding.from_float(_meta_embedding()), ValueError, "meta device"),
        (
            lambda: QuantizedEmbedding.from_float(nn.Embedding(20, 8), mask=torch.ones(20, 8).to_sparse()),
            ValueError,
            "dense tensor",
        ),
        (lambda: embpress.Usage({"a": torch.ones(3, device="meta")}), embpress.UsageError, "dense tensor"),
        (lambda: embpress.Usage({"a": torch.ones(3).to_sparse()}), embpress.UsageError, "dense tensor"),
    ],
)
def test_public_calls_refuse_bad_arguments_clearly(call, error, words):
    with pytest.raises(error, match=words):
        call()
