"""A small HTTP/1.1 client for the integrations' calls out (webhooks, Intune), under trio.

Each enrollment may cost one call out, so the client's own CPU counts: on
this path httpx (through anyio and httpcore) spent 1.2 to 3.5 ms of CPU per
call, about what a whole enrollment costs, while h11 over a trio stream with
a keep-alive pool spends about 0.2 ms (``benchmarks/webhook.py``, RESULTS).
So this is h11 (already the server's parser) and trio, and nothing else:

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

import ssl
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field

import h11
import trio

from scep_fast import __version__

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
    protocol: h11.Connection
    idle_since: float = 0.0


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
                protocol = connection.protocol
                if protocol.our_state is h11.DONE and protocol.their_state is h11.DONE:
                    protocol.start_next_cycle()
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
        return _Connection(stream, h11.Connection(h11.CLIENT))

    async def _exchange(self, connection: _Connection, origin: _Origin, method: str,
                        target: str, headers: Mapping[str, str], body: bytes,
                        max_answer_bytes: int, reused: bool) -> Response:
        protocol = connection.protocol
        host = origin.host if origin.port in (80, 443) else f"{origin.host}:{origin.port}"
        given = {name.lower() for name in headers}
        # The framing is ours to say; the caller may name its own user agent.
        head = [("Host", host), ("Content-Length", str(len(body))),
                *((("User-Agent", USER_AGENT),) if "user-agent" not in given else ()),
                *((name, value) for name, value in headers.items()
                  if name.lower() not in ("host", "content-length", "transfer-encoding"))]
        try:
            data = protocol.send(h11.Request(method=method, target=target, headers=head))
            data = (data or b"") + (protocol.send(h11.Data(data=body)) or b"") if body else data
            data = (data or b"") + (protocol.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError as e:
            raise HttpError(f"the request cannot be sent: {e}") from None
        try:
            await connection.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if reused:
                raise _Stale from None
            raise HttpError("the connection broke while sending") from None
        return await self._answer(connection, max_answer_bytes, reused)

    async def _answer(self, connection: _Connection, max_answer_bytes: int,
                      reused: bool) -> Response:
        protocol = connection.protocol
        status, size, started = 0, 0, False
        headers: dict[str, str] = {}
        chunks: list[bytes] = []
        while True:
            try:
                event = protocol.next_event()
            except h11.RemoteProtocolError as e:
                raise HttpError(f"malformed answer: {e}") from None
            if event is h11.NEED_DATA:
                try:
                    received = await connection.stream.receive_some(READ_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    received = b""
                if not received and reused and not started:
                    raise _Stale
                started = True
                protocol.receive_data(bytes(received))
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                for name, value in event.headers:
                    key = name.decode("latin-1")
                    text = value.decode("latin-1")
                    headers[key] = f"{headers[key]}, {text}" if key in headers else text
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > max_answer_bytes:
                    raise AnswerTooLarge(f"answer over {max_answer_bytes} bytes")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return Response(status, headers, b"".join(chunks))
            elif isinstance(event, h11.ConnectionClosed):
                raise HttpError("the connection closed during the answer")
