"""The engine (deltastore/engine/) against a plain per-tensor decode, bit for bit.

The plain decode (:func:`reference_state`) reads each stored entry with the public per-tensor
functions and rebuilds it with ``dbms.reconstruct``, one tensor at a time, no threads. CPU tests
run the streaming pipeline and the resident switch with the compressors' reference decoders
(and with the fused Triton kernels through Triton's interpreter when ``TRITON_INTERPRET=1`` and
Triton is installed); the ``cuda`` tests run the real kernels, pinned staging and side streams.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from deltastore import Registry
from deltastore.dtypes import torch_dtype
from deltastore.engine import reader as readers
from deltastore.engine import resident as residents
from deltastore.engine.decode import decode_code, decode_stored, lossless, unpack
from deltastore.engine.resident import ResidentModel
from deltastore.errors import CorruptObjectError, NotFoundError
from deltastore.storage.records import BaseRecord, ReferenceRecord
from deltastore.tensor import dbms
from deltastore.tensor.fused import triton_enabled

# task name -> (finetune of the example, method, config, base)
TASKS = {
    "bd_base": ("has_top", "bitdelta", {}, "all"),
    "bd_plain": ("small_count", "bitdelta", {}, None),
    "dare16": ("has_small", "dare", {"drop_rate": 0.9, "value_bits": 16}, "all"),
    "dare8": ("has_top", "dare", {"drop_rate": 0.99, "value_bits": 8}, "all"),
    "dare_plain": ("small_count", "dare", {"drop_rate": 0.9}, None),
    "dare_hash": ("has_small", "dare", {"drop_rate": 0.9, "value_bits": 8, "layout": "hash"}, "all"),  # format 1.0
    "deltadq": ("has_small", "deltadq", {"group_size": 16, "keep": 2, "bits": 4}, "all"),
    "bd_base2": ("has_small", "bitdelta", {}, "all"),
}


@pytest.fixture(scope="module")
def registry(base_registry, example, tmp_path_factory):
    path = tmp_path_factory.mktemp("engine") / "registry"
    shutil.copytree(base_registry.path, path)
    reg = Registry(path)
    for task, (ft, method, config, base) in TASKS.items():
        reg.commit(task, example.finetunes[ft], method=method, config=config, base=base, progress=False)
    return reg


def reference_state(registry: Registry, task: str) -> dict[str, torch.Tensor]:
    """specs/format.md §6 written out with the per-tensor decode functions, on the CPU."""
    _, record = registry.version(task)
    reference = registry.objects.get_record(record.reference, ReferenceRecord)
    base = registry.objects.get_record(record.base, BaseRecord) if record.base else None

    objects = registry.objects.reading(record)  # its bundled arrays from its bundle (format.md §5.9)

    def array(digest, what):
        return objects.get_array(digest, what=what)

    packed = unpack(registry.objects, record, reference)  # specs/format.md §5.8
    out = {}
    for name, entry in record.tensors.items():
        if name in packed:
            out[name] = lossless(entry, packed[name], "cpu")
            continue
        if not entry.is_delta:
            out[name] = decode_stored(entry, array, "cpu")
            continue
        lam1 = record.lam1 if entry.lam1 is None else entry.lam1
        lam2 = record.lam2 if entry.lam2 is None else entry.lam2
        w_pre = dbms.as_matrix(decode_stored(reference.tensors[entry.ref], array, "cpu"))
        rows, decoded = decode_code(entry, array, "cpu")
        tau_rows = None
        if base is not None and entry.ref in base.tensors:
            tau_rows = dbms.as_matrix(decode_stored(base.tensors[entry.ref], array, "cpu"))[rows]
        value = dbms.reconstruct(w_pre, rows, decoded, tau_rows, lam1, lam2)
        out[name] = value.reshape(entry.shape).to(torch_dtype(entry.dtype))
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's raw bits (so -0.0 vs 0.0 and NaN payloads count)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bool:
        return t
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(width)


def assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        assert torch.equal(bits(got[name]), bits(want[name])), name


@pytest.mark.parametrize("task", list(TASKS))
def test_streaming_equals_materialize_cpu(registry, task):
    want = reference_state(registry, task)
    got = registry.materialize(task, device="cpu", workers=3)
    assert_same(got, want)


def test_streaming_dtype_cast(registry):
    want = {n: t.to(torch.float16) if t.is_floating_point() else t for n, t in
            reference_state(registry, "bd_base").items()}
    got = registry.materialize("bd_base", device="cpu", dtype=torch.float16)
    assert_same(got, want)


def test_streaming_reads_ahead_within_budget(registry, monkeypatch):
    """With a 1-byte budget the reader holds one tensor beyond the one being decoded, never more."""
    started = []
    original = readers.DeviceReader._read

    def spy(self, item):
        started.append(item.name)
        return original(self, item)

    monkeypatch.setattr(readers.DeviceReader, "_read", spy)
    seen = 0
    for _name, _value in registry.iter_materialize("bd_base", device="cpu", read_ahead_bytes=1, workers=4):
        seen += 1
        assert len(started) <= seen + 1
    assert seen == len(started)


def test_resident_switch_back_and_forth_cpu(registry):
    resident = ResidentModel(registry, device="cpu")
    order = ["bd_base", "dare16", "bd_base", "deltadq", "dare8", "dare_hash", "bd_base"]
    pointers = None
    for task in order:
        resident.switch(task)
        want = registry.materialize(task, device="cpu")
        assert_same({n: resident.tensors[n] for n in want}, want)
        if task == "bd_base":
            now = {n: resident.tensors[n].data_ptr() for n in want}
            assert pointers is None or now == pointers  # rewritten in place, never reallocated
            pointers = now


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_resident_switch_transformers_model_in_place(registry, device):
    model = registry.load_model("bd_base", device=device)  # has_top: 2 labels, like has_small
    params = dict(model.named_parameters())
    pointers = {n: p.data_ptr() for n, p in params.items()}
    resident = ResidentModel(registry, model, device=device)
    for task in ("bd_base2", "bd_base", "bd_base2"):
        resident.switch(task)
        want = registry.materialize(task, device="cpu")
        state = model.state_dict()
        assert_same({n: state[n] for n in want}, want)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers
    assert all(p is params[n] for n, p in model.named_parameters())


def test_resident_unknown_tensor_is_an_error(registry):
    resident = ResidentModel(registry, {"nothing": torch.zeros(1)}, device="cpu")
    with pytest.raises(NotFoundError, match="no counterpart"):
        resident.switch("bd_base")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_streaming_corrupt_array_raises_from_reader_thread(registry, tmp_path, device):
    """A damaged array read by a reader thread fails the materialize with the tensor's name,
    never yields weights from it, and the other reads are cancelled."""
    from deltastore.storage.objects import object_key

    copy = tmp_path / "registry"
    shutil.copytree(registry.path, copy)
    reg = Registry(copy)
    _, record = reg.version("bd_base")
    name, entry = next((n, e) for n, e in record.tensors.items() if e.is_delta)
    signs = entry.arrays["signs"]
    # The array's own folder, or the version's bundle holding it (format.md §5.9), which every
    # delta tensor of the version then fails on.
    damaged = record.bundle if signs in {b.name for b in record.bundled} else signs
    chunk = copy / object_key("arrays", damaged) / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    seen = []
    with pytest.raises(CorruptObjectError, match="content hash|not a valid zstd|corrupt") as info:
        for got, _ in reg.iter_materialize("bd_base", device=device, workers=4):
            seen.append(got)
    failed = name if damaged == signs else next(n for n, e in record.tensors.items() if e.is_delta and n in str(info.value))
    assert damaged[:12] in str(info.value) and failed not in seen


@pytest.mark.skipif(not triton_enabled(torch.device("cpu")), reason="Triton interpreter not enabled")
@pytest.mark.parametrize("task", ["bd_base", "bd_plain", "dare16", "dare8", "dare_plain", "dare_hash"])
def test_kernels_interpreted_equal_materialize(registry, task):
    """The Triton kernels themselves, run on the CPU by Triton's interpreter."""
    want = reference_state(registry, task)
    assert_same(registry.materialize(task, device="cpu"), want)
    resident = ResidentModel(registry, device="cpu")
    resident.switch(task)
    assert_same({n: resident.tensors[n] for n in want}, want)


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.skipif(not triton_enabled(torch.device("cpu")),
                                                 reason="Triton interpreter not enabled")),
    pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize(("rows", "cols", "drop_rate", "value_bits", "base", "changed"), [
    (40, 64, 0.9, 16, True, 0.6),     # some rows unchanged (row map), base sign bytes loaded as vectors
    (40, 67, 0.9, 8, True, 0.6),      # cols % 8 != 0: the per-element base path; int8 scales
    (1100, 128, 0.99, 16, True, 1.0),  # three blocks of the layout
    (20, 24, 0.0, 8, False, 0.5),     # every element kept: many rounds of draws per block
])
def test_dare_gaps_kernels_equal_reference(device, rows, cols, drop_rate, value_bits, base, changed):
    """The gaps decoder's two kernels against dbms.reconstruct of the reference decode, bit for
    bit, with a negative lam2 (signed zeros) and a reference holding -0.0."""
    from deltastore.tensor.bitpack import pack_bits
    from deltastore.tensor.compressors import get_compressor
    from deltastore.tensor.fused import BaseTerm, FusedJob

    g = torch.Generator().manual_seed(rows + cols)
    compressor = get_compressor("dare", {"drop_rate": drop_rate, "value_bits": value_bits, "layout": "gaps"})
    mask = torch.rand(rows, generator=g) < changed
    mask[0] = True
    count = int(mask.sum())
    encoded = compressor.encode(torch.randn(count, cols, generator=g) * 0.01, seed=77).to(device)
    w_pre = torch.randn(rows, cols, generator=g).to(torch.float16)
    w_pre[0, :5] = -0.0
    trow = torch.where(mask, torch.cumsum(mask.int(), 0) - 1, -1).int()
    lam1, lam2 = 0.7, -1.3
    base_term, tau_rows = None, None
    if base:
        bmask = torch.rand(rows, generator=g) < 0.7
        bsigns = torch.rand(int(bmask.sum()) * cols, generator=g) < 0.5
        brow = torch.where(bmask, torch.cumsum(bmask.int(), 0) - 1, -1).int()
        base_term = BaseTerm(brow.to(device), pack_bits(bsigns).to(device), 0.0123, int(bmask.sum()))
        scale = torch.tensor(0.0123)
        tau_rows = dbms.expand_rows(torch.where(bsigns, scale, -scale).view(-1, cols), bmask)[mask]
    decoded = compressor.decode(encoded, (count, cols), "cpu")
    want = dbms.reconstruct(w_pre, mask, decoded, tau_rows, lam1, lam2).to(torch.float16)
    job = FusedJob("t", rows, cols, count, dict(encoded.attrs), lam1, lam2, w_pre.to(device), trow.to(device),
                   dict(encoded.arrays), base_term)
    fused = compressor.fused_decoder()
    fused.check(job)
    job.prepared.update(fused.prepare(job))
    out = torch.empty(rows, cols, dtype=torch.float16, device=device)
    fused.run(job, out)
    assert torch.equal(bits(out), bits(want))


# -- CUDA ------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("task", list(TASKS))
def test_cuda_streaming_equals_cpu_materialize(registry, task):
    want = registry.materialize(task, device="cpu")
    got = registry.materialize(task, device="cuda", workers=4)
    assert all(t.is_cuda for t in got.values())
    assert_same(got, want)


@pytest.mark.cuda
@pytest.mark.parametrize(("task", "decoder"), [("dare16", "DareGapsFused"), ("dare_hash", "DareFused")])
def test_cuda_registry_materialize_uses_fused_kernels(registry, monkeypatch, task, decoder):
    from deltastore.tensor.compressors.dare import fused, fused_gaps

    cls = getattr(fused_gaps if decoder == "DareGapsFused" else fused, decoder)
    calls = []
    original = cls.run

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(cls, "run", spy)
    want = registry.materialize(task, device="cpu")
    assert_same(registry.materialize(task, device="cuda"), want)
    assert calls


@pytest.mark.cuda
def test_cuda_staging_pool_tiny_slots(registry):
    """Arrays far larger than a staging slot, through a pool of two 4 KiB slots."""
    want = registry.materialize("bd_base", device="cpu")
    got = registry.materialize("bd_base", device="cuda", staging_bytes=8192, read_ahead_bytes=1)
    assert_same(got, want)
    pool = readers.StagingPool(8192, 4096)
    src = torch.randn(100_003)
    dst = torch.empty_like(src, device="cuda")
    pool.upload(src, dst, torch.cuda.current_stream())
    assert torch.equal(dst.cpu(), src)


@pytest.mark.cuda
@pytest.mark.parametrize("cache", ["pinned", "gpu", "none"])
def test_cuda_resident_switch_back_and_forth(registry, cache, monkeypatch):
    # many pieces, growing from 1 KiB: every per-piece wait is exercised
    monkeypatch.setattr(residents, "FIRST_UPLOAD_PIECE_BYTES", 1024)
    monkeypatch.setattr(residents, "UPLOAD_PIECE_BYTES", 4096)
    resident = ResidentModel(registry, device="cuda", cache=cache)
    pointers = None
    for task in ["bd_base", "dare16", "dare8", "bd_base", "deltadq", "dare_hash", "bd_plain", "bd_base"]:
        resident.switch(task)
        want = registry.materialize(task, device="cpu")
        assert_same({n: resident.tensors[n] for n in want}, want)
        if task == "bd_base":  # the classifier head's shape differs between tasks: it is reallocated
            now = {n: resident.tensors[n].data_ptr() for n in want if not n.startswith("classifier.")}
            assert pointers is None or now == pointers
            pointers = now


@pytest.mark.cuda
@pytest.mark.parametrize("cache", ["pinned", "gpu"])
def test_cuda_resident_switch_replays_graphs(registry, cache, monkeypatch):
    """From a task's second switch on, its switch is a CUDA graph replay, with the same bits;
    a task without a fused decoder (deltadq) keeps switching eagerly. The tasks share one
    finetune, so the target tensors stay the same and no graph goes stale."""
    monkeypatch.setattr(residents, "FIRST_UPLOAD_PIECE_BYTES", 1024)
    monkeypatch.setattr(residents, "UPLOAD_PIECE_BYTES", 4096)
    resident = ResidentModel(registry, device="cuda", cache=cache)
    tasks = ["dare16", "dare_hash", "bd_base2", "deltadq"]
    wants = {task: registry.materialize(task, device="cpu") for task in tasks}
    for _ in range(3):
        for task in tasks:
            resident.switch(task)
            assert_same({n: resident.tensors[n] for n in wants[task]}, wants[task])
    assert [resident.load(t).graph is not None for t in tasks] == [True, True, True, False]


@pytest.mark.cuda
def test_cuda_multi_chunk_arrays_hashed_behind_the_read_through_reused_slots(tmp_path, monkeypatch):
    """Many 1 KiB chunks, two 2 KiB slots: a slot is refilled only once the hash running behind
    the read has read it (ArrayReader.read_chunk's future), so the bytes and the check hold;
    a damaged middle chunk is still found."""
    from deltastore.storage import layout
    from deltastore.storage import objects as objects_module
    from deltastore.storage.backend import LocalBackend
    from deltastore.storage.objects import ObjectStore, object_key

    monkeypatch.setattr(layout, "CHUNK_BYTES", 1024)
    monkeypatch.setattr(objects_module, "HASH_BEHIND_MIN_BYTES", 0)
    objects = ObjectStore(LocalBackend(tmp_path))
    value = torch.randn(40_000)  # 157 chunks
    digest = objects.put_array(value, objects.new_txn(), compress=True)
    reader = readers.DeviceReader(objects, torch.device("cuda", 0), True, staging_bytes=4096)
    for _ in range(3):
        got, event = reader.run(reader.array, digest, "value")
        event.synchronize()
        assert torch.equal(got.cpu(), value)
    damaged = objects.put_array(value + 1, objects.new_txn(), compress=False)
    chunk = tmp_path / object_key("arrays", damaged) / "77"
    raw = bytearray(chunk.read_bytes())
    raw[3] ^= 1
    chunk.write_bytes(bytes(raw))
    with pytest.raises(CorruptObjectError, match="content hash"):
        reader.run(reader.array, damaged, "damaged")


@pytest.mark.cuda
def test_cuda_device_reader_streams_source_tensors_in_tiny_slots(example):
    """DeviceReader.source (commit's finetune reads) with two 8 KiB slots: many pieces per tensor."""
    from deltastore.sources import open_source

    source = open_source(example.finetunes["has_top"])
    reader = readers.DeviceReader(None, torch.device("cuda", 0), True, staging_bytes=8192)
    for name in source.names():
        got, event = reader.run(reader.source, source, name)
        event.synchronize()
        assert torch.equal(got.cpu(), source.get(name))
