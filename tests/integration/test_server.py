"""The running server over real HTTP: operations, dialects, errors, the ledger."""

from __future__ import annotations

import base64
import json
import socket
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from scep_fast.client import (
    CACertificates,
    build_pkcs_req,
    enroll,
    generate_key,
    parse_ca_certs,
    parse_cert_rep,
)
from scep_fast.protocol import FailInfo, PKIStatus
from tests.integration.conftest import CHALLENGE, Server, init_dir, scep_fast, set_config


def ca_certs(server: Server) -> CACertificates:
    response = server.request("GET", "/scep?operation=GetCACert")
    return parse_ca_certs(response.read_body, response.getheader("Content-Type"))  # type: ignore[attr-defined]


def post(server: Server, body: bytes, path: str = "/scep?operation=PKIOperation",
         headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    response = server.request("POST", path, body=body, headers=headers)
    return response.status, response.getheader("Content-Type") or "", response.read_body  # type: ignore[attr-defined]


def ledger_lines(directory: Path) -> list[dict[str, object]]:
    done = scep_fast("certs", "list", "--json", "--dir", str(directory))
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


# ---- read-only operations -------------------------------------------------------


def test_get_ca_caps_advertises_exactly_what_is_enabled(server: Server) -> None:
    response = server.request("GET", "/scep?operation=GetCACaps")
    assert response.status == 200
    assert response.getheader("Content-Type") == "text/plain"
    keywords = response.read_body.decode().split("\n")  # type: ignore[attr-defined]
    assert {"AES", "SHA-256", "SHA-512", "POSTPKIOperation", "SCEPStandard"} <= set(keywords)
    assert "Renewal" in keywords
    # No rollover certificate exists.
    assert "GetNextCACert" not in keywords


def test_get_ca_cert_serves_ra_and_ca_as_degenerate_pkcs7(server: Server) -> None:
    response = server.request("GET", "/cgi-bin/pkiclient.exe?operation=GetCACert&message=any")
    assert response.status == 200
    assert response.getheader("Content-Type") == "application/x-x509-ca-ra-cert"
    signed = cms.ContentInfo.load(response.read_body)["content"]  # type: ignore[attr-defined]
    assert len(signed["signer_infos"]) == 0
    subjects = [c.chosen.subject.native["common_name"] for c in signed["certificates"]]
    assert subjects == ["scep-fast RA", "scep-fast CA"]
    on_disk = x509.load_pem_x509_certificate((server.directory / "ca.pem").read_bytes())
    assert signed["certificates"][1].chosen.dump() == on_disk.public_bytes(
        serialization.Encoding.DER)


def test_ca_mode_serves_one_der_certificate(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory("--ca-mode")
    response = server.request("GET", "/scep?operation=GetCACert")
    assert response.getheader("Content-Type") == "application/x-x509-ca-cert"
    cert = x509.load_der_x509_certificate(response.read_body)  # type: ignore[attr-defined]
    assert cert.subject.rfc4514_string() == "CN=scep-fast CA"
    result = enroll(server.url, CHALLENGE, "ca-mode-device").raise_for_status()
    assert result.cert is not None
    assert result.cert.issuer == cert.subject


@pytest.mark.parametrize("path", ["/scep", "/scep/pkiclient.exe", "/cgi-bin/pkiclient.exe",
                                  "/scep/profile-a/x"])
def test_any_path_under_the_endpoints_is_scep(server: Server, path: str) -> None:
    response = server.request("GET", f"{path}?operation=GetCACaps")
    assert response.status == 200


def test_other_paths_are_404(server: Server) -> None:
    assert server.request("GET", "/other?operation=GetCACaps").status == 404


def test_http_1_0_without_host(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /cgi-bin/pkiclient.exe?operation=GetCACaps HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200")
    assert b"content-length: %d" % len(body) in head.lower()
    assert b"POSTPKIOperation" in body


def test_unknown_operation_is_400_with_a_reason(server: Server) -> None:
    response = server.request("GET", "/scep?operation=Bogus")
    assert response.status == 400
    assert b"operation" in response.read_body  # type: ignore[attr-defined]


def test_get_next_ca_cert_without_rollover_is_404(server: Server) -> None:
    assert server.request("GET", "/scep?operation=GetNextCACert").status == 404


# ---- PKIOperation ---------------------------------------------------------------


@pytest.mark.parametrize("use_get", [False, True], ids=["POST", "GET"])
def test_enroll_records_the_certificate_in_the_ledger(server: Server, use_get: bool) -> None:
    cn = f"device-{'get' if use_get else 'post'}"
    result = enroll(server.url, CHALLENGE, cn, use_get=use_get,
                    sans=("dev.example.com",)).raise_for_status()
    cert = result.cert
    assert cert is not None
    assert cert.subject.rfc4514_string() == f"CN={cn}"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["dev.example.com"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 365
    assert cert.serial_number.bit_length() >= 64
    records = {r["serial"]: r for r in ledger_lines(server.directory)}
    record = records[format(cert.serial_number, "x")]
    assert record["subject"] == f"CN={cn}"
    assert record["status"] == "issued"
    assert record["transaction_id"] == result.transaction_id


def test_post_ignores_content_type(server: Server) -> None:
    ra = ca_certs(server).ra
    for headers in ({"Content-Type": "application/octet-stream"}, {}):
        request = build_pkcs_req(ra, cn="ctype", challenge=CHALLENGE)
        status, content_type, body = post(server, request.message,
                                          "/scep?operation=PKIOperation&message=ignored",
                                          headers=headers)
        assert status == 200 and content_type == "application/x-pki-message"
        assert parse_cert_rep(body, request, ra_certs=[ra]).status is PKIStatus.SUCCESS


def test_wrong_challenge_gets_a_signed_bad_request(server: Server) -> None:
    ra = ca_certs(server).ra
    request = build_pkcs_req(ra, cn="intruder", challenge="not-the-secret")
    status, content_type, body = post(server, request.message)
    assert status == 200 and content_type == "application/x-pki-message"
    reply = parse_cert_rep(body, request, ra_certs=[ra])
    assert reply.status is PKIStatus.FAILURE
    assert reply.fail_info is FailInfo.BAD_REQUEST
    assert reply.fail_info_text and "challenge" in reply.fail_info_text
    assert "not-the-secret" not in server.log()
    assert CHALLENGE not in server.log()


def test_resend_gets_the_same_certificate_and_a_new_csr_is_refused(server: Server) -> None:
    ra = ca_certs(server).ra
    key = generate_key()
    first = build_pkcs_req(ra, cn="resend", challenge=CHALLENGE, key=key)
    replies = [parse_cert_rep(post(server, first.message)[2], first, ra_certs=[ra])
               for _ in range(2)]
    serials = [r.certificates[0].serial_number for r in replies]
    assert replies[0].status is PKIStatus.SUCCESS and serials[0] == serials[1]
    # Same key, so the same transactionID, but another CSR.
    other = build_pkcs_req(ra, cn="resend-other-name", challenge=CHALLENGE, key=key)
    assert other.transaction_id == first.transaction_id
    reply = parse_cert_rep(post(server, other.message)[2], other, ra_certs=[ra])
    assert reply.status is PKIStatus.FAILURE and reply.fail_info is FailInfo.BAD_REQUEST
    matching = [r for r in ledger_lines(server.directory)
                if r["transaction_id"] == first.transaction_id]
    assert len(matching) == 1


@pytest.mark.parametrize("body", [b"", b"garbage", b"\x30\x80" + b"\x00" * 64,
                                  b"\x30\x84\xff\xff\xff\xff"])
def test_unparseable_messages_get_a_4xx_with_a_reason(server: Server, body: bytes) -> None:
    status, content_type, reply = post(server, body)
    assert status == 400
    assert content_type.startswith("text/plain")
    assert 0 < len(reply) < 300


def test_tampered_message_is_400(server: Server) -> None:
    ra = ca_certs(server).ra
    message = bytearray(build_pkcs_req(ra, cn="tamper", challenge=CHALLENGE).message)
    message[len(message) // 2] ^= 0x01
    status, _, reply = post(server, bytes(message))
    assert status == 400, reply


def test_message_for_another_recipient_is_400(server: Server, tmp_path: Path) -> None:
    other = init_dir(tmp_path / "other")
    other_ra = x509.load_pem_x509_certificate((other / "ra.pem").read_bytes())
    request = build_pkcs_req(other_ra, cn="elsewhere", challenge=CHALLENGE)
    status, _, reply = post(server, request.message)
    assert status == 400
    assert b"decrypt" in reply


def test_oversized_body_is_413(server: Server) -> None:
    status, _, _ = post(server, b"\x30" * (300 * 1024))
    assert status == 413


def test_long_get_request_lines_are_served(server: Server) -> None:
    ra = ca_certs(server).ra
    request = build_pkcs_req(ra, cn="long-line", challenge=CHALLENGE,
                             key=generate_key("rsa4096"))
    message = urllib.parse.quote(base64.b64encode(request.message).decode(), safe="")
    # Padding in an ignored parameter takes the request line past 64 KiB.
    target = f"/scep?operation=PKIOperation&pad={'A' * 64 * 1024}&message={message}"
    assert len(target) > 64 * 1024
    response = server.request("GET", target)
    assert response.status == 200
    reply = parse_cert_rep(response.read_body, request, ra_certs=[ra])  # type: ignore[attr-defined]
    assert reply.status is PKIStatus.SUCCESS


def test_every_request_gets_one_structured_log_line(server: Server) -> None:
    enroll(server.url, CHALLENGE, "logged").raise_for_status()
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    pki = [e for e in lines if e.get("operation") == "PKIOperation"
           and e.get("outcome") == "SUCCESS"]
    assert pki
    entry = pki[-1]
    for key in ("transaction_id", "message_type", "outcome", "fail_info", "duration_ms"):
        assert key in entry
    assert entry["message_type"] == "PKCS_REQ"
    assert entry["status"] == 200


def test_crl_downloads_and_unknown_paths_are_logged_and_counted(server: Server) -> None:
    def count(operation: str, outcome: str) -> float:
        text = urllib.request.urlopen(
            f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
        wanted = (f'scep_requests_total{{message_type="-",operation="{operation}",'
                  f'outcome="{outcome}"}} ')
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith(wanted))

    before = count("CRL", "http_404"), count("-", "http_404")
    assert server.request("GET", "/crl/00.crl").status == 404
    assert server.request("GET", "/elsewhere").status == 404
    assert (count("CRL", "http_404"), count("-", "http_404")) == (before[0] + 1, before[1] + 1)
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    requests = [e for e in lines if e.get("msg") == "request"]
    assert any(e["operation"] == "CRL" and e["status"] == 404 for e in requests)
    assert any(e["operation"] == "-" and e["status"] == 404 and e["outcome"] == "http_404"
               for e in requests)


# ---- algorithms ---------------------------------------------------------------------


def test_legacy_algorithms_are_refused_with_bad_alg_unless_allowed(server_factory) -> None:  # type: ignore[no-untyped-def]
    strict = server_factory(name="strict")
    ra = ca_certs(strict).ra
    # Single DES is only possible with our client's legacy cipher name.
    request = build_pkcs_req(ra, cn="old", challenge=CHALLENGE, digest="sha1", cipher="des3")
    reply = parse_cert_rep(post(strict, request.message)[2], request, ra_certs=[ra])
    assert reply.status is PKIStatus.SUCCESS  # 3DES + SHA-1 are allowed by default

    def refuse(directory: Path) -> None:
        set_config(directory, "enrollment", "refuse_sha1", "true")
        set_config(directory, "enrollment", "refuse_3des", "true")

    hardened = server_factory(name="hardened", configure=refuse)
    caps = hardened.request("GET", "/scep?operation=GetCACaps").read_body.decode()  # type: ignore[attr-defined]
    assert "SHA-1" not in caps.split("\n") and "DES3" not in caps.split("\n")
    ra = ca_certs(hardened).ra
    request = build_pkcs_req(ra, cn="old", challenge=CHALLENGE, digest="sha1", cipher="des3")
    reply = parse_cert_rep(post(hardened, request.message)[2], request, ra_certs=[ra])
    assert reply.status is PKIStatus.FAILURE and reply.fail_info is FailInfo.BAD_ALG


# ---- configuration ----------------------------------------------------------------


def test_unknown_config_key_stops_the_server_naming_the_key(tmp_path: Path) -> None:
    directory = init_dir(tmp_path / "bad")
    with (directory / "scep-fast.toml").open("a") as f:
        f.write("\n[extra]\nlisten = 1\n")
    done = scep_fast("serve", "--dir", str(directory), timeout=60)
    assert done.returncode == 2
    assert "extra" in done.stderr


def test_bad_config_value_names_the_key(tmp_path: Path) -> None:
    directory = init_dir(tmp_path / "bad")
    set_config(directory, "profiles.default", "validity_days", "0")
    done = scep_fast("serve", "--dir", str(directory), timeout=60)
    assert done.returncode == 2
    assert "profiles.default.validity_days" in done.stderr


def test_init_writes_keys_0600_and_refuses_to_overwrite(tmp_path: Path) -> None:
    directory = init_dir(tmp_path / "modes")
    for name in ("ca.key", "ra.key", "challenge"):
        assert (directory / name).stat().st_mode & 0o777 == 0o600
    assert directory.stat().st_mode & 0o777 == 0o700
    again = scep_fast("init", "--dir", str(directory))
    assert again.returncode == 1


def test_init_generates_and_prints_a_challenge_once(tmp_path: Path) -> None:
    done = scep_fast("init", "--dir", str(tmp_path / "gen"))
    assert done.returncode == 0
    secret = (tmp_path / "gen" / "challenge").read_text().strip()
    assert len(secret) >= 16
    # Letters and digits: a PrintableString, and never read as a command-line option.
    assert secret.isascii() and secret.isalnum()
    assert done.stdout.strip().splitlines()[-1] == secret


def test_environment_twins_set_options(tmp_path: Path) -> None:
    directory = tmp_path / "env"
    done = scep_fast("init", env={"SCEP_FAST_DIR": str(directory), "SCEP_FAST_CA_KEY": "p256",
                                  "SCEP_FAST_CHALLENGE": "from-env"})
    assert done.returncode == 0, done.stderr
    ca = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    assert ca.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert (directory / "challenge").read_text().strip() == "from-env"


def test_a_slow_client_is_dropped_after_the_read_timeout(server_factory) -> None:  # type: ignore[no-untyped-def]
    def short_timeouts(directory: Path) -> None:
        set_config(directory, "server", "read_timeout_seconds", "1.0")
        # Also the deadline for a request's headers (hypercorn's idle timer).
        set_config(directory, "server", "keep_alive_seconds", "2.0")

    server = server_factory(name="slow", configure=short_timeouts)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        # Half a request line, then nothing: the server must not wait forever.
        s.sendall(b"GET /scep?operation=GetCA")
        started = time.monotonic()
        assert s.recv(65536) == b""
        assert time.monotonic() - started < 5
    # The worker is free for others.
    assert server.request("GET", "/scep?operation=GetCACaps").status == 200


def test_a_trickling_body_gets_408_after_the_body_timeout(server_factory) -> None:  # type: ignore[no-untyped-def]
    def short_timeouts(directory: Path) -> None:
        set_config(directory, "server", "read_timeout_seconds", "2.0")
        set_config(directory, "server", "body_timeout_seconds", "1.0")

    server = server_factory(name="trickle", configure=short_timeouts)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /scep?operation=PKIOperation HTTP/1.1\r\nHost: t\r\n"
                  b"Content-Length: 4000\r\n\r\n")
        started = time.monotonic()
        answer = b""
        s.settimeout(0.3)
        # Never silent for the read timeout, never done.
        while time.monotonic() - started < 8:
            try:
                s.sendall(b"\x30")
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert time.monotonic() - started < 5


@pytest.mark.parametrize("transport", [[], ["--get"]], ids=["POST", "GET"])
def test_enroll_command_writes_a_0600_key_and_its_certificate(server: Server, tmp_path: Path,
                                                              transport: list[str]) -> None:
    key_out, cert_out = tmp_path / "device.key", tmp_path / "device.pem"
    cn = f"cli-{'get' if transport else 'post'}"
    done = scep_fast("enroll", server.url, "--challenge", CHALLENGE, "--cn", cn,
                     "--key-out", str(key_out), "--cert-out", str(cert_out), *transport)
    assert done.returncode == 0, done.stderr
    assert key_out.stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate(cert_out.read_bytes())
    key = serialization.load_pem_private_key(key_out.read_bytes(), password=None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert cert.public_key().public_bytes(serialization.Encoding.DER, spki) == \
        key.public_key().public_bytes(serialization.Encoding.DER, spki)
    assert format(cert.serial_number, "x") in {r["serial"] for r in ledger_lines(server.directory)}
    wrong = scep_fast("enroll", server.url, "--challenge", "nope", "--cn", "x",
                      "--key-out", str(tmp_path / "x.key"), "--cert-out", str(tmp_path / "x.pem"))
    assert wrong.returncode == 1
    assert "BAD_REQUEST" in wrong.stderr
    assert not (tmp_path / "x.key").exists()
