"""Commit to a byte budget (issue 16): per lossy tensor, the compressor setting that keeps the
version's real bytes on disk within ``max_bytes`` at the least reconstruction error.

Bytes are counted as ``Catalog.stats`` counts ``own_bytes`` (specs/format.md §10): every
array, blob and record the version holds beyond the reference. Part of them does not depend on
the choice (**fixed**): the side files, the tensors stored whole, the changed-row masks and
the record (estimated from the entries it will hold, plus RECORD_MARGIN for its other
fields). Each candidate setting's arrays are encoded and sized as they would be written (an
array folder: :meth:`ObjectStore.array_size`; in the bundle: its bytes compressed alone, which
the bundle's one zstd frame matches to within a few bytes), so the estimate of a setting is
about its real size; the
commit measures the whole version again before publishing it and tightens the choice if the
record or a refitted code came out larger.

The error of a setting is the squared reconstruction error of the tensor's residual
``||C(R) - R||^2`` (``R = D[m] - lam1 * tau[m]`` at the closed-form lam1, lam2 = 1): a proxy for
the calibration loss that needs no data, additive over tensors: the default. Asked to
(``budget_proxy="outputs"``, with calibration inputs and a finetune the tuners can run:
deltastore.tuning.fit.input_grams), the error of a linear layer's weight is measured on its
outputs instead: ``E = C(R) - R`` errs the layer's outputs on its
calibration inputs ``X`` by ``tr(E G E^T)`` with ``G = X^T X`` (deltastore.tensor.lsq.error),
so bits go to the directions the inputs use. Tensors that are no linear layer's weight
(embeddings) keep the weight error. To keep both kinds on one scale, a weighted error is
used as a share of the tensor's own delta: ``||R||^2 * tr(E G E^T) / tr(R G R^T)``, the
fraction of what the residual does to the outputs that the setting loses, times the squared
norm that the data-free proxy weighs the tensor by. So the inputs decide which setting loses
least of a tensor (and how much less, relative to its other settings), while tensors weigh
against each other as before: raw output errors are in each layer's activation units (a
layer after a GELU and one after a LayerNorm differ by orders of magnitude, and the next
LayerNorm undoes much of it), and would not be comparable with the embeddings' weight error
at all; dividing by the error of zero alone (fit.py's relative error, fine within one
tensor) would give a tensor whose delta is tiny as much weight as the largest. With ``G``
a multiple of the identity the weighted error is the plain one. On the MiniLM zoo this proxy
chose worse than the data-free one (benchmarks/results/budget_proxy.md), hence not the default. The choice minimises the sum
of errors within the code budget (a multiple-choice knapsack): a Lagrangian sweep (each
tensor takes its setting minimising ``error + mu * bytes``, ``mu`` bisected to the tightest that
fits), then a greedy pass that spends what is left on the upgrades that lower the error most
per byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import zstandard

from ..catalog import setting_label
from ..errors import BudgetTooSmallError, InvalidInputError
from ..storage.layout import ZSTD_LEVEL
from ..storage.objects import ObjectStore, array_hash, to_numpy
from ..storage.records import XOR, ReferenceRecord, TensorEntry, content_hash, pack
from ..tensor import dbms, lsq
from ..tensor.bitpack import pack_bits
from ..tensor.compressors import Compressor, compressor_class, delta_compressors, get_compressor
from ..tensor.compressors.lossless import Lossless
from ..tensor.pack import pack_tensors
from . import commit
from .commit import PACK_MAX_BYTES, pack_pair

def default_menu() -> list[tuple[str, dict[str, Any]]]:
    """The settings a budget chooses among by default: those every registered delta compressor
    offers for budgets (its class's optional ``budget_settings``, a list of configurations).
    Any list of (compressor, configuration) may be given instead (``Registry.commit(budget_menu=...)``)."""
    return [(name, dict(config)) for name in delta_compressors()
            for config in getattr(compressor_class(name), "budget_settings", ())]


# Bytes of a task version's record beyond its tensor entries (task, message, times, lambdas,
# source, the tuner's record): 1-3 KB of msgpack, less in the record's zstd frame; the commit
# checks the real size anyway.
RECORD_MARGIN = 2048
PLACEHOLDER = "0" * 64  # a hash in a draft entry or record: every hash has 64 characters
# The draft record a commit measures before publishing (specs/format.md §3.1: stored as a zstd
# frame) has a parent hash where a first version has none: a hash-like one, since zeros would
# compress to nothing. Its version number and checked figure differ from the real record's by a
# few bytes, which may compress a few bytes larger: SLACK bytes cover that.
DRAFT_PARENT = content_hash(b"draft parent")
RECORD_FRAME_SLACK = 32
# The commit measures the real bytes before publishing; over the budget, it chooses again with
# the budget lowered by the overshoot (and SLACK bytes), at most ATTEMPTS times in all.
ATTEMPTS = 3
SLACK = 64


def budget_bytes(max_bytes: int | None, ratio: float | None, source) -> int | None:
    """The budget in bytes: ``max_bytes``, or the finetune's fp16 bytes (2 per parameter)
    divided by ``ratio``; None without either. Both, or a value that is not positive, are refused."""
    if max_bytes is None and ratio is None:
        return None
    if max_bytes is not None and ratio is not None:
        raise InvalidInputError("give a byte budget as max_bytes (--max-bytes) or as ratio (--ratio), not both")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0 or not math.isfinite(ratio):
            raise InvalidInputError(f"ratio must be a positive number (fp16 bytes / bytes on disk), got {ratio!r}")
        params = sum(math.prod(source.shape(n)) for n in source.names())
        return int(2 * params / ratio)
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise InvalidInputError(f"max_bytes must be a positive integer, got {max_bytes!r}")
    return max_bytes


def main_compressor(plan: "BudgetPlan", choice: dict[str, int]) -> Compressor:
    """The setting holding the most code bytes: what the version's ``method`` names."""
    held = [0] * len(plan.menu)
    for name, j in choice.items():
        held[j] += plan.options[name][j].nbytes
    return plan.menu[max(range(len(held)), key=held.__getitem__)]


@dataclass
class Option:
    """One setting of one tensor: its bytes on disk and its squared error."""

    nbytes: int
    error: float


@dataclass
class BudgetPlan:
    """Every lossy tensor's options (in menu order) and what does not depend on the choice."""

    menu: list[Compressor]
    options: dict[str, list[Option]]
    fixed: dict[str, int] = field(default_factory=dict)  # side files, whole tensors, masks, record
    weighted: int = 0  # tensors whose errors were weighted by their layer's input Gram

    @property
    def fixed_bytes(self) -> int:
        return sum(self.fixed.values())

    def cheapest(self) -> int:
        return self.fixed_bytes + sum(min(o.nbytes for o in opts) for opts in self.options.values())

    def select(self, max_bytes: int) -> dict[str, int]:
        """Per tensor, the index in ``menu`` of its setting: the least total error whose bytes,
        fixed ones included, stay within ``max_bytes``."""
        if self.cheapest() > max_bytes:
            raise BudgetTooSmallError(
                f"byte budget {max_bytes:,} is below the smallest this finetune can be stored in: "
                f"{self.cheapest():,} bytes ({self._fixed_text()}, and "
                f"{self.cheapest() - self.fixed_bytes:,} for the deltas at the cheapest settings); raise --max-bytes "
                "or lower --ratio", self.cheapest(), {**self.fixed, "deltas": self.cheapest() - self.fixed_bytes})
        budget = max_bytes - self.fixed_bytes

        def pick(mu: float) -> dict[str, int]:
            return {n: min(range(len(opts)), key=lambda j: (opts[j].error + mu * opts[j].nbytes, opts[j].nbytes))
                    for n, opts in self.options.items()}

        def spent(choice: dict[str, int]) -> int:
            return sum(self.options[n][j].nbytes for n, j in choice.items())

        low, high = -30.0, 30.0  # log10 of mu: errors per byte lie far inside
        choice = pick(10.0 ** high)
        if spent(choice) > budget:  # mu large enough makes every tensor take its cheapest setting
            choice = {n: min(range(len(o)), key=lambda j: o[j].nbytes) for n, o in self.options.items()}
        for _ in range(80):
            middle = (low + high) / 2
            candidate = pick(10.0 ** middle)
            if spent(candidate) <= budget:
                choice, high = candidate, middle
            else:
                low = middle
        return self._fill(choice, budget - spent(choice))

    def _fill(self, choice: dict[str, int], left: int) -> dict[str, int]:
        """Spend what the sweep left on the upgrades that lower the error most per byte."""
        while True:
            best = None
            for name, j in choice.items():
                opts = self.options[name]
                for k, option in enumerate(opts):
                    extra = option.nbytes - opts[j].nbytes
                    gain = opts[j].error - option.error
                    if gain > 0 and extra <= left and (best is None or gain / max(extra, 1) > best[0]):
                        best = (gain / max(extra, 1), name, k, extra)
            if best is None:
                return choice
            _, name, k, extra = best
            choice[name], left = k, left - extra

    def summary(self, choice: dict[str, int], max_bytes: int) -> dict[str, Any]:
        """What was chosen (the record's ``source.budget``): per setting, its tensors and code
        bytes; the bytes estimated."""
        per: dict[str, dict[str, int]] = {}
        for name, j in choice.items():
            compressor = self.menu[j]
            label = setting_label(compressor.name, compressor.config.to_dict())
            row = per.setdefault(label, {"tensors": 0, "bytes": 0})
            row["tensors"] += 1
            row["bytes"] += self.options[name][j].nbytes
        code = sum(self.options[n][j].nbytes for n, j in choice.items())
        return {"max_bytes": max_bytes, "chosen": dict(sorted(per.items(), key=lambda kv: -kv[1]["bytes"])),
                "fixed_bytes": dict(self.fixed), "code_bytes": code,
                "estimated_bytes": code + self.fixed_bytes,
                "error": sum(self.options[n][j].error for n, j in choice.items()),
                "proxy": (f"output error on the calibration inputs for {self.weighted} linear layers' weights, as a "
                          "share of each residual's squared norm; squared reconstruction error for the rest"
                          if self.weighted else "squared reconstruction error of each residual")}

    def _fixed_text(self) -> str:
        return ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in self.fixed.items())


def menu_compressors(menu: list[tuple[str, dict[str, Any]]]) -> list[Compressor]:
    """The menu's compressors, each configuration completed by its class's defaults."""
    out = []
    for method, config in menu:
        base = get_compressor(method)  # the defaults of its configuration
        out.append(get_compressor(method, {**base.config.to_dict(), **config}))
    if not out:
        raise InvalidInputError("a byte budget needs at least one setting to choose among")
    return out


def code_bytes(objects: ObjectStore, array: torch.Tensor) -> int:
    """Bytes an array of a delta entry (a code, a row mask) adds to the version: its data in the
    bundle (specs/format.md §5.9), or an array folder of its own, as CommitPipeline stores it."""
    if array.numel() * array.element_size() <= commit.BUNDLE_MAX_BYTES:
        frame = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=False)
        return len(frame.compress(to_numpy(array).tobytes()))
    return objects.array_size(array, compress=array.dtype not in (torch.uint8, torch.int8))


def entry_bytes(draft: TensorEntry) -> int:
    """What ``draft`` (its hashes placeholders) adds to a record stored as a zstd frame
    (specs/format.md §3.1): each hash about its 32 bytes of entropy, the rest (field names and
    shapes repeated in every entry, tensor names sharing prefixes) at an eighth of its msgpack
    bytes (all-MiniLM-L6-v2's records shrink to a twentieth, hashes aside)."""
    hashes = len(draft.arrays or {}) + (draft.rows is not None)
    return 33 * hashes + (len(pack(draft.to_dict())) - 64 * hashes) // 8


def fixed_part(pipeline, objects: ObjectStore, reference: ReferenceRecord, task: str, max_bytes: int,
               small_tensor_bits: int | None = None) -> dict[str, int]:
    """The bytes of a version that no choice of settings changes, but its row masks: side
    files, tensors stored whole or packed, their record entries. Made as the commit makes them
    (CommitPipeline.encode, store_files): small tensors packed against the reference (with
    ``small_tensor_bits``), side files patched against the reference's. A budget they alone
    exceed is refused here, before the commit reads a single lossy tensor."""
    shared_arrays = reference.array_hashes()
    shared_blobs = set(reference.files.values())
    whole = files = entries = 0
    hashes: set[str] = set()
    packed: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    others = [n for n in pipeline.source.names() if n not in pipeline.plan.lossy]
    for name, (w_ref, tensor, _) in pipeline.read_all(others, f"{task}: budget, whole tensors"):
        if tensor.numel() * tensor.element_size() <= PACK_MAX_BYTES:
            packed[name] = pack_pair(tensor, w_ref, small_tensor_bits)
            draft = TensorEntry(shape=tuple(tensor.shape), dtype="float32", codec=XOR, ref=name)
            entries += entry_bytes(draft)
            continue
        encoded = Lossless().encode(tensor.cpu())
        for array in encoded.arrays.values():
            digest = array_hash(to_numpy(array))
            if digest not in shared_arrays and digest not in hashes:
                hashes.add(digest)
                whole += objects.array_size(array, compress=True)
        draft = TensorEntry(shape=tuple(tensor.shape), dtype="float32", codec=Lossless.name, config={},
                            arrays=dict.fromkeys(encoded.arrays, PLACEHOLDER), attrs=dict(encoded.attrs))
        entries += entry_bytes(draft)
    if packed:
        whole += objects.array_size(pack_tensors([packed[n] for n in sorted(packed)]), compress=True)
    for rel, path in pipeline.source.files.items():
        data = path.read_bytes()
        digest = content_hash(data)
        if digest not in shared_blobs and digest not in hashes:
            hashes.add(digest)
            files += objects.blob_size(data, reference.files.get(rel))
    if files + whole + entries > max_bytes:  # refused before the costly part: every setting of every tensor
        raise BudgetTooSmallError(
            f"byte budget {max_bytes:,} is below what this finetune needs before any delta: side files {files:,} "
            f"and tensors stored whole or packed {whole:,} bytes, plus their record entries {entries:,}; raise "
            "--max-bytes or lower --ratio", files + whole + entries,
            {"side_files": files, "whole_tensors": whole, "record": entries})
    return {"side_files": files, "whole_tensors": whole, "record": entries}


def plan(pipeline, objects: ObjectStore, menu: list[Compressor], lam1: float, seeds: dict[str, int], task: str,
         fixed: dict[str, int], grams: dict[str, torch.Tensor] | None = None) -> BudgetPlan:
    """Measure every menu setting on every lossy tensor (one read of each, on the pipeline's
    device), beside ``fixed`` (:func:`fixed_part`). ``grams``: per finetune name, the input
    Gram its errors are weighted by (see the module docstring); the others' are unweighted."""
    options: dict[str, list[Option]] = {}
    masks = weighted = 0
    for name, (w_ref, tensor, t) in pipeline.read_all(pipeline.lossy, f"{task}: budget"):
        w_pre = dbms.as_matrix(w_ref.float())
        delta = dbms.as_matrix(tensor.float()) - w_pre
        rows = dbms.changed_rows(delta)
        if not bool(rows.all()):
            masks += code_bytes(objects, pack_bits(rows))
        resid = dbms.residual(delta[rows], None if t is None else dbms.as_matrix(t)[rows], lam1).contiguous()
        gram, share = (grams or {}).get(name), 1.0
        if gram is not None:
            gram = gram.to(resid.device)
            zero = lsq.error(torch.zeros_like(resid), resid, gram)
            if zero > 0:  # a layer whose inputs do not see its residual keeps the plain error
                share = float(resid.double().pow(2).sum()) / zero
                weighted += 1
            else:
                gram = None
        row = []
        for compressor in menu:
            encoded = compressor.encode(resid, seed=seeds[name])
            error = share * lsq.error(compressor.decode(encoded, tuple(resid.shape), resid.device), resid, gram)
            nbytes = sum(code_bytes(objects, a) for a in encoded.arrays.values())
            draft = TensorEntry(shape=tuple(tensor.shape), dtype="float32", codec=compressor.name,
                                config=compressor.config.to_dict(), arrays=dict.fromkeys(encoded.arrays, PLACEHOLDER),
                                attrs=dict(encoded.attrs), ref=name, rows=PLACEHOLDER, changed_rows=int(rows.sum()))
            # The entry goes into the record: count it with the code (its size varies by setting).
            row.append(Option(nbytes + entry_bytes(draft), error if math.isfinite(error) else math.inf))
        options[name] = row
    return BudgetPlan(menu, options, {"side_files": fixed["side_files"], "whole_tensors": fixed["whole_tensors"],
                                      "row_masks": masks, "record": fixed["record"] + RECORD_MARGIN}, weighted)
