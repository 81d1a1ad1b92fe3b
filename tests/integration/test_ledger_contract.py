"""The Ledger contract: the rules of ``scep_fast.service.ledger``, against every adapter.

Each test of the rules runs against ``MemoryLedger``, ``LmdbLedger`` and
``PgLedger`` on a real PostgreSQL. Tests that need storage shared between
handles and processes (reopening, several processes racing) run against the
durable adapters only. What only one adapter has (an LMDB map that fills up,
its file locking, its byte formats) is tested beside that adapter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import multiprocessing
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest

from scep_fast.runtime.ledger_lmdb import LmdbLedger
from scep_fast.runtime.ledger_pg import PgLedger, is_postgres_url, migrate
from scep_fast.service.ledger import (
    AlreadyIssued,
    Challenge,
    ChallengeRefused,
    ChallengeUsedUp,
    Ledger,
    LedgerError,
    NotFound,
    Recorded,
    Renewal,
    RenewedGone,
    SerialCollision,
    TransactionConflict,
)
from scep_fast.service.ledger_memory import MemoryLedger
from scep_fast.service.notices import Notice
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

ADAPTERS = ["memory", "lmdb", "postgresql"]
DURABLE = ["lmdb", "postgresql"]


def open_ledger_at(target: str) -> Ledger:
    """A new handle on the storage ``target`` names: ``lmdb:DIR``, a PostgreSQL URL, ``memory:``."""
    if is_postgres_url(target):
        return PgLedger(target)
    kind, _, where = target.partition(":")
    if kind == "lmdb":
        return LmdbLedger(where, map_size_bytes=256 * 1024 * 1024)
    if kind == "memory":
        return MemoryLedger()
    raise ValueError(f"no ledger at {target!r}")


@dataclass(frozen=True)
class Storage:
    """Where one test's ledger lives; ``open()`` makes a handle on it (in any process)."""

    target: str

    def open(self) -> Ledger:
        return open_ledger_at(self.target)


def _storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    kind = request.param
    if kind == "lmdb":
        return Storage(f"lmdb:{tmp_path / 'ledger'}")
    if kind == "postgresql":
        # A database of its own for each test, with the schema.
        server: PostgresServer = request.getfixturevalue("postgres")
        url = server.url(server.new_database())
        migrate(url)
        return Storage(url)
    return Storage("memory:")


@pytest.fixture(params=ADAPTERS)
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    with closing(_storage(request, tmp_path).open()) as opened:
        yield opened


@pytest.fixture(params=DURABLE)
def durable(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    return _storage(request, tmp_path)


# --- commit ---------------------------------------------------------------------


def test_round_trip(ledger: Ledger) -> None:
    record = make_record(0xFEDC_BA98_7654_3210, "tx-round-trip")
    assert ledger.commit([record]) == [Recorded(record)]
    assert ledger.get(record.serial) == record
    assert ledger.find_transaction("tx-round-trip", KEY_A) == record
    assert ledger.find_transaction("tx-round-trip", KEY_B) is None
    assert ledger.get(record.serial + 1) is None
    assert list(ledger.iter_records()) == [record]
    assert ledger.count() == 1
    assert ledger.commit([]) == []


def test_resend_is_already_issued_and_writes_nothing(ledger: Ledger) -> None:
    first = make_record(1001, "tx-resend")
    ledger.commit([first])
    resend = make_record(1002, "tx-resend")  # same CSR, same signer key, fresh serial
    assert ledger.commit([resend]) == [AlreadyIssued(first)]
    assert ledger.get(1002) is None
    assert ledger.count() == 1


def test_resend_inside_one_batch(ledger: Ledger) -> None:
    first, again = make_record(5, "tx-twice"), make_record(6, "tx-twice")
    assert ledger.commit([first, again]) == [Recorded(first), AlreadyIssued(first)]
    assert ledger.count() == 1


def test_same_transaction_other_csr_is_a_conflict(ledger: Ledger) -> None:
    first = make_record(2001, "tx-conflict", csr="one")
    ledger.commit([first])
    assert ledger.commit([make_record(2002, "tx-conflict", csr="two")]) == [
        TransactionConflict(first)
    ]
    assert ledger.get(2002) is None
    # Another requester may use the same transaction id.
    other = make_record(2003, "tx-conflict", key=KEY_B, csr="two")
    assert ledger.commit([other]) == [Recorded(other)]


def test_serial_collision_is_refused(ledger: Ledger) -> None:
    first = make_record(3001, "tx-first")
    ledger.commit([first])
    clash = make_record(3001, "tx-second")
    after = make_record(3002, "tx-third")
    assert ledger.commit([clash, after]) == [SerialCollision(3001), Recorded(after)]
    assert ledger.get(3001) == first
    assert ledger.find_transaction("tx-second", KEY_A) is None
    assert ledger.count() == 2


def test_thousand_records_in_one_commit(ledger: Ledger) -> None:
    records = [make_record(random_serial(), f"tx-bulk-{i}") for i in range(1000)]
    started = time.perf_counter()
    outcomes = ledger.commit(records)
    elapsed = time.perf_counter() - started
    assert outcomes == [Recorded(r) for r in records]
    assert ledger.count() == 1000
    assert elapsed < 5.0, f"1,000 records took {elapsed:.2f} s"


def test_the_commit_rules_in_one_batch(ledger: Ledger) -> None:
    first = make_record(10, "tx-1", issued_at=NOW)
    other_requester = make_record(13, "tx-1", key=KEY_B, issued_at=NOW)
    outcomes = ledger.commit([
        first,
        make_record(11, "tx-1", issued_at=NOW),               # resend in the same batch
        make_record(12, "tx-1", csr="other", issued_at=NOW),  # same transaction, another CSR
        make_record(10, "tx-2", issued_at=NOW),               # serial taken
        other_requester,                                      # same id, another requester
    ])
    assert outcomes == [
        Recorded(first),
        AlreadyIssued(first),
        TransactionConflict(first),
        SerialCollision(10),
        Recorded(other_requester),
    ]
    assert ledger.count() == 2
    assert ledger.find_transaction("tx-2", KEY_A) is None
    assert ledger.find_transaction("tx-1", KEY_A) == first
    assert [r.serial for r in ledger.iter_records()] == [10, 13]


def test_a_batch_with_a_bad_value_writes_nothing(ledger: Ledger) -> None:
    with pytest.raises(TypeError):
        ledger.commit([make_record(1, "a"), "not a record", make_record(2, "b")])  # type: ignore[list-item]
    assert ledger.count() == 0
    ledger.close()
    with pytest.raises(LedgerError):
        ledger.count()


# --- The certificate lifecycle --------------------------------------------------


def test_revoke_round_trip_and_idempotence(ledger: Ledger) -> None:
    records = [make_record(serial, f"tx-{serial}") for serial in (30, 10, 20, 40)]
    ledger.commit(records)
    revoked = ledger.revoke(20, 1, NOW)
    assert revoked.serial == 20
    assert revoked.status == "revoked"
    assert revoked.revoked_at == NOW
    assert revoked.revocation_reason == 1
    assert ledger.get(20) == revoked
    assert ledger.find_transaction("tx-20", KEY_A) == revoked
    # Everything but the revocation is as issued.
    assert revoked.der == records[2].der
    assert revoked.issued_at == records[2].issued_at
    # Revoking again changes nothing: the first time and reason stay.
    assert ledger.revoke(20, 4, NOW + 100) == revoked
    assert ledger.get(20) == revoked
    assert ledger.count() == 4
    assert [r.status for r in ledger.iter_records()] == [
        "issued", "revoked", "issued", "issued"
    ]


def test_revoke_refuses_unknown_serials_and_reasons(ledger: Ledger) -> None:
    record = make_record(5, "tx-5")
    ledger.commit([record])
    with pytest.raises(NotFound):
        ledger.revoke(6, 0, NOW)
    with pytest.raises(LedgerError):  # NotFound is a LedgerError
        ledger.revoke(6, 0, NOW)
    for reason in (7, 11, -1):
        with pytest.raises(ValueError):
            ledger.revoke(5, reason, NOW)
    assert ledger.get(5) == record
    assert list(ledger.iter_revoked()) == []


def test_iter_revoked_yields_only_revoked_in_serial_order(ledger: Ledger) -> None:
    serials = [random_serial() for _ in range(40)]
    ledger.commit([make_record(s, f"tx-{i}") for i, s in enumerate(serials)])
    chosen = sorted(serials[::3])
    for offset, serial in enumerate(reversed(chosen)):
        ledger.revoke(serial, offset % 6, NOW + offset)
    listed = list(ledger.iter_revoked())
    assert [r.serial for r in listed] == chosen
    assert all(r.status == "revoked" and r.revoked_at is not None for r in listed)
    # A record committed as revoked is in the index too.
    extra = dataclasses.replace(make_record(1, "tx-extra"), status="revoked", revoked_at=NOW,
                                revocation_reason=3)
    assert ledger.commit([extra]) == [Recorded(extra)]
    assert [r.serial for r in ledger.iter_revoked()] == [1, *chosen]


def test_pending_requests(ledger: Ledger) -> None:
    first = make_pending("00000000000000b2", "tx-wait", csr="one")
    assert ledger.add_pending(first) == first
    assert ledger.find_pending("tx-wait", KEY_A) == first
    assert ledger.find_pending("tx-wait", KEY_B) is None
    assert ledger.find_pending("tx-other", KEY_A) is None
    assert ledger.get_pending("00000000000000b2") == first
    assert ledger.get_pending("00000000000000b3") is None
    assert ledger.get_pending("not an id") is None
    # The same transaction again, even with another CSR or id: the one on record.
    again = make_pending("00000000000000c3", "tx-wait", csr="two")
    assert ledger.add_pending(again) == first
    assert ledger.get_pending("00000000000000c3") is None
    # Another requester may use the same transaction id.
    other = make_pending("00000000000000a1", "tx-wait", key=KEY_B, received_at=NOW + 5)
    assert ledger.add_pending(other) == other
    # A request id belongs to one transaction.
    with pytest.raises(LedgerError, match="in use"):
        ledger.add_pending(make_pending("00000000000000a1", "tx-clash"))
    assert ledger.find_pending("tx-clash", KEY_A) is None
    with pytest.raises(ValueError):
        ledger.add_pending(dataclasses.replace(
            make_pending("00000000000000d4", "tx-d"), status="approved", decided_at=NOW
        ))
    assert list(ledger.iter_pending()) == [other, first]


def test_deciding_pending_requests(ledger: Ledger) -> None:
    waiting = [make_pending(f"{i:016x}", f"tx-{i}") for i in range(1, 4)]
    for request in waiting:
        ledger.add_pending(request)
    approved = ledger.decide_pending(waiting[0].request_id, "approved", NOW + 60)
    assert approved.status == "approved"
    assert approved.decided_at == NOW + 60
    assert approved.reason == ""
    assert approved.csr_der == waiting[0].csr_der
    rejected = ledger.decide_pending(waiting[1].request_id, "rejected", NOW + 70,
                                         reason="unknown device")
    assert (rejected.status, rejected.reason) == ("rejected", "unknown device")
    assert ledger.get_pending(waiting[0].request_id) == approved
    assert ledger.find_pending("tx-2", KEY_A) == rejected
    # Only once, only from pending, only to approved or rejected.
    for request_id in (waiting[0].request_id, waiting[1].request_id):
        for status in ("approved", "rejected"):
            with pytest.raises(LedgerError, match="already"):
                ledger.decide_pending(request_id, status, NOW + 80)
    for status in ("pending", "issued", ""):
        with pytest.raises(ValueError):
            ledger.decide_pending(waiting[2].request_id, status, NOW + 80)
    with pytest.raises(NotFound):
        ledger.decide_pending("00000000000000ff", "approved", NOW)
    # A decided request still names its transaction: adding it again returns it.
    assert ledger.add_pending(make_pending("0000000000000077", "tx-1")) == approved
    assert [r.status for r in ledger.iter_pending()] == ["approved", "rejected", "pending"]


def test_commit_ignores_pending_requests(ledger: Ledger) -> None:
    waiting = make_pending("0000000000000abc", "tx-approve")
    ledger.add_pending(waiting)
    ledger.decide_pending(waiting.request_id, "approved", NOW)
    record = make_record(77, "tx-approve")
    assert ledger.commit([record]) == [Recorded(record)]
    assert ledger.find_pending("tx-approve", KEY_A) is not None
    assert ledger.find_transaction("tx-approve", KEY_A) == record


def test_challenges(ledger: Ledger) -> None:
    single = make_challenge("one", profile="wifi", subject_pattern=r"^CN=.*\.example$",
                            label="batch 7")
    ledger.add_challenge(single)
    assert ledger.get_challenge(single.digest) == single
    assert ledger.get_challenge(digest("unknown")) is None
    with pytest.raises(LedgerError, match="on record"):
        ledger.add_challenge(make_challenge("one", uses=5))
    assert ledger.get_challenge(single.digest) == single
    assert spend(ledger, single.digest, NOW)
    stored = ledger.get_challenge(single.digest)
    assert stored is not None and stored.uses_left == 0
    assert not spend(ledger, single.digest, NOW)
    assert not spend(ledger, digest("unknown"), NOW)
    with pytest.raises(ValueError):
        ledger.commit([make_record(random_serial(), "tx-short")], [b"short"])
    with pytest.raises(ValueError):
        ledger.commit([make_record(random_serial(), "tx-two")], [None, None])


def test_challenge_expiry_and_uses(ledger: Ledger) -> None:
    three = make_challenge("three", uses=3)
    expiring = make_challenge("expiring", uses=10, expires_at=NOW)
    spent = make_challenge("spent", uses=0)
    for challenge in (three, expiring, spent):
        ledger.add_challenge(challenge)
    # Usable until, not at, expires_at.
    assert spend(ledger, expiring.digest, NOW - 0.001)
    assert not spend(ledger, expiring.digest, NOW)
    assert not spend(ledger, expiring.digest, NOW + 1)
    assert not spend(ledger, spent.digest, NOW)
    assert [spend(ledger, three.digest, NOW) for _ in range(4)] == [True] * 3 + [False]
    after = ledger.get_challenge(three.digest)
    assert after is not None and after.uses_left == 0


def test_uses_in_one_commit(ledger: Ledger) -> None:
    single, double = make_challenge("single"), make_challenge("double", uses=2)
    ledger.add_challenge(single)
    ledger.add_challenge(double)
    presented = [single.digest, double.digest, digest("nobody"), single.digest, double.digest,
                 double.digest, None]
    records = [make_record(100 + i, f"tx-use-{i}", issued_at=NOW)
               for i in range(len(presented))]
    outcomes = ledger.commit(records, presented)
    assert [type(o).__name__ for o in outcomes] == [
        "Recorded", "Recorded", "ChallengeRefused", "ChallengeRefused", "Recorded",
        "ChallengeRefused", "Recorded"]
    assert ledger.count() == 4


def test_a_resend_spends_no_challenge(ledger: Ledger) -> None:
    double = make_challenge("resent", uses=2)
    ledger.add_challenge(double)
    first = make_record(7, "tx-resent", issued_at=NOW)
    assert ledger.commit([first], [double.digest]) == [Recorded(first)]
    again = make_record(8, "tx-resent", issued_at=NOW)
    assert ledger.commit([again], [double.digest]) == [AlreadyIssued(first)]
    conflict = make_record(9, "tx-resent", csr="other", issued_at=NOW)
    assert ledger.commit([conflict], [double.digest]) == [TransactionConflict(first)]
    left = ledger.get_challenge(double.digest)
    assert left is not None and left.uses_left == 1


def test_a_revoked_or_expired_transaction_is_free_again(ledger: Ledger) -> None:
    first = make_record(11, "tx-again", issued_at=NOW)
    ledger.commit([first])
    ledger.revoke(11, 1, NOW + 1)
    # Same transaction and requester, another CSR: a new certificate.
    second = make_record(12, "tx-again", csr="second", issued_at=NOW + 2)
    assert ledger.commit([second]) == [Recorded(second)]
    assert ledger.find_transaction("tx-again", KEY_A) == second
    # Expired at the new record's time: free as well.
    third = make_record(13, "tx-again", csr="third", issued_at=second.not_after + 1)
    assert ledger.commit([third]) == [Recorded(third)]
    assert [r.serial for r in ledger.iter_records()] == [11, 12, 13]
    # While a certificate is good, the transaction stays its own.
    fourth = make_record(14, "tx-again", csr="fourth", issued_at=NOW + 3)
    assert ledger.commit([fourth]) == [TransactionConflict(third)]


def test_a_renewal_is_recorded_only_while_its_certificate_is_good(ledger: Ledger) -> None:
    old = make_record(21, "tx-old", issued_at=NOW)
    ledger.commit([old])
    # Renewals that keep the old certificate: each recorded, the old one untouched.
    kept_a = make_record(22, "tx-a", issued_at=NOW + 1)
    kept_b = make_record(23, "tx-b", issued_at=NOW + 1)
    assert ledger.commit([kept_a, kept_b], renewals=[Renewal(21), Renewal(21)]) == [
        Recorded(kept_a), Recorded(kept_b)]
    assert ledger.get(21) == old
    # Revoked since the request was authenticated: nothing is written.
    ledger.revoke(21, 1, NOW + 2)
    late = make_record(24, "tx-late", issued_at=NOW + 3)
    stray = make_record(25, "tx-stray", issued_at=NOW + 3)
    assert ledger.commit([late, stray], renewals=[Renewal(21), Renewal(999)]) == [
        RenewedGone(21), RenewedGone(999)]
    assert ledger.get(24) is None and ledger.get(25) is None
    # Expired at the renewal's time: the same.
    expired = make_record(26, "tx-exp", issued_at=NOW)
    ledger.commit([expired])
    after = make_record(27, "tx-after", issued_at=expired.not_after + 1)
    assert ledger.commit([after], renewals=[Renewal(26)]) == [RenewedGone(26)]


def test_a_renewal_that_replaces_revokes_in_its_commit_and_wins_once(ledger: Ledger) -> None:
    old = make_record(31, "tx-old", issued_at=NOW)
    ledger.commit([old])
    first = make_record(32, "tx-first", issued_at=NOW + 1)
    fork = make_record(33, "tx-fork", issued_at=NOW + 1)
    revoked_notice = make_notice(41, serial=32, event="revoked")
    outcomes = ledger.commit([first, fork], notices=[revoked_notice, make_notice(42, serial=33)],
                             renewals=[Renewal(31, 4), Renewal(31, 4)])
    assert outcomes == [Recorded(first), RenewedGone(31)]
    replaced = ledger.get(31)
    assert replaced == dataclasses.replace(old, status="revoked", revoked_at=first.issued_at,
                                           revocation_reason=4)
    assert [r.serial for r in ledger.iter_revoked()] == [31] and ledger.count_revoked() == 1
    assert ledger.get(33) is None
    assert sorted(outbox(ledger)) == [revoked_notice.notice_id]
    # A later batch renews it no more.
    later = make_record(34, "tx-later", issued_at=NOW + 2)
    assert ledger.commit([later], renewals=[Renewal(31, 4)]) == [RenewedGone(31)]
    # And a resend of the renewal that won is still answered with its certificate.
    assert ledger.commit([make_record(35, "tx-first", issued_at=NOW + 2)],
                         renewals=[Renewal(31, 4)]) == [AlreadyIssued(first)]


def test_renewals_are_checked_for_shape(ledger: Ledger) -> None:
    record = make_record(51, "tx-shape", issued_at=NOW)
    with pytest.raises(ValueError):
        ledger.commit([record], renewals=[Renewal(1), Renewal(2)])
    with pytest.raises(TypeError):
        ledger.commit([record], renewals=[51])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        Renewal(0)
    with pytest.raises(ValueError):
        Renewal(1, revoke_reason=7)  # 7 is not a CRLReason
    assert ledger.count() == 0


def test_commits_renewing_one_certificate_at_once_record_one(durable: Storage) -> None:
    # Two threads commit at once: through one handle on LMDB (one per process;
    # its writers queue on the file's lock), through a handle each on
    # PostgreSQL (as two nodes would, racing on the same rows).
    shared = durable.target.startswith("lmdb")
    with closing(durable.open()) as ledger:
        for round_ in range(6):
            serial = 100 + 10 * round_  # a fresh certificate each round
            ledger.commit([make_record(serial, f"tx-old-{round_}", issued_at=NOW)])
            barrier = threading.Barrier(2)
            outcomes: list[object] = []

            def renew(n: int, serial: int = serial, round_: int = round_,
                      barrier: threading.Barrier = barrier,
                      outcomes: list[object] = outcomes) -> None:
                record = make_record(serial + 1 + n, f"tx-{round_}-{n}", issued_at=NOW + 1)
                with contextlib.ExitStack() as stack:
                    handle = ledger if shared else stack.enter_context(closing(durable.open()))
                    barrier.wait(timeout=30)
                    outcomes.extend(handle.commit([record], renewals=[Renewal(serial, 4)]))

            threads = [threading.Thread(target=renew, args=(n,)) for n in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            assert sorted(type(o).__name__ for o in outcomes) == ["Recorded", "RenewedGone"]
            renewed = ledger.get(serial)
            assert renewed is not None and renewed.status == "revoked"


def test_pending_spends_its_challenge_once(ledger: Ledger) -> None:
    single = make_challenge("pending-single")
    ledger.add_challenge(single)
    waiting = make_pending("00000000000000aa", "tx-wait")
    assert ledger.add_pending(waiting, single.digest) == waiting
    # The same transaction again: the request on record, nothing spent.
    assert ledger.add_pending(make_pending("00000000000000ab", "tx-wait"),
                                  single.digest) == waiting
    with pytest.raises(ChallengeUsedUp):
        ledger.add_pending(make_pending("00000000000000ac", "tx-other"), single.digest)
    assert ledger.get_pending("00000000000000ac") is None
    assert ledger.find_pending("tx-other", KEY_A) is None


def test_crl_numbers(ledger: Ledger) -> None:
    assert [ledger.next_crl_number() for _ in range(5)] == [1, 2, 3, 4, 5]


# --- Durable storage: reopening, several processes ---------------------------


def test_reopen_sees_the_data(durable: Storage) -> None:
    records = [make_record(random_serial(), f"tx-{i}") for i in range(10)]
    ledger = durable.open()
    ledger.commit(records)
    ledger.close()
    with pytest.raises(LedgerError, match="closed"):
        ledger.count()
    with closing(durable.open()) as reopened:
        assert reopened.count() == 10
        assert list(reopened.iter_records()) == sorted(records, key=lambda r: r.serial)
        assert reopened.find_transaction("tx-3", KEY_A) == records[3]


def test_lifecycle_survives_reopening(durable: Storage) -> None:
    with closing(durable.open()) as ledger:
        ledger.commit([make_record(9, "tx-9"), make_record(8, "tx-8")])
        revoked = ledger.revoke(9, 5, NOW)
        waiting = ledger.add_pending(make_pending("0123456789abcdef", "tx-p"))
        ledger.add_challenge(make_challenge("kept", uses=2))
        assert spend(ledger, digest("kept"), NOW)
        assert ledger.next_crl_number() == 1
    with closing(durable.open()) as ledger:
        assert list(ledger.iter_revoked()) == [revoked]
        assert ledger.get_pending("0123456789abcdef") == waiting
        assert ledger.find_pending("tx-p", KEY_A) == waiting
        kept = ledger.get_challenge(digest("kept"))
        assert kept is not None and kept.uses_left == 1
        assert ledger.next_crl_number() == 2


PROCESSES = 3
BATCHES = 40
SHARED_KEY = hashlib.sha256(b"requester of resends").digest()


def _worker(target: str, index: int, barrier: object, results: object) -> None:
    """One worker process: its own environment, batches of 8 records."""
    outcomes: list[tuple[str, str, int]] = []
    with closing(open_ledger_at(target)) as ledger:
        barrier.wait()  # type: ignore[attr-defined]
        key = hashlib.sha256(f"requester {index}".encode()).digest()
        for batch in range(BATCHES):
            records = [
                make_record(random_serial(), f"own-{index}-{batch}-{i}", key=key)
                for i in range(6)
            ]
            # The same request resent to every worker at once...
            records.append(make_record(random_serial(), f"shared-{batch}", key=SHARED_KEY))
            # ...and one transaction id reused with a different CSR by each.
            records.append(make_record(random_serial(), f"conflict-{batch}", key=SHARED_KEY,
                                       csr=f"csr of worker {index}"))
            for outcome in ledger.commit(records):
                if isinstance(outcome, Recorded | AlreadyIssued):
                    record = outcome.record
                elif isinstance(outcome, TransactionConflict):
                    record = outcome.existing
                else:
                    raise AssertionError(f"unexpected {outcome}")
                outcomes.append((type(outcome).__name__, record.transaction_id, record.serial))
    results.put((index, outcomes))  # type: ignore[attr-defined]


def test_processes_commit_concurrently(durable: Storage) -> None:
    durable.open().close()
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(PROCESSES)
    results = context.Queue()
    workers = [
        context.Process(target=_worker, args=(durable.target, i, barrier, results))
        for i in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    collected = dict(results.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0

    kinds: dict[str, Counter[str]] = {}
    winners: dict[str, set[int]] = {}
    for outcomes in collected.values():
        assert len(outcomes) == BATCHES * 8
        for kind, txid, serial in outcomes:
            kinds.setdefault(txid, Counter())[kind] += 1
            winners.setdefault(txid, set()).add(serial)
    for txid, counter in kinds.items():
        # Exactly one worker recorded each transaction; every other worker
        # was told about that same certificate.
        assert counter["Recorded"] == 1, (txid, counter)
        assert len(winners[txid]) == 1, txid
        if txid.startswith("shared-"):
            assert counter["AlreadyIssued"] == PROCESSES - 1
        if txid.startswith("conflict-"):
            assert counter["TransactionConflict"] == PROCESSES - 1

    expected = PROCESSES * BATCHES * 6 + 2 * BATCHES
    with closing(durable.open()) as ledger:
        assert ledger.count() == expected
        records = list(ledger.iter_records())
        assert len(records) == expected
        pairs = [(r.transaction_id, r.requester_key_sha256) for r in records]
        assert len(set(pairs)) == expected
        for record in records:
            assert winners[record.transaction_id] == {record.serial}
            found = ledger.find_transaction(record.transaction_id, record.requester_key_sha256)
            assert found == record


RACE_PROCESSES = 2
RACE_THREADS = 25
CRL_NUMBERS_PER_PROCESS = 30


def _racer(target: str, barrier: object, results: object) -> None:
    """One worker process: 25 threads at once use each challenge once."""
    single, triple = digest("single use"), digest("three uses")
    won: dict[str, int] = {"single": 0, "triple": 0}
    lock = threading.Lock()
    with closing(open_ledger_at(target)) as ledger:
        start = threading.Barrier(RACE_THREADS)

        def attempt() -> None:
            start.wait()
            for name, challenge_digest in (("single", single), ("triple", triple)):
                if spend(ledger, challenge_digest, time.time()):
                    with lock:
                        won[name] += 1

        barrier.wait()  # type: ignore[attr-defined]
        threads = [threading.Thread(target=attempt) for _ in range(RACE_THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        barrier.wait()  # type: ignore[attr-defined]
        numbers = [ledger.next_crl_number() for _ in range(CRL_NUMBERS_PER_PROCESS)]
    results.put((won, numbers))  # type: ignore[attr-defined]


def _run_processes(
    target: Callable[..., None], storage: Storage, count: int
) -> list[tuple[dict[str, int], list[int]]]:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(count)
    results = context.Queue()
    workers = [
        context.Process(target=target, args=(storage.target, barrier, results))
        for _ in range(count)
    ]
    for worker in workers:
        worker.start()
    collected: list[tuple[dict[str, int], list[int]]] = [
        results.get(timeout=120) for _ in workers
    ]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    return collected


def test_processes_race_for_challenges_and_crl_numbers(durable: Storage) -> None:
    now = time.time()
    with closing(durable.open()) as ledger:
        ledger.add_challenge(Challenge(digest=digest("single use"), created_at=now,
                                       expires_at=now + 600, uses_left=1))
        ledger.add_challenge(Challenge(digest=digest("three uses"), created_at=now,
                                       expires_at=now + 600, uses_left=3))
    collected = _run_processes(_racer, durable, RACE_PROCESSES)

    won = Counter[str]()
    numbers: list[int] = []
    for process_won, process_numbers in collected:
        won.update(process_won)
        # Strictly increasing within a process...
        assert process_numbers == sorted(set(process_numbers))
        numbers.extend(process_numbers)
    # ...and never handed out twice across processes.
    total = RACE_PROCESSES * CRL_NUMBERS_PER_PROCESS
    assert sorted(numbers) == list(range(1, total + 1))
    # 50 attempts on each: a single-use challenge is used once, a 3-use one three times.
    assert won == {"single": 1, "triple": 3}
    with closing(durable.open()) as ledger:
        for secret in ("single use", "three uses"):
            stored = ledger.get_challenge(digest(secret))
            assert stored is not None and stored.uses_left == 0
        assert ledger.next_crl_number() == total + 1


def test_find_transactions_reads_records_and_pending_requests_at_once(ledger: Ledger) -> None:
    issued = make_record(random_serial(), "tx-issued")
    ledger.commit([issued])
    waiting = ledger.add_pending(make_pending("aa00aa00aa00aa00", "tx-waiting"))
    found = ledger.find_transactions([("tx-issued", KEY_A), ("tx-waiting", KEY_A),
                                      ("tx-unknown", KEY_A), ("tx-issued", KEY_B)])
    assert found == [(issued, None), (None, waiting), (None, None), (None, None)]


# --- The outbox -------------------------------------------------------------------

LEASE = 30.0
EVER = NOW + 10 * 365 * 86400  # a claim at this time finds every notice due


def outbox(ledger: Ledger) -> dict[bytes, Notice]:
    """Every notice in the outbox, as stored, by id; claiming them moves only their
    next_attempt_at, which the caller does not look at afterwards."""
    claimed = ledger.claim_notices(EVER, 10_000, LEASE)
    assert len(claimed) == ledger.count_notices()
    return {n.notice_id: dataclasses.replace(n, next_attempt_at=0.0) for n in claimed}


def test_a_serial_bound_notice_is_written_only_when_its_record_is_recorded(
        ledger: Ledger) -> None:
    once = make_challenge("notice once")
    ledger.add_challenge(once)
    first = make_record(1, "tx-n", issued_at=NOW)
    recorded = make_notice(1, serial=1)
    free = make_notice(2)
    elsewhere = make_notice(3, serial=99)  # no record of this batch has serial 99
    assert ledger.commit([first], [once.digest], notices=[recorded, free, elsewhere]) == [
        Recorded(first)]
    assert ledger.count_notices() == 2

    resend = make_record(2, "tx-n", issued_at=NOW)
    conflict = make_record(3, "tx-n", csr="other", issued_at=NOW)
    used_up = make_record(4, "tx-spent", issued_at=NOW)
    clash = make_record(1, "tx-clash", issued_at=NOW)  # serial 1 is taken
    outcomes = ledger.commit(
        [resend, conflict, used_up, clash], [None, None, once.digest, None],
        notices=[make_notice(12, serial=2), make_notice(13, serial=3),
                 make_notice(14, serial=4), make_notice(15, serial=1), make_notice(16)])
    assert outcomes == [AlreadyIssued(first), TransactionConflict(first),
                        ChallengeRefused(once.digest), SerialCollision(1)]
    # Only the notice without a serial: serial 1's record was recorded, but
    # by another commit.
    assert ledger.count_notices() == 3

    # In one batch with a record that is recorded, each notice follows its own.
    fresh = make_record(5, "tx-fresh", issued_at=NOW)
    again = make_record(6, "tx-fresh", issued_at=NOW)
    assert ledger.commit([fresh, again], notices=[make_notice(21, serial=5),
                                                  make_notice(22, serial=6)]) == [
        Recorded(fresh), AlreadyIssued(fresh)]
    stored = outbox(ledger)
    assert sorted(stored) == [make_notice(n).notice_id for n in (1, 2, 16, 21)]
    # Stored as given, every field.
    assert stored[recorded.notice_id] == recorded
    assert stored[free.notice_id] == free


def test_notices_without_records(ledger: Ledger) -> None:
    free, bound = make_notice(1, event="refused"), make_notice(2, serial=7)
    assert ledger.commit([], notices=[free, bound]) == []
    assert outbox(ledger) == {free.notice_id: free}
    ledger.add_notices([make_notice(3), make_notice(4, serial=8)])
    ledger.add_notices([])
    assert ledger.count_notices() == 3


def test_a_commit_that_fails_writes_no_notice(ledger: Ledger) -> None:
    single = make_challenge("kept single")
    ledger.add_challenge(single)
    waiting = make_notice(1)
    ledger.add_notices([waiting])
    record = make_record(40, "tx-fails", issued_at=NOW)
    # A notice id that is in the outbox already: the whole commit is refused.
    with pytest.raises(LedgerError, match="outbox already"):
        ledger.commit([record], [single.digest],
                      notices=[make_notice(2), make_notice(1, event="refused"),
                               make_notice(3, serial=40)])
    # A record that is not one, among notices.
    with pytest.raises(TypeError):
        ledger.commit([record, "not a record"], notices=[make_notice(4)])  # type: ignore[list-item]
    # One id twice in one commit.
    with pytest.raises(ValueError):
        ledger.commit([record], notices=[make_notice(5), make_notice(5)])
    with pytest.raises(LedgerError, match="outbox already"):
        ledger.add_notices([make_notice(6), waiting])
    assert ledger.count() == 0
    assert outbox(ledger) == {waiting.notice_id: waiting}
    kept = ledger.get_challenge(single.digest)
    assert kept is not None and kept.uses_left == 1
    # And the same commit goes through once the clash is gone.
    ledger.settle_notices(delivered=[waiting.notice_id])
    assert ledger.commit([record], [single.digest],
                         notices=[make_notice(1), make_notice(3, serial=40)]) == [
        Recorded(record)]
    assert ledger.count_notices() == 2


def test_claims_take_the_due_notices_oldest_first_and_lease_them(ledger: Ledger) -> None:
    later = make_notice(1, next_attempt_at=NOW + 10, created_at=NOW)
    now_young = make_notice(2, created_at=NOW + 5)
    now_old = make_notice(3, created_at=NOW + 1)
    later_old = make_notice(4, next_attempt_at=NOW + 10, created_at=NOW - 5)
    not_yet = make_notice(5, next_attempt_at=NOW + 100, created_at=NOW - 100)
    ledger.add_notices([later, now_young, now_old, later_old, not_yet])
    assert ledger.claim_notices(NOW + 50, 0, LEASE) == []

    until = NOW + 50 + LEASE

    def leased(*notices: Notice) -> list[Notice]:
        return [dataclasses.replace(n, next_attempt_at=until) for n in notices]

    assert ledger.claim_notices(NOW + 50, 3, LEASE) == leased(now_old, now_young, later_old)
    # What is leased is not claimed again while the lease runs.
    assert ledger.claim_notices(NOW + 50, 10, LEASE) == leased(later)
    assert ledger.claim_notices(NOW + 50, 10, LEASE) == []
    assert ledger.claim_notices(until - 0.5, 10, LEASE) == []
    # Once it has run out, they are due again (a claimer died), oldest first.
    again = ledger.claim_notices(until, 10, LEASE)
    assert [n.notice_id for n in again] == [n.notice_id for n in
                                            (later_old, later, now_old, now_young)]
    assert all(n.next_attempt_at == until + LEASE for n in again)
    assert ledger.claim_notices(NOW + 100, 10, LEASE) == [
        dataclasses.replace(not_yet, next_attempt_at=NOW + 100 + LEASE)]
    assert ledger.count_notices() == 5
    for limit, lease in ((-1, LEASE), (1, 0.0), (1, -1.0), (1, float("nan"))):
        with pytest.raises(ValueError):
            ledger.claim_notices(NOW, limit, lease)


def test_delivered_and_retried_notices(ledger: Ledger) -> None:
    one, two, three = make_notice(1), make_notice(2), make_notice(3, serial=3)
    ledger.add_notices([one, two, three])
    assert len(ledger.claim_notices(NOW, 10, LEASE)) == 3
    ledger.settle_notices(delivered=[one.notice_id])
    assert ledger.count_notices() == 2
    # Unknown ids are ignored: delivered twice, or never there.
    ledger.settle_notices(delivered=[one.notice_id])
    ledger.settle_notices(delivered=[make_notice(99).notice_id])
    ledger.settle_notices(retries=[(make_notice(98).notice_id, 1, NOW)])
    assert ledger.count_notices() == 2
    ledger.settle_notices(retries=[(two.notice_id, 3, NOW + 500)])
    ledger.settle_notices(retries=[(three.notice_id, 1, NOW + 400)])
    assert ledger.claim_notices(NOW + 399, 10, LEASE) == []
    assert ledger.claim_notices(NOW + 500, 10, LEASE) == [
        dataclasses.replace(three, attempts=1, next_attempt_at=NOW + 500 + LEASE),
        dataclasses.replace(two, attempts=3, next_attempt_at=NOW + 500 + LEASE)]
    with pytest.raises(ValueError):
        ledger.settle_notices(retries=[(two.notice_id, -1, NOW)])
    ledger.settle_notices(delivered=[two.notice_id])
    ledger.settle_notices(delivered=[three.notice_id])
    assert ledger.count_notices() == 0
    assert ledger.claim_notices(EVER, 10, LEASE) == []


def test_a_round_is_settled_in_one_call_or_not_at_all(ledger: Ledger) -> None:
    one, two, three = make_notice(1), make_notice(2), make_notice(3)
    ledger.add_notices([one, two, three])
    ledger.claim_notices(NOW, 10, LEASE)
    # A bad retry refuses the whole round: the delivered one stays too.
    with pytest.raises(ValueError):
        ledger.settle_notices([one.notice_id], [(two.notice_id, -1, NOW)])
    assert ledger.count_notices() == 3
    ledger.settle_notices([one.notice_id, three.notice_id], [(two.notice_id, 2, NOW + 10)])
    assert ledger.count_notices() == 1
    assert ledger.claim_notices(NOW + 10, 10, LEASE) == [
        dataclasses.replace(two, attempts=2, next_attempt_at=NOW + 10 + LEASE)]


def test_a_revocation_writes_its_notices_once(ledger: Ledger) -> None:
    record = make_record(30, "tx-revoked", issued_at=NOW)
    ledger.commit([record])
    revoked = ledger.revoke(30, 1, NOW + 1, notices=[make_notice(1, event="revoked",
                                                                 serial=30)])
    assert ledger.count_notices() == 1
    # Revoked already: the record as it is, and no notice.
    assert ledger.revoke(30, 4, NOW + 2, notices=[make_notice(2, event="revoked")]) == revoked
    with pytest.raises(NotFound):
        ledger.revoke(31, 1, NOW, notices=[make_notice(3, event="revoked")])
    other = make_record(32, "tx-other", issued_at=NOW)
    ledger.commit([other])
    with pytest.raises(ValueError):
        ledger.revoke(32, 7, NOW, notices=[make_notice(4, event="revoked")])
    # A notice id on record already refuses the revocation as well.
    with pytest.raises(LedgerError, match="outbox already"):
        ledger.revoke(32, 1, NOW, notices=[make_notice(1, event="revoked")])
    assert ledger.get(32) == other
    assert sorted(outbox(ledger)) == [make_notice(1).notice_id]
    ledger.revoke(32, 1, NOW, notices=[make_notice(5), make_notice(6)])
    assert ledger.count_notices() == 3


def test_the_outbox_survives_reopening(durable: Storage) -> None:
    record = make_record(50, "tx-kept", issued_at=NOW)
    with closing(durable.open()) as ledger:
        ledger.commit([record], notices=[make_notice(1, serial=50), make_notice(2)])
        ledger.add_notices([make_notice(3, created_at=NOW - 1)])
        ledger.revoke(50, 1, NOW, notices=[make_notice(4, event="revoked", serial=50)])
        (claimed,) = ledger.claim_notices(NOW, 1, LEASE)
        assert claimed.notice_id == make_notice(3).notice_id
        ledger.settle_notices(retries=[(make_notice(1).notice_id, 2, NOW + 1000)])
        ledger.settle_notices(delivered=[make_notice(2).notice_id])
    with closing(durable.open()) as ledger:
        assert ledger.count_notices() == 3
        # The lease and the retry held over the reopening.
        assert [n.notice_id for n in ledger.claim_notices(NOW + 1, 10, LEASE)] == [
            make_notice(4).notice_id]
        assert ledger.claim_notices(NOW + LEASE, 10, LEASE) == [
            dataclasses.replace(make_notice(3, created_at=NOW - 1),
                                next_attempt_at=NOW + 2 * LEASE)]
        ledger.settle_notices(delivered=[make_notice(3).notice_id])
        ledger.settle_notices(delivered=[make_notice(4).notice_id])
        assert ledger.claim_notices(NOW + 1000, 10, LEASE) == [
            dataclasses.replace(make_notice(1, serial=50), attempts=2,
                                next_attempt_at=NOW + 1000 + LEASE)]


CLAIMERS = 3
CLAIMED_NOTICES = 300


def _claimer(target: str, barrier: object, results: object) -> None:
    """One worker process: claims a few notices at a time until none is due."""
    taken: list[bytes] = []
    with closing(open_ledger_at(target)) as ledger:
        barrier.wait()  # type: ignore[attr-defined]
        while claimed := ledger.claim_notices(NOW + 1, 7, 3600.0):
            taken.extend(n.notice_id for n in claimed)
    results.put(taken)  # type: ignore[attr-defined]


def test_processes_claiming_at_once_never_get_the_same_notice(durable: Storage) -> None:
    notices = [make_notice(i, created_at=NOW - i % 17) for i in range(CLAIMED_NOTICES)]
    with closing(durable.open()) as ledger:
        ledger.add_notices(notices)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(CLAIMERS)
    results = context.Queue()
    workers = [context.Process(target=_claimer, args=(durable.target, barrier, results))
               for _ in range(CLAIMERS)]
    for worker in workers:
        worker.start()
    taken: list[list[bytes]] = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    every = [notice_id for ids in taken for notice_id in ids]
    assert len(every) == len(set(every)) == CLAIMED_NOTICES
    assert set(every) == {n.notice_id for n in notices}
    with closing(durable.open()) as ledger:
        assert ledger.count_notices() == CLAIMED_NOTICES
        assert ledger.claim_notices(NOW + 1, 10, LEASE) == []
