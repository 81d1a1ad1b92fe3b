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
    end = data.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES)
    if end < 0:
        return 0
    line, _, fields = data[:end].partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or parts[0] != b"POST" or parts[2] != b"HTTP/1.1":
        return 0
    path, _, query = parts[1].partition(b"?")
    if not path.startswith(_PREFIXES) or b"operation=PKIOperation" not in query.split(b"&"):
        return 0
    length = -1
    for header in fields.split(b"\r\n"):
        name, _, value = header.partition(b":")
        name = name.strip().lower()
        if name in _UNUSUAL:
            return 0
        if name == b"content-length":
            value = value.strip()
            if length >= 0 or not value.isdigit() or len(value) > 9:
                return 0
            length = int(value)
    if length < 0 or length > max_body:
        return 0
    total = end + 4 + length
    return total if len(data) >= total else 0


def response(retry_after_seconds: int) -> bytes:
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n"
            b"content-length: %d\r\nretry-after: %d\r\n\r\n%s"
            % (len(_BODY), retry_after_seconds, _BODY))


@dataclass
class FastRefusal:
    """What the connection loop needs: whether to refuse now, and the bookkeeping."""

    # The Retry-After of a refusal, or None to serve the request.
    refuse: Callable[[], int | None]
    max_body: int
    _line: CountedLine = field(default_factory=lambda: CountedLine(
        log, "requests refused for load",
        {"operation": "PKIOperation", "status": 503, "outcome": "http_503"}))

    def refused(self, elapsed: float) -> None:
        metrics.REQUESTS.labels("PKIOperation", "-", "http_503").inc()
        metrics.REQUEST_DURATION.labels("PKIOperation").observe(elapsed)
        self._line.note()
