"""GetCert and GetCRL: answers from what is on record (RFC 8894 sections 3.3.4, 3.3.5)."""

from __future__ import annotations

from collections.abc import Callable

from asn1crypto import cms as asn1_cms
from cryptography import x509

from scep_fast.protocol import BadCertId, BadRequest
from scep_fast.service.ledger import CertRecord, Ledger


def _issuer_and_serial(content: bytes) -> tuple[bytes, int]:
    try:
        parsed = asn1_cms.IssuerAndSerialNumber.load(content)
        return bytes(parsed["issuer"].dump()), int(parsed["serial_number"].native)
    except Exception:  # noqa: BLE001 - any parser error is the request's fault
        raise BadRequest("content is not an IssuerAndSerialNumber") from None


def certificate(ledger: Ledger, content: bytes) -> CertRecord:
    """The certificate an IssuerAndSerialNumber names, or BadCertId."""
    issuer, serial = _issuer_and_serial(content)
    record = ledger.get(serial) if 0 < serial < 1 << 160 else None
    if record is None or \
            x509.load_der_x509_certificate(record.der).issuer.public_bytes() != issuer:
        raise BadCertId("no certificate with this issuer and serial number")
    return record


def crl(source: Callable[[bytes], bytes | None], content: bytes) -> bytes:
    """The current CRL of the issuer of the certificate an IssuerAndSerialNumber names."""
    issuer, _serial = _issuer_and_serial(content)
    found = source(issuer)
    if found is None:
        raise BadCertId("no CRL for this issuer")
    return found
