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

The behaviour is hypercorn's: the keep-alive timeout closes an idle
connection, a stopping server closes idle connections at once and busy ones
after their response, and ``graceful_timeout`` bounds the wait. The module
relies on TCPServer's internals (``idle_task``, ``protocol_send``,
``_read_data``), so ``pyproject.toml`` pins hypercorn to the minor version
these were written against, and tests/integration cover each behaviour.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Event, RawData
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState


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


class Connection(TCPServer):
    """One accepted connection: hypercorn's, with the two changes above."""

    def __init__(self, app: Any, config: HypercornConfig, context: WorkerContext,
                 state: LifespanState, stream: Any) -> None:
        super().__init__(app, config, context, state, stream)
        self.idle_task = KeepAliveTimer(self)  # type: ignore[assignment]
        self._held_head: bytes | None = None

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
        try:
            await super()._read_data()
        finally:
            # The peer is gone or the connection was closed: nothing left to time.
            self.idle_task.close()  # type: ignore[attr-defined]


async def serve(app: Any, config: HypercornConfig, *,
                shutdown_trigger: Callable[[], Awaitable[None]]) -> None:
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
    listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(sock))
                 for sock in sockets.insecure_sockets]

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as connections:
            try:
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(partial(
                        trio.serve_listeners,
                        partial(Connection, wrapped, config, context,
                                ConnectionState(state.copy())),
                        listeners,
                        handler_nursery=connections,
                    ))
                    await shutdown_trigger()
                    accepting.cancel_scope.cancel()  # stop accepting, close the listeners
            finally:
                await context.terminated.set()
                connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
