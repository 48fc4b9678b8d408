"""The one decoder: a stored tensor entry (specs/format.md §5.2, §6) to a tensor.

Every reader goes through here: streaming materialize on any device, :class:`ResidentModel`,
commit (reference tensors and base vectors), ``verify`` and the benchmarks. A delta tensor is
rebuilt by its compressor's fused decoder when it has one and Triton runs on the device
(deltastore.tensor.fused), otherwise by the compressor's reference ``decode`` and
:func:`deltastore.tensor.dbms.reconstruct`; both give the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import numpy as np
import torch

from ..dtypes import torch_dtype
from ..errors import CorruptObjectError, UnknownNameError
from ..storage.records import PACKED_CODECS, XOR, BaseRecord, ReferenceRecord, TaskVersion, TensorEntry
from ..tensor import dbms
from ..tensor.bitpack import packed_size, unpack_bits
from ..tensor.compressors import Compressor, Encoded, compressor_class, fused_decoder, get_compressor
from ..tensor.compressors.base import required_array, required_attr
from ..tensor.compressors.lossless import Lossless
from ..tensor.fused import BaseTerm, FusedDecoder, FusedJob, triton_enabled
from ..tensor.pack import can_widen, carrier, packed_nbytes, unpack_carrier, xor_reference

# ``array(digest, what)``: a stored array on the decode device.
ArrayGetter = Callable[[str, str], torch.Tensor]


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def check_entry(entry: TensorEntry) -> None:
    """specs/format.md §5.2/§6: lossless entries are whole tensors, every other compressor is a
    delta on a float tensor; a record mixing the two was not written by deltastore."""
    if entry.codec in PACKED_CODECS:
        if entry.config or entry.arrays or entry.attrs or entry.rows or entry.changed_rows is not None \
                or entry.lam1 is not None or entry.lam2 is not None or (entry.codec == XOR) != (entry.ref is not None):
            raise CorruptObjectError(f"{entry.codec} entry with fields of a stored array or a delta, or a ref where "
                                     f"it may have none: only shape, dtype and ({XOR}) ref may be set "
                                     "(specs/format.md §5.8)")
        torch_dtype(entry.dtype)  # one of the lossless page's dtypes, or refused
        return
    compressor_class(entry.codec)  # an unknown compressor is named as such, before its fields are judged
    if (entry.codec == Lossless.name) != (entry.ref is None):
        raise CorruptObjectError(f"tensor entry with codec {entry.codec!r} has ref {entry.ref!r}: {Lossless.name} "
                                 "entries have no ref and delta entries need one")
    if entry.codec == Lossless.name and entry.attrs.get("dtype") != entry.dtype:
        raise CorruptObjectError(f"{Lossless.name} entry of dtype {entry.dtype!r} stores data of dtype "
                                 f"{entry.attrs.get('dtype')!r}")
    if entry.ref is not None and not torch_dtype(entry.dtype).is_floating_point:
        raise CorruptObjectError(f"delta entry of non-float dtype {entry.dtype!r}")


def changed_rows(entry: TensorEntry) -> int:
    """Rows of a delta entry its code covers (all rows when the record has no mask)."""
    return int(entry.changed_rows if entry.changed_rows is not None else entry.shape[0])


def row_index(objects, digest: str | None, rows: int, expected: int | None, verify: bool, what: str) -> np.ndarray:
    """int32 ``(rows,)``: the changed-row number of each row, -1 for unchanged rows (host side)."""
    if digest is None:
        mask = np.ones(rows, dtype=bool)
    else:
        packed = objects.get_array(digest, verify=verify, what=what).numpy()
        if packed.dtype != np.uint8 or packed.ndim != 1 or packed.size != packed_size(rows):
            raise CorruptObjectError(f"{what}: the record and its stored arrays are inconsistent: the changed-row "
                                     f"mask must be uint8 ({packed_size(rows)},), found {packed.dtype} {packed.shape}")
        mask = np.unpackbits(packed, bitorder="little")[:rows].astype(bool)
    if expected is not None and int(mask.sum()) != expected:
        raise CorruptObjectError(f"{what}: changed-row mask holds {int(mask.sum())} rows, the record says {expected}")
    return np.where(mask, np.cumsum(mask, dtype=np.int64) - 1, -1).astype(np.int32)


@dataclass
class TensorPlan:
    """One output tensor: its entry, the reference entry it adds to, the base entry, lambdas;
    for a packed entry, ``data``: its carrier values, already read from the version's pack."""

    name: str
    entry: TensorEntry
    ref_entry: TensorEntry | None = None
    base_entry: TensorEntry | None = None
    lam1: float = 0.0
    lam2: float = 1.0
    data: torch.Tensor | None = None

    @property
    def matrix(self) -> tuple[int, int]:
        shape = self.entry.shape
        return int(shape[0]), numel(shape[1:])

    def est_bytes(self) -> int:
        itemsize = torch.empty((), dtype=torch_dtype(self.entry.dtype)).element_size()
        return max(1, numel(self.entry.shape)) * itemsize

    @cached_property
    def compressor(self) -> Compressor:
        return get_compressor(self.entry.codec, self.entry.config)

    @cached_property
    def fused(self) -> FusedDecoder | None:
        """The compressor's fused decoder, when the tensor can use it (its kernels add a
        BitDelta base term only)."""
        if not self.entry.is_delta:
            return None
        if self.base_entry is not None and self.base_entry.codec != dbms.BASE_COMPRESSOR:
            return None
        return fused_decoder(self.compressor)


@dataclass
class Parts:
    """The stored inputs of one tensor, on the decode device.

    ``w_pre``: reference tensor (its own dtype); ``trow``/``brow``: int32 ``(rows,)`` changed-row
    index of each row or -1, for the task and the base; ``arrays``/``barrays``: the codes;
    ``prepared``: what the fused decoder prepared (kept by a resident cache).
    """

    data: torch.Tensor | None = None          # lossless entries: the stored carrier array
    w_pre: torch.Tensor | None = None
    trow: torch.Tensor | None = None
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)
    brow: torch.Tensor | None = None
    barrays: dict[str, torch.Tensor] = field(default_factory=dict)
    prepared: dict[str, torch.Tensor] = field(default_factory=dict)

    def tensors(self) -> list[torch.Tensor]:
        out = [t for t in (self.data, self.w_pre, self.trow, self.brow) if t is not None]
        return out + list(self.arrays.values()) + list(self.barrays.values()) + list(self.prepared.values())


def check_delta(entry: TensorEntry, reference: ReferenceRecord, base: BaseRecord | None) -> None:
    """specs/format.md §6: a delta entry adds to a reference tensor of its own shape, and a
    base vector entry for that tensor is a float32 BitDelta matrix of the same shape.
    (A record that breaks this has pieces that do not fit: damaged or crafted.)"""
    ref_entry = reference.tensors.get(entry.ref)
    if ref_entry is None:
        raise CorruptObjectError(f"inconsistent record: delta entry adds to reference tensor {entry.ref!r}, which "
                                 "the reference does not hold; run `deltastore verify`")
    if (ref_entry.shape != entry.shape or not entry.shape
            or not torch_dtype(ref_entry.dtype).is_floating_point):
        raise CorruptObjectError(f"inconsistent record: delta entry of shape {list(entry.shape)} adds to reference "
                                 f"tensor {entry.ref!r} of shape {list(ref_entry.shape)} and dtype {ref_entry.dtype}, "
                                 "expected the same shape of 1 or more dimensions and a float dtype; run "
                                 "`deltastore verify`")
    base_entry = base.tensors.get(entry.ref) if base is not None else None
    if base_entry is not None and (base_entry.codec != dbms.BASE_COMPRESSOR or base_entry.dtype != "float32"
                                   or base_entry.shape != entry.shape or base_entry.ref != entry.ref):
        raise CorruptObjectError(
            f"inconsistent base vector: its entry for {entry.ref!r} is {base_entry.codec} {base_entry.dtype} of shape "
            f"{list(base_entry.shape)} adding to {base_entry.ref!r}; expected {dbms.BASE_COMPRESSOR} float32 of shape "
            f"{list(entry.shape)} adding to {entry.ref!r}; run `deltastore verify`")


def inputs(objects, record: TaskVersion, where: str) -> tuple[ReferenceRecord, BaseRecord | None]:
    """The reference and base vector records a task version is rebuilt from."""
    reference = objects.get_record(record.reference, ReferenceRecord)
    base = objects.get_record(record.base, BaseRecord) if record.base else None
    if base is not None and base.reference != record.reference:
        # specs/format.md §6: a base vector of another reference would add the wrong tau_base.
        raise CorruptObjectError(
            f"{where}: {record.task}@{record.version} uses base vector {base.name!r} (record "
            f"{record.base[:12]}), built against reference {base.reference[:12]}, but the version's reference "
            f"is {record.reference[:12]}; the record is damaged or crafted: run `deltastore verify`")
    return reference, base


def unpack(objects, record: TaskVersion, reference: ReferenceRecord) -> dict[str, torch.Tensor]:
    """The carrier values of every packed entry of ``record``, read from its pack (specs/format.md
    §5.8) and XORed back with the reference's tensors. The pack is small: it is read whole (and
    rehashed) on the host, once per task version read."""
    names = record.packed()
    if not names:
        return {}
    if record.pack is None:
        raise CorruptObjectError(f"{len(names)} tensor(s) are packed, e.g. {names[0]!r}, but the record names no pack")
    sizes = [packed_nbytes(record.tensors[n].shape, torch_dtype(record.tensors[n].dtype)) for n in names]
    # The pack and every reference tensor it is XORed with, requested together.
    with objects.arrays_ahead([(record.pack, "pack")] + _xor_arrays(record, names, reference)):
        return _unpacked(objects, record, reference, names, sizes)


def _xor_arrays(record: TaskVersion, names: list[str], reference: ReferenceRecord) -> list[tuple[str, str]]:
    """``(digest, what)`` of the reference arrays :func:`_unpacked` reads (a hint: an entry it
    refuses is left out here)."""
    wanted = []
    for name in names:
        entry = record.tensors[name]
        ref_entry = reference.tensors.get(entry.ref) if entry.codec == XOR else None
        if ref_entry is not None and "data" in ref_entry.arrays:
            wanted.append((ref_entry.arrays["data"], f"reference {entry.ref}"))
    return wanted


def _unpacked(objects, record: TaskVersion, reference: ReferenceRecord, names: list[str], sizes: list[int]
              ) -> dict[str, torch.Tensor]:
    data = objects.get_array(record.pack, what="pack")
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() != sum(sizes):
        raise CorruptObjectError(f"the pack must be uint8 ({sum(sizes)},) for its {len(names)} tensors, found "
                                 f"{data.dtype} {tuple(data.shape)}")
    out, start = {}, 0
    for name, size in zip(names, sizes):
        entry = record.tensors[name]
        xor = None
        dtype = torch_dtype(entry.dtype)
        if entry.codec == XOR:
            ref_entry = reference.tensors.get(entry.ref)
            if ref_entry is None or (ref_entry.codec, ref_entry.shape) != (Lossless.name, entry.shape) or not (
                    ref_entry.dtype == entry.dtype or can_widen(torch_dtype(ref_entry.dtype), dtype)):
                raise CorruptObjectError(
                    f"tensor {name!r}: packed against reference tensor {entry.ref!r}, which is "
                    f"{ref_entry and (ref_entry.codec, ref_entry.dtype, list(ref_entry.shape))}; expected a "
                    f"{Lossless.name} tensor of shape {list(entry.shape)}, {entry.dtype} or a float type it widens")
            xor = objects.get_array(required_array(ref_entry.arrays, "data"), what=f"reference {entry.ref}")
            if ref_entry.dtype != entry.dtype:  # since 1.4: the reference's values in this dtype
                widened = xor_reference(dtype, Lossless().decode(Encoded({"data": xor}, {"dtype": ref_entry.dtype}),
                                                                 entry.shape, "cpu"))
                if widened is None:
                    raise CorruptObjectError(f"tensor {name!r}: packed against reference tensor {entry.ref!r}, "
                                             f"{ref_entry.dtype} with a NaN, which converts to {entry.dtype} inexactly")
                xor = carrier(widened)
        out[name] = unpack_carrier(data[start:start + size], entry.shape, dtype, xor)
        start += size
    return out


def plan(objects, record: TaskVersion, where: str) -> list[TensorPlan]:
    """The tensors of a task version in record order, checked against the records they use."""
    reference, base = inputs(objects, record, where)
    plans = []
    for name, entry in record.tensors.items():
        try:
            check_entry(entry)
            if entry.is_delta:
                check_delta(entry, reference, base)
        except (CorruptObjectError, UnknownNameError) as exc:
            raise type(exc)(f"{where}: {record.task}@{record.version}, tensor {name!r}: {exc}") from None
    try:
        packed = unpack(objects, record, reference)
    except CorruptObjectError as exc:
        raise CorruptObjectError(f"{where}: {record.task}@{record.version}: {exc}") from None
    for name, entry in record.tensors.items():
        if not entry.is_delta:
            plans.append(TensorPlan(name, entry, data=packed.get(name)))
            continue
        base_entry = base.tensors.get(entry.ref) if base is not None else None
        lam1 = record.lam1 if entry.lam1 is None else entry.lam1
        lam2 = record.lam2 if entry.lam2 is None else entry.lam2
        plans.append(TensorPlan(name, entry, reference.tensors[entry.ref], base_entry, float(lam1), float(lam2)))
    return plans


def lossless(entry: TensorEntry, data: torch.Tensor, device) -> torch.Tensor:
    """A lossless or packed entry's tensor from its carrier values (check_entry saw that a
    lossless entry's ``dtype`` attr is the entry's dtype)."""
    return Lossless().decode(Encoded({"data": data}, {"dtype": entry.dtype}), entry.shape, device)


def fused_job(item: TensorPlan, parts: Parts) -> FusedJob:
    rows, cols = item.matrix
    base = None
    if item.base_entry is not None:
        b = item.base_entry
        base = BaseTerm(parts.brow, parts.barrays.get("signs"), float(required_attr(b.attrs, "scale", float)),
                        changed_rows(b))
    return FusedJob(item.name, rows, cols, changed_rows(item.entry), dict(item.entry.attrs), item.lam1, item.lam2,
                    parts.w_pre.reshape(rows, cols), parts.trow, parts.arrays, base, parts.prepared)


def prepare_fused(item: TensorPlan, parts: Parts) -> FusedJob:
    """The job of a fused decode; without prepared inputs in ``parts``, the stored arrays are
    checked and the inputs prepared. Parts that come with them (a resident cache) were checked
    when they were prepared: a switch pays neither again."""
    job = fused_job(item, parts)
    if not job.prepared:
        item.fused.check(job)
        if job.base is not None:
            job.base.check(job.cols, item.name)
        job.prepared.update(item.fused.prepare(job))
    return job


def reference_decode(item: TensorPlan, parts: Parts, device: torch.device) -> torch.Tensor:
    """The compressor's own decode, then :func:`dbms.reconstruct`."""
    rows, cols = item.matrix
    entry = item.entry
    mask = parts.trow >= 0
    decoded = item.compressor.decode(Encoded(parts.arrays, dict(entry.attrs)), (int(mask.sum()), cols), device)
    tau_rows = None
    if item.base_entry is not None:
        bmask = parts.brow >= 0
        base = get_compressor(item.base_entry.codec, item.base_entry.config)
        bdecoded = base.decode(Encoded(parts.barrays, dict(item.base_entry.attrs)), (int(bmask.sum()), cols), device)
        tau_rows = dbms.expand_rows(bdecoded, bmask)[mask]
    value = dbms.reconstruct(parts.w_pre.reshape(rows, cols), mask, decoded, tau_rows, item.lam1, item.lam2)
    return value.reshape(entry.shape).to(torch_dtype(entry.dtype))


def _fused_into(item: TensorPlan, out: torch.Tensor | None, device: torch.device) -> bool:
    """Can the fused decoder write straight into ``out``?"""
    return (item.entry.is_delta and item.fused is not None and triton_enabled(device) and out is not None
            and out.dtype == torch_dtype(item.entry.dtype) and out.is_contiguous())


def decode(item: TensorPlan, parts: Parts, device: torch.device, out: torch.Tensor | None = None) -> torch.Tensor:
    """``W'`` of one tensor on ``device``, in the finetune's dtype; written into ``out`` (any
    dtype: the value is cast) when given, and returned."""
    entry = item.entry
    if _fused_into(item, out, device):
        item.fused.run(prepare_fused(item, parts), out)
        return out
    if not entry.is_delta:
        value = lossless(entry, parts.data, device)
    elif item.fused is not None and triton_enabled(device):
        value = torch.empty(entry.shape, dtype=torch_dtype(entry.dtype), device=device)
        item.fused.run(prepare_fused(item, parts), value)
    else:
        value = reference_decode(item, parts, device)
    if out is None:
        return value
    out.copy_(value)
    return out


def decode_split(item: TensorPlan, parts: Parts, device: torch.device, out: torch.Tensor) -> Callable[[], None] | None:
    """:func:`decode` into ``out``, except that the pass over the kept elements of a fused
    decoder that has one (``run_kept``, see tensor/fused.py) is returned, not run: the caller
    runs it after the work this call queued, on any stream, before ``out`` is read."""
    if _fused_into(item, out, device) and hasattr(item.fused, "run_kept"):
        job = prepare_fused(item, parts)
        item.fused.run_dense(job, out)
        return lambda: item.fused.run_kept(job, out)
    decode(item, parts, device, out=out)
    return None


def decode_stored(entry: TensorEntry, array: ArrayGetter, device) -> torch.Tensor:
    """A lossless entry as stored, or a base vector entry expanded to full rows (zeros on the
    rows it does not cover); ``array`` reads the stored arrays."""
    check_entry(entry)
    if entry.codec == Lossless.name:
        get_compressor(Lossless.name, entry.config)  # refuses stray config fields
        return lossless(entry, array(required_array(entry.arrays, "data"), "data"), device)
    rows, decoded = decode_code(entry, array, device)
    return dbms.expand_rows(decoded, rows).reshape(entry.shape)


def decode_code(entry: TensorEntry, array: ArrayGetter, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(bool row mask ``(rows,)``, float32 ``(changed_rows, cols)``) of a delta entry: its
    compressor's decode of the changed rows, before any lambda or reference."""
    rows_total = int(entry.shape[0])
    cols = numel(entry.shape[1:])
    if entry.rows is None:
        rows = torch.ones(rows_total, dtype=torch.bool, device=device)
    else:
        packed = array(entry.rows, "rows")
        if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_size(rows_total):
            raise CorruptObjectError(f"the record and its stored arrays are inconsistent: the changed-row mask must "
                                     f"be uint8 ({packed_size(rows_total)},), found {packed.dtype} {tuple(packed.shape)}")
        rows = unpack_bits(packed, rows_total)
    if entry.changed_rows is not None and int(rows.sum()) != entry.changed_rows:
        raise CorruptObjectError(f"changed-row mask holds {int(rows.sum())} rows, the record says "
                                 f"{entry.changed_rows}")
    compressor = get_compressor(entry.codec, entry.config)
    encoded = Encoded({role: array(h, role) for role, h in entry.arrays.items()}, dict(entry.attrs))
    return rows, compressor.decode(encoded, (int(rows.sum()), cols), device)
