"""External validation of an enrollment: what is asked, what comes back.

Between authentication and issuance, a request the local rules grant may be
put to external validators (a webhook of the operator's, Microsoft Intune).
Every validator must allow it; any error, timeout or malformed answer
refuses it (fail closed). The runtime runs validators asynchronously, many
requests at once; this module only describes the exchange.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["ValidationFailed", "ValidationRequest", "Validator", "Verdict"]


@dataclass(frozen=True, slots=True)
class ValidationRequest:
    """One enrollment, as a validator sees it."""

    transaction_id: str
    message_type: str            # "PKCSReq" or "RenewalReq"
    # The PKCS#10 request as the device sent it (it holds the challenge too).
    csr_der: bytes = field(repr=False)
    subject: str                 # the subject the certificate would get (RFC 4514)
    sans: tuple[str, ...]        # the subjectAltNames it would get, as "type:value"
    challenge: str = field(default="", repr=False)  # the challengePassword: a secret, never logged
    signer_der: bytes = field(default=b"", repr=False)  # the certificate that signed it
    profile: str = ""            # the profile the local rules chose
    renewal: bool = False        # signed by a certificate we issued


@dataclass(frozen=True, slots=True)
class Verdict:
    """A validator's answer. ``profile`` empty: keep the one the local rules chose."""

    allow: bool
    reason: str = ""
    profile: str = ""


class ValidationFailed(Exception):
    """The validator could not give a verdict (unreachable, 5xx, bad answer or
    signature, timeout). The request is refused; the text goes to the log only."""


class Validator(Protocol):
    """Something that allows or refuses enrollments, asynchronously (under trio)."""

    name: str  # for metrics and logs: "webhook", "intune"

    async def validate(self, request: ValidationRequest) -> Verdict:
        """The verdict, or ValidationFailed (or any exception: both refuse)."""
        ...
