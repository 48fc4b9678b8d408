"""The array layout (specs/format.md §4): how one tensor's bytes are laid out as a zarr v3
array under a key, written through zarr, read back without it.

Backend-neutral: the writer hands zarr the backend's zarr store for the array's key, the
reader fetches ``zarr.json`` and chunk files with the backend's whole and ranged reads. What
is checked here, for every backend: a ``zarr.json`` that ``write_array`` could not have written
is refused before anything is allocated for it (:func:`check_array_metadata`), a zstd frame is
refused when its header declares another size than the chunk's (a zstd bomb), and a chunk
holding more or fewer bytes than the layout says is damage.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import zstandard

from ..dtypes import ARRAY_DTYPES
from ..errors import CorruptObjectError, NotFoundError

if TYPE_CHECKING:
    from concurrent.futures import Future

    from .protocol import Backend

# Arrays are chunked so no chunk exceeds this many bytes: big enough that per-chunk overhead
# is negligible, small enough to stream a 500 MB embedding without holding it twice.
CHUNK_BYTES = 8 << 20
ZSTD_LEVEL = 3
# The largest array one object may declare (16 GiB, 8x a 70B model's embedding in fp16). A
# zarr.json asking for more is refused before zarr allocates anything.
MAX_ARRAY_BYTES = 16 << 30
MAX_ARRAY_DIMS = 8
MAX_ZARR_JSON_BYTES = 1 << 16
MAX_CHUNK_BYTES = 64 << 20
# The one name of an array's metadata. Readers find an array by it, so a backend that cannot
# publish a folder at once (an object store) writes it last and deletes it first.
ARRAY_METADATA = "zarr.json"


def chunk_shape(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunk along the first axis only, at most CHUNK_BYTES per chunk (at least one row)."""
    if not shape:
        return ()
    row_bytes = itemsize * int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else itemsize
    rows = max(1, CHUNK_BYTES // max(1, row_bytes))
    return (max(1, min(shape[0], rows)),) + tuple(shape[1:])


@dataclass(frozen=True)
class ArrayLayout:
    """Where an array's bytes are (specs/format.md §4): chunks along the first axis."""

    key: str
    dtype: np.dtype          # little-endian
    shape: tuple[int, ...]
    chunk_rows: int          # rows of the first axis per chunk (1 for a 0-d array)
    zstd: bool               # each chunk file is one zstd frame (else the raw bytes)
    metadata: bytes = field(default=b"", repr=False, compare=False)  # the zarr.json read

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


# -- writing ----------------------------------------------------------------------------------
def write_array(backend: Backend, key: str, data: np.ndarray, *, compress: bool) -> None:
    """Write ``data`` as a zarr v3 array at ``key`` (every chunk written, even all-zero ones,
    so a missing chunk is always an error, never an implicit fill value).

    ``key`` is a staging key: the array becomes durable and visible when the caller
    publishes it (:meth:`Backend.publish`)."""
    _write_zarr(backend.zarr_store(key), data, compress=compress)


def stored_size(data: np.ndarray, *, compress: bool) -> int:
    """Bytes :func:`write_array` would put on disk for ``data`` (zarr.json and chunks), found by
    writing it to memory: what a byte budget counts before anything is written."""
    from zarr.storage import MemoryStore

    values: dict = {}
    _write_zarr(MemoryStore(values), data, compress=compress)
    return sum(len(v.to_bytes()) for v in values.values())


def _write_zarr(store, data: np.ndarray, *, compress: bool) -> None:
    # Imported here: reads bypass zarr (read_chunk), and importing it costs a read-only
    # command such as `deltastore ls` a third of its start-up.
    import zarr
    import zarr.codecs

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


# -- reading ----------------------------------------------------------------------------------
def read_layout(backend: Backend, key: str, fetched: Future | None = None) -> ArrayLayout:
    """The checked layout of the array at ``key`` (its zarr.json), for :func:`read_chunk`.

    ``fetched``: its zarr.json read ahead (:func:`fetch_metadata`), else it is read now."""
    try:
        if fetched is None:
            raw = backend.get(metadata_key(key), limit=MAX_ZARR_JSON_BYTES)
        else:
            data, size = fetched.result()
            if size > MAX_ZARR_JSON_BYTES:  # as Backend.get refuses it
                raise CorruptObjectError(f"{backend.root}: object {metadata_key(key)!r} holds {size} bytes, more than "
                                         f"the {MAX_ZARR_JSON_BYTES} such an object may have; it is damaged or was "
                                         "not written by deltastore")
            raw = bytes(data)
    except NotFoundError:
        raise NotFoundError(f"{backend.root}: array {key!r} is missing (no zarr.json)") from None
    meta = check_array_metadata(raw, f"{backend.root}: array {key!r}")
    shape = tuple(meta["shape"])
    chunk = meta["chunk_grid"]["configuration"]["chunk_shape"]
    return ArrayLayout(key, np.dtype(meta["data_type"]).newbyteorder("<"), shape, chunk[0] if shape else 1,
                       meta["codecs"][-1]["name"] == "zstd", raw)


def metadata_key(key: str) -> str:
    return f"{key}/{ARRAY_METADATA}"


def fetch_metadata(backend: Backend, key: str) -> Future | None:
    """Start reading the zarr.json of the array at ``key`` ahead (:meth:`Backend.fetch`), for
    :func:`read_layout`; None where the backend reads in place."""
    return backend.fetch(metadata_key(key), limit=MAX_ZARR_JSON_BYTES)


def chunk_file_limit(layout: ArrayLayout) -> int:
    """Bytes of a chunk file worth reading: the whole raw chunk, or one byte more than the
    largest zstd frame of a chunk can be (so a longer file is seen, and refused)."""
    return _zstd_bound(layout) + 1 if layout.zstd else layout.chunk_nbytes


def _zstd_bound(layout: ArrayLayout) -> int:
    return layout.chunk_nbytes + (layout.chunk_nbytes >> 7) + 1024  # above zstd's worst case


def chunk_key(layout: ArrayLayout, index: int) -> str:
    return f"{layout.key}/{layout.chunk(index)[0]}"


def read_chunk(backend: Backend, layout: ArrayLayout, index: int, out: memoryview,
               fetched: Future | None = None) -> None:
    """Decode chunk ``index`` of an array into ``out``: exactly the chunk's bytes that lie
    inside the array (specs/format.md §4: the last chunk's padding is dropped).

    ``fetched``: the chunk file read ahead (:meth:`Backend.fetch` of :func:`chunk_key` with
    :func:`chunk_file_limit`); without it the file is read now, a raw one straight into ``out``.

    Reads bypass zarr: ``zstandard`` releases the GIL and decodes straight into the caller's
    buffer (a pinned staging slot on CUDA), so reader threads decode in parallel and no
    other host copy of the array is made."""
    name, _, valid = layout.chunk(index)
    key = f"{layout.key}/{name}"
    where = f"{backend.root}: array {layout.key!r}, chunk {name}"
    out = out.cast("B")
    if len(out) != valid:
        raise ValueError(f"{where}: buffer of {len(out)} bytes for {valid} bytes of chunk")
    bound = _zstd_bound(layout)
    try:
        if fetched is not None:
            data, size = fetched.result()
            frame = memoryview(data)
        elif not layout.zstd:
            got = backend.get_into(key, out)
            size = backend.size(key)
        else:
            buffer = _frame_buffer(bound + 1)
            frame = buffer[:backend.get_into(key, buffer)]
            size = len(frame)
    except NotFoundError:
        raise CorruptObjectError(f"{where} is missing; the registry is damaged: run `deltastore verify` and "
                                 "restore this object from a backup") from None
    if not layout.zstd:
        if size != layout.chunk_nbytes:
            raise CorruptObjectError(f"{where}: holds {size} bytes, expected {layout.chunk_nbytes}; "
                                     "run `deltastore verify` and restore it from a backup")
        if fetched is not None:
            got = min(len(frame), valid)
            out[:got] = frame[:got]
        if got != valid:
            raise CorruptObjectError(f"{where}: ends after {got} of {valid} bytes; run `deltastore verify` "
                                     "and restore it from a backup")
        return
    if size > bound:
        raise CorruptObjectError(f"{where}: holds over {bound} bytes, more than a zstd frame of "
                                 f"{layout.chunk_nbytes} bytes can; restore it from a backup")
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


# -- checks -----------------------------------------------------------------------------------
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
