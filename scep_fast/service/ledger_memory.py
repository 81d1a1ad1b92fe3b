"""The reference ledger: the rules of ``scep_fast.service.ledger`` in a dict.

No durability; for tests of the layers above the ledger, and the reference
the storage adapters are tested against (``tests/integration/test_ledger_contract.py``).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from scep_fast.service.ledger import (
    CertRecord,
    Challenge,
    ChallengeUsedUp,
    CommitOutcome,
    LedgerError,
    NotFound,
    NoticeRetry,
    PendingRequest,
    Recorded,
    Renewal,
    check_claim,
    check_decision,
    check_notices,
    check_pending,
    check_retries,
    check_revocation_reason,
    commit_challenges,
    commit_renewals,
    decide,
    due_order,
    is_time,
    notices_to_write,
    refusal_of,
    replaced,
    spent,
    usable,
)

if TYPE_CHECKING:
    from scep_fast.service.notices import Notice

__all__ = ["MemoryLedger"]


class MemoryLedger:
    """A :class:`Ledger` in a dict: the same rules, no durability.

    For tests of the service layer, and the reference the LMDB adapter is
    tested against. Safe to share between threads.
    """

    def __init__(self) -> None:
        self._certs: dict[int, CertRecord] = {}
        self._txids: dict[tuple[str, bytes], int] = {}
        self._pending: dict[str, PendingRequest] = {}
        self._pending_txids: dict[tuple[str, bytes], str] = {}
        self._challenges: dict[bytes, Challenge] = {}
        self._outbox: dict[bytes, Notice] = {}
        self._crl_number = 0
        self._lock = threading.RLock()
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise LedgerError("ledger is closed")

    def find_transaction(
        self, transaction_id: str, requester_key_sha256: bytes
    ) -> CertRecord | None:
        with self._lock:
            self._check_open()
            serial = self._txids.get((transaction_id, requester_key_sha256))
            return None if serial is None else self._certs[serial]

    def find_transactions(
        self, keys: Sequence[tuple[str, bytes]]
    ) -> list[tuple[CertRecord | None, PendingRequest | None]]:
        with self._lock:
            self._check_open()
            found: list[tuple[CertRecord | None, PendingRequest | None]] = []
            for key in keys:
                serial = self._txids.get(key)
                request_id = self._pending_txids.get(key)
                found.append((None if serial is None else self._certs[serial],
                              None if request_id is None else self._pending[request_id]))
            return found

    def commit(
        self, records: Sequence[CertRecord], challenges: Sequence[bytes | None] = (),
        notices: Sequence[Notice] = (), renewals: Sequence[Renewal | None] = (),
    ) -> list[CommitOutcome]:
        presented = commit_challenges(records, challenges)
        renewing = commit_renewals(records, renewals)
        check_notices(notices)
        with self._lock:
            self._check_open()
            # Work on copies so that a failure in the middle leaves nothing behind.
            certs = dict(self._certs)
            txids = dict(self._txids)
            kept = dict(self._challenges)
            outcomes: list[CommitOutcome] = []

            def take_use(digest: bytes, issued_at: float) -> bool:
                challenge = kept.get(digest)
                if challenge is None or not usable(challenge, issued_at):
                    return False
                kept[digest] = spent(challenge)
                return True

            for record, digest, renewal in zip(records, presented, renewing, strict=True):
                key = (record.transaction_id, record.requester_key_sha256)
                serial = txids.get(key)
                holder = None if serial is None else certs[serial]
                renewed = None if renewal is None else certs.get(renewal.serial)
                refused = refusal_of(record, digest, holder, certs.__contains__, take_use,
                                     renewal, renewed)
                if refused is not None:
                    outcomes.append(refused)
                else:
                    certs[record.serial] = record
                    txids[key] = record.serial
                    revoked = replaced(record, renewal, renewed)
                    if revoked is not None:
                        certs[revoked.serial] = revoked
                    outcomes.append(Recorded(record))
            outbox = self._with_notices(notices_to_write(notices, outcomes))
            self._certs, self._txids, self._challenges = certs, txids, kept
            self._outbox = outbox
            return outcomes

    def _with_notices(self, notices: Sequence[Notice]) -> dict[bytes, Notice]:
        """A copy of the outbox with ``notices`` added; an id on record already is refused."""
        outbox = dict(self._outbox)
        for notice in notices:
            if notice.notice_id in outbox:
                raise LedgerError(f"notice {notice.notice_id.hex()} is in the outbox already")
            outbox[notice.notice_id] = notice
        return outbox

    def add_notices(self, notices: Sequence[Notice]) -> None:
        check_notices(notices)
        with self._lock:
            self._check_open()
            self._outbox = self._with_notices(notices)

    def claim_notices(self, now: float, limit: int, lease_seconds: float) -> list[Notice]:
        check_claim(now, limit, lease_seconds)
        with self._lock:
            self._check_open()
            due = sorted((n for n in self._outbox.values() if n.next_attempt_at <= now),
                         key=due_order)[:limit]
            claimed = [dataclasses.replace(n, next_attempt_at=now + lease_seconds) for n in due]
            for notice in claimed:
                self._outbox[notice.notice_id] = notice
            return claimed

    def settle_notices(self, delivered: Sequence[bytes] = (),
                       retries: Sequence[NoticeRetry] = ()) -> None:
        check_retries(retries)
        with self._lock:
            self._check_open()
            for notice_id in delivered:
                self._outbox.pop(notice_id, None)
            for notice_id, attempts, next_attempt_at in retries:
                notice = self._outbox.get(notice_id)
                if notice is not None:
                    self._outbox[notice_id] = dataclasses.replace(
                        notice, attempts=attempts, next_attempt_at=next_attempt_at)

    def count_notices(self) -> int:
        with self._lock:
            self._check_open()
            return len(self._outbox)

    def iter_notices(self) -> Iterator[Notice]:
        """Every notice in the outbox, in ``notice_id`` order (beyond the protocol)."""
        with self._lock:
            self._check_open()
            notices = [self._outbox[notice_id] for notice_id in sorted(self._outbox)]
        yield from notices

    def get(self, serial: int) -> CertRecord | None:
        with self._lock:
            self._check_open()
            return self._certs.get(serial)

    def iter_records(self) -> Iterator[CertRecord]:
        with self._lock:
            self._check_open()
            records = [self._certs[serial] for serial in sorted(self._certs)]
        yield from records

    def count(self) -> int:
        with self._lock:
            self._check_open()
            return len(self._certs)

    def revoke(self, serial: int, reason: int, when: float,
               notices: Sequence[Notice] = ()) -> CertRecord:
        check_revocation_reason(reason)
        if not is_time(when):
            raise ValueError("when must be epoch seconds")
        check_notices(notices)
        with self._lock:
            self._check_open()
            record = self._certs.get(serial)
            if record is None:
                raise NotFound(f"no certificate with serial {serial:x}")
            if record.status == "revoked":
                return record
            revoked = dataclasses.replace(
                record, status="revoked", revoked_at=when, revocation_reason=reason
            )
            self._outbox = self._with_notices(notices)
            self._certs[serial] = revoked
            return revoked

    def count_revoked(self) -> int:
        with self._lock:
            self._check_open()
            return sum(1 for r in self._certs.values() if r.status == "revoked")

    def iter_revoked(self) -> Iterator[CertRecord]:
        with self._lock:
            self._check_open()
            records = [
                self._certs[serial]
                for serial in sorted(self._certs)
                if self._certs[serial].status == "revoked"
            ]
        yield from records

    def add_pending(self, p: PendingRequest, challenge: bytes | None = None) -> PendingRequest:
        check_pending(p, challenge)
        with self._lock:
            self._check_open()
            key = (p.transaction_id, p.requester_key_sha256)
            existing = self._pending_txids.get(key)
            if existing is not None:
                return self._pending[existing]
            if p.request_id in self._pending:
                raise LedgerError(f"request id {p.request_id} is in use")
            if challenge is not None:
                presented = self._challenges.get(challenge)
                if presented is None or not usable(presented, p.received_at):
                    raise ChallengeUsedUp("the challenge is expired or used up")
                self._challenges[challenge] = spent(presented)
            self._pending[p.request_id] = p
            self._pending_txids[key] = p.request_id
            return p

    def find_pending(
        self, transaction_id: str, requester_key_sha256: bytes
    ) -> PendingRequest | None:
        with self._lock:
            self._check_open()
            request_id = self._pending_txids.get((transaction_id, requester_key_sha256))
            return None if request_id is None else self._pending[request_id]

    def get_pending(self, request_id: str) -> PendingRequest | None:
        with self._lock:
            self._check_open()
            return self._pending.get(request_id)

    def iter_pending(self) -> Iterator[PendingRequest]:
        with self._lock:
            self._check_open()
            requests = [self._pending[rid] for rid in sorted(self._pending)]
        yield from requests

    def decide_pending(
        self, request_id: str, status: str, when: float, reason: str = ""
    ) -> PendingRequest:
        check_decision(status, when)
        with self._lock:
            self._check_open()
            request = self._pending.get(request_id)
            if request is None:
                raise NotFound(f"no pending request {request_id}")
            decided = decide(request, status, when, reason)
            self._pending[request_id] = decided
            return decided

    def add_challenge(self, challenge: Challenge) -> None:
        if not isinstance(challenge, Challenge):
            raise TypeError("add_challenge takes a Challenge")
        with self._lock:
            self._check_open()
            if challenge.digest in self._challenges:
                raise LedgerError("a challenge with this digest is on record already")
            self._challenges[challenge.digest] = challenge

    def get_challenge(self, digest: bytes) -> Challenge | None:
        with self._lock:
            self._check_open()
            return self._challenges.get(digest)

    def next_crl_number(self) -> int:
        with self._lock:
            self._check_open()
            self._crl_number += 1
            return self._crl_number

    def bulk_load(self, records: Iterable[CertRecord]) -> int:
        outcomes = self.commit(list(records))
        return sum(isinstance(outcome, Recorded) for outcome in outcomes)

    def close(self) -> None:
        self._closed = True
