"""The HTTP transport and enroll() against a small local SCEP server.

The server here is a few lines of stdlib HTTP around the native core, bound
to 127.0.0.1 on a free port; it records what it received so the tests can
check how the client sent it, and can be told to misbehave.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from scep_fast.client import (
    EnrollmentRefused,
    ResponseError,
    ScepTransport,
    TransportError,
    build_csr,
    enroll,
    generate_key,
)
from scep_fast.client.__main__ import main as cli_main
from scep_fast.crypto import CertRepSpec, IssueRequest, ScepContext, Unwrapped, certs_only
from scep_fast.protocol import FailInfo, PKIStatus

FULL_CAPS = b"AES\nPOSTPKIOperation\nSHA-256\nSHA-512\nSCEPStandard"


@dataclass
class StubServer:
    ctx: ScepContext
    ra: tuple[bytes, bytes]
    ca: tuple[bytes, bytes]
    caps: bytes = FULL_CAPS
    mode: str = "ok"
    seen: list[dict[str, object]] = field(default_factory=list)
    unwrapped: list[Unwrapped] = field(default_factory=list)
    url: str = ""

    def answer(self, message: bytes) -> tuple[int, str, bytes]:
        if self.mode == "http500":
            return 500, "text/plain", b"internal error"
        if self.mode == "slow":
            time.sleep(2)
        unwrapped = self.ctx.unwrap(message)
        self.unwrapped.append(unwrapped)
        if self.mode == "failure":
            spec = CertRepSpec(request=unwrapped, status=2, fail_info=FailInfo.BAD_REQUEST,
                               fail_info_text="wrong challenge password")
        else:
            now = int(time.time())
            if self.mode == "wrong-key":
                other = build_csr(generate_key("ec-p256"), "someone-else")
                issue = IssueRequest(csr_der=other, serial=7, not_before=now - 60,
                                     not_after=now + 3600)
            else:
                issue = IssueRequest(request=unwrapped, serial=7, not_before=now - 60,
                                     not_after=now + 3600)
            cert = self.ctx.issue(issue)
            spec = CertRepSpec(request=unwrapped, status=0, certs=[cert, self.ca[0]])
        content_type = "text/html" if self.mode == "wrong-type" else "application/x-pki-message"
        return 200, content_type, self.ctx.wrap(spec)


def _handler(stub: StubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            raw_query = self.path.partition("?")[2]
            params = dict(urllib.parse.parse_qsl(raw_query.replace("+", "%2B")))
            stub.seen.append({"method": "GET", "path": self.path, "query": raw_query})
            op = params.get("operation")
            if op == "GetCACaps":
                self._send(200, "text/plain", stub.caps)
            elif op == "GetCACert":
                self._send(200, "application/x-x509-ca-ra-cert",
                           certs_only([stub.ra[0], stub.ca[0]]))
            elif op == "PKIOperation":
                self._send(*stub.answer(base64.b64decode(params["message"], validate=True)))
            else:
                self._send(400, "text/plain", b"unknown operation")

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            stub.seen.append({"method": "POST", "path": self.path, "body": body,
                              "content_type": self.headers.get("Content-Type")})
            self._send(*stub.answer(body))

    return Handler


@pytest.fixture
def stub(ctx, ra, ca) -> Iterator[StubServer]:
    server_state = StubServer(ctx=ctx, ra=ra, ca=ca)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(server_state))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    server_state.url = f"http://127.0.0.1:{httpd.server_address[1]}/scep"
    try:
        yield server_state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _spki(key) -> bytes:  # type: ignore[no-untyped-def]
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def test_enroll_by_post(stub, device_key, ca_cert, ra_cert):
    result = enroll(stub.url, "secret-challenge", "post-device", key=device_key,
                    sans=["post.example"], timeout=10)
    assert result.status is PKIStatus.SUCCESS
    assert result.raise_for_status() is result
    assert result.cert is not None
    assert _spki(result.cert.public_key()) == _spki(device_key.public_key())
    result.cert.verify_directly_issued_by(ca_cert)
    assert result.chain == (ca_cert,)
    assert result.ca_certs.ra == ra_cert
    posts = [s for s in stub.seen if s["method"] == "POST"]
    assert len(posts) == 1
    assert posts[0]["body"] == result.request.message
    assert posts[0]["content_type"] == "application/x-pki-message"
    assert posts[0]["path"] == "/scep?operation=PKIOperation"
    # The strongest algorithms the caps offer.
    (unwrapped,) = stub.unwrapped
    assert unwrapped.algorithms.digest == "SHA512"
    assert unwrapped.algorithms.cipher == "AES-128-CBC"
    assert unwrapped.csr is not None and unwrapped.csr.challenge == b"secret-challenge"


def test_enroll_by_get_percent_encodes_the_message(stub, device_key):
    result = enroll(stub.url, "secret-challenge", "get-device", key=device_key, use_get=True,
                    digest="sha256", cipher="aes256", timeout=10)
    assert result.status is PKIStatus.SUCCESS
    (get,) = [s for s in stub.seen if "PKIOperation" in str(s.get("path"))]
    assert get["method"] == "GET"
    query = str(get["query"])
    message = query.partition("message=")[2]
    for raw in "+/= \n":
        assert raw not in message, f"{raw!r} must be percent-encoded"
    assert base64.b64decode(urllib.parse.unquote(message)) == result.request.message
    (unwrapped,) = stub.unwrapped
    assert unwrapped.algorithms.digest == "SHA256"
    assert unwrapped.algorithms.cipher == "AES-256-CBC"


def test_without_post_in_the_caps_get_is_used(stub, device_key):
    stub.caps = b"SHA-256\nDES3"
    result = enroll(stub.url, "c", "caps-device", key=device_key, timeout=10)
    assert result.status is PKIStatus.SUCCESS
    assert not [s for s in stub.seen if s["method"] == "POST"]
    assert stub.unwrapped[0].algorithms.cipher == "DES-EDE3-CBC"


def test_ec_device_key(stub):
    key = generate_key("ec-p256")
    result = enroll(stub.url, "c", "ec-device", key=key, timeout=10)
    assert result.cert is not None
    assert _spki(result.cert.public_key()) == _spki(key.public_key())


def test_failure_is_returned_and_raised_on_demand(stub, device_key):
    stub.mode = "failure"
    result = enroll(stub.url, "wrong", "refused-device", key=device_key, timeout=10)
    assert result.status is PKIStatus.FAILURE
    assert result.fail_info is FailInfo.BAD_REQUEST
    assert result.fail_info_text == "wrong challenge password"
    assert result.cert is None
    with pytest.raises(EnrollmentRefused, match="BAD_REQUEST.*wrong challenge password"):
        result.raise_for_status()


def test_certificate_for_another_key_is_refused(stub, device_key):
    stub.mode = "wrong-key"
    with pytest.raises(ResponseError, match="device key"):
        enroll(stub.url, "c", "device", key=device_key, timeout=10)


def test_http_error_is_a_transport_error(stub, device_key):
    stub.mode = "http500"
    with pytest.raises(TransportError, match="HTTP 500.*internal error"):
        enroll(stub.url, "c", "device", key=device_key, timeout=10)


def test_wrong_content_type_is_refused(stub, device_key):
    stub.mode = "wrong-type"
    with pytest.raises(ResponseError, match="content type 'text/html'"):
        enroll(stub.url, "c", "device", key=device_key, timeout=10)


def test_timeout(stub, device_key):
    stub.mode = "slow"
    started = time.monotonic()
    with pytest.raises(TransportError, match="timed out"):
        enroll(stub.url, "c", "device", key=device_key, timeout=0.5)
    assert time.monotonic() - started < 2


def test_connection_refused():
    transport = ScepTransport("http://127.0.0.1:9/scep", timeout=2)
    with pytest.raises(TransportError, match="GetCACaps"):
        transport.get_ca_caps()


def test_ca_fingerprint_pins_the_ca(stub, device_key, ca):
    good = hashlib.sha256(ca[0]).digest()
    assert enroll(stub.url, "c", "pinned", key=device_key, ca_fingerprint=good,
                  timeout=10).status is PKIStatus.SUCCESS
    with pytest.raises(ResponseError, match="fingerprint"):
        enroll(stub.url, "c", "pinned", key=device_key, ca_fingerprint=b"\0" * 32, timeout=10)


def test_bad_urls_are_refused():
    for url in ("ftp://host/scep", "127.0.0.1:8080/scep", "http:///scep"):
        with pytest.raises(ValueError):
            ScepTransport(url)


def test_command_line(stub, tmp_path, capsys, ca_cert):
    key_out, cert_out, chain_out = tmp_path / "k.pem", tmp_path / "c.pem", tmp_path / "ch.pem"
    code = cli_main(["enroll", stub.url, "--cn", "cli-device", "--challenge", "c",
                     "--key-type", "ec-p256", "--get", "--key-out", str(key_out),
                     "--cert-out", str(cert_out), "--chain-out", str(chain_out),
                     "--timeout", "10"])
    assert code == 0
    line = json.loads(capsys.readouterr().out)
    assert line["status"] == "SUCCESS" and line["subject"] == "CN=cli-device"
    key = serialization.load_pem_private_key(key_out.read_bytes(), None)
    cert = x509.load_pem_x509_certificate(cert_out.read_bytes())
    assert _spki(cert.public_key()) == _spki(key.public_key())
    assert x509.load_pem_x509_certificates(chain_out.read_bytes()) == [ca_cert]

    stub.mode = "failure"
    assert cli_main(["enroll", stub.url, "--cn", "x", "--timeout", "10"]) == 2
    assert json.loads(capsys.readouterr().out)["fail_info"] == "BAD_REQUEST"
    stub.mode = "http500"
    assert cli_main(["enroll", stub.url, "--cn", "x", "--timeout", "10"]) == 3
    assert "HTTP 500" in json.loads(capsys.readouterr().out)["error"]
