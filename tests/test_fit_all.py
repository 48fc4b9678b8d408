"""The fit-all tuner (issue 16): the stored codes' continuous parts fitted on calibration inputs.

Runs on the shared tiny BERT example (tests/conftest.py) with its base vector; the first half of
``example.inputs`` calibrates, the second half judges.
"""

from __future__ import annotations

import pytest
import torch

from deltastore.tensor import lsq
from deltastore.tensor.compressors import get_compressor

from test_tuning import calibration, finetuned_outputs, output_mse  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = [
    ("bitdelta", {}),
    ("dare", {"drop_rate": 0.99}),
    ("dare", {"drop_rate": 0.9, "value_bits": 8}),
    ("deltadq", {"group_size": 16, "keep": 1, "bits": 2}),
    ("deltadq", {"group_size": 8, "keep": 2, "bits": 3, "stored_planes": 2}),
]


def _correlated_inputs(n: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    mix = torch.randn(cols, cols, generator=generator) / cols ** 0.5 + torch.eye(cols)
    return torch.randn(n, cols, generator=generator) @ mix


@pytest.mark.parametrize("method, config", SETTINGS)
def test_refit_keeps_the_format_and_lowers_the_output_error(method, config):
    """A refitted code decodes with the compressor's own decoder (same arrays, dtypes, attrs,
    discrete part) and errs less on the layer's outputs than the encoded one."""
    g = torch.Generator().manual_seed(7)
    rows, cols = 48, 64
    target = torch.randn(rows, cols, generator=g) * 0.01
    x = _correlated_inputs(512, cols, g)
    gram = lsq.damped(x.T.double() @ x.double())
    compressor = get_compressor(method, config)
    encoded = compressor.encode(target, seed=11)
    fitted = compressor.refit(encoded, target, gram)
    assert set(fitted.arrays) == set(encoded.arrays) and fitted.attrs.keys() == encoded.attrs.keys()
    for role, array in encoded.arrays.items():
        assert fitted.arrays[role].dtype == array.dtype and fitted.arrays[role].shape == array.shape
    before = compressor.decode(encoded, (rows, cols), "cpu")
    after = compressor.decode(fitted, (rows, cols), "cpu")
    # The discrete part stays: BitDelta's signs; the kept positions (nothing outside them).
    if method == "bitdelta":
        assert torch.equal(before > 0, after > 0)
    else:
        assert torch.all(after[~compressor.keep(11, rows, cols, "cpu")] == 0)
    # One scale per matrix (BitDelta) can only gain a little; free kept values gain much more.
    gain = 1.0 if method == "bitdelta" else 0.9
    assert lsq.error(after, target, gram) < gain * lsq.error(before, target, gram)
    # Without inputs (G = I) nothing gets worse in weight space either.
    plain = compressor.refit(encoded, target, None)
    decoded = compressor.decode(plain, (rows, cols), "cpu")
    assert lsq.error(decoded, target, None) <= lsq.error(before, target, None) * (1 + 1e-6)


def test_on_support_solves_the_normal_equations():
    g = torch.Generator().manual_seed(3)
    target = torch.randn(5, 9, generator=g)
    keep = torch.rand(5, 9, generator=g) < 0.5
    keep[0] = False
    x = _correlated_inputs(200, 9, g)
    gram = x.T.double() @ x.double()
    out = lsq.on_support(keep, target, gram)
    assert torch.all(out[~keep] == 0)
    for i in range(1, 5):
        k = keep[i].nonzero().flatten()
        want = torch.linalg.solve(gram[k][:, k], (target[i].double() @ gram)[k])
        assert torch.allclose(out[i, k].double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method, config, task", [
    ("dare", {"drop_rate": 0.99}, "has_top"),
    ("deltadq", {"group_size": 16, "keep": 1, "bits": 2}, "has_small"),
])
def test_fit_all_stores_fitted_codes_that_lower_the_loss(registry_copy, example, finetuned_outputs, method, config,
                                                         task):
    path = example.finetunes[task]
    options = {"max_steps": 20}
    lambdas = registry_copy.commit(task, path, method=method, config=config, base="all", tune="dbms",
                                   calibration=calibration(example), tune_options=options, progress=False)
    everything = registry_copy.commit(task, path, method=method, config=config, base="all", tune="fit-all",
                                      calibration=calibration(example), tune_options=options, progress=False)
    record = everything.tuning
    assert record["tuner"] == "fit-all" and not record["fell_back"], record["reason"]
    assert record["tensors_refit"] > 0 and record["tensors_with_inputs"] > 0
    assert record["lambdas"]["tuner"] == "dbms"
    assert record["loss_final"] < record["loss_lambdas"]
    calib_lambdas, held_lambdas = output_mse(registry_copy, task, example, finetuned_outputs, lambdas.version)
    calib_all, held_all = output_mse(registry_copy, task, example, finetuned_outputs, everything.version)
    # The loss the tuner reports is the stored model's: the codes written are the fitted ones.
    assert record["loss_final"] == pytest.approx(calib_all, rel=2e-2)
    assert calib_all < calib_lambdas
    assert held_all < held_lambdas, (held_lambdas, held_all)
    # Same format: the same compressor and configuration on every delta entry, arrays of the same shapes.
    _, old = registry_copy.version(task, lambdas.version)
    for name, entry in everything.tensors.items():
        assert (entry.codec, entry.config, sorted(entry.arrays)) == (old.tensors[name].codec, old.tensors[name].config,
                                                                     sorted(old.tensors[name].arrays))
    registry_copy.verify()


def test_cli_fit_all_needs_calibration(registry_copy, example):
    from click.testing import CliRunner

    from deltastore_cli.main import cli

    result = CliRunner().invoke(cli, ["commit", str(registry_copy.path), "has_top", str(example.finetunes["has_top"]),
                                      "--tune", "fit-all"], obj={})
    assert result.exit_code == 2 and "--tune fit-all fits on data: give --calib FILE" in result.output


# --- Step 2 in bounded memory: the input Grams collected a group of layers at a time ---------


def _comparable(record: dict) -> dict:
    """A fit-all record without what depends on the grouping (``grams``) or on the clock."""
    out = {k: v for k, v in record.items() if k != "grams" and not k.startswith("seconds")}
    out["lambdas"] = {k: v for k, v in record["lambdas"].items() if not k.startswith("seconds")}
    return out


def _fit_all(registry, task, path, calib, **options):
    """(version record, materialized weights) of a fit-all commit of ``path`` (DARE p=0.9)."""
    record = registry.commit(task, path, method="dare", config={"drop_rate": 0.9}, base="all", tune="fit-all",
                             calibration=calib, tune_options={"max_steps": 5, **options}, progress=False)
    return record, registry.materialize(f"{task}@{record.version}")


def _assert_same_version(got, want):
    (record, state), (want_record, want_state) = got, want
    assert state.keys() == want_state.keys()
    different = [n for n in state if not torch.equal(state[n], want_state[n])]
    assert not different, different
    assert (record.lam1, record.lam2) == (want_record.lam1, want_record.lam2)
    assert _comparable(record.tuning) == _comparable(want_record.tuning)


def _gram_bytes(path) -> tuple[int, int, int]:
    """(layers, bytes of a hidden-size Gram, bytes of the largest: the intermediate size's) of the
    finetune's config."""
    import json

    config = json.loads((path / "config.json").read_text())
    return config["num_hidden_layers"], 8 * config["hidden_size"] ** 2, 8 * config["intermediate_size"] ** 2


def test_fit_all_layer_groups_store_the_same_version(registry_copy, example):
    """Collecting the input Grams one layer at a time (max_gram_bytes=0), or a few layers at a time,
    stores bit for bit what collecting them all at once stores (the tiny model's Grams fit the
    default budget: one group, collected in the targets' pass). Exact, not approximate: each Gram
    sums the same inputs in the same order, whatever pass collects it."""
    path = example.finetunes["has_top"]
    blocks, hidden, largest = _gram_bytes(path)
    whole = _fit_all(registry_copy, "has_top", path, calibration(example))
    grams = whole[0].tuning["grams"]
    assert not whole[0].tuning["fell_back"], whole[0].tuning["reason"]
    assert grams["groups"] == 1 and grams["forwards"] == 0 and grams["max_bytes"] == 256 << 20
    # BERT: per layer query, key, value, attention output and intermediate (hidden in) and output
    # (intermediate in); then the pooler. All alive at the end of the one pass.
    assert grams["layers"] == 6 * blocks + 1
    assert grams["peak_bytes"] == blocks * (5 * hidden + largest) + hidden
    for budget in (0, largest + 2 * hidden):
        got = _fit_all(registry_copy, "has_top", path, calibration(example), max_gram_bytes=budget)
        _assert_same_version(got, whole)
        grams = got[0].tuning["grams"]
        assert 1 < grams["groups"] <= grams["layers"] and grams["max_bytes"] == budget
        # The Grams alive at once, counted as they were created and freed: within the budget, or the
        # one Gram that alone exceeds it.
        assert largest <= grams["peak_bytes"] <= max(budget, largest)
        # Every group after the first made one more pass over the two calibration batches.
        assert grams["forwards"] == 2 * (grams["groups"] - 1)
    assert grams["peak_bytes"] > largest  # the larger budget held more than one Gram at a time


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_fit_all_layer_groups_on_decoders(family, tmp_path, monkeypatch):
    """The same on tiny decoders (rotary attention, grouped kv heads, gated MLPs; Gemma 3 ties its
    head to the embeddings, which are fitted on their weights), with padded calibration inputs."""
    import transformers

    import test_hf
    from deltastore import Registry

    monkeypatch.setitem(test_hf.FAMILIES, "gemma3", lambda: test_hf._causal(
        transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True,
        max_position_embeddings=64))
    reference, finetunes, fam = test_hf.make_family(family, tmp_path)
    registry = Registry.init(tmp_path / "registry", reference, progress=False)
    registry.build_base("all", finetunes, progress=False)
    gen = torch.Generator().manual_seed(5)
    calib = [fam.inputs(gen) for _ in range(2)]
    mask = torch.ones_like(calib[1]["input_ids"])
    mask[:4, -5:] = 0  # right padding: its tokens' inputs must not enter the Grams
    calib[1]["attention_mask"] = mask
    whole = _fit_all(registry, "t", finetunes[0], calib)
    grams = whole[0].tuning["grams"]
    assert grams["groups"] == 1 and grams["layers"] == whole[0].tuning["tensors_with_inputs"] > 1
    one = _fit_all(registry, "t", finetunes[0], calib, max_gram_bytes=0)
    _assert_same_version(one, whole)
    grams = one[0].tuning["grams"]
    # The fitted layers (q, o, gate, up, down: k and v are small enough to be stored whole; Llama's
    # untied head), one group each
    assert grams["groups"] == grams["layers"] and grams["forwards"] == 2 * (grams["layers"] - 1)
    assert grams["peak_bytes"] == _gram_bytes(finetunes[0])[2]  # down_proj's Gram: the largest, alone


def test_collect_stops_after_the_group_and_gets_the_same_grams():
    """A group's pass runs each forward only until the group's layers had all their calls of the
    batch; the Grams equal those of a whole pass."""
    from transformers import BertConfig, BertModel

    from deltastore.tuning import fit

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=48, max_position_embeddings=16)).eval()
    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 64, (3, 10), generator=gen)} for _ in range(2)]
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    memory = fit._GramMemory()
    outputs, whole, calls = fit._collect(model, batches, "hidden", layers, layers, memory)
    assert len(outputs) == 2 and all(c[id(layers[0])] == 1 for c in calls)
    peak = memory.peak
    assert peak == sum(m.in_features ** 2 * 8 for m in layers)
    group = layers[4:6]  # the first layer's intermediate and output dense
    later = []
    handle = layers[6].register_forward_pre_hook(lambda module, args: later.append(1))
    try:
        outputs, grams, _ = fit._collect(model, batches, "hidden", group, group, memory, calls)
    finally:
        handle.remove()
    assert outputs == [] and later == []  # stopped before the second layer's query
    assert set(grams) == {id(m) for m in group}
    for m in group:
        assert torch.equal(grams[id(m)], whole[id(m)])
    # The whole pass's Grams are still alive here: counted with the group's.
    assert memory.peak == peak + sum(m.in_features ** 2 * 8 for m in group)
    del whole, grams
    assert memory.alive == 0  # freed Grams are counted off


def test_collect_waits_for_every_call_of_a_shared_layer():
    """A layer run several times per forward (weights shared across blocks, as in ALBERT) has all
    its calls summed before the forward is stopped."""
    from deltastore.tuning import fit

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.between, self.head = (torch.nn.Linear(6, 6), torch.nn.Linear(6, 6),
                                                   torch.nn.Linear(6, 2))

        def forward(self, input_ids):
            x = self.block(input_ids)
            return self.head(self.block(self.between(x)))

    torch.manual_seed(0)
    model = Shared().eval()
    batches = [{"input_ids": torch.randn(4, 6)}, {"input_ids": torch.randn(3, 6)}]
    layers = [model.block, model.between, model.head]
    _, whole, calls = fit._collect(model, batches, "tensor", layers, layers, fit._GramMemory())
    assert [c[id(model.block)] for c in calls] == [2, 2]
    head_calls = []
    handle = model.head.register_forward_pre_hook(lambda module, args: head_calls.append(1))
    try:
        _, grams, _ = fit._collect(model, batches, "tensor", [model.block], [model.block], fit._GramMemory(), calls)
    finally:
        handle.remove()
    assert torch.equal(grams[id(model.block)], whole[id(model.block)]) and head_calls == []


def test_gram_groups_and_option():
    from deltastore import InvalidInputError
    from deltastore.tuning.fit import FitTuneConfig, gram_groups

    layers = [torch.nn.Linear(n, 1) for n in (4, 4, 8, 4)]  # Grams of 128, 128, 512, 128 bytes
    sizes = lambda groups: [[m.in_features for m in g] for g in groups]  # noqa: E731
    assert sizes(gram_groups(layers, 0)) == [[4], [4], [8], [4]]
    assert sizes(gram_groups(layers, 256)) == [[4, 4], [8], [4]]
    assert sizes(gram_groups(layers, 640)) == [[4, 4], [8, 4]]
    assert sizes(gram_groups(layers, 1 << 20)) == [[4, 4, 8, 4]]
    assert FitTuneConfig.from_options({"max_gram_bytes": 0, "max_steps": 3}).max_gram_bytes == 0
    with pytest.raises(InvalidInputError, match=r"fit-all tuner: option max_gram_bytes=-1 is invalid"):
        FitTuneConfig.from_options({"max_gram_bytes": -1})
    with pytest.raises(InvalidInputError, match=r"fit-all tuner: unknown option\(s\) \['gram'\]"):
        FitTuneConfig.from_options({"gram": 1})


def test_cli_max_gram_bytes(registry_copy, example, tmp_path):
    from click.testing import CliRunner

    from deltastore_cli.main import cli
    from test_tuning import cli_finetune_with_calib

    finetune, calib = cli_finetune_with_calib(example, "has_top", tmp_path)
    args = ["commit", str(registry_copy.path), "has_top", str(finetune), "--base", "all", "--method", "dare",
            "--config", "drop_rate=0.9", "--calib", str(calib), "--tune-steps", "3", "--max-gram-bytes", "0"]
    result = CliRunner().invoke(cli, args + ["--tune", "dbms"], obj={})
    assert result.exit_code == 2 and "--max-gram-bytes applies to --tune fit-all only" in result.output
    result = CliRunner().invoke(cli, args + ["--tune", "fit-all"], obj={})
    assert result.exit_code == 0, result.output
    grams = registry_copy.version("has_top")[1].tuning["grams"]
    assert grams["max_bytes"] == 0 and grams["groups"] == grams["layers"] > 1


@pytest.mark.cuda
def test_fit_all_layer_groups_on_cuda(registry_copy, example):
    """On the GPU (the tuner's default device there), too, the grouped fit stores what the one-group
    fit stores. A repeat of the one-group fit comes first: should it differ, the GPU's kernels are
    not deterministic run to run, and no grouping could be compared exactly."""
    path = example.finetunes["has_top"]
    whole = _fit_all(registry_copy, "has_top", path, calibration(example))
    assert whole[0].tuning["device"] == "cuda"
    again = _fit_all(registry_copy, "has_top", path, calibration(example), max_gram_bytes=256 << 20)
    _assert_same_version(again, whole)
    grouped = _fit_all(registry_copy, "has_top", path, calibration(example), max_gram_bytes=0)
    _assert_same_version(grouped, whole)
    assert grouped[0].tuning["grams"]["peak_bytes"] == _gram_bytes(path)[2]
