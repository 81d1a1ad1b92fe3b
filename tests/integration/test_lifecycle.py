"""The certificate lifecycle against a running server: one-time challenges, the admin API,
profiles, pending approval with CertPoll, renewal, GetCert."""

from __future__ import annotations

import datetime
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from scep_fast.client import (
    CACertificates,
    PkiRequest,
    build_cert_poll,
    build_get_cert,
    build_pkcs_req,
    build_renewal_req,
    enroll,
    generate_key,
    parse_ca_certs,
    parse_cert_rep,
)
from scep_fast.protocol import FailInfo, PKIStatus
from tests.integration.conftest import (
    CHALLENGE,
    Server,
    init_dir,
    scep_fast,
    set_config,
    start_server,
)
from tests.integration.load import fire, make_requests

PROFILES = """
[profiles.short]
validity_days = 7
extended_key_usage = ["client_auth", "server_auth"]
include_chain = true

[profiles.approval]
require_approval = true
subject_template = "CN={cn},O=Approved Devices"
"""


def with_profiles(directory: Path) -> None:
    set_config(directory, "server", "workers", "2")
    with (directory / "scep-fast.toml").open("a") as f:
        f.write(PROFILES)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    directory = init_dir(tmp_path_factory.mktemp("lifecycle") / "scep")
    with_profiles(directory)
    running = start_server(directory)
    yield running
    running.stop()


def ca_certs(server: Server) -> CACertificates:
    response = server.request("GET", "/scep?operation=GetCACert")
    return parse_ca_certs(response.read_body, response.getheader("Content-Type"))  # type: ignore[attr-defined]


def send(server: Server, request: PkiRequest) -> Any:
    response = server.request("POST", "/scep?operation=PKIOperation", body=request.message)
    assert response.status == 200, response.read_body  # type: ignore[attr-defined]
    return parse_cert_rep(response.read_body, request,  # type: ignore[attr-defined]
                          ra_certs=[request.recipient])


def new_challenge(server: Server, *args: str) -> str:
    done = scep_fast("challenge", "new", "--dir", str(server.directory), *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def admin(server: Server, method: str, path: str, body: dict[str, Any] | None = None,
          token: str | None = None) -> tuple[int, Any]:
    if token is None:
        token = (server.directory / "admin-token").read_text().strip()
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.admin_port}{path}", method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


# ---- one-time challenges -----------------------------------------------------------


def test_a_single_use_challenge_enrolls_once(server: Server) -> None:
    secret = new_challenge(server, "--uses", "1")
    first = enroll(server.url, secret, "otc-1")
    assert first.status is PKIStatus.SUCCESS
    second = enroll(server.url, secret, "otc-2")
    assert second.status is PKIStatus.FAILURE and second.fail_info is FailInfo.BAD_REQUEST
    assert "used up" in (second.fail_info_text or "")
    assert secret not in server.log()


def test_an_expired_challenge_is_refused(server: Server) -> None:
    secret = new_challenge(server, "--ttl", "1", "--json")
    secret = json.loads(secret)["challenge"]
    time.sleep(1.5)
    result = enroll(server.url, secret, "too-late")
    assert result.status is PKIStatus.FAILURE and result.fail_info is FailInfo.BAD_REQUEST


def test_fifty_concurrent_requests_share_one_single_use_challenge(server: Server) -> None:
    secret = new_challenge(server, "--uses", "1")
    ra = ca_certs(server).ra
    requests = make_requests(ra, 50, secret, prefix="race")
    results = fire(server.port, requests, concurrency=50)
    replies = [parse_cert_rep(r.body, r.request, ra_certs=[ra]) for r in results]
    assert all(r.status == 200 for r in results)
    statuses = [r.status for r in replies]
    assert statuses.count(PKIStatus.SUCCESS) == 1
    assert statuses.count(PKIStatus.FAILURE) == 49
    assert {r.fail_info for r in replies if r.status is PKIStatus.FAILURE} == {
        FailInfo.BAD_REQUEST}
    # Both workers took part.
    pids = {line.split('"pid":')[1].split(",")[0] for line in server.log().splitlines()
            if '"worker started"' in line}
    assert len(pids) >= 2


def test_a_challenge_bound_to_names_refuses_others(server: Server) -> None:
    secret = new_challenge(server, "--uses", "5", "--subject-pattern", r"CN=kiosk-[0-9]+")
    refused = enroll(server.url, secret, "laptop-1")
    assert refused.status is PKIStatus.FAILURE
    assert "may not be used" in (refused.fail_info_text or "")
    # A pattern without the attribute type describes no whole subject.
    value_only = new_challenge(server, "--subject-pattern", r"kiosk-[0-9]+")
    assert enroll(server.url, value_only, "kiosk-18").status is PKIStatus.FAILURE
    assert enroll(server.url, secret, "kiosk-17").status is PKIStatus.SUCCESS


def test_a_challenge_chooses_its_profile(server: Server) -> None:
    secret = new_challenge(server, "--profile", "short")
    result = enroll(server.url, secret, "short-lived").raise_for_status()
    cert = result.cert
    assert cert is not None
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc) < datetime.timedelta(days=8)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
    # include_chain: the CA certificate travels with it.
    assert [c.subject for c in result.chain] == [ca_certs(server).ca.subject]


def test_unknown_profile_is_refused_when_minting(server: Server) -> None:
    done = scep_fast("challenge", "new", "--dir", str(server.directory), "--profile", "nope")
    assert done.returncode == 2 and "nope" in done.stderr


# ---- admin API --------------------------------------------------------------------


def test_admin_api_mints_challenges_with_the_right_token_only(server: Server) -> None:
    assert admin(server, "POST", "/v1/challenges", {"uses": 1}, token="")[0] == 401
    assert admin(server, "POST", "/v1/challenges", {"uses": 1}, token="x" * 43)[0] == 401
    status, body = admin(server, "POST", "/v1/challenges", {"uses": 2, "ttl_seconds": 600})
    assert status == 201 and body["uses"] == 2
    assert enroll(server.url, body["challenge"], "via-admin").status is PKIStatus.SUCCESS
    assert admin(server, "POST", "/v1/challenges", {"uses": 0})[0] == 400
    assert admin(server, "POST", "/v1/challenges", {"bogus": 1})[0] == 400


def test_admin_api_is_not_on_the_scep_address(server: Server) -> None:
    token = (server.directory / "admin-token").read_text().strip()
    response = server.request("POST", "/v1/challenges", body=b"{}",
                              headers={"Authorization": f"Bearer {token}"})
    assert response.status == 404


# ---- pending approval ---------------------------------------------------------------


def approval_request(server: Server, cn: str) -> PkiRequest:
    secret = new_challenge(server, "--profile", "approval")
    return build_pkcs_req(ca_certs(server).ra, cn=cn, challenge=secret)


def test_pending_request_is_polled_until_approved(server: Server) -> None:
    request = approval_request(server, "needs-approval")
    assert send(server, request).status is PKIStatus.PENDING
    poll = build_cert_poll(request, ca_certs(server).ca)
    assert send(server, poll).status is PKIStatus.PENDING
    listed = scep_fast("requests", "list", "--json", "--dir", str(server.directory))
    pending = [json.loads(line) for line in listed.stdout.splitlines()]
    mine = [p for p in pending if p["transaction_id"] == request.transaction_id]
    assert mine and mine[0]["status"] == "pending"
    assert mine[0]["subject"] == "CN=needs-approval,O=Approved Devices"
    done = scep_fast("requests", "approve", mine[0]["request_id"], "--dir",
                     str(server.directory))
    assert done.returncode == 0, done.stderr
    reply = send(server, build_cert_poll(request, ca_certs(server).ca))
    assert reply.status is PKIStatus.SUCCESS
    cert = reply.certificates[0]
    assert cert.subject.rfc4514_string() == "CN=needs-approval,O=Approved Devices"
    # A resend of the original PKCSReq gets the same certificate.
    assert send(server, request).certificates[0].serial_number == cert.serial_number


def test_rejected_request_gets_failure(server: Server) -> None:
    request = approval_request(server, "to-reject")
    assert send(server, request).status is PKIStatus.PENDING
    status, listed = admin(server, "GET", "/v1/requests")
    assert status == 200
    request_id = next(p["request_id"] for p in listed
                      if p["transaction_id"] == request.transaction_id)
    status, decided = admin(server, "POST", f"/v1/requests/{request_id}/reject",
                            {"reason": "unknown device"})
    assert status == 200 and decided["status"] == "rejected"
    reply = send(server, build_cert_poll(request, ca_certs(server).ca))
    assert reply.status is PKIStatus.FAILURE and reply.fail_info is FailInfo.BAD_REQUEST
    assert "unknown device" in (reply.fail_info_text or "")
    assert admin(server, "POST", f"/v1/requests/{request_id}/approve")[0] == 409


def test_poll_for_an_unknown_transaction_is_bad_cert_id(server: Server) -> None:
    request = build_pkcs_req(ca_certs(server).ra, cn="never-sent", challenge=CHALLENGE)
    reply = send(server, build_cert_poll(request, ca_certs(server).ca))
    assert reply.status is PKIStatus.FAILURE and reply.fail_info is FailInfo.BAD_CERT_ID


# ---- renewal and GetCert -------------------------------------------------------------


def enrolled(server: Server, cn: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = generate_key()
    assert isinstance(key, rsa.RSAPrivateKey)
    result = enroll(server.url, CHALLENGE, cn, key=key).raise_for_status()
    assert result.cert is not None
    return result.cert, key


def test_renewal_req_signed_by_our_certificate_needs_no_challenge(server: Server) -> None:
    old, old_key = enrolled(server, "renew-me")
    request = build_renewal_req(ca_certs(server).ra, old_cert=old, old_key=old_key,
                                cn="renew-me")
    reply = send(server, request)
    assert reply.status is PKIStatus.SUCCESS
    new = reply.certificates[0]
    assert new.serial_number != old.serial_number
    assert new.subject == old.subject
    # The same RenewalReq again is a resend: the same new certificate.
    assert send(server, request).certificates[0].serial_number == new.serial_number


def test_pkcs_req_signed_by_our_certificate_is_a_renewal(server: Server) -> None:
    old, old_key = enrolled(server, "cisco-style")
    request = build_renewal_req(ca_certs(server).ra, old_cert=old, old_key=old_key,
                                cn="cisco-style", challenge="not-the-secret")
    # Rebuilt as a PKCSReq: same signer, no valid challenge.
    from scep_fast.client import build_pki_message
    from scep_fast.protocol import MessageType

    pkcs_req = build_pki_message(
        MessageType.PKCS_REQ, request.csr, recipient=request.recipient,
        signer_key=request.signer_key, signer_cert=request.signer_cert,
        transaction_id=request.transaction_id, device_key=request.device_key, csr=request.csr)
    reply = send(server, pkcs_req)
    assert reply.status is PKIStatus.SUCCESS
    assert reply.certificates[0].serial_number != old.serial_number


def test_renewal_req_with_a_foreign_certificate_is_refused(server: Server) -> None:
    key = generate_key()
    assert isinstance(key, rsa.RSAPrivateKey)
    from scep_fast.client import build_signer_certificate

    foreign = build_signer_certificate(key, "self-made")
    request = build_renewal_req(ca_certs(server).ra, old_cert=foreign, old_key=key,
                                cn="self-made")
    reply = send(server, request)
    assert reply.status is PKIStatus.FAILURE and reply.fail_info is FailInfo.BAD_REQUEST


def test_get_cert_by_issuer_and_serial(server: Server) -> None:
    cert, key = enrolled(server, "fetch-me")
    certs = ca_certs(server)
    from scep_fast.client import build_signer_certificate

    signer = build_signer_certificate(key, "fetcher")
    reply = send(server, build_get_cert(certs.ra, issuer=certs.ca.subject,
                                        serial=cert.serial_number, signer_key=key,
                                        signer_cert=signer))
    assert reply.status is PKIStatus.SUCCESS
    assert reply.certificates[0] == cert
    missing = send(server, build_get_cert(certs.ra, issuer=certs.ca.subject, serial=12345,
                                          signer_key=key, signer_cert=signer))
    assert missing.status is PKIStatus.FAILURE and missing.fail_info is FailInfo.BAD_CERT_ID


def test_revoke_on_replace_and_renewal_window(tmp_path: Path) -> None:
    directory = init_dir(tmp_path / "replace")
    set_config(directory, "enrollment", "revoke_on_replace", "true")
    server = start_server(directory)
    try:
        old, old_key = enrolled(server, "replace-me")
        reply = send(server, build_renewal_req(ca_certs(server).ra, old_cert=old,
                                               old_key=old_key, cn="replace-me"))
        assert reply.status is PKIStatus.SUCCESS
        done = scep_fast("certs", "list", "--json", "--dir", str(directory))
        records = {r["serial"]: r for r in map(json.loads, done.stdout.splitlines())}
        assert records[format(old.serial_number, "x")]["status"] == "revoked"
        assert records[format(old.serial_number, "x")]["revocation_reason"] == "superseded"
        # The supervisor notices the revocation and writes a fresh CRL.
        deadline = time.monotonic() + 15
        listed: set[int] = set()
        while time.monotonic() < deadline and old.serial_number not in listed:
            done = scep_fast("getcrl", server.url)
            assert done.returncode == 0, done.stderr
            crl = x509.load_pem_x509_crl(done.stdout.encode())
            listed = {entry.serial_number for entry in crl}
            time.sleep(0.5)
        assert old.serial_number in listed
        # A revoked certificate cannot renew.
        again = send(server, build_renewal_req(ca_certs(server).ra, old_cert=old,
                                               old_key=old_key, cn="replace-me"))
        assert again.status is PKIStatus.FAILURE
        assert "revoked" in (again.fail_info_text or "")
    finally:
        server.stop()

    windowed = init_dir(tmp_path / "window")
    set_config(windowed, "enrollment", "renewal_window_days", "30")
    server = start_server(windowed)
    try:
        old, old_key = enrolled(server, "too-early")
        reply = send(server, build_renewal_req(ca_certs(server).ra, old_cert=old,
                                               old_key=old_key, cn="too-early"))
        assert reply.status is PKIStatus.FAILURE
        assert "renewal opens" in (reply.fail_info_text or "")
    finally:
        server.stop()


# ---- the client commands ------------------------------------------------------------


def test_enroll_command_waits_as_pending_then_poll_collects(server: Server,
                                                            tmp_path: Path) -> None:
    secret = new_challenge(server, "--profile", "approval")
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    done = scep_fast("enroll", server.url, "--challenge", secret, "--cn", "cli-pending",
                     "--key-out", str(key), "--cert-out", str(cert))
    assert done.returncode == 3, done.stderr
    state = tmp_path / "c.pem.pending.json"
    assert state.exists() and not cert.exists()
    assert key.stat().st_mode & 0o777 == 0o600
    poll_args = ["poll", server.url, "--key-in", str(key), "--state", str(state),
                 "--cert-out", str(cert)]
    assert scep_fast(*poll_args).returncode == 3
    transaction_id = json.loads(state.read_text())["transaction_id"]
    status, listed = admin(server, "GET", "/v1/requests")
    request_id = next(p["request_id"] for p in listed if p["transaction_id"] == transaction_id)
    assert admin(server, "POST", f"/v1/requests/{request_id}/approve")[0] == 200
    done = scep_fast(*poll_args)
    assert done.returncode == 0, done.stderr
    issued = x509.load_pem_x509_certificate(cert.read_bytes())
    assert issued.subject.rfc4514_string() == "CN=cli-pending,O=Approved Devices"
    assert not state.exists()


def test_renew_command_with_a_new_key(server: Server, tmp_path: Path) -> None:
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    done = scep_fast("enroll", server.url, "--challenge", CHALLENGE, "--cn", "cli-renew",
                     "--key-out", str(key), "--cert-out", str(cert))
    assert done.returncode == 0, done.stderr
    new_key, new_cert = tmp_path / "k2.pem", tmp_path / "c2.pem"
    done = scep_fast("renew", server.url, "--cert-in", str(cert), "--key-in", str(key),
                     "--rekey", "--key-out", str(new_key), "--cert-out", str(new_cert))
    assert done.returncode == 0, done.stderr
    old = x509.load_pem_x509_certificate(cert.read_bytes())
    new = x509.load_pem_x509_certificate(new_cert.read_bytes())
    assert new.serial_number != old.serial_number and new.subject == old.subject
    from cryptography.hazmat.primitives import serialization

    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    loaded = serialization.load_pem_private_key(new_key.read_bytes(), None)
    assert new.public_key().public_bytes(der, spki) == loaded.public_key().public_bytes(der, spki)
    assert new.public_key().public_bytes(der, spki) != old.public_key().public_bytes(der, spki)


def test_getcert_command(server: Server) -> None:
    cert, _ = enrolled(server, "cli-getcert")
    done = scep_fast("getcert", server.url, "--serial", format(cert.serial_number, "x"))
    assert done.returncode == 0, done.stderr
    assert x509.load_pem_x509_certificate(done.stdout.encode()) == cert
    missing = scep_fast("getcert", server.url, "--serial", "abc123")
    assert missing.returncode == 1 and "BAD_CERT_ID" in missing.stderr


def test_a_certificate_revoked_by_the_operator_cannot_renew(server: Server) -> None:
    old, old_key = enrolled(server, "revoked-then-renew")
    done = scep_fast("certs", "revoke", format(old.serial_number, "x"), "--reason",
                     "keyCompromise", "--dir", str(server.directory))
    assert done.returncode == 0, done.stderr
    reply = send(server, build_renewal_req(ca_certs(server).ra, old_cert=old, old_key=old_key,
                                           cn="revoked-then-renew"))
    assert reply.status is PKIStatus.FAILURE and reply.fail_info is FailInfo.BAD_REQUEST
    assert "revoked" in (reply.fail_info_text or "")
