"""Reading an HTTP/1.x answer's head and chunked body (RFC 9112), strictly."""

from __future__ import annotations

import pytest

from scep_fast.runtime.http_answer import (
    CHUNKED,
    UNTIL_CLOSE,
    Malformed,
    chunked_body,
    parse_head,
)


def head(*lines: str, status: str = "HTTP/1.1 200 OK") -> bytes:
    return "\r\n".join((status, *lines)).encode("latin-1")


def test_status_fields_and_length() -> None:
    parsed = parse_head(head("Content-Type: application/json", "Content-Length: 14",
                             "X-Many: a", "x-many:  b  "))
    assert parsed.status == 200 and parsed.framing == 14 and parsed.keep_alive
    assert parsed.headers == {"content-type": "application/json", "content-length": "14",
                              "x-many": "a, b"}


def test_a_status_line_without_a_reason_is_read() -> None:
    assert parse_head(head("Content-Length: 0", status="HTTP/1.1 204")).status == 204


@pytest.mark.parametrize("status_line", [
    "HTTP/2 200 OK", "HTTP/1.1 20 OK", "HTTP/1.1 099 Low", "ICY 200 OK", "HTTP/1.1  200 OK",
    "http/1.1 200 OK", "HTTP/1.1 200 OK\x00",
])
def test_anything_but_an_http_1_status_line_is_malformed(status_line: str) -> None:
    with pytest.raises(Malformed):
        parse_head(head("Content-Length: 0", status=status_line))


@pytest.mark.parametrize("line", [
    "Content-Length : 5",       # space before the colon
    " folded: continuation",     # obsolete line folding
    "No-Colon",
    "Bad\x01Name: x",
    "X-Value: a\x00b",
    "X-Value: a\rb",
    "X-Value: a\x7fb",
])
def test_a_malformed_field_line_is_malformed(line: str) -> None:
    with pytest.raises(Malformed):
        parse_head(head("Content-Length: 0", line))


@pytest.mark.parametrize("lengths", [("5", "6"), ("5, 6",), ("-1",), ("0x10",), ("",),
                                     ("1" * 19,)])
def test_ambiguous_or_malformed_lengths_are_malformed(lengths: tuple[str, ...]) -> None:
    with pytest.raises(Malformed):
        parse_head(head(*(f"Content-Length: {v}" for v in lengths)))


def test_the_same_length_twice_is_one_length() -> None:
    assert parse_head(head("Content-Length: 5", "Content-Length: 5")).framing == 5
    assert parse_head(head("Content-Length: 5, 5")).framing == 5


def test_chunked_wins_over_a_length_and_the_connection_is_not_trusted_again() -> None:
    parsed = parse_head(head("Content-Length: 5", "Transfer-Encoding: chunked"))
    assert parsed.framing == CHUNKED and not parsed.keep_alive
    assert parse_head(head("Transfer-Encoding: Chunked")).keep_alive


@pytest.mark.parametrize("codings", ["gzip", "gzip, chunked", "chunked, gzip", "identity"])
def test_transfer_codings_other_than_chunked_are_malformed(codings: str) -> None:
    with pytest.raises(Malformed):
        parse_head(head(f"Transfer-Encoding: {codings}"))


def test_no_framing_reads_until_close() -> None:
    parsed = parse_head(head("Content-Type: text/plain"))
    assert parsed.framing == UNTIL_CLOSE and not parsed.keep_alive


@pytest.mark.parametrize("status", ["HTTP/1.1 204 No Content", "HTTP/1.1 304 Not Modified",
                                    "HTTP/1.1 100 Continue"])
def test_answers_without_a_body_whatever_they_say(status: str) -> None:
    parsed = parse_head(head("Content-Length: 10", status=status))
    assert parsed.framing == 0


def test_an_answer_to_head_has_no_body() -> None:
    assert parse_head(head("Content-Length: 10"), request_method="HEAD").framing == 0


def test_keep_alive_only_on_http_1_1_without_close() -> None:
    assert not parse_head(head("Content-Length: 0", status="HTTP/1.0 200 OK")).keep_alive
    assert not parse_head(head("Content-Length: 0", "Connection: Keep-Alive, Close")).keep_alive
    assert parse_head(head("Content-Length: 0", "Connection: keep-alive")).keep_alive


def test_chunked_body_whole_with_extensions_and_trailers() -> None:
    message = b"4;name=value\r\nabcd\r\n3 \r\nefg\r\n0\r\nX-Trailer: t\r\n\r\nNEXT"
    body, taken = chunked_body(message) or (b"", 0)
    assert body == b"abcdefg" and message[taken:] == b"NEXT"


def test_chunked_body_needs_more_bytes_until_the_end() -> None:
    message = b"4\r\nabcd\r\n0\r\n\r\n"
    for cut in range(len(message)):
        assert chunked_body(message[:cut]) is None
    assert chunked_body(message) == (b"abcd", len(message))


@pytest.mark.parametrize("message", [
    b"z\r\nabcd\r\n0\r\n\r\n",          # not hex
    b"-4\r\nabcd\r\n0\r\n\r\n",
    b"4\r\nabcdXY0\r\n\r\n",             # no CRLF after the data
    b"1234567890abcdef\r\n",             # a size beyond any answer we read
    b"4" + b" " * 2000 + b"\r\n",        # a size line without end
])
def test_malformed_chunks_are_malformed(message: bytes) -> None:
    with pytest.raises(Malformed):
        chunked_body(message)
