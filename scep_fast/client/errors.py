"""Errors of the SCEP client.

Every problem the client meets raises one of these, with a message that says
what was wrong; nothing is dropped silently. A CertRep FAILURE is not an
error of the client: it is a valid, signed answer, returned as such, and
``EnrollResult.raise_for_status()`` turns it into ``EnrollmentRefused``.

    ScepClientError
      TransportError        the HTTP exchange failed (connection, status, type)
      ResponseError         the answer cannot be trusted or understood
        SignatureError      the CertRep is not signed by the expected RA
      EnrollmentRefused     the CA answered FAILURE (or PENDING, when asked)
"""

from __future__ import annotations

from scep_fast.protocol.enums import FailInfo, PKIStatus

__all__ = [
    "EnrollmentRefused",
    "ResponseError",
    "ScepClientError",
    "SignatureError",
    "TransportError",
]


class ScepClientError(Exception):
    """Base of every error the SCEP client raises on purpose."""


class TransportError(ScepClientError):
    """The HTTP exchange failed: no connection, a timeout, a non-200 status."""


class ResponseError(ScepClientError):
    """The server answered, but the answer is malformed or does not match the request."""


class SignatureError(ResponseError):
    """The CertRep's signature does not verify with the RA certificate we expect."""


class EnrollmentRefused(ScepClientError):
    """The CA answered with a signed FAILURE (or a PENDING the caller would not wait for)."""

    def __init__(
        self, status: PKIStatus, fail_info: FailInfo | None, fail_info_text: str | None
    ) -> None:
        self.status = status
        self.fail_info = fail_info
        self.fail_info_text = fail_info_text
        if status is PKIStatus.PENDING:
            text = "the CA answered PENDING"
        else:
            name = fail_info.name if fail_info is not None else "no failInfo"
            text = f"the CA refused the request: {name}"
            if fail_info_text:
                text += f" ({fail_info_text})"
        super().__init__(text)
