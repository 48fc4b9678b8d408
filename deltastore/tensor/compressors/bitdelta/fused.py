"""BitDelta's fused decoder: ``W_pre + lam1*tau + lam2*(+-alpha)`` in one Triton kernel
(deltastore.tensor.fused)."""

from __future__ import annotations

import torch

from ....errors import CorruptObjectError
from ...bitpack import packed_size
from ...fused import BLOCK, HAS_TRITON, FusedJob, base_pointers, lambda_products, n_blocks

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ...fused import base_term

    @triton.jit
    def _kernel(out_ptr, w_ptr, trow_ptr, sign_ptr, brow_ptr, bsign_ptr, const_ptr, cols, n_blocks,
                HAS_BASE: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        row = pid // n_blocks
        c = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
        inb = c < cols
        offs = row.to(tl.int64) * cols + c
        w = tl.load(w_ptr + offs, mask=inb, other=0).to(tl.float32)
        ti = tl.load(trow_ptr + row)
        if ti >= 0:
            flat = ti.to(tl.int64) * cols + c
            byte = tl.load(sign_ptr + (flat >> 3), mask=inb, other=0).to(tl.int32)
            bit = (byte >> (flat & 7).to(tl.int32)) & 1
            u = tl.where(bit != 0, tl.load(const_ptr), tl.load(const_ptr + 1))  # lam2 * (+-alpha)
            if HAS_BASE:
                u = u + base_term(row, c, inb, cols, brow_ptr, bsign_ptr, const_ptr, BLOCK)
            w = w + u
        tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=inb)


class BitDeltaFused:
    def check(self, job: FusedJob) -> None:
        n = packed_size(job.changed_rows * job.cols)
        signs = job.arrays.get("signs")
        if signs is None or signs.dtype != torch.uint8 or signs.dim() != 1 or signs.numel() != n:
            raise CorruptObjectError(f"{job.what}: bitdelta 'signs' must be uint8 ({n},)")

    def prepare(self, job: FusedJob) -> dict[str, torch.Tensor]:
        scale = torch.tensor(job.attrs["scale"], dtype=torch.float32, device=job.w_pre.device)
        return {"consts": lambda_products(job.lam2 * torch.stack([scale, -scale]), job)}

    def run(self, job: FusedJob, out: torch.Tensor) -> None:
        blocks = n_blocks(job.cols)
        if job.rows * blocks == 0:
            return
        brow, bsigns = base_pointers(job)
        _kernel[(job.rows * blocks,)](out, job.w_pre, job.trow, job.arrays["signs"], brow, bsigns,
                                      job.prepared["consts"], job.cols, blocks, HAS_BASE=job.base is not None,
                                      BLOCK=BLOCK, num_warps=8, enable_fp_fusion=False)
