"""Where the host time of reading a registry goes: file read, zstd decode, zarr, sha256.

benchmarks/results/speed.md found materialize with nothing resident 4.2x slower than
safetensors and blamed the host read path without a profile. This script measures that path
stage by stage, per GB, on the machine it runs on, for reference-like data (random bf16
matrices of Llama-7B MLP shape, stored as the registry stores them: uint16 carrier, zstd):

- ``file read``: the chunk files' bytes into memory (page cache warm);
- ``zstd decode``: numcodecs decoding those chunks;
- ``zarr read``: ``zarr.open_array(...)[...]``, what the registry does (read + decode + assembly);
- ``sha256``: the content-hash check done on every read unless ``verify=False``;
- ``zarr, uncompressed``: the same array written without zstd;
- ``deltastore get_array``: the registry's own reader (chunk files decoded with zstandard,
  sha256 included), on one thread and with one thread per array, as streaming materialize
  reads; beside it zarr with one thread per array;
- an embedding-shaped array (32000 x 4096 bf16, 262 MB) read alone with the sha256 in line and
  on a thread of its own behind the read (the default for arrays this large), alternated.

    python benchmarks/read_profile.py [--matrices 4]

Writes benchmarks/results/read_profile.{md,json}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    import zarr
    from numcodecs import Zstd

    from concurrent.futures import ThreadPoolExecutor

    from deltastore.storage import objects as objects_module
    from deltastore.storage.backend import LocalBackend
    from deltastore.storage.layout import write_array
    from deltastore.storage.objects import ObjectStore

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrices", type=int, default=4, help="11008 x 4096 bf16 matrices (90 MB each)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    gen = torch.Generator().manual_seed(0)
    arrays = [(torch.randn(11008, 4096, generator=gen) * 0.02).to(torch.bfloat16).view(torch.int16).numpy()
              for _ in range(args.matrices)]
    gb = sum(a.nbytes for a in arrays) / 1e9
    stages: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        backend = LocalBackend(tmp)
        for i, data in enumerate(arrays):
            write_array(backend, f"z{i}", data, compress=True)
            write_array(backend, f"u{i}", data, compress=False)
        zstd_bytes = sum(backend.size(f"z{i}") for i in range(len(arrays)))
        chunk_files = [p for i in range(len(arrays)) for p in sorted(Path(tmp, f"z{i}").iterdir())
                       if p.name != "zarr.json"]
        raw = [p.read_bytes() for p in chunk_files]  # warm the page cache
        codec = Zstd()

        def read_files():
            for p in chunk_files:
                p.read_bytes()

        def decode():
            for b in raw:
                codec.decode(b)

        def zarr_read(prefix):
            def run():
                for i in range(len(arrays)):
                    zarr.open_array(Path(tmp, f"{prefix}{i}"), mode="r")[...]
            return run

        objects = ObjectStore(backend)
        digests = [objects.put_array(torch.from_numpy(a), objects.new_txn()) for a in arrays]
        threads = min(len(arrays), os.cpu_count() or 1)

        def deltastore_read():
            for d in digests:
                objects.get_array(d)

        def in_threads(read_one, names):
            def run():
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(read_one, names))
            return run

        def sha256():
            for a in arrays:
                hashlib.sha256(memoryview(a).cast("B")).digest()

        zarr_read("u")()  # warm
        for name, fn in [("file read", read_files), ("zstd decode", decode), ("zarr read (zstd)", zarr_read("z")),
                         ("zarr read, uncompressed", zarr_read("u")), ("sha256", sha256),
                         ("deltastore get_array (zstd + sha256)", deltastore_read),
                         (f"zarr read (zstd), {threads} threads", in_threads(
                             lambda i: zarr.open_array(Path(tmp, f"z{i}"), mode="r")[...], range(len(arrays)))),
                         (f"deltastore get_array, {threads} threads", in_threads(objects.get_array, digests))]:
            stages[name] = median_seconds(fn, args.repeats)

        # The largest array of a 7B model (its embedding) read alone, the hash in line or on a
        # thread of its own behind the read (objects.HASH_BEHIND_MIN_BYTES), alternated.
        embedding = (torch.randn(32000, 4096, generator=gen) * 0.02).to(torch.bfloat16).view(torch.int16)
        big = objects.put_array(embedding, objects.new_txn())
        big_gb = embedding.numel() * 2 / 1e9
        in_line, behind = [], []
        default = objects_module.HASH_BEHIND_MIN_BYTES
        objects.get_array(big)  # warm
        for _ in range(args.repeats):
            for limit, runs in ((1 << 62, in_line), (default, behind)):
                objects_module.HASH_BEHIND_MIN_BYTES = limit
                start = time.perf_counter()
                objects.get_array(big)
                runs.append(time.perf_counter() - start)
        objects_module.HASH_BEHIND_MIN_BYTES = default
        embedding_rows = {"embedding 32000 x 4096 get_array, sha256 in line": statistics.median(in_line),
                          "embedding 32000 x 4096 get_array, sha256 behind the read (default)": statistics.median(behind)}

    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                   f"torch {torch.__version__}, zarr {zarr.__version__}",
        "data_gb": gb, "zstd_ratio": gb * 1e9 / zstd_bytes,
        "seconds": stages, "gb_per_s": {k: gb / v for k, v in stages.items()},
        "embedding_gb": big_gb, "embedding_seconds": embedding_rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "read_profile.json").write_text(json.dumps(result, indent=2))
    lines = ["# Host read path, stage by stage (benchmarks/read_profile.py)", "",
             f"{result['machine']}. Data: {args.matrices} random bf16 matrices of 11008 x 4096 "
             f"({gb:.2f} GB), as the registry stores reference tensors; zstd shrinks them "
             f"{result['zstd_ratio']:.2f}x. Medians of {args.repeats}; page cache warm; zarr with its default configuration.", "",
             "| stage | seconds | GB/s |", "|---|---|---|"]
    lines += [f"| {k} | {v:.3f} | {gb / v:.2f} |" for k, v in stages.items()]
    lines += [f"| {k} ({big_gb:.2f} GB) | {v:.3f} | {big_gb / v:.2f} |" for k, v in embedding_rows.items()]
    (RESULTS / "read_profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
