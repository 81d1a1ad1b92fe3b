"""The ASGI app's mapping of errors to HTTP, without a network."""

from __future__ import annotations

from typing import Any

import trio

from scep_fast.protocol import Capabilities, Overloaded
from scep_fast.runtime.app import CaCertificates, ScepApp


class _BusyBatcher:
    async def submit(self, message: bytes) -> Any:
        raise Overloaded(1)


def call(app: ScepApp, method: str, path: str, query: bytes, body: bytes) -> dict[str, Any]:
    sent: list[dict[str, Any]] = []
    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "query_string": query}
    trio.run(app, scope, receive, send)
    start, body_message = sent
    return {"status": start["status"], "headers": dict(start["headers"]),
            "body": body_message["body"]}


def make_app() -> ScepApp:
    return ScepApp(capabilities=Capabilities(aes=True, post_pki_operation=True, sha256=True),
                   ca_certificates=CaCertificates(b"cert", b"application/x-x509-ca-cert"),
                   batcher=_BusyBatcher(),  # type: ignore[arg-type]
                   max_body_bytes=1024)


def test_full_batcher_answers_503_with_retry_after() -> None:
    response = call(make_app(), "POST", "/scep", b"operation=PKIOperation", b"\x30\x03abc")
    assert response["status"] == 503
    assert response["headers"][b"retry-after"] == b"1"
    assert response["headers"][b"content-length"] == str(len(response["body"])).encode()


def test_body_over_the_limit_is_413() -> None:
    response = call(make_app(), "POST", "/scep", b"operation=PKIOperation", b"x" * 2048)
    assert response["status"] == 413


def test_head_of_get_ca_caps_has_length_but_no_body() -> None:
    response = call(make_app(), "HEAD", "/scep", b"operation=GetCACaps", b"")
    assert response["status"] == 200
    assert response["body"] == b""
    assert response["headers"][b"content-length"] == b"%d" % len(b"AES\nPOSTPKIOperation\nSHA-256")


def test_put_is_405_with_allow() -> None:
    response = call(make_app(), "PUT", "/scep", b"operation=GetCACaps", b"")
    assert response["status"] == 405
    assert b"GET" in response["headers"][b"allow"]


def test_a_body_that_trickles_past_the_body_timeout_is_408_and_closes() -> None:
    app = ScepApp(capabilities=Capabilities(aes=True, post_pki_operation=True, sha256=True),
                  ca_certificates=CaCertificates(b"cert", b"application/x-x509-ca-cert"),
                  batcher=_BusyBatcher(),  # type: ignore[arg-type]
                  max_body_bytes=1024, body_timeout_seconds=0.3)
    sent: list[dict[str, Any]] = []
    chunks_read = 0

    async def receive() -> dict[str, Any]:
        # A byte every 50 ms: never silent for long, never finished.
        nonlocal chunks_read
        await trio.sleep(0.05)
        chunks_read += 1
        return {"type": "http.request", "body": b"x", "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def main() -> float:
        started = trio.current_time()
        with trio.fail_after(5):
            await app({"type": "http", "method": "POST", "path": "/scep",
                       "query_string": b"operation=PKIOperation"}, receive, send)
        return trio.current_time() - started

    elapsed = trio.run(main)
    start, body = sent
    assert start["status"] == 408
    assert dict(start["headers"])[b"connection"] == b"close"
    assert b"not complete" in body["body"]
    assert 0.25 < elapsed < 2 and chunks_read >= 4
