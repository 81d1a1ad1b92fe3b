"""A small HTTP/1.1 client for the integrations' calls out (webhooks, Intune), under trio.

Each enrollment may cost one call out, so the client's own CPU counts: on
this path httpx (through anyio and httpcore) spent 1.2 to 3.5 ms of CPU per
call, about what a whole enrollment costs, and h11 over a trio stream about
0.27 ms (``benchmarks/http_client_cost.py``, RESULTS). So this is a trio
stream, requests written in one piece and answers read by ``http_answer``:

- one pool of keep-alive connections per origin (scheme, host, port), at
  most ``max_connections`` in use at once, idle ones reused last-in first-out
  and closed after ``keep_alive_seconds``;
- a request that finds a reused connection closed by the peer before any
  byte of an answer is sent again once on a new connection (keep-alive
  races are normal); nothing else is retried here;
- answers are read up to ``max_answer_bytes`` (AnswerTooLarge beyond), with
  Content-Length or chunked framing; redirects are not followed;
- https with the system's trust store (or the given SSL context).

Timeouts are the caller's (a trio cancel scope around ``request``): a call
cancelled half-way closes its connection.
"""

from __future__ import annotations

import re
import ssl
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field

import trio

from scep_fast import __version__
from scep_fast.runtime.http_answer import (
    CHUNKED,
    MAX_HEAD_BYTES,
    Head,
    Malformed,
    chunked_body,
    parse_head,
)

__all__ = ["AnswerTooLarge", "ConnectFailed", "HttpClient", "HttpError", "Response"]

USER_AGENT = f"scep-fast/{__version__}"
READ_BYTES = 65536


class HttpError(Exception):
    """The exchange failed (connection lost, malformed answer). The text names no content."""


class ConnectFailed(HttpError):
    """No connection to the origin could be made."""


class AnswerTooLarge(HttpError):
    """The answer's body is longer than the caller allows."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[str, str]  # names in lower case; a repeated header joined with ", "
    body: bytes


@dataclass(slots=True)
class _Connection:
    stream: trio.abc.Stream
    idle_since: float = 0.0
    # Whether the last answer leaves the connection fit for the next request.
    reusable: bool = False


class _Stale(Exception):
    """A reused connection turned out closed before the answer began."""


@dataclass
class _Origin:
    scheme: str
    host: str
    port: int
    slots: trio.Semaphore
    idle: list[_Connection] = field(default_factory=list)


class HttpClient:
    """Keep-alive HTTP/1.1 over trio; one per worker, shared by its integrations."""

    def __init__(self, *, max_connections: int = 64, keep_alive_seconds: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self._max_connections = max_connections
        self._keep_alive = keep_alive_seconds
        self._ssl_context = ssl_context
        self._origins: dict[tuple[str, str, int], _Origin] = {}

    async def request(self, method: str, url: str, *, headers: Mapping[str, str] = {},  # noqa: B006 - read only
                      body: bytes = b"", max_answer_bytes: int = 65536) -> Response:
        """One exchange; the answer, whatever its status."""
        origin, target = self._origin(url)
        async with origin.slots:
            for attempt in range(2):
                connection, reused = await self._idle(origin), True
                if connection is None:
                    connection, reused = await self._connect(origin), False
                try:
                    response = await self._exchange(connection, origin, method, target,
                                                    headers, body, max_answer_bytes,
                                                    reused)
                except _Stale:
                    await trio.aclose_forcefully(connection.stream)
                    if attempt:
                        raise HttpError("the connection closed before the answer") from None
                    continue
                except BaseException:
                    await trio.aclose_forcefully(connection.stream)
                    raise
                if connection.reusable:
                    connection.idle_since = time.monotonic()
                    origin.idle.append(connection)
                else:
                    await trio.aclose_forcefully(connection.stream)
                return response
        raise HttpError("unreachable")  # pragma: no cover - the loop returns or raises

    async def aclose(self) -> None:
        for origin in self._origins.values():
            while origin.idle:
                await trio.aclose_forcefully(origin.idle.pop().stream)

    def _origin(self, url: str) -> tuple[_Origin, str]:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("an http or https URL is needed")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        key = (parts.scheme, parts.hostname, port)
        origin = self._origins.get(key)
        if origin is None:
            origin = _Origin(parts.scheme, parts.hostname, port,
                             trio.Semaphore(self._max_connections))
            self._origins[key] = origin
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return origin, target

    async def _idle(self, origin: _Origin) -> _Connection | None:
        now = time.monotonic()
        while origin.idle:
            connection = origin.idle.pop()
            if now - connection.idle_since < self._keep_alive:
                return connection
            # Too old to trust: the peer has likely closed it.
            await trio.aclose_forcefully(connection.stream)
        return None

    async def _connect(self, origin: _Origin) -> _Connection:
        try:
            if origin.scheme == "https":
                context = self._ssl_context or ssl.create_default_context()
                stream: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(
                    origin.host, origin.port, ssl_context=context, https_compatible=True)
            else:
                stream = await trio.open_tcp_stream(origin.host, origin.port)
        except OSError as e:
            raise ConnectFailed(f"cannot connect to {origin.host}:{origin.port} "
                                f"({e.strerror or type(e).__name__})") from None
        return _Connection(stream)

    async def _exchange(self, connection: _Connection, origin: _Origin, method: str,
                        target: str, headers: Mapping[str, str], body: bytes,
                        max_answer_bytes: int, reused: bool) -> Response:
        host = origin.host if origin.port in (80, 443) else f"{origin.host}:{origin.port}"
        request = _request_bytes(method, target, host, headers, body)
        try:
            await connection.stream.send_all(request)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if reused:
                raise _Stale from None
            raise HttpError("the connection broke while sending") from None
        return await self._answer(connection, method, max_answer_bytes, reused)

    async def _answer(self, connection: _Connection, method: str, max_answer_bytes: int,
                      reused: bool) -> Response:
        buffer = bytearray()
        try:
            while True:  # interim (1xx) answers are skipped
                while (end := buffer.find(b"\r\n\r\n")) < 0:
                    if len(buffer) > MAX_HEAD_BYTES:
                        raise HttpError("malformed answer: its head is too long")
                    if not await _receive(connection.stream, buffer):
                        if reused and not buffer:
                            raise _Stale
                        raise HttpError("the connection closed during the answer")
                head = parse_head(bytes(buffer[:end]), request_method=method)
                del buffer[:end + 4]
                if head.status == 101:
                    raise HttpError("malformed answer: a protocol switch")
                if head.status >= 200:
                    break
            body = await _body(connection.stream, buffer, head, max_answer_bytes)
        except Malformed as e:
            raise HttpError(f"malformed answer: {e}") from None
        # Bytes after the answer were never asked for: the connection is not trusted again.
        connection.reusable = head.keep_alive and not buffer
        return Response(head.status, head.headers, body)


async def _receive(stream: trio.abc.Stream, buffer: bytearray) -> bool:
    """Appends what arrives to ``buffer``; False when the peer has closed."""
    try:
        received = await stream.receive_some(READ_BYTES)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    buffer += received
    return bool(received)


async def _body(stream: trio.abc.Stream, buffer: bytearray, head: Head,
                max_answer_bytes: int) -> bytes:
    """The answer's body, read from ``buffer`` and the stream; what follows it stays in
    ``buffer``."""
    too_large = AnswerTooLarge(f"answer over {max_answer_bytes} bytes")
    if head.framing >= 0:
        if head.framing > max_answer_bytes:
            raise too_large
        while len(buffer) < head.framing:
            if not await _receive(stream, buffer):
                raise HttpError("the connection closed during the answer")
        body = bytes(buffer[:head.framing])
        del buffer[:head.framing]
        return body
    if head.framing == CHUNKED:
        while (decoded := chunked_body(buffer)) is None:
            # The chunks' framing is small beside their data, unless it is an attack.
            if len(buffer) > 2 * max_answer_bytes + MAX_HEAD_BYTES:
                raise too_large
            if not await _receive(stream, buffer):
                raise HttpError("the connection closed during the answer")
        body, taken = decoded
        del buffer[:taken]
        if len(body) > max_answer_bytes:
            raise too_large
        return body
    # UNTIL_CLOSE
    while await _receive(stream, buffer):
        if len(buffer) > max_answer_bytes:
            raise too_large
    body = bytes(buffer)
    buffer.clear()
    return body


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(r"/[\x21-\x7e]*")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*")
# Ours to say: the framing, and the host we connect to.
_OWN_FIELDS = frozenset({"host", "content-length", "transfer-encoding", "connection"})


def _request_bytes(method: str, target: str, host: str, headers: Mapping[str, str],
                   body: bytes) -> bytes:
    """The request's bytes; a name or value that could break out of its line is refused."""
    if _TOKEN.fullmatch(method) is None or _TARGET.fullmatch(target) is None:
        raise HttpError("the request cannot be sent: a malformed method or target")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    if not any(name.lower() == "user-agent" for name in headers):
        lines.append(f"User-Agent: {USER_AGENT}")
    for name, value in headers.items():
        if _TOKEN.fullmatch(name) is None or _FIELD_VALUE.fullmatch(value) is None:
            raise HttpError("the request cannot be sent: a malformed header field")
        if name.lower() not in _OWN_FIELDS:
            lines.append(f"{name}: {value.strip()}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1") + body
