"""Lossless: a tensor's exact bits, for small tensors (biases, norms, buffers) and for
task-own tensors that have no counterpart in the reference (a new classification head).

Unlike the delta compressors it takes the tensor itself in any dtype and shape and gives
it back bit for bit. Arrays: ``data``, the tensor's bytes viewed as a signed integer of the
same width (``uint8`` for 1-byte types), in the tensor's shape. Attrs: ``dtype`` (torch
dtype name). See specs/compressors/lossless.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...dtypes import dtype_name, torch_dtype
from ...errors import CorruptObjectError
from .base import CompressorConfig, Encoded

_CARRIER = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def carrier_dtype(dtype: torch.dtype) -> torch.dtype:
    """The integer type a tensor of ``dtype`` is stored as (bool: uint8, 0 or 1)."""
    return torch.uint8 if dtype == torch.bool else _CARRIER[torch.empty((), dtype=dtype).element_size()]


@dataclass(frozen=True)
class LosslessConfig(CompressorConfig):
    """No knobs: exactness is the point."""


class Lossless:
    name: ClassVar[str] = "lossless"
    config_class: ClassVar[type] = LosslessConfig

    def __init__(self, config: LosslessConfig | None = None):
        self.config = config or LosslessConfig()

    def encode(self, x: torch.Tensor, *, seed: int = 0) -> Encoded:
        name = dtype_name(x.dtype)
        data = x.detach().contiguous()
        if data.dtype == torch.bool:
            data = data.to(torch.uint8)
        carrier = _CARRIER[data.element_size()]
        if data.dtype != carrier:
            data = data.view(carrier)
        return Encoded({"data": data}, {"dtype": name})

    def decode(self, encoded: Encoded, shape, device: torch.device | str) -> torch.Tensor:
        dtype = torch_dtype(encoded.attr("dtype", str))
        data = encoded.array("data")
        carrier = carrier_dtype(dtype)
        if data.dtype != carrier or tuple(data.shape) != tuple(shape):
            raise CorruptObjectError(f"lossless: 'data' must be {carrier} {tuple(shape)} for a {encoded.attrs['dtype']} "
                                     f"tensor, found {data.dtype} {tuple(data.shape)}")
        data = data.to(device)
        if dtype == torch.bool:
            return data.to(torch.bool).reshape(shape)
        out = data if data.dtype == dtype else data.view(dtype)
        return out.reshape(shape)

    def simulate(self, x: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
        return x


COMPRESSOR = Lossless
