"""certmonger's scep-submit, a second independent client (C, OpenSSL), against `scep-fast serve`.

scep-submit does not build requests (certmonger's daemon does): it sends a
ready pkiMessage, always by GET, verifies the CertRep's signature against the
CA given with ``-N`` (and the RA given with ``-r``), checks transactionID,
recipientNonce = our senderNonce and a present senderNonce, and prints the
still-encrypted pkcsPKIEnvelope. Here our own client builds the PKCSReq and
opens that envelope with the device key.

What this proves: GetCACaps and GetCACert answers that certmonger accepts
(content types, RA then CA); PKCSReqs sent by GET with several digests and
ciphers are issued, and the reply is signed in a way OpenSSL's PKCS7 code
verifies against our CA; the envelope is encrypted with the cipher the
request used and holds a certificate for the device key; a wrong challenge
is a signed rejection (exit code 2); and the signature check is real: with
another CA as ``-N`` the same kind of reply is refused (exit code 3).
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from scep_fast.client import PkiRequest, build_pkcs_req, build_renewal_req, decrypt_envelope
from tests.conftest import needs_peer
from tests.interop.conftest import (
    CHALLENGE,
    PEER_TIMEOUT_SECONDS,
    SCEP_SUBMIT,
    init_dir,
    ledger,
    request_log,
    require,
    scep_fast,
    set_config,
    start_server,
)

pytestmark = needs_peer(SCEP_SUBMIT is not None,
                        "certmonger's scep-submit is not installed (Debian package `certmonger`)")

# scep-submit's exit codes (certmonger-scep-submit(8)).
ISSUED, REJECTED, UNREACHABLE = 0, 2, 3

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.S)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A server with the default policy (RA mode, RSA-2048 CA, no legacy algorithms)."""
    directory = init_dir(tmp_path_factory.mktemp("certmonger") / "scep")
    running = start_server(directory)
    yield running
    running.stop()


def submit(server: Any, *args: str) -> tuple[int, str]:
    """Runs scep-submit against the server: exit code and standard output."""
    binary = require(SCEP_SUBMIT, "certmonger's scep-submit (Debian package `certmonger`)")
    done = subprocess.run([binary, "-u", server.url, *args], capture_output=True,
                          text=True, timeout=PEER_TIMEOUT_SECONDS)
    return done.returncode, done.stdout


def pem_blocks(text: str) -> list[tuple[str, bytes]]:
    return [(label.decode(), base64.b64decode(body))
            for label, body in _PEM_BLOCK.findall(text.encode())]


def write_request(request: PkiRequest, path: Path) -> Path:
    """The pkiMessage as PEM, as certmonger's daemon hands it to scep-submit."""
    body = base64.encodebytes(request.message).decode()
    path.write_text(f"-----BEGIN PKCS7-----\n{body}-----END PKCS7-----\n")
    return path


def _ra_cert(server: Any) -> x509.Certificate:
    return x509.load_pem_x509_certificate((server.directory / "ra.pem").read_bytes())


def _spki(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _last_entry(server: Any, transaction_id: str) -> dict[str, Any]:
    """The server's last log entry for the transaction (5 s at most)."""
    deadline = time.monotonic() + 5
    while True:
        entries = [e for e in request_log(server) if e.get("transaction_id") == transaction_id]
        if entries or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert entries, server.log()[-2000:]
    return entries[-1]


def test_get_ca_caps(server: Any) -> None:
    rc, output = submit(server, "-c")
    assert rc == ISSUED, output
    keywords = output.strip().split("\n")
    direct = server.request("GET", "/scep?operation=GetCACaps").read_body.decode()
    assert keywords == direct.strip().split("\n")
    assert {"AES", "SHA-256", "POSTPKIOperation", "SCEPStandard"} <= set(keywords)


def test_get_ca_cert_gives_ra_then_ca(server: Any) -> None:
    rc, output = submit(server, "-C")
    assert rc == ISSUED, output
    blocks = pem_blocks(output)
    assert [label for label, _ in blocks] == ["CERTIFICATE", "CERTIFICATE"], output
    on_disk = [x509.load_pem_x509_certificate((server.directory / name).read_bytes())
               .public_bytes(serialization.Encoding.DER) for name in ("ra.pem", "ca.pem")]
    assert [der for _, der in blocks] == on_disk


@pytest.mark.parametrize(("digest", "cipher"), [("sha256", "aes128"), ("sha512", "aes256"),
                                                 ("sha1", "des3")])
def test_pkcs_req_by_get_is_issued_and_the_envelope_opens_with_the_device_key(
        server: Any, tmp_path: Path, digest: str, cipher: str) -> None:
    ra_pem, ca_pem = server.directory / "ra.pem", server.directory / "ca.pem"
    cn = f"certmonger-{digest}-{cipher}"
    request = build_pkcs_req(_ra_cert(server), cn=cn, challenge=CHALLENGE,
                             digest=digest, cipher=cipher)
    rc, output = submit(server, "-r", str(ra_pem), "-N", str(ca_pem), "-p",
                        str(write_request(request, tmp_path / "pkcsreq.pem")))
    assert rc == ISSUED, output

    blocks = pem_blocks(output)
    assert [label for label, _ in blocks] == ["PKCS7"], output
    plaintext, used = decrypt_envelope(blocks[0][1], request.signer_key, request.signer_cert)
    assert used == cipher, "the reply uses the request's content cipher"
    signed = cms.ContentInfo.load(plaintext)
    assert signed["content_type"].native == "signed_data"
    assert len(signed["content"]["signer_infos"]) == 0, "a certs-only SignedData"
    cert = x509.load_der_x509_certificate(signed["content"]["certificates"][0].chosen.dump())
    assert request.device_key is not None
    assert _spki(cert.public_key()) == _spki(request.device_key.public_key())
    assert cert.subject.rfc4514_string() == f"CN={cn}"
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem.read_bytes()))

    entry = _last_entry(server, request.transaction_id)
    assert (entry["transport"], entry["message_type"], entry["outcome"]) \
        == ("GET", "PKCS_REQ", "SUCCESS")
    records = [r for r in ledger(server.directory)
               if r["transaction_id"] == request.transaction_id]
    assert [r["serial"] for r in records] == [format(cert.serial_number, "x")]


def test_wrong_challenge_is_rejected(server: Any, tmp_path: Path) -> None:
    request = build_pkcs_req(_ra_cert(server), cn="certmonger-intruder",
                             challenge="not-the-challenge")
    rc, output = submit(server, "-r", str(server.directory / "ra.pem"),
                        "-N", str(server.directory / "ca.pem"), "-p",
                        str(write_request(request, tmp_path / "pkcsreq.pem")))
    # Exit code 2 comes only from a verified CertRep with pkiStatus FAILURE.
    assert rc == REJECTED, output
    assert "not permitted or is not supported" in output, output
    assert pem_blocks(output) == []
    entry = _last_entry(server, request.transaction_id)
    assert (entry["outcome"], entry["fail_info"]) == ("FAILURE", "BAD_REQUEST")
    assert not [r for r in ledger(server.directory)
                if r["transaction_id"] == request.transaction_id]


def test_reply_does_not_verify_against_another_ca(server: Any, tmp_path: Path) -> None:
    other = init_dir(tmp_path / "other")
    request = build_pkcs_req(_ra_cert(server), cn="certmonger-other-ca", challenge=CHALLENGE)
    rc, output = submit(server, "-r", str(server.directory / "ra.pem"),
                        "-N", str(other / "ca.pem"), "-p",
                        str(write_request(request, tmp_path / "pkcsreq.pem")))
    assert rc == UNREACHABLE, output
    assert "failed to verify signature" in output, output


@pytest.fixture(scope="module")
def approving_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A server whose default profile needs an operator's approval."""
    directory = init_dir(tmp_path_factory.mktemp("certmonger-approval") / "scep")
    set_config(directory, "profiles.default", "require_approval", "true")
    running = start_server(directory)
    yield running
    running.stop()


def test_pending_request_polled_until_approved(approving_server: Any, tmp_path: Path) -> None:
    server = approving_server
    request = build_pkcs_req(_ra_cert(server), cn="certmonger-pending", challenge=CHALLENGE)
    args = ["-r", str(server.directory / "ra.pem"), "-N", str(server.directory / "ca.pem"),
            "-p", str(write_request(request, tmp_path / "pkcsreq.pem"))]
    rc, output = submit(server, *args)
    # 1 or 5: the CA answered PENDING (certmonger-scep-submit(8)).
    assert rc in (1, 5), output
    rc, output = submit(server, *args)
    assert rc in (1, 5), output
    listed = scep_fast("requests", "list", "--json", "--dir", str(server.directory))
    request_id = next(json.loads(line)["request_id"] for line in listed.stdout.splitlines()
                      if json.loads(line)["transaction_id"] == request.transaction_id)
    done = scep_fast("requests", "approve", request_id, "--dir", str(server.directory))
    assert done.returncode == 0, done.stderr
    rc, output = submit(server, *args)
    assert rc == ISSUED, output
    plaintext, _ = decrypt_envelope(pem_blocks(output)[0][1], request.signer_key,
                                    request.signer_cert)
    signed = cms.ContentInfo.load(plaintext)
    cert = x509.load_der_x509_certificate(signed["content"]["certificates"][0].chosen.dump())
    assert request.device_key is not None
    assert _spki(cert.public_key()) == _spki(request.device_key.public_key())


def test_renewal_with_a_new_key(server: Any, tmp_path: Path) -> None:
    ra_pem, ca_pem = server.directory / "ra.pem", server.directory / "ca.pem"
    first = build_pkcs_req(_ra_cert(server), cn="certmonger-rekey", challenge=CHALLENGE)
    rc, output = submit(server, "-r", str(ra_pem), "-N", str(ca_pem), "-p",
                        str(write_request(first, tmp_path / "first.pem")))
    assert rc == ISSUED, output
    plaintext, _ = decrypt_envelope(pem_blocks(output)[0][1], first.signer_key,
                                    first.signer_cert)
    old = x509.load_der_x509_certificate(
        cms.ContentInfo.load(plaintext)["content"]["certificates"][0].chosen.dump())
    # Rekey: a RenewalReq for a new key, signed with the old certificate and key.
    renewal = build_renewal_req(_ra_cert(server), old_cert=old, old_key=first.signer_key,
                                cn="certmonger-rekey")
    rc, output = submit(server, "-r", str(ra_pem), "-N", str(ca_pem), "-p",
                        str(write_request(renewal, tmp_path / "renewal.pem")))
    assert rc == ISSUED, output
    plaintext, _ = decrypt_envelope(pem_blocks(output)[0][1], renewal.signer_key,
                                    renewal.signer_cert)
    new = x509.load_der_x509_certificate(
        cms.ContentInfo.load(plaintext)["content"]["certificates"][0].chosen.dump())
    assert renewal.device_key is not None
    assert _spki(new.public_key()) == _spki(renewal.device_key.public_key())
    assert _spki(new.public_key()) != _spki(old.public_key())
    assert new.subject == old.subject and new.serial_number != old.serial_number
    entry = _last_entry(server, renewal.transaction_id)
    assert (entry["message_type"], entry["outcome"]) == ("RENEWAL_REQ", "SUCCESS")
