"""Exceptions raised by the native core, one per status code of scep_native.h.

Each carries the core's own text followed by OpenSSL's reasons, so a log line
says exactly why a message was refused.
"""

from __future__ import annotations


class NativeError(Exception):
    """A failure reported by the native core."""

    status: int = 0

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    @property
    def summary(self) -> str:
        """The core's own words without OpenSSL's reasons: what a client may read."""
        return self.reason.split(": error:", 1)[0]


class MalformedMessage(NativeError):
    """Not a message we can parse (SCEP_ERR_MALFORMED)."""

    status = 1


class SignatureInvalid(NativeError):
    """The signature or messageDigest check failed (SCEP_ERR_SIGNATURE)."""

    status = 2


class DecryptFailed(NativeError):
    """No key of ours opens the envelope (SCEP_ERR_DECRYPT)."""

    status = 3


class AlgorithmRefused(NativeError):
    """Authenticated, but the request used an algorithm the policy refuses (SCEP_ERR_BAD_ALG)."""

    status = 4


class InvalidArgument(NativeError):
    """The caller passed something the core cannot use (SCEP_ERR_ARGUMENT)."""

    status = 5


class CsrInvalid(NativeError):
    """The certification request is malformed or badly signed (SCEP_ERR_CSR)."""

    status = 6


class NativeInternalError(NativeError):
    """OpenSSL failed where it should not (SCEP_ERR_INTERNAL)."""

    status = 7


_BY_STATUS: dict[int, type[NativeError]] = {
    cls.status: cls
    for cls in (
        MalformedMessage,
        SignatureInvalid,
        DecryptFailed,
        AlgorithmRefused,
        InvalidArgument,
        CsrInvalid,
        NativeInternalError,
    )
}


def error_for(status: int, reason: str) -> NativeError:
    """The exception for a non-zero status code of the native core."""
    return _BY_STATUS.get(status, NativeInternalError)(reason)
