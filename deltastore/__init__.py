"""deltastore: many finetunes of one pretrained model, stored as tiny compressed deltas.

Start with :class:`Registry`: ``Registry.init(path, reference)``, ``base build`` through
:meth:`Registry.build_base`, :meth:`Registry.commit`, :meth:`Registry.materialize`.
"""

from .errors import (AlreadyExistsError, BudgetTooSmallError, CorruptObjectError, DeltastoreError,
                     FormatVersionError, IncompatibleFinetuneError, InvalidInputError, LockTimeoutError,
                     NotFoundError, PluginError, UnknownMethodError, UnknownNameError)

__version__ = "0.1.0"

__all__ = [
    "AlreadyExistsError", "BudgetTooSmallError", "CorruptObjectError", "DeltastoreError", "FormatVersionError",
    "IncompatibleFinetuneError", "InvalidInputError", "LockTimeoutError", "NotFoundError", "PluginError", "Registry",
    "UnknownMethodError", "UnknownNameError", "VersionStats", "parse_spec", "__version__",
]


def __getattr__(name: str):
    # Registry imports torch (about 2 s); a program that only reads refs and records
    # (``deltastore ls``, deltastore.catalog) never pays for it.
    if name == "Registry":
        from .registry import Registry

        return Registry
    if name in ("VersionStats", "parse_spec"):
        from . import catalog

        return getattr(catalog, name)
    raise AttributeError(f"module 'deltastore' has no attribute {name!r}")
