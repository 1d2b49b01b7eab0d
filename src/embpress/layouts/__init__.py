"""Storage layouts of a quantized table and their lookups (dense, pruned rows, block-sparse, mixed).

A layout is one ``QuantizedTable`` subclass in its own file; the lines below register
each one, in the order "auto" prefers them when two predict the same bytes.
"""

from .base import EncodedTable, FormatError, QuantizedTable
from .block_sparse import BlockSparseTable
from .dense import DenseTable
from .encode import encode_table, layout_sizes
from .lookup import (
    KernelPolicy,
    Pooling,
    current_kernel_policy,
    kernel_path,
    kernel_paths,
    kernel_policy,
    set_default_kernel_policy,
    system_info,
)
from .mixed import MixedTable
from .pruned_rows import PrunedRowsTable
from .registry import TABLE_CLASSES, layout_choices, register_layout, table_class
from .stats import MaskStats, RowStats, row_stats

register_layout(DenseTable)
register_layout(PrunedRowsTable)
register_layout(BlockSparseTable)
register_layout(MixedTable)

__all__ = [
    "TABLE_CLASSES",
    "BlockSparseTable",
    "DenseTable",
    "EncodedTable",
    "FormatError",
    "KernelPolicy",
    "MaskStats",
    "MixedTable",
    "Pooling",
    "PrunedRowsTable",
    "QuantizedTable",
    "RowStats",
    "current_kernel_policy",
    "encode_table",
    "kernel_path",
    "kernel_paths",
    "kernel_policy",
    "layout_choices",
    "layout_sizes",
    "register_layout",
    "row_stats",
    "set_default_kernel_policy",
    "system_info",
    "table_class",
]
