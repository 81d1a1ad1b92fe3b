"""SCEP client messages (RFC 8894), built and read without any I/O.

This module builds the pkiMessages a client sends (PKCSReq 19, RenewalReq 17,
CertPoll 20, GetCert 21, GetCRL 22) and reads what a CA answers: the CertRep
(3), the GetCACert certificates and the GetCACaps keywords. It shares no code
with the server's native core, so a round trip between the two checks each
against an independent implementation.

Building: a device key (RSA, or EC with a separate RSA key for the exchange),
a PKCS#10 request, a self-signed signer certificate, the pkcsPKIEnvelope (CMS
EnvelopedData, RFC 5652 §6) for the RA certificate, and the outer SignedData
with the SCEP signed attributes (RFC 8894 §3.2.1).

Reading a CertRep: the signature is checked against the RA certificate the
client expects, and so are the messageDigest, messageType, transactionID and
recipientNonce; only then is the envelope opened with the key that signed the
request (RFC 8894 §3.3.2).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

from asn1crypto import algos, cms, core, parser
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import AttributeOID, NameOID

from scep_fast.client.errors import ResponseError, SignatureError
from scep_fast.protocol.enums import (
    OID_FAIL_INFO,
    OID_FAIL_INFO_TEXT,
    OID_MESSAGE_TYPE,
    OID_PKI_STATUS,
    OID_RECIPIENT_NONCE,
    OID_SENDER_NONCE,
    OID_TRANSACTION_ID,
    FailInfo,
    MessageType,
    PKIStatus,
)

__all__ = [
    "CACapabilities",
    "CACertificates",
    "CertRep",
    "CipherName",
    "DeviceKey",
    "DigestName",
    "KeyKind",
    "KeyTransportName",
    "PkiRequest",
    "build_cert_poll",
    "build_csr",
    "build_envelope",
    "build_get_cert",
    "build_get_crl",
    "build_pki_message",
    "build_pkcs_req",
    "build_renewal_req",
    "build_signer_certificate",
    "decrypt_envelope",
    "generate_key",
    "parse_ca_caps",
    "parse_ca_certs",
    "parse_cert_rep",
    "transaction_id_for",
]

DeviceKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

KeyKind = Literal["rsa2048", "rsa3072", "rsa4096", "ec-p256", "ec-p384"]
DigestName = Literal["sha1", "sha256", "sha512"]
CipherName = Literal["aes128", "aes192", "aes256", "des3"]
KeyTransportName = Literal["pkcs1v15", "oaep-sha256"]

# Digests a CertRep may be signed with (asn1crypto names); a request uses DigestName.
_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}

# Digests for X.509 signatures (CSR, signer certificate).
_X509_HASHES: dict[str, Callable[[], hashes.SHA256 | hashes.SHA512]] = {
    "sha256": hashes.SHA256,
    "sha512": hashes.SHA512,
}

# Our cipher names -> (asn1crypto name, key bytes, block bytes).
_CIPHERS: dict[str, tuple[str, int, int]] = {
    "aes128": ("aes128_cbc", 16, 16),
    "aes192": ("aes192_cbc", 24, 16),
    "aes256": ("aes256_cbc", 32, 16),
    "des3": ("tripledes_3key", 24, 8),
    # Read only: micromdm's scepserver answers with single DES whatever the
    # request used, so a client must be able to open it; it never sends it.
    "des": ("des", 8, 8),
}
_CIPHER_BY_ASN1 = {asn1_name: name for name, (asn1_name, _, _) in _CIPHERS.items()}

_OID_DATA = "1.2.840.113549.1.7.1"
_OID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
_OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"

# PrintableString's alphabet (X.680 §41.4): a challenge outside it goes as UTF8String.
_PRINTABLE = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 '()+,-./:=?"
)

# A device clock may be ahead of the CA's: the signer certificate starts earlier.
_CLOCK_SKEW = datetime.timedelta(minutes=10)


def _x509_digest(digest: DigestName) -> DigestName:
    """The digest for the CSR and signer certificate signatures.

    Modern libraries refuse to make SHA-1 X.509 signatures; the CMS layer
    may still use SHA-1 for CAs that know nothing better, the CSR does not.
    """
    return "sha256" if digest == "sha1" else digest


@contextmanager
def _reading(what: str) -> Iterator[None]:
    """Turns a parser's complaint about hostile input into a ResponseError.

    asn1crypto parses lazily, so malformed bytes can raise from any field
    access, not only from ``load``; everything that reads a reply runs in here.
    """
    try:
        yield
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise ResponseError(f"{what} is malformed: {exc}") from exc


def _check_choice(value: str, allowed: Any, what: str) -> None:
    names = get_args(allowed)
    if value not in names:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(names)}")


# --------------------------------------------------------------------- keys


def generate_key(kind: KeyKind = "rsa2048") -> DeviceKey:
    """A new device key: RSA (2048 by default) or EC on P-256 or P-384."""
    _check_choice(kind, KeyKind, "key kind")
    if kind.startswith("rsa"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(kind[3:]))
    curve: ec.EllipticCurve = ec.SECP256R1() if kind == "ec-p256" else ec.SECP384R1()
    return ec.generate_private_key(curve)


def _spki(key: PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def transaction_id_for(key: PublicKey) -> str:
    """The transactionID of a request for this key: hex SHA-256 of its SubjectPublicKeyInfo.

    RFC 8894 §3.2.1.1 asks for a value unique to the key being certified; a
    hash of the public key is the usual choice and stays the same when the
    request is sent again, so a CA can recognise a retry.
    """
    return hashlib.sha256(_spki(key)).hexdigest()


def _same_key(a: object, b: PublicKey) -> bool:
    if not isinstance(a, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return False
    return _spki(a) == _spki(b)


# ---------------------------------------------------------- CSR and signer


def _general_name(text: str) -> x509.GeneralName:
    kind, _, value = text.partition(":")
    if kind == "uri" and value:
        return x509.UniformResourceIdentifier(value)
    if kind == "email" and value:
        return x509.RFC822Name(value)
    if kind == "ip" and value:
        return x509.IPAddress(ipaddress.ip_address(value))
    return x509.DNSName(text)


def build_csr(
    key: DeviceKey,
    cn: str,
    *,
    sans: Sequence[str] = (),
    challenge: str | None = None,
    digest: DigestName = "sha256",
) -> bytes:
    """A DER PKCS#10 request for ``key`` with subject CN, SANs and a challengePassword.

    A SAN is a DNS name unless prefixed ``uri:``, ``email:`` or ``ip:`` (Intune's
    strong mapping, say: ``uri:tag:microsoft.com,2022-09-14:sid:S-1-5-...``).
    """
    _check_choice(digest, DigestName, "digest")
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(name) for name in sans]), critical=False
        )
    if challenge is not None:
        # RFC 2985 §5.4.1 allows a DirectoryString; PrintableString is what
        # most CAs expect, so UTF8String is kept for challenges that need it.
        tag = _ASN1Type.PrintableString if set(challenge) <= _PRINTABLE else _ASN1Type.UTF8String
        builder = builder.add_attribute(
            AttributeOID.CHALLENGE_PASSWORD, challenge.encode("utf-8"), _tag=tag
        )
    csr = builder.sign(key, _X509_HASHES[_x509_digest(digest)]())
    return csr.public_bytes(serialization.Encoding.DER)


def build_signer_certificate(
    key: rsa.RSAPrivateKey,
    cn: str,
    *,
    digest: DigestName = "sha256",
    lifetime: datetime.timedelta = datetime.timedelta(days=1),
) -> x509.Certificate:
    """The self-signed certificate that signs a PKCSReq (RFC 8894 §2.3).

    The CA encrypts its CertRep to this certificate's key, so the key must be
    able to decrypt: it is RSA.
    """
    _check_choice(digest, DigestName, "digest")
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + lifetime)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, _X509_HASHES[_x509_digest(digest)]())
    )


# ------------------------------------------------------------- small DER


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def _attribute(oid: str, value_der: bytes) -> bytes:
    """One Attribute: SEQUENCE { type OID, values SET OF { value } }."""
    return _der(0x30, core.ObjectIdentifier(oid).dump() + _der(0x31, value_der))


def _set_of(elements: Iterable[bytes]) -> bytes:
    """A DER SET OF: the encodings sorted as octet strings (X.690 §11.6)."""
    return _der(0x31, b"".join(sorted(elements)))


def _asn1_cert(cert: x509.Certificate) -> Any:
    return asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))


def _issuer_and_serial(cert: x509.Certificate) -> Any:
    # The issuer Name is copied as encoded in the certificate: a re-encoded
    # Name may differ in bytes and then match nothing on the other side.
    tbs = _asn1_cert(cert)["tbs_certificate"]
    return cms.IssuerAndSerialNumber(
        {"issuer": tbs["issuer"], "serial_number": tbs["serial_number"]}
    )


def _ski(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return None


def _matches_identifier(identifier: Any, cert: x509.Certificate) -> bool:
    """Whether a SignerIdentifier or RecipientIdentifier names this certificate."""
    if identifier.name == "issuer_and_serial_number":
        ias = identifier.chosen
        return bool(
            ias["serial_number"].native == cert.serial_number
            and ias["issuer"].dump() == _asn1_cert(cert)["tbs_certificate"]["issuer"].dump()
        )
    ski = _ski(cert)
    return ski is not None and hmac.compare_digest(bytes(identifier.chosen.native), ski)


# --------------------------------------------------------------- envelope


def _symmetric(cipher: str, key: bytes) -> algorithms.AES | TripleDES:
    if cipher.startswith("aes"):
        return algorithms.AES(key)
    if cipher == "des":
        # Single DES is 3DES with one key three times (K1 = K2 = K3).
        return TripleDES(key * 3)
    return TripleDES(key)


def build_envelope(
    content: bytes,
    recipient: x509.Certificate,
    *,
    cipher: CipherName = "aes128",
    key_transport: KeyTransportName = "pkcs1v15",
) -> bytes:
    """The pkcsPKIEnvelope: a DER CMS EnvelopedData of ``content`` for ``recipient``.

    One KeyTransRecipientInfo names the recipient by issuerAndSerialNumber
    (RFC 5652 §6.2.1), the key travelling by RSA PKCS#1 v1.5 or RSAES-OAEP
    with SHA-256 and MGF1-SHA-256 (RFC 8017 §7.1, parameters per RFC 4055).
    """
    _check_choice(cipher, CipherName, "cipher")
    _check_choice(key_transport, KeyTransportName, "key transport")
    public = recipient.public_key()
    if not isinstance(public, rsa.RSAPublicKey):
        raise ValueError("the recipient certificate has no RSA key to encrypt the request to")
    asn1_name, key_len, block = _CIPHERS[cipher]
    cek = os.urandom(key_len)
    iv = os.urandom(block)
    padder = padding.PKCS7(block * 8).padder()
    encryptor = Cipher(_symmetric(cipher, cek), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padder.update(content) + padder.finalize()) + encryptor.finalize()

    if key_transport == "pkcs1v15":
        wrapped = public.encrypt(cek, asym_padding.PKCS1v15())
        key_alg = cms.KeyEncryptionAlgorithm(
            {"algorithm": "rsaes_pkcs1v15", "parameters": core.Null()}
        )
    else:
        wrapped = public.encrypt(
            cek,
            asym_padding.OAEP(
                mgf=asym_padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None
            ),
        )
        key_alg = cms.KeyEncryptionAlgorithm(
            {
                "algorithm": "rsaes_oaep",
                "parameters": algos.RSAESOAEPParams(
                    {
                        "hash_algorithm": {"algorithm": "sha256"},
                        "mask_gen_algorithm": {
                            "algorithm": "mgf1",
                            "parameters": {"algorithm": "sha256"},
                        },
                    }
                ),
            }
        )
    ktri = cms.KeyTransRecipientInfo(
        {
            "version": "v0",
            "rid": cms.RecipientIdentifier(
                {"issuer_and_serial_number": _issuer_and_serial(recipient)}
            ),
            "key_encryption_algorithm": key_alg,
            "encrypted_key": wrapped,
        }
    )
    enveloped = cms.EnvelopedData(
        {
            "version": "v0",
            "recipient_infos": [cms.RecipientInfo({"ktri": ktri})],
            "encrypted_content_info": {
                "content_type": "data",
                "content_encryption_algorithm": {
                    "algorithm": asn1_name,
                    "parameters": core.OctetString(iv),
                },
                "encrypted_content": ciphertext,
            },
        }
    )
    return bytes(cms.ContentInfo({"content_type": "enveloped_data", "content": enveloped}).dump())


def _unwrap_key(ktri: Any, key: rsa.RSAPrivateKey) -> bytes:
    alg = ktri["key_encryption_algorithm"]
    name = alg["algorithm"].native
    encrypted = bytes(ktri["encrypted_key"].native)
    if name == "rsaes_pkcs1v15":
        return key.decrypt(encrypted, asym_padding.PKCS1v15())
    if name == "rsaes_oaep":
        params = alg["parameters"]
        hash_name = params["hash_algorithm"]["algorithm"].native
        mgf = params["mask_gen_algorithm"]
        mgf_hash = mgf["parameters"]["algorithm"].native
        label = params["p_source_algorithm"]["parameters"].native or None
        if mgf["algorithm"].native != "mgf1" or hash_name not in _HASHES or mgf_hash not in _HASHES:
            raise ResponseError(f"unsupported RSAES-OAEP parameters ({hash_name}, {mgf_hash})")
        return key.decrypt(
            encrypted,
            asym_padding.OAEP(
                mgf=asym_padding.MGF1(_HASHES[mgf_hash]()),
                algorithm=_HASHES[hash_name](),
                label=label,
            ),
        )
    raise ResponseError(f"unsupported key transport {name!r} in the reply envelope")


def _elements(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """The (class, constructed, tag, contents) of each BER element in ``data``."""
    out = []
    pos = 0
    while pos < len(data):
        class_, method, tag, header, contents, trailer = parser.parse(data[pos:], strict=False)
        out.append((class_, method, tag, contents))
        pos += len(header) + len(contents) + len(trailer)
    return out


def _octets_of(method: int, contents: bytes) -> bytes:
    """The value of a primitive or constructed (BER) OCTET STRING, from its contents."""
    if not method:
        return contents
    return b"".join(_octets_of(m, c) for _, m, tag, c in _elements(contents) if tag == 4)


def _encrypted_content(eci: Any) -> bytes:
    """encryptedContent [0] of an EncryptedContentInfo, primitive or constructed.

    Quirk(micromdm): Go's pkcs7 encodes it as a definite-length constructed
    [0] holding an OCTET STRING, which BER allows but asn1crypto only reads
    in indefinite-length form; the element is therefore read by hand.
    """
    for class_, method, tag, contents in _elements(bytes(eci.contents)):
        if class_ == 2 and tag == 0:
            return _octets_of(method, contents)
    return b""


def decrypt_envelope(
    der: bytes, key: rsa.RSAPrivateKey, cert: x509.Certificate | None = None
) -> tuple[bytes, str]:
    """Opens a CMS EnvelopedData with ``key``: returns (plaintext, cipher name).

    When ``cert`` is given, a RecipientInfo that names it is tried first; the
    others are tried after it, since servers do not always name the recipient
    the way the client would. The cipher name is one of aes128, aes192,
    aes256, des3 or des.
    """
    with _reading("the reply envelope"):
        return _decrypt_envelope(der, key, cert)


def _decrypt_envelope(
    der: bytes, key: rsa.RSAPrivateKey, cert: x509.Certificate | None
) -> tuple[bytes, str]:
    try:
        info = cms.ContentInfo.load(der, strict=True)
        if info["content_type"].native != "enveloped_data":
            raise ResponseError(f"expected an EnvelopedData, got {info['content_type'].native}")
        enveloped = info["content"]
        ktris = [ri.chosen for ri in enveloped["recipient_infos"] if ri.name == "ktri"]
        eci = enveloped["encrypted_content_info"]
        alg = eci["content_encryption_algorithm"]
        asn1_name = alg["algorithm"].native
        iv = alg["parameters"].native
        ciphertext = _encrypted_content(eci)
    except (ValueError, TypeError, KeyError) as exc:
        raise ResponseError(f"the reply envelope is not a valid EnvelopedData: {exc}") from exc
    cipher = _CIPHER_BY_ASN1.get(asn1_name)
    if cipher is None:
        raise ResponseError(f"unsupported content cipher {asn1_name!r} in the reply envelope")
    _, key_len, block = _CIPHERS[cipher]
    if not isinstance(iv, bytes) or len(iv) != block:
        raise ResponseError(f"the {cipher} IV of the reply envelope is not {block} bytes")
    if not isinstance(ciphertext, bytes) or not ciphertext or len(ciphertext) % block:
        raise ResponseError("the reply envelope has no whole-block encrypted content")
    if not ktris:
        raise ResponseError("the reply envelope has no key transport RecipientInfo")
    if cert is not None:
        ktris.sort(key=lambda ktri: not _matches_identifier(ktri["rid"], cert))
    # RSA PKCS#1 v1.5 decryption with the wrong key does not always fail:
    # OpenSSL's implicit rejection returns random bytes instead. A key of the
    # wrong length or a plaintext with bad padding therefore counts as "not
    # ours", and the next RecipientInfo is tried.
    for ktri in ktris:
        try:
            cek = _unwrap_key(ktri, key)
        except ValueError:
            continue
        if len(cek) != key_len:
            continue
        decryptor = Cipher(_symmetric(cipher, cek), modes.CBC(iv)).decryptor()
        padded = decryptor.update(ciphertext) + decryptor.finalize()
        unpadder = padding.PKCS7(block * 8).unpadder()
        try:
            return unpadder.update(padded) + unpadder.finalize(), cipher
        except ValueError:
            continue
    raise ResponseError("no RecipientInfo of the reply envelope opens with the device key")


# -------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class PkiRequest:
    """One pkiMessage ready to send, with what is needed to read its answer."""

    message: bytes  # DER SignedData: the PKIOperation body
    message_type: MessageType
    transaction_id: str
    sender_nonce: bytes
    digest: DigestName
    cipher: CipherName
    key_transport: KeyTransportName
    recipient: x509.Certificate  # the RA certificate the envelope is for
    signer_key: rsa.RSAPrivateKey  # opens the CertRep's envelope
    signer_cert: x509.Certificate
    # The key being certified (PKCSReq, RenewalReq, CertPoll): the issued
    # certificate must carry its public half.
    device_key: DeviceKey | None = None
    csr: bytes = b""  # the DER CSR, when the request carries one


def build_pki_message(
    message_type: MessageType,
    content: bytes,
    *,
    recipient: x509.Certificate,
    signer_key: rsa.RSAPrivateKey,
    signer_cert: x509.Certificate,
    transaction_id: str,
    digest: DigestName = "sha256",
    cipher: CipherName = "aes128",
    key_transport: KeyTransportName = "pkcs1v15",
    sender_nonce: bytes | None = None,
    device_key: DeviceKey | None = None,
    csr: bytes = b"",
) -> PkiRequest:
    """Envelopes ``content`` for the RA and signs it: the pkiMessage of RFC 8894 §3.2.

    The SignedData (version 1) carries the signer certificate and one
    SignerInfo whose signed attributes are contentType, messageDigest,
    messageType, transactionID and senderNonce, in DER order.
    """
    _check_choice(digest, DigestName, "digest")
    if not isinstance(signer_key, rsa.RSAPrivateKey):
        raise ValueError("the signer key must be RSA: the CA encrypts its reply to it")
    if not _same_key(signer_cert.public_key(), signer_key.public_key()):
        raise ValueError("the signer certificate does not carry the signer key")
    if not transaction_id or not transaction_id.isascii():
        raise ValueError("the transactionID must be a non-empty ASCII string")
    nonce = os.urandom(16) if sender_nonce is None else sender_nonce
    if not 8 <= len(nonce) <= 64:
        raise ValueError("the senderNonce must be 8 to 64 bytes")
    envelope = build_envelope(content, recipient, cipher=cipher, key_transport=key_transport)

    hasher = hashes.Hash(_HASHES[digest]())
    hasher.update(envelope)
    attrs_der = _set_of(
        [
            _attribute(_OID_CONTENT_TYPE, core.ObjectIdentifier(_OID_DATA).dump()),
            _attribute(_OID_MESSAGE_DIGEST, core.OctetString(hasher.finalize()).dump()),
            _attribute(OID_MESSAGE_TYPE, core.PrintableString(str(int(message_type))).dump()),
            _attribute(OID_TRANSACTION_ID, core.PrintableString(transaction_id).dump()),
            _attribute(OID_SENDER_NONCE, core.OctetString(nonce).dump()),
        ]
    )
    # The signature covers the DER of the SET OF attributes with its
    # universal tag, not the [0] IMPLICIT form it has in the SignerInfo
    # (RFC 5652 §5.4).
    signature = signer_key.sign(attrs_der, asym_padding.PKCS1v15(), _HASHES[digest]())
    signer_info = cms.SignerInfo(
        {
            "version": "v1",
            "sid": cms.SignerIdentifier(
                {"issuer_and_serial_number": _issuer_and_serial(signer_cert)}
            ),
            "digest_algorithm": {"algorithm": digest},
            "signed_attrs": cms.CMSAttributes.load(attrs_der),
            "signature_algorithm": {"algorithm": "rsassa_pkcs1v15", "parameters": core.Null()},
            "signature": signature,
        }
    )
    signed = cms.SignedData(
        {
            "version": "v1",
            "digest_algorithms": [{"algorithm": digest}],
            "encap_content_info": {"content_type": "data", "content": envelope},
            "certificates": [_asn1_cert(signer_cert)],
            "signer_infos": [signer_info],
        }
    )
    message = bytes(cms.ContentInfo({"content_type": "signed_data", "content": signed}).dump())
    return PkiRequest(
        message=message,
        message_type=MessageType(message_type),
        transaction_id=transaction_id,
        sender_nonce=nonce,
        digest=digest,
        cipher=cipher,
        key_transport=key_transport,
        recipient=recipient,
        signer_key=signer_key,
        signer_cert=signer_cert,
        device_key=device_key,
        csr=csr,
    )


def build_pkcs_req(
    recipient: x509.Certificate,
    *,
    cn: str,
    challenge: str | None = None,
    key: DeviceKey | None = None,
    sans: Sequence[str] = (),
    digest: DigestName = "sha256",
    cipher: CipherName = "aes128",
    key_transport: KeyTransportName = "pkcs1v15",
    sender_nonce: bytes | None = None,
) -> PkiRequest:
    """A PKCSReq (19) for a new or given device key, signed by a self-signed certificate.

    An RSA device key signs the request itself. An EC key cannot receive the
    CertRep's envelope (RSA key transport), so a throw-away RSA key signs the
    request and receives the reply, while the CSR carries the EC key
    (RFC 8894 §2.3: the requester uses a separate key when the key being
    certified cannot encrypt).
    """
    device_key = generate_key() if key is None else key
    if isinstance(device_key, rsa.RSAPrivateKey):
        signer_key = device_key
    else:
        signer_key = cast(rsa.RSAPrivateKey, generate_key("rsa2048"))
    csr = build_csr(
        device_key, cn, sans=sans, challenge=challenge, digest=_x509_digest(digest)
    )
    signer_cert = build_signer_certificate(signer_key, cn, digest=_x509_digest(digest))
    return build_pki_message(
        MessageType.PKCS_REQ,
        csr,
        recipient=recipient,
        signer_key=signer_key,
        signer_cert=signer_cert,
        transaction_id=transaction_id_for(device_key.public_key()),
        digest=digest,
        cipher=cipher,
        key_transport=key_transport,
        sender_nonce=sender_nonce,
        device_key=device_key,
        csr=csr,
    )


def build_renewal_req(
    recipient: x509.Certificate,
    *,
    old_cert: x509.Certificate,
    old_key: rsa.RSAPrivateKey,
    cn: str,
    key: DeviceKey | None = None,
    sans: Sequence[str] = (),
    challenge: str | None = None,
    digest: DigestName = "sha256",
    cipher: CipherName = "aes128",
    key_transport: KeyTransportName = "pkcs1v15",
) -> PkiRequest:
    """A RenewalReq (17): a CSR for a new key, signed with the certificate being renewed."""
    device_key = generate_key() if key is None else key
    csr = build_csr(
        device_key, cn, sans=sans, challenge=challenge, digest=_x509_digest(digest)
    )
    return build_pki_message(
        MessageType.RENEWAL_REQ,
        csr,
        recipient=recipient,
        signer_key=old_key,
        signer_cert=old_cert,
        transaction_id=transaction_id_for(device_key.public_key()),
        digest=digest,
        cipher=cipher,
        key_transport=key_transport,
        device_key=device_key,
        csr=csr,
    )


def build_cert_poll(original: PkiRequest, ca_cert: x509.Certificate) -> PkiRequest:
    """A CertPoll (20) for a PENDING request: same transactionID and signer, fresh nonce.

    Its content is IssuerAndSubject (RFC 8894 §3.3.3): the CA's name and the
    subject of the original CSR.
    """
    if not original.csr:
        raise ValueError("only a request that carried a CSR can be polled")
    subject = x509.load_der_x509_csr(original.csr).subject
    content = _der(0x30, ca_cert.subject.public_bytes() + subject.public_bytes())
    return build_pki_message(
        MessageType.CERT_POLL,
        content,
        recipient=original.recipient,
        signer_key=original.signer_key,
        signer_cert=original.signer_cert,
        transaction_id=original.transaction_id,
        digest=original.digest,
        cipher=original.cipher,
        key_transport=original.key_transport,
        device_key=original.device_key,
        csr=original.csr,
    )


def _issuer_and_serial_content(issuer: x509.Name, serial: int) -> bytes:
    return _der(0x30, issuer.public_bytes() + core.Integer(serial).dump())


def _build_issuer_serial_query(
    message_type: MessageType,
    recipient: x509.Certificate,
    issuer: x509.Name,
    serial: int,
    signer_key: rsa.RSAPrivateKey,
    signer_cert: x509.Certificate,
    digest: DigestName,
    cipher: CipherName,
    key_transport: KeyTransportName,
) -> PkiRequest:
    content = _issuer_and_serial_content(issuer, serial)
    return build_pki_message(
        message_type,
        content,
        recipient=recipient,
        signer_key=signer_key,
        signer_cert=signer_cert,
        transaction_id=hashlib.sha256(content).hexdigest(),
        digest=digest,
        cipher=cipher,
        key_transport=key_transport,
    )


def build_get_cert(
    recipient: x509.Certificate,
    *,
    issuer: x509.Name,
    serial: int,
    signer_key: rsa.RSAPrivateKey,
    signer_cert: x509.Certificate,
    digest: DigestName = "sha256",
    cipher: CipherName = "aes128",
    key_transport: KeyTransportName = "pkcs1v15",
) -> PkiRequest:
    """A GetCert (21) for the certificate ``issuer`` + ``serial`` (RFC 8894 §3.3.4)."""
    return _build_issuer_serial_query(MessageType.GET_CERT, recipient, issuer, serial,
                                      signer_key, signer_cert, digest, cipher, key_transport)


def build_get_crl(
    recipient: x509.Certificate,
    *,
    issuer: x509.Name,
    serial: int,
    signer_key: rsa.RSAPrivateKey,
    signer_cert: x509.Certificate,
    digest: DigestName = "sha256",
    cipher: CipherName = "aes128",
    key_transport: KeyTransportName = "pkcs1v15",
) -> PkiRequest:
    """A GetCRL (22) for the CRL covering ``issuer`` + ``serial`` (RFC 8894 §3.3.5)."""
    return _build_issuer_serial_query(MessageType.GET_CRL, recipient, issuer, serial,
                                      signer_key, signer_cert, digest, cipher, key_transport)


# ----------------------------------------------------------------- CertRep


@dataclass(frozen=True, slots=True)
class CertRep:
    """A verified CertRep (RFC 8894 §3.3.2)."""

    status: PKIStatus
    fail_info: FailInfo | None
    fail_info_text: str | None
    transaction_id: str
    sender_nonce: bytes
    recipient_nonce: bytes
    digest: str  # what the CA signed with: sha1, sha256, ...
    cipher: str | None  # the reply envelope's cipher on SUCCESS: aes128, ..., des3, des
    signer: x509.Certificate  # the RA certificate that signed it
    certificates: tuple[x509.Certificate, ...] = ()  # the issued certificate first
    crls: tuple[x509.CertificateRevocationList, ...] = ()


def _signed_attributes(signer_info: Any) -> dict[str, bytes]:
    """Signed attributes by OID, each the DER of its single value."""
    attrs: dict[str, bytes] = {}
    for attr in signer_info["signed_attrs"]:
        oid = str(attr["type"].dotted)
        values = list(attr["values"])
        if oid in attrs:
            raise ResponseError(f"the CertRep repeats the signed attribute {oid}")
        if len(values) != 1:
            raise ResponseError(f"the CertRep's signed attribute {oid} has {len(values)} values")
        attrs[oid] = bytes(values[0].dump())
    return attrs


def _string_value(raw: bytes, name: str) -> str:
    value = core.load(raw)
    if not isinstance(value, core.PrintableString | core.UTF8String | core.IA5String):
        raise ResponseError(f"the CertRep's {name} is not a string")
    return str(value.native)


def _octets_value(raw: bytes, name: str) -> bytes:
    value = core.load(raw)
    if not isinstance(value, core.OctetString):
        raise ResponseError(f"the CertRep's {name} is not an OCTET STRING")
    return bytes(value.native)


def _verify_signer_info(signer_info: Any, cert: x509.Certificate, hash_name: str) -> None:
    signed = bytearray(signer_info["signed_attrs"].dump())
    signed[0] = 0x31  # back from [0] IMPLICIT to SET OF (RFC 5652 §5.4)
    signature = bytes(signer_info["signature"].native)
    sig_alg = signer_info["signature_algorithm"]
    public = cert.public_key()
    hash_algorithm = _HASHES[hash_name]()
    try:
        if isinstance(public, rsa.RSAPublicKey):
            if sig_alg.signature_algo == "rsassa_pss":
                params = sig_alg["parameters"]
                pss_hash = _HASHES[params["hash_algorithm"]["algorithm"].native]()
                mgf_hash = _HASHES[params["mask_gen_algorithm"]["parameters"]["algorithm"].native]()
                public.verify(
                    signature,
                    bytes(signed),
                    asym_padding.PSS(
                        mgf=asym_padding.MGF1(mgf_hash), salt_length=params["salt_length"].native
                    ),
                    pss_hash,
                )
            else:
                public.verify(signature, bytes(signed), asym_padding.PKCS1v15(), hash_algorithm)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, bytes(signed), ec.ECDSA(hash_algorithm))
        else:
            raise SignatureError("the RA certificate's key type cannot verify a CertRep")
    except InvalidSignature as exc:
        raise SignatureError("the CertRep's signature does not verify with the RA key") from exc
    except (KeyError, ValueError) as exc:
        raise SignatureError(f"the CertRep's signature algorithm is not usable: {exc}") from exc


def _degenerate_contents(
    der: bytes,
) -> tuple[list[x509.Certificate], list[x509.CertificateRevocationList]]:
    """Certificates and CRLs of a certs-only SignedData (RFC 8894 §3.4), as encoded."""
    try:
        info = cms.ContentInfo.load(der, strict=True)
        if info["content_type"].native != "signed_data":
            raise ResponseError("the certificates are not in a SignedData")
        signed = info["content"]
        certs = [
            x509.load_der_x509_certificate(choice.chosen.dump())
            for choice in (signed["certificates"] or [])
            if choice.name == "certificate"
        ]
        crls = [
            x509.load_der_x509_crl(choice.chosen.dump())
            for choice in (signed["crls"] or [])
            if choice.name == "crl"
        ]
    except (ValueError, TypeError, KeyError) as exc:
        raise ResponseError(f"the certs-only SignedData is malformed: {exc}") from exc
    return certs, crls


def _leaf_first(
    certs: list[x509.Certificate], key: PublicKey | None
) -> tuple[x509.Certificate, ...]:
    """Orders certificates so that the issued one comes first.

    Servers are asked to put it first, but some do not; the certificate for
    the key we asked about is the issued one, whatever its position.
    """
    if key is None:
        return tuple(certs)
    matching = [c for c in certs if _same_key(c.public_key(), key)]
    return tuple(matching + [c for c in certs if c not in matching])


def parse_cert_rep(
    der: bytes,
    request: PkiRequest,
    *,
    ra_certs: Sequence[x509.Certificate] | None = None,
) -> CertRep:
    """Verifies and reads the CertRep answering ``request``.

    The reply must be signed by one of ``ra_certs`` (by default the
    certificate the request was encrypted to), its messageDigest must match
    its content, and messageType, transactionID and recipientNonce must be
    3, ours and our senderNonce (RFC 8894 §3.3.2). On SUCCESS the envelope is
    opened with the request's signer key and its certificates are returned,
    the issued one first. Raises ResponseError or SignatureError otherwise.
    """
    with _reading("the CertRep"):
        return _parse_cert_rep(der, request, ra_certs)


def _parse_cert_rep(
    der: bytes, request: PkiRequest, ra_certs: Sequence[x509.Certificate] | None
) -> CertRep:
    expected = list(ra_certs) if ra_certs is not None else [request.recipient]
    try:
        info = cms.ContentInfo.load(der, strict=True)
        if info["content_type"].native != "signed_data":
            raise ResponseError(f"the CertRep is a {info['content_type'].native}, not SignedData")
        signed = info["content"]
        signer_infos = list(signed["signer_infos"])
        if len(signer_infos) != 1:
            raise ResponseError(f"the CertRep has {len(signer_infos)} SignerInfos, not one")
        signer_info = signer_infos[0]
        if not signer_info["signed_attrs"].native:
            raise ResponseError("the CertRep has no signed attributes")
        encap = signed["encap_content_info"]
        econtent = encap["content"]
        content = b"" if econtent.native is None else bytes(econtent.native)
        encap_type = encap["content_type"].dotted
        hash_name = signer_info["digest_algorithm"]["algorithm"].native
        attrs = _signed_attributes(signer_info)
        sid = signer_info["sid"]
    except ResponseError:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        raise ResponseError(f"the CertRep is not a valid CMS SignedData: {exc}") from exc
    if encap_type != _OID_DATA:
        raise ResponseError(f"the CertRep's content type is {encap_type}, not id-data")
    if hash_name not in _HASHES:
        raise ResponseError(f"the CertRep is signed with an unsupported digest {hash_name!r}")

    signer = next((cert for cert in expected if _matches_identifier(sid, cert)), None)
    if signer is None:
        raise SignatureError("the CertRep is not signed by the RA certificate we expect")
    _verify_signer_info(signer_info, signer, hash_name)

    # With the signature good, the attributes can be trusted; the content is
    # bound to them by messageDigest (RFC 5652 §11.2).
    if _OID_CONTENT_TYPE not in attrs or _OID_MESSAGE_DIGEST not in attrs:
        raise SignatureError("the CertRep lacks the contentType or messageDigest attribute")
    if core.load(attrs[_OID_CONTENT_TYPE]).dotted != _OID_DATA:
        raise SignatureError("the CertRep's contentType attribute is not id-data")
    hasher = hashes.Hash(_HASHES[hash_name]())
    hasher.update(content)
    digest_attr = _octets_value(attrs[_OID_MESSAGE_DIGEST], "messageDigest")
    if not hmac.compare_digest(digest_attr, hasher.finalize()):
        raise SignatureError("the CertRep's messageDigest does not match its content")

    for oid, name in (
        (OID_MESSAGE_TYPE, "messageType"),
        (OID_PKI_STATUS, "pkiStatus"),
        (OID_TRANSACTION_ID, "transactionID"),
        (OID_RECIPIENT_NONCE, "recipientNonce"),
        (OID_SENDER_NONCE, "senderNonce"),
    ):
        if oid not in attrs:
            raise ResponseError(f"the CertRep has no {name} attribute")
    message_type = _string_value(attrs[OID_MESSAGE_TYPE], "messageType")
    if message_type != str(int(MessageType.CERT_REP)):
        raise ResponseError(f"the reply's messageType is {message_type!r}, not CertRep (3)")
    transaction_id = _string_value(attrs[OID_TRANSACTION_ID], "transactionID")
    if transaction_id != request.transaction_id:
        raise ResponseError("the CertRep's transactionID is not the one we sent")
    recipient_nonce = _octets_value(attrs[OID_RECIPIENT_NONCE], "recipientNonce")
    if not hmac.compare_digest(recipient_nonce, request.sender_nonce):
        raise ResponseError("the CertRep's recipientNonce is not our senderNonce")
    sender_nonce = _octets_value(attrs[OID_SENDER_NONCE], "senderNonce")
    if not sender_nonce:
        raise ResponseError("the CertRep's senderNonce is empty")
    status_text = _string_value(attrs[OID_PKI_STATUS], "pkiStatus")
    try:
        status = PKIStatus(int(status_text))
    except ValueError as exc:
        raise ResponseError(f"the CertRep's pkiStatus {status_text!r} is unknown") from exc

    fail_info: FailInfo | None = None
    fail_info_text: str | None = None
    if OID_FAIL_INFO_TEXT in attrs:
        fail_info_text = _string_value(attrs[OID_FAIL_INFO_TEXT], "failInfoText")
    if status is PKIStatus.FAILURE:
        if OID_FAIL_INFO in attrs:
            text = _string_value(attrs[OID_FAIL_INFO], "failInfo")
            try:
                fail_info = FailInfo(int(text))
            except ValueError as exc:
                raise ResponseError(f"the CertRep's failInfo {text!r} is unknown") from exc
        return CertRep(
            status=status,
            fail_info=fail_info,
            fail_info_text=fail_info_text,
            transaction_id=transaction_id,
            sender_nonce=sender_nonce,
            recipient_nonce=recipient_nonce,
            digest=hash_name,
            cipher=None,
            signer=signer,
        )
    if status is PKIStatus.PENDING:
        return CertRep(
            status=status,
            fail_info=None,
            fail_info_text=fail_info_text,
            transaction_id=transaction_id,
            sender_nonce=sender_nonce,
            recipient_nonce=recipient_nonce,
            digest=hash_name,
            cipher=None,
            signer=signer,
        )

    if not content:
        raise ResponseError("the CertRep says SUCCESS but carries no envelope")
    plaintext, cipher = decrypt_envelope(content, request.signer_key, request.signer_cert)
    certs, crls = _degenerate_contents(plaintext)
    if request.message_type is not MessageType.GET_CRL and not certs:
        raise ResponseError("the CertRep says SUCCESS but holds no certificate")
    device_public = request.device_key.public_key() if request.device_key is not None else None
    return CertRep(
        status=status,
        fail_info=None,
        fail_info_text=fail_info_text,
        transaction_id=transaction_id,
        sender_nonce=sender_nonce,
        recipient_nonce=recipient_nonce,
        digest=hash_name,
        cipher=cipher,
        signer=signer,
        certificates=_leaf_first(certs, device_public),
        crls=tuple(crls),
    )


# -------------------------------------------------------------- GetCACert


@dataclass(frozen=True, slots=True)
class CACertificates:
    """What GetCACert returned (RFC 8894 §4.2), with the RA picked out.

    ``ra`` receives the requests and signs the replies; in CA mode (no
    separate RA) it is the CA itself. ``ca`` is the issuing CA when it is
    among the certificates. With an NDES-style RA pair, ``ra`` is the
    encryption RA (the envelope's recipient) and ``ra_signer`` the signing
    RA that signs the replies; ``signer`` names whichever signs.
    """

    ra: x509.Certificate
    ca: x509.Certificate | None
    certificates: tuple[x509.Certificate, ...]
    ra_signer: x509.Certificate | None = None

    @property
    def signer(self) -> x509.Certificate:
        """The certificate that signs CertReps: the signing RA of a pair, else ``ra``."""
        return self.ra_signer if self.ra_signer is not None else self.ra


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _can_encipher(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment)
    except x509.ExtensionNotFound:
        return False


def _can_sign(cert: x509.Certificate) -> bool:
    try:
        return bool(
            cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature)
    except x509.ExtensionNotFound:
        return False


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def parse_ca_certs(body: bytes, content_type: str | None = None) -> CACertificates:
    """Reads a GetCACert answer: one DER certificate, or a certs-only PKCS#7.

    ``application/x-x509-ca-cert`` is a single certificate (CA mode) and
    ``application/x-x509-ca-ra-cert`` a degenerate SignedData holding the RA
    and CA (RFC 8894 §4.2.1); without a content type the body decides. The RA
    is the certificate that is not a CA and may encipher keys; failing that,
    the CA acts as its own RA.
    """
    with _reading("the GetCACert answer"):
        return _parse_ca_certs(body, content_type)


def _parse_ca_certs(body: bytes, content_type: str | None) -> CACertificates:
    media = (content_type or "").split(";")[0].strip().lower()
    certs: list[x509.Certificate]
    if media == "application/x-x509-ca-cert" or (not media and body[:1] == b"\x30"):
        try:
            certs = [x509.load_der_x509_certificate(body)]
        except ValueError:
            if media:
                raise ResponseError("the GetCACert answer is not a DER certificate") from None
            certs, _ = _degenerate_contents(body)
    elif media in ("application/x-x509-ca-ra-cert", "application/pkcs7-mime", ""):
        certs, _ = _degenerate_contents(body)
    else:
        raise ResponseError(f"GetCACert answered with unexpected content type {content_type!r}")
    if not certs:
        raise ResponseError("the GetCACert answer holds no certificate")

    ras = [c for c in certs if not _is_ca(c) and _can_encipher(c)]
    cas = [c for c in certs if _is_ca(c)]
    ca: x509.Certificate | None
    ra_signer: x509.Certificate | None = None
    # Quirk(NDES): GetCACert holds two RA certificates, one for signing
    # (digitalSignature) and one for encryption (keyEncipherment without
    # digitalSignature). The envelope goes to the encryption RA, and the
    # reply is verified against the signing RA issued by the same CA.
    encrypting = [c for c in ras if not _can_sign(c)]
    if encrypting:
        ra = encrypting[0]
        ca = next((c for c in cas if _issued_by(ra, c)), None)
        ra_signer = next((c for c in certs if not _is_ca(c) and _can_sign(c)
                          and c.issuer == ra.issuer), None)
        if ra_signer is None:
            raise ResponseError("GetCACert holds an encryption RA but no signing RA")
    elif ras:
        ra = ras[0]
        ca = next((c for c in cas if _issued_by(ra, c)), None)
    else:
        # CA mode: the CA that issued no other CA in the set is the issuing one.
        candidates = cas or certs
        lowest = [c for c in candidates if not any(_issued_by(o, c) for o in cas if o != c)]
        ra = (lowest or candidates)[0]
        ca = ra
    if not isinstance(ra.public_key(), rsa.RSAPublicKey):
        raise ResponseError("the RA certificate has no RSA key to encrypt requests to")
    return CACertificates(ra=ra, ca=ca, certificates=tuple(certs), ra_signer=ra_signer)


# -------------------------------------------------------------- GetCACaps


@dataclass(frozen=True, slots=True)
class CACapabilities:
    """The GetCACaps keywords (RFC 8894 §3.5.2) and the strongest choices they allow."""

    keywords: frozenset[str]

    @property
    def standard(self) -> bool:
        return "SCEPStandard" in self.keywords

    @property
    def digest(self) -> DigestName:
        """SHA-512 over SHA-256 over SHA-1; SCEPStandard implies SHA-256."""
        if "SHA-512" in self.keywords:
            return "sha512"
        if "SHA-256" in self.keywords or self.standard:
            return "sha256"
        # A CA that lists no digest is assumed to know only SHA-1.
        return "sha1"

    @property
    def cipher(self) -> CipherName:
        """AES (which names AES-128-CBC) over 3DES; SCEPStandard implies AES."""
        if "AES" in self.keywords or self.standard:
            return "aes128"
        return "des3"

    @property
    def post(self) -> bool:
        """Whether PKIOperation may be sent by POST; SCEPStandard implies it."""
        return "POSTPKIOperation" in self.keywords or self.standard

    @property
    def renewal(self) -> bool:
        return "Renewal" in self.keywords


def parse_ca_caps(body: bytes) -> CACapabilities:
    """Reads GetCACaps: case-sensitive keywords, one a line (LF, CRLF tolerated)."""
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ResponseError("the GetCACaps answer is not ASCII text") from exc
    return CACapabilities(keywords=frozenset(word for word in text.split() if word))
