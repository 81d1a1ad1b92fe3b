"""The refusal loop of the native core (refusal.c) and its request test (http_head.c).

The loop is driven here directly, one round at a time, with real sockets on
127.0.0.1, so that every path (refused and kept, handed back, read timeout,
keep-alive timeout, too many connections, a client gone, the end) runs
under the sanitizers too.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import h11

from scep_fast._native import ffi, lib

BODY = b"\x30\x82" + bytes(2000)
PKI_POST = (b"POST /scep/pkiclient.exe?operation=PKIOperation HTTP/1.1\r\nhost: t\r\n"
            b"content-type: application/x-pki-message\r\ncontent-length: %d\r\n\r\n"
            % len(BODY)) + BODY
ANSWER = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nretry-after: 7\r\n\r\n"
ANSWER_CLOSE = ANSWER.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n")
OTHER = lib.SCEP_HTTP_OTHER
INCOMPLETE = lib.SCEP_HTTP_INCOMPLETE


def length(data: bytes, max_body: int = 65536) -> int:
    return int(lib.scep_pki_post_length(data, len(data), max_body))


# ---- the request test ------------------------------------------------------------------

def test_a_whole_plain_pkioperation_post_is_measured_from_its_head() -> None:
    assert length(PKI_POST) == len(PKI_POST)
    assert length(PKI_POST[:-1]) == len(PKI_POST)  # the head says how long it is
    assert length(PKI_POST + b"GET / HTTP/1.1\r\n") == len(PKI_POST)
    head = PKI_POST[:PKI_POST.index(b"\r\n\r\n") + 4]
    assert length(head[:-1]) == INCOMPLETE and length(b"") == INCOMPLETE
    for same in (PKI_POST.replace(b"content-length:", b"Content-Length:"),
                 PKI_POST.replace(b"content-length: ", b"content-length:\t "),
                 PKI_POST.replace(b"2002\r\n", b"2002  \r\n"),
                 PKI_POST.replace(b"?operation=PKIOperation", b"?message=x&operation=PKIOperation"),
                 PKI_POST.replace(b"/scep/pkiclient.exe", b"/cgi-bin/pkiclient.exe"),
                 PKI_POST.replace(b"host: t", b"Host:t")):
        assert length(same) == len(same), same[:160]


# Each a change to PKI_POST that makes it something else.
NOT_ONE = [
    (b"HTTP/1.1", b"HTTP/1.0"),
    (b"POST /", b"POST  /"),
    (b"POST", b"post"),
    (b"operation=PKIOperation", b"operation=PKIOperationX"),
    (b"operation=PKIOperation", b"Operation=PKIOperation"),
    (b"?operation", b"#operation"),
    (b"/scep", b"/other"),
    (b"host: t", b"Connection: close"),
    (b"host: t", b"TRANSFER-ENCODING: chunked"),
    (b"host: t", b"expect: 100-continue"),
    (b"host: t", b"upgrade: h2c"),
    (b"host: t", b" upgrade : h2c"),
    (b"host: t", b"content-length: 2002"),         # two of them, even equal
    (b"content-length: 2002", b"content-length: -1"),
    (b"content-length: 2002", b"content-length: +2002"),
    (b"content-length: 2002", b"content-length: 2 002"),
    (b"content-length: 2002", b"content-length: 0x7d2"),
    (b"content-length: 2002", b"content-length: 0000002002"),  # ten digits
    (b"content-length: 2002", b"content-length:"),
    (b"content-length: 2002", b"content-length"),
    (b"content-length: 2002", b"x-length: 2002"),             # none at all
    (b"content-length: 2002", b"content-length: 0"),
    (b"content-length: 2002", b"content-length : 2002"),      # space before the colon
    (b"host: t", b"x-no-colon"),
    (b"host: t", b"x-other: t"),                              # no Host
    (b"host: t", b"host: t\r\nhost: u"),                      # two
    (b"host: t", b"host: t\r\n x-folded: 1"),                 # a folded line
    (b"host: t\r\n", b"host: t\n"),                          # a bare LF ends a line
    (b"host: t", b"host: t\rx: y"),                           # a bare CR
    (b"host: t", b"host: t\x00"),                             # a control character
    (b"host: t", b"host: t\r\nx(y): 1"),                      # a name that is not a token
    (b"?operation=PKIOperation", b"?operation=GetCACert&operation=PKIOperation"),
    (b"?operation=PKIOperation", b"?operation=PKIOperation#x"),
    (b"/scep/pkiclient.exe", b"/scep/pkiclient\t.exe"),         # a tab in the target
]


def test_anything_else_is_not_one() -> None:
    for old, new in NOT_ONE:
        changed = PKI_POST.replace(old, new, 1)
        assert changed != PKI_POST
        assert length(changed) == OTHER, changed[:160]


def test_a_body_over_the_limit_or_a_head_too_long_is_not_one() -> None:
    assert length(PKI_POST, max_body=len(BODY) - 1) == OTHER
    assert length(PKI_POST, max_body=len(BODY)) == len(PKI_POST)
    head = PKI_POST.index(b"\r\n\r\n") + 4

    def padded(head_length: int) -> bytes:
        return PKI_POST.replace(b"host: t", b"host: t" + b"a" * (head_length - head), 1)

    limit = lib.SCEP_HTTP_MAX_HEAD
    assert length(padded(limit)) == len(padded(limit))
    assert length(padded(limit + 1)) == OTHER  # its blank line ends past the head limit
    assert length(b"a" * (lib.SCEP_HTTP_MAX_HEAD - 1)) == INCOMPLETE
    assert length(b"a" * lib.SCEP_HTTP_MAX_HEAD) == OTHER


# ---- the loop ------------------------------------------------------------------------

@dataclass
class Loop:
    """One refusal loop on a listening socket, driven round by round."""

    keep_alive: float = 5.0
    read_seconds: float = 0.2
    max_connections: int = 100
    refusing: bool = True
    listener: socket.socket = field(init=False)
    wake: int = field(init=False)
    ptr: Any = field(init=False)
    refused: int = 0
    handed: list[tuple[socket.socket, bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ptr = lib.scep_refusal_new(self.wake, 65536, self.keep_alive, self.read_seconds,
                                        self.max_connections)
        assert self.ptr != ffi.NULL
        self._out = ffi.new("scep_handback[]", 4)
        self._round = ffi.new("scep_refusal_round *")
        self._keep = [ffi.from_buffer(ANSWER), ffi.from_buffer(ANSWER_CLOSE)]
        self._answers = [ffi.new("scep_buf *", {"data": b, "len": len(b)}) for b in self._keep]

    def connect(self) -> socket.socket:
        return socket.create_connection(self.listener.getsockname(), timeout=5)

    def poll(self, timeout_ms: int = 10) -> Any:
        listen = self.listener.fileno() if self.refusing else -1
        assert lib.scep_refusal_poll(self.ptr, listen, self.refusing, timeout_ms,
                                     self._answers[0][0], self._answers[1][0],
                                     self._out, 4, self._round)
        self.refused += self._round.refused
        self._take(self._round.handed_back)
        return self._round

    def _take(self, count: int) -> None:
        for i in range(count):
            handback = self._out[i]
            assert handback.fd >= 0
            data = ffi.buffer(handback.data, handback.len)[:] if handback.len else b""
            self.handed.append((socket.socket(fileno=handback.fd), data))

    def until(self, what: Any, seconds: float = 5.0) -> None:
        deadline = time.monotonic() + seconds
        while not what():
            assert time.monotonic() < deadline, "the loop did not get there"
            self.poll()

    def run_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.poll()

    def held(self) -> int:
        return int(lib.scep_refusal_held(self.ptr))

    def finish(self) -> None:
        while count := lib.scep_refusal_finish(self.ptr, self._out, 4):
            self._take(count)

    def close(self) -> None:
        lib.scep_refusal_free(self.ptr)
        os.close(self.wake)
        self.listener.close()
        for sock, _data in self.handed:
            sock.close()


@contextmanager
def refusal_loop(**kwargs: Any) -> Iterator[Loop]:
    loop = Loop(**kwargs)
    try:
        yield loop
    finally:
        loop.close()


def read_answer(client: socket.socket, expected: bytes) -> bytes:
    answer = b""
    while len(answer) < len(expected):
        chunk = client.recv(65536)
        if not chunk:
            break
        answer += chunk
    return answer


def test_refused_requests_get_the_answer_and_the_connection_stays() -> None:
    with refusal_loop() as loop:
        client = loop.connect()
        for _ in range(3):
            client.sendall(PKI_POST)
            loop.until(lambda: loop.refused == 1)
            assert read_answer(client, ANSWER) == ANSWER
            assert loop.held() == 1
            loop.refused = 0
        # A request in several pieces is refused once all of it is there.
        client.sendall(PKI_POST[:100])
        loop.poll()
        client.sendall(PKI_POST[100:])
        loop.until(lambda: loop.refused == 1)
        assert read_answer(client, ANSWER) == ANSWER
        assert loop.handed == []
        client.close()
        loop.until(lambda: loop.held() == 0)  # the client went away: let go


def test_anything_else_is_handed_back_with_its_bytes() -> None:
    with refusal_loop() as loop:
        get = b"GET /scep?operation=GetCACaps HTTP/1.1\r\nhost: t\r\n\r\n"
        other = loop.connect()
        other.sendall(get)
        two = loop.connect()
        two.sendall(PKI_POST + PKI_POST[:10])  # more than one request: served
        loop.until(lambda: len(loop.handed) == 2)
        two_requests = PKI_POST + PKI_POST[:10]
        assert sorted(data for _sock, data in loop.handed) == sorted([get, two_requests])
        assert loop.refused == 0 and loop.held() == 0
        # What is handed back is the caller's: it answers on it.
        for sock, _data in loop.handed:
            sock.setblocking(True)
            sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        assert other.recv(100).startswith(b"HTTP/1.1 200")
        other.close()
        two.close()


def test_a_request_not_all_there_in_time_is_handed_back() -> None:
    with refusal_loop(read_seconds=0.1) as loop:
        slow = loop.connect()
        slow.sendall(PKI_POST[:50])
        started = time.monotonic()
        loop.until(lambda: len(loop.handed) == 1)
        assert time.monotonic() - started >= 0.09
        assert loop.handed[0][1] == PKI_POST[:50]
        slow.close()


def test_an_idle_connection_is_closed_after_the_keep_alive() -> None:
    with refusal_loop(keep_alive=0.3) as loop:
        client = loop.connect()
        client.sendall(PKI_POST)
        loop.until(lambda: loop.refused == 1)
        assert read_answer(client, ANSWER) == ANSWER
        started = time.monotonic()
        loop.until(lambda: loop.held() == 0)
        assert time.monotonic() - started >= 0.25
        assert client.recv(100) == b""  # closed by the loop
        client.close()


def test_past_the_connection_limit_the_answer_closes() -> None:
    with refusal_loop(max_connections=1) as loop:
        first, second = loop.connect(), loop.connect()
        loop.until(lambda: loop.held() == 2)
        first.sendall(PKI_POST)
        loop.until(lambda: loop.refused == 1)
        assert read_answer(first, ANSWER_CLOSE) == ANSWER_CLOSE
        assert first.recv(100) == b""
        loop.until(lambda: loop.held() == 1)
        first.close()
        second.close()


def test_a_parked_connection_is_refused_and_given_back_once_the_worker_serves() -> None:
    with refusal_loop() as loop:
        server_side_of: dict[str, socket.socket] = {}
        client = socket.create_connection(loop.listener.getsockname(), timeout=5)
        loop.listener.setblocking(True)
        server_side_of["client"], _ = loop.listener.accept()
        loop.listener.setblocking(False)
        parked = server_side_of["client"]
        parked.setblocking(False)
        assert lib.scep_refusal_hold(loop.ptr, parked.detach())
        client.sendall(PKI_POST)
        loop.until(lambda: loop.refused == 1)
        assert read_answer(client, ANSWER) == ANSWER
        # Mid-request when the worker serves again: handed back at once.
        client.sendall(PKI_POST[:30])
        loop.poll()
        loop.refusing = False
        loop.until(lambda: len(loop.handed) == 1)
        assert loop.handed[0][1] == PKI_POST[:30]
        client.close()


def test_an_idle_connection_goes_back_with_its_next_request_once_serving() -> None:
    with refusal_loop() as loop:
        client = loop.connect()
        client.sendall(PKI_POST)
        loop.until(lambda: loop.refused == 1)
        loop.refusing = False
        loop.poll()
        assert loop.handed == [] and loop.held() == 1  # idle: stays until it speaks
        client.sendall(PKI_POST)
        loop.until(lambda: len(loop.handed) == 1)
        assert loop.handed[0][1] == PKI_POST
        client.close()


def test_the_wake_descriptor_ends_a_round() -> None:
    with refusal_loop() as loop:
        os.eventfd_write(loop.wake, 1)
        started = time.monotonic()
        assert loop.poll(timeout_ms=5000).woken
        assert time.monotonic() - started < 2


def test_at_the_end_requests_under_way_go_back_and_idle_connections_close() -> None:
    with refusal_loop(read_seconds=5.0) as loop:
        idle, busy = loop.connect(), loop.connect()
        idle.sendall(PKI_POST)
        loop.until(lambda: loop.refused == 1)
        busy.sendall(PKI_POST[:10])
        loop.run_for(0.1)  # long enough to read it, not to hand it back
        loop.finish()
        assert [data for _sock, data in loop.handed] == [PKI_POST[:10]]
        assert read_answer(idle, ANSWER) == ANSWER
        assert idle.recv(100) == b""
        idle.close()
        busy.close()


def test_many_connections_over_many_rounds_leave_nothing_behind() -> None:
    with refusal_loop() as loop:
        clients = [loop.connect() for _ in range(40)]
        for client in clients:
            client.sendall(PKI_POST)
        loop.until(lambda: loop.refused == 40)
        for client in clients[::2]:
            client.close()
        for client in clients[1::2]:
            client.sendall(PKI_POST[:7])
        loop.until(lambda: len(loop.handed) == 20, seconds=10)
        assert loop.held() == 0
        for client in clients[1::2]:
            client.close()


def test_what_it_takes_for_a_whole_post_h11_frames_the_same() -> None:
    """h11 is the server's HTTP/1.1 parser: whatever the test measures as one whole
    PKIOperation POST, h11 reads as one POST with a body of that length, so the
    bytes after it start the next request for both (no desync to smuggle in)."""
    rng = random.Random(8894)
    noise = [b"\r", b"\n", b"\r\n", b" ", b"\t", b":", b"\x00", b"\x7f", b"\x80", b"#", b"&", b"a"]
    head_end = PKI_POST.index(b"\r\n\r\n") + 4
    measured = 0
    for _ in range(3000):
        data = bytearray(PKI_POST[:head_end] + b"xy")  # a short body is enough for framing
        data[:head_end] = data[:head_end].replace(b"content-length: 2002", b"content-length: 2")
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(data) - 2)
            if rng.random() < 0.3:
                del data[at]
            else:
                data[at:at] = rng.choice(noise)
        total = length(bytes(data))
        if total <= 0:
            continue
        measured += 1
        connection = h11.Connection(h11.SERVER)
        connection.receive_data(bytes(data[:total]) + b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        request = connection.next_event()
        assert isinstance(request, h11.Request) and request.method == b"POST", bytes(data)
        body = b""
        while isinstance(event := connection.next_event(), h11.Data):
            body += event.data
        assert isinstance(event, h11.EndOfMessage), bytes(data)
        assert len(body) == total - (bytes(data).index(b"\r\n\r\n") + 4), bytes(data)
    assert measured > 100  # the mutations left enough whole POSTs to compare
