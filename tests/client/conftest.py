"""Fixtures for the client tests: the test PKI and a native server context.

The native core (scep_fast.crypto) is the server side here: it shares no code
with the client, so a request it unwraps and a reply the client reads check
each implementation against the other.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from scep_fast.crypto import ScepContext, der_certificate, der_private_key

VECTORS = Path(__file__).resolve().parents[1] / "vectors"


def keypair(name: str) -> tuple[bytes, bytes]:
    return (
        der_certificate((VECTORS / f"{name}.pem").read_bytes()),
        der_private_key((VECTORS / f"{name}.key").read_bytes()),
    )


@pytest.fixture(scope="session")
def ra() -> tuple[bytes, bytes]:
    return keypair("ra")


@pytest.fixture(scope="session")
def ca() -> tuple[bytes, bytes]:
    return keypair("ca")


@pytest.fixture(scope="session")
def ra_cert(ra: tuple[bytes, bytes]) -> x509.Certificate:
    return x509.load_der_x509_certificate(ra[0])


@pytest.fixture(scope="session")
def ca_cert(ca: tuple[bytes, bytes]) -> x509.Certificate:
    return x509.load_der_x509_certificate(ca[0])


@pytest.fixture(scope="session")
def ctx(ra: tuple[bytes, bytes], ca: tuple[bytes, bytes]) -> ScepContext:
    return ScepContext(recipients=[ra], signer=ra, issuer=ca)


@pytest.fixture(scope="session")
def device_key() -> rsa.RSAPrivateKey:
    """One RSA-2048 device key for most requests (key generation is slow)."""
    key = serialization.load_pem_private_key((VECTORS / "oaep-device.key").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key
