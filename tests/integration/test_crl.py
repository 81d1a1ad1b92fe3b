"""Revocation and CRLs: generation from the ledger, the file store, refresh, HTTP and GetCRL."""

from __future__ import annotations

import datetime
import hashlib
import os
import stat
import subprocess
from pathlib import Path
from typing import cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from scep_fast.client import build_get_crl, enroll, parse_cert_rep
from scep_fast.protocol import PKIStatus
from scep_fast.runtime import config as configuration
from scep_fast.runtime import crl, pki
from scep_fast.service.ledger import CertRecord
from scep_fast.service.ledger_memory import MemoryLedger
from tests.integration.conftest import CHALLENGE, Server, init_dir, scep_fast, set_config

T0 = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
PUBLIC_URL = "http://pki.example.test/scep-fast"


# ---- helpers ------------------------------------------------------------------------


def make_ca(cn: str) -> tuple[bytes, bytes, rsa.RSAPrivateKey]:
    key = pki.new_rsa_key(2048)
    cert = pki.make_ca(key, cn, T0 - datetime.timedelta(days=1))
    return (cert.public_bytes(serialization.Encoding.DER),
            key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
            key)


def issue(ca_der: bytes, ca_key: rsa.RSAPrivateKey, serial: int) -> CertRecord:
    ca = x509.load_der_x509_certificate(ca_der)
    key = pki.new_rsa_key(2048)
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name.from_rfc4514_string(f"CN=device-{serial}"))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(T0 - datetime.timedelta(days=1))
            .not_valid_after(T0 + datetime.timedelta(days=365))
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    der = cert.public_bytes(serialization.Encoding.DER)
    return CertRecord(
        serial=serial, der=der, subject=f"CN=device-{serial}", sans=(),
        not_before=int(cert.not_valid_before_utc.timestamp()),
        not_after=int(cert.not_valid_after_utc.timestamp()),
        issued_at=T0.timestamp(), transaction_id=f"tx-{serial}",
        requester_key_sha256=hashlib.sha256(der).digest(),
        csr_sha256=hashlib.sha256(der + b"csr").digest())


def openssl_crl_verify(crl_der: bytes, ca_pem: Path, tmp: Path) -> str:
    crl_path = tmp / f"check-{hashlib.sha256(crl_der).hexdigest()[:12]}.crl"
    crl_path.write_bytes(crl_der)
    done = subprocess.run(["openssl", "crl", "-inform", "DER", "-in", str(crl_path),
                           "-CAfile", str(ca_pem), "-noout", "-verify"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def fetch_crl(server: Server, name: str) -> bytes:
    response = server.request("GET", f"/crl/{name}.crl")
    assert response.status == 200, response.read_body  # type: ignore[attr-defined]
    assert response.getheader("Content-Type") == "application/pkix-crl"
    body = cast(bytes, response.read_body)  # type: ignore[attr-defined]
    assert response.getheader("Content-Length") == str(len(body))
    return body


def cdp_urls(cert: x509.Certificate) -> list[str]:
    points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    return [str(name.value) for point in points for name in (point.full_name or [])]


# ---- generation, without a server ------------------------------------------------------


def test_generated_crl_lists_only_this_cas_revocations_with_reasons() -> None:
    ca_der, ca_key_der, ca_key = make_ca("CRL CA")
    other_der, _other_key_der, other_key = make_ca("Other CA")
    ledger = MemoryLedger()
    ledger.commit([issue(ca_der, ca_key, 0x1001), issue(ca_der, ca_key, 0x1002),
                   issue(ca_der, ca_key, 0x1003), issue(other_der, other_key, 0x2001)])
    ledger.revoke(0x1001, 1, T0.timestamp() - 60)          # keyCompromise
    ledger.revoke(0x1002, 0, T0.timestamp() - 30)          # unspecified: no reason code
    ledger.revoke(0x2001, 4, T0.timestamp())               # another CA's certificate

    der = crl.generate_crl(ledger, ca_der, ca_key_der, validity_hours=5, now=T0)
    parsed = x509.load_der_x509_crl(der)
    ca = x509.load_der_x509_certificate(ca_der)
    assert parsed.issuer == ca.subject
    assert parsed.is_signature_valid(ca.public_key())
    assert parsed.last_update_utc == T0
    assert parsed.next_update_utc == T0 + datetime.timedelta(hours=5)
    assert sorted(r.serial_number for r in parsed) == [0x1001, 0x1002]
    first = parsed.get_revoked_certificate_by_serial_number(0x1001)
    assert first is not None
    assert first.extensions.get_extension_for_class(x509.CRLReason).value.reason \
        is x509.ReasonFlags.key_compromise
    assert first.revocation_date_utc == datetime.datetime.fromtimestamp(
        int(T0.timestamp() - 60), tz=datetime.UTC)
    second = parsed.get_revoked_certificate_by_serial_number(0x1002)
    assert second is not None
    # RFC 5280 section 5.3.1: absent rather than unspecified.
    with pytest.raises(x509.ExtensionNotFound):
        second.extensions.get_extension_for_class(x509.CRLReason)
    aki = parsed.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    number = parsed.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    again = x509.load_der_x509_crl(
        crl.generate_crl(ledger, ca_der, ca_key_der, validity_hours=5, now=T0))
    assert again.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > number


def test_names_and_urls_are_stable_per_ca() -> None:
    ca_der, _, _ = make_ca("Named CA")
    ski = x509.load_der_x509_certificate(ca_der).extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier).value.digest
    assert crl.crl_name(ca_der) == ski.hex()
    assert crl.crl_url("", ca_der) is None
    assert crl.crl_url("http://h.example/", ca_der) == f"http://h.example/crl/{ski.hex()}.crl"
    assert crl.reason_code("keyCompromise") == 1
    assert crl.reason_code("caCompromise") == crl.reason_code("cACompromise") == 2
    with pytest.raises(ValueError):
        crl.reason_code("bored")


def test_store_writes_atomically_and_rereads_changed_files(tmp_path: Path) -> None:
    ca_der, ca_key_der, ca_key = make_ca("Store CA")
    ledger = MemoryLedger()
    ledger.commit([issue(ca_der, ca_key, 0x77)])
    store = crl.CrlStore(tmp_path)
    name = crl.crl_name(ca_der)
    assert store.current(name) is None
    first = crl.generate_crl(ledger, ca_der, ca_key_der, validity_hours=5, now=T0)
    path = store.write(name, first)
    assert path == tmp_path / "crl" / f"{name}.crl"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert store.current(name) == first
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []
    issuer = x509.load_der_x509_certificate(ca_der).subject.public_bytes()
    assert store.by_issuer(issuer) == first
    assert store.by_issuer(b"\x30\x00") is None

    ledger.revoke(0x77, 4, T0.timestamp())
    second = crl.generate_crl(ledger, ca_der, ca_key_der, validity_hours=5, now=T0)
    store.write(name, second)
    assert store.current(name) == second
    # Names are hex key identifiers and nothing else.
    for bad in ("../crl/x", "..", "", "ABCDEF0123456789", name + "/..", "0" * 8):
        assert store.current(bad) is None


def test_refresh_rewrites_only_near_next_update(tmp_path: Path) -> None:
    directory = init_dir(tmp_path / "scep")
    set_config(directory, "crl", "validity_hours", "48")
    set_config(directory, "crl", "refresh_hours", "12")
    config = configuration.load(directory)
    material = pki.load_material(config)
    ledger = MemoryLedger()
    name = crl.crl_name(material.ca_cert)

    assert crl.refresh_all(config, ledger, material, now=T0) == [
        directory / "crl" / f"{name}.crl"]
    # Fresh: nothing to do, until less than refresh_hours is left.
    for hours in (1, 20, 35.9):
        later = T0 + datetime.timedelta(hours=hours)
        assert crl.refresh_all(config, ledger, material, now=later) == []
    later = T0 + datetime.timedelta(hours=36, seconds=1)
    assert len(crl.refresh_all(config, ledger, material, now=later)) == 1
    served = x509.load_der_x509_crl(crl.CrlStore(directory).current(name) or b"")
    assert served.next_update_utc == later + datetime.timedelta(hours=48)
    # Forced: always.
    assert len(crl.refresh_all(config, ledger, material, force=True, now=later)) == 1


def test_short_validity_is_refreshed_at_half_life_not_every_check(tmp_path: Path) -> None:
    directory = init_dir(tmp_path / "scep")
    set_config(directory, "crl", "validity_hours", "2")
    set_config(directory, "crl", "refresh_hours", "24")
    config = configuration.load(directory)
    material = pki.load_material(config)
    ledger = MemoryLedger()
    assert len(crl.refresh_all(config, ledger, material, now=T0)) == 1
    assert crl.refresh_all(config, ledger, material,
                           now=T0 + datetime.timedelta(minutes=59)) == []
    assert len(crl.refresh_all(config, ledger, material,
                               now=T0 + datetime.timedelta(minutes=61))) == 1


# ---- against the running server --------------------------------------------------------


def test_revoked_certificate_is_in_the_crl_over_http_and_getcrl(
        server_factory: object, tmp_path: Path) -> None:
    def configure(directory: Path) -> None:
        set_config(directory, "crl", "public_url", f'"{PUBLIC_URL}"')
        set_config(directory, "server", "workers", "2")

    server: Server = server_factory(configure=configure)  # type: ignore[operator]
    directory = server.directory
    ca_pem = directory / "ca.pem"
    ca = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    name = crl.crl_name(ca.public_bytes(serialization.Encoding.DER))

    # The supervisor writes the CRL at start: served before any revocation.
    empty = x509.load_der_x509_crl(fetch_crl(server, name))
    assert len(empty) == 0
    openssl_crl_verify(fetch_crl(server, name), ca_pem, tmp_path)

    kept = enroll(server.url, CHALLENGE, "kept-device")
    gone = enroll(server.url, CHALLENGE, "gone-device")
    assert kept.cert is not None and gone.cert is not None
    # Issued certificates name the CRL at the configured public URL.
    assert cdp_urls(gone.cert) == [f"{PUBLIC_URL}/crl/{name}.crl"]

    done = scep_fast("certs", "revoke", format(gone.cert.serial_number, "x"),
                     "--reason", "keyCompromise", "--dir", str(directory))
    assert done.returncode == 0, done.stderr
    assert f"{gone.cert.serial_number:x}" in done.stdout
    assert str(directory / "crl" / f"{name}.crl") in done.stdout

    der = fetch_crl(server, name)
    fetched = x509.load_der_x509_crl(der)
    entry = fetched.get_revoked_certificate_by_serial_number(gone.cert.serial_number)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason \
        is x509.ReasonFlags.key_compromise
    assert fetched.get_revoked_certificate_by_serial_number(kept.cert.serial_number) is None
    assert "verify OK" in openssl_crl_verify(der, ca_pem, tmp_path)
    assert fetched.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > \
        empty.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number

    head = server.request("HEAD", f"/crl/{name}.crl")
    assert head.status == 200
    assert head.getheader("Content-Length") == str(len(der))
    assert head.read_body == b""  # type: ignore[attr-defined]


def test_getcrl_answers_the_crl_with_the_revoked_certificate(
        server_factory: object, tmp_path: Path) -> None:
    server: Server = server_factory()  # type: ignore[operator]
    directory = server.directory
    ca_pem = directory / "ca.pem"
    kept = enroll(server.url, CHALLENGE, "kept-device")
    gone = enroll(server.url, CHALLENGE, "gone-device")
    assert kept.cert is not None and gone.cert is not None
    done = scep_fast("certs", "revoke", format(gone.cert.serial_number, "x"),
                     "--reason", "superseded", "--dir", str(directory))
    assert done.returncode == 0, done.stderr

    # GetCRL (RFC 8894 section 3.3.5), asked by the device that still holds
    # a valid certificate, answers the same CRL inside the signed envelope.
    assert isinstance(kept.key, rsa.RSAPrivateKey)
    request = build_get_crl(kept.ca_certs.ra, issuer=kept.cert.issuer,
                            serial=kept.cert.serial_number, signer_key=kept.key,
                            signer_cert=kept.cert)
    response = server.request("POST", "/scep?operation=PKIOperation", body=request.message)
    assert response.status == 200
    reply = parse_cert_rep(response.read_body, request)  # type: ignore[attr-defined]
    assert reply.status is PKIStatus.SUCCESS, reply
    assert len(reply.crls) == 1
    via_scep = reply.crls[0]
    entry = via_scep.get_revoked_certificate_by_serial_number(gone.cert.serial_number)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason \
        is x509.ReasonFlags.superseded
    assert "verify OK" in openssl_crl_verify(
        via_scep.public_bytes(serialization.Encoding.DER), ca_pem, tmp_path)


def test_crl_urls_refuse_anything_but_known_names(server_factory: object) -> None:
    server: Server = server_factory()  # type: ignore[operator]
    for target in ("/crl/", "/crl/../scep-fast.toml", "/crl/..%2Fca.key", "/crl/ca.key",
                   "/crl/%2e%2e/challenge.crl", "/crl/" + "0" * 40 + ".crl",
                   "/crl/" + "0" * 40, "/crl/" + "A" * 40 + ".crl"):
        response = server.request("GET", target)
        assert response.status == 404, target
        assert b"BEGIN" not in response.read_body  # type: ignore[attr-defined]
    response = server.request("POST", "/crl/" + "0" * 40 + ".crl", body=b"x")
    assert response.status == 405
    assert response.getheader("Allow") == "GET, HEAD"


def test_crl_command_and_revoke_errors(tmp_path: Path) -> None:
    directory = init_dir(tmp_path / "scep")
    done = scep_fast("crl", "--dir", str(directory))
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip())
    assert path.parent == directory / "crl" and path.exists()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    first = x509.load_der_x509_crl(path.read_bytes())
    assert scep_fast("crl", "--dir", str(directory)).returncode == 0
    second = x509.load_der_x509_crl(path.read_bytes())
    number = x509.CRLNumber
    assert second.extensions.get_extension_for_class(number).value.crl_number > \
        first.extensions.get_extension_for_class(number).value.crl_number

    missing = scep_fast("certs", "revoke", "abcdef", "--dir", str(directory))
    assert missing.returncode == 1 and "no certificate" in missing.stderr
    bad = scep_fast("certs", "revoke", "abcdef", "--reason", "bored", "--dir", str(directory))
    assert bad.returncode == 2 and "reason" in bad.stderr
    delta_only = scep_fast("certs", "revoke", "abcdef", "--reason", "removeFromCRL",
                           "--dir", str(directory))
    assert delta_only.returncode == 2


def test_revoke_writes_a_crl_with_the_reason(tmp_path: Path) -> None:
    directory = init_dir(tmp_path / "scep")
    config = configuration.load(directory)
    material = pki.load_material(config)
    ca = x509.load_der_x509_certificate(material.ca_cert)
    ca_key = serialization.load_der_private_key(material.ca_key, password=None)
    assert isinstance(ca_key, rsa.RSAPrivateKey)
    ledger = MemoryLedger()
    record = issue(material.ca_cert, ca_key, 0xABC)
    ledger.commit([record])
    revoked, paths = crl.revoke(config, ledger, material, 0xABC, crl.reason_code("caCompromise"),
                                now=T0)
    assert revoked.revocation_reason == 2 and len(paths) == 1
    listed = x509.load_der_x509_crl(paths[0].read_bytes())
    assert listed.issuer == ca.subject
    entry = listed.get_revoked_certificate_by_serial_number(0xABC)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason \
        is x509.ReasonFlags.ca_compromise

