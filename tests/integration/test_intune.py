"""The Intune client, validator and notifier against the fake Intune
(tests/fake_intune.py) on 127.0.0.1, under trio."""

from __future__ import annotations

import base64
import hashlib
import logging
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import AttributeOID, NameOID

from scep_fast.runtime.http_client import HttpClient
from scep_fast.runtime.intune import (
    E_UNEXPECTED,
    IntuneClient,
    IntuneError,
    IntuneNotifier,
    IntuneSettings,
    IntuneValidator,
)
from scep_fast.service.ledger import CertRecord
from scep_fast.service.notices import (
    Notice,
    NoticeRejected,
    issued_event,
    notices_for,
    refused_event,
    revoked_event,
)
from scep_fast.service.validation import ValidationFailed, ValidationRequest
from tests.fake_intune import (
    CLIENT_SECRET,
    INTUNE_SCOPE,
    FakeIntune,
    serving,
    settings_for,
)

T = TypeVar("T")
CHALLENGE = "intune-challenge-blob-Vx93"
KEY = ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def fake() -> Iterator[FakeIntune]:
    with serving(FakeIntune()) as running:
        yield running


def csr(challenge: str | None = CHALLENGE) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device-42")]))
    if challenge is not None:
        builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, challenge.encode())
    return builder.sign(KEY, hashes.SHA256()).public_bytes(Encoding.DER)


def request(transaction_id: str = "tx-1", challenge: str | None = CHALLENGE) -> ValidationRequest:
    return ValidationRequest(transaction_id=transaction_id, message_type="PKCSReq",
                             csr_der=csr(challenge), subject="CN=device-42", sans=(),
                             challenge=challenge or "")


def run(settings: IntuneSettings, body: Callable[[IntuneClient], Awaitable[T]],
        clock: Callable[[], float] = time.monotonic) -> T:
    async def main() -> T:
        async with IntuneClient(settings, clock=clock) as client:
            return await body(client)
    return trio.run(main)


def validate(fake: FakeIntune, *requests: ValidationRequest, **overrides: Any) -> list[Any]:
    """Each request's verdict, or the exception it raised."""
    async def body(client: IntuneClient) -> list[Any]:
        validator = IntuneValidator(client)
        results: list[Any] = []
        for r in requests:
            try:
                results.append(await validator.validate(r))
            except Exception as e:  # noqa: BLE001 - the test looks at it
                results.append(e)
        return results
    return run(settings_for(fake, **overrides), body)


# --- validation ---

def test_a_known_challenge_is_allowed_with_the_documented_request(fake: FakeIntune) -> None:
    fake.register_challenge(CHALLENGE)
    r = request("tx-allow")
    [verdict] = validate(fake, r)
    assert verdict.allow is True

    [token] = fake.token_requests(INTUNE_SCOPE)
    assert token.path == f"/{fake.tenant}/oauth2/v2.0/token"
    assert token.form() == {"grant_type": "client_credentials", "client_id": fake.client_id,
                            "client_secret": CLIENT_SECRET, "scope": INTUNE_SCOPE}
    [graph_token] = fake.token_requests(fake.graph_scope)
    [discovery] = fake.calls_to("/endpoints")
    assert discovery.method == "GET" and discovery.status == 200
    [call] = fake.calls_to("/ScepActions/validateRequest")
    assert call.status == 200
    # A Graph token for discovery, another for Intune.
    assert discovery.headers["authorization"].startswith("Bearer fake-token-")
    assert call.headers["authorization"].startswith("Bearer fake-token-")
    assert discovery.headers["authorization"] != call.headers["authorization"]
    assert call.headers["api-version"] == "2018-02-20"
    assert call.headers["content-type"] == "application/json"
    assert call.headers["user-agent"] == "scep-fast-tests/1.0"
    uuid.UUID(call.headers["client-request-id"])
    assert call.json() == {"request": {
        "transactionId": "tx-allow",
        "certificateRequest": base64.b64encode(r.csr_der).decode(),
        "callerInfo": "scep-fast-tests/1.0"}}


def test_unknown_and_expired_challenges_are_refused_naming_the_code(fake: FakeIntune) -> None:
    fake.register_challenge("expiring")
    fake.expire_challenge("expiring")
    unknown, expired, missing = validate(
        fake, request("tx-u", "never-registered"), request("tx-e", "expiring"),
        request("tx-m", None))
    assert unknown.allow is False and "ChallengeDeserializationError" in unknown.reason
    assert expired.allow is False and "ChallengeExpired" in expired.reason
    assert missing.allow is False and "ChallengePasswordMissing" in missing.reason
    for verdict, secret in ((unknown, "never-registered"), (expired, "expiring")):
        assert secret not in verdict.reason


@pytest.mark.parametrize("status", [500, 503])
def test_a_5xx_fails_the_validation(fake: FakeIntune, status: int) -> None:
    fake.register_challenge(CHALLENGE)
    fake.fail_status = status
    [failure] = validate(fake, request())
    assert isinstance(failure, ValidationFailed)
    assert str(status) in str(failure)


def test_a_slow_answer_fails_within_the_timeout(fake: FakeIntune) -> None:
    fake.register_challenge(CHALLENGE)
    fake.delay_seconds = 5.0
    started = time.monotonic()
    [failure] = validate(fake, request(), timeout_seconds=0.5)
    elapsed = time.monotonic() - started
    assert isinstance(failure, ValidationFailed)
    assert elapsed < 2.0  # 0.5 s for the whole exchange, with room for a busy machine


@pytest.mark.parametrize("answer", [
    b"not json",
    b"[1, 2]",
    b'{"errorDescription": "no code"}',
    b'{"code": "SomethingNobodyDocumented", "errorDescription": ""}',
    b'{"code": "Success", "errorDescription": "' + b"x" * (80 * 1024) + b'"}',
])
def test_a_malformed_unknown_or_oversized_answer_fails(fake: FakeIntune, answer: bytes) -> None:
    fake.register_challenge(CHALLENGE)
    fake.raw_answer = answer
    [failure] = validate(fake, request())
    assert isinstance(failure, ValidationFailed)


def test_a_wrong_secret_fails_without_showing_it(fake: FakeIntune) -> None:
    fake.register_challenge(CHALLENGE)
    [failure] = validate(fake, request(), secret="not-the-secret-Kq2")
    assert isinstance(failure, ValidationFailed)
    assert "401" in str(failure) and "invalid_client" in str(failure)
    assert "not-the-secret-Kq2" not in str(failure)


def test_a_shared_http_client_is_used_and_left_open(fake: FakeIntune) -> None:
    fake.register_challenge(CHALLENGE)

    async def main() -> tuple[bool, bool]:
        http = HttpClient()
        async with IntuneClient(settings_for(fake), http) as client:
            verdict = await IntuneValidator(client).validate(request())
        # Still usable: the shared client was left open.
        again = await http.request("GET", f"{fake.base_url}/nothing-here")
        await http.aclose()
        return verdict.allow, again.status == 404

    assert trio.run(main) == (True, True)


# --- tokens ---

def test_one_token_and_one_discovery_serve_many_validations(fake: FakeIntune) -> None:
    fake.register_challenge(CHALLENGE)
    verdicts = validate(fake, *(request(f"tx-{i}") for i in range(4)))
    assert [v.allow for v in verdicts] == [True] * 4
    assert len(fake.token_requests(INTUNE_SCOPE)) == 1
    assert len(fake.token_requests(fake.graph_scope)) == 1
    assert len(fake.calls_to("/endpoints")) == 1
    assert len(fake.calls_to("/ScepActions/validateRequest")) == 4


def test_concurrent_validations_share_one_token(fake: FakeIntune) -> None:
    fake.register_challenge(CHALLENGE)

    async def body(client: IntuneClient) -> list[bool]:
        validator = IntuneValidator(client)
        allowed: list[bool] = []

        async def one(i: int) -> None:
            allowed.append((await validator.validate(request(f"tx-{i}"))).allow)
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(one, i)
        return allowed

    assert run(settings_for(fake), body) == [True] * 8
    assert len(fake.token_requests(INTUNE_SCOPE)) == 1
    assert len(fake.calls_to("/endpoints")) == 1


def test_a_token_is_replaced_before_it_expires(fake: FakeIntune) -> None:
    fake.register_challenge(CHALLENGE)
    now = [1000.0]

    async def body(client: IntuneClient) -> list[bool]:
        validator = IntuneValidator(client)
        first = await validator.validate(request("tx-1"))
        now[0] += 3600 - 300 - 1     # still inside the lifetime less the margin
        second = await validator.validate(request("tx-2"))
        now[0] += 2                  # inside the margin: time for a new one
        third = await validator.validate(request("tx-3"))
        return [first.allow, second.allow, third.allow]

    assert run(settings_for(fake), body, clock=lambda: now[0]) == [True] * 3
    tokens = fake.token_requests(INTUNE_SCOPE)
    assert len(tokens) == 2
    calls = fake.calls_to("/ScepActions/validateRequest")
    # The new token was fetched ahead of time: Intune never saw the old one refused.
    assert [c.status for c in calls] == [200, 200, 200]
    assert calls[1].headers["authorization"] != calls[2].headers["authorization"]
    assert calls[0].headers["authorization"] == calls[1].headers["authorization"]


def test_short_lived_tokens_are_renewed_at_half_their_life(fake: FakeIntune) -> None:
    fake.register_challenge(CHALLENGE)
    fake.token_lifetime_seconds = 1

    async def body(client: IntuneClient) -> list[bool]:
        validator = IntuneValidator(client)
        first = await validator.validate(request("tx-1"))
        await trio.sleep(0.6)  # past half the lifetime, before the end
        second = await validator.validate(request("tx-2"))
        return [first.allow, second.allow]

    assert run(settings_for(fake), body) == [True, True]
    assert len(fake.token_requests(INTUNE_SCOPE)) == 2
    assert [c.status for c in fake.calls_to("/ScepActions/validateRequest")] == [200, 200]


def test_a_revoked_token_is_replaced_once_and_the_call_repeated(fake: FakeIntune) -> None:
    fake.register_challenge(CHALLENGE)

    async def body(client: IntuneClient) -> list[bool]:
        validator = IntuneValidator(client)
        first = await validator.validate(request("tx-1"))
        fake.revoke_tokens()
        second = await validator.validate(request("tx-2"))
        return [first.allow, second.allow]

    assert run(settings_for(fake), body) == [True, True]
    assert len(fake.token_requests(INTUNE_SCOPE)) == 2
    calls = fake.calls_to("/ScepActions/validateRequest")
    assert [c.status for c in calls] == [200, 401, 200]
    assert calls[1].headers["client-request-id"] == calls[2].headers["client-request-id"]


def test_a_token_that_stays_refused_fails_after_one_refresh(fake: FakeIntune) -> None:
    fake.register_challenge(CHALLENGE)
    fake.accept_tokens = False
    [failure] = validate(fake, request())
    assert isinstance(failure, ValidationFailed)
    # Discovery: one refused try, one more with a new token; then it gives up.
    assert [c.status for c in fake.calls_to("/endpoints")] == [401, 401]
    assert fake.calls_to("/ScepActions/validateRequest") == []


def test_a_refused_intune_token_is_refreshed_once_only(fake: FakeIntune) -> None:
    fake.register_challenge(CHALLENGE)

    async def body(client: IntuneClient) -> Any:
        validator = IntuneValidator(client)
        await validator.validate(request("tx-1"))
        fake.accept_tokens = False
        try:
            return await validator.validate(request("tx-2"))
        except ValidationFailed as e:
            return e

    failure = run(settings_for(fake), body)
    assert isinstance(failure, ValidationFailed)
    assert [c.status for c in fake.calls_to("/ScepActions/validateRequest")] == [200, 401, 401]
    assert len(fake.token_requests(INTUNE_SCOPE)) == 2


# --- discovery ---

def test_the_service_is_discovered_again_after_it_moved(fake: FakeIntune) -> None:
    fake.register_challenge(CHALLENGE)

    async def body(client: IntuneClient) -> list[bool]:
        validator = IntuneValidator(client)
        first = await validator.validate(request("tx-1"))
        fake.move_service("/moved/ScepRequestValidationFEService")
        second = await validator.validate(request("tx-2"))
        third = await validator.validate(request("tx-3"))
        return [first.allow, second.allow, third.allow]

    assert run(settings_for(fake), body) == [True] * 3
    assert len(fake.calls_to("/endpoints")) == 2
    calls = fake.calls_to("/ScepActions/validateRequest")
    assert [(c.path.startswith("/moved/"), c.status) for c in calls] == [
        (False, 200), (False, 404), (True, 200), (True, 200)]


def test_the_service_is_discovered_again_when_it_cannot_be_reached(fake: FakeIntune) -> None:
    fake.register_challenge(CHALLENGE)
    with socket.socket() as closed:  # a port nobody listens on once closed
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]

    async def body(client: IntuneClient) -> list[bool]:
        validator = IntuneValidator(client)
        first = await validator.validate(request("tx-1"))
        # As if the cached URI pointed at a front end that is gone.
        client._service_url = f"http://127.0.0.1:{dead_port}/gone"
        second = await validator.validate(request("tx-2"))
        return [first.allow, second.allow]

    assert run(settings_for(fake), body) == [True, True]
    assert len(fake.calls_to("/endpoints")) == 2
    assert len(fake.calls_to("/ScepActions/validateRequest")) == 2


def test_the_service_is_looked_up_again_after_its_max_age(fake: FakeIntune) -> None:
    fake.register_challenge(CHALLENGE)
    now = [1000.0]

    async def body(client: IntuneClient) -> list[bool]:
        validator = IntuneValidator(client)
        first = await validator.validate(request("tx-1"))
        fake.move_service("/moved/ScepRequestValidationFEService")
        now[0] += 600 - 1            # not yet: the cached URI is used (and 404s)
        second = await validator.validate(request("tx-2"))
        now[0] += 600                # past the max age since that rediscovery
        fake.move_service("/again/ScepRequestValidationFEService")
        third = await validator.validate(request("tx-3"))
        return [first.allow, second.allow, third.allow]

    settings = settings_for(fake, discovery_max_age_seconds=600)
    assert run(settings, body, clock=lambda: now[0]) == [True] * 3
    assert len(fake.calls_to("/endpoints")) == 3
    calls = fake.calls_to("/ScepActions/validateRequest")
    # The third call went straight to the service's new home: looked up ahead
    # of time, not after a 404.
    homes = ["moved" if c.path.startswith("/moved/") else
             "again" if c.path.startswith("/again/") else "first" for c in calls]
    assert list(zip(homes, [c.status for c in calls], strict=True)) == [
        ("first", 200), ("first", 404), ("moved", 200), ("again", 200)]


def test_a_failed_periodic_look_up_keeps_the_known_service(fake: FakeIntune) -> None:
    fake.register_challenge(CHALLENGE)
    now = [1000.0]

    async def body(client: IntuneClient) -> list[bool]:
        validator = IntuneValidator(client)
        first = await validator.validate(request("tx-1"))
        fake.discovery_status = 503
        now[0] += 600                # due, but Graph is down: the known URI serves
        second = await validator.validate(request("tx-2"))
        now[0] += 30                 # within the retry delay: no new look-up
        third = await validator.validate(request("tx-3"))
        fake.discovery_status = None
        now[0] += 31                 # the retry delay is over
        fourth = await validator.validate(request("tx-4"))
        return [first.allow, second.allow, third.allow, fourth.allow]

    settings = settings_for(fake, discovery_max_age_seconds=600)
    assert run(settings, body, clock=lambda: now[0]) == [True] * 4
    assert [c.status for c in fake.calls_to("/endpoints")] == [200, 503, 200]
    assert [c.status for c in fake.calls_to("/ScepActions/validateRequest")] == [200] * 4


# --- notifications ---

CA_KEY = ec.generate_private_key(ec.SECP256R1())
CA_NAME = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Org"),
                     x509.NameAttribute(NameOID.COMMON_NAME, "Example Issuing CA")])
SERIAL = 0x80A1B2C3D4E5F6  # high bit of the first byte set: DER gives it a leading 00
NOT_AFTER = datetime(2027, 3, 4, 5, 6, 7, tzinfo=UTC)


def issued_certificate() -> bytes:
    certificate = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device-42")]))
                   .issuer_name(CA_NAME).public_key(KEY.public_key()).serial_number(SERIAL)
                   .not_valid_before(NOT_AFTER - timedelta(days=365)).not_valid_after(NOT_AFTER)
                   .sign(CA_KEY, hashes.SHA256()))
    return certificate.public_bytes(Encoding.DER)


def issued_notice(transaction_id: str = "tx-issued") -> tuple[Notice, bytes, bytes]:
    der, csr_der = issued_certificate(), csr()
    record = CertRecord(serial=SERIAL, der=der, subject="CN=device-42", sans=(),
                        not_before=int(NOT_AFTER.timestamp()) - 365 * 86400,
                        not_after=int(NOT_AFTER.timestamp()), issued_at=time.time(),
                        transaction_id=transaction_id, requester_key_sha256=bytes(32),
                        csr_sha256=hashlib.sha256(csr_der).digest())
    body = issued_event(record, message_type="PKCSReq", csr_der=csr_der, at=time.time())
    [notice] = notices_for("issued", body, ["intune"], time.time(), serial=SERIAL)
    return notice, der, csr_der


def refused_notice(reason: str = "Intune refused the request: ChallengeExpired") -> Notice:
    body = refused_event(transaction_id="tx-refused", message_type="PKCSReq", csr_der=csr(),
                         fail_info="badRequest", reason=reason, profile="default",
                         at=time.time())
    [notice] = notices_for("refused", body, ["intune"], time.time())
    return notice


def deliver(fake: FakeIntune, notice: Notice) -> BaseException | None:
    async def body(client: IntuneClient) -> BaseException | None:
        try:
            await IntuneNotifier(client).deliver(notice)
        except Exception as e:  # noqa: BLE001 - the test looks at it
            return e
        return None
    return run(settings_for(fake, ca_configuration="ca.example.org\\Example Issuing CA"), body)


def test_an_issued_certificate_is_reported_with_its_details(fake: FakeIntune) -> None:
    notice, der, csr_der = issued_notice()
    assert deliver(fake, notice) is None
    [call] = fake.calls_to("/ScepActions/successNotification")
    assert call.status == 200 and call.headers["api-version"] == "2018-02-20"
    assert call.json() == {"notification": {
        "transactionId": "tx-issued",
        "certificateRequest": base64.b64encode(csr_der).decode(),
        "certificateThumbprint": hashlib.sha1(der).hexdigest().upper(),
        "certificateSerialNumber": "0080A1B2C3D4E5F6",
        "certificateExpirationDateUtc": "2027-03-04T05:06:07.000Z",
        "issuingCertificateAuthority": "CN=Example Issuing CA,O=Example Org",
        "callerInfo": "scep-fast-tests/1.0",
        "caConfiguration": "ca.example.org\\Example Issuing CA",
        "certificateAuthority": "CN=Example Issuing CA,O=Example Org",
    }}


def test_a_refusal_is_reported_with_an_hresult_and_its_reason(fake: FakeIntune) -> None:
    notice = refused_notice()
    assert deliver(fake, notice) is None
    [call] = fake.calls_to("/ScepActions/failureNotification")
    assert call.status == 200
    doc = call.json()["notification"]
    assert doc["transactionId"] == "tx-refused"
    assert doc["hResult"] == E_UNEXPECTED == -0x7FFF0001  # 0x8000FFFF as a signed HRESULT
    assert doc["errorDescription"] == "Intune refused the request: ChallengeExpired"
    assert base64.b64decode(doc["certificateRequest"]) == base64.b64decode(
        notice.document()["csr"])


def test_a_long_reason_is_cut_to_255_characters(fake: FakeIntune) -> None:
    assert deliver(fake, refused_notice("r" * 1000)) is None
    [call] = fake.calls_to("/ScepActions/failureNotification")
    assert call.json()["notification"]["errorDescription"] == "r" * 255


@pytest.mark.parametrize("status", [400, 403])
def test_a_4xx_rejects_the_notice_for_good(fake: FakeIntune, status: int) -> None:
    fake.fail_status = status
    assert isinstance(deliver(fake, issued_notice()[0]), NoticeRejected)


def test_a_refusal_code_rejects_the_notice_for_good(fake: FakeIntune) -> None:
    fake.notification_code = "ChallengeExpired"
    failure = deliver(fake, refused_notice())
    assert isinstance(failure, NoticeRejected) and "ChallengeExpired" in str(failure)


@pytest.mark.parametrize("status", [429, 500, 503])
def test_a_5xx_or_429_leaves_the_notice_to_be_retried(fake: FakeIntune, status: int) -> None:
    fake.fail_status = status
    failure = deliver(fake, issued_notice()[0])
    assert isinstance(failure, IntuneError) and not isinstance(failure, NoticeRejected)
    assert failure.status == status


def test_a_slow_notification_is_retried_later(fake: FakeIntune) -> None:
    fake.delay_seconds = 5.0
    started = time.monotonic()
    failure = deliver(fake, refused_notice())
    assert isinstance(failure, IntuneError) and not isinstance(failure, NoticeRejected)
    assert time.monotonic() - started < 3.0


def test_a_revocation_is_not_for_intune(fake: FakeIntune) -> None:
    der = issued_certificate()
    record = CertRecord(serial=SERIAL, der=der, subject="CN=device-42", sans=(),
                        not_before=0, not_after=int(NOT_AFTER.timestamp()), issued_at=0.0,
                        transaction_id="tx-r", requester_key_sha256=bytes(32),
                        csr_sha256=bytes(32))
    [notice] = notices_for("revoked", revoked_event(record, reason=1, at=0.0), ["intune"], 0.0)
    assert isinstance(deliver(fake, notice), NoticeRejected)
    assert fake.calls == []


# --- what is never logged ---

def test_no_secret_token_or_challenge_is_logged(fake: FakeIntune,
                                                caplog: pytest.LogCaptureFixture) -> None:
    fake.register_challenge(CHALLENGE)
    caplog.set_level(logging.DEBUG)
    verdicts = validate(fake, request("tx-1"), request("tx-2", "unknown-challenge-Zr4"))
    assert [v.allow for v in verdicts] == [True, False]
    assert deliver(fake, issued_notice()[0]) is None
    text = caplog.text + "".join(repr(getattr(r, "fields", "")) for r in caplog.records)
    assert "tx-1" in text  # the log did record the exchanges
    tokens = [c.headers["authorization"].split()[1] for c in fake.calls
              if "authorization" in c.headers]
    assert tokens
    for secret in (CLIENT_SECRET, CHALLENGE, "unknown-challenge-Zr4", *tokens):
        assert secret not in text
    assert CLIENT_SECRET not in repr(settings_for(fake))


def test_a_secret_read_from_a_file_may_end_in_a_newline(fake: FakeIntune) -> None:
    fake.register_challenge(CHALLENGE)
    [verdict] = validate(fake, request(), secret=CLIENT_SECRET + "\n")
    assert verdict.allow is True


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="tenant"):
        IntuneSettings(tenant="../evil", application_id="a", secret="s")
    with pytest.raises(ValueError, match="tenant"):
        IntuneSettings(tenant="contoso.onmicrosoft.com\n", application_id="a", secret="s")
    with pytest.raises(ValueError, match="timeout"):
        IntuneSettings(tenant="t", application_id="a", secret="s", timeout_seconds=0)
    with pytest.raises(ValueError, match="secret"):
        IntuneSettings(tenant="t", application_id="a", secret="\n")
    with pytest.raises(ValueError, match="graph_url"):
        IntuneSettings(tenant="t", application_id="a", secret="s", graph_url="ftp://x")
    with pytest.raises(ValueError, match="discovery_max_age"):
        IntuneSettings(tenant="t", application_id="a", secret="s", discovery_max_age_seconds=1)
    with pytest.raises(ValueError, match="hresult"):
        IntuneNotifier(IntuneClient(IntuneSettings(tenant="t", application_id="a", secret="s")),
                       hresult=0x8000FFFF)  # unsigned: the signed value is E_UNEXPECTED
    settings = IntuneSettings(tenant="contoso.onmicrosoft.com", application_id="a", secret="s")
    assert settings.intune_scope == "https://api.manage.microsoft.com//.default"
    assert settings.graph_scope == "https://graph.microsoft.com/.default"
    assert settings.token_url == (
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token")
    assert settings.discovery_url == ("https://graph.microsoft.com/v1.0/servicePrincipals/"
                                      "appId=0000000a-0000-0000-c000-000000000000/endpoints")
