"""A registry on an object store, by URL (``s3://bucket/prefix``, endpoint and credentials from
the environment), against the test S3 server (SeaweedFS on loopback, the ``s3`` fixture): a
local registry copied into the bucket lists, shows and materializes the same as the local one,
with one request per key read (chunk files requested ahead, together) and none for an array the
read-through cache holds; init, commit, rm, base build and rm, gc and copy write to it without
a lock (compare-and-swap of refs, gc's grace period: specs/format.md §9.2)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from deltastore import Registry
from deltastore.catalog import Catalog
from deltastore.errors import (AlreadyExistsError, ConditionalWritesError, CorruptObjectError, GraceExceededError,
                               InvalidInputError, NotFoundError)
from deltastore.storage import layout
from deltastore.storage.backend import LocalBackend
from deltastore.storage.objectstore import ObjectStoreBackend
from deltastore.storage.objects import ObjectStore, object_key
from deltastore.storage.writes import CLOCK_SLACK_S, GC_LEASE_PREFIX, GRACE_VARIABLE
from deltastore_cli.main import cli


@pytest.fixture(scope="module")
def local(base_registry, example, tmp_path_factory, one_thread):
    """A local registry with a task ``qa`` of two versions (module-scoped: committing costs seconds)."""
    import shutil

    path = tmp_path_factory.mktemp("objectstore") / "registry"
    shutil.copytree(base_registry.path, path)
    reg = Registry(path)
    finetunes = list(example.finetunes.values())
    reg.commit("qa", finetunes[0], base="all", progress=False)
    reg.commit("qa", finetunes[1], base="all", progress=False)
    return reg


@pytest.fixture
def url(local, s3_env):
    """The local registry copied key by key into a prefix of its own in the test bucket."""
    url = f"s3://{s3_env.bucket}/registry-{uuid.uuid4().hex}"
    bucket = ObjectStoreBackend(url)
    for file in sorted(p for p in local.path.rglob("*") if p.is_file()):
        key = file.relative_to(local.path).as_posix()
        if not key.startswith("locks/"):  # local locks are no part of the registry's content
            bucket.put(key, file.read_bytes())
    return url


def test_the_catalog_reads_a_registry_in_a_bucket(local, url):
    remote = Catalog(url)
    assert remote.tasks() == Catalog(local.path).tasks() == ["qa"]
    assert remote.bases() == ["all"]
    assert remote.version_hashes("qa") == local.version_hashes("qa")
    assert remote.log("qa") == local.log("qa")


def test_materialize_from_a_bucket_equals_from_the_local_folder(local, url):
    remote = Registry(url)
    for version in (1, 2):
        got, want = remote.materialize("qa", version), local.materialize("qa", version)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[name], want[name]) for name in want)


def test_the_cli_takes_a_url(local, url):
    listing = CliRunner().invoke(cli, ["ls", url, "--json"], catch_exceptions=False)
    assert listing.exit_code == 0, listing.output
    remote = json.loads(listing.output)
    here = json.loads(CliRunner().invoke(cli, ["ls", str(local.path), "--json"]).output)
    assert remote.pop("registry") == url and here.pop("registry") == str(local.path)
    assert remote == here
    shown = CliRunner().invoke(cli, ["show", url, "qa@1"])
    assert shown.exit_code == 0 and "qa" in shown.output


def _bucket_url(s3_env) -> str:
    """A fresh prefix of the test bucket, its conditional writes probed."""
    url = f"s3://{s3_env.bucket}/registry-{uuid.uuid4().hex}"
    ObjectStoreBackend(url)
    return url


def test_init_into_a_missing_bucket_says_so(example, s3_env):
    with pytest.raises(NotFoundError, match="the bucket does not exist; create it first"):
        Registry.init(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/registry", example.reference, progress=False)


def test_a_registry_is_created_and_written_in_a_bucket(example, s3_env, monkeypatch):
    """init, base build, commit, rm, base rm and gc on s3://, each read back; the registry verifies."""
    url = _bucket_url(s3_env)
    remote = Registry.init(url, example.reference, progress=False)
    finetunes = list(example.finetunes.values())
    remote.build_base("all", finetunes[:2], progress=False)
    first = remote.commit("qa", finetunes[0], base="all", message="one", progress=False)
    second = remote.commit("qa", finetunes[1], message="two", progress=False)
    assert (first.version, second.version) == (1, 2) and second.parent == remote.version("qa", 1)[0]
    assert [r.message for r in remote.log("qa")] == ["two", "one"]
    assert Registry(url).materialize("qa", 1).keys() == remote.materialize("qa", 2).keys()
    with pytest.raises(InvalidInputError, match="used by qa@1"):
        remote.remove_base("all")
    assert remote.remove("qa@1") == [1]
    remote.remove_base("all")
    assert remote.verify() == []
    # Nothing is old enough for the default grace period (an hour): gc keeps it all.
    assert remote.gc()["records"] == 0
    time.sleep(1.0 + CLOCK_SLACK_S + 0.5)  # older than a grace of 1 s, by what gc allows clocks to differ
    monkeypatch.setenv(GRACE_VARIABLE, "1")  # what writers and gc of the registry agree on
    removed = Registry(url).gc()
    assert removed["records"] >= 2 and removed["arrays"] > 0 and removed["deferred"] == 0
    assert remote.verify() == [] and remote.commit("qa", finetunes[2], progress=False).version == 3
    keys = ObjectStoreBackend(url).list("")
    assert not [k for k in keys if k.startswith(("staging/", "locks/"))], keys


def test_init_refuses_a_used_prefix_and_gc_a_grace_shorter_than_the_writers(example, url, monkeypatch):
    """gc with a shorter grace period than writers work within could delete what a commit in
    flight is about to name: refused, before anything is deleted."""
    with pytest.raises(AlreadyExistsError, match="already exists"):
        Registry.init(url, example.reference)
    with pytest.raises(InvalidInputError, match=r"grace period 60 s is shorter than .* \(3600 s, DELTASTORE_GC_GRACE"):
        Registry(url).gc(grace=60)
    refused = CliRunner().invoke(cli, ["gc", url, "--grace", "0"])
    assert refused.exit_code == 1 and "is shorter than the one writers" in refused.output
    monkeypatch.setenv(GRACE_VARIABLE, "0")
    with pytest.raises(InvalidInputError, match="DELTASTORE_GC_GRACE='0': expected a number of seconds greater than 0"):
        Registry(url).gc()
    monkeypatch.setenv(GRACE_VARIABLE, "7200")
    assert Registry(url).gc()["records"] == 0  # a longer grace, set for writers and gc alike
    kept = CliRunner().invoke(cli, ["gc", url, "--json"])  # the default grace: everything here is younger
    assert kept.exit_code == 0 and json.loads(kept.output)["records"] == 0


def test_a_store_without_conditional_writes_is_refused_before_the_first_write(example, url, monkeypatch):
    """Opening to read needs no probe; the first write probes, and a store that accepts a
    second create-only put is refused before anything is written."""
    import obstore

    from deltastore.storage import objectstore

    remote = Registry(url)
    before = ObjectStoreBackend(url).list("")
    real_put = obstore.put
    monkeypatch.setattr(objectstore.obstore, "put", lambda store, key, data, *, mode=None, **kw: real_put(
        store, key, data, mode=None if mode == "create" else mode, **kw))
    with pytest.raises(ConditionalWritesError, match="If-None-Match"):
        remote.remove("qa", 1)
    monkeypatch.setattr(objectstore.obstore, "put", real_put)
    assert ObjectStoreBackend(url).list("") == before


def test_copy_into_a_bucket_and_back(local, s3_env, tmp_path):
    """copy SRC s3://...: only missing objects, hashes checked, refs last; copying again sends
    nothing; the bucket's registry copied back to a folder reads bit for bit the same."""
    url = _bucket_url(s3_env)
    first = local.copy_to(url, ["qa"], progress=False)
    assert first["refs"] == ["refs/reference", "refs/tasks/qa", "refs/bases/all"]
    assert local.copy_to(url, ["qa"], progress=False)["copied"] == {"arrays": 0, "blobs": 0, "records": 0}
    remote = Registry(url)
    assert remote.verify() == [] and remote.version_hashes("qa") == local.version_hashes("qa")
    back = remote.copy_to(tmp_path / "back", progress=False)
    assert back["skipped"] == {"arrays": 0, "blobs": 0, "records": 0}
    for version in (1, 2):
        got, want = Registry(tmp_path / "back").materialize("qa", version), local.materialize("qa", version)
        assert all(torch.equal(got[name], want[name]) for name in want)


# -- the grace-period protocol (specs/format.md §9.2 rule 5) ---------------------------------
@pytest.fixture(scope="module")
def bucket_copy(local, s3):
    """One bucket copy of ``local`` for the module (copying it costs seconds); the tests below
    add tasks of their own names to it, and leave ``qa`` as it is."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in s3.env.items():
            patch.setenv(name, value)
        url = _bucket_url(s3)
        local.copy_to(url, progress=False)
    return url


@pytest.fixture
def bucket_registry(bucket_copy, s3_env):
    """The bucket copy opened for writing (a Registry of its own: tests set its grace period),
    and its URL."""
    return Registry(bucket_copy), bucket_copy


def test_a_commit_refreshes_an_old_object_it_reuses(example, bucket_registry):
    """Re-committing a finetune reuses every object of its earlier version: older than half
    the grace period, each is written again (its Last-Modified moves), so a gc that started
    before cannot take it; younger ones are left alone."""
    remote, url = bucket_registry
    backend = ObjectStoreBackend(url, check_writes=False)
    _, record = remote.version("qa", 1)
    config, array = object_key("blobs", record.files["config.json"]), object_key("arrays", next(iter(
        record.array_hashes())))
    old = backend.modified(config), backend.modified(array)
    remote.writes.grace = 10.0  # objects older than 5 s are refreshed; 5 s to publish, even on a loaded machine
    time.sleep(5.1)
    remote.commit("again", list(example.finetunes.values())[0], base="all", progress=False)
    assert backend.modified(config) > old[0] and backend.modified(array) > old[1]
    fresh = backend.modified(config)
    remote.writes.grace = 3600.0
    remote.commit("again", list(example.finetunes.values())[0], base="all", progress=False)
    assert backend.modified(config) == fresh  # young enough: reused as it is


def test_a_write_past_half_the_grace_period_publishes_nothing(example, bucket_registry):
    remote, url = bucket_registry
    before = remote.version_hashes("qa")
    remote.writes.grace = 0.01
    with pytest.raises(GraceExceededError, match="more than half the gc grace period"):
        remote.commit("qa", list(example.finetunes.values())[2], progress=False)
    assert Registry(url).version_hashes("qa") == before


def test_a_commit_waits_for_a_gc_lease_taken_before_its_ref_update(example, bucket_registry):
    """A gc that may have listed the registry before the commit refreshed its objects holds a
    lease: the commit's ref update waits until the lease is gone."""
    remote, url = bucket_registry
    backend = ObjectStoreBackend(url, check_writes=False)
    backend.put(f"{GC_LEASE_PREFIX}test", repr(time.time() + 60).encode())  # a gc deleting for another minute
    threading.Timer(1.5, lambda: backend.delete(f"{GC_LEASE_PREFIX}test")).start()
    began = time.monotonic()
    remote.commit("waited", list(example.finetunes.values())[2], progress=False)
    assert time.monotonic() - began >= 1.5 and backend.modified(f"{GC_LEASE_PREFIX}test") is None


def _spy(backend, names: tuple[str, ...]) -> list[tuple[str, str]]:
    """``(operation, key)`` of every call of the backend's operations ``names``, in order."""
    calls: list[tuple[str, str]] = []
    for name in names:
        def spied(key, *args, _call=getattr(backend, name), _name=name, **kwargs):
            calls.append((_name, key))
            return _call(key, *args, **kwargs)
        setattr(backend, name, spied)
    return calls


def test_materialize_makes_one_request_per_key_read(local, url):
    """The same materialize from the local folder and from the bucket: every whole key and
    every chunk file read locally is one GET from the bucket, and nothing more is asked per
    chunk (no HEAD for its size, no listing): O(arrays + chunks) requests, sent ahead."""
    here = Registry(local.path)
    reads = _spy(here.backend, ("get", "get_into", "exists"))
    want = here.materialize("qa")
    remote = Registry(url)
    remote.backend.requests.clear()
    got = remote.materialize("qa")
    assert all(torch.equal(got[name], want[name]) for name in want)
    kinds = Counter(kind for kind, _ in reads)
    assert remote.backend.requests == Counter({"get": kinds["get"] + kinds["get_into"], "head": kinds["exists"]})
    assert kinds["get_into"] >= len(want)


def test_an_array_s_chunk_files_are_requested_together(url, monkeypatch):
    """Opening an array asks for its chunk files at once (up to the read-ahead window), before
    the first is read: the requests overlap instead of following one another."""
    monkeypatch.setattr(layout, "CHUNK_BYTES", 1 << 16)
    backend = ObjectStoreBackend(url)
    objects = ObjectStore(backend)
    data = torch.randn(6 << 14)  # 384 KiB: 6 chunk files of 64 KiB
    digest = objects.put_array(data, objects.new_txn(), compress=False)
    backend.requests.clear()
    reader = objects.open_array(digest)
    deadline = time.monotonic() + 10
    while backend.requests["get"] < 1 + 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert backend.requests == Counter({"get": 1 + 6})  # zarr.json, then every chunk, none read yet
    out = torch.empty_like(data)
    flat = memoryview(out.numpy().view("uint8"))
    for index, (_, offset, nbytes) in enumerate(reader.chunks):
        reader.read_chunk(index, flat[offset:offset + nbytes])
    reader.finish()
    assert torch.equal(out, data) and backend.requests == Counter({"get": 1 + 6})


def test_a_tensor_s_arrays_are_requested_together(url, tmp_path):
    """Opening several arrays at once (a tensor's, as materialize does) asks for every zarr.json,
    then every first chunk file, before any is read; each reads as when opened alone, and one
    left unread drops its half-filled copy in the read cache."""
    objects = ObjectStore(ObjectStoreBackend(url))
    data = [torch.randn(100 + i) for i in range(3)]
    digests = [objects.put_array(d, objects.new_txn()) for d in data]
    backend = ObjectStoreBackend(url, check_writes=False)
    cache = tmp_path / "cache"
    reading = ObjectStore(backend, LocalBackend(cache))
    fetched = _spy(backend, ("fetch", "get"))
    with reading.arrays_ahead([(d, "") for d in digests]):
        assert [op for op, _ in fetched] == ["fetch"] * 6  # 3 zarr.json, then 3 chunk files
        assert [key.rpartition("/")[2] for _, key in fetched] == ["zarr.json"] * 3 + ["0"] * 3
        assert torch.equal(reading.get_array(digests[0]), data[0])
        assert torch.equal(reading.get_array(digests[1]), data[1])
    assert len(fetched) == 6  # the arrays opened ahead were read, not opened again
    assert reading.cached(digests[0]) and reading.cached(digests[1]) and not reading.cached(digests[2])
    assert not list((cache / "staging").glob("*"))  # the unread one's copy was dropped
    assert torch.equal(reading.get_array(digests[2]), data[2])


def test_a_second_materialize_through_the_cache_requests_no_array(local, url, tmp_path):
    """The first materialize fills the cache; the second reads every array from it, sending
    only the requests for refs and records; both equal the local registry's weights."""
    want = local.materialize("qa")
    cold = Registry(url, cache=tmp_path / "cache")
    cold_keys = _spy(cold.backend, ("get", "fetch"))
    assert all(torch.equal(t, want[n]) for n, t in cold.materialize("qa").items())
    array_reads = [key for _, key in cold_keys if key.startswith("objects/arrays/")]
    assert array_reads
    warm = Registry(url, cache=tmp_path / "cache")
    warm_keys = _spy(warm.backend, ("get", "fetch"))
    assert all(torch.equal(t, want[n]) for n, t in warm.materialize("qa").items())
    assert not [key for _, key in warm_keys if key.startswith("objects/arrays/")]
    assert sum(warm.backend.requests.values()) == sum(cold.backend.requests.values()) - len(array_reads)


def test_the_cache_holds_only_arrays_that_hashed_to_their_name(local, url, tmp_path):
    """A damaged array in the bucket is refused, and not cached: a later read still sees the
    damage (after the bucket is repaired, the right bytes), never a cached wrong copy."""
    remote = Registry(url, cache=tmp_path / "cache")
    entry = max(remote.reference().tensors.values(), key=lambda e: torch.Size(e.shape).numel())
    digest = entry.arrays["data"]
    bucket = ObjectStoreBackend(url)
    first_chunk = layout.chunk_key(remote.objects.open_array(digest).layout, 0)
    good = bucket.get(first_chunk)
    bucket.put(first_chunk, bytes(len(good)))
    with pytest.raises(CorruptObjectError, match=digest[:12]):
        remote.materialize("qa")
    remote.materialize("qa", verify=False)  # read without checking: still never cached
    assert not (tmp_path / "cache" / object_key("arrays", digest)).exists()
    bucket.put(first_chunk, good)
    want = local.materialize("qa")
    assert all(torch.equal(t, want[n]) for n, t in Registry(url, cache=tmp_path / "cache").materialize("qa").items())
    assert (tmp_path / "cache" / object_key("arrays", digest) / "zarr.json").is_file()


def test_a_damaged_copy_in_the_cache_is_refused_and_removed(local, url, tmp_path):
    """Damage to the cache is named as such, the copy is removed, and the next read fetches
    the registry's copy again."""
    cache = tmp_path / "cache"
    Registry(url, cache=cache).materialize("qa")
    remote = Registry(url, cache=cache)
    entry = max(remote.reference().tensors.values(), key=lambda e: torch.Size(e.shape).numel())
    cached = cache / object_key("arrays", entry.arrays["data"])
    chunk = next(p for p in cached.iterdir() if p.name != "zarr.json")
    chunk.write_bytes(bytes(chunk.stat().st_size))
    with pytest.raises(CorruptObjectError, match="its copy in the read cache .* is damaged .* removed"):
        remote.materialize("qa")
    assert not cached.exists()
    want = local.materialize("qa")
    assert all(torch.equal(t, want[n]) for n, t in Registry(url, cache=cache).materialize("qa").items())
    assert cached.exists()


def test_a_cache_that_cannot_be_written_only_warns(local, url, tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_bytes(b"")
    with pytest.warns(UserWarning, match="cannot write the read cache"):
        got = Registry(url, cache=blocked).materialize("qa")
    want = local.materialize("qa")
    assert all(torch.equal(got[name], want[name]) for name in want)


def test_the_cache_comes_from_the_cli_option_or_the_environment(local, url, tmp_path, monkeypatch):
    out = CliRunner().invoke(cli, ["materialize", url, "qa", "--out", str(tmp_path / "out"),
                                   "--cache", str(tmp_path / "option")], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert list((tmp_path / "option" / "objects" / "arrays").iterdir())
    monkeypatch.setenv("DELTASTORE_CACHE", str(tmp_path / "env"))
    assert Registry(url).objects.cache.root == tmp_path / "env"
    assert Registry(url, cache=tmp_path / "given").objects.cache.root == tmp_path / "given"
    assert Registry(local.path).objects.cache is None  # a local registry is read in place


@pytest.mark.parametrize("where", ["folder", "bucket"])
def test_of_two_inits_racing_on_one_location_one_wins_the_other_is_refused(example, tmp_path, request, monkeypatch,
                                                                          where):
    """A second init runs start to end while the first is writing its reference: the first is
    refused when it publishes, and the registry is the second's, whole (not the first's
    reference under the second's info file)."""
    from deltastore import registry as registry_module

    # The records hold their creation time to the second: pinned, so the two inits of `other`
    # below make the same reference hash even when they run in different seconds.
    monkeypatch.setattr(registry_module, "utc_now", lambda: "2026-01-01T00:00:00+00:00")
    location = str(tmp_path / "registry") if where == "folder" else _bucket_url(request.getfixturevalue("s3_env"))
    other = {name: t + 1 if t.is_floating_point() else t
             for name, t in load_file(str(example.reference / "model.safetensors")).items()}
    real_store_files = registry_module.store_files

    def store_files_while_another_init_runs(*args, **kwargs):
        monkeypatch.setattr(registry_module, "store_files", real_store_files)
        Registry.init(location, other, progress=False)
        return real_store_files(*args, **kwargs)

    monkeypatch.setattr(registry_module, "store_files", store_files_while_another_init_runs)
    with pytest.raises(AlreadyExistsError, match="another init or copy made this location a registry"):
        Registry.init(location, example.reference, progress=False)
    expected = Registry.init(tmp_path / "expected", other, progress=False).reference_hash()
    assert Registry(location).reference_hash() == expected and Registry(location).verify() == []


@pytest.mark.parametrize("where", ["folder", "bucket"])
def test_an_init_that_looked_before_another_finished_puts_its_reference_back(tmp_path, request, where):
    """The narrow case: B looks after A pointed refs/reference at its record but before A wrote
    registry.msgpack. B's swap succeeds, A finishes, and B, refused at the info file, restores
    A's reference ref."""
    from deltastore.catalog import REFERENCE_REF, NewRegistry
    from deltastore.storage.backend import LocalBackend
    from deltastore.storage.records import PointerRef, pack

    if where == "folder":
        (tmp_path / "registry").mkdir()
        backend, name = LocalBackend(tmp_path / "registry"), tmp_path / "registry"
    else:
        name = _bucket_url(request.getfixturevalue("s3_env"))
        backend = ObjectStoreBackend(name)
    a = NewRegistry(backend, name)
    a.set_reference("a" * 64)
    b = NewRegistry(backend, name)
    b.set_reference("b" * 64)
    a.finish("2026-01-01T00:00:00+00:00")
    with pytest.raises(AlreadyExistsError, match="another init or copy"):
        b.finish("2026-01-01T00:00:00+00:00")
    assert backend.get(REFERENCE_REF) == pack(PointerRef("a" * 64).to_dict())
    late = NewRegistry(backend, name)  # one that looks after A finished is refused at once
    with pytest.raises(AlreadyExistsError, match="another init or copy"):
        late.set_reference("c" * 64)
