"""Third-party clients against a server whose CA and RA keys live in a SoftHSM2 token.

The same peers as the file-key interop tests: micromdm's scepclient (Go; POST,
single DES and SHA-1, so the server allows legacy algorithms) and certmonger's
scep-submit (C, OpenSSL; GET). Each verifies the CertRep's signature, made by
the token's RA key, and the certificate inside, made by the token's CA key.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from asn1crypto import cms
from cryptography import x509

from scep_fast.client import PkiRequest, build_pkcs_req, build_renewal_req, decrypt_envelope
from tests.conftest import needs_peer
from tests.integration.conftest import set_config
from tests.integration.test_token_keys import TokenServer, start_token_server
from tests.interop.conftest import CHALLENGE, SCEP_SUBMIT, SCEPCLIENT, request_log
from tests.interop.test_certmonger import ISSUED, pem_blocks, submit, write_request
from tests.interop.test_scepclient import Device, _openssl_verify


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    def legacy(directory: Path) -> None:
        set_config(directory, "enrollment", "allow_legacy_algorithms", "true")

    running = start_token_server(tmp_path_factory.mktemp("token-peers"), legacy)
    yield running
    running.server.stop()


def _issued(output: str, request: PkiRequest) -> x509.Certificate:
    plaintext, _ = decrypt_envelope(pem_blocks(output)[0][1], request.signer_key,
                                    request.signer_cert)
    return x509.load_der_x509_certificate(
        cms.ContentInfo.load(plaintext)["content"]["certificates"][0].chosen.dump())


@needs_peer(SCEPCLIENT is not None, "micromdm scepclient is not installed (Debian package `scep`)")
def test_scepclient_enrolls_and_renews(token_server: TokenServer, tmp_path: Path) -> None:
    server = token_server.server
    device = Device(tmp_path / "device")
    rc, output = device.enroll(server.url, "scepclient-token")
    assert rc == 0, output
    assert "pkiStatus=SUCCESS" in output
    _openssl_verify(server.directory / "ca.pem", device.cert_path)
    issued = device.cert()
    # Run again with its certificate: a RenewalReq, signed by that certificate.
    rc, output = device.enroll(server.url, "scepclient-token", challenge="not-needed")
    assert rc == 0, output
    renewed = device.cert()
    assert renewed.serial_number != issued.serial_number and renewed.subject == issued.subject
    _openssl_verify(server.directory / "ca.pem", device.cert_path)
    kinds = [(e["message_type"], e["outcome"]) for e in request_log(server)]
    assert ("RENEWAL_REQ", "SUCCESS") in kinds


@needs_peer(SCEP_SUBMIT is not None,
            "certmonger's scep-submit is not installed (Debian package `certmonger`)")
@pytest.mark.parametrize(("digest", "cipher"), [("sha256", "aes128"), ("sha1", "des3")])
def test_certmonger_enrolls_and_renews_by_get(token_server: TokenServer, tmp_path: Path,
                                              digest: str, cipher: str) -> None:
    server = token_server.server
    ra_pem, ca_pem = server.directory / "ra.pem", server.directory / "ca.pem"
    ra = x509.load_pem_x509_certificate(ra_pem.read_bytes())
    ca = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    first = build_pkcs_req(ra, cn=f"certmonger-token-{cipher}", challenge=CHALLENGE,
                           digest=digest, cipher=cipher)
    rc, output = submit(server, "-r", str(ra_pem), "-N", str(ca_pem), "-p",
                        str(write_request(first, tmp_path / "first.pem")))
    assert rc == ISSUED, output
    old = _issued(output, first)
    old.verify_directly_issued_by(ca)
    renewal = build_renewal_req(ra, old_cert=old, old_key=first.signer_key,
                                cn=f"certmonger-token-{cipher}", digest=digest, cipher=cipher)
    rc, output = submit(server, "-r", str(ra_pem), "-N", str(ca_pem), "-p",
                        str(write_request(renewal, tmp_path / "renewal.pem")))
    assert rc == ISSUED, output
    new = _issued(output, renewal)
    new.verify_directly_issued_by(ca)
    assert new.subject == old.subject and new.serial_number != old.serial_number
