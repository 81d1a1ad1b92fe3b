"""Where the CA and RA keys live: a file (the default) or a PKCS#11 token.

A key in the config is a file name, or an RFC 7512 URI
(``pkcs11:token=scep;object=ca-key``) naming a private key in a token. The
module (``pki.pkcs11_module``) and the file holding the PIN
(``pki.pkcs11_pin_file``, mode 0600) are in the config as well.

Nothing here touches a token until a process asks for the key: the
supervisor passes references around, and each worker process opens its own
PKCS#11 session after it has started (sessions never cross a fork). A
process opens each module once and keeps it open: PKCS#11 allows one
initialisation per process, and libp11 finalises the module when its engine
is released, which would end every other session of the process.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from scep_fast.runtime.private_file import PrivateFileError, read_private_file

if TYPE_CHECKING:
    # Imported where used: the command line reads this module without the core.
    from scep_fast.crypto import KeyMaterial, NativeKey, Pkcs11Module, ScepContext

log = logging.getLogger("scep_fast.keys")

PKCS11_SCHEME = "pkcs11:"
# The PIN and the module come from the config and the PIN file, never from the URI.
_FORBIDDEN_URI_ATTRIBUTES = ("pin-value", "pin-source", "module-path", "module-name")
_MAX_PIN_BYTES = 256


class KeyLoadError(Exception):
    """A key reference that cannot be used; the text says why (never the PIN)."""


@dataclass(frozen=True, slots=True)
class TokenKey:
    """A private key in a PKCS#11 token."""

    uri: str
    module: str
    pin_file: Path


KeyRef = bytes | TokenKey
"""A private key: PKCS#8 DER read from its file, or a reference into a token."""


def is_token_uri(value: str) -> bool:
    return value.startswith(PKCS11_SCHEME)


def uri_attributes(uri: str) -> dict[str, str]:
    """The path attributes of an RFC 7512 URI (``token``, ``object``, ``id``, ...), decoded."""
    if not is_token_uri(uri):
        raise KeyLoadError(f"{uri!r} is not a pkcs11: URI")
    path, _, query = uri[len(PKCS11_SCHEME):].partition("?")
    attributes: dict[str, str] = {}
    for part in path.split(";"):
        if not part:
            continue
        name, sep, value = part.partition("=")
        if not sep or not name:
            raise KeyLoadError(f"{uri!r}: attribute {part!r} is not name=value")
        attributes[name.lower()] = urllib.parse.unquote(value)
    for part in query.split("&"):
        name = part.partition("=")[0].lower()
        if name:
            attributes[name] = urllib.parse.unquote(part.partition("=")[2])
    return attributes


def check_uri(uri: str) -> None:
    """Refuses a URI that names no object or carries a PIN or a module of its own."""
    attributes = uri_attributes(uri)
    for name in _FORBIDDEN_URI_ATTRIBUTES:
        if name in attributes:
            raise KeyLoadError(f"{name} does not belong in the key URI: the PIN comes from "
                               "pki.pkcs11_pin_file and the module from pki.pkcs11_module")
    if "object" not in attributes and "id" not in attributes:
        raise KeyLoadError(f"{uri!r} names no key (object= or id=)")
    if attributes.get("type", "private") != "private":
        raise KeyLoadError(f"{uri!r} must name a private key (type=private, or no type)")


def read_pin(path: Path) -> bytes:
    """The PIN from its file, which only its owner may read or write (mode 0600)."""
    try:
        pin = read_private_file(path, _MAX_PIN_BYTES)
    except PrivateFileError as e:
        raise KeyLoadError(f"the PIN file: {e}") from None
    if not pin or b"\0" in pin:
        raise KeyLoadError(f"the PIN file {path} holds no usable PIN")
    return pin


_lock = threading.Lock()
_modules: dict[tuple[int, str], Pkcs11Module] = {}
_pin_refused: set[tuple[int, str]] = set()


def token_module(module: str, pin_file: Path) -> Pkcs11Module:
    """This process's session with ``module``, opened and logged in at the first call."""
    from scep_fast.crypto import Pkcs11Module

    key = (os.getpid(), module)
    with _lock:
        opened = _modules.get(key)
        if opened is None:
            if not Path(module).is_file():
                raise KeyLoadError(f"the PKCS#11 module {module} does not exist")
            pin = read_pin(pin_file)
            try:
                opened = Pkcs11Module(module, pin)
            except Exception as e:
                raise KeyLoadError(f"cannot open the PKCS#11 module {module}: {e}") from None
            _modules[key] = opened
        return opened


def open_key(ref: KeyRef) -> KeyMaterial:
    """What the native context takes: the DER as it is, or the key loaded from its token."""
    if isinstance(ref, bytes):
        return ref
    return _load(ref)


def native_key(ref: KeyRef) -> NativeKey:
    """The key held by the core, for signing what the core does not build (CRLs, certificates)."""
    from scep_fast.crypto import NativeKey

    if isinstance(ref, bytes):
        return NativeKey.from_der(ref)
    return _load(ref)


def _load(ref: TokenKey) -> NativeKey:
    check_uri(ref.uri)
    refused = (os.getpid(), ref.module)
    if refused in _pin_refused:
        # Every try counts down the token's PIN tries until it locks.
        raise KeyLoadError("the token refused the PIN before; not trying again in this "
                           "process (fix the PIN file, then restart)")
    try:
        return token_module(ref.module, ref.pin_file).load_key(ref.uri)
    except KeyLoadError:
        raise
    except Exception as e:
        if any(refusal in str(e) for refusal in _PIN_REFUSALS):
            _pin_refused.add(refused)
        raise KeyLoadError(str(e)) from None


def generate_in_token(ref: TokenKey, key_type: str) -> None:
    """Generates a key pair inside the token, named by ``ref``'s URI (object and id).

    OpenSC's pkcs11-tool asks the token to generate it (C_GenerateKeyPair) with
    CKA_SENSITIVE set and CKA_EXTRACTABLE left false: the private key never
    exists outside the token. The PIN reaches pkcs11-tool in its environment,
    never on its command line.
    """
    check_uri(ref.uri)
    attributes = uri_attributes(ref.uri)
    kinds = {"rsa2048": "rsa:2048", "rsa3072": "rsa:3072", "rsa4096": "rsa:4096",
             "p256": "EC:prime256v1", "p384": "EC:secp384r1"}
    if key_type not in kinds:
        raise KeyLoadError(f"unknown key type {key_type!r}")
    label = attributes.get("object")
    if not label:
        raise KeyLoadError(f"{ref.uri!r}: generating a key needs object= (its label)")
    command = ["pkcs11-tool", "--module", ref.module, "--login", "--pin", "env:SCEP_FAST_PIN",
               "--keypairgen", "--key-type", kinds[key_type], "--label", label, "--sensitive"]
    if "token" in attributes:
        command += ["--token-label", attributes["token"]]
    key_id = attributes.get("id")
    if key_id:
        command += ["--id", key_id.encode("latin-1").hex()]
    env = {**os.environ, "SCEP_FAST_PIN": read_pin(ref.pin_file).decode("utf-8", "replace")}
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        raise KeyLoadError("pkcs11-tool is not installed (Debian package opensc)") from None
    if result.returncode != 0:
        raise KeyLoadError(f"the token did not generate {label!r}: "
                           f"{result.stderr.strip() or result.stdout.strip()}")


# What a token says when the PIN itself is refused: retrying would only count
# down the token's PIN tries until it locks.
_PIN_REFUSALS = ("PIN incorrect", "PIN locked", "PIN len range", "PIN expired", "PIN invalid")


class TokenKeySource:
    """The keys of one worker process when some of them live in a token.

    ``build`` opens the keys and makes the native context; it returns the
    context and the token keys in it. While it fails (the token is not
    there) the worker answers PKIOperations with 503 and tries again every
    ``retry_seconds``; still failing after ``replace_after_seconds``, the
    process is replaced (``on_lost``), since what the module saw of a busy
    or absent token may stay in the process. When a private-key operation
    fails, ``lost`` asks the
    token to sign a probe: if it cannot, the keys are gone for this process
    (libp11 and the module keep stale handles, and PKCS#11 allows one
    initialisation per process), so the process is replaced (``on_lost``)
    and its successor opens a new session as soon as the token is back.
    """

    def __init__(self, build: Callable[[], tuple[ScepContext, Sequence[NativeKey]]], *,
                 on_lost: Callable[[], None] = lambda: None, retry_seconds: float = 2.0,
                 replace_after_seconds: float = 6.0, probe_interval_seconds: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._build = build
        self._on_lost = on_lost
        self._retry_seconds = retry_seconds
        self._replace_after = replace_after_seconds
        self._unavailable_since: float | None = None
        self._probe_interval = probe_interval_seconds
        self._clock = clock
        self._ctx: ScepContext | None = None
        self._keys: Sequence[NativeKey] = ()
        self._next_try = 0.0
        self._last_good_probe = -probe_interval_seconds
        self._given_up = False
        self._last_reason = ""

    def context(self) -> ScepContext | None:
        if self._ctx is not None or self._given_up:
            return self._ctx
        if self._clock() < self._next_try:
            return None
        return self.open()

    def open(self) -> ScepContext | None:
        """Tries to open the keys now, whenever the last try was."""
        if self._ctx is not None or self._given_up:
            return self._ctx
        now = self._clock()
        try:
            self._ctx, self._keys = self._build()
        except Exception as e:  # noqa: BLE001 - the reason is logged; we try again
            reason = str(e)
            self._next_try = now + self._retry_seconds
            if self._unavailable_since is None:
                self._unavailable_since = now
            if any(refusal in reason for refusal in _PIN_REFUSALS):
                self._given_up = True
                log.error("the token refused the PIN; not trying again",
                          extra={"fields": {"reason": reason, "pid": os.getpid()}})
            elif now - self._unavailable_since >= self._replace_after:
                # What the module saw while the token was busy or away may stay
                # in this process (SoftHSM keeps an object it could not read as
                # missing): a new process starts afresh. Past the supervisor's
                # quick-death threshold, so it is replaced at once.
                self._given_up = True
                log.warning("token keys still unavailable; replacing this worker process",
                            extra={"fields": {"reason": reason, "pid": os.getpid()}})
                self._on_lost()
            elif reason != self._last_reason:
                log.warning("token keys unavailable; trying again",
                            extra={"fields": {"reason": reason, "pid": os.getpid(),
                                              "retry_seconds": self._retry_seconds}})
            self._last_reason = reason
            return None
        log.info("token keys opened", extra={"fields": {"pid": os.getpid()}})
        self._last_reason = ""
        self._unavailable_since = None
        return self._ctx

    def lost(self) -> bool:
        if self._ctx is None:
            return True
        now = self._clock()
        if now - self._last_good_probe < self._probe_interval:
            return False
        try:
            for key in self._keys:
                key.sign("SHA256", b"scep-fast: is the token still there?")
        except Exception as e:  # noqa: BLE001 - that is the answer
            log.error("token keys lost; replacing this worker process",
                      extra={"fields": {"reason": str(e), "pid": os.getpid()}})
            self._ctx, self._keys = None, ()
            self._given_up = True
            self._on_lost()
            return True
        self._last_good_probe = now
        return False
