"""``deltastore copy``: tasks of one registry into another, like ``git push`` (issue 13)."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import deltastore.copy as copy_module
from deltastore import Registry
from deltastore.errors import AlreadyExistsError, InvalidInputError
from deltastore_cli.main import cli


@pytest.fixture(scope="module")
def source(base_registry, example, tmp_path_factory, one_thread):
    """A registry with task ``qa`` (two versions, on base ``all``) and task ``nli`` (one, plain)."""
    path = tmp_path_factory.mktemp("copy") / "source"
    shutil.copytree(base_registry.path, path)
    reg = Registry(path)
    finetunes = list(example.finetunes.values())
    reg.commit("qa", finetunes[0], base="all", progress=False)
    reg.commit("qa", finetunes[1], base="all", progress=False)
    reg.commit("nli", finetunes[2], progress=False)
    return reg


def _same(a: Registry, b: Registry, task: str, version: int) -> None:
    got, want = a.materialize(task, version), b.materialize(task, version)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[n], want[n]) and got[n].dtype == want[n].dtype for n in want)


def test_copy_into_a_new_folder_is_bit_identical_and_a_second_run_copies_nothing(source, tmp_path):
    dst = tmp_path / "dst"
    result = source.copy_to(dst, progress=False)
    assert sum(result["skipped"].values()) == 0 and result["bytes"] > 0
    assert set(result["refs"]) == {"refs/reference", "refs/bases/all", "refs/tasks/qa", "refs/tasks/nli"}
    copied = Registry(dst)
    assert copied.verify() == []
    assert copied.reference_hash() == source.reference_hash()
    assert copied.version_hashes("qa") == source.version_hashes("qa")
    assert copied.bases() == ["all"]
    for task, version in (("qa", 1), ("qa", 2), ("nli", 1)):
        _same(copied, source, task, version)
    # The reference's arrays keep their (uncompressed) encoding: the same bytes on disk.
    assert copied.objects.all_objects() == source.objects.all_objects()
    again = source.copy_to(dst, progress=False)
    assert sum(again["copied"].values()) == 0 and again["refs"] == [] and again["bytes"] == 0


def test_copy_one_task_takes_only_what_it_needs(source, tmp_path):
    result = source.copy_to(tmp_path / "dst", ["nli"], progress=False)
    copied = Registry(tmp_path / "dst")
    assert copied.tasks() == ["nli"] and copied.bases() == []  # nli uses no base vector
    assert "refs/tasks/qa" not in result["refs"]
    assert copied.verify() == []
    _same(copied, source, "nli", 1)
    source.copy_to(tmp_path / "dst", ["qa"], progress=False)
    assert Registry(tmp_path / "dst").bases() == ["all"] and Registry(tmp_path / "dst").tasks() == ["nli", "qa"]


def _upload(local: Path, url: str) -> str:
    from deltastore.storage.objectstore import ObjectStoreBackend

    bucket = ObjectStoreBackend(url)
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        key = file.relative_to(local).as_posix()
        if not key.startswith("locks/"):
            bucket.put(key, file.read_bytes())
    return url


@pytest.fixture(params=["local", "s3"])
def destination(request, registry_copy):
    """A registry of the source's reference with base 'all' and no task: a folder, or a bucket."""
    if request.param == "local":
        return registry_copy
    s3 = request.getfixturevalue("s3_env")
    return Registry(_upload(registry_copy.path, f"s3://{s3.bucket}/copy-{uuid.uuid4().hex}"))


def test_an_interrupted_copy_changes_no_ref_and_a_rerun_completes(source, destination, monkeypatch):
    registry_copy = destination
    real, calls = copy_module._copy_object, []

    def failing(*args):
        if len(calls) == 5:
            raise OSError("disk full (simulated)")
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(copy_module, "_copy_object", failing)
    with pytest.raises(OSError, match="simulated"):
        source.copy_to(registry_copy.path, progress=False)
    assert registry_copy.tasks() == [] and registry_copy.verify() == []
    monkeypatch.setattr(copy_module, "_copy_object", real)
    result = source.copy_to(registry_copy.path, progress=False)
    assert sorted(result["refs"]) == ["refs/tasks/nli", "refs/tasks/qa"]  # base 'all' was there already
    assert Registry(registry_copy.path).verify() == []
    _same(Registry(registry_copy.path), source, "qa", 2)


def test_an_interrupted_copy_into_a_new_folder_leaves_no_registry(source, tmp_path, monkeypatch):
    monkeypatch.setattr(copy_module, "_copy_object", lambda *a: (_ for _ in ()).throw(OSError("simulated")))
    with pytest.raises(OSError):
        source.copy_to(tmp_path / "dst", progress=False)
    monkeypatch.undo()
    source.copy_to(tmp_path / "dst", progress=False)
    assert Registry(tmp_path / "dst").verify() == []


def test_a_diverged_task_is_refused_before_anything_is_copied(source, registry_copy, example):
    registry_copy.commit("qa", list(example.finetunes.values())[2], progress=False)  # another qa@1
    before = registry_copy.objects.all_objects()
    with pytest.raises(AlreadyExistsError, match=r"task 'qa' differs from the source's at version 1"):
        source.copy_to(registry_copy.path, progress=False)
    assert registry_copy.objects.all_objects() == before
    source.copy_to(registry_copy.path, ["nli"], progress=False)  # the other task still copies


def test_a_task_behind_fast_forwards(source, tmp_path):
    from deltastore.storage.records import TaskRef, pack

    source.copy_to(tmp_path / "dst", progress=False)
    dst = Registry(tmp_path / "dst")
    first = source.version_hashes("qa")[:1]
    dst.backend.put("refs/tasks/qa", pack(TaskRef(first, 1).to_dict()))  # as if copied before qa@2 existed
    result = source.copy_to(dst.path, ["qa"], progress=False)
    assert result["refs"] == ["refs/tasks/qa"] and sum(result["copied"].values()) == 0
    assert dst.version_hashes("qa") == source.version_hashes("qa")


def test_a_removed_version_number_is_not_issued_again(source, tmp_path):
    source.copy_to(tmp_path / "dst", progress=False)
    dst = Registry(tmp_path / "dst")
    dst.remove("qa@2")
    assert "already issued version 2" in str(pytest.raises(AlreadyExistsError, source.copy_to, dst.path).value)
    dst.remove("nli")
    with pytest.raises(AlreadyExistsError, match="already issued version 1"):
        source.copy_to(dst.path, ["nli"], progress=False)


def test_another_reference_or_a_non_empty_folder_is_refused(source, example, tmp_path):
    other = tmp_path / "other"
    Registry.init(other, list(example.finetunes.values())[0], progress=False)
    with pytest.raises(InvalidInputError, match="reference"):
        source.copy_to(other, progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(AlreadyExistsError, match="not empty"):
        source.copy_to(tmp_path / "junk", progress=False)


def test_the_cli_copies_and_prints_what_it_did(source, tmp_path):
    dst = tmp_path / "dst"
    out = CliRunner().invoke(cli, ["copy", str(source.path), str(dst), "nli", "--json"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["refs"] == ["refs/reference", "refs/tasks/nli"] and data["copied"]["records"] >= 2
    text = CliRunner().invoke(cli, ["copy", str(source.path), str(dst), "nli"])
    assert text.exit_code == 0 and "copied 0 objects" in text.output and "refs updated: none" in text.output


def test_copy_from_a_bucket(source, s3_env, tmp_path):
    url = _upload(source.path, f"s3://{s3_env.bucket}/registry-{uuid.uuid4().hex}")
    result = copy_module.copy(url, tmp_path / "dst", ["qa"], progress=False)
    assert "refs/tasks/qa" in result["refs"]
    copied = Registry(tmp_path / "dst")
    assert copied.verify() == []
    _same(copied, source, "qa", 2)


def test_a_damaged_source_object_is_refused_and_never_published(source, tmp_path):
    from numcodecs import Zstd

    from deltastore.errors import CorruptObjectError
    from deltastore.storage.objects import object_key

    shutil.copytree(source.path, tmp_path / "src")
    damaged = Registry(tmp_path / "src")
    _, record = damaged.version("nli")
    digest = next(iter(record.files.values()))
    path = tmp_path / "src" / object_key("blobs", digest)
    path.write_bytes(bytes(Zstd(level=9).encode(b"{}")))  # a valid blob of the wrong content
    with pytest.raises(CorruptObjectError, match=digest[:12]):
        damaged.copy_to(tmp_path / "dst", ["nli"], progress=False)
    assert not (tmp_path / "dst" / object_key("blobs", digest)).exists()
    assert not (tmp_path / "dst" / "registry.msgpack").exists()
