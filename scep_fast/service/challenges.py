"""One-time challenge passwords, as an MDM or an operator mints them.

Only the SHA-256 of a challenge is stored; the secret is shown once, to
whoever minted it. The use count is enforced by the ledger inside one write
transaction per batch, so it holds across every worker process.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string
from collections.abc import Collection
from dataclasses import dataclass

from scep_fast.service.ledger import Challenge, Ledger

MAX_TTL_SECONDS = 366 * 86400
MAX_USES = 1_000_000
MAX_PATTERN_CHARS = 1000
# Letters and digits only: a challengePassword travels as a PrintableString
# for some clients (no "_"), and a secret starting with "-" reads as an option
# on a command line. 32 of 62 symbols: 190 bits, far beyond guessing.
SECRET_ALPHABET = string.ascii_letters + string.digits
SECRET_CHARS = 32


def new_secret(length: int = SECRET_CHARS, alphabet: str = SECRET_ALPHABET) -> str:
    """A random challenge password, of letters and digits unless told otherwise."""
    return "".join(secrets.choice(alphabet) for _ in range(length))


class ChallengeRequestInvalid(ValueError):
    """The request to mint a challenge is not acceptable; the text says why."""


@dataclass(frozen=True, slots=True)
class MintedChallenge:
    secret: str
    challenge: Challenge


def mint_challenge(
    ledger: Ledger,
    *,
    now: float,
    ttl_seconds: int,
    uses: int,
    profile: str,
    profiles: Collection[str],
    subject_pattern: str = "",
    san_pattern: str = "",
    label: str = "",
    alphabet: str = SECRET_ALPHABET,
) -> MintedChallenge:
    """Stores a new challenge and returns it with its secret.

    ``alphabet``: the symbols of the secret, for callers whose readers expect
    fewer (the NDES-style page: upper-case hexadecimal).
    """
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) \
            or not 1 <= ttl_seconds <= MAX_TTL_SECONDS:
        raise ChallengeRequestInvalid(f"ttl_seconds must be 1 to {MAX_TTL_SECONDS}")
    if isinstance(uses, bool) or not isinstance(uses, int) or not 1 <= uses <= MAX_USES:
        raise ChallengeRequestInvalid(f"uses must be 1 to {MAX_USES}")
    if profile not in profiles:
        raise ChallengeRequestInvalid(f"unknown profile {profile!r}")
    for name, pattern in (("subject_pattern", subject_pattern), ("san_pattern", san_pattern)):
        if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN_CHARS:
            raise ChallengeRequestInvalid(f"{name} is a string of at most {MAX_PATTERN_CHARS}"
                                          " characters")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ChallengeRequestInvalid(f"{name}: {e}") from None
    if len(label) > 200:
        raise ChallengeRequestInvalid("label is at most 200 characters")
    secret = new_secret(alphabet=alphabet)
    challenge = Challenge(
        digest=hashlib.sha256(secret.encode()).digest(),
        created_at=now,
        expires_at=now + ttl_seconds,
        uses_left=uses,
        profile=profile,
        subject_pattern=subject_pattern,
        san_pattern=san_pattern,
        label=label,
    )
    ledger.add_challenge(challenge)
    return MintedChallenge(secret, challenge)
