"""Builders of hostile input for the robustness tests of the native core.

Messages are written byte by byte with the DER helpers of
tests/vectors/make_ber_vector.py, so a test controls exactly which part is
wrong and can still sign the result correctly, which is what it takes to reach
the code behind the signature check. The raw_* functions call the C entry
points directly, for arguments the Python face never passes.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from scep_fast._native import ffi, lib
from scep_fast.crypto import ScepContext

VECTORS = Path(__file__).resolve().parents[1] / "vectors"

# One OpenSSL error-queue entry as errors.c writes it: "error:0680007B:lib:func:reason".
OPENSSL_REASON = re.compile(r"error:[0-9A-F]{8}:[^:;]*:[^:;]*:[^;]+")


def _load_builder() -> Any:
    spec = importlib.util.spec_from_file_location(
        "hostile_make_ber_vector", VECTORS / "make_ber_vector.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


B = _load_builder()

OID_DATA = "1.2.840.113549.1.7.1"
OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
OID_ENVELOPED_DATA = "1.2.840.113549.1.7.3"
OID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
OID_MESSAGE_TYPE = "2.16.840.1.113733.1.9.2"
OID_SENDER_NONCE = "2.16.840.1.113733.1.9.5"
OID_TRANSACTION_ID = "2.16.840.1.113733.1.9.7"
OID_RSA = "1.2.840.113549.1.1.1"

_DIGESTS = {
    "sha256": (hashes.SHA256, "2.16.840.1.101.3.4.2.1"),
    "sha512": (hashes.SHA512, "2.16.840.1.101.3.4.2.3"),
    "md5": (hashes.MD5, "1.2.840.113549.2.5"),
}

# Leave an attribute out of the signed attributes.
OMIT = object()


def flip(data: bytes, pos: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[pos] ^= 1 << bit
    return bytes(out)


def header(tag: int, length: int, length_octets: int | None = None) -> bytes:
    """A tag and a definite length, in long form with length_octets octets if given."""
    if length_octets is None:
        return bytes([tag]) + B._length(length)
    return bytes([tag, 0x80 | length_octets]) + length.to_bytes(length_octets, "big")


def keypair(name: str) -> tuple[bytes, bytes]:
    cert = x509.load_pem_x509_certificate((VECTORS / f"{name}.pem").read_bytes())
    key = serialization.load_pem_private_key((VECTORS / f"{name}.key").read_bytes(), None)
    return (
        cert.public_bytes(serialization.Encoding.DER),
        key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def signature_span(message: bytes) -> tuple[int, int]:
    """(start, end) of the signature value octets of a DER pkiMessage."""
    sd = cms.ContentInfo.load(message)["content"]
    (si,) = list(sd["signer_infos"])
    sig = si["signature"].contents
    start = message.rfind(sig)
    assert start > 0 and message.count(sig) == 1
    return start, start + len(sig)


def econtent_span(message: bytes) -> tuple[int, int]:
    """(start, end) of the eContent octets (the envelope) of a DER pkiMessage."""
    sd = cms.ContentInfo.load(message)["content"]
    content = sd["encap_content_info"]["content"].contents
    inner = bytes(content[B.read_tlv(content)[1] :]) if content[0] == 0x04 else content
    start = message.find(inner)
    assert start > 0 and message.count(inner) == 1
    return start, start + len(inner)


@dataclass
class Device:
    """A requester: its key, a self-signed certificate for it, and the RA to encrypt to."""

    key: rsa.RSAPrivateKey
    cert: x509.Certificate
    ra: x509.Certificate

    @classmethod
    def load(cls, key_name: str = "oaep-device", cn: str = "hostile-device") -> Device:
        key = serialization.load_pem_private_key(
            (VECTORS / f"{key_name}.key").read_bytes(), None
        )
        assert isinstance(key, rsa.RSAPrivateKey)
        ra = x509.load_pem_x509_certificate((VECTORS / "ra.pem").read_bytes())
        return cls(key=key, cert=B.make_signer_cert(key, cn), ra=ra)

    @property
    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    def csr(self, cn: str = "hostile-device") -> bytes:
        return bytes(B.make_csr(self.key, cn, "secret-challenge"))

    def spki(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def csr_with_spki(self, spki: bytes, cn: str = "hostile-device") -> bytes:
        """A CSR carrying spki as given, correctly signed with this device's key."""
        name = B.seq(B.set_of(B.seq(B.oid("2.5.4.3"), B.utf8(cn))))
        info = B.seq(B.integer(0), name, spki, B.ctx(0, b""))
        sig = self.key.sign(info, padding.PKCS1v15(), hashes.SHA256())
        return bytes(
            B.seq(info, B.alg_id("1.2.840.113549.1.1.11", B.NULL), B.tlv(0x03, b"\x00" + sig))
        )

    def envelope(self, content: bytes, cipher: str = "aes128", encoding: str = "der") -> bytes:
        return bytes(
            B.make_envelope(content, self.ra, cipher, "pkcs1v15", "issuer-serial", encoding, 512)
        )

    def pkcsreq(
        self,
        econtent: bytes | None = None,
        *,
        message_type: Any = None,
        transaction_id: Any = None,
        sender_nonce: Any = None,
        content_type: Any = None,
        message_digest: Any = None,
        extra_attrs: Sequence[bytes] = (),
        digest: str = "sha256",
        econtent_type: str = OID_DATA,
        signer_infos: int = 1,
        certificates: bytes | None = None,
    ) -> bytes:
        """A DER PKCSReq signed by this device.

        econtent defaults to an envelope holding this device's CSR. Each attribute
        argument is None for the normal value, OMIT to leave the attribute out, raw
        DER of one value, or a list of raw DER values (an attribute with several).
        """
        if econtent is None:
            econtent = self.envelope(self.csr())
        hash_cls, digest_oid = _DIGESTS[digest]
        h = hashes.Hash(hash_cls())
        h.update(econtent)
        defaults = {
            OID_CONTENT_TYPE: (content_type, B.oid(econtent_type)),
            OID_MESSAGE_DIGEST: (message_digest, B.octets(h.finalize())),
            OID_MESSAGE_TYPE: (message_type, B.printable("19")),
            OID_TRANSACTION_ID: (transaction_id, B.printable("hostile-transaction")),
            OID_SENDER_NONCE: (sender_nonce, B.octets(bytes(range(16)))),
        }
        attrs = []
        for attr_oid, (given, default) in defaults.items():
            if given is OMIT:
                continue
            values = [default] if given is None else given if isinstance(given, list) else [given]
            attrs.append(B.seq(B.oid(attr_oid), B.tlv(0x31, b"".join(sorted(values)))))
        attrs += list(extra_attrs)
        attrs_set = B.set_of(*attrs)
        signature = self.key.sign(attrs_set, padding.PKCS1v15(), hash_cls())
        signer_info = B.seq(
            B.integer(1),
            B.issuer_and_serial(self.cert),
            B.alg_id(digest_oid),
            b"\xa0" + attrs_set[1:],
            B.alg_id(OID_RSA, B.NULL),
            B.octets(signature),
        )
        encap = B.seq(B.oid(econtent_type), B.ctx(0, B.octets(econtent)))
        sd = B.seq(
            B.integer(1),
            B.set_of(B.alg_id(digest_oid)),
            encap,
            B.ctx(0, self.cert_der if certificates is None else certificates),
            B.tlv(0x31, signer_info * signer_infos),
        )
        return bytes(B.seq(B.oid(OID_SIGNED_DATA), B.ctx(0, sd)))



# ---- direct calls into the C core, for arguments the Python face never passes ----


class _Keep:
    def __init__(self) -> None:
        self.bufs: list[Any] = []

    def fill(self, target: Any, data: bytes | None, length: int | None = None) -> None:
        if data:
            buf = ffi.from_buffer(data)
            self.bufs.append(buf)
            target.data = buf
        else:
            target.data = ffi.NULL
        target.len = len(data or b"") if length is None else length


def raw_issue(
    ctx: ScepContext,
    csr: bytes,
    serial: bytes,
    not_before: int,
    not_after: int,
    subject: bytes = b"",
    extensions: bytes = b"",
) -> tuple[int, str, bytes]:
    """scep_issue_batch for one item: (status, error text, certificate DER)."""
    keep = _Keep()
    items = ffi.new("scep_issue_item[]", 1)
    keep.fill(items[0].csr, csr)
    keep.fill(items[0].serial, serial)
    keep.fill(items[0].subject, subject)
    keep.fill(items[0].extensions, extensions)
    items[0].not_before = not_before
    items[0].not_after = not_after
    out = ffi.new("scep_issue_result *[]", 1)
    assert lib.scep_issue_batch(ctx._ctx, items, 1, out) == 1
    r = ffi.gc(out[0], lib.scep_issue_result_free)
    cert = bytes(ffi.buffer(r.cert.data, r.cert.len)) if r.cert.data != ffi.NULL else b""
    return r.status, ffi.string(r.error).decode(), cert


def raw_unwrap_pointer(ctx: ScepContext, data: bytes | None, length: int) -> tuple[int, str]:
    """scep_unwrap_batch with a scep_buf of the given pointer and length."""
    keep = _Keep()
    bufs = ffi.new("scep_buf[]", 1)
    keep.fill(bufs[0], data, length)
    out = ffi.new("scep_unwrap_result *[]", 1)
    assert lib.scep_unwrap_batch(ctx._ctx, bufs, 1, out) == 1
    r = ffi.gc(out[0], lib.scep_unwrap_result_free)
    return r.status, ffi.string(r.error).decode()


def raw_wrap_without_request(ctx: ScepContext, pki_status: int) -> tuple[int, str]:
    """scep_wrap_batch for an item whose request pointer is NULL."""
    items = ffi.new("scep_wrap_item[]", 1)
    items[0].request = ffi.NULL
    items[0].pki_status = pki_status
    items[0].fail_info = -1 if pki_status != 2 else 2
    out = ffi.new("scep_wrap_result *[]", 1)
    assert lib.scep_wrap_batch(ctx._ctx, items, 1, out) == 1
    r = ffi.gc(out[0], lib.scep_wrap_result_free)
    return r.status, ffi.string(r.error).decode()


def raw_certs_only(certs: bytes | None, certs_len: int, crls: bytes | None, crls_len: int) -> int:
    """scep_certs_only with raw lengths; returns its result (1 on success)."""
    keep = _Keep()
    cert_buf = ffi.new("scep_buf *")
    crl_buf = ffi.new("scep_buf *")
    keep.fill(cert_buf, certs, certs_len)
    keep.fill(crl_buf, crls, crls_len)
    out = ffi.new("scep_bytes *")
    err = ffi.new("char[]", lib.SCEP_ERROR_TEXT_LEN)
    ok = lib.scep_certs_only(cert_buf[0], crl_buf[0], out, err, len(err))
    lib.scep_bytes_free(out)
    return int(ok)
