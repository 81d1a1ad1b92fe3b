"""Typed pkiMessage fields: what a request said, and what a CertRep will say.

The crypto layer does the CMS work and hands over raw attribute values;
this module checks them against RFC 8894 and turns them into typed,
immutable values. It never touches a key or a signature.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from .enums import (
    REQUEST_MESSAGE_TYPES,
    ContentCipher,
    DigestAlgorithm,
    FailInfo,
    KeyTransport,
    MessageType,
    PKIStatus,
)
from .errors import BadAlg, InternalError, MalformedRequest, MessageError

__all__ = [
    "MAX_FAIL_INFO_TEXT_BYTES",
    "MAX_NONCE_BYTES",
    "MAX_TRANSACTION_ID_CHARS",
    "MIN_NONCE_BYTES",
    "CertRepParams",
    "ScepRequestMessage",
    "from_raw_attributes",
]

# RFC 8894 §3.2.1.5 asks for 16-byte nonces.
# Quirk(iOS): some older iOS versions send 8 bytes, and the reply must echo
# them unchanged, so 8 is the floor. 64 bounds what we store and echo.
MIN_NONCE_BYTES = 8
MAX_NONCE_BYTES = 64

# Real transaction IDs are hex or base64 of a key hash (32 to 88 characters);
# 128 leaves room for hex SHA-512 and bounds the ledger key.
MAX_TRANSACTION_ID_CHARS = 128

# failInfoText is free text for a human (RFC 8894 §3.2.1.4); keep it short.
MAX_FAIL_INFO_TEXT_BYTES = 512

# The PrintableString alphabet (X.680 §41.4), which RFC 8894 §3.2.1.1
# mandates for transactionID.
_PRINTABLE_STRING = re.compile(r"[A-Za-z0-9 '()+,\-./:=?]+")

# messageType is a PrintableString holding a decimal number (RFC 8894
# §3.2.1.2); ASCII digits only, so that "١٩" is not read as 19.
_DECIMAL = re.compile(r"[0-9]{1,3}")


def _transaction_id_problem(value: str) -> str | None:
    """Why ``value`` is not a valid transactionID, or None (RFC 8894 §3.2.1.1)."""
    if not value:
        return "empty transactionID"
    if len(value) > MAX_TRANSACTION_ID_CHARS:
        return "transactionID too long"
    if _PRINTABLE_STRING.fullmatch(value) is None:
        return "transactionID is not a PrintableString"
    return None


def _nonce_problem(value: bytes, name: str) -> str | None:
    """Why ``value`` is not a usable nonce, or None (RFC 8894 §3.2.1.5)."""
    if not MIN_NONCE_BYTES <= len(value) <= MAX_NONCE_BYTES:
        return f"{name} must be {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} bytes"
    return None


def _require_type(value: object, kind: type, name: str) -> None:
    # Wrong Python types are a programming error, not a client error.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{name} must be {kind.__name__}")


@dataclass(frozen=True, slots=True)
class ScepRequestMessage:
    """The signed attributes and algorithms of a client's pkiMessage.

    Built from what the crypto layer read out of the SignedData and its
    envelope; values a client got wrong raise MalformedRequest, since a
    reply that echoes a broken transactionID or nonce cannot be signed
    meaningfully.
    """

    message_type: MessageType
    transaction_id: str
    sender_nonce: bytes
    digest_algorithm: DigestAlgorithm
    content_cipher: ContentCipher
    key_transport: KeyTransport

    def __post_init__(self) -> None:
        _require_type(self.message_type, MessageType, "message_type")
        _require_type(self.transaction_id, str, "transaction_id")
        _require_type(self.sender_nonce, bytes, "sender_nonce")
        _require_type(self.digest_algorithm, DigestAlgorithm, "digest_algorithm")
        _require_type(self.content_cipher, ContentCipher, "content_cipher")
        _require_type(self.key_transport, KeyTransport, "key_transport")
        # Only the CA sends CertRep (RFC 8894 §3.3.2).
        if self.message_type not in REQUEST_MESSAGE_TYPES:
            raise MalformedRequest(f"messageType {self.message_type.name} is not a request")
        # transactionID is a PrintableString (RFC 8894 §3.2.1.1).
        problem = _transaction_id_problem(self.transaction_id)
        if problem is None:
            # Every request carries a senderNonce (RFC 8894 §3.2.1.5).
            problem = _nonce_problem(self.sender_nonce, "senderNonce")
        if problem is not None:
            raise MalformedRequest(problem)


@dataclass(frozen=True, slots=True)
class CertRepParams:
    """The signed attributes of a CertRep we are about to send (RFC 8894 §3.3.2).

    The fresh senderNonce is not here: it comes from the crypto layer's
    random source when the reply is wrapped. A value that breaks a rule
    is our bug, so violations raise InternalError.
    """

    status: PKIStatus
    transaction_id: str
    recipient_nonce: bytes
    fail_info: FailInfo | None = None
    fail_info_text: str | None = None

    def __post_init__(self) -> None:
        _require_type(self.status, PKIStatus, "status")
        _require_type(self.transaction_id, str, "transaction_id")
        _require_type(self.recipient_nonce, bytes, "recipient_nonce")
        if self.fail_info is not None:
            _require_type(self.fail_info, FailInfo, "fail_info")
        if self.fail_info_text is not None:
            _require_type(self.fail_info_text, str, "fail_info_text")

        # The reply repeats the request's transactionID (RFC 8894 §3.2.1.1)
        # and copies its senderNonce into recipientNonce (RFC 8894 §3.2.1.5).
        problem = _transaction_id_problem(self.transaction_id) or _nonce_problem(
            self.recipient_nonce, "recipientNonce"
        )
        if problem is not None:
            raise InternalError(f"CertRep: {problem}")

        failure = self.status is PKIStatus.FAILURE
        # failInfo is present exactly when pkiStatus is FAILURE (RFC 8894 §3.3.2.2).
        if failure and self.fail_info is None:
            raise InternalError("CertRep: FAILURE needs a failInfo")
        if not failure and self.fail_info is not None:
            raise InternalError("CertRep: failInfo is only for FAILURE")
        # failInfoText accompanies a FAILURE only (RFC 8894 §3.2.1.4).
        if self.fail_info_text is not None:
            if not failure:
                raise InternalError("CertRep: failInfoText is only for FAILURE")
            text_problem = _fail_info_text_problem(self.fail_info_text)
            if text_problem is not None:
                raise InternalError(f"CertRep: {text_problem}")

    @classmethod
    def reply_to(
        cls,
        request: ScepRequestMessage,
        status: PKIStatus,
        *,
        fail_info: FailInfo | None = None,
        fail_info_text: str | None = None,
    ) -> CertRepParams:
        """The parameters of a reply to ``request`` with the given status."""
        return cls(
            status=status,
            transaction_id=request.transaction_id,
            recipient_nonce=request.sender_nonce,
            fail_info=fail_info,
            fail_info_text=fail_info_text,
        )

    @classmethod
    def failure(cls, request: ScepRequestMessage, error: MessageError) -> CertRepParams:
        """A FAILURE reply to ``request`` that reports ``error``.

        The failInfo comes from the error class, the failInfoText from its
        reason (already short and printable).
        """
        fail_info = error.fail_info if error.fail_info is not None else FailInfo.BAD_REQUEST
        return cls.reply_to(
            request,
            PKIStatus.FAILURE,
            fail_info=fail_info,
            fail_info_text=error.reason or None,
        )


def _fail_info_text_problem(text: str) -> str | None:
    # failInfoText is a UTF8String (RFC 8894 §3.2.1.4).
    if not text:
        return "empty failInfoText (leave it out instead)"
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError:
        return "failInfoText is not encodable as UTF-8"
    if len(encoded) > MAX_FAIL_INFO_TEXT_BYTES:
        return "failInfoText too long"
    return None


_E = TypeVar("_E", bound=StrEnum)


def _algorithm(kind: type[_E], value: _E | str, what: str) -> _E:
    if isinstance(value, kind):
        return value
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str")
    try:
        return kind(value.lower())
    except ValueError:
        # The client used something we do not implement: a signed badAlg
        # refusal, not a dropped connection (RFC 8894 §3.2.1.4).
        raise BadAlg(f"unsupported {what} {value!r}") from None


def _message_type(raw: str | int | bytes) -> MessageType:
    if isinstance(raw, bool):
        raise TypeError("message_type must be str, int or bytes")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("ascii")
        except UnicodeDecodeError:
            raise MalformedRequest("messageType is not a decimal number") from None
    if isinstance(raw, str):
        # messageType is a PrintableString of decimal digits (RFC 8894 §3.2.1.2).
        if _DECIMAL.fullmatch(raw) is None:
            raise MalformedRequest("messageType is not a decimal number")
        number = int(raw)
    elif isinstance(raw, int):
        number = raw
    else:
        raise TypeError("message_type must be str, int or bytes")
    try:
        # Whether the type is one a client may send is checked by
        # ScepRequestMessage itself.
        return MessageType(number)
    except ValueError:
        raise MalformedRequest(f"unknown messageType {number}") from None


def from_raw_attributes(
    message_type: str | int | bytes,
    transaction_id: bytes | str,
    sender_nonce: bytes,
    *,
    digest_algorithm: DigestAlgorithm | str,
    content_cipher: ContentCipher | str,
    key_transport: KeyTransport | str,
) -> ScepRequestMessage:
    """Turn raw signed-attribute values into a typed request message.

    ``message_type`` is the messageType PrintableString ("19"), its content
    octets, or the number; ``transaction_id`` the transactionID content
    octets (or text); ``sender_nonce`` the senderNonce OCTET STRING content.
    Algorithm names are the values of the enums in ``enums``, in any case.

    Raises MalformedRequest when an attribute breaks RFC 8894, and BadAlg
    when every attribute is fine but an algorithm is one we do not know:
    the caller can then still answer with a signed FAILURE.
    """
    typed_message_type = _message_type(message_type)

    if isinstance(transaction_id, bytes):
        try:
            transaction_id = transaction_id.decode("ascii")
        except UnicodeDecodeError:
            raise MalformedRequest("transactionID is not a PrintableString") from None
    if not isinstance(transaction_id, str):
        raise TypeError("transaction_id must be bytes or str")
    _require_type(sender_nonce, bytes, "sender_nonce")
    problem = _transaction_id_problem(transaction_id) or _nonce_problem(sender_nonce, "senderNonce")
    if problem is not None:
        raise MalformedRequest(problem)

    return ScepRequestMessage(
        message_type=typed_message_type,
        transaction_id=transaction_id,
        sender_nonce=sender_nonce,
        digest_algorithm=_algorithm(DigestAlgorithm, digest_algorithm, "digest"),
        content_cipher=_algorithm(ContentCipher, content_cipher, "content cipher"),
        key_transport=_algorithm(KeyTransport, key_transport, "key transport"),
    )
