"""The built-in example: a tiny BERT, three real finetunes of it, and the whole pipeline.

``deltastore demo DIR`` runs it; the tests reuse :func:`make_example`. The finetunes are
made by real training steps (Adam, cross-entropy) on three synthetic token-classification
tasks that only use the first part of the vocabulary, so, as in real finetunes, embedding
rows of unseen tokens stay exactly unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

VOCAB = 2000
SEEN_TOKENS = 400       # tasks draw tokens from [5, SEEN_TOKENS): the other rows never train
SEQ_LEN = 16
TASKS = {
    # name: (number of labels, rule mapping a (batch, seq) token tensor to labels). Presence and
    # counting rules: learnable by a tiny BERT in a few dozen steps at a finetuning-like lr.
    "has_top": (2, lambda x: (x >= SEEN_TOKENS - 20).any(dim=1).long()),
    "small_count": (3, lambda x: (x < 50).sum(dim=1).clamp(max=2)),
    "has_small": (2, lambda x: (x < 50).any(dim=1).long()),
}


# (method, config, base, tuner) of each commit, in order: each compressor alone, then with DBMS.
SETTINGS = [("bitdelta", {}, None, None), ("bitdelta", {}, "demo", "l2"), ("bitdelta", {}, "demo", "dbms"),
            ("dare", {"drop_rate": 0.99}, None, None), ("dare", {"drop_rate": 0.99}, "demo", "dbms")]

EXPLANATION = """
How to read the table: each row is one committed version of a finetune; 'bytes' is what the
registry stores for it, 'x fp16' the finetune's fp16 size over that; 'logit MSE' and the
accuracy (finetune -> rebuilt model, on 256 held-out inputs) say what the compression cost.
- bitdelta keeps one sign bit per changed weight; 'DBMS l2' first subtracts the shared base
  vector scaled by the closed-form lam1; 'DBMS dbms' fits lam1/lam2 on 32 unlabeled inputs
  (a second or two here) and lowers the logit error, on some tasks by orders of magnitude.
- has_top is the fragile task: its finetune is right on the held-out inputs but by thin
  margins (its final training loss above is not far below chance's 0.69), so errors that
  leave the other tasks' answers alone flip many of its answers. Plain bitdelta drops it to
  about 60%; fitted lambdas bring it back.
- dare p=0.99 keeps 1 weight change in 100 (rescaled x100): the smallest versions, and the
  roughest. On finetunes this small that is too little for has_top even with fitted lambdas.
  On real finetunes of a 22M-parameter model (benchmarks/results/quality.md) p=0.99 keeps
  98.7% of their accuracy; check accuracy per task before choosing an extreme setting.
"""


@dataclass
class Example:
    reference: Path
    finetunes: dict[str, Path]
    inputs: torch.Tensor       # (256, SEQ_LEN) int64 held-out test inputs
    calibration: torch.Tensor  # (32, SEQ_LEN) int64 unlabeled inputs for fitting lambdas


def tiny_config(num_labels: int = 2):
    from transformers import BertConfig

    return BertConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=512, max_position_embeddings=64, num_labels=num_labels)


def _batch(gen: torch.Generator, n: int) -> torch.Tensor:
    x = torch.randint(5, SEEN_TOKENS, (n, SEQ_LEN), generator=gen)
    x[:, 0] = 2  # a fixed [CLS]-like first token
    return x


def make_example(workdir: Path, *, steps: int = 80, seed: int = 0,
                 log: Callable[[str], Any] | None = None) -> Example:
    """Write ``reference/`` and ``finetunes/<task>/`` (HF directories) under ``workdir``;
    ``log`` is told as each finetune is done."""
    from transformers import BertForSequenceClassification, BertModel

    workdir = Path(workdir)
    torch.manual_seed(seed)
    reference = BertModel(tiny_config(), add_pooling_layer=True)
    reference.save_pretrained(workdir / "reference")
    finetunes = {}
    gen = torch.Generator().manual_seed(seed)
    for i, (task, (labels, rule)) in enumerate(TASKS.items()):
        torch.manual_seed(seed + 1 + i)
        model = BertForSequenceClassification(tiny_config(labels))
        model.bert.load_state_dict(reference.state_dict())
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)  # a finetuning-sized step: weights move ~20%
        model.train()
        for _ in range(steps):
            x = _batch(gen, 32)
            loss = model(input_ids=x, labels=rule(x)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        model.save_pretrained(workdir / "finetunes" / task)
        finetunes[task] = workdir / "finetunes" / task
        if log is not None:
            log(f"  finetuned {task} ({steps} Adam steps, final loss {loss.item():.3f})")
    return Example(workdir / "reference", finetunes, _batch(gen, 256), _batch(gen, 32))


def run_demo(workdir: Path, *, progress: bool | None = None, echo: Callable[[str], Any] | None = print) -> dict:
    """Build the example, init a registry, build a base, commit every task with each compressor,
    materialize, compare outputs with the finetunes, verify. Returns the report."""
    say = echo or (lambda _msg: None)
    workdir = Path(workdir)
    if (workdir / "registry").exists():
        raise FileExistsError(f"{workdir}/registry exists: give the demo a new directory")
    # One thread: this model's matmuls are too small to gain from more, and on a busy 2-core
    # machine two threads made building the example 1.8x slower (89 s against 48 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(workdir, progress, say)
    finally:
        torch.set_num_threads(threads)


def _run(workdir: Path, progress: bool | None, say: Callable[[str], Any]) -> dict:
    from transformers import AutoModelForSequenceClassification

    from .registry import Registry

    start = time.perf_counter()
    say(f"building a tiny BERT and {len(TASKS)} finetunes in {workdir} ...")
    example = make_example(workdir, log=say)
    registry = Registry.init(workdir / "registry", example.reference, progress=progress)
    registry.build_base("demo", list(example.finetunes.values()), progress=progress)
    calibration = [{"input_ids": example.calibration[i:i + 16]} for i in range(0, len(example.calibration), 16)]
    say(f"built in {time.perf_counter() - start:.0f} s; committing each finetune {len(SETTINGS)} ways:")
    rows = []
    for method, config, base, tune in SETTINGS:
        for task, path in example.finetunes.items():
            began = time.perf_counter()
            record = registry.commit(task, path, method=method, config=config, base=base, tune=tune,
                                     calibration=calibration if tune == "dbms" else None,
                                     message=f"{method} base={base} tune={tune}", progress=progress)
            seconds = time.perf_counter() - began
            stats = registry.stats(task).to_dict()
            finetuned = AutoModelForSequenceClassification.from_pretrained(path).eval()
            model = registry.load_model(task)
            labels = TASKS[task][1](example.inputs)
            with torch.no_grad():
                want = finetuned(input_ids=example.inputs).logits
                got = model(input_ids=example.inputs).logits
            rows.append({
                "task": task, "version": record.version, "method": method, "base": base, "tune": tune,
                "lam1": record.lam1, "lam2": record.lam2, "own_bytes": stats["own_bytes"],
                "ratio_fp16": stats["ratio_fp16"], "logit_mse": float((got - want).pow(2).mean()),
                "accuracy_finetuned": float((want.argmax(-1) == labels).float().mean()),
                "accuracy": float((got.argmax(-1) == labels).float().mean()), "commit_seconds": round(seconds, 2),
            })
            say(f"  {task} v{record.version}: {method}{'' if base is None else ' + DBMS ' + tune} "
                f"in {seconds:.1f} s")
    problems = registry.verify(progress=progress)
    report = {"registry": str(workdir / "registry"), "rows": rows, "verify_problems": problems,
              "seconds": round(time.perf_counter() - start, 1)}
    say(f"{'task':<12}{'v':>2}  {'compressor':<11}{'DBMS':<6}{'lam1':>6}{'lam2':>6}{'bytes':>8}{'x fp16':>7}"
        f"{'logit MSE':>10}{'accuracy':>16}")
    for r in rows:
        dbms_label = "-" if r["base"] is None else r["tune"]
        say(f"{r['task']:<12}{r['version']:>2}  {r['method']:<11}{dbms_label:<6}{r['lam1']:>6.2f}{r['lam2']:>6.2f}"
            f"{r['own_bytes']:>8}{r['ratio_fp16']:>7.1f}{r['logit_mse']:>10.1e}"
            f"{r['accuracy_finetuned']:>8.0%} ->{r['accuracy']:>4.0%}")
    say(f"verify: {'ok' if not problems else problems}; {report['seconds']} s; registry at {report['registry']}")
    say(EXPLANATION)
    return report
