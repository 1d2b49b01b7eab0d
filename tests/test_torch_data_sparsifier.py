"""PyTorch's own data-sparsifier tests, run against embpress and against torch.ao.

The checks of ``test/ao/sparsity/test_data_sparsifier.py`` (pytorch/pytorch), re-expressed
for pytest. Each check runs on both implementations, so a difference from torch shows up as
a failure on one side only. Mapped or changed, and why:
- torch reads its private ``_container`` (``is_parametrized``, ``getattr``); here that is
  the public API: a name is "masked" while ``get_data(name, return_original=True)`` works,
  and the container's value is ``get_data(name, return_original=False)``.
- torch's starting mask (before ``step``) is ones of the data's dtype, embpress's int8 ones
  (a quarter of a float32 table's memory; int8 is what DataNormSparsifier's masks are after
  ``step`` in both), so the norm check's ``mask.mean()`` before ``step`` is
  ``mask.to(torch.float).mean()``, as torch's own checks write it after ``step``.
- torch clamps a ``sparsity_level`` outside [0, 1]; embpress refuses it with a ValueError
  (at ``add_data`` or ``step``). The sparsity-level check runs the in-range levels on both
  and asserts the error for the others on embpress.
- torch's sparsity-level check loops twice over one ``itertools.tee`` branch, so its second
  loop never runs (and would fail: every config squashes into the same tensor, which
  earlier checks squashed too). Here each config gets its own fresh tensor of that shape
  and the loop runs, asserting the bounds on the zero counts that torch's masks meet.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import embpress

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torch.ao.pruning._experimental import data_sparsifier as torch_ds


def _implemented(base: type) -> type:
    """torch's test sparsifier: zero the first row of the mask in place, count the steps."""

    class ImplementedSparsifier(base):  # type: ignore[misc, valid-type]
        def update_mask(self, name, data, **kwargs):
            mask = self.get_mask(name)
            mask[0] = 0
            state = self.state[name]
            state["step_count"] = state.get("step_count", 0) + 1

    return ImplementedSparsifier


IMPLEMENTATIONS = {
    "embpress": (embpress.BaseDataSparsifier, embpress.DataNormSparsifier),
    "torch": (torch_ds.BaseDataSparsifier, torch_ds.DataNormSparsifier),
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS), autouse=False)
def impl(request) -> tuple[str, type, type]:
    base, norm = IMPLEMENTATIONS[request.param]
    return request.param, _implemented(base), norm


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _name_data_config(entry: Any, defaults: dict[str, Any] | None = None) -> tuple[str, Any, Any]:
    if isinstance(entry, tuple):
        name, data = entry
        return name, data, defaults
    return entry["name"], entry["data"], entry["config"]


def _is_masked(sparsifier: Any, name: str) -> bool:
    try:
        sparsifier.get_data(name, return_original=True)
    except ValueError:
        return False
    return True


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class Checks:
    """The checks of torch's ``_BaseDataSparsiferTestCase``; ``make`` builds the sparsifier."""

    def __init__(self, implemented: type, sparsifier_type: type | None = None, **sparsifier_kwargs: Any):
        self.implemented = implemented
        self.sparsifier_type = sparsifier_type
        self.sparsifier_kwargs = sparsifier_kwargs

    def make(self, data_list, data_with_config, defaults):
        if self.sparsifier_type is None:
            sparsifier = self.implemented(data_list=data_list, **defaults)
        else:
            kwargs = {**copy.deepcopy(defaults), **self.sparsifier_kwargs, "data_list": data_list}
            sparsifier = self.sparsifier_type(**kwargs)
        assert len(sparsifier.data_groups) == len(data_list)
        for entry in data_with_config:
            sparsifier.add_data(name=entry["name"], data=entry["data"], **entry["config"])
        return sparsifier

    def run_all(self, data_list, data_with_config, defaults):
        self.constructor(data_list, data_with_config, defaults)
        self.squash_mask(data_list, data_with_config, defaults)
        self.add_data(data_list, data_with_config, defaults)
        self.step(data_list, data_with_config, defaults)
        self.state_dict(data_list, data_with_config, defaults)
        self.memory_reference(data_list, data_with_config, defaults)

    def constructor(self, data_list, data_with_config, defaults):
        sparsifier = self.make(data_list, data_with_config, defaults)
        assert len(sparsifier.data_groups) == len(data_list) + len(data_with_config)
        for entry in data_list + data_with_config:
            name, _, config = _name_data_config(entry, defaults)
            assert name in sparsifier.data_groups
            assert sparsifier.data_groups[name] == config

    def step(self, data_list, data_with_config, defaults):
        sparsifier = self.make(data_list, data_with_config, defaults)
        entries = data_list + data_with_config
        for entry in entries:
            name, data, _ = _name_data_config(entry)
            data = sparsifier._extract_weight(data)
            torch.testing.assert_close(sparsifier.get_data(name=name, return_original=False), data)
            torch.testing.assert_close(sparsifier.get_data(name=name, return_original=True), data)
            assert bool((sparsifier.get_mask(name=name)[0] == 1).all())
        for _ in range(3):
            sparsifier.step()
        for entry in entries:
            name, data, _ = _name_data_config(entry)
            data = sparsifier._extract_weight(data)
            assert bool((sparsifier.get_data(name=name, return_original=False)[0] == 0).all())
            torch.testing.assert_close(sparsifier.get_data(name=name, return_original=True), data)
            assert bool((sparsifier.get_mask(name=name)[0] == 0).all())
            assert sparsifier.state[name]["step_count"] == 3

    def squash_mask(self, data_list, data_with_config, defaults):
        sparsifier = self.make(data_list, data_with_config, defaults)
        entries = data_list + data_with_config
        for entry in entries:
            name, _, _ = _name_data_config(entry)
            assert _is_masked(sparsifier, name)
        sparsifier.step()
        sparsifier.squash_mask()
        for entry in entries:
            name, _, _ = _name_data_config(entry)
            assert not _is_masked(sparsifier, name)
            with pytest.raises(ValueError):
                sparsifier.get_data(name, return_original=True)

    def add_data(self, data_list, data_with_config, defaults):
        sparsifier = self.make(data_list, data_with_config, defaults)
        for entry in data_list + data_with_config:
            name, data1, config = _name_data_config(entry, defaults)
            data1 = sparsifier._extract_weight(data1)
            data1_old = copy.deepcopy(data1)
            assert torch.all(data1 == sparsifier.get_data(name=name))
            sparsifier.step()
            mask = sparsifier.get_mask(name)
            data2 = torch.randn(data1.shape)
            sparsifier.add_data(name=name, data=data2)
            assert torch.all(data2 == sparsifier.get_data(name=name))
            assert torch.all(sparsifier.get_mask(name) == mask)
            assert torch.all(data1_old == data1)
            assert sparsifier.data_groups[name] == config

    def state_dict(self, data_list, data_with_config, defaults):
        sparsifier1 = self.make(data_list, data_with_config, defaults)
        sparsifier2 = self.make([data_list[0]], [], defaults)
        sparsifier1.step()
        state_dict1 = sparsifier1.state_dict()
        assert sparsifier1.state != sparsifier2.state
        name, _, _ = _name_data_config(data_list[0])
        mask1, mask2 = sparsifier1.get_mask(name), sparsifier2.get_mask(name)
        assert mask1.dtype != mask2.dtype or not torch.equal(mask1, mask2)
        sparsifier2.load_state_dict(state_dict1)
        assert len(sparsifier1.state) == len(sparsifier2.state)
        assert len(sparsifier1.data_groups) == len(sparsifier2.data_groups)
        state1 = state_dict1["state"]
        for name in state1:
            assert "mask" in sparsifier1.state[name] and "mask" in sparsifier2.state[name]
            saved, loaded = state1[name]["mask"], sparsifier2.state[name]["mask"]
            assert saved.is_sparse and not loaded.is_sparse
            assert torch.all(saved.to_dense() == loaded)
            assert sparsifier1.data_groups[name] == sparsifier2.data_groups[name]
            assert torch.all(
                sparsifier1.get_data(name, return_original=False)
                == sparsifier2.get_data(name, return_original=False)
            )
            assert _is_masked(sparsifier1, name) == _is_masked(sparsifier2, name)
            if _is_masked(sparsifier1, name):
                assert torch.equal(sparsifier1.get_mask(name), sparsifier2.get_mask(name))

    def memory_reference(self, data_list, data_with_config, defaults):
        sparsifier = self.make(data_list, data_with_config, defaults)
        for entry in data_list + data_with_config:
            name, data, _ = _name_data_config(entry)
            weight = sparsifier._extract_weight(data)
            weight.data = weight + torch.randn(*weight.shape)
            contained = sparsifier.get_data(name=name)
            assert _storage_ptr(weight.data) == _storage_ptr(contained.data)
            assert torch.all(contained == weight)


class NormChecks(Checks):
    """The checks of torch's ``_NormDataSparsifierTestCase``."""

    def __init__(self, implemented: type, norm_type: type, norm: str, clamps: bool):
        super().__init__(implemented, norm_type, norm=norm)
        self.norm_type, self.norm, self.clamps = norm_type, norm, clamps

    def run_all(self, data_list, data_with_config, defaults):
        self.constructor(data_list, data_with_config, defaults)
        self.squash_mask(data_list, data_with_config, defaults)
        self.add_data(data_list, data_with_config, defaults)
        self.state_dict(data_list, data_with_config, defaults)
        self.norm_step(data_list, data_with_config, defaults)
        self.step_2_of_4()
        self.sparsity_level(data_list, data_with_config)
        self.memory_reference(data_list, data_with_config, defaults)

    @staticmethod
    def bounds(config, shape) -> tuple[float, float]:
        """torch's bounds on the fraction of zeros a mask may have."""
        level, zeros = config["sparsity_level"], config["zeros_per_block"]
        bh, bw = config["sparse_block_shape"]
        height, width = shape[-2], shape[-1]
        if zeros == 0:
            return 1.0, 1.0
        blocks = math.ceil(height / bh) * math.ceil(width / bw)
        fewest = round(blocks * level)
        most = fewest * min(bh * bw, zeros)
        return round(fewest / (height * width), 3), round(min(1.0, most / (height * width)), 3)

    def norm_step(self, data_list, data_with_config, defaults):
        sparsifier = self.make(data_list, data_with_config, defaults)
        entries = data_list + data_with_config
        for entry in entries:
            name, _, _ = _name_data_config(entry)
            # torch: ``mask.mean()``, its starting mask having the data's dtype (see above)
            assert (1.0 - sparsifier.get_mask(name=name).to(torch.float).mean()) == 0
        sparsifier.step()
        for entry in entries:
            name, _, _ = _name_data_config(entry)
            mask = sparsifier.get_mask(name=name)
            low, high = self.bounds(sparsifier.data_groups[name], mask.shape)
            actual = round(1 - mask.to(torch.float).mean().item(), 3)
            assert low <= actual <= high
            assert actual > 0.0
        again = self.norm_type(
            sparsity_level=0.5, sparse_block_shape=(1, 4), zeros_per_block=4, norm=self.norm
        )
        for _ in range(100):
            again.add_data(name="test_data", data=torch.randn(20, 20))
            again.step()
            assert (1.0 - again.get_mask(name="test_data").to(torch.float).mean().item()) > 0

    def step_2_of_4(self):
        data_list = [("test_data", torch.randn(4, 4))]
        sparsifier = self.norm_type(
            data_list=data_list,
            norm=self.norm,
            sparsity_level=1.0,
            zeros_per_block=2,
            sparse_block_shape=(1, 4),
        )
        sparsifier.step()
        mask = sparsifier.get_mask(name="test_data").to(torch.float)
        assert math.isclose(1.0 - mask.mean().item(), 0.5, abs_tol=0.005)
        for row in mask:
            for start in range(0, len(row), 4):
                block, _ = row[start : start + 4].sort()
                assert (block[:2] == 0).all()
                assert (block[2:] != 0).all()

    def sparsity_level(self, data_list, data_with_config):
        levels = [-1.0, 0.0, 0.5, 1.0, 2.0]
        shapes = [(1, 1), (1, 4), (2, 2), (4, 1)]
        zeros = [0, 1, 2, 3, 4]
        sparsifier = self.norm_type(data_list=data_list, norm=self.norm)
        name, data = data_with_config[0]["name"], data_with_config[0]["data"]
        # fresh values of the same shape: earlier checks squashed zeros into ``data``
        weight = torch.randn(sparsifier._extract_weight(data).shape)
        added = []
        for idx, (level, shape, zpb) in enumerate(itertools.product(levels, shapes, zeros)):
            if zpb > shape[0] * shape[1]:
                continue
            config = {"sparsity_level": level, "sparse_block_shape": shape, "zeros_per_block": zpb}
            if not self.clamps and not 0.0 <= level <= 1.0:
                with pytest.raises(ValueError, match="sparsity_level"):
                    sparsifier.add_data(name=f"{name}_{idx}", data=weight.detach().clone(), **config)
                continue
            sparsifier.add_data(name=f"{name}_{idx}", data=weight.detach().clone(), **config)
            added.append((f"{name}_{idx}", level, shape, zpb))
        sparsifier.step()
        sparsifier.squash_mask()
        rows, cols = weight.shape
        for new_name, level, (bh, bw), zpb in added:
            zeros_found = int((sparsifier.get_data(name=new_name, return_original=False) == 0).sum())
            blocks = math.ceil(rows / bh) * math.ceil(cols / bw)
            removed = round(min(max(level, 0.0), 1.0) * blocks)
            if zpb == 0 or removed == 0:
                assert zeros_found == 0
                continue
            # a removed block loses min(zpb, its in-bounds size) entries; the corner block
            # is the smallest
            corner = (rows - (math.ceil(rows / bh) - 1) * bh) * (cols - (math.ceil(cols / bw) - 1) * bw)
            assert removed * min(zpb, corner) <= zeros_found <= removed * min(zpb, bh * bw), new_name


def _tensor_lists(kind: str) -> tuple[list, list]:
    """torch's three data kinds for the base sparsifier: tensors, parameters, embeddings."""
    if kind == "embeddings":
        data_list = [
            ("emb1", nn.Embedding(10, 3)),
            ("emb1_bag", nn.EmbeddingBag(10, 3)),
            ("emb2", nn.Embedding(20, 3)),
            ("emb2_bag", nn.EmbeddingBag(20, 3)),
        ]
        extra = [nn.Embedding(15, 3), nn.EmbeddingBag(20, 3)]
        names = ["emb3", "emb3_bag"]
    else:
        wrap = nn.Parameter if kind == "parameters" else (lambda t: t)
        prefix = "param" if kind == "parameters" else "tensor"
        data_list = [(f"{prefix}{i + 1}", wrap(torch.randn(n, n))) for i, n in enumerate((3, 4, 5))]
        extra = [wrap(torch.randn(1, 1)), wrap(torch.randn(4, 4))]
        names = [f"{prefix}4", f"{prefix}5"]
    return data_list, list(zip(names, extra, strict=True))


KINDS = ["tensors", "parameters", "embeddings"]


@pytest.mark.parametrize("kind", KINDS)
def test_base_data_sparsifier(impl, kind):
    torch.manual_seed(0)
    random.seed(0)
    _, implemented, _ = impl
    data_list, extra = _tensor_lists(kind)
    data_with_config = [
        {"name": name, "data": data, "config": {"test": test}}
        for (name, data), test in zip(extra, (7, 8), strict=True)
    ]
    Checks(implemented).run_all(data_list, data_with_config, {"test": 3})


def _norm_lists(kind: str) -> tuple[list, list]:
    if kind == "embeddings":
        return _tensor_lists("embeddings")
    wrap = nn.Parameter if kind == "parameters" else (lambda t: t)
    prefix = "param" if kind == "parameters" else "tensor"
    if kind == "parameters":
        shapes, extra_shapes = [(1, 8), (4, 4), (5, 5)], [(10, 10), (4, 4)]
    else:
        shapes, extra_shapes = [(1, 10), (4, 4), (1, 5)], [(1, 2), (4, 4)]
    data_list = [(f"{prefix}{i + 1}", wrap(torch.randn(*s))) for i, s in enumerate(shapes)]
    extra = [(f"{prefix}{i + 4}", wrap(torch.randn(*s))) for i, s in enumerate(extra_shapes)]
    return data_list, extra


@pytest.mark.parametrize("norm", ["L1", "L2"])
@pytest.mark.parametrize("kind", KINDS)
def test_norm_data_sparsifier(impl, kind, norm):
    torch.manual_seed(0)
    random.seed(0)
    which, implemented, norm_type = impl
    data_list, extra = _norm_lists(kind)
    defaults = {"sparsity_level": 0.5, "sparse_block_shape": (1, 4), "zeros_per_block": 4}
    configs = [
        {"sparsity_level": 0.7, "sparse_block_shape": (2, 3), "zeros_per_block": 6},
        {"sparsity_level": 0.3, "sparse_block_shape": (2, 3), "zeros_per_block": 6},
    ]
    data_with_config = [
        {"name": name, "data": data, "config": config}
        for (name, data), config in zip(extra, configs, strict=True)
    ]
    NormChecks(implemented, norm_type, norm, clamps=which == "torch").run_all(
        data_list, data_with_config, defaults
    )


@pytest.mark.parametrize("sparsify_first", [True, False])
def test_post_training_sparse_quantize(ref_model, sparsify_first):
    """torch's TestQuantizationUtils (its model is conftest's ``ref_model``), with
    embpress's modules in place of torch.ao's."""
    model = ref_model
    embpress.post_training_sparse_quantize(
        model,
        data_sparsifier_class=embpress.DataNormSparsifier,
        sparsify_first=sparsify_first,
        select_embeddings=[model.embbag1, model.emb1],
        sparsity_level=0.80,
        sparse_block_shape=(1, 1),
    )
    assert type(model.emb1) is embpress.QuantizedEmbedding
    assert type(model.embbag1) is embpress.QuantizedEmbeddingBag
    assert type(model.emb_seq[0]) is nn.Embedding
    assert type(model.emb_seq[1]) is nn.EmbeddingBag
    assert type(model.linear1) is nn.Linear
    assert type(model.linear2) is nn.Linear
    for module in (model.emb1, model.embbag1):
        table = module.dequantize()
        if sparsify_first:
            level = float((table.abs() < 1e-2).float().mean())
        else:  # torch checks the exact zeros after quantize-then-prune
            level = float((table == 0).float().mean())
        assert abs(level - 0.80) <= 0.05
