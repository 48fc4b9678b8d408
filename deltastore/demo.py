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
    # name: (number of labels, rule mapping a (batch, seq) token tensor to labels)
    "parity": (2, lambda x: (x.sum(dim=1) % 2)),
    "first_bucket": (3, lambda x: (x[:, 1] * 3 // SEEN_TOKENS).clamp(max=2)),
    "has_small": (2, lambda x: (x < 50).any(dim=1).long()),
}


@dataclass
class Example:
    reference: Path
    finetunes: dict[str, Path]
    inputs: torch.Tensor  # (batch, SEQ_LEN) int64 held-out inputs


def tiny_config(num_labels: int = 2):
    from transformers import BertConfig

    return BertConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=512, max_position_embeddings=64, num_labels=num_labels)


def _batch(gen: torch.Generator, n: int) -> torch.Tensor:
    x = torch.randint(5, SEEN_TOKENS, (n, SEQ_LEN), generator=gen)
    x[:, 0] = 2  # a fixed [CLS]-like first token
    return x


def make_example(workdir: Path, *, steps: int = 30, seed: int = 0) -> Example:
    """Write ``reference/`` and ``finetunes/<task>/`` (HF directories) under ``workdir``."""
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
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
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
    return Example(workdir / "reference", finetunes, _batch(gen, 64))


def run_demo(workdir: Path, *, progress: bool | None = None, echo: Callable[[str], Any] | None = print) -> dict:
    """Build the example, init a registry, build a base, commit every task with each method,
    materialize, compare outputs with the finetunes, verify. Returns the report."""
    from transformers import AutoModelForSequenceClassification

    from .registry import Registry

    say = echo or (lambda _msg: None)
    workdir = Path(workdir)
    if (workdir / "registry").exists():
        raise FileExistsError(f"{workdir}/registry exists: give the demo a new directory")
    start = time.perf_counter()
    say(f"building a tiny BERT and {len(TASKS)} finetunes in {workdir} ...")
    example = make_example(workdir)
    registry = Registry.init(workdir / "registry", example.reference, progress=progress)
    registry.build_base("demo", list(example.finetunes.values()), progress=progress)
    rows = []
    for method, config, base in [("bitdelta", {}, None), ("bitdelta", {}, "demo"),
                                 ("dare", {"drop_rate": 0.9}, "demo"), ("deltadq", {}, "demo")]:
        for task, path in example.finetunes.items():
            record = registry.commit(task, path, method=method, config=config, base=base,
                                     message=f"{method} base={base}", progress=progress)
            stats = registry.stats(task).to_dict()
            finetuned = AutoModelForSequenceClassification.from_pretrained(path).eval()
            model = registry.load_model(task)
            with torch.no_grad():
                want = finetuned(input_ids=example.inputs).logits
                got = model(input_ids=example.inputs).logits
            rows.append({
                "task": task, "version": record.version, "method": method, "base": base, "lam1": record.lam1,
                "own_bytes": stats["own_bytes"], "ratio_fp16": stats["ratio_fp16"],
                "logit_mse": float((got - want).pow(2).mean()),
                "agreement": float((got.argmax(-1) == want.argmax(-1)).float().mean()),
            })
    problems = registry.verify(progress=progress)
    report = {"registry": str(workdir / "registry"), "rows": rows, "verify_problems": problems,
              "seconds": round(time.perf_counter() - start, 1)}
    say(f"{'task':<13}{'v':>2}  {'method':<9}{'base':<6}{'lam1':>7}{'bytes':>9}{'x fp16':>8}{'logit MSE':>11}"
        f"{'agree':>7}")
    for r in rows:
        say(f"{r['task']:<13}{r['version']:>2}  {r['method']:<9}{str(r['base'] or '-'):<6}{r['lam1']:>7.3f}"
            f"{r['own_bytes']:>9}{r['ratio_fp16']:>8.1f}{r['logit_mse']:>11.2e}{r['agreement']:>7.0%}")
    say(f"verify: {'ok' if not problems else problems}; {report['seconds']} s; registry at {report['registry']}")
    return report
