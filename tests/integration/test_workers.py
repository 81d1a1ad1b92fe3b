"""Worker processes under load: a killed worker, SIGTERM drain, serial uniqueness."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from cryptography import x509

from scep_fast.client import enroll, parse_ca_certs
from tests.integration.conftest import (
    CHALLENGE,
    Server,
    init_dir,
    scep_fast,
    set_config,
    start_server,
)
from tests.integration.load import Result, fire, make_requests


def worker_pids(server: Server) -> set[int]:
    done = subprocess.run(["pgrep", "-P", str(server.process.pid)], capture_output=True,
                          text=True, timeout=10)
    return {int(p) for p in done.stdout.split()}


def wait_for_workers(server: Server, count: int, timeout: float = 30,
                     gone: int | None = None) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = worker_pids(server)
        # A killed worker lingers as a zombie until the supervisor reaps it.
        if len(pids) == count and gone not in pids:
            return pids
        time.sleep(0.1)
    raise AssertionError(f"expected {count} workers, saw {worker_pids(server)}")


def ledger(directory: Path) -> list[dict[str, object]]:
    done = scep_fast("certs", "list", "--json", "--dir", str(directory))
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def two_worker_server(tmp_path: Path, name: str) -> Server:
    directory = init_dir(tmp_path / name)
    set_config(directory, "server", "workers", "2")
    return start_server(directory)


def ra_of(server: Server) -> x509.Certificate:
    response = server.request("GET", "/scep?operation=GetCACert")
    return parse_ca_certs(response.read_body, response.getheader("Content-Type")).ra  # type: ignore[attr-defined]


def check_ledger_matches_clients(server: Server, ra: x509.Certificate,
                                 results: list[Result]) -> tuple[int, list[Result]]:
    """Every certificate a client received is on record; serials are unique."""
    records = ledger(server.directory)
    serials = [r["serial"] for r in records]
    assert len(serials) == len(set(serials)), "duplicate serial in the ledger"
    on_record = {r["transaction_id"]: r["serial"] for r in records}
    received = 0
    unanswered = []
    for result in results:
        cert = result.certificate(ra)
        if cert is not None:
            received += 1
            assert on_record.get(result.request.transaction_id) == format(cert.serial_number, "x")
        else:
            unanswered.append(result)
    return received, unanswered


def test_killed_worker_is_restarted_and_loses_no_issued_certificate(tmp_path: Path) -> None:
    server = two_worker_server(tmp_path, "kill")
    try:
        ra = ra_of(server)
        before = wait_for_workers(server, 2)
        requests = make_requests(ra, 240, CHALLENGE, prefix="kill")
        results: list[Result] = []
        firing = threading.Thread(
            target=lambda: results.extend(fire(server.port, requests, concurrency=16)))
        firing.start()
        time.sleep(0.4)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        firing.join(timeout=120)
        assert not firing.is_alive()
        after = wait_for_workers(server, 2, gone=victim)
        assert victim not in after and len(after - before) == 1
        received, unanswered = check_ledger_matches_clients(server, ra, results)
        assert received > 0
        # Whatever was cut off by the kill succeeds when the client sends it again:
        # the same certificate if it had been recorded, a new one otherwise.
        retried = fire(server.port, [r.request for r in unanswered], concurrency=4)
        assert all(r.certificate(ra) is not None for r in retried)
        received_again, _ = check_ledger_matches_clients(server, ra, results + retried)
        assert received_again == len(results) + len(retried) - len(unanswered)
        assert "worker died; restarting" in server.log()
    finally:
        server.stop()


def test_sigterm_under_load_drops_no_accepted_request(tmp_path: Path) -> None:
    server = two_worker_server(tmp_path, "drain")
    ra = ra_of(server)
    requests = make_requests(ra, 200, CHALLENGE, prefix="drain")
    results: list[Result] = []
    firing = threading.Thread(
        target=lambda: results.extend(fire(server.port, requests, concurrency=16,
                                           max_seconds=30)))
    firing.start()
    time.sleep(0.5)
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0
    firing.join(timeout=90)
    received, unanswered = check_ledger_matches_clients(server, ra, results)
    assert received > 0
    # A request the server accepted was answered: nothing on record went unanswered.
    on_record = {r["transaction_id"] for r in ledger(server.directory)}
    assert not {r.request.transaction_id for r in unanswered} & on_record
    assert all(r.status in (None, 200) for r in results), {r.status for r in results}
    assert "did not drain" not in server.log()


def connections_per_worker(server: Server) -> dict[int, int]:
    """Established connections on the SCEP port held by each worker (from /proc)."""
    established: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == server.port and fields[3] == "01":
                    established.add(fields[9])  # the socket's inode
    counts: dict[int, int] = {}
    for pid in worker_pids(server):
        fd_dir = Path(f"/proc/{pid}/fd")
        inodes = {os.readlink(fd_dir / fd)[8:-1] for fd in os.listdir(fd_dir)
                  if os.readlink(fd_dir / fd).startswith("socket:[")}
        counts[pid] = len(inodes & established)
    return counts


def test_a_burst_of_connections_is_spread_over_the_workers(tmp_path: Path) -> None:
    server = two_worker_server(tmp_path, "spread")
    connections = []
    try:
        wait_for_workers(server, 2)
        for _ in range(32):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            conn.connect()
            connections.append(conn)
        for conn in connections:  # every connection accepted and answered, kept open
            conn.request("GET", "/scep?operation=GetCACaps")
            assert conn.getresponse().read()
        counts = connections_per_worker(server)
        assert sum(counts.values()) == 32
        # One socket per worker: the kernel spreads connections by their
        # addresses, so a worker with fewer than 4 of 32 is a one-in-a-million chance.
        assert len(counts) == 2 and min(counts.values()) >= 4, counts
    finally:
        for conn in connections:
            conn.close()
        server.stop()


def test_a_second_server_on_the_same_port_is_refused(tmp_path: Path) -> None:
    server = two_worker_server(tmp_path, "first")
    try:
        other = init_dir(tmp_path / "second")
        done = scep_fast("serve", "--dir", str(other), "--bind", f"127.0.0.1:{server.port}",
                         "--metrics-bind", "", "--admin-bind", "", timeout=60)
        assert done.returncode != 0
        assert "server.bind" in done.stderr and "in use" in done.stderr
        assert "Traceback" not in done.stderr
    finally:
        server.stop()


def test_workers_run_the_installed_package_whatever_the_working_directory(
        tmp_path: Path) -> None:
    # A folder named scep_fast where the operator happens to start serve must
    # not be imported by the workers: it could be anyone's code.
    decoy = tmp_path / "cwd"
    marker = tmp_path / "decoy-imported"
    for package in ("scep_fast", "scep_fast/runtime"):
        (decoy / package).mkdir(parents=True)
        (decoy / package / "__init__.py").write_text(
            f"open({str(marker)!r}, 'w').close()\nraise SystemExit('decoy imported')\n")
    (decoy / "scep_fast" / "runtime" / "worker.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n")
    directory = init_dir(tmp_path / "scep")
    set_config(directory, "server", "workers", "2")
    server = start_server(directory, cwd=decoy)
    try:
        wait_for_workers(server, 2)
        result = enroll(server.url, CHALLENGE, "decoy-proof").raise_for_status()
        assert result.cert is not None
        time.sleep(0.5)  # a worker that imported the decoy would have died by now
        assert len(worker_pids(server)) == 2
    finally:
        server.stop()
    assert not marker.exists()


def listen_backlogs(port: int) -> list[int]:
    """The backlog of each socket listening on ``port``: ``ss`` shows it as Send-Q."""
    done = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True,
                          timeout=10, check=True)
    return [int(line.split()[2]) for line in done.stdout.splitlines()]


def test_every_listening_socket_has_the_configured_backlog(tmp_path: Path) -> None:
    with open("/proc/sys/net/core/somaxconn") as f:
        somaxconn = int(f.read())
    backlog = min(1234, somaxconn)  # the kernel caps it silently
    directory = init_dir(tmp_path / "backlog")
    set_config(directory, "server", "workers", "2")
    set_config(directory, "server", "listen_backlog", str(backlog))
    server = start_server(directory)
    try:
        wait_for_workers(server, 2)
        # A worker's listen() precedes its first answer; fresh connections
        # reach both workers (SO_REUSEPORT), so each has called it.
        for _ in range(20):
            assert server.request("GET", "/scep?operation=GetCACaps").status == 200
        assert listen_backlogs(server.port) == [backlog, backlog]
        assert listen_backlogs(server.metrics_port) == [backlog]
        assert listen_backlogs(server.admin_port) == [backlog]
    finally:
        server.stop()
