"""The registry of storage layouts: the one place that maps a layout's name to its class.

Encoding ("auto" asks every registered layout for its predicted bytes), the file reader
(``io.py``), the embpress ops (``ops.py``), ``QuantConfig``'s check of ``layout`` and the
CLI's choices all read it; ``layouts/__init__.py`` registers the layouts, in the order
"auto" prefers them when two predict the same bytes.
"""

from __future__ import annotations

import inspect
from typing import TypeVar

from .base import QuantizedTable

__all__ = ["AUTO", "TABLE_CLASSES", "layout_choices", "register_layout", "table_class"]

AUTO = "auto"  # not a layout: the smallest registered one, table by table
TABLE_CLASSES: dict[str, type[QuantizedTable]] = {}

# what a layout class must define itself (the base class's versions only raise)
_REQUIRED = ("predicted_nbytes", "zero_rows", "pack", "from_tensors", "decode_rows")

T = TypeVar("T", bound=type[QuantizedTable])


def register_layout(cls: T) -> T:
    """Add ``cls`` to ``TABLE_CLASSES`` under its ``layout`` name; returns it (a decorator too).

    TypeError unless it is a ``QuantizedTable`` subclass defining what a layout owns;
    ValueError for a name that is empty, "auto" or already taken by another class.
    """
    if not (isinstance(cls, type) and issubclass(cls, QuantizedTable)) or cls is QuantizedTable:
        raise TypeError(f"a layout must be a QuantizedTable subclass, got {cls!r}")
    missing = [
        name
        for name in _REQUIRED
        if inspect.getattr_static(cls, name) is inspect.getattr_static(QuantizedTable, name)
    ]
    if missing:
        raise TypeError(f"layout class {cls.__name__} does not define {', '.join(missing)}")
    name = cls.layout
    if not isinstance(name, str) or not name or name == AUTO:
        raise ValueError(f"layout class {cls.__name__} needs a name other than {AUTO!r}, got {name!r}")
    if TABLE_CLASSES.get(name, cls) is not cls:
        raise ValueError(f"layout {name!r} is already registered by {TABLE_CLASSES[name].__name__}")
    TABLE_CLASSES[name] = cls
    return cls


def table_class(name: str) -> type[QuantizedTable]:
    """The class registered as ``name``; ValueError naming the registered ones otherwise."""
    cls = TABLE_CLASSES.get(name)
    if cls is None:
        raise ValueError(f"unknown embpress layout {name!r}; registered: {sorted(TABLE_CLASSES)}")
    return cls


def layout_choices() -> tuple[str, ...]:
    """What ``QuantConfig(layout=...)`` accepts: "auto", then the registered names in order."""
    return (AUTO, *TABLE_CLASSES)
