"""Who may have which certificate, tried as a hostile device would.

Each test drives the enrollment service the way a worker does (native
unwrap, the rules, native issue and wrap, the ledger commit) with
``MemoryLedger`` and with the LMDB ledger, and reads the signed answer as
the device would.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from typing import Any, cast

import pytest
from asn1crypto import algos, cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from scep_fast.client.messages import (
    PkiRequest,
    build_csr,
    build_envelope,
    build_pkcs_req,
    build_pki_message,
    build_renewal_req,
    build_signer_certificate,
    generate_key,
    transaction_id_for,
)
from scep_fast.protocol import FailInfo, MessageType, PKIStatus
from scep_fast.service.enrollment import Policy
from scep_fast.service.ledger import Ledger
from scep_fast.service.ledger_memory import MemoryLedger
from tests.unit.harness import STATIC, Clock, Pki, Service


def _key(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def _sans(cert: x509.Certificate) -> list[x509.GeneralName]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def _request_with_csr(pki: Pki, csr: bytes, *, signer_key: rsa.RSAPrivateKey,
                      signer_cert: x509.Certificate,
                      message_type: MessageType = MessageType.PKCS_REQ,
                      transaction_id: str | None = None) -> PkiRequest:
    return build_pki_message(
        message_type, csr, recipient=pki.ra, signer_key=signer_key, signer_cert=signer_cert,
        transaction_id=transaction_id or transaction_id_for(signer_key.public_key()), csr=csr)


def _names_csr(key: Any, subject: x509.Name, sans: list[x509.GeneralName],
               challenge: str | None) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if challenge is not None:
        builder = builder.add_attribute(x509.oid.AttributeOID.CHALLENGE_PASSWORD,
                                        challenge.encode())
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _enroll_with(service: Service, subject: x509.Name, sans: list[x509.GeneralName],
                 challenge: str | None) -> tuple[PkiRequest, rsa.RSAPrivateKey]:
    key = cast(rsa.RSAPrivateKey, generate_key())
    csr = _names_csr(key, subject, sans, challenge)
    return _request_with_csr(service.pki, csr, signer_key=key,
                             signer_cert=build_signer_certificate(key, "device")), key


def _cn(*values: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, v) for v in values])


def _enrolled(service: Service, cn: str = "deviceA", sans: tuple[str, ...] = (),
              challenge: str = STATIC) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = cast(rsa.RSAPrivateKey, generate_key())
    cert = service.issued(build_pkcs_req(service.pki.ra, cn=cn, challenge=challenge, key=key,
                                         sans=sans))
    return cert, key


# ---- renewal is bound to the identity it renews ------------------------------------


def test_a_renewal_cannot_take_another_identity(service: Service) -> None:
    old, old_key = _enrolled(service, "deviceA", ("devicea.corp.example",))
    for message in (
        build_renewal_req(service.pki.ra, old_cert=old, old_key=old_key,
                          cn="admin.corp.example", sans=("admin.corp.example",)),
        build_renewal_req(service.pki.ra, old_cert=old, old_key=old_key,
                          cn="deviceA", sans=("admin.corp.example",)),
        build_renewal_req(service.pki.ra, old_cert=old, old_key=old_key,
                          cn="admin.corp.example", sans=("devicea.corp.example",)),
    ):
        text = service.refused(message)
        assert "renewal" in text


def test_a_pkcsreq_signed_by_our_certificate_cannot_take_another_identity(
        service: Service) -> None:
    # Cisco and macOS renew with a PKCSReq signed by the old certificate.
    old, old_key = _enrolled(service, "deviceA")
    new_key = cast(rsa.RSAPrivateKey, generate_key())
    csr = build_csr(new_key, "admin.corp.example", sans=("admin.corp.example",))
    request = _request_with_csr(service.pki, csr, signer_key=old_key, signer_cert=old,
                                transaction_id=transaction_id_for(new_key.public_key()))
    assert "subject" in service.refused(request)


def test_a_renewal_may_not_add_names(service: Service) -> None:
    old, old_key = _enrolled(service, "deviceA", ("a.corp.example",))
    more = build_renewal_req(service.pki.ra, old_cert=old, old_key=old_key, cn="deviceA",
                             sans=("a.corp.example", "b.corp.example"))
    assert "add" in service.refused(more)


def test_a_renewal_keeps_subject_sans_and_profile_and_certifies_the_new_key(
        service: Service) -> None:
    secret = service.challenge(profile="dns-only")
    old, old_key = _enrolled(service, "deviceA", ("a.corp.example",), challenge=secret)
    new_key = cast(rsa.RSAPrivateKey, generate_key())
    renewed = service.issued(build_renewal_req(
        service.pki.ra, old_cert=old, old_key=old_key, cn="deviceA", key=new_key,
        sans=("a.corp.example",)))
    assert renewed.subject == old.subject
    assert _sans(renewed) == _sans(old)
    assert _key(renewed) == new_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    record = service.ledger.get(renewed.serial_number)
    assert record is not None and record.profile == "dns-only"


def test_dropping_sans_on_renewal_needs_the_profile(service: Service) -> None:
    old, old_key = _enrolled(service, "deviceA", ("a.corp.example", "b.corp.example"))
    fewer = build_renewal_req(service.pki.ra, old_cert=old, old_key=old_key, cn="deviceA",
                              sans=("a.corp.example",))
    assert "subjectAltNames" in service.refused(fewer)

    secret = service.challenge(profile="may-drop")
    old, old_key = _enrolled(service, "deviceB", ("a.corp.example", "b.corp.example"),
                             challenge=secret)
    renewed = service.issued(build_renewal_req(
        service.pki.ra, old_cert=old, old_key=old_key, cn="deviceB", sans=("a.corp.example",)))
    assert _sans(renewed) == [x509.DNSName("a.corp.example")]
    # Still never another name.
    other = build_renewal_req(service.pki.ra, old_cert=old, old_key=old_key, cn="deviceB",
                              sans=("c.corp.example",))
    assert "add" in service.refused(other)


def test_a_revoked_or_expired_certificate_cannot_renew(service: Service, clock: Clock) -> None:
    old, old_key = _enrolled(service, "deviceA")
    service.ledger.revoke(old.serial_number, 1, clock())
    again = build_renewal_req(service.pki.ra, old_cert=old, old_key=old_key, cn="deviceA")
    assert "revoked" in service.refused(again)
    # A PKCSReq signed by it does not fall back to a challenge either.
    key = cast(rsa.RSAPrivateKey, generate_key())
    csr = build_csr(key, "deviceA", challenge=STATIC)
    assert "revoked" in service.refused(_request_with_csr(
        service.pki, csr, signer_key=old_key, signer_cert=old,
        transaction_id=transaction_id_for(key.public_key())))

    expiring, expiring_key = _enrolled(service, "deviceB")
    clock.now = expiring.not_valid_after_utc.timestamp() + 60
    late = build_renewal_req(service.pki.ra, old_cert=expiring, old_key=expiring_key,
                             cn="deviceB")
    assert "not valid" in service.refused(late)


def test_a_batch_renews_a_certificate_once_when_renewal_replaces_it(
        pki: Pki, ledger: Ledger, clock: Clock) -> None:
    service = Service(pki, ledger, clock, policy=Policy(static_challenge=STATIC.encode(),
                                                        revoke_on_replace=True))
    old, old_key = _enrolled(service, "deviceA")
    # Two new keys, so two transactions, both signed by the one certificate.
    forks = [build_renewal_req(pki.ra, old_cert=old, old_key=old_key, cn="deviceA")
             for _ in range(2)]
    answers = service.send(*forks)
    assert [a.status for a in answers] == ["SUCCESS", "FAILURE"]
    # The first to be recorded replaced it: the other renews a revoked certificate.
    assert "renews is revoked" in answers[1].reason
    records = list(ledger.iter_records())
    assert len(records) == 2
    replaced = ledger.get(old.serial_number)
    assert replaced is not None and replaced.status == "revoked"
    # A resend of the renewal that stood gets its certificate again, in a batch
    # with another fork.
    again = service.send(forks[0], build_renewal_req(pki.ra, old_cert=old, old_key=old_key,
                                                     cn="deviceA"))
    assert again[0].status == "SUCCESS" and again[0].serial == answers[0].serial
    assert again[1].status == "FAILURE"
    assert len(list(ledger.iter_records())) == 2


def test_a_certificate_revoked_while_its_renewal_waited_does_not_renew(
        service: Service, clock: Clock) -> None:
    old, old_key = _enrolled(service, "deviceA")
    renewal = build_renewal_req(service.pki.ra, old_cert=old, old_key=old_key, cn="deviceA")
    enrollment = service.enrollment
    batch = enrollment.authenticate_batch([renewal.message])
    # The operator revokes it while the batch waits (for validators, say).
    service.ledger.revoke(old.serial_number, 1, clock())
    enrollment.issue_batch(batch)
    enrollment.sign_batch(batch)
    (answer,) = enrollment.record_batch(batch)
    assert answer.status == "FAILURE" and "revoked" in answer.reason
    assert service.ledger.count() == 1


def test_a_certificate_of_the_retired_ca_renews_into_the_same_identity(
        pki: Pki, ledger: Ledger, clock: Clock) -> None:
    before = Service(pki, ledger, clock, issuer=pki.old_pair)
    old, old_key = _enrolled(before, "deviceA", ("a.corp.example",))
    after = Service(pki, ledger, clock, issuer=pki.ca_pair, retired=(pki.old_pair,))
    renewed = after.issued(build_renewal_req(pki.ra, old_cert=old, old_key=old_key,
                                             cn="deviceA", sans=("a.corp.example",)))
    assert renewed.issuer != old.issuer and renewed.subject == old.subject
    assert "renewal" in after.refused(build_renewal_req(
        pki.ra, old_cert=old, old_key=old_key, cn="admin", sans=("a.corp.example",)))


def test_a_certificate_of_another_ca_with_our_name_cannot_renew(
        pki: Pki, ledger: Ledger, clock: Clock) -> None:
    impostor = Service(pki, MemoryLedger(), clock, issuer=pki.impostor_pair)
    forged, forged_key = _enrolled(impostor, "admin.corp.example")
    ours = Service(pki, ledger, clock)
    assert forged.issuer == x509.load_der_x509_certificate(pki.ca_pair[0]).subject
    text = ours.refused(build_renewal_req(pki.ra, old_cert=forged, old_key=forged_key,
                                          cn="admin.corp.example"))
    assert "signed by a valid certificate" in text


def test_a_renewal_csr_for_another_key_must_prove_possession(service: Service) -> None:
    old, old_key = _enrolled(service, "deviceA")
    # The CSR names a key the requester does not hold: its signature is
    # made with the old key instead.
    victim = cast(rsa.RSAPrivateKey, generate_key())
    csr = _names_csr(old_key, _cn("deviceA"), [], None)
    parsed = x509.load_der_x509_csr(csr)
    body = asn1_x509_csr_with_key(csr, victim)
    assert x509.load_der_x509_csr(body).public_key() != parsed.public_key()
    request = _request_with_csr(service.pki, body, signer_key=old_key, signer_cert=old,
                                message_type=MessageType.RENEWAL_REQ)
    service.refused(request, FailInfo.BAD_MESSAGE_CHECK)


def asn1_x509_csr_with_key(csr_der: bytes, key: rsa.RSAPrivateKey) -> bytes:
    """The CSR with its public key swapped for ``key``'s and its signature left as it was."""
    from asn1crypto import csr as asn1_csr
    from asn1crypto import keys

    parsed = asn1_csr.CertificationRequest.load(csr_der)
    info = parsed["certification_request_info"]
    info["subject_pk_info"] = keys.PublicKeyInfo.load(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
    return bytes(asn1_csr.CertificationRequest({
        "certification_request_info": info,
        "signature_algorithm": parsed["signature_algorithm"],
        "signature": parsed["signature"],
    }).dump(force=True))


# ---- challenges bind names completely --------------------------------------------------


def test_a_bound_challenge_checks_every_rdn(service: Service) -> None:
    secret = service.challenge(uses=5, subject_pattern=r"CN=device-[0-9]+")
    two_cns, _ = _enroll_with(service, _cn("device-42", "admin.corp.example"), [], secret)
    service.refused(two_cns)
    extra_rdn, _ = _enroll_with(service, x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Corp"),
        x509.NameAttribute(NameOID.COMMON_NAME, "device-42")]), [], secret)
    assert "subject" in service.refused(extra_rdn)
    # A subject-only binding allows no SAN at all.
    with_san, _ = _enroll_with(service, _cn("device-42"), [x509.DNSName("admin.corp.example")],
                               secret)
    assert "subjectAltNames" in service.refused(with_san)
    assert service.uses_left(secret) == 5
    good, _ = _enroll_with(service, _cn("device-42"), [], secret)
    assert service.issued(good).subject == _cn("device-42")
    assert service.uses_left(secret) == 4


def test_more_than_one_cn_needs_the_profile(service: Service) -> None:
    two, _ = _enroll_with(service, _cn("device-42", "admin.corp.example"), [], STATIC)
    assert "one common name" in service.refused(two)
    secret = service.challenge(profile="multi-cn")
    allowed, _ = _enroll_with(service, _cn("device-42", "device-42.corp.example"), [], secret)
    assert service.issued(allowed).subject == _cn("device-42", "device-42.corp.example")


def test_a_bound_challenge_checks_every_san(service: Service) -> None:
    secret = service.challenge(uses=5, subject_pattern=r"CN=device-42",
                               san_pattern=r"device-42\.corp\.example")
    for sans in ([x509.DNSName("device-42.corp.example"), x509.DNSName("admin.corp.example")],
                 [x509.RFC822Name("admin@corp.example")],
                 [x509.UniformResourceIdentifier("https://admin.corp.example")]):
        request, _ = _enroll_with(service, _cn("device-42"), sans, secret)
        assert "subjectAltNames" in service.refused(request)
    good, _ = _enroll_with(service, _cn("device-42"), [x509.DNSName("device-42.corp.example")],
                           secret)
    assert _sans(service.issued(good)) == [x509.DNSName("device-42.corp.example")]


# The host of this URI is evil.example (RFC 3986 section 3.2: "good.example%2f" is
# user information); percent-decoded, it reads as a path under good.example.
SMUGGLED_URI = "https://good.example%2f@evil.example/"


def test_a_bound_challenge_reads_a_uri_as_the_certificate_carries_it(service: Service) -> None:
    secret = service.challenge(uses=2, subject_pattern=r"CN=device-42",
                               san_pattern=r"https://good\.example/.*")
    smuggled, _ = _enroll_with(service, _cn("device-42"),
                               [x509.UniformResourceIdentifier(SMUGGLED_URI)], secret)
    assert "subjectAltNames" in service.refused(smuggled)
    good, _ = _enroll_with(service, _cn("device-42"),
                           [x509.UniformResourceIdentifier("https://good.example/d/42")], secret)
    assert _sans(service.issued(good)) == [
        x509.UniformResourceIdentifier("https://good.example/d/42")]


def test_a_profile_pattern_reads_a_uri_as_the_certificate_carries_it(service: Service) -> None:
    secret = service.challenge(uses=2, profile="good-uris")
    smuggled, _ = _enroll_with(service, _cn("device-42"),
                               [x509.UniformResourceIdentifier(SMUGGLED_URI)], secret)
    assert "not allowed" in service.refused(smuggled)
    escaped = "https://good.example/a%20b"
    good, _ = _enroll_with(service, _cn("device-42"),
                           [x509.UniformResourceIdentifier(escaped)], secret)
    cert = service.issued(good)
    assert _sans(cert) == [x509.UniformResourceIdentifier(escaped)]
    # The ledger records the name as issued, not a decoded reading of it.
    record = service.ledger.get(cert.serial_number)
    assert record is not None and record.sans == (f"URI:{escaped}",)


def test_a_renewal_of_a_bound_certificate_stays_bound(service: Service) -> None:
    secret = service.challenge(subject_pattern=r"CN=kiosk-[0-9]+", san_pattern=r"kiosk-1\..*")
    request, key = _enroll_with(service, _cn("kiosk-1"), [x509.DNSName("kiosk-1.corp.example")],
                                secret)
    old = service.issued(request)
    escape = build_renewal_req(service.pki.ra, old_cert=old, old_key=key, cn="admin",
                               sans=("admin.corp.example",))
    service.refused(escape)


def test_san_types_the_profile_forbids_are_not_issued(service: Service) -> None:
    secret = service.challenge(profile="dns-only")
    request, _ = _enroll_with(service, _cn("device-1"), [
        x509.DNSName("device-1.corp.example"), x509.RFC822Name("ceo@corp.example"),
        x509.UniformResourceIdentifier("https://corp.example/admin")], secret)
    assert _sans(service.issued(request)) == [x509.DNSName("device-1.corp.example")]


@pytest.mark.parametrize("tag", ["printable", "utf8"])
def test_a_challenge_reads_the_same_in_either_string_type(service: Service, tag: str) -> None:
    secret = service.challenge()
    key = cast(rsa.RSAPrivateKey, generate_key())
    encoded = (core.PrintableString(secret) if tag == "printable"
               else core.UTF8String(secret)).dump()
    csr = _csr_with_raw_challenge(key, encoded)
    request = _request_with_csr(service.pki, csr, signer_key=key,
                                signer_cert=build_signer_certificate(key, "device"))
    service.issued(request)
    assert service.uses_left(secret) == 0


def _csr_with_raw_challenge(key: rsa.RSAPrivateKey, value_der: bytes) -> bytes:
    from asn1crypto import csr as asn1_csr
    from asn1crypto import keys

    info = asn1_csr.CertificationRequestInfo({
        "version": "v1",
        "subject": asn1_x509.Name.build({"common_name": "device-1"}),
        "subject_pk_info": keys.PublicKeyInfo.load(key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)),
        "attributes": [{"type": "challenge_password",
                        "values": [core.Any.load(value_der)]}],
    })
    from cryptography.hazmat.primitives.asymmetric import padding

    signature = key.sign(info.dump(), padding.PKCS1v15(), hashes.SHA256())
    return bytes(asn1_csr.CertificationRequest({
        "certification_request_info": info,
        "signature_algorithm": {"algorithm": "sha256_rsa"},
        "signature": signature,
    }).dump())


# ---- a challenge is spent only by a request that passes every check --------------------


def test_a_refused_request_spends_no_challenge(service: Service) -> None:
    secret = service.challenge()
    weak = cast(rsa.RSAPrivateKey, rsa.generate_private_key(65537, 1024))
    csr = build_csr(weak, "device-1", challenge=secret)
    signer = cast(rsa.RSAPrivateKey, generate_key())
    service.refused(_request_with_csr(service.pki, csr, signer_key=signer,
                                      signer_cert=build_signer_certificate(signer, "d")))
    # A CSR whose signature does not verify is refused at issue: nothing spent either.
    victim = cast(rsa.RSAPrivateKey, generate_key())
    forged = asn1_x509_csr_with_key(build_csr(signer, "device-1", challenge=secret), victim)
    service.refused(_request_with_csr(service.pki, forged, signer_key=signer,
                                      signer_cert=build_signer_certificate(signer, "d")),
                    FailInfo.BAD_MESSAGE_CHECK)
    assert service.uses_left(secret) == 1
    service.issued(build_pkcs_req(service.pki.ra, cn="device-1", challenge=secret))
    assert service.uses_left(secret) == 0
    service.refused(build_pkcs_req(service.pki.ra, cn="device-2", challenge=secret))


def test_one_single_use_challenge_twice_in_one_batch_issues_once(service: Service) -> None:
    secret = service.challenge()
    first = build_pkcs_req(service.pki.ra, cn="device-1", challenge=secret)
    second = build_pkcs_req(service.pki.ra, cn="device-2", challenge=secret)
    answers = service.send(first, second)
    assert sorted(a.status for a in answers) == ["FAILURE", "SUCCESS"]
    assert service.ledger.count() == 1


def test_a_pending_request_spends_its_challenge_once(service: Service) -> None:
    secret = service.challenge(profile="approval")
    request = build_pkcs_req(service.pki.ra, cn="device-1", challenge=secret)
    assert service.reply(request).status is PKIStatus.PENDING
    assert service.reply(request).status is PKIStatus.PENDING  # a resend spends nothing
    assert service.uses_left(secret) == 0
    service.refused(build_pkcs_req(service.pki.ra, cn="device-2", challenge=secret))


# ---- resends that match the ledger -------------------------------------------------------


def test_a_revoked_certificate_is_not_delivered_again(service: Service, clock: Clock) -> None:
    request = build_pkcs_req(service.pki.ra, cn="device-1", challenge=STATIC)
    cert = service.issued(request)
    assert service.issued(request).serial_number == cert.serial_number  # a resend
    service.ledger.revoke(cert.serial_number, 1, clock())
    assert "revoked or expired" in service.refused(request)


def test_an_expired_certificate_is_not_delivered_again(service: Service, clock: Clock) -> None:
    request = build_pkcs_req(service.pki.ra, cn="device-1", challenge=STATIC)
    cert = service.issued(request)
    clock.now = cert.not_valid_after_utc.timestamp() + 1
    assert "revoked or expired" in service.refused(request)


def test_a_device_that_keeps_its_key_enrolls_again_after_revocation(
        service: Service, clock: Clock) -> None:
    # sscep and Apple derive the transactionID from the key: same key, same id.
    key = cast(rsa.RSAPrivateKey, generate_key())
    first = build_pkcs_req(service.pki.ra, cn="device-1", challenge=STATIC, key=key)
    cert = service.issued(first)
    other_csr = build_pkcs_req(service.pki.ra, cn="device-1b", challenge=STATIC, key=key)
    assert other_csr.transaction_id == first.transaction_id
    assert "transactionID" in service.refused(other_csr)
    service.ledger.revoke(cert.serial_number, 1, clock())
    again = service.issued(other_csr)
    assert again.serial_number != cert.serial_number
    # The new certificate holds the transaction now: a resend gets it.
    assert service.issued(other_csr).serial_number == again.serial_number


# ---- nothing is issued that cannot be delivered -------------------------------------------


def _ec_signed(pki: Pki, csr: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A PKCSReq signed with an EC key (what a device with only an EC key might send)."""
    name = _cn("ec-device")
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    envelope = build_envelope(csr, pki.ra)
    attrs = cms.CMSAttributes([
        {"type": "content_type", "values": ["data"]},
        {"type": "message_digest", "values": [hashlib.sha256(envelope).digest()]},
        {"type": "2.16.840.1.113733.1.9.2", "values": [core.PrintableString("19")]},
        {"type": "2.16.840.1.113733.1.9.7", "values": [core.PrintableString("ec-tx-1")]},
        {"type": "2.16.840.1.113733.1.9.5", "values": [core.OctetString(os.urandom(16))]},
    ])
    signature = key.sign(attrs.dump(), ec.ECDSA(hashes.SHA256()))
    asn1_cert = asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))
    signer_info = cms.SignerInfo({
        "version": "v1",
        "sid": cms.SignerIdentifier({"issuer_and_serial_number": {
            "issuer": asn1_cert.issuer, "serial_number": asn1_cert.serial_number}}),
        "digest_algorithm": {"algorithm": "sha256"},
        "signed_attrs": attrs,
        "signature_algorithm": algos.SignedDigestAlgorithm({"algorithm": "sha256_ecdsa"}),
        "signature": signature,
    })
    signed = cms.SignedData({
        "version": "v1", "digest_algorithms": [{"algorithm": "sha256"}],
        "encap_content_info": {"content_type": "data", "content": envelope},
        "certificates": [asn1_cert], "signer_infos": [signer_info]})
    return bytes(cms.ContentInfo({"content_type": "signed_data", "content": signed}).dump())


def test_an_ec_signed_request_is_refused_before_anything_is_issued(service: Service) -> None:
    secret = service.challenge()
    key = ec.generate_private_key(ec.SECP256R1())
    csr = build_csr(key, "ec-device", challenge=secret)
    (answer,) = service.enrollment.handle_batch([_ec_signed(service.pki, csr, key)])
    assert answer.error is None, answer.reason
    assert answer.status == "FAILURE" and answer.fail_info == "BAD_ALG"
    assert service.ledger.count() == 0
    assert service.uses_left(secret) == 1


# ---- the certificate itself, and what the client is told ----------------------------------


def test_an_empty_subject_gets_a_critical_san(service: Service) -> None:
    request, _ = _enroll_with(service, x509.Name([]), [x509.DNSName("device-1.corp.example")],
                              STATIC)
    cert = service.issued(request)
    assert cert.subject == x509.Name([])
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical
    # With a subject the SAN stays non-critical.
    named, _ = _enroll_with(service, _cn("device-2"), [x509.DNSName("device-2.corp.example")],
                            STATIC)
    assert not service.issued(named).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).critical


def test_unauthenticated_refusals_say_nothing_of_openssl(service: Service) -> None:
    good = build_pkcs_req(service.pki.ra, cn="device-1", challenge=STATIC)
    broken = bytearray(good.message)
    broken[-40] ^= 0xFF  # inside the signature
    garbage = b"\x30\x82\x01\x00" + os.urandom(256)
    for body in (bytes(broken), garbage, good.message[:200]):
        (answer,) = service.enrollment.handle_batch([body])
        assert answer.error is not None and answer.error.http_status == 400
        assert str(answer.error) in ("the message does not verify",
                                     "the message cannot be decrypted", "malformed request")
        assert "error:" not in str(answer.error) and "OpenSSL" not in str(answer.error)


def test_one_poisoned_signer_certificate_fails_only_its_own_request(service: Service) -> None:
    # The signer certificate is not covered by the signature: a version
    # number out of range passes the native verification and must not
    # reach the rest of the batch through a parser's exception.
    poisoned = build_pkcs_req(service.pki.ra, cn="poisoned", challenge=STATIC)
    version = b"\xa0\x03\x02\x01\x02"
    start = poisoned.message.index(version)
    message = (poisoned.message[:start] + b"\xa0\x03\x02\x01\x07"
               + poisoned.message[start + len(version):])
    goods = [build_pkcs_req(service.pki.ra, cn=f"good-{i}", challenge=STATIC) for i in range(3)]
    answers = service.enrollment.handle_batch(
        [goods[0].message, message, goods[1].message, goods[2].message])
    assert [a.status for i, a in enumerate(answers) if i != 1] == ["SUCCESS"] * 3
    assert answers[1].status != "SUCCESS"
    assert answers[1].error is None or answers[1].error.http_status < 500
    assert service.ledger.count() == 3
