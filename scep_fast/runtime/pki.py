"""The CA and RA material of a scep-fast directory: created by `init`, loaded by `serve`.

Keys are written with mode 0600 from the moment the file exists (never
chmod-ed after the fact), and the directory itself is 0700.
"""

from __future__ import annotations

import datetime
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from scep_fast.crypto import der_certificate, der_private_key
from scep_fast.runtime.config import Config

CA_KEY_TYPES = ("rsa2048", "rsa3072", "rsa4096", "p256", "p384")
CA_VALIDITY_DAYS = 3650
RA_VALIDITY_DAYS = 730

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def new_rsa_key(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def new_key(kind: str) -> PrivateKey:
    if kind.startswith("rsa"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(kind[3:]))
    curve = {"p256": ec.SECP256R1(), "p384": ec.SECP384R1()}[kind]
    return ec.generate_private_key(curve)


def _signature_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def _serial() -> int:
    # 127 random bits: positive, and far more than RFC 5280's 64 bits of entropy.
    return secrets.randbits(127) | 1


def make_ca(key: PrivateKey, cn: str, now: datetime.datetime) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - datetime.timedelta(minutes=10))
        .not_valid_after(now + datetime.timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          key_cert_sign=True, crl_sign=True, encipher_only=False,
                          decipher_only=False),
            critical=True)
        .add_extension(ski, critical=False)
        .sign(key, _signature_hash(key))
    )


def make_ra(key: rsa.RSAPrivateKey, cn: str, ca: x509.Certificate, ca_key: PrivateKey,
            now: datetime.datetime) -> x509.Certificate:
    """An RA certificate: RSA, digitalSignature + keyEncipherment (clients check both)."""
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - datetime.timedelta(minutes=10))
        .not_valid_after(now + datetime.timedelta(days=RA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False,
                          key_encipherment=True, data_encipherment=False, key_agreement=False,
                          key_cert_sign=False, crl_sign=False, encipher_only=False,
                          decipher_only=False),
            critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, _signature_hash(ca_key))
    )


def write_secret(path: Path, data: bytes) -> None:
    """Creates ``path`` with mode 0600 and writes ``data``; refuses to overwrite."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_public(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, slots=True)
class Material:
    """DER certificates and keys as the native core loads them."""

    mode: str
    ca_cert: bytes
    ca_key: bytes
    ra_cert: bytes
    ra_key: bytes
    challenge: bytes

    @property
    def signer(self) -> tuple[bytes, bytes]:
        return (self.ca_cert, self.ca_key) if self.mode == "ca" else (self.ra_cert, self.ra_key)


def load_material(config: Config) -> Material:
    mode = str(config.get("pki", "mode"))
    ca_cert = der_certificate(config.path("pki", "ca_cert").read_bytes())
    ca_key = der_private_key(config.path("pki", "ca_key").read_bytes())
    if mode == "ca":
        ra_cert, ra_key = ca_cert, ca_key
    else:
        ra_cert = der_certificate(config.path("pki", "ra_cert").read_bytes())
        ra_key = der_private_key(config.path("pki", "ra_key").read_bytes())
    challenge_path = config.path("enrollment", "challenge_file")
    challenge = challenge_path.read_bytes().strip() if challenge_path.exists() else b""
    return Material(mode=mode, ca_cert=ca_cert, ca_key=ca_key, ra_cert=ra_cert, ra_key=ra_key,
                    challenge=challenge)
