"""Tuners: the hook that picks (lam1, lam2) between encoding and writing a task version.

A tuner is any callable ``tuner(context: TuneContext) -> Lambdas``. Built in: ``l2``
(METHOD.md step 5, closed form, no data), ``dbms`` (METHOD.md step 6: the output error over
calibration inputs, :mod:`deltastore.tuning.dbms`) and ``fit-all`` (the lambdas and every
stored code's continuous part, :mod:`deltastore.tuning.fit`). Register more with
:func:`register` or the ``deltastore.tuners`` entry point group; pass a callable straight to
``Registry.commit``.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from ..errors import AlreadyExistsError, UnknownMethodError
from . import dbms, fit
from .base import Lambdas, TuneContext, Tuner
from .closed_form import l2

_REGISTRY: dict[str, Tuner] = {}


def register(name: str, tuner: Tuner) -> None:
    """Make ``tuner`` available as ``--tune name``; a name already taken is refused."""
    known = _REGISTRY.get(name)
    if known is not None and known is not tuner:
        raise AlreadyExistsError(f"tuner name {name!r} is already registered ({known!r}); pick another name")
    _REGISTRY[name] = tuner


def get_tuner(name_or_callable: str | Tuner) -> Tuner:
    if callable(name_or_callable):
        return name_or_callable
    if name_or_callable not in _REGISTRY:
        for ep in entry_points(group="deltastore.tuners"):
            if ep.name not in _REGISTRY:
                register(ep.name, ep.load())
    try:
        return _REGISTRY[name_or_callable]
    except KeyError:
        raise UnknownMethodError(
            f"unknown tuner {name_or_callable!r}; known tuners are {', '.join(sorted(_REGISTRY))}"
        ) from None


register("l2", l2)
register("dbms", dbms.tune)
register("fit-all", fit.tune)

__all__ = ["Lambdas", "TuneContext", "Tuner", "get_tuner", "l2", "register"]
