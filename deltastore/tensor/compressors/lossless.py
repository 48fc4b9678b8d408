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

from ...errors import CorruptObjectError, InvalidInputError
from .base import CompressorConfig, Encoded

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
    "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
_CARRIER = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32; refuses dtypes the format does not define."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise InvalidInputError(f"tensor dtype {name} is not supported; supported: {', '.join(DTYPES)}")
    return name


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise InvalidInputError(f"unknown dtype {name!r}; known dtypes are {', '.join(DTYPES)}") from None


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
        dtype = dtype_from_name(encoded.attr("dtype", str))
        data = encoded.array("data")
        carrier = torch.uint8 if dtype == torch.bool else _CARRIER[torch.empty((), dtype=dtype).element_size()]
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
