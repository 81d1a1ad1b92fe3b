"""Refusing a PKIOperation for load without the cost of serving it.

Under overload most requests are refused, and a refusal that goes through
the whole HTTP stack (h11, hypercorn's streams, the ASGI app, a log line)
costs about a third of an enrollment: at four times the capacity, the
refusals alone would eat the CPU the enrollments need. So the connection
loop looks at the bytes of each new request first: when they hold one whole,
plain PKIOperation POST (HTTP/1.1, a head every HTTP/1.1 parser frames
alike, a Content-Length body, none of the headers that change how a
connection behaves: ``native/src/http_head.c``) and the worker would refuse
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

from scep_fast._native import lib
from scep_fast.runtime import metrics
from scep_fast.runtime.logs import CountedLine

log = logging.getLogger("scep_fast.request")

_BODY = b"server busy, retry later\n"


def whole_pki_post(data: bytes, max_body: int) -> int:
    """The length of the PKIOperation POST that ``data`` starts with, if it holds all of it.

    0 when ``data`` does not start with a whole, plain one (see the module
    docstring). The test is in C (``native/src/http_head.c``), shared with
    the refusal thread's loop, which runs it without the GIL.
    """
    total = int(lib.scep_pki_post_length(data, len(data), max_body))
    return total if total > 0 and len(data) >= total else 0


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
