"""The issuance ledger on LMDB: the adapter behind ``service.ledger.Ledger``.

Layout (schema version 2), nine named databases in one environment:

``meta``
    ``b"schema_version"`` -> big-endian uint32. A ledger of version 1 is
    upgraded in place when opened (version 2 only adds databases, which
    start empty); a later version is refused (:class:`UnsupportedSchema`).
    ``b"crl_number"`` -> big-endian uint64, the last CRL number handed out
    (absent until the first).
``certs``
    serial -> record. The key is the serial as 20 big-endian octets, so
    LMDB's byte order is numeric order and iteration is by serial.
``txids``
    requester key SHA-256 (32 octets) + transaction id (UTF-8) -> serial key.
    The key hash has a fixed length, so the concatenation is unambiguous.
``revoked``
    serial key -> empty value, for every revoked certificate: the CRL is
    built from this index without reading the other certificates.
``pending``
    request id (16 lower-case hex characters, ASCII) -> pending request.
``pending_txids``
    requester key SHA-256 + transaction id (UTF-8) -> request id.
``challenges``
    SHA-256 of the challenge secret (32 octets) -> challenge. The secret
    itself is never stored.
``outbox``
    notice id (16 octets) -> notice: events waiting to be delivered to a
    notification sink.
``outbox_due``
    due key (when the notice is due, when it was made, its id) -> empty
    value: claims read the due notices first from here, so a claim reads
    only what it takes, however many wait (tens of thousands after a sink
    was down), and an outbox with nothing due costs one read and no write.

The two outbox databases came after schema version 2 without a new version:
a ledger made before them gets them, empty, when it is opened, and a
scep-fast that does not know them leaves them alone (its notices then wait
undelivered).

The values are encoded by ``scep_fast.runtime.ledger_lmdb_codec``, which
documents their formats.

Durability and concurrency: the environment is opened with ``sync=True``
and ``metasync=True``, so every write (``commit``, ``revoke``, the pending,
challenge, outbox and CRL number writes) returns only after LMDB has flushed the
transaction to disk. LMDB admits one writer at a time across all processes;
``commit`` takes the write lock once per batch and encodes the records
before taking it, so the lock is held only for the B-tree work and the sync.
Every check-then-write (a challenge's remaining uses, a request's status,
the CRL counter, a notice's claim) happens inside one write transaction, so
it is atomic across worker processes: two processes never claim one notice
while its lease runs.

Sizing: ``map_size`` is the largest the ledger may grow to; it costs address
space, not disk (the file grows as records arrive). A record with an
RSA-2048 certificate takes about 2.7 KiB of file with its index entry
(random serials leave B-tree pages about half full; measured by
``benchmarks/ledger_bench.py``), so the default of 8 GiB holds about
3,000,000 records, and 1,000,000 with a wide margin. ``max_readers`` bounds the threads of all
processes holding a read transaction at once; the default of 1024 covers
dozens of worker processes with their thread pools; the process that
creates the lock file fixes it for all. Every process should open the ledger
with the same ``map_size``: one with a smaller map than the data has grown to
fails to begin a transaction.

Full: a write that finds no room, because the map is used up (LMDB's
``MDB_MAP_FULL``) or because the file system is (``ENOSPC``, ``EDQUOT``, or
the ``EIO`` LMDB reports for a write cut short while the file system has
less than :data:`FULL_DISK_FREE_BYTES` left), raises :class:`LedgerFull`
and writes nothing; the environment stays usable, so the next write succeeds
once there is room again. A map size raised in the configuration is taken
up by each process that opens the ledger anew (the workers, on a reload);
a process that keeps its handle adopts the larger map when it next begins
a transaction (``MDB_MAP_RESIZED``).

Use: open one :class:`LmdbLedger` per process, after the process has started
(spawn, never inherited across ``fork()``), and close it on shutdown.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Final

import lmdb

from scep_fast.runtime.ledger_lmdb_codec import (
    DUE_KEY_BYTES,
    SERIAL_KEY_BYTES,
    decode_challenge,
    decode_notice,
    decode_pending,
    decode_record,
    due_key,
    due_prefix,
    encode_challenge,
    encode_notice,
    encode_pending,
    encode_record,
    serial_key,
    transaction_key,
)
from scep_fast.service.ledger import (
    CertRecord,
    Challenge,
    ChallengeUsedUp,
    CommitOutcome,
    LedgerCorrupt,
    LedgerError,
    LedgerFull,
    NotFound,
    NoticeRetry,
    PendingRequest,
    Recorded,
    Renewal,
    UnsupportedSchema,
    check_claim,
    check_notices,
    check_pending,
    check_retries,
    check_revocation_reason,
    commit_challenges,
    commit_renewals,
    decide,
    notices_to_write,
    refusal_of,
    replaced,
    spent,
    usable,
)

if TYPE_CHECKING:
    from scep_fast.service.notices import Notice

__all__ = [
    "DEFAULT_MAP_SIZE_BYTES",
    "DEFAULT_MAX_READERS",
    "SCHEMA_VERSION",
    "LmdbLedger",
]

GIB: Final = 1024 * 1024 * 1024

DEFAULT_MAP_SIZE_BYTES: Final = 8 * GIB
DEFAULT_MAX_READERS: Final = 1024
# Nine databases now, and room for the indexes still to come (subjects)
# without a change of environment flags.
MAX_DBS: Final = 16

SCHEMA_VERSION: Final = 2
# The schema versions this code opens; older ones are upgraded in place.
_READABLE_SCHEMAS: Final = frozenset({1, 2})

_REQUEST_KEY_LEN: Final = 16
_NOTICE_KEY_LEN: Final = 16
_DIGEST_LEN: Final = 32

_SCHEMA_KEY: Final = b"schema_version"
_CRL_NUMBER_KEY: Final = b"crl_number"
_U64: Final = struct.Struct(">Q")
_U32: Final = struct.Struct(">I")

# An EIO from a write while the ledger's file system has less than this free
# is the file system filling up: LMDB reports a short write as EIO.
FULL_DISK_FREE_BYTES: Final = 1024 * 1024

# Records are read and yielded in chunks, each chunk in its own short read
# transaction: a slow consumer of iter_records() never pins an old snapshot
# (which would stop LMDB from reusing freed pages) or a reader slot.
_ITER_CHUNK: Final = 512

_DATA_FILE_MODE: Final = 0o600
_DIRECTORY_MODE: Final = 0o700


# --- One environment per process ---------------------------------------------

# LMDB's locks are per process: opening the same environment twice in one
# process lets the second close release the first one's locks. Keep track.
_open_paths: dict[str, int] = {}
_open_paths_lock = threading.Lock()


def _claim(path: str) -> None:
    with _open_paths_lock:
        # An entry from another pid was inherited across fork(): the parent's
        # handle is not ours and opening our own is allowed.
        if _open_paths.get(path) == os.getpid():
            raise LedgerError(f"ledger {path} is already open in this process")
        _open_paths[path] = os.getpid()


def _release(path: str) -> None:
    with _open_paths_lock:
        if _open_paths.get(path) == os.getpid():
            del _open_paths[path]


def _full_condition(path: str, error: lmdb.Error) -> str | None:
    """What is full, if ``error`` means that a write found no room; else None."""
    if isinstance(error, lmdb.MapFullError):
        return "the map size is used up"
    code = getattr(error, "code", 0)
    if isinstance(error, lmdb.DiskError) or code in (errno.ENOSPC, errno.EDQUOT):
        return f"the file system is full ({os.strerror(code or errno.ENOSPC)})"
    if code == errno.EIO:
        try:
            stat = os.statvfs(path)
        except OSError:
            return None
        if stat.f_bavail * stat.f_frsize < FULL_DISK_FREE_BYTES:
            return "the file system is full (a write was cut short)"
    return None


def _prepare_directory(path: Path) -> None:
    path.mkdir(mode=_DIRECTORY_MODE, parents=True, exist_ok=True)
    os.chmod(path, _DIRECTORY_MODE)


def _is_notice_id(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == _NOTICE_KEY_LEN


class LmdbLedger:
    """A :class:`~scep_fast.service.ledger.Ledger` in an LMDB environment.

    ``path`` is a directory holding ``data.mdb`` and ``lock.mdb``; it is
    created (mode 0700, files 0600) when missing.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        map_size_bytes: int = DEFAULT_MAP_SIZE_BYTES,
        max_readers: int = DEFAULT_MAX_READERS,
        on_full: Callable[[str, LedgerFull], None] = lambda _what, _error: None,
    ) -> None:
        """``on_full(what, error)`` is told of each write refused for want of room."""
        directory = Path(path)
        self._on_full = on_full
        _prepare_directory(directory)
        self._path = os.path.realpath(directory)
        self._pid = os.getpid()
        _claim(self._path)
        try:
            self._env = lmdb.open(
                self._path,
                map_size=map_size_bytes,
                max_readers=max_readers,
                max_dbs=MAX_DBS,
                # Durable commits: fsync the data and the meta page before
                # commit returns. A certificate leaves only once recorded.
                sync=True,
                metasync=True,
                # LMDB masks out the execute bits for its files: 0600.
                mode=_DIRECTORY_MODE,
                subdir=True,
                create=True,
                lock=True,
            )
        except lmdb.Error as error:
            _release(self._path)
            raise LedgerError(f"cannot open ledger {self._path}: {error}") from error
        try:
            for name in ("data.mdb", "lock.mdb"):
                os.chmod(os.path.join(self._path, name), _DATA_FILE_MODE)
            self._open_databases()
        except BaseException:
            self._env.close()
            _release(self._path)
            raise
        self._closed = False

    def _open_databases(self) -> None:
        env = self._env
        with env.begin(write=True) as txn:
            meta = env.open_db(b"meta", txn=txn)
            stored = txn.get(_SCHEMA_KEY, db=meta)
            if stored is not None:
                if len(stored) != _U32.size:
                    raise LedgerCorrupt(f"ledger {self._path}: unreadable schema version")
                (version,) = _U32.unpack(stored)
                if version not in _READABLE_SCHEMAS:
                    raise UnsupportedSchema(
                        f"ledger {self._path} has schema version {version}; this version "
                        f"of scep-fast reads schema versions {min(_READABLE_SCHEMAS)} to "
                        f"{SCHEMA_VERSION}"
                    )
                if version != SCHEMA_VERSION:
                    # Version 1 to 2: the new databases, made below, start
                    # empty (version 1 could not revoke, defer or keep
                    # challenges), and format 1 records stay readable.
                    txn.put(_SCHEMA_KEY, _U32.pack(SCHEMA_VERSION), db=meta)
            elif len(env.dbs(txn)) > 1:
                # A fresh ledger holds nothing but the meta database just made.
                raise LedgerCorrupt(f"ledger {self._path} has databases but no schema version")
            else:
                txn.put(_SCHEMA_KEY, _U32.pack(SCHEMA_VERSION), db=meta)
            self._meta = meta
            self._certs = env.open_db(b"certs", txn=txn)
            self._txids = env.open_db(b"txids", txn=txn)
            self._revoked = env.open_db(b"revoked", txn=txn)
            self._pending = env.open_db(b"pending", txn=txn)
            self._pending_txids = env.open_db(b"pending_txids", txn=txn)
            self._challenges = env.open_db(b"challenges", txn=txn)
            # Made here, empty, in a ledger from before the outbox.
            self._outbox = env.open_db(b"outbox", txn=txn)
            self._outbox_due = env.open_db(b"outbox_due", txn=txn)

    # -- internals --

    def _env_checked(self) -> lmdb.Environment:
        if self._closed:
            raise LedgerError("ledger is closed")
        if os.getpid() != self._pid:
            raise LedgerError("ledger was opened in another process; open one per process")
        return self._env

    def _begin(self, *, write: bool = False) -> lmdb.Transaction[bytes]:
        env = self._env_checked()
        try:
            return env.begin(write=write)
        except lmdb.MapResizedError:
            # Another process has grown the map past ours (ledger.map_size_bytes
            # was raised and the workers reloaded): adopt its size.
            env.set_mapsize(0)
            return env.begin(write=write)

    def _full(self, what: str, error: lmdb.Error) -> LedgerError:
        """The ledger error for an LMDB failure of a write; a full one is reported."""
        condition = _full_condition(self._path, error)
        if condition is None:
            return LedgerError(f"ledger {self._path}: {what} failed: {error}")
        full = LedgerFull(
            f"ledger {self._path} is full: {condition} (map size "
            f"{self._env.info()['map_size']} bytes); {what} recorded nothing; raise "
            "ledger.map_size_bytes and reload, or free disk space")
        self._on_full(what, full)
        return full

    @contextmanager
    def _write(self, what: str) -> Iterator[lmdb.Transaction[bytes]]:
        """One durable write transaction; LMDB failures become ledger errors."""
        try:
            with self._begin(write=True) as txn:
                yield txn
        except lmdb.Error as error:
            raise self._full(what, error) from error

    def _chunks(
        self,
        db: lmdb._Database,
        resolve: Callable[[lmdb.Transaction[bytes], bytes, bytes], bytes] | None = None,
    ) -> Iterator[list[tuple[bytes, bytes]]]:
        """The entries of ``db`` in key order, a short read transaction per chunk.

        ``resolve(txn, key, value)`` replaces each value inside the chunk's
        transaction (an index entry by the record it points at).
        """
        self._env_checked()
        after: bytes | None = None
        while True:
            chunk: list[tuple[bytes, bytes]] = []
            with self._begin() as txn:
                cursor = txn.cursor(db=db)
                if after is None:
                    found = cursor.first()
                else:
                    found = cursor.set_range(after)
                    if found and cursor.key() == after:
                        found = cursor.next()
                while found and len(chunk) < _ITER_CHUNK:
                    key, value = cursor.key(), cursor.value()
                    if resolve is not None:
                        value = resolve(txn, key, value)
                    chunk.append((key, value))
                    found = cursor.next()
            if chunk:
                yield chunk
            if not found:
                return
            after = chunk[-1][0]

    def _record_or_none(self, txn: lmdb.Transaction[bytes], key: bytes) -> CertRecord | None:
        value = txn.get(key, db=self._certs)
        return None if value is None else decode_record(key, value)

    def _record_at(self, txn: lmdb.Transaction[bytes], key: bytes) -> CertRecord:
        value = txn.get(key, db=self._certs)
        if value is None:
            raise LedgerCorrupt(f"txids points at serial {key.hex()}, which is not recorded")
        return decode_record(key, value)

    # -- the Ledger protocol --

    def find_transaction(
        self, transaction_id: str, requester_key_sha256: bytes
    ) -> CertRecord | None:
        with self._begin() as txn:
            key = txn.get(transaction_key(transaction_id, requester_key_sha256), db=self._txids)
            return None if key is None else self._record_at(txn, key)

    def find_transactions(
        self, keys: Sequence[tuple[str, bytes]]
    ) -> list[tuple[CertRecord | None, PendingRequest | None]]:
        self._env_checked()
        found: list[tuple[CertRecord | None, PendingRequest | None]] = []
        with self._begin() as txn:
            for transaction_id, requester in keys:
                tkey = transaction_key(transaction_id, requester)
                serial_key_ = txn.get(tkey, db=self._txids)
                request_key = txn.get(tkey, db=self._pending_txids)
                found.append((
                    None if serial_key_ is None else self._record_at(txn, serial_key_),
                    None if request_key is None else self._pending_at(txn, request_key)))
        return found

    def commit(
        self, records: Sequence[CertRecord], challenges: Sequence[bytes | None] = (),
        notices: Sequence[Notice] = (), renewals: Sequence[Renewal | None] = (),
    ) -> list[CommitOutcome]:
        presented = commit_challenges(records, challenges)
        renewing = commit_renewals(records, renewals)
        check_notices(notices)
        self._env_checked()
        if not records and not notices:
            return []
        # Encode before taking the write lock, which every process shares.
        prepared = [
            (
                record,
                serial_key(record.serial),
                transaction_key(record.transaction_id, record.requester_key_sha256),
                encode_record(record),
                digest,
                renewal,
            )
            for record, digest, renewal in zip(records, presented, renewing, strict=True)
        ]
        encoded = {notice.notice_id: encode_notice(notice) for notice in notices}
        outcomes: list[CommitOutcome] = []
        certs, txids = self._certs, self._txids
        with self._write("commit") as txn:
            def serial_in_use(serial: int) -> bool:
                return txn.get(serial_key(serial), db=certs) is not None

            for record, skey, tkey, value, digest, renewal in prepared:
                existing_key = txn.get(tkey, db=txids)
                holder = None if existing_key is None else self._record_at(txn, existing_key)
                renewed = None if renewal is None else self._record_or_none(
                    txn, serial_key(renewal.serial))
                refused = refusal_of(record, digest, holder, serial_in_use,
                                     partial(self._spend_challenge, txn), renewal, renewed)
                if refused is not None:
                    outcomes.append(refused)
                else:
                    txn.put(skey, value, db=certs)
                    txn.put(tkey, skey, db=txids)
                    if record.status == "revoked":
                        txn.put(skey, b"", db=self._revoked)
                    revoked = replaced(record, renewal, renewed)
                    if revoked is not None:
                        rkey = serial_key(revoked.serial)
                        txn.put(rkey, encode_record(revoked), db=certs)
                        txn.put(rkey, b"", db=self._revoked)
                    outcomes.append(Recorded(record))
            for notice in notices_to_write(notices, outcomes):
                self._put_notice(txn, notice, encoded[notice.notice_id])
        return outcomes

    def _put_notice(self, txn: lmdb.Transaction[bytes], notice: Notice, value: bytes) -> None:
        """Adds a notice to the outbox inside ``txn``; an id on record already is refused
        (the exception leaves the transaction, which LMDB then aborts)."""
        if not txn.put(notice.notice_id, value, overwrite=False, db=self._outbox):
            raise LedgerError(f"notice {notice.notice_id.hex()} is in the outbox already")
        txn.put(due_key(notice), b"", db=self._outbox_due)

    def _notice_at(self, txn: lmdb.Transaction[bytes], notice_id: bytes) -> Notice | None:
        value = txn.get(notice_id, db=self._outbox)
        return None if value is None else decode_notice(notice_id, value)

    def _replace_notice(self, txn: lmdb.Transaction[bytes], old: Notice, new: Notice) -> None:
        """Stores ``new`` over ``old`` (same id) with its due index entry."""
        if not txn.delete(due_key(old), db=self._outbox_due):
            raise LedgerCorrupt(f"notice {old.notice_id.hex()} is missing from outbox_due")
        txn.put(old.notice_id, encode_notice(new), db=self._outbox)
        txn.put(due_key(new), b"", db=self._outbox_due)

    def add_notices(self, notices: Sequence[Notice]) -> None:
        check_notices(notices)
        self._env_checked()
        if not notices:
            return
        encoded = [(notice, encode_notice(notice)) for notice in notices]
        with self._write("add_notices") as txn:
            for notice, value in encoded:
                self._put_notice(txn, notice, value)

    def claim_notices(self, now: float, limit: int, lease_seconds: float) -> list[Notice]:
        check_claim(now, limit, lease_seconds)
        self._env_checked()
        if limit == 0:
            return []
        bound = due_prefix(now)

        def due(cursor: lmdb.Cursor[bytes], found: bool) -> bool:
            return found and cursor.key()[:len(bound)] <= bound

        # Usually nothing is due: a read answers that without the write lock
        # that every process shares and without a sync.
        with self._begin() as txn:
            cursor = txn.cursor(db=self._outbox_due)
            if not due(cursor, cursor.first()):
                return []
        claimed: list[Notice] = []
        with self._write("claim_notices") as txn:
            # Inside the write transaction, so another process's claim made
            # since the read above is seen: what it took is not due any more.
            cursor = txn.cursor(db=self._outbox_due)
            keys: list[bytes] = []
            found = cursor.first()
            while due(cursor, found) and len(keys) < limit:
                keys.append(cursor.key())
                found = cursor.next()
            for key in keys:
                if len(key) != DUE_KEY_BYTES:
                    raise LedgerCorrupt(f"outbox_due key of {len(key)} bytes")
                notice = self._notice_at(txn, key[-_NOTICE_KEY_LEN:])
                if notice is None:
                    raise LedgerCorrupt(f"outbox_due names notice {key[-_NOTICE_KEY_LEN:].hex()}, "
                                        "which is not in the outbox")
                leased = dataclasses.replace(notice, next_attempt_at=now + lease_seconds)
                self._replace_notice(txn, notice, leased)
                claimed.append(leased)
        return claimed

    def settle_notices(self, delivered: Sequence[bytes] = (),
                       retries: Sequence[NoticeRetry] = ()) -> None:
        check_retries(retries)
        self._env_checked()
        if not delivered and not retries:
            return
        with self._write("settle_notices") as txn:
            for notice_id in delivered:
                notice = self._notice_at(txn, notice_id) if _is_notice_id(notice_id) else None
                if notice is not None:
                    txn.delete(notice_id, db=self._outbox)
                    txn.delete(due_key(notice), db=self._outbox_due)
            for notice_id, attempts, next_attempt_at in retries:
                notice = self._notice_at(txn, notice_id) if _is_notice_id(notice_id) else None
                if notice is not None:
                    self._replace_notice(txn, notice, dataclasses.replace(
                        notice, attempts=attempts, next_attempt_at=next_attempt_at))

    def count_notices(self) -> int:
        with self._begin() as txn:
            return int(txn.stat(self._outbox)["entries"])

    def _spend_challenge(self, txn: lmdb.Transaction[bytes], digest: bytes, now: float) -> bool:
        """Takes one use of a challenge inside ``txn``; False if it is not usable at ``now``."""
        value = txn.get(digest, db=self._challenges)
        challenge = None if value is None else decode_challenge(digest, value)
        if challenge is None or not usable(challenge, now):
            return False
        txn.put(digest, encode_challenge(spent(challenge)), db=self._challenges)
        return True

    def get(self, serial: int) -> CertRecord | None:
        self._env_checked()
        if not 0 < serial < 1 << (8 * SERIAL_KEY_BYTES):
            return None
        key = serial_key(serial)
        with self._begin() as txn:
            value = txn.get(key, db=self._certs)
        return None if value is None else decode_record(key, value)

    def iter_records(self) -> Iterator[CertRecord]:
        for chunk in self._chunks(self._certs):
            for key, value in chunk:
                yield decode_record(key, value)

    def count(self) -> int:
        with self._begin() as txn:
            return txn.stat(self._certs)["entries"]

    def revoke(self, serial: int, reason: int, when: float,
               notices: Sequence[Notice] = ()) -> CertRecord:
        check_revocation_reason(reason)
        if type(when) not in (int, float):
            raise ValueError("when must be epoch seconds")
        check_notices(notices)
        encoded = [(notice, encode_notice(notice)) for notice in notices]
        if type(serial) is not int or not 0 < serial < 1 << (8 * SERIAL_KEY_BYTES):
            raise NotFound(f"no certificate with serial {serial!r}")
        key = serial_key(serial)
        with self._write("revoke") as txn:
            value = txn.get(key, db=self._certs)
            if value is None:
                raise NotFound(f"no certificate with serial {serial:x}")
            record = decode_record(key, value)
            if record.status == "revoked":
                return record
            revoked = dataclasses.replace(
                record, status="revoked", revoked_at=when, revocation_reason=reason
            )
            txn.put(key, encode_record(revoked), db=self._certs)
            txn.put(key, b"", db=self._revoked)
            for notice, notice_value in encoded:
                self._put_notice(txn, notice, notice_value)
        return revoked

    def count_revoked(self) -> int:
        with self._begin() as txn:
            return int(txn.stat(self._revoked)["entries"])

    def iter_revoked(self) -> Iterator[CertRecord]:
        def record_of(txn: lmdb.Transaction[bytes], key: bytes, _value: bytes) -> bytes:
            value = txn.get(key, db=self._certs)
            if value is None:
                raise LedgerCorrupt(f"revoked names serial {key.hex()}, which is not recorded")
            return value

        for chunk in self._chunks(self._revoked, record_of):
            for key, value in chunk:
                yield decode_record(key, value)

    def add_pending(self, p: PendingRequest, challenge: bytes | None = None) -> PendingRequest:
        check_pending(p, challenge)
        rkey = p.request_id.encode()
        tkey = transaction_key(p.transaction_id, p.requester_key_sha256)
        value = encode_pending(p)
        # The exception leaves the transaction, which LMDB then aborts.
        with self._write("add_pending") as txn:
            existing = txn.get(tkey, db=self._pending_txids)
            if existing is not None:
                return self._pending_at(txn, existing)
            if not txn.put(rkey, value, overwrite=False, db=self._pending):
                raise LedgerError(f"request id {p.request_id} is in use")
            if challenge is not None and not self._spend_challenge(txn, challenge,
                                                                   p.received_at):
                raise ChallengeUsedUp("the challenge is expired or used up")
            txn.put(tkey, rkey, db=self._pending_txids)
        return p

    def _pending_at(self, txn: lmdb.Transaction[bytes], key: bytes) -> PendingRequest:
        value = txn.get(key, db=self._pending)
        if value is None:
            raise LedgerCorrupt(f"pending_txids names request {key!r}, which is not recorded")
        return decode_pending(key, value)

    def find_pending(
        self, transaction_id: str, requester_key_sha256: bytes
    ) -> PendingRequest | None:
        self._env_checked()
        tkey = transaction_key(transaction_id, requester_key_sha256)
        with self._begin() as txn:
            key = txn.get(tkey, db=self._pending_txids)
            return None if key is None else self._pending_at(txn, key)

    def get_pending(self, request_id: str) -> PendingRequest | None:
        self._env_checked()
        key = request_id.encode()
        if len(key) != _REQUEST_KEY_LEN:
            return None
        with self._begin() as txn:
            value = txn.get(key, db=self._pending)
        return None if value is None else decode_pending(key, value)

    def iter_pending(self) -> Iterator[PendingRequest]:
        for chunk in self._chunks(self._pending):
            for key, value in chunk:
                yield decode_pending(key, value)

    def decide_pending(
        self, request_id: str, status: str, when: float, reason: str = ""
    ) -> PendingRequest:
        if status not in ("approved", "rejected"):
            raise ValueError('status must be "approved" or "rejected"')
        key = request_id.encode()
        with self._write("decide_pending") as txn:
            value = txn.get(key, db=self._pending) if len(key) == _REQUEST_KEY_LEN else None
            if value is None:
                raise NotFound(f"no pending request {request_id}")
            decided = decide(decode_pending(key, value), status, when, reason)
            txn.put(key, encode_pending(decided), db=self._pending)
        return decided

    def add_challenge(self, challenge: Challenge) -> None:
        if not isinstance(challenge, Challenge):
            raise TypeError("add_challenge takes a Challenge")
        value = encode_challenge(challenge)
        with self._write("add_challenge") as txn:
            if not txn.put(challenge.digest, value, overwrite=False, db=self._challenges):
                raise LedgerError("a challenge with this digest is on record already")

    def get_challenge(self, digest: bytes) -> Challenge | None:
        self._env_checked()
        if not isinstance(digest, bytes) or len(digest) != _DIGEST_LEN:
            return None
        with self._begin() as txn:
            value = txn.get(digest, db=self._challenges)
        return None if value is None else decode_challenge(digest, value)

    def _last_crl_number(self, txn: lmdb.Transaction[bytes]) -> int:
        stored = txn.get(_CRL_NUMBER_KEY, db=self._meta)
        if stored is None:
            return 0
        if len(stored) != _U64.size:
            raise LedgerCorrupt(f"ledger {self._path}: unreadable CRL number")
        return int(_U64.unpack(stored)[0])

    def next_crl_number(self) -> int:
        with self._write("next_crl_number") as txn:
            number = self._last_crl_number(txn) + 1
            txn.put(_CRL_NUMBER_KEY, _U64.pack(number), db=self._meta)
        return number

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if os.getpid() == self._pid:
            self._env.close()
            _release(self._path)

    def __enter__(self) -> LmdbLedger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- beyond the protocol --

    @property
    def path(self) -> str:
        return self._path

    def last_crl_number(self) -> int:
        """The last CRL number handed out (0 for none), without taking one."""
        with self._begin() as txn:
            return self._last_crl_number(txn)

    def advance_crl_number(self, at_least: int) -> None:
        """Makes the last CRL number at least ``at_least``; it never goes back."""
        with self._write("advance_crl_number") as txn:
            if self._last_crl_number(txn) < at_least:
                txn.put(_CRL_NUMBER_KEY, _U64.pack(at_least), db=self._meta)

    def iter_challenges(self) -> Iterator[Challenge]:
        """Every challenge, in digest order."""
        for chunk in self._chunks(self._challenges):
            for key, value in chunk:
                yield decode_challenge(key, value)

    def iter_notices(self) -> Iterator[Notice]:
        """Every notice in the outbox, in ``notice_id`` order."""
        for chunk in self._chunks(self._outbox):
            for key, value in chunk:
                yield decode_notice(key, value)

    def bulk_load(
        self, records: Iterable[CertRecord], *, records_per_transaction: int = 50_000
    ) -> int:
        """Load many records fast, for preloading and benchmarks.

        Unlike :meth:`commit`, a duplicate serial or transaction is an error
        (:class:`LedgerError`), not an outcome, and each chunk of
        ``records_per_transaction`` records is its own transaction: a failure
        keeps the chunks already loaded. Records given in ascending serial
        order, above every serial already recorded, take LMDB's append path.
        Returns the number of records loaded.
        """
        self._env_checked()
        if records_per_transaction < 1:
            raise ValueError("records_per_transaction must be positive")
        loaded = 0
        chunk: list[CertRecord] = []
        for record in records:
            chunk.append(record)
            if len(chunk) >= records_per_transaction:
                loaded += self._load_chunk(chunk)
                chunk = []
        if chunk:
            loaded += self._load_chunk(chunk)
        return loaded

    def _load_chunk(self, chunk: list[CertRecord]) -> int:
        certs_items = sorted(
            (serial_key(record.serial), encode_record(record)) for record in chunk
        )
        txid_items = sorted(
            (transaction_key(record.transaction_id, record.requester_key_sha256),
             serial_key(record.serial))
            for record in chunk
        )
        revoked_items = sorted(
            (serial_key(record.serial), b"") for record in chunk if record.status == "revoked"
        )
        try:
            with self._begin(write=True) as txn:
                for db, items in (
                    (self._certs, certs_items),
                    (self._txids, txid_items),
                    (self._revoked, revoked_items),
                ):
                    if not items:
                        continue
                    cursor = txn.cursor(db=db)
                    # MDB_APPEND skips the search for the insertion point;
                    # it is valid only above the last key already stored.
                    append = not cursor.last() or cursor.key() < items[0][0]
                    consumed, added = cursor.putmulti(items, overwrite=False, append=append)
                    if added != len(items):
                        raise LedgerError(
                            "bulk_load: duplicate serial number or transaction; "
                            "nothing of this chunk was loaded"
                        )
        except lmdb.Error as error:
            if _full_condition(self._path, error) is None:
                raise
            raise self._full("bulk_load", error) from error
        return len(chunk)
