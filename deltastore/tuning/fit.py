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

Memory: the finetune's model, one Gram matrix ``in x in`` (float64) per distinct input of a
fitted linear layer (q, k and v of a layer share one), and per lossy tensor its changed rows of
``D`` and ``tau`` (as the ``dbms`` tuner) plus its decoded code. On MiniLM: 6 layers x
(3 x 384^2 + 1536^2) doubles, 135 MB. For a 7B decoder the Grams alone would be about 10 GB of
float64: bounded per model, not per layer; fitting layer by layer is not implemented.

Options (``tune_options``): those of the ``dbms`` tuner (:class:`deltastore.tuning.DbmsTuneConfig`).

The record (the version's ``tuning`` field): ``tuner`` (``fit-all``), ``fell_back``,
``reason``, ``loss_initial`` (closed-form lambdas, plain codes), ``loss_lambdas`` (after step
1), ``loss_final`` (the version's), ``lam1_final``/``lam2_final``, ``tensors_fitted``,
``tensors_refit`` (whose fitted code was kept), ``tensors_with_inputs`` (fitted on a linear
layer's inputs), ``local_error`` (sum over tensors of the squared error before and after
refitting, each relative to the error of zero), ``steps``, ``seconds``, ``seconds_codes``,
``device``, ``calibration``, and ``lambdas``: step 1's own ``dbms`` record.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..calibration import as_batches, example_count
from ..tensor import dbms
from ..tensor import lsq
from .dbms import (DbmsTuneConfig, _levenberg_marquardt, frozen_eval, _load_model, _mask, _prepare, _Problem, _Progress,
                   _resolve_output, _select, _squares)
from .dbms import tune as tune_lambdas
from .base import Lambdas, TuneContext


class _FixedCodes(_Problem):
    """The outputs as a function of (lam1, lam2) for codes already encoded: no re-compression."""

    def __init__(self, *args, decoded: dict[str, torch.Tensor]):
        super().__init__(*args)
        self.decoded = decoded

    def update(self, item, l1: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
        update = l2 * self.decoded[item.name]
        return update if item.tau is None else update + l1 * item.tau


def _input_grams(model: torch.nn.Module, names: dict[str, str], batches: list[dict[str, Any]],
                 output: str) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """The model's outputs on every batch and, per finetune name in ``names`` (finetune name ->
    the model's parameter name) that is a ``torch.nn.Linear``'s weight, ``G = X^T X`` (float64)
    over its inputs, padding excluded; one Gram per module shared by its names."""
    modules: dict[str, torch.nn.Module] = {}
    for name, target in names.items():
        owner, _, leaf = target.rpartition(".")
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            continue
        if leaf == "weight" and isinstance(module, torch.nn.Linear):
            modules[name] = module
    grams: dict[int, torch.Tensor] = {}
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(module: torch.nn.Module, args: tuple) -> None:
        x = args[0].detach()
        mask = current["mask"]
        if mask is not None and tuple(mask.shape) == tuple(x.shape[:2]):
            x = x[mask.bool()]
        x = x.reshape(-1, x.shape[-1]).double()
        gram = grams.get(id(module))
        grams[id(module)] = x.T @ x if gram is None else gram.add_(x.T @ x)

    handles = [m.register_forward_pre_hook(hook) for m in {id(m): m for m in modules.values()}.values()]
    try:
        outputs = []
        with torch.no_grad():
            for batch in batches:
                current["mask"] = batch.get("attention_mask")
                outputs.append(_select(model(**batch), output).detach())
    finally:
        for handle in handles:
            handle.remove()
    return outputs, {name: grams[id(m)] for name, m in modules.items() if id(m) in grams}


def tune(context: TuneContext) -> Lambdas:
    """Fit the lambdas, then every stored code's continuous part, then the lambdas again (see
    the module docstring); never worse than the ``dbms`` tuner's answer on the calibration loss."""
    began = time.perf_counter()
    start = tune_lambdas(context)
    lambdas_record = start.record
    cfg = DbmsTuneConfig.from_options(context.options)
    batches = as_batches(context.calibration)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, owned = _load_model(context, cfg, device)
    with frozen_eval(model, owned):
        return _fit_codes(context, cfg, start, model, owned, batches, device, began, lambdas_record)


def _fit_codes(context: TuneContext, cfg: DbmsTuneConfig, start: Lambdas, model: torch.nn.Module, owned: bool,
               batches: list[dict[str, Any]], device: torch.device, began: float,
               lambdas_record: dict[str, Any]) -> Lambdas:
    from ..hf import checkpoint_names

    codes_began = time.perf_counter()
    batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]
    output, extra = _resolve_output(model, batches[0], cfg.output)
    batches = [{**b, **extra} for b in batches]
    targets_by_name = checkpoint_names(model)
    names = list(context.lossy)
    targets, grams = _input_grams(model, {n: targets_by_name.get(n, n) for n in names}, batches, output)
    masks = [_mask(b, t) for b, t in zip(batches, targets)]
    items = _prepare(context, model, owned, names, context.per_layer, device)
    pairs = {it.name: (start.per_tensor or {}).get(it.name, (start.lam1, start.lam2)) for it in items}

    plain: dict[str, torch.Tensor] = {}
    fitted: dict[str, torch.Tensor] = {}
    codes: dict[str, dbms.MatrixCode] = {}
    error_before = error_after = 0.0
    refit = 0
    for it in items:
        compressor = it.compressor
        lam1, lam2 = pairs[it.name]
        resid = dbms.residual(it.delta, it.tau, lam1)
        encoded = compressor.encode(resid.contiguous(), seed=it.seed)
        shape = tuple(resid.shape)
        plain[it.name] = compressor.decode(encoded, shape, device)
        fitted[it.name] = plain[it.name]
        rows = torch.zeros(it.w_pre.shape[0], dtype=torch.bool, device=it.rows.device)
        rows[it.rows] = True
        # Every fitted tensor's code is returned, fitted or not: it was encoded at the lam1 of
        # step 1, which step 3 may move; the pipeline must store this code, not encode anew.
        codes[it.name] = dbms.MatrixCode(rows, encoded)
        fit_code = getattr(compressor, "refit", None)
        if fit_code is None or lam2 == 0:
            continue
        target = resid / lam2  # lam2 * C should be the residual
        gram = lsq.damped(grams.get(it.name))
        candidate = fit_code(encoded, target, gram)
        decoded = compressor.decode(candidate, shape, device)
        scale = lsq.error(torch.zeros_like(target), target, gram) or 1.0
        before, after = lsq.error(plain[it.name], target, gram) / scale, lsq.error(decoded, target, gram) / scale
        error_before += before
        if after < before:
            fitted[it.name], refit = decoded, refit + 1
            codes[it.name] = dbms.MatrixCode(rows, candidate)
            error_after += after
        else:
            error_after += before
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
        "tensors_fitted": len(items), "tensors_refit": 0 if fell_back else refit, "tensors_with_inputs": len(grams),
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


__all__ = ["tune"]
