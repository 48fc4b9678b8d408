"""Compressors, registered by name.

Built-ins are registered by explicit calls below; third parties register theirs with
:func:`register` or through the ``deltastore.compressors`` entry point group.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from ...errors import UnknownMethodError
from .base import ARRAY_DTYPES, Compressor, CompressorConfig, Encoded

_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Register a compressor class under ``cls.name`` (usable as a class decorator)."""
    _REGISTRY[cls.name] = cls
    return cls


def _load_entry_points() -> None:
    for ep in entry_points(group="deltastore.compressors"):
        if ep.name not in _REGISTRY:
            register(ep.load())


def available() -> list[str]:
    """Names of every registered compressor, sorted."""
    _load_entry_points()
    return sorted(_REGISTRY)


def compressor_class(name: str) -> type:
    if name not in _REGISTRY:
        _load_entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown compressor {name!r}; known compressors are {', '.join(available())}"
        ) from None


def get_compressor(name: str, config: dict[str, Any] | None = None) -> Compressor:
    """Build compressor ``name`` from a configuration dict (the form stored in metadata)."""
    cls = compressor_class(name)
    return cls(cls.config_class.from_dict(config or {}))


from . import bitdelta, dare, deltadq, lossless  # noqa: E402  (registration needs _REGISTRY)

for _module in (bitdelta, dare, deltadq, lossless):
    register(_module.COMPRESSOR)

__all__ = ["ARRAY_DTYPES", "Compressor", "CompressorConfig", "Encoded", "available", "compressor_class",
           "get_compressor", "register"]
