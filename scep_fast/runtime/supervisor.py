"""`scep-fast serve`: the supervisor of the worker processes.

The supervisor binds one listening socket per worker on the same address
(SO_REUSEPORT: the kernel spreads new connections evenly across them, where
one shared socket let whichever worker woke first take a whole burst of
connections) and starts N workers (fresh interpreters, never forked, so
LMDB and OpenSSL state is opened per process), each accepting on its own.
It keeps every socket open, so connections that arrive for a worker that
died wait in its backlog for the replacement it starts. It restarts a worker that
dies (at once, unless it keeps dying as it starts: see RestartBackoff), serves
the summed Prometheus metrics of all of them, and on SIGTERM or SIGINT asks
every worker to drain: stop accepting, answer what was accepted, exit. A
worker drains by itself when the supervisor is gone, however it died.

SIGHUP reloads: the workers are replaced one at a time (a new one starts,
the old one drains), so that keys changed by `scep-fast ca activate` or a
next CA made by `scep-fast ca rollover` are picked up without a moment in
which nobody accepts. The supervisor also keeps the CRLs fresh: it writes
any that is missing at start and rewrites each before its nextUpdate.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from types import FrameType
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from cryptography import x509

from scep_fast import __version__
from scep_fast.runtime.config import Config, ConfigError, notice_sinks
from scep_fast.runtime.config import load as load_config
from scep_fast.runtime.http1 import StrictHttp1Handler
from scep_fast.runtime.ndes import BasicCredential, NdesCredentialsError, load_credentials
from scep_fast.runtime.pki import Material, load_material, uses_token
from scep_fast.service.ledger import LedgerUnavailable

if TYPE_CHECKING:
    from scep_fast.runtime.server import OpenLedger

log = logging.getLogger("scep_fast.supervisor")

POLL_SECONDS = 0.05
# A worker that dies this soon after its start died "quickly" (see RestartBackoff).
QUICK_DEATH_SECONDS = 5.0
FIRST_BACKOFF_SECONDS = 0.5
MAX_RESTART_DELAY_SECONDS = 10.0
STOP_GRACE_SECONDS = 40.0
# How often the supervisor checks whether a CRL needs rewriting.
# How often the supervisor looks for a CRL to rewrite (a cheap check).
CRL_CHECK_SECONDS = 2.0
# After a failed CRL signing with a token key (the token is away), the pause
# before the next child process tries.
TOKEN_CRL_RETRY_SECONDS = 15.0
# During a reload, a fresh worker runs this long before the next one is replaced.
RELOAD_SETTLE_SECONDS = 1.0


def split_host_port(bind: str) -> tuple[str, int]:
    host, _, port = bind.rpartition(":")
    return host.strip("[]"), int(port)


def listen(bind: str, count: int, backlog: int) -> list[socket.socket]:
    """``count`` listening sockets on ``bind``, one per worker, each with ``backlog``."""
    host, port = split_host_port(bind)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # SO_REUSEPORT would let this server share a port with another one
    # started by mistake; a plain bind first fails if anyone listens there.
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ConfigError(f"server.bind {bind}: {e.strerror}") from None
        port = probe.getsockname()[1]  # port 0: the one the kernel chose
    sockets: list[socket.socket] = []
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.set_inheritable(True)
        sockets.append(sock)
    return sockets


@dataclass
class RestartBackoff:
    """How long a dead worker waits for its restart.

    A death is restarted at once: a worker killed by the OOM killer or an
    operator, or crashed by a rare bug, is back in the time a worker takes
    to start, and connections wait for it in its socket's backlog. The
    first quick death in a row is restarted at once too: the worker may
    have been young only because an unrelated death had just replaced it.
    Only a worker that dies quickly again and again (it cannot start: say,
    a key file that no longer loads) waits, FIRST_BACKOFF_SECONDS and then
    twice as long each time up to MAX_RESTART_DELAY_SECONDS, so that it
    neither spins a CPU nor floods the log. A worker that lived
    QUICK_DEATH_SECONDS or longer resets the count.
    """

    quick_deaths: int = 0

    def delay_after(self, lived_seconds: float) -> float:
        if lived_seconds >= QUICK_DEATH_SECONDS:
            self.quick_deaths = 0
            return 0.0
        self.quick_deaths += 1
        if self.quick_deaths == 1:
            return 0.0
        return min(FIRST_BACKOFF_SECONDS * 2.0 ** (self.quick_deaths - 2),
                   MAX_RESTART_DELAY_SECONDS)


@dataclass
class _Slot:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    backoff: RestartBackoff = field(default_factory=RestartBackoff)
    restart_at: float = 0.0
    restarts: int = 0


class Supervisor:
    def __init__(self, config: Config, sockets: list[socket.socket], *, log_level: str,
                 ledger: Any = None) -> None:
        self._config = config
        self._sockets = sockets
        self._log_level = log_level
        self._slots = [_Slot(i) for i in range(len(sockets))]
        self._stopping = False
        self._reload_requested = False
        # Slots still to be replaced by the current reload, and old workers draining.
        self._reload_queue: list[int] = []
        self._draining: list[subprocess.Popen[bytes]] = []
        # The supervisor's ledger handle (one per process), for the CRLs.
        self._ledger: Any = ledger
        self._own_ledger: Any = None
        self._revoked_seen: int | None = None
        self._token_crl_retry_at = 0.0
        self._material: Material | None = None
        self._crl_check_at = 0.0
        # Every worker inherits the read end of this pipe; only the supervisor
        # holds the write end and never writes to it. When the supervisor is
        # gone, however it died (SIGKILL included), the kernel closes the
        # write end, the workers see end of file, drain and exit, and the
        # port is free again. Unlike prctl(PR_SET_PDEATHSIG), the pipe works
        # on any POSIX system, cannot fire because a thread exits, and lets a
        # worker finish what it accepted; and its end of file stays there for
        # a worker that was still starting.
        self._alive_read, self._alive_write = os.pipe()

    def _spawn(self, slot: _Slot) -> None:
        fd = self._sockets[slot.index].fileno()
        # -P: the worker imports the installed package, never a scep_fast
        # folder that happens to lie in the working directory.
        slot.process = subprocess.Popen(
            [sys.executable, "-P", "-m", "scep_fast.runtime.worker",
             "--dir", str(self._config.dir), "--fd", str(fd),
             "--supervisor-fd", str(self._alive_read), "--log-level", self._log_level],
            pass_fds=(fd, self._alive_read),
        )
        slot.started_at = time.monotonic()
        log.info("worker started", extra={"fields": {"worker": slot.index,
                                                      "pid": slot.process.pid}})

    def _reap(self, slot: _Slot) -> None:
        from prometheus_client import multiprocess

        from scep_fast.runtime import metrics

        assert slot.process is not None  # noqa: S101 - only called for running slots
        code = slot.process.returncode
        multiprocess.mark_process_dead(slot.process.pid)  # type: ignore[no-untyped-call]
        lived = time.monotonic() - slot.started_at
        delay = slot.backoff.delay_after(lived)
        slot.restart_at = time.monotonic() + delay
        slot.restarts += 1
        metrics.WORKER_RESTARTS.inc()
        log.warning("worker died; restarting", extra={"fields": {
            "worker": slot.index, "pid": slot.process.pid, "exit_code": code,
            "lived_seconds": round(lived, 3), "quick_deaths": slot.backoff.quick_deaths,
            "restart_in_seconds": delay}})
        slot.process = None

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._stopping = True

    def _on_hup(self, signum: int, _frame: FrameType | None) -> None:
        self._reload_requested = True

    def _refresh_crls(self) -> None:
        """Writes every CRL that is missing, close to its nextUpdate, or behind a revocation.

        Revocations come from `certs revoke` (which writes the CRL itself) and
        from workers revoking a certificate a renewal replaced; the count of
        revoked certificates, cheap to read, tells when there is a new one.
        """
        from scep_fast.runtime.crl import refresh_all, refresh_due
        from scep_fast.runtime.server import open_ledger

        try:
            if self._ledger is None:
                self._ledger = self._own_ledger = open_ledger(self._config)
            revoked = self._ledger.count_revoked()
            force = self._revoked_seen is not None and revoked != self._revoked_seen
            if self._material is None:
                # Loaded again after a reload: `ca activate` changes the CAs.
                self._material = load_material(self._config, next_message=False)
            if uses_token(self._config):
                # A revocation counts as seen only once its CRL is written.
                if (force or refresh_due(self._config, self._material)) and (
                        time.monotonic() < self._token_crl_retry_at
                        or not self._refresh_crls_in_child()):
                    return
            else:
                refresh_all(self._config, self._ledger, self._material, force=force)
            self._revoked_seen = revoked
        except LedgerUnavailable as e:
            # The database is out of reach: no bug, the next check tries again.
            log.warning("CRL refresh failed", extra={"fields": {"reason": str(e)}})
        except Exception:  # noqa: BLE001 - logged; the next check tries again
            log.exception("CRL refresh failed")

    def _refresh_crls_in_child(self) -> bool:
        """CRLs signed by a token key, in a process of their own (`scep-fast crl`).

        The supervisor never opens a PKCS#11 session: one that outlived its
        token would stay broken for the life of the process (see
        ``keys.TokenKeySource``), while a short-lived child opens a new one
        each time. A failure is logged and tried again after a pause.
        """
        done = subprocess.run(
            [sys.executable, "-m", "scep_fast.runtime.cli", "crl", "--dir", str(self._config.dir)],
            capture_output=True, text=True, timeout=120)
        if done.returncode == 0:
            for path in done.stdout.split():
                log.info("CRL written", extra={"fields": {"path": path}})
            return True
        self._token_crl_retry_at = time.monotonic() + TOKEN_CRL_RETRY_SECONDS
        log.warning("CRL signing with the token failed; trying again later",
                    extra={"fields": {"reason": done.stderr.strip()[-500:],
                                      "retry_seconds": TOKEN_CRL_RETRY_SECONDS}})
        return False

    def _tick_reload(self) -> None:
        from prometheus_client import multiprocess

        if self._reload_requested:
            self._reload_requested = False
            try:
                # `ca activate` may have named other keys in [pki] (keys in a
                # token); the rest of the config keeps what serve was started with.
                fresh = load_config(self._config.dir)
                config = Config(dir=self._config.dir,
                                values={**self._config.values, "pki": fresh.values["pki"]})
                # Never replace working workers with ones that cannot load their keys.
                load_material(config, next_message=False)
                _set_expiry_gauges(config)
            except Exception:  # noqa: BLE001 - the running workers stay
                log.exception("reload refused: the CA material does not load")
                return
            self._config = config
            self._material = None
            log.info("reloading workers", extra={"fields": {"workers": len(self._slots)}})
            self._reload_queue = [slot.index for slot in self._slots]
            self._refresh_crls()
        still: list[subprocess.Popen[bytes]] = []
        for process in self._draining:
            if process.poll() is None:
                still.append(process)
            else:
                multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
        self._draining = still
        if not self._reload_queue or self._draining:
            return
        now = time.monotonic()
        if any(s.process is not None and now - s.started_at < RELOAD_SETTLE_SECONDS
               for s in self._slots):
            return
        slot = self._slots[self._reload_queue.pop(0)]
        if slot.process is None:
            # Dead and waiting for its restart, which loads the new material anyway.
            return
        old = slot.process
        slot.process = None
        self._spawn(slot)
        if old.poll() is None:
            old.send_signal(signal.SIGTERM)
        self._draining.append(old)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hup)
        from scep_fast.runtime import metrics

        metrics.WORKERS.set(len(self._slots))
        self._refresh_crls()
        self._crl_check_at = time.monotonic() + CRL_CHECK_SECONDS
        for slot in self._slots:
            self._spawn(slot)
        while not self._stopping:
            now = time.monotonic()
            if now >= self._crl_check_at:
                self._refresh_crls()
                self._crl_check_at = time.monotonic() + CRL_CHECK_SECONDS
            self._tick_reload()
            for slot in self._slots:
                if slot.process is not None and slot.process.poll() is not None:
                    self._reap(slot)
                if slot.process is None and now >= slot.restart_at and not self._stopping:
                    self._spawn(slot)
            time.sleep(POLL_SECONDS)
        return self._stop()

    def _stop(self) -> int:
        from prometheus_client import multiprocess

        running = [s.process for s in self._slots if s.process is not None] + self._draining
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
        for sock in self._sockets:
            sock.close()
        os.close(self._alive_write)
        os.close(self._alive_read)
        if self._own_ledger is not None:
            self._own_ledger.close()
        return 0


class _MetricsHandler(StrictHttp1Handler, WSGIRequestHandler):
    """The metrics endpoint's requests: HTTP/1 only, and no line on stderr for each."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        return


class _MetricsServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def _serve_metrics(bind: str, backlog: int) -> None:
    """prometheus_client's ``start_http_server``, with our backlog and HTTP/1 rule."""
    from prometheus_client import CollectorRegistry, make_wsgi_app, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    host, port = split_host_port(bind)

    class MetricsServer(_MetricsServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        request_queue_size = backlog

    server = MetricsServer((host, port), _MetricsHandler)
    server.set_app(make_wsgi_app(registry))
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()


def _set_expiry_gauges(config: Config) -> None:
    from scep_fast.runtime import metrics

    material = load_material(config, next_message=False)
    certificates = [("ca", material.ca_cert), ("ra", material.signer[0])]
    if material.ra_encryption is not None:
        # The encryption RA of an NDES-style pair expires on its own; labelled
        # only where it exists, so that no server shows a zero to alert on.
        certificates.append(("ra_encryption", material.ra_encryption[0]))
    for name, der in certificates:
        not_after = x509.load_der_x509_certificate(der).not_valid_after_utc
        metrics.CERT_EXPIRY.labels(name).set(not_after.timestamp())


# The multi-process metrics directory of a running supervisor is
# TMPDIR/scep-fast-metrics-<pid>-<random>, and its owner holds an exclusive
# flock on the OWNER_LOCK file inside it for as long as it runs. A supervisor
# that was killed (SIGKILL, OOM) could not remove its directory, but the
# kernel released its lock: every start removes the directories whose lock it
# can take. A lock, unlike a check that the PID is alive, cannot be fooled by
# a PID the system has given to another process since. Not a fixed place in
# the data directory: two servers may share one data directory (on different
# addresses), so wiping "the" metrics directory at start could wipe a running
# server's samples, and the metrics files, rewritten all the time, stay off the
# disk the ledger syncs to and that may fill up.
METRICS_DIR_PREFIX = "scep-fast-metrics-"
OWNER_LOCK = "owner.lock"


def remove_abandoned_metrics_dirs(parent: str) -> list[str]:
    """Removes this user's metrics directories whose owner is gone; returns their paths."""
    removed = []
    for entry in os.scandir(parent):
        if not entry.name.startswith(METRICS_DIR_PREFIX):
            continue
        try:
            if (not entry.is_dir(follow_symlinks=False)
                    or entry.stat(follow_symlinks=False).st_uid != os.getuid()):
                continue
            # A directory without a lock file is being created (or is not
            # ours to judge): left alone.
            fd = os.open(os.path.join(entry.path, OWNER_LOCK), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its owner runs
        finally:
            os.close(fd)
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    return removed


def claim_metrics_dir() -> tuple[str, int]:
    """A fresh, empty metrics directory and the descriptor whose lock marks it as ours."""
    path = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")
    fd = os.open(os.path.join(path, OWNER_LOCK), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return path, fd


def run(config: Config, *, metrics_bind: str, log_level: str) -> int:
    # Multi-process metrics: the directory must be set before
    # prometheus_client is first imported, here and in every worker, and
    # must start empty.
    for path in remove_abandoned_metrics_dirs(tempfile.gettempdir()):
        log.info("removed the metrics directory of a server that is gone",
                 extra={"fields": {"path": path}})
    metrics_dir, lock_fd = claim_metrics_dir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        from scep_fast.runtime import metrics

        metrics.preinitialise()
        _set_expiry_gauges(config)
        # Before any address is taken: a bad credentials file stops the start.
        ndes_credentials = _ndes_credentials(config)
        from scep_fast.runtime import integrations

        integrations.check(config)
        metrics.preinitialise_integrations(
            [name for name, on in (("webhook", config.get("validation.webhook", "url")),
                                   ("intune", config.get("validation.intune", "enabled"))) if on],
            notice_sinks(config))
        backlog = int(config.get("server", "listen_backlog"))
        sockets = listen(str(config.get("server", "bind")), config.workers, backlog)
        # Said once the address is ours, not before.
        print(f"scep-fast {__version__} serving http://{config.get('server', 'bind')}/scep "
              f"with {config.workers} worker(s)", file=sys.stderr, flush=True)
        if metrics_bind:
            _serve_metrics(metrics_bind, backlog)
        # Imported only now: it declares the metrics, which must see the
        # multi-process directory.
        from scep_fast.runtime.server import open_ledger

        # The supervisor's own ledger handle (one per process), for the admin API.
        ledger = open_ledger(config)
        admin_bind = str(config.get("admin", "bind"))
        if admin_bind:
            _serve_admin(config, ledger, admin_bind, ndes_credentials)
        log.info("serving", extra={"fields": {
            "bind": config.get("server", "bind"), "workers": config.workers,
            "metrics_bind": metrics_bind or "-", "admin_bind": admin_bind or "-",
            "metrics_dir": metrics_dir}})
        try:
            return Supervisor(config, sockets, log_level=log_level, ledger=ledger).run()
        finally:
            ledger.close()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        os.close(lock_fd)


def _ndes_credentials(config: Config) -> tuple[BasicCredential, ...] | None:
    """The NDES page's credentials when it is enabled; ConfigError when it cannot be served."""
    if not config.get("ndes", "enabled"):
        return None
    if config.get("ndes", "bind") == "admin":
        if not config.get("admin", "bind"):
            raise ConfigError('ndes.bind = "admin": the admin API is off (admin.bind is empty)')
        if not config.path("admin", "token_file").exists():
            raise ConfigError('ndes.bind = "admin": the admin API is off (no admin token file)')
    try:
        credentials = load_credentials(config.path("ndes", "credentials_file"))
    except NdesCredentialsError as e:
        raise ConfigError(f"ndes.credentials_file: {e}") from None
    log.info("NDES challenge page", extra={"fields": {
        "path": "/certsrv/mscep_admin/", "address": config.get("ndes", "bind"),
        "profile": config.get("ndes", "profile"),
        "challenge_ttl_seconds": config.get("ndes", "challenge_ttl_seconds"),
        "credentials": len(credentials)}})
    return credentials


def _serve_admin(config: Config, ledger: OpenLedger, bind: str,
                 ndes_credentials: tuple[BasicCredential, ...] | None) -> None:
    from scep_fast.runtime.admin import AdminApi, serve_admin
    from scep_fast.runtime.server import build_service, ndes_page

    token_path = config.path("admin", "token_file")
    try:
        token = token_path.read_bytes().strip()
    except FileNotFoundError:
        log.warning("admin API off: no token file", extra={"fields": {"path": str(token_path)}})
        return
    profiles = list(config.values["profiles"])
    ndes = None
    if ndes_credentials is not None and config.get("ndes", "bind") == "admin":
        ndes = ndes_page(config, ledger, ndes_credentials)
    # Built per decision; with keys in a token, approvals happen in a child
    # process and a rejection needs no key, so the token stays closed here.
    api = AdminApi(ledger,
                   lambda: build_service(config, load_material(config, next_message=False),
                                         ledger, open_keys_now=False),
                   profiles, token,
                   approve_in=config.dir if uses_token(config) else None, ndes=ndes)
    host, port = split_host_port(bind)
    serve_admin(api, host, port, backlog=int(config.get("server", "listen_backlog")))
