"""Round trips between independently built requests, our core, and the openssl CLI.

Requests come from a builder that shares no code with the core; every CertRep
is verified with `openssl cms -verify` against the test CA, its envelope is
opened with `openssl cms -decrypt` and the device key, and its algorithms are
read back with asn1crypto: the reply must use the request's own algorithms.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from scep_fast.crypto import CertRepSpec, IssueRequest, ScepContext, SignatureInvalid
from tests.native.certrep import degenerate_certs, envelope_algorithms, read_certrep

CIPHERS = {"aes128": "aes128_cbc", "aes192": "aes192_cbc", "aes256": "aes256_cbc",
           "des3": "tripledes_3key"}
CIPHER_NAMES = {"aes128": "AES-128-CBC", "aes192": "AES-192-CBC", "aes256": "AES-256-CBC",
                "des3": "DES-EDE3-CBC"}
DIGESTS = {"sha1": "sha1", "sha256": "sha256", "sha512": "sha512"}
KEY_TRANSPORTS = {"pkcs1v15": "rsaes_pkcs1v15", "oaep-sha256": "rsaes_oaep"}


def openssl(*args: str, stdin: bytes | None = None) -> bytes:
    proc = subprocess.run(["openssl", *args], input=stdin, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout


def verify_certrep(der: bytes, vectors: Path, legacy: bool = False) -> bytes:
    """openssl cms -verify against the test CA; returns the signed content."""
    extra = ["-provider", "legacy", "-provider", "default"] if legacy else []
    return openssl("cms", "-verify", "-inform", "DER", "-CAfile", str(vectors / "ca.pem"),
                   "-purpose", "any", "-binary", *extra, stdin=der)


def decrypt_envelope(env: bytes, key: Path, legacy: bool = False) -> bytes:
    extra = ["-provider", "legacy", "-provider", "default"] if legacy else []
    return openssl("cms", "-decrypt", "-inform", "DER", "-inkey", str(key), "-binary", *extra,
                   stdin=env)


def issue_for(ctx: ScepContext, csr: bytes, serial: int = 0x1234567890ABCDEF) -> bytes:
    now = int(time.time())
    return ctx.issue(IssueRequest(csr_der=csr, serial=serial, not_before=now - 600,
                                  not_after=now + 86400))


@pytest.mark.parametrize("key_transport", sorted(KEY_TRANSPORTS))
@pytest.mark.parametrize("digest", sorted(DIGESTS))
@pytest.mark.parametrize("cipher", sorted(CIPHERS))
def test_success_round_trip(ctx, build_request, device_key, vectors, ca, cipher, digest,
                            key_transport):
    request = build_request(cipher=cipher, digest=digest, key_transport=key_transport)
    unwrapped = ctx.unwrap(request)
    assert unwrapped.message_type == 19
    assert unwrapped.algorithms.cipher == CIPHER_NAMES[cipher]
    assert unwrapped.algorithms.digest == digest.upper()
    expected_kt = "rsa-oaep" if key_transport.startswith("oaep") else "rsa-pkcs1-v1_5"
    assert unwrapped.algorithms.key_transport == expected_kt
    assert unwrapped.csr is not None and unwrapped.csr.challenge == b"secret-challenge"

    cert = issue_for(ctx, unwrapped.content)
    reply = ctx.wrap(CertRepSpec(request=unwrapped, status=0, certs=[cert, ca[0]]))

    view = read_certrep(reply)
    assert view.digest == DIGESTS[digest], "the reply must be signed with the request's digest"
    assert view.attrs["message_type"] == "3"
    assert view.attrs["pki_status"] == "0"
    assert view.attrs["transaction_id"] == unwrapped.transaction_id.decode()
    assert view.attrs["recipient_nonce"] == unwrapped.sender_nonce
    assert len(view.attrs["sender_nonce"]) == len(unwrapped.sender_nonce)
    assert view.attrs["sender_nonce"] != unwrapped.sender_nonce
    assert "fail_info" not in view.attrs

    envelope = verify_certrep(reply, vectors)
    assert envelope == view.content
    reply_cipher, reply_kt, oaep = envelope_algorithms(envelope)
    assert reply_cipher == CIPHERS[cipher]
    assert reply_kt == KEY_TRANSPORTS[key_transport]
    if oaep is not None:
        assert oaep["hash_algorithm"]["algorithm"] == "sha256"
        assert oaep["mask_gen_algorithm"]["parameters"]["algorithm"] == "sha256"

    degenerate = decrypt_envelope(envelope, device_key)
    certs = degenerate_certs(degenerate)
    assert certs == [cert, ca[0]], "the issued certificate comes first, then the chain, as given"


def test_signer_named_by_subject_key_identifier(ctx, build_request, device_key, vectors, ca):
    """RFC 5652 section 5.3: a receiver must accept a SignerInfo that names its certificate by
    subjectKeyIdentifier. Found while fuzzing: the core did not find such a signer, because
    OpenSSL's lookup first fingerprints the certificate, which needs a provider that the
    context the message is parsed in does not have."""
    request = build_request(signer_id="ski")
    unwrapped = ctx.unwrap(request)
    assert unwrapped.message_type == 19
    assert unwrapped.csr is not None and unwrapped.csr.challenge == b"secret-challenge"
    cert = issue_for(ctx, unwrapped.content)
    reply = ctx.wrap(CertRepSpec(request=unwrapped, status=0, certs=[cert, ca[0]]))
    envelope = verify_certrep(reply, vectors)
    assert degenerate_certs(decrypt_envelope(envelope, device_key)) == [cert, ca[0]]

    # A subjectKeyIdentifier that names no certificate in the message is refused.
    key = serialization.load_pem_private_key(device_key.read_bytes(), password=None)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest
    sid = b"\x80\x14" + ski
    assert request.count(sid) == 1
    other = request.replace(sid, b"\x80\x14" + bytes(b ^ 0xFF for b in ski))
    with pytest.raises(SignatureInvalid, match="signer certificate is not in the message"):
        ctx.unwrap(other)


def test_issued_certificate_fields(ctx, build_request, ca, vectors, tmp_path):
    unwrapped = ctx.unwrap(build_request(cn="fields-device"))
    now = int(time.time())
    serial = 0x7F0102030405060708090A0B0C0D0E0F10111213
    cert_der = ctx.issue(IssueRequest(csr_der=unwrapped.content, serial=serial,
                                      not_before=now - 600, not_after=now + 3600))
    cert = asn1_x509.Certificate.load(cert_der)
    tbs = cert["tbs_certificate"]
    assert tbs["serial_number"].native == serial
    assert tbs["subject"].native["common_name"] == "fields-device"
    assert tbs["issuer"] == asn1_x509.Certificate.load(ca[0])["tbs_certificate"]["subject"]
    assert int(tbs["validity"]["not_before"].native.timestamp()) == now - 600
    assert int(tbs["validity"]["not_after"].native.timestamp()) == now + 3600
    assert cert.key_identifier is not None
    assert cert.authority_key_identifier == asn1_x509.Certificate.load(ca[0]).key_identifier
    path = tmp_path / "leaf.der"
    path.write_bytes(cert_der)
    out = openssl("verify", "-CAfile", str(vectors / "ca.pem"), "-partial_chain",
                  str(_pem(tmp_path, cert_der)))
    assert b"OK" in out


def _pem(tmp_path: Path, der: bytes) -> Path:
    path = tmp_path / "cert.pem"
    path.write_bytes(openssl("x509", "-inform", "DER", stdin=der))
    return path


@pytest.mark.parametrize("status,fail_info,text", [(2, 2, "wrong challenge password"),
                                                   (2, 0, ""), (3, None, "")])
def test_failure_and_pending_carry_no_envelope(ctx, build_request, vectors, status, fail_info,
                                               text):
    unwrapped = ctx.unwrap(build_request())
    reply = ctx.wrap(CertRepSpec(request=unwrapped, status=status, fail_info=fail_info,
                                 fail_info_text=text))
    view = read_certrep(reply)
    assert view.content == b""
    assert verify_certrep(reply, vectors) == b""
    assert view.attrs["pki_status"] == str(status)
    assert view.attrs["recipient_nonce"] == unwrapped.sender_nonce
    if fail_info is None:
        assert "fail_info" not in view.attrs
    else:
        assert view.attrs["fail_info"] == str(fail_info)
    if text:
        assert view.attrs["fail_info_text"] == text
    else:
        assert "fail_info_text" not in view.attrs


def test_sender_nonce_is_fresh_each_time(ctx, build_request):
    unwrapped = ctx.unwrap(build_request())
    nonces = {read_certrep(ctx.wrap(CertRepSpec(request=unwrapped, status=3)))
              .attrs["sender_nonce"] for _ in range(5)}
    assert len(nonces) == 5


def test_batch_results_follow_input_order(ctx, build_request):
    requests = [build_request(cn=f"batch-{i}") for i in range(4)]
    results = ctx.unwrap_batch([requests[0], b"garbage", requests[1], requests[2], requests[3]])
    assert results[1].error is not None
    good = [r for i, r in enumerate(results) if i != 1]
    assert all(r.error is None for r in good)
    issued = ctx.issue_batch([
        IssueRequest(csr_der=r.content, serial=100 + i, not_before=0, not_after=86400)
        for i, r in enumerate(good)
    ])
    subjects = [asn1_x509.Certificate.load(c)["tbs_certificate"]["subject"].native["common_name"]
                for c in issued]
    assert subjects == ["batch-0", "batch-1", "batch-2", "batch-3"]
