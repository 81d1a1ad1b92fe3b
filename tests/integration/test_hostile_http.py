"""Hostile requests over real HTTP: a clear 4xx or a signed CertRep, never a 5xx or a crash."""

from __future__ import annotations

import base64
import random
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
