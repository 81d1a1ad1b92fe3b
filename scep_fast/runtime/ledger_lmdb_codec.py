"""The byte formats of the LMDB ledger's values and keys (see ``ledger_lmdb``).

Keys: a serial number is 20 big-endian octets (:func:`serial_key`), so
LMDB's byte order is numeric order; a transaction of one requester is the
requester key's SHA-256 followed by the transaction id in UTF-8
(:func:`transaction_key`).

Record format 2 (the value in ``certs``), all integers big-endian::

    u8   format version (2)
    u8   status (1 issued, 2 revoked)
    i64  not_before, epoch seconds
    i64  not_after, epoch seconds
    f64  issued_at, epoch seconds
    32   requester key SHA-256
    32   CSR SHA-256
    u16  subject length     u16 transaction id length
    u16  profile length     u16 number of SANs
    u32  DER length
    f64  revoked_at, epoch seconds (0 unless revoked)
    u8   RFC 5280 CRLReason code (0 unless revoked)
    subject, transaction id, profile (UTF-8)
    per SAN: u16 length + UTF-8
    DER

Record format 1, written by schema version 1, is format 2 without the
``revoked_at`` and reason fields (and never revoked); it still decodes, with
``revoked_at`` None. Decoding refuses unknown versions, truncation and
trailing bytes with :class:`LedgerCorrupt`.

Pending request format 1 (the value in ``pending``)::

    u8   format version (1)
    u8   status (1 pending, 2 approved, 3 rejected)
    f64  received_at       f64 decided_at (0 while pending)
    32   requester key SHA-256
    32   CSR SHA-256
    u16  transaction id length   u16 subject length   u16 profile length
    u16  number of SANs          u16 reason length    u32 CSR length
    transaction id, subject, profile, reason (UTF-8)
    per SAN: u16 length + UTF-8
    CSR (DER)

Challenge format 2 (the value in ``challenges``)::

    u8   format version (2)
    f64  created_at        f64 expires_at
    u32  uses left
    u16  profile length    u16 subject pattern length    u16 label length
    u16  SAN pattern length
    profile, subject pattern, label, SAN pattern (UTF-8)

Notice format 1 (the value in ``outbox``, keyed by the 16-byte notice id)::

    u8   format version (1)
    u8   event (1 issued, 2 refused, 3 revoked)
    f64  created_at        f64 next_attempt_at
    u32  attempts
    20   serial, as a ``certs`` key (all zero: none)
    u16  sink length       u32 body length
    sink (UTF-8), body

The due index (``outbox_due``) keys each notice by when it is due
(:func:`due_key`): ``next_attempt_at`` and ``created_at`` as 8 octets each
that sort as the numbers do, then the notice id; the value is empty.

Challenge format 1 is format 2 without the SAN pattern. Its one pattern was
matched against the common name and every SAN value, so it decodes with
that pattern as both patterns: the SANs stay bound as they were, and the
subject pattern, now matched against the whole subject, refuses what it
does not describe.
"""

from __future__ import annotations

import struct
from typing import Final

from scep_fast.service.ledger import CertRecord, Challenge, LedgerCorrupt, PendingRequest
from scep_fast.service.notices import EVENTS, NOTICE_ID_BYTES, Notice

__all__ = [
    "CHALLENGE_FORMAT",
    "DUE_KEY_BYTES",
    "NOTICE_FORMAT",
    "PENDING_FORMAT",
    "RECORD_FORMAT",
    "SERIAL_KEY_BYTES",
    "decode_challenge",
    "decode_notice",
    "due_key",
    "due_prefix",
    "decode_pending",
    "decode_record",
    "encode_challenge",
    "encode_notice",
    "encode_pending",
    "encode_record",
    "serial_key",
    "transaction_key",
]

RECORD_FORMAT: Final = 2
PENDING_FORMAT: Final = 1
CHALLENGE_FORMAT: Final = 2
NOTICE_FORMAT: Final = 1

SERIAL_KEY_BYTES: Final = 20

_U16: Final = struct.Struct(">H")
_HEADER_V1: Final = struct.Struct(">BBqqd32s32sHHHHI")
_HEADER: Final = struct.Struct(">BBqqd32s32sHHHHIdB")
_PENDING_HEADER: Final = struct.Struct(">BBdd32s32sHHHHHI")
_CHALLENGE_HEADER_V1: Final = struct.Struct(">BddIHHH")
_CHALLENGE_HEADER: Final = struct.Struct(">BddIHHHH")
_NOTICE_HEADER: Final = struct.Struct(">BBddI20sHI")
_F64: Final = struct.Struct(">d")
_U64: Final = struct.Struct(">Q")
_SIGN: Final = 1 << 63
_ALL_BITS: Final = (1 << 64) - 1
_NO_SERIAL: Final = bytes(SERIAL_KEY_BYTES)
# Two ordered times and the notice id.
DUE_KEY_BYTES: Final = 2 * _U64.size + NOTICE_ID_BYTES

_STATUS_CODES: Final = {"issued": 1, "revoked": 2}
_STATUS_NAMES: Final = {code: name for name, code in _STATUS_CODES.items()}
_PENDING_CODES: Final = {"pending": 1, "approved": 2, "rejected": 3}
_PENDING_NAMES: Final = {code: name for name, code in _PENDING_CODES.items()}
_EVENT_CODES: Final = {name: code for code, name in enumerate(EVENTS, start=1)}
_EVENT_NAMES: Final = {code: name for name, code in _EVENT_CODES.items()}


def serial_key(serial: int) -> bytes:
    """The ``certs`` key of a serial number: 20 big-endian octets."""
    return serial.to_bytes(SERIAL_KEY_BYTES, "big")


def transaction_key(transaction_id: str, requester_key_sha256: bytes) -> bytes:
    """The ``txids`` (and ``pending_txids``) key of a transaction of one requester."""
    return requester_key_sha256 + transaction_id.encode()


def _texts(*texts: str) -> list[bytes]:
    return [text.encode() for text in texts]


def _sans(sans: tuple[str, ...]) -> list[bytes]:
    parts = []
    for san in sans:
        encoded = san.encode()
        parts.append(_U16.pack(len(encoded)))
        parts.append(encoded)
    return parts


class _Reader:
    """Reads the variable part of a value, refusing truncation and leftovers."""

    def __init__(self, value: bytes, offset: int, where: str) -> None:
        self._value = value
        self._view = memoryview(value)
        self._offset = offset
        self._where = where

    def take(self, length: int) -> bytes:
        end = self._offset + length
        if end > len(self._value):
            raise LedgerCorrupt(f"{self._where}: truncated")
        chunk = bytes(self._view[self._offset:end])
        self._offset = end
        return chunk

    def text(self, length: int) -> str:
        try:
            return self.take(length).decode()
        except UnicodeDecodeError as error:
            raise LedgerCorrupt(f"{self._where}: text is not UTF-8") from error

    def sans(self, count: int) -> tuple[str, ...]:
        sans = []
        for _ in range(count):
            (san_len,) = _U16.unpack(self.take(_U16.size))
            sans.append(self.text(san_len))
        return tuple(sans)

    def finish(self) -> None:
        if self._offset != len(self._value):
            raise LedgerCorrupt(f"{self._where}: {len(self._value) - self._offset} trailing bytes")


def encode_record(record: CertRecord) -> bytes:
    """Record format 2 (see the module docstring)."""
    subject, transaction_id, profile = _texts(
        record.subject, record.transaction_id, record.profile
    )
    header = _HEADER.pack(
        RECORD_FORMAT,
        _STATUS_CODES[record.status],
        record.not_before,
        record.not_after,
        float(record.issued_at),
        record.requester_key_sha256,
        record.csr_sha256,
        len(subject),
        len(transaction_id),
        len(profile),
        len(record.sans),
        len(record.der),
        0.0 if record.revoked_at is None else float(record.revoked_at),
        record.revocation_reason,
    )
    return b"".join([header, subject, transaction_id, profile, *_sans(record.sans), record.der])


def decode_record(key: bytes, value: bytes) -> CertRecord:
    """Decode a ``certs`` entry of format 1 or 2, or raise :class:`LedgerCorrupt`."""
    if len(key) != SERIAL_KEY_BYTES:
        raise LedgerCorrupt(f"certs key of {len(key)} bytes, expected {SERIAL_KEY_BYTES}")
    serial = int.from_bytes(key, "big")
    where = f"record of serial {serial:x}"
    if not value:
        raise LedgerCorrupt(f"{where}: empty")
    if value[0] not in (1, RECORD_FORMAT):
        raise LedgerCorrupt(f"{where}: unknown record format {value[0]}")
    header = _HEADER_V1 if value[0] == 1 else _HEADER
    if len(value) < header.size:
        raise LedgerCorrupt(f"{where}: truncated header ({len(value)} bytes)")
    fields = header.unpack_from(value)
    (
        _version,
        status_code,
        not_before,
        not_after,
        issued_at,
        requester_key_sha256,
        csr_sha256,
        subject_len,
        transaction_id_len,
        profile_len,
        san_count,
        der_len,
    ) = fields[:12]
    status = _STATUS_NAMES.get(status_code)
    if status is None:
        raise LedgerCorrupt(f"{where}: unknown status code {status_code}")
    revoked_at: float | None = None
    reason = 0
    if value[0] == RECORD_FORMAT:
        stored_at, reason = fields[12:]
        if status == "revoked":
            revoked_at = stored_at
        elif stored_at != 0.0 or reason != 0:
            raise LedgerCorrupt(f"{where}: revocation fields on a certificate not revoked")
    reader = _Reader(value, header.size, where)
    subject = reader.text(subject_len)
    transaction_id = reader.text(transaction_id_len)
    profile = reader.text(profile_len)
    sans = reader.sans(san_count)
    der = reader.take(der_len)
    reader.finish()
    try:
        return CertRecord(
            serial=serial,
            der=der,
            subject=subject,
            sans=sans,
            not_before=not_before,
            not_after=not_after,
            issued_at=issued_at,
            transaction_id=transaction_id,
            requester_key_sha256=requester_key_sha256,
            csr_sha256=csr_sha256,
            profile=profile,
            status=status,
            revoked_at=revoked_at,
            revocation_reason=reason,
        )
    except ValueError as error:
        raise LedgerCorrupt(f"{where}: {error}") from error


def encode_pending(request: PendingRequest) -> bytes:
    """Pending request format 1 (see the module docstring); the key holds the id."""
    transaction_id, subject, profile, reason = _texts(
        request.transaction_id, request.subject, request.profile, request.reason
    )
    header = _PENDING_HEADER.pack(
        PENDING_FORMAT,
        _PENDING_CODES[request.status],
        float(request.received_at),
        0.0 if request.decided_at is None else float(request.decided_at),
        request.requester_key_sha256,
        request.csr_sha256,
        len(transaction_id),
        len(subject),
        len(profile),
        len(request.sans),
        len(reason),
        len(request.csr_der),
    )
    return b"".join(
        [header, transaction_id, subject, profile, reason, *_sans(request.sans), request.csr_der]
    )


def decode_pending(key: bytes, value: bytes) -> PendingRequest:
    """Decode a ``pending`` entry, or raise :class:`LedgerCorrupt`."""
    where = f"pending request {key.hex()}"
    try:
        request_id = key.decode("ascii")
    except UnicodeDecodeError as error:
        raise LedgerCorrupt(f"{where}: the key is not a request id") from error
    where = f"pending request {request_id}"
    if not value or value[0] != PENDING_FORMAT:
        raise LedgerCorrupt(f"{where}: unknown format {value[:1].hex() or 'empty'}")
    if len(value) < _PENDING_HEADER.size:
        raise LedgerCorrupt(f"{where}: truncated header ({len(value)} bytes)")
    (
        _version,
        status_code,
        received_at,
        decided_at,
        requester_key_sha256,
        csr_sha256,
        transaction_id_len,
        subject_len,
        profile_len,
        san_count,
        reason_len,
        csr_len,
    ) = _PENDING_HEADER.unpack_from(value)
    status = _PENDING_NAMES.get(status_code)
    if status is None:
        raise LedgerCorrupt(f"{where}: unknown status code {status_code}")
    reader = _Reader(value, _PENDING_HEADER.size, where)
    transaction_id = reader.text(transaction_id_len)
    subject = reader.text(subject_len)
    profile = reader.text(profile_len)
    reason = reader.text(reason_len)
    sans = reader.sans(san_count)
    csr_der = reader.take(csr_len)
    reader.finish()
    try:
        return PendingRequest(
            request_id=request_id,
            transaction_id=transaction_id,
            requester_key_sha256=requester_key_sha256,
            csr_sha256=csr_sha256,
            csr_der=csr_der,
            subject=subject,
            sans=sans,
            profile=profile,
            received_at=received_at,
            status=status,
            decided_at=None if status == "pending" else decided_at,
            reason=reason,
        )
    except ValueError as error:
        raise LedgerCorrupt(f"{where}: {error}") from error


def encode_challenge(challenge: Challenge) -> bytes:
    """Challenge format 2 (see the module docstring); the key is the digest."""
    profile, pattern, label, san_pattern = _texts(
        challenge.profile, challenge.subject_pattern, challenge.label, challenge.san_pattern)
    header = _CHALLENGE_HEADER.pack(
        CHALLENGE_FORMAT,
        float(challenge.created_at),
        float(challenge.expires_at),
        challenge.uses_left,
        len(profile),
        len(pattern),
        len(label),
        len(san_pattern),
    )
    return b"".join([header, profile, pattern, label, san_pattern])


def decode_challenge(key: bytes, value: bytes) -> Challenge:
    """Decode a ``challenges`` entry of format 1 or 2, or raise :class:`LedgerCorrupt`."""
    where = f"challenge {key.hex()}"
    version = value[0] if value else None
    if version not in (1, CHALLENGE_FORMAT):
        raise LedgerCorrupt(f"{where}: unknown format {value[:1].hex() or 'empty'}")
    header = _CHALLENGE_HEADER_V1 if version == 1 else _CHALLENGE_HEADER
    if len(value) < header.size:
        raise LedgerCorrupt(f"{where}: truncated header ({len(value)} bytes)")
    created_at, expires_at, uses_left, profile_len, pattern_len, label_len = \
        header.unpack_from(value)[1:7]
    reader = _Reader(value, header.size, where)
    profile = reader.text(profile_len)
    pattern = reader.text(pattern_len)
    label = reader.text(label_len)
    san_pattern = pattern if version == 1 else reader.text(header.unpack_from(value)[7])
    reader.finish()
    try:
        return Challenge(
            digest=key,
            created_at=created_at,
            expires_at=expires_at,
            uses_left=uses_left,
            profile=profile,
            subject_pattern=pattern,
            label=label,
            san_pattern=san_pattern,
        )
    except ValueError as error:
        raise LedgerCorrupt(f"{where}: {error}") from error


def _ordered(value: float) -> bytes:
    """8 octets whose byte order is the numeric order of the finite float ``value``.

    IEEE 754 big-endian bytes sort right for positive numbers only: the sign
    bit is set on those, and every bit flipped on negative ones.
    """
    (bits,) = _U64.unpack(_F64.pack(value + 0.0))  # + 0.0: -0.0 sorts as 0.0
    return _U64.pack(bits ^ _ALL_BITS if bits & _SIGN else bits | _SIGN)


def due_prefix(next_attempt_at: float) -> bytes:
    """The first octets of the ``outbox_due`` key of a notice due at ``next_attempt_at``:
    a notice is due at ``now`` when its key's prefix is at most ``due_prefix(now)``."""
    return _ordered(next_attempt_at)


def due_key(notice: Notice) -> bytes:
    """The ``outbox_due`` key of a notice: it sorts in the order claims take them."""
    return _ordered(notice.next_attempt_at) + _ordered(notice.created_at) + notice.notice_id


def encode_notice(notice: Notice) -> bytes:
    """Notice format 1 (see the module docstring); the key is the notice id."""
    sink = notice.sink.encode()
    header = _NOTICE_HEADER.pack(
        NOTICE_FORMAT,
        _EVENT_CODES[notice.event],
        float(notice.created_at),
        float(notice.next_attempt_at),
        notice.attempts,
        _NO_SERIAL if notice.serial is None else serial_key(notice.serial),
        len(sink),
        len(notice.body),
    )
    return b"".join([header, sink, notice.body])


def decode_notice(key: bytes, value: bytes) -> Notice:
    """Decode an ``outbox`` entry, or raise :class:`LedgerCorrupt`."""
    where = f"notice {key.hex()}"
    if not value or value[0] != NOTICE_FORMAT:
        raise LedgerCorrupt(f"{where}: unknown format {value[:1].hex() or 'empty'}")
    if len(value) < _NOTICE_HEADER.size:
        raise LedgerCorrupt(f"{where}: truncated header ({len(value)} bytes)")
    (_version, event_code, created_at, next_attempt_at, attempts, serial, sink_len,
     body_len) = _NOTICE_HEADER.unpack_from(value)
    event = _EVENT_NAMES.get(event_code)
    if event is None:
        raise LedgerCorrupt(f"{where}: unknown event code {event_code}")
    reader = _Reader(value, _NOTICE_HEADER.size, where)
    sink = reader.text(sink_len)
    body = reader.take(body_len)
    reader.finish()
    try:
        return Notice(
            notice_id=key,
            sink=sink,
            event=event,
            body=body,
            created_at=created_at,
            attempts=attempts,
            next_attempt_at=next_attempt_at,
            serial=None if serial == _NO_SERIAL else int.from_bytes(serial, "big"),
        )
    except ValueError as error:
        raise LedgerCorrupt(f"{where}: {error}") from error
