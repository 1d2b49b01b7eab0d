"""Row-wise quantization: config, qparams with exact zeros, codes and bit packing."""

from .config import QuantConfig
from .packing import pack_codes, packed_length, unpack_codes
from .rowwise import (
    RowQParams,
    choose_qparams,
    dequantize_codes,
    quantize_rows,
    row_ranges,
    search_ranges,
)

__all__ = [
    "QuantConfig",
    "RowQParams",
    "choose_qparams",
    "dequantize_codes",
    "pack_codes",
    "packed_length",
    "quantize_rows",
    "row_ranges",
    "search_ranges",
    "unpack_codes",
]
