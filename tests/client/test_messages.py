"""Client messages against the native core: requests it unwraps, replies it wraps.

Every PKCSReq the client builds must unwrap in the server's core with the
algorithms asked for; every CertRep the core builds must verify and open in
the client, for each content cipher, digest and key transport. Tampered or
mismatched replies must be refused.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import pytest
from asn1crypto import cms, core
from asn1crypto import csr as asn1_csr
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from scep_fast.client import (
    PkiRequest,
    ResponseError,
    SignatureError,
    build_cert_poll,
    build_envelope,
    build_get_cert,
    build_get_crl,
    build_pkcs_req,
    build_renewal_req,
    decrypt_envelope,
    generate_key,
    parse_cert_rep,
    transaction_id_for,
)
from scep_fast.crypto import CertRepSpec, IssueRequest, ScepContext, Unwrapped
from scep_fast.protocol import FailInfo, MessageType, PKIStatus

VECTORS = Path(__file__).resolve().parents[1] / "vectors"

CIPHERS = ["aes128", "aes192", "aes256", "des3"]
DIGESTS = ["sha1", "sha256", "sha512"]
KEY_TRANSPORTS = ["pkcs1v15", "oaep-sha256"]
NATIVE_CIPHER = {"aes128": "AES-128-CBC", "aes192": "AES-192-CBC", "aes256": "AES-256-CBC",
                 "des3": "DES-EDE3-CBC"}
NATIVE_KT = {"pkcs1v15": "rsa-pkcs1-v1_5", "oaep-sha256": "rsa-oaep"}


def spki(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def issue(ctx: ScepContext, unwrapped: Unwrapped, serial: int = 0x42) -> bytes:
    now = int(time.time())
    return ctx.issue(IssueRequest(request=unwrapped, serial=serial, not_before=now - 300,
                                  not_after=now + 3600))


def success_reply(ctx: ScepContext, ca: tuple[bytes, bytes], request: PkiRequest,
                  *, chain: bool = True) -> tuple[bytes, bytes]:
    unwrapped = ctx.unwrap(request.message)
    cert = issue(ctx, unwrapped)
    certs = [cert, ca[0]] if chain else [cert]
    return ctx.wrap(CertRepSpec(request=unwrapped, status=0, certs=certs)), cert


@pytest.mark.parametrize("key_transport", KEY_TRANSPORTS)
@pytest.mark.parametrize("digest", DIGESTS)
@pytest.mark.parametrize("cipher", CIPHERS)
def test_pkcsreq_unwraps_in_the_native_core(ctx, ra_cert, device_key, cipher, digest,
                                            key_transport):
    request = build_pkcs_req(ra_cert, cn="client-device", challenge="secret-challenge",
                             key=device_key, sans=["a.example", "b.example"], digest=digest,
                             cipher=cipher, key_transport=key_transport)
    unwrapped = ctx.unwrap(request.message)
    assert unwrapped.message_type == MessageType.PKCS_REQ
    assert unwrapped.algorithms.cipher == NATIVE_CIPHER[cipher]
    assert unwrapped.algorithms.digest == digest.upper()
    assert unwrapped.algorithms.key_transport == NATIVE_KT[key_transport]
    expected_tid = hashlib.sha256(spki(device_key.public_key())).hexdigest()
    assert request.transaction_id == expected_tid
    assert unwrapped.transaction_id == expected_tid.encode()
    assert len(request.sender_nonce) == 16
    assert unwrapped.sender_nonce == request.sender_nonce
    assert unwrapped.signer_cert == request.signer_cert.public_bytes(serialization.Encoding.DER)
    assert unwrapped.content == request.csr
    assert unwrapped.csr is not None
    assert unwrapped.csr.challenge == b"secret-challenge"
    assert unwrapped.csr.key_type == "RSA" and unwrapped.csr.key_bits == 2048

    csr = x509.load_der_x509_csr(request.csr)
    assert csr.is_signature_valid
    assert csr.subject.rfc4514_string() == "CN=client-device"
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a.example", "b.example"]
    assert spki(csr.public_key()) == spki(device_key.public_key())
    signer = request.signer_cert
    assert signer.issuer == signer.subject
    assert spki(signer.public_key()) == spki(device_key.public_key())


def test_challenge_is_a_printable_string_when_it_can_be(ra_cert, device_key):
    for challenge, tag in (("secret-challenge", 0x13), ("sécret_*", 0x0C)):
        request = build_pkcs_req(ra_cert, cn="d", challenge=challenge, key=device_key)
        info = asn1_csr.CertificationRequest.load(request.csr)["certification_request_info"]
        (attr,) = list(info["attributes"])
        assert attr["type"].native == "challenge_password"
        (value,) = list(attr["values"])
        assert value.chosen.tag == {0x13: 19, 0x0C: 12}[tag]
        assert value.native == challenge


@pytest.mark.parametrize("key_transport", KEY_TRANSPORTS)
@pytest.mark.parametrize("digest", DIGESTS)
@pytest.mark.parametrize("cipher", CIPHERS)
def test_native_certrep_verifies_and_opens(ctx, ca, ra_cert, ca_cert, device_key, cipher,
                                           digest, key_transport):
    request = build_pkcs_req(ra_cert, cn="round-trip", challenge="secret-challenge",
                             key=device_key, digest=digest, cipher=cipher,
                             key_transport=key_transport)
    reply, cert_der = success_reply(ctx, ca, request)
    rep = parse_cert_rep(reply, request)
    assert rep.status is PKIStatus.SUCCESS
    assert rep.fail_info is None
    assert rep.transaction_id == request.transaction_id
    assert rep.recipient_nonce == request.sender_nonce
    assert rep.sender_nonce and rep.sender_nonce != request.sender_nonce
    assert rep.digest == digest, "the core answers with the request's digest"
    assert rep.cipher == cipher, "the core answers with the request's cipher"
    assert rep.signer == ra_cert
    issued, *chain = rep.certificates
    assert issued.public_bytes(serialization.Encoding.DER) == cert_der
    assert spki(issued.public_key()) == spki(device_key.public_key())
    assert chain == [ca_cert]
    issued.verify_directly_issued_by(ca_cert)


def test_issued_certificate_comes_first_whatever_the_order(ctx, ca, ra_cert, device_key):
    request = build_pkcs_req(ra_cert, cn="order", challenge="c", key=device_key)
    unwrapped = ctx.unwrap(request.message)
    cert = issue(ctx, unwrapped)
    reply = ctx.wrap(CertRepSpec(request=unwrapped, status=0, certs=[ca[0], cert]))
    rep = parse_cert_rep(reply, request)
    assert [c.public_bytes(serialization.Encoding.DER) for c in rep.certificates] == [cert, ca[0]]


@pytest.mark.parametrize("status,fail_info,text", [
    (2, FailInfo.BAD_REQUEST, "wrong challenge password"),
    (2, FailInfo.BAD_ALG, ""),
    (3, None, ""),
])
def test_failure_and_pending(ctx, ra_cert, device_key, status, fail_info, text):
    request = build_pkcs_req(ra_cert, cn="refused", challenge="bad", key=device_key)
    unwrapped = ctx.unwrap(request.message)
    reply = ctx.wrap(CertRepSpec(request=unwrapped, status=status, fail_info=fail_info,
                                 fail_info_text=text))
    rep = parse_cert_rep(reply, request)
    assert rep.status == status
    assert rep.fail_info == fail_info
    assert rep.fail_info_text == (text or None)
    assert rep.certificates == () and rep.cipher is None


def test_ec_device_key_uses_a_separate_rsa_key_for_the_exchange(ctx, ca, ra_cert):
    key = generate_key("ec-p256")
    request = build_pkcs_req(ra_cert, cn="ec-device", challenge="c", key=key)
    assert isinstance(request.signer_key, rsa.RSAPrivateKey)
    assert request.transaction_id == transaction_id_for(key.public_key())
    unwrapped = ctx.unwrap(request.message)
    assert unwrapped.csr is not None
    assert unwrapped.csr.key_type == "EC" and unwrapped.csr.curve == "prime256v1"
    reply, _ = success_reply(ctx, ca, request)
    rep = parse_cert_rep(reply, request)
    assert spki(rep.certificates[0].public_key()) == spki(key.public_key())


def test_cert_poll_keeps_the_transaction_and_signer(ctx, ra_cert, ca_cert, device_key):
    original = build_pkcs_req(ra_cert, cn="poll", challenge="c", key=device_key)
    poll = build_cert_poll(original, ca_cert)
    assert poll.message_type is MessageType.CERT_POLL
    assert poll.transaction_id == original.transaction_id
    assert poll.sender_nonce != original.sender_nonce
    unwrapped = ctx.unwrap_batch([poll.message])[0]
    assert unwrapped.message_type == MessageType.CERT_POLL
    assert unwrapped.transaction_id == original.transaction_id.encode()
    assert unwrapped.authenticated
    # The content is IssuerAndSubject: the CA's name, then the CSR's subject.
    issuer_and_subject = core.Sequence.load(unwrapped.content)
    assert issuer_and_subject[0].dump() == ca_cert.subject.public_bytes()
    assert issuer_and_subject[1].dump() == x509.load_der_x509_csr(original.csr).subject \
        .public_bytes()


# ------------------------------------------------------------ refusals


def _resign(reply: bytes, mutate) -> bytes:  # type: ignore[no-untyped-def]
    info = cms.ContentInfo.load(reply)
    mutate(info["content"])
    return info.dump(force=True)


def test_tampered_signature_is_refused(ctx, ca, ra_cert, device_key):
    request = build_pkcs_req(ra_cert, cn="tamper", challenge="c", key=device_key)
    reply, _ = success_reply(ctx, ca, request)

    def flip(sd):  # type: ignore[no-untyped-def]
        si = sd["signer_infos"][0]
        sig = bytearray(si["signature"].native)
        sig[10] ^= 1
        si["signature"] = bytes(sig)

    with pytest.raises(SignatureError, match="signature"):
        parse_cert_rep(_resign(reply, flip), request)


def test_tampered_content_is_refused(ctx, ca, ra_cert, device_key):
    request = build_pkcs_req(ra_cert, cn="tamper", challenge="c", key=device_key)
    reply, _ = success_reply(ctx, ca, request)

    def flip(sd):  # type: ignore[no-untyped-def]
        content = bytearray(sd["encap_content_info"]["content"].native)
        content[-3] ^= 1
        sd["encap_content_info"] = {"content_type": "data", "content": bytes(content)}

    with pytest.raises(SignatureError, match="messageDigest"):
        parse_cert_rep(_resign(reply, flip), request)


def test_byte_flip_anywhere_is_refused(ctx, ca, ra_cert, device_key):
    """No single flipped byte in the reply may yield a different accepted answer."""
    request = build_pkcs_req(ra_cert, cn="flip", challenge="c", key=device_key)
    reply, cert = success_reply(ctx, ca, request, chain=False)
    for pos in range(len(reply)):
        tampered = bytearray(reply)
        tampered[pos] ^= 0x20
        try:
            rep = parse_cert_rep(bytes(tampered), request)
        except ResponseError:
            continue
        # Only bytes outside what is signed (e.g. the unsigned certificate
        # set of the outer SignedData) may change without refusal.
        assert rep.certificates[0].public_bytes(serialization.Encoding.DER) == cert


def test_reply_signed_by_another_certificate_is_refused(ctx, ca, ra_cert, device_key):
    request = build_pkcs_req(ra_cert, cn="wrong-signer", challenge="c", key=device_key)
    reply, _ = success_reply(ctx, ca, request)
    other = x509.load_pem_x509_certificate((VECTORS / "other.pem").read_bytes())
    with pytest.raises(SignatureError, match="not signed by the RA"):
        parse_cert_rep(reply, request, ra_certs=[other])


def test_reply_to_another_request_is_refused(ctx, ca, ra_cert, device_key):
    first = build_pkcs_req(ra_cert, cn="first", challenge="c", key=device_key)
    retry = build_pkcs_req(ra_cert, cn="first", challenge="c", key=device_key)
    other = build_pkcs_req(ra_cert, cn="other", challenge="c", key=generate_key("ec-p256"))
    reply, _ = success_reply(ctx, ca, first)
    with pytest.raises(ResponseError, match="recipientNonce"):
        parse_cert_rep(reply, retry)  # same transactionID, another nonce
    with pytest.raises(ResponseError, match="transactionID"):
        parse_cert_rep(reply, other)


def test_garbage_is_refused_with_our_error(ra_cert, device_key):
    request = build_pkcs_req(ra_cert, cn="garbage", challenge="c", key=device_key)
    for body in (b"", b"\x30\x03\x02\x01\x01", b"not DER at all", request.message[:100]):
        with pytest.raises(ResponseError):
            parse_cert_rep(body, request)


def test_a_request_is_not_a_certrep(ra_cert, device_key):
    """Our own PKCSReq, sent back as if it were a reply, is refused."""
    request = build_pkcs_req(ra_cert, cn="echo", challenge="c", key=device_key)
    with pytest.raises(ResponseError):
        parse_cert_rep(request.message, request, ra_certs=[request.signer_cert])


# ------------------------------------------------------------ envelopes


def _openssl_envelope(content: bytes, recipient_pem: bytes, cipher: str, tmp_path) -> bytes:
    cert = tmp_path / "recipient.pem"
    cert.write_bytes(recipient_pem)
    proc = subprocess.run(
        ["openssl", "cms", "-encrypt", "-binary", "-outform", "DER", f"-{cipher}",
         "-provider", "legacy", "-provider", "default", str(cert)],
        input=content, capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout


@pytest.mark.parametrize("cipher,name", [("des", "des"), ("des3", "des3"),
                                         ("aes-256-cbc", "aes256")])
def test_decrypts_envelopes_made_by_openssl(tmp_path, device_key, cipher, name):
    """Single DES included: micromdm's scepserver answers with DES-CBC whatever was asked."""
    cert = build_pkcs_req(
        x509.load_pem_x509_certificate((VECTORS / "ra.pem").read_bytes()),
        cn="env", key=device_key).signer_cert
    envelope = _openssl_envelope(b"degenerate bytes" * 5, cert.public_bytes(
        serialization.Encoding.PEM), cipher, tmp_path)
    plaintext, used = decrypt_envelope(envelope, device_key, cert)
    assert plaintext == b"degenerate bytes" * 5
    assert used == name


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def test_decrypts_a_constructed_definite_encrypted_content(ra_cert, ra):
    """Quirk(micromdm): encryptedContent as a definite-length constructed [0]."""
    envelope = build_envelope(b"hello" * 40, ra_cert, cipher="aes128")
    env = cms.ContentInfo.load(envelope)["content"]
    eci = env["encrypted_content_info"]
    ciphertext = eci["encrypted_content"].native
    half = len(ciphertext) // 2
    new_eci = _der(0x30, eci["content_type"].dump() + eci["content_encryption_algorithm"].dump()
                   + _der(0xA0, _der(0x04, ciphertext[:half]) + _der(0x04, ciphertext[half:])))
    new_env = _der(0x30, env["version"].dump() + env["recipient_infos"].dump() + new_eci)
    rebuilt = _der(0x30, core.ObjectIdentifier("1.2.840.113549.1.7.3").dump()
                   + _der(0xA0, new_env))
    ra_key = serialization.load_der_private_key(ra[1], None)
    assert isinstance(ra_key, rsa.RSAPrivateKey)
    assert decrypt_envelope(rebuilt, ra_key, ra_cert) == (b"hello" * 40, "aes128")


def test_envelope_for_someone_else_is_refused(ra_cert, device_key):
    envelope = build_envelope(b"secret", ra_cert)
    with pytest.raises(ResponseError, match="opens with the device key"):
        decrypt_envelope(envelope, device_key)


def test_builders_refuse_unknown_algorithms(ra_cert, device_key):
    with pytest.raises(ValueError, match="cipher"):
        build_pkcs_req(ra_cert, cn="x", key=device_key, cipher="des")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="digest"):
        build_pkcs_req(ra_cert, cn="x", key=device_key, digest="md5")  # type: ignore[arg-type]


def test_renewal_req_is_signed_by_the_old_certificate(ctx, ca, ra_cert, device_key):
    first = build_pkcs_req(ra_cert, cn="renew-me", challenge="c", key=device_key)
    reply, _ = success_reply(ctx, ca, first)
    old_cert = parse_cert_rep(reply, first).certificates[0]
    new_key = generate_key("ec-p256")
    renewal = build_renewal_req(ra_cert, old_cert=old_cert, old_key=device_key, cn="renew-me",
                                key=new_key)
    assert renewal.message_type is MessageType.RENEWAL_REQ
    assert renewal.transaction_id == transaction_id_for(new_key.public_key())
    unwrapped = ctx.unwrap(renewal.message)
    assert unwrapped.message_type == MessageType.RENEWAL_REQ
    assert unwrapped.signer_cert == old_cert.public_bytes(serialization.Encoding.DER)
    assert unwrapped.csr is not None and unwrapped.csr.key_type == "EC"
    reply, _ = success_reply(ctx, ca, renewal)
    renewed = parse_cert_rep(reply, renewal).certificates[0]
    assert spki(renewed.public_key()) == spki(new_key.public_key())


@pytest.mark.parametrize("builder,message_type", [(build_get_cert, MessageType.GET_CERT),
                                                  (build_get_crl, MessageType.GET_CRL)])
def test_get_cert_and_get_crl_carry_issuer_and_serial(ctx, ra_cert, ca_cert, device_key,
                                                      builder, message_type):
    signer = build_pkcs_req(ra_cert, cn="asker", key=device_key).signer_cert
    request = builder(ra_cert, issuer=ca_cert.subject, serial=0x1234, signer_key=device_key,
                      signer_cert=signer)
    assert request.message_type is message_type
    unwrapped = ctx.unwrap_batch([request.message])[0]
    assert unwrapped.message_type == message_type
    assert unwrapped.transaction_id == request.transaction_id.encode()
    ias = cms.IssuerAndSerialNumber.load(unwrapped.content)
    assert ias["issuer"].dump() == ca_cert.subject.public_bytes()
    assert ias["serial_number"].native == 0x1234
