"""Where bytes live: the local-directory backend over zarr's store abstraction.

Every byte of a registry goes through :class:`LocalBackend`: small objects as whole keys
(records, refs, blobs), tensors as zarr v3 arrays. Arrays are opened through a zarr store
rooted at the array's own key, so swapping the local directory for an object store means a
new backend class with the same five operations, not touching the math. What a replacement
must provide to keep the guarantees (atomic single-key put, put-if-absent for refs, a way to
publish a staged array) is written in specs/format.md, "Writing safely".
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
import stat
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import zstandard

from ..dtypes import ARRAY_DTYPES
from ..errors import CorruptObjectError, LockTimeoutError, NotFoundError

# Arrays are chunked so no chunk exceeds this many bytes: big enough that per-chunk overhead
# is negligible, small enough to stream a 500 MB embedding without holding it twice.
CHUNK_BYTES = 8 << 20
ZSTD_LEVEL = 3
# Whole-key objects (records, refs, blobs) are small: side files are capped at 64 MiB when
# committed and records at 64 MiB when read. Reading more than this is a damaged or hostile
# file, refused before the bytes are read.
MAX_KEY_BYTES = 64 << 20
# The largest array one object may declare (16 GiB, 8x a 70B model's embedding in fp16). A
# zarr.json asking for more is refused before zarr allocates anything.
MAX_ARRAY_BYTES = 16 << 30
MAX_ARRAY_DIMS = 8
MAX_ZARR_JSON_BYTES = 1 << 16
MAX_CHUNK_BYTES = 64 << 20


def chunk_shape(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunk along the first axis only, at most CHUNK_BYTES per chunk (at least one row)."""
    if not shape:
        return ()
    row_bytes = itemsize * int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else itemsize
    rows = max(1, CHUNK_BYTES // max(1, row_bytes))
    return (max(1, min(shape[0], rows)),) + tuple(shape[1:])


class LocalBackend:
    """A registry directory on a local POSIX filesystem.

    Whole-key writes go to a temporary file in the same directory and are renamed into place
    (atomic on POSIX), so a reader sees the old or the new bytes, never a mix.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"LocalBackend({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    # -- whole keys -------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def get(self, key: str, *, limit: int = MAX_KEY_BYTES) -> bytes:
        """The bytes of ``key``; more than ``limit`` bytes is an error, raised before reading."""
        where = f"{self.root}: object {key!r}"
        with open_regular(self._path(key), where) as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > limit:
                raise CorruptObjectError(f"{where} holds {size} bytes, more than the {limit} such an object may "
                                         "have; it is damaged or was not written by deltastore")
            return fh.read(limit)

    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` under ``key`` atomically (temp file, fsync, rename, fsync of the folder)."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a failed write leaves nothing behind (a killed one: gc's job)
            raise
        _fsync_dir(path.parent)

    def delete(self, key: str) -> None:
        """Remove a key or a whole prefix (an array); missing keys are fine.

        A folder is first renamed into ``staging/`` (atomic), then removed: a process killed
        half-way through leaves debris in staging for gc, never a half-deleted array under
        ``objects/`` whose surviving zarr.json would make a later commit believe it exists.
        """
        path = self._path(key)
        if path.is_dir() and not path.is_symlink():  # a symlink is unlinked, never followed
            trash = self._path(f"staging/deleted-{uuid.uuid4().hex}")
            if self._path("staging") not in path.parents:
                trash.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.rename(path, trash)
                except FileNotFoundError:
                    return
                path = trash
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def list(self, prefix: str) -> list[str]:
        """Keys of the files directly or indirectly under ``prefix`` (sorted)."""
        base = self._folder(prefix)
        if base is None:
            return []
        return sorted(str(p.relative_to(self.root).as_posix()) for p in base.rglob("*") if p.is_file())

    def children(self, prefix: str) -> list[str]:
        """Names of the entries directly under ``prefix`` (sorted)."""
        base = self._folder(prefix)
        return sorted(p.name for p in base.iterdir()) if base is not None else []

    def folder_exists(self, prefix: str) -> bool:
        """Is ``prefix`` a folder (False when absent; a damaged one raises, see :meth:`children`)."""
        return self._folder(prefix) is not None

    def _folder(self, prefix: str) -> Path | None:
        """The real folder at ``prefix``, or None when nothing is there.

        Anything else in its place or in a folder above it (a file, a fifo, a symlink) is
        damage, raised: listing it as empty would make gc delete everything its refs protect,
        and following a symlink would make gc delete files outside the registry."""
        parent, _, _ = prefix.rpartition("/")
        if parent and self._folder(parent) is None:
            return None
        path = self._path(prefix)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return None
        if prefix and not stat.S_ISDIR(mode):  # lstat: a symlink is not followed
            kind = "a symlink" if stat.S_ISLNK(mode) else "not a folder"
            raise CorruptObjectError(f"{self.root}: {prefix!r} is {kind}, expected a folder of the registry; the "
                                     "registry is damaged: restore that folder from a backup (gc refuses to run "
                                     "until then)")
        return path

    def size(self, key: str) -> int:
        """Apparent bytes of a key, or of every file under a prefix (what ``du -sb`` counts)."""
        path = self._path(key)
        if path.is_file():
            return path.stat().st_size
        if not path.is_dir():
            return 0
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

    def mtime(self, key: str) -> float:
        return self._path(key).stat().st_mtime

    # -- arrays -----------------------------------------------------------------------------
    def write_array(self, key: str, data: np.ndarray, *, compress: bool) -> None:
        """Write ``data`` as a zarr v3 array at ``key`` (every chunk written, even all-zero ones,
        so a missing chunk is always an error, never an implicit fill value)."""
        # Imported here: reads bypass zarr (read_chunk), and importing it costs a read-only
        # command such as `deltastore ls` a third of its start-up.
        import zarr
        import zarr.codecs
        from zarr.storage import LocalStore

        store = LocalStore(self._path(key))
        array = zarr.create_array(
            store,
            shape=data.shape,
            dtype=data.dtype,
            chunks=chunk_shape(data.shape, data.dtype.itemsize),
            # "v2" keys put chunks beside zarr.json ("0", "1.0") instead of in a "c/" folder:
            # one directory less per array, which is most of an array's overhead on disk.
            chunk_key_encoding={"name": "v2", "separator": "."},
            compressors=[zarr.codecs.ZstdCodec(level=ZSTD_LEVEL)] if compress else None,
            fill_value=0,
            config={"write_empty_chunks": True},
            zarr_format=3,
            overwrite=True,
        )
        if data.size:
            array[...] = data
        # Chunks reach the disk before the array is published under objects/ (a rename), so
        # a power cut cannot leave a published name pointing at empty chunk files.
        for file in sorted(self._path(key).rglob("*")):
            if file.is_file():
                with open(file, "rb") as fh:
                    os.fsync(fh.fileno())

    def open_array(self, key: str) -> "ArrayLayout":
        """The checked layout of the array at ``key`` (its zarr.json), for :meth:`read_chunk`."""
        try:
            raw = self.get(f"{key}/zarr.json", limit=MAX_ZARR_JSON_BYTES)
        except NotFoundError:
            raise NotFoundError(f"{self.root}: array {key!r} is missing (no zarr.json)") from None
        meta = check_array_metadata(raw, f"{self.root}: array {key!r}")
        shape = tuple(meta["shape"])
        chunk = meta["chunk_grid"]["configuration"]["chunk_shape"]
        return ArrayLayout(key, np.dtype(meta["data_type"]).newbyteorder("<"), shape, chunk[0] if shape else 1,
                           meta["codecs"][-1]["name"] == "zstd")

    def read_chunk(self, layout: "ArrayLayout", index: int, out: memoryview) -> None:
        """Decode chunk ``index`` of an array into ``out``: exactly the chunk's bytes that lie
        inside the array (specs/format.md §4: the last chunk's padding is dropped).

        Reads bypass zarr: ``zstandard`` releases the GIL and decodes straight into the caller's
        buffer (a pinned staging slot on CUDA), so reader threads decode in parallel and no
        other host copy of the array is made."""
        name, _, valid = layout.chunk(index)
        where = f"{self.root}: array {layout.key!r}, chunk {name}"
        out = out.cast("B")
        if len(out) != valid:
            raise ValueError(f"{where}: buffer of {len(out)} bytes for {valid} bytes of chunk")
        try:
            with open_regular(self._path(f"{layout.key}/{name}"), where) as fh:
                if not layout.zstd:
                    size = os.fstat(fh.fileno()).st_size
                    if size != layout.chunk_nbytes:
                        raise CorruptObjectError(f"{where}: holds {size} bytes, expected {layout.chunk_nbytes}; "
                                                 "run `deltastore verify` and restore it from a backup")
                    _read_exactly(fh, out, where)
                    return
                bound = layout.chunk_nbytes + (layout.chunk_nbytes >> 7) + 1024  # above zstd's worst case
                buffer = _frame_buffer(bound + 1)
                frame = buffer[:fh.readinto(buffer)]
                if len(frame) > bound:
                    raise CorruptObjectError(f"{where}: holds over {bound} bytes, more than a zstd frame of "
                                             f"{layout.chunk_nbytes} bytes can; restore it from a backup")
        except NotFoundError:
            raise CorruptObjectError(f"{where} is missing; the registry is damaged: run `deltastore verify` and "
                                     "restore this object from a backup") from None
        declared = zstd_content_size(frame)
        if declared != layout.chunk_nbytes:
            raise CorruptObjectError(
                f"{where}: zstd frame declares {declared if declared is not None else 'no'} decompressed size, "
                f"expected {layout.chunk_nbytes} bytes; run `deltastore verify` and restore it from a backup")
        try:
            with _decompressor().stream_reader(frame, read_across_frames=False) as reader:
                _read_exactly(reader, out, where)
                padding = layout.chunk_nbytes - valid
                if padding and len(reader.read(padding)) != padding or reader.read(1):
                    raise CorruptObjectError(f"{where}: zstd frame does not hold {layout.chunk_nbytes} bytes")
        except zstandard.ZstdError as exc:
            raise CorruptObjectError(f"{where}: not a valid zstd frame ({exc}); run `deltastore verify` and "
                                     "restore it from a backup") from None

    def publish(self, staged: str, final: str) -> bool:
        """Move a fully written staged object (file or array folder) to its final key.

        Returns False when ``final`` already exists (same content, written by someone else):
        the staged copy is dropped. A rename is atomic on POSIX, so the final key is either
        absent or complete.
        """
        src, dst = self._path(staged), self._path(final)
        if dst.exists():
            self.delete(staged)
            return False
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(src, dst)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                self.delete(staged)
                return False
            raise
        _fsync_dir(dst.parent)
        return True

    # -- locking ----------------------------------------------------------------------------
    @contextmanager
    def lock(self, name: str, *, shared: bool = False, timeout: float = 600.0) -> Iterator[None]:
        """An advisory ``flock`` on ``locks/<name>``; shared or exclusive; waits up to ``timeout``."""
        path = self._path(f"locks/{name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise LockTimeoutError(
                            f"{self.root}: lock {name!r} is held by another process for over {timeout:.0f} s; "
                            "wait for it to finish, or check for a hung deltastore process"
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock


@dataclass(frozen=True)
class ArrayLayout:
    """Where an array's bytes are (specs/format.md §4): chunks along the first axis."""

    key: str
    dtype: np.dtype          # little-endian
    shape: tuple[int, ...]
    chunk_rows: int          # rows of the first axis per chunk (1 for a 0-d array)
    zstd: bool               # each chunk file is one zstd frame (else the raw bytes)

    @property
    def row_nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape[1:])

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)

    @property
    def chunk_nbytes(self) -> int:
        """Bytes of one stored chunk (the full chunk shape, padding included)."""
        return self.chunk_rows * self.row_nbytes

    @property
    def n_chunks(self) -> int:
        if not self.shape:
            return 1
        return 0 if self.nbytes == 0 else -(-self.shape[0] // self.chunk_rows)

    def chunk(self, index: int) -> tuple[str, int, int]:
        """``(file name, offset in the array's bytes, bytes inside the array)`` of chunk ``index``."""
        if not self.shape:
            return "0", 0, self.dtype.itemsize
        row = index * self.chunk_rows
        rows = min(self.shape[0], row + self.chunk_rows) - row
        return f"{index}{'.0' * (len(self.shape) - 1)}", row * self.row_nbytes, rows * self.row_nbytes

    def chunks(self) -> list[tuple[str, int, int]]:
        return [self.chunk(i) for i in range(self.n_chunks)]


_local = threading.local()


def _decompressor() -> "zstandard.ZstdDecompressor":
    """One zstd decompression context per thread (a context is not thread-safe)."""
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def _frame_buffer(nbytes: int) -> memoryview:
    """A reusable per-thread buffer of at least ``nbytes`` for compressed chunk files (a fresh
    8 MB bytes object per chunk costs an allocation and its page faults, a third of the read)."""
    buf = getattr(_local, "frame", None)
    if buf is None or len(buf) < nbytes:
        buf = _local.frame = memoryview(bytearray(nbytes))
    return buf[:nbytes]


def _read_exactly(stream, out: memoryview, where: str) -> None:
    pos = 0
    while pos < len(out):
        n = stream.readinto(out[pos:])
        if not n:
            raise CorruptObjectError(f"{where}: ends after {pos} of {len(out)} bytes; run `deltastore verify` and "
                                     "restore it from a backup")
        pos += n


def open_regular(path: Path, where: str):
    """``open(path, "rb")``, for a regular file only: the one rule for every file the registry
    reads. A fifo would block ``open()`` forever (and a hung gc holds the registry lock), a
    device never ends, a folder is not data. The file is opened without blocking and checked
    on the open descriptor, so it cannot be swapped between the check and the read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFoundError(f"{where} is missing") from None
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise  # permissions, I/O errors: not damage to the registry's layout
        raise CorruptObjectError(f"{where} cannot be reached ({exc.strerror}): a folder above it is not a folder; "
                                 "the registry is damaged: run `deltastore verify` and restore it from a backup") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CorruptObjectError(f"{where} is not a regular file (a fifo blocks, a device gives more than any "
                                 "object holds); the registry is damaged: run `deltastore verify` and restore it "
                                 "from a backup")
    return os.fdopen(fd, "rb")


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX needs the folder fsynced, not only the file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the rename itself is still atomic
    finally:
        os.close(fd)


def zstd_content_size(frame: bytes) -> int | None:
    """The decompressed size a zstd frame header declares (RFC 8878 §3.1.1.1), or None when
    the frame does not start with a zstd header or leaves the size out.

    Checked before decompressing, so a 1 KB frame declaring 100 GB (a zstd bomb) is refused
    instead of allocated.
    """
    if len(frame) < 6 or frame[:4] != b"\x28\xb5\x2f\xfd":
        return None
    descriptor = frame[4]
    fcs_flag, single_segment, dict_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    pos = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if size == 0 or len(frame) < pos + size:
        return None
    value = int.from_bytes(frame[pos:pos + size], "little")
    return value + 256 if size == 2 else value


def array_shape_problem(shape: tuple[int, ...], itemsize: int) -> str | None:
    """Why an array of ``shape`` and ``itemsize`` cannot be stored, or None when it can.

    The one rule the writer (before the first write of a commit) and the reader
    (:func:`check_array_metadata`) share, so nothing is accepted that cannot be read back."""
    if len(shape) > MAX_ARRAY_DIMS:
        return f"has {len(shape)} dimensions, more than the {MAX_ARRAY_DIMS} an array may have"
    nbytes = math.prod(shape) * itemsize
    if nbytes > MAX_ARRAY_BYTES:
        return f"declares {nbytes} bytes (shape {list(shape)}), more than the {MAX_ARRAY_BYTES} an array may hold"
    row = math.prod(shape[1:]) * itemsize  # a chunk holds at least one row of the first axis
    if len(shape) > 1 and row > MAX_CHUNK_BYTES:
        return (f"has rows of {row} bytes (shape {list(shape)}), more than the {MAX_CHUNK_BYTES} one chunk "
                "may hold")
    return None


def check_array_metadata(raw: bytes, what: str) -> dict:
    """Refuse a zarr.json that ``write_array`` could not have written, before zarr reads it.

    The checks are what keeps a crafted array from doing harm: a declared shape of 10**15
    elements, chunks of a petabyte, a codec that is not ours (zarr would happily allocate or
    load them). Allowed: zarr v3 array, at most MAX_ARRAY_DIMS dimensions, at most
    MAX_ARRAY_BYTES in all, one of ARRAY_DTYPES, the regular chunk grid that
    :func:`chunk_shape` gives, codecs ``bytes`` (little-endian) then optionally ``zstd``, fill value 0.
    """
    def bad(problem: str) -> CorruptObjectError:
        return CorruptObjectError(f"{what}: zarr.json {problem}; the array is damaged or was not written by "
                                  "deltastore: run `deltastore verify` and restore it from a backup")

    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise bad(f"is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        raise bad("does not describe a zarr v3 array")
    shape = meta.get("shape")
    if (not isinstance(shape, list) or len(shape) > MAX_ARRAY_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d for d in shape)):
        raise bad(f"has an invalid shape {shape!r:.80}")
    dtype = meta.get("data_type")
    if dtype not in ARRAY_DTYPES:
        raise bad(f"has data type {dtype!r:.40}, expected one of {', '.join(ARRAY_DTYPES)}")
    itemsize = np.dtype(dtype).itemsize
    problem = array_shape_problem(tuple(shape), itemsize)
    if problem:
        raise bad(problem)
    grid = meta.get("chunk_grid")
    chunks = grid.get("configuration", {}).get("chunk_shape") if isinstance(grid, dict) else None
    # specs/format.md §4: regular chunks along the first axis only, of a bounded size.
    if (not isinstance(grid, dict) or grid.get("name") != "regular" or not isinstance(chunks, list)
            or len(chunks) != len(shape) or not all(isinstance(c, int) and not isinstance(c, bool) for c in chunks)
            or (shape and not (1 <= chunks[0] and chunks[1:] == shape[1:]))
            or math.prod(chunks) * itemsize > MAX_CHUNK_BYTES):
        raise bad(f"has chunk grid {grid!r:.80}, expected regular chunks along the first axis of at most "
                  f"{MAX_CHUNK_BYTES} bytes")
    codecs = meta.get("codecs")
    if (not isinstance(codecs, list) or not all(isinstance(c, dict) for c in codecs)
            or [c.get("name") for c in codecs] not in (["bytes"], ["bytes", "zstd"])):
        raise bad(f"has codecs {codecs!r:.80}, expected 'bytes', optionally followed by 'zstd'")
    config = codecs[0].get("configuration") or {}
    endian = config.get("endian") if isinstance(config, dict) else None
    if endian != "little" and not (endian is None and itemsize == 1):
        raise bad(f"has 'bytes' codec configuration {config!r:.80}, expected little-endian")
    encoding = meta.get("chunk_key_encoding")
    if (not isinstance(encoding, dict) or encoding.get("name") != "v2"
            or encoding.get("configuration", {}).get("separator", ".") != "."):
        raise bad(f"has chunk key encoding {encoding!r:.80}, expected v2 with separator '.'")
    if meta.get("fill_value") != 0:
        raise bad(f"has fill value {meta.get('fill_value')!r:.40}, expected 0")
    return meta
