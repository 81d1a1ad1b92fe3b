"""Fixtures for the interop tests: a real `scep-fast serve` and third-party SCEP peers.

The server helpers are the integration tests' own (``tests/integration/conftest.py``).
The peers are Debian's `scep`
(micromdm scepclient/scepserver) and `certmonger` (scep-submit); a test whose
peer is missing is skipped with the reason, or fails when peers are required
(``tests/conftest.py``).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from tests.conftest import missing_peer
from tests.integration import conftest as _helpers

CHALLENGE: str = _helpers.CHALLENGE
Server = _helpers.Server
free_port = _helpers.free_port
init_dir = _helpers.init_dir
scep_fast = _helpers.scep_fast
set_config = _helpers.set_config
start_server = _helpers.start_server
# A fixture: starts servers on fresh directories, stops them at the end of the test.
server_factory = _helpers.server_factory

SCEPCLIENT = shutil.which("scepclient")
SCEPSERVER = shutil.which("scepserver")
SCEP_SUBMIT = next((p for p in ("/usr/lib/certmonger/scep-submit",
                                "/usr/libexec/certmonger/scep-submit")
                    if Path(p).is_file()), None)

# Every run of a peer is bounded by this many seconds.
PEER_TIMEOUT_SECONDS = 60


def require(binary: str | None, what: str) -> str:
    """The peer's path, or a skip naming the missing Debian package (see missing_peer)."""
    if binary is None:
        missing_peer(f"{what} is not installed")
    return binary


def ledger(directory: Path) -> list[dict[str, Any]]:
    """Every record of the server's ledger, through `scep-fast certs list --json`."""
    done = scep_fast("certs", "list", "--json", "--dir", str(directory))
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def request_log(server: Any) -> list[dict[str, Any]]:
    """The server's structured PKIOperation log entries, oldest first."""
    entries = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("operation") == "PKIOperation":
                entries.append(entry)
    return entries


__all__ = [
    "CHALLENGE",
    "PEER_TIMEOUT_SECONDS",
    "SCEPCLIENT",
    "SCEPSERVER",
    "SCEP_SUBMIT",
    "Server",
    "free_port",
    "init_dir",
    "ledger",
    "request_log",
    "require",
    "scep_fast",
    "server_factory",
    "set_config",
    "start_server",
]


def request_log_entries(server: Any, count: int) -> list[dict[str, Any]]:
    """The server's PKIOperation log entries once there are ``count`` of them (5 s at most)."""
    deadline = time.monotonic() + 5
    entries = request_log(server)
    while len(entries) < count and time.monotonic() < deadline:
        time.sleep(0.05)
        entries = request_log(server)
    assert len(entries) >= count, server.log()[-2000:]
    return entries
