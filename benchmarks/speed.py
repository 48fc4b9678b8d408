"""Speed of materialize, resident task switching and commit on Llama-2-7B shapes (issue 5).

Builds everything on the machine it runs on: a random bf16 reference of Llama-2-7B shapes
(hidden 4096, MLP 11008, vocab 32000; ``--layers`` of the 32 decoder layers), two finetunes
(reference + small perturbations, some rows left exactly unchanged, as real finetunes leave
the embedding rows of unseen tokens), the first written as sharded safetensors; a registry
with a base vector of both; commits of the first with bitdelta+base, dare p=0.99+base (layout
gaps, what deltastore writes) and the same dare in the format 1.0 layout hash, so the two dare
layouts are side by side in one run.
Then measures, each the median of ``--repeats`` runs:

  (a) ``Registry.materialize(task, device="cuda")`` from a warm registry, per method;
  (b) ``safetensors.torch.load_file(shard, device="cuda")`` over the finetune's shards;
  (c) the bound: task bytes / pinned H2D bandwidth + model bytes read+written / device copy bandwidth;
  (d) ``ResidentModel.switch`` (pinned-host cache, and GPU cache);
  (e) commit throughput, GB of finetune per second;
  (f) peak host RSS of commit and of materialize (child processes, ru_maxrss);
  (g) ``Registry.load_model(task, device=...)`` against ``from_pretrained`` of the finetune directory.

Writes speed.md and speed.json to ``--out`` (default benchmarks/results).

    python benchmarks/speed.py --small           # 2 layers, hidden 256: CPU smoke run, < 60 s
    python benchmarks/speed.py --out $OUT         # the real run, on the GPU machine
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FULL = dict(hidden=4096, mlp=11008, vocab=32000, layers=32)
SMALL = dict(hidden=256, mlp=688, vocab=2000, layers=2)
SWITCH_REPEATS = 7
SHARD_BYTES = 4 << 30
WEIGHT_STD = 0.02
DELTA_STD = 0.001          # 5% of the weights' spread: above bf16 resolution, well below 50%
UNCHANGED_ROWS = 0.05      # rows of a matrix a finetune leaves exactly as they were
UNCHANGED_VOCAB_ROWS = 0.9  # embedding / lm_head rows of tokens the task never sees


def shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, m, v = cfg["hidden"], cfg["mlp"], cfg["vocab"]
    out = {"model.embed_tokens.weight": (v, h)}
    for i in range(cfg["layers"]):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            out[p + f"self_attn.{proj}_proj.weight"] = (h, h)
        out[p + "mlp.gate_proj.weight"] = (m, h)
        out[p + "mlp.up_proj.weight"] = (m, h)
        out[p + "mlp.down_proj.weight"] = (h, m)
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (v, h)
    return out


def _seed(name: str, k: int) -> int:
    import zlib

    return (zlib.crc32(name.encode()) * 1000003 + k) % (2**62)


def make_tensor(name: str, shape, finetune: int, device: str) -> torch.Tensor:
    """Reference (finetune=0) or finetune k's tensor, the same bits on every call."""
    gen = torch.Generator(device=device).manual_seed(_seed(name, 0))
    if len(shape) == 1:
        ref = 1.0 + 0.05 * torch.randn(shape, generator=gen, device=device)
    else:
        ref = WEIGHT_STD * torch.randn(shape, generator=gen, device=device)
    ref = ref.to(torch.bfloat16)
    if finetune == 0:
        return ref.cpu()
    gen = torch.Generator(device=device).manual_seed(_seed(name, finetune))
    delta = DELTA_STD * torch.randn(shape, generator=gen, device=device)
    if len(shape) > 1:
        frac = UNCHANGED_VOCAB_ROWS if shape[0] >= 32000 or "embed" in name or "lm_head" in name else UNCHANGED_ROWS
        delta[torch.rand(shape[0], generator=gen, device=device) < frac] = 0
    return (ref.float() + delta).to(torch.bfloat16).cpu()


class Synthetic:
    """A lazily generated model (deltastore TensorSource): one tensor in memory at a time."""

    def __new__(cls, cfg, finetune, device):
        from deltastore.sources import TensorSource

        class _Source(TensorSource):
            def __init__(self):
                super().__init__(f"synthetic-{finetune}")
                self._shapes = shapes(cfg)

            def names(self):
                return list(self._shapes)

            def shape(self, name):
                return self._shapes[name]

            def dtype(self, name):
                return torch.bfloat16

            def get(self, name):
                return make_tensor(name, self._shapes[name], finetune, device)

        return _Source()


def write_safetensors(cfg: dict, finetune: int, out: Path, device: str) -> int:
    """The finetune as an HF directory of shards (config.json + index); returns bytes written."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    shard, size, index, n, total = {}, 0, {}, 0, 0
    items = list(shapes(cfg).items())

    def flush():
        nonlocal shard, size, n
        if shard:
            fname = f"model-{n:05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            index.update({k: fname for k in shard})
            shard, size, n = {}, 0, n + 1

    for name, shape in items:
        t = make_tensor(name, shape, finetune, device)
        shard[name] = t
        size += t.numel() * 2
        total += t.numel() * 2
        if size >= SHARD_BYTES:
            flush()
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    LlamaConfig(hidden_size=cfg["hidden"], intermediate_size=cfg["mlp"], vocab_size=cfg["vocab"],
                num_hidden_layers=cfg["layers"], num_attention_heads=cfg["hidden"] // 128,
                num_key_value_heads=cfg["hidden"] // 128, architectures=["LlamaForCausalLM"],
                torch_dtype="bfloat16", tie_word_embeddings=False).save_pretrained(out)
    return total


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int, device: str, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
        sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def bandwidths(device: str) -> dict:
    """Pinned host-to-device and device-to-device (read+write) bandwidth, GB/s."""
    if device != "cuda":
        return {}
    n = 1 << 30
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    h2d, _ = timed(lambda: dev.copy_(host, non_blocking=True), 10, device)
    a = torch.empty(4 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    d2d, _ = timed(lambda: b.copy_(a), 10, device)
    out = {"h2d_pinned_GBps": n / h2d / 1e9, "d2d_rw_GBps": 2 * a.numel() / d2d / 1e9}
    del host, dev, a, b
    torch.cuda.empty_cache()
    return out


def child(args) -> None:
    """Run one operation in this fresh process and print its time and peak RSS as JSON."""
    from deltastore import Registry

    reg = Registry(args.registry)
    t0 = time.perf_counter()
    if args.child == "commit":
        config = json.loads(args.config)
        reg.commit(args.task, args.finetune, method=args.method, config=config, base="all", progress=False,
                   device=args.device)
    elif args.child == "materialize":
        state = reg.materialize(args.task, device=args.device)
        sync(args.device)
        del state
    elif args.child == "idle":
        if args.device == "cuda":
            torch.zeros(1, device="cuda")
    seconds = time.perf_counter() - t0
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec from the (large) parent.
    rss = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print("CHILD " + json.dumps({"seconds": seconds, "peak_rss_bytes": rss}))


def run_child(*argv) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"child {argv} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    line = [x for x in out.stdout.splitlines() if x.startswith("CHILD ")][-1]
    return json.loads(line[6:])


def kernel_compare(device: str, cfg: dict) -> dict:
    """One MLP matrix, bitdelta + base: the fused Triton kernel vs the reference torch decode."""
    from deltastore.engine.decode import Parts, TensorPlan, prepare_fused, reference_decode
    from deltastore.storage.records import TensorEntry
    from deltastore.tensor.fused import triton_enabled

    if device != "cuda":
        return {}
    rows, cols = cfg["mlp"], cfg["hidden"]
    g = torch.Generator(device="cuda").manual_seed(1)
    w = (WEIGHT_STD * torch.randn(rows, cols, generator=g, device="cuda")).to(torch.bfloat16)
    signs = torch.randint(0, 256, ((rows * cols + 7) // 8,), dtype=torch.uint8, device="cuda", generator=g)
    trow = torch.arange(rows, dtype=torch.int32, device="cuda")
    entry = TensorEntry(shape=(rows, cols), dtype="bfloat16", codec="bitdelta", config={}, arrays={},
                        attrs={"scale": 1e-3}, ref="x")
    bentry = TensorEntry(shape=(rows, cols), dtype="float32", codec="bitdelta", config={}, arrays={},
                         attrs={"scale": 5e-4}, ref="x")
    item = TensorPlan("x", entry, None, bentry, 0.7, 1.1)
    parts = Parts(w_pre=w, trow=trow, arrays={"signs": signs}, brow=trow, barrays={"signs": signs.flip(0)})
    out = torch.empty_like(w)
    res = {"shape": [rows, cols]}
    cuda = torch.device("cuda")
    if triton_enabled(cuda):
        job = prepare_fused(item, parts)
        t, _ = timed(lambda: item.fused.run(job, out), 20, device, warmup=3)
        res["triton_ms"] = t * 1e3
        res["triton_GBps"] = (2 * w.numel() * 2 + 2 * signs.numel()) / t / 1e9
        ref = reference_decode(item, parts, cuda)
        res["triton_equals_torch"] = bool(torch.equal(ref.view(torch.int16), out.view(torch.int16)))
    t, _ = timed(lambda: reference_decode(item, parts, cuda), 10, device, warmup=2)
    res["torch_ms"] = t * 1e3
    if triton_enabled(cuda):
        res.update(dare_kernel_profile(item, parts, out, device))
    return res


def reference_codec_ab(reg, device: str, work: Path, repeats: int, max_bytes: float = 4e9) -> dict:
    """Reading reference arrays onto the device, stored raw (init's default) vs with zstd
    (``init --compress-reference``), side by side: the largest arrays up to ``max_bytes``,
    copied once into a zstd object store, then read by the streaming reader in threads."""
    from concurrent.futures import ThreadPoolExecutor

    from deltastore.engine.reader import READ_AHEAD_GPU_BYTES, DeviceReader
    from deltastore.engine.readahead import default_workers
    from deltastore.storage.backend import LocalBackend
    from deltastore.storage.objects import ObjectStore

    entries = sorted(reg.reference().tensors.values(), key=lambda e: -math.prod(e.shape))
    digests, total = [], 0
    for e in entries:
        n = reg.objects.open_array(e.arrays["data"]).nbytes
        if total + n > max_bytes:
            break
        digests.append(e.arrays["data"])
        total += n
    zstd_store = ObjectStore(LocalBackend(work / "zstd-reference"))
    with ThreadPoolExecutor(default_workers()) as pool:
        list(pool.map(lambda d: zstd_store.put_array(reg.objects.get_array(d), zstd_store.new_txn(), compress=True),
                      digests))
    out = {"bytes": total, "raw_disk_bytes": sum(reg.objects.size("arrays", d) for d in digests),
           "zstd_disk_bytes": sum(zstd_store.size("arrays", d) for d in digests)}
    for label, store in (("raw", reg.objects), ("zstd", zstd_store)):
        reader = DeviceReader(store, torch.device(device), True)

        def read_all():
            for _ in reader.read_ahead(lambda d: reader.array(d, "reference"), digests,
                                       nbytes=lambda d: store.open_array(d).nbytes, budget=READ_AHEAD_GPU_BYTES):
                pass

        t, _ = timed(read_all, repeats, device)
        out[f"{label}_s"] = t
        out[f"{label}_GBps"] = total / t / 1e9
    return out


def dare_kernel_profile(item, parts, out, device: str) -> dict:
    """Where a DARE p=0.99 (+ base) decode of the same matrix spends its time, per layout: a
    plain copy (memory only); layout hash: the decoder's prepare step (the keep-mask hash of
    every element to count each block's kept values, their prefix sum, one small sync) and the
    fused kernel (hash, in-block scan, value gather, base, store); layout gaps: its prepare (the
    gaps drawn once to count each block's kept values), its dense kernel (reference + lam1*tau,
    what every dropped element is) and its kept kernel (the gaps drawn again, the kept values
    written), and the two together (what a resident switch runs)."""
    from dataclasses import replace as dc_replace

    from deltastore.engine.decode import Parts, TensorPlan, fused_job, prepare_fused
    from deltastore.tensor.compressors.dare import gaps, keep_mask

    rows, cols = parts.w_pre.shape
    threshold = round(0.01 * 2 ** 32)
    res = {}
    t_copy, _ = timed(lambda: out.copy_(parts.w_pre), 20, device, warmup=3)
    res["copy_ms"] = t_copy * 1e3
    for layout in ("hash", "gaps"):
        entry = dc_replace(item.entry, codec="dare", config={"drop_rate": 0.99, "value_bits": 16, "layout": layout},
                           attrs={"seed": 12345, "keep_threshold": threshold})
        dare_item = TensorPlan("x", entry, None, item.base_entry, item.lam1, item.lam2)
        if layout == "hash":
            kept = int(keep_mask(12345, threshold, 0, rows, cols, "cuda").sum())
        else:
            kept = gaps.kept_positions(12345, threshold, rows * cols, 0, rows * cols, "cuda").numel()
        dare_parts = Parts(w_pre=parts.w_pre, trow=parts.trow, brow=parts.brow, barrays=parts.barrays,
                           arrays={"values": torch.randn(kept, device="cuda").to(torch.float16)})
        job = prepare_fused(dare_item, dare_parts)
        fused = dare_item.fused
        t_prepare, _ = timed(lambda: fused.prepare(fused_job(dare_item, dare_parts)), 20, device, warmup=3)
        t_run, _ = timed(lambda: fused.run(job, out), 20, device, warmup=3)
        res[layout] = {"kept": kept, "prepare_ms": t_prepare * 1e3, "run_ms": t_run * 1e3}
        if layout == "gaps":
            t_dense, _ = timed(lambda: fused.run_dense(job, out), 20, device, warmup=3)
            t_kept, _ = timed(lambda: fused.run_kept(job, out), 20, device, warmup=3)
            res[layout].update(dense_ms=t_dense * 1e3, kept_ms=t_kept * 1e3)
    return {"dare": res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="2 layers, hidden 256: a CPU smoke run")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; --small: 2)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--workdir", default=None, help="where models and the registry go (default: a temp dir)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--device", default=None, help="cuda when there is one, else cpu")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--no-extra", action="store_true", help="skip the verify=False materialize timings")
    # child mode (internal)
    ap.add_argument("--child", default=None)
    ap.add_argument("--registry")
    ap.add_argument("--task")
    ap.add_argument("--finetune")
    ap.add_argument("--method")
    ap.add_argument("--config", default="{}")
    args = ap.parse_args()
    if args.child:
        return child(args)

    from deltastore import Registry
    from deltastore.engine.resident import ResidentModel

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = dict(SMALL if args.small else FULL)
    if args.layers is not None:
        cfg["layers"] = args.layers
    repeats = args.repeats or (2 if args.small else 3)
    gen_device = device
    work = Path(args.workdir or (Path("/tmp") / f"deltastore-speed-{os.getpid()}"))
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    phases: dict[str, float] = {}
    res: dict = {"config": cfg, "device": device, "repeats": repeats}

    partial = out_dir / ("speed_small.partial.json" if args.small else "speed.partial.json")

    def phase(name, t0):
        phases[name] = time.perf_counter() - t0
        res["phases_s"] = phases
        partial.write_text(json.dumps(res, indent=2, default=str))
        print(f"[{name}] {phases[name]:.2f} s", flush=True)

    n_params = sum(int(torch.tensor(s).prod()) for s in shapes(cfg).values())
    model_bytes = 2 * n_params
    res["params"] = n_params
    res["model_bf16_bytes"] = model_bytes

    t0 = time.perf_counter()
    ft_dir = work / "finetune1"
    write_safetensors(cfg, 1, ft_dir, gen_device)
    phase("write_finetune_safetensors", t0)

    t0 = time.perf_counter()
    reg = Registry.init(work / "registry", Synthetic(cfg, 0, gen_device), progress=False)
    phase("init", t0)
    t0 = time.perf_counter()
    reg.build_base("all", [str(ft_dir), Synthetic(cfg, 2, gen_device)], progress=False)
    phase("build_base", t0)

    methods = {"bitdelta_base": ("bitdelta", {}), "dare99_base": ("dare", {"drop_rate": 0.99}),
               "dare99_hash_base": ("dare", {"drop_rate": 0.99, "layout": "hash"})}
    commits = {}
    for task, (method, config) in methods.items():
        r = run_child("--child", "commit", "--registry", str(reg.path), "--task", task, "--finetune", str(ft_dir),
                      "--method", method, "--config", json.dumps(config), "--device", device)
        phases[f"commit_{task}"] = r["seconds"]
        commits[task] = {"seconds": r["seconds"], "GBps": model_bytes / r["seconds"] / 1e9,
                         "peak_rss_bytes": r["peak_rss_bytes"]}
        print(f"[commit {task}] {r['seconds']:.1f} s, {commits[task]['GBps']:.3f} GB/s, "
              f"RSS {r['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
    res["commit"] = commits
    reg = Registry(reg.path)
    res["task_bytes"] = {t: reg.stats(t).own_bytes for t in methods}
    res["base_bytes"] = reg.stats("bitdelta_base").base_bytes
    res["bandwidth"] = bandwidths(device)

    # (b) safetensors straight to the device
    shards = sorted(ft_dir.glob("*.safetensors"))
    from safetensors.torch import load_file

    def load_st():
        for s in shards:
            state = load_file(str(s), device=device)
            del state

    t_b, times_b = timed(load_st, repeats, device)
    res["safetensors_load_s"] = t_b
    res["safetensors_load_runs"] = times_b
    print(f"[b safetensors] {t_b:.3f} s", flush=True)

    # (a) materialize per method, warm registry
    res["materialize"] = {}
    for task in methods:
        def mat():
            state = reg.materialize(task, device=device)
            del state

        t_a, runs = timed(mat, repeats, device)
        res["materialize"][task] = {"seconds": t_a, "runs": runs}
        if device == "cuda" and not args.no_extra:
            def mat_nv():
                state = reg.materialize(task, device=device, verify=False)
                del state
            t_nv, _ = timed(mat_nv, repeats, device, warmup=0)
            res["materialize"][task]["seconds_verify_false"] = t_nv
        print(f"[a materialize {task}] {t_a:.3f} s", flush=True)
        partial.write_text(json.dumps(res, indent=2, default=str))

    # (g) a ready transformers model on the device: what a service calls, against loading the
    # finetune directory with transformers itself
    from transformers import AutoModelForCausalLM

    res["load_model"] = {}
    for task in methods:
        def load():
            model = reg.load_model(task, device=device, dtype=torch.bfloat16)
            del model

        res["load_model"][task] = timed(load, repeats, device)[0]
        print(f"[g load_model {task}] {res['load_model'][task]:.3f} s", flush=True)
        if device == "cuda" and not args.no_extra:
            def load_nv():
                model = reg.load_model(task, device=device, dtype=torch.bfloat16, verify=False)
                del model
            res.setdefault("load_model_verify_false", {})[task] = t_lnv = timed(load_nv, repeats, device, warmup=0)[0]
            print(f"[g load_model {task} verify=False] {t_lnv:.3f} s", flush=True)

    def from_pretrained():
        model = AutoModelForCausalLM.from_pretrained(ft_dir, device_map=device, dtype=torch.bfloat16)
        del model

    res["from_pretrained_s"] = timed(from_pretrained, repeats, device)[0]
    print(f"[g from_pretrained] {res['from_pretrained_s']:.3f} s", flush=True)

    # (f) peak RSS of materialize and of an idle CUDA process, in children
    res["rss"] = {"idle_process": run_child("--child", "idle", "--registry", str(reg.path), "--device", device)
                  ["peak_rss_bytes"]}
    for task in methods:
        r = run_child("--child", "materialize", "--registry", str(reg.path), "--task", task, "--device", device)
        res["rss"][f"materialize_{task}"] = r["peak_rss_bytes"]

    # (d) resident switch
    target = None
    if device == "cuda":
        try:
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.from_pretrained(ft_dir)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
            model.to_empty(device="cuda")
            target = model
            res["resident_target"] = type(model).__name__
        except Exception as exc:  # a plain state dict of GPU tensors does as well
            res["resident_target"] = f"state dict ({type(exc).__name__}: {exc})"
    else:
        res["resident_target"] = "state dict"
    res["switch"] = {}
    if device == "cuda":
        res["gpu_state_before_switch"] = gpu_state()
    t0 = time.perf_counter()
    resident = ResidentModel(reg, target, device=device)
    for cache in (["pinned", "gpu"] if device == "cuda" else ["none"]):
        resident.set_cache(cache)  # one resident reference for both cache modes
        t0 = time.perf_counter()
        for task in methods:
            resident.load(task)
        sync(device)
        res["switch"][f"{cache}_load_s"] = time.perf_counter() - t0
        res["switch"][f"{cache}_cached_bytes"] = {t: resident.load(t).nbytes for t in methods}
        for task in methods:
            other = [t for t in methods if t != task][0]

            def sw():
                resident.switch(task)

            def prep():
                resident.switch(other)
                sync(device)

            times = []
            for _ in range(SWITCH_REPEATS + 1):  # switches are cheap: more of them than of the rest
                prep()
                t0 = time.perf_counter()
                sw()
                sync(device)
                times.append(time.perf_counter() - t0)
            res["switch"][f"{cache}_{task}_s"] = statistics.median(times[1:])
            print(f"[d switch {cache} {task}] {res['switch'][f'{cache}_{task}_s'] * 1e3:.2f} ms", flush=True)
        if cache in ("pinned", "none"):  # exactness at full size, once
            ok = True
            for task in methods:
                resident.switch(task)
                want = reg.materialize(task, device=device)
                have = resident.tensors
                ok &= all(torch.equal(have[n].view(torch.int16) if have[n].dtype == torch.bfloat16 else have[n],
                                      want[n].view(torch.int16) if want[n].dtype == torch.bfloat16 else want[n])
                          for n in want)
                del want
            res["switch"]["bit_exact_vs_materialize"] = bool(ok)
        resident.set_cache("none")
        if device == "cuda":
            torch.cuda.empty_cache()
    del resident, target
    res["kernel"] = kernel_compare(device, cfg)
    res["reference_codec"] = reference_codec_ab(reg, device, work, repeats)
    print(f"[reference codec] {res['reference_codec']}", flush=True)
    res["phases_s"] = phases

    # bound and ratios
    bw = res["bandwidth"]
    if bw:
        res["bound_s"] = {t: res["task_bytes"][t] / (bw["h2d_pinned_GBps"] * 1e9) +
                          2 * model_bytes / (bw["d2d_rw_GBps"] * 1e9) for t in methods}
    res["ratios"] = {}
    for t in methods:
        r = {"cold_vs_safetensors": res["materialize"][t]["seconds"] / t_b,
             "load_model_vs_materialize": res["load_model"][t] / res["materialize"][t]["seconds"],
             "load_model_vs_from_pretrained": res["load_model"][t] / res["from_pretrained_s"]}
        if t in res.get("load_model_verify_false", {}):
            r["load_model_verify_false_vs_from_pretrained"] = res["load_model_verify_false"][t] / res["from_pretrained_s"]
        key = f"pinned_{t}_s" if device == "cuda" else f"none_{t}_s"
        r["switch_speedup"] = t_b / res["switch"][key]
        if "bound_s" in res:
            r["switch_vs_bound"] = res["switch"][key] / res["bound_s"][t]
        res["ratios"][t] = r
    first = list(methods)[0]
    res["switch_speedup"] = res["ratios"][first]["switch_speedup"]
    res["cold_vs_safetensors"] = res["ratios"][first]["cold_vs_safetensors"]
    if "switch_vs_bound" in res["ratios"][first]:
        res["switch_vs_bound"] = res["ratios"][first]["switch_vs_bound"]
    res["machine"] = machine(device)
    name = "speed_small" if args.small else "speed"
    (out_dir / f"{name}.json").write_text(json.dumps(res, indent=2))
    (out_dir / f"{name}.md").write_text(report(res))
    print(report(res))
    partial.unlink(missing_ok=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def gpu_state() -> str:
    """SM clock, its maximum, temperature, utilization and power draw now (nvidia-smi), so a
    throttled or shared GPU shows in the results; run-to-run spread between machines was 2x."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu,"
                              "power.draw", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        return out.stdout.strip()
    except Exception as exc:  # no nvidia-smi: say so instead of failing the run
        return f"unknown ({type(exc).__name__})"


def machine(device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        import zarr
        info["zarr"] = zarr.__version__
    except Exception:
        pass
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:
        pass
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except Exception:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["gpu_state"] = gpu_state()
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except Exception:
        pass
    return info


def report(res: dict) -> str:
    gb = 1e9
    cfg = res["config"]
    lines = [
        f"# Speed: materialize, resident switch, commit ({'GPU' if res['device'] == 'cuda' else 'CPU'})",
        "",
        f"Machine: {res['machine'].get('gpu', res['machine'].get('cpu', '?'))}, {res['machine']['cpus']} CPUs; "
        f"torch {res['machine']['torch']}, triton {res['machine'].get('triton', '-')}, zarr "
        f"{res['machine'].get('zarr', '-')}, Python {res['machine']['python']}.",
        f"Model: Llama-2-7B shapes, {cfg['layers']} layers, hidden {cfg['hidden']}, MLP {cfg['mlp']}, vocab "
        f"{cfg['vocab']}: {res['params'] / 1e9:.3f} B parameters, {res['model_bf16_bytes'] / gb:.2f} GB bf16. "
        f"Medians of {res['repeats']} runs ({SWITCH_REPEATS} for switches, 20 for kernels); every figure below is "
        f"measured by benchmarks/speed.py in one run. GPU state (SM clock, max, temperature, utilization, power) "
        f"before the switches: {res.get('gpu_state_before_switch', '-')}; at the end: "
        f"{res['machine'].get('gpu_state', '-')}.",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| (b) safetensors load_file to {res['device']} | {res['safetensors_load_s']:.3f} s |",
    ]
    for t, m in res["materialize"].items():
        extra = f" (verify=False: {m['seconds_verify_false']:.3f} s)" if "seconds_verify_false" in m else ""
        lines.append(f"| (a) materialize {t} | {m['seconds']:.3f} s{extra} |")
    for t, v in res["load_model"].items():
        nv = res.get("load_model_verify_false", {}).get(t)
        extra = f" (verify=False: {nv:.3f} s)" if nv is not None else ""
        lines.append(f"| (g) load_model {t} to {res['device']} | {v:.3f} s{extra} |")
    lines.append(f"| (g) from_pretrained of the finetune directory to {res['device']} | {res['from_pretrained_s']:.3f} s |")
    if "bound_s" in res:
        bw = res["bandwidth"]
        lines.append(f"| pinned H2D / device copy (r+w) bandwidth | {bw['h2d_pinned_GBps']:.1f} GB/s / "
                     f"{bw['d2d_rw_GBps']:.0f} GB/s |")
        for t, b in res["bound_s"].items():
            lines.append(f"| (c) bound {t} ({res['task_bytes'][t] / 1e6:.0f} MB task bytes) | {b * 1e3:.1f} ms |")
    for k, v in res["switch"].items():
        if k.endswith("_s") and not k.endswith("load_s"):
            lines.append(f"| (d) switch, {k[:-2].replace('_', ' ', 1)} cache | {v * 1e3:.2f} ms |")
    lines.append(f"| (d) switch bit-exact vs materialize | {res['switch'].get('bit_exact_vs_materialize')} |")
    for t, c in res["commit"].items():
        lines.append(f"| (e) commit {t} | {c['seconds']:.1f} s = {c['GBps']:.3f} GB/s |")
        lines.append(f"| (f) peak RSS commit {t} | {c['peak_rss_bytes'] / gb:.2f} GB |")
    for k, v in res["rss"].items():
        lines.append(f"| (f) peak RSS {k.replace('_', ' ')} | {v / gb:.2f} GB |")
    if res.get("kernel"):
        k = res["kernel"]
        lines.append(f"| decode kernel {k['shape']}: Triton / plain torch | {k.get('triton_ms', float('nan')):.3f} ms "
                     f"/ {k['torch_ms']:.3f} ms (Triton equals torch: {k.get('triton_equals_torch')}) |")
        if "dare" in k:
            d = k["dare"]
            lines.append(f"| same matrix, plain copy | {d['copy_ms']:.3f} ms |")
            lines.append(f"| same matrix, DARE p=0.99 + base, layout hash: decoder prepare (keep-mask count, prefix "
                         f"sum) / fused decode | {d['hash']['prepare_ms']:.3f} ms / {d['hash']['run_ms']:.3f} ms |")
            lines.append(f"| same matrix, DARE p=0.99 + base, layout gaps: decoder prepare (gap count, prefix sum) / "
                         f"dense kernel / kept kernel / both (the switch's decode) | {d['gaps']['prepare_ms']:.3f} ms "
                         f"/ {d['gaps']['dense_ms']:.3f} ms / {d['gaps']['kept_ms']:.3f} ms / "
                         f"{d['gaps']['run_ms']:.3f} ms |")
    if res.get("reference_codec"):
        r = res["reference_codec"]
        lines.append(f"| reference arrays to {res['device']} ({r['bytes'] / gb:.2f} GB), raw vs zstd | "
                     f"{r['raw_s']:.3f} s ({r['raw_GBps']:.2f} GB/s, {r['raw_disk_bytes'] / gb:.2f} GB on disk) vs "
                     f"{r['zstd_s']:.3f} s ({r['zstd_GBps']:.2f} GB/s, {r['zstd_disk_bytes'] / gb:.2f} GB on disk) |")
    lines += ["", "Ratios (first method, bitdelta+base; per method in speed.json):", ""]
    for t, r in res["ratios"].items():
        lines.append(f"- {t}: " + ", ".join(f"{k} = {v:.3g}" for k, v in r.items()))
    lines += ["", "Build phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in res["phases_s"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
