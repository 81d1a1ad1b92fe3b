"""Hostile input to every entry point of the native core.

Every call must come back with a clean result: the right NativeError subclass,
a reason that says why (with OpenSSL's own text where OpenSSL refused the
input), and never a crash. Run under AddressSanitizer and UBSan by
tests/native/sanitize.sh, these tests are also the core's memory-safety check.

Tests marked xfail pin behaviour the core still gets wrong; each reason names
the fix. When the core is fixed a strict one passes, which pytest reports as a
failure: the marker must then go.
"""

from __future__ import annotations

import datetime
import os
import random
import threading
import time
from pathlib import Path

import pytest
from asn1crypto import cms
from asn1crypto import csr as asn1_csr
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

import scep_fast._native
from scep_fast.crypto import (
    AlgorithmRefused,
    CertRepSpec,
    CsrInvalid,
    DecryptFailed,
    InvalidArgument,
    IssueRequest,
    MalformedMessage,
    NativeError,
    ScepContext,
    SignatureInvalid,
    Unwrapped,
    certs_only,
)
from tests.native.hostile_helpers import (
    OID_DATA,
    OID_ENVELOPED_DATA,
    OID_MESSAGE_TYPE,
    OID_SIGNED_DATA,
    OMIT,
    OPENSSL_REASON,
    B,
    Device,
    econtent_span,
    flip,
    header,
    raw_issue,
    raw_unwrap_pointer,
    raw_wrap_without_request,
    signature_span,
)

SCEP_MAX_INPUT = 16 * 1024 * 1024
NOW = int(time.time())
HOUR = 3600

PKCSREQ_VECTORS = [
    "ber-indefinite-pkcsreq.der",
    "ber-indefinite-envelope-pkcsreq.der",
    "oaep-aes256-sha512-pkcsreq.der",
]
DER_VECTOR = "oaep-aes256-sha512-pkcsreq.der"

# What hostile bytes may legitimately produce from unwrap. InvalidArgument,
# CsrInvalid and NativeInternalError are never a fair answer to a message.
UNWRAP_ERRORS = (MalformedMessage, SignatureInvalid, DecryptFailed, AlgorithmRefused)


def assert_error(result: object, cls: type[NativeError], *, openssl: bool = False) -> NativeError:
    """result is a cls with a reason; with openssl=True the reason quotes OpenSSL."""
    assert isinstance(result, cls), f"expected {cls.__name__}, got {result!r}"
    assert result.reason.strip(), "an error without a reason"
    assert str(result) == result.reason
    if openssl:
        assert OPENSSL_REASON.search(result.reason), f"no OpenSSL reason in {result.reason!r}"
    return result


def unwrap_error(ctx: ScepContext, message: bytes) -> NativeError:
    (result,) = ctx.unwrap_batch([message])
    assert result.error is not None, "hostile input unwrapped without an error"
    return result.error


def same_request(a: Unwrapped, b: Unwrapped) -> bool:
    return (a.content, a.transaction_id, a.sender_nonce, a.message_type, a.signer_key_sha256,
            a.algorithms, a.csr) == (b.content, b.transaction_id, b.sender_nonce,
                                     b.message_type, b.signer_key_sha256, b.algorithms, b.csr)


@pytest.fixture(scope="module")
def device() -> Device:
    return Device.load()


@pytest.fixture(scope="module")
def der_message(vectors: Path) -> bytes:
    return (vectors / DER_VECTOR).read_bytes()


@pytest.fixture(scope="module")
def good(ctx: ScepContext, der_message: bytes) -> Unwrapped:
    return ctx.unwrap(der_message)


@pytest.fixture(scope="module")
def csr(good: Unwrapped) -> bytes:
    return good.content


def issue_item(csr: bytes, **kw: object) -> IssueRequest:
    fields: dict[str, object] = {"csr_der": csr, "serial": 0x1234, "not_before": NOW - HOUR,
                                 "not_after": NOW + HOUR}
    fields.update(kw)
    return IssueRequest(**fields)  # type: ignore[arg-type]


# ---- the sanitizer build ---------------------------------------------------------


@pytest.mark.skipif(os.environ.get("SCEP_FAST_SANITIZED") != "1",
                    reason="only under tests/native/sanitize.sh")
def test_sanitizers_are_active() -> None:
    maps = Path("/proc/self/maps").read_text()
    assert "libasan" in maps, "AddressSanitizer is not loaded"
    assert "libubsan" in maps, "UBSan is not loaded"
    module = Path(scep_fast._native.__file__).read_bytes()
    assert b"__asan_report" in module, "the native module is not instrumented by ASan"
    assert b"__ubsan_handle" in module, "the native module is not instrumented by UBSan"


# ---- context loading -------------------------------------------------------------


def _context(ra: tuple[bytes, bytes], ca: tuple[bytes, bytes], role: str,
             pair: tuple[bytes, bytes]) -> ScepContext:
    return ScepContext(
        recipients=[pair if role == "recipient" else ra],
        signer=pair if role == "signer" else ra,
        issuer=pair if role == "issuer" else ca,
    )


BAD_PAIRS = {
    # name: (make the pair from the good one and another key, OpenSSL reason expected)
    "empty-cert": (lambda good, other: (b"", good[1]), False),
    "empty-key": (lambda good, other: (good[0], b""), False),
    "garbage-cert": (lambda good, other: (b"\x30\x82\x01\x00garbage", good[1]), True),
    "garbage-key": (lambda good, other: (good[0], b"garbage"), True),
    "random-cert": (lambda good, other: (random.Random(1).randbytes(800), good[1]), True),
    "random-key": (lambda good, other: (good[0], random.Random(2).randbytes(1200)), True),
    "pem-cert": (lambda good, other: (b"-----BEGIN CERTIFICATE-----\nMIIB\n", good[1]), True),
    "cert-trailing-byte": (lambda good, other: (good[0] + b"\x00", good[1]), False),
    "key-trailing-byte": (lambda good, other: (good[0], good[1] + b"\x00"), False),
    "cert-2^31-length": (lambda good, other: (header(0x30, 2**31, 4) + good[0][4:], good[1]),
                         True),
    "key-2^62-length": (lambda good, other: (good[0], header(0x30, 2**62, 8) + good[1][4:]),
                        True),
    "key-of-another-cert": (lambda good, other: (good[0], other[1]), True),
    "key-and-cert-swapped": (lambda good, other: (good[1], good[0]), True),
}


@pytest.mark.parametrize("role", ["recipient", "signer", "issuer"])
@pytest.mark.parametrize("case", sorted(BAD_PAIRS))
def test_context_refuses_bad_key_material(ra, ca, role, case):
    make, openssl = BAD_PAIRS[case]
    good, other = (ca, ra) if role == "issuer" else (ra, ca)
    with pytest.raises(InvalidArgument) as info:
        _context(ra, ca, role, make(good, other))
    assert_error(info.value, InvalidArgument, openssl=openssl)


def test_context_refuses_every_truncation(ra):
    cert, key = ra
    for i in range(len(cert)):
        with pytest.raises(InvalidArgument) as info:
            ScepContext(recipients=[(cert[:i], key)], signer=ra)
        assert_error(info.value, InvalidArgument, openssl=i > 0)
    # Keys go through OpenSSL's decoder chain, which is slower: every fifth length.
    for i in [*range(0, len(key), 5), len(key) - 1]:
        with pytest.raises(InvalidArgument) as info:
            ScepContext(recipients=[(cert, key[:i])], signer=ra)
        assert_error(info.value, InvalidArgument)


def test_context_refuses_a_non_rsa_decryption_key(ra):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ec recipient")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(datetime.datetime(2025, 1, 1))
            .not_valid_after(datetime.datetime(2045, 1, 1))
            .sign(key, hashes.SHA256()))
    pair = (cert.public_bytes(serialization.Encoding.DER),
            key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))
    with pytest.raises(InvalidArgument) as info:
        ScepContext(recipients=[pair], signer=ra)
    assert_error(info.value, InvalidArgument)


def test_context_limits_the_number_of_decryption_keys(ra):
    ScepContext(recipients=[ra] * 8, signer=ra)
    with pytest.raises(InvalidArgument) as info:
        ScepContext(recipients=[ra] * 9, signer=ra)
    assert_error(info.value, InvalidArgument)
    with pytest.raises(InvalidArgument):
        ScepContext(recipients=[], signer=ra)


# ---- unwrap: unparseable bytes ---------------------------------------------------


def test_unwrap_empty_input(ctx):
    assert_error(unwrap_error(ctx, b""), MalformedMessage)
    with pytest.raises(MalformedMessage):
        ctx.unwrap(b"")
    status, reason = raw_unwrap_pointer(ctx, None, 100)  # NULL data with a length
    assert status == MalformedMessage.status and reason


def test_unwrap_oversized_input(ctx):
    too_big = header(0x30, SCEP_MAX_INPUT - 5, 4) + bytes(SCEP_MAX_INPUT - 5)
    assert len(too_big) == SCEP_MAX_INPUT + 1
    # Refused before parsing: no OpenSSL reason.
    error = assert_error(unwrap_error(ctx, too_big), MalformedMessage)
    assert not OPENSSL_REASON.search(error.reason)
    # At the limit the bytes are parsed, and refused for what they are.
    at_limit = header(0x30, SCEP_MAX_INPUT - 6, 4) + bytes(SCEP_MAX_INPUT - 6)
    assert len(at_limit) == SCEP_MAX_INPUT
    assert_error(unwrap_error(ctx, at_limit), MalformedMessage, openssl=True)


def test_unwrap_random_bytes(ctx):
    rng = random.Random(8894)
    sizes = [*range(1, 65), *(rng.randrange(65, 9000) for _ in range(400))]
    messages = [rng.randbytes(n) for n in sizes]
    results = ctx.unwrap_batch(messages)
    assert len(results) == len(messages)
    for result in results:
        assert_error(result.error, MalformedMessage, openssl=True)
        assert "asn1 encoding routines" in result.error.reason
        assert result.message_type == -1 and not result.content and not result.authenticated


def test_unwrap_random_bytes_behind_a_plausible_header(ctx):
    """Random bodies behind real ContentInfo headers get deeper into the parser."""
    rng = random.Random(5652)
    prefixes = [
        B.oid(OID_SIGNED_DATA),
        B.oid(OID_SIGNED_DATA) + b"\xa0\x80",
        B.oid(OID_SIGNED_DATA) + b"\xa0\x80\x30\x80\x02\x01\x01",
        B.oid(OID_SIGNED_DATA) + b"\xa0\x80\x30\x80\x02\x01\x01\x31\x00\x30\x80" + B.oid(OID_DATA),
        B.oid(OID_ENVELOPED_DATA) + b"\xa0\x80",
    ]
    messages = []
    for prefix in prefixes:
        for _ in range(100):
            body = prefix + rng.randbytes(rng.randrange(0, 600))
            messages.append(b"\x30\x80" + body + b"\x00\x00" * rng.randrange(0, 4))
            messages.append(B.seq(body))
    for result in ctx.unwrap_batch(messages):
        assert_error(result.error, MalformedMessage)


@pytest.mark.parametrize("name", PKCSREQ_VECTORS)
def test_unwrap_every_truncation(ctx, vectors, name):
    message = (vectors / name).read_bytes()
    assert ctx.unwrap(message).error is None
    results = ctx.unwrap_batch([message[:n] for n in range(len(message))])
    assert len(results) == len(message)
    assert_error(results[0].error, MalformedMessage)
    for result in results[1:]:
        assert_error(result.error, MalformedMessage, openssl=True)


@pytest.mark.parametrize("name", PKCSREQ_VECTORS)
def test_unwrap_trailing_data(ctx, vectors, name):
    message = (vectors / name).read_bytes()
    for tail in (b"\x00", b"\x00\x00", b"\x30\x00", message):
        assert_error(unwrap_error(ctx, message + tail), MalformedMessage)


# ---- unwrap: damaged real messages -----------------------------------------------


@pytest.mark.parametrize("name", PKCSREQ_VECTORS)
def test_unwrap_single_bit_flips(ctx, vectors, name):
    """One bit flipped at every byte position; for the DER vector, every bit.

    A flip in the signature value, or in the eContent (through messageDigest),
    must fail. Elsewhere a flip may go unnoticed: the SignedData and SignerInfo
    versions, the digestAlgorithms SET, the tags of BER segments, the body of the
    embedded signer certificate, whose own signature is not checked (a
    requester's certificate is self-signed and only its key matters), and even
    a signed attribute's SET tag turned primitive (0x31 to 0x11), since the
    signature is checked over the DER re-encoding of what was parsed. Such a
    message must still yield exactly the request that was signed.
    """
    message = (vectors / name).read_bytes()
    original = ctx.unwrap(message)
    bits = range(8) if name == DER_VECTOR else None
    flips = [(pos, bit) for pos in range(len(message))
             for bit in (bits if bits is not None else [pos % 8])]
    results = ctx.unwrap_batch([flip(message, pos, bit) for pos, bit in flips])

    sig_start, sig_end = signature_span(message)
    covered = {pos: "signature" for pos in range(sig_start, sig_end)}
    if name == DER_VECTOR:
        start, end = econtent_span(message)
        covered.update({pos: "eContent" for pos in range(start, end)})

    unnoticed = 0
    for (pos, bit), result in zip(flips, results, strict=True):
        where = f"flip of bit {bit} at {pos}"
        if result.error is None:
            assert pos not in covered, f"{where}, in the {covered.get(pos)}, went unnoticed"
            assert same_request(result, original), f"{where} changed the request"
            unnoticed += 1
            continue
        assert isinstance(result.error, UNWRAP_ERRORS), f"{where}: {result.error!r}"
        assert result.error.reason, where
        if pos in covered:
            # A bad signature value is OpenSSL's verdict; a bad eContent may be the core's.
            assert_error(result.error, SignatureInvalid, openssl=covered[pos] == "signature")
    assert unnoticed < len(flips) // 4


@pytest.mark.parametrize("name", PKCSREQ_VECTORS)
def test_unwrap_bad_signature(ctx, vectors, name):
    message = (vectors / name).read_bytes()
    start, end = signature_span(message)
    damaged = []
    for pos in (start, start + 1, (start + end) // 2, end - 2, end - 1):
        out = bytearray(message)
        out[pos] ^= 0xFF
        damaged.append(bytes(out))
    zeroed = bytearray(message)
    zeroed[start:end] = bytes(end - start)
    damaged.append(bytes(zeroed))
    for result in ctx.unwrap_batch(damaged):
        assert_error(result.error, SignatureInvalid, openssl=True)
        assert not result.content and not result.signer_cert


def test_unwrap_wrong_recipient(ctx, vectors):
    (result,) = ctx.unwrap_batch([(vectors / "wrong-recipient-pkcsreq.der").read_bytes()])
    assert_error(result.error, DecryptFailed)
    assert not result.content
    # Signed correctly: the attributes are there, so a FAILURE can still answer it.
    assert result.authenticated and result.message_type == 19
    with pytest.raises(DecryptFailed):
        result.raise_for_error()


# ---- unwrap: absurd lengths and nesting ------------------------------------------


def _absurd_length_cases(message: bytes) -> dict[str, bytes]:
    body = message[4:]  # the DER vector starts with 30 82 xx xx
    assert message[:2] == b"\x30\x82"
    sig_start, _ = signature_span(message)
    sig_header = sig_start - 4  # 04 82 01 00
    assert message[sig_header:sig_start] == b"\x04\x82\x01\x00"
    return {
        "2^31": header(0x30, 2**31, 4) + body,
        "2^31-1": header(0x30, 2**31 - 1, 4) + body,
        "2^32-1": header(0x30, 2**32 - 1, 4) + body,
        "2^62": header(0x30, 2**62, 8) + body,
        "2^63-1": header(0x30, 2**63 - 1, 8) + body,
        "2^64-1": header(0x30, 2**64 - 1, 8) + body,
        "one-more-than-present": header(0x30, len(body) + 1, 4) + body,
        "one-less-than-present": header(0x30, len(body) - 1, 4) + body,
        "nine-length-octets": bytes([0x30, 0x89]) + b"\x01" * 9 + body,
        "length-byte-ff": bytes([0x30, 0xFF]) + body,
        "length-octets-missing": bytes([0x30, 0x84, 0x00]),
        "indefinite-primitive": bytes([0x04, 0x80]) + body,
        "high-tag-number-forever": bytes([0x1F]) + b"\xff" * 5000,
        "inner-signature-2^31": (message[:sig_header] + header(0x04, 2**31 - 1, 4)
                                 + message[sig_start:]),
        "inner-signature-2^62": (message[:sig_header] + header(0x04, 2**62, 8)
                                 + message[sig_start:]),
        "inner-signature-indefinite": message[:sig_header] + b"\x04\x80" + message[sig_start:],
    }


def test_unwrap_absurd_length_fields(ctx, der_message):
    cases = _absurd_length_cases(der_message)
    # The same bytes with an honest long-form length still unwrap.
    assert ctx.unwrap(header(0x30, len(der_message) - 4, 4) + der_message[4:]).error is None
    results = ctx.unwrap_batch(list(cases.values()))
    for name, result in zip(cases, results, strict=True):
        error = result.error
        assert isinstance(error, MalformedMessage), f"{name}: {error!r}"
        assert_error(error, MalformedMessage, openssl=True)


def _nested_definite(depth: int, tag: int = 0x30) -> bytes:
    inner = b""
    for _ in range(depth):
        inner = header(tag, len(inner)) + inner
    return inner


def _signed_data_around(econtent_octets: bytes) -> bytes:
    """A SignedData whose eContent [0] holds econtent_octets as encoded."""
    encap = B.indef(0x30, B.oid(OID_DATA), B.indef(0xA0, econtent_octets))
    sd = B.indef(0x30, B.integer(1), b"\x31\x00", encap, b"\x31\x00")
    return B.indef(0x30, B.oid(OID_SIGNED_DATA), B.indef(0xA0, sd))


def test_unwrap_deep_nesting(ctx):
    deep = 10_000
    cases = {
        "bare-indefinite": b"\x30\x80" * deep + b"\x00\x00" * deep,
        "bare-indefinite-unterminated": b"\x30\x80" * deep,
        "bare-definite": _nested_definite(deep),
        "in-signed-data": B.indef(0x30, B.oid(OID_SIGNED_DATA),
                                  B.indef(0xA0, b"\x30\x80" * deep + b"\x00\x00" * deep)),
        "constructed-octet-string": _signed_data_around(b"\x24\x80" * deep + b"\x00\x00" * deep),
        "constructed-octet-string-unterminated": _signed_data_around(b"\x24\x80" * deep),
        # OpenSSL allows five levels of constructed strings; seven is refused.
        "constructed-octet-string-7": _signed_data_around(
            b"\x24\x80" * 7 + b"\x04\x01x" + b"\x00\x00" * 7),
        "definite-octet-strings": _signed_data_around(_nested_definite(deep, 0x24)),
    }
    results = ctx.unwrap_batch(list(cases.values()))
    for name, result in zip(cases, results, strict=True):
        assert isinstance(result.error, MalformedMessage), f"{name}: {result.error!r}"
        assert result.error.reason
    # An unknown content type is read as ANY, however deep; then refused by type.
    other = B.indef(0x30, B.oid("1.2.3.4"), B.indef(0xA0, b"\x30\x80" * deep + b"\x00\x00" * deep))
    assert_error(unwrap_error(ctx, other), MalformedMessage)


def test_unwrap_deeply_nested_signed_attribute(ctx, device):
    """A correctly signed request with an unknown, deeply nested attribute still unwraps."""
    deep = 10_000
    indefinite = B.seq(B.oid("1.2.3.4.5"), B.tlv(0x31, b"\x30\x80" * deep + b"\x00\x00" * deep))
    definite = B.seq(B.oid("1.2.3.4.6"), B.tlv(0x31, _nested_definite(3000)))
    for attr in (indefinite, definite):
        (result,) = ctx.unwrap_batch([device.pkcsreq(extra_attrs=[attr])])
        assert result.error is None
        assert result.message_type == 19 and result.csr is not None


# ---- unwrap: correctly signed, hostile inside ------------------------------------


# In the third column: what the reason must name (the attribute or algorithm at
# fault), or FROM_OPENSSL where OpenSSL's parser refused the bytes.
FROM_OPENSSL = "from OpenSSL"
SIGNED_ATTRIBUTE_CASES = {
    # name: (pkcsreq arguments, expected error or None, what the reason names)
    "no-message-type": ({"message_type": OMIT}, MalformedMessage, "messageType"),
    "message-type-integer": ({"message_type": B.integer(19)}, MalformedMessage, "messageType"),
    "message-type-two-values": ({"message_type": [B.printable("19"), B.printable("21")]},
                                MalformedMessage, "messageType"),
    "message-type-no-value": ({"message_type": []}, MalformedMessage, "messageType"),
    "message-type-twice": ({"extra_attrs": [B.seq(B.oid(OID_MESSAGE_TYPE),
                                                  B.set_of(B.printable("21")))]},
                           MalformedMessage, "messageType"),
    "no-transaction-id": ({"transaction_id": OMIT}, MalformedMessage, "transactionID"),
    "transaction-id-octets": ({"transaction_id": B.octets(b"abc")}, MalformedMessage,
                              "transactionID"),
    "no-sender-nonce": ({"sender_nonce": OMIT}, MalformedMessage, "senderNonce"),
    "sender-nonce-printable": ({"sender_nonce": B.printable("0123456789abcdef")},
                               MalformedMessage, "senderNonce"),
    "no-content-type": ({"content_type": OMIT}, SignatureInvalid, ""),
    "no-message-digest": ({"message_digest": OMIT}, SignatureInvalid, ""),
    "wrong-message-digest": ({"message_digest": B.octets(bytes(32))}, SignatureInvalid, ""),
    "two-message-digests": ({"message_digest": [B.octets(bytes(32)), B.octets(bytes(31))]},
                            SignatureInvalid, ""),
    # RFC 5652 section 11.1: contentType MUST match eContentType.
    "content-type-enveloped": ({"content_type": B.oid(OID_ENVELOPED_DATA)}, SignatureInvalid,
                               ""),
    "econtent-type-enveloped": ({"econtent_type": OID_ENVELOPED_DATA}, MalformedMessage, ""),
    "md5": ({"digest": "md5"}, AlgorithmRefused, "MD5"),
    "no-signer-info": ({"signer_infos": 0}, MalformedMessage, ""),
    "two-signer-infos": ({"signer_infos": 2}, MalformedMessage, ""),
    "no-certificates": ({"certificates": b""}, SignatureInvalid, ""),
    "certificate-garbage": ({"certificates": b"\x30\x03\x02\x01\x01"}, MalformedMessage,
                            FROM_OPENSSL),
    "econtent-empty": ({"econtent": b""}, MalformedMessage, ""),
    "econtent-garbage": ({"econtent": b"\x30\x05garbage"}, MalformedMessage, FROM_OPENSSL),
    "econtent-signed-data": ({"econtent": B.seq(B.oid(OID_SIGNED_DATA))}, MalformedMessage, ""),
    # Answerable only as far as policy allows: the core reports what was signed.
    "message-type-not-a-number": ({"message_type": B.printable("abc")}, None, ""),
    "message-type-four-digits": ({"message_type": B.printable("1234")}, None, ""),
    "sha512": ({"digest": "sha512"}, None, ""),
}


@pytest.mark.parametrize("case", sorted(SIGNED_ATTRIBUTE_CASES))
def test_unwrap_signed_hostile_attributes(ctx, device, case):
    kwargs, expected, text = SIGNED_ATTRIBUTE_CASES[case]
    (result,) = ctx.unwrap_batch([device.pkcsreq(**kwargs)])
    if expected is None:
        assert result.error is None
        assert result.csr is not None and result.csr.challenge == b"secret-challenge"
        if case.startswith("message-type"):
            assert result.message_type == -1
        return
    error = assert_error(result.error, expected, openssl=text == FROM_OPENSSL)
    if text != FROM_OPENSSL:
        assert text in error.reason
    assert not result.content


def test_unwrap_signed_hostile_envelopes(ctx, device):
    csr = device.csr()
    cases = {
        "trailing-byte": (device.envelope(csr) + b"\x00", MalformedMessage),
        "empty-plaintext": (device.envelope(b""), MalformedMessage),
        "truncated": (device.envelope(csr)[:-20], MalformedMessage),
        "to-nobody": (device.envelope(csr)
                      .replace(B.integer(2), B.integer(99), 1), DecryptFailed),
    }
    envelope = device.envelope(csr)
    # Corrupt the encrypted content-encryption key (RSA PKCS#1 v1.5): it no longer decrypts.
    env = cms.ContentInfo.load(envelope)["content"]
    wrapped_key = env["recipient_infos"][0].chosen["encrypted_key"].contents
    cases["bad-encrypted-key"] = (envelope.replace(wrapped_key, bytes(len(wrapped_key))),
                                  DecryptFailed)
    # CBC: flipping a bit of the next-to-last ciphertext block flips the same bit of the
    # last plaintext block. Turn the last padding byte into 0, which is never valid.
    ciphertext = env["encrypted_content_info"]["encrypted_content"].contents
    pad = 16 - len(csr) % 16
    damaged = bytearray(ciphertext)
    damaged[-17] ^= pad
    cases["bad-padding"] = (envelope.replace(ciphertext, bytes(damaged)), DecryptFailed)
    messages = [device.pkcsreq(econtent) for econtent, _ in cases.values()]
    for (name, (_, expected)), result in zip(cases.items(), ctx.unwrap_batch(messages),
                                             strict=True):
        assert isinstance(result.error, expected), f"{name}: {result.error!r}"
        assert result.error.reason
        assert result.authenticated, f"{name}: the signature was good"
    # Not a CSR inside, or a BER envelope: both fine; csr is None for the first.
    not_csr, ber = ctx.unwrap_batch([
        device.pkcsreq(device.envelope(b"not a certification request")),
        device.pkcsreq(device.envelope(csr, encoding="ber")),
    ])
    assert not_csr.error is None and not_csr.csr is None
    assert not_csr.content == b"not a certification request"
    assert ber.error is None and ber.content == csr


def test_unwrap_reports_unanswerable_attributes_as_sent(ctx, device):
    """Empty or long identifiers are the protocol layer's to refuse; the core reports them."""
    cases = {
        "empty-transaction-id": {"transaction_id": B.printable("")},
        "long-transaction-id": {"transaction_id": B.printable("A" * 5000)},
        "empty-nonce": {"sender_nonce": B.octets(b"")},
        "long-nonce": {"sender_nonce": B.octets(b"n" * 65)},
    }
    results = ctx.unwrap_batch([device.pkcsreq(**kw) for kw in cases.values()])
    for name, result in zip(cases, results, strict=True):
        assert result.error is None, name
    tid_empty, tid_long, nonce_empty, nonce_long = results
    assert tid_empty.transaction_id == b"" and not tid_empty.authenticated
    assert tid_long.transaction_id == b"A" * 5000
    assert nonce_empty.sender_nonce == b"" and not nonce_empty.authenticated
    assert nonce_long.sender_nonce == b"n" * 65
    # No CertRep can echo an empty identifier or a nonce beyond 64 bytes.
    for request in (tid_empty, nonce_empty, nonce_long):
        for spec in (CertRepSpec(request=request, status=3),
                     CertRepSpec(request=request, status=2, fail_info=2)):
            assert_error(ctx.wrap_batch([spec])[0], InvalidArgument)


# ---- unwrap: batches and threads -------------------------------------------------


def test_failures_do_not_leak_into_the_next_item(ctx, der_message):
    start, _ = signature_span(der_message)
    bad_signature = flip(der_message, start + 3)
    garbage = b"\x30\x03\x02\x01"
    batch = [bad_signature, garbage, der_message, bad_signature, der_message, b"", der_message]
    results = ctx.unwrap_batch(batch)
    assert [type(r.error) if r.error else None for r in results] == [
        SignatureInvalid, MalformedMessage, None, SignatureInvalid, None, MalformedMessage, None]
    # Each reason is its own item's: OpenSSL's error queue is drained per item.
    assert "rsa routines" not in results[1].error.reason
    assert "rsa routines" in results[3].error.reason
    assert not OPENSSL_REASON.search(results[5].error.reason)
    for r in (results[2], results[4], results[6]):
        assert r.csr is not None and r.csr.challenge == b"secret-challenge"


def test_hostile_batches_on_threads(ctx, der_message):
    """Batches of good and hostile messages on four threads give the single-thread answers."""
    rng = random.Random(3)
    start, _ = signature_span(der_message)
    batch = [der_message, flip(der_message, start + 7), der_message[:-300], rng.randbytes(900),
             der_message] * 6
    expected = [(type(r.error), r.error.reason if r.error else r.content)
                for r in ctx.unwrap_batch(batch)]
    outcomes: list[object] = []

    def run() -> None:
        try:
            for _ in range(3):
                got = [(type(r.error), r.error.reason if r.error else r.content)
                       for r in ctx.unwrap_batch(batch)]
                outcomes.append(got == expected)
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcomes.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes == [True] * 12


# ---- issue -----------------------------------------------------------------------


def test_issue_garbage_csr(ctx, csr):
    rng = random.Random(2986)
    garbage = [b"\x00", b"\x30\x00", b"\x30\x80\x00\x00", header(0x30, 2**62, 8) + csr[4:],
               *(rng.randbytes(n) for n in (1, 2, 17, 300, 5000))]
    for result in ctx.issue_batch([issue_item(g) for g in garbage]):
        assert_error(result, CsrInvalid, openssl=True)
    with pytest.raises(InvalidArgument):
        ctx.issue_batch([issue_item(b"")])
    status, reason, cert = raw_issue(ctx, b"", b"\x01", NOW, NOW + HOUR)
    assert (status, cert) == (CsrInvalid.status, b"") and reason
    with pytest.raises(CsrInvalid):
        ctx.issue(issue_item(csr + b"\x00"))


def test_issue_every_csr_truncation(ctx, csr):
    results = ctx.issue_batch([issue_item(csr[:n]) for n in range(1, len(csr))])
    for result in results:
        assert_error(result, CsrInvalid, openssl=True)


def test_issue_csr_with_a_bad_signature(ctx, csr):
    signature = asn1_csr.CertificationRequest.load(csr)["signature"].contents[1:]
    start = csr.rfind(signature)
    assert start > 0
    damaged = [flip(csr, start), flip(csr, start + len(signature) // 2, 5),
               flip(csr, len(csr) - 1, 7),
               csr[:start] + bytes(len(signature))]
    for result in ctx.issue_batch([issue_item(d) for d in damaged]):
        assert "rsa routines" in assert_error(result, CsrInvalid, openssl=True).reason


def test_issue_csr_single_bit_flips(ctx, csr):
    """A flip either breaks the CSR, or was outside what its signature covers."""
    original = asn1_x509.Certificate.load(ctx.issue(issue_item(csr)))["tbs_certificate"]
    results = ctx.issue_batch([issue_item(flip(csr, pos, pos % 8)) for pos in range(len(csr))])
    issued = 0
    for pos, result in enumerate(results):
        if isinstance(result, bytes):
            tbs = asn1_x509.Certificate.load(result)["tbs_certificate"]
            assert tbs["subject"].dump() == original["subject"].dump(), pos
            assert tbs["subject_public_key_info"].dump() == \
                original["subject_public_key_info"].dump(), pos
            issued += 1
        else:
            assert_error(result, CsrInvalid)
    assert issued < len(csr) // 20


def test_issue_from_requests_that_carry_no_usable_csr(ctx, vectors, der_message, device):
    """Issuing from an unwrapped request needs a request that unwrapped to a CSR."""
    start, _ = signature_span(der_message)
    requests = ctx.unwrap_batch([
        b"",
        random.Random(6).randbytes(500),
        der_message[:-10],
        flip(der_message, start + 2),
        (vectors / "wrong-recipient-pkcsreq.der").read_bytes(),
        device.pkcsreq(digest="md5"),
        device.pkcsreq(device.envelope(b"not a certification request")),
        device.pkcsreq(device.envelope(device.csr()[:-1])),
    ])
    assert [r.csr is None for r in requests] == [True] * len(requests)
    results = ctx.issue_batch([IssueRequest(request=r, serial=9, not_before=NOW,
                                            not_after=NOW + HOUR) for r in requests])
    for result in results:
        assert_error(result, CsrInvalid)


def test_issue_from_a_request_whose_csr_is_badly_signed(ctx, device):
    csr = device.csr()
    bad = flip(csr, len(csr) - 3, 1)
    (request,) = ctx.unwrap_batch([device.pkcsreq(device.envelope(bad))])
    assert request.error is None and request.csr is not None, "unwrap does not check the CSR"
    result = ctx.issue_batch([IssueRequest(request=request, serial=9, not_before=NOW,
                                           not_after=NOW + HOUR)])[0]
    assert "rsa routines" in assert_error(result, CsrInvalid, openssl=True).reason


def test_issue_needs_exactly_one_csr_source(ctx, good, csr):
    for kwargs in ({}, {"request": good, "csr_der": csr}):
        with pytest.raises(InvalidArgument):
            ctx.issue_batch([IssueRequest(serial=9, not_before=NOW, not_after=NOW + HOUR,
                                          **kwargs)])


def _assert_key_copied(ctx: ScepContext, key: object, algorithm: object) -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "key copy")])
    request = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, algorithm)
    cert = ctx.issue(issue_item(request.public_bytes(serialization.Encoding.DER)))
    spki = asn1_x509.Certificate.load(cert)["tbs_certificate"]["subject_public_key_info"]
    assert spki.dump() == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_issue_copies_an_ec_public_key(ctx):
    """The named-curve parameter (an OID) reaches the certificate intact."""
    _assert_key_copied(ctx, ec.generate_private_key(ec.SECP384R1()), hashes.SHA256())


def test_issue_refuses_or_copies_an_ed25519_key(ctx):
    """Ed25519's AlgorithmIdentifier has no parameters at all; refusing the key is fine too."""
    key = ed25519.Ed25519PrivateKey.generate()
    try:
        _assert_key_copied(ctx, key, None)
    except CsrInvalid as exc:
        assert_error(exc, CsrInvalid)


@pytest.mark.parametrize("params", [
    pytest.param(B.integer(5), id="integer"),
    pytest.param(B.octets(b"x"), id="octets"),
    pytest.param(B.seq(B.integer(1)), id="sequence"),
    pytest.param(B.oid("1.2.3"), id="oid"),
    pytest.param(b"\x30\x80\x00\x00", id="indefinite-sequence"),
    pytest.param(b"", id="absent"),
])
def test_issue_csr_with_hostile_key_parameters(ctx, device, params):
    """rsaEncryption with parameters other than NULL, in a correctly signed CSR.

    Refusing the CSR is fine; issuing is fine too, but only with the key in its
    canonical form: the CA must not sign a malformed or non-DER SubjectPublicKeyInfo.
    """
    bits = asn1_x509.PublicKeyInfo.load(device.spki())["public_key"].dump()
    hostile = B.seq(B.seq(B.oid("1.2.840.113549.1.1.1"), params), bits)
    result = ctx.issue_batch([issue_item(device.csr_with_spki(hostile))])[0]
    if isinstance(result, bytes):
        spki = asn1_x509.Certificate.load(result)["tbs_certificate"]["subject_public_key_info"]
        assert spki.dump() == device.spki()
    else:
        assert isinstance(result, (CsrInvalid, InvalidArgument)), result
        assert result.reason


def _rsa_public_key_long_form(spki: bytes, where: str) -> bytes:
    """The RSAPublicKey of spki with one length in a longer form than DER allows."""
    rsa = asn1_x509.PublicKeyInfo.load(spki)["public_key"].parsed
    n, e = rsa["modulus"].dump(), rsa["public_exponent"].dump()
    if where == "exponent":
        e = bytes([0x02, 0x81, len(e) - 2]) + e[2:]  # 02 03 ... becomes 02 81 03 ...
    body = n + e
    if where == "sequence":
        return header(0x30, len(body), 4) + body
    return B.seq(body)


@pytest.mark.parametrize("where", ["sequence", "exponent"])
def test_issue_refuses_an_rsa_key_that_is_not_der(ctx, device, where):
    """A correctly signed CSR whose RSAPublicKey uses BER lengths: the CA must not sign it."""
    rsa_key = _rsa_public_key_long_form(device.spki(), where)
    spki = B.seq(B.alg_id("1.2.840.113549.1.1.1", B.NULL), B.tlv(0x03, b"\x00" + rsa_key))
    result = ctx.issue_batch([issue_item(device.csr_with_spki(spki))])[0]
    assert_error(result, CsrInvalid)
    # The same key in DER is issued as it is.
    (cert,) = ctx.issue_batch([issue_item(device.csr_with_spki(device.spki()))])
    spki_out = asn1_x509.Certificate.load(cert)["tbs_certificate"]["subject_public_key_info"]
    assert spki_out.dump() == device.spki()


@pytest.mark.parametrize("serial", [0, -1, -(2**64), 2**159, 2**160, 2**4096])
def test_issue_refuses_bad_serials(ctx, csr, serial):
    with pytest.raises(InvalidArgument) as info:
        ctx.issue_batch([issue_item(csr, serial=serial)])
    assert_error(info.value, InvalidArgument)


def test_issue_accepts_the_extreme_good_serials(ctx, csr):
    for serial in (1, 2**159 - 1):
        cert = asn1_x509.Certificate.load(ctx.issue(issue_item(csr, serial=serial)))
        assert cert.serial_number == serial


@pytest.mark.parametrize("serial", [b"", b"\x00", b"\x00" * 20, b"\x00" * 20 + b"\x01",
                                    b"\x01" * 21, b"\xff" * 64])
def test_issue_refuses_bad_serials_in_the_core(ctx, csr, serial):
    status, reason, cert = raw_issue(ctx, csr, serial, NOW, NOW + HOUR)
    assert (status, cert) == (InvalidArgument.status, b"") and reason


def test_issue_refuses_a_serial_that_encodes_in_21_octets(ctx, csr):
    status, _, _ = raw_issue(ctx, csr, b"\x80" + bytes(19), NOW, NOW + HOUR)
    assert status == InvalidArgument.status


@pytest.mark.parametrize("not_before,not_after", [
    (NOW, NOW), (NOW, NOW - 1), (NOW + HOUR, NOW), (2**62, -(2**62)), (0, -1),
])
def test_issue_refuses_an_empty_validity(ctx, csr, not_before, not_after):
    result = ctx.issue_batch([issue_item(csr, not_before=not_before, not_after=not_after)])[0]
    assert_error(result, InvalidArgument)


@pytest.mark.parametrize("not_before,not_after", [
    (0, 2**62), (-(2**62), NOW), (-(2**63), 2**63 - 1),
])
def test_issue_refuses_times_out_of_range(ctx, csr, not_before, not_after):
    result = ctx.issue_batch([issue_item(csr, not_before=not_before, not_after=not_after)])[0]
    assert_error(result, InvalidArgument, openssl=True)


@pytest.mark.parametrize("not_before,not_after", [
    (NOW, 253402300800), (-62167219201, NOW), (-99999999999, NOW),
])
def test_issue_refuses_times_beyond_four_digit_years(ctx, csr, not_before, not_after):
    result = ctx.issue_batch([issue_item(csr, not_before=not_before, not_after=not_after)])[0]
    assert_error(result, InvalidArgument)


def test_issue_accepts_the_first_four_digit_year(ctx, csr):
    cert = ctx.issue(issue_item(csr, not_before=-62167219200, not_after=NOW))
    validity = asn1_x509.Certificate.load(cert)["tbs_certificate"]["validity"]
    assert validity["not_before"].chosen.contents == b"00000101000000Z"


def test_issue_accepts_the_extreme_times_of_rfc_5280(ctx, csr):
    # 1950-01-01, the first UTCTime, and 99991231235959Z, "no well-defined expiration".
    cert = ctx.issue(issue_item(csr, not_before=-631152000, not_after=253402300799))
    validity = asn1_x509.Certificate.load(cert)["tbs_certificate"]["validity"]
    assert validity["not_before"].chosen.contents == b"500101000000Z"
    assert validity["not_after"].chosen.contents == b"99991231235959Z"


def _name(cn: str) -> bytes:
    return asn1_x509.Name.build({"common_name": cn}).dump()


def _extensions(*exts: dict[str, object]) -> bytes:
    return asn1_x509.Extensions(list(exts)).dump()


BASIC_CONSTRAINTS = {"extn_id": "basic_constraints", "critical": True,
                     "extn_value": {"ca": False}}
BAD_DER = {
    "garbage": b"garbage",
    "integer": B.integer(5),
    "seq-of-integer": B.seq(B.integer(1)),
    "2^62-length": header(0x30, 2**62, 8) + b"\x31\x00",
    "indefinite-unterminated": b"\x30\x80\x31\x00",
    "deep": b"\x30\x80" * 10_000 + b"\x00\x00" * 10_000,
}


@pytest.mark.parametrize("case", sorted(BAD_DER))
def test_issue_refuses_garbage_subject_and_extensions(ctx, csr, case):
    bad = BAD_DER[case]
    subject, extensions = ctx.issue_batch([issue_item(csr, subject_der=bad),
                                           issue_item(csr, extensions_der=bad)])
    assert_error(subject, InvalidArgument, openssl=True)
    assert_error(extensions, InvalidArgument, openssl=True)


def test_issue_refuses_trailing_or_truncated_subject_and_extensions(ctx, csr):
    name, exts = _name("hostile"), _extensions(BASIC_CONSTRAINTS)
    items = [issue_item(csr, subject_der=name + b"\x00"),
             issue_item(csr, extensions_der=exts + b"\x00")]
    items += [issue_item(csr, subject_der=name[:n]) for n in range(1, len(name))]
    items += [issue_item(csr, extensions_der=exts[:n]) for n in range(1, len(exts))]
    for result in ctx.issue_batch(items):
        assert_error(result, InvalidArgument)
    # The same, whole, are fine.
    cert = ctx.issue(issue_item(csr, subject_der=name, extensions_der=exts))
    tbs = asn1_x509.Certificate.load(cert)["tbs_certificate"]
    assert tbs["subject"].native == {"common_name": "hostile"}


@pytest.mark.parametrize("exts", [
    [BASIC_CONSTRAINTS, BASIC_CONSTRAINTS],
    [{"extn_id": "authority_key_identifier", "critical": False,
      "extn_value": {"key_identifier": b"\x02" * 20}}],
    [{"extn_id": "key_identifier", "critical": False, "extn_value": b"\x01" * 20}],
], ids=["duplicate", "authority-key-id", "subject-key-id"])
def test_issue_refuses_duplicate_extensions(ctx, csr, exts):
    result = ctx.issue_batch([issue_item(csr, extensions_der=_extensions(*exts))])[0]
    assert_error(result, InvalidArgument)


def test_issue_refuses_an_unknown_extension_twice(ctx, csr):
    """Duplicates are found by OID, also for extensions OpenSSL has no name for."""
    unknown = B.seq(B.oid("1.3.6.1.4.1.55555.1"), B.octets(b"\x05\x00"))
    other = B.seq(B.oid("1.3.6.1.4.1.55555.2"), B.octets(b"\x05\x00"))
    twice, distinct = ctx.issue_batch([issue_item(csr, extensions_der=B.seq(unknown, unknown)),
                                       issue_item(csr, extensions_der=B.seq(unknown, other))])
    assert_error(twice, InvalidArgument)
    assert isinstance(distinct, bytes), distinct


def test_issue_without_an_issuing_ca(ra, csr):
    ctx = ScepContext(recipients=[ra], signer=ra)
    assert_error(ctx.issue_batch([issue_item(csr)])[0], InvalidArgument)


# ---- wrap ------------------------------------------------------------------------


def _failed_requests(ctx: ScepContext, der_message: bytes) -> list[Unwrapped]:
    start, _ = signature_span(der_message)
    return ctx.unwrap_batch([b"", random.Random(4).randbytes(700), der_message[:-1],
                             flip(der_message, start + 5)])


@pytest.mark.parametrize("status,fail_info", [(0, None), (2, 2), (3, None)])
def test_wrap_refuses_requests_that_did_not_unwrap(ctx, der_message, ca, status, fail_info):
    requests = _failed_requests(ctx, der_message)
    assert all(r.error is not None and not r.authenticated for r in requests)
    specs = [CertRepSpec(request=r, status=status, fail_info=fail_info, certs=[ca[0]])
             for r in requests]
    for result in ctx.wrap_batch(specs):
        assert_error(result, InvalidArgument)


@pytest.mark.parametrize("status", [0, 2, 3])
def test_wrap_refuses_a_null_request(ctx, status):
    code, reason = raw_wrap_without_request(ctx, status)
    assert code == InvalidArgument.status and reason


INVALID_SPECS = {
    "failure-without-fail-info": {"status": 2},
    "failure-fail-info-5": {"status": 2, "fail_info": 5},
    "failure-fail-info-negative": {"status": 2, "fail_info": -2},
    "failure-fail-info-huge": {"status": 2, "fail_info": 2**31 - 1},
    "pending-with-fail-info": {"status": 3, "fail_info": 2},
    "pending-with-fail-info-0": {"status": 3, "fail_info": 0},
    "success-without-certs": {"status": 0},
    "status-1": {"status": 1},
    "status-4": {"status": 4},
    "status-7": {"status": 7},
    "status-negative": {"status": -1},
    "status-huge": {"status": 2**31 - 1},
}


@pytest.mark.parametrize("case", sorted(INVALID_SPECS))
def test_wrap_refuses_invalid_status_and_fail_info(ctx, good, case):
    result = ctx.wrap_batch([CertRepSpec(request=good, **INVALID_SPECS[case])])[0]
    assert_error(result, InvalidArgument)
    with pytest.raises(InvalidArgument):
        ctx.wrap(CertRepSpec(request=good, **INVALID_SPECS[case]))


def test_wrap_refuses_success_with_fail_info(ctx, good, ca):
    result = ctx.wrap_batch([CertRepSpec(request=good, status=0, fail_info=2, certs=[ca[0]])])
    assert_error(result[0], InvalidArgument)


def test_wrap_answers_an_undecryptable_request_only_with_failure(ctx, vectors, ca):
    (request,) = ctx.unwrap_batch([(vectors / "wrong-recipient-pkcsreq.der").read_bytes()])
    assert isinstance(request.error, DecryptFailed)
    success, failure, pending = ctx.wrap_batch([
        CertRepSpec(request=request, status=0, certs=[ca[0]]),
        CertRepSpec(request=request, status=2, fail_info=1, fail_info_text="cannot decrypt"),
        CertRepSpec(request=request, status=3),
    ])
    assert_error(success, InvalidArgument)
    assert isinstance(failure, bytes) and isinstance(pending, bytes)


def test_wrap_answers_a_refused_algorithm_only_with_failure(ctx, device, ca):
    (request,) = ctx.unwrap_batch([device.pkcsreq(digest="md5")])
    assert isinstance(request.error, AlgorithmRefused) and request.authenticated
    success, failure = ctx.wrap_batch([
        CertRepSpec(request=request, status=0, certs=[ca[0]]),
        CertRepSpec(request=request, status=2, fail_info=0),
    ])
    assert_error(success, InvalidArgument)
    assert isinstance(failure, bytes)


def test_wrap_refuses_oversized_certificates(ctx, good):
    huge = b"\x30" * (SCEP_MAX_INPUT + 1)
    (result,) = ctx.wrap_batch([CertRepSpec(request=good, status=0, certs=[huge])])
    assert_error(result, InvalidArgument)


def test_wrap_refuses_oversized_attributes_as_arguments(ctx, device, good):
    (long_tid,) = ctx.unwrap_batch([device.pkcsreq(transaction_id=B.printable("A" * 5000))])
    results = ctx.wrap_batch([
        CertRepSpec(request=good, status=2, fail_info=2, fail_info_text="x" * 5000),
        CertRepSpec(request=long_tid, status=3),
    ])
    for result in results:
        assert_error(result, InvalidArgument)


def test_wrap_survives_hostile_but_valid_specs(ctx, good, ca):
    """Odd yet allowed input gives a CertRep, never a crash."""
    results = ctx.wrap_batch([
        CertRepSpec(request=good, status=2, fail_info=4, fail_info_text="\u0000\uffff" * 100),
        CertRepSpec(request=good, status=2, fail_info=0, fail_info_text="x" * 4096),
        CertRepSpec(request=good, status=0, certs=[ca[0]] * 50, crls=[b"\x30\x00"]),
    ])
    assert all(isinstance(r, bytes) for r in results), results


# ---- certs-only ------------------------------------------------------------------


def test_certs_only_with_empty_inputs():
    for der in (certs_only([]), certs_only([], []), certs_only([b""], [b""])):
        sd = cms.ContentInfo.load(der, strict=True)["content"]
        assert sd["version"].native == "v1"
        assert sd["certificates"].native is None and sd["crls"].native is None
        assert len(sd["signer_infos"]) == 0 and len(sd["digest_algorithms"]) == 0
        assert sd["encap_content_info"]["content_type"].native == "data"
        assert cms.ContentInfo.load(der).dump(force=True) == der, "not DER"


def test_certs_only_refuses_oversized_input(ra):
    huge = b"\x30" * (SCEP_MAX_INPUT + 1)
    for certs, crls in (([huge], []), ([], [huge]), ([ra[0]], [huge])):
        with pytest.raises(InvalidArgument) as info:
            certs_only(certs, crls)
        assert_error(info.value, InvalidArgument)


def test_certs_only_keeps_sizes_at_length_boundaries(ra):
    """Lengths that change the number of length octets are encoded exactly."""
    for size in (1, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0x1000000):
        blob = bytes([size % 251]) * size
        der = certs_only([blob])
        sd = cms.ContentInfo.load(der, strict=True)["content"]
        assert sd["certificates"].contents == blob
        assert sd["signer_infos"].native == []
        assert der.endswith(blob + b"\x31\x00")
