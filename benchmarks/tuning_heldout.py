"""Does the dbms fit lower the output error on inputs it never saw? (issue 3, on MiniLM)

For a few zoo tasks (benchmarks/zoo.py must have run: it caches the finetunes and splits),
commits each finetune with DBMS closed-form lambdas (`l2`) and with fitted lambdas (`dbms`,
on the task's 64 unlabeled calibration texts), then compares the materialized model's logits
with the finetune's on held-out test texts that the fit never saw. Runs on the CPU.

    python benchmarks/tuning_heldout.py [--tasks sms_spam tweet_sentiment] [--test 200]

Writes benchmarks/results/tuning_heldout.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import zoo  # noqa: E402  (the zoo's splits, cache and base model)

RESULTS = Path(__file__).parent / "results"
SETTINGS = {"bitdelta": ("bitdelta", {}), "dare-p0.99": ("dare", {"drop_rate": 0.99})}


def logits(model, tokenizer, texts: list[str], batch: int = 50) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            out.append(model(**zoo.encode(tokenizer, texts[i:i + batch])).logits)
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from deltastore import Registry

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["sms_spam", "tweet_sentiment"])
    parser.add_argument("--test", type=int, default=200, help="held-out test texts per task")
    parser.add_argument("--steps", type=int, default=60, help="dbms fit: most Adam steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    all_tasks = sorted(zoo.LOADERS)
    missing = [t for t in all_tasks if not (zoo.model_dir(t) / "model.safetensors").is_file()]
    if missing:
        raise SystemExit(f"finetunes missing for {missing}: run benchmarks/zoo.py first")
    reg_dir = zoo.CACHE.parent / "tuning_heldout" / "registry"
    shutil.rmtree(reg_dir, ignore_errors=True)
    reg = Registry.init(reg_dir, zoo.base_model_path(), progress=False)
    reg.build_base("zoo", [zoo.model_dir(t) for t in all_tasks], progress=False)

    rows = []
    for task in args.tasks:
        split = zoo.load_split(task)
        path = zoo.model_dir(task)
        tokenizer = AutoTokenizer.from_pretrained(path)
        finetuned = AutoModelForSequenceClassification.from_pretrained(path).eval()
        texts, labels = split["test"]["text"][:args.test], torch.tensor(split["test"]["label"][:args.test])
        want = logits(finetuned, tokenizer, texts)
        calib_texts = split["calibration"]["text"]
        calibration = [dict(zoo.encode(tokenizer, calib_texts[i:i + 16])) for i in range(0, len(calib_texts), 16)]
        for setting, (method, config) in SETTINGS.items():
            for tune in ("l2", "dbms"):
                name = f"{task}-{setting}-{tune}"
                start = time.perf_counter()
                record = reg.commit(name, path, method=method, config=config, base="zoo", tune=tune,
                                    calibration=calibration if tune == "dbms" else None,
                                    tune_options={"max_steps": args.steps} if tune == "dbms" else None,
                                    progress=False)
                seconds = time.perf_counter() - start
                got = logits(reg.load_model(name).eval(), tokenizer, texts)
                fit = record.tuning or {}
                rows.append({
                    "task": task, "setting": setting, "tune": tune, "lam1": record.lam1, "lam2": record.lam2,
                    "heldout_logit_mse": float((got - want).pow(2).mean()),
                    "heldout_accuracy": float((got.argmax(-1) == labels).float().mean()),
                    "finetuned_accuracy": float((want.argmax(-1) == labels).float().mean()),
                    "calibration_loss_initial": fit.get("loss_initial"), "calibration_loss_final": fit.get("loss_final"),
                    "fit_steps": fit.get("steps"), "fell_back": fit.get("fell_back"),
                    "commit_seconds": round(seconds, 1),
                })
                print(json.dumps(rows[-1]), flush=True)

    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
              "test_texts": args.test, "fit_max_steps": args.steps,
              "finetunes": "the zoo's cached finetunes (benchmarks/zoo.py)", "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tuning_heldout.json").write_text(json.dumps(result, indent=2))
    lines = ["# dbms fit vs closed-form lambdas on held-out inputs (MiniLM zoo, CPU)", "",
             f"{result['machine']}. Output error = mean squared difference of the logits from the finetune's, "
             f"on the first {args.test} test texts of each task, which the fit never saw (it uses the 64 "
             f"calibration texts, at most {args.steps} Adam steps). DBMS base vector built from all six zoo "
             "finetunes.", "",
             "| task | setting | lambdas | lam1 | lam2 | held-out logit MSE | held-out acc | finetuned acc | "
             "calib. loss before -> after | commit s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        calib = "-" if r["calibration_loss_initial"] is None else (
            f"{r['calibration_loss_initial']:.3g} -> {r['calibration_loss_final']:.3g}"
            + (" (fell back)" if r["fell_back"] else ""))
        lines.append(f"| {r['task']} | {r['setting']} | {r['tune']} | {r['lam1']:.3f} | {r['lam2']:.3f} | "
                     f"{r['heldout_logit_mse']:.4g} | {r['heldout_accuracy']:.1%} | {r['finetuned_accuracy']:.1%} | "
                     f"{calib} | {r['commit_seconds']} |")
    (RESULTS / "tuning_heldout.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
