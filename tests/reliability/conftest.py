"""Fixtures of the reliability tests: the tiny model and prepared registries."""

from __future__ import annotations

import uuid

import pytest

from conftest import OBJECT_STORES

from .helpers import Where, copy_registry, make_tiny, upload_registry


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_registry(tiny, tmp_path_factory):
    """Read-only: reference, base 'b1' (finetunes a, b), task t1@1 (a, with b1; every array in
    a folder of its own, as a large model's) and t2@1 (b, plain), t2@2 (c, deltadq), whose small
    arrays are in their bundles (format.md §5.9). Copy it with helpers.copy_registry before
    changing it."""
    from deltastore import Registry
    from deltastore.engine import commit

    reg = Registry.init(tmp_path_factory.mktemp("tinyreg") / "registry", tiny.reference, progress=False)
    reg.build_base("b1", [tiny.finetunes["a"], tiny.finetunes["b"]], progress=False)
    bundle_bytes, commit.BUNDLE_MAX_BYTES = commit.BUNDLE_MAX_BYTES, -1
    try:
        reg.commit("t1", tiny.finetunes["a"], base="b1", message="a", progress=False)
    finally:
        commit.BUNDLE_MAX_BYTES = bundle_bytes
    reg.commit("t2", tiny.finetunes["b"], message="b", progress=False)
    reg.commit("t2", tiny.finetunes["c"], method="deltadq", message="c", progress=False)
    return reg


@pytest.fixture(params=["local", *OBJECT_STORES])
def where(request, tmp_path, monkeypatch) -> Where:
    """Run the scenario on a local folder and on each test object store, S3 and Azure (whose
    environment is set here for this process; child processes get it as ``where.env``)."""
    if request.param == "local":
        return Where("local", {}, lambda src: copy_registry(src, tmp_path / "registry"))
    server = request.getfixturevalue(request.param)
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    return Where(request.param, server.env,
                 lambda src: upload_registry(src, server.url(f"reliability-{uuid.uuid4().hex}")))


@pytest.fixture
def reg(tiny_registry, tmp_path):
    """A private copy of the tiny registry in a folder, to damage."""
    from deltastore import Registry

    return Registry(copy_registry(tiny_registry.path, tmp_path / "registry"))


@pytest.fixture
def reg_anywhere(tiny_registry, where):
    """A private copy of the tiny registry in a folder, and in each test object store, for the
    scenarios that are not about a filesystem."""
    from deltastore import Registry

    return Registry(where.place(tiny_registry.path))
