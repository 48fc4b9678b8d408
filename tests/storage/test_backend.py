"""LocalBackend (storage/backend.py): the protocol's conformance tests, plus what only a
local filesystem has (files that are not regular, symlinks, folders replaced by files,
temporary files, the refs lock)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from deltastore.errors import CorruptObjectError
from deltastore.storage.backend import LocalBackend
from deltastore.storage.locks import FileLocks

from .conformance import BackendTests


class TestLocalBackend(BackendTests):
    @pytest.fixture
    def backend(self, tmp_path):
        return LocalBackend(tmp_path / "registry")


@pytest.fixture
def local(tmp_path):
    return LocalBackend(tmp_path / "registry")


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_a_key_that_is_not_a_regular_file_is_refused_without_blocking(local, kind):
    local.put("refs/tasks/a", b"v")
    path = local.root / "refs/tasks/qa"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    signal.alarm(20)  # a regression hangs: fail instead
    try:
        for read in (lambda: local.get("refs/tasks/qa"), lambda: local.get_into("refs/tasks/qa", memoryview(bytearray(8))),
                     lambda: local.get_versioned("refs/tasks/qa")):
            with pytest.raises(CorruptObjectError, match="not a regular file"):
                read()
    finally:
        signal.alarm(0)


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_a_folder_replaced_is_damage_not_absence(local, tmp_path, kind):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "victim").write_bytes(b"outside the registry")
    local.put("refs/reference", b"v")
    if kind == "file":
        (local.root / "refs/tasks").write_bytes(b"")
    else:
        (local.root / "refs/tasks").symlink_to(tmp_path / "elsewhere")
    for listing in (local.list, local.children, local.prefix_exists):
        with pytest.raises(CorruptObjectError, match="expected a folder of the registry"):
            listing("refs/tasks")


def test_delete_unlinks_a_symlink_and_keeps_its_target(local, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep").write_bytes(b"x")
    local.put("staging/t/a", b"v")
    (local.root / "staging/link").symlink_to(target)
    local.delete("staging/link")
    assert (target / "keep").read_bytes() == b"x" and not (local.root / "staging/link").is_symlink()


def test_writes_leave_no_temporary_files(local):
    local.put("refs/tasks/a", b"one")
    local.put("refs/tasks/a", b"two")
    local.put_if_absent("refs/tasks/a", b"three")
    local.put_if_version("refs/tasks/a", b"four", local.get_versioned("refs/tasks/a")[1])
    assert sorted(os.listdir(local.root / "refs/tasks")) == ["a"]


def test_compare_and_swap_waits_for_the_refs_lock(local):
    """put_if_version is a read-modify-write under locks/refs, the lock the registry's ref
    updates hold, so it never interleaves with one of them."""
    local.put("refs/tasks/a", b"one")
    token = local.get_versioned("refs/tasks/a")[1]
    held = threading.Event()

    def ref_update():  # what Registry.remove does: read, modify, write under the refs lock
        with FileLocks(local.root).hold("refs"):
            held.set()
            time.sleep(0.5)
            local.put("refs/tasks/a", b"two")

    writer = threading.Thread(target=ref_update)
    writer.start()
    held.wait()
    start = time.monotonic()
    assert local.put_if_version("refs/tasks/a", b"three", token) is False  # saw "two", not "one"
    assert time.monotonic() - start > 0.3
    writer.join()
    assert local.get("refs/tasks/a") == b"two"
