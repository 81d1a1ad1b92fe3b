"""The project's SCEP client (RFC 8894): message building and reading, and a blocking transport.

``messages`` does no I/O: it builds pkiMessages and verifies and opens
CertReps. ``http`` sends them with the standard library and offers
``enroll()``, which the ``scep-fast enroll`` command, the benchmark load
generator and the integration tests use.
"""

from scep_fast.client.errors import (
    EnrollmentRefused,
    ResponseError,
    ScepClientError,
    SignatureError,
    TransportError,
)
from scep_fast.client.http import (
    DEFAULT_TIMEOUT_SECONDS,
    EnrollResult,
    HttpResponse,
    ScepTransport,
    enroll,
)
from scep_fast.client.messages import (
    CACapabilities,
    CACertificates,
    CertRep,
    CipherName,
    DeviceKey,
    DigestName,
    KeyKind,
    KeyTransportName,
    PkiRequest,
    build_cert_poll,
    build_csr,
    build_envelope,
    build_get_cert,
    build_get_crl,
    build_pkcs_req,
    build_pki_message,
    build_renewal_req,
    build_signer_certificate,
    decrypt_envelope,
    generate_key,
    parse_ca_caps,
    parse_ca_certs,
    parse_cert_rep,
    transaction_id_for,
)
from scep_fast.client.operations import get_cert, get_crl, poll, renew

__all__ = [
    "get_cert",
    "get_crl",
    "poll",
    "renew",
    "DEFAULT_TIMEOUT_SECONDS",
    "CACapabilities",
    "CACertificates",
    "CertRep",
    "CipherName",
    "DeviceKey",
    "DigestName",
    "EnrollResult",
    "EnrollmentRefused",
    "HttpResponse",
    "KeyKind",
    "KeyTransportName",
    "PkiRequest",
    "ResponseError",
    "ScepClientError",
    "ScepTransport",
    "SignatureError",
    "TransportError",
    "build_cert_poll",
    "build_csr",
    "build_envelope",
    "build_get_cert",
    "build_get_crl",
    "build_pki_message",
    "build_pkcs_req",
    "build_renewal_req",
    "build_signer_certificate",
    "decrypt_envelope",
    "enroll",
    "generate_key",
    "parse_ca_caps",
    "parse_ca_certs",
    "parse_cert_rep",
    "transaction_id_for",
]
