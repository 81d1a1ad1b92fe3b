"""While a worker refuses for load, its connections are refused outside the event loop.

At four times capacity most requests are answered 503, thousands a second,
and the CPU each one costs comes out of the enrollments still served.
``benchmarks/refusal_floor.py`` measured the server's CPU per refused new
connection: about 150 us with a trio task per connection (the worker's
connection loop: about 220 us), 35 us for a loop of plain socket calls; a
profile at 4x with clients that retry whatever Retry-After says found two
thirds of the worker's time in the trio loop refusing requests on kept-alive
connections. So while the batcher says it is overloaded:

- the worker's trio loop stops accepting (``GatedListener``) and this thread
  takes the listening socket's new connections instead;
- a kept-alive connection the trio loop has just answered 503 is handed to
  the thread (``park``) rather than waited on by a trio task.

The thread runs a small epoll loop in C (``native/src/refusal.c``), with the
GIL released. It reads each request and answers a whole plain PKIOperation
POST with the canned 503 (the connection stays open, as HTTP/1.1 says, and
waits there for its next request). Anything else (another operation, a
request that is not all there within ``READ_SECONDS``, every request once
the worker serves again) comes back to this thread with the bytes read so
far and goes to the trio loop, where it is served as if accepted there. So
connections come back to the loop one at a time, when their next request
arrives, not all at once when the load falls. A connection idle for the
keep-alive timeout is closed, as the loop would close it. In a storm of
retries the refusals are most of what a worker does; in C they cost the
interpreter nothing, so the batch threads are not kept waiting for the GIL.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

import trio

from scep_fast._native import ffi, lib
from scep_fast.runtime import fast_refusal

__all__ = ["Gate", "GatedListener", "RefusalThread"]

log = logging.getLogger("scep_fast.worker")

# A request not all there by then is handed to the trio loop (slow clients are its job).
READ_SECONDS = 0.05
# Connections the thread holds at once; past it a refusal closes its connection,
# and kept-alive ones stay with the trio loop.
MAX_CONNECTIONS = 8192
POLL_MILLISECONDS = 20
# Connections handed back per round of the loop (more wait for the next round).
MAX_HANDBACKS = 256


class Gate:
    """Whether the trio loop accepts new connections (open) or leaves them to the thread."""

    def __init__(self) -> None:
        self.closed = False
        self._opened = trio.Event()
        # The accepts waiting now: closing cancels them, or each would still take
        # the next connection, and refuse it the dear way.
        self._accepting: set[trio.CancelScope] = set()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._opened = trio.Event()
            for scope in self._accepting:
                scope.cancel()

    def open(self) -> None:
        self.closed = False
        self._opened.set()

    async def wait_open(self) -> None:
        await self._opened.wait()

    async def accept(self, inner: trio.abc.Listener[trio.SocketStream]) -> trio.SocketStream:
        """``inner``'s next connection, taken while the gate is open."""
        while True:
            while self.closed:
                await self.wait_open()
            with trio.CancelScope() as scope:
                self._accepting.add(scope)
                try:
                    return await inner.accept()  # cancelled before it takes one, or not at all
                finally:
                    self._accepting.discard(scope)


class GatedListener(trio.abc.Listener[trio.SocketStream]):
    """A listener that accepts only while its gate is open."""

    def __init__(self, inner: trio.abc.Listener[trio.SocketStream], gate: Gate) -> None:
        self._inner = inner
        self._gate = gate

    async def accept(self) -> trio.SocketStream:
        return await self._gate.accept(self._inner)

    async def aclose(self) -> None:
        await self._inner.aclose()


class RefusalThread:
    """Refuses a listening socket's new connections, and parked ones, while refusing.

    ``hand_over(sock, data)`` is called in the trio loop (through its token)
    for a connection to serve; ``refused`` counts the refusals, for the loop
    to take with ``take_refused``.
    """

    def __init__(self, listener: socket.socket, *, max_body: int, keep_alive_seconds: float,
                 token: trio.lowlevel.TrioToken,
                 hand_over: Callable[[socket.socket, bytes], None]) -> None:
        self._listener = listener
        self._max_body = max_body
        self._keep_alive = keep_alive_seconds
        self._token = token
        self._hand_over = hand_over
        self.retry_after = 1
        self._refused = 0
        self._taken = 0
        # Connections in the C loop after its last round (read by park).
        self._held = 0
        # Shared with the trio thread, under the lock: the flags, the parked
        # sockets not taken in yet, and the wake-up descriptor (closed at the end).
        self._lock = threading.Lock()
        self._refusing = False
        self._stopping = False
        self._parked: collections.deque[socket.socket] = collections.deque()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="scep-fast refusals",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def refuse(self) -> None:
        self._set(refusing=True)

    def admit(self) -> None:
        self._set(refusing=False)

    def stop(self) -> None:
        self._set(stopping=True)
        if self._thread.ident is None:  # never started: nothing else will close it
            with self._lock:
                if self._wake >= 0:
                    os.close(self._wake)
                    self._wake = -1
        elif self._thread.is_alive():
            self._thread.join(timeout=2)

    def park(self, detach: Callable[[], socket.socket]) -> bool:
        """Takes a kept-alive connection the loop has just refused, while refusing:
        ``detach`` gives up the loop's hold on the socket. False: the loop keeps it."""
        with self._lock:
            if (self._stopping or not self._refusing
                    or len(self._parked) + self._held >= MAX_CONNECTIONS):
                return False
            if not self._parked:  # otherwise a wake-up is on its way already
                os.eventfd_write(self._wake, 1)
            self._parked.append(detach())
            return True

    def take_refused(self) -> int:
        """Refusals since the last call (the thread only adds; the loop only reads)."""
        refused = self._refused
        taken, self._taken = refused - self._taken, refused
        return taken

    def _set(self, *, refusing: bool | None = None, stopping: bool = False) -> None:
        with self._lock:
            if self._stopping:
                return
            if refusing is not None:
                self._refusing = refusing
            self._stopping = stopping
            os.eventfd_write(self._wake, 1)

    @property
    def running(self) -> bool:
        """Whether the thread takes connections (the trio loop must not leave them to it
        otherwise)."""
        return self._thread.is_alive() and not self._stopping

    def _run(self) -> None:
        loop = lib.scep_refusal_new(self._wake, self._max_body, self._keep_alive,
                                    READ_SECONDS, MAX_CONNECTIONS)
        if loop == ffi.NULL:
            with self._lock:
                self._stopping = True  # parks nothing; the trio loop keeps accepting
            log.error("the refusal thread cannot start: %s", os.strerror(ffi.errno))
            return
        out = ffi.new("scep_handback[]", MAX_HANDBACKS)
        round_ = ffi.new("scep_refusal_round *")
        answers = _Answers()
        try:
            while not self._stopping:
                refusing = self._refusing
                listener = self._listener.fileno() if refusing else -1
                timeout = POLL_MILLISECONDS if refusing or self._held else -1
                keep, close = answers.get(self.retry_after)
                if not lib.scep_refusal_poll(loop, listener, refusing, timeout, keep, close,
                                             out, MAX_HANDBACKS, round_):
                    errno = ffi.errno
                    raise OSError(errno, os.strerror(errno))
                self._refused += round_.refused
                self._give(out, round_.handed_back)
                if round_.woken:
                    self._take_parked(loop)
                self._held = lib.scep_refusal_held(loop)
        finally:
            self._finish(loop, out)

    def _take_parked(self, loop: Any) -> None:
        with self._lock:
            parked, self._parked = self._parked, collections.deque()
        for sock in parked:
            sock.setblocking(False)
            fd = sock.detach()
            if not lib.scep_refusal_hold(loop, fd):
                os.close(fd)

    def _give(self, out: Any, count: int) -> None:
        """To the trio loop, with the bytes read (copied: the loop's own live only
        until its next round)."""
        for i in range(count):
            handback = out[i]
            if handback.fd < 0:
                continue
            try:
                sock = socket.socket(fileno=handback.fd)
            except OSError:
                os.close(handback.fd)
                continue
            data = ffi.buffer(handback.data, handback.len)[:] if handback.len else b""
            try:
                self._token.run_sync_soon(self._hand_over, sock, data)
            except trio.RunFinishedError:
                sock.close()

    def _finish(self, loop: Any, out: Any) -> None:
        """The worker stops: a request under way is served, an idle connection closed."""
        with self._lock:
            self._stopping = True
            parked, self._parked = self._parked, collections.deque()
        while given := lib.scep_refusal_finish(loop, out, MAX_HANDBACKS):
            self._give(out, given)
        lib.scep_refusal_free(loop)
        with self._lock:
            os.close(self._wake)
            self._wake = -1
        for sock in parked:
            sock.close()


class _Answers:
    """The canned 503s (kept alive, and closing) as C buffers, rebuilt when
    Retry-After changes."""

    def __init__(self) -> None:
        self._retry_after = -1
        self._keep: list[Any] = []    # the bytes the buffers point into
        self._buffers: list[Any] = []

    def get(self, retry_after: int) -> tuple[Any, Any]:
        if retry_after != self._retry_after:
            self._retry_after = retry_after
            self._keep = [ffi.from_buffer(fast_refusal.response(retry_after, close=close))
                          for close in (False, True)]
            self._buffers = [ffi.new("scep_buf *", {"data": data, "len": len(data)})
                             for data in self._keep]
        return self._buffers[0][0], self._buffers[1][0]
