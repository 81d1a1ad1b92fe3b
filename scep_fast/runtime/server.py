"""`scep-fast serve`: one worker's wiring, run by hypercorn on trio.

The worker loads its keys into a native context once, opens its own ledger
handle, starts the batcher, and serves the ASGI app until SIGINT or SIGTERM,
or until its supervisor is gone; then it stops accepting, lets the batcher
finish what is queued and exits.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import trio
from hypercorn.config import Config as HypercornConfig

from scep_fast.crypto import NativeKey, ScepContext, certs_only
from scep_fast.protocol import Capabilities, Overloaded
from scep_fast.runtime import integrations, metrics
from scep_fast.runtime.app import CT_CA_CERT, CT_CA_RA_CERT, CaCertificates, ScepApp
from scep_fast.runtime.batcher import Batcher, BatchStats, Pipeline
from scep_fast.runtime.config import Config, ConfigError, notice_sinks, validation_configured
from scep_fast.runtime.crl import CrlStore, crl_url
from scep_fast.runtime.fast_refusal import FastRefusal
from scep_fast.runtime.http_server import serve as serve_http
from scep_fast.runtime.integrations import Integrations
from scep_fast.runtime.keys import TokenKey, TokenKeySource, open_key
from scep_fast.runtime.ledger_lmdb import LmdbLedger
from scep_fast.runtime.ndes import (
    BasicCredential,
    NdesChallengePage,
    NdesCredentialsError,
    load_credentials,
)
from scep_fast.runtime.outbox import OutboxDelivery
from scep_fast.runtime.pki import Material, load_material
from scep_fast.runtime.validation_stage import ValidationStage
from scep_fast.service.enrollment import Answer, EnrollmentService, Policy, PreparedBatch
from scep_fast.service.ledger import LedgerFull

if TYPE_CHECKING:
    from scep_fast.runtime.ledger_pg import PgLedger

LEDGER_DIR = "ledger"
# A process's own handle on the ledger: the embedded LMDB one, or a
# PostgreSQL database shared by several nodes (``ledger.url``).
OpenLedger: TypeAlias = "LmdbLedger | PgLedger"
# How long a stopping worker may take to finish the requests it accepted.
GRACEFUL_SECONDS = 30.0
# hypercorn and trio allocate hundreds of short-lived objects per request, so
# CPython's default first-generation threshold (700) runs a collection every
# request or two and a full one every few hundred. Collected this rarely, the
# cycles they leave still cost only kilobytes.
GC_THRESHOLDS = (20_000, 50, 50)
# A worker's threads (the trio loop, the refusal thread, the batch and record
# threads) let go of the GIL at each call into the native core, LMDB or a
# socket, and take it back after. With CPython's default switch interval
# (5 ms), taking it back while another thread runs Python can wait that long,
# each time: under a crowd of refusals a batch's commit (about a hundred LMDB
# calls) took 120 to 160 ms instead of 2 or 3, and answers paused for 0.2 to
# 0.9 s. At 1 ms those pauses all but went (benchmarks/RESULTS.md, "Overload").
GIL_SWITCH_SECONDS = 0.001

log = logging.getLogger("scep_fast.server")


def capabilities(config: Config, material: Material) -> Capabilities:
    """What GetCACaps advertises: exactly what this configuration accepts."""
    return Capabilities(
        aes=True,
        # RFC 8894 section 3.5.2: only while a rollover certificate exists.
        get_next_ca_cert=material.next_message is not None,
        des3=not config.get("enrollment", "refuse_3des"),
        post_pki_operation=True,
        # RenewalReq, and PKCSReq signed by a certificate we issued.
        renewal=True,
        sha1=not config.get("enrollment", "refuse_sha1"),
        sha256=True,
        sha512=True,
        scep_standard=True,
    )


def ca_certificates(material: Material) -> CaCertificates:
    if material.mode == "ca":
        return CaCertificates(material.ca_cert, CT_CA_CERT)
    # RFC 8894 section 4.2.1.2: the RA certificate(s) and the CA certificate
    # as a degenerate certs-only SignedData. With an NDES-style pair, the
    # signing RA comes first and the encryption RA next, as NDES sends them:
    # a client that takes the first RA for both still has its request opened
    # and can verify the reply's signer.
    ras = [material.ra_cert]
    if material.ra_encryption is not None:
        ras.append(material.ra_encryption[0])
    return CaCertificates(certs_only([*ras, material.ca_cert]), CT_CA_RA_CERT)


@dataclass
class Worker:
    """Everything one worker process holds."""

    config: Config
    material: Material
    ledger: OpenLedger
    service: EnrollmentService
    batcher: Batcher[PreparedBatch, Answer]
    app: ScepApp
    integrations: Integrations | None = None
    outbox: OutboxDelivery | None = None

    def close(self) -> None:
        self.ledger.close()


def _observe_commit(seconds: float, issued: int) -> None:
    metrics.LEDGER_COMMIT.observe(seconds)
    metrics.CERTIFICATES_ISSUED.inc(issued)


def _observe_batch(stats: BatchStats) -> None:
    metrics.BATCH_SIZE.observe(stats.size)
    metrics.BATCH_WAIT.observe(stats.wait_seconds)
    metrics.QUEUED.set(stats.queued)


def _observe_validation(validator: str, result: str, seconds: float) -> None:
    metrics.VALIDATION_SECONDS.labels(validator).observe(seconds)
    metrics.VALIDATIONS.labels(validator, result).inc()


def _observe_full(what: str, error: LedgerFull) -> None:
    """A write the ledger refused for want of room: a metric to alert on, a warning to read."""
    metrics.LEDGER_FULL.inc()
    log.warning("ledger full", extra={"fields": {"write": what, "condition": str(error)}})


def _retry_after(refusal: Overloaded | None) -> int | None:
    return None if refusal is None else refusal.retry_after_seconds


def ledger_password_file(config: Config) -> Path | None:
    name = str(config.get("ledger", "password_file"))
    return config.dir / name if name else None


def open_ledger(config: Config) -> OpenLedger:
    """This process's handle on the ledger the configuration names (LMDB or PostgreSQL)."""
    url = str(config.get("ledger", "url"))
    if url:
        from scep_fast.runtime.ledger_pg import PgLedger

        return PgLedger(url, password_file=ledger_password_file(config),
                        pool_size=int(config.get("ledger", "pool_size")),
                        on_full=_observe_full)
    return LmdbLedger(config.dir / LEDGER_DIR,
                      map_size_bytes=int(config.get("ledger", "map_size_bytes")),
                      on_full=_observe_full)


STARTUP_KEY_TRIES = 5
STARTUP_KEY_PAUSE_SECONDS = 0.2


def _context(config: Config, material: Material) -> tuple[ScepContext, list[NativeKey]]:
    """The native context of this directory's keys, and those of its keys held in a token.

    A token key is opened here, in the process that uses it; a file key goes
    to the core as DER. The core takes either where it takes the other.
    """
    signer_key = open_key(material.signer[1])
    issuer_key = signer_key if material.mode == "ca" else open_key(material.ca_key)
    signer = (material.signer[0], signer_key)
    # Clients that still hold a retired RA certificate encrypt to it.
    retired = [(p.ra_cert, open_key(p.ra_key)) for p in material.previous]
    retired += [p.ra_encryption for p in material.previous if p.ra_encryption is not None]
    # An NDES-style pair: requests enveloped to the encryption RA are opened
    # too (and those enveloped to the signing RA still are); replies are
    # signed by the signing RA alone.
    encryption = ([] if material.ra_encryption is None else
                  [(material.ra_encryption[0], open_key(material.ra_encryption[1]))])
    ctx = ScepContext(
        recipients=[signer, *encryption, *retired],
        signer=signer,
        issuer=(material.ca_cert, issuer_key),
        allow_legacy=bool(config.get("enrollment", "allow_legacy_algorithms")),
        refuse_sha1=bool(config.get("enrollment", "refuse_sha1")),
        refuse_3des=bool(config.get("enrollment", "refuse_3des")),
    )
    return ctx, [k for k in (signer_key, issuer_key, *(key for _, key in retired))
                 if isinstance(k, NativeKey)]


def build_service(config: Config, material: Material, ledger: OpenLedger, *,
                  on_keys_lost: Callable[[], None] = lambda: None,
                  open_keys_now: bool = True,
                  outbox: OutboxDelivery | None = None) -> EnrollmentService:
    """The enrollment rules with this directory's keys, policy and profiles.

    File keys are loaded now, once. Token keys are opened now too when the
    token is there, and otherwise as soon as it is (see ``TokenKeySource``);
    ``on_keys_lost`` is called when they go away. With ``open_keys_now``
    false, a token is opened only by an operation that signs.
    """
    keys: ScepContext | TokenKeySource
    if any(isinstance(key, TokenKey) for key in (
            material.ca_key, material.ra_key, *(p.ra_key for p in material.previous))):
        keys = TokenKeySource(lambda: _context(config, material), on_lost=on_keys_lost)
        # A few quick tries before serving without keys: a token may refuse a
        # login for a moment while other processes open their sessions.
        for _ in range(STARTUP_KEY_TRIES if open_keys_now else 0):
            if keys.open() is not None:
                break
            time.sleep(STARTUP_KEY_PAUSE_SECONDS)
    else:
        keys = _context(config, material)[0]
    policy = Policy(
        static_challenge=material.challenge,
        default_profile=str(config.get("enrollment", "default_profile")),
        renewal_window_days=int(config.get("enrollment", "renewal_window_days")),
        revoke_on_replace=bool(config.get("enrollment", "revoke_on_replace")),
        challenge_by_validators=config.get("validation", "challenge") == "validators",
        external_validation=validation_configured(config),
    )
    profiles = config.profiles(crl_url(str(config.get("crl", "public_url")), material.ca_cert))
    return EnrollmentService(keys, ledger, policy, profiles,
                             [material.ca_cert, *[p.ca_cert for p in material.previous]],
                             crl_source=CrlStore(config.dir).by_issuer,
                             on_commit=_observe_commit,
                             notice_sinks=notice_sinks(config),
                             refusals_noticed=_room_for_refusals(config, outbox),
                             on_refusal_unnoticed=metrics.REFUSALS_UNNOTICED.inc)


def ndes_page(config: Config, ledger: OpenLedger,
              credentials: Collection[BasicCredential] | None = None) -> NdesChallengePage:
    """The NDES-style challenge page on this process's ledger.

    ``credentials`` as the supervisor checked them at start; read again when
    not given (a worker's own copy).
    """
    if credentials is None:
        try:
            credentials = load_credentials(config.path("ndes", "credentials_file"))
        except NdesCredentialsError as e:
            raise ConfigError(f"ndes.credentials_file: {e}") from None
    return NdesChallengePage(
        ledger, list(config.values["profiles"]), credentials,
        ttl_seconds=int(config.get("ndes", "challenge_ttl_seconds")),
        profile=str(config.get("ndes", "profile")),
        on_outcome=lambda outcome: metrics.NDES_PAGE_REQUESTS.labels(outcome).inc())


def _room_for_refusals(config: Config,
                       outbox: OutboxDelivery | None) -> Callable[[], bool]:
    """Whether the outbox, as this worker's delivery last counted it, has room for
    refusals' notices (see outbox.max_notices)."""
    if outbox is None:
        return lambda: True
    limit = int(config.get("outbox", "max_notices"))
    return lambda: outbox.backlog < limit


def build_worker(config: Config) -> Worker:
    material = load_material(config)
    ledger = open_ledger(config)
    connected = (integrations.build(config)
                 if validation_configured(config)
                 or notice_sinks(config) else None)
    outbox = None if connected is None or not connected.notifiers else OutboxDelivery(
        ledger, connected.notifiers,
        poll_seconds=float(config.get("outbox", "poll_seconds")),
        lease_seconds=float(config.get("outbox", "lease_seconds")),
        timeout_seconds=float(config.get("outbox", "timeout_seconds")),
        max_retry_seconds=float(config.get("outbox", "max_retry_seconds")),
        max_age_seconds=float(config.get("outbox", "max_age_hours")) * 3600,
        on_result=lambda sink, result: metrics.NOTIFICATIONS.labels(sink, result).inc(),
        on_backlog=metrics.OUTBOX_NOTICES.set)
    # Keys lost from their token: this process drains and exits like on
    # SIGTERM, and the supervisor starts a new one with a new session.
    service = build_service(config, material, ledger,
                            on_keys_lost=lambda: os.kill(os.getpid(), signal.SIGTERM),
                            outbox=outbox)
    pipeline: Pipeline[PreparedBatch, Answer] = Pipeline(
        authenticate=service.authenticate_batch,
        issue=service.issue_batch,
        sign=service.sign_batch,
        record=service.record_batch)
    if connected is not None and connected.validators:
        pipeline = dataclasses.replace(pipeline, validate=ValidationStage(
            connected.validators,
            timeout_seconds=float(config.get("validation", "timeout_seconds")),
            max_in_flight=int(config.get("validation", "max_in_flight")),
            on_call=_observe_validation))
    if outbox is not None:
        waker = outbox.wake
        pipeline = dataclasses.replace(pipeline, notify=lambda _batch: waker())
    batcher: Batcher[PreparedBatch, Answer] = Batcher(
        pipeline,
        max_size=int(config.get("batch", "max_size")),
        window_seconds=float(config.get("batch", "window_seconds")),
        queue_size=int(config.get("batch", "queue_size")),
        max_wait_seconds=float(config.get("batch", "max_wait_seconds")),
        on_batch=_observe_batch,
        on_shed=lambda reason, count: metrics.SHED.labels(reason).inc(count),
    )
    app = ScepApp(
        capabilities=capabilities(config, material),
        ca_certificates=ca_certificates(material),
        crl_store=CrlStore(config.dir),
        next_ca_certificates=material.next_message,
        batcher=batcher,
        max_body_bytes=int(config.get("server", "max_body_bytes")),
        body_timeout_seconds=float(config.get("server", "body_timeout_seconds")),
        ndes_page=(ndes_page(config, ledger) if config.get("ndes", "enabled")
                   and config.get("ndes", "bind") == "scep" else None),
    )
    return Worker(config, material, ledger, service, batcher, app, connected, outbox)


def hypercorn_config(config: Config, bind: str) -> HypercornConfig:
    hc = HypercornConfig()
    hc.bind = [bind]
    # hypercorn calls listen() again on the socket it is handed: with its
    # default (100) that would shrink the backlog the supervisor asked for.
    hc.backlog = int(config.get("server", "listen_backlog"))
    # A GET PKIOperation carries the whole message in the request line.
    hc.h11_max_incomplete_size = int(config.get("server", "max_request_line_bytes"))
    hc.read_timeout = int(max(1, config.get("server", "read_timeout_seconds")))
    hc.keep_alive_timeout = float(config.get("server", "keep_alive_seconds"))
    hc.graceful_timeout = GRACEFUL_SECONDS
    hc.include_server_header = False
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    return hc


async def serve_worker(worker: Worker, hc: HypercornConfig,
                       supervisor_fd: int | None = None) -> None:
    shutdown = trio.Event()

    async def wait_for_shutdown() -> None:
        await shutdown.wait()

    async def watch_signals() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("draining", extra={"fields": {"signal": signal.Signals(signum).name}})
                shutdown.set()
                return

    async def watch_supervisor(fd: int) -> None:
        # The supervisor never writes: end of file means it is gone, and a
        # worker nobody supervises would hold the port with nobody to stop it.
        while True:
            await trio.lowlevel.wait_readable(fd)
            if not os.read(fd, 64):
                break
        log.warning("supervisor gone; draining")
        shutdown.set()

    async def watch() -> None:
        async with trio.open_nursery() as watchers:
            watchers.start_soon(watch_signals)
            if supervisor_fd is not None:
                watchers.start_soon(watch_supervisor, supervisor_fd)
            # Whichever asked for the drain, the other stops watching.
            await shutdown.wait()
            watchers.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.batcher.run)
        nursery.start_soon(watch)
        if worker.outbox is not None:
            nursery.start_soon(worker.outbox.run)
        await serve_http(worker.app, hc, shutdown_trigger=wait_for_shutdown,
                         fast_refusal=FastRefusal(
                             refuse=lambda: _retry_after(worker.batcher.early_refusal()),
                             max_body=int(worker.config.get("server", "max_body_bytes")),
                             load=worker.batcher))
        # hypercorn has answered every request it accepted; nothing new can queue.
        worker.batcher.close()
        nursery.cancel_scope.deadline = trio.current_time() + GRACEFUL_SECONDS
        if worker.outbox is not None:
            # What is not delivered stays in the outbox for the next worker.
            nursery.cancel_scope.deadline = min(nursery.cancel_scope.deadline,
                                                trio.current_time() + GRACEFUL_SECONDS / 2)
    if worker.integrations is not None:
        with trio.move_on_after(1):
            await worker.integrations.aclose()


def tune_gc() -> None:
    """Takes what start-up built (modules, keys, config) out of the collector's sight."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def tune_gil() -> None:
    """Shortens the wait of a thread taking the GIL back (see GIL_SWITCH_SECONDS)."""
    sys.setswitchinterval(GIL_SWITCH_SECONDS)


def run_worker(config: Config, bind: str, *, supervisor_fd: int | None = None) -> None:
    """One worker process: serves ``bind`` (``fd://N`` from the supervisor) until signalled.

    ``supervisor_fd`` is the read end of the supervisor's pipe: its end of
    file stops the worker like SIGTERM.
    """
    worker = build_worker(config)
    tune_gc()
    tune_gil()
    try:
        trio.run(serve_worker, worker, hypercorn_config(config, bind), supervisor_fd)
    finally:
        worker.close()
