"""`scep-fast ledger copy`: one ledger's contents into another, empty one, checked.

From LMDB into PostgreSQL (to grow past one node) or back. Everything is
copied: certificates with their status and the transaction each holds,
pending requests with their decisions, challenges with their remaining uses,
the notices waiting in the outbox (undelivered events, with their attempts
and when each is due; a lease held in the source carries over as that time),
and the CRL number (so that the target's CRLs go on from where the source's
were). Certificates go in the order they were issued, through the target's
own ``commit``: the rules then give every transaction to the same certificate
as in the source (a certificate revoked or expired before its transaction was
taken again is recorded first).

The copy is checked by a :class:`Summary` of each side: the counts and a
SHA-256 over every record, the serial holding its transaction, every pending
request, every challenge and every notice, in a fixed order and encoding (the LMDB value
formats). The source must not be written to meanwhile (stop the servers).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from scep_fast.runtime.ledger_lmdb_codec import (
    encode_challenge,
    encode_notice,
    encode_pending,
    encode_record,
    serial_key,
)
from scep_fast.service.ledger import Challenge, Ledger, LedgerError, PendingRequest, Recorded
from scep_fast.service.notices import Notice

__all__ = ["CopyRefused", "CopyableLedger", "Summary", "copy_ledger", "summarize"]

_CHUNK = 500


class CopyableLedger(Ledger, Protocol):
    """A durable ledger: the port and what a copy needs beyond it."""

    def last_crl_number(self) -> int: ...

    def advance_crl_number(self, at_least: int) -> None: ...

    def iter_challenges(self) -> Iterator[Challenge]: ...

    def iter_notices(self) -> Iterator[Notice]: ...


class CopyRefused(LedgerError):
    """The copy cannot be made (a target that is not empty), or did not come out equal."""


@dataclass(frozen=True, slots=True)
class Summary:
    certificates: int
    revoked: int
    pending: int
    challenges: int
    notices: int
    crl_number: int
    sha256: str

    def line(self) -> str:
        return (f"{self.certificates} certificates ({self.revoked} revoked), {self.pending} "
                f"pending requests, {self.challenges} challenges, {self.notices} notices, "
                f"CRL number {self.crl_number}, sha256 {self.sha256}")


def summarize(ledger: CopyableLedger) -> Summary:
    """Counts and a digest of everything in ``ledger``."""
    digest = hashlib.sha256()
    certificates = revoked = 0
    batch: list[tuple[str, bytes]] = []
    serials: list[int] = []

    def holders() -> None:
        # Which serial holds each record's transaction: the same on both sides.
        for serial, (holder, _pending) in zip(serials, ledger.find_transactions(batch),
                                              strict=True):
            digest.update(b"holder" + serial_key(serial) +
                          (b"-" if holder is None else serial_key(holder.serial)))
        batch.clear()
        serials.clear()

    for record in ledger.iter_records():
        certificates += 1
        revoked += record.status == "revoked"
        value = encode_record(record)
        digest.update(b"cert" + len(value).to_bytes(4, "big") + value)
        batch.append((record.transaction_id, record.requester_key_sha256))
        serials.append(record.serial)
        if len(batch) >= _CHUNK:
            holders()
    holders()
    pending = 0
    for request in ledger.iter_pending():
        pending += 1
        value = encode_pending(request)
        digest.update(b"pending" + request.request_id.encode() + len(value).to_bytes(4, "big")
                      + value)
    challenges = 0
    for challenge in ledger.iter_challenges():
        challenges += 1
        value = encode_challenge(challenge)
        digest.update(b"challenge" + challenge.digest + len(value).to_bytes(4, "big") + value)
    notices = 0
    for notice in ledger.iter_notices():
        notices += 1
        value = encode_notice(notice)
        digest.update(b"notice" + notice.notice_id + len(value).to_bytes(4, "big") + value)
    crl_number = ledger.last_crl_number()
    digest.update(b"crl" + crl_number.to_bytes(8, "big"))
    return Summary(certificates, revoked, pending, challenges, notices, crl_number,
                   digest.hexdigest())


def _is_empty(ledger: CopyableLedger) -> bool:
    return (ledger.count() == 0 and next(iter(ledger.iter_pending()), None) is None
            and next(iter(ledger.iter_challenges()), None) is None
            and ledger.count_notices() == 0
            and ledger.last_crl_number() == 0)


def copy_ledger(source: CopyableLedger, target: CopyableLedger) -> tuple[Summary, Summary]:
    """Copies ``source`` into the empty ``target``; the summaries of both, equal.

    :class:`CopyRefused` for a target that is not empty, or when the two
    summaries differ afterwards (then the target holds a partial copy: empty
    it before trying again).
    """
    if not _is_empty(target):
        raise CopyRefused("the target ledger is not empty; a copy goes into an empty one")
    before = summarize(source)
    # Issue order: (issued_at, serial) of every record, then each record.
    order = sorted((record.issued_at, record.serial) for record in source.iter_records())
    for start in range(0, len(order), _CHUNK):
        chunk = []
        for _issued_at, serial in order[start:start + _CHUNK]:
            record = source.get(serial)
            if record is None:
                raise CopyRefused(f"certificate {serial:x} went away during the copy")
            chunk.append(record)
        for record, outcome in zip(chunk, target.commit(chunk), strict=True):
            if not isinstance(outcome, Recorded):
                raise CopyRefused(f"certificate {record.serial:x} was not recorded: {outcome}")
    for challenge in source.iter_challenges():
        target.add_challenge(challenge)
    for request in source.iter_pending():
        undecided = request if request.status == "pending" else _undecided(request)
        target.add_pending(undecided)
        if request.status != "pending":
            assert request.decided_at is not None
            target.decide_pending(request.request_id, request.status, request.decided_at,
                                  request.reason)
    notices: list[Notice] = []
    for notice in source.iter_notices():
        notices.append(notice)
        if len(notices) >= _CHUNK:
            target.add_notices(notices)
            notices = []
    target.add_notices(notices)
    target.advance_crl_number(source.last_crl_number())
    after = summarize(target)
    if after != before:
        raise CopyRefused(f"the copy differs from its source: source {before.line()}; "
                          f"target {after.line()}")
    return before, after


def _undecided(request: PendingRequest) -> PendingRequest:
    """``request`` as it was before its decision: decide_pending then records the decision."""
    return dataclasses.replace(request, status="pending", decided_at=None, reason="")
