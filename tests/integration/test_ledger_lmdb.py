"""The LMDB ledger on a real environment, in one process and in several."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import secrets
import stat
import struct
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from scep_fast.runtime.ledger_lmdb import SCHEMA_VERSION, LmdbLedger, serial_key
from scep_fast.service.ledger import (
    AlreadyIssued,
    CertRecord,
    LedgerCorrupt,
    LedgerError,
    LedgerFull,
    Recorded,
    SerialCollision,
    TransactionConflict,
    UnsupportedSchema,
)

KEY_A = hashlib.sha256(b"requester A").digest()
KEY_B = hashlib.sha256(b"requester B").digest()


def csr_hash(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def make_record(serial: int, txid: str, *, key: bytes = KEY_A, csr: str = "csr",
                der_size: int = 900) -> CertRecord:
    return CertRecord(
        serial=serial,
        der=b"\x30\x82" + serial.to_bytes(20, "big") + b"\xa5" * der_size,
        subject=f"CN={txid}.example",
        sans=(f"DNS:{txid}.example", "IP:192.0.2.7"),
        not_before=1_700_000_000,
        not_after=1_731_536_000,
        issued_at=time.time(),
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
    with pytest.raises(UnsupportedSchema, match=r"schema version 99\b.*reads schema version 1"):
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
