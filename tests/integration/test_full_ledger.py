"""A full ledger: enrollments get 503 with Retry-After, a metric and a warning say why, and a
larger map size taken up by a reload (SIGHUP) lets them through again; the admin API answers
503 too."""

from __future__ import annotations

import json
import re
import secrets
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from scep_fast.client import build_pkcs_req, parse_cert_rep
from scep_fast.protocol import PKIStatus
from scep_fast.runtime.admin import AdminApi, serve_admin
from scep_fast.runtime.ledger_lmdb import LmdbLedger
from scep_fast.service.ledger import Challenge, LedgerFull
from scep_fast.service.ledger_memory import MemoryLedger
from tests.integration.conftest import (
    CHALLENGE,
    Server,
    init_dir,
    scep_fast,
    set_config,
    start_server,
)
from tests.integration.test_server import ca_certs
from tests.ledger_values import make_record

SMALL_MAP_BYTES = 16 * 1024 * 1024  # the smallest the configuration allows
LARGER_MAP_BYTES = 64 * 1024 * 1024
RELOAD_TIMEOUT_SECONDS = 60


def fill(ledger_path: Path) -> int:
    """Records until nothing fits any more; how many went in."""
    recorded = 0
    with LmdbLedger(ledger_path, map_size_bytes=SMALL_MAP_BYTES) as ledger:
        # What still fits depends on the pages LMDB has free and on where in
        # each B-tree a write lands: go round every size, with serials in
        # time order and requesters at random as the server makes them,
        # until nothing fits.
        progress = True
        while progress:
            progress = False
            for der_size in (256 * 1024, 32 * 1024, 4 * 1024, 2000, 1000, 500, 16):
                while True:
                    serial = time.time_ns() // 1_000_000 << 96 | secrets.randbits(96)
                    try:
                        ledger.commit([make_record(serial, secrets.token_hex(20),
                                                   key=secrets.token_bytes(32),
                                                   der_size=der_size)])
                    except LedgerFull:
                        break
                    recorded += 1
                    progress = True
    return recorded


def ledger_full_total(server: Server) -> float:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
        text = response.read().decode()
    match = re.search(r"^scep_ledger_full_total (\S+)$", text, re.MULTILINE)
    assert match is not None, "scep_ledger_full_total is not exported"
    return float(match.group(1))


def test_a_full_ledger_answers_503_until_a_reload_brings_a_larger_map(tmp_path: Path) -> None:
    directory = init_dir(tmp_path / "scep")
    set_config(directory, "server", "workers", "1")
    set_config(directory, "ledger", "map_size_bytes", str(SMALL_MAP_BYTES))
    # The CRL first: the server then has no write to make at start.
    done = scep_fast("crl", "--dir", str(directory))
    assert done.returncode == 0, done.stderr
    assert fill(directory / "ledger") > 0
    server = start_server(directory)
    try:
        assert ledger_full_total(server) == 0  # exported before anything happens
        request = build_pkcs_req(ca_certs(server).ra, cn="no-room", challenge=CHALLENGE)
        response = server.request("POST", "/scep?operation=PKIOperation", body=request.message)
        assert response.status == 503, response.read_body  # type: ignore[attr-defined]
        assert int(response.getheader("Retry-After") or "") > 0
        assert ledger_full_total(server) >= 1
        lines = [json.loads(line) for line in server.log().splitlines()
                 if line.startswith("{")]
        warnings = [line for line in lines if line.get("msg") == "ledger full"]
        assert warnings and warnings[0]["level"] == "warning", lines[-5:]
        assert "map size is used up" in json.dumps(warnings[0])
        # Requests that need no room are served as before.
        assert server.request("GET", "/scep?operation=GetCACaps").status == 200

        set_config(directory, "ledger", "map_size_bytes", str(LARGER_MAP_BYTES))
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + RELOAD_TIMEOUT_SECONDS
        while True:
            # The same request again: nothing of it was recorded.
            response = server.request("POST", "/scep?operation=PKIOperation",
                                      body=request.message)
            if response.status == 200 or time.monotonic() > deadline:
                break
            assert response.status == 503
            time.sleep(0.5)
        assert response.status == 200, "still refused after the reload"
        reply = parse_cert_rep(response.read_body, request,  # type: ignore[attr-defined]
                               ra_certs=[ca_certs(server).ra])
        assert reply.status is PKIStatus.SUCCESS
        # The supervisor kept its handle with the smaller map; the admin API
        # reads through it and adopts the map the worker grew.
        token = (directory / "admin-token").read_text().strip()
        admin = urllib.request.Request(f"http://127.0.0.1:{server.admin_port}/v1/requests",
                                       headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(admin, timeout=10) as answer:  # noqa: S310 - loopback
            assert answer.status == 200
    finally:
        server.stop()
    assert "unexpected error" not in server.log()


class _FullLedger(MemoryLedger):
    def add_challenge(self, challenge: Challenge) -> None:
        raise LedgerFull("the file system is full")


def test_the_admin_api_answers_a_write_it_cannot_record_with_503() -> None:
    api = AdminApi(_FullLedger(), lambda: None,  # type: ignore[arg-type,return-value]
                   ["default"], b"t" * 32)
    admin = serve_admin(api, "127.0.0.1", 0)
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{admin.server_address[1]}/v1/challenges", data=b"{}",
            headers={"Authorization": "Bearer " + "t" * 32})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)  # noqa: S310 - loopback
        assert refused.value.code == 503
        assert refused.value.headers["Retry-After"] == "60"
    finally:
        admin.shutdown()
        admin.server_close()
