"""``verify`` (rehash everything, check every ref) and ``gc`` (drop what no ref reaches)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .catalog import is_url
from .errors import CorruptObjectError, DeltastoreError, InvalidInputError
from .progress import progress
from .storage.layout import ARRAY_METADATA
from .storage.objects import object_key
from .storage.records import BaseRecord, ReferenceRecord, TaskVersion, unpack
from .storage.writes import GC_LEASE_PREFIX

if TYPE_CHECKING:
    from .catalog import Catalog
    from .registry import Registry


def _raise(message: str):
    raise CorruptObjectError(message)


def _key(kind: str, digest: str) -> str:
    try:
        return object_key(kind, digest)
    except CorruptObjectError:
        return f"objects/{kind}/{digest!r:.80}"


def _checked(digest: str) -> str:
    object_key("records", digest)  # raises on anything but a well-formed object name
    return digest


def _reachable(registry: "Catalog", problems: list[dict[str, str]] | None = None, tasks: list[str] | None = None,
               records: list[tuple[str, str, type]] = ()):
    """Objects reachable from the refs, by kind, and for each object who uses it.

    With ``problems`` given, unreadable refs and records are reported there instead of raised.
    With ``tasks`` given, only the reference and those tasks are roots (not the base refs):
    the closure one needs to copy those tasks (``deltastore copy``). ``records``: more roots,
    ``(hash, who, record class)`` (gc's recently written records).
    """
    used_by: dict[tuple[str, str], set[str]] = {}

    def use(kind: str, digest: str, who: str) -> bool:
        if guard(_key(kind, digest), who, lambda: object_key(kind, digest)) is None:
            return False  # a malformed name: reported (verify) or raised (gc), never looked up
        used_by.setdefault((kind, digest), set()).add(who)
        return True

    def guard(key: str, who: str, fn):
        try:
            return fn()
        except DeltastoreError as exc:
            if problems is None:
                raise
            problems.append({"object": key, "problem": str(exc), "used_by": who})
            return None

    objects = registry.objects
    # The closure: every record a ref names, and everything each record needs: a version's
    # reference and base records (named by hash, whether or not a ref still names them by
    # name), and the arrays and blobs of every record reached.
    pending: list[tuple[str, str, type]] = list(records)
    ref_digest = guard("refs/reference", "registry", lambda: _checked(registry.reference_hash()))
    if ref_digest:
        pending.append((ref_digest, "reference", ReferenceRecord))
    for name in (guard("refs/bases", "registry", registry.bases) or []) if tasks is None else []:
        digest = guard(f"refs/bases/{name}", f"base {name}", lambda: registry._pointer(
            f"refs/bases/{name}", f"refs/bases/{name}"))
        if digest:
            pending.append((digest, f"base {name}", BaseRecord))
    for task in (guard("refs/tasks", "registry", registry._task_names) or []) if tasks is None else tasks:
        ref = guard(f"refs/tasks/{task}", f"task {task}", lambda: registry._task_ref(task))
        pending += [(digest, f"{task}@{n}", TaskVersion) for n, digest in (ref.versions if ref else [])]
    followed: set[tuple[str, type]] = set()
    while pending:
        digest, who, cls = pending.pop(0)
        if not use("records", digest, who) or (digest, cls) in followed:
            continue
        followed.add((digest, cls))
        record = guard(object_key("records", digest), who, lambda: objects.get_record(digest, cls))
        if record is None:
            continue
        if isinstance(record, TaskVersion) and f"{record.task}@{record.version}" != who:
            # Refs carry no hash of their own: a damaged one may point at another version.
            guard(f"refs/tasks/{who.split('@')[0]}", who, lambda: _raise(
                f"lists {who} as record {digest[:12]}, which holds {record.task}@{record.version}"))
        for h in record.array_hashes():
            use("arrays", h, who)
        for h in getattr(record, "files", {}).values():
            # A patched blob needs its dictionary blob (specs/format.md §9.1); a missing blob is
            # reported as missing by verify, not read here.
            if use("blobs", h, who) and registry.backend.exists(object_key("blobs", h)):
                dictionary = guard(object_key("blobs", h), who, lambda: objects.blob_dictionary(h))
                if dictionary:
                    use("blobs", dictionary, who)
        if isinstance(record, (TaskVersion, BaseRecord)):
            pending.append((record.reference, who, ReferenceRecord))
        if isinstance(record, TaskVersion) and record.base:
            pending.append((record.base, who, BaseRecord))
    return used_by


def _orphaned_ref_folders(registry: "Registry", unreachable: set[tuple[str, str]]) -> list[dict[str, str]]:
    """A ref folder that is gone while records of its kind are stored, unreachable: the folder
    was deleted, not emptied by ``rm`` (which keeps a task's ref, see format.md §5.7). gc would
    delete every task (or base vector) it held, so this is damage, reported by verify and gc.

    Only where folders exist: on an object store a prefix is there while a key is under it, so
    removing the last base vector empties ``refs/bases`` as deleting it would (format.md §9.2)."""
    if is_url(registry.path):
        return []
    kinds = {"task_version": "refs/tasks", "base": "refs/bases"}
    missing = set()
    for folder in kinds.values():
        try:
            if not registry.backend.prefix_exists(folder):
                missing.add(folder)
        except DeltastoreError:
            pass  # there, but not a folder: _reachable reports that
    found: dict[str, int] = {}
    for kind, digest in unreachable:
        if kind != "records" or not missing:
            continue
        try:
            folder = kinds.get(unpack(registry.objects.record_bytes(digest, verify=False), digest).get("kind"))
        except (DeltastoreError, OSError):
            continue  # an unreadable record protects nothing: verify reports it on its own
        if folder in missing:
            found[folder] = found.get(folder, 0) + 1
    return [{"object": folder, "used_by": "registry",
             "problem": f"the folder is missing while {n} record(s) it would name are stored; it was deleted: "
                        f"restore it from a backup (if it never existed, create it empty: mkdir {folder})"}
            for folder, n in sorted(found.items())]


def verify(registry: "Registry", *, show_progress: bool | None = None) -> list[dict[str, str]]:
    problems: list[dict[str, str]] = []
    used_by = _reachable(registry, problems)
    stored = registry.objects.all_objects()
    present = {(kind, d) for kind, names in stored.items() for d in names}
    for (kind, digest), users in sorted(used_by.items()):
        if (kind, digest) not in present:
            problems.append({"object": object_key(kind, digest), "problem": "missing",
                             "used_by": ", ".join(sorted(users))})
    problems += _orphaned_ref_folders(registry, present - set(used_by))
    items = sorted(present)
    for kind, digest in progress(items, total=len(items), desc="verify", enabled=show_progress):
        users = ", ".join(sorted(used_by.get((kind, digest), {"nothing (gc removes it)"})))
        try:
            if kind == "arrays":
                registry.objects.get_array(digest, verify=True, folder=True)
            elif kind == "blobs":
                registry.objects.get_blob(digest, verify=True)
            else:
                registry.objects.record_bytes(digest, verify=True)
        except (DeltastoreError, OSError) as exc:
            if (kind, digest) not in used_by and kind == "arrays" and is_url(registry.path) and \
                    not registry.backend.exists(f"{object_key(kind, digest)}/{ARRAY_METADATA}"):
                continue  # chunks without zarr.json: a killed publish's remains, absent to readers (§9.2)
            problems.append({"object": object_key(kind, digest), "problem": str(exc), "used_by": users})
    return problems


RECORD_CLASSES = {"reference": ReferenceRecord, "base": BaseRecord, "task_version": TaskVersion}


def gc(registry: "Registry", *, grace: float | None = None) -> dict[str, int]:
    """Delete what no root reaches, last written more than ``grace`` seconds ago (specs/format.md
    §9.1, §9.2). Returns counts by kind, the bytes freed, and ``deferred``: what was left for a
    next run because this one's lease on an object store ran out."""
    removed = {"arrays": 0, "blobs": 0, "records": 0, "staging": 0, "bytes": 0, "deferred": 0}
    backend = registry.backend
    grace = registry.writes.default_grace if grace is None else float(grace)
    if not grace >= 0 or grace == float("inf"):
        raise InvalidInputError(f"{registry.path}: gc grace period {grace} s: expected a number of seconds, at least 0")
    # A folder: the exclusive registry lock, so no write is in flight. An object store: a
    # lease, and only what is older than the grace period may go (storage/writes.py).
    with registry.writes.collecting(grace) as run:
        # Everything is decided before anything is deleted: a damaged folder (a ref folder
        # replaced by a file, a symlink out of the registry) raises here, with nothing removed.
        stored = {(kind, d) for kind, names in registry.objects.all_objects().items() for d in names}
        modified: dict[tuple[str, str], float] = {}
        object_keys = backend.list_modified("objects")
        for key, when in object_keys:
            parts = key.split("/")
            if len(parts) >= 4:
                obj = (parts[1], parts[2] + parts[3])
                modified[obj] = max(when, modified.get(obj, when))
        # Roots besides the refs: records written within the grace period, by writes that may
        # be in flight (a commit's refreshed base record keeps the base's arrays alive).
        recent = [_recent_root(registry, digest) for kind, digest in sorted(stored)
                  if kind == "records" and not run.old(modified.get((kind, digest), float("inf")))]
        used = set(_reachable(registry, records=[root for root in recent if root is not None]))
        damaged = _orphaned_ref_folders(registry, stored - used)
        if damaged:
            raise CorruptObjectError(f"{registry.path}: {damaged[0]['object']}: {damaged[0]['problem']}; gc "
                                     "refuses to run, it would delete what that folder named")
        doomed = [object_key(kind, digest) for kind, digest in sorted(stored - used)
                  if run.old(modified.get((kind, digest), float("inf")))]
        # Only what gc can prove a killed operation left: old staging entries, temp files,
        # leases of killed gc runs.
        staged_at: dict[str, float] = {f"staging/{txn}": float("-inf") for txn in backend.children("staging")}
        for key, when in backend.list_modified("staging"):
            txn = "/".join(key.split("/")[:2])
            staged_at[txn] = max(when, staged_at.get(txn, when))
        staged = [txn for txn, when in sorted(staged_at.items()) if run.old(when)]
        temps = [key for key in backend.list("refs") + [k for k, _ in object_keys] + backend.children("")
                 if key.rsplit("/", 1)[-1].startswith(".") and key.endswith(".tmp")]  # a killed atomic put
        leases = [key for key, when in backend.list_modified("locks")
                  if key.startswith(GC_LEASE_PREFIX) and when < run.started - 2 * grace]
        todo = doomed + staged + temps + leases
        for done, key in enumerate(todo):
            if not run.may_delete():
                removed["deferred"] = len(todo) - done
                break
            removed["bytes"] += backend.size(key)
            backend.delete(key)
            if key not in leases:
                removed[key.split("/")[1] if key.startswith("objects/") else "staging"] += 1
    return removed


def _recent_root(registry: "Registry", digest: str) -> tuple[str, str, type] | None:
    """``(hash, who, class)`` of a stored record, as a root of gc; None for one that cannot be
    read (it protects nothing: verify reports it)."""
    try:
        data = unpack(registry.objects.record_bytes(digest, verify=False), digest)
        cls = RECORD_CLASSES[data["kind"]]
        who = f"{data['task']}@{data['version']}" if cls is TaskVersion else f"recent {data['kind']} record"
        return digest, who, cls
    except (DeltastoreError, OSError, KeyError, TypeError):
        return None
