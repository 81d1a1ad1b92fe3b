"""The admin HTTP API: one-time challenges and pending requests, for an MDM or an operator.

Served by the supervisor on its own address (loopback by default), never on
the SCEP address. Every request needs ``Authorization: Bearer <token>``
with the token from the directory's token file, compared in constant time.

    POST /v1/challenges              {"ttl_seconds": 3600, "uses": 1, "profile": "default",
                                      "subject_pattern": "", "san_pattern": "", "label": ""}
                                     -> 201 {"challenge": "...", "expires_at": "...", ...}
    GET  /v1/requests                -> 200 [{"request_id": ..., "status": ...}, ...]
    POST /v1/requests/ID/approve     -> 200 {"serial": "..."}
    POST /v1/requests/ID/reject      {"reason": "..."} -> 200 {...}

With ``[ndes] enabled``, also the NDES-style challenge page (see ndes.py),
behind HTTP Basic instead of the bearer token:

    GET  /certsrv/mscep_admin/       -> 200 UTF-16 HTML with a single-use challenge
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from scep_fast.protocol import KeysUnavailable, StorageFull, StorageUnavailable
from scep_fast.runtime.http1 import StrictHttp1Handler
from scep_fast.runtime.ledger_json import epoch_to_iso, pending_to_json, record_to_json
from scep_fast.runtime.ndes import NdesChallengePage, is_page_path
from scep_fast.service.challenges import ChallengeRequestInvalid, mint_challenge
from scep_fast.service.enrollment import EnrollmentService
from scep_fast.service.ledger import Ledger, LedgerError, LedgerFull, LedgerUnavailable, NotFound

log = logging.getLogger("scep_fast.admin")

MAX_BODY_BYTES = 64 * 1024
# Exit codes of `scep-fast requests approve` beyond 0 (done) and 1 (refused by the ledger).
APPROVE_NOT_FOUND = 3
APPROVE_LEDGER_FULL = 4
APPROVE_KEYS_UNAVAILABLE = 5
_REQUEST_PATH = re.compile(r"/v1/requests/([0-9a-f]{16})/(approve|reject)")


class AdminApi:
    """The operations behind the endpoints; shared by the HTTP handler and tests."""

    def __init__(self, ledger: Ledger, service: Callable[[], EnrollmentService],
                 profiles: list[str], token: bytes, *, approve_in: Path | None = None,
                 ndes: NdesChallengePage | None = None) -> None:
        if len(token) < 16:
            raise ValueError("the admin token must be at least 16 bytes")
        self.ledger = ledger
        # Built for each decision, from the keys on disk now: approvals are
        # rare, and after `ca activate` they must come from the new CA.
        self.service = service
        self.profiles = profiles
        # With keys in a token: approve in a `scep-fast requests approve`
        # process for this directory, so that the supervisor, which serves this
        # API, never opens a PKCS#11 session (see keys.TokenKeySource).
        self.approve_in = approve_in
        self._token = token
        # The NDES-style challenge page, when configured.
        self.ndes = ndes
        # One approval at a time: each issues and commits on its own.
        self._lock = threading.Lock()

    def authorised(self, header: str | None) -> bool:
        scheme, _, presented = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            presented.strip().encode(), self._token)

    def new_challenge(self, body: dict[str, Any]) -> dict[str, object]:
        unknown = set(body) - {"ttl_seconds", "uses", "profile", "subject_pattern", "san_pattern",
                                 "label"}
        if unknown:
            raise ChallengeRequestInvalid(f"unknown fields: {', '.join(sorted(unknown))}")
        minted = mint_challenge(
            self.ledger, now=time.time(),
            ttl_seconds=body.get("ttl_seconds", 3600), uses=body.get("uses", 1),
            profile=body.get("profile", "default"), profiles=self.profiles,
            subject_pattern=body.get("subject_pattern", ""),
            san_pattern=body.get("san_pattern", ""), label=body.get("label", ""))
        c = minted.challenge
        return {"challenge": minted.secret, "expires_at": epoch_to_iso(c.expires_at),
                "uses": c.uses_left, "profile": c.profile, "subject_pattern": c.subject_pattern,
                "san_pattern": c.san_pattern, "label": c.label}

    def list_requests(self) -> list[dict[str, object]]:
        return [pending_to_json(p) for p in self.ledger.iter_pending()]

    def decide(self, request_id: str, action: str, body: dict[str, Any]) -> dict[str, object]:
        with self._lock:
            if action == "approve":
                if self.approve_in is not None:
                    return approve_in_child(self.approve_in, request_id)
                return record_to_json(self.service().approve(request_id))
            return pending_to_json(self.service().reject(request_id, str(body.get("reason", ""))))


def approve_in_child(directory: Path, request_id: str) -> dict[str, object]:
    """Approves in a child process; its exit code says which refusal it was."""
    done = subprocess.run(
        [sys.executable, "-m", "scep_fast.runtime.cli", "requests", "approve", request_id,
         "--json", "--dir", str(directory)],
        capture_output=True, text=True, timeout=120)
    if done.returncode == 0:
        record: dict[str, object] = json.loads(done.stdout)
        return record
    reason = done.stderr.strip().splitlines()[-1:] or ["no reason given"]
    text = reason[0].removeprefix("scep-fast: ")
    if done.returncode == APPROVE_NOT_FOUND:
        raise NotFound(text)
    if done.returncode == APPROVE_LEDGER_FULL:
        raise LedgerFull(text)
    if done.returncode == APPROVE_KEYS_UNAVAILABLE:
        raise KeysUnavailable(detail=text)
    if done.returncode == 1:
        raise LedgerError(text)
    raise RuntimeError(f"approval process failed ({done.returncode}): {text}")


class _Handler(StrictHttp1Handler):
    api: AdminApi
    server_version = "scep-fast-admin"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        return  # one structured line per request below instead

    def _send(self, status: int, payload: object, *,
              retry_after: int = StorageFull.DEFAULT_RETRY_AFTER_SECONDS) -> None:
        headers = {"WWW-Authenticate": 'Bearer realm="scep-fast admin"'} if status == 401 else {}
        self._send_bytes(status, (json.dumps(payload) + "\n").encode(), "application/json",
                         headers, retry_after=retry_after)

    def _send_bytes(self, status: int, body: bytes, content_type: str,
                    headers: dict[str, str], *,
                    retry_after: int = StorageFull.DEFAULT_RETRY_AFTER_SECONDS) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        if status == 503:
            self.send_header("Retry-After", str(retry_after))
        self.end_headers()
        self.wfile.write(body)
        log.info("admin request", extra={"fields": {
            "method": self.command, "path": self.path.split("?")[0], "status": status}})

    def _body(self) -> dict[str, Any] | None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._send(413, {"error": "body too large"})
            return None
        raw = self.rfile.read(length) if length else b"{}"
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            self._send(400, {"error": "body is not JSON"})
            return None
        if not isinstance(body, dict):
            self._send(400, {"error": "body must be a JSON object"})
            return None
        return body

    def _authorised(self) -> bool:
        if self.api.authorised(self.headers.get("Authorization")):
            return True
        self._send(401, {"error": "missing or wrong bearer token"})
        return False

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        path = self.path.split("?")[0]
        if self.api.ndes is not None and is_page_path(path):
            self._ndes_page(self.api.ndes)
            return
        if not self._authorised():
            return
        if path == "/v1/requests":
            self._send(200, self.api.list_requests())
        else:
            self._send(404, {"error": "no such endpoint"})

    def _ndes_page(self, ndes: NdesChallengePage) -> None:
        answer = ndes.answer(self.headers.get("Authorization"), self.client_address[0],
                             time.time())
        self._send_bytes(answer.status, answer.body, answer.content_type, answer.headers,
                         retry_after=answer.retry_after or 0)

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        if not self._authorised():
            return
        body = self._body()
        if body is None:
            return
        path = self.path.split("?")[0]
        try:
            if path == "/v1/challenges":
                self._send(201, self.api.new_challenge(body))
                return
            match = _REQUEST_PATH.fullmatch(path)
            if match is None:
                self._send(404, {"error": "no such endpoint"})
                return
            self._send(200, self.api.decide(match.group(1), match.group(2), body))
        except ChallengeRequestInvalid as e:
            self._send(400, {"error": str(e)})
        except NotFound as e:
            self._send(404, {"error": str(e)})
        except LedgerFull:
            # Logged and counted where the write failed.
            self._send(503, {"error": "the ledger is full"})
        except LedgerUnavailable:
            self._send(503, {"error": "the ledger is unavailable"},
                       retry_after=StorageUnavailable.DEFAULT_RETRY_AFTER_SECONDS)
        except KeysUnavailable:
            self._send(503, {"error": "the signing keys are unavailable"})
        except LedgerError as e:
            self._send(409, {"error": str(e)})
        except Exception:  # noqa: BLE001 - our fault; details in the log only
            log.exception("admin request failed")
            self._send(500, {"error": "internal error"})


def serve_admin(api: AdminApi, host: str, port: int, *,
                backlog: int = 4096) -> ThreadingHTTPServer:
    """Starts the admin API in a daemon thread and returns its server."""
    handler = type("AdminHandler", (_Handler,), {"api": api})

    class AdminServer(ThreadingHTTPServer):
        # socketserver listens with a backlog of 5 unless told otherwise.
        request_queue_size = backlog

    server = AdminServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="admin-api", daemon=True).start()
    return server
