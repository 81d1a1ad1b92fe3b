"""What every HTTP port accepts beyond what its parser checks: HTTP/1.0 and 1.1, and no more.

SCEP clients speak HTTP/1.0 or HTTP/1.1 (RFC 8894 section 4.1); nothing a
SCEP client does needs HTTP/2, a protocol switch or an ambiguous body. One
rule, applied by the SCEP port (``http_server``) and by the admin and
metrics ports (``StrictHttp1Handler``), after the request head has parsed:

- HTTP major version 1 only. The HTTP/2 prior-knowledge preface
  (``PRI * HTTP/2.0``) and any other major version get 400 and a closed
  connection. RFC 9110 section 15.6.6 has 505 for this, but a 5xx says
  "our fault" to every alert an operator sets up, and this is the client's.
- Content-Length together with Transfer-Encoding: 400 and close (RFC 9112
  section 6.3 item 3: a server may reject it and must close the connection,
  or the two framings let a request hide inside another one).
  Transfer-Encoding in an HTTP/1.0 request too: RFC 9112 section 6.1 calls
  its framing faulty.
- A transfer coding other than ``chunked`` alone (``gzip``, ``chunked`` applied
  twice, ...): 400 and close. RFC 9112 section 6.1 suggests 501, but no SCEP
  client sends one, and a 5xx would page an operator for a client's request.
  On the SCEP port h11 refuses it while parsing; hypercorn's answer to any
  head h11 refuses is mapped to 4xx the same way (``http_server``).
- ``Upgrade``: never switched. In an HTTP/1.0 request it is ignored (RFC 9110
  section 7.8 requires that). ``h2c`` alone is ignored, as RFC 7540 section
  3.2 tells a server without HTTP/2 to do (the client carries on in
  HTTP/1.1; RFC 9113 section 3.1 has since deprecated the mechanism). Any
  other protocol (``websocket``, ...) gets 400 and a closed connection: it is
  the client asking for something this server does not offer. Not 426: that
  status means the server *requires* an upgrade and must name the protocol
  it wants (RFC 9110 section 15.5.22), which is the opposite of the answer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler

# The short text a refused client reads; the rule above says why.
VERSION_REFUSED = "HTTP/1.0 and HTTP/1.1 only"
FRAMING_REFUSED = "Content-Length with Transfer-Encoding"
HTTP10_CODING_REFUSED = "Transfer-Encoding in HTTP/1.0"
CODING_REFUSED = "transfer coding not supported"
UPGRADE_REFUSED = "protocol upgrade not supported"

# Upgrade tokens that are ignored rather than refused.
_IGNORED_UPGRADES = frozenset({"h2c"})


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with a request whose head has parsed."""

    # Why it is refused (400, connection closed); None: serve it.
    refusal: str | None = None
    # It carries an Upgrade header that is to be ignored: serve it as if absent.
    ignore_upgrade: bool = False


SERVE = Verdict()


def judge(http_version: str, headers: Iterable[tuple[bytes, bytes]]) -> Verdict:
    """The rule above for ``http_version`` ("1.1") and the request's header fields."""
    major, _, _minor = http_version.partition(".")
    if major != "1":
        return Verdict(VERSION_REFUSED)
    has_length = False
    codings: list[str] = []
    upgrade: list[str] = []
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"content-length":
            has_length = True
        elif lowered == b"transfer-encoding":
            codings += [t.strip().lower() for t in value.decode("latin-1").split(",")]
        elif lowered == b"upgrade":
            upgrade += [t.strip().lower() for t in value.decode("latin-1").split(",")]
    if codings and has_length:
        return Verdict(FRAMING_REFUSED)
    if codings and http_version == "1.0":
        return Verdict(HTTP10_CODING_REFUSED)
    if codings and codings != ["chunked"]:
        return Verdict(CODING_REFUSED)
    if not upgrade:
        return SERVE
    if http_version == "1.0" or set(upgrade) - {""} <= _IGNORED_UPGRADES:
        return Verdict(ignore_upgrade=True)
    return Verdict(UPGRADE_REFUSED)


class StrictHttp1Handler(BaseHTTPRequestHandler):
    """``http.server``'s handler with the rule above, for the admin and metrics ports.

    ``http.server`` never switches protocols and answers HTTP/1.0 (one request
    per connection), so no request can follow an ambiguous one on the same
    connection; the rule still refuses it, as the SCEP port does.
    """

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        version = self.request_version.removeprefix("HTTP/")
        verdict = judge(version, ((k.encode("latin-1"), v.encode("latin-1"))
                                  for k, v in self.headers.items()))
        if verdict.refusal is not None:
            self.send_error(HTTPStatus.BAD_REQUEST, verdict.refusal)
            return False
        return True

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        if code == HTTPStatus.HTTP_VERSION_NOT_SUPPORTED or message == VERSION_REFUSED:
            # http.server's answer to HTTP/2 and above is 505; the rule above
            # says 400. Said in HTTP/1.0: http.server would otherwise take the
            # request for HTTP/0.9 and send the body without a status line.
            code, message = HTTPStatus.BAD_REQUEST, VERSION_REFUSED
            self.request_version = "HTTP/1.0"
        if code == HTTPStatus.BAD_REQUEST:
            self.close_connection = True
        super().send_error(code, message, explain)
