"""Refusing a PKIOperation for load without the cost of serving it.

Under overload most requests are refused, and a refusal that goes through
the whole HTTP stack (h11, hypercorn's streams, the ASGI app, a log line)
costs about a third of an enrollment: at four times the capacity, the
refusals alone would eat the CPU the enrollments need. So the connection
loop looks at the bytes of each new request first: when they hold one whole,
plain PKIOperation POST (HTTP/1.1, a Content-Length body, none of the
headers that change how a connection behaves) and the worker would refuse
it anyway, it writes a canned 503 with Retry-After itself and drops the
request's bytes. Anything else, or anything it is not sure of, takes the
ordinary path, which refuses the same way (just dearer). The refusal is
counted in the same metrics; log lines for it are one per second with a
count, not one per request, so that a flood does not flood the log too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from scep_fast.runtime import metrics
from scep_fast.runtime.logs import CountedLine

log = logging.getLogger("scep_fast.request")

MAX_HEAD_BYTES = 8192
_PREFIXES = (b"/scep", b"/cgi-bin/pkiclient.exe")
# Headers that change how the request is read or the connection is kept:
# with any of them the request takes the ordinary path.
_UNUSUAL = frozenset({b"transfer-encoding", b"connection", b"expect", b"upgrade"})
_BODY = b"server busy, retry later\n"


def whole_pki_post(data: bytes, max_body: int) -> int:
    """The length of the PKIOperation POST that ``data`` starts with, if it holds all of it.

    0 when ``data`` does not start with a whole, plain one (see the module docstring).
    """
    total = pki_post_length(data, max_body)
    return total if total and len(data) >= total else 0


# pki_post_length: the head is not all there yet.
INCOMPLETE = 0


def pki_post_length(data: bytes, max_body: int) -> int | None:
    """The whole length of the plain PKIOperation POST whose head ``data`` starts with;
    INCOMPLETE while the head is not all there; None for anything else."""
    end = data.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES)
    if end < 0:
        return INCOMPLETE if len(data) < MAX_HEAD_BYTES else None
    line, _, fields = data[:end].partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or parts[0] != b"POST" or parts[2] != b"HTTP/1.1":
        return None
    path, _, query = parts[1].partition(b"?")
    if not path.startswith(_PREFIXES) or b"operation=PKIOperation" not in query.split(b"&"):
        return None
    length = -1
    for header in fields.split(b"\r\n"):
        name, _, value = header.partition(b":")
        name = name.strip().lower()
        if name in _UNUSUAL:
            return None
        if name == b"content-length":
            value = value.strip()
            if length >= 0 or not value.isdigit() or len(value) > 9:
                return None
            length = int(value)
    if length < 0 or length > max_body:
        return None
    return end + 4 + length


def response(retry_after_seconds: int, *, close: bool = False) -> bytes:
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n"
            b"content-length: %d\r\nretry-after: %d\r\n%s\r\n%s"
            % (len(_BODY), retry_after_seconds,
               b"connection: close\r\n" if close else b"", _BODY))


class LoadState(Protocol):
    """The worker's load, as the refusal thread's watcher reads it (the batcher)."""

    def overloaded(self) -> bool:
        """New PKIOperations would be refused: new connections go to the refusal thread."""
        ...

    def relieved(self) -> bool:
        """Load has fallen well below that: the event loop accepts again."""
        ...

    def retry_after_now(self) -> int:
        ...

    def note_refused(self, count: int) -> None:
        """``count`` requests were refused outside the event loop."""
        ...


@dataclass
class FastRefusal:
    """What the connection loop needs: whether to refuse now, and the bookkeeping."""

    # The Retry-After of a refusal, or None to serve the request.
    refuse: Callable[[], int | None]
    max_body: int
    # With it, new connections are refused by a thread while overloaded (refusal_thread).
    load: LoadState | None = None
    _line: CountedLine = field(default_factory=lambda: CountedLine(
        log, "requests refused for load",
        {"operation": "PKIOperation", "status": 503, "outcome": "http_503"}))

    def refused(self, elapsed: float) -> None:
        metrics.REQUESTS.labels("PKIOperation", "-", "http_503").inc()
        metrics.REQUEST_DURATION.labels("PKIOperation").observe(elapsed)
        self._line.note()

    def refused_elsewhere(self, count: int) -> None:
        """``count`` refusals by the refusal thread: counted and logged, not timed
        (the thread keeps no clock per request)."""
        metrics.REQUESTS.labels("PKIOperation", "-", "http_503").inc(count)
        self._line.note_many(count)
