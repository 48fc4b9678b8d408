"""A cheaper base vector (issue 16): build_base's ``exclude``, ``min_params`` and
``row_fraction`` options, versions on such a base read back bit for bit by deltastore and by the
spec's independent reader, their validation errors, and the CLI's flags."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from deltastore_cli.main import cli
from test_format import SpecReader, _as_bits, _torch_as_numpy

from deltastore import InvalidInputError, Registry
from deltastore.engine.decode import decode_stored
from deltastore.sources import open_source
from deltastore.tensor import dbms

pytestmark = pytest.mark.usefixtures("one_thread")

EMBEDDINGS = ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight")


@pytest.fixture
def reg(example, tmp_path):
    return Registry.init(tmp_path / "registry", example.reference, progress=False)


def _array(reg):
    return lambda digest, what: reg.objects.get_array(digest, what=what)


def _spec_reads_like_deltastore(reg, task):
    """The independent reader of tests/test_format.py rebuilds the version bit for bit."""
    ours = reg.materialize(task, progress=False)
    theirs = SpecReader(reg.path).materialize(task, 1)
    assert sorted(ours) == sorted(theirs)
    for name, tensor in ours.items():
        dtype, want = _torch_as_numpy(tensor)
        assert not (_as_bits(dtype, theirs[name][1]) != _as_bits(dtype, want)).any(), name
    return ours


def test_excluded_tensors_decode_as_without_a_base(example, reg):
    finetunes = list(example.finetunes.values())
    full = reg.build_base("full", finetunes, progress=False)
    part = reg.build_base("part", finetunes, exclude=["*embeddings*"], min_params=20000, progress=False)
    # min_params 20000 leaves out the 128x128 matrices (16,384 elements) too.
    small = {r for r, e in full.tensors.items() if math.prod(e.shape) < 20000}
    assert small and set(part.tensors) == set(full.tensors) - set(EMBEDDINGS) - small
    assert all(part.tensors[r] == full.tensors[r] for r in part.tensors)  # the same bits where covered

    ft = example.finetunes["has_top"]
    on_part = reg.commit("part", ft, method="bitdelta", base="part")
    plain = reg.commit("plain", ft, method="bitdelta")
    got, without = _spec_reads_like_deltastore(reg, "part"), reg.materialize("plain", progress=False)
    assert on_part.lam1 != 0.0 and on_part.lam2 == plain.lam2 == 1.0
    uncovered = [n for n, e in on_part.tensors.items() if e.is_delta and e.ref not in part.tensors]
    covered = [n for n, e in on_part.tensors.items() if e.is_delta and e.ref in part.tensors]
    assert uncovered and covered
    # A tensor without a base entry is W_pre + lam2 * C(D): exactly the plain version's.
    assert all(torch.equal(got[n], without[n]) for n in uncovered)
    assert not all(torch.equal(got[n], without[n]) for n in covered)


def test_row_fraction_keeps_the_rows_of_largest_mean_delta(example, reg):
    finetunes = list(example.finetunes.values())
    full = reg.build_base("full", finetunes, progress=False)
    sparse = reg.build_base("sparse", finetunes, row_fraction=0.25, progress=False)
    assert set(sparse.tensors) == set(full.tensors)
    reference = open_source(example.reference)
    sources = [open_source(f) for f in finetunes]
    for ref_name, entry in sparse.tensors.items():
        w_pre = reference.get(ref_name).float()
        # The finetunes are classifiers: their encoder's names start with "bert.".
        mean = sum(s.get(f"bert.{ref_name}").float() - w_pre for s in sources) / len(sources)
        changed = full.tensors[ref_name].changed_rows
        assert entry.changed_rows == math.ceil(0.25 * changed)
        tau = dbms.as_matrix(decode_stored(entry, _array(reg), "cpu"))
        kept = (tau != 0).any(dim=1)
        energy = dbms.as_matrix(mean).double().pow(2).sum(dim=1)
        assert int(kept.sum()) == entry.changed_rows
        assert energy[kept].min() >= energy[~kept].max()  # the rows of largest energy
    reg.commit("sparse", example.finetunes["has_small"], method="dare", config={"drop_rate": 0.9}, base="sparse")
    _spec_reads_like_deltastore(reg, "sparse")
    size = {name: sum(reg.objects.size("arrays", h) for h in reg.base(name)[1].array_hashes())
            for name in ("full", "sparse")}
    assert size["sparse"] < size["full"] / 2


def test_top_energy_rows_breaks_ties_by_index():
    x = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, -1.0], [2.0, 0.0], [1.0, 0.0]])
    rows = dbms.changed_rows(x)
    assert dbms.top_energy_rows(x, rows, 0.5).tolist() == [True, False, False, True, False]
    assert dbms.top_energy_rows(x, rows, 1.0).tolist() == rows.tolist()
    assert dbms.build_base(x, 0.25).rows.tolist() == [False, False, False, True, False]


@pytest.mark.parametrize("options, message", [
    ({"row_fraction": 0.0}, r"row_fraction: expected a number in \(0, 1\].*found 0.0"),
    ({"row_fraction": 1.5}, r"row_fraction: expected a number in \(0, 1\].*found 1.5"),
    ({"row_fraction": float("nan")}, r"row_fraction: .*found nan"),
    ({"min_params": -1}, r"min_params: expected a whole number >= 0.*found -1"),
    ({"min_params": 2.5}, r"min_params: expected a whole number >= 0.*found 2.5"),
    ({"exclude": "*embeddings*"}, r"exclude: expected a list of non-empty name patterns.*found '\*embeddings\*'"),
    ({"exclude": ["*embedings*"]}, r"exclude pattern '\*embedings\*' matches none of the \d+ tensors"),
    ({"min_params": 10**9}, r"leave none of the \d+ tensors.*embeddings.word_embeddings.weight, has 256,000 "),
])
def test_bad_options_are_refused_before_anything_is_written(example, reg, options, message):
    with pytest.raises(InvalidInputError, match=message):
        reg.build_base("b", list(example.finetunes.values()), progress=False, **options)
    assert reg.bases() == [] and reg.verify(progress=False) == []


def test_cli_base_build_options(example, reg):
    runner = CliRunner()
    finetunes = [str(f) for f in example.finetunes.values()]
    out = runner.invoke(cli, ["base", "build", str(reg.path), "--name", "b", "--exclude", "*word_embeddings*",
                              "--exclude", "*position_embeddings*", "--row-fraction", "0.5", "--json", *finetunes])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    _, record = reg.base("b")
    assert data["tensors"] == len(record.tensors) and not set(EMBEDDINGS) & set(record.tensors)
    assert data["rows"] == sum(e.changed_rows for e in record.tensors.values())
    assert data["elements"] == sum(e.changed_rows * e.shape[1] for e in record.tensors.values())
    shown = runner.invoke(cli, ["base", "show", str(reg.path), "b"])
    assert shown.exit_code == 0 and f"{data['elements']:,} elements in {data['rows']:,} rows" in shown.output
    for args, message in ((["--row-fraction", "0"], "'--row-fraction': 0.0 is not in the range 0<x<=1"),
                          (["--min-params", "-3"], "'--min-params': -3 is not in the range x>=0"),
                          (["--exclude", "nope*"], "exclude pattern 'nope*' matches none")):
        refused = runner.invoke(cli, ["base", "build", str(reg.path), "--name", "c", *args, *finetunes])
        assert refused.exit_code in (1, 2) and message in refused.output, refused.output
    assert reg.bases() == ["b"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_partial_base_on_the_device_and_resident(example, reg, device):
    """The streaming (fused) decoders and a resident model switching tasks in place read a
    partial base like the reference decode: tensors without an entry, rows outside its mask."""
    from deltastore.engine.resident import ResidentModel

    reg.build_base("part", list(example.finetunes.values()), exclude=["*word_embeddings*"], row_fraction=0.5,
                   progress=False)
    reg.commit("bd", example.finetunes["has_top"], method="bitdelta", base="part")
    reg.commit("dare", example.finetunes["has_small"], method="dare", config={"drop_rate": 0.9}, base="part")
    wants = {task: _spec_reads_like_deltastore(reg, task) for task in ("bd", "dare")}
    for task, want in wants.items():
        got = reg.materialize(task, device=device, progress=False)
        assert all(torch.equal(got[n].cpu(), want[n]) for n in want), task
    model = reg.load_model("bd", device=device)
    resident = ResidentModel(reg, model, device=device)
    for task in ("dare", "bd", "dare"):
        resident.switch(task)
        state = model.state_dict()
        assert all(torch.equal(state[n].cpu(), t) for n, t in wants[task].items()), task
