"""The operator's webhook: a validator of enrollments and a sink of notifications.

Two calls, both a signed JSON POST (shapes in ``docs/webhook.schema.json``,
the calls in ``docs/webhook.openapi.yaml``):

- validation: before issuing, ``WebhookValidator`` posts the request to
  ``url``; the answer, ``{"allow": ..., "reason": ..., "profile": ...}``,
  must be signed by the receiver with the same secret. Anything but a
  well-formed, correctly signed, fresh answer refuses the enrollment (fail
  closed): a forged or altered "allow" must not issue a certificate.
- notification: ``WebhookNotifier`` posts an event document, as the outbox
  stores it, to ``notify_url``. Delivery is at least once; the delivery id
  (the notice id) lets the receiver drop a duplicate.

Signing (both directions): ``X-Scep-Fast-Timestamp`` carries integer Unix
seconds, ``X-Scep-Fast-Delivery`` the message's id, and
``X-Scep-Fast-Signature``
``v1=<hex HMAC-SHA256(secret, timestamp + "." + delivery + "." + body)>``.
The timestamp is inside the MAC and checked against a tolerance, so a
captured message can be replayed only within that window; a validation
answer echoes its request's delivery id, so an "allow" captured for one
request cannot answer another.

Everything here runs under trio, over ``http_client.HttpClient``; each call
is bounded by ``timeout_seconds`` as a whole, not only per network read.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import time
from base64 import b64encode
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import urlsplit

import trio

from scep_fast.runtime.http_client import AnswerTooLarge, HttpClient, HttpError, Response
from scep_fast.service.notices import EVENTS, Notice, NoticeRejected
from scep_fast.service.validation import ValidationFailed, ValidationRequest, Verdict

__all__ = [
    "DELIVERY_HEADER",
    "DeliveryFailed",
    "EVENT_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "WebhookNotifier",
    "WebhookSettings",
    "WebhookValidator",
    "parse_answer",
    "request_document",
    "sign",
    "signed_headers",
    "verify",
]

TIMESTAMP_HEADER = "X-Scep-Fast-Timestamp"
SIGNATURE_HEADER = "X-Scep-Fast-Signature"
DELIVERY_HEADER = "X-Scep-Fast-Delivery"
EVENT_HEADER = "X-Scep-Fast-Event"
SIGNATURE_VERSION = "v1"

BYTES = 1
DEFAULT_TOLERANCE_SECONDS = 300.0
DEFAULT_TIMEOUT_SECONDS = 5.0
DEFAULT_MAX_ANSWER_BYTES = 16 * 1024 * BYTES
# A shorter shared secret is guessable offline from one signed message.
MIN_SECRET_BYTES = 16
MAX_REASON_CHARS = 512
MAX_PROFILE_CHARS = 64
DELIVERY_ID_BYTES = 16

_TIMESTAMP = re.compile(r"[0-9]{1,15}")
_DELIVERY = re.compile(r"[0-9a-f]{1,64}")
_SIGNATURE = re.compile(rf"{SIGNATURE_VERSION}=([0-9a-f]{{64}})")
# Control characters (C0, DEL, C1) in a receiver's text would forge log lines.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def sign(secret: bytes, timestamp: int, delivery: str, body: bytes) -> str:
    """The ``X-Scep-Fast-Signature`` value of ``body`` sent at ``timestamp`` as ``delivery``."""
    signed = str(timestamp).encode("ascii") + b"." + delivery.encode("ascii") + b"." + body
    mac = hmac.new(secret, signed, hashlib.sha256)
    return f"{SIGNATURE_VERSION}={mac.hexdigest()}"


def signed_headers(secret: bytes, body: bytes, now: float, delivery: str) -> dict[str, str]:
    """The three headers that sign a message: the sender's side of :func:`verify`."""
    timestamp = int(now)
    return {
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(secret, timestamp, delivery, body),
        DELIVERY_HEADER: delivery,
    }


def verify(secret: bytes, headers: Mapping[str, str], body: bytes, now: float,
           tolerance: float = DEFAULT_TOLERANCE_SECONDS, *, delivery: str | None = None) -> bool:
    """Whether ``body`` carries a valid signature by ``secret``, made within
    ``tolerance`` seconds of ``now`` (and, when ``delivery`` is given, for that
    delivery id: an answer to our request). Header names are matched
    case-insensitively; a header sent twice (joined with a comma by most HTTP
    libraries) fails."""
    lowered = {name.lower(): value for name, value in headers.items()}
    timestamp_text = lowered.get(TIMESTAMP_HEADER.lower(), "")
    signature_text = lowered.get(SIGNATURE_HEADER.lower(), "")
    delivery_text = lowered.get(DELIVERY_HEADER.lower(), "")
    if not _TIMESTAMP.fullmatch(timestamp_text) or not _SIGNATURE.fullmatch(signature_text) \
            or not _DELIVERY.fullmatch(delivery_text):
        return False
    if delivery is not None and not hmac.compare_digest(delivery_text, delivery):
        return False
    timestamp = int(timestamp_text)
    if abs(now - timestamp) > tolerance:
        return False
    expected = sign(secret, timestamp, delivery_text, body)
    return hmac.compare_digest(expected.encode("ascii"), signature_text.encode("ascii"))


def _check_url(name: str, url: str) -> None:
    if not url:
        return
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{name} must be an http or https URL")


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    """The webhook, as configured. ``url`` empty: no validation by webhook;
    ``notify_url`` empty: no notifications. ``secret`` comes from a file."""

    url: str = ""
    notify_url: str = ""
    secret: bytes = field(default=b"", repr=False)
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    events: frozenset[str] = frozenset(EVENTS)
    max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES
    # How far the answer's timestamp may be from our clock.
    answer_tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS

    def __post_init__(self) -> None:
        _check_url("url", self.url)
        _check_url("notify_url", self.notify_url)
        if not self.url and not self.notify_url:
            raise ValueError("a webhook needs url, notify_url or both")
        if not isinstance(self.secret, bytes) or len(self.secret) < MIN_SECRET_BYTES:
            raise ValueError(f"secret must be at least {MIN_SECRET_BYTES} bytes")
        if not 0 < self.timeout_seconds <= 300:
            raise ValueError("timeout_seconds must be in (0, 300]")
        if not isinstance(self.events, frozenset) or not self.events <= set(EVENTS):
            raise ValueError(f"events must be a frozenset of {EVENTS}")
        if type(self.max_answer_bytes) is not int or self.max_answer_bytes < 64:
            raise ValueError("max_answer_bytes must be an int of at least 64")
        if not 0 < self.answer_tolerance_seconds <= 3600:
            raise ValueError("answer_tolerance_seconds must be in (0, 3600]")


def _b64(der: bytes) -> str:
    return b64encode(der).decode("ascii")


def request_document(request: ValidationRequest) -> dict[str, Any]:
    """What the validation POST says about an enrollment (its JSON body)."""
    return {
        "transaction_id": request.transaction_id,
        "message_type": request.message_type,
        "csr": _b64(request.csr_der),
        "subject": request.subject,
        "sans": list(request.sans),
        # The receiver may check it against what it handed the device.
        "challenge": request.challenge,
        "signer_certificate": _b64(request.signer_der),
        "profile": request.profile,
        "renewal": request.renewal,
    }


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # {"allow": false, "allow": true} must not be read as whichever came last.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key[:32]!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _text(answer: dict[str, Any], key: str, limit: int) -> str:
    value = answer.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > limit:
        raise ValueError(f"{key} must be a string of at most {limit} characters")
    return _CONTROL.sub(" ", value)


def parse_answer(body: bytes) -> Verdict:
    """The verdict in a validation answer's body; ValueError if it is not one.
    Unknown keys are ignored so that a receiver may say more."""
    answer = json.loads(body.decode("utf-8"), object_pairs_hook=_reject_duplicates,
                        parse_constant=_reject_constant)
    if not isinstance(answer, dict):
        raise ValueError("the answer is not a JSON object")
    allow = answer.get("allow")
    # A real JSON boolean: "true", 1 or null are a receiver's bug, not a verdict.
    if type(allow) is not bool:
        raise ValueError("allow must be true or false")
    return Verdict(allow=allow, reason=_text(answer, "reason", MAX_REASON_CHARS),
                   profile=_text(answer, "profile", MAX_PROFILE_CHARS))


class WebhookValidator:
    """Asks the operator's webhook whether an enrollment may go ahead.

    ``client`` belongs to the caller (one per worker, closed at its end);
    redirects are not followed, so a 3xx refuses.
    """

    name = "webhook"

    def __init__(self, settings: WebhookSettings, client: HttpClient, *,
                 clock: Callable[[], float] = time.time) -> None:
        if not settings.url:
            raise ValueError("a webhook validator needs settings.url")
        self._settings = settings
        self._client = client
        self._clock = clock

    async def validate(self, request: ValidationRequest) -> Verdict:
        settings = self._settings
        body = json.dumps(request_document(request), separators=(",", ":")).encode()
        delivery = os.urandom(DELIVERY_ID_BYTES).hex()
        headers = signed_headers(settings.secret, body, self._clock(), delivery)
        headers["Content-Type"] = "application/json"
        # Texts below go to the log: never the URL (it may carry a token), the
        # secret or the challenge.
        with trio.move_on_after(settings.timeout_seconds) as scope:
            try:
                response = await self._client.request(
                    "POST", settings.url, body=body, headers=headers,
                    max_answer_bytes=settings.max_answer_bytes)
            except AnswerTooLarge:
                raise ValidationFailed(
                    f"webhook answer over {settings.max_answer_bytes} bytes") from None
            except HttpError as e:
                raise ValidationFailed(f"webhook unreachable ({type(e).__name__})") from None
        if scope.cancelled_caught:
            raise ValidationFailed(f"webhook timed out after {settings.timeout_seconds:g} s")
        if not 200 <= response.status < 300:
            raise ValidationFailed(f"webhook answered {response.status}")
        answer, answer_headers = response.body, response.headers
        if not verify(settings.secret, answer_headers, answer, self._clock(),
                      settings.answer_tolerance_seconds, delivery=delivery):
            raise ValidationFailed("webhook answer not signed, wrongly signed, stale "
                                   "or for another request")
        try:
            return parse_answer(answer)
        except ValueError as e:
            # ValueError covers UnicodeDecodeError and JSONDecodeError; their
            # text names a position, not the content.
            raise ValidationFailed(f"webhook answer malformed: {str(e)[:120]}") from None


class DeliveryFailed(Exception):
    """The webhook did not take the notice this time; the outbox tries again.
    ``retry_after``: seconds the receiver asked us to wait (429, 503), if any."""

    def __init__(self, text: str, retry_after: float | None = None) -> None:
        super().__init__(text)
        self.retry_after = retry_after


def _retry_after(response: Response) -> float | None:
    value = response.headers.get("retry-after", "")
    # Only the delta-seconds form; an HTTP date is rare from a webhook receiver.
    return float(value) if value.isdecimal() and len(value) <= 9 else None


class WebhookNotifier:
    """Delivers notices to the operator's webhook.

    ``client`` belongs to the caller. 2xx: delivered; any other 4xx than
    408 and 429: NoticeRejected (dropped); anything else (408, 429, 3xx,
    5xx, no answer in time, no connection): DeliveryFailed (retried later).
    """

    sink = "webhook"

    def __init__(self, settings: WebhookSettings, client: HttpClient, *,
                 clock: Callable[[], float] = time.time) -> None:
        if not settings.notify_url:
            raise ValueError("a webhook notifier needs settings.notify_url")
        self._settings = settings
        self._client = client
        self._clock = clock
        self.events: frozenset[str] = settings.events

    async def deliver(self, notice: Notice) -> None:
        settings = self._settings
        if notice.event not in self.events:
            raise NoticeRejected(f"event {notice.event} is not sent to the webhook")
        headers = signed_headers(settings.secret, notice.body, self._clock(),
                                 notice.notice_id.hex())
        headers[EVENT_HEADER] = notice.event
        headers["Content-Type"] = "application/json"
        with trio.move_on_after(settings.timeout_seconds) as scope:
            try:
                response = await self._client.request(
                    "POST", settings.notify_url, body=notice.body, headers=headers,
                    max_answer_bytes=settings.max_answer_bytes)
            except HttpError as e:  # an oversized answer among them: delivered or not, unclear
                raise DeliveryFailed(f"webhook unreachable ({type(e).__name__})") from None
        if scope.cancelled_caught:
            raise DeliveryFailed(f"webhook timed out after {settings.timeout_seconds:g} s")
        status, retry_after = response.status, _retry_after(response)
        if 200 <= status < 300:
            return
        if 400 <= status < 500 and status not in (408, 429):
            raise NoticeRejected(f"webhook answered {status}")
        # 408, 429, 5xx, and a redirect (not followed: the URL is to be fixed,
        # and nothing is lost meanwhile).
        raise DeliveryFailed(f"webhook answered {status}", retry_after)
