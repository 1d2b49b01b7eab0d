"""BaseDataSparsifier: holds named tensors and their masks; subclasses decide the masks.

Same contract as torch's experimental ``BaseDataSparsifier``
(``torch/ao/pruning/_experimental/data_sparsifier/base_data_sparsifier.py``)
(add_data with per-data config, step, get_mask, get_data(return_original=...),
squash_mask, state_dict / load_state_dict, an overridable ``update_mask``), without
parametrizations and without importing torch.ao.

Masks behave as torch's: ``get_mask`` returns a writable tensor (1 = kept) of the data's
dtype until a subclass sets another (torch's DataNormSparsifier sets int8), so in-place
edits and arithmetic on it work. Until it is first asked for, the starting all-ones mask
is a broadcast view that takes no memory.
"""

from __future__ import annotations

import abc
import copy
import warnings
from collections import defaultdict
from typing import Any

import torch
from torch import nn

__all__ = ["BaseDataSparsifier"]

_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)


def _all_kept(weight: torch.Tensor) -> torch.Tensor:
    """torch's starting mask, ``ones_like(weight)``, as a broadcast view (no memory yet)."""
    return torch.ones((), dtype=weight.dtype, device=weight.device).expand(weight.shape)


def _is_broadcast_view(mask: torch.Tensor) -> bool:
    return mask.numel() > 1 and 0 in mask.stride()


def _extract_weight(data: Any) -> torch.Tensor:
    """Return the tensor behind ``data`` (a tensor, a Parameter or an embedding module)."""
    if isinstance(data, _EMBEDDING_TYPES):
        return data.weight
    if isinstance(data, torch.Tensor):
        return data
    raise TypeError(
        f"data of type {type(data).__name__} is not supported: pass a torch.Tensor, "
        "nn.Parameter, nn.Embedding or nn.EmbeddingBag"
    )


class BaseDataSparsifier(abc.ABC):
    """Keeps (name -> data, mask, config); ``step`` asks ``update_mask`` for new masks.

    Config given to the constructor is the default for every data; keyword arguments
    to ``add_data`` override it per data, exactly as in the torch.ao reference.
    """

    def __init__(self, data_list: list[tuple[str, Any]] | None = None, **defaults: Any) -> None:
        self.defaults: dict[str, Any] = dict(defaults)
        self.state: dict[str, dict[str, Any]] = defaultdict(dict)
        self.data_groups: dict[str, dict[str, Any]] = defaultdict(dict)
        self._data: dict[str, torch.Tensor] = {}
        self._squashed: set[str] = set()
        # name -> (bool mask, version of the public mask) while that mask is its int8 view
        self._kept: dict[str, tuple[torch.Tensor, int]] = {}
        self.enable_mask_update = True
        if data_list is not None:
            for name, data in data_list:
                self.add_data(name, data, **self.defaults)

    # ------------------------------------------------------------------ data
    @staticmethod
    def _extract_weight(data: Any) -> torch.Tensor:
        """The tensor behind ``data`` (a tensor, a Parameter or an embedding module)."""
        return _extract_weight(data)

    def _check_config(self, config: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Refuse a bad per-data config when it is added; subclasses override."""

    def add_data(self, name: str, data: Any, reuse_mask: bool = True, **config: Any) -> torch.Tensor:
        """Register ``data`` under ``name`` with an all-ones mask (or reuse the old one).

        Replacing existing data keeps its config (updated by ``config``) and, with
        ``reuse_mask``, its mask, which then requires the same shape.
        """
        weight = _extract_weight(data)
        replacing = name in self.data_groups
        local_args = copy.deepcopy(self.data_groups[name] if replacing else self.defaults)
        local_args.update(config)
        mask = {**self.defaults, **config}.get("mask")
        local_args.pop("mask", None)
        self._check_config(local_args)
        kept = None
        if replacing:
            warnings.warn(
                "Replacing existing data of the same name. - Did you mean a different name?",
                stacklevel=2,
            )
            if reuse_mask:
                old = self._data[name]
                if weight.shape != old.shape:
                    raise ValueError(
                        "to retain the old mask, the shape of the new data must be the same "
                        f"as the previous one: {tuple(weight.shape)} != {tuple(old.shape)}"
                    )
                mask, kept = self.state[name]["mask"], self._kept.get(name)
            self._delete_data(name)
        if mask is None:
            mask = _all_kept(weight)
        self._data[name] = weight
        self.state[name]["mask"] = mask
        if kept is not None:
            self._kept[name] = kept
        self.data_groups[name] = local_args
        return weight

    def get_data(self, name: str, return_original: bool = True) -> torch.Tensor:
        """The data as added (``return_original``) or with the mask applied."""
        if name not in self.data_groups:
            raise ValueError(f"data with name {name!r} does not exist")
        data = self._data[name]
        if return_original:
            if name in self._squashed:
                raise ValueError("mask squashed - original mask value does not exist")
            return data
        if name in self._squashed:
            return data
        return self.state[name]["mask"] * data

    def get_mask(self, name: str) -> torch.Tensor:
        """The current mask of ``name`` (1 = kept), writable in place as torch's."""
        if name not in self.state:
            raise ValueError(f"data with name {name!r} does not exist")
        mask: torch.Tensor = self.state[name]["mask"]
        if _is_broadcast_view(mask):
            mask = self.state[name]["mask"] = mask.clone()
        return mask

    def _set_kept(self, name: str, kept: torch.Tensor) -> None:
        """Set the mask of ``name`` from a bool tensor, as torch's DataNormSparsifier does:
        the mask object stays the same and becomes int8 (here a view of ``kept``)."""
        mask = self.state[name]["mask"]
        mask.data = kept.view(torch.int8)
        self._kept[name] = (kept, mask._version)

    def kept_mask(self, name: str) -> torch.Tensor:
        """The mask of ``name`` as bool (True = kept), without a copy where it can."""
        mask = self.state[name]["mask"] if name in self.state else self.get_mask(name)
        cached = self._kept.get(name)
        if cached is not None:
            kept, version = cached
            if mask._version == version and mask.data_ptr() == kept.data_ptr() and mask.dtype == torch.int8:
                return kept
        if mask.dtype == torch.bool:
            return mask
        return mask != 0

    def _delete_data(self, name: str) -> None:
        self._data.pop(name, None)
        self._kept.pop(name, None)
        self.state.pop(name, None)
        self.data_groups.pop(name, None)
        self._squashed.discard(name)

    # ------------------------------------------------------------------ masks
    def step(self) -> None:
        """Recompute every mask with ``update_mask`` (no gradient)."""
        if not self.enable_mask_update:
            return
        with torch.no_grad():
            for name, config in self.data_groups.items():
                self.update_mask(name, self.get_data(name), **config)

    @abc.abstractmethod
    def update_mask(self, name: str, data: torch.Tensor, **kwargs: Any) -> None:
        """Set ``self.state[name]['mask']`` from ``data``; subclasses implement this."""

    def squash_mask(
        self,
        *args: Any,
        leave_parametrized: bool = True,
        names: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Apply the mask to the data in place (``leave_parametrized``) and forget the original."""
        for name in list(self.data_groups) if names is None else names:
            if name in self._squashed:
                continue
            if leave_parametrized:
                data, mask = self._data[name], self.state[name]["mask"]
                with torch.no_grad():
                    if torch.result_type(data, mask) == data.dtype:
                        data.mul_(mask)
                    else:  # e.g. integer data, float mask: torch keeps the product's dtype
                        data.set_(mask * data)
            self._squashed.add(name)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """``state`` (masks as sparse COO), ``data_groups`` and the data (``_container``)."""
        state = {name: {**st, "mask": st["mask"].to_sparse_coo()} for name, st in self.state.items()}
        container: dict[str, torch.Tensor] = {}
        for name, data in self._data.items():
            key = name if name in self._squashed else f"parametrizations.{name}.original"
            container[key] = data
        return {
            "state": state,
            "data_groups": copy.deepcopy(dict(self.data_groups)),
            "_container": container,
        }

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Restore from ``state_dict``; ``strict`` first forgets every data held now."""
        for key in ("state", "data_groups", "_container"):
            if key not in state_dict:
                raise KeyError(f"sparsifier state_dict has no {key!r} entry")
        if strict:
            self.state = defaultdict(dict)
            self.data_groups = defaultdict(dict)
            self._data = {}
            self._squashed = set()
            self._kept = {}
        container = state_dict["_container"]
        for name, st in state_dict["state"].items():
            if name not in state_dict["data_groups"]:
                raise RuntimeError(f"Error loading {name}: no data group")
            original_key = f"parametrizations.{name}.original"
            if original_key in container:
                data, squashed = container[original_key], False
            elif name in container:
                data, squashed = container[name], True
            else:
                raise RuntimeError(f"Error loading {name}: no data in _container")
            self._data[name] = data
            self._kept.pop(name, None)
            self.state[name] = {**st, "mask": st["mask"].to_dense()}
            self.data_groups[name] = copy.deepcopy(state_dict["data_groups"][name])
            if squashed:
                self._squashed.add(name)
            else:
                self._squashed.discard(name)

    def __repr__(self) -> str:
        lines = [self.__class__.__name__ + " ("]
        for name, args in self.data_groups.items():
            lines.append("\tData Group")
            lines.append(f"\t    name: {name}")
            lines.extend(f"\t    {k}: {args[k]}" for k in sorted(args))
        lines.append(")")
        return "\n".join(lines)
