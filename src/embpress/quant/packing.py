"""Bit packing of b-bit codes (b in 8, 4, 2) into bytes, FBGEMM's order.

Code ``j`` of a run lives in byte ``j * b // 8`` at bit ``(j * b) % 8`` (low bits first):
at 4 bits the even element is the low nibble. Codes never straddle a byte.
"""

from __future__ import annotations

import torch

__all__ = ["pack_codes", "packed_length", "unpack_codes"]


def packed_length(count: int, bits: int) -> int:
    """Bytes needed for ``count`` codes of ``bits`` bits."""
    per_byte = 8 // bits
    return (count + per_byte - 1) // per_byte


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``[..., L]`` into ``[..., packed_length(L)]`` bytes."""
    if bits == 8:
        return codes.to(torch.uint8)
    per_byte = 8 // bits
    length = codes.shape[-1]
    pad = packed_length(length, bits) * per_byte - length
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    grouped = codes.to(torch.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    out = torch.zeros(grouped.shape[:-1], dtype=torch.uint8, device=codes.device)
    for k in range(per_byte):
        out |= grouped[..., k] << (k * bits)
    return out


def unpack_codes(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[..., P]`` bytes -> ``[..., length]`` uint8 codes."""
    if bits == 8:
        return packed[..., :length]
    per_byte = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)[..., :length]
