"""The one dtype table (deltastore/dtypes.py) agrees with torch, numpy and safetensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deltastore import dtypes
from deltastore.errors import InvalidInputError


@pytest.mark.parametrize("name", dtypes.TENSOR_DTYPES)
def test_tensor_dtype_names_round_trip(name):
    assert dtypes.dtype_name(dtypes.torch_dtype(name)) == name


@pytest.mark.parametrize("name", dtypes.ARRAY_DTYPES)
def test_array_dtypes_are_numpy_dtypes_of_the_same_width(name):
    torch_dtype = getattr(torch, name)
    numpy_dtype = dtypes.array_numpy_dtype(torch_dtype)
    assert numpy_dtype.itemsize == torch.empty((), dtype=torch_dtype).element_size()
    assert dtypes.array_torch_dtype(numpy_dtype.newbyteorder("<")) == torch_dtype


def test_safetensors_codes_are_what_safetensors_writes(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {name: torch.zeros(2, dtype=dtypes.torch_dtype(name)) for name in dtypes.TENSOR_DTYPES}
    save_file(tensors, tmp_path / "all.safetensors")
    with safe_open(str(tmp_path / "all.safetensors"), framework="pt") as handle:
        written = {handle.get_slice(name).get_dtype(): name for name in tensors}
    assert written == dtypes.SAFETENSORS_DTYPES


def test_what_arrays_and_tensors_may_not_have_is_refused():
    with pytest.raises(TypeError, match="bfloat16 cannot be stored"):
        dtypes.array_numpy_dtype(torch.bfloat16)
    with pytest.raises(TypeError, match="cannot be read"):
        dtypes.array_torch_dtype(np.dtype("float64"))
    with pytest.raises(InvalidInputError, match="uint16 is not supported"):
        dtypes.dtype_name(torch.uint16)
    with pytest.raises(InvalidInputError, match="unknown dtype 'int4'"):
        dtypes.torch_dtype("int4")
