"""Certificate profiles: what they accept and what they put in certificates."""

from __future__ import annotations

import ipaddress

import pytest
from asn1crypto import x509 as asn1_x509
from cryptography import x509

from scep_fast.service.profile import Profile, ProfileViolation, common_name


def san_der(*names: x509.GeneralName) -> bytes:
    return x509.SubjectAlternativeName(list(names)).public_bytes()


def extensions(der: bytes) -> dict[str, object]:
    exts = asn1_x509.Extensions.load(der)
    return {e["extn_id"].native: e["extn_value"].native for e in exts}


def test_key_usage_follows_the_key_type() -> None:
    profile = Profile()
    rsa = extensions(profile.extensions_der("RSA", b"", subject_empty=False))
    ec = extensions(profile.extensions_der("EC", b"", subject_empty=False))
    assert set(rsa["key_usage"]) == {"digital_signature", "key_encipherment"}
    assert set(ec["key_usage"]) == {"digital_signature"}
    assert rsa["extended_key_usage"] == ["client_auth"]
    assert rsa["basic_constraints"] == {"ca": False, "path_len_constraint": None}


def test_crl_distribution_point_names_the_url() -> None:
    profile = Profile(crl_url="http://pki.example/crl/ab.crl")
    exts = extensions(profile.extensions_der("RSA", b"", subject_empty=False))
    point = exts["crl_distribution_points"][0]["distribution_point"]
    assert point == ["http://pki.example/crl/ab.crl"]


def test_keys_are_checked() -> None:
    profile = Profile(key_types=("rsa",), min_rsa_bits=3072)
    profile.check_key("RSA", 3072, "")
    with pytest.raises(ProfileViolation, match="3072"):
        profile.check_key("RSA", 2048, "")
    with pytest.raises(ProfileViolation, match="EC"):
        profile.check_key("EC", 256, "prime256v1")
    with pytest.raises(ProfileViolation, match="curve"):
        Profile().check_key("EC", 521, "secp521r1")


def test_san_types_outside_the_profile_are_dropped_and_patterns_refuse() -> None:
    value = san_der(x509.DNSName("a.example"), x509.RFC822Name("me@example"),
                    x509.IPAddress(ipaddress.ip_address("10.0.0.1")))
    kept, texts = Profile(san_types=("dns",)).filter_san(value)
    assert texts == ("DNS:a.example",)
    assert asn1_x509.GeneralNames.load(kept).native == ["a.example"]
    all_kept, all_texts = Profile().filter_san(value)
    assert all_kept == value and len(all_texts) == 3
    with pytest.raises(ProfileViolation, match="b.other"):
        Profile(san_pattern=r".*\.example").filter_san(san_der(x509.DNSName("b.other")))
    with pytest.raises(ProfileViolation, match="parse"):
        Profile().filter_san(b"\x30\x05garbage")


def test_san_rules_and_texts_use_the_names_as_encoded() -> None:
    # asn1crypto would read these as "https://good.example/@evil.example/" and
    # "bücher.example"; the certificate carries them as below.
    value = san_der(x509.UniformResourceIdentifier("https://good.example%2f@evil.example/"),
                    x509.DNSName("xn--bcher-kva.example"))
    kept, texts = Profile().filter_san(value)
    assert kept == value
    assert texts == ("URI:https://good.example%2f@evil.example/", "DNS:xn--bcher-kva.example")
    with pytest.raises(ProfileViolation, match="not allowed"):
        Profile(san_types=("uri",), san_pattern=r"https://good\.example/.*").filter_san(value)


def test_subject_template_escapes_the_common_name() -> None:
    name = Profile(subject_template="CN={cn},O=Devices").render_subject("a,b+c")
    assert name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "a,b+c"
    assert common_name(name.public_bytes()) == "a,b+c"
    with pytest.raises(ValueError):
        Profile(subject_template="not a name")


def test_bad_profiles_are_refused_when_built() -> None:
    for bad in ({"validity_days": 0}, {"key_types": ()}, {"key_types": ("dsa",)},
                {"san_pattern": "("}, {"extended_key_usage": ("flying",)}):
        with pytest.raises(ValueError):
            Profile(**bad)  # type: ignore[arg-type]
