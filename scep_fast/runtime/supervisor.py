"""`scep-fast serve`: the supervisor of the worker processes.

The supervisor binds the listening socket once and starts N workers (fresh
interpreters, never forked, so LMDB and OpenSSL state is opened per
process) that accept on that shared socket. It restarts a worker that
dies, serves the summed Prometheus metrics of all of them, and on SIGTERM
or SIGINT asks every worker to drain: stop accepting, answer what was
accepted, exit.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from types import FrameType

from cryptography import x509

from scep_fast.runtime.config import Config
from scep_fast.runtime.pki import load_material

log = logging.getLogger("scep_fast.supervisor")

POLL_SECONDS = 0.05
BACKLOG = 2048
# A worker that dies this soon after its start is restarted after a growing pause.
QUICK_DEATH_SECONDS = 5.0
MAX_RESTART_DELAY_SECONDS = 10.0
STOP_GRACE_SECONDS = 40.0


def split_host_port(bind: str) -> tuple[str, int]:
    host, _, port = bind.rpartition(":")
    return host.strip("[]"), int(port)


def listen(bind: str) -> socket.socket:
    host, port = split_host_port(bind)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    sock.set_inheritable(True)
    return sock


@dataclass
class _Slot:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    quick_deaths: int = 0
    restart_at: float = 0.0
    restarts: int = field(default=0)


class Supervisor:
    def __init__(self, config: Config, sock: socket.socket, *, log_level: str) -> None:
        self._config = config
        self._sock = sock
        self._log_level = log_level
        self._slots = [_Slot(i) for i in range(config.workers)]
        self._stopping = False

    def _spawn(self, slot: _Slot) -> None:
        fd = self._sock.fileno()
        slot.process = subprocess.Popen(
            [sys.executable, "-m", "scep_fast.runtime.worker", "--dir", str(self._config.dir),
             "--fd", str(fd), "--log-level", self._log_level],
            pass_fds=(fd,),
        )
        slot.started_at = time.monotonic()
        log.info("worker started", extra={"fields": {"worker": slot.index,
                                                      "pid": slot.process.pid}})

    def _reap(self, slot: _Slot) -> None:
        from prometheus_client import multiprocess

        assert slot.process is not None  # noqa: S101 - only called for running slots
        code = slot.process.returncode
        multiprocess.mark_process_dead(slot.process.pid)  # type: ignore[no-untyped-call]
        lived = time.monotonic() - slot.started_at
        slot.quick_deaths = slot.quick_deaths + 1 if lived < QUICK_DEATH_SECONDS else 0
        delay = min(0.5 * (2 ** slot.quick_deaths) if slot.quick_deaths else 0.0,
                    MAX_RESTART_DELAY_SECONDS)
        slot.restart_at = time.monotonic() + delay
        slot.restarts += 1
        log.warning("worker died; restarting", extra={"fields": {
            "worker": slot.index, "pid": slot.process.pid, "exit_code": code,
            "restart_in_seconds": delay}})
        slot.process = None

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        from scep_fast.runtime import metrics

        metrics.WORKERS.set(len(self._slots))
        for slot in self._slots:
            self._spawn(slot)
        while not self._stopping:
            now = time.monotonic()
            for slot in self._slots:
                if slot.process is not None and slot.process.poll() is not None:
                    self._reap(slot)
                if slot.process is None and now >= slot.restart_at and not self._stopping:
                    self._spawn(slot)
            time.sleep(POLL_SECONDS)
        return self._stop()

    def _stop(self) -> int:
        from prometheus_client import multiprocess

        running = [s.process for s in self._slots if s.process is not None]
        log.info("stopping workers", extra={"fields": {"workers": len(running)}})
        for process in running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for process in running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker did not drain in time; killing",
                          extra={"fields": {"pid": process.pid}})
                process.kill()
                process.wait(timeout=10)
            multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
        self._sock.close()
        return 0


def _serve_metrics(bind: str) -> None:
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    host, port = split_host_port(bind)
    start_http_server(port, addr=host, registry=registry)


def _set_expiry_gauges(config: Config) -> None:
    from scep_fast.runtime import metrics

    material = load_material(config)
    for name, der in (("ca", material.ca_cert), ("ra", material.signer[0])):
        not_after = x509.load_der_x509_certificate(der).not_valid_after_utc
        metrics.CERT_EXPIRY.labels(name).set(not_after.timestamp())


def run(config: Config, *, metrics_bind: str, log_level: str) -> int:
    # Multi-process metrics: the directory must be set before
    # prometheus_client is first imported, here and in every worker, and
    # must start empty.
    metrics_dir = tempfile.mkdtemp(prefix="scep-fast-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        from scep_fast.runtime import metrics

        metrics.preinitialise()
        _set_expiry_gauges(config)
        sock = listen(str(config.get("server", "bind")))
        if metrics_bind:
            _serve_metrics(metrics_bind)
        log.info("serving", extra={"fields": {
            "bind": config.get("server", "bind"), "workers": config.workers,
            "metrics_bind": metrics_bind or "-"}})
        return Supervisor(config, sock, log_level=log_level).run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
