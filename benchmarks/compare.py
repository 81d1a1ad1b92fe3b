"""scep-fast against micromdm's scepserver, side by side, with OpenSSL as the floor.

    python benchmarks/compare.py            # every scenario (about 15 minutes)
    python benchmarks/compare.py --quick    # a small subset (1 to 2 minutes)
    python benchmarks/compare.py --concurrency 64 --methods post --ca-keys rsa2048 \\
        --ledgers empty,1m --no-micromdm

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
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

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


@dataclass(frozen=True)
class Scenario:
    server: str  # "scep-fast" or "micromdm"
    ca_key: str  # rsa2048, rsa4096, p256
    method: str  # post or get
    concurrency: int
    ledger: str = "empty"  # or "1m"
    # 0: the main grid; 1..N: the empty-against-1m pairs, run alternately.
    pair: int = 0

    @property
    def name(self) -> str:
        return (f"{self.server}-{self.ca_key}-{self.method}-c{self.concurrency}"
                f"-{self.ledger}" + (f"-pair{self.pair}" if self.pair else ""))


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


def scep_fast_init(path: Path, ca_key: str) -> None:
    subprocess.run([str(SCEP_FAST), "init", "--dir", str(path), "--challenge", CHALLENGE,
                    "--ca-key", ca_key], check=True, capture_output=True)


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


class ScepFastServer:
    def __init__(self, scenario: Scenario, workers: int | None, run_dir: Path,
                 cpus: Sequence[int] | None = None) -> None:
        self.dir = run_dir / "server"
        template = scep_fast_template(scenario.ca_key)
        scep_fast_init(self.dir, scenario.ca_key)
        for name in KEY_FILES:
            shutil.copyfile(template / name, self.dir / name)
        _private_ports(self.dir / "scep-fast.toml")
        if scenario.ledger == "1m":
            source = preloaded_ledger()
            (self.dir / "ledger").mkdir(mode=0o700)
            shutil.copyfile(source / "data.mdb", self.dir / "ledger" / "data.mdb")
        # Flush the copies now: otherwise the server's first ledger sync writes
        # back 1.4 GB of someone else's dirty pages, on its own CPU time.
        os.sync()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/scep"
        command = [str(SCEP_FAST), "serve", "--dir", str(self.dir),
                   "--bind", f"127.0.0.1:{self.port}"]
        if workers is not None:
            command += ["--workers", str(workers)]
        if cpus:  # taskset execs the server: the pid stays the server's
            command = ["taskset", "-c", ",".join(str(cpu) for cpu in cpus), *command]
        if _serve_has_metrics():
            # Metrics stay on, as in production, on a port of their own.
            command += ["--metrics-bind", f"127.0.0.1:{free_port()}"]
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{scenario.name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=run_dir)
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


# -------------------------------------------------------------------- runs


def run_scenario(scenario: Scenario, args: argparse.Namespace, netns: str | None) -> dict[str, Any]:
    count = args.micromdm_count if scenario.server == "micromdm" else args.count
    with tempfile.TemporaryDirectory(prefix="scep-bench-") as tmp:
        run_dir = Path(tmp)
        server: ScepFastServer | MicromdmServer
        if scenario.server == "micromdm":
            assert netns is not None
            server = MicromdmServer(netns, run_dir)
        else:
            server = ScepFastServer(scenario, args.workers, run_dir)
        try:
            out = run_dir / "run.json"
            command = [sys.executable, str(BENCH_DIR / "loadgen.py"), "run", server.url,
                       "--challenge", CHALLENGE, "--count", str(count),
                       "--concurrency", str(scenario.concurrency), "--method", scenario.method,
                       "--duration", str(args.duration), "--timeout", str(args.timeout),
                       "--server-pid", str(server.proc.pid), "--verify", args.verify,
                       "--label", scenario.name, "--json-out", str(out), "--quiet"]
            if server.netns is not None:
                command = ["ip", "netns", "exec", server.netns, *command]
            limit = args.duration + args.timeout + 300
            done = subprocess.run(command, capture_output=True, text=True, timeout=limit,
                                  cwd=ROOT)
            if done.returncode != 0 or not out.exists():
                raise RuntimeError(f"the load generator failed ({done.returncode}): "
                                   f"{done.stderr[-2000:]}")
            result: dict[str, Any] = json.loads(out.read_text())
            if server.proc.poll() is not None:
                result["errors"]["server exited"] = server.proc.returncode
            if isinstance(server, ScepFastServer):
                result["server_workers"] = server.workers
        finally:
            server.stop()
    result["scenario"] = asdict(scenario)
    return result


def plan(args: argparse.Namespace) -> list[Scenario]:
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
    return out


def prepare_requests(scenarios: list[Scenario], args: argparse.Namespace) -> None:
    """Builds (or finds in the cache) every request the runs will send, before any run."""
    needs: dict[tuple[str, str], int] = {}
    for s in scenarios:
        count = args.micromdm_count if s.server == "micromdm" else args.count
        ca = "rsa2048" if s.server == "micromdm" else s.ca_key
        needs[(s.server, ca)] = max(needs.get((s.server, ca), 0), count)
    for (server, ca), count in needs.items():
        loadgen.prepare(ra_certificate(server, ca), count, loadgen.Params(challenge=CHALLENGE))


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
    base = dict(ca_key="rsa2048", method="post", ledger="empty", pair=0)
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
    out["checks"] = checks
    return out


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
            f"| {s['server']} | {s['ca_key']} | {s['method'].upper()} | {s['ledger']}"
            + (f" (pair {s['pair']})" if s["pair"] else "") + " "
            f"| {s['concurrency']} | {_num(r['enroll_per_s'])} | {_num(lat['p50'], 1)} "
            f"| {_num(lat['p90'], 1)} | {_num(lat['p99'], 1)} | {_num(cpu, 2)} "
            f"| {_num(cpu / fl if cpu and fl else None, 2)} | {r['failures']} "
            f"| {r['duplicate_serials']} |")
    errors = [(r["scenario"], r["errors"]) for r in results if r["errors"]]
    if errors:
        lines += ["", "Errors by kind:", ""]
        for s, errs in errors:
            text = ", ".join(f"{k}: {v}" for k, v in sorted(errs.items()))
            lines.append(f"- {Scenario(**s).name}: {text}")
    lines += ["", "Headline (concurrency {c}, RSA-2048 CA, POST, empty ledger):".format(
        c=head["concurrency"]), "", "```json", json.dumps(head, indent=2), "```", "",
        "![throughput and p99 against concurrency](plot.png)", "",
        "Command: `" + meta["command"] + "`", ""]
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
        if s["ca_key"] != "rsa2048" or s["ledger"] != "empty" or s["pair"]:
            continue
        key = f"{s['server']} {s['method'].upper()}"
        series.setdefault(key, []).append(
            (s["concurrency"], r["enroll_per_s"], r["latency_ms"]["p99"]))
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
    parser.add_argument("--ledgers", type=_list, help="empty,1m")
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
                          ("ledgers", {"empty", "1m"})):
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
    prepare_requests(scenarios, args)
    if any(s.ledger == "1m" for s in scenarios):
        preloaded_ledger()

    results: list[dict[str, Any]] = []
    namespace = network_namespace() if any(s.server == "micromdm" for s in scenarios) \
        else contextlib.nullcontext(None)
    with namespace as netns:
        for scenario in scenarios:
            log(f"run {scenario.name} ...")
            try:
                result = run_scenario(scenario, args, netns)
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

    head = headline(results, floor)
    workers = sorted({r["server_workers"] for r in results if r.get("server_workers")})
    meta = {
        "cpus": os.cpu_count(),
        "workers": ",".join(map(str, workers)) if workers else "default",
        "verify": args.verify,
        "speed_seconds": args.speed_seconds,
        "command": "python benchmarks/compare.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    summary = {"headline": head, "floor": floor, "meta": meta, "runs": results,
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (RESULTS_DIR / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_markdown(RESULTS_DIR / "results.md", results, floor, head, meta)
    write_plot(RESULTS_DIR / "plot.png", results)
    log(f"wrote {RESULTS_DIR / 'results.md'}, plot.png and summary.json")
    print(json.dumps(head))
    return 0


if __name__ == "__main__":
    sys.exit(main())
