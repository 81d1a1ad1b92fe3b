"""The issuance ledger on LMDB: the adapter behind ``service.ledger.Ledger``.

Layout (schema version 1), three named databases in one environment:

``meta``
    ``b"schema_version"`` -> big-endian uint32. A ledger with another
    version is refused when opened (:class:`UnsupportedSchema`).
``certs``
    serial -> record. The key is the serial as 20 big-endian octets, so
    LMDB's byte order is numeric order and iteration is by serial.
``txids``
    requester key SHA-256 (32 octets) + transaction id (UTF-8) -> serial key.
    The key hash has a fixed length, so the concatenation is unambiguous.

Record format 1 (the value in ``certs``), all integers big-endian::

    u8   format version (1)
    u8   status (1 issued, 2 revoked)
    i64  not_before, epoch seconds
    i64  not_after, epoch seconds
    f64  issued_at, epoch seconds
    32   requester key SHA-256
    32   CSR SHA-256
    u16  subject length     u16 transaction id length
    u16  profile length     u16 number of SANs
    u32  DER length
    subject, transaction id, profile (UTF-8)
    per SAN: u16 length + UTF-8
    DER

The leading version byte lets a later format (revocation fields) live
beside this one; decoding refuses unknown versions, truncation and trailing
bytes with :class:`LedgerCorrupt`.

Durability and concurrency: the environment is opened with ``sync=True``
and ``metasync=True``, so ``commit`` returns only after LMDB has flushed the
transaction to disk. LMDB admits one writer at a time across all processes;
``commit`` takes the write lock once per batch and encodes the records
before taking it, so the lock is held only for the B-tree work and the sync.

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

Use: open one :class:`LmdbLedger` per process, after the process has started
(spawn, never inherited across ``fork()``), and close it on shutdown.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Final

import lmdb

from scep_fast.service.ledger import (
    AlreadyIssued,
    CertRecord,
    CommitOutcome,
    LedgerCorrupt,
    LedgerError,
    LedgerFull,
    Recorded,
    SerialCollision,
    TransactionConflict,
    UnsupportedSchema,
)

__all__ = [
    "DEFAULT_MAP_SIZE_BYTES",
    "DEFAULT_MAX_READERS",
    "RECORD_FORMAT",
    "SCHEMA_VERSION",
    "LmdbLedger",
    "decode_record",
    "encode_record",
    "serial_key",
    "transaction_key",
]

GIB: Final = 1024 * 1024 * 1024

DEFAULT_MAP_SIZE_BYTES: Final = 8 * GIB
DEFAULT_MAX_READERS: Final = 1024
# certs, txids, meta, and room for the indexes still to come (subjects,
# challenges, pending) without a change of environment flags.
MAX_DBS: Final = 16

SCHEMA_VERSION: Final = 1
RECORD_FORMAT: Final = 1

SERIAL_KEY_BYTES: Final = 20

_SCHEMA_KEY: Final = b"schema_version"
_U32: Final = struct.Struct(">I")
_U16: Final = struct.Struct(">H")
_HEADER: Final = struct.Struct(">BBqqd32s32sHHHHI")

_STATUS_CODES: Final = {"issued": 1, "revoked": 2}
_STATUS_NAMES: Final = {code: name for name, code in _STATUS_CODES.items()}

# Records are read and yielded in chunks, each chunk in its own short read
# transaction: a slow consumer of iter_records() never pins an old snapshot
# (which would stop LMDB from reusing freed pages) or a reader slot.
_ITER_CHUNK: Final = 512

_DATA_FILE_MODE: Final = 0o600
_DIRECTORY_MODE: Final = 0o700


# --- Encoding ----------------------------------------------------------------


def serial_key(serial: int) -> bytes:
    """The ``certs`` key of a serial number: 20 big-endian octets."""
    return serial.to_bytes(SERIAL_KEY_BYTES, "big")


def transaction_key(transaction_id: str, requester_key_sha256: bytes) -> bytes:
    """The ``txids`` key of a transaction of one requester."""
    return requester_key_sha256 + transaction_id.encode()


def encode_record(record: CertRecord) -> bytes:
    """Record format 1 (see the module docstring)."""
    subject = record.subject.encode()
    transaction_id = record.transaction_id.encode()
    profile = record.profile.encode()
    parts = [
        _HEADER.pack(
            RECORD_FORMAT,
            _STATUS_CODES[record.status],
            record.not_before,
            record.not_after,
            float(record.issued_at),
            record.requester_key_sha256,
            record.csr_sha256,
            len(subject),
            len(transaction_id),
            len(profile),
            len(record.sans),
            len(record.der),
        ),
        subject,
        transaction_id,
        profile,
    ]
    for san in record.sans:
        encoded = san.encode()
        parts.append(_U16.pack(len(encoded)))
        parts.append(encoded)
    parts.append(record.der)
    return b"".join(parts)


def decode_record(key: bytes, value: bytes) -> CertRecord:
    """Decode a ``certs`` entry, or raise :class:`LedgerCorrupt`."""
    if len(key) != SERIAL_KEY_BYTES:
        raise LedgerCorrupt(f"certs key of {len(key)} bytes, expected {SERIAL_KEY_BYTES}")
    serial = int.from_bytes(key, "big")
    where = f"record of serial {serial:x}"
    if not value:
        raise LedgerCorrupt(f"{where}: empty")
    if value[0] != RECORD_FORMAT:
        raise LedgerCorrupt(f"{where}: unknown record format {value[0]}")
    if len(value) < _HEADER.size:
        raise LedgerCorrupt(f"{where}: truncated header ({len(value)} bytes)")
    (
        _version,
        status_code,
        not_before,
        not_after,
        issued_at,
        requester_key_sha256,
        csr_sha256,
        subject_len,
        transaction_id_len,
        profile_len,
        san_count,
        der_len,
    ) = _HEADER.unpack_from(value)
    status = _STATUS_NAMES.get(status_code)
    if status is None:
        raise LedgerCorrupt(f"{where}: unknown status code {status_code}")
    view = memoryview(value)
    offset = _HEADER.size

    def take(length: int) -> bytes:
        nonlocal offset
        end = offset + length
        if end > len(value):
            raise LedgerCorrupt(f"{where}: truncated")
        chunk = bytes(view[offset:end])
        offset = end
        return chunk

    try:
        subject = take(subject_len).decode()
        transaction_id = take(transaction_id_len).decode()
        profile = take(profile_len).decode()
        sans = []
        for _ in range(san_count):
            (san_len,) = _U16.unpack(take(_U16.size))
            sans.append(take(san_len).decode())
        der = take(der_len)
    except UnicodeDecodeError as error:
        raise LedgerCorrupt(f"{where}: text is not UTF-8") from error
    if offset != len(value):
        raise LedgerCorrupt(f"{where}: {len(value) - offset} trailing bytes")
    try:
        return CertRecord(
            serial=serial,
            der=der,
            subject=subject,
            sans=tuple(sans),
            not_before=not_before,
            not_after=not_after,
            issued_at=issued_at,
            transaction_id=transaction_id,
            requester_key_sha256=requester_key_sha256,
            csr_sha256=csr_sha256,
            profile=profile,
            status=status,
        )
    except ValueError as error:
        raise LedgerCorrupt(f"{where}: {error}") from error


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


def _prepare_directory(path: Path) -> None:
    path.mkdir(mode=_DIRECTORY_MODE, parents=True, exist_ok=True)
    os.chmod(path, _DIRECTORY_MODE)


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
    ) -> None:
        directory = Path(path)
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
                if version != SCHEMA_VERSION:
                    raise UnsupportedSchema(
                        f"ledger {self._path} has schema version {version}; this version "
                        f"of scep-fast reads schema version {SCHEMA_VERSION} only"
                    )
            elif len(env.dbs(txn)) > 1:
                # A fresh ledger holds nothing but the meta database just made.
                raise LedgerCorrupt(f"ledger {self._path} has databases but no schema version")
            else:
                txn.put(_SCHEMA_KEY, _U32.pack(SCHEMA_VERSION), db=meta)
            self._certs = env.open_db(b"certs", txn=txn)
            self._txids = env.open_db(b"txids", txn=txn)

    # -- internals --

    def _env_checked(self) -> lmdb.Environment:
        if self._closed:
            raise LedgerError("ledger is closed")
        if os.getpid() != self._pid:
            raise LedgerError("ledger was opened in another process; open one per process")
        return self._env

    def _record_at(self, txn: lmdb.Transaction[bytes], key: bytes) -> CertRecord:
        value = txn.get(key, db=self._certs)
        if value is None:
            raise LedgerCorrupt(f"txids points at serial {key.hex()}, which is not recorded")
        return decode_record(key, value)

    # -- the Ledger protocol --

    def find_transaction(
        self, transaction_id: str, requester_key_sha256: bytes
    ) -> CertRecord | None:
        env = self._env_checked()
        with env.begin() as txn:
            key = txn.get(transaction_key(transaction_id, requester_key_sha256), db=self._txids)
            return None if key is None else self._record_at(txn, key)

    def commit(self, records: Sequence[CertRecord]) -> list[CommitOutcome]:
        env = self._env_checked()
        if not records:
            return []
        for record in records:
            if not isinstance(record, CertRecord):
                raise TypeError("commit takes CertRecord values")
        # Encode before taking the write lock, which every process shares.
        prepared = [
            (
                record,
                serial_key(record.serial),
                transaction_key(record.transaction_id, record.requester_key_sha256),
                encode_record(record),
            )
            for record in records
        ]
        outcomes: list[CommitOutcome] = []
        certs, txids = self._certs, self._txids
        try:
            with env.begin(write=True) as txn:
                for record, skey, tkey, value in prepared:
                    existing_key = txn.get(tkey, db=txids)
                    if existing_key is not None:
                        existing = self._record_at(txn, existing_key)
                        if existing.csr_sha256 == record.csr_sha256:
                            outcomes.append(AlreadyIssued(existing))
                        else:
                            outcomes.append(TransactionConflict(existing))
                    elif not txn.put(skey, value, overwrite=False, db=certs):
                        outcomes.append(SerialCollision(record.serial))
                    else:
                        txn.put(tkey, skey, db=txids)
                        outcomes.append(Recorded(record))
        except lmdb.MapFullError as error:
            raise LedgerFull(
                f"ledger {self._path} is full (map size {env.info()['map_size']} bytes); "
                "raise the configured map size"
            ) from error
        except lmdb.Error as error:
            raise LedgerError(f"ledger {self._path}: commit failed: {error}") from error
        return outcomes

    def get(self, serial: int) -> CertRecord | None:
        env = self._env_checked()
        if not 0 < serial < 1 << (8 * SERIAL_KEY_BYTES):
            return None
        key = serial_key(serial)
        with env.begin() as txn:
            value = txn.get(key, db=self._certs)
        return None if value is None else decode_record(key, value)

    def iter_records(self) -> Iterator[CertRecord]:
        env = self._env_checked()
        after: bytes | None = None
        while True:
            chunk: list[tuple[bytes, bytes]] = []
            with env.begin() as txn:
                cursor = txn.cursor(db=self._certs)
                if after is None:
                    found = cursor.first()
                else:
                    found = cursor.set_range(after)
                    if found and cursor.key() == after:
                        found = cursor.next()
                while found and len(chunk) < _ITER_CHUNK:
                    chunk.append((cursor.key(), cursor.value()))
                    found = cursor.next()
            for key, value in chunk:
                yield decode_record(key, value)
            if not found:
                return
            after = chunk[-1][0]

    def count(self) -> int:
        env = self._env_checked()
        with env.begin() as txn:
            return txn.stat(self._certs)["entries"]

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
        env = self._env_checked()
        if records_per_transaction < 1:
            raise ValueError("records_per_transaction must be positive")
        loaded = 0
        chunk: list[CertRecord] = []
        for record in records:
            chunk.append(record)
            if len(chunk) >= records_per_transaction:
                loaded += self._load_chunk(env, chunk)
                chunk = []
        if chunk:
            loaded += self._load_chunk(env, chunk)
        return loaded

    def _load_chunk(self, env: lmdb.Environment, chunk: list[CertRecord]) -> int:
        certs_items = sorted(
            (serial_key(record.serial), encode_record(record)) for record in chunk
        )
        txid_items = sorted(
            (transaction_key(record.transaction_id, record.requester_key_sha256),
             serial_key(record.serial))
            for record in chunk
        )
        try:
            with env.begin(write=True) as txn:
                for db, items in ((self._certs, certs_items), (self._txids, txid_items)):
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
        except lmdb.MapFullError as error:
            raise LedgerFull(
                f"ledger {self._path} is full; raise the configured map size"
            ) from error
        return len(chunk)
