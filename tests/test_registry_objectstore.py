"""A registry on an object store, opened read-only by URL (``s3://bucket/prefix``, endpoint
and credentials from the environment): a local registry copied into the bucket of the test
S3 server (SeaweedFS on loopback, the ``s3`` fixture) lists, shows and materializes the same
as the local one; every write is refused with a clear error."""

from __future__ import annotations

import json
import uuid

import pytest
import torch
from click.testing import CliRunner

from deltastore import Registry
from deltastore.catalog import Catalog
from deltastore.errors import InvalidInputError
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
