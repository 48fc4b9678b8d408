"""ObjectStoreBackend (storage/objectstore.py) against a real S3-compatible server (SeaweedFS
on loopback, tests/storage/s3_server.py): the protocol's conformance tests, the server's
conditional writes under concurrency, and the probe that refuses a store without them."""

from __future__ import annotations

import threading
import uuid

import pytest

from deltastore.storage.objectstore import ObjectStoreBackend

from . import s3_server
from .conformance import BackendTests


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """One SeaweedFS for the whole session (it takes seconds to start), stopped for sure."""
    try:
        proc, server = s3_server.start(tmp_path_factory.mktemp("seaweedfs"))
    except RuntimeError as exc:
        pytest.skip(f"no S3 server for the object-store tests: {exc}")
    try:
        yield server
    finally:
        s3_server.stop(proc)


@pytest.fixture
def s3_env(s3, monkeypatch):
    """The server's endpoint and credentials in the environment, where obstore reads them."""
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    return s3


@pytest.fixture
def url(s3_env):
    """A key prefix of its own for each test: tests share the bucket, never a key."""
    return f"s3://{s3_env.bucket}/test-{uuid.uuid4().hex}"


class TestObjectStoreBackend(BackendTests):
    @pytest.fixture
    def backend(self, url):
        return ObjectStoreBackend(url)
