"""Shared fixtures: tiny real models made here, never downloaded; CUDA and slow markers."""

from __future__ import annotations

import os
import shutil

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow (full sweeps)")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs CUDA")
    skip_slow = pytest.mark.skip(reason="slow: pass --run-slow")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread: tiny matmuls gain nothing from threads, and
    on a shared 2-core machine several threads per process make model fits ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def example(tmp_path_factory):
    """A tiny BERT reference and three finetunes made by real training steps (HF directories)."""
    from deltastore.demo import make_example

    return make_example(tmp_path_factory.mktemp("example"), steps=10)


@pytest.fixture(scope="session")
def base_registry(example, tmp_path_factory):
    """A registry holding the example's reference and a base vector 'all' of its finetunes.

    Session-scoped and shared: tests must not change it (copy it with `registry_copy`)."""
    from deltastore import Registry

    reg = Registry.init(tmp_path_factory.mktemp("reg") / "registry", example.reference, progress=False)
    reg.build_base("all", list(example.finetunes.values()), progress=False)
    return reg


@pytest.fixture
def registry_copy(base_registry, tmp_path):
    """A private copy of `base_registry` that a test may change."""
    import shutil

    from deltastore import Registry

    shutil.copytree(base_registry.path, tmp_path / "registry")
    return Registry(tmp_path / "registry")


def _start_server(module, folder):
    """Start a test server of ``module`` (storage/s3_server.py or storage/azurite_server.py)
    or skip, saying why. In CI (``CI`` set) a missing server fails instead: the object-store
    tests must run there; only Azure may skip, and only without node or npm (.ci/run installs
    Azurite with npm, and says so when it cannot)."""
    try:
        return module.start(folder)
    except RuntimeError as exc:
        no_node = not (shutil.which("node") and shutil.which("npm"))
        may_skip = not os.environ.get("CI") or (module.__name__.endswith("azurite_server") and no_node)
        if may_skip:
            pytest.skip(f"no {module.__name__.rpartition('.')[2]} for the object-store tests: {exc}")
        raise


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """One S3-compatible server (SeaweedFS on 127.0.0.1, tests/storage/s3_server.py) for the
    whole session: it takes seconds to start. Stopped for sure at the end."""
    from storage import s3_server

    proc, server = _start_server(s3_server, tmp_path_factory.mktemp("seaweedfs"))
    try:
        s3_server.create_bucket(server)
        yield server
    finally:
        s3_server.stop(proc)


@pytest.fixture(scope="session")
def azure(tmp_path_factory):
    """One Azure Blob server (Azurite on 127.0.0.1, tests/storage/azurite_server.py), its test
    container created, for the whole session. Stopped for sure at the end."""
    from storage import azurite_server, server_process

    proc, server = _start_server(azurite_server, tmp_path_factory.mktemp("azurite"))
    try:
        yield server
    finally:
        server_process.stop(proc)


@pytest.fixture
def s3_env(s3, monkeypatch):
    """The server's endpoint and credentials in the environment, where obstore reads them."""
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    return s3


OBJECT_STORES = ["s3", "azure"]


@pytest.fixture(params=OBJECT_STORES)
def store_env(request, monkeypatch):
    """Each test server in turn (S3, Azure), its environment set as s3_env sets S3's; the
    server's ``url(prefix)`` names a registry in its bucket or container."""
    server = request.getfixturevalue(request.param)
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    return server
