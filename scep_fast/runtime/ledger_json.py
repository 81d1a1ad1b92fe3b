"""What the command line and the admin API print for ledger values, as JSON objects."""

from __future__ import annotations

import datetime

from scep_fast.service.ledger import REVOCATION_REASONS, CertRecord, PendingRequest

__all__ = ["epoch_to_iso", "pending_to_json", "record_to_json"]


def _iso8601_utc(epoch_seconds: float, *, fraction: bool) -> str:
    moment = datetime.datetime.fromtimestamp(epoch_seconds, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds" if fraction else "seconds").replace(
        "+00:00", "Z"
    )


def record_to_json(record: CertRecord) -> dict[str, object]:
    """The JSON object ``scep-fast certs list --json`` prints for a record.

    The serial is lower-case hex without a prefix; times are ISO 8601 in UTC
    with a ``Z`` suffix (``issued_at`` and ``revoked_at`` to the
    millisecond). ``revoked_at`` and ``revocation_reason`` (the RFC 5280
    name, such as ``"keyCompromise"``) are null unless revoked. The DER is
    left out: ``certs show`` prints the certificate itself.
    """
    revoked = record.revoked_at is not None
    return {
        "serial": format(record.serial, "x"),
        "subject": record.subject,
        "sans": list(record.sans),
        "not_before": _iso8601_utc(record.not_before, fraction=False),
        "not_after": _iso8601_utc(record.not_after, fraction=False),
        "issued_at": _iso8601_utc(record.issued_at, fraction=True),
        "status": record.status,
        "revoked_at": (
            None if record.revoked_at is None
            else _iso8601_utc(record.revoked_at, fraction=True)
        ),
        "revocation_reason": (
            REVOCATION_REASONS[record.revocation_reason] if revoked else None
        ),
        "transaction_id": record.transaction_id,
        "profile": record.profile,
        "requester_key_sha256": record.requester_key_sha256.hex(),
        "csr_sha256": record.csr_sha256.hex(),
    }


def epoch_to_iso(epoch: float | None) -> str | None:
    """``epoch`` as ISO 8601 in UTC with a ``Z`` suffix (to the microsecond); None stays None."""
    if epoch is None:
        return None
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat().replace("+00:00", "Z")


def pending_to_json(p: PendingRequest) -> dict[str, object]:
    """The JSON object ``requests list --json`` and the admin API show for a request."""
    return {"request_id": p.request_id, "status": p.status, "subject": p.subject,
            "sans": list(p.sans), "profile": p.profile, "transaction_id": p.transaction_id,
            "received_at": epoch_to_iso(p.received_at), "decided_at": epoch_to_iso(p.decided_at),
            "reason": p.reason}
