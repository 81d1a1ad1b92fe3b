"""micromdm's scepclient, a third-party SCEP client, against a real `scep-fast serve`.

scepclient (Go, Debian package `scep`) creates its key and CSR when missing,
then sends GetCACert, GetCACaps and a PKCSReq by POST. It uses SHA-1 and
single DES whatever GetCACaps offers, so our server enrolls it only with
``enrollment.allow_legacy_algorithms = true``; otherwise it must answer with
a signed CertRep FAILURE badAlg, which scepclient verifies and reports.

scepclient verifies the CertRep's signature before it reads pkiStatus or
failInfo, so each failInfo it prints is one our server signed.

Renewal-style resends, as the server handles them today:

* Same key, no certificate file (a device that lost its answer): scepclient
  sends the same PKCSReq again (same transactionID, same CSR) and our server
  answers with the same certificate. The ledger still holds one record.
* Same key and its issued certificate on disk: scepclient then sends a
  RenewalReq (17) signed with that certificate, and the server renews it
  without the challenge: a new certificate for the same key and subject.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import needs_peer
from tests.interop.conftest import (
    CHALLENGE,
    PEER_TIMEOUT_SECONDS,
    SCEPCLIENT,
    init_dir,
    ledger,
    request_log,
    request_log_entries,
    require,
    set_config,
    start_server,
)

pytestmark = needs_peer(SCEPCLIENT is not None,
                        "micromdm scepclient is not installed (Debian package `scep`)")


@pytest.fixture(scope="module")
def legacy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A server that accepts single DES and SHA-1 (allow_legacy_algorithms = true)."""
    directory = init_dir(tmp_path_factory.mktemp("legacy") / "scep")
    set_config(directory, "enrollment", "allow_legacy_algorithms", "true")
    server = start_server(directory)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A server with the default policy: single DES is refused."""
    directory = init_dir(tmp_path_factory.mktemp("strict") / "scep")
    server = start_server(directory)
    yield server
    server.stop()


class Device:
    """One scepclient identity: its key and certificate files in a directory of its own.

    scepclient also writes csr.pem and self.pem into its working directory,
    which is why every device has its own.
    """

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.key_path = directory / "device.key"
        self.cert_path = directory / "device.pem"

    def enroll(self, url: str, cn: str, challenge: str = CHALLENGE) -> tuple[int, str]:
        """Runs scepclient; returns its exit code and its whole output."""
        binary = require(SCEPCLIENT, "micromdm scepclient (Debian package `scep`)")
        done = subprocess.run(
            [binary, "-private-key", str(self.key_path), "-certificate", str(self.cert_path),
             "-server-url", url, "-challenge", challenge, "-cn", cn],
            cwd=self.directory, capture_output=True, text=True, timeout=PEER_TIMEOUT_SECONDS)
        return done.returncode, done.stdout + done.stderr

    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_path.read_bytes())

    def public_key_der(self) -> bytes:
        key = serialization.load_pem_private_key(self.key_path.read_bytes(), None)
        return key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def _records_of(server: Any, transaction_id: str) -> list[dict[str, Any]]:
    return [r for r in ledger(server.directory) if r["transaction_id"] == transaction_id]


def _openssl_verify(ca: Path, cert: Path) -> None:
    done = subprocess.run(["openssl", "verify", "-CAfile", str(ca), str(cert)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == f"{cert}: OK"


def test_enrolls_by_post_when_legacy_algorithms_are_allowed(legacy: Any, tmp_path: Path) -> None:
    device = Device(tmp_path / "device")
    before = len(request_log(legacy))
    rc, output = device.enroll(legacy.url, "scepclient-1")
    assert rc == 0, output
    assert "pkiStatus=SUCCESS" in output

    cert = device.cert()
    assert _spki(cert) == device.public_key_der(), "certificate for scepclient's own key"
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value \
        == "scepclient-1"
    _openssl_verify(legacy.directory / "ca.pem", device.cert_path)

    entry = request_log_entries(legacy, before + 1)[-1]
    assert (entry["transport"], entry["message_type"], entry["outcome"]) \
        == ("POST", "PKCS_REQ", "SUCCESS")
    assert entry["serial"] == format(cert.serial_number, "x")
    records = {r["serial"]: r for r in ledger(legacy.directory)}
    record = records[format(cert.serial_number, "x")]
    assert record["status"] == "issued"
    assert record["transaction_id"] == entry["transaction_id"]
    assert record["subject"] == cert.subject.rfc4514_string()


def test_legacy_switch_off_answers_a_signed_bad_alg(strict: Any, tmp_path: Path) -> None:
    device = Device(tmp_path / "device")
    rc, output = device.enroll(strict.url, "scepclient-refused")
    assert rc != 0, output
    # Printed only after scepclient verified the CertRep's signature.
    assert "PKCSReq (19) request failed, failInfo: badAlg" in output, output
    assert not device.cert_path.exists()

    entry = request_log_entries(strict, 1)[-1]
    assert (entry["outcome"], entry["fail_info"]) == ("FAILURE", "BAD_ALG")
    assert "DES" in entry["reason"], entry
    assert ledger(strict.directory) == []


def test_resend_with_the_same_key_gets_the_same_certificate(legacy: Any, tmp_path: Path) -> None:
    device = Device(tmp_path / "device")
    rc, output = device.enroll(legacy.url, "scepclient-resend")
    assert rc == 0, output
    first = device.cert_path.read_bytes()
    # The answer is lost: the key (and scepclient's csr.pem) stay, the certificate goes.
    device.cert_path.unlink()
    before = len(request_log(legacy))
    rc, output = device.enroll(legacy.url, "scepclient-resend")
    assert rc == 0, output
    assert device.cert_path.read_bytes() == first, "the resend gets the same certificate"

    entry = request_log_entries(legacy, before + 1)[-1]
    assert (entry["message_type"], entry["outcome"]) == ("PKCS_REQ", "SUCCESS")
    assert entry["serial"] == format(device.cert().serial_number, "x")
    assert len(_records_of(legacy, entry["transaction_id"])) == 1


def test_same_key_with_another_csr_is_refused(legacy: Any, tmp_path: Path) -> None:
    device = Device(tmp_path / "device")
    rc, output = device.enroll(legacy.url, "scepclient-first-name")
    assert rc == 0, output
    first = device.cert()
    # Same key, hence the same transactionID, but a new CSR with another subject.
    device.cert_path.unlink()
    (device.directory / "csr.pem").unlink()
    before = len(request_log(legacy))
    rc, output = device.enroll(legacy.url, "scepclient-other-name")
    assert rc != 0, output
    assert "PKCSReq (19) request failed, failInfo: badRequest" in output, output
    assert not device.cert_path.exists()

    entry = request_log_entries(legacy, before + 1)[-1]
    assert (entry["outcome"], entry["fail_info"]) == ("FAILURE", "BAD_REQUEST")
    records = _records_of(legacy, entry["transaction_id"])
    assert [r["serial"] for r in records] == [format(first.serial_number, "x")]


def test_rerun_with_its_certificate_renews_without_the_challenge(
        legacy: Any, tmp_path: Path) -> None:
    caps = legacy.request("GET", "/scep?operation=GetCACaps").read_body.decode().split("\n")
    assert "Renewal" in caps

    device = Device(tmp_path / "device")
    rc, output = device.enroll(legacy.url, "scepclient-renew")
    assert rc == 0, output
    issued = x509.load_pem_x509_certificate(device.cert_path.read_bytes())
    before = len(request_log(legacy))
    # scepclient now signs a RenewalReq with the certificate it holds.
    rc, output = device.enroll(legacy.url, "scepclient-renew", challenge="not-needed")
    assert rc == 0, output
    renewed = x509.load_pem_x509_certificate(device.cert_path.read_bytes())
    assert renewed.serial_number != issued.serial_number
    assert renewed.subject == issued.subject

    entry = request_log_entries(legacy, before + 1)[-1]
    assert (entry["transport"], entry["message_type"]) == ("POST", "RENEWAL_REQ")
    assert entry["outcome"] == "SUCCESS"
    assert entry["serial"] == format(renewed.serial_number, "x")
    serials = {r["serial"] for r in ledger(legacy.directory)}
    assert {format(issued.serial_number, "x"), format(renewed.serial_number, "x")} <= serials
