"""The notices the enrollment service writes with its commits (what the outbox delivers)."""

from __future__ import annotations

import base64

from cryptography import x509

from scep_fast.client.messages import build_pkcs_req
from scep_fast.service.enrollment import EnrollmentService, Policy
from scep_fast.service.ledger_memory import MemoryLedger
from tests.unit.harness import PROFILES, STATIC, Clock, Pki

ALL = frozenset({"issued", "refused", "revoked"})


def service(pki: Pki, ledger: MemoryLedger, *, room: bool = True,
            unnoticed: list[int] | None = None) -> EnrollmentService:
    return EnrollmentService(
        pki.context(pki.ca_pair), ledger, Policy(static_challenge=STATIC.encode()), PROFILES,
        [pki.ca_pair[0]], clock=Clock(),
        notice_sinks={"webhook": ALL, "intune": frozenset({"issued", "refused"})},
        refusals_noticed=lambda: room,
        on_refusal_unnoticed=(unnoticed if unnoticed is not None else []).append)


def test_an_issued_certificate_is_noticed_once_per_sink_and_a_resend_not_again(pki: Pki) -> None:
    ledger = MemoryLedger()
    enrollment = service(pki, ledger)
    request = build_pkcs_req(pki.ra, cn="noticed", challenge=STATIC)
    (answer,) = enrollment.handle_batch([request.message])
    assert answer.status == "SUCCESS" and answer.serial is not None
    notices = list(ledger.iter_notices())
    assert sorted(n.sink for n in notices) == ["intune", "webhook"]
    for notice in notices:
        document = notice.document()
        assert notice.event == "issued" and notice.serial == answer.serial
        assert document["serial"] == f"{answer.serial:x}"
        assert document["transaction_id"] == request.transaction_id
        cert = x509.load_der_x509_certificate(base64.b64decode(str(document["certificate"])))
        assert cert.serial_number == answer.serial
    (again,) = enrollment.handle_batch([request.message])
    assert again.serial == answer.serial
    assert ledger.count_notices() == 2


def test_a_refusal_is_noticed_with_the_text_the_device_saw(pki: Pki) -> None:
    ledger = MemoryLedger()
    enrollment = service(pki, ledger)
    (answer,) = enrollment.handle_batch(
        [build_pkcs_req(pki.ra, cn="refused", challenge="wrong").message])
    assert answer.status == "FAILURE"
    notices = list(ledger.iter_notices())
    assert {n.event for n in notices} == {"refused"} and len(notices) == 2
    document = notices[0].document()
    assert document["reason"] == "challenge password is wrong or missing"
    assert document["fail_info"] == "badRequest"
    assert ledger.count() == 0


def test_with_the_outbox_full_refusals_are_not_noticed_but_certificates_are(pki: Pki) -> None:
    ledger = MemoryLedger()
    unnoticed: list[int] = []
    enrollment = service(pki, ledger, room=False, unnoticed=unnoticed)
    answers = enrollment.handle_batch([
        build_pkcs_req(pki.ra, cn="flood-1", challenge="wrong").message,
        build_pkcs_req(pki.ra, cn="good", challenge=STATIC).message,
        build_pkcs_req(pki.ra, cn="flood-2", challenge="wrong").message,
    ])
    assert [a.status for a in answers] == ["FAILURE", "SUCCESS", "FAILURE"]
    assert {n.event for n in ledger.iter_notices()} == {"issued"}
    assert unnoticed == [2]


def test_without_sinks_nothing_is_written(pki: Pki) -> None:
    ledger = MemoryLedger()
    enrollment = EnrollmentService(
        pki.context(pki.ca_pair), ledger, Policy(static_challenge=STATIC.encode()), PROFILES,
        [pki.ca_pair[0]], clock=Clock())
    enrollment.handle_batch([build_pkcs_req(pki.ra, cn="quiet", challenge=STATIC).message,
                             build_pkcs_req(pki.ra, cn="quiet-2", challenge="wrong").message])
    assert ledger.count_notices() == 0
