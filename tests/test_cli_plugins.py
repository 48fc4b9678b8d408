"""A compressor from another distribution, registered only through the ``deltastore.compressors``
entry point group, works from the command line like a built-in: ``--method`` takes its name,
``--config`` its fields, ``deltastore compressors`` describes it, and its versions show and
materialize (issue 12: adding a compressor touches its own module and one registration)."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from click.testing import CliRunner

from deltastore_cli.main import cli

# A whole third-party compressor: stores the changed rows' values at 16 or 32 bits.
TOY_MODULE = '''
"""Toy: the delta's values as floats of `width` bits, nothing dropped."""

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from deltastore.errors import InvalidInputError
from deltastore.tensor.compressors import CompressorConfig, Encoded


@dataclass(frozen=True)
class ToyConfig(CompressorConfig):
    width: int = field(default=16, metadata={"help": "bits per stored value: 16 or 32"})

    def __post_init__(self):
        if self.width not in (16, 32):
            raise InvalidInputError(f"ToyConfig.width must be 16 or 32, got {self.width!r}")


class Toy:
    name: ClassVar[str] = "toy"
    config_class: ClassVar[type] = ToyConfig

    def __init__(self, config=None):
        self.config = config or ToyConfig()

    def encode(self, x, *, seed):
        dtype = torch.float16 if self.config.width == 16 else torch.float32
        return Encoded({"values": x.to(dtype).reshape(-1)})

    def decode(self, encoded, shape, device):
        return encoded.array("values").to(device=device, dtype=torch.float32).view(shape)

    def simulate(self, x, *, seed):
        return x
'''


def install_plugin(site, monkeypatch, module: str, source: str, entry_points: str) -> None:
    """Install ``module`` as importlib.metadata sees an installed distribution (a dist-info
    folder with entry_points.txt on sys.path); the test's end forgets it and what it registered."""
    import sys

    from deltastore.tensor import compressors

    (site / f"{module}-0.1.dist-info").mkdir(parents=True)
    (site / f"{module}.py").write_text(source)
    (site / f"{module}-0.1.dist-info" / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (site / f"{module}-0.1.dist-info" / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(compressors, "_REGISTRY", dict(compressors._REGISTRY))
    monkeypatch.delitem(sys.modules, module, raising=False)


@pytest.fixture
def toy_plugin(tmp_path, monkeypatch):
    install_plugin(tmp_path / "site", monkeypatch, "toy_deltastore_plugin", TOY_MODULE, """\
        [deltastore.compressors]
        toy = toy_deltastore_plugin:Toy
        """)
    return "toy"


def run(*args, ok=True):
    result = CliRunner().invoke(cli, ["--quiet", *map(str, args)], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output + result.stderr
    return result


def test_an_entry_point_compressor_commits_shows_and_materializes(example, toy_plugin, tmp_path):
    from safetensors.torch import load_file

    from deltastore.sources import open_source

    listed = {c["name"]: c for c in json.loads(run("compressors", "--json").stdout)}
    assert listed["toy"]["deltas"] and not listed["toy"]["default"]
    assert listed["toy"]["fields"] == [{"name": "width", "type": "int", "default": 16,
                                        "help": "bits per stored value: 16 or 32"}]
    assert "width (int, default 16): bits per stored value" in run("compressors").stdout

    reg = tmp_path / "reg"
    run("init", reg, "--reference", example.reference)
    finetune = example.finetunes["has_top"]
    out = json.loads(run("commit", reg, "t", finetune, "--method", "toy", "--config", "width=32", "--json").stdout)
    assert (out["version"], out["method"], out["config"]) == (1, "toy", {"width": 32})
    show = json.loads(run("show", reg, "t", "--json").stdout)
    assert show["method"] == "toy" and show["config"] == {"width": 32} and show["delta_tensors"] > 0
    assert "toy" in run("ls", reg).stdout

    run("materialize", reg, "t", "--out", tmp_path / "out", "--dtype", "float32")
    weights = {}
    for path in sorted((tmp_path / "out").glob("*.safetensors")):
        weights.update(load_file(path))
    source = open_source(finetune)
    assert sorted(weights) == sorted(source.names())
    for name in source.names():  # float32 values stored whole: exact up to float32 rounding of W_pre + delta
        torch.testing.assert_close(weights[name], source.get(name).float(), rtol=0, atol=1e-6)


def test_method_and_config_errors_name_what_is_known(example, toy_plugin, tmp_path):
    reg = tmp_path / "reg"
    run("init", reg, "--reference", example.reference)
    finetune = example.finetunes["has_top"]

    unknown = run("commit", reg, "t", finetune, "--method", "zip", ok=False)
    assert unknown.exit_code == 2 and "'zip' is not a compressor of deltas" in unknown.stderr
    assert "known: bitdelta, dare, deltadq, toy" in unknown.stderr
    whole = run("commit", reg, "t", finetune, "--method", "lossless", ok=False)
    assert whole.exit_code == 2 and "known: bitdelta, dare, deltadq, toy" in whole.stderr

    stray = run("commit", reg, "t", finetune, "--method", "toy", "--config", "drop_rate=0.5", ok=False)
    assert stray.exit_code == 2 and "--config drop_rate does not apply to --method toy: its --config fields are width" \
        in stray.stderr
    none = run("commit", reg, "t", finetune, "--config", "width=16", ok=False)
    assert none.exit_code == 2 and "it has no --config fields" in none.stderr
    shape = run("commit", reg, "t", finetune, "--method", "toy", "--config", "width", ok=False)
    assert shape.exit_code == 2 and "'width' is not KEY=VALUE" in shape.stderr
    twice = run("commit", reg, "t", finetune, "--method", "dare", "--config", "drop_rate=0.5", "--drop-rate", "0.6",
                ok=False)
    assert twice.exit_code == 2
    assert "field drop_rate is given twice (--config drop_rate and --drop-rate)" in twice.stderr

    not_int = run("commit", reg, "t", finetune, "--method", "toy", "--config", "width=wide", ok=False)
    assert not_int.exit_code == 1 and "ToyConfig.width: 'wide' is not of type int" in not_int.stderr
    bad = run("commit", reg, "t", finetune, "--method", "toy", "--config", "width=8", ok=False)
    assert bad.exit_code == 1 and "ToyConfig.width must be 16 or 32, got 8" in bad.stderr
    assert json.loads(run("ls", reg, "--json").stdout)["tasks"] == []  # nothing refused was written

    # Optional fields take `none`; the old flags are shorthands of --config.
    out = json.loads(run("commit", reg, "t", finetune, "--method", "deltadq", "--config", "stored_planes=none",
                         "--bits", "3", "--json").stdout)
    assert out["config"] == {"group_size": 16, "keep": 2, "bits": 3, "stored_planes": None}


@pytest.mark.parametrize("source, expected", [
    ("raise RuntimeError('no GPU library')", "failed to load: RuntimeError: no GPU library; fix or uninstall"),
    ("class Other:\n    name = 'other'", "named 'other', expected the entry point's name 'broken'"),
])
def test_a_broken_plugin_is_named_in_one_line(example, tmp_path, monkeypatch, source, expected):
    install_plugin(tmp_path / "site", monkeypatch, "broken_deltastore_plugin", source, """\
        [deltastore.compressors]
        broken = broken_deltastore_plugin:Other
        """)
    result = run("compressors", ok=False)
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "entry point broken = broken_deltastore_plugin:Other (group deltastore.compressors, distribution " \
           "broken_deltastore_plugin)" in result.stderr and expected in result.stderr
    # A commit with a compressor found without it does not load the broken plugin.
    reg = tmp_path / "reg"
    run("init", reg, "--reference", example.reference)
    run("commit", reg, "t", example.finetunes["has_top"], "--method", "dare")
    wanted = run("commit", reg, "t", example.finetunes["has_top"], "--method", "broken", ok=False)
    assert wanted.exit_code == 1 and expected in wanted.stderr


def test_a_plugin_cannot_take_a_built_in_name(tmp_path, monkeypatch):
    install_plugin(tmp_path / "site", monkeypatch, "rival_deltastore_plugin", TOY_MODULE.replace('"toy"', '"dare"'),
                   """\
        [deltastore.compressors]
        dare = rival_deltastore_plugin:Toy
        """)
    result = run("compressors", ok=False)
    assert result.exit_code == 1 and "compressor name 'dare' is already registered by " \
        "deltastore.tensor.compressors.dare.Dare; pick another name" in result.stderr
