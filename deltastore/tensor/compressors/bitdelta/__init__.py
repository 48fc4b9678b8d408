"""BitDelta (init only): ``C(x) = alpha * sign(x)``, ``alpha = mean(|x|)`` over the matrix.

Arrays: ``signs`` uint8, ``ceil(rows*cols/8)`` bytes, bit = 1 where ``x > 0`` (LSB first,
row-major). Attrs: ``scale`` (float, alpha as float32). See specs/compressors/bitdelta.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ....errors import CorruptObjectError
from ... import lsq
from ...bitpack import pack_bits, packed_size, unpack_bits
from ..base import CompressorConfig, Encoded
from .fused import BitDeltaFused

# torch sums a CPU tensor of at most this many elements on one thread (at::internal::GRAIN_SIZE),
# so in an order that does not depend on the number of threads; a longer sum is split between
# threads, and its last bits change with their number.
SERIAL_SUM = 32768


@dataclass(frozen=True)
class BitDeltaConfig(CompressorConfig):
    """BitDelta has no knobs: one sign bit per element plus one float32 scale per matrix."""


class BitDelta:
    name: ClassVar[str] = "bitdelta"
    config_class: ClassVar[type] = BitDeltaConfig
    # What a byte-budgeted commit may choose (deltastore.engine.budget): its one setting.
    budget_settings: ClassVar[list[dict]] = [{}]

    def __init__(self, config: BitDeltaConfig | None = None):
        self.config = config or BitDeltaConfig()

    @staticmethod
    def scale(x: torch.Tensor) -> torch.Tensor:
        """alpha = mean |x|, a 0-d float32 tensor (differentiable)."""
        return x.abs().mean() if x.numel() else x.new_zeros(())

    def encode(self, x: torch.Tensor, *, seed: int) -> Encoded:
        signs = pack_bits(x > 0)
        return Encoded({"signs": signs}, {"scale": float(_stored_scale(x.float()))})

    def decode(self, encoded: Encoded, shape: tuple[int, int], device: torch.device | str) -> torch.Tensor:
        n = shape[0] * shape[1]
        signs = encoded.array("signs")
        if signs.dtype != torch.uint8 or signs.dim() != 1 or signs.numel() != packed_size(n):
            raise CorruptObjectError(f"bitdelta: 'signs' must be uint8 ({packed_size(n)},) for a {shape[0]}x{shape[1]} "
                                     f"matrix, found {signs.dtype} {tuple(signs.shape)}")
        positive = unpack_bits(signs.to(device), n).view(shape)
        scale = torch.tensor(encoded.attr("scale", float), dtype=torch.float32, device=device)
        # +alpha where the bit is set, -alpha elsewhere: sign(0) counts as -1 (METHOD.md).
        return torch.where(positive, scale, -scale)

    def simulate(self, x: torch.Tensor, *, seed: int) -> torch.Tensor:
        sign = torch.where(x > 0, 1.0, -1.0).to(x.dtype).detach()
        return self.scale(x) * sign

    def refit(self, encoded: Encoded, target: torch.Tensor, gram: torch.Tensor | None) -> Encoded:
        """The same signs, the scale fitted to ``target`` under ``gram`` (deltastore.tensor.lsq);
        never negative."""
        signs = self.decode(Encoded(encoded.arrays, {"scale": 1.0}), tuple(target.shape), target.device)
        scale = max(0.0, lsq.matrix_scale(signs, target, gram))
        return Encoded(dict(encoded.arrays), {**encoded.attrs, "scale": float(torch.tensor(scale, dtype=torch.float32))})

    def fused_decoder(self) -> BitDeltaFused:
        return BitDeltaFused()


COMPRESSOR = BitDelta


def _stored_scale(x: torch.Tensor) -> torch.Tensor:
    """alpha as stored: ``mean |x|`` whose bits on a CPU do not depend on torch's thread count,
    so a process and a Dask worker with other thread counts write the same scale (a base vector
    built on a cluster has the bits of one built in one process): blocks of SERIAL_SUM
    consecutive elements are summed one by one, then those sums likewise, until one is left.
    Equal to ``x.abs().mean()`` up to SERIAL_SUM elements. On a GPU, ``x.abs().mean()``."""
    sums = x.abs().reshape(-1)
    if sums.is_cuda or sums.numel() <= SERIAL_SUM:
        return BitDelta.scale(x)
    while sums.numel() > SERIAL_SUM:
        sums = torch.stack([block.sum() for block in sums.split(SERIAL_SUM)])
    return sums.sum() / x.numel()
