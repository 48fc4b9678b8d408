"""Shared pieces of the reliability tests: a tiny model, registry snapshots, leftovers.

The fault sweeps run an operation hundreds of times, so they use a model of five small
tensors (two of them big enough to be stored as lossy deltas) instead of the BERT example.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from deltastore import Registry
from deltastore.engine.decode import decode_stored
from deltastore.integrity import _reachable

REFERENCE_SHAPES = {"emb.weight": (256, 32), "lin.weight": (64, 64), "lin.bias": (64,), "norm.weight": (32,)}


@dataclass
class Tiny:
    """Paths of the tiny reference and its finetunes (HF-style folders)."""

    root: Path
    reference: Path
    finetunes: dict[str, Path]


def reference_state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {name: torch.randn(shape, generator=gen) for name, shape in REFERENCE_SHAPES.items()}
    state["pos_ids"] = torch.arange(16, dtype=torch.int64)
    return state


def finetune_state(i: int, reference: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A finetune: some embedding rows and the whole linear layer moved by ~1%, plus a head."""
    ref = reference or reference_state()
    gen = torch.Generator().manual_seed(100 + i)
    state = {k: v.clone() for k, v in ref.items()}
    state["emb.weight"][: 40 + 10 * i] += 0.02 * torch.randn(40 + 10 * i, 32, generator=gen)
    state["lin.weight"] += 0.01 * torch.randn(64, 64, generator=gen)
    state["lin.bias"] += 0.01
    state["head.weight"] = torch.randn(3, 32, generator=gen)
    return state


def write_model(folder: Path, state: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "tiny", "hidden": 32}))
    return folder


def make_tiny(root: Path) -> Tiny:
    ref = reference_state()
    finetunes = {name: write_model(root / "finetunes" / name, finetune_state(i, ref), {"task": name})
                 for i, name in enumerate(["a", "b", "c"])}
    return Tiny(root, write_model(root / "reference", ref), finetunes)


def state_hash(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def snapshot(reg: Registry) -> dict:
    """What a user can read from the registry, without timestamps (record hashes include
    them, so two runs of one operation differ there): decoded tensors, names, numbers."""
    reference = reg.reference()
    out = {
        "reference": state_hash({n: reg._reference_tensor(reference, n) for n in reference.tensors}),
        "reference_files": sorted(reference.files.items()),
        "bases": {},
        "tasks": {},
    }
    for name in reg.bases():
        _, base = reg.base(name)
        out["bases"][name] = state_hash({n: decode_stored(e, lambda d, what: reg.objects.get_array(d, what=what), "cpu") for n, e in base.tensors.items()})
    for task in reg.tasks():
        out["tasks"][task] = [(n, reg.version(task, n)[1].message, state_hash(reg.materialize(task, n)))
                              for n, _ in reg.versions(task)]
    return out


def leftovers(reg: Registry) -> dict:
    """Everything gc should have removed: staging, unreachable objects, temp files."""
    used = set(_reachable(reg))
    stored = {(kind, d) for kind, names in reg.objects.all_objects().items() for d in names}
    files = reg.backend.list("")
    return {
        "staging": reg.backend.children("staging"),
        "unreachable": sorted(stored - used),
        "temp_files": [f for f in files if f.endswith((".tmp", ".partial"))],
        # files under objects/ that belong to no object (a half-deleted array, a temp file)
        "strays": [f for f in files if f.startswith("objects/") and
                   (f.split("/")[1], "".join(f.split("/")[2:4])) not in stored],
    }


CLEAN = {"staging": [], "unreachable": [], "temp_files": [], "strays": []}


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file's bytes under ``root`` except lock files (taking a lock creates one)."""
    root = Path(root)
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.relative_to(root).as_posix().startswith("locks/")}


def copy_registry(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def upload_registry(src: Path, url: str) -> str:
    """The local registry ``src`` copied key by key to ``url`` (its lock files left out)."""
    from deltastore.storage.objectstore import ObjectStoreBackend

    bucket = ObjectStoreBackend(url, check_writes=False)
    for file in sorted(p for p in Path(src).rglob("*") if p.is_file()):
        key = file.relative_to(src).as_posix()
        if not key.startswith("locks/"):
            bucket.put(key, file.read_bytes())
    return url


@dataclass
class Where:
    """Where a scenario's registry lives: ``kind`` (``local``, ``s3`` or ``azure``), the
    environment a child process needs to reach it, and ``place(src)``: a private copy of
    registry ``src`` there (a folder, or a fresh prefix of a test server's bucket or container)."""

    kind: str
    env: dict
    place: Callable[[Path], "str | Path"]
