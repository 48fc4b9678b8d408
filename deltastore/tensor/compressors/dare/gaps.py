"""DARE's ``gaps`` layout: the kept positions drawn as geometric gaps, block by block.

specs/compressors/dare.md, "Layout gaps". The flat indices ``[0, n)`` of a matrix are cut into
blocks of ``BLOCK_ELEMENTS``. In each block the kept positions are a run of gaps drawn from a
geometric distribution (the distance between kept elements when each is kept independently
with probability ``T / 2**32``): draw ``t`` of block ``b`` is ``u = r(seed, b * BLOCK_ELEMENTS + t)``
and its gap is ``1 + #{k : gap_table[k] > u}``, an exact integer inverse of the CDF. So a
decoder produces the ``K`` kept positions in O(K) work, one block independently of the others
(a GPU program per block), instead of hashing all ``n`` elements as the ``hash`` layout does.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from ...prng import MAX_COUNTER, random_at

# Elements per independent block; a power of two dividing 2**32, so the counters of a block,
# b * BLOCK_ELEMENTS + t with t < BLOCK_ELEMENTS, never leave the 32-bit range.
BLOCK_ELEMENTS = 1 << 16
# The smallest keep threshold the layout allows (p <= 1 - 2**-16): the gap table has about
# (ln(T) + 1) * 2**32 / T entries, 0.8 million at this bound, 2,300 at p = 0.99.
MIN_KEEP_THRESHOLD = 1 << 16
# Draws generated at once (int64, a few temporaries): bounds memory to ~150 MiB.
GROUP_DRAWS = 1 << 22


@functools.lru_cache(maxsize=32)
def gap_table(keep_threshold: int) -> torch.Tensor:
    """int64 ``(L,)``, ascending: the survival thresholds ``G_2 .. G_{L+1}`` of the spec, reversed.

    ``G_1 = 2**32``, ``G_{k+1} = floor(G_k * (2**32 - T) / 2**32)``, computed in exact integers
    while non-zero; a draw ``u`` gives the gap ``1 + L - #{entries <= u}``, so
    ``P(gap >= k) = G_k / 2**32``, close to ``(1 - T / 2**32) ** (k - 1)``.
    """
    if not MIN_KEEP_THRESHOLD <= keep_threshold <= MAX_COUNTER:
        raise ValueError(f"keep threshold {keep_threshold} outside [{MIN_KEEP_THRESHOLD}, {MAX_COUNTER}]")
    drop = MAX_COUNTER - keep_threshold
    table = []
    survival = (MAX_COUNTER * drop) >> 32
    while survival:
        table.append(survival)
        survival = (survival * drop) >> 32
    return torch.tensor(table[::-1], dtype=torch.int64)


@dataclasses.dataclass(frozen=True)
class GapIndex:
    """Where in :func:`gap_table` a draw's count of entries ``<= u`` can lie, by the draw's bucket.

    A draw ``u`` (``0 <= u < 2**32``) falls in bucket ``max(key(u) - bias, 0)``, where ``key(u)``
    is the bit pattern of ``float(u)`` (exact: ``u < 2**53``) shifted right by ``shift``: its
    exponent and the ``52 - shift`` bits below its leading one, so the buckets are finer where the
    geometric table is dense and the bucket of ``u`` never decreases as ``u`` grows. All of
    ``table[:bounds[b]]`` lie below bucket ``b`` and all of ``table[bounds[b + 1]:]`` above it, so
    the count is ``bounds[b]`` plus a binary search of ``bounds[b + 1] - bounds[b] < 2**steps``
    entries: one step at p = 0.99 where the whole table takes 11. Only the work of a decoder
    changes; the gaps are the spec's."""

    bounds: torch.Tensor  # int32 (buckets + 1,)
    shift: int
    bias: int
    steps: int


# The finest bucketing tried (2**9 buckets per power of two, a 64 KiB index), so the index stays
# in a GPU's L1 cache beside the table even where the table is large (p near 1 - 2**-16).
MAX_INDEX_BITS = 9


def bucket_of(u: torch.Tensor, shift: int, bias: int) -> torch.Tensor:
    """The :class:`GapIndex` bucket (int64) of each value of ``u``: draws or table entries, in [0, 2**32)."""
    return torch.clamp((u.to(torch.float64).view(torch.int64) >> shift) - bias, min=0)


@functools.lru_cache(maxsize=32)
def gap_index(keep_threshold: int) -> GapIndex:
    """The :class:`GapIndex` of ``gap_table(keep_threshold)`` with the coarsest bucketing (of at
    most ``MAX_INDEX_BITS`` mantissa bits) that leaves at most one entry in any bucket."""
    table = gap_table(keep_threshold)
    for bits in range(MAX_INDEX_BITS + 1):
        shift, bias = 52 - bits, (1023 << bits) - 1  # u = 0 is bucket 0, u = 1 bucket 1
        top = 32 << bits  # the bucket of 2**32 - 1: 32 exponents of 2**bits buckets each
        bounds = torch.searchsorted(bucket_of(table, shift, bias), torch.arange(top + 2))
        widest = int((bounds[1:] - bounds[:-1]).max())
        if widest <= 1:
            break
    return GapIndex(bounds.to(torch.int32), shift, bias, widest.bit_length())


def draws_per_round(keep_threshold: int) -> int:
    """Draws to make per block at once: the expected count plus 8 standard deviations, so nearly
    every block is done in one round (correctness does not depend on it)."""
    expected = BLOCK_ELEMENTS * keep_threshold / MAX_COUNTER
    return min(BLOCK_ELEMENTS, int(expected + 8 * math.sqrt(expected)) + 16)


def kept_positions(seed: int, keep_threshold: int, n: int, first: int, end: int,
                   device: torch.device | str) -> torch.Tensor:
    """int64, increasing: the kept flat indices in ``[first, end)`` of a matrix of ``n``
    elements (generated for the blocks that overlap the range)."""
    table = gap_table(keep_threshold).to(device)
    draws = draws_per_round(keep_threshold)
    per_group = max(1, GROUP_DRAWS // draws)
    found = []
    for group in range(first // BLOCK_ELEMENTS, -(-end // BLOCK_ELEMENTS), per_group):
        start = torch.arange(group, min(-(-end // BLOCK_ELEMENTS), group + per_group), dtype=torch.int64,
                             device=device) * BLOCK_ELEMENTS
        length = (n - start).clamp(max=BLOCK_ELEMENTS)  # the matrix's last block may be short
        drawn = torch.zeros_like(start)
        last = torch.full_like(start, -1)
        steps = torch.arange(draws, dtype=torch.int64, device=device)
        while start.numel():
            t = drawn[:, None] + steps
            # A draw at t >= length is past the block's end anyway (each gap is >= 1); clamping
            # keeps its counter inside the block, and so below 2**32.
            u = random_at(seed, start[:, None] + torch.minimum(t, length[:, None] - 1))
            pos = last[:, None] + torch.cumsum(1 + table.numel() - torch.searchsorted(table, u, right=True), dim=1)
            flat = start[:, None] + pos
            found.append(flat[(pos < length[:, None]) & (flat >= first) & (flat < end)])
            drawn, last = drawn + draws, pos[:, -1]
            more = last < length - 1
            start, length, drawn, last = start[more], length[more], drawn[more], last[more]
    if not found:
        return torch.empty(0, dtype=torch.int64, device=device)
    return torch.sort(torch.cat(found)).values


def keep_mask(seed: int, keep_threshold: int, rows: int, first: int, end: int, cols: int,
              device: torch.device | str) -> torch.Tensor:
    """Bool ``(end - first, cols)``: which elements of rows ``first..end-1`` of a ``(rows, cols)``
    matrix the layout keeps."""
    mask = torch.zeros((end - first) * cols, dtype=torch.bool, device=device)
    mask[kept_positions(seed, keep_threshold, rows * cols, first * cols, end * cols, device) - first * cols] = True
    return mask.view(end - first, cols)
