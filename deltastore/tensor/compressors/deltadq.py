"""DeltaDQ: group-wise dropout, then uniform quantization stored as separate bit planes.

Dropout: each row is cut into groups of ``g`` consecutive columns (the last group of a row
is shorter when ``g`` does not divide ``cols``). A group of length ``L`` keeps exactly
``min(k, L)`` elements: those with the smallest keys ``r(seed, i) << 16 | (column mod g)``,
``i`` the flat row-major index and ``r`` the pseudo-random function of specs/format.md.
Keys are unique, so the choice is the same on every device. Kept values are rescaled by
``L / min(k, L)`` (``g/k`` for full groups), which keeps the expectation of each element.

Quantization: per row, ``absmax`` over the row's kept rescaled values and
``step = 2*absmax / (2**b - 1)``; code ``u = round((v + absmax) / step)`` in ``[0, 2**b - 1]``,
decoded as ``u*step - absmax``. The code is split into ``b`` bit planes so that low planes can
be left out for a higher ratio: a decoder fills missing low bits with the midpoint of their
range.

Arrays: ``plane{j}`` for each stored plane j (the top ``stored_planes`` of ``0..b-1``, plane 0
least significant), uint8 ``(ceil(K/8),)``, bit j of each kept value's code packed LSB first
in flat index order (K kept values in all); ``scales``, float32 ``(rows,)``, the row absmax.
Attrs: ``seed`` (int). See specs/compressors/deltadq.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ...errors import CorruptObjectError, InvalidInputError
from .. import lsq
from ..bitpack import pack_bits, packed_size, unpack_bits
from ..prng import random_u32
from .base import CompressorConfig, Encoded
# DARE and DeltaDQ share the row blocking and input checks of mask-regenerating compressors.
from .dare import check_input, row_blocks

# Keys put the group position in their low 16 bits; larger groups would make keys collide.
MAX_GROUP_SIZE = 1 << 16
# Above every real key (< 2**48): padding after a short last group is never chosen first.
_PADDING_KEY = 1 << 48


def _is_int(value: object) -> bool:
    return type(value) is int


@dataclass(frozen=True)
class DeltaDQConfig(CompressorConfig):
    """DeltaDQ settings.

    ``group_size``: g, consecutive columns of a row among which exactly ``keep`` survive,
    in [1, 65536]. ``keep``: k, in [1, g]; density is k/g. ``bits``: b, code width of the
    kept values, in [1, 8]. ``stored_planes``: how many of the b bit planes are written,
    the most significant ones; None writes all b.
    """

    group_size: int = field(default=16, metadata={
        "help": f"g: consecutive columns of a row among which exactly `keep` survive, in [1, {MAX_GROUP_SIZE}]"})
    keep: int = field(default=2, metadata={  # k/g = 1/8 of the values survive the dropout
        "help": "k: values kept in each group of g, in [1, g]; the density is k/g"})
    bits: int = field(default=4, metadata={"help": "b: code width of the kept values, in [1, 8]"})
    stored_planes: int | None = field(default=None, metadata={
        "help": "how many of the b bit planes are written, most significant first; none: all b"})

    def __post_init__(self) -> None:
        g, k, b, s = self.group_size, self.keep, self.bits, self.stored_planes
        if not _is_int(g) or not 1 <= g <= MAX_GROUP_SIZE:
            raise InvalidInputError(f"DeltaDQConfig.group_size must be an int in [1, {MAX_GROUP_SIZE}], got {g!r}")
        if not _is_int(k) or not 1 <= k <= g:
            raise InvalidInputError(f"DeltaDQConfig.keep must be an int in [1, group_size={g}], got {k!r}")
        if not _is_int(b) or not 1 <= b <= 8:
            raise InvalidInputError(f"DeltaDQConfig.bits must be an int in [1, 8], got {b!r}")
        if s is not None and (not _is_int(s) or not 1 <= s <= b):
            raise InvalidInputError(f"DeltaDQConfig.stored_planes must be None or an int in [1, bits={b}], got {s!r}")

    @property
    def lowest_plane(self) -> int:
        """Index of the least significant stored plane (0 when every plane is stored)."""
        return 0 if self.stored_planes is None else self.bits - self.stored_planes


def keep_mask(seed: int, group_size: int, keep: int, first: int, end: int, cols: int,
              device: torch.device | str) -> torch.Tensor:
    """Bool ``(end - first, cols)``: which elements of rows ``first..end-1`` the dropout keeps."""
    rows = end - first
    n_groups = -(-cols // group_size)
    width = n_groups * group_size
    position = torch.arange(width, dtype=torch.int64, device=device) % group_size
    keys = (_PADDING_KEY | position).expand(rows, width).clone()
    r = random_u32(seed, first * cols, rows * cols, device).view(rows, cols)
    keys[:, :cols] = (r << 16) | position[:cols]
    chosen = keys.view(rows, n_groups, group_size).topk(keep, dim=2, largest=False, sorted=False).indices
    mask = torch.zeros(rows, n_groups, group_size, dtype=torch.bool, device=device)
    return mask.scatter_(2, chosen, True).view(rows, width)[:, :cols]


def kept_per_row(cols: int, group_size: int, keep: int) -> int:
    """Values a row of ``cols`` keeps: k per full group, min(k, L) for a last group of L."""
    full, last = divmod(cols, group_size)
    return full * keep + min(keep, last)


def column_factors(cols: int, group_size: int, keep: int, device: torch.device | str) -> torch.Tensor:
    """Float32 ``(cols,)``: each column's rescale factor, length / kept count of its group."""
    column = torch.arange(cols, device=device)
    start = column - column % group_size
    length = torch.clamp(cols - start, max=group_size).double()
    return (length / torch.clamp(length, max=keep)).float()


def _codes(rescaled: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row uniform quantization of float32 ``(rows, cols)`` (dropped entries 0).

    Returns uint8 codes ``(rows, cols)`` in [0, 2**bits - 1] and float32 absmax ``(rows,)``.
    """
    levels = (1 << bits) - 1
    # amax refuses an empty dimension; a row of no columns has absmax 0.
    absmax = rescaled.abs().amax(dim=1) if rescaled.shape[1] else rescaled.new_zeros(rescaled.shape[0])
    step = _step(absmax, bits)
    # A row of zeros has step 0 and decodes to 0 whatever its codes.
    divisor = torch.where(step > 0, step, 1.0)
    codes = torch.round((rescaled + absmax[:, None]) / divisor[:, None]).clamp_(0, levels)
    return codes.to(torch.uint8), absmax


def _step(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """Float32 ``2*absmax / (2**bits - 1)``, rounded once, the same on every device."""
    # The divisor is a tensor on absmax's device: CUDA turns division by a CPU scalar into a
    # multiply by its reciprocal, which can differ from the spec's division in the last bit.
    return 2 * absmax / absmax.new_tensor(float((1 << bits) - 1))


def _dequantize(codes: torch.Tensor, absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes * step - absmax`` in float32, two separately rounded operations (no FMA).

    ``codes``: float32 (may hold half-integers for missing low planes), ``absmax``
    broadcastable to it.
    """
    return codes * _step(absmax, bits) - absmax


def _with_missing_planes(codes: torch.Tensor, lowest_plane: int) -> torch.Tensor:
    """Float32 codes as a decoder sees them: bits below ``lowest_plane`` replaced by their midpoint."""
    top = (codes.to(torch.int32) >> lowest_plane) << lowest_plane
    return top.float() + ((1 << lowest_plane) - 1) / 2


class DeltaDQ:
    """Group-wise dropout plus bit-plane quantization; see the module docstring."""

    name: ClassVar[str] = "deltadq"
    config_class: ClassVar[type] = DeltaDQConfig
    # What a byte-budgeted commit may choose (deltastore.engine.budget): one kept value in g at 2 bits.
    budget_settings: ClassVar[list[dict]] = [{"group_size": g, "keep": 1, "bits": 2} for g in (16, 64)]

    def __init__(self, config: DeltaDQConfig | None = None):
        self.config = config or DeltaDQConfig()

    def _mask(self, seed: int, first: int, end: int, cols: int, device: torch.device | str) -> torch.Tensor:
        return keep_mask(seed, self.config.group_size, self.config.keep, first, end, cols, device)

    def _rescale(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        # One expression shared by encode and simulate, so both round identically.
        factors = column_factors(x.shape[1], self.config.group_size, self.config.keep, x.device)
        return torch.where(keep, x * factors, 0.0)

    def encode(self, x: torch.Tensor, *, seed: int) -> Encoded:
        """Compress float32 ``(rows, cols)``; see the module docstring for arrays and attrs."""
        rows, cols = check_input(x, seed)
        x = x.detach().float()
        bits = self.config.bits
        codes, scales = [], []
        for first, end in row_blocks(rows, cols):
            keep = self._mask(seed, first, end, cols, x.device)
            block_codes, absmax = _codes(self._rescale(x[first:end], keep), bits)
            codes.append(block_codes[keep])
            scales.append(absmax)
        kept = torch.cat(codes) if codes else torch.empty(0, dtype=torch.uint8, device=x.device)
        return self._pack(kept, torch.cat(scales) if scales else torch.zeros(rows, device=x.device), seed)

    def _pack(self, kept: torch.Tensor, scales: torch.Tensor, seed: int) -> Encoded:
        """The stored form of the kept values' codes (uint8, flat index order) and row scales."""
        arrays = {f"plane{j}": pack_bits((kept >> j) & 1) for j in range(self.config.lowest_plane, self.config.bits)}
        arrays["scales"] = scales
        return Encoded(arrays, {"seed": seed})

    def keep(self, seed: int, rows: int, cols: int, device: torch.device | str) -> torch.Tensor:
        """Bool ``(rows, cols)``: every kept element of a ``(rows, cols)`` matrix."""
        blocks = [self._mask(seed, first, end, cols, device) for first, end in row_blocks(rows, cols)]
        return torch.cat(blocks) if blocks else torch.zeros(rows, cols, dtype=torch.bool, device=device)

    def refit(self, encoded: Encoded, target: torch.Tensor, gram: torch.Tensor | None) -> Encoded:
        """The same kept positions; their values fitted to ``target`` under ``gram``
        (deltastore.tensor.lsq.on_support), quantized again, then each row's scale fitted to
        the codes as a decoder sees them (missing planes at their midpoint); never negative."""
        rows, cols = target.shape
        seed = encoded.attr("seed", int)
        keep = self.keep(seed, rows, cols, target.device)
        codes, _ = _codes(lsq.on_support(keep, target, gram), self.config.bits)
        seen = _with_missing_planes(codes, self.config.lowest_plane)
        levels = float((1 << self.config.bits) - 1)
        pattern = torch.where(keep, 2 * seen / levels - 1, 0.0)
        scales = lsq.row_scales(pattern, target, gram).float().clamp_min(0.0)
        return self._pack(codes[keep], scales, seed)

    def _stored_codes(self, encoded: Encoded, total: int, device: torch.device | str) -> torch.Tensor:
        """Float32 ``(total,)`` codes from the planes present, missing low bits at their midpoint."""
        bits = self.config.bits
        present = sorted(int(role[5:]) for role in encoded.arrays if role.startswith("plane"))
        lowest = bits - len(present)
        if not present or present != list(range(lowest, bits)):
            raise CorruptObjectError(
                f"deltadq needs bit planes j..{bits - 1} for some j (bits={bits}), found planes {present}"
            )
        codes = torch.zeros(total, dtype=torch.int32, device=device)
        for j in present:
            plane = encoded.array(f"plane{j}").to(device)
            if plane.dtype != torch.uint8 or tuple(plane.shape) != (packed_size(total),):
                raise CorruptObjectError(
                    f"deltadq array 'plane{j}' must be uint8 of shape ({packed_size(total)},) for {total} kept "
                    f"values, got {plane.dtype} {tuple(plane.shape)}"
                )
            codes |= unpack_bits(plane, total).to(torch.int32) << j
        return _with_missing_planes(codes, lowest)

    def decode(self, encoded: Encoded, shape: tuple[int, int], device: torch.device | str) -> torch.Tensor:
        """Float32 ``shape`` on ``device``: kept positions get their dequantized value, others 0."""
        rows, cols = shape
        seed = encoded.attr("seed", int)
        per_row = kept_per_row(cols, self.config.group_size, self.config.keep)
        codes = self._stored_codes(encoded, rows * per_row, device)
        scales = encoded.array("scales").to(device)
        if scales.dtype != torch.float32 or tuple(scales.shape) != (rows,):
            raise CorruptObjectError(
                f"deltadq array 'scales' must be float32 of shape ({rows},), got {scales.dtype} {tuple(scales.shape)}"
            )
        out = torch.zeros(rows, cols, dtype=torch.float32, device=device)
        for first, end in row_blocks(rows, cols):
            keep = self._mask(seed, first, end, cols, device)
            dense = torch.zeros(end - first, cols, dtype=torch.float32, device=device)
            # Every row keeps the same count, so a block's codes start at first * per_row.
            dense[keep] = codes[first * per_row:end * per_row]
            values = _dequantize(dense, scales[first:end, None], self.config.bits)
            out[first:end] = torch.where(keep, values, 0.0)
        return out

    def simulate(self, x: torch.Tensor, *, seed: int) -> torch.Tensor:
        """Fixed mask and rescale (linear in ``x``), quantization passed straight through."""
        rows, cols = check_input(x, seed)
        keep = self.keep(seed, rows, cols, x.device)
        rescaled = self._rescale(x, keep)
        codes, absmax = _codes(rescaled.detach(), self.config.bits)
        seen = _with_missing_planes(codes, self.config.lowest_plane)
        quantized = torch.where(keep, _dequantize(seen, absmax[:, None], self.config.bits), 0.0)
        return rescaled + (quantized - rescaled).detach()


COMPRESSOR = DeltaDQ
