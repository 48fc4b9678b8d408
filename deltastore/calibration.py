"""Calibration inputs: the few unlabeled examples a data-driven tuner fits the lambdas on.

From the API a tuner takes any iterable of model input dicts (``{"input_ids": LongTensor
(batch, seq), "attention_mask": ...}``, ``{"pixel_values": FloatTensor (batch, 3, H, W)}``)
as is. From the CLI, :func:`load_calibration` reads a file:

- ``*.jsonl`` / ``*.ndjson``: one JSON object per line, either ``{"text": "..."}`` (tokenized
  with the finetune's own tokenizer) or pre-tokenized ``{"input_ids": [...], ...}``; other
  numeric fields (``pixel_values``, ``decoder_input_ids``...) are passed to the model as they are.
- anything else: plain text, one example per line (blank lines skipped).

Anything that is not one example per line is refused: a ``.json`` file, or a text file that
holds one JSON document (an array of examples read as text would become one example per line
of its layout, or a single example).

Examples are grouped in batches of ``batch_size`` consecutive lines, padded to the longest
example of their batch and truncated to ``max_length`` tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .errors import InvalidInputError, NotFoundError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
DEFAULT_MAX_LENGTH = 128
# Fewer examples than this draw a warning: two lambdas fitted on a handful of inputs follow
# those inputs, not the task. 64 unlabeled texts are the fewest measured to generalise
# (benchmarks/results/tuning_heldout.md: held-out error 1.6-11x lower); 32 is half of that,
# the demo's count, and one batch of the default size.
MIN_EXAMPLES = 32
DEFAULT_BATCH_SIZE = 32  # a dbms fit's passes run 1.6x faster on 2 CPU cores than with batches of 8
INT64_END = 1 << 63  # token ids and masks are int64 tensors


def _is_sequence_key(key: str) -> bool:
    """Keys holding one value per token, padded per batch (``decoder_input_ids`` included)."""
    return key.endswith(("input_ids", "attention_mask", "token_type_ids"))


def as_batches(calibration: Iterable[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """Read an iterable of model input dicts once into a list (a tuner passes over it many
    times); lists and numpy arrays become tensors, anything else is kept as given."""
    if calibration is None:
        raise InvalidInputError("this tuner fits the lambdas on data: pass calibration inputs (API: "
                                "calibration=[{'input_ids': ...}, ...]; CLI: --calib FILE)")
    if isinstance(calibration, Mapping):
        calibration = [calibration]  # one batch given bare
    batches = []
    for i, item in enumerate(calibration):
        if not isinstance(item, Mapping):
            raise InvalidInputError(f"calibration item {i} is a {type(item).__name__}; expected a dict of model "
                                    "inputs such as {'input_ids': LongTensor (batch, seq)}")
        batch = {}
        for key, value in item.items():
            if not isinstance(value, torch.Tensor) and (isinstance(value, (list, tuple))
                                                        or type(value).__module__ == "numpy"):
                value = torch.as_tensor(value)
            batch[str(key)] = value
        batches.append(batch)
    if not batches:
        raise InvalidInputError("the calibration inputs are empty: give at least one batch")
    return batches


def example_count(batch: Mapping[str, Any]) -> int:
    """Examples in one batch of model inputs: the first dimension of its first tensor."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    return 1


def calibration_sha256(batches: Iterable[Mapping[str, Any]]) -> str:
    """sha256 over every batch's keys, dtypes, shapes and tensor bytes, in order: the same
    inputs give the same hash on every machine (audit and reproduce a fit)."""
    digest = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            value = batch[key]
            digest.update(key.encode() + b"\0")
            if isinstance(value, torch.Tensor):
                t = value.detach().cpu().contiguous()
                digest.update(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}\0".encode())
                digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                digest.update(repr(value).encode() + b"\0")
        digest.update(b"\1")  # batch boundary: [a, b] and [a + b] hash differently
    return digest.hexdigest()


def load_calibration(path: str | os.PathLike, tokenizer: Any = None, *, max_length: int = DEFAULT_MAX_LENGTH,
                     batch_size: int = DEFAULT_BATCH_SIZE) -> list[dict[str, torch.Tensor]]:
    """Batches of model inputs from a text or JSONL file (see the module docstring).

    ``tokenizer``: a tokenizer object, or the finetune's directory to load it from with
    ``AutoTokenizer`` (only loaded when a line needs tokenizing). Pre-tokenized sequences are
    padded with 0 and get an ``attention_mask`` (1 on real tokens) unless they bring their own.
    Returns dicts of int64/float tensors with a batch dimension first.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"calibration file {str(path)!r} does not exist")
    if max_length < 1 or batch_size < 1:
        raise InvalidInputError(f"max_length and batch_size must be positive, got {max_length} and {batch_size}")
    examples: list[tuple[int, dict[str, Any]]] = []
    jsonl = path.suffix.lower() in JSONL_SUFFIXES
    _check_utf8(path)
    if not jsonl:
        _refuse_json_document(path)
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            if not jsonl:
                examples.append((number, {"text": line.rstrip("\r\n")}))
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
                raise InvalidInputError(f"{path}:{number}: not valid JSON ({type(exc).__name__}: "
                                        f"{str(exc)[:100]})") from None
            if not isinstance(row, dict) or ("text" not in row and "input_ids" not in row):
                raise InvalidInputError(f"{path}:{number}: expected an object with \"text\" or \"input_ids\"")
            if "text" in row and not isinstance(row["text"], str):
                raise InvalidInputError(f"{path}:{number}: \"text\" must be a string")
            examples.append((number, row))
    if not examples:
        raise InvalidInputError(f"{path}: holds no examples")
    state = {"tokenizer": tokenizer, "vocab": _vocab_size(tokenizer)}
    return [_batch(path, examples[i:i + batch_size], state, max_length)
            for i in range(0, len(examples), batch_size)]


def _vocab_size(tokenizer: Any) -> int:
    """The token ids the finetune accepts: ``vocab_size`` of the config.json in its folder
    (ids beyond it would index past the embedding), else any int64."""
    if isinstance(tokenizer, (str, os.PathLike)):
        try:
            vocab = json.loads((Path(tokenizer) / "config.json").read_bytes()).get("vocab_size")
        except (OSError, ValueError, RecursionError, AttributeError):
            vocab = None
        if isinstance(vocab, int) and not isinstance(vocab, bool) and 0 < vocab < INT64_END:
            return vocab
    return INT64_END


def _check_utf8(path: Path) -> None:
    """Refuse a file that is not UTF-8 with its line, before anything is read as text."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise InvalidInputError(f"{path}:{line}: not UTF-8 text (byte {data[exc.start]:#04x}); save it as UTF-8") from None
def _refuse_json_document(path: Path) -> None:
    """A text file must hold one example per line; refuse a JSON document passed as one."""
    expected = ("expected one example per line: plain text lines, or JSONL (a .jsonl file, one object "
                "{\"text\": ...} or {\"input_ids\": [...]} per line)")
    if path.suffix.lower() == ".json":
        raise InvalidInputError(f"{path}: a .json file is one JSON document; {expected}")
    with path.open(encoding="utf-8") as handle:
        first = next((line.strip() for line in handle if line.strip()), "")
    if not first.startswith(("[", "{")):
        return
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        document = None
    if isinstance(document, (list, dict)):
        found = f"a JSON array of {len(document)} items" if isinstance(document, list) else "a JSON object"
        raise InvalidInputError(f"{path}: found one JSON document ({found}), not one example per line; {expected}")
    try:
        line_is_json = isinstance(json.loads(first), dict)
    except ValueError:
        line_is_json = False
    if line_is_json:
        raise InvalidInputError(f"{path}: its lines are JSON objects but the file is read as text; rename it to "
                                f"{path.stem}.jsonl")


def _tokenizer(state: dict[str, Any], path: Path, number: int):
    tokenizer = state["tokenizer"]
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        where = tokenizer
        if where is None:
            raise InvalidInputError(f"{path}:{number}: text needs a tokenizer; none was given (pre-tokenize it as "
                                    "JSONL lines {\"input_ids\": [...]})")
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(where))
        except (OSError, ValueError) as exc:
            raise InvalidInputError(
                f"{where}: no usable tokenizer for the text in {path} ({str(exc).splitlines()[0]}); add the "
                "finetune's tokenizer files or give pre-tokenized JSONL lines {\"input_ids\": [...]}"
            ) from None
        if tokenizer.pad_token is None:
            # Decoders (GPT-2, Llama) often ship without one; padded positions are masked out
            # of the attention and of the fitted error anyway, so any token will do.
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        state["tokenizer"] = tokenizer
    return tokenizer


def _batch(path: Path, rows: list[tuple[int, dict[str, Any]]], state: dict[str, Any],
           max_length: int) -> dict[str, torch.Tensor]:
    kinds = {"text" in row for _, row in rows}
    if len(kinds) > 1:
        raise InvalidInputError(f"{path}:{rows[0][0]}-{rows[-1][0]}: a batch mixes \"text\" and \"input_ids\" "
                                "lines; use one kind per file")
    if kinds == {True}:
        extra = sorted({k for _, row in rows for k in row} - {"text"})
        if extra:
            raise InvalidInputError(f"{path}:{rows[0][0]}: fields {extra} next to \"text\" are not supported")
        tokenizer = _tokenizer(state, path, rows[0][0])
        encoded = tokenizer([row["text"] for _, row in rows], padding="longest", truncation=True,
                            max_length=max_length, return_tensors="pt")
        return {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}
    keys = {k for _, row in rows for k in row}
    batch: dict[str, torch.Tensor] = {}
    for key in sorted(keys):
        missing = [n for n, row in rows if key not in row]
        if missing:
            raise InvalidInputError(f"{path}:{missing[0]}: field {key!r} is missing (other lines of its batch have it)")
        if _is_sequence_key(key):
            # Padding is masked out of the attention and of the fitted error: its id is moot.
            bound = state["vocab"] if key.endswith("input_ids") else INT64_END
            batch[key] = _pad(path, [(n, row[key]) for n, row in rows], key, 0, max_length, bound)
        else:
            try:
                values = [torch.as_tensor(row[key]) for _, row in rows]
                batch[key] = torch.stack(values)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise InvalidInputError(f"{path}:{rows[0][0]}-{rows[-1][0]}: field {key!r} does not form a batch of "
                                        f"equal-shaped numbers ({exc})") from None
    for prefix in ("", "decoder_"):  # 1 on real tokens, 0 on padding
        ids, mask = f"{prefix}input_ids", f"{prefix}attention_mask"
        if ids in batch and mask not in batch:
            lengths = torch.tensor([min(len(row[ids]), max_length) for _, row in rows])
            batch[mask] = (torch.arange(batch[ids].shape[1])[None, :] < lengths[:, None]).long()
    return batch


def _pad(path: Path, values: list[tuple[int, Any]], key: str, pad: int, max_length: int,
         vocab: int) -> torch.Tensor:
    """Pad integer sequences into one int64 tensor; every value must lie in ``[0, vocab)``."""
    seqs = []
    for number, value in values:
        if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool)
                                                               for v in value):
            raise InvalidInputError(f"{path}:{number}: {key!r} must be a non-empty list of integers")
        bad = next((v for v in value if not 0 <= v < vocab), None)
        if bad is not None:
            raise InvalidInputError(f"{path}:{number}: {key!r} holds {bad}, outside the model's token ids 0.."
                                    f"{vocab - 1}; tokenize with the finetune's own tokenizer")
        seqs.append(value[:max_length])
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out
