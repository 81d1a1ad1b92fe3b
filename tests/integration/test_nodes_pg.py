"""Several nodes on one PostgreSQL ledger: separate `serve` processes with separate
directories (the same CA and RA material and configuration), one database.

Also: `init --ledger-url` and `ledger migrate`, and a database that goes away
(503 with Retry-After, then service again without a restart).
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from scep_fast.client import build_pkcs_req, parse_cert_rep
from scep_fast.client.messages import PkiRequest
from scep_fast.protocol import FailInfo, PKIStatus
from scep_fast.runtime import crl
from scep_fast.runtime.ledger_pg import PgLedger
from tests.integration.conftest import (
    CHALLENGE,
    Server,
    init_dir,
    scep_fast,
    set_config,
    start_server,
)
from tests.integration.load import Result, fire, make_requests
from tests.integration.test_server import ca_certs
from tests.postgres import PostgresServer, postgres_server

PASSWORD_FILE = "db-password"
CRL_REACH_SECONDS = 20


def init_pg_dir(directory: Path, server: PostgresServer, database: str) -> Path:
    """`scep-fast init` of a node whose ledger is ``database``; the password in a file."""
    directory.mkdir(mode=0o700)
    (directory / PASSWORD_FILE).write_text(server.password + "\n")
    (directory / PASSWORD_FILE).chmod(0o600)
    init_dir(directory, "--ledger-url", server.url(database, with_password=False),
             "--ledger-password-file", PASSWORD_FILE)
    set_config(directory, "server", "workers", "2")
    return directory


def second_node(first: Path, directory: Path) -> Path:
    """The second node's directory: the first one's, copied (as an operator would)."""
    shutil.copytree(first, directory)
    return directory


def pki_operation(server: Server, request: PkiRequest) -> tuple[int, Any, Any]:
    response = server.request("POST", "/scep?operation=PKIOperation", body=request.message)
    body = response.read_body  # type: ignore[attr-defined]
    if response.status != 200:
        return response.status, response.getheader("Retry-After"), body
    return 200, parse_cert_rep(body, request, ra_certs=[ca_certs(server).ra]), body


def at_once(calls: list[Callable[[], Any]]) -> list[Any]:
    start = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(index: int) -> None:
        start.wait()
        results[index] = calls[index]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return results


@pytest.fixture
def two_nodes(postgres: PostgresServer, tmp_path: Path) -> Iterator[tuple[Server, Server]]:
    database = postgres.new_database()
    first = init_pg_dir(tmp_path / "node-a", postgres, database)
    second = second_node(first, tmp_path / "node-b")
    a = start_server(first)
    try:
        b = start_server(second)
        try:
            yield a, b
        finally:
            b.stop()
    finally:
        a.stop()
    for server in (a, b):
        assert "Traceback" not in server.log(), server.log()[-3000:]


def _database_url(node: Server) -> str:
    """The node's ledger URL, with the password from its password file."""
    url = next(line.split(" = ", 1)[1].strip('"')
               for line in (node.directory / "scep-fast.toml").read_text().splitlines()
               if line.startswith("url = "))
    password = (node.directory / PASSWORD_FILE).read_text().strip()
    return url.replace("@", f":{password}@", 1)


def test_init_creates_the_schema_and_migrate_checks_it(postgres: PostgresServer,
                                                        tmp_path: Path) -> None:
    database = postgres.new_database()
    directory = init_pg_dir(tmp_path / "scep", postgres, database)
    config = (directory / "scep-fast.toml").read_text()
    assert postgres.password not in config
    done = scep_fast("ledger", "migrate", "--dir", str(directory))
    assert done.returncode == 0, done.stderr
    assert "schema version 2 (up to date)" in done.stdout
    assert postgres.password not in done.stdout + done.stderr
    with PgLedger(postgres.url(database)) as ledger:
        assert ledger.count() == 0
    # A database of schema version 1 (before the outbox) is upgraded.
    with psycopg.connect(postgres.url(database), autocommit=True) as conn:
        conn.execute("DROP TABLE outbox")
        conn.execute("UPDATE schema_version SET version = 1")
    done = scep_fast("ledger", "migrate", "--dir", str(directory))
    assert done.returncode == 0, done.stderr
    assert "schema version 2 (upgraded from version 1)" in done.stdout
    with PgLedger(postgres.url(database)) as ledger:
        assert ledger.count_notices() == 0
    # A URL with the password in it is refused, and not echoed.
    refused = scep_fast("init", "--dir", str(tmp_path / "other"), "--ledger-url",
                        postgres.url(database))
    assert refused.returncode == 2
    assert postgres.password not in refused.stdout + refused.stderr
    assert "ledger.url" in refused.stderr


def test_one_single_use_challenge_spread_over_two_nodes_issues_once(
        two_nodes: tuple[Server, Server]) -> None:
    a, b = two_nodes
    minted = scep_fast("challenge", "new", "--uses", "1", "--json", "--dir", str(a.directory))
    assert minted.returncode == 0, minted.stderr
    secret = json.loads(minted.stdout.splitlines()[-1])["challenge"]
    ra = ca_certs(a).ra
    requests = [build_pkcs_req(ra, cn=f"device-{i}", challenge=secret) for i in range(50)]
    results = at_once([lambda s=(a, b)[i % 2], r=r: pki_operation(s, r)
                       for i, r in enumerate(requests)])
    statuses = Counter(result[1].status if result[0] == 200 else result[0]
                       for result in results)
    assert statuses == {PKIStatus.SUCCESS: 1, PKIStatus.FAILURE: 49}, statuses
    assert all(result[1].fail_info is FailInfo.BAD_REQUEST for result in results
               if result[0] == 200 and result[1].status is PKIStatus.FAILURE)
    listed = scep_fast("certs", "list", "--json", "--dir", str(b.directory))
    assert listed.returncode == 0, listed.stderr
    assert len(listed.stdout.splitlines()) == 1


def test_the_same_request_to_both_nodes_at_once_is_one_certificate(
        two_nodes: tuple[Server, Server]) -> None:
    a, b = two_nodes
    ra = ca_certs(a).ra
    for i in range(5):
        request = build_pkcs_req(ra, cn=f"twice-{i}", challenge=CHALLENGE)
        results = at_once([lambda r=request: pki_operation(a, r),
                           lambda r=request: pki_operation(b, r)])
        assert [r[0] for r in results] == [200, 200], results
        certificates = {r[1].certificates[0].serial_number for r in results}
        assert [r[1].status for r in results] == [PKIStatus.SUCCESS] * 2
        assert len(certificates) == 1
    listed = scep_fast("certs", "list", "--json", "--dir", str(a.directory))
    assert len(listed.stdout.splitlines()) == 5


def test_a_revocation_on_one_node_is_in_the_other_nodes_crl(
        two_nodes: tuple[Server, Server]) -> None:
    a, b = two_nodes
    ca = x509.load_pem_x509_certificate((a.directory / "ca.pem").read_bytes())
    crl_name = crl.crl_name(ca.public_bytes(serialization.Encoding.DER))

    def served(node: Server) -> bytes:
        deadline = time.monotonic() + CRL_REACH_SECONDS
        while True:
            response = node.request("GET", f"/crl/{crl_name}.crl")
            if response.status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)  # the supervisor writes it just after the start
        assert response.status == 200
        return response.read_body  # type: ignore[attr-defined,no-any-return]

    # One node made the CRL at start, the other adopted it from the database.
    assert served(a) == served(b)
    request = build_pkcs_req(ca_certs(a).ra, cn="to-revoke", challenge=CHALLENGE)
    status, reply, _ = pki_operation(a, request)
    assert status == 200 and reply.status is PKIStatus.SUCCESS
    serial = reply.certificates[0].serial_number
    done = scep_fast("certs", "revoke", format(serial, "x"), "--dir", str(a.directory))
    assert done.returncode == 0, done.stderr
    # Node B's supervisor polls the shared ledger: it adopts the CRL node A
    # stored, or makes one itself (then A adopts that one); both nodes end up
    # serving the newest in the ledger.
    deadline = time.monotonic() + CRL_REACH_SECONDS
    with PgLedger(_database_url(a)) as ledger:
        while True:
            listed = x509.load_der_x509_crl(served(b))
            if listed.get_revoked_certificate_by_serial_number(serial) is not None and \
                    served(a) == served(b) == ledger.newest_crl(crl_name):
                break
            assert time.monotonic() < deadline, "the nodes never served the same, new CRL"
            time.sleep(0.5)


def test_a_database_down_answers_503_then_service_resumes_by_itself(tmp_path: Path) -> None:
    with postgres_server() as database_server:
        directory = init_pg_dir(tmp_path / "scep", database_server,
                                database_server.new_database())
        server = start_server(directory)
        try:
            ra = ca_certs(server).ra
            before = build_pkcs_req(ra, cn="before", challenge=CHALLENGE)
            status, first, _ = pki_operation(server, before)
            assert status == 200 and first.status is PKIStatus.SUCCESS
            database_server.stop(signal.SIGKILL)
            during = build_pkcs_req(ra, cn="during", challenge=CHALLENGE)
            for _ in range(3):
                status, retry_after, _body = pki_operation(server, during)
                assert status == 503
                assert int(retry_after) > 0
            # Requests that need no ledger go on.
            assert server.request("GET", "/scep?operation=GetCACaps").status == 200
            database_server.start()
            deadline = time.monotonic() + 30
            while True:
                status, reply, _ = pki_operation(server, during)
                if status == 200 or time.monotonic() > deadline:
                    break
                assert status == 503
                time.sleep(0.5)
            assert status == 200 and reply.status is PKIStatus.SUCCESS
            # The certificate answered before the database died is on record:
            # a resend gets it again.
            status, again, _ = pki_operation(server, before)
            assert status == 200 and again.status is PKIStatus.SUCCESS
            assert again.certificates[0] == first.certificates[0]
        finally:
            server.stop()
        assert "Traceback" not in server.log(), server.log()[-3000:]


ENROLLMENTS = 5000


def test_five_thousand_enrollments_over_two_nodes_are_all_distinct_and_on_record(
        two_nodes: tuple[Server, Server]) -> None:
    a, b = two_nodes
    ra = ca_certs(a).ra
    requests = make_requests(ra, ENROLLMENTS, CHALLENGE, prefix="many")
    pending = [Result(r) for r in requests]
    certificates: list[x509.Certificate] = []
    for _round in range(5):
        halves = [[r.request for r in pending[0::2]], [r.request for r in pending[1::2]]]
        fired = at_once([lambda n=n, h=h: fire(n.port, h, concurrency=16, max_seconds=600)
                         for n, h in zip((a, b), halves, strict=True)])
        left = []
        for result in [*fired[0], *fired[1]]:
            certificate = result.certificate(ra)
            if certificate is None:
                # Shed under load (503): sent again in the next round.
                assert result.status in (503, None), (result.status, result.error)
                left.append(result)
            else:
                certificates.append(certificate)
        pending = left
        if not pending:
            break
    assert not pending, f"{len(pending)} enrollments never succeeded"
    serials = {c.serial_number for c in certificates}
    assert len(serials) == ENROLLMENTS
    with PgLedger(_database_url(a)) as ledger:
        assert ledger.count() == ENROLLMENTS
        for certificate in certificates:
            record = ledger.get(certificate.serial_number)
            assert record is not None
            assert record.der == certificate.public_bytes(serialization.Encoding.DER)
