"""The validation and notification webhook against a running server.

A real ``scep-fast serve`` (supervisor and two workers) asks the fake
receiver (``tests/fake_webhook.py``) before each issuance and tells it what
happened through the outbox: allow, deny, timeout, 5xx, an answer signed
wrongly or for another request, notifications retried, and one delivered
after the workers that held it were killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scep_fast.client import enroll
from scep_fast.protocol import FailInfo, PKIStatus
from tests.fake_webhook import Answer, FakeWebhook, Received
from tests.integration.conftest import (
    CHALLENGE,
    Server,
    init_dir,
    scep_fast,
    set_config,
    start_server,
)
from tests.integration.test_nodes_pg import init_pg_dir, second_node
from tests.integration.test_workers import wait_for_workers, worker_pids
from tests.postgres import PostgresServer

SECRET = b"a-webhook-secret-of-32-bytes-len"
TIMEOUT_SECONDS = 1.0


def configure_webhook(directory: Path, hook: FakeWebhook, *, notify: bool = True) -> None:
    secret = directory / "webhook-secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    set_config(directory, "validation.webhook", "url", f'"{hook.url}"')
    if notify:
        set_config(directory, "validation.webhook", "notify_url", f'"{hook.notify_url}"')
    set_config(directory, "validation", "timeout_seconds", str(TIMEOUT_SECONDS))
    set_config(directory, "server", "workers", "2")
    set_config(directory, "outbox", "poll_seconds", "0.2")
    set_config(directory, "outbox", "lease_seconds", "3.0")
    set_config(directory, "outbox", "timeout_seconds", "1.5")
    set_config(directory, "outbox", "max_retry_seconds", "1.0")


@pytest.fixture(scope="module")
def hook() -> Iterator[FakeWebhook]:
    with FakeWebhook(SECRET) as receiver:
        yield receiver


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, hook: FakeWebhook) -> Iterator[Server]:
    directory = init_dir(tmp_path_factory.mktemp("webhook") / "scep")
    configure_webhook(directory, hook)
    running = start_server(directory)
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def fresh(hook: FakeWebhook) -> None:
    hook.reset()


def notified(hook: FakeWebhook, event: str, transaction_id: str) -> list[dict[str, object]]:
    return [d for d in (r.document() for r in hook.delivered())
            if d["event"] == event and d["transaction_id"] == transaction_id]


def wait_notified(hook: FakeWebhook, event: str, transaction_id: str,
                  timeout: float = 15) -> dict[str, object]:
    hook.wait_for(lambda h: bool(notified(h, event, transaction_id)), timeout=timeout)
    (document,) = notified(hook, event, transaction_id)
    return document


def test_an_allowed_enrollment_is_issued_and_notified(server: Server,
                                                      hook: FakeWebhook) -> None:
    result = enroll(server.url, CHALLENGE, "hook-allowed")
    assert result.status is PKIStatus.SUCCESS and result.cert is not None
    (asked,) = hook.validations()
    assert asked.signature_ok
    request = asked.document()
    assert request["challenge"] == CHALLENGE
    assert request["subject"] == "CN=hook-allowed" and request["message_type"] == "PKCSReq"
    issued = wait_notified(hook, "issued", str(request["transaction_id"]))
    assert issued["serial"] == f"{result.cert.serial_number:x}"
    assert all(r.signature_ok for r in hook.notifications())


def test_a_denied_enrollment_gets_a_signed_failure_and_a_refused_notice(
        server: Server, hook: FakeWebhook) -> None:
    hook.set_answer(Answer(allow=False, reason="device not enrolled in the MDM"))
    result = enroll(server.url, CHALLENGE, "hook-denied")
    assert result.status is PKIStatus.FAILURE and result.fail_info is FailInfo.BAD_REQUEST
    assert result.fail_info_text == "refused by validation: device not enrolled in the MDM"
    (asked,) = hook.validations()
    refused = wait_notified(hook, "refused", str(asked.document()["transaction_id"]))
    assert refused["reason"] == result.fail_info_text
    assert refused["fail_info"] == "badRequest"


@pytest.mark.parametrize("answer", [
    Answer(delay_seconds=3 * TIMEOUT_SECONDS),   # too slow
    Answer(status=500),
    Answer(signing="wrong"),                      # not our secret
    Answer(signing="replayed"),                   # an allow made for another request
    Answer(body=b"allow"),                        # not JSON
], ids=["timeout", "5xx", "bad-signature", "replayed", "malformed"])
def test_a_webhook_that_does_not_clearly_allow_refuses(server: Server, hook: FakeWebhook,
                                                       answer: Answer) -> None:
    hook.set_answer(answer)
    started = time.monotonic()
    result = enroll(server.url, CHALLENGE, "hook-unclear")
    assert time.monotonic() - started < 2 * TIMEOUT_SECONDS + 5
    assert result.status is PKIStatus.FAILURE and result.fail_info is FailInfo.BAD_REQUEST
    assert result.fail_info_text == "the request could not be validated"
    assert result.cert is None


def test_notifications_are_retried_until_the_receiver_takes_them(
        server: Server, hook: FakeWebhook) -> None:
    hook.set_notify_status(503)
    result = enroll(server.url, CHALLENGE, "hook-retried")
    assert result.status is PKIStatus.SUCCESS
    (asked,) = hook.validations()
    transaction_id = str(asked.document()["transaction_id"])

    def attempts() -> list[Received]:
        return [r for r in hook.notifications()
                if r.document()["transaction_id"] == transaction_id]

    hook.wait_for(lambda _h: len(attempts()) >= 3, timeout=20)
    hook.set_notify_status(204)
    wait_notified(hook, "issued", transaction_id)
    tried = attempts()
    assert [r.status for r in tried[:3]] == [503, 503, 503] and tried[-1].status == 204
    # Every attempt is the same notice: one delivery id for the receiver to drop duplicates.
    assert len({r.delivery for r in tried}) == 1


def test_a_revocation_is_notified(server: Server, hook: FakeWebhook) -> None:
    result = enroll(server.url, CHALLENGE, "hook-revoked")
    assert result.cert is not None
    serial = f"{result.cert.serial_number:x}"
    done = scep_fast("certs", "revoke", serial, "--reason", "keyCompromise",
                     "--dir", str(server.directory))
    assert done.returncode == 0, done.stderr
    hook.wait_for(lambda h: any(d["event"] == "revoked" and d["serial"] == serial
                                for d in (r.document() for r in h.delivered())))
    (revoked,) = [d for d in (r.document() for r in hook.delivered())
                  if d["event"] == "revoked"]
    assert revoked["revocation_reason"] == 1


def test_a_notice_is_delivered_after_the_workers_holding_it_are_killed(
        server: Server, hook: FakeWebhook) -> None:
    # The receiver holds every notification long past the lease: the worker
    # that claimed the notice is in the middle of delivering it when it dies.
    hook.set_notify_delay(60)
    result = enroll(server.url, CHALLENGE, "hook-killed")
    assert result.status is PKIStatus.SUCCESS and result.cert is not None
    hook.wait_for(lambda h: h.arrivals() > 0, timeout=15)
    assert hook.delivered() == []
    workers = worker_pids(server)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    hook.set_notify_delay(0)
    wait_for_workers(server, 2)
    (asked,) = hook.validations()
    issued = wait_notified(hook, "issued", str(asked.document()["transaction_id"]),
                           timeout=30)
    assert issued["serial"] == f"{result.cert.serial_number:x}"
    assert not worker_pids(server) & workers


def test_two_nodes_on_postgresql_validate_and_notify_once_each(
        postgres: PostgresServer, tmp_path: Path, hook: FakeWebhook) -> None:
    """The outbox in the database the nodes share: each enrollment's notice is
    delivered (once per delivery id) whichever node issued and whichever delivers."""
    database = postgres.new_database()
    first = init_pg_dir(tmp_path / "node-a", postgres, database)
    configure_webhook(first, hook)
    second = second_node(first, tmp_path / "node-b")
    a = start_server(first)
    try:
        b = start_server(second)
        try:
            results = [enroll(node.url, CHALLENGE, f"pg-hook-{i}")
                       for i, node in enumerate((a, b, a, b))]
            assert all(r.status is PKIStatus.SUCCESS and r.cert is not None for r in results)
            serials = {f"{r.cert.serial_number:x}" for r in results if r.cert is not None}
            hook.wait_for(lambda h: {str(d["serial"]) for d in (
                r.document() for r in h.delivered()) if d["event"] == "issued"} >= serials,
                timeout=20)
        finally:
            b.stop()
    finally:
        a.stop()
    assert len(hook.validations()) == 4
    issued = [d for d in (r.document() for r in hook.delivered()) if d["event"] == "issued"]
    assert len(issued) == 4


@pytest.mark.parametrize("mode", [0o644, None], ids=["readable-by-others", "missing"])
def test_a_server_does_not_start_without_a_private_webhook_secret(
        tmp_path: Path, hook: FakeWebhook, mode: int | None) -> None:
    directory = init_dir(tmp_path / "scep")
    configure_webhook(directory, hook)
    secret = directory / "webhook-secret"
    if mode is None:
        secret.unlink()
    else:
        secret.chmod(mode)
    with pytest.raises(RuntimeError) as refused:
        start_server(directory)
    assert "validation.webhook.secret_file" in str(refused.value)
    assert SECRET.decode() not in str(refused.value)
