"""The connection driver under hypercorn: one write per response, keep-alive, draining.

Each test serves a small ASGI app in-process on a loopback socket and talks
raw HTTP/1.1 to it, so what is asserted is what a client sees on the wire.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, RawData
from hypercorn.trio.worker_context import WorkerContext

from scep_fast.runtime import http_server
from scep_fast.runtime.app import answer_lifespan
from scep_fast.runtime.fast_refusal import FastRefusal, whole_pki_post
from scep_fast.runtime.http_server import Connection, serve
from scep_fast.runtime.refusal_thread import Gate, GatedListener

HEAD = b"HTTP/1.1 200 \r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\n"


class RecordingStream:
    """A stream that records each write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    async def send_all(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


class IgnoringProtocol:
    async def handle(self, event: object) -> None:
        pass


def _connection() -> tuple[Connection, RecordingStream]:
    stream = RecordingStream()
    connection = Connection(None, HypercornConfig(), WorkerContext(None), {}, None, stream)
    connection.protocol = IgnoringProtocol()  # type: ignore[assignment]
    return connection, stream


def test_a_response_head_leaves_with_its_body_in_one_write() -> None:
    async def main() -> list[bytes]:
        connection, stream = _connection()
        await connection.protocol_send(RawData(data=HEAD))
        assert stream.writes == []  # held for the body
        await connection.protocol_send(RawData(data=b"ok"))
        await connection.protocol_send(RawData(data=b""))  # h11's end of a sized body
        return stream.writes

    assert trio.run(main) == [HEAD + b"ok"]


def test_an_empty_body_still_sends_the_head() -> None:
    async def main() -> list[bytes]:
        connection, stream = _connection()
        await connection.protocol_send(RawData(data=HEAD.replace(b": 2", b": 0")))
        await connection.protocol_send(RawData(data=b""))
        return stream.writes

    assert trio.run(main) == [HEAD.replace(b": 2", b": 0")]


def test_100_continue_is_written_at_once() -> None:
    async def main() -> list[bytes]:
        connection, stream = _connection()
        await connection.protocol_send(RawData(data=b"HTTP/1.1 100 \r\n\r\n"))
        return stream.writes

    assert trio.run(main) == [b"HTTP/1.1 100 \r\n\r\n"]


def test_a_held_head_is_written_before_the_connection_closes() -> None:
    async def main() -> list[bytes]:
        connection, stream = _connection()
        await connection.protocol_send(RawData(data=HEAD))
        await connection.protocol_send(Closed())
        return stream.writes

    assert trio.run(main) == [HEAD]


# ------------------------------------------------------------ over a socket


async def app(scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
              send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    while (await receive()).get("more_body"):
        pass
    if scope["path"] == "/slow":
        await trio.sleep(0.8)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


class Server:
    def __init__(self, port: int, stop: trio.Event, stopped: trio.Event) -> None:
        self.port = port
        self.stop = stop
        self.stopped = stopped

    async def connect(self) -> trio.SocketStream:
        return await trio.open_tcp_stream("127.0.0.1", self.port)


@asynccontextmanager
async def serving(keep_alive: float = 5.0,
                  fast_refusal: FastRefusal | None = None) -> AsyncIterator[Server]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = HypercornConfig()
    config.bind = [f"fd://{sock.detach()}"]
    config.keep_alive_timeout = keep_alive
    config.graceful_timeout = 5.0
    config.accesslog = None
    stop, stopped = trio.Event(), trio.Event()

    async def run() -> None:
        await serve(app, config, shutdown_trigger=stop.wait, fast_refusal=fast_refusal)
        stopped.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        server = Server(port, stop, stopped)
        yield server
        stop.set()


async def request(stream: trio.SocketStream, path: str = "/") -> bytes:
    await stream.send_all(f"GET {path} HTTP/1.1\r\nhost: t\r\n\r\n".encode())
    data = b""
    while not data.endswith(b"\r\n\r\nok"):
        chunk = await stream.receive_some(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


async def closed_by_server(stream: trio.SocketStream) -> bool:
    return await stream.receive_some(65536) == b""


def test_an_idle_connection_is_closed_after_the_keep_alive_timeout() -> None:
    async def main() -> float:
        async with serving(keep_alive=0.3) as server:
            stream = await server.connect()
            await request(stream)
            await request(stream)  # still open between requests
            started = trio.current_time()
            with trio.fail_after(5):
                assert await closed_by_server(stream)
            return trio.current_time() - started

    assert 0.2 < trio.run(main) < 2.0


def test_a_request_longer_than_the_keep_alive_timeout_is_answered() -> None:
    async def main() -> bytes:
        async with serving(keep_alive=0.2) as server:
            stream = await server.connect()
            with trio.fail_after(5):
                return await request(stream, "/slow")

    assert trio.run(main).startswith(b"HTTP/1.1 200")


def test_stopping_closes_idle_connections_and_answers_busy_ones() -> None:
    async def main() -> tuple[bytes, bool, bool]:
        async with serving(keep_alive=30) as server:
            idle = await server.connect()
            await request(idle)
            busy = await server.connect()
            answer = b""

            async def slow() -> None:
                nonlocal answer
                answer = await request(busy, "/slow")

            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(slow)
                    await trio.sleep(0.2)  # the slow request is in the app
                    server.stop.set()
                    idle_closed = await closed_by_server(idle)
                busy_closed = await closed_by_server(busy)
                await server.stopped.wait()
            return answer, idle_closed, busy_closed

    answer, idle_closed, busy_closed = trio.run(main)
    assert answer.startswith(b"HTTP/1.1 200")
    assert idle_closed and busy_closed


def _task_count() -> int:
    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(child) for nursery in task.child_nurseries
                       for child in nursery.child_tasks)

    return count(trio.lowlevel.current_root_task())  # type: ignore[arg-type]


def test_connections_the_client_closes_leave_no_task_behind() -> None:
    async def main() -> tuple[int, int]:
        async with serving(keep_alive=30) as server:
            probe = await server.connect()
            await request(probe)
            await probe.aclose()
            await trio.sleep(0.1)
            before = _task_count()
            for _ in range(20):
                stream = await server.connect()
                await request(stream)
                await stream.aclose()
            await trio.sleep(0.3)
            return before, _task_count()

    before, after = trio.run(main)
    assert after == before


# ------------------------------------------------- HTTP/1.0 and 1.1 only, on the wire

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")
CAPS = b"GET / HTTP/1.1\r\nhost: t\r\n\r\n"


async def exchange(server: Server, raw: bytes) -> tuple[bytes, bool]:
    """Sends ``raw``; what came back within a second, and whether the server closed."""
    stream = await server.connect()
    await stream.send_all(raw)
    answer = b""
    with trio.move_on_after(1.0):
        while chunk := await stream.receive_some(65536):
            answer += chunk
        return answer, True
    await stream.aclose()
    return answer, False


def _exchange(raw: bytes) -> tuple[bytes, bool]:
    async def main() -> tuple[bytes, bool]:
        async with serving() as server:
            with trio.fail_after(5):
                return await exchange(server, raw)

    return trio.run(main)


def test_the_http2_preface_gets_400_and_a_closed_connection() -> None:
    answer, closed = _exchange(H2_PREFACE)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"\r\nconnection: close\r\n" in answer
    assert answer.endswith(b"\r\n\r\nHTTP/1.0 and HTTP/1.1 only\n")
    assert closed


def test_an_h2c_upgrade_is_ignored_and_the_connection_stays_http1() -> None:
    upgrade = (b"GET / HTTP/1.1\r\nhost: t\r\nconnection: Upgrade, HTTP2-Settings\r\n"
               b"upgrade: h2c\r\nhttp2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
    answer, closed = _exchange(upgrade + CAPS)
    # Two plain HTTP/1.1 answers on one connection: no 101, no HTTP/2 frame.
    assert answer.count(b"HTTP/1.1 200 ") == 2
    assert b" 101 " not in answer
    assert not closed


def test_a_websocket_or_other_upgrade_gets_400_and_a_closed_connection() -> None:
    for upgrade in (b"connection: Upgrade\r\nupgrade: websocket\r\n"
                    b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    b"sec-websocket-version: 13\r\n",
                    b"connection: Upgrade\r\nupgrade: TLS/1.2\r\n",
                    b"upgrade: h2c, websocket\r\n"):
        answer, closed = _exchange(b"GET / HTTP/1.1\r\nhost: t\r\n" + upgrade + b"\r\n" + CAPS)
        assert answer.startswith(b"HTTP/1.1 400 "), (upgrade, answer)
        assert answer.endswith(b"protocol upgrade not supported\n"), answer
        assert closed  # the request behind it is never read


def test_content_length_with_transfer_encoding_gets_400_and_a_closed_connection() -> None:
    # What a front end that reads Content-Length and one that reads
    # chunked would each take for the next request differs: refuse both.
    for head in (b"content-length: 5\r\ntransfer-encoding: chunked\r\n",
                 b"transfer-encoding: chunked\r\ncontent-length: 33\r\n"):
        raw = (b"POST / HTTP/1.1\r\nhost: t\r\n" + head + b"\r\n0\r\n\r\n" + CAPS)
        answer, closed = _exchange(raw)
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert answer.count(b"HTTP/1.1") == 1  # the smuggled GET got no answer
        assert closed


def test_transfer_encoding_in_http10_gets_400() -> None:
    answer, closed = _exchange(b"POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert closed


def test_http10_without_host_is_still_served() -> None:
    answer, closed = _exchange(b"GET / HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"ok")
    assert closed


# ---- refusals for load, answered before h11 --------------------------------------------

BODY = b"\x30\x82" + bytes(2000)
PKI_POST = (b"POST /scep/pkiclient.exe?operation=PKIOperation HTTP/1.1\r\nhost: t\r\n"
            b"content-type: application/x-pki-message\r\ncontent-length: %d\r\n\r\n"
            % len(BODY)) + BODY


def test_only_a_whole_plain_pkioperation_post_is_recognised() -> None:
    assert whole_pki_post(PKI_POST + b"GET / HTTP/1.1\r\n", 65536) == len(PKI_POST)
    assert whole_pki_post(PKI_POST[:-1], 65536) == 0  # not all of the body yet
    assert whole_pki_post(PKI_POST, 100) == 0  # over the body limit: the app says 413
    for changed in (PKI_POST.replace(b"HTTP/1.1", b"HTTP/1.0"),
                    PKI_POST.replace(b"POST", b"GET "),
                    PKI_POST.replace(b"operation=PKIOperation", b"operation=GetCACaps"),
                    PKI_POST.replace(b"operation=PKIOperation", b"operation=PKIOperationX"),
                    PKI_POST.replace(b"/scep", b"/other"),
                    PKI_POST.replace(b"host: t", b"connection: close"),
                    PKI_POST.replace(b"host: t", b"transfer-encoding: chunked"),
                    PKI_POST.replace(b"host: t", b"expect: 100-continue"),
                    PKI_POST.replace(b"host: t", b"content-length: 3"),
                    PKI_POST.replace(b"content-length: 2002", b"content-length: -1")):
        assert whole_pki_post(changed, 65536) == 0, changed[:120]


def test_a_refused_pkioperation_gets_503_and_the_connection_serves_on() -> None:
    refused: list[float] = []
    refusal = FastRefusal(refuse=lambda: 7, max_body=65536)
    refusal.refused = refused.append  # type: ignore[method-assign]

    async def main() -> bytes:
        async with serving(fast_refusal=refusal) as server:
            stream = await server.connect()
            # Two refusals and an ordinary request, pipelined in one write.
            await stream.send_all(PKI_POST + PKI_POST + b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
            answer = b""
            with trio.fail_after(5):
                while not answer.endswith(b"\r\n\r\nok"):
                    answer += await stream.receive_some(65536)
            await stream.aclose()
            return answer

    answer = trio.run(main)
    assert answer.count(b"HTTP/1.1 503 Service Unavailable\r\n") == 2
    assert answer.count(b"retry-after: 7\r\n") == 2
    # The ordinary request behind them was served by the app, on the same connection.
    assert answer.rsplit(b"server busy, retry later\n", 1)[1].startswith(b"HTTP/1.1 200")
    assert len(refused) == 2


def test_when_the_worker_admits_the_request_reaches_the_app() -> None:
    async def main() -> bytes:
        async with serving(fast_refusal=FastRefusal(refuse=lambda: None,
                                                    max_body=65536)) as server:
            return (await exchange(server, PKI_POST))[0]

    assert trio.run(main).startswith(b"HTTP/1.1 200")


# --------------------------------------------- the front door: refusals without a Connection

def count_connections(monkeypatch: Any) -> list[object]:
    """Every Connection built from now on (the full HTTP machinery), in a list."""
    built: list[object] = []
    original = Connection.__init__

    def counting(self: Connection, *args: Any, **kwargs: Any) -> None:
        built.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(Connection, "__init__", counting)
    return built


def test_a_connection_whose_requests_are_all_refused_never_builds_a_connection(
        monkeypatch: Any) -> None:
    built = count_connections(monkeypatch)
    refusing = True
    refusal = FastRefusal(refuse=lambda: 3 if refusing else None, max_body=65536)
    refusal.refused = lambda _elapsed: None  # type: ignore[method-assign]

    async def main() -> tuple[bytes, int, bytes]:
        nonlocal refusing
        async with serving(fast_refusal=refusal) as server:
            stream = await server.connect()
            with trio.fail_after(5):
                refused = b""
                for _ in range(3):
                    await stream.send_all(PKI_POST)
                    while not refused.endswith(b"retry later\n"):
                        refused += await stream.receive_some(65536)
                    refused += b"|"
                before = len(built)
                refusing = False  # the worker has room again: served on the same connection
                await stream.send_all(PKI_POST)
                served = b""
                while not served.endswith(b"ok"):
                    served += await stream.receive_some(65536)
            await stream.aclose()
            return refused, before, served

    refused, before, served = trio.run(main)
    assert refused.count(b"HTTP/1.1 503 Service Unavailable\r\n") == 3
    assert before == 0
    assert served.startswith(b"HTTP/1.1 200") and len(built) == 1


def test_a_request_split_over_reads_at_the_door_is_served_whole() -> None:
    async def main() -> bytes:
        refusal = FastRefusal(refuse=lambda: None, max_body=65536)
        async with serving(fast_refusal=refusal) as server:
            stream = await server.connect()
            with trio.fail_after(5):
                await stream.send_all(PKI_POST[:40])
                await trio.sleep(0.1)
                await stream.send_all(PKI_POST[40:])
                answer = b""
                while not answer.endswith(b"ok"):
                    answer += await stream.receive_some(65536)
            return answer

    assert trio.run(main).startswith(b"HTTP/1.1 200")


def test_the_door_closes_idle_connections_after_the_keep_alive_timeout_and_at_stop() -> None:
    refusal = FastRefusal(refuse=lambda: 3, max_body=65536)
    refusal.refused = lambda _elapsed: None  # type: ignore[method-assign]

    async def main() -> tuple[float, bool]:
        async with serving(keep_alive=0.3, fast_refusal=refusal) as server:
            timed = await server.connect()
            started = trio.current_time()
            with trio.fail_after(5):
                assert await closed_by_server(timed)
            waited = trio.current_time() - started
        async with serving(keep_alive=30, fast_refusal=refusal) as server:
            idle = await server.connect()
            await trio.sleep(0.1)
            server.stop.set()
            with trio.fail_after(5):
                closed = await closed_by_server(idle)
                await server.stopped.wait()
        return waited, closed

    waited, closed = trio.run(main)
    assert 0.2 < waited < 2.0
    assert closed


def test_http_layer_refusals_are_counted_and_logged_once_a_second(caplog: Any) -> None:
    from prometheus_client import REGISTRY

    def refused_400() -> float:
        value = REGISTRY.get_sample_value(
            "scep_requests_total", {"operation": "-", "message_type": "-", "outcome": "http_400"})
        return value or 0.0

    before = refused_400()
    caplog.set_level("INFO", logger="scep_fast.request")
    http_server._protocol_refusals._since = 0.0  # no line written lately

    async def main() -> None:
        async with serving() as server:
            with trio.fail_after(5):
                for raw in (H2_PREFACE, b"GET / HTTP/1.1\r\nhost: t\r\nupgrade: websocket\r\n"
                            b"connection: upgrade\r\n\r\n", b"GARBAGE\r\n\r\n"):
                    answer, closed = await exchange(server, raw)
                    assert answer.startswith(b"HTTP/1.1 400") and closed, answer

    trio.run(main)
    assert refused_400() - before == 3
    lines = [r for r in caplog.records if r.getMessage() == "requests refused at the HTTP layer"]
    # Three refusals within a second: one line, written for the first of them.
    assert len(lines) == 1
    assert lines[0].fields["status"] == 400  # type: ignore[attr-defined]


def test_the_next_request_on_a_kept_alive_connection_is_refused_cheaply_at_once() -> None:
    # The client sends its next request as soon as it holds the whole answer,
    # which may be before hypercorn has moved h11 on to the next cycle: the
    # connection loop must still see it as the start of a request.
    seen: list[float] = []
    refusing = False
    refusal = FastRefusal(refuse=lambda: 5 if refusing else None, max_body=65536)
    refusal.refused = seen.append  # type: ignore[method-assign]

    async def main() -> bytes:
        nonlocal refusing
        async with serving(fast_refusal=refusal) as server:
            stream = await server.connect()
            with trio.fail_after(5):
                answers = b""
                for _ in range(20):
                    refusing = False
                    await stream.send_all(PKI_POST)
                    answer = b""
                    while not answer.endswith(b"ok"):
                        answer += await stream.receive_some(65536)
                    refusing = True
                    await stream.send_all(PKI_POST)  # at once, behind the served one
                    answer = b""
                    while not answer.endswith(b"retry later\n"):
                        answer += await stream.receive_some(65536)
                    answers += answer
            return answers

    answers = trio.run(main)
    assert answers.count(b"HTTP/1.1 503") == 20
    assert len(seen) == 20  # every one by the connection loop, none through the app


# ------------------------- the refusal thread: new connections while the worker is overloaded

class FakeLoad:
    """The batcher's load, as the refusal thread's watcher reads it, set by the test."""

    def __init__(self) -> None:
        self.over = True
        self.noted = 0

    def overloaded(self) -> bool:
        return self.over

    def relieved(self) -> bool:
        return not self.over

    def retry_after_now(self) -> int:
        return 9

    def note_refused(self, count: int) -> None:
        self.noted += count


async def one_answer(stream: trio.SocketStream) -> bytes:
    """One whole response (Content-Length framed) from ``stream``; b"" if it closed first."""
    answer = b""
    while True:
        head_end = answer.find(b"\r\n\r\n")
        if head_end >= 0:
            length = int(answer.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
            if len(answer) >= head_end + 4 + length:
                return answer
        chunk = await stream.receive_some(65536)
        if not chunk:
            return b""
        answer += chunk


def test_while_overloaded_new_connections_are_refused_by_the_thread_and_the_rest_served(
        monkeypatch: Any) -> None:
    load = FakeLoad()
    refused: list[float] = []
    refusal = FastRefusal(refuse=lambda: 9 if load.over else None, max_body=65536, load=load)
    refusal.refused = refused.append  # type: ignore[method-assign]
    refusal.refused_elsewhere = (  # type: ignore[method-assign]
        lambda count: refused.extend([0.0] * count))
    built = count_connections(monkeypatch)

    async def main() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with serving(fast_refusal=refusal) as server:
            with trio.fail_after(10):
                await trio.sleep(5 * http_server.WATCH_SECONDS)  # the watcher sees the load
                # A client that connects and sends nothing holds up nobody.
                silent = await server.connect()
                kept = [await server.connect() for _ in range(5)]
                seen["refused"] = []
                for stream in kept:  # each refused twice, kept alive in between
                    for _ in range(2):
                        await stream.send_all(PKI_POST)
                        seen["refused"].append(await one_answer(stream))
                seen["built_by_refusals"] = len(built)
                # Anything but a whole PKIOperation POST is served by the event loop.
                seen["get"] = await exchange(server, b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
                await kept[0].send_all(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
                seen["get_kept"] = await one_answer(kept[0])
                split = await server.connect()
                await split.send_all(PKI_POST[:40])
                await trio.sleep(0.2)  # past the thread's read deadline: handed over
                await split.send_all(PKI_POST[40:])
                seen["split"] = await one_answer(split)
                await trio.sleep(5 * http_server.WATCH_SECONDS)
                seen["noted"] = load.noted
                load.over = False
                await trio.sleep(5 * http_server.WATCH_SECONDS)
                seen["relieved"] = await exchange(server, PKI_POST)
                # A connection the thread kept goes back to the loop with its next request.
                await kept[1].send_all(PKI_POST)
                seen["relieved_kept"] = await one_answer(kept[1])
                await silent.aclose()
        return seen

    seen = trio.run(main)
    assert len(seen["refused"]) == 10
    for answer in seen["refused"]:
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer[:80]
        assert b"retry-after: 9\r\n" in answer and b"connection: close" not in answer
    # Refused outside the event loop: no connection machinery was built for them.
    assert seen["built_by_refusals"] == 0
    assert len(refused) == 10 and seen["noted"] == 10
    assert seen["get"][0].startswith(b"HTTP/1.1 200")
    assert seen["get_kept"].startswith(b"HTTP/1.1 200")
    assert seen["split"].startswith(b"HTTP/1.1 200")
    assert seen["relieved"][0].startswith(b"HTTP/1.1 200")
    assert seen["relieved_kept"].startswith(b"HTTP/1.1 200")


def test_the_loops_first_refusal_for_load_sends_new_connections_to_the_thread(
        monkeypatch: Any) -> None:
    """Without waiting for the watcher: in a storm the loop would refuse many
    more requests meanwhile, each dearer than the thread's refusal."""
    monkeypatch.setattr(http_server, "WATCH_SECONDS", 60.0)  # the watcher never looks
    load = FakeLoad()
    in_loop: list[float] = []
    refusal = FastRefusal(refuse=lambda: 9, max_body=65536, load=load)
    refusal.refused = in_loop.append  # type: ignore[method-assign]

    async def main() -> list[bytes]:
        answers = []
        async with serving(fast_refusal=refusal) as server:
            with trio.fail_after(10):
                for _ in range(3):
                    stream = await server.connect()
                    await stream.send_all(PKI_POST)
                    answers.append(await one_answer(stream))
                    await stream.aclose()
        return answers

    answers = trio.run(main)
    assert all(a.startswith(b"HTTP/1.1 503 ") for a in answers), answers
    assert len(in_loop) == 1  # the first; the others by the thread


def test_closing_the_gate_stops_an_accept_already_waiting() -> None:
    """Otherwise the event loop would still take the next connection after the
    gate closed, one that the refusal thread should have had."""

    async def main() -> tuple[bool, bytes]:
        sock = trio.socket.socket()
        await sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        gate = Gate()
        gated = GatedListener(trio.SocketListener(sock), gate)
        accepted: list[trio.SocketStream] = []
        done = trio.Event()

        async def accept() -> None:
            accepted.append(await gated.accept())
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept)
            await trio.sleep(0.05)  # waiting in the inner accept
            gate.close()
            client = await trio.open_tcp_stream(*sock.getsockname())
            await trio.sleep(0.2)
            taken_while_closed = bool(accepted)
            gate.open()
            with trio.fail_after(5):
                await done.wait()
            await client.send_all(b"x")
            received = await accepted[0].receive_some(1)
            await client.aclose()
            await accepted[0].aclose()
        await gated.aclose()
        return taken_while_closed, received

    taken_while_closed, received = trio.run(main)
    assert not taken_while_closed
    assert received == b"x"  # the same connection, taken once the gate opened


def test_a_served_connection_refused_for_load_waits_in_the_thread_until_the_load_falls(
        monkeypatch: Any) -> None:
    """A kept-alive connection the event loop refuses is handed to the refusal thread,
    which refuses its next requests, and gives it back when the worker serves again."""
    load = FakeLoad()
    load.over = False
    refusal = FastRefusal(refuse=lambda: 9 if load.over else None, max_body=65536, load=load)
    refusal.refused = lambda _elapsed: None  # type: ignore[method-assign]
    refusal.refused_elsewhere = lambda _count: None  # type: ignore[method-assign]
    built = count_connections(monkeypatch)

    async def main() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with serving(fast_refusal=refusal) as server:
            with trio.fail_after(10):
                await trio.sleep(5 * http_server.WATCH_SECONDS)
                stream = await server.connect()
                await stream.send_all(PKI_POST)
                seen["served"] = await one_answer(stream)
                load.over = True
                await trio.sleep(5 * http_server.WATCH_SECONDS)
                seen["refused"] = []
                for _ in range(4):
                    await stream.send_all(PKI_POST)
                    seen["refused"].append(await one_answer(stream))
                await trio.sleep(5 * http_server.WATCH_SECONDS)
                seen["noted"] = load.noted
                load.over = False
                await trio.sleep(5 * http_server.WATCH_SECONDS)
                await stream.send_all(PKI_POST)
                seen["served_again"] = await one_answer(stream)
                seen["built"] = len(built)
                await stream.aclose()
        return seen

    seen = trio.run(main)
    assert seen["served"].startswith(b"HTTP/1.1 200")
    assert all(a.startswith(b"HTTP/1.1 503 ") for a in seen["refused"]), seen["refused"]
    # The first by the loop, which then parked the connection; the others by the thread.
    assert seen["noted"] == 3
    assert seen["served_again"].startswith(b"HTTP/1.1 200")
    assert seen["built"] == 2  # served, then served again once back from the thread


def test_a_connection_idle_in_the_refusal_thread_is_closed_after_the_keep_alive() -> None:
    load = FakeLoad()
    refusal = FastRefusal(refuse=lambda: 9, max_body=65536, load=load)
    refusal.refused = lambda _elapsed: None  # type: ignore[method-assign]
    refusal.refused_elsewhere = lambda _count: None  # type: ignore[method-assign]

    async def main() -> tuple[bytes, float]:
        async with serving(keep_alive=1.0, fast_refusal=refusal) as server:
            with trio.fail_after(10):
                await trio.sleep(5 * http_server.WATCH_SECONDS)
                stream = await server.connect()
                await stream.send_all(PKI_POST)
                answer = await one_answer(stream)
                started = trio.current_time()
                assert await stream.receive_some(65536) == b""
                return answer, trio.current_time() - started

    answer, idle = trio.run(main)
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert 0.8 < idle < 3.0
