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
