"""The fast path: streaming materialize and resident task switching (issue 5).

Both give exactly the weights :meth:`Registry.materialize` gives (bit for bit; tests/test_fast.py
holds them to it), on any device; on CUDA they run near the hardware's limits.

* :func:`iter_materialize_streaming` / :func:`materialize_streaming`: reader threads read the
  next tensors' arrays (chunk files decoded with zstd in parallel, sha256 check) while the
  device decodes the current one. On CUDA the chunks are decoded straight into a fixed pool of
  pinned staging buffers and copied to the GPU on the reader's own stream, so the host holds
  no array at all: its memory is the pool, whatever the model. The decode (sign unpack or DARE
  mask regeneration, base vector, lambda scaling, reference add, cast) is one Triton kernel
  that writes each output weight once.
  ``Registry.materialize(..., device="cuda")`` uses it.
* :class:`ResidentModel`: the reference (and each base vector) stays on the GPU; a task's
  compressed bytes are cached once, in one flat pinned host buffer by default (``cache="gpu"``
  keeps them on the GPU instead); :meth:`ResidentModel.switch` rewrites the target's tensors in
  place (the kernels write straight into the parameters' storage) from those bytes.

Why the cache is host-pinned by default: a serving process needs the GPU's memory for the
reference, the live weights and its KV cache; host memory is larger and cheaper, and moving a
1-bit task over PCIe (~16 ms for a 7B model at ~54 GB/s) runs concurrently with the decode.
``cache="gpu"`` removes that copy for a few hot tasks.

Exactness: the kernels compute ``w + (lam2*d + lam1*t)`` with the same float32 operations in
the same order as :func:`deltastore.tensor.dbms.reconstruct` (products of lambdas with the
BitDelta scales are formed by torch on the device exactly as the reference path forms them;
Triton's FMA contraction is turned off), then round to the stored dtype with
round-to-nearest-even, as ``Tensor.to`` does.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from .catalog import split_spec
from .errors import CorruptObjectError, InvalidInputError, NotFoundError
from .readahead import read_ahead
from .storage.records import BaseRecord, ReferenceRecord, TensorEntry
from .tensor import dbms
from .tensor.bitpack import packed_size
from .tensor.compressors import Encoded, get_compressor
from .tensor.compressors.lossless import Lossless, dtype_from_name
from .tensor.prng import MAX_COUNTER, mix32_int

if TYPE_CHECKING:
    from .registry import Registry
    from .storage.objects import ArrayReader

try:  # Triton is optional: without it (or on CPU) the torch path below gives the same bits.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the installation
    HAS_TRITON = False

# Bytes of read-but-not-yet-decoded tensors the streaming reader may hold at once: host arrays
# on CPU; GPU scratch on CUDA (the host holds only the staging pool), where more in flight keeps
# all reader threads busy while a large tensor (an embedding) is still being read and hashed.
READ_AHEAD_HOST_BYTES = 1 << 30
READ_AHEAD_GPU_BYTES = 4 << 30
# Pinned staging: SLOT bytes per buffer, POOL bytes in all, allocated once per pipeline.
# A slot holds one or two 8 MiB chunks; the pool has a slot for each of 16 reader threads and
# more for copies still in flight (fewer slots than threads left readers waiting).
STAGING_SLOT_BYTES = 16 << 20
STAGING_POOL_BYTES = 384 << 20
# Columns one kernel program handles (a row is split into ceil(cols / BLOCK) programs).
BLOCK = 2048
# ResidentModel uploads a task's flat buffer in pieces of this size, one event each, so that the
# first kernels start while the rest is still on the bus.
UPLOAD_PIECE_BYTES = 64 << 20
_ALIGN = 256  # byte alignment of arrays inside a task's flat buffer (16 would do for the loads)

_FUSED_CODECS = ("bitdelta", "dare")


def triton_enabled(device: torch.device) -> bool:
    """True when the Triton kernels run on ``device`` (CUDA with Triton, or Triton's CPU
    interpreter when ``TRITON_INTERPRET=1``, which the CPU tests use)."""
    if not HAS_TRITON or os.environ.get("DELTASTORE_NO_TRITON") == "1":
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _mix32(x):
        # lowbias32 on uint32 (prng.py): products wrap modulo 2**32 in uint32 arithmetic.
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        x = x ^ (x >> 16)
        return x

    @triton.jit
    def _dare_keep(flat, seed_mix, threshold):
        r = _mix32(_mix32(flat.to(tl.uint32)) ^ seed_mix.to(tl.uint32))
        return r.to(tl.int64) < threshold

    @triton.jit
    def _base_term(row, c, inb, cols, brow_ptr, bsign_ptr, const_ptr, BLOCK: tl.constexpr):
        # lam1 * tau for one block of a row: +-lam1*alpha_base on the base's changed rows, lam1*0 elsewhere.
        bi = tl.load(brow_ptr + row)
        b_zero = tl.load(const_ptr + 4)
        b = tl.zeros([BLOCK], dtype=tl.float32) + b_zero
        if bi >= 0:
            bflat = bi.to(tl.int64) * cols + c
            bbyte = tl.load(bsign_ptr + (bflat >> 3), mask=inb, other=0).to(tl.int32)
            bbit = (bbyte >> (bflat & 7).to(tl.int32)) & 1
            b = tl.where(bbit != 0, tl.load(const_ptr + 2), tl.load(const_ptr + 3))
        return b

    @triton.jit
    def _bitdelta_kernel(out_ptr, w_ptr, trow_ptr, sign_ptr, brow_ptr, bsign_ptr, const_ptr, cols, n_blocks,
                         HAS_BASE: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        row = pid // n_blocks
        c = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
        inb = c < cols
        offs = row.to(tl.int64) * cols + c
        w = tl.load(w_ptr + offs, mask=inb, other=0).to(tl.float32)
        ti = tl.load(trow_ptr + row)
        if ti >= 0:
            flat = ti.to(tl.int64) * cols + c
            byte = tl.load(sign_ptr + (flat >> 3), mask=inb, other=0).to(tl.int32)
            bit = (byte >> (flat & 7).to(tl.int32)) & 1
            u = tl.where(bit != 0, tl.load(const_ptr), tl.load(const_ptr + 1))  # lam2 * (+-alpha)
            if HAS_BASE:
                u = u + _base_term(row, c, inb, cols, brow_ptr, bsign_ptr, const_ptr, BLOCK)
            w = w + u
        tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=inb)

    @triton.jit
    def _dare_count_kernel(count_ptr, seed_mix, threshold, cols, n_blocks, BLOCK: tl.constexpr):
        # Kept elements per (changed row, column block), in flat order, for the value offsets.
        pid = tl.program_id(0)
        ti = pid // n_blocks
        c = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
        keep = _dare_keep(ti.to(tl.int64) * cols + c, seed_mix, threshold) & (c < cols)
        tl.store(count_ptr + pid, tl.sum(keep.to(tl.int32), axis=0))

    @triton.jit
    def _dare_kernel(out_ptr, w_ptr, trow_ptr, off_ptr, val_ptr, n_values, vscale_ptr, brow_ptr, bsign_ptr,
                     const_ptr, seed_mix, threshold, cols, n_blocks,
                     HAS_BASE: tl.constexpr, INT8: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        row = pid // n_blocks
        cb = pid % n_blocks
        c = cb * BLOCK + tl.arange(0, BLOCK)
        inb = c < cols
        offs = row.to(tl.int64) * cols + c
        w = tl.load(w_ptr + offs, mask=inb, other=0).to(tl.float32)
        ti = tl.load(trow_ptr + row)
        if ti >= 0:
            keep = _dare_keep(ti.to(tl.int64) * cols + c, seed_mix, threshold) & inb
            k = keep.to(tl.int32)
            index = tl.load(off_ptr + ti.to(tl.int64) * n_blocks + cb).to(tl.int64) + (tl.cumsum(k, axis=0) - k)
            ok = keep & (index < n_values)
            d = tl.load(val_ptr + index, mask=ok, other=0).to(tl.float32)
            if INT8:
                d = d * tl.load(vscale_ptr + ti)
            d = tl.where(keep, d, 0.0)
            u = tl.load(const_ptr) * d  # lam2 * C(R); a separate rounding (fp fusion is off)
            if HAS_BASE:
                u = u + _base_term(row, c, inb, cols, brow_ptr, bsign_ptr, const_ptr, BLOCK)
            w = w + u
        tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=inb)


# --------------------------------------------------------------------------------------------
# What one tensor needs, and how it is decoded
# --------------------------------------------------------------------------------------------
@dataclass
class _Item:
    """One output tensor: its entry, the reference entry it adds to, the base entry, lambdas."""

    name: str
    entry: TensorEntry
    ref_entry: TensorEntry | None = None
    base_entry: TensorEntry | None = None
    lam1: float = 0.0
    lam2: float = 1.0

    @property
    def matrix(self) -> tuple[int, int]:
        shape = self.entry.shape
        cols = 1
        for d in shape[1:]:
            cols *= int(d)
        return int(shape[0]), cols

    def est_bytes(self) -> int:
        n = 1
        for d in self.entry.shape:
            n *= int(d)
        return max(1, n) * torch.empty((), dtype=dtype_from_name(self.entry.dtype)).element_size()


@dataclass
class _Parts:
    """The decoded inputs of one tensor, on the decode device.

    ``w_pre``: reference matrix (its own dtype); ``trow``/``brow``: int32 ``(rows,)`` changed-row
    index of each row or -1, for the task and the base; ``arrays``/``barrays``: the codes.
    """

    data: torch.Tensor | None = None          # lossless entries: the stored carrier array
    w_pre: torch.Tensor | None = None
    trow: torch.Tensor | None = None
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)
    brow: torch.Tensor | None = None
    barrays: dict[str, torch.Tensor] = field(default_factory=dict)
    offsets: torch.Tensor | None = None       # DARE: first value index of each (row, block)
    consts: torch.Tensor | None = None        # float32 (5,): see _consts

    def tensors(self) -> list[torch.Tensor]:
        out = [t for t in (self.data, self.w_pre, self.trow, self.brow, self.offsets, self.consts) if t is not None]
        return out + list(self.arrays.values()) + list(self.barrays.values())


def _row_index(objects, digest: str | None, rows: int, expected: int | None, verify: bool, what: str) -> np.ndarray:
    """int32 ``(rows,)``: the changed-row number of each row, -1 for unchanged rows (host side)."""
    if digest is None:
        mask = np.ones(rows, dtype=bool)
    else:
        packed = objects.get_array(digest, verify=verify, what=what).numpy()
        if packed.dtype != np.uint8 or packed.ndim != 1 or packed.size != packed_size(rows):
            raise CorruptObjectError(f"{what}: changed-row mask must be uint8 ({packed_size(rows)},), found "
                                     f"{packed.dtype} {packed.shape}")
        mask = np.unpackbits(packed, bitorder="little")[:rows].astype(bool)
    if expected is not None and int(mask.sum()) != expected:
        raise CorruptObjectError(f"{what}: changed-row mask holds {int(mask.sum())} rows, the record says {expected}")
    return np.where(mask, np.cumsum(mask, dtype=np.int64) - 1, -1).astype(np.int32)


def _consts(item: _Item, device: torch.device) -> torch.Tensor:
    """float32 ``(5,)`` on ``device``: the products the reference path forms, formed the same way.

    bitdelta: ``[lam2*a, lam2*(-a), lam1*b, lam1*(-b), lam1*0]`` with ``a``, ``b`` the task's and
    the base's float32 scales; dare: ``[lam2, -, lam1*b, lam1*(-b), lam1*0]``.
    """
    entry = item.entry
    if entry.codec == "bitdelta":
        scale = torch.tensor(entry.attrs["scale"], dtype=torch.float32, device=device)
        head = item.lam2 * torch.stack([scale, -scale])
    else:
        head = torch.tensor([item.lam2, 0.0], dtype=torch.float32, device=device)
    if item.base_entry is not None:
        bscale = torch.tensor(item.base_entry.attrs["scale"], dtype=torch.float32, device=device)
        tail = item.lam1 * torch.stack([bscale, -bscale, torch.zeros_like(bscale)])
    else:
        tail = torch.zeros(3, dtype=torch.float32, device=device)
    return torch.cat([head, tail])


def _fusable(item: _Item) -> bool:
    entry = item.entry
    if not entry.is_delta or entry.codec not in _FUSED_CODECS:
        return False
    if item.base_entry is not None and item.base_entry.codec != "bitdelta":
        return False
    if entry.codec == "dare" and entry.config.get("value_bits", 16) not in (8, 16):
        return False
    return True


def _check_codes(item: _Item, parts: _Parts) -> None:
    """Shape/dtype checks the compressors' decoders make, done without a device sync."""
    rows, cols = item.matrix
    n_changed = int(item.entry.changed_rows if item.entry.changed_rows is not None else rows)
    if item.entry.codec == "bitdelta":
        signs = parts.arrays.get("signs")
        if signs is None or signs.dtype != torch.uint8 or signs.dim() != 1 or signs.numel() != packed_size(n_changed * cols):
            raise CorruptObjectError(f"{item.name}: bitdelta 'signs' must be uint8 ({packed_size(n_changed * cols)},)")
    else:
        bits = int(item.entry.config.get("value_bits", 16))
        values = parts.arrays.get("values")
        expected = torch.float16 if bits == 16 else torch.int8
        if values is None or values.dtype != expected or values.dim() != 1:
            raise CorruptObjectError(f"{item.name}: dare array 'values' must be 1-D {expected}")
        if bits == 8:
            scales = parts.arrays.get("scales")
            if scales is None or scales.dtype != torch.float32 or tuple(scales.shape) != (n_changed,):
                raise CorruptObjectError(f"{item.name}: dare array 'scales' must be float32 ({n_changed},)")
        seed = item.entry.attrs.get("seed")
        if n_changed * cols > MAX_COUNTER or type(seed) is not int or not 0 <= seed < MAX_COUNTER:
            raise CorruptObjectError(f"{item.name}: dare needs a uint32 'seed' and at most 2**32 elements")
    if item.base_entry is not None:
        b = item.base_entry
        nb = int(b.changed_rows if b.changed_rows is not None else rows)
        bsigns = parts.barrays.get("signs")
        if bsigns is None or bsigns.dtype != torch.uint8 or bsigns.numel() != packed_size(nb * cols):
            raise CorruptObjectError(f"{item.name}: base vector 'signs' must be uint8 ({packed_size(nb * cols)},)")


def _dare_offsets(item: _Item, parts: _Parts, device: torch.device) -> torch.Tensor:
    """int64 ``(changed_rows * n_blocks,)``: index in 'values' of each block's first kept value."""
    rows, cols = item.matrix
    n_changed = int(item.entry.changed_rows if item.entry.changed_rows is not None else rows)
    n_blocks = triton.cdiv(cols, BLOCK)
    counts = torch.empty(n_changed * n_blocks, dtype=torch.int32, device=device)
    if counts.numel():
        _dare_count_kernel[(counts.numel(),)](counts, mix32_int(int(item.entry.attrs["seed"])),
                                              int(item.entry.attrs["keep_threshold"]), cols, n_blocks, BLOCK=BLOCK)
    ends = torch.cumsum(counts, 0, dtype=torch.int64)
    total = int(ends[-1]) if ends.numel() else 0  # one small sync: a wrong count must be an error, not a bad read
    if total != parts.arrays["values"].numel():
        raise CorruptObjectError(f"{item.name}: dare array 'values' holds {parts.arrays['values'].numel()} "
                                 f"values, the mask keeps {total}")
    return ends - counts


def _decode_fused(item: _Item, parts: _Parts, out: torch.Tensor) -> None:
    """Write ``W'`` of one delta tensor into ``out`` (contiguous, the entry's shape and dtype)."""
    rows, cols = item.matrix
    n_blocks = triton.cdiv(cols, BLOCK)
    has_base = item.base_entry is not None
    w = parts.w_pre.reshape(rows, cols)
    dummy_i = parts.trow
    brow = parts.brow if has_base else dummy_i
    bsigns = parts.barrays["signs"] if has_base else parts.trow
    grid = (rows * n_blocks,)
    if rows * n_blocks == 0:
        return
    if item.entry.codec == "bitdelta":
        _bitdelta_kernel[grid](out, w, parts.trow, parts.arrays["signs"], brow, bsigns, parts.consts, cols,
                               n_blocks, HAS_BASE=has_base, BLOCK=BLOCK, num_warps=8, enable_fp_fusion=False)
    else:
        int8 = int(item.entry.config.get("value_bits", 16)) == 8
        values = parts.arrays["values"]
        vscale = parts.arrays["scales"] if int8 else parts.consts
        _dare_kernel[grid](out, w, parts.trow, parts.offsets, values, values.numel(), vscale, brow, bsigns,
                           parts.consts, mix32_int(int(item.entry.attrs["seed"])),
                           int(item.entry.attrs["keep_threshold"]), cols, n_blocks,
                           HAS_BASE=has_base, INT8=int8, BLOCK=BLOCK, num_warps=8, enable_fp_fusion=False)


def _decode_torch(item: _Item, parts: _Parts, device: torch.device) -> torch.Tensor:
    """The reference path's operations (Registry.iter_materialize), on already-read arrays."""
    rows, cols = item.matrix
    entry = item.entry
    mask = parts.trow >= 0
    compressor = get_compressor(entry.codec, entry.config)
    decoded = compressor.decode(Encoded(parts.arrays, dict(entry.attrs)), (int(mask.sum()), cols), device)
    tau_rows = None
    if item.base_entry is not None:
        bmask = parts.brow >= 0
        base = get_compressor(item.base_entry.codec, item.base_entry.config)
        bdecoded = base.decode(Encoded(parts.barrays, dict(item.base_entry.attrs)), (int(bmask.sum()), cols), device)
        tau_rows = dbms.expand_rows(bdecoded, bmask)[mask]
    value = dbms.reconstruct(parts.w_pre.reshape(rows, cols), mask, decoded, tau_rows, item.lam1, item.lam2)
    return value.reshape(entry.shape).to(dtype_from_name(entry.dtype))


def _lossless(entry: TensorEntry, data: torch.Tensor, device) -> torch.Tensor:
    return Lossless().decode(Encoded({"data": data}, dict(entry.attrs)), entry.shape, device)


def _decode(item: _Item, parts: _Parts, device: torch.device, out: torch.Tensor | None = None) -> torch.Tensor:
    """``W'`` of one tensor on ``device``; written into ``out`` when given (fused path)."""
    entry = item.entry
    if not entry.is_delta:
        value = _lossless(entry, parts.data, device)
        if out is not None:
            out.copy_(value)
            return out
        return value
    if triton_enabled(device) and _fusable(item):
        _check_codes(item, parts)
        if entry.codec == "dare" and parts.offsets is None:
            parts.offsets = _dare_offsets(item, parts, device)
        if parts.consts is None:
            parts.consts = _consts(item, device)
        target = out
        if target is None or target.dtype != dtype_from_name(entry.dtype) or not target.is_contiguous():
            target = torch.empty(entry.shape, dtype=dtype_from_name(entry.dtype), device=device)
        _decode_fused(item, parts, target)
        if out is not None and target is not out:
            out.copy_(target)
            return out
        return target
    value = _decode_torch(item, parts, device)
    if out is not None:
        out.copy_(value)
        return out
    return value


def _items(registry: "Registry", record) -> tuple[list[_Item], ReferenceRecord, BaseRecord | None]:
    reference = registry.objects.get_record(record.reference, ReferenceRecord)
    base = registry.objects.get_record(record.base, BaseRecord) if record.base else None
    from .registry import _check_entry  # the same structural checks as the reference path

    items = []
    for name, entry in record.tensors.items():
        try:
            _check_entry(entry)
        except CorruptObjectError as exc:
            raise CorruptObjectError(f"{registry.path}: {record.task}@{record.version}, tensor {name!r}: {exc}") from None
        if not entry.is_delta:
            items.append(_Item(name, entry))
            continue
        if entry.ref not in reference.tensors:
            raise CorruptObjectError(f"{registry.path}: tensor {name!r} adds to reference tensor {entry.ref!r}, "
                                     "which the reference does not hold")
        base_entry = base.tensors.get(entry.ref) if base is not None else None
        lam1 = record.lam1 if entry.lam1 is None else entry.lam1
        lam2 = record.lam2 if entry.lam2 is None else entry.lam2
        items.append(_Item(name, entry, reference.tensors[entry.ref], base_entry, float(lam1), float(lam2)))
    return items, reference, base


# --------------------------------------------------------------------------------------------
# Streaming materialize
# --------------------------------------------------------------------------------------------
class _StagingPool:
    """Pinned host buffers reused for every host-to-device copy (CUDA only).

    A reader thread takes a free slot, waits for the copy that last used it, decodes chunks
    straight into it (no other host copy of the array exists) and queues the copy on its own
    stream; so at most ``pool_bytes`` of pinned memory exist, however large the model.
    """

    def __init__(self, pool_bytes: int, slot_bytes: int):
        self.slot_bytes = slot_bytes
        count = max(2, pool_bytes // slot_bytes)
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(count)]
        self.events: list[Any] = [None] * count
        self.free: queue.Queue[int] = queue.Queue()
        for i in range(count):
            self.free.put(i)

    def _take(self) -> int:
        i = self.free.get()
        if self.events[i] is not None:
            self.events[i].synchronize()  # the last copy out of this slot has finished
        return i

    def _send(self, i: int, nbytes: int, dst: torch.Tensor, stream) -> None:
        """Queue the copy of slot ``i``'s first ``nbytes`` into ``dst`` and hand the slot back."""
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
        slot, used, start = None, 0, 0
        try:
            for index, (_, offset, nbytes) in enumerate(reader.chunks):
                if slot is not None and used + nbytes > self.slot_bytes:
                    self._send(slot, used, d[start:start + used], stream)
                    slot = None
                if nbytes > self.slot_bytes:  # a chunk larger than a slot (another writer's layout)
                    host = torch.empty(nbytes, dtype=torch.uint8)
                    reader.read_chunk(index, memoryview(host.numpy()))
                    self.upload(host, d[offset:offset + nbytes], stream)
                    continue
                if slot is None:
                    slot, used, start = self._take(), 0, offset
                reader.read_chunk(index, memoryview(self.slots[slot].numpy()[used:used + nbytes]))
                used += nbytes
        except BaseException:
            if slot is not None:
                self.free.put(slot)
            raise
        if slot is not None:
            self._send(slot, used, d[start:start + used], stream)
        reader.finish()


def _tensors_in(value) -> list[torch.Tensor]:
    """The tensors in a reader's result (a tensor, _Parts, or tuples/lists/dicts of them)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, _Parts):
        return value.tensors()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors_in(v)]
    return []


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8, device=t.device)


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
        self.pool = (_StagingPool(staging_bytes, min(STAGING_SLOT_BYTES, staging_bytes))
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

    def __call__(self, item: _Item) -> _Parts:
        return self._read(item)

    def _read(self, item: _Item) -> _Parts:
        entry = item.entry
        if not entry.is_delta:
            return _Parts(data=self.array(entry.arrays["data"], f"{item.name}: data"))
        rows, _ = item.matrix
        ref = item.ref_entry
        if ref.codec != Lossless.name:
            raise CorruptObjectError(f"reference tensor {entry.ref!r} is stored as {ref.codec!r}, expected lossless")
        parts = _Parts(w_pre=_lossless(ref, self.array(ref.arrays["data"], f"reference {entry.ref}"), self.device))
        parts.trow = self.put(torch.from_numpy(
            _row_index(self.objects, entry.rows, rows, entry.changed_rows, self.verify, f"{item.name}: rows")))
        parts.arrays = {role: self.array(h, f"{item.name}: {role}") for role, h in entry.arrays.items()}
        if item.base_entry is not None:
            b = item.base_entry
            parts.brow = self.put(torch.from_numpy(
                _row_index(self.objects, b.rows, rows, b.changed_rows, self.verify, f"base {entry.ref}: rows")))
            parts.barrays = {role: self.array(h, f"base {entry.ref}: {role}") for role, h in b.arrays.items()}
        return parts


def iter_materialize_streaming(
    registry: "Registry",
    task: str,
    version: int | None = None,
    *,
    device: str | torch.device = "cuda",
    dtype: torch.dtype | None = None,
    verify: bool = True,
    workers: int | None = None,
    read_ahead_bytes: int | None = None,
    staging_bytes: int = STAGING_POOL_BYTES,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of a task, in record order, exactly as :meth:`Registry.iter_materialize`.

    ``workers`` reader threads read ahead while the device decodes; at most ``read_ahead_bytes``
    bytes of tensors are read but not yet decoded (always at least one tensor; on CUDA they are
    on the GPU; default READ_AHEAD_GPU_BYTES there, READ_AHEAD_HOST_BYTES elsewhere). On CUDA, ``staging_bytes`` of pinned buffers carry every copy; the yielded tensors are produced on
    the current stream (use them on it, or synchronize).
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    _, record = registry.version(task, version)
    items, _, _ = _items(registry, record)
    if read_ahead_bytes is None:
        read_ahead_bytes = READ_AHEAD_GPU_BYTES if device.type == "cuda" else READ_AHEAD_HOST_BYTES
    reader = DeviceReader(registry.objects, device, verify, staging_bytes)
    for item, parts in reader.read_ahead(reader, items, nbytes=_Item.est_bytes, budget=read_ahead_bytes,
                                         workers=workers):
        try:
            value = _decode(item, parts, device)
        except CorruptObjectError as exc:
            raise CorruptObjectError(f"{task}@{record.version}, tensor {item.name!r}: {exc}") from None
        del parts
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        yield item.name, value


def materialize_streaming(registry: "Registry", task: str, version: int | None = None, **kwargs
                          ) -> dict[str, torch.Tensor]:
    """The dict form of :func:`iter_materialize_streaming`."""
    return dict(iter_materialize_streaming(registry, task, version, **kwargs))


# --------------------------------------------------------------------------------------------
# Resident mode
# --------------------------------------------------------------------------------------------
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
    items: list[_Item]
    slots: list[dict[str, _Slot]]   # per item: role -> slot (roles: data, trow, offsets, consts, arrays)
    flat: torch.Tensor              # uint8
    fused: list[bool]
    base: str | None                # the base vector record's digest

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
    """

    def __init__(self, registry: "Registry", target: Any = None, *, device: str | torch.device = "cuda",
                 cache: str = "pinned", verify: bool = True):
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
        self.current: tuple[str, int] | None = None

    # -- loading ----------------------------------------------------------------------------
    def _load_resident(self, items: list[_Item], base_digest: str | None) -> None:
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

        def read(item: _Item):
            name = item.entry.ref
            ref = None
            if name not in self._reference:
                ref = _lossless(item.ref_entry, reader.array(item.ref_entry.arrays["data"], f"reference {name}"),
                                self.device)
            base = None
            if item.base_entry is not None and (base_digest, name) not in self._bases:
                b = item.base_entry
                rows, _ = item.matrix
                brow = _row_index(self.registry.objects, b.rows, rows, b.changed_rows, self.verify,
                                  f"base {name}: rows")
                base = (reader.put(torch.from_numpy(brow)), reader.array(b.arrays["signs"], f"base {name}: signs"))
            return ref, base

        budget = READ_AHEAD_GPU_BYTES if self.device.type == "cuda" else READ_AHEAD_HOST_BYTES
        for item, (ref, base) in reader.read_ahead(read, todo, nbytes=_Item.est_bytes, budget=budget):
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
        items, _, _ = _items(self.registry, record)
        self._load_resident(items, record.base)
        objects = self.registry.objects

        def read(item: _Item):
            """In a reader thread: the task's own arrays on the host (and the changed-row index)."""
            entry = item.entry
            arrays = {role: objects.get_array(h, verify=self.verify, what=f"{item.name}: {role}")
                      for role, h in entry.arrays.items()}
            if not entry.is_delta:
                return None, arrays
            rows, _ = item.matrix
            return torch.from_numpy(_row_index(objects, entry.rows, rows, entry.changed_rows, self.verify,
                                               f"{item.name}: rows")), arrays

        builder = _FlatBuilder()
        slots, fused = [], []
        use_triton = triton_enabled(self.device)
        for item, (trow, arrays) in read_ahead(read, items, nbytes=_Item.est_bytes, budget=READ_AHEAD_HOST_BYTES):
            entry = item.entry
            roles: dict[str, _Slot] = {}
            if not entry.is_delta:
                roles["data"] = builder.add(arrays["data"])
                slots.append(roles)
                fused.append(False)
                continue
            roles["trow"] = builder.add(trow)
            for role, array in arrays.items():
                roles["a:" + role] = builder.add(array)
            is_fused = use_triton and _fusable(item)
            if is_fused:
                parts = self._parts(item, record.base, arrays={k: v.to(self.device) for k, v in arrays.items()},
                                    trow=trow.to(self.device))
                _check_codes(item, parts)
                roles["consts"] = builder.add(_consts(item, self.device))
                if entry.codec == "dare":  # the value offsets are part of the cached code: no count pass per switch
                    roles["offsets"] = builder.add(_dare_offsets(item, parts, self.device))
            slots.append(roles)
            fused.append(is_fused)
        flat = builder.build(pin=self.cache == "pinned")
        if self.cache == "gpu":
            flat = flat.to(self.device)
        cached = _CachedTask(task, number, items, slots, flat, fused, record.base)
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

    def _parts(self, item: _Item, base_digest: str | None, *, arrays, trow, offsets=None, consts=None) -> _Parts:
        parts = _Parts(w_pre=self._reference[item.entry.ref], trow=trow, arrays=arrays, offsets=offsets,
                       consts=consts)
        if item.base_entry is not None:
            brow, signs = self._bases[(base_digest, item.entry.ref)]
            parts.brow, parts.barrays = brow, {"signs": signs}
        return parts

    # -- switching --------------------------------------------------------------------------
    def _target(self, item: _Item) -> torch.Tensor:
        target = self.tensors.get(item.name)
        if target is not None and self._allocate and (tuple(target.shape) != tuple(item.entry.shape)
                                                      or target.dtype != dtype_from_name(item.entry.dtype)):
            target = None  # our own tensor, and this task's head has another shape: replace it
        if target is None:
            if not self._allocate:
                raise NotFoundError(f"task tensor {item.name!r} has no counterpart in the resident target; "
                                    f"it holds {len(self.tensors)} tensors, e.g. {list(self.tensors)[:3]}")
            target = torch.empty(item.entry.shape, dtype=dtype_from_name(item.entry.dtype), device=self.device)
            self.tensors[item.name] = target
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
        record_base = cached.base
        flat = cached.flat
        events: list[tuple[int, Any]] = []
        if self.device.type == "cuda" and not flat.is_cuda:
            flat = self._upload(flat, events)
        elif self.device.type != "cuda" and flat.device != self.device:
            flat = flat.to(self.device)
        current = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        waited = 0
        for item, roles, is_fused in zip(cached.items, cached.slots, cached.fused):
            if events:
                # Wait for every piece that starts before this tensor's last byte.
                end = max(s.offset + s.nbytes for s in roles.values())
                while waited < len(events) and events[waited][0] < end:
                    current.wait_event(events[waited][1])
                    waited += 1
            target = self._target(item)
            if not item.entry.is_delta:
                target.copy_(_lossless(item.entry, roles["data"].view(flat), self.device))
                continue
            arrays = {role[2:]: s.view(flat) for role, s in roles.items() if role.startswith("a:")}
            parts = self._parts(item, record_base, arrays=arrays, trow=roles["trow"].view(flat),
                                offsets=roles["offsets"].view(flat) if "offsets" in roles else None,
                                consts=roles["consts"].view(flat) if "consts" in roles else None)
            if is_fused:
                _decode_fused_into(item, parts, target)
            else:
                target.copy_(_decode(item, parts, self.device))
        self.current = (task, cached.version)

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
            for start in range(0, flat.numel(), UPLOAD_PIECE_BYTES):
                end = min(flat.numel(), start + UPLOAD_PIECE_BYTES)
                landing[start:end].copy_(flat[start:end], non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
                events.append((start, event))
        return landing

    def cached_bytes(self) -> int:
        """Bytes of every cached task's flat buffer."""
        return sum(t.nbytes for t in self._tasks.values())


def _decode_fused_into(item: _Item, parts: _Parts, target: torch.Tensor) -> None:
    dtype = dtype_from_name(item.entry.dtype)
    if target.dtype == dtype and target.is_contiguous():
        _decode_fused(item, parts, target)
    else:  # a target of another dtype gets the task's values cast, like materialize(dtype=...)
        tmp = torch.empty(item.entry.shape, dtype=dtype, device=target.device)
        _decode_fused(item, parts, tmp)
        target.copy_(tmp)


__all__ = ["HAS_TRITON", "DeviceReader", "ResidentModel", "iter_materialize_streaming", "materialize_streaming", "triton_enabled"]
