"""Sparsifiers: decide which entries of a table are pruned (masks only, no storage)."""

from .base import BaseDataSparsifier
from .data_norm import DataNormSparsifier, block_norm_mask, streaming_block_norm_mask

__all__ = ["BaseDataSparsifier", "DataNormSparsifier", "block_norm_mask", "streaming_block_norm_mask"]
