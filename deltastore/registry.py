"""The registry: init, base vectors, commits, materialize, history, verify and gc.

This module ties the pure tensor math (``deltastore.tensor``) to the storage layer
(``deltastore.storage``); it never imports zarr itself. The on-disk layout and every record
are specified in specs/format.md.
"""

from __future__ import annotations

import os
import re
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch

from .errors import (AlreadyExistsError, CorruptObjectError, DeltastoreError, IncompatibleFinetuneError,
                     InvalidInputError, NotFoundError)
from .engine.decode import ArrayGetter, decode_stored, numel as _numel
from .engine.materialize import iter_materialize, resolve_device
from .engine.reader import DeviceReader
from .progress import progress as _progress
from .sources import TensorSource, open_source
from .storage.backend import LocalBackend
from .storage.objects import ObjectStore
from .storage.records import (FORMAT_MAJOR, FORMAT_MINOR, FORMAT_NAME, BaseRecord, PointerRef, Record,
                              ReferenceRecord, RegistryInfo, TaskRef, TaskVersion, TensorEntry, pack, unpack)
from .tensor import dbms
from .tensor.bitpack import pack_bits
from .tensor.compressors import compressor_class, get_compressor
from .tensor.compressors.lossless import Lossless, dtype_from_name, dtype_name
from .tensor.prng import derive_seed
from .tuning import Lambdas, TuneContext, Tuner, get_tuner

INFO_KEY = "registry.msgpack"
INIT_LEFTOVERS = frozenset({"objects", "staging", "refs", "locks"})  # all a registry holds but INFO_KEY
REFERENCE_REF = "refs/reference"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

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


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _killed_put(name: str, key: str) -> bool:
    """Is ``name`` the temp file of an atomic put of ``key`` that was killed (LocalBackend.put)?"""
    return name.startswith(f".{key}.") and name.endswith(".tmp")


def check_name(kind: str, name: str) -> str:
    """Task and base names become file names: refuse anything that could escape the registry."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:  # fullmatch: '$' allows "x\n"
        raise InvalidInputError(
            f"invalid {kind} name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit, without '..'"
        )
    return name


def parse_spec(spec: str) -> tuple[str, int | None]:
    """``TASK`` or ``TASK@VERSION`` -> (task, version or None)."""
    task, sep, version = spec.partition("@")
    if not sep:
        return task, None
    if not (version.isascii() and version.isdigit()):  # '²'.isdigit() is True, int('²') fails
        raise InvalidInputError(f"invalid task version {spec!r}: expected TASK@N with N a positive integer")
    return task, int(version)


@dataclass
class VersionStats:
    """Bytes a task version owns on disk and the ratios they give (specs/format.md §10)."""

    own_bytes: int            # record + every array and blob not shared with the reference
    amortized_bytes: float    # the same, with objects other tasks also use split between them
    base_bytes: int           # the base vector's bytes (0 without one)
    base_users: int           # tasks whose latest version uses that base vector
    source_bytes: int         # the finetune's tensors in their original dtype
    source_fp16_bytes: int    # the finetune's tensors at 2 bytes per element

    @property
    def base_share(self) -> float:
        return self.base_bytes / self.base_users if self.base_users else 0.0

    def to_dict(self) -> dict[str, Any]:
        total = self.own_bytes + self.base_share
        amortized = self.amortized_bytes + self.base_share
        return {
            "own_bytes": self.own_bytes,
            "amortized_bytes": round(self.amortized_bytes),
            "base_bytes": self.base_bytes,
            "base_users": self.base_users,
            "base_share_bytes": round(self.base_share),
            "source_bytes": self.source_bytes,
            "source_fp16_bytes": self.source_fp16_bytes,
            "ratio_fp16": self.source_fp16_bytes / self.own_bytes if self.own_bytes else None,
            "ratio_source_dtype": self.source_bytes / self.own_bytes if self.own_bytes else None,
            "ratio_fp16_with_base_share": self.source_fp16_bytes / total if total else None,
            "ratio_fp16_amortized": self.source_fp16_bytes / amortized if amortized else None,
        }


class Registry:
    """A deltastore registry directory. Open an existing one with ``Registry(path)``,
    create one with :meth:`Registry.init`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.backend = LocalBackend(self.path)
        self.objects = ObjectStore(self.backend)
        if not self.backend.exists(INFO_KEY):
            raise NotFoundError(
                f"{self.path}: not a deltastore registry (no {INFO_KEY}); create one with `deltastore init`"
            )
        what = f"{self.path}/{INFO_KEY}"
        self.info = RegistryInfo.from_dict(unpack(self.backend.get(INFO_KEY), what), what)

    def __repr__(self) -> str:
        return f"Registry({str(self.path)!r})"

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def init(cls, path: str | os.PathLike, reference: Any, *, compress_reference: bool = False,
             progress: bool | None = None) -> "Registry":
        """Create a registry at ``path`` holding ``reference`` (HF directory, .safetensors
        file or state dict), every tensor stored losslessly, plus its non-weight files.

        The reference's arrays are written without zstd unless ``compress_reference``: every
        materialize without a resident reference reads all of them, zstd shrinks float weights
        only ~1.3x, and decoding it was the largest host cost of that read (speed.md); the
        reference is stored once however many tasks the registry holds."""
        root = Path(path)
        if (root / INFO_KEY).exists():
            raise AlreadyExistsError(f"{root}: a registry already exists here; open it instead of running init")
        # What a killed init leaves (it writes registry.msgpack last) may be initialized over.
        if root.exists() and any(p.name not in INIT_LEFTOVERS and not _killed_put(p.name, INFO_KEY)
                                 for p in root.iterdir()):
            raise AlreadyExistsError(f"{root}: directory is not empty; give a new or empty directory")
        source = open_source(reference)
        if not source.names():
            raise InvalidInputError(f"{source.label}: the reference holds no tensors")
        backend = LocalBackend(root)
        objects = ObjectStore(backend)
        with backend.lock("registry", shared=True):
            txn = objects.new_txn()
            tensors = {}
            for name in _progress(source.names(), total=len(source.names()), desc="reference", enabled=progress):
                tensor = source.get(name)
                _check_finite(source, name, tensor)
                tensors[name] = _store_lossless(objects, tensor, txn, compress=compress_reference)
            files = _store_files(objects, source, txn)
            record = ReferenceRecord(created=utc_now(), tensors=tensors, files=files)
            digest = objects.put_record(record, txn)
            backend.put(REFERENCE_REF, pack(PointerRef(digest).to_dict()))
            # The info file goes last: a directory without it is not a registry, so a killed
            # init leaves nothing that could be mistaken for one.
            info = RegistryInfo(FORMAT_NAME, (FORMAT_MAJOR, FORMAT_MINOR), utc_now())
            backend.put(INFO_KEY, pack(info.to_dict()))
            backend.delete(txn)
        return cls(root)

    # -- lookups ----------------------------------------------------------------------------
    def _pointer(self, key: str, what: str) -> str:
        data = self.backend.get(key)
        return PointerRef.from_dict(unpack(data, what), what).record

    def reference_hash(self) -> str:
        return self._pointer(REFERENCE_REF, f"{self.path}/{REFERENCE_REF}")

    def reference(self) -> ReferenceRecord:
        return self.objects.get_record(self.reference_hash(), ReferenceRecord)

    def bases(self) -> list[str]:
        # Only valid names: a killed ref update leaves a '.<name>.<uuid>.tmp' file here for gc.
        return [n for n in self.backend.children("refs/bases") if NAME_RE.fullmatch(n) and ".." not in n]

    def base(self, name: str) -> tuple[str, BaseRecord]:
        key = f"refs/bases/{check_name('base', name)}"
        if not self.backend.exists(key):
            known = ", ".join(self.bases()) or "none yet"
            raise NotFoundError(f"{self.path}: no base vector named {name!r} (known: {known}); build one with "
                                "`deltastore base build`")
        digest = self._pointer(key, f"{self.path}/{key}")
        return digest, self.objects.get_record(digest, BaseRecord)

    def tasks(self) -> list[str]:
        return [n for n in self.backend.children("refs/tasks") if NAME_RE.fullmatch(n) and ".." not in n]

    def _task_ref(self, task: str) -> TaskRef:
        key = f"refs/tasks/{check_name('task', task)}"
        if not self.backend.exists(key):
            return TaskRef([])
        return TaskRef.from_dict(unpack(self.backend.get(key), f"{self.path}/{key}"), f"{self.path}/{key}")

    def versions(self, task: str) -> list[tuple[int, str]]:
        """``[(version number, record hash)]`` of a task, oldest first."""
        ref = self._task_ref(task)
        if not ref.versions:
            known = ", ".join(self.tasks()) or "none yet"
            raise NotFoundError(f"{self.path}: no task named {task!r} (known tasks: {known})")
        return list(ref.versions)

    def version(self, task: str, version: int | None = None) -> tuple[str, TaskVersion]:
        """(record hash, record) of ``task`` at ``version`` (default: the latest)."""
        versions = self.versions(task)
        if version is None:
            number, digest = versions[-1]
        else:
            found = [d for n, d in versions if n == version]
            if not found:
                have = ", ".join(str(n) for n, _ in versions)
                raise NotFoundError(f"{self.path}: task {task!r} has no version {version} (versions: {have})")
            digest = found[0]
            number = version
        try:
            record = self.objects.get_record(digest, TaskVersion)
        except DeltastoreError as exc:
            raise type(exc)(f"{task}@{number}: {exc}") from None
        if (record.task, record.version) != (task, number):  # refs carry no hash: cross-check them
            raise CorruptObjectError(f"{self.path}/refs/tasks/{task}: lists version {number} as record {digest[:12]}, "
                                     f"which is {record.task}@{record.version}; the ref is damaged")
        return digest, record

    def log(self, task: str) -> list[TaskVersion]:
        """Every version of ``task``, newest first."""
        return [self.objects.get_record(d, TaskVersion) for _, d in reversed(self.versions(task))]

    # -- base vectors -----------------------------------------------------------------------
    def build_base(self, name: str, finetunes: Iterable[Any], *, progress: bool | None = None) -> BaseRecord:
        """Build and store ``tau_base = BitDelta(mean_t(W_t) - W_pre)`` under ``name``.

        Streams tensor by tensor: memory holds one tensor of each finetune, not N models.
        """
        check_name("base", name)
        if self.backend.exists(f"refs/bases/{name}"):
            raise AlreadyExistsError(f"{self.path}: base vector {name!r} exists; pick another name")
        sources = [open_source(f) for f in finetunes]
        if not sources:
            raise InvalidInputError("a base vector needs at least one finetune")
        ref_digest = self.reference_hash()
        reference = self.objects.get_record(ref_digest, ReferenceRecord)
        plans = [_plan(reference, s) for s in sources]
        lossy = [r for r in reference.tensors if all(r in p.lossy_ref for p in plans)]
        # Refuse NaN/Inf before the first write, so a refused build changes nothing on disk.
        for source, plan in zip(sources, plans):
            for ref_name in lossy:
                _check_finite(source, plan.lossy_ref[ref_name], source.get(plan.lossy_ref[ref_name]))
        with self.backend.lock("registry", shared=True):
            txn = self.objects.new_txn()
            tensors = {}
            for ref_name in _progress(lossy, total=len(lossy), desc=f"base {name}", enabled=progress):
                w_pre = self._reference_tensor(reference, ref_name).float()
                mean = torch.zeros_like(w_pre)
                for source, plan in zip(sources, plans):
                    tensor = source.get(plan.lossy_ref[ref_name])
                    _check_finite(source, plan.lossy_ref[ref_name], tensor)
                    mean += tensor.float() - w_pre
                mean /= len(sources)
                code = dbms.build_base(dbms.as_matrix(mean))
                tensors[ref_name] = self._store_code(code, "bitdelta", {}, w_pre.shape, "float32", ref_name, txn)
            record = BaseRecord(name=name, created=utc_now(), reference=ref_digest,
                                sources=[s.label for s in sources], tensors=tensors)
            digest = self.objects.put_record(record, txn)
            with self.backend.lock("refs"):
                if self.backend.exists(f"refs/bases/{name}"):
                    raise AlreadyExistsError(f"{self.path}: base vector {name!r} was created meanwhile; pick another name")
                self.backend.put(f"refs/bases/{name}", pack(PointerRef(digest).to_dict()))
            self.backend.delete(txn)
        return record

    # -- commit -----------------------------------------------------------------------------
    def commit(
        self,
        task: str,
        finetune: Any,
        *,
        method: str = "bitdelta",
        config: Mapping[str, Any] | None = None,
        base: str | None = None,
        message: str = "",
        tune: str | Tuner | None = None,
        calibration: Iterable[Mapping[str, Any]] | None = None,
        per_layer: bool = False,
        tune_options: Mapping[str, Any] | None = None,
        seed: int = 0,
        allow_unrelated: bool = False,
        progress: bool | None = None,
        device: str | torch.device = "cpu",
    ) -> TaskVersion:
        """Compress ``finetune`` against the reference (and base vector ``base``) and record it
        as the next version of ``task``. Nothing is visible until the final ref update.

        ``device``: where the deltas are computed and encoded (``"cuda"`` for speed); tensors
        are still read one at a time. Reductions (lam1, BitDelta scales) may differ from a CPU
        commit in the last bits; materializing a version is exact whichever device wrote it."""
        check_name("task", task)
        # Fields the caller leaves out take the writer's defaults (the config class's), not what a
        # reader gives a stored configuration that lacks them (an older page's: dare's 'hash' layout).
        compressor = get_compressor(method, {**compressor_class(method).config_class().to_dict(), **(config or {})})
        if method == "lossless":
            raise InvalidInputError("method 'lossless' stores whole tensors, not deltas; pick bitdelta, dare or deltadq")
        source = open_source(finetune)
        ref_digest = self.reference_hash()
        reference = self.objects.get_record(ref_digest, ReferenceRecord)
        base_digest, base_record = self.base(base) if base else (None, None)
        if base_record is not None and base_record.reference != ref_digest:
            raise IncompatibleFinetuneError(f"base vector {base!r} was built against another reference")
        plan = _plan(reference, source)
        lossy = [ft for ft in source.names() if ft in plan.lossy]
        seeds = {name: derive_seed(seed, name) for name in lossy}

        device = resolve_device(device)
        reader = DeviceReader(self.objects, device, verify=True)

        def tau(ref_name: str, array: ArrayGetter | None = None) -> torch.Tensor | None:
            if base_record is None or ref_name not in base_record.tensors:
                return None
            return decode_stored(base_record.tensors[ref_name], array or self._array_getter(device), device)

        # Every check that can refuse the input runs before the first write: a refused commit
        # changes nothing on disk. Lossy tensors are checked for NaN/Inf in pass 1, the rest here.
        for name in source.names():
            if name not in plan.lossy:
                _check_finite(source, name, source.get(name))

        def read(name: str) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
            """In a reader thread, on the device: the finetune's tensor and, for a delta, its
            reference tensor and base vector (on CUDA through pinned staging, no host copy)."""
            ref_name = plan.lossy.get(name)
            if ref_name is None:
                return None, reader.source(source, name), None
            w_ref = decode_stored(reference.tensors[ref_name], reader.array, device)
            return w_ref, reader.source(source, name), tau(ref_name, reader.array)

        def read_all(names: list[str]):
            def nbytes(name: str) -> int:  # reference and finetune in the finetune's dtype, float32 base
                return (2 * source.dtype(name).itemsize + (4 if base_record is not None else 0)) * _numel(
                    source.shape(name))

            return reader.read_ahead(read, names, nbytes=nbytes,
                                     budget=COMMIT_READ_AHEAD_BYTES if device.type == "cuda" else
                                     COMMIT_READ_AHEAD_BYTES // 4)

        # Pass 1: closed-form lam1 and the sanity check that this is a finetune of the reference.
        acc = dbms.Lam1Accumulator()
        delta_sq = ref_sq = 0.0
        for name, (w_ref, tensor, t) in _progress(read_all(lossy), total=len(lossy), desc=f"{task}: analyse",
                                                  enabled=progress):
            w_pre = dbms.as_matrix(w_ref.float())
            _check_finite(source, name, tensor)
            delta = dbms.as_matrix(tensor.float()) - w_pre
            delta_sq += float(delta.double().pow(2).sum())
            ref_sq += float(w_pre.double().pow(2).sum())
            if t is not None:
                acc.add(name, delta, dbms.as_matrix(t), dbms.changed_rows(delta))
        relative = (delta_sq / ref_sq) ** 0.5 if ref_sq else 0.0
        if relative > MAX_RELATIVE_DELTA and not allow_unrelated:
            raise IncompatibleFinetuneError(
                f"{source.label}: its weights differ from the reference by {relative:.0%} (relative Frobenius norm); "
                f"a finetune of this reference moves them by far less than {MAX_RELATIVE_DELTA:.0%}, so this is "
                "probably another model. Pass allow_unrelated=True (--allow-unrelated) to store it anyway"
            )

        context = TuneContext(
            compressor=compressor, lossy=lossy, ref_name=dict(plan.lossy),
            reference=lambda n: self._reference_tensor(reference, n).float(),
            finetune=lambda n: source.get(n).float(), tau=lambda n: _on_cpu(tau(n)), seeds=seeds, lam1_l2=acc.lam1,
            lam1_l2_per_tensor=acc.per_tensor, has_base=base_record is not None, calibration=calibration,
            per_layer=per_layer, options=dict(tune_options or {}), source=source, seed=seed, progress=progress,
        )
        lambdas: Lambdas = get_tuner(tune or "l2")(context)
        if base_record is None and (lambdas.lam1 != 0.0 or lambdas.per_tensor):
            lambdas = replace(lambdas, lam1=0.0, per_tensor={n: (0.0, l2) for n, (_, l2) in
                                                              (lambdas.per_tensor or {}).items()} or None)

        # Pass 2: encode and store every tensor. One writer thread stores each tensor's arrays
        # (device-to-host copy, hash, write, fsync) while the device encodes the next one; one
        # thread, so two identical arrays are never staged at once.
        with self.backend.lock("registry", shared=True), ThreadPoolExecutor(1, "deltastore-write") as writer:
            txn = self.objects.new_txn()
            stored: dict[str, Future] = {}
            waiting: deque[Future] = deque()
            for name, (w_ref, tensor, t) in _progress(read_all(source.names()), total=len(source.names()),
                                                      desc=f"{task}: encode", enabled=progress):
                if len(waiting) >= COMMIT_WRITE_BEHIND:
                    waiting.popleft().result()  # bound the encoded tensors waiting for the writer
                if name not in plan.lossy:  # checked for NaN/Inf before pass 1
                    stored[name] = writer.submit(_store_lossless, self.objects, tensor.cpu(), txn)
                    waiting.append(stored[name])
                    continue
                ref_name = plan.lossy[name]
                lam1, lam2 = (lambdas.per_tensor or {}).get(name, (lambdas.lam1, lambdas.lam2))
                w_pre = dbms.as_matrix(w_ref.float())
                delta = dbms.as_matrix(tensor.float()) - w_pre
                rows = dbms.changed_rows(delta)
                tau_rows = None if t is None else dbms.as_matrix(t)[rows]
                resid = dbms.residual(delta[rows], tau_rows, lam1)
                code = dbms.MatrixCode(rows, compressor.encode(resid.contiguous(), seed=seeds[name]))
                per_tensor = (float(lam1), float(lam2)) if lambdas.per_tensor is not None else None
                encoded = _Ready(device)  # the writer copies the codes to the host once the device made them
                stored[name] = writer.submit(encoded.then, self._store_code, code, method, compressor.config.to_dict(),
                                             tensor.shape, dtype_name(tensor.dtype), ref_name, txn, per_tensor)
                waiting.append(stored[name])
            tensors = {name: future.result() for name, future in stored.items()}
            files = _store_files(self.objects, source, txn)
            n_params = sum(_numel(source.shape(n)) for n in source.names())
            record_source = {
                "label": str(source.label), "bytes": source.nbytes(), "params": n_params,
                "fp16_bytes": 2 * n_params, "relative_delta": relative,
                "skipped_files": dict(sorted(source.skipped.items())),  # name-keyed: code point order
                "missing_buffers": plan.missing_buffers,
            }
            with self.backend.lock("refs"):
                ref = self._task_ref(task)
                number = ref.versions[-1][0] + 1 if ref.versions else 1
                parent = ref.versions[-1][1] if ref.versions else None
                record = TaskVersion(
                    task=task, version=number, parent=parent, created=utc_now(), message=message,
                    reference=ref_digest, base=base_digest, method=method, config=compressor.config.to_dict(),
                    lam1=float(lambdas.lam1), lam2=float(lambdas.lam2), tuning=_plain(lambdas.record),
                    tensors=tensors, files=files, source=record_source,
                )
                digest = self.objects.put_record(record, txn)
                new_ref = TaskRef(ref.versions + [(number, digest)])
                self.backend.put(f"refs/tasks/{task}", pack(new_ref.to_dict()))
            self.backend.delete(txn)
        return record

    def remove(self, task: str, version: int | None = None) -> list[int]:
        """Drop one version (or, with ``version=None``, the whole task) from the refs.

        The objects stay on disk until the next :meth:`gc`. Returns the version numbers removed.
        """
        with self.backend.lock("refs"):
            versions = self.versions(task)
            keep = [] if version is None else [(n, d) for n, d in versions if n != version]
            if len(keep) == len(versions):
                raise NotFoundError(f"{self.path}: task {task!r} has no version {version}")
            if keep:
                self.backend.put(f"refs/tasks/{task}", pack(TaskRef(keep).to_dict()))
            else:
                self.backend.delete(f"refs/tasks/{task}")
        return [n for n, digest in versions if (n, digest) not in keep]

    # -- materialize ------------------------------------------------------------------------
    def materialize(
        self,
        task: str,
        version: int | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        verify: bool = True,
        progress: bool | None = None,
        **pipeline,
    ) -> dict[str, torch.Tensor]:
        """The task's state dict on ``device``: ``W' = W_pre + lam1*tau_base + lam2*C(R)``.

        ``dtype``: cast floating tensors to it (default: each tensor's dtype in the finetune).
        ``verify``: rehash every array read (default; False skips it for speed). ``pipeline``:
        see :meth:`iter_materialize`.
        """
        return dict(self.iter_materialize(task, version, device=device, dtype=dtype, verify=verify,
                                          progress=progress, **pipeline))

    def iter_materialize(self, task: str, version: int | None = None, *, device: str | torch.device = "cpu",
                         dtype: torch.dtype | None = None, verify: bool = True, progress: bool | None = None,
                         **pipeline) -> Iterator[tuple[str, torch.Tensor]]:
        """Like :meth:`materialize`, one ``(name, tensor)`` at a time (bounded memory).

        Reader threads read ahead while the device decodes; on CUDA through pinned staging and
        fused decode kernels (:func:`deltastore.engine.materialize.iter_materialize`, whose
        tuning knobs ``pipeline`` passes on: ``workers``, ``read_ahead_bytes``, ``staging_bytes``).
        """
        _, record = self.version(task, version)
        yield from iter_materialize(self.objects, record, where=str(self.path), device=device, dtype=dtype,
                                    verify=verify, progress=progress, **pipeline)

    def save_pretrained(self, task: str, out_dir: str | os.PathLike, version: int | None = None, *,
                        device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                        verify: bool = True, progress: bool | None = None) -> Path:
        """Write the task as a Hugging Face directory (model.safetensors plus its stored files)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        if out.exists() and any(out.iterdir()):
            raise AlreadyExistsError(f"{out}: output directory is not empty; give a new or empty directory")
        _, record = self.version(task, version)
        state = {n: t.cpu().contiguous() for n, t in
                 self.iter_materialize(task, version, device=device, dtype=dtype, verify=verify, progress=progress)}
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        for rel, digest in record.files.items():
            target = out.joinpath(*rel.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                target.write_bytes(self.objects.get_blob(digest))
            except DeltastoreError as exc:
                raise type(exc)(f"{task}@{record.version}, file {rel!r}: {exc}") from None
        return out

    def load_model(self, task: str, version: int | None = None, *, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None):
        """A ready ``transformers`` model of the class named in the task's stored config.json."""
        from .hf import load_model

        return load_model(self, task, version, device=device, dtype=dtype)

    # -- accounting -------------------------------------------------------------------------
    def stats(self, task: str, version: int | None = None) -> VersionStats:
        """Real bytes on disk that this version owns (specs/format.md §10, "Counting bytes").

        ``own_bytes`` counts every object the version references beyond the reference and
        the base vector in full: what the task costs on its own. ``amortized_bytes`` splits
        each of those objects between the tasks whose latest versions use it (tokenizer
        files every finetune re-saves identically are stored once, so each pays a share).
        """
        digest, record = self.version(task, version)
        reference = self.objects.get_record(record.reference, ReferenceRecord)
        shared = reference.array_hashes() | set(reference.files.values())
        mine = [("records", digest)] + [("arrays", h) for h in record.array_hashes() - shared] + [
            ("blobs", h) for h in set(record.files.values()) - shared]
        sizes = {obj: self.objects.size(*obj) for obj in mine}
        latest = {t: self.version(t)[1] for t in self.tasks() if t != task}
        users = dict.fromkeys(mine, 1)
        for other in latest.values():
            for obj in {("arrays", h) for h in other.array_hashes()} | {("blobs", h) for h in other.files.values()}:
                if obj in users:
                    users[obj] += 1
        base_bytes = base_users = 0
        if record.base:
            base = self.objects.get_record(record.base, BaseRecord)
            base_bytes = self.objects.size("records", record.base) + sum(
                self.objects.size("arrays", h) for h in base.array_hashes())
            base_users = 1 + sum(1 for r in latest.values() if r.base == record.base)
        return VersionStats(sum(sizes.values()), sum(sizes[o] / users[o] for o in mine), base_bytes, base_users,
                            int(record.source["bytes"]), int(record.source["fp16_bytes"]))

    # -- integrity --------------------------------------------------------------------------
    def verify(self, *, progress: bool | None = None) -> list[dict[str, str]]:
        """Rehash every object and check every ref; returns the problems found (empty: clean).

        Each problem: ``{"object": key, "problem": text, "used_by": "task@v, ..."}``.
        """
        from .integrity import verify

        return verify(self, show_progress=progress)

    def gc(self) -> dict[str, int]:
        """Delete every object no ref reaches, and whatever dead operations left in staging."""
        from .integrity import gc

        return gc(self)

    # -- internals --------------------------------------------------------------------------
    def _reference_tensor(self, reference: ReferenceRecord, name: str) -> torch.Tensor:
        return decode_stored(reference.tensors[name], self._array_getter("cpu"), "cpu")

    def _store_code(self, code: dbms.MatrixCode, codec: str, config: dict, shape, dtype: str, ref_name: str,
                    txn: str, lambdas: tuple[float, float] | None = None) -> TensorEntry:
        arrays = {role: self.objects.put_array(a, txn, compress=_compressible(a)) for role, a in
                  code.encoded.arrays.items()}
        n_changed = int(code.rows.sum())
        rows = None if n_changed == code.rows.numel() else self.objects.put_array(pack_bits(code.rows), txn,
                                                                                  compress=False)
        entry = TensorEntry(shape=tuple(shape), dtype=dtype, codec=codec, config=dict(config), arrays=arrays,
                            attrs=dict(code.encoded.attrs), ref=ref_name, rows=rows, changed_rows=n_changed)
        return entry if lambdas is None else replace(entry, lam1=lambdas[0], lam2=lambdas[1])

    def _array_getter(self, device, verify: bool = True) -> ArrayGetter:
        """``array(digest, what)``: a stored array on ``device`` (the plain, one-thread read)."""
        return lambda digest, what: self.objects.get_array(digest, verify=verify, what=what).to(device)


@dataclass
class _Plan:
    """How a finetune's tensors map onto the reference."""

    lossy: dict[str, str]       # finetune name -> reference name, stored as a DBMS delta
    lossy_ref: dict[str, str]   # the inverse
    missing_buffers: list[str]  # non-float reference tensors absent from the finetune


def _plan(reference: ReferenceRecord, source: TensorSource) -> _Plan:
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
    missing_float = [r for r in missing if dtype_from_name(reference.tensors[r].dtype).is_floating_point]
    if missing_float:
        shown = ", ".join(repr(prefix + m) for m in missing_float[:5])
        more = f" and {len(missing_float) - 5} more" if len(missing_float) > 5 else ""
        raise IncompatibleFinetuneError(
            f"{source.label}: reference tensor(s) {shown}{more} are missing from the finetune; a finetune must "
            "hold every weight of the reference (task-own extra tensors are fine)"
        )
    lossy = {}
    for name, ref_name in mapping.items():
        entry = reference.tensors[ref_name]
        shape, dtype = source.shape(name), source.dtype(name)
        if tuple(shape) != tuple(entry.shape):
            raise IncompatibleFinetuneError(
                f"{source.label}: tensor {name!r} has shape {list(shape)}, the reference's {ref_name!r} has "
                f"{list(entry.shape)}; resized tensors are not deltas of the reference"
            )
        ref_dtype = dtype_from_name(entry.dtype)
        if dtype.is_floating_point != ref_dtype.is_floating_point:
            raise IncompatibleFinetuneError(
                f"{source.label}: tensor {name!r} is {dtype_name(dtype)}, the reference's is {entry.dtype}"
            )
        if dtype.is_floating_point and len(shape) >= 2 and _numel(shape) >= MIN_LOSSY_NUMEL:
            lossy[name] = ref_name
    return _Plan(lossy, {r: n for n, r in lossy.items()}, missing)


def _on_cpu(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.cpu()


def _check_finite(source: TensorSource, name: str, tensor: torch.Tensor) -> None:
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


def _store_lossless(objects: ObjectStore, tensor: torch.Tensor, txn: str, *, compress: bool = True) -> TensorEntry:
    encoded = Lossless().encode(tensor)
    arrays = {role: objects.put_array(a, txn, compress=compress) for role, a in encoded.arrays.items()}
    return TensorEntry(shape=tuple(tensor.shape), dtype=dtype_name(tensor.dtype), codec=Lossless.name, config={},
                       arrays=arrays, attrs=dict(encoded.attrs))


def _store_files(objects: ObjectStore, source: TensorSource, txn: str) -> dict[str, str]:
    return {rel: objects.put_blob(path.read_bytes(), txn) for rel, path in source.files.items()}


def _plain(value: Any) -> Any:
    """Tuning records may hold tuples or tensors: make them msgpack-plain."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


__all__ = ["Registry", "VersionStats", "parse_spec", "check_name", "DeltastoreError", "Record"]
