"""Operator decisions on requests that waited for approval.

An approval issues the certificate the way a batch does (the same grant,
issue request and record), from the CSR kept with the pending request; the
device receives it at its next CertPoll or resend of the same transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from scep_fast.crypto import IssueRequest
from scep_fast.service.authorization import Authorizer
from scep_fast.service.issuance import cert_record, issue_request
from scep_fast.service.ledger import (
    AlreadyIssued,
    CertRecord,
    Ledger,
    LedgerError,
    NotFound,
    Recorded,
)
from scep_fast.service.notices import Notice


def approve(request_id: str, *, ledger: Ledger, authorizer: Authorizer,
            issue: Callable[[IssueRequest], bytes], clock: Callable[[], float],
            notices: Callable[[CertRecord, bytes], Sequence[Notice]] = lambda _r, _c: ()
            ) -> CertRecord:
    """Issues and records the certificate of a pending request, with ``notices`` of it.

    Raises NotFound, or LedgerError if the request is decided already or its
    certificate could not be recorded.
    """
    pending = ledger.get_pending(request_id)
    if pending is None:
        raise NotFound(f"no pending request {request_id}")
    if pending.status != "pending":
        raise LedgerError(f"request {request_id} is already {pending.status}")
    csr = x509.load_der_x509_csr(pending.csr_der)
    grant = authorizer.approved(pending, csr)
    key_type = "EC" if isinstance(csr.public_key(), ec.EllipticCurvePublicKey) else "RSA"
    now = clock()
    request = issue_request(grant, key_type, csr.subject.public_bytes(), now,
                            csr_der=pending.csr_der)
    record = cert_record(request, issue(request), grant, now=now,
                         transaction_id=pending.transaction_id,
                         requester=pending.requester_key_sha256, csr_sha256=pending.csr_sha256)
    outcome = ledger.commit([record], (), notices(record, pending.csr_der))[0]
    if not isinstance(outcome, Recorded | AlreadyIssued):
        raise LedgerError(f"request {request_id} could not be recorded: {outcome}")
    ledger.decide_pending(request_id, "approved", now)
    return outcome.record
