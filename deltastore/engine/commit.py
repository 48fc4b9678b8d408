"""Commit as a pipeline: match a finetune to the reference, analyse it, encode and store it.

:meth:`deltastore.Registry.commit` drives it: :func:`plan_finetune` matches the finetune's
tensors to the reference's; :meth:`CommitPipeline.analyse` (pass 1) computes the closed-form
lam1 and the relative size of the delta; a tuner picks the lambdas; :meth:`CommitPipeline.encode`
(pass 2) compresses every tensor on the device while one writer thread stores the previous
one. Reader threads bring the reference, finetune and base vector tensors onto the device
ahead of both passes (:class:`deltastore.engine.reader.DeviceReader`). Nothing here updates a
ref: the registry publishes the version.
"""

from __future__ import annotations

import hashlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Iterator

import numpy as np
import torch

from ..dtypes import dtype_name, torch_dtype
from ..errors import IncompatibleFinetuneError, InvalidInputError
from ..progress import progress as progress_bar
from ..sources import TensorSource
from ..storage.layout import array_shape_problem
from ..storage.objects import ObjectStore, array_hash, to_numpy
from ..storage.records import PACKED, XOR, BaseRecord, BundledArray, ReferenceRecord, TensorEntry
from ..tensor import dbms
from ..tensor.bitpack import pack_bits
from ..tensor.pack import can_widen, keep_mantissa_bits, pack_tensors, xor_reference
from ..tensor.compressors import Compressor
from ..tensor.compressors.lossless import Lossless
from ..tuning import Lambdas
from .decode import ArrayGetter, decode_stored, numel
from .reader import DeviceReader

# Matrices smaller than this are stored losslessly: a few KB of exact bytes beat a lossy code
# whose per-array overhead (metadata, scale) would be a large part of its size anyway.
MIN_LOSSY_NUMEL = 4096
# A "finetune" whose deltas are this large relative to the reference weights (Frobenius
# norms over all compressed matrices) is almost surely another model: real finetunes move
# weights by well under 10%.
MAX_RELATIVE_DELTA = 0.5
# Commit reads the next tensors (reference and finetune) in threads, up to this many bytes
# ahead, while the device works; and lets this many encoded tensors wait for the writer thread.
# (GPU memory on CUDA; a quarter of it on the host otherwise, where the arithmetic is the limit.)
COMMIT_READ_AHEAD_BYTES = 2 << 30
COMMIT_WRITE_BEHIND = 4
# Whole tensors up to this size go into the version's pack (specs/format.md §5.8), XORed with
# the reference's: one array for all of them instead of one array and its metadata each.
# Larger ones keep an array of their own, which other versions (or the reference) may share.
PACK_MAX_BYTES = 1 << 20
# Arrays of delta entries (codes, row masks) up to this size go into the version's bundle
# (specs/format.md §5.9) instead of an array folder each, whose zarr.json (~600 bytes) is more
# than many of them hold: 39 DARE p=0.998 value arrays of all-MiniLM-L6-v2 hold 2-13 KB each.
BUNDLE_MAX_BYTES = 64 << 10


@dataclass
class EncodedVersion:
    """What pass 2 stored for a task version: its entries, pack and bundle (format §5.8, §5.9)."""

    tensors: dict[str, TensorEntry]
    pack: str | None
    bundle: str | None
    bundled: tuple[BundledArray, ...]


class Bundle:
    """The small arrays of a version's delta entries, kept here instead of stored (named by
    their content as if they were) until :meth:`store` writes them as one array."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.arrays: dict[str, np.ndarray] = {}  # on the host, in the order first put

    def put(self, objects: ObjectStore, array: torch.Tensor, txn: str, *, compress: bool) -> str:
        """The array's name; stored on its own if it is larger than the bundle takes."""
        if array.numel() * array.element_size() > self.max_bytes:
            return objects.put_array(array, txn, compress=compress)
        data = to_numpy(array)
        digest = array_hash(data)
        self.arrays.setdefault(digest, data)
        return digest

    def store(self, objects: ObjectStore, entries: dict[str, TensorEntry], txn: str
              ) -> tuple[str | None, tuple[BundledArray, ...]]:
        """Write the bundle: the arrays the entries name, in the order of §5.9 (code points of
        the entry names, each entry's arrays then its rows mask, each array once)."""
        order = list(dict.fromkeys(digest for name in sorted(entries) for digest in entries[name].array_hashes()
                                   if digest in self.arrays))
        if not order:
            return None, ()
        data = [self.arrays[d] for d in order]
        raw = np.concatenate([a.astype(a.dtype.newbyteorder("<"), copy=False).reshape(-1).view(np.uint8)
                              for a in data])
        bundled = tuple(BundledArray(d, a.dtype.name, tuple(a.shape)) for d, a in zip(order, data))
        return objects.put_array(torch.from_numpy(raw), txn), bundled


class CommitPipeline:
    """Both passes of a commit over one finetune, on ``device``.

    ``reference``/``base``: the records the deltas are taken against (``base`` may be None);
    ``plan``: :func:`plan_finetune`'s answer for ``source``.
    """

    def __init__(self, objects: ObjectStore, reference: ReferenceRecord, base: BaseRecord | None,
                 source: TensorSource, plan: "Plan", device: torch.device, progress: bool | None):
        self.objects, self.reference, self.base = objects, reference, base
        self.source, self.plan, self.device, self.progress = source, plan, device, progress
        self.reader = DeviceReader(objects, device, verify=True)
        self.lossy = [name for name in source.names() if name in plan.lossy]

    def tau(self, ref_name: str, array: ArrayGetter | None = None) -> torch.Tensor | None:
        """The base vector's tensor for reference tensor ``ref_name`` on the device (None without one)."""
        if self.base is None or ref_name not in self.base.tensors:
            return None
        if array is None:
            array = lambda digest, what: self.objects.get_array(digest, what=what).to(self.device)  # noqa: E731
        return decode_stored(self.base.tensors[ref_name], array, self.device)

    def _read(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """In a reader thread, on the device: the finetune's tensor and, for a delta, its
        reference tensor and base vector (on CUDA through pinned staging, no host copy)."""
        reader = self.reader
        ref_name = self.plan.lossy.get(name) or self.plan.xor.get(name)
        if ref_name is None:
            return None, reader.source(self.source, name), None
        w_ref = decode_stored(self.reference.tensors[ref_name], reader.array, self.device)
        return w_ref, reader.source(self.source, name), self.tau(ref_name, reader.array)

    def read_all(self, names: list[str], desc: str) -> Iterator[tuple[str, tuple]]:
        def nbytes(name: str) -> int:  # reference and finetune in the finetune's dtype, float32 base
            itemsize = self.source.dtype(name).itemsize
            return (2 * itemsize + (4 if self.base is not None else 0)) * numel(self.source.shape(name))

        budget = COMMIT_READ_AHEAD_BYTES if self.device.type == "cuda" else COMMIT_READ_AHEAD_BYTES // 4
        stream = self.reader.read_ahead(self._read, names, nbytes=nbytes, budget=budget)
        return progress_bar(stream, total=len(names), desc=desc, enabled=self.progress)

    def analyse(self, task: str, allow_unrelated: bool) -> dbms.Lam1Accumulator:
        """Pass 1: the closed-form lam1 (per tensor too) and the check that this is a finetune of
        the reference: refuses a delta over MAX_RELATIVE_DELTA unless ``allow_unrelated``."""
        acc = dbms.Lam1Accumulator()
        delta_sq = ref_sq = 0.0
        for name, (w_ref, tensor, t) in self.read_all(self.lossy, f"{task}: analyse"):
            w_pre = dbms.as_matrix(w_ref.float())
            check_finite(self.source, name, tensor)
            delta = dbms.as_matrix(tensor.float()) - w_pre
            delta_sq += float(delta.double().pow(2).sum())
            ref_sq += float(w_pre.double().pow(2).sum())
            if t is not None:
                acc.add(name, delta, dbms.as_matrix(t), dbms.changed_rows(delta))
        self.relative = (delta_sq / ref_sq) ** 0.5 if ref_sq else 0.0
        if self.relative > MAX_RELATIVE_DELTA and not allow_unrelated:
            raise IncompatibleFinetuneError(
                f"{self.source.label}: its weights differ from the reference by {self.relative:.0%} (relative "
                f"Frobenius norm); a finetune of this reference moves them by far less than "
                f"{MAX_RELATIVE_DELTA:.0%}, so this is probably another model. Pass allow_unrelated=True "
                "(--allow-unrelated) to store it anyway"
            )
        return acc

    def encode(self, task: str, compressor: Compressor, lambdas: Lambdas, seeds: dict[str, int],
               txn: str, small_tensor_bits: int | None = None, compressors: dict[str, Compressor] | None = None
               ) -> EncodedVersion:
        """Pass 2: every tensor encoded (deltas), packed or kept whole, its arrays staged in
        ``txn``, the small ones of delta entries in the version's bundle.
        ``small_tensor_bits``: the lossy option, packed float tensors keep that many mantissa bits
        of their own and the rest of the reference's (:func:`keep_mantissa_bits`); None: exact.

        ``compressors``: per finetune name, a compressor other than ``compressor`` (a budgeted
        commit's choice). A code the tuner made (``lambdas.codes``) is stored as it is.
        One writer thread stores each tensor's arrays (device-to-host copy, hash, write, fsync)
        while the device encodes the next one; one thread, so two identical arrays are never
        staged at once."""
        names = self.source.names()
        stored: dict[str, Future] = {}
        packed: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        waiting: deque[Future] = deque()
        compressors = compressors or {}
        given = lambdas.codes or {}
        bundle = Bundle(BUNDLE_MAX_BYTES)
        with ThreadPoolExecutor(1, "deltastore-write") as writer:
            for name, (w_ref, tensor, t) in self.read_all(names, f"{task}: encode"):
                if len(waiting) >= COMMIT_WRITE_BEHIND:
                    waiting.popleft().result()  # bound the encoded tensors waiting for the writer
                if name not in self.plan.lossy:  # checked for NaN/Inf before pass 1
                    if tensor.numel() * tensor.element_size() <= PACK_MAX_BYTES:
                        packed[name] = pack_pair(tensor, w_ref, small_tensor_bits)
                        continue
                    stored[name] = writer.submit(store_lossless, self.objects, tensor.cpu(), txn)
                    waiting.append(stored[name])
                    continue
                lam1, lam2 = (lambdas.per_tensor or {}).get(name, (lambdas.lam1, lambdas.lam2))
                chosen = compressors.get(name, compressor)
                code = given.get(name)
                if code is None:
                    w_pre = dbms.as_matrix(w_ref.float())
                    delta = dbms.as_matrix(tensor.float()) - w_pre
                    rows = dbms.changed_rows(delta)
                    tau_rows = None if t is None else dbms.as_matrix(t)[rows]
                    resid = dbms.residual(delta[rows], tau_rows, lam1)
                    code = dbms.MatrixCode(rows, chosen.encode(resid.contiguous(), seed=seeds[name]))
                per_tensor = (float(lam1), float(lam2)) if lambdas.per_tensor is not None else None
                encoded = _Ready(self.device)  # the writer copies the codes to the host once the device made them
                stored[name] = writer.submit(encoded.then, store_code, self.objects, code, chosen.name,
                                             chosen.config.to_dict(),
                                             tensor.shape, dtype_name(tensor.dtype), self.plan.lossy[name], txn,
                                             per_tensor, bundle)
                waiting.append(stored[name])
            entries = {name: future.result() for name, future in stored.items()}
        order = sorted(packed)  # the pack's order: code points of the names (specs/format.md §5.8)
        pack = self.objects.put_array(pack_tensors([packed[n] for n in order]), txn) if order else None
        for name in order:
            tensor, xor = packed[name]
            ref_name = None if xor is None else self.plan.xor[name]
            entries[name] = TensorEntry(shape=tuple(tensor.shape), dtype=dtype_name(tensor.dtype),
                                        codec=PACKED if ref_name is None else XOR, ref=ref_name)
        bundled_in, bundled = bundle.store(self.objects, entries, txn)
        return EncodedVersion(entries, pack, bundled_in, bundled)


def pack_pair(tensor: torch.Tensor, w_ref: torch.Tensor | None, small_tensor_bits: int | None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A small tensor as a pack stores it, with what it is XORed with (None: packed as it is),
    both on the CPU; ``small_tensor_bits`` (the lossy option) acts on XORed float tensors only."""
    xor = None if w_ref is None else xor_reference(tensor.dtype, w_ref.cpu())
    if xor is not None and small_tensor_bits is not None:
        tensor = keep_mantissa_bits(tensor.cpu(), xor, small_tensor_bits)
    return tensor.cpu(), xor


def store_code(objects: ObjectStore, code: dbms.MatrixCode, compressor: str, config: dict, shape, dtype: str,
               ref_name: str, txn: str, lambdas: tuple[float, float] | None = None,
               bundle: Bundle | None = None) -> TensorEntry:
    """Stage a delta's arrays (and its changed-row mask unless every row changed), or keep
    the small ones in ``bundle``; its entry."""
    put = objects.put_array if bundle is None else partial(bundle.put, objects)
    arrays = {role: put(a, txn, compress=_compressible(a)) for role, a in code.encoded.arrays.items()}
    n_changed = int(code.rows.sum())
    rows = None if n_changed == code.rows.numel() else put(pack_bits(code.rows), txn, compress=False)
    entry = TensorEntry(shape=tuple(shape), dtype=dtype, codec=compressor, config=dict(config), arrays=arrays,
                        attrs=dict(code.encoded.attrs), ref=ref_name, rows=rows, changed_rows=n_changed)
    return entry if lambdas is None else replace(entry, lam1=lambdas[0], lam2=lambdas[1])


@dataclass
class Plan:
    """How a finetune's tensors map onto the reference."""

    lossy: dict[str, str]       # finetune name -> reference name, stored as a DBMS delta
    lossy_ref: dict[str, str]   # the inverse
    missing_buffers: list[str]  # non-float reference tensors absent from the finetune
    xor: dict[str, str]         # whole tensors -> reference tensor of the same dtype and shape (packs XOR them)
    prefix: str                 # what finetune names have before the reference's ("bert." of a classifier)


def plan_finetune(reference: ReferenceRecord, source: TensorSource) -> Plan:
    """Match finetune tensors to reference tensors, allowing one model prefix (``bert.``).

    A classifier finetune saves the encoder under a prefix the bare reference lacks; we find
    the single prefix that maps the most reference names and use it for all of them.
    """
    names = source.names()
    if not names:
        raise InvalidInputError(f"{source.label}: the finetune holds no tensors")
    ref_names = set(reference.tensors)
    prefixes: dict[str, int] = {}
    for name in names:
        for i, ch in enumerate(name):
            if ch == "." and name[i + 1:] in ref_names:
                prefixes[name[: i + 1]] = prefixes.get(name[: i + 1], 0) + 1
    direct = sum(1 for n in names if n in ref_names)
    prefix = max(prefixes, key=prefixes.get) if prefixes and max(prefixes.values()) > direct else ""
    mapping = {n: n[len(prefix):] for n in names if n.startswith(prefix) and n[len(prefix):] in ref_names}
    matched = set(mapping.values())
    missing = [r for r in reference.tensors if r not in matched]
    missing_float = [r for r in missing if torch_dtype(reference.tensors[r].dtype).is_floating_point]
    if missing_float:
        shown = ", ".join(repr(prefix + m) for m in missing_float[:5])
        more = f" and {len(missing_float) - 5} more" if len(missing_float) > 5 else ""
        raise IncompatibleFinetuneError(
            f"{source.label}: reference tensor(s) {shown}{more} are missing from the finetune; a finetune must "
            "hold every weight of the reference (task-own extra tensors are fine)"
        )
    lossy, xor = {}, {}
    for name, ref_name in mapping.items():
        entry = reference.tensors[ref_name]
        shape, dtype = source.shape(name), source.dtype(name)
        if tuple(shape) != tuple(entry.shape):
            raise IncompatibleFinetuneError(
                f"{source.label}: tensor {name!r} has shape {list(shape)}, the reference's {ref_name!r} has "
                f"{list(entry.shape)}; resized tensors are not deltas of the reference"
            )
        ref_dtype = torch_dtype(entry.dtype)
        if dtype.is_floating_point != ref_dtype.is_floating_point:
            raise IncompatibleFinetuneError(
                f"{source.label}: tensor {name!r} is {dtype_name(dtype)}, the reference's is {entry.dtype}"
            )
        if dtype.is_floating_point and len(shape) >= 2 and numel(shape) >= MIN_LOSSY_NUMEL:
            lossy[name] = ref_name
        elif dtype_name(dtype) == entry.dtype or can_widen(ref_dtype, dtype):
            xor[name] = ref_name
    return Plan(lossy, {r: n for n, r in lossy.items()}, missing, xor, prefix)


def check_small_tensor_bits(plan: Plan, reference: ReferenceRecord, source: TensorSource, bits: int | None) -> None:
    """Refuse ``small_tensor_bits`` where it would change nothing, rather than record as lossy a
    commit that stores its small tensors exactly: it acts on the packed floating-point tensors
    XORed with the reference's, and a pack XORs only with a reference tensor of the same dtype
    or a narrower float one (specs/format.md §5.8), which a float16 finetune of a float32
    reference, for one, lacks."""
    if bits is None:
        return
    small = [n for n in source.names() if n not in plan.lossy and source.dtype(n).is_floating_point
             and numel(source.shape(n)) * source.dtype(n).itemsize <= PACK_MAX_BYTES]
    if any(n in plan.xor for n in small):
        return
    matched = [n for n in small if n.startswith(plan.prefix) and n[len(plan.prefix):] in reference.tensors]
    found = "it has no small floating-point tensor" if not small else (
        f"none of its {len(small)} small floating-point tensors has one" + (
            f" ({matched[0]!r} is {dtype_name(source.dtype(matched[0]))}, the reference's "
            f"{reference.tensors[matched[0][len(plan.prefix):]].dtype})" if matched else ""))
    raise InvalidInputError(
        f"{source.label}: small_tensor_bits={bits} would change nothing: it keeps mantissa bits of the small "
        f"floating-point tensors that are stored XORed with the reference tensor of the same name and dtype (or a "
        f"narrower float type), and {found}; commit without it (or save the finetune in the reference's dtype)")


def check_storable(source: TensorSource, name: str) -> None:
    """A tensor stored whole (lossless) becomes one array of its shape and item size: refuse
    what the reader would refuse (storage.layout.array_shape_problem), before any write."""
    shape = tuple(source.shape(name))
    problem = array_shape_problem(shape, source.dtype(name).itemsize)
    if problem:
        raise InvalidInputError(f"{source.label}: tensor {name!r} {problem}; deltastore cannot store it, so it "
                                "could not be read back: drop or reshape it in the checkpoint")


def check_finite(source: TensorSource, name: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise InvalidInputError(
            f"{source.label}: tensor {name!r} holds {bad} NaN or infinite value(s); fix the checkpoint first"
        )


class _Ready:
    """Marks the work queued so far on ``device``'s current stream; :meth:`then` runs a function
    (in another thread) once that work is done, so the thread may read tensors it produced."""

    def __init__(self, device: torch.device):
        self.event = None
        if device.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(device))

    def then(self, fn, *args):
        if self.event is not None:
            self.event.synchronize()
        return fn(*args)


def _compressible(array: torch.Tensor) -> bool:
    # Packed bits and quantized codes are close to random bytes: zstd only costs decode time.
    return array.dtype not in (torch.uint8, torch.int8)


def store_lossless(objects: ObjectStore, tensor: torch.Tensor, txn: str, *, compress: bool = True) -> TensorEntry:
    encoded = Lossless().encode(tensor)
    arrays = {role: objects.put_array(a, txn, compress=compress) for role, a in encoded.arrays.items()}
    return TensorEntry(shape=tuple(tensor.shape), dtype=dtype_name(tensor.dtype), codec=Lossless.name, config={},
                       arrays=arrays, attrs=dict(encoded.attrs))


def content_sha256(source: TensorSource) -> str:
    """SHA-256 of what a finetune holds (specs/format.md §5.5, ``source.sha256``): every tensor
    in name order (name, dtype, shape, little-endian bytes), then every side file stored with
    it in path order. The same weights give the same hash however they are sharded or saved."""
    digest = hashlib.sha256()
    for name in sorted(source.names()):
        tensor = source.get(name).contiguous().reshape(-1)
        shape = ",".join(str(d) for d in source.shape(name))
        digest.update(f"tensor\0{name}\0{dtype_name(tensor.dtype)}\0{shape}\0".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    for rel in sorted(source.files):
        data = source.files[rel].read_bytes()
        digest.update(f"file\0{rel}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def commit_settings(tune, calibration, per_layer: bool, tune_options, seed: int,
                    small_tensor_bits: int | None = None) -> dict[str, Any] | None:
    """The commit arguments not in a version's other fields (``source.settings``), or None
    when they cannot be compared with an earlier commit's: a tuner given as a function,
    calibration inputs that hashing would consume (an iterator), tuner options holding
    objects (a model)."""
    if (callable(tune) or (calibration is not None and not isinstance(calibration, (list, tuple)))
            or not _is_plain(dict(tune_options or {}))):
        return None
    from ..calibration import calibration_sha256

    settings = {"tune": tune or "l2", "per_layer": per_layer, "tune_options": dict(tune_options or {}), "seed": seed,
                "calibration": None if calibration is None else calibration_sha256(calibration)}
    if small_tensor_bits is not None:  # only then: settings of exact commits stay as before format 1.2
        settings["small_tensor_bits"] = small_tensor_bits
    return plain(settings)


def _is_plain(value: Any) -> bool:
    """Scalars, strings and lists and maps of them: what a record can hold and compare."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def store_files(objects: ObjectStore, source: TensorSource, txn: str,
                reference: ReferenceRecord | None = None) -> dict[str, str]:
    """Stage a model's side files; a finetune's (``reference`` given) each as a patch against the
    reference's file of the same path where that is smaller (specs/format.md §3.3: a re-saved
    tokenizer differs little from the reference's)."""
    return {rel: objects.put_blob(path.read_bytes(), txn, dictionary=reference and reference.files.get(rel))
            for rel, path in source.files.items()}


def plain(value: Any) -> Any:
    """Tuning records may hold tuples or tensors: make them msgpack-plain."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


