"""Every Prometheus metric scep-fast exports, declared in one place.

Multi-process mode: the supervisor sets PROMETHEUS_MULTIPROC_DIR (and wipes
it) before any worker starts, so every process, including this module's
importers, writes its samples there, and the supervisor's metrics endpoint
sums them. Labels are pre-initialised so that dashboards show zeros rather
than gaps before the first event.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

from scep_fast.runtime.batcher import SHED_REASONS
from scep_fast.runtime.ndes import OUTCOMES as NDES_PAGE_OUTCOMES
from scep_fast.runtime.outbox import RESULTS as NOTIFICATION_RESULTS
from scep_fast.runtime.validation_stage import RESULTS as VALIDATION_RESULTS

# Sub-millisecond to ten seconds: a cached GetCACaps takes ~0.1 ms, a
# PKCSReq ~1 ms alone and tens of ms in a full batch under load.
LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0,
                   2.0, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# "CRL": a download from /crl/<name>.crl; "-": anything not understood.
# "NDES": the NDES-style challenge page, when it is on the SCEP address.
OPERATIONS = ("GetCACaps", "GetCACert", "GetNextCACert", "PKIOperation", "CRL", "NDES", "-")
MESSAGE_TYPES = ("PKCS_REQ", "RENEWAL_REQ", "CERT_POLL", "GET_CERT", "GET_CRL", "-")
OUTCOMES = ("SUCCESS", "FAILURE", "PENDING", "ok", "http_400", "http_404", "http_405",
            "http_408", "http_413", "http_500", "http_503")
FAIL_INFOS = ("BAD_ALG", "BAD_MESSAGE_CHECK", "BAD_REQUEST", "BAD_TIME", "BAD_CERT_ID")

REQUESTS = Counter("scep_requests_total", "SCEP requests answered",
                   ["operation", "message_type", "outcome"])
REQUEST_DURATION = Histogram("scep_request_duration_seconds",
                             "Time from request start to the last byte of the answer",
                             ["operation"], buckets=LATENCY_BUCKETS)
FAIL_INFO = Counter("scep_failinfo_total", "CertRep FAILURE answers by failInfo", ["fail_info"])
CERTIFICATES_ISSUED = Counter("scep_certificates_issued_total",
                              "Certificates issued and recorded in the ledger")
BATCH_SIZE = Histogram("scep_batch_size", "Messages per native batch", buckets=BATCH_SIZE_BUCKETS)
BATCH_WAIT = Histogram("scep_batch_wait_seconds",
                       "How long the oldest message of a batch waited for it to start",
                       buckets=LATENCY_BUCKETS)
LEDGER_COMMIT = Histogram("scep_ledger_commit_seconds",
                          "One ledger write transaction, synced to disk",
                          buckets=LATENCY_BUCKETS)
LEDGER_FULL = Counter("scep_ledger_full_total",
                      "Ledger writes refused because its map or its file system is full")
INFLIGHT = Gauge("scep_inflight_requests", "Requests being handled now",
                 multiprocess_mode="livesum")
QUEUED = Gauge("scep_batch_queue_length", "Messages waiting for a batch",
               multiprocess_mode="livesum")
CERT_EXPIRY = Gauge("scep_ca_certificate_expiry_timestamp_seconds",
                    "notAfter of the CA and RA certificates in service", ["certificate"],
                    multiprocess_mode="max")
WORKERS = Gauge("scep_workers", "Worker processes running", multiprocess_mode="max")
SHED = Counter("scep_requests_shed_total",
               "PKIOperations refused with 503 for load, by why", ["reason"])
# The NDES-style challenge page, on the admin address (the supervisor) or the SCEP address.
NDES_PAGE_REQUESTS = Counter("scep_ndes_page_requests_total",
                             "GETs of the NDES-style challenge page, by outcome", ["outcome"])
# MDM integrations: the validation stage and the outbox.
VALIDATION_SECONDS = Histogram("scep_validation_seconds",
                               "One call of an external validator (webhook, Intune)",
                               ["validator"], buckets=LATENCY_BUCKETS)
VALIDATIONS = Counter("scep_validations_total",
                      "External validator calls, by result (allow, deny, error, timeout)",
                      ["validator", "result"])
NOTIFICATIONS = Counter("scep_notifications_total",
                        "Notice deliveries, by sink and result "
                        "(delivered, retry, rejected, expired)", ["sink", "result"])
REFUSALS_UNNOTICED = Counter("scep_refusals_unnoticed_total",
                             "Refusals not notified because the outbox held outbox.max_notices")
OUTBOX_NOTICES = Gauge("scep_outbox_notices", "Notices waiting in the ledger's outbox",
                       multiprocess_mode="max")
# Counted by the supervisor, in its own file of the multi-process directory:
# counters of every process, live or dead, are summed.
WORKER_RESTARTS = Counter("scep_worker_restarts_total",
                          "Worker processes restarted after they died")


def preinitialise() -> None:
    for operation in OPERATIONS:
        REQUEST_DURATION.labels(operation)
        for outcome in ("ok", "http_400", "http_404", "http_405", "http_408", "http_413",
                        "http_500"):
            REQUESTS.labels(operation, "-", outcome)
    for message_type in MESSAGE_TYPES:
        for outcome in OUTCOMES:
            REQUESTS.labels("PKIOperation", message_type, outcome)
    for fail_info in FAIL_INFOS:
        FAIL_INFO.labels(fail_info)
    for certificate in ("ca", "ra"):
        CERT_EXPIRY.labels(certificate)
    for reason in SHED_REASONS:
        SHED.labels(reason)
    for outcome in NDES_PAGE_OUTCOMES:
        NDES_PAGE_REQUESTS.labels(outcome)


def preinitialise_integrations(validators: Iterable[str], sinks: Iterable[str]) -> None:
    """Zeros for the validators and sinks this server is configured with."""
    for validator in validators:
        VALIDATION_SECONDS.labels(validator)
        for result in VALIDATION_RESULTS:
            VALIDATIONS.labels(validator, result)
    for sink in sinks:
        for result in NOTIFICATION_RESULTS:
            NOTIFICATIONS.labels(sink, result)


def outcome_label(outcome: str, status: int | None) -> str:
    if outcome in ("SUCCESS", "FAILURE", "PENDING"):
        return outcome
    return "ok" if status in (None, 200) else f"http_{status}"
