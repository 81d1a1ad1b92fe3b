"""hypercorn on trio, with a leaner connection driver.

hypercorn parses HTTP/1.1 (h11) and runs the ASGI app; this module replaces
only its per-connection loop (``hypercorn.trio.tcp_server.TCPServer``) and
the worker loop that accepts connections, for two costs measured on every
request (a trivial ASGI app answering 2.6 KB to 3.5 KB POSTs over
keep-alive, one process, on a 2-core machine):

- hypercorn arms its keep-alive timer by cancelling one task and starting
  another each time a connection goes idle: about 0.1 ms of CPU per request,
  a third of the HTTP layer. ``KeepAliveTimer`` keeps one task per connection
  and moves its deadline instead.
- hypercorn writes a response's head and its body in two writes (two TCP
  segments, two wake-ups of the client). ``Connection`` holds the head of a
  final response until the first body bytes and writes both at once: about
  0.04 ms per request.

Under overload most requests are refused (see ``fast_refusal``), and
building hypercorn's machinery for a connection (its protocol, task group,
keep-alive watcher, addresses, and the orderly close) costs several times
what the refusal itself does: about 0.3 ms against 0.04 ms for a refusal on
a kept-alive connection. So each accepted connection starts at
``FrontDoor``, which answers refusals for load with nothing but the socket
and builds the ``Connection`` only when a request is to be served.

It also narrows what the port speaks to HTTP/1.0 and HTTP/1.1 (see
``http1``): hypercorn would take the HTTP/2 preface or ``Upgrade: h2c`` to
HTTP/2 and hand a websocket handshake to the app, which has no answer for
it. ``Http1Protocol`` refuses those, and a request that has both
Content-Length and Transfer-Encoding, with 400 and a closed connection.

The behaviour is hypercorn's: the keep-alive timeout closes an idle
connection, a stopping server closes idle connections at once and busy ones
after their response, and ``graceful_timeout`` bounds the wait. The module
relies on TCPServer's internals (``run``, ``idle_task``, ``protocol_send``,
``_read_data``) and H11Protocol's (``_check_protocol``, ``_create_stream``,
``_send_h11_event``), so ``pyproject.toml`` pins hypercorn to the minor
version these were written against, and tests cover each behaviour over
real sockets.
"""

from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import h11
import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import parse_socket_addr

from scep_fast.runtime import fast_refusal, http1, metrics
from scep_fast.runtime.fast_refusal import FastRefusal, LoadState
from scep_fast.runtime.logs import CountedLine
from scep_fast.runtime.refusal_thread import Gate, GatedListener, RefusalThread

# h11 states in which no request is under way on a connection.
_BETWEEN = (h11.IDLE, h11.DONE)


def _is_final_response_head(data: bytes) -> bool:
    """h11 writes a response head as one piece: status line to the blank line."""
    return data.startswith(b"HTTP/1.") and data[9:10] != b"1" and data.endswith(b"\r\n\r\n")


class KeepAliveTimer:
    """A connection's keep-alive timer, in place of hypercorn's TrioSingleTask.

    ``restart`` (the connection went idle) sets the deadline, ``stop`` (a
    request began) lifts it; one watcher task per connection waits for the
    deadline or for the server to stop, and then closes the connection if it
    is idle. A busy connection is closed by hypercorn after its response
    when the server is stopping.
    """

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._scope = trio.CancelScope()
        self._idle = False
        self._watching = False

    async def restart(self, task_group: Any, action: Callable[[], Awaitable[None]]) -> None:
        del action  # hypercorn's own timer body; the watcher below does its job
        self._idle = True
        self._scope.deadline = trio.current_time() + self._connection.config.keep_alive_timeout
        if not self._watching:
            self._watching = True
            task_group.spawn(self._watch)

    async def stop(self) -> None:
        self._idle = False
        self._scope.deadline = math.inf

    def close(self) -> None:
        """The connection is over: the watcher ends without touching it."""
        self._idle = False
        self._scope.cancel()

    async def _watch(self) -> None:
        with self._scope:
            await self._connection.context.terminated.wait()
        if self._idle:
            with trio.CancelScope(shield=True):
                await self._connection._initiate_server_close()


class _Refused(Exception):
    """A request head the port does not serve; ``reason`` is what the client reads."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# HTTP-level refusals (a malformed request, HTTP/2, an upgrade, Content-Length
# with Transfer-Encoding): counted, and logged at most once a second.
_protocol_refusals = CountedLine(logging.getLogger("scep_fast.request"),
                                 "requests refused at the HTTP layer", {"operation": "-"})


def _note_protocol_refusal(status: int, reason: str) -> None:
    outcome = f"http_{status}"
    metrics.REQUESTS.labels("-", "-", outcome).inc()
    _protocol_refusals.note(status=status, outcome=outcome, reason=reason)


class Http1Protocol(H11Protocol):
    """hypercorn's HTTP/1.1 protocol without its ways into HTTP/2 and websockets.

    hypercorn checks each request head in ``_check_protocol`` (where it
    switches to HTTP/2) and picks the stream in ``_create_stream`` (where a
    websocket handshake gets a websocket stream): here the first applies
    ``http1.judge`` instead, and the second never sees an ``Upgrade`` header.
    """

    _ignore_upgrade = False

    async def handle(self, event: Event) -> None:
        try:
            await super().handle(event)
        except _Refused as refused:
            await self._refuse(refused.reason)

    async def _check_protocol(self, event: h11.Request) -> None:
        verdict = http1.judge(event.http_version.decode("ascii"), event.headers)
        if verdict.refusal is not None:
            raise _Refused(verdict.refusal)
        self._ignore_upgrade = verdict.ignore_upgrade

    async def _create_stream(self, request: h11.Request) -> None:
        if self._ignore_upgrade:
            # Served as if the header were absent (see http1); h11 takes the
            # ordinary response as the refusal of the switch.
            request = h11.Request(
                method=request.method, target=request.target,
                http_version=request.http_version,
                headers=[(name, value) for name, value in request.headers.raw_items()
                         if name.lower() != b"upgrade"])
        await super()._create_stream(request)

    async def _send_error_response(self, status_code: int) -> None:
        """h11's answer to a request it cannot parse: 400, or 431 for a huge head. h11
        hints 501 for a transfer coding it does not know; that is the client's request
        too, and gets 400 as ``http1`` says."""
        if status_code >= 500:
            status_code = 400
        _note_protocol_refusal(status_code, "malformed request")
        await super()._send_error_response(status_code)

    async def _refuse(self, reason: str) -> None:
        """400 with the reason, then the connection closes: what follows is not read."""
        _note_protocol_refusal(400, reason)
        body = f"{reason}\n".encode()
        await self._send_h11_event(h11.Response(status_code=400, headers=[
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *self.config.response_headers("h11")]))
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())
        await self.send(Closed())


# Hands a kept-alive connection just refused for load to the refusal thread
# (refusal_thread); False when the thread does not take it.
Park = Callable[[trio.SocketStream], bool]


class Connection(TCPServer):
    """One accepted connection: hypercorn's, with the changes above."""

    def __init__(self, app: Any, config: HypercornConfig, context: WorkerContext,
                 state: LifespanState, fast_refusal: FastRefusal | None, stream: Any,
                 received: bytes = b"", park: Park | None = None) -> None:
        super().__init__(app, config, context, state, stream)
        self.idle_task = KeepAliveTimer(self)  # type: ignore[assignment]
        self._held_head: bytes | None = None
        self._fast_refusal = fast_refusal
        self._park = park
        # What the front door read before handing the connection over.
        self._received = received

    async def run(self) -> None:
        """hypercorn's ``TCPServer.run`` for a plain socket, with ``Http1Protocol``.

        hypercorn's own picks HTTP/2 on ALPN and switches to it on the
        preface or an h2c upgrade; these sockets carry no TLS, so no ALPN.
        """
        try:
            sock = self.stream.socket
            client = parse_socket_addr(sock.family, sock.getpeername())
            server = parse_socket_addr(sock.family, sock.getsockname())
            async with TaskGroup() as task_group:
                self._task_group = task_group
                self.protocol = Http1Protocol(  # type: ignore[assignment]
                    self.app, self.config, self.context, task_group,
                    ConnectionState(self.state), False, client, server, self.protocol_send)
                await self.protocol.initiate()
                await self.idle_task.restart(self._task_group, self._idle_timeout)
                await self._read_data()
        except OSError:
            pass
        finally:
            await self._close()

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData):
            data = event.data
            if self._held_head is not None:
                data, self._held_head = self._held_head + data, None
            elif _is_final_response_head(data):
                self._held_head = data
                return
            if not data:  # the end of a Content-Length body: nothing to write
                return
            event = RawData(data=data)
        elif self._held_head is not None:
            held, self._held_head = self._held_head, None
            await super().protocol_send(RawData(data=held))
        await super().protocol_send(event)

    async def _read_data(self) -> None:
        """hypercorn's read loop, with refusals for load answered before h11 (see fast_refusal)."""
        try:
            if self._received:
                await self.protocol.handle(RawData(self._received))
                self._received = b""
            while True:
                try:
                    with trio.fail_after(self.config.read_timeout or math.inf):
                        data = bytes(await self.stream.receive_some(MAX_RECV))
                except (trio.ClosedResourceError, trio.BrokenResourceError, trio.TooSlowError):
                    break
                if data and self._fast_refusal is not None and self._between_requests():
                    data = await refuse_for_load(self.stream, data, self._fast_refusal)
                    if not data:
                        if self._park_here():
                            break  # the refusal thread has the socket now
                        continue  # all of it answered: not the end of the stream
                await self.protocol.handle(RawData(data))
                if data == b"":
                    break
            await self.protocol.handle(Closed())
        finally:
            # The peer is gone or the connection was closed: nothing left to time.
            self.idle_task.close()  # type: ignore[attr-defined]

    def _park_here(self) -> bool:
        """Hands the connection, just refused for load, to the refusal thread if it takes it."""
        return (self._park is not None and isinstance(self.stream, trio.SocketStream)
                and self._park(self.stream))

    def _between_requests(self) -> bool:
        """No request under way and nothing buffered: the next bytes start a request.

        Both sides done with the last exchange counts too: hypercorn moves h11
        on to the next cycle only once the app has returned, which may be just
        after the client, holding its whole answer, has sent the next request.
        """
        h11_connection = getattr(self.protocol, "connection", None)
        return (isinstance(h11_connection, h11.Connection)
                and h11_connection.our_state in _BETWEEN
                and h11_connection.their_state in _BETWEEN
                and not h11_connection.trailing_data[0])



async def refuse_for_load(stream: Any, data: bytes, refusal: FastRefusal) -> bytes:
    """Answers each whole PKIOperation POST at the start of ``data`` with 503 while the
    worker refuses them; returns the bytes left for the ordinary path."""
    while data:
        started = time.perf_counter()
        length = fast_refusal.whole_pki_post(data, refusal.max_body)
        if not length:
            return data
        retry_after = refusal.refuse()
        if retry_after is None:
            return data
        await stream.send_all(fast_refusal.response(retry_after))
        data = data[length:]
        refusal.refused(time.perf_counter() - started)
    return data


class FrontDoor:
    """Where every accepted connection starts (see the module docstring).

    While each request that arrives is one the worker refuses for load, the
    door answers it with only the socket; the first request to be served
    (or bytes it cannot judge: a partial request, anything but a plain
    PKIOperation POST) builds the ``Connection``, which takes over with the
    bytes read so far. An idle connection is closed after the keep-alive
    timeout, and at once when the server stops, as hypercorn would.
    """

    def __init__(self, make_connection: Callable[[Any, bytes], Connection],
                 config: HypercornConfig, refusal: FastRefusal | None,
                 park: Park | None = None) -> None:
        self._make_connection = make_connection
        self._keep_alive = config.keep_alive_timeout
        self._refusal = refusal
        self._park = park
        self._waiting: set[trio.CancelScope] = set()
        self._closing = False

    async def __call__(self, stream: trio.SocketStream, received: bytes = b"") -> None:
        """A new connection; ``received``: what the refusal thread read from it already."""
        if self._refusal is not None:
            try:
                received = await self._refuse_while_overloaded(stream, self._refusal, received)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                received = b""
            if not received:
                await stream.aclose()
                return
        await self._make_connection(stream, received).run()

    async def _refuse_while_overloaded(self, stream: trio.SocketStream,
                                       refusal: FastRefusal, data: bytes) -> bytes:
        """Refuses what arrives (``data`` first) while the worker refuses; the bytes to
        serve, or b"" to close (or when the refusal thread has taken the connection)."""
        while not self._closing:
            if not data:
                with trio.move_on_after(self._keep_alive) as waiting:
                    self._waiting.add(waiting)
                    try:
                        data = bytes(await stream.receive_some(MAX_RECV))
                    finally:
                        self._waiting.discard(waiting)
                if waiting.cancelled_caught or not data:
                    return b""
            data = await refuse_for_load(stream, data, refusal)
            if data:
                return data
            if self._park is not None and self._park(stream):
                return b""  # the refusal thread has the socket now
        return b""

    def close_idle(self) -> None:
        """The server stops: connections waiting at the door for a request are closed."""
        self._closing = True
        for waiting in self._waiting:
            waiting.cancel()


async def serve(app: Any, config: HypercornConfig, *,
                shutdown_trigger: Callable[[], Awaitable[None]],
                fast_refusal: FastRefusal | None = None) -> None:
    """Serves ``app`` on ``config.bind`` until ``shutdown_trigger`` returns, then drains.

    hypercorn's ``worker_serve`` for plain HTTP sockets (``fd://N`` or
    ``host:port``), with ``Connection`` for each accepted stream.
    """
    wrapped = ASGIWrapper(app)
    state: LifespanState = {}
    lifespan = Lifespan(wrapped, config, state)
    context = WorkerContext(None)
    sockets = config.create_sockets()
    for sock in sockets.insecure_sockets:
        sock.listen(config.backlog)
    listeners: list[trio.abc.Listener[trio.SocketStream]] = [
        trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        for sock in sockets.insecure_sockets]

    threads: list[RefusalThread] = []
    gate = Gate()

    def park(stream: trio.SocketStream) -> bool:
        if not threads:
            return False
        # The loop has just refused a request for load: from now on new
        # connections go to the threads, without waiting for the watcher's
        # next look (in a storm of retries the loop would refuse hundreds
        # more meanwhile, each several times dearer than a thread's refusal).
        refuse_elsewhere(gate, threads)
        # Any thread can hold any connection; the first takes them all (a worker
        # has one listening socket unless several binds are configured).
        return threads[0].park(lambda: socket.socket(fileno=stream.socket.detach()))

    def make_connection(stream: Any, received: bytes) -> Connection:
        return Connection(wrapped, config, context, ConnectionState(state.copy()),
                          fast_refusal, stream, received, park)

    door = FrontDoor(make_connection, config, fast_refusal, park)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as connections:

            def hand_over(sock: socket.socket, received: bytes) -> None:
                # In the trio loop (the thread's token): serve it as if accepted here.
                try:
                    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
                    connections.start_soon(door, stream, received)
                except (OSError, RuntimeError):
                    sock.close()

            load = fast_refusal.load if fast_refusal is not None else None
            if fast_refusal is not None and load is not None:
                token = trio.lowlevel.current_trio_token()
                threads.extend(
                    RefusalThread(sock, max_body=fast_refusal.max_body, token=token,
                                  keep_alive_seconds=config.keep_alive_timeout,
                                  hand_over=hand_over)
                    for sock in sockets.insecure_sockets)
                listeners = [GatedListener(listener, gate) for listener in listeners]
            try:
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(partial(
                        trio.serve_listeners, door, listeners, handler_nursery=connections))
                    if fast_refusal is not None and load is not None:
                        for thread in threads:
                            thread.start()
                        accepting.start_soon(_watch_load, fast_refusal, load, gate, threads)
                    await shutdown_trigger()
                    for thread in threads:
                        thread.stop()
                    gate.open()
                    accepting.cancel_scope.cancel()  # stop accepting, close the listeners
            finally:
                for thread in threads:
                    thread.stop()  # again, if the loop was cancelled before the trigger
                door.close_idle()
                await context.terminated.set()
                connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


# How often the worker's load is looked at to hand new connections to the refusal
# thread or take them back.
WATCH_SECONDS = 0.01


def refuse_elsewhere(gate: Gate, threads: list[RefusalThread]) -> None:
    """New connections go to the refusal threads, which refuse while the gate is closed
    (unless a thread is not running: then the loop keeps accepting and refusing)."""
    if not gate.closed and all(thread.running for thread in threads):
        gate.close()
        for thread in threads:
            thread.refuse()


async def _watch_load(refusal: FastRefusal, load: LoadState, gate: Gate,
                      threads: list[RefusalThread]) -> None:
    """Closes the gate (new connections to the threads) while the worker is overloaded,
    opens it once relieved; folds the threads' refusals into the metrics."""
    while True:
        await trio.sleep(WATCH_SECONDS)
        if gate.closed and load.relieved():
            gate.open()
            for thread in threads:
                thread.admit()
        elif gate.closed or load.overloaded():
            retry_after = load.retry_after_now()
            for thread in threads:
                thread.retry_after = retry_after
            refuse_elsewhere(gate, threads)
        refused = sum(thread.take_refused() for thread in threads)
        if refused:
            load.note_refused(refused)
            refusal.refused_elsewhere(refused)
