"""One conformance suite for every registered compressor, then each method's own guarantees.

The shared part (round trip, determinism, config round trip, array dtypes, simulate, CUDA)
runs over ``CASES``; a compressor registered without a case fails
``test_every_compressor_has_cases``. The per-method part checks the error bounds that the
spec pages promise and decodes with small independent readers written from those pages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltastore.errors import CorruptObjectError, InvalidInputError
from deltastore.tensor.compressors import ARRAY_DTYPES, Encoded, available, compressor_class, get_compressor
from deltastore.tensor.compressors import dare, deltadq
from deltastore.tensor.compressors.dare import DareConfig, gaps
from deltastore.tensor.compressors.deltadq import DeltaDQConfig

SEED = 20240613
SHAPE = (64, 96)


@dataclass(frozen=True)
class Case:
    name: str
    config: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return "-".join([self.name, *(f"{k}={v}" for k, v in self.config.items())])

    def compressor(self):
        return get_compressor(self.name, self.config)


CASES = [
    Case("bitdelta"),
    Case("dare", {"drop_rate": 0.9, "value_bits": 16}),
    Case("dare", {"drop_rate": 0.9, "value_bits": 8}),
    Case("dare", {"drop_rate": 0.99, "value_bits": 16}),
    Case("dare", {"drop_rate": 0.99, "value_bits": 8}),
    Case("dare", {"drop_rate": 0.9, "value_bits": 16, "layout": "gaps"}),
    Case("dare", {"drop_rate": 0.99, "value_bits": 8, "layout": "gaps"}),
    Case("dare", {"drop_rate": 0.5, "value_bits": 16, "layout": "gaps"}),
    Case("deltadq", {"group_size": 16, "keep": 2, "bits": 4}),
    Case("deltadq", {"group_size": 8, "keep": 1, "bits": 2}),
    Case("deltadq", {"group_size": 16, "keep": 4, "bits": 8}),
    Case("deltadq", {"group_size": 16, "keep": 2, "bits": 4, "stored_planes": 2}),
    Case("lossless"),
]
MASKED = [case for case in CASES if case.name in ("dare", "deltadq")]
ATTR_TYPES = (int, float, str, bool, list)


def delta(shape: tuple[int, int] = SHAPE, seed: int = 0) -> torch.Tensor:
    """A delta-like float32 matrix with a few exact zeros (sign(0) and zero rows matter)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 1e-3
    x[0, :5] = 0.0
    if shape[0] > 3:
        x[3] = 0.0
    return x


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return delta()


def decoded(case: Case, x: torch.Tensor, seed: int = SEED, device: str = "cpu") -> torch.Tensor:
    compressor = case.compressor()
    return compressor.decode(compressor.encode(x, seed=seed), tuple(x.shape), device)


# --- conformance: every compressor -------------------------------------------------------

def test_every_compressor_has_cases():
    assert set(available()) <= {case.name for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_round_trip_shape_dtype_device(case, x):
    out = decoded(case, x)
    assert out.shape == x.shape
    assert out.dtype == torch.float32
    assert out.device == torch.device("cpu")
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_same_seed_same_encoding(case, x):
    first, second = case.compressor().encode(x, seed=SEED), case.compressor().encode(x.clone(), seed=SEED)
    assert first.arrays.keys() == second.arrays.keys()
    for role in first.arrays:
        assert torch.equal(first.arrays[role], second.arrays[role]), role
    assert first.attrs == second.attrs


@pytest.mark.parametrize("case", MASKED, ids=str)
def test_other_seed_other_mask(case, x):
    dense = x + 1.0  # no zeros, so the decoded support is the mask
    assert not torch.equal(decoded(case, dense, seed=1) != 0, decoded(case, dense, seed=2) != 0)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_config_round_trip(case):
    cls = compressor_class(case.name)
    config = cls.config_class.from_dict(case.config)
    assert cls.config_class.from_dict(config.to_dict()) == config
    assert get_compressor(case.name, config.to_dict()).config == config


@pytest.mark.parametrize("case", CASES, ids=str)
def test_unknown_config_field_refused(case):
    with pytest.raises(InvalidInputError, match="unknown configuration field.*'colour'"):
        get_compressor(case.name, {**case.config, "colour": "red"})


@pytest.mark.parametrize("case", CASES, ids=str)
def test_arrays_and_attrs_are_storable(case, x):
    encoded = case.compressor().encode(x, seed=SEED)
    assert encoded.arrays
    for role, array in encoded.arrays.items():
        assert array.dtype in ARRAY_DTYPES, role
    for role, value in encoded.attrs.items():
        assert isinstance(value, ATTR_TYPES), role


@pytest.mark.parametrize("case", CASES, ids=str)
def test_simulate_matches_decode(case, x):
    simulated = case.compressor().simulate(x, seed=SEED)
    # simulate adds the quantization error as (q - v).detach() to v: a few ulps of |v| apart.
    torch.testing.assert_close(simulated, decoded(case, x), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradient_flows(case, x):
    leaf = x.clone().requires_grad_(True)
    case.compressor().simulate(leaf, seed=SEED).pow(2).sum().backward()
    assert leaf.grad is not None
    assert torch.isfinite(leaf.grad).all()
    assert leaf.grad.abs().sum() > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cuda_decode_bit_exact(case, x):
    compressor = case.compressor()
    encoded = compressor.encode(x, seed=SEED)
    on_cpu = compressor.decode(encoded, SHAPE, "cpu")
    on_cuda = compressor.decode(encoded.to("cuda"), SHAPE, "cuda")
    assert on_cuda.device.type == "cuda"
    assert torch.equal(on_cuda.cpu().view(torch.int32), on_cpu.view(torch.int32))
    # Encoding on the GPU writes the same arrays, so a store does not depend on the device.
    encoded_on_cuda = compressor.encode(x.cuda(), seed=SEED)
    for role, array in encoded.arrays.items():
        assert torch.equal(encoded_on_cuda.arrays[role].cpu(), array), role


# --- BitDelta ----------------------------------------------------------------------------

def test_bitdelta_is_mean_abs_times_sign(x):
    alpha = x.abs().mean()
    # sign(0) counts as -1 (METHOD.md); row 3 and x[0, :5] are exact zeros.
    torch.testing.assert_close(decoded(Case("bitdelta"), x), torch.where(x > 0, alpha, -alpha), rtol=0, atol=0)


def test_bitdelta_stores_one_bit_per_element(x):
    encoded = Case("bitdelta").compressor().encode(x, seed=SEED)
    assert encoded.nbytes() == x.numel() / 8


# --- DARE --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big() -> torch.Tensor:
    """1000 x 1000 positive entries, for statistics (a zero-mean matrix would hide a bias)."""
    return 1.0 + torch.rand(1000, 1000, generator=torch.Generator().manual_seed(1))


def dare_kept(config: dict[str, Any], shape: tuple[int, int], seed: int = SEED) -> torch.Tensor:
    config = DareConfig.from_dict(config)
    if config.layout == "gaps":
        return gaps.keep_mask(seed, config.keep_threshold, shape[0], 0, shape[0], shape[1], "cpu")
    return dare.keep_mask(seed, config.keep_threshold, 0, shape[0], shape[1], "cpu")


@pytest.mark.parametrize("layout", ["hash", "gaps"])
@pytest.mark.parametrize("drop_rate", [0.9, 0.99])
def test_dare_kept_fraction_is_binomial(drop_rate, layout, big):
    n, q = big.numel(), 1 - drop_rate
    compressor = get_compressor("dare", {"drop_rate": drop_rate, "layout": layout})
    kept = compressor.encode(big, seed=SEED).arrays["values"].numel()
    assert abs(kept - n * q) < 5 * math.sqrt(n * q * (1 - q))


@pytest.mark.parametrize("drop_rate", [0.5, 0.99])
def test_dare_gaps_keeps_elements_independently(drop_rate):
    """Blocks start afresh and gaps are memoryless: the kept fraction is the same at every
    offset in a block, at block starts and ends, and after a kept element as after a dropped one."""
    q, n = 1 - drop_rate, 64 * gaps.BLOCK_ELEMENTS
    keep = torch.zeros(n, dtype=torch.bool)
    keep[gaps.kept_positions(SEED, DareConfig(drop_rate).keep_threshold, n, 0, n, "cpu")] = True
    blocks = keep.view(-1, gaps.BLOCK_ELEMENTS)

    def near_q(sample: torch.Tensor) -> bool:
        return abs(float(sample.float().mean()) - q) < 5 * math.sqrt(q * (1 - q) / sample.numel())

    assert near_q(blocks[:, :64]) and near_q(blocks[:, -64:]) and near_q(blocks[:, 1000:5000])
    assert near_q(keep[1:][keep[:-1]]) and near_q(keep[1:][~keep[:-1]])


def test_dare_gaps_test_vectors():
    """specs/compressors/dare.md, "Test vectors (layout gaps)"."""
    assert gaps.kept_positions(12345, 429496730, 100, 0, 100, "cpu").tolist() == \
        [5, 10, 25, 40, 42, 51, 71, 74, 77, 79, 84, 94, 99]
    kept = gaps.kept_positions(7, 42949673, 66536, 0, 66536, "cpu").tolist()
    assert len(kept) == 656 and kept[:6] == [110, 273, 318, 389, 653, 758]
    assert [i for i in kept if i >= gaps.BLOCK_ELEMENTS] == [65598, 65604, 65718, 65845, 66297]
    assert gaps.kept_positions(3, 2**32, 70000, 0, 70000, "cpu").tolist() == list(range(70000))
    table = gaps.gap_table(42949673).tolist()  # G[L] .. G[2]
    assert len(table) + 1 == 1806 and table[-3:] == [4167402471, 4209497446, 4252017623] and table[:2] == [1, 2]



@pytest.mark.parametrize("threshold", [gaps.MIN_KEEP_THRESHOLD, DareConfig(0.998).keep_threshold,
                                       DareConfig(0.99).keep_threshold, DareConfig(0.5).keep_threshold, 2**32])
def test_dare_gap_index_counts_like_a_search_of_the_whole_table(threshold):
    """The fused kernel's lookup (gaps.GapIndex: the draw's bucket, then `steps` halvings of what
    it leaves) counts the table entries <= u exactly as a search of the whole table does, at
    every entry, beside each, at the ends of the draws' range and at random draws."""
    table, index = gaps.gap_table(threshold), gaps.gap_index(threshold)
    edges = torch.cat([table - 1, table, table + 1, torch.tensor([0, 1, 2**31, 2**32 - 1])])
    draws = torch.cat([edges[(edges >= 0) & (edges < 2**32)], torch.randint(0, 2**32, (100_000,))])
    bucket = gaps.bucket_of(draws, index.shift, index.bias)
    lo, hi = index.bounds[bucket].long(), index.bounds[bucket + 1].long()
    for _ in range(index.steps):  # the kernel's loop, lane by lane
        active = lo < hi
        mid = (lo + hi) // 2
        le = table[mid.clamp(max=table.numel() - 1)] <= draws  # the kernel masks lanes with lo == hi
        lo, hi = torch.where(active & le, mid + 1, lo), torch.where(active & ~le, mid, hi)
    assert torch.equal(lo, torch.searchsorted(table, draws, right=True))
    assert index.steps <= (1 if threshold >= DareConfig(0.998).keep_threshold else 8)

def test_dare_gaps_any_range_gives_the_same_positions():
    n, threshold = 3 * gaps.BLOCK_ELEMENTS + 123, DareConfig(0.9).keep_threshold
    whole = gaps.kept_positions(SEED, threshold, n, 0, n, "cpu")
    for first, end in [(0, 10), (gaps.BLOCK_ELEMENTS - 5, gaps.BLOCK_ELEMENTS + 5), (70000, n)]:
        part = gaps.kept_positions(SEED, threshold, n, first, end, "cpu")
        assert torch.equal(part, whole[(whole >= first) & (whole < end)])


def test_dare_layout_defaults():
    """Writers write 'gaps'; a stored configuration without 'layout' is the page 1.0 mask, and
    a 'hash' configuration is written exactly as under page 1.0."""
    assert DareConfig().layout == "gaps"
    assert DareConfig.from_dict({"drop_rate": 0.9, "value_bits": 16}).layout == "hash"
    assert DareConfig(0.9, 16, "hash").to_dict() == {"drop_rate": 0.9, "value_bits": 16}
    assert DareConfig(0.9).to_dict() == {"drop_rate": 0.9, "value_bits": 16, "layout": "gaps"}
    with pytest.raises(InvalidInputError, match="layout"):
        DareConfig(layout="bits")
    with pytest.raises(InvalidInputError, match="use layout='hash'"):
        DareConfig(1 - 2**-17)
    assert DareConfig(1 - 2**-17, layout="hash").keep_threshold == 2**15


@pytest.mark.parametrize("attrs", [{"keep_threshold": 2**16 - 1}, {"keep_threshold": 2**32 + 1}, {"seed": 2**32}])
def test_dare_gaps_refuses_attrs_out_of_range(attrs, x):
    compressor = get_compressor("dare", {"drop_rate": 0.9, "layout": "gaps"})
    encoded = compressor.encode(x, seed=SEED)
    with pytest.raises(CorruptObjectError, match="keep_threshold"):
        compressor.decode(Encoded(encoded.arrays, {**encoded.attrs, **attrs}), SHAPE, "cpu")


@pytest.mark.parametrize("case", [c for c in CASES if c.name == "dare"], ids=str)
def test_dare_kept_values_within_quantization_error(case, x):
    keep = dare_kept(case.config, SHAPE)
    out = decoded(case, x)
    assert (out[~keep] == 0).all()
    rescaled = torch.where(keep, x * (1 / (1 - case.config["drop_rate"])), 0.0)
    error = (out - rescaled).abs()
    if case.config["value_bits"] == 16:
        # Round to nearest float16: half an ulp, 2**-11 relative, 2**-25 in the subnormals.
        assert (error <= rescaled.abs() * 2**-11 + 2**-25).all()
    else:
        half_step = rescaled.abs().amax(dim=1, keepdim=True) / 127 / 2
        assert (error <= half_step * (1 + 1e-5)).all()


@pytest.mark.parametrize("value_bits", [16, 8])
def test_dare_is_unbiased(value_bits, big):
    drop_rate = 0.99
    out = decoded(Case("dare", {"drop_rate": drop_rate, "value_bits": value_bits}), big)
    # Each element is x/(1-p) with probability 1-p, else 0: mean x, variance x^2 p/(1-p).
    sd_of_mean = math.sqrt(float((big.double() ** 2).sum()) * drop_rate / (1 - drop_rate)) / big.numel()
    assert abs(float(out.double().mean()) - float(big.double().mean())) < 5 * sd_of_mean


def test_dare_p99_fp16_stores_two_hundredths_of_a_byte_per_element(big):
    encoded = get_compressor("dare", {"drop_rate": 0.99}).encode(big, seed=SEED)
    assert encoded.nbytes() / big.numel() == pytest.approx(0.02, rel=0.05)


def test_dare_attrs_hold_integers_not_the_float():
    encoded = get_compressor("dare", {"drop_rate": 0.9}).encode(delta(), seed=SEED)
    assert encoded.attrs == {"seed": SEED, "keep_threshold": round(0.1 * 2**32)}


def test_dare_keeps_everything_at_p0(x):
    assert get_compressor("dare", {"drop_rate": 0.0}).encode(x, seed=SEED).arrays["values"].numel() == x.numel()


def test_dare_refuses_float16_overflow():
    with pytest.raises(InvalidInputError, match="float16 range.*value_bits=8"):
        get_compressor("dare", {"drop_rate": 0.99}).encode(torch.full((100, 100), 1000.0), seed=SEED)


def test_dare_refuses_truncated_values(x):
    compressor = get_compressor("dare", {"drop_rate": 0.9})
    encoded = compressor.encode(x, seed=SEED)
    short = Encoded({"values": encoded.arrays["values"][:-1]}, encoded.attrs)
    with pytest.raises(CorruptObjectError, match="'values'"):
        compressor.decode(short, SHAPE, "cpu")


# --- DeltaDQ -----------------------------------------------------------------------------

def deltadq_parts(config: DeltaDQConfig, x: torch.Tensor, seed: int = SEED):
    """(keep mask, rescaled kept values (0 elsewhere), per-row step) as the spec defines them."""
    rows, cols = x.shape
    keep = deltadq.keep_mask(seed, config.group_size, config.keep, 0, rows, cols, "cpu")
    rescaled = torch.where(keep, x * deltadq.column_factors(cols, config.group_size, config.keep, "cpu"), 0.0)
    step = 2 * rescaled.abs().amax(dim=1, keepdim=True) / (2**config.bits - 1)
    return keep, rescaled, step


def assert_group_counts(keep: torch.Tensor, group_size: int, k: int) -> None:
    cols = keep.shape[1]
    for start in range(0, cols, group_size):
        length = min(group_size, cols - start)
        assert (keep[:, start:start + length].sum(dim=1) == min(k, length)).all(), start


@pytest.mark.parametrize("case", [c for c in CASES if c.name == "deltadq"], ids=str)
def test_deltadq_keeps_exactly_k_per_group(case, x):
    config = DeltaDQConfig(**case.config)
    for cols in (96, 100):  # 100 leaves a short last group for both group sizes
        keep = deltadq.keep_mask(SEED, config.group_size, config.keep, 0, 64, cols, "cpu")
        assert_group_counts(keep, config.group_size, config.keep)


@pytest.mark.parametrize("case", [c for c in CASES if c.name == "deltadq"], ids=str)
def test_deltadq_error_bound(case, x):
    config = DeltaDQConfig(**case.config)
    keep, rescaled, step = deltadq_parts(config, x)
    out = decoded(case, x)
    assert (out[~keep] == 0).all()
    # All planes: half a step. Missing low planes j: their midpoint adds (2**j - 1)/2 steps.
    bound = 2.0 ** (config.lowest_plane - 1) * step
    assert ((out - rescaled).abs() <= bound * (1 + 1e-5) + 1e-12).all()


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 70), group_size=st.integers(1, 20),
       keep_fraction=st.floats(0, 1), bits=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
def test_deltadq_properties(rows, cols, group_size, keep_fraction, bits, seed):
    k = max(1, round(keep_fraction * group_size))
    config = DeltaDQConfig(group_size=group_size, keep=k, bits=bits)
    x = delta((rows, cols), seed=seed % 1000)
    keep, rescaled, step = deltadq_parts(config, x, seed)
    assert_group_counts(keep, group_size, k)
    out = get_compressor("deltadq", config.to_dict()).decode(
        deltadq.DeltaDQ(config).encode(x, seed=seed), (rows, cols), "cpu")
    assert ((out - rescaled).abs() <= step / 2 * (1 + 1e-5) + 1e-12).all()


def test_deltadq_low_planes_can_be_dropped_after_encoding(x):
    full = get_compressor("deltadq", {"bits": 4}).encode(x, seed=SEED)
    top_two = get_compressor("deltadq", {"bits": 4, "stored_planes": 2}).encode(x, seed=SEED)
    assert set(top_two.arrays) == {"plane2", "plane3", "scales"}
    dropped = Encoded({role: a for role, a in full.arrays.items() if role not in ("plane0", "plane1")}, full.attrs)
    # Any deltadq decoder of the same bits reads whichever top planes are present.
    decoder = get_compressor("deltadq", {"bits": 4})
    assert torch.equal(decoder.decode(dropped, SHAPE, "cpu"), decoder.decode(top_two, SHAPE, "cpu"))


def test_deltadq_refuses_a_gap_in_the_planes(x):
    compressor = get_compressor("deltadq", {"bits": 4})
    encoded = compressor.encode(x, seed=SEED)
    holed = Encoded({role: a for role, a in encoded.arrays.items() if role != "plane3"}, encoded.attrs)
    with pytest.raises(CorruptObjectError, match=r"found planes \[0, 1, 2\]"):
        compressor.decode(holed, SHAPE, "cpu")


def test_deltadq_one_bit_decodes_to_plus_minus_absmax(x):
    out = decoded(Case("deltadq", {"bits": 1}), x)
    absmax = out.abs().amax(dim=1, keepdim=True)
    assert ((out == 0) | (out.abs() == absmax)).all()


# --- both masked compressors: chunking, configs, spec readers -----------------------------

@pytest.mark.parametrize("case", MASKED, ids=str)
def test_chunking_does_not_change_the_result(case, x, monkeypatch):
    compressor = case.compressor()
    odd = x[:63, :95].contiguous()  # blocks of 2 rows below, then a ragged last block of 1
    reference = compressor.encode(odd, seed=SEED)
    expected, simulated = compressor.decode(reference, odd.shape, "cpu"), compressor.simulate(odd, seed=SEED)
    monkeypatch.setattr(dare, "CHUNK_ELEMENTS", 200)
    chunked = compressor.encode(odd, seed=SEED)
    for role, array in reference.arrays.items():
        assert torch.equal(chunked.arrays[role], array), role
    assert torch.equal(compressor.decode(reference, odd.shape, "cpu"), expected)
    assert torch.equal(compressor.simulate(odd, seed=SEED), simulated)


@pytest.mark.parametrize(("name", "config", "field_name"), [
    ("dare", {"drop_rate": 1.0}, "drop_rate"),
    ("dare", {"drop_rate": -0.1}, "drop_rate"),
    ("dare", {"drop_rate": "0.9"}, "drop_rate"),
    ("dare", {"value_bits": 4}, "value_bits"),
    ("deltadq", {"group_size": 0}, "group_size"),
    ("deltadq", {"group_size": 2**16 + 1}, "group_size"),
    ("deltadq", {"group_size": 4, "keep": 5}, "keep"),
    ("deltadq", {"keep": 0}, "keep"),
    ("deltadq", {"bits": 9}, "bits"),
    ("deltadq", {"bits": 0}, "bits"),
    ("deltadq", {"bits": 4, "stored_planes": 5}, "stored_planes"),
    ("deltadq", {"stored_planes": 0}, "stored_planes"),
])
def test_invalid_config_names_the_field(name, config, field_name):
    with pytest.raises(InvalidInputError, match=rf"\.{field_name} must be .*, got"):
        get_compressor(name, config)


@pytest.mark.parametrize("case", MASKED, ids=str)
@pytest.mark.parametrize("seed", [-1, 2**32, 1.5])
def test_seed_must_be_uint32(case, seed, x):
    with pytest.raises(InvalidInputError, match="seed must be an int in"):
        case.compressor().encode(x, seed=seed)


def mix(v: int) -> int:
    v ^= v >> 16
    v = (v * 0x7FEB352D) & 0xFFFFFFFF
    v ^= v >> 15
    v = (v * 0x846CA68B) & 0xFFFFFFFF
    return v ^ (v >> 16)


def r(seed: int, i: int) -> int:
    return mix(mix(i) ^ mix(seed))


def bits_of(packed: np.ndarray, count: int) -> list[int]:
    return [int(b) for b in np.unpackbits(packed, bitorder="little")[:count]]


def reference_dare_kept(seed: int, threshold: int, n: int, layout: str) -> list[int]:
    """specs/compressors/dare.md, the kept flat indices of each layout, step by step."""
    if layout == "hash":
        return [i for i in range(n) if r(seed, i) < threshold]
    survival = [2**32]
    while survival[-1] * (2**32 - threshold) // 2**32 > 0:
        survival.append(survival[-1] * (2**32 - threshold) // 2**32)
    kept = []
    for start in range(0, n, 65536):
        length, pos, t = min(65536, n - start), -1, 0
        while pos < length - 1:
            u = r(seed, start + t)
            pos, t = pos + sum(1 for g in survival if u < g), t + 1
            if pos < length:
                kept.append(start + pos)
    return kept


def reference_dare_decode(encoded: Encoded, rows: int, cols: int, layout: str) -> np.ndarray:
    """specs/compressors/dare.md, "Decoding algorithm", step by step in numpy float32."""
    seed, threshold = encoded.attrs["seed"], encoded.attrs["keep_threshold"]
    values = encoded.arrays["values"].numpy()
    scales = encoded.arrays["scales"].numpy() if "scales" in encoded.arrays else None
    out = np.zeros((rows, cols), dtype=np.float32)
    j = 0
    for i in reference_dare_kept(seed, threshold, rows * cols, layout):
        row, col = divmod(i, cols)
        value = np.float32(values[j])
        out[row, col] = value if scales is None else value * scales[row]
        j += 1
    assert j == len(values)
    return out


def reference_deltadq_decode(encoded: Encoded, rows: int, cols: int, g: int, k: int, b: int) -> np.ndarray:
    """specs/compressors/deltadq.md, "Decoding algorithm", step by step in numpy float32."""
    seed = encoded.attrs["seed"]
    kept_positions = []
    for row in range(rows):
        for start in range(0, cols, g):
            length = min(g, cols - start)
            keys = sorted(((r(seed, row * cols + start + p) << 16) | p, p) for p in range(length))
            kept_positions += sorted((row, start + p) for _, p in keys[:min(k, length)])
    total = len(kept_positions)
    planes = sorted(int(role[5:]) for role in encoded.arrays if role.startswith("plane"))
    low = planes[0]
    codes = [0] * total
    for j in planes:
        for n, bit in enumerate(bits_of(encoded.arrays[f"plane{j}"].numpy(), total)):
            codes[n] |= bit << j
    absmax = encoded.arrays["scales"].numpy()
    out = np.zeros((rows, cols), dtype=np.float32)
    for n, (row, col) in enumerate(kept_positions):
        step = np.float32(2) * absmax[row] / np.float32(2**b - 1)
        code = np.float32(codes[n] + (2**low - 1) / 2)
        out[row, col] = code * step - absmax[row]
    return out


@pytest.mark.parametrize("case", MASKED, ids=str)
def test_decode_agrees_with_a_reader_written_from_the_spec(case):
    rows, cols = 5, 37
    x = delta((rows, cols))
    compressor = case.compressor()
    encoded = compressor.encode(x, seed=SEED)
    if case.name == "dare":
        expected = reference_dare_decode(encoded, rows, cols, compressor.config.layout)
    else:
        c = compressor.config
        expected = reference_deltadq_decode(encoded, rows, cols, c.group_size, c.keep, c.bits)
    got = compressor.decode(encoded, (rows, cols), "cpu").numpy()
    assert got.tobytes() == expected.tobytes()
