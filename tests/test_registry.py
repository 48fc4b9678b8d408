"""The registry end to end on the tiny trained example: init, base, commit, materialize,
history, accounting, refusal of mismatched finetunes."""

from __future__ import annotations

import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltastore import (AlreadyExistsError, IncompatibleFinetuneError, InvalidInputError, NotFoundError, Registry,
                        UnknownMethodError)
from deltastore.demo import SEEN_TOKENS
from deltastore.sources import open_source


def _finetune(example, task="has_top"):
    return load_file(str(example.finetunes[task] / "model.safetensors"))


def _reference(example):
    return load_file(str(example.reference / "model.safetensors"))


def _du(path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def test_init_sources_agree(example, tmp_path):
    """A directory, a .safetensors file and a state dict give the same reference record."""
    state = _reference(example)
    by_dir = Registry.init(tmp_path / "a", example.reference, progress=False)
    by_file = Registry.init(tmp_path / "b", example.reference / "model.safetensors", progress=False)
    by_dict = Registry.init(tmp_path / "c", state, progress=False)
    tensors = [r.reference().tensors for r in (by_dir, by_file, by_dict)]
    assert tensors[0] == tensors[1] == tensors[2]
    assert "config.json" in by_dir.reference().files and not by_file.reference().files


def test_init_refuses_existing_and_open_refuses_non_registry(example, tmp_path, base_registry):
    with pytest.raises(AlreadyExistsError, match="already exists"):
        Registry.init(base_registry.path, example.reference)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(AlreadyExistsError, match="not empty"):
        Registry.init(tmp_path / "junk", example.reference)
    with pytest.raises(NotFoundError, match="not a deltastore registry"):
        Registry(tmp_path / "junk")


def _independent_bitdelta(example, task: str, lam1_expected: float | None = None):
    """W' for every delta tensor, computed from the formulas with plain torch, nothing from deltastore."""
    ref = _reference(example)
    fts = [load_file(str(p / "model.safetensors")) for p in example.finetunes.values()]
    ft = _finetune(example, task)
    out, num, den = {}, 0.0, 0.0
    taus = {}
    for name, w in ft.items():
        r = name.removeprefix("bert.")
        if r not in ref or w.dim() < 2 or w.numel() < 4096:
            continue
        w_pre = ref[r].float().reshape(w.shape[0], -1)
        mean = sum(f[name].float().reshape(w.shape[0], -1) - w_pre for f in fts) / len(fts)
        keep = (mean != 0).any(1)
        alpha = mean[keep].abs().mean()
        tau = torch.zeros_like(mean)
        tau[keep] = torch.where(mean[keep] > 0, alpha, -alpha)
        d = w.float().reshape(w.shape[0], -1) - w_pre
        m = (d != 0).any(1)
        num += float((d[m].double() * tau[m].double()).sum())
        den += float((tau[m].double() ** 2).sum())
        taus[name] = (w_pre, tau, d, m)
    lam1 = num / den
    for name, (w_pre, tau, d, m) in taus.items():
        resid = d[m] - lam1 * tau[m]
        c = torch.where(resid > 0, 1.0, -1.0) * resid.abs().mean()
        expected = w_pre.clone()
        expected[m] = w_pre[m] + (1.0 * c + lam1 * tau[m])
        out[name] = expected.reshape(ft[name].shape).to(ft[name].dtype)
    return lam1, out


def test_bitdelta_dbms_reconstruction_matches_formula(example, registry_copy):
    record = registry_copy.commit("has_top", example.finetunes["has_top"], method="bitdelta", base="all")
    lam1, expected = _independent_bitdelta(example, "has_top")
    assert record.lam1 == pytest.approx(lam1, rel=1e-9)
    assert record.lam2 == 1.0
    state = registry_copy.materialize("has_top")
    assert expected, "the example must have delta tensors"
    for name, want in expected.items():
        torch.testing.assert_close(state[name], want, rtol=0, atol=2e-6)


def test_unchanged_rows_stay_exact_and_task_own_tensors_are_lossless(example, registry_copy):
    ft = _finetune(example)
    ref = _reference(example)
    for method, config in [("bitdelta", {}), ("dare", {"drop_rate": 0.99}), ("deltadq", {})]:
        registry_copy.commit("has_top", example.finetunes["has_top"], method=method, config=config, base="all")
        state = registry_copy.materialize("has_top")
        emb = "bert.embeddings.word_embeddings.weight"
        # Tokens >= SEEN_TOKENS never occur in training: their rows must be the reference's, bit for bit.
        assert torch.equal(state[emb][SEEN_TOKENS:], ref["embeddings.word_embeddings.weight"][SEEN_TOKENS:])
        assert torch.equal(ft[emb][SEEN_TOKENS:], ref["embeddings.word_embeddings.weight"][SEEN_TOKENS:])
        for name in ("classifier.weight", "classifier.bias", "bert.encoder.layer.0.attention.self.query.bias"):
            assert torch.equal(state[name], ft[name]), name
        entry = registry_copy.version("has_top")[1].tensors[emb]
        assert entry.rows is not None and entry.changed_rows < SEEN_TOKENS
    assert set(state) == set(ft)


def test_plain_compression_without_base(example, registry_copy):
    record = registry_copy.commit("has_top", example.finetunes["has_top"], method="bitdelta")
    assert record.base is None and record.lam1 == 0.0
    state = registry_copy.materialize("has_top")
    ft, ref = _finetune(example), _reference(example)
    name = "bert.encoder.layer.1.output.dense.weight"
    d = ft[name] - ref[name.removeprefix("bert.")]
    want = ref[name.removeprefix("bert.")] + torch.where(d > 0, 1.0, -1.0) * d.abs().mean()
    torch.testing.assert_close(state[name], want, rtol=0, atol=1e-6)


def test_versions_history_and_remove(example, registry_copy):
    reg = registry_copy
    v1 = reg.commit("t", example.finetunes["has_top"], method="bitdelta", base="all", message="first")
    v2 = reg.commit("t", example.finetunes["has_small"], method="dare", base="all", message="second")
    assert (v1.version, v2.version) == (1, 2)
    assert v2.parent == reg.version_hashes("t")[0][1] and v1.parent is None
    assert [r.message for r in reg.log("t")] == ["second", "first"]
    old = reg.materialize("t", 1)
    assert "classifier.weight" in old and old["classifier.weight"].shape[0] == 2
    assert reg.materialize("t")["classifier.weight"].shape[0] == 2
    with pytest.raises(NotFoundError, match="no version 7"):
        reg.materialize("t", 7)
    with pytest.raises(NotFoundError, match="known tasks: t"):
        reg.materialize("nope")
    before = _du(reg.path)
    assert reg.remove("t", 1) == [1]
    assert [n for n, _ in reg.versions("t")] == [2]
    removed = reg.gc()
    assert removed["records"] >= 1 and removed["bytes"] > 0
    assert _du(reg.path) < before
    assert reg.verify() == []
    torch.testing.assert_close(reg.materialize("t")["classifier.weight"], v2 and _finetune(example, "has_small")["classifier.weight"])


def test_identical_content_costs_nothing_twice(example, registry_copy):
    reg = registry_copy
    reg.commit("a", example.finetunes["has_top"], method="bitdelta", base="all")
    before = _du(reg.path)
    reg.commit("b", example.finetunes["has_top"], method="bitdelta", base="all")
    # Same arrays, same files: only the new record and ref (and their folders) are written.
    assert _du(reg.path) - before < 40_000


def test_stats_count_real_bytes(example, registry_copy):
    reg = registry_copy
    reg.commit("has_top", example.finetunes["has_top"], method="dare", config={"drop_rate": 0.99}, base="all")
    stats = reg.stats("has_top").to_dict()
    _, record = reg.version("has_top")
    n_params = sum(t.numel() for t in _finetune(example).values())
    assert stats["source_fp16_bytes"] == 2 * n_params
    assert stats["ratio_fp16"] == pytest.approx(2 * n_params / stats["own_bytes"])
    assert stats["base_users"] == 1 and stats["base_bytes"] > 0
    arrays = sum(reg.objects.size("arrays", h) for h in record.array_hashes())
    assert stats["own_bytes"] <= arrays + reg.objects.size("records", reg.version("has_top")[0]) + 10_000
    # specs/format.md §10: the parts add up to the own bytes, each named by what it is.
    parts = stats["parts"]
    assert sum(parts.values()) == stats["own_bytes"] and parts["side_files"] == stats["file_bytes"]
    assert parts["record"] == reg.objects.size("records", reg.version("has_top")[0])
    assert parts["small_tensors"] == reg.objects.size("arrays", record.pack) > 0
    # Codes and masks: the bundle (format.md §5.9) and the arrays too large for it, each once.
    bundled = {b.name for b in record.bundled}
    alone = {h for e in record.tensors.values() if e.is_delta for h in e.array_hashes() if h not in bundled}
    assert record.bundle and parts["codes"] + parts["masks"] == reg.objects.size("arrays", record.bundle) + sum(
        reg.objects.size("arrays", h) for h in alone)
    assert parts["codes"] > 0 and parts["masks"] > 0


def test_materialize_dtype_and_save_pretrained(example, registry_copy, tmp_path):
    from transformers import AutoModelForSequenceClassification

    reg = registry_copy
    reg.commit("has_top", example.finetunes["has_top"], method="bitdelta", base="all")
    half = reg.materialize("has_top", dtype=torch.bfloat16)
    assert half["bert.encoder.layer.0.output.dense.weight"].dtype == torch.bfloat16
    out = reg.save_pretrained("has_top", tmp_path / "out")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    model = reg.load_model("has_top")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=example.inputs).logits, model(input_ids=example.inputs).logits)
    with pytest.raises(AlreadyExistsError, match="not empty"):
        reg.save_pretrained("has_top", out)


def test_refuses_mismatched_finetunes(example, registry_copy, tmp_path):
    reg = registry_copy
    ft = _finetune(example)
    snapshot = sorted(p.relative_to(reg.path) for p in reg.path.rglob("*") if "locks" not in p.parts)

    missing = {k: v for k, v in ft.items() if k != "bert.encoder.layer.0.attention.self.key.weight"}
    with pytest.raises(IncompatibleFinetuneError, match="'bert.encoder.layer.0.attention.self.key.weight'.*missing"):
        reg.commit("x", missing)
    reshaped = dict(ft, **{"bert.pooler.dense.weight": torch.zeros(128, 64)})
    with pytest.raises(IncompatibleFinetuneError, match="pooler.dense.weight.*shape \\[128, 64\\]"):
        reg.commit("x", reshaped)
    nan = dict(ft)
    nan["bert.pooler.dense.bias"] = ft["bert.pooler.dense.bias"].clone()
    nan["bert.pooler.dense.bias"][3] = float("nan")
    with pytest.raises(InvalidInputError, match="pooler.dense.bias.*NaN"):
        reg.commit("x", nan)
    unrelated = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in ft.items()}
    with pytest.raises(IncompatibleFinetuneError, match="probably another model"):
        reg.commit("x", unrelated)
    with pytest.raises(UnknownMethodError, match="known compressors are bitdelta, dare, deltadq"):
        reg.commit("x", ft, method="zip")
    with pytest.raises(InvalidInputError, match="invalid task name"):
        reg.commit("../x", ft)
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(InvalidInputError, match="pickle checkpoints.*refused"):
        reg.commit("x", tmp_path / "pickled")
    assert reg.tasks() == []
    assert sorted(p.relative_to(reg.path) for p in reg.path.rglob("*") if "locks" not in p.parts) == snapshot


def test_base_build_refuses_duplicate_name(example, registry_copy):
    with pytest.raises(AlreadyExistsError, match="base vector 'all' exists"):
        registry_copy.build_base("all", [example.finetunes["has_top"]])
    with pytest.raises(NotFoundError, match="no base vector named 'nope'"):
        registry_copy.commit("x", example.finetunes["has_top"], base="nope")


def test_sharded_finetune_reads_like_single_file(example, registry_copy, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(example.finetunes["has_top"])
    model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    registry_copy.commit("single", example.finetunes["has_top"])
    registry_copy.commit("sharded", tmp_path / "sharded")
    a, b = registry_copy.materialize("single"), registry_copy.materialize("sharded")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_verify_finds_flipped_byte_in_any_array(example, registry_copy):
    reg = registry_copy
    reg.commit("has_top", example.finetunes["has_top"], method="dare", base="all")
    _, record = reg.version("has_top")
    entry = record.tensors["bert.encoder.layer.0.output.dense.weight"]
    bundled = {b.name for b in record.bundled}  # read from the bundle (format.md §5.9)
    for digest in {record.bundle if h in bundled else h for h in entry.array_hashes()}:
        folder = reg.path / "objects" / "arrays" / digest[:2] / digest[2:]
        chunk = sorted(p for p in folder.iterdir() if p.name != "zarr.json")[0]
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0x10
        chunk.write_bytes(bytes(data))
        problems = reg.verify()
        assert any(digest[2:] in p["object"] and "has_top@1" in p["used_by"] for p in problems), problems
        data[len(data) // 2] ^= 0x10
        chunk.write_bytes(bytes(data))
    assert reg.verify() == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bf16_finetune_round_trips_in_its_dtype(example, registry_copy, dtype):
    """A half-precision finetune of the float32 reference is accepted (docs/guarantees.md) and
    materializes in its own dtype."""
    assert {e.dtype for e in registry_copy.reference().tensors.values()} >= {"float32"}
    ft = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in _finetune(example).items()}
    registry_copy.commit("bf16", ft, method="bitdelta", base="all")
    state = registry_copy.materialize("bf16")
    assert all(state[k].dtype == v.dtype for k, v in ft.items())
    assert torch.equal(state["classifier.weight"], ft["classifier.weight"])


def test_safetensors_file_finetune(example, registry_copy, tmp_path):
    path = tmp_path / "ft.safetensors"
    save_file(_finetune(example), str(path))
    record = registry_copy.commit("file", path, method="deltadq", config={"group_size": 8, "keep": 2, "bits": 4})
    assert record.files == {} and record.method == "deltadq"
    assert registry_copy.materialize("file").keys() == _finetune(example).keys()


@pytest.mark.cuda
def test_cuda_materialize_matches_cpu(example, registry_copy):
    for method, config in [("bitdelta", {}), ("dare", {"drop_rate": 0.9, "value_bits": 8}), ("deltadq", {})]:
        registry_copy.commit("has_top", example.finetunes["has_top"], method=method, config=config, base="all")
        cpu = registry_copy.materialize("has_top")
        gpu = registry_copy.materialize("has_top", device="cuda")
        for name, value in cpu.items():
            assert gpu[name].device.type == "cuda"
            # Same float32 operations in the same order: CPU and CUDA agree to the last bit
            # except where a fused multiply-add rounds once instead of twice.
            torch.testing.assert_close(gpu[name].cpu(), value, rtol=0, atol=1e-6)


def test_amortized_bytes_split_shared_objects(example, registry_copy):
    """Objects two tasks share (here: identical finetunes) cost each task half."""
    reg = registry_copy
    reg.commit("a", example.finetunes["has_top"], method="bitdelta", base="all")
    alone = reg.stats("a")
    assert alone.amortized_bytes == alone.own_bytes and alone.base_users == 1
    reg.commit("b", example.finetunes["has_top"], method="bitdelta", base="all")
    a, b = reg.stats("a"), reg.stats("b")
    assert a.own_bytes == alone.own_bytes and a.base_users == b.base_users == 2
    record_a = reg.objects.size("records", reg.version("a")[0])
    assert a.amortized_bytes == pytest.approx(record_a + (a.own_bytes - record_a) / 2)
    assert a.to_dict()["ratio_fp16_amortized"] > a.to_dict()["ratio_fp16_with_base_share"]


@pytest.mark.cuda
def test_cuda_commit_matches_cpu_commit(example, registry_copy):
    """A commit encoded on the GPU (tensors streamed through pinned staging, base vector decoded
    there) stores what a CPU commit stores, up to the last bits of the reductions (lam1, the
    BitDelta scales), which may flip the sign of residuals within rounding of zero."""
    cpu = registry_copy.commit("cpu", example.finetunes["has_top"], method="bitdelta", base="all")
    gpu = registry_copy.commit("gpu", example.finetunes["has_top"], method="bitdelta", base="all", device="cuda")
    assert gpu.lam1 == pytest.approx(cpu.lam1, rel=1e-5)
    want, got = registry_copy.materialize("cpu"), registry_copy.materialize("gpu")
    for name, value in want.items():
        # A scale a few ulps off moves many outputs by an ulp; a flipped sign moves one by 2*scale.
        far = ((got[name] - value).abs() > 1e-6 + 1e-5 * value.abs()).float().mean().item()
        assert far < 1e-3, (name, far)


def test_safetensors_read_into_any_range(example):
    """Positioned reads of any byte range give the tensor's bytes (the fast path streams
    tensors into pinned staging with them)."""
    source = open_source(example.finetunes["has_top"])
    for name in source.names()[:6]:
        whole = source.get(name).reshape(-1).view(torch.uint8)
        for start, length in [(0, whole.numel()), (3, min(17, whole.numel() - 3)), (whole.numel() - 1, 1)]:
            out = bytearray(length)
            source.read_into(name, memoryview(out), start)
            assert bytes(out) == whole[start:start + length].numpy().tobytes()
    with pytest.raises(ValueError, match="outside tensor"):
        source.read_into(name, memoryview(bytearray(2)), whole.numel() - 1)


def test_api_names_a_version_as_task_at_n(example, registry_copy):
    """`TASK@N` and `TASK@latest` work wherever the API names a task, like the CLI; giving the
    version twice, differently, is refused with a message naming both."""
    reg = registry_copy
    reg.commit("t", example.finetunes["has_top"], method="bitdelta", base="all")
    v2 = reg.commit("t", example.finetunes["has_small"], method="bitdelta", base="all")
    assert reg.version("t@1")[1].version == 1 and reg.version("t@latest")[1].version == 2
    for name, want in reg.materialize("t@1").items():
        assert torch.equal(want, reg.materialize("t", 1)[name])
    assert reg.stats("t@1").own_bytes == reg.stats("t", 1).own_bytes
    assert reg.load_model("t@1").config.num_labels == 2
    assert reg.version("t@2", 2)[1] == v2
    with pytest.raises(InvalidInputError, match=r"names version 1 but version=2"):
        reg.materialize("t@1", 2)
    with pytest.raises(InvalidInputError, match="TASK@latest"):
        reg.version("t@first")
    assert reg.remove("t@latest") == [2]  # one version, not the whole task
    assert [n for n, _ in reg.version_hashes("t")] == [1]


def test_versions_give_numbers_and_records_and_reprs_are_one_line(example, registry_copy):
    reg = registry_copy
    first = reg.commit("t", example.finetunes["has_top"], method="bitdelta", base="all", message="first")
    second = reg.commit("t", example.finetunes["has_top"], method="dare", message="second")
    assert reg.versions("t") == [(1, first), (2, second)]
    assert reg.log("t") == [second, first]
    for record in (first, reg.reference(), reg.base("all")[1]):
        text = repr(record)
        assert "\n" not in text and len(text) < 300, text
    assert repr(first).startswith("TaskVersion(task='t', version=1, method='bitdelta'")


def test_skip_unchanged_returns_the_latest_version(example, registry_copy):
    """The API commits the same finetune twice as two versions unless asked to skip."""
    from deltastore.tuning import l2

    reg = registry_copy
    first = reg.commit("t", example.finetunes["has_top"], base="all", skip_unchanged=True)
    assert len(first.source["sha256"]) == 64 and first.source["settings"]["tune"] == "l2"
    assert reg.commit("t", example.finetunes["has_top"], base="all", skip_unchanged=True) == first
    second = reg.commit("t", example.finetunes["has_top"], base="all")
    assert second.version == 2 and "sha256" not in second.source  # unchecked commits pay nothing, record nothing
    assert reg.commit("t", example.finetunes["has_top"], base="all", skip_unchanged=True).version == 3
    assert reg.commit("t", example.finetunes["has_top"], base="all", per_layer=True, skip_unchanged=True).version == 4
    assert reg.commit("t", example.finetunes["has_top"], base="all", per_layer=True, tune=l2,
                      skip_unchanged=True).version == 5  # a tuner given as a function is never comparable
