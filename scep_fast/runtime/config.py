"""`DIR/scep-fast.toml`: read and checked strictly at every start.

An unknown section or key, a value of the wrong type or out of range is a
ConfigError that names the key: a typo must never silently fall back to a
default on a server that issues certificates.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from scep_fast.service.notices import EVENTS
from scep_fast.service.profile import (
    EXTENDED_KEY_USAGES,
    KEY_TYPES,
    KEY_USAGES,
    SAN_TYPES,
    Profile,
)

CONFIG_NAME = "scep-fast.toml"
KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


class ConfigError(Exception):
    """The configuration cannot be used; the text names the key."""


@dataclass(frozen=True, slots=True)
class _Key:
    kind: type
    default: Any
    check: Callable[[Any], bool] = lambda _v: True
    rule: str = ""
    # The value may hold a secret (a URL with a password): errors never echo it.
    secret: bool = False


def _between(lo: float, hi: float) -> Callable[[Any], bool]:
    return lambda v: lo <= v <= hi


def _ledger_url(url: str) -> bool:
    if url == "":
        return True
    if not url.startswith(("postgresql://", "postgres://")):
        return False
    try:
        return urlsplit(url).password is None and "password=" not in urlsplit(url).query
    except ValueError:
        return False


def _list_of(allowed: tuple[str, ...]) -> Callable[[Any], bool]:
    return lambda v: all(isinstance(x, str) and x in allowed for x in v)


def _http_url(url: str) -> bool:
    return url == "" or (url.startswith(("http://", "https://")) and len(url) <= 2048)


# section -> key -> how it is checked. The defaults are what `init` writes.
SCHEMA: dict[str, dict[str, _Key]] = {
    "server": {
        "bind": _Key(str, "127.0.0.1:8080", lambda v: ":" in v, "HOST:PORT"),
        # 0: one worker process per CPU.
        "workers": _Key(int, 0, _between(0, 256), "0 to 256"),
        "max_body_bytes": _Key(int, 256 * KIB, _between(4 * KIB, 16 * MIB), "4 KiB to 16 MiB"),
        # Request lines carry the whole base64 message on GET.
        "max_request_line_bytes": _Key(int, 128 * KIB, _between(64 * KIB, 16 * MIB),
                                       "64 KiB to 16 MiB"),
        # The longest silence while a request is being read.
        "read_timeout_seconds": _Key(float, 10.0, _between(0.5, 600), "0.5 to 600"),
        # How long a request's whole body may take, however steadily it trickles.
        "body_timeout_seconds": _Key(float, 30.0, _between(0.5, 3600), "0.5 to 3600"),
        # How long an idle keep-alive connection stays open; also the deadline
        # for a request's headers, so a trickling client cannot hold a connection.
        "keep_alive_seconds": _Key(float, 15.0, _between(1, 3600), "1 to 3600"),
        # Connections the kernel holds for each listening socket (SCEP, metrics,
        # admin) until they are accepted; Linux caps it at net.core.somaxconn.
        "listen_backlog": _Key(int, 4096, _between(1, 65535), "1 to 65535"),
    },
    "pki": {
        # "ra": an RA certificate signs replies and decrypts requests;
        # "ca": the CA certificate does both (an RSA CA only).
        "mode": _Key(str, "ra", lambda v: v in ("ra", "ca"), '"ra" or "ca"'),
        "ca_cert": _Key(str, "ca.pem"),
        # A key is a file in the directory, or an RFC 7512 URI naming a private
        # key in a PKCS#11 token ("pkcs11:token=scep;object=ca-key").
        "ca_key": _Key(str, "ca.key"),
        "ra_cert": _Key(str, "ra.pem"),
        "ra_key": _Key(str, "ra.key"),
        # An NDES-style RA pair (`init --ra-pair`): a second RA certificate,
        # keyEncipherment only, that requests may be enveloped to, while the
        # RA above (digitalSignature only) signs replies. Both empty: one RA
        # with both usages. Its key is a file (not a token URI).
        "ra_encryption_cert": _Key(str, ""),
        "ra_encryption_key": _Key(str, ""),
        # Token keys: the PKCS#11 module (a shared library) and the file, mode
        # 0600, holding the PIN that logs in to the token.
        "pkcs11_module": _Key(str, "", lambda v: v == "" or v.startswith("/"),
                              "an absolute path"),
        "pkcs11_pin_file": _Key(str, ""),
    },
    "enrollment": {
        # The static challenge password lives in its own 0600 file, so the
        # config can be read, copied and diffed without revealing it.
        "challenge_file": _Key(str, "challenge"),
        # Single DES and MD5 are forbidden by RFC 8894; some old clients
        # (micromdm's scepclient, sscep without caps) still send them.
        "allow_legacy_algorithms": _Key(bool, False),
        "refuse_sha1": _Key(bool, False),
        "refuse_3des": _Key(bool, False),
        # The profile of requests that present the static challenge.
        "default_profile": _Key(str, "default"),
        # Renewal (RenewalReq, or a PKCSReq signed by a certificate we issued)
        # is accepted only this close to the old certificate's expiry; 0: any time.
        "renewal_window_days": _Key(int, 0, _between(0, 3650), "0 to 3650"),
        # Revoke the old certificate (reason superseded) when a renewal replaces it.
        "revoke_on_replace": _Key(bool, False),
    },
    "admin": {
        # The admin HTTP API (one-time challenges, pending requests); "" turns it off.
        "bind": _Key(str, "127.0.0.1:9814", lambda v: v == "" or ":" in v, 'HOST:PORT or ""'),
        "token_file": _Key(str, "admin-token"),
    },
    "ndes": {
        # GET /certsrv/mscep_admin/ on the admin address: a page in the shape of
        # Microsoft NDES's admin page, for MDMs that scrape one-time challenges
        # from it. Each authorised GET mints a single-use challenge.
        "enabled": _Key(bool, False),
        # "USER:PASSWORD" lines for HTTP Basic; mode 0600 or the server refuses to start.
        "credentials_file": _Key(str, "ndes-credentials"),
        # NDES keeps a password 60 minutes unless told otherwise.
        "challenge_ttl_seconds": _Key(int, 3600, _between(1, 86400), "1 to 86400"),
        # The profile that a challenge from the page grants.
        "profile": _Key(str, "default"),
        # Where the page is served: "admin" (the admin address) or "scep" (the
        # SCEP address, where NDES itself has it; put TLS in front of it).
        "bind": _Key(str, "admin", lambda v: v in ("admin", "scep"), '"admin" or "scep"'),
    },
    "crl": {
        # Base URL at which clients reach this server; issued certificates name
        # their CRL under it ("" leaves the CRL distribution point out).
        "public_url": _Key(str, "", lambda v: v == "" or v.startswith(("http://", "https://")),
                           "an http:// or https:// URL"),
        "validity_hours": _Key(int, 168, _between(1, 8760), "1 to 8760"),
        # A fresh CRL is made when the current one has less than this left.
        "refresh_hours": _Key(int, 24, _between(1, 8760), "1 to 8760"),
    },
    "ledger": {
        # LMDB reserves this much address space; about 3 KiB per certificate,
        # so the default holds well over a million records.
        "map_size_bytes": _Key(int, 8 * GIB, _between(16 * MIB, 1024 * GIB), "16 MiB to 1 TiB"),
        # "": the embedded LMDB ledger in DIR/ledger. A postgresql:// URL: a
        # PostgreSQL database that several nodes share. The password stays out
        # of this file (which is read, copied and diffed): password_file, or
        # libpq's PGPASSFILE / PGPASSWORD.
        "url": _Key(str, "", _ledger_url, 'empty, or a postgresql:// URL without a password',
                    secret=True),
        # A file (relative to DIR, mode 0600) holding the database password.
        "password_file": _Key(str, ""),
        # Connections each process keeps to the database.
        "pool_size": _Key(int, 4, _between(1, 64), "1 to 64"),
    },
    "validation": {
        # Who checks the challenge password of a first enrollment: "local" (the
        # static secret, one-time challenges) or "validators" (the webhook or
        # Intune below; nothing is checked or spent here).
        "challenge": _Key(str, "local", lambda v: v in ("local", "validators"),
                          '"local" or "validators"'),
        # Each validator call; a request whose validator does not answer in
        # time is refused (FAILURE badRequest).
        "timeout_seconds": _Key(float, 5.0, _between(0.1, 60), "0.1 to 60"),
        # Validator calls in flight at once, per worker.
        "max_in_flight": _Key(int, 64, _between(1, 4096), "1 to 4096"),
    },
    "validation.webhook": {
        # POSTed every enrollment before issuance; "" asks no webhook.
        "url": _Key(str, "", _http_url, "empty, or an http:// or https:// URL"),
        # POSTed the notifications (issued, refused, revoked); "" sends none.
        "notify_url": _Key(str, "", _http_url, "empty, or an http:// or https:// URL"),
        # The HMAC-SHA256 key of both directions; a file of mode 0600 in DIR.
        "secret_file": _Key(str, "webhook-secret"),
        "events": _Key(list, list(EVENTS), _list_of(EVENTS), f"a list of {EVENTS}"),
    },
    "validation.intune": {
        # Microsoft Intune validates each enrollment (its challenge) and is told
        # of each certificate issued or refused ("Use a third-party CA with
        # Intune SCEP"). The application is registered in the tenant's Entra ID.
        "enabled": _Key(bool, False),
        "tenant": _Key(str, ""),
        "application_id": _Key(str, ""),
        # The application's client secret; a file of mode 0600 in DIR.
        "secret_file": _Key(str, "intune-secret"),
        # Microsoft's endpoints; tests point them elsewhere.
        "login_url": _Key(str, "https://login.microsoftonline.com", _http_url, "a URL"),
        "graph_url": _Key(str, "https://graph.microsoft.com", _http_url, "a URL"),
    },
    "outbox": {
        # How often each worker looks for notices due (besides right after a commit).
        "poll_seconds": _Key(float, 2.0, _between(0.05, 60), "0.05 to 60"),
        # A claimed notice is claimed again after this if its worker died.
        "lease_seconds": _Key(float, 60.0, _between(1, 3600), "1 to 3600"),
        # Each delivery attempt.
        "timeout_seconds": _Key(float, 10.0, _between(0.1, 120), "0.1 to 120"),
        # The longest pause between attempts (the back-off doubles up to it).
        "max_retry_seconds": _Key(float, 600.0, _between(1, 86400), "1 to 86400"),
        # A notice not delivered within this is dropped (counted and logged).
        "max_age_hours": _Key(float, 72.0, _between(0.01, 8760), "0.01 to 8760"),
        # While more notices than this wait (a sink down for long), refusals are
        # no longer noticed: devices sending refused requests, hostile ones
        # among them, cannot fill the ledger. Certificates and revocations are
        # always noticed.
        "max_notices": _Key(int, 100_000, _between(100, 100_000_000), "100 to 100000000"),
    },
    "batch": {
        "max_size": _Key(int, 32, _between(1, 1024), "1 to 1024"),
        # Under load a batch waits this long for more messages; a lone
        # request on an idle worker never waits.
        "window_seconds": _Key(float, 0.002, _between(0, 1), "0 to 1"),
        "queue_size": _Key(int, 1024, _between(1, 1_000_000), "1 to 1000000"),
        # A request that would wait longer than this for its batch gets 503
        # + Retry-After at once; 0 bounds the queue by queue_size only.
        "max_wait_seconds": _Key(float, 1.0, _between(0, 60), "0 to 60"),
    },
}


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


# [profiles.NAME] tables: one per certificate profile (see service/profile.py).
PROFILE_SCHEMA: dict[str, _Key] = {
    "validity_days": _Key(int, 365, _between(1, 3650), "1 to 3650"),
    "backdate_seconds": _Key(int, 600, _between(0, 86400), "0 to 86400"),
    "key_types": _Key(list, ["rsa", "ec"], _list_of(KEY_TYPES), f"a list of {KEY_TYPES}"),
    "min_rsa_bits": _Key(int, 2048, _between(2048, 16384), "2048 to 16384"),
    "san_types": _Key(list, ["dns", "email", "ip", "uri"], _list_of(tuple(SAN_TYPES)),
                      f"a list of {tuple(SAN_TYPES)}"),
    "san_pattern": _Key(str, "", lambda v: _compiles(v), "a valid regular expression"),
    "subject_template": _Key(str, ""),
    "key_usage": _Key(list, [], _list_of(KEY_USAGES), f"a list of {KEY_USAGES}"),
    "extended_key_usage": _Key(list, ["client_auth"], _list_of(EXTENDED_KEY_USAGES),
                               f"a list of {EXTENDED_KEY_USAGES}"),
    "include_chain": _Key(bool, False),
    "require_approval": _Key(bool, False),
    "allow_multiple_cn": _Key(bool, False),
    "renewal_may_drop_sans": _Key(bool, False),
}
_PROFILE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)
class Config:
    """The checked configuration of one scep-fast directory."""

    dir: Path
    values: dict[str, dict[str, Any]]

    def get(self, section: str, key: str) -> Any:
        return self.values[section][key]

    def path(self, section: str, key: str) -> Path:
        """A file named in the config, relative to the directory."""
        return self.dir / str(self.values[section][key])

    def profiles(self, crl_url: str | None = None) -> dict[str, Profile]:
        """The certificate profiles, each naming ``crl_url`` as its CRL distribution point."""
        return {name: _profile(name, table, crl_url)
                for name, table in self.values["profiles"].items()}

    @property
    def workers(self) -> int:
        configured = int(self.values["server"]["workers"])
        return configured or (os.cpu_count() or 1)


def _profile(name: str, p: dict[str, Any], crl_url: str | None) -> Profile:
    return Profile(
        name=name,
        validity_days=int(p["validity_days"]),
        backdate_seconds=int(p["backdate_seconds"]),
        key_types=tuple(p["key_types"]),
        min_rsa_bits=int(p["min_rsa_bits"]),
        san_types=tuple(p["san_types"]),
        san_pattern=str(p["san_pattern"]),
        subject_template=str(p["subject_template"]),
        key_usage=tuple(p["key_usage"]),
        extended_key_usage=tuple(p["extended_key_usage"]),
        include_chain=bool(p["include_chain"]),
        require_approval=bool(p["require_approval"]),
        allow_multiple_cn=bool(p["allow_multiple_cn"]),
        renewal_may_drop_sans=bool(p["renewal_may_drop_sans"]),
        crl_url=crl_url,
    )


def _check(section: str, key: str, value: Any) -> Any:
    return _check_value(f"{section}.{key}", SCHEMA[section][key], value)


def _check_value(where: str, spec: _Key, value: Any) -> Any:
    if spec.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, spec.kind) or (spec.kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {spec.kind.__name__}, got {value!r}")
    if not spec.check(value):
        shown = "the value" if spec.secret else repr(value)
        raise ConfigError(f"{where}: {shown} is out of range ({spec.rule})")
    return value


def default_profile() -> dict[str, Any]:
    return {k: (list(spec.default) if isinstance(spec.default, list) else spec.default)
            for k, spec in PROFILE_SCHEMA.items()}


def defaults() -> dict[str, dict[str, Any]]:
    values: dict[str, dict[str, Any]] = {
        s: {k: spec.default for k, spec in keys.items()} for s, keys in SCHEMA.items()}
    values["profiles"] = {}
    return values


def parse(text: str, directory: Path) -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{CONFIG_NAME}: {e}") from None
    values = defaults()
    profiles = raw.pop("profiles", {})
    if not isinstance(profiles, dict):
        raise ConfigError("profiles: expected tables [profiles.NAME]")
    for name, table in profiles.items():
        if _PROFILE_NAME.fullmatch(name) is None:
            raise ConfigError(f"profiles.{name}: a profile name is 1 to 64 of A-Z a-z 0-9 _ -")
        if not isinstance(table, dict):
            raise ConfigError(f"profiles.{name}: expected a table")
        profile = default_profile()
        for key, value in table.items():
            if key not in PROFILE_SCHEMA:
                raise ConfigError(f"profiles.{name}.{key}: unknown key")
            profile[key] = _check_value(f"profiles.{name}.{key}", PROFILE_SCHEMA[key], value)
        try:
            # What only a built profile can tell (a subject template that is
            # no name, say) is found now, not when a worker starts.
            _profile(name, profile, None)
        except ValueError as e:
            raise ConfigError(f"profiles.{name}: {e}") from None
        values["profiles"][name] = profile
    for section, table in _sections(raw).items():
        if section not in SCHEMA:
            raise ConfigError(f"{section}: unknown section (known: {', '.join(SCHEMA)})")
        if not isinstance(table, dict):
            raise ConfigError(f"{section}: expected a table")
        for key, value in table.items():
            if key not in SCHEMA[section]:
                raise ConfigError(f"{section}.{key}: unknown key")
            values[section][key] = _check(section, key, value)
    _check_token_keys(values["pki"])
    _check_validation(values)
    _check_outbox(values["outbox"])
    _check_ra_pair(values["pki"])
    values["profiles"].setdefault("default", default_profile())
    default = values["enrollment"]["default_profile"]
    if default not in values["profiles"]:
        raise ConfigError(f"enrollment.default_profile: no [profiles.{default}] table")
    ndes_profile = values["ndes"]["profile"]
    if ndes_profile not in values["profiles"]:
        raise ConfigError(f"ndes.profile: no [profiles.{ndes_profile}] table")
    return Config(dir=directory, values=values)


def _sections(raw: dict[str, Any]) -> dict[str, Any]:
    """The TOML's tables by section name, ``[validation.webhook]`` as "validation.webhook"."""
    sections: dict[str, Any] = {}
    for section, table in raw.items():
        if not isinstance(table, dict):
            sections[section] = table
            continue
        own = {}
        for key, value in table.items():
            if isinstance(value, dict) and f"{section}.{key}" in SCHEMA:
                sections[f"{section}.{key}"] = value
            else:
                own[key] = value
        sections[section] = own
    return sections


def _check_validation(values: dict[str, Any]) -> None:
    intune = values["validation.intune"]
    if intune["enabled"] and not (intune["tenant"] and intune["application_id"]):
        raise ConfigError("validation.intune: tenant and application_id are needed")
    if values["validation"]["challenge"] == "validators" and not (
            values["validation.webhook"]["url"] or values["validation.intune"]["enabled"]):
        raise ConfigError('validation.challenge = "validators" needs a validator: '
                          "validation.webhook.url or validation.intune.enabled")


def _check_outbox(outbox: dict[str, Any]) -> None:
    # A round delivers its notices (each within timeout_seconds) and then settles
    # them; a lease that ran out before would let another worker deliver the same
    # notice at the same time and both write its outcome.
    if outbox["lease_seconds"] < 2 * outbox["timeout_seconds"]:
        raise ConfigError("outbox.lease_seconds: must be at least twice "
                          "outbox.timeout_seconds (a claim must outlast its delivery)")


# Intune's API has a success and a failure notification, nothing for revocations.
INTUNE_EVENTS = frozenset({"issued", "refused"})


def notice_sinks(config: Config) -> dict[str, frozenset[str]]:
    """Each configured notification sink and the events it is sent."""
    sinks: dict[str, frozenset[str]] = {}
    webhook = config.values["validation.webhook"]
    if webhook["notify_url"]:
        sinks["webhook"] = frozenset(webhook["events"])
    if config.get("validation.intune", "enabled"):
        sinks["intune"] = INTUNE_EVENTS
    return sinks


def validation_configured(config: Config) -> bool:
    """Whether any external validator is asked before issuance."""
    return bool(config.get("validation.webhook", "url")
                or config.get("validation.intune", "enabled"))


def _check_token_keys(pki: dict[str, Any]) -> None:
    """A key URI needs the module and the PIN file, and must name a private key alone."""
    from scep_fast.runtime.keys import KeyLoadError, check_uri, is_token_uri

    names = ("ca_key", "ra_key") if pki["mode"] == "ra" else ("ca_key",)
    uses_token = False
    for name in names:
        value = str(pki[name])
        if not is_token_uri(value):
            continue
        uses_token = True
        try:
            check_uri(value)
        except KeyLoadError as e:
            raise ConfigError(f"pki.{name}: {e}") from None
    if uses_token:
        for name in ("pkcs11_module", "pkcs11_pin_file"):
            if not pki[name]:
                raise ConfigError(f"pki.{name}: needed when a key is a pkcs11: URI")


def _check_ra_pair(pki: dict[str, Any]) -> None:
    """The encryption RA: both its files or neither, in RA mode, its key a file."""
    from scep_fast.runtime.keys import is_token_uri

    cert, key = str(pki["ra_encryption_cert"]), str(pki["ra_encryption_key"])
    if bool(cert) != bool(key):
        raise ConfigError("pki.ra_encryption_cert and pki.ra_encryption_key: both or neither")
    if not cert:
        return
    if pki["mode"] != "ra":
        raise ConfigError('pki.ra_encryption_cert: an RA pair needs pki.mode = "ra"')
    if is_token_uri(key):
        raise ConfigError("pki.ra_encryption_key: must be a key file (a token key is not "
                          "supported for the encryption RA)")


def load(directory: Path) -> Config:
    path = directory / CONFIG_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: run `scep-fast init --dir {directory}`") from None
    return parse(text, directory)


def with_overrides(config: Config, overrides: dict[tuple[str, str], Any]) -> Config:
    """The config with command-line or environment values laid over it, checked the same way."""
    values = {s: dict(t) for s, t in config.values.items()}
    values["profiles"] = config.values["profiles"]
    for (section, key), value in overrides.items():
        if value is not None:
            values[section][key] = _check(section, key, value)
    return Config(dir=config.dir, values=values)


def render(values: dict[str, dict[str, Any]]) -> str:
    """TOML text for a complete set of values, one section per table."""
    lines = ["# scep-fast configuration; every key is checked at start."]
    tables = [(s, t) for s, t in values.items() if s != "profiles"]
    tables += [(f"profiles.{n}", t) for n, t in values.get("profiles", {}).items()]
    for section, table in tables:
        lines.append("")
        lines.append(f"[{section}]")
        for key, value in table.items():
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
