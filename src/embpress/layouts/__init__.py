"""Storage layouts of a quantized table and their lookups (dense, pruned rows, block-sparse)."""

from .base import FormatError, QuantizedTable
from .block_sparse import BlockSparseTable
from .dense import DenseTable
from .encode import encode_table, layout_sizes
from .pruned_rows import PrunedRowsTable

TABLE_CLASSES: dict[str, type[QuantizedTable]] = {
    cls.layout: cls for cls in (DenseTable, PrunedRowsTable, BlockSparseTable)
}

__all__ = [
    "TABLE_CLASSES",
    "BlockSparseTable",
    "DenseTable",
    "FormatError",
    "PrunedRowsTable",
    "QuantizedTable",
    "encode_table",
    "layout_sizes",
]
