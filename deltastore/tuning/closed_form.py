"""The ``l2`` tuner: closed-form lambdas, no data (METHOD.md step 5)."""

from __future__ import annotations

from .base import Lambdas, TuneContext


def l2(context: TuneContext) -> Lambdas:
    """Closed form: ``lam1 = <D, tau>/<tau, tau>``, ``lam2 = 1`` (METHOD.md step 5)."""
    per_tensor = None
    if context.per_layer and context.has_base:
        per_tensor = {name: (context.lam1_l2_per_tensor[name], 1.0) for name in context.lossy}
    lam1 = context.lam1_l2 if context.has_base else 0.0
    return Lambdas(lam1, 1.0, per_tensor, {"tuner": "l2", "per_layer": per_tensor is not None})
