"""What only the LMDB ledger has: its files, schema upgrades, bulk loading, a full map or disk.

The rules every ledger follows are in ``test_ledger_contract.py``.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import multiprocessing
import os
import shlex
import shutil
import stat
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from scep_fast.runtime.ledger_lmdb import SCHEMA_VERSION, LmdbLedger, _full_condition
from scep_fast.runtime.ledger_lmdb_codec import encode_record, serial_key, transaction_key
from scep_fast.service.ledger import (
    AlreadyIssued,
    CertRecord,
    LedgerCorrupt,
    LedgerError,
    LedgerFull,
    Recorded,
    UnsupportedSchema,
)
from tests.conftest import missing_peer
from tests.ledger_values import (
    KEY_A,
    NOW,
    make_notice,
    make_pending,
    make_record,
    random_serial,
)


@pytest.fixture
def ledger_dir(tmp_path: Path) -> Path:
    return tmp_path / "ledger"


@pytest.fixture
def ledger(ledger_dir: Path) -> Iterator[LmdbLedger]:
    opened = LmdbLedger(ledger_dir, map_size_bytes=256 * 1024 * 1024)
    yield opened
    opened.close()


def test_batch_is_all_or_nothing(tmp_path: Path) -> None:
    # A small map fills up in the middle of the second batch: LMDB fails a
    # put after several records of the batch were written in the transaction.
    with LmdbLedger(tmp_path / "small", map_size_bytes=1024 * 1024) as ledger:
        kept = [make_record(i, f"tx-kept-{i}") for i in (1, 2)]
        ledger.commit(kept)
        too_big = [make_record(100 + i, f"tx-big-{i}", der_size=16 * 1024) for i in range(100)]
        with pytest.raises(LedgerFull, match="map size"):
            ledger.commit(too_big, notices=[make_notice(1), make_notice(2, serial=100)])
        assert ledger.count() == 2
        assert ledger.count_notices() == 0
        # A revocation whose notice does not fit: neither is written.
        huge = dataclasses.replace(make_notice(3, event="revoked"), body=b"x" * 2 * 1024 * 1024)
        with pytest.raises(LedgerFull):
            ledger.revoke(1, 1, NOW, notices=[huge])
        assert ledger.get(1) == kept[0]
        assert ledger.count_notices() == 0
        assert list(ledger.iter_records()) == kept
        assert all(ledger.find_transaction(f"tx-big-{i}", KEY_A) is None for i in range(100))
        # The ledger still works after the failed batch.
        last = make_record(3, "tx-after")
        assert ledger.commit([last]) == [Recorded(last)]


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
        for name in (b"revoked", b"pending", b"pending_txids", b"challenges", b"outbox",
                     b"outbox_due"):
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
        [b"certs", b"challenges", b"meta", b"outbox", b"outbox_due", b"pending",
         b"pending_txids", b"revoked", b"txids"],
    )
    assert SCHEMA_VERSION == 2
    with LmdbLedger(ledger_dir) as ledger:
        assert ledger.get(101) == revoked
        assert ledger.next_crl_number() == 2


def test_a_ledger_from_before_the_outbox_gets_one(ledger_dir: Path) -> None:
    records = [make_record(300 + i, f"tx-before-{i}") for i in range(3)]
    with LmdbLedger(ledger_dir) as ledger:
        ledger.commit(records)
    # As the code before the outbox left it: schema version 2, seven databases.
    env = lmdb.open(str(ledger_dir), max_dbs=16)
    with env.begin(write=True) as txn:
        for name in (b"outbox", b"outbox_due"):
            txn.drop(env.open_db(name, txn=txn), delete=True)
    env.close()
    version, names = _stored_schema(ledger_dir)
    assert (version, b"outbox" in names) == (2, False)

    with LmdbLedger(ledger_dir) as ledger:
        assert list(ledger.iter_records()) == records
        assert ledger.count_notices() == 0
        assert ledger.claim_notices(NOW, 10, 30.0) == []
        ledger.add_notices([make_notice(1)])
    assert _stored_schema(ledger_dir) == (2, [
        b"certs", b"challenges", b"meta", b"outbox", b"outbox_due", b"pending",
        b"pending_txids", b"revoked", b"txids"])
    with LmdbLedger(ledger_dir) as ledger:
        assert [n.notice_id for n in ledger.iter_notices()] == [make_notice(1).notice_id]


def test_a_claim_with_nothing_due_writes_nothing(ledger: LmdbLedger) -> None:
    # The outbox is polled all the time and is usually empty: such a claim
    # must not take the write lock every process shares, nor sync the disk.
    def last_transaction() -> int:
        return int(ledger._env.info()["last_txnid"])

    before = last_transaction()
    assert ledger.claim_notices(NOW, 10, 30.0) == []
    ledger.add_notices([make_notice(1, next_attempt_at=NOW + 60)])
    after_add = last_transaction()
    assert after_add == before + 1
    assert ledger.claim_notices(NOW, 10, 30.0) == []
    assert last_transaction() == after_add
    assert len(ledger.claim_notices(NOW + 60, 10, 30.0)) == 1
    assert last_transaction() == after_add + 1


def test_version_0_is_refused(ledger_dir: Path) -> None:
    LmdbLedger(ledger_dir).close()
    env = lmdb.open(str(ledger_dir), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.put(b"schema_version", struct.pack(">I", 0), db=env.open_db(b"meta", txn=txn))
    env.close()
    with pytest.raises(UnsupportedSchema, match="schema version 0"):
        LmdbLedger(ledger_dir)


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
from tests.integration.test_ledger_lmdb import _fill
from tests.ledger_values import make_record, random_serial

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

