"""Child-process side of the crash and concurrency tests.

Functions here run in processes made by a ``forkserver`` that preloads torch and deltastore,
so each child starts in milliseconds instead of re-importing torch. A child either completes
its operation or dies at the write step it was told to (``os._exit(137)``, what SIGKILL
gives), or sees that step fail with ``OSError(EIO)``.

A *write step* is one call of ``os.replace``, ``os.rename``, ``os.unlink`` or ``os.rmdir``:
every durable change the library makes to a registry goes through one of them (LocalBackend's
atomic put and publish, zarr's own chunk writes, which are temp file + rename, and every
deletion, ``shutil.rmtree`` included, which unlinks file by file). On an object store it is
one request that changes the store: obstore's ``put``, ``copy`` and ``delete`` (the backend's)
and ``put_async`` (zarr's chunk writes).

Children that use a test object store are given its environment (``env``): the forkserver was
started with the environment of the first test that used it.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import threading
import time
import traceback
from pathlib import Path

EXIT_DONE, EXIT_FAILED, EXIT_OTHER, EXIT_KILLED = 0, 3, 4, 137
WRITE_CALLS = ("replace", "rename", "unlink", "rmdir")
STORE_WRITE_CALLS = ("put", "put_async", "copy", "delete")


def context():
    """A forkserver context whose server has imported torch and deltastore (not run them: a
    fork after torch or zarr started their thread pools could deadlock)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "deltastore", "deltastore.registry", "deltastore.integrity",
                                "reliability.faults"])
    return ctx


def _quiet_child() -> None:
    import torch

    torch.set_num_threads(1)  # 2 shared cores: one thread per child


def install_faults(mode: str, at: int, log: list | None) -> None:
    """Count write calls; at call number ``at`` die (mode 'kill') or raise (mode 'fail')."""
    lock = threading.Lock()
    count = [0]

    def wrap(module, name):
        original = getattr(module, name)

        def step(*args, **kwargs):
            with lock:
                count[0] += 1
                n = count[0]
                if log is not None:
                    log.append(f"{name} {args[1] if module is not os else os.fspath(args[0])}")
            if n == at:
                if mode == "kill":
                    os._exit(EXIT_KILLED)
                raise OSError(errno.EIO, f"injected write failure at step {n} ({module.__name__}.{name})")
            return original(*args, **kwargs)

        setattr(module, name, step)

    for name in WRITE_CALLS:
        wrap(os, name)
    import obstore

    for name in STORE_WRITE_CALLS:
        wrap(obstore, name)


def run_op(op: str, registry: str, tiny_root: str) -> None:
    """The operations under test, on the tiny model (see helpers.make_tiny)."""
    from deltastore import Registry

    tiny = Path(tiny_root)
    ft = {name: tiny / "finetunes" / name for name in ("a", "b", "c")}
    if op == "init":
        Registry.init(registry, tiny / "reference", progress=False)
    elif op == "base":
        Registry(registry).build_base("b2", [ft["a"], ft["c"]], progress=False)
    elif op == "commit":
        Registry(registry).commit("t1", ft["c"], base="b1", message="c", progress=False)
    elif op == "commit_dare":
        Registry(registry).commit("t3", ft["b"], method="dare", config={"drop_rate": 0.5}, message="dare",
                                  progress=False)
    elif op == "remove":
        Registry(registry).remove("t1", 1)
    elif op == "gc":
        collect(Registry(registry))
    else:
        raise ValueError(op)


def collect(reg) -> dict:
    """gc of everything unreachable, now: on a folder the default; on an object store (where a
    grace period is required) a grace of 1 ms, which this registry's writers then keep too, and
    no clock slack (one machine, and the store's whole-second Last-Modified only makes objects
    look older)."""
    from deltastore.catalog import is_url
    from deltastore.storage import writes

    if not is_url(reg.path):
        return reg.gc()
    slack, writes.CLOCK_SLACK_S = writes.CLOCK_SLACK_S, 0.0
    reg.writes.grace = 0.001
    try:
        return reg.gc()
    finally:
        writes.CLOCK_SLACK_S = slack


def with_env(env: dict, target: str, *args) -> None:
    """Run child ``target`` of this module with ``env`` added to the environment."""
    os.environ.update(env)
    globals()[target](*args)


def fault_child(op: str, registry: str, tiny_root: str, mode: str, at: int, log_path: str | None) -> None:
    """Run ``op`` with a fault at write step ``at`` (0: none; with ``log_path``, write the
    list of write steps there). Exit code: 0 done, 3 the injected OSError surfaced, 4 another
    exception, 137 killed."""
    _quiet_child()
    log: list | None = [] if log_path else None
    install_faults(mode, at, log)
    code = EXIT_DONE
    try:
        run_op(op, registry, tiny_root)
    except OSError as exc:
        code = EXIT_FAILED if "injected write failure" in str(exc) else EXIT_OTHER
        if code == EXIT_OTHER:
            traceback.print_exc()
    except BaseException:
        traceback.print_exc()
        code = EXIT_OTHER
    if log_path:
        Path(log_path).write_text("\n".join(log or []))
    os._exit(code)


def slow_commit_child(registry: str, tiny_root: str, published: str) -> None:
    """A commit that pauses after every publish (so a test can SIGKILL it mid-write) and
    counts its publishes in the file ``published``."""
    _quiet_child()
    from deltastore.storage.backend import LocalBackend

    original = LocalBackend.publish
    counter = [0]

    def publish(self, staged, final):
        result = original(self, staged, final)
        counter[0] += 1
        Path(published).write_text(str(counter[0]))
        time.sleep(0.2)
        return result

    LocalBackend.publish = publish
    run_op("commit", registry, tiny_root)
    os._exit(EXIT_DONE)


# -- concurrency ------------------------------------------------------------------------------
def _commit(reg, task: str, finetune: Path, message: str) -> None:
    """Commit, and commit again when a write on an object store outran half the grace period
    (it published nothing and said so: what a user is told to do), as a loaded machine may."""
    from deltastore.errors import GraceExceededError

    for tries in range(1, 6):
        try:
            reg.commit(task, finetune, message=message, progress=False)
            return
        except GraceExceededError:
            if tries == 5:
                raise


def commit_child(registry: str, tiny_root: str, task: str, finetunes: list[str], tag: str, start: float) -> None:
    """Commit ``finetunes`` one after the other as versions of ``task``; messages ``tag:i``."""
    _quiet_child()
    from deltastore import Registry

    while time.time() < start:  # line up with the other processes
        time.sleep(0.005)
    reg = Registry(registry)
    for i, name in enumerate(finetunes):
        _commit(reg, task, Path(tiny_root) / "finetunes" / name, message=f"{tag}:{i}")
    os._exit(EXIT_DONE)


def churn_child(registry: str, tiny_root: str, task: str, rounds: int, start: float, pause: float = 0.0) -> None:
    """Commit then remove ``task`` again and again, ``pause`` seconds apart: each round
    re-creates objects that the previous round left unreferenced, which a concurrent gc is about
    to delete."""
    _quiet_child()
    from deltastore import Registry

    while time.time() < start:
        time.sleep(0.005)
    reg = Registry(registry)
    for i in range(rounds):
        _commit(reg, task, Path(tiny_root) / "finetunes" / ("a" if i % 2 else "b"), message=f"churn:{i}")
        if i < rounds - 1:
            reg.remove(task)
            time.sleep(pause)
    os._exit(EXIT_DONE)


def gc_child(registry: str, stop_file: str, runs_file: str) -> None:
    """Run gc in a loop until ``stop_file`` exists; write the number of runs and of objects
    deleted to ``runs_file``."""
    _quiet_child()
    from deltastore import Registry

    reg = Registry(registry)
    runs = deleted = 0
    while not os.path.exists(stop_file):
        removed = reg.gc()
        deleted += removed["arrays"] + removed["blobs"] + removed["records"]
        runs += 1
    Path(runs_file).write_text(f"{runs} {deleted}")
    os._exit(EXIT_DONE)


def reader_child(registry: str, task: str, stop_file: str, out_file: str) -> None:
    """Materialize the latest version of ``task`` until ``stop_file`` exists; record each
    state hash seen, or the error met, in ``out_file`` (one per line)."""
    _quiet_child()
    from deltastore import NotFoundError, Registry

    from reliability.helpers import state_hash

    reg = Registry(registry)
    seen = []
    while not os.path.exists(stop_file):
        try:
            seen.append(state_hash(reg.materialize(task)))  # the latest: reads the ref once
        except NotFoundError:
            time.sleep(0.01)  # no version committed yet
        except BaseException as exc:
            seen.append(f"error {type(exc).__name__}: {exc}")
            break
    Path(out_file).write_text("\n".join(seen))
    os._exit(EXIT_DONE)
