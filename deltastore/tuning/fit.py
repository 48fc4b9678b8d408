"""The ``fit-all`` tuner: fit what is stored, not only the lambdas (issue 16).

1. The lambdas are fitted first by the ``dbms`` tuner (:mod:`deltastore.tuning.dbms`: lam1,
   lam2 on the model's outputs, the residual re-compressed at every step).
2. Every lossy tensor is encoded at that lam1. Its code's discrete part (BitDelta's signs,
   DARE's and DeltaDQ's kept positions) stays as encoded; its continuous part is fitted, with
   the compressor's ``refit`` (BitDelta: the matrix's scale; DARE: the kept values; DeltaDQ:
   the kept values' codes, then the row scales), so that ``lam1*tau + lam2*C`` matches the
   finetune's delta on the calibration inputs of that matrix: for the weight of a linear
   layer, the squared error of that layer's outputs ``sum_i e_i G e_i^T`` with ``G = X^T X``
   over the layer's inputs ``X`` in the finetune (padding excluded); for any other matrix
   (embeddings), the squared weight error. These are small least-squares problems solved in
   closed form (deltastore.tensor.lsq), no gradient steps. A fitted code whose error is not
   below the encoded one's is not used.
3. With the codes now fixed, (lam1, lam2) are fitted again by Levenberg-Marquardt on the
   model's outputs (without re-compression: the codes are what will be stored). The fitted
   codes are kept only if the model's calibration loss ends below the one of step 1's
   lambdas with plain codes; otherwise the version is step 1's (``fell_back: true``).

The codes returned are written as they are (the pipeline does not encode those tensors
again): the stored arrays hold the fitted values, in each compressor's own format, so any
reader decodes them unchanged.

Memory: the finetune's model, per lossy tensor its changed rows of ``D`` and ``tau`` (as the
``dbms`` tuner) plus its decoded codes, and the input Grams of a bounded group of linear layers
at a time. Each Gram is ``in x in`` float64, one per linear layer whose weight is fitted (q, k
and v each hold their own, of the same input). The layers, in the model's order, are cut into
consecutive groups whose Grams total at most ``max_gram_bytes`` (default 256 MiB; a layer whose
Gram alone is larger is a group of its own), and step 2 goes group by group: collect the
group's Grams over the calibration inputs, refit its tensors, free the Grams. So at most
``max(max_gram_bytes, largest single Gram)`` bytes of Grams are held at once, plus, while one
is summed or used, one Gram-sized temporary (a batch's ``X^T X``, or the damped copy a refit
solves with). The first group's Grams are collected in the pass that computes the targets;
each further group costs one more pass over the calibration batches, each forward stopped
(an exception from a hook) as soon as the group's layers have had all their inputs of the
batch, so the model runs only up to the group's last layer. With several groups the
finetune's weights stay in the model until every group is collected; only then are the lossy
slots set to ``W_pre`` (read again from the reference, one tensor at a time, so no second copy
of the model is ever held). The Grams are the same whatever the grouping: the same inputs,
summed over the same batches in the same order, so the fit is identical (tests/test_fit_all.py
compares the stored versions bit for bit). MiniLM (6 layers x (5 x 384^2 + 1536^2) doubles, about 150 MB)
is one group: no extra pass. A Llama-2-7B (per layer six inputs of 4096 and one of 11008)
would need 57 GB of Grams at once; with the default budget it holds at most 0.97 GB (one
``down_proj``'s) in 4 groups per layer, at the price of about 64 extra passes' worth of
forwards (a group's pass runs the model only up to that group). ``max_gram_bytes`` trades
the two: fewer, larger groups cost fewer passes.

Options (``tune_options``): those of the ``dbms`` tuner (:class:`deltastore.tuning.dbms.DbmsTuneConfig`)
and ``max_gram_bytes`` (:class:`FitTuneConfig`).

The record (the version's ``tuning`` field): ``tuner`` (``fit-all``), ``fell_back``,
``reason``, ``loss_initial`` (closed-form lambdas, plain codes), ``loss_lambdas`` (after step
1), ``loss_final`` (the version's), ``lam1_final``/``lam2_final``, ``tensors_fitted``,
``tensors_refit`` (whose fitted code was kept), ``tensors_with_inputs`` (fitted on a linear
layer's inputs), ``grams`` (how step 2 was grouped: ``max_bytes``, the option; ``layers``, the
linear layers among the fitted tensors; ``groups``; ``peak_bytes``, the most bytes of
Grams alive at once, as counted while they were; ``forwards``, the batch forwards the groups
after the first ran, each stopped after its group), ``local_error`` (sum over tensors of the
squared error before and after refitting, each relative to the error of zero), ``steps``,
``seconds``, ``seconds_codes``, ``device``, ``calibration``, and ``lambdas``: step 1's own
``dbms`` record.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import torch

from ..calibration import as_batches, example_count
from ..errors import InvalidInputError
from ..tensor import dbms
from ..tensor import lsq
from .dbms import (DbmsTuneConfig, _install, _levenberg_marquardt, frozen_eval, _load_model, _Lossy, _mask,
                   _prepare, _Problem, _Progress, _resolve_output, _select, _squares)
from .dbms import tune as tune_lambdas
from .base import Lambdas, TuneContext

GRAM_ITEM_BYTES = 8  # the Grams are float64: sums over many tokens, and the solves need the precision
MAX_GRAM_BYTES = 256 << 20  # default max_gram_bytes: MiniLM's ~150 MB of Grams stay one group (one pass)


class _FixedCodes(_Problem):
    """The outputs as a function of (lam1, lam2) for codes already encoded: no re-compression."""

    def __init__(self, *args, decoded: dict[str, torch.Tensor]):
        super().__init__(*args)
        self.decoded = decoded

    def update(self, item, l1: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
        update = l2 * self.decoded[item.name]
        return update if item.tau is None else update + l1 * item.tau


@dataclass(frozen=True)
class FitTuneConfig(DbmsTuneConfig):
    """Options of the ``fit-all`` tuner: those of the ``dbms`` tuner, and ``max_gram_bytes``:
    the most bytes of input Gram matrices held at once (see the module docstring, "Memory"); 0
    holds one at a time."""

    tuner: ClassVar[str] = "fit-all"

    max_gram_bytes: int = MAX_GRAM_BYTES

    def __post_init__(self) -> None:
        super().__post_init__()
        if type(self.max_gram_bytes) is not int or self.max_gram_bytes < 0:
            raise InvalidInputError(f"fit-all tuner: option max_gram_bytes={self.max_gram_bytes!r} is invalid; "
                                    "expected an integer >= 0 (bytes)")


# The options fit-all adds to the dbms tuner's: step 1 is not given them.
FIT_OPTIONS = {f.name for f in fields(FitTuneConfig)} - {f.name for f in fields(DbmsTuneConfig)}


class _GramMemory:
    """Bytes of Gram matrices alive at once: each counts from its creation until it is freed
    (a finalizer), so ``peak`` is what was held, not what the grouping planned."""

    def __init__(self) -> None:
        self.alive = self.peak = 0

    def track(self, gram: torch.Tensor) -> torch.Tensor:
        size = gram.numel() * gram.element_size()
        self.alive += size
        self.peak = max(self.peak, self.alive)
        weakref.finalize(gram, self._free, size)
        return gram

    def _free(self, size: int) -> None:
        self.alive -= size


class _Stop(Exception):
    """Ends a forward pass early: every layer of the group has seen all its inputs of the batch."""


def _linear_layers(model: torch.nn.Module, names: dict[str, str]) -> dict[str, torch.nn.Linear]:
    """Per finetune name in ``names`` (finetune name -> the model's parameter name) that is a
    ``torch.nn.Linear``'s weight: that module."""
    modules: dict[str, torch.nn.Linear] = {}
    for name, target in names.items():
        owner, _, leaf = target.rpartition(".")
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            continue
        if leaf == "weight" and isinstance(module, torch.nn.Linear):
            modules[name] = module
    return modules


def gram_groups(layers: list[torch.nn.Linear], max_bytes: int) -> list[list[torch.nn.Linear]]:
    """``layers`` (in the model's order) cut into consecutive groups whose Grams (``in x in``
    float64 each) total at most ``max_bytes``; a layer whose Gram alone exceeds it is a group
    of its own."""
    groups: list[list[torch.nn.Linear]] = []
    held = 0
    for layer in layers:
        size = layer.in_features ** 2 * GRAM_ITEM_BYTES
        if groups and held + size <= max_bytes:
            groups[-1].append(layer)
            held += size
        else:
            groups.append([layer])
            held = size
    return groups


def _collect(model: torch.nn.Module, batches: list[dict[str, Any]], output: str, group: list[torch.nn.Linear],
             counted: list[torch.nn.Linear], memory: _GramMemory,
             calls: list[dict[int, int]] | None = None) -> tuple[list[torch.Tensor], dict[int, torch.Tensor],
                                                                 list[dict[int, int]]]:
    """One pass over the batches: ``G = X^T X`` (float64, padding excluded) over the inputs of
    each layer of ``group``, by ``id`` of the layer, and per batch how often each layer of
    ``counted`` was called. Without ``calls`` every forward runs whole and the model's outputs
    are returned; with ``calls`` (a whole pass's counts) each forward stops as soon as every
    layer of the group has had all its calls of that batch, and no outputs are returned. The
    layers' inputs, hence the Grams, are the same either way: the forward runs the same
    operations up to the stop."""
    grams: dict[int, torch.Tensor] = {}
    wanted = {id(layer) for layer in group}
    seen: dict[int, int] = {}
    current: dict[str, Any] = {"mask": None, "expected": None}

    def hook(module: torch.nn.Module, args: tuple) -> None:
        key = id(module)
        seen[key] = seen.get(key, 0) + 1
        if key not in wanted:
            return
        x = args[0].detach()
        mask = current["mask"]
        if mask is not None and tuple(mask.shape) == tuple(x.shape[:2]):
            x = x[mask.bool()]
        x = x.reshape(-1, x.shape[-1]).double()
        gram = grams.get(key)
        if gram is None:
            grams[key] = memory.track(x.T @ x)
        else:
            gram.add_(x.T @ x)
        expected = current["expected"]
        if expected is not None and all(seen.get(k, 0) >= expected.get(k, 0) for k in wanted):
            raise _Stop

    handles = [layer.register_forward_pre_hook(hook) for layer in counted]
    outputs: list[torch.Tensor] = []
    counts: list[dict[int, int]] = []
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                seen.clear()
                current["mask"] = batch.get("attention_mask")
                current["expected"] = None if calls is None else calls[i]
                if calls is not None and not any(calls[i].get(k, 0) for k in wanted):
                    counts.append({})
                    continue  # no layer of the group runs on this batch
                try:
                    out = model(**batch)
                except _Stop:
                    pass
                else:
                    if calls is None:
                        outputs.append(_select(out, output).detach())
                counts.append(dict(seen))
    finally:
        for handle in handles:
            handle.remove()
    return outputs, grams, counts


def input_grams(context: TuneContext) -> dict[str, torch.Tensor] | None:
    """Per lossy tensor that is the weight of a linear layer run on the calibration inputs:
    that layer's input Gram ``G = X^T X`` (float64, padding excluded), collected as step 2
    collects them, in one pass over the finetune's model (what a byte budget weighs its errors
    by, deltastore.engine.budget). None when the Grams of those layers would total more than
    the ``max_gram_bytes`` option (``context.options``, default MAX_GRAM_BYTES): the budget then
    keeps its data-free proxy rather than hold them all, or pass over the inputs once per group
    of layers."""
    known = {f.name for f in fields(FitTuneConfig)}
    cfg = FitTuneConfig.from_options({k: v for k, v in context.options.items() if k in known})
    batches = as_batches(context.calibration)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, owned = _load_model(context, cfg, device)
    with frozen_eval(model, owned):
        from ..hf import checkpoint_names

        batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]
        output, extra = _resolve_output(model, batches[0], cfg.output)
        targets_by_name = checkpoint_names(model)
        layer_of = _linear_layers(model, {n: targets_by_name.get(n, n) for n in context.lossy})
        wanted = {id(m) for m in layer_of.values()}
        layers = [m for _, m in model.named_modules() if id(m) in wanted]
        if len(gram_groups(layers, cfg.max_gram_bytes)) > 1:
            return None
        _, grams, _ = _collect(model, [{**b, **extra} for b in batches], output, layers, layers, _GramMemory())
    return {name: grams[id(layer)] for name, layer in layer_of.items() if id(layer) in grams}


@dataclass
class _Fitted:
    """One tensor's code after step 2."""

    code: dbms.MatrixCode   # what is stored: the fitted code where it erred less, else the encoded one
    plain: torch.Tensor     # the encoded code, decoded
    fitted: torch.Tensor    # the stored code, decoded
    errors: tuple[float, float] | None  # (encoded, fitted) squared error relative to zero's; None: not refitted
    refit: bool


def _fit_code(it: _Lossy, lam1: float, lam2: float, gram: torch.Tensor | None, device: torch.device) -> _Fitted:
    """Encode one tensor's residual at ``lam1`` and fit its code's continuous part under ``gram``."""
    compressor = it.compressor
    resid = dbms.residual(it.delta, it.tau, lam1)
    encoded = compressor.encode(resid.contiguous(), seed=it.seed)
    shape = tuple(resid.shape)
    plain = compressor.decode(encoded, shape, device)
    rows = torch.zeros(it.shape[0], dtype=torch.bool, device=it.rows.device)
    rows[it.rows] = True
    # Every fitted tensor's code is returned, fitted or not: it was encoded at the lam1 of
    # step 1, which step 3 may move; the pipeline must store this code, not encode anew.
    kept = _Fitted(dbms.MatrixCode(rows, encoded), plain, plain, None, False)
    fit_code = getattr(compressor, "refit", None)
    if fit_code is None or lam2 == 0:
        return kept
    target = resid / lam2  # lam2 * C should be the residual
    gram = lsq.damped(gram)
    candidate = fit_code(encoded, target, gram)
    decoded = compressor.decode(candidate, shape, device)
    scale = lsq.error(torch.zeros_like(target), target, gram) or 1.0
    before, after = lsq.error(plain, target, gram) / scale, lsq.error(decoded, target, gram) / scale
    if after < before:
        return _Fitted(dbms.MatrixCode(rows, candidate), plain, decoded, (before, after), True)
    kept.errors = (before, after)
    return kept


def tune(context: TuneContext) -> Lambdas:
    """Fit the lambdas, then every stored code's continuous part, then the lambdas again (see
    the module docstring); never worse than the ``dbms`` tuner's answer on the calibration loss."""
    began = time.perf_counter()
    cfg = FitTuneConfig.from_options(context.options)
    start = tune_lambdas(replace(context, options={k: v for k, v in context.options.items() if k not in FIT_OPTIONS}))
    lambdas_record = start.record
    batches = as_batches(context.calibration)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, owned = _load_model(context, cfg, device)
    with frozen_eval(model, owned):
        return _fit_codes(context, cfg, start, model, owned, batches, device, began, lambdas_record)


def _fit_codes(context: TuneContext, cfg: FitTuneConfig, start: Lambdas, model: torch.nn.Module, owned: bool,
               batches: list[dict[str, Any]], device: torch.device, began: float,
               lambdas_record: dict[str, Any]) -> Lambdas:
    from ..hf import checkpoint_names

    codes_began = time.perf_counter()
    batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]
    output, extra = _resolve_output(model, batches[0], cfg.output)
    batches = [{**b, **extra} for b in batches]
    targets_by_name = checkpoint_names(model)
    names = list(context.lossy)
    layer_of = _linear_layers(model, {n: targets_by_name.get(n, n) for n in names})
    wanted = {id(m) for m in layer_of.values()}
    layers = [m for _, m in model.named_modules() if id(m) in wanted]  # the model's order: most forwards stop early
    groups = gram_groups(layers, cfg.max_gram_bytes)
    memory = _GramMemory()
    # The whole pass: the targets, the first group's Grams and how often each layer runs per batch.
    targets, grams, calls = _collect(model, batches, output, groups[0] if groups else [], layers, memory)
    masks = [_mask(b, t) for b, t in zip(batches, targets)]
    # With more groups to collect, the model keeps the finetune's weights until they are.
    grouped = len(groups) > 1
    items = _prepare(context, model, owned, names, context.per_layer, device, install=not grouped)
    pairs = {it.name: (start.per_tensor or {}).get(it.name, (start.lam1, start.lam2)) for it in items}

    group_of = {id(m): g for g, group in enumerate(groups) for m in group}
    by_group: list[list[_Lossy]] = [[] for _ in groups]
    fits: dict[str, _Fitted] = {}
    for it in items:
        layer = layer_of.get(it.name)
        if layer is None:  # no linear layer's weight: fitted on the weights themselves
            fits[it.name] = _fit_code(it, *pairs[it.name], None, device)
        else:
            by_group[group_of[id(layer)]].append(it)
    with_inputs: set[int] = set()  # the layers that ran on the calibration inputs
    forwards = 0
    for g, group in enumerate(groups):
        if g:
            grams = {}  # freed before the next group's are collected
            _, grams, counts = _collect(model, batches, output, group, group, memory, calls)
            forwards += sum(1 for c in counts if c)
        with_inputs.update(grams)
        for it in by_group[g]:
            fits[it.name] = _fit_code(it, *pairs[it.name], grams.get(id(layer_of[it.name])), device)
    grams = {}
    if grouped:
        _install(context, model, owned, items, device)

    plain: dict[str, torch.Tensor] = {}
    fitted: dict[str, torch.Tensor] = {}
    codes: dict[str, dbms.MatrixCode] = {}
    error_before = error_after = 0.0
    refit = 0
    for it in items:  # in the tensors' order, whatever the groups': the same sums as in one group
        done = fits.pop(it.name)
        plain[it.name], fitted[it.name], codes[it.name] = done.plain, done.fitted, done.code
        if done.errors is not None:
            before, after = done.errors
            error_before += before
            error_after += after if done.refit else before
            refit += done.refit
    train = list(range(len(batches)))
    fixed_plain = _FixedCodes(model, items, batches, targets, masks, output, decoded=plain)
    fixed_fitted = _FixedCodes(model, items, batches, targets, masks, output, decoded=fitted)
    index_pairs = [pairs[it.name] for it in items] if context.per_layer else [(start.lam1, start.lam2)]
    loss_lambdas = _loss(fixed_plain, items, index_pairs)
    fit_lam1 = context.has_base and any(it.tau is not None for it in items)
    steps, lam1, lam2 = 0, start.lam1, start.lam2
    if context.per_layer:
        loss_fitted = _loss(fixed_fitted, items, index_pairs)
    else:  # one global pair: fit it again, now that the codes are fixed
        progress = _Progress(context.progress, cfg.max_steps)
        try:
            curve, best, best_step, steps, _ = _levenberg_marquardt(
                fixed_fitted, cfg, index_pairs, fit_lam1, train, [], progress)
        finally:
            progress.close()
        loss_fitted = curve[best_step][0] if curve else float("inf")
        lam1, lam2 = best[0][0], best[1][0]
    fell_back = not (refit and loss_fitted < loss_lambdas)
    record: dict[str, Any] = {
        "tuner": "fit-all", "per_layer": context.per_layer, "fell_back": fell_back,
        "reason": (None if not fell_back else "no code fitted below its encoded error" if not refit else
                   "the fitted codes did not lower the calibration loss"),
        "output": output, "loss": "mse", "judged_on": "calibration",
        "loss_initial": lambdas_record.get("loss_initial"), "loss_lambdas": loss_lambdas,
        "loss_final": loss_lambdas if fell_back else loss_fitted,
        "lam1_final": float(start.lam1 if fell_back else lam1), "lam2_final": float(start.lam2 if fell_back else lam2),
        "tensors_fitted": len(items), "tensors_refit": 0 if fell_back else refit,
        "tensors_with_inputs": sum(1 for m in layer_of.values() if id(m) in with_inputs),
        "grams": {"max_bytes": cfg.max_gram_bytes, "layers": len(layers), "groups": len(groups),
                  "peak_bytes": memory.peak, "forwards": forwards},
        "local_error": [error_before, error_after], "steps": steps, "device": str(device),
        "calibration": {**lambdas_record.get("calibration", {}),
                        "examples": sum(example_count(b) for b in batches)},
        "seconds_codes": round(time.perf_counter() - codes_began, 3),
        "seconds": round(time.perf_counter() - began, 3),
        "lambdas": lambdas_record,
    }
    if fell_back:  # step 1's answer: the pipeline encodes at its lam1, as after the dbms tuner
        return Lambdas(start.lam1, start.lam2, start.per_tensor, record)
    return Lambdas(float(lam1), float(lam2), start.per_tensor, record, codes=codes)


def _loss(problem: _Problem, items, pairs) -> float:
    """The calibration loss (mean squared output error) at the given lambda pairs."""
    device = items[0].w_pre.device if items else None
    with torch.no_grad():
        updates = [problem.update(it, torch.tensor(pairs[it.index][0], device=device),
                                  torch.tensor(pairs[it.index][1], device=device)) for it in items]
        return _squares(problem.residuals(problem.weights(updates), list(range(len(problem.batches)))))


__all__ = ["FitTuneConfig", "gram_groups", "input_grams", "tune"]
