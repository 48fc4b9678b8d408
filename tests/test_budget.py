"""Commit to a byte budget (issue 16): per tensor settings chosen within the real bytes on disk."""

from __future__ import annotations

import pytest

from deltastore import BudgetTooSmallError, InvalidInputError
from deltastore.engine.budget import BudgetPlan, Option

pytestmark = pytest.mark.usefixtures("one_thread")


def _delta_error(registry, task, example):
    """Squared error of the materialized weights against the finetune's, over every tensor."""
    from safetensors.torch import load_file

    want = load_file(str(next(example.finetunes[task].glob("*.safetensors"))))
    got = registry.materialize(task)
    return sum(float((got[n].double() - want[n].double()).pow(2).sum()) for n in want)


def test_select_is_the_least_error_within_the_budget():
    plan = BudgetPlan(menu=[None, None, None], options={
        "a": [Option(100, 1.0), Option(200, 0.5), Option(400, 0.1)],
        "b": [Option(100, 4.0), Option(200, 1.0), Option(400, 0.9)],
    }, fixed={"record": 50})
    assert plan.select(350) == {"a": 0, "b": 1}  # 100 bytes more buy the most error on b
    assert plan.select(450) == {"a": 1, "b": 1}
    assert plan.select(650) == {"a": 2, "b": 1}
    assert plan.select(10_000) == {"a": 2, "b": 2}
    with pytest.raises(BudgetTooSmallError, match="below the smallest") as refused:
        plan.select(249)
    assert refused.value.needed == 250 and refused.value.parts == {"record": 50, "deltas": 200}


def test_budgeted_commit_stays_within_real_bytes(registry_copy, example):
    task = "has_top"
    path = example.finetunes[task]
    loose = registry_copy.commit(task, path, max_bytes=10**9, progress=False)
    loose_stats = registry_copy.stats(task)
    tight_budget = loose_stats.own_bytes * 9 // 10
    tight = registry_copy.commit(task, path, max_bytes=tight_budget, progress=False)
    stats = registry_copy.stats(task)
    assert stats.own_bytes <= tight_budget < loose_stats.own_bytes
    summary = tight.source["budget"]
    # Checked before publishing with a draft record at least as large as the real one.
    assert summary["max_bytes"] == tight_budget and stats.own_bytes <= summary["checked_bytes"] <= tight_budget
    assert summary["checked_bytes"] - stats.own_bytes <= 70
    assert sum(row["tensors"] for row in summary["chosen"].values()) == sum(e.is_delta for e in tight.tensors.values())
    # Each entry carries its own setting; the version reads back and names the largest one.
    assert tight.method in {e.codec for e in tight.tensors.values() if e.is_delta}
    registry_copy.verify()
    assert _delta_error(registry_copy, task, example) > 0
    assert loose.source["budget"]["error"] < summary["error"]


def test_the_fixed_bytes_are_estimated_as_the_commit_stores_them(registry_copy, example):
    """Small tensors packed against the reference and side files patched against its files, as
    the commit does: the estimate before any delta is chosen is the version's real bytes to
    within its record (an estimate of whole arrays and plain side files was off by 2x)."""
    task = "has_top"
    record = registry_copy.commit(task, example.finetunes[task], max_bytes=10**9, progress=False)
    summary = record.source["budget"]
    parts = registry_copy.stats(task).parts
    fixed = summary["fixed_bytes"]
    assert fixed["side_files"] == parts["side_files"]
    assert fixed["whole_tensors"] == parts["small_tensors"]
    assert abs(summary["estimated_bytes"] - summary["checked_bytes"]) <= 0.1 * summary["checked_bytes"]


def test_budget_by_ratio_and_refused_budgets(registry_copy, example):
    task = "has_top"
    path = example.finetunes[task]
    before = registry_copy.versions(task) if task in registry_copy.tasks() else []
    with pytest.raises(BudgetTooSmallError, match="byte budget 1,000 is below what this finetune needs before any "
                                                  "delta") as refused:
        registry_copy.commit(task, path, max_bytes=1000, progress=False)
    before_deltas = refused.value.needed  # what the budget says it needs: asked for, it refuses at the deltas
    assert before_deltas == sum(refused.value.parts.values()) and "deltas" not in refused.value.parts
    with pytest.raises(BudgetTooSmallError, match="below the smallest") as refused:
        registry_copy.commit(task, path, max_bytes=before_deltas, progress=False)
    assert refused.value.needed > before_deltas and refused.value.parts["deltas"] > 0
    with pytest.raises(InvalidInputError, match="not both"):
        registry_copy.commit(task, path, max_bytes=10**6, ratio=10.0, progress=False)
    with pytest.raises(InvalidInputError, match="positive"):
        registry_copy.commit(task, path, ratio=0, progress=False)
    assert (registry_copy.versions(task) if task in registry_copy.tasks() else []) == before
    record = registry_copy.commit(task, path, ratio=2.0, progress=False)
    assert registry_copy.stats(task).own_bytes <= record.source["fp16_bytes"] / 2


def test_cli_budget_reports_its_choice(registry_copy, example):
    import json

    from click.testing import CliRunner

    from deltastore_cli.main import cli

    runner = CliRunner()
    args = ["commit", str(registry_copy.path), "has_top", str(example.finetunes["has_top"])]
    refused = runner.invoke(cli, args + ["--ratio", "3", "--config", "drop_rate=0.9"], obj={})
    assert refused.exit_code == 2 and "leave out --config" in refused.output
    refused = runner.invoke(cli, args + ["--ratio", "3", "--max-bytes", "100000"], obj={})
    assert refused.exit_code == 2 and "once" in refused.output
    done = runner.invoke(cli, args + ["--ratio", "3", "--method", "dare", "--json"], obj={})
    assert done.exit_code == 0, done.output
    data = json.loads(done.output)
    assert data["method"] == "dare" and data["own_bytes"] <= data["budget"]["max_bytes"]
    assert all(label.startswith("dare ") for label in data["settings"])
    assert sum(data["settings"].values()) == data["delta_tensors"]
    again = runner.invoke(cli, args + ["--ratio", "3", "--method", "dare"], obj={})
    assert again.exit_code == 0 and "nothing to commit" in again.output
    shown = runner.invoke(cli, ["show", str(registry_copy.path), "has_top"], obj={})
    assert shown.exit_code == 0 and f"at most {data['budget']['max_bytes']:,} bytes" in shown.output


def _two_layer_plan(registry, grams):
    """budget.plan on two 8 x 64 matrices (no pipeline: just what plan reads), menu BitDelta and
    DARE p=0.5: layer ``a``'s delta is tiny in its first column, ``b``'s is ``a``'s times 1.5."""
    from types import SimpleNamespace

    import torch

    from deltastore.engine import budget
    from deltastore.storage.records import ReferenceRecord

    g = torch.Generator().manual_seed(0)
    w_ref = {n: torch.randn(8, 64, generator=g) for n in ("a", "b")}
    delta_a = torch.randn(8, 64, generator=g)
    delta_a[:, 0] *= 1e-3
    deltas = {"a": delta_a, "b": 1.5 * torch.randn(8, 64, generator=g)}

    def read_all(names, what):
        for n in names:
            yield n, (w_ref[n], w_ref[n] + deltas[n], None)

    pipeline = SimpleNamespace(source=SimpleNamespace(names=lambda: ["a", "b"], files={}),
                               plan=SimpleNamespace(lossy={"a": "a", "b": "b"}), lossy=["a", "b"], read_all=read_all)
    menu = budget.menu_compressors([("bitdelta", {}), ("dare", {"drop_rate": 0.5, "value_bits": 16})])
    reference = registry.objects.get_record(registry.reference_hash(), ReferenceRecord)
    fixed = budget.fixed_part(pipeline, registry.objects, reference, "t", 10**9)
    return budget.plan(pipeline, registry.objects, menu, 0.0, {"a": 1, "b": 2}, "t", fixed, grams=grams)


def test_budget_weighs_a_layers_error_by_its_inputs(registry_copy):
    """Unweighted, BitDelta errs less than DARE p=0.5 on both matrices and costs less: both take
    it. When layer ``a``'s inputs are much larger along its first column (where its delta is
    tiny and BitDelta's one scale is far too large), its outputs err far more under BitDelta:
    with that Gram it takes DARE, ``b`` (no Gram) keeps BitDelta with its error unchanged."""
    import torch

    plain = _two_layer_plan(registry_copy, None)
    assert plain.select(10**9) == {"a": 0, "b": 0} and plain.weighted == 0
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x[:, 0] *= 1e4
    weighted = _two_layer_plan(registry_copy, {"a": x.T @ x})
    assert weighted.select(10**9) == {"a": 1, "b": 0} and weighted.weighted == 1
    assert [o.error for o in weighted.options["b"]] == [o.error for o in plain.options["b"]]
    assert [o.nbytes for o in weighted.options["a"]] == [o.nbytes for o in plain.options["a"]]
    assert "output error" in weighted.summary({"a": 1, "b": 0}, 10**9)["proxy"]
    # Inputs the same in every direction weigh nothing: the error is the plain one.
    same = _two_layer_plan(registry_copy, {"a": 7.0 * torch.eye(64, dtype=torch.float64)})
    assert [o.error for o in same.options["a"]] == pytest.approx([o.error for o in plain.options["a"]], rel=1e-9)


def test_budgeted_commit_weighs_outputs_with_calibration(registry_copy, example):
    from test_tuning import calibration

    task = "has_top"
    path = example.finetunes[task]
    with pytest.raises(InvalidInputError, match="budget_proxy='outputs' weighs errors by the layers' inputs"):
        registry_copy.commit(task, path, max_bytes=10**9, budget_proxy="outputs", progress=False)
    with pytest.raises(InvalidInputError, match="budget_proxy must be"):
        registry_copy.commit(task, path, max_bytes=10**9, budget_proxy="loss", progress=False)
    weights = registry_copy.commit(task, path, max_bytes=10**9, calibration=calibration(example), progress=False)
    assert weights.source["budget"]["proxy"] == "squared reconstruction error of each residual"
    outputs = registry_copy.commit(task, path, max_bytes=10**9, calibration=calibration(example),
                                   budget_proxy="outputs", progress=False)
    assert outputs.source["budget"]["proxy"].startswith("output error on the calibration inputs for ")
    # Grams over max_gram_bytes: the data-free proxy, rather than hold them all.
    capped = registry_copy.commit(task, path, max_bytes=10**9, calibration=calibration(example),
                                  budget_proxy="outputs", tune_options={"max_gram_bytes": 0}, progress=False)
    assert capped.source["budget"]["proxy"] == "squared reconstruction error of each residual"
    registry_copy.verify()


def test_cli_budget_weighs_outputs_given_calib(registry_copy, example, tmp_path):
    from click.testing import CliRunner

    from deltastore_cli.main import cli
    from test_tuning import cli_finetune_with_calib

    finetune, calib = cli_finetune_with_calib(example, "has_top", tmp_path, lines=32)
    runner = CliRunner()
    args = ["commit", str(registry_copy.path), "has_top", str(finetune), "--calib", str(calib)]
    refused = runner.invoke(cli, args, obj={})
    assert refused.exit_code == 2 and "--calib is only read by a data-driven tuner or a byte budget" in refused.output
    refused = runner.invoke(cli, args + ["--ratio", "3"], obj={})  # the default proxy reads no data
    assert refused.exit_code == 2 and "--budget-proxy outputs" in refused.output
    refused = runner.invoke(cli, args[:4] + ["--ratio", "3", "--budget-proxy", "outputs"], obj={})
    assert refused.exit_code == 2 and "give --calib FILE" in refused.output
    done = runner.invoke(cli, args + ["--ratio", "3", "--budget-proxy", "outputs"], obj={})
    assert done.exit_code == 0, done.output
    _, record = registry_copy.version("has_top")
    assert record.source["budget"]["proxy"].startswith("output error on the calibration inputs")
    assert registry_copy.stats("has_top").own_bytes <= record.source["budget"]["max_bytes"]


def test_a_budget_below_the_fixed_bytes_is_refused_before_the_deltas_are_read(registry_copy, example, monkeypatch):
    """The fixed bytes (side files, small tensors) alone exceed the budget: refused before pass 1
    reads every lossy tensor (on a 7B model, the whole finetune)."""
    from deltastore.engine.commit import CommitPipeline

    def analyse(*args, **kwargs):
        raise AssertionError("pass 1 ran before the budget was refused")

    monkeypatch.setattr(CommitPipeline, "analyse", analyse)
    with pytest.raises(BudgetTooSmallError, match="before any delta"):
        registry_copy.commit("has_top", example.finetunes["has_top"], max_bytes=1000, progress=False)
