"""Reading stored arrays and finetune tensors onto the decode device, ahead, in threads.

Reader threads read the next tensors' arrays (chunk files decoded with zstd in parallel, sha256
check) while the device decodes the current one. On CUDA the chunks are decoded straight into
a fixed pool of pinned staging buffers and copied to the GPU on the reader's own stream, so the
host holds no array at all: its memory is the pool, whatever the model.
"""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CorruptObjectError
from ..tensor.compressors.base import required_array
from ..tensor.compressors.lossless import Lossless
from .decode import Parts, TensorPlan, lossless, row_index
from .readahead import read_ahead

if TYPE_CHECKING:
    from ..storage.objects import ArrayReader

# Bytes of read-but-not-yet-decoded tensors a reader may hold at once: host arrays on CPU; GPU
# scratch on CUDA (the host holds only the staging pool), where more in flight keeps all reader
# threads busy while a large tensor (an embedding) is still being read and hashed.
READ_AHEAD_HOST_BYTES = 1 << 30
READ_AHEAD_GPU_BYTES = 4 << 30
# Pinned staging: SLOT bytes per buffer, POOL bytes in all, allocated once per pipeline.
# A slot holds one or two 8 MiB chunks; the pool has a slot for each of 16 reader threads and
# more for copies still in flight (fewer slots than threads left readers waiting).
STAGING_SLOT_BYTES = 16 << 20
STAGING_POOL_BYTES = 384 << 20


def read_ahead_budget(device: torch.device) -> int:
    return READ_AHEAD_GPU_BYTES if device.type == "cuda" else READ_AHEAD_HOST_BYTES


class StagingPool:
    """Pinned host buffers reused for every host-to-device copy (CUDA only).

    A reader thread takes a free slot, waits for the copy (and the sha256) that last used it,
    decodes chunks straight into it (no other host copy of the array exists) and queues the copy
    on its own stream; so at most ``pool_bytes`` of pinned memory exist, however large the model.
    """

    def __init__(self, pool_bytes: int, slot_bytes: int):
        self.slot_bytes = slot_bytes
        count = max(2, pool_bytes // slot_bytes)
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(count)]
        self.events: list[Any] = [None] * count
        self.hashing: list[Any] = [None] * count  # the hash still reading a slot (ArrayReader.read_chunk)
        self.free: queue.Queue[int] = queue.Queue()
        for i in range(count):
            self.free.put(i)

    def _take(self) -> int:
        i = self.free.get()
        if self.events[i] is not None:
            self.events[i].synchronize()  # the last copy out of this slot has finished
        if self.hashing[i] is not None:
            self.hashing[i].result()
            self.hashing[i] = None
        return i

    def _send(self, i: int, nbytes: int, dst: torch.Tensor, stream, hashing=None) -> None:
        """Queue the copy of slot ``i``'s first ``nbytes`` into ``dst`` and hand the slot back
        (taken again only once the future ``hashing``, if any, is done)."""
        self.hashing[i] = hashing
        try:
            dst.copy_(self.slots[i][:nbytes], non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
            self.events[i] = event
        finally:
            self.free.put(i)

    def upload(self, src: torch.Tensor, dst: torch.Tensor, stream) -> None:
        """Copy CPU ``src`` into device ``dst`` (same bytes) through the pool, on ``stream``."""
        s = _bytes(src.contiguous())
        self.upload_filled(lambda start, view: torch.frombuffer(view, dtype=torch.uint8).copy_(
            s[start:start + len(view)]), dst, stream)

    def upload_filled(self, fill, dst: torch.Tensor, stream) -> None:
        """Fill device ``dst`` slot by slot: ``fill(start, view)`` writes its bytes
        ``[start, start + len(view))`` into the pinned ``view`` (e.g. a file read)."""
        d = _bytes(dst)
        for start in range(0, d.numel(), self.slot_bytes):
            k = min(self.slot_bytes, d.numel() - start)
            i = self._take()
            try:
                fill(start, memoryview(self.slots[i].numpy()[:k]))
            except BaseException:
                self.free.put(i)
                raise
            self._send(i, k, d[start:start + k], stream)

    def upload_array(self, reader: "ArrayReader", dst: torch.Tensor, stream) -> None:
        """Decode a stored array chunk by chunk into the slots and copy them into device ``dst``
        (its shape and dtype); raises, after queueing the copies, if the content hash is wrong."""
        d = _bytes(dst)
        slot, used, start, hashing = None, 0, 0, None
        try:
            for index, (_, offset, nbytes) in enumerate(reader.chunks):
                if slot is not None and used + nbytes > self.slot_bytes:
                    self._send(slot, used, d[start:start + used], stream, hashing)
                    slot = None
                if nbytes > self.slot_bytes:  # a chunk larger than a slot (another writer's layout)
                    host = torch.empty(nbytes, dtype=torch.uint8)
                    reader.read_chunk(index, memoryview(host.numpy()))
                    self.upload(host, d[offset:offset + nbytes], stream)
                    continue
                if slot is None:
                    slot, used, start = self._take(), 0, offset
                hashing = reader.read_chunk(index, memoryview(self.slots[slot].numpy()[used:used + nbytes]))
                used += nbytes
        except BaseException:
            reader.close()  # no hash may still read a slot handed back
            if slot is not None:
                self.free.put(slot)
            raise
        if slot is not None:
            self._send(slot, used, d[start:start + used], stream, hashing)
        reader.finish()


def _tensors_in(value) -> list[torch.Tensor]:
    """The tensors in a reader's result (a tensor, Parts, or tuples/lists/dicts of them)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Parts):
        return value.tensors()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors_in(v)]
    return []


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8, device=t.device)


def _arrays_of(item: TensorPlan) -> list[tuple[str, str]]:
    """``(digest, what)`` of every stored array :meth:`DeviceReader._read_arrays` reads for
    ``item``, in the order it reads them. Only a hint: an array left out is opened when read,
    one too many is never read; a record that lacks one, or has a reference of another codec,
    is refused there, not here."""
    entry = item.entry
    if not entry.is_delta:
        return [(entry.arrays["data"], f"{item.name}: data")] if "data" in entry.arrays else []
    ref = item.ref_entry
    wanted = [(ref.arrays["data"], f"reference {entry.ref}")] \
        if ref.codec == Lossless.name and "data" in ref.arrays else []
    if entry.rows is not None:
        wanted.append((entry.rows, f"{item.name}: rows"))
    wanted += [(h, f"{item.name}: {role}") for role, h in entry.arrays.items()]
    if item.base_entry is not None:
        b = item.base_entry
        if b.rows is not None:
            wanted.append((b.rows, f"base {entry.ref}: rows"))
        wanted += [(h, f"base {entry.ref}: {role}") for role, h in b.arrays.items()]
    return wanted


class DeviceReader:
    """Reads stored arrays (and finetune tensors) onto the decode device, in worker threads.

    On CUDA everything goes through the pinned staging pool and is copied on the calling
    thread's own stream; :meth:`run` records an event the consumer waits for. On other devices
    it reads into ordinary tensors.
    """

    def __init__(self, objects, device: torch.device, verify: bool, staging_bytes: int = STAGING_POOL_BYTES):
        self.objects = objects
        self.device = device
        self.verify = verify
        self.pool = (StagingPool(staging_bytes, min(STAGING_SLOT_BYTES, staging_bytes))
                     if device.type == "cuda" else None)
        self._local = threading.local()

    def _stream(self):
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(self.device)
        return stream

    def put(self, host: torch.Tensor) -> torch.Tensor:
        """A CPU tensor on the device."""
        if self.device.type != "cuda":
            return host if self.device.type == "cpu" else host.to(self.device)
        dst = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        self.pool.upload(host, dst, torch.cuda.current_stream(self.device))
        return dst

    def array(self, digest: str, what: str) -> torch.Tensor:
        """A stored array on the device; on CUDA decoded straight into pinned staging."""
        if self.device.type != "cuda":
            return self.put(self.objects.get_array(digest, verify=self.verify, what=what))
        reader = self.objects.open_array(digest, verify=self.verify, what=what)
        dst = torch.empty(reader.shape, dtype=reader.dtype, device=self.device)
        self.pool.upload_array(reader, dst, torch.cuda.current_stream(self.device))
        return dst

    def source(self, source, name: str) -> torch.Tensor:
        """A finetune's tensor on the device; on CUDA read straight into pinned staging."""
        if self.device.type != "cuda":
            return self.put(source.get(name))
        dst = torch.empty(source.shape(name), dtype=source.dtype(name), device=self.device)
        self.pool.upload_filled(lambda start, view: source.read_into(name, view, start), dst,
                                torch.cuda.current_stream(self.device))
        return dst

    def run(self, fn, *args) -> tuple[Any, Any]:
        """``(fn(*args), event)`` with fn's device work on this thread's stream; the event
        (None off CUDA) marks its end."""
        if self.device.type != "cuda":
            return fn(*args), None
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream()):
            result = fn(*args)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            return result, event

    def read_ahead(self, fn, items, *, nbytes, budget: int, workers: int | None = None):
        """:func:`read_ahead` of ``fn`` in reader threads; each result's tensors are ready to
        use on the current stream when yielded."""
        for item, (result, event) in read_ahead(lambda x: self.run(fn, x), items, nbytes=nbytes, budget=budget,
                                                workers=workers):
            if event is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(event)
                for t in _tensors_in(result):
                    t.record_stream(current)  # allocated on a reader's stream, used on this one
            yield item, result

    def __call__(self, item: TensorPlan) -> Parts:
        return self._read(item)

    def _read(self, item: TensorPlan) -> Parts:
        """Everything :func:`deltastore.engine.decode.decode` needs for ``item``, on the device;
        its arrays are requested all at once (:meth:`ObjectStore.arrays_ahead`), then read in turn."""
        if item.data is not None:  # packed: read with the version's pack
            return Parts(data=self.put(item.data))
        with self.objects.arrays_ahead(_arrays_of(item), verify=self.verify):
            return self._read_arrays(item)

    def _read_arrays(self, item: TensorPlan) -> Parts:
        entry = item.entry
        if not entry.is_delta:
            return Parts(data=self.array(required_array(entry.arrays, "data"), f"{item.name}: data"))
        rows, _ = item.matrix
        ref = item.ref_entry
        if ref.codec != Lossless.name:
            raise CorruptObjectError(f"reference tensor {entry.ref!r} is stored as {ref.codec!r}, "
                                     f"expected {Lossless.name}")
        w_pre = self.array(required_array(ref.arrays, "data"), f"reference {entry.ref}")
        parts = Parts(w_pre=lossless(ref, w_pre, self.device))
        parts.trow = self.put(torch.from_numpy(
            row_index(self.objects, entry.rows, rows, entry.changed_rows, self.verify, f"{item.name}: rows")))
        parts.arrays = {role: self.array(h, f"{item.name}: {role}") for role, h in entry.arrays.items()}
        if item.base_entry is not None:
            b = item.base_entry
            parts.brow = self.put(torch.from_numpy(
                row_index(self.objects, b.rows, rows, b.changed_rows, self.verify, f"base {entry.ref}: rows")))
            parts.barrays = {role: self.array(h, f"base {entry.ref}: {role}") for role, h in b.arrays.items()}
        return parts
