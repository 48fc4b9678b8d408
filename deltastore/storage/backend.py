"""``LocalBackend``: a registry in a folder of a local POSIX filesystem, the first
implementation of :class:`~deltastore.storage.protocol.Backend`.

How it keeps the protocol's guarantees on a filesystem: a whole-key write goes to a temporary
file in the same folder, is fsynced and renamed into place (atomic on POSIX), then the folder
is fsynced; a create-only write links the temporary file to its name (``link`` fails if the
name exists, atomically); a staged array folder is fsynced file by file, then renamed; every
read opens the file without blocking and checks on the open descriptor that it is a regular
file; a folder of the layout replaced by a file or a symlink is raised as damage, never
followed. Its locks are in storage/locks.py; its compare-and-swap holds the ``refs`` lock.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import uuid
from pathlib import Path

from ..errors import CorruptObjectError, NotFoundError
from .layout import ARRAY_METADATA, zstd_content_size
from .locks import FileLocks
from .protocol import MAX_KEY_BYTES

# zstd_content_size lives in layout.py; it is also importable from here, where it lived before
# the split and where the reliability suites (tests/reliability/test_hostile.py) import it.
__all__ = ["LocalBackend", "open_regular", "zstd_content_size"]


class LocalBackend:
    """A registry directory on a local POSIX filesystem."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"LocalBackend({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def _where(self, key: str) -> str:
        return f"{self.root}: object {key!r}"

    # -- reading ----------------------------------------------------------------------------
    def get(self, key: str, *, limit: int = MAX_KEY_BYTES) -> bytes:
        """The bytes of ``key``; more than ``limit`` bytes is an error, raised before reading."""
        where = self._where(key)
        with open_regular(self._path(key), where) as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > limit:
                raise CorruptObjectError(f"{where} holds {size} bytes, more than the {limit} such an object may "
                                         "have; it is damaged or was not written by deltastore")
            return fh.read(limit)

    def get_into(self, key: str, out: memoryview, *, start: int = 0) -> int:
        """Read bytes ``[start, start + len(out))`` of ``key`` into ``out``; return the count."""
        out = out.cast("B")
        with open_regular(self._path(key), self._where(key)) as fh:
            if start:
                fh.seek(start)
            pos = 0
            while pos < len(out):
                n = fh.readinto(out[pos:])
                if not n:
                    break
                pos += n
            return pos

    def fetch(self, key: str, *, limit: int) -> None:
        """None: a local file is read in place with :meth:`get_into` (straight into the caller's
        buffer, no round trip to hide), never ahead into a buffer of its own."""
        return None

    def get_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        """The bytes of ``key`` and their SHA-256 as the version token; ``(None, None)`` if absent.

        A content hash, not the inode or mtime: a rename gives a new inode, but inode numbers
        are reused and mtimes are coarse, so either could let a stale token match."""
        try:
            data = self.get(key)
        except NotFoundError:
            return None, None
        return data, hashlib.sha256(data).hexdigest()

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def size(self, key: str) -> int:
        """Apparent bytes of a key, or of every file under a prefix (what ``du -sb`` counts)."""
        path = self._path(key)
        if path.is_file():
            return path.stat().st_size
        if not path.is_dir():
            return 0
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

    def modified(self, key: str) -> float | None:
        """The file's mtime, or the newest under a folder; None when nothing is there."""
        path = self._path(key)
        if path.is_file():
            return path.stat().st_mtime
        return max((t for _, t in self.list_modified(key)), default=None) if path.is_dir() else None

    # -- listing ----------------------------------------------------------------------------
    def list(self, prefix: str) -> list[str]:
        """Keys of the files directly or indirectly under ``prefix`` (sorted)."""
        return [key for key, _ in self.list_modified(prefix)]

    def list_modified(self, prefix: str) -> list[tuple[str, float]]:
        """``(key, mtime)`` of the files directly or indirectly under ``prefix`` (sorted by key)."""
        base = self._folder(prefix)
        if base is None:
            return []
        found = []
        for path in base.rglob("*"):
            try:
                if path.is_file():
                    found.append((path.relative_to(self.root).as_posix(), path.stat().st_mtime))
            except FileNotFoundError:
                continue  # removed while listed (a concurrent gc or publish)
        return sorted(found)

    def children(self, prefix: str) -> list[str]:
        """Names of the entries directly under ``prefix`` (sorted)."""
        base = self._folder(prefix)
        return sorted(p.name for p in base.iterdir()) if base is not None else []

    def prefix_exists(self, prefix: str) -> bool:
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

    # -- writing ----------------------------------------------------------------------------
    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` under ``key`` atomically (temp file, fsync, rename, fsync of the folder)."""
        path = self._path(key)
        tmp = self._temp_copy(path, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a failed write leaves nothing behind (a killed one: gc's job)
            raise
        _fsync_dir(path.parent)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Write ``data`` under ``key`` unless it exists: the temp file is hard-linked to the name,
        which fails atomically when the name is taken (no lock, no window between check and write)."""
        path = self._path(key)
        tmp = self._temp_copy(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)
        return True

    def put_if_version(self, key: str, data: bytes, version: str | None) -> bool:
        """Compare-and-swap under the ``refs`` lock, which every ref read-modify-write holds
        (so it also excludes writers that take the lock instead). Callers must not hold that
        lock themselves: a ``flock`` taken twice by one process waits for itself."""
        with FileLocks(self.root).hold("refs"):
            if self.get_versioned(key)[1] != version:
                return False
            self.put(key, data)
            return True

    def _temp_copy(self, path: Path, data: bytes) -> Path:
        """``data`` in a fsynced temp file beside ``path`` (named ``.<name>.<uuid>.tmp``, what gc
        removes when a killed write leaves one)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def publish(self, staged: str, final: str) -> bool:
        """Move a fully written staged object (file or array folder) to its final key.

        Returns False when ``final`` already exists (same content, written by someone else):
        the staged copy is dropped. A rename is atomic on POSIX, so the final key is either
        absent or complete; an array folder without its metadata there is damage (the writer
        found it unreadable), removed and replaced, as an object store writes over the chunks
        of a killed publish.
        """
        src, dst = self._path(staged), self._path(final)
        if dst.is_dir() and not (dst / ARRAY_METADATA).exists():
            self.delete(final)
        if dst.exists():
            self.delete(staged)
            return False
        # A staged array's chunks (written by zarr, not fsynced) reach the disk before the
        # array is published, so a power cut cannot leave a published name pointing at empty
        # chunk files. A staged file was fsynced by put.
        if src.is_dir():
            for file in sorted(src.rglob("*")):
                if file.is_file():
                    with open(file, "rb") as fh:
                        os.fsync(fh.fileno())
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

    def zarr_store(self, prefix: str):
        """zarr's LocalStore rooted at ``prefix``'s folder (zarr imported here, on first write:
        a read-only command never pays for importing it)."""
        from zarr.storage import LocalStore

        return LocalStore(self._path(prefix))


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
