"""Streaming materialize: a task version's tensors, one at a time, on any device.

Reader threads (:mod:`.reader`) read the next tensors' arrays while the device decodes the
current one (:mod:`.decode`); at most ``read_ahead_bytes`` are read but not yet decoded. On CUDA
the arrays travel through pinned staging and the fused decoders write each weight once; on the
CPU the same pipeline runs with ordinary tensors. Either way the bits are the same.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..errors import DeltastoreError
from ..progress import progress as progress_bar
from ..storage.records import TaskVersion
from .decode import TensorPlan, decode, plan
from .reader import STAGING_POOL_BYTES, DeviceReader, read_ahead_budget


def resolve_device(device: str | torch.device) -> torch.device:
    """``cuda`` without an index is the current CUDA device (streams and events need one)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def iter_materialize(
    objects,
    record: TaskVersion,
    *,
    where: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    verify: bool = True,
    workers: int | None = None,
    read_ahead_bytes: int | None = None,
    staging_bytes: int = STAGING_POOL_BYTES,
    progress: bool | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of ``record`` in record order: ``W' = W_pre + lam1*tau_base + lam2*C(R)``.

    ``objects``: the registry's object store; ``where``: the registry, for messages. ``dtype``
    casts floating tensors (default: each tensor's dtype in the finetune); ``verify`` rehashes
    every array read; ``workers`` reader threads read ahead (default: one per core, 2-16). On
    CUDA, ``staging_bytes`` of pinned buffers carry every copy, and the yielded tensors are
    produced on the current stream (use them on it, or synchronize).
    """
    device = resolve_device(device)
    label = f"{record.task}@{record.version}"
    objects = objects.reading(record)  # its bundled arrays from its bundle (specs/format.md §5.9)
    items = plan(objects, record, where)
    reader = DeviceReader(objects, device, verify, staging_bytes)
    budget = read_ahead_budget(device) if read_ahead_bytes is None else read_ahead_bytes
    stream = reader.read_ahead(reader, items, nbytes=TensorPlan.est_bytes, budget=budget, workers=workers)
    try:
        for index in progress_bar(range(len(items)), total=len(items), desc=f"{label}: materialize",
                                  enabled=progress):
            name = items[index].name
            try:
                item, parts = next(stream)  # a read that failed raises here, at its item's turn
                value = decode(item, parts, device)
            except DeltastoreError as exc:  # name the task and tensor, not only the object
                raise type(exc)(f"{label}, tensor {name!r}: {exc}") from None
            del parts
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            yield name, value
    finally:
        stream.close()  # cancels the reads not started when the caller stops early
