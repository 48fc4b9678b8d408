"""Concurrency: several processes writing one registry at once lose nothing, on a local folder
and on each test object store (S3 and Azure).

Refs are updated by compare-and-swap, retried on conflict. On a folder writers hold the shared
side of ``locks/registry`` for their whole write and gc the exclusive one; on an object store
there is no lock: gc keeps what is younger than its grace period, and writers refresh, wait and
re-check before their ref update (specs/format.md §9.2). Processes come from a forkserver (fresh
processes, as separate ``deltastore`` commands would be), started together on a common clock.
"""

from __future__ import annotations

import time

from deltastore import Registry
from deltastore.storage.writes import GRACE_VARIABLE

from . import faults
from .helpers import CLEAN, leftovers, state_hash

# gc's grace period beside the writers on an object store: a write must publish within half of
# it, which a tiny commit does in under a second (a commit slowed past it by a loaded machine
# publishes nothing and is run again: faults._commit).
GRACE_S = 6.0


def _start_all(procs, timeout=120):
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
        assert p.exitcode == faults.EXIT_DONE, f"{p.name} exited with {p.exitcode}"


def test_concurrent_commits_lose_no_update(tiny, tiny_registry, where):
    """Three writers on their own tasks and three on one shared task, two commits each."""
    ctx = faults.context()
    path = where.place(tiny_registry.path)
    start = time.time() + 1.0
    jobs = [(f"own{i}", ["a", "b"], f"own{i}") for i in range(3)]
    jobs += [("shared", ["c", "a"], f"w{i}") for i in range(3)]
    procs = [ctx.Process(target=faults.with_env, args=(where.env, "commit_child", str(path), str(tiny.root), task,
                                                       fts, tag, start), name=tag) for task, fts, tag in jobs]
    _start_all(procs)
    reg = Registry(path)
    for i in range(3):
        assert [n for n, _ in reg.versions(f"own{i}")] == [1, 2]
        assert [r.message for r in reg.log(f"own{i}")] == [f"own{i}:1", f"own{i}:0"]
    shared = reg.version_hashes("shared")
    assert [n for n, _ in shared] == [1, 2, 3, 4, 5, 6]  # no lost update, consecutive numbers
    messages = sorted(reg.version("shared", n)[1].message for n, _ in shared)
    assert messages == sorted(f"w{i}:{j}" for i in range(3) for j in range(2))
    for n, _ in shared:  # each version is whole and parented on the one before it
        record = reg.version("shared", n)[1]
        assert record.parent == (shared[n - 2][1] if n > 1 else None)
        reg.materialize("shared", n)
    assert reg.verify() == []


def test_reader_sees_old_or_new_version(tiny, tiny_registry, tmp_path, where):
    """A reader materializing the latest version in a loop while a writer commits."""
    ctx = faults.context()
    path = where.place(tiny_registry.path)
    stop, seen = tmp_path / "stop", tmp_path / "seen"
    start = time.time() + 0.5
    writer = ctx.Process(target=faults.with_env, args=(where.env, "commit_child", str(path), str(tiny.root), "live",
                                                       ["a", "b", "c", "a", "b"], "live", start))
    reader = ctx.Process(target=faults.with_env, args=(where.env, "reader_child", str(path), "live", str(stop),
                                                       str(seen)))
    reader.start()
    writer.start()
    writer.join(120)
    assert writer.exitcode == faults.EXIT_DONE
    time.sleep(0.2)
    stop.touch()
    reader.join(60)
    assert reader.exitcode == faults.EXIT_DONE
    reg = Registry(path)
    versions = {state_hash(reg.materialize("live", n)): n for n, _ in reg.versions("live")}
    observed = seen.read_text().splitlines()
    assert observed, "the reader never saw a version"
    assert not [o for o in observed if o.startswith("error")], observed[-1]
    assert set(observed) <= set(versions), "the reader saw a state that is no committed version"
    assert max(versions[o] for o in observed) == 5  # it did read during and after the commits


def test_gc_beside_commits_deletes_nothing_in_use(tiny, tiny_registry, tmp_path, where):
    """gc in a loop while writers commit, and while a churner re-creates objects the previous
    round left unreferenced (the objects a gc is about to delete). On an object store gc keeps
    what is younger than GRACE_S, so the churner pauses between rounds for the objects it
    reuses to be that old: gc deletes them while it reuses them."""
    ctx = faults.context()
    path = where.place(tiny_registry.path)
    stop, runs = tmp_path / "stop", tmp_path / "runs"
    start = time.time() + 1.0
    # Writers and gc agree on the grace period through the environment, as deployments do.
    env, pause = ({}, 0.0) if where.kind == "local" else ({**where.env, GRACE_VARIABLE: str(GRACE_S)}, 0.4 * GRACE_S)
    gc = ctx.Process(target=faults.with_env, args=(env, "gc_child", str(path), str(stop), str(runs)), name="gc")
    writers = [ctx.Process(target=faults.with_env, args=(env, "commit_child", str(path), str(tiny.root), "busy",
                                                         ["c", "b", "a"], f"busy{i}", start), name=f"busy{i}")
               for i in range(2)]
    churn = ctx.Process(target=faults.with_env, args=(env, "churn_child", str(path), str(tiny.root), "churn", 6,
                                                      start, pause), name="churn")
    gc.start()
    _start_all(writers + [churn])
    stop.touch()
    gc.join(60)
    assert gc.exitcode == faults.EXIT_DONE
    gc_runs, deleted = map(int, runs.read_text().split())
    assert gc_runs > 0 and deleted > 0  # it did delete beside the writers
    reg = Registry(path)
    assert reg.verify() == []
    assert [n for n, _ in reg.versions("busy")] == list(range(1, 7))
    for n, _ in reg.versions("busy"):
        reg.materialize("busy", n)
    reg.materialize("churn")
    faults.collect(reg)
    assert leftovers(reg) == CLEAN
