"""Corruption: damaged bytes give a precise error naming the object and the task, never
wrong weights; ``verify`` reports every problem in one pass (``--json``, exit 4).

Damage is done through the registry's backend (keys, not files), so the same tests run on a
local folder and on an object store (the ``where`` fixture); the exhaustive bit-flip sweeps
run on the local folder only (thousands of rewrites, and the reading code is the same)."""

from __future__ import annotations

import json

import pytest
import zstandard
from click.testing import CliRunner

from deltastore import CorruptObjectError, DeltastoreError, NotFoundError, Registry
from deltastore.storage.layout import zstd_content_size
from deltastore.storage.objects import object_key
from deltastore_cli.main import cli

from .helpers import state_hash





def _flip(reg: Registry, key: str, offset: int, bit: int = 0) -> None:
    data = bytearray(reg.backend.get(key))
    data[offset % len(data)] ^= 1 << bit
    reg.backend.put(key, bytes(data))


def _edit(reg: Registry, key: str, change) -> None:
    reg.backend.put(key, change(reg.backend.get(key)))


def _metadata(digest: str) -> str:
    return f"{object_key('arrays', digest)}/zarr.json"


def _chunks(reg: Registry, digest: str) -> list[str]:
    return [k for k in reg.backend.list(object_key("arrays", digest)) if not k.endswith("/zarr.json")]


def _t1_array(reg: Registry, role: str = "signs") -> str:
    """An array only task t1 uses: the BitDelta signs of its embedding delta, or ('rows')
    the mask of the embedding rows it changed."""
    _, record = reg.version("t1")
    entry = record.tensors["emb.weight"]
    return entry.rows if role == "rows" else entry.arrays[role]


def _materialize_error(reg: Registry, task: str = "t1") -> DeltastoreError:
    with pytest.raises(DeltastoreError) as info:
        reg.materialize(task)
    return info.value


DAMAGE = {
    "chunk bit flip": lambda reg, d: _flip(reg, _chunks(reg, d)[0], 3),
    "chunk truncated": lambda reg, d: _edit(reg, _chunks(reg, d)[0], lambda data: data[:5]),
    "chunk missing": lambda reg, d: reg.backend.delete(_chunks(reg, d)[0]),
    "chunk emptied": lambda reg, d: reg.backend.put(_chunks(reg, d)[0], b""),
    "zarr.json shape changed": lambda reg, d: _edit(reg, _metadata(d), lambda data: data.replace(
        b'"shape": [', b'"shape": [1, ', 1)),
    "zarr.json garbled": lambda reg, d: reg.backend.put(_metadata(d), b"{\"zarr_format\": 3, \x00"),
    "zarr.json missing": lambda reg, d: reg.backend.delete(_metadata(d)),
    "array folder missing": lambda reg, d: reg.backend.delete(object_key("arrays", d)),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_array_names_object_and_task(reg_anywhere, damage):
    reg = reg_anywhere
    digest = _t1_array(reg)
    DAMAGE[damage](reg, digest)
    err = _materialize_error(reg)
    assert isinstance(err, (CorruptObjectError, NotFoundError)), err
    assert digest[:12] in str(err) and "t1@1" in str(err) and "emb.weight" in str(err), str(err)
    reg.materialize("t2")  # other tasks still read
    problems = reg.verify()
    assert [p["object"] for p in problems] == [object_key("arrays", digest)], problems
    assert "t1@1" in problems[0]["used_by"]


def test_damaged_blob_record_and_refs(reg_anywhere, tmp_path):
    reg = reg_anywhere
    digest, record = reg.version("t1")
    # a flipped bit in a blob (the stored config.json): save_pretrained refuses it
    blob = record.files["config.json"]
    _flip(reg, object_key("blobs", blob), 2)
    with pytest.raises(CorruptObjectError, match=f"t1@1, file 'config.json'.*{blob[:12]}"):
        reg.save_pretrained("t1", tmp_path / "out")
    # a flipped bit in the version record
    _flip(reg, object_key("records", digest), 40)
    with pytest.raises(CorruptObjectError, match=f"t1@1: .*{digest[:12]}.*corrupt"):
        reg.materialize("t1")
    # a flipped bit in the base record: every task built on it says so
    base_digest, _ = reg.base("b1")
    _flip(reg, object_key("records", base_digest), 40)
    with pytest.raises(CorruptObjectError, match=base_digest[:12]):
        reg.base("b1")
    problems = {p["object"] for p in reg.verify()}
    assert problems == {object_key("blobs", blob), object_key("records", digest),
                        object_key("records", base_digest)}


@pytest.mark.parametrize("damage", ["chunk bit flip", "chunk truncated", "zarr.json shape changed",
                                    "array folder missing"])
def test_damaged_bundle_names_it_and_the_version(reg_anywhere, damage):
    """t2@1's small arrays live in its bundle (format.md §5.9): damage to the bundle is
    reported with the bundle's name and the version, and t1 (no bundle) still reads."""
    reg = reg_anywhere
    _, record = reg.version("t2", 1)
    assert record.bundle and record.bundled
    DAMAGE[damage](reg, record.bundle)
    with pytest.raises(DeltastoreError) as info:
        reg.materialize("t2", 1)  # t2@2 has a bundle of its own
    err = info.value
    assert isinstance(err, (CorruptObjectError, NotFoundError)), err
    assert record.bundle[:12] in str(err) and "t2@1" in str(err), str(err)
    reg.materialize("t1")
    problems = reg.verify()
    assert object_key("arrays", record.bundle) in {p["object"] for p in problems}, problems


def test_a_bundled_array_is_checked_against_its_name(reg):
    """A record whose ``bundled`` list points an array at the wrong bytes (two entries swapped,
    stored under the edited record's own name): the range does not hash to the name."""
    from deltastore.storage.objects import record_frame
    from deltastore.storage.records import TaskVersion, content_hash, pack, unpack

    digest, record = reg.version("t2", 1)
    data = unpack(reg.objects.record_bytes(digest), "t2@1")
    first, second = data["bundled"][0], data["bundled"][1]
    data["bundled"][0], data["bundled"][1] = second, first
    raw = pack(data)
    new = content_hash(raw)
    reg.backend.put(object_key("records", new), record_frame(raw))
    (reg.path / "refs" / "tasks" / "t2").write_bytes(pack({"format": 1, "kind": "task_ref", "versions": [[1, new]]}))
    TaskVersion.from_dict(data, "edited")  # a well-formed record
    with pytest.raises(CorruptObjectError, match="bundle.*corrupt|content hash|bundle"):
        Registry(reg.path).materialize("t2", 1)


RECORD_DAMAGE = {  # a record file is one zstd frame of its msgpack bytes (format.md §3.1)
    "bytes after the frame": lambda data: data + b"x",
    "a second frame": lambda data: data + data,
    "frame cut short": lambda data: data[:-3],
    "size left out of the header": lambda data: zstandard.ZstdCompressor(write_content_size=False).compress(
        zstandard.ZstdDecompressor().decompress(data)),
    "size declared larger": lambda data: _declared_plus_one(data),
}


def _declared_plus_one(data: bytes) -> bytes:
    """The same frame with its header's content size one more (single-segment, 1- or 2-byte field)."""
    content = zstandard.ZstdDecompressor().decompress(data)
    frame = bytearray(zstandard.ZstdCompressor(write_checksum=False).compress(content))
    assert zstd_content_size(bytes(frame)) == len(content)
    descriptor = frame[4]
    field = (1 if descriptor >> 5 & 1 else 0, 2, 4, 8)[descriptor >> 6]
    pos = 5 + (0 if descriptor >> 5 & 1 else 1)
    value = int.from_bytes(frame[pos:pos + field], "little") + 1
    frame[pos:pos + field] = value.to_bytes(field, "little")
    return bytes(frame)


@pytest.mark.parametrize("damage", sorted(RECORD_DAMAGE))
def test_damaged_record_frame_is_reported(reg_anywhere, damage):
    """A damaged zstd frame of a version record: materialize names the version and the record,
    verify lists it, and the other tasks still read."""
    reg = reg_anywhere
    digest, _ = reg.version("t1")
    key = object_key("records", digest)
    assert reg.backend.get(key)[:4] == b"\x28\xb5\x2f\xfd"  # stored compressed
    _edit(reg, key, RECORD_DAMAGE[damage])
    with pytest.raises(CorruptObjectError, match=f"t1@1: .*{digest[:12]}"):
        reg.materialize("t1")
    reg.materialize("t2")
    assert {p["object"] for p in reg.verify()} == {key}


@pytest.mark.parametrize("ref", ["refs/tasks/t2", "refs/bases/b1", "refs/reference"])
def test_every_bit_flip_of_a_ref_is_caught_or_harmless(reg, ref):
    """Refs are not content addressed: flip each of their bits in turn; reading either
    fails with a deltastore error or gives exactly what it gave before."""
    path = reg.path / ref
    original = path.read_bytes()
    before = {"t2": reg.versions("t2"), "b1": reg.base("b1")[0], "ref": reg.reference_hash()}

    def read():
        out = {"t2": reg.versions("t2"), "b1": reg.base("b1")[0], "ref": reg.reference_hash()}
        reg.version("t2", 1), reg.version("t2", 2), reg.reference()
        return out

    caught = 0
    for offset in range(len(original)):
        for bit in range(8):
            data = bytearray(original)
            data[offset] ^= 1 << bit
            path.write_bytes(bytes(data))
            try:
                assert read() == before, f"{ref}: flipping bit {bit} of byte {offset} went unnoticed"
            except DeltastoreError:
                caught += 1
    path.write_bytes(original)
    assert caught == 8 * len(original)  # every single flip is caught


@pytest.mark.parametrize("part", ["zarr.json", "chunk"])
def test_every_byte_flip_of_an_array_is_caught(reg, part):
    """Flip one bit of each byte of a small array's zarr.json or chunk: get_array raises a
    deltastore error or returns the exact array (its hash is checked), never anything else."""
    _, record = reg.version("t2", 1)
    digest = record.pack  # the small tensors of the version, packed
    path = reg.path / (_metadata(digest) if part == "zarr.json" else _chunks(reg, digest)[0])
    original = path.read_bytes()
    good = reg.objects.get_array(digest)
    caught = 0
    for offset in range(len(original)):
        data = bytearray(original)
        data[offset] ^= 0x04
        path.write_bytes(bytes(data))
        try:
            assert bool((reg.objects.get_array(digest) == good).all())
        except DeltastoreError:
            caught += 1
    path.write_bytes(original)
    assert caught > 0


def test_verify_reports_every_problem_in_one_pass(reg_anywhere, tiny):
    """Six kinds of damage at once: verify lists all of them; the CLI exits 4 with JSON."""
    reg = reg_anywhere
    reference = reg.reference()
    t1 = _t1_array(reg)
    t1_scale = _t1_array(reg, "rows")
    ref_array = reference.tensors["lin.weight"].arrays["data"]
    t2_digest, t2 = reg.version("t2", 2)
    base_digest, _ = reg.base("b1")
    DAMAGE["chunk bit flip"](reg, t1)
    DAMAGE["chunk missing"](reg, t1_scale)
    DAMAGE["zarr.json shape changed"](reg, ref_array)
    _flip(reg, object_key("blobs", t2.files["config.json"]), 1)
    _flip(reg, object_key("records", base_digest), 30)
    reg.backend.put("refs/tasks/t1", b"\xc1 garbage")
    expected = {object_key("arrays", t1), object_key("arrays", t1_scale), object_key("arrays", ref_array),
                object_key("blobs", t2.files["config.json"]), object_key("records", base_digest), "refs/tasks/t1"}
    found = {p["object"] for p in reg.verify()}
    # t1's arrays are unreferenced once refs/tasks/t1 is unreadable: still checked, still reported
    assert found == expected
    result = CliRunner().invoke(cli, ["verify", "--json", str(reg.path)], obj={})
    assert result.exit_code == 4, result.output
    report = json.loads(result.output)
    assert report["ok"] is False and {p["object"] for p in report["problems"]} == expected
    assert all(set(p) == {"object", "problem", "used_by"} for p in report["problems"])
    # materialize of an undamaged... every task here touches damage: each names what is wrong
    with pytest.raises(CorruptObjectError, match="refs/tasks/t1"):
        reg.materialize("t1")
    with pytest.raises(CorruptObjectError, match=ref_array[:12]):
        reg.materialize("t2")


def test_registry_info_damage(reg):
    (reg.path / "registry.msgpack").write_bytes(b"\x92\x01")
    with pytest.raises(CorruptObjectError, match="registry.msgpack"):
        Registry(reg.path)
    result = CliRunner().invoke(cli, ["ls", str(reg.path)], obj={})
    assert result.exit_code == 4 and "registry.msgpack" in result.output


def test_fast_mode_skips_hashes_but_decodes(reg_anywhere):
    """verify=False (--no-verify) is the documented fast mode: it trusts chunk bytes, so a
    flipped bit in an uncompressed chunk can go unnoticed; the default never lets it."""
    reg = reg_anywhere
    good = state_hash(reg.materialize("t1"))
    assert state_hash(reg.materialize("t1", verify=False)) == good
    digest = _t1_array(reg)  # uint8 signs: stored uncompressed, a flip still decodes
    _flip(reg, _chunks(reg, digest)[0], 0)
    with pytest.raises(CorruptObjectError):
        reg.materialize("t1")
    assert state_hash(reg.materialize("t1", verify=False)) != good
