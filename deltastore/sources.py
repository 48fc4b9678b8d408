"""Reading models to commit: Hugging Face directories, .safetensors files, state dicts.

Tensors are read lazily, one at a time, with positioned reads of safetensors files, so committing
a 7B finetune needs host memory of a few tensors. Pickle-based checkpoints are never
opened: loading them would execute code.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open

from .dtypes import SAFETENSORS_DTYPES, torch_dtype
from .errors import InvalidInputError, NotFoundError
from .storage.records import check_file_name

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Non-weight files larger than this are not copied into the registry (datasets, logs...).
MAX_SIDE_FILE_BYTES = 64 << 20


class TensorSource:
    """A model's tensors by name, read lazily, plus its non-weight files.

    ``names()``: tensor names in a stable order (grouped by file). ``shape(name)``,
    ``dtype(name)``: metadata without reading data. ``get(name)``: the CPU tensor.
    ``files``: relative path -> bytes-producing path of the files to keep (config.json,
    tokenizer files...). ``skipped``: files that were deliberately not read, with why.
    """

    def __init__(self, label: str):
        self.label = label
        self.files: dict[str, Path] = {}
        self.skipped: dict[str, str] = {}

    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, name: str) -> torch.dtype:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def read_into(self, name: str, out: memoryview, start: int = 0) -> None:
        """Bytes ``[start, start + len(out))`` of tensor ``name`` (row-major, native byte
        order) into ``out``: how the fast path streams a tensor into pinned staging."""
        raw = self.get(name).contiguous().reshape(-1).view(torch.uint8)
        out.cast("B")[:] = memoryview(raw[start:start + len(out)].numpy()).cast("B")

    def __contains__(self, name: str) -> bool:
        return name in set(self.names())

    def nbytes(self) -> int:
        """Bytes of all tensors in their stored dtypes."""
        total = 0
        for name in self.names():
            n = 1
            for d in self.shape(name):
                n *= d
            total += n * torch.empty((), dtype=self.dtype(name)).element_size()
        return total


class StateDictSource(TensorSource):
    """An in-memory ``{name: tensor}`` mapping."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], label: str = "state dict"):
        super().__init__(label)
        for name, value in state_dict.items():
            if not isinstance(value, torch.Tensor):
                raise InvalidInputError(f"{label}: entry {name!r} is a {type(value).__name__}, expected a tensor")
        self._tensors = dict(state_dict)

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name].detach().cpu()




class SafetensorsSource(TensorSource):
    """One or more .safetensors files (a sharded checkpoint), read tensor by tensor.

    ``safe_open`` checks each file's header once; tensors are then read with plain positioned
    reads into fresh tensors, not through a memory map: mapped pages count as the process's
    resident memory until the file is closed (a commit of a 13 GB checkpoint peaked at 5.9 GB),
    and each read has its own file handle, so reader threads may call :meth:`get` at once.
    """

    def __init__(self, files: list[Path], label: str):
        super().__init__(label)
        self._where: dict[str, tuple[Path, int, int]] = {}  # name -> (file, byte offset, byte length)
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as handle:
                    names = list(handle.keys())
                    metas = {}
                    for name in names:
                        sl = handle.get_slice(name)
                        code = sl.get_dtype()
                        if code not in SAFETENSORS_DTYPES:
                            raise InvalidInputError(
                                f"{path}: tensor {name!r} has dtype {code}, which deltastore does not "
                                f"store; supported: {', '.join(SAFETENSORS_DTYPES)}"
                            )
                        metas[name] = (tuple(sl.get_shape()), torch_dtype(SAFETENSORS_DTYPES[code]))
                offsets = _data_offsets(path)
            except (OSError, ValueError) as exc:
                if isinstance(exc, InvalidInputError):
                    raise
                raise InvalidInputError(f"{path}: not a readable safetensors file ({exc})") from None
            except Exception as exc:  # safetensors raises its own SafetensorError for bad headers
                raise InvalidInputError(f"{path}: not a readable safetensors file ({exc})") from None
            for name in names:
                if name in self._where:
                    raise InvalidInputError(
                        f"{label}: tensor {name!r} appears in both {self._where[name][0].name} and {path.name}"
                    )
                self._where[name] = (path, *offsets[name])
                self._meta[name] = metas[name]

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def get(self, name: str) -> torch.Tensor:
        out = torch.empty(self.shape(name), dtype=self.dtype(name))
        if out.numel():
            self.read_into(name, memoryview(out.reshape(-1).view(torch.uint8).numpy()))
        return out

    def read_into(self, name: str, out: memoryview, start: int = 0) -> None:
        path, offset, length = self._where[name]
        shape, dtype = self._meta[name]
        needed = math.prod(shape) * dtype.itemsize
        if length != needed:
            raise InvalidInputError(f"{path}: tensor {name!r} spans {length} bytes, its shape and dtype need {needed}")
        out = out.cast("B")
        if start < 0 or start + len(out) > length:
            raise ValueError(f"bytes {start}..{start + len(out)} are outside tensor {name!r} ({length} bytes)")
        with open(path, "rb", buffering=0) as fh:
            fh.seek(offset + start)
            done = 0
            while done < len(out):
                n = fh.readinto(out[done:])
                if not n:
                    raise InvalidInputError(f"{path}: file ends inside tensor {name!r}; the file is truncated")
                done += n


def _data_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """``name -> (absolute byte offset, byte length)`` from a safetensors header (8-byte
    little-endian header size, then a JSON header whose ``data_offsets`` count from its end);
    called after ``safe_open`` accepted the file, which checks the offsets are consistent."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
    return {name: (8 + size + int(info["data_offsets"][0]), int(info["data_offsets"][1]) - int(info["data_offsets"][0]))
            for name, info in header.items() if name != "__metadata__"}


def _outside(directory: Path, path: Path) -> Path | None:
    """Where ``path`` really is, when following its symlinks leaves ``directory`` (else None).

    Links out of the finetune's folder are not followed: a link to /proc/self/environ or
    /etc/passwd would store them in the registry. One exception is the layout of the Hugging
    Face hub cache, whose ``snapshots/<revision>/`` files all link to ``../../blobs/<sha>``."""
    try:
        real, root = path.resolve(), directory.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return path
    allowed = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    return None if any(real.is_relative_to(folder) for folder in allowed) else real


def _shown(rel: str) -> str:
    """A file name as stored text: bytes that are not UTF-8 shown as escapes (\\xff)."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _side_files(directory: Path, source: TensorSource, follow_links: bool) -> None:
    """Collect the non-weight files a materialized directory needs (config, tokenizer...);
    what is not collected is recorded in ``source.skipped`` with why."""
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if any(part.startswith(".") for part in rel.split("/")) or path.is_dir():
            continue
        if path.suffix == ".safetensors" or rel.endswith(".safetensors.index.json"):
            continue
        # The rule readers apply to stored names: refusing here keeps an unreadable name out.
        check_file_name(rel, str(directory), InvalidInputError, advice="rename or remove that file, then try again")
        real = None if follow_links else _outside(directory, path)
        if path.suffix in PICKLE_SUFFIXES:
            source.skipped[rel] = "pickle-based file: never read (loading it could execute code)"
        elif real is not None:
            source.skipped[rel] = f"a symlink to {_shown(str(real))}, outside the finetune folder: not followed"
        elif not path.is_file():
            source.skipped[rel] = "not a regular file (a fifo, a device or a broken link): not read"
        elif path.stat().st_size > MAX_SIDE_FILE_BYTES:
            source.skipped[rel] = (f"{path.stat().st_size} bytes, larger than the {MAX_SIDE_FILE_BYTES >> 20} MiB "
                                   "a side file may have: not stored, so the materialized folder lacks it")
        else:
            source.files[rel] = path


def _weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index: tensor name -> shard file name."""
    expected = 'expected {"weight_map": {tensor name: shard file name}}'
    try:
        data = json.loads(index.read_bytes())
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, nested too deep
        raise InvalidInputError(f"{index}: not a valid safetensors index ({type(exc).__name__}: "
                                f"{str(exc)[:100]}); {expected}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v and "\x00" not in v
                                                   for v in weight_map.values()):
        raise InvalidInputError(f"{index}: not a valid safetensors index (found {json.dumps(data)[:80]}); {expected}")
    return weight_map


def open_source(model: str | os.PathLike | Mapping[str, torch.Tensor] | TensorSource, *,
                follow_links: bool = False) -> TensorSource:
    """Open a model given as a Hugging Face directory, a .safetensors file or a state dict.

    ``follow_links``: read files of a directory that are symlinks leading out of it (by
    default weights behind one are refused and side files behind one are skipped)."""
    if isinstance(model, TensorSource):
        return model
    if isinstance(model, Mapping):
        return StateDictSource(model)
    path = Path(model)
    if not path.exists():
        raise NotFoundError(f"model {str(path)!r} does not exist; give a Hugging Face directory or a .safetensors file")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise InvalidInputError(
                f"{path}: pickle checkpoints are refused (loading them can execute code); convert it to "
                "safetensors first, e.g. model.save_pretrained(dir, safe_serialization=True)"
            )
        if path.suffix != ".safetensors":
            raise InvalidInputError(f"{path}: expected a .safetensors file or a model directory")
        return SafetensorsSource([path], str(path))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted({path / shard for shard in _weight_map(index).values()})
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise NotFoundError(f"{path}: shards named in {index.name} are missing: {', '.join(missing)}")
    else:
        shards = sorted(path.glob("*.safetensors"))
    for shard in shards:
        real = None if follow_links else _outside(path, shard)
        if real is not None:
            raise InvalidInputError(f"{shard}: leads to {real}, outside the finetune folder {path}; weights are read "
                                    "only from inside it unless links are followed (--follow-links)")
        if not shard.is_file():  # a fifo would block the safetensors reader
            raise InvalidInputError(f"{shard}: not a regular file; give the weights as a .safetensors file")
    if not shards:
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        hint = (f"; found only pickle checkpoints ({', '.join(pickles)}), which are refused because loading them "
                "can execute code: convert them with save_pretrained(..., safe_serialization=True)") if pickles else ""
        raise InvalidInputError(f"{path}: no .safetensors weights found{hint}")
    source = SafetensorsSource(shards, str(path))
    _side_files(path, source, follow_links)
    return source
