"""Certificates and CRLs signed by a key the native core holds (a file key or a token key).

``cryptography`` builds X.509 structures but signs only with keys it holds
itself. So the builder first signs with a throw-away key of the same kind,
which fixes the signature AlgorithmIdentifier inside the to-be-signed part;
the core then signs those exact bytes with the real key, and the result is
assembled as RFC 5280 section 4.1 (and 5.1) lays it out:

    SEQUENCE { tbs, signatureAlgorithm, BIT STRING signature }

The throw-away signature is discarded; the private key never leaves the core.
"""

from __future__ import annotations

import functools
import hashlib

from asn1crypto import algos, cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from scep_fast.crypto.core import NativeKey
from scep_fast.crypto.errors import InvalidArgument

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
_Builder = x509.CertificateBuilder | x509.CertificateRevocationListBuilder


def public_key(key: NativeKey) -> PublicKey:
    loaded = serialization.load_der_public_key(key.public_key_der())
    if not isinstance(loaded, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise InvalidArgument("a CA or RA key is RSA or EC")
    return loaded


def signature_digest(key: PublicKey) -> str:
    """SHA-384 for P-384 and larger curves, SHA-256 otherwise (as the core issues)."""
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size >= 384:
        return "SHA384"
    return "SHA256"


@functools.cache
def _stand_in(kind: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    # Its signature is thrown away; only its AlgorithmIdentifier is kept.
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _header(data: bytes, at: int) -> tuple[int, int]:
    """(offset of the content, its length) of the DER element at ``at``."""
    if at + 2 > len(data):
        raise InvalidArgument("truncated DER")
    first = data[at + 1]
    if first < 0x80:
        return at + 2, first
    count = first & 0x7F
    if count == 0 or count > 4 or at + 2 + count > len(data):
        raise InvalidArgument("unsupported DER length")
    return at + 2 + count, int.from_bytes(data[at + 2:at + 2 + count], "big")


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def _sign(builder: _Builder, key: NativeKey, digest: str) -> bytes:
    pub = public_key(key)
    stand_in = _stand_in("rsa" if isinstance(pub, rsa.RSAPublicKey) else "ec")
    algorithm = hashes.SHA384() if digest == "SHA384" else hashes.SHA256()
    signed = builder.sign(stand_in, algorithm)
    if isinstance(signed, x509.Certificate):
        tbs = signed.tbs_certificate_bytes
    else:
        tbs = signed.tbs_certlist_bytes
    der = signed.public_bytes(serialization.Encoding.DER)
    # Outer SEQUENCE, then tbs, then the AlgorithmIdentifier we keep.
    body, _ = _header(der, 0)
    tbs_start, tbs_len = _header(der, body)
    alg_at = tbs_start + tbs_len
    alg_start, alg_len = _header(der, alg_at)
    if der[body:alg_at] != tbs:
        raise InvalidArgument("unexpected DER layout")
    algorithm_id = der[alg_at:alg_start + alg_len]
    signature = key.sign(digest, tbs)
    return _tlv(0x30, tbs + algorithm_id + _tlv(0x03, b"\x00" + signature))


def sign_certificate(builder: x509.CertificateBuilder, key: NativeKey) -> x509.Certificate:
    """The certificate ``builder`` describes, signed by ``key`` (its issuer's key)."""
    return x509.load_der_x509_certificate(_sign(builder, key, signature_digest(public_key(key))))


def sign_crl(builder: x509.CertificateRevocationListBuilder,
             key: NativeKey) -> x509.CertificateRevocationList:
    """The CRL ``builder`` describes, signed by the CA's ``key``."""
    return x509.load_der_x509_crl(_sign(builder, key, signature_digest(public_key(key))))


def signed_data(content: bytes, signer_cert: bytes, key: NativeKey,
                extra_certs: tuple[bytes, ...] = ()) -> bytes:
    """A CMS SignedData ContentInfo (RFC 5652) over ``content`` (id-data), signed by ``key``.

    One SignerInfo named by issuer and serial number, SHA-256 (SHA-384 for the
    larger curves), with the contentType and messageDigest signed attributes
    (section 5.3); the signature is over the DER SET OF those attributes
    (section 5.4), made by the core. The certificates are the signer's, then
    ``extra_certs``.
    """
    cert = asn1_x509.Certificate.load(signer_cert)
    pub = public_key(key)
    digest = signature_digest(pub)
    digest_name = digest.lower()
    message_digest = hashlib.new(digest_name, content).digest()
    attrs = cms.CMSAttributes([
        cms.CMSAttribute({"type": "content_type", "values": ["data"]}),
        cms.CMSAttribute({"type": "message_digest", "values": [message_digest]}),
    ])
    signature = key.sign(digest, attrs.dump(force=True))
    if isinstance(pub, rsa.RSAPublicKey):
        signature_algorithm = {"algorithm": "rsassa_pkcs1v15"}
    else:
        signature_algorithm = {"algorithm": f"{digest_name}_ecdsa"}
    signer_info = cms.SignerInfo({
        "version": "v1",
        "sid": cms.SignerIdentifier({"issuer_and_serial_number": cms.IssuerAndSerialNumber({
            "issuer": cert.issuer, "serial_number": cert.serial_number})}),
        "digest_algorithm": algos.DigestAlgorithm({"algorithm": digest_name}),
        "signed_attrs": attrs,
        "signature_algorithm": algos.SignedDigestAlgorithm(signature_algorithm),
        "signature": core.OctetString(signature),
    })
    certificates = [cert, *(asn1_x509.Certificate.load(c) for c in extra_certs)]
    data = cms.SignedData({
        "version": "v1",
        "digest_algorithms": [algos.DigestAlgorithm({"algorithm": digest_name})],
        "encap_content_info": {"content_type": "data", "content": content},
        "certificates": certificates,
        "signer_infos": [signer_info],
    })
    return bytes(cms.ContentInfo({"content_type": "signed_data", "content": data}).dump())
