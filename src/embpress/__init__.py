"""embpress: prune and low-bit quantize the embedding tables of trained PyTorch models.

Public API only; see README.md for the tour and docs/format.md for the file format.
"""

from .api import post_training_sparse_quantize
from .io import load, save
from .layouts import FormatError
from .nn import QuantizedEmbedding, QuantizedEmbeddingBag
from .quant import QuantConfig
from .report import TableReport, compression_report
from .sparsify import BaseDataSparsifier, DataNormSparsifier
from .usage import Usage, UsageError, record_usage

__version__ = "0.1.0"

__all__ = [
    "BaseDataSparsifier",
    "DataNormSparsifier",
    "FormatError",
    "QuantConfig",
    "QuantizedEmbedding",
    "QuantizedEmbeddingBag",
    "TableReport",
    "Usage",
    "UsageError",
    "__version__",
    "compression_report",
    "load",
    "post_training_sparse_quantize",
    "record_usage",
    "save",
]
