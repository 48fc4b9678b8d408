"""A registry on an object store, opened read-only by URL (``s3://bucket/prefix``, endpoint
and credentials from the environment): a local registry copied into the bucket of the test
S3 server (SeaweedFS on loopback, the ``s3`` fixture) lists, shows and materializes the same
as the local one, with one request per key read (chunk files requested ahead, together) and
none for an array the read-through cache holds; every write is refused with a clear error."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter

import pytest
import torch
from click.testing import CliRunner

from deltastore import Registry
from deltastore.catalog import Catalog
from deltastore.errors import CorruptObjectError, InvalidInputError
from deltastore.storage import layout
from deltastore.storage.objects import ObjectStore, object_key
from deltastore.storage.objectstore import ObjectStoreBackend
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


def test_writing_to_a_bucket_is_refused_before_anything_is_written(example, url):
    remote = Registry(url)
    before = ObjectStoreBackend(url).list("")
    with pytest.raises(InvalidInputError, match=f"{url}: a registry on an object store is read-only"):
        remote.commit("qa", next(iter(example.finetunes.values())), base="all", progress=False)
    with pytest.raises(InvalidInputError, match="read-only"):
        remote.remove("qa", 1)
    with pytest.raises(InvalidInputError, match="read-only"):
        Registry.init(url, example.reference)
    assert ObjectStoreBackend(url).list("") == before


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
