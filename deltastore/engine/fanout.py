"""Commits and base builds fanned out on Dask (``dask.distributed``): many finetunes at once,
from a laptop (a local cluster) to a cluster (a scheduler's address).

- :func:`read_jobs` reads a jobs file (JSONL or CSV, one finetune a line) and refuses it
  whole, naming the line and field, before any job runs.
- :func:`commit_many` runs every job as one independent :meth:`Registry.commit` on a worker,
  with ``skip_unchanged=True``: a job whose finetune the task's latest version already holds
  with the same settings is skipped, so a rerun completes only what is missing. A failed job
  is reported with its error and publishes nothing (a commit is visible only after its final
  ref update); the others go on. A worker that dies mid-job leaves staged objects for ``gc``
  and Dask runs the job again elsewhere.
- :func:`map_base_tensors` spreads a base build over workers, one reference tensor per task,
  each computed by :func:`deltastore.engine.base.base_entry`: the same bits as the
  single-process build.

Workers open the registry by its location (a folder every worker can read, or an
object-store URL) and the finetunes by their paths, so those must be visible to every worker.
A worker started with the resource ``GPU`` (``dask worker ADDRESS --resources GPU=1``, with
``CUDA_VISIBLE_DEVICES`` naming its GPU) encodes on ``cuda``, the others on their CPUs; base
vectors are always computed on CPUs (their BitDelta scale is a float32 sum whose last bits
would differ on a GPU).

This module imports ``distributed`` only inside its functions: the core library and the
CLI's read commands do not need Dask (the ``dask`` extra).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

from ..catalog import Catalog, check_name
from ..errors import DeltastoreError, InvalidInputError, NotFoundError
from ..progress import progress as progress_bar
from ..sources import open_source
from ..storage.records import TensorEntry
from .base import base_entry, check_base_inputs
from .commit import plan_finetune

if TYPE_CHECKING:
    from distributed import Client, SpecCluster

# Torch threads of each worker of a local cluster: a commit also keeps reader and writer
# threads busy (hashing, zstd, disk), so about two cores per running commit.
THREADS_PER_WORKER = 2
JOB_FIELDS = ("task", "path", "method", "config", "base", "tune", "calib", "message")
JOB_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}


@dataclass(frozen=True)
class Job:
    """One line of a jobs file: commit finetune ``path`` as the next version of ``task``."""

    line: int
    task: str
    path: str
    method: str
    config: dict[str, Any] = field(default_factory=dict)
    base: str | None = None
    tune: str | None = None
    calib: str | None = None
    message: str = ""


# -- the jobs file -----------------------------------------------------------------------------
def read_jobs(path: str | os.PathLike) -> list[Job]:
    """The jobs of a JSONL (``.jsonl``) or CSV (``.csv``, with a header row) file, checked whole.

    Fields: ``task`` and ``path`` (required; a relative path is taken from the jobs file's
    folder), ``method`` (a compressor, default ``bitdelta``), ``config`` (its fields as
    ``KEY=VALUE`` pairs separated by spaces, as ``--config`` takes them; in JSONL also a list
    of such pairs or an object), ``base``, ``tune``, ``calib`` (a calibration file, for ``tune``
    ``dbms``) and ``message``. One job per task: a task named twice is refused, since only the
    latest version is compared when a rerun skips what is done.
    """
    path = Path(path)
    kind = JOB_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise InvalidInputError(f"{path}: expected a jobs file ending in {', '.join(JOB_SUFFIXES)}, found "
                                f"{path.suffix or 'no suffix'}")
    if not path.is_file():
        raise NotFoundError(f"jobs file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    rows = _jsonl_rows(path, text) if kind == "jsonl" else _csv_rows(path, text)
    if not rows:
        raise InvalidInputError(f"{path}: holds no jobs")
    return check_jobs(rows, folder=path.parent, where=str(path))


def check_jobs(rows: Iterable[tuple[int, Mapping[str, Any]]], *, folder: str | os.PathLike = ".",
               where: str = "jobs") -> list[Job]:
    """``(line number, fields)`` rows as jobs, each field checked; the first problem raises
    InvalidInputError naming the line, the field, what was expected and what was found."""
    jobs = [_job(line, row, Path(folder), where) for line, row in rows]
    check_one_job_per_task(jobs, where)
    return jobs


def check_one_job_per_task(jobs: list[Job], where: str = "jobs") -> None:
    """Refuse two jobs of one task: their order would be the workers' whim, and a rerun, which
    compares a finetune with its task's latest version only, would commit one of them again."""
    seen: dict[str, int] = {}
    for job in jobs:
        if job.task in seen:
            raise InvalidInputError(f"{where}:{job.line}: field task: task {job.task!r} is also the job of line "
                                    f"{seen[job.task]}; give one job per task (commit further versions in another "
                                    "run)")
        seen[job.task] = job.line


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise InvalidInputError(f"{path}:{number}: expected a JSON object, found invalid JSON "
                                    f"({type(exc).__name__}: {str(exc)[:100]})") from None
        if not isinstance(row, dict):
            raise InvalidInputError(f"{path}:{number}: expected a JSON object, found {type(row).__name__}")
        rows.append((number, row))
    return rows


def _csv_rows(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        return []
    header = [name.strip() for name in header]
    rows = []
    for cells in reader:
        number = reader.line_num
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) != len(header):
            raise InvalidInputError(f"{path}:{number}: expected {len(header)} cells (the header's "
                                    f"{', '.join(header)}), found {len(cells)}")
        rows.append((number, {name: cell for name, cell in zip(header, cells) if cell.strip()}))
    return rows


def _job(line: int, row: Mapping[str, Any], folder: Path, where: str) -> Job:
    from ..tensor.compressors import DEFAULT_COMPRESSOR, WHOLE_TENSORS, compressor_class, delta_compressors
    from ..tuning import get_tuner

    def bad(name: str, expected: str, found: Any) -> InvalidInputError:
        return InvalidInputError(f"{where}:{line}: field {name}: expected {expected}, found {found!r:.200}")

    unknown = sorted(set(row) - set(JOB_FIELDS))
    if unknown:
        raise InvalidInputError(f"{where}:{line}: unknown field(s) {', '.join(unknown)}; the fields are "
                                f"{', '.join(JOB_FIELDS)}")
    for name in ("task", "path"):
        if name not in row:
            raise InvalidInputError(f"{where}:{line}: field {name} is missing (every job needs task and path)")
    values: dict[str, Any] = {}
    for name in ("task", "path", "method", "base", "tune", "calib", "message"):
        if name in row and not isinstance(row[name], str):
            raise bad(name, "a string", row[name])
        values[name] = row[name].strip() if name in row and name != "message" else row.get(name)
    try:
        check_name("task", values["task"])
        if values["base"] is not None:
            check_name("base", values["base"])
    except InvalidInputError as exc:
        raise InvalidInputError(f"{where}:{line}: {exc}") from None
    finetune = (folder / values["path"]).absolute()
    if not finetune.exists():
        raise bad("path", "a finetune folder or .safetensors file", f"no such path {finetune}")
    method = values["method"] or DEFAULT_COMPRESSOR
    try:
        config_class = compressor_class(method).config_class
    except DeltastoreError:
        config_class = None
    if config_class is None or method == WHOLE_TENSORS:
        raise bad("method", f"a compressor of deltas ({', '.join(delta_compressors())})", method)
    try:
        config = config_class.from_strings(_config_pairs(row.get("config"))).to_dict()
    except (InvalidInputError, TypeError, ValueError) as exc:
        raise InvalidInputError(f"{where}:{line}: field config: {exc}") from None
    tune, calib = values["tune"], values["calib"]
    if tune is not None:
        try:
            get_tuner(tune)
        except DeltastoreError as exc:
            raise InvalidInputError(f"{where}:{line}: field tune: {exc}") from None
    if calib is not None:
        calib_path = (folder / calib).absolute()
        if tune in (None, "l2"):
            raise bad("calib", "no calibration file without a data-driven tune (such as dbms)", calib)
        if not calib_path.is_file():
            raise bad("calib", "a calibration file", f"no such file {calib_path}")
        calib = str(calib_path)
    elif tune == "dbms":
        raise InvalidInputError(f"{where}:{line}: field calib is missing: tune dbms fits lam1/lam2 on data "
                                "(a text or JSONL file, one example per line)")
    return Job(line, values["task"], str(finetune), method, config, values["base"], tune, calib,
               values["message"] or "")


def _config_pairs(value: Any) -> dict[str, str]:
    """``KEY=VALUE`` pairs (a string of them separated by spaces, or a list) or an object, as
    field -> text for :meth:`CompressorConfig.from_strings`."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): "none" if v is None else json.dumps(v) if not isinstance(v, str) else v
                for k, v in value.items()}
    items = value.split() if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise InvalidInputError(f"expected KEY=VALUE pairs (a string or a list of strings) or an object, found "
                                f"{value!r:.200}")
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise InvalidInputError(f"expected KEY=VALUE, found {item!r}")
        if key.strip() in pairs:
            raise InvalidInputError(f"field {key.strip()} is given twice")
        pairs[key.strip()] = text
    return pairs


# -- the cluster --------------------------------------------------------------------------------
def local_cluster(workers: int | None = None, *, gpus: int | None = None) -> "SpecCluster":
    """A cluster of worker processes on this machine (what ``distributed.LocalCluster`` starts,
    as a ``SpecCluster`` so that workers may differ): ``workers`` of them (default: one per
    THREADS_PER_WORKER cores), one task at a time each; the first ones get one GPU each
    (resource ``GPU``, ``CUDA_VISIBLE_DEVICES``) while GPUs last, or the first ``gpus`` GPUs
    (0: every worker on CPUs)."""
    import logging

    import torch
    from distributed import Nanny, Scheduler, SpecCluster

    count = workers if workers is not None else max(1, (os.cpu_count() or 1) // THREADS_PER_WORKER)
    if count < 1:
        raise InvalidInputError(f"a local cluster needs at least one worker, got {count}")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # this process's GPUs, as the workers must name them
    devices = visible.split(",") if visible is not None else [str(i) for i in range(torch.cuda.device_count())]
    devices = devices[:torch.cuda.device_count() if gpus is None else min(gpus, torch.cuda.device_count())]
    threads = str(THREADS_PER_WORKER)

    def spec(i: int) -> dict[str, Any]:
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        options: dict[str, Any] = {"nthreads": 1, "host": "127.0.0.1", "dashboard": False,
                                   "silence_logs": logging.ERROR, "memory_limit": 0}
        if i < len(devices):
            env["CUDA_VISIBLE_DEVICES"] = devices[i]
            options["resources"] = {"GPU": 1}
        return {"cls": Nanny, "options": {**options, "env": env}}

    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "port": 0, "dashboard": False}}
    return SpecCluster(workers={f"worker-{i}": spec(i) for i in range(count)}, scheduler=scheduler,
                       silence_logs=logging.ERROR)


@contextmanager
def connect(scheduler: str | None = None, workers: int | None = None) -> Iterator["Client"]:
    """A client of the cluster at ``scheduler`` (an address such as ``tcp://host:8786``), or of a
    :func:`local_cluster` of ``workers`` started here and stopped on exit."""
    from distributed import Client

    if scheduler is not None:
        if workers is not None:
            raise InvalidInputError("give either a scheduler address (an existing cluster) or a number of workers "
                                    "(a local cluster started here), not both")
        try:
            client = Client(scheduler, timeout=30)
        except OSError as exc:
            raise NotFoundError(f"no Dask scheduler answers at {scheduler} ({exc}); start one with "
                                "`dask scheduler` or leave the address out to start a local cluster") from None
        with client:
            yield client
        return
    with local_cluster(workers) as cluster, Client(cluster) as client:
        yield client


def _worker_device() -> str:
    """``cuda`` on a worker that declares the resource ``GPU`` (and can see one), else ``cpu``."""
    from distributed import get_worker

    try:
        worker = get_worker()
    except ValueError:  # not on a worker (a client-side call)
        return "cpu"
    if worker.state.total_resources.get("GPU", 0) > 0:
        import torch

        if torch.cuda.is_available():
            return "cuda"
    return "cpu"


# -- commit-many --------------------------------------------------------------------------------
def commit_many(registry_class: type, location: str, jobs: list[Job], client: "Client", *,
                progress: bool | None = None, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run ``jobs`` on ``client``'s workers (see the module docstring); the summary.

    ``registry_class``: what workers open ``location`` with (:class:`deltastore.Registry`;
    passed in, so this engine module does not import the registry that imports it).
    ``echo``: called with one line per job as it finishes (progress), when ``progress`` is
    True, or None and stderr is a terminal."""
    from distributed import as_completed

    check_one_job_per_task(jobs)
    if progress is None:
        progress = sys.stderr.isatty()
    began = time.monotonic()
    futures = {client.submit(run_job, registry_class, location, job, key=f"commit-{job.task}-{uuid.uuid4().hex}"):
               job for job in jobs}
    results = []
    for future in as_completed(futures):
        job = futures[future]
        try:
            result = future.result()
        except Exception as exc:  # the job's worker died (KilledWorker) or the cluster went away
            result = JobResult(job.line, job.task, "failed", error=f"{type(exc).__name__}: {exc}")
        results.append(result)
        if echo is not None and progress:
            echo(f"[{len(results)}/{len(jobs)}] {result.line_summary()}")
    results.sort(key=lambda r: r.line)
    return summarize(location, results, time.monotonic() - began, len(client.nthreads()))


@dataclass
class JobResult:
    """What became of one job: ``status`` is ``done``, ``skipped`` or ``failed``."""

    line: int
    task: str
    status: str
    version: int | None = None
    own_bytes: int = 0
    source_bytes: int = 0
    fp16_bytes: int = 0
    seconds: float = 0.0
    device: str = ""
    worker: str = ""
    error: str = ""

    @property
    def ratio_fp16(self) -> float | None:
        return self.fp16_bytes / self.own_bytes if self.own_bytes else None

    def line_summary(self) -> str:
        if self.status == "failed":
            return f"failed {self.task} (line {self.line}): {self.error}"
        what = f"{self.task}@{self.version}"
        if self.status == "skipped":
            return f"skipped {what}: it already holds this finetune with these settings"
        return (f"done {what}: {self.own_bytes / 1e6:.2f} MB on disk, {self.ratio_fp16:.3g}x vs fp16, "
                f"{self.seconds:.1f} s on {self.device}")


def run_job(registry_class: type, location: str, job: Job) -> JobResult:
    """One job, on a worker: an independent commit with ``skip_unchanged=True``. Every error is
    returned, not raised (an error is no reason for Dask to run the job again)."""
    from distributed import get_worker

    began = time.monotonic()
    device = _worker_device()
    try:
        worker = get_worker().address
    except ValueError:
        worker = "client"
    try:
        registry = registry_class(location)
        try:
            latest = registry.version_hashes(job.task)[-1][0]
        except NotFoundError:
            latest = None
        calibration = None
        if job.calib is not None:
            from ..calibration import load_calibration

            folder = Path(job.path)
            calibration = load_calibration(job.calib, folder if folder.is_dir() else None)
        record = registry.commit(job.task, job.path, method=job.method, config=job.config, base=job.base,
                                 message=job.message, tune=job.tune, calibration=calibration, device=device,
                                 progress=False, skip_unchanged=True)
        own = registry.own_bytes(job.task, record.version)
    except Exception as exc:
        error = str(exc) if isinstance(exc, DeltastoreError) else f"{type(exc).__name__}: {exc}"
        return JobResult(job.line, job.task, "failed", seconds=time.monotonic() - began, device=device,
                         worker=worker, error=error)
    return JobResult(job.line, job.task, "skipped" if record.version == latest else "done", record.version, own,
                     int(record.source["bytes"]), int(record.source["fp16_bytes"]), time.monotonic() - began,
                     device, worker)


def summarize(location: str, results: list[JobResult], seconds: float, workers: int) -> dict[str, Any]:
    """Counts, bytes and ratios of the jobs done (skipped ones wrote nothing), throughput."""
    done = [r for r in results if r.status == "done"]
    own, source, fp16 = (sum(getattr(r, key) for r in done) for key in ("own_bytes", "source_bytes", "fp16_bytes"))
    return {
        "registry": location, "jobs": len(results), "workers": workers, "seconds": seconds,
        "done": len(done), "skipped": sum(r.status == "skipped" for r in results),
        "failed": sum(r.status == "failed" for r in results),
        "bytes_on_disk": own, "source_bytes": source, "fp16_bytes": fp16,
        "ratio_fp16": fp16 / own if own else None,
        "finetunes_per_minute": 60 * len(done) / seconds if seconds else None,
        "source_gb_per_s": source / 1e9 / seconds if seconds else None,
        "results": [{**asdict(r), "ratio_fp16": r.ratio_fp16} for r in results],
    }


# -- base build ---------------------------------------------------------------------------------
def map_base_tensors(client: "Client", location: str, finetunes: list[str], ref_names: list[str], step: str, *,
                     progress: bool | None = None, row_fraction: float = 1.0) -> dict[str, TensorEntry]:
    """One task per reference tensor on ``client``'s workers: ``step`` ``check`` refuses NaN or
    infinities (returns nothing), ``build`` stages each tensor's entry (on ``row_fraction`` of its
    changed rows) and returns them all. The first error cancels the rest and is raised."""
    from distributed import as_completed

    build = uuid.uuid4().hex
    futures = {client.submit(_base_tensor_task, location, tuple(finetunes), build, name, step, row_fraction,
                             key=f"base-{step}-{name}-{build}"): name for name in ref_names}
    entries: dict[str, TensorEntry] = {}
    try:
        for future in progress_bar(as_completed(futures), total=len(futures), desc=f"base {step}",
                                   enabled=progress):
            entries[futures[future]] = future.result()
    except BaseException:
        client.cancel(list(futures))
        raise
    return {name: entries[name] for name in ref_names} if step == "build" else {}


def _base_tensor_task(location: str, finetunes: tuple[str, ...], build: str, ref_name: str,
                      step: str, row_fraction: float) -> TensorEntry | None:
    catalog, reference, sources, plans = _base_inputs(location, finetunes, build)
    if step == "check":
        check_base_inputs(sources, plans, ref_name)
        return None
    txn = catalog.objects.new_txn()  # one per task: two tasks never stage the same array at once
    entry = base_entry(catalog.objects, reference, sources, plans, ref_name, txn, row_fraction)
    catalog.backend.delete(txn)
    return entry


@lru_cache(maxsize=2)
def _base_inputs(location: str, finetunes: tuple[str, ...], build: str):
    """A worker opens the registry and the finetunes once per build (``build``: its id, so a
    later build rereads finetunes rewritten meanwhile), not once per tensor."""
    catalog = Catalog(location)
    reference = catalog.reference()
    sources = [open_source(f) for f in finetunes]
    return catalog, reference, sources, [plan_finetune(reference, s) for s in sources]
