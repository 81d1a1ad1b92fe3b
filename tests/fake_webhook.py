"""A webhook receiver for tests: validations and notifications, on 127.0.0.1.

A plain ASGI app served by hypercorn under trio in a background thread, so
that it serves a test's client (any event loop, or a real scep-fast server
in another process) while the test thread sets its knobs and reads what it
got::

    with FakeWebhook(SECRET) as hook:
        hook.set_answer(Answer(allow=False, reason="not in inventory"))
        ...  # point the server at hook.url and hook.notify_url
        assert hook.validations()[0].document()["transaction_id"] == ...

It checks every request's signature with the shared secret (a request that
fails is recorded with ``signature_ok=False`` and answered 401), signs its
validation answers the same way (or not, or wrongly: see ``Answer.signing``),
and can fail the next N notifications. All state is behind one lock.

As a pytest fixture::

    @pytest.fixture
    def hook() -> Iterator[FakeWebhook]:
        with FakeWebhook(SECRET) as fake:
            yield fake
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from scep_fast.runtime.app import answer_lifespan
from scep_fast.runtime.webhook import DELIVERY_HEADER, signed_headers, verify

VALIDATE_PATH = "/validate"
NOTIFY_PATH = "/notify"
MAX_BODY_BYTES = 1024 * 1024
START_TIMEOUT_SECONDS = 10.0

Signing = Literal["valid", "wrong", "none", "stale", "replayed"]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True)
class Answer:
    """How to answer a validation.

    ``body``, if given, is sent as it is instead of the JSON verdict (to test
    malformed or oversized answers); it is signed per ``signing`` all the same.
    ``signing``: "valid"; "wrong" (another secret); "none" (no signature
    headers); "stale" (a correct signature with a timestamp ``stale_seconds`` old);
    "replayed" (a correct signature, but for another request's delivery id).
    """

    allow: bool = True
    reason: str = ""
    profile: str = ""
    status: int = 200
    delay_seconds: float = 0.0
    signing: Signing = "valid"
    stale_seconds: float = 3600.0
    body: bytes | None = None
    # More than one: the body goes in that many pieces, chunked (no
    # Content-Length), ``chunk_delay_seconds`` apart (a slow drip).
    chunks: int = 1
    chunk_delay_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # more keys in the verdict

    def payload(self) -> bytes:
        if self.body is not None:
            return self.body
        verdict: dict[str, Any] = {"allow": self.allow, **self.extra}
        if self.reason:
            verdict["reason"] = self.reason
        if self.profile:
            verdict["profile"] = self.profile
        return json.dumps(verdict).encode()


@dataclass(frozen=True)
class Received:
    """One request the fake got."""

    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    signature_ok: bool
    status: int  # what the fake answered
    at: float

    @property
    def delivery(self) -> str:
        return self.headers.get(DELIVERY_HEADER.lower(), "")

    def document(self) -> Any:
        return json.loads(self.body)


@dataclass
class _State:
    answer: Answer = field(default_factory=Answer)
    queued: deque[Answer] = field(default_factory=deque)
    failures_left: int = 0
    failure_status: int = 503
    failure_retry_after: int | None = None
    notify_status: int = 204
    notify_delay_seconds: float = 0.0
    # Notifications received, answered or not yet (see arrivals()).
    arrivals: int = 0
    validations: list[Received] = field(default_factory=list)
    notifications: list[Received] = field(default_factory=list)
    others: list[Received] = field(default_factory=list)


class FakeWebhook:
    """The receiver; a context manager that starts and stops its server."""

    def __init__(self, secret: bytes, *, tolerance_seconds: float = 300.0) -> None:
        self.secret = secret
        self.tolerance_seconds = tolerance_seconds
        self.port = 0
        self._lock = threading.Lock()
        self._state = _State()
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._error: BaseException | None = None

    # -- addresses ---------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return self.base_url + VALIDATE_PATH

    @property
    def notify_url(self) -> str:
        return self.base_url + NOTIFY_PATH

    # -- knobs (from any thread) ------------------------------------------

    def set_answer(self, answer: Answer) -> None:
        """The answer to every validation from now on (after queued ones)."""
        with self._lock:
            self._state.answer = answer

    def queue_answers(self, *answers: Answer) -> None:
        """Answers for the next validations, in order, before the default one."""
        with self._lock:
            self._state.queued.extend(answers)

    def fail_notifications(self, count: int, status: int = 503,
                           retry_after: int | None = None) -> None:
        """Answer the next ``count`` notifications with ``status`` (and a
        Retry-After in seconds, if given); each is recorded with that status."""
        with self._lock:
            self._state.failures_left = count
            self._state.failure_status = status
            self._state.failure_retry_after = retry_after

    def set_notify_status(self, status: int) -> None:
        """The status of every notification not failed by ``fail_notifications``."""
        with self._lock:
            self._state.notify_status = status

    def set_notify_delay(self, seconds: float) -> None:
        """Wait this long before answering each notification."""
        with self._lock:
            self._state.notify_delay_seconds = seconds

    def reset(self) -> None:
        """Default knobs, nothing recorded."""
        with self._lock:
            self._state = _State()

    # -- what it got (from any thread) ------------------------------------

    def validations(self) -> list[Received]:
        with self._lock:
            return list(self._state.validations)

    def notifications(self) -> list[Received]:
        """Every notification, accepted or not (see ``Received.status``)."""
        with self._lock:
            return list(self._state.notifications)

    def delivered(self) -> list[Received]:
        """Notifications answered 2xx, duplicates (same delivery id) dropped,
        as a receiver should."""
        seen: set[str] = set()
        result = []
        for received in self.notifications():
            if 200 <= received.status < 300 and received.delivery not in seen:
                seen.add(received.delivery)
                result.append(received)
        return result

    def arrivals(self) -> int:
        """Notifications received so far, including those not answered yet."""
        with self._lock:
            return self._state.arrivals

    def others(self) -> list[Received]:
        """Requests to any other path (answered 404)."""
        with self._lock:
            return list(self._state.others)

    def wait_for(self, what: Callable[[FakeWebhook], bool], timeout: float = 10.0) -> None:
        """Poll until ``what(self)``, for a test driving a server in another process."""
        deadline = time.monotonic() + timeout
        while not what(self):
            if time.monotonic() > deadline:
                raise TimeoutError("the fake webhook did not get what was expected")
            time.sleep(0.02)

    # -- the ASGI app ------------------------------------------------------

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1")
                   for name, value in scope["headers"]}
        body = await _read_body(receive)
        if body is None:
            await _respond(send, 413, b"", {})
            return
        path = scope["path"]
        signature_ok = verify(self.secret, headers, body, time.time(), self.tolerance_seconds)
        if scope["method"] != "POST" or path not in (VALIDATE_PATH, NOTIFY_PATH):
            self._record("others", Received(path, headers, body, signature_ok, 404, time.time()))
            await _respond(send, 404, b"", {})
            return
        kind = "validations" if path == VALIDATE_PATH else "notifications"
        if not signature_ok:
            self._record(kind, Received(path, headers, body, False, 401, time.time()))
            await _respond(send, 401, b"bad signature", {})
            return
        if kind == "notifications":
            with self._lock:
                answer_headers: dict[str, str] = {}
                if self._state.failures_left > 0:
                    self._state.failures_left -= 1
                    status = self._state.failure_status
                    if self._state.failure_retry_after is not None:
                        answer_headers["Retry-After"] = str(self._state.failure_retry_after)
                else:
                    status = self._state.notify_status
                delay = self._state.notify_delay_seconds
                self._state.arrivals += 1
            if delay:
                await trio.sleep(delay)
            # Recorded when answered, not when received: a sender that died
            # during the delay did not deliver it.
            self._record(kind, Received(path, headers, body, True, status, time.time()))
            await _respond(send, status, b"", answer_headers)
            return
        with self._lock:
            answer = (self._state.queued.popleft() if self._state.queued
                      else self._state.answer)
        self._record(kind, Received(path, headers, body, True, answer.status, time.time()))
        if answer.delay_seconds:
            await trio.sleep(answer.delay_seconds)
        payload = answer.payload()
        delivery = headers.get(DELIVERY_HEADER.lower(), "")
        answer_headers = self._answer_headers(answer, payload, delivery)
        if answer.chunks > 1:
            await _respond_chunked(send, answer, payload, answer_headers)
        else:
            await _respond(send, answer.status, payload, answer_headers)

    def _answer_headers(self, answer: Answer, payload: bytes, delivery: str) -> dict[str, str]:
        if answer.signing == "none":
            return {}
        secret = self.secret if answer.signing != "wrong" else b"not-" + self.secret
        now = time.time() - (answer.stale_seconds if answer.signing == "stale" else 0.0)
        if answer.signing == "replayed":
            delivery = "0" * 32
        return signed_headers(secret, payload, now, delivery)

    def _record(self, kind: str, received: Received) -> None:
        with self._lock:
            getattr(self._state, kind).append(received)

    # -- the server thread -------------------------------------------------

    def __enter__(self) -> FakeWebhook:
        self._thread = threading.Thread(target=self._run, name="fake-webhook", daemon=True)
        self._thread.start()
        if not self._started.wait(START_TIMEOUT_SECONDS) or self._error is not None:
            raise RuntimeError("the fake webhook did not start") from self._error
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None and self._stop is not None:
            # The server may have ended already (it failed).
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as e:  # noqa: BLE001 - reported to __enter__
            self._error = e
            self._started.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        config = HypercornConfig()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        config.errorlog = None
        # Stopping must not wait for a slow answer still sleeping.
        config.graceful_timeout = 0.5
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(_serve_app, self, config, self._stop.wait)
            self.port = int(binds[0].rsplit(":", 1)[1])
            self._started.set()


async def _serve_app(app: FakeWebhook, config: HypercornConfig,
                     shutdown_trigger: Callable[[], Awaitable[None]],
                     task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    await serve(app, config, shutdown_trigger=shutdown_trigger,  # type: ignore[arg-type]
                task_status=task_status)


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _raw_headers(headers: dict[str, str], body: bytes) -> list[tuple[bytes, bytes]]:
    raw = [(name.lower().encode("latin-1"), value.encode("latin-1"))
           for name, value in headers.items()]
    raw.append((b"content-type", b"application/json" if body[:1] in (b"{", b"[") else
                b"text/plain"))
    return raw


async def _respond(send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
    raw = _raw_headers(headers, body)
    raw.append((b"content-length", str(len(body)).encode("ascii")))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def _respond_chunked(send: Send, answer: Answer, body: bytes,
                           headers: dict[str, str]) -> None:
    await send({"type": "http.response.start", "status": answer.status,
                "headers": _raw_headers(headers, body)})
    step = -(-len(body) // answer.chunks)
    for i in range(answer.chunks):
        if i:
            await trio.sleep(answer.chunk_delay_seconds)
        await send({"type": "http.response.body", "body": body[i * step:(i + 1) * step],
                    "more_body": True})
    await send({"type": "http.response.body", "body": b""})

