"""The enrollment service's stages, driven directly the way the batcher overlaps them.

A batch is prepared (authenticated, issued, replies signed as if recorded)
while the previous batch has not been recorded yet; its commit then decides. A resend or a
conflicting request that the first stage could not see yet must still get
the answer the ledger holds, signed again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from scep_fast.client.messages import build_pkcs_req, generate_key, parse_cert_rep
from scep_fast.protocol import FailInfo, PKIStatus
from scep_fast.runtime import config as config_module
from scep_fast.runtime.ledger_lmdb import LmdbLedger
from scep_fast.runtime.pki import load_material
from scep_fast.runtime.server import build_service, open_ledger
from scep_fast.service.enrollment import EnrollmentService, PreparedBatch
from tests.integration.conftest import CHALLENGE, init_dir


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[EnrollmentService, LmdbLedger, x509.Certificate]]:
    config = config_module.load(init_dir(tmp_path / "pki"))
    material = load_material(config)
    ledger = open_ledger(config)
    try:
        yield (build_service(config, material, ledger), ledger,
               x509.load_der_x509_certificate(material.ra_cert))
    finally:
        ledger.close()


def _prepare(enrollment: EnrollmentService, messages: list[bytes]) -> PreparedBatch:
    """Every stage before the commit (no validators are configured)."""
    batch = enrollment.authenticate_batch(messages)
    enrollment.issue_batch(batch)
    enrollment.sign_batch(batch)
    return batch


def test_the_commit_decides_for_requests_prepared_before_it(
        service: tuple[EnrollmentService, LmdbLedger, x509.Certificate]) -> None:
    enrollment, ledger, ra = service
    key = generate_key()
    first = build_pkcs_req(ra, cn="stage-one", challenge=CHALLENGE, key=key)
    # Same key, hence the same transactionID, but another CSR.
    conflicting = build_pkcs_req(ra, cn="stage-one-other", challenge=CHALLENGE, key=key)

    batch_a = _prepare(enrollment, [first.message])
    # Prepared before batch_a is committed: the ledger does not know the transaction yet.
    batch_b = _prepare(enrollment, [first.message, conflicting.message])
    (answer_a,) = enrollment.record_batch(batch_a)
    resend, conflict = enrollment.record_batch(batch_b)

    assert answer_a.status == "SUCCESS" and answer_a.serial is not None
    reply_a = parse_cert_rep(answer_a.body, first, ra_certs=[ra])
    assert reply_a.certificates[0].serial_number == answer_a.serial

    # The resend gets the recorded certificate, not the one its batch issued.
    assert resend.status == "SUCCESS" and resend.serial == answer_a.serial
    reply = parse_cert_rep(resend.body, first, ra_certs=[ra])
    assert reply.status is PKIStatus.SUCCESS
    assert reply.certificates[0].serial_number == answer_a.serial

    assert conflict.status == "FAILURE" and conflict.serial is None
    reply = parse_cert_rep(conflict.body, conflicting, ra_certs=[ra])
    assert reply.status is PKIStatus.FAILURE and reply.fail_info is FailInfo.BAD_REQUEST

    recorded = [r for r in ledger.iter_records() if r.transaction_id == first.transaction_id]
    assert [r.serial for r in recorded] == [answer_a.serial]


def test_a_failed_commit_sends_no_signed_reply(
        service: tuple[EnrollmentService, LmdbLedger, x509.Certificate]) -> None:
    enrollment, ledger, ra = service
    request = build_pkcs_req(ra, cn="commit-fails", challenge=CHALLENGE)
    batch = _prepare(enrollment, [request.message])
    ledger.close()  # the commit cannot happen
    (answer,) = enrollment.record_batch(batch)
    assert answer.error is not None and answer.error.http_status == 500
    assert answer.body == b"" and answer.serial is None


def test_serials_grow_with_time_and_keep_96_random_bits(
        service: tuple[EnrollmentService, LmdbLedger, x509.Certificate]) -> None:
    enrollment, _ledger, ra = service
    serials = []
    for i in range(3):
        request = build_pkcs_req(ra, cn=f"serial-{i}", challenge=CHALLENGE)
        (answer,) = enrollment.handle_batch([request.message])
        assert answer.status == "SUCCESS" and answer.serial is not None
        serials.append(answer.serial)
        time.sleep(0.002)
    # Each later than the last (the ledger's record tree grows at its right
    # edge), above every 127-bit serial of older versions, at most 20 octets.
    assert serials == sorted(serials)
    assert all(1 << 127 < s < 1 << 159 for s in serials)
    # The random low bits differ even between serials issued close together.
    assert len({s & ((1 << 96) - 1) for s in serials}) == 3
