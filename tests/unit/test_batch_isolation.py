"""One message that breaks a step of the batch fails alone.

For each step of the pipeline (unwrap, signer parsing, the renewal lookup,
the rules, issue, the record, wrap) a fault is injected for one message of a
batch of four; the three others must get their certificates, signed and on
record, and the broken one an answer its step allows: a signed FAILURE once
the message is authenticated, a plain 400 before, never a 5xx.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from scep_fast.client.messages import (
    PkiRequest,
    build_pkcs_req,
    build_renewal_req,
    parse_cert_rep,
)
from scep_fast.crypto import CertRepSpec, IssueRequest, ScepContext, Unwrapped
from scep_fast.protocol import PKIStatus, StorageFull, StorageUnavailable
from scep_fast.service import authorization, enrollment
from scep_fast.service.ledger import LedgerFull, LedgerUnavailable
from tests.unit.harness import STATIC, Service

POISON_CN = "poisoned"


class Injected(RuntimeError):
    """The fault a test injects (any exception type a library might raise)."""


def _is_poisoned_unwrapped(u: Unwrapped) -> bool:
    return u.csr is not None and POISON_CN.encode() in u.csr.subject_der


def _fault_in_batch(monkeypatch: pytest.MonkeyPatch, name: str,
                    poisoned: Callable[[Any], bool]) -> None:
    """ScepContext.<name> raises whenever its batch holds the poisoned input."""
    original = getattr(ScepContext, name)

    def batch(self: ScepContext, inputs: Sequence[Any]) -> Any:
        if any(poisoned(i) for i in inputs):
            raise Injected(name)
        return original(self, inputs)

    monkeypatch.setattr(ScepContext, name, batch)


def _poison_unwrap(monkeypatch: pytest.MonkeyPatch, poison: PkiRequest) -> None:
    _fault_in_batch(monkeypatch, "unwrap_batch", lambda m: m == poison.message)


def _poison_signer(monkeypatch: pytest.MonkeyPatch, poison: PkiRequest) -> None:
    original = authorization.Signer.parse
    der = poison.signer_cert.public_bytes(serialization.Encoding.DER)

    def parse(der_in: bytes, key_sha256: bytes) -> authorization.Signer:
        if der_in == der:
            raise Injected("signer")
        return original(der_in, key_sha256)

    monkeypatch.setattr(authorization.Signer, "parse", staticmethod(parse))


def _poison_rules(monkeypatch: pytest.MonkeyPatch, poison: PkiRequest) -> None:
    original = authorization.Authorizer.authorize

    def authorize(self: authorization.Authorizer, message_type: Any, csr: Any,
                  csr_der: bytes, signer: authorization.Signer,
                  **kwargs: Any) -> authorization.Grant:
        if POISON_CN.encode() in csr.subject_der:
            raise ValueError("rules")
        return original(self, message_type, csr, csr_der, signer, **kwargs)

    monkeypatch.setattr(authorization.Authorizer, "authorize", authorize)


def _poison_issue(monkeypatch: pytest.MonkeyPatch, poison: PkiRequest) -> None:
    _fault_in_batch(monkeypatch, "issue_batch",
                    lambda r: isinstance(r, IssueRequest) and r.request is not None
                    and _is_poisoned_unwrapped(r.request))


def _poison_record(monkeypatch: pytest.MonkeyPatch, poison: PkiRequest) -> None:
    original = enrollment.cert_record

    def cert_record(issue: IssueRequest, der: bytes, grant: authorization.Grant,
                    **kwargs: Any) -> Any:
        if POISON_CN in grant.subject_text:
            raise UnicodeDecodeError("utf-8", b"", 0, 1, "record")
        return original(issue, der, grant, **kwargs)

    monkeypatch.setattr(enrollment, "cert_record", cert_record)


def _poison_wrap(monkeypatch: pytest.MonkeyPatch, poison: PkiRequest) -> None:
    _fault_in_batch(monkeypatch, "wrap_batch",
                    lambda spec: isinstance(spec, CertRepSpec)
                    and _is_poisoned_unwrapped(spec.request))


STAGES = {
    "unwrap": _poison_unwrap,
    "signer": _poison_signer,
    "rules": _poison_rules,
    "issue": _poison_issue,
    "record": _poison_record,
    "wrap": _poison_wrap,
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_fault_in_one_message_fails_only_that_message(
        service: Service, monkeypatch: pytest.MonkeyPatch, stage: str) -> None:
    goods = [build_pkcs_req(service.pki.ra, cn=f"good-{i}", challenge=STATIC) for i in range(3)]
    poison = build_pkcs_req(service.pki.ra, cn=POISON_CN, challenge=STATIC)
    STAGES[stage](monkeypatch, poison)
    batch = [goods[0], poison, goods[1], goods[2]]
    answers = service.send(*batch)
    for request, answer in zip(batch, answers, strict=True):
        if request is poison:
            assert answer.status != "SUCCESS"
            if answer.error is not None:
                assert answer.error.http_status == 400, answer.reason
            else:
                assert answer.status == "FAILURE" and answer.body
            continue
        assert answer.error is None, answer.reason
        assert answer.status == "SUCCESS"
        reply = parse_cert_rep(answer.body, request, ra_certs=[service.pki.ra])
        assert reply.status is PKIStatus.SUCCESS
        assert service.ledger.get(reply.certificates[0].serial_number) is not None
    assert service.ledger.count() == 3


def test_a_renewal_lookup_that_raises_fails_only_that_renewal(
        service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    old_key = build_pkcs_req(service.pki.ra, cn="renewing", challenge=STATIC)
    old = service.issued(old_key)
    renewal = build_renewal_req(service.pki.ra, old_cert=old, old_key=old_key.signer_key,
                                cn="renewing")
    original = type(service.ledger).get

    def get(self: Any, serial: int) -> Any:
        if serial == old.serial_number:
            raise OSError("renewal lookup")
        return original(self, serial)

    monkeypatch.setattr(type(service.ledger), "get", get)
    goods = [build_pkcs_req(service.pki.ra, cn=f"good-{i}", challenge=STATIC) for i in range(2)]
    answers = service.send(goods[0], renewal, goods[1])
    assert [a.status for a in answers] == ["SUCCESS", "FAILURE", "SUCCESS"]
    assert answers[1].body and answers[1].error is None
    assert service.ledger.count() == 3


def test_a_full_ledger_answers_503_and_nothing_leaves(
        service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*_args: Any, **_kwargs: Any) -> Any:
        raise LedgerFull("the map size is used up")

    monkeypatch.setattr(type(service.ledger), "commit", full)
    answers = service.send(*[build_pkcs_req(service.pki.ra, cn=f"full-{i}", challenge=STATIC)
                             for i in range(3)])
    for answer in answers:
        assert isinstance(answer.error, StorageFull), answer.reason
        assert answer.error.http_status == 503 and answer.error.retry_after_seconds >= 1
        assert answer.body == b"" and answer.serial is None
    monkeypatch.setattr(type(service.ledger), "add_pending", full)
    secret = service.challenge(profile="approval")
    (pending,) = service.send(build_pkcs_req(service.pki.ra, cn="full-pending",
                                             challenge=secret))
    assert isinstance(pending.error, StorageFull)
    assert service.uses_left(secret) == 1


@pytest.mark.parametrize("failing", ["find_transactions", "commit"])
def test_a_ledger_out_of_reach_answers_503_and_nothing_leaves(
        service: Service, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    def unavailable(*_args: Any, **_kwargs: Any) -> Any:
        raise LedgerUnavailable("the database is restarting")

    monkeypatch.setattr(type(service.ledger), failing, unavailable)
    answers = service.send(*[build_pkcs_req(service.pki.ra, cn=f"away-{i}", challenge=STATIC)
                             for i in range(3)])
    for answer in answers:
        assert isinstance(answer.error, StorageUnavailable), answer.reason
        assert answer.error.http_status == 503 and answer.error.retry_after_seconds >= 1
        assert answer.body == b"" and answer.serial is None
    monkeypatch.undo()
    assert service.ledger.count() == 0

