"""A fake Microsoft Intune for the Intune client's tests: token endpoint, Graph
service discovery and the ScepRequestValidationFEService, as one ASGI app
served by hypercorn under trio on 127.0.0.1 in a background thread.

It answers the way these describe the real services:

- Microsoft's reference client, github microsoft/Intune-Resource-Access,
  src/CsrValidation (Java IntuneClient, IntuneScepServiceClient,
  IntuneScepServiceException, MSALClientWrapper; C# IntuneScepValidator,
  IntuneServiceLocationProvider): URLs, headers, api-version 2018-02-20,
  bodies, response codes.
- https://learn.microsoft.com/en-us/mem/intune/protect/scep-libraries-apis
  and https://learn.microsoft.com/en-us/mem/intune/protect/certificate-authority-add-scep-overview
  (the validation checks, the app registration and its permissions).
- https://learn.microsoft.com/en-us/entra/identity-platform/v2-oauth2-client-creds-grant-flow
  (the token request and answer, errors as ``{"error": "invalid_client"}``).
- https://learn.microsoft.com/en-us/graph/api/resources/endpoint
  (``GET /v1.0/servicePrincipals/appId={id}/endpoints``: ``value`` lists
  ``providerName`` and ``uri``).

Where the real service's behaviour is not written down (the exact 401 body,
which code an unknown challenge gets), the fake picks something plausible
and says so. Knobs let a test make challenges valid or expired, answer 5xx
or slowly, revoke tokens, move the service, and read every call made.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio
from cryptography import x509
from cryptography.x509.oid import AttributeOID
from hypercorn.config import Config
from hypercorn.trio import serve

from scep_fast.runtime.app import answer_lifespan
from scep_fast.runtime.intune import IntuneSettings

TENANT = "contoso.onmicrosoft.com"
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
CLIENT_SECRET = "fake-client-secret-Qx7"
INTUNE_APP_ID = "0000000a-0000-0000-c000-000000000000"
INTUNE_SCOPE = "https://api.manage.microsoft.com//.default"
API_VERSION = "2018-02-20"
# Made up: a path of the fake's own, not the real service's.
SERVICE_PATH = "/TrafficGateway/TrafficRoutingService/SCEP/ScepRequestValidationFEService"
DISCOVERY_PATH = f"/v1.0/servicePrincipals/appId={INTUNE_APP_ID}/endpoints"
ACTIONS = ("validateRequest", "successNotification", "failureNotification")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass
class Call:
    """One request the fake received, and the status it answered."""

    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    status: int = 0

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> dict[str, str]:
        return dict(urllib.parse.parse_qsl(self.body.decode()))


@dataclass
class _Issued:
    scope: str
    expires_at: float


@dataclass
class FakeIntune:
    """The fake's state and knobs (read and set them from the test's thread)."""

    tenant: str = TENANT
    client_id: str = CLIENT_ID
    client_secret: str = CLIENT_SECRET
    token_lifetime_seconds: int = 3600
    # Applied to the three ScepActions only.
    delay_seconds: float = 0.0
    fail_status: int | None = None        # answer this status instead
    raw_answer: bytes | None = None       # answer these bytes (status 200) instead
    notification_code: str = "Success"    # the code notifications get
    accept_tokens: bool = True            # False: every bearer token is refused (401)
    service_path: str = SERVICE_PATH
    discovery_status: int | None = None   # answer discovery with this status instead
    base_url: str = ""                    # set once serving
    calls: list[Call] = field(default_factory=list)
    _challenges: dict[str, bool] = field(default_factory=dict)  # challenge -> expired
    _tokens: dict[str, _Issued] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # --- knobs ---

    def register_challenge(self, challenge: str) -> None:
        with self._lock:
            self._challenges[challenge] = False

    def expire_challenge(self, challenge: str) -> None:
        with self._lock:
            self._challenges[challenge] = True

    def revoke_tokens(self) -> None:
        """Every token issued so far is refused from now on (401)."""
        with self._lock:
            self._tokens.clear()

    def move_service(self, path: str) -> None:
        """Discovery lists the service at ``path`` from now on; the old path 404s."""
        with self._lock:
            self.service_path = path

    # --- what happened ---

    @property
    def graph_scope(self) -> str:
        return f"{self.base_url}/.default"

    def calls_to(self, suffix: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.path.endswith(suffix)]

    def token_requests(self, scope: str) -> list[Call]:
        return [c for c in self.calls_to("/oauth2/v2.0/token") if c.form().get("scope") == scope]

    # --- ASGI ---

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        call = Call(scope["method"], scope["path"], headers, body)
        with self._lock:
            self.calls.append(call)
        status, answer = await self._route(call)
        call.status = status
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(answer)).encode())]})
        await send({"type": "http.response.body", "body": answer})

    async def _route(self, call: Call) -> tuple[int, bytes]:
        path = call.path
        if call.method == "POST" and path == f"/{self.tenant}/oauth2/v2.0/token":
            return self._token(call)
        if path.endswith("/oauth2/v2.0/token"):
            # Entra ID's answer for an unknown tenant (AADSTS90002).
            return _json(400, {"error": "invalid_request"})
        if call.method == "GET" and path == DISCOVERY_PATH:
            return self._discovery(call)
        with self._lock:
            service_path = self.service_path
        for action in ACTIONS:
            if call.method == "POST" and path == f"{service_path}/ScepActions/{action}":
                return await self._action(call, action)
        return _json(404, {"error": {"code": "NotFound", "message": "no such resource"}})

    def _token(self, call: Call) -> tuple[int, bytes]:
        form = call.form()
        if form.get("grant_type") != "client_credentials":
            return _json(400, {"error": "unsupported_grant_type"})
        if (form.get("client_id"), form.get("client_secret")) != (self.client_id,
                                                                 self.client_secret):
            return _json(401, {"error": "invalid_client"})
        scope = form.get("scope", "")
        if scope not in (self.graph_scope, INTUNE_SCOPE):
            return _json(400, {"error": "invalid_scope"})
        token = "fake-token-" + secrets.token_urlsafe(24)
        with self._lock:
            self._tokens[token] = _Issued(scope, time.monotonic() + self.token_lifetime_seconds)
        return _json(200, {"token_type": "Bearer", "expires_in": self.token_lifetime_seconds,
                           "ext_expires_in": self.token_lifetime_seconds,
                           "access_token": token})

    def _authorized(self, call: Call, scope: str) -> bool:
        kind, _, token = call.headers.get("authorization", "").partition(" ")
        with self._lock:
            issued = self._tokens.get(token)
        return (self.accept_tokens and kind == "Bearer" and issued is not None
                and issued.scope == scope and time.monotonic() < issued.expires_at)

    def _discovery(self, call: Call) -> tuple[int, bytes]:
        if not self._authorized(call, self.graph_scope):
            return _unauthorized()
        if self.discovery_status is not None:
            return _json(self.discovery_status, {"error": {"code": "ServiceUnavailable"}})
        with self._lock:
            service_path = self.service_path
        return _json(200, {
            "@odata.context": f"{self.base_url}/v1.0/$metadata#servicePrincipals('appId%3D"
                              f"{INTUNE_APP_ID}')/endpoints",
            "value": [
                {"id": "0c6b5a3d-0000-4000-8000-000000000001", "capability": "Intune",
                 "providerId": None, "providerName": "PkiConnectorFEService",
                 "providerResourceId": None, "uri": f"{self.base_url}/PkiConnectorFEService"},
                {"id": "0c6b5a3d-0000-4000-8000-000000000002", "capability": "Intune",
                 "providerId": None, "providerName": "ScepRequestValidationFEService",
                 "providerResourceId": None, "uri": f"{self.base_url}{service_path}"},
            ]})

    async def _action(self, call: Call, action: str) -> tuple[int, bytes]:
        if self.delay_seconds:
            await trio.sleep(self.delay_seconds)
        if not self._authorized(call, INTUNE_SCOPE):
            return _unauthorized()
        if call.headers.get("api-version") != API_VERSION or not call.headers.get(
                "client-request-id"):
            return _json(400, {"error": {"code": "BadRequest",
                                         "message": "api-version or client-request-id"}})
        if self.fail_status is not None:
            return _json(self.fail_status, {"error": {"code": "InternalServerError"}})
        if self.raw_answer is not None:
            return 200, self.raw_answer
        try:
            doc = call.json()
            inner = doc["request" if action == "validateRequest" else "notification"]
            problem = _missing(inner, action)
        except (ValueError, KeyError, TypeError):
            problem = "body"
        if problem:
            return _json(400, {"error": {"code": "BadRequest", "message": f"bad {problem}"}})
        if action == "validateRequest":
            code = self._validate(inner["certificateRequest"])
        else:
            code = self.notification_code
        return _json(200, {"code": code, "errorDescription": "" if code == "Success" else code})

    def _validate(self, csr_b64: str) -> str:
        try:
            csr = x509.load_der_x509_csr(base64.b64decode(csr_b64, validate=True))
            attribute = csr.attributes.get_attribute_for_oid(AttributeOID.CHALLENGE_PASSWORD)
        except x509.AttributeNotFound:
            return "ChallengePasswordMissing"
        except (ValueError, binascii.Error):
            return "CertificateRequestDecodingFailed"
        challenge = attribute.value
        text = challenge.decode() if isinstance(challenge, bytes) else str(challenge)
        with self._lock:
            expired = self._challenges.get(text)
        if expired is None:
            # Made up: real challenges are encrypted blobs; a foreign one fails to decode.
            return "ChallengeDeserializationError"
        return "ChallengeExpired" if expired else "Success"


_FIELDS = {
    "validateRequest": ("transactionId", "certificateRequest", "callerInfo"),
    "successNotification": ("transactionId", "certificateRequest", "certificateThumbprint",
                            "certificateSerialNumber", "certificateExpirationDateUtc",
                            "issuingCertificateAuthority", "callerInfo"),
    "failureNotification": ("transactionId", "certificateRequest", "errorDescription",
                            "callerInfo"),
}


def _missing(inner: dict[str, Any], action: str) -> str:
    """The first required field missing or mistyped, or ""."""
    for name in _FIELDS[action]:
        if not isinstance(inner.get(name), str) or not inner[name]:
            return name
    if action == "failureNotification":
        if type(inner.get("hResult")) is not int:
            return "hResult"
        if len(inner["errorDescription"]) > 255:
            return "errorDescription"
    return ""


def _json(status: int, doc: Any) -> tuple[int, bytes]:
    return status, json.dumps(doc).encode()


def _unauthorized() -> tuple[int, bytes]:
    return _json(401, {"error": {"code": "Unauthorized", "message": "invalid or expired token"}})


@contextmanager
def serving(fake: FakeIntune) -> Iterator[FakeIntune]:
    """Serves the fake on 127.0.0.1, a free port, until the block ends."""
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        config = Config()
        config.bind = ["127.0.0.1:0"]
        config.graceful_timeout = 0.2
        config.accesslog = None
        stop = trio.Event()
        box["trio_token"], box["stop"] = trio.lowlevel.current_trio_token(), stop
        app: Any = fake  # an ASGI callable, typed more loosely than hypercorn's union
        async with trio.open_nursery() as nursery:
            box["binds"] = await nursery.start(partial(serve, app, config,
                                                       shutdown_trigger=stop.wait))
            ready.set()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            box["error"] = e
        finally:
            ready.set()

    thread = threading.Thread(target=run, name="fake-intune", daemon=True)
    thread.start()
    if not ready.wait(10) or "binds" not in box:
        raise RuntimeError(f"the fake Intune did not start: {box.get('error')!r}")
    fake.base_url = box["binds"][0]
    try:
        yield fake
    finally:
        trio.from_thread.run_sync(box["stop"].set, trio_token=box["trio_token"])
        thread.join(5)
        if "error" in box:
            raise RuntimeError("the fake Intune failed") from box["error"]


def settings_for(fake: FakeIntune, **overrides: Any) -> IntuneSettings:
    """Client settings that point every URL at the fake."""
    values: dict[str, Any] = {
        "tenant": fake.tenant, "application_id": fake.client_id, "secret": fake.client_secret,
        "login_url": fake.base_url, "graph_url": fake.base_url, "timeout_seconds": 1.0,
        "provider_name_and_version": "scep-fast-tests/1.0",
    }
    values.update(overrides)
    return IntuneSettings(**values)
