"""The MDM integrations the configuration turns on: validators and notification sinks.

``[validation.webhook]`` and ``[validation.intune]`` each give a validator
(asked before issuance) and a notification sink (told what happened,
through the outbox). Both share one HTTP client per worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scep_fast.runtime.config import Config, ConfigError, notice_sinks
from scep_fast.runtime.http_client import HttpClient
from scep_fast.runtime.intune import (
    IntuneClient,
    IntuneNotifier,
    IntuneSettings,
    IntuneValidator,
)
from scep_fast.runtime.private_file import PrivateFileError, read_private_file
from scep_fast.runtime.webhook import WebhookNotifier, WebhookSettings, WebhookValidator
from scep_fast.service.notices import Notifier
from scep_fast.service.validation import Validator

MAX_SECRET_BYTES = 4096


def _secret(config: Config, section: str) -> bytes:
    try:
        secret = read_private_file(config.path(section, "secret_file"), MAX_SECRET_BYTES)
    except PrivateFileError as e:
        raise ConfigError(f"{section}.secret_file: {e}") from None
    if not secret:
        raise ConfigError(f"{section}.secret_file: the file is empty")
    return secret


def webhook_settings(config: Config) -> WebhookSettings | None:
    """The webhook's settings, with its secret; None when it is not configured."""
    webhook = config.values["validation.webhook"]
    if not (webhook["url"] or webhook["notify_url"]):
        return None
    try:
        return WebhookSettings(url=str(webhook["url"]), notify_url=str(webhook["notify_url"]),
                               secret=_secret(config, "validation.webhook"),
                               timeout_seconds=float(config.get("validation", "timeout_seconds")),
                               events=frozenset(webhook["events"]))
    except ValueError as e:
        raise ConfigError(f"validation.webhook: {e}") from None


def intune_settings(config: Config) -> IntuneSettings | None:
    """Intune's settings, with the application's secret; None when it is off."""
    intune = config.values["validation.intune"]
    if not intune["enabled"]:
        return None
    try:
        return IntuneSettings(
            tenant=str(intune["tenant"]), application_id=str(intune["application_id"]),
            secret=_secret(config, "validation.intune").decode("utf-8"),
            login_url=str(intune["login_url"]), graph_url=str(intune["graph_url"]),
            timeout_seconds=float(config.get("validation", "timeout_seconds")))
    except ValueError as e:  # UnicodeDecodeError among them: the text names no content
        raise ConfigError(f"validation.intune: {e}") from None


def check(config: Config) -> None:
    """Refuses to start with an integration that cannot work (a secret file missing,
    readable by others or too short, a malformed tenant)."""
    webhook_settings(config)
    intune_settings(config)


@dataclass
class Integrations:
    """One worker's validators and notifiers, over one HTTP client."""

    http: HttpClient
    validators: list[Validator] = field(default_factory=list)
    notifiers: dict[str, Notifier] = field(default_factory=dict)

    async def aclose(self) -> None:
        await self.http.aclose()


def build(config: Config) -> Integrations:
    http = HttpClient(max_connections=int(config.get("validation", "max_in_flight")))
    integrations = Integrations(http)
    sinks = notice_sinks(config)
    settings = webhook_settings(config)
    if settings is not None:
        if settings.url:
            integrations.validators.append(WebhookValidator(settings, http))
        if "webhook" in sinks:
            integrations.notifiers["webhook"] = WebhookNotifier(settings, http)
    intune = intune_settings(config)
    if intune is not None:
        client = IntuneClient(intune, http)
        integrations.validators.append(IntuneValidator(client))
        integrations.notifiers["intune"] = IntuneNotifier(client)
    return integrations
