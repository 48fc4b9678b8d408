"""A task version's pack (specs/format.md §5.8): its small whole tensors in one byte string.

Each tensor's carrier values (the ``lossless`` page's integer view of its bits) are XORed with
the reference tensor's when it has one, so the bits a finetune left alone are zeros, then
byte-shuffled (all lowest bytes, then all second bytes, ...) so that the mostly-zero high
bytes of every value sit together where zstd finds them. Pure math: the storage layer
compresses and stores the result.
"""

from __future__ import annotations

import torch

from .compressors.lossless import Lossless, carrier_dtype


def carrier(tensor: torch.Tensor) -> torch.Tensor:
    """The carrier values of ``tensor`` (flat, on the CPU): its bits as the lossless page stores them."""
    return Lossless().encode(tensor.detach().cpu()).arrays["data"].reshape(-1)


def shuffle(values: torch.Tensor) -> torch.Tensor:
    """uint8 ``(n * w,)``: byte ``k`` of element ``j`` at ``k * n + j`` (little-endian bytes)."""
    n, w = values.numel(), values.element_size()
    return values.contiguous().view(torch.uint8).reshape(n, w).t().contiguous().reshape(-1)


def unshuffle(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of :func:`shuffle`: ``(n,)`` values of the integer ``dtype``."""
    w = torch.empty((), dtype=dtype).element_size()
    n = data.numel() // w
    if n == 0:  # an empty tensor: nothing to view (torch views bytes as wider items only when aligned)
        return torch.zeros(0, dtype=dtype)
    return data.reshape(w, n).t().clone(memory_format=torch.contiguous_format).reshape(-1).view(dtype)


# The reference dtypes a pack may XOR a float tensor of a wider type with, once the reference's
# values are converted to that type, exactly (specs/format.md §5.8, since 1.4): a float32
# finetune of a bfloat16 model then stores its norms' changed bits only, as one of its own dtype does.
WIDER_THAN = {torch.float32: (torch.bfloat16, torch.float16),
              torch.float64: (torch.bfloat16, torch.float16, torch.float32)}


def can_widen(reference_dtype: torch.dtype, dtype: torch.dtype) -> bool:
    """Whether a pack may XOR a ``dtype`` tensor with a ``reference_dtype`` one of another type."""
    return reference_dtype in WIDER_THAN.get(dtype, ())


def xor_reference(dtype: torch.dtype, reference: torch.Tensor) -> torch.Tensor | None:
    """What a pack XORs a ``dtype`` tensor with: ``reference`` when of that dtype; its values
    converted to ``dtype`` when :func:`can_widen` and it holds no NaN (whose bits a conversion
    need not keep); else None, and the tensor is packed as it is."""
    if reference.dtype == dtype:
        return reference
    if can_widen(reference.dtype, dtype) and not torch.isnan(reference).any():
        return reference.to(dtype)
    return None


def pack_tensors(tensors: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """uint8: the pack of ``(tensor, reference tensor or None)`` pairs, in the order given
    (the caller's: code-point order of the names). A reference has the tensor's dtype and shape
    (:func:`xor_reference` makes it)."""
    parts = []
    for tensor, reference in tensors:
        values = carrier(tensor)
        if reference is not None:
            values = values ^ carrier(reference)
        parts.append(shuffle(values))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)


def packed_nbytes(shape, dtype: torch.dtype) -> int:
    """Bytes a tensor of ``shape`` and ``dtype`` takes in a pack: its element count times its carrier's width."""
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=carrier_dtype(dtype)).element_size()


def unpack_carrier(data: torch.Tensor, shape, dtype: torch.dtype, reference: torch.Tensor | None) -> torch.Tensor:
    """One tensor's carrier values, of ``shape``, from its range ``data`` of a pack, XORed back
    with ``reference`` (the reference tensor's carrier values) when it has one."""
    values = unshuffle(data, carrier_dtype(dtype))
    if reference is not None:
        values = values ^ reference.reshape(-1)
    return values.reshape(tuple(shape))


# Explicit mantissa bits of each float dtype (IEEE 754; bfloat16 is binary32's top half).
MANTISSA_BITS = {torch.float64: 52, torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}


def keep_mantissa_bits(tensor: torch.Tensor, reference: torch.Tensor, bits: int) -> torch.Tensor:
    """``tensor`` with all but the top ``bits`` of its mantissa taken from ``reference`` (the lossy
    option for small tensors): the value moves by less than ``2**-bits`` of itself, and its XOR
    with the reference, which a pack stores, is zero in those low bits, which zstd then stores for
    nearly nothing. Sign and exponent are the tensor's own, so no value becomes NaN or infinite.
    Non-float tensors, and ``bits`` at or above the dtype's mantissa, come back unchanged."""
    drop = MANTISSA_BITS.get(tensor.dtype, 0) - bits
    if drop <= 0:
        return tensor
    mine, theirs = carrier(tensor), carrier(reference)
    low = (1 << drop) - 1
    mixed = (mine & ~low) | (theirs & low)
    return mixed.view(tensor.dtype).reshape(tensor.shape)
