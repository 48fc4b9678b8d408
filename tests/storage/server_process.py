"""What the test servers (s3_server.py: SeaweedFS, azurite_server.py: Azurite) share: free
loopback ports, a server process in a session of its own with its output in a log file, a
bounded wait until its HTTP port answers, and a stop that leaves no process behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"  # loopback only: the tests never reach or open anything else
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
TERM_GRACE_S = 2.0  # weed often ignores SIGTERM; a server's data is a temp folder, so do not wait long


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on loopback (all held open until all are chosen, so
    they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def start(name: str, args: list[str], folder: Path, url: str) -> subprocess.Popen:
    """Start ``args`` in ``folder`` (output to ``folder/<name>.log``) and wait until ``url``
    answers HTTP; raise RuntimeError with the log's tail when it exits or does not answer
    within START_TIMEOUT_S."""
    log_path = folder / f"{name}.log"
    with open(log_path, "wb") as log:
        # A session of its own, so stop() can signal every process the server starts.
        proc = subprocess.Popen(args, cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(name, proc, url, log_path)
    except BaseException:
        stop(proc)
        raise
    return proc


def _wait_ready(name: str, proc: subprocess.Popen, url: str, log_path: Path) -> None:
    """Until ``url`` answers HTTP (an error status too: an unsigned request is refused by a
    server that is up), bounded."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}: {log_tail(log_path)}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{name} did not answer on {url} within {START_TIMEOUT_S:.0f} s: {log_tail(log_path)}")


def log_tail(log_path: Path) -> str:
    return log_path.read_bytes()[-2000:].decode(errors="replace")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the whole process group, a bounded wait, then SIGKILL (a server may ignore
    the first), and a final wait so no process outlives the session."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=TERM_GRACE_S)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    # Also when the leader exited: the group may outlive it. Nothing of it is left after this.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=STOP_TIMEOUT_S)
