"""The read side of a registry: refs, records, history and byte accounting.

Everything here reads msgpack records and ref files only, so it imports neither torch nor
zarr: ``deltastore ls``, ``log`` and ``show`` answer at once (benchmarks/cli_startup.py).
:class:`deltastore.Registry` adds the operations that compute with tensors.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import AlreadyExistsError, CorruptObjectError, DeltastoreError, InvalidInputError, NotFoundError
from .storage.backend import LocalBackend
from .storage.objects import ObjectStore
from .storage.protocol import Backend
from .storage.writes import PROBE_PREFIX, GraceWrites, LockedWrites
from .storage.records import (FORMAT_MAJOR, FORMAT_MINOR, FORMAT_NAME, BaseRecord, PointerRef, ReferenceRecord,
                              RegistryInfo, TaskRef, TaskVersion, pack, unpack)

INFO_KEY = "registry.msgpack"
REFERENCE_REF = "refs/reference"
CACHE_ENV = "DELTASTORE_CACHE"  # the read-through cache's folder for registries on object stores
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

INIT_LEFTOVERS = frozenset({"objects", "staging", "refs", "locks"})  # all a registry holds but INFO_KEY


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _killed_put(name: str, key: str) -> bool:
    """Is ``name`` the temp file of an atomic put of ``key`` that was killed (LocalBackend.put)?"""
    return name.startswith(f".{key}.") and name.endswith(".tmp")


def init_leftover(name: str) -> bool:
    """Is ``name``, at the root of a location without registry.msgpack, what a killed ``init``
    (or ``copy`` into a new registry) may have left, which the next one may write over?"""
    return name in INIT_LEFTOVERS or _killed_put(name, INFO_KEY) or name.startswith(PROBE_PREFIX)


class NewRegistry:
    """How ``init`` (and ``copy`` into a new location) makes a location a registry, so that of
    two doing it at once exactly one succeeds and the other is refused, on any backend.

    Made when the writer first looks (no ``registry.msgpack`` there): it notes
    ``refs/reference`` as it is then (absent, or a killed init's). :meth:`set_reference`
    replaces it by compare-and-swap against that, and :meth:`finish` creates
    ``registry.msgpack`` create-only (specs/format.md §9 invariant 5). Without the two
    conditions the later of two racing inits would overwrite the earlier's reference under
    tasks already committed against it."""

    def __init__(self, backend: Backend, where: Any):
        self.backend, self.where = backend, where
        self.seen, self.seen_token = backend.get_versioned(REFERENCE_REF)
        self.ours: bytes | None = None

    def _refuse(self) -> AlreadyExistsError:
        return AlreadyExistsError(f"{self.where}: another init or copy made this location a registry while this one "
                                  "ran (nothing of this run is visible); open the registry that is there instead")

    def set_reference(self, digest: str) -> None:
        """Point ``refs/reference`` at reference record ``digest``, or refuse if it changed."""
        self.ours = pack(PointerRef(digest).to_dict())
        if self.backend.exists(INFO_KEY) or not self.backend.put_if_version(REFERENCE_REF, self.ours,
                                                                            self.seen_token):
            raise self._refuse()

    def finish(self, created: str) -> None:
        """Write ``registry.msgpack`` (last) saying the registry was ``created`` then, or, if
        another writer finished first, put back the reference ref this one replaced, and refuse."""
        info = RegistryInfo(FORMAT_NAME, (FORMAT_MAJOR, FORMAT_MINOR), created)
        if self.backend.put_if_absent(INFO_KEY, pack(info.to_dict())):
            return
        data, token = self.backend.get_versioned(REFERENCE_REF)
        if data == self.ours and self.seen is not None and data != self.seen:
            self.backend.put_if_version(REFERENCE_REF, self.seen, token)
        raise self._refuse()


def is_url(path: str | os.PathLike) -> bool:
    """Is ``path`` an object-store URL (``s3://bucket/prefix``, ``gs://``, ``az://``...)
    rather than a local folder?"""
    return isinstance(path, str) and "://" in path


def check_name(kind: str, name: str) -> str:
    """Task and base names become file names: refuse anything that could escape the registry."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:  # fullmatch: '$' allows "x\n"
        raise InvalidInputError(
            f"invalid {kind} name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit, without '..'"
        )
    return name


def parse_spec(spec: str) -> tuple[str, int | None]:
    """``TASK``, ``TASK@latest`` or ``TASK@VERSION`` -> (task, version or None for the latest)."""
    task, sep, version = spec.partition("@")
    if not sep or version == "latest":
        return task, None
    if not (version.isascii() and version.isdigit()):  # '²'.isdigit() is True, int('²') fails
        raise InvalidInputError(f"invalid task version {spec!r}: expected TASK@N with N a positive integer, "
                                "or TASK@latest")
    return task, int(version)


def split_spec(task: str, version: int | None = None) -> tuple[str, int | None]:
    """The API names a task as ``TASK``, ``TASK@N`` or ``TASK@latest`` (like the CLI), or as
    ``TASK`` plus ``version=N``: -> (task, version or None for the latest)."""
    name, number = parse_spec(task)
    if number is not None and version is not None and number != version:
        raise InvalidInputError(f"{task!r} names version {number} but version={version} was also given; "
                                "give the version once")
    return name, version if number is None else number


def setting_label(codec: str, config: dict[str, Any]) -> str:
    """``dare drop_rate=0.99 value_bits=8``: a compressor setting as the CLI shows it."""
    return " ".join([codec, *(f"{k}={v}" for k, v in sorted(config.items()))])


def delta_settings(record: TaskVersion) -> dict[str, int]:
    """Per compressor setting, how many of the version's delta entries use it (several after a
    budgeted commit, which picks one per tensor), most used first."""
    counts: dict[str, int] = {}
    for entry in record.tensors.values():
        if entry.is_delta:
            label = setting_label(entry.codec, entry.config)
            counts[label] = counts.get(label, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


@dataclass
class VersionStats:
    """Bytes a task version owns on disk and the ratios they give (specs/format.md §10)."""

    own_bytes: int            # record + every array and blob not shared with the reference
    amortized_bytes: float    # the same, with objects other tasks also use split between them
    base_bytes: int           # the base vector's bytes (0 without one)
    base_users: int           # tasks whose latest version uses that base vector
    source_bytes: int         # the finetune's tensors in their original dtype
    source_fp16_bytes: int    # the finetune's tensors at 2 bytes per element
    file_bytes: int = 0       # the part of own_bytes that is side files (config, tokenizer...)
    parts: dict[str, int] = field(default_factory=dict)  # own_bytes by part (PARTS)

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
            "file_bytes": self.file_bytes,
            "parts": dict(self.parts),
            "ratio_fp16": self.source_fp16_bytes / self.own_bytes if self.own_bytes else None,
            "ratio_source_dtype": self.source_bytes / self.own_bytes if self.own_bytes else None,
            "ratio_fp16_with_base_share": self.source_fp16_bytes / total if total else None,
            "ratio_fp16_amortized": self.source_fp16_bytes / amortized if amortized else None,
        }

def open_location(path: str | os.PathLike, *, cache: str | os.PathLike | None = None
                  ) -> tuple[str | Path, Backend, ObjectStore, LockedWrites | GraceWrites]:
    """``(path, backend, objects, writes)`` of the registry at ``path``, a folder or an
    object-store URL: the one place that picks the backend. ``cache``: the read-through array
    cache of an object-store registry (see :class:`Catalog`; a folder is never cached). The code above it reaches bytes
    through the Backend protocol, and keeps out of gc's way through ``writes``
    (storage/writes.py: ``flock`` on a folder, gc's grace period on an object store)."""
    if is_url(path):
        from .storage.objectstore import ObjectStoreBackend

        url = str(path).rstrip("/")
        # No probe of conditional writes yet: reading needs none (and read-only credentials
        # suffice); GraceWrites probes before the first write.
        backend: Backend = ObjectStoreBackend(url, check_writes=False)
        objects = ObjectStore(backend, LocalBackend(cache) if cache else None)
        return url, backend, objects, GraceWrites(backend, objects)
    backend = LocalBackend(path)
    objects = ObjectStore(backend)
    return Path(path), backend, objects, LockedWrites(backend, objects)


# The parts of a version's own bytes (specs/format.md §10), in the order an object shared by two
# parts is counted in: the first that names it.
PARTS = ("record", "masks", "codes", "small_tensors", "side_files")


def byte_parts(digest: str, record: TaskVersion, sizes: dict[tuple[str, str], int]) -> dict[str, int]:
    """``sizes`` (the version's own objects, :meth:`Catalog._own_objects`) summed by part."""
    part_of: dict[tuple[str, str], str] = {("records", digest): "record"}
    deltas = [e for e in record.tensors.values() if e.is_delta]
    for entry in deltas:
        if entry.rows:
            part_of.setdefault(("arrays", entry.rows), "masks")
    for entry in deltas:
        for h in entry.arrays.values():
            part_of.setdefault(("arrays", h), "codes")
    for h in [record.pack] if record.pack else []:
        part_of.setdefault(("arrays", h), "small_tensors")
    for entry in record.tensors.values():
        if not entry.is_delta:
            for h in entry.arrays.values():
                part_of.setdefault(("arrays", h), "small_tensors")
    for h in record.files.values():
        part_of.setdefault(("blobs", h), "side_files")
    parts = dict.fromkeys(PARTS, 0)
    bundle = ("arrays", record.bundle) if record.bundle else None
    for obj, size in sizes.items():
        if obj == bundle and bundle not in part_of:
            # The bundle holds codes and masks (format.md §5.9): split by their bytes in it.
            masks = {e.rows for e in deltas if e.rows}
            mask_bytes = sum(b.nbytes for b in record.bundled if b.name in masks)
            share = round(size * mask_bytes / max(1, sum(b.nbytes for b in record.bundled)))
            parts["masks"] += share
            parts["codes"] += size - share
            continue
        parts[part_of[obj]] += size
    return parts


class Catalog:
    """A registry directory opened for reading (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, *, cache: str | os.PathLike | None = None):
        """``cache``: a local folder to keep the arrays read from a registry on an object store
        in (default: the ``DELTASTORE_CACHE`` environment variable; none when unset), so the
        next read of one, the reference above all, which every materialize reads, makes no
        request. Arrays are named by their content, so a cached one is never stale; each is
        kept once, published there only after it hashed to its name. The folder holds at most
        the arrays read through it and is not trimmed: delete it, or any part of it, at any
        time. A registry in a local folder is read in place, never cached."""
        if cache is None:
            cache = os.environ.get(CACHE_ENV) or None
        self.path, self.backend, self.objects, self.writes = open_location(path, cache=cache)
        info = self._get_present(INFO_KEY)
        if info is None:
            raise NotFoundError(
                f"{self.path}: not a deltastore registry (no {INFO_KEY}); create one with `deltastore init`"
            )
        what = f"{self.path}/{INFO_KEY}"
        self.info = RegistryInfo.from_dict(unpack(info, what), what)
        self._reference_objects: dict[str, set[str]] = {}  # reference record -> its arrays and blobs

    def __repr__(self) -> str:
        return f"Registry({str(self.path)!r})"
    # -- lookups ----------------------------------------------------------------------------
    def _get_present(self, key: str) -> bytes | None:
        """The bytes of ``key``, None where ``backend.exists`` says it is absent: one request
        where it is there (not an exists() then a get, two in series on an object store); what
        the read cannot tell from absence (a missing file, a folder above it that is not one)
        is asked of exists() as before."""
        try:
            return self.backend.get(key)
        except (NotFoundError, CorruptObjectError):
            if self.backend.exists(key):
                raise
            return None

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

    def base_users(self, name: str) -> list[str]:
        """``TASK@N`` of every task version built on base vector ``name`` (reads every version record)."""
        digest, _ = self.base(name)
        return [f"{task}@{number}" for task in sorted(self.tasks()) for number, record in self.versions(task)
                if record.base == digest]

    def tasks(self) -> list[str]:
        """Tasks with at least one version (a ref whose versions were all removed is kept, for
        its highest issued number, but is no task). A ref that cannot be read is listed: using
        the task reports the damage."""
        def listed(task: str) -> bool:
            try:
                return bool(self._task_ref(task).versions)
            except DeltastoreError:
                return True

        return [n for n in self._task_names() if listed(n)]

    def _task_names(self) -> list[str]:
        # Only valid names: a killed ref update leaves a '.<name>.<uuid>.tmp' file here for gc.
        return [n for n in self.backend.children("refs/tasks") if NAME_RE.fullmatch(n) and ".." not in n]

    def _task_ref(self, task: str) -> TaskRef:
        key = f"refs/tasks/{check_name('task', task)}"
        data = self._get_present(key)
        if data is None:
            return TaskRef([])
        return TaskRef.from_dict(unpack(data, f"{self.path}/{key}"), f"{self.path}/{key}")

    def version_hashes(self, task: str) -> list[tuple[int, str]]:
        """``[(version number, record hash)]`` of a task, oldest first: the ref alone, no record read."""
        ref = self._task_ref(task)
        if not ref.versions:
            known = ", ".join(self.tasks()) or "none yet"
            raise NotFoundError(f"{self.path}: no task named {task!r} (known tasks: {known})")
        return list(ref.versions)

    def versions(self, task: str) -> list[tuple[int, TaskVersion]]:
        """``[(version number, record)]`` of a task, oldest first (:meth:`log` is newest first)."""
        return [(number, self._record(task, number, digest)) for number, digest in self.version_hashes(task)]

    def version(self, task: str, version: int | None = None) -> tuple[str, TaskVersion]:
        """(record hash, record) of ``task`` at ``version`` (default: the latest); ``task`` may
        also be ``TASK@N`` or ``TASK@latest``."""
        task, version = split_spec(task, version)
        versions = self.version_hashes(task)
        if version is None:
            number, digest = versions[-1]
        else:
            found = [d for n, d in versions if n == version]
            if not found:
                have = ", ".join(str(n) for n, _ in versions)
                raise NotFoundError(f"{self.path}: task {task!r} has no version {version} (versions: {have})")
            digest = found[0]
            number = version
        return digest, self._record(task, number, digest)

    def _record(self, task: str, number: int, digest: str) -> TaskVersion:
        """The record a task ref lists as version ``number``, cross-checked against the ref."""
        try:
            record = self.objects.get_record(digest, TaskVersion)
        except DeltastoreError as exc:
            raise type(exc)(f"{task}@{number}: {exc}") from None
        if (record.task, record.version) != (task, number):  # refs carry no hash: cross-check them
            raise CorruptObjectError(f"{self.path}/refs/tasks/{task}: lists version {number} as record {digest[:12]}, "
                                     f"which is {record.task}@{record.version}; the ref is damaged")
        return record

    def log(self, task: str) -> list[TaskVersion]:
        """Every version of ``task``, newest first."""
        return [record for _, record in reversed(self.versions(task))]

    def own_bytes(self, task: str, version: int | None = None) -> int:
        """:attr:`VersionStats.own_bytes` alone, without reading the other tasks (``ls``, ``log``)."""
        digest, record = self.version(task, version)
        return sum(self.objects.size(*obj) for obj in self._own_objects(digest, record))

    def _own_objects(self, digest: str, record: TaskVersion) -> list[tuple[str, str]]:
        """(kind, hash) of the record and of every array and blob it uses beyond the reference."""
        if record.reference not in self._reference_objects:  # a registry holds one reference: read it once
            reference = self.objects.get_record(record.reference, ReferenceRecord)
            self._reference_objects[record.reference] = reference.array_hashes() | set(reference.files.values())
        shared = self._reference_objects[record.reference]
        return [("records", digest)] + [("arrays", h) for h in record.array_hashes() - shared] + [
            ("blobs", h) for h in set(record.files.values()) - shared]

    def stats(self, task: str, version: int | None = None) -> VersionStats:
        """Real bytes on disk that this version owns (specs/format.md §10, "Counting bytes");
        ``task`` may be ``TASK@N``.

        ``own_bytes`` counts every object the version references beyond the reference and
        the base vector in full: what the task costs on its own. ``amortized_bytes`` splits
        each of those objects between the tasks whose latest versions use it (tokenizer
        files every finetune re-saves identically are stored once, so each pays a share).
        """
        task, version = split_spec(task, version)
        digest, record = self.version(task, version)
        mine = self._own_objects(digest, record)
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
                            int(record.source["bytes"]), int(record.source["fp16_bytes"]),
                            sum(size for (kind, _), size in sizes.items() if kind == "blobs"),
                            byte_parts(digest, record, sizes))
