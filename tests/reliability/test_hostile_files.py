"""Hostile finetune folders and calibration files (issue 10, findings 6, 8, 10, 11): what the
reader would refuse is refused before the first write, every bad file gives one line naming
it (exit code 1, no traceback), links out of the finetune folder are not followed, and what
is skipped is said."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from deltastore import Registry

from .helpers import finetune_state, write_model
from .test_hostile import BAD_INPUT, Unchanged, run_cli



def _finetune(tmp_path: Path, extra: dict[str, torch.Tensor] | None = None, config: dict | None = None) -> Path:
    return write_model(tmp_path / "ft", {**finetune_state(0), **(extra or {})}, config)


def _refused(reg: Registry, args: list, needle: str):
    """Run ``commit`` with ``args``: exit 1, one line naming ``needle``, nothing stored changed."""
    with Unchanged(reg.path):
        result = run_cli("commit", reg.path, "x", *args)
    assert result.exit_code == BAD_INPUT, result.output
    assert "Traceback" not in result.output and needle in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    return result


# -- finding 6: one rule for writer and reader -----------------------------------------------
@pytest.mark.parametrize("shape,problem", [((1,) * 9, "9 dimensions"), ((0, 20_000_000), "rows of 80000000 bytes")])
def test_a_tensor_the_reader_would_refuse_is_refused_before_the_first_write(reg, tmp_path, shape, problem):
    folder = _finetune(tmp_path, {"odd.weight": torch.zeros(shape)})
    _refused(reg, [folder], "'odd.weight'")
    assert problem in run_cli("commit", reg.path, "x", folder).output


def test_a_reference_the_reader_would_refuse_is_refused_before_init(tmp_path):
    folder = write_model(tmp_path / "ref", {"odd": torch.zeros((1,) * 9)})
    result = run_cli("init", tmp_path / "registry", "--reference", folder)
    assert result.exit_code == BAD_INPUT and "9 dimensions" in result.output, result.output
    assert not (tmp_path / "registry").exists()


@pytest.mark.parametrize("name", ["notes\\v1.txt", os.fsdecode(b"notes\xff.txt")])
def test_a_side_file_whose_name_the_reader_refuses_is_refused_before_the_first_write(reg, tmp_path, name):
    """A backslash (finding 6) or a name that is not UTF-8 (finding 8) used to commit and then
    break ls, gc and every later summary, or to end in a traceback: the writer refuses what the
    reader would (storage.records.file_name_problem), naming the file."""
    folder = _finetune(tmp_path)
    (folder / name).write_bytes(b"hello")
    _refused(reg, [folder], "notes")
    for args in (("ls",), ("gc",), ("verify",)):
        assert run_cli(args[0], reg.path, *args[1:]).exit_code == 0, args
    assert run_cli("commit", reg.path, "y", tiny_folder(reg)).exit_code == 0


def tiny_folder(reg: Registry) -> Path:
    return Path(reg.version("t1")[1].source["label"])


# -- finding 8: malformed safetensors indexes ------------------------------------------------
@pytest.mark.parametrize("index", [b'{"weight_map": {"a": 5}}', b"[1, 2]", b"[" * 200_000 + b"]" * 200_000,
                                   b'{"weight_map": [1]}', b'{"weight_map": {"a": "x\\u0000.safetensors"}}',
                                   b"\xff\xfe", b"{}"])
def test_a_malformed_index_is_one_line_naming_it(reg, tmp_path, index):
    folder = _finetune(tmp_path)
    (folder / "model.safetensors.index.json").write_bytes(index)
    _refused(reg, [folder], "model.safetensors.index.json")


# -- finding 8: hostile calibration files ----------------------------------------------------
CALIBRATION = {
    "deep.jsonl": b'{"input_ids": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
    "huge.jsonl": json.dumps({"input_ids": [1, 2**70]}).encode() + b"\n",
    "negative.jsonl": json.dumps({"input_ids": [1, -3]}).encode() + b"\n",
    "vocab.jsonl": json.dumps({"input_ids": [1, 100]}).encode() + b"\n",  # the finetune's vocab_size is 100
    "latin1.txt": "first line\ncaf\xe9\n".encode("latin-1"),
}


@pytest.mark.parametrize("name", sorted(CALIBRATION))
def test_a_hostile_calibration_file_is_one_line_naming_it(reg, tmp_path, name):
    folder = _finetune(tmp_path, config={"model_type": "bert", "vocab_size": 100})
    calib = tmp_path / name
    calib.write_bytes(CALIBRATION[name])
    result = _refused(reg, [folder, "--tune", "dbms", "--calib", calib], name)
    if name == "latin1.txt":
        assert f"{name}:2: not UTF-8" in result.output


# -- finding 10: links out of the finetune folder ---------------------------------------------
def test_side_files_linking_out_of_the_folder_are_not_read(reg, tmp_path):
    folder = _finetune(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    (folder / "environ").symlink_to("/proc/self/environ")
    (folder / "passwd").symlink_to(secret)
    (folder / "inside.json").symlink_to(folder / "config.json")  # a link inside the folder is fine
    os.mkfifo(folder / "fifo")
    result = run_cli("commit", reg.path, "x", folder)
    assert result.exit_code == 0, result.output
    record = reg.version("x")[1]
    assert sorted(record.files) == ["config.json", "inside.json"]
    assert sorted(record.source["skipped_files"]) == ["environ", "fifo", "passwd"]
    for name in ("environ", "passwd", "fifo"):
        assert f"'{name}' not stored" in result.output, result.output
    stored = b"".join(reg.objects.get_blob(h) for h in record.files.values())
    assert b"password" not in stored and b"PATH=" not in stored
    # Asked for, links are followed.
    os.unlink(folder / "fifo")
    assert run_cli("commit", reg.path, "y", folder, "--follow-links").exit_code == 0
    assert reg.objects.get_blob(reg.version("y")[1].files["passwd"]) == b"password"


def test_index_entries_and_shards_outside_the_folder_are_refused(reg, tmp_path):
    other = _finetune(tmp_path / "other")
    folder = tmp_path / "ft"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    weight_map = {name: "../other/ft/model.safetensors" for name in finetune_state(0)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _refused(reg, [folder], "outside the finetune folder")
    (folder / "model.safetensors.index.json").unlink()
    (folder / "model.safetensors").symlink_to(other / "model.safetensors")
    _refused(reg, [folder], "outside the finetune folder")
    result = run_cli("commit", reg.path, "y", folder, "--follow-links")  # asked for
    assert result.exit_code == 0, result.output
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")  # would block the safetensors reader
    _refused(reg, [folder], "not a regular file")


def test_a_hugging_face_cache_snapshot_is_read_through_its_blob_links(reg, tmp_path):
    """The hub cache links snapshots/<rev>/<file> to ../../blobs/<sha>: that one layout is followed."""
    source = _finetune(tmp_path)
    repo = tmp_path / "models--org--ft"
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for name in ("model.safetensors", "config.json"):
        shutil.copy(source / name, repo / "blobs" / name.upper())
        (snapshot / name).symlink_to(Path("../../blobs") / name.upper())
    result = run_cli("commit", reg.path, "x", snapshot)
    assert result.exit_code == 0 and "not stored" not in result.output, result.output
    assert sorted(reg.version("x")[1].files) == ["config.json"]


# -- finding 11: say what was skipped; ratios that mean something -----------------------------
def test_a_huge_side_file_is_skipped_with_a_warning(reg, tmp_path):
    folder = _finetune(tmp_path)
    with open(folder / "config.json", "r+b") as fh:
        fh.truncate(1 << 30)  # sparse: no disk used
    result = run_cli("commit", reg.path, "x", folder)
    assert result.exit_code == 0, result.output
    assert "'config.json' not stored" in result.output and "larger than the 64 MiB" in result.output
    assert reg.version("x")[1].files == {}


def test_the_summary_ratio_of_a_version_made_mostly_of_side_files_means_something(reg, tmp_path):
    folder = _finetune(tmp_path)
    (folder / "big.bin.txt").write_bytes(os.urandom(2 << 20))  # incompressible: 2 MB of blob
    result = run_cli("commit", reg.path, "x", folder)
    assert result.exit_code == 0, result.output
    assert "0.0x" not in result.output and "larger than fp16" in result.output, result.output
    assert "of it side files" in result.output


@pytest.mark.parametrize("bad_id", [-1, 10**9])
def test_token_ids_outside_the_models_vocabulary_are_refused_from_the_api(registry_copy, example, bad_id):
    """Batches given directly (no file, no config vocab_size): the tuner checks the ids against
    the model's embedding instead of failing inside torch."""
    from deltastore import InvalidInputError

    with Unchanged(registry_copy.path), pytest.raises(InvalidInputError, match=f"token id {bad_id}, outside"):
        registry_copy.commit("has_top", example.finetunes["has_top"], base="all", tune="dbms",
                             calibration=[{"input_ids": torch.tensor([[1, bad_id]])}], progress=False)
