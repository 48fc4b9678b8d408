"""Damage to the registry's own folders and files (issue 10): deleted or replaced ref folders,
symlinks out of the registry, fifos in place of files, version numbers after ``rm``, gc
racing ``rm``. Each test applies the damage and runs the command a user would run next."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from deltastore import CorruptObjectError, Registry
from deltastore.storage import backend as backend_module
from deltastore.storage.objects import object_key
from deltastore.storage.records import TaskRef, pack, unpack

from .faults import collect
from .helpers import snapshot, state_hash, tree_bytes
from .test_hostile import CORRUPT, run_cli




def _objects(reg: Registry) -> set[tuple[str, str]]:
    return {(kind, d) for kind, names in reg.objects.all_objects().items() for d in names}


# -- gc's closure ----------------------------------------------------------------------------
def test_gc_keeps_a_base_vector_a_version_uses_after_its_ref_is_removed(reg_anywhere):
    """Finding 1: the base's name is gone, the version still names the base record by hash."""
    reg = reg_anywhere
    before = state_hash(reg.materialize("t1"))
    reg.backend.delete("refs/bases/b1")
    assert reg.verify() == []
    removed = collect(reg)
    assert removed["arrays"] == removed["records"] == 0, removed
    assert reg.verify() == []
    assert state_hash(reg.materialize("t1")) == before


def test_verify_reports_a_missing_array_of_a_base_vector_reached_only_through_a_version(reg):
    _, record = reg.version("t1")
    base = reg.objects.get_record(record.base, type(reg.base("b1")[1]))
    (reg.path / "refs/bases/b1").unlink()
    victim = sorted(base.array_hashes())[0]
    reg.backend.delete(object_key("arrays", victim))
    problems = reg.verify()
    assert [(p["object"], p["problem"]) for p in problems] == [(object_key("arrays", victim), "missing")]
    assert "t1@1" in problems[0]["used_by"]


# -- damaged ref folders ---------------------------------------------------------------------
@pytest.mark.parametrize("folder", ["refs/tasks", "refs/bases", "refs"])
@pytest.mark.parametrize("damage", ["file", "fifo", "symlink"])
def test_replaced_ref_folder_makes_verify_fail_and_gc_refuse(reg, folder, damage, tmp_path):
    """Finding 2: a ref folder replaced by a file (or a fifo, or a symlink to a copy elsewhere)
    is damage: verify names it, gc refuses and deletes nothing."""
    path = reg.path / folder
    moved = tmp_path / "moved"
    os.rename(path, moved)
    if damage == "file":
        path.write_bytes(b"x")
    elif damage == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(moved)
    objects = _objects(reg)
    problems = reg.verify()
    assert any(p["object"].startswith(folder) for p in problems), problems
    result = run_cli("verify", reg.path)
    assert result.exit_code == CORRUPT and folder in result.output, result.output
    result = run_cli("gc", reg.path)
    assert result.exit_code == CORRUPT and folder in result.output, result.output
    with pytest.raises(CorruptObjectError, match=folder):
        reg.gc()
    assert _objects(reg) == objects
    result = run_cli("ls", reg.path)
    if folder == "refs/tasks":  # listing no task would hide the damage
        assert result.exit_code == CORRUPT and folder in result.output, result.output


@pytest.mark.parametrize("folder", ["refs/tasks", "refs/bases"])
def test_deleted_ref_folder_makes_verify_fail_and_gc_refuse(reg, folder):
    """A deleted ref folder, while records it named are stored: gc would delete them all."""
    if folder == "refs/bases":
        reg.remove("t1")  # the base vector is then named by its ref only
    for key in reg.backend.list(folder):
        reg.backend.delete(key)
    os.rmdir(reg.path / folder)
    objects = _objects(reg)
    assert any(p["object"] == folder for p in reg.verify())
    with pytest.raises(CorruptObjectError, match=f"{folder}.*mkdir"):
        reg.gc()
    assert _objects(reg) == objects
    (reg.path / folder).mkdir()  # what the message says to do, when nothing was lost
    reg.gc()


def test_gc_of_a_registry_without_ref_folders_and_without_their_records(tiny, tmp_path):
    """A registry that never had a task or a base vector has neither folder: that is fine."""
    reg = Registry.init(tmp_path / "fresh", tiny.reference, progress=False)
    assert not (reg.path / "refs/tasks").exists() and reg.verify() == []
    reg.gc()


# -- symlinks out of the registry ------------------------------------------------------------
@pytest.mark.parametrize("folder", ["staging", "objects/arrays", "objects"])
def test_gc_never_deletes_through_a_symlinked_registry_folder(reg, folder, tmp_path):
    """Finding 3: gc must not delete files outside the registry."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").mkdir()
    (outside / "precious" / "data").write_bytes(b"keep me")
    path = reg.path / folder
    if path.exists():
        os.rename(path, tmp_path / "moved")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(outside)
    with pytest.raises(CorruptObjectError, match="symlink"):
        reg.gc()
    assert (outside / "precious" / "data").read_bytes() == b"keep me"
    result = run_cli("gc", reg.path)
    assert result.exit_code == CORRUPT and "symlink" in result.output, result.output
    assert (outside / "precious" / "data").read_bytes() == b"keep me"


def test_gc_unlinks_a_symlinked_object_without_following_it(reg, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "zarr.json").write_bytes(b"keep me")
    link = reg.path / object_key("arrays", "ab" * 32)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside)
    reg.gc()
    reg.gc()  # and nothing is left behind in staging for the next one
    assert not link.exists() and not link.is_symlink() and reg.backend.children("staging") == []
    assert (outside / "zarr.json").read_bytes() == b"keep me"


# -- fifos in place of files -----------------------------------------------------------------
def _fifo_targets(reg: Registry) -> dict[str, Path]:
    _, record = reg.version("t1")
    return {
        "registry.msgpack": reg.path / "registry.msgpack",
        "refs/reference": reg.path / "refs/reference",
        "task ref": reg.path / "refs/tasks/t1",
        "base ref": reg.path / "refs/bases/b1",
        "record": reg.path / object_key("records", reg.version_hashes("t1")[0][1]),
        "blob": reg.path / object_key("blobs", record.files["config.json"]),
        "zarr.json": reg.path / object_key("arrays", record.pack) / "zarr.json",
    }


@pytest.mark.parametrize("target", ["registry.msgpack", "refs/reference", "task ref", "base ref", "record",
                                    "blob", "zarr.json"])
def test_a_fifo_in_place_of_any_file_never_hangs(reg, target, tmp_path):
    """Finding 7: every command answers (an error naming the file, or success), none blocks."""
    path = _fifo_targets(reg)[target]
    path.unlink()
    os.mkfifo(path)
    commands = [("verify",), ("ls",), ("show", "t1"), ("log", "t1"), ("gc",),
                ("materialize", "t1", "--out", tmp_path / "out")]
    outcome = {}

    def run_all():
        for args in commands:
            outcome[args[0]] = run_cli(args[0], reg.path, *args[1:])

    worker = threading.Thread(target=run_all, daemon=True)
    worker.start()
    worker.join(60)
    if worker.is_alive():  # unblock the hung open() so the test process can end
        with open(path, "wb"):
            pass
        pytest.fail(f"a command hung on a fifo in place of {target}: done {sorted(outcome)}")
    assert outcome["verify"].exit_code == CORRUPT, outcome["verify"].output
    for name, result in outcome.items():
        assert result.exit_code in (0, CORRUPT), (name, result.output)
        assert "Traceback" not in result.output
    assert stat_is_fifo(path)  # nothing replaced or deleted it


def stat_is_fifo(path: Path) -> bool:
    import stat

    return stat.S_ISFIFO(os.lstat(path).st_mode)


# -- version numbers -------------------------------------------------------------------------
def test_a_removed_version_number_is_never_reused(reg, tiny):
    """Finding 4: commit twice, rm the latest, commit again: a new number, not the old one."""
    reg.commit("pin", tiny.finetunes["a"], progress=False)
    reg.commit("pin", tiny.finetunes["b"], progress=False)
    removed_weights = state_hash(reg.materialize("pin", 2))
    reg.remove("pin", 2)
    record = reg.commit("pin", tiny.finetunes["c"], progress=False)
    assert record.version == 3 and [n for n, _ in reg.versions("pin")] == [1, 3]
    assert run_cli("materialize", reg.path, "pin@2", "--out", reg.path.parent / "x").exit_code == 3
    assert state_hash(reg.materialize("pin", 3)) != removed_weights
    # The ref says so on disk (format.md §5.7), and gc keeps it.
    reg.remove("pin", 3)
    reg.gc()
    assert unpack((reg.path / "refs/tasks/pin").read_bytes(), "ref")["issued"] == 3
    assert reg.commit("pin", tiny.finetunes["c"], progress=False).version == 4


def test_a_removed_task_keeps_its_numbers(reg, tiny):
    reg.commit("pin", tiny.finetunes["a"], progress=False)
    reg.commit("pin", tiny.finetunes["b"], progress=False)
    assert reg.remove("pin") == [1, 2]
    assert "pin" not in reg.tasks() and "pin" not in run_cli("ls", reg.path).output
    reg.gc()
    assert reg.verify() == []
    assert reg.commit("pin", tiny.finetunes["c"], progress=False).version == 3
    assert reg.version("pin")[1].parent is None  # a new history: no parent among removed versions


def test_a_1_0_task_ref_without_issued_reads_as_before(reg):
    data = unpack((reg.path / "refs/tasks/t2").read_bytes(), "ref")
    assert "issued" not in data  # nothing removed: the 1.0 bytes
    assert TaskRef.from_dict(data, "ref").last_issued == 2


@pytest.mark.parametrize("issued", [1, 0, -5, 2**64 - 1, True])
def test_a_task_ref_issuing_below_its_versions_is_corrupt(reg, issued):
    data = unpack((reg.path / "refs/tasks/t2").read_bytes(), "ref")
    (reg.path / "refs/tasks/t2").write_bytes(pack({**data, "issued": issued}))
    with pytest.raises(CorruptObjectError, match="issued|expected int"):
        reg.versions("t2")


# -- rm racing gc ----------------------------------------------------------------------------
def test_gc_waits_for_an_rm_in_flight(reg, monkeypatch):
    """Finding 9: gc used to delete the temp file rm was about to rename into refs/."""
    real_replace = os.replace
    collector: list[threading.Thread] = []

    def slow_replace(src, dst):
        if "refs/tasks" in str(dst) and not collector:  # rm wrote its temp file: start gc now
            collector.append(threading.Thread(target=reg.gc))
            collector[0].start()
            time.sleep(0.5)
        return real_replace(src, dst)

    monkeypatch.setattr(backend_module.os, "replace", slow_replace)
    assert reg.remove("t2", 1) == [1]
    collector[0].join(30)
    assert not collector[0].is_alive()
    assert [n for n, _ in reg.versions("t2")] == [2] and reg.verify() == []


def test_damage_leaves_a_clean_registry_readable_as_before(reg, tmp_path):
    """The checks add no false alarm: an undamaged registry verifies, gcs and reads the same."""
    before, files = snapshot(reg), tree_bytes(reg.path / "objects")
    assert reg.verify() == [] and reg.gc()["records"] == 0
    assert snapshot(reg) == before and tree_bytes(reg.path / "objects") == files


# -- dedup never trusts what it has not checked ----------------------------------------------
@pytest.mark.parametrize("what", ["chunk", "zarr.json", "blob", "missing chunk", "missing zarr.json"])
def test_commit_rewrites_a_damaged_object_it_would_reuse(reg_anywhere, tiny, what, tmp_path):
    """Finding 5: damage an object of t2@1, commit the same finetune under another name: the
    commit must not reuse the damaged object (it used to report success, then not read). An
    array without zarr.json (on an object store, a killed publish's remains) is written over."""
    reg = reg_anywhere
    _, record = reg.version("t2", 1)
    if what == "blob":
        victim = object_key("blobs", record.files["config.json"])
    else:
        array = object_key("arrays", record.bundle)  # its codes' bundle (format.md §5.9), the same again
        victim = f"{array}/{'zarr.json' if what.endswith('zarr.json') else '0'}"
    if what.startswith("missing"):
        reg.backend.delete(victim)
    else:
        data = bytearray(reg.backend.get(victim))
        data[len(data) // 2] ^= 0x10
        reg.backend.put(victim, bytes(data))
    result = run_cli("commit", reg.path, "again", tiny.finetunes["b"])
    assert result.exit_code == 0, result.output
    assert run_cli("materialize", reg.path, "again", "--out", tmp_path / "out").exit_code == 0
    # The damaged object was written again whole: t2@1, which shares it, reads again too.
    assert state_hash(reg.materialize("again")) == state_hash(reg.materialize("t2", 1))
    assert reg.verify() == []
