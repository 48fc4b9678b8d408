"""The metadata records of format 1, as frozen dataclasses with strict msgpack round trips.

specs/format.md, "Records", is the normative description; this module is held to it by
tests/test_format.py. Reading is strict: a missing required field, a field of the wrong
type, an unknown kind or a newer major format version is an error, never a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack
import numpy as np

from ..dtypes import ARRAY_DTYPES
from ..errors import CorruptObjectError, DeltastoreError, FormatVersionError

_HASH = re.compile(r"[0-9a-f]{64}")
FORMAT_NAME = "deltastore"
FORMAT_MAJOR = 1
FORMAT_MINOR = 4
# The codecs of a task version's small whole tensors stored in its pack (specs/format.md §5.8):
# the tensor's bits as they are, or XORed with those of the reference tensor ``ref``.
PACKED = "packed"
XOR = "xor"
PACKED_CODECS = (PACKED, XOR)

# Records are small; anything bigger is a damaged or hostile file, refused before allocation.
MAX_RECORD_BYTES = 64 << 20
_UNPACK_LIMITS = dict(max_str_len=1 << 20, max_bin_len=1 << 20, max_array_len=1 << 22, max_map_len=1 << 22,
                      max_ext_len=0)


def content_hash(data: bytes) -> str:
    """The name of a stored object: lowercase hex SHA-256 of its bytes."""
    return hashlib.sha256(data).hexdigest()


def pack(obj: dict[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes, what: str) -> dict[str, Any]:
    """Decode one msgpack map; ``what`` names the object in error messages."""
    if len(data) > MAX_RECORD_BYTES:
        raise CorruptObjectError(f"{what}: {len(data)} bytes, more than the {MAX_RECORD_BYTES} a record may have")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True, **_UNPACK_LIMITS)
    except Exception as exc:  # msgpack raises several unrelated types for garbage input
        raise CorruptObjectError(f"{what}: not a valid msgpack record ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise CorruptObjectError(f"{what}: expected a msgpack map, found {type(obj).__name__}")
    return obj


def check_format(obj: dict[str, Any], what: str) -> None:
    """Refuse records of a newer major version (the only version number written to disk)."""
    major = obj.get("format")
    if not isinstance(major, int) or isinstance(major, bool):
        raise CorruptObjectError(f"{what}: field 'format' must be an integer, found {major!r}")
    if major > FORMAT_MAJOR:
        raise FormatVersionError(
            f"{what} was written by format version {major}, this deltastore reads version {FORMAT_MAJOR}; "
            "upgrade deltastore to read it"
        )
    if major < 1:
        raise CorruptObjectError(f"{what}: format version {major} does not exist")


_JSON_TYPES = (type(None), bool, int, float, str, list, dict)
# A tensor no model has: more dimensions or elements than this is a damaged or crafted record,
# refused before anything is allocated for it.
MAX_TENSOR_DIMS = 16
MAX_TENSOR_NUMEL = 1 << 36


# specs/format.md §2.1: a key of a record's ``files`` map becomes a path under the folder a
# task is materialized into, on any OS; the rule keeps it inside that folder everywhere.
MAX_FILE_NAME_BYTES = 4096
MAX_FILE_NAME_PART_BYTES = 255  # NAME_MAX of common filesystems
_FORBIDDEN_IN_FILE_NAMES = re.compile(r'[\x00-\x1f\x7f\\:]')


def file_name_problem(rel: Any) -> str | None:
    """Why ``rel`` cannot be a key of a ``files`` map (specs/format.md §2.1), or None when it can.

    Valid: ``/``-separated parts, none empty, ``.`` or ``..`` (so no absolute path and no way out
    of the folder), no backslash, colon or control character (Windows separators and drive
    letters, terminal escapes), valid UTF-8 (msgpack strings are; a name read from a disk that
    is not decodes to surrogates), at most 255 bytes per part and 4096 in all.
    """
    if not isinstance(rel, str):
        return "is not a string"
    try:
        encoded = rel.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "is not a plain relative path: it has an empty, '.' or '..' part (an absolute path, '//', or a way out of its folder)"
    if _FORBIDDEN_IN_FILE_NAMES.search(rel):
        return "is not a plain relative path: it holds a backslash, colon or control character"
    if len(encoded) > MAX_FILE_NAME_BYTES or any(len(p.encode("utf-8")) > MAX_FILE_NAME_PART_BYTES for p in parts):
        return (f"is not a plain relative path: it is longer than {MAX_FILE_NAME_BYTES} bytes or has a part over "
                f"{MAX_FILE_NAME_PART_BYTES} bytes")
    return None


def check_file_name(rel: Any, what: str, error: type[DeltastoreError] = CorruptObjectError,
                    advice: str = "the record is damaged or crafted: run `deltastore verify`") -> str:
    """Return ``rel`` if :func:`file_name_problem` finds none, else raise ``error``: the one rule
    for writers (``error=InvalidInputError``: a finetune's file is refused before anything is
    written) and readers (a corrupt record); ``advice`` says what to do."""
    problem = file_name_problem(rel)
    if problem:
        raise error(f"{what}: file name {rel!r:.80} {problem}; expected folder names joined by '/' "
                    f"(specs/format.md §2.1); {advice}")
    return rel


def _check_files(value: Any, what: str) -> dict[str, str]:
    files = _check(value, ("map", str), what)
    for rel in files:
        check_file_name(rel, what)
    return files


def _check(value: Any, expected: Any, what: str) -> Any:
    """Check ``value`` against a small type language: a type, a tuple of types, ``[T]``
    (list of T) or ``{T}`` written as ``("map", T)`` (str -> T)."""
    if isinstance(expected, list):
        if not isinstance(value, list):
            raise CorruptObjectError(f"{what}: expected a list, found {type(value).__name__}")
        return [_check(v, expected[0], f"{what}[{i}]") for i, v in enumerate(value)]
    if isinstance(expected, tuple) and expected and expected[0] == "map":
        if not isinstance(value, dict):
            raise CorruptObjectError(f"{what}: expected a map, found {type(value).__name__}")
        for k in value:
            if not isinstance(k, str):  # msgpack also allows bytes keys; the format does not
                raise CorruptObjectError(f"{what}: map key {k!r:.60} is not a string")
        return {k: _check(v, expected[1], f"{what}[{k!r}]") for k, v in value.items()}
    types = expected if isinstance(expected, tuple) else (expected,)
    if float in types and int not in types and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = "/".join(t.__name__ for t in types)
        raise CorruptObjectError(f"{what}: expected {names}, found {type(value).__name__} {value!r:.60}")
    return value


class Record:
    """Mixin: strict ``from_dict`` driven by the ``SCHEMA`` class variable."""

    SCHEMA: ClassVar[dict[str, Any]]
    OPTIONAL: ClassVar[frozenset[str]] = frozenset()
    KIND: ClassVar[str | None] = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.KIND is not None:
            out["format"] = FORMAT_MAJOR
            out["kind"] = self.KIND
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, Record) else _plain(value)
        return out

    @classmethod
    def from_dict(cls, obj: dict[str, Any], what: str):
        if cls.KIND is not None:
            check_format(obj, what)
            if obj.get("kind") != cls.KIND:
                raise CorruptObjectError(f"{what}: expected a {cls.KIND!r} record, found kind {obj.get('kind')!r}")
        values = {}
        for name, expected in cls.SCHEMA.items():
            if name not in obj:
                if name in cls.OPTIONAL:
                    continue
                raise CorruptObjectError(f"{what}: required field {name!r} is missing")
            values[name] = cls._convert(name, obj[name], expected, f"{what}.{name}")
        return cls(**values)

    @classmethod
    def _convert(cls, name: str, value: Any, expected: Any, what: str) -> Any:
        return _check(value, expected, what)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: (v.to_dict() if isinstance(v, Record) else _plain(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


SCALAR = (type(None), bool, int, float, str, list)  # attrs and configs: msgpack scalars and lists


@dataclass(frozen=True)
class TensorEntry(Record):
    """How one tensor is stored. ``codec`` names a compressor (specs/compressors/)."""

    shape: tuple[int, ...]
    dtype: str
    codec: str
    config: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, str] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    ref: str | None = None          # reference tensor this delta is added to (packed: XORed with); None: whole
    rows: str | None = None         # array of packed changed-row bits; None: every row changed
    changed_rows: int | None = None
    lam1: float | None = None       # per-tensor lambdas; None: the record's global ones
    lam2: float | None = None

    SCHEMA: ClassVar[dict[str, Any]] = {
        "shape": [int], "dtype": str, "codec": str, "config": ("map", SCALAR), "arrays": ("map", str),
        "attrs": ("map", SCALAR), "ref": (type(None), str), "rows": (type(None), str),
        "changed_rows": (type(None), int), "lam1": (type(None), float), "lam2": (type(None), float),
    }
    # Since format 1.2 config, arrays and attrs may be absent too (specs/format.md §5.2): they
    # then are empty maps (a task version fills an absent config in first: TaskVersion.from_dict).
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"config", "arrays", "attrs", "ref", "rows", "changed_rows",
                                                    "lam1", "lam2"})

    def to_dict(self, absent_config: dict[str, Any] | None = None, absent_ref: str | None = None) -> dict[str, Any]:
        """The entry as written since format 1.2: optional fields that equal what their absence
        means are left out (specs/format.md §1); ``absent_config`` and ``absent_ref`` are what an
        absent ``config`` and ``ref`` mean for this entry in its record (a task version's own
        config for entries of its method, the reference name derived from the tensor's)."""
        absent = {"config": absent_config or {}, "arrays": {}, "attrs": {}, "ref": absent_ref}
        return {key: value for key, value in super().to_dict().items()
                if key not in self.OPTIONAL or value != absent.get(key)}

    @classmethod
    def _convert(cls, name, value, expected, what):
        value = _check(value, expected, what)
        if name == "shape":
            if any(d < 0 for d in value):
                raise CorruptObjectError(f"{what}: negative dimension in {value}")
            numel = 1
            for d in value:
                numel *= d
            if len(value) > MAX_TENSOR_DIMS or numel > MAX_TENSOR_NUMEL:
                raise CorruptObjectError(f"{what}: shape {value!r:.80} is beyond any model's tensor "
                                         f"(at most {MAX_TENSOR_DIMS} dims, {MAX_TENSOR_NUMEL} elements)")
            return tuple(value)
        return value

    @property
    def is_delta(self) -> bool:
        return self.ref is not None and self.codec not in PACKED_CODECS

    def array_hashes(self) -> list[str]:
        return list(self.arrays.values()) + ([self.rows] if self.rows else [])


def _tensor_table(value: Any, what: str) -> dict[str, TensorEntry]:
    table = _check(value, ("map", dict), what)
    return {name: TensorEntry.from_dict(entry, f"{what}[{name!r}]") for name, entry in table.items()}


class _WithTensors(Record):
    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        # specs/format.md §5.0: maps keyed by names are written in code point order, so two
        # writers storing the same content give the same bytes, hence the same record name.
        out["tensors"] = {name: entry.to_dict(self._absent_config(entry), self._absent_ref(name, entry))
                          for name, entry in sorted(self.tensors.items())}  # type: ignore[attr-defined]
        if "files" in out:
            out["files"] = dict(sorted(out["files"].items()))
        return out

    def _absent_config(self, entry: TensorEntry) -> dict[str, Any]:
        """What an absent ``config`` means for ``entry`` in this record (specs/format.md §5.2)."""
        return {}

    def _absent_ref(self, name: str, entry: TensorEntry) -> str | None:
        """What an absent ``ref`` means for entry ``name`` in this record (specs/format.md §5.2)."""
        return None

    @classmethod
    def _convert(cls, name, value, expected, what):
        if name == "tensors":
            return _tensor_table(value, what)
        if name == "files":
            return _check_files(value, what)
        return _check(value, expected, what)

    def array_hashes(self) -> set[str]:
        return {h for entry in self.tensors.values() for h in entry.array_hashes()}  # type: ignore[attr-defined]

    def packed(self) -> list[str]:
        """Names of the packed entries in the order of the pack (specs/format.md §5.8)."""
        return sorted(n for n, e in self.tensors.items() if e.codec in PACKED_CODECS)  # type: ignore[attr-defined]

    # The generated repr prints every tensor entry (49 KB for MiniLM); one line names the record
    # and counts its tensors. Subclasses are declared with repr=False so this one is used.
    REPR_FIELDS: ClassVar[tuple[str, ...]] = ()

    def __repr__(self) -> str:
        shown = [f"{name}={getattr(self, name)!r}" for name in self.REPR_FIELDS]
        shown.append(f"tensors={len(self.tensors)}")  # type: ignore[attr-defined]
        if hasattr(self, "files"):
            shown.append(f"files={len(self.files)}")
        return f"{type(self).__name__}({', '.join(shown)})"


@dataclass(frozen=True)
class RegistryInfo(Record):
    """``registry.msgpack``: marks a directory as a registry and names its format."""

    name: str
    version: tuple[int, int]
    created: str

    SCHEMA: ClassVar[dict[str, Any]] = {"name": str, "version": [int], "created": str}

    @classmethod
    def from_dict(cls, obj, what):
        info = super().from_dict(obj, what)
        if info.name != FORMAT_NAME:
            raise CorruptObjectError(f"{what}: not a deltastore registry (format name {info.name!r})")
        if len(info.version) != 2:
            raise CorruptObjectError(f"{what}: version must be [major, minor], found {info.version}")
        if info.version[0] > FORMAT_MAJOR:
            raise FormatVersionError(
                f"{what} is format version {info.version[0]}.{info.version[1]}, this deltastore reads "
                f"{FORMAT_MAJOR}.x; upgrade deltastore to open it"
            )
        return dataclasses.replace(info, version=tuple(info.version))


@dataclass(frozen=True, repr=False)
class ReferenceRecord(_WithTensors):
    """The pretrained reference: every tensor stored losslessly, plus its non-weight files."""

    created: str
    tensors: dict[str, TensorEntry]
    files: dict[str, str]

    KIND: ClassVar[str] = "reference"
    REPR_FIELDS: ClassVar[tuple[str, ...]] = ("created",)
    SCHEMA: ClassVar[dict[str, Any]] = {"created": str, "tensors": dict, "files": ("map", str)}


@dataclass(frozen=True, repr=False)
class BaseRecord(_WithTensors):
    """A DBMS base vector ``tau_base = BitDelta(mean_t(W_t) - W_pre)``, keyed by reference tensor name."""

    name: str
    created: str
    reference: str
    sources: list[str]
    tensors: dict[str, TensorEntry]

    KIND: ClassVar[str] = "base"
    REPR_FIELDS: ClassVar[tuple[str, ...]] = ("name", "created")
    SCHEMA: ClassVar[dict[str, Any]] = {"name": str, "created": str, "reference": str, "sources": [str],
                                        "tensors": dict}


@dataclass(frozen=True, repr=False)
class TaskVersion(_WithTensors):
    """One immutable version of a task: ``W' = W_pre + lam1*tau_base + lam2*C(residual)``."""

    task: str
    version: int
    parent: str | None
    created: str
    message: str
    reference: str
    base: str | None
    method: str
    config: dict[str, Any]
    lam1: float
    lam2: float
    tuning: dict[str, Any] | None
    tensors: dict[str, TensorEntry]
    files: dict[str, str]
    source: dict[str, Any]
    pack: str | None = None  # format 1.2: the uint8 array holding the packed entries' bytes
    ref_prefix: str = ""     # format 1.2: an entry's name minus this prefix is its default ref
    bundle: str | None = None  # format 1.3: the uint8 array holding the bundled arrays' bytes
    bundled: tuple[BundledArray, ...] = ()  # format 1.3: those arrays, in the order of their bytes

    KIND: ClassVar[str] = "task_version"
    REPR_FIELDS: ClassVar[tuple[str, ...]] = ("task", "version", "method", "lam1", "lam2", "created")
    SCHEMA: ClassVar[dict[str, Any]] = {
        "task": str, "version": int, "parent": (type(None), str), "created": str, "message": str,
        "reference": str, "base": (type(None), str), "method": str, "config": ("map", SCALAR),
        "lam1": float, "lam2": float, "tuning": (type(None), dict), "tensors": dict, "files": ("map", str),
        "source": dict, "pack": (type(None), str), "ref_prefix": str, "bundle": (type(None), str),
        "bundled": [list],
    }
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"pack", "ref_prefix", "bundle", "bundled"})

    def _absent_config(self, entry: TensorEntry) -> dict[str, Any]:
        return self.config if entry.codec == self.method else {}

    def _absent_ref(self, name: str, entry: TensorEntry) -> str | None:
        return derived_ref(name, self.ref_prefix) if entry.codec in (self.method, XOR) else None

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        # Optional, written only when they say something (specs/format.md §1).
        if self.pack is None:
            del out["pack"]
        if not self.ref_prefix:
            del out["ref_prefix"]
        if self.bundle is None:
            del out["bundle"]
        if self.bundled:
            out["bundled"] = [b.to_list() for b in self.bundled]
        else:
            del out["bundled"]
        return out

    @classmethod
    def from_dict(cls, obj, what):
        # specs/format.md §5.2: an entry of the version's method (a delta) without config has the
        # version's config; one of the method or xor without ref has the ref its name gives.
        tensors, method, config, prefix = obj.get("tensors"), obj.get("method"), obj.get("config"), \
            obj.get("ref_prefix", "")
        if isinstance(tensors, dict) and isinstance(config, dict) and isinstance(prefix, str):
            filled = {}
            for name, entry in tensors.items():
                if isinstance(entry, dict):
                    if "config" not in entry and entry.get("codec") == method:
                        entry = {**entry, "config": config}
                    if "ref" not in entry and entry.get("codec") in (method, XOR):
                        entry = {**entry, "ref": derived_ref(name, prefix)}
                filled[name] = entry
            obj = {**obj, "tensors": filled}
        version = super().from_dict(obj, what)
        if (version.bundle is None) != (not version.bundled):
            raise CorruptObjectError(f"{what}: bundle {version.bundle!r:.20} with {len(version.bundled)} bundled "
                                     "array(s); expected a bundle exactly when some array is bundled "
                                     "(specs/format.md §5.9)")
        return version

    @classmethod
    def _convert(cls, name, value, expected, what):
        if name == "bundled":
            return _bundled(value, what)
        return super()._convert(name, value, expected, what)

    def array_hashes(self) -> set[str]:
        """The arrays this version needs stored: its entries', less those in its bundle, plus its
        pack and bundle."""
        inside = {b.name for b in self.bundled}
        return (super().array_hashes() - inside) | {h for h in (self.pack, self.bundle) if h}


@dataclass(frozen=True)
class BundledArray:
    """One array of a task version's bundle (specs/format.md §5.9): its name, data type, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = np.dtype(self.dtype).itemsize
        for d in self.shape:
            n *= d
        return n

    def to_list(self) -> list:
        return [self.name, self.dtype, list(self.shape)]


def _bundled(value: Any, what: str) -> tuple[BundledArray, ...]:
    out, seen = [], set()
    for i, item in enumerate(_check(value, [list], what)):
        if (len(item) != 3 or not isinstance(item[0], str) or not _HASH.fullmatch(item[0])
                or item[1] not in ARRAY_DTYPES or not isinstance(item[2], list)
                or len(item[2]) > MAX_TENSOR_DIMS
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_TENSOR_NUMEL
                           for d in item[2])):
            raise CorruptObjectError(f"{what}[{i}]: expected [array name, one of {', '.join(ARRAY_DTYPES)}, "
                                     f"shape], found {item!r:.120}")
        if item[0] in seen:
            raise CorruptObjectError(f"{what}[{i}]: array {item[0][:12]} is bundled twice")
        seen.add(item[0])
        out.append(BundledArray(item[0], item[1], tuple(item[2])))
    return tuple(out)


def derived_ref(name: str, prefix: str) -> str:
    """The reference tensor an entry of a task version names by leaving ``ref`` out: its own
    name without the version's ``ref_prefix`` (a classifier's ``bert.`` before the encoder's
    names), or the name itself when it does not start with it (specs/format.md §5.2)."""
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


@dataclass(frozen=True)
class TaskRef(Record):
    """``refs/tasks/<name>``: the versions of a task, oldest first, as (number, record hash),
    and ``issued``, the highest version number ever given out (format 1.1): numbers of removed
    versions are never given out again, so ``task@N`` always means one set of weights.

    ``issued`` is written only when it says more than the last listed version (after ``rm``
    of the latest versions or of the whole task); a 1.0 ref, without it, reads as issued up
    to its last version."""

    versions: list[tuple[int, str]] = field(default_factory=list)
    issued: int = 0

    KIND: ClassVar[str] = "task_ref"
    SCHEMA: ClassVar[dict[str, Any]] = {"versions": [[(int, str)]], "issued": int}
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"issued"})

    @property
    def last_issued(self) -> int:
        return max(self.issued, self.versions[-1][0] if self.versions else 0)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.issued <= (self.versions[-1][0] if self.versions else 0):
            del out["issued"]  # says nothing the list does not: keep the 1.0 bytes
        return out

    @classmethod
    def from_dict(cls, obj, what):
        ref = super().from_dict(obj, what)
        pairs = []
        for i, pair in enumerate(ref.versions):
            if (len(pair) != 2 or not isinstance(pair[0], int) or isinstance(pair[0], bool)
                    or not isinstance(pair[1], str)):
                raise CorruptObjectError(f"{what}.versions[{i}]: expected [number, hash], found {pair!r:.80}")
            if pair[0] < 1 or (pairs and pair[0] <= pairs[-1][0]):
                raise CorruptObjectError(f"{what}.versions[{i}]: version {pair[0]} is not a positive number "
                                         "above the one before it")
            pairs.append((pair[0], pair[1]))
        if "issued" in obj and not (pairs[-1][0] if pairs else 0) < ref.issued < 1 << 63:
            raise CorruptObjectError(f"{what}.issued: {ref.issued} is not above the last listed version")
        return cls(pairs, ref.issued)


@dataclass(frozen=True)
class PointerRef(Record):
    """``refs/reference`` and ``refs/bases/<name>``: the hash of one record."""

    record: str

    KIND: ClassVar[str] = "pointer"
    SCHEMA: ClassVar[dict[str, Any]] = {"record": str}
