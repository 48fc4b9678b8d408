"""Packing booleans 8 per byte, least significant bit first (specs/format.md, "Bit packing").

Element ``i`` of the flat boolean vector lands in byte ``i // 8`` at bit ``i % 8``
(value ``1 << (i % 8)``). Padding bits of the last byte are 0. This order is the one
``numpy.packbits(..., bitorder="little")`` uses, so other readers can rely on a library.
"""

from __future__ import annotations

import torch

_WEIGHTS_CACHE: dict[torch.device, torch.Tensor] = {}


def _bit_weights(device: torch.device) -> torch.Tensor:
    weights = _WEIGHTS_CACHE.get(device)
    if weights is None:
        weights = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8, device=device)
        _WEIGHTS_CACHE[device] = weights
    return weights


def packed_size(n: int) -> int:
    """Bytes needed to hold ``n`` packed bits."""
    return (n + 7) // 8


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor (any shape, flattened row-major) into uint8 of ``ceil(n/8)``."""
    flat = bits.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, 8)
    # Sum of distinct powers of two never carries, so uint8 arithmetic is exact.
    return (groups * _bit_weights(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 of ``ceil(n/8)`` bytes -> bool tensor of ``n``."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed bits must be a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.numel() != packed_size(n):
        raise ValueError(f"{n} bits need {packed_size(n)} bytes, got {packed.numel()}")
    bits = (packed.unsqueeze(1) & _bit_weights(packed.device)) != 0
    return bits.reshape(-1)[:n]
