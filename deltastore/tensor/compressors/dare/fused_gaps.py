"""DARE's fused decoder for the ``gaps`` layout (deltastore.tensor.fused): two kernels a decode.

1. ``_dense_kernel``, one program per (row, column block), at copy speed (``_dense_flat_kernel``,
   flat blocks of elements, when every row is changed): ``W_pre`` on the
   rows the task left unchanged and ``W_pre + (lam2 * 0 + lam1 * tau)`` on its changed rows,
   which is what a dropped element is; the base's sign bits are read a byte per 8 elements in
   one vector load when ``cols % 8 == 0``.
2. ``_sparse_kernel``, one program per block of the layout (``BLOCK_ELEMENTS`` elements of
   the changed rows), after it on the same stream: draws the block's gaps and overwrites each
   kept element with ``W_pre + (lam2 * C + lam1 * tau)``. Work in proportion to the kept
   elements; no mask is built, no element is hashed.

The float32 operations are those of :func:`deltastore.tensor.dbms.reconstruct`, in its order,
so both kernels give the reference decode's bits. :meth:`DareGapsFused.prepare` (once per
code; a resident cache keeps it) counts each block's kept values with the same draws
(``_count_kernel``), for the index of each block's first value in 'values'.
"""

from __future__ import annotations

import functools

import torch

from ....errors import CorruptObjectError
from ...fused import BLOCK, HAS_TRITON, FusedJob, base_pointers, lambda_products, n_blocks
from ...prng import MAX_COUNTER, mix32_int
from .fused import check_values
from .gaps import BLOCK_ELEMENTS, MIN_KEEP_THRESHOLD, gap_index, gap_table

# Gaps one program draws at a time: about 1.6 rounds a block at p = 0.99 (655 kept of 65536).
DRAWS = 1024
# Elements a program of the flat dense kernel streams (measured on an H200 against 2048-8192:
# within 3% of each other, 1.18x a plain copy against 1.37x for the per-row kernel).
FLAT_BLOCK = 8192

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ...fused import base_term, base_term_at, base_term_bytes, mix32

    @triton.jit
    def _draw(seed_mix, table_ptr, table_len, index_ptr, shift, bias, steps, start, length, drawn, last,
              DRAWS: tl.constexpr):
        # Draws drawn .. drawn+DRAWS-1 of the block at flat index `start` (specs/compressors/dare.md,
        # layout gaps): the positions in the block they reach, int32, increasing.
        t = drawn + tl.arange(0, DRAWS)
        u = mix32(mix32((start + tl.minimum(t, length - 1)).to(tl.uint32)) ^ seed_mix.to(tl.uint32)).to(tl.int64)
        # How many table entries are <= u: the draw's bucket bounds it (gaps.GapIndex), then a
        # binary search of what the bucket leaves, steps = GapIndex.steps (1 at p = 0.99).
        bucket = tl.maximum((u.to(tl.float64).to(tl.int64, bitcast=True) >> shift) - bias, 0)
        lo = tl.load(index_ptr + bucket)
        hi = tl.load(index_ptr + bucket + 1)
        for _ in range(steps):
            active = lo < hi
            mid = (lo + hi) // 2
            le = tl.load(table_ptr + mid, mask=active, other=0) <= u
            lo = tl.where(active & le, mid + 1, lo)
            hi = tl.where(active & ~le, mid, hi)
        return last + tl.cumsum(1 + table_len - lo, axis=0)

    @triton.jit
    def _count_kernel(count_ptr, table_ptr, table_len, index_ptr, shift, bias, steps, seed_mix, n,
                      BLOCK_ELEMENTS: tl.constexpr, DRAWS: tl.constexpr):
        b = tl.program_id(0)
        start = b.to(tl.int64) * BLOCK_ELEMENTS
        length = tl.minimum(n - start, BLOCK_ELEMENTS).to(tl.int32)
        count = tl.full([], 0, tl.int32)
        drawn = tl.full([], 0, tl.int32)
        last = tl.full([], -1, tl.int32)
        while last < length - 1:
            pos = _draw(seed_mix, table_ptr, table_len, index_ptr, shift, bias, steps, start, length, drawn, last,
                        DRAWS)
            count += tl.sum((pos < length).to(tl.int32), axis=0)
            drawn += DRAWS
            last = tl.max(pos, axis=0)
        tl.store(count_ptr + b, count)

    @triton.jit
    def _dense_kernel(out_ptr, w_ptr, trow_ptr, brow_ptr, bsign_ptr, const_ptr, cols, n_blocks,
                      HAS_BASE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        row = pid // n_blocks
        c0 = (pid % n_blocks) * BLOCK
        c = c0 + tl.arange(0, BLOCK)
        inb = c < cols
        offs = row.to(tl.int64) * cols + c
        w = tl.load(w_ptr + offs, mask=inb, other=0).to(tl.float32)
        if tl.load(trow_ptr + row) >= 0:
            u = tl.broadcast_to(tl.load(const_ptr + 1), [BLOCK])  # lam2 * 0 (its sign too): a dropped element
            if HAS_BASE:
                if ALIGNED:
                    u = u + base_term_bytes(row, c0, cols, brow_ptr, bsign_ptr, const_ptr, BLOCK)
                else:
                    u = u + base_term(row, c, inb, cols, brow_ptr, bsign_ptr, const_ptr, BLOCK)
            w = w + u
        tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=inb)

    @triton.jit
    def _dense_flat_kernel(out_ptr, w_ptr, bsign_ptr, const_ptr, n, HAS_BASE: tl.constexpr, BLOCK: tl.constexpr):
        # _dense_kernel when every row is changed, by the task and by the base: the matrix is one
        # flat run of elements, whose base sign bits are one flat run of bytes, so a program
        # streams BLOCK elements with no per-row lookups (copy speed).
        start = tl.program_id(0).to(tl.int64) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        inb = offs < n
        w = tl.load(w_ptr + offs, mask=inb, other=0).to(tl.float32)
        u = tl.broadcast_to(tl.load(const_ptr + 1), [BLOCK])  # lam2 * 0: a dropped element
        if HAS_BASE:
            k = tl.arange(0, BLOCK // 8)
            byte = tl.load(bsign_ptr + (start >> 3) + k, mask=start + 8 * k < n, other=0).to(tl.int32)
            bit = tl.reshape((byte[:, None] >> tl.arange(0, 8)[None, :]) & 1, [BLOCK])
            u = u + tl.where(bit != 0, tl.load(const_ptr + 2), tl.load(const_ptr + 3))
        tl.store(out_ptr + offs, (w + u).to(out_ptr.dtype.element_ty), mask=inb)

    @triton.jit
    def _sparse_kernel(out_ptr, w_ptr, rowmap_ptr, first_ptr, val_ptr, vscale_ptr, brow_ptr, bsign_ptr, const_ptr,
                       table_ptr, table_len, index_ptr, shift, bias, steps, seed_mix, n, cols,
                       HAS_BASE: tl.constexpr, ALL_ROWS: tl.constexpr, INT8: tl.constexpr,
                       BLOCK_ELEMENTS: tl.constexpr, DRAWS: tl.constexpr):
        b = tl.program_id(0)
        start = b.to(tl.int64) * BLOCK_ELEMENTS
        length = tl.minimum(n - start, BLOCK_ELEMENTS).to(tl.int32)
        index = tl.load(first_ptr + b)  # in 'values', of this round's first kept element
        drawn = tl.full([], 0, tl.int32)
        last = tl.full([], -1, tl.int32)
        while last < length - 1:
            pos = _draw(seed_mix, table_ptr, table_len, index_ptr, shift, bias, steps, start, length, drawn, last,
                        DRAWS)
            keep = pos < length  # a prefix of the lanes: positions increase
            flat = start + pos
            ti = flat // cols  # changed row
            col = flat - ti * cols
            if ALL_ROWS:
                row = ti
            else:
                row = tl.load(rowmap_ptr + ti, mask=keep, other=0).to(tl.int64)
            d = tl.load(val_ptr + index + tl.arange(0, DRAWS), mask=keep, other=0).to(tl.float32)
            if INT8:
                d = d * tl.load(vscale_ptr + ti, mask=keep, other=0)
            u = tl.load(const_ptr) * d  # lam2 * C(R); a separate rounding (fp fusion is off)
            if HAS_BASE:
                u = u + base_term_at(row, col, keep, cols, brow_ptr, bsign_ptr, const_ptr)
            offs = row * cols + col
            w = tl.load(w_ptr + offs, mask=keep, other=0).to(tl.float32)
            tl.store(out_ptr + offs, (w + u).to(out_ptr.dtype.element_ty), mask=keep)
            index += tl.sum(keep.to(tl.int32), axis=0)
            drawn += DRAWS
            last = tl.max(pos, axis=0)


@functools.lru_cache(maxsize=64)
def _device_tables(keep_threshold: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The layout's gap table and its index on ``device``, uploaded once per threshold (30 KiB
    at p = 0.99) rather than carried in every task's cached code."""
    return gap_table(keep_threshold).to(device), gap_index(keep_threshold).bounds.to(device)


class DareGapsFused:
    def __init__(self, value_bits: int):
        self.value_bits = value_bits

    def check(self, job: FusedJob) -> None:
        check_values(job, self.value_bits)
        seed, threshold = job.attrs.get("seed"), job.attrs.get("keep_threshold")
        if (job.changed_rows * job.cols > MAX_COUNTER or type(seed) is not int or not 0 <= seed < MAX_COUNTER
                or type(threshold) is not int or not MIN_KEEP_THRESHOLD <= threshold <= MAX_COUNTER):
            raise CorruptObjectError(f"{job.what}: dare layout 'gaps' needs a uint32 'seed', a 'keep_threshold' in "
                                     f"[2**16, 2**32] and at most 2**32 elements")

    def _draw_args(self, job: FusedJob) -> tuple:
        """The draw's arguments of both kernels: table, its length, the index, its shift, bias and
        steps, the seed's mix, the elements of the changed rows."""
        threshold = int(job.attrs["keep_threshold"])
        table, bounds = _device_tables(threshold, job.w_pre.device)
        index = gap_index(threshold)
        return (table, table.numel(), bounds, index.shift, index.bias, index.steps, mix32_int(int(job.attrs["seed"])),
                job.changed_rows * job.cols)

    def prepare(self, job: FusedJob) -> dict[str, torch.Tensor]:
        """``consts`` (lambda products: ``lam2``, ``lam2 * 0``, then the base's), ``first``: int64
        ``(layout blocks,)``, the index in 'values' of each block's first kept value, and, when
        some rows are unchanged, ``rowmap``: int32 ``(changed_rows,)``, each changed row's row."""
        device = job.w_pre.device
        counts = torch.zeros(-(-job.changed_rows * job.cols // BLOCK_ELEMENTS), dtype=torch.int32, device=device)
        if counts.numel():
            _count_kernel[(counts.numel(),)](counts, *self._draw_args(job), BLOCK_ELEMENTS=BLOCK_ELEMENTS, DRAWS=DRAWS)
        ends = torch.cumsum(counts, 0, dtype=torch.int64)
        total = int(ends[-1]) if ends.numel() else 0  # one small sync: a wrong count must be an error, not a bad read
        if total != job.arrays["values"].numel():
            raise CorruptObjectError(f"{job.what}: dare array 'values' holds {job.arrays['values'].numel()} "
                                     f"values, the mask keeps {total}")
        head = job.lam2 * torch.tensor([1.0, 0.0], dtype=torch.float32, device=device)
        prepared = {"consts": lambda_products(head, job), "first": ends - counts}
        if job.changed_rows != job.rows:
            prepared["rowmap"] = torch.nonzero(job.trow >= 0).flatten().to(torch.int32)
        return prepared

    def run(self, job: FusedJob, out: torch.Tensor) -> None:
        self.run_dense(job, out)
        self.run_kept(job, out)

    def run_dense(self, job: FusedJob, out: torch.Tensor) -> None:
        """Every element as if dropped (kernel 1 of the module docstring)."""
        blocks = n_blocks(job.cols)
        if job.rows * blocks == 0:
            return
        brow, bsigns = base_pointers(job)
        n = job.rows * job.cols
        if job.changed_rows == job.rows and (job.base is None or job.base.changed_rows == job.rows):
            # Every row changed: row r is changed row r for the task and for the base alike.
            _dense_flat_kernel[(-(-n // FLAT_BLOCK),)](out, job.w_pre, bsigns, job.prepared["consts"], n,
                                                       HAS_BASE=job.base is not None, BLOCK=FLAT_BLOCK, num_warps=8,
                                                       enable_fp_fusion=False)
            return
        _dense_kernel[(job.rows * blocks,)](out, job.w_pre, job.trow, brow, bsigns, job.prepared["consts"], job.cols,
                                            blocks, HAS_BASE=job.base is not None, ALIGNED=job.cols % 8 == 0,
                                            BLOCK=BLOCK, num_warps=4, enable_fp_fusion=False)

    def run_kept(self, job: FusedJob, out: torch.Tensor) -> None:
        """The kept elements over what :meth:`run_dense` wrote (kernel 2), on the same stream."""
        if not job.arrays["values"].numel():
            return
        brow, bsigns = base_pointers(job)
        consts, first = job.prepared["consts"], job.prepared["first"]
        int8 = self.value_bits == 8
        rowmap = job.prepared.get("rowmap", job.trow)  # all rows changed: the kernel never reads it
        _sparse_kernel[(first.numel(),)](out, job.w_pre, rowmap, first, job.arrays["values"],
                                         job.arrays["scales"] if int8 else consts, brow, bsigns, consts,
                                         *self._draw_args(job), job.cols,
                                         HAS_BASE=job.base is not None, ALL_ROWS="rowmap" not in job.prepared,
                                         INT8=int8, BLOCK_ELEMENTS=BLOCK_ELEMENTS, DRAWS=DRAWS, num_warps=4,
                                         enable_fp_fusion=False)
