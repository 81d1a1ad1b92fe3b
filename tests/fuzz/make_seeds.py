"""Writes the seed corpora of the fuzz harnesses into a directory.

    python tests/fuzz/make_seeds.py OUT

OUT/<harness>/ receives a few dozen small inputs per harness, in the layout
that harness reads (see the comment at the top of each tests/fuzz/fuzz_*.c
and fuzz_protocol.py). They are built from the test vectors and with the
``cryptography`` and ``asn1crypto`` packages each time, so no binary corpus
is kept in the repository.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import importlib.util
import struct
import sys
from pathlib import Path

from asn1crypto import cms
from asn1crypto import csr as asn1_csr
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import AttributeOID, NameOID

HERE = Path(__file__).resolve().parent
VECTORS = HERE.parent / "vectors"
MESSAGES = [
    "scepclient-pkcsreq.der",
    "scepclient-get-pkcsreq.der",
    "ber-indefinite-pkcsreq.der",
    "ber-indefinite-envelope-pkcsreq.der",
    "oaep-aes256-sha512-pkcsreq.der",
    "ski-recipient-pkcsreq.der",
    "des3-sha1-nonce8-pkcsreq.der",
    "wrong-recipient-pkcsreq.der",
]
DEVICE_KEYS = ["ber-device.key", "oaep-device.key", "des3-device.key"]


def b8(data: bytes) -> bytes:
    return bytes([len(data)]) + data


def b16(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def der_cert(name: str) -> bytes:
    cert = x509.load_pem_x509_certificate((VECTORS / name).read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)


def load_key(name: str) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key((VECTORS / name).read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def envelope(message: bytes) -> bytes:
    """The pkcsPKIEnvelope (eContent) of a pkiMessage."""
    content = cms.ContentInfo.load(message)["content"]["encap_content_info"]["content"]
    return bytes(content.native)


@functools.cache
def csrs() -> list[bytes]:
    """PKCS#10 requests of the kinds clients send, and a few that the core refuses."""
    keys: list[rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey] = [
        load_key(name) for name in DEVICE_KEYS
    ]
    keys += [ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP384R1()),
             ed25519.Ed25519PrivateKey.generate()]
    out = []
    for i, key in enumerate(keys):
        builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "scep-fast"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"fuzz-device-{i}"),
        ]))
        builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, b"secret-challenge")
        if i % 2 == 0:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(f"device{i}.example"),
                                             x509.RFC822Name("a@example.com")]),
                critical=False)
        algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
        out.append(builder.sign(key, algorithm).public_bytes(serialization.Encoding.DER))
    return out


def request_infos() -> list[bytes]:
    """CertificationRequestInfos for the keys fuzz_issue.c signs with (fuzz-*.key)."""
    out = []
    for i, name in enumerate(["fuzz-device.key", "fuzz-recipient.key"] * 2):
        key = serialization.load_pem_private_key((HERE / name).read_bytes(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
        builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, f"signed-{i}")]))
        if i >= 2:
            builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, b"secret")
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("signed.example")]), critical=False)
        der = builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
        out.append(asn1_csr.CertificationRequest.load(der)["certification_request_info"].dump())
    return out


def subjects() -> list[bytes]:
    names = [
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device")]),
        x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
                   x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "MDM"),
                   x509.NameAttribute(NameOID.SERIAL_NUMBER, "1234"),
                   x509.NameAttribute(NameOID.COMMON_NAME, "Gerät")]),
        x509.Name([]),
    ]
    return [name.public_bytes() for name in names]


@functools.cache
def extensions() -> list[bytes]:
    leaf = asn1_x509.Extensions([
        {"extn_id": "basic_constraints", "critical": True, "extn_value": {"ca": False}},
        {"extn_id": "key_usage", "critical": True,
         "extn_value": {"digital_signature", "key_encipherment"}},
        {"extn_id": "extended_key_usage", "critical": False, "extn_value": ["client_auth"]},
        {"extn_id": "subject_alt_name", "critical": False,
         "extn_value": [asn1_x509.GeneralName(name="dns_name", value="device.example"),
                        asn1_x509.GeneralName(name="rfc822_name", value="a@example.com")]},
    ])
    crldp = asn1_x509.Extensions([
        {"extn_id": "crl_distribution_points", "critical": False, "extn_value": [
            {"distribution_point": asn1_x509.DistributionPointName(name="full_name", value=[
                asn1_x509.GeneralName(name="uniform_resource_identifier",
                                      value="http://ca.example/crl/ab.crl")])}]},
    ])
    refused = asn1_x509.Extensions([
        {"extn_id": "key_identifier", "critical": False, "extn_value": b"\x01" * 20},
    ])
    return [leaf.dump(), crldp.dump(), refused.dump(), b"\x30\x00", b""]


def crl() -> bytes:
    ca_key = load_key("ca.key")
    ca = x509.load_pem_x509_certificate((VECTORS / "ca.pem").read_bytes())
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    revoked = (x509.RevokedCertificateBuilder().serial_number(0x1234)
               .revocation_date(now).build())
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject)
               .last_update(now).next_update(now + datetime.timedelta(days=7))
               .add_revoked_certificate(revoked)
               .add_extension(x509.CRLNumber(7), critical=False))
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def envelopes() -> list[bytes]:
    """EnvelopedData of CSRs to fuzz-recipient.pem, built by the vectors' generator."""
    spec = importlib.util.spec_from_file_location("make_ber_vector",
                                                  VECTORS / "make_ber_vector.py")
    assert spec is not None and spec.loader is not None
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    recipient = x509.load_pem_x509_certificate((HERE / "fuzz-recipient.pem").read_bytes())
    variants = [
        ("aes128", "pkcs1v15", "issuer-serial", "der"),
        ("aes256", "oaep-sha256", "issuer-serial", "der"),
        ("aes192", "pkcs1v15", "ski", "der"),
        ("des3", "pkcs1v15", "issuer-serial", "ber"),
        ("aes128", "oaep-sha256", "ski", "ber"),
    ]
    return [builder.make_envelope(csrs()[i % 3], recipient, cipher, kt, rid, encoding, 100)
            for i, (cipher, kt, rid, encoding) in enumerate(variants)]


def unwrap_seeds() -> list[bytes]:
    messages = [(VECTORS / name).read_bytes() for name in MESSAGES]
    attrs = b8(b"19") + b8(b"0f" * 16) + b8(bytes(range(16)))
    seeds = [b"\x00" + m for m in messages] + [b"\x04" + messages[4]]
    # choices: bits 0-2 digest, 3-5 string type, 6-7 cipher (fuzz_unwrap.c)
    seeds += [b"\x01" + bytes([i % 6]) + attrs + env for i, env in enumerate(envelopes())]
    # Two envelopes to the RSA-2048 RA: the OAEP and the DES ones of the vectors.
    seeds += [b"\x01\x00" + attrs + envelope(messages[i]) for i in (0, 4)]
    seeds += [b"\x02" + bytes([(i * 0x49) & 0xff]) + attrs + csr for i, csr in enumerate(csrs())]
    seeds.append(b"\x0a\x00" + attrs + csrs()[0])  # signer named by subjectKeyIdentifier
    seeds.append(b"\x02\x00" + b8(b"21") + b8(b"id") + b8(b"n" * 8) + b"\x30\x00")
    return seeds


def issue_seeds() -> list[bytes]:
    serial = b8(hashlib.sha256(b"serial").digest()[:16])
    times = struct.pack(">HI", 0, 86400 * 365)
    seeds = []
    for i, csr in enumerate(csrs()):
        flags = 0x00 if i == 0 else 0x01
        subject = subjects()[i % 3] if i % 2 else b""
        seeds.append(bytes([flags]) + serial + times + b16(subject)
                     + b16(extensions()[i % 5]) + csr)
    for index in range(len(MESSAGES)):
        seeds.append(b"\x11" + serial + times + b16(b"") + b16(extensions()[0]) + bytes([index]))
    for i, info in enumerate(request_infos()):
        flags = 0x41 if i % 2 == 0 else 0xC1
        seeds.append(bytes([flags]) + serial + times + b16(subjects()[i % 3])
                     + b16(extensions()[i % 2]) + info)
    seeds.append(b"\x21" + serial + struct.pack(">qq", -62167219200, 253402300799) + b16(b"")
                 + b16(b"") + csrs()[3])
    return seeds


def wrap_seeds() -> list[bytes]:
    certs = der_cert("ca.pem") + der_cert("ra.pem")
    the_crl = crl()
    seeds = []
    for index in range(len(MESSAGES) + 1):
        for status, fail_info in ((0, 0xFF), (1, 2), (2, 0xFF)):
            flags = 0x00 if (index, status) == (0, 0) else 0x01
            seeds.append(bytes([index, status, fail_info, flags, 0]) + b16(b"bad challenge")
                         + b16(b"") + b8(b"") + b16(certs) + (the_crl if index == 2 else b""))
    seeds.append(bytes([4, 0, 0xFF, 0x71, 0x52]) + b16(b"") + b16(b"tid-" * 10)
                 + b8(b"\x01" * 8) + b16(b"") + the_crl)
    return seeds


def certs_only_seeds() -> list[bytes]:
    ca, ra, the_crl = der_cert("ca.pem"), der_cert("ra.pem"), crl()
    return [
        b"\x00" + b16(ra + ca) + b"",
        b"\x00" + b16(ca) + the_crl,
        b"\x01" + b16(b"") + the_crl,
        b"\x02" + b16(ra),
        b"\x03",
    ]


def protocol_seeds() -> list[bytes]:
    # method index, query (two-octet length), body (fuzz_protocol.py)
    get_query = (VECTORS / "scepclient-get-query.txt").read_bytes().strip()
    post_body = (VECTORS / "scepclient-pkcsreq.der").read_bytes()
    return [
        b"\x00" + b16(get_query),
        b"\x01" + b16(b"operation=PKIOperation") + post_body[:512],
        b"\x00" + b16(b"operation=GetCACaps"),
        b"\x00" + b16(b"operation=GetCACert&message=ca%20one"),
        b"\x02" + b16(b"operation=getnextcacert"),
        b"\x00" + b16(b"operation=PKIOperation&message=MIIB%2B%0A%3D%3D"),
        b"\x03" + b16(b"operation=PKIOperation&operation=GetCACaps"),
    ]


def http_head_seeds() -> list[bytes]:
    # max_body (two octets), then the bytes as they arrived (fuzz_http_head.c)
    body = (VECTORS / "scepclient-pkcsreq.der").read_bytes()[:64]
    post = (b"POST /scep/pkiclient.exe?operation=PKIOperation HTTP/1.1\r\nHost: t\r\n"
            b"Content-Type: application/x-pki-message\r\nContent-Length: %d\r\n\r\n"
            % len(body)) + body
    return [
        struct.pack(">H", 4096) + post,
        struct.pack(">H", 4096) + post[:40],
        struct.pack(">H", 16) + post,
        struct.pack(">H", 4096) + post + post,
        struct.pack(">H", 4096) + post.replace(b"Host: t", b"Transfer-Encoding: chunked"),
        struct.pack(">H", 4096) + b"GET /scep?operation=GetCACaps HTTP/1.1\r\n\r\n",
        # a head longer than the limit (and so a longer -max_len for the fuzzer)
        struct.pack(">H", 4096) + post.replace(b"Host: t", b"Host: " + b"t" * 9000),
    ]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0])
    corpora = {
        "fuzz_unwrap": unwrap_seeds(),
        "fuzz_issue": issue_seeds(),
        "fuzz_wrap": wrap_seeds(),
        "fuzz_certs_only": certs_only_seeds(),
        "fuzz_protocol": protocol_seeds(),
        "fuzz_http_head": http_head_seeds(),
    }
    for harness, seeds in corpora.items():
        directory = out / harness
        directory.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(seeds):
            (directory / f"seed-{i:03d}").write_bytes(seed)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
