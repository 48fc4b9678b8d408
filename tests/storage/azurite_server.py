"""A real Azure Blob server for the tests: Azurite, Microsoft's Azure Storage emulator (the npm
package pinned in tests/storage/azurite/, installed with
``npm ci --prefix tests/storage/azurite --ignore-scripts``), on 127.0.0.1 with its data in
memory, started once per test session and stopped for sure at the end.

Why a real server, as for S3 (s3_server.py): Azure answers conditional writes with its own
statuses (409 for a create-only put of an existing blob, 412 for a stale ETag, 404 for a
delete of a missing blob), which a mock would only echo back.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import shutil
import time
import urllib.request
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path

from . import server_process
from .server_process import HOST, free_ports

CONTAINER = "deltastore-test"
# Azurite's one built-in account and its key, published in Azurite's documentation (not a
# secret: the emulator accepts nothing else).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
INSTALL_DIR = Path(__file__).parent / "azurite"
INSTALL_COMMAND = "npm ci --prefix tests/storage/azurite --ignore-scripts"


@dataclass(frozen=True)
class AzureServer:
    """A running Azurite: where it listens and what the backend's environment must say."""

    endpoint: str  # http://127.0.0.1:<port>/devstoreaccount1
    container: str
    started_in_s: float

    @property
    def env(self) -> dict[str, str]:
        """The variables obstore reads its Azure configuration from."""
        return {"AZURE_STORAGE_ACCOUNT_NAME": ACCOUNT, "AZURE_STORAGE_ACCOUNT_KEY": ACCOUNT_KEY,
                "AZURE_STORAGE_ENDPOINT": self.endpoint, "AZURE_ALLOW_HTTP": "true"}

    def url(self, prefix: str = "") -> str:
        """The deltastore/obstore URL of ``prefix`` in the test container."""
        return f"az://{self.container}/{prefix}".rstrip("/")


def azurite_binary() -> str | None:
    """``azurite-blob`` as npm installs it in tests/storage/azurite, or None (with node too:
    the script runs under the ``node`` on PATH)."""
    candidate = INSTALL_DIR / "node_modules" / ".bin" / "azurite-blob"
    return str(candidate) if candidate.exists() and shutil.which("node") else None


def start(folder: Path) -> tuple:
    """Start ``azurite-blob`` with its data in memory (``folder`` holds its log and its
    debug files) and create the test container; raise RuntimeError (with its log) when it is
    not installed or does not answer within server_process.START_TIMEOUT_S."""
    binary = azurite_binary()
    if binary is None:
        raise RuntimeError(f"Azurite is not installed (needs node and npm): {INSTALL_COMMAND}")
    (port,) = free_ports(1)
    # Its working folder is ``folder`` (server_process.start), where it would keep anything.
    args = [binary, "--blobHost", HOST, "--blobPort", str(port),
            "--inMemoryPersistence", "--disableTelemetry", "--skipApiVersionCheck", "--silent"]
    began = time.monotonic()
    endpoint = f"http://{HOST}:{port}/{ACCOUNT}"
    proc = server_process.start("azurite", args, folder, endpoint)
    server = AzureServer(endpoint, CONTAINER, time.monotonic() - began)
    try:
        create_container(server)
    except BaseException:
        server_process.stop(proc)
        raise
    return proc, server


def create_container(server: AzureServer) -> None:
    """Create the test container, as an operator does before pointing deltastore at it
    (obstore has no request for it, so one Shared Key signed REST call)."""
    date = formatdate(usegmt=True)
    headers = {"x-ms-date": date, "x-ms-version": "2021-08-06", "Content-Length": "0"}
    # The string to sign of Shared Key: the verb, eleven standard headers left empty (no body),
    # the x-ms-* headers, then the resource (the account twice for a path-style emulator URL).
    canonical_headers = "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()) if k.startswith("x-ms-"))
    resource = f"/{ACCOUNT}/{ACCOUNT}/{server.container}\nrestype:container"
    to_sign = "PUT\n" + "\n" * 11 + canonical_headers + resource
    signature = base64.b64encode(hmac.new(base64.b64decode(ACCOUNT_KEY), to_sign.encode(), hashlib.sha256).digest())
    headers["Authorization"] = f"SharedKey {ACCOUNT}:{signature.decode()}"
    request = urllib.request.Request(f"{server.endpoint}/{server.container}?restype=container", method="PUT",
                                     headers=headers)
    urllib.request.urlopen(request, timeout=10).close()
