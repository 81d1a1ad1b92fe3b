"""The SCEP error hierarchy.

The protocol layer raises these and never answers anything itself. Each
class carries what the runtime needs to answer: ``http_status`` for a plain
HTTP reply, ``fail_info`` for a signed CertRep FAILURE. ``str(error)`` is a
short reason that is safe to send to the client.

    ScepError
      RequestError          no signed reply possible yet: plain HTTP
        MalformedRequest    400
          UnknownOperation  400
        MethodNotAllowed    405
        BodyTooLarge        413
        Overloaded          503 (Retry-After)
          StorageFull       503 (Retry-After): nowhere to record the answer
          StorageUnavailable 503 (Retry-After): the ledger's database cannot be reached
      MessageError          signed CertRep FAILURE, HTTP 200
        BadAlg, BadMessageCheck, BadRequest, BadTime, BadCertId
      InternalError         500, generic body
"""

from __future__ import annotations

from typing import ClassVar

from .enums import FailInfo

__all__ = [
    "MAX_REASON_CHARS",
    "BadAlg",
    "BadCertId",
    "BadMessageCheck",
    "BadRequest",
    "BadTime",
    "BodyTooLarge",
    "InternalError",
    "MalformedRequest",
    "MessageError",
    "MethodNotAllowed",
    "Overloaded",
    "RequestError",
    "ScepError",
    "StorageFull",
    "StorageUnavailable",
    "UnknownOperation",
]

# A reason travels in an HTTP body or a failInfoText: keep it short.
MAX_REASON_CHARS = 200


def _safe_reason(reason: str) -> str:
    """Make a reason fit to send: printable ASCII, one line, bounded.

    Reasons sometimes quote what the client sent (an unknown operation
    name, say); the client must not be able to smuggle control characters
    or a megabyte of text into our reply or our log line through them.
    """
    cleaned = "".join(ch if " " <= ch <= "~" else "?" for ch in reason)
    if len(cleaned) > MAX_REASON_CHARS:
        cleaned = cleaned[: MAX_REASON_CHARS - 3] + "..."
    return cleaned


class ScepError(Exception):
    """Base of every error the SCEP layers raise on purpose."""

    http_status: ClassVar[int | None] = None
    fail_info: ClassVar[FailInfo | None] = None
    default_reason: ClassVar[str] = "SCEP error"

    reason: str
    # What the log may say beyond the reason (a library's own words, say);
    # never sent to the client.
    detail: str

    def __init__(self, reason: str | None = None, *, detail: str = "") -> None:
        self.reason = _safe_reason(self.default_reason if reason is None else reason)
        self.detail = detail
        super().__init__(self.reason)

    def __str__(self) -> str:
        return self.reason


# --- Plain HTTP answers -----------------------------------------------------


class RequestError(ScepError):
    """Nothing we could sign a reply to yet: answer with plain HTTP."""

    http_status = 400
    default_reason = "bad request"


class MalformedRequest(RequestError):
    """A bad query, bad base64, or a pkiMessage that does not parse."""

    http_status = 400
    default_reason = "malformed request"


class UnknownOperation(MalformedRequest):
    """An ``operation`` value that RFC 8894 §4.1 does not define."""

    default_reason = "unknown operation"


class MethodNotAllowed(RequestError):
    """An HTTP method SCEP does not use (RFC 8894 §4.1: GET and POST).

    ``allowed`` is what the runtime should put in the Allow header.
    """

    http_status = 405
    default_reason = "method not allowed"

    allowed: tuple[str, ...]

    def __init__(
        self, reason: str | None = None, *, allowed: tuple[str, ...] = ("GET", "POST")
    ) -> None:
        super().__init__(reason)
        self.allowed = allowed

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_method_not_allowed, (self.reason, self.allowed))


def _rebuild_method_not_allowed(reason: str, allowed: tuple[str, ...]) -> MethodNotAllowed:
    return MethodNotAllowed(reason, allowed=allowed)


class BodyTooLarge(RequestError):
    """The pkiMessage is bigger than the configured limit."""

    http_status = 413
    default_reason = "message too large"


class RequestTimeout(RequestError):
    """The request's body did not arrive in time."""

    http_status = 408
    default_reason = "request body not received in time"


class Overloaded(RequestError):
    """The server is full; the client should come back later."""

    http_status = 503
    default_reason = "server busy, retry later"

    retry_after_seconds: int

    def __init__(self, retry_after_seconds: int, reason: str | None = None) -> None:
        # Retry-After takes a non-negative integer of seconds (RFC 9110 §10.2.3).
        if (
            not isinstance(retry_after_seconds, int)
            or isinstance(retry_after_seconds, bool)
            or retry_after_seconds < 0
        ):
            raise ValueError("retry_after_seconds must be a non-negative int")
        super().__init__(reason)
        self.retry_after_seconds = retry_after_seconds

    def __reduce__(self) -> tuple[object, ...]:
        return (Overloaded, (self.retry_after_seconds, self.reason))


class _Unavailable(Overloaded):
    """A part of the server is out of service, so no answer is given (nothing was recorded).

    Not the client's fault and not a bug: the client is told to come back,
    as for a full queue. ``detail`` says what gave way, for the log only.
    """

    DEFAULT_RETRY_AFTER_SECONDS: ClassVar[int] = 10

    def __init__(self, retry_after_seconds: int | None = None, *, detail: str = "") -> None:
        super().__init__(self.DEFAULT_RETRY_AFTER_SECONDS if retry_after_seconds is None
                         else retry_after_seconds)
        self.detail = detail

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_unavailable, (type(self), self.retry_after_seconds, self.detail))


def _rebuild_unavailable(kind: type[_Unavailable], retry_after_seconds: int,
                         detail: str) -> _Unavailable:
    return kind(retry_after_seconds, detail=detail)


class StorageFull(_Unavailable):
    """The ledger has no room to record the answer: the server is out of room until an
    operator makes some (a larger map size, disk space)."""

    default_reason = "no room to record the request, retry later"
    DEFAULT_RETRY_AFTER_SECONDS: ClassVar[int] = 60


class StorageUnavailable(_Unavailable):
    """The ledger's database cannot be reached now (restarting, out of reach).

    The server reconnects by itself. Whatever was under way is never
    answered as done; a resend finds what the database did record.
    """

    default_reason = "cannot record the request now, retry later"


class KeysUnavailable(_Unavailable):
    """The CA or RA key cannot be used now (its token is gone): nothing is signed or
    recorded while the server waits for its keys."""

    default_reason = "signing keys unavailable, retry later"


# --- Signed CertRep FAILURE ---------------------------------------------------


class MessageError(ScepError):
    """A readable, authenticated request we refuse with a signed FAILURE.

    Never answered with HTTP 4xx/5xx: clients such as iOS only show an
    "unknown problem" for those. The runtime answers 200 with a CertRep
    whose failInfo is ``fail_info`` and whose failInfoText is the reason
    (RFC 8894 §3.3.2.2).
    """

    http_status = None
    fail_info = FailInfo.BAD_REQUEST
    default_reason = "request refused"


class BadAlg(MessageError):
    """badAlg: an algorithm we do not accept (RFC 8894 §3.2.1.4)."""

    fail_info = FailInfo.BAD_ALG
    default_reason = "unsupported algorithm"


class BadMessageCheck(MessageError):
    """badMessageCheck: the CMS signature did not verify (RFC 8894 §3.2.1.4)."""

    fail_info = FailInfo.BAD_MESSAGE_CHECK
    default_reason = "message check failed"


class BadRequest(MessageError):
    """badRequest: not permitted, e.g. a wrong challenge (RFC 8894 §3.2.1.4)."""

    fail_info = FailInfo.BAD_REQUEST
    default_reason = "request not permitted"


class BadTime(MessageError):
    """badTime: signingTime too far from our clock (RFC 8894 §3.2.1.4)."""

    fail_info = FailInfo.BAD_TIME
    default_reason = "message time out of range"


class BadCertId(MessageError):
    """badCertId: no certificate matches the request (RFC 8894 §3.2.1.4)."""

    fail_info = FailInfo.BAD_CERT_ID
    default_reason = "no matching certificate"


# --- Our own fault ------------------------------------------------------------


class InternalError(ScepError):
    """Something on our side broke.

    ``str(error)`` is always the generic reason; ``detail`` is for the log
    only and must never reach the client.
    """

    http_status = 500
    default_reason = "internal error"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail=detail)

    def __reduce__(self) -> tuple[object, ...]:
        return (InternalError, (self.detail,))
