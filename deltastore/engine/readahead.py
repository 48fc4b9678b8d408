"""Ordered read-ahead: worker threads produce the next items' inputs while the caller works.

Used by streaming materialize (arrays of the next tensors) and by commit (the next reference
and finetune tensors). The byte budget bounds what is read but not yet consumed, so memory
stays a few tensors whatever the model; reads release the GIL (file reads, zstd, sha256), so
the threads run in parallel.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    return max(2, min(16, os.cpu_count() or 2))


def read_ahead(read: Callable[[T], R], items: Iterable[T], *, nbytes: Callable[[T], int], budget: int,
               workers: int | None = None, name: str = "deltastore-read") -> Iterator[tuple[T, R]]:
    """``(item, read(item))`` in the order of ``items``; ``read`` runs in ``workers`` threads,
    with at most ``budget`` bytes (by ``nbytes``) read ahead, and always at least one item.
    An exception from ``read`` is raised when its item's turn comes; closing the iterator
    cancels what has not started."""
    with ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix=name) as pool:
        pending: deque = deque()
        upcoming = iter(items)
        in_flight = 0
        nxt = next(upcoming, None)
        try:
            while True:
                while nxt is not None and (not pending or in_flight + nbytes(nxt) <= budget):
                    pending.append((nxt, pool.submit(read, nxt)))
                    in_flight += nbytes(nxt)
                    nxt = next(upcoming, None)
                if not pending:
                    return
                item, future = pending.popleft()
                result = future.result()
                in_flight -= nbytes(item)
                yield item, result
        finally:
            for _, future in pending:
                future.cancel()
