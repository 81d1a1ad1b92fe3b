"""The ASGI application: HTTP in, SCEP operations out.

Routing, body limits, content types and the mapping of errors to HTTP live
here and only here; the protocol layer parses, the enrollment service
decides. Every response has a Content-Length (no chunking: several SCEP
clients cannot read it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import trio

from scep_fast.protocol import (
    BodyTooLarge,
    Capabilities,
    GetCACaps,
    GetCACert,
    GetNextCACert,
    InternalError,
    MethodNotAllowed,
    Overloaded,
    PKIOperation,
    RequestTimeout,
    ScepError,
    parse_request,
)
from scep_fast.runtime import metrics
from scep_fast.runtime.batcher import Batcher
from scep_fast.runtime.crl import NAME_PATTERN as CRL_NAME_PATTERN
from scep_fast.runtime.crl import CrlStore
from scep_fast.runtime.ndes import NdesChallengePage, is_page_path
from scep_fast.service.enrollment import Answer

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Any path under these prefixes is SCEP: clients append their own suffixes
# (/scep/pkiclient.exe, /cgi-bin/pkiclient.exe, /scep/<profile>...).
SCEP_PREFIXES = ("/scep", "/cgi-bin/pkiclient.exe")

CT_CAPS = b"text/plain"
CT_CA_CERT = b"application/x-x509-ca-cert"
CT_CA_RA_CERT = b"application/x-x509-ca-ra-cert"
CT_PKI_MESSAGE = b"application/x-pki-message"
CT_NEXT_CA_CERT = b"application/x-x509-next-ca-cert"
# RFC 5280 section 4.2.1.13 (and RFC 2585): a DER CRL over HTTP.
CT_CRL = b"application/pkix-crl"
CRL_PREFIX = "/crl/"
CT_TEXT = b"text/plain; charset=utf-8"

log = logging.getLogger("scep_fast.request")


@dataclass(frozen=True, slots=True)
class CaCertificates:
    """The GetCACert answer, encoded once at start."""

    body: bytes
    content_type: bytes


class ScepApp:
    """One worker's ASGI application."""

    def __init__(
        self,
        *,
        capabilities: Capabilities,
        ca_certificates: CaCertificates,
        batcher: Batcher[Any, Answer],
        max_body_bytes: int,
        body_timeout_seconds: float = 30.0,
        crl_store: CrlStore | None = None,
        next_ca_certificates: bytes | None = None,
        ndes_page: NdesChallengePage | None = None,
    ) -> None:
        self._caps = capabilities.render()
        self._ca = ca_certificates
        self._batcher = batcher
        self._max_body = max_body_bytes
        self._body_timeout = body_timeout_seconds
        self._crls = crl_store
        self._next_ca = next_ca_certificates
        # The NDES-style challenge page, when configured on this address
        # (``ndes.bind = "scep"``); its ledger writes go to a thread, one at a time.
        self._ndes = ndes_page
        self._ndes_limiter = trio.CapacityLimiter(1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        path = scope["path"]
        method = scope["method"]
        fields: dict[str, object] = {"method": method, "operation": "-"}

        async def send_noting_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                fields["status"] = message["status"]
            await send(message)

        metrics.INFLIGHT.inc()
        try:
            if self._ndes is not None and is_page_path(path):
                fields["operation"] = "NDES"
                await self._ndes_page(self._ndes, send_noting_status, receive, scope, fields)
            elif path.startswith(CRL_PREFIX):
                fields["operation"] = "CRL"
                await self._crl(send_noting_status, method, path)
            elif path.startswith(SCEP_PREFIXES):
                await self._scep(send_noting_status, receive, scope, fields)
            else:
                await _respond(send_noting_status, 404, CT_TEXT, b"not a SCEP endpoint\n")
        except ScepError as e:
            await _respond_error(send_noting_status, e, fields)
        except Exception as e:  # noqa: BLE001 - our fault: a generic 500, details in the log
            log.exception("unexpected error handling %s %s", method, path)
            await _respond_error(send_noting_status, InternalError(repr(e)), fields)
        finally:
            metrics.INFLIGHT.dec()
            elapsed = time.perf_counter() - started
            fields["duration_ms"] = round(elapsed * 1000, 3)
            _observe(fields, elapsed)
            log.info("request", extra={"fields": fields})

    async def _scep(self, send: Send, receive: Receive, scope: Scope,
                    fields: dict[str, object]) -> None:
        method = scope["method"]
        body = await _read_body(receive, self._max_body, self._body_timeout)
        request = parse_request(method, scope["query_string"], body,
                                max_message_bytes=self._max_body)
        fields["operation"] = request.operation.value
        if isinstance(request, GetCACaps):
            await _respond(send, 200, CT_CAPS, self._caps, head=method == "HEAD")
        elif isinstance(request, GetCACert):
            await _respond(send, 200, self._ca.content_type, self._ca.body,
                           head=method == "HEAD")
        elif isinstance(request, GetNextCACert):
            # RFC 8894 section 4.7: only while a rollover certificate
            # exists; GetCACaps offers GetNextCACert exactly then.
            if self._next_ca is None:
                await _respond(send, 404, CT_TEXT, b"no next CA certificate\n")
            else:
                await _respond(send, 200, CT_NEXT_CA_CERT, self._next_ca,
                               head=method == "HEAD")
        elif isinstance(request, PKIOperation):
            fields["transport"] = "GET" if request.via_get else "POST"
            await self._pki_operation(send, request, fields)

    async def _ndes_page(self, ndes: NdesChallengePage, send: Send, receive: Receive,
                         scope: Scope, fields: dict[str, object]) -> None:
        """GET /certsrv/mscep_admin/: a single-use challenge behind HTTP Basic (see ndes.py)."""
        if scope["method"] != "GET":
            await _respond(send, 405, CT_TEXT, b"method not allowed\n",
                           extra=[(b"allow", b"GET")])
            return
        await _read_body(receive, self._max_body, self._body_timeout)
        authorization = None
        for name, value in scope["headers"]:
            if name.lower() == b"authorization":
                authorization = value.decode("latin-1")
        client = scope.get("client")
        answer = await trio.to_thread.run_sync(
            ndes.answer, authorization, str(client[0]) if client else "-", time.time(),
            limiter=self._ndes_limiter)
        fields["ndes"] = answer.outcome
        extra = [(name.lower().encode(), value.encode()) for name, value in answer.headers.items()]
        if answer.retry_after is not None:
            extra.append((b"retry-after", str(answer.retry_after).encode()))
        await _respond(send, answer.status, answer.content_type.encode(), answer.body,
                       extra=extra)

    async def _crl(self, send: Send, method: str, path: str) -> None:
        """GET or HEAD /crl/<name>.crl: the CA's current CRL, DER."""
        if method not in ("GET", "HEAD"):
            await _respond(send, 405, CT_TEXT, b"method not allowed\n",
                           extra=[(b"allow", b"GET, HEAD")])
            return
        file_name = path[len(CRL_PREFIX):]
        name = file_name[:-4] if file_name.endswith(".crl") else ""
        # The name must be a hex key identifier: nothing else reaches the file system.
        der = None
        if self._crls is not None and CRL_NAME_PATTERN.fullmatch(name):
            der = self._crls.current(name)
        if der is None:
            await _respond(send, 404, CT_TEXT, b"no such CRL\n", head=method == "HEAD")
            return
        await _respond(send, 200, CT_CRL, der, head=method == "HEAD")

    async def _pki_operation(self, send: Send, request: PKIOperation,
                             fields: dict[str, object]) -> None:
        answer = await self._batcher.submit(request.message)
        fields.update(message_type=answer.message_type, transaction_id=answer.transaction_id,
                      outcome=answer.status, fail_info=answer.fail_info)
        if answer.serial is not None:
            fields["serial"] = format(answer.serial, "x")
        if answer.reason:
            fields["reason"] = answer.reason
        if answer.error is not None:
            raise answer.error
        await _respond(send, 200, CT_PKI_MESSAGE, answer.body)


def _observe(fields: dict[str, object], elapsed: float) -> None:
    operation = str(fields["operation"])
    status = fields.get("status")
    outcome = metrics.outcome_label(str(fields.get("outcome", "")),
                                    status if isinstance(status, int) else None)
    fields.setdefault("outcome", outcome)
    metrics.REQUESTS.labels(operation, str(fields.get("message_type", "-")), outcome).inc()
    metrics.REQUEST_DURATION.labels(operation).observe(elapsed)
    fail_info = fields.get("fail_info", "-")
    if fail_info != "-":
        metrics.FAIL_INFO.labels(str(fail_info)).inc()


async def _read_body(receive: Receive, limit: int, timeout_seconds: float) -> bytes:
    """The whole body, within ``timeout_seconds``: the server's read timeout
    bounds each silence, this bounds a body that trickles in without one."""
    chunks: list[bytes] = []
    size = 0
    with trio.move_on_after(timeout_seconds) as deadline:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"body over {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
    if deadline.cancelled_caught:
        raise RequestTimeout(f"body not complete after {timeout_seconds:g} s")
    return b"".join(chunks)


async def _respond(send: Send, status: int, content_type: bytes, body: bytes, *,
                   head: bool = False, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", content_type),
               (b"content-length", str(len(body)).encode())]
    if extra:
        headers += extra
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


async def _respond_error(send: Send, error: ScepError, fields: dict[str, object]) -> None:
    status = error.http_status or 500
    # The client reads only the short reason; the log line gets the detail.
    if isinstance(error, InternalError):
        fields["reason"] = error.detail or fields.get("reason", "")
    else:
        fields["reason"] = f"{error.reason}: {error.detail}" if error.detail else error.reason
    extra: list[tuple[bytes, bytes]] = []
    if isinstance(error, MethodNotAllowed):
        extra.append((b"allow", ", ".join(error.allowed).encode()))
    if isinstance(error, Overloaded):
        extra.append((b"retry-after", str(error.retry_after_seconds).encode()))
    if isinstance(error, BodyTooLarge | RequestTimeout):
        # The rest of the body is not read; make the client open a new connection.
        extra.append((b"connection", b"close"))
    await _respond(send, status, CT_TEXT, f"{error.reason}\n".encode(), extra=extra)


async def answer_lifespan(receive: Receive, send: Send) -> None:
    """The ASGI lifespan protocol for an app with nothing to start or stop."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
