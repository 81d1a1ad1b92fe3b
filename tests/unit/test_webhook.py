"""The webhook's client side (runtime/webhook.py) against the fake receiver, under trio."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import trio

from scep_fast.runtime.http_client import HttpClient
from scep_fast.runtime.webhook import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    DeliveryFailed,
    WebhookNotifier,
    WebhookSettings,
    WebhookValidator,
    parse_answer,
    sign,
    signed_headers,
    verify,
)
from scep_fast.service.notices import Notice, NoticeRejected, issued_event, notices_for
from scep_fast.service.validation import ValidationFailed, ValidationRequest, Verdict
from tests.fake_webhook import Answer, FakeWebhook
from tests.ledger_values import make_record

SECRET = b"webhook-test-secret-7Qx2"
CHALLENGE = "challenge-Vb93-never-logged"
T = TypeVar("T")

REQUEST = ValidationRequest(
    transaction_id="tx-1", message_type="PKCSReq", csr_der=b"\x30\x03csr",
    subject="CN=device-1,O=Example", sans=("dns_name:device-1.example", "ip_address:192.0.2.9"),
    challenge=CHALLENGE, signer_der=b"\x30\x03crt", profile="default", renewal=False)


@pytest.fixture(scope="module")
def module_hook() -> Iterator[FakeWebhook]:
    with FakeWebhook(SECRET) as hook:
        yield hook


@pytest.fixture
def hook(module_hook: FakeWebhook) -> FakeWebhook:
    module_hook.reset()
    return module_hook


def settings_for(hook: FakeWebhook, **changes: Any) -> WebhookSettings:
    base = WebhookSettings(url=hook.url, notify_url=hook.notify_url, secret=SECRET,
                           timeout_seconds=1.0)
    return dataclasses.replace(base, **changes)


def run(fn: Callable[[HttpClient], Awaitable[T]]) -> T:
    async def main() -> T:
        client = HttpClient()
        try:
            return await fn(client)
        finally:
            await client.aclose()
    return trio.run(main)


def validate(settings: WebhookSettings, request: ValidationRequest = REQUEST) -> Verdict:
    return run(lambda client: WebhookValidator(settings, client).validate(request))


def refused(settings: WebhookSettings) -> str:
    with pytest.raises(ValidationFailed) as caught:
        validate(settings)
    text = str(caught.value)
    # The text goes to the log.
    assert CHALLENGE not in text and SECRET.decode() not in text
    # Nor the URL, which may carry a token.
    assert "127.0.0.1" not in text and "/validate" not in text
    return text


# -- signing ---------------------------------------------------------------

def test_sign_is_hmac_sha256_over_timestamp_delivery_and_body() -> None:
    expected = hmac.new(SECRET, b"1750000000.0a1b.{\"a\":1}", hashlib.sha256).hexdigest()
    assert sign(SECRET, 1_750_000_000, "0a1b", b'{"a":1}') == "v1=" + expected


def test_verify_accepts_what_signed_headers_makes_and_nothing_altered() -> None:
    now = 1_750_000_000.0
    body = b'{"allow":true}'
    headers = signed_headers(SECRET, body, now, "d0")
    assert headers[DELIVERY_HEADER] == "d0"
    assert verify(SECRET, headers, body, now)
    # Header names are case-insensitive in HTTP.
    assert verify(SECRET, {k.lower(): v for k, v in headers.items()}, body, now)
    assert not verify(b"another-secret-of-length", headers, body, now)
    assert not verify(SECRET, headers, b'{"allow":false}', now)
    assert not verify(SECRET, {**headers, TIMESTAMP_HEADER: str(int(now) + 1)}, body, now)
    # Within the tolerance either way, not beyond.
    assert verify(SECRET, headers, body, now + 300)
    assert verify(SECRET, headers, body, now - 300)
    assert not verify(SECRET, headers, body, now + 301)
    assert not verify(SECRET, headers, body, now - 301)
    assert not verify(SECRET, headers, body, now + 20, tolerance=10)
    # An answer is for one request: its delivery id is inside the signature.
    assert verify(SECRET, headers, body, now, delivery="d0")
    assert not verify(SECRET, headers, body, now, delivery="d1")
    assert not verify(SECRET, {**headers, DELIVERY_HEADER: "d1"}, body, now)


@pytest.mark.parametrize("changes", [
    {SIGNATURE_HEADER: None},
    {TIMESTAMP_HEADER: None},
    {TIMESTAMP_HEADER: "+1750000000"},
    {TIMESTAMP_HEADER: "1750000000.0"},
    {TIMESTAMP_HEADER: " 1750000000"},
    {SIGNATURE_HEADER: "v2=" + "0" * 64},
    {SIGNATURE_HEADER: ""},
])
def test_verify_refuses_malformed_headers(changes: dict[str, str | None]) -> None:
    now = 1_750_000_000.0
    headers: dict[str, str | None] = {**signed_headers(SECRET, b"{}", now, "d0"), **changes}
    present = {k: v for k, v in headers.items() if v is not None}
    assert not verify(SECRET, present, b"{}", now)


def test_verify_refuses_a_doubled_signature_header() -> None:
    now = 1_750_000_000.0
    headers = signed_headers(SECRET, b"{}", now, "d0")
    doubled = {**headers, SIGNATURE_HEADER: headers[SIGNATURE_HEADER] + ", v1=" + "0" * 64}
    assert not verify(SECRET, doubled, b"{}", now)


# -- the answer's shape ----------------------------------------------------

def test_parse_answer_reads_a_verdict_and_ignores_unknown_keys() -> None:
    assert parse_answer(b'{"allow": true}') == Verdict(True)
    assert parse_answer(b'{"allow": false, "reason": "lost", "profile": "p", "x": [1]}') \
        == Verdict(False, "lost", "p")
    # Control characters would forge log lines.
    assert parse_answer(b'{"allow": false, "reason": "a\\nb"}').reason == "a b"


@pytest.mark.parametrize("body", [
    b'{"allow": "true"}', b'{"allow": 1}', b'{"allow": null}', b"{}", b"[true]", b"true",
    b'{"allow": false, "allow": true}', b'{"allow": true, "reason": 5}',
    b'{"allow": true, "profile": ["a"]}', b'{"allow": true, "x": NaN}',
    b'{"allow": true, "reason": "' + b"r" * 513 + b'"}',
    b'{"allow": true, "profile": "' + b"p" * 65 + b'"}',
    b'{"allow": tru', b"\xff{}", b"",
])
def test_parse_answer_is_strict(body: bytes) -> None:
    with pytest.raises(ValueError):
        parse_answer(body)


# -- settings --------------------------------------------------------------

def test_settings_hide_the_secret_and_check_their_values() -> None:
    settings = WebhookSettings(url="https://hooks.example/v", secret=SECRET)
    assert SECRET.decode() not in repr(settings)
    assert settings.events == {"issued", "refused", "revoked"}
    for bad in ({"secret": b"short"}, {"url": "", "notify_url": ""}, {"url": "ftp://x/"},
                {"events": frozenset({"issued", "renewed"})}, {"timeout_seconds": 0},
                {"max_answer_bytes": 10}):
        with pytest.raises(ValueError):
            dataclasses.replace(settings, **bad)


# -- the validator against the fake ----------------------------------------

def test_allow_and_the_receiver_sees_every_field_signed(hook: FakeWebhook) -> None:
    assert validate(settings_for(hook)) == Verdict(True)
    [got] = hook.validations()
    assert got.signature_ok
    assert verify(SECRET, got.headers, got.body, time.time())
    assert len(got.delivery) == 32 and int(got.delivery, 16) >= 0
    assert got.headers["content-type"] == "application/json"
    assert got.document() == {
        "transaction_id": "tx-1",
        "message_type": "PKCSReq",
        "csr": base64.b64encode(b"\x30\x03csr").decode(),
        "subject": "CN=device-1,O=Example",
        "sans": ["dns_name:device-1.example", "ip_address:192.0.2.9"],
        "challenge": CHALLENGE,
        "signer_certificate": base64.b64encode(b"\x30\x03crt").decode(),
        "profile": "default",
        "renewal": False,
    }


def test_each_validation_has_its_own_delivery_id(hook: FakeWebhook) -> None:
    validate(settings_for(hook))
    validate(settings_for(hook))
    first, second = hook.validations()
    assert first.delivery != second.delivery


def test_deny_passes_the_reason_through(hook: FakeWebhook) -> None:
    hook.set_answer(Answer(allow=False, reason="not in inventory"))
    assert validate(settings_for(hook)) == Verdict(False, "not in inventory")


def test_allow_with_another_profile(hook: FakeWebhook) -> None:
    hook.set_answer(Answer(allow=True, profile="wifi"))
    assert validate(settings_for(hook)) == Verdict(True, "", "wifi")


def test_queued_answers_come_first(hook: FakeWebhook) -> None:
    hook.queue_answers(Answer(allow=False, reason="first"))
    assert validate(settings_for(hook)).allow is False
    assert validate(settings_for(hook)).allow is True


def test_a_slow_answer_fails_in_about_the_timeout(hook: FakeWebhook) -> None:
    hook.set_answer(Answer(delay_seconds=3.0))
    started = time.monotonic()
    assert "timed out" in refused(settings_for(hook, timeout_seconds=0.3))
    assert 0.25 < time.monotonic() - started < 1.5


@pytest.mark.parametrize("status", [500, 503, 404, 302])
def test_an_answer_other_than_2xx_refuses_even_signed_allow(hook: FakeWebhook,
                                                            status: int) -> None:
    hook.set_answer(Answer(allow=True, status=status))
    assert refused(settings_for(hook)) == f"webhook answered {status}"


def test_an_empty_2xx_answer_refuses(hook: FakeWebhook) -> None:
    hook.set_answer(Answer(allow=True, status=200, body=b""))
    assert "malformed" in refused(settings_for(hook))


@pytest.mark.parametrize("signing", ["wrong", "none", "stale", "replayed"])
def test_an_allow_not_signed_rightly_refuses(hook: FakeWebhook, signing: str) -> None:
    hook.set_answer(Answer(allow=True, signing=signing))  # type: ignore[arg-type]
    assert "sign" in refused(settings_for(hook))


def test_a_stale_answer_within_a_wider_tolerance_passes(hook: FakeWebhook) -> None:
    hook.set_answer(Answer(allow=True, signing="stale", stale_seconds=100))
    assert validate(settings_for(hook)) == Verdict(True)
    assert "sign" in refused(settings_for(hook, answer_tolerance_seconds=50))


def test_a_slow_drip_answer_fails_in_about_the_timeout(hook: FakeWebhook) -> None:
    # Each piece comes well within the timeout; the whole does not.
    hook.set_answer(Answer(allow=True, extra={"pad": "x" * 100}, chunks=10,
                           chunk_delay_seconds=0.15))
    started = time.monotonic()
    assert "timed out" in refused(settings_for(hook, timeout_seconds=0.5))
    assert 0.45 < time.monotonic() - started < 1.2


@pytest.mark.parametrize("chunks", [1, 4])  # with Content-Length, and chunked without
def test_an_oversized_answer_refuses(hook: FakeWebhook, chunks: int) -> None:
    padding = "x" * 5000
    hook.set_answer(Answer(allow=True, extra={"padding": padding}, chunks=chunks))
    assert validate(settings_for(hook, max_answer_bytes=8192)) == Verdict(True)
    assert "over 1024 bytes" in refused(settings_for(hook, max_answer_bytes=1024))


def test_a_signed_answer_that_is_not_a_verdict_refuses(hook: FakeWebhook) -> None:
    hook.set_answer(Answer(body=b'{"allow": "yes"}'))
    assert "malformed" in refused(settings_for(hook))


def test_a_request_signed_with_another_secret_is_refused_by_the_receiver(
        hook: FakeWebhook) -> None:
    assert refused(settings_for(hook, secret=b"the-wrong-secret-Zz1")) == "webhook answered 401"
    [got] = hook.validations()
    assert not got.signature_ok and got.status == 401


def test_a_request_with_a_skewed_clock_is_refused_by_the_receiver(hook: FakeWebhook) -> None:
    settings = settings_for(hook)
    with pytest.raises(ValidationFailed):
        run(lambda client: WebhookValidator(settings, client,
                                            clock=lambda: time.time() + 1000).validate(REQUEST))
    assert not hook.validations()[0].signature_ok


def test_no_receiver_refuses() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        settings = WebhookSettings(url=f"http://127.0.0.1:{port}/v", secret=SECRET,
                                   timeout_seconds=1.0)
        assert "unreachable" in refused(settings)


def test_a_validator_needs_a_url(hook: FakeWebhook) -> None:
    async def make(client: HttpClient) -> None:
        WebhookValidator(settings_for(hook, url=""), client)
    with pytest.raises(ValueError):
        run(make)


# -- the notifier against the fake -----------------------------------------

def issued_notice() -> Notice:
    body = issued_event(make_record(0x1F2E, "tx-9"), message_type="PKCSReq",
                        csr_der=b"\x30\x01c", at=1_750_000_000.0)
    [notice] = notices_for("issued", body, ["webhook"], 1_750_000_000.0, serial=0x1F2E)
    return notice


def deliver(settings: WebhookSettings, notice: Notice) -> None:
    run(lambda client: WebhookNotifier(settings, client).deliver(notice))


def test_a_notice_is_posted_as_stored_signed_with_its_id(hook: FakeWebhook) -> None:
    notice = issued_notice()
    deliver(settings_for(hook), notice)
    [got] = hook.notifications()
    assert got.status == 204 and got.signature_ok
    assert got.body == notice.body
    assert got.delivery == notice.notice_id.hex()
    assert got.headers[EVENT_HEADER.lower()] == "issued"
    assert verify(SECRET, got.headers, got.body, time.time())
    assert json.loads(got.body)["serial"] == "1f2e"


def test_a_503_is_retried_and_the_receiver_keeps_one(hook: FakeWebhook) -> None:
    notice = issued_notice()
    hook.fail_notifications(1, 503, retry_after=30)
    with pytest.raises(DeliveryFailed) as caught:
        deliver(settings_for(hook), notice)
    assert not isinstance(caught.value, NoticeRejected)
    assert caught.value.retry_after == 30
    deliver(settings_for(hook), notice)
    deliver(settings_for(hook), notice)  # a duplicate, as at-least-once allows
    assert [n.status for n in hook.notifications()] == [503, 204, 204]
    assert [n.delivery for n in hook.delivered()] == [notice.notice_id.hex()]


def test_a_slow_receiver_is_retried_after_about_the_timeout(hook: FakeWebhook) -> None:
    hook.set_notify_delay(3.0)
    started = time.monotonic()
    with pytest.raises(DeliveryFailed, match="timed out"):
        deliver(settings_for(hook, timeout_seconds=0.3), issued_notice())
    assert 0.25 < time.monotonic() - started < 1.5


@pytest.mark.parametrize("status", [408, 429, 500, 502, 307])
def test_transient_statuses_are_retried(hook: FakeWebhook, status: int) -> None:
    hook.set_notify_status(status)
    with pytest.raises(DeliveryFailed) as caught:
        deliver(settings_for(hook), issued_notice())
    assert caught.value.retry_after is None


@pytest.mark.parametrize("status", [400, 404, 410, 422])
def test_other_4xx_reject_the_notice_for_good(hook: FakeWebhook, status: int) -> None:
    hook.set_notify_status(status)
    with pytest.raises(NoticeRejected):
        deliver(settings_for(hook), issued_notice())


def test_a_notice_signed_with_another_secret_is_refused_and_dropped(hook: FakeWebhook) -> None:
    with pytest.raises(NoticeRejected):
        deliver(settings_for(hook, secret=b"the-wrong-secret-Zz1"), issued_notice())
    assert not hook.notifications()[0].signature_ok


def test_events_not_subscribed_are_not_sent(hook: FakeWebhook) -> None:
    settings = settings_for(hook, events=frozenset({"revoked"}))

    async def check(client: HttpClient) -> None:
        notifier = WebhookNotifier(settings, client)
        assert notifier.sink == "webhook" and notifier.events == {"revoked"}
        with pytest.raises(NoticeRejected):
            await notifier.deliver(issued_notice())
    run(check)
    assert hook.notifications() == []


def test_no_receiver_is_retried() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        settings = WebhookSettings(notify_url=f"http://127.0.0.1:{port}/n", secret=SECRET,
                                   timeout_seconds=1.0)
        with pytest.raises(DeliveryFailed):
            deliver(settings, issued_notice())
