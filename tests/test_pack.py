"""The pack of a task version (specs/format.md §5.8): byte shuffling, XOR with the reference,
the lossy option for small tensors, and side files stored as patches (§3.3)."""

from __future__ import annotations

import json

import pytest
import torch

from deltastore import CorruptObjectError, InvalidInputError, Registry
from deltastore.storage.objects import PATCH_MAGIC, object_key, parse_patch, patch_frame
from deltastore.tensor.pack import (carrier, keep_mantissa_bits, pack_tensors, packed_nbytes, shuffle,
                                    unpack_carrier, unshuffle)

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]


def _sample(dtype: torch.dtype, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) < 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=g).to(dtype)


def test_shuffle_puts_each_byte_plane_together():
    values = torch.tensor([0x04030201, 0x08070605], dtype=torch.int32)
    assert shuffle(values).tolist() == [1, 5, 2, 6, 3, 7, 4, 8]  # byte k of element j at k * n + j
    assert torch.equal(unshuffle(shuffle(values), torch.int32), values)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0, 4), (7,), (3, 5)])
def test_pack_round_trips_every_dtype_and_shape(dtype, shape):
    tensor, reference = _sample(dtype, shape), _sample(dtype, shape).flip(-1) if shape else _sample(dtype, shape)
    data = pack_tensors([(tensor, reference), (tensor, None)])
    n = packed_nbytes(shape, dtype)
    assert data.dtype == torch.uint8 and data.numel() == 2 * n
    xored = unpack_carrier(data[:n], shape, dtype, carrier(reference))
    whole = unpack_carrier(data[n:], shape, dtype, None)
    assert torch.equal(xored, carrier(tensor).reshape(shape)) and torch.equal(whole, xored)
    if reference is not tensor and shape and torch.numel(tensor):  # XOR with the reference changed the bytes
        assert not torch.equal(data[:n], data[n:]) or torch.equal(tensor, reference)


def test_xor_with_the_reference_is_zero_where_nothing_changed():
    reference = torch.randn(64)
    assert not pack_tensors([(reference.clone(), reference)]).any()


@pytest.mark.parametrize("dtype,width", [(torch.float32, 23), (torch.float16, 10), (torch.bfloat16, 7),
                                         (torch.float64, 52)])
def test_keep_mantissa_bits_bounds_the_change_and_zeroes_the_low_xor_bits(dtype, width):
    reference = torch.randn(4096, dtype=torch.float64).to(dtype)
    tensor = (reference.double() * (1 + 1e-2 * torch.randn(4096, dtype=torch.float64))).to(dtype)
    bits = min(5, width)
    kept = keep_mantissa_bits(tensor, reference, bits)
    assert kept.dtype == dtype and torch.isfinite(kept).all()
    assert ((kept.double() - tensor.double()).abs() <= tensor.double().abs() * 2.0 ** -bits).all()
    assert not torch.equal(kept, tensor)  # it did drop bits
    low = (1 << (width - bits)) - 1
    assert not ((carrier(kept) ^ carrier(reference)) & low).any()
    assert keep_mantissa_bits(tensor, reference, width) is tensor  # nothing to drop
    ints = torch.arange(5)
    assert keep_mantissa_bits(ints, ints + 1, 3) is ints  # not a float: unchanged


# -- in a registry ----------------------------------------------------------------------------
@pytest.fixture
def small(tmp_path):
    """A reference with a side file and small tensors; a finetune that changes both a little."""
    torch.manual_seed(0)
    reference = {"w": torch.randn(64, 64), "b": torch.randn(64), "n": torch.randn(64).half(),
                 "steps": torch.arange(3)}
    ref_dir, ft_dir = tmp_path / "reference", tmp_path / "finetune"
    from safetensors.torch import save_file

    vocab = {f"tok{i}": i for i in range(500)}
    for folder, tensors, text in (
            (ref_dir, reference, json.dumps({"vocab": vocab, "max_length": 128}, separators=(",", ":"))),
            (ft_dir, {"w": reference["w"] + 1e-3 * torch.randn(64, 64), "b": reference["b"] * 1.001,
                      "n": reference["n"], "steps": reference["steps"], "head": torch.randn(3, 8)},
             json.dumps({"vocab": vocab, "max_length": 64}, indent=2))):
        folder.mkdir()
        save_file(tensors, str(folder / "model.safetensors"))
        (folder / "tokenizer.json").write_text(text)
    reg = Registry.init(tmp_path / "registry", ref_dir, progress=False)
    return reg, ft_dir, reference


def test_small_tensors_are_packed_and_side_files_patched(small):
    from safetensors.torch import load_file

    reg, ft_dir, _ = small
    record = reg.commit("t", ft_dir, method="bitdelta", progress=False)
    assert {n: (e.codec, e.ref) for n, e in record.tensors.items() if n != "w"} == {
        "b": ("xor", "b"), "n": ("xor", "n"), "steps": ("xor", "steps"), "head": ("packed", None)}
    assert record.pack is not None and record.tensors["w"].codec == "bitdelta"
    got, want = reg.materialize("t", progress=False), load_file(str(ft_dir / "model.safetensors"))
    assert all(torch.equal(got[n], want[n]) for n in ("b", "n", "steps", "head"))
    stored = reg.backend.get(object_key("blobs", record.files["tokenizer.json"]))
    assert stored.startswith(PATCH_MAGIC) and b"\njson\n" in stored and len(stored) < 300
    assert reg.objects.get_blob(record.files["tokenizer.json"]) == (ft_dir / "tokenizer.json").read_bytes()
    assert reg.verify(progress=False) == []


def test_a_patch_is_checked_on_read(small):
    reg, ft_dir, _ = small
    record = reg.commit("t", ft_dir, method="bitdelta", progress=False)
    digest = record.files["tokenizer.json"]
    path = reg.path / object_key("blobs", digest)
    original = path.read_bytes()
    path.write_bytes(original.replace(b"\njson\n", b"\nyaml\n"))  # an unknown transform
    with pytest.raises(CorruptObjectError, match="not a deltastore patch header"):
        reg.objects.get_blob(digest)
    dictionary, transform, frame = parse_patch(original, "tokenizer.json")
    assert transform == "json"
    path.write_bytes(patch_frame(dictionary, "raw", frame))  # the other transform: another dictionary
    with pytest.raises(CorruptObjectError, match="content hash mismatch|not a valid zstd frame|declares"):
        reg.objects.get_blob(digest)
    path.write_bytes(original)
    reference_blob = reg.reference().files["tokenizer.json"]
    (reg.path / object_key("blobs", reference_blob)).write_bytes(original)  # the dictionary made a patch
    with pytest.raises(CorruptObjectError, match="itself a patch"):
        reg.objects.get_blob(digest)


def test_a_wrong_pack_is_refused(small):
    from deltastore.storage.records import pack as pack_record

    reg, ft_dir, _ = small
    import dataclasses

    reg.commit("t", ft_dir, method="bitdelta", progress=False)
    other = reg.commit("u", ft_dir, method="bitdelta", progress=False)
    short = reg.objects.put_array(torch.zeros(5, dtype=torch.uint8), reg.objects.new_txn())
    bad = dataclasses.replace(other, pack=short)
    digest = reg.objects.put_record(bad, reg.objects.new_txn())
    reg.backend.put("refs/tasks/u", pack_record({"format": 1, "kind": "task_ref", "versions": [[1, digest]]}))
    with pytest.raises(CorruptObjectError, match=r"the pack must be uint8 \(\d+,\) for its 4 tensors"):
        reg.materialize("u", progress=False)
    assert reg.materialize("t", progress=False)  # the good version still reads


def test_lossy_small_tensors_are_asked_for_and_recorded(small):
    from safetensors.torch import load_file

    reg, ft_dir, _ = small
    exact = reg.commit("exact", ft_dir, method="bitdelta", progress=False, skip_unchanged=True)
    lossy = reg.commit("lossy", ft_dir, method="bitdelta", progress=False, skip_unchanged=True,
                       small_tensor_bits=4)
    assert "small_tensor_bits" not in exact.source["settings"] and lossy.source["settings"]["small_tensor_bits"] == 4
    assert reg.stats("lossy").parts["small_tensors"] < reg.stats("exact").parts["small_tensors"]
    got, want = reg.materialize("lossy", progress=False), load_file(str(ft_dir / "model.safetensors"))
    assert not torch.equal(got["b"], want["b"])
    assert ((got["b"] - want["b"]).abs() <= want["b"].abs() * 2.0 ** -4).all()
    assert torch.equal(got["head"], want["head"])  # no reference tensor: stored exactly
    assert torch.equal(got["w"], reg.materialize("exact", progress=False)["w"])  # deltas unchanged
    with pytest.raises(Exception, match="small_tensor_bits must be an integer from 0 to 52"):
        reg.commit("bad", ft_dir, small_tensor_bits=-1, progress=False)


def _registry_and_finetune(small, tmp_path, ref_cast, ft_cast):
    """``small``'s reference and finetune with their float tensors cast (int64 ``steps`` kept)."""
    from safetensors.torch import load_file, save_file

    _, ft_dir, _ = small
    out = []
    for name, source, cast in (("ref", tmp_path / "reference", ref_cast), ("ft", ft_dir, ft_cast)):
        folder = tmp_path / f"cast-{name}"
        folder.mkdir()
        tensors = load_file(str(source / "model.safetensors"))
        save_file({k: cast(v) if v.is_floating_point() else v for k, v in tensors.items()},
                  str(folder / "model.safetensors"))
        out.append(folder)
    return Registry.init(tmp_path / "cast-registry", out[0], progress=False), out[1]


def test_small_float_tensors_are_xored_with_a_narrower_reference(small, tmp_path):
    """Format 1.4, §5.8: a float32 finetune of a bfloat16 reference XORs its small tensors with
    the reference's values widened to float32, and the lossy option acts on them."""
    from safetensors.torch import load_file

    reg, ft32 = _registry_and_finetune(small, tmp_path, lambda v: v.bfloat16(), lambda v: v.float())
    exact = reg.commit("exact", ft32, method="bitdelta", progress=False)
    assert {n: e.codec for n, e in exact.tensors.items() if n in ("b", "n", "head")} == \
        {"b": "xor", "n": "xor", "head": "packed"}
    want = load_file(str(ft32 / "model.safetensors"))
    got = reg.materialize("exact", progress=False)
    assert all(torch.equal(got[k], want[k]) for k in ("b", "n", "head", "steps"))
    lossy = reg.commit("lossy", ft32, method="bitdelta", small_tensor_bits=2, progress=False)
    assert reg.stats("lossy").parts["small_tensors"] < reg.stats("exact").parts["small_tensors"]
    b = reg.materialize("lossy", progress=False)["b"]
    assert not torch.equal(b, want["b"]) and ((b - want["b"]).abs() <= want["b"].abs() * 2.0 ** -2).all()
    assert lossy.tensors["b"].codec == "xor"
    assert lossy.source["settings"] == {"small_tensor_bits": 2}  # recorded without skip_unchanged too


def test_xor_reference_widens_exactly_and_never_a_nan():
    """§5.8: a narrower float reference is converted exactly (-0.0, subnormals, extremes); one
    holding a NaN, whose bits need not survive a conversion, is not widened (None: packed as is;
    a reader refuses such an xor entry). deltastore's init refuses NaN references anyway."""
    from deltastore.tensor.pack import xor_reference

    ref = torch.tensor([-0.0, 1e-40, 3.0e38, 0.1, -2.5], dtype=torch.bfloat16)
    wide = xor_reference(torch.float32, ref)
    assert torch.equal(carrier(wide), carrier(ref).to(torch.int32) << 16)  # bf16: the top half of float32
    half = torch.tensor([-0.0, 6e-8, 65504.0], dtype=torch.float16)
    assert torch.equal(xor_reference(torch.float64, half), half.double())
    assert xor_reference(torch.float32, torch.tensor([1.0, float("nan")], dtype=torch.bfloat16)) is None
    assert xor_reference(torch.float16, torch.ones(3)) is None  # narrowing: never
    assert xor_reference(torch.float32, torch.ones(3)) is not None


def test_lossy_small_tensors_are_refused_where_no_small_tensor_is_xored(small, tmp_path):
    """A float16 finetune of a float32 reference packs its small tensors as they are (a pack
    XORs only with a reference of its dtype or a narrower float), so small_tensor_bits would
    change nothing: refused, not recorded."""
    reg, ft16 = _registry_and_finetune(small, tmp_path, lambda v: v.float(), lambda v: v.half())
    with pytest.raises(InvalidInputError, match=r"small_tensor_bits=4 would change nothing: .* none of its 3 small "
                                                r"floating-point tensors has one \('b' is float16, the reference's "
                                                r"float32\); commit without it"):
        reg.commit("t", ft16, method="bitdelta", small_tensor_bits=4, progress=False)
    assert reg.tasks() == []
    assert reg.commit("t", ft16, method="bitdelta", progress=False).version == 1


def test_gc_keeps_a_patch_dictionary_and_copy_keeps_the_patch(small, tmp_path):
    """format.md 9.1: a patched blob reaches its dictionary (gc keeps it for the patch's sake, not
    only the reference's); copy sends the patch as stored, and the dictionary with it."""
    from deltastore.copy import copy

    reg, ft_dir, _ = small
    record = reg.commit("t", ft_dir, method="bitdelta", progress=False)
    patched = record.files["tokenizer.json"]
    dictionary = reg.reference().files["tokenizer.json"]
    assert reg.objects.blob_dictionary(patched) == dictionary
    copy(reg.path, tmp_path / "copy", ["t"])
    there = Registry(tmp_path / "copy")
    assert there.backend.get(object_key("blobs", patched)) == reg.backend.get(object_key("blobs", patched))
    assert there.objects.get_blob(patched) == (ft_dir / "tokenizer.json").read_bytes()
    assert there.verify(progress=False) == []
    from deltastore.integrity import _reachable

    assert "t@1" in _reachable(reg)[("blobs", dictionary)]  # reached through the patch, not only the reference


def test_a_prefixed_finetune_says_its_prefix_once(small, tmp_path):
    """format.md 5.2, 5.5: a classifier's encoder names carry a prefix the reference lacks; the
    version says it once (ref_prefix) and its delta and xor entries leave their ref out."""
    import msgpack
    from safetensors.torch import load_file, save_file

    reg, ft_dir, _ = small
    tensors = {f"enc.{name}": t for name, t in load_file(str(ft_dir / "model.safetensors")).items() if name != "head"}
    tensors["head"] = torch.randn(3, 8)
    prefixed = tmp_path / "prefixed"
    prefixed.mkdir()
    save_file(tensors, str(prefixed / "model.safetensors"))
    record = reg.commit("p", prefixed, method="bitdelta", progress=False)
    assert record.ref_prefix == "enc."
    assert {n: (e.codec, e.ref) for n, e in record.tensors.items()} == {
        "enc.w": ("bitdelta", "w"), "enc.b": ("xor", "b"), "enc.n": ("xor", "n"), "enc.steps": ("xor", "steps"),
        "head": ("packed", None)}
    raw = msgpack.unpackb(reg.objects.record_bytes(reg.version("p")[0]))
    assert raw["ref_prefix"] == "enc." and not any("ref" in e for e in raw["tensors"].values())
    got = reg.materialize("p", progress=False)
    assert all(torch.equal(got[n], tensors[n]) for n in ("enc.b", "enc.n", "enc.steps", "head"))
