"""The click CLI: the spellings scripts depend on, --json output, errors and exit codes."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from deltastore_cli.main import cli


def run(*args, ok=True):
    result = CliRunner().invoke(cli, ["--quiet", *map(str, args)], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output + result.stderr
    return result


@pytest.fixture
def reg(example, tmp_path):
    path = tmp_path / "reg"
    run("init", path, "--reference", example.reference)
    run("base", "build", path, "--name", "all", *example.finetunes.values())
    return path


def test_full_workflow(example, reg, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = json.loads(run("commit", reg, "has_top", example.finetunes["has_top"], "--method", "bitdelta", "--base", "all",
                         "-m", "first", "--json").stdout)
    assert out["version"] == 1 and out["method"] == "bitdelta" and out["base_name"] == "all"
    run("commit", reg, "has_top", example.finetunes["has_top"], "--method", "dare", "--drop-rate", "0.99",
        "--base", "all", "-m", "second")
    run("commit", reg, "has_small", example.finetunes["has_small"], "--method", "deltadq", "--group-size", "8",
        "--keep", "1", "--bits", "2")

    listing = json.loads(run("ls", reg, "--json").stdout)
    assert {t["task"]: t["latest"] for t in listing["tasks"]} == {"has_small": 1, "has_top": 2}
    assert listing["bases"] == ["all"]

    show = json.loads(run("show", reg, "has_top", "--json").stdout)
    for field in ("method", "lam1", "lam2", "base", "own_bytes", "ratio_fp16"):
        assert field in show, field
    assert show["method"] == "dare" and show["config"]["drop_rate"] == 0.99 and show["lam2"] == 1.0
    assert show["config"]["layout"] == "gaps"  # what deltastore writes unless asked for the format 1.0 mask
    assert show["ratio_fp16"] > 1
    assert "lam1=" in run("show", reg, "has_top@1").output

    log = json.loads(run("log", reg, "has_top", "--json").stdout)
    assert [v["message"] for v in log] == ["second", "first"]

    run("materialize", reg, "has_top@1", "--out", tmp_path / "out", "--dtype", "float32")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert model.config.num_labels == 2

    assert json.loads(run("verify", reg, "--json").stdout) == {"ok": True, "problems": []}
    assert "removed 1 version" not in run("rm", reg, "has_top@1").output
    removed = json.loads(run("gc", reg, "--json").stdout)
    assert removed["records"] >= 1


def test_errors_are_one_line_with_exit_codes(example, reg, tmp_path):
    missing = run("show", reg, "nope", ok=False)
    assert missing.exit_code == 3
    assert missing.stderr.strip().startswith("error: ") and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1

    not_registry = run("ls", tmp_path, ok=False)
    assert not_registry.exit_code == 3 and "not a deltastore registry" in not_registry.stderr

    stray = run("commit", reg, "t", example.finetunes["has_top"], "--drop-rate", "0.9", ok=False)
    assert stray.exit_code == 2 and "--drop-rate does not apply to --method bitdelta" in stray.stderr
    stray = run("commit", reg, "t", example.finetunes["has_top"], "--method", "deltadq", "--mask-layout", "hash",
                ok=False)
    assert stray.exit_code == 2 and "--mask-layout does not apply to --method deltadq" in stray.stderr

    bad_name = run("commit", reg, "../evil", example.finetunes["has_top"], ok=False)
    assert bad_name.exit_code == 1 and "invalid task name" in bad_name.stderr

    bad_version = run("show", reg, "has_top@x", ok=False)
    assert bad_version.exit_code == 1 and "TASK@N" in bad_version.stderr

    with pytest.raises(Exception):
        CliRunner().invoke(cli, ["--debug", "show", str(reg), "nope"], catch_exceptions=False)


def test_verify_reports_corruption_with_exit_4(example, reg):
    run("commit", reg, "has_top", example.finetunes["has_top"], "--base", "all")
    record_dir = reg / "objects" / "records"
    victim = sorted(p for p in record_dir.rglob("*") if p.is_file())[0]
    victim.write_bytes(victim.read_bytes() + b"x")
    result = run("verify", reg, "--json", ok=False)
    assert result.exit_code == 4
    report = json.loads(result.stdout)
    assert not report["ok"] and any(victim.name in p["object"] for p in report["problems"])


@pytest.mark.parametrize("flag", [[], ["--compress-reference"]])
def test_init_compress_reference(example, tmp_path, flag):
    """The reference's arrays are stored raw by default (fast cold reads), with zstd on request;
    either way they read back to the same reference."""
    from deltastore import Registry

    path = tmp_path / "reg"
    run("init", path, "--reference", example.reference, *flag)
    reg = Registry(path)
    codecs = {reg.objects.open_array(e.arrays["data"]).layout.zstd for e in reg.reference().tensors.values()}
    assert codecs == {bool(flag)}
    from deltastore.sources import open_source

    source = open_source(example.reference)
    for name in reg.reference().tensors:
        assert torch.equal(reg._reference_tensor(reg.reference(), name), source.get(name))
