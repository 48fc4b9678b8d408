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
from numcodecs import Zstd

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "specs" / "reference"
REGISTRY = REFERENCE / "registry"
EXPECTED = REFERENCE / "expected"
VERSIONS = [("alpha", 1), ("alpha", 2), ("beta", 1), ("beta", 2)]


# ==========================================================================================
# An independent reader, from the spec alone
# ==========================================================================================

class SpecError(Exception):
    """The reader refuses the registry (corrupt, unsupported or newer format)."""


FORMAT_MAJOR = 1
HASH_RE = re.compile(r"^[0-9a-f]{64}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# format.md section 5: every field of every record kind, (required, optional).
ENTRY_FIELDS = ({"shape", "dtype", "codec", "config", "arrays", "attrs"},
                {"ref", "rows", "changed_rows", "lam1", "lam2"})
RECORD_FIELDS = {
    "reference": {"created", "tensors", "files"},
    "base": {"name", "created", "reference", "sources", "tensors"},
    "task_version": {"task", "version", "parent", "created", "message", "reference", "base", "method", "config",
                     "lam1", "lam2", "tuning", "tensors", "files", "source"},
    "pointer": {"record"},
    "task_ref": {"versions"},
}
RECORD_OPTIONAL = {"task_ref": {"issued"}}  # format 1.1
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


def decode_dare(arrays: dict, attrs: dict, config: dict, rows: int, cols: int) -> np.ndarray:
    config = _config(config, {"drop_rate": 0.99, "value_bits": 16}, "dare")
    if not 0 <= config["drop_rate"] < 1 or config["value_bits"] not in (16, 8):
        raise SpecError(f"dare: configuration out of range {config}")
    values = arrays["values"]
    bits = config["value_bits"]
    if values.ndim != 1 or values.dtype != (np.float16 if bits == 16 else np.int8):
        raise SpecError(f"dare: values are {values.dtype} {values.shape}")
    if bits == 8:
        scales = arrays["scales"]
        if scales.dtype != np.float32 or scales.shape != (rows,):
            raise SpecError("dare: bad scales")
    kept = prf(int(attrs["seed"]), rows * cols) < np.uint64(int(attrs["keep_threshold"]))
    flat = np.nonzero(kept)[0]  # increasing flat index i
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
            if entry["codec"] != "lossless" and entry["codec"] not in DELTA_CODECS:
                raise SpecError(f"{what}.tensors[{name!r}]: unknown codec {entry['codec']!r}")
        return kind

    def record(self, digest: str, kind: str) -> dict:
        data = self._object("records", digest).read_bytes()
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

    def blob(self, digest: str) -> bytes:
        data = bytes(Zstd().decode(self._object("blobs", digest).read_bytes()))
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
                        data = rest.read_bytes()
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

    def tensor(self, entry: dict, version: dict, reference: dict, base: dict | None) -> np.ndarray:
        if entry["codec"] == "lossless":
            return self.lossless(entry)
        shape, ref_name = entry["shape"], entry.get("ref")
        if ref_name is None or entry["dtype"] not in FLOAT_DTYPES:
            raise SpecError(f"a delta entry needs a ref and a float dtype, found {ref_name!r}, {entry['dtype']}")
        ref_entry = reference["tensors"][ref_name]
        rows_total, cols = shape[0], math.prod(shape[1:])
        w_pre = to_f32(ref_entry["dtype"], self.lossless(ref_entry)).reshape(rows_total, cols)
        m, c = self.delta_rows(entry)
        lam1 = np.float32(version["lam1"] if entry.get("lam1") is None else entry["lam1"])
        lam2 = np.float32(version["lam2"] if entry.get("lam2") is None else entry["lam2"])
        u = lam2 * c
        if base is not None and ref_name in base["tensors"]:
            b = base["tensors"][ref_name]
            if b["codec"] != "bitdelta":
                raise SpecError("a base vector entry must be bitdelta")
            bm, bc = self.delta_rows(b)
            t = np.zeros((rows_total, cols), dtype=np.float32)
            t[bm] = bc
            u = u + lam1 * t[m]
        out = w_pre.copy()
        out[m] = w_pre[m] + u
        assert out.dtype == np.float32 and u.dtype == np.float32
        return from_f32(entry["dtype"], out).reshape(shape)

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
        for digest in version["files"].values():
            self.blob(digest)
        return {name: (entry["dtype"], self.tensor(entry, version, reference, base))
                for name, entry in version["tensors"].items()}


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
    record = msgpack.unpackb(_object_path(root, "records", old).read_bytes())
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
    # gamma: a task whose only version was removed; its ref keeps the number issued (format.md 5.7)
    assert sorted(p.name for p in (REGISTRY / "refs" / "tasks").iterdir()) == ["alpha", "beta", "gamma"]
    assert sorted(p.name for p in (REGISTRY / "refs" / "bases").iterdir()) == ["b"]
    assert sum(p.stat().st_size for p in REFERENCE.rglob("*") if p.is_file()) < 320_000


def test_deltastore_materializes_reference_exactly(readonly_copy):
    import torch

    from deltastore import Registry

    reg = Registry(readonly_copy)
    assert sorted(reg.tasks()) == ["alpha", "beta"]
    assert [(t, n) for t in sorted(reg.tasks()) for n, _ in reg.versions(t)] == VERSIONS
    for task, number in VERSIONS:
        got, expected = reg.materialize(task, number, progress=False), _expected(task, number)
        assert sorted(got) == sorted(expected), (task, number)
        for name, tensor in expected.items():
            assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, (task, number, name)
            assert torch.equal(got[name], tensor), f"{task}@{number} {name} differs from the expected file"
    assert reg.verify(progress=False) == []


def test_reference_covers_the_format(readonly_copy):
    """What the reference registry exercises (so a rebuild cannot silently drop a case)."""
    reader = SpecReader(readonly_copy)
    seen = set()
    for task, number in VERSIONS:
        version = reader.task_version(task, number)
        seen.add((version["method"], version["base"] is not None))
        for entry in version["tensors"].values():
            seen.add(("dtype", entry["dtype"]))
            if entry.get("rows") is not None:
                seen.add(("rows", entry["codec"]))
            if entry.get("lam1") is not None:
                seen.add(("per-tensor lambdas", entry["codec"]))
            if entry["codec"] == "dare":
                seen.add(("dare", entry["config"]["value_bits"]))
            if entry["codec"] == "deltadq" and math.prod(entry["shape"][1:]) % entry["config"]["group_size"]:
                seen.add(("deltadq short group",))
    assert {("bitdelta", True), ("dare", True), ("deltadq", False), ("dare", 8), ("dare", 16),
            ("per-tensor lambdas", "dare"), ("rows", "bitdelta"), ("rows", "dare"), ("rows", "deltadq"),
            ("deltadq short group",)} <= seen
    assert {("dtype", d) for d in ("float16", "bfloat16", "float32", "bool", "int64")} <= seen


def test_prf_and_bits_test_vectors():
    assert mix(np.array([1, 12345], dtype=np.uint32)).tolist() == [1753845952, 2435775735]
    assert unpack_bits(np.array([0b00000101, 0b1], dtype=np.uint8), 9).tolist() == \
        [True, False, True, False, False, False, False, False, True]


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
    assert info["name"] == "deltastore" and info["version"] == [1, 1]
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
    removed = msgpack.unpackb((REGISTRY / "refs/tasks/gamma").read_bytes(), raw=False)
    assert removed == {"format": 1, "kind": "task_ref", "versions": [], "issued": 1}
    SpecReader(REGISTRY).ref("tasks/gamma", "task_ref")
    # Every stored record has exactly its kind's fields (the reader raises otherwise).
    assert SpecReader(REGISTRY).check_all_objects() > 0
