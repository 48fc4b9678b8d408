"""The registry: init, base vectors, commits, materialize, history, verify and gc.

This module ties the pure tensor math (``deltastore.tensor``) to the storage layer
(``deltastore.storage``); it never imports zarr itself. The on-disk layout and every record
are specified in specs/format.md.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

import torch

from .errors import (AlreadyExistsError, DeltastoreError, IncompatibleFinetuneError,
                     InvalidInputError, NotFoundError)
from .calibration import as_batches
from .catalog import (INFO_KEY, Catalog, NewRegistry, VersionStats, check_name, init_leftover, is_url,
                      open_location, parse_spec, split_spec, utc_now)
from .engine import budget
from .engine.base import BaseOptions, base_entry, check_base_inputs, select_base_tensors
from .engine.budget import budget_bytes
from .engine.commit import (CommitPipeline, check_finite, check_small_tensor_bits, check_storable, commit_settings,
                            content_sha256, plain, plan_finetune, store_files, store_lossless)
from .engine.decode import ArrayGetter, decode_stored, numel
from .engine.materialize import iter_materialize, resolve_device
from .progress import progress as _progress
from .sources import open_source
from .storage.objects import record_frame
from .storage.records import BaseRecord, PointerRef, Record, ReferenceRecord, TaskRef, TaskVersion, pack, unpack
from .storage.writes import Attempt, update_ref
from .tensor.compressors import DEFAULT_COMPRESSOR, WHOLE_TENSORS, compressor_class, delta_compressors, get_compressor
from .tensor.prng import derive_seed
from .tuning import Lambdas, TuneContext, Tuner, get_tuner
from .tuning.fit import input_grams

if TYPE_CHECKING:
    from distributed import Client

    from .engine.fanout import Job

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
        where, backend, objects, writes = open_location(path)
        if backend.exists(INFO_KEY):
            raise AlreadyExistsError(f"{where}: a registry already exists here; open it instead of running init")
        # What a killed init leaves (it writes registry.msgpack last) may be initialized over.
        if not all(map(init_leftover, backend.children(""))):
            raise AlreadyExistsError(f"{where}: directory is not empty; give a new or empty directory (or bucket "
                                     "prefix)")
        location = NewRegistry(backend, where)
        source = open_source(reference)
        if not source.names():
            raise InvalidInputError(f"{source.label}: the reference holds no tensors")
        for name in source.names():
            check_storable(source, name)

        def write(attempt: Attempt) -> None:
            txn = objects.new_txn()
            tensors = {}
            for name in _progress(source.names(), total=len(source.names()), desc="reference", enabled=progress):
                tensor = source.get(name)
                check_finite(source, name, tensor)
                tensors[name] = store_lossless(objects, tensor, txn, compress=compress_reference)
            files = store_files(objects, source, txn)
            record = ReferenceRecord(created=utc_now(), tensors=tensors, files=files)
            digest = objects.put_record(record, txn)
            # No attempt.settle(): gc refuses a location without registry.msgpack, so none
            # runs beside an init.
            location.set_reference(digest)
            # The info file goes last: a directory without it is not a registry, so a killed
            # init leaves nothing that could be mistaken for one.
            location.finish(utc_now())
            backend.delete(txn)

        writes.run(write)
        return cls(path)

    # -- base vectors -----------------------------------------------------------------------
    def build_base(self, name: str, finetunes: Iterable[Any], *, exclude: Iterable[str] = (), min_params: int = 0,
                   row_fraction: float = 1.0, progress: bool | None = None,
                   client: "Client | None" = None) -> BaseRecord:
        """Build and store ``tau_base = BitDelta(mean_t(W_t) - W_pre)`` under ``name``.

        Streams tensor by tensor: memory holds one tensor of each finetune, not N models.
        ``client``: a ``distributed.Client``; each tensor is then computed on a worker, which
        reads the finetunes itself (so give them as paths every worker can read), with the same
        bits as without (:mod:`deltastore.engine.base`).

        A cheaper base covers less (:class:`deltastore.engine.base.BaseOptions`): ``exclude``,
        shell patterns of reference tensor names left out (``["*embeddings*"]``); ``min_params``,
        tensors with fewer elements left out; ``row_fraction``, in each tensor only that share of
        its changed rows, those of largest mean delta. Versions on such a base read as on any.
        """
        options = BaseOptions(tuple(exclude) if not isinstance(exclude, str) else exclude, min_params, row_fraction)
        check_name("base", name)
        if self.backend.exists(f"refs/bases/{name}"):
            raise AlreadyExistsError(f"{self.path}: base vector {name!r} exists; pick another name")
        finetunes = list(finetunes)
        sources = [open_source(f) for f in finetunes]
        if not sources:
            raise InvalidInputError("a base vector needs at least one finetune")
        ref_digest = self.reference_hash()
        reference = self.objects.get_record(ref_digest, ReferenceRecord)
        plans = [plan_finetune(reference, s) for s in sources]
        lossy = select_base_tensors(reference, [r for r in reference.tensors if all(r in p.lossy_ref for p in plans)],
                                    options, name)
        # Refuse NaN/Inf before the first write, so a refused build changes nothing on disk.
        if client is not None:
            from .engine.fanout import map_base_tensors

            if not all(isinstance(f, (str, os.PathLike)) for f in finetunes):
                raise InvalidInputError("a distributed base build reads the finetunes on the workers: give them as "
                                        "paths, not state dicts")
            paths = [os.fspath(Path(f).absolute()) for f in finetunes]
            map_base_tensors(client, self._location(), paths, lossy, "check", progress=progress)
        else:
            for ref_name in lossy:
                check_base_inputs(sources, plans, ref_name)

        def write(attempt: Attempt) -> BaseRecord:
            txn = self.objects.new_txn()
            if client is not None:
                tensors = map_base_tensors(client, self._location(), paths, lossy, "build", progress=progress,
                                           row_fraction=row_fraction)
            else:
                tensors = {ref_name: base_entry(self.objects, reference, sources, plans, ref_name, txn, row_fraction)
                           for ref_name in _progress(lossy, total=len(lossy), desc=f"base {name}", enabled=progress)}
            record = BaseRecord(name=name, created=utc_now(), reference=ref_digest,
                                sources=[s.label for s in sources], tensors=tensors)
            digest = self.objects.put_record(record, txn)
            # Arrays the workers stored are not this process's writes: refreshed and re-checked here.
            attempt.settle([("arrays", h) for h in record.array_hashes()] if client is not None else [])
            # Create-only: a base vector's ref is never replaced.
            if not self.backend.put_if_absent(f"refs/bases/{name}", pack(PointerRef(digest).to_dict())):
                raise AlreadyExistsError(f"{self.path}: base vector {name!r} was created meanwhile; pick another name")
            self.backend.delete(txn)
            return record

        return self.writes.run(write)

    def remove_base(self, name: str) -> str:
        """Drop base vector ``name`` from the refs; its objects stay until the next :meth:`gc`.
        Returns its record hash.

        Refused while a task version uses it: those versions would keep its objects alive
        anyway, and the name is what tells a user which base they were built on. A commit in
        flight on this base still succeeds (its version keeps the objects reachable; on an object
        store it refreshed the base record, which keeps them from gc, specs/format.md §9.2)."""
        users = self.base_users(name)
        if users:
            shown = ", ".join(users[:5]) + (f" and {len(users) - 5} more" if len(users) > 5 else "")
            raise InvalidInputError(f"base vector {name!r} is used by {shown}; remove those versions first "
                                    "(`deltastore rm`), then the base vector")
        digest, _ = self.base(name)
        # A writer like any other (on a folder, under the shared registry lock).
        self.writes.run(lambda attempt: self.backend.delete(f"refs/bases/{name}"))
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
        small_tensor_bits: int | None = None,
        allow_unrelated: bool = False,
        progress: bool | None = None,
        device: str | torch.device = "cpu",
        follow_links: bool = False,
        skip_unchanged: bool = False,
        max_bytes: int | None = None,
        ratio: float | None = None,
        budget_menu: list[tuple[str, Mapping[str, Any]]] | None = None,
        budget_proxy: str = "weights",
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
        always did, and pays nothing.

        ``small_tensor_bits``: lossy small tensors (off by default: they are stored exactly).
        Biases, norms and other whole tensors that have a reference counterpart keep this many
        bits of their mantissa (a relative change below ``2**-small_tensor_bits``), the rest being
        the reference's, which the version's pack then stores for almost nothing
        (specs/format.md §5.8). Recorded in ``source.settings``.

        ``max_bytes`` (or ``ratio``: the finetune's fp16 bytes divided by it): commit to a byte
        budget. Each lossy tensor gets the setting of ``budget_menu`` (a list of (compressor,
        configuration); default: :func:`deltastore.engine.budget.default_menu`) that keeps the
        version's own bytes on disk within the budget at the least reconstruction error
        (:mod:`deltastore.engine.budget`); ``method`` and ``config`` are then ignored, and the
        version's ``method`` names the setting holding the most bytes. What was chosen is in
        the record's ``source.budget``. A budget below what the finetune needs at the
        cheapest settings is refused before anything is written; the real bytes are checked
        before the version is published, and a version still over the budget after
        ``budget.ATTEMPTS`` choices is refused (its arrays are left for ``gc``).

        ``budget_proxy``: how a budget measures a setting's error. ``"weights"`` (default): the
        squared error of the weights, needing no data; ``"outputs"``: each linear layer's weight
        error weighted by its input Gram on ``calibration`` (its output error; see
        :mod:`deltastore.engine.budget`), which needs calibration inputs and a finetune the
        tuners can run, and keeps the weight error when the Grams would exceed the tuner option
        ``max_gram_bytes``. Not the default: on the MiniLM zoo it chose worse than the
        data-free proxy (benchmarks/results/budget_proxy.md)."""
        check_name("task", task)
        if small_tensor_bits is not None and (isinstance(small_tensor_bits, bool) or not isinstance(
                small_tensor_bits, int) or not 0 <= small_tensor_bits <= 52):
            raise InvalidInputError(f"small_tensor_bits must be an integer from 0 to 52 (mantissa bits kept), or None "
                                    f"to store small tensors exactly; got {small_tensor_bits!r}")
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
        plan = plan_finetune(reference, source)
        check_small_tensor_bits(plan, reference, source, small_tensor_bits)

        # Nothing to commit when the latest version already holds this finetune with these
        # settings (specs/format.md §5.5). Hashing reads the whole finetune once more (seconds
        # for a 7B model), so only commits that ask for the check pay for it, and record the
        # hash for later checks.
        max_bytes = budget_bytes(max_bytes, ratio, source)
        if budget_proxy not in ("weights", "outputs"):
            raise InvalidInputError(f"budget_proxy must be 'weights' or 'outputs', got {budget_proxy!r}")
        if budget_proxy == "outputs" and calibration is None:
            raise InvalidInputError("budget_proxy='outputs' weighs errors by the layers' inputs: pass calibration "
                                    "inputs (calibration=[{'input_ids': ...}, ...]), or use budget_proxy='weights'")
        menu = budget.menu_compressors(list(budget_menu or budget.default_menu())) if max_bytes is not None else None
        fingerprint: dict[str, Any] = {}
        if skip_unchanged:
            settings = commit_settings(tune, calibration, per_layer, tune_options, seed, small_tensor_bits)
            if settings is not None and max_bytes is not None:
                settings["budget"] = {"max_bytes": max_bytes,
                                      "menu": [[c.name, c.config.to_dict()] for c in menu]}
                if budget_proxy == "outputs":  # only then: as before otherwise
                    settings["budget"]["proxy"] = "outputs"
            fingerprint = {"sha256": content_sha256(source), "settings": settings}
            if settings is not None and self._task_ref(task).versions:
                _, latest = self.version(task)
                # A budgeted version's method is what the budget chose; its settings hold the budget.
                asked = None if max_bytes is not None else (method, compressor.config.to_dict())
                held = None if max_bytes is not None else (latest.method, latest.config)
                if (latest.source.get("sha256"), latest.source.get("settings"), held, latest.base,
                        latest.reference) == (fingerprint["sha256"], settings, asked, base_digest, ref_digest):
                    return latest

        # Every check that can refuse the input runs before the first write: a refused commit
        # changes nothing on disk. Lossy tensors are checked for NaN/Inf in pass 1, the rest here.
        for name in source.names():
            if name not in plan.lossy:
                check_storable(source, name)
                check_finite(source, name, source.get(name))
        pipeline = CommitPipeline(self.objects, reference, base_record, source, plan, resolve_device(device), progress)
        fixed = None if max_bytes is None else budget.fixed_part(pipeline, self.objects, reference, task, max_bytes,
                                                                   small_tensor_bits)
        acc = pipeline.analyse(task, allow_unrelated)

        seeds = {name: derive_seed(seed, name) for name in pipeline.lossy}
        weigh_outputs = max_bytes is not None and budget_proxy == "outputs"
        if weigh_outputs:
            calibration = as_batches(calibration)  # read once: the budget and the tuner both pass over it
        context = TuneContext(
            compressor=compressor, lossy=pipeline.lossy, ref_name=dict(plan.lossy),
            reference=lambda n: self._reference_tensor(reference, n).float(),
            finetune=lambda n: source.get(n).float(), tau=lambda n: _on_cpu(pipeline.tau(n)), seeds=seeds,
            lam1_l2=acc.lam1, lam1_l2_per_tensor=acc.per_tensor, has_base=base_record is not None,
            calibration=calibration, per_layer=per_layer, options=dict(tune_options or {}), source=source, seed=seed,
            progress=progress,
        )
        budget_plan = None
        if max_bytes is not None:
            grams = input_grams(context) if weigh_outputs else None
            budget_plan = budget.plan(pipeline, self.objects, menu, acc.lam1 if base_record is not None else 0.0,
                                      seeds, task, fixed, grams)
            del grams
            choice = budget_plan.select(max_bytes)
            compressor = budget.main_compressor(budget_plan, choice)
            method = compressor.name
            context = replace(context, compressor=compressor, compressors={n: menu[j] for n, j in choice.items()})
        compressors = context.compressors
        lambdas: Lambdas = get_tuner(tune or "l2")(context)
        if base_record is None and (lambdas.lam1 != 0.0 or lambdas.per_tensor):
            lambdas = replace(lambdas, lam1=0.0, per_tensor={n: (0.0, l2) for n, (_, l2) in
                                                              (lambdas.per_tensor or {}).items()} or None)

        def write(attempt: Attempt) -> TaskVersion:
            nonlocal choice, compressors, compressor, method, lambdas  # a budget may choose again
            txn = self.objects.new_txn()
            n_params = sum(numel(source.shape(n)) for n in source.names())
            record_source = {
                "label": str(source.label), "bytes": source.nbytes(), "params": n_params,
                "fp16_bytes": 2 * n_params, "relative_delta": pipeline.relative,
                "skipped_files": dict(sorted(source.skipped.items())),  # name-keyed: code point order
                "missing_buffers": plan.missing_buffers, **fingerprint,
            }
            if small_tensor_bits is not None and record_source.get("settings") is None:
                # Lossy small tensors are always recorded (format §5.8), with or without the
                # settings a skip_unchanged commit compares.
                record_source["settings"] = {"small_tensor_bits": small_tensor_bits}

            def version_record(number: int, parent: str | None, encoded, files) -> TaskVersion:
                return TaskVersion(
                    task=task, version=number, parent=parent, created=utc_now(), message=message,
                    reference=ref_digest, base=base_digest, method=method, config=compressor.config.to_dict(),
                    lam1=float(lambdas.lam1), lam2=float(lambdas.lam2), tuning=plain(lambdas.record),
                    tensors=encoded.tensors, files=files, source=record_source, pack=encoded.pack,
                    ref_prefix=plan.prefix, bundle=encoded.bundle, bundled=encoded.bundled,
                )

            for trial in range(budget.ATTEMPTS):
                encoded = pipeline.encode(task, compressor, lambdas, seeds, txn, small_tensor_bits, compressors)
                files = store_files(self.objects, source, txn, reference)
                if budget_plan is None:
                    break
                # The real bytes before publishing, the record's counted by a draft at least as
                # large (a parent hash where the first version has none).
                record_source["budget"] = budget_plan.summary(choice, max_bytes)
                record_source["budget"]["checked_bytes"] = max_bytes  # as wide in msgpack as the figure below, or wider
                real = self._own_bytes(version_record(0, budget.DRAFT_PARENT, encoded, files))
                record_source["budget"]["checked_bytes"] = real
                if real <= max_bytes:
                    break
                if trial == budget.ATTEMPTS - 1:
                    raise InvalidInputError(f"{task}: the version would hold {real:,} bytes, over the budget of "
                                            f"{max_bytes:,} after {budget.ATTEMPTS} tries; raise --max-bytes")
                # Choose again within the budget less what the estimate missed (the record, fitted values
                # that compress less); codes the tuner made for a setting no longer chosen are encoded anew.
                missed = real - record_source["budget"]["estimated_bytes"]
                choice = budget_plan.select(max_bytes - max(missed, real - max_bytes) * (trial + 1) - budget.SLACK)
                changed = {n for n, j in choice.items() if menu[j] is not compressors[n]}
                compressors = {name: menu[j] for name, j in choice.items()}
                compressor = budget.main_compressor(budget_plan, choice)
                method = compressor.name
                if lambdas.codes:
                    lambdas = replace(lambdas, codes={n: c for n, c in lambdas.codes.items() if n not in changed})
            made: list[TaskVersion] = []

            def add_version(ref: TaskRef) -> TaskRef:
                number = ref.last_issued + 1  # never a removed version's number (format.md §5.7)
                parent = ref.versions[-1][1] if ref.versions else None
                record = version_record(number, parent, encoded, files)
                digest = self.objects.put_record(record, txn)
                # The base record too: on an object store it is refreshed, which keeps its
                # arrays from gc even if its ref is removed meanwhile; they are re-checked.
                if base_record is not None:
                    attempt.objects.update(("arrays", h) for h in base_record.array_hashes())
                attempt.settle([("records", base_digest)] if base_digest else [])
                made[:] = [record]
                return TaskRef(ref.versions + [(number, digest)], number)

            self._update_task_ref(task, add_version)
            self.backend.delete(txn)
            return made[0]

        return self.writes.run(write)

    def commit_many(self, jobs: Iterable[Job | Mapping[str, Any]], client: "Client | None" = None, *,
                    progress: bool | None = None, echo=None) -> dict[str, Any]:
        """Commit many finetunes at once on Dask workers, each job an independent
        :meth:`commit` with ``skip_unchanged=True``: see :mod:`deltastore.engine.fanout`.

        ``jobs``: :class:`~deltastore.engine.fanout.Job` objects (``read_jobs`` reads a file of
        them) or mappings of the same fields; ``client``: a
        ``distributed.Client`` (default: a local cluster sized to this machine, started and
        stopped here); ``progress``, ``echo``: a line per job as it finishes (see
        :func:`~deltastore.engine.fanout.commit_many`). Returns the summary: done, skipped,
        failed, bytes, ratios, each job."""
        from .engine.fanout import Job, check_jobs, commit_many, connect

        jobs = list(jobs)
        checked = iter(check_jobs([(n, job) for n, job in enumerate(jobs, 1) if not isinstance(job, Job)]))
        jobs = [job if isinstance(job, Job) else next(checked) for job in jobs]
        for base in sorted({job.base for job in jobs if job.base is not None}):
            self.base(base)  # a missing base vector would fail each of its jobs: refuse it once, up front
        if client is not None:
            return commit_many(type(self), self._location(), jobs, client, progress=progress, echo=echo)
        with connect() as local:
            return commit_many(type(self), self._location(), jobs, local, progress=progress, echo=echo)

    def remove(self, task: str, version: int | None = None) -> list[int]:
        """Drop one version (or, with ``version=None``, the whole task) from the refs;
        ``TASK@N`` and ``TASK@latest`` name one version.

        The objects stay on disk until the next :meth:`gc`. Returns the version numbers removed.
        The task's ref stays, even with no version left, to keep the highest number issued.
        """
        one_version = "@" in task
        task, version = split_spec(task, version)
        removed: list[int] = []

        def drop(ref: TaskRef) -> TaskRef:
            if not ref.versions:
                raise NotFoundError(f"{self.path}: no task named {task!r} (known tasks: {', '.join(self.tasks())})")
            number = ref.versions[-1][0] if one_version and version is None else version  # TASK@latest
            keep = [] if number is None else [(n, d) for n, d in ref.versions if n != number]
            if len(keep) == len(ref.versions):
                raise NotFoundError(f"{self.path}: task {task!r} has no version {number}")
            removed[:] = [n for n, digest in ref.versions if (n, digest) not in keep]
            return TaskRef(keep, ref.last_issued)

        # A writer like any other: on a folder under the shared registry lock, so gc cannot
        # collect the temp file of the ref update before it is renamed into place.
        self.writes.run(lambda attempt: self._update_task_ref(task, drop))
        return removed

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
                   dtype: torch.dtype | None = None, verify: bool = True):
        """A ready ``transformers`` model of the class named in the task's stored config.json.

        ``verify``: rehash every array read, as :meth:`materialize` does (False skips it: faster
        when the registry was checked with ``deltastore verify``, but damage goes unnoticed)."""
        from .hf import load_model

        return load_model(self, *split_spec(task, version), device=device, dtype=dtype, verify=verify)

    # -- copying ----------------------------------------------------------------------------
    def copy_to(self, dst: str | os.PathLike, tasks: Iterable[str] | None = None, *,
                progress: bool | None = None) -> dict[str, Any]:
        """Copy ``tasks`` (default: all, with every base vector) into registry ``dst``, like
        ``git push``: see :func:`deltastore.copy.copy`."""
        from .copy import copy

        return copy(self.path, dst, tasks, progress=progress)

    # -- integrity --------------------------------------------------------------------------
    def verify(self, *, progress: bool | None = None) -> list[dict[str, str]]:
        """Rehash every object and check every ref; returns the problems found (empty: clean).

        Each problem: ``{"object": key, "problem": text, "used_by": "task@v, ..."}``.
        """
        from .integrity import verify

        return verify(self, show_progress=progress)

    def gc(self, *, grace: float | None = None) -> dict[str, int]:
        """Delete every object no ref reaches, and whatever dead operations left in staging,
        when last written more than ``grace`` seconds ago. Default: 0 on a folder (gc holds
        the registry lock, no write is in flight beside it), an hour on an object store, where
        writes beside gc are kept safe by it (specs/format.md §9.2)."""
        from .integrity import gc

        return gc(self, grace=grace)

    # -- internals --------------------------------------------------------------------------
    def _location(self) -> str:
        """Where other processes (Dask workers) open this registry: its URL, or its absolute path."""
        return str(self.path) if is_url(self.path) else str(Path(self.path).absolute())

    def _update_task_ref(self, task: str, change: Callable[[TaskRef], TaskRef]) -> None:
        """Compare-and-swap of ``refs/tasks/<task>`` (storage/writes.py:update_ref), on every backend."""
        key = f"refs/tasks/{task}"
        what = f"{self.path}/{key}"
        update_ref(self.backend, key, lambda data: pack(change(
            TaskRef.from_dict(unpack(data, what), what) if data is not None else TaskRef([])).to_dict()))

    def _own_bytes(self, record: TaskVersion) -> int:
        """``stats``' own bytes of a version whose arrays and blobs are stored and whose record
        is not yet: the record counted as the bytes it will be written as."""
        stored = self._own_objects(budget.PLACEHOLDER, record)[1:]
        return len(record_frame(pack(record.to_dict()))) + budget.RECORD_FRAME_SLACK + \
            sum(self.objects.size(*obj) for obj in stored)

    def _reference_tensor(self, reference: ReferenceRecord, name: str) -> torch.Tensor:
        return decode_stored(reference.tensors[name], self._array_getter("cpu"), "cpu")

    def _array_getter(self, device, verify: bool = True) -> ArrayGetter:
        """``array(digest, what)``: a stored array on ``device`` (the plain, one-thread read)."""
        return lambda digest, what: self.objects.get_array(digest, verify=verify, what=what).to(device)



def _on_cpu(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.cpu()


__all__ = ["Registry", "VersionStats", "parse_spec", "check_name", "DeltastoreError", "Record"]
