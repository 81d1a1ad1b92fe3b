"""What only the PostgreSQL ledger has: its schema, its credentials, an unreachable database,
and several handles (as several nodes hold them) racing on one database.

The rules every ledger follows are in ``test_ledger_contract.py``.
"""

from __future__ import annotations

import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psycopg
import pytest

from scep_fast.runtime.ledger_pg import _SCHEMA_V1, SCHEMA_VERSION, PgLedger, migrate, redacted
from scep_fast.service.ledger import (
    AlreadyIssued,
    ChallengeRefused,
    ChallengeUsedUp,
    LedgerError,
    LedgerUnavailable,
    PendingRequest,
    Recorded,
    SerialCollision,
    TransactionConflict,
    UnsupportedSchema,
)
from tests.ledger_values import (
    KEY_A,
    KEY_B,
    NOW,
    make_challenge,
    make_notice,
    make_pending,
    make_record,
    random_serial,
)
from tests.postgres import PostgresServer, postgres_server

# Handles on one database, as that many nodes would hold them.
NODES = 4


@pytest.fixture
def url(postgres: PostgresServer) -> str:
    created = postgres.url(postgres.new_database())
    migrate(created)
    return created


@pytest.fixture
def nodes(url: str) -> Iterator[list[PgLedger]]:
    with ExitStack() as stack:
        yield [stack.enter_context(PgLedger(url, pool_size=8)) for _ in range(NODES)]


def at_once(calls: list[Callable[[], Any]]) -> list[Any]:
    """Runs every call in its own thread, released together; their results (or exceptions)."""
    start = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(index: int) -> None:
        start.wait()
        try:
            results[index] = calls[index]()
        except Exception as error:  # noqa: BLE001 - the test looks at it
            results[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


# --- Schema ----------------------------------------------------------------------


def test_the_schema_is_created_once_and_checked_at_open(postgres: PostgresServer) -> None:
    url = postgres.url(postgres.new_database())
    with pytest.raises(UnsupportedSchema, match="no scep-fast schema.*ledger migrate"):
        PgLedger(url)
    assert migrate(url) == (None, SCHEMA_VERSION)
    assert migrate(url) == (SCHEMA_VERSION, SCHEMA_VERSION)
    PgLedger(url).close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(UnsupportedSchema, match=f"schema version {SCHEMA_VERSION + 1};"):
        PgLedger(url)
    # migrate leaves a newer schema alone.
    with pytest.raises(UnsupportedSchema):
        migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [
            (SCHEMA_VERSION + 1,)]


def _version_1(url: str) -> None:
    """The schema as migrate made it before the outbox, with a little in it."""
    with psycopg.connect(url) as conn, conn.transaction():
        conn.execute(_SCHEMA_V1)
        conn.execute("INSERT INTO schema_version (version) VALUES (1)")
        conn.execute("UPDATE crl_number SET last = 5")


def _stored_version(url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT version FROM schema_version").fetchall()


def test_a_version_1_schema_is_refused_at_start_and_upgraded_by_migrate(
        postgres: PostgresServer) -> None:
    assert SCHEMA_VERSION == 2
    url = postgres.url(postgres.new_database())
    _version_1(url)
    with pytest.raises(UnsupportedSchema, match=r"schema version 1,.*run `scep-fast ledger "
                                                r"migrate"):
        PgLedger(url)
    assert migrate(url) == (1, 2)
    assert _stored_version(url) == [(2,)]
    assert migrate(url) == (2, 2)
    with PgLedger(url) as ledger:
        # What version 1 held stays, and the outbox is there.
        assert ledger.last_crl_number() == 5
        record = make_record(random_serial(), "tx-after-upgrade")
        assert ledger.commit([record], notices=[make_notice(1, serial=record.serial)]) == [
            Recorded(record)]
        assert ledger.count_notices() == 1


def test_an_upgrade_that_fails_leaves_version_1(postgres: PostgresServer) -> None:
    url = postgres.url(postgres.new_database())
    _version_1(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE outbox (x integer)")  # in the upgrade's way
    with pytest.raises(LedgerError, match="DuplicateTable"):
        migrate(url)
    # One transaction: no index, no version 2.
    assert _stored_version(url) == [(1,)]
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('outbox_due')").fetchone() == (None,)
        conn.execute("DROP TABLE outbox")
    assert migrate(url) == (1, 2)
    PgLedger(url).close()


def test_two_nodes_migrating_at_once_make_one_schema(postgres: PostgresServer) -> None:
    url = postgres.url(postgres.new_database())
    results = at_once([lambda: migrate(url) for _ in range(NODES)])
    assert sorted(results, key=str) == sorted(
        [(None, SCHEMA_VERSION)] + [(SCHEMA_VERSION, SCHEMA_VERSION)] * (NODES - 1), key=str)


# --- Credentials and durability -----------------------------------------------------


def test_the_password_never_reaches_a_message(postgres: PostgresServer, url: str) -> None:
    assert postgres.password not in redacted(url)
    assert redacted(url) == postgres.url(url.rsplit("/", 1)[1], with_password=False).replace(
        "scep_test@", "scep_test:***@")
    wrong = url.replace(postgres.password, "not-the-password")
    with pytest.raises(LedgerUnavailable) as refused:
        PgLedger(wrong)
    assert "not-the-password" not in str(refused.value)
    assert "***" in str(refused.value)


def test_a_password_file(postgres: PostgresServer, url: str, tmp_path: Path) -> None:
    secret = tmp_path / "db-password"
    secret.write_text(postgres.password + "\n")
    bare = url.replace(f":{postgres.password}@", "@")
    with PgLedger(bare, password_file=secret) as ledger:
        record = make_record(random_serial(), "tx-password-file")
        assert ledger.commit([record]) == [Recorded(record)]


def test_commits_are_synchronous_whatever_the_server_default_or_the_url(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        database = conn.info.dbname
        conn.execute(f"ALTER DATABASE {database} SET synchronous_commit = off")
    with PgLedger(url) as ledger, ledger._pool.connection() as conn:
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
    # The URL's own parameters pass through to libpq, its options included.
    tuned = (f"{url}?application_name=node-7&connect_timeout=3"
             "&options=-c%20statement_timeout%3D5000")
    with PgLedger(tuned) as ledger, ledger._pool.connection() as conn:
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
        assert conn.execute("SHOW statement_timeout").fetchone() == ("5s",)
        assert conn.execute("SHOW application_name").fetchone() == ("node-7",)


def test_a_database_down_is_unavailable_and_the_same_handle_reconnects() -> None:
    with postgres_server() as server:
        url = server.url(server.new_database())
        migrate(url)
        with PgLedger(url) as ledger:
            before = make_record(random_serial(), "tx-before")
            assert ledger.commit([before]) == [Recorded(before)]
            # The database dies without a word to its clients.
            server.stop(signal.SIGKILL)
            during = make_record(random_serial(), "tx-during")
            for call in (lambda: ledger.commit([during]),
                         lambda: ledger.find_transactions([("tx-before", KEY_A)]),
                         ledger.next_crl_number):
                with pytest.raises(LedgerUnavailable, match="unavailable"):
                    call()
            # Crash recovery keeps what was committed; the handle reconnects.
            server.start()
            assert ledger.find_transaction("tx-before", KEY_A) == before
            assert ledger.commit([during]) == [Recorded(during)]
            assert ledger.count() == 2


# --- Several nodes at once ---------------------------------------------------------------


def test_the_same_request_on_every_node_at_once_is_one_certificate(
        nodes: list[PgLedger]) -> None:
    for round_ in range(15):
        records = [make_record(random_serial(), f"tx-same-{round_}", issued_at=NOW)
                   for _ in nodes]
        results = at_once([lambda n=n, r=r: n.commit([r]) for n, r in zip(nodes, records,
                                                                         strict=True)])
        outcomes = [result[0] for result in results]
        winners = [o.record for o in outcomes if isinstance(o, Recorded)]
        assert len(winners) == 1, outcomes
        assert all(o == AlreadyIssued(winners[0]) for o in outcomes
                   if not isinstance(o, Recorded)), outcomes
    assert nodes[0].count() == 15


def test_another_csr_under_a_transaction_on_every_node_at_once(nodes: list[PgLedger]) -> None:
    records = [make_record(random_serial(), "tx-conflict", csr=f"csr {i}", issued_at=NOW)
               for i in range(len(nodes))]
    results = at_once([lambda n=n, r=r: n.commit([r]) for n, r in zip(nodes, records,
                                                                     strict=True)])
    kinds = Counter(type(result[0]).__name__ for result in results)
    assert kinds == {"Recorded": 1, "TransactionConflict": len(nodes) - 1}
    (winner,) = [r[0].record for r in results if isinstance(r[0], Recorded)]
    assert all(r[0] == TransactionConflict(winner) for r in results
               if not isinstance(r[0], Recorded))


def test_one_serial_on_two_nodes_at_once(nodes: list[PgLedger]) -> None:
    for round_ in range(15):
        serial = random_serial()
        first = make_record(serial, f"tx-a-{round_}", key=KEY_A)
        second = make_record(serial, f"tx-b-{round_}", key=KEY_B)
        results = at_once([lambda a=first: nodes[0].commit([a]),
                           lambda b=second: nodes[1].commit([b])])
        assert sorted(type(r[0]).__name__ for r in results) == ["Recorded", "SerialCollision"]
        (recorded,) = [r[0].record for r in results if isinstance(r[0], Recorded)]
        assert nodes[2].get(serial) == recorded
        assert SerialCollision(serial) in [r[0] for r in results]


def test_a_single_use_challenge_is_used_once_across_nodes(nodes: list[PgLedger]) -> None:
    single = make_challenge("single use across nodes", expires_at=NOW + 3600)
    triple = make_challenge("three uses across nodes", uses=3, expires_at=NOW + 3600)
    nodes[0].add_challenge(single)
    nodes[0].add_challenge(triple)
    calls = []
    for i in range(40):
        node = nodes[i % len(nodes)]
        # Each commit a batch of two: one record for each challenge.
        batch = [make_record(random_serial(), f"tx-s-{i}", issued_at=NOW),
                 make_record(random_serial(), f"tx-t-{i}", issued_at=NOW)]
        calls.append(lambda n=node, b=batch: n.commit(b, [single.digest, triple.digest]))
    results = at_once(calls)
    assert not [r for r in results if isinstance(r, Exception)], results
    firsts = Counter(type(r[0]).__name__ for r in results)
    seconds = Counter(type(r[1]).__name__ for r in results)
    assert firsts == {"Recorded": 1, "ChallengeRefused": 39}
    assert seconds == {"Recorded": 3, "ChallengeRefused": 37}
    assert nodes[3].count() == 4
    for challenge in (single, triple):
        left = nodes[1].get_challenge(challenge.digest)
        assert left is not None and left.uses_left == 0


def test_a_single_use_challenge_makes_one_pending_request_across_nodes(
        nodes: list[PgLedger]) -> None:
    single = make_challenge("one approval", expires_at=NOW + 3600)
    nodes[0].add_challenge(single)
    calls = [lambda n=nodes[i % NODES], i=i: n.add_pending(
                 make_pending(f"{i:016x}", f"tx-wait-{i}"), single.digest)
             for i in range(20)]
    results = at_once(calls)
    assert sum(isinstance(r, PendingRequest) for r in results) == 1
    assert sum(isinstance(r, ChallengeUsedUp) for r in results) == 19
    assert len(list(nodes[1].iter_pending())) == 1


def test_the_same_pending_request_on_every_node_at_once(nodes: list[PgLedger]) -> None:
    requests = [make_pending(f"{i:016x}", "tx-one-wait") for i in range(len(nodes))]
    results = at_once([lambda n=n, p=p: n.add_pending(p) for n, p in zip(nodes, requests,
                                                                        strict=True)])
    assert not [r for r in results if isinstance(r, Exception)], results
    # Every node got the one request on record.
    assert len({r.request_id for r in results}) == 1
    assert len(list(nodes[0].iter_pending())) == 1


def test_crl_numbers_across_nodes(nodes: list[PgLedger]) -> None:
    results = at_once([lambda n=n: [n.next_crl_number() for _ in range(25)] for n in nodes])
    numbers = [number for taken in results for number in taken]
    assert sorted(numbers) == list(range(1, 25 * len(nodes) + 1))


def test_a_revocation_frees_the_transaction_on_every_node(nodes: list[PgLedger]) -> None:
    first = make_record(random_serial(), "tx-again", issued_at=NOW)
    assert nodes[0].commit([first]) == [Recorded(first)]
    nodes[1].revoke(first.serial, 1, NOW + 1)
    # Two nodes take the freed transaction at once, with two new CSRs: one wins.
    retakes = [make_record(random_serial(), "tx-again", csr=f"new {i}", issued_at=NOW + 2)
               for i in range(2)]
    results = at_once([lambda: nodes[2].commit([retakes[0]]),
                       lambda: nodes[3].commit([retakes[1]])])
    kinds = sorted(type(r[0]).__name__ for r in results)
    assert kinds == ["Recorded", "TransactionConflict"]
    (winner,) = [r[0].record for r in results if isinstance(r[0], Recorded)]
    assert nodes[0].find_transaction("tx-again", KEY_A) == winner
    assert ChallengeRefused not in [type(r[0]) for r in results]


def test_nodes_claiming_at_once_get_disjoint_notices(nodes: list[PgLedger]) -> None:
    notices = [make_notice(i, created_at=NOW + i % 13) for i in range(400)]
    nodes[0].add_notices(notices)

    def claim_all(node: PgLedger) -> list[bytes]:
        taken: list[bytes] = []
        while claimed := node.claim_notices(NOW + 1, 9, 3600.0):
            taken.extend(n.notice_id for n in claimed)
        return taken

    results = at_once([lambda n=n: claim_all(n) for n in nodes])
    every = [notice_id for taken in results for notice_id in taken]
    assert len(every) == len(set(every)) == len(notices)
    assert nodes[1].claim_notices(NOW + 1, 10, 3600.0) == []
    assert nodes[2].count_notices() == len(notices)
