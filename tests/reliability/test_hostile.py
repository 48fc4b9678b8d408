"""Hostile and wrong input: each is refused with a clear message and the right exit code,
and nothing stored changes (every file's bytes compared before and after)."""

from __future__ import annotations

import pickle
import resource
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from deltastore import (CorruptObjectError, DeltastoreError, FormatVersionError, IncompatibleFinetuneError,
                        InvalidInputError, NotFoundError, Registry, UnknownMethodError)
from deltastore.storage.objects import object_key
from deltastore.storage.records import check_file_name, content_hash, pack, unpack
from deltastore_cli.main import cli

from .helpers import finetune_state, reference_state, tree_bytes, write_model

# exit codes of the CLI (cli/deltastore_cli/main.py): 1 bad input, 3 not found, 4 corrupt, 5 newer format
BAD_INPUT, NOT_FOUND, CORRUPT, NEWER = 1, 3, 4, 5



def run_cli(*args: str):
    return CliRunner().invoke(cli, ["-q", *map(str, args)], obj={})


class Unchanged:
    """``with Unchanged(path):`` asserts no file under ``path`` changed (locks aside)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.before = tree_bytes(self.path)

    def __exit__(self, *exc):
        after = tree_bytes(self.path)
        changed = sorted(k for k in set(self.before) | set(after) if self.before.get(k) != after.get(k))
        assert not changed, f"stored files changed: {changed[:5]}"


BAD_NAMES = ["../x", "a/b", "/abs", ".hidden", "..", "ünïcode", "", "x" * 200, "task@abc", "x\n", "a b",
             "-rf", "a\x00b", "t1/../../etc"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_task_and_base_names(reg, tiny, name, tmp_path):
    with Unchanged(reg.path):
        with pytest.raises(InvalidInputError, match="invalid task name"):
            reg.commit(name, tiny.finetunes["a"], progress=False)
        with pytest.raises(InvalidInputError, match="invalid base name"):
            reg.build_base(name, [tiny.finetunes["a"]], progress=False)
        with pytest.raises(InvalidInputError):
            reg.materialize(name)
        if "\x00" not in name:  # a NUL cannot reach argv
            result = run_cli("commit", reg.path, name, tiny.finetunes["a"])
            if name.startswith("-"):  # click takes it for an option: a usage error
                assert result.exit_code == 2, result.output
                return
            assert result.exit_code == BAD_INPUT and "invalid task name" in result.output, result.output
            result = run_cli("materialize", reg.path, name, "--out", tmp_path / "out")
            assert result.exit_code == BAD_INPUT, result.output
    assert not (reg.path.parent / "x").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec,code", [("t1@abc", BAD_INPUT), ("t1@-1", BAD_INPUT), ("t1@1.5", BAD_INPUT),
                                       ("t1@", BAD_INPUT), ("t1@²", BAD_INPUT), ("t1@٣", BAD_INPUT),
                                       ("t1@99", NOT_FOUND), ("t1@0", NOT_FOUND), ("nope@1", NOT_FOUND),
                                       ("../t1@1", BAD_INPUT), ("t1@1@2", BAD_INPUT)])
def test_bad_version_specs(reg, spec, code, tmp_path):
    with Unchanged(reg.path):
        result = run_cli("materialize", reg.path, spec, "--out", tmp_path / "out")
        assert result.exit_code == code, result.output
        assert result.output.startswith("error: ") and "Traceback" not in result.output


# -- input models ---------------------------------------------------------------------------
def _model(tmp_path: Path, name: str, change) -> Path:
    state = finetune_state(0)
    change(state)
    return write_model(tmp_path / name, state)


BAD_MODELS = {
    # name: (how the finetune is changed, error, words the message must hold)
    "unrelated": (lambda s: s.update({k: torch.randn_like(v) for k, v in s.items() if v.is_floating_point()}),
                  IncompatibleFinetuneError, "another model"),
    "shape": (lambda s: s.update({"lin.weight": torch.zeros(64, 65)}), IncompatibleFinetuneError, "shape"),
    "dtype": (lambda s: s.update({"lin.weight": torch.zeros(64, 64, dtype=torch.int32)}),
              IncompatibleFinetuneError, "int32"),
    "missing": (lambda s: s.pop("lin.weight"), IncompatibleFinetuneError, "missing"),
    "nan lossy": (lambda s: s["emb.weight"].__setitem__((3, 4), float("nan")), InvalidInputError, "NaN"),
    "inf lossy": (lambda s: s["lin.weight"].__setitem__((0, 0), float("inf")), InvalidInputError, "infinite"),
    "nan small": (lambda s: s["lin.bias"].__setitem__(5, float("nan")), InvalidInputError, "'lin.bias'"),
    "inf head": (lambda s: s["head.weight"].__setitem__((0, 0), float("-inf")), InvalidInputError, "'head.weight'"),
    "empty": (lambda s: s.clear(), InvalidInputError, "no tensors"),
}


@pytest.mark.parametrize("kind", sorted(BAD_MODELS))
def test_bad_finetunes_change_nothing(reg, tmp_path, kind):
    change, error, words = BAD_MODELS[kind]
    model = _model(tmp_path, kind, change)
    with Unchanged(reg.path):
        with pytest.raises(error, match=words):
            reg.commit("t1", model, progress=False)
        with pytest.raises(error, match=words):
            reg.commit("t1", model, base="b1", method="dare", progress=False)
        result = run_cli("commit", reg.path, "t1", model)
        assert result.exit_code == BAD_INPUT and words in result.output, result.output
        if kind not in ("unrelated", "empty", "nan small", "inf head"):  # a base reads only big matrices
            with pytest.raises(error, match=words):
                reg.build_base("new", [model], progress=False)


class _Bomb:
    """Unpickling this would create the file named in ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_only_inputs_are_refused_unread(reg, tiny, tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("pytorch_model.bin", "model.pt", "weights.ckpt"):
        (folder / name).write_bytes(pickle.dumps(_Bomb(str(marker))))
    (folder / "config.json").write_text("{}")
    with Unchanged(reg.path):
        with pytest.raises(InvalidInputError, match="pickle"):
            reg.commit("t1", folder, progress=False)
        with pytest.raises(InvalidInputError, match="pickle"):
            reg.commit("t1", folder / "pytorch_model.bin", progress=False)
        result = run_cli("commit", reg.path, "t1", folder)
        assert result.exit_code == BAD_INPUT and "pickle" in result.output
    with pytest.raises(InvalidInputError, match="pickle"):
        Registry.init(tmp_path / "new", folder, progress=False)
    # next to safetensors weights a pickle file is skipped, never read, and the skip recorded
    mixed = write_model(tmp_path / "mixed", finetune_state(0))
    (mixed / "pytorch_model.bin").write_bytes(pickle.dumps(_Bomb(str(marker))))
    record = reg.commit("t9", mixed, progress=False)
    assert "pytorch_model.bin" in record.source["skipped_files"]
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../x", "/abs", "a//b", "a/./b", "a/", "notes\\v1.txt", "C:x", "a\nb", "a\x00b",
                                  "\x1b[2Jx", "x" * 256, "a/" * 2100 + "b"])
def test_file_name_rule_refuses(name):
    """specs/format.md §2.1: one rule, check_file_name, for writers and readers."""
    with pytest.raises(InvalidInputError, match="not a plain relative path"):
        check_file_name(name, "test", InvalidInputError)
    with pytest.raises(CorruptObjectError, match="not a plain relative path"):
        check_file_name(name, "test")


@pytest.mark.parametrize("name", ["config.json", "tokenizer/vocab.txt", ".hidden", "a b", "ünïcode", "x" * 255])
def test_file_name_rule_accepts(name):
    assert check_file_name(name, "test") == name


def test_side_file_the_reader_would_refuse_is_refused_before_writing(reg, tmp_path):
    folder = write_model(tmp_path / "ft", finetune_state(0))
    (folder / "notes\\v1.txt").write_text("a name Windows reads as a folder")
    with Unchanged(reg.path):
        with pytest.raises(InvalidInputError, match=r"not a plain relative path.*rename or remove"):
            reg.commit("t9", folder, progress=False)
    assert "t9" not in reg.tasks()


def test_empty_and_bad_reference(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    save_file({}, str(empty / "model.safetensors"))
    with pytest.raises(InvalidInputError, match="no tensors"):
        Registry.init(tmp_path / "r1", empty, progress=False)
    nan = write_model(tmp_path / "nan", {**reference_state(), "lin.bias": torch.full((64,), float("nan"))})
    with pytest.raises(InvalidInputError, match="NaN"):
        Registry.init(tmp_path / "r2", nan, progress=False)
    assert not (tmp_path / "r2" / "registry.msgpack").exists()
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "model.safetensors").write_bytes(b"\xff" * 64)
    result = run_cli("init", tmp_path / "r3", "--reference", garbage)
    assert result.exit_code == BAD_INPUT and "not a readable safetensors file" in result.output


# -- crafted records and arrays -------------------------------------------------------------
def _plant(reg: Registry, data: bytes) -> str:
    """Store ``data`` as a record under its own hash (what a hostile registry can do)."""
    digest = content_hash(data)
    path = reg.path / object_key("records", digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def _point(reg: Registry, task: str, digest: str, number: int = 1) -> None:
    (reg.path / "refs" / "tasks" / task).write_bytes(pack({"format": 1, "kind": "task_ref",
                                                           "versions": [[number, digest]]}))


def _t1_dict(reg: Registry) -> dict:
    digest, _ = reg.version("t1")
    return unpack(reg.objects.record_bytes(digest), "t1")


def _with(d: dict, path: tuple, value) -> dict:
    import copy

    d = copy.deepcopy(d)
    target = d
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return d


CRAFTED = {
    # name: (change to t1@1's record dict or raw bytes, error, words in the message)
    "newer record format": (lambda d: _with(d, ("format",), 2), FormatVersionError, "upgrade deltastore"),
    "unknown compressor": (lambda d: _with(d, ("tensors", "emb.weight", "codec"), "zstdelta9000"),
                           UnknownMethodError, "unknown compressor 'zstdelta9000'"),
    "int for str": (lambda d: _with(d, ("task",), 5), CorruptObjectError, "expected str, found int"),
    "str for int": (lambda d: _with(d, ("version",), "1"), CorruptObjectError, "expected int"),
    "bool for int": (lambda d: _with(d, ("version",), True), CorruptObjectError, "expected int"),
    "nested junk": (lambda d: _with(d, ("tensors",), {"x": [[[[{}]]]]}), CorruptObjectError, "expected dict"),
    "huge shape": (lambda d: _with(d, ("tensors", "emb.weight", "shape"), [10**9, 10**9]), CorruptObjectError,
                   "beyond any model"),
    "many dims": (lambda d: _with(d, ("tensors", "emb.weight", "shape"), [1] * 40), CorruptObjectError,
                  "beyond any model"),
    "path in array hash": (lambda d: _with(d, ("tensors", "emb.weight", "arrays", "signs"), "../../../../etc/passwd"),
                           CorruptObjectError, "not an object name"),
    "path in file name": (lambda d: _with(d, ("files",), {"../../evil.sh": d["files"]["config.json"]}),
                          CorruptObjectError, "not a plain relative path"),
    "absolute file name": (lambda d: _with(d, ("files",), {"/tmp/evil": d["files"]["config.json"]}),
                           CorruptObjectError, "not a plain relative path"),
    "backslash in file name": (lambda d: _with(d, ("files",), {"notes\\v1.txt": d["files"]["config.json"]}),
                               CorruptObjectError, "not a plain relative path"),
    "drive in file name": (lambda d: _with(d, ("files",), {"C:evil.txt": d["files"]["config.json"]}),
                           CorruptObjectError, "not a plain relative path"),
    "shape disagrees with arrays": (lambda d: _with(d, ("tensors", "emb.weight", "shape"), [512, 32]),
                                    CorruptObjectError, "inconsistent"),
    "missing reference tensor": (lambda d: _with(d, ("tensors", "emb.weight", "ref"), "nope.weight"),
                                 CorruptObjectError, "inconsistent"),
    "other task's record": (lambda d: _with(d, ("task",), "t2"), CorruptObjectError, "the ref is damaged"),
    "ext type": (b"\x83\xa6format\x01\xa4kind\xactask_version\xa4task\xd4\x01\x00", CorruptObjectError,
                 "not a valid msgpack record"),
    "array of 4G items": (b"\xdd\xff\xff\xff\xff\x01", CorruptObjectError, "not a valid msgpack record"),
    "string of 4 GB": (b"\x81\xa4task\xdb\xff\xff\xff\xff", CorruptObjectError, "not a valid msgpack record"),
    "map of 4G items": (b"\xdf\xff\xff\xff\xff", CorruptObjectError, "not a valid msgpack record"),
    "not a map": (b"\x93\x01\x02\x03", CorruptObjectError, "expected a msgpack map"),
    "bytes keys": (pack({b"format": 1}), CorruptObjectError, "'format' must be an integer"),
    "garbage": (b"\xc1\xc1\xc1 not msgpack", CorruptObjectError, "not a valid msgpack record"),
}


@pytest.mark.parametrize("kind", sorted(CRAFTED))
def test_crafted_records(reg, kind, tmp_path):
    change, error, words = CRAFTED[kind]
    if isinstance(change, bytes):
        data = change
    else:  # t1@1's record, planted as task 'evil' with one field changed
        data = pack(change({**_t1_dict(reg), "task": "evil"}))
    _point(reg, "evil", _plant(reg, data))
    task = "evil"
    mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with Unchanged(reg.path):
        with pytest.raises(error, match=words):
            reg.save_pretrained(task, tmp_path / "out")
        result = run_cli("materialize", reg.path, task, "--out", tmp_path / "out2")
        code = {FormatVersionError: NEWER, CorruptObjectError: CORRUPT}.get(error, BAD_INPUT)
        assert result.exit_code == code and words in result.output, result.output
        problems = reg.verify()
        # verify checks bytes and names, not whether a well-hashed record makes sense
        semantic = ("unknown compressor", "missing reference tensor", "shape disagrees with arrays")
        assert any(task in p["used_by"] or task in p["object"] for p in problems) or kind in semantic
    assert time.perf_counter() - start < 10  # fails fast ...
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - mem < 200_000  # ... without allocating (KiB)
    assert not (tmp_path.parent / "evil.sh").exists() and not Path("/tmp/evil").exists()


@pytest.mark.parametrize("meta", [
    {"shape": [10**15]}, {"shape": [10**5, 10**5, 10**5]}, {"shape": [-1]}, {"shape": "big"},
    {"chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [10**15]}}},
    {"data_type": "complex128"}, {"data_type": "object"}, {"codecs": [{"name": "gzip"}]},
    {"codecs": [{"name": "bytes"}, {"name": "blosc"}]}, {"fill_value": 7}, {"zarr_format": 2},
    {"node_type": "group"}, {"chunk_key_encoding": {"name": "v2", "configuration": {"separator": "/"}}},
])
def test_crafted_zarr_json_fails_fast(reg, meta):
    """A published array whose zarr.json declares absurd or foreign metadata."""
    import json

    _, record = reg.version("t1")
    digest = record.tensors["emb.weight"].arrays["signs"]
    path = reg.path / object_key("arrays", digest) / "zarr.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **meta}))
    mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with Unchanged(reg.path):
        with pytest.raises(CorruptObjectError, match=f"{digest[:12]}.*zarr.json"):
            reg.materialize("t1")
    assert time.perf_counter() - start < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - mem < 200_000


def test_newer_registry_format(reg, tiny):
    info = unpack((reg.path / "registry.msgpack").read_bytes(), "info")
    (reg.path / "registry.msgpack").write_bytes(pack({**info, "version": [2, 0]}))
    with Unchanged(reg.path):
        with pytest.raises(FormatVersionError, match="upgrade deltastore"):
            Registry(reg.path)
        for args in (["ls", reg.path], ["verify", reg.path], ["gc", reg.path],
                     ["commit", reg.path, "t1", tiny.finetunes["a"]]):
            result = run_cli(*args)
            assert result.exit_code == NEWER and "upgrade deltastore" in result.output, result.output


def test_hostile_ref_file_is_not_read_whole(reg):
    """A ref replaced by a huge file (or a device) is refused before it is read."""
    big = reg.path / "refs" / "tasks" / "t2"
    with open(big, "wb") as fh:
        fh.truncate(1 << 34)  # 16 GiB, sparse
    mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CorruptObjectError, match="more than"):
        reg.versions("t2")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - mem < 100_000
    big.unlink()
    big.symlink_to("/dev/zero")
    with pytest.raises(CorruptObjectError, match="more than"):
        reg.versions("t2")
    assert [p["object"] for p in reg.verify()] == ["refs/tasks/t2"]


def test_unknown_method_and_config_change_nothing(reg, tiny):
    with Unchanged(reg.path):
        with pytest.raises(UnknownMethodError, match="known compressors are"):
            reg.commit("t1", tiny.finetunes["a"], method="zip", progress=False)
        with pytest.raises(DeltastoreError):
            reg.commit("t1", tiny.finetunes["a"], method="dare", config={"drop_rate": 7}, progress=False)
        with pytest.raises(DeltastoreError):
            reg.commit("t1", tiny.finetunes["a"], method="dare", config={"nonsense": 1}, progress=False)
        with pytest.raises(NotFoundError, match="no base vector named 'zz'"):
            reg.commit("t1", tiny.finetunes["a"], base="zz", progress=False)


def _zstd_bomb(declared: int) -> bytes:
    """A zstd frame header declaring ``declared`` decompressed bytes (8-byte size field,
    single segment), followed by a tiny RLE block: decoding it would allocate ``declared``."""
    header = b"\x28\xb5\x2f\xfd" + bytes([0b11100000]) + declared.to_bytes(8, "little")
    return header + bytes([0b00000011, 0, 0]) + b"\x00"


def test_zstd_bombs_are_refused_before_decompressing(reg):
    """A blob or an array chunk whose zstd frame declares a huge size is refused, not inflated."""
    from deltastore.storage.backend import zstd_content_size

    assert zstd_content_size(_zstd_bomb(100 << 30)) == 100 << 30
    _, record = reg.version("t1")
    blob = reg.path / object_key("blobs", record.files["config.json"])
    blob.write_bytes(_zstd_bomb(100 << 30))
    with pytest.raises(CorruptObjectError, match="declares 107374182400 decompressed size"):
        reg.objects.get_blob(record.files["config.json"])
    folder = reg.path / object_key("arrays", record.pack)  # the small tensors, packed (zstd)
    chunk = next(p for p in folder.iterdir() if p.name != "zarr.json")
    chunk.write_bytes(_zstd_bomb(100 << 30))
    mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CorruptObjectError, match="zstd frame declares 107374182400"):
        reg.materialize("t1")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - mem < 200_000
