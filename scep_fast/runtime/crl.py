"""Certificate revocation lists: made from the ledger, kept as files, served by the workers.

Each CA, the current one and every retired one (see ``pki.rollover``), has
one CRL at ``DIR/crl/<name>.crl`` where ``<name>`` is the CA's key
identifier in hex: stable for the life of the CA, so the URL that issued
certificates name in their CRL distribution point never changes.

Whoever changes the revocation state (``certs revoke``) writes a fresh CRL
at once; the supervisor rewrites every CRL before it comes close to its
nextUpdate. Writers take a lock on ``DIR/crl/.lock`` around "take a CRL
number, read the revoked certificates, write the file", so two writers can
never leave an older list in place of a newer one. Files are replaced with
one rename: a reader sees the old CRL or the new one, never half of one.

Workers read the files through :class:`CrlStore`, which keeps their bytes
and re-reads a file only when its stat changes: one ``stat`` per request.

Several nodes on one PostgreSQL ledger (a ledger with :class:`SharedCrls`)
share their CRLs through it: a writer holds the database's CRL lock, so one
node at a time writes; it first adopts the newest CRL of each CA from the
database (if its number is above the file's) and stores every CRL it makes
there. The supervisor of each node does this every few seconds (polling),
so a revocation made on any node is in every node's files within seconds,
and a CRL that one node refreshed in time is not made again by the others.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import logging
import os
import secrets
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from scep_fast.crypto.x509sign import public_key, sign_crl
from scep_fast.runtime.config import Config, notice_sinks
from scep_fast.runtime.keys import KeyRef, native_key
from scep_fast.runtime.pki import CA_ID, Material, ca_id
from scep_fast.service.ledger import REVOCATION_REASONS, CertRecord
from scep_fast.service.notices import Notice, notices_for, revoked_event

__all__ = [
    "CRL_DIR",
    "CrlLedger",
    "CrlStore",
    "crl_name",
    "crl_url",
    "generate_crl",
    "reason_code",
    "refresh_all",
    "revoke",
]

log = logging.getLogger("scep_fast.crl")

CRL_DIR = "crl"
_LOCK_NAME = ".lock"
# What a CRL file may be called: the hex key identifier of its CA. Checked
# before any name from a URL reaches the file system.
NAME_PATTERN = CA_ID

# RFC 5280 section 5.3.1 names -> codes. Both spellings of code 2 are
# accepted on the command line ("cACompromise" is the ASN.1 name).
_REASON_CODES = {name.lower(): code for code, name in REVOCATION_REASONS.items()}
_REASON_FLAGS = {
    1: x509.ReasonFlags.key_compromise,
    2: x509.ReasonFlags.ca_compromise,
    3: x509.ReasonFlags.affiliation_changed,
    4: x509.ReasonFlags.superseded,
    5: x509.ReasonFlags.cessation_of_operation,
    6: x509.ReasonFlags.certificate_hold,
    9: x509.ReasonFlags.privilege_withdrawn,
    10: x509.ReasonFlags.aa_compromise,
}
# removeFromCRL (8) only has a meaning in a delta CRL (RFC 5280 section
# 5.3.1); a full CRL never carries it.
_REMOVE_FROM_CRL = 8


class CrlLedger(Protocol):
    """What CRLs need from the ledger (``service.ledger.Ledger`` has it all)."""

    def revoke(self, serial: int, reason: int, when: float,
               notices: Sequence[Notice] = ()) -> CertRecord: ...

    def get(self, serial: int) -> CertRecord | None: ...

    def iter_revoked(self) -> Iterator[CertRecord]: ...

    def next_crl_number(self) -> int: ...


@runtime_checkable
class SharedCrls(Protocol):
    """A ledger that several nodes share keeps the CRLs for all of them."""

    def crl_writer(self) -> contextlib.AbstractContextManager[None]:
        """Holds the lock that makes one node at a time write CRLs."""
        ...

    def newest_crl(self, name: str) -> bytes | None: ...

    def store_crl(self, name: str, number: int, der: bytes) -> None:
        """Keeps ``der`` as CRL ``name`` unless one with a higher number is kept already."""
        ...


def crl_number(der: bytes) -> int:
    """The CRLNumber of a DER CRL (0 if it has none)."""
    try:
        extension = x509.load_der_x509_crl(der).extensions.get_extension_for_class(
            x509.CRLNumber)
    except x509.ExtensionNotFound:
        return 0
    return int(extension.value.crl_number)


def _adopt(store: CrlStore, shared: SharedCrls, name: str) -> Path | None:
    """The database's CRL ``name`` into its file, if it is newer than the file's."""
    newest = shared.newest_crl(name)
    if newest is None:
        return None
    local = store.current(name)
    if local is not None and crl_number(local) >= crl_number(newest):
        return None
    return store.write(name, newest)


def reason_code(name: str) -> int:
    """The CRLReason code of an RFC 5280 name (case-insensitive); ``ValueError`` else."""
    code = _REASON_CODES.get(name.lower())
    if code is None:
        raise ValueError(f"unknown revocation reason {name!r}; one of "
                         f"{', '.join(REVOCATION_REASONS.values())}")
    return code


def crl_name(ca_cert_der: bytes) -> str:
    """The stable file and URL name of a CA's CRL (without ``.crl``)."""
    return ca_id(ca_cert_der)


def crl_url(public_url: str, ca_cert_der: bytes) -> str | None:
    """The CRL distribution point URL of certificates issued by this CA, or None."""
    if not public_url:
        return None
    return f"{public_url.rstrip('/')}/crl/{crl_name(ca_cert_der)}.crl"


def _issued_by(cert: x509.Certificate, ca: x509.Certificate, ca_ski: bytes | None) -> bool:
    if cert.issuer != ca.subject:
        return False
    if ca_ski is None:
        return True
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return True
    return aki.key_identifier is None or aki.key_identifier == ca_ski


def generate_crl(ledger: CrlLedger, ca_cert_der: bytes, ca_key: KeyRef, *,
                 validity_hours: int, now: datetime.datetime) -> bytes:
    """A DER CRL of the certificates this CA issued and the ledger says are revoked.

    thisUpdate is ``now``, nextUpdate ``validity_hours`` later; the CRL
    number comes from the ledger, so it grows across every CRL we sign
    (RFC 5280 section 5.2.3). Entries carry their revocation time and,
    unless it is unspecified, their reason code (section 5.3.1: absent
    rather than unspecified).

    The core signs it, with a key from a file or from a token alike.
    """
    ca = x509.load_der_x509_certificate(ca_cert_der)
    key = native_key(ca_key)
    try:
        ski: bytes | None = ca.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        ski = None
    aki = (x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
               x509.SubjectKeyIdentifier(ski))
           if ski is not None else x509.AuthorityKeyIdentifier.from_issuer_public_key(
               public_key(key)))
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(ca.subject)
               .last_update(now)
               .next_update(now + datetime.timedelta(hours=validity_hours))
               .add_extension(aki, critical=False))
    for record in ledger.iter_revoked():
        if record.revoked_at is None or record.revocation_reason == _REMOVE_FROM_CRL:
            continue
        cert = x509.load_der_x509_certificate(record.der)
        if not _issued_by(cert, ca, ski):
            continue
        entry = (x509.RevokedCertificateBuilder()
                 .serial_number(record.serial)
                 .revocation_date(datetime.datetime.fromtimestamp(
                     int(record.revoked_at), tz=datetime.UTC)))
        flag = _REASON_FLAGS.get(record.revocation_reason)
        if flag is not None:
            entry = entry.add_extension(x509.CRLReason(flag), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    # The number is taken last: a CRL that failed to build wastes none.
    builder = builder.add_extension(x509.CRLNumber(ledger.next_crl_number()), critical=False)
    return sign_crl(builder, key).public_bytes(serialization.Encoding.DER)


@dataclass(slots=True)
class _Cached:
    stamp: tuple[int, int, int]
    der: bytes
    issuer: bytes
    this_update: datetime.datetime
    next_update: datetime.datetime | None


class CrlStore:
    """The CRL files of one directory: written atomically, read through a cache."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory) / CRL_DIR
        self._cache: dict[str, _Cached] = {}
        self._lock = threading.Lock()

    def path(self, name: str) -> Path:
        if NAME_PATTERN.fullmatch(name) is None:
            raise ValueError(f"not a CRL name: {name!r}")
        return self.directory / f"{name}.crl"

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Holds the writers' lock (across processes) for the duration."""
        self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(self.directory / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def write(self, name: str, der: bytes) -> Path:
        """Replaces the CRL ``name`` in one rename; the file is 0644."""
        target = self.path(name)
        self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        staging = self.directory / f".{name}.{secrets.token_hex(4)}.tmp"
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(der)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(staging, 0o644)
            os.replace(staging, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                staging.unlink()
            raise
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return target

    def _load(self, name: str) -> _Cached | None:
        try:
            path = self.path(name)
        except ValueError:
            return None
        try:
            st = os.stat(path)
        except FileNotFoundError:
            with self._lock:
                self._cache.pop(name, None)
            return None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None and cached.stamp == stamp:
            return cached
        try:
            der = path.read_bytes()
            crl = x509.load_der_x509_crl(der)
        except (FileNotFoundError, ValueError):
            # Replaced between the stat and the read, or not a CRL: keep
            # serving what we had, if anything.
            return cached
        fresh = _Cached(stamp, der, crl.issuer.public_bytes(), crl.last_update_utc,
                        crl.next_update_utc)
        with self._lock:
            self._cache[name] = fresh
        return fresh

    def current(self, name: str) -> bytes | None:
        """The DER of CRL ``name``, or None for an unknown or invalid name."""
        cached = self._load(name)
        return None if cached is None else cached.der

    def names(self) -> list[str]:
        try:
            entries = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(entry[:-4] for entry in entries
                      if entry.endswith(".crl") and NAME_PATTERN.fullmatch(entry[:-4]))

    def by_issuer(self, issuer_name_der: bytes) -> bytes | None:
        """The CRL whose issuer is this DER Name (the newest, should there be several)."""
        best: _Cached | None = None
        for name in self.names():
            cached = self._load(name)
            if cached is None or cached.issuer != issuer_name_der:
                continue
            if best is None or cached.this_update > best.this_update:
                best = cached
        return None if best is None else best.der

    def next_update(self, name: str) -> datetime.datetime | None:
        cached = self._load(name)
        return None if cached is None else cached.next_update

    def needs_refresh(self, name: str, refresh_hours: float, now: datetime.datetime, *,
                      validity_hours: float | None = None) -> bool:
        """Whether CRL ``name`` is missing or has less than ``refresh_hours`` left.

        With ``validity_hours`` shorter than ``2 * refresh_hours`` the margin
        is half the validity instead, so that a short-lived CRL is not
        rewritten on every check.
        """
        next_update = self.next_update(name)
        if next_update is None:
            return True
        margin = refresh_hours
        if validity_hours is not None:
            margin = min(margin, validity_hours / 2)
        return next_update - now < datetime.timedelta(hours=margin)


def _cas(material: Material, now: datetime.datetime) -> list[tuple[bytes, KeyRef]]:
    """The current CA, then every retired CA whose certificate has not expired."""
    cas: list[tuple[bytes, KeyRef]] = [(material.ca_cert, material.ca_key)]
    for previous in material.previous:
        not_after = x509.load_der_x509_certificate(previous.ca_cert).not_valid_after_utc
        if not_after > now:
            cas.append((previous.ca_cert, previous.ca_key))
    return cas


def refresh_all(config: Config, ledger: CrlLedger, material: Material, force: bool = False,
                *, now: datetime.datetime | None = None) -> list[Path]:
    """Rewrites the CRL of every live CA when forced, missing or near its nextUpdate.

    Returns the paths written.
    """
    store = CrlStore(config.dir)
    validity = int(config.get("crl", "validity_hours"))
    refresh = int(config.get("crl", "refresh_hours"))
    shared = ledger if isinstance(ledger, SharedCrls) else None
    written: list[Path] = []
    with store.writing(), (
            shared.crl_writer() if shared is not None else contextlib.nullcontext()):
        moment = now or datetime.datetime.now(datetime.UTC)
        for ca_cert, ca_key in _cas(material, moment):
            name = crl_name(ca_cert)
            if shared is not None and (adopted := _adopt(store, shared, name)) is not None:
                written.append(adopted)
                log.info("CRL adopted", extra={"fields": {"crl": name}})
            if not force and not store.needs_refresh(name, refresh, moment,
                                                     validity_hours=validity):
                continue
            der = generate_crl(ledger, ca_cert, ca_key, validity_hours=validity, now=moment)
            if shared is not None:
                shared.store_crl(name, crl_number(der), der)
            if written and written[-1] == store.path(name):
                written.pop()
            written.append(store.write(name, der))
            log.info("CRL written", extra={"fields": {"crl": name}})
    return written


def refresh_due(config: Config, material: Material, *,
                now: datetime.datetime | None = None) -> bool:
    """Whether ``refresh_all`` would write any CRL now (one missing or near its nextUpdate)."""
    store = CrlStore(config.dir)
    validity = int(config.get("crl", "validity_hours"))
    refresh = int(config.get("crl", "refresh_hours"))
    moment = now or datetime.datetime.now(datetime.UTC)
    return any(store.needs_refresh(crl_name(ca_cert), refresh, moment, validity_hours=validity)
               for ca_cert, _key in _cas(material, moment))


def revoke(config: Config, ledger: CrlLedger, material: Material, serial: int, reason: int,
           *, now: datetime.datetime | None = None) -> tuple[CertRecord, list[Path]]:
    """Revokes a certificate and writes fresh CRLs at once."""
    moment = now or datetime.datetime.now(datetime.UTC)
    at = moment.timestamp()
    sinks = [sink for sink, events in notice_sinks(config).items() if "revoked" in events]
    known = ledger.get(serial) if sinks else None
    notices = [] if known is None else notices_for(
        "revoked", revoked_event(known, reason=reason, at=at), sinks, at)
    record = ledger.revoke(serial, reason, at, notices)
    return record, refresh_all(config, ledger, material, force=True, now=moment)

