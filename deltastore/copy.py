"""``deltastore copy``: tasks of one registry into another, like ``git push``.

Only the objects the destination lacks are transferred; each is read from the source with its
hash checked and written through the destination's staged writes, which check the name again
(:meth:`ObjectStore.copy_from`). Refs are written last, by compare-and-swap, once every object
they reach is there (specs/format.md §9 invariant 3; on an object store after the re-check of
§9.2): a killed copy leaves the destination's refs as they were, and running it again resumes
it (what is there is skipped). The destination is a folder or an object-store URL.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from .catalog import (INFO_KEY, REFERENCE_REF, Catalog, NewRegistry, check_name, init_leftover, open_location,
                      utc_now)
from .errors import AlreadyExistsError, InvalidInputError
from .integrity import _reachable
from .progress import progress as _progress
from .storage.objects import ObjectStore
from .storage.records import PointerRef, TaskRef, pack, unpack
from .storage.writes import Attempt, update_ref

KINDS = ("arrays", "blobs", "records")  # records last: what they name is there before them


def _copy_object(source: ObjectStore, dest: ObjectStore, kind: str, digest: str, txn: str) -> bool:
    """One object (a seam the tests use to interrupt a copy)."""
    return dest.copy_from(source, kind, digest, txn)


def _fast_forward(task: str, have: TaskRef, want: TaskRef, dst: Any) -> bool:
    """Does ``want`` extend ``have`` (True: the ref changes; False: already equal)? Refuses otherwise."""
    for index, (mine, theirs) in enumerate(zip(have.versions, want.versions)):
        if mine != theirs:
            raise AlreadyExistsError(
                f"{dst}: task {task!r} differs from the source's at version {mine[0]} (destination record "
                f"{mine[1][:12]}, source {theirs[0]}: {theirs[1][:12]}); copy is fast-forward only: remove or "
                "rename the destination's task first")
    if len(have.versions) > len(want.versions):
        extra = have.versions[len(want.versions)][0]
        raise AlreadyExistsError(f"{dst}: task {task!r} has version {extra}, which the source lacks; copy is "
                                 "fast-forward only: remove it from the destination first")
    for number, _ in want.versions[len(have.versions):]:
        if number <= have.last_issued:  # issued there once, for other content (format.md §9 invariant 6)
            raise AlreadyExistsError(f"{dst}: task {task!r} already issued version {number} (since removed); "
                                     "a version number names one content forever: copy into another task name")
    return len(have.versions) < len(want.versions)


def copy(src: str | os.PathLike, dst: str | os.PathLike, tasks: Iterable[str] | None = None, *,
         progress: bool | None = None) -> dict[str, Any]:
    """Copy ``tasks`` (default: every task, and every base vector) of registry ``src`` (a folder
    or an object-store URL) into registry ``dst`` (a folder or a URL), with the base vectors and the
    reference they need. ``dst`` must be a registry with the same reference, or a new or
    empty folder, which becomes one.

    Returns ``{"copied": {kind: n}, "skipped": {kind: n}, "bytes": n, "refs": [keys updated]}``."""
    source = Catalog(src)
    where, backend, dest, writes = open_location(dst)
    reference = source.reference_hash()
    new = not backend.exists(INFO_KEY)
    if new:
        if not all(map(init_leftover, backend.children(""))):
            raise AlreadyExistsError(f"{where}: not a registry and not empty; copy into a registry with the same "
                                     "reference, or into a new or empty folder")
        target, location = None, NewRegistry(backend, where)
    else:
        target = Catalog(dst)
        if target.reference_hash() != reference:
            raise InvalidInputError(
                f"{where}: its reference is record {target.reference_hash()[:12]}, the source's is {reference[:12]}; "
                "copy only between registries of one reference (or into a new folder)")
    wanted = source.tasks() if tasks is None else [check_name("task", t) for t in tasks]
    refs = {f"refs/tasks/{t}": TaskRef(source.version_hashes(t), source._task_ref(t).last_issued) for t in wanted}
    closure = _reachable(source, tasks=wanted if tasks is not None else None)
    for name in source.bases():
        digest = source._pointer(f"refs/bases/{name}", f"{source.path}/refs/bases/{name}")
        if tasks is None or ("records", digest) in closure:
            refs[f"refs/bases/{name}"] = digest
    if target is not None:
        _check_refs(target, refs)  # refuse before transferring anything; checked again at each ref update
    todo = sorted(closure, key=lambda obj: (KINDS.index(obj[0]), obj[1]))

    def write(attempt: Attempt) -> dict[str, Any]:
        result: dict[str, Any] = {"copied": dict.fromkeys(KINDS, 0), "skipped": dict.fromkeys(KINDS, 0),
                                  "bytes": 0, "refs": []}
        txn = dest.new_txn()
        for kind, digest in _progress(todo, total=len(todo), desc="copy", enabled=progress, unit="object"):
            if _copy_object(source.objects, dest, kind, digest, txn):
                result["copied"][kind] += 1
                result["bytes"] += dest.size(kind, digest)
            else:
                result["skipped"][kind] += 1
        if new:
            # No attempt.settle(): gc refuses a location without registry.msgpack.
            location.set_reference(reference)
            result["refs"].append(REFERENCE_REF)
        else:
            attempt.settle()
        for key in _check_refs(Catalog(dst), refs) if not new else list(refs):
            value = refs[key]
            if isinstance(value, TaskRef):
                update_ref(backend, key, lambda data, key=key, value=value: _forwarded(where, key, data, value))
            elif not backend.put_if_absent(key, pack(PointerRef(value).to_dict())):
                _check_refs(Catalog(dst), {key: value})  # created meanwhile: the same one, or refused
            result["refs"].append(key)
        if new:  # as init: the info file last, so a killed copy leaves no registry behind
            location.finish(utc_now())
        backend.delete(txn)
        return result

    return writes.run(write)


def _forwarded(where: Any, key: str, data: bytes | None, want: TaskRef) -> bytes:
    """The new bytes of task ref ``key``, now ``data``, fast-forwarded to ``want`` (refused if not)."""
    have = TaskRef.from_dict(unpack(data, f"{where}/{key}"), f"{where}/{key}") if data is not None else TaskRef([])
    _fast_forward(key.split("/")[-1], have, want, where)
    return pack(TaskRef(want.versions, max(want.last_issued, have.last_issued)).to_dict())


def _check_refs(target: Catalog, refs: dict[str, Any]) -> list[str]:
    """The refs of ``refs`` that ``target`` lacks or has behind; refuses a conflict."""
    changed = []
    for key, value in refs.items():
        name = key.split("/")[-1]
        if isinstance(value, TaskRef):
            if _fast_forward(name, target._task_ref(name), value, target.path):
                changed.append(key)
        elif not target.backend.exists(key):
            changed.append(key)
        else:
            have = target._pointer(key, f"{target.path}/{key}")
            if have != value:
                raise AlreadyExistsError(f"{target.path}: base vector {name!r} is record {have[:12]}, the source's "
                                         f"is {value[:12]}; remove or rename one of them, then copy again")
    return changed


__all__ = ["copy"]
