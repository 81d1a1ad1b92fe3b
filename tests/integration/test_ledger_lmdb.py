"""The LMDB ledger on a real environment, in one process and in several."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import multiprocessing
import os
import secrets
import shlex
import shutil
import stat
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import lmdb
import pytest

from scep_fast.runtime.ledger_lmdb import SCHEMA_VERSION, LmdbLedger, _full_condition
from scep_fast.runtime.ledger_lmdb_codec import encode_record, serial_key, transaction_key
from scep_fast.service.ledger import (
    AlreadyIssued,
    CertRecord,
    Challenge,
    ChallengeRefused,
    ChallengeUsedUp,
    Ledger,
    LedgerCorrupt,
    LedgerError,
    LedgerFull,
    NotFound,
    PendingRequest,
    Recorded,
    SerialCollision,
    TransactionConflict,
    UnsupportedSchema,
)
from scep_fast.service.ledger_memory import MemoryLedger
from tests.conftest import missing_peer

KEY_A = hashlib.sha256(b"requester A").digest()
KEY_B = hashlib.sha256(b"requester B").digest()


def csr_hash(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def make_record(serial: int, txid: str, *, key: bytes = KEY_A, csr: str = "csr",
                der_size: int = 900, issued_at: float | None = None) -> CertRecord:
    issued_at = time.time() if issued_at is None else issued_at
    return CertRecord(
        serial=serial,
        der=b"\x30\x82" + serial.to_bytes(20, "big") + b"\xa5" * der_size,
        subject=f"CN={txid}.example",
        sans=(f"DNS:{txid}.example", "IP:192.0.2.7"),
        not_before=int(issued_at) - 600,
        not_after=int(issued_at) + 365 * 86400,
        issued_at=issued_at,
        transaction_id=txid,
        requester_key_sha256=key,
        csr_sha256=csr_hash(csr),
        profile="default",
    )


def random_serial() -> int:
    # 16 random octets with the top bit clear, as the issuer makes them.
    return secrets.randbits(127) | 1


@pytest.fixture
def ledger_dir(tmp_path: Path) -> Path:
    return tmp_path / "ledger"


@pytest.fixture
def ledger(ledger_dir: Path) -> Iterator[LmdbLedger]:
    opened = LmdbLedger(ledger_dir, map_size_bytes=256 * 1024 * 1024)
    yield opened
    opened.close()


def test_round_trip(ledger: LmdbLedger) -> None:
    record = make_record(0xFEDC_BA98_7654_3210, "tx-round-trip")
    assert ledger.commit([record]) == [Recorded(record)]
    assert ledger.get(record.serial) == record
    assert ledger.find_transaction("tx-round-trip", KEY_A) == record
    assert ledger.find_transaction("tx-round-trip", KEY_B) is None
    assert ledger.get(record.serial + 1) is None
    assert list(ledger.iter_records()) == [record]
    assert ledger.count() == 1
    assert ledger.commit([]) == []


def test_resend_is_already_issued_and_writes_nothing(ledger: LmdbLedger) -> None:
    first = make_record(1001, "tx-resend")
    ledger.commit([first])
    resend = make_record(1002, "tx-resend")  # same CSR, same signer key, fresh serial
    assert ledger.commit([resend]) == [AlreadyIssued(first)]
    assert ledger.get(1002) is None
    assert ledger.count() == 1


def test_resend_inside_one_batch(ledger: LmdbLedger) -> None:
    first, again = make_record(5, "tx-twice"), make_record(6, "tx-twice")
    assert ledger.commit([first, again]) == [Recorded(first), AlreadyIssued(first)]
    assert ledger.count() == 1


def test_same_transaction_other_csr_is_a_conflict(ledger: LmdbLedger) -> None:
    first = make_record(2001, "tx-conflict", csr="one")
    ledger.commit([first])
    assert ledger.commit([make_record(2002, "tx-conflict", csr="two")]) == [
        TransactionConflict(first)
    ]
    assert ledger.get(2002) is None
    # Another requester may use the same transaction id.
    other = make_record(2003, "tx-conflict", key=KEY_B, csr="two")
    assert ledger.commit([other]) == [Recorded(other)]


def test_serial_collision_is_refused(ledger: LmdbLedger) -> None:
    first = make_record(3001, "tx-first")
    ledger.commit([first])
    clash = make_record(3001, "tx-second")
    after = make_record(3002, "tx-third")
    assert ledger.commit([clash, after]) == [SerialCollision(3001), Recorded(after)]
    assert ledger.get(3001) == first
    assert ledger.find_transaction("tx-second", KEY_A) is None
    assert ledger.count() == 2


def test_batch_is_all_or_nothing(tmp_path: Path) -> None:
    # A small map fills up in the middle of the second batch: LMDB fails a
    # put after several records of the batch were written in the transaction.
    with LmdbLedger(tmp_path / "small", map_size_bytes=1024 * 1024) as ledger:
        kept = [make_record(i, f"tx-kept-{i}") for i in (1, 2)]
        ledger.commit(kept)
        too_big = [make_record(100 + i, f"tx-big-{i}", der_size=16 * 1024) for i in range(100)]
        with pytest.raises(LedgerFull, match="map size"):
            ledger.commit(too_big)
        assert ledger.count() == 2
        assert list(ledger.iter_records()) == kept
        assert all(ledger.find_transaction(f"tx-big-{i}", KEY_A) is None for i in range(100))
        # The ledger still works after the failed batch.
        last = make_record(3, "tx-after")
        assert ledger.commit([last]) == [Recorded(last)]


def test_reopen_sees_the_data(ledger_dir: Path) -> None:
    records = [make_record(random_serial(), f"tx-{i}") for i in range(10)]
    ledger = LmdbLedger(ledger_dir)
    ledger.commit(records)
    ledger.close()
    with pytest.raises(LedgerError, match="closed"):
        ledger.count()
    with LmdbLedger(ledger_dir) as reopened:
        assert reopened.count() == 10
        assert list(reopened.iter_records()) == sorted(records, key=lambda r: r.serial)
        assert reopened.find_transaction("tx-3", KEY_A) == records[3]


def test_one_environment_per_process(ledger: LmdbLedger) -> None:
    with pytest.raises(LedgerError, match="already open in this process"):
        LmdbLedger(ledger.path)


def test_file_modes(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        directory = tmp_path / "modes"
        with LmdbLedger(directory) as ledger:
            ledger.commit([make_record(1, "tx-1")])
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for name in ("data.mdb", "lock.mdb"):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600


def test_unknown_schema_is_refused(ledger_dir: Path) -> None:
    LmdbLedger(ledger_dir).close()
    env = lmdb.open(str(ledger_dir), max_dbs=4)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.put(b"schema_version", struct.pack(">I", SCHEMA_VERSION + 98), db=meta)
    env.close()
    with pytest.raises(UnsupportedSchema,
                       match=r"schema version 100\b.*reads schema versions 1 to 2"):
        LmdbLedger(ledger_dir)
    # The refusal released the environment: a fixed ledger opens again.
    env = lmdb.open(str(ledger_dir), max_dbs=4)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.put(b"schema_version", struct.pack(">I", SCHEMA_VERSION), db=meta)
    env.close()
    LmdbLedger(ledger_dir).close()


def test_garbage_record_is_refused(ledger_dir: Path) -> None:
    with LmdbLedger(ledger_dir) as ledger:
        ledger.commit([make_record(42, "tx-42")])
    env = lmdb.open(str(ledger_dir), max_dbs=4)
    certs = env.open_db(b"certs")
    with env.begin(write=True) as txn:
        txn.put(serial_key(42), b"\x01garbage", db=certs)
    env.close()
    with LmdbLedger(ledger_dir) as ledger:
        with pytest.raises(LedgerCorrupt, match="serial 2a"):
            ledger.get(42)
        with pytest.raises(LedgerCorrupt):
            ledger.find_transaction("tx-42", KEY_A)
        with pytest.raises(LedgerCorrupt):
            list(ledger.iter_records())


def test_thousand_records_in_one_commit(ledger: LmdbLedger) -> None:
    records = [make_record(random_serial(), f"tx-bulk-{i}") for i in range(1000)]
    started = time.perf_counter()
    outcomes = ledger.commit(records)
    elapsed = time.perf_counter() - started
    assert outcomes == [Recorded(r) for r in records]
    assert ledger.count() == 1000
    assert elapsed < 5.0, f"1,000 records took {elapsed:.2f} s"


def test_bulk_load(ledger: LmdbLedger) -> None:
    # Ascending serials (the append path) then random ones (the search path).
    ascending = [make_record(i + 1, f"tx-asc-{i}", der_size=100) for i in range(3000)]
    scattered = [make_record(random_serial(), f"tx-rnd-{i}", der_size=100) for i in range(2000)]
    assert ledger.bulk_load(ascending, records_per_transaction=1000) == 3000
    assert ledger.bulk_load(iter(scattered), records_per_transaction=700) == 2000
    assert ledger.count() == 5000
    listed = [r.serial for r in ledger.iter_records()]
    assert listed == sorted(r.serial for r in ascending + scattered)
    assert ledger.find_transaction("tx-rnd-1999", KEY_A) == scattered[-1]
    # A duplicate fails its whole chunk.
    with pytest.raises(LedgerError, match="duplicate"):
        ledger.bulk_load([make_record(9_000_001, "tx-new"), make_record(1, "tx-dup")])
    assert ledger.count() == 5000
    assert ledger.find_transaction("tx-new", KEY_A) is None


# --- Several processes -------------------------------------------------------

PROCESSES = 3
BATCHES = 40
SHARED_KEY = hashlib.sha256(b"requester of resends").digest()


def _worker(path: str, index: int, barrier: object, results: object) -> None:
    """One worker process: its own environment, batches of 8 records."""
    outcomes: list[tuple[str, str, int]] = []
    with LmdbLedger(path) as ledger:
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


def test_processes_commit_concurrently(ledger_dir: Path) -> None:
    LmdbLedger(ledger_dir).close()
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(PROCESSES)
    results = context.Queue()
    workers = [
        context.Process(target=_worker, args=(str(ledger_dir), i, barrier, results))
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
    with LmdbLedger(ledger_dir) as ledger:
        assert ledger.count() == expected
        records = list(ledger.iter_records())
        assert len(records) == expected
        pairs = [(r.transaction_id, r.requester_key_sha256) for r in records]
        assert len(set(pairs)) == expected
        for record in records:
            assert winners[record.transaction_id] == {record.serial}
            found = ledger.find_transaction(record.transaction_id, record.requester_key_sha256)
            assert found == record


# --- The certificate lifecycle, on both ledgers -------------------------------

NOW = 1_750_000_000.0


@pytest.fixture(params=["memory", "lmdb"])
def any_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    opened: Ledger
    if request.param == "memory":
        opened = MemoryLedger()
    else:
        opened = LmdbLedger(tmp_path / "ledger", map_size_bytes=64 * 1024 * 1024)
    yield opened
    opened.close()


def make_pending(request_id: str, txid: str, *, key: bytes = KEY_A, csr: str = "csr",
                 received_at: float = NOW) -> PendingRequest:
    return PendingRequest(
        request_id=request_id,
        transaction_id=txid,
        requester_key_sha256=key,
        csr_sha256=csr_hash(csr),
        csr_der=b"\x30\x82\x02\x00" + csr.encode() * 20,
        subject=f"CN={txid}.example",
        sans=(f"DNS:{txid}.example",),
        profile="default",
        received_at=received_at,
    )


def make_challenge(secret: str, *, uses: int = 1, expires_at: float = NOW + 3600,
                   **changes: object) -> Challenge:
    return Challenge(
        digest=hashlib.sha256(secret.encode()).digest(),
        created_at=NOW - 60,
        expires_at=expires_at,
        uses_left=uses,
        **changes,  # type: ignore[arg-type]
    )


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def test_revoke_round_trip_and_idempotence(any_ledger: Ledger) -> None:
    records = [make_record(serial, f"tx-{serial}") for serial in (30, 10, 20, 40)]
    any_ledger.commit(records)
    revoked = any_ledger.revoke(20, 1, NOW)
    assert revoked.serial == 20
    assert revoked.status == "revoked"
    assert revoked.revoked_at == NOW
    assert revoked.revocation_reason == 1
    assert any_ledger.get(20) == revoked
    assert any_ledger.find_transaction("tx-20", KEY_A) == revoked
    # Everything but the revocation is as issued.
    assert revoked.der == records[2].der
    assert revoked.issued_at == records[2].issued_at
    # Revoking again changes nothing: the first time and reason stay.
    assert any_ledger.revoke(20, 4, NOW + 100) == revoked
    assert any_ledger.get(20) == revoked
    assert any_ledger.count() == 4
    assert [r.status for r in any_ledger.iter_records()] == [
        "issued", "revoked", "issued", "issued"
    ]


def test_revoke_refuses_unknown_serials_and_reasons(any_ledger: Ledger) -> None:
    record = make_record(5, "tx-5")
    any_ledger.commit([record])
    with pytest.raises(NotFound):
        any_ledger.revoke(6, 0, NOW)
    with pytest.raises(LedgerError):  # NotFound is a LedgerError
        any_ledger.revoke(6, 0, NOW)
    for reason in (7, 11, -1):
        with pytest.raises(ValueError):
            any_ledger.revoke(5, reason, NOW)
    assert any_ledger.get(5) == record
    assert list(any_ledger.iter_revoked()) == []


def test_iter_revoked_yields_only_revoked_in_serial_order(any_ledger: Ledger) -> None:
    serials = [random_serial() for _ in range(40)]
    any_ledger.commit([make_record(s, f"tx-{i}") for i, s in enumerate(serials)])
    chosen = sorted(serials[::3])
    for offset, serial in enumerate(reversed(chosen)):
        any_ledger.revoke(serial, offset % 6, NOW + offset)
    listed = list(any_ledger.iter_revoked())
    assert [r.serial for r in listed] == chosen
    assert all(r.status == "revoked" and r.revoked_at is not None for r in listed)
    # A record committed as revoked is in the index too.
    extra = dataclasses.replace(make_record(1, "tx-extra"), status="revoked", revoked_at=NOW,
                                revocation_reason=3)
    assert any_ledger.commit([extra]) == [Recorded(extra)]
    assert [r.serial for r in any_ledger.iter_revoked()] == [1, *chosen]


def test_pending_requests(any_ledger: Ledger) -> None:
    first = make_pending("00000000000000b2", "tx-wait", csr="one")
    assert any_ledger.add_pending(first) == first
    assert any_ledger.find_pending("tx-wait", KEY_A) == first
    assert any_ledger.find_pending("tx-wait", KEY_B) is None
    assert any_ledger.find_pending("tx-other", KEY_A) is None
    assert any_ledger.get_pending("00000000000000b2") == first
    assert any_ledger.get_pending("00000000000000b3") is None
    assert any_ledger.get_pending("not an id") is None
    # The same transaction again, even with another CSR or id: the one on record.
    again = make_pending("00000000000000c3", "tx-wait", csr="two")
    assert any_ledger.add_pending(again) == first
    assert any_ledger.get_pending("00000000000000c3") is None
    # Another requester may use the same transaction id.
    other = make_pending("00000000000000a1", "tx-wait", key=KEY_B, received_at=NOW + 5)
    assert any_ledger.add_pending(other) == other
    # A request id belongs to one transaction.
    with pytest.raises(LedgerError, match="in use"):
        any_ledger.add_pending(make_pending("00000000000000a1", "tx-clash"))
    assert any_ledger.find_pending("tx-clash", KEY_A) is None
    with pytest.raises(ValueError):
        any_ledger.add_pending(dataclasses.replace(
            make_pending("00000000000000d4", "tx-d"), status="approved", decided_at=NOW
        ))
    assert list(any_ledger.iter_pending()) == [other, first]


def test_deciding_pending_requests(any_ledger: Ledger) -> None:
    waiting = [make_pending(f"{i:016x}", f"tx-{i}") for i in range(1, 4)]
    for request in waiting:
        any_ledger.add_pending(request)
    approved = any_ledger.decide_pending(waiting[0].request_id, "approved", NOW + 60)
    assert approved.status == "approved"
    assert approved.decided_at == NOW + 60
    assert approved.reason == ""
    assert approved.csr_der == waiting[0].csr_der
    rejected = any_ledger.decide_pending(waiting[1].request_id, "rejected", NOW + 70,
                                         reason="unknown device")
    assert (rejected.status, rejected.reason) == ("rejected", "unknown device")
    assert any_ledger.get_pending(waiting[0].request_id) == approved
    assert any_ledger.find_pending("tx-2", KEY_A) == rejected
    # Only once, only from pending, only to approved or rejected.
    for request_id in (waiting[0].request_id, waiting[1].request_id):
        for status in ("approved", "rejected"):
            with pytest.raises(LedgerError, match="already"):
                any_ledger.decide_pending(request_id, status, NOW + 80)
    for status in ("pending", "issued", ""):
        with pytest.raises(ValueError):
            any_ledger.decide_pending(waiting[2].request_id, status, NOW + 80)
    with pytest.raises(NotFound):
        any_ledger.decide_pending("00000000000000ff", "approved", NOW)
    # A decided request still names its transaction: adding it again returns it.
    assert any_ledger.add_pending(make_pending("0000000000000077", "tx-1")) == approved
    assert [r.status for r in any_ledger.iter_pending()] == ["approved", "rejected", "pending"]


def test_commit_ignores_pending_requests(any_ledger: Ledger) -> None:
    waiting = make_pending("0000000000000abc", "tx-approve")
    any_ledger.add_pending(waiting)
    any_ledger.decide_pending(waiting.request_id, "approved", NOW)
    record = make_record(77, "tx-approve")
    assert any_ledger.commit([record]) == [Recorded(record)]
    assert any_ledger.find_pending("tx-approve", KEY_A) is not None
    assert any_ledger.find_transaction("tx-approve", KEY_A) == record


def test_challenges(any_ledger: Ledger) -> None:
    single = make_challenge("one", profile="wifi", subject_pattern=r"^CN=.*\.example$",
                            label="batch 7")
    any_ledger.add_challenge(single)
    assert any_ledger.get_challenge(single.digest) == single
    assert any_ledger.get_challenge(digest("unknown")) is None
    with pytest.raises(LedgerError, match="on record"):
        any_ledger.add_challenge(make_challenge("one", uses=5))
    assert any_ledger.get_challenge(single.digest) == single
    assert spend(any_ledger, single.digest, NOW)
    stored = any_ledger.get_challenge(single.digest)
    assert stored is not None and stored.uses_left == 0
    assert not spend(any_ledger, single.digest, NOW)
    assert not spend(any_ledger, digest("unknown"), NOW)
    with pytest.raises(ValueError):
        any_ledger.commit([make_record(random_serial(), "tx-short")], [b"short"])
    with pytest.raises(ValueError):
        any_ledger.commit([make_record(random_serial(), "tx-two")], [None, None])


def spend(ledger: Ledger, challenge: bytes, when: float) -> bool:
    """Whether a certificate recorded at ``when`` for this challenge took a use of it."""
    record = make_record(random_serial(), f"tx-{secrets.token_hex(8)}", issued_at=when)
    (outcome,) = ledger.commit([record], [challenge])
    if isinstance(outcome, ChallengeRefused):
        assert ledger.get(record.serial) is None
        return False
    assert outcome == Recorded(record)
    return True


def test_challenge_expiry_and_uses(any_ledger: Ledger) -> None:
    three = make_challenge("three", uses=3)
    expiring = make_challenge("expiring", uses=10, expires_at=NOW)
    spent = make_challenge("spent", uses=0)
    for challenge in (three, expiring, spent):
        any_ledger.add_challenge(challenge)
    # Usable until, not at, expires_at.
    assert spend(any_ledger, expiring.digest, NOW - 0.001)
    assert not spend(any_ledger, expiring.digest, NOW)
    assert not spend(any_ledger, expiring.digest, NOW + 1)
    assert not spend(any_ledger, spent.digest, NOW)
    assert [spend(any_ledger, three.digest, NOW) for _ in range(4)] == [True] * 3 + [False]
    after = any_ledger.get_challenge(three.digest)
    assert after is not None and after.uses_left == 0


def test_uses_in_one_commit(any_ledger: Ledger) -> None:
    single, double = make_challenge("single"), make_challenge("double", uses=2)
    any_ledger.add_challenge(single)
    any_ledger.add_challenge(double)
    presented = [single.digest, double.digest, digest("nobody"), single.digest, double.digest,
                 double.digest, None]
    records = [make_record(100 + i, f"tx-use-{i}", issued_at=NOW)
               for i in range(len(presented))]
    outcomes = any_ledger.commit(records, presented)
    assert [type(o).__name__ for o in outcomes] == [
        "Recorded", "Recorded", "ChallengeRefused", "ChallengeRefused", "Recorded",
        "ChallengeRefused", "Recorded"]
    assert any_ledger.count() == 4


def test_a_resend_spends_no_challenge(any_ledger: Ledger) -> None:
    double = make_challenge("resent", uses=2)
    any_ledger.add_challenge(double)
    first = make_record(7, "tx-resent", issued_at=NOW)
    assert any_ledger.commit([first], [double.digest]) == [Recorded(first)]
    again = make_record(8, "tx-resent", issued_at=NOW)
    assert any_ledger.commit([again], [double.digest]) == [AlreadyIssued(first)]
    conflict = make_record(9, "tx-resent", csr="other", issued_at=NOW)
    assert any_ledger.commit([conflict], [double.digest]) == [TransactionConflict(first)]
    left = any_ledger.get_challenge(double.digest)
    assert left is not None and left.uses_left == 1


def test_a_revoked_or_expired_transaction_is_free_again(any_ledger: Ledger) -> None:
    first = make_record(11, "tx-again", issued_at=NOW)
    any_ledger.commit([first])
    any_ledger.revoke(11, 1, NOW + 1)
    # Same transaction and requester, another CSR: a new certificate.
    second = make_record(12, "tx-again", csr="second", issued_at=NOW + 2)
    assert any_ledger.commit([second]) == [Recorded(second)]
    assert any_ledger.find_transaction("tx-again", KEY_A) == second
    # Expired at the new record's time: free as well.
    third = make_record(13, "tx-again", csr="third", issued_at=second.not_after + 1)
    assert any_ledger.commit([third]) == [Recorded(third)]
    assert [r.serial for r in any_ledger.iter_records()] == [11, 12, 13]
    # While a certificate is good, the transaction stays its own.
    fourth = make_record(14, "tx-again", csr="fourth", issued_at=NOW + 3)
    assert any_ledger.commit([fourth]) == [TransactionConflict(third)]


def test_pending_spends_its_challenge_once(any_ledger: Ledger) -> None:
    single = make_challenge("pending-single")
    any_ledger.add_challenge(single)
    waiting = make_pending("00000000000000aa", "tx-wait")
    assert any_ledger.add_pending(waiting, single.digest) == waiting
    # The same transaction again: the request on record, nothing spent.
    assert any_ledger.add_pending(make_pending("00000000000000ab", "tx-wait"),
                                  single.digest) == waiting
    with pytest.raises(ChallengeUsedUp):
        any_ledger.add_pending(make_pending("00000000000000ac", "tx-other"), single.digest)
    assert any_ledger.get_pending("00000000000000ac") is None
    assert any_ledger.find_pending("tx-other", KEY_A) is None


def test_crl_numbers(any_ledger: Ledger) -> None:
    assert [any_ledger.next_crl_number() for _ in range(5)] == [1, 2, 3, 4, 5]


# --- The lifecycle on disk -----------------------------------------------------


def test_lifecycle_survives_reopening(ledger_dir: Path) -> None:
    with LmdbLedger(ledger_dir) as ledger:
        ledger.commit([make_record(9, "tx-9"), make_record(8, "tx-8")])
        revoked = ledger.revoke(9, 5, NOW)
        waiting = ledger.add_pending(make_pending("0123456789abcdef", "tx-p"))
        ledger.add_challenge(make_challenge("kept", uses=2))
        assert spend(ledger, digest("kept"), NOW)
        assert ledger.next_crl_number() == 1
    with LmdbLedger(ledger_dir) as ledger:
        assert list(ledger.iter_revoked()) == [revoked]
        assert ledger.get_pending("0123456789abcdef") == waiting
        assert ledger.find_pending("tx-p", KEY_A) == waiting
        kept = ledger.get_challenge(digest("kept"))
        assert kept is not None and kept.uses_left == 1
        assert ledger.next_crl_number() == 2


def test_bulk_load_indexes_revoked_records(ledger: LmdbLedger) -> None:
    plain = make_record(1, "tx-a")
    gone = dataclasses.replace(make_record(2, "tx-b"), status="revoked", revoked_at=NOW,
                               revocation_reason=9)
    assert ledger.bulk_load([plain, gone]) == 2
    assert list(ledger.iter_revoked()) == [gone]


def test_iteration_crosses_chunks(ledger: LmdbLedger) -> None:
    # More entries than one read transaction takes (512).
    serials = sorted({random_serial() for _ in range(1300)})
    records = [make_record(s, f"tx-{i}", der_size=10) for i, s in enumerate(serials)]
    records[::2] = [
        dataclasses.replace(r, status="revoked", revoked_at=NOW) for r in records[::2]
    ]
    ledger.bulk_load(records, records_per_transaction=400)
    assert list(ledger.iter_revoked()) == records[::2]
    for i in range(1100):
        ledger.add_pending(make_pending(f"{i:016x}", f"tx-p-{i}"))
    assert [r.request_id for r in ledger.iter_pending()] == [f"{i:016x}" for i in range(1100)]


def _as_version_1(ledger_dir: Path, records: list[CertRecord]) -> None:
    """Turn a fresh ledger into one as schema version 1 left it."""
    env = lmdb.open(str(ledger_dir), max_dbs=16)
    with env.begin(write=True) as txn:
        for name in (b"revoked", b"pending", b"pending_txids", b"challenges"):
            txn.drop(env.open_db(name, txn=txn), delete=True)
        meta = env.open_db(b"meta", txn=txn)
        txn.put(b"schema_version", struct.pack(">I", 1), db=meta)
        certs = env.open_db(b"certs", txn=txn)
        txids = env.open_db(b"txids", txn=txn)
        for record in records:
            value = encode_record(record)
            # Format 1: the format 2 header without revoked_at and reason.
            old = b"\x01" + value[1:102] + value[111:]
            txn.put(serial_key(record.serial), old, db=certs)
            txn.put(transaction_key(record.transaction_id, record.requester_key_sha256),
                    serial_key(record.serial), db=txids)
    env.close()


def _stored_schema(ledger_dir: Path) -> tuple[int, list[bytes]]:
    env = lmdb.open(str(ledger_dir), max_dbs=16, readonly=True)
    with env.begin() as txn:
        meta = env.open_db(b"meta", txn=txn)
        stored = txn.get(b"schema_version", db=meta)
        assert stored is not None
        (version,) = struct.unpack(">I", stored)
        names = sorted(key for key, _ in txn.cursor())
    env.close()
    return version, names


def test_version_1_ledger_is_upgraded_in_place(ledger_dir: Path) -> None:
    LmdbLedger(ledger_dir).close()
    old_records = [make_record(100 + i, f"tx-old-{i}") for i in range(3)]
    _as_version_1(ledger_dir, old_records)
    assert _stored_schema(ledger_dir) == (1, [b"certs", b"meta", b"txids"])

    with LmdbLedger(ledger_dir) as ledger:
        # Format 1 records read as issued and never revoked.
        assert list(ledger.iter_records()) == old_records
        assert ledger.get(101) == old_records[1]
        assert ledger.find_transaction("tx-old-2", KEY_A) == old_records[2]
        assert list(ledger.iter_revoked()) == []
        assert list(ledger.iter_pending()) == []
        assert ledger.next_crl_number() == 1
        # An old record is revoked in the new format.
        revoked = ledger.revoke(101, 1, NOW)
        assert list(ledger.iter_revoked()) == [revoked]
        new = make_record(200, "tx-new")
        assert ledger.commit([new, make_record(201, "tx-old-0")]) == [
            Recorded(new), AlreadyIssued(old_records[0])
        ]
    assert _stored_schema(ledger_dir) == (
        SCHEMA_VERSION,
        [b"certs", b"challenges", b"meta", b"pending", b"pending_txids", b"revoked", b"txids"],
    )
    assert SCHEMA_VERSION == 2
    with LmdbLedger(ledger_dir) as ledger:
        assert ledger.get(101) == revoked
        assert ledger.next_crl_number() == 2


def test_version_0_is_refused(ledger_dir: Path) -> None:
    LmdbLedger(ledger_dir).close()
    env = lmdb.open(str(ledger_dir), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.put(b"schema_version", struct.pack(">I", 0), db=env.open_db(b"meta", txn=txn))
    env.close()
    with pytest.raises(UnsupportedSchema, match="schema version 0"):
        LmdbLedger(ledger_dir)


# --- Challenges and CRL numbers across processes -------------------------------

RACE_PROCESSES = 2
RACE_THREADS = 25
CRL_NUMBERS_PER_PROCESS = 30


def _racer(path: str, barrier: object, results: object) -> None:
    """One worker process: 25 threads at once use each challenge once."""
    single, triple = digest("single use"), digest("three uses")
    won: dict[str, int] = {"single": 0, "triple": 0}
    lock = threading.Lock()
    with LmdbLedger(path) as ledger:
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
    target: Callable[..., None], path: Path, count: int
) -> list[tuple[dict[str, int], list[int]]]:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(count)
    results = context.Queue()
    workers = [
        context.Process(target=target, args=(str(path), barrier, results))
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


def test_processes_race_for_challenges_and_crl_numbers(ledger_dir: Path) -> None:
    now = time.time()
    with LmdbLedger(ledger_dir) as ledger:
        ledger.add_challenge(Challenge(digest=digest("single use"), created_at=now,
                                       expires_at=now + 600, uses_left=1))
        ledger.add_challenge(Challenge(digest=digest("three uses"), created_at=now,
                                       expires_at=now + 600, uses_left=3))
    collected = _run_processes(_racer, ledger_dir, RACE_PROCESSES)

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
    with LmdbLedger(ledger_dir) as ledger:
        for secret in ("single use", "three uses"):
            stored = ledger.get_challenge(digest(secret))
            assert stored is not None and stored.uses_left == 0
        assert ledger.next_crl_number() == total + 1


def test_find_transactions_reads_records_and_pending_requests_at_once(
        ledger: LmdbLedger) -> None:
    issued = make_record(random_serial(), "tx-issued")
    ledger.commit([issued])
    waiting = ledger.add_pending(make_pending("aa00aa00aa00aa00", "tx-waiting"))
    found = ledger.find_transactions([("tx-issued", KEY_A), ("tx-waiting", KEY_A),
                                      ("tx-unknown", KEY_A), ("tx-issued", KEY_B)])
    assert found == [(issued, None), (None, waiting), (None, None), (None, None)]


# --- A full ledger -------------------------------------------------------------------


def _fill(ledger: LmdbLedger, der_size: int = 3000) -> int:
    """Commits batches of ten until the ledger is full; how many batches went in."""
    batches = 0
    while batches < 100_000:
        try:
            ledger.commit([make_record(random_serial(), f"fill-{batches}-{i}", der_size=der_size)
                           for i in range(10)])
        except LedgerFull:
            return batches
        batches += 1
    raise AssertionError("the ledger never filled up")


def test_a_full_map_is_reported_and_a_larger_map_takes_more(tmp_path: Path) -> None:
    told: list[tuple[str, LedgerFull]] = []
    path = tmp_path / "ledger"
    with LmdbLedger(path, map_size_bytes=1024 * 1024,
                    on_full=lambda what, error: told.append((what, error))) as ledger:
        assert _fill(ledger) > 0
        assert [what for what, _ in told] == ["commit"]
        assert "map size is used up" in str(told[0][1])
        full_count = ledger.count()
    # What a reload with a larger ledger.map_size_bytes does: a fresh handle.
    with LmdbLedger(path, map_size_bytes=4 * 1024 * 1024) as ledger:
        record = make_record(random_serial(), "after-growth")
        assert ledger.commit([record]) == [Recorded(record)]
        assert ledger.count() == full_count + 1


def _grow(path: str) -> None:
    with LmdbLedger(path, map_size_bytes=8 * 1024 * 1024) as ledger:
        for batch in range(100):
            ledger.commit([make_record(random_serial(), f"grow-{batch}-{i}", der_size=3000)
                           for i in range(10)])


def test_a_handle_with_a_smaller_map_adopts_the_map_another_process_grew(
        tmp_path: Path) -> None:
    # The supervisor keeps its handle across a reload; the reloaded workers
    # open the ledger with a larger map and fill it past the old size.
    path = tmp_path / "ledger"
    with LmdbLedger(path, map_size_bytes=1024 * 1024) as kept:
        context = multiprocessing.get_context("spawn")
        grower = context.Process(target=_grow, args=(str(path),))
        grower.start()
        grower.join(timeout=120)
        assert grower.exitcode == 0
        assert kept.count() == 1000
        record = make_record(random_serial(), "kept-handle")
        assert kept.commit([record]) == [Recorded(record)]


@pytest.mark.parametrize(("code", "full"), [
    (errno.ENOSPC, True),
    (errno.EDQUOT, True),
    (errno.EACCES, False),
    # LMDB's short write; the test's file system has room, so it is an I/O error.
    (errno.EIO, False),
])
def test_which_lmdb_errors_mean_full(tmp_path: Path, code: int, full: bool) -> None:
    # As LMDB's own errors carry it: the errno in ``code``.
    error = lmdb.Error(f"mdb_txn_commit: {os.strerror(code)}")
    error.code = code
    assert (_full_condition(str(tmp_path), error) is not None) is full


_DISK_FULL_SCRIPT = """
import json, os, sys
from scep_fast.runtime.ledger_lmdb import LmdbLedger
from scep_fast.service.ledger import LedgerFull, Recorded
from tests.integration.test_ledger_lmdb import _fill, make_record, random_serial

mount = sys.argv[1]
with open(os.path.join(mount, "filler"), "wb") as f:
    f.write(b"\\0" * (1024 * 1024))
told = []
with LmdbLedger(os.path.join(mount, "ledger"), map_size_bytes=64 * 1024 * 1024,
                on_full=lambda what, error: told.append([what, str(error)])) as ledger:
    batches = _fill(ledger)
    count = ledger.count()
    os.remove(os.path.join(mount, "filler"))
    record = make_record(random_serial(), "after-space-returned")
    after = ledger.commit([record]) == [Recorded(record)]
    print(json.dumps({"batches": batches, "told": told, "after": after,
                      "count": ledger.count() - count}))
"""


def test_a_full_file_system_is_reported_and_writes_resume_when_space_returns(
        tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        missing_peer("a small file system of its own needs root and unshare (util-linux)")
    mount = tmp_path / "small-fs"
    mount.mkdir()
    # A private mount namespace: the 2 MiB tmpfs vanishes with the process.
    script = (f"mount -t tmpfs -o size=2m tmpfs {shlex.quote(str(mount))} && "
              f"exec {shlex.quote(sys.executable)} -c \"$SCRIPT\" {shlex.quote(str(mount))}")
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parents[2],
                          env={**os.environ, "SCRIPT": _DISK_FULL_SCRIPT})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["batches"] > 0
    assert [what for what, _ in result["told"]] == ["commit"]
    assert "file system is full" in result["told"][0][1], result["told"]
    assert result["after"] and result["count"] == 1
