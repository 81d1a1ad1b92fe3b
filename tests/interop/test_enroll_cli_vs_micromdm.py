"""The `scep-fast enroll` command against micromdm's scepserver, a third-party SCEP server.

scepserver has no listen-address flag and listens on every interface, so it
runs only inside a private network namespace (``unshare -n``) whose only
interface is loopback (the script checks that before starting it), and the
command runs in the same namespace, through a small proxy there that records
each request's HTTP method. The whole run is bounded three ways: each
enroll command by ``timeout``, the namespace's process group by ``timeout``
(which signals the group, so scepserver goes too even if pytest dies), and
the test by a deadline after which the group is killed. The namespace lives
only as long as its processes.

What this proves: `scep-fast enroll` enrolls against an independent server
by POST and by GET, writes the device key with mode 0600 and a certificate
for that key which verifies against the depot's CA (`openssl verify`); a
wrong challenge comes back as a signed FAILURE, reported with exit code 1
and no files written. Quirk(micromdm): it answers with single DES and SHA-1
whatever the request used, so the command must read those too.
"""

from __future__ import annotations

import os
import shlex
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import needs_peer, needs_root
from tests.interop.conftest import SCEPSERVER

ROOT = Path(__file__).resolve().parents[2]
PORT = 8080  # free by construction: the namespace is private
PROXY_PORT = 8081  # the commands talk to scepserver through a recording proxy
CHALLENGE = "enroll-cli-interop"
COMMAND_TIMEOUT_SECONDS = 60
NAMESPACE_TIMEOUT_SECONDS = 150
TEST_TIMEOUT_SECONDS = NAMESPACE_TIMEOUT_SECONDS + 20

pytestmark = [
    needs_peer(SCEPSERVER is not None,
               "micromdm scepserver is not installed (Debian package `scep`)"),
    needs_root(),
]

# case -> (common name, extra arguments of `scep-fast enroll`)
CASES: dict[str, tuple[str, list[str]]] = {
    "post": ("enroll-cli-post", ["--challenge", CHALLENGE, "--dns", "post.example"]),
    "get": ("enroll-cli-get", ["--challenge", CHALLENGE, "--get"]),
    "wrong-challenge": ("enroll-cli-refused", ["--challenge", "not-the-challenge"]),
}

_SCRIPT = """
set -u
ip link set lo up || exit 90
# Loopback must be the only interface before anything listens.
[ "$(ip -o link show | wc -l)" -eq 1 ] || exit 92
"$SCEPSERVER" -depot "$DEPOT" -port "$PORT" -challenge "$CHALLENGE" >"$OUT/server.log" 2>&1 &
server=$!
"$PY" -c "$PROXY" "$PORT" "$PROXY_PORT" "$OUT/methods.log" >"$OUT/proxy.log" 2>&1 &
proxy=$!
trap 'kill "$proxy" 2>/dev/null; kill -INT "$server" 2>/dev/null; wait' EXIT
trap 'exit 143' INT TERM HUP
for port in "$PORT" "$PROXY_PORT"; do
    tries=0
    until "$PY" -c "$PROBE" "$port" 2>/dev/null; do
        tries=$((tries + 1))
        [ "$tries" -ge 100 ] && exit 91
        sleep 0.1
    done
done
"""

# Forwards to scepserver and writes "METHOD operation" per request, so that
# the test sees which HTTP method each command used.
_PROXY = """
import http.client, http.server, sys, urllib.parse
upstream, port, log = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
class Forward(http.server.BaseHTTPRequestHandler):
    def forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        with open(log, "a") as f:
            f.write(self.command + " " + query.get("operation", ["-"])[0] + "\\n")
        conn = http.client.HTTPConnection("127.0.0.1", upstream, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() == "content-type"}
        conn.request(self.command, self.path, body=body if body else None, headers=headers)
        reply = conn.getresponse()
        data = reply.read()
        self.send_response(reply.status)
        if reply.getheader("Content-Type"):
            self.send_header("Content-Type", reply.getheader("Content-Type"))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        conn.close()
    do_GET = do_POST = forward
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), Forward).serve_forever()
"""

# Succeeds once something listens on the port given as argument.
_PROBE = "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 0.2)"


def _command_line(name: str, cn: str, args: list[str], out: Path) -> str:
    command = [
        "timeout", "-k", "5", str(COMMAND_TIMEOUT_SECONDS),
        sys.executable, "-m", "scep_fast.runtime.cli", "enroll", f"http://127.0.0.1:{PROXY_PORT}/scep",
        "--cn", cn, *args, "--timeout", "20",
        "--key-out", str(out / f"{name}.key"), "--cert-out", str(out / f"{name}.pem"),
    ]
    quoted = {s: shlex.quote(str(out / f"{name}.{s}")) for s in ("out", "err", "rc")}
    return (f"{shlex.join(command)} >{quoted['out']} 2>{quoted['err']}; "
            f"echo $? >{quoted['rc']}")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs every case once in one namespace; returns the directory of results."""
    assert SCEPSERVER is not None
    base = tmp_path_factory.mktemp("enroll-cli")
    depot, out = base / "depot", base / "out"
    out.mkdir()
    init = subprocess.run([SCEPSERVER, "ca", "-init", "-keySize", "2048", "-depot", str(depot)],
                          capture_output=True, timeout=60, cwd=base)
    assert init.returncode == 0, init.stderr.decode()
    script = _SCRIPT + "\n".join(_command_line(name, cn, args, out)
                                 for name, (cn, args) in CASES.items()) + "\n"
    env = {**os.environ, "SCEPSERVER": SCEPSERVER, "DEPOT": str(depot), "PORT": str(PORT),
           "CHALLENGE": CHALLENGE, "OUT": str(out), "PY": sys.executable, "PROBE": _PROBE,
           "PROXY": _PROXY, "PROXY_PORT": str(PROXY_PORT)}
    # A session of its own, so that at the deadline the whole group (timeout,
    # shell, scepserver, commands) is killed and the namespace goes with it.
    proc = subprocess.Popen(
        ["timeout", "-k", "5", str(NAMESPACE_TIMEOUT_SECONDS), "unshare", "-n", "sh", "-c", script],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=TEST_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the namespace run did not finish in {TEST_TIMEOUT_SECONDS} s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    server_log = out / "server.log"
    assert proc.returncode == 0, (
        f"namespace run failed ({proc.returncode}): {stderr.decode()} "
        f"{server_log.read_text() if server_log.exists() else ''}")
    (base / "ca.pem").write_bytes((depot / "ca.pem").read_bytes())
    return out


def _rc(out: Path, name: str) -> int:
    return int((out / f"{name}.rc").read_text())


def _spki(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                            serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("name", ["post", "get"])
def test_enroll_writes_a_0600_key_and_a_certificate_from_the_depot_ca(run: Path,
                                                                     name: str) -> None:
    cn = CASES[name][0]
    assert _rc(run, name) == 0, (run / f"{name}.err").read_text()
    cert_path, key_path = run / f"{name}.pem", run / f"{name}.key"
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert (run / f"{name}.out").read_text().strip() \
        == f"issued serial {cert.serial_number:x} to CN={cn}"

    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert _spki(cert.public_key()) == _spki(key.public_key()), "issued for the written key"
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == cn

    depot_ca = run.parent / "ca.pem"
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(depot_ca.read_bytes()))
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(depot_ca), str(cert_path)],
                            capture_output=True, text=True, timeout=30)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.strip() == f"{cert_path}: OK"


def test_wrong_challenge_is_a_failure_and_writes_nothing(run: Path) -> None:
    assert _rc(run, "wrong-challenge") == 1
    assert "FAILURE (BAD_REQUEST)" in (run / "wrong-challenge.err").read_text()
    assert not (run / "wrong-challenge.key").exists()
    assert not (run / "wrong-challenge.pem").exists()


def test_every_case_reached_the_server_by_its_method(run: Path) -> None:
    log = (run / "server.log").read_text()
    assert log.count("op=PKIOperation") == len(CASES), log[-2000:]
    methods = [line.split() for line in (run / "methods.log").read_text().splitlines()]
    pki = [method for method, operation in methods if operation == "PKIOperation"]
    # In the order of CASES: post, get, wrong-challenge (POST by default).
    assert pki == ["POST", "GET", "POST"], methods
