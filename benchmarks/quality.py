"""Quality at real compression ratios on the offline MiniLM zoo (issue 4): the DBMS paper's
Tables 1-3, with bytes on disk instead of "sparsity".

For each compressor setting (BitDelta; DARE at p = 0.9, 0.99, 0.998; DeltaDQ at three
settings) and each row (plain compression; + DBMS closed-form lambdas; + DBMS fitted;
+ DBMS fitted per layer), every task of the zoo (``benchmarks/zoo.py``) is committed into
one registry, materialized, and scored on its held-out test split. The fitted rows use the
``dbms`` tuner on the task's unlabeled calibration inputs, never on the test set.

Byte columns come from ``Registry.stats``: ``own`` is every byte the task version owns on
disk; the ratios divide the finetune's bytes at fp16 and in its stored dtype (float32) by it.
"with base" adds the shared base vector's bytes spread over the zoo's tasks (the registry's
own ``ratio_fp16_with_base_share`` would spread it over every benchmark commit, so it is
recomputed here with the cohort size).

Also writes two plots: retention against real ratio (log x), one curve per method and row,
and a lam1 x lam2 sweep for one task (accuracy and calibration output MSE), like the paper's
Figure 2. Results are cached per (setting, row, task) under
``~/.cache/deltastore-bench/quality/``: a rerun resumes. Writes
``benchmarks/results/quality.{md,json}``, ``quality_retention.png``, ``quality_lambda_sweep.png``.

    nice -n 19 python benchmarks/zoo.py        # first: the zoo
    nice -n 19 python benchmarks/quality.py    # then: the table and plots
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"
CACHE = Path(os.environ.get("DELTASTORE_BENCH_CACHE", Path.home() / ".cache" / "deltastore-bench")) / "quality"

SETTINGS: dict[str, tuple[str, dict]] = {
    "bitdelta": ("bitdelta", {}),
    "dare-p0.9": ("dare", {"drop_rate": 0.9, "value_bits": 16}),
    "dare-p0.99": ("dare", {"drop_rate": 0.99, "value_bits": 16}),
    "dare-p0.998": ("dare", {"drop_rate": 0.998, "value_bits": 16}),
    "deltadq-g16k1b2": ("deltadq", {"group_size": 16, "keep": 1, "bits": 2, "stored_planes": None}),
    "deltadq-g32k1b2": ("deltadq", {"group_size": 32, "keep": 1, "bits": 2, "stored_planes": None}),
    "deltadq-g64k1b2": ("deltadq", {"group_size": 64, "keep": 1, "bits": 2, "stored_planes": None}),
    # Issue 16: commit to a byte budget (fp16 bytes / ratio, own bytes); each tensor's setting is chosen.
    **{f"budget-{r}x": ("budget", {"ratio": float(r)}) for r in (60, 75, 90, 100, 250, 500)},
    # ... with the lossy option for small tensors (10 mantissa bits kept), which the budget counts.
    **{f"budget-{r}x-st10": ("budget", {"ratio": float(r), "small_tensor_bits": 10}) for r in (250, 350, 500)},
    # ... 7 bits (fp32 tensors); 3 for the decoder's.
    "budget-500x-st7": ("budget", {"ratio": 500.0, "small_tensor_bits": 7}),
    "budget-500x-st3": ("budget", {"ratio": 500.0, "small_tensor_bits": 3}),
}
ROWS: dict[str, dict] = {
    "plain": {"base": False, "tune": "l2", "per_layer": False},
    "dbms-init": {"base": True, "tune": "l2", "per_layer": False},
    "dbms-fit": {"base": True, "tune": "dbms", "per_layer": False},
    "dbms-fit-layer": {"base": True, "tune": "dbms", "per_layer": True},
    # Issue 16: the lambdas and every stored code's continuous part fitted (deltastore.tuning.fit).
    "fit-all": {"base": True, "tune": "fit-all", "per_layer": False},
    "fit-all-nobase": {"base": False, "tune": "fit-all", "per_layer": False},
    # Issue 16, a cheaper base: the dbms fit without a base vector (lam2 alone), what a base must beat.
    "dbms-fit-nobase": {"base": False, "tune": "dbms", "per_layer": False},
    # Issue 16, the budget's error proxy (benchmarks/budget_proxy.py): plain codes, and
    # everything fitted, the budget weighing each linear layer's error by its inputs on the
    # calibration texts (the rows above use the default, data-free proxy).
    "plain-outputs": {"base": False, "tune": "l2", "per_layer": False, "budget_proxy": "outputs"},
    "fit-all-nobase-outputs": {"base": False, "tune": "fit-all", "per_layer": False, "budget_proxy": "outputs"},
}
ROW_LABEL = {"plain": "plain", "dbms-init": "+ DBMS closed-form", "dbms-fit": "+ DBMS fitted",
             "dbms-fit-layer": "+ DBMS fitted, per layer", "fit-all": "+ DBMS, everything fitted",
             "fit-all-nobase": "everything fitted, no base", "dbms-fit-nobase": "lam2 fitted, no base",
             "plain-outputs": "plain, budget weighs outputs",
             "fit-all-nobase-outputs": "everything fitted, no base, budget weighs outputs"}
SWEEP_DEFAULT = ("tweet_sentiment", "dare-p0.99")
LAM1_FACTORS = [-1.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0]
LAM2_GRID = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
CALIB_BATCH = 16


def _zoo():
    sys.path.insert(0, str(HERE))
    import zoo

    return zoo


# -- evaluation -----------------------------------------------------------------------------
class TaskEval:
    """A task's finetuned model, its tokenized test and calibration inputs, and its finetuned
    outputs; scores any state dict of the same architecture."""

    def __init__(self, task: str, device: str = "cpu"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        zoo = _zoo()
        self.task = task
        self.dir = zoo.model_dir(task)
        split = zoo.load_split(task)
        self.tokenizer = AutoTokenizer.from_pretrained(self.dir)
        self.device = torch.device(device)
        self.model = AutoModelForSequenceClassification.from_pretrained(self.dir).eval().to(self.device)
        self.finetuned_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        texts, labels = split["test"]["text"], split["test"]["label"]
        # Length-sorted batches: the least padding, the same answer.
        lengths = [len(self.tokenizer(t, truncation=True, max_length=zoo.MAX_LEN)["input_ids"]) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        self.test_batches = []
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            enc = zoo.encode(self.tokenizer, [texts[j] for j in idx])
            self.test_batches.append((dict(enc), torch.tensor([labels[j] for j in idx])))
        calib = split["calibration"]["text"]
        self.calibration = [dict(zoo.encode(self.tokenizer, calib[i:i + CALIB_BATCH]))
                            for i in range(0, len(calib), CALIB_BATCH)]
        self.ref_test = self._logits(self.test_batches)
        self.ref_calib = self._logits([(b, None) for b in self.calibration])
        self.finetuned_accuracy = self._accuracy(self.ref_test)

    def _logits(self, batches):
        import torch

        with torch.no_grad():
            return [self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits.float().cpu()
                    for enc, _ in batches]

    def _accuracy(self, logits) -> float:
        right = sum(int((lg.argmax(-1) == y).sum()) for lg, (_, y) in zip(logits, self.test_batches))
        return right / sum(len(y) for _, y in self.test_batches)

    def score(self, state: dict) -> dict:
        import torch

        missing, unexpected = self.model.load_state_dict(state, strict=False)
        weights_missing = [k for k in missing if k in self.finetuned_state and "position_ids" not in k]
        if weights_missing or unexpected:
            raise RuntimeError(f"{self.task}: state dict mismatch: missing {weights_missing[:3]}, "
                               f"unexpected {list(unexpected)[:3]}")
        try:
            test = self._logits(self.test_batches)
            calib = self._logits([(b, None) for b in self.calibration])
        finally:
            self.model.load_state_dict(self.finetuned_state)
        n = sum(len(y) for _, y in self.test_batches)
        agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(test, self.ref_test)) / n
        return {
            "accuracy": self._accuracy(test),
            "agreement": agree,
            "test_logit_mse": float(torch.cat([(a - b).pow(2).flatten() for a, b in zip(test, self.ref_test)]).mean()),
            "calib_logit_mse": float(torch.cat([(a - b).pow(2).flatten() for a, b in zip(calib, self.ref_calib)]).mean()),
        }


# -- registry -------------------------------------------------------------------------------
def open_registry(tasks: list[str]):
    import hashlib

    from deltastore.registry import Registry

    zoo = _zoo()
    path = CACHE / "registry"
    if (path / "registry.msgpack").exists():
        reg = Registry(path)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        reg = Registry.init(path, zoo.base_model_path())
    base = "zoo-" + hashlib.sha256(",".join(sorted(tasks)).encode()).hexdigest()[:8]
    if base not in reg.bases():
        reg.build_base(base, [zoo.model_dir(t) for t in tasks])
    return reg, base


def base_bytes(reg, base: str) -> int:
    _, record = reg.base(base)
    digest = reg._pointer(f"refs/bases/{base}", base)
    return reg.objects.size("records", digest) + sum(reg.objects.size("arrays", h) for h in record.array_hashes())


def tuner_available(name: str) -> bool:
    from deltastore.errors import UnknownMethodError
    from deltastore.tuning import get_tuner

    try:
        get_tuner(name)
        return True
    except UnknownMethodError:
        return False


def bytes_breakdown(reg, name: str) -> dict:
    """Where a task version's own bytes go (the parts of specs/format.md §10): delta codes,
    changed-row masks, small tensors (the pack of format 1.2, or one lossless array each before:
    biases, LayerNorms, small matrices, the new head), side files (each file's size), the record.
    Counted here from the record alone, so it runs on older deltastores too (`--parts` measures
    the format before a change that way); where ``Registry.stats`` reports parts (format 1.2 on),
    its figures are taken: they count a bundle's codes and masks (format 1.3), which this does not."""
    from deltastore.storage.records import ReferenceRecord

    digest, record = reg.version(name)
    ref = reg.objects.get_record(record.reference, ReferenceRecord)
    shared = ref.array_hashes() | set(ref.files.values())
    out = {"record": reg.objects.size("records", digest), "codes": 0, "masks": 0, "small_tensors": 0,
           "small_tensor_count": 0, "side_files": 0, "files": {}}
    pack = getattr(record, "pack", None)  # format 1.2
    if pack:
        out["small_tensors"] += reg.objects.size("arrays", pack)
    for entry in record.tensors.values():
        size = sum(reg.objects.size("arrays", h) for h in entry.arrays.values() if h not in shared)
        if entry.is_delta:
            out["codes"] += size
            if entry.rows and entry.rows not in shared:
                out["masks"] += reg.objects.size("arrays", entry.rows)
        elif size or entry.codec in ("packed", "xor"):
            out["small_tensors"] += size
            out["small_tensor_count"] += 1
    out["files"] = {rel: reg.objects.size("blobs", h) for rel, h in record.files.items() if h not in shared}
    out["side_files"] = sum(out["files"].values())
    out.update(reg.stats(name).to_dict().get("parts") or {})
    return out


def run_parts(tasks: list[str], settings: list[str], small_bits: list[int], device: str) -> list[dict]:
    """Commit each task with each setting (plain: no base vector, no fit) into a fresh registry,
    small tensors exact and with each of ``small_bits`` (the lossy option), count its own bytes
    by part and score it on the task's test split."""
    import tempfile

    from deltastore.registry import Registry
    from deltastore.storage.records import FORMAT_MAJOR, FORMAT_MINOR

    zoo = _zoo()
    out = []
    with tempfile.TemporaryDirectory(prefix="quality-parts-") as tmp:
        reg = Registry.init(Path(tmp) / "registry", zoo.base_model_path(), progress=False)
        for task in tasks:
            ev = TaskEval(task, device)
            for setting in settings:
                for bits in [None] + small_bits:
                    method, config = SETTINGS[setting]
                    name = f"{task}--{setting}--{bits}"
                    lossy = {} if bits is None else {"small_tensor_bits": bits}  # a keyword of format 1.2 only
                    reg.commit(name, zoo.model_dir(task), method=method, config=config, progress=False, **lossy)
                    stats = reg.stats(name).to_dict()
                    cell = {"format": f"{FORMAT_MAJOR}.{FORMAT_MINOR}", "task": task, "setting": setting,
                            "row": "plain", "small_tensor_bits": bits,
                            "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
                            "own_bytes": stats["own_bytes"], "ratio_fp16": stats["ratio_fp16"],
                            **bytes_breakdown(reg, name), **ev.score(reg.materialize(name, progress=False)),
                            "finetuned_accuracy": ev.finetuned_accuracy}
                    print(f"format {cell['format']} {task:16} {setting:16} small bits {bits!s:4} "
                          f"{cell['own_bytes']:>10,} bytes own (x{cell['ratio_fp16']:.1f} fp16), accuracy "
                          f"{100 * cell['accuracy']:.1f} (finetuned {100 * ev.finetuned_accuracy:.1f})", flush=True)
                    out.append(cell)
    return out


def run_rows(reg, base: str, base_size: int, tasks: list[str], runs: list[tuple[str, str]], detail) -> None:
    """:func:`run_cell` for each ``(setting, row)`` of ``runs`` over every task, a row at a time
    (whole rows come first), printing a line per cell that ends with ``detail(cell)``."""
    evals = {task: TaskEval(task) for task in tasks}
    for setting, row in runs:
        for task, ev in evals.items():
            t0 = time.perf_counter()
            cell = run_cell(reg, base, ev, setting, row, len(tasks), base_size)
            what = (f"infeasible: {cell['infeasible']}" if "infeasible" in cell else
                    f"acc {100 * cell['accuracy']:5.1f} (ft {100 * cell['finetuned_accuracy']:.1f}) "
                    f"x{cell['ratio_fp16']:.1f} {detail(cell)}")
            print(f"{task:16} {setting:16} {row:24} {what} [{time.perf_counter() - t0:.0f} s]", flush=True)


def cached_cells(runs: list[tuple[str, str]], tasks: list[str]) -> dict[tuple[str, str, str], dict]:
    """The cells of ``runs`` x ``tasks`` that :func:`run_cell` has cached, by (setting, row, task)."""
    return {(s, r, t): json.loads(p.read_text()) for s, r in runs for t in tasks
            if (p := CACHE / "cells" / f"{s}__{r}__{t}.json").exists()}


def run_cell(reg, base: str, ev: TaskEval, setting: str, row: str, n_tasks: int, base_size: int, *,
             cells: Path | None = None) -> dict:
    """Commit one task with one setting and row, materialize it, score it; cached as JSON in
    ``cells`` (default: ``CACHE / "cells"``, read when called, since decoder.py points CACHE
    elsewhere; another folder per base vector, when a benchmark compares several). A budget the
    finetune cannot meet gives a cell holding only why (``infeasible``)."""
    from deltastore.errors import InvalidInputError

    cells = cells or CACHE / "cells"
    out = cells / f"{setting}__{row}__{ev.task}.json"
    if out.exists():
        return json.loads(out.read_text())
    method, config = SETTINGS[setting]
    spec = ROWS[row]
    name = f"{ev.task}--{setting}--{row}" + ("" if cells == CACHE / "cells" else f"--{cells.name}")
    start = time.perf_counter()
    budget = ({"ratio": config["ratio"], "small_tensor_bits": config.get("small_tensor_bits"),
               "budget_proxy": spec.get("budget_proxy", "weights")} if method == "budget"
              else {"method": method, "config": config})
    calibrated = spec["tune"] != "l2" or spec.get("budget_proxy") == "outputs"
    try:
        record = reg.commit(name, ev.dir, base=base if spec["base"] else None,
                            tune=spec["tune"], calibration=ev.calibration if calibrated else None,
                            per_layer=spec["per_layer"], message=f"quality benchmark {setting} {row}", **budget)
    except InvalidInputError as exc:  # a budget below what the finetune needs at the cheapest settings
        cell = {"task": ev.task, "setting": setting, "row": row, "infeasible": str(exc)}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(cell, indent=1))
        return cell
    commit_s = time.perf_counter() - start
    start = time.perf_counter()
    state = reg.materialize(name, verify=False)
    materialize_s = time.perf_counter() - start
    start = time.perf_counter()
    scores = ev.score(state)
    eval_s = time.perf_counter() - start
    stats = reg.stats(name).to_dict()
    share = base_size / n_tasks if spec["base"] else 0.0
    per_tensor = None
    if spec["per_layer"] and record.tensors:
        pairs = [(e.lam1, e.lam2) for e in record.tensors.values() if e.lam1 is not None]
        if pairs:
            l1 = [p[0] for p in pairs]
            l2 = [p[1] for p in pairs]
            per_tensor = {"n": len(pairs), "lam1_min": min(l1), "lam1_max": max(l1), "lam2_min": min(l2),
                          "lam2_max": max(l2)}
    cell = {
        "budget": record.source.get("budget"),
        "bytes_breakdown": bytes_breakdown(reg, name),
        "task": ev.task, "setting": setting, "row": row, "method": method, "config": config,
        "lam1": record.lam1, "lam2": record.lam2, "per_tensor_lambdas": per_tensor, "tuning": record.tuning,
        **scores, "finetuned_accuracy": ev.finetuned_accuracy,
        "own_bytes": stats["own_bytes"], "source_bytes": stats["source_bytes"],
        "source_fp16_bytes": stats["source_fp16_bytes"], "ratio_fp16": stats["ratio_fp16"],
        "ratio_source_dtype": stats["ratio_source_dtype"], "base_bytes": base_size if spec["base"] else 0,
        "base_share_bytes": share, "ratio_fp16_with_base_share": stats["source_fp16_bytes"] / (stats["own_bytes"] + share),
        "commit_s": round(commit_s, 2), "materialize_s": round(materialize_s, 2), "eval_s": round(eval_s, 2),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(cell, indent=1, default=str))
    return cell


# -- lambda sweep ---------------------------------------------------------------------------
def _state_at(reg, name: str, lam1: float, lam2_values: list[float]):
    """Yield (lam2, state dict) of a committed task with its stored residual code, rebuilt
    at the committed lam1 and each lam2 (the residual was compressed at that lam1)."""
    from deltastore.engine.decode import decode_code, decode_stored, lossless, unpack
    from deltastore.storage.records import BaseRecord, ReferenceRecord
    from deltastore.tensor import dbms
    from deltastore.dtypes import torch_dtype

    def array(digest, what):
        return reg.objects.get_array(digest, verify=False, what=what)

    _, record = reg.version(name)
    reference = reg.objects.get_record(record.reference, ReferenceRecord)
    base = reg.objects.get_record(record.base, BaseRecord) if record.base else None
    packed = unpack(reg.objects, record, reference)  # the small tensors (format 1.2)
    pieces = {}
    for tname, entry in record.tensors.items():
        if entry.is_delta:
            w_pre = dbms.as_matrix(decode_stored(reference.tensors[entry.ref], array, "cpu"))
            rows, decoded = decode_code(entry, array, "cpu")
            tau_rows = None
            if base is not None and entry.ref in base.tensors:
                tau_rows = dbms.as_matrix(decode_stored(base.tensors[entry.ref], array, "cpu"))[rows]
            pieces[tname] = ("delta", w_pre, rows, decoded, tau_rows, entry)
        else:
            whole = lossless(entry, packed[tname], "cpu") if tname in packed else decode_stored(entry, array, "cpu")
            pieces[tname] = ("plain", whole)
    for lam2 in lam2_values:
        state = {}
        for tname, p in pieces.items():
            if p[0] == "plain":
                state[tname] = p[1]
            else:
                _, w_pre, rows, decoded, tau_rows, entry = p
                value = dbms.reconstruct(w_pre, rows, decoded, tau_rows, lam1, lam2)
                state[tname] = value.reshape(entry.shape).to(torch_dtype(entry.dtype))
        yield lam2, state


def run_sweep(reg, base: str, ev: TaskEval, setting: str) -> dict:
    from deltastore.tuning import Lambdas

    out = CACHE / "cells" / f"sweep__{setting}__{ev.task}.json"
    if out.exists():
        return json.loads(out.read_text())
    init = json.loads((CACHE / "cells" / f"{setting}__dbms-init__{ev.task}.json").read_text())
    lam1_l2 = init["lam1"]
    method, config = SETTINGS[setting]
    grid = []
    start = time.perf_counter()
    for i, factor in enumerate(LAM1_FACTORS):
        lam1 = factor * lam1_l2
        name = f"{ev.task}--{setting}--sweep{i}"
        reg.commit(name, ev.dir, method=method, config=config, base=base,
                   tune=lambda ctx, lam1=lam1: Lambdas(lam1, 1.0, None, {"tuner": "fixed", "lam1": lam1}),
                   message=f"issue 4 lambda sweep lam1={lam1}")
        for lam2, state in _state_at(reg, name, lam1, LAM2_GRID):
            grid.append({"lam1": lam1, "lam2": lam2, **ev.score(state)})
        print(f"  sweep lam1={lam1:.3f} done ({time.perf_counter() - start:.0f} s)", flush=True)
    result = {"task": ev.task, "setting": setting, "lam1_l2": lam1_l2, "lam1_factors": LAM1_FACTORS,
              "lam2": LAM2_GRID, "grid": grid, "finetuned_accuracy": ev.finetuned_accuracy,
              "seconds": round(time.perf_counter() - start, 1)}
    out.write_text(json.dumps(result, indent=1))
    return result


# -- report ---------------------------------------------------------------------------------
def summarize(cells: list[dict], tasks: list[str], finetuned: dict[str, float]) -> list[dict]:
    ft_avg = sum(finetuned[t] for t in tasks) / len(tasks)
    rows = []
    for setting in SETTINGS:
        for row in ROWS:
            got = {c["task"]: c for c in cells if c["setting"] == setting and c["row"] == row and "infeasible" not in c}
            if set(got) != set(tasks):
                continue
            avg = sum(got[t]["accuracy"] for t in tasks) / len(tasks)
            mean = lambda key: sum(got[t][key] for t in tasks) / len(tasks)  # noqa: E731
            own = mean("own_bytes")
            share = mean("base_share_bytes")
            fp16 = mean("source_fp16_bytes")
            src = mean("source_bytes")
            rows.append({
                "setting": setting, "row": row, "accuracy": {t: got[t]["accuracy"] for t in tasks}, "average": avg,
                "retention": avg / ft_avg, "own_bytes": own, "base_share_bytes": share,
                "ratio_fp16": fp16 / own, "ratio_source_dtype": src / own, "ratio_fp16_with_base_share": fp16 / (own + share),
                "ratio_source_dtype_with_base_share": src / (own + share),
                "lam1": {t: got[t]["lam1"] for t in tasks}, "lam2": {t: got[t]["lam2"] for t in tasks},
                "per_tensor_lambdas": {t: got[t].get("per_tensor_lambdas") for t in tasks},
                "agreement": mean("agreement"), "calib_logit_mse": mean("calib_logit_mse"),
                "seconds": sum(got[t]["commit_s"] + got[t]["materialize_s"] + got[t]["eval_s"] for t in tasks),
                "commit_s": mean("commit_s"),
                "fit_s": sum((got[t].get("tuning") or {}).get("seconds", 0.0) for t in tasks) / len(tasks),
            })
    return rows


def _short(task: str) -> str:
    return {"sms_spam": "sms", "rotten_tomatoes": "rt", "tweet_sentiment": "tweet", "wiki_topic": "wiki",
            "fortune_topic": "f-topic", "fortune_langid": "f-lang"}.get(task, task)


PART_COLUMNS = ("record", "codes", "masks", "small_tensors", "side_files")


def parts_markdown(parts: list[dict]) -> list[str]:
    """The "Bytes per part" section: every measured (setting, task), each format side by side."""
    if not parts:
        return []
    lines = ["## Bytes per part", "",
             "Own bytes of one version by part (specs/format.md §10), committed plain (no base vector) by "
             "`python benchmarks/quality.py --parts` on " + ", ".join(sorted({p["machine"] for p in parts})) +
             "; each format measured by the deltastore of that format (this script run on its checkout). Format 1.2 "
             "stores side files as patches against the reference's, packs the small tensors (XOR with the "
             "reference, byte-shuffled, one array) and leaves repeated fields out of the record; format 1.3 "
             "stores the record as a zstd frame and the small code arrays and row masks in one bundle per "
             "version (its bytes split between codes and masks). \"small bits\": "
             "`exact`, or the lossy option `small_tensor_bits=N` (`--small-tensor-bits N`: small tensors keep N "
             "mantissa bits of their own, the rest the reference's). Accuracy: on the task's test split, against "
             "the finetune's.", "",
             "| setting | task | format | small bits | own bytes | x fp16 | accuracy (finetuned) | record | codes | "
             "masks | small tensors | side files |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(parts, key=lambda p: (p["setting"], p["task"], p["format"], -(p.get("small_tensor_bits") or 99))):
        bits = p.get("small_tensor_bits")
        lines.append(f"| {p['setting']} | {p['task']} | {p['format']} | {'exact' if bits is None else bits} | "
                     f"{p['own_bytes']:,} | {p['ratio_fp16']:.0f} | {100 * p['accuracy']:.1f} "
                     f"({100 * p['finetuned_accuracy']:.1f}) | " + " | ".join(f"{p[k]:,}" for k in PART_COLUMNS) + " |")
    return lines + [""]


def write_markdown(summary, tasks, finetuned, zoo_records, sweep, meta, targets, path: Path,
                   parts: list[dict] | None = None) -> None:
    ft_avg = sum(finetuned[t] for t in tasks) / len(tasks)
    lines = ["# Quality at real compression ratios: the MiniLM zoo (issue 4)", "",
             f"Generated by `benchmarks/quality.py` on {meta['machine']}; torch {meta['torch']}, "
             f"transformers {meta['transformers']}; {meta['seconds']:.0f} s for this run (cells cached from earlier "
             "runs are not re-timed). Accuracy in %, on each task's held-out test split. Bytes are what the registry "
             "holds on disk for the task version (`Registry.stats`), averaged over the tasks; ratios are "
             "finetune bytes / own bytes: vs fp16 (2 bytes/param) and vs the stored dtype (float32). "
             f"\"with base\" adds the shared base vector ({meta['base_bytes']:,} bytes) spread over the "
             f"{len(tasks)} tasks of the zoo. Lambdas: mean over tasks (per-layer rows: min..max over all tensors "
             "and tasks). A row appears only when all six tasks have a result.", "",
             "## The zoo", "",
             "| task | classes | train | test | calib | steps | majority | finetuned | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in zoo_records:
        lines.append(f"| {r['task']} | {r['num_labels']} | {r['train']} | {r['test']} | {r['calibration']} | "
                     f"{r['steps']} | {100 * r['majority_accuracy']:.1f} | {100 * r['finetuned_accuracy']:.1f} | "
                     f"{r['train_seconds']:.0f} |")
    head = "| setting | row | " + " | ".join(_short(t) for t in tasks) + \
        " | avg | retention | own bytes | x fp16 | x fp32 | x fp16 with base | lam1 | lam2 |"
    lines += ["", "## Results", "", head, "|" + "---|" * (head.count("|") - 1)]
    lines.append("| finetuned | - | " + " | ".join(f"{100 * finetuned[t]:.1f}" for t in tasks) +
                 f" | {100 * ft_avg:.2f} | 100.00% | - | 1 | 1 | 1 | - | - |")
    for r in summary:
        l1 = f"{sum(r['lam1'].values()) / len(tasks):.3f}"
        l2 = f"{sum(r['lam2'].values()) / len(tasks):.3f}"
        pt = [v for v in (r.get("per_tensor_lambdas") or {}).values() if v]
        if pt:  # per-layer rows: the range over every tensor of every task
            l1 = f"{min(v['lam1_min'] for v in pt):.2f}..{max(v['lam1_max'] for v in pt):.2f}"
            l2 = f"{min(v['lam2_min'] for v in pt):.2f}..{max(v['lam2_max'] for v in pt):.2f}"
        lines.append(
            f"| {r['setting']} | {ROW_LABEL[r['row']]} | " + " | ".join(f"{100 * r['accuracy'][t]:.1f}" for t in tasks)
            + f" | {100 * r['average']:.2f} | {100 * r['retention']:.2f}% | {r['own_bytes']:,.0f} | "
            f"{r['ratio_fp16']:.1f} | {r['ratio_source_dtype']:.1f} | {r['ratio_fp16_with_base_share']:.1f} | "
            f"{l1} | {l2} |")
    lines += ["", "## Targets", ""]
    lines += [f"- {t}" for t in targets]
    if sweep:
        best = max(sweep["grid"], key=lambda g: (g["accuracy"], -g["calib_logit_mse"]))
        lines += ["", "## Lambda sweep", "",
                  f"`{sweep['setting']}` on `{sweep['task']}`: lam1 in {{{', '.join(f'{f:g}' for f in sweep['lam1_factors'])}}}"
                  f" x the closed-form lam1 ({sweep['lam1_l2']:.3f}), lam2 in {{{', '.join(f'{v:g}' for v in sweep['lam2'])}}};"
                  " the residual is re-compressed at each lam1 (one commit each). Best test accuracy "
                  f"{100 * best['accuracy']:.1f}% at lam1={best['lam1']:.3f}, lam2={best['lam2']:g} "
                  f"(finetuned {100 * sweep['finetuned_accuracy']:.1f}%). See `quality_lambda_sweep.png`."]
    lines += ["", "Plots: `quality_retention.png` (retention vs real ratio vs fp16, with base share), "
              "`quality_lambda_sweep.png`.", ""]
    if meta.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in meta["notes"]] + [""]
    lines += parts_markdown(parts or [])
    path.write_text("\n".join(lines))


def targets_report(summary) -> list[str]:
    out = []
    by = {(r["setting"], r["row"]): r for r in summary}
    fitted = "dbms-fit" if any(r["row"] == "dbms-fit" for r in summary) else None

    def fmt(r):
        return (f"{r['setting']} {ROW_LABEL[r['row']]}: {100 * r['retention']:.2f}% at "
                f"{r['ratio_fp16_with_base_share']:.0f}x fp16 with base ({r['ratio_fp16']:.0f}x own)")

    r = by.get(("bitdelta", "dbms-fit"))
    if r:
        ok = r["retention"] >= 0.995 and r["ratio_fp16_with_base_share"] >= 14
        out.append(f"DBMS fitted + bitdelta, retention >= 99.5% at >= 14x: {'MET' if ok else 'MISSED'} ({fmt(r)})")
    else:
        out.append("DBMS fitted + bitdelta, retention >= 99.5% at >= 14x: NOT RUN (no `dbms` tuner registered)")
    for need, ratio in ((0.99, 100), (0.975, 250), (0.95, 500)):
        cands = [r for r in summary if r["ratio_fp16_with_base_share"] >= ratio]
        if not cands:
            out.append(f"retention >= {100 * need:g}% at >= {ratio}x: MISSED (no setting reaches {ratio}x real bytes "
                       "vs fp16)")
            continue
        best = max(cands, key=lambda r: r["retention"])
        ok = best["retention"] >= need
        out.append(f"retention >= {100 * need:g}% at >= {ratio}x: {'MET' if ok else 'MISSED'} (best: {fmt(best)})")
    if fitted:
        lines = []
        for s in SETTINGS:
            p, f = by.get((s, "plain")), by.get((s, "dbms-fit"))
            if p and f:
                lines.append(f"{s} {100 * p['average']:.2f} -> {100 * f['average']:.2f}")
        high = [s for s in ("dare-p0.998",) if (s, "plain") in by and (s, "dbms-fit") in by]
        beats = all(by[(s, "dbms-fit")]["average"] > by[(s, "plain")]["average"] for s in high)
        out.append(f"DBMS fitted beats plain above 99% drop: {'MET' if high and beats else 'MISSED' if high else 'NOT RUN'}"
                   f" (plain -> fitted average accuracy: {'; '.join(lines)})")
    else:
        out.append("DBMS fitted beats plain above 99% drop: NOT RUN (no `dbms` tuner registered)")
    return out


def plot_retention(summary, path: Path, title: str = "MiniLM zoo, 6 tasks") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"bitdelta": "tab:blue", "dare": "tab:orange", "deltadq": "tab:green", "budget": "tab:purple"}
    lines = ["--", ":", "-", "-."]
    styles = {row: (lines[i % len(lines)], "os^DvP<>Xh"[i % 10]) for i, row in enumerate(ROWS)}  # one per row
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for family in colors:
        for row in ROWS:
            pts = sorted((r["ratio_fp16_with_base_share"], 100 * r["retention"]) for r in summary
                         if r["row"] == row and SETTINGS[r["setting"]][0] == family)
            if not pts:
                continue
            ls, mk = styles[row]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, marker=mk, color=colors[family],
                    label=f"{family} {ROW_LABEL[row]}")
    for y in (99, 97.5, 95):
        ax.axhline(y, color="grey", lw=0.5)
    for x in (100, 250, 500):
        ax.axvline(x, color="grey", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("real compression ratio (finetune at fp16 / bytes on disk, base share included)")
    ax.set_ylabel("retention: avg accuracy / finetuned avg (%)")
    ax.set_title(f"{title}: retention vs real ratio")
    lo = min([100 * r["retention"] for r in summary] + [90])
    hi = max([100 * r["retention"] for r in summary] + [100])  # a fitted delta can beat its finetune
    ax.set_ylim(max(lo - 2, 0), hi + 1)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(sweep, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import math

    import matplotlib.pyplot as plt

    lam1s = sorted({g["lam1"] for g in sweep["grid"]})
    lam2s = sweep["lam2"]
    acc = [[next(100 * g["accuracy"] for g in sweep["grid"] if g["lam1"] == a and g["lam2"] == b) for a in lam1s]
           for b in lam2s]
    mse = [[math.log10(max(next(g["calib_logit_mse"] for g in sweep["grid"] if g["lam1"] == a and g["lam2"] == b),
                           1e-12)) for a in lam1s] for b in lam2s]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, data, title, cmap in ((axes[0], acc, "test accuracy (%)", "viridis"),
                                  (axes[1], mse, "log10 calibration logit MSE vs finetuned", "magma_r")):
        im = ax.imshow(data, origin="lower", aspect="auto", cmap=cmap)
        ax.set_xticks(range(len(lam1s)), [f"{a:.2f}" for a in lam1s])
        ax.set_yticks(range(len(lam2s)), [f"{b:g}" for b in lam2s])
        ax.set_xlabel("lam1 (shift along the base vector)")
        ax.set_ylabel("lam2 (residual scale)")
        ax.set_title(title, fontsize=10)
        for i, rowv in enumerate(data):
            for j, v in enumerate(rowv):
                ax.text(j, i, f"{v:.1f}" if data is acc else f"{v:.1f}", ha="center", va="center", fontsize=7,
                        color="white")
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"{sweep['setting']} on {sweep['task']} (finetuned {100 * sweep['finetuned_accuracy']:.1f}%, "
                 f"closed-form lam1 {sweep['lam1_l2']:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def update_parts(cells: list[dict]) -> int:
    """Put ``cells`` into quality.json's ``parts`` (replacing the same format, task and setting)
    and rewrite the "Bytes per part" section of quality.md, leaving the rest of the page as it is."""
    data_path, page_path = RESULTS / "quality.json", RESULTS / "quality.md"
    data = json.loads(data_path.read_text()) if data_path.exists() else {}
    key = lambda c: (c["format"], c["task"], c["setting"], c.get("small_tensor_bits"))  # noqa: E731
    new = {key(c) for c in cells}
    data["parts"] = [p for p in data.get("parts", []) if key(p) not in new] + cells
    data_path.write_text(json.dumps(data, indent=1, default=str))
    page = page_path.read_text() if page_path.exists() else ""
    section = "\n".join(parts_markdown(data["parts"]))
    start = page.find("## Bytes per part")
    if start < 0:
        page = page.rstrip("\n") + "\n\n" + section
    else:
        # The section ends at the next heading or marker (quality_fit.py's section follows it).
        ends = [i for i in (page.find("\n## ", start + 1), page.find("\n<!-- ", start + 1)) if i >= 0]
        end = min(ends) if ends else -1
        page = page[:start] + section + (page[end + 1:] if end >= 0 else "")
    page_path.write_text(page)
    print(f"wrote the bytes per part of {len(cells)} commit(s) into {page_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Quality vs real compression ratio on the offline MiniLM zoo (issue 4). Needs the zoo "
                    "(`python benchmarks/zoo.py`) first; resumes from ~/.cache/deltastore-bench/quality.")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--tasks", nargs="*", default=None, help="default: the six zoo tasks")
    parser.add_argument("--sweep", nargs=2, metavar=("TASK", "SETTING"), default=list(SWEEP_DEFAULT),
                        help="task and setting of the lambda sweep heatmap (default: %(default)s)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the lambda sweep")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--device", default="cpu", help="where to evaluate (cpu or cuda); the dbms tuner uses "
                        "cuda whenever it is available")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report from cached cells")
    parser.add_argument("--machine", default=None, help="with --report-only: where the cached cells were computed")
    parser.add_argument("--small-tensor-bits", type=int, nargs="*", default=[],
                        help="with --parts: also commit with the lossy option keeping this many mantissa bits")
    parser.add_argument("--parts", action="store_true",
                        help="only count own bytes by part for --tasks x --settings (plain, no evaluation) and update "
                             "the 'Bytes per part' section of quality.md/json, keeping the rest of the page")
    args = parser.parse_args(argv)
    if args.parts:
        return update_parts(run_parts(args.tasks or _zoo().TASKS, args.settings, args.small_tensor_bits, args.device))

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    zoo = _zoo()
    all_tasks = zoo.TASKS
    tasks = args.tasks or all_tasks
    missing = [t for t in all_tasks if not (zoo.CACHE / t / "train.json").exists()]
    if missing:
        print(f"the zoo is incomplete (missing {', '.join(missing)}): run `python benchmarks/zoo.py` first",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    if args.report_only:
        reg = None
        base_size = max([json.loads(p.read_text()).get("base_bytes", 0) for p in (CACHE / "cells").glob("*__*__*.json")
                         if not p.name.startswith("sweep__")] or [0])
        base = "(from cached cells)"
    else:
        reg, base = open_registry(all_tasks)  # the base vector is always the whole zoo's
        base_size = base_bytes(reg, base)
    notes = []
    fitted_ok = tuner_available("dbms")
    if not fitted_ok:
        notes.append("the `dbms` tuner is not registered in this checkout: the fitted rows were not run")
    evals: dict[str, TaskEval] = {}
    if not args.report_only:
        for task in tasks:
            for setting in args.settings:
                for row in args.rows:
                    if ROWS[row]["tune"] == "dbms" and not fitted_ok:
                        continue
                    if task not in evals:
                        evals.clear()
                        evals[task] = TaskEval(task, args.device)
                    t0 = time.perf_counter()
                    cell = run_cell(reg, base, evals[task], setting, row, len(all_tasks), base_size)
                    if "infeasible" in cell:
                        print(f"{task:16} {setting:16} {row:15} infeasible: {cell['infeasible']}", flush=True)
                        continue
                    print(f"{task:16} {setting:16} {row:15} acc {100 * cell['accuracy']:5.1f} "
                          f"(ft {100 * cell['finetuned_accuracy']:.1f}) x{cell['ratio_fp16']:.1f} "
                          f"lam1 {cell['lam1']:.3f} lam2 {cell['lam2']:.3f} [{time.perf_counter() - t0:.1f} s]",
                          flush=True)
    cells = [json.loads(p.read_text()) for p in sorted((CACHE / "cells").glob("*__*__*.json"))
             if not p.name.startswith("sweep__")]
    finetuned = {t: json.loads((zoo.CACHE / t / "train.json").read_text())["finetuned_accuracy"] for t in all_tasks}
    sweep = None
    sweep_task, sweep_setting = args.sweep
    sweep_file = CACHE / "cells" / f"sweep__{sweep_setting}__{sweep_task}.json"
    if not args.no_sweep and not args.report_only and \
            (CACHE / "cells" / f"{sweep_setting}__dbms-init__{sweep_task}.json").exists():
        print(f"lambda sweep: {sweep_setting} on {sweep_task} ...", flush=True)
        sweep = run_sweep(reg, base, TaskEval(sweep_task, args.device), sweep_setting)
    elif sweep_file.exists():
        sweep = json.loads(sweep_file.read_text())
    summary = summarize(cells, all_tasks, finetuned)
    RESULTS.mkdir(parents=True, exist_ok=True)
    zoo_records = [json.loads((zoo.CACHE / t / "train.json").read_text()) for t in all_tasks]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    meta = {"machine": args.machine if args.report_only and args.machine else (f"{gpu} (evaluation on {args.device}, dbms fit on cuda) + {os.cpu_count()} CPU cores "
                        f"(compression), torch threads {args.threads}") if gpu else
                       f"{platform.machine()} CPU, {os.cpu_count()} cores, torch threads {args.threads}",
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "base_vector": base, "base_bytes": base_size, "seconds": time.perf_counter() - started, "notes": notes}
    previous = RESULTS / "quality.json"
    if args.report_only and previous.exists():  # keep where and with what the cells were computed
        old = json.loads(previous.read_text()).get("meta", {})
        meta.update({k: old[k] for k in ("machine", "python", "torch", "transformers", "seconds") if k in old})
        meta["base_vector"] = old.get("base_vector", meta["base_vector"])
    targets = targets_report(summary)
    parts = json.loads(previous.read_text()).get("parts") if previous.exists() else None  # --parts' section
    (RESULTS / "quality.json").write_text(json.dumps(
        {"meta": meta, "zoo": zoo_records, "summary": summary, "targets": targets, "cells": cells, "sweep": sweep,
         "parts": parts}, indent=1, default=str))
    if summary:
        plot_retention(summary, RESULTS / "quality_retention.png")
    if sweep:
        plot_sweep(sweep, RESULTS / "quality_lambda_sweep.png")
    write_markdown(summary, all_tasks, finetuned, zoo_records, sweep, meta, targets, RESULTS / "quality.md", parts)
    print(f"wrote {RESULTS / 'quality.md'} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
