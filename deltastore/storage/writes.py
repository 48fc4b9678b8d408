"""How writers and gc keep out of each other's way (specs/format.md §9 invariant 4 and §9.2).

gc deletes what no ref reaches; a writer publishes objects first and its ref last, so in
between its objects are unreachable. Two ways to keep gc off them, one per kind of backend,
behind one interface (:class:`LockedWrites`, :class:`GraceWrites`), so that the operations
(registry.py, copy.py, integrity.py) have one code path for both:

- **A local folder** has ``flock``: every writer holds ``locks/registry`` shared for its whole
  operation and gc holds it exclusively, so gc never runs beside a writer and deletes at once
  (grace period 0 by default). Kept because it is exact and costs nothing; an object store
  cannot have it.
- **An object store** has no lock: gc deletes only objects unreachable *and* last written
  before its start minus a grace period, and announces itself with a lease key
  (``locks/gc-<id>``) while it deletes, for at most a quarter of the grace period (at least
  MIN_LEASE_S). A writer
  refreshes every object it reuses that is older than half the grace period (writes it again,
  same bytes), and before its ref update waits for the gc leases older than its last write,
  re-checks that every object it names is whole, and gives up if it has run for more than
  half the grace period. Why that is enough is spelled out in specs/format.md §9.2.

Ref updates are the same for both: compare-and-swap (``Backend.put_if_version``), retried.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, TypeVar

from ..errors import (DeltastoreError, GraceExceededError, InvalidInputError, LockTimeoutError, NotFoundError,
                      ObjectVanishedError)
from .locks import FileLocks

if TYPE_CHECKING:
    from .objects import ObjectStore
    from .protocol import Backend

T = TypeVar("T")

# The default grace period of gc on an object store: an operation that writes must publish its
# ref within half of it. An hour covers a commit of a 70B model on a slow link. Writers and gc
# of one registry must agree on it: the variable sets it for every process that reads it.
DEFAULT_GRACE_S = 3600.0
GRACE_VARIABLE = "DELTASTORE_GC_GRACE"
# What clocks may disagree by (writers, gc and the store; S3 keeps whole seconds). gc treats
# every object as this much younger than its Last-Modified says.
CLOCK_SLACK_S = 2.0
GC_LEASE_PREFIX = "locks/gc-"
# The keys of the conditional-writes probe (ObjectStoreBackend.check_conditional_writes), at the
# root of the registry: one is left behind only by a process killed while probing.
PROBE_PREFIX = ".probe-"
# An operation retried from the start when an object it named vanished (a gc that listed it
# before it was refreshed deleted it), before giving up.
MAX_ATTEMPTS = 3
MAX_REF_RETRIES = 1000  # each conflict means another writer's update landed: progress


class Attempt:
    """One try of a write operation: the objects it wrote or reused, and, on an object store,
    which objects it must refresh and until when it may publish."""

    def __init__(self, settle: Callable[["Attempt", Iterable[tuple[str, str]]], None] | None = None,
                 grace: float | None = None):
        self.started = time.time()
        # Objects last written before this are written again when reused (None: never needed).
        self.fresh_after = None if grace is None else self.started - grace / 2
        self.deadline = None if grace is None else self.started + grace / 2
        self.objects: set[tuple[str, str]] = set()
        self.checked: set[tuple[str, str]] = set()  # re-checked already (settle checks the rest)
        self._settle = settle

    def settle(self, extra: Iterable[tuple[str, str]] = ()) -> None:
        """Call right before a ref update that names the objects of this attempt (and ``extra``):
        on an object store, waits out any gc that may have listed them stale, re-checks that each
        is whole (ObjectVanishedError otherwise) and that the attempt is within its deadline."""
        if self._settle is not None:
            self._settle(self, extra)


class LockedWrites:
    """A local folder: the ``flock`` of storage/locks.py."""

    default_grace = 0.0  # gc holds the registry exclusively: nothing is in flight beside it

    def __init__(self, backend: "Backend", objects: "ObjectStore"):
        self.locks = FileLocks(backend.root)
        self.objects = objects

    def run(self, operation: Callable[[Attempt], T]) -> T:
        """Run a write ``operation`` under the shared registry lock."""
        with self.locks.hold("registry", shared=True):
            self.objects.attempt = Attempt()
            try:
                return operation(self.objects.attempt)
            finally:
                self.objects.attempt = None

    @contextmanager
    def collecting(self, grace: float) -> Iterator["Collection"]:
        with self.locks.hold("registry"):
            yield Collection(time.time(), grace, None)


def configured_grace() -> float:
    """The grace period writers and gc on an object store work with: ``$DELTASTORE_GC_GRACE``
    seconds, or DEFAULT_GRACE_S."""
    value = os.environ.get(GRACE_VARIABLE)
    if value is None:
        return DEFAULT_GRACE_S
    try:
        grace = float(value)
    except ValueError:
        grace = float("nan")
    if not grace > 0 or grace == float("inf"):
        raise InvalidInputError(f"{GRACE_VARIABLE}={value!r}: expected a number of seconds greater than 0")
    return grace


class GraceWrites:
    """An object store: no lock; the grace-period protocol of specs/format.md §9.2. ``grace``:
    the period this process's writes keep within, and the shortest its gc accepts."""

    def __init__(self, backend: "Backend", objects: "ObjectStore", grace: float | None = None):
        self.backend = backend
        self.objects = objects
        self._grace = grace
        self._probed = False

    @property
    def grace(self) -> float:
        """Read from the environment when first needed (a read-only command never needs it)."""
        if self._grace is None:
            self._grace = configured_grace()
        return self._grace

    @grace.setter
    def grace(self, seconds: float) -> None:
        self._grace = seconds

    @property
    def default_grace(self) -> float:
        return self.grace

    def run(self, operation: Callable[[Attempt], T]) -> T:
        """Run a write ``operation``, again from the start when an object it named vanished."""
        if not self._probed:  # conditional writes are checked before the first write (§9.2 rule 1)
            self.backend.check_conditional_writes()
            self._probed = True
        tries = 0
        while True:
            tries += 1
            self.objects.attempt = Attempt(self._settle, self.grace)
            try:
                return operation(self.objects.attempt)
            except ObjectVanishedError:
                if tries == MAX_ATTEMPTS:
                    raise
            finally:
                self.objects.attempt = None

    def _settle(self, attempt: Attempt, extra: Iterable[tuple[str, str]]) -> None:
        for kind, digest in extra:
            self.objects.keep(kind, digest)
        self._wait_for_gc()
        for obj in sorted(attempt.objects - attempt.checked):
            if not self.objects.complete(*obj):
                raise ObjectVanishedError(f"{self.backend.root}: {obj[0][:-1]} {obj[1][:12]} vanished before the ref "
                                          "naming it was published (a gc running beside this write)")
            attempt.checked.add(obj)
        if time.time() > attempt.deadline:
            raise GraceExceededError(
                f"{self.backend.root}: this write ran for {time.time() - attempt.started:.0f} s, more than half the gc "
                f"grace period ({self.grace:g} s): a gc may have deleted what it wrote, so nothing was published; "
                f"run it again (or set a longer {GRACE_VARIABLE} for every writer and gc of the registry)")

    def _wait_for_gc(self) -> None:
        """Until every gc lease taken before now has ended (its key deleted) or expired (the
        time it holds): a gc that listed the registry before this write refreshed its objects
        may still delete them."""
        for key in self.backend.list("locks"):
            if key.startswith(GC_LEASE_PREFIX):
                try:
                    expires = float(self.backend.get(key, limit=64)) + CLOCK_SLACK_S
                except NotFoundError:
                    continue  # that gc has ended
                except (ValueError, DeltastoreError):  # not a lease deltastore wrote: wait its longest
                    expires = time.time() + lease_length(self.grace)
                while time.time() < expires and self.backend.modified(key) is not None:
                    time.sleep(0.05)

    @contextmanager
    def collecting(self, grace: float) -> Iterator["Collection"]:
        """A gc lease: its key, holding the time gc stops deleting (a quarter of the grace
        period after it started), exists while gc deletes; writers wait for it until then."""
        if grace < self.grace:
            raise InvalidInputError(
                f"{self.backend.root}: gc grace period {grace:g} s is shorter than the one writers of this registry "
                f"work within ({self.grace:g} s, {GRACE_VARIABLE} or its default): gc could delete what a commit in "
                f"flight is about to name. Give a longer --grace, or set {GRACE_VARIABLE} alike for every writer "
                "and gc of the registry")
        started = time.time()
        deadline = started + lease_length(grace)
        lease = f"{GC_LEASE_PREFIX}{uuid.uuid4().hex}"
        self.backend.put(lease, repr(deadline).encode())
        try:
            yield Collection(started, grace, deadline)
        finally:
            self.backend.delete(lease)


MIN_LEASE_S = 5.0


def lease_length(grace: float) -> float:
    """How long a gc may delete after it started: a quarter of its grace period, at least
    MIN_LEASE_S. Writers wait for a gc's lease at most this long (a killed gc's lease expires),
    so it is kept well under the half grace period a write has to publish in."""
    return max(grace / 4, MIN_LEASE_S)


class Collection:
    """One gc run: when it started, what it may delete, until when."""

    def __init__(self, started: float, grace: float, deadline: float | None):
        self.started = started
        self.grace = grace
        self.deadline = deadline
        self.cutoff = started - grace - (CLOCK_SLACK_S if deadline is not None else 0.0)
        self.stopped = False

    def old(self, modified: float) -> bool:
        """Was a key last written before the grace period (so no writer in flight wrote it)?"""
        return modified < self.cutoff or (self.grace == 0 and self.deadline is None)

    def may_delete(self) -> bool:
        """Is this gc still within its lease (always, under a lock)?"""
        if self.deadline is not None and time.time() >= self.deadline:
            self.stopped = True
        return not self.stopped


def update_ref(backend: "Backend", key: str, change: Callable[[bytes | None], bytes]) -> None:
    """Replace ``key`` by ``change(current bytes or None)``, by compare-and-swap: when another
    writer updated it in between, read it again and redo the change (which may have side
    effects, such as writing the record the new ref names)."""
    for _ in range(MAX_REF_RETRIES):
        data, token = backend.get_versioned(key)
        if backend.put_if_version(key, change(data), token):
            return
        time.sleep(random.uniform(0.0, 0.02))  # spread the retries of writers that collided
    raise LockTimeoutError(f"{backend.root}: {key!r} changed under {MAX_REF_RETRIES} attempts to update it; "
                           "too many writers on one ref")
