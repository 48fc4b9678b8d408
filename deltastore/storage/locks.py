"""Advisory locks of a registry on a local filesystem: ``flock`` on ``<root>/locks/<name>``.

Two locks exist (specs/format.md §9): ``registry``, held shared by every writer for its whole
operation and exclusively by gc (so nothing is in flight while gc decides what is
unreachable), and ``refs``, held around a read-modify-write of a ref.

Locks are not part of the :class:`~deltastore.storage.protocol.Backend` protocol: an object
store has none. Refs are updated by compare-and-swap on every backend
(``Backend.put_if_version``, which LocalBackend implements under ``refs``), and on an object
store gc's grace period takes the place of ``registry`` (storage/writes.py).
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import LockTimeoutError


class FileLocks:
    """The locks of the registry at ``root``.

    A ``flock`` belongs to an open file description: a thread that holds a lock and takes it
    again through another :meth:`hold` waits for itself (until ``timeout``)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"FileLocks({str(self.root)!r})"

    @contextmanager
    def hold(self, name: str, *, shared: bool = False, timeout: float = 600.0) -> Iterator[None]:
        """Hold lock ``name``, shared or exclusive; waits up to ``timeout`` seconds for it."""
        path = self.root / "locks" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise LockTimeoutError(
                            f"{self.root}: lock {name!r} is held by another process for over {timeout:.0f} s; "
                            "wait for it to finish, or check for a hung deltastore process"
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock
