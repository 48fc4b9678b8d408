"""The array layout's read path (storage/layout.py, storage/objects.py) against what zarr writes.

Reads bypass zarr (chunks are decoded with zstandard in the caller's threads), so these tests
hold the reader to every layout the writer produces: many chunks with a padded last one, 0-d
and empty arrays, compressed or not, every data type.
"""

import json

import pytest
import torch

from deltastore.errors import CorruptObjectError
from deltastore.storage import layout, objects
from deltastore.storage.backend import LocalBackend
from deltastore.storage.objects import ObjectStore, array_hash, object_key


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setattr(layout, "CHUNK_BYTES", 64)  # many small chunks
    return ObjectStore(LocalBackend(tmp_path))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, torch.int64,
                                   torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (1,), (37,), (13, 5), (7, 3, 2)])
@pytest.mark.parametrize("compress", [True, False])
def test_round_trip(store, dtype, shape, compress):
    g = torch.Generator().manual_seed(0)
    value = (torch.randn(shape, generator=g) * 100).to(dtype) if shape else torch.tensor(7, dtype=dtype)
    digest = store.put_array(value, store.new_txn(), compress=compress)
    back = store.get_array(digest)
    assert back.dtype == dtype and tuple(back.shape) == shape
    assert torch.equal(back, value)


def test_padded_last_chunk_is_cut(store):
    value = torch.arange(37 * 3, dtype=torch.int32).reshape(37, 3)  # 5 rows per 64-byte chunk: 8 chunks
    digest = store.put_array(value, store.new_txn())
    reader = store.open_array(digest)
    assert len(reader.chunks) == 8 and reader.chunks[-1][2] == 2 * 3 * 4
    assert torch.equal(store.get_array(digest), value)


def test_chunks_must_be_read_in_order(store):
    digest = store.put_array(torch.arange(100, dtype=torch.int32), store.new_txn())
    reader = store.open_array(digest)
    with pytest.raises(ValueError, match="out of order"):
        reader.read_chunk(1, memoryview(bytearray(reader.chunks[1][2])))
    with pytest.raises(ValueError, match="chunks read"):
        reader.finish()


def test_one_buffer_reused_after_each_hash(store, monkeypatch):
    """Multi-chunk arrays are hashed behind the read: a caller that reuses one buffer (as the
    pinned staging pool does) waits for each chunk's future, and the check still holds."""
    value = torch.arange(200, dtype=torch.int32)  # 13 chunks of 64 bytes
    digest = store.put_array(value, store.new_txn(), compress=False)
    monkeypatch.setattr(objects, "HASH_BEHIND_MIN_BYTES", 0)
    reader = store.open_array(digest)
    buffer, out = bytearray(64), []
    for index, (_, _, nbytes) in enumerate(reader.chunks):
        hashed = reader.read_chunk(index, memoryview(buffer)[:nbytes])
        hashed.result()
        out.append(bytes(buffer[:nbytes]))
    reader.finish()
    assert torch.equal(torch.frombuffer(bytearray(b"".join(out)), dtype=torch.int32), value)


def _flip_a_bit(store, digest: str, chunk: str, offset: int) -> None:
    """Damage an uncompressed array's chunk file without changing its size."""
    path = store.backend.root / object_key("arrays", digest) / chunk
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("behind", [True, False])
def test_damage_in_a_middle_chunk_is_found(store, monkeypatch, behind):
    monkeypatch.setattr(objects, "HASH_BEHIND_MIN_BYTES", 0 if behind else 1 << 40)
    value = torch.arange(200, dtype=torch.int32)
    digest = store.put_array(value, store.new_txn(), compress=False)
    _flip_a_bit(store, digest, "6", 5)
    with pytest.raises(CorruptObjectError, match="content hash"):
        store.get_array(digest)


def _meta_path(store, digest):
    return store.backend.root / object_key("arrays", digest) / "zarr.json"


def test_big_endian_is_refused(store):
    digest = store.put_array(torch.arange(10, dtype=torch.int32), store.new_txn())
    path = _meta_path(store, digest)
    meta = json.loads(path.read_text())
    meta["codecs"][0]["configuration"]["endian"] = "big"
    path.write_text(json.dumps(meta))
    with pytest.raises(CorruptObjectError, match="little-endian"):
        store.get_array(digest)


def test_frame_of_another_size_is_refused(store):
    digest = store.put_array(torch.arange(32, dtype=torch.int32), store.new_txn())
    chunk = store.backend.root / object_key("arrays", digest) / "1"
    import zstandard

    chunk.write_bytes(zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * 32))
    with pytest.raises(CorruptObjectError, match="declares 32 decompressed size, expected 64"):
        store.get_array(digest)


def test_hash_mismatch_found_after_last_chunk(store):
    value = torch.arange(32, dtype=torch.int32)
    digest = store.put_array(value, store.new_txn(), compress=False)
    _flip_a_bit(store, digest, "0", 0)
    assert array_hash(store.get_array(digest, verify=False).numpy()) != digest
    with pytest.raises(CorruptObjectError, match="content hash"):
        store.get_array(digest)


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_chunk_that_is_not_a_file_is_refused_without_blocking(store, kind):
    import os
    import signal

    digest = store.put_array(torch.arange(32, dtype=torch.int32), store.new_txn())
    chunk = store.backend.root / object_key("arrays", digest) / "0"
    chunk.unlink()
    if kind == "fifo":
        os.mkfifo(chunk)  # opening it for reading would wait for a writer forever
    elif kind == "device":
        chunk.symlink_to("/dev/zero")
    else:
        chunk.mkdir()
    signal.alarm(20)  # a regression hangs: fail instead
    try:
        with pytest.raises(CorruptObjectError, match="not a regular file"):
            store.get_array(digest)
    finally:
        signal.alarm(0)
