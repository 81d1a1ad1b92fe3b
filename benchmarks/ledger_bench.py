"""Ledger throughput: durable commits per second and bulk loading.

    python benchmarks/ledger_bench.py [--dir DIR] [--records 1000000] [--seconds 3]

Measures, on a fresh ledger in DIR (a temporary directory by default):
the latency of a bare fsync on the same file system (durable commits
cannot beat it), commits per second for batches of 1, 16 and 64 records
from one process and from several processes at once, and bulk_load of
--records records; then the commit rates again on the full ledger.
Records are about the size of an RSA-2048 certificate (1,100 bytes of DER)
with random 16-octet serials, as the issuer makes them.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from scep_fast.runtime.ledger_lmdb import LmdbLedger
from scep_fast.service.ledger import CertRecord

DER = b"\x30\x82\x04\x4c" + bytes(1100)
KEY = hashlib.sha256(b"benchmark requester").digest()


def make_record(serial: int, txid: str) -> CertRecord:
    return CertRecord(
        serial=serial,
        der=DER,
        subject=f"CN=device-{txid}.example,O=Example",
        sans=(f"DNS:device-{txid}.example",),
        not_before=1_700_000_000,
        not_after=1_731_536_000,
        issued_at=time.time(),
        transaction_id=txid,
        requester_key_sha256=KEY,
        csr_sha256=hashlib.sha256(txid.encode()).digest(),
    )


def records(count: int, prefix: str) -> Iterator[CertRecord]:
    for i in range(count):
        yield make_record(secrets.randbits(127) | 1, f"{prefix}-{i}")


def fsync_latency(directory: Path) -> float:
    path = directory / "fsync-probe"
    rounds = 200
    with open(path, "wb") as f:
        started = time.perf_counter()
        for _ in range(rounds):
            f.write(b"x" * 4096)
            f.flush()
            os.fdatasync(f.fileno())
        elapsed = time.perf_counter() - started
    path.unlink()
    return elapsed / rounds


def prepared_batches(batch: int, seconds: float, prefix: str) -> list[list[CertRecord]]:
    # Built before the clock starts, and never reused: a resend takes the
    # cheaper AlreadyIssued path and would flatter the numbers.
    count = int(seconds * 40_000 / batch) + 100
    return [list(records(batch, f"{prefix}-{n}")) for n in range(count)]


def commit_rate(ledger: LmdbLedger, batch: int, seconds: float, prefix: str) -> float:
    pending = prepared_batches(batch, seconds, prefix)
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds and done < len(pending):
        ledger.commit(pending[done])
        done += 1
    return done / (time.perf_counter() - started)


def _worker(path: str, batch: int, seconds: float, index: int, barrier: object,
            results: object) -> None:
    with LmdbLedger(path) as ledger:
        prepared = prepared_batches(batch, seconds, f"mp{batch}-{index}")
        barrier.wait()  # type: ignore[attr-defined]
        done = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds and done < len(prepared):
            ledger.commit(prepared[done])
            done += 1
        results.put(done / (time.perf_counter() - started))  # type: ignore[attr-defined]


def multi_process_rate(path: str, processes: int, batch: int, seconds: float) -> float:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes)
    results = context.Queue()
    workers = [context.Process(target=_worker,
                               args=(path, batch, seconds, i, barrier, results))
               for i in range(processes)]
    for worker in workers:
        worker.start()
    total = sum(results.get(timeout=300) for _ in workers)
    for worker in workers:
        worker.join()
    return float(total)


def report_rates(ledger: LmdbLedger, seconds: float, label: str) -> None:
    for batch in (1, 16, 64):
        rate = commit_rate(ledger, batch, seconds, f"{label}{batch}")
        print(f"  {label}: batch {batch:3}: {rate:8.0f} commits/s  {rate * batch:9.0f} records/s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix="ledger-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    path = base / "ledger"

    print(f"fdatasync of 4 KiB: {fsync_latency(base) * 1e6:.0f} us")
    ledger = LmdbLedger(path)
    print("empty ledger, one process:")
    report_rates(ledger, args.seconds, "empty")
    ledger.close()
    print(f"empty ledger, {args.processes} processes (total):")
    for batch in (1, 16, 64):
        rate = multi_process_rate(str(path), args.processes, batch, args.seconds)
        print(f"  batch {batch:3}: {rate:8.0f} commits/s  {rate * batch:9.0f} records/s")

    ledger = LmdbLedger(path)
    before = ledger.count()
    started = time.perf_counter()
    made = list(records(args.records, "bulk"))
    build = time.perf_counter() - started
    started = time.perf_counter()
    loaded = ledger.bulk_load(made)
    load = time.perf_counter() - started
    del made
    size = os.path.getsize(path / "data.mdb")
    print(f"bulk_load of {loaded} records (random serials): {load:.1f} s, "
          f"{loaded / load:.0f} records/s (building the records took {build:.1f} s)")
    print(f"ledger: {ledger.count()} records ({before} before), data.mdb {size / 2**20:.0f} MiB, "
          f"{size / ledger.count():.0f} bytes/record")
    print("full ledger, one process:")
    report_rates(ledger, args.seconds, "full")
    started = time.perf_counter()
    listed = sum(1 for _ in ledger.iter_records())
    print(f"iter_records over {listed} records: {time.perf_counter() - started:.1f} s")
    ledger.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
