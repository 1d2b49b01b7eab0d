"""BaseDataSparsifier: holds named tensors and their masks; subclasses decide the masks.

Same contract as torch's experimental ``BaseDataSparsifier``
(``torch/ao/pruning/_experimental/data_sparsifier/base_data_sparsifier.py``)
(add_data with per-data config, step, get_mask, get_data(return_original=...),
squash_mask, state_dict / load_state_dict, an overridable ``update_mask``), without
parametrizations and without importing torch.ao.

Masks behave as torch's: ``self.state[name]["mask"]`` is the mask, a normal writable
tensor (1 = kept), the object ``get_mask`` returns, kept when a subclass sets new values
through ``mask.data`` (torch's DataNormSparsifier sets int8). One difference, for memory:
the starting all-ones mask is int8 (one byte an entry, the dtype DataNormSparsifier's
masks have after ``step``), not the data's dtype; it still keeps the data's dtype in
``mask * data`` (data whose dtype int8 would change get a mask of their own dtype).
"""

from __future__ import annotations

import abc
import contextlib
import copy
import warnings
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["BaseDataSparsifier"]

_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)


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


def _version_of(t: torch.Tensor) -> int | None:
    """``t._version``, or None for an inference tensor (made under ``torch.inference_mode``),
    which has no version counter: caches keyed by it then never match, so that a mask
    edited in place is read as it is."""
    return None if t.is_inference() else t._version


def _check_mask(mask: Any, weight: torch.Tensor, exact: bool = False) -> None:
    """Refuse a mask that ``mask * weight`` would give another dtype or shape, as torch's
    parametrization does when the data is added (not only at ``squash_mask``); with
    ``exact``, also one of another shape that broadcasts (as torch's load refuses it)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    dtype = torch.result_type(mask, weight)
    if dtype != weight.dtype:
        raise ValueError(
            f"a mask of dtype {mask.dtype} would change the data's dtype {weight.dtype} to {dtype}"
        )
    try:
        shape = torch.broadcast_shapes(mask.shape, weight.shape)
    except RuntimeError:
        shape = None
    if shape != weight.shape or (exact and mask.shape != weight.shape):
        raise ValueError(
            f"a mask of shape {tuple(mask.shape)} does not fit data of shape {tuple(weight.shape)}"
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
        self._kept: dict[str, tuple[torch.Tensor, int | None]] = {}
        # name -> (version, address) of the all-ones mask ``add_data`` made, while untouched
        self._all_ones: dict[str, tuple[int | None, int]] = {}
        self._unmade_ones = False  # see _starting_masks_unmade
        self.enable_mask_update = True
        if data_list is not None:
            for name, data in data_list:
                self.add_data(name, data, **self.defaults)

    def prepare(self, model: Any, config: Any) -> None:
        """Not for data sparsifiers (torch's raises the same): use ``add_data``."""
        raise NotImplementedError("this function is undefined for this class")

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
        ``reuse_mask``, its mask, which then requires the same shape. Returns the masked
        data, ``mask * data`` as torch's does (the data itself while its mask is new, all ones).
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
        if mask is not None:
            _check_mask(mask, weight)
        if replacing:
            self._delete_data(name)
        fresh = mask is None
        if mask is None:
            mask, kept = self._all_kept(weight, unmade=self._unmade_ones)
        self._data[name] = weight
        self.state[name]["mask"] = mask
        if kept is not None:
            self._kept[name] = kept
            if fresh:
                self._all_ones[name] = (_version_of(mask), mask.data_ptr())
        self.data_groups[name] = local_args
        return weight if fresh else mask * weight

    @staticmethod
    def _all_kept(
        weight: torch.Tensor, unmade: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, int | None] | None]:
        """The starting mask (int8 ones, an int8 view of a bool tensor, so that
        ``kept_mask`` needs no copy; the data's dtype where int8 would change it).
        ``unmade``: one True seen at every entry (no memory, read-only)."""
        try:
            own = torch.promote_types(torch.int8, weight.dtype) != weight.dtype
        except RuntimeError:  # dtypes without promotion rules (float8)
            own = True
        if own:
            return torch.ones_like(weight, memory_format=torch.contiguous_format), None
        if unmade:
            kept = torch.ones((), dtype=torch.bool, device=weight.device).expand(weight.shape)
        else:
            kept = torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
        mask = kept.view(torch.int8)
        return mask, (kept, _version_of(mask))

    @contextlib.contextmanager
    def _starting_masks_unmade(self) -> Iterator[None]:
        """Within: ``add_data`` gives new data a starting mask that holds no memory (one
        True seen at every entry, read-only), for a caller that calls ``step`` next and
        reads no mask before (``api.post_training_sparse_quantize``): writing a table's
        worth of ones that ``update_mask`` frees unread costs as long as a pass over the
        table. A failed ``update_mask`` puts back a real all-ones mask."""
        self._unmade_ones = True
        try:
            yield
        finally:
            self._unmade_ones = False

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
        """The current mask of ``name`` (1 = kept): ``self.state[name]["mask"]`` itself."""
        if name not in self.state:
            raise ValueError(f"data with name {name!r} does not exist")
        mask: torch.Tensor = self.state[name]["mask"]
        return mask

    def _set_kept(self, name: str, kept: torch.Tensor) -> None:
        """Set the mask of ``name`` from a bool tensor, as torch's DataNormSparsifier does:
        the mask object stays the same and becomes int8 (here a view of ``kept``)."""
        mask = self.state[name]["mask"]
        mask.data = kept.view(torch.int8)
        self._kept[name] = (kept, _version_of(mask))

    def _release_all_ones(self, name: str) -> tuple[tuple[int, ...], torch.device] | None:
        """Free ``name``'s mask while its new one is computed, where it is still the
        all-ones mask ``add_data`` made (untouched since): a large table's new mask then
        takes that memory instead of as much more. Returns its shape and device, to put it
        back with :meth:`_restore_all_ones` should the computation fail; else None (the
        mask stays as it is)."""
        mark = self._all_ones.pop(name, None)
        mask = self.state[name].get("mask")
        cached = self._kept.get(name)
        if (
            mark is None
            or mark[0] is None
            or not isinstance(mask, torch.Tensor)
            or cached is None
            or mark != (_version_of(mask), mask.data_ptr())
            or cached[0].data_ptr() != mask.data_ptr()
        ):
            return None
        shape, device = tuple(mask.shape), mask.device
        del self._kept[name]
        mask.data = torch.empty(0, dtype=torch.int8, device=device)  # the same object, its memory freed
        return shape, device

    def _restore_all_ones(self, name: str, released: tuple[tuple[int, ...], torch.device]) -> None:
        """Put back the all-ones mask :meth:`_release_all_ones` freed."""
        shape, device = released
        self._set_kept(name, torch.ones(shape, dtype=torch.bool, device=device))
        mask = self.state[name]["mask"]
        self._all_ones[name] = (_version_of(mask), mask.data_ptr())

    def kept_mask(self, name: str) -> torch.Tensor:
        """The mask of ``name`` as bool (True = kept), without a copy where it can."""
        mask = self.get_mask(name)
        cached = self._kept.get(name)
        if cached is not None:
            kept, version = cached
            if (
                version is not None
                and _version_of(mask) == version
                and mask.data_ptr() == kept.data_ptr()
                and mask.dtype == torch.int8
            ):
                return kept
        if mask.dtype == torch.bool:
            return mask
        return mask != 0

    def _delete_data(self, name: str) -> None:
        self._data.pop(name, None)
        self._kept.pop(name, None)
        self._all_ones.pop(name, None)
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
        """Forget the original data of ``names`` (default: all), leaving the data masked
        (``leave_parametrized``) or as it is.

        As torch's: the data object gets new memory holding ``mask * data`` (``set_``), so
        it sees the pruned values while other tensors sharing its old memory (views, a
        ``state_dict`` taken before) keep the original ones. That takes one more copy of
        each table, one table at a time.
        """
        names = list(self.data_groups) if names is None else list(names)
        for name in names:
            if name not in self.data_groups:
                raise ValueError(f"data with name {name!r} does not exist")
        pending = [name for name in names if name not in self._squashed]
        if leave_parametrized:  # check every name before changing any
            for name in pending:
                data, mask = self._data[name], self.state[name]["mask"]
                dtype = torch.result_type(mask, data)
                if dtype != data.dtype:
                    raise RuntimeError(
                        f"cannot squash the mask of {name!r}: its dtype {mask.dtype} would change "
                        f"the data's dtype {data.dtype} to {dtype}"
                    )
        for name in pending:
            if leave_parametrized:
                data = self._data[name]
                with torch.no_grad():
                    data.set_(self.state[name]["mask"] * data)
            self._squashed.add(name)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """``state`` (masks as sparse COO), ``data_groups`` and the data (``_container``,
        detached tensors sharing the data's memory, as a module's ``state_dict``)."""
        state = {
            name: {
                **{k: copy.deepcopy(v) for k, v in st.items() if k != "mask"},
                "mask": st["mask"].to_sparse_coo(),
            }
            for name, st in self.state.items()
        }
        container: dict[str, torch.Tensor] = {}
        for name, data in self._data.items():
            key = name if name in self._squashed else f"parametrizations.{name}.original"
            container[key] = data.detach()
        return {
            "state": state,
            "data_groups": copy.deepcopy(dict(self.data_groups)),
            "_container": container,
        }

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Restore from a copy of ``state_dict`` (as torch's, which deep-copies it);
        ``strict`` first forgets every data held now."""
        for key in ("state", "data_groups", "_container"):
            if key not in state_dict:
                raise KeyError(f"sparsifier state_dict has no {key!r} entry")
        container = state_dict["_container"]
        loaded: list[tuple[str, dict[str, Any], dict[str, Any], torch.Tensor, bool]] = []
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
            if "mask" in st:  # as add_data checks a given mask, and torch's load refuses it
                if not isinstance(data, torch.Tensor):
                    raise TypeError(f"Error loading {name}: its data must be a tensor")
                try:
                    _check_mask(st["mask"], data, exact=True)
                except (TypeError, ValueError) as err:
                    raise type(err)(f"Error loading {name}: {err}") from None
            loaded.append((name, st, state_dict["data_groups"][name], data, squashed))
        if strict:
            self.state = defaultdict(dict)
            self.data_groups = defaultdict(dict)
            self._data = {}
            self._squashed = set()
            self._kept = {}
            self._all_ones = {}
        for name, st, group, data, squashed in loaded:
            self._data[name] = copy.deepcopy(data)
            self._kept.pop(name, None)
            self._all_ones.pop(name, None)
            state = {k: copy.deepcopy(v) for k, v in st.items() if k != "mask"}
            if "mask" in st:
                mask = st["mask"]
                state["mask"] = mask.to_dense() if mask.is_sparse else mask.clone()
            else:
                state["mask"], kept = self._all_kept(self._data[name])
                if kept is not None:
                    self._kept[name] = kept
            self.state[name] = state
            self.data_groups[name] = copy.deepcopy(group)
            if squashed:
                self._squashed.add(name)
            else:
                self._squashed.discard(name)

    def __getstate__(self) -> dict[str, Any]:
        """What pickling (``torch.save(sparsifier)``, ``copy``) keeps: everything but the
        bool tensors whose int8 views are the masks (``torch.save`` refuses one storage
        seen as two dtypes); ``kept_mask`` then reads the masks themselves."""
        state = dict(self.__dict__)
        state["_kept"], state["_all_ones"] = {}, {}
        return state

    def __repr__(self) -> str:
        text = self.__class__.__name__ + " ("
        for name, args in self.data_groups.items():
            text += f"\n\tData Group\n\t    name: {name}\n"
            text += "".join(f"\t    {k}: {args[k]}\n" for k in sorted(args) if k != "data")
        return text + ")"
