"""embpress: prune and low-bit quantize the embedding tables of trained PyTorch models.

Public API only; see README.md for the tour and docs/format.md for the file format.
"""

from . import ops  # registers the torch.ops.embpress ops
from .api import post_training_sparse_quantize
from .checkpoint import (
    CompressedCheckpoint,
    compress_checkpoint,
    compress_state_dict,
    find_tables,
    inspect,
    inspect_checkpoint,
    load_checkpoint,
)
from .io import load, save
from .layouts import FormatError
from .nn import QuantizedEmbedding, QuantizedEmbeddingBag
from .planner import Plan, PlanError, plan
from .quant import QuantConfig
from .report import CheckpointReport, FileReport, TableReport, compression_report
from .sparsify import BaseDataSparsifier, DataNormSparsifier
from .usage import Usage, UsageError, record_usage

__version__ = "0.1.0"

__all__ = [
    "BaseDataSparsifier",
    "CheckpointReport",
    "CompressedCheckpoint",
    "DataNormSparsifier",
    "FileReport",
    "FormatError",
    "Plan",
    "PlanError",
    "QuantConfig",
    "QuantizedEmbedding",
    "QuantizedEmbeddingBag",
    "TableReport",
    "Usage",
    "UsageError",
    "__version__",
    "compress_checkpoint",
    "compress_state_dict",
    "compression_report",
    "find_tables",
    "inspect",
    "inspect_checkpoint",
    "load",
    "load_checkpoint",
    "ops",
    "plan",
    "post_training_sparse_quantize",
    "record_usage",
    "save",
]
