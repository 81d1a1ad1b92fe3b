"""The ledger port: records, outcomes, the reference ledger, the record codec."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest

from scep_fast.runtime.ledger_lmdb import (
    RECORD_FORMAT,
    decode_record,
    encode_record,
    serial_key,
    transaction_key,
)
from scep_fast.service.ledger import (
    MAX_SERIAL,
    MAX_TRANSACTION_ID_BYTES,
    AlreadyIssued,
    CertRecord,
    LedgerCorrupt,
    LedgerError,
    MemoryLedger,
    Recorded,
    SerialCollision,
    TransactionConflict,
    record_to_json,
)

KEY_A = hashlib.sha256(b"requester A").digest()
KEY_B = hashlib.sha256(b"requester B").digest()


def csr_hash(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def make_record(serial: int, txid: str = "tx-1", *, key: bytes = KEY_A, csr: str = "csr-1",
                **changes: object) -> CertRecord:
    fields: dict[str, object] = {
        "serial": serial,
        "der": b"\x30\x82" + str(serial).encode() * 3,
        "subject": "CN=device.example,O=Example",
        "sans": ("DNS:device.example", "IP:10.0.0.1"),
        "not_before": 1_700_000_000,
        "not_after": 1_731_536_000,
        "issued_at": 1_700_000_012.25,
        "transaction_id": txid,
        "requester_key_sha256": key,
        "csr_sha256": csr_hash(csr),
    }
    fields.update(changes)
    return CertRecord(**fields)  # type: ignore[arg-type]


# --- CertRecord --------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"serial": 0},
        {"serial": -5},
        {"serial": MAX_SERIAL + 1},
        {"serial": True},
        {"requester_key_sha256": b"\x00" * 20},
        {"csr_sha256": "00" * 32},
        {"status": "expired"},
        {"sans": ["DNS:a.example"]},
        {"not_after": 1_600_000_000},
        {"transaction_id": ""},
        {"transaction_id": "x" * (MAX_TRANSACTION_ID_BYTES + 1)},
        {"subject": "CN=\udc80"},
        {"der": b""},
    ],
)
def test_invalid_records_are_refused_when_built(changes: dict[str, object]) -> None:
    changes = dict(changes)
    serial = changes.pop("serial", 1)
    with pytest.raises(ValueError):
        make_record(serial, **changes)  # type: ignore[arg-type]


def test_largest_serial_is_accepted() -> None:
    assert make_record(MAX_SERIAL).serial.bit_length() == 159


# --- Codec -------------------------------------------------------------------


def test_codec_round_trip() -> None:
    record = make_record(0x1234_5678_9ABC, "tx-ü", sans=(), profile="wifi")
    value = encode_record(record)
    assert value[0] == RECORD_FORMAT
    assert decode_record(serial_key(record.serial), value) == record


def test_serial_keys_sort_like_serials() -> None:
    serials = [1, 255, 256, 2**64, 2**100 + 7, MAX_SERIAL]
    assert sorted(serial_key(s) for s in serials) == [serial_key(s) for s in serials]


def test_transaction_key_leads_with_the_key_hash() -> None:
    assert transaction_key("abc", KEY_A) == KEY_A + b"abc"


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda v: b"", "empty"),
        (lambda v: b"\x09" + v[1:], "unknown record format 9"),
        (lambda v: v[:50], "truncated header"),
        (lambda v: v[:-1], "truncated"),
        (lambda v: v + b"\x00", "1 trailing bytes"),
        (lambda v: v[:1] + b"\x07" + v[2:], "unknown status code 7"),
        (lambda v: v[:102] + b"\xff" + v[103:], "not UTF-8"),
        # not_after before not_before: decodes, but is not a valid record.
        (lambda v: v[:10] + struct.pack(">q", 0) + v[18:], "not_after is before"),
    ],
)
def test_decoding_refuses_garbage(mangle: object, message: str) -> None:
    record = make_record(77)
    value = mangle(encode_record(record))  # type: ignore[operator]
    with pytest.raises(LedgerCorrupt, match=message):
        decode_record(serial_key(77), value)


def test_decoding_refuses_a_bad_key() -> None:
    with pytest.raises(LedgerCorrupt, match="certs key"):
        decode_record(b"\x01", encode_record(make_record(1)))


# --- The reference ledger ----------------------------------------------------


def test_memory_ledger_follows_the_commit_rules() -> None:
    ledger = MemoryLedger()
    first = make_record(10, "tx-1")
    outcomes = ledger.commit([
        first,
        make_record(11, "tx-1"),                 # resend in the same batch
        make_record(12, "tx-1", csr="other"),    # same transaction, another CSR
        make_record(10, "tx-2"),                 # serial taken
        make_record(13, "tx-1", key=KEY_B),      # same id, another requester
    ])
    assert outcomes == [
        Recorded(first),
        AlreadyIssued(first),
        TransactionConflict(first),
        SerialCollision(10),
        Recorded(make_record(13, "tx-1", key=KEY_B)),
    ]
    assert ledger.count() == 2
    assert ledger.find_transaction("tx-2", KEY_A) is None
    assert ledger.find_transaction("tx-1", KEY_A) == first
    assert [r.serial for r in ledger.iter_records()] == [10, 13]


def test_memory_ledger_batch_is_all_or_nothing() -> None:
    ledger = MemoryLedger()
    with pytest.raises(TypeError):
        ledger.commit([make_record(1, "a"), "not a record", make_record(2, "b")])  # type: ignore[list-item]
    assert ledger.count() == 0
    ledger.close()
    with pytest.raises(LedgerError):
        ledger.count()


# --- JSON for the command line -----------------------------------------------


def test_record_to_json() -> None:
    record = make_record(0xABCDEF0123, "tx-9", profile="default")
    obj = record_to_json(record)
    assert obj == {
        "serial": "abcdef0123",
        "subject": "CN=device.example,O=Example",
        "sans": ["DNS:device.example", "IP:10.0.0.1"],
        "not_before": "2023-11-14T22:13:20Z",
        "not_after": "2024-11-13T22:13:20Z",
        "issued_at": "2023-11-14T22:13:32.250Z",
        "status": "issued",
        "revoked_at": None,
        "revocation_reason": None,
        "transaction_id": "tx-9",
        "profile": "default",
        "requester_key_sha256": KEY_A.hex(),
        "csr_sha256": csr_hash("csr-1").hex(),
    }
    json.dumps(obj)
