"""GetCACaps rendering (RFC 8894 §3.5.2 and INTEROP.md)."""

from __future__ import annotations

import dataclasses

import pytest

from scep_fast.protocol import Capabilities

FULL = Capabilities(
    aes=True,
    des3=True,
    get_next_ca_cert=True,
    post_pki_operation=True,
    renewal=True,
    sha1=True,
    sha256=True,
    sha512=True,
    scep_standard=True,
)

STANDARD = Capabilities(
    aes=True,
    post_pki_operation=True,
    renewal=True,
    sha256=True,
    sha512=True,
    scep_standard=True,
)


def test_full_render_is_exact() -> None:
    assert FULL.render() == (
        b"AES\nDES3\nGetNextCACert\nPOSTPKIOperation\nRenewal\n"
        b"SHA-1\nSHA-256\nSHA-512\nSCEPStandard"
    )


def test_standard_lists_implied_keywords_explicitly() -> None:
    lines = STANDARD.render().split(b"\n")
    assert lines == [
        b"AES",
        b"POSTPKIOperation",
        b"Renewal",
        b"SHA-256",
        b"SHA-512",
        b"SCEPStandard",
    ]


def test_nothing_is_advertised_by_default() -> None:
    assert Capabilities().render() == b""
    assert Capabilities().keywords() == ()


# The keyword table of RFC 8894 §3.5.2, spelled exactly.
RFC_KEYWORDS = {
    "AES",
    "DES3",
    "GetNextCACert",
    "POSTPKIOperation",
    "Renewal",
    "SHA-1",
    "SHA-256",
    "SHA-512",
    "SCEPStandard",
}


def test_lf_separated_exact_rfc_spellings() -> None:
    body = FULL.render()
    assert b"\r" not in body
    assert not body.endswith(b"\n")
    assert set(body.decode("ascii").split("\n")) == RFC_KEYWORDS


@pytest.mark.parametrize(
    ("field", "keyword"),
    [
        ("aes", "AES"),
        ("des3", "DES3"),
        ("get_next_ca_cert", "GetNextCACert"),
        ("post_pki_operation", "POSTPKIOperation"),
        ("renewal", "Renewal"),
        ("sha1", "SHA-1"),
        ("sha256", "SHA-256"),
        ("sha512", "SHA-512"),
    ],
)
def test_each_keyword_follows_its_flag(field: str, keyword: str) -> None:
    on = Capabilities(**{field: True})
    assert on.render() == keyword.encode()
    off = dataclasses.replace(FULL, **{field: False, "scep_standard": False})
    assert keyword not in off.keywords()


def test_get_next_ca_cert_only_when_enabled() -> None:
    assert b"GetNextCACert" not in STANDARD.render()
    assert b"GetNextCACert" in dataclasses.replace(STANDARD, get_next_ca_cert=True).render()


@pytest.mark.parametrize("missing", ["aes", "post_pki_operation", "sha256"])
def test_scep_standard_requires_what_it_implies(missing: str) -> None:
    with pytest.raises(ValueError, match="scep_standard"):
        dataclasses.replace(STANDARD, **{missing: False})


def test_order_is_fixed_whatever_the_construction_order() -> None:
    a = Capabilities(sha512=True, aes=True, renewal=True)
    b = Capabilities(renewal=True, aes=True, sha512=True)
    assert a.render() == b.render() == b"AES\nRenewal\nSHA-512"


def test_flags_must_be_bools() -> None:
    with pytest.raises(TypeError, match="aes"):
        Capabilities(aes=1)  # type: ignore[arg-type]


def test_frozen_and_slotted() -> None:
    assert not hasattr(FULL, "__dict__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        FULL.aes = False  # type: ignore[misc]
