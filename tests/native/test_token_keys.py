"""The core with its RA and CA keys in a SoftHSM2 token, through libp11's engine.

The test vectors' RA and CA keys are imported into a throw-away token, so the
same independently built requests and the same openssl checks as the file-key
round trips apply: a reply signed and an envelope opened by the token key must
be indistinguishable from the file key's. A key generated inside the token
checks what an operator gets from `init --generate-in-token`.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from scep_fast.crypto import (
    CertRepSpec,
    DecryptFailed,
    InvalidArgument,
    IssueRequest,
    NativeInternalError,
    NativeKey,
    Pkcs11Module,
    ScepContext,
    der_private_key,
)
from scep_fast.crypto.x509sign import public_key, sign_certificate
from tests import softhsm
from tests.native.certrep import degenerate_certs, read_certrep
from tests.native.test_roundtrip import decrypt_envelope, verify_certrep


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory, vectors: Path) -> Iterator[softhsm.Token]:
    softhsm.require()
    directory = tmp_path_factory.mktemp("softhsm")
    token = softhsm.make_token(directory)
    for name, key_id in (("ca", "01"), ("ra", "02")):
        der = directory / f"{name}.der"
        der.write_bytes(der_private_key((vectors / f"{name}.key").read_bytes()))
        token.import_private_key(der, name, key_id)
        der.unlink()
    token.generate_rsa("generated", "03")
    token.generate_ec("ec-ca", "04", "secp384r1")
    # SoftHSM2 reads SOFTHSM2_CONF once, when this process first opens the module.
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(token.conf)
    yield token
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous


@pytest.fixture(scope="module")
def module(token: softhsm.Token) -> Pkcs11Module:
    return Pkcs11Module(token.module, softhsm.PIN.encode())


@pytest.fixture(scope="module")
def token_ctx(module: Pkcs11Module, token: softhsm.Token, ra: tuple[bytes, bytes],
              ca: tuple[bytes, bytes]) -> ScepContext:
    ra_key = module.load_key(token.uri("ra"))
    ca_key = module.load_key(token.uri("ca"))
    return ScepContext(recipients=[(ra[0], ra_key)], signer=(ra[0], ra_key),
                       issuer=(ca[0], ca_key))


@pytest.mark.parametrize("cipher,key_transport", [("aes128", "pkcs1v15"), ("aes256", "oaep-sha256"),
                                                  ("des3", "pkcs1v15")])
def test_round_trip_with_token_keys(token_ctx, build_request, device_key, vectors, ca, cipher,
                                    key_transport):
    request = build_request(cipher=cipher, key_transport=key_transport)
    unwrapped = token_ctx.unwrap(request)
    assert unwrapped.csr is not None and unwrapped.csr.challenge == b"secret-challenge"
    now = int(time.time())
    cert = token_ctx.issue(IssueRequest(request=unwrapped, serial=0x5EED, not_before=now - 60,
                                        not_after=now + 3600))
    issued = x509.load_der_x509_certificate(cert)
    issued.verify_directly_issued_by(x509.load_der_x509_certificate(ca[0]))
    reply = token_ctx.wrap(CertRepSpec(request=unwrapped, status=0, certs=[cert]))
    envelope = verify_certrep(reply, vectors)
    assert read_certrep(reply).attrs["pki_status"] == "0"
    assert degenerate_certs(decrypt_envelope(envelope, device_key)) == [cert]


def test_wrong_recipient_is_refused_alike(token_ctx, ctx, vectors):
    """An envelope for another key fails the same way with the token key as with the file key."""
    request = (vectors / "wrong-recipient-pkcsreq.der").read_bytes()
    file_result = ctx.unwrap_batch([request])[0]
    token_result = token_ctx.unwrap_batch([request])[0]
    assert isinstance(file_result.error, DecryptFailed)
    assert isinstance(token_result.error, DecryptFailed)
    assert token_result.error.summary == file_result.error.summary


def test_generated_key_never_leaves_the_token(token):
    access = token.private_key_access("generated")
    assert "sensitive" in access.split(", ")
    assert "never extractable" in access
    # pkcs11-tool reads these from the token (C_GetAttributeValue): CKA_SENSITIVE,
    # CKA_NEVER_EXTRACTABLE, and "extractable" would name CKA_EXTRACTABLE true.
    assert "extractable" not in access.replace("never extractable", "")


def test_token_key_signs_a_certificate(module, token):
    key = module.load_key(token.uri("generated"))
    pub = public_key(key)
    assert isinstance(pub, rsa.RSAPublicKey) and pub.key_size == 2048
    signature = key.sign("SHA256", b"to be signed")
    pub.verify(signature, b"to be signed", padding.PKCS1v15(), hashes.SHA256())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token CA")])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(pub)
               .serial_number(7).not_valid_before(now)
               .not_valid_after(now + datetime.timedelta(days=1)))
    cert = sign_certificate(builder, key)
    cert.verify_directly_issued_by(cert)
    assert cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == key.public_key_der()


def test_key_and_certificate_must_match(module, token, ra):
    other = module.load_key(token.uri("generated"))
    with pytest.raises(InvalidArgument, match="does not match"):
        ScepContext(recipients=[(ra[0], other)], signer=(ra[0], other))


def test_unknown_object_names_openssls_reason(module, token):
    with pytest.raises(InvalidArgument) as raised:
        module.load_key(f"pkcs11:token={token.label};object=absent;type=private")
    text = str(raised.value)
    assert "cannot load the private key from the token" in text
    assert "error:" in text, "OpenSSL's error queue is drained into the exception"


def test_wrong_pin_loads_nothing(token):
    # Its own process: PKCS#11 initialises a module once per process, and a
    # second module object would share (and, freed, finalise) this one's.
    script = (
        "import sys\n"
        "from scep_fast.crypto import InvalidArgument, Pkcs11Module\n"
        "try:\n"
        "    Pkcs11Module(sys.argv[1], b'0000-0000').load_key(sys.argv[2])\n"
        "except InvalidArgument as e:\n"
        "    print(e)\n"
        "    sys.exit(3)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, token.module, token.uri("ca")],
                            env=token.env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    assert "cannot load the private key from the token" in result.stdout


def test_same_key_object_from_der_signs_alike(ca):
    key = NativeKey.from_der(ca[1])
    cert = x509.load_der_x509_certificate(ca[0])
    signature = key.sign("SHA256", b"abc")
    pub = cert.public_key()
    assert isinstance(pub, rsa.RSAPublicKey)
    pub.verify(signature, b"abc", padding.PKCS1v15(), hashes.SHA256())


def test_error_paths_free_what_they_took(module, token, ca):
    """Each refusal of the key store, run under the sanitizers by sanitize.sh (LSan)."""
    key = module.load_key(token.uri("ca"))
    with pytest.raises(NativeInternalError, match="unknown digest"):
        key.sign("NO-SUCH-DIGEST", b"data")
    with pytest.raises(NativeInternalError, match="needed"):
        key.sign("SHA256", b"")
    with pytest.raises(InvalidArgument, match="pkcs11: URI"):
        module.load_key("file:///etc/passwd")
    with pytest.raises(InvalidArgument, match="cannot parse the private key"):
        NativeKey.from_der(ca[1][:-3])
    with pytest.raises(InvalidArgument, match="cannot parse the private key"):
        NativeKey.from_der(ca[0])
    with pytest.raises(InvalidArgument, match="module path and a PIN"):
        Pkcs11Module(token.module, b"")
    # The context keeps its own reference: the key object may go first.
    ctx = ScepContext(recipients=[(ca[0], key)], signer=(ca[0], key), issuer=(ca[0], key))
    del key
    assert ctx.unwrap_batch([b"\x30\x00"])[0].error is not None


def test_bad_key_padding_and_bad_content_padding_are_refused_alike(token_ctx, ctx):
    """The token-held RA key refuses a broken envelope as the file key does: a content key
    whose RSA padding is wrong and content whose CBC padding is wrong both come out as
    DecryptFailed with the same words for the client, and a good envelope opens."""
    from asn1crypto import cms

    from tests.native.hostile_helpers import Device

    device = Device.load()
    csr = device.csr()
    envelope = device.envelope(csr)
    env = cms.ContentInfo.load(envelope)["content"]
    wrapped_key = env["recipient_infos"][0].chosen["encrypted_key"].contents
    bad_key = envelope.replace(wrapped_key, bytes(len(wrapped_key)))
    ciphertext = env["encrypted_content_info"]["encrypted_content"].contents
    damaged = bytearray(ciphertext)
    damaged[-17] ^= 16 - len(csr) % 16
    bad_content = envelope.replace(ciphertext, bytes(damaged))
    messages = [device.pkcsreq(e) for e in (envelope, bad_key, bad_content)]
    for context in (ctx, token_ctx):
        good, key_refused, content_refused = context.unwrap_batch(messages)
        assert good.error is None and good.content == csr
        assert isinstance(key_refused.error, DecryptFailed)
        assert isinstance(content_refused.error, DecryptFailed)
        assert key_refused.error.summary == content_refused.error.summary
    token_results = token_ctx.unwrap_batch(messages[1:])
    file_results = ctx.unwrap_batch(messages[1:])
    # A wrong content key opens the content by chance about once in 256 tries (the
    # token's stand-in key is random each time): the refusals are what is compared.
    refusals = [(t.error, f.error) for t, f in zip(token_results, file_results, strict=True)
                if t.error is not None and f.error is not None]
    assert refusals and all(t.summary == f.summary for t, f in refusals)


# OpenSC's PKCS#11 spy: a module that logs each call and passes it to PKCS11SPY.
_PKCS11_SPY = ("/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so",
               "/usr/lib/x86_64-linux-gnu/pkcs11-spy.so", "/usr/lib/pkcs11/pkcs11-spy.so")

# Run in its own process (one PKCS#11 module per process): unwraps each message alone
# and reports the token's decryption calls it caused, read from the spy's log.
_COUNT_TOKEN_DECRYPTIONS = """
import json, os, sys
from scep_fast.crypto import Pkcs11Module, ScepContext
spy, uri, pin, ra_cert = sys.argv[1], sys.argv[2], sys.argv[3].encode(), bytes.fromhex(sys.argv[4])
messages = json.loads(sys.stdin.read())
key = Pkcs11Module(spy, pin).load_key(uri)
ctx = ScepContext(recipients=[(ra_cert, key)], signer=(ra_cert, key), issuer=(ra_cert, key))
log = os.environ["PKCS11SPY_OUTPUT"]
out = {}
for name, message in messages.items():
    start = os.path.getsize(log)
    (result,) = ctx.unwrap_batch([bytes.fromhex(message)])
    with open(log, errors="replace") as f:
        f.seek(start)
        lines = [line.strip() for line in f.read().splitlines()]
    out[name] = {
        "decrypt": sum(line.endswith(": C_Decrypt") for line in lines),
        "mechanisms": [line.split("=")[-1].strip() for line in lines
                       if line.startswith("[in] pMechanism->type")],
        "error": None if result.error is None else result.error.summary,
    }
print(json.dumps(out))
"""


def test_bad_key_padding_costs_the_token_one_decryption_like_good_padding(token, ra, tmp_path):
    """Issue 13: libp11's engine decrypted PKCS#1 v1.5 in the token (CKM_RSA_PKCS) and,
    the padding refused, asked the token again through OpenSSL's RSA method: two token
    operations for a bad padding, one for a good one, a Bleichenbacher timing oracle.
    Every envelope must now cost one raw RSA operation (CKM_RSA_X_509), whatever its
    key transport's padding, counted in the log of OpenSC's PKCS#11 spy."""
    import random

    from asn1crypto import cms

    from tests.native.hostile_helpers import B, Device

    spy = next((m for m in _PKCS11_SPY if Path(m).exists()), None)
    if spy is None:
        from tests.conftest import missing_peer

        missing_peer("OpenSC's pkcs11-spy.so is not installed (Debian package `opensc-pkcs11`)")
    device = Device.load()
    csr = device.csr()
    modulus = device.ra.public_key().public_numbers().n
    rng = random.Random(13)
    envelopes = {}
    for transport, rid in (("pkcs1v15", "issuer-serial"), ("oaep-sha256", "ski")):
        envelope = bytes(B.make_envelope(csr, device.ra, "aes128", transport, rid, "der", 512))
        env = cms.ContentInfo.load(envelope)["content"]
        wrapped = env["recipient_infos"][0].chosen["encrypted_key"].contents
        ciphertext = env["encrypted_content_info"]["encrypted_content"].contents
        damaged = bytearray(ciphertext)
        damaged[-17] ^= 16 - len(csr) % 16
        envelopes[f"{transport} good"] = envelope
        envelopes[f"{transport} bad key, zero"] = envelope.replace(wrapped, bytes(len(wrapped)))
        for i in range(3):
            forged = rng.randrange(2, modulus).to_bytes(len(wrapped), "big")
            envelopes[f"{transport} bad key, random {i}"] = envelope.replace(wrapped, forged)
        envelopes[f"{transport} bad content"] = envelope.replace(ciphertext, bytes(damaged))
    messages = {name: device.pkcsreq(e).hex() for name, e in envelopes.items()}
    log = tmp_path / "spy.log"
    log.touch()
    result = subprocess.run(
        [sys.executable, "-c", _COUNT_TOKEN_DECRYPTIONS, spy, token.uri("ra"), softhsm.PIN,
         ra[0].hex()],
        input=json.dumps(messages), env={**token.env(), "PKCS11SPY": token.module,
                                         "PKCS11SPY_OUTPUT": str(log)},
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.splitlines()[-1])
    assert set(seen) == set(messages)
    for name, calls in seen.items():
        assert calls["decrypt"] == 1, (name, calls)
        assert calls["mechanisms"] == ["CKM_RSA_X_509"], (name, calls)
        if name.endswith(" good"):
            assert calls["error"] is None, (name, calls)
        else:  # a random key may open the content with a valid padding, 1 in ~256
            assert calls["error"] in (None, "cannot decrypt the pkcsPKIEnvelope"), (name, calls)
    # A bad key is refused like bad content (the content's damage always breaks its
    # padding), unless the key the core falls back to opened it by chance (see above).
    for transport in ("pkcs1v15", "oaep-sha256"):
        refusal = seen[f"{transport} bad content"]["error"]
        assert refusal == "cannot decrypt the pkcsPKIEnvelope", seen
        assert seen[f"{transport} bad key, zero"]["error"] in (None, refusal), seen


def test_ec_key_in_the_token_issues(module, token, build_request):
    """An EC private key object has no public point: the core takes it from the public key
    object, proves the pair by a signature, and issues with SHA-384 for P-384."""
    from cryptography.hazmat.primitives.asymmetric import ec

    key = module.load_key(token.uri("ec-ca"))
    pub = public_key(key)
    assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.key_size == 384
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token EC CA")])
    now = datetime.datetime.now(datetime.UTC)
    ca_cert = sign_certificate(
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(pub)
        .serial_number(9).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False), key)
    ca_cert.verify_directly_issued_by(ca_cert)
    ca_der = ca_cert.public_bytes(serialization.Encoding.DER)
    ra = (Path(__file__).resolve().parents[1] / "vectors")
    from scep_fast.crypto import der_certificate

    ra_cert = der_certificate((ra / "ra.pem").read_bytes())
    ra_key = der_private_key((ra / "ra.key").read_bytes())
    ec_ctx = ScepContext(recipients=[(ra_cert, ra_key)], signer=(ra_cert, ra_key),
                         issuer=(ca_der, key))
    unwrapped = ec_ctx.unwrap(build_request())
    now_s = int(time.time())
    issued = x509.load_der_x509_certificate(ec_ctx.issue(IssueRequest(
        request=unwrapped, serial=0xEC, not_before=now_s - 60, not_after=now_s + 3600)))
    issued.verify_directly_issued_by(ca_cert)
    assert issued.signature_hash_algorithm is not None
    assert issued.signature_hash_algorithm.name == "sha384"
    # Another key's certificate is refused by the same proof.
    other = module.load_key(token.uri("generated"))
    with pytest.raises(InvalidArgument, match="does not match"):
        ScepContext(recipients=[(ra_cert, ra_key)], signer=(ra_cert, ra_key),
                    issuer=(ca_der, other))
