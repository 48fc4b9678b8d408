"""Compressors, registered by name.

Built-ins are registered by explicit calls below; third parties register theirs with
:func:`register` or through the ``deltastore.compressors`` entry point group.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from ...errors import AlreadyExistsError, PluginError, UnknownNameError
from ..fused import FusedDecoder
from .base import ARRAY_DTYPES, Compressor, CompressorConfig, Encoded

_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Register a compressor class under ``cls.name`` (usable as a class decorator); a name
    that is already taken by another class is refused."""
    known = _REGISTRY.get(cls.name)
    if known is not None and known is not cls:
        raise AlreadyExistsError(f"compressor name {cls.name!r} is already registered by "
                                 f"{known.__module__}.{known.__qualname__}; pick another name")
    _REGISTRY[cls.name] = cls
    return cls


def _load_entry_points() -> None:
    for ep in entry_points(group="deltastore.compressors"):
        known = _REGISTRY.get(ep.name)
        if known is not None and ep.value == f"{known.__module__}:{known.__qualname__}":
            continue  # loaded before; another class under a taken name is loaded, and refused by register
        where = f"entry point {ep.name} = {ep.value} (group deltastore.compressors" + (
            f", distribution {ep.dist.name})" if ep.dist is not None else ")")
        try:
            cls = ep.load()
        except Exception as exc:  # the plugin's own code failed: say which plugin, not a traceback from importlib
            raise PluginError(f"{where} failed to load: {type(exc).__name__}: {exc}; fix or uninstall "
                              "that distribution") from exc
        if getattr(cls, "name", None) != ep.name:
            # Lookups go by the entry point's name, registration by the class's: they must agree.
            raise PluginError(f"{where} loads {cls!r} named {getattr(cls, 'name', None)!r}, expected the "
                              f"entry point's name {ep.name!r}; make them the same")
        register(cls)


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
        raise UnknownNameError(
            f"unknown compressor {name!r}; known compressors are {', '.join(available())}"
        ) from None


def get_compressor(name: str, config: dict[str, Any] | None = None) -> Compressor:
    """Build compressor ``name`` from a configuration dict (the form stored in metadata)."""
    cls = compressor_class(name)
    return cls(cls.config_class.from_dict(config or {}))


def fused_decoder(compressor: Compressor) -> FusedDecoder | None:
    """The compressor's single-pass GPU decoder (deltastore.tensor.fused), or None: offering one
    (a ``fused_decoder()`` method) is optional, the reference ``decode`` is always there."""
    make = getattr(compressor, "fused_decoder", None)
    return make() if make is not None else None


def delta_compressors() -> list[str]:
    """Names of the compressors a task version's deltas may use (``commit(method=...)``),
    sorted: every registered one but :data:`WHOLE_TENSORS`, which stores whole tensors."""
    return [name for name in available() if name != WHOLE_TENSORS]


from . import bitdelta, dare, deltadq, lossless  # noqa: E402  (registration needs _REGISTRY)

for _module in (bitdelta, dare, deltadq, lossless):
    register(_module.COMPRESSOR)

# The engine names these two roles through the constants, never by the compressors' names:
# a commit's compressor when none is given, and the one for tensors stored whole (the
# reference, biases, task-own heads; specs/format.md §5.2).
DEFAULT_COMPRESSOR: str = bitdelta.COMPRESSOR.name
WHOLE_TENSORS: str = lossless.COMPRESSOR.name

__all__ = ["ARRAY_DTYPES", "DEFAULT_COMPRESSOR", "WHOLE_TENSORS", "Compressor", "CompressorConfig", "Encoded",
           "available", "compressor_class", "delta_compressors", "fused_decoder", "get_compressor", "register"]
