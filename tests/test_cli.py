"""The click CLI: the spellings scripts depend on, --json output, errors and exit codes."""

from __future__ import annotations

import json
import re

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
    stray = run("commit", reg, "t", example.finetunes["has_top"], "--method", "deltadq", "--config", "layout=hash",
                ok=False)
    assert stray.exit_code == 2 and "layout" in stray.stderr and "deltadq" in stray.stderr

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


def test_read_commands_do_not_import_torch(example, reg):
    """`--help`, `ls`, `log`, `show` answer at once: they never import torch or transformers
    (benchmarks/cli_startup.py measures the time; this holds the behaviour)."""
    import subprocess
    import sys

    run("commit", reg, "has_top", example.finetunes["has_top"], "--base", "all")
    probe = ("import sys; from deltastore_cli.main import cli\n"
             "try:\n    cli(sys.argv[1:])\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
             "heavy = sorted(m for m in ('torch', 'transformers', 'zarr') if m in sys.modules)\n"
             "assert not heavy, heavy")
    for args in (["--help"], ["commit", "--help"], ["ls", reg], ["log", reg, "has_top"], ["show", reg, "has_top@latest"],
                 ["base", "ls", reg], ["base", "show", reg, "all"]):
        done = subprocess.run([sys.executable, "-c", probe, *map(str, args)], capture_output=True, text=True)
        assert done.returncode == 0, (args, done.stderr)


def test_ctrl_c_exits_130_and_points_at_gc(reg, monkeypatch):
    from deltastore.catalog import Catalog

    def interrupted(self, task, version=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(Catalog, "version_hashes", interrupted)
    result = run("log", reg, "t", ok=False)
    assert result.exit_code == 130
    assert f"deltastore gc {reg}" in result.stderr


def test_rm_of_a_whole_task_asks_or_needs_all(example, reg, monkeypatch):
    from deltastore_cli import main

    for seed in (0, 1):
        run("commit", reg, "t", example.finetunes["has_top"], "--method", "dare", "--seed", seed)
    refused = run("rm", reg, "t", ok=False)  # no terminal, no --all: nothing removed
    assert refused.exit_code == 2 and "--all" in refused.stderr and "removes all 2 version(s)" in refused.stderr
    assert [v["version"] for v in json.loads(run("log", reg, "t", "--json").stdout)] == [2, 1]

    monkeypatch.setattr(main, "_interactive", lambda: True)
    declined = CliRunner().invoke(cli, ["rm", str(reg), "t"], input="n\n")
    assert declined.exit_code == 1 and "remove all 2 version(s) of 't'?" in declined.stderr
    assert len(json.loads(run("log", reg, "t", "--json").stdout)) == 2
    assert json.loads(run("rm", reg, "t@latest", "--json").stdout)["removed"] == [2]  # one version, no question
    accepted = CliRunner().invoke(cli, ["rm", str(reg), "t", "--json"], input="y\n")
    assert accepted.exit_code == 0 and json.loads(accepted.stdout)["removed"] == [1]

    run("commit", reg, "t", example.finetunes["has_top"])
    monkeypatch.setattr(main, "_interactive", lambda: False)
    assert json.loads(run("rm", reg, "t", "--all", "--json").stdout)["removed"] == [3]  # numbers never reused


def test_ls_log_show_verify_say_what_they_hold(example, reg):
    run("commit", reg, "has_top", example.finetunes["has_top"], "--base", "all", "-m", "first")
    run("commit", reg, "has_top", example.finetunes["has_top"], "--method", "dare", "-m", "second")
    run("commit", reg, "a_much_longer_task_name", example.finetunes["has_small"])

    listing = json.loads(run("ls", reg, "--json").stdout)
    for task in listing["tasks"]:
        assert task["own_bytes"] > 0 and task["ratio_fp16"] > 1
    lines = run("ls", reg).stdout.splitlines()
    assert lines[0].startswith("TASK") and len({line.index("  ", len("a_much_longer_task_name@1")) for line in
                                                lines[:3]}) == 1  # the second column starts at one place
    assert "base vectors: all" in lines[-1]
    log = json.loads(run("log", reg, "has_top", "--json").stdout)
    assert all(v["own_bytes"] > 0 for v in log) and log[0]["own_bytes"] < log[1]["own_bytes"] * 2
    assert "KB" in run("log", reg, "has_top").stdout

    # No --tune: nothing is fitted, and show says so instead of naming a tuner.
    plain = run("show", reg, "has_top@2").stdout
    assert "tuner=" not in plain and "no base vector, so lam1=0 and lam2=1" in plain
    assert "closed form" in run("show", reg, "has_top@1").stdout
    show = json.loads(run("show", reg, "has_top@1", "--json").stdout)
    assert show["delta_rows"] > show["unchanged_rows"] > 0  # the example leaves unseen tokens' rows alone
    assert sum(show["parts"].values()) == show["own_bytes"] and show["parts"]["codes"] > 0
    assert re.search(r"own bytes  codes [0-9.]+ KB \(\d+%\), .*small tensors", run("show", reg, "has_top@1").stdout)
    assert f"{show['unchanged_rows']} of {show['delta_rows']} rows" in run("show", reg, "has_top@1").stdout

    text = run("verify", reg).stdout
    assert text.startswith("ok: rehashed ") and "3 versions" in text and "1 base vector(s)" in text


def test_commit_reports_rows_and_warns_when_nothing_was_finetuned(example, reg):
    out = run("commit", reg, "t", example.finetunes["has_top"], "--base", "all")
    assert "rows unchanged" not in out.stdout and "rows of the delta matrices unchanged" in out.stdout
    assert "warning" not in out.stderr
    same = run("commit", reg, "bare", example.reference)
    assert "nothing was finetuned" in same.stderr and "all" not in same.stdout.split("rows:")[1][:5]


def test_base_ls_show_rm(example, reg):
    run("base", "build", reg, "--name", "spare", example.finetunes["has_top"])
    run("commit", reg, "t", example.finetunes["has_top"], "--base", "all")
    listing = {b["name"]: b for b in json.loads(run("base", "ls", reg, "--json").stdout)}
    assert listing["all"]["used_by"] == ["t@1"] and listing["spare"]["used_by"] == []
    assert listing["all"]["bytes_on_disk"] > 0 and len(listing["all"]["sources"]) == 3
    assert "t@1" in run("base", "show", reg, "all").stdout

    refused = run("base", "rm", reg, "all", ok=False)
    assert refused.exit_code == 1 and "used by t@1" in refused.stderr and "deltastore rm" in refused.stderr
    assert json.loads(run("base", "rm", reg, "spare", "--json").stdout)["name"] == "spare"
    assert [b["name"] for b in json.loads(run("base", "ls", reg, "--json").stdout)] == ["all"]
    run("rm", reg, "t@1")
    run("base", "rm", reg, "all")
    assert run("base", "ls", reg).stdout.strip() == "(no base vectors)"
    assert json.loads(run("verify", reg, "--json").stdout)["ok"]
    assert run("base", "show", reg, "all", ok=False).exit_code == 3


def test_nothing_to_commit_when_the_latest_version_holds_the_same_finetune(example, reg, tmp_path):
    import shutil

    first = json.loads(run("commit", reg, "t", example.finetunes["has_top"], "--base", "all", "--json").stdout)
    assert first["committed"] and first["version"] == 1
    again = run("commit", reg, "t", example.finetunes["has_top"], "--base", "all", "-m", "again")
    assert again.stdout.startswith("nothing to commit: t@1 already holds")
    assert json.loads(run("commit", reg, "t", example.finetunes["has_top"], "--base", "all", "--json").stdout)[
        "committed"] is False
    copy = tmp_path / "copy"  # the same content elsewhere is the same finetune
    shutil.copytree(example.finetunes["has_top"], copy)
    assert run("commit", reg, "t", copy, "--base", "all").stdout.startswith("nothing to commit")
    assert [v["version"] for v in json.loads(run("log", reg, "t", "--json").stdout)] == [1]

    # Other settings, or other weights, or a side file changed: a new version each time.
    assert json.loads(run("commit", reg, "t", copy, "--json").stdout)["version"] == 2  # no base
    assert json.loads(run("commit", reg, "t", copy, "--method", "dare", "--seed", "1", "--json").stdout)["version"] == 3
    assert json.loads(run("commit", reg, "t", copy, "--method", "dare", "--seed", "2", "--json").stdout)["version"] == 4
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("}", ', "note": 1}', 1))
    assert json.loads(run("commit", reg, "t", copy, "--method", "dare", "--seed", "2", "--json").stdout)["version"] == 5
    assert json.loads(run("commit", reg, "t", example.finetunes["has_small"], "--method", "dare", "--seed", "2",
                          "--json").stdout)["version"] == 6
    # Not the latest any more: committing version 1's finetune again is a new version (like git).
    assert json.loads(run("commit", reg, "t", example.finetunes["has_top"], "--base", "all", "--json").stdout)[
        "version"] == 7


def test_diff_two_versions(example, reg):
    from deltastore import Registry

    run("commit", reg, "t", example.finetunes["has_top"], "--base", "all")
    run("commit", reg, "t", example.finetunes["has_top"], "--method", "dare", "--drop-rate", "0.9")
    out = json.loads(run("diff", reg, "t@1", "t@latest", "--json").stdout)
    assert (out["a"]["method"], out["b"]["method"]) == ("bitdelta", "dare")
    assert out["a"]["own_bytes"] > 0 and out["b"]["own_bytes"] > 0 and out["b"]["lam1"] == 0
    registry = Registry(reg)
    a, b = registry.materialize("t", 1), registry.materialize("t", 2)
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert out["relative_error"][name] == pytest.approx(float((a[name].double() - b[name].double()).norm()
                                                              / b[name].double().norm()))
    assert out["relative_error"]["classifier.bias"] == 0.0  # stored losslessly by both
    assert out["identical_tensors"] >= 1 and out["max_relative_error"] > 0
    assert out["only_in_a"] == out["only_in_b"] == []
    text = run("diff", reg, "t@1", "t@2", "--top", "3").stdout
    assert "lam1=" in text and "relative error" in text and len(text.splitlines()) == 6 + 2 + 3
    same = json.loads(run("diff", reg, "t@2", "t@2", "--json").stdout)
    assert same["max_relative_error"] == 0


def _hub_cache(cache, repo_id: str, model_dir) -> None:
    """Lay ``model_dir`` out as huggingface_hub's cache holds a downloaded repo."""
    import shutil

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


def test_hub_repo_ids_resolve_through_the_cache_offline(example, tmp_path):
    """`--reference ORG/NAME` and FINETUNE as ORG/NAME come from huggingface_hub's cache
    (no network here: HF_HUB_OFFLINE=1 and a cache filled beforehand)."""
    import os
    import subprocess
    import sys

    cache = tmp_path / "hub"
    _hub_cache(cache, "acme/tiny-bert", example.reference)
    _hub_cache(cache, "acme/tiny-bert-has-top", example.finetunes["has_top"])
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))

    def deltastore(*args):
        return subprocess.run([sys.executable, "-m", "deltastore_cli.main", "-q", *map(str, args)], env=env,
                              capture_output=True, text=True)

    reg = tmp_path / "reg"
    assert deltastore("init", reg, "--reference", "acme/tiny-bert").returncode == 0
    done = deltastore("commit", reg, "t", "acme/tiny-bert-has-top", "--json")
    assert done.returncode == 0, done.stderr
    local = run("commit", reg, "t", example.finetunes["has_top"])  # the same content as a local path
    assert local.stdout.startswith("nothing to commit")

    missing = deltastore("commit", reg, "t", "acme/not-in-cache")
    assert missing.returncode == 3 and "acme/not-in-cache" in missing.stderr and "HF_HUB_OFFLINE" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    neither = run("commit", reg, "t", tmp_path / "no" / "such" / "dir", ok=False)
    assert neither.exit_code == 2 and "no such file or directory" in neither.stderr


def test_shell_completion_offers_task_and_base_names(example, reg):
    run("commit", reg, "has_top", example.finetunes["has_top"])
    run("commit", reg, "has_small", example.finetunes["has_small"])

    def complete(words: str) -> list[str]:
        env = {"_DELTASTORE_COMPLETE": "bash_complete", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1))}
        result = CliRunner().invoke(cli, [], env=env, prog_name="deltastore")
        assert result.exit_code == 0, result.output
        return [line.split(",", 1)[1] for line in result.output.splitlines() if line]  # "type,value" lines

    assert complete("deltastore ba") == ["base"]
    assert complete(f"deltastore show {reg} has_") == ["has_small", "has_top"]
    assert complete(f"deltastore diff {reg} has_top@1 has_s") == ["has_small"]
    assert complete(f"deltastore base rm {reg} ") == ["all"]
    assert complete(f"deltastore log {reg.parent / 'nowhere'} ") == []


def test_small_tensor_bits_is_asked_for_and_shown(example, reg):
    """Lossy small tensors only when asked (--small-tensor-bits), and show says which."""
    run("commit", reg, "exact", example.finetunes["has_top"])
    run("commit", reg, "lossy", example.finetunes["has_top"], "--small-tensor-bits", "6")
    assert "packed, exact)" in run("show", reg, "exact").stdout
    assert "small tensors lossy, 6 mantissa bits kept)" in run("show", reg, "lossy").stdout
    exact, lossy = (json.loads(run("show", reg, t, "--json").stdout) for t in ("exact", "lossy"))
    assert exact["small_tensor_bits"] is None and lossy["small_tensor_bits"] == 6
    assert lossy["parts"]["small_tensors"] < exact["parts"]["small_tensors"]
