"""Reading one HTTP/1.x answer, as the integrations' client needs it (RFC 9112).

The client sends one request at a time on a connection and reads its
answer here: the status line and header fields, then the body framed by
chunked transfer coding, by Content-Length, or by the connection's close.
It is strict where leniency would let two readers disagree on where an
answer ends (RFC 9112 sections 6.3 and 11.2): two different Content-Length
values, a transfer coding other than chunked, folded or malformed header
lines, and bare CR or NUL all make the answer malformed. Interim (1xx)
answers are skipped, except 101: nothing here asks to switch protocols.

Only the framing is judged; what the status and body mean is the caller's.
Written for the CPU it saves: on the validation path a call out happens for
every enrollment, and a general state machine (h11) cost about four times
as much per exchange as this (``benchmarks/http_client_cost.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["CHUNKED", "NO_BODY_STATUSES", "UNTIL_CLOSE", "Head", "Malformed", "chunked_body",
           "parse_head"]

MAX_HEAD_BYTES = 16 * 1024
MAX_CHUNK_LINE_BYTES = 1024
# Answers that never carry a body whatever their header fields say (RFC 9112 section 6.3).
NO_BODY_STATUSES = frozenset({204, 304})

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9]{2})(?: [\t\x20-\x7e\x80-\xff]*)?")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_DIGITS = re.compile(rb"[0-9]{1,18}")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?")


class Malformed(ValueError):
    """The bytes are not an HTTP/1.x answer this client will read."""


@dataclass(frozen=True, slots=True)
class Head:
    """An answer's status line and header fields, and how its body is framed."""

    status: int
    headers: dict[str, str]  # names in lower case; a repeated field joined with ", "
    # Body length, or CHUNKED, or UNTIL_CLOSE.
    framing: int
    # Whether the connection may carry the next request after this answer.
    keep_alive: bool


CHUNKED = -1
UNTIL_CLOSE = -2


def parse_head(head: bytes, *, request_method: str = "POST") -> Head:
    """The head of an answer: ``head`` is everything before its empty line."""
    lines = head.split(b"\r\n")
    status_line = _STATUS_LINE.fullmatch(lines[0])
    if status_line is None:
        raise Malformed("no HTTP/1.x status line")
    minor, status = status_line.group(1), int(status_line.group(2))
    fields: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        # No space before the colon, no obsolete line folding (RFC 9112 section 5).
        if not colon or _TOKEN.fullmatch(name) is None:
            raise Malformed("a malformed header field")
        value = value.strip(b" \t")
        if _FIELD_VALUE.fullmatch(value) is None:
            raise Malformed("a control character in a header field")
        key, text = name.decode("ascii").lower(), value.decode("latin-1")
        fields[key] = f"{fields[key]}, {text}" if key in fields else text
    framing, keep_alive = _framing(status, fields, request_method)
    keep_alive = keep_alive and minor == b"1" and "close" not in _tokens(fields, "connection")
    return Head(status, fields, framing, keep_alive)


def _tokens(fields: dict[str, str], name: str) -> list[str]:
    return [t.strip().lower() for t in fields.get(name, "").split(",") if t.strip()]


def _framing(status: int, fields: dict[str, str], method: str) -> tuple[int, bool]:
    """The body's framing and whether it leaves the connection reusable (RFC 9112 6.3)."""
    if method == "HEAD" or status in NO_BODY_STATUSES or status < 200:
        return 0, True
    codings = _tokens(fields, "transfer-encoding")
    if codings:
        if codings != ["chunked"]:
            # gzip and the like are not asked for (no Accept-Encoding is sent).
            raise Malformed("a transfer coding other than chunked")
        # Both framings: chunked wins, and the connection is not trusted again.
        return CHUNKED, "content-length" not in fields
    if "content-length" in fields:
        lengths = {v.strip().encode("latin-1") for v in fields["content-length"].split(",")}
        if len(lengths) != 1:
            raise Malformed("different Content-Length values")
        length = lengths.pop()
        if _DIGITS.fullmatch(length) is None:
            raise Malformed("a malformed Content-Length")
        return int(length), True
    return UNTIL_CLOSE, False


def chunked_body(buffer: bytes | bytearray) -> tuple[bytes, int] | None:
    """The body of a complete chunked message at the start of ``buffer`` and the bytes
    it took, or None while more bytes are needed. Trailer fields are read and dropped."""
    chunks: list[bytes] = []
    at = 0
    while True:
        end = buffer.find(b"\r\n", at, at + MAX_CHUNK_LINE_BYTES)
        if end < 0:
            if len(buffer) - at > MAX_CHUNK_LINE_BYTES:
                raise Malformed("a chunk size line too long")
            return None
        size_line = _CHUNK_SIZE.fullmatch(buffer, at, end)
        if size_line is None:
            raise Malformed("a malformed chunk size")
        size = int(size_line.group(1), 16)
        at = end + 2
        if size == 0:
            break
        if len(buffer) < at + size + 2:
            return None
        if buffer[at + size:at + size + 2] != b"\r\n":
            raise Malformed("a chunk not followed by CRLF")
        chunks.append(bytes(buffer[at:at + size]))
        at += size + 2
    # Trailer section: field lines up to an empty line.
    while True:
        end = buffer.find(b"\r\n", at)
        if end < 0:
            if len(buffer) - at > MAX_HEAD_BYTES:
                raise Malformed("a trailer section too long")
            return None
        if end == at:
            return b"".join(chunks), end + 2
        at = end + 2
