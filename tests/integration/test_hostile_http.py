"""Hostile requests over real HTTP: a clear 4xx or a signed CertRep, never a 5xx or a crash."""

from __future__ import annotations

import base64
import random
import re
import socket
import urllib.parse

from scep_fast.client import build_pkcs_req, parse_cert_rep
from scep_fast.protocol import PKIStatus
from tests.integration.conftest import CHALLENGE, Server
from tests.integration.test_server import ca_certs

# A client's mistake gets one of these; 5xx would be ours.
CLIENT_ERRORS = {400, 404, 405, 413}


def test_mutated_messages_never_get_a_5xx(server: Server) -> None:
    ra = ca_certs(server).ra
    request = build_pkcs_req(ra, cn="fuzzed", challenge=CHALLENGE)
    message = request.message
    rng = random.Random(8894)
    statuses: dict[int, int] = {}
    for i in range(300):
        mutated = bytearray(message)
        kind = i % 4
        if kind == 0:
            for _ in range(rng.randint(1, 4)):
                mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
        elif kind == 1:
            mutated = mutated[:rng.randrange(len(mutated))]
        elif kind == 2:
            start = rng.randrange(len(mutated))
            mutated[start:start + 16] = rng.randbytes(16)
        else:
            mutated = bytearray(rng.randbytes(rng.randint(0, 4096)))
        response = server.request("POST", "/scep?operation=PKIOperation", body=bytes(mutated))
        body = response.read_body  # type: ignore[attr-defined]
        statuses[response.status] = statuses.get(response.status, 0) + 1
        assert response.status in CLIENT_ERRORS | {200}, (i, response.status, body[:200])
        if response.status == 200:
            # Still ours and still signed: it verifies and answers this transaction.
            reply = parse_cert_rep(body, request, ra_certs=[ra])
            assert reply.status in (PKIStatus.SUCCESS, PKIStatus.FAILURE)
    assert statuses.get(400, 0) > 200
    assert "unexpected error" not in server.log()
    # The server is still there and still enrolls.
    fresh = build_pkcs_req(ra, cn="after-fuzz", challenge=CHALLENGE)
    response = server.request("POST", "/scep?operation=PKIOperation", body=fresh.message)
    assert parse_cert_rep(response.read_body, fresh,  # type: ignore[attr-defined]
                          ra_certs=[ra]).status is PKIStatus.SUCCESS


def test_broken_queries_and_base64_are_400(server: Server) -> None:
    good = base64.b64encode(b"\x30\x03\x02\x01\x00").decode()
    for query in ("operation=PKIOperation&message=%%%",
                  "operation=PKIOperation&message=" + "A" * 7,
                  "operation=PKIOperation",
                  "operation=PKIOperation&operation=GetCACaps",
                  f"operation=PKIOperation&message={good}&message={good}",
                  "operation=" + urllib.parse.quote("\x00\xff"),
                  "operation=PKIOperation&message=" + urllib.parse.quote("\u00e9" * 10)):
        response = server.request("GET", f"/scep?{query}")
        assert response.status == 400, (query, response.status)
        assert len(response.read_body) < 300  # type: ignore[attr-defined]


def test_raw_protocol_garbage_does_not_hurt_the_server(server: Server) -> None:
    for raw in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # TLS hello
                b"GET / HTTP/9.9\r\n\r\n",
                b"POST /scep?operation=PKIOperation HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: -5\r\n\r\n",
                b"POST /scep?operation=PKIOperation HTTP/1.1\r\nHost: x\r\n"
                b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
                b"\r\n" * 100):
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        if answer:
            status = int(answer.split(b" ", 2)[1])
            assert 400 <= status < 500, (raw[:40], answer[:100])
    assert server.request("GET", "/scep?operation=GetCACaps").status == 200


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")
WEBSOCKET = (b"GET /scep?operation=GetCACaps HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
             b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
             b"Sec-WebSocket-Version: 13\r\n\r\n")
OTHER_UPGRADE = (b"GET /scep?operation=GetCACaps HTTP/1.1\r\nHost: x\r\n"
                 b"Connection: Upgrade\r\nUpgrade: TLS/1.2\r\n\r\n")
H2C_UPGRADE = (b"GET /scep?operation=GetCACaps HTTP/1.1\r\nHost: x\r\n"
               b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
               b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
# Which body counts? Content-Length says 5 bytes, chunked says none, and the
# GET behind it is a request to one reading and body bytes to the other.
SMUGGLED = (b"POST /scep?operation=PKIOperation HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            b"GET /scep?operation=GetCACaps HTTP/1.1\r\nHost: x\r\n\r\n")
# RFC 9112 section 6.1 suggests 501 for an unknown coding; a client's request gets a 4xx here.
GZIPPED = (b"POST /scep?operation=PKIOperation HTTP/1.1\r\nHost: x\r\n"
           b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"
           b"GET /scep?operation=GetCACaps HTTP/1.1\r\nHost: x\r\n\r\n")
REFUSED = (H2_PREFACE, WEBSOCKET, OTHER_UPGRADE, SMUGGLED, GZIPPED)


def exchange(port: int, raw: bytes, wait: float = 3.0) -> tuple[bytes, bool]:
    """Sends ``raw``; what came back, and whether the server closed within ``wait`` s."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(raw)
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except TimeoutError:
            return answer, False
    return answer, True


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1."), answer[:60]  # never an HTTP/2 frame
    return int(answer.split(b" ", 2)[1])


def test_http2_upgrades_and_ambiguous_framing_get_400_and_a_closed_connection(
        server: Server) -> None:
    # The SCEP port, then the metrics and admin ports (http.server).
    for port in (server.port, server.metrics_port, server.admin_port):
        for raw in REFUSED:
            answer, closed = exchange(port, raw)
            assert status_of(answer) == 400, (port, raw[:40], answer[:200])
            # Nothing behind it was answered.
            assert len(re.findall(rb"(?:^|\n)HTTP/1\.[01] \d{3} ", answer)) == 1, answer
            assert closed, (port, raw[:40])
    assert server.request("GET", "/scep?operation=GetCACaps").status == 200


def test_an_h2c_upgrade_is_answered_in_http1(server: Server) -> None:
    answer, _closed = exchange(server.port, H2C_UPGRADE + H2C_UPGRADE, wait=1.0)
    assert answer.count(b"HTTP/1.1 200 ") == 2, answer
    assert b" 101 " not in answer and b"SCEPStandard" in answer
    for port in (server.metrics_port, server.admin_port):
        answer, _closed = exchange(port, H2C_UPGRADE, wait=1.0)
        assert status_of(answer) in (200, 401, 404), answer[:200]
