"""micromdm's scepclient against an NDES-style RA pair (`init --ra-pair`).

What scepclient does with the three GetCACert certificates (signing RA,
encryption RA, CA), as observed through a recording proxy: it does not pick
an RA by key usage; it envelopes the request to **every** certificate of the
GetCACert answer (one KeyTransRecipientInfo each, CA included), and the
server opens it with either RA key; the CertRep, signed by the signing RA,
is verified by scepclient before it reports pkiStatus. With
``-ca-fingerprint`` naming one of the certificates, it envelopes to that
one alone and verifies the CertRep's signer against that one alone:
pinned to the signing RA it enrolls; pinned to the encryption RA the
request is opened and issued, but scepclient refuses the reply ("No
certificate for signer"); pinned to the CA the request is not opened (the
CA key decrypts nothing in RA mode).

scepclient sends single DES and SHA-1, so the server allows legacy
algorithms here (see test_scepclient.py).
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import needs_peer
from tests.interop.conftest import (
    CHALLENGE,
    PEER_TIMEOUT_SECONDS,
    SCEPCLIENT,
    free_port,
    init_dir,
    request_log,
    request_log_entries,
    require,
    set_config,
    start_server,
)

pytestmark = needs_peer(SCEPCLIENT is not None,
                        "micromdm scepclient is not installed (Debian package `scep`)")


class RecordingProxy:
    """An HTTP proxy on loopback that forwards to the server and keeps every POST body."""

    def __init__(self, upstream_port: int) -> None:
        bodies: list[bytes] = []
        self.bodies = bodies

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self, body: bytes | None) -> None:
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                response = conn.getresponse()
                data = response.read()
                conn.close()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in ("connection", "transfer-encoding",
                                            "content-length"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
                self._forward(None)

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                bodies.append(body)
                self._forward(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.port = free_port()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/scep"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, RecordingProxy]]:
    directory = init_dir(tmp_path_factory.mktemp("pair") / "scep", "--ra-pair")
    set_config(directory, "enrollment", "allow_legacy_algorithms", "true")
    server = start_server(directory)
    proxy = RecordingProxy(server.port)
    yield server, proxy
    proxy.close()
    server.stop()


def _pem(directory: Path, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((directory / name).read_bytes())


def _recipients(message: bytes) -> set[tuple[bytes, int]]:
    """(issuer DER, serial) of every KeyTransRecipientInfo of the request's envelope."""
    signed = cms.ContentInfo.load(message)["content"]
    enveloped = cms.ContentInfo.load(signed["encap_content_info"]["content"].native)["content"]
    found = set()
    for info in enveloped["recipient_infos"]:
        rid = info.chosen["rid"]
        assert rid.name == "issuer_and_serial_number"
        found.add((rid.chosen["issuer"].dump(), int(rid.chosen["serial_number"].native)))
    return found


def _names(cert: x509.Certificate) -> tuple[bytes, int]:
    return cert.issuer.public_bytes(), cert.serial_number


def _scepclient(directory: Path, url: str, cn: str, *extra: str) -> tuple[int, str]:
    binary = require(SCEPCLIENT, "micromdm scepclient (Debian package `scep`)")
    directory.mkdir(parents=True)
    done = subprocess.run(
        [binary, "-private-key", "device.key", "-certificate", "device.pem",
         "-server-url", url, "-challenge", CHALLENGE, "-cn", cn, *extra],
        cwd=directory, capture_output=True, text=True, timeout=PEER_TIMEOUT_SECONDS)
    return done.returncode, done.stdout + done.stderr


def _fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def test_scepclient_envelopes_to_every_certificate_and_enrolls(pair: Any,
                                                               tmp_path: Path) -> None:
    server, proxy = pair
    before = len(proxy.bodies)
    rc, output = _scepclient(tmp_path / "device", proxy.url, "pair-scepclient")
    assert rc == 0, output
    assert "pkiStatus=SUCCESS" in output, output
    ca = _pem(server.directory, "ca.pem")
    signing = _pem(server.directory, "ra.pem")
    encryption = _pem(server.directory, "ra-encryption.pem")
    assert len(proxy.bodies) == before + 1
    assert _recipients(proxy.bodies[-1]) == {_names(signing), _names(encryption), _names(ca)}
    cert = x509.load_pem_x509_certificate((tmp_path / "device" / "device.pem").read_bytes())
    cert.verify_directly_issued_by(ca)


def test_scepclient_pinned_to_the_signing_ra_enrolls(pair: Any, tmp_path: Path) -> None:
    server, proxy = pair
    signing = _pem(server.directory, "ra.pem")
    rc, output = _scepclient(tmp_path / "device", proxy.url, "pair-pinned-signing",
                             "-ca-fingerprint", _fingerprint(signing))
    assert rc == 0, output
    assert "pkiStatus=SUCCESS" in output, output
    assert _recipients(proxy.bodies[-1]) == {_names(signing)}


def test_scepclient_pinned_to_the_encryption_ra_refuses_the_reply(pair: Any,
                                                                  tmp_path: Path) -> None:
    # The request is opened and the certificate issued, but scepclient checks
    # the CertRep's signer against the pinned certificate alone, and the
    # signing RA signed it: scepclient is not written for an RA pair.
    server, proxy = pair
    encryption = _pem(server.directory, "ra-encryption.pem")
    before = len(request_log(server))
    rc, output = _scepclient(tmp_path / "device", proxy.url, "pair-pinned-encryption",
                             "-ca-fingerprint", _fingerprint(encryption))
    assert rc != 0, output
    assert "No certificate for signer" in output, output
    assert _recipients(proxy.bodies[-1]) == {_names(encryption)}
    entry = request_log_entries(server, before + 1)[-1]
    assert (entry["message_type"], entry["outcome"]) == ("PKCS_REQ", "SUCCESS"), entry


def test_scepclient_pinned_to_the_ca_is_not_opened(pair: Any, tmp_path: Path) -> None:
    server, proxy = pair
    ca = _pem(server.directory, "ca.pem")
    rc, output = _scepclient(tmp_path / "device", proxy.url, "pair-pinned-ca",
                             "-ca-fingerprint", _fingerprint(ca))
    assert rc != 0, output
    assert _recipients(proxy.bodies[-1]) == {_names(ca)}
    assert not (tmp_path / "device" / "device.pem").exists()
