"""SCEP enrollment load generator: many distinct PKCSReqs over keep-alive connections.

    python benchmarks/loadgen.py prepare --ra-cert ra.pem --count 20000 --challenge S
    python benchmarks/loadgen.py run http://127.0.0.1:8080/scep --challenge S \\
        --count 10000 --concurrency 64 [--method get] [--duration 15] \\
        [--server-pid PID] [--verify all|N] [--json-out run.json]
    python benchmarks/loadgen.py run URL1 URL2 --server-pid PID1 --server-pid PID2 \\
        --db-pid PID ...    # several nodes of one CA, one database

Requests are built before anything is timed and cached on disk under
``benchmarks/results/cache/``, keyed by the SHA-256 of the RA certificate
they are encrypted to and by the request parameters; ``run`` fetches the RA
with GetCACert, then loads (or builds, with a progress bar) the set. Every
request has its own CN and transactionID; the device keys come from a small
pool (RSA-2048 by default), which the server cannot tell from fresh keys.
Each request is used once per run: send a set again to the same ledger and
the server answers from its ledger (a resend) instead of issuing.

The timed part is one asyncio loop driving ``--concurrency`` connections,
each sending its next request as soon as the previous answer is complete
(hand-written HTTP/1.1: Content-Length or chunked framing, keep-alive,
reconnect when the server closes). The answers are kept in memory and
verified only after the clock stops, in a process pool: the CertRep's
signature by the RA, transactionID and nonces, the envelope opened with the
device key, the certificate for our key and CN and signed by the CA.
Only a verified SUCCESS with a serial not seen before counts as an
enrollment. Server CPU is read from /proc/PID/stat (utime + stime, and the
children's) for the server process and all its descendants, before and after.

Several URLs (nodes that share the CA and RA material and one ledger): the
connections are spread over them in turn (connection k goes to URL k mod n),
each request goes to whichever connection takes it next, and the CPU of every
``--server-pid`` tree is added up. ``--db-pid`` names a database server (the
PostgreSQL postmaster): its tree's CPU over the same interval is reported
apart (``db_cpu_s``).

Each run is bounded: at most ``--count`` requests and no new request after
``--duration`` seconds; a request waits at most ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import json
import math
import multiprocessing
import os
import pickle
import random
import resource
import sys
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from scep_fast.client import (
    PkiRequest,
    ScepTransport,
    build_csr,
    build_pki_message,
    build_signer_certificate,
    generate_key,
    parse_cert_rep,
)
from scep_fast.protocol.enums import MessageType, PKIStatus

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
CACHE_DIR = RESULTS_DIR / "cache"

CACHE_FORMAT = 1
KEY_POOL = 32
# Requests built per task of the build pool: small enough for a smooth bar.
BUILD_CHUNK = 200
VERIFY_CHUNK = 100
MAX_RESPONSE_BYTES = 1 << 20


# --------------------------------------------------------------- progress


class Progress:
    """A plain progress bar on stderr (one line, redrawn at most 10 times a second)."""

    def __init__(self, total: int, label: str, *, quiet: bool = False) -> None:
        self.quiet = quiet
        self.total = max(total, 1)
        self.label = label
        self.done = 0
        self.stream = sys.stderr
        self.started = time.monotonic()
        self._drawn = 0.0
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, n: int) -> None:
        self.done += n
        if self.quiet:
            return
        now = time.monotonic()
        if now - self._drawn >= (0.1 if self._tty else 2.0) or self.done >= self.total:
            self._drawn = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = min(self.done / self.total, 1.0)
        width = 30
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        line = (f"{self.label} [{bar}] {self.done}/{self.total} "
                f"{rate:,.0f}/s eta {eta:4.0f}s")
        end = "\r" if self._tty and self.done < self.total else "\n"
        self.stream.write(("\r" if self._tty else "") + line + end)
        self.stream.flush()


# ------------------------------------------------------------ request sets


@dataclass(frozen=True)
class Params:
    """What a request set is made of, besides the RA it is encrypted to."""

    challenge: str
    digest: str = "sha256"
    cipher: str = "aes128"
    key_kind: str = "rsa2048"

    def tag(self, ra_der: bytes) -> str:
        text = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(hashlib.sha256(ra_der).digest() + text).hexdigest()[:16]


@dataclass
class RequestSet:
    """Ready-to-send PKCSReqs and what is needed to read their answers."""

    ra_der: bytes
    params: Params
    keys_der: list[bytes]  # PKCS#8 DER of the device key pool
    signers_der: list[bytes]  # the self-signed signer certificate of each pool key
    # (cn, transaction id, sender nonce, pool key index, DER pkiMessage)
    items: list[tuple[str, str, bytes, int, bytes]] = field(default_factory=list)

    @property
    def tag(self) -> str:
        return self.params.tag(self.ra_der)


def cache_file(ra_der: bytes, params: Params, cache_dir: Path = CACHE_DIR) -> Path:
    return cache_dir / f"reqs-{params.tag(ra_der)}.pickle"


def _key_der(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_key(der: bytes) -> Any:
    return serialization.load_der_private_key(der, password=None)


def _signer_key(key: Any) -> rsa.RSAPrivateKey:
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("pool keys must be RSA: the CertRep is encrypted to the signer key")
    return key


_build_state: dict[str, Any] = {}


def _build_init(ra_der: bytes, params: Params, keys_der: list[bytes],
                signers_der: list[bytes]) -> None:
    _build_state["ra"] = x509.load_der_x509_certificate(ra_der)
    _build_state["params"] = params
    _build_state["keys"] = [_load_key(k) for k in keys_der]
    _build_state["signers"] = [x509.load_der_x509_certificate(s) for s in signers_der]


def _build_range(args: tuple[str, int, int]) -> list[tuple[str, str, bytes, int, bytes]]:
    tag, start, stop = args
    ra, params = _build_state["ra"], _build_state["params"]
    keys, signers = _build_state["keys"], _build_state["signers"]
    out = []
    for i in range(start, stop):
        index = i % len(keys)
        key = _signer_key(keys[index])
        cn = f"lg-{tag[:8]}-{i:07d}"
        # A transactionID of our own: the pool keys repeat, and the default
        # (a hash of the key) would make every reuse of a key a resend.
        txid = hashlib.sha256(f"{tag}/{i}".encode()).hexdigest()
        csr = build_csr(key, cn, challenge=params.challenge, digest=params.digest)
        request = build_pki_message(
            MessageType.PKCS_REQ, csr, recipient=ra, signer_key=key,
            signer_cert=signers[index], transaction_id=txid, digest=params.digest,
            cipher=params.cipher, device_key=key, csr=csr,
        )
        out.append((cn, txid, request.sender_nonce, index, request.message))
    return out


def _new_pool(params: Params, size: int) -> tuple[list[bytes], list[bytes]]:
    keys_der, signers_der = [], []
    for n in range(size):
        key = _signer_key(generate_key(params.key_kind))  # type: ignore[arg-type]
        cert = build_signer_certificate(key, f"loadgen-signer-{n}")
        keys_der.append(_key_der(key))
        signers_der.append(cert.public_bytes(serialization.Encoding.DER))
    return keys_der, signers_der


def _pool_size() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), 8))


def prepare(ra: x509.Certificate | bytes, count: int, params: Params, *,
            cache_dir: Path = CACHE_DIR, processes: int | None = None,
            quiet: bool = False) -> RequestSet:
    """At least ``count`` requests for ``ra``: from the cache, built and cached if missing."""
    ra_der = ra if isinstance(ra, bytes) else ra.public_bytes(serialization.Encoding.DER)
    if params.key_kind.startswith("ec"):
        raise ValueError("pool keys must be RSA (they receive the CertRep)")
    path = cache_file(ra_der, params, cache_dir)
    reqset: RequestSet | None = None
    if path.exists():
        try:
            with path.open("rb") as f:
                stored = pickle.load(f)
            if stored.get("format") == CACHE_FORMAT:
                # Plain values only: the module may be __main__ or imported.
                reqset = RequestSet(ra_der=stored["ra_der"], params=Params(**stored["params"]),
                                    keys_der=stored["keys_der"],
                                    signers_der=stored["signers_der"], items=stored["items"])
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, AttributeError):
            reqset = None
    if reqset is None:
        keys_der, signers_der = _new_pool(params, KEY_POOL)
        reqset = RequestSet(ra_der=ra_der, params=params, keys_der=keys_der,
                            signers_der=signers_der)
    have = len(reqset.items)
    if have >= count:
        return reqset
    missing = count - have
    tasks = [(reqset.tag, start, min(start + BUILD_CHUNK, count))
             for start in range(have, count, BUILD_CHUNK)]
    progress = Progress(missing, f"building {missing} PKCSReqs", quiet=quiet)
    init_args = (ra_der, params, reqset.keys_der, reqset.signers_der)
    workers = processes or _pool_size()
    context = multiprocessing.get_context("fork")
    with context.Pool(workers, initializer=_build_init, initargs=init_args) as pool:
        for chunk in pool.imap(_build_range, tasks):
            reqset.items.extend(chunk)
            progress.update(len(chunk))
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with tmp.open("wb") as f:
        pickle.dump({"format": CACHE_FORMAT, "ra_der": reqset.ra_der,
                     "params": asdict(reqset.params), "keys_der": reqset.keys_der,
                     "signers_der": reqset.signers_der, "items": reqset.items}, f, protocol=5)
    os.replace(tmp, path)
    return reqset


# ------------------------------------------------------------- HTTP engine


class _Closed(Exception):
    pass


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with a single request in flight."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes, bool]] | None = None
        self.closed = False
        self._head: tuple[int, int, int, bool, bool] | None = None  # status, body at, length,
        # chunked, close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            head = self._head
            if head is not None and head[2] < 0 and not head[3]:
                # Framed by the end of the connection.
                self.waiter = None
                waiter.set_result((head[0], bytes(self.buf[head[1]:]), True))
                return
            waiter.set_exception(_Closed("connection closed" if exc is None else repr(exc)))

    def send(self, data: bytes) -> asyncio.Future[tuple[int, bytes, bool]]:
        if self.closed or self.transport is None:
            raise _Closed("connection closed")
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        self.buf.clear()
        self._head = None
        self.transport.write(data)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is None:
            return
        if self._head is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 65536:
                    self._fail("response head too long")
                return
            self._head = self._parse_head(bytes(self.buf[:end]), end + 4)
            if self._head is None:
                return
        status, start, length, chunked, close = self._head
        if chunked:
            body = self._dechunk(start)
            if body is None:
                return
        elif length >= 0:
            if len(self.buf) < start + length:
                return
            body = bytes(self.buf[start:start + length])
        else:
            return  # until the connection closes
        waiter, self.waiter = self.waiter, None
        if not waiter.done():
            waiter.set_result((status, body, close))

    def _fail(self, why: str) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(_Closed(why))
        if self.transport is not None:
            self.transport.abort()

    def _parse_head(self, head: bytes, start: int) -> tuple[int, int, int, bool, bool] | None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        try:
            status = int(parts[1])
        except (IndexError, ValueError):
            self._fail(f"bad status line {lines[0][:60]!r}")
            return None
        length, chunked = -1, False
        close = parts[0] == b"HTTP/1.0"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value:
                chunked = True
            elif name == b"connection":
                close = b"close" in value or (close and b"keep-alive" not in value)
        if status in (204, 304) or 100 <= status < 200:
            length = 0
        return status, start, length, chunked, close

    def _dechunk(self, start: int) -> bytes | None:
        body = bytearray()
        pos = start
        buf = self.buf
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
            pos = eol + 2
            if size == 0:
                # No trailers expected: the final CRLF.
                if len(buf) < pos + 2:
                    return None
                return bytes(body)
            if len(buf) < pos + size + 2:
                return None
            body += buf[pos:pos + size]
            pos += size + 2


@dataclass
class Exchange:
    """What happened to one request of a run."""

    status: int = 0  # HTTP status; 0 when no answer came
    error: str = ""  # transport error kind, when there was no answer
    latency: float = 0.0
    body: bytes = b""
    target: int = 0  # which URL of the run answered


def build_wire(reqset: RequestSet, indices: Sequence[int], host: str, port: int, path: str,
               method: str) -> list[bytes]:
    """The bytes of each HTTP request, built before the clock starts."""
    host_header = f"{host}:{port}"
    out = []
    for i in indices:
        message = reqset.items[i][4]
        if method == "post":
            head = (f"POST {path}?operation=PKIOperation HTTP/1.1\r\nHost: {host_header}\r\n"
                    f"Content-Type: application/x-pki-message\r\n"
                    f"Content-Length: {len(message)}\r\n\r\n")
            out.append(head.encode() + message)
        else:
            encoded = urllib.parse.quote(base64.b64encode(message).decode(), safe="")
            out.append((f"GET {path}?operation=PKIOperation&message={encoded} HTTP/1.1\r\n"
                        f"Host: {host_header}\r\n\r\n").encode())
    return out


async def _fire(targets: Sequence[tuple[str, int]], wires: Sequence[list[bytes]],
                concurrency: int, duration: float,
                request_timeout: float) -> tuple[list[Exchange], float]:
    """Connection k goes to ``targets[k % n]`` and sends ``wires[k % n][i]`` for request i."""
    loop = asyncio.get_running_loop()
    results = [Exchange(error="not sent") for _ in wires[0]]
    next_index = 0

    async def connect(target: int) -> _Connection:
        host, port = targets[target]
        _, conn = await loop.create_connection(_Connection, host, port)
        return conn

    # Connections are opened before the clock starts.
    placed = [k % len(targets) for k in range(concurrency)]
    conns = await asyncio.gather(*(connect(target) for target in placed))
    started = time.perf_counter()
    stop_at = started + duration
    finished_at = started

    async def worker(conn: _Connection, target: int) -> None:
        nonlocal next_index, finished_at
        wire = wires[target]
        while True:
            i = next_index
            if i >= len(wire) or time.perf_counter() >= stop_at:
                break
            next_index += 1
            t0 = time.perf_counter()
            result = results[i]
            result.target = target
            try:
                if conn.closed:
                    conn = await connect(target)
                future = conn.send(wire[i])
                timer = loop.call_later(request_timeout, _expire, future)
                try:
                    status, body, close = await future
                finally:
                    timer.cancel()
            except TimeoutError:
                result.error = "timeout"
                if conn.transport is not None:
                    conn.transport.abort()
                conn.closed = True
                continue
            except (_Closed, OSError) as exc:
                result.error = "connection: " + _short(exc)
                conn.closed = True
                continue
            t1 = time.perf_counter()
            finished_at = max(finished_at, t1)
            result.error = ""
            result.status, result.body, result.latency = status, body, t1 - t0
            if close:
                if conn.transport is not None:
                    conn.transport.close()
                conn.closed = True

    await asyncio.gather(*(worker(c, t) for c, t in zip(conns, placed, strict=True)))
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    return results, finished_at - started


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:60]


# ------------------------------------------------------------ verification


_verify_state: dict[str, Any] = {}


def _verify_init(reqset: RequestSet, ra_ders: list[bytes], ca_der: bytes | None) -> None:
    _verify_state["set"] = reqset
    _verify_state["keys"] = [_signer_key(_load_key(k)) for k in reqset.keys_der]
    _verify_state["signers"] = [x509.load_der_x509_certificate(s) for s in reqset.signers_der]
    _verify_state["ras"] = [x509.load_der_x509_certificate(d) for d in ra_ders]
    _verify_state["ca"] = x509.load_der_x509_certificate(ca_der) if ca_der else None
    _verify_state["spki"] = [
        k.public_key().public_bytes(serialization.Encoding.DER,
                                    serialization.PublicFormat.SubjectPublicKeyInfo)
        for k in _verify_state["keys"]
    ]


def _verify_one(index: int, body: bytes) -> tuple[str, int]:
    """('ok', serial) or (kind of failure, 0)."""
    reqset: RequestSet = _verify_state["set"]
    cn, txid, nonce, key_index, _ = reqset.items[index]
    key = _verify_state["keys"][key_index]
    request = PkiRequest(
        message=b"", message_type=MessageType.PKCS_REQ, transaction_id=txid,
        sender_nonce=nonce, digest=reqset.params.digest,  # type: ignore[arg-type]
        cipher=reqset.params.cipher,  # type: ignore[arg-type]
        key_transport="pkcs1v15", recipient=_verify_state["ras"][0], signer_key=key,
        signer_cert=_verify_state["signers"][key_index], device_key=key,
    )
    try:
        rep = parse_cert_rep(body, request, ra_certs=_verify_state["ras"])
    except Exception as exc:  # noqa: BLE001 - every refusal is a kind of error
        return f"invalid reply: {type(exc).__name__}", 0
    if rep.status is PKIStatus.FAILURE:
        name = rep.fail_info.name if rep.fail_info is not None else "unspecified"
        return f"FAILURE {name}", 0
    if rep.status is PKIStatus.PENDING:
        return "PENDING", 0
    cert = rep.certificates[0]
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    if spki != _verify_state["spki"][key_index]:
        return "certificate for another key", 0
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if not names or names[0].value != cn:
        return "certificate for another CN", 0
    ca = _verify_state["ca"]
    if ca is not None:
        try:
            cert.verify_directly_issued_by(ca)
        except Exception:  # noqa: BLE001
            return "certificate not signed by the CA", 0
    return "ok", cert.serial_number


def _verify_chunk(chunk: list[tuple[int, bytes]]) -> list[tuple[int, str, int]]:
    return [(index, *_verify_one(index, body)) for index, body in chunk]


def verify(reqset: RequestSet, answers: list[tuple[int, bytes]], ra_ders: list[bytes],
           ca_der: bytes | None, *, processes: int | None = None,
           quiet: bool = False) -> list[tuple[int, str, int]]:
    """Verifies CertReps (request index, body) in a process pool; (index, outcome, serial)."""
    if not answers:
        return []
    chunks = [answers[i:i + VERIFY_CHUNK] for i in range(0, len(answers), VERIFY_CHUNK)]
    progress = Progress(len(answers), f"verifying {len(answers)} CertReps",
                        quiet=quiet)
    out: list[tuple[int, str, int]] = []
    context = multiprocessing.get_context("fork")
    with context.Pool(processes or _pool_size(), initializer=_verify_init,
                      initargs=(reqset, ra_ders, ca_der)) as pool:
        for result in pool.imap_unordered(_verify_chunk, chunks):
            out.extend(result)
            progress.update(len(result))
    return out


# --------------------------------------------------------------- CPU time


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, utime + stime + cutime + cstime in ticks) of a process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2:].split()
    return int(fields[1]), sum(int(v) for v in fields[11:15])


def tree_cpu_seconds(root: int | Iterable[int]) -> float:
    """CPU seconds of a process (or several) and all descendants, including reaped children."""
    stats: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            found = _stat(int(entry))
            if found is not None:
                stats[int(entry)] = found
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, (ppid, _) in stats.items():
        children[ppid].append(pid)
    total, todo = 0, [root] if isinstance(root, int) else list(root)
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
            todo.extend(children.get(pid, ()))
    return total / _CLK_TCK


# ------------------------------------------------------------------- runs


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def run(url: str | Sequence[str], reqset: RequestSet, *, ra_ders: list[bytes],
        ca_der: bytes | None, count: int, concurrency: int, method: str = "post",
        duration: float = 30.0, timeout: float = 30.0, offset: int = 0,
        server_pid: int | Sequence[int] | None = None, db_pid: int | None = None,
        verify_sample: int | None = None, label: str = "", quiet: bool = False,
        seed: int = 1) -> dict[str, Any]:
    """One bounded run; returns the summary (see the module docstring)."""
    urls = [url] if isinstance(url, str) else list(url)
    if offset + count > len(reqset.items):
        raise ValueError(f"the request set holds {len(reqset.items)} requests, "
                         f"not {offset + count}")
    indices = list(range(offset, offset + count))
    targets, wires = [], []
    for one in urls:
        parts = urllib.parse.urlsplit(one)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        targets.append((host, port))
        wires.append(build_wire(reqset, indices, host, port, parts.path or "/", method))
    server_pids = [server_pid] if isinstance(server_pid, int) else list(server_pid or ())

    cpu_before = tree_cpu_seconds(server_pids) if server_pids else None
    db_before = tree_cpu_seconds(db_pid) if db_pid else None
    self_before = resource.getrusage(resource.RUSAGE_SELF)
    results, elapsed = asyncio.run(_fire(targets, wires, concurrency, duration, timeout))
    self_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_after = tree_cpu_seconds(server_pids) if server_pids else None
    db_after = tree_cpu_seconds(db_pid) if db_pid else None

    errors: collections.Counter[str] = collections.Counter()
    answered: list[tuple[int, bytes]] = []
    answered_per_url = [0] * len(urls)
    latencies: list[float] = []
    sent = 0
    for index, result in zip(indices, results, strict=True):
        if result.error == "not sent":
            continue
        sent += 1
        if result.error:
            errors[result.error] += 1
        elif result.status != 200:
            errors[f"HTTP {result.status}"] += 1
        else:
            latencies.append(result.latency)
            answered.append((index, result.body))
            answered_per_url[result.target] += 1

    to_verify = answered
    if verify_sample is not None and verify_sample < len(answered):
        to_verify = random.Random(seed).sample(answered, verify_sample)
    outcomes = verify(reqset, to_verify, ra_ders, ca_der, quiet=quiet)
    serials: collections.Counter[int] = collections.Counter()
    verified_ok = 0
    for _, outcome, serial in outcomes:
        if outcome == "ok":
            verified_ok += 1
            serials[serial] += 1
        else:
            errors[outcome] += 1
    duplicates = sum(n - 1 for n in serials.values() if n > 1)
    if duplicates:
        errors["duplicate serial"] += duplicates
    distinct_ok = len(serials)
    if to_verify is answered:
        good = distinct_ok
    else:
        # A sample: the share of good answers, applied to all answers.
        good = round(len(answered) * distinct_ok / len(to_verify)) if to_verify else 0
    server_cpu = (cpu_after - cpu_before) if cpu_before is not None and cpu_after is not None \
        else None
    db_cpu = (db_after - db_before) if db_before is not None and db_after is not None \
        else None
    client_cpu = (self_after.ru_utime + self_after.ru_stime
                  - self_before.ru_utime - self_before.ru_stime)
    return {
        "label": label,
        "url": urls[0] if len(urls) == 1 else urls,
        "method": method,
        "concurrency": concurrency,
        "requests": count,
        "sent": sent,
        "answered_200": len(answered),
        "verified": len(to_verify),
        "verified_ok": verified_ok,
        "enrollments": good,
        "elapsed_s": elapsed,
        "enroll_per_s": good / elapsed if elapsed > 0 else 0.0,
        "responses_per_s": len(answered) / elapsed if elapsed > 0 else 0.0,
        "latency_ms": {
            "p50": percentile(latencies, 50) * 1000,
            "p90": percentile(latencies, 90) * 1000,
            "p99": percentile(latencies, 99) * 1000,
            "max": max(latencies) * 1000 if latencies else math.nan,
        },
        "errors": dict(errors),
        "failures": sum(errors.values()),
        "duplicate_serials": duplicates,
        "server_cpu_s": server_cpu,
        "cpu_ms_per_enroll": server_cpu / good * 1000 if server_cpu is not None and good
        else None,
        **({"answered_per_url": answered_per_url} if len(urls) > 1 else {}),
        **({"db_cpu_s": db_cpu,
            "db_cpu_ms_per_enroll": db_cpu / good * 1000 if db_cpu is not None and good
            else None} if db_pid else {}),
        "client_cpu_s": client_cpu,
        "client_cpu_ms_per_request": client_cpu / sent * 1000 if sent else None,
    }


def fetch_ca(url: str) -> tuple[list[bytes], bytes | None]:
    """GetCACert: (RA certificates that may sign replies, RA first; the CA or None)."""
    certs = ScepTransport(url, timeout=10).get_ca_cert()
    ras = [certs.ra]
    if certs.signer is not certs.ra:  # the signing RA of an NDES-style pair
        ras.append(certs.signer)
    if certs.ca is not None and certs.ca is not certs.ra:
        ras.append(certs.ca)
    ders = [c.public_bytes(serialization.Encoding.DER) for c in ras]
    ca_der = certs.ca.public_bytes(serialization.Encoding.DER) if certs.ca is not None else None
    return ders, ca_der


# -------------------------------------------------------------------- CLI


def _params(args: argparse.Namespace) -> Params:
    return Params(challenge=args.challenge, digest=args.digest, cipher=args.cipher,
                  key_kind=args.key_kind)


def _add_request_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--challenge", required=True, help="the challenge password")
    parser.add_argument("--digest", default="sha256", choices=["sha1", "sha256", "sha512"])
    parser.add_argument("--cipher", default="aes128",
                        choices=["aes128", "aes192", "aes256", "des3"])
    parser.add_argument("--key-kind", default="rsa2048",
                        choices=["rsa2048", "rsa3072", "rsa4096"])
    parser.add_argument("--count", type=int, default=10_000, help="requests (at most)")
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="build and cache requests for an RA certificate")
    prep.add_argument("--ra-cert", type=Path, required=True, help="PEM or DER RA certificate")
    _add_request_options(prep)
    go = sub.add_parser("run", help="fire cached requests at a server, then verify")
    go.add_argument("url", nargs="+",
                    help="http://HOST:PORT/scep; several (nodes of one CA): the connections "
                    "are spread over them in turn")
    _add_request_options(go)
    go.add_argument("--concurrency", type=int, default=64)
    go.add_argument("--method", choices=["post", "get"], default="post")
    go.add_argument("--duration", type=float, default=30.0,
                    help="no new request after this many seconds")
    go.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    go.add_argument("--offset", type=int, default=0, help="first request of the set to send")
    go.add_argument("--server-pid", type=int, action="append",
                    help="measure this process tree's CPU time (repeat for several nodes: "
                    "added up)")
    go.add_argument("--db-pid", type=int,
                    help="measure this database server's process tree apart (db_cpu_s)")
    go.add_argument("--verify", default="all", help="'all' or a sample size")
    go.add_argument("--label", default="")
    go.add_argument("--json-out", type=Path, help="also write the summary here")
    args = parser.parse_args(None if argv is None else list(argv))

    if args.command == "prepare":
        data = args.ra_cert.read_bytes()
        cert = (x509.load_pem_x509_certificate(data) if data.lstrip().startswith(b"-----")
                else x509.load_der_x509_certificate(data))
        reqset = prepare(cert, args.count, _params(args), cache_dir=args.cache_dir,
                         quiet=args.quiet)
        print(json.dumps({"cache": str(cache_file(reqset.ra_der, reqset.params,
                                                  args.cache_dir)),
                          "requests": len(reqset.items)}))
        return 0

    ra_ders, ca_der = fetch_ca(args.url[0])
    reqset = prepare(ra_ders[0], args.offset + args.count, _params(args),
                     cache_dir=args.cache_dir, quiet=args.quiet)
    sample = None if args.verify == "all" else int(args.verify)
    summary = run(args.url, reqset, ra_ders=ra_ders, ca_der=ca_der, count=args.count,
                  concurrency=args.concurrency, method=args.method, duration=args.duration,
                  timeout=args.timeout, offset=args.offset, server_pid=args.server_pid,
                  db_pid=args.db_pid, verify_sample=sample, label=args.label,
                  quiet=args.quiet)
    text = json.dumps(summary)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
