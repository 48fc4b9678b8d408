"""Resident mode: a reference kept on a device, and task switching by rewriting tensors in place.

The reference (and each base vector) stays on the device; a task's compressed bytes are cached
once, in one flat pinned host buffer by default (``cache="gpu"`` keeps them on the GPU instead);
:meth:`ResidentModel.switch` rewrites the target's tensors in place (fused decoders write straight
into the parameters' storage) from those bytes.

Why the cache is host-pinned by default: a serving process needs the GPU's memory for the
reference, the live weights and its KV cache; host memory is larger and cheaper, and moving a
1-bit task over PCIe (~16 ms for a 7B model at ~54 GB/s) runs concurrently with the decode.
``cache="gpu"`` removes that copy for a few hot tasks. Each switch gives exactly the weights
of ``registry.materialize`` (tests/test_engine.py holds it to it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..catalog import split_spec
from ..errors import InvalidInputError, NotFoundError
from ..tensor.compressors.base import required_array
from ..dtypes import torch_dtype
from ..tensor.fused import triton_enabled
from .decode import Parts, TensorPlan, decode_split, lossless, plan, prepare_fused, row_index
from .reader import READ_AHEAD_HOST_BYTES, DeviceReader, read_ahead_budget
from .readahead import read_ahead

if TYPE_CHECKING:
    from ..registry import Registry

# A task's flat buffer is uploaded in pieces, one event each, so that the first kernels start
# while the rest is still on the bus: the first piece small (the kernels' wait for it is pure
# latency), each next one twice the last, up to the largest.
FIRST_UPLOAD_PIECE_BYTES = 1 << 20
UPLOAD_PIECE_BYTES = 8 << 20
_ALIGN = 256  # byte alignment of arrays inside a task's flat buffer (16 would do for the loads)


@dataclass
class _Slot:
    """Where one array sits inside a task's flat buffer."""

    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        raw = flat[self.offset:self.offset + self.nbytes]
        return raw.view(self.dtype).reshape(self.shape) if self.nbytes else torch.empty(
            self.shape, dtype=self.dtype, device=flat.device)


@dataclass
class _CachedTask:
    """A task's compressed bytes, laid out in one flat buffer (pinned host or GPU)."""

    task: str
    version: int
    items: list[TensorPlan]
    slots: list[dict[str, _Slot]]   # per item: role -> slot (data, trow, 'a:' arrays, 'p:' prepared)
    flat: torch.Tensor              # uint8
    base: str | None                # the base vector record's digest
    graph: Any = None               # torch.cuda.CUDAGraph of this task's switch (see ResidentModel.switch)
    graph_key: tuple | None = None  # what the graph baked in: (landing buffer address, targets epoch)
    capturable: bool = True         # False once a capture failed: this task switches eagerly

    @property
    def nbytes(self) -> int:
        return self.flat.numel()


class _FlatBuilder:
    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []
        self.size = 0

    def add(self, tensor: torch.Tensor) -> _Slot:
        tensor = tensor.detach().contiguous().cpu()
        nbytes = tensor.numel() * tensor.element_size()
        slot = _Slot(self.size, nbytes, tensor.dtype, tuple(tensor.shape))
        if nbytes:
            self.parts.append((self.size, tensor.reshape(-1).view(torch.uint8)))
        self.size += -(-nbytes // _ALIGN) * _ALIGN
        return slot

    def build(self, pin: bool) -> torch.Tensor:
        flat = torch.empty(self.size, dtype=torch.uint8, pin_memory=pin)
        for offset, raw in self.parts:
            flat[offset:offset + raw.numel()].copy_(raw)
        return flat


class ResidentModel:
    """A reference kept on a device, and task switching by rewriting tensors in place.

    ``target``: an ``nn.Module`` (e.g. a transformers model loaded from a task or the
    reference), a mapping ``name -> tensor``, or None (tensors are allocated at the first switch
    and exposed as :attr:`tensors`). Names are the task records' tensor names; with a module,
    those of ``module.state_dict()``. The target's tensors must be on ``device``; their storage is
    written, never replaced, so modules, optimizers or CUDA graphs that hold them stay valid.

    ``cache``: where each task's compressed bytes are kept after the first switch to it:
    ``"pinned"`` (host, default), ``"gpu"`` or ``"none"`` (read from the registry every time).
    Each switch gives exactly ``registry.materialize(task, version, dtype=<target dtype>)``.

    ``graphs``: on CUDA, replay each cached task's switch as a CUDA graph from its second switch
    on (captured right after its first). A switch launches two or three kernels per tensor;
    launched one by one from Python they cost more CPU time than the GPU needs to run them
    (measured on an H200: a DARE switch of 8 Llama-2-7B layers took 11.7 ms of launches for
    4.4 ms of GPU work), so a replay is what brings the switch to its bandwidth bound.
    """

    def __init__(self, registry: "Registry", target: Any = None, *, device: str | torch.device = "cuda",
                 cache: str = "pinned", verify: bool = True, graphs: bool = True):
        if cache not in ("pinned", "gpu", "none"):
            raise InvalidInputError(f"cache must be 'pinned', 'gpu' or 'none', got {cache!r}")
        self.registry = registry
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.cache = cache if self.device.type == "cuda" else ("none" if cache == "none" else "host")
        self.verify = verify
        if target is None:
            self.tensors: dict[str, torch.Tensor] = {}
            self._allocate = True
        else:
            state = target.state_dict(keep_vars=True) if isinstance(target, torch.nn.Module) else dict(target)
            self.tensors = {name: (t.data if isinstance(t, torch.nn.Parameter) else t) for name, t in state.items()}
            self._allocate = False
        self._reference: dict[str, torch.Tensor] = {}     # reference name -> tensor on device
        self._bases: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}  # (digest, ref) -> (brow, signs)
        self._tasks: dict[tuple[str, int], _CachedTask] = {}
        self._landing: torch.Tensor | None = None         # GPU buffer a pinned task is copied into
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # Where the kept-element passes run (decode_split), beside the dense passes; high
        # priority, so that their few programs start as soon as a dense kernel frees an SM.
        self._kept_stream = torch.cuda.Stream(self.device, priority=-1) if self.device.type == "cuda" else None
        self._graphs = graphs and self.device.type == "cuda"
        self._targets_epoch = 0  # counts target tensors (re)allocated: a graph holds their addresses
        self.current: tuple[str, int] | None = None

    # -- loading ----------------------------------------------------------------------------
    def _load_resident(self, items: list[TensorPlan], base_digest: str | None) -> None:
        """Put every reference tensor and base vector ``items`` add to on the device, read by
        parallel reader threads through pinned staging (one thread took ~25 s for a 7B model)."""
        todo, seen = [], set()
        for item in items:
            ref = item.entry.ref
            if not item.entry.is_delta or ref in seen:
                continue
            if ref not in self._reference or (item.base_entry is not None and (base_digest, ref) not in self._bases):
                seen.add(ref)
                todo.append(item)
        reader = DeviceReader(self.registry.objects, self.device, self.verify)

        def read(item: TensorPlan):
            name = item.entry.ref
            ref = None
            if name not in self._reference:
                data = reader.array(required_array(item.ref_entry.arrays, "data"), f"reference {name}")
                ref = lossless(item.ref_entry, data, self.device)
            base = None
            if item.base_entry is not None and (base_digest, name) not in self._bases:
                b = item.base_entry
                rows, _ = item.matrix
                brow = row_index(self.registry.objects, b.rows, rows, b.changed_rows, self.verify, f"base {name}: rows")
                signs = reader.array(required_array(b.arrays, "signs"), f"base {name}: signs")
                base = (reader.put(torch.from_numpy(brow)), signs)
            return ref, base

        budget = read_ahead_budget(self.device)
        for item, (ref, base) in reader.read_ahead(read, todo, nbytes=TensorPlan.est_bytes, budget=budget):
            if ref is not None:
                self._reference[item.entry.ref] = ref
            if base is not None:
                self._bases[(base_digest, item.entry.ref)] = base

    def load(self, task: str, version: int | None = None) -> _CachedTask:
        """Read a task's compressed arrays into the cache (the first switch does it anyway)."""
        task, version = split_spec(task, version)
        number = self.registry.version_hashes(task)[-1][0] if version is None else version
        key = (task, number)
        if key in self._tasks:
            return self._tasks[key]
        _, record = self.registry.version(task, number)
        objects = self.registry.objects.reading(record)  # its bundled arrays from its bundle (format §5.9)
        items = plan(objects, record, str(self.registry.path))
        self._load_resident(items, record.base)

        def read(item: TensorPlan):
            """In a reader thread: the task's own arrays on the host (and the changed-row index)."""
            entry = item.entry
            arrays = {role: objects.get_array(h, verify=self.verify, what=f"{item.name}: {role}")
                      for role, h in entry.arrays.items()} if item.data is None else {"data": item.data}
            if not entry.is_delta:
                return None, arrays
            rows, _ = item.matrix
            return torch.from_numpy(row_index(objects, entry.rows, rows, entry.changed_rows, self.verify,
                                               f"{item.name}: rows")), arrays

        builder = _FlatBuilder()
        slots = []
        use_triton = triton_enabled(self.device)
        for item, (trow, arrays) in read_ahead(read, items, nbytes=TensorPlan.est_bytes, budget=READ_AHEAD_HOST_BYTES):
            entry = item.entry
            roles: dict[str, _Slot] = {}
            if not entry.is_delta:
                roles["data"] = builder.add(arrays["data"])
                slots.append(roles)
                continue
            roles["trow"] = builder.add(trow)
            for role, array in arrays.items():
                roles["a:" + role] = builder.add(array)
            is_fused = use_triton and item.fused is not None
            if is_fused:  # what the fused decoder prepares is part of the cached code: not redone per switch
                parts = self._parts(item, record.base, arrays={k: v.to(self.device) for k, v in arrays.items()},
                                    trow=trow.to(self.device))
                for role, tensor in prepare_fused(item, parts).prepared.items():
                    roles["p:" + role] = builder.add(tensor)
            slots.append(roles)
        flat = builder.build(pin=self.cache == "pinned")
        if self.cache == "gpu":
            flat = flat.to(self.device)
        cached = _CachedTask(task, number, items, slots, flat, record.base)
        if self.cache != "none":
            self._tasks[key] = cached
        return cached

    def set_cache(self, cache: str) -> None:
        """Change where task bytes are cached (``"pinned"``, ``"gpu"``, ``"none"``); drops the cache."""
        if cache not in ("pinned", "gpu", "none"):
            raise InvalidInputError(f"cache must be 'pinned', 'gpu' or 'none', got {cache!r}")
        self.cache = cache if self.device.type == "cuda" else ("none" if cache == "none" else "host")
        self._tasks.clear()

    def evict(self, task: str, version: int | None = None) -> None:
        """Drop a task's cached bytes (all versions when ``version`` is None)."""
        for key in [k for k in self._tasks if k[0] == task and (version is None or k[1] == version)]:
            del self._tasks[key]

    def _parts(self, item: TensorPlan, base_digest: str | None, *, arrays, trow, prepared=None) -> Parts:
        parts = Parts(w_pre=self._reference[item.entry.ref], trow=trow, arrays=arrays, prepared=prepared or {})
        if item.base_entry is not None:
            brow, signs = self._bases[(base_digest, item.entry.ref)]
            parts.brow, parts.barrays = brow, {"signs": signs}
        return parts

    # -- switching --------------------------------------------------------------------------
    def _target(self, item: TensorPlan) -> torch.Tensor:
        target = self.tensors.get(item.name)
        if target is not None and self._allocate and (tuple(target.shape) != tuple(item.entry.shape)
                                                      or target.dtype != torch_dtype(item.entry.dtype)):
            target = None  # our own tensor, and this task's head has another shape: replace it
        if target is None:
            if not self._allocate:
                raise NotFoundError(f"task tensor {item.name!r} has no counterpart in the resident target; "
                                    f"it holds {len(self.tensors)} tensors, e.g. {list(self.tensors)[:3]}")
            target = torch.empty(item.entry.shape, dtype=torch_dtype(item.entry.dtype), device=self.device)
            self.tensors[item.name] = target
            self._targets_epoch += 1
        if tuple(target.shape) != tuple(item.entry.shape):
            raise InvalidInputError(f"target tensor {item.name!r} has shape {tuple(target.shape)}, the task's is "
                                    f"{tuple(item.entry.shape)}")
        if target.device != self.device:
            raise InvalidInputError(f"target tensor {item.name!r} is on {target.device}, expected {self.device}")
        return target

    def switch(self, task: str, version: int | None = None) -> None:
        """Rewrite the target's tensors with ``task`` (at ``version``, default latest).

        On CUDA the work is queued on the current stream and the call returns without waiting;
        anything later on that stream (a forward pass) sees the new weights.
        """
        cached = self.load(task, version)
        if cached.graph is not None and cached.graph_key == self._graph_key(cached):
            cached.graph.replay()
        else:
            self._run_switch(cached)
            if self._graphs and cached is self._tasks.get((cached.task, cached.version)) and cached.capturable:
                self._capture(cached)
        self.current = (task, cached.version)

    def _graph_key(self, cached: _CachedTask) -> tuple:
        landing = None if cached.flat.is_cuda or self._landing is None else self._landing.data_ptr()
        return landing, self._targets_epoch

    def _capture(self, cached: _CachedTask) -> None:
        """Record the switch just run as a CUDA graph; only the cached task's own fused kernels
        and copies are recorded, so a later replay gives the same bits."""
        if not all(item.fused is not None for item in cached.items if item.entry.is_delta):
            cached.capturable = False  # a reference decode reads sizes back to the host: not capturable
            return
        key = self._graph_key(cached)
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(stream):
                # thread_local: CUDA calls of a server's other threads do not break this capture
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    self._run_switch(cached)
                finally:
                    graph.capture_end()
        except RuntimeError:
            # A capture refused by CUDA or torch (for example an operation that synchronizes)
            # costs only speed: this task keeps switching eagerly, with the same result.
            cached.capturable = False
            return
        finally:
            torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._graph_key(cached) == key:
            cached.graph, cached.graph_key = graph, key

    def _run_switch(self, cached: _CachedTask) -> None:
        """Queue the decode of every tensor of ``cached`` into the target, on the current stream."""
        record_base = cached.base
        flat = cached.flat
        events: list[tuple[int, Any]] = []
        if self.device.type == "cuda" and not flat.is_cuda:
            flat = self._upload(flat, events)
        elif self.device.type != "cuda" and flat.device != self.device:
            flat = flat.to(self.device)
        current = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        waited = 0
        split = False  # did a kept-element pass go to the kept stream?
        for item, roles in zip(cached.items, cached.slots):
            if events:
                # Wait for every piece that starts before this tensor's last byte.
                end = max(s.offset + s.nbytes for s in roles.values())
                while waited < len(events) and events[waited][0] < end:
                    current.wait_event(events[waited][1])
                    waited += 1
            target = self._target(item)
            if not item.entry.is_delta:
                target.copy_(lossless(item.entry, roles["data"].view(flat), self.device))
                continue
            arrays = {role[2:]: s.view(flat) for role, s in roles.items() if role.startswith("a:")}
            prepared = {role[2:]: s.view(flat) for role, s in roles.items() if role.startswith("p:")}
            parts = self._parts(item, record_base, arrays=arrays, trow=roles["trow"].view(flat), prepared=prepared)
            kept = decode_split(item, parts, self.device, out=target)
            if kept is None:
                continue
            if current is None:
                kept()
                continue
            self._kept_stream.wait_stream(current)
            with torch.cuda.stream(self._kept_stream):
                kept()
            split = True
        if split:
            current.wait_stream(self._kept_stream)

    def _upload(self, flat: torch.Tensor, events: list) -> torch.Tensor:
        """Copy a pinned flat buffer into the landing buffer in pieces, on the copy stream."""
        if self._landing is None or self._landing.numel() < flat.numel():
            self._landing = torch.empty(flat.numel(), dtype=torch.uint8, device=self.device)
            self._landing.record_stream(self._copy_stream)
        landing = self._landing[:flat.numel()]
        stream = self._copy_stream
        # The landing buffer is reused by every switch: wait until the last switch's kernels are done with it.
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            start, piece = 0, FIRST_UPLOAD_PIECE_BYTES
            while start < flat.numel():
                end = min(flat.numel(), start + piece)
                landing[start:end].copy_(flat[start:end], non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
                events.append((start, event))
                start, piece = end, min(2 * piece, UPLOAD_PIECE_BYTES)
        return landing

    def cached_bytes(self) -> int:
        """Bytes of every cached task's flat buffer."""
        return sum(t.nbytes for t in self._tasks.values())


__all__ = ["ResidentModel"]
