"""What every :class:`~deltastore.storage.protocol.Backend` must do, as tests (in the manner of
zarr-python's ``StoreTests``).

A backend's test module subclasses :class:`BackendTests` and provides the ``backend`` fixture
(an empty registry's backend); every test here then runs against it. Only protocol operations
are used, so an object-store backend passes or fails on the same semantics as the local one.
Backend-specific properties (a fifo, a symlink, a folder replaced by a file) are tested in
the backend's own module.
"""

from __future__ import annotations

import inspect
import threading
import time

import numpy as np
import pytest

from deltastore.errors import CorruptObjectError, NotFoundError
from deltastore.storage.layout import read_chunk, read_layout, write_array
from deltastore.storage.protocol import Backend


class BackendTests:
    """Subclass it and define a ``backend`` fixture returning an empty backend."""

    @pytest.fixture
    def backend(self) -> Backend:
        raise NotImplementedError("a backend's tests define the 'backend' fixture")

    def test_has_every_protocol_operation(self, backend):
        """Structural check (the protocol is not an ABC): same operations, same parameters."""
        for name, member in vars(Backend).items():
            if name.startswith("_") or not callable(member):
                continue
            assert list(inspect.signature(getattr(backend, name)).parameters) == \
                list(inspect.signature(member).parameters)[1:], name
        assert str(backend.root)

    # -- whole keys -------------------------------------------------------------------------
    def test_put_then_get(self, backend):
        backend.put("refs/tasks/qa", b"one")
        assert backend.get("refs/tasks/qa") == b"one"
        assert backend.exists("refs/tasks/qa") and backend.size("refs/tasks/qa") == 3

    def test_put_replaces_whole(self, backend):
        backend.put("k", b"a much longer first value")
        backend.put("k", b"short")
        assert backend.get("k") == b"short" and backend.size("k") == 5

    def test_empty_value(self, backend):
        backend.put("k", b"")
        assert backend.exists("k") and backend.get("k") == b"" and backend.size("k") == 0

    def test_missing_key_is_not_found_and_named(self, backend):
        with pytest.raises(NotFoundError, match="refs/tasks/nope"):
            backend.get("refs/tasks/nope")
        with pytest.raises(NotFoundError, match="refs/tasks/nope"):
            backend.get_into("refs/tasks/nope", memoryview(bytearray(4)))
        assert not backend.exists("refs/tasks/nope") and backend.size("refs/tasks/nope") == 0

    def test_get_refuses_more_than_limit(self, backend):
        backend.put("k", b"x" * 100)
        assert backend.get("k", limit=100) == b"x" * 100
        with pytest.raises(CorruptObjectError, match="100 bytes, more than the 99"):
            backend.get("k", limit=99)

    def test_readers_see_old_or_new_never_a_mix(self, backend):
        """put is atomic: a reader racing many overwrites sees only complete values."""
        values = [bytes([i]) * 200_000 for i in range(1, 6)]
        backend.put("k", values[0])
        seen, done = set(), threading.Event()

        def read():
            while not done.is_set():
                seen.add(backend.get("k"))

        reader = threading.Thread(target=read)
        reader.start()
        try:
            for value in values * 4:
                backend.put("k", value)
        finally:
            done.set()
            reader.join()
        assert seen <= set(values)

    # -- ranged reads -----------------------------------------------------------------------
    def test_get_into_reads_a_range(self, backend):
        backend.put("k", bytes(range(100)))
        out = bytearray(10)
        assert backend.get_into("k", memoryview(out), start=20) == 10 and out == bytes(range(20, 30))
        whole = bytearray(100)
        assert backend.get_into("k", memoryview(whole)) == 100 and whole == bytes(range(100))

    def test_get_into_stops_at_the_end_of_the_key(self, backend):
        backend.put("k", bytes(range(100)))
        out = bytearray(16)
        assert backend.get_into("k", memoryview(out), start=90) == 10 and out[:10] == bytes(range(90, 100))
        assert backend.get_into("k", memoryview(out), start=100) == 0

    def test_fetch_reads_the_head_of_a_key_ahead_or_declines(self, backend):
        """A future of (the first ``limit`` bytes, the whole key's size); None from a backend
        that reads in place, which then must not be asked again."""
        backend.put("k", bytes(range(100)))
        backend.put("empty", b"")
        fetched = backend.fetch("k", limit=10)
        if fetched is None:
            return
        data, size = fetched.result()
        assert bytes(data) == bytes(range(10)) and size == 100
        data, size = backend.fetch("k", limit=1000).result()
        assert bytes(data) == bytes(range(100)) and size == 100
        data, size = backend.fetch("empty", limit=10).result()
        assert bytes(data) == b"" and size == 0
        with pytest.raises(NotFoundError, match="refs/tasks/nope"):
            backend.fetch("refs/tasks/nope", limit=10).result()

    # -- create-only ------------------------------------------------------------------------
    def test_put_if_absent_writes_once(self, backend):
        assert backend.put_if_absent("refs/bases/b", b"first") is True
        assert backend.put_if_absent("refs/bases/b", b"second") is False
        assert backend.get("refs/bases/b") == b"first"

    def test_put_if_absent_has_one_winner(self, backend):
        results: list[bool] = []
        threads = [threading.Thread(target=lambda i=i: results.append(backend.put_if_absent("k", b"%d" % i)))
                   for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [False] * 7 + [True]
        assert backend.get("k") in {b"%d" % i for i in range(8)}
        assert backend.list("") == ["k"]  # no temporary debris

    # -- compare-and-swap -------------------------------------------------------------------
    def test_versioned_read_of_a_missing_key(self, backend):
        assert backend.get_versioned("refs/tasks/qa") == (None, None)

    def test_put_if_version_creates_only_when_absent(self, backend):
        assert backend.put_if_version("k", b"one", None) is True
        assert backend.put_if_version("k", b"two", None) is False
        assert backend.get("k") == b"one"

    def test_put_if_version_swaps_on_a_current_token(self, backend):
        backend.put("k", b"one")
        data, token = backend.get_versioned("k")
        assert data == b"one" and token is not None
        assert backend.put_if_version("k", b"two", token) is True
        assert backend.get("k") == b"two"
        assert backend.get_versioned("k")[1] != token

    def test_put_if_version_refuses_a_stale_token(self, backend):
        backend.put("k", b"one")
        _, token = backend.get_versioned("k")
        backend.put("k", b"two")  # another writer got there first
        assert backend.put_if_version("k", b"three", token) is False
        assert backend.get("k") == b"two"

    def test_put_if_version_loses_no_update(self, backend):
        """Concurrent read-modify-writes retried on conflict: every increment lands."""
        backend.put("counter", b"0")

        def increment():
            for _ in range(10):
                while True:
                    data, token = backend.get_versioned("counter")
                    if backend.put_if_version("counter", b"%d" % (int(data) + 1), token):
                        break

        threads = [threading.Thread(target=increment) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert backend.get("counter") == b"40"

    # -- listing ----------------------------------------------------------------------------
    def test_list_and_children(self, backend):
        for key in ("refs/tasks/b", "refs/tasks/a", "refs/bases/x", "objects/records/ab/cd"):
            backend.put(key, b"v")
        assert backend.list("refs") == ["refs/bases/x", "refs/tasks/a", "refs/tasks/b"]
        assert backend.list("refs/tasks") == ["refs/tasks/a", "refs/tasks/b"]
        assert backend.children("refs") == ["bases", "tasks"]
        assert backend.children("refs/tasks") == ["a", "b"]
        assert backend.children("") == ["objects", "refs"]

    def test_listing_an_absent_prefix_is_empty(self, backend):
        assert backend.list("refs/tasks") == [] and backend.children("refs/tasks") == []
        assert not backend.prefix_exists("refs/tasks")
        backend.put("refs/tasks/a", b"v")
        assert backend.prefix_exists("refs/tasks") and backend.prefix_exists("refs")

    def test_size_of_a_prefix_sums_its_keys(self, backend):
        backend.put("staging/t/a", b"123")
        backend.put("staging/t/b/c", b"4567")
        assert backend.size("staging/t") == 7

    def test_modification_times(self, backend):
        """What gc's grace period and a writer's refresh stand on: each key's last write time,
        in seconds since the epoch (an object store keeps whole seconds, hence the margins),
        newer once the key is written again."""
        began = time.time()
        backend.put("objects/arrays/ab/cd/zarr.json", b"{}")
        backend.put("objects/arrays/ab/cd/0", b"chunk")
        backend.put("refs/tasks/a", b"v")
        listed = backend.list_modified("objects")
        assert [key for key, _ in listed] == ["objects/arrays/ab/cd/0", "objects/arrays/ab/cd/zarr.json"]
        assert all(began - 2 <= when <= time.time() + 2 for _, when in listed)
        assert backend.modified("objects/arrays/ab/cd") == max(when for _, when in listed)
        first = backend.modified("refs/tasks/a")
        assert began - 2 <= first <= time.time() + 2
        assert backend.modified("refs/tasks/nope") is None and backend.list_modified("refs/tasks/nope") == []
        time.sleep(1.1)
        backend.put("refs/tasks/a", b"v")
        assert backend.modified("refs/tasks/a") > first

    # -- publish and delete -----------------------------------------------------------------
    def test_publish_moves_a_staged_key(self, backend):
        backend.put("staging/t/obj", b"data")
        assert backend.publish("staging/t/obj", "objects/blobs/ab/cd") is True
        assert backend.get("objects/blobs/ab/cd") == b"data" and not backend.exists("staging/t/obj")

    def test_publish_keeps_an_existing_final_key(self, backend):
        backend.put("objects/blobs/ab/cd", b"data")
        backend.put("staging/t/obj", b"data")
        assert backend.publish("staging/t/obj", "objects/blobs/ab/cd") is False
        assert backend.get("objects/blobs/ab/cd") == b"data" and not backend.exists("staging/t/obj")

    def test_publish_moves_a_staged_prefix_whole(self, backend):
        backend.put("staging/t/arr/zarr.json", b"{}")
        backend.put("staging/t/arr/0", b"chunk")
        assert backend.publish("staging/t/arr", "objects/arrays/ab/cd") is True
        assert backend.list("objects") == ["objects/arrays/ab/cd/0", "objects/arrays/ab/cd/zarr.json"]
        assert not backend.exists("staging/t/arr")

    def test_delete_a_key_and_a_prefix(self, backend):
        backend.put("refs/tasks/a", b"v")
        backend.put("objects/arrays/ab/cd/zarr.json", b"{}")
        backend.put("objects/arrays/ab/cd/0", b"chunk")
        backend.delete("refs/tasks/a")
        backend.delete("objects/arrays/ab/cd")
        assert not backend.exists("refs/tasks/a") and not backend.exists("objects/arrays/ab/cd")
        assert backend.list("objects") == [] and backend.list("refs") == []

    def test_delete_of_a_missing_key_is_fine(self, backend):
        backend.delete("refs/tasks/nope")
        backend.delete("objects/arrays/nope")

    # -- arrays through the backend's zarr store ---------------------------------------------
    @pytest.mark.parametrize("compress", [True, False])
    def test_array_round_trip(self, backend, compress):
        data = np.arange(3 * 5, dtype=np.int32).reshape(3, 5)
        write_array(backend, "staging/t/arr", data, compress=compress)
        assert backend.publish("staging/t/arr", "objects/arrays/ab/cd") is True
        layout = read_layout(backend, "objects/arrays/ab/cd")
        out = np.empty_like(data)
        flat = memoryview(out.reshape(-1).view(np.uint8))
        for index, (_, offset, nbytes) in enumerate(layout.chunks()):
            read_chunk(backend, layout, index, flat[offset:offset + nbytes])
        assert (out == data).all()

    @pytest.mark.parametrize("compress", [True, False])
    def test_an_array_of_many_chunks_reads_back_whole_and_hashed(self, backend, compress, monkeypatch):
        """Through ObjectStore, which reads chunk files ahead where the backend fetches: every
        chunk in its place (the last one short), the content hash checked."""
        import torch

        from deltastore.errors import CorruptObjectError
        from deltastore.storage import layout
        from deltastore.storage.objects import ObjectStore

        monkeypatch.setattr(layout, "CHUNK_BYTES", 1024)  # 20 chunks of 1 KiB, the last half full
        data = torch.arange(39 * 128, dtype=torch.int32).reshape(39 * 4, 32)
        objects = ObjectStore(backend)
        digest = objects.put_array(data, objects.new_txn(), compress=compress)
        stored = objects.open_array(digest).layout
        assert stored.n_chunks == 20
        assert torch.equal(objects.get_array(digest), data)
        # Chunk 17 swapped for chunk 18: right size, wrong place.
        backend.put(layout.chunk_key(stored, 17), backend.get(layout.chunk_key(stored, 18)))
        with pytest.raises(CorruptObjectError, match=digest[:12]):
            objects.get_array(digest)
