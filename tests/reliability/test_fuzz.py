"""Fuzzing the metadata parsers: any bytes given to the record parser, and any zarr.json
or chunk given to the array reader, give a result or a deltastore error, never another
exception, never a hang (hypothesis' deadline). Inputs that once broke them are kept in
corpus/ and replayed by test_corpus.

Corpus files: ``record-*.msgpack`` (raw record bytes, tried as every record class),
``zarr-*.json`` (an array's zarr.json, tried with a valid one-chunk array around it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltastore import DeltastoreError
from deltastore.storage.backend import LocalBackend
from deltastore.storage.objects import ObjectStore, object_key
from deltastore.storage.records import (BaseRecord, PointerRef, ReferenceRecord, RegistryInfo, TaskRef,
                                        TaskVersion, TensorEntry, pack, unpack)

CORPUS = Path(__file__).parent / "corpus"
RECORD_CLASSES = [RegistryInfo, ReferenceRecord, BaseRecord, TaskVersion, TaskRef, PointerRef, TensorEntry]
FUZZ = settings(max_examples=120, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])

H = "ab" * 32
ENTRY = {"shape": [4, 8], "dtype": "float32", "codec": "bitdelta", "config": {}, "arrays": {"signs": H},
         "attrs": {"scale": 0.5}, "ref": "w", "rows": H, "changed_rows": 2}
VALID = {
    RegistryInfo: {"format": 1, "kind": None, "name": "deltastore", "version": [1, 0], "created": "now"},
    ReferenceRecord: {"format": 1, "kind": "reference", "created": "now", "tensors": {"w": ENTRY},
                      "files": {"config.json": H}},
    BaseRecord: {"format": 1, "kind": "base", "name": "b", "created": "now", "reference": H, "sources": ["x"],
                 "tensors": {"w": ENTRY}},
    TaskVersion: {"format": 1, "kind": "task_version", "task": "t", "version": 1, "parent": None, "created": "now",
                  "message": "", "reference": H, "base": None, "method": "bitdelta", "config": {}, "lam1": 0.0,
                  "lam2": 1.0, "tuning": None, "tensors": {"w": ENTRY}, "files": {}, "source": {}},
    TaskRef: {"format": 1, "kind": "task_ref", "versions": [[1, H], [2, H]]},
    PointerRef: {"format": 1, "kind": "pointer", "record": H},
    TensorEntry: ENTRY,
}
VALID[RegistryInfo].pop("kind")

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
           | st.floats(allow_nan=True) | st.text(max_size=20) | st.binary(max_size=20))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8) | st.binary(max_size=4), inner, max_size=4),
                      max_leaves=20)


def _mutations(valid: dict):
    """A valid record with some fields removed, replaced by junk, or junk fields added."""
    keys = sorted(valid)
    return st.builds(
        lambda drop, repl, extra: {**{k: v for k, v in valid.items() if k not in drop}, **repl, **extra},
        st.sets(st.sampled_from(keys), max_size=2),
        st.dictionaries(st.sampled_from(keys), values, max_size=3),
        st.dictionaries(st.text(max_size=6), values, max_size=2),
    )


def parse_record(data: bytes) -> None:
    """What reading a record does: unpack, then each class's strict from_dict."""
    for cls in RECORD_CLASSES:
        try:
            cls.from_dict(unpack(data, "fuzz"), "fuzz")
        except DeltastoreError:
            pass


@pytest.mark.parametrize("cls", RECORD_CLASSES, ids=lambda c: c.__name__)
def test_fuzz_record_fields(cls):
    @FUZZ
    @given(_mutations(VALID[cls]))
    def run(obj):
        try:
            data = msgpack.packb(obj, use_bin_type=True)
        except (OverflowError, ValueError, TypeError):
            return
        parse_record(data)

    run()


@FUZZ
@given(st.binary(max_size=300) | st.builds(lambda v: msgpack.packb(v, use_bin_type=True), values))
def test_fuzz_record_bytes(data):
    parse_record(data)


@FUZZ
@given(st.sampled_from(sorted(VALID, key=lambda c: c.__name__)), st.integers(0, 10**6), st.integers(0, 255))
def test_fuzz_record_byte_changes(cls, where, byte):
    data = bytearray(pack(VALID[cls]))
    data[where % len(data)] = byte
    parse_record(bytes(data))


@pytest.fixture(scope="module")
def record_store(tmp_path_factory):
    """A store holding one valid task version record (a zstd frame since format 1.3)."""
    store = ObjectStore(LocalBackend(tmp_path_factory.mktemp("fuzzrecords")))
    digest = store.put_record(TaskVersion.from_dict(dict(VALID[TaskVersion]), "fuzz"), store.new_txn())
    return store, digest, store.backend.get(object_key("records", digest))


@FUZZ
@given(st.binary(max_size=300).map(lambda b: b"\x28\xb5\x2f\xfd" + b) | st.tuples(st.integers(0, 10**6),
                                                                                 st.integers(0, 255)))
def test_fuzz_record_file(record_store, change):
    """Any stored record file, a zstd frame of junk or the valid one with a byte changed, reads
    back as the record it was or gives a deltastore error."""
    store, digest, original = record_store
    if isinstance(change, tuple):
        data = bytearray(original)
        data[change[0] % len(data)] = change[1]
        change = bytes(data)
    store.backend.put(object_key("records", digest), change)
    try:
        assert store.get_record(digest, TaskVersion) == TaskVersion.from_dict(dict(VALID[TaskVersion]), "fuzz")
    except DeltastoreError:
        pass
    finally:
        store.backend.put(object_key("records", digest), original)


# -- arrays -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def array_store(tmp_path_factory):
    """A store holding one valid array; each example rewrites its zarr.json or chunk."""
    root = tmp_path_factory.mktemp("fuzzstore")
    store = ObjectStore(LocalBackend(root))
    digest = store.put_array(torch.arange(24, dtype=torch.float32).reshape(4, 6), store.new_txn())
    folder = root / object_key("arrays", digest)
    return store, digest, folder, {p.relative_to(folder).as_posix(): p.read_bytes()
                                   for p in folder.rglob("*") if p.is_file()}


def read_array_with(array_store, zarr_json: bytes | None = None, chunk: bytes | None = None) -> None:
    store, digest, folder, original = array_store
    shutil.rmtree(folder)
    for rel, data in original.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel == "zarr.json" and zarr_json is not None:
            data = zarr_json
        elif rel != "zarr.json" and chunk is not None:
            data = chunk
        path.write_bytes(data)
    try:
        out = store.get_array(digest)
        assert torch.equal(out, torch.arange(24, dtype=torch.float32).reshape(4, 6))
    except DeltastoreError:
        pass


def _zarr_meta(array_store) -> dict:
    return json.loads(array_store[3]["zarr.json"])


json_values = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=4), max_leaves=15)
shapes = st.lists(st.integers(-2, 10**16), max_size=5)


def test_fuzz_zarr_json(array_store):
    meta = _zarr_meta(array_store)
    keys = sorted(meta)

    @FUZZ
    @given(st.dictionaries(st.sampled_from(keys), json_values | shapes, max_size=3),
           st.sets(st.sampled_from(keys), max_size=2), shapes)
    def run(replace, drop, shape):
        new = {k: v for k, v in {**meta, **replace}.items() if k not in drop}
        if "shape" in replace:
            new["chunk_grid"] = {"name": "regular", "configuration": {"chunk_shape": shape}}
        read_array_with(array_store, zarr_json=json.dumps(new).encode())

    run()


@FUZZ
@given(st.binary(max_size=200) | st.integers(0, 500).map(lambda n: b"\x00" * n))
def test_fuzz_zarr_json_bytes(array_store, raw):
    read_array_with(array_store, zarr_json=raw)


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_chunk_bytes(array_store, raw):
    read_array_with(array_store, chunk=raw)


# -- corpus -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(CORPUS.glob("*")), ids=lambda p: p.name)
def test_corpus(array_store, path):
    """Every corpus file is hostile: each record class and the array reader refuse it."""
    if path.name.startswith("record-"):
        for cls in RECORD_CLASSES:
            with pytest.raises(DeltastoreError):
                cls.from_dict(unpack(path.read_bytes(), path.name), path.name)
    elif path.name.startswith("zarr-"):
        store, digest, *_ = array_store
        read_array_with(array_store, zarr_json=path.read_bytes())
        with pytest.raises(DeltastoreError, match="zarr.json"):
            store.get_array(digest)
    elif path.name.startswith("chunk-"):
        read_array_with(array_store, chunk=path.read_bytes())
    else:
        pytest.fail(f"unknown corpus file {path.name}")
