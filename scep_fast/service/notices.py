"""Notifications of what happened to an enrollment, and the outbox entry that carries them.

An event (a certificate issued, a request refused, a certificate revoked) is
described once, as a JSON document (``*_event``), and becomes one
:class:`Notice` per notification sink. Notices are written to the ledger's
outbox in the same durable transaction as what they report (the
certificate, the revocation), and delivered from there at least once, with
retries and back-off, by whichever worker claims them; a worker killed
while delivering leaves its claim to expire and another delivers it. A sink
must therefore accept the same notice twice: ``notice_id`` tells them apart.

The event document is also what the webhook sink POSTs, as it is; its
shape is published in ``docs/webhook.schema.json``.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from scep_fast.service.ledger import CertRecord

__all__ = [
    "EVENTS",
    "Notice",
    "NoticeRejected",
    "Notifier",
    "issued_event",
    "notices_for",
    "refused_event",
    "revoked_event",
]

EVENTS = ("issued", "refused", "revoked")
NOTICE_ID_BYTES = 16
MAX_SINK_CHARS = 64


@dataclass(frozen=True, slots=True)
class Notice:
    """One event on its way to one sink: an outbox entry."""

    notice_id: bytes             # 16 random bytes
    sink: str                    # the notifier it is for: "webhook", "intune"
    event: str                   # one of EVENTS
    body: bytes                  # the event document, JSON (UTF-8)
    created_at: float
    attempts: int = 0            # deliveries tried and failed so far
    next_attempt_at: float = 0.0  # not to be tried before (0: at once)
    # For an "issued" notice: written by a commit only if this serial's record
    # is recorded by that same commit (a resend answered from the ledger, a
    # transactionID conflict, a challenge spent meanwhile: no notice).
    serial: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.notice_id, bytes) or len(self.notice_id) != NOTICE_ID_BYTES:
            raise ValueError(f"notice_id must be {NOTICE_ID_BYTES} bytes")
        if not isinstance(self.sink, str) or not 0 < len(self.sink) <= MAX_SINK_CHARS:
            raise ValueError("sink must be a short non-empty str")
        if self.event not in EVENTS:
            raise ValueError(f"event must be one of {EVENTS}")
        if not isinstance(self.body, bytes):
            raise ValueError("body must be bytes")
        if type(self.attempts) is not int or self.attempts < 0:
            raise ValueError("attempts must be a non-negative int")
        if self.serial is not None and (type(self.serial) is not int or self.serial < 1):
            raise ValueError("serial must be a positive int or None")

    def document(self) -> dict[str, Any]:
        """The event document."""
        doc: dict[str, Any] = json.loads(self.body)
        return doc


class NoticeRejected(Exception):
    """The sink refused the notice for good (a 4xx other than 408/429): retrying
    would not help. The notice is dropped, counted and logged."""


class Notifier(Protocol):
    """Delivers notices to one sink, asynchronously (under trio)."""

    sink: str
    events: frozenset[str]  # the events it wants (Intune has no revocation notice)

    async def deliver(self, notice: Notice) -> None:
        """Returns once the sink has accepted the notice; NoticeRejected when it
        never will; any other exception: try again later."""
        ...


def _b64(der: bytes) -> str:
    return base64.b64encode(der).decode("ascii")


def _document(event: str, at: float, **fields: Any) -> bytes:
    doc = {"event": event, "at": at, **fields}
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def issued_event(record: CertRecord, *, message_type: str, csr_der: bytes, at: float) -> bytes:
    """A certificate was issued and recorded."""
    return _document(
        "issued", at,
        transaction_id=record.transaction_id, message_type=message_type,
        profile=record.profile, subject=record.subject, sans=list(record.sans),
        csr=_b64(csr_der), serial=f"{record.serial:x}", certificate=_b64(record.der),
        not_before=record.not_before, not_after=record.not_after)


def refused_event(*, transaction_id: str, message_type: str, csr_der: bytes,
                  fail_info: str, reason: str, profile: str, at: float) -> bytes:
    """An authenticated enrollment got a FAILURE. ``reason`` is the failInfoText
    the device saw, never a secret."""
    return _document(
        "refused", at,
        transaction_id=transaction_id, message_type=message_type, profile=profile,
        csr=_b64(csr_der), fail_info=fail_info, reason=reason)


def revoked_event(record: CertRecord, *, reason: int, at: float) -> bytes:
    """A certificate was revoked (``reason``: the RFC 5280 CRLReason code)."""
    return _document(
        "revoked", at,
        transaction_id=record.transaction_id, profile=record.profile,
        subject=record.subject, sans=list(record.sans), serial=f"{record.serial:x}",
        certificate=_b64(record.der), revocation_reason=reason)


def notices_for(event: str, body: bytes, sinks: Sequence[str], now: float, *,
                serial: int | None = None) -> list[Notice]:
    """One notice of the event per sink."""
    return [Notice(notice_id=os.urandom(NOTICE_ID_BYTES), sink=sink, event=event, body=body,
                   created_at=now, serial=serial) for sink in sinks]
