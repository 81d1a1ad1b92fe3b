"""An NDES-style RA pair (`init --ra-pair`) against a running server.

GetCACert serves the CA, a signing RA (digitalSignature only) and an
encryption RA (keyEncipherment only). The project's client envelopes its
request to the encryption RA, picked by key usage as NDES clients pick it,
and verifies the CertRep against the signing RA. A request enveloped to
the signing RA is opened too. A CA rollover makes a next pair, and the
retired pair still opens requests.
"""

from __future__ import annotations

import stat
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from scep_fast.client import (
    build_pkcs_req,
    enroll,
    generate_key,
    get_cert,
    get_crl,
    parse_cert_rep,
    renew,
)
from scep_fast.protocol import PKIStatus
from scep_fast.runtime import config as configuration
from scep_fast.runtime import pki
from scep_fast.runtime.config import ConfigError
from tests.integration.conftest import (
    CHALLENGE,
    Server,
    init_dir,
    scep_fast,
    set_config,
    start_server,
)
from tests.integration.test_rollover import openssl, reload_until
from tests.integration.test_server import ca_certs, post


@pytest.fixture(scope="module")
def pair_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    directory = init_dir(tmp_path_factory.mktemp("pair") / "scep", "--ra-pair")
    running = start_server(directory)
    yield running
    running.stop()


def _pem(directory: Path, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((directory / name).read_bytes())


def _usage(cert: x509.Certificate) -> tuple[bool, bool]:
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    return usage.digital_signature, usage.key_encipherment


def _recipient(message: bytes) -> tuple[bytes, int]:
    """The issuer (DER) and serial the request's one KeyTransRecipientInfo names."""
    signed = cms.ContentInfo.load(message)["content"]
    enveloped = cms.ContentInfo.load(signed["encap_content_info"]["content"].native)["content"]
    infos = list(enveloped["recipient_infos"])
    assert len(infos) == 1
    rid = infos[0].chosen["rid"]
    assert rid.name == "issuer_and_serial_number"
    ias: Any = rid.chosen
    return ias["issuer"].dump(), int(ias["serial_number"].native)


def _names(cert: x509.Certificate) -> tuple[bytes, int]:
    return cert.issuer.public_bytes(), cert.serial_number


def test_init_writes_the_pair(pair_server: Server) -> None:
    directory = pair_server.directory
    config = configuration.load(directory)
    assert config.get("pki", "ra_encryption_cert") == "ra-encryption.pem"
    assert config.get("pki", "ra_encryption_key") == "ra-encryption.key"
    assert stat.S_IMODE((directory / "ra-encryption.key").stat().st_mode) == 0o600
    ca = _pem(directory, "ca.pem")
    signing, encryption = _pem(directory, "ra.pem"), _pem(directory, "ra-encryption.pem")
    assert _usage(signing) == (True, False)
    assert _usage(encryption) == (False, True)
    for ra in (signing, encryption):
        ra.verify_directly_issued_by(ca)
        assert isinstance(ra.public_key(), rsa.RSAPublicKey)


def test_getcacert_serves_ca_signing_and_encryption_ra(pair_server: Server) -> None:
    response = pair_server.request("GET", "/scep?operation=GetCACert")
    assert response.status == 200
    assert response.getheader("Content-Type") == "application/x-x509-ca-ra-cert"
    answer = ca_certs(pair_server)
    directory = pair_server.directory
    ca = _pem(directory, "ca.pem")
    signing, encryption = _pem(directory, "ra.pem"), _pem(directory, "ra-encryption.pem")
    # The signing RA first, then the encryption RA, then the CA.
    assert answer.certificates == (signing, encryption, ca)
    assert [_usage(c) for c in answer.certificates[:2]] == [(True, False), (False, True)]
    assert answer.ra == encryption
    assert answer.signer == signing
    assert answer.ca == ca


def test_expiry_gauge_of_the_encryption_ra(pair_server: Server) -> None:
    url = f"http://127.0.0.1:{pair_server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    expected = _pem(pair_server.directory, "ra-encryption.pem").not_valid_after_utc.timestamp()
    lines = [line for line in text.splitlines() if line.startswith(
        'scep_ca_certificate_expiry_timestamp_seconds{certificate="ra_encryption"}')]
    assert len(lines) == 1, text
    assert float(lines[0].split()[-1]) == expected


def test_client_envelopes_to_the_encryption_ra_and_enrolls(pair_server: Server) -> None:
    directory = pair_server.directory
    signing, encryption = _pem(directory, "ra.pem"), _pem(directory, "ra-encryption.pem")
    result = enroll(pair_server.url, CHALLENGE, "pair-device")
    assert result.status is PKIStatus.SUCCESS, result.fail_info_text
    assert result.request.recipient == encryption
    issuer, serial = _recipient(result.request.message)
    assert (issuer, serial) == _names(encryption)
    # The reply was verified against the signing RA, which signed it.
    assert result.reply.signer == signing
    assert result.cert is not None
    result.cert.verify_directly_issued_by(_pem(directory, "ca.pem"))


def test_a_request_enveloped_to_the_signing_ra_is_opened(pair_server: Server) -> None:
    signing = _pem(pair_server.directory, "ra.pem")
    request = build_pkcs_req(signing, cn="to-signing-ra", challenge=CHALLENGE)
    assert _recipient(request.message) == _names(signing)
    status, content_type, body = post(pair_server, request.message)
    assert status == 200
    assert content_type == "application/x-pki-message"
    reply = parse_cert_rep(body, request, ra_certs=[signing])
    assert reply.status is PKIStatus.SUCCESS, reply.fail_info_text
    assert reply.signer == signing


def test_a_request_enveloped_to_the_ca_is_not_opened(pair_server: Server) -> None:
    # Only the two RA keys decrypt: the CA is no recipient in RA mode.
    request = build_pkcs_req(_pem(pair_server.directory, "ca.pem"), cn="to-ca",
                             challenge=CHALLENGE)
    status, _, _ = post(pair_server, request.message)
    assert status == 400


def test_renewal_against_the_pair(pair_server: Server) -> None:
    first = enroll(pair_server.url, CHALLENGE, "pair-renew")
    assert first.cert is not None
    old_key = first.key
    assert isinstance(old_key, rsa.RSAPrivateKey)
    request, reply = renew(pair_server.url, first.cert, old_key,
                           new_key=generate_key("rsa2048"))
    assert request.recipient == _pem(pair_server.directory, "ra-encryption.pem")
    assert reply.status is PKIStatus.SUCCESS, reply.fail_info_text
    assert reply.signer == _pem(pair_server.directory, "ra.pem")


def test_getcert_and_getcrl_against_the_pair(pair_server: Server) -> None:
    issued = enroll(pair_server.url, CHALLENGE, "pair-getcert")
    assert issued.cert is not None
    reply = get_cert(pair_server.url, issued.cert.serial_number)
    assert reply.status is PKIStatus.SUCCESS, reply.fail_info_text
    assert reply.certificates[0] == issued.cert
    assert reply.signer == _pem(pair_server.directory, "ra.pem")
    reply = get_crl(pair_server.url)
    assert reply.status is PKIStatus.SUCCESS, reply.fail_info_text
    assert reply.crls


def test_rollover_and_activate_keep_the_pair(server_factory: Any, tmp_path: Path) -> None:
    server: Server = server_factory("--ra-pair")
    directory = server.directory
    old_ca_pem = tmp_path / "old-ca.pem"
    old_ca_pem.write_bytes((directory / "ca.pem").read_bytes())
    old_signing, old_encryption = _pem(directory, "ra.pem"), _pem(directory, "ra-encryption.pem")

    done = scep_fast("ca", "rollover", "--dir", str(directory))
    assert done.returncode == 0, done.stderr
    next_dir = directory / "next"
    next_ca = _pem(next_dir, "ca.pem")
    next_signing, next_encryption = _pem(next_dir, "ra.pem"), _pem(next_dir, "ra-encryption.pem")
    assert _usage(next_signing) == (True, False)
    assert _usage(next_encryption) == (False, True)
    for ra in (next_signing, next_encryption):
        ra.verify_directly_issued_by(next_ca)
    assert stat.S_IMODE((next_dir / "ra-encryption.key").stat().st_mode) == 0o600

    # GetNextCACert: the next CA and both next RAs, signed by the current signing RA.
    reload_until(server, wanted=True)
    response = server.request("GET", "/scep?operation=GetNextCACert")
    assert response.status == 200
    message = tmp_path / "next.p7"
    message.write_bytes(response.read_body)  # type: ignore[attr-defined]
    inner, signers = tmp_path / "inner.p7", tmp_path / "signers.pem"
    verified = openssl("cms", "-verify", "-inform", "DER", "-in", str(message), "-binary",
                       "-CAfile", str(old_ca_pem), "-purpose", "any", "-out", str(inner),
                       "-signer", str(signers))
    assert verified.returncode == 0, verified.stderr
    assert x509.load_pem_x509_certificate(signers.read_bytes()) == old_signing
    listed = openssl("pkcs7", "-inform", "DER", "-in", str(inner), "-print_certs")
    assert listed.returncode == 0, listed.stderr
    assert set(x509.load_pem_x509_certificates(listed.stdout.encode())) == {
        next_ca, next_signing, next_encryption}

    done = scep_fast("ca", "activate", "--dir", str(directory))
    assert done.returncode == 0, done.stderr
    archive = directory / "previous" / pki.ca_id(pki.der_certificate(old_ca_pem.read_bytes()))
    assert _pem(archive, "ra-encryption.pem") == old_encryption
    assert stat.S_IMODE((archive / "ra-encryption.key").stat().st_mode) == 0o600
    assert _pem(directory, "ra-encryption.pem") == next_encryption
    assert _pem(directory, "ra.pem") == next_signing
    assert not next_dir.exists()
    reload_until(server, wanted=False)

    after = enroll(server.url, CHALLENGE, "after-pair-rollover")
    assert after.status is PKIStatus.SUCCESS, after.fail_info_text
    assert after.ca_certs.certificates == (next_signing, next_encryption, next_ca)
    assert _recipient(after.request.message) == _names(next_encryption)
    assert after.reply.signer == next_signing
    assert after.cert is not None
    after.cert.verify_directly_issued_by(next_ca)

    # Clients still holding the old pair envelope to an old RA: both old keys open it.
    for old in (old_encryption, old_signing):
        request = build_pkcs_req(old, cn="stale-pair-client", challenge=CHALLENGE)
        status, _, body = post(server, request.message)
        assert status == 200, body
        reply = parse_cert_rep(body, request, ra_certs=[next_signing])
        assert reply.status is PKIStatus.SUCCESS, reply.fail_info_text
        assert reply.certificates[0].issuer == next_ca.subject


def test_activate_refuses_a_next_ca_without_the_encryption_ra(tmp_path: Path) -> None:
    directory = init_dir(tmp_path / "scep", "--ra-pair")
    assert scep_fast("ca", "rollover", "--dir", str(directory)).returncode == 0
    for name in ("ra-encryption.pem", "ra-encryption.key"):
        (directory / "next" / name).unlink()
    current = (directory / "ca.pem").read_bytes()
    done = scep_fast("ca", "activate", "--dir", str(directory))
    assert done.returncode == 1
    assert "ra-encryption.pem" in done.stderr and "rollover" in done.stderr
    assert (directory / "ca.pem").read_bytes() == current
    assert not (directory / "previous").exists()


def test_ra_pair_is_refused_in_ca_mode(tmp_path: Path) -> None:
    done = scep_fast("init", "--dir", str(tmp_path / "scep"), "--challenge", CHALLENGE,
                     "--ca-mode", "--ra-pair")
    assert done.returncode == 2
    assert "--ra-pair" in done.stderr
    assert not (tmp_path / "scep" / "scep-fast.toml").exists()


def test_config_needs_both_halves_of_the_pair(tmp_path: Path) -> None:
    directory = init_dir(tmp_path / "scep", "--ra-pair")
    set_config(directory, "pki", "ra_encryption_key", '""')
    with pytest.raises(ConfigError, match="both or neither"):
        configuration.load(directory)
    set_config(directory, "pki", "ra_encryption_key", '"pkcs11:token=scep;object=enc"')
    with pytest.raises(ConfigError, match="key file"):
        configuration.load(directory)


def test_without_the_option_one_ra_carries_both_usages(tmp_path: Path) -> None:
    directory = init_dir(tmp_path / "scep")
    config = configuration.load(directory)
    assert config.get("pki", "ra_encryption_cert") == ""
    assert not (directory / "ra-encryption.pem").exists()
    assert _usage(_pem(directory, "ra.pem")) == (True, True)
