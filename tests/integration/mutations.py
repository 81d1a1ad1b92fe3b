"""Hostile PKCSReqs: valid messages broken in the ways an attacker or a broken client would.

Outer mutations break the bytes as sent (bit flips, truncation, length and
tag corruption, swapped OIDs): most die at parsing or at the signature.
Inner mutations are signed and encrypted properly around a broken part (the
CSR, the envelope, the signed attributes, the signer certificate), so they
pass the outer checks and reach decryption, CSR parsing and the rules.
Every choice comes from one seeded ``random.Random``: a failure names its seed.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass

from asn1crypto import cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from scep_fast.client import build_csr, build_signer_certificate, generate_key
from scep_fast.client.messages import build_envelope

_MESSAGE_TYPE = "2.16.840.1.113733.1.9.2"
_TRANSACTION_ID = "2.16.840.1.113733.1.9.7"
_SENDER_NONCE = "2.16.840.1.113733.1.9.5"

# OIDs that stand in our messages, in groups of equal encoded length: a swap
# keeps the structure and changes the meaning.
_OID_GROUPS = [
    ["2.16.840.1.101.3.4.2.1", "2.16.840.1.101.3.4.2.2", "2.16.840.1.101.3.4.2.3",
     "2.16.840.1.101.3.4.1.2", "2.16.840.1.101.3.4.1.42"],   # SHA-2 and AES
    ["1.2.840.113549.1.7.1", "1.2.840.113549.1.7.2", "1.2.840.113549.1.7.3"],  # CMS types
    ["1.2.840.113549.1.1.1", "1.2.840.113549.1.1.7", "1.2.840.113549.1.1.11",
     "1.2.840.113549.1.1.5"],                                  # RSA, OAEP, signatures
    ["1.2.840.113549.1.9.3", "1.2.840.113549.1.9.4", "1.2.840.113549.1.9.7"],  # attributes
]


def _oid_der(dotted: str) -> bytes:
    return bytes(core.ObjectIdentifier(dotted).dump())


@dataclass(frozen=True)
class Device:
    """A requester: its RSA key and self-signed certificate."""

    key: rsa.RSAPrivateKey
    cert: x509.Certificate

    @classmethod
    def new(cls, name: str) -> Device:
        key = generate_key()
        assert isinstance(key, rsa.RSAPrivateKey)
        return cls(key, build_signer_certificate(key, name))


def signed_message(envelope: bytes, device: Device, *, message_type: bytes = b"19",
                   transaction_id: bytes | None = None, nonce: bytes | None = None,
                   cert_der: bytes | None = None, drop: str = "") -> bytes:
    """A pkiMessage over ``envelope`` with these attribute values, signed by ``device``."""
    attrs: dict[str, object] = {
        "content_type": "data",
        "message_digest": hashlib.sha256(envelope).digest(),
        _MESSAGE_TYPE: core.PrintableString(message_type.decode("latin-1")),
        _TRANSACTION_ID: core.PrintableString(
            (transaction_id or os.urandom(16).hex().encode()).decode("latin-1")),
        _SENDER_NONCE: core.OctetString(os.urandom(16) if nonce is None else nonce),
    }
    attrs.pop(drop, None)
    signed_attrs = cms.CMSAttributes([{"type": k, "values": [v]} for k, v in attrs.items()])
    attrs_der = signed_attrs.dump(force=True)
    signature = device.key.sign(attrs_der, padding.PKCS1v15(), hashes.SHA256())
    cert = asn1_x509.Certificate.load(
        cert_der or device.cert.public_bytes(serialization.Encoding.DER))
    real = asn1_x509.Certificate.load(device.cert.public_bytes(serialization.Encoding.DER))
    signer_info = cms.SignerInfo({
        "version": "v1",
        "sid": cms.SignerIdentifier({"issuer_and_serial_number": {
            "issuer": real.issuer, "serial_number": real.serial_number}}),
        "digest_algorithm": {"algorithm": "sha256"},
        "signed_attrs": signed_attrs,
        "signature_algorithm": {"algorithm": "rsassa_pkcs1v15"},
        "signature": signature,
    })
    signed = cms.SignedData({
        "version": "v1", "digest_algorithms": [{"algorithm": "sha256"}],
        "encap_content_info": {"content_type": "data", "content": envelope},
        "certificates": [cert], "signer_infos": [signer_info]})
    return bytes(cms.ContentInfo({"content_type": "signed_data", "content": signed}).dump())


def _headers(data: bytes, start: int = 0, end: int | None = None,
             depth: int = 0) -> list[tuple[int, int]]:
    """(offset, header length) of every DER element found below ``data[start:end]``."""
    end = len(data) if end is None else end
    found: list[tuple[int, int]] = []
    i = start
    while i + 2 <= end and depth < 12 and len(found) < 400:
        tag, first = data[i], data[i + 1]
        if tag & 0x1F == 0x1F:
            return found  # high tag numbers do not occur in our messages
        if first < 0x80:
            length, head = first, 2
        elif 0x81 <= first <= 0x84 and i + 2 + (first & 0x7F) <= end:
            n = first & 0x7F
            length, head = int.from_bytes(data[i + 2:i + 2 + n], "big"), 2 + n
        else:
            return found
        if i + head + length > end:
            return found
        found.append((i, head))
        if tag & 0x20 or tag == 0x04:  # constructed, or an OCTET STRING that may hold DER
            found += _headers(data, i + head, i + head + length, depth + 1)
        i += head + length
    return found


class Mutator:
    """Makes hostile messages around one valid request's parts."""

    def __init__(self, rng: random.Random, ra: x509.Certificate, challenge: str) -> None:
        self.rng, self.ra, self.challenge = rng, ra, challenge
        self.devices = [Device.new(f"hostile-{i}") for i in range(4)]
        self.kinds: list[Callable[[], bytes]] = [
            self.bit_flips, self.truncated, self.extended, self.length_corrupted,
            self.tag_corrupted, self.oid_swapped, self.inner_csr, self.inner_envelope,
            self.odd_attributes, self.odd_signer,
        ]

    def message(self) -> bytes:
        return self.rng.choice(self.kinds)()

    # ---- the parts ------------------------------------------------------------

    def _device(self) -> Device:
        return self.rng.choice(self.devices)

    def _csr(self, device: Device) -> bytes:
        return build_csr(device.key, f"hostile-{self.rng.randrange(10**9)}",
                         challenge=self.challenge)

    def _valid(self) -> bytes:
        device = self._device()
        return signed_message(build_envelope(self._csr(device), self.ra), device)

    def _flip(self, data: bytes, flips: int) -> bytes:
        out = bytearray(data)
        for _ in range(flips):
            out[self.rng.randrange(len(out))] ^= 1 << self.rng.randrange(8)
        return bytes(out)

    # ---- outer mutations ---------------------------------------------------------

    def bit_flips(self) -> bytes:
        return self._flip(self._valid(), self.rng.randint(1, 8))

    def truncated(self) -> bytes:
        data = self._valid()
        return data[:self.rng.randrange(len(data))]

    def extended(self) -> bytes:
        return self._valid() + os.urandom(self.rng.randint(1, 64))

    def length_corrupted(self) -> bytes:
        data = bytearray(self._valid())
        offset, head = self.rng.choice(_headers(bytes(data)))
        choice = self.rng.randrange(4)
        if choice == 0:
            data[offset + 1] = self.rng.randrange(0x80)
        elif choice == 1:
            data[offset + 1] = 0x80  # indefinite length where DER has none
        elif choice == 2:
            data[offset + head - 1] ^= 0xFF
        else:
            data[offset + 1:offset + head] = b"\x84\xff\xff\xff\xff"
        return bytes(data)

    def tag_corrupted(self) -> bytes:
        data = bytearray(self._valid())
        offset, _head = self.rng.choice(_headers(bytes(data)))
        data[offset] = self.rng.randrange(256)
        return bytes(data)

    def oid_swapped(self) -> bytes:
        data = self._valid()
        present = [(group, oid) for group in _OID_GROUPS for oid in group
                   if _oid_der(oid) in data]
        if not present:
            return self._flip(data, 1)
        group, oid = self.rng.choice(present)
        other = self.rng.choice([o for o in group if o != oid])
        return data.replace(_oid_der(oid), _oid_der(other), self.rng.randint(1, 3))

    # ---- inner mutations: properly signed around a broken part ---------------------

    def inner_csr(self) -> bytes:
        device = self._device()
        csr = self._csr(device)
        broken = (self._flip(csr, self.rng.randint(1, 6)) if self.rng.random() < 0.7
                  else csr[:self.rng.randrange(len(csr))])
        return signed_message(build_envelope(broken, self.ra), device)

    def inner_envelope(self) -> bytes:
        device = self._device()
        envelope = build_envelope(self._csr(device), self.ra)
        if self.rng.random() < 0.5:
            envelope = self._flip(envelope, self.rng.randint(1, 6))
        else:
            offset, _head = self.rng.choice(_headers(envelope))
            envelope = envelope[:offset] + bytes([self.rng.randrange(256)]) + envelope[offset + 1:]
        return signed_message(envelope, device)

    def odd_attributes(self) -> bytes:
        device = self._device()
        envelope = build_envelope(self._csr(device), self.ra)
        choice = self.rng.randrange(6)
        if choice == 0:
            return signed_message(envelope, device, message_type=self.rng.choice(
                [b"99", b"", b"3", b"-1", b"19 ", b"1" * 40, b"\x00"]))
        if choice == 1:
            return signed_message(envelope, device, nonce=os.urandom(self.rng.choice(
                [0, 1, 7, 65, 4000])))
        if choice == 2:
            return signed_message(envelope, device, transaction_id=self.rng.choice(
                [b"", b"x" * 5000, b"\x00\x01", "é".encode(), b"a b*c"]))
        if choice == 3:
            return signed_message(envelope, device, drop=self.rng.choice(
                ["content_type", "message_digest", _MESSAGE_TYPE, _TRANSACTION_ID,
                 _SENDER_NONCE]))
        if choice == 4:
            return signed_message(envelope, device, message_type=self.rng.choice(
                [b"17", b"20", b"21", b"22"]))  # other types carrying a CSR
        return signed_message(self._csr(device), device)  # a CSR where the envelope goes

    def odd_signer(self) -> bytes:
        """The signer certificate is not covered by the signature: anything may stand there."""
        device = self._device()
        envelope = build_envelope(self._csr(device), self.ra)
        der = device.cert.public_bytes(serialization.Encoding.DER)
        choice = self.rng.randrange(4)
        if choice == 0:
            cert = der.replace(b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01"
                               + bytes([self.rng.choice([3, 7, 0x7F, 0xFF])]), 1)
        elif choice == 1:
            cert = self._flip(der, self.rng.randint(1, 4))
        elif choice == 2:
            cert = der[:self.rng.randrange(len(der))]
        else:
            cert = self._device().cert.public_bytes(serialization.Encoding.DER)  # not the signer
        try:
            return signed_message(envelope, device, cert_der=cert)
        except ValueError:  # too broken for our own encoder to embed
            return signed_message(envelope, device, cert_der=der.replace(
                b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x07", 1))
