"""The ledger port: records, outcomes, the reference ledger, the record codec."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest

from scep_fast.runtime.ledger_json import record_to_json
from scep_fast.runtime.ledger_lmdb_codec import (
    RECORD_FORMAT,
    decode_challenge,
    decode_notice,
    decode_pending,
    decode_record,
    due_key,
    due_prefix,
    encode_challenge,
    encode_notice,
    encode_pending,
    encode_record,
    serial_key,
    transaction_key,
)
from scep_fast.service.ledger import (
    MAX_SERIAL,
    MAX_TRANSACTION_ID_BYTES,
    REVOCATION_REASONS,
    CertRecord,
    Challenge,
    LedgerCorrupt,
    PendingRequest,
)
from scep_fast.service.ledger_memory import MemoryLedger
from scep_fast.service.notices import Notice

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


def make_pending(request_id: str = "00112233aabbccdd", **changes: object) -> PendingRequest:
    fields: dict[str, object] = {
        "request_id": request_id,
        "transaction_id": "tx-pending",
        "requester_key_sha256": KEY_A,
        "csr_sha256": csr_hash("csr-p"),
        "csr_der": b"\x30\x82\x01\x00" + b"\x5a" * 40,
        "subject": "CN=waiting.example",
        "sans": ("DNS:waiting.example",),
        "profile": "default",
        "received_at": 1_700_000_100.5,
    }
    fields.update(changes)
    return PendingRequest(**fields)  # type: ignore[arg-type]


def make_challenge(secret: bytes = b"secret", **changes: object) -> Challenge:
    fields: dict[str, object] = {
        "digest": hashlib.sha256(secret).digest(),
        "created_at": 1_700_000_000.0,
        "expires_at": 1_700_003_600.0,
        "uses_left": 1,
    }
    fields.update(changes)
    return Challenge(**fields)  # type: ignore[arg-type]


def as_format_1(value: bytes) -> bytes:
    """A format 2 encoding of a record not revoked, as schema version 1 wrote it."""
    assert value[0] == 2
    return b"\x01" + value[1:FORMAT_1_HEADER] + value[FORMAT_1_HEADER + 9:]


FORMAT_1_HEADER = 102


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
        # PostgreSQL's text cannot hold U+0000: no ledger takes it.
        {"subject": "CN=a\x00b"},
        {"sans": ("DNS:a\x00.example",)},
        {"transaction_id": "tx\x00"},
        {"der": b""},
        {"status": "revoked"},                                  # no revoked_at
        {"revoked_at": 1_700_000_500.0},                        # status issued
        {"status": "revoked", "revoked_at": 1.0, "revocation_reason": 7},
        {"status": "revoked", "revoked_at": 1.0, "revocation_reason": 11},
        {"status": "revoked", "revoked_at": 1.0, "revocation_reason": True},
        {"status": "revoked", "revoked_at": "yesterday"},
        {"revocation_reason": 1},                               # reason, not revoked
    ],
)
def test_invalid_records_are_refused_when_built(changes: dict[str, object]) -> None:
    changes = dict(changes)
    serial = changes.pop("serial", 1)
    with pytest.raises(ValueError):
        make_record(serial, **changes)  # type: ignore[arg-type]


def test_largest_serial_is_accepted() -> None:
    assert make_record(MAX_SERIAL).serial.bit_length() == 159


def test_revocation_reasons_are_rfc_5280() -> None:
    assert sorted(REVOCATION_REASONS) == [0, 1, 2, 3, 4, 5, 6, 8, 9, 10]
    assert REVOCATION_REASONS[1] == "keyCompromise"
    for code in REVOCATION_REASONS:
        record = make_record(1, status="revoked", revoked_at=5.0, revocation_reason=code)
        assert record.revocation_reason == code


@pytest.mark.parametrize(
    "changes",
    [
        {"request_id": "00112233AABBCCDD"},
        {"request_id": "0011223"},
        {"request_id": "00112233aabbccdd0"},
        {"request_id": "00112233aabbccdg"},
        {"transaction_id": ""},
        {"transaction_id": "x" * (MAX_TRANSACTION_ID_BYTES + 1)},
        {"requester_key_sha256": b"\x01" * 31},
        {"csr_sha256": None},
        {"csr_der": b""},
        {"sans": ["DNS:x"]},
        {"profile": ""},
        {"received_at": "now"},
        {"status": "waiting"},
        {"status": "approved"},                           # decided without decided_at
        {"decided_at": 1_700_000_200.0},                  # pending with decided_at
        {"reason": None},
        {"subject": "CN=\udc80"},
        {"reason": "\x00"},
    ],
)
def test_invalid_pending_requests_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        make_pending(**changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "changes",
    [
        {"digest": b"\x00" * 31},
        {"digest": "ab" * 32},
        {"uses_left": -1},
        {"uses_left": 1 << 32},
        {"uses_left": True},
        {"uses_left": 1.0},
        {"expires_at": None},
        {"profile": ""},
        {"subject_pattern": "CN=(unclosed"},
        {"label": None},
        {"label": "batch\x00"},
    ],
)
def test_invalid_challenges_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        make_challenge(**changes)  # type: ignore[arg-type]


# --- Codec -------------------------------------------------------------------


def test_codec_round_trip() -> None:
    record = make_record(0x1234_5678_9ABC, "tx-ü", sans=(), profile="wifi")
    value = encode_record(record)
    assert value[0] == RECORD_FORMAT == 2
    assert decode_record(serial_key(record.serial), value) == record
    revoked = make_record(0x77, status="revoked", revoked_at=1_700_500_000.125,
                          revocation_reason=1)
    assert decode_record(serial_key(0x77), encode_record(revoked)) == revoked


def test_format_1_record_still_decodes() -> None:
    record = make_record(0xBEEF, "tx-old", profile="wifi")
    old = as_format_1(encode_record(record))
    assert old[0] == 1
    decoded = decode_record(serial_key(0xBEEF), old)
    assert decoded == record
    assert decoded.revoked_at is None
    assert decoded.revocation_reason == 0
    # Format 1 could not say when a certificate was revoked.
    marked = old[:1] + b"\x02" + old[2:]
    with pytest.raises(LedgerCorrupt, match="revoked"):
        decode_record(serial_key(0xBEEF), marked)
    with pytest.raises(LedgerCorrupt, match="truncated header"):
        decode_record(serial_key(0xBEEF), old[:FORMAT_1_HEADER - 1])


def test_pending_codec_round_trip() -> None:
    waiting = make_pending(sans=("DNS:a.example", "IP:10.1.2.3", ""), subject="CN=ü")
    key = waiting.request_id.encode()
    assert decode_pending(key, encode_pending(waiting)) == waiting
    decided = make_pending(status="rejected", decided_at=1_700_000_900.25, reason="not ours")
    assert decode_pending(key, encode_pending(decided)) == decided


@pytest.mark.parametrize(
    ("key", "mangle", "message"),
    [
        (b"00112233aabbccdd", lambda v: b"", "unknown format"),
        (b"00112233aabbccdd", lambda v: b"\x02" + v[1:], "unknown format 02"),
        (b"00112233aabbccdd", lambda v: v[:30], "truncated header"),
        (b"00112233aabbccdd", lambda v: v[:-1], "truncated"),
        (b"00112233aabbccdd", lambda v: v + b"\x00", "1 trailing bytes"),
        (b"00112233aabbccdd", lambda v: v[:1] + b"\x09" + v[2:], "unknown status code 9"),
        (b"0011", lambda v: v, "request_id"),
        (b"\xff" * 16, lambda v: v, "not a request id"),
    ],
)
def test_pending_decoding_refuses_garbage(key: bytes, mangle: object, message: str) -> None:
    value = mangle(encode_pending(make_pending()))  # type: ignore[operator]
    with pytest.raises(LedgerCorrupt, match=message):
        decode_pending(key, value)


def test_challenge_codec_round_trip() -> None:
    challenge = make_challenge(uses_left=0xFFFF_FFFF, profile="wifi",
                               subject_pattern=r"^CN=[a-z0-9-]+\.example$", label="lab ü")
    assert decode_challenge(challenge.digest, encode_challenge(challenge)) == challenge


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda v: b"", "unknown format"),
        (lambda v: b"\x07" + v[1:], "unknown format 07"),
        (lambda v: v[:10], "truncated header"),
        (lambda v: v[:-1], "truncated"),
        (lambda v: v + b"!", "1 trailing bytes"),
    ],
)
def test_challenge_decoding_refuses_garbage(mangle: object, message: str) -> None:
    challenge = make_challenge(label="x")
    value = mangle(encode_challenge(challenge))  # type: ignore[operator]
    with pytest.raises(LedgerCorrupt, match=message):
        decode_challenge(challenge.digest, value)
    with pytest.raises(LedgerCorrupt, match="digest"):
        decode_challenge(b"short", encode_challenge(challenge))


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
        (lambda v: v[:111] + b"\xff" + v[112:], "not UTF-8"),
        # Revocation fields on a certificate that is not revoked.
        (lambda v: v[:102] + struct.pack(">d", 5.0) + v[110:], "not revoked"),
        (lambda v: v[:110] + b"\x07" + v[111:], "not revoked"),
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


# --- Outbox entries ---------------------------------------------------------------


def make_notice(**changes: object) -> Notice:
    fields: dict[str, object] = {
        "notice_id": bytes(range(16)), "sink": "webhook", "event": "issued",
        "body": b'{"event":"issued"}', "created_at": 1_750_000_000.25}
    fields.update(changes)
    return Notice(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("changes", [
    {},
    {"serial": MAX_SERIAL, "attempts": 0xFFFF_FFFF, "next_attempt_at": 1.5e9, "sink": "intüne"},
    {"event": "refused", "body": b"", "serial": 1},
    {"event": "revoked", "body": b"\x00" * 70_000, "next_attempt_at": -3.0},
])
def test_notice_codec_round_trip(changes: dict[str, object]) -> None:
    notice = make_notice(**changes)
    assert decode_notice(notice.notice_id, encode_notice(notice)) == notice


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda v: b"", "unknown format"),
        (lambda v: b"\x02" + v[1:], "unknown format 02"),
        (lambda v: v[:30], "truncated header"),
        (lambda v: v[:-1], "truncated"),
        (lambda v: v + b"!", "1 trailing bytes"),
        (lambda v: v[:1] + b"\x04" + v[2:], "unknown event code 4"),
    ],
)
def test_notice_decoding_refuses_garbage(mangle: object, message: str) -> None:
    notice = make_notice()
    value = mangle(encode_notice(notice))  # type: ignore[operator]
    with pytest.raises(LedgerCorrupt, match=message):
        decode_notice(notice.notice_id, value)
    with pytest.raises(LedgerCorrupt, match="notice_id"):
        decode_notice(b"short", encode_notice(notice))


def test_due_keys_sort_in_claim_order() -> None:
    # (next_attempt_at, created_at, id), negative and fractional times included.
    order = [(-5.0, 0.0, 1), (-0.5, 9.0, 1), (0.0, -1.0, 1), (0.0, 0.0, 1), (0.0, 0.0, 2),
             (0.25, 0.0, 1), (1.0, 0.0, 1), (1.75e9, 1.6e9, 1), (1.75e9, 1.7e9, 0), (1e300, 0, 0)]
    notices = [make_notice(next_attempt_at=due, created_at=created,
                           notice_id=number.to_bytes(16, "big"))
               for due, created, number in order]
    assert sorted(notices, key=due_key) == notices
    # A notice is due at ``now`` exactly when its key starts at most at due_prefix(now).
    for notice in notices:
        for now in (notice.next_attempt_at - 0.001, notice.next_attempt_at,
                    notice.next_attempt_at + 1):
            due = due_key(notice)[:8] <= due_prefix(now)
            assert due == (notice.next_attempt_at <= now)
    assert due_prefix(-0.0) == due_prefix(0.0)


@pytest.mark.parametrize(("notices", "error"), [
    ([make_notice(created_at=float("nan"))], ValueError),
    ([make_notice(next_attempt_at=float("inf"))], ValueError),
    ([make_notice(next_attempt_at="soon")], ValueError),
    ([make_notice(sink="web\x00hook")], ValueError),
    ([make_notice(attempts=1 << 32)], ValueError),
    ([make_notice(serial=MAX_SERIAL + 1)], ValueError),
    ([make_notice(), make_notice()], ValueError),
    (["not a notice"], TypeError),
    (b"bytes", TypeError),
])
def test_notices_no_ledger_can_store_are_refused_before_anything_is_written(
        notices: object, error: type[Exception]) -> None:
    ledger = MemoryLedger()
    with pytest.raises(error):
        ledger.add_notices(notices)  # type: ignore[arg-type]
    with pytest.raises(error):
        ledger.commit([], notices=notices)  # type: ignore[arg-type]
    assert ledger.count_notices() == 0


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


def test_record_to_json_of_a_revoked_certificate() -> None:
    record = make_record(0x10, status="revoked", revoked_at=1_700_086_400.5,
                         revocation_reason=1)
    obj = record_to_json(record)
    assert obj["status"] == "revoked"
    assert obj["revoked_at"] == "2023-11-15T22:13:20.500Z"
    assert obj["revocation_reason"] == "keyCompromise"
    unspecified = make_record(0x11, status="revoked", revoked_at=1_700_086_400.0)
    assert record_to_json(unspecified)["revocation_reason"] == "unspecified"


def test_minted_challenges_are_letters_and_digits() -> None:
    from scep_fast.service.challenges import mint_challenge

    ledger = MemoryLedger()
    secrets_seen = {mint_challenge(ledger, now=1000.0, ttl_seconds=60, uses=1,
                                   profile="default", profiles=["default"]).secret
                    for _ in range(200)}
    assert len(secrets_seen) == 200
    # A PrintableString for every client, and no "-" that a command line reads as an option.
    assert all(s.isascii() and s.isalnum() and len(s) == 32 for s in secrets_seen)
