"""From HTTP method, raw query and body to a typed SCEP request.

``parse_request`` is the whole interface: it returns one of the frozen
request types below or raises a ScepError subclass whose ``http_status``
says how the runtime should answer. It never does HTTP itself.

Decisions, with the reasons:

- The query is split on ``&`` by hand, before any decoding, because form
  decoding turns the ``+`` of base64 into a space (RFC 8894 §4.1 asks for
  base64 that is then URI-escaped; many clients escape only part of it).
- Parameter names are matched exactly: ``operation`` and ``message``, as
  RFC 8894 §4.1 spells them. The operation *value* is matched without
  regard to case: the four names stay distinct when folded, and a
  hand-typed ``operation=getcacert`` is better answered than refused.
  Real clients send exactly ``GetCACaps``, ``GetCACert``, ``GetNextCACert``
  and ``PKIOperation``.
- A parameter given twice is refused: two values for ``operation`` or for
  ``message`` are ambiguous, and guessing invites request smuggling.
- GetCACaps, GetCACert and GetNextCACert are read-only, so GET, POST and
  HEAD all work (HEAD parses as GET; the runtime sends no body). RFC 8894
  §3.5.1 and §4.2 use GET; accepting POST costs nothing.
- PKIOperation creates state, so HEAD is refused with 405 and
  ``allowed=("GET", "POST")`` (RFC 8894 §4.1). HTTP methods are
  case-sensitive (RFC 9110 §9.1): ``get`` is not GET.
- No check that the message is DER: that is the crypto layer's job, and
  BER from BouncyCastle-based clients must reach it untouched.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from typing import ClassVar, TypeAlias
from urllib.parse import unquote_to_bytes

from .enums import Operation
from .errors import BodyTooLarge, MalformedRequest, MethodNotAllowed, UnknownOperation

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_CA_IDENT_CHARS",
    "GetCACaps",
    "GetCACert",
    "GetNextCACert",
    "PKIOperation",
    "ScepRequest",
    "parse_request",
]

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024
MAX_CA_IDENT_CHARS = 1024

_OPERATION_PARAM = b"operation"
_MESSAGE_PARAM = b"message"
_PKI_OPERATION_METHODS = ("GET", "POST")
_READ_ONLY_METHODS = ("GET", "POST", "HEAD")

_OPERATIONS_BY_FOLDED_NAME = {op.value.casefold(): op for op in Operation}

# White space that wrapped base64 carries: 64-column lines broken with
# LF or CRLF (often sent as %0A / %0D%0A), tabs from pasted text. The space
# itself is not here: in a query it stands for a "+" (see below).
_BASE64_WHITESPACE = b"\t\n\v\f\r"
# Quirk(various): URL-safe base64 ("-" and "_", RFC 4648 §5) from clients
# that avoid escaping; both map back to the standard alphabet.
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")


# --- Request types --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _CaIdentRequest:
    """A read-only request that names a CA with a free-form ``message``."""

    operation: ClassVar[Operation]

    ca_ident: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.ca_ident, str):
            raise TypeError("ca_ident must be str")
        # The CA-IDENT is free text (RFC 8894 §4.2) but it may well be
        # logged: keep it bounded and free of control characters.
        if len(self.ca_ident) > MAX_CA_IDENT_CHARS:
            raise MalformedRequest("CA name too long")
        if not self.ca_ident.isprintable():
            raise MalformedRequest("CA name contains control characters")


@dataclass(frozen=True, slots=True)
class GetCACaps(_CaIdentRequest):
    """GetCACaps: which capabilities the CA has (RFC 8894 §3.5.1)."""

    operation: ClassVar[Operation] = Operation.GET_CA_CAPS


@dataclass(frozen=True, slots=True)
class GetCACert(_CaIdentRequest):
    """GetCACert: the CA (and RA) certificates (RFC 8894 §4.2)."""

    operation: ClassVar[Operation] = Operation.GET_CA_CERT


@dataclass(frozen=True, slots=True)
class GetNextCACert(_CaIdentRequest):
    """GetNextCACert: the rollover CA certificate (RFC 8894 §4.7)."""

    operation: ClassVar[Operation] = Operation.GET_NEXT_CA_CERT


@dataclass(frozen=True, slots=True)
class PKIOperation:
    """PKIOperation: a pkiMessage, as sent, for the crypto layer (RFC 8894 §4.3).

    ``message`` is the CMS SignedData bytes exactly as the client sent them
    (after base64 decoding for GET); ``via_get`` says which transport.
    """

    operation: ClassVar[Operation] = Operation.PKI_OPERATION

    message: bytes
    via_get: bool

    def __post_init__(self) -> None:
        if not isinstance(self.message, bytes):
            raise TypeError("message must be bytes")
        if not isinstance(self.via_get, bool):
            raise TypeError("via_get must be bool")
        if not self.message:
            raise MalformedRequest("empty PKIOperation message")


ScepRequest: TypeAlias = GetCACaps | GetCACert | GetNextCACert | PKIOperation


# --- Parsing ----------------------------------------------------------------------


def parse_request(
    method: str,
    raw_query: bytes,
    body: bytes,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> ScepRequest:
    """Parse one SCEP HTTP request.

    ``raw_query`` is the query string exactly as received, without the
    ``?`` (ASGI's ``query_string``). ``max_message_bytes`` bounds the
    pkiMessage, for GET after base64 decoding.

    Raises MethodNotAllowed (405), MalformedRequest or UnknownOperation
    (400) and BodyTooLarge (413); nothing else for any bytes received.
    """
    if not isinstance(method, str):
        raise TypeError("method must be str")
    if not isinstance(raw_query, bytes) or not isinstance(body, bytes):
        raise TypeError("raw_query and body must be bytes")
    if (
        not isinstance(max_message_bytes, int)
        or isinstance(max_message_bytes, bool)
        or max_message_bytes < 1
    ):
        raise ValueError("max_message_bytes must be a positive int")

    # SCEP uses GET and POST only (RFC 8894 §4.1); HEAD is a body-less GET
    # for the read-only operations.
    if method not in _READ_ONLY_METHODS:
        raise MethodNotAllowed(allowed=_READ_ONLY_METHODS)

    params = _split_query(raw_query)
    operation = _operation(params)

    if operation is Operation.PKI_OPERATION:
        if method == "POST":
            return _pki_operation_from_post(body, max_message_bytes)
        if method == "GET":
            return _pki_operation_from_get(params, max_message_bytes)
        raise MethodNotAllowed("PKIOperation needs GET or POST", allowed=_PKI_OPERATION_METHODS)

    ca_ident = _ca_ident(params)
    if operation is Operation.GET_CA_CAPS:
        return GetCACaps(ca_ident)
    if operation is Operation.GET_CA_CERT:
        return GetCACert(ca_ident)
    return GetNextCACert(ca_ident)


def _split_query(raw_query: bytes) -> dict[bytes, list[bytes]]:
    """Split a raw query into names (form-decoded) and raw, undecoded values."""
    params: dict[bytes, list[bytes]] = {}
    for part in raw_query.split(b"&"):
        if not part:
            continue
        name, _, value = part.partition(b"=")
        params.setdefault(_form_decode(name), []).append(value)
    return params


def _form_decode(raw: bytes) -> bytes:
    """Ordinary application/x-www-form-urlencoded decoding of one token."""
    return unquote_to_bytes(raw.replace(b"+", b" "))


def _single(params: dict[bytes, list[bytes]], name: bytes) -> bytes | None:
    values = params.get(name)
    if values is None:
        return None
    if len(values) > 1:
        raise MalformedRequest(f"more than one {name.decode()} parameter")
    return values[0]


def _operation(params: dict[bytes, list[bytes]]) -> Operation:
    # Every SCEP request names its operation (RFC 8894 §4.1).
    raw = _single(params, _OPERATION_PARAM)
    if raw is None:
        raise MalformedRequest("missing operation parameter")
    try:
        name = _form_decode(raw).strip().decode("ascii")
    except UnicodeDecodeError:
        raise UnknownOperation("unknown operation") from None
    operation = _OPERATIONS_BY_FOLDED_NAME.get(name.casefold())
    if operation is None:
        raise UnknownOperation(f"unknown operation {name[:40]!r}")
    return operation


def _ca_ident(params: dict[bytes, list[bytes]]) -> str:
    # For everything but PKIOperation, ``message`` is an optional CA name in
    # plain form encoding, not base64 (RFC 8894 §3.5.1, §4.2, §4.7).
    # Quirk(Cisco IOS): sends its trustpoint name here on GetCACert.
    raw = _single(params, _MESSAGE_PARAM)
    if raw is None:
        return ""
    try:
        return _form_decode(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedRequest("CA name is not UTF-8") from None


def _pki_operation_from_post(body: bytes, max_message_bytes: int) -> PKIOperation:
    # With POST the body is the binary pkiMessage itself (RFC 8894 §4.1).
    # Quirk(various): some clients also put a message= in the query, and
    # send any Content-Type or none; both are ignored.
    if not body:
        raise MalformedRequest("empty PKIOperation body")
    if len(body) > max_message_bytes:
        raise BodyTooLarge()
    return PKIOperation(message=body, via_get=False)


def _pki_operation_from_get(
    params: dict[bytes, list[bytes]], max_message_bytes: int
) -> PKIOperation:
    # With GET the pkiMessage is base64, then URI-escaped (RFC 8894 §4.1).
    raw = _single(params, _MESSAGE_PARAM)
    if raw is None:
        raise MalformedRequest("PKIOperation over GET needs a message parameter")
    message = _decode_get_message(raw, max_message_bytes)
    return PKIOperation(message=message, via_get=True)


def _decode_get_message(raw: bytes, max_message_bytes: int) -> bytes:
    """Decode the base64 ``message`` of a GET PKIOperation, in any dialect.

    Accepted, alone or mixed: fully percent-escaped base64; raw ``+`` and
    ``/`` with only ``=`` escaped; ``+`` turned into a space by a form
    encoder on the way; line breaks as raw or escaped CR/LF; the URL-safe
    alphabet; missing ``=`` padding.
    """
    # Percent-decoding only: a raw "+" must stay a "+".
    text = unquote_to_bytes(raw)
    # Quirk(various): a form encoder or proxy on the way turned "+" into a
    # space (raw or %20); base64 has no spaces, so a space is always a "+".
    text = text.replace(b" ", b"+")
    # Quirk(Cisco IOS, sscep): 64-column base64 with %0A line breaks.
    text = text.translate(_URLSAFE_TO_STANDARD, delete=_BASE64_WHITESPACE)
    # Quirk(various): padding left out, or escaped while the rest is not.
    data = text.rstrip(b"=")
    if not data:
        raise MalformedRequest("empty PKIOperation message")
    if b"=" in data:
        raise MalformedRequest("message is not valid base64")
    remainder = len(data) % 4
    if remainder == 1:
        raise MalformedRequest("message is not valid base64")
    # Refuse oversize input before spending time decoding it.
    decoded_size = len(data) // 4 * 3 + (remainder - 1 if remainder else 0)
    if decoded_size > max_message_bytes:
        raise BodyTooLarge()
    padded = data + b"=" * (-len(data) % 4)
    try:
        # strict_mode refuses any byte outside the base64 alphabet.
        return binascii.a2b_base64(padded, strict_mode=True)
    except binascii.Error:
        raise MalformedRequest("message is not valid base64") from None
