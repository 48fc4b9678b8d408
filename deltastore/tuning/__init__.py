"""Tuners: the hook that picks (lam1, lam2) between encoding and writing a task version.

A tuner is any callable ``tuner(context: TuneContext) -> Lambdas``. Built in: ``l2``
(METHOD.md step 5, closed form, no data) and ``dbms`` (METHOD.md step 6: Adam on the output
error over calibration inputs, :mod:`deltastore.tuning.dbms`). Register more with
:func:`register` or the ``deltastore.tuners`` entry point group; pass a callable straight to
``Registry.commit``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import torch

from ..errors import UnknownMethodError
from ..tensor.compressors import Compressor

if TYPE_CHECKING:
    from ..sources import TensorSource


@dataclass
class TuneContext:
    """What a tuner may look at. Tensors are fetched on demand, one at a time.

    ``lossy``: names (finetune names) of the tensors stored as DBMS deltas, with
    ``ref_name[name]`` their reference name. ``reference(name)`` / ``finetune(name)``: float32
    CPU tensors; ``tau(name)``: the base vector's float32 tensor for reference name, or None.
    ``lam1_l2``: the global closed-form lam1; ``lam1_l2_per_tensor``: the same per tensor.
    ``calibration``: model input dicts (or None); ``per_layer``: fit one pair per tensor.
    ``source``: the finetune itself (every tensor in its own dtype, and its side files such as
    config.json, from which a data-driven tuner builds the model); ``seed``: the commit's seed
    (the per-tensor ``seeds`` derive from it); ``progress``: show progress (None: on a terminal).
    """

    compressor: Compressor
    lossy: list[str]
    ref_name: dict[str, str]
    reference: Callable[[str], torch.Tensor]
    finetune: Callable[[str], torch.Tensor]
    tau: Callable[[str], torch.Tensor | None]
    seeds: dict[str, int]
    lam1_l2: float
    lam1_l2_per_tensor: dict[str, float]
    has_base: bool
    calibration: Iterable[Mapping[str, Any]] | None = None
    per_layer: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    source: "TensorSource | None" = None
    seed: int = 0
    progress: bool | None = None


@dataclass
class Lambdas:
    """The tuner's answer: global (lam1, lam2), optional per-tensor overrides, and a record
    of how they were found (stored in the version's ``tuning`` field)."""

    lam1: float
    lam2: float
    per_tensor: dict[str, tuple[float, float]] | None = None
    record: dict[str, Any] = field(default_factory=dict)


Tuner = Callable[[TuneContext], Lambdas]


def l2(context: TuneContext) -> Lambdas:
    """Closed form: ``lam1 = <D, tau>/<tau, tau>``, ``lam2 = 1`` (METHOD.md step 5)."""
    per_tensor = None
    if context.per_layer and context.has_base:
        per_tensor = {name: (context.lam1_l2_per_tensor[name], 1.0) for name in context.lossy}
    lam1 = context.lam1_l2 if context.has_base else 0.0
    return Lambdas(lam1, 1.0, per_tensor, {"tuner": "l2", "per_layer": per_tensor is not None})


_REGISTRY: dict[str, Tuner] = {"l2": l2}


def register(name: str, tuner: Tuner) -> None:
    """Make ``tuner`` available as ``--tune name``."""
    _REGISTRY[name] = tuner


def get_tuner(name_or_callable: str | Tuner) -> Tuner:
    if callable(name_or_callable):
        return name_or_callable
    if name_or_callable not in _REGISTRY:
        for ep in entry_points(group="deltastore.tuners"):
            _REGISTRY.setdefault(ep.name, ep.load())
    try:
        return _REGISTRY[name_or_callable]
    except KeyError:
        raise UnknownMethodError(
            f"unknown tuner {name_or_callable!r}; known tuners are {', '.join(sorted(_REGISTRY))}"
        ) from None


from . import dbms as _dbms  # noqa: E402  (it imports TuneContext, Lambdas and l2 from here)

register("dbms", _dbms.tune)
