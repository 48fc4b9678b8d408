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
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import zarr
import zarr.codecs
from zarr.storage import LocalStore

from ..errors import CorruptObjectError, LockTimeoutError, NotFoundError

# Arrays are chunked so no chunk exceeds this many bytes: big enough that per-chunk overhead
# is negligible, small enough to stream a 500 MB embedding without holding it twice.
CHUNK_BYTES = 8 << 20
ZSTD_LEVEL = 3


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

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"{self.root}: object {key!r} is missing") from None
        except IsADirectoryError:
            raise CorruptObjectError(f"{self.root}: {key!r} is a directory, expected a file") from None

    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` under ``key`` atomically (temp file, fsync, rename)."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def delete(self, key: str) -> None:
        """Remove a key or a whole prefix (an array); missing keys are fine."""
        path = self._path(key)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def list(self, prefix: str) -> list[str]:
        """Keys of the files directly or indirectly under ``prefix`` (sorted)."""
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(str(p.relative_to(self.root).as_posix()) for p in base.rglob("*") if p.is_file())

    def children(self, prefix: str) -> list[str]:
        """Names of the entries directly under ``prefix`` (sorted)."""
        base = self._path(prefix)
        return sorted(p.name for p in base.iterdir()) if base.is_dir() else []

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
        store = LocalStore(self._path(key))
        array = zarr.create_array(
            store,
            shape=data.shape,
            dtype=data.dtype,
            chunks=chunk_shape(data.shape, data.dtype.itemsize) or None,
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

    def read_array(self, key: str) -> np.ndarray:
        path = self._path(key)
        if not (path / "zarr.json").is_file():
            raise NotFoundError(f"{self.root}: array {key!r} is missing (no zarr.json)")
        array = zarr.open_array(LocalStore(path, read_only=True), mode="r", zarr_format=3)
        expected = array.nchunks
        if array.size and array.nchunks_initialized != expected:
            raise CorruptObjectError(
                f"{self.root}: array {key!r} has {array.nchunks_initialized} of its {expected} chunks; "
                "the registry is damaged: run `deltastore verify` and restore this object from a backup"
            )
        return array[...]

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
