"""CA rollover: `ca rollover`, GetNextCACert, `ca activate` and a SIGHUP reload of the workers."""

from __future__ import annotations

import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from scep_fast.client import build_pkcs_req, enroll, parse_cert_rep
from scep_fast.protocol import PKIStatus
from scep_fast.runtime import config as configuration
from scep_fast.runtime import crl, pki
from tests.integration.conftest import CHALLENGE, Server, init_dir, scep_fast, set_config

RELOAD_TIMEOUT_SECONDS = 30


def caps(server: Server) -> list[str]:
    response = server.request("GET", "/scep?operation=GetCACaps")
    assert response.status == 200
    return cast(bytes, response.read_body).decode().split("\n")  # type: ignore[attr-defined]


def reload_until(server: Server, wanted: bool) -> None:
    """SIGHUP the supervisor; wait until every worker answers with the new state."""
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + RELOAD_TIMEOUT_SECONDS
    streak = 0
    while time.monotonic() < deadline:
        # Several answers in a row, so that no old worker is left.
        streak = streak + 1 if ("GetNextCACert" in caps(server)) == wanted else 0
        if streak >= 20:
            return
        time.sleep(0.05)
    raise AssertionError(f"workers did not reload: {server.log()[-3000:]}")


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def test_rollover_writes_next_ca_once_and_activate_retires_the_old(tmp_path: Path) -> None:
    directory = init_dir(tmp_path / "scep")
    old_ca = (directory / "ca.pem").read_bytes()
    old_ra = (directory / "ra.pem").read_bytes()
    assert scep_fast("ca", "activate", "--dir", str(directory)).returncode == 1

    done = scep_fast("ca", "rollover", "--ca-key", "p256", "--dir", str(directory))
    assert done.returncode == 0, done.stderr
    assert "kill -HUP" in done.stdout
    nxt = directory / "next"
    for name, mode in (("ca.pem", 0o644), ("ca.key", 0o600), ("ra.pem", 0o644),
                       ("ra.key", 0o600)):
        assert stat.S_IMODE((nxt / name).stat().st_mode) == mode, name
    next_ca = x509.load_pem_x509_certificate((nxt / "ca.pem").read_bytes())
    next_ra = x509.load_pem_x509_certificate((nxt / "ra.pem").read_bytes())
    assert next_ca.subject.rfc4514_string() == "CN=scep-fast CA G2"
    next_ra.verify_directly_issued_by(next_ca)
    again = scep_fast("ca", "rollover", "--dir", str(directory))
    assert again.returncode == 1 and "exists" in again.stderr

    config = configuration.load(directory)
    material = pki.load_material(config)
    assert material.next_message is not None and material.previous == ()

    done = scep_fast("ca", "activate", "--dir", str(directory))
    assert done.returncode == 0, done.stderr
    assert not nxt.exists()
    assert (directory / "ca.pem").read_bytes() == pem(next_ca)
    assert (directory / "ra.pem").read_bytes() == pem(next_ra)
    assert stat.S_IMODE((directory / "ca.key").stat().st_mode) == 0o600
    old_id = pki.ca_id(pki.der_certificate(old_ca))
    archive = directory / "previous" / old_id
    assert (archive / "ca.pem").read_bytes() == old_ca
    assert (archive / "ra.pem").read_bytes() == old_ra
    assert stat.S_IMODE((archive / "ca.key").stat().st_mode) == 0o600

    material = pki.load_material(configuration.load(directory))
    assert material.next_message is None
    assert [p.ca_cert for p in material.previous] == [pki.der_certificate(old_ca)]
    # Both CAs have a CRL from the moment of activation.
    for ca in (material.ca_cert, material.previous[0].ca_cert):
        assert (directory / "crl" / f"{crl.crl_name(ca)}.crl").exists()

    # A second generation names itself G3 and keeps both retired CAs.
    assert scep_fast("ca", "rollover", "--dir", str(directory)).returncode == 0
    assert scep_fast("ca", "activate", "--dir", str(directory)).returncode == 0
    material = pki.load_material(configuration.load(directory))
    assert x509.load_der_x509_certificate(material.ca_cert).subject.rfc4514_string() == \
        "CN=scep-fast CA G3"
    assert len(material.previous) == 2


def test_get_next_ca_cert_then_activate_switches_issuance(
        server_factory: object, tmp_path: Path) -> None:
    def configure(directory: Path) -> None:
        set_config(directory, "server", "workers", "2")
        set_config(directory, "crl", "public_url", '"http://pki.example.test"')

    server: Server = server_factory(configure=configure)  # type: ignore[operator]
    directory = server.directory
    old_ca_pem = tmp_path / "old-ca.pem"
    old_ca_pem.write_bytes((directory / "ca.pem").read_bytes())
    old_ra = x509.load_pem_x509_certificate((directory / "ra.pem").read_bytes())
    old_name = crl.crl_name(pki.der_certificate(old_ca_pem.read_bytes()))

    assert "GetNextCACert" not in caps(server)
    assert server.request("GET", "/scep?operation=GetNextCACert").status == 404

    before = enroll(server.url, CHALLENGE, "before-rollover")
    assert before.cert is not None
    done = scep_fast("certs", "revoke", format(before.cert.serial_number, "x"),
                     "--reason", "superseded", "--dir", str(directory))
    assert done.returncode == 0, done.stderr

    # Rollover: offered by GetNextCACert (and GetCACaps) once the workers reload.
    done = scep_fast("ca", "rollover", "--dir", str(directory))
    assert done.returncode == 0, done.stderr
    next_ca_pem = (directory / "next" / "ca.pem").read_bytes()
    next_ra_pem = (directory / "next" / "ra.pem").read_bytes()
    reload_until(server, wanted=True)
    response = server.request("GET", "/scep?operation=GetNextCACert")
    assert response.status == 200
    assert response.getheader("Content-Type") == "application/x-x509-next-ca-cert"
    message = tmp_path / "next.p7"
    message.write_bytes(response.read_body)  # type: ignore[attr-defined]
    # RFC 8894 section 4.7.1: signed by the current RA, checked against the current CA.
    inner = tmp_path / "inner.p7"
    verified = openssl("cms", "-verify", "-inform", "DER", "-in", str(message), "-binary",
                       "-CAfile", str(old_ca_pem), "-purpose", "any", "-out", str(inner))
    assert verified.returncode == 0, verified.stderr
    signers = tmp_path / "signers.pem"
    assert openssl("cms", "-verify", "-inform", "DER", "-in", str(message), "-binary",
                   "-CAfile", str(old_ca_pem), "-purpose", "any", "-out", "/dev/null",
                   "-signer", str(signers)).returncode == 0
    assert x509.load_pem_x509_certificate(signers.read_bytes()) == old_ra
    # Changing the signed content (a byte of the next CA's key) breaks the signature.
    tampered = bytearray(message.read_bytes())
    next_der = x509.load_pem_x509_certificate(next_ca_pem).public_bytes(
        serialization.Encoding.DER)
    at = bytes(tampered).find(next_der)
    assert at > 0
    tampered[at + len(next_der) // 2] ^= 0x01
    (tmp_path / "tampered.p7").write_bytes(bytes(tampered))
    assert openssl("cms", "-verify", "-inform", "DER", "-in", str(tmp_path / "tampered.p7"),
                   "-binary", "-CAfile", str(old_ca_pem), "-purpose", "any",
                   "-out", "/dev/null").returncode != 0
    listed = openssl("pkcs7", "-inform", "DER", "-in", str(inner), "-print_certs")
    assert listed.returncode == 0, listed.stderr
    inner_certs = x509.load_pem_x509_certificates(listed.stdout.encode())
    assert set(inner_certs) == {x509.load_pem_x509_certificate(next_ca_pem),
                                x509.load_pem_x509_certificate(next_ra_pem)}
    # Until activation, issuance stays with the current CA.
    still = enroll(server.url, CHALLENGE, "during-rollover")
    assert still.cert is not None and still.cert.issuer == before.cert.issuer

    # Activate: new certificates chain to the new CA once the workers reload.
    done = scep_fast("ca", "activate", "--dir", str(directory))
    assert done.returncode == 0, done.stderr
    assert "kill -HUP" in done.stdout
    reload_until(server, wanted=False)
    assert server.request("GET", "/scep?operation=GetNextCACert").status == 404
    new_ca = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    assert new_ca == x509.load_pem_x509_certificate(next_ca_pem)
    after = enroll(server.url, CHALLENGE, "after-activate")
    assert after.cert is not None
    assert after.cert.issuer == new_ca.subject
    after.cert.verify_directly_issued_by(new_ca)
    assert after.ca_certs.ra == x509.load_pem_x509_certificate(next_ra_pem)
    new_name = crl.crl_name(new_ca.public_bytes(serialization.Encoding.DER))
    cdp = after.cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert [str(n.value) for p in cdp for n in (p.full_name or [])] == [
        f"http://pki.example.test/crl/{new_name}.crl"]
    leaf = tmp_path / "after.pem"
    leaf.write_bytes(pem(after.cert))
    new_ca_pem = tmp_path / "new-ca.pem"
    new_ca_pem.write_bytes(pem(new_ca))
    assert openssl("verify", "-CAfile", str(new_ca_pem), str(leaf)).returncode == 0
    assert openssl("verify", "-CAfile", str(old_ca_pem), str(leaf)).returncode != 0

    # The old CA's certificates still verify, and its CRL is still served,
    # still lists what it revoked, and verifies against the old CA.
    old_leaf = tmp_path / "before.pem"
    old_leaf.write_bytes(pem(before.cert))
    assert openssl("verify", "-CAfile", str(old_ca_pem), str(old_leaf)).returncode == 0
    for name, ca_pem in ((old_name, old_ca_pem), (new_name, new_ca_pem)):
        response = server.request("GET", f"/crl/{name}.crl")
        assert response.status == 200, name
        crl_file = tmp_path / f"{name}.crl"
        crl_file.write_bytes(response.read_body)  # type: ignore[attr-defined]
        checked = openssl("crl", "-inform", "DER", "-in", str(crl_file), "-CAfile",
                          str(ca_pem), "-noout", "-verify")
        assert checked.returncode == 0 and "verify OK" in checked.stdout + checked.stderr
    old_crl = x509.load_der_x509_crl((tmp_path / f"{old_name}.crl").read_bytes())
    assert old_crl.get_revoked_certificate_by_serial_number(before.cert.serial_number)
    # Revoking an old CA's certificate after the switch lands in the old CA's CRL.
    done = scep_fast("certs", "revoke", format(still.cert.serial_number, "x"),
                     "--dir", str(directory))
    assert done.returncode == 0, done.stderr
    response = server.request("GET", f"/crl/{old_name}.crl")
    refreshed = x509.load_der_x509_crl(response.read_body)  # type: ignore[attr-defined]
    assert refreshed.get_revoked_certificate_by_serial_number(still.cert.serial_number)
    assert refreshed.is_signature_valid(
        x509.load_pem_x509_certificate(old_ca_pem.read_bytes()).public_key())

    # A client that still holds the old RA certificate encrypts to it: the
    # retired RA key still opens the request; the new RA signs the reply.
    request = build_pkcs_req(old_ra, cn="stale-ra-client", challenge=CHALLENGE)
    response = server.request("POST", "/scep?operation=PKIOperation", body=request.message)
    assert response.status == 200, response.read_body  # type: ignore[attr-defined]
    reply = parse_cert_rep(response.read_body, request,  # type: ignore[attr-defined]
                           ra_certs=[after.ca_certs.ra])
    assert reply.status is PKIStatus.SUCCESS
    assert reply.certificates[0].issuer == new_ca.subject
