"""Killed under load, on a PostgreSQL ledger: a node (every process of it) and the database
itself, each with SIGKILL. Whatever certificate a client received is on record afterwards."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from scep_fast.client import build_pkcs_req, parse_cert_rep
from scep_fast.client.messages import PkiRequest
from scep_fast.protocol import PKIStatus
from scep_fast.runtime.ledger_pg import PgLedger
from tests.integration.conftest import CHALLENGE, Server, start_server
from tests.integration.test_nodes_pg import init_pg_dir, second_node
from tests.integration.test_server import ca_certs
from tests.postgres import PostgresServer, postgres_server

CLIENTS = 8
REQUESTS_PER_CLIENT = 10


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux: /proc/PID/task/*/children)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        except FileNotFoundError:
            continue
        for child in map(int, children):
            found += [child, *_descendants(child)]
    return found


def kill_node(server: Server) -> None:
    """SIGKILL to the supervisor and every worker at once: nothing drains."""
    for pid in [server.process.pid, *_descendants(server.process.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    server.process.wait(timeout=30)


def send(server: Server, request: PkiRequest) -> x509.Certificate | None:
    """The certificate a SUCCESS delivered, or None (a 503, a FAILURE, a connection cut)."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/scep?operation=PKIOperation", body=request.message)
        response = conn.getresponse()
        body = response.read()
        conn.close()
    except (OSError, http.client.HTTPException):
        return None
    if response.status != 200:
        return None
    reply = parse_cert_rep(body, request, ra_certs=[ca_certs_cache[server.port]])
    return reply.certificates[0] if reply.status is PKIStatus.SUCCESS else None


ca_certs_cache: dict[int, x509.Certificate] = {}


def load(servers: list[Server], requests: list[PkiRequest],
         received: list[x509.Certificate]) -> list[threading.Thread]:
    """Clients sending ``requests``, each to the servers in turn; SUCCESSes land in ``received``."""
    lock = threading.Lock()

    def client(index: int) -> None:
        for number, request in enumerate(requests[index::CLIENTS]):
            server = servers[(index + number) % len(servers)]
            certificate = send(server, request)
            if certificate is not None:
                with lock:
                    received.append(certificate)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    return threads


def prepare(server: Server, count: int, prefix: str) -> list[PkiRequest]:
    ra = ca_certs(server).ra
    ca_certs_cache[server.port] = ra
    return [build_pkcs_req(ra, cn=f"{prefix}-{i}", challenge=CHALLENGE) for i in range(count)]


def assert_on_record(url: str, received: list[x509.Certificate]) -> None:
    with PgLedger(url) as ledger:
        for certificate in received:
            record = ledger.get(certificate.serial_number)
            assert record is not None, f"{certificate.serial_number:x} was answered, not recorded"
            assert record.der == certificate.public_bytes(serialization.Encoding.DER)


def test_a_node_killed_under_load_loses_nothing_a_client_received(
        postgres: PostgresServer, tmp_path: Path) -> None:
    database = postgres.new_database()
    first = init_pg_dir(tmp_path / "node-a", postgres, database)
    second = second_node(first, tmp_path / "node-b")
    a, b = start_server(first), start_server(second)
    try:
        requests = prepare(a, CLIENTS * REQUESTS_PER_CLIENT, "node-kill")
        ca_certs_cache[b.port] = ca_certs_cache[a.port]
        received: list[x509.Certificate] = []
        threads = load([a, b], requests, received)
        deadline = time.monotonic() + 60
        while len(received) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        kill_node(a)
        for thread in threads:
            thread.join(timeout=300)
        # Node B served on; node A's answers that left before the kill are on record.
        assert len(received) >= 10
        assert len({c.serial_number for c in received}) == len(received)
        assert_on_record(postgres.url(database), received)
    finally:
        a.stop()
        b.stop()


def test_the_database_killed_under_load_loses_nothing_a_client_received(
        tmp_path: Path) -> None:
    with postgres_server() as database_server:
        database = database_server.new_database()
        directory = init_pg_dir(tmp_path / "scep", database_server, database)
        server = start_server(directory)
        try:
            requests = prepare(server, CLIENTS * REQUESTS_PER_CLIENT, "db-kill")
            received: list[x509.Certificate] = []
            threads = load([server], requests, received)
            deadline = time.monotonic() + 60
            while len(received) < 10 and time.monotonic() < deadline:
                time.sleep(0.05)
            database_server.stop(signal.SIGKILL)
            time.sleep(1.0)
            database_server.start()
            for thread in threads:
                thread.join(timeout=300)
            assert len(received) >= 10
            # PostgreSQL's crash recovery kept every commit a client was answered after.
            assert_on_record(database_server.url(database), received)
        finally:
            server.stop()
        assert "Traceback" not in server.log(), server.log()[-3000:]
