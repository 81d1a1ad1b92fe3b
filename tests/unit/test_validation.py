"""External validation as the service applies it: fail closed, per request, by the same rules.

The verdicts are set the way the runtime's validation stage sets them
(``PreparedBatch.set_verdicts``); the stage itself is tested in
``test_validation_stage.py`` and against real servers in the integration tests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, cast

import pytest
from asn1crypto import core
from asn1crypto import csr as asn1_csr
from asn1crypto import keys as asn1_keys
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from scep_fast.client.messages import (
    PkiRequest,
    build_pkcs_req,
    build_pki_message,
    build_renewal_req,
    build_signer_certificate,
    generate_key,
    parse_cert_rep,
    transaction_id_for,
)
from scep_fast.protocol import FailInfo, MessageType, PKIStatus
from scep_fast.service.challenges import mint_challenge
from scep_fast.service.enrollment import Answer, EnrollmentService, Policy
from scep_fast.service.ledger import Ledger
from scep_fast.service.validation import ValidationFailed, ValidationRequest, Verdict
from tests.unit.harness import PROFILES, STATIC, Clock, Pki

Decide = Callable[[ValidationRequest], "Verdict | BaseException | None"]


class Validated:
    """The service with validators configured; ``decide`` plays their part."""

    def __init__(self, pki: Pki, ledger: Ledger, clock: Clock, *,
                 challenge_by_validators: bool = False) -> None:
        self.pki, self.ledger, self.clock = pki, ledger, clock
        self.enrollment = EnrollmentService(
            pki.context(pki.ca_pair), ledger,
            Policy(static_challenge=STATIC.encode(), external_validation=True,
                   challenge_by_validators=challenge_by_validators),
            PROFILES, [pki.ca_pair[0]], clock=clock)
        self.asked: list[ValidationRequest] = []

    def send(self, decide: Decide, *requests: PkiRequest) -> list[Answer]:
        batch = self.enrollment.authenticate_batch([r.message for r in requests])
        asked = batch.validation_requests()
        self.asked += asked
        verdicts = [decide(r) for r in asked]
        if all(v is not None for v in verdicts):
            batch.set_verdicts(cast(list[Verdict | BaseException], verdicts))
        self.enrollment.issue_batch(batch)
        self.enrollment.sign_batch(batch)
        return self.enrollment.record_batch(batch)

    def reply(self, decide: Decide, request: PkiRequest) -> Any:
        (answer,) = self.send(decide, request)
        assert answer.error is None, answer.reason
        return parse_cert_rep(answer.body, request, ra_certs=[self.pki.ra])


def allow(_r: ValidationRequest) -> Verdict:
    return Verdict(allow=True)


@pytest.fixture
def validated(pki: Pki, ledger: Ledger, clock: Clock) -> Validated:
    return Validated(pki, ledger, clock)


def test_an_allowed_request_is_issued_and_the_validator_saw_what_the_device_sent(
        validated: Validated) -> None:
    request = build_pkcs_req(validated.pki.ra, cn="device-1", challenge=STATIC,
                             sans=("device-1.example",))
    rep = validated.reply(allow, request)
    assert rep.status is PKIStatus.SUCCESS
    (asked,) = validated.asked
    assert asked.transaction_id == request.transaction_id
    assert asked.message_type == "PKCSReq"
    assert asked.challenge == STATIC
    assert asked.subject == "CN=device-1"
    assert asked.sans == ("DNS:device-1.example",) or "device-1.example" in asked.sans[0]
    assert asked.profile == "default" and not asked.renewal
    assert x509.load_der_x509_csr(asked.csr_der).subject.rfc4514_string() == "CN=device-1"
    assert asked.signer_der
    # The challenge is a secret: never in a repr that could reach a log.
    assert STATIC not in repr(asked)


def test_a_denied_request_gets_a_signed_failure_with_the_reason_and_nothing_is_recorded(
        validated: Validated) -> None:
    request = build_pkcs_req(validated.pki.ra, cn="device-2", challenge=STATIC)
    rep = validated.reply(lambda _r: Verdict(allow=False, reason="device not compliant"),
                          request)
    assert rep.status is PKIStatus.FAILURE and rep.fail_info is FailInfo.BAD_REQUEST
    assert rep.fail_info_text == "refused by validation: device not compliant"
    assert validated.ledger.count() == 0


@pytest.mark.parametrize("verdict", [
    None,                                          # the stage never ran: fail closed
    ValidationFailed("webhook answered 500"),
    RuntimeError("anything at all"),
])
def test_no_verdict_or_a_failed_one_refuses(validated: Validated,
                                            verdict: BaseException | None) -> None:
    request = build_pkcs_req(validated.pki.ra, cn="device-3", challenge=STATIC)
    (answer,) = validated.send(lambda _r: verdict, request)
    rep = parse_cert_rep(answer.body, request, ra_certs=[validated.pki.ra])
    assert rep.status is PKIStatus.FAILURE and rep.fail_info is FailInfo.BAD_REQUEST
    assert rep.fail_info_text == "the request could not be validated"
    assert validated.ledger.count() == 0


def test_one_denied_request_in_a_batch_fails_alone(validated: Validated) -> None:
    requests = [build_pkcs_req(validated.pki.ra, cn=f"batch-{i}", challenge=STATIC)
                for i in range(4)]

    def decide(r: ValidationRequest) -> Verdict:
        return Verdict(allow=r.subject != "CN=batch-2", reason="no")

    answers = validated.send(decide, *requests)
    assert [a.status for a in answers] == ["SUCCESS", "SUCCESS", "FAILURE", "SUCCESS"]
    assert validated.ledger.count() == 3


def test_the_validator_may_choose_the_profile_and_its_rules_then_apply(
        validated: Validated) -> None:
    # dns-only allows DNS names only: under it an email SAN is refused, which
    # the default profile the challenge grants would have allowed.
    with_email = build_pkcs_req(validated.pki.ra, cn="device-4", challenge=STATIC,
                                sans=("device-4.example", "owner@example.com"))
    rep = validated.reply(lambda _r: Verdict(allow=True, profile="dns-only"), with_email)
    assert rep.status is PKIStatus.FAILURE and "owner@example.com" in (rep.fail_info_text or "")
    assert validated.ledger.count() == 0
    dns_only = build_pkcs_req(validated.pki.ra, cn="device-4b", challenge=STATIC,
                              sans=("device-4b.example",))
    rep = validated.reply(lambda _r: Verdict(allow=True, profile="dns-only"), dns_only)
    assert rep.status is PKIStatus.SUCCESS
    (record,) = list(validated.ledger.iter_records())
    assert record.profile == "dns-only"


def test_a_chosen_profile_may_not_give_names_the_validator_was_not_shown(
        validated: Validated) -> None:
    # The challenge grants dns-only, so the validator is shown the DNS name
    # alone; choosing the default profile would add the URI and the mailbox.
    secret = mint_challenge(validated.ledger, now=validated.clock(), ttl_seconds=3600, uses=1,
                            profile="dns-only", profiles=PROFILES).secret
    request = build_pkcs_req(validated.pki.ra, cn="device-5", challenge=secret,
                             sans=("device-5.example", "uri:https://admin.example/",
                                   "email:ceo@example.com"))
    rep = validated.reply(lambda _r: Verdict(allow=True, profile="default"), request)
    assert [a.sans for a in validated.asked] == [("DNS:device-5.example",)]
    assert rep.status is PKIStatus.FAILURE and rep.fail_info is FailInfo.BAD_REQUEST
    assert "other names" in (rep.fail_info_text or "")
    assert validated.ledger.count() == 0


def _csr_with_raw_common_name(key: rsa.RSAPrivateKey, value_tlv: bytes) -> bytes:
    """A CSR whose CN is ``value_tlv`` as given (OpenSSL reads it, cryptography may not)."""
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    def tlv(tag: int, content: bytes) -> bytes:  # short lengths only
        return bytes([tag, len(content)]) + content

    cn = asn1_x509.Name.load(tlv(0x30, tlv(0x31, tlv(0x30, b"\x06\x03\x55\x04\x03"
                                                     + value_tlv))))
    info = asn1_csr.CertificationRequestInfo({
        "version": "v1", "subject": cn, "subject_pk_info": asn1_keys.PublicKeyInfo.load(spki),
        "attributes": [asn1_csr.CRIAttribute({"type": "challenge_password",
                                              "values": [core.PrintableString(STATIC)]})]})
    signature = key.sign(info.dump(), padding.PKCS1v15(), hashes.SHA256())
    return asn1_csr.CertificationRequest({
        "certification_request_info": info, "signature_algorithm": {"algorithm": "sha256_rsa"},
        "signature": signature}).dump()


def test_a_subject_that_cannot_be_read_fails_alone(validated: Validated) -> None:
    # A PrintableString may not hold "_" or "@" (X.680): OpenSSL reads it,
    # cryptography refuses it, and the subject is read as text first for the
    # validators' request.
    key = cast(rsa.RSAPrivateKey, generate_key())
    csr = _csr_with_raw_common_name(key, b"\x13\x05a_b@c")
    odd = build_pki_message(MessageType.PKCS_REQ, csr, recipient=validated.pki.ra,
                            signer_key=key, signer_cert=build_signer_certificate(key, "odd"),
                            transaction_id=transaction_id_for(key.public_key()), csr=csr)
    good = [build_pkcs_req(validated.pki.ra, cn=f"good-{i}", challenge=STATIC)
            for i in range(2)]
    answers = validated.send(allow, good[0], odd, good[1])
    assert [a.status for a in answers] == ["SUCCESS", "FAILURE", "SUCCESS"]
    assert [r.subject for r in validated.asked] == ["CN=good-0", "CN=good-1"]
    rep = parse_cert_rep(answers[1].body, odd, ra_certs=[validated.pki.ra])
    assert rep.fail_info is FailInfo.BAD_REQUEST
    assert validated.ledger.count() == 2


def test_a_profile_that_does_not_exist_refuses(validated: Validated) -> None:
    request = build_pkcs_req(validated.pki.ra, cn="device-5", challenge=STATIC)
    rep = validated.reply(lambda _r: Verdict(allow=True, profile="no-such"), request)
    assert rep.status is PKIStatus.FAILURE
    assert "profile" in (rep.fail_info_text or "")
    assert validated.ledger.count() == 0


def test_a_renewal_is_validated_and_may_not_change_its_profile(validated: Validated) -> None:
    key = cast(rsa.RSAPrivateKey, generate_key())
    first = build_pkcs_req(validated.pki.ra, cn="device-6", challenge=STATIC, key=key)
    old = validated.reply(allow, first).certificates[0]
    renewal = build_renewal_req(validated.pki.ra, old_cert=old, old_key=key, cn="device-6")
    rep = validated.reply(lambda _r: Verdict(allow=True, profile="dns-only"), renewal)
    assert rep.status is PKIStatus.FAILURE
    assert "renewal keeps the profile" in (rep.fail_info_text or "")
    assert validated.asked[-1].renewal and validated.asked[-1].message_type == "RenewalReq"
    again = build_renewal_req(validated.pki.ra, old_cert=old, old_key=key, cn="device-6")
    assert validated.reply(allow, again).status is PKIStatus.SUCCESS


def test_a_resend_of_an_issued_transaction_is_answered_without_asking_again(
        validated: Validated) -> None:
    request = build_pkcs_req(validated.pki.ra, cn="device-7", challenge=STATIC)
    first = validated.reply(allow, request)
    asked_before = len(validated.asked)

    def refuse_everything(_r: ValidationRequest) -> Verdict:
        raise AssertionError("a resend must not be validated again")

    again = validated.reply(refuse_everything, request)
    assert len(validated.asked) == asked_before
    assert again.certificates[0].serial_number == first.certificates[0].serial_number


def test_a_verdict_reason_is_cut_short_and_loses_control_characters(
        validated: Validated) -> None:
    request = build_pkcs_req(validated.pki.ra, cn="device-8", challenge=STATIC)
    rep = validated.reply(
        lambda _r: Verdict(allow=False, reason="bad\r\nInjected: header" + "x" * 500), request)
    text = rep.fail_info_text or ""
    assert "\n" not in text and "\r" not in text
    assert len(text) <= len("refused by validation: ") + 200


# ---- the challenge checked by the validators --------------------------------


def test_with_validators_checking_the_challenge_ours_is_neither_checked_nor_spent(
        pki: Pki, ledger: Ledger, clock: Clock) -> None:
    validated = Validated(pki, ledger, clock, challenge_by_validators=True)
    request = build_pkcs_req(pki.ra, cn="mdm-device", challenge="an-mdm-one-time-password")
    rep = validated.reply(
        lambda r: Verdict(allow=r.challenge == "an-mdm-one-time-password"), request)
    assert rep.status is PKIStatus.SUCCESS
    wrong = build_pkcs_req(pki.ra, cn="mdm-device-2", challenge="guess")
    rep = validated.reply(
        lambda r: Verdict(allow=r.challenge == "an-mdm-one-time-password",
                          reason="challenge unknown"), wrong)
    assert rep.status is PKIStatus.FAILURE
    assert rep.fail_info_text == "refused by validation: challenge unknown"
    # Nothing of ours was looked up or spent for it.
    assert ledger.get_challenge(hashlib.sha256(b"guess").digest()) is None


def test_without_validators_checking_the_challenge_a_wrong_one_is_refused_before_asking(
        validated: Validated) -> None:
    request = build_pkcs_req(validated.pki.ra, cn="device-9", challenge="wrong")
    rep = validated.reply(allow, request)
    assert rep.status is PKIStatus.FAILURE
    assert validated.asked == []
