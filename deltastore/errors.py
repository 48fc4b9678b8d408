"""One error hierarchy for everything a user can cause.

Every class derives from :class:`DeltastoreError` and also from the builtin exception a
caller would naturally catch (``FileNotFoundError``, ``ValueError``...), the way zarr's
errors do. Messages name the object, the expected and the found value, and what to do.
"""

from __future__ import annotations


class DeltastoreError(Exception):
    """Base class of every error deltastore raises on purpose."""


class InvalidInputError(DeltastoreError, ValueError):
    """An argument or an input file is malformed (bad name, NaN weights, pickle file...)."""


class BudgetTooSmallError(InvalidInputError):
    """A byte budget (``commit --max-bytes``/``--ratio``) below what the finetune can be stored
    in. ``needed``: the bytes it needs at least; ``parts``: those bytes by part (``deltas``, the
    codes at the cheapest settings, is absent when the budget fell short before any delta)."""

    def __init__(self, message: str, needed: int, parts: dict[str, int]):
        super().__init__(message)
        self.needed, self.parts = needed, parts


class UnknownNameError(DeltastoreError, ValueError):
    """A compressor or tuner name that is not registered."""


# The class's name before "method" stopped meaning compressor-or-tuner (README's glossary):
# the same class, so code that catches it keeps working.
UnknownMethodError = UnknownNameError


class NotFoundError(DeltastoreError, FileNotFoundError):
    """A registry, task, version, base vector or object that does not exist."""


class AlreadyExistsError(DeltastoreError, FileExistsError):
    """Creating something whose name is already taken."""


class IncompatibleFinetuneError(DeltastoreError, ValueError):
    """A finetune that does not match the reference (missing tensor, other shape or dtype)."""


class PluginError(DeltastoreError, ImportError):
    """An installed plugin (an entry point of a ``deltastore.*`` group) that cannot be used."""


class FormatVersionError(DeltastoreError, ValueError):
    """A registry or record written by a newer, incompatible format version."""


class CorruptObjectError(DeltastoreError, OSError):
    """Stored bytes that fail their content hash or cannot be decoded."""


class ConditionalWritesError(DeltastoreError, OSError):
    """An object store that does not honour create-only (``If-None-Match``) or compare-and-swap
    (``If-Match``) writes, without which two writers overwrite each other silently."""


class LockTimeoutError(DeltastoreError, TimeoutError):
    """Another process holds the registry lock for longer than we are willing to wait."""


class ObjectVanishedError(DeltastoreError, OSError):
    """An object a write on an object store named disappeared before its ref was published (a
    gc beside it): the write is run again from the start, and fails with this after 3 tries."""


class GraceExceededError(DeltastoreError, TimeoutError):
    """A write on an object store ran longer than half gc's grace period: publishing its ref
    then could name objects a gc has already deleted, so nothing is published."""
