"""A running server whose CA and RA keys live in a SoftHSM2 token.

`scep-fast init --generate-in-token` has the token generate both key pairs
and signs the CA and RA certificates with them through the core; `serve`
then opens a PKCS#11 session in each worker. Enrollment (POST and GET),
revocation with a CRL signed by the token's CA key, served over HTTP and
GetCRL, all as with file keys; and nothing of either private key on disk.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import SignatureAlgorithmOID

from scep_fast.client import (
    build_cert_poll,
    build_csr,
    build_get_crl,
    build_pkcs_req,
    build_pki_message,
    build_signer_certificate,
    enroll,
    generate_key,
    parse_cert_rep,
)
from scep_fast.protocol import MessageType, PKIStatus
from scep_fast.runtime import crl
from tests import softhsm
from tests.integration.conftest import (
    CHALLENGE,
    Server,
    scep_fast,
    set_config,
    start_server,
)
from tests.integration.test_crl import fetch_crl, openssl_crl_verify

CA_OBJECT = softhsm.CA_OBJECT
RA_OBJECT = softhsm.RA_OBJECT


@dataclass
class TokenServer:
    server: Server
    token: softhsm.Token
    pin_file: Path

    @property
    def directory(self) -> Path:
        return self.server.directory


def init_with_token(token: softhsm.Token, directory: Path, pin_file: Path,
                    *extra: str) -> subprocess.CompletedProcess[str]:
    return scep_fast("init", "--dir", str(directory), "--challenge", CHALLENGE,
                     *token.init_options(pin_file), *extra,
                     env={"SOFTHSM2_CONF": str(token.conf)})


def start_token_server(base: Path,
                       configure: Callable[[Path], None] | None = None) -> TokenServer:
    """A fresh token with both keys generated in it, and a server (two workers) using them."""
    softhsm.require()
    token = softhsm.make_token(base / "softhsm")
    pin_file = token.write_pin_file(base / "pin")
    directory = base / "scep"
    done = init_with_token(token, directory, pin_file, "--generate-in-token")
    assert done.returncode == 0, done.stderr
    set_config(directory, "server", "workers", "2")
    if configure is not None:
        configure(directory)
    server = start_server(directory, env={"SOFTHSM2_CONF": str(token.conf)})
    return TokenServer(server, token, pin_file)


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    running = start_token_server(tmp_path_factory.mktemp("token-server"))
    yield running
    running.server.stop()


def test_init_leaves_the_keys_in_the_token(token_server: TokenServer) -> None:
    directory = token_server.directory
    assert not (directory / "ca.key").exists() and not (directory / "ra.key").exists()
    config = (directory / "scep-fast.toml").read_text()
    assert f'ca_key = "pkcs11:token={token_server.token.label};object={CA_OBJECT}"' in config
    assert f'ra_key = "pkcs11:token={token_server.token.label};object={RA_OBJECT}"' in config
    for label in (CA_OBJECT, RA_OBJECT):
        access = token_server.token.private_key_access(label).split(", ")
        assert "sensitive" in access and "never extractable" in access
        assert "extractable" not in access
    ca = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    ra = x509.load_pem_x509_certificate((directory / "ra.pem").read_bytes())
    ca.verify_directly_issued_by(ca)
    ra.verify_directly_issued_by(ca)
    assert isinstance(ra.public_key(), rsa.RSAPublicKey)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_sessions_are_per_worker_never_in_the_supervisor(token_server: TokenServer) -> None:
    """Each worker opened the module itself; the supervisor (which signs CRLs in a child
    process) never loaded it, so no session crosses a fork or outlives its token there."""
    supervisor = token_server.server.process.pid
    module = Path(token_server.token.module).name
    # An enrollment first, so that the workers are up (they start after the first CRL).
    enroll(token_server.server.url, CHALLENGE, "session-check").raise_for_status()
    deadline = time.monotonic() + 15
    while True:
        children = [int(pid) for task in Path(f"/proc/{supervisor}/task").iterdir()
                    for pid in (task / "children").read_text().split()]
        workers = [pid for pid in children if module in _maps(pid)]
        if len(workers) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(workers) >= 2, "every worker holds its own session"
    assert module not in _maps(supervisor)
    assert "pkcs11.so" not in _maps(supervisor)


@pytest.mark.parametrize("use_get", [False, True], ids=["post", "get"])
@pytest.mark.parametrize("cipher", ["aes256", "des3"])
def test_enrollment_with_token_keys(token_server: TokenServer, use_get: bool,
                                    cipher: str) -> None:
    ca = x509.load_pem_x509_certificate((token_server.directory / "ca.pem").read_bytes())
    result = enroll(token_server.server.url, CHALLENGE, f"device-{cipher}-{use_get}",
                    use_get=use_get, cipher=cipher).raise_for_status()  # type: ignore[arg-type]
    assert result.cert is not None
    # The client verified the CertRep's signature with the RA certificate and
    # opened the envelope; the certificate itself was signed by the token's CA key.
    result.cert.verify_directly_issued_by(ca)


def test_oaep_enrollment_with_token_keys(token_server: TokenServer) -> None:
    result = enroll(token_server.server.url, CHALLENGE, "device-oaep",
                    key_transport="oaep-sha256").raise_for_status()  # type: ignore[arg-type]
    assert result.cert is not None


def test_revocation_and_crl_signed_by_the_token(token_server: TokenServer,
                                                tmp_path: Path) -> None:
    server = token_server.server
    directory = token_server.directory
    ca_pem = directory / "ca.pem"
    name = crl.crl_name(x509.load_pem_x509_certificate(ca_pem.read_bytes()).public_bytes(
        serialization.Encoding.DER))
    # The supervisor wrote the first CRL at start, signed by the token.
    assert "verify OK" in openssl_crl_verify(fetch_crl(server, name), ca_pem, tmp_path)

    kept = enroll(server.url, CHALLENGE, "kept-device").raise_for_status()
    gone = enroll(server.url, CHALLENGE, "gone-device").raise_for_status()
    assert kept.cert is not None and gone.cert is not None
    done = scep_fast("certs", "revoke", format(gone.cert.serial_number, "x"),
                     "--reason", "keyCompromise", "--dir", str(directory),
                     env={"SOFTHSM2_CONF": str(token_server.token.conf)})
    assert done.returncode == 0, done.stderr

    der = fetch_crl(server, name)
    assert "verify OK" in openssl_crl_verify(der, ca_pem, tmp_path)
    listed = x509.load_der_x509_crl(der)
    assert listed.get_revoked_certificate_by_serial_number(gone.cert.serial_number) is not None
    assert listed.get_revoked_certificate_by_serial_number(kept.cert.serial_number) is None

    # GetCRL: the same CRL inside a CertRep signed by the token's RA key.
    assert isinstance(kept.key, rsa.RSAPrivateKey)
    request = build_get_crl(kept.ca_certs.ra, issuer=kept.cert.issuer,
                            serial=kept.cert.serial_number, signer_key=kept.key,
                            signer_cert=kept.cert)
    response = server.request("POST", "/scep?operation=PKIOperation", body=request.message)
    assert response.status == 200
    reply = parse_cert_rep(response.read_body, request)  # type: ignore[attr-defined]
    assert reply.status is PKIStatus.SUCCESS, reply
    (via_scep,) = reply.crls
    assert via_scep.get_revoked_certificate_by_serial_number(gone.cert.serial_number) is not None


_PEM_PRIVATE = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")


def _holds_private_key(data: bytes) -> bool:
    if _PEM_PRIVATE.search(data):
        return True
    try:
        serialization.load_der_private_key(data, password=None)
    except (ValueError, TypeError):
        return False
    return True


def test_no_private_key_on_disk(token_server: TokenServer) -> None:
    """Neither key appears anywhere in the data directory, after init, serving and a CRL."""
    # One more enrollment first, so that the ledger has been written to.
    enroll(token_server.server.url, CHALLENGE, "disk-check").raise_for_status()
    seen = 0
    for path in token_server.directory.rglob("*"):
        if path.is_file():
            seen += 1
            assert not _holds_private_key(path.read_bytes()), path
    assert seen >= 5
    pin = softhsm.PIN.encode()
    for path in token_server.directory.rglob("*"):
        if path.is_file():
            assert pin not in path.read_bytes(), f"the PIN is in {path}"
    assert softhsm.PIN not in token_server.server.log()


def test_group_readable_pin_file_is_refused(tmp_path: Path) -> None:
    softhsm.require()
    token = softhsm.make_token(tmp_path / "softhsm")
    loose = token.write_pin_file(tmp_path / "pin", mode=0o640)
    done = init_with_token(token, tmp_path / "scep", loose, "--generate-in-token")
    assert done.returncode == 1
    assert "0640" in done.stderr and "0600" in done.stderr
    assert softhsm.PIN not in done.stderr + done.stdout
    assert not (tmp_path / "scep" / "scep-fast.toml").exists()


def test_existing_token_keys_are_used_as_they_are(tmp_path: Path) -> None:
    """Keys that already live in the token: init only makes the certificates."""
    softhsm.require()
    token = softhsm.make_token(tmp_path / "softhsm")
    token.generate_rsa(CA_OBJECT, "0a")
    token.generate_rsa(RA_OBJECT, "0b")
    pin_file = token.write_pin_file(tmp_path / "pin")
    done = init_with_token(token, tmp_path / "scep", pin_file)
    assert done.returncode == 0, done.stderr
    # Generating again under the same names is refused: the keys exist.
    again = init_with_token(token, tmp_path / "again", pin_file, "--generate-in-token")
    assert again.returncode == 1 and "exists in the token" in again.stderr
    listing = token.tool("--list-objects", "--type", "privkey").stdout
    assert listing.count("Private Key Object") == 2
    server = start_server(tmp_path / "scep", env={"SOFTHSM2_CONF": str(token.conf)})
    try:
        result = enroll(server.url, CHALLENGE, "device-existing").raise_for_status()
        assert result.cert is not None
    finally:
        server.stop()


def test_worker_cannot_start_without_the_token(tmp_path: Path) -> None:
    """A PIN file that went loose after init: workers refuse to log in; nothing is served."""
    softhsm.require()
    token = softhsm.make_token(tmp_path / "softhsm")
    pin_file = token.write_pin_file(tmp_path / "pin")
    done = init_with_token(token, tmp_path / "scep", pin_file, "--generate-in-token")
    assert done.returncode == 0, done.stderr
    os.chmod(pin_file, 0o644)
    check = scep_fast("crl", "--dir", str(tmp_path / "scep"),
                      env={"SOFTHSM2_CONF": str(token.conf)})
    assert check.returncode == 2
    assert "cannot use a key" in check.stderr and "0644" in check.stderr
    assert "Traceback" not in check.stderr and softhsm.PIN not in check.stderr


def _post(server: Server, message: bytes) -> tuple[int, str | None]:
    response = server.request("POST", "/scep?operation=PKIOperation", body=message,
                              headers={"Content-Type": "application/x-pki-message"})
    return response.status, response.getheader("Retry-After")


def test_token_that_goes_away_and_comes_back(tmp_path: Path) -> None:
    """Under load from four clients, requests while the token is gone get 503 with
    Retry-After (never a 500, a FAILURE or a dropped connection), and the workers open new
    sessions once it is back."""
    running = start_token_server(tmp_path)
    server = running.server
    ra = x509.load_pem_x509_certificate((server.directory / "ra.pem").read_bytes())
    # (sent at, answered at, status, Retry-After) of every request of the load.
    answers: list[tuple[float, float, int, str | None]] = []
    errors: list[BaseException] = []
    # A connection that a worker being replaced had accepted but not yet read is
    # closed under the client, as on any restart; SCEP clients send again.
    dropped: list[float] = []
    stop = threading.Event()

    def client(n: int) -> None:
        key = generate_key()
        assert isinstance(key, rsa.RSAPrivateKey)
        signer = build_signer_certificate(key, f"load-{n}")
        i = 0
        while not stop.is_set():
            # A new transaction each time, from the same device key (no key generation).
            csr = build_csr(key, f"load-{n}-{i}", challenge=CHALLENGE)
            message = build_pki_message(MessageType.PKCS_REQ, csr, recipient=ra, signer_key=key,
                                        signer_cert=signer, transaction_id=f"load-{n}-{i}",
                                        device_key=key, csr=csr).message
            sent = time.monotonic()
            try:
                status, retry = _post(server, message)
            except ConnectionError:
                dropped.append(sent)
                continue  # the same request again
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return
            answers.append((sent, time.monotonic(), status, retry))
            i += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(2)
        away = running.token.token_dir.with_name("tokens-away")
        running.token.token_dir.rename(away)
        gone_at = time.monotonic()
        time.sleep(6)
        away.rename(running.token.token_dir)
        back_at = time.monotonic()
        # Back: every worker serves again (each tries every 2 s, or is replaced).
        deadline = back_at + 30
        while time.monotonic() < deadline:
            recent = [status for sent, _, status, _ in answers[-12:] if sent > back_at]
            if len(recent) == 12 and all(status == 200 for status in recent):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"no steady service once the token was back:\n"
                                 f"{server.log()[-3000:]}")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    try:
        assert errors == [], errors
        log = server.log()
        replacements = log.count("replacing this worker process")
        assert len(dropped) <= 4 * replacements, (dropped, replacements)
        assert {status for _, _, status, _ in answers} <= {200, 503}
        before = [a for a in answers if a[1] < gone_at]
        assert before and all(status == 200 for _, _, status, _ in before)
        # Sent once the token had been gone for a moment, answered before it was back.
        while_gone = [a for a in answers if a[0] > gone_at + 0.5 and a[1] < back_at]
        assert len(while_gone) >= 4
        assert all(status == 503 and retry is not None and int(retry) > 0
                   for _, _, status, retry in while_gone), while_gone
        assert server.process.poll() is None, "the server itself kept running"
        assert '"outcome":"HTTP 503"' in log, "the log format the next lines rely on"
        assert '"outcome":"HTTP 500"' not in log and "Traceback" not in log, log[-3000:]
        assert '"outcome":"FAILURE"' not in log, "no request was blamed for the token"
        assert "token keys lost" in log
    finally:
        server.stop()


def test_a_refused_pin_is_not_tried_again(tmp_path: Path) -> None:
    """A wrong PIN would count down the token's tries: each worker logs in once, then answers
    503 until an operator fixes the PIN file and restarts the server."""

    def wrong_pin(directory: Path) -> None:
        pin_file = tmp_path / "pin"
        os.chmod(pin_file, 0o600)
        pin_file.write_text("0000-0000\n")

    running = start_token_server(tmp_path, wrong_pin)
    server = running.server
    try:
        ra = x509.load_pem_x509_certificate((server.directory / "ra.pem").read_bytes())
        for n in range(6):
            status, retry = _post(server, build_pkcs_req(ra, cn=f"pin-{n}",
                                                         challenge=CHALLENGE).message)
            assert status == 503 and retry is not None
            time.sleep(0.5)
        log = server.log()
        assert log.count("the token refused the PIN; not trying again") == 2, log[-3000:]
        assert "trying again\"" not in log.replace("not trying again", "")
        assert "0000-0000" not in log
    finally:
        server.stop()


def test_admin_approval_with_token_keys(tmp_path: Path) -> None:
    """Approving through the admin API signs with the token's CA key in a child process:
    the supervisor that serves the API still never loads the module."""
    from tests.integration.test_lifecycle import (
        admin,
        approval_request,
        ca_certs,
        send,
        with_profiles,
    )

    running = start_token_server(tmp_path, with_profiles)
    server = running.server
    try:
        request = approval_request(server, "approve-me")
        assert send(server, request).status is PKIStatus.PENDING
        status, listed = admin(server, "GET", "/v1/requests")
        assert status == 200
        request_id = next(p["request_id"] for p in listed
                          if p["transaction_id"] == request.transaction_id)
        status, record = admin(server, "POST", f"/v1/requests/{request_id}/approve")
        assert status == 200, record
        reply = send(server, build_cert_poll(request, ca_certs(server).ca))
        assert reply.status is PKIStatus.SUCCESS
        cert = reply.certificates[0]
        assert format(cert.serial_number, "x") == record["serial"]
        cert.verify_directly_issued_by(ca_certs(server).ca)
        # Decided already: refused by the ledger, as with file keys.
        assert admin(server, "POST", f"/v1/requests/{request_id}/approve")[0] == 409
        assert admin(server, "POST", f"/v1/requests/{'0' * 16}/approve")[0] == 404
        refused = approval_request(server, "reject-me")
        assert send(server, refused).status is PKIStatus.PENDING
        refused_id = next(p["request_id"] for p in admin(server, "GET", "/v1/requests")[1]
                          if p["transaction_id"] == refused.transaction_id)
        status, decided = admin(server, "POST", f"/v1/requests/{refused_id}/reject", {})
        assert status == 200 and decided["status"] == "rejected"
        assert Path(running.token.module).name not in _maps(server.process.pid)
    finally:
        server.stop()


def test_rollover_with_token_keys(tmp_path: Path) -> None:
    """`ca rollover` generates the next CA and RA keys in the token; GetNextCACert is signed
    by the current RA key in the token; after `ca activate` the new CA issues, and the retired
    CA's keys, still in the token, sign its CRL and open requests sent to the old RA."""
    from tests.integration.test_rollover import openssl, reload_until

    running = start_token_server(tmp_path)
    server, token = running.server, running.token
    env = {"SOFTHSM2_CONF": str(token.conf)}
    directory = server.directory
    old_ca_pem = tmp_path / "old-ca.pem"
    old_ca_pem.write_bytes((directory / "ca.pem").read_bytes())
    old_ca = x509.load_pem_x509_certificate(old_ca_pem.read_bytes())
    old_ra = x509.load_pem_x509_certificate((directory / "ra.pem").read_bytes())
    try:
        before = enroll(server.url, CHALLENGE, "before-rollover").raise_for_status()
        assert before.cert is not None
        next_ca_uri = f"pkcs11:token={token.label};object=scep-ca-g2"
        next_ra_uri = f"pkcs11:token={token.label};object=scep-ra-g2"
        done = scep_fast("ca", "rollover", "--dir", str(directory), "--ca-key-uri",
                         next_ca_uri, "--ra-key-uri", next_ra_uri, "--generate-in-token",
                         env=env)
        assert done.returncode == 0, done.stderr
        nxt = directory / "next"
        assert sorted(p.name for p in nxt.iterdir()) == ["ca.pem", "ca.uri", "ra.pem", "ra.uri"]
        for label in ("scep-ca-g2", "scep-ra-g2"):
            assert "never extractable" in token.private_key_access(label)

        reload_until(server, wanted=True)
        response = server.request("GET", "/scep?operation=GetNextCACert")
        assert response.status == 200
        message = tmp_path / "next.p7"
        message.write_bytes(response.read_body)  # type: ignore[attr-defined]
        signers = tmp_path / "signers.pem"
        verified = openssl("cms", "-verify", "-inform", "DER", "-in", str(message), "-binary",
                           "-CAfile", str(old_ca_pem), "-purpose", "any", "-out", "/dev/null",
                           "-signer", str(signers))
        assert verified.returncode == 0, verified.stderr
        assert x509.load_pem_x509_certificate(signers.read_bytes()) == old_ra

        done = scep_fast("ca", "activate", "--dir", str(directory), env=env)
        assert done.returncode == 0, done.stderr
        config = (directory / "scep-fast.toml").read_text()
        assert f'ca_key = "{next_ca_uri}"' in config and f'ra_key = "{next_ra_uri}"' in config
        old_id = crl.crl_name(old_ca.public_bytes(serialization.Encoding.DER))
        archive = directory / "previous" / old_id
        assert (archive / "ca.uri").read_text().strip().endswith("object=scep-ca")
        assert not list(directory.rglob("*.key")), "no key file anywhere"
        reload_until(server, wanted=False)

        new_ca = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        after = enroll(server.url, CHALLENGE, "after-activate").raise_for_status()
        assert after.cert is not None and after.cert.issuer == new_ca.subject
        after.cert.verify_directly_issued_by(new_ca)
        # A client that still holds the old RA certificate: the retired RA key opens it.
        late = build_pkcs_req(old_ra, cn="late-client", challenge=CHALLENGE)
        response = server.request("POST", "/scep?operation=PKIOperation", body=late.message)
        assert response.status == 200
        reply = parse_cert_rep(response.read_body, late,  # type: ignore[attr-defined]
                               ra_certs=[after.ca_certs.ra])
        assert reply.status is PKIStatus.SUCCESS

        # Both CAs' CRLs, each signed by its own key in the token.
        done = scep_fast("certs", "revoke", format(before.cert.serial_number, "x"),
                         "--dir", str(directory), env=env)
        assert done.returncode == 0, done.stderr
        for ca, ca_pem in ((old_ca, old_ca_pem), (new_ca, tmp_path / "new-ca.pem")):
            ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
            der = fetch_crl(server, crl.crl_name(ca.public_bytes(serialization.Encoding.DER)))
            assert "verify OK" in openssl_crl_verify(der, ca_pem, tmp_path)
        old_crl = x509.load_der_x509_crl(fetch_crl(server, old_id))
        assert old_crl.get_revoked_certificate_by_serial_number(before.cert.serial_number)
        assert Path(token.module).name not in _maps(server.process.pid)
    finally:
        server.stop()


@pytest.mark.parametrize("curve", ["p256", "p384"])
def test_ec_ca_key_in_the_token(tmp_path: Path, curve: str) -> None:
    """An EC CA key generated in the token (its private key object has no public point; the
    core takes it from the public key object) issues certificates and signs the CRL."""
    softhsm.require()
    token = softhsm.make_token(tmp_path / "softhsm")
    pin_file = token.write_pin_file(tmp_path / "pin")
    done = init_with_token(token, tmp_path / "scep", pin_file, "--generate-in-token",
                           "--ca-key", curve)
    assert done.returncode == 0, done.stderr
    ca_pem = tmp_path / "scep" / "ca.pem"
    ca = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    ca.verify_directly_issued_by(ca)
    server = start_server(tmp_path / "scep", env={"SOFTHSM2_CONF": str(token.conf)})
    try:
        result = enroll(server.url, CHALLENGE, f"ec-{curve}").raise_for_status()
        assert result.cert is not None
        result.cert.verify_directly_issued_by(ca)
        expected = (SignatureAlgorithmOID.ECDSA_WITH_SHA384 if curve == "p384"
                    else SignatureAlgorithmOID.ECDSA_WITH_SHA256)
        assert result.cert.signature_algorithm_oid == expected
        name = crl.crl_name(ca.public_bytes(serialization.Encoding.DER))
        assert "verify OK" in openssl_crl_verify(fetch_crl(server, name), ca_pem, tmp_path)
    finally:
        server.stop()
