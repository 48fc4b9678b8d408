"""Throughput of `commit-many` on Dask (issue 14): finetunes per minute and GB/s for 1, 2, 4
and 8 workers committing the same finetunes, and a base vector built from them on the cluster
against one built in this process (which must have the same bits).

The model is synthetic, ``--layers`` float16 matrices of ``--hidden`` x ``--hidden`` plus a
small lossless tail (default 16 x 4096^2: 268M parameters, 537 MB a finetune); each finetune
moves 90% of the rows of every matrix by ~1% and leaves the others exactly unchanged, as
finetunes without weight decay leave embedding rows. They are written once into ``--cache``
(outside the repository; reused by later runs of the same size). For every worker count a
fresh registry (beside the cache) receives all ``--finetunes`` with a local cluster of that
many workers (workers get a GPU each while GPUs last: `local_cluster`; none with
``--cpu-only``); the cluster is started and its workers have imported deltastore before the
clock starts. With ``--s3`` the same runs
go to an S3 server on loopback (SeaweedFS from the dev extra). Writes fanout.{md,json} to
``--out`` (default benchmarks/results).

    python benchmarks/fanout.py                                   # the GPU machine: full size
    python benchmarks/fanout.py --hidden 512 --layers 8 --workers 1 2   # a small machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from distributed import Client
from safetensors.torch import save_file

from deltastore import Registry
from deltastore.engine.fanout import THREADS_PER_WORKER, Job, local_cluster

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def build_models(cache: Path, layers: int, hidden: int, count: int) -> tuple[Path, list[Path]]:
    """The reference and ``count`` finetunes in ``cache`` (written once, then reused)."""
    folder = cache / f"fanout-{layers}x{hidden}-{count}"
    done = folder / "complete"
    names = [f"ft{i:02d}" for i in range(count)]
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        gen = torch.Generator().manual_seed(0)
        reference = {f"layers.{i}.weight": (0.02 * torch.randn(hidden, hidden, generator=gen)).half()
                     for i in range(layers)}
        reference["norm.weight"] = torch.ones(hidden, dtype=torch.float16)
        _write(folder / "reference", reference)
        for t, name in enumerate(names):
            state = dict(reference)
            for key, w in reference.items():
                if w.dim() == 2:
                    moved = torch.rand(hidden, generator=gen) < 0.9
                    delta = 2e-4 * torch.randn(hidden, hidden, generator=gen) * moved[:, None]
                    state[key] = (w.float() + delta).half()
            state["head.weight"] = torch.randn(8, hidden, generator=gen).half()
            _write(folder / name, state, {"task": name})
        done.touch()
    return folder / "reference", [folder / name for name in names]


def _write(folder: Path, state: dict[str, torch.Tensor], config: dict | None = None) -> None:
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "synthetic"}))


def _warm(client: Client) -> None:
    """Every worker imports what a job needs before the clock starts (seconds each)."""
    client.run(lambda: __import__("deltastore.registry"))


def run(location_for, reference: Path, finetunes: list[Path], workers: int, method: str, gpus: int | None,
        base: bool) -> dict:
    """Commit every finetune with ``workers`` workers into a fresh registry; then (``base``) a
    base build on the cluster and one here, timed, and compared tensor by tensor."""
    reg = Registry.init(location_for(f"w{workers}"), reference, progress=False)
    jobs = [Job(i + 1, path.name, str(path), method) for i, path in enumerate(finetunes)]
    with local_cluster(workers, gpus=gpus) as cluster, Client(cluster) as client:
        _warm(client)
        summary = reg.commit_many(jobs, client, progress=False)
        if base:
            began = time.perf_counter()
            there = reg.build_base("cluster", [str(f) for f in finetunes], client=client, progress=False)
            base_cluster = time.perf_counter() - began
    if base:
        began = time.perf_counter()
        here = reg.build_base("here", [str(f) for f in finetunes], progress=False)
        base_here = time.perf_counter() - began
    if summary["failed"]:
        failed = [r for r in summary["results"] if r["status"] == "failed"]
        raise SystemExit(f"{len(failed)} job(s) failed, first: {failed[0]['error']}")
    return {
        "workers": workers, "devices": sorted({r["device"] for r in summary["results"]}), "seconds": round(summary["seconds"], 2),
        "finetunes_per_minute": round(summary["finetunes_per_minute"], 2),
        "source_gb_per_s": round(summary["source_gb_per_s"], 4), "bytes_on_disk": summary["bytes_on_disk"],
        "source_bytes": summary["source_bytes"], "ratio_fp16": round(summary["ratio_fp16"], 2),
        "job_seconds_mean": round(sum(r["seconds"] for r in summary["results"]) / len(jobs), 2),
        "base_build_seconds": {"cluster": round(base_cluster, 2), "one_process": round(base_here, 2)} if base else None,
        "base_same_bits": there.tensors == here.tensors if base else None,
    }


def s3_locations(folder: Path):
    """A function naming fresh registries in a bucket of an S3 server started here, and the
    server's process; or a reason why not (no server)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from storage import s3_server

    try:
        proc, server = s3_server.start(folder)
    except RuntimeError as exc:
        return None, None, f"no S3 server: {exc}"
    s3_server.create_bucket(server)
    os.environ.update(server.env)  # the workers, started after this, inherit it
    return (lambda name: f"s3://{server.bucket}/{name}-{time.time_ns()}"), proc, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--finetunes", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--method", default="bitdelta")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "deltastore-bench")
    parser.add_argument("--s3", action="store_true", help="also commit into an S3 server on loopback")
    parser.add_argument("--cpu-only", action="store_true", help="no worker gets a GPU (default: one per GPU)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where fanout.{md,json} go")
    parser.add_argument("--no-base", action="store_true", help="skip the base builds (commits only)")
    args = parser.parse_args()
    reference, finetunes = build_models(args.cache, args.layers, args.hidden, args.finetunes)
    finetune_bytes = (finetunes[0] / "model.safetensors").stat().st_size
    work = Path(tempfile.mkdtemp(prefix="fanout-", dir=args.cache))
    targets = {"local": lambda name: work / name}
    s3_note, proc = None, None
    if args.s3:
        (work / "seaweedfs").mkdir()
        location_for, proc, s3_note = s3_locations(work / "seaweedfs")
        if location_for is not None:
            targets["s3"] = location_for
    rows = {}
    try:
        for target, location_for in targets.items():
            rows[target] = []
            for n in args.workers:
                row = run(location_for, reference, finetunes, n, args.method, 0 if args.cpu_only else None,
                          not args.no_base)
                rows[target].append(row)
                print(f"{target} {row['workers']} workers: {row['finetunes_per_minute']} finetunes/min, "
                      f"{row['source_gb_per_s']} GB/s", flush=True)
                # written after every row, so a run cut off by a time limit keeps what it measured
                write_results(args, finetune_bytes, s3_note, rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if proc is not None:
            from storage import s3_server

            s3_server.stop(proc)
    print((args.out / "fanout.md").read_text())


def write_results(args, finetune_bytes: int, s3_note: str | None, rows: dict[str, list[dict]]) -> None:
    """fanout.{json,md} in ``args.out`` for the rows measured so far."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    result = {
        "model": {"layers": args.layers, "hidden": args.hidden, "dtype": "float16", "finetune_bytes": finetune_bytes},
        "finetunes": args.finetunes, "method": args.method, "cpu_only": args.cpu_only, "cpus": os.cpu_count(), "gpu": gpu,
        "torch_threads_per_worker": THREADS_PER_WORKER, "python": sys.version.split()[0],
        "machine": platform.machine(), "s3": s3_note or ("measured" if "s3" in rows else "not asked (--s3)"),
        "runs": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fanout.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# commit-many throughput (benchmarks/fanout.py)", "",
        f"{args.finetunes} synthetic finetunes of {args.layers} float16 {args.hidden}x{args.hidden} matrices "
        f"({finetune_bytes / 1e6:.0f} MB each), `{args.method}`, committed by `Registry.commit_many` on a local "
        f"Dask cluster ({os.cpu_count()} CPUs, GPU: {gpu or 'none'}; {THREADS_PER_WORKER} torch threads a "
        "worker); clusters started and warm before timing. GB/s: finetune bytes read per second. Base build: "
        "a base vector of all the finetunes, on the cluster and in one process.", "",
        "| registry | workers | devices | seconds | finetunes/min | GB/s | speed-up | ratio vs fp16 | "
        "base build cluster / one process (s) | same bits |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for target, target_rows in rows.items():
        first = target_rows[0]["finetunes_per_minute"]
        for row in target_rows:
            base = row["base_build_seconds"]
            built = f"{base['cluster']} / {base['one_process']}" if base else "not run"
            same = "-" if base is None else "yes" if row["base_same_bits"] else "NO"
            lines.append(f"| {target} | {row['workers']} | {', '.join(row['devices'])} | {row['seconds']} | "
                         f"{row['finetunes_per_minute']} | {row['source_gb_per_s']} | "
                         f"{row['finetunes_per_minute'] / first:.2f}x | {row['ratio_fp16']} | {built} | {same} |")
    lines += ["", f"S3: {result['s3']}.", ""]
    (args.out / "fanout.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
