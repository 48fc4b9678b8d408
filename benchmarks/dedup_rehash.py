"""What it costs that dedup rehashes an object before reusing it (issue 10, finding 5).

A commit that finds an object it would write already stored used to trust it; it now reads
and rehashes it (and writes it again if damaged). The cost falls on commits whose objects are
already stored: the worst case is committing the same finetune a second time, where every
array is reused. This times, on a synthetic model (24 fp32 1024x1024 matrices, ~100 MB, plus
a task-own head): the first commit (everything written), the same finetune committed again
under other names with the rehash, and with the old trusting check patched back in (best of
REPEATS interleaved runs each: the machine may be shared).
Writes benchmarks/results/dedup_rehash.{md,json}.

    python benchmarks/dedup_rehash.py [--device cuda]      # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from deltastore import Registry
from deltastore.storage.objects import ObjectStore, object_key

RESULTS = Path(__file__).parent / "results"
LAYERS, SIZE = 24, 1024
REPEATS = 5


def write_model(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    return folder


def timed_commit(reg: Registry, task: str, finetune: Path, device: str) -> float:
    began = time.perf_counter()
    reg.commit(task, finetune, device=device, progress=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    reference = {f"layer{i}.weight": torch.randn(SIZE, SIZE, generator=gen) * 0.02 for i in range(LAYERS)}
    finetune = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in reference.items()}
    finetune["head.weight"] = torch.randn(8, SIZE, generator=gen)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        reg = Registry.init(root / "registry", write_model(root / "reference", reference), progress=False)
        folder = write_model(root / "finetune", finetune)
        first = timed_commit(reg, "first", folder, args.device)
        checked = ObjectStore._reusable
        rehashed, trusted = [], []
        for i in range(REPEATS):  # interleaved, best of each: the machine is shared
            rehashed.append(timed_commit(reg, f"rehashed{i}", folder, args.device))
            ObjectStore._reusable = lambda self, kind, digest: self.backend.exists(object_key(kind, digest))
            try:
                trusted.append(timed_commit(reg, f"trusted{i}", folder, args.device))
            finally:
                ObjectStore._reusable = checked
        rehashed, trusted = min(rehashed), min(trusted)
    result = {
        "model_bytes": sum(t.numel() * t.element_size() for t in finetune.values()),
        "device": args.device, "python": sys.version.split()[0], "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "seconds": {"first_commit": round(first, 2), "again_rehashing": round(rehashed, 2),
                    "again_trusting_old": round(trusted, 2)},
        "rehash_overhead": round(rehashed / trusted - 1, 3),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dedup_rehash.json").write_text(json.dumps(result, indent=2) + "\n")
    s = result["seconds"]
    table = "\n".join([
        "# Dedup rehash cost (benchmarks/dedup_rehash.py)", "",
        f"Synthetic model, {result['model_bytes'] / 1e6:.0f} MB fp32, device {args.device}, "
        f"{result['torch_threads']} torch threads. The same finetune committed again and again: every "
        f"commit after the first reuses every array. Best of {REPEATS} interleaved runs each.", "",
        "| commit | seconds |", "| --- | --- |",
        f"| first (writes everything) | {s['first_commit']} |",
        f"| again, rehashing what it reuses (now) | {s['again_rehashing']} |",
        f"| again, trusting what it reuses (before issue 10) | {s['again_trusting_old']} |", "",
        f"Rehash overhead on a fully deduplicated commit: {result['rehash_overhead']:+.0%}.", "",
    ])
    (RESULTS / "dedup_rehash.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
