"""Ledger values for tests: records, pending requests and challenges with few arguments."""

from __future__ import annotations

import hashlib
import json
import secrets
import time

from scep_fast.service.ledger import (
    CertRecord,
    Challenge,
    ChallengeRefused,
    Ledger,
    PendingRequest,
    Recorded,
)
from scep_fast.service.notices import Notice

NOW = 1_750_000_000.0

KEY_A = hashlib.sha256(b"requester A").digest()
KEY_B = hashlib.sha256(b"requester B").digest()


def csr_hash(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def make_record(serial: int, txid: str, *, key: bytes = KEY_A, csr: str = "csr",
                der_size: int = 900, issued_at: float | None = None) -> CertRecord:
    issued_at = time.time() if issued_at is None else issued_at
    return CertRecord(
        serial=serial,
        der=b"\x30\x82" + serial.to_bytes(20, "big") + b"\xa5" * der_size,
        subject=f"CN={txid}.example",
        sans=(f"DNS:{txid}.example", "IP:192.0.2.7"),
        not_before=int(issued_at) - 600,
        not_after=int(issued_at) + 365 * 86400,
        issued_at=issued_at,
        transaction_id=txid,
        requester_key_sha256=key,
        csr_sha256=csr_hash(csr),
        profile="default",
    )


def random_serial() -> int:
    # 16 random octets with the top bit clear, as the issuer makes them.
    return secrets.randbits(127) | 1


def make_pending(request_id: str, txid: str, *, key: bytes = KEY_A, csr: str = "csr",
                 received_at: float = NOW) -> PendingRequest:
    return PendingRequest(
        request_id=request_id,
        transaction_id=txid,
        requester_key_sha256=key,
        csr_sha256=csr_hash(csr),
        csr_der=b"\x30\x82\x02\x00" + csr.encode() * 20,
        subject=f"CN={txid}.example",
        sans=(f"DNS:{txid}.example",),
        profile="default",
        received_at=received_at,
    )


def make_challenge(secret: str, *, uses: int = 1, expires_at: float = NOW + 3600,
                   **changes: object) -> Challenge:
    return Challenge(
        digest=hashlib.sha256(secret.encode()).digest(),
        created_at=NOW - 60,
        expires_at=expires_at,
        uses_left=uses,
        **changes,  # type: ignore[arg-type]
    )


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def spend(ledger: Ledger, challenge: bytes, when: float) -> bool:
    """Whether a certificate recorded at ``when`` for this challenge took a use of it."""
    record = make_record(random_serial(), f"tx-{secrets.token_hex(8)}", issued_at=when)
    (outcome,) = ledger.commit([record], [challenge])
    if isinstance(outcome, ChallengeRefused):
        assert ledger.get(record.serial) is None
        return False
    assert outcome == Recorded(record)
    return True


def make_notice(number: int, *, serial: int | None = None, created_at: float = NOW,
                next_attempt_at: float = 0.0, sink: str = "webhook",
                event: str = "issued") -> Notice:
    """A notice whose id is ``number`` (16 octets), so tests can name and sort them."""
    return Notice(
        notice_id=number.to_bytes(16, "big"),
        sink=sink,
        event=event,
        body=json.dumps({"event": event, "number": number}).encode(),
        created_at=created_at,
        next_attempt_at=next_attempt_at,
        serial=serial,
    )
