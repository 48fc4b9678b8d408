"""Commits and base builds fanned out on Dask (deltastore/engine/fanout.py): a local cluster of
two worker processes commits a dozen tiny finetunes while one job's finetune is corrupt and
one worker is killed mid-job; every other job lands, the registry verifies, a rerun completes
only what is missing; a base vector built on the cluster has the bits of one built here. Each
runs on a local registry and on one in the test S3 server's bucket."""

from __future__ import annotations

import json
import os
import sys
import uuid

import cloudpickle
import pytest
import torch
from click.testing import CliRunner
from distributed import Client, WorkerPlugin

from deltastore import Registry
from deltastore.engine.fanout import local_cluster, read_jobs
from deltastore.errors import InvalidInputError, NotFoundError
from deltastore_cli.main import cli
from reliability.helpers import finetune_state, reference_state, write_model

TASKS = 12
METHODS = [("bitdelta", ""), ("dare", "drop_rate=0.5 value_bits=8"), ("deltadq", "bits=4")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny reference and TASKS finetunes of it (each a folder with its own config.json)."""
    root = tmp_path_factory.mktemp("fanout")
    ref = reference_state()
    finetunes = {f"t{i:02d}": write_model(root / "finetunes" / f"t{i:02d}", finetune_state(i % 10, ref),
                                           {"task": f"t{i:02d}"}) for i in range(TASKS)}
    return root, write_model(root / "reference", ref), finetunes


@pytest.fixture(scope="module")
def client():
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    with local_cluster(2) as cluster, Client(cluster) as client:
        yield client


def _jobs_file(root, finetunes, extra=()):
    lines = []
    for i, (task, path) in enumerate(finetunes.items()):
        method, config = METHODS[i % len(METHODS)]
        job = {"task": task, "path": str(path.relative_to(root)), "method": method, "config": config,
               "message": f"fanout {task}"}
        if i % 2:
            job["base"] = "b"
        lines.append(json.dumps(job))
    lines += [json.dumps(job) for job in extra]
    path = root / f"jobs-{uuid.uuid4().hex[:8]}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


class Environ(WorkerPlugin):
    """Sets environment variables in every worker, also one started after a kill."""

    def __init__(self, env: dict[str, str]):
        self.env = env

    def setup(self, worker):
        os.environ.update(self.env)


@pytest.fixture(params=["local", "s3"])
def new_registry(request, models, client, tmp_path):
    """A function making a new registry of the tiny reference: in a folder, or in the test
    bucket."""
    _, reference, _ = models
    if request.param == "local":
        return lambda name: Registry.init(tmp_path / name, reference, progress=False)
    s3 = request.getfixturevalue("s3_env")
    client.register_plugin(Environ(s3.env), name="s3-environ")  # the workers started before the fixture set it
    request.addfinalizer(lambda: client.unregister_worker_plugin("s3-environ"))
    return lambda name: Registry.init(f"s3://{s3.bucket}/{name}-{uuid.uuid4().hex}", reference, progress=False)


class KillOnce(WorkerPlugin):
    """Kills its worker's process (as SIGKILL would) when a commit stores a side file holding
    ``needle``, once: after the job's arrays are stored, before its version is published."""

    def __init__(self, marker: str, needle: bytes):
        self.marker, self.needle = marker, needle

    def setup(self, worker):
        from deltastore.storage.objects import ObjectStore

        original, marker, needle = ObjectStore.put_blob, self.marker, self.needle

        def put_blob(store, data, txn, *args, **kwargs):
            if needle in data and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(137)
            return original(store, data, txn, *args, **kwargs)

        ObjectStore.put_blob = put_blob


def test_commit_many_survives_a_corrupt_finetune_and_a_killed_worker(models, client, new_registry, tmp_path):
    root, reference, finetunes = models
    reg = new_registry("registry")
    reg.build_base("b", list(finetunes.values())[:3], progress=False)
    corrupt = root / "corrupt"
    corrupt.mkdir(exist_ok=True)
    (corrupt / "model.safetensors").write_bytes((finetunes["t00"] / "model.safetensors").read_bytes()[:300])
    jobs = read_jobs(_jobs_file(root, finetunes, [{"task": "broken", "path": "corrupt"}]))
    victim = "t05"
    marker = tmp_path / "killed"
    client.register_plugin(KillOnce(str(marker), f'"task": "{victim}"'.encode()), name="kill-once")
    try:
        lines = []
        summary = reg.commit_many(jobs, client, progress=True, echo=lines.append)
    finally:
        client.unregister_worker_plugin("kill-once")
    assert marker.exists(), "the worker was never killed: the test did not test that"
    by_task = {r["task"]: r for r in summary["results"]}
    assert (summary["done"], summary["skipped"], summary["failed"]) == (TASKS, 0, 1), summary
    assert by_task["broken"]["status"] == "failed" and "corrupt" in by_task["broken"]["error"]
    assert len(lines) == TASKS + 1 and any(line.startswith("[") and "failed broken" in line for line in lines)
    assert sorted(reg.tasks()) == sorted(finetunes)
    assert reg.verify() == []
    assert summary["bytes_on_disk"] == sum(reg.own_bytes(t) for t in finetunes)
    for i, task in enumerate(finetunes):
        record = reg.version(task)[1]
        assert (record.version, record.method, record.message) == (1, METHODS[i % 3][0], f"fanout {task}")
        assert (record.base is not None) == bool(i % 2)
    # What a worker committed is what a commit here gives (the killed job's too).
    here = Registry.init(tmp_path / "here", reference, progress=False)
    here.build_base("b", list(finetunes.values())[:3], progress=False)
    job = next(j for j in jobs if j.task == victim)
    here.commit(victim, job.path, method=job.method, config=job.config, base=job.base, progress=False)
    got, want = reg.materialize(victim), here.materialize(victim)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)

    # The rerun: the corrupt finetune is replaced by a good one; only that job runs.
    write_model(corrupt, finetune_state(3), {"task": "broken"})
    again = reg.commit_many(jobs, client)
    assert (again["done"], again["skipped"], again["failed"]) == (1, TASKS, 0)
    assert [r["task"] for r in again["results"] if r["status"] == "done"] == ["broken"]
    assert all(len(reg.version_hashes(t)) == 1 for t in reg.tasks())
    assert reg.verify() == []


def test_base_build_on_the_cluster_has_the_bits_of_one_built_here(models, client, new_registry, tmp_path):
    _, _, finetunes = models
    reg = new_registry("registry")
    here = reg.build_base("here", list(finetunes.values()), progress=False)
    there = reg.build_base("there", list(finetunes.values()), client=client, progress=False)
    assert there.tensors == here.tensors and there.sources == here.sources
    # A cheaper base (issue 16): the workers keep the same rows and leave out the same tensors.
    options = {"exclude": ["lin*"], "row_fraction": 0.3}
    sparse_here = reg.build_base("sparse-here", list(finetunes.values()), progress=False, **options)
    sparse_there = reg.build_base("sparse-there", list(finetunes.values()), client=client, progress=False, **options)
    assert sparse_there.tensors == sparse_here.tensors and "lin.weight" not in sparse_here.tensors
    assert 0 < sum(e.changed_rows for e in sparse_here.tensors.values()) < sum(
        e.changed_rows for r, e in here.tensors.items() if r in sparse_here.tensors)
    assert reg.verify() == []
    state = finetune_state(0)
    state["lin.weight"][3, 5] = float("nan")
    broken = write_model(tmp_path / "nan", state)
    with pytest.raises(InvalidInputError, match="NaN"):
        reg.build_base("nan", [*list(finetunes.values())[:2], broken], client=client, progress=False)
    assert sorted(reg.bases()) == ["here", "sparse-here", "sparse-there", "there"] and reg.verify() == []


def test_the_cli_joins_a_cluster_by_its_address(models, client, tmp_path):
    root, reference, finetunes = models
    reg = Registry.init(tmp_path / "registry", reference, progress=False)
    address = client.scheduler.address
    built = CliRunner().invoke(cli, ["base", "build", str(reg.path), "--name", "b", "--scheduler", address,
                                     *map(str, list(finetunes.values())[:3])])
    assert built.exit_code == 0, built.output
    jobs = _jobs_file(root, dict(list(finetunes.items())[:4]), [{"task": "gone", "path": "no/such/finetune"}])
    refused = CliRunner().invoke(cli, ["commit-many", str(reg.path), str(jobs), "--scheduler", address])
    assert refused.exit_code == 1 and f"{jobs}:5: field path" in refused.output and not reg.tasks()
    (root / "empty").mkdir(exist_ok=True)  # passes the check (it exists), fails on its worker
    jobs.write_text("".join(jobs.read_text().splitlines(keepends=True)[:4]) + '{"task": "empty", "path": "empty"}\n')
    result = CliRunner().invoke(cli, ["commit-many", str(reg.path), str(jobs), "--scheduler", address, "--json"])
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    assert (summary["done"], summary["failed"]) == (4, 1) and summary["ratio_fp16"] > 1
    assert "no .safetensors weights found" in summary["results"][4]["error"]
    assert sorted(reg.tasks()) == sorted(list(finetunes)[:4])
    text = CliRunner().invoke(cli, ["commit-many", str(reg.path), str(jobs), "--scheduler", address])
    assert text.exit_code == 1 and "0 committed, 4 skipped (nothing to commit), 1 failed of 5 jobs" in text.output
    assert "failed:\n  line 5 empty: " in text.output


@pytest.mark.parametrize("text, message", [
    ('{"task": "a", "path": "ft"}\n{"task": "a b", "path": "ft"}\n', r"jobs.jsonl:2: invalid task name 'a b'"),
    ('{"task": "a", "path": "ft"}\n\n{"task": "a", "path": "ft"}\n', r"jobs.jsonl:3: field task: .* line 1"),
    ('{"task": "a"}\n', r"jobs.jsonl:1: field path is missing"),
    ('{"task": "a", "path": "ft", "lr": 1}\n', r"jobs.jsonl:1: unknown field\(s\) lr"),
    ('{"task": "a", "path": "nowhere"}\n', r"jobs.jsonl:1: field path: expected a finetune .* found 'no such path"),
    ('{"task": "a", "path": "ft", "method": "zip"}\n', r"jobs.jsonl:1: field method: expected a compressor"),
    ('{"task": "a", "path": "ft", "method": "dare", "config": "drop_rate=lots"}\n',
     r"jobs.jsonl:1: field config: .*drop_rate"),
    ('{"task": "a", "path": "ft", "config": "bits=4"}\n', r"jobs.jsonl:1: field config: .*unknown .*bits"),
    ('{"task": "a", "path": "ft", "tune": "dbms"}\n', r"jobs.jsonl:1: field calib is missing"),
    ('{"task": "a", "path": "ft", "base": 3}\n', r"jobs.jsonl:1: field base: expected a string, found 3"),
    ('["a", "ft"]\n', r"jobs.jsonl:1: expected a JSON object, found list"),
    ("", r"jobs.jsonl: holds no jobs"),
])
def test_a_bad_jobs_file_is_refused_naming_line_and_field(tmp_path, text, message):
    (tmp_path / "ft").mkdir()
    (tmp_path / "jobs.jsonl").write_text(text)
    with pytest.raises(InvalidInputError, match=message):
        read_jobs(tmp_path / "jobs.jsonl")


def test_a_csv_jobs_file_reads_like_jsonl(tmp_path):
    (tmp_path / "ft").mkdir()
    (tmp_path / "jobs.csv").write_text("task,path,method,config,base\n"
                                       "a,ft,dare,drop_rate=0.9 value_bits=8,\n\n"
                                       "b,ft,,,v1\n")
    a, b = read_jobs(tmp_path / "jobs.csv")
    assert (a.line, a.task, a.method, a.config["drop_rate"], a.config["value_bits"], a.base) == (2, "a", "dare", 0.9,
                                                                                                  8, None)
    assert (b.line, b.method, b.base, b.path) == (4, "bitdelta", "v1", str(tmp_path / "ft"))
    (tmp_path / "bad.csv").write_text("task,path\na,ft,extra\n")
    with pytest.raises(InvalidInputError, match=r"bad.csv:2: expected 2 cells"):
        read_jobs(tmp_path / "bad.csv")




def test_the_api_takes_mappings_and_refuses_two_jobs_of_one_task(models, client, tmp_path):
    _, reference, finetunes = models
    reg = Registry.init(tmp_path / "registry", reference, progress=False)
    twice = [{"task": "a", "path": str(finetunes["t00"])}, {"task": "a", "path": str(finetunes["t01"])}]
    with pytest.raises(InvalidInputError, match=r"jobs:2: field task: task 'a' is also the job of line 1"):
        reg.commit_many(twice, client)
    with pytest.raises(NotFoundError, match="no base vector named 'nope'"):
        reg.commit_many([{"task": "a", "path": str(finetunes["t00"]), "base": "nope"}], client)
    summary = reg.commit_many(twice[:1], client)
    assert (summary["done"], summary["results"][0]["version"]) == (1, 1) and reg.tasks() == ["a"]


def test_the_bitdelta_scale_does_not_depend_on_the_thread_count():
    """What lets a worker with other thread counts than this process build the same base vector:
    torch's own mean of over 32768 elements changes its last bits with the thread count."""
    from deltastore.tensor.compressors.bitdelta import SERIAL_SUM, BitDelta

    x = torch.randn(300, 1000, generator=torch.Generator().manual_seed(1)) * 1e-3
    small = x[: SERIAL_SUM // 1000]
    threads = torch.get_num_threads()
    try:
        scales, means = set(), set()
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            scales.add(BitDelta().encode(x, seed=0).attrs["scale"])
            means.add(float(x.abs().mean()))
            assert BitDelta().encode(small, seed=0).attrs["scale"] == float(small.abs().mean())  # as before
    finally:
        torch.set_num_threads(threads)
    assert len(scales) == 1
    assert len(means) > 1, "torch's mean no longer depends on the thread count: the test proves nothing"


@pytest.mark.cuda
def test_a_local_cluster_encodes_on_the_gpu(models, tmp_path):
    """On a machine with a GPU, the first worker of a local cluster gets it and encodes there."""
    root, reference, finetunes = models
    reg = Registry.init(tmp_path / "registry", reference, progress=False)
    reg.build_base("b", list(finetunes.values())[:3], progress=False)
    with local_cluster(1) as cluster, Client(cluster) as gpu_client:
        summary = reg.commit_many(read_jobs(_jobs_file(root, dict(list(finetunes.items())[:2]))), gpu_client)
    assert [r["device"] for r in summary["results"]] == ["cuda", "cuda"] and summary["done"] == 2


def test_a_job_with_a_calibration_file_fits_its_lambdas_and_is_skipped_when_run_again(example, registry_copy,
                                                                                     tmp_path, one_thread):
    """A job's `tune`/`calib` fields, run as a worker runs it (here in this process: cpu)."""
    from deltastore.engine.fanout import run_job

    (tmp_path / "calib.jsonl").write_text("".join(json.dumps({"input_ids": row.tolist()}) + "\n"
                                                  for row in example.calibration))
    finetune = next(iter(example.finetunes.values()))
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"task": "fit", "path": str(finetune), "base": "all",
                                                     "tune": "dbms", "calib": "calib.jsonl"}) + "\n")
    [job] = read_jobs(tmp_path / "jobs.jsonl")
    first = run_job(Registry, str(registry_copy.path), job)
    assert (first.status, first.version, first.device, first.error) == ("done", 1, "cpu", "")
    record = registry_copy.version("fit")[1]
    assert record.tuning["tuner"] == "dbms" and record.tuning["calibration"]["examples"] == len(example.calibration)
    assert run_job(Registry, str(registry_copy.path), job).status == "skipped"
