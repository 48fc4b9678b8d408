"""The on-disk format: the checked-in reference registry read back two ways, and format checks.

1. ``deltastore`` opens ``specs/reference/registry`` and materializes every task version to
   exactly the tensors in ``specs/reference/expected``; ``verify()`` is clean.
2. :class:`SpecReader`, a minimal reader written from specs/format.md and
   specs/compressors/*.md alone (json, msgpack, numpy, hashlib, numcodecs' zstd; no zarr,
   no torch, no deltastore), rebuilds the same tensors bit for bit. It is the proof that the
   spec is complete: if it needs something the spec does not say, fix the spec.
3. Version checks: a newer registry or record format is refused with a FormatVersionError;
   an unknown codec is refused; an edited record not stored under its new hash is corrupt.
4. The fields of registry.msgpack and of the refs are exactly the spec's lists.
5. Records are canonically encoded: an encoder written from format.md 5.0 reproduces every
   stored record's bytes; the test vectors of the spec hold.
6. What readers MUST refuse or accept beyond the reference registry (a base vector of another
   reference, a delta of another shape, absent optional fields, a 1-d delta), both readers alike.

The reference registry is rebuilt by ``python specs/reference/make.py`` (specs/reference/README.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zstandard
from numcodecs import Zstd

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "specs" / "reference"
REGISTRY = REFERENCE / "registry"
EXPECTED = REFERENCE / "expected"
VERSIONS = [("alpha", 1), ("alpha", 2), ("beta", 1), ("beta", 2), ("delta", 1), ("delta", 2), ("delta", 3),
            ("gamma", 1), ("gamma", 2)]


# ==========================================================================================
# An independent reader, from the spec alone
# ==========================================================================================

class SpecError(Exception):
    """The reader refuses the registry (corrupt, unsupported or newer format)."""


FORMAT_MAJOR = 1
HASH_RE = re.compile(r"^[0-9a-f]{64}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# format.md section 5: every field of every record kind, (required, optional); config, arrays and
# attrs are optional since 1.2 (section 5.2).
ENTRY_FIELDS = ({"shape", "dtype", "codec"},
                {"config", "arrays", "attrs", "ref", "rows", "changed_rows", "lam1", "lam2"})
RECORD_FIELDS = {
    "reference": {"created", "tensors", "files"},
    "base": {"name", "created", "reference", "sources", "tensors"},
    "task_version": {"task", "version", "parent", "created", "message", "reference", "base", "method", "config",
                     "lam1", "lam2", "tuning", "tensors", "files", "source"},
    "pointer": {"record"},
    "task_ref": {"versions"},
}
RECORD_OPTIONAL = {"task_ref": {"issued"}, "task_version": {"pack", "ref_prefix", "bundle", "bundled"}}  # 1.1-1.3
PACKED_CODECS = ("packed", "xor")  # section 5.8
INFO_FIELDS = {"name", "version", "created"}

# format.md section 4.
ARRAY_TYPES = {"uint8", "int8", "int16", "uint16", "int32", "int64", "float16", "float32"}
# compressors/lossless.md: tensor dtype -> carrier.
CARRIER = {"bool": "uint8", "uint8": "uint8", "int8": "uint8", "float16": "int16", "bfloat16": "int16",
           "int16": "int16", "float32": "int32", "int32": "int32", "float64": "int64", "int64": "int64"}
# How this reader holds a tensor of each dtype in numpy (bfloat16 as its uint16 bit patterns).
HOLDER = {"bool": np.bool_, "uint8": np.uint8, "int8": np.int8, "float16": np.float16, "bfloat16": np.uint16,
          "int16": np.int16, "float32": np.float32, "int32": np.int32, "float64": np.float64, "int64": np.int64}
FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64"}
# format.md section 5.8 (since 1.4): the narrower float types an xor entry's reference may have.
WIDENS = {"float32": ("bfloat16", "float16"), "float64": ("bfloat16", "float16", "float32")}


def record_content(stored: bytes) -> bytes:
    """format.md section 3.1: a record file is its msgpack bytes, or (since 1.3) one zstd frame of them."""
    if stored[:4] != bytes.fromhex("28b52ffd"):
        return stored
    return bytes(Zstd().decode(stored))


def _unpack(data: bytes, what: str) -> dict:
    """format.md section 5: a msgpack map with string keys, bounded, no ext types."""
    if len(data) > 64 << 20:
        raise SpecError(f"{what}: record over 64 MiB")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_str_len=1 << 20, max_bin_len=1 << 20,
                              max_ext_len=0)
    except Exception as exc:
        raise SpecError(f"{what}: not msgpack ({exc})") from None
    if not isinstance(obj, dict):
        raise SpecError(f"{what}: not a map")
    return obj


def file_name_ok(rel: str) -> bool:
    """format.md 2.1: parts split at '/', none empty, '.' or '..'; no '\\', ':' or C0/DEL
    character; at most 255 bytes a part and 4096 in all (UTF-8)."""
    parts = rel.split("/")
    return (all(p not in ("", ".", "..") and len(p.encode()) <= 255 for p in parts) and len(rel.encode()) <= 4096
            and not any(c in "\\:" or ord(c) < 0x20 or ord(c) == 0x7F for c in rel))


def absent_values(record: dict, kind: str, name: str, entry: dict) -> dict:
    """Section 5.2: what the absent optional fields of tensor entry ``name`` of ``record`` mean."""
    out = {"arrays": {}, "attrs": {}, "config": {}, "ref": None, "rows": None, "changed_rows": None, "lam1": None,
           "lam2": None}
    if kind == "task_version":
        if entry["codec"] == record["method"]:
            out["config"] = record["config"]
        if entry["codec"] in (record["method"], "xor"):
            prefix = record.get("ref_prefix", "")
            out["ref"] = name[len(prefix):] if prefix and name.startswith(prefix) else name
    return out


def _fields(obj: dict, required: set, optional: set, what: str) -> None:
    missing, extra = required - set(obj), set(obj) - required - optional
    if missing or extra:
        raise SpecError(f"{what}: missing fields {sorted(missing)}, unknown fields {sorted(extra)}")


# -- section 7: bit packing ----------------------------------------------------------------
def unpack_bits(packed: np.ndarray, n: int) -> np.ndarray:
    if packed.dtype != np.uint8 or packed.ndim != 1 or packed.size != (n + 7) // 8:
        raise SpecError(f"packed bits: expected uint8 ({(n + 7) // 8},), found {packed.dtype} {packed.shape}")
    bits = (packed[:, None] >> np.arange(8, dtype=np.uint8)[None, :]) & 1  # bit i mod 8 of byte i div 8
    return bits.reshape(-1)[:n].astype(bool)


# -- section 8: pseudo-random function ------------------------------------------------------
def mix(x: np.ndarray) -> np.ndarray:
    """lowbias32 on a uint32 array (numpy array arithmetic wraps modulo 2**32)."""
    x = np.asarray(x, dtype=np.uint32)
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def seed_for(global_seed: int, name: str) -> int:
    """The per-tensor seed writers derive: mix(fnv1a32(name) XOR global seed)."""
    h = 0x811C9DC5
    for byte in name.encode("utf-8"):
        h = ((h ^ byte) * 0x01000193) % (1 << 32)
    return int(mix(np.array([h ^ global_seed], dtype=np.uint32))[0])


def prf(seed: int, count: int) -> np.ndarray:
    """r(seed, i) for i = 0 .. count-1, as uint64."""
    if count > 1 << 32:
        raise SpecError("a matrix addressed by r(s, i) must have fewer than 2**32 elements")
    s = mix(np.array([seed], dtype=np.uint32))
    return mix(mix(np.arange(count, dtype=np.uint32)) ^ s).astype(np.uint64)


# -- float conversions (IEEE 754, round to nearest even) ------------------------------------
def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    b = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)  # NaN: the canonical quiet NaN


def to_f32(dtype: str, value: np.ndarray) -> np.ndarray:
    return bf16_to_f32(value) if dtype == "bfloat16" else value.astype(np.float32)


def from_f32(dtype: str, value: np.ndarray) -> np.ndarray:
    if dtype == "bfloat16":
        return f32_to_bf16(value)
    if dtype not in ("float16", "float32", "float64"):
        raise SpecError(f"a delta entry must have a float dtype, found {dtype}")
    with np.errstate(over="ignore"):  # beyond the range: an infinity, as format.md section 6 says
        return value.astype(HOLDER[dtype])


# -- compressor pages -----------------------------------------------------------------------
def _config(config: dict, fields: dict, what: str) -> dict:
    """A compressor configuration: only listed fields, defaults for absent ones."""
    unknown = set(config) - set(fields)
    if unknown:
        raise SpecError(f"{what}: unknown configuration fields {sorted(unknown)}")
    return {**fields, **config}


def decode_bitdelta(arrays: dict, attrs: dict, config: dict, rows: int, cols: int) -> np.ndarray:
    _config(config, {}, "bitdelta")
    n = rows * cols
    bits = unpack_bits(arrays["signs"], n)
    alpha = np.float32(attrs["scale"])
    return np.where(bits, alpha, -alpha).astype(np.float32).reshape(rows, cols)


def dare_gaps_kept(seed: int, threshold: int, n: int) -> np.ndarray:
    """dare.md, layout gaps: the survival table, then each block's gaps, in exact integers."""
    survival = [2**32]
    while survival[-1] * (2**32 - threshold) // 2**32 > 0:
        survival.append(survival[-1] * (2**32 - threshold) // 2**32)
    table = np.array(survival, dtype=np.uint64)
    kept = []
    for start in range(0, n, 65536):
        length, pos, t = min(65536, n - start), -1, 0
        while pos < length - 1:
            u = mix(mix(np.array([start + t], dtype=np.uint32)) ^ mix(np.array([seed], dtype=np.uint32)))[0]
            pos, t = pos + int(np.count_nonzero(np.uint64(u) < table)), t + 1
            if pos < length:
                kept.append(start + pos)
    return np.array(kept, dtype=np.int64)


def decode_dare(arrays: dict, attrs: dict, config: dict, rows: int, cols: int) -> np.ndarray:
    config = _config(config, {"drop_rate": 0.99, "value_bits": 16, "layout": "hash"}, "dare")
    if not 0 <= config["drop_rate"] < 1 or config["value_bits"] not in (16, 8) or \
            config["layout"] not in ("hash", "gaps"):
        raise SpecError(f"dare: configuration out of range {config}")
    seed, threshold = int(attrs["seed"]), int(attrs["keep_threshold"])
    if not 0 <= seed < 2**32 or not (2**16 if config["layout"] == "gaps" else 0) <= threshold <= 2**32:
        raise SpecError(f"dare: attrs out of range {attrs}")
    values = arrays["values"]
    bits = config["value_bits"]
    if values.ndim != 1 or values.dtype != (np.float16 if bits == 16 else np.int8):
        raise SpecError(f"dare: values are {values.dtype} {values.shape}")
    if bits == 8:
        scales = arrays["scales"]
        if scales.dtype != np.float32 or scales.shape != (rows,):
            raise SpecError("dare: bad scales")
    if config["layout"] == "gaps":
        flat = dare_gaps_kept(seed, threshold, rows * cols)
    else:
        flat = np.nonzero(prf(seed, rows * cols) < np.uint64(threshold))[0]  # increasing flat index i
    if flat.size != values.size:
        raise SpecError(f"dare: the mask keeps {flat.size} values, {values.size} are stored")
    out = np.zeros(rows * cols, dtype=np.float32)
    if bits == 16:
        out[flat] = values.astype(np.float32)
    else:
        out[flat] = values.astype(np.float32) * scales[flat // cols]
    return out.reshape(rows, cols)


def decode_deltadq(arrays: dict, attrs: dict, config: dict, rows: int, cols: int) -> np.ndarray:
    config = _config(config, {"group_size": 16, "keep": 2, "bits": 4, "stored_planes": None}, "deltadq")
    g, k, b = config["group_size"], config["keep"], config["bits"]
    if not (1 <= g <= 65536 and 1 <= k <= g and 1 <= b <= 8):
        raise SpecError(f"deltadq: configuration out of range {config}")
    # Step 1: kept positions, exactly min(k, L) per group, smallest key r(s, i) * 2**16 + p.
    keys = prf(int(attrs["seed"]), rows * cols).reshape(rows, cols) * np.uint64(1 << 16)
    keys += (np.arange(cols, dtype=np.uint64) % np.uint64(g))[None, :]
    kept = np.zeros((rows, cols), dtype=bool)
    for c0 in range(0, cols, g):
        group = keys[:, c0:c0 + g]
        chosen = np.argsort(group, axis=1)[:, :min(k, group.shape[1])]
        np.put_along_axis(kept[:, c0:c0 + g], chosen, True, axis=1)
    n_kept = int(kept.sum())
    k_row = (cols // g) * k + min(k, cols % g)
    assert n_kept == rows * k_row
    # Step 2: planes {l .. b-1}.
    planes = sorted(int(role[5:]) for role in arrays if role.startswith("plane"))
    if set(arrays) - {f"plane{j}" for j in planes} - {"scales"}:
        raise SpecError(f"deltadq: unknown arrays {sorted(arrays)}")
    if not planes or planes != list(range(planes[0], b)):
        raise SpecError(f"deltadq: planes {planes} are not a top range of 0..{b - 1}")
    low = planes[0]
    scales = arrays["scales"]
    if scales.dtype != np.float32 or scales.shape != (rows,):
        raise SpecError("deltadq: bad scales")
    # Step 3: codes, missing low bits at the midpoint of their range.
    u = np.zeros(n_kept, dtype=np.int64)
    for j in planes:
        u |= unpack_bits(arrays[f"plane{j}"], n_kept).astype(np.int64) << j
    c = (u.astype(np.float32) + np.float32(((1 << low) - 1) / 2)).astype(np.float32)
    # Step 4: values, each float32 operation rounded on its own.
    flat = np.nonzero(kept.reshape(-1))[0]
    a = scales[flat // cols]
    step = (np.float32(2) * a) / np.float32((1 << b) - 1)
    out = np.zeros(rows * cols, dtype=np.float32)
    out[flat] = c * step - a
    return out.reshape(rows, cols)


DELTA_CODECS = {"bitdelta": decode_bitdelta, "dare": decode_dare, "deltadq": decode_deltadq}


class SpecReader:
    """Reads a deltastore registry using only specs/format.md and specs/compressors/*.md."""

    def __init__(self, root: Path):
        self.root = Path(root)
        info = _unpack((self.root / "registry.msgpack").read_bytes(), "registry.msgpack")
        _fields(info, INFO_FIELDS, set(), "registry.msgpack")
        if info["name"] != "deltastore":
            raise SpecError("registry.msgpack: not a deltastore registry")
        major, minor = info["version"]
        if major > FORMAT_MAJOR:
            raise SpecError(f"registry.msgpack: format {major}.{minor}, this reader reads {FORMAT_MAJOR}.x")
        self._arrays: dict[str, np.ndarray] = {}

    # -- objects (sections 2, 3) ------------------------------------------------------------
    def _object(self, kind: str, digest: str) -> Path:
        if not HASH_RE.match(digest):
            raise SpecError(f"{digest!r} is not an object name")
        return self.root / "objects" / kind / digest[:2] / digest[2:]

    def _check_record(self, obj: dict, what: str) -> str:
        if not isinstance(obj.get("format"), int) or obj["format"] > FORMAT_MAJOR:
            raise SpecError(f"{what}: format {obj.get('format')!r}, this reader reads {FORMAT_MAJOR}")
        kind = obj.get("kind")
        if kind not in RECORD_FIELDS:
            raise SpecError(f"{what}: unknown kind {kind!r}")
        _fields(obj, RECORD_FIELDS[kind] | {"format", "kind"}, RECORD_OPTIONAL.get(kind, set()), what)
        for name, entry in obj.get("tensors", {}).items():
            _fields(entry, *ENTRY_FIELDS, f"{what}.tensors[{name!r}]")
            if entry["codec"] != "lossless" and entry["codec"] not in PACKED_CODECS + tuple(DELTA_CODECS):
                raise SpecError(f"{what}.tensors[{name!r}]: unknown codec {entry['codec']!r}")
            for field, value in absent_values(obj, kind, name, entry).items():  # section 5.2
                entry.setdefault(field, value)
        return kind

    def record(self, digest: str, kind: str) -> dict:
        data = record_content(self._object("records", digest).read_bytes())
        if hashlib.sha256(data).hexdigest() != digest:
            raise SpecError(f"record {digest}: content hash mismatch")
        obj = _unpack(data, f"record {digest}")
        if self._check_record(obj, f"record {digest}") != kind:
            raise SpecError(f"record {digest}: expected kind {kind}, found {obj['kind']}")
        return obj

    def ref(self, key: str, kind: str) -> dict:
        if not NAME_RE.match(key.rsplit("/", 1)[-1]) or ".." in key:
            raise SpecError(f"refs/{key}: not a valid name")
        obj = _unpack((self.root / "refs" / key).read_bytes(), f"refs/{key}")
        if self._check_record(obj, f"refs/{key}") != kind:
            raise SpecError(f"refs/{key}: expected kind {kind}")
        return obj

    def blob(self, digest: str, *, patch_allowed: bool = True) -> bytes:
        """Section 3.3: one zstd frame, or a skippable frame naming a dictionary blob and its
        transform followed by a zstd frame that needs that dictionary."""
        stored = self._object("blobs", digest).read_bytes()
        if stored[:4] == bytes.fromhex("502a4d18"):
            size = int.from_bytes(stored[4:8], "little")
            header, frame = stored[8:8 + size], stored[8 + size:]
            lines = header.split(b"\n")
            if not patch_allowed or len(lines) != 3 or lines[0] != b"deltastore-patch":
                raise SpecError(f"blob {digest}: not a patch of a plain blob")
            transform, base = lines[1].decode(), self.blob(lines[2].decode(), patch_allowed=False)
            if transform == "json":
                base = json.dumps(json.loads(base.decode("utf-8")), indent=2, ensure_ascii=False).encode("utf-8")
            elif transform != "raw":
                raise SpecError(f"blob {digest}: unknown transform {transform!r}")
            dictionary = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
            data = zstandard.ZstdDecompressor(dict_data=dictionary).decompress(frame)
        else:
            data = bytes(Zstd().decode(stored))
        if hashlib.sha256(data).hexdigest() != digest:
            raise SpecError(f"blob {digest}: content hash mismatch")
        return data

    def array(self, digest: str) -> np.ndarray:
        """A zarr v3 array (section 4), assembled from its chunk files and rehashed (3.2)."""
        if digest in self._arrays:
            return self._arrays[digest]
        folder = self._object("arrays", digest)
        meta = json.loads((folder / "zarr.json").read_bytes())
        assert meta["zarr_format"] == 3 and meta["node_type"] == "array"
        dtype, shape = meta["data_type"], tuple(meta["shape"])
        if dtype not in ARRAY_TYPES:
            raise SpecError(f"array {digest}: data type {dtype}")
        assert meta["chunk_grid"]["name"] == "regular"
        chunk = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        assert len(chunk) == len(shape) and chunk[1:] == shape[1:]
        assert meta["chunk_key_encoding"]["name"] == "v2"
        separator = meta["chunk_key_encoding"].get("configuration", {}).get("separator", ".")
        assert separator == "."
        assert meta["fill_value"] == 0
        codecs = [c["name"] for c in meta["codecs"]]
        assert codecs in (["bytes"], ["bytes", "zstd"]), codecs
        endian = meta["codecs"][0].get("configuration", {}).get("endian")
        item = np.dtype(dtype).newbyteorder("<")
        assert endian == "little" or (endian is None and item.itemsize == 1)
        # Chunk keys: chunk grid indices joined by "." ("0" for a 0-d array); every chunk holds
        # the full chunk shape, the last one padded past the end of the first axis.
        if not shape:
            keys = ["0"]
        elif math.prod(shape) == 0:
            keys = []  # an array of no elements has no chunk files
        else:
            keys = [".".join([str(c)] + ["0"] * (len(shape) - 1)) for c in range(math.ceil(shape[0] / chunk[0]))]
        parts = []
        for key in keys:
            raw = (folder / key).read_bytes()  # a missing chunk is corruption, never zeros
            if codecs[-1] == "zstd":
                raw = bytes(Zstd().decode(raw))
            part = np.frombuffer(raw, dtype=item)
            assert part.size == math.prod(chunk), f"array {digest}: chunk {key} has {part.size} elements"
            parts.append(part.reshape(chunk))
        if shape:
            data = np.concatenate(parts)[:shape[0]] if parts else np.zeros(shape, dtype=item)
        else:
            data = parts[0].reshape(())
        data = np.require(data, requirements="C").astype(np.dtype(dtype))  # ascontiguousarray makes 0-d 1-d
        header = f"deltastore-array\n{dtype}\n{','.join(map(str, shape))}\n".encode("ascii")
        if hashlib.sha256(header + data.astype(item).tobytes()).hexdigest() != digest:
            raise SpecError(f"array {digest}: content hash mismatch")
        self._arrays[digest] = data
        return data

    def check_all_objects(self) -> int:
        """Section 3: rehash every stored object; returns how many there are."""
        count = 0
        for kind in ("records", "arrays", "blobs"):
            for prefix in sorted((self.root / "objects" / kind).iterdir()):
                for rest in sorted(prefix.iterdir()):
                    digest = prefix.name + rest.name
                    if kind == "records":
                        data = record_content(rest.read_bytes())
                        assert hashlib.sha256(data).hexdigest() == digest, digest
                        self._check_record(_unpack(data, digest), digest)
                    elif kind == "arrays":
                        self.array(digest)
                    else:
                        self.blob(digest)
                    count += 1
        return count

    # -- tensors (section 6) ----------------------------------------------------------------
    def lossless(self, entry: dict) -> np.ndarray:
        _config(entry["config"], {}, "lossless")
        dtype = entry["attrs"]["dtype"]
        if dtype not in CARRIER or dtype != entry["dtype"]:
            raise SpecError(f"lossless: dtype {dtype!r} (entry says {entry['dtype']!r})")
        data = self.array(entry["arrays"]["data"])
        if data.dtype != np.dtype(CARRIER[dtype]) or data.shape != tuple(entry["shape"]):
            raise SpecError(f"lossless: data is {data.dtype} {data.shape}")
        return data != 0 if dtype == "bool" else data.view(HOLDER[dtype])

    @staticmethod
    def widened(values: np.ndarray, dtype: str, to: str) -> np.ndarray:
        """Section 5.8 (since 1.4): a reference tensor's values converted exactly to the wider
        float type ``to`` (bfloat16 is the top half of a float32's bits); NaN is refused."""
        if dtype == to:
            return values
        if dtype == "bfloat16":
            values = (values.astype(np.uint32) << 16).view(np.float32)
        if np.isnan(values).any():
            raise SpecError(f"an xor entry's {dtype} reference tensor holds NaN")
        return values.astype(HOLDER[to])

    def delta_rows(self, entry: dict) -> tuple[np.ndarray, np.ndarray]:
        """(row mask m, float32 C of shape (count(m), cols)) of a delta entry."""
        shape = entry["shape"]
        rows_total, cols = shape[0], math.prod(shape[1:])
        if entry.get("rows") is None:
            m = np.ones(rows_total, dtype=bool)
        else:
            m = unpack_bits(self.array(entry["rows"]), rows_total)
        if entry.get("changed_rows") is not None and int(m.sum()) != entry["changed_rows"]:
            raise SpecError("changed_rows does not match the row mask")
        arrays = {role: self.array(h) for role, h in entry["arrays"].items()}
        c = DELTA_CODECS[entry["codec"]](arrays, entry["attrs"], entry["config"], int(m.sum()), cols)
        return m, c

    def packed(self, version: dict, reference: dict) -> dict[str, np.ndarray]:
        """Section 5.8: every packed entry's carrier values, un-shuffled and XORed back."""
        names = sorted(n for n, e in version["tensors"].items() if e["codec"] in PACKED_CODECS)
        if not names:
            return {}
        data, out, start = self.array(version["pack"]), {}, 0
        assert data.dtype == np.uint8 and data.ndim == 1
        for name in names:
            entry = version["tensors"][name]
            if entry["config"] or entry["arrays"] or entry["attrs"] or entry.get("rows") is not None or \
                    (entry["codec"] == "xor") != (entry.get("ref") is not None):
                raise SpecError(f"packed entry {name!r} with fields of its own arrays, or a ref it may not have")
            carrier = np.dtype(CARRIER[entry["dtype"]]).newbyteorder("<")
            n = math.prod(entry["shape"])
            size = n * carrier.itemsize
            values = data[start:start + size].reshape(carrier.itemsize, n).T.copy().view(carrier).reshape(-1)
            start += size
            if entry["codec"] == "xor":
                ref = reference["tensors"].get(entry["ref"])
                if ref is None or (ref["codec"], ref["shape"]) != ("lossless", entry["shape"]) or (
                        ref["dtype"] != entry["dtype"] and ref["dtype"] not in WIDENS.get(entry["dtype"], ())):
                    raise SpecError(f"packed entry {name!r}: no reference tensor of its shape, and dtype or a "
                                    f"narrower float one")
                widened = self.widened(self.lossless(ref), ref["dtype"], entry["dtype"])
                values = values ^ widened.view(carrier).reshape(-1)
            values = values.reshape(entry["shape"])
            out[name] = values != 0 if entry["dtype"] == "bool" else values.view(HOLDER[entry["dtype"]])
        if start != data.size:
            raise SpecError(f"the pack holds {data.size} bytes, its entries {start}")
        return out

    def tensor(self, entry: dict, version: dict, reference: dict, base: dict | None) -> np.ndarray:
        if entry["codec"] == "lossless":
            return self.lossless(entry)
        shape, ref_name = entry["shape"], entry.get("ref")
        if ref_name is None or entry["dtype"] not in FLOAT_DTYPES:
            raise SpecError(f"a delta entry needs a ref and a float dtype, found {ref_name!r}, {entry['dtype']}")
        ref_entry = reference["tensors"].get(ref_name)
        if ref_entry is None or ref_entry["dtype"] not in FLOAT_DTYPES or ref_entry["shape"] != shape or not shape:
            raise SpecError(f"a delta entry adds to a float reference tensor of its own shape (1-d or more), "
                            f"found {ref_entry and (ref_entry['dtype'], ref_entry['shape'])} for {shape}")
        rows_total, cols = shape[0], math.prod(shape[1:])
        w_pre = to_f32(ref_entry["dtype"], self.lossless(ref_entry)).reshape(rows_total, cols)
        m, c = self.delta_rows(entry)
        lam1 = np.float32(version["lam1"] if entry.get("lam1") is None else entry["lam1"])
        lam2 = np.float32(version["lam2"] if entry.get("lam2") is None else entry["lam2"])
        u = lam2 * c
        if base is not None and ref_name in base["tensors"]:
            b = base["tensors"][ref_name]
            if (b["codec"], b["dtype"], b["shape"], b.get("ref")) != ("bitdelta", "float32", shape, ref_name):
                raise SpecError("a base vector entry must be a bitdelta float32 delta of the task entry's shape")
            bm, bc = self.delta_rows(b)
            t = np.zeros((rows_total, cols), dtype=np.float32)
            t[bm] = bc
            u = u + lam1 * t[m]
        out = w_pre.copy()
        out[m] = w_pre[m] + u
        assert out.dtype == np.float32 and u.dtype == np.float32
        return from_f32(entry["dtype"], out).reshape(shape)

    def unbundle(self, version: dict) -> None:
        """Section 5.9: the arrays of the version's bundle, each rehashed to its name."""
        bundled = version.get("bundled", [])
        if (version.get("bundle") is None) != (not bundled):
            raise SpecError("a bundle without bundled arrays, or bundled arrays without a bundle")
        if not bundled:
            return
        data, start = self.array(version["bundle"]), 0
        if data.dtype != np.uint8 or data.ndim != 1:
            raise SpecError(f"bundle is {data.dtype} {data.shape}, expected uint8 of one dimension")
        for name, dtype, shape in bundled:
            if dtype not in ARRAY_TYPES:
                raise SpecError(f"bundled array {name}: data type {dtype}")
            item = np.dtype(dtype).newbyteorder("<")
            size = item.itemsize * math.prod(shape)
            raw = data[start:start + size].tobytes()
            header = f"deltastore-array\n{dtype}\n{','.join(map(str, shape))}\n".encode("ascii")
            if len(raw) != size or hashlib.sha256(header + raw).hexdigest() != name:
                raise SpecError(f"bundled array {name}: content hash mismatch")
            self._arrays[name] = np.frombuffer(raw, dtype=item).reshape(shape).astype(np.dtype(dtype))
            start += size
        if start != data.size:
            raise SpecError(f"bundle holds {data.size} bytes, its arrays {start}")

    def task_version(self, task: str, number: int) -> dict:
        pairs = self.ref(f"tasks/{task}", "task_ref")["versions"]
        numbers = [n for n, _ in pairs]
        assert numbers == sorted(set(numbers)), "version numbers must be strictly increasing"
        digest = dict((n, h) for n, h in pairs)[number]
        version = self.record(digest, "task_version")
        assert (version["task"], version["version"]) == (task, number)
        return version

    def materialize(self, task: str, number: int) -> dict[str, tuple[str, np.ndarray]]:
        """{name: (dtype, numpy array)}; bfloat16 tensors are held as uint16 bit patterns."""
        version = self.task_version(task, number)
        reference = self.record(version["reference"], "reference")
        assert version["reference"] == self.ref("reference", "pointer")["record"]
        base = self.record(version["base"], "base") if version["base"] is not None else None
        if base is not None and base["reference"] != version["reference"]:
            raise SpecError("the base vector was built against another reference than the version's")
        for rel, digest in version["files"].items():
            if not file_name_ok(rel):
                raise SpecError(f"file name {rel!r} is not a plain relative path")
            self.blob(digest)
        packed = self.packed(version, reference)
        self.unbundle(version)
        return {name: (entry["dtype"], packed[name] if name in packed else self.tensor(entry, version, reference, base))
                for name, entry in version["tensors"].items()}


# -- section 5.0: the canonical encoding of records, written from its rules -----------------
def _sized(n: int, small: int | None, fix: int, wide: tuple[int, ...]) -> bytes:
    """A length-prefixed msgpack head: the fix form below ``small``, else the narrowest of
    the 8/16/32-bit forms (``wide`` lists their type bytes, None where a form does not exist)."""
    if small is not None and n < small:
        return bytes([fix | n])
    for code, width in zip(wide, (1, 2, 4)):
        if code is not None and n < 1 << (8 * width):
            return bytes([code]) + n.to_bytes(width, "big")
    raise SpecError(f"length {n} does not fit msgpack")


def encode_canonical(value) -> bytes:
    """format.md 5.0, rules 1-6 (key order, rule 7, is the caller's: dicts keep theirs)."""
    if value is None:
        return b"\xc0"
    if value is True or value is False:
        return b"\xc3" if value else b"\xc2"
    if isinstance(value, int):
        if 0 <= value < 128:
            return bytes([value])
        if -32 <= value < 0:
            return bytes([value & 0xFF])
        codes = (0xCC, 0xCD, 0xCE, 0xCF) if value >= 0 else (0xD0, 0xD1, 0xD2, 0xD3)
        for code, width in zip(codes, (1, 2, 4, 8)):
            low, high = (0, 1 << (8 * width)) if value >= 0 else (-(1 << (8 * width - 1)), 0)
            if low <= value < high:
                return bytes([code]) + value.to_bytes(width, "big", signed=value < 0)
        raise SpecError(f"integer {value} does not fit 64 bits")
    if isinstance(value, float):
        return b"\xcb" + np.array(value, dtype=">f8").tobytes()
    if isinstance(value, str):
        data = value.encode("utf-8")
        return _sized(len(data), 32, 0xA0, (0xD9, 0xDA, 0xDB)) + data
    if isinstance(value, list):
        return _sized(len(value), 16, 0x90, (None, 0xDC, 0xDD)) + b"".join(map(encode_canonical, value))
    if isinstance(value, dict):
        return _sized(len(value), 16, 0x80, (None, 0xDE, 0xDF)) + b"".join(
            encode_canonical(k) + encode_canonical(v) for k, v in value.items())
    raise SpecError(f"{type(value).__name__} has no place in a record")


# Rule 7: the order of keys. Fixed-field maps follow their table; name-keyed maps are sorted.
FIELD_ORDER = {
    "info": ["name", "version", "created"],
    "reference": ["format", "kind", "created", "tensors", "files"],
    "base": ["format", "kind", "name", "created", "reference", "sources", "tensors"],
    "task_version": ["format", "kind", "task", "version", "parent", "created", "message", "reference", "base",
                     "method", "config", "lam1", "lam2", "tuning", "tensors", "files", "source", "pack",
                     "ref_prefix", "bundle", "bundled"],
    "pointer": ["format", "kind", "record"],
    "task_ref": ["format", "kind", "versions", "issued"],
    "entry": ["shape", "dtype", "codec", "config", "arrays", "attrs", "ref", "rows", "changed_rows", "lam1", "lam2"],
    "source": ["label", "bytes", "params", "fp16_bytes", "relative_delta", "skipped_files", "missing_buffers",
               "sha256", "settings"],
}
# The compressor pages' tables, in order: configuration fields, array roles, attrs.
PAGE_ORDER = {
    "lossless": ([], ["data"], ["dtype"]),
    "bitdelta": ([], ["signs"], ["scale"]),
    "dare": (["drop_rate", "value_bits", "layout"], ["values", "scales"], ["seed", "keep_threshold"]),
    "deltadq": (["group_size", "keep", "bits", "stored_planes"], [f"plane{j}" for j in range(8)] + ["scales"],
                ["seed"]),
}


def written_config(codec: str, config: dict, fields: list[str]) -> list[str]:
    """The configuration fields a writer writes: all, except dare's layout when it is 'hash'
    (dare.md: a hash entry is written exactly as under page 1.0)."""
    if codec == "dare" and config.get("layout", "hash") == "hash":
        return [f for f in fields if f != "layout"]
    return fields


def key_order_problems(obj: dict, kind: str) -> list[str]:
    """Where ``obj`` (a decoded record, keys in stored order) breaks rule 7, or leaves out a
    field writers MUST write (format.md 1: every field, optional ones and config defaults too)."""
    problems = []

    def check(keys, expected, where, complete=True):
        keys = list(keys)
        if keys != ([k for k in expected if k in keys] if not complete else expected):
            problems.append(f"{where}: keys {keys}, expected {'' if complete else 'a subsequence of '}{expected}")

    # An optional field of RECORD_OPTIONAL is written only when it applies (format.md 5.7).
    check(obj, [k for k in FIELD_ORDER[kind] if k in obj or k not in RECORD_OPTIONAL.get(kind, ())], kind)
    for name in ("tensors", "files"):
        if name in obj and list(obj[name]) != sorted(obj[name]):
            problems.append(f"{kind}.{name}: names not in code point order")
    for name, entry in obj.get("tensors", {}).items():
        # Format 1.2, section 1: the required fields, and an optional one exactly when it is not
        # what its absence means (5.2: nil; empty maps; a version's entries of its method: its config).
        absent = absent_values(obj, kind, name, entry)
        written = [k for k in FIELD_ORDER["entry"]
                   if k in ("shape", "dtype", "codec") or (k in entry and entry[k] != absent.get(k))]
        check(entry, written, f"tensors[{name!r}]")
        if entry["codec"] in PACKED_CODECS:
            continue
        config, roles, attrs = PAGE_ORDER[entry["codec"]]
        entry_config = entry.get("config", absent["config"])
        check(entry_config, written_config(entry["codec"], entry_config, config), f"tensors[{name!r}].config")
        check(entry.get("arrays", {}), roles, f"tensors[{name!r}].arrays", complete=False)  # the page's rules
        check(entry.get("attrs", {}), attrs if entry.get("attrs") else [], f"tensors[{name!r}].attrs")
    if kind == "task_version":
        config = PAGE_ORDER[obj["method"]][0]
        check(obj["config"], written_config(obj["method"], obj["config"], config), "config")
        check(obj["source"], FIELD_ORDER["source"], "source", complete=False)  # informative
        skipped = obj["source"].get("skipped_files", {})
        if list(skipped) != sorted(skipped):
            problems.append("source.skipped_files: names not in code point order")
    return problems


# ==========================================================================================
# Helpers
# ==========================================================================================

def _expected(task: str, number: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(EXPECTED / f"{task}@{number}.safetensors"))


def _as_bits(dtype: str, value: np.ndarray) -> np.ndarray:
    """Bit patterns for floats (so -0.0 and NaN payloads count), values otherwise."""
    if dtype in FLOAT_DTYPES and dtype != "bfloat16":
        return value.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[value.dtype.itemsize])
    return value


def _torch_as_numpy(tensor) -> tuple[str, np.ndarray]:
    import torch

    dtype = str(tensor.dtype).removeprefix("torch.")
    if tensor.dtype == torch.bfloat16:
        return dtype, tensor.view(torch.int16).numpy().view(np.uint16)
    return dtype, tensor.numpy()


def _object_path(root: Path, kind: str, digest: str) -> Path:
    return root / "objects" / kind / digest[:2] / digest[2:]


def _rewrite_version(root: Path, task: str, number: int, edit, *, rehash: bool) -> str:
    """Edit the record of ``task@number`` in a registry copy. ``rehash``: store it under its
    new name and repoint the task ref (a valid edit); otherwise overwrite the old file in
    place (which breaks its content hash). Returns the record's name on disk."""
    ref_path = root / "refs" / "tasks" / task
    ref = msgpack.unpackb(ref_path.read_bytes())
    old = dict(ref["versions"])[number]
    record = msgpack.unpackb(record_content(_object_path(root, "records", old).read_bytes()))
    edit(record)
    data = msgpack.packb(record, use_bin_type=True)
    if not rehash:
        _object_path(root, "records", old).write_bytes(data)
        return old
    new = hashlib.sha256(data).hexdigest()
    path = _object_path(root, "records", new)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    ref["versions"] = [[n, new if n == number else h] for n, h in ref["versions"]]
    ref_path.write_bytes(msgpack.packb(ref, use_bin_type=True))
    return new


@pytest.fixture
def reference_copy(tmp_path) -> Path:
    """A private copy of the checked-in registry (tests never touch the original)."""
    return Path(shutil.copytree(REGISTRY, tmp_path / "registry"))


@pytest.fixture(scope="module")
def readonly_copy(tmp_path_factory) -> Path:
    return Path(shutil.copytree(REGISTRY, tmp_path_factory.mktemp("reference") / "registry"))


# ==========================================================================================
# Tests
# ==========================================================================================

def test_reference_registry_is_complete():
    """The checked-in files match what make.py promises (and stay small)."""
    assert sorted(p.name for p in EXPECTED.iterdir()) == sorted(f"{t}@{n}.safetensors" for t, n in VERSIONS)
    # removed: a task whose only version was removed; its ref keeps the number issued (format.md 5.7)
    assert sorted(p.name for p in (REGISTRY / "refs" / "tasks").iterdir()) == ["alpha", "beta", "delta", "gamma",
                                                                              "removed"]
    assert sorted(p.name for p in (REGISTRY / "refs" / "bases").iterdir()) == ["b"]
    # 275 KB for alpha and beta, 155 KB for gamma's edge cases, 105 KB for delta (mostly its two
    # expected files) (specs/reference/README.md)
    assert sum(p.stat().st_size for p in REFERENCE.rglob("*") if p.is_file()
               and "__pycache__" not in p.parts and not {"v1.0", "v1.1", "v1.2", "v1.3"} & set(p.parts)) < 560_000  # frozen ones aside


def test_deltastore_materializes_reference_exactly(readonly_copy):
    import torch

    from deltastore import Registry

    reg = Registry(readonly_copy)
    assert sorted(reg.tasks()) == ["alpha", "beta", "delta", "gamma"]
    assert [(t, n) for t in sorted(reg.tasks()) for n, _ in reg.versions(t)] == VERSIONS
    for task, number in VERSIONS:
        got, expected = reg.materialize(task, number, progress=False), _expected(task, number)
        assert sorted(got) == sorted(expected), (task, number)
        for name, tensor in expected.items():
            assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, (task, number, name)
            assert torch.equal(got[name], tensor), f"{task}@{number} {name} differs from the expected file"
    assert reg.verify(progress=False) == []


@pytest.mark.parametrize("minor", [0, 1, 2, 3])
def test_older_format_registries_still_read_exactly(tmp_path, minor):
    """specs/reference/v1.0/ to v1.3/ are the reference registry as formats 1.0 to 1.3
    wrote it (1.0: before task refs could carry ``issued``, records ``source.sha256`` and DARE the
    ``gaps`` layout; 1.1: before patched blobs, packs and records that leave out absent values;
    1.2: before compressed records and bundles; 1.3: before xor entries over a narrower float): today's
    reader, and the independent one, materialize every version of each bit for bit, and
    deltastore's verify finds nothing to report."""
    import torch
    from safetensors.torch import load_file

    from deltastore import Registry

    old = REFERENCE / f"v1.{minor}"
    reg = Registry(shutil.copytree(old / "registry", tmp_path / "registry"))
    assert reg.info.version == (1, minor)
    expected_files = sorted(old.glob("expected/*.safetensors"))
    assert [p.stem for p in expected_files] == [f"{t}@{n}" for t in sorted(reg.tasks())
                                                for n, _ in reg.version_hashes(t)]
    reader = SpecReader(reg.path)
    for path in expected_files:
        task, number = path.stem.split("@")
        got, expected = reg.materialize(task, int(number), progress=False), load_file(str(path))
        assert sorted(got) == sorted(expected), path.name
        assert all(torch.equal(got[n], t) and got[n].dtype == t.dtype for n, t in expected.items()), path.name
        mine = reader.materialize(task, int(number))
        for name, tensor in expected.items():
            dtype, want = _torch_as_numpy(tensor)
            assert (_as_bits(dtype, mine[name][1]) == _as_bits(dtype, want)).all(), (path.name, name)
    assert reg.verify(progress=False) == []
    assert reader.check_all_objects() > 0


def test_reference_covers_the_format(readonly_copy):
    """What the reference registry exercises (so a rebuild cannot silently drop a case)."""
    reader = SpecReader(readonly_copy)
    seen = set()
    for task, number in VERSIONS:
        version = reader.task_version(task, number)
        seen.add((version["method"], version["base"] is not None))
        for digest in version["files"].values():  # format 1.2, section 3.3
            stored = _object_path(readonly_copy, "blobs", digest).read_bytes()
            if stored[:4] == bytes.fromhex("502a4d18"):
                seen.add(("patched blob", stored[8:8 + int.from_bytes(stored[4:8], "little")].split(b"\n")[1]))
        for name, entry in version["tensors"].items():  # section 5.8
            if entry["codec"] in PACKED_CODECS:
                seen.add(("packed", entry["dtype"], entry["codec"] == "xor"))
                seen.add(("packed shape", "0-d" if not entry["shape"] else "empty" if 0 in entry["shape"] else "n-d"))
        for entry in version["tensors"].values():
            seen.add(("dtype", entry["dtype"]))
            if entry.get("rows") is not None:
                seen.add(("rows", entry["codec"]))
            if entry.get("lam1") is not None:
                seen.add(("per-tensor lambdas", entry["codec"]))
            if entry["codec"] == "dare":
                seen.add(("dare", entry["config"]["value_bits"]))
                seen.add(("dare", entry["config"].get("layout", "hash"), entry["config"]["value_bits"],
                          version["base"] is not None))
            if entry["codec"] == "deltadq" and math.prod(entry["shape"][1:]) % entry["config"]["group_size"]:
                seen.add(("deltadq short group",))
            if entry["codec"] == "deltadq" and "plane0" not in entry["arrays"]:
                seen.add(("deltadq dropped plane",))
            if entry["codec"] == "dare" and entry["config"]["drop_rate"] == 0:
                seen.add(("dare keeps everything",))
            in_bundle = {name: shape for name, _, shape in version.get("bundled", [])}
            for digest in entry["arrays"].values():
                if digest in in_bundle:  # section 5.9
                    seen.add(("bundled", entry["codec"], "0-d" if not in_bundle[digest] else "n-d"))
                    continue
                meta = json.loads((_object_path(readonly_copy, "arrays", digest) / "zarr.json").read_bytes())
                shape, chunk = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
                if shape and 0 < chunk[0] < shape[0]:
                    seen.add(("chunks", len(shape), "padded" if shape[0] % chunk[0] else "exact"))
                seen.add(("array", "empty" if 0 in shape else f"{len(shape)}-d"))
            if entry["codec"] == "lossless" and entry["dtype"] in FLOAT_DTYPES:
                data = reader.lossless(entry)
                if data.dtype != np.uint16 and np.any((data == 0) & np.signbit(data)):
                    seen.add(("negative zero", entry["dtype"]))
    assert {("bitdelta", True), ("dare", True), ("deltadq", False), ("dare", 8), ("dare", 16),
            ("per-tensor lambdas", "dare"), ("rows", "bitdelta"), ("rows", "dare"), ("rows", "deltadq"),
            ("deltadq short group",), ("deltadq", True), ("deltadq dropped plane",), ("dare keeps everything",),
            ("chunks", 1, "padded"), ("chunks", 1, "exact"), ("chunks", 2, "padded"), ("array", "empty"),
            ("array", "0-d"), ("negative zero", "float64"), ("negative zero", "float32"),
            ("negative zero", "float16"), ("dare", "gaps", 8, True), ("dare", "gaps", 16, False),
            ("patched blob", b"json"), ("patched blob", b"raw"), ("packed shape", "0-d"), ("packed shape", "empty"),
            ("packed", "bool", True), ("packed", "int64", True), ("packed", "float16", True),
            ("packed", "float32", False), ("bundled", "bitdelta", "n-d"), ("bundled", "dare", "n-d"),
            ("bundled", "deltadq", "n-d")} <= seen
    assert {("dtype", d) for d in CARRIER} <= seen  # every dtype the lossless page lists
    # every record stored compressed (format 1.3, section 3.1), its frame declaring its size
    for path in (readonly_copy / "objects" / "records").rglob("*"):
        if path.is_file():
            stored = path.read_bytes()
            assert stored[:4] == bytes.fromhex("28b52ffd"), path
            assert zstandard.get_frame_parameters(stored).content_size == len(record_content(stored)), path
    # and packs every one whole (gamma@1's extra.*), bool and int64 aside: the reference has them, so XORed
    assert {("packed", d, False) for d in CARRIER if d not in ("bool", "int64")} <= seen


def test_prf_and_bits_test_vectors():
    """The test vectors of format.md sections 3.2, 7 and 8."""
    assert mix(np.array([1, 12345], dtype=np.uint32)).tolist() == [1753845952, 2435775735]
    assert prf(0, 3).tolist() == [0, 1492470133, 911671261]
    s7 = mix(np.array([7], dtype=np.uint32))  # r(7, i) for the last two counters, without 2**32 others
    assert mix(mix(np.array([2**32 - 2, 2**32 - 1], dtype=np.uint32)) ^ s7).tolist() == [2858236302, 4086997516]
    assert prf(12345, 1001)[1000] == 1495710906
    assert [seed_for(0, ""), seed_for(1, "emb.weight"), seed_for(4, "layer.weight")] == \
        [1947474976, 4276130919, 1424252924]
    preimage = bytes.fromhex("64656c746173746f72652d61727261790a" "696e7431360a" "322c330a" "010002000300040005000600")
    assert preimage == b"deltastore-array\nint16\n2,3\n" + np.arange(1, 7, dtype="<i2").tobytes()
    assert hashlib.sha256(preimage).hexdigest() == "622080855010aaf76e3bb4d29c5a5320f3c73c44ee4c044e423e60010a5bf023"
    for dtype, shape, data, name in [
            ("float32", "", np.float32(1.5), "beb8e95e5761b13efb3c0c92bc49363ddc7ddce92212a8d3adc87f007aedf54a"),
            ("uint8", "0,4", np.zeros((0, 4), np.uint8),
             "b107eb6b46736d0dd5a07d5e57361a4b9927332ff2ddc023d37410901563112b")]:
        header = f"deltastore-array\n{dtype}\n{shape}\n".encode("ascii")
        assert hashlib.sha256(header + data.tobytes()).hexdigest() == name
    assert unpack_bits(np.array([0b00000101, 0b1], dtype=np.uint8), 9).tolist() == \
        [True, False, True, False, False, False, False, False, True]


def _stored_records():
    """(path, msgpack bytes, kind) of every msgpack file of the reference registry: its refs
    and registry.msgpack as they are, its records decompressed (section 3.1)."""
    yield REGISTRY / "registry.msgpack", (REGISTRY / "registry.msgpack").read_bytes(), "info"
    for path in sorted((REGISTRY / "refs").rglob("*")):
        if path.is_file():
            yield path, path.read_bytes(), msgpack.unpackb(path.read_bytes())["kind"]
    for path in sorted((REGISTRY / "objects" / "records").rglob("*")):
        if path.is_file():
            data = record_content(path.read_bytes())
            yield path, data, msgpack.unpackb(data)["kind"]


def test_records_are_canonically_encoded():
    """format.md 5.0: decoding any stored record and encoding it again by the spec's rules
    (not with msgpack.packb, not with deltastore) gives back its exact bytes, so a second
    writer storing the same content reproduces the record's name."""
    count = 0
    for path, data, kind in _stored_records():
        obj = msgpack.unpackb(data, raw=False)
        assert encode_canonical(obj) == data, f"{path.relative_to(REGISTRY)} is not canonically encoded"
        assert key_order_problems(obj, kind) == [], path.relative_to(REGISTRY)
        count += 1
    assert count == 19  # registry.msgpack, 7 refs (one of the removed task), 11 records


def test_canonical_encoding_rules():
    """format.md 5.0: the narrowest integer and length forms, floats always float64."""
    cases = [(0, "00"), (127, "7f"), (128, "cc80"), (255, "ccff"), (256, "cd0100"), (2**32, "cf0000000100000000"),
             (-1, "ff"), (-32, "e0"), (-33, "d0df"), (-129, "d1ff7f"), (0.0, "cb0000000000000000"),
             (0.5, "cb3fe0000000000000"), ("", "a0"), ("a" * 31, "bf" + "61" * 31), ("a" * 32, "d920" + "61" * 32),
             (True, "c3"), (None, "c0"), ([], "90"), ({"a": [1]}, "81a16191" + "01")]
    for value, want in cases:
        assert encode_canonical(value).hex() == want, value
        assert msgpack.packb(value, use_bin_type=True).hex() == want, value  # the rules are msgpack's narrowest


def test_writer_sorts_names_and_writes_floats(reference_copy):
    """The writer side of 5.0: tensors listed out of order are stored in code point order,
    and a drop rate given as the integer 0 is stored as a float."""
    from safetensors.torch import load_file

    from deltastore import Registry

    state = load_file(str(EXPECTED / "alpha@1.safetensors"))
    shuffled = {name: state[name] for name in sorted(state, reverse=True)}
    reg = Registry(reference_copy)
    reg.commit("omega", shuffled, method="dare", config={"drop_rate": 0}, seed=5, progress=False)
    digest = reg.version_hashes("omega")[0][1]
    data = record_content(_object_path(reference_copy, "records", digest).read_bytes())
    obj = msgpack.unpackb(data, raw=False)
    assert key_order_problems(obj, "task_version") == [] and encode_canonical(obj) == data
    assert obj["config"]["drop_rate"] == 0.0 and isinstance(obj["config"]["drop_rate"], float)
    assert list(reg.materialize("omega", progress=False)) == sorted(state)


def test_stored_seeds_follow_the_derivation(readonly_copy):
    """format.md 8: every stored seed is the writer's derivation from the version's global
    seed (specs/reference/README.md) and the tensor's name."""
    reader = SpecReader(readonly_copy)
    checked = 0
    for (task, number), global_seed in zip(VERSIONS, (1, 2, 3, 4, 7, 8, 9, 5, 6)):
        for name, entry in reader.task_version(task, number)["tensors"].items():
            if "seed" in entry["attrs"]:
                assert entry["attrs"]["seed"] == seed_for(global_seed, name), (task, number, name)
                checked += 1
    assert checked == 24  # three delta tensors in each of the dare and deltadq versions


def test_parent_keeps_nothing_alive(reference_copy):
    """format.md 9.1: after alpha@1 is removed, gc deletes its record although alpha@2 names it
    as its parent, and alpha@2 still materializes exactly."""
    import torch

    from deltastore import Registry

    reg = Registry(reference_copy)
    (first, old), _ = reg.version_hashes("alpha")
    assert reg.version("alpha", 2)[1].parent == old
    reg.remove("alpha", first)
    reg.gc()
    assert not _object_path(reference_copy, "records", old).exists()
    got, expected = reg.materialize("alpha", 2, progress=False), _expected("alpha", 2)
    assert all(torch.equal(got[name], tensor) for name, tensor in expected.items())
    assert reg.verify(progress=False) == []
    SpecReader(reference_copy).materialize("alpha", 2)


def test_independent_reader_matches_expected(readonly_copy):
    """The spec alone rebuilds every task version bit for bit."""
    reader = SpecReader(readonly_copy)
    assert reader.check_all_objects() > 0
    for task, number in VERSIONS:
        got, expected = reader.materialize(task, number), _expected(task, number)
        assert sorted(got) == sorted(expected), (task, number)
        for name, tensor in expected.items():
            dtype, want = _torch_as_numpy(tensor)
            have_dtype, have = got[name]
            assert have_dtype == dtype and have.shape == want.shape, (task, number, name)
            diff = _as_bits(dtype, have) != _as_bits(dtype, want)
            assert not diff.any(), f"{task}@{number} {name}: {int(diff.sum())} of {diff.size} elements differ"


def test_deltadq_without_low_planes(reference_copy):
    """compressors/deltadq.md: low planes may be deleted; both readers fill the midpoint."""
    import torch

    from deltastore import Registry

    def drop_plane0(record):
        for entry in record["tensors"].values():
            if entry["codec"] == "deltadq":
                del entry["arrays"]["plane0"]

    _rewrite_version(reference_copy, "beta", 1, drop_plane0, rehash=True)
    mine = SpecReader(reference_copy).materialize("beta", 1)
    theirs = Registry(reference_copy).materialize("beta", 1, progress=False)
    full = _expected("beta", 1)
    changed = 0
    for name, tensor in theirs.items():
        dtype, want = _torch_as_numpy(tensor)
        assert not (_as_bits(dtype, mine[name][1]) != _as_bits(dtype, want)).any(), name
        changed += not torch.equal(tensor, full[name])
    assert changed == 3  # the three deltadq matrices decode differently without plane 0


def test_base_vector_of_another_reference_is_refused(reference_copy):
    """format.md section 6: B.reference MUST equal V.reference; both readers check it."""
    from deltastore import CorruptObjectError, Registry

    pointer = msgpack.unpackb((reference_copy / "refs/bases/b").read_bytes())
    base = msgpack.unpackb(record_content(_object_path(reference_copy, "records", pointer["record"]).read_bytes()))
    base["reference"] = "0" * 64
    data = msgpack.packb(base, use_bin_type=True)
    digest = hashlib.sha256(data).hexdigest()
    _object_path(reference_copy, "records", digest).parent.mkdir(parents=True, exist_ok=True)
    _object_path(reference_copy, "records", digest).write_bytes(data)
    _rewrite_version(reference_copy, "alpha", 1, lambda r: r.update(base=digest), rehash=True)
    with pytest.raises(CorruptObjectError, match="built against reference 000000000000"):
        Registry(reference_copy).materialize("alpha", 1, progress=False)
    with pytest.raises(SpecError, match="another reference"):
        SpecReader(reference_copy).materialize("alpha", 1)


def test_optional_fields_written_or_absent_read_alike(reference_copy):
    """format.md 1, 5.2: a 1.2 writer leaves out what equals its absent value; the same record with
    every optional field written as its absent value (as 1.0 and 1.1 writers did: nil, empty maps,
    the version's config) reads to the same bits in both readers, and so does an entry whose
    configuration is the empty map (every field at the page's default)."""
    import torch

    from deltastore import Registry

    def fill(record):  # beta@2: dare with the default drop_rate, fp16 values, small tensors packed
        assert {e["codec"] for e in record["tensors"].values()} == {"dare", "xor", "packed"}
        assert not any("ref" in e for e in record["tensors"].values() if e["codec"] == "dare")  # derived
        for name, entry in record["tensors"].items():
            if entry["codec"] == "dare":
                assert "config" not in entry  # the version's: {"drop_rate": 0.99, "value_bits": 16}
                entry["config"] = {}  # page defaults: the same configuration
            for field, value in absent_values(record, "task_version", name, entry).items():
                entry.setdefault(field, value)

    _rewrite_version(reference_copy, "beta", 2, fill, rehash=True)
    expected = _expected("beta", 2)
    got = Registry(reference_copy).materialize("beta", 2, progress=False)
    assert all(torch.equal(got[name], tensor) for name, tensor in expected.items())
    mine = SpecReader(reference_copy).materialize("beta", 2)
    for name, tensor in expected.items():
        dtype, want = _torch_as_numpy(tensor)
        assert (_as_bits(dtype, mine[name][1]) == _as_bits(dtype, want)).all(), name


def _one_d_delta(reference_copy, shape: list[int]):
    """gamma@2's layer.bias (fp16, 64, a lossless array: gamma@2 has no pack) made a bitdelta
    delta entry of the given shape."""
    import torch

    from deltastore import Registry
    from deltastore.storage.objects import array_hash

    signs = np.packbits(np.arange(64) % 3 == 0, bitorder="little")
    objects = Registry(reference_copy).objects
    digest = objects.put_array(torch.from_numpy(signs), objects.new_txn())
    assert digest == array_hash(signs)

    def edit(record):
        record["tensors"]["layer.bias"] = {
            "shape": shape, "dtype": "float16", "codec": "bitdelta", "config": {}, "arrays": {"signs": digest},
            "attrs": {"scale": 0.001}, "ref": "layer.bias", "rows": None, "changed_rows": None, "lam1": None,
            "lam2": 0.5}

    _rewrite_version(reference_copy, "gamma", 2, edit, rehash=True)


def test_one_dimensional_delta(reference_copy):
    """format.md 5.2, 6: a 1-d delta is shape[0] rows of one element; both readers agree."""
    _one_d_delta(reference_copy, [64])
    from deltastore import Registry

    got = Registry(reference_copy).materialize("gamma", 2, progress=False)["layer.bias"]
    mine = SpecReader(reference_copy).materialize("gamma", 2)["layer.bias"][1]
    assert got.shape == (64,) and (got.numpy().view(np.uint16) == mine.view(np.uint16)).all()
    stored_whole = _expected("gamma", 2)["layer.bias"]  # what the entry held before the edit
    assert not np.array_equal(got.numpy(), stored_whole.numpy())


def test_delta_of_another_shape_is_refused(reference_copy):
    """format.md 6: the delta entry's shape MUST be its reference tensor's."""
    from deltastore import CorruptObjectError, Registry

    _one_d_delta(reference_copy, [8, 8])
    words = r"of shape \[8, 8\] adds to reference tensor .layer.bias. of shape \[64\] and dtype float16"
    with pytest.raises(CorruptObjectError, match=words):
        Registry(reference_copy).materialize("gamma", 2, progress=False)
    with pytest.raises(SpecError, match="of its own shape"):
        SpecReader(reference_copy).materialize("gamma", 2)


def test_overflow_when_narrowing_gives_infinities(reference_copy):
    """format.md 6: a float32 result beyond float16's range becomes an infinity of its sign,
    the same bits from both readers (only a crafted record gets there: lam2 = 1e30)."""
    from deltastore import Registry

    def huge_lam2(record):
        for entry in record["tensors"].values():
            if entry["codec"] not in ("lossless",) + PACKED_CODECS:
                entry["lam2"] = 1e30

    _rewrite_version(reference_copy, "alpha", 1, huge_lam2, rehash=True)
    got = Registry(reference_copy).materialize("alpha", 1, progress=False)
    mine = SpecReader(reference_copy).materialize("alpha", 1)
    assert np.isinf(got["layer.weight"].numpy()).all()  # fp16: every row changed, |lam2 * alpha| > 65504
    assert np.isfinite(got["emb.weight"].numpy()).all()  # fp32 holds it
    for name, tensor in got.items():
        dtype, have = _torch_as_numpy(tensor)
        assert (_as_bits(dtype, have) == _as_bits(dtype, mine[name][1])).all(), name


def test_float64_reference_rows_are_rounded_through_float32(tmp_path):
    """format.md 6: the combining step is float32, so a float64 tensor's unchanged rows come
    back as float64(float32(reference)), not the reference's own bits."""
    import torch

    from deltastore import Registry

    torch.manual_seed(0)
    reference = {"w": torch.randn(64, 64, dtype=torch.float64) / 3}
    finetune = {"w": reference["w"].clone()}
    finetune["w"][::2] += 1e-3  # even rows change, odd rows stay exactly the reference's
    reg = Registry.init(tmp_path / "registry", reference, progress=False)
    reg.commit("t", finetune, method="bitdelta", progress=False)
    got = reg.materialize("t", progress=False)["w"]
    assert got.dtype == torch.float64
    assert torch.equal(got[1::2], reference["w"][1::2].float().double())
    assert not torch.equal(got[1::2], reference["w"][1::2])
    mine = SpecReader(reg.path).materialize("t", 1)["w"][1]
    assert (mine.view(np.uint64) == got.numpy().view(np.uint64)).all()


@pytest.mark.parametrize("rel", ["notes\\v1.txt", "../x", "/etc/x", "a//b", "C:x", "a\tb"])
def test_file_names_outside_the_rule_are_refused(reference_copy, rel):
    """format.md 2.1, both readers (deltastore's rule is check_file_name)."""
    from deltastore import CorruptObjectError, Registry

    _rewrite_version(reference_copy, "alpha", 1, lambda r: r["files"].update({rel: r["files"]["config.json"]}),
                     rehash=True)
    with pytest.raises(CorruptObjectError, match="not a plain relative path"):
        Registry(reference_copy).materialize("alpha", 1, progress=False)
    with pytest.raises(SpecError, match="not a plain relative path"):
        SpecReader(reference_copy).materialize("alpha", 1)


def test_newer_registry_version_is_refused(reference_copy):
    from deltastore import FormatVersionError, Registry

    info = msgpack.unpackb((reference_copy / "registry.msgpack").read_bytes())
    info["version"] = [2, 0]
    (reference_copy / "registry.msgpack").write_bytes(msgpack.packb(info, use_bin_type=True))
    with pytest.raises(FormatVersionError) as caught:
        Registry(reference_copy)
    message = str(caught.value)
    assert "registry.msgpack" in message and "2.0" in message and re.search(r"\b1\.(x|0)\b", message), message
    assert "upgrade" in message.lower()
    with pytest.raises(SpecError, match="format 2.0"):
        SpecReader(reference_copy)


def test_newer_record_format_is_refused(reference_copy):
    from deltastore import FormatVersionError, Registry

    digest = _rewrite_version(reference_copy, "alpha", 1, lambda r: r.update(format=2), rehash=True)
    with pytest.raises(FormatVersionError) as caught:
        Registry(reference_copy).materialize("alpha", 1, progress=False)
    message = str(caught.value)
    assert digest[:12] in message, message  # names the object
    assert re.search(r"\b2\b", message) and re.search(r"\b1\b", message) and "upgrade" in message.lower(), message
    Registry(reference_copy).materialize("alpha", 2, progress=False)  # the other versions still read
    with pytest.raises(SpecError, match="format 2"):
        SpecReader(reference_copy).materialize("alpha", 1)


def test_edited_record_in_place_is_corrupt(reference_copy):
    from deltastore import CorruptObjectError, Registry

    digest = _rewrite_version(reference_copy, "alpha", 1, lambda r: r.update(format=2), rehash=False)
    with pytest.raises(CorruptObjectError, match="hash"):
        Registry(reference_copy).materialize("alpha", 1, progress=False)
    problems = Registry(reference_copy).verify(progress=False)
    assert {p["object"] for p in problems} == {f"objects/records/{digest[:2]}/{digest[2:]}"}
    with pytest.raises(SpecError, match="hash mismatch"):
        SpecReader(reference_copy).materialize("alpha", 1)


def _set_codec(record):
    record["tensors"]["layer.weight"]["codec"] = "bitdelta9"


def test_unknown_codec_is_refused(reference_copy):
    from deltastore import DeltastoreError, Registry

    _rewrite_version(reference_copy, "alpha", 1, _set_codec, rehash=True)
    with pytest.raises(DeltastoreError) as caught:
        Registry(reference_copy).materialize("alpha", 1, progress=False)
    message = str(caught.value)
    assert "bitdelta9" in message and "unknown" in message.lower(), message
    assert "layer.weight" in message, message
    with pytest.raises(SpecError, match="unknown codec 'bitdelta9'"):
        SpecReader(reference_copy).materialize("alpha", 1)


def test_unknown_codec_without_rehash_is_corrupt(reference_copy):
    from deltastore import CorruptObjectError, Registry

    _rewrite_version(reference_copy, "alpha", 1, _set_codec, rehash=False)
    with pytest.raises(CorruptObjectError, match="hash"):
        Registry(reference_copy).materialize("alpha", 1, progress=False)


def test_registry_info_and_refs_fields_are_exact():
    """format.md 5.1, 5.6, 5.7: exactly the listed fields, of the listed types."""
    info = msgpack.unpackb((REGISTRY / "registry.msgpack").read_bytes(), raw=False)
    assert set(info) == {"name", "version", "created"}
    assert info["name"] == "deltastore" and info["version"] == [1, 4]
    assert isinstance(info["created"], str) and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d.*", info["created"])

    for key in ("refs/reference", "refs/bases/b"):
        pointer = msgpack.unpackb((REGISTRY / key).read_bytes(), raw=False)
        assert set(pointer) == {"format", "kind", "record"}, key
        assert pointer["format"] == 1 and pointer["kind"] == "pointer" and HASH_RE.match(pointer["record"])
        assert _object_path(REGISTRY, "records", pointer["record"]).is_file()

    task_ref = msgpack.unpackb((REGISTRY / "refs/tasks/alpha").read_bytes(), raw=False)
    assert set(task_ref) == {"format", "kind", "versions"}
    assert task_ref["format"] == 1 and task_ref["kind"] == "task_ref"
    assert [n for n, _ in task_ref["versions"]] == [1, 2]
    assert all(HASH_RE.match(h) for _, h in task_ref["versions"])
    removed = msgpack.unpackb((REGISTRY / "refs/tasks/removed").read_bytes(), raw=False)
    assert removed == {"format": 1, "kind": "task_ref", "versions": [], "issued": 1}
    SpecReader(REGISTRY).ref("tasks/removed", "task_ref")
    # Every stored record has exactly its kind's fields (the reader raises otherwise).
    assert SpecReader(REGISTRY).check_all_objects() > 0


def test_dare_page_1_0_reader_refuses_gaps_and_reads_hash(readonly_copy):
    """dare.md 1.1, "Readers of page 1.0": the configuration of a gaps entry has a field page 1.0
    does not list, so such a reader refuses it; every hash entry is a page 1.0 entry."""
    reader = SpecReader(readonly_copy)
    page_1_0 = {"drop_rate": 0.99, "value_bits": 16}
    for task, number in VERSIONS:
        for entry in reader.task_version(task, number)["tensors"].values():
            if entry["codec"] != "dare":
                continue
            if task == "delta":
                assert entry["config"]["layout"] == "gaps"
                with pytest.raises(SpecError, match="unknown configuration fields.*layout"):
                    _config(entry["config"], page_1_0, "dare")
            else:
                assert _config(entry["config"], page_1_0, "dare").keys() == page_1_0.keys()


def test_make_py_rebuilds_the_reference_registry_byte_for_byte(tmp_path, monkeypatch):
    """specs/reference/make.py, run with today's writer, reproduces every checked-in file of
    the reference registry and its expected tensors exactly: the writer still writes the format
    the spec and the registry show, and the script that documents how they were made still runs."""
    import importlib.util

    import deltastore.registry

    spec = importlib.util.spec_from_file_location("reference_make", REFERENCE / "make.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    monkeypatch.setattr(deltastore.registry, "utc_now", lambda: make.CREATED)  # as make.main() pins it
    make.build(tmp_path / "registry", tmp_path / "expected")
    for built, checked_in in ((tmp_path / "registry", REGISTRY), (tmp_path / "expected", EXPECTED)):
        files = sorted(p.relative_to(checked_in) for p in checked_in.rglob("*") if p.is_file())
        assert sorted(p.relative_to(built) for p in built.rglob("*") if p.is_file()) == files
        for rel in files:
            assert (built / rel).read_bytes() == (checked_in / rel).read_bytes(), rel
