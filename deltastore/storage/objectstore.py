"""``ObjectStoreBackend``: a registry under a prefix of an object store (S3 or an
S3-compatible server, Google Cloud Storage, Azure Blob, ``file://``), through ``obstore``, the
Python bindings of Rust's ``object_store`` (what zarr-python's own ``ObjectStore`` wraps).

How it keeps the guarantees of :mod:`~deltastore.storage.protocol` without folders, renames
or locks:

- **Atomic writes**: an object store's PUT replaces a key whole (never multipart here, so no
  hidden half-upload exists either). Create-only writes are ``If-None-Match: *``
  (``mode="create"``); compare-and-swap is ``If-Match`` on the ETag read with the bytes (on
  GCS, its generation: ``_token``).
- **Conditional writes are probed at open** (:meth:`ObjectStoreBackend.check_conditional_writes`):
  a store that accepts a second create-only put of one key (S3-compatible servers that ignore
  the header; older SeaweedFS releases under concurrency) would let two commits overwrite each
  other's refs without an error, so it is refused before anything is written.
- **Publishing has no rename**: see :meth:`ObjectStoreBackend.publish`.
- **Reads in parallel**: :meth:`ObjectStoreBackend.fetch` starts a GET on a thread pool of the
  backend's own, so readers ask for the zarr.json and chunk files they will need next
  (storage/objects.py) and many requests are in flight at once; each GET is ranged to what the reader can use and
  its response gives the key's size, so no HEAD is needed beside it.
- **Requests are counted** per backend (:attr:`ObjectStoreBackend.requests`), by operation.
- **Listing** is built from the keys themselves (a prefix exists while a key is under it);
  an object store has no non-folder in a folder's place, so the protocol's "damage is
  raised" rule has nothing to catch here.

Credentials and endpoints come from the environment (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL``, ``AWS_ALLOW_HTTP``, ``GOOGLE_SERVICE_ACCOUNT``, ``AZURE_STORAGE_*``...), which
obstore reads itself; they are never arguments, so they never reach a command line or a log.
"""

from __future__ import annotations

import threading
import uuid
import weakref
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor

import obstore as _obstore
from obstore.exceptions import AlreadyExistsError, BaseError, NotSupportedError, PreconditionError
from obstore.store import from_url

from ..errors import ConditionalWritesError, CorruptObjectError, NotFoundError
from .layout import ARRAY_METADATA  # published last and deleted first: see publish and delete
from .protocol import MAX_KEY_BYTES
from .writes import PROBE_PREFIX

# Reads a backend keeps in flight for those who read ahead (:meth:`ObjectStoreBackend.fetch`):
# a request on an object store waits on the network and the server, not on this machine's
# cores, so far more of them than cores are worth having in flight. The callers bound how many
# they ask for (storage/objects.py: the zarr.json of each array of a tensor, then 4 chunk files
# per array reader; 16 reader threads at most), and what is asked beyond this waits its turn;
# each request holds at most one chunk file (8 MiB).
FETCH_THREADS = 64


class _CountedCalls:
    """obstore's functions as this module calls them, each call counted as one request on the
    :attr:`ObjectStoreBackend.requests` of the backend whose store it is given (a listing: one
    request per page of keys).

    In place of the module, so every request any method of the backend makes is counted,
    reads and writes alike, with no counting code at each call. A backend registers its store
    by identity (obstore's stores cannot be hashed or weakly referenced) and unregisters it
    when the backend is collected; a store nobody registered (zarr's, see
    :meth:`ObjectStoreBackend.zarr_store`) is not counted."""

    def __init__(self):
        self._counters: dict[int, tuple[Counter, threading.Lock]] = {}

    def register(self, backend: "ObjectStoreBackend") -> None:
        key = id(backend._store)
        self._counters[key] = (backend.requests, threading.Lock())
        weakref.finalize(backend, self._counters.pop, key, None)

    def _count(self, store, name: str) -> None:
        counter = self._counters.get(id(store))
        if counter is not None:
            with counter[1]:  # from many reader threads at once
                counter[0][name] += 1

    def __getattr__(self, name: str):
        call = getattr(_obstore, name)

        def counted(store, *args, **kwargs):
            self._count(store, name)
            result = call(store, *args, **kwargs)
            return self._pages(store, result) if name == "list" else result
        return counted

    def _pages(self, store, stream):
        """The pages of a listing, each after the first counted as one more request."""
        for number, page in enumerate(stream):
            if number:
                self._count(store, "list")
            yield page


obstore = _CountedCalls()


def _token(meta) -> str | None:
    """The compare-and-swap token of an object as read: its ETag, then a space and its version
    where the store gives one. GCS's conditional put compares the version (the generation,
    ``x-goog-if-generation-match``), not the ETag, and object_store refuses an update without
    it; S3 and Azure compare the ETag (``If-Match``) and ignore the version. An ETag holds no
    space (RFC 9110 etagc), so the token splits back unambiguously in put_if_version."""
    if meta["e_tag"] is None:
        return None
    return meta["e_tag"] if meta.get("version") is None else f"{meta['e_tag']} {meta['version']}"


class ObjectStoreBackend:
    """A registry at ``url`` (``s3://bucket/prefix``, ``gs://...``, ``az://...``, ``file:///...``);
    each key is the object ``<prefix>/<key>`` of the bucket."""

    def __init__(self, url: str, *, check_writes: bool = True):
        """``check_writes``: probe conditional writes now (False for a registry opened only
        to read, which may hold read-only credentials)."""
        self.root = url.rstrip("/")
        self._store = from_url(self.root)
        # Requests made so far, by obstore function ("get", "head", "put", "list"...): what the
        # benchmark reports per commit and per materialize, and tests bound.
        self.requests: Counter[str] = Counter()
        obstore.register(self)
        self._fetcher: ThreadPoolExecutor | None = None
        self._fetcher_lock = threading.Lock()
        if check_writes:
            self.check_conditional_writes()

    def __repr__(self) -> str:
        return f"ObjectStoreBackend({self.root!r})"

    def _where(self, key: str) -> str:
        return f"{self.root}: object {key!r}"

    def check_conditional_writes(self) -> None:
        """Refuse a store that does not honour ``If-None-Match: *`` and ``If-Match``.

        A probe key of its own (a fresh name, so two machines opening the registry at once do
        not disturb each other) is created twice, then updated with a token it does not have:
        both must be refused. Four requests, once per open."""
        # Beside the registry's folders, not in one: some servers (SeaweedFS) list a folder
        # emptied by a delete for a while, and a ``staging`` that appears from nowhere would
        # be a surprise in ``children("")``.
        probe = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        try:
            if not self.put_if_absent(probe, b"1"):
                raise ConditionalWritesError(f"{self._where(probe)} exists before it was written: the store lists "
                                             "names it was never given")
            refused_create = not self.put_if_absent(probe, b"2")
            # Stale in both parts of a token (_token): the ETag, and a generation GCS never gives.
            refused_stale = not self.put_if_version(probe, b"3", '"not-the-etag" 1')
        except (NotImplementedError, NotSupportedError) as exc:  # a store type without them (file://)
            raise ConditionalWritesError(
                f"{self.root}: this kind of store cannot do conditional writes ({str(exc).splitlines()[0]}); "
                "give a local registry as a folder path, or use a store that can (S3, GCS, Azure)") from None
        finally:
            self.delete(probe)
        if not (refused_create and refused_stale):
            what = "a second create-only put (If-None-Match: *)" if not refused_create else \
                "a put with a stale ETag (If-Match)"
            raise ConditionalWritesError(
                f"{self.root}: the object store accepted {what} of {probe!r}, expected it refused "
                "(412, or 409 from Azure for an existing blob): without conditional writes two machines "
                "writing one registry overwrite each other's versions silently. Use a store that honours "
                "them (AWS S3, GCS, Azure; SeaweedFS 4.x; MinIO)")

    # -- reading ----------------------------------------------------------------------------
    def get(self, key: str, *, limit: int = MAX_KEY_BYTES) -> bytes:
        return self._get(key, limit)[0]

    def _get(self, key: str, limit: int) -> tuple[bytes, str | None]:
        """The bytes of ``key`` and the version token (_token) of the same response; the size
        in the response's headers is checked against ``limit`` before the body is read."""
        try:
            result = obstore.get(self._store, key)
        except FileNotFoundError:
            raise NotFoundError(f"{self._where(key)} is missing") from None
        size = result.meta["size"]
        if size > limit:
            raise CorruptObjectError(f"{self._where(key)} holds {size} bytes, more than the {limit} such an object "
                                     "may have; it is damaged or was not written by deltastore")
        return bytes(result.bytes()), _token(result.meta)

    def fetch(self, key: str, *, limit: int) -> Future:
        """Start one GET of the first ``limit`` bytes of ``key`` on a thread of this backend's
        own; the future's result is ``(bytes read, the key's full size)`` (obstore's buffer:
        read by the caller in place, no copy here), or NotFoundError.

        Why threads and not obstore's async API: ranged reads of 8 MiB chunks through it ran at
        70 MB/s against SeaweedFS on loopback, where the same GETs from threads (obstore's
        blocking calls release the GIL) ran at 1.1 GB/s."""
        with self._fetcher_lock:
            if self._fetcher is None:
                self._fetcher = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="deltastore-fetch")
        return self._fetcher.submit(self._fetch_now, key, limit)

    def _fetch_now(self, key: str, limit: int):
        """``(the first limit bytes of key, its size)`` from one ranged GET, whose response
        says the whole key's size."""
        try:
            try:
                result = obstore.get(self._store, key, options={"range": (0, limit)})
            except BaseError:  # a range on an empty key is an error to the store: head says
                size = obstore.head(self._store, key)["size"]
                if size:
                    raise
                return b"", 0
        except FileNotFoundError:
            raise NotFoundError(f"{self._where(key)} is missing") from None
        return result.bytes(), result.meta["size"]

    def get_into(self, key: str, out: memoryview, *, start: int = 0) -> int:
        """One ranged GET of bytes ``[start, start + len(out))`` copied into ``out``."""
        out = out.cast("B")
        try:
            if len(out):
                try:
                    data = obstore.get_range(self._store, key, start=start, length=len(out))
                except BaseError:  # obstore's errors; a missing key is the builtin FileNotFoundError
                    # A range starting at or after the end is an error to the store, an empty
                    # read to the protocol; anything else is re-raised.
                    if start < obstore.head(self._store, key)["size"]:
                        raise
                    return 0
            else:
                obstore.head(self._store, key)  # nothing to read, but a missing key is still an error
                return 0
        except FileNotFoundError:
            raise NotFoundError(f"{self._where(key)} is missing") from None
        view = memoryview(data)
        out[:len(view)] = view
        return len(view)

    def get_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        """The bytes of ``key`` and the ETag of the same response, so the token is the one of
        those bytes (a HEAD then a GET could pair new bytes with an old ETag)."""
        try:
            data, etag = self._get(key, MAX_KEY_BYTES)
        except NotFoundError:
            return None, None
        if etag is None:
            raise ConditionalWritesError(f"{self._where(key)}: the store gives no ETag, so it cannot compare-and-swap; "
                                         "use a store that does (AWS S3, GCS, Azure, SeaweedFS 4.x, MinIO)")
        return data, etag

    def exists(self, key: str) -> bool:
        try:
            obstore.head(self._store, key)
            return True
        except FileNotFoundError:
            return self.prefix_exists(key)

    def size(self, key: str) -> int:
        try:
            return obstore.head(self._store, key)["size"]
        except FileNotFoundError:
            return sum(meta["size"] for meta in self._metas(key))

    def modified(self, key: str) -> float | None:
        try:
            return obstore.head(self._store, key)["last_modified"].timestamp()
        except FileNotFoundError:
            return max((t for _, t in self.list_modified(key)), default=None)

    # -- listing ----------------------------------------------------------------------------
    def list_modified(self, prefix: str) -> list[tuple[str, float]]:
        """The store's own ``Last-Modified`` of each key (whole seconds on S3)."""
        return sorted((meta["path"], meta["last_modified"].timestamp()) for meta in self._metas(prefix))

    def _metas(self, prefix: str, *, chunk_size: int = 1000):
        """Every object under ``prefix`` (``""``: the whole registry). object_store matches
        whole path segments, so ``refs/t`` never lists ``refs/tasks/...``."""
        try:
            for batch in obstore.list(self._store, prefix or None, chunk_size=chunk_size):
                yield from batch
        except BaseError as exc:
            if "NoSuchBucket" in str(exc):
                raise NotFoundError(f"{self.root}: the bucket does not exist; create it first (deltastore writes "
                                    "inside a bucket, it does not create one)") from None
            raise

    def list(self, prefix: str) -> list[str]:
        return sorted(meta["path"] for meta in self._metas(prefix))

    def children(self, prefix: str) -> list[str]:
        """The first segment after ``prefix`` of every key under it.

        From the keys themselves, not a delimiter listing's common prefixes: a server with
        folders (SeaweedFS) keeps listing a folder for a while (over 30 s measured) after its
        last key was deleted, and ``ObjectStore.all_objects`` would take such a ghost for a
        missing array. The cost is a listing of every key under ``prefix``, 1000 per request."""
        start = len(prefix) + 1 if prefix else 0
        return sorted({meta["path"][start:].partition("/")[0] for meta in self._metas(prefix)})

    def prefix_exists(self, prefix: str) -> bool:
        """Is any key under ``prefix`` (one listing request of one entry)?"""
        return next(iter(self._metas(prefix, chunk_size=1)), None) is not None

    # -- writing ----------------------------------------------------------------------------
    def put(self, key: str, data: bytes) -> None:
        obstore.put(self._store, key, data, use_multipart=False)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """``If-None-Match: *``: the store decides atomically, there is no window to race."""
        try:
            obstore.put(self._store, key, data, mode="create", use_multipart=False)
        except (AlreadyExistsError, PreconditionError):
            return False
        return True

    def put_if_version(self, key: str, data: bytes, version: str | None) -> bool:
        """``If-Match: <ETag>`` (on GCS the generation the token carries, see _token;
        ``If-None-Match: *`` when ``version`` is None)."""
        if version is None:
            return self.put_if_absent(key, data)
        try:
            e_tag, _, generation = version.partition(" ")
            # No "version" key at all without one: obstore refuses None there.
            mode = {"e_tag": e_tag, "version": generation} if generation else {"e_tag": e_tag}
            obstore.put(self._store, key, data, mode=mode, use_multipart=False)
        except (PreconditionError, FileNotFoundError):  # changed, or deleted, since it was read
            return False
        return True

    def publish(self, staged: str, final: str) -> bool:
        """Copy a staged key or prefix to ``final``, then delete the staged copy.

        An object store cannot rename, so "whole or not at all" is kept by order: an array's
        chunks are copied first (server-side: no byte passes through this machine), and its
        ``zarr.json`` last, create-only. Readers find an array by its zarr.json
        (layout.read_layout), so until that one request succeeds the array is absent, and after
        it, complete. A killed publish leaves chunks without a zarr.json under the final name,
        which reads as absent (``ObjectStore._reusable`` finds it unreadable, deletes it and
        writes it again) and the staged copy, which gc removes with the rest of ``staging/``.

        Why a copy and not writing the chunks straight under their final name: the protocol
        and the layers above stay the same for every backend (stage, then publish), and a
        commit killed half-way leaves its debris in ``staging/`` only. The create-only last
        put is what decides between two publishers of one array: both wrote chunks of the
        same name and content (same hash, same codec), so the loser's copies are harmless.

        Returns False, dropping the staged copy, when ``final`` already exists."""
        if self._published(final):
            self.delete(staged)
            return False
        keys = self.list(staged)
        if not keys:  # a single key, not a prefix
            won = self.put_if_absent(final, self.get(staged))
        else:
            metadata = None
            for key in keys:
                target = final + key[len(staged):]
                if key.rpartition("/")[2] == ARRAY_METADATA:
                    metadata = (key, target)
                else:
                    obstore.copy(self._store, key, target)
            won = metadata is None or self.put_if_absent(metadata[1], self.get(metadata[0]))
        self.delete(staged)
        return won

    def _published(self, final: str) -> bool:
        """Is ``final`` there as a key, or as an array whose metadata was published (chunks
        alone are a killed publish's remains, to be written over)."""
        return self.exists(final) and (not self.prefix_exists(final) or self.exists(f"{final}/{ARRAY_METADATA}"))

    def delete(self, key: str) -> None:
        """Remove a key, or every key under a prefix in batched requests.

        No rename to hide a prefix first, so an array's ``zarr.json`` is deleted before its
        chunks: a delete killed half-way leaves chunks without metadata, which reads as
        absent (never as an array with chunks missing) and is debris for gc."""
        keys = self.list(key)
        if not keys:
            self._delete([key])
            return
        metadata = [k for k in keys if k.rpartition("/")[2] == ARRAY_METADATA]
        if metadata:  # a request of its own: the order of keys inside one batch is the store's
            self._delete(metadata)
        self._delete([k for k in keys if k not in metadata])

    def _delete(self, keys: list[str]) -> None:
        """Delete ``keys``, those already gone included: S3 answers a delete of a missing key
        with success, Azure and GCS with 404 (a key never written, or one a concurrent gc or
        publish removed after it was listed). A batch that hit a missing key stops at it, so
        its keys are then deleted one by one, each missing one skipped."""
        try:
            obstore.delete(self._store, keys)
        except FileNotFoundError:
            for key in keys:
                try:
                    obstore.delete(self._store, key)
                except FileNotFoundError:
                    pass

    def zarr_store(self, prefix: str):
        """zarr's ``ObjectStore`` over an obstore store rooted at ``<root>/<prefix>`` (zarr
        imported here, on first write, as in LocalBackend)."""
        from zarr.storage import ObjectStore

        return ObjectStore(from_url(f"{self.root}/{prefix}"))
