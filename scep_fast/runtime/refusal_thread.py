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

The thread is a small epoll loop of its own. It reads each request and
answers a whole plain PKIOperation POST with the canned 503 (the connection
stays open, as HTTP/1.1 says, and waits here for its next request). Anything
else (another operation, a request that is not all there within
``READ_SECONDS``, every request once the worker serves again) goes to the
trio loop with the bytes read so far, where it is served as if accepted
there. So connections come back to the loop one at a time, when their next
request arrives, not all at once when the load falls. A connection idle for
the keep-alive timeout is closed, as the loop would close it. The thread
holds the GIL only between socket calls.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from scep_fast.runtime import fast_refusal

__all__ = ["Gate", "GatedListener", "RefusalThread"]

# A request not all there by then is handed to the trio loop (slow clients are its job).
READ_SECONDS = 0.05
# Connections the thread holds at once; past it new ones are refused and closed,
# and kept-alive ones stay with the trio loop.
MAX_CONNECTIONS = 8192
MAX_RECV = 65536
POLL_SECONDS = 0.02
MAX_EVENTS = 256


class Gate:
    """Whether the trio loop accepts new connections (open) or leaves them to the thread."""

    def __init__(self) -> None:
        self.closed = False
        self._opened = trio.Event()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._opened = trio.Event()

    def open(self) -> None:
        self.closed = False
        self._opened.set()

    async def wait_open(self) -> None:
        await self._opened.wait()


class GatedListener(trio.abc.Listener[trio.SocketStream]):
    """A listener that accepts only while its gate is open."""

    def __init__(self, inner: trio.abc.Listener[trio.SocketStream], gate: Gate) -> None:
        self._inner = inner
        self._gate = gate

    async def accept(self) -> trio.SocketStream:
        while self._gate.closed:
            await self._gate.wait_open()
        return await self._inner.accept()

    async def aclose(self) -> None:
        await self._inner.aclose()


@dataclass
class _Held:
    """A connection in the thread: reading a request, or idle between two."""

    sock: socket.socket
    data: bytes
    deadline: float
    idle: bool


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
        # Shared with the trio thread, under the lock: the flags, the parked
        # sockets not taken in yet, and the wake-up descriptor (closed at the end).
        self._lock = threading.Lock()
        self._refusing = False
        self._stopping = False
        self._parked: collections.deque[socket.socket] = collections.deque()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # The thread's own.
        self._held: dict[int, _Held] = {}
        # When each held connection is due, one queue per kind (idle or reading):
        # each kind waits a fixed time, so a queue stays in deadline order and
        # expiry looks only at its head. An entry whose connection has moved on
        # since is skipped (see _expire).
        self._deadlines: dict[bool, collections.deque[tuple[float, int, _Held]]] = {
            False: collections.deque(), True: collections.deque()}
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
                    or len(self._parked) + len(self._held) >= MAX_CONNECTIONS):
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

    def _run(self) -> None:
        poller = select.epoll()
        poller.register(self._wake, select.EPOLLIN)
        listening = False
        try:
            while not self._stopping:
                if self._refusing != listening:
                    listening = self._listen(poller, self._refusing)
                timeout = POLL_SECONDS if listening or self._held else -1
                for fd, _events in poller.poll(timeout, MAX_EVENTS):
                    if fd == self._wake:
                        self._take_parked(poller)
                    elif listening and fd == self._listener.fileno():
                        self._accept(poller)
                    elif fd in self._held:
                        self._read(poller, self._held[fd])
                self._expire(poller, time.monotonic())
        finally:
            self._finish(poller)

    def _listen(self, poller: select.epoll, refusing: bool) -> bool:
        """Starts or stops taking new connections; True if it now takes them."""
        if not refusing:
            with contextlib.suppress(OSError, ValueError):
                poller.unregister(self._listener)
            for held in [held for held in self._held.values() if not held.idle]:
                self._give(poller, held)  # mid-request: the loop serves it now
            return False
        try:
            poller.register(self._listener, select.EPOLLIN)
        except (OSError, ValueError):
            return False  # the listener is closed: the worker is stopping
        return True

    def _hold(self, poller: select.epoll, sock: socket.socket, *, idle: bool) -> None:
        held = _Held(sock, b"", 0.0, idle)
        self._held[sock.fileno()] = held
        poller.register(sock, select.EPOLLIN)
        self._wait(held, idle=idle)

    def _wait(self, held: _Held, *, idle: bool) -> None:
        """Sets what the connection waits for: its next request (idle) or the rest of one."""
        held.idle = idle
        held.deadline = time.monotonic() + (self._keep_alive if idle else READ_SECONDS)
        self._deadlines[idle].append((held.deadline, held.sock.fileno(), held))

    def _take_parked(self, poller: select.epoll) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake)
        with self._lock:
            parked, self._parked = self._parked, collections.deque()
        for sock in parked:
            sock.setblocking(False)
            self._hold(poller, sock, idle=True)

    def _accept(self, poller: select.epoll) -> None:
        for _ in range(64):  # what is waiting now, then back to the others
            try:
                sock, _address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    time.sleep(0.01)  # the loop's accept has the same back-off
                return
            sock.setblocking(False)
            self._hold(poller, sock, idle=False)

    def _read(self, poller: select.epoll, held: _Held) -> None:
        try:
            chunk = held.sock.recv(MAX_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(poller, held)
            return
        held.data += chunk
        if not self._refusing:
            self._give(poller, held)
            return
        total = fast_refusal.pki_post_length(held.data, self._max_body)
        if total == fast_refusal.INCOMPLETE or (total is not None and len(held.data) < total):
            if held.idle:
                self._wait(held, idle=False)
            return
        if total is None or len(held.data) > total:
            self._give(poller, held)  # something else, or more than one request: served
            return
        close = len(self._held) > MAX_CONNECTIONS
        answer = fast_refusal.response(self.retry_after, close=close)
        try:
            complete = held.sock.send(answer) == len(answer)
        except OSError:
            complete = False
        self._refused += 1
        if close or not complete:
            self._drop(poller, held)  # a client that does not read its answers is let go
            return
        held.data = b""
        self._wait(held, idle=True)

    def _expire(self, poller: select.epoll, now: float) -> None:
        """Idle past the keep-alive timeout: closed; a request not all there: served."""
        for idle, deadlines in self._deadlines.items():
            while deadlines and deadlines[0][0] <= now:
                deadline, fd, held = deadlines.popleft()
                if self._held.get(fd) is not held or held.deadline != deadline:
                    continue  # it has moved on since
                if idle:
                    self._drop(poller, held)
                else:
                    self._give(poller, held)

    def _release(self, poller: select.epoll, held: _Held) -> None:
        fd = held.sock.fileno()
        with contextlib.suppress(OSError, ValueError):
            poller.unregister(fd)
        self._held.pop(fd, None)

    def _drop(self, poller: select.epoll, held: _Held) -> None:
        self._release(poller, held)
        held.sock.close()

    def _give(self, poller: select.epoll, held: _Held) -> None:
        self._release(poller, held)
        try:
            self._token.run_sync_soon(self._hand_over, held.sock, held.data)
        except trio.RunFinishedError:
            held.sock.close()

    def _finish(self, poller: select.epoll) -> None:
        """The worker stops: a request under way is served, an idle connection closed."""
        with self._lock:
            self._stopping = True
            parked, self._parked = self._parked, collections.deque()
            os.close(self._wake)
            self._wake = -1
        for sock in parked:
            sock.close()
        for held in list(self._held.values()):
            if held.data:
                self._give(poller, held)
            else:
                self._drop(poller, held)
        poller.close()
