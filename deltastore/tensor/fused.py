"""Fused decoders: rebuild one delta tensor in a single pass over its output.

A compressor may offer a fused decoder (``Compressor.fused_decoder()``, optional) that writes

    out = W_pre + lam1 * tau_base + lam2 * C(R)        on the changed rows, W_pre elsewhere

in one kernel that reads each stored byte once and writes each output weight once, with the
same float32 operations in the same order as :func:`deltastore.tensor.dbms.reconstruct`
(Triton's FMA contraction off, round-to-nearest-even on the final cast), so that its bits
equal the reference decode's. This module holds what every fused decoder shares: the job it
is given, the base vector term, the uint32 hash of the PRNG, and when Triton may run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..errors import CorruptObjectError
from .bitpack import packed_size

try:  # Triton is optional: without it (or on CPU) the reference decode gives the same bits.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the installation
    HAS_TRITON = False

# Columns one kernel program handles (a row is split into ceil(cols / BLOCK) programs).
BLOCK = 2048


def triton_enabled(device: torch.device) -> bool:
    """True when the Triton kernels run on ``device`` (CUDA with Triton, or Triton's CPU
    interpreter when ``TRITON_INTERPRET=1``, which the CPU tests use)."""
    if not HAS_TRITON or os.environ.get("DELTASTORE_NO_TRITON") == "1":
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def n_blocks(cols: int) -> int:
    return -(-cols // BLOCK)


@dataclass
class BaseTerm:
    """The base vector's part of one tensor: ``lam1 * tau_base`` with ``tau_base`` a BitDelta
    code (specs/format.md: a base vector is always BitDelta). ``brow``: int32 ``(rows,)``, the
    base's changed-row number of each row or -1; ``signs``: its packed sign bits; ``scale``: its
    float32 alpha."""

    brow: torch.Tensor
    signs: torch.Tensor | None
    scale: float
    changed_rows: int

    def check(self, cols: int, what: str) -> None:
        n = packed_size(self.changed_rows * cols)
        signs = self.signs
        if signs is None or signs.dtype != torch.uint8 or signs.dim() != 1 or signs.numel() != n:
            raise CorruptObjectError(f"{what}: base vector 'signs' must be uint8 ({n},)")


@dataclass
class FusedJob:
    """One delta tensor for a fused decoder, everything on the decode device.

    ``w_pre``: the reference as ``(rows, cols)`` in its own dtype; ``trow``: int32 ``(rows,)``,
    the task's changed-row number of each row or -1; ``arrays``/``attrs``: the stored code of the
    ``changed_rows`` changed rows; ``prepared``: what :meth:`FusedDecoder.prepare` made for this
    code and these lambdas (a resident cache keeps it between switches).
    """

    what: str
    rows: int
    cols: int
    changed_rows: int
    attrs: dict
    lam1: float
    lam2: float
    w_pre: torch.Tensor
    trow: torch.Tensor
    arrays: dict[str, torch.Tensor]
    base: BaseTerm | None = None
    prepared: dict[str, torch.Tensor] = field(default_factory=dict)


class FusedDecoder(Protocol):
    """A compressor's single-pass decoder (see the module docstring)."""

    def check(self, job: FusedJob) -> None:
        """Refuse stored arrays of the wrong dtype or size (CorruptObjectError), without a
        device synchronisation where possible: the kernels trust what passes."""
        ...

    def prepare(self, job: FusedJob) -> dict[str, torch.Tensor]:
        """Per-code inputs of :meth:`run` that do not change between decodes (e.g. the lambda
        products); may read the arrays on the device."""
        ...

    def run(self, job: FusedJob, out: torch.Tensor) -> None:
        """Write the rebuilt tensor into ``out``: contiguous, ``rows * cols`` elements, the
        finetune's dtype."""
        ...

    # Optional, for a decode that is a pass over the whole output at copy speed followed by a
    # latency-bound pass over few of its elements (DARE's kept values): ``run_dense(job, out)``
    # and ``run_kept(job, out)``, with ``run`` the two in that order. The engine may queue
    # ``run_kept`` on another stream, after ``run_dense``, where it overlaps the dense passes of
    # the next tensors instead of waiting behind them (engine/decode.py: decode_split).


def lambda_products(head: torch.Tensor, job: FusedJob) -> torch.Tensor:
    """float32 ``(5,)`` on the job's device: the compressor's two ``lam2`` products ``head``
    then ``[lam1*b, lam1*(-b), lam1*0]`` with ``b`` the base's scale (zeros without a base),
    formed by torch exactly as the reference decode forms them. :func:`base_term` reads the
    last three."""
    device = job.w_pre.device
    if job.base is not None:
        bscale = torch.tensor(job.base.scale, dtype=torch.float32, device=device)
        tail = job.lam1 * torch.stack([bscale, -bscale, torch.zeros_like(bscale)])
    else:
        tail = torch.zeros(3, dtype=torch.float32, device=device)
    return torch.cat([head.to(device=device, dtype=torch.float32), tail])


if HAS_TRITON:

    @triton.jit
    def mix32(x):
        # lowbias32 on uint32 (prng.py): products wrap modulo 2**32 in uint32 arithmetic.
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        x = x ^ (x >> 16)
        return x

    @triton.jit
    def base_term(row, c, inb, cols, brow_ptr, bsign_ptr, const_ptr, BLOCK: tl.constexpr):
        # lam1 * tau for one block of a row: +-lam1*alpha_base on the base's changed rows, lam1*0 elsewhere.
        bi = tl.load(brow_ptr + row)
        b_zero = tl.load(const_ptr + 4)
        b = tl.broadcast_to(b_zero, [BLOCK])  # not zeros + b_zero: that turns a -0.0 into +0.0
        if bi >= 0:
            bflat = bi.to(tl.int64) * cols + c
            bbyte = tl.load(bsign_ptr + (bflat >> 3), mask=inb, other=0).to(tl.int32)
            bbit = (bbyte >> (bflat & 7).to(tl.int32)) & 1
            b = tl.where(bbit != 0, tl.load(const_ptr + 2), tl.load(const_ptr + 3))
        return b


    @triton.jit
    def base_term_bytes(row, c0, cols, brow_ptr, bsign_ptr, const_ptr, BLOCK: tl.constexpr):
        # base_term for the block of BLOCK columns from c0 when cols % 8 == 0 (every row's bits
        # start a byte): each sign byte is loaded once, as part of one contiguous vector load,
        # and its 8 bits spread by shifts, instead of a byte gathered per element.
        bi = tl.load(brow_ptr + row)
        b = tl.broadcast_to(tl.load(const_ptr + 4), [BLOCK])
        if bi >= 0:
            k = tl.arange(0, BLOCK // 8)
            byte = tl.load(bsign_ptr + ((bi.to(tl.int64) * cols + c0) >> 3) + k, mask=c0 + 8 * k < cols,
                           other=0).to(tl.int32)
            bit = tl.reshape((byte[:, None] >> tl.arange(0, 8)[None, :]) & 1, [BLOCK])
            b = tl.where(bit != 0, tl.load(const_ptr + 2), tl.load(const_ptr + 3))
        return b

    @triton.jit
    def base_term_at(row, col, mask, cols, brow_ptr, bsign_ptr, const_ptr):
        # base_term for scattered elements (vectors of rows and columns, int64).
        bi = tl.load(brow_ptr + row, mask=mask, other=-1)
        bflat = bi.to(tl.int64) * cols + col
        byte = tl.load(bsign_ptr + (bflat >> 3), mask=mask & (bi >= 0), other=0).to(tl.int32)
        bit = (byte >> (bflat & 7).to(tl.int32)) & 1
        signed = tl.where(bit != 0, tl.load(const_ptr + 2), tl.load(const_ptr + 3))
        return tl.where(bi >= 0, signed, tl.load(const_ptr + 4))


def base_pointers(job: FusedJob) -> tuple[torch.Tensor, torch.Tensor]:
    """``(brow, signs)`` for a kernel; without a base, stand-ins it never reads (HAS_BASE=False)."""
    return (job.base.brow, job.base.signs) if job.base is not None else (job.trow, job.trow)
