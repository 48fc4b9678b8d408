"""Counter-based pseudo-random numbers defined by plain integer arithmetic.

DARE and DeltaDQ regenerate their masks at decode time instead of storing them, so the bits
must be identical on every device and every torch version. ``torch.Generator`` promises
neither, so we define our own function (specs/format.md, "Pseudo-random function"):

    mix(x)  = lowbias32(x), the 32-bit integer hash by C. Wellons:
              x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16
              (all arithmetic modulo 2**32)
    r(s, i) = mix(mix(i) ^ mix(s))          for seed s and counter i, both in [0, 2**32)

It is computed in int64 with every product kept below 2**63 (a 32-bit by 16-bit multiply
at a time), so CPU and CUDA kernels give the same bits and nothing overflows.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MAX_COUNTER = 1 << 32


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # x * c mod 2**32, split so each partial product stays below 2**48.
    low = x * (c & 0xFFFF)
    high = ((x * (c >> 16)) & 0xFFFF) << 16
    return (low + high) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on an int64 tensor holding values in [0, 2**32); returns the same range."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def mix32_int(x: int) -> int:
    """:func:`mix32` for one Python int, used for seeds."""
    return int(mix32(torch.tensor([x & MASK32], dtype=torch.int64))[0])


def random_u32(seed: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``r(seed, i)`` for counters ``i = start .. start+count-1``, as int64 in [0, 2**32)."""
    if not (0 <= start and start + count <= MAX_COUNTER):
        raise ValueError(f"counters [{start}, {start + count}) leave the 32-bit range; split the tensor")
    return random_at(seed, torch.arange(start, start + count, dtype=torch.int64, device=device))


def random_at(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """``r(seed, i)`` for every counter of an int64 tensor of values in [0, 2**32); same shape."""
    return mix32(mix32(counters) ^ mix32_int(seed))


def derive_seed(base_seed: int, name: str) -> int:
    """A per-tensor seed from a global seed and the tensor's name (FNV-1a, then mixed)."""
    h = 0x811C9DC5
    for byte in name.encode("utf-8"):
        h = ((h ^ byte) * 0x01000193) & MASK32
    return mix32_int(h ^ (base_seed & MASK32))
