"""The ``dbms`` tuner: fit (lam1, lam2) on calibration inputs (METHOD.md step 6; DBMS paper
eq. 8 and Algorithm 1).

It minimises the output error of the reconstructed model against the finetuned one,

    L(lam1, lam2) = sum_x || f(x; W'(lam1, lam2)) - f(x; W_t) ||^2  /  (number of output values)

with Adam, over one global pair or, with ``per_layer``, one pair per lossy tensor. For each
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

Each step is one pass over all calibration batches (a full-batch gradient): the loss it reports
is exact for the lambdas of that step, which makes the early stop and the final comparison with
the closed-form start exact as well. The lambdas returned are those of the lowest loss seen (on
the held-out batches when ``holdout`` is set); if that is the closed-form start itself, the
tuner falls back to it (``l2``) and records ``fell_back: true``.

The record (the version's ``tuning`` field, informative): ``tuner``, ``per_layer``,
``fell_back`` and ``reason``; ``lam1_initial``/``lam2_initial`` (the closed form) and
``lam1_final``/``lam2_final`` (the version's pair), with ``per_tensor_initial`` /
``per_tensor_final`` for per-layer fits; ``loss_initial``/``loss_final`` (mean squared error
of ``output`` on the data named by ``judged_on``) and the ``loss_curve``; ``steps`` taken,
``best_step``, ``max_steps``, ``lr``, ``patience``, ``min_delta``, ``optimizer``; ``seed`` (the
commit's), ``device``, ``dtype``, ``seconds``; ``calibration``: ``sha256`` of the inputs
(:func:`deltastore.calibration.calibration_sha256`), ``batches``, ``holdout_batches``,
``examples``; ``tensors_fitted``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch

from ..calibration import as_batches, calibration_sha256
from ..errors import IncompatibleFinetuneError, InvalidInputError
from ..tensor import dbms
from .base import Lambdas, TuneContext
from .closed_form import l2

OUTPUTS = ("auto", "logits", "hidden")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class DbmsTuneConfig:
    """Options of the ``dbms`` tuner (``tune_options`` of ``Registry.commit``).

    ``lr``: Adam's learning rate. Adam moves each parameter by about ``lr`` per step whatever
    the gradient's scale, and the lambdas are O(1) (the paper reports lam1 in [-0.1, 7], lam2 in
    [0.1, 1.5]), so 1e-2 lets them travel ~1 in 100 steps. The paper's 1e-4 suits its long runs
    over 10% of a test set on 7B-70B models; with 1e-4 and 100 steps they would barely move.
    ``max_steps``: most optimizer steps (each one full pass over the calibration batches).
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
                f"dbms tuner: option {field}={getattr(self, field)!r} is invalid; expected {expected}")

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

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "DbmsTuneConfig":
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise InvalidInputError(f"dbms tuner: unknown option(s) {unknown}; known options are {known}")
        return cls(**dict(options))


@dataclass
class _Lossy:
    """One fitted tensor: everything needed to rebuild its ``W'`` on the fit's device."""

    name: str            # the finetune's (the checkpoint's) name
    target: str          # the model's name for it (transformers may rename on load)
    index: int           # its lambda pair: 0 for a global fit, its position with per_layer
    shape: torch.Size
    w_pre: torch.Tensor  # (rows, cols) in the model's dtype; the model's slot shares it when we own it
    rows: torch.Tensor   # int64 (changed,): the changed rows m
    delta: torch.Tensor  # float32 (changed, cols): D[m]
    tau: torch.Tensor | None  # float32 (changed, cols): tau[m], None without a base vector
    seed: int


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
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        model.requires_grad_(False)  # only the lambdas are fitted
        model.eval()
        return _fit(context, cfg, start, model, owned, batches, digest, device, began)
    finally:
        if not owned:  # a caller's module goes back as it came
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
    from torch.func import functional_call

    per_layer = context.per_layer
    names = list(context.lossy)
    init = {n: (start.per_tensor[n] if start.per_tensor else (start.lam1, start.lam2)) for n in names}

    # Targets: the finetune's own outputs, computed before the lossy slots are swapped to W_pre.
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
    compressor = context.compressor

    pairs = [init[n] for n in names] if per_layer else [(start.lam1, start.lam2)]
    lam1 = torch.tensor([p[0] for p in pairs], dtype=torch.float32, device=device)
    lam2 = torch.tensor([p[1] for p in pairs], dtype=torch.float32, device=device)
    fit_lam1 = context.has_base and any(it.tau is not None for it in items)
    lam1.requires_grad_(fit_lam1)
    lam2.requires_grad_(True)
    optimizer = torch.optim.Adam([lam2, lam1] if fit_lam1 else [lam2], lr=cfg.lr)

    def rebuild(item: _Lossy) -> torch.Tensor:
        l1, l2_ = lam1[item.index], lam2[item.index]
        resid = item.delta if item.tau is None else item.delta - l1 * item.tau
        update = l2_ * compressor.simulate(resid, seed=item.seed)
        if item.tau is not None:
            update = update + l1 * item.tau
        return item.w_pre.index_add(0, item.rows, update.to(item.w_pre.dtype)).view(item.shape)

    def loss_over(group: list[int], backward: bool) -> float:
        """Mean squared output error over the batches in ``group``; with ``backward`` its
        gradient lands in lam1.grad / lam2.grad. W' is rebuilt once per call: the batches
        backpropagate into detached copies, whose gradients then flow back to the lambdas
        once (memory of one batch's activations, whatever the number of batches)."""
        count = sum(_count(targets[i], masks[i]) for i in group)
        with torch.set_grad_enabled(backward):
            rebuilt = {it.target: rebuild(it) for it in items}
        leaves = {n: w.detach().requires_grad_(backward) for n, w in rebuilt.items()}
        total = 0.0
        for i in group:
            with torch.set_grad_enabled(backward):
                out = _select(functional_call(model, leaves, args=(), kwargs=batches[i]), output)
                err = _squared_error(out, targets[i], masks[i]) / count
                if backward:
                    err.backward()
            total += float(err.detach())
        if backward:
            pairs = [(rebuilt[n], leaf.grad) for n, leaf in leaves.items() if leaf.grad is not None]
            if pairs:
                torch.autograd.backward([w for w, _ in pairs], [g for _, g in pairs])
        return total

    judged_on = "holdout" if held else "calibration"
    curve: list[float] = []
    best_loss, best_step = math.inf, 0
    best = (lam1.detach().clone(), lam2.detach().clone())
    reference_loss = math.inf  # last loss that counted as an improvement, for the patience
    stale = steps = 0
    reason = None
    progress = _progress_bar(context, cfg.max_steps)
    try:
        for step in range(cfg.max_steps + 1):
            optimizer.zero_grad(set_to_none=True)
            last = step == cfg.max_steps
            train_loss = loss_over(train, backward=not last and bool(items))
            loss = loss_over(held, backward=False) if held else train_loss
            if not math.isfinite(loss):
                reason = f"the loss became {loss} at step {step}"
                break
            curve.append(loss)
            if step == 0:
                initial_loss, initial_train = loss, train_loss
            if loss < best_loss:
                best_loss, best_step = loss, step
                best = (lam1.detach().clone(), lam2.detach().clone())
            if loss < reference_loss * (1 - cfg.min_delta):
                reference_loss, stale = loss, 0
            else:
                stale += 1
            progress.set_postfix(loss=f"{loss:.4g}", refresh=False)
            if last or stale >= cfg.patience or not items or loss == 0.0:
                break
            optimizer.step()
            steps += 1
            progress.update(1)
    finally:
        progress.close()

    if not curve:  # the closed form itself gave a non-finite loss
        raise InvalidInputError(f"dbms tuner: the model's output error at the closed-form lambdas is not finite "
                                f"({reason}); check the calibration inputs")
    fell_back = best_step == 0
    if fell_back and reason is None:
        reason = ("no tensor to fit: the finetune changed no lossy tensor" if not items else
                  "nothing to improve: the closed form already reproduces the outputs" if initial_loss == 0.0 else
                  f"no step improved on the closed-form start's {judged_on} loss")
    final1 = [float(v) for v in best[0].cpu()]
    final2 = [float(v) for v in best[1].cpu()]
    record: dict[str, Any] = {
        "tuner": "dbms", "per_layer": per_layer, "fell_back": fell_back, "reason": reason,
        "compressor": compressor.name, "output": output, "loss": "mse", "judged_on": judged_on,
        "loss_initial": initial_loss, "loss_final": initial_loss if fell_back else best_loss,
        "lam1_initial": float(start.lam1), "lam2_initial": float(start.lam2),
        "optimizer": "adam", "lr": float(cfg.lr), "max_steps": cfg.max_steps, "steps": steps,
        "best_step": best_step, "patience": cfg.patience, "min_delta": float(cfg.min_delta),
        "seed": int(context.seed), "device": str(device), "dtype": cfg.dtype,
        "calibration": {"sha256": digest, "batches": len(batches), "holdout_batches": len(held),
                        "examples": sum(_examples(b) for b in batches)},
        "tensors_fitted": len(items), "loss_curve": [float(f"{v:.6g}") for v in curve],
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


def _prepare(context: TuneContext, model: torch.nn.Module, owned: bool, names: list[str], per_layer: bool,
             device: torch.device) -> list[_Lossy]:
    """The fitted tensors, one at a time from the sources; an owned model's lossy slots are
    set to ``W_pre`` (the finetune's copies are dropped: the targets are already computed)."""
    from ..hf import checkpoint_names

    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers(remove_duplicate=False)))
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
        w_pre_fit = w_pre.to(device, slot.dtype)
        if owned:
            slot.data = w_pre_fit.view(slot.shape)
        items.append(_Lossy(name, target, index if per_layer else 0, slot.shape, w_pre_fit,
                            changed.nonzero().flatten().to(device), delta[changed].to(device), tau_rows,
                            context.seeds[name]))
    return items


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


def _examples(batch: Mapping[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    return 1


def _progress_bar(context: TuneContext, total: int):
    from tqdm.auto import tqdm

    # Same rule as the registry's bars: stderr, and only on a terminal unless asked for.
    show = sys.stderr.isatty() if context.progress is None else context.progress
    return tqdm(total=total, desc="tune dbms", unit="step", disable=not show, file=sys.stderr, leave=False)


__all__ = ["DbmsTuneConfig", "tune"]
