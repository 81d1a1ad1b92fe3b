#!/usr/bin/env python3
"""Generate synthetic SCEP PKCSReq test vectors (RFC 8894) for scep-fast's tests.

This script is how the generated vectors in this directory were made; see README.md
for the exact command line of each one. It builds the whole message by hand so that
each encoding choice stays under test control:

* a PKCS#10 CSR (RSA key of the device, subject CN, challengePassword attribute as a
  PrintableString), signed with SHA-256 with RSA;
* the pkcsPKIEnvelope: a CMS EnvelopedData ContentInfo holding the DER CSR, with a
  chosen content cipher (AES-128/192/256-CBC or 3DES-CBC), key transport (RSA
  PKCS#1 v1.5 or RSAES-OAEP with SHA-256 and MGF1-SHA-256) and recipient identifier
  (issuerAndSerialNumber or subjectKeyIdentifier) for the RA certificate;
* the outer CMS SignedData (version 1) whose encapContentInfo is id-data holding the
  envelope, signed by a self-signed certificate for the device key, with the SCEP
  signed attributes contentType, messageDigest, messageType "19" (PKCSReq),
  transactionID (lower-case hex SHA-256 of the device SubjectPublicKeyInfo DER) and
  senderNonce.

Encodings:

* ``--outer der``: the SignedData is plain DER.
* ``--outer ber``: the ContentInfo, its [0] content, the SignedData, the
  encapContentInfo, its [0] eContent and the certificates [0] use indefinite lengths
  (0x80 ... 00 00) and the eContent OCTET STRING is a constructed OCTET STRING made of
  ``--chunk``-byte primitive segments, like the streaming encoders of BouncyCastle-based
  clients. The signed attributes, the SignerInfo and the certificate stay DER (the
  signature is computed over the DER of the signed attributes, as CMS requires).
* ``--envelope ber``: the pkcsPKIEnvelope is BER as well (indefinite lengths, and the
  encryptedContent [0] is constructed from ``--chunk``-byte segments).

Only the ``cryptography`` package is needed. RSA key transport with PKCS#1 v1.5 and
OAEP are randomised, so a regenerated vector never matches the committed bytes; with
``--device-key`` (reuse the committed key) and ``--nonce`` the transactionID, the
senderNonce and the CSR contents stay the same.

Example (the BER vector):

    python3 make_ber_vector.py --ra-cert ra.pem --cn ber-device \\
        --challenge secret-challenge --cipher aes128 --key-transport pkcs1v15 \\
        --digest sha256 --outer ber --device-key ber-device.key \\
        --out ber-indefinite-pkcsreq.der
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.x509.oid import NameOID

# --------------------------------------------------------------------------- ASN.1


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def tlv(tag: int, content: bytes) -> bytes:
    """Definite-length (DER) encoding of one element."""
    return bytes([tag]) + _length(len(content)) + content


def indef(tag: int, *parts: bytes) -> bytes:
    """Indefinite-length BER encoding of a constructed element."""
    assert tag & 0x20, "indefinite length needs a constructed tag"
    return bytes([tag, 0x80]) + b"".join(parts) + b"\x00\x00"


def seq(*parts: bytes) -> bytes:
    return tlv(0x30, b"".join(parts))


def set_of(*parts: bytes) -> bytes:
    """DER SET OF: elements sorted by their encodings."""
    return tlv(0x31, b"".join(sorted(parts)))


def integer(v: int) -> bytes:
    assert v >= 0
    return tlv(0x02, v.to_bytes(v.bit_length() // 8 + 1, "big", signed=True))


def oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray()
    first = [40 * arcs[0] + arcs[1]] + arcs[2:]
    for a in first:
        chunk = [a & 0x7F]
        a >>= 7
        while a:
            chunk.append(0x80 | (a & 0x7F))
            a >>= 7
        out += bytes(reversed(chunk))
    return tlv(0x06, bytes(out))


def octets(b: bytes) -> bytes:
    return tlv(0x04, b)


def printable(s: str) -> bytes:
    return tlv(0x13, s.encode("ascii"))


def utf8(s: str) -> bytes:
    return tlv(0x0C, s.encode("utf-8"))


NULL = b"\x05\x00"


def ctx(n: int, content: bytes, constructed: bool = True) -> bytes:
    return tlv((0xA0 if constructed else 0x80) | n, content)


def chunked_octets(tag: int, data: bytes, size: int) -> bytes:
    """Constructed, indefinite-length OCTET STRING (tag 0x24 or [n] 0xA0|n) of segments."""
    segs = [octets(data[i : i + size]) for i in range(0, len(data), size)] or [
        octets(b"")
    ]
    return indef(tag, *segs)


def read_tlv(buf: bytes, pos: int = 0):
    """Return (tag, content_start, end) of the DER element that starts at pos."""
    tag = buf[pos]
    n = buf[pos + 1]
    pos += 2
    if n & 0x80:
        k = n & 0x7F
        n = int.from_bytes(buf[pos : pos + k], "big")
        pos += k
    return tag, pos, pos + n


# ---------------------------------------------------------------------- OIDs

OID_DATA = "1.2.840.113549.1.7.1"
OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
OID_ENVELOPED_DATA = "1.2.840.113549.1.7.3"
OID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
OID_CHALLENGE_PASSWORD = "1.2.840.113549.1.9.7"
OID_RSA = "1.2.840.113549.1.1.1"
OID_RSAES_OAEP = "1.2.840.113549.1.1.7"
OID_MGF1 = "1.2.840.113549.1.1.8"
OID_SHA256_RSA = "1.2.840.113549.1.1.11"
OID_CN = "2.5.4.3"
# SCEP attributes (RFC 8894 section 3.2.1)
OID_SCEP_MESSAGE_TYPE = "2.16.840.1.113733.1.9.2"
OID_SCEP_SENDER_NONCE = "2.16.840.1.113733.1.9.5"
OID_SCEP_TRANSACTION_ID = "2.16.840.1.113733.1.9.7"

DIGESTS = {
    # name: (hash class, digest OID, sha-with-RSA OID)
    "sha1": (hashes.SHA1, "1.3.14.3.2.26", "1.2.840.113549.1.1.5"),
    "sha256": (hashes.SHA256, "2.16.840.1.101.3.4.2.1", "1.2.840.113549.1.1.11"),
    "sha384": (hashes.SHA384, "2.16.840.1.101.3.4.2.2", "1.2.840.113549.1.1.12"),
    "sha512": (hashes.SHA512, "2.16.840.1.101.3.4.2.3", "1.2.840.113549.1.1.13"),
}

CIPHERS = {
    # name: (OID, key bytes, block/IV bytes)
    "aes128": ("2.16.840.1.101.3.4.1.2", 16, 16),
    "aes192": ("2.16.840.1.101.3.4.1.22", 24, 16),
    "aes256": ("2.16.840.1.101.3.4.1.42", 32, 16),
    "des3": ("1.2.840.113549.3.7", 24, 8),
}


def alg_id(dotted: str, params: bytes | None = None) -> bytes:
    return seq(oid(dotted), params if params is not None else b"")


# ---------------------------------------------------------------- building blocks


def make_csr(key: rsa.RSAPrivateKey, cn: str, challenge: str) -> bytes:
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    name = seq(set_of(seq(oid(OID_CN), utf8(cn))))
    attrs = ctx(0, seq(oid(OID_CHALLENGE_PASSWORD), set_of(printable(challenge))))
    info = seq(integer(0), name, spki, attrs)
    sig = key.sign(info, asym_padding.PKCS1v15(), hashes.SHA256())
    return seq(info, alg_id(OID_SHA256_RSA, NULL), tlv(0x03, b"\x00" + sig))


def make_signer_cert(
    key: rsa.RSAPrivateKey, cn: str, with_ski: bool = False
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = x509.CertificateBuilder()
    if with_ski:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
    return (
        builder
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(datetime.datetime(2045, 1, 1, tzinfo=datetime.UTC))
        .add_extension(
            x509.KeyUsage(True, False, True, False, False, False, False, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )


def issuer_and_serial(cert: x509.Certificate) -> bytes:
    """IssuerAndSerialNumber, with the issuer Name bytes copied from the certificate."""
    der = cert.public_bytes(serialization.Encoding.DER)
    _, pos, _ = read_tlv(der)  # Certificate
    _, pos, _ = read_tlv(der, pos)  # TBSCertificate
    tag, _, end = read_tlv(der, pos)
    if tag == 0xA0:  # [0] EXPLICIT version
        _, _, end = read_tlv(der, end)  # serialNumber
    _, _, end = read_tlv(der, end)  # signature AlgorithmIdentifier
    tag, _, issuer_end = read_tlv(der, end)  # issuer Name
    assert tag == 0x30
    return seq(der[end:issuer_end], integer(cert.serial_number))


def make_envelope(
    content: bytes,
    ra: x509.Certificate,
    cipher: str,
    key_transport: str,
    rid: str,
    encoding: str,
    chunk: int,
) -> bytes:
    c_oid, klen, ivlen = CIPHERS[cipher]
    cek = os.urandom(klen)
    iv = os.urandom(ivlen)
    padder = padding.PKCS7(ivlen * 8).padder()
    padded = padder.update(content) + padder.finalize()
    if cipher.startswith("aes"):
        algo = algorithms.AES(cek)
    else:
        try:  # 3DES lives in the "decrepit" module since cryptography 43
            from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
        except ImportError:
            TripleDES = algorithms.TripleDES
        algo = TripleDES(cek)
    enc = Cipher(algo, modes.CBC(iv)).encryptor()
    ciphertext = enc.update(padded) + enc.finalize()

    pub = ra.public_key()
    if key_transport == "pkcs1v15":
        wrapped = pub.encrypt(cek, asym_padding.PKCS1v15())
        kea = alg_id(OID_RSA, NULL)
    elif key_transport == "oaep-sha256":
        wrapped = pub.encrypt(
            cek,
            asym_padding.OAEP(
                mgf=asym_padding.MGF1(hashes.SHA256()),
                algorithm=hashes.SHA256(),
                label=None,
            ),
        )
        sha256 = alg_id(DIGESTS["sha256"][1])
        kea = alg_id(
            OID_RSAES_OAEP, seq(ctx(0, sha256), ctx(1, alg_id(OID_MGF1, sha256)))
        )
    else:
        raise SystemExit(f"unknown key transport {key_transport}")

    if rid == "issuer-serial":
        ri_version, rid_enc = 0, issuer_and_serial(ra)
    elif rid == "ski":
        ski = ra.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value.digest
        ri_version, rid_enc = 2, tlv(0x80, ski)  # [0] IMPLICIT SubjectKeyIdentifier
    else:
        raise SystemExit(f"unknown recipient identifier {rid}")
    ktri = seq(integer(ri_version), rid_enc, kea, octets(wrapped))
    env_version = 0 if ri_version == 0 else 2  # RFC 5652 section 6.1
    cea = alg_id(c_oid, octets(iv))

    if encoding == "der":
        eci = seq(oid(OID_DATA), cea, tlv(0x80, ciphertext))
        env = seq(integer(env_version), set_of(ktri), eci)
        return seq(oid(OID_ENVELOPED_DATA), ctx(0, env))
    eci = indef(0x30, oid(OID_DATA), cea, chunked_octets(0xA0, ciphertext, chunk))
    env = indef(0x30, integer(env_version), set_of(ktri), eci)
    return indef(0x30, oid(OID_ENVELOPED_DATA), indef(0xA0, env))


def make_pkcsreq(args) -> dict:
    if args.device_key and os.path.exists(args.device_key) and not args.new_key:
        with open(args.device_key, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=args.key_size)
        if args.device_key:
            with open(args.device_key, "wb") as f:
                f.write(
                    key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    )
                )
    with open(args.ra_cert, "rb") as f:
        ra = x509.load_pem_x509_certificate(f.read())

    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    transaction_id = hashlib.sha256(spki).hexdigest()
    nonce = bytes.fromhex(args.nonce) if args.nonce else os.urandom(args.nonce_len)

    csr = make_csr(key, args.cn, args.challenge)
    envelope = make_envelope(
        csr, ra, args.cipher, args.key_transport, args.rid, args.envelope, args.chunk
    )
    signer = make_signer_cert(key, args.signer_cn or args.cn, args.signer_id == "ski")
    signer_der = signer.public_bytes(serialization.Encoding.DER)

    hash_cls, digest_oid, sig_oid = DIGESTS[args.digest]
    h = hashes.Hash(hash_cls())
    h.update(envelope)
    message_digest = h.finalize()

    def attr(attr_oid: str, value: bytes) -> bytes:
        return seq(oid(attr_oid), set_of(value))

    signed_attrs = [
        attr(OID_CONTENT_TYPE, oid(OID_DATA)),
        attr(OID_MESSAGE_DIGEST, octets(message_digest)),
        attr(OID_SCEP_MESSAGE_TYPE, printable("19")),
        attr(OID_SCEP_TRANSACTION_ID, printable(transaction_id)),
        attr(OID_SCEP_SENDER_NONCE, octets(nonce)),
    ]
    attrs_set = set_of(*signed_attrs)  # what is signed: tag 0x31
    signature = key.sign(attrs_set, asym_padding.PKCS1v15(), hash_cls())
    attrs_implicit = b"\xa0" + attrs_set[1:]  # [0] IMPLICIT in the SignerInfo

    sig_alg = (
        alg_id(OID_RSA, NULL)
        if args.sig_alg == "rsaEncryption"
        else alg_id(sig_oid, NULL)
    )
    if args.signer_id == "ski":
        # sid [0] IMPLICIT SubjectKeyIdentifier makes SignerInfo and SignedData
        # version 3 (RFC 5652 sections 5.1 and 5.3).
        ski = signer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        version, sid = 3, tlv(0x80, ski)
    else:
        version, sid = 1, issuer_and_serial(signer)
    signer_info = seq(
        integer(version),
        sid,
        alg_id(digest_oid),
        attrs_implicit,
        sig_alg,
        octets(signature),
    )
    digest_algs = set_of(alg_id(digest_oid))

    if args.outer == "der":
        encap = seq(oid(OID_DATA), ctx(0, octets(envelope)))
        sd = seq(
            integer(version), digest_algs, encap, ctx(0, signer_der), set_of(signer_info)
        )
        msg = seq(oid(OID_SIGNED_DATA), ctx(0, sd))
    else:
        encap = indef(
            0x30, oid(OID_DATA), indef(0xA0, chunked_octets(0x24, envelope, args.chunk))
        )
        sd = indef(
            0x30,
            integer(version),
            digest_algs,
            encap,
            indef(0xA0, signer_der),
            set_of(signer_info),
        )
        msg = indef(0x30, oid(OID_SIGNED_DATA), indef(0xA0, sd))

    with open(args.out, "wb") as f:
        f.write(msg)
    return {
        "out": args.out,
        "size": len(msg),
        "transactionID": transaction_id,
        "senderNonce": nonce.hex(),
        "messageDigest": message_digest.hex(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--ra-cert", required=True, help="PEM certificate the envelope is encrypted to"
    )
    p.add_argument("--out", required=True, help="output file (the PKIOperation body)")
    p.add_argument(
        "--device-key", help="PEM device key: read if it exists, else written"
    )
    p.add_argument(
        "--new-key", action="store_true", help="always make a new device key"
    )
    p.add_argument("--key-size", type=int, default=2048)
    p.add_argument("--cn", default="ber-device", help="CSR subject CN")
    p.add_argument("--signer-cn", help="signer certificate CN (default: the CSR CN)")
    p.add_argument("--challenge", default="secret-challenge")
    p.add_argument("--cipher", choices=sorted(CIPHERS), default="aes128")
    p.add_argument(
        "--key-transport", choices=["pkcs1v15", "oaep-sha256"], default="pkcs1v15"
    )
    p.add_argument("--rid", choices=["issuer-serial", "ski"], default="issuer-serial")
    p.add_argument(
        "--signer-id",
        choices=["issuer-serial", "ski"],
        default="issuer-serial",
        help="how the SignerInfo names the signer certificate",
    )
    p.add_argument("--digest", choices=sorted(DIGESTS), default="sha256")
    p.add_argument(
        "--sig-alg",
        choices=["rsaEncryption", "shaWithRSA"],
        default="rsaEncryption",
        help="SignerInfo signatureAlgorithm OID style",
    )
    p.add_argument("--outer", choices=["der", "ber"], default="ber")
    p.add_argument("--envelope", choices=["der", "ber"], default="der")
    p.add_argument(
        "--chunk", type=int, default=1000, help="BER OCTET STRING segment size"
    )
    p.add_argument("--nonce", help="senderNonce as hex (default: random)")
    p.add_argument(
        "--nonce-len", type=int, default=16, help="random senderNonce length"
    )
    args = p.parse_args(argv)
    info = make_pkcsreq(args)
    for k, v in info.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
