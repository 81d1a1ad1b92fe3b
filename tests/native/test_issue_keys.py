"""Issuing with every CA key type, and the certs-only PKCS#7 of GetCACert."""

from __future__ import annotations

import datetime
import subprocess
import time
from pathlib import Path

import pytest
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from scep_fast.crypto import IssueRequest, ScepContext, certs_only
from tests.native.certrep import degenerate_certs
from tests.native.test_roundtrip import openssl


def make_ca(kind: str) -> tuple[bytes, bytes]:
    if kind.startswith("rsa"):
        key = rsa.generate_private_key(public_exponent=65537, key_size=int(kind[3:]))
    else:
        key = ec.generate_private_key(ec.SECP256R1() if kind == "p256" else ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"test CA {kind}")])
    now = time.time()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime.fromtimestamp(now - 3600))
        .not_valid_after(datetime.datetime.fromtimestamp(now + 86400 * 30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA384() if kind == "p384" else hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.DER),
        key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()),
    )


@pytest.mark.parametrize("kind,sig", [("rsa2048", "sha256_rsa"), ("rsa3072", "sha256_rsa"),
                                      ("rsa4096", "sha256_rsa"), ("p256", "sha256_ecdsa"),
                                      ("p384", "sha384_ecdsa")])
def test_issue_with_each_ca_key(ra, build_request, tmp_path: Path, kind, sig):
    ca = make_ca(kind)
    ctx = ScepContext(recipients=[ra], signer=ra, issuer=ca)
    u = ctx.unwrap(build_request(cn=f"device-{kind}"))
    now = int(time.time())
    cert = ctx.issue(IssueRequest(csr_der=u.content, serial=2**63 + 5, not_before=now - 600,
                                  not_after=now + 3600))
    parsed = asn1_x509.Certificate.load(cert)
    assert parsed["signature_algorithm"]["algorithm"].native == sig
    (tmp_path / "ca.pem").write_bytes(openssl("x509", "-inform", "DER", stdin=ca[0]))
    (tmp_path / "leaf.pem").write_bytes(openssl("x509", "-inform", "DER", stdin=cert))
    out = openssl("verify", "-CAfile", str(tmp_path / "ca.pem"), str(tmp_path / "leaf.pem"))
    assert out.strip().endswith(b"OK")


def test_issue_uses_given_subject_and_extensions(ctx, build_request):
    u = ctx.unwrap(build_request(cn="ignored-cn"))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forced-cn")]).public_bytes()
    exts = _extensions_der([
        x509.Extension(x509.oid.ExtensionOID.BASIC_CONSTRAINTS, True,
                       x509.BasicConstraints(ca=False, path_length=None)),
        x509.Extension(x509.oid.ExtensionOID.EXTENDED_KEY_USAGE, False,
                       x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH])),
        x509.Extension(x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME, False,
                       x509.SubjectAlternativeName([x509.DNSName("device.example.com")])),
    ])
    cert = x509.load_der_x509_certificate(ctx.issue(IssueRequest(
        csr_der=u.content, serial=7, not_before=0, not_after=10**9, subject_der=subject,
        extensions_der=exts)))
    assert cert.subject.rfc4514_string() == "CN=forced-cn"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).critical
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == (
        x509.SubjectAlternativeName([x509.DNSName("device.example.com")]))
    assert x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in cert.extensions.get_extension_for_class(
        x509.ExtendedKeyUsage).value
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())


def _extensions_der(exts: list[x509.Extension]) -> bytes:
    # Borrow cryptography's encoder: a CSR carries the same Extensions SEQUENCE.
    from asn1crypto import csr as asn1_csr
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    for ext in exts:
        builder = builder.add_extension(ext.value, ext.critical)
    req = asn1_csr.CertificationRequest.load(
        builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
    for attr in req["certification_request_info"]["attributes"]:
        if attr["type"].native == "extension_request":
            return attr["values"][0].dump()
    raise AssertionError("no extensionRequest")


def test_certs_only_keeps_order_and_openssl_reads_it(vectors, ra, ca):
    der = certs_only([ra[0], ca[0]])
    assert degenerate_certs(der) == [ra[0], ca[0]]
    assert degenerate_certs(certs_only([ca[0], ra[0]])) == [ca[0], ra[0]]
    printed = subprocess.run(["openssl", "pkcs7", "-inform", "DER", "-print_certs", "-noout"],
                             input=der, capture_output=True, check=True).stdout
    assert b"scep-fast test RA" in printed and b"scep-fast test CA" in printed
