"""`scep-fast ledger copy`: LMDB into PostgreSQL and back, checked by counts and a digest."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from scep_fast.runtime.ledger_copy import CopyRefused, copy_ledger, summarize
from scep_fast.runtime.ledger_lmdb import LmdbLedger
from scep_fast.runtime.ledger_pg import PgLedger, migrate
from scep_fast.service.ledger import Recorded
from tests.integration.conftest import init_dir, scep_fast
from tests.integration.test_nodes_pg import PASSWORD_FILE, init_pg_dir
from tests.ledger_values import (
    KEY_A,
    KEY_B,
    NOW,
    digest,
    make_challenge,
    make_notice,
    make_pending,
    make_record,
    random_serial,
    spend,
)
from tests.postgres import PostgresServer

YEAR = 365 * 86400


def fill(ledger: LmdbLedger) -> dict[str, int]:
    """A ledger with a bit of everything; the serials worth looking at afterwards."""
    plain = [make_record(random_serial(), f"tx-{i}", issued_at=NOW + i) for i in range(1200)]
    assert all(isinstance(o, Recorded) for o in ledger.commit(plain))
    # A transaction revoked, then taken by another CSR.
    first = make_record(random_serial(), "tx-again", key=KEY_B, issued_at=NOW)
    ledger.commit([first])
    ledger.revoke(first.serial, 1, NOW + 10)
    second = make_record(random_serial(), "tx-again", key=KEY_B, csr="new", issued_at=NOW + 20)
    assert ledger.commit([second]) == [Recorded(second)]
    # A transaction whose certificate expired, then taken again.
    old = make_record(random_serial(), "tx-expired", key=KEY_B, issued_at=NOW - 2 * YEAR)
    ledger.commit([old])
    renewed = make_record(random_serial(), "tx-expired", key=KEY_B, csr="renewed",
                          issued_at=NOW + 30)
    assert ledger.commit([renewed]) == [Recorded(renewed)]
    for serial in (plain[3].serial, plain[700].serial):
        ledger.revoke(serial, 4, NOW + 40)
    ledger.add_pending(make_pending("00000000000000a1", "tx-wait"))
    ledger.add_pending(make_pending("00000000000000a2", "tx-approved"))
    ledger.decide_pending("00000000000000a2", "approved", NOW + 50)
    ledger.add_pending(make_pending("00000000000000a3", "tx-rejected"))
    ledger.decide_pending("00000000000000a3", "rejected", NOW + 60, reason="not ours")
    ledger.add_challenge(make_challenge("three", uses=3, expires_at=NOW + 3600))
    assert spend(ledger, digest("three"), NOW + 1)
    ledger.add_challenge(make_challenge("spent", uses=1, expires_at=NOW + 3600,
                                        profile="wifi", label="lab"))
    assert spend(ledger, digest("spent"), NOW + 2)
    # Notices waiting: one claimed (its lease is its next_attempt_at), one
    # retried, and more than a chunk of the copy.
    extra = make_record(random_serial(), "tx-notified", issued_at=NOW + 70)
    ledger.commit([extra], notices=[make_notice(1, serial=extra.serial)])
    ledger.revoke(extra.serial, 1, NOW + 80, notices=[make_notice(2, event="revoked")])
    ledger.add_notices([make_notice(10 + i, created_at=NOW + i) for i in range(600)])
    assert len(ledger.claim_notices(NOW, 1, 300.0)) == 1
    ledger.settle_notices(retries=[(make_notice(2).notice_id, 4, NOW + 900)])
    for _ in range(7):
        ledger.next_crl_number()
    return {"second": second.serial, "renewed": renewed.serial}


def test_copy_to_postgresql_and_back_keeps_everything(postgres: PostgresServer,
                                                      tmp_path: Path) -> None:
    source_dir = init_dir(tmp_path / "lmdb-node")
    with LmdbLedger(source_dir / "ledger") as ledger:
        serials = fill(ledger)
        original = summarize(ledger)
    assert original.certificates == 1207 and original.revoked == 4
    assert (original.pending, original.challenges, original.crl_number) == (3, 2, 7)
    assert original.notices == 602

    database = postgres.new_database()
    (tmp_path / "db-password").write_text(postgres.password + "\n")
    done = scep_fast("ledger", "copy", "--dir", str(source_dir),
                     "--to", postgres.url(database, with_password=False),
                     "--to-password-file", str(tmp_path / "db-password"))
    assert done.returncode == 0, done.stderr
    assert original.sha256 in done.stdout and "1207 certificates (4 revoked)" in done.stdout
    assert "602 notices" in done.stdout
    assert postgres.password not in done.stdout + done.stderr

    with PgLedger(postgres.url(database)) as copied:
        assert summarize(copied) == original
        # Each transaction is held by the same certificate as in the source.
        holder = copied.find_transaction("tx-again", KEY_B)
        assert holder is not None and holder.serial == serials["second"]
        holder = copied.find_transaction("tx-expired", KEY_B)
        assert holder is not None and holder.serial == serials["renewed"]
        left = copied.get_challenge(digest("three"))
        assert left is not None and left.uses_left == 2
        retried = next(n for n in copied.iter_notices()
                       if n.notice_id == make_notice(2).notice_id)
        assert (retried.attempts, retried.next_attempt_at) == (4, NOW + 900)
        assert copied.next_crl_number() == 8
        copied.advance_crl_number(0)  # never goes back
        assert copied.last_crl_number() == 8
        copied_once = summarize(copied)

    # Back: a node whose ledger is that database copies it into a new LMDB ledger.
    pg_node = init_pg_dir(tmp_path / "pg-node", postgres, database)
    assert (pg_node / PASSWORD_FILE).exists()
    back = tmp_path / "back-to-lmdb"
    done = scep_fast("ledger", "copy", "--dir", str(pg_node), "--to", str(back))
    assert done.returncode == 0, done.stderr
    assert copied_once.sha256 in done.stdout
    with LmdbLedger(back) as returned:
        assert summarize(returned) == copied_once
        holder = returned.find_transaction("tx-again", KEY_B)
        assert holder is not None and holder.serial == serials["second"]
        assert returned.find_transaction("tx-7", KEY_A) is not None


def test_a_copy_goes_into_an_empty_ledger_only(postgres: PostgresServer, tmp_path: Path) -> None:
    url = postgres.url(postgres.new_database())
    migrate(url)
    with LmdbLedger(tmp_path / "source") as source, PgLedger(url) as target:
        source.commit([make_record(random_serial(), "tx-source")])
        target.commit([make_record(random_serial(), "tx-already-there")])
        with pytest.raises(CopyRefused, match="not empty"):
            copy_ledger(source, target)
        assert target.count() == 1


def test_the_digest_sees_a_difference_in_any_field(postgres: PostgresServer,
                                                   tmp_path: Path) -> None:
    url = postgres.url(postgres.new_database())
    migrate(url)
    with LmdbLedger(tmp_path / "source") as source, PgLedger(url) as target:
        record = make_record(random_serial(), "tx-one", issued_at=NOW)
        source.commit([record])
        target.commit([dataclasses.replace(record, profile="other")])
        mine, theirs = summarize(source), summarize(target)
        assert (mine.certificates, mine.revoked) == (theirs.certificates, theirs.revoked)
        assert mine.sha256 != theirs.sha256
