"""ObjectStoreBackend (storage/objectstore.py) against real servers on loopback, each test on
each of them (the ``store_env`` fixture of tests/conftest.py): an S3-compatible one (SeaweedFS,
tests/storage/s3_server.py) and Azure Blob (Azurite, tests/storage/azurite_server.py). The
protocol's conformance tests, the servers' conditional writes under concurrency, and the probe
that refuses a store without them."""

from __future__ import annotations

import threading
import uuid

import pytest

from deltastore.errors import ConditionalWritesError
from deltastore.storage.objectstore import ObjectStoreBackend

from .conformance import BackendTests


@pytest.fixture
def url(store_env):
    """A key prefix of its own for each test: tests share the bucket, never a key."""
    return store_env.url(f"test-{uuid.uuid4().hex}")


class TestObjectStoreBackend(BackendTests):
    @pytest.fixture
    def backend(self, url):
        return ObjectStoreBackend(url)


def test_keys_live_under_the_registry_prefix(url, store_env):
    """Key ``k`` of the registry at ``s3://bucket/p`` is the object ``p/k``; the probe at open
    leaves nothing behind."""
    backend = ObjectStoreBackend(url)
    backend.put("refs/tasks/qa", b"v")
    bucket = ObjectStoreBackend(store_env.url())
    prefix = url.rpartition("/")[2]
    assert bucket.list(prefix) == [f"{prefix}/refs/tasks/qa"]
    assert backend.list("") == ["refs/tasks/qa"]


def test_an_update_token_carrying_a_version_updates_as_its_etag_alone(url):
    """A token is the ETag and, where the store gives one, the object's version (GCS's
    generation, which its conditional put compares). S3 and Azure compare the ETag only: a
    version beside the current ETag still updates, beside a stale ETag still is refused."""
    from deltastore.storage.objectstore import _token

    assert _token({"e_tag": '"e"', "version": None}) == '"e"'
    assert _token({"e_tag": '"e"', "version": "1700000000000001"}) == '"e" 1700000000000001'
    assert _token({"e_tag": None, "version": "7"}) is None
    backend = ObjectStoreBackend(url)
    backend.put("refs/tasks/qa", b"1")
    _, token = backend.get_versioned("refs/tasks/qa")
    assert backend.put_if_version("refs/tasks/qa", b"2", f"{token.partition(' ')[0]} 1700000000000001")
    assert not backend.put_if_version("refs/tasks/qa", b"3", f"{token.partition(' ')[0]} 1700000000000001")
    assert backend.get("refs/tasks/qa") == b"2"


def _race(n: int, work) -> list:
    """Run ``work(i)`` in ``n`` threads released together (a barrier), return their results."""
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def run(i):
        barrier.wait()
        results[i] = work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_the_server_refuses_racing_create_only_puts(url):
    """SeaweedFS releases before 4.x accepted several concurrent ``If-None-Match: *`` puts of
    one key: every racer believed it had created it. The version we install must let exactly
    one win, on every one of several keys. (SeaweedFS 4.48 holds some losers of such a race
    for 1 to 5 s before refusing them, so the race is kept small.)"""
    backend = ObjectStoreBackend(url)
    for round_ in range(3):
        key = f"refs/tasks/race-{round_}"
        won = _race(8, lambda i: backend.put_if_absent(key, b"writer %d" % i))
        assert won.count(True) == 1, (key, won)
        assert backend.get(key) == b"writer %d" % won.index(True)


def test_the_server_loses_no_compare_and_swap_update(url):
    """Racing ``If-Match`` updates of one key: each either lands on the version it read or is
    refused, so retried increments all count (a server accepting a stale ETag loses some)."""
    backend = ObjectStoreBackend(url)
    backend.put("refs/counter", b"0")

    def increment(_):
        conflicts = 0
        for _ in range(8):
            while True:
                data, token = backend.get_versioned("refs/counter")
                if backend.put_if_version("refs/counter", b"%d" % (int(data) + 1), token):
                    break
                conflicts += 1
        return conflicts

    conflicts = _race(8, increment)
    assert backend.get("refs/counter") == b"64"
    assert sum(conflicts) > 0  # they did race: the test would prove nothing otherwise


@pytest.mark.parametrize("ignored", ["create", "if-match"])
def test_a_store_ignoring_conditional_writes_is_refused_at_open(url, monkeypatch, ignored):
    """The probe at open, against the real server made to behave like one that ignores a
    conditional header: obstore's put is wrapped to drop the ``mode`` it would send, as an
    S3-compatible server that does not implement If-None-Match or If-Match would."""
    import obstore

    from deltastore.errors import DeltastoreError
    from deltastore.storage import objectstore

    real_put = obstore.put

    def put_dropping_mode(store, key, data, *, mode=None, **kwargs):
        dropped = mode == "create" if ignored == "create" else isinstance(mode, dict)
        return real_put(store, key, data, mode=None if dropped else mode, **kwargs)

    monkeypatch.setattr(objectstore.obstore, "put", put_dropping_mode)
    header = "If-None-Match" if ignored == "create" else "If-Match"
    with pytest.raises(ConditionalWritesError, match=f"{url}: the object store accepted .*{header}") as exc:
        ObjectStoreBackend(url)
    assert isinstance(exc.value, DeltastoreError)
    monkeypatch.setattr(objectstore.obstore, "put", real_put)
    assert ObjectStoreBackend(url).list("") == []  # the refused probe left nothing behind


def test_a_store_type_without_compare_and_swap_is_refused_at_open(tmp_path):
    """A real store type that lacks one of them: obstore's local filesystem (``file://``)
    creates create-only but cannot ``If-Match``. No server needed."""
    url = f"file://{tmp_path}"
    with pytest.raises(ConditionalWritesError, match=f"{url}: this kind of store cannot do conditional writes"):
        ObjectStoreBackend(url)
    assert list(tmp_path.iterdir()) == []  # the probe key was removed


def test_publish_writes_over_the_chunks_a_killed_publish_left(url):
    """A publish killed after copying chunks leaves them without zarr.json under the final
    name: that reads as absent, and the next publish of the same array completes it."""
    import numpy as np

    from deltastore.errors import NotFoundError
    from deltastore.storage.layout import read_layout, write_array

    backend = ObjectStoreBackend(url)
    data = np.arange(12, dtype=np.int32).reshape(3, 4)
    write_array(backend, "staging/t/arr", data, compress=True)
    backend.put("objects/arrays/ab/cd/0.0", backend.get("staging/t/arr/0.0"))  # the killed publish's remains
    with pytest.raises(NotFoundError, match="no zarr.json"):
        read_layout(backend, "objects/arrays/ab/cd")
    assert backend.publish("staging/t/arr", "objects/arrays/ab/cd") is True
    assert read_layout(backend, "objects/arrays/ab/cd").shape == (3, 4)
    assert backend.list("staging") == []


def test_delete_removes_an_arrays_metadata_first(url, monkeypatch):
    """No rename on an object store: a delete killed after its first request must leave
    chunks without zarr.json (absent), never zarr.json with chunks missing."""
    from deltastore.storage import objectstore

    backend = ObjectStoreBackend(url)
    for name in ("zarr.json", "0", "1"):
        backend.put(f"objects/arrays/ab/cd/{name}", b"x")
    requests = []
    real_delete = objectstore.obstore.delete
    monkeypatch.setattr(objectstore.obstore, "delete",
                        lambda store, paths: (requests.append(paths), real_delete(store, paths)))
    backend.delete("objects/arrays/ab/cd")
    assert [p.rpartition("/")[2] for p in requests[0]] == ["zarr.json"]
    assert backend.list("objects") == []


def test_a_prefix_emptied_by_delete_is_no_child(url):
    """SeaweedFS keeps listing a folder emptied by a delete (for over 30 s): children() must
    not, or gc and verify would take ``objects/arrays/ab/cd`` for an array that is missing."""
    backend = ObjectStoreBackend(url)
    backend.put("objects/arrays/ab/cd/zarr.json", b"{}")
    backend.put("objects/arrays/ab/cd/0", b"chunk")
    backend.put("objects/arrays/ab/ef/zarr.json", b"{}")
    backend.put("refs/tasks/a", b"v")
    backend.delete("objects/arrays/ab/cd")
    backend.delete("refs/tasks/a")
    assert backend.children("objects/arrays/ab") == ["ef"]
    assert backend.children("refs") == [] and backend.children("") == ["objects"]
    assert not backend.prefix_exists("refs") and not backend.exists("objects/arrays/ab/cd")


def test_every_request_is_counted_by_kind_on_its_own_backend(url):
    """Reads and writes alike, each on the backend that sent it, not on another one."""
    from collections import Counter

    backend, other = ObjectStoreBackend(url, check_writes=False), ObjectStoreBackend(url, check_writes=False)
    for i in range(3):
        backend.put(f"k/{i}", b"x")
    backend.get("k/0")
    backend.fetch("k/1", limit=1).result()
    assert backend.list("k") == ["k/0", "k/1", "k/2"] and backend.exists("k/2")
    assert backend.requests == Counter({"put": 3, "get": 2, "list": 1, "head": 1})
    assert other.get("k/0") == b"x" and other.requests == Counter({"get": 1})
