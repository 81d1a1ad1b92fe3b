"""The issuance ledger on PostgreSQL, behind ``service.ledger.Ledger``, for several nodes.

Every node (each with its worker processes) opens its own :class:`PgLedger`
on the same database; the rules of the port hold across all of them by the
database's own guarantees, never by a lock in this code:

- ``certs.serial`` is a primary key: a serial is recorded once.
- ``txids`` maps ``(requester_key_sha256, transaction_id)`` to the serial
  of the certificate that holds the transaction, with that pair as primary
  key. A new transaction is taken by ``INSERT ... ON CONFLICT DO NOTHING``;
  a transaction whose certificate was revoked or has expired is taken over
  by an ``UPDATE`` conditional on the serial read before. When either finds
  that another node got there first (no row comes back), the whole batch is
  rolled back and decided again from what is now on record: the resend then
  gets :class:`AlreadyIssued` with the winner's certificate.
- A challenge's uses are taken by one conditional ``UPDATE ... WHERE
  uses_left >= n AND expires_at > now RETURNING``, in the transaction that
  records what they were presented for; a miss rolls the batch back and it is
  decided again, so a single-use challenge is used once across every node.
- Pending requests: ``request_id`` is the primary key and the requester's
  transaction is unique; a decision locks its row (``SELECT ... FOR
  UPDATE``) and is made once; a revocation is a conditional update
  (``WHERE status = 'issued'``), so the first one's time and reason stay.
- The outbox: a notice's id is its primary key. A claim is one ``UPDATE``
  of the rows a ``SELECT ... FOR UPDATE SKIP LOCKED`` picks, in due order
  (an index); a row another node is claiming is skipped, and one it has
  claimed is no longer due, so two nodes never hold the same lease.
- CRL numbers come from a counter row taken by one ``UPDATE ... RETURNING``:
  never handed out twice. The newest CRL of each CA is kept in ``crls``, and
  one node at a time writes CRLs (an advisory lock; see ``runtime.crl``).

``commit`` is one transaction per batch in three round trips (pipeline mode),
after the pool's check that its connection is alive (one more, an empty
query): one that reads what the batch's rules depend on, one with every
write (one row per statement, sent together, the batch's notices among
them), and the ``COMMIT``, which returns only
once PostgreSQL has flushed it (``synchronous_commit`` is set ``on`` for
every connection, whatever the server's default). A batch that conflicts
with a concurrent one (a unique violation, a miss above, a deadlock) is
retried from the start, a few times.

Connections come from a pool (``psycopg_pool``), used from the worker's
threads with psycopg's synchronous API (its asynchronous one needs asyncio;
our event loop is trio). The database unreachable, restarting or refusing
connections is :class:`LedgerUnavailable` (the service answers 503 with
Retry-After); the pool reconnects by itself once the database is back, so no
restart of the node is needed. A disk full on the database server is
:class:`LedgerFull`.

Schema: version :data:`SCHEMA_VERSION`, recorded in ``schema_version``;
created, or upgraded from an older version in one transaction, by
:func:`migrate` (``scep-fast init`` and ``scep-fast ledger migrate``).
Version 2 added the outbox. Opening a ledger checks the version and refuses
a database without the schema, with an older version (it names the
command that upgrades it) or with a version this code does not know, with
:class:`UnsupportedSchema`.

Credentials: the URL is a libpq connection URI; its password (if any) never
reaches a log line or an error message (:func:`redacted`). A password may
also come from ``password_file`` or from libpq's own ``PGPASSWORD`` /
``PGPASSFILE``; ``sslmode`` and the other URI parameters pass through to
libpq unchanged.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from scep_fast.service.ledger import (
    MAX_SERIAL,
    CertRecord,
    Challenge,
    ChallengeUsedUp,
    CommitOutcome,
    LedgerCorrupt,
    LedgerError,
    LedgerFull,
    LedgerUnavailable,
    NotFound,
    NoticeRetry,
    PendingRequest,
    Recorded,
    Renewal,
    UnsupportedSchema,
    check_claim,
    check_decision,
    check_notices,
    check_pending,
    check_retries,
    check_revocation_reason,
    commit_challenges,
    commit_renewals,
    decide,
    is_time,
    notices_to_write,
    refusal_of,
    replaced,
    usable,
)
from scep_fast.service.notices import Notice

_T = TypeVar("_T")

__all__ = [
    "SCHEMA_VERSION",
    "PgLedger",
    "is_postgres_url",
    "migrate",
    "redacted",
]

SCHEMA_VERSION: Final = 2

# How often a batch that lost a race to a concurrent one is decided again.
# Each retry reads the winner's rows, so it only conflicts again when yet
# another batch wins the same transaction or challenge meanwhile.
COMMIT_ATTEMPTS: Final = 8
DEFAULT_POOL_SIZE: Final = 4
CONNECT_TIMEOUT_SECONDS: Final = 5
# How long a caller waits for a pooled connection before the database counts
# as unavailable. Short: a worker has few threads using the ledger at once
# (fewer than the pool's connections), so a wait this long means the pool
# cannot reconnect, and the batch is better answered 503 at once.
POOL_WAIT_SECONDS: Final = 2.0
_ITER_CHUNK: Final = 512
_DIGEST_LEN: Final = 32

# One transaction at a time sets up the schema (two nodes started at once).
_MIGRATION_LOCK: Final = 0x5CE9_FA57
# One node at a time writes CRLs.
_CRL_LOCK: Final = 0x5CE9_FA58

# Version 1, as migrate created it; the versions after it are upgrades of it.
_SCHEMA_V1: Final = """
CREATE TABLE schema_version (
    version integer NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE certs (
    serial numeric(49, 0) PRIMARY KEY CHECK (serial > 0),
    der bytea NOT NULL,
    subject text NOT NULL,
    sans text[] NOT NULL,
    not_before bigint NOT NULL,
    not_after bigint NOT NULL,
    issued_at double precision NOT NULL,
    transaction_id text NOT NULL,
    requester_key_sha256 bytea NOT NULL CHECK (length(requester_key_sha256) = 32),
    csr_sha256 bytea NOT NULL CHECK (length(csr_sha256) = 32),
    profile text NOT NULL,
    status text NOT NULL CHECK (status IN ('issued', 'revoked')),
    revoked_at double precision,
    revocation_reason smallint NOT NULL DEFAULT 0,
    CHECK ((status = 'revoked') = (revoked_at IS NOT NULL))
);
-- The CRL reads the revoked certificates without reading the others.
CREATE INDEX certs_revoked ON certs (serial) WHERE status = 'revoked';
-- The certificate that holds each transaction of each requester.
CREATE TABLE txids (
    requester_key_sha256 bytea NOT NULL,
    transaction_id text NOT NULL,
    serial numeric(49, 0) NOT NULL REFERENCES certs (serial),
    PRIMARY KEY (requester_key_sha256, transaction_id)
);
CREATE TABLE pending (
    request_id text PRIMARY KEY CHECK (request_id ~ '^[0-9a-f]{16}$'),
    transaction_id text NOT NULL,
    requester_key_sha256 bytea NOT NULL,
    csr_sha256 bytea NOT NULL,
    csr_der bytea NOT NULL,
    subject text NOT NULL,
    sans text[] NOT NULL,
    profile text NOT NULL,
    received_at double precision NOT NULL,
    status text NOT NULL CHECK (status IN ('pending', 'approved', 'rejected')),
    decided_at double precision,
    reason text NOT NULL,
    UNIQUE (requester_key_sha256, transaction_id)
);
-- Only the SHA-256 of a challenge secret is stored.
CREATE TABLE challenges (
    digest bytea PRIMARY KEY CHECK (length(digest) = 32),
    created_at double precision NOT NULL,
    expires_at double precision NOT NULL,
    uses_left bigint NOT NULL CHECK (uses_left >= 0),
    profile text NOT NULL,
    subject_pattern text NOT NULL,
    label text NOT NULL,
    san_pattern text NOT NULL
);
-- The last CRL number handed out: a row, so that taking one is a write
-- that is durable on commit (a sequence's nextval is not).
CREATE TABLE crl_number (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    last bigint NOT NULL
);
INSERT INTO crl_number (last) VALUES (0);
-- The newest CRL of each CA (by its name), shared by every node.
CREATE TABLE crls (
    name text PRIMARY KEY,
    number bigint NOT NULL,
    der bytea NOT NULL
);
"""

# What takes a schema from each version to the next.
_UPGRADES: Final[dict[int, str]] = {
    1: """
-- Notices on their way to the notification sinks (service/notices.py).
CREATE TABLE outbox (
    notice_id bytea PRIMARY KEY CHECK (length(notice_id) = 16),
    sink text NOT NULL,
    event text NOT NULL CHECK (event IN ('issued', 'refused', 'revoked')),
    body bytea NOT NULL,
    created_at double precision NOT NULL,
    attempts bigint NOT NULL CHECK (attempts >= 0),
    next_attempt_at double precision NOT NULL,
    serial numeric(49, 0) CHECK (serial > 0)
);
-- Claims take the notices due first, and read only those.
CREATE INDEX outbox_due ON outbox (next_attempt_at, created_at, notice_id);
""",
}

_CERT_COLUMNS: Final = ("serial, der, subject, sans, not_before, not_after, issued_at, "
                        "transaction_id, requester_key_sha256, csr_sha256, profile, status, "
                        "revoked_at, revocation_reason")
_PENDING_COLUMNS: Final = ("request_id, transaction_id, requester_key_sha256, csr_sha256, "
                           "csr_der, subject, sans, profile, received_at, status, decided_at, "
                           "reason")
_CHALLENGE_COLUMNS: Final = ("digest, created_at, expires_at, uses_left, profile, "
                             "subject_pattern, label, san_pattern")


def _c(prefix: str, columns: str) -> str:
    return ", ".join(f"{prefix}.{name.strip()}" for name in columns.split(","))


_READ_TXIDS: Final = f"""
SELECT {_c("c", _CERT_COLUMNS)}
FROM unnest(%s::bytea[], %s::text[]) AS k(requester, tid)
JOIN txids t ON t.requester_key_sha256 = k.requester AND t.transaction_id = k.tid
JOIN certs c ON c.serial = t.serial
"""
_READ_SERIALS: Final = "SELECT serial FROM certs WHERE serial = ANY(%s::numeric[])"
_READ_CERTS: Final = f"SELECT {_CERT_COLUMNS} FROM certs WHERE serial = ANY(%s::numeric[])"
# A renewal's revocation of the certificate it replaces: only if it is still
# issued, so that another node's renewal of it (or an operator's revocation)
# since this batch read it makes the batch decide again.
_REVOKE_RENEWED: Final = ("UPDATE certs SET status = 'revoked', revoked_at = %s, "
                          "revocation_reason = %s WHERE serial = %s::numeric "
                          "AND status = 'issued' RETURNING serial")
_READ_CHALLENGES: Final = f"SELECT {_CHALLENGE_COLUMNS} FROM challenges WHERE digest = ANY(%s)"
_INSERT_CERT: Final = (f"INSERT INTO certs ({_CERT_COLUMNS}) VALUES "
                       "(%s::numeric, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)")
_TAKE_TXID: Final = ("INSERT INTO txids (requester_key_sha256, transaction_id, serial) "
                     "VALUES (%s, %s, %s::numeric) ON CONFLICT DO NOTHING RETURNING serial")
_TAKE_OVER_TXID: Final = ("UPDATE txids SET serial = %s::numeric WHERE requester_key_sha256 = %s "
                          "AND transaction_id = %s AND serial = %s::numeric RETURNING serial")
_NOTICE_COLUMNS: Final = ("notice_id, sink, event, body, created_at, attempts, "
                          "next_attempt_at, serial")
# ON CONFLICT DO NOTHING: a notice id on record already comes back as no row,
# which refuses the transaction, instead of an error that would be retried.
_INSERT_NOTICE: Final = (f"INSERT INTO outbox ({_NOTICE_COLUMNS}) VALUES "
                         "(%s, %s, %s, %s, %s, %s, %s, %s::numeric) "
                         "ON CONFLICT DO NOTHING RETURNING notice_id")
_CLAIM: Final = f"""
WITH due AS (
    SELECT notice_id, next_attempt_at AS was_due FROM outbox
    WHERE next_attempt_at <= %s
    ORDER BY next_attempt_at, created_at, notice_id
    LIMIT %s
    FOR UPDATE SKIP LOCKED)
UPDATE outbox o SET next_attempt_at = %s FROM due WHERE o.notice_id = due.notice_id
RETURNING {_c("o", _NOTICE_COLUMNS)}, due.was_due
"""
_SPEND: Final = ("UPDATE challenges SET uses_left = uses_left - %s WHERE digest = %s "
                 "AND uses_left >= %s AND expires_at > %s RETURNING digest")


# Conflicts between concurrent transactions that a retry resolves.
_RETRYABLE: Final = (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)


class _Lost(Exception):
    """A concurrent batch changed what this one was decided on; decide it again."""


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def redacted(url: str) -> str:
    """``url`` without its password, for log lines and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))


def _serial_in_range(serial: object) -> bool:
    return type(serial) is int and 0 < serial <= MAX_SERIAL


def _cert(row: Sequence[Any]) -> CertRecord:
    try:
        return CertRecord(
            serial=int(row[0]), der=bytes(row[1]), subject=row[2], sans=tuple(row[3]),
            not_before=row[4], not_after=row[5], issued_at=row[6], transaction_id=row[7],
            requester_key_sha256=bytes(row[8]), csr_sha256=bytes(row[9]), profile=row[10],
            status=row[11], revoked_at=row[12], revocation_reason=row[13])
    except (ValueError, TypeError) as error:
        raise LedgerCorrupt(f"certificate {row[0]}: {error}") from error


def _cert_params(r: CertRecord) -> tuple[Any, ...]:
    return (r.serial, r.der, r.subject, list(r.sans), r.not_before, r.not_after,
            float(r.issued_at), r.transaction_id, r.requester_key_sha256, r.csr_sha256,
            r.profile, r.status, None if r.revoked_at is None else float(r.revoked_at),
            r.revocation_reason)


def _pending(row: Sequence[Any]) -> PendingRequest:
    try:
        return PendingRequest(
            request_id=row[0], transaction_id=row[1], requester_key_sha256=bytes(row[2]),
            csr_sha256=bytes(row[3]), csr_der=bytes(row[4]), subject=row[5],
            sans=tuple(row[6]), profile=row[7], received_at=row[8], status=row[9],
            decided_at=row[10], reason=row[11])
    except (ValueError, TypeError) as error:
        raise LedgerCorrupt(f"pending request {row[0]}: {error}") from error


def _challenge(row: Sequence[Any]) -> Challenge:
    try:
        return Challenge(
            digest=bytes(row[0]), created_at=row[1], expires_at=row[2], uses_left=row[3],
            profile=row[4], subject_pattern=row[5], label=row[6], san_pattern=row[7])
    except (ValueError, TypeError) as error:
        raise LedgerCorrupt(f"challenge {bytes(row[0]).hex()}: {error}") from error


def _notice(row: Sequence[Any]) -> Notice:
    try:
        return Notice(
            notice_id=bytes(row[0]), sink=row[1], event=row[2], body=bytes(row[3]),
            created_at=row[4], attempts=row[5], next_attempt_at=row[6],
            serial=None if row[7] is None else int(row[7]))
    except (ValueError, TypeError) as error:
        raise LedgerCorrupt(f"notice {bytes(row[0]).hex()}: {error}") from error


def _notice_params(n: Notice) -> tuple[Any, ...]:
    return (n.notice_id, n.sink, n.event, n.body, float(n.created_at), n.attempts,
            float(n.next_attempt_at), n.serial)


def _answered(cursor: psycopg.Cursor[Any]) -> int:
    """How many rows an ``executemany(..., returning=True)`` got back, over all its rows."""
    answered = 0
    while True:
        answered += len(cursor.fetchall())
        if not cursor.nextset():
            return answered


def _notices_queued(conn: psycopg.Connection[Any],
                    notices: Sequence[Notice]) -> tuple[psycopg.Cursor[Any], int] | None:
    """Sends the INSERTs of ``notices`` (in a pipeline, without waiting); the cursor to
    check with :func:`_check_notices` and how many rows it must answer."""
    if not notices:
        return None
    cursor = conn.cursor()
    cursor.executemany(_INSERT_NOTICE.encode(), [_notice_params(n) for n in notices],
                       returning=True)
    return cursor, len(notices)


def _check_notices(queued: tuple[psycopg.Cursor[Any], int] | None) -> None:
    """Refuses the transaction when a notice's id was in the outbox already."""
    if queued is not None and _answered(queued[0]) != queued[1]:
        raise LedgerError("a notice id is in the outbox already; nothing was written")


def _stored_version(conn: psycopg.Connection[Any]) -> int | None:
    """The schema version on record, or None for a database without our schema."""
    found = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    if found is None or not found[0]:
        return None
    rows = conn.execute("SELECT version FROM schema_version").fetchall()
    if len(rows) != 1:
        raise LedgerCorrupt(f"schema_version holds {len(rows)} rows, expected one")
    return int(rows[0][0])


def _refuse_unknown(version: int, where: str) -> None:
    if version != SCHEMA_VERSION and version not in _UPGRADES:
        raise UnsupportedSchema(
            f"ledger {where} has schema version {version}; this version of scep-fast "
            f"reads schema version {SCHEMA_VERSION} only (a newer scep-fast wrote it?)")


def _connect_kwargs(url: str, password_file: Path | None) -> dict[str, Any]:
    """What psycopg connects with besides ``url``; these win over the URL's own parameters."""
    try:
        given = conninfo_to_dict(url)
    except psycopg.Error as error:
        raise LedgerError(f"ledger {redacted(url)}: not a connection URI") from error
    # Autocommit: a read is one round trip; writes open their transaction
    # explicitly (BEGIN goes out in the same pipeline as the statements).
    kwargs: dict[str, Any] = {
        "autocommit": True,
        # Durable on commit, whatever the server's default; options the URL
        # gives stay.
        "options": f"{given.get('options') or ''} -c synchronous_commit=on".strip(),
    }
    if "connect_timeout" not in given and "PGCONNECT_TIMEOUT" not in os.environ:
        kwargs["connect_timeout"] = CONNECT_TIMEOUT_SECONDS
    if password_file is not None:
        try:
            kwargs["password"] = password_file.read_text().strip()
        except OSError as error:
            raise LedgerError(f"cannot read the ledger password file {password_file}: "
                              f"{error.strerror}") from error
    return kwargs


def _unavailable(where: str, error: Exception) -> LedgerError:
    """The ledger error for a database error; the URL's password never appears in it."""
    if isinstance(error, psycopg.errors.DiskFull):
        return LedgerFull(f"ledger {where} is full: the database server's disk is full")
    if isinstance(error, psycopg.errors.InsufficientResources):
        return LedgerFull(f"ledger {where} is full: {type(error).__name__}")
    if isinstance(error, PoolTimeout | psycopg.OperationalError):
        return LedgerUnavailable(f"ledger {where} is unavailable: {type(error).__name__}: "
                                 f"{str(error).splitlines()[0] if str(error) else ''}")
    return LedgerError(f"ledger {where}: {type(error).__name__}: {error}")


def migrate(url: str, *, password_file: Path | None = None) -> tuple[int | None, int]:
    """Creates the schema in the database at ``url``, or upgrades an older one.

    One transaction: a failure leaves the database as it was. Returns the
    version found (None for none) and the version now. A version this code
    does not know is refused with :class:`UnsupportedSchema` and left alone.
    """
    where = redacted(url)
    try:
        with psycopg.connect(url, **_connect_kwargs(url, password_file)) as conn, \
                conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            found = _stored_version(conn)
            if found is not None:
                _refuse_unknown(found, where)
            else:
                conn.execute(_SCHEMA_V1)
                conn.execute("INSERT INTO schema_version (version) VALUES (1)")
            version = 1 if found is None else found
            while version < SCHEMA_VERSION:
                conn.execute(_UPGRADES[version])
                version += 1
            if found != SCHEMA_VERSION:
                conn.execute("UPDATE schema_version SET version = %s, applied_at = now()",
                             (SCHEMA_VERSION,))
    except psycopg.Error as error:
        raise _unavailable(where, error) from error
    return found, SCHEMA_VERSION


class PgLedger:
    """A :class:`~scep_fast.service.ledger.Ledger` in a PostgreSQL database.

    ``url`` is a ``postgresql://`` URI. The database must hold the schema
    (:func:`migrate`); its version is checked here. ``on_full(what, error)``
    is told of each write refused for want of room, as for LMDB.
    """

    def __init__(
        self,
        url: str,
        *,
        password_file: Path | None = None,
        pool_size: int = DEFAULT_POOL_SIZE,
        on_full: Callable[[str, LedgerFull], None] = lambda _what, _error: None,
    ) -> None:
        self._where = redacted(url)
        self._url = url
        self._kwargs = _connect_kwargs(url, password_file)
        self._on_full = on_full
        self._closed = True
        self._pool = ConnectionPool(
            url, kwargs=self._kwargs, min_size=1, max_size=pool_size,
            open=False, timeout=POOL_WAIT_SECONDS, name="scep-fast-ledger",
            # A connection broken while it sat in the pool (the database
            # restarted) is replaced before it is handed out.
            check=ConnectionPool.check_connection,
            # A failed connection attempt is not retried in the background
            # with a growing backoff: the next caller that needs a connection
            # makes a new attempt, so the node is back as soon as the database.
            reconnect_timeout=0)
        try:
            self._pool.open(wait=True, timeout=POOL_WAIT_SECONDS)
        except PoolTimeout as error:
            self._pool.close()
            raise LedgerUnavailable(f"ledger {self._where} is unavailable: cannot connect "
                                    f"within {POOL_WAIT_SECONDS:g} s") from error
        self._closed = False
        try:
            with self._connection("open") as conn:
                found = _stored_version(conn)
            if found is None:
                raise UnsupportedSchema(
                    f"ledger {self._where} has no scep-fast schema: run "
                    "`scep-fast ledger migrate --dir DIR` (or `scep-fast init`) first")
            _refuse_unknown(found, self._where)
            if found != SCHEMA_VERSION:
                raise UnsupportedSchema(
                    f"ledger {self._where} has schema version {found}, older than the "
                    f"version {SCHEMA_VERSION} this version of scep-fast uses: run "
                    "`scep-fast ledger migrate --dir DIR` to upgrade it")
        except BaseException:
            self.close()
            raise

    # -- internals --

    @contextmanager
    def _connection(self, what: str) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection; database failures become ledger errors."""
        if self._closed:
            raise LedgerError("ledger is closed")
        try:
            with self._pool.connection() as conn:
                yield conn
        except (psycopg.Error, PoolTimeout) as error:
            if isinstance(error, (psycopg.errors.UniqueViolation, *_RETRYABLE)):
                raise
            failure = _unavailable(self._where, error)
            if isinstance(failure, LedgerFull):
                self._on_full(what, failure)
            raise failure from error

    def _rows(self, query: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        with self._connection("read") as conn:
            return conn.execute(query.encode(), params).fetchall()

    def _chunks(self, where: str) -> Iterator[CertRecord]:
        """Certificates in serial order, a short query per chunk (no long transaction)."""
        after = Decimal(0)
        while True:
            rows = self._rows(f"SELECT {_CERT_COLUMNS} FROM certs WHERE serial > %s {where} "
                              f"ORDER BY serial LIMIT {_ITER_CHUNK}", (after,))
            for row in rows:
                yield _cert(row)
            if len(rows) < _ITER_CHUNK:
                return
            after = rows[-1][0]

    # -- the Ledger protocol --

    def find_transaction(
        self, transaction_id: str, requester_key_sha256: bytes
    ) -> CertRecord | None:
        ((record, _pending_request),) = self.find_transactions(
            [(transaction_id, requester_key_sha256)])
        return record

    def find_transactions(
        self, keys: Sequence[tuple[str, bytes]]
    ) -> list[tuple[CertRecord | None, PendingRequest | None]]:
        if not keys:
            if self._closed:
                raise LedgerError("ledger is closed")
            return []
        query = f"""
            SELECT k.ord, {_c("c", _CERT_COLUMNS)}, {_c("p", _PENDING_COLUMNS)}
            FROM unnest(%s::bytea[], %s::text[]) WITH ORDINALITY AS k(requester, tid, ord)
            LEFT JOIN txids t
                ON t.requester_key_sha256 = k.requester AND t.transaction_id = k.tid
            LEFT JOIN certs c ON c.serial = t.serial
            LEFT JOIN pending p
                ON p.requester_key_sha256 = k.requester AND p.transaction_id = k.tid
            ORDER BY k.ord"""
        rows = self._rows(query, ([bytes(k) for _t, k in keys], [t for t, _k in keys]))
        width = len(_CERT_COLUMNS.split(","))
        return [(None if row[1] is None else _cert(row[1:1 + width]),
                 None if row[1 + width] is None else _pending(row[1 + width:]))
                for row in rows]

    def commit(
        self, records: Sequence[CertRecord], challenges: Sequence[bytes | None] = (),
        notices: Sequence[Notice] = (), renewals: Sequence[Renewal | None] = (),
    ) -> list[CommitOutcome]:
        presented = commit_challenges(records, challenges)
        renewing = commit_renewals(records, renewals)
        check_notices(notices)
        if self._closed:
            raise LedgerError("ledger is closed")
        if not records:
            # Only notices without a serial can be written: no record is.
            self.add_notices(notices_to_write(notices, []))
            return []
        for _attempt in range(COMMIT_ATTEMPTS):
            try:
                with self._connection("commit") as conn:
                    return self._commit_once(conn, records, presented, renewing, notices)
            except (_Lost, psycopg.errors.UniqueViolation, *_RETRYABLE):
                continue
        raise LedgerError(f"ledger {self._where}: a batch lost {COMMIT_ATTEMPTS} races with "
                          "concurrent batches in a row; nothing of it was recorded")

    def _commit_once(self, conn: psycopg.Connection[Any], records: Sequence[CertRecord],
                     presented: Sequence[bytes | None], renewing: Sequence[Renewal | None],
                     notices: Sequence[Notice]) -> list[CommitOutcome]:
        keys = sorted({(r.requester_key_sha256, r.transaction_id) for r in records})
        digests = sorted({d for d in presented if d is not None})
        renewed_serials = sorted({r.serial for r in renewing if r is not None})
        with conn.pipeline(), conn.transaction():
            # Round trip 1: what the rules of this batch depend on.
            holders = conn.execute(_READ_TXIDS.encode(), ([k for k, _ in keys],
                                                          [t for _, t in keys]))
            taken = conn.execute(_READ_SERIALS.encode(), ([r.serial for r in records],))
            kept = conn.execute(_READ_CHALLENGES.encode(), (digests,))
            renewed_rows = conn.execute(_READ_CERTS.encode(), (renewed_serials,)) \
                if renewed_serials else None
            held: dict[tuple[bytes, str], CertRecord] = {}
            for row in holders.fetchall():
                record = _cert(row)
                held[(record.requester_key_sha256, record.transaction_id)] = record
            serials = {int(row[0]) for row in taken.fetchall()}
            uses: dict[bytes, Challenge] = {}
            for row in kept.fetchall():
                stored = _challenge(row)
                uses[stored.digest] = stored
            current: dict[int, CertRecord] = {}
            for row in renewed_rows.fetchall() if renewed_rows is not None else ():
                renewed_record = _cert(row)
                current[renewed_record.serial] = renewed_record

            # The rules, record by record, as MemoryLedger applies them.
            before = dict(held)
            outcomes: list[CommitOutcome] = []
            written: list[CertRecord] = []
            spent: dict[bytes, tuple[int, float]] = {}

            def take_use(digest: bytes, issued_at: float) -> bool:
                challenge = uses.get(digest)
                if challenge is None or not usable(challenge, issued_at):
                    return False
                uses[digest] = dataclasses.replace(challenge, uses_left=challenge.uses_left - 1)
                count, latest = spent.get(digest, (0, issued_at))
                spent[digest] = (count + 1, max(latest, issued_at))
                return True

            revocations: list[tuple[Any, ...]] = []
            for record, digest, renewal in zip(records, presented, renewing, strict=True):
                key = (record.requester_key_sha256, record.transaction_id)
                holder = held.get(key)
                renewed = None if renewal is None else current.get(renewal.serial)
                refused = refusal_of(record, digest, holder, serials.__contains__, take_use,
                                     renewal, renewed)
                if refused is not None:
                    outcomes.append(refused)
                else:
                    serials.add(record.serial)
                    held[key] = record
                    written.append(record)
                    revoked = replaced(record, renewal, renewed)
                    if revoked is not None:
                        current[revoked.serial] = revoked
                        revocations.append((revoked.revoked_at, revoked.revocation_reason,
                                            revoked.serial))
                    outcomes.append(Recorded(record))
            # The outcomes are known before anything is written; a write
            # that finds the database changed meanwhile rolls everything
            # back below, these notices with it.
            to_notify = notices_to_write(notices, outcomes)
            if not written and not to_notify:
                return outcomes

            # Round trip 2: every write, each conditional on what was read.
            if written:
                cursor = conn.cursor()
                cursor.executemany(_INSERT_CERT.encode(), [_cert_params(r) for r in written])
            taking: list[tuple[Any, ...]] = []
            taking_over: list[tuple[Any, ...]] = []
            for key in keys:
                now_held, was_held = held.get(key), before.get(key)
                if now_held is None or now_held is was_held:
                    continue
                if was_held is None:
                    taking.append((key[0], key[1], now_held.serial))
                else:
                    taking_over.append((now_held.serial, key[0], key[1], was_held.serial))
            checks: list[tuple[psycopg.Cursor[Any], int]] = []
            for query, rows in ((_TAKE_TXID, taking), (_TAKE_OVER_TXID, taking_over),
                                (_SPEND, [(count, digest, count, latest)
                                          for digest, (count, latest) in sorted(spent.items())]),
                                (_REVOKE_RENEWED, revocations)):
                if rows:
                    checked = conn.cursor()
                    checked.executemany(query.encode(), rows, returning=True)
                    checks.append((checked, len(rows)))
            queued = _notices_queued(conn, to_notify)
            for checked, expected in checks:
                if _answered(checked) != expected:
                    # Another node took a transaction or a use first: roll
                    # back and decide the batch again from what it recorded.
                    raise _Lost()
            _check_notices(queued)
        # Leaving the transaction sent COMMIT, durable when it returned.
        return outcomes

    def get(self, serial: int) -> CertRecord | None:
        if not _serial_in_range(serial):
            if self._closed:
                raise LedgerError("ledger is closed")
            return None
        rows = self._rows(f"SELECT {_CERT_COLUMNS} FROM certs WHERE serial = %s::numeric",
                          (serial,))
        return _cert(rows[0]) if rows else None

    def iter_records(self) -> Iterator[CertRecord]:
        return self._chunks("")

    def count(self) -> int:
        return int(self._rows("SELECT count(*) FROM certs")[0][0])

    def revoke(self, serial: int, reason: int, when: float,
               notices: Sequence[Notice] = ()) -> CertRecord:
        check_revocation_reason(reason)
        if not is_time(when):
            raise ValueError("when must be epoch seconds")
        check_notices(notices)
        if not _serial_in_range(serial):
            raise NotFound(f"no certificate with serial {serial!r}")
        with self._connection("revoke") as conn, conn.transaction():
            row = conn.execute(
                f"UPDATE certs SET status = 'revoked', revoked_at = %s, revocation_reason = %s "
                f"WHERE serial = %s::numeric AND status = 'issued' RETURNING {_CERT_COLUMNS}"
                .encode(), (float(when), reason, serial)).fetchone()
            if row is not None:
                # Revoked now, not before: its notices go with it.
                _check_notices(_notices_queued(conn, notices))
            else:
                row = conn.execute(f"SELECT {_CERT_COLUMNS} FROM certs WHERE serial = %s::numeric"
                                   .encode(), (serial,)).fetchone()
        if row is None:
            raise NotFound(f"no certificate with serial {serial:x}")
        return _cert(row)

    def count_revoked(self) -> int:
        return int(self._rows("SELECT count(*) FROM certs WHERE status = 'revoked'")[0][0])

    def add_notices(self, notices: Sequence[Notice]) -> None:
        check_notices(notices)
        if self._closed:
            raise LedgerError("ledger is closed")
        if not notices:
            return
        with self._connection("add_notices") as conn, conn.transaction():
            _check_notices(_notices_queued(conn, notices))

    def claim_notices(self, now: float, limit: int, lease_seconds: float) -> list[Notice]:
        check_claim(now, limit, lease_seconds)
        if limit == 0:
            if self._closed:
                raise LedgerError("ledger is closed")
            return []
        # One statement, its own transaction (autocommit), durable on return.
        rows = self._rows(_CLAIM, (float(now), limit, float(now + lease_seconds)))
        # RETURNING keeps no order: sort by when each was due.
        rows.sort(key=lambda row: (row[-1], row[4], bytes(row[0])))
        return [_notice(row[:-1]) for row in rows]

    def settle_notices(self, delivered: Sequence[bytes] = (),
                       retries: Sequence[NoticeRetry] = ()) -> None:
        check_retries(retries)
        if self._closed:
            raise LedgerError("ledger is closed")
        gone = [i for i in delivered if isinstance(i, bytes)]  # anything else: unknown
        later = [(a, float(t), i) for i, a, t in retries if isinstance(i, bytes)]
        if not gone and not later:
            return
        with self._connection("settle_notices") as conn, conn.transaction():
            if gone:
                conn.execute(b"DELETE FROM outbox WHERE notice_id = ANY(%s)", (gone,))
            if later:
                with conn.cursor() as cur:
                    cur.executemany(b"UPDATE outbox SET attempts = %s, next_attempt_at = %s "
                                    b"WHERE notice_id = %s", later)

    def count_notices(self) -> int:
        return int(self._rows("SELECT count(*) FROM outbox")[0][0])

    def iter_revoked(self) -> Iterator[CertRecord]:
        return self._chunks("AND status = 'revoked'")

    def add_pending(self, p: PendingRequest, challenge: bytes | None = None) -> PendingRequest:
        check_pending(p, challenge)
        for _attempt in range(COMMIT_ATTEMPTS):
            try:
                with self._connection("add_pending") as conn:
                    return self._add_pending_once(conn, p, challenge)
            except (_Lost, *_RETRYABLE):
                continue
        raise LedgerError(f"ledger {self._where}: add_pending lost {COMMIT_ATTEMPTS} races")

    def _add_pending_once(self, conn: psycopg.Connection[Any], p: PendingRequest,
                          challenge: bytes | None) -> PendingRequest:
        select = (f"SELECT {_PENDING_COLUMNS} FROM pending "
                  "WHERE requester_key_sha256 = %s AND transaction_id = %s").encode()
        with conn.transaction():
            row = conn.execute(select, (p.requester_key_sha256, p.transaction_id)).fetchone()
            if row is not None:
                return _pending(row)
            inserted = conn.execute(
                f"INSERT INTO pending ({_PENDING_COLUMNS}) VALUES "
                "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT DO NOTHING RETURNING request_id".encode(),
                (p.request_id, p.transaction_id, p.requester_key_sha256, p.csr_sha256,
                 p.csr_der, p.subject, list(p.sans), p.profile, float(p.received_at), p.status,
                 None, p.reason)).fetchone()
            if inserted is None:
                # The transaction was recorded meanwhile (then the retry
                # returns it), or the request id belongs to another one.
                row = conn.execute(select, (p.requester_key_sha256, p.transaction_id)).fetchone()
                if row is None:
                    raise LedgerError(f"request id {p.request_id} is in use")
                raise _Lost()
            if challenge is not None and conn.execute(
                    _SPEND.encode(), (1, challenge, 1, float(p.received_at))).fetchone() is None:
                raise ChallengeUsedUp("the challenge is expired or used up")
        return p

    def find_pending(
        self, transaction_id: str, requester_key_sha256: bytes
    ) -> PendingRequest | None:
        rows = self._rows(f"SELECT {_PENDING_COLUMNS} FROM pending "
                          "WHERE requester_key_sha256 = %s AND transaction_id = %s",
                          (requester_key_sha256, transaction_id))
        return _pending(rows[0]) if rows else None

    def get_pending(self, request_id: str) -> PendingRequest | None:
        rows = self._rows(f"SELECT {_PENDING_COLUMNS} FROM pending WHERE request_id = %s",
                          (request_id,))
        return _pending(rows[0]) if rows else None

    def iter_pending(self) -> Iterator[PendingRequest]:
        return self._by_key("pending", _PENDING_COLUMNS, "request_id", "", _pending)

    def _by_key(self, table: str, columns: str, key: str, first: object,
                decode: Callable[[Any], _T]) -> Iterator[_T]:
        """Every row of ``table`` in ``key`` order, a chunk per query (keyset
        pagination: no cursor held open between chunks). ``key`` is the first column."""
        after = first
        while True:
            rows = self._rows(f"SELECT {columns} FROM {table} WHERE {key} > %s "
                              f"ORDER BY {key} LIMIT {_ITER_CHUNK}", (after,))
            for row in rows:
                yield decode(row)
            if len(rows) < _ITER_CHUNK:
                return
            after = rows[-1][0]

    def decide_pending(
        self, request_id: str, status: str, when: float, reason: str = ""
    ) -> PendingRequest:
        check_decision(status, when)
        with self._connection("decide_pending") as conn, conn.transaction():
            row = conn.execute(f"SELECT {_PENDING_COLUMNS} FROM pending WHERE request_id = %s "
                               "FOR UPDATE".encode(), (request_id,)).fetchone()
            if row is None:
                raise NotFound(f"no pending request {request_id}")
            # decide() refuses a request decided already (the row is locked).
            decided = decide(_pending(row), status, when, reason)
            conn.execute(b"UPDATE pending SET status = %s, decided_at = %s, reason = %s "
                         b"WHERE request_id = %s",
                         (decided.status, float(when), decided.reason, request_id))
        return decided

    def add_challenge(self, challenge: Challenge) -> None:
        if not isinstance(challenge, Challenge):
            raise TypeError("add_challenge takes a Challenge")
        c = challenge
        with self._connection("add_challenge") as conn:
            row = conn.execute(
                f"INSERT INTO challenges ({_CHALLENGE_COLUMNS}) VALUES "
                "(%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING digest"
                .encode(), (c.digest, float(c.created_at), float(c.expires_at), c.uses_left,
                            c.profile, c.subject_pattern, c.label, c.san_pattern)).fetchone()
        if row is None:
            raise LedgerError("a challenge with this digest is on record already")

    def get_challenge(self, digest: bytes) -> Challenge | None:
        if not isinstance(digest, bytes) or len(digest) != _DIGEST_LEN:
            return None
        rows = self._rows(f"SELECT {_CHALLENGE_COLUMNS} FROM challenges WHERE digest = %s",
                          (digest,))
        return _challenge(rows[0]) if rows else None

    def next_crl_number(self) -> int:
        with self._connection("next_crl_number") as conn, conn.transaction():
            number = conn.execute(
                b"UPDATE crl_number SET last = last + 1 RETURNING last").fetchone()
        if number is None:
            raise LedgerCorrupt(f"ledger {self._where}: the CRL number row is missing")
        return int(number[0])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.close()

    def __enter__(self) -> PgLedger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- beyond the protocol --

    @property
    def where(self) -> str:
        """The database, for messages: the URL without its password."""
        return self._where

    def last_crl_number(self) -> int:
        """The last CRL number handed out (0 for none), without taking one."""
        return int(self._rows("SELECT last FROM crl_number")[0][0])

    def advance_crl_number(self, at_least: int) -> None:
        """Makes the last CRL number at least ``at_least``; it never goes back."""
        with self._connection("advance_crl_number") as conn:
            conn.execute(b"UPDATE crl_number SET last = greatest(last, %s)", (at_least,))

    @contextmanager
    def crl_writer(self) -> Iterator[None]:
        """Holds the database's CRL lock: one node at a time writes CRLs.

        The lock lives on a connection of its own, outside the pool, which
        the writer needs meanwhile; it goes when that connection closes,
        also when this process dies.
        """
        if self._closed:
            raise LedgerError("ledger is closed")
        try:
            conn = psycopg.connect(self._url, **self._kwargs)
        except psycopg.Error as error:
            raise _unavailable(self._where, error) from error
        with conn:
            try:
                conn.execute(b"SELECT pg_advisory_lock(%s)", (_CRL_LOCK,))
            except psycopg.Error as error:
                raise _unavailable(self._where, error) from error
            yield

    def newest_crl(self, name: str) -> bytes | None:
        rows = self._rows("SELECT der FROM crls WHERE name = %s", (name,))
        return bytes(rows[0][0]) if rows else None

    def store_crl(self, name: str, number: int, der: bytes) -> None:
        with self._connection("store_crl") as conn:
            conn.execute(b"INSERT INTO crls (name, number, der) VALUES (%s, %s, %s) "
                         b"ON CONFLICT (name) DO UPDATE SET number = EXCLUDED.number, "
                         b"der = EXCLUDED.der WHERE crls.number < EXCLUDED.number",
                         (name, number, der))

    def iter_notices(self) -> Iterator[Notice]:
        """Every notice in the outbox, in ``notice_id`` order."""
        return self._by_key("outbox", _NOTICE_COLUMNS, "notice_id", b"", _notice)

    def iter_challenges(self) -> Iterator[Challenge]:
        """Every challenge, in digest order."""
        return self._by_key("challenges", _CHALLENGE_COLUMNS, "digest", b"", _challenge)
