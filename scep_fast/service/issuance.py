"""From a grant to what the native core signs and the ledger records.

One way to build a certificate, whether it is issued at once in a batch or
later by an operator's approval: the names and profile come from a
:class:`~scep_fast.service.authorization.Grant`, the serial from the clock
and the CSPRNG.
"""

from __future__ import annotations

import secrets

from cryptography import x509

from scep_fast.crypto import IssueRequest, Unwrapped
from scep_fast.service.authorization import Grant
from scep_fast.service.ledger import CertRecord
from scep_fast.service.profile import EMPTY_NAME

# A serial number is the issuing millisecond above 96 random bits: well over
# the 64 bits of CSPRNG output RFC 5280 and the CA/Browser Forum ask for,
# positive, 18 octets in DER. The time on top makes each new serial sort after
# every earlier one (and after the 127-bit random serials of older versions),
# so the ledger's tree of records grows at its right edge: a batch's commit
# rewrites a few adjacent pages instead of one page per record scattered over
# the whole file, which is what made commits slow on a large ledger.
SERIAL_RANDOM_BITS = 96


def new_serial(now: float) -> int:
    return (int(now * 1000) << SERIAL_RANDOM_BITS) | secrets.randbits(SERIAL_RANDOM_BITS)


def issue_request(grant: Grant, key_type: str, csr_subject_der: bytes, now: float, *,
                  request: Unwrapped | None = None, csr_der: bytes = b"") -> IssueRequest:
    """The certificate the grant allows, for the CSR of ``request`` (or ``csr_der``)."""
    profile = grant.profile
    not_before, not_after = profile.validity(int(now))
    return IssueRequest(
        serial=new_serial(now),
        not_before=not_before,
        not_after=not_after,
        request=request,
        csr_der=csr_der,
        # Empty: the core keeps the CSR's subject, which saves it a copy.
        subject_der=b"" if grant.subject_der == csr_subject_der else grant.subject_der,
        extensions_der=profile.extensions_der(key_type, grant.san_der,
                                              subject_empty=grant.subject_der == EMPTY_NAME),
    )


def cert_record(issue: IssueRequest, der: bytes, grant: Grant, *, now: float,
                transaction_id: str, requester: bytes, csr_sha256: bytes) -> CertRecord:
    """The ledger's record of a certificate the core issued."""
    return CertRecord(
        serial=issue.serial,
        der=der,
        subject=x509.load_der_x509_certificate(der).subject.rfc4514_string(),
        sans=grant.sans,
        not_before=issue.not_before,
        not_after=issue.not_after,
        issued_at=now,
        transaction_id=transaction_id,
        requester_key_sha256=requester,
        csr_sha256=csr_sha256,
        profile=grant.profile.name,
    )
