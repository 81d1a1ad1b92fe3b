"""An NDES-style challenge page: one-time challenges for MDMs that scrape Microsoft NDES.

Jamf, Fleet, zentral, Okta and other MDMs get a one-time challenge password
from Microsoft NDES by a GET of its admin page (``/certsrv/mscep_admin/``)
and read the password out of the HTML. scep-fast answers that GET on the
admin address or the SCEP address (``ndes.bind``), in the shape those readers
expect, and mints a single-use challenge through ``mint_challenge``, as the
admin API does, so it works on either ledger. ``NdesChallengePage.answer``
builds the whole answer without doing HTTP; each server sends it its own way.

What the readers expect, from their public source:

- zentral (``zentral/contrib/mdm/scep/microsoft_ca.py``, MicrosoftCAChallenge):
  sends Basic credentials with the first request; any status other than 2xx
  is an error; decodes the body with Python's ``utf-16`` codec (the byte-order
  mark decides the order); finds the password with a case-sensitive pattern
  that wants 16 to 32 upper-case letters or digits between ``<B>`` and
  ``</B>``, with exactly one space on each side, after "challenge password is:".
- Fleet (``ee/server/service/scep_proxy.go``, GetNDESSCEPChallenge): its
  transport (go-ntlmssp's Negotiator) first sends the request without
  credentials and adds Basic only after a 401 whose WWW-Authenticate offers
  neither NTLM nor Negotiate; wants 200; decodes UTF-16 big-endian unless a
  byte-order mark says otherwise; takes the run of non-space characters after
  "The enrollment challenge password is: <B> " (any case). When there is no
  password, it looks for "The password cache is full." to tell the operator why.

Hence: UTF-16 little-endian with its byte-order mark (as NDES itself sends),
the password as 32 upper-case hexadecimal digits (NDES's are 16; these carry
128 bits), single spaces around it, and HTTP Basic only (NTLM is not offered).
"""

from __future__ import annotations

import base64
import codecs
import datetime
import hashlib
import hmac
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from scep_fast.protocol import StorageUnavailable
from scep_fast.runtime.ledger_json import epoch_to_iso
from scep_fast.runtime.private_file import PrivateFileError, read_private_file
from scep_fast.service.challenges import MintedChallenge, mint_challenge
from scep_fast.service.ledger import Ledger, LedgerFull, LedgerUnavailable

log = logging.getLogger("scep_fast.ndes")

# Quirk(NDES): IIS matches paths without regard to case, and MDM documents
# name the page with or without its trailing slash, or as mscep.dll under it.
PAGE_PATHS = frozenset({"/certsrv/mscep_admin", "/certsrv/mscep_admin/",
                        "/certsrv/mscep_admin/mscep.dll"})
SECRET_ALPHABET = "0123456789ABCDEF"  # noqa: S105 - the symbols, not a secret
REALM = "scep-fast NDES"
CONTENT_TYPE = "text/html; charset=utf-16"
MIN_PASSWORD_CHARS = 16
# What Fleet looks for when the page carries no password.
CACHE_FULL_TEXT = "The password cache is full."
TEXT_PLAIN = "text/plain; charset=utf-8"
# Every outcome of a GET, for the metric's labels.
OUTCOMES = ("minted", "unauthorised", "ledger_full", "unavailable", "error")


class NdesCredentialsError(ValueError):
    """The credentials file cannot be used; the text says why (never its content)."""


@dataclass(frozen=True, slots=True)
class BasicCredential:
    """SHA-256 of one user name and its password: compared in constant time."""

    user_digest: bytes
    password_digest: bytes


def is_page_path(path: str) -> bool:
    return path.lower() in PAGE_PATHS


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


# Far more than any list of MDM service accounts.
MAX_CREDENTIALS_BYTES = 64 * 1024


def load_credentials(path: Path) -> tuple[BasicCredential, ...]:
    """``USER:PASSWORD`` lines (``#`` comments and blank lines skipped) from a 0600 file."""
    if not path.exists():
        raise NdesCredentialsError(
            f"{path} not found: write one USER:PASSWORD line to it, mode 0600")
    try:
        raw = read_private_file(path, MAX_CREDENTIALS_BYTES)
    except PrivateFileError as e:
        raise NdesCredentialsError(str(e)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise NdesCredentialsError(f"{path} is not UTF-8") from None
    credentials = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        # RFC 7617 section 2: the user-id cannot contain a colon; the password can.
        user, colon, password = line.partition(":")
        if not colon or not user:
            raise NdesCredentialsError(f"{path} line {number}: expected USER:PASSWORD")
        if len(password) < MIN_PASSWORD_CHARS:
            raise NdesCredentialsError(
                f"{path} line {number}: the password must be at least {MIN_PASSWORD_CHARS}"
                " characters")
        credentials.append(BasicCredential(_digest(user), _digest(password)))
    if not credentials:
        raise NdesCredentialsError(f"{path} holds no USER:PASSWORD line")
    return tuple(credentials)


def basic_user(header: str | None, credentials: Collection[BasicCredential]) -> str | None:
    """The user name when ``header`` carries one of ``credentials``, else None.

    Every credential is compared, each in constant time, whatever matched.
    """
    scheme, _, value = (header or "").strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except ValueError:  # binascii.Error and UnicodeDecodeError both are
        return None
    user, colon, password = decoded.partition(":")
    if not colon:
        return None
    user_digest, password_digest = _digest(user), _digest(password)
    matched = False
    for credential in credentials:
        same_user = hmac.compare_digest(user_digest, credential.user_digest)
        same_password = hmac.compare_digest(password_digest, credential.password_digest)
        matched |= same_user & same_password
    return user if matched else None


def _utf16(html: str) -> bytes:
    return codecs.BOM_UTF16_LE + html.encode("utf-16-le")


def _page(title: str, paragraphs: list[str]) -> bytes:
    body = "".join(f"<P>{p}</P>\r\n" for p in paragraphs)
    return _utf16("<HTML><HEAD>\r\n"
                  '<META HTTP-EQUIV="Content-Type" CONTENT="text/html; charset=utf-16">\r\n'
                  f"<TITLE>{title}</TITLE>\r\n</HEAD><BODY>\r\n{body}</BODY></HTML>\r\n")


def challenge_page(secret: str, expires_at: float) -> bytes:
    """The page with a fresh password, in the markup the MDMs above read."""
    until = datetime.datetime.fromtimestamp(expires_at, datetime.UTC)
    return _page("scep-fast: one-time enrollment challenge", [
        f"The enrollment challenge password is: <B> {secret} </B>",
        f"It is good for one enrollment, until {until:%Y-%m-%d %H:%M:%S} UTC.",
    ])


def cache_full_page() -> bytes:
    """No password: the ledger has no room for one (NDES says its cache is full)."""
    return _page("scep-fast: no enrollment challenge", [
        f"{CACHE_FULL_TEXT} The server could not store a new challenge; try again later.",
    ])


@dataclass(frozen=True, slots=True)
class PageAnswer:
    """What to answer a GET of the page, free of any HTTP server."""

    status: int
    content_type: str
    body: bytes
    outcome: str
    headers: dict[str, str] = field(default_factory=dict)
    # Seconds for a Retry-After header (with status 503).
    retry_after: int | None = None


class NdesChallengePage:
    """Who may fetch challenges, and what each fetch mints.

    ``on_outcome`` is told the outcome of every GET (one of OUTCOMES); the
    runtime counts them.
    """

    def __init__(self, ledger: Ledger, profiles: Collection[str],
                 credentials: Collection[BasicCredential], *, ttl_seconds: int,
                 profile: str, on_outcome: Callable[[str], None] = lambda _o: None) -> None:
        if not credentials:
            raise ValueError("the NDES page needs at least one credential")
        self.ledger = ledger
        self.profiles = profiles
        self.credentials = tuple(credentials)
        self.ttl_seconds = ttl_seconds
        self.profile = profile
        self.on_outcome = on_outcome

    def authorised_user(self, header: str | None) -> str | None:
        return basic_user(header, self.credentials)

    def mint(self, now: float, user: str) -> MintedChallenge:
        return mint_challenge(
            self.ledger, now=now, ttl_seconds=self.ttl_seconds, uses=1, profile=self.profile,
            profiles=self.profiles, label=f"ndes:{user}"[:200], alphabet=SECRET_ALPHABET)

    def answer(self, authorization: str | None, client: str, now: float) -> PageAnswer:
        """The answer to one GET: 401, the page with a new challenge, or why there is none.

        Blocking (a ledger write): call it from a thread in async code.
        """
        outcome = self._answer(authorization, client, now)
        self.on_outcome(outcome.outcome)
        return outcome

    def _answer(self, authorization: str | None, client: str, now: float) -> PageAnswer:
        user = self.authorised_user(authorization)
        if user is None:
            # Basic alone: a client that tries NTLM or Negotiate when offered
            # (Fleet's) falls back to Basic only when neither is.
            return PageAnswer(401, TEXT_PLAIN, b"authentication required\n", "unauthorised",
                              {"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'})
        no_store = {"Cache-Control": "no-store"}
        try:
            minted = self.mint(now, user)
        except LedgerFull:
            # Logged and counted by the ledger's on_full hook. Quirk(Fleet):
            # NDES's words for "no room for a password" are what it reports.
            return PageAnswer(200, CONTENT_TYPE, cache_full_page(), "ledger_full", no_store)
        except LedgerUnavailable:
            return PageAnswer(503, TEXT_PLAIN, b"the ledger is unavailable\n", "unavailable",
                              retry_after=StorageUnavailable.DEFAULT_RETRY_AFTER_SECONDS)
        except Exception:  # noqa: BLE001 - our fault; details in the log only
            log.exception("NDES challenge page failed")
            return PageAnswer(500, TEXT_PLAIN, b"internal error\n", "error")
        # Never the secret: who asked, for what, until when.
        log.info("ndes challenge minted", extra={"fields": {
            "user": user, "profile": minted.challenge.profile,
            "expires_at": epoch_to_iso(minted.challenge.expires_at), "client": client}})
        return PageAnswer(200, CONTENT_TYPE,
                          challenge_page(minted.secret, minted.challenge.expires_at),
                          "minted", no_store)
