"""Our client against micromdm's scepserver, a third-party SCEP server.

scepserver has no listen-address flag and listens on every interface, so it
runs only inside a private network namespace (``unshare -n``) whose only
interface is loopback, and our client runs in the same namespace through
``python -m scep_fast.client enroll``. The namespace lives as long as its
processes: when the run ends, or is killed at its time limit, it is gone.

What this proves: enrollment by POST and by GET succeeds against an
independent server; the issued certificate carries our device key and
chains to the depot's CA; a wrong challenge comes back as a signed FAILURE
that we read. Quirk(micromdm): it answers with single DES and SHA-1 whatever
the request used, so this also proves the client reads those.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import needs_peer, needs_root

SCEPSERVER = shutil.which("scepserver")
ROOT = Path(__file__).resolve().parents[2]
PORT = 8080  # free by construction: the namespace is private
CHALLENGE = "interop-challenge"
RUN_TIMEOUT_SECONDS = 120

pytestmark = [
    needs_peer(SCEPSERVER is not None,
               "micromdm scepserver is not installed (Debian package `scep`)"),
    needs_root(),
]

# name -> extra arguments of `python -m scep_fast.client enroll`
CASES = {
    "post": ["--cn", "interop-post", "--challenge", CHALLENGE, "--san", "post.example"],
    "get": ["--cn", "interop-get", "--challenge", CHALLENGE, "--get"],
    "post-aes256-sha512": ["--cn", "interop-strong", "--challenge", CHALLENGE,
                           "--cipher", "aes256", "--digest", "sha512"],
    "get-des3-sha1": ["--cn", "interop-legacy", "--challenge", CHALLENGE, "--get",
                      "--cipher", "des3", "--digest", "sha1"],
    "wrong-challenge": ["--cn", "interop-refused", "--challenge", "not-the-challenge"],
}

_SCRIPT = """
set -u
ip link set lo up || exit 90
"$SCEPSERVER" -depot "$DEPOT" -port "$PORT" -challenge "$CHALLENGE" >"$OUT/server.log" 2>&1 &
server=$!
trap 'kill -INT "$server" 2>/dev/null; wait "$server" 2>/dev/null' EXIT
tries=0
until "$PY" -c "$PROBE" "$PORT" 2>/dev/null; do
    tries=$((tries + 1))
    [ "$tries" -ge 100 ] && exit 91
    sleep 0.1
done
"""


# Succeeds once something listens on the port given as argument.
_PROBE = "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 0.2)"


def _client_line(name: str, args: list[str], out: Path) -> str:
    command = [
        sys.executable, "-m", "scep_fast.client", "enroll", f"http://127.0.0.1:{PORT}/scep",
        *args, "--timeout", "20",
        "--key-out", str(out / f"{name}.key"), "--cert-out", str(out / f"{name}.pem"),
    ]
    return (f"{shlex.join(command)} >{shlex.quote(str(out / (name + '.json')))} "
            f"2>{shlex.quote(str(out / (name + '.err')))}; "
            f"echo $? >{shlex.quote(str(out / (name + '.rc')))}")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs every case once in one namespace; returns the directory of results."""
    assert SCEPSERVER is not None
    base = tmp_path_factory.mktemp("micromdm")
    depot, out = base / "depot", base / "out"
    out.mkdir()
    init = subprocess.run([SCEPSERVER, "ca", "-init", "-keySize", "2048", "-depot", str(depot)],
                          capture_output=True, timeout=60, cwd=base)
    assert init.returncode == 0, init.stderr.decode()
    script = _SCRIPT + "\n".join(_client_line(n, a, out) for n, a in CASES.items()) + "\n"
    env = {**os.environ, "SCEPSERVER": SCEPSERVER, "DEPOT": str(depot), "PORT": str(PORT),
           "CHALLENGE": CHALLENGE, "OUT": str(out), "PY": sys.executable, "PROBE": _PROBE}
    # A session of its own, so that at the time limit the whole group
    # (shell, scepserver, client) is killed and the namespace goes with it.
    proc = subprocess.Popen(["unshare", "-n", "sh", "-c", script], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the namespace run did not finish in {RUN_TIMEOUT_SECONDS} s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, (
        f"namespace setup failed ({proc.returncode}): {stderr.decode()} "
        f"{(out / 'server.log').read_text() if (out / 'server.log').exists() else ''}"
    )
    (base / "ca.pem").write_bytes((depot / "ca.pem").read_bytes())
    return out


def _outcome(out: Path, name: str) -> tuple[int, dict[str, object]]:
    rc = int((out / f"{name}.rc").read_text())
    text = (out / f"{name}.json").read_text()
    assert text, (out / f"{name}.err").read_text()
    return rc, json.loads(text)


def _depot_ca(out: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((out.parent / "ca.pem").read_bytes())


def _spki(key) -> bytes:  # type: ignore[no-untyped-def]
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("name", ["post", "get", "post-aes256-sha512", "get-des3-sha1"])
def test_enrollment_succeeds(run: Path, name: str) -> None:
    rc, outcome = _outcome(run, name)
    assert rc == 0, outcome
    assert outcome["status"] == "SUCCESS"
    # Quirk(micromdm): single DES and SHA-1 whatever we asked for.
    assert (outcome["digest"], outcome["cipher"]) == ("sha1", "des")
    key = serialization.load_pem_private_key((run / f"{name}.key").read_bytes(), None)
    cert = x509.load_pem_x509_certificate((run / f"{name}.pem").read_bytes())
    assert _spki(cert.public_key()) == _spki(key.public_key()), "issued for our device key"
    ca = _depot_ca(run)
    cert.verify_directly_issued_by(ca)
    assert cert.subject.rfc4514_string() == f"CN={CASES[name][1]}"
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(run.parent / "ca.pem"),
                             str(run / f"{name}.pem")], capture_output=True, timeout=30)
    assert verify.returncode == 0, verify.stderr.decode()


def test_dns_san_reaches_the_certificate(run: Path) -> None:
    cert = x509.load_pem_x509_certificate((run / "post.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["post.example"]


def test_wrong_challenge_is_a_signed_failure(run: Path) -> None:
    rc, outcome = _outcome(run, "wrong-challenge")
    assert rc == 2, outcome
    assert outcome["status"] == "FAILURE"
    assert outcome["fail_info"] == "BAD_REQUEST"
    assert not (run / "wrong-challenge.pem").exists()


def test_every_case_reached_the_server(run: Path) -> None:
    log = (run / "server.log").read_text()
    assert log.count("op=PKIOperation") == len(CASES), log[-2000:]
