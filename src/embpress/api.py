"""post_training_sparse_quantize: find a model's embedding tables, prune, quantize, replace.

Drop-in for torch's experimental ``post_training_sparse_quantize``
(``torch/ao/pruning/_experimental/data_sparsifier/quantization_utils.py``): same
arguments, same order semantics, plus ``quant``, an :class:`embpress.QuantConfig`.
Pruned entries decode to exactly 0.0 in both orders. Nothing in the model changes until
every table has been compressed.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .layouts import QuantizedTable, encode_table
from .layouts.encode import fake_quantize_table, finite_table, nonfinite_count, plain_qparams
from .nn import (
    QuantizedEmbedding,
    QuantizedEmbeddingBag,
    embedding_scale,
    module_arguments,
    norm_args,
    output_dtype_of,
)
from .quant import QuantConfig, RowQParams
from .sparsify import DataNormSparsifier

__all__ = [
    "Target",
    "checked_weight",
    "find_embeddings",
    "is_plain_embedding",
    "post_training_sparse_quantize",
    "quantized_module",
    "swap_modules",
]


@dataclass
class Target:
    """One embedding table: its module, every (parent, attribute) place it sits at, and the
    path of each place (a module shared at several places, and several modules of one kind
    and the same arguments that share one weight, as tied encoder and decoder token tables
    do: they become one compressed module)."""

    name: str
    module: Any
    places: list[tuple[nn.Module, str]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)


def is_plain_embedding(module: nn.Module) -> bool:
    """nn.Embedding / nn.EmbeddingBag, a subclass that keeps their forward, or one that only
    scales its lookup (Hugging Face's ScaledWordEmbedding): what a compressed module can
    replace (``nn.embedding_scale``)."""
    return embedding_scale(module) is not None


def find_embeddings(model: nn.Module, select_embeddings: list[nn.Module] | None = None) -> list[Target]:
    """Embedding modules of ``model`` at any depth (each once, with all its places)."""
    targets: dict[int, Target] = {}
    skipped: list[str] = []
    seen_places: set[tuple[int, str]] = set()
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is None or (id(parent), attr) in seen_places:
                continue
            seen_places.add((id(parent), attr))
            name = f"{parent_name}.{attr}" if parent_name else attr
            if is_plain_embedding(child):
                target = targets.setdefault(id(child), Target(name, child))
                target.places.append((parent, attr))
                target.names.append(name)
            elif isinstance(child, (nn.Embedding, nn.EmbeddingBag)) and select_embeddings is None:
                skipped.append(name)
    if skipped:
        warnings.warn(
            "not compressed (subclass with its own forward): " + ", ".join(sorted(set(skipped))),
            stacklevel=3,
        )
    if select_embeddings is None:
        return _tied_as_one(list(targets.values()))
    if not isinstance(select_embeddings, list):
        raise TypeError(
            f"select_embeddings must be a list of embedding modules, got {type(select_embeddings).__name__}"
        )
    chosen: dict[int, Target] = {}
    for emb in select_embeddings:
        if not isinstance(emb, (nn.Embedding, nn.EmbeddingBag)):
            raise TypeError(
                "select_embeddings must hold nn.Embedding / nn.EmbeddingBag modules, "
                f"got {type(emb).__name__}"
            )
        if not is_plain_embedding(emb):
            raise TypeError(f"{type(emb).__name__} overrides forward; it cannot be replaced safely")
        if id(emb) not in targets:
            raise ValueError(f"select_embeddings holds a {type(emb).__name__} that is not part of the model")
        chosen[id(emb)] = targets[id(emb)]
    return _tied_as_one(list(chosen.values()))


def _tied_as_one(targets: list[Target]) -> list[Target]:
    """Join targets whose modules share one weight and have the same kind and arguments
    into one (the first's name; every place and name), so that the weight is compressed
    once and its places share one compressed module. Modules that share a weight but
    differ in kind or arguments stay apart: each gets its own table, and a warning says so."""
    out: list[Target] = []
    first: dict[tuple[int, tuple[Any, ...]], Target] = {}
    kinds: dict[int, list[str]] = {}
    for t in targets:
        weight = t.module.weight
        key = (id(weight), module_arguments(t.module))
        kinds.setdefault(id(weight), [])
        if key in first:
            first[key].places.extend(t.places)
            first[key].names.extend(t.names)
            continue
        first[key] = t
        kinds[id(weight)].append(t.name)
        out.append(t)
    apart = [names for names in kinds.values() if len(names) > 1]
    if apart:
        warnings.warn(
            "modules sharing one weight but differing in kind or arguments are compressed "
            "apart (one table each): " + "; ".join(", ".join(names) for names in apart),
            stacklevel=4,
        )
    return out


def checked_weight(
    target: Target, config: QuantConfig, count: bool = True, remedy: str | None = None
) -> torch.Tensor:
    weight = target.module.weight
    if weight.is_meta:
        raise ValueError(
            f"table {target.name!r} is on the meta device (it holds no values): "
            "load or initialise its weights before compressing"
        )
    if weight.layout != torch.strided:
        raise ValueError(f"table {target.name!r} is a {weight.layout} tensor; make it dense first")
    try:  # before any work: what the compressed module will refuse
        norm_args(target.module.max_norm, target.module.norm_type)
    except (TypeError, ValueError) as err:
        raise type(err)(
            f"table {target.name!r}: {err} (fix the module's max_norm or norm_type before compressing)"
        ) from None
    return finite_table(weight, config, f"table {target.name!r}", count=count, remedy=remedy)


def _sparsifier_keys(targets: list[Target]) -> dict[str, str]:
    """A sparsifier name per table: dots become '_' (torch's sparsifier refuses dots), with a
    numeric suffix where two paths would meet (``a.b`` and ``a_b``)."""
    keys: dict[str, str] = {}
    used: set[str] = set()
    for t in targets:
        key = base = t.name.replace(".", "_")
        n = 1
        while key in used:
            key, n = f"{base}_{n}", n + 1
        used.add(key)
        keys[t.name] = key
    return keys


def _check_sparsifier_class(cls: Any) -> None:
    if not isinstance(cls, type):
        raise TypeError(
            f"data_sparsifier_class must be a class, got a {type(cls).__name__} instance: pass the "
            "class itself (embpress.DataNormSparsifier, not DataNormSparsifier()), as torch's API takes it"
        )
    missing = [m for m in ("add_data", "step", "get_mask") if not callable(getattr(cls, m, None))]
    if missing:
        raise TypeError(
            f"data_sparsifier_class {getattr(cls, '__name__', cls)!r} has no {', '.join(missing)}: "
            "pass a sparsifier class such as embpress.DataNormSparsifier"
        )


def _mask_of(sparsifier: Any, name: str, shape: torch.Size) -> torch.Tensor:
    kept_mask = getattr(sparsifier, "kept_mask", None)
    mask = kept_mask(name) if callable(kept_mask) else sparsifier.get_mask(name)
    if mask.dtype == torch.bool and mask.shape == shape:
        return mask.detach().cpu()
    if mask.numel() != shape.numel():
        raise ValueError(
            f"sparsifier mask for {name!r} has {mask.numel()} entries, table has {shape.numel()}"
        )
    return (mask.detach().reshape(shape) != 0).cpu()


def _block_width(sparsifier: Any, name: str) -> int:
    shape = getattr(sparsifier, "data_groups", {}).get(name, {}).get("sparse_block_shape")
    try:
        return max(1, int(shape[1]))
    except (TypeError, IndexError, ValueError):
        return 1


def post_training_sparse_quantize(
    model: nn.Module,
    data_sparsifier_class: type,
    sparsify_first: bool = True,
    select_embeddings: list[nn.Module] | None = None,
    *,
    quant: QuantConfig | None = None,
    **sparse_config: Any,
) -> nn.Module:
    """Prune and quantize the embedding tables of ``model`` in place; return ``model``.

    Args:
        model: any nn.Module; every nn.Embedding / nn.EmbeddingBag at any depth is
            compressed (a module shared at several places once, staying shared).
        data_sparsifier_class: e.g. :class:`embpress.DataNormSparsifier`; built with
            ``**sparse_config``; any class with ``add_data`` / ``step`` / ``get_mask``.
        sparsify_first: prune the float table, then quantize the kept entries; else
            quantize first, prune the dequantized table, and keep the saved row params.
        select_embeddings: compress only these modules (a list).
        quant: a :class:`QuantConfig` (default: 8 bits, smallest layout).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    config = quant if quant is not None else QuantConfig()
    if not isinstance(config, QuantConfig):
        raise TypeError(f"quant must be an embpress.QuantConfig, got {type(config).__name__}")
    if is_plain_embedding(model):
        raise ValueError("model is itself an embedding: use QuantizedEmbedding(Bag).from_float(model)")
    _check_sparsifier_class(data_sparsifier_class)
    targets = find_embeddings(model, select_embeddings)
    sparsifier = data_sparsifier_class(**sparse_config)
    # with our own sparsifier, sparsify-first, the NaN/Inf pass over each table is left
    # out: the sparsifier refuses a NaN's block norm and counts infinite ones on its way;
    # either sign starts again, counting first (see _Unchecked)
    count_first = not (sparsify_first and type(sparsifier) is DataNormSparsifier)
    try:
        _compress(model, targets, sparsifier, sparsify_first, config, count_first)
        return model
    except _Unchecked:
        pass  # out of the handler first: its traceback would hold the first try's tables
    del sparsifier  # and its masks
    _compress(model, targets, data_sparsifier_class(**sparse_config), sparsify_first, config, True)
    return model


class _Unchecked(Exception):
    """A table whose NaN/Inf pass was left out may hold one: compress again, counting
    first (the count then raises or zeroes them, as ``QuantConfig.nonfinite`` says).
    Nothing has changed by then: modules are swapped only once every table is built."""


def _compress(
    model: nn.Module,
    targets: list[Target],
    sparsifier: Any,
    sparsify_first: bool,
    config: QuantConfig,
    count_first: bool,
) -> None:
    """``post_training_sparse_quantize``'s work on ``targets`` with ``sparsifier``;
    ``count_first``: count each table's NaN/Inf before anything, else raise
    ``_Unchecked`` where the sparsifier's step says there may be one."""
    weights = {t.name: checked_weight(t, config, count=count_first) for t in targets}
    keys = _sparsifier_keys(targets)
    saved: dict[str, RowQParams] = {}
    originals: dict[str, torch.Tensor] = {}
    # our sparsifier's step frees the starting all-ones masks unread: they need not be made
    # (another class's update_mask might write into them)
    unmade = (
        sparsifier._starting_masks_unmade()
        if type(sparsifier) is DataNormSparsifier
        else contextlib.nullcontext()
    )
    with unmade:
        for t in targets:
            w = weights[t.name]
            if not sparsify_first:
                try:
                    saved[t.name] = plain_qparams(w, config)
                except ValueError as err:
                    raise ValueError(f"table {t.name!r}: {err}") from err
                originals[t.name] = w
                w = weights[t.name] = fake_quantize_table(w, saved[t.name], config.bits)
            sparsifier.add_data(name=keys[t.name], data=w)
    try:
        sparsifier.step()
    except ValueError:
        if count_first:
            raise
        raise _Unchecked from None  # a NaN's block norm, say
    if not count_first:
        for t in targets:
            infinite = sparsifier._infinite_norms.get(keys[t.name])
            if infinite is None:  # the step made no norms to count (nothing to prune)
                infinite = nonfinite_count(weights[t.name])
            if infinite:
                raise _Unchecked
    replacements: dict[str, nn.Module] = {}
    for t in targets:
        w = weights.pop(t.name)
        mask = _mask_of(sparsifier, keys[t.name], w.shape)
        try:
            table, error = encode_table(
                w,
                mask,
                config,
                block_width=_block_width(sparsifier, keys[t.name]),
                saved_qparams=saved.get(t.name),
                reference=originals.pop(t.name, None),
                checked=True,
            )
        except ValueError as err:
            raise ValueError(f"table {t.name!r}: {err}") from err
        new = quantized_module(t, table)
        new.error = error
        replacements[t.name] = new
    swap_modules(model, targets, replacements)


def quantized_module(target: Target, table: QuantizedTable) -> QuantizedEmbedding | QuantizedEmbeddingBag:
    """The module replacing ``target``, holding ``table`` on the target's device, with its
    pooling, padding and norm settings, returning its weight's dtype, scaled as it scales."""
    m: Any = target.module
    device, dtype, scale = m.weight.device, output_dtype_of(m), embedding_scale(m)
    if isinstance(m, nn.EmbeddingBag):
        return QuantizedEmbeddingBag(
            table.to(device),
            m.mode,
            m.padding_idx,
            m.include_last_offset,
            m.max_norm,
            m.norm_type,
            output_dtype=dtype,
        )
    return QuantizedEmbedding(
        table.to(device),
        m.padding_idx,
        m.max_norm,
        m.norm_type,
        output_dtype=dtype,
        output_scale=1.0 if scale is None else scale,
    )


def swap_modules(model: nn.Module, targets: list[Target], replacements: dict[str, nn.Module]) -> None:
    """Put each target's replacement at every place it sits (only once all are built, so a
    failure leaves the model as it was); warn about float weights still tied elsewhere."""
    for t in targets:
        for parent, attr in t.places:
            setattr(parent, attr, replacements[t.name])
    weights: dict[int, list[str]] = {}
    for t in targets:
        weights.setdefault(id(t.module.weight), []).append(t.name)
    _warn_tied(model, weights)


def _warn_tied(model: nn.Module, weights: dict[int, list[str]]) -> None:
    """Say when a compressed table's float weight still lives on in another module (tied
    input/output embeddings): that module keeps computing with it and its bytes stay."""
    tied = sorted(
        f"{', '.join(weights[id(p)])} (also {name})"
        for name, p in model.named_parameters(remove_duplicate=False)
        if id(p) in weights
    )
    if tied:
        warnings.warn(
            "compressed tables whose float weight is still used elsewhere (tied weights; those "
            "modules keep the float copy): " + ", ".join(tied),
            stacklevel=3,
        )
