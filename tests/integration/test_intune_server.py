"""Microsoft Intune validation end to end: a running server against the fake Intune.

The server is configured as a third-party CA for Intune SCEP: Intune, not
this server, checks the challenge (``validation.challenge = "validators"``),
and is told of every certificate issued or refused through the outbox. The
fake (``tests/fake_intune.py``) follows Microsoft's documents and public
client; the real service is not reachable from the test machines.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from scep_fast.client import enroll
from scep_fast.protocol import FailInfo, PKIStatus
from tests.fake_intune import FakeIntune, serving
from tests.integration.conftest import Server, init_dir, set_config, start_server

# What Intune asks a CA to put in the SAN of a certificate for strong mapping.
SID_URI = "tag:microsoft.com,2022-09-14:sid:S-1-5-21-1004336348-1177238915-682003330-512"


def configure_intune(directory: Path, fake: FakeIntune) -> None:
    secret = directory / "intune-secret"
    secret.write_text(fake.client_secret + "\n")
    secret.chmod(0o600)
    for key, value in (("enabled", "true"), ("tenant", f'"{fake.tenant}"'),
                       ("application_id", f'"{fake.client_id}"'),
                       ("login_url", f'"{fake.base_url}"'),
                       ("graph_url", f'"{fake.base_url}"')):
        set_config(directory, "validation.intune", key, value)
    set_config(directory, "validation", "challenge", '"validators"')
    set_config(directory, "validation", "timeout_seconds", "1.0")
    set_config(directory, "outbox", "poll_seconds", "0.2")
    set_config(directory, "outbox", "max_retry_seconds", "1.0")


@pytest.fixture(scope="module")
def intune() -> Iterator[FakeIntune]:
    with serving(FakeIntune(token_lifetime_seconds=4)) as fake:
        yield fake


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, intune: FakeIntune) -> Iterator[Server]:
    directory = init_dir(tmp_path_factory.mktemp("intune") / "scep")
    configure_intune(directory, intune)
    running = start_server(directory)
    yield running
    running.stop()


def wait_for(condition: Callable[[], object], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _for(intune: FakeIntune, action: str, transaction_id: str) -> list[dict[str, object]]:
    key = "request" if action == "validateRequest" else "notification"
    return [c.json()[key] for c in intune.calls_to(f"/ScepActions/{action}")
            if c.status == 200 and c.json()[key]["transactionId"] == transaction_id]


def test_validate_issue_and_tell_intune(server: Server, intune: FakeIntune) -> None:
    intune.register_challenge("intune-challenge-1")
    result = enroll(server.url, "intune-challenge-1", "intune-device-1", sans=(f"uri:{SID_URI}",))
    assert result.status is PKIStatus.SUCCESS and result.cert is not None
    cert = result.cert
    # The SID for strong mapping is in the certificate.
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [SID_URI]
    (validated,) = [r for r in (c.json()["request"] for c in intune.calls_to(
        "/ScepActions/validateRequest") if c.status == 200)
        if "intune-device-1" in x509.load_der_x509_csr(
            base64.b64decode(str(r["certificateRequest"]))).subject.rfc4514_string()]
    transaction_id = str(validated["transactionId"])
    wait_for(lambda: _for(intune, "successNotification", transaction_id))
    (success,) = _for(intune, "successNotification", transaction_id)
    der = cert.public_bytes(Encoding.DER)
    thumbprint = hashlib.sha1(der).hexdigest().upper()  # noqa: S324 - Intune's thumbprint
    assert str(success["certificateThumbprint"]).upper() == thumbprint
    assert int(str(success["certificateSerialNumber"]), 16) == cert.serial_number
    assert success["certificateRequest"] == validated["certificateRequest"]


@pytest.mark.parametrize("expired", [False, True], ids=["unknown", "expired"])
def test_a_challenge_intune_refuses_gets_a_failure_and_intune_is_told(
        server: Server, intune: FakeIntune, expired: bool) -> None:
    challenge = f"intune-challenge-{'expired' if expired else 'unknown'}"
    if expired:
        intune.register_challenge(challenge)
        intune.expire_challenge(challenge)
    result = enroll(server.url, challenge, f"intune-refused-{expired}")
    assert result.status is PKIStatus.FAILURE and result.fail_info is FailInfo.BAD_REQUEST
    code = "ChallengeExpired" if expired else "ChallengeDeserializationError"
    assert result.fail_info_text == f"refused by validation: Intune refused the request: {code}"
    wait_for(lambda: any(result.fail_info_text in str(n["errorDescription"]) for n in (
        c.json()["notification"] for c in intune.calls_to("/ScepActions/failureNotification")
        if c.status == 200)))


def test_tokens_are_renewed_when_they_expire_and_the_service_found_again_when_it_moves(
        server: Server, intune: FakeIntune) -> None:
    intune.register_challenge("intune-challenge-2")
    assert enroll(server.url, "intune-challenge-2", "intune-device-2").status \
        is PKIStatus.SUCCESS
    tokens_before = len(intune.calls_to("/oauth2/v2.0/token"))
    discoveries_before = len(intune.calls_to("/endpoints"))
    time.sleep(4.5)  # past the tokens' lifetime (4 s)
    intune.move_service("/moved/ScepRequestValidationFEService")
    intune.register_challenge("intune-challenge-3")
    assert enroll(server.url, "intune-challenge-3", "intune-device-3").status \
        is PKIStatus.SUCCESS
    assert len(intune.calls_to("/oauth2/v2.0/token")) > tokens_before
    assert len(intune.calls_to("/endpoints")) > discoveries_before
    assert intune.calls_to("/moved/ScepRequestValidationFEService/ScepActions/validateRequest")


def test_intune_failing_refuses_the_request(server: Server, intune: FakeIntune) -> None:
    intune.register_challenge("intune-challenge-4")
    intune.fail_status = 503
    try:
        result = enroll(server.url, "intune-challenge-4", "intune-device-4")
    finally:
        intune.fail_status = None
    assert result.status is PKIStatus.FAILURE
    assert result.fail_info_text == "the request could not be validated"
    intune.delay_seconds = 3
    try:
        started = time.monotonic()
        slow = enroll(server.url, "intune-challenge-4", "intune-device-5")
        assert time.monotonic() - started < 8
    finally:
        intune.delay_seconds = 0
    assert slow.status is PKIStatus.FAILURE
