"""Where the time of a materialize to CUDA goes (issue 12: ``load_model`` against ``from_pretrained``).

Builds a Llama-2-7B-shaped model with ``--layers`` decoder layers (benchmarks/speed.py's
builders: a bf16 reference, a finetune written as safetensors, a base vector, a bitdelta+base
task) and times, each the median of ``--repeats`` runs after one warm-up, side by side in one
run: ``from_pretrained`` of the finetune directory, ``load_model``, ``materialize`` with and
without the hash check, both with every array hashed in line by its reader (as before the
largest arrays were hashed behind their read), with other reader-thread counts, staging slot
and pool sizes, and the read path alone (every reference array through the pinned pool onto
the GPU, no decode). The
reader threads' own seconds (summed over threads, last run) split each into opening arrays
(``zarr.json``), reading chunks (``read_chunk``: file read into pinned memory; before the hash
ran behind the read, the sha256 too), waiting for a free staging slot (and, since, for its
hash) and queueing copies. One thread's sha256 rate and the largest array read alone show the
critical path of a hashed read: an array is hashed in order, by one thread.

    python benchmarks/materialize_profile.py --layers 4      # on the GPU machine: about 2 minutes
    python benchmarks/materialize_profile.py --small         # CPU smoke run (no staging pool there)

Writes materialize_profile.{md,json} to ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import platform
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import speed  # noqa: E402  (the Llama-shaped builders)

TASK = "bitdelta_base"


class ThreadSeconds:
    """Seconds spent inside chosen methods, summed over all threads."""

    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self._lock = threading.Lock()

    def wrap(self, owner, method: str, label: str) -> None:
        original = getattr(owner, method)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                with self._lock:
                    self.seconds[label] += time.perf_counter() - start

        setattr(owner, method, timed)


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM

    from deltastore import Registry
    from deltastore.engine import reader as reader_module
    from deltastore.engine.decode import plan
    from deltastore.engine.materialize import iter_materialize, resolve_device
    from deltastore.storage import objects as objects_module

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--small", action="store_true", help="speed.py's small shapes on the CPU: a smoke run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/deltastore-materialize-profile")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    device = "cpu" if args.small else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("materialize_profile.py profiles the CUDA path: run it on a machine with a GPU, "
                         "or pass --small for a CPU smoke run")
    cfg = dict(speed.SMALL if args.small else speed.FULL, layers=args.layers)
    work = Path(args.workdir)
    started = time.perf_counter()
    if not (work / "registry").exists():
        speed.write_safetensors(cfg, 1, work / "finetune", device)
        reg = Registry.init(work / "registry", speed.Synthetic(cfg, 0, device), progress=False)
        reg.build_base("all", [str(work / "finetune"), speed.Synthetic(cfg, 2, device)], progress=False)
        reg.commit(TASK, str(work / "finetune"), method="bitdelta", base="all", progress=False, device=device)
    build_s = time.perf_counter() - started
    reg = Registry(work / "registry")
    _, record = reg.version(TASK)
    model_bytes = 2 * sum(int(torch.tensor(s).prod()) for s in speed.shapes(cfg).values())

    threads = ThreadSeconds()
    threads.wrap(objects_module.ArrayReader, "__init__", "open arrays")
    threads.wrap(objects_module.ArrayReader, "read_chunk", "read chunks (read_chunk)")
    threads.wrap(reader_module.StagingPool, "_take", "wait for a slot")
    threads.wrap(reader_module.StagingPool, "_send", "queue copies")

    rows = []

    def measure(label: str, fn) -> None:
        fn()
        speed.sync(device)
        runs = []
        for _ in range(args.repeats):
            threads.seconds.clear()
            start = time.perf_counter()
            fn()
            speed.sync(device)
            runs.append(time.perf_counter() - start)
        seconds = statistics.median(runs)
        rows.append({"what": label, "seconds": seconds, "GBps": model_bytes / seconds / 1e9, "runs": runs,
                     "thread_seconds": dict(threads.seconds)})
        print(f"{label}: {seconds:.3f} s", flush=True)

    def materialize(**kwargs):
        state = dict(iter_materialize(reg.objects, record, where=str(reg.path), device=device, **kwargs))
        speed.sync(device)
        del state

    def from_pretrained():
        model = AutoModelForCausalLM.from_pretrained(work / "finetune", device_map=device, dtype=torch.bfloat16)
        del model

    def load_model():
        model = reg.load_model(TASK, device=device, dtype=torch.bfloat16)
        del model

    reference = [h for item in plan(reg.objects, record, str(reg.path)) if item.ref_entry is not None
                 for h in item.ref_entry.arrays.values()]

    def read_path(verify: bool, digests=reference):
        reader = reader_module.DeviceReader(reg.objects, resolve_device(device), verify)
        with ThreadPoolExecutor(16) as pool:
            arrays = list(pool.map(lambda d: reader.run(reader.array, d, "profile")[0], digests))
        speed.sync(device)
        del arrays

    measure("from_pretrained of the finetune directory", from_pretrained)
    measure("load_model", load_model)
    measure("materialize", materialize)
    measure("materialize, verify=False", lambda: materialize(verify=False))
    hash_behind = objects_module.HASH_BEHIND_MIN_BYTES

    def hash_in_line(fn):
        """``fn`` with every array hashed by its reading thread, as before large arrays were
        hashed behind their read (storage/objects.py, HASH_BEHIND_MIN_BYTES)."""
        def run():
            objects_module.HASH_BEHIND_MIN_BYTES = 1 << 62
            try:
                fn()
            finally:
                objects_module.HASH_BEHIND_MIN_BYTES = hash_behind
        return run

    measure(f"load_model, every sha256 in line (default: behind the read from {hash_behind >> 20} MiB)",
            hash_in_line(load_model))
    measure("materialize, every sha256 in line", hash_in_line(materialize))
    for workers in (4, 8, 32):
        measure(f"materialize, {workers} reader threads (default 16)", lambda w=workers: materialize(workers=w))
    default_slot = reader_module.STAGING_SLOT_BYTES
    for slot in (4 << 20, 64 << 20):
        reader_module.STAGING_SLOT_BYTES = slot
        measure(f"materialize, {slot >> 20} MiB staging slots (default {default_slot >> 20})", materialize)
    reader_module.STAGING_SLOT_BYTES = default_slot
    measure("materialize, 1 GiB staging pool (default 384 MiB)", lambda: materialize(staging_bytes=1 << 30))
    measure("read path alone: reference arrays to the GPU, 16 threads", lambda: read_path(True))
    measure("read path alone, verify=False", lambda: read_path(False))
    largest = max(reference, key=lambda d: reg.objects.open_array(d, verify=False, what="").nbytes)
    measure("largest reference array alone (one thread)", lambda: read_path(True, [largest]))
    measure("largest reference array alone, sha256 in line", hash_in_line(lambda: read_path(True, [largest])))

    buffer = torch.empty(256 << 20, dtype=torch.uint8).numpy()
    start = time.perf_counter()
    hashlib.sha256(buffer).digest()
    sha_GBps = buffer.nbytes / (time.perf_counter() - start) / 1e9

    result = {"machine": {"gpu": torch.cuda.get_device_name() if device == "cuda" else "none", "cpus": os.cpu_count(),
                          "torch": torch.__version__, "python": platform.python_version()},
              "config": cfg, "model_bytes": model_bytes, "largest_array_bytes":
              reg.objects.open_array(largest, verify=False, what="").nbytes, "sha256_one_thread_GBps": sha_GBps,
              "build_s": build_s, "repeats": args.repeats, "rows": rows}
    out = Path(args.out)
    if args.small:  # a smoke run's figures are not the GPU path's: printed, not written
        return 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "materialize_profile.json").write_text(json.dumps(result, indent=2))
    labels = sorted({k for r in rows for k in r["thread_seconds"]})
    lines = ["# Where a materialize to CUDA spends its time (benchmarks/materialize_profile.py)", "",
             f"Machine: {result['machine']['gpu']}, {result['machine']['cpus']} CPUs; torch {torch.__version__}. "
             f"Model: Llama-2-7B shapes, {args.layers} layers, {model_bytes / 1e9:.2f} GB bf16; one bitdelta+base "
             f"task. Medians of {args.repeats} runs after a warm-up, all from one run. sha256 on one thread: "
             f"{sha_GBps:.2f} GB/s; the largest array: {result['largest_array_bytes'] / 1e6:.0f} MB. Thread "
             "seconds: summed over the reader threads, last run.", "",
             "| what | seconds | GB/s | " + " | ".join(labels) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in labels) + " |"]
    for r in rows:
        lines.append(f"| {r['what']} | {r['seconds']:.3f} | {r['GBps']:.1f} | "
                     + " | ".join(f"{r['thread_seconds'].get(k, 0):.2f}" for k in labels) + " |")
    (out / "materialize_profile.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
