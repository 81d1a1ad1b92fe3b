"""Fixtures for the native core: the test PKI, contexts, and an independent request builder.

Requests are built by tests/vectors/make_ber_vector.py, which uses only the
`cryptography` package and writes every byte of the CMS itself, so a round
trip through our core is checked against code that shares nothing with it.
"""

from __future__ import annotations

import importlib.util
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from scep_fast.crypto import ScepContext, der_certificate, der_private_key

VECTORS = Path(__file__).resolve().parents[1] / "vectors"


def keypair(name: str) -> tuple[bytes, bytes]:
    return (
        der_certificate((VECTORS / f"{name}.pem").read_bytes()),
        der_private_key((VECTORS / f"{name}.key").read_bytes()),
    )


def _load_builder():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("make_ber_vector", VECTORS / "make_ber_vector.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILDER = _load_builder()


@pytest.fixture(scope="session")
def ra() -> tuple[bytes, bytes]:
    return keypair("ra")


@pytest.fixture(scope="session")
def ca() -> tuple[bytes, bytes]:
    return keypair("ca")


@pytest.fixture(scope="session")
def ctx(ra: tuple[bytes, bytes], ca: tuple[bytes, bytes]) -> ScepContext:
    return ScepContext(recipients=[ra], signer=ra, issuer=ca)


@pytest.fixture(scope="session")
def legacy_ctx(ra: tuple[bytes, bytes], ca: tuple[bytes, bytes]) -> ScepContext:
    return ScepContext(recipients=[ra], signer=ra, issuer=ca, allow_legacy=True)


@pytest.fixture(scope="session")
def device_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One RSA-2048 device key for every built request (key generation is slow)."""
    path = tmp_path_factory.mktemp("device") / "device.key"
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
         "-out", str(path)],
        check=True,
        capture_output=True,
    )
    return path


RequestBuilder = Callable[..., bytes]


@pytest.fixture(scope="session")
def build_request(tmp_path_factory: pytest.TempPathFactory, device_key: Path) -> RequestBuilder:
    """build_request(cipher="aes128", digest="sha256", key_transport="pkcs1v15", ...) -> DER."""
    out_dir = tmp_path_factory.mktemp("requests")
    counter = iter(range(1_000_000))

    def build(
        *,
        cipher: str = "aes128",
        digest: str = "sha256",
        key_transport: str = "pkcs1v15",
        outer: str = "der",
        envelope: str = "der",
        rid: str = "issuer-serial",
        signer_id: str = "issuer-serial",
        cn: str = "device",
        challenge: str = "secret-challenge",
        recipient: str = "ra",
        nonce_len: int = 16,
    ) -> bytes:
        out = out_dir / f"req-{next(counter)}.der"
        BUILDER.main([
            "--ra-cert", str(VECTORS / f"{recipient}.pem"),
            "--out", str(out),
            "--device-key", str(device_key),
            "--cn", cn,
            "--challenge", challenge,
            "--cipher", cipher,
            "--key-transport", key_transport,
            "--rid", rid,
            "--signer-id", signer_id,
            "--digest", digest,
            "--outer", outer,
            "--envelope", envelope,
            "--nonce-len", str(nonce_len),
        ])
        return out.read_bytes()

    return build
