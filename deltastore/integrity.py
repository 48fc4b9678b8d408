"""``verify`` (rehash everything, check every ref) and ``gc`` (drop what no ref reaches)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import CorruptObjectError, DeltastoreError
from .storage.objects import object_key
from .storage.records import BaseRecord, ReferenceRecord, TaskVersion, content_hash

if TYPE_CHECKING:
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


def _reachable(registry: "Registry", problems: list[dict[str, str]] | None = None):
    """Objects reachable from the refs, by kind, and for each object who uses it.

    With ``problems`` given, unreadable refs and records are reported there instead of raised.
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
    ref_digest = guard("refs/reference", "registry", lambda: _checked(registry.reference_hash()))
    if ref_digest:
        use("records", ref_digest, "reference")
        reference = guard(object_key("records", ref_digest), "reference",
                          lambda: objects.get_record(ref_digest, ReferenceRecord))
        for h in reference.array_hashes() if reference else ():
            use("arrays", h, "reference")
        for h in reference.files.values() if reference else ():
            use("blobs", h, "reference")
    records: list[tuple[str, str, type]] = []
    for name in registry.bases():
        digest = guard(f"refs/bases/{name}", f"base {name}", lambda: registry._pointer(
            f"refs/bases/{name}", f"refs/bases/{name}"))
        if digest:
            records.append((digest, f"base {name}", BaseRecord))
    for task in registry.tasks():
        versions = guard(f"refs/tasks/{task}", f"task {task}", lambda: registry.version_hashes(task)) or []
        records += [(digest, f"{task}@{n}", TaskVersion) for n, digest in versions]
    for digest, who, cls in records:
        if not use("records", digest, who):
            continue
        record = guard(object_key("records", digest), who, lambda: objects.get_record(digest, cls))
        if record is None:
            continue
        if isinstance(record, TaskVersion) and f"{record.task}@{record.version}" != who:
            # Refs carry no hash of their own: a damaged one may point at another version.
            guard(f"refs/tasks/{who.split('@')[0]}", who, lambda: _raise(
                f"lists {who} as record {digest[:12]}, which holds {record.task}@{record.version}"))
        for h in record.array_hashes():
            use("arrays", h, who)
        if isinstance(record, TaskVersion):
            for h in record.files.values():
                use("blobs", h, who)
            for h in ([record.base] if record.base else []) + [record.reference]:
                use("records", h, who)
    return used_by


def verify(registry: "Registry", *, progress: bool | None = None) -> list[dict[str, str]]:
    from .registry import _progress

    problems: list[dict[str, str]] = []
    used_by = _reachable(registry, problems)
    stored = registry.objects.all_objects()
    present = {(kind, d) for kind, names in stored.items() for d in names}
    for (kind, digest), users in sorted(used_by.items()):
        if (kind, digest) not in present:
            problems.append({"object": object_key(kind, digest), "problem": "missing",
                             "used_by": ", ".join(sorted(users))})
    items = sorted(present)
    for kind, digest in _progress(items, total=len(items), desc="verify", enabled=progress):
        users = ", ".join(sorted(used_by.get((kind, digest), {"nothing (gc removes it)"})))
        try:
            if kind == "arrays":
                registry.objects.get_array(digest, verify=True)
            elif kind == "blobs":
                registry.objects.get_blob(digest, verify=True)
            elif content_hash(registry.backend.get(object_key(kind, digest))) != digest:
                raise DeltastoreError("content hash mismatch")
        except (DeltastoreError, OSError) as exc:
            problems.append({"object": object_key(kind, digest), "problem": str(exc), "used_by": users})
    return problems


def gc(registry: "Registry") -> dict[str, int]:
    removed = {"arrays": 0, "blobs": 0, "records": 0, "staging": 0, "bytes": 0}
    backend = registry.backend
    # Exclusive: every writer holds the shared side for its whole operation, so nothing is in
    # flight while we decide what is unreachable.
    with backend.lock("registry"):
        used = set(_reachable(registry))
        for kind, names in registry.objects.all_objects().items():
            for digest in names:
                if (kind, digest) not in used:
                    key = object_key(kind, digest)
                    removed["bytes"] += backend.size(key)
                    backend.delete(key)
                    removed[kind] += 1
        for txn in backend.children("staging"):
            removed["bytes"] += backend.size(f"staging/{txn}")
            backend.delete(f"staging/{txn}")
            removed["staging"] += 1
        for key in backend.list("refs") + backend.list("objects") + backend.children(""):
            if key.rsplit("/", 1)[-1].startswith(".") and key.endswith(".tmp"):  # a killed atomic put
                removed["bytes"] += backend.size(key)
                backend.delete(key)
                removed["staging"] += 1
    return removed
