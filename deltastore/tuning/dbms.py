"""The ``dbms`` tuner: fit (lam1, lam2) on calibration inputs (METHOD.md step 6; DBMS paper
eq. 8 and Algorithm 1).

It minimises the output error of the reconstructed model against the finetuned one,

    L(lam1, lam2) = sum_x || f(x; W'(lam1, lam2)) - f(x; W_t) ||^2  /  (number of output values)

over one global pair (by Levenberg-Marquardt: two unknowns make it a small least-squares
problem, solved in a handful of passes over the inputs) or, with ``per_layer``, one pair per
lossy tensor (by Adam, the paper's optimizer). For each
lossy tensor, seen as a matrix with changed rows ``m`` (deltastore.tensor.dbms), the weights
are rebuilt at every step exactly as ``materialize`` will rebuild them, the residual being
re-compressed with the current lam1 (Algorithm 1):

    W'[m] = W_pre[m] + lam1 * tau[m] + lam2 * C(D[m] - lam1 * tau[m]),   W'[~m] = W_pre[~m]

``C`` is the compressor's ``simulate``: the same values as ``decode(encode(.))``, written so
gradients flow where the compressor is differentiable (a fixed DARE mask is linear; the
BitDelta scale mean|R| depends on lam1; quantization rounding is passed straight through).

The model is the finetune's own architecture, head included (a classifier finetune of a bare
encoder is run as the classifier), built from its config.json without random initialisation
(deltastore.hf). It is run with ``torch.func.functional_call``: the lossy tensors are replaced
by ``W'``, every other tensor is the finetune's own, exactly what the registry stores
losslessly. Frozen tensors never require grad. In memory: the model (lossy slots hold ``W_pre``
instead of ``W_t`` once the targets are computed) plus, per lossy tensor, its changed rows of
``D`` and ``tau``; tensors the finetune left unchanged are rebuilt exactly and are not fitted.

Each step is one pass over all calibration batches (no minibatches): the loss it reports is
exact for the lambdas of that step, which makes the early stop and the final comparison with
the closed-form start exact as well. The lambdas returned are those of the lowest loss seen (on
the held-out batches when ``holdout`` is set); if that is the closed-form start itself, the
tuner falls back to it (``l2``) and records ``fell_back: true``.

The record (the version's ``tuning`` field, informative): ``tuner``, ``per_layer``,
``fell_back`` and ``reason``; ``lam1_initial``/``lam2_initial`` (the closed form) and
``lam1_final``/``lam2_final`` (the version's pair), with ``per_tensor_initial`` /
``per_tensor_final`` for per-layer fits; ``loss_initial``/``loss_final`` (mean squared error
of ``output`` on the data named by ``judged_on``) and the ``loss_curve``; ``steps`` taken,
``best_step``, ``passes`` (forward passes over the calibration inputs: the fit's cost),
``max_steps``, ``lr``, ``patience``, ``min_delta``, ``optimizer``; ``seed`` (the commit's),
``device``, ``dtype``, ``seconds``; ``calibration``: ``sha256`` of the inputs
(:func:`deltastore.calibration.calibration_sha256`), ``batches``, ``holdout_batches``,
``examples``; ``tensors_fitted``.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Mapping

import torch

from ..calibration import as_batches, calibration_sha256, example_count
from ..errors import IncompatibleFinetuneError, InvalidInputError
from ..tensor import dbms
from ..tensor.compressors import Compressor
from .base import Lambdas, TuneContext
from .closed_form import l2

OUTPUTS = ("auto", "logits", "hidden")
DTYPES = ("float32", "bfloat16", "float16")
OPTIMIZERS = ("auto", "lm", "adam")
FD_STEP = 1e-2         # lambda step of the finite differences that give the Jacobian: lambdas are O(1),
                       # and the outputs of float32 models are smooth well below 1e-2 of a lambda
LM_DAMPING = 1e-3      # Levenberg-Marquardt's starting damping, relative to the Gauss-Newton diagonal
LM_REJECTS = 4         # stop after this many rejected steps in a row with a fresh Jacobian (damping x10 each)
LM_RADIUS = 0.25       # largest first change of a lambda: far from the optimum the linear model
                       # over-shoots (DARE at p=0.99 on the demo proposes +1.8); doubled after each
                       # kept step, quartered after each failed one
LM_TOLERANCE = 1e-2    # stop once a step gains, or is predicted to gain, less than 1% of the loss: each
                       # further step costs a full pass for less than that (BitDelta's sign flips make
                       # the tail slow), while the first steps take the loss 2-40x down
PLAIN_PROGRESS_EVERY = 5.0  # seconds between plain progress lines when stderr is not a terminal


@dataclass(frozen=True)
class DbmsTuneConfig:
    """Options of the ``dbms`` tuner (``tune_options`` of ``Registry.commit``).

    ``optimizer``: ``lm`` (Levenberg-Marquardt, the default for one global pair) or ``adam``
    (the paper's, and the only one for ``per_layer`` fits; ``auto`` picks). With two unknowns
    the output error is a small least-squares problem: LM takes the Jacobian of the outputs
    with respect to (lam1, lam2) by finite differences, and solves for the step; it converges in a handful of
    passes over the calibration inputs where Adam needs 60-100 passes of forward and backward
    (benchmarks/results/tune_cost_cpu.md). ``lr``, ``patience`` and ``min_delta`` are Adam's.
    ``lr``: Adam's learning rate. Adam moves each parameter by about ``lr`` per step whatever
    the gradient's scale, and the lambdas are O(1) (the paper reports lam1 in [-0.1, 7], lam2 in
    [0.1, 1.5]), so 1e-2 lets them travel ~1 in 100 steps. The paper's 1e-4 suits its long runs
    over 10% of a test set on 7B-70B models; with 1e-4 and 100 steps they would barely move.
    ``max_steps``: most optimizer steps (each one full pass over the calibration batches; an LM
    step that needs a new Jacobian makes one more pass per fitted lambda).
    ``patience``: stop after this many steps without the loss falling by ``min_delta``
    (relative). Not too small: the BitDelta gradient ignores the signs that flip as lam1
    moves (sign() has zero gradient), so on some finetunes the loss first rises for a while
    before it falls far below the start (seen on a tiny demo finetune: up for 30 steps, then 500x
    down by step 76); 20 bounds the waste when it never does, and the fall-back makes that
    harmless. ``output``: what is compared: ``logits``, ``hidden`` (last hidden state; the
    decoder's for encoder-decoders) or ``auto`` (logits when the model has them).
    ``holdout``: fraction of the calibration batches kept out of the gradient and used to pick
    the lambdas and to decide the fall-back (0: the calibration loss itself).
    ``device``: where to run (default: ``cuda`` when available, else ``cpu``). ``dtype``: the
    model's dtype during the fit (the lambdas and the rebuilt rows stay float32).
    ``model``: for finetunes without config.json (a state dict or bare .safetensors): a torch
    module holding the finetune's weights under the finetune's names, or a function returning
    one; used on its own device, its parameters are never changed.
    """

    tuner: ClassVar[str] = "dbms"  # names the tuner in error messages (fit-all extends these options)

    optimizer: str = "auto"
    lr: float = 1e-2
    max_steps: int = 100
    patience: int = 20
    min_delta: float = 1e-4
    output: str = "auto"
    holdout: float = 0.0
    device: str | None = None
    dtype: str = "float32"
    model: Any = None

    def __post_init__(self) -> None:
        def fail(field: str, expected: str) -> None:
            raise InvalidInputError(
                f"{self.tuner} tuner: option {field}={getattr(self, field)!r} is invalid; expected {expected}")

        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            fail("lr", "a positive number")
        if type(self.max_steps) is not int or self.max_steps < 0:
            fail("max_steps", "an integer >= 0")
        if type(self.patience) is not int or self.patience < 1:
            fail("patience", "an integer >= 1")
        if not (isinstance(self.min_delta, (int, float)) and 0 <= self.min_delta < 1):
            fail("min_delta", "a number in [0, 1)")
        if self.output not in OUTPUTS:
            fail("output", " or ".join(OUTPUTS))
        if not (isinstance(self.holdout, (int, float)) and 0 <= self.holdout < 1):
            fail("holdout", "a fraction in [0, 1)")
        if self.dtype not in DTYPES:
            fail("dtype", " or ".join(DTYPES))
        if self.optimizer not in OPTIMIZERS:
            fail("optimizer", " or ".join(OPTIMIZERS))

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "DbmsTuneConfig":
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise InvalidInputError(f"{cls.tuner} tuner: unknown option(s) {unknown}; known options are {known}")
        return cls(**dict(options))


@dataclass
class _Lossy:
    """One fitted tensor: everything needed to rebuild its ``W'`` on the fit's device."""

    name: str            # the finetune's (the checkpoint's) name
    target: str          # the model's name for it (transformers may rename on load)
    index: int           # its lambda pair: 0 for a global fit, its position with per_layer
    shape: torch.Size
    w_pre: torch.Tensor | None  # (rows, cols) in the model's dtype; the model's slot shares it when we own it
                                # (None between _prepare(install=False) and _install)
    rows: torch.Tensor   # int64 (changed,): the changed rows m
    delta: torch.Tensor  # float32 (changed, cols): D[m]
    tau: torch.Tensor | None  # float32 (changed, cols): tau[m], None without a base vector
    seed: int
    compressor: Compressor  # its own (a budgeted commit picks one per tensor)


def tune(context: TuneContext) -> Lambdas:
    """Fit (lam1, lam2) on ``context.calibration`` (see the module docstring); never worse than
    the closed form on the loss it is judged by."""
    cfg = DbmsTuneConfig.from_options(context.options)
    start = l2(context)
    began = time.perf_counter()
    batches = as_batches(context.calibration)
    digest = calibration_sha256(batches)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, owned = _load_model(context, cfg, device)
    _check_token_ids(model, batches)
    with frozen_eval(model, owned):  # only the lambdas are fitted
        return _fit(context, cfg, start, model, owned, batches, digest, device, began)


@contextmanager
def frozen_eval(model: torch.nn.Module, owned: bool):
    """``model`` in eval mode with no parameter requiring gradients, for a fit; a caller's
    module (``owned`` False) goes back as it came."""
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        model.requires_grad_(False)
        model.eval()
        yield model
    finally:
        if not owned:
            for p, flag in saved_flags:
                p.requires_grad_(flag)
            model.train(was_training)


def _check_token_ids(model: torch.nn.Module, batches: list[dict[str, Any]]) -> None:
    """Token ids outside the model's embedding would fail deep inside torch (an IndexError
    on the CPU, a device-side assert on CUDA): refuse them first, naming the batch."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    for i, batch in enumerate(batches):
        for key, value in batch.items():
            if key.endswith("input_ids") and isinstance(value, torch.Tensor) and value.numel():
                low, high = int(value.min()), int(value.max())
                if low < 0 or (vocab is not None and high >= vocab):
                    raise InvalidInputError(
                        f"calibration batch {i}: {key!r} holds token id {low if low < 0 else high}, outside the "
                        f"model's vocabulary (0..{vocab - 1 if vocab is not None else 'any'}); tokenize with the "
                        "finetune's own tokenizer")


def _load_model(context: TuneContext, cfg: DbmsTuneConfig, device: torch.device) -> tuple[torch.nn.Module, bool]:
    """(model, whether we own it): the caller's module, or one built from the finetune's
    config.json holding the finetune's tensors."""
    if cfg.model is not None:
        model = cfg.model if isinstance(cfg.model, torch.nn.Module) else cfg.model()
        if not isinstance(model, torch.nn.Module):
            raise InvalidInputError(f"dbms tuner: option model gave a {type(model).__name__}, not a torch module")
        return model, False
    source = context.source
    config_path = source.files.get("config.json") if source is not None else None
    if config_path is None:
        label = source.label if source is not None else "the finetune"
        raise InvalidInputError(
            f"{label}: the dbms tuner runs the finetune's model, but there is no config.json to build it from "
            "(committed from a state dict or a bare .safetensors file); commit its Hugging Face directory, or "
            "pass tune_options={'model': module} with a torch module holding the finetune's weights"
        )
    from ..hf import build_model

    dtype = getattr(torch, cfg.dtype)
    state = {}
    for name in source.names():
        tensor = source.get(name)
        state[name] = tensor.to(device, dtype) if tensor.is_floating_point() else tensor.to(device)
    model = build_model(config_path.read_bytes(), state, what=str(source.label), dtype=dtype)
    return model, True


def _fit(context: TuneContext, cfg: DbmsTuneConfig, start: Lambdas, model: torch.nn.Module, owned: bool,
         batches: list[dict[str, Any]], digest: str, device: torch.device, began: float) -> Lambdas:
    per_layer = context.per_layer
    optimizer = cfg.optimizer if cfg.optimizer != "auto" else "adam" if per_layer else "lm"
    if per_layer and optimizer == "lm":
        raise InvalidInputError("dbms tuner: option optimizer='lm' fits one global pair; per-layer fits use 'adam'")
    names = list(context.lossy)
    init = {n: (start.per_tensor[n] if start.per_tensor else (start.lam1, start.lam2)) for n in names}

    # Targets: the finetune's own outputs, computed once, before the lossy slots are swapped to W_pre.
    batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]
    n_hold = min(len(batches) - 1, math.ceil(cfg.holdout * len(batches))) if cfg.holdout else 0
    output, extra = _resolve_output(model, batches[0], cfg.output)
    batches = [{**b, **extra} for b in batches]
    with torch.no_grad():
        targets = [_select(model(**b), output).detach() for b in batches]
    masks = [_mask(b, t) for b, t in zip(batches, targets)]
    train = list(range(len(batches) - n_hold))
    held = list(range(len(batches) - n_hold, len(batches)))

    items = _prepare(context, model, owned, names, per_layer, device)
    fit = _Problem(model, items, batches, targets, masks, output)
    pairs = [init[n] for n in names] if per_layer else [(start.lam1, start.lam2)]
    fit_lam1 = context.has_base and any(it.tau is not None for it in items)
    progress = _Progress(context.progress, cfg.max_steps)
    try:
        run = _adam if optimizer == "adam" else _levenberg_marquardt
        curve, best, best_step, steps, reason = run(fit, cfg, pairs, fit_lam1, train, held, progress)
    finally:
        progress.close()

    judged_on = "holdout" if held else "calibration"
    if not curve:  # the closed form itself gave a non-finite loss
        raise InvalidInputError(f"dbms tuner: the model's output error at the closed-form lambdas is not finite "
                                f"({reason}); check the calibration inputs")
    initial_loss, initial_train = curve[0]
    best_loss = curve[best_step][0]
    fell_back = best_step == 0
    if fell_back and reason is None:
        reason = ("no tensor to fit: the finetune changed no lossy tensor" if not items else
                  "nothing to improve: the closed form already reproduces the outputs" if initial_loss == 0.0 else
                  f"no step improved on the closed-form start's {judged_on} loss")
    final1, final2 = best
    record: dict[str, Any] = {
        "tuner": "dbms", "per_layer": per_layer, "fell_back": fell_back, "reason": reason,
        "compressor": context.compressor.name, "output": output, "loss": "mse", "judged_on": judged_on,
        "loss_initial": initial_loss, "loss_final": initial_loss if fell_back else best_loss,
        "lam1_initial": float(start.lam1), "lam2_initial": float(start.lam2),
        "optimizer": optimizer, "lr": float(cfg.lr), "max_steps": cfg.max_steps, "steps": steps,
        "passes": round(fit.batch_passes / len(batches), 2), "best_step": best_step, "patience": cfg.patience,
        "min_delta": float(cfg.min_delta),
        "seed": int(context.seed), "device": str(device), "dtype": cfg.dtype,
        "calibration": {"sha256": digest, "batches": len(batches), "holdout_batches": len(held),
                        "examples": sum(example_count(b) for b in batches)},
        "tensors_fitted": len(items), "loss_curve": [float(f"{v:.6g}") for v, _ in curve],
    }
    if held:
        record["train_loss_initial"] = initial_train
    if fell_back:
        record.update(lam1_final=float(start.lam1), lam2_final=float(start.lam2))
        result = Lambdas(start.lam1, start.lam2, start.per_tensor, record)
    elif per_layer:
        fitted = {it.name: (final1[it.index], final2[it.index]) for it in items}
        per_tensor = {n: fitted.get(n, init[n]) for n in names}
        record.update(lam1_final=float(start.lam1), lam2_final=float(start.lam2))
        result = Lambdas(start.lam1, start.lam2, per_tensor, record)
    else:
        record.update(lam1_final=final1[0] if fit_lam1 else float(start.lam1), lam2_final=final2[0])
        result = Lambdas(record["lam1_final"], final2[0], None, record)
    if per_layer:
        record["per_tensor_initial"] = {n: list(init[n]) for n in names}
        record["per_tensor_final"] = {n: list(v) for n, v in (result.per_tensor or {}).items()}
    record["seconds"] = round(time.perf_counter() - began, 3)
    return result


# A fit's trace: (judged loss, training loss) per accepted point, the first being the closed form;
# the best lambdas (lam1 values, lam2 values); the index of the best point; steps taken; why it stopped.
Trace = tuple[list[tuple[float, float]], tuple[list[float], list[float]], int, int, "str | None"]


class _Problem:
    """The fitted outputs as a function of the lambdas: rebuilds ``W'`` exactly as
    ``materialize`` will, runs the model on it, and compares with the targets."""

    def __init__(self, model, items, batches, targets, masks, output):
        self.model, self.items = model, items
        self.batches, self.targets, self.masks, self.output = batches, targets, masks, output
        self.batch_passes = 0  # forward passes over one calibration batch

    def update(self, item: _Lossy, l1: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
        """float32 (changed, cols): what ``W'`` adds to ``W_pre`` on the changed rows."""
        resid = item.delta if item.tau is None else item.delta - l1 * item.tau
        update = l2 * item.compressor.simulate(resid, seed=item.seed)
        return update if item.tau is None else update + l1 * item.tau

    def weights(self, updates: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {it.target: it.w_pre.index_add(0, it.rows, u.to(it.w_pre.dtype)).view(it.shape)
                for it, u in zip(self.items, updates)}

    def count(self, group: list[int]) -> float:
        return sum(_count(self.targets[i], self.masks[i]) for i in group)

    def outputs(self, weights: dict[str, torch.Tensor], i: int) -> torch.Tensor:
        from torch.func import functional_call

        self.batch_passes += 1
        return _select(functional_call(self.model, weights, args=(), kwargs=self.batches[i]), self.output)

    def residuals(self, weights: dict[str, torch.Tensor], group: list[int]) -> list[torch.Tensor]:
        """Per batch, float32 flat: (output - target) weighted so that the sum of squares over the
        group is its mean squared error (padding weighs 0)."""
        scale = 1 / math.sqrt(self.count(group))
        out = []
        with torch.no_grad():
            for i in group:
                diff = self.outputs(weights, i).float() - self.targets[i].float()
                mask = self.masks[i]
                if mask is not None:
                    diff = diff * mask.reshape(mask.shape + (1,) * (diff.dim() - 2))
                out.append((diff * scale).flatten())
        return out


def _squares(residuals: list[torch.Tensor]) -> float:
    return sum(float(r.double().pow(2).sum()) for r in residuals)


def _levenberg_marquardt(fit: _Problem, cfg: DbmsTuneConfig, pairs, fit_lam1: bool, train: list[int],
                         held: list[int], progress: "_Progress") -> Trace:
    """One global (lam1, lam2) by Levenberg-Marquardt on the output residuals.

    Each step costs one pass over the calibration batches (the candidate's residuals); the
    Jacobian (columns: residual change per unit of each fitted lambda) is taken by forward
    differences (one pass per lambda), then kept up to date by Broyden's rank-one update and
    taken afresh only when a step fails. Steps are damped and bounded by a trust radius
    (LM_RADIUS); a step is kept only if it lowers the training loss, so the fit never ends
    above its start. It stops when a step gains, or by the linear model would gain, less than
    LM_TOLERANCE of the loss, after LM_REJECTS failed steps in a row, or at ``max_steps``."""
    theta = torch.tensor(pairs[0], dtype=torch.float64)  # (lam1, lam2)
    free = [0, 1] if fit_lam1 else [1]
    device = fit.items[0].w_pre.device if fit.items else None

    def lambdas(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor(float(t[0]), device=device), torch.tensor(float(t[1]), device=device))

    def evaluate(t: torch.Tensor, group: list[int] = train) -> list[torch.Tensor]:
        # float64 on the CPU, where theta lives: the small least-squares algebra of the step
        # runs there whatever device the model runs on.
        with torch.no_grad():
            updates = [fit.update(it, *lambdas(t)) for it in fit.items]
            return [r.double().cpu() for r in fit.residuals(fit.weights(updates), group)]

    def jacobian(t: torch.Tensor, resid: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per batch (n, len(free)): d residual / d lambda, by forward differences of the real
        rebuild (re-compression included: BitDelta's signs that flip as lam1 moves count, which
        the straight-through derivative misses)."""
        columns = []
        for k in free:
            moved = t.clone()
            moved[k] += FD_STEP
            shifted = evaluate(moved)
            columns.append([(s - r) / FD_STEP for s, r in zip(shifted, resid)])
        return [torch.stack(cols, dim=1).double() for cols in zip(*columns)]

    def judged(t: torch.Tensor, train_loss: float) -> float:
        return _squares(evaluate(t, held)) if held else train_loss

    resid = evaluate(theta)
    loss = _squares(resid)
    if not math.isfinite(loss):
        return [], ([], []), 0, 0, f"the loss became {loss} at step 0"
    curve = [(judged(theta, loss), loss)]
    best_step, best = 0, theta.clone()
    progress.update(0, curve[0][0])
    if not fit.items or loss == 0.0 or cfg.max_steps == 0:
        return curve, ([float(best[0])], [float(best[1])]), 0, 0, None
    jac, fresh = jacobian(theta, resid), True
    damping, radius, rejected, steps, reason = LM_DAMPING, LM_RADIUS, 0, 0, None
    while steps < cfg.max_steps:
        gradient = sum(j.T @ r.double() for j, r in zip(jac, resid))
        gauss_newton = sum(j.T @ j for j in jac)
        system = gauss_newton + damping * torch.diag(gauss_newton.diagonal().clamp_min(1e-30))
        step = torch.linalg.solve(system, -gradient)
        step = step * min(1.0, radius / float(step.abs().max().clamp_min(1e-30)))
        predicted = -(2 * gradient @ step + step @ gauss_newton @ step)  # the linear model's loss decrease
        if float(predicted) < LM_TOLERANCE * loss:
            break
        candidate = theta.clone()
        candidate[free] += step
        new_resid = evaluate(candidate)
        new_loss = _squares(new_resid)
        steps += 1
        if math.isfinite(new_loss) and new_loss < loss:
            # Broyden: correct the Jacobian by what the step showed, without new passes.
            change = [(n - r).double() for n, r in zip(new_resid, resid)]
            jac = [j + torch.outer(c - j @ step, step) / float(step @ step) for j, c in zip(jac, change)]
            improved = (loss - new_loss) / loss
            theta, resid, loss, fresh = candidate, new_resid, new_loss, False
            damping, radius, rejected = damping / 3, 2 * radius, 0
            curve.append((judged(theta, loss), loss))
            if curve[-1][0] < curve[best_step][0]:
                best_step, best = len(curve) - 1, theta.clone()
            progress.update(steps, curve[-1][0])
            if improved < LM_TOLERANCE or loss == 0.0:
                break
            continue
        damping, radius = damping * 10, float(step.abs().max()) / 4
        rejected = rejected + 1 if fresh else 1
        progress.update(steps, curve[-1][0])
        if rejected >= LM_REJECTS:
            break
        if not fresh:  # the step failed on an updated Jacobian: take it afresh here
            jac, fresh = jacobian(theta, resid), True
    return curve, ([float(best[0])], [float(best[1])]), best_step, steps, reason


def _adam(fit: _Problem, cfg: DbmsTuneConfig, pairs, fit_lam1: bool, train: list[int], held: list[int],
          progress: "_Progress") -> Trace:
    """The paper's Adam on the gradient of the output error (one or many lambda pairs)."""
    items = fit.items
    device = items[0].w_pre.device if items else None
    lam1 = torch.tensor([p[0] for p in pairs], dtype=torch.float32, device=device)
    lam2 = torch.tensor([p[1] for p in pairs], dtype=torch.float32, device=device)
    lam1.requires_grad_(fit_lam1)
    lam2.requires_grad_(True)
    optimizer = torch.optim.Adam([lam2, lam1] if fit_lam1 else [lam2], lr=cfg.lr)

    def loss_over(group: list[int], backward: bool) -> float:
        """Mean squared output error over the batches in ``group``; with ``backward`` its
        gradient lands in lam1.grad / lam2.grad. W' is rebuilt once per call: the batches
        backpropagate into detached copies, whose gradients then flow back to the lambdas
        once (memory of one batch's activations, whatever the number of batches)."""
        count = fit.count(group)
        with torch.set_grad_enabled(backward):
            rebuilt = fit.weights([fit.update(it, lam1[it.index], lam2[it.index]) for it in items])
        leaves = {n: w.detach().requires_grad_(backward) for n, w in rebuilt.items()}
        total = 0.0
        for i in group:
            with torch.set_grad_enabled(backward):
                err = _squared_error(fit.outputs(leaves, i), fit.targets[i], fit.masks[i]) / count
                if backward:
                    err.backward()
            total += float(err.detach())
        if backward:
            grads = [(rebuilt[n], leaf.grad) for n, leaf in leaves.items() if leaf.grad is not None]
            if grads:
                torch.autograd.backward([w for w, _ in grads], [g for _, g in grads])
        return total

    curve: list[tuple[float, float]] = []
    best_step = 0
    best = (lam1.detach().clone(), lam2.detach().clone())
    reference_loss = math.inf  # last loss that counted as an improvement, for the patience
    stale = steps = 0
    reason = None
    for step in range(cfg.max_steps + 1):
        optimizer.zero_grad(set_to_none=True)
        last = step == cfg.max_steps
        train_loss = loss_over(train, backward=not last and bool(items))
        loss = loss_over(held, backward=False) if held else train_loss
        if not math.isfinite(loss):
            reason = f"the loss became {loss} at step {step}"
            break
        curve.append((loss, train_loss))
        if loss < curve[best_step][0]:
            best_step = step
            best = (lam1.detach().clone(), lam2.detach().clone())
        if loss < reference_loss * (1 - cfg.min_delta):
            reference_loss, stale = loss, 0
        else:
            stale += 1
        progress.update(step, loss)
        if last or stale >= cfg.patience or not items or loss == 0.0:
            break
        optimizer.step()
        steps += 1
    return curve, ([float(v) for v in best[0].cpu()], [float(v) for v in best[1].cpu()]), best_step, steps, reason


def _prepare(context: TuneContext, model: torch.nn.Module, owned: bool, names: list[str], per_layer: bool,
             device: torch.device, install: bool = True) -> list[_Lossy]:
    """The fitted tensors, one at a time from the sources; an owned model's lossy slots are
    set to ``W_pre`` (the finetune's copies are dropped: the targets are already computed).
    With ``install`` False the model keeps the finetune's tensors and each item's ``w_pre`` is
    None until :func:`_install` (the fit-all tuner still runs the finetune to collect layer
    inputs; holding ``W_pre`` beside them meanwhile would double the model's memory)."""
    from ..hf import checkpoint_names

    params = _slots(model)
    targets = checkpoint_names(model)
    items = []
    seen: set[int] = set()
    for index, name in enumerate(names):
        target = targets.get(name, name)
        if target not in params:
            raise IncompatibleFinetuneError(
                f"dbms tuner: tensor {name!r} of the finetune is no tensor of the {type(model).__name__} built to "
                "run it (transformers converts it on load, or the checkpoint's names do not match the model's); "
                "commit with the l2 tuner"
            )
        slot = params[target]
        if id(slot) in seen:
            continue  # a tied copy the checkpoint also holds: the model uses one tensor for both
        seen.add(id(slot))
        ref_name = context.ref_name[name]
        w_pre = dbms.as_matrix(context.reference(ref_name))
        delta = dbms.as_matrix(context.finetune(name)) - w_pre
        changed = dbms.changed_rows(delta)
        if not bool(changed.any()):
            continue  # rebuilt exactly as W_pre = W_t whatever the lambdas
        tau = context.tau(ref_name)
        tau_rows = None if tau is None else dbms.as_matrix(tau)[changed].to(device)
        item = _Lossy(name, target, index if per_layer else 0, slot.shape, None,
                      changed.nonzero().flatten().to(device), delta[changed].to(device), tau_rows,
                      context.seeds[name], context.compressor_for(name))
        if install:
            _put(item, slot, w_pre, owned, device)
        items.append(item)
    return items


def _install(context: TuneContext, model: torch.nn.Module, owned: bool, items: list[_Lossy],
             device: torch.device) -> None:
    """Give items prepared with ``install=False`` their ``W_pre``, read again from the reference
    one tensor at a time, and set an owned model's slots to it."""
    params = _slots(model)
    for item in items:
        _put(item, params[item.target], dbms.as_matrix(context.reference(context.ref_name[item.name])), owned, device)


def _slots(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` by name, tied ones under each of their names."""
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers(remove_duplicate=False)))
    return params


def _put(item: _Lossy, slot: torch.Tensor, w_pre: torch.Tensor, owned: bool, device: torch.device) -> None:
    item.w_pre = w_pre.to(device, slot.dtype)
    if owned:
        slot.data = item.w_pre.view(slot.shape)


def _resolve_output(model: torch.nn.Module, batch: dict[str, Any], wanted: str) -> tuple[str, dict[str, Any]]:
    """("logits" | "hidden", extra keyword arguments the model needs to return it)."""
    with torch.no_grad():
        out = model(**batch)
    if isinstance(out, torch.Tensor):
        return "tensor", {}
    if wanted != "hidden" and _get(out, "logits") is not None:
        return "logits", {}
    if wanted == "logits":
        raise InvalidInputError(f"dbms tuner: {type(model).__name__} returns no logits; use output='hidden'")
    if _get(out, "last_hidden_state") is not None:
        return "hidden", {}
    return "hidden", {"output_hidden_states": True}


def _get(out: Any, key: str) -> Any:
    if isinstance(out, Mapping):
        return out.get(key)
    return getattr(out, key, None)


def _select(out: Any, output: str) -> torch.Tensor:
    """The compared output of one forward pass."""
    if output == "tensor":
        return out
    if output == "logits":
        return _get(out, "logits")
    last = _get(out, "last_hidden_state")
    if last is not None:
        return last
    for key in ("decoder_hidden_states", "hidden_states"):
        states = _get(out, key)
        if states:
            return states[-1]
    raise InvalidInputError("dbms tuner: the model returned neither logits nor hidden states")


def _mask(batch: Mapping[str, Any], target: torch.Tensor) -> torch.Tensor | None:
    """float (batch, seq) weights excluding padding, when the output is one value per token."""
    seq2seq = "decoder_input_ids" in batch or "labels" in batch
    mask = batch.get("decoder_attention_mask") if seq2seq else batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and target.dim() >= 2 and tuple(mask.shape) == tuple(target.shape[:2]):
        return mask.to(torch.float32)
    return None


def _count(target: torch.Tensor, mask: torch.Tensor | None) -> float:
    per_token = target[0, 0].numel() if target.dim() >= 2 else 1
    return float(mask.sum()) * per_token if mask is not None else float(target.numel())


def _squared_error(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    diff = (out.float() - target.float()).pow(2)
    if mask is not None:
        diff = diff * mask.reshape(mask.shape + (1,) * (diff.dim() - 2))
    return diff.sum()


class _Progress:
    """The fit's progress on stderr: a bar on a terminal, else a plain line every
    PLAIN_PROGRESS_EVERY seconds (logs, CI, notebooks); ``enabled=False`` silences it. Steps
    are counted against ``max_steps``, a bound: the fit usually stops far sooner, when the loss
    stops falling, so the time left shown is an upper bound."""

    def __init__(self, enabled: bool | None, max_steps: int):
        self.enabled, self.max_steps = enabled is not False, max_steps
        self.began = self.last_line = time.perf_counter()
        self.bar = None
        if self.enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=max_steps, desc="tune dbms", unit="step", file=sys.stderr, leave=False)

    def update(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4g}")
            return
        now = time.perf_counter()
        if not self.enabled or now - self.last_line < PLAIN_PROGRESS_EVERY:
            return
        self.last_line = now
        elapsed = now - self.began
        left = f", at most {elapsed / step * (self.max_steps - step):.0f} s left" if step else ""
        print(f"tune dbms: step {step}/{self.max_steps} (stops early once the loss stops falling), "
              f"loss {loss:.4g}, {elapsed:.0f} s{left}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


__all__ = ["DbmsTuneConfig", "tune"]
