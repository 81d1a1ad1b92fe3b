"""Worker processes under load: a killed worker, SIGTERM drain, serial uniqueness."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from cryptography import x509

from scep_fast.client import enroll, parse_ca_certs
from scep_fast.runtime.supervisor import FIRST_BACKOFF_SECONDS, MAX_RESTART_DELAY_SECONDS
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


# ---- restarts, a dead supervisor ----------------------------------------------------


def one_worker_server(tmp_path: Path, name: str) -> Server:
    directory = init_dir(tmp_path / name)
    set_config(directory, "server", "workers", "1")
    return start_server(directory)


def log_entries(server: Server, msg: str) -> list[dict[str, object]]:
    entries = []
    for line in server.log().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a worker's traceback
        if isinstance(entry, dict) and entry.get("msg") == msg:
            entries.append(entry)
    return entries


def restart_delays(server: Server) -> list[float]:
    return [float(e["restart_in_seconds"])  # type: ignore[arg-type]
            for e in log_entries(server, "worker died; restarting")]


def seconds_until_answered(server: Server, timeout: float = 30) -> float:
    """How long until a GetCACaps is answered (a connection a dying worker cut is retried)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if server.request("GET", "/scep?operation=GetCACaps").status == 200:
                return time.monotonic() - start
        except (OSError, http.client.HTTPException):
            time.sleep(0.01)
    raise AssertionError(f"not answered within {timeout} s")


def test_a_killed_worker_is_back_at_once_even_when_it_was_young(tmp_path: Path) -> None:
    server = one_worker_server(tmp_path, "quick")
    try:
        seconds_until_answered(server)
        first = wait_for_workers(server, 1).pop()
        # Killed seconds after its start: a quick death, but the first in a row.
        os.kill(first, signal.SIGKILL)
        back_after = seconds_until_answered(server)
        second = wait_for_workers(server, 1, gone=first).pop()
        os.kill(second, signal.SIGKILL)
        back_again = seconds_until_answered(server)
        wait_for_workers(server, 1, gone=second)
        delays = restart_delays(server)
        assert delays[0] == 0.0
        assert delays[1] <= FIRST_BACKOFF_SECONDS
        # A worker takes about half a second to start; the old policy paused
        # a second before restarting a worker this young.
        assert back_after < 1.2
        # The second quick death in a row is the first to wait, briefly.
        assert back_again < FIRST_BACKOFF_SECONDS + 1.2
        assert server.process.poll() is None
    finally:
        server.stop()


def test_a_worker_that_cannot_start_is_restarted_with_growing_delays(tmp_path: Path) -> None:
    server = one_worker_server(tmp_path, "crashloop")
    ra_key = server.directory / "ra.key"
    good_key = ra_key.read_bytes()
    try:
        seconds_until_answered(server)
        # The supervisor checked the keys at its start; a worker started now
        # finds a key that no longer loads and exits at once, every time.
        ra_key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
        os.kill(wait_for_workers(server, 1).pop(), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while len(restart_delays(server)) < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        delays = restart_delays(server)
        assert len(delays) >= 5, delays
        assert server.process.poll() is None
        # Restarted at once after the kill (and after the first quick death in
        # a row, if the kill was not one), then twice as long each time.
        backing_off = [d for d in delays if d > 0]
        assert delays.index(backing_off[0]) <= 2
        assert backing_off[0] == FIRST_BACKOFF_SECONDS
        assert backing_off == [min(FIRST_BACKOFF_SECONDS * 2 ** i, MAX_RESTART_DELAY_SECONDS)
                               for i in range(len(backing_off))]
        deaths = log_entries(server, "worker died; restarting")
        assert all(death["exit_code"] == 1 for death in deaths[1:]), deaths
        metrics = urllib.request.urlopen(
            f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
        restarts = [line for line in metrics.splitlines()
                    if line.startswith("scep_worker_restarts_total ")]
        assert restarts and float(restarts[0].split()[1]) >= len(delays), restarts
        # Once the key loads again, the next restart serves.
        ra_key.write_bytes(good_key)
        seconds_until_answered(server, timeout=MAX_RESTART_DELAY_SECONDS + 20)
    finally:
        ra_key.write_bytes(good_key)
        server.stop()


def gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie nobody reaped yet counts: it holds nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_workers_of_a_killed_supervisor_drain_and_free_the_port(tmp_path: Path) -> None:
    server = two_worker_server(tmp_path, "orphans")
    workers = wait_for_workers(server, 2)
    try:
        assert seconds_until_answered(server) < 30
        ra = ra_of(server)
        # A request a worker has begun to receive when the supervisor dies.
        in_flight = Result(make_requests(ra, 1, CHALLENGE, prefix="orphan")[0])
        message = in_flight.request.message
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.putrequest("POST", "/scep?operation=PKIOperation")
        conn.putheader("Content-Length", str(len(message)))
        conn.endheaders(message[:100])
        time.sleep(0.2)
        server.process.kill()
        server.process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while (len(log_entries(server, "supervisor gone; draining")) < 2
               and time.monotonic() < deadline):
            time.sleep(0.05)
        # The worker stopped accepting but still answers what it accepted.
        conn.send(message[100:])
        response = conn.getresponse()
        in_flight.status, in_flight.body = response.status, response.read()
        conn.close()
        assert in_flight.certificate(ra) is not None
        while not all(gone(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(gone(pid) for pid in workers), "workers outlived their supervisor"
        assert len(log_entries(server, "supervisor gone; draining")) == 2
        assert port_is_free(server.port)
        again = start_server(server.directory, port=server.port)
        try:
            assert seconds_until_answered(again) < 30
        finally:
            again.stop()
    finally:
        for pid in workers:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


def metrics_dir_of(server: Server) -> Path:
    deadline = time.monotonic() + 30
    while not (serving := log_entries(server, "serving")) and time.monotonic() < deadline:
        time.sleep(0.05)
    return Path(str(serving[0]["metrics_dir"]))


def test_a_killed_supervisor_leaves_no_metrics_directory_behind(tmp_path: Path) -> None:
    killed = one_worker_server(tmp_path, "killed")
    workers = wait_for_workers(killed, 1)
    abandoned = metrics_dir_of(killed)
    assert abandoned.is_dir()
    killed.process.kill()
    killed.process.wait(timeout=10)
    assert abandoned.is_dir()
    # The next start, of any server, removes it, and no directory of a running one.
    running = one_worker_server(tmp_path, "running")
    other = one_worker_server(tmp_path, "other")
    try:
        assert metrics_dir_of(running).is_dir() and metrics_dir_of(other).is_dir()
        assert not abandoned.exists()
        # The two start side by side: whichever looked first removed it, and said so.
        removed = [entry["path"] for server in (running, other) for entry in
                   log_entries(server, "removed the metrics directory of a server that is gone")]
        assert removed.count(str(abandoned)) == 1
        other.stop()
        assert not metrics_dir_of(other).exists()
    finally:
        running.stop()
        other.stop()
        for pid in workers:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


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
