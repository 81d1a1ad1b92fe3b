"""The issuance ledger port: what the service needs from storage.

Every certificate we issue is recorded here before it leaves the server.
The service talks to storage only through :class:`Ledger`; the LMDB adapter
lives in ``scep_fast.runtime.ledger_lmdb`` and :class:`MemoryLedger` below is
a reference implementation with the same rules, for tests of the layers
above and as an executable statement of the semantics.

The rules of :meth:`Ledger.commit`, applied per record, in order, inside one
write transaction for the whole batch:

1. The key ``(transaction_id, requester_key_sha256)`` is already recorded:
   with the same ``csr_sha256`` this is a resend of the same request (RFC 8894
   section 3.3.1: the transactionID stays the same for a resend), possibly
   issued meanwhile by another worker process; the answer is
   :class:`AlreadyIssued` carrying the certificate on record, and the new
   certificate is discarded. With a different CSR it is
   :class:`TransactionConflict`.
2. The serial number is already in use: :class:`SerialCollision`; the caller
   refuses (or reissues with a fresh serial) rather than overwrite.
3. Otherwise the record is written: :class:`Recorded`.

A batch is all or nothing: when anything raises in the middle, nothing of
the batch is written. When ``commit`` returns, the batch is on disk.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

__all__ = [
    "MAX_SANS",
    "MAX_SERIAL",
    "MAX_TEXT_BYTES",
    "MAX_TRANSACTION_ID_BYTES",
    "STATUSES",
    "AlreadyIssued",
    "CertRecord",
    "CommitOutcome",
    "Ledger",
    "LedgerCorrupt",
    "LedgerError",
    "LedgerFull",
    "MemoryLedger",
    "Recorded",
    "SerialCollision",
    "TransactionConflict",
    "UnsupportedSchema",
    "record_to_json",
]

# RFC 5280 section 4.1.2.2: the serial number is a positive INTEGER of at
# most 20 octets. Its DER content is two's complement, so the top bit of the
# first of 20 octets must be clear: the largest value has 159 bits.
MAX_SERIAL: Final = (1 << 159) - 1

STATUSES: Final = frozenset({"issued", "revoked"})

# Size limits of the text fields, in UTF-8 bytes. The ledger keys on the
# transaction id (LMDB keys are at most 511 bytes, and the key also holds
# the 32-byte requester key hash); the others are length-prefixed with 16
# bits. The service checks a request against these before it issues, so a
# single odd request can never make a whole batch fail to commit.
MAX_TRANSACTION_ID_BYTES: Final = 256
MAX_TEXT_BYTES: Final = 0xFFFF
MAX_SANS: Final = 0xFFFF

_SHA256_LEN: Final = 32


class LedgerError(Exception):
    """The ledger cannot do what was asked.

    The message is for operators (the log, the command line). It is not a
    ``ScepError`` on purpose: the runtime answers anything else with a
    generic HTTP 500 and logs the message, so no storage detail can reach a
    client.
    """


class UnsupportedSchema(LedgerError):
    """The ledger was written with a schema version this code does not know."""


class LedgerCorrupt(LedgerError):
    """Stored bytes that do not decode as a record of a known format."""


class LedgerFull(LedgerError):
    """The storage has no room left for the batch; nothing was written."""


@dataclass(frozen=True, slots=True)
class CertRecord:
    """One issued certificate, as the ledger keeps it.

    Validated when built, so that a record that reaches storage is one the
    ledger can encode and decode again.
    """

    serial: int
    der: bytes
    subject: str
    sans: tuple[str, ...]
    not_before: int
    not_after: int
    issued_at: float
    transaction_id: str
    requester_key_sha256: bytes
    csr_sha256: bytes
    profile: str = "default"
    status: str = "issued"

    def __post_init__(self) -> None:
        # bool is an int subclass; a serial of True is a bug, not a number.
        if type(self.serial) is not int or not 1 <= self.serial <= MAX_SERIAL:
            raise ValueError("serial must be a positive integer of at most 20 octets")
        if not isinstance(self.der, bytes) or not self.der:
            raise ValueError("der must be non-empty bytes")
        if not isinstance(self.sans, tuple) or not all(isinstance(s, str) for s in self.sans):
            raise ValueError("sans must be a tuple of str")
        if not isinstance(self.subject, str):
            raise ValueError("subject must be str")
        if not isinstance(self.transaction_id, str) or not self.transaction_id:
            raise ValueError("transaction_id must be a non-empty str")
        if not isinstance(self.profile, str) or not self.profile:
            raise ValueError("profile must be a non-empty str")
        if len(self.sans) > MAX_SANS:
            raise ValueError(f"more than {MAX_SANS} SANs")
        # Encoding also refuses strings that are not valid Unicode (lone
        # surrogates), which the ledger could not store.
        if len(self.transaction_id.encode()) > MAX_TRANSACTION_ID_BYTES:
            raise ValueError(f"transaction_id longer than {MAX_TRANSACTION_ID_BYTES} bytes")
        for text in (self.subject, self.profile, *self.sans):
            if len(text.encode()) > MAX_TEXT_BYTES:
                raise ValueError(f"a text field is longer than {MAX_TEXT_BYTES} bytes")
        for name in ("requester_key_sha256", "csr_sha256"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != _SHA256_LEN:
                raise ValueError(f"{name} must be {_SHA256_LEN} bytes")
        if type(self.not_before) is not int or type(self.not_after) is not int:
            raise ValueError("not_before and not_after must be int epoch seconds")
        if self.not_after < self.not_before:
            raise ValueError("not_after is before not_before")
        if not isinstance(self.issued_at, int | float):
            raise ValueError("issued_at must be epoch seconds")
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {sorted(STATUSES)}")


# --- What commit says about each record -------------------------------------


@dataclass(frozen=True, slots=True)
class Recorded:
    """The record was written."""

    record: CertRecord


@dataclass(frozen=True, slots=True)
class AlreadyIssued:
    """A resend: ``record`` is the certificate already issued for it."""

    record: CertRecord


@dataclass(frozen=True, slots=True)
class TransactionConflict:
    """The transaction id is taken by the same requester with another CSR."""

    existing: CertRecord


@dataclass(frozen=True, slots=True)
class SerialCollision:
    """The serial number is already in use; nothing was written."""

    serial: int


CommitOutcome = Recorded | AlreadyIssued | TransactionConflict | SerialCollision


class Ledger(Protocol):
    """Storage of issued certificates."""

    def find_transaction(
        self, transaction_id: str, requester_key_sha256: bytes
    ) -> CertRecord | None:
        """The certificate issued for this transaction of this requester."""
        ...

    def commit(self, records: Sequence[CertRecord]) -> list[CommitOutcome]:
        """Record a batch in one durable transaction; one outcome per record."""
        ...

    def get(self, serial: int) -> CertRecord | None:
        """The record of one serial number."""
        ...

    def iter_records(self) -> Iterator[CertRecord]:
        """Every record in ascending serial order, without loading them all."""
        ...

    def count(self) -> int:
        """How many certificates are recorded."""
        ...

    def close(self) -> None:
        """Release the storage; the ledger is unusable afterwards."""
        ...


class MemoryLedger:
    """A :class:`Ledger` in a dict: the same rules, no durability.

    For tests of the service layer, and the reference the LMDB adapter is
    tested against.
    """

    def __init__(self) -> None:
        self._certs: dict[int, CertRecord] = {}
        self._txids: dict[tuple[str, bytes], int] = {}
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise LedgerError("ledger is closed")

    def find_transaction(
        self, transaction_id: str, requester_key_sha256: bytes
    ) -> CertRecord | None:
        self._check_open()
        serial = self._txids.get((transaction_id, requester_key_sha256))
        return None if serial is None else self._certs[serial]

    def commit(self, records: Sequence[CertRecord]) -> list[CommitOutcome]:
        self._check_open()
        # Work on copies so that a failure in the middle leaves nothing behind.
        certs = dict(self._certs)
        txids = dict(self._txids)
        outcomes: list[CommitOutcome] = []
        for record in records:
            if not isinstance(record, CertRecord):
                raise TypeError("commit takes CertRecord values")
            key = (record.transaction_id, record.requester_key_sha256)
            serial = txids.get(key)
            if serial is not None:
                existing = certs[serial]
                if existing.csr_sha256 == record.csr_sha256:
                    outcomes.append(AlreadyIssued(existing))
                else:
                    outcomes.append(TransactionConflict(existing))
            elif record.serial in certs:
                outcomes.append(SerialCollision(record.serial))
            else:
                certs[record.serial] = record
                txids[key] = record.serial
                outcomes.append(Recorded(record))
        self._certs, self._txids = certs, txids
        return outcomes

    def get(self, serial: int) -> CertRecord | None:
        self._check_open()
        return self._certs.get(serial)

    def iter_records(self) -> Iterator[CertRecord]:
        self._check_open()
        for serial in sorted(self._certs):
            yield self._certs[serial]

    def count(self) -> int:
        self._check_open()
        return len(self._certs)

    def bulk_load(self, records: Iterable[CertRecord]) -> int:
        outcomes = self.commit(list(records))
        return sum(isinstance(outcome, Recorded) for outcome in outcomes)

    def close(self) -> None:
        self._closed = True


# --- What the command line prints --------------------------------------------


def _iso8601_utc(epoch_seconds: float, *, fraction: bool) -> str:
    moment = datetime.datetime.fromtimestamp(epoch_seconds, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds" if fraction else "seconds").replace(
        "+00:00", "Z"
    )


def record_to_json(record: CertRecord) -> dict[str, object]:
    """The JSON object ``scep-fast certs list --json`` prints for a record.

    The serial is lower-case hex without a prefix; times are ISO 8601 in UTC
    with a ``Z`` suffix (``issued_at`` to the millisecond). The DER is left
    out: ``certs show`` prints the certificate itself.
    """
    return {
        "serial": format(record.serial, "x"),
        "subject": record.subject,
        "sans": list(record.sans),
        "not_before": _iso8601_utc(record.not_before, fraction=False),
        "not_after": _iso8601_utc(record.not_after, fraction=False),
        "issued_at": _iso8601_utc(record.issued_at, fraction=True),
        "status": record.status,
        "transaction_id": record.transaction_id,
        "profile": record.profile,
        "requester_key_sha256": record.requester_key_sha256.hex(),
        "csr_sha256": record.csr_sha256.hex(),
    }
