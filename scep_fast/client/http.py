"""A small blocking SCEP transport over HTTP (RFC 8894 §4) and ``enroll()``.

Only the standard library's ``http.client`` is used: one connection per
request, a timeout on every socket operation, a cap on the answer's size.
Every failure raises a ``ScepClientError`` subclass saying what went wrong.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import ssl
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from scep_fast.client.errors import EnrollmentRefused, ResponseError, TransportError
from scep_fast.client.messages import (
    CACapabilities,
    CACertificates,
    CertRep,
    CipherName,
    DeviceKey,
    DigestName,
    KeyTransportName,
    PkiRequest,
    build_pkcs_req,
    parse_ca_caps,
    parse_ca_certs,
    parse_cert_rep,
)
from scep_fast.protocol.enums import FailInfo, Operation, PKIStatus

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "MAX_RESPONSE_BYTES",
    "EnrollResult",
    "HttpResponse",
    "ScepTransport",
    "enroll",
]

DEFAULT_TIMEOUT_SECONDS = 30.0
# A CertRep with a long chain is a few tens of KiB; anything near this is wrong.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
PKI_MESSAGE_TYPE = "application/x-pki-message"
_USER_AGENT = "scep-fast-client"


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    content_type: str  # the media type, lower case, without parameters
    body: bytes


def _excerpt(body: bytes, limit: int = 120) -> str:
    text = "".join(ch if " " <= ch <= "~" else "?" for ch in body[:limit].decode("latin-1"))
    return text + ("..." if len(body) > limit else "")


class ScepTransport:
    """Sends SCEP operations to one endpoint URL (``http://host:port/scep``)."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        ssl_context: ssl.SSLContext | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        if timeout <= 0:
            raise ValueError("the timeout must be positive")
        self.url = url
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port
        self._path = parts.path or "/"
        self._query = parts.query
        self._timeout = timeout
        self._ssl_context = ssl_context
        self._max_response_bytes = max_response_bytes

    def _target(self, operation: Operation, message: str | None) -> str:
        params = [f"operation={operation.value}"]
        if message is not None:
            # Percent-encode everything outside the unreserved set, so that a
            # base64 "+" is not read as a space and "/" and "=" stay intact.
            params.append("message=" + urllib.parse.quote(message, safe=""))
        query = "&".join(([self._query] if self._query else []) + params)
        return f"{self._path}?{query}"

    def request(
        self, method: str, operation: Operation, message: str | None = None, body: bytes = b""
    ) -> HttpResponse:
        """One HTTP exchange; raises TransportError unless the answer is 200 OK."""
        connection: http.client.HTTPConnection
        if self._scheme == "https":
            connection = http.client.HTTPSConnection(
                self._host, self._port, timeout=self._timeout, context=self._ssl_context
            )
        else:
            connection = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        headers = {"User-Agent": _USER_AGENT, "Accept": "*/*"}
        if method == "POST":
            headers["Content-Type"] = PKI_MESSAGE_TYPE
        target = self._target(operation, message)
        try:
            connection.request(method, target, body=body if method == "POST" else None,
                               headers=headers)
            response = connection.getresponse()
            data = response.read(self._max_response_bytes + 1)
            status = response.status
            content_type = response.getheader("Content-Type") or ""
        except TimeoutError as exc:
            raise TransportError(
                f"{operation.value} to {self.url} timed out after {self._timeout:g} s"
            ) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise TransportError(f"{operation.value} to {self.url} failed: {exc!r}") from exc
        finally:
            connection.close()
        if len(data) > self._max_response_bytes:
            raise TransportError(
                f"{operation.value} answer is larger than {self._max_response_bytes} bytes"
            )
        if status != 200:
            raise TransportError(
                f"{operation.value} to {self.url} answered HTTP {status}: {_excerpt(data)!r}"
            )
        media = content_type.split(";")[0].strip().lower()
        return HttpResponse(status=status, content_type=media, body=data)

    def get_ca_caps(self, ca_ident: str | None = None) -> CACapabilities:
        response = self.request("GET", Operation.GET_CA_CAPS, ca_ident)
        return parse_ca_caps(response.body)

    def get_ca_cert(self, ca_ident: str | None = None) -> CACertificates:
        response = self.request("GET", Operation.GET_CA_CERT, ca_ident)
        if not response.body:
            raise ResponseError("GetCACert answered with an empty body")
        return parse_ca_certs(response.body, response.content_type or None)

    def pki_operation(self, message: bytes, *, use_get: bool = False) -> bytes:
        """Sends a pkiMessage by POST (DER body) or GET (base64 in ``message``)."""
        if use_get:
            response = self.request(
                "GET", Operation.PKI_OPERATION, base64.b64encode(message).decode("ascii")
            )
        else:
            response = self.request("POST", Operation.PKI_OPERATION, body=message)
        if response.content_type != PKI_MESSAGE_TYPE:
            raise ResponseError(
                f"PKIOperation answered with content type {response.content_type!r}, "
                f"not {PKI_MESSAGE_TYPE}"
            )
        return response.body


@dataclass(frozen=True, slots=True)
class EnrollResult:
    """The outcome of ``enroll()``: a certificate, or the CA's signed refusal or deferral."""

    key: DeviceKey
    cert: x509.Certificate | None  # the issued certificate on SUCCESS
    chain: tuple[x509.Certificate, ...]  # the other certificates of the CertRep
    status: PKIStatus
    fail_info: FailInfo | None
    fail_info_text: str | None
    transaction_id: str
    ca_certs: CACertificates
    request: PkiRequest  # keep it to poll a PENDING request (build_cert_poll)
    reply: CertRep

    def raise_for_status(self) -> EnrollResult:
        """Returns self on SUCCESS, else raises EnrollmentRefused."""
        if self.status is not PKIStatus.SUCCESS:
            raise EnrollmentRefused(self.status, self.fail_info, self.fail_info_text)
        return self


def _check_fingerprint(ca_certs: CACertificates, fingerprint: bytes) -> None:
    for cert in ca_certs.certificates:
        digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()
        if hmac.compare_digest(digest, fingerprint):
            return
    raise ResponseError("no GetCACert certificate has the expected SHA-256 fingerprint")


def _check_issued(cert: x509.Certificate, key: DeviceKey, ca_certs: CACertificates) -> None:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if cert.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        raise ResponseError("the issued certificate does not carry the device key")
    issuers = [c for c in ca_certs.certificates if c.subject == cert.issuer]
    if not issuers:
        return  # issued by a CA that GetCACert did not show: nothing to check against
    for issuer in issuers:
        try:
            cert.verify_directly_issued_by(issuer)
            return
        except (ValueError, TypeError, InvalidSignature):
            continue
    raise ResponseError("the issued certificate's signature does not verify with its CA")


def enroll(
    url: str,
    challenge: str | None,
    cn: str,
    *,
    use_get: bool = False,
    key: DeviceKey | None = None,
    sans: Sequence[str] = (),
    digest: DigestName | None = None,
    cipher: CipherName | None = None,
    key_transport: KeyTransportName = "pkcs1v15",
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ca_ident: str | None = None,
    ca_fingerprint: bytes | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> EnrollResult:
    """Enrolls one device: GetCACaps, GetCACert, then a PKCSReq by POST or GET.

    ``digest`` and ``cipher`` default to the strongest the CA advertises. The
    request goes by GET when ``use_get`` is set or the CA does not advertise
    POSTPKIOperation. ``ca_fingerprint`` (SHA-256 of a GetCACert certificate)
    pins the CA, as devices do. On SUCCESS the issued certificate must carry
    the device key and verify with its CA when GetCACert returned it.

    Returns the result for SUCCESS, PENDING and FAILURE alike (see
    ``EnrollResult.raise_for_status``); raises ScepClientError for anything
    that is not a valid, verified answer.
    """
    transport = ScepTransport(url, timeout=timeout, ssl_context=ssl_context)
    caps = transport.get_ca_caps(ca_ident)
    ca_certs = transport.get_ca_cert(ca_ident)
    if ca_fingerprint is not None:
        _check_fingerprint(ca_certs, ca_fingerprint)
    request = build_pkcs_req(
        ca_certs.ra,
        cn=cn,
        challenge=challenge,
        key=key,
        sans=sans,
        digest=digest or caps.digest,
        cipher=cipher or caps.cipher,
        key_transport=key_transport,
    )
    answer = transport.pki_operation(request.message, use_get=use_get or not caps.post)
    reply = parse_cert_rep(answer, request, ra_certs=[ca_certs.signer])
    assert request.device_key is not None  # build_pkcs_req always sets it
    cert: x509.Certificate | None = None
    chain: tuple[x509.Certificate, ...] = ()
    if reply.status is PKIStatus.SUCCESS:
        cert, *rest = reply.certificates
        chain = tuple(rest)
        _check_issued(cert, request.device_key, ca_certs)
    return EnrollResult(
        key=request.device_key,
        cert=cert,
        chain=chain,
        status=reply.status,
        fail_info=reply.fail_info,
        fail_info_text=reply.fail_info_text,
        transaction_id=request.transaction_id,
        ca_certs=ca_certs,
        request=request,
        reply=reply,
    )
