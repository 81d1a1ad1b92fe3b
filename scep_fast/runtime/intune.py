"""Microsoft Intune as an external validator and a notification sink.

Intune hands each managed device an encrypted, signed SCEP challenge; only
Intune can tell whether it is good. A third-party SCEP server therefore
posts every CSR to Intune's ``ScepRequestValidationFEService`` before it
issues, and tells the same service afterwards what became of the request.
The exchange follows Microsoft's reference client (github
microsoft/Intune-Resource-Access, src/CsrValidation, Java and C#) and the
pages "Use APIs to add third-party CAs for SCEP to Intune" and "Add partner
certification authority in Intune using SCEP" on learn.microsoft.com:

- OAuth 2.0 client credentials at ``{login}/{tenant}/oauth2/v2.0/token``,
  one token per scope: Microsoft Graph (service discovery, application
  permission Application.Read.All) and the Intune API (application
  permission scep_challenge_provider).
- Service discovery: ``GET {graph}/v1.0/servicePrincipals/appId={Intune app
  id}/endpoints`` lists the tenant's Intune services; the entry whose
  ``providerName`` is ``ScepRequestValidationFEService`` gives the base URI.
- ``POST {uri}/ScepActions/validateRequest`` (``successNotification``,
  ``failureNotification``) with the headers ``Authorization: Bearer``,
  ``api-version: 2018-02-20``, ``client-request-id`` (a fresh UUID, for
  correlation with Microsoft support) and the provider's name and version;
  the answer is ``{"code": ..., "errorDescription": ...}`` where only
  ``Success`` means success.

One :class:`IntuneClient` is shared by the validator and the notifier: it
caches the tokens and the discovered URI for all the requests in flight
(the URI is looked up again every ``discovery_max_age_seconds``, and at once
when a call finds it gone).
It never logs or puts in an exception the secret, a token, a challenge or a CSR.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import re
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import trio
from cryptography import x509

from scep_fast import __version__
from scep_fast.runtime.http_client import AnswerTooLarge, ConnectFailed, HttpClient, HttpError
from scep_fast.service.notices import Notice, NoticeRejected
from scep_fast.service.validation import ValidationFailed, ValidationRequest, Verdict

__all__ = [
    "E_UNEXPECTED",
    "REFUSAL_CODES",
    "SUCCESS_CODE",
    "IntuneClient",
    "IntuneError",
    "IntuneNotifier",
    "IntuneSettings",
    "IntuneValidator",
    "ScepActionResult",
]

log = logging.getLogger("scep_fast.intune")

BYTES = 1
SECONDS = 1.0

# After a failed periodic look-up of the service, the next one is this much later.
DISCOVERY_RETRY_SECONDS = 60 * SECONDS
# The Intune service principal's application id, the same in every tenant.
INTUNE_APP_ID = "0000000a-0000-0000-c000-000000000000"
VALIDATION_SERVICE_NAME = "ScepRequestValidationFEService"
VALIDATE_PATH = "ScepActions/validateRequest"
SUCCESS_PATH = "ScepActions/successNotification"
FAILURE_PATH = "ScepActions/failureNotification"

SUCCESS_CODE = "Success"
# The codes the reference client knows besides Success (its ErrorCode enum,
# less "Unknown", which it uses for a code it cannot parse).
REFUSAL_CODES = frozenset({
    "CertificateRequestDecodingFailed",
    "ChallengePasswordMissing",
    "ChallengeDeserializationError",
    "ChallengeDecryptionError",
    "ChallengeDecodingError",
    "ChallengeInvalidTimestamp",
    "ChallengeExpired",
    "SubjectNameMissing",
    "SubjectNameMismatch",
    "SubjectAltNameMissing",
    "SubjectAltNameMismatch",
    "KeyUsageMismatch",
    "KeyLengthMismatch",
    "EnhancedKeyUsageMissing",
    "EnhancedKeyUsageMismatch",
    "AadKeyIdentifierListMissing",
    "RegisteredKeyMismatch",
    "SigningCertThumbprintMismatch",
    "ScepProfileNoLongerTargetedToTheClient",
    "SignatureValidationFailed",
    "BadCertificateRequestIdInChallenge",
    "BadDeviceIdInChallenge",
    "BadUserIdInChallenge",
})

# failureNotification's hResult is an HRESULT (MS-ERREF 2.1), a signed
# 32-bit value; the reference client's example reports E_UNEXPECTED.
E_UNEXPECTED = 0x8000FFFF - (1 << 32)
MAX_ERROR_DESCRIPTION_CHARS = 255  # the reference client's documented maximum

# Tenant ids are GUIDs or domain names; anything else could bend the token URL.
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,253}")
_TOKEN = re.compile(r"[\x21-\x7e]{1,16384}")
_SHOWN_CODE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True, slots=True)
class IntuneSettings:
    """How to reach a tenant's Intune. Every base URL can be changed, for tests
    and for the national clouds."""

    tenant: str                  # the tenant id (GUID) or its domain, name.onmicrosoft.com
    application_id: str          # the client id of the app registration
    secret: str = field(repr=False)  # its client secret: never logged
    # Sent as callerInfo and as user agent; Intune shows it to its engineers.
    provider_name_and_version: str = f"scep-fast/{__version__}"
    login_url: str = "https://login.microsoftonline.com"
    graph_url: str = "https://graph.microsoft.com"
    graph_api_version: str = "v1.0"
    intune_app_id: str = INTUNE_APP_ID
    # The Intune API's resource identifier. The reference client appends
    # "/.default" to it, trailing slash included: for a v1.0 resource Entra ID
    # takes everything before the last slash as the audience, and this one's
    # ends in a slash ("Scopes to request" in Entra ID's daemon scenario).
    intune_resource_url: str = "https://api.manage.microsoft.com/"
    service_name: str = VALIDATION_SERVICE_NAME
    service_api_version: str = "2018-02-20"
    # The most one validation or notification may take, every round trip
    # (token, discovery, the call, its one retry) included.
    timeout_seconds: float = 10 * SECONDS
    # A token is replaced this long before it expires (at most half its life).
    token_refresh_margin_seconds: float = 300 * SECONDS
    # The service's URI is looked up again after this long, besides whenever a
    # call finds it gone: a long-running worker then follows a tenant moved to
    # another front end before a call has to fail on the old one.
    discovery_max_age_seconds: float = 3600 * SECONDS
    max_answer_bytes: int = 64 * 1024 * BYTES
    # Reported in successNotification; empty: the issuing CA's name.
    ca_configuration: str = ""
    certificate_authority: str = ""

    def __post_init__(self) -> None:
        # A secret file written with echo ends in a newline; Entra ID secrets never do.
        if isinstance(self.secret, str):
            object.__setattr__(self, "secret", self.secret.rstrip("\r\n"))
        if not _TENANT.fullmatch(self.tenant):
            raise ValueError("tenant must be a tenant id or domain name")
        for name in ("application_id", "secret", "provider_name_and_version",
                     "graph_api_version", "intune_app_id", "service_name",
                     "service_api_version"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or value != value.strip():
                raise ValueError(f"{name} must be a non-empty str without surrounding spaces")
        for name in ("login_url", "graph_url", "intune_resource_url"):
            url = urllib.parse.urlsplit(getattr(self, name))
            if url.scheme not in ("https", "http") or not url.hostname:
                raise ValueError(f"{name} must be an http(s) URL")
        if not (0 < self.timeout_seconds <= 300):
            raise ValueError("timeout_seconds must be in (0, 300]")
        if not (0 <= self.token_refresh_margin_seconds <= 3600):
            raise ValueError("token_refresh_margin_seconds must be in [0, 3600]")
        if not (60 <= self.discovery_max_age_seconds <= 7 * 86400):
            raise ValueError("discovery_max_age_seconds must be in [60, 604800]")
        if not (1024 <= self.max_answer_bytes <= 16 * 1024 * 1024):
            raise ValueError("max_answer_bytes must be between 1 KiB and 16 MiB")

    @property
    def token_url(self) -> str:
        return f"{self.login_url.rstrip('/')}/{self.tenant}/oauth2/v2.0/token"

    @property
    def graph_scope(self) -> str:
        return f"{self.graph_url.rstrip('/')}/.default"

    @property
    def intune_scope(self) -> str:
        return f"{self.intune_resource_url}/.default"

    @property
    def discovery_url(self) -> str:
        return (f"{self.graph_url.rstrip('/')}/{self.graph_api_version}"
                f"/servicePrincipals/appId={self.intune_app_id}/endpoints")


class IntuneError(Exception):
    """An exchange with Intune (or its token endpoint or Graph) failed.

    ``definitive``: the service understood and refused the call for good (a
    4xx other than 401, 404, 408 and 429); retrying the same call is useless.
    ``unreachable``: no connection could be made (nothing was sent).
    The text names the step and the HTTP status, never a credential.
    """

    def __init__(self, message: str, *, status: int | None = None,
                 definitive: bool = False, unreachable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.definitive = definitive
        self.unreachable = unreachable


@dataclass(frozen=True, slots=True)
class ScepActionResult:
    """What a ScepActions call answered."""

    code: str
    description: str
    activity_id: str  # the client-request-id it was sent with

    @property
    def success(self) -> bool:
        return self.code == SUCCESS_CODE


@dataclass(slots=True)
class _Token:
    value: str = field(repr=False)
    refresh_at: float


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes = field(repr=False)

    def json(self, what: str) -> dict[str, Any]:
        try:
            doc = json.loads(self.body)
        except ValueError:
            raise IntuneError(f"{what}: the answer is not JSON", status=self.status) from None
        if not isinstance(doc, dict):
            raise IntuneError(f"{what}: the answer is not a JSON object", status=self.status)
        return doc


def _definitive(status: int) -> bool:
    return 400 <= status < 500 and status not in (401, 404, 408, 429)


def _shown(code: object) -> str:
    """A service-supplied code, fit for a log line or a refusal text."""
    if isinstance(code, str) and _SHOWN_CODE.fullmatch(code):
        return code
    return "<unprintable>"


class IntuneClient:
    """A shared client for one tenant's ScepRequestValidationFEService.

    Use it as an async context manager under trio, or call :meth:`aclose`.
    ``http``: the HTTP client to share with other integrations (it is left
    open; ``timeout_seconds`` bounds each call); ``clock``: monotonic
    seconds, for token expiry (tests move it).
    """

    def __init__(self, settings: IntuneSettings, http: HttpClient | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._own_http = http is None
        self._http = http if http is not None else HttpClient()
        self._clock = clock
        self._tokens: dict[str, _Token] = {}
        self._token_locks: dict[str, trio.Lock] = {}
        self._service_url: str | None = None
        self._discovered_at = 0.0
        self._discovery_lock = trio.Lock()

    async def __aenter__(self) -> IntuneClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    # --- the three ScepActions ---

    async def validate_request(self, transaction_id: str, csr_der: bytes) -> ScepActionResult:
        """Asks Intune whether the CSR (and the challenge in it) is good."""
        return await self._scep_action(VALIDATE_PATH, transaction_id, {
            "request": {
                "transactionId": transaction_id,
                "certificateRequest": base64.b64encode(csr_der).decode("ascii"),
                "callerInfo": self.settings.provider_name_and_version,
            }})

    async def success_notification(self, transaction_id: str, csr_der: bytes, *,
                                   thumbprint: str, serial_number: str, expires_utc: str,
                                   issuing_authority: str, ca_configuration: str,
                                   certificate_authority: str) -> ScepActionResult:
        """Tells Intune that a certificate was issued for the request."""
        return await self._scep_action(SUCCESS_PATH, transaction_id, {
            "notification": {
                "transactionId": transaction_id,
                "certificateRequest": base64.b64encode(csr_der).decode("ascii"),
                "certificateThumbprint": thumbprint,
                "certificateSerialNumber": serial_number,
                "certificateExpirationDateUtc": expires_utc,
                "issuingCertificateAuthority": issuing_authority,
                "callerInfo": self.settings.provider_name_and_version,
                "caConfiguration": ca_configuration,
                "certificateAuthority": certificate_authority,
            }})

    async def failure_notification(self, transaction_id: str, csr_der: bytes, *,
                                   hresult: int, description: str) -> ScepActionResult:
        """Tells Intune that no certificate will be issued for the request."""
        if not -(1 << 31) <= hresult < (1 << 31):
            raise ValueError("hresult must be a signed 32-bit value")
        return await self._scep_action(FAILURE_PATH, transaction_id, {
            "notification": {
                "transactionId": transaction_id,
                "certificateRequest": base64.b64encode(csr_der).decode("ascii"),
                "hResult": hresult,
                "errorDescription": (description or "refused")[:MAX_ERROR_DESCRIPTION_CHARS],
                "callerInfo": self.settings.provider_name_and_version,
            }})

    async def _scep_action(self, path: str, transaction_id: str,
                           body: dict[str, Any]) -> ScepActionResult:
        content = json.dumps(body, separators=(",", ":")).encode()
        activity_id = str(uuid.uuid4())
        try:
            with trio.fail_after(self.settings.timeout_seconds):
                answer = await self._post_to_service(path, content, activity_id)
        except trio.TooSlowError:
            raise IntuneError(f"{path}: no answer within {self.settings.timeout_seconds} s "
                              f"(client-request-id {activity_id})") from None
        if not 200 <= answer.status < 300:
            raise IntuneError(f"{path}: HTTP {answer.status} (client-request-id {activity_id})",
                              status=answer.status, definitive=_definitive(answer.status))
        doc = answer.json(path)
        code, description = doc.get("code"), doc.get("errorDescription")
        if not isinstance(code, str) or not code:
            raise IntuneError(f"{path}: the answer has no code", status=answer.status)
        if description is not None and not isinstance(description, str):
            raise IntuneError(f"{path}: errorDescription is not a string", status=answer.status)
        result = ScepActionResult(code=code, description=description or "",
                                  activity_id=activity_id)
        # Debug only: the request's own log line says how it ended.
        log.debug("intune call", extra={"fields": {
            "action": path.rsplit("/", 1)[-1], "transaction_id": transaction_id,
            "client_request_id": activity_id, "code": _shown(code)}})
        return result

    async def _post_to_service(self, path: str, content: bytes, activity_id: str) -> _Answer:
        """POSTs to the discovered service: once more with a new token after a
        401, once more after rediscovery when the service is gone (404 or no
        connection): the service may have moved."""
        refreshed = rediscovered = False
        while True:
            base = await self._service()
            token = await self._token(self.settings.intune_scope)
            headers = {
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/json",
                "Accept": "application/json",
                "api-version": self.settings.service_api_version,
                "client-request-id": activity_id,
                "User-Agent": self.settings.provider_name_and_version,
                # Quirk(reference client): it names its user agent header
                # "UserAgent"; we send it under both names.
                "UserAgent": self.settings.provider_name_and_version,
            }
            url = f"{base.rstrip('/')}/{path}"
            try:
                answer = await self._exchange("POST", url, headers=headers, content=content,
                                              what=path)
            except IntuneError as e:
                if not e.unreachable or rediscovered:
                    raise
                self._forget_service(base)
                rediscovered = True
                continue
            if answer.status == 401 and not refreshed:
                self._forget_token(self.settings.intune_scope, token)
                refreshed = True
                continue
            if answer.status == 404 and not rediscovered:
                self._forget_service(base)
                rediscovered = True
                continue
            return answer

    # --- tokens ---

    async def _token(self, scope: str) -> str:
        cached = self._tokens.get(scope)
        if cached is not None and self._clock() < cached.refresh_at:
            return cached.value
        # One request per scope at a time: a burst of validations after
        # expiry waits for one new token instead of fetching one each.
        lock = self._token_locks.setdefault(scope, trio.Lock())
        async with lock:
            cached = self._tokens.get(scope)
            if cached is not None and self._clock() < cached.refresh_at:
                return cached.value
            token = await self._fetch_token(scope)
            self._tokens[scope] = token
            return token.value

    def _forget_token(self, scope: str, value: str) -> None:
        # Another task may have replaced it already; keep that one.
        cached = self._tokens.get(scope)
        if cached is not None and cached.value == value:
            del self._tokens[scope]

    async def _fetch_token(self, scope: str) -> _Token:
        form = {
            "grant_type": "client_credentials",
            "client_id": self.settings.application_id,
            "client_secret": self.settings.secret,
            "scope": scope,
        }
        started = self._clock()
        answer = await self._exchange(
            "POST", self.settings.token_url, what="token",
            headers={"Accept": "application/json",
                     "Content-Type": "application/x-www-form-urlencoded",
                     "client-request-id": str(uuid.uuid4())},
            content=urllib.parse.urlencode(form).encode(),
        )
        if answer.status != 200:
            # The error code (invalid_client...) helps; the rest may echo input.
            try:
                error = _shown(answer.json("token").get("error"))
            except IntuneError:
                error = "<not JSON>"
            raise IntuneError(f"token: HTTP {answer.status} ({error})", status=answer.status)
        doc = answer.json("token")
        value, lifetime = doc.get("access_token"), doc.get("expires_in")
        # It goes into a header: printable ASCII, no spaces, a sane length.
        if not isinstance(value, str) or not _TOKEN.fullmatch(value):
            raise IntuneError("token: no usable access_token in the answer")
        if str(doc.get("token_type", "Bearer")).lower() != "bearer":
            raise IntuneError("token: not a bearer token")
        # Azure AD v1 sent expires_in as a string; v2 sends a number.
        try:
            seconds = float(lifetime) if isinstance(lifetime, int | float | str) else math.nan
        except ValueError:
            seconds = math.nan
        if not (seconds > 0 and math.isfinite(seconds)):
            raise IntuneError("token: no usable expires_in in the answer")
        margin = min(self.settings.token_refresh_margin_seconds, seconds / 2)
        return _Token(value=value, refresh_at=started + seconds - margin)

    # --- service discovery ---

    async def _service(self) -> str:
        if self._service_url is not None and not self._discovery_due():
            return self._service_url
        async with self._discovery_lock:
            if self._service_url is None or self._discovery_due():
                self._service_url = await self._rediscover(self._service_url)
            return self._service_url

    def _discovery_due(self) -> bool:
        return self._clock() - self._discovered_at >= self.settings.discovery_max_age_seconds

    async def _rediscover(self, known: str | None) -> str:
        """The service's URI, looked up again. When the look-up fails and a URI is
        known, that one is kept (it still answered: a call that finds it gone
        forgets it) and the look-up is tried again in a minute."""
        try:
            url = await self._discover()
        except IntuneError as e:
            if known is None:
                raise
            log.warning("intune service discovery failed; the known service is kept",
                        extra={"fields": {"error": str(e), "uri": known}})
            self._discovered_at = (self._clock() - self.settings.discovery_max_age_seconds
                                   + DISCOVERY_RETRY_SECONDS)
            return known
        self._discovered_at = self._clock()
        return url

    def _forget_service(self, url: str) -> None:
        if self._service_url == url:
            self._service_url = None
            log.info("intune service unreachable; it will be discovered again",
                     extra={"fields": {"uri": url}})

    async def _discover(self) -> str:
        scope = self.settings.graph_scope
        for attempt in (1, 2):
            token = await self._token(scope)
            answer = await self._exchange(
                "GET", self.settings.discovery_url, what="discovery",
                headers={"Authorization": f"Bearer {token}", "Accept": "application/json",
                         "client-request-id": str(uuid.uuid4())})
            if answer.status == 401 and attempt == 1:
                self._forget_token(scope, token)
                continue
            break
        if answer.status != 200:
            raise IntuneError(f"discovery: HTTP {answer.status}", status=answer.status)
        endpoints = answer.json("discovery").get("value")
        if not isinstance(endpoints, list):
            raise IntuneError("discovery: the answer has no list of endpoints")
        wanted = self.settings.service_name.lower()
        for endpoint in endpoints:
            if not isinstance(endpoint, dict):
                continue
            # The reference client takes providerName, serviceName for the old AAD Graph.
            name = endpoint.get("providerName") or endpoint.get("serviceName")
            uri = endpoint.get("uri")
            if isinstance(name, str) and name.lower() == wanted and isinstance(uri, str):
                parsed = urllib.parse.urlsplit(uri)
                # The Intune token goes there: no plain HTTP unless Graph itself
                # is reached that way (a test's fake).
                schemes = ("https", "http") if self.settings.graph_url.startswith(
                    "http:") else ("https",)
                if parsed.scheme not in schemes or not parsed.hostname:
                    raise IntuneError("discovery: the service URI is not an https URL")
                log.info("intune service discovered", extra={"fields": {
                    "service": self.settings.service_name, "uri": uri}})
                return uri
        raise IntuneError(f"discovery: the tenant lists no {self.settings.service_name}")

    # --- HTTP ---

    async def _exchange(self, method: str, url: str, *, what: str, headers: dict[str, str],
                        content: bytes | None = None) -> _Answer:
        """One request; the answer's body read up to ``max_answer_bytes``.
        A transport error becomes IntuneError (``unreachable`` when no
        connection could be made)."""
        limit = self.settings.max_answer_bytes
        try:
            response = await self._http.request(method, url, headers=headers,
                                                body=content or b"", max_answer_bytes=limit)
        except AnswerTooLarge:
            raise IntuneError(f"{what}: answer over {limit} bytes") from None
        except ConnectFailed:
            raise IntuneError(f"{what}: cannot connect to {urllib.parse.urlsplit(url).hostname}",
                              unreachable=True) from None
        except HttpError as e:
            raise IntuneError(f"{what}: {type(e).__name__}") from None
        return _Answer(response.status, response.body)


def _reason(code: str) -> str:
    return f"Intune refused the request: {code}"


class IntuneValidator:
    """Puts every enrollment to Intune (implements Validator).

    A refusal code Intune documents refuses the request with the code as
    reason; anything else that is not Success (an error, a timeout, an
    unknown code) raises ValidationFailed, which refuses it too.
    """

    name = "intune"

    def __init__(self, client: IntuneClient) -> None:
        self.client = client

    async def validate(self, request: ValidationRequest) -> Verdict:
        try:
            result = await self.client.validate_request(request.transaction_id, request.csr_der)
        except IntuneError as e:
            raise ValidationFailed(f"intune: {e}") from None
        if result.success:
            return Verdict(allow=True)
        if result.code in REFUSAL_CODES:
            return Verdict(allow=False, reason=_reason(result.code))
        raise ValidationFailed(f"intune: unexpected code {_shown(result.code)} "
                               f"(client-request-id {result.activity_id})")


def _serial_hex(serial: int) -> str:
    """The serial as Windows shows it: the DER INTEGER's bytes in uppercase
    hexadecimal (a leading 00 kept when the high bit is set)."""
    return serial.to_bytes(serial.bit_length() // 8 + 1, "big", signed=True).hex().upper()


def _utc(epoch_seconds: int) -> str:
    """ISO 8601 UTC with milliseconds, the form the reference client documents."""
    moment = datetime.fromtimestamp(epoch_seconds, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class IntuneNotifier:
    """Reports issued and refused enrollments to Intune (implements Notifier).

    Issued: successNotification with the certificate's SHA-1 thumbprint,
    serial, expiry and issuer. Refused: failureNotification with an HRESULT
    (``hresult``, E_UNEXPECTED unless told) and the refusal's text.
    """

    sink = "intune"
    events = frozenset({"issued", "refused"})

    def __init__(self, client: IntuneClient, *, hresult: int = E_UNEXPECTED) -> None:
        if type(hresult) is not int or not -(1 << 31) <= hresult < (1 << 31):
            raise ValueError("hresult must be a signed 32-bit value")
        self.client = client
        self.hresult = hresult

    async def deliver(self, notice: Notice) -> None:
        if notice.event not in self.events:
            raise NoticeRejected(f"intune takes no {notice.event!r} notices")
        doc = notice.document()
        try:
            transaction_id = str(doc["transaction_id"])
            csr_der = base64.b64decode(doc["csr"], validate=True)
        except (KeyError, TypeError, ValueError):
            raise NoticeRejected("intune: the event has no transaction_id or csr") from None
        try:
            if notice.event == "issued":
                result = await self._issued(doc, transaction_id, csr_der)
            else:
                reason = str(doc.get("reason") or doc.get("fail_info") or "refused")
                result = await self.client.failure_notification(
                    transaction_id, csr_der, hresult=self.hresult, description=reason)
        except IntuneError as e:
            if e.definitive:
                raise NoticeRejected(f"intune: {e}") from None
            raise
        if not result.success:
            # Intune read the notice and answered with a refusal code: sending
            # the same notice again gets the same answer.
            raise NoticeRejected(f"intune: {notice.event} notice refused with code "
                                 f"{_shown(result.code)} (client-request-id "
                                 f"{result.activity_id})")

    async def _issued(self, doc: dict[str, Any], transaction_id: str,
                      csr_der: bytes) -> ScepActionResult:
        try:
            der = base64.b64decode(doc["certificate"], validate=True)
            certificate = x509.load_der_x509_certificate(der)
            not_after = int(doc["not_after"])
        except (KeyError, TypeError, ValueError):
            raise NoticeRejected("intune: the issued event has no usable certificate") from None
        issuer = certificate.issuer.rfc4514_string()
        settings = self.client.settings
        return await self.client.success_notification(
            transaction_id, csr_der,
            thumbprint=hashlib.sha1(der, usedforsecurity=False).hexdigest().upper(),
            serial_number=_serial_hex(certificate.serial_number),
            expires_utc=_utc(not_after),
            issuing_authority=issuer,
            ca_configuration=settings.ca_configuration or issuer,
            certificate_authority=settings.certificate_authority or issuer,
        )
