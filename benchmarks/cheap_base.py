"""Issue 16, a cheaper base where tasks are few: which base vector pays for its bytes?

A base vector costs 1 bit per element it covers, shared by the tasks that use it; with few tasks
its share can exceed a task's own bytes. This runs ``benchmarks/quality.py``'s cells (same
evaluation, same byte counting) on the MiniLM zoo for each base variant below, built from the
tasks run (``Registry.build_base`` options), with DBMS-fitted lambdas (``dbms`` tuner), beside
no base at all (plain, and with lam2 fitted alone: what a base must beat). "with base" divides
the base's bytes by the number of tasks run.

Writes ``benchmarks/results/cheap_base.{md,json}``. Cells are cached per base vector under
``~/.cache/deltastore-bench/quality/cheap_base/`` (``$DELTASTORE_BENCH_CACHE``): a rerun
resumes, ``--report-only`` rebuilds the page from them.

    nice -n 10 python benchmarks/zoo.py --tasks sms_spam rotten_tomatoes tweet_sentiment --epochs 1
    nice -n 10 python benchmarks/cheap_base.py --tasks sms_spam rotten_tomatoes tweet_sentiment
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import quality  # noqa: E402

# Registry.build_base keyword arguments per variant; None: no base vector.
VARIANTS: dict[str, dict | None] = {
    "none": None,
    "full": {},
    "no-emb": {"exclude": ["*embeddings*"]},
    "rows-0.25": {"row_fraction": 0.25},
    "rows-0.1": {"row_fraction": 0.1},
    "rows-0.03": {"row_fraction": 0.03},
    **{f"no-emb-rows-{f}": {"exclude": ["*embeddings*"], "row_fraction": f} for f in (0.25, 0.1, 0.03)},
    # The largest matrices only: MiniLM's feed-forward ones (589,824 elements; attention's have 147,456).
    "ffn-only": {"exclude": ["*embeddings*"], "min_params": 500_000},
}
# DARE beside quality.py's p=0.99 and p=0.998, without a base: the base's bytes spent on the
# task's own delta instead, at about the bytes of a task plus its share of a base.
quality.SETTINGS.update({f"dare-p{p}": ("dare", {"drop_rate": p, "value_bits": 16}) for p in (0.95, 0.98, 0.995, 0.997)})
# (variant, setting, row), in the order run: the most telling first, so a cut-short run has them.
CORE = (("none", "plain"), ("none", "dbms-fit-nobase"), ("full", "dbms-fit"), ("rows-0.1", "dbms-fit"),
        ("no-emb", "dbms-fit"))
DEFAULT_RUNS = [
    *[(v, "dare-p0.998", r) for v, r in CORE],
    ("none", "dare-p0.99", "plain"),  # the same bytes spent on the task's own delta instead of a base
    *[(v, "bitdelta", r) for v, r in CORE],
    *[(v, "dare-p0.998", "dbms-fit") for v in ("rows-0.25", "no-emb-rows-0.1", "rows-0.03")],
    *[("none", s, "plain") for s in ("dare-p0.997", "dare-p0.995", "deltadq-g64k1b2")],
    *[(v, "bitdelta", "dbms-fit") for v in ("rows-0.03", "rows-0.25")],
    *[(v, "dare-p0.998", "dbms-fit") for v in ("no-emb-rows-0.03", "no-emb-rows-0.25")],
    # The cheapest base that kept most, under the other compressors and a lower drop rate.
    *[("no-emb-rows-0.1", s, "dbms-fit") for s in ("dare-p0.997", "bitdelta", "deltadq-g64k1b2")],
    *[("ffn-only", s, "dbms-fit") for s in ("dare-p0.998", "bitdelta")],
    # DeltaDQ, whose sparse base paid above: against its own lam2 fit, and a sparser and a fuller base.
    ("none", "deltadq-g64k1b2", "dbms-fit-nobase"),
    *[(v, "deltadq-g64k1b2", "dbms-fit") for v in ("no-emb-rows-0.03", "no-emb")],
    # More versions without a base, at the sizes of the bases that paid (20-120x): their rivals.
    *[("none", s, "plain") for s in ("deltadq-g32k1b2", "deltadq-g16k1b2", "dare-p0.98", "dare-p0.95", "dare-p0.9")],
]
PAGE = quality.RESULTS / "cheap_base.md"
# How much lower a base's test logit MSE must be than a rival's to count as better, not a tie.
MARGIN = 0.1


def base_name(tasks: list[str], variant: str) -> str:
    return f"zoo-{hashlib.sha256(','.join(sorted(tasks)).encode()).hexdigest()[:8]}-{variant}"


def cells_dir(tasks: list[str], variant: str) -> Path:
    """Where a variant's cells are cached: a base vector's depend on the tasks it was built from."""
    return quality.CACHE / "cheap_base" / ("none" if VARIANTS[variant] is None else base_name(tasks, variant))


def open_bases(tasks: list[str], variants: list[str]):
    """The registry of quality.py's cache and one base vector per variant (built if missing):
    {variant: (name, bytes, elements covered)}."""
    from deltastore.registry import Registry

    zoo = quality._zoo()
    path = quality.CACHE / "cheap_base" / "registry"
    if (path / "registry.msgpack").exists():
        reg = Registry(path)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        reg = Registry.init(path, zoo.base_model_path())
    bases = {}
    for variant in variants:
        options = VARIANTS[variant]
        if options is None:
            bases[variant] = (None, 0, 0)
            continue
        name = base_name(tasks, variant)
        if name not in reg.bases():
            t0 = time.perf_counter()
            reg.build_base(name, [zoo.model_dir(t) for t in tasks], **options, progress=False)
            print(f"built base {variant} ({time.perf_counter() - t0:.0f} s)", flush=True)
        _, record = reg.base(name)
        elements = sum((e.shape[0] if e.changed_rows is None else e.changed_rows) * math.prod(e.shape[1:])
                       for e in record.tensors.values())
        bases[variant] = (name, quality.base_bytes(reg, name), elements)
    return reg, bases


def main(argv: list[str] | None = None) -> int:
    zoo = quality._zoo()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="*", default=[t for t in zoo.TASKS if (zoo.CACHE / t / "train.json").exists()])
    parser.add_argument("--runs", nargs="*", default=[":".join(r) for r in DEFAULT_RUNS],
                        help="VARIANT:SETTING:ROW triples (variants: %s; settings and rows: quality.py's)"
                             % ", ".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="where to evaluate (cpu or cuda); the dbms tuner uses cuda "
                        "whenever it is available")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--page", type=Path, default=PAGE, help="the page to write (and its .json beside it); "
                        "another name keeps a run on other finetunes apart (default: %(default)s)")
    args = parser.parse_args(argv)
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    runs = [tuple(r.split(":")) for r in args.runs]
    for variant, setting, row in runs:
        if variant not in VARIANTS or setting not in quality.SETTINGS or row not in quality.ROWS:
            parser.error(f"run {variant}:{setting}:{row}: expected VARIANT:SETTING:ROW with a variant among "
                         f"{', '.join(VARIANTS)} and quality.py's settings and rows")
        if (VARIANTS[variant] is None) == quality.ROWS[row]["base"]:
            parser.error(f"run {variant}:{setting}:{row}: row {row} {'needs' if quality.ROWS[row]['base'] else 'takes no'}"
                         " base vector; pair the variant 'none' with a row without one")
    started = time.perf_counter()
    variants = list(dict.fromkeys(v for v, _, _ in runs))
    reg, bases = open_bases(args.tasks, variants)
    if not args.report_only:
        evals = {task: quality.TaskEval(task, args.device) for task in args.tasks}
        for variant, setting, row in runs:  # a row at a time over every task
            name, size, _ = bases[variant]
            for task, ev in evals.items():
                t0 = time.perf_counter()
                cell = quality.run_cell(reg, name, ev, setting, row, len(args.tasks), size,
                                        cells=cells_dir(args.tasks, variant))
                print(f"{task:16} {variant:16} {setting:12} {row:15} acc {100 * cell['accuracy']:5.1f} "
                      f"(ft {100 * cell['finetuned_accuracy']:.1f}) x{cell['ratio_fp16_with_base_share']:.1f} with base "
                      f"lam1 {cell['lam1']:.3f} lam2 {cell['lam2']:.3f} [{time.perf_counter() - t0:.0f} s]", flush=True)
    finetuned = {t: json.loads((zoo.CACHE / t / "train.json").read_text())["finetuned_accuracy"] for t in args.tasks}
    summary = []
    for variant, setting, row in runs:
        cells = [cells_dir(args.tasks, variant) / f"{setting}__{row}__{t}.json" for t in args.tasks]
        if not all(c.exists() for c in cells):
            continue
        cells = [json.loads(c.read_text()) for c in cells]
        rows = quality.summarize(cells, args.tasks, finetuned)
        # The mean squared logit error on the test inputs: finer than accuracy on 500 examples.
        mse = sum(c["test_logit_mse"] for c in cells) / len(cells)
        summary += [{**r, "variant": variant, "base_bytes": bases[variant][1], "base_elements": bases[variant][2],
                     "test_logit_mse": mse} for r in rows if (r["setting"], r["row"]) == (setting, row)]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    meta = {"machine": f"{gpu} (evaluation on {args.device}, dbms fit on cuda) + {os.cpu_count()} CPU cores" if gpu else
                       f"{platform.machine()} CPU, {os.cpu_count()} cores shared with other jobs, torch threads "
                       f"{args.threads}", "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tasks": args.tasks,
            "variants": {v: VARIANTS[v] for v in variants},
            "bases": {v: {"name": n, "bytes": b, "elements": e} for v, (n, b, e) in bases.items()},
            "runs": [list(r) for r in runs],
            "zoo": [json.loads((zoo.CACHE / t / "train.json").read_text()) for t in args.tasks],
            "seconds": None if args.report_only else round(time.perf_counter() - started)}
    write(summary, finetuned, meta, args.page)
    return 0


def write(summary: list[dict], finetuned: dict[str, float], meta: dict, page: Path) -> None:
    tasks = meta["tasks"]
    n = len(tasks)
    ft_avg = sum(finetuned[t] for t in tasks) / n
    label = dict(quality.ROW_LABEL)
    lines = ["# A cheaper base where tasks are few (issue 16)", "",
             f"Generated by `benchmarks/cheap_base.py` on {meta['machine']}; torch {meta['torch']}, transformers "
             f"{meta['transformers']}; " + ("report rebuilt from the cached cells. " if meta["seconds"] is None else
                                            f"{meta['seconds']} s for the last run (cached cells are not re-run). ") +
             f"{n} tasks ({', '.join(tasks)}), finetunes trained for "
             f"{', '.join(sorted({str(z['epochs']) for z in meta['zoo']}))} epoch(s) on "
             f"{', '.join(sorted({z['device_name'] for z in meta['zoo']}))} (`benchmarks/zoo.py`). Every base vector is built from these tasks "
             f"(`Registry.build_base` options below) and its bytes are shared by the {n} of them. Evaluation and "
             "bytes are `benchmarks/quality.py`'s; lambdas fitted by the `dbms` tuner on each task's 64 unlabeled "
             "calibration texts.", "",
             "## Base vectors", "",
             "| variant | options | elements covered | bytes on disk | share per task |", "|---|---|---|---|---|"]
    for variant, b in meta["bases"].items():
        opts = meta["variants"][variant]
        lines.append(f"| {variant} | {'no base vector' if opts is None else (json.dumps(opts) if opts else 'all')} | "
                     f"{b['elements']:,} | {b['bytes']:,} | {b['bytes'] / n:,.0f} |")
    lines += ["", "## Retention and bytes", "",
              "| setting | base | row | " + " | ".join(quality._short(t) for t in tasks) +
              " | avg | retention | agreement | own bytes | x fp16 own | x fp16 with base share | test logit MSE "
              "| calib MSE | lam1 (per task) |",
              "|" + "---|" * (n + 12),
              "| finetuned | - | - | " + " | ".join(f"{100 * finetuned[t]:.1f}" for t in tasks) +
              f" | {100 * ft_avg:.2f} | 100.00% | 100.0% | - | 1 | 1 | 0 | 0 | - |"]
    family = {s: quality.SETTINGS[s][0] for s in quality.SETTINGS}
    for r in sorted(summary, key=lambda r: (family[r["setting"]], r["ratio_fp16_with_base_share"]), reverse=True):
        lines.append(f"| {r['setting']} | {r['variant']} | {label[r['row']]} | " +
                     " | ".join(f"{100 * r['accuracy'][t]:.1f}" for t in tasks) +
                     f" | {100 * r['average']:.2f} | {100 * r['retention']:.2f}% | {100 * r['agreement']:.1f}% | "
                     f"{r['own_bytes']:,.0f} | {r['ratio_fp16']:.1f} | {r['ratio_fp16_with_base_share']:.1f} | "
                     f"{r['test_logit_mse']:.3g} | {r['calib_logit_mse']:.3g} | "
                     + ", ".join(f"{r['lam1'][t]:.2f}" for t in tasks) + " |")
    lines += ["", "## Does a base pay?", "",
              "A base pays if every version without one, of any compressor run here, that is at least as small "
              "(its own bytes, against the task's own plus the base's share) has a test logit MSE at least "
              f"{MARGIN:.0%} higher and no higher agreement (the share of test inputs where the prediction is the "
              "finetune's); both are finer than accuracy on 500 examples a task. Each version with a base against "
              "(a) the same setting without a base, lam2 fitted by the same tuner, and (b) the version without a "
              "base at least as small with the lowest test logit MSE:", ""]
    by = {(r["setting"], r["variant"], r["row"]): r for r in summary}

    def show(r: dict) -> str:
        return (f"{r['setting']} {r['variant'] if r['variant'] != 'none' else 'no base'} {label[r['row']]}: "
                f"{100 * r['retention']:.2f}%, agreement {100 * r['agreement']:.1f}%, test MSE "
                f"{r['test_logit_mse']:.3g}, at {r['ratio_fp16_with_base_share']:.0f}x")

    for r in summary:
        if r["variant"] == "none":
            continue
        same = by.get((r["setting"], "none", "dbms-fit-nobase"))
        rivals = [o for o in summary if o["variant"] == "none"
                  and o["ratio_fp16_with_base_share"] >= r["ratio_fp16_with_base_share"]]
        best = min(rivals, key=lambda o: o["test_logit_mse"]) if rivals else None
        pays = best is None or (r["test_logit_mse"] <= (1 - MARGIN) * best["test_logit_mse"]
                                and r["agreement"] >= best["agreement"])
        lines.append(f"- **{'PAYS' if pays else 'does not pay'}**: {show(r)}; share {r['base_share_bytes']:,.0f} "
                     f"bytes a task ({r['base_share_bytes'] / r['own_bytes']:.2f}x its own). (a) "
                     + (show(same) if same else "not run") + ". (b) " + (show(best) if best else "none run"))
    lines.append("")
    page.write_text("\n".join(lines))
    page.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary}, indent=1, default=str))
    print(f"wrote {page} and {page.with_suffix('.json')}")


if __name__ == "__main__":
    sys.exit(main())
