"""Captured requests (tests/vectors/README.md says where each came from)."""

from __future__ import annotations

import time

import pytest

from scep_fast.crypto import (
    AlgorithmRefused,
    CertRepSpec,
    DecryptFailed,
    IssueRequest,
    ScepContext,
)
from tests.native.certrep import envelope_algorithms, read_certrep
from tests.native.conftest import keypair
from tests.native.test_roundtrip import decrypt_envelope, verify_certrep

# file, transactionID, senderNonce, digest, cipher, key transport (from the vectors' README)
VECTORS = [
    ("ber-indefinite-pkcsreq.der",
     "14848c12ca7f787a1f6fe413b7e5244a5b4e53dc266eed05e3ae4df9ac25c42b",
     "d16b05ff0624f39b6a0dd20f200967a0", "SHA256", "AES-128-CBC", "rsa-pkcs1-v1_5"),
    ("ber-indefinite-envelope-pkcsreq.der",
     "48d7dc5541c6bda7810e4c2539f8fc7148248f9fcbfbc46baf39dc281599a137",
     "0b6333dda7cd5e25ca4d94903bec4e5e", "SHA256", "AES-256-CBC", "rsa-pkcs1-v1_5"),
    ("oaep-aes256-sha512-pkcsreq.der",
     "f4402b7faaa7ff6a0ded9d5e4aa356da77888a2f0795a1253cfc9cb12020fda3",
     "13932edbdaa6dab303b5093a97683f88", "SHA512", "AES-256-CBC", "rsa-oaep"),
    ("ski-recipient-pkcsreq.der",
     "1a8b9bc80318818d594cb571d7b6d237636a3638ce50eb5681377af7cd7185e5",
     "6b94cd09d6fd7bb2d0afd868b527221c", "SHA256", "AES-128-CBC", "rsa-pkcs1-v1_5"),
    ("des3-sha1-nonce8-pkcsreq.der",
     "10839f70f187a332233bdcd97ea6aa9e24ee0a4b8ae40aa1e9974d6c85985539",
     "f3f4db228711f1d9", "SHA1", "DES-EDE3-CBC", "rsa-pkcs1-v1_5"),
]

SCEPCLIENT = [
    ("scepclient-pkcsreq.der", "8dJMTM6BcCJcUoH4ezDC1LGzpMI=", "1f8197b40c491d84bad9ed031d6c6f23",
     "scepclient-device.key"),
    ("scepclient-get-pkcsreq.der", "ETEoqMQaMHbm11LoEWaDtD8G7RA=",
     "2d58954217ad3b6ae718620f0ee79868", "scepclient-get-device.key"),
]


@pytest.mark.parametrize("name,tid,nonce,digest,cipher,kt", VECTORS)
def test_vector_unwraps(ctx, vectors, name, tid, nonce, digest, cipher, kt):
    u = ctx.unwrap((vectors / name).read_bytes())
    assert u.message_type == 19
    assert u.transaction_id == tid.encode()
    assert u.sender_nonce == bytes.fromhex(nonce)
    assert (u.algorithms.digest, u.algorithms.cipher, u.algorithms.key_transport) == (
        digest, cipher, kt)
    assert u.csr is not None
    assert u.csr.challenge == b"secret-challenge"
    assert u.csr.key_type == "RSA" and u.csr.key_bits == 2048


@pytest.mark.parametrize("name,tid,nonce,key", SCEPCLIENT)
def test_scepclient_is_refused_with_bad_alg_without_the_legacy_switch(ctx, vectors, name, tid,
                                                                       nonce, key):
    u = ctx.unwrap_batch([(vectors / name).read_bytes()])[0]
    assert isinstance(u.error, AlgorithmRefused)
    assert "DES-CBC" in u.error.reason
    # Authenticated all the same, so it receives a signed FAILURE badAlg.
    assert u.authenticated and u.transaction_id == tid.encode()
    reply = ctx.wrap(CertRepSpec(request=u, status=2, fail_info=0,
                                 fail_info_text="single DES is not allowed"))
    view = read_certrep(reply)
    assert view.attrs["fail_info"] == "0"
    assert view.digest == "sha1"
    verify_certrep(reply, vectors)


@pytest.mark.parametrize("name,tid,nonce,key", SCEPCLIENT)
def test_scepclient_round_trip_with_the_legacy_switch(legacy_ctx, vectors, ca, name, tid, nonce,
                                                      key):
    u = legacy_ctx.unwrap((vectors / name).read_bytes())
    assert (u.algorithms.digest, u.algorithms.cipher) == ("SHA1", "DES-CBC")
    assert u.sender_nonce == bytes.fromhex(nonce)
    now = int(time.time())
    cert = legacy_ctx.issue(IssueRequest(csr_der=u.content, serial=42, not_before=now - 600,
                                         not_after=now + 3600))
    reply = legacy_ctx.wrap(CertRepSpec(request=u, status=0, certs=[cert]))
    envelope = verify_certrep(reply, vectors, legacy=True)
    assert envelope_algorithms(envelope)[0] == "des"
    assert read_certrep(reply).digest == "sha1"
    assert cert in decrypt_envelope(envelope, vectors / key, legacy=True)


def test_scepclient_also_decrypts_with_a_second_recipient_key(vectors):
    # scepclient encrypts to every certificate of GetCACert; the CA key alone opens it.
    ca = keypair("ca")
    ctx = ScepContext(recipients=[keypair("other"), ca], signer=ca, allow_legacy=True)
    u = ctx.unwrap((vectors / "scepclient-pkcsreq.der").read_bytes())
    assert u.csr is not None and u.csr.challenge == b"secret-challenge"


def test_wrong_recipient(ctx, vectors):
    u = ctx.unwrap_batch([(vectors / "wrong-recipient-pkcsreq.der").read_bytes()])[0]
    assert isinstance(u.error, DecryptFailed)
    other = keypair("other")
    ok = ScepContext(recipients=[other], signer=other).unwrap(
        (vectors / "wrong-recipient-pkcsreq.der").read_bytes())
    assert ok.csr is not None and ok.csr.challenge == b"secret-challenge"


def test_refusing_sha1_and_3des(vectors, ra):
    data = (vectors / "des3-sha1-nonce8-pkcsreq.der").read_bytes()
    no_sha1 = ScepContext(recipients=[ra], signer=ra, refuse_sha1=True)
    assert "SHA1" in str(no_sha1.unwrap_batch([data])[0].error)
    no_3des = ScepContext(recipients=[ra], signer=ra, refuse_3des=True)
    err = no_3des.unwrap_batch([data])[0].error
    assert isinstance(err, AlgorithmRefused) and "DES-EDE3-CBC" in err.reason
