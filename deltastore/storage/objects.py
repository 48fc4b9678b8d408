"""Content-addressed objects: arrays (zarr v3), blobs (files) and records (msgpack).

An object's name is the SHA-256 of its content (specs/format.md, "Objects"); it is written
to ``staging/<txn>/`` first and published to ``objects/<type>/<h[:2]>/<h[2:]>`` once
complete, so a key under ``objects/`` is always whole. Nothing is ever rewritten in place.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import threading
import uuid
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, TypeVar

import numpy as np
import zstandard
from numcodecs import Zstd

from ..dtypes import array_numpy_dtype, array_torch_dtype
from ..errors import CorruptObjectError, NotFoundError
from .layout import (ARRAY_METADATA, ArrayLayout, chunk_file_limit, chunk_key, fetch_metadata, metadata_key,
                     read_chunk, read_layout, stored_size, write_array, zstd_content_size)
from .protocol import Backend
from .records import MAX_RECORD_BYTES, BundledArray, Record, TaskVersion, content_hash, pack, unpack

if TYPE_CHECKING:
    from concurrent.futures import Future

    import torch

    from .writes import Attempt


R = TypeVar("R", bound=Record)
_BLOB_CODEC = Zstd(level=9)
# Blobs are side files, which sources.py caps at 64 MiB when committing.
MAX_BLOB_BYTES = 64 << 20
# Chunk files one array reader asks for ahead, in bytes, where the backend reads ahead (an
# object store): four 8 MiB chunks in flight per reader hide the requests' latency (on
# loopback SeaweedFS, 4-8 concurrent GETs reached its throughput). A materialize's reader
# threads (16 at most) open the arrays of one tensor each at once (ObjectStore.arrays_ahead),
# so each holds a window per array of its tensor: the reference's (32 MiB at most) and the
# small code and mask arrays beside it, some 600 MiB of chunk files not yet decoded in all.
READ_AHEAD_CHUNK_BYTES = 32 << 20
# Arrays at least this large are hashed on a thread of their own, behind the read (ArrayReader).
# Only the few largest (a 7B model's embedding and head, 262 MB each) gain: everything else
# waits for them. Below it the hash stays in line: with every core already reading, an extra
# thread per array made reading four 90 MB arrays on two threads 25% slower (2-core machine),
# the hash no longer finding its chunk in cache.
HASH_BEHIND_MIN_BYTES = 128 << 20

# A blob stored as a patch against another blob (specs/format.md §3.3): a zstd skippable frame
# naming the dictionary blob and its transform, then a zstd frame that needs that dictionary.
PATCH_MAGIC = (0x184D2A50).to_bytes(4, "little")
PATCH_HEADER = b"deltastore-patch\n"
PATCH_LEVEL = 19  # patches are small and written once: the best ratio is worth its time
_PATCH_FRAME_PREFIX = 8  # magic + Frame_Size
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# A record file is, since format 1.3, one zstd frame of its msgpack bytes (specs/format.md
# §3.1): a task version's record is mostly tensor names and hex hashes, which level 19 shrinks
# about 5x (14,914 to 3,023 bytes on all-MiniLM-L6-v2) in a few milliseconds.
RECORD_LEVEL = 19
# Bundles (specs/format.md §5.9) an ObjectStore keeps in memory once read: a materialize reads
# one version's at a time, a service switching between tasks a few.
BUNDLES_KEPT = 8


def unframe(frame: bytes, what: str, limit: int, dictionary: zstandard.ZstdCompressionDict | None = None) -> bytes:
    """The content of ``frame``, which must be one whole zstd frame declaring its size, at most
    ``limit`` bytes (specs/format.md §3.3), checked before anything is decompressed;
    ``dictionary``: the one a patch needs. ``what`` names the object in errors."""
    declared = zstd_content_size(frame)
    if declared is None or declared > limit:
        raise CorruptObjectError(
            f"{what}: its zstd frame declares {declared if declared is not None else 'no'} decompressed size, at "
            f"most {limit} bytes allowed; restore it from a backup")
    decoder = (zstandard.ZstdDecompressor(dict_data=dictionary) if dictionary is not None
               else zstandard.ZstdDecompressor()).decompressobj()
    try:
        data = decoder.decompress(frame)
    except zstandard.ZstdError as exc:
        raise CorruptObjectError(f"{what} is not a valid zstd frame ({exc}); restore it from a backup") from None
    if not decoder.eof or decoder.unused_data:  # cut short, or bytes after the one frame
        found = "a cut one" if not decoder.eof else f"{len(decoder.unused_data)} bytes after it"
        raise CorruptObjectError(f"{what}: expected one whole zstd frame, found {found}; restore it from a backup")
    if len(data) != declared:
        raise CorruptObjectError(f"{what}: its zstd frame declares {declared} bytes and holds {len(data)}; "
                                 "restore it from a backup")
    return data


def record_frame(data: bytes) -> bytes:
    """What a record of msgpack bytes ``data`` is stored as: one zstd frame declaring its size."""
    return zstandard.ZstdCompressor(level=RECORD_LEVEL, write_content_size=True, write_checksum=False).compress(data)


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

    Where the backend reads ahead (an object store, :meth:`Backend.fetch`), the next chunk
    files are requested before they are needed, up to READ_AHEAD_CHUNK_BYTES, so an array's
    chunks arrive in parallel, not one round trip after another. With a read-through cache
    (:class:`ObjectStore`), an array the cache holds is read from it, and one it lacks is copied
    into it as it is read, published there only once all of it hashed to its name.

    Nothing read may be used before :meth:`finish` returns: it raises CorruptObjectError when
    the bytes do not hash to the array's name.

    An array of HASH_BEHIND_MIN_BYTES or more is hashed on a thread of its own, one chunk
    behind the read (hashlib releases the GIL), so reading it takes about the longer of the
    file read and the sha256, not their sum: that sum made the largest array (an embedding)
    the critical path of a materialize. A buffer handed to :meth:`read_chunk` may therefore be
    read after the call returns: reuse it only once the future :meth:`read_chunk` returned is
    done.

    ``metadata``: the array's zarr.json read ahead from the registry (:meth:`ObjectStore.arrays_ahead`).
    """

    def __init__(self, store: "ObjectStore", digest: str, *, verify: bool, what: str,
                 metadata: Future | None = None):
        self.digest = digest
        self.label = f"array {digest[:12]}" + (f" ({what})" if what else "")
        key = object_key("arrays", digest)
        self._cached = cached = metadata is None and store.cached(digest)
        self.backend = store.cache if cached else store.backend
        self._fill = None
        try:
            self.layout = read_layout(self.backend, key, metadata)
        except (NotFoundError, CorruptObjectError) as exc:
            if cached:
                raise self._damaged(str(exc)) from None
            raise type(exc)(f"{self.label}: {exc}") from None
        self.dtype = array_torch_dtype(self.layout.dtype)
        self.shape = self.layout.shape
        self.nbytes = self.layout.nbytes
        self.chunks = self.layout.chunks()
        self._next = 0
        self._limit = chunk_file_limit(self.layout)
        self._ahead: deque = deque()  # futures of the chunk files from self._next on, in order
        self._request_ahead()
        # Filled only from files read ahead: the only way an object store is read.
        if store.cache is not None and not cached and self._ahead:
            self._fill = _CacheFill(store.cache, self.layout)
        self._verify = verify
        hashed = verify or self._fill is not None  # a fill is checked even when the read is not
        self._hash = hashlib.sha256(array_header(self.layout.dtype, self.shape)) if hashed else None
        behind = hashed and len(self.chunks) > 1 and self.nbytes >= HASH_BEHIND_MIN_BYTES
        self._hasher = ThreadPoolExecutor(1) if behind else None
        self._hashed: Future | None = None  # the last chunk's hash update, on self._hasher

    def _request_ahead(self) -> None:
        """Ask the backend for chunk files up to READ_AHEAD_CHUNK_BYTES ahead of the next one."""
        window = max(1, READ_AHEAD_CHUNK_BYTES // max(1, self._limit))
        while self._next + len(self._ahead) < len(self.chunks) and len(self._ahead) < window:
            index = self._next + len(self._ahead)
            fetched = self.backend.fetch(chunk_key(self.layout, index), limit=self._limit)
            if fetched is None:  # a backend read in place (a local folder)
                return
            self._ahead.append(fetched)

    def read_chunk(self, index: int, out: memoryview) -> "Future | None":
        """Decode chunk ``index`` (the next one) into ``out``, of ``self.chunks[index][2]`` bytes.

        Returns None, or a future done once ``out`` has been hashed: until then ``out`` must
        not change."""
        if index != self._next:
            raise ValueError(f"{self.label}: chunk {index} read out of order (expected {self._next})")
        fetched = self._ahead.popleft() if self._ahead else None
        self._next += 1
        self._request_ahead()
        try:
            read_chunk(self.backend, self.layout, index, out, fetched)
        except CorruptObjectError as exc:
            raise self._damaged(str(exc)) from None
        if self._fill is not None:
            self._fill.chunk(self.chunks[index][0], fetched.result()[0])
        if self._hasher is not None:
            self._hashed = self._hasher.submit(self._hash.update, out)
            return self._hashed
        if self._hash is not None:
            self._hash.update(out)
        return None

    def _stop_hashing(self) -> None:
        if self._hasher is not None:
            if self._hashed is not None:
                self._hashed.result()
            self._hasher.shutdown()
            self._hasher = None

    def finish(self) -> None:
        """Check that every chunk was read and that the bytes hash to the array's name."""
        if self._next != len(self.chunks):
            raise ValueError(f"{self.label}: {self._next} of {len(self.chunks)} chunks read")
        self._stop_hashing()
        intact = self._hash is None or self._hash.hexdigest() == self.digest
        if self._verify and not intact:
            raise self._damaged(
                f"{self.backend.root}: {self.label} is corrupt: its content hash is {self._hash.hexdigest()[:12]}...; "
                "run `deltastore verify` to list every damaged object and restore them from a backup", named=True)
        if self._fill is not None:
            self._fill.finish(object_key("arrays", self.digest) if intact else None)

    def close(self) -> None:
        """Give up a reader not read to its end: a copy being put in the cache is dropped."""
        self._stop_hashing()
        if self._fill is not None:
            self._fill.finish(None)

    def _damaged(self, problem: str, *, named: bool = False) -> CorruptObjectError:
        """The error for damage found in the array (``named``: ``problem`` names it already).

        A copy being put in the cache is dropped. Damage to the cache's own copy is not the
        registry's: that copy is removed, so the next read fetches the registry's."""
        if self._fill is not None:
            self._fill.finish(None)
        if self._cached:
            cache = self.backend
            cache.delete(object_key("arrays", self.digest))
            return CorruptObjectError(f"{self.label}: its copy in the read cache {cache.root} is damaged ({problem}); "
                                      "it was removed from the cache: read again to use the registry's copy")
        return CorruptObjectError(problem if named else f"{self.label}: {problem}")


class BundledArrayReader:
    """An array read from its task version's bundle (specs/format.md §5.9), with the interface
    of :class:`ArrayReader`: one chunk, the array's range of the bundle (read whole, once, by
    :meth:`ObjectStore.bundle_bytes`), checked against the array's name by :meth:`finish`."""

    def __init__(self, store: "ObjectStore", digest: str, *, verify: bool, what: str):
        bundle, offset, item = store._bundled[digest]
        self.digest = digest
        self.label = f"array {digest[:12]} (in bundle {bundle[:12]}" + (f", {what})" if what else ")")
        dtype = np.dtype(item.dtype).newbyteorder("<")
        self.layout = ArrayLayout(f"bundle {bundle}", dtype, item.shape, max(1, item.shape[0]) if item.shape else 1,
                                  zstd=True)
        self.dtype = array_torch_dtype(dtype)
        self.shape = item.shape
        self.nbytes = item.nbytes
        self.chunks = self.layout.chunks()
        self._data = store.bundle_bytes(bundle, verify=verify)[offset:offset + item.nbytes]
        self._verify = verify

    def read_chunk(self, index: int, out: memoryview) -> None:
        out[:] = self._data[self.chunks[index][1]:][:len(out)]
        return None

    def finish(self) -> None:
        if not self._verify:
            return
        h = hashlib.sha256(array_header(self.layout.dtype, self.shape))
        h.update(self._data)
        if h.hexdigest() != self.digest:
            raise CorruptObjectError(
                f"{self.label} is corrupt: its bytes in the bundle hash to {h.hexdigest()[:12]}...; run "
                "`deltastore verify` to list every damaged object and restore them from a backup")

    def close(self) -> None:
        pass


class _CacheFill:
    """An array being copied into a read-through cache as it is read: its zarr.json and chunk
    files, exactly as stored, go under a staging prefix of the cache, published under the
    array's key once the whole array hashed to its name (so the cache only ever holds intact
    arrays, and a reader killed half-way leaves only ``staging/`` debris, which nothing reads).

    A cache that cannot be written (a full disk, no permission) never fails the read: the
    fill is dropped with a warning and the array is read from the registry as without a cache."""

    def __init__(self, cache: Backend, layout: ArrayLayout):
        self.cache = cache
        self.staged: str | None = f"staging/{uuid.uuid4().hex}"
        self._write("zarr.json", layout.metadata)

    def _write(self, name: str, data) -> None:
        if self.staged is None:
            return
        try:
            self.cache.put(f"{self.staged}/{name}", data)
        except OSError as exc:
            self._drop(exc)

    def chunk(self, name: str, data) -> None:
        self._write(name, data)

    def finish(self, final: str | None) -> None:
        """Publish under ``final``, or drop the copy when None (the array did not hash to its name)."""
        if self.staged is None:
            return
        try:
            if final is None:
                self.cache.delete(self.staged)
            else:
                self.cache.publish(self.staged, final)
        except OSError as exc:
            self._drop(exc)
        self.staged = None

    def _drop(self, exc: OSError) -> None:
        warnings.warn(f"{self.cache.root}: cannot write the read cache ({exc}); reading without it", stacklevel=2)
        staged, self.staged = self.staged, None
        try:
            self.cache.delete(staged)
        except OSError:
            pass  # debris in the cache's staging/, which nothing reads


class ObjectStore:
    """Typed access to the objects of one registry through its backend.

    ``cache``: a read-through cache of arrays (a local folder, as a Backend, laid out like a
    registry's ``objects/``) for a registry whose reads cost requests (an object store). Objects
    are named by their content, so a cached array can never be stale; see :class:`ArrayReader`."""

    def __init__(self, backend: Backend, cache: Backend | None = None):
        self.backend = backend
        self.cache = cache
        # The write operation in progress (storage/writes.py), which every object written or
        # reused joins, so it can re-check them before its ref names them.
        self.attempt: Attempt | None = None
        # Readers opened ahead by arrays_ahead, by digest, for the thread that opened them.
        self._ahead = threading.local()
        # In a view for one task version's reads (:meth:`reading`): the arrays of its bundle
        # (specs/format.md §5.9), name -> (bundle, offset, array), and the bundle's length.
        self._bundled: dict[str, tuple[str, int, BundledArray]] = {}
        self._bundle_size = 0
        # The bundles read, whole (they are small), shared by every view: the last BUNDLES_KEPT.
        self._bundles: dict[str, np.ndarray] = {}
        self._bundles_lock = threading.Lock()

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
        self._joined("arrays", digest)
        return digest

    @staticmethod
    def array_size(tensor: torch.Tensor, *, compress: bool = True) -> int:
        """Bytes :meth:`put_array` would store for ``tensor``, without storing it."""
        return stored_size(to_numpy(tensor), compress=compress)

    def open_array(self, digest: str, *, verify: bool = True, what: str = "") -> "ArrayReader":
        """A reader of the array named ``digest``, chunk by chunk (see :class:`ArrayReader`): the
        one :meth:`arrays_ahead` opened for this thread, if it did."""
        opened = (getattr(self._ahead, "readers", None) or {}).get((digest, verify))
        if opened:
            return opened.popleft()
        if digest in self._bundled:
            return BundledArrayReader(self, digest, verify=verify, what=what)
        return ArrayReader(self, digest, verify=verify, what=what)

    def reading(self, record: TaskVersion) -> "ObjectStore":
        """This store as ``record``'s reads see it: the arrays its bundle holds (specs/format.md
        §5.9) read from there, no other version's bundle consulted (so damage to one version's
        bundle never spreads to another's reads). ``self`` when nothing is bundled."""
        if not record.bundled:
            return self
        view = copy.copy(self)  # the same backend, cache, read-ahead and bundle cache
        view._bundled, offset = {}, 0
        for item in record.bundled:
            view._bundled[item.name] = (record.bundle, offset, item)
            offset += item.nbytes
        view._bundle_size = offset
        return view

    def bundle_bytes(self, digest: str, *, verify: bool = True) -> np.ndarray:
        """The bytes of this view's bundle ``digest``, read whole once and kept (a bundle holds
        only a version's small arrays; the last BUNDLES_KEPT read are kept), checked to be the
        uint8 array of the length its version lists."""
        with self._bundles_lock:
            data = self._bundles.get(digest)
            if data is None:
                # Its own folder: a bundle of one uint8 array has that array's name.
                data = self._read_array(digest, verify=verify, what="bundle", folder=True)[0]
                self._bundles[digest] = data
                if len(self._bundles) > BUNDLES_KEPT:
                    del self._bundles[next(iter(self._bundles))]
        if data.dtype != np.uint8 or data.shape != (self._bundle_size,):
            raise CorruptObjectError(
                f"{self.backend.root}: bundle {digest[:12]} is {data.dtype} {data.shape}, expected uint8 "
                f"({self._bundle_size},) for the arrays its version lists; run `deltastore verify`")
        return data

    def cached(self, digest: str) -> bool:
        """Does the read-through cache hold the array named ``digest``?"""
        return self.cache is not None and self.cache.exists(metadata_key(object_key("arrays", digest)))

    @contextmanager
    def arrays_ahead(self, wanted: list[tuple[str, str]], *, verify: bool = True) -> Iterator[None]:
        """Open the arrays ``wanted`` (``(digest, what)``, in the order they will be read) all at
        once, for this thread's :meth:`open_array` (and :meth:`get_array`) of each inside the block.

        Where the backend reads ahead (an object store) every zarr.json is requested at once, then
        each array's first chunk files: one tensor's arrays arrive together instead of one
        array's round trips after another's. Each zarr.json is checked as when opened alone; a
        reader not used in the block is closed at its end."""
        wanted = [(digest, what) for digest, what in wanted if digest not in self._bundled]  # read from memory
        fetched = [None if self.cached(digest) else fetch_metadata(self.backend, object_key("arrays", digest))
                   for digest, _ in wanted]
        readers: dict[tuple[str, bool], deque] = {}
        outer, self._ahead.readers = getattr(self._ahead, "readers", None), readers
        try:
            for (digest, what), metadata in zip(wanted, fetched):
                reader = ArrayReader(self, digest, verify=verify, what=what, metadata=metadata)
                readers.setdefault((digest, verify), deque()).append(reader)
            yield
        finally:
            self._ahead.readers = outer
            for left in readers.values():
                for reader in left:
                    reader.close()

    def get_array(self, digest: str, *, verify: bool = True, what: str = "", folder: bool = False) -> torch.Tensor:
        """The array named ``digest`` as a CPU tensor; ``verify`` rehashes it (default).
        ``folder``: the stored object itself, not a bundle's copy (what verify and dedup check)."""
        data, _ = self._read_array(digest, verify=verify, what=what, folder=folder)
        import torch

        return torch.from_numpy(data.astype(data.dtype.newbyteorder("="), copy=False))

    def _read_array(self, digest: str, *, verify: bool, what: str = "", folder: bool = False
                    ) -> tuple[np.ndarray, bool]:
        """The array named ``digest`` as stored (little-endian numpy), and whether it is
        zstd-compressed; ``folder``: from its own folder even if a bundle holds it too."""
        reader = ArrayReader(self, digest, verify=verify, what=what) if folder else \
            self.open_array(digest, verify=verify, what=what)
        data = np.empty(reader.shape, dtype=reader.layout.dtype)
        flat = memoryview(data.reshape(-1).view(np.uint8)) if data.size else None
        try:
            for index, (_, offset, nbytes) in enumerate(reader.chunks):
                reader.read_chunk(index, flat[offset:offset + nbytes])
        except BaseException:
            reader.close()
            raise
        reader.finish()
        return data, reader.layout.zstd

    # -- blobs ------------------------------------------------------------------------------
    # A blob is stored as one zstd frame of the file's bytes (tokenizer.json shrinks ~3x) and
    # named by the hash of the uncompressed bytes, so the name does not depend on the codec.
    def put_blob(self, data: bytes, txn: str, *, dictionary: str | None = None) -> str:
        """Store a file; with ``dictionary`` (a plain blob: the reference's file of the same
        path) as a patch against it where that is smaller than the file on its own."""
        digest = content_hash(data)
        if not self._reusable("blobs", digest):
            self._put_stored("blobs", digest, self._smallest_encoding(data, dictionary), txn)
        self._joined("blobs", digest)
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

    def blob_size(self, data: bytes, dictionary: str | None = None) -> int:
        """Bytes :meth:`put_blob` would store for ``data`` (a patch against ``dictionary``
        where that is smaller), without storing it."""
        return len(self._smallest_encoding(data, dictionary))

    def get_blob(self, digest: str, *, verify: bool = True, stored: bytes | None = None) -> bytes:
        """The file blob ``digest`` holds; ``stored``: its stored bytes, if already read."""
        stored = self.backend.get(object_key("blobs", digest)) if stored is None else stored
        what = f"{self.backend.root}: blob {digest[:12]}"
        patch = parse_patch(stored, what)
        frame = stored if patch is None else patch[2]
        dictionary = None if patch is None else self._patch_dictionary(patch[0], patch[1], what)
        data = unframe(frame, what, MAX_BLOB_BYTES, dictionary)
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
        data = pack(record.to_dict())
        digest = content_hash(data)
        if not self._reusable("records", digest):
            self._put_stored("records", digest, record_frame(data), txn)
        self._joined("records", digest)
        return digest

    def _put_stored(self, kind: str, digest: str, stored: bytes, txn: str) -> None:
        staged = f"{txn}/{digest}"
        self.backend.put(staged, stored)
        self.backend.publish(staged, object_key(kind, digest))

    def record_bytes(self, digest: str, *, verify: bool = True, stored: bytes | None = None) -> bytes:
        """The msgpack bytes of record ``digest``: the file as it is (format 1.0-1.2) or its zstd
        frame decompressed (1.3, specs/format.md §3.1); with ``verify``, checked against the name.
        ``stored``: the file's bytes, if already read."""
        stored = self.backend.get(object_key("records", digest)) if stored is None else stored
        what = f"{self.backend.root}: record {digest[:12]}"
        data = stored
        if stored[:4] == ZSTD_MAGIC:
            data = unframe(stored, what, MAX_RECORD_BYTES)
        if verify and content_hash(data) != digest:
            raise CorruptObjectError(f"{what} is corrupt (content hash mismatch)")
        return data

    def get_record(self, digest: str, cls: type[R]) -> R:
        what = f"{cls.__name__} record {digest[:12]}"
        return cls.from_dict(unpack(self.record_bytes(digest), what), what)

    def _reusable(self, kind: str, digest: str) -> bool:
        """Is object ``digest`` stored and intact, so a writer may use it instead of writing it?

        Dedup must not trust bytes it has not checked: a damaged object reused by a commit
        that reports success makes the new version unreadable too. So an existing object is
        rehashed (a cost paid only when dedup saves the write); a damaged one is removed, to
        be written again whole by the caller (same name, same content). An array without its
        metadata is not removed: it may be another writer's publish in flight, which the
        caller's publish writes over with the same bytes (storage/protocol.py).

        Within a write on an object store, an object older than half gc's grace period is
        refreshed (:meth:`keep`) before it is reused, so gc cannot collect it meanwhile."""
        key = object_key(kind, digest)
        if not self.backend.exists(key):
            return False
        try:
            if kind == "arrays":
                self.get_array(digest, verify=True, folder=True)
            elif kind == "blobs":
                self.get_blob(digest, verify=True)
            else:
                self.record_bytes(digest, verify=True)
        except NotFoundError:
            return False
        except OSError:  # CorruptObjectError included
            self.backend.delete(key)
            return False
        return self._refreshed(kind, digest)

    # -- writes beside gc (storage/writes.py) ------------------------------------------------
    def _joined(self, kind: str, digest: str) -> None:
        if self.attempt is not None:
            self.attempt.objects.add((kind, digest))

    def keep(self, kind: str, digest: str) -> None:
        """Name a stored object the current write did not write (the base record a commit
        uses): refreshed like a reused object, and re-checked before the write's ref update."""
        if not self._refreshed(kind, digest):
            raise NotFoundError(f"{self.backend.root}: {kind[:-1]} {digest[:12]} vanished while in use (a gc "
                                "ran beside this write after its ref was removed)")
        self._joined(kind, digest)

    def _refreshed(self, kind: str, digest: str) -> bool:
        """Write a stored object again (same bytes: for an array only its metadata, which gives
        the whole array its age) when the current write must not reuse it as old as it is.
        False when it is gone."""
        if self.attempt is None or self.attempt.fresh_after is None:
            return True
        key = object_key(kind, digest)
        modified = self.backend.modified(key)
        if modified is None:
            return False
        if modified < self.attempt.fresh_after:
            target = f"{key}/{ARRAY_METADATA}" if kind == "arrays" else key
            try:
                self.backend.put(target, self.backend.get(target))
            except NotFoundError:
                return False
        return True

    def complete(self, kind: str, digest: str) -> bool:
        """Is object ``digest`` there whole (an array: its metadata and every chunk)? Existence
        only, not a rehash: what gc could have taken away, checked before a ref names it."""
        key = object_key(kind, digest)
        if kind != "arrays":
            return self.backend.exists(key)
        try:
            layout = read_layout(self.backend, key)
        except (NotFoundError, CorruptObjectError):
            return False
        present = set(self.backend.list(key))
        return all(f"{key}/{name}" in present for name, _, _ in layout.chunks())

    # -- copying ----------------------------------------------------------------------------
    def copy_from(self, source: "ObjectStore", kind: str, digest: str, txn: str) -> bool:
        """Copy object ``digest`` of ``kind`` from ``source`` unless it is already here; True when copied.

        The object is read from ``source`` with its hash checked, and written here through the
        same staged writes as a commit's, whose name (the hash of what was written) must be
        ``digest``: a copy never publishes bytes that do not match their name. An array keeps
        its compression (the reference's arrays may be stored without zstd). An object already
        here whole is skipped (an array half-published by a killed copy is not whole)."""
        key = object_key(kind, digest)
        if self.complete(kind, digest) and self._refreshed(kind, digest):
            self._joined(kind, digest)
            return False
        if kind == "arrays":
            data, compress = source._read_array(digest, verify=True, folder=True)
            written = array_hash(data)
            if written == digest:
                staged = f"{txn}/{digest}"
                write_array(self.backend, staged, data, compress=compress)
                self.backend.publish(staged, key)
                self._joined(kind, digest)
        else:  # checked, then copied as stored (a patch stays a patch, a plain record plain)
            stored = source.backend.get(key)
            read = source.get_blob if kind == "blobs" else source.record_bytes
            written = content_hash(read(digest, verify=False, stored=stored))
            if written == digest:
                self._put_stored(kind, digest, stored, txn)
                self._joined(kind, digest)
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
