"""Certificate profiles: what a request may ask for and what the certificate gets.

A profile is chosen by the challenge (a one-time challenge names one) or by
the configuration (the static challenge uses the default profile; a renewal
keeps the profile of the certificate it replaces). Extensions that do not
depend on the request are encoded once per profile and key type, so issuing
costs no ASN.1 work in Python beyond joining bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from asn1crypto import x509 as asn1_x509
from cryptography import x509

# GeneralName choices we copy from a CSR (RFC 5280 section 4.2.1.6), by the
# names profiles use for them.
SAN_TYPES = {"dns": "dns_name", "email": "rfc822_name", "uri": "uniform_resource_identifier",
             "ip": "ip_address"}
SAN_PREFIX = {"dns_name": "DNS", "rfc822_name": "email", "uniform_resource_identifier": "URI",
              "ip_address": "IP"}
KEY_TYPES = ("rsa", "ec")
KEY_USAGES = ("digital_signature", "non_repudiation", "key_encipherment", "data_encipherment",
              "key_agreement")
EXTENDED_KEY_USAGES = ("client_auth", "server_auth", "email_protection", "code_signing",
                       "ocsp_signing", "time_stamping", "ipsec_ike")


# RFC 3279 section 2.3.1 (RSA) and RFC 5480 section 3 (EC): the key usages
# each key type may carry, and what a profile without key_usage gives it.
_KEY_USAGE_ALLOWED = {
    "RSA": {"digital_signature", "non_repudiation", "key_encipherment", "data_encipherment"},
    "EC": {"digital_signature", "non_repudiation", "key_agreement"},
}
_DEFAULT_KEY_USAGE = {"RSA": {"digital_signature", "key_encipherment"},
                      "EC": {"digital_signature"}}

# RFC 5280 section 4.2.1.6: a dNSName in the preferred name syntax of RFC 1034
# section 3.5 (letters, digits and hyphens; no wildcard, which would let one
# device speak for every name below it), an rfc822Name that is a mailbox, a
# uniformResourceIdentifier that is absolute (it has a scheme).
_DNS_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_DNS_NAME = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")
_MAILBOX = re.compile(rf"[^@\s\x00-\x1f\x7f]+@{_DNS_LABEL}(?:\.{_DNS_LABEL})*")
_ABSOLUTE_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s\x00-\x1f\x7f]+")
_SAN_SYNTAX = {"dns_name": _DNS_NAME, "rfc822_name": _MAILBOX,
               "uniform_resource_identifier": _ABSOLUTE_URI}
# The GeneralName choices that are IA5Strings (RFC 5280 section 4.2.1.6).
_IA5_NAMES = frozenset(_SAN_SYNTAX)


class ProfileViolation(ValueError):
    """The request asks for something the profile does not allow; the text says what."""


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
    """How certificates of one kind are made, and what requests they accept."""

    name: str = "default"
    validity_days: int = 365
    # Device clocks drift: notBefore lies this far in the past.
    backdate_seconds: int = 600
    key_types: tuple[str, ...] = KEY_TYPES
    min_rsa_bits: int = 2048
    san_types: tuple[str, ...] = tuple(SAN_TYPES)
    # Every SAN value must match this regular expression in full ("" allows any).
    san_pattern: str = ""
    # "" keeps the CSR's subject; otherwise an RFC 4514 string in which
    # {cn} stands for the CSR's common name, e.g. "CN={cn},O=Example".
    subject_template: str = ""
    # () chooses by key type: RSA digitalSignature + keyEncipherment, EC
    # digitalSignature only (RFC 5480 section 3). A usage the key type may
    # not have (keyAgreement for RSA, key or data encipherment for EC) is
    # left out of that type's certificates.
    key_usage: tuple[str, ...] = ()
    extended_key_usage: tuple[str, ...] = ("client_auth",)
    include_chain: bool = False
    require_approval: bool = False
    # A subject with more than one CN is refused unless this is set: a
    # relying party may read either one.
    allow_multiple_cn: bool = False
    # A renewal keeps every name of the certificate it renews unless this is
    # set; then it may ask for fewer SANs. It never gets other names.
    renewal_may_drop_sans: bool = False
    crl_url: str | None = None
    _fixed: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 1 <= self.validity_days <= 3650:
            raise ValueError("validity_days must be between 1 and 3650")
        if not 0 <= self.backdate_seconds <= 86400:
            raise ValueError("backdate_seconds must be between 0 and 86400")
        _subset(self.key_types, KEY_TYPES, "key_types")
        _subset(self.san_types, tuple(SAN_TYPES), "san_types")
        _subset(self.key_usage, KEY_USAGES, "key_usage")
        _subset(self.extended_key_usage, EXTENDED_KEY_USAGES, "extended_key_usage")
        if not self.key_types:
            raise ValueError("key_types must name at least one key type")
        if self.san_pattern:
            try:
                re.compile(self.san_pattern)
            except re.error as e:
                raise ValueError(f"san_pattern: {e}") from None
        if self.subject_template:
            # Checked once here so a bad template never reaches a request.
            self.render_subject("example")
        common = _extension("basic_constraints", {"ca": False}, True)
        if self.extended_key_usage:
            # RFC 3161 section 2.3: a time-stamping certificate's
            # extendedKeyUsage is critical.
            common += _extension("extended_key_usage", list(self.extended_key_usage),
                                 "time_stamping" in self.extended_key_usage)
        if self.crl_url:
            point = asn1_x509.DistributionPointName(
                name="full_name",
                value=[asn1_x509.GeneralName(name="uniform_resource_identifier",
                                             value=self.crl_url)])
            common += _extension("crl_distribution_points",
                                 [{"distribution_point": point}], False)
        for key_type, default in _DEFAULT_KEY_USAGE.items():
            chosen = set(self.key_usage) & _KEY_USAGE_ALLOWED[key_type] or default
            self._fixed[key_type] = common + _extension("key_usage", chosen, True)

    def extensions_der(self, key_type: str, san_der: bytes, *, subject_empty: bool) -> bytes:
        """The DER Extensions for a certificate with this key type and SAN value.

        RFC 5280 section 4.2.1.6: when the subject is empty, the names are in
        the subjectAltName alone, and the extension must be critical.
        """
        exts = self._fixed[key_type]
        if san_der:
            exts += _extension("subject_alt_name",
                               asn1_x509.GeneralNames.load(san_der), subject_empty)
        return der_sequence(exts)

    def validity(self, now: int) -> tuple[int, int]:
        return now - self.backdate_seconds, now + self.validity_days * 86400

    def check_key(self, key_type: str, bits: int, curve: str) -> None:
        """Raises ProfileViolation unless the profile accepts this key."""
        if key_type.lower() not in self.key_types:
            raise ProfileViolation(f"profile {self.name} does not accept {key_type} keys")
        if key_type == "RSA" and bits < self.min_rsa_bits:
            raise ProfileViolation(f"RSA keys need at least {self.min_rsa_bits} bits")
        if key_type == "EC" and curve not in ("prime256v1", "secp384r1"):
            raise ProfileViolation(f"curve {curve or 'unknown'} is not accepted (P-256, P-384)")

    def filter_san(self, san_der: bytes) -> tuple[bytes, tuple[str, ...]]:
        """The CSR's SAN value restricted to the profile's types, and their text.

        Names of other types are dropped (a device asking for more than it
        may have gets less, not a refusal); a name of an allowed type that
        does not match ``san_pattern`` refuses the request. Raises
        ProfileViolation when the value does not parse.
        """
        if not san_der:
            return b"", ()
        try:
            names = asn1_x509.GeneralNames.load(san_der)
            allowed = {SAN_TYPES[t] for t in self.san_types}
            kept = [n for n in names if n.name in allowed]
            values = [san_value(n) for n in kept]
        except (ValueError, TypeError, KeyError):
            raise ProfileViolation("subjectAltName does not parse") from None
        texts = tuple(f"{SAN_PREFIX[n.name]}:{v}" for n, v in zip(kept, values, strict=True))
        for n, value in zip(kept, values, strict=True):
            syntax = _SAN_SYNTAX.get(n.name)
            too_long = n.name == "dns_name" and len(value) > 253
            if syntax is not None and (too_long or syntax.fullmatch(value) is None):
                raise ProfileViolation(f"subjectAltName {value!r} is not a valid "
                                       f"{SAN_PREFIX[n.name]} name")
        if self.san_pattern:
            for value in values:
                if re.fullmatch(self.san_pattern, value) is None:
                    raise ProfileViolation(f"subjectAltName {value!r} is not allowed")
        if len(kept) == len(names):
            return san_der, texts
        if not kept:
            return b"", ()
        return bytes(asn1_x509.GeneralNames(kept).dump()), texts

    def render_subject(self, cn: str) -> x509.Name:
        """The subject for a request whose common name is ``cn``."""
        text = self.subject_template.replace("{cn}", _escape_rfc4514(cn))
        try:
            name = x509.Name.from_rfc4514_string(text)
        except ValueError as e:
            raise ProfileViolation(f"subject template gives an invalid name: {e}") from None
        return name


def _escape_rfc4514(value: str) -> str:
    out = []
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;=' or (ch == "#" and i == 0) or (ch == " " and i in (0, len(value) - 1)):
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def _subset(values: tuple[str, ...], allowed: tuple[str, ...], name: str) -> None:
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ValueError(f"{name}: unknown {', '.join(unknown)} (allowed: {', '.join(allowed)})")


EMPTY_NAME = b"\x30\x00"


def common_names(subject_der: bytes) -> list[str]:
    """Every common name of a DER Name, in the order of its RDNs."""
    name = asn1_x509.Name.load(subject_der)
    return [str(v) for k, v in _attributes(name) if k == "common_name"]


def common_name(subject_der: bytes) -> str:
    """The last common name of a DER Name, or ""."""
    cns = common_names(subject_der)
    return cns[-1] if cns else ""


def san_value(name: asn1_x509.GeneralName) -> str:
    """A subjectAltName's value as the certificate carries it, for rules and records.

    A DNS name, a mailbox and a URI are their IA5String's own characters, not
    asn1crypto's reading of them, which percent-decodes URIs and turns IDNA
    labels into Unicode: a pattern checked on that reading would pass
    ``https://good.example%2f@evil.example/`` as ``https://good.example/...``
    while every relying party reads the host ``evil.example`` from the
    certificate. ValueError if such a value is not ASCII.
    """
    if name.name in _IA5_NAMES:
        return bytes(name.chosen.contents).decode("ascii")
    return str(name.native)


def general_names(san_der: bytes) -> list[asn1_x509.GeneralName]:
    """The names of a subjectAltName value ("" gives none), or ProfileViolation."""
    if not san_der:
        return []
    try:
        names = asn1_x509.GeneralNames.load(san_der)
        return list(names)
    except (ValueError, TypeError, KeyError):
        raise ProfileViolation("subjectAltName does not parse") from None


def _attributes(name: asn1_x509.Name) -> list[tuple[str, object]]:
    return [(attr["type"].native, attr["value"].native) for rdn in name.chosen for attr in rdn]
