"""The one dtype table of the package: a dtype's name in the format, its torch dtype, its
numpy (zarr) data type, its safetensors code, and what may have it.

Two questions, one table (specs/format.md, "Arrays" and specs/compressors/lossless.md):

- which dtypes a *tensor* of a model may have (the ``dtype`` of a tensor entry; lossless stores
  any of them bit for bit), and how a safetensors header spells them;
- which dtypes a stored *array* may have: exactly those zarr v3 has a data type for, so
  ``bfloat16`` and ``bool`` are not among them (lossless stores them as uint16/uint8) and
  ``uint16`` is an array dtype only (packed codes), never a tensor's.

A leaf module: the tensor math and the storage layer both import it, it imports neither.
torch is imported on first use, so reading refs and records (``deltastore ls``) needs none.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import InvalidInputError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    name: str                  # the format's name, torch's spelling: "bfloat16"
    safetensors: str | None    # the safetensors header code ("BF16"); None: not a tensor dtype
    array: bool                # a stored array may have it (zarr v3 has this data type)


# Order is the order error messages list them in.
TABLE: tuple[DType, ...] = (
    DType("float64", "F64", array=False),
    DType("float32", "F32", array=True),
    DType("float16", "F16", array=True),
    DType("bfloat16", "BF16", array=False),
    DType("int64", "I64", array=True),
    DType("int32", "I32", array=True),
    DType("int16", "I16", array=True),
    DType("int8", "I8", array=True),
    DType("uint8", "U8", array=True),
    DType("bool", "BOOL", array=False),
    DType("uint16", None, array=True),
)

TENSOR_DTYPES: tuple[str, ...] = tuple(d.name for d in TABLE if d.safetensors is not None)
ARRAY_DTYPES: tuple[str, ...] = tuple(d.name for d in TABLE if d.array)
SAFETENSORS_DTYPES: dict[str, str] = {d.safetensors: d.name for d in TABLE if d.safetensors is not None}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a tensor dtype name ('float32' -> torch.float32)."""
    if name not in TENSOR_DTYPES:
        raise InvalidInputError(f"unknown dtype {name!r}; known dtypes are {', '.join(TENSOR_DTYPES)}")
    return _torch_by_name()[name]


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32; refuses dtypes the format does not define for tensors."""
    name = str(dtype).removeprefix("torch.")
    if name not in TENSOR_DTYPES:
        raise InvalidInputError(f"tensor dtype {name} is not supported; supported: {', '.join(TENSOR_DTYPES)}")
    return name


def array_torch_dtypes() -> tuple[torch.dtype, ...]:
    """The torch dtypes a compressor may give its arrays (:data:`ARRAY_DTYPES`)."""
    return tuple(_torch_by_name()[name] for name in ARRAY_DTYPES)


def array_numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy data type a tensor of torch ``dtype`` is stored as, for array dtypes only."""
    name = str(dtype).removeprefix("torch.")
    if name not in ARRAY_DTYPES:
        raise TypeError(f"arrays of dtype {dtype} cannot be stored; allowed: {', '.join(ARRAY_DTYPES)}")
    return np.dtype(name)


def array_torch_dtype(dtype: np.dtype) -> torch.dtype:
    """The torch dtype of a stored array's numpy data type (of :data:`ARRAY_DTYPES`)."""
    if dtype.name not in ARRAY_DTYPES:
        raise TypeError(f"arrays of data type {dtype} cannot be read; allowed: {', '.join(ARRAY_DTYPES)}")
    return _torch_by_name()[dtype.name]


@functools.cache
def _torch_by_name() -> dict[str, torch.dtype]:
    import torch

    return {d.name: getattr(torch, d.name) for d in TABLE}
