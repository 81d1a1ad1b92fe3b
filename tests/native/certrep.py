"""Reads CertReps with asn1crypto, independently of the native core."""

from __future__ import annotations

from dataclasses import dataclass

from asn1crypto import cms, core

SCEP_OIDS = {
    "2.16.840.1.113733.1.9.2": "message_type",
    "2.16.840.1.113733.1.9.3": "pki_status",
    "2.16.840.1.113733.1.9.4": "fail_info",
    "2.16.840.1.113733.1.9.5": "sender_nonce",
    "2.16.840.1.113733.1.9.6": "recipient_nonce",
    "2.16.840.1.113733.1.9.7": "transaction_id",
    "1.3.6.1.5.5.7.24.1": "fail_info_text",
}


@dataclass
class CertRepView:
    digest: str
    attrs: dict[str, object]
    content: bytes  # the eContent: the DER EnvelopedData, or b"" for PENDING/FAILURE
    signer_certs: list[bytes]


def read_certrep(der: bytes) -> CertRepView:
    info = cms.ContentInfo.load(der)
    assert info["content_type"].native == "signed_data"
    sd = info["content"]
    (si,) = list(sd["signer_infos"])
    attrs: dict[str, object] = {}
    for attr in si["signed_attrs"]:
        name = SCEP_OIDS.get(attr["type"].dotted)
        if name is None:
            continue
        (value,) = list(attr["values"])
        raw = value.dump()
        if raw[0] == 0x04:
            attrs[name] = core.OctetString.load(raw).native
        elif raw[0] == 0x0C:
            attrs[name] = core.UTF8String.load(raw).native
        else:
            assert raw[0] == 0x13, f"{name} must be a PrintableString"
            attrs[name] = core.PrintableString.load(raw).native
    econtent = sd["encap_content_info"]["content"]
    content = econtent.native if econtent.native is not None else b""
    certs = [c.chosen.dump() for c in sd["certificates"]] if sd["certificates"].native else []
    return CertRepView(
        digest=si["digest_algorithm"]["algorithm"].native,
        attrs=attrs,
        content=content,
        signer_certs=certs,
    )


def envelope_algorithms(env_der: bytes) -> tuple[str, str, dict[str, object] | None]:
    """(content cipher, key transport algorithm, OAEP parameters) of an EnvelopedData."""
    env = cms.ContentInfo.load(env_der)["content"]
    (ri,) = list(env["recipient_infos"])
    kalg = ri.chosen["key_encryption_algorithm"]
    cipher = env["encrypted_content_info"]["content_encryption_algorithm"]["algorithm"].native
    params = kalg["parameters"].native if kalg["algorithm"].native == "rsaes_oaep" else None
    return cipher, kalg["algorithm"].native, params


def degenerate_certs(der: bytes) -> list[bytes]:
    """The certificates of a certs-only SignedData, in encoded order."""
    sd = cms.ContentInfo.load(der)["content"]
    return [c.chosen.dump() for c in sd["certificates"]]
