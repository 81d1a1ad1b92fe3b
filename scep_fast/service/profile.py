"""What goes into the certificates we issue: validity and extensions.

Extensions are encoded once per profile and key type, so issuing a
certificate costs no ASN.1 work in Python beyond joining bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from asn1crypto import x509 as asn1_x509

# GeneralName choices we copy from a CSR (RFC 5280 section 4.2.1.6).
COPIED_SAN_TYPES = frozenset({"dns_name", "rfc822_name", "uniform_resource_identifier",
                              "ip_address"})
SAN_PREFIX = {"dns_name": "DNS", "rfc822_name": "email", "uniform_resource_identifier": "URI",
              "ip_address": "IP"}


def der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    octets = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(octets)]) + octets


def der_sequence(content: bytes) -> bytes:
    return b"\x30" + der_length(len(content)) + content


def _extension(name: str, value: object, critical: bool) -> bytes:
    return bytes(asn1_x509.Extension({"extn_id": name, "critical": critical,
                                      "extn_value": value}).dump())


@dataclass(frozen=True, slots=True)
class Profile:
    """How certificates of one kind are made."""

    name: str = "default"
    validity_days: int = 365
    # Device clocks drift: notBefore lies this far in the past.
    backdate_seconds: int = 600
    include_chain: bool = False
    crl_url: str | None = None
    _fixed: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 1 <= self.validity_days <= 3650:
            raise ValueError("validity_days must be between 1 and 3650")
        if not 0 <= self.backdate_seconds <= 86400:
            raise ValueError("backdate_seconds must be between 0 and 86400")
        common = _extension("basic_constraints", {"ca": False}, True) + _extension(
            "extended_key_usage", ["client_auth"], False)
        if self.crl_url:
            common += _extension("crl_distribution_points", [{
                "distribution_point": {"full_name": [{"uniform_resource_identifier":
                                                      self.crl_url}]}}], False)
        # keyUsage by key type: RSA keys also receive keys (TLS RSA, SCEP
        # envelopes); EC keys only sign (RFC 5480 section 3).
        self._fixed["RSA"] = common + _extension(
            "key_usage", {"digital_signature", "key_encipherment"}, True)
        self._fixed["EC"] = common + _extension("key_usage", {"digital_signature"}, True)

    def extensions_der(self, key_type: str, san_der: bytes) -> bytes:
        """The DER Extensions for a certificate with this key type and SAN value."""
        exts = self._fixed[key_type]
        if san_der:
            exts += _extension("subject_alt_name",
                               asn1_x509.GeneralNames.load(san_der), False)
        return der_sequence(exts)

    def validity(self, now: int) -> tuple[int, int]:
        return now - self.backdate_seconds, now + self.validity_days * 86400


def filter_san(san_der: bytes) -> tuple[bytes, tuple[str, ...]]:
    """The CSR's SAN value restricted to DNS, email, URI and IP names, and their text.

    Returns the original bytes when nothing is dropped. Raises ValueError
    when the value does not parse.
    """
    if not san_der:
        return b"", ()
    names = asn1_x509.GeneralNames.load(san_der)
    kept = [n for n in names if n.name in COPIED_SAN_TYPES]
    texts = tuple(f"{SAN_PREFIX[n.name]}:{n.native}" for n in kept)
    if len(kept) == len(names):
        names.native  # noqa: B018 - forces a full parse, so bad input fails here
        return san_der, texts
    if not kept:
        return b"", ()
    return bytes(asn1_x509.GeneralNames(kept).dump()), texts
