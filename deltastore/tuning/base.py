"""What every tuner receives and returns: :class:`TuneContext` and :class:`Lambdas`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import torch

from ..tensor.compressors import Compressor

if TYPE_CHECKING:
    from ..sources import TensorSource
    from ..tensor.dbms import MatrixCode


@dataclass
class TuneContext:
    """What a tuner may look at. Tensors are fetched on demand, one at a time.

    ``lossy``: names (finetune names) of the tensors stored as DBMS deltas, with
    ``ref_name[name]`` their reference name. ``reference(name)`` / ``finetune(name)``: float32
    CPU tensors; ``tau(name)``: the base vector's float32 tensor for reference name, or None.
    ``lam1_l2``: the global closed-form lam1; ``lam1_l2_per_tensor``: the same per tensor.
    ``calibration``: model input dicts (or None); ``per_layer``: fit one pair per tensor.
    ``compressors``: per finetune name, the compressor of that tensor where it is not
    ``compressor`` (a budgeted commit picks one per tensor); see :meth:`compressor_for`.
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
    compressors: dict[str, Compressor] = field(default_factory=dict)

    def compressor_for(self, name: str) -> Compressor:
        """The compressor that stores lossy tensor ``name``."""
        return self.compressors.get(name, self.compressor)


@dataclass
class Lambdas:
    """The tuner's answer: global (lam1, lam2), optional per-tensor overrides, a record of how
    they were found (stored in the version's ``tuning`` field), and optionally the codes to
    store: per finetune name, a code the tuner encoded (and fitted) itself, which the commit
    writes as it is instead of encoding that tensor's residual."""

    lam1: float
    lam2: float
    per_tensor: dict[str, tuple[float, float]] | None = None
    record: dict[str, Any] = field(default_factory=dict)
    codes: "dict[str, MatrixCode] | None" = None


Tuner = Callable[[TuneContext], Lambdas]
