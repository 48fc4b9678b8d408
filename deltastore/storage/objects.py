"""Content-addressed objects: arrays (zarr v3), blobs (files) and records (msgpack).

An object's name is the SHA-256 of its content (specs/format.md, "Objects"); it is written
to ``staging/<txn>/`` first and published to ``objects/<type>/<h[:2]>/<h[2:]>`` once
complete, so a key under ``objects/`` is always whole. Nothing is ever rewritten in place.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from numcodecs import Zstd

from ..dtypes import array_numpy_dtype, array_torch_dtype
from ..errors import CorruptObjectError, NotFoundError
from .layout import read_chunk, read_layout, stored_size, write_array, zstd_content_size
from .protocol import Backend
from .records import Record, content_hash, pack, unpack

if TYPE_CHECKING:
    import torch


R = TypeVar("R", bound=Record)
_BLOB_CODEC = Zstd(level=9)
# Blobs are side files, which sources.py caps at 64 MiB when committing.
MAX_BLOB_BYTES = 64 << 20


def array_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    return f"deltastore-array\n{dtype.name}\n{','.join(map(str, shape))}\n".encode()


def array_hash(data: np.ndarray) -> str:
    """SHA-256 of ``"deltastore-array\\n<dtype>\\n<d0,d1,...>\\n"`` followed by the
    little-endian, row-major bytes: identical values, dtype and shape give one name."""
    data = np.require(data, requirements="C")
    h = hashlib.sha256(array_header(data.dtype, data.shape))
    h.update(data.astype(data.dtype.newbyteorder("<"), copy=False).reshape(-1).view(np.uint8))
    return h.hexdigest()


_DIGEST = re.compile(r"[0-9a-f]{64}")


def object_key(kind: str, digest: str) -> str:
    """``objects/<kind>/<h[:2]>/<h[2:]>``; anything but 64 lowercase hex digits is refused,
    so a damaged or crafted record cannot name a path outside the object store."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise CorruptObjectError(f"{digest!r:.80} is not an object name (64 lowercase hex digits); the record or "
                                 "ref naming it is damaged or was not written by deltastore")
    return f"objects/{kind}/{digest[:2]}/{digest[2:]}"


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    array_numpy_dtype(tensor.dtype)  # refuses what no array may hold
    return tensor.detach().cpu().contiguous().numpy()


class ArrayReader:
    """Reads one stored array chunk by chunk, in order, into buffers the caller owns (a pinned
    staging buffer, a slice of a numpy array), and checks its content hash once all is read.

    Nothing read may be used before :meth:`finish` returns: it raises CorruptObjectError when
    the bytes do not hash to the array's name.
    """

    def __init__(self, store: "ObjectStore", digest: str, *, verify: bool, what: str):
        self.backend = store.backend
        self.digest = digest
        self.label = f"array {digest[:12]}" + (f" ({what})" if what else "")
        key = object_key("arrays", digest)
        try:
            self.layout = read_layout(self.backend, key)
        except (NotFoundError, CorruptObjectError) as exc:
            raise type(exc)(f"{self.label}: {exc}") from None
        self.dtype = array_torch_dtype(self.layout.dtype)
        self.shape = self.layout.shape
        self.nbytes = self.layout.nbytes
        self.chunks = self.layout.chunks()
        self._hash = hashlib.sha256(array_header(self.layout.dtype, self.shape)) if verify else None
        self._next = 0

    def read_chunk(self, index: int, out: memoryview) -> None:
        """Decode chunk ``index`` (the next one) into ``out``, of ``self.chunks[index][2]`` bytes."""
        if index != self._next:
            raise ValueError(f"{self.label}: chunk {index} read out of order (expected {self._next})")
        try:
            read_chunk(self.backend, self.layout, index, out)
        except CorruptObjectError as exc:
            raise CorruptObjectError(f"{self.label}: {exc}") from None
        if self._hash is not None:
            self._hash.update(out)
        self._next += 1

    def finish(self) -> None:
        """Check that every chunk was read and that the bytes hash to the array's name."""
        if self._next != len(self.chunks):
            raise ValueError(f"{self.label}: {self._next} of {len(self.chunks)} chunks read")
        if self._hash is not None and self._hash.hexdigest() != self.digest:
            raise CorruptObjectError(
                f"{self.backend.root}: {self.label} is corrupt: its content hash is {self._hash.hexdigest()[:12]}...; "
                "run `deltastore verify` to list every damaged object and restore them from a backup")


class ObjectStore:
    """Typed access to the objects of one registry through its backend."""

    def __init__(self, backend: Backend):
        self.backend = backend

    def new_txn(self) -> str:
        """A fresh staging prefix for one operation's in-flight writes."""
        return f"staging/{uuid.uuid4().hex}"

    # -- arrays -----------------------------------------------------------------------------
    def put_array(self, tensor: torch.Tensor, txn: str, *, compress: bool = True) -> str:
        data = to_numpy(tensor)
        digest = array_hash(data)
        final = object_key("arrays", digest)
        if not self._reusable("arrays", digest):
            staged = f"{txn}/{digest}"
            write_array(self.backend, staged, data, compress=compress)
            self.backend.publish(staged, final)
        return digest

    @staticmethod
    def array_size(tensor: torch.Tensor, *, compress: bool = True) -> int:
        """Bytes :meth:`put_array` would store for ``tensor``, without storing it."""
        return stored_size(to_numpy(tensor), compress=compress)

    def open_array(self, digest: str, *, verify: bool = True, what: str = "") -> "ArrayReader":
        """A reader of the array named ``digest``, chunk by chunk (see :class:`ArrayReader`)."""
        return ArrayReader(self, digest, verify=verify, what=what)

    def get_array(self, digest: str, *, verify: bool = True, what: str = "") -> torch.Tensor:
        """The array named ``digest`` as a CPU tensor; ``verify`` rehashes it (default)."""
        data, _ = self._read_array(digest, verify=verify, what=what)
        import torch

        return torch.from_numpy(data.astype(data.dtype.newbyteorder("="), copy=False))

    def _read_array(self, digest: str, *, verify: bool, what: str = "") -> tuple[np.ndarray, bool]:
        """The array named ``digest`` as stored (little-endian numpy), and whether it is zstd-compressed."""
        reader = self.open_array(digest, verify=verify, what=what)
        data = np.empty(reader.shape, dtype=reader.layout.dtype)
        flat = memoryview(data.reshape(-1).view(np.uint8)) if data.size else None
        for index, (_, offset, nbytes) in enumerate(reader.chunks):
            reader.read_chunk(index, flat[offset:offset + nbytes])
        reader.finish()
        return data, reader.layout.zstd

    # -- blobs ------------------------------------------------------------------------------
    # A blob is stored as one zstd frame of the file's bytes (tokenizer.json shrinks ~3x) and
    # named by the hash of the uncompressed bytes, so the name does not depend on the codec.
    def put_blob(self, data: bytes, txn: str) -> str:
        digest = content_hash(data)
        final = object_key("blobs", digest)
        if not self._reusable("blobs", digest):
            staged = f"{txn}/{digest}"
            self.backend.put(staged, bytes(_BLOB_CODEC.encode(data)))
            self.backend.publish(staged, final)
        return digest

    @staticmethod
    def blob_size(data: bytes) -> int:
        """Bytes :meth:`put_blob` would store for ``data``, without storing it."""
        return len(_BLOB_CODEC.encode(data))

    def get_blob(self, digest: str, *, verify: bool = True) -> bytes:
        stored = self.backend.get(object_key("blobs", digest))
        declared = zstd_content_size(stored)
        if declared is None or declared > MAX_BLOB_BYTES:
            raise CorruptObjectError(
                f"{self.backend.root}: blob {digest[:12]}: its zstd frame declares "
                f"{declared if declared is not None else 'no'} decompressed size, at most {MAX_BLOB_BYTES} bytes "
                "allowed; restore it from a backup")
        try:
            data = bytes(_BLOB_CODEC.decode(stored))
        except Exception as exc:  # numcodecs raises RuntimeError/ValueError on damaged frames
            raise CorruptObjectError(
                f"{self.backend.root}: blob {digest[:12]} is not a valid zstd frame ({exc}); restore it from a backup"
            ) from None
        if verify and content_hash(data) != digest:
            raise CorruptObjectError(f"{self.backend.root}: blob {digest[:12]} is corrupt (content hash mismatch)")
        return data

    # -- records ----------------------------------------------------------------------------
    def put_record(self, record: Record, txn: str) -> str:
        return self._put_bytes("records", pack(record.to_dict()), txn)

    def _put_bytes(self, kind: str, data: bytes, txn: str) -> str:
        digest = content_hash(data)
        final = object_key(kind, digest)
        if not self._reusable(kind, digest):
            staged = f"{txn}/{digest}"
            self.backend.put(staged, data)
            self.backend.publish(staged, final)
        return digest

    def get_record(self, digest: str, cls: type[R]) -> R:
        what = f"{cls.__name__} record {digest[:12]}"
        data = self.backend.get(object_key("records", digest))
        if content_hash(data) != digest:
            raise CorruptObjectError(f"{self.backend.root}: {what} is corrupt (content hash mismatch)")
        return cls.from_dict(unpack(data, what), what)

    def _reusable(self, kind: str, digest: str) -> bool:
        """Is object ``digest`` stored and intact, so a writer may use it instead of writing it?

        Dedup must not trust bytes it has not checked: a damaged object reused by a commit
        that reports success makes the new version unreadable too. So an existing object is
        rehashed (a cost paid only when dedup saves the write); a damaged one is removed, to
        be written again whole by the caller (same name, same content)."""
        key = object_key(kind, digest)
        if not self.backend.exists(key):
            return False
        try:
            if kind == "arrays":
                self.get_array(digest, verify=True)
            elif kind == "blobs":
                self.get_blob(digest, verify=True)
            elif content_hash(self.backend.get(key)) != digest:
                raise CorruptObjectError(f"{key}: content hash mismatch")
            return True
        except OSError:  # CorruptObjectError and NotFoundError included
            self.backend.delete(key)
            return False

    # -- copying ----------------------------------------------------------------------------
    def copy_from(self, source: "ObjectStore", kind: str, digest: str, txn: str) -> bool:
        """Copy object ``digest`` of ``kind`` from ``source`` unless it is already here; True when copied.

        The object is read from ``source`` with its hash checked, and written here through the
        same staged writes as a commit's, whose name (the hash of what was written) must be
        ``digest``: a copy never publishes bytes that do not match their name. An array keeps
        its compression (the reference's arrays may be stored without zstd)."""
        key = object_key(kind, digest)
        if self.backend.exists(key):
            return False
        if kind == "arrays":
            data, compress = source._read_array(digest, verify=True)
            written = array_hash(data)
            if written == digest:
                staged = f"{txn}/{digest}"
                write_array(self.backend, staged, data, compress=compress)
                self.backend.publish(staged, key)
        elif kind == "blobs":
            written = self.put_blob(source.get_blob(digest, verify=True), txn)
        else:
            data = source.backend.get(key)
            written = content_hash(data)
            if written == digest:
                self._put_bytes(kind, data, txn)
        if written != digest:
            raise CorruptObjectError(f"{source.backend.root}: {kind[:-1]} {digest[:12]} is corrupt: its content hashes "
                                     f"to {written[:12]}...; run `deltastore verify` there and restore it from a backup")
        return True

    # -- bookkeeping ------------------------------------------------------------------------
    def size(self, kind: str, digest: str) -> int:
        return self.backend.size(object_key(kind, digest))

    def all_objects(self) -> dict[str, list[str]]:
        """Every stored object name, by kind (arrays, blobs, records)."""
        out: dict[str, list[str]] = {}
        for kind in ("arrays", "blobs", "records"):
            names = []
            for prefix in self.backend.children(f"objects/{kind}"):
                names += [prefix + rest for rest in self.backend.children(f"objects/{kind}/{prefix}")]
            # Anything else under objects/ (a killed put's temp file) is not an object: gc's job.
            out[kind] = [n for n in names if _DIGEST.fullmatch(n)]
        return out
