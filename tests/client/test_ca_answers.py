"""GetCACert and GetCACaps answers: which certificate is the RA, which algorithms to use."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from scep_fast.client import ResponseError, parse_ca_caps, parse_ca_certs
from scep_fast.crypto import certs_only


def test_single_der_certificate_is_ca_mode(ca, ca_cert):
    answer = parse_ca_certs(ca[0], "application/x-x509-ca-cert")
    assert answer.ra == ca_cert and answer.ca == ca_cert
    assert answer.certificates == (ca_cert,)


@pytest.mark.parametrize("order", ["ra-first", "ca-first"])
def test_degenerate_pkcs7_picks_the_ra(ra, ca, ra_cert, ca_cert, order):
    certs = [ra[0], ca[0]] if order == "ra-first" else [ca[0], ra[0]]
    answer = parse_ca_certs(certs_only(certs), "application/x-x509-ca-ra-cert")
    assert answer.ra == ra_cert
    assert answer.ca == ca_cert
    assert len(answer.certificates) == 2


def test_degenerate_pkcs7_with_only_the_ca(ca, ca_cert):
    answer = parse_ca_certs(certs_only([ca[0]]), "application/x-x509-ca-ra-cert")
    assert answer.ra == ca_cert and answer.ca == ca_cert


def test_content_type_is_optional_and_parameters_are_ignored(ra, ca, ra_cert):
    assert parse_ca_certs(certs_only([ca[0], ra[0]])).ra == ra_cert
    assert parse_ca_certs(ra[0]).ra == ra_cert
    assert parse_ca_certs(certs_only([ra[0], ca[0]]),
                          "Application/X-X509-CA-RA-Cert; charset=binary").ra == ra_cert


def test_bad_answers_are_refused(ca, ca_cert):
    pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(ResponseError):
        parse_ca_certs(pem, "application/x-x509-ca-cert")
    with pytest.raises(ResponseError):
        parse_ca_certs(ca[0], "text/html")
    with pytest.raises(ResponseError):
        parse_ca_certs(b"\x30\x03\x02\x01\x01", "application/x-x509-ca-ra-cert")
    with pytest.raises(ResponseError, match="no certificate"):
        parse_ca_certs(certs_only([]), "application/x-x509-ca-ra-cert")


def test_an_ec_ra_is_refused():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ec ca")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    with pytest.raises(ResponseError, match="RSA"):
        parse_ca_certs(cert.public_bytes(serialization.Encoding.DER))


@pytest.mark.parametrize("body,digest,cipher,post", [
    (b"AES\nDES3\nPOSTPKIOperation\nRenewal\nSHA-1\nSHA-256\nSHA-512\nSCEPStandard",
     "sha512", "aes128", True),
    (b"SHA-256\nDES3", "sha256", "des3", False),
    (b"SHA-1\r\nAES\r\n", "sha1", "aes128", False),
    (b"SCEPStandard", "sha256", "aes128", True),
    # micromdm scepserver 2.1's list.
    (b"Renewal\nSHA-1\nSHA-256\nAES\nDES3\nSCEPStandard\nPOSTPKIOperation", "sha256", "aes128",
     True),
    (b"", "sha1", "des3", False),
    # Keywords are case-sensitive (RFC 8894 §3.5.2).
    (b"sha-512\naes\npostpkioperation", "sha1", "des3", False),
])
def test_caps_choose_the_strongest(body, digest, cipher, post):
    caps = parse_ca_caps(body)
    assert (caps.digest, caps.cipher, caps.post) == (digest, cipher, post)


def test_caps_must_be_ascii():
    with pytest.raises(ResponseError):
        parse_ca_caps("SHA-256\nAES\u00e9".encode())
