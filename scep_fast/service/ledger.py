"""The issuance ledger port: what the service needs from storage.

Every certificate we issue is recorded here before it leaves the server.
The service talks to storage only through :class:`Ledger`. This module holds
the port, the values it stores (validated when built), what ``commit`` says
about each record, and the rules every adapter shares. The adapters:
``scep_fast.service.ledger_memory.MemoryLedger``, a reference implementation
with the same rules, for tests of the layers above and as an executable
statement of the semantics; ``scep_fast.runtime.ledger_lmdb``, the embedded
default; ``scep_fast.runtime.ledger_pg``, a PostgreSQL database that several
nodes share. One test suite of these rules runs against all three
(``tests/integration/test_ledger_contract.py``).

The rules of :meth:`Ledger.commit`, applied per record, in order, inside one
write transaction for the whole batch:

1. The key ``(transaction_id, requester_key_sha256)`` is already recorded
   and its certificate is still good (not revoked, and not expired at the
   new record's ``issued_at``): with the same ``csr_sha256`` this is a resend
   of the same request (RFC 8894 section 3.3.1: the transactionID stays the
   same for a resend), possibly issued meanwhile by another worker process;
   the answer is :class:`AlreadyIssued` carrying the certificate on record,
   and the new certificate is discarded. With a different CSR it is
   :class:`TransactionConflict`. A key whose certificate was revoked or has
   expired is free again: the new record takes it over (devices that derive
   the transactionID from a key they keep must be able to enroll again).
2. The record renews a certificate (``renewals``, one entry per record,
   ``None`` for a first enrollment) that is no longer good at ``issued_at``
   (revoked, expired, or not on record): :class:`RenewedGone`. A renewal
   recorded while its request waited (for validators, say) and the
   operator revoked the old certificate meanwhile renews nothing.
3. The serial number is already in use: :class:`SerialCollision`; the caller
   refuses (or reissues with a fresh serial) rather than overwrite.
4. The record's request presented a one-time challenge (``challenges``, one
   entry per record, ``None`` for none) that is no longer usable at
   ``issued_at``: :class:`ChallengeRefused`. Otherwise the challenge loses
   one use in the same transaction as the record is written, so a challenge
   is spent exactly when a certificate is recorded for it.
5. Otherwise the record is written: :class:`Recorded`. A renewal that
   replaces its certificate (:attr:`Renewal.revoke_reason` set) revokes it
   in the same transaction, so two renewals of one certificate, in one
   batch or on two nodes at once, cannot both be recorded.

A batch is all or nothing: when anything raises in the middle, nothing of
the batch is written. When ``commit`` returns, the batch is on disk.
``commit`` knows nothing of pending requests: when a request that waited
for approval is issued, the service commits its certificate like any other.

The certificate lifecycle beyond issuance, every write durable on return:

- :meth:`Ledger.revoke` marks a certificate revoked (once: revoking again
  returns the record as it is); :meth:`Ledger.iter_revoked` lists the
  revoked ones, for the CRL, without reading every certificate.
- Pending requests (:class:`PendingRequest`) wait for an operator. One
  ``(transaction_id, requester_key_sha256)`` names at most one request for
  good: :meth:`Ledger.add_pending` returns the request already on record
  for it, whatever its status, and the caller compares ``csr_sha256``.
  :meth:`Ledger.decide_pending` moves a request from ``pending`` to
  ``approved`` or ``rejected``, once.
- Challenges (:class:`Challenge`) are kept by the SHA-256 of the secret.
  A use is taken by :meth:`Ledger.commit` or :meth:`Ledger.add_pending` in
  the transaction that records what the challenge was presented for, so a
  single-use challenge is used once across every worker process, and a
  request that is refused spends nothing.
- :meth:`Ledger.next_crl_number` hands out CRL numbers 1, 2, 3, ...
- The outbox holds notices (``scep_fast.service.notices.Notice``): events
  on their way to the notification sinks. ``commit`` and ``revoke`` write
  them in the transaction of what they report (:func:`notices_to_write`
  says which); :meth:`Ledger.claim_notices` leases the due ones to one
  claimer at a time across worker processes and nodes, and a delivered
  notice leaves the outbox (:meth:`Ledger.settle_notices`, with the
  outcomes of a whole delivery round in one transaction).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    from scep_fast.service.notices import Notice

__all__ = [
    "MAX_ATTEMPTS",
    "MAX_BODY_BYTES",
    "MAX_SANS",
    "MAX_SERIAL",
    "MAX_TEXT_BYTES",
    "MAX_TRANSACTION_ID_BYTES",
    "MAX_USES",
    "PENDING_STATUSES",
    "REVOCATION_REASONS",
    "STATUSES",
    "AlreadyIssued",
    "CertRecord",
    "Challenge",
    "ChallengeRefused",
    "ChallengeUsedUp",
    "CommitOutcome",
    "Ledger",
    "LedgerCorrupt",
    "LedgerError",
    "LedgerFull",
    "LedgerUnavailable",
    "NotFound",
    "PendingRequest",
    "Recorded",
    "SerialCollision",
    "TransactionConflict",
    "UnsupportedSchema",
    "check_claim",
    "check_notices",
    "check_pending",
    "check_decision",
    "check_retries",
    "NoticeRetry",
    "check_revocation_reason",
    "commit_challenges",
    "decide",
    "due_order",
    "good_at",
    "is_time",
    "notices_to_write",
    "spent",
    "usable",
]

# RFC 5280 section 4.1.2.2: the serial number is a positive INTEGER of at
# most 20 octets. Its DER content is two's complement, so the top bit of the
# first of 20 octets must be clear: the largest value has 159 bits.
MAX_SERIAL: Final = (1 << 159) - 1

STATUSES: Final = frozenset({"issued", "revoked"})
PENDING_STATUSES: Final = frozenset({"pending", "approved", "rejected"})

# RFC 5280 section 5.3.1, CRLReason: code -> name. Code 7 is not used.
REVOCATION_REASONS: Final[dict[int, str]] = {
    0: "unspecified",
    1: "keyCompromise",
    2: "cACompromise",
    3: "affiliationChanged",
    4: "superseded",
    5: "cessationOfOperation",
    6: "certificateHold",
    8: "removeFromCRL",
    9: "privilegeWithdrawn",
    10: "aACompromise",
}

# The most uses a challenge may have (stored in 32 bits).
MAX_USES: Final = 0xFFFF_FFFF

# Size limits of the text fields, in UTF-8 bytes. The ledger keys on the
# transaction id (LMDB keys are at most 511 bytes, and the key also holds
# the 32-byte requester key hash); the others are length-prefixed with 16
# bits. The service checks a request against these before it issues, so a
# single odd request can never make a whole batch fail to commit.
MAX_TRANSACTION_ID_BYTES: Final = 256
MAX_TEXT_BYTES: Final = 0xFFFF
MAX_SANS: Final = 0xFFFF

# An outbox entry's delivery attempts and body, as the LMDB format stores
# them (32-bit lengths and counts).
MAX_ATTEMPTS: Final = 0xFFFF_FFFF
MAX_BODY_BYTES: Final = 0xFFFF_FFFF

_SHA256_LEN: Final = 32
_REQUEST_ID = re.compile(r"[0-9a-f]{16}")


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


class LedgerUnavailable(LedgerError):
    """The storage cannot be reached now (its database is down or restarting).

    Whether a write that was under way when the connection broke reached the
    storage is unknown; nothing of it may be answered as done. The caller
    answers "come back later", and a resend then finds what was recorded.
    """


class NotFound(LedgerError):
    """The certificate or request named is not on record."""


class ChallengeUsedUp(LedgerError):
    """The one-time challenge presented is unknown, expired or used up; nothing was written."""


def check_revocation_reason(reason: object) -> int:
    """``reason`` if it is an RFC 5280 CRLReason code, else ``ValueError``."""
    if type(reason) is not int or reason not in REVOCATION_REASONS:
        raise ValueError(f"revocation reason must be one of {sorted(REVOCATION_REASONS)}")
    return reason


def is_time(value: object) -> bool:
    return type(value) in (int, float)


def _check_text(*texts: str) -> None:
    # Encoding also refuses strings that are not valid Unicode (lone
    # surrogates), which the ledger could not store; PostgreSQL's text cannot
    # hold U+0000 either, so no ledger takes it.
    for text in texts:
        if len(text.encode()) > MAX_TEXT_BYTES:
            raise ValueError(f"a text field is longer than {MAX_TEXT_BYTES} bytes")
        if "\x00" in text:
            raise ValueError("a text field holds U+0000")


def _check_transaction_id(transaction_id: object) -> None:
    if not isinstance(transaction_id, str) or not transaction_id:
        raise ValueError("transaction_id must be a non-empty str")
    if len(transaction_id.encode()) > MAX_TRANSACTION_ID_BYTES:
        raise ValueError(f"transaction_id longer than {MAX_TRANSACTION_ID_BYTES} bytes")
    _check_text(transaction_id)


def _check_digests(owner: object, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        if not isinstance(value, bytes) or len(value) != _SHA256_LEN:
            raise ValueError(f"{name} must be {_SHA256_LEN} bytes")


def _check_sans(sans: object) -> None:
    if not isinstance(sans, tuple) or not all(isinstance(s, str) for s in sans):
        raise ValueError("sans must be a tuple of str")
    if len(sans) > MAX_SANS:
        raise ValueError(f"more than {MAX_SANS} SANs")


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
    # Set together with status "revoked", and only then.
    revoked_at: float | None = None
    # RFC 5280 CRLReason code; 0 (unspecified) unless revoked.
    revocation_reason: int = 0

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
        _check_text(self.transaction_id, self.subject, self.profile, *self.sans)
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
        check_revocation_reason(self.revocation_reason)
        if self.revoked_at is not None and not is_time(self.revoked_at):
            raise ValueError("revoked_at must be epoch seconds or None")
        if (self.status == "revoked") != (self.revoked_at is not None):
            raise ValueError("status is revoked exactly when revoked_at is set")
        if self.revoked_at is None and self.revocation_reason != 0:
            raise ValueError("a revocation reason needs a revocation")


@dataclass(frozen=True, slots=True)
class PendingRequest:
    """An enrollment request waiting for an operator (PENDING, then CertPoll).

    ``request_id`` is the operator's handle for it: 16 lower-case hex
    characters. ``decided_at`` is set exactly when the status is no longer
    ``pending``; ``reason`` is the operator's note.
    """

    request_id: str
    transaction_id: str
    requester_key_sha256: bytes
    csr_sha256: bytes
    csr_der: bytes
    subject: str
    sans: tuple[str, ...]
    profile: str
    received_at: float
    status: str = "pending"
    decided_at: float | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not _REQUEST_ID.fullmatch(self.request_id):
            raise ValueError("request_id must be 16 lower-case hex characters")
        _check_transaction_id(self.transaction_id)
        _check_digests(self, "requester_key_sha256", "csr_sha256")
        if not isinstance(self.csr_der, bytes) or not self.csr_der:
            raise ValueError("csr_der must be non-empty bytes")
        if len(self.csr_der) > 0xFFFF_FFFF:
            raise ValueError("csr_der is too long")
        if not isinstance(self.subject, str):
            raise ValueError("subject must be str")
        _check_sans(self.sans)
        if not isinstance(self.profile, str) or not self.profile:
            raise ValueError("profile must be a non-empty str")
        if not is_time(self.received_at):
            raise ValueError("received_at must be epoch seconds")
        if self.status not in PENDING_STATUSES:
            raise ValueError(f"status must be one of {sorted(PENDING_STATUSES)}")
        if self.decided_at is not None and not is_time(self.decided_at):
            raise ValueError("decided_at must be epoch seconds or None")
        if (self.status == "pending") != (self.decided_at is None):
            raise ValueError("decided_at is set exactly when the request is decided")
        if not isinstance(self.reason, str):
            raise ValueError("reason must be str")
        _check_text(self.subject, self.profile, self.reason, *self.sans)


@dataclass(frozen=True, slots=True)
class Challenge:
    """A challenge password, known by the SHA-256 of the secret only.

    Usable while ``expires_at`` is later than now and ``uses_left`` is
    above zero. ``profile`` is the profile a request with this challenge
    gets. ``subject_pattern`` and ``san_pattern`` bind it to names (see
    ``scep_fast.service.names``): when either is set, the request's whole
    subject must match the one and every SAN value the other, and an empty
    pattern then allows no subject or no SAN.
    """

    digest: bytes
    created_at: float
    expires_at: float
    uses_left: int
    profile: str = "default"
    subject_pattern: str = ""
    label: str = ""
    san_pattern: str = ""

    def __post_init__(self) -> None:
        _check_digests(self, "digest")
        if not is_time(self.created_at) or not is_time(self.expires_at):
            raise ValueError("created_at and expires_at must be epoch seconds")
        if type(self.uses_left) is not int or not 0 <= self.uses_left <= MAX_USES:
            raise ValueError(f"uses_left must be an integer from 0 to {MAX_USES}")
        if not isinstance(self.profile, str) or not self.profile:
            raise ValueError("profile must be a non-empty str")
        for text in (self.subject_pattern, self.san_pattern, self.label):
            if not isinstance(text, str):
                raise ValueError("subject_pattern, san_pattern and label must be str")
        _check_text(self.profile, self.subject_pattern, self.san_pattern, self.label)
        for pattern in (self.subject_pattern, self.san_pattern):
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"{pattern!r} is not a regular expression: {error}") from error

    @property
    def binds_names(self) -> bool:
        return bool(self.subject_pattern or self.san_pattern)


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


@dataclass(frozen=True, slots=True)
class ChallengeRefused:
    """The challenge the request presented was spent meanwhile; nothing was written."""

    digest: bytes


@dataclass(frozen=True, slots=True)
class RenewedGone:
    """The certificate the record renews was revoked (or expired) before the
    renewal was recorded; nothing was written."""

    serial: int


@dataclass(frozen=True, slots=True)
class Renewal:
    """What a record renews: the certificate's serial, and the CRLReason to revoke
    that certificate with when the record is written (None: it stays valid)."""

    serial: int
    revoke_reason: int | None = None

    def __post_init__(self) -> None:
        if type(self.serial) is not int or not 1 <= self.serial <= MAX_SERIAL:
            raise ValueError("a renewal names a positive serial of at most 20 octets")
        if self.revoke_reason is not None:
            check_revocation_reason(self.revoke_reason)


# A failed delivery's new state: (notice_id, attempts, next_attempt_at).
NoticeRetry = tuple[bytes, int, float]

CommitOutcome = (Recorded | AlreadyIssued | TransactionConflict | RenewedGone | SerialCollision
                 | ChallengeRefused)


class Ledger(Protocol):
    """Storage of issued certificates."""

    def find_transaction(
        self, transaction_id: str, requester_key_sha256: bytes
    ) -> CertRecord | None:
        """The certificate issued for this transaction of this requester."""
        ...

    def find_transactions(
        self, keys: Sequence[tuple[str, bytes]]
    ) -> list[tuple[CertRecord | None, PendingRequest | None]]:
        """For each (transaction_id, requester) key: its certificate and its pending request.

        One read for a whole batch, so that a batch costs one lookup, not two
        per message.
        """
        ...

    def commit(
        self, records: Sequence[CertRecord], challenges: Sequence[bytes | None] = (),
        notices: Sequence[Notice] = (), renewals: Sequence[Renewal | None] = (),
    ) -> list[CommitOutcome]:
        """Record a batch in one durable transaction; one outcome per record.

        ``challenges`` is empty or has one entry per record: the digest of
        the one-time challenge its request presented, or None. ``renewals``
        likewise: what the record renews, or None. ``notices`` go to the
        outbox in the same transaction: one whose ``serial`` is set only if
        that serial's record is :class:`Recorded` by this commit, the others
        always.
        """
        ...

    def add_notices(self, notices: Sequence[Notice]) -> None:
        """Put notices in the outbox, durably, in one transaction."""
        ...

    def claim_notices(self, now: float, limit: int, lease_seconds: float) -> list[Notice]:
        """Up to ``limit`` notices due at ``now`` (``next_attempt_at <= now``), oldest
        due first, each claimed for ``lease_seconds``: returned and stored with
        ``next_attempt_at = now + lease_seconds``, durably, so that no other
        claimer takes it meanwhile and, if the claimer dies, another does after.
        """
        ...

    def settle_notices(self, delivered: Sequence[bytes] = (),
                       retries: Sequence[NoticeRetry] = ()) -> None:
        """The outcomes of a delivery round, durably, in one transaction.

        ``delivered``: notices delivered (or given up): they leave the outbox.
        ``retries``: (notice_id, attempts, next_attempt_at) of failed ones:
        the new attempt count and when to try next. Unknown ids are ignored
        (another claimer settled them after a lease ran out). ``ValueError``
        for a retry out of range, and nothing is written.
        """
        ...

    def count_notices(self) -> int:
        """How many notices wait in the outbox (for a gauge)."""
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

    def revoke(self, serial: int, reason: int, when: float,
               notices: Sequence[Notice] = ()) -> CertRecord:
        """Mark a certificate revoked, durably; the record as stored.

        :class:`NotFound` for an unknown serial. A certificate revoked
        already is returned unchanged (its first time and reason stay) and
        ``notices`` are not written; otherwise they go to the outbox in the
        same transaction as the revocation.
        ``ValueError`` for a reason that is not an RFC 5280 CRLReason code.
        """
        ...

    def iter_revoked(self) -> Iterator[CertRecord]:
        """The revoked certificates in ascending serial order, from an index."""
        ...

    def count_revoked(self) -> int:
        """How many certificates are revoked: cheap, so a CRL writer can poll it."""
        ...

    def add_pending(self, p: PendingRequest, challenge: bytes | None = None) -> PendingRequest:
        """Record a request waiting for approval, durably.

        When a request of the same ``(transaction_id, requester_key_sha256)``
        is on record already, whatever its status, that one is returned and
        nothing is written: the caller compares ``csr_sha256``. Otherwise
        ``challenge``, the digest of the one-time challenge the request
        presented, loses one use in the same transaction, or
        :class:`ChallengeUsedUp` is raised when it is not usable at
        ``p.received_at``. A request id in use by another transaction is a
        :class:`LedgerError`; a request whose status is not ``pending`` is a
        ``ValueError``.
        """
        ...

    def find_pending(
        self, transaction_id: str, requester_key_sha256: bytes
    ) -> PendingRequest | None:
        """The request of this transaction of this requester, any status."""
        ...

    def get_pending(self, request_id: str) -> PendingRequest | None:
        """The request with this id, any status."""
        ...

    def iter_pending(self) -> Iterator[PendingRequest]:
        """Every request, any status, in ascending ``request_id`` order."""
        ...

    def decide_pending(
        self, request_id: str, status: str, when: float, reason: str = ""
    ) -> PendingRequest:
        """Approve or reject a pending request, durably; the request as stored.

        ``status`` is ``"approved"`` or ``"rejected"`` (else ``ValueError``).
        :class:`NotFound` for an unknown id, :class:`LedgerError` for a
        request decided already.
        """
        ...

    def add_challenge(self, challenge: Challenge) -> None:
        """Record a challenge, durably; :class:`LedgerError` if its digest is taken."""
        ...

    def get_challenge(self, digest: bytes) -> Challenge | None:
        """The challenge with this digest, usable or not."""
        ...

    def next_crl_number(self) -> int:
        """The next CRL number (1 first), durably taken: never handed out twice."""
        ...

    def close(self) -> None:
        """Release the storage; the ledger is unusable afterwards."""
        ...

# --- Rules the adapters share ------------------------------------------------


def usable(challenge: Challenge, now: float) -> bool:
    """Whether a request recorded at ``now`` may take a use of ``challenge``."""
    return challenge.expires_at > now and challenge.uses_left > 0


def spent(challenge: Challenge) -> Challenge:
    return dataclasses.replace(challenge, uses_left=challenge.uses_left - 1)


def good_at(record: CertRecord, now: float) -> bool:
    """Whether ``record``'s certificate is neither revoked nor expired at ``now``.

    Only such a certificate holds its transaction: a resend gets it again,
    and another CSR under the same transaction is refused.
    """
    return record.status == "issued" and record.not_after > now


def refusal_of(record: CertRecord, digest: bytes | None, holder: CertRecord | None,
               serial_in_use: Callable[[int], bool],
               take_use: Callable[[bytes, float], bool], renewal: Renewal | None = None,
               renewed: CertRecord | None = None) -> CommitOutcome | None:
    """Rules 1 to 4 of :meth:`Ledger.commit` for one record, in order (see the module
    docstring); None means rule 5: write it.

    ``holder`` is the record that holds the record's (transaction_id,
    requester_key_sha256) now, if any; ``renewed`` the record of the
    certificate ``renewal`` names, as it stands now (None if not on record);
    ``take_use(digest, issued_at)`` takes one use of the challenge if it is
    usable then, and says whether it could (it is called last, and only when
    the record is to be written). Every ledger decides with this one
    function, and revokes what :func:`replaced` says when it writes.
    """
    if holder is not None and good_at(holder, record.issued_at):
        if holder.csr_sha256 == record.csr_sha256:
            return AlreadyIssued(holder)
        return TransactionConflict(holder)
    if renewal is not None and (renewed is None or not good_at(renewed, record.issued_at)):
        return RenewedGone(renewal.serial)
    if serial_in_use(record.serial):
        return SerialCollision(record.serial)
    if digest is not None and not take_use(digest, record.issued_at):
        return ChallengeRefused(digest)
    return None


def replaced(record: CertRecord, renewal: Renewal | None,
             renewed: CertRecord | None) -> CertRecord | None:
    """The renewed certificate as revoked by the record's renewal, when the record is
    written and its renewal replaces it; None when nothing is revoked."""
    if renewal is None or renewal.revoke_reason is None or renewed is None:
        return None
    return dataclasses.replace(renewed, status="revoked", revoked_at=record.issued_at,
                               revocation_reason=renewal.revoke_reason)


def commit_renewals(records: Sequence[CertRecord],
                    renewals: Sequence[Renewal | None]) -> Sequence[Renewal | None]:
    """The renewal per record (None for none); raises for arguments of the wrong shape."""
    if not renewals:
        return [None] * len(records)
    if len(renewals) != len(records):
        raise ValueError("renewals must be empty or have one entry per record")
    for renewal in renewals:
        if renewal is not None and not isinstance(renewal, Renewal):
            raise TypeError("renewals takes Renewal values or None")
    return renewals


def _check_digest(digest: object) -> None:
    if not isinstance(digest, bytes) or len(digest) != _SHA256_LEN:
        raise ValueError(f"a challenge digest is {_SHA256_LEN} bytes")


def commit_challenges(
    records: Sequence[CertRecord], challenges: Sequence[bytes | None]
) -> Sequence[bytes | None]:
    """The challenge per record (None for none); raises for arguments of the wrong shape."""
    for record in records:
        if not isinstance(record, CertRecord):
            raise TypeError("commit takes CertRecord values")
    if not challenges:
        return [None] * len(records)
    if isinstance(challenges, bytes | str) or len(challenges) != len(records):
        raise ValueError("challenges must be empty or have one entry per record")
    for digest in challenges:
        if digest is not None:
            _check_digest(digest)
    return challenges


def check_pending(p: PendingRequest, challenge: bytes | None) -> None:
    if not isinstance(p, PendingRequest):
        raise TypeError("add_pending takes a PendingRequest")
    if p.status != "pending":
        raise ValueError("add_pending takes a request with status pending")
    if challenge is not None:
        _check_digest(challenge)


def check_decision(status: str, when: float) -> None:
    if status not in ("approved", "rejected"):
        raise ValueError('status must be "approved" or "rejected"')
    if not is_time(when):
        raise ValueError("when must be epoch seconds")


def decide(request: PendingRequest, status: str, when: float, reason: str) -> PendingRequest:
    """``request`` approved or rejected; :class:`LedgerError` if decided already."""
    check_decision(status, when)
    if request.status != "pending":
        raise LedgerError(f"request {request.request_id} is {request.status} already")
    return dataclasses.replace(request, status=status, decided_at=when, reason=reason)


# --- The outbox ----------------------------------------------------------------


def _check_moment(value: object, name: str) -> None:
    # A NaN would sort nowhere in the due order; an infinity never comes due.
    if not is_time(value) or not math.isfinite(value):  # type: ignore[arg-type]
        raise ValueError(f"{name} must be finite epoch seconds")


def check_notices(notices: Sequence[Notice]) -> Sequence[Notice]:
    """``notices`` if every one is a :class:`Notice` each ledger can store, with
    distinct ids; else ``TypeError`` or ``ValueError``, before anything is written.

    ``Notice`` validates its own fields but for its times and sizes, which
    the ledgers need bounded.
    """
    # Imported here: the notices module imports this one.
    from scep_fast.service.notices import Notice

    if isinstance(notices, bytes | str):
        raise TypeError("notices must be a sequence of Notice values")
    seen: set[bytes] = set()
    for notice in notices:
        if not isinstance(notice, Notice):
            raise TypeError("notices must be Notice values")
        _check_moment(notice.created_at, "created_at")
        _check_moment(notice.next_attempt_at, "next_attempt_at")
        if notice.attempts > MAX_ATTEMPTS:
            raise ValueError(f"attempts above {MAX_ATTEMPTS}")
        if len(notice.body) > MAX_BODY_BYTES:
            raise ValueError("a notice body is too long")
        if notice.serial is not None and notice.serial > MAX_SERIAL:
            raise ValueError("a notice serial is out of range")
        _check_text(notice.sink)
        if notice.notice_id in seen:
            raise ValueError(f"notice id {notice.notice_id.hex()} given twice")
        seen.add(notice.notice_id)
    return notices


def notices_to_write(notices: Sequence[Notice], outcomes: Sequence[CommitOutcome]) -> list[Notice]:
    """The notices a commit writes with these outcomes: those bound to a serial
    only when that serial's record was :class:`Recorded`, the others always."""
    recorded = {outcome.record.serial for outcome in outcomes if isinstance(outcome, Recorded)}
    return [n for n in notices if n.serial is None or n.serial in recorded]


def check_claim(now: float, limit: int, lease_seconds: float) -> None:
    _check_moment(now, "now")
    if type(limit) is not int or limit < 0:
        raise ValueError("limit must be a non-negative int")
    _check_moment(lease_seconds, "lease_seconds")
    # A lease of 0 would leave a claimed notice due for every other claimer.
    if lease_seconds <= 0:
        raise ValueError("lease_seconds must be positive")


def check_retries(retries: Sequence[NoticeRetry]) -> None:
    for _notice_id, attempts, next_attempt_at in retries:
        if type(attempts) is not int or not 0 <= attempts <= MAX_ATTEMPTS:
            raise ValueError(f"attempts must be an int from 0 to {MAX_ATTEMPTS}")
        _check_moment(next_attempt_at, "next_attempt_at")


def due_order(notice: Notice) -> tuple[float, float, bytes]:
    """The order claims take due notices in: the one due first, then the oldest (the
    id makes the order total, the same in every ledger)."""
    return (notice.next_attempt_at, notice.created_at, notice.notice_id)
