"""The SCEP operations beyond a first enrollment: renew, poll, GetCert, GetCRL.

Each one talks to the CA through ``ScepTransport`` and verifies the CertRep
against the RA certificate from GetCACert, as ``enroll`` does.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from scep_fast.client.errors import ResponseError
from scep_fast.client.http import DEFAULT_TIMEOUT_SECONDS, ScepTransport
from scep_fast.client.messages import (
    CertRep,
    DeviceKey,
    PkiRequest,
    build_cert_poll,
    build_get_cert,
    build_get_crl,
    build_renewal_req,
    build_signer_certificate,
    generate_key,
    parse_cert_rep,
)
from scep_fast.protocol import PKIStatus


def _issuing_ca(
        transport: ScepTransport) -> tuple[x509.Certificate, x509.Certificate, x509.Certificate]:
    """The RA, the issuing CA and the reply signer from GetCACert.

    In CA mode all three are one certificate; with an NDES-style RA pair the
    RA is the encryption RA and the signer the signing RA.
    """
    certs = transport.get_ca_cert()
    return certs.ra, certs.ca if certs.ca is not None else certs.ra, certs.signer


def _exchange(transport: ScepTransport, request: PkiRequest, use_get: bool,
              signer: x509.Certificate) -> CertRep:
    answer = transport.pki_operation(request.message, use_get=use_get)
    return parse_cert_rep(answer, request, ra_certs=[signer])


def renew(url: str, old_cert: x509.Certificate, old_key: rsa.RSAPrivateKey, *,
          new_key: DeviceKey | None = None, use_get: bool = False,
          timeout: float = DEFAULT_TIMEOUT_SECONDS) -> tuple[PkiRequest, CertRep]:
    """A RenewalReq signed with the certificate being renewed; ``new_key`` None keeps the key."""
    transport = ScepTransport(url, timeout=timeout)
    caps = transport.get_ca_caps()
    if not caps.renewal:
        raise ResponseError("the CA does not advertise Renewal")
    ra, _, signer = _issuing_ca(transport)
    cns = old_cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    request = build_renewal_req(ra, old_cert=old_cert, old_key=old_key,
                                cn=str(cns[-1].value) if cns else "",
                                key=new_key if new_key is not None else old_key,
                                digest=caps.digest, cipher=caps.cipher)
    return request, _exchange(transport, request, use_get or not caps.post, signer)


def poll(url: str, request: PkiRequest, *, wait_seconds: float, interval_seconds: float = 5.0,
         use_get: bool = False, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> CertRep:
    """CertPoll for ``request`` until it is decided or ``wait_seconds`` have passed."""
    transport = ScepTransport(url, timeout=timeout)
    _, ca, signer = _issuing_ca(transport)
    deadline = time.monotonic() + wait_seconds
    while True:
        reply = _exchange(transport, build_cert_poll(request, ca), use_get, signer)
        if reply.status is not PKIStatus.PENDING or time.monotonic() >= deadline:
            return reply
        time.sleep(min(interval_seconds, max(0.0, deadline - time.monotonic())))


def _throwaway_signer() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = generate_key()
    assert isinstance(key, rsa.RSAPrivateKey)  # noqa: S101 - the default kind is RSA
    return key, build_signer_certificate(key, "scep-fast query")


def _query(url: str, build: Callable[..., PkiRequest], serial: int, use_get: bool,
           timeout: float) -> CertRep:
    transport = ScepTransport(url, timeout=timeout)
    ra, ca, reply_signer = _issuing_ca(transport)
    key, signer = _throwaway_signer()
    request = build(ra, issuer=ca.subject, serial=serial, signer_key=key, signer_cert=signer)
    return _exchange(transport, request, use_get, reply_signer)


def get_cert(url: str, serial: int, *, use_get: bool = False,
             timeout: float = DEFAULT_TIMEOUT_SECONDS) -> CertRep:
    """GetCert (RFC 8894 section 3.3.4): the certificate our CA issued with ``serial``."""
    return _query(url, build_get_cert, serial, use_get, timeout)


def get_crl(url: str, *, serial: int = 1, use_get: bool = False,
            timeout: float = DEFAULT_TIMEOUT_SECONDS) -> CertRep:
    """GetCRL (RFC 8894 section 3.3.5): the current CRL of the CA."""
    return _query(url, build_get_crl, serial, use_get, timeout)
