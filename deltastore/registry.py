"""The registry: init, base vectors, commits, materialize, history, verify and gc.

This module ties the pure tensor math (``deltastore.tensor``) to the storage layer
(``deltastore.storage``); it never imports zarr itself. The on-disk layout and every record
are specified in specs/format.md.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch

from .dtypes import dtype_name, torch_dtype
from .errors import (AlreadyExistsError, DeltastoreError, IncompatibleFinetuneError,
                     InvalidInputError, NotFoundError)
from .catalog import INFO_KEY, REFERENCE_REF, Catalog, VersionStats, check_name, parse_spec, split_spec
from .engine.decode import ArrayGetter, decode_stored, numel as _numel
from .engine.materialize import iter_materialize, resolve_device
from .engine.reader import DeviceReader
from .progress import progress as _progress
from .sources import TensorSource, open_source
from .storage.backend import LocalBackend
from .storage.layout import array_shape_problem
from .storage.locks import FileLocks
from .storage.objects import ObjectStore
from .storage.records import (FORMAT_MAJOR, FORMAT_MINOR, FORMAT_NAME, BaseRecord, PointerRef, Record,
                              ReferenceRecord, RegistryInfo, TaskRef, TaskVersion, TensorEntry, pack)
from .tensor import dbms
from .tensor.bitpack import pack_bits
from .tensor.compressors import DEFAULT_COMPRESSOR, WHOLE_TENSORS, compressor_class, delta_compressors, get_compressor
from .tensor.compressors.lossless import Lossless
from .tensor.prng import derive_seed
from .tuning import Lambdas, TuneContext, Tuner, get_tuner

INIT_LEFTOVERS = frozenset({"objects", "staging", "refs", "locks"})  # all a registry holds but INFO_KEY

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


class Registry(Catalog):
    """A deltastore registry directory. Open an existing one with ``Registry(path)``,
    create one with :meth:`Registry.init`. Reading refs and records is :class:`Catalog`'s."""

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
        for name in source.names():
            _check_storable(source, name)
        backend = LocalBackend(root)
        objects = ObjectStore(backend)
        with FileLocks(root).hold("registry", shared=True):
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
        with self.locks.hold("registry", shared=True):
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
                tensors[ref_name] = self._store_code(code, dbms.BASE_COMPRESSOR, {}, w_pre.shape, "float32", ref_name,
                                                     txn)
            record = BaseRecord(name=name, created=utc_now(), reference=ref_digest,
                                sources=[s.label for s in sources], tensors=tensors)
            digest = self.objects.put_record(record, txn)
            # Create-only: a base vector's ref is never replaced, so no lock is needed here.
            if not self.backend.put_if_absent(f"refs/bases/{name}", pack(PointerRef(digest).to_dict())):
                raise AlreadyExistsError(f"{self.path}: base vector {name!r} was created meanwhile; pick another name")
            self.backend.delete(txn)
        return record

    def remove_base(self, name: str) -> str:
        """Drop base vector ``name`` from the refs; its objects stay until the next :meth:`gc`.
        Returns its record hash.

        Refused while a task version uses it: those versions would keep its objects alive
        anyway, and the name is what tells a user which base they were built on. A commit in
        flight on this base still succeeds (its version keeps the objects reachable)."""
        with self.locks.hold("refs"):
            users = self.base_users(name)
            if users:
                shown = ", ".join(users[:5]) + (f" and {len(users) - 5} more" if len(users) > 5 else "")
                raise InvalidInputError(f"base vector {name!r} is used by {shown}; remove those versions first "
                                        "(`deltastore rm`), then the base vector")
            digest, _ = self.base(name)
            self.backend.delete(f"refs/bases/{name}")
        return digest

    # -- commit -----------------------------------------------------------------------------
    def commit(
        self,
        task: str,
        finetune: Any,
        *,
        method: str = DEFAULT_COMPRESSOR,
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
        follow_links: bool = False,
        skip_unchanged: bool = False,
    ) -> TaskVersion:
        """Compress ``finetune`` against the reference (and base vector ``base``) and record it
        as the next version of ``task``. Nothing is visible until the final ref update.

        ``device``: where the deltas are computed and encoded (``"cuda"`` for speed); tensors
        are still read one at a time. Reductions (lam1, BitDelta scales) may differ from a CPU
        commit in the last bits; materializing a version is exact whichever device wrote it.

        ``follow_links``: read the finetune folder's symlinks that lead out of it (see
        :func:`deltastore.sources.open_source`).

        ``skip_unchanged``: if the latest version of ``task`` already holds this finetune (the
        same tensors and side files, :func:`content_sha256`) committed with the same method,
        configuration, base vector and tuning settings, write nothing and return that version
        ("nothing to commit", as the CLI does). It costs one more read of the finetune, and
        records the hash in the new version, so only versions committed with it can match.
        Off by default: a script that commits the same finetune twice gets two versions, as it
        always did, and pays nothing."""
        check_name("task", task)
        if method == WHOLE_TENSORS:
            raise InvalidInputError(f"compressor {method!r} stores whole tensors, not deltas; pick one of "
                                    f"{', '.join(delta_compressors())}")
        # Fields the caller leaves out take the writer's defaults (the config class's), not what a
        # reader gives a stored configuration that lacks them (an older page's: dare's 'hash' layout).
        compressor = get_compressor(method, {**compressor_class(method).config_class().to_dict(), **(config or {})})
        source = open_source(finetune, follow_links=follow_links)
        ref_digest = self.reference_hash()
        reference = self.objects.get_record(ref_digest, ReferenceRecord)
        base_digest, base_record = self.base(base) if base else (None, None)
        if base_record is not None and base_record.reference != ref_digest:
            raise IncompatibleFinetuneError(f"base vector {base!r} was built against another reference")
        plan = _plan(reference, source)
        lossy = [ft for ft in source.names() if ft in plan.lossy]
        seeds = {name: derive_seed(seed, name) for name in lossy}

        # Nothing to commit when the latest version already holds this finetune with these
        # settings (specs/format.md §5.5). Hashing reads the whole finetune once more (seconds
        # for a 7B model), so only commits that ask for the check pay for it, and record the
        # hash for later checks.
        fingerprint: dict[str, Any] = {}
        if skip_unchanged:
            settings = _commit_settings(tune, calibration, per_layer, tune_options, seed)
            fingerprint = {"sha256": content_sha256(source), "settings": settings}
            if settings is not None and self._task_ref(task).versions:
                _, latest = self.version(task)
                if (latest.source.get("sha256"), latest.source.get("settings"), latest.method, latest.config,
                        latest.base, latest.reference) == (fingerprint["sha256"], settings, method,
                                                           compressor.config.to_dict(), base_digest, ref_digest):
                    return latest

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
                _check_storable(source, name)
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
        with self.locks.hold("registry", shared=True), ThreadPoolExecutor(1, "deltastore-write") as writer:
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
                "missing_buffers": plan.missing_buffers, **fingerprint,
            }
            with self.locks.hold("refs"):
                ref = self._task_ref(task)
                number = ref.last_issued + 1  # never a removed version's number (format.md §5.7)
                parent = ref.versions[-1][1] if ref.versions else None
                record = TaskVersion(
                    task=task, version=number, parent=parent, created=utc_now(), message=message,
                    reference=ref_digest, base=base_digest, method=method, config=compressor.config.to_dict(),
                    lam1=float(lambdas.lam1), lam2=float(lambdas.lam2), tuning=_plain(lambdas.record),
                    tensors=tensors, files=files, source=record_source,
                )
                digest = self.objects.put_record(record, txn)
                new_ref = TaskRef(ref.versions + [(number, digest)], number)
                self.backend.put(f"refs/tasks/{task}", pack(new_ref.to_dict()))
            self.backend.delete(txn)
        return record

    def remove(self, task: str, version: int | None = None) -> list[int]:
        """Drop one version (or, with ``version=None``, the whole task) from the refs;
        ``TASK@N`` and ``TASK@latest`` name one version.

        The objects stay on disk until the next :meth:`gc`. Returns the version numbers removed.
        The task's ref stays, even with no version left, to keep the highest number issued.
        """
        one_version = "@" in task
        task, version = split_spec(task, version)
        # A writer like any other (shared registry lock): gc must not collect the temp file of
        # the ref update before it is renamed into place.
        with self.locks.hold("registry", shared=True), self.locks.hold("refs"):
            versions = self.version_hashes(task)
            if one_version and version is None:  # TASK@latest
                version = versions[-1][0]
            keep = [] if version is None else [(n, d) for n, d in versions if n != version]
            if len(keep) == len(versions):
                raise NotFoundError(f"{self.path}: task {task!r} has no version {version}")
            issued = self._task_ref(task).last_issued
            self.backend.put(f"refs/tasks/{task}", pack(TaskRef(keep, issued).to_dict()))
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
        task, version = split_spec(task, version)
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
        task, version = split_spec(task, version)
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

        return load_model(self, *split_spec(task, version), device=device, dtype=dtype)

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

    def _store_code(self, code: dbms.MatrixCode, compressor: str, config: dict, shape, dtype: str, ref_name: str,
                    txn: str, lambdas: tuple[float, float] | None = None) -> TensorEntry:
        arrays = {role: self.objects.put_array(a, txn, compress=_compressible(a)) for role, a in
                  code.encoded.arrays.items()}
        n_changed = int(code.rows.sum())
        rows = None if n_changed == code.rows.numel() else self.objects.put_array(pack_bits(code.rows), txn,
                                                                                  compress=False)
        entry = TensorEntry(shape=tuple(shape), dtype=dtype, codec=compressor, config=dict(config), arrays=arrays,
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
    missing_float = [r for r in missing if torch_dtype(reference.tensors[r].dtype).is_floating_point]
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
        ref_dtype = torch_dtype(entry.dtype)
        if dtype.is_floating_point != ref_dtype.is_floating_point:
            raise IncompatibleFinetuneError(
                f"{source.label}: tensor {name!r} is {dtype_name(dtype)}, the reference's is {entry.dtype}"
            )
        if dtype.is_floating_point and len(shape) >= 2 and _numel(shape) >= MIN_LOSSY_NUMEL:
            lossy[name] = ref_name
    return _Plan(lossy, {r: n for n, r in lossy.items()}, missing)


def _on_cpu(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.cpu()


def _check_storable(source: TensorSource, name: str) -> None:
    """A tensor stored whole (lossless) becomes one array of its shape and item size: refuse
    what the reader would refuse (storage.layout.array_shape_problem), before any write."""
    shape = tuple(source.shape(name))
    problem = array_shape_problem(shape, source.dtype(name).itemsize)
    if problem:
        raise InvalidInputError(f"{source.label}: tensor {name!r} {problem}; deltastore cannot store it, so it "
                                "could not be read back: drop or reshape it in the checkpoint")


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


def _commit_settings(tune, calibration, per_layer: bool, tune_options, seed: int) -> dict[str, Any] | None:
    """The commit arguments not in a version's other fields (``source.settings``), or None
    when they cannot be compared with an earlier commit's: a tuner given as a function,
    calibration inputs that hashing would consume (an iterator), tuner options holding
    objects (a model)."""
    if (callable(tune) or (calibration is not None and not isinstance(calibration, (list, tuple)))
            or not _is_plain(dict(tune_options or {}))):
        return None
    from .calibration import calibration_sha256

    return _plain({"tune": tune or "l2", "per_layer": per_layer, "tune_options": dict(tune_options or {}),
                   "seed": seed, "calibration": None if calibration is None else calibration_sha256(calibration)})


def _is_plain(value: Any) -> bool:
    """Scalars, strings and lists and maps of them: what a record can hold and compare."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


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
