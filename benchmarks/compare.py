"""scep-fast against micromdm's scepserver, side by side, with OpenSSL as the floor.

    python benchmarks/compare.py            # every scenario (about 15 minutes)
    python benchmarks/compare.py --quick    # a small subset (1 to 2 minutes)
    python benchmarks/compare.py --concurrency 64 --methods post --ca-keys rsa2048 \\
        --ledgers empty,1m --no-micromdm
    python benchmarks/compare.py --no-micromdm --ca-keys rsa2048 --methods post \\
        --concurrency 64 --ledgers pg,pg2      # the PostgreSQL ledger against LMDB
    python benchmarks/compare.py --keys file,softhsm   # keys in files against SoftHSM2

Runs as root (micromdm's scepserver needs a private network namespace, see
``PEERS.md`` of the shared notes). Every run gets a fresh server: scep-fast on
127.0.0.1 with a copy of a cached server directory (keys and configuration)
and an empty ledger, or a copy of a ledger preloaded with 1,000,000 records;
micromdm's ``scepserver`` pinned to one core (``taskset -c 0``) inside the
network namespace with a fresh depot holding a cached RSA-2048 CA, driven by
a load generator started inside the same namespace. Both servers get the
same kind of requests (RSA-2048 device keys, SHA-256, AES-128, distinct CNs),
built and cached beforehand by ``loadgen.py``; the load generator is not
pinned. Only verified SUCCESS replies with distinct serials count. The
preloaded ledger is compared with an empty one over ``--ledger-pairs``
alternating pairs of runs at the headline concurrency (the ratio of the
medians): one run against one other moves by several percent.

The PostgreSQL ledger (``--ledgers pg,pg2``, never by default): a PostgreSQL
server on this machine, started once for the whole command in a temporary
directory the way the tests start theirs (``tests/postgres.py``), with a
fresh database for every run. ``--pg-rounds`` rounds at the headline
concurrency, POST, each of three runs in turn: one node on LMDB (an empty
ledger), one node on PostgreSQL (``pg``), two nodes on PostgreSQL (``pg2``:
two ``serve`` processes with separate directories, the same CA and RA
material and configuration, one database; the load generator spreads its
connections over both). The two nodes get half the workers of one node each
(one each on two cores), so every run has the same worker processes on the
same cores. Besides the server's CPU, each PostgreSQL run reports the
database server's (utime + stime of the postmaster's whole process tree,
over the same interval), the ledger commit time per batch (the servers'
``scep_ledger_commit_seconds`` histogram, before and after), and the
database's transactions and WAL (``pg_stat_database``, ``pg_stat_wal``).

Keys in a PKCS#11 token (``--keys file,softhsm``, never by default, and
then nothing else runs): ``--key-rounds`` rounds at the headline
concurrency, POST, RSA-2048 CA, each of two runs in turn: the file-key server
of the grid (``file``), and the same configuration with the CA and RA keys
generated inside a SoftHSM2 token (``softhsm``). The token is made once for
the whole command in a temporary directory, the way the tests make theirs
(``tests/softhsm.py``), and ``scep-fast init --generate-in-token`` makes its
key pairs, so no private key exists outside it; every run gets a fresh copy
of that server directory and an empty ledger. Its requests are built for the
token's RA certificate, and dropped from the cache at the end. The table
goes to ``benchmarks/results/softhsm.md`` and ``softhsm.json``; the grid's
``results.md``, ``summary.json`` and ``plot.png`` are left as they were.

The floor is ``openssl speed -seconds 3``: a PKCSReq costs at least three
private-key operations (open the request envelope with the RA key, sign the
certificate with the CA key, sign the CertRep with the RA key).

Writes ``benchmarks/results/results.md``, ``plot.png`` and ``summary.json``
(every run in full) and prints as its last line one JSON object with the
headline numbers: scep-fast against micromdm at concurrency 64, RSA-2048
CA, POST, empty ledger.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
# tests.postgres: the tests' PostgreSQL launcher, which the PostgreSQL runs share.
sys.path.insert(1, str(ROOT))

import loadgen  # noqa: E402

RESULTS_DIR = loadgen.RESULTS_DIR
CACHE_DIR = loadgen.CACHE_DIR
SERVERS_DIR = CACHE_DIR / "servers"
LOG_DIR = RESULTS_DIR / "logs"
LEDGER_1M_DIR = CACHE_DIR / "ledger-1m"
LEDGER_1M_RECORDS = 1_000_000

CHALLENGE = "bench-challenge-0"
MICROMDM_PORT = 8080  # free by construction: the namespace is private
SCEP_FAST = Path(sys.executable).with_name("scep-fast")
SCEPSERVER = shutil.which("scepserver") or "/usr/bin/scepserver"
HEADLINE_CONCURRENCY = 64
# The database of the PostgreSQL runs: the tests' settings but PostgreSQL's own
# default shared_buffers (the tests use 32 MB), and WAL sync timing on, so
# pg_stat_wal says how long the commits' flushes took.
PG_SETTINGS = {"shared_buffers": "128MB", "track_wal_io_timing": "on"}
PG_PASSWORD_FILE = "db-password"


@dataclass(frozen=True)
class Scenario:
    server: str  # "scep-fast" or "micromdm"
    ca_key: str  # rsa2048, rsa4096, p256
    method: str  # post or get
    concurrency: int
    ledger: str = "empty"  # LMDB: "empty" or "1m"; "pg": PostgreSQL, an empty database
    # 0: the main grid; 1..N: the empty-against-1m pairs, run alternately.
    pair: int = 0
    # 0 elsewhere; 1..N: the rounds of the PostgreSQL comparison (LMDB, PostgreSQL
    # with one node, with two nodes, in turn).
    pg_round: int = 0
    nodes: int = 1  # serve processes sharing the ledger (PostgreSQL only)
    keys: str = "file"  # where the CA and RA keys are: "file" or "softhsm"
    # 0 elsewhere; 1..N: the rounds of the keys comparison (file, softhsm, in turn).
    keys_round: int = 0

    @property
    def name(self) -> str:
        return (f"{self.server}-{self.ca_key}-{self.method}-c{self.concurrency}"
                f"-{self.ledger}" + (f"-{self.nodes}nodes" if self.nodes > 1 else "")
                + (f"-{self.keys}" if self.keys != "file" else "")
                + (f"-pair{self.pair}" if self.pair else "")
                + (f"-round{self.pg_round}" if self.pg_round else "")
                + (f"-keys-round{self.keys_round}" if self.keys_round else ""))


# ------------------------------------------------------------------ helpers


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                data = Path(f"/proc/{entry}/stat").read_bytes()
                ppid = int(data[data.rindex(b")") + 2:].split()[1])
                parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_process(proc: subprocess.Popen[bytes], sig: int, grace: float = 15.0) -> None:
    """Stops a server we started, then any of its descendants still alive, by pid."""
    if proc.poll() is None:
        children = descendants(proc.pid)
        proc.send_signal(sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def wait_http(host: str, port: int, proc: subprocess.Popen[bytes], seconds: float = 30.0,
              netns: str | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} while starting")
        if netns is None:
            try:
                conn = http.client.HTTPConnection(host, port, timeout=2)
                conn.request("GET", "/scep?operation=GetCACaps")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
        else:
            probe = (f"import socket; socket.create_connection(('{host}', {port}), 0.5)")
            if subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", probe],
                              capture_output=True).returncode == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing answered on {host}:{port} within {seconds:g} s")


# -------------------------------------------------------------- the floor


def openssl_speed(algorithm: str, seconds: int = 3) -> float:
    """Private-key operations per second on one core (sign/s)."""
    out = subprocess.run(["openssl", "speed", "-seconds", str(seconds), algorithm],
                         capture_output=True, text=True, check=True).stdout
    if algorithm.startswith("rsa"):
        bits = algorithm[3:]
        match = re.search(rf"^rsa\s+{bits} bits\s+\S+\s+\S+\s+([\d.]+)", out, re.M)
    else:
        match = re.search(r"^\s*256 bits ecdsa \(nistp256\)\s+\S+\s+\S+\s+([\d.]+)", out, re.M)
    if match is None:
        raise RuntimeError(f"cannot read `openssl speed {algorithm}`: {out[-400:]}")
    return float(match.group(1))


def floors(ca_keys: list[str], seconds: int) -> dict[str, Any]:
    """ms of CPU per enrollment at the floor, per CA key: two RSA-2048 ops + one CA op."""
    speeds = {"rsa2048": openssl_speed("rsa2048", seconds)}
    if "rsa4096" in ca_keys:
        speeds["rsa4096"] = openssl_speed("rsa4096", seconds)
    if "p256" in ca_keys:
        speeds["p256"] = openssl_speed("ecdsap256", seconds)
    ms = {name: 1000 / rate for name, rate in speeds.items()}
    per_ca = {ca: 2 * ms["rsa2048"] + ms[ca] for ca in ca_keys if ca in ms}
    return {"sign_per_s": speeds, "floor_ms_per_enroll": per_ca}


# ------------------------------------------------------ servers and ledger


# What a scep-fast directory keeps from one run to the next: the keys (the
# cached requests are encrypted to the RA). The configuration is written
# afresh by `scep-fast init` for every run, so it always suits the code.
KEY_FILES = ("ca.key", "ca.pem", "ra.key", "ra.pem")


def scep_fast_init(path: Path, ca_key: str, *options: str) -> None:
    subprocess.run([str(SCEP_FAST), "init", "--dir", str(path), "--challenge", CHALLENGE,
                    "--ca-key", ca_key, *options], check=True, capture_output=True)


def scep_fast_template(ca_key: str) -> Path:
    path = SERVERS_DIR / f"scep-fast-{ca_key}"
    if not all((path / name).exists() for name in KEY_FILES):
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        scep_fast_init(path, ca_key)
    return path


def _private_ports(config: Path) -> None:
    """Every listener but the SCEP one (metrics, admin, ...) on a free loopback port."""
    lines, section = [], ""
    for line in config.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped
        elif section != "[server]" and re.match(r'bind\s*=\s*"[^"]+:\d+"', stripped):
            line = f'bind = "127.0.0.1:{free_port()}"'
        lines.append(line)
    config.write_text("\n".join(lines) + "\n")


def micromdm_template() -> Path:
    path = SERVERS_DIR / "micromdm-rsa2048"
    if not (path / "ca.pem").exists():
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([SCEPSERVER, "ca", "-init", "-keySize", "2048", "-depot", str(path)],
                       check=True, capture_output=True, cwd=path.parent)
    return path


def ra_certificate(server: str, ca_key: str) -> x509.Certificate:
    if server == "micromdm":
        pem = (micromdm_template() / "ca.pem").read_bytes()  # it is its own RA
    else:
        pem = (scep_fast_template(ca_key) / "ra.pem").read_bytes()
    return x509.load_pem_x509_certificate(pem)


def preloaded_ledger(records: int = LEDGER_1M_RECORDS) -> Path:
    """A ledger holding ``records`` synthetic records, built once and cached."""
    from scep_fast.runtime import ledger_lmdb
    from scep_fast.runtime.ledger_lmdb import LmdbLedger
    from scep_fast.service.ledger import CertRecord

    marker = LEDGER_1M_DIR / "records"
    # Rebuilt when the ledger's schema changes.
    stamp = (f"{records} records in random order, "
             f"schema {getattr(ledger_lmdb, 'SCHEMA_VERSION', '?')}")
    if marker.exists() and marker.read_text().strip() == stamp:
        return LEDGER_1M_DIR

    shutil.rmtree(LEDGER_1M_DIR, ignore_errors=True)
    rng = random.Random(1_000_000)
    # Random serials like the issuer's (127 bits); new serials land all over the tree.
    serials = sorted({rng.getrandbits(127) | (1 << 64) for _ in range(records)})
    while len(serials) < records:  # nothing collides in practice
        serials = sorted({*serials, rng.getrandbits(127) | (1 << 64)})
    # In random order and in transactions of a thousand, as the server
    # records them: LMDB's append path (sorted input) would pack every page
    # full, which no ledger grown by the server is, and then every later
    # insert would split a page.
    rng.shuffle(serials)
    der = b"\x30\x82\x04\x4c" + bytes(1100)  # about an RSA-2048 certificate
    requester = hashlib.sha256(b"preloaded requester").digest()
    progress = loadgen.Progress(records, f"loading {records:,} ledger records")
    now = int(time.time())

    def generate() -> Iterator[Any]:
        for i, serial in enumerate(serials):
            yield CertRecord(
                serial=serial, der=der, subject=f"CN=preloaded-{i:07d}", sans=(),
                not_before=now - 600, not_after=now + 365 * 86400, issued_at=float(now),
                transaction_id=f"preloaded-{i:07d}", requester_key_sha256=requester,
                csr_sha256=hashlib.sha256(i.to_bytes(4, "big")).digest(),
            )
            if i % 10_000 == 9_999:
                progress.update(10_000)

    with LmdbLedger(LEDGER_1M_DIR) as ledger:
        loaded = ledger.bulk_load(generate(), records_per_transaction=1000)
    progress.update(records - progress.done)
    if loaded != records:
        raise RuntimeError(f"bulk load wrote {loaded} records, not {records}")
    marker.write_text(stamp + "\n")
    return LEDGER_1M_DIR


def scep_fast_dir(path: Path, scenario: Scenario, *init_options: str) -> None:
    """A server directory with the cached keys (the cached requests are encrypted to its RA)."""
    template = scep_fast_template(scenario.ca_key)
    scep_fast_init(path, scenario.ca_key, *init_options)
    for name in KEY_FILES:
        shutil.copyfile(template / name, path / name)
    _private_ports(path / "scep-fast.toml")
    if scenario.ledger == "1m":
        source = preloaded_ledger()
        (path / "ledger").mkdir(mode=0o700)
        shutil.copyfile(source / "data.mdb", path / "ledger" / "data.mdb")
    # Flush the copies now: otherwise the server's first ledger sync writes
    # back 1.4 GB of someone else's dirty pages, on its own CPU time.
    os.sync()


class ScepFastServer:
    """``scep-fast serve`` on a fresh directory (``run_dir/server``), or on ``directory``."""

    def __init__(self, scenario: Scenario, workers: int | None, run_dir: Path,
                 cpus: Sequence[int] | None = None, *, directory: Path | None = None,
                 log_name: str | None = None, env: dict[str, str] | None = None) -> None:
        if directory is None:
            self.dir = run_dir / "server"
            scep_fast_dir(self.dir, scenario)
        else:
            self.dir = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/scep"
        command = [str(SCEP_FAST), "serve", "--dir", str(self.dir),
                   "--bind", f"127.0.0.1:{self.port}"]
        if workers is not None:
            command += ["--workers", str(workers)]
        if cpus:  # taskset execs the server: the pid stays the server's
            command = ["taskset", "-c", ",".join(str(cpu) for cpu in cpus), *command]
        self.metrics_url: str | None = None
        if _serve_has_metrics():
            # Metrics stay on, as in production, on a port of their own.
            metrics_port = free_port()
            command += ["--metrics-bind", f"127.0.0.1:{metrics_port}"]
            self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{log_name or scenario.name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=run_dir, env=env)
        wait_http("127.0.0.1", self.port, self.proc)
        self.netns: str | None = None
        found = re.search(rb"with (\d+) worker", self.log_path.read_bytes())
        self.workers = int(found.group(1)) if found else None

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGTERM)
        self._log.close()


class MicromdmServer:
    def __init__(self, netns: str, run_dir: Path) -> None:
        depot = run_dir / "depot"
        depot.mkdir()
        for name in ("ca.pem", "ca.key"):
            shutil.copy2(micromdm_template() / name, depot / name)
        self.netns = netns
        self.url = f"http://127.0.0.1:{MICROMDM_PORT}/scep"
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / "micromdm-last.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, "taskset", "-c", "0", SCEPSERVER, "-depot",
             str(depot), "-port", str(MICROMDM_PORT), "-challenge", CHALLENGE],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=run_dir)
        wait_http("127.0.0.1", MICROMDM_PORT, self.proc, netns=netns)

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGINT)
        self._log.close()


_METRICS: bool | None = None


def _serve_has_metrics() -> bool:
    global _METRICS
    if _METRICS is None:
        out = subprocess.run([str(SCEP_FAST), "serve", "--help"], capture_output=True,
                             text=True).stdout
        _METRICS = "--metrics-bind" in out
    return _METRICS


@contextlib.contextmanager
def network_namespace() -> Iterator[str]:
    name = f"scepbench{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
                       check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


# ------------------------------------------------------------ SoftHSM2 keys


@dataclass(frozen=True)
class TokenKeys:
    """A SoftHSM2 token holding a CA and an RA key, and a server directory using them."""

    template: Path  # made by `scep-fast init --generate-in-token`: no key file in it
    env: dict[str, str]  # SOFTHSM2_CONF names the token's directory
    ra: x509.Certificate
    token: Any  # tests.softhsm.Token


@contextlib.contextmanager
def softhsm_keys() -> Iterator[TokenKeys]:
    """A fresh token for the whole command, its key pairs generated inside it."""
    from tests import softhsm

    reason = softhsm.missing()
    if reason is not None:
        sys.exit(f"{reason}: leave softhsm out of --keys")
    with tempfile.TemporaryDirectory(prefix="scep-bench-softhsm-") as tmp:
        base = Path(tmp)
        token = softhsm.make_token(base / "softhsm", label="scep-bench")
        pin_file = token.write_pin_file(base / "pin")
        template = base / "server"
        env = {**os.environ, "SOFTHSM2_CONF": str(token.conf)}
        done = subprocess.run(
            [str(SCEP_FAST), "init", "--dir", str(template), "--challenge", CHALLENGE,
             *token.init_options(pin_file), "--generate-in-token"],
            env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"scep-fast init --generate-in-token failed: {done.stderr[-2000:]}")
        ra = x509.load_pem_x509_certificate((template / "ra.pem").read_bytes())
        log(f"SoftHSM2 token {token.label!r} with the CA and RA keys generated inside it")
        keys = TokenKeys(template, env, ra, token)
        try:
            yield keys
        finally:
            # Requests encrypted to an RA key that no longer exists: no use to anyone.
            ra_der = ra.public_bytes(serialization.Encoding.DER)
            loadgen.cache_file(ra_der, loadgen.Params(challenge=CHALLENGE)).unlink(
                missing_ok=True)


def token_server(scenario: Scenario, workers: int | None, run_dir: Path,
                 keys: TokenKeys) -> ScepFastServer:
    """``serve`` on a copy of the token's server directory, with an empty ledger."""
    directory = run_dir / "server"
    shutil.copytree(keys.template, directory, ignore=shutil.ignore_patterns("ledger", "crl"))
    _private_ports(directory / "scep-fast.toml")
    return ScepFastServer(scenario, workers, run_dir, directory=directory, env=keys.env)


# -------------------------------------------------------------- PostgreSQL


@contextlib.contextmanager
def postgres_cluster() -> Iterator[Any]:
    """The PostgreSQL server of every PostgreSQL run, stopped and removed at the end."""
    from tests.postgres import postgres_server, server_binaries

    if server_binaries() is None:
        sys.exit("PostgreSQL is not installed (Debian package `postgresql`): "
                 "leave pg and pg2 out of --ledgers")
    with postgres_server(PG_SETTINGS) as server:
        log(f"PostgreSQL on 127.0.0.1:{server.port}, pid {server.process.pid}")
        yield server


def pg_nodes(scenario: Scenario, workers: int | None, run_dir: Path, pg: Any,
             database: str) -> list[ScepFastServer]:
    """``scenario.nodes`` servers on one database, as an operator sets them up.

    The first directory is made by ``init --ledger-url`` (which creates the
    schema); every other is a copy of it (the same keys and configuration)
    with its own metrics and admin ports.
    """
    first = run_dir / "node-1"
    first.mkdir(mode=0o700)
    (first / PG_PASSWORD_FILE).write_text(pg.password + "\n")
    (first / PG_PASSWORD_FILE).chmod(0o600)
    scep_fast_dir(first, scenario, "--ledger-url", pg.url(database, with_password=False),
                  "--ledger-password-file", PG_PASSWORD_FILE)
    directories = [first]
    for node in range(2, scenario.nodes + 1):
        directory = run_dir / f"node-{node}"
        shutil.copytree(first, directory, ignore=shutil.ignore_patterns("ledger", "crl"))
        _private_ports(directory / "scep-fast.toml")
        directories.append(directory)
    servers: list[ScepFastServer] = []
    try:
        for node, directory in enumerate(directories, 1):
            name = scenario.name + (f"-node{node}" if scenario.nodes > 1 else "")
            servers.append(ScepFastServer(scenario, workers, run_dir, directory=directory,
                                          log_name=name))
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def scrape(url: str) -> dict[str, float]:
    """A Prometheus text page: each sample (name with its labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


COMMIT_METRIC = "scep_ledger_commit_seconds"


def commit_stats(before: list[dict[str, float]], after: list[dict[str, float]]) -> dict[str, Any]:
    """Ledger commits (one per batch) between two scrapes of every node, added up."""
    def delta(name: str) -> float:
        return sum(a.get(name, 0.0) - b.get(name, 0.0) for b, a in zip(before, after,
                                                                         strict=True))

    commits = delta(f"{COMMIT_METRIC}_count")
    if not commits:
        return {"commits": 0}
    buckets = sorted(
        (float(found.group(1)), delta(name)) for name in after[0]
        if (found := re.fullmatch(rf'{COMMIT_METRIC}_bucket\{{le="([^"]+)"\}}', name)))
    # The histogram's buckets are coarse (1, 2, 5, 10 ms...): an upper bound.
    p99 = next((le for le, cumulative in buckets if cumulative >= 0.99 * commits), math.inf)
    return {
        "commits": commits,
        "commit_ms_mean": delta(f"{COMMIT_METRIC}_sum") / commits * 1000,
        "commit_ms_p99_at_most": p99 * 1000,
        "records_per_commit": delta("scep_certificates_issued_total") / commits,
    }


def pg_counters(pg: Any, database: str) -> dict[str, float]:
    """The database's transactions and the cluster's WAL, as PostgreSQL counts them."""
    xact = pg.admin("SELECT xact_commit, xact_rollback FROM pg_stat_database "
                    "WHERE datname = %s", database)[0]
    wal = pg.admin("SELECT wal_records, wal_bytes, wal_write, wal_sync, wal_sync_time "
                   "FROM pg_stat_wal")[0]
    names = ("xact_commit", "xact_rollback", "wal_records", "wal_bytes", "wal_write",
             "wal_sync", "wal_sync_time_ms")
    return {name: float(value) for name, value in zip(names, (*xact, *wal), strict=True)}


def database_stats(before: dict[str, float], after: dict[str, float], enrollments: int,
                   commits: float) -> dict[str, Any]:
    delta = {name: after[name] - before[name] for name in before}
    out: dict[str, Any] = {"counters": delta}
    if enrollments:
        out["xact_per_enroll"] = delta["xact_commit"] / enrollments
        out["wal_bytes_per_enroll"] = delta["wal_bytes"] / enrollments
    if commits:
        out["wal_syncs_per_commit"] = delta["wal_sync"] / commits
    if delta["wal_sync"]:
        out["wal_sync_ms_mean"] = delta["wal_sync_time_ms"] / delta["wal_sync"]
    return out


# -------------------------------------------------------------------- runs


def run_scenario(scenario: Scenario, args: argparse.Namespace, netns: str | None,
                 pg: Any = None, token: TokenKeys | None = None) -> dict[str, Any]:
    if scenario.ledger == "pg":
        return run_pg_scenario(scenario, args, pg)
    count = args.micromdm_count if scenario.server == "micromdm" else args.count
    with tempfile.TemporaryDirectory(prefix="scep-bench-") as tmp:
        run_dir = Path(tmp)
        server: ScepFastServer | MicromdmServer
        if scenario.server == "micromdm":
            assert netns is not None
            server = MicromdmServer(netns, run_dir)
        elif scenario.keys == "softhsm":
            if token is None:
                raise RuntimeError("no SoftHSM2 token for a run with keys in SoftHSM2")
            server = token_server(scenario, args.workers, run_dir, token)
        else:
            server = ScepFastServer(scenario, args.workers, run_dir)
        try:
            before = _scrape_all([server]) if scenario.pg_round else None
            result = run_loadgen(scenario, args, count, run_dir, [server])
            if before is not None:  # the LMDB run of the PostgreSQL comparison
                result["ledger_commit"] = commit_stats(before, _scrape_all([server]))
        finally:
            server.stop()
    result["scenario"] = asdict(scenario)
    return result


def run_loadgen(scenario: Scenario, args: argparse.Namespace, count: int, run_dir: Path,
                servers: Sequence[ScepFastServer | MicromdmServer],
                db_pid: int | None = None) -> dict[str, Any]:
    """The load generator against every server of the run (nodes of one CA); its summary."""
    out = run_dir / "run.json"
    command = [sys.executable, str(BENCH_DIR / "loadgen.py"), "run",
               *(server.url for server in servers),
               "--challenge", CHALLENGE, "--count", str(count),
               "--concurrency", str(scenario.concurrency), "--method", scenario.method,
               "--duration", str(args.duration), "--timeout", str(args.timeout),
               *(option for server in servers
                 for option in ("--server-pid", str(server.proc.pid))),
               "--verify", args.verify,
               "--label", scenario.name, "--json-out", str(out), "--quiet"]
    if db_pid is not None:
        command += ["--db-pid", str(db_pid)]
    if servers[0].netns is not None:
        command = ["ip", "netns", "exec", servers[0].netns, *command]
    limit = args.duration + args.timeout + 300
    done = subprocess.run(command, capture_output=True, text=True, timeout=limit,
                          cwd=ROOT)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"the load generator failed ({done.returncode}): "
                           f"{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    for server in servers:
        if server.proc.poll() is not None:
            result["errors"]["server exited"] = server.proc.returncode
    fast = [server for server in servers if isinstance(server, ScepFastServer)]
    if fast:
        workers = [server.workers for server in fast]
        result["server_workers"] = sum(workers) if None not in workers else None
        if len(fast) > 1:
            result["node_workers"] = workers
    return result


def _scrape_all(servers: Sequence[ScepFastServer]) -> list[dict[str, float]]:
    return [scrape(server.metrics_url) if server.metrics_url else {} for server in servers]


def run_pg_scenario(scenario: Scenario, args: argparse.Namespace, pg: Any) -> dict[str, Any]:
    """One run on a fresh PostgreSQL database, with one node or several."""
    if pg is None:
        raise RuntimeError("no PostgreSQL server for a PostgreSQL run")
    workers = args.workers
    if scenario.nodes > 1:
        # The same worker processes in all as one node: half each (one each on two cores).
        workers = max(1, (args.workers or os.cpu_count() or 1) // scenario.nodes)
    import psycopg

    try:
        database = pg.new_database()
    except psycopg.Error as exc:
        raise RuntimeError(f"PostgreSQL: {exc}") from exc
    try:
        with tempfile.TemporaryDirectory(prefix="scep-bench-") as tmp:
            run_dir = Path(tmp)
            servers = pg_nodes(scenario, workers, run_dir, pg, database)
            try:
                metrics_before = _scrape_all(servers)
                db_before = pg_counters(pg, database)
                result = run_loadgen(scenario, args, args.count, run_dir, servers,
                                     db_pid=pg.process.pid)
                result["ledger_commit"] = commit_stats(metrics_before, _scrape_all(servers))
                result["database"] = database_stats(
                    db_before, pg_counters(pg, database), result["enrollments"],
                    result["ledger_commit"]["commits"])
            except psycopg.Error as exc:
                raise RuntimeError(f"PostgreSQL: {exc}") from exc
            finally:
                for server in servers:
                    server.stop()
    finally:
        # FORCE: a connection a stopped node left behind does not keep it.
        pg.admin(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    result["scenario"] = asdict(scenario)
    return result


def plan(args: argparse.Namespace) -> list[Scenario]:
    if "softhsm" in args.keys:
        # The keys comparison alone: rounds of each kind of key in turn, at the
        # headline concurrency, POST, RSA-2048 CA, compared by their medians.
        at = HEADLINE_CONCURRENCY if HEADLINE_CONCURRENCY in args.concurrency \
            else max(args.concurrency)
        return [Scenario("scep-fast", "rsa2048", "post", at, keys=keys, keys_round=n)
                for n in range(1, args.key_rounds + 1) for keys in args.keys]
    servers = ["scep-fast"] + ([] if args.no_micromdm else ["micromdm"])
    out: list[Scenario] = []
    if "rsa2048" in args.ca_keys and "empty" in args.ledgers:
        for method in args.methods:
            for concurrency in args.concurrency:
                for server in servers:
                    out.append(Scenario(server, "rsa2048", method, concurrency))
    # Other CA keys and the preloaded ledger: at the headline concurrency, POST.
    at = HEADLINE_CONCURRENCY if HEADLINE_CONCURRENCY in args.concurrency \
        else max(args.concurrency)
    for ca_key in args.ca_keys:
        if ca_key == "rsa2048":
            continue
        out.append(Scenario("scep-fast", ca_key, "post", at))
    if "1m" in args.ledgers:
        # One run against another moves by several percent (machine drift, how the
        # connections fall on the workers), so the ledgers are compared over
        # alternating pairs of runs, by their medians.
        for pair in range(1, args.ledger_pairs + 1):
            out.append(Scenario("scep-fast", "rsa2048", "post", at, "empty", pair))
            out.append(Scenario("scep-fast", "rsa2048", "post", at, "1m", pair))
    if "pg" in args.ledgers or "pg2" in args.ledgers:
        # The same for PostgreSQL: rounds of LMDB, one node, two nodes, in turn.
        for pg_round in range(1, args.pg_rounds + 1):
            out.append(Scenario("scep-fast", "rsa2048", "post", at, "empty", pg_round=pg_round))
            if "pg" in args.ledgers:
                out.append(Scenario("scep-fast", "rsa2048", "post", at, "pg",
                                    pg_round=pg_round))
            if "pg2" in args.ledgers:
                out.append(Scenario("scep-fast", "rsa2048", "post", at, "pg",
                                    pg_round=pg_round, nodes=2))
    return out


def prepare_requests(scenarios: list[Scenario], args: argparse.Namespace,
                     token: TokenKeys | None = None) -> None:
    """Builds (or finds in the cache) every request the runs will send, before any run."""
    needs: dict[tuple[str, str, str], int] = {}
    for s in scenarios:
        count = args.micromdm_count if s.server == "micromdm" else args.count
        ca = "rsa2048" if s.server == "micromdm" else s.ca_key
        key = (s.server, ca, s.keys)
        needs[key] = max(needs.get(key, 0), count)
    for (server, ca, keys), count in needs.items():
        if keys == "softhsm":
            assert token is not None
            ra = token.ra
        else:
            ra = ra_certificate(server, ca)
        loadgen.prepare(ra, count, loadgen.Params(challenge=CHALLENGE))


# ----------------------------------------------------------------- reports


def _find(results: list[dict[str, Any]], **want: Any) -> dict[str, Any] | None:
    for r in results:
        if all(r["scenario"][k] == v for k, v in want.items()):
            return r
    return None


def _num(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def headline(results: list[dict[str, Any]], floor: dict[str, Any]) -> dict[str, Any]:
    concurrencies = sorted({r["scenario"]["concurrency"] for r in results})
    at = HEADLINE_CONCURRENCY if HEADLINE_CONCURRENCY in concurrencies else max(concurrencies)
    base = dict(ca_key="rsa2048", method="post", ledger="empty", pair=0, pg_round=0,
                keys_round=0)
    ours = _find(results, server="scep-fast", concurrency=at, **base)
    theirs = _find(results, server="micromdm", concurrency=at, **base)
    floor_ms = floor["floor_ms_per_enroll"]["rsa2048"]
    out: dict[str, Any] = {
        "concurrency": at,
        "ours_enroll_per_s": ours["enroll_per_s"] if ours else None,
        "micromdm_enroll_per_s": theirs["enroll_per_s"] if theirs else None,
        "ratio": None,
        "cpu_ms_per_enroll": ours["cpu_ms_per_enroll"] if ours else None,
        "floor_ms_per_enroll": floor_ms,
        "cpu_vs_floor": None,
        "p99_ms": ours["latency_ms"]["p99"] if ours else None,
        "micromdm_cpu_ms_per_enroll": theirs["cpu_ms_per_enroll"] if theirs else None,
        "micromdm_p99_ms": theirs["latency_ms"]["p99"] if theirs else None,
        "ours_failures": ours["failures"] if ours else None,
    }
    if ours and theirs and theirs["enroll_per_s"]:
        out["ratio"] = ours["enroll_per_s"] / theirs["enroll_per_s"]
    if out["cpu_ms_per_enroll"]:
        out["cpu_vs_floor"] = out["cpu_ms_per_enroll"] / floor_ms
    c256 = _find(results, server="scep-fast", concurrency=256, **base)
    if c256:
        out["c256_failures"] = c256["failures"]
        out["c256_duplicate_serials"] = c256["duplicate_serials"]
    pairs = {ledger: [r["enroll_per_s"] for r in results if r["scenario"]["pair"]
                      and r["scenario"]["ledger"] == ledger] for ledger in ("empty", "1m")}
    if pairs["empty"] and pairs["1m"] and statistics.median(pairs["empty"]):
        out["ledger_empty_enroll_per_s"] = statistics.median(pairs["empty"])
        out["ledger_1m_enroll_per_s"] = statistics.median(pairs["1m"])
        out["ledger_1m_ratio"] = out["ledger_1m_enroll_per_s"] / out["ledger_empty_enroll_per_s"]
    checks: dict[str, bool] = {}
    if ours and at == HEADLINE_CONCURRENCY:
        checks["c64_at_least_1000_per_s"] = ours["enroll_per_s"] >= 1000
        checks["c64_p99_at_most_100_ms"] = ours["latency_ms"]["p99"] <= 100
    if out["ratio"] is not None:
        checks["at_least_4x_micromdm"] = out["ratio"] >= 4
    if out["cpu_vs_floor"] is not None:
        checks["cpu_at_most_2x_floor"] = out["cpu_vs_floor"] <= 2.0
    if c256:
        checks["c256_no_failure_no_duplicate"] = (c256["failures"] == 0
                                                  and c256["duplicate_serials"] == 0)
    if "ledger_1m_ratio" in out:
        checks["ledger_1m_at_least_90_percent"] = out["ledger_1m_ratio"] >= 0.9
    pg = pg_summary(results)
    if pg:
        out["postgresql"] = pg
        if "pg_vs_lmdb" in pg:
            checks["pg_at_least_80_percent_of_lmdb"] = pg["pg_vs_lmdb"] >= 0.8
    out["checks"] = checks
    return out


PG_SERIES = (("lmdb", "empty", 1), ("pg", "pg", 1), ("pg2", "pg", 2))


def _median(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None and not (isinstance(v, float)
                                                            and math.isnan(v))]
    return statistics.median(present) if present else None


def pg_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The PostgreSQL comparison: per series (lmdb, pg, pg2), medians over its rounds."""
    out: dict[str, Any] = {}
    for label, ledger, nodes in PG_SERIES:
        runs = [r for r in results if r["scenario"].get("pg_round")
                and r["scenario"]["ledger"] == ledger and r["scenario"].get("nodes", 1) == nodes]
        if not runs:
            continue
        commit = [r.get("ledger_commit") or {} for r in runs]
        database = [r.get("database") or {} for r in runs]
        series = {
            "rounds": len(runs),
            "enroll_per_s": _median([r["enroll_per_s"] for r in runs]),
            "p99_ms": _median([r["latency_ms"]["p99"] for r in runs]),
            "server_cpu_ms_per_enroll": _median([r["cpu_ms_per_enroll"] for r in runs]),
            "commit_ms_mean": _median([c.get("commit_ms_mean") for c in commit]),
            "records_per_commit": _median([c.get("records_per_commit") for c in commit]),
            "failures": sum(r["failures"] for r in runs),
            "duplicate_serials": sum(r["duplicate_serials"] for r in runs),
        }
        if ledger == "pg":
            series["db_cpu_ms_per_enroll"] = _median(
                [r.get("db_cpu_ms_per_enroll") for r in runs])
            series["total_cpu_ms_per_enroll"] = _median(
                [r["cpu_ms_per_enroll"] + r["db_cpu_ms_per_enroll"] for r in runs
                 if r["cpu_ms_per_enroll"] is not None
                 and r.get("db_cpu_ms_per_enroll") is not None])
            series["xact_per_enroll"] = _median([d.get("xact_per_enroll") for d in database])
            series["wal_bytes_per_enroll"] = _median(
                [d.get("wal_bytes_per_enroll") for d in database])
        out[label] = series
    for label in ("pg", "pg2"):
        if "lmdb" in out and label in out and out["lmdb"]["enroll_per_s"]:
            out[f"{label}_vs_lmdb"] = out[label]["enroll_per_s"] / out["lmdb"]["enroll_per_s"]
    return out


def _errors_markdown(results: list[dict[str, Any]]) -> list[str]:
    """The runs' failures by kind, as markdown lines (none when no run failed)."""
    errors = [(r["scenario"], r["errors"]) for r in results if r["errors"]]
    if not errors:
        return []
    lines = ["", "Errors by kind:", ""]
    for s, errs in errors:
        text = ", ".join(f"{k}: {v}" for k, v in sorted(errs.items()))
        lines.append(f"- {Scenario(**s).name}: {text}")
    return lines


def write_markdown(path: Path, results: list[dict[str, Any]], floor: dict[str, Any],
                   head: dict[str, Any], meta: dict[str, Any]) -> None:
    lines = [
        "# scep-fast against micromdm scepserver",
        "",
        f"Machine: {meta['cpus']} CPUs; load generator on the same machine. scep-fast: "
        f"{meta['workers']} workers, unpinned; micromdm scepserver: pinned to one core "
        "(`taskset -c 0`) in a private network namespace. Only verified SUCCESS replies with "
        "distinct serials count. Verification: "
        f"{'every reply' if meta['verify'] == 'all' else meta['verify'] + ' replies per run'}.",
        "",
        "Floor (`openssl speed -seconds {s}`, one core): ".format(s=meta["speed_seconds"])
        + ", ".join(f"{k} {v:,.0f} sign/s" for k, v in floor["sign_per_s"].items())
        + "; three private-key operations per enrollment = "
        + ", ".join(f"{k} CA {v:.3f} ms" for k, v in floor["floor_ms_per_enroll"].items())
        + ".",
        "",
        "| server | CA | method | ledger | conc. | enroll/s | p50 ms | p90 ms | p99 ms "
        "| CPU ms/enroll | x floor | failures | dup. serials |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s = r["scenario"]
        fl = floor["floor_ms_per_enroll"].get(s["ca_key"])
        cpu = r["cpu_ms_per_enroll"]
        lat = r["latency_ms"]
        lines.append(
            f"| {s['server']} | {s['ca_key']} | {s['method'].upper()} | {_ledger_text(s)} "
            f"| {s['concurrency']} | {_num(r['enroll_per_s'])} | {_num(lat['p50'], 1)} "
            f"| {_num(lat['p90'], 1)} | {_num(lat['p99'], 1)} | {_num(cpu, 2)} "
            f"| {_num(cpu / fl if cpu and fl else None, 2)} | {r['failures']} "
            f"| {r['duplicate_serials']} |")
    lines += _errors_markdown(results)
    lines += pg_markdown(results)
    lines += ["", "Headline (concurrency {c}, RSA-2048 CA, POST, empty ledger):".format(
        c=head["concurrency"]), "", "```json", json.dumps(head, indent=2), "```", "",
        "![throughput and p99 against concurrency](plot.png)", "",
        "Command: `" + meta["command"] + "`", ""]
    path.write_text("\n".join(lines))


def _ledger_text(s: dict[str, Any]) -> str:
    text = "PostgreSQL" if s["ledger"] == "pg" else s["ledger"]
    if s.get("nodes", 1) > 1:
        text += f", {s['nodes']} nodes"
    if s["pair"]:
        text += f" (pair {s['pair']})"
    if s.get("pg_round"):
        text += f" (PostgreSQL comparison, round {s['pg_round']})"
    return text


PG_COLUMNS = (
    "| ledger | round | nodes x workers | enroll/s | p99 ms | server CPU ms/enroll "
    "| DB CPU ms/enroll | total CPU ms/enroll | commit ms mean | commit ms p99 <= "
    "| records/commit | DB xact/enroll | WAL syncs/commit | WAL sync ms | WAL bytes/enroll "
    "| failures | dup. serials |",
    "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
)


def pg_markdown(results: list[dict[str, Any]]) -> list[str]:
    """The PostgreSQL comparison's own table, with the database's cost per enrollment."""
    runs = [r for r in results if r["scenario"].get("pg_round")]
    if not runs:
        return []
    lines = ["", "PostgreSQL ledger against LMDB (POST, RSA-2048 CA, concurrency "
             f"{runs[0]['scenario']['concurrency']}; the database on this machine; two nodes "
             "get half the workers of one node each, so every run has the same worker "
             "processes):", "", *PG_COLUMNS]
    for r in runs:
        s = r["scenario"]
        commit = r.get("ledger_commit") or {}
        database = r.get("database") or {}
        workers = r.get("node_workers") or [r.get("server_workers")]
        server_cpu, db_cpu = r["cpu_ms_per_enroll"], r.get("db_cpu_ms_per_enroll")
        total = server_cpu + (db_cpu or 0.0) if server_cpu is not None else None
        wal = database.get("wal_bytes_per_enroll")
        lines.append(
            f"| {'PostgreSQL' if s['ledger'] == 'pg' else 'LMDB'} | {s['pg_round']} "
            f"| {len(workers)} x {workers[0] if workers[0] is not None else '?'} "
            f"| {_num(r['enroll_per_s'])} | {_num(r['latency_ms']['p99'], 1)} "
            f"| {_num(server_cpu, 3)} | {_num(db_cpu, 3)} | {_num(total, 3)} "
            f"| {_num(commit.get('commit_ms_mean'), 2)} "
            f"| {_num(commit.get('commit_ms_p99_at_most'), 0)} "
            f"| {_num(commit.get('records_per_commit'), 1)} "
            f"| {_num(database.get('xact_per_enroll'), 3)} "
            f"| {_num(database.get('wal_syncs_per_commit'), 2)} "
            f"| {_num(database.get('wal_sync_ms_mean'), 2)} | {_num(wal, 0)} "
            f"| {r['failures']} | {r['duplicate_serials']} |")
    summary = pg_summary(results)
    ratios = [f"{label} {summary[f'{label}_vs_lmdb']:.0%} of LMDB"
              for label in ("pg", "pg2") if f"{label}_vs_lmdb" in summary]
    if ratios:
        rounds = summary["lmdb"]["rounds"]
        lines += ["", "Throughput, " + ("medians over " + f"{rounds} rounds" if rounds > 1
                                         else "one round") + ": " + ", ".join(ratios) + "."]
    return lines


KEY_SERIES = ("file", "softhsm")


def keys_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The keys comparison: per kind of key (file, softhsm), medians over its rounds."""
    out: dict[str, Any] = {}
    for label in KEY_SERIES:
        runs = [r for r in results if r["scenario"].get("keys_round")
                and r["scenario"].get("keys") == label]
        if runs:
            out[label] = {
                "rounds": len(runs),
                "enroll_per_s": _median([r["enroll_per_s"] for r in runs]),
                "p99_ms": _median([r["latency_ms"]["p99"] for r in runs]),
                "cpu_ms_per_enroll": _median([r["cpu_ms_per_enroll"] for r in runs]),
                "failures": sum(r["failures"] for r in runs),
                "duplicate_serials": sum(r["duplicate_serials"] for r in runs),
            }
    if "file" in out and "softhsm" in out:
        ratios = {}
        for name in ("enroll_per_s", "p99_ms", "cpu_ms_per_enroll"):
            ours, base = out["softhsm"][name], out["file"][name]
            ratios[name] = ours / base if ours is not None and base else None
        out["softhsm_vs_file"] = ratios
    return out


def write_keys_markdown(path: Path, runs: list[dict[str, Any]], floor: dict[str, Any],
                        summary: dict[str, Any], meta: dict[str, Any]) -> None:
    """softhsm.md: every run of the keys comparison, then the medians and their ratio."""
    fl = floor["floor_ms_per_enroll"].get("rsa2048")
    first = runs[0]["scenario"]
    lines = [
        "# Keys in files against keys in SoftHSM2",
        "",
        f"Machine: {meta['cpus']} CPUs; load generator on the same machine. scep-fast: "
        f"{meta['workers']} workers, unpinned; POST, RSA-2048 CA, concurrency "
        f"{first['concurrency']}, an empty LMDB ledger. `file`: the CA and RA keys in files; "
        "`softhsm`: the same configuration with both keys generated inside a SoftHSM2 token "
        "(one token for the command, a fresh server directory and ledger for every run). "
        "Only verified SUCCESS replies with distinct serials count. Verification: "
        f"{'every reply' if meta['verify'] == 'all' else meta['verify'] + ' replies per run'}.",
        "",
        f"Floor (`openssl speed -seconds {meta['speed_seconds']}`, one core): three "
        f"RSA-2048 private-key operations per enrollment = {_num(fl, 3)} ms.",
        "",
        "| keys | round | enroll/s | p50 ms | p90 ms | p99 ms | CPU ms/enroll | x floor "
        "| failures | dup. serials |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        s, lat, cpu = r["scenario"], r["latency_ms"], r["cpu_ms_per_enroll"]
        lines.append(
            f"| {s['keys']} | {s['keys_round']} | {_num(r['enroll_per_s'])} "
            f"| {_num(lat['p50'], 1)} | {_num(lat['p90'], 1)} | {_num(lat['p99'], 1)} "
            f"| {_num(cpu, 3)} | {_num(cpu / fl if cpu and fl else None, 2)} "
            f"| {r['failures']} | {r['duplicate_serials']} |")
    lines += _errors_markdown(runs)
    lines += ["", "Medians over the rounds:", "",
              "| keys | rounds | enroll/s | p99 ms | CPU ms/enroll | failures | dup. serials |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for label in KEY_SERIES:
        if label in summary:
            m = summary[label]
            lines.append(f"| {label} | {m['rounds']} | {_num(m['enroll_per_s'])} "
                         f"| {_num(m['p99_ms'], 1)} | {_num(m['cpu_ms_per_enroll'], 3)} "
                         f"| {m['failures']} | {m['duplicate_serials']} |")
    ratio = summary.get("softhsm_vs_file")
    if ratio:
        lines += ["", "softhsm / file: enroll/s " + _num(ratio["enroll_per_s"], 2)
                  + ", p99 " + _num(ratio["p99_ms"], 2) + ", CPU per enrollment "
                  + _num(ratio["cpu_ms_per_enroll"], 2) + "."]
    lines += ["", "Command: `" + meta["command"] + "`", ""]
    path.write_text("\n".join(lines))


def write_plot(path: Path, results: list[dict[str, Any]]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install '.[bench]'): no plot")
        return False
    series: dict[str, list[tuple[int, float, float]]] = {}
    for r in results:
        s = r["scenario"]
        if (s["ca_key"] != "rsa2048" or s["ledger"] != "empty" or s["pair"] or s["pg_round"]
                or s.get("keys_round")):
            continue
        key = f"{s['server']} {s['method'].upper()}"
        series.setdefault(key, []).append(
            (s["concurrency"], r["enroll_per_s"], r["latency_ms"]["p99"]))
    if not series:
        log("no run of the main grid: no plot")
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, points in sorted(series.items()):
        points.sort()
        xs = [p[0] for p in points]
        style = "-" if key.startswith("scep-fast") else "--"
        left.plot(xs, [p[1] for p in points], style, marker="o", label=key)
        right.plot(xs, [p[2] for p in points], style, marker="o", label=key)
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrency (connections)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    left.set_ylim(bottom=0)
    left.set_ylabel("verified enrollments/s")
    left.set_title("Throughput (RSA-2048 CA)")
    right.set_yscale("log")
    right.set_ylabel("p99 latency (ms)")
    right.set_title("p99 latency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------- main


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a small subset: POST at 16 and 64, GET at 64, RSA-2048, "
                        "empty ledger, fewer requests")
    parser.add_argument("--concurrency", type=lambda t: [int(x) for x in _list(t)],
                        help="comma-separated (default 1,16,64,256)")
    parser.add_argument("--methods", type=_list, help="post,get")
    parser.add_argument("--ca-keys", type=_list, help="rsa2048,rsa4096,p256")
    parser.add_argument("--ledgers", type=_list,
                        help="empty,1m (LMDB, default both; --quick: empty), pg,pg2 (never by "
                        "default: the PostgreSQL ledger with one node, with two nodes, each "
                        "against LMDB in the same round)")
    parser.add_argument("--keys", type=_list, default=["file"],
                        help="file (default: key files, every run), softhsm (never by default: "
                        "the key comparison alone; file,softhsm: rounds of the file-key server "
                        "and of the same with its CA and RA keys in a SoftHSM2 token)")
    parser.add_argument("--no-micromdm", action="store_true")
    parser.add_argument("--count", type=int, help="requests per scep-fast run (at most)")
    parser.add_argument("--micromdm-count", type=int, help="requests per micromdm run")
    parser.add_argument("--duration", type=float,
                        help="seconds per run: no new request after this")
    parser.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    parser.add_argument("--workers", type=int, help="scep-fast serve --workers (default: "
                        "the server's own default)")
    parser.add_argument("--verify", default="all", help="'all' or a sample size per run")
    parser.add_argument("--speed-seconds", type=int, default=3)
    parser.add_argument("--ledger-pairs", type=int, default=3,
                        help="alternating empty and 1m runs compared (default 3)")
    parser.add_argument("--pg-rounds", type=int, default=3,
                        help="rounds of LMDB, pg and pg2 runs in turn, compared by their "
                        "medians (default 3)")
    parser.add_argument("--key-rounds", type=int, default=3,
                        help="rounds of file and softhsm runs in turn, compared by their "
                        "medians (default 3)")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "concurrency": [16, 64] if quick else [1, 16, 64, 256],
        "methods": ["post", "get"],
        "ca_keys": ["rsa2048"] if quick else ["rsa2048", "rsa4096", "p256"],
        "ledgers": ["empty"] if quick else ["empty", "1m"],
        "count": 3000 if quick else 12000,
        "micromdm_count": 800 if quick else 3000,
        "duration": 4.0 if quick else 10.0,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name, allowed in (("methods", {"post", "get"}),
                          ("ca_keys", {"rsa2048", "rsa4096", "p256"}),
                          ("ledgers", {"empty", "1m", "pg", "pg2"}),
                          ("keys", {"file", "softhsm"})):
        unknown = set(getattr(args, name)) - allowed
        if unknown:
            parser.error(f"unknown {name}: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scenarios = plan(args)
    if args.quick and args.methods == ["post", "get"]:
        # GET only at the headline concurrency.
        scenarios = [s for s in scenarios
                     if s.method == "post" or s.concurrency == HEADLINE_CONCURRENCY]
    if any(s.server == "micromdm" for s in scenarios) and os.geteuid() != 0:
        sys.exit("micromdm's scepserver runs in a private network namespace: run as root, "
                 "or pass --no-micromdm")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    log(f"{len(scenarios)} runs: " + ", ".join(s.name for s in scenarios))

    log("measuring the floor with openssl speed")
    floor = floors(sorted({s.ca_key for s in scenarios}), args.speed_seconds)
    log("floor: " + json.dumps(floor))

    results: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        # The token first: the requests of its runs are encrypted to its RA.
        token = stack.enter_context(softhsm_keys()) \
            if any(s.keys == "softhsm" for s in scenarios) else None
        prepare_requests(scenarios, args, token)
        if any(s.ledger == "1m" for s in scenarios):
            preloaded_ledger()
        netns = stack.enter_context(network_namespace()) \
            if any(s.server == "micromdm" for s in scenarios) else None
        pg = stack.enter_context(postgres_cluster()) \
            if any(s.ledger == "pg" for s in scenarios) else None
        for scenario in scenarios:
            log(f"run {scenario.name} ...")
            try:
                result = run_scenario(scenario, args, netns, pg, token)
            except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
                log(f"  failed: {exc}")
                result = {"scenario": asdict(scenario), "enroll_per_s": 0.0,
                          "latency_ms": {"p50": math.nan, "p90": math.nan, "p99": math.nan},
                          "cpu_ms_per_enroll": None, "failures": 1, "duplicate_serials": 0,
                          "errors": {f"run failed: {str(exc)[:200]}": 1}}
            results.append(result)
            lat = result["latency_ms"]
            log(f"  {result['enroll_per_s']:8.0f} enroll/s  p50 {lat['p50']:.1f} ms  "
                f"p99 {lat['p99']:.1f} ms  CPU {_num(result['cpu_ms_per_enroll'], 2)} "
                f"ms/enroll  failures {result['failures']}  "
                f"dup {result['duplicate_serials']}"
                + (f"  errors {result['errors']}" if result["errors"] else ""))
            if "ledger_commit" in result:
                commit = result["ledger_commit"]
                log(f"  commits {_num(commit.get('commits'))}  "
                    f"{_num(commit.get('commit_ms_mean'), 2)} ms mean  "
                    f"{_num(commit.get('records_per_commit'), 1)} records/commit"
                    + (f"  DB CPU {_num(result.get('db_cpu_ms_per_enroll'), 3)} ms/enroll"
                       if "db_cpu_s" in result else ""))

    workers = sorted({r["server_workers"] for r in results if r.get("server_workers")})
    meta = {
        "cpus": os.cpu_count(),
        "workers": ",".join(map(str, workers)) if workers else "default",
        "verify": args.verify,
        "speed_seconds": args.speed_seconds,
        "command": "python benchmarks/compare.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    finished = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    key_runs = [r for r in results if r["scenario"].get("keys_round")]
    if key_runs:
        # Files of their own: the grid's results.md, summary.json and plot.png stay.
        keys = keys_summary(key_runs)
        (RESULTS_DIR / "softhsm.json").write_text(json.dumps(
            {"summary": keys, "floor": floor, "meta": meta, "runs": key_runs,
             "finished": finished}, indent=2) + "\n")
        write_keys_markdown(RESULTS_DIR / "softhsm.md", key_runs, floor, keys, meta)
        log(f"wrote {RESULTS_DIR / 'softhsm.md'}, softhsm.json")
        if len(key_runs) == len(results):
            print(json.dumps(keys))
            return 0
    results = [r for r in results if not r["scenario"].get("keys_round")]
    head = headline(results, floor)
    summary = {"headline": head, "floor": floor, "meta": meta, "runs": results,
               "finished": finished}
    (RESULTS_DIR / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_markdown(RESULTS_DIR / "results.md", results, floor, head, meta)
    plotted = write_plot(RESULTS_DIR / "plot.png", results)
    log(f"wrote {RESULTS_DIR / 'results.md'}, {'plot.png, ' if plotted else ''}summary.json")
    print(json.dumps(head))
    return 0


if __name__ == "__main__":
    sys.exit(main())
