"""Content-addressed objects: arrays (zarr v3), blobs (files) and records (msgpack).

An object's name is the SHA-256 of its content (specs/format.md, "Objects"); it is written
to ``staging/<txn>/`` first and published to ``objects/<type>/<h[:2]>/<h[2:]>`` once
complete, so a key under ``objects/`` is always whole. Nothing is ever rewritten in place.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import zstandard
from numcodecs import Zstd

from ..dtypes import array_numpy_dtype, array_torch_dtype
from ..errors import CorruptObjectError, NotFoundError
from .layout import read_chunk, read_layout, write_array, zstd_content_size
from .protocol import Backend
from .records import Record, content_hash, pack, unpack

if TYPE_CHECKING:
    import torch


R = TypeVar("R", bound=Record)
_BLOB_CODEC = Zstd(level=9)
# Blobs are side files, which sources.py caps at 64 MiB when committing.
MAX_BLOB_BYTES = 64 << 20
# A blob stored as a patch against another blob (specs/format.md §3.3): a zstd skippable frame
# naming the dictionary blob and its transform, then a zstd frame that needs that dictionary.
PATCH_MAGIC = (0x184D2A50).to_bytes(4, "little")
PATCH_HEADER = b"deltastore-patch\n"
PATCH_LEVEL = 19  # patches are small and written once: the best ratio is worth its time
_PATCH_FRAME_PREFIX = 8  # magic + Frame_Size


def _json_indented(data: bytes) -> bytes:
    """A JSON file written again with two-space indentation, as Hugging Face libraries save
    tokenizer files: the reference's compact file becomes a dictionary for a finetune's re-saved
    one (specs/format.md §3.3, transform ``json``). ValueError if ``data`` is not JSON."""
    return json.dumps(json.loads(data.decode("utf-8")), indent=2, ensure_ascii=False).encode("utf-8")


PATCH_TRANSFORMS = {"raw": lambda data: data, "json": _json_indented}


def patch_frame(dictionary: str, transform: str, frame: bytes) -> bytes:
    """A patched blob's stored bytes: the skippable frame naming ``dictionary`` and ``transform``,
    then ``frame`` (zstd, compressed with that dictionary)."""
    user = PATCH_HEADER + f"{transform}\n{dictionary}".encode("ascii")
    return PATCH_MAGIC + len(user).to_bytes(4, "little") + user + frame


def parse_patch(stored: bytes, what: str) -> tuple[str, str, bytes] | None:
    """(dictionary blob, transform, zstd frame) of a patched blob, None for a plain one."""
    if stored[:4] != PATCH_MAGIC:
        return None
    size = int.from_bytes(stored[4:8], "little")
    user = stored[_PATCH_FRAME_PREFIX:_PATCH_FRAME_PREFIX + size]
    parts = user[len(PATCH_HEADER):].split(b"\n")
    if (len(stored) < _PATCH_FRAME_PREFIX + size or not user.startswith(PATCH_HEADER) or len(parts) != 2
            or parts[0].decode("ascii", "replace") not in PATCH_TRANSFORMS
            or not _DIGEST.fullmatch(parts[1].decode("ascii", "replace"))):
        raise CorruptObjectError(f"{what}: a skippable zstd frame that is not a deltastore patch header (expected "
                                 f"'deltastore-patch', a transform of {sorted(PATCH_TRANSFORMS)} and a blob name); "
                                 "restore it from a backup")
    return parts[1].decode("ascii"), parts[0].decode("ascii"), stored[_PATCH_FRAME_PREFIX + size:]


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
    def put_blob(self, data: bytes, txn: str, *, dictionary: str | None = None) -> str:
        """Store a file; with ``dictionary`` (a plain blob: the reference's file of the same
        path) as a patch against it where that is smaller than the file on its own."""
        digest = content_hash(data)
        final = object_key("blobs", digest)
        if not self._reusable("blobs", digest):
            staged = f"{txn}/{digest}"
            self.backend.put(staged, self._smallest_encoding(data, dictionary))
            self.backend.publish(staged, final)
        return digest

    def _smallest_encoding(self, data: bytes, dictionary: str | None) -> bytes:
        best = bytes(_BLOB_CODEC.encode(data))
        if dictionary is None or parse_patch(self.backend.get(object_key("blobs", dictionary)), dictionary):
            return best  # no dictionary, or one that is itself a patch (not allowed: one level only)
        base = self.get_blob(dictionary)
        for transform, build in PATCH_TRANSFORMS.items():
            try:
                content = build(base)
            except ValueError:  # not JSON (UnicodeDecodeError is a ValueError too)
                continue
            compressor = zstandard.ZstdCompressor(
                level=PATCH_LEVEL, write_content_size=True, write_checksum=False, write_dict_id=False,
                dict_data=zstandard.ZstdCompressionDict(content, dict_type=zstandard.DICT_TYPE_RAWCONTENT))
            patch = patch_frame(dictionary, transform, compressor.compress(data))
            if len(patch) < len(best):
                best = patch
        return best

    def get_blob(self, digest: str, *, verify: bool = True) -> bytes:
        stored = self.backend.get(object_key("blobs", digest))
        what = f"{self.backend.root}: blob {digest[:12]}"
        patch = parse_patch(stored, what)
        frame = stored if patch is None else patch[2]
        declared = zstd_content_size(frame)
        if declared is None or declared > MAX_BLOB_BYTES:
            raise CorruptObjectError(
                f"{what}: its zstd frame declares {declared if declared is not None else 'no'} decompressed size, at "
                f"most {MAX_BLOB_BYTES} bytes allowed; restore it from a backup")
        dictionary = None if patch is None else self._patch_dictionary(patch[0], patch[1], what)
        try:
            if dictionary is None:
                data = bytes(_BLOB_CODEC.decode(frame))
            else:
                data = zstandard.ZstdDecompressor(dict_data=dictionary).decompress(frame, max_output_size=MAX_BLOB_BYTES)
        except Exception as exc:  # numcodecs and zstandard raise several types on damaged frames
            raise CorruptObjectError(f"{what} is not a valid zstd frame ({exc}); restore it from a backup") from None
        if len(data) != declared:
            raise CorruptObjectError(f"{what}: its zstd frame declares {declared} bytes and holds {len(data)}; "
                                     "restore it from a backup")
        if verify and content_hash(data) != digest:
            raise CorruptObjectError(f"{what} is corrupt (content hash mismatch)")
        return data

    def _patch_dictionary(self, dictionary: str, transform: str, what: str) -> zstandard.ZstdCompressionDict:
        """The raw-content dictionary a patch names: its dictionary blob's bytes, transformed."""
        if parse_patch(self.backend.get(object_key("blobs", dictionary)), dictionary) is not None:
            raise CorruptObjectError(f"{what}: is a patch against blob {dictionary[:12]}, itself a patch; a patch "
                                     "needs a plain blob (specs/format.md §3.3); restore it from a backup")
        try:
            content = PATCH_TRANSFORMS[transform](self.get_blob(dictionary))
        except ValueError:
            raise CorruptObjectError(f"{what}: its dictionary, blob {dictionary[:12]}, is not JSON, which its "
                                     f"transform {transform!r} needs; restore it from a backup") from None
        return zstandard.ZstdCompressionDict(content, dict_type=zstandard.DICT_TYPE_RAWCONTENT)

    def blob_dictionary(self, digest: str) -> str | None:
        """The blob a patched blob needs to be read (specs/format.md §9.1), None for a plain blob."""
        patch = parse_patch(self.backend.get(object_key("blobs", digest)), f"blob {digest[:12]}")
        return None if patch is None else patch[0]

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
        elif kind == "blobs":  # checked, then copied as stored (a patch stays a patch)
            written = content_hash(source.get_blob(digest, verify=True))
            if written == digest:
                staged = f"{txn}/{digest}"
                self.backend.put(staged, source.backend.get(key))
                self.backend.publish(staged, key)
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
