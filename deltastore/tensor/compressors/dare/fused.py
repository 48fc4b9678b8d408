"""DARE's fused decoder: the keep mask regenerated from the seed inside the kernel, the kept
values gathered from their offsets, ``W_pre + lam1*tau + lam2*d`` written once
(deltastore.tensor.fused).

A first kernel counts the kept elements of every (changed row, column block); their prefix sum
is where each block's values start. It is part of :meth:`DareFused.prepare`, so a resident
cache pays it once per task, not per switch.
"""

from __future__ import annotations

import torch

from ....errors import CorruptObjectError
from ...fused import BLOCK, HAS_TRITON, FusedJob, base_pointers, lambda_products, n_blocks
from ...prng import MAX_COUNTER, mix32_int

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ...fused import base_term, mix32

    @triton.jit
    def _keep(flat, seed_mix, threshold):
        r = mix32(mix32(flat.to(tl.uint32)) ^ seed_mix.to(tl.uint32))
        return r.to(tl.int64) < threshold

    @triton.jit
    def _count_kernel(count_ptr, seed_mix, threshold, cols, n_blocks, BLOCK: tl.constexpr):
        # Kept elements per (changed row, column block), in flat order, for the value offsets.
        pid = tl.program_id(0)
        ti = pid // n_blocks
        c = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
        keep = _keep(ti.to(tl.int64) * cols + c, seed_mix, threshold) & (c < cols)
        tl.store(count_ptr + pid, tl.sum(keep.to(tl.int32), axis=0))

    @triton.jit
    def _kernel(out_ptr, w_ptr, trow_ptr, off_ptr, val_ptr, n_values, vscale_ptr, brow_ptr, bsign_ptr,
                const_ptr, seed_mix, threshold, cols, n_blocks,
                HAS_BASE: tl.constexpr, INT8: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        row = pid // n_blocks
        cb = pid % n_blocks
        c = cb * BLOCK + tl.arange(0, BLOCK)
        inb = c < cols
        offs = row.to(tl.int64) * cols + c
        w = tl.load(w_ptr + offs, mask=inb, other=0).to(tl.float32)
        ti = tl.load(trow_ptr + row)
        if ti >= 0:
            keep = _keep(ti.to(tl.int64) * cols + c, seed_mix, threshold) & inb
            k = keep.to(tl.int32)
            index = tl.load(off_ptr + ti.to(tl.int64) * n_blocks + cb).to(tl.int64) + (tl.cumsum(k, axis=0) - k)
            ok = keep & (index < n_values)
            d = tl.load(val_ptr + index, mask=ok, other=0).to(tl.float32)
            if INT8:
                d = d * tl.load(vscale_ptr + ti)
            d = tl.where(keep, d, 0.0)
            u = tl.load(const_ptr) * d  # lam2 * C(R); a separate rounding (fp fusion is off)
            if HAS_BASE:
                u = u + base_term(row, c, inb, cols, brow_ptr, bsign_ptr, const_ptr, BLOCK)
            w = w + u
        tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=inb)


def check_values(job: FusedJob, value_bits: int) -> None:
    """The kept values' arrays of either layout: 1-D float16, or int8 plus a float32 scale per row."""
    values = job.arrays.get("values")
    expected = torch.float16 if value_bits == 16 else torch.int8
    if values is None or values.dtype != expected or values.dim() != 1:
        raise CorruptObjectError(f"{job.what}: dare array 'values' must be 1-D {expected}")
    if value_bits == 8:
        scales = job.arrays.get("scales")
        if scales is None or scales.dtype != torch.float32 or tuple(scales.shape) != (job.changed_rows,):
            raise CorruptObjectError(f"{job.what}: dare array 'scales' must be float32 ({job.changed_rows},)")


class DareFused:
    def __init__(self, value_bits: int):
        self.value_bits = value_bits

    def check(self, job: FusedJob) -> None:
        check_values(job, self.value_bits)
        seed = job.attrs.get("seed")
        if job.changed_rows * job.cols > MAX_COUNTER or type(seed) is not int or not 0 <= seed < MAX_COUNTER:
            raise CorruptObjectError(f"{job.what}: dare needs a uint32 'seed' and at most 2**32 elements")

    def prepare(self, job: FusedJob) -> dict[str, torch.Tensor]:
        """``consts`` (the lambda products) and ``offsets``: int64 ``(changed_rows * n_blocks,)``,
        the index in 'values' of each block's first kept value."""
        device = job.w_pre.device
        blocks = n_blocks(job.cols)
        counts = torch.empty(job.changed_rows * blocks, dtype=torch.int32, device=device)
        if counts.numel():
            _count_kernel[(counts.numel(),)](counts, mix32_int(int(job.attrs["seed"])),
                                             int(job.attrs["keep_threshold"]), job.cols, blocks, BLOCK=BLOCK)
        ends = torch.cumsum(counts, 0, dtype=torch.int64)
        total = int(ends[-1]) if ends.numel() else 0  # one small sync: a wrong count must be an error, not a bad read
        if total != job.arrays["values"].numel():
            raise CorruptObjectError(f"{job.what}: dare array 'values' holds {job.arrays['values'].numel()} "
                                     f"values, the mask keeps {total}")
        head = torch.tensor([job.lam2, 0.0], dtype=torch.float32, device=device)
        return {"consts": lambda_products(head, job), "offsets": ends - counts}

    def run(self, job: FusedJob, out: torch.Tensor) -> None:
        blocks = n_blocks(job.cols)
        if job.rows * blocks == 0:
            return
        brow, bsigns = base_pointers(job)
        values = job.arrays["values"]
        consts = job.prepared["consts"]
        int8 = self.value_bits == 8
        vscale = job.arrays["scales"] if int8 else consts
        _kernel[(job.rows * blocks,)](out, job.w_pre, job.trow, job.prepared["offsets"], values, values.numel(),
                                      vscale, brow, bsigns, consts, mix32_int(int(job.attrs["seed"])),
                                      int(job.attrs["keep_threshold"]), job.cols, blocks,
                                      HAS_BASE=job.base is not None, INT8=int8, BLOCK=BLOCK, num_warps=8,
                                      enable_fp_fusion=False)
