"""The ``Backend`` protocol: where a registry's bytes live, as keys.

A key is a ``/``-separated path relative to the registry (``refs/tasks/qa``,
``objects/arrays/ab/cdef.../0``); a *prefix* is a key's leading folders (``objects/arrays``).
Everything above this layer (objects.py, layout.py, the catalog, the registry) reaches the
bytes only through these operations, so a new place to keep a registry (an object store) is
one new class, tested by subclassing ``tests/storage/conformance.py:BackendTests``.

What a backend MUST provide to keep docs/guarantees.md and specs/format.md §9:

- **Whole, bounded reads** (:meth:`get`): a key larger than ``limit`` is refused before its
  bytes are read; only regular data is read (never a fifo, a device, a link out of the
  registry); a missing key raises :class:`~deltastore.errors.NotFoundError` naming it.
- **Ranged reads** (:meth:`get_into`) into the caller's buffer, so a chunk lands in pinned
  staging memory without another host copy.
- **Reads ahead where a request has latency** (:meth:`fetch`): an object store starts many
  reads at once, so a reader asks for the next chunk files before it needs them; a local
  folder answers None and is read in place, where a read costs no round trip.
- **Atomic writes**: :meth:`put` replaces a key whole (a reader sees the old or the new bytes,
  never a mix, and never a torn file after a power cut); :meth:`put_if_absent` does the same
  only when the key does not exist; :meth:`publish` moves a staged key or prefix (a whole
  array) to its final place whole or not at all, durable before it is visible.
- **Compare-and-swap** (:meth:`get_versioned`, :meth:`put_if_version`): a ref's
  read-modify-write without a lock. An object store uses its ETag and ``If-Match``.
- **Modification times** (:meth:`modified`, :meth:`list_modified`): when a key was last
  written, as the store records it (seconds since the epoch). gc on an object store keeps
  what was written within its grace period (specs/format.md §9.2), and a writer refreshes
  an object it reuses when it is older than that.
- **Damage is raised, never read as absence**: where a backend has folders, a non-folder in
  a folder's place makes :meth:`children`, :meth:`list` and :meth:`prefix_exists` raise
  :class:`~deltastore.errors.CorruptObjectError` (gc would otherwise delete what it protects).

Locks are not part of the protocol (an object store has none): how writers and gc keep out of
each other's way on each kind of backend is ``storage/writes.py``.

Why a ``typing.Protocol`` and not an ABC: the backends share no code to inherit (a local
folder and an object store do every operation differently), so the protocol is a contract
checked by the type checker and by the shared conformance tests, not a base class.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from concurrent.futures import Future

    from zarr.abc.store import Store

# Whole-key objects (records, refs, blobs) are small: side files are capped at 64 MiB when
# committed and records at 64 MiB when read. Reading more than this is a damaged or hostile
# file, refused before the bytes are read.
MAX_KEY_BYTES = 64 << 20


class Backend(Protocol):
    """Where the keys of one registry live (see the module docstring for the guarantees)."""

    @property
    def root(self) -> str | os.PathLike:
        """Where the registry is, as error messages name it (a folder, a bucket URL)."""

    # -- reading ----------------------------------------------------------------------------
    def get(self, key: str, *, limit: int = MAX_KEY_BYTES) -> bytes:
        """The bytes of ``key``; more than ``limit`` bytes is CorruptObjectError, raised before
        reading; a missing key is NotFoundError."""

    def get_into(self, key: str, out: memoryview, *, start: int = 0) -> int:
        """Read bytes ``[start, start + len(out))`` of ``key`` into ``out``; return how many were
        read (fewer only where the key ends). A missing key is NotFoundError."""

    def fetch(self, key: str, *, limit: int) -> Future | None:
        """Start reading the first ``limit`` bytes of ``key`` in the background: a future of
        ``(those bytes as a buffer, the key's full size)``, or NotFoundError; None where reading
        ahead gains nothing (a local folder), and the caller reads with :meth:`get_into`."""

    def get_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        """``(bytes, version token)`` of ``key``, ``(None, None)`` when absent; the token is what
        :meth:`put_if_version` compares (an ETag; for a local file, its content hash)."""

    def exists(self, key: str) -> bool:
        """Is there a key, or anything under a prefix, named ``key``?"""

    def size(self, key: str) -> int:
        """Bytes of ``key``, or of every key under a prefix; 0 when nothing is there."""

    def modified(self, key: str) -> float | None:
        """When ``key`` was last written (the newest key under a prefix), in seconds since the
        epoch; None when nothing is there."""

    # -- listing ----------------------------------------------------------------------------
    def list(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (at any depth), sorted."""

    def list_modified(self, prefix: str) -> list[tuple[str, float]]:
        """``(key, last written)`` of every key under ``prefix``, sorted by key: one listing,
        what gc needs to tell old garbage from what a writer elsewhere has just written."""

    def children(self, prefix: str) -> list[str]:
        """Names of the entries directly under ``prefix`` (keys and sub-prefixes), sorted."""

    def prefix_exists(self, prefix: str) -> bool:
        """Is ``prefix`` there (an existing folder; for an object store, any key under it)?"""

    # -- writing ----------------------------------------------------------------------------
    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` under ``key`` atomically, replacing what was there."""

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Write ``data`` under ``key`` atomically unless the key exists; True when written."""

    def put_if_version(self, key: str, data: bytes, version: str | None) -> bool:
        """Write ``data`` under ``key`` atomically only if its version token is still
        ``version`` (None: only if absent); True when written, False when another writer got
        there first (read again, redo the change, retry)."""

    def publish(self, staged: str, final: str) -> bool:
        """Move a completely written staged key or prefix to ``final``, durably, whole or not at
        all. False when ``final`` already exists (same name, same content): the staged copy is
        dropped."""

    def delete(self, key: str) -> None:
        """Remove a key or everything under a prefix; nothing there is fine. A prefix never
        ends half-deleted under its own name (a killed delete leaves debris for gc elsewhere)."""

    def zarr_store(self, prefix: str) -> Store:
        """A zarr store rooted at ``prefix``, through which layout.write_array writes an array
        (reads bypass zarr: see storage/layout.py)."""
