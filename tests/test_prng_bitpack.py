"""The counter-based PRNG and the bit packing, held to independent reference implementations.

Both define bits on disk (DARE and DeltaDQ regenerate masks from r(s, i); packed arrays use
the bit order of specs/format.md), so besides property tests against pure-Python references
there are frozen golden values: a change of either function must fail here, not in the field.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltastore.tensor.bitpack import pack_bits, packed_size, unpack_bits
from deltastore.tensor.prng import MAX_COUNTER, derive_seed, mix32, mix32_int, random_u32

MASK32 = 0xFFFFFFFF
uint32s = st.integers(min_value=0, max_value=MASK32)


def mix_reference(x: int) -> int:
    """lowbias32 by C. Wellons, written independently of deltastore.tensor.prng."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    x ^= x >> 16
    return x


def r_reference(seed: int, i: int) -> int:
    """r(s, i) = mix(mix(i) ^ mix(s)) (specs/format.md#pseudo-random-function)."""
    return mix_reference(mix_reference(i) ^ mix_reference(seed))


def derive_seed_reference(base_seed: int, name: str) -> int:
    """FNV-1a 32 of the UTF-8 name, xor the base seed, mixed."""
    h = 0x811C9DC5
    for byte in name.encode("utf-8"):
        h = ((h ^ byte) * 0x01000193) & MASK32
    return mix_reference(h ^ base_seed)


# --- bit packing -------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), min_size=0, max_size=2000))
def test_pack_unpack_round_trip(bits):
    flags = torch.tensor(bits, dtype=torch.bool)
    packed = pack_bits(flags)
    assert packed.dtype == torch.uint8
    assert packed.shape == (packed_size(len(bits)),)
    assert torch.equal(unpack_bits(packed, len(bits)), flags)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), min_size=0, max_size=2000))
def test_pack_matches_numpy_little_bitorder(bits):
    expected = np.packbits(np.array(bits, dtype=bool), bitorder="little")
    assert pack_bits(torch.tensor(bits, dtype=torch.bool)).numpy().tobytes() == expected.tobytes()


def test_pack_bit_order_golden():
    # Element i lands in byte i // 8 at value 1 << (i % 8); padding bits are 0.
    flags = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.bool)
    assert pack_bits(flags).tolist() == [0x01, 0x06]


def test_unpack_refuses_wrong_size_and_dtype():
    with pytest.raises(ValueError, match="11 bits need 2 bytes, got 3"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 11)
    with pytest.raises(ValueError, match="1-D uint8"):
        unpack_bits(torch.zeros(2, dtype=torch.int8), 11)


# --- PRNG --------------------------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(st.lists(uint32s, min_size=1, max_size=64))
def test_mix32_matches_reference(values):
    out = mix32(torch.tensor(values, dtype=torch.int64))
    assert out.tolist() == [mix_reference(v) for v in values]
    assert mix32_int(values[0]) == mix_reference(values[0])


@settings(max_examples=100, deadline=None)
@given(seed=uint32s, start=uint32s, count=st.integers(min_value=0, max_value=40))
def test_random_u32_matches_reference(seed, start, count):
    start = min(start, MAX_COUNTER - count)  # keep every counter inside the 32-bit range
    out = random_u32(seed, start, count)
    assert out.dtype == torch.int64
    assert out.tolist() == [r_reference(seed, i) for i in range(start, start + count)]


def test_random_u32_golden():
    # Frozen: computed once with r_reference. DARE/DeltaDQ masks already on disk depend on it.
    assert random_u32(1234, 0, 8).tolist() == [
        1887047106, 2825549663, 1768029050, 3338688208, 2087153084, 2825451757, 293558987, 2153651345,
    ]


def test_random_u32_refuses_counters_past_32_bits():
    with pytest.raises(ValueError, match="32-bit range"):
        random_u32(5, MAX_COUNTER - 2, 5)


@settings(max_examples=100, deadline=None)
@given(base_seed=uint32s, name=st.text(max_size=40))
def test_derive_seed_matches_reference(base_seed, name):
    assert derive_seed(base_seed, name) == derive_seed_reference(base_seed, name)


def test_derive_seed_golden():
    # Frozen: per-tensor seeds of committed versions must not change.
    assert derive_seed(0, "model.layers.0.mlp.up_proj.weight") == 2845485589
    assert derive_seed(1234, "") == 878738840
    assert derive_seed(MASK32, "ü") == 2944118684


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    for start in (0, 123_456_789, MAX_COUNTER - 100_000):
        assert torch.equal(random_u32(99, start, 100_000, "cuda").cpu(), random_u32(99, start, 100_000, "cpu"))
    flags = random_u32(7, 0, 10_001) < 2**31
    assert torch.equal(pack_bits(flags.cuda()).cpu(), pack_bits(flags))
    assert torch.equal(unpack_bits(pack_bits(flags).cuda(), 10_001).cpu(), flags)
