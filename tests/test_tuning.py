"""Tuners: the closed form, the dbms fit (METHOD.md step 6), user tuners, calibration files, CLI.

The fits run on the shared tiny BERT example (tests/conftest.py) with a base vector of its
three finetunes; calibration is the first half of ``example.inputs``, the second half is held
back to judge the fit.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from deltastore import InvalidInputError, UnknownMethodError
from deltastore.calibration import as_batches, calibration_sha256, load_calibration
from deltastore.tuning import Lambdas, TuneContext, get_tuner, l2, register

RECORD_FIELDS = {
    "tuner", "per_layer", "fell_back", "reason", "compressor", "output", "judged_on", "loss_initial", "loss_final",
    "lam1_initial", "lam2_initial", "lam1_final", "lam2_final", "optimizer", "lr", "max_steps", "steps", "best_step",
    "patience", "seed", "device", "dtype", "seconds", "calibration", "tensors_fitted", "loss_curve",
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def finetuned_outputs(example):
    """task -> (calibration logits, held-back logits) of the finetunes themselves."""
    from transformers import AutoModelForSequenceClassification

    out = {}
    for task, path in example.finetunes.items():
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        with torch.no_grad():
            out[task] = (model(input_ids=example.inputs[:32]).logits, model(input_ids=example.inputs[32:]).logits)
    return out


def calibration(example):
    return [{"input_ids": example.inputs[i:i + 16]} for i in range(0, 32, 16)]


def output_mse(registry, task, example, finetuned_outputs, version=None):
    """(calibration MSE, held-back MSE) of the task's loaded model against its finetune."""
    model = registry.load_model(task, version)
    with torch.no_grad():
        calib = model(input_ids=example.inputs[:32]).logits
        held = model(input_ids=example.inputs[32:]).logits
    want_calib, want_held = finetuned_outputs[task]
    return float((calib - want_calib).pow(2).mean()), float((held - want_held).pow(2).mean())


@pytest.mark.parametrize("method, config, task", [
    ("bitdelta", {}, "has_small"),
    ("dare", {"drop_rate": 0.99}, "has_top"),
])
def test_dbms_lowers_held_back_mse(registry_copy, example, finetuned_outputs, method, config, task):
    path = example.finetunes[task]
    closed = registry_copy.commit(task, path, method=method, config=config, base="all", progress=False)
    fitted = registry_copy.commit(task, path, method=method, config=config, base="all", tune="dbms",
                                  calibration=calibration(example), tune_options={"max_steps": 30},
                                  progress=False)
    record = fitted.tuning
    assert not record["fell_back"], record["reason"]
    assert record["lam1_initial"] == pytest.approx(closed.lam1)
    assert (fitted.lam1, fitted.lam2) != (closed.lam1, closed.lam2)
    calib_before, held_before = output_mse(registry_copy, task, example, finetuned_outputs, closed.version)
    calib_after, held_after = output_mse(registry_copy, task, example, finetuned_outputs, fitted.version)
    assert held_after < 0.8 * held_before, (held_before, held_after)
    # The losses the fit reports are those of the stored model: simulate() == decode(encode()).
    rel = 1e-3 if method == "bitdelta" else 2e-2  # DARE stores kept values as float16
    assert record["loss_initial"] == pytest.approx(calib_before, rel=rel)
    assert record["loss_final"] == pytest.approx(calib_after, rel=rel)
    assert record["loss_final"] < record["loss_initial"]


def test_record_fields(registry_copy, example):
    calib = calibration(example)
    record = registry_copy.commit("small_count", example.finetunes["small_count"], base="all", tune="dbms",
                                  calibration=calib, tune_options={"max_steps": 4, "lr": 0.02, "patience": 3,
                                                                   "optimizer": "adam"},
                                  seed=11, progress=False).tuning
    assert RECORD_FIELDS <= set(record)
    assert record["tuner"] == "dbms" and record["optimizer"] == "adam" and record["compressor"] == "bitdelta"
    assert record["lr"] == 0.02 and record["max_steps"] == 4 and record["patience"] == 3 and record["seed"] == 11
    assert record["steps"] <= 4 and record["device"] in ("cpu", "cuda") and record["output"] == "logits"
    assert record["calibration"] == {"sha256": calibration_sha256(calib), "batches": 2, "holdout_batches": 0,
                                     "examples": 32}
    assert record["loss_curve"][0] == pytest.approx(record["loss_initial"], rel=1e-5)
    assert record["loss_final"] == pytest.approx(min(record["loss_curve"]), rel=1e-5)
    json.dumps(record)  # plain data only
    shown = registry_copy.version("small_count")[1].tuning
    assert shown["calibration"]["sha256"] == record["calibration"]["sha256"]


def test_per_layer_lambdas_are_stored_and_used(registry_copy, example, finetuned_outputs):
    task = "has_small"
    record = registry_copy.commit(task, example.finetunes[task], base="all", tune="dbms", per_layer=True,
                                  calibration=calibration(example), tune_options={"max_steps": 15}, progress=False)
    fit = record.tuning
    assert fit["per_layer"] and not fit["fell_back"]
    deltas = {n: e for n, e in record.tensors.items() if e.is_delta}
    assert deltas and all(e.lam1 is not None and e.lam2 is not None for e in deltas.values())
    assert deltas.keys() == fit["per_tensor_final"].keys()
    for name, entry in deltas.items():  # pytest.approx compares flat sequences, not dicts of lists
        assert [entry.lam1, entry.lam2] == pytest.approx(fit["per_tensor_final"][name]), name
    assert len({e.lam2 for e in deltas.values()}) > 1  # really one pair per tensor
    # materialize uses them: the loaded model's error is the one the fit reached.
    calib_mse, _ = output_mse(registry_copy, task, example, finetuned_outputs)
    assert calib_mse == pytest.approx(fit["loss_final"], rel=1e-3)
    assert calib_mse < fit["loss_initial"]


def test_falls_back_to_the_closed_form(registry_copy, example):
    path = example.finetunes["has_top"]
    closed = registry_copy.commit("has_top", path, base="all", progress=False)
    fitted = registry_copy.commit("has_top", path, base="all", tune="dbms", calibration=calibration(example),
                                  tune_options={"max_steps": 0}, progress=False)
    assert fitted.tuning["fell_back"] is True
    assert "no step improved" in fitted.tuning["reason"]
    assert (fitted.lam1, fitted.lam2) == (closed.lam1, closed.lam2)
    assert fitted.tuning["loss_final"] == fitted.tuning["loss_initial"]
    for name, entry in fitted.tensors.items():  # same lambdas, same seed: the very same arrays
        assert entry.arrays == closed.tensors[name].arrays


def test_holdout_judges_the_fit(registry_copy, example):
    calib = [{"input_ids": example.inputs[i:i + 8]} for i in range(0, 32, 8)]
    record = registry_copy.commit("has_small", example.finetunes["has_small"], base="all", tune="dbms",
                                  calibration=calib, tune_options={"max_steps": 5, "holdout": 0.25},
                                  progress=False).tuning
    assert record["judged_on"] == "holdout" and record["calibration"]["holdout_batches"] == 1
    assert record["loss_final"] <= record["loss_initial"]
    assert "train_loss_initial" in record


def test_dbms_needs_calibration_and_valid_options(registry_copy, example):
    path = example.finetunes["has_top"]
    with pytest.raises(InvalidInputError, match="calibration"):
        registry_copy.commit("has_top", path, base="all", tune="dbms", progress=False)
    with pytest.raises(InvalidInputError, match="unknown option.*'steps'"):
        registry_copy.commit("has_top", path, base="all", tune="dbms", calibration=calibration(example),
                             tune_options={"steps": 3}, progress=False)
    with pytest.raises(InvalidInputError, match="lr"):
        registry_copy.commit("has_top", path, base="all", tune="dbms", calibration=calibration(example),
                             tune_options={"lr": -1.0}, progress=False)
    assert registry_copy.tasks() == []  # a refused commit writes nothing


def test_state_dict_finetune_needs_a_model(registry_copy, example):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    path = example.finetunes["has_top"]
    state = load_file(str(path / "model.safetensors"))
    with pytest.raises(InvalidInputError, match="no config.json"):
        registry_copy.commit("has_top", state, base="all", tune="dbms", calibration=calibration(example),
                             progress=False)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    record = registry_copy.commit("has_top", state, base="all", tune="dbms", calibration=calibration(example),
                                  tune_options={"model": model, "max_steps": 2}, progress=False)
    assert record.tuning["tuner"] == "dbms" and record.tuning["tensors_fitted"] > 0
    assert all(torch.equal(p, before[n]) and p.requires_grad for n, p in model.named_parameters())


def test_without_base_only_lam2_moves(registry_copy, example):
    record = registry_copy.commit("has_small", example.finetunes["has_small"], method="dare",
                                  config={"drop_rate": 0.99}, tune="dbms", calibration=calibration(example),
                                  tune_options={"max_steps": 5}, progress=False)
    assert record.lam1 == 0.0 and record.tuning["lam1_final"] == 0.0
    if not record.tuning["fell_back"]:
        assert record.lam2 != 1.0


def test_user_tuner_by_name_and_as_callable(registry_copy, example, monkeypatch):
    from deltastore import tuning

    seen: list[TuneContext] = []

    def half(context: TuneContext) -> Lambdas:
        seen.append(context)
        return Lambdas(context.lam1_l2 / 2, 0.75, None, {"tuner": "half", "note": (1, 2)})

    monkeypatch.setitem(tuning._REGISTRY, "half", half)
    path = example.finetunes["has_top"]
    closed = registry_copy.commit("has_top", path, base="all", progress=False)
    by_name = registry_copy.commit("has_top", path, base="all", tune="half", progress=False)
    assert by_name.lam1 == pytest.approx(closed.lam1 / 2) and by_name.lam2 == 0.75
    assert by_name.tuning == {"tuner": "half", "note": [1, 2]}
    context = seen[0]
    assert context.source is not None and "config.json" in context.source.files and context.seed == 0
    assert set(context.lossy) <= set(context.seeds) and context.has_base
    by_callable = registry_copy.commit("has_top", path, base="all", tune=lambda c: Lambdas(0.5, 1.25), progress=False)
    assert (by_callable.lam1, by_callable.lam2) == (0.5, 1.25)
    register("half-again", half)
    try:
        assert get_tuner("half-again") is half
    finally:
        tuning._REGISTRY.pop("half-again")
    with pytest.raises(UnknownMethodError, match="dbms, fit-all, half, l2"):
        get_tuner("nope")
    assert get_tuner("l2") is l2


# -- calibration files ----------------------------------------------------------------------------

def _word_tokenizer(directory):
    """A BERT word-piece tokenizer over the demo's vocabulary ("w5" is token 5), saved in ``directory``."""
    from transformers import BertTokenizerFast

    from deltastore.demo import VOCAB

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(5, VOCAB)]
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)})
    tokenizer.save_pretrained(directory)
    return tokenizer


def cli_finetune_with_calib(example, task, tmp_path, lines=16):
    """A copy of the demo finetune ``task`` with a word tokenizer, and a calibration text of
    ``lines`` lines of 15 random words: what a CLI commit with ``--calib`` reads."""
    import shutil

    finetune = tmp_path / task
    shutil.copytree(example.finetunes[task], finetune)
    _word_tokenizer(finetune)
    gen = torch.Generator().manual_seed(5)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(" ".join(f"w{int(t)}" for t in torch.randint(5, 400, (15,), generator=gen))
                               for _ in range(lines)) + "\n")
    return finetune, calib


def test_load_calibration_text_and_jsonl(tmp_path):
    _word_tokenizer(tmp_path)
    text = tmp_path / "calib.txt"
    text.write_text("w5 w6 w7\n\nw8\nw9 w10 w11 w12 w13 w14\n")
    batches = load_calibration(text, tmp_path, max_length=5, batch_size=2)
    assert [b["input_ids"].shape for b in batches] == [(2, 5), (1, 5)]  # [CLS] ... [SEP], truncated to 5
    assert batches[0]["input_ids"][0].tolist() == [2, 5, 6, 7, 3]
    assert batches[0]["attention_mask"][1].tolist() == [1, 1, 1, 0, 0]

    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_text('{"input_ids": [2, 9, 9]}\n{"input_ids": [2, 8]}\n')
    (batch,) = load_calibration(jsonl)
    assert batch["input_ids"].tolist() == [[2, 9, 9], [2, 8, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "w5 w6"}\n')
    assert load_calibration(texts, tmp_path)[0]["input_ids"].tolist() == [[2, 5, 6, 3]]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1]}\n{"oops": 1}\n')
    with pytest.raises(InvalidInputError, match=r"bad.jsonl:2"):
        load_calibration(bad)
    with pytest.raises(InvalidInputError, match="tokenizer"):
        load_calibration(text, None)


@pytest.mark.parametrize("name, content, message", [
    ("calib.json", '[{"text": "w5"}, {"text": "w6"}]', "a .json file is one JSON document"),
    ("calib.txt", '[{"text": "w5"},\n {"text": "w6"},\n {"text": "w7"}]\n', "a JSON array of 3 items"),
    ("calib.txt", '{"examples": ["w5", "w6"]}', "a JSON object"),
    ("calib.txt", '{"text": "w5"}\n{"text": "w6"}\n', "rename it to calib.jsonl"),
])
def test_calibration_refuses_what_is_not_one_example_per_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InvalidInputError, match=message) as caught:
        load_calibration(path, _word_tokenizer(tmp_path))
    assert "one example per line" in str(caught.value) or "jsonl" in str(caught.value)


def test_calibration_text_may_start_with_a_bracket(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("[music] w5 w6\nw7\n")
    assert load_calibration(path, _word_tokenizer(tmp_path))[0]["input_ids"].shape[0] == 2


def test_fit_progress_prints_plain_lines_off_a_terminal(registry_copy, example, capsys, monkeypatch):
    from deltastore.tuning import dbms

    monkeypatch.setattr(dbms, "PLAIN_PROGRESS_EVERY", 0.0)  # a line per step, not one every few seconds
    common = dict(base="all", tune="dbms", calibration=calibration(example), tune_options={"max_steps": 3})
    registry_copy.commit("has_small", example.finetunes["has_small"], progress=None, **common)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tune dbms:")]
    assert lines and all("loss" in line for line in lines)
    assert any("s left" in line for line in lines)  # the time left, once a step has been timed
    registry_copy.commit("has_small", example.finetunes["has_small"], progress=False, **common)
    assert "tune dbms" not in capsys.readouterr().err


def test_calibration_hash_and_batches():
    a = [{"input_ids": torch.arange(6).view(2, 3)}]
    assert calibration_sha256(a) == calibration_sha256(as_batches([{"input_ids": [[0, 1, 2], [3, 4, 5]]}]))
    assert calibration_sha256(a) != calibration_sha256([{"input_ids": torch.arange(6).view(3, 2)}])
    assert calibration_sha256(a) != calibration_sha256([{"input_ids": torch.arange(6).view(2, 3).int()}])
    with pytest.raises(InvalidInputError, match="empty"):
        as_batches([])
    with pytest.raises(InvalidInputError, match="dict of model inputs"):
        as_batches([torch.zeros(2)])


# -- CLI --------------------------------------------------------------------------------------------

def test_cli_commit_tune_dbms(registry_copy, example, tmp_path):
    from click.testing import CliRunner

    from deltastore_cli.main import cli

    finetune, calib = cli_finetune_with_calib(example, "has_small", tmp_path)
    runner = CliRunner()
    base_args = ["commit", str(registry_copy.path), "has_small", str(finetune), "--base", "all"]

    result = runner.invoke(cli, base_args + ["--tune", "dbms"], obj={})
    assert result.exit_code == 2 and "--calib" in result.output
    result = runner.invoke(cli, base_args + ["--calib", str(calib)], obj={})
    assert result.exit_code == 2 and "--tune dbms" in result.output

    result = runner.invoke(cli, base_args + ["--tune", "dbms", "--calib", str(calib), "--tune-steps", "6",
                                             "--tune-lr", "0.02", "--calib-max-length", "12"], obj={})
    assert result.exit_code == 0, result.output
    assert "dbms fit: output MSE" in result.output
    assert f"calibration: 16 examples in 1 batches from {calib}" in result.output  # CliRunner mixes stderr in
    assert "warning: only 16 calibration examples" in result.output and "at least 32" in result.output
    _, record = registry_copy.version("has_small")
    assert record.tuning["tuner"] == "dbms" and record.tuning["lr"] == 0.02 and record.tuning["max_steps"] == 6
    expected = load_calibration(calib, finetune, max_length=12)
    assert record.tuning["calibration"]["sha256"] == calibration_sha256(expected)
    assert record.tuning["calibration"]["examples"] == 16

    shown = runner.invoke(cli, ["show", str(registry_copy.path), "has_small", "--json"], obj={})
    assert shown.exit_code == 0 and json.loads(shown.output)["tuning"]["tuner"] == "dbms"
    assert math.isfinite(json.loads(shown.output)["tuning"]["loss_final"])


@pytest.mark.cuda
def test_dbms_fit_on_cuda_matches_cpu(registry_copy, example):
    path = example.finetunes["has_small"]
    common = dict(method="dare", config={"drop_rate": 0.99}, base="all", tune="dbms",
                  calibration=calibration(example), progress=False)
    on_cpu = registry_copy.commit("has_small", path, tune_options={"max_steps": 5, "device": "cpu"}, **common)
    on_gpu = registry_copy.commit("has_small", path, **dict(common, tune_options={"max_steps": 5}))
    assert on_gpu.tuning["device"] == "cuda" and on_cpu.tuning["device"] == "cpu"
    assert on_gpu.tuning["loss_initial"] == pytest.approx(on_cpu.tuning["loss_initial"], rel=1e-3)
    assert on_gpu.tuning["loss_final"] == pytest.approx(on_cpu.tuning["loss_final"], rel=1e-2)
    assert (on_gpu.lam1, on_gpu.lam2) == pytest.approx((on_cpu.lam1, on_cpu.lam2), abs=1e-3)
