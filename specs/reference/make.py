"""Rebuild the reference registry of specs/format.md: ``python specs/reference/make.py``.

Writes ``specs/reference/registry/`` (a small registry made with the public API) and
``specs/reference/expected/<task>@<version>.safetensors`` (what ``Registry.materialize``
gives for each task version). Both are checked in; ``tests/test_format.py`` reads them back
with deltastore and with an independent reader written from the spec alone. Rerun this
script after a format change, then review the diff and bump the spec's change log.

Everything is deterministic: tensors come from ``torch.manual_seed``, seeds are fixed, the
models are read from relative paths (their labels are stored in records) and the records'
timestamps are pinned, so a rebuild with an unchanged format gives byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

import deltastore.engine.commit
import deltastore.registry
import deltastore.storage.layout
from deltastore import Registry

HERE = Path(__file__).resolve().parent
REGISTRY = HERE / "registry"
EXPECTED = HERE / "expected"
# Records hold ISO 8601 creation times; a fixed one keeps rebuilds byte-identical.
CREATED = "2025-01-01T00:00:00+00:00"
# Relative size of a finetune's change: shared part (what the base vector captures) and own part.
SHARED_NOISE = 1e-2
OWN_NOISE = 0.5e-2


def reference() -> dict[str, torch.Tensor]:
    """The pretrained model: every dtype and layout the format distinguishes, kept tiny.

    Matrices of >= 4096 elements (``deltastore.engine.commit.MIN_LOSSY_NUMEL``) are stored as
    deltas in task versions: fp16, fp32, and a 3-D bf16 tensor whose 91 columns leave a
    short last DeltaDQ group (91 = 11 * 8 + 3). The rest is stored losslessly.
    """
    torch.manual_seed(0)
    return {
        "emb.weight": torch.randn(96, 64) * 0.02,                                   # fp32
        "layer.weight": (torch.randn(64, 64) * 0.05).half(),                        # fp16
        "layer.bias": (torch.randn(64) * 0.01).half(),                              # fp16, 1-D
        "conv.weight": (torch.randn(48, 7, 13) * 0.05).to(torch.bfloat16),          # bf16, 3-D
        "attn.mask": torch.tril(torch.ones(4, 4, dtype=torch.bool)),                # bool buffer
        "layer.steps": torch.tensor([1000, -3, 7], dtype=torch.int64),             # int64 buffer
        "layer.scale": torch.tensor(0.125),                                         # fp32, 0-d
    }


def shared_direction(ref: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A direction every finetune moves along: what makes a base vector worth having."""
    torch.manual_seed(1)
    return {name: torch.randn(w.shape) for name, w in ref.items() if w.is_floating_point()}


def finetune(ref: dict[str, torch.Tensor], shared: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Reference + about 1e-2 relative noise; about half the embedding rows exactly unchanged;
    plus a task-own classifier head that the reference does not have."""
    torch.manual_seed(seed)
    out = {}
    for name, w in ref.items():
        if not w.is_floating_point():
            out[name] = w.clone()
            continue
        scale = float(w.float().pow(2).mean().sqrt())
        delta = scale * (SHARED_NOISE * shared[name] + OWN_NOISE * torch.randn(w.shape))
        if name == "emb.weight":
            delta[torch.rand(w.shape[0]) < 0.5] = 0.0  # rows a finetune never touched (rare tokens)
        out[name] = (w.float() + delta).to(w.dtype)
    out["head.weight"] = torch.randn(3, 64) * 0.1
    return out


def task_own_tensors() -> dict[str, torch.Tensor]:
    """Tensors the reference does not have, stored losslessly: every dtype the lossless page
    lists that the reference lacks, the edge values (-0.0, subnormals, extremes) whose bits must
    survive, an empty tensor (an array without chunk files) and a 2-d one of several chunks.
    NaN and infinities cannot be here: writers refuse them (format.md section 6)."""
    tiny = torch.finfo(torch.float32).tiny
    return {
        "extra.f64": torch.tensor([[-0.0, 1e-310, 1.0 / 3.0], [1.7e308, -2.5, 0.0]], dtype=torch.float64),
        "extra.f32": torch.tensor([-0.0, tiny / 8, -3.4e38, 0.1], dtype=torch.float32),
        "extra.f16": torch.tensor([-0.0, 6e-8, 65504.0, -65504.0, 0.1], dtype=torch.float16),
        "extra.bf16": torch.tensor([-0.0, 3.0e38, 1e-40, 0.1], dtype=torch.bfloat16),
        "extra.i32": torch.tensor([-2**31, 2**31 - 1, 0], dtype=torch.int32),
        "extra.i16": torch.tensor([-2**15, 2**15 - 1, -1], dtype=torch.int16),
        "extra.i8": torch.tensor([-128, 127, -1], dtype=torch.int8),
        "extra.u8": torch.tensor([0, 255, 128], dtype=torch.uint8),
        "extra.empty": torch.zeros(0, 4),
        # Drawn from the finetune's random stream, so each version stores its own array; 20 rows
        # of 256 bytes make two chunks ("0.0", "1.0", the second padded) at SMALL_CHUNK_BYTES.
        "extra.table": torch.randn(20, 64),
    }


def tokenizer(max_length: int) -> dict:
    """A small tokenizer.json: the side file every finetune re-saves."""
    return {"version": "1.0", "truncation": {"max_length": max_length, "strategy": "LongestFirst"},
            "model": {"type": "WordPiece", "unk_token": "[UNK]", "vocab": {f"tok{i}": i for i in range(400)}}}


VOCAB = "".join(f"word{i}\n" for i in range(400))


def write_model(folder: Path, tensors: dict[str, torch.Tensor], config: dict, finetuned: bool) -> None:
    """A Hugging Face style directory: the weights plus side files (stored as blobs). The
    reference's tokenizer.json is compact; a finetune re-saves it indented by two spaces with
    another max_length (a patch with the `json` transform, format 1.2 section 3.3), and adds a
    token to vocab.txt (a patch with the `raw` transform)."""
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, sort_keys=True, indent=1) + "\n")
    if finetuned:
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer(64), indent=2, ensure_ascii=False))
        (folder / "vocab.txt").write_text(VOCAB + "[TASK]\n")
    else:
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer(128), separators=(",", ":")))
        (folder / "vocab.txt").write_text(VOCAB)


COMMITS = [
    # task, version's model folder, commit arguments
    ("alpha", "alpha-1", dict(method="bitdelta", base="b", seed=1, message="alpha v1: bitdelta over base b")),
    # The dare versions of alpha, beta and gamma ask for the hash layout: they are the format 1.0
    # cases, byte for byte; delta's are of the gaps layout (specs/compressors/dare.md, page 1.1).
    ("alpha", "alpha-2", dict(method="dare", config={"drop_rate": 0.9, "value_bits": 8, "layout": "hash"}, base="b",
                              seed=2,
                              message="alpha v2: dare p=0.9, int8 values, over base b")),
    ("beta", "beta-1", dict(method="deltadq", config={"group_size": 8, "keep": 2, "bits": 3}, seed=3,
                            message="beta v1: deltadq g=8 k=2 b=3, no base")),
    ("beta", "beta-2", dict(method="dare", config={"value_bits": 16, "layout": "hash"}, base="b", per_layer=True, seed=4,
                            message="beta v2: dare fp16 values over base b, per-tensor lambdas")),
    ("gamma", "gamma-1", dict(method="deltadq", config={"group_size": 8, "keep": 2, "bits": 3, "stored_planes": 2},
                              base="b", seed=5, message="gamma v1: deltadq b=3 with the lowest plane dropped")),
    ("gamma", "gamma-2", dict(method="dare", config={"drop_rate": 0.0, "layout": "hash"}, base="b", seed=6,
                              message="gamma v2: dare p=0 (every element kept), 4 KiB chunks")),
    ("delta", "delta-1", dict(method="dare", config={"drop_rate": 0.9, "value_bits": 8}, base="b", seed=7,
                              message="delta v1: dare layout gaps p=0.9, int8 values, over base b")),
    ("delta", "delta-2", dict(method="dare", config={"drop_rate": 0.99}, seed=8,
                              message="delta v2: dare layout gaps p=0.99, fp16 values, no base")),
    ("delta", "delta-3", dict(method="dare", config={"drop_rate": 0.9}, base="b", seed=9,
                              message="delta v3: layer.bias saved as float32, XORed with the reference's float16")),
]
# Finetunes saved with a wider float type than the reference's: a pack XORs their small tensors
# with the reference's values widened (format 1.4 section 5.8), as a float32 finetune of a
# bfloat16 model is stored.
WIDENED = {"delta-3": {"layer.bias": torch.float32}}
# gamma@2 is written with chunks of at most this many bytes, so that its arrays span several
# chunks (the last one padded) as the arrays of a real model do at 8 MiB, with no pack (format
# 1.2 section 5.8): its whole tensors are lossless arrays of their own, as a real model's whole
# tensors over 1 MiB are (0-d, empty and several-chunk arrays included), and with no bundle
# (format 1.3 section 5.9): its codes are arrays of their own, as a real model's over 64 KiB.
SMALL_CHUNK_BYTES = 4096
NO_PACK = NO_BUNDLE = -1


def build(out: Path, expected: Path) -> None:
    ref = reference()
    shared = shared_direction(ref)
    seeds = {"alpha-1": 11, "alpha-2": 12, "beta-1": 21, "beta-2": 22, "gamma-1": 31, "gamma-2": 32,
             "delta-1": 41, "delta-2": 42, "delta-3": 43}
    work = Path(tempfile.mkdtemp(prefix="deltastore-reference-"))
    cwd = os.getcwd()
    try:
        os.chdir(work)  # models are opened by relative path: their labels go into the records
        write_model(Path("reference"), ref, {"model_type": "toy"}, finetuned=False)
        for label, seed in seeds.items():
            task = label.split("-")[0]
            tensors = finetune(ref, shared, seed)
            if task == "gamma":
                tensors.update(task_own_tensors())
            for name, dtype in WIDENED.get(label, {}).items():
                tensors[name] = tensors[name].to(dtype)
            write_model(Path(label), tensors, {"model_type": "toy", "task": task, "num_labels": 3}, finetuned=True)
        # zstd reference arrays, as the checked-in registry was built (before init's default
        # became raw): lossless arrays exercise the zstd codec, the task codes the raw one.
        reg = Registry.init(out, "reference", compress_reference=True, progress=False)
        reg.build_base("b", ["alpha-1", "beta-1"], progress=False)
        for task, label, kwargs in COMMITS:
            commit = deltastore.engine.commit
            chunk_bytes, pack_bytes, bundle_bytes = \
                deltastore.storage.layout.CHUNK_BYTES, commit.PACK_MAX_BYTES, commit.BUNDLE_MAX_BYTES
            if label == "gamma-2":
                deltastore.storage.layout.CHUNK_BYTES = SMALL_CHUNK_BYTES
                commit.PACK_MAX_BYTES, commit.BUNDLE_MAX_BYTES = NO_PACK, NO_BUNDLE
            try:
                reg.commit(task, label, progress=False, skip_unchanged=True, **kwargs)  # records source.sha256
            finally:
                deltastore.storage.layout.CHUNK_BYTES = chunk_bytes
                commit.PACK_MAX_BYTES, commit.BUNDLE_MAX_BYTES = pack_bytes, bundle_bytes
        # A removed task keeps its ref, for the highest version number issued (format 1.1).
        reg.commit("removed", "alpha-1", message="removed v1", progress=False)
        reg.remove("removed")
        reg.gc()
        expected.mkdir(parents=True)
        for task in reg.tasks():
            for number, _ in reg.versions(task):
                state = reg.materialize(task, number, progress=False)
                save_file({k: v.contiguous() for k, v in state.items()}, str(expected / f"{task}@{number}.safetensors"))
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)
    # Lock files and an empty staging folder are not data (specs/format.md section 2).
    for transient in ("locks", "staging"):
        shutil.rmtree(out / transient, ignore_errors=True)
    problems = Registry(out).verify(progress=False)
    if problems:
        raise SystemExit(f"the new reference registry does not verify: {problems}")


def main() -> None:
    deltastore.registry.utc_now = lambda: CREATED  # pinned timestamps (see the module docstring)
    tmp = Path(tempfile.mkdtemp(prefix="reference-", dir=HERE))
    try:
        build(tmp / "registry", tmp / "expected")
        for target in (REGISTRY, EXPECTED):
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp / target.name, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    print(f"wrote {REGISTRY.relative_to(HERE.parent.parent)} and {EXPECTED.relative_to(HERE.parent.parent)}; "
          f"specs/reference/ holds {total} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
