"""PEM or DER in, DER out: the form the native core loads."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization


def der_certificate(data: bytes) -> bytes:
    """A certificate as DER, from PEM or DER."""
    if data.lstrip().startswith(b"-----"):
        return x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)
    return x509.load_der_x509_certificate(data).public_bytes(serialization.Encoding.DER)


def der_private_key(data: bytes) -> bytes:
    """An unencrypted private key as PKCS#8 DER, from PEM or DER."""
    if data.lstrip().startswith(b"-----"):
        key = serialization.load_pem_private_key(data, password=None)
    else:
        key = serialization.load_der_private_key(data, password=None)
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
