"""The notices the enrollment service writes with its commits (what the outbox delivers)."""

from __future__ import annotations

import base64

from cryptography import x509

from scep_fast.client.messages import build_pkcs_req, build_renewal_req
from scep_fast.service.enrollment import EnrollmentService, Policy
from scep_fast.service.ledger_memory import MemoryLedger
from tests.unit.harness import PROFILES, STATIC, Clock, Pki

ALL = frozenset({"issued", "refused", "revoked"})


def service(pki: Pki, ledger: MemoryLedger, *, room: bool = True,
            unnoticed: list[int] | None = None,
            revoke_on_replace: bool = False) -> EnrollmentService:
    return EnrollmentService(
        pki.context(pki.ca_pair), ledger,
        Policy(static_challenge=STATIC.encode(), revoke_on_replace=revoke_on_replace), PROFILES,
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


def test_a_renewal_that_replaces_notices_the_revocation_with_its_certificate(
        pki: Pki) -> None:
    ledger = MemoryLedger()
    enrollment = service(pki, ledger, revoke_on_replace=True)
    first = build_pkcs_req(pki.ra, cn="renewing", challenge=STATIC)
    (answer,) = enrollment.handle_batch([first.message])
    assert answer.serial is not None
    old = ledger.get(answer.serial)
    assert old is not None
    renewal = build_renewal_req(pki.ra, old_cert=x509.load_der_x509_certificate(old.der),
                                old_key=first.signer_key, cn="renewing")
    (renewed,) = enrollment.handle_batch([renewal.message])
    assert renewed.status == "SUCCESS"
    replaced = ledger.get(old.serial)
    assert replaced is not None and replaced.status == "revoked"
    revoked = [n for n in ledger.iter_notices() if n.event == "revoked"]
    # The webhook takes revocations, Intune does not; written with the new record.
    assert [(n.sink, n.serial) for n in revoked] == [("webhook", renewed.serial)]
    document = revoked[0].document()
    assert document["serial"] == f"{old.serial:x}" and document["revocation_reason"] == 4


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
