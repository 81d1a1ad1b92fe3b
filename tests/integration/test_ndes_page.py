"""The NDES-style challenge page against a running server, read as MDMs read NDES's.

The two readers below follow, in our own code, what public MDM code does with
NDES's /certsrv/mscep_admin/ page (see scep_fast/runtime/ndes.py for the
details and where they come from):

- ``zentral_fetch``: zentral's MicrosoftCAChallenge (Basic on the first
  request, 2xx required, Python's "utf-16" codec, a case-sensitive pattern of
  16 to 32 upper-case letters or digits between "<B> " and " </B>").
- ``fleet_fetch``: Fleet's GetNDESSCEPChallenge (no credentials first, Basic
  only after a 401 offering neither NTLM nor Negotiate, 200 required, UTF-16
  big-endian unless a byte-order mark says otherwise, the non-space run after
  "The enrollment challenge password is: <B> ", any case).
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import hashlib
import http.client
import os
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from scep_fast.client import enroll
from scep_fast.protocol import FailInfo, PKIStatus
from scep_fast.runtime.admin import AdminApi, serve_admin
from scep_fast.runtime.ndes import BasicCredential, NdesChallengePage
from scep_fast.service.ledger import Challenge, LedgerFull, LedgerUnavailable
from scep_fast.service.ledger_memory import MemoryLedger
from tests.integration.conftest import (
    Server,
    free_port,
    init_dir,
    scep_fast,
    set_config,
    start_server,
)
from tests.integration.test_nodes_pg import init_pg_dir, second_node
from tests.postgres import PostgresServer

USER = "mdm-service"
PASSWORD = "correct-horse-battery-staple-42"
PAGE = "/certsrv/mscep_admin/"

# zentral's pattern and Fleet's, as their code has them (case rules included).
ZENTRAL_PATTERN = re.compile(r"challenge password is: <B> ([A-Z0-9]{16,32}) </B>")
FLEET_PATTERN = re.compile(r"The enrollment challenge password is: <B> (?P<password>\S*)",
                           re.IGNORECASE)
FLEET_CACHE_FULL = "The password cache is full."


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def get(server: Server, path: str, authorization: str | None = None,
        conn: http.client.HTTPConnection | None = None, *,
        port: int | None = None) -> tuple[int, dict[str, str], bytes]:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port or server.admin_port,
                                              timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": authorization} if authorization
                     else {})
        response = conn.getresponse()
        body = response.read()
        headers = {name.lower(): value for name, value in response.getheaders()}
        return response.status, headers, body
    finally:
        if own:
            conn.close()


def zentral_fetch(server: Server, path: str = PAGE, user: str = USER,
                  password: str = PASSWORD, *, port: int | None = None) -> str:
    status, _, body = get(server, path, basic(user, password), port=port)
    if not 200 <= status < 300:  # requests' raise_for_status
        raise AssertionError(f"zentral: HTTP {status}")
    page = body.decode("utf-16")
    for match in ZENTRAL_PATTERN.finditer(page):
        return match.group(1)
    raise AssertionError("zentral: could not find challenge in response")


def fleet_decode(body: bytes) -> str:
    # BOMOverride over a big-endian decoder that ignores the mark itself.
    if body.startswith(codecs.BOM_UTF16_LE):
        return body[2:].decode("utf-16-le")
    if body.startswith(codecs.BOM_UTF16_BE):
        return body[2:].decode("utf-16-be")
    return body.decode("utf-16-be")


def fleet_fetch(server: Server, path: str = PAGE, user: str = USER,
                password: str = PASSWORD, *, port: int | None = None) -> str:
    # One keep-alive connection, as Go's transport would reuse.
    conn = http.client.HTTPConnection("127.0.0.1", port or server.admin_port, timeout=30)
    try:
        status, headers, body = get(server, path, None, conn)
        if status == 401:
            offered = headers.get("www-authenticate", "")
            assert not offered.lower().startswith(("ntlm", "negotiate")), offered
            status, headers, body = get(server, path, basic(user, password), conn)
    finally:
        conn.close()
    if status != 200:
        raise AssertionError(f"fleet: unexpected status code: {status}")
    page = fleet_decode(body)
    match = FLEET_PATTERN.search(page)
    challenge = match.group("password") if match else ""
    if not challenge:
        if FLEET_CACHE_FULL in page:
            raise AssertionError("fleet: the password cache is full")
        raise AssertionError("fleet: could not retrieve the enrollment challenge password")
    return challenge


def minted_count(server: Server) -> float:
    text = urllib.request.urlopen(  # noqa: S310 - loopback
        f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    wanted = 'scep_ndes_page_requests_total{outcome="minted"} '
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(wanted))


def write_credentials(directory: Path, mode: int = 0o600) -> Path:
    path = directory / "ndes-credentials"
    path.write_text(f"# the MDM's account\n{USER}:{PASSWORD}\n")
    os.chmod(path, mode)
    return path


def enable_ndes(directory: Path, ttl_seconds: int = 3600, bind: str = "admin") -> None:
    write_credentials(directory)
    set_config(directory, "ndes", "enabled", "true")
    set_config(directory, "ndes", "challenge_ttl_seconds", str(ttl_seconds))
    set_config(directory, "ndes", "bind", f'"{bind}"')


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    directory = init_dir(tmp_path_factory.mktemp("ndes") / "scep")
    enable_ndes(directory)
    running = start_server(directory)
    yield running
    running.stop()


@pytest.mark.parametrize("fetch", [zentral_fetch, fleet_fetch], ids=["zentral", "fleet"])
def test_a_password_from_the_page_enrolls_once(server: Server,
                                               fetch: Callable[..., str]) -> None:
    name = fetch.__name__.split("_")[0]
    secret = fetch(server)
    assert re.fullmatch(r"[0-9A-F]{32}", secret)
    first = enroll(server.url, secret, f"ndes-{name}-1")
    assert first.status is PKIStatus.SUCCESS
    second = enroll(server.url, secret, f"ndes-{name}-2")
    assert second.status is PKIStatus.FAILURE and second.fail_info is FailInfo.BAD_REQUEST
    assert "used up" in (second.fail_info_text or "")
    # One line per minted challenge, never the secret.
    assert secret not in server.log()
    assert '"ndes challenge minted"' in server.log()


def test_the_page_is_utf16_little_endian_with_its_mark(server: Server) -> None:
    status, headers, body = get(server, PAGE, basic(USER, PASSWORD))
    assert status == 200
    assert body.startswith(codecs.BOM_UTF16_LE)
    assert headers["content-type"] == "text/html; charset=utf-16"
    assert headers["cache-control"] == "no-store"
    page = body.decode("utf-16")
    assert re.search(r"The enrollment challenge password is: <B> [0-9A-F]{32} </B>", page)


@pytest.mark.parametrize("path", ["/certsrv/mscep_admin", "/certsrv/mscep_admin/mscep.dll",
                                  "/CertSrv/mscep_admin/", "/certsrv/mscep_admin/?x=1"])
def test_every_form_of_the_path_serves_the_page(server: Server, path: str) -> None:
    assert re.fullmatch(r"[0-9A-F]{32}", zentral_fetch(server, path))


def test_each_fetch_mints_a_new_password(server: Server) -> None:
    before = minted_count(server)
    secrets = {zentral_fetch(server) for _ in range(5)}
    assert len(secrets) == 5
    assert minted_count(server) == before + 5


@pytest.mark.parametrize("authorization", [
    None,
    basic(USER, PASSWORD + "x"),
    basic(USER + "x", PASSWORD),
    basic("", ""),
    "Basic !!!not-base64",
    "Bearer " + PASSWORD,
    "NTLM TlRMTVNTUAABAAAAB4IIogAAAAAAAAAAAAAAAAAAAAAKAF1YAAAADw==",
], ids=["none", "wrong-password", "wrong-user", "empty", "garbage", "bearer", "ntlm"])
def test_wrong_credentials_get_401_and_mint_nothing(server: Server,
                                                    authorization: str | None) -> None:
    before = minted_count(server)
    status, headers, body = get(server, PAGE, authorization)
    assert status == 401
    assert headers["www-authenticate"] == 'Basic realm="scep-fast NDES", charset="UTF-8"'
    assert b"password" not in body.lower()
    assert minted_count(server) == before


def test_the_admin_api_token_does_not_open_the_page(server: Server) -> None:
    token = (server.directory / "admin-token").read_text().strip()
    assert get(server, PAGE, f"Bearer {token}")[0] == 401


def test_the_page_is_not_on_the_scep_address(server: Server) -> None:
    response = server.request("GET", PAGE, headers={"Authorization": basic(USER, PASSWORD)})
    assert response.status == 404


def test_on_the_scep_address_when_configured(server_factory: Callable[..., Server]) -> None:
    scep = server_factory(name="on-scep", configure=lambda d: enable_ndes(d, bind="scep"))
    for fetch in (zentral_fetch, fleet_fetch):
        secret = fetch(scep, port=scep.port)
        assert enroll(scep.url, secret, f"on-scep-{fetch.__name__}").status is PKIStatus.SUCCESS
        again = enroll(scep.url, secret, f"on-scep-{fetch.__name__}-again")
        assert again.status is PKIStatus.FAILURE and again.fail_info is FailInfo.BAD_REQUEST
    status, headers, body = get(scep, PAGE, basic(USER, PASSWORD + "x"), port=scep.port)
    assert status == 401 and headers["www-authenticate"].startswith("Basic ")
    assert b"password" not in body.lower()
    status, headers, _ = get(scep, PAGE, basic(USER, PASSWORD), port=scep.port)
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-16"
    # Not on the admin address as well.
    assert get(scep, PAGE, basic(USER, PASSWORD))[0] == 401
    assert minted_count(scep) == 3
    assert "Traceback" not in scep.log()


def test_an_expired_password_is_refused(server_factory: Callable[..., Server]) -> None:
    short = server_factory(name="short", configure=lambda d: enable_ndes(d, ttl_seconds=1))
    secret = fleet_fetch(short)
    time.sleep(1.5)
    result = enroll(short.url, secret, "ndes-too-late")
    assert result.status is PKIStatus.FAILURE and result.fail_info is FailInfo.BAD_REQUEST


def test_the_page_is_off_by_default(server_factory: Callable[..., Server]) -> None:
    plain = server_factory(name="plain")
    status, _, body = get(plain, PAGE, basic(USER, PASSWORD))
    assert status != 200 and b"challenge" not in body


def serve_expecting_refusal(directory: Path) -> str:
    done = scep_fast("serve", "--dir", str(directory), "--bind", f"127.0.0.1:{free_port()}",
                     "--metrics-bind", "", "--admin-bind", f"127.0.0.1:{free_port()}",
                     timeout=60)
    assert done.returncode == 2, done.stderr
    return done.stderr


def test_a_credentials_file_readable_by_others_stops_the_start(tmp_path: Path) -> None:
    directory = init_dir(tmp_path / "scep")
    enable_ndes(directory)
    os.chmod(directory / "ndes-credentials", 0o644)
    stderr = serve_expecting_refusal(directory)
    assert "ndes.credentials_file" in stderr and "mode 0644" in stderr
    assert "chmod 600" in stderr
    assert PASSWORD not in stderr


def test_a_missing_credentials_file_stops_the_start(tmp_path: Path) -> None:
    directory = init_dir(tmp_path / "scep")
    enable_ndes(directory)
    (directory / "ndes-credentials").unlink()
    assert "not found" in serve_expecting_refusal(directory)


def test_on_postgresql_a_password_from_one_node_enrolls_once_on_either(
        postgres: PostgresServer, tmp_path: Path) -> None:
    first = init_pg_dir(tmp_path / "node-a", postgres, postgres.new_database())
    enable_ndes(first)
    second = second_node(first, tmp_path / "node-b")
    a = start_server(first)
    try:
        b = start_server(second)
        try:
            secret = fleet_fetch(a)
            assert enroll(b.url, secret, "ndes-pg-1").status is PKIStatus.SUCCESS
            again = enroll(a.url, secret, "ndes-pg-2")
            assert again.status is PKIStatus.FAILURE
            assert again.fail_info is FailInfo.BAD_REQUEST
            assert enroll(a.url, zentral_fetch(b), "ndes-pg-3").status is PKIStatus.SUCCESS
        finally:
            b.stop()
    finally:
        a.stop()
    for node in (a, b):
        assert "Traceback" not in node.log(), node.log()[-3000:]


# ---- a ledger that cannot take the challenge (the admin API in this process) ------------


class _RefusingLedger(MemoryLedger):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def add_challenge(self, challenge: Challenge) -> None:
        raise self.error


@contextlib.contextmanager
def _page_server(error: Exception) -> Iterator[Server]:
    credential = BasicCredential(hashlib.sha256(USER.encode()).digest(),
                                 hashlib.sha256(PASSWORD.encode()).digest())
    ledger = _RefusingLedger(error)
    page = NdesChallengePage(ledger, ["default"], [credential], ttl_seconds=3600,
                             profile="default")
    api = AdminApi(ledger, lambda: None,  # type: ignore[arg-type,return-value]
                   ["default"], b"t" * 32, ndes=page)
    admin = serve_admin(api, "127.0.0.1", 0)
    try:
        # Only the admin port of this stand-in is used.
        yield Server(Path("."), 0, None, Path("."), 0,  # type: ignore[arg-type]
                     admin.server_address[1])
    finally:
        admin.shutdown()
        admin.server_close()


def test_a_full_ledger_reads_as_a_full_password_cache() -> None:
    with _page_server(LedgerFull("the file system is full")) as stand_in:
        with pytest.raises(AssertionError, match="the password cache is full"):
            fleet_fetch(stand_in)
        with pytest.raises(AssertionError, match="could not find challenge"):
            zentral_fetch(stand_in)


def test_an_unavailable_ledger_gets_503_with_retry_after() -> None:
    with _page_server(LedgerUnavailable("the database is down")) as stand_in:
        status, headers, body = get(stand_in, PAGE, basic(USER, PASSWORD))
        assert status == 503 and headers["retry-after"].isdigit()
        assert b"password" not in body
