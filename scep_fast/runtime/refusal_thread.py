"""While a worker refuses for load, its new connections are refused outside the event loop.

At four times capacity every new device is a new connection to be answered
503, thousands a second, and the CPU each one costs comes out of the
enrollments still served. ``benchmarks/refusal_floor.py`` measured the server's
CPU per refused new connection: about 150 us with a trio task per connection
(the worker's connection loop: about 220 us), 35 us for a loop of plain
socket calls. So while the batcher says it is overloaded, the worker's trio
loop stops accepting (``GatedListener``) and this thread takes the listening
socket's connections instead: a small poll loop of its own, which reads each
request, answers a whole plain PKIOperation POST with the canned 503 (and
``Connection: close``), and hands anything else (another operation, a
request that is not all there within ``READ_SECONDS``, more connections than
it keeps at once) to the trio loop with the bytes read so far, where it is
served as if accepted there. The thread holds the GIL only between socket
calls.
"""

from __future__ import annotations

import contextlib
import errno
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
MAX_PENDING = 512
MAX_RECV = 65536
POLL_MS = 20


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
class _Pending:
    sock: socket.socket
    data: bytes
    deadline: float


class RefusalThread:
    """Refuses a listening socket's new connections while ``active``.

    ``hand_over(sock, data)`` is called in the trio loop (through its token) for
    a connection to serve; ``refused`` counts the refusals, for the loop to
    take with ``take_refused``.
    """

    def __init__(self, listener: socket.socket, *, max_body: int,
                 token: trio.lowlevel.TrioToken,
                 hand_over: Callable[[socket.socket, bytes], None]) -> None:
        self._listener = listener
        self._max_body = max_body
        self._token = token
        self._hand_over = hand_over
        self._active = threading.Event()
        self._stopping = False
        self.retry_after = 1
        self._refused = 0
        self._taken = 0
        self._thread = threading.Thread(target=self._run, name="scep-fast refusals",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def refuse(self) -> None:
        self._active.set()

    def admit(self) -> None:
        self._active.clear()

    def stop(self) -> None:
        self._stopping = True
        self._active.set()
        self._thread.join(timeout=2)

    def take_refused(self) -> int:
        """Refusals since the last call (the thread only adds; the loop only reads)."""
        refused = self._refused
        taken, self._taken = refused - self._taken, refused
        return taken

    def _run(self) -> None:
        listening = self._listener.fileno()
        pending: dict[int, _Pending] = {}
        poller = select.poll()
        while not self._stopping:
            if not self._active.is_set():
                self._give_back(pending)
                self._active.wait()
                poller = select.poll()
                poller.register(listening, select.POLLIN)
                continue
            for fd, event in poller.poll(POLL_MS):
                if fd == listening and event & (select.POLLNVAL | select.POLLERR):
                    self._stopping = True  # the listener is closed: the worker is stopping
                elif fd == listening:
                    self._accept(poller, pending)
                elif fd in pending:
                    self._read(poller, pending, fd)
            now = time.monotonic()
            for fd in [fd for fd, p in pending.items() if p.deadline < now]:
                poller.unregister(fd)
                self._give(pending.pop(fd))
        self._give_back(pending)

    def _accept(self, poller: select.poll, pending: dict[int, _Pending]) -> None:
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
            entry = _Pending(sock, b"", time.monotonic() + READ_SECONDS)
            if len(pending) >= MAX_PENDING:
                self._give(entry)
                continue
            pending[sock.fileno()] = entry
            poller.register(sock, select.POLLIN)

    def _read(self, poller: select.poll, pending: dict[int, _Pending], fd: int) -> None:
        entry = pending[fd]
        try:
            chunk = entry.sock.recv(MAX_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            poller.unregister(fd)
            pending.pop(fd).sock.close()
            return
        entry.data += chunk
        total = fast_refusal.pki_post_length(entry.data, self._max_body)
        if total == fast_refusal.INCOMPLETE or (total is not None and len(entry.data) < total):
            return
        poller.unregister(fd)
        del pending[fd]
        if total is None or len(entry.data) > total or not self._active.is_set():
            self._give(entry)  # something else, or more than one request: served
            return
        with contextlib.suppress(OSError):
            entry.sock.send(fast_refusal.response(self.retry_after, close=True))
        entry.sock.close()
        self._refused += 1

    def _give(self, entry: _Pending) -> None:
        try:
            self._token.run_sync_soon(self._hand_over, entry.sock, entry.data)
        except trio.RunFinishedError:
            entry.sock.close()

    def _give_back(self, pending: dict[int, _Pending]) -> None:
        for entry in pending.values():
            self._give(entry)
        pending.clear()
