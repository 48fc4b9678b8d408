"""Crash safety: a fault at every write step of init, base build, commit, remove and gc.

For each operation a dry run counts its write steps (faults.WRITE_CALLS); then, for each
step k, a fresh copy of the registry sees the operation killed at step k (``os._exit(137)``,
what SIGKILL gives) or see step k fail with an OSError. Afterwards: ``verify`` is clean, the
registry reads exactly as before the operation (or as after it, when the fault came after
its commit point), a retried init succeeds, and one ``gc`` removes every leftover.

CI runs the first and last step and every 5th; ``--run-slow`` runs every step.

On an object store (each test server: S3 and Azure) a write step is one request that
changes the store (faults.STORE_WRITE_CALLS); init, commit, rm and gc are killed at a spread
of their steps (every step with ``--run-slow``): the same checks hold.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from deltastore import NotFoundError, Registry
from deltastore.catalog import is_url
from deltastore.storage.objectstore import ObjectStoreBackend

from conftest import OBJECT_STORES

from . import faults
from .helpers import CLEAN, copy_registry, leftovers, snapshot

OPS = ["init", "base", "commit", "commit_dare", "remove", "gc"]


@pytest.fixture(scope="module")
def ctx():
    return faults.context()


@pytest.fixture(scope="module")
def pristine(tiny, tiny_registry, tmp_path_factory):
    """For each operation, the registry it starts from (init: no folder at all)."""
    root = tmp_path_factory.mktemp("pristine")
    out = {"init": root / "init"}
    for op in OPS[1:]:
        out[op] = copy_registry(tiny_registry.path, root / op)
    # garbage for gc to collect: a removed task, a dead staging folder, a killed put's temp file
    garbage = Registry(out["gc"])
    garbage.commit("gone", tiny.finetunes["c"], message="gone", progress=False)
    garbage.remove("gone")
    (out["gc"] / "staging" / "deadbeef").mkdir(parents=True)
    (out["gc"] / "staging" / "deadbeef" / "x").write_bytes(b"partial")
    (out["gc"] / "refs" / "tasks" / ".t1.0123.tmp").write_bytes(b"half a ref")
    return out


def _run(ctx, op, path, tiny, mode="kill", at=0, log_path=None, env=None) -> int:
    p = ctx.Process(target=faults.with_env, args=(env or {}, "fault_child", op, str(path), str(tiny.root), mode, at,
                                                  str(log_path) if log_path else None))
    p.start()
    p.join(120)
    assert p.exitcode is not None, f"{op}: child hung at step {at}"
    return p.exitcode


def _is_registry(path: str | Path) -> bool:
    if not is_url(path):
        return (Path(path) / "registry.msgpack").exists()
    return ObjectStoreBackend(str(path), check_writes=False).exists("registry.msgpack")


def _state(path: str | Path):
    if not _is_registry(path):
        with pytest.raises(NotFoundError):
            Registry(path)
        return None
    return snapshot(Registry(path))


@pytest.fixture(scope="module")
def dry_runs(ctx, pristine, tiny, tmp_path_factory):
    """op -> (write steps of a clean run, state before, state after)."""
    root = tmp_path_factory.mktemp("dry")
    out = {}
    for op in OPS:
        path = root / op
        if op != "init":
            copy_registry(pristine[op], path)
        before = _state(path)
        assert _run(ctx, op, path, tiny, log_path=root / f"{op}.log") == faults.EXIT_DONE
        steps = (root / f"{op}.log").read_text().splitlines()
        after = _state(path)
        assert after != before or op == "gc"
        out[op] = (steps, before, after)
    return out


def _selected(n: int, full: bool) -> list[int]:
    if full:
        return list(range(1, n + 1))
    return sorted({1, n} | set(range(5, n + 1, 5)))


def _check_after_fault(op, path, tiny, before, after, at, mode, code, steps):
    where = f"{op}, {mode} at write step {at}/{len(steps)} ({steps[at - 1]}), exit {code}"
    if op == "init" and not _is_registry(path):
        # A killed init leaves no registry (registry.msgpack is its last write) ...
        with pytest.raises(NotFoundError):
            Registry(path)
        # ... and the next init over its leftovers succeeds.
        Registry.init(path, tiny.reference, progress=False)
        state = snapshot(Registry(path))
        assert state == after, where
    reg = Registry(path)
    assert reg.verify() == [], where
    state = snapshot(reg)
    assert state in (before, after), where
    if code in (faults.EXIT_FAILED, faults.EXIT_OTHER) and mode == "fail":
        assert code == faults.EXIT_FAILED, where  # the OSError surfaced as itself
    faults.collect(reg)
    assert leftovers(reg) == CLEAN, where
    assert reg.verify() == [], where
    assert snapshot(reg) == state, where


@pytest.mark.parametrize("mode", ["kill", "fail"])
@pytest.mark.parametrize("op", OPS)
def test_fault_at_write_steps(op, mode, ctx, pristine, dry_runs, tiny, tmp_path, request):
    steps, before, after = dry_runs[op]
    assert steps, f"{op} made no write step"
    full = request.config.getoption("--run-slow")
    chosen = _selected(len(steps), full)
    if mode == "fail" and not full:
        chosen = chosen[::2] + [len(steps)]  # the kill sweep already covers the spread
    for at in sorted(set(chosen)):
        path = tmp_path / f"{op}-{at}"
        if op != "init":
            copy_registry(pristine[op], path)
        code = _run(ctx, op, path, tiny, mode, at)
        if mode == "kill":
            assert code == faults.EXIT_KILLED, f"{op}: step {at} was not reached"
        _check_after_fault(op, path, tiny, before, after, at, mode, code, steps)
        shutil.rmtree(path)
    print(f"\n{op} {mode}: {len(set(chosen))} of {len(steps)} write steps faulted")


def test_real_sigkill_mid_commit(ctx, pristine, dry_runs, tiny, tmp_path):
    """kill -9 from outside while a commit is publishing its arrays."""
    _, before, after = dry_runs["commit"]
    path = copy_registry(pristine["commit"], tmp_path / "registry")
    published = tmp_path / "published"
    p = ctx.Process(target=faults.slow_commit_child, args=(str(path), str(tiny.root), str(published)))
    p.start()
    deadline = time.time() + 60
    # The first publish: a commit of the tiny finetune publishes few objects (its small arrays
    # are one bundle, format.md §5.9), and it pauses after each.
    while time.time() < deadline and int((published.exists() and published.read_text()) or 0) < 1:
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    assert int(published.read_text()) >= 1  # it died mid-write: something was published
    reg = Registry(path)
    assert reg.verify() == []
    assert snapshot(reg) == before
    assert leftovers(reg) != CLEAN  # the killed commit did leave something ...
    reg.gc()
    assert leftovers(reg) == CLEAN  # ... that gc removes
    assert snapshot(reg) == before


STORE_OPS = ["init", "commit", "remove", "gc"]


@pytest.fixture(scope="module", params=OBJECT_STORES)
def store_dry_runs(request, ctx, pristine, tiny, tmp_path_factory):
    """As dry_runs, on each test object store: op -> (write steps, state before, state after),
    a function placing a fresh copy of the op's starting registry in its bucket, and the
    server (its environment is given to the children)."""
    import uuid

    from .helpers import upload_registry

    def place(op: str) -> str:
        url = server.url(f"crash-{op}-{uuid.uuid4().hex}")
        if op == "gc":  # the local garbage's killed-put temp file has no counterpart in a bucket
            upload_registry(pristine[op], url)
            ObjectStoreBackend(url, check_writes=False).delete("refs/tasks/.t1.0123.tmp")
        elif op != "init":
            upload_registry(pristine[op], url)
        else:
            ObjectStoreBackend(url)  # its probe's put creates the bucket on a fresh server
        return url

    server = request.getfixturevalue(request.param)
    root = tmp_path_factory.mktemp(f"{request.param}dry")
    out = {}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in server.env.items():
            patch.setenv(name, value)
        for op in STORE_OPS:
            url = place(op)
            before = _state(url)
            assert _run(ctx, op, url, tiny, log_path=root / f"{op}.log", env=server.env) == faults.EXIT_DONE
            steps = (root / f"{op}.log").read_text().splitlines()
            out[op] = (steps, before, _state(url))
    return out, place, server


@pytest.mark.parametrize("op", STORE_OPS)
def test_kill_at_write_steps_on_an_object_store(op, ctx, store_dry_runs, tiny, monkeypatch, request):
    dry, place, server = store_dry_runs
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    steps, before, after = dry[op]
    assert steps, f"{op} made no write step"
    n = len(steps)
    chosen = range(1, n + 1) if request.config.getoption("--run-slow") else sorted({1, n // 3, 2 * n // 3, n} - {0})
    for at in chosen:
        url = place(op)
        assert _run(ctx, op, url, tiny, "kill", at, env=server.env) == faults.EXIT_KILLED, f"{op}: step {at}"
        _check_after_fault(op, url, tiny, before, after, at, "kill", faults.EXIT_KILLED, steps)
    print(f"\n{op} on {request.node.callspec.params['store_dry_runs']}: {len(chosen)} of {n} write steps killed")
