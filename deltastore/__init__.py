"""deltastore: many finetunes of one pretrained model, stored as tiny compressed deltas.

Start with :class:`Registry`: ``Registry.init(path, reference)``, ``base build`` through
:meth:`Registry.build_base`, :meth:`Registry.commit`, :meth:`Registry.materialize`.
"""

from .errors import (AlreadyExistsError, CorruptObjectError, DeltastoreError, FormatVersionError,
                     IncompatibleFinetuneError, InvalidInputError, LockTimeoutError, NotFoundError,
                     UnknownMethodError)
from .registry import Registry, VersionStats, parse_spec

__version__ = "0.1.0"

__all__ = [
    "AlreadyExistsError", "CorruptObjectError", "DeltastoreError", "FormatVersionError",
    "IncompatibleFinetuneError", "InvalidInputError", "LockTimeoutError", "NotFoundError", "Registry",
    "UnknownMethodError", "VersionStats", "parse_spec", "__version__",
]
