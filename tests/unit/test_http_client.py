"""The integrations' HTTP client against a scripted server on loopback (trio sockets)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio

from scep_fast.runtime.http_client import AnswerTooLarge, ConnectFailed, HttpClient, HttpError

Handler = Callable[[bytes], bytes | None]  # a request's bytes -> the answer (None: close)


class Scripted:
    """Answers each request on a connection with ``handler``; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buffer = b""
        async with stream:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                head, _, rest = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(rest) < length:
                    rest += await stream.receive_some(65536)
                request, buffer = head + b"\r\n\r\n" + rest[:length], rest[length:]
                self.requests.append(request)
                answer = self.handler(request)
                if answer is None:
                    return
                await stream.send_all(answer)


def ok(body: bytes = b"{}", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def run(handler: Handler, test: Callable[[HttpClient, Scripted], Awaitable[None]]) -> Scripted:
    server = Scripted(handler)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            client = HttpClient(max_connections=4)
            try:
                with trio.fail_after(10):
                    await test(client, server)
            finally:
                await client.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)
    return server


def url(server: Scripted, path: str = "/v") -> str:
    return f"http://127.0.0.1:{server.port}{path}"


def test_requests_one_after_another_share_one_connection() -> None:
    async def test(client: HttpClient, server: Scripted) -> None:
        for i in range(5):
            answer = await client.request("POST", url(server), body=b"n=%d" % i,
                                          headers={"X-Test": "yes"})
            assert answer.status == 200 and answer.body == b"{}"

    server = run(lambda _r: ok(), test)
    assert server.connections == 1
    first = server.requests[0]
    assert first.startswith(b"POST /v HTTP/1.1\r\n")
    assert b"\r\nContent-Length: 3\r\n" in first and first.endswith(b"\r\n\r\nn=0")
    assert b"\r\nX-Test: yes\r\n" in first and b"User-Agent: scep-fast/" in first


def test_a_connection_the_server_closed_while_idle_is_replaced_without_failing() -> None:
    answers = iter([ok(), None, ok(b"again")])  # the second request finds it closed

    async def test(client: HttpClient, server: Scripted) -> None:
        assert (await client.request("GET", url(server))).status == 200
        await trio.sleep(0.05)
        answer = await client.request("GET", url(server))
        assert answer.body == b"again"

    server = run(lambda _r: next(answers), test)
    assert server.connections == 2


def test_a_chunked_answer_is_read_whole_and_a_connection_close_is_honoured() -> None:
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
               b"4\r\nabcd\r\n3\r\nefg\r\n0\r\n\r\n")

    async def test(client: HttpClient, server: Scripted) -> None:
        for _ in range(2):
            answer = await client.request("GET", url(server))
            assert answer.body == b"abcdefg" and answer.headers["connection"] == "close"

    assert run(lambda _r: chunked, test).connections == 2


def test_an_answer_over_the_limit_is_refused_and_its_connection_dropped() -> None:
    async def test(client: HttpClient, server: Scripted) -> None:
        with pytest.raises(AnswerTooLarge):
            await client.request("GET", url(server), max_answer_bytes=10)
        assert (await client.request("GET", url(server), max_answer_bytes=100)).status == 200

    assert run(lambda _r: ok(b"x" * 50), test).connections == 2


def test_a_malformed_answer_is_an_http_error() -> None:
    async def test(client: HttpClient, server: Scripted) -> None:
        with pytest.raises(HttpError):
            await client.request("GET", url(server))

    run(lambda _r: b"NOT HTTP AT ALL\r\n\r\n", test)


def test_no_listener_is_connect_failed() -> None:
    async def test(client: HttpClient, server: Scripted) -> None:
        with pytest.raises(ConnectFailed):
            await client.request("GET", "http://127.0.0.1:1/v")

    run(lambda _r: ok(), test)


def test_a_call_cancelled_half_way_does_not_leave_its_connection_for_the_next() -> None:
    calls = iter([None, ok(b"second")])

    def slow_then_fast(request: bytes) -> bytes | None:
        answer = next(calls)
        return answer if answer is not None else b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"

    async def test(client: HttpClient, server: Scripted) -> None:
        with trio.move_on_after(0.3):
            await client.request("GET", url(server))  # its body never comes whole
        answer = await client.request("GET", url(server))
        assert answer.body == b"second"

    assert run(slow_then_fast, test).connections == 2


def test_connections_in_use_are_bounded() -> None:
    async def test(client: HttpClient, server: Scripted) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(client.request, "GET", url(server))

    assert run(lambda _r: ok(), test).connections <= 4


def test_only_http_urls() -> None:
    async def test(client: HttpClient, server: Scripted) -> None:
        with pytest.raises(ValueError):
            await client.request("GET", "ftp://127.0.0.1/x")

    run(lambda _r: ok(), test)


def test_an_interim_answer_is_skipped_and_a_protocol_switch_refused() -> None:
    answers = iter([b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"final"),
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"])

    async def test(client: HttpClient, server: Scripted) -> None:
        assert (await client.request("GET", url(server))).body == b"final"
        with pytest.raises(HttpError, match="protocol switch"):
            await client.request("GET", url(server))

    run(lambda _r: next(answers), test)


def test_bytes_after_an_answer_cost_the_connection_not_the_next_answer() -> None:
    # A second, unasked-for answer behind the first must never be read as the next one's.
    answers = iter([ok(b"first") + ok(b"smuggled"), ok(b"second")])

    async def test(client: HttpClient, server: Scripted) -> None:
        assert (await client.request("GET", url(server))).body == b"first"
        assert (await client.request("GET", url(server))).body == b"second"

    assert run(lambda _r: next(answers), test).connections == 2


def test_an_answer_framed_by_the_close_of_its_connection_is_read_whole() -> None:
    async def test(client: HttpClient, server: Scripted) -> None:
        for _ in range(2):
            assert (await client.request("GET", url(server))).body == b"until the end"

    # The scripted server closes after each answer when the handler says None next.
    answers = iter([b"HTTP/1.1 200 OK\r\n\r\nuntil the end", None,
                    b"HTTP/1.0 200 OK\r\n\r\nuntil the end", None])

    class ClosingAfterEach(Scripted):
        async def _connection(self, stream: trio.SocketStream) -> None:
            self.connections += 1
            async with stream:
                await stream.receive_some(65536)
                await stream.send_all(next(answers) or b"")
                next(answers)

    server = ClosingAfterEach(lambda _r: None)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            client = HttpClient(max_connections=4)
            with trio.fail_after(10):
                await test(client, server)
            await client.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert server.connections == 2


@pytest.mark.parametrize("headers", [
    {"X-Test": "a\r\nX-Injected: yes"},
    {"X-Test": "a\nb"},
    {"X-Te st": "a"},
    {"X-Test:": "a"},
    {"X-Test": "nul\x00"},
])
def test_a_header_that_could_break_out_of_its_line_is_refused_before_sending(
        headers: dict[str, str]) -> None:
    async def test(client: HttpClient, server: Scripted) -> None:
        with pytest.raises(HttpError, match="cannot be sent"):
            await client.request("POST", url(server), headers=headers, body=b"{}")

    assert run(lambda _r: ok(), test).requests == []


def test_the_framing_and_host_are_the_clients_to_say() -> None:
    async def test(client: HttpClient, server: Scripted) -> None:
        await client.request("POST", url(server), body=b"abc", headers={
            "Content-Length": "999", "Transfer-Encoding": "chunked", "Host": "evil"})

    request = run(lambda _r: ok(), test).requests[0]
    assert b"Content-Length: 3\r\n" in request and b"999" not in request
    assert b"chunked" not in request and b"evil" not in request
