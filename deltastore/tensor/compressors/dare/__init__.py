"""DARE (drop and rescale): keep each element with probability ``1 - p``, scaled by ``1/(1 - p)``.

The mask is never stored: a decoder regenerates it from two integers, ``seed`` and
``keep_threshold``, with the pseudo-random function ``r`` of specs/format.md. Two layouts say
how (configuration field ``layout``): ``hash`` (page 1.0) keeps element ``i`` (flat row-major
index) iff ``r(seed, i) < keep_threshold``, which costs a hash of every element to decode;
``gaps`` (page 1.1, what deltastore writes) draws the distances between kept elements, block
by block (:mod:`.gaps`), which costs work in proportion to the kept elements only. Only the
kept values are stored, already rescaled, in flat index order.

Arrays: ``values``, the kept rescaled values ``x[i] / (1 - p)``: float16 ``(K,)`` for
``value_bits=16``, or int8 codes ``(K,)`` for ``value_bits=8``, together with ``scales``,
float32 ``(rows,)``, so that a value is ``code * scales[row]``. Attrs: ``seed`` (int),
``keep_threshold`` (int). See specs/compressors/dare.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ....errors import CorruptObjectError, InvalidInputError
from ... import lsq
from ...prng import MAX_COUNTER, random_u32
from ..base import CompressorConfig, Encoded
from . import gaps
from .fused import DareFused
from .fused_gaps import DareGapsFused

LAYOUTS = ("gaps", "hash")

# Elements whose mask is generated at once. The PRNG works on int64 and keeps a few
# temporaries alive, so this bounds memory to ~100 MiB whatever the matrix size.
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class DareConfig(CompressorConfig):
    """DARE settings.

    ``drop_rate``: p, the probability that an element is dropped, in [0, 1).
    ``value_bits``: 16 stores kept values as float16; 8 as int8 codes with one float32 scale
    per row (half the bytes; error at most 1/254 of the row's largest kept value).
    """

    drop_rate: float = field(default=0.99, metadata={  # the papers use 0.9 to 0.998
        "help": "probability p that an element is dropped, in [0, 1); kept values are scaled by 1/(1-p)"})
    value_bits: int = field(default=16, metadata={
        "help": "16: kept values as float16; 8: int8 codes with a float32 scale per row (half the bytes)"})
    layout: str = field(default="gaps", metadata={
        "help": "how the mask is regenerated: 'gaps' (decodes in time proportional to the kept values; "
                "p <= 1 - 2**-16) or 'hash' (format 1.0: a hash of every element)"})

    def __post_init__(self) -> None:
        p = self.drop_rate
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise InvalidInputError(f"DareConfig.drop_rate must be a number in [0, 1), got {p!r}")
        object.__setattr__(self, "drop_rate", float(p))  # written as a msgpack float even when given as the integer 0
        if type(self.value_bits) is not int or self.value_bits not in (16, 8):
            raise InvalidInputError(f"DareConfig.value_bits must be 16 or 8, got {self.value_bits!r}")
        if self.layout not in LAYOUTS:
            raise InvalidInputError(f"DareConfig.layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.layout == "gaps" and self.keep_threshold < gaps.MIN_KEEP_THRESHOLD:
            raise InvalidInputError(f"DareConfig.drop_rate {p} is above 1 - 2**-16, the most layout 'gaps' allows "
                                    "(its gap table would grow past a million entries); use layout='hash'")

    def to_dict(self) -> dict:
        # 'layout' is written only when it is 'gaps': a hash entry is byte for byte a page 1.0
        # entry, which readers of page 1.0 read (specs/compressors/dare.md, "Configuration").
        data = super().to_dict()
        if self.layout == "hash":
            del data["layout"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "DareConfig":
        # A stored configuration without 'layout' was written under page 1.0, which had only
        # the hash layout (specs/compressors/dare.md: the default of an absent field).
        return super().from_dict({"layout": "hash", **data})

    @property
    def keep_threshold(self) -> int:
        """``round((1 - p) * 2**32)``: element i is kept iff ``r(seed, i)`` is below it."""
        return round((1.0 - self.drop_rate) * 2**32)


def row_blocks(rows: int, cols: int) -> Iterator[tuple[int, int]]:
    """``(first, end)`` row ranges of at most ``CHUNK_ELEMENTS`` elements (one row at least)."""
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    for first in range(0, rows, step):
        yield first, min(rows, first + step)


def keep_mask(seed: int, keep_threshold: int, first: int, end: int, cols: int,
              device: torch.device | str) -> torch.Tensor:
    """Bool ``(end - first, cols)``: which elements of rows ``first..end-1`` the hash layout keeps."""
    r = random_u32(seed, first * cols, (end - first) * cols, device)
    return (r < keep_threshold).view(end - first, cols)


def check_input(x: torch.Tensor, seed: int) -> tuple[int, int]:
    """Refuse what a mask-regenerating compressor cannot encode; returns ``(rows, cols)``.

    ``x`` must be 2-D with at most 2**32 elements (the PRNG counter is 32-bit) and ``seed`` a
    uint32 (the decoder gets it back from the attrs).
    """
    if x.dim() != 2:
        raise InvalidInputError(f"expected a 2-D matrix, got shape {tuple(x.shape)}")
    if x.numel() > MAX_COUNTER:
        raise InvalidInputError(
            f"matrix of {x.numel()} elements exceeds the 2**32 counters of the PRNG; split it by rows"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_COUNTER:
        raise InvalidInputError(f"seed must be an int in [0, 2**32), got {seed!r}")
    return x.shape[0], x.shape[1]


def check_attrs(layout: str, seed: int, keep_threshold: int) -> None:
    """Refuse stored attrs outside the page's ranges (a damaged or crafted record)."""
    low = gaps.MIN_KEEP_THRESHOLD if layout == "gaps" else 0
    if not 0 <= seed < MAX_COUNTER or not low <= keep_threshold <= MAX_COUNTER:
        raise CorruptObjectError(f"dare layout {layout!r}: attrs seed={seed} and keep_threshold={keep_threshold} must "
                                 f"lie in [0, 2**32) and [{low}, 2**32]; the record is damaged or crafted")


def _int8_codes(rescaled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantization of float32 ``(rows, cols)`` (dropped entries 0).

    Returns int8 codes ``(rows, cols)`` and float32 scales ``(rows,)`` = row absmax / 127.
    """
    # amax refuses an empty dimension; a row of no columns has scale 0.
    absmax = rescaled.abs().amax(dim=1) if rescaled.shape[1] else rescaled.new_zeros(rescaled.shape[0])
    # Divide by a tensor on x's device: CUDA turns division by a CPU scalar into a multiply
    # by its reciprocal, which would make GPU and CPU encodings differ in the last bit.
    scales = absmax / absmax.new_tensor(127.0)
    # A row with no kept value (or only zeros) has scale 0; its codes are 0 whatever the divisor.
    divisor = torch.where(scales > 0, scales, 1.0)
    codes = torch.round(rescaled / divisor[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes, scales


class Dare:
    """DARE with a regenerable mask; see the module docstring for the stored form."""

    name: ClassVar[str] = "dare"
    config_class: ClassVar[type] = DareConfig
    # What a byte-budgeted commit may choose (deltastore.engine.budget): int8 values with a
    # float32 scale per row, or float16 values without (the cheapest at the highest drop rates,
    # where per-row scales would cost more than the values). The two sparsest let a tight budget
    # (500x on a small model) starve the matrices that matter least instead of being refused.
    budget_settings: ClassVar[list[dict]] = [
        *[{"drop_rate": p, "value_bits": 8} for p in (0.98, 0.99, 0.995)],
        *[{"drop_rate": p, "value_bits": 16} for p in (0.99, 0.995, 0.998, 0.999, 0.9995, 0.9998)],
    ]

    def __init__(self, config: DareConfig | None = None):
        self.config = config or DareConfig()

    def _mask(self, seed: int, threshold: int, rows: int, first: int, end: int, cols: int,
              device: torch.device | str) -> torch.Tensor:
        """Bool ``(end - first, cols)``: the kept elements of rows ``first..end-1`` of ``(rows, cols)``."""
        if self.config.layout == "gaps":
            return gaps.keep_mask(seed, threshold, rows, first, end, cols, device)
        return keep_mask(seed, threshold, first, end, cols, device)

    def _rescale(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        # One expression shared by encode and simulate, so both round identically.
        return torch.where(keep, x * (1.0 / (1.0 - self.config.drop_rate)), 0.0)

    def encode(self, x: torch.Tensor, *, seed: int) -> Encoded:
        """Compress float32 ``(rows, cols)``; see the module docstring for arrays and attrs."""
        rows, cols = check_input(x, seed)
        x = x.detach().float()
        threshold = self.config.keep_threshold
        values, scales = [], []
        for first, end in row_blocks(rows, cols):
            keep = self._mask(seed, threshold, rows, first, end, cols, x.device)
            rescaled = self._rescale(x[first:end], keep)
            if self.config.value_bits == 16:
                values.append(rescaled[keep].to(torch.float16))
            else:
                codes, block_scales = _int8_codes(rescaled)
                values.append(codes[keep])
                scales.append(block_scales)
        value_dtype = torch.float16 if self.config.value_bits == 16 else torch.int8
        arrays = {"values": torch.cat(values) if values else torch.empty(0, dtype=value_dtype, device=x.device)}
        if self.config.value_bits == 16:
            if torch.isinf(arrays["values"]).any():
                raise InvalidInputError(
                    f"a kept value x/(1-p) is outside the float16 range (p={self.config.drop_rate}); "
                    "use value_bits=8"
                )
        else:
            arrays["scales"] = torch.cat(scales) if scales else torch.zeros(rows, device=x.device)
        return Encoded(arrays, {"seed": seed, "keep_threshold": threshold})

    def decode(self, encoded: Encoded, shape: tuple[int, int], device: torch.device | str) -> torch.Tensor:
        """Float32 ``shape`` on ``device``: kept positions get their value, the others 0."""
        rows, cols = shape
        seed, threshold = encoded.attr("seed", int), encoded.attr("keep_threshold", int)
        check_attrs(self.config.layout, seed, threshold)
        values = encoded.array("values").to(device)
        expected = torch.float16 if self.config.value_bits == 16 else torch.int8
        if values.dtype != expected or values.dim() != 1:
            raise CorruptObjectError(
                f"dare array 'values' must be 1-D {expected}, got {values.dim()}-D {values.dtype}"
            )
        if self.config.value_bits == 8:
            scales = encoded.array("scales").to(device)
            if scales.dtype != torch.float32 or tuple(scales.shape) != (rows,):
                raise CorruptObjectError(
                    f"dare array 'scales' must be float32 of shape ({rows},), got {scales.dtype} {tuple(scales.shape)}"
                )
        out = torch.zeros(rows, cols, dtype=torch.float32, device=device)
        offset = 0
        for first, end in row_blocks(rows, cols):
            keep = self._mask(seed, threshold, rows, first, end, cols, device)
            count = int(keep.sum())
            if offset + count > values.numel():
                raise CorruptObjectError(f"dare array 'values' holds {values.numel()} values, the mask keeps more")
            kept = values[offset:offset + count].float()
            if self.config.value_bits == 8:
                kept = kept * scales[first:end, None].expand(end - first, cols)[keep]
            out[first:end][keep] = kept
            offset += count
        if offset != values.numel():
            raise CorruptObjectError(f"dare array 'values' holds {values.numel()} values, the mask keeps {offset}")
        return out

    def simulate(self, x: torch.Tensor, *, seed: int) -> torch.Tensor:
        """``x * mask / (1 - p)`` then quantization passed straight through; float32 like ``x``."""
        rows, cols = check_input(x, seed)
        keep = self.keep(seed, rows, cols, x.device)
        rescaled = self._rescale(x, keep)
        if self.config.value_bits == 16:
            quantized = rescaled.detach().to(torch.float16).float()
        else:
            codes, scales = _int8_codes(rescaled.detach())
            quantized = codes.float() * scales[:, None]
        return rescaled + (quantized - rescaled).detach()

    def keep(self, seed: int, rows: int, cols: int, device: torch.device | str) -> torch.Tensor:
        """Bool ``(rows, cols)``: every kept element of a ``(rows, cols)`` matrix."""
        blocks = [self._mask(seed, self.config.keep_threshold, rows, first, end, cols, device)
                  for first, end in row_blocks(rows, cols)]
        return torch.cat(blocks) if blocks else torch.zeros(rows, cols, dtype=torch.bool, device=device)

    def refit(self, encoded: Encoded, target: torch.Tensor, gram: torch.Tensor | None) -> Encoded:
        """The same kept positions, their values fitted to ``target`` under ``gram``
        (deltastore.tensor.lsq.on_support): the kept values take over what the dropped ones did.
        int8 values are quantized again and their row scales fitted to the codes. A fit beyond
        float16's range gives ``encoded`` back unchanged."""
        rows, cols = target.shape
        keep = self.keep(encoded.attr("seed", int), rows, cols, target.device)
        fitted = lsq.on_support(keep, target, gram)
        if self.config.value_bits == 16:
            values = fitted[keep].to(torch.float16)
            return encoded if bool(torch.isinf(values).any()) else Encoded({"values": values}, dict(encoded.attrs))
        codes, _ = _int8_codes(fitted)
        scales = lsq.row_scales(torch.where(keep, codes.float(), 0.0), target, gram).float().clamp_min(0.0)
        return Encoded({"values": codes[keep], "scales": scales}, dict(encoded.attrs))

    def fused_decoder(self) -> DareFused | DareGapsFused:
        if self.config.layout == "gaps":
            return DareGapsFused(self.config.value_bits)
        return DareFused(self.config.value_bits)


COMPRESSOR = Dare
