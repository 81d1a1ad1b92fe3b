"""Where a worker's CPU goes with its CA and RA keys in SoftHSM2, by py-spy.

    python benchmarks/hsm_profile.py                       # keys in SoftHSM2
    python benchmarks/hsm_profile.py --keys file           # the same with key files
    python benchmarks/hsm_profile.py --seconds 3 --count 3000   # a smoke run

Starts the server the way ``compare.py --keys softhsm`` does (a fresh token,
both key pairs generated inside it; or the file-key server), drives it with
the load generator at concurrency 64, POST, and meanwhile samples the busiest
worker for ``--seconds`` with ``py-spy record --native`` (py-spy is not a
dependency: ``pip install py-spy``; root, or ptrace allowed). Each sample's
stack is put in one bucket, first match wins:

- ``SoftHSM2: OpenSSL``: inside libsofthsm2, in libcrypto (the RSA arithmetic);
- ``SoftHSM2: locking``: inside libsofthsm2, in a mutex, a futex or a condition;
- ``SoftHSM2: own``: the rest of libsofthsm2 (sessions, objects, attribute copies);
- ``libp11 and the engine``: in libp11 or its OpenSSL engine, outside SoftHSM2
  (the PKCS#11 round trips as the client side makes them);
- ``OpenSSL``: libcrypto anywhere else (CMS, X.509, hashing, the file keys);
- ``native core``: our C core (``_native``) outside all of these;
- ``Python and the rest``: the interpreter, trio, hypercorn, libc, the kernel.

Samples of threads waiting for work (a worker thread parked in trio's thread
cache, the event loop in ``epoll_wait``) are left out; a wait on a lock inside
SoftHSM2 is kept (``SoftHSM2: locking``): py-spy samples each thread by wall
clock, so that row is time a thread spent queued behind the token, not CPU.
py-spy stops the worker to take each sample: the profiled run's throughput is
not a measurement (``compare.py --keys`` is).

Prints the shares of the worker's non-idle samples, and the load generator's
enrollments/s and server CPU per enrollment over the whole run, so the share
of a bucket times the CPU per enrollment is roughly its cost per enrollment.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(1, str(ROOT))

import compare  # noqa: E402
import loadgen  # noqa: E402

BUCKETS = ("SoftHSM2: OpenSSL", "SoftHSM2: locking", "SoftHSM2: own",
           "libp11 and the engine", "OpenSSL", "native core", "Python and the rest")
IDLE = "idle (waiting for work)"
# A thread parked between jobs (trio's thread cache) or in the event loop's wait:
# py-spy --native does not always leave these out, so they are counted apart.
_IDLE = ("PyThread_acquire_lock", "epoll_wait")
_LOCKING = ("mutex", "futex", "pthread_cond", "lll_lock", "MutexLocker", "Mutex::")


def bucket(frames: list[str]) -> str:
    """The bucket of one stack (outermost frame first, as py-spy writes them)."""
    leaf = frames[-1] if frames else ""
    tail = ";".join(frames[-4:])
    if not any("softhsm" in f.lower() for f in frames) and any(w in tail for w in _IDLE):
        return IDLE
    in_softhsm = any("softhsm" in f.lower() for f in frames)
    if in_softhsm:
        tail = frames[next(i for i, f in enumerate(frames) if "softhsm" in f.lower()):]
        if any("libcrypto" in f for f in tail):
            return "SoftHSM2: OpenSSL"
        if any(word in leaf for word in _LOCKING):
            return "SoftHSM2: locking"
        return "SoftHSM2: own"
    if any("libp11" in f or "pkcs11.so" in f for f in frames):
        return "libp11 and the engine"
    if any("libcrypto" in f for f in frames):
        return "OpenSSL"
    if any("_native" in f for f in frames):
        return "native core"
    return "Python and the rest"


def shares(raw: str) -> tuple[dict[str, float], int]:
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, number = line.rpartition(" ")
        if stack and number.isdigit():
            counts[bucket(stack.split(";"))] += int(number)
    total = sum(counts.values()) - counts[IDLE]
    return {name: counts[name] / total if total else 0.0 for name in BUCKETS}, total


def busiest_worker(server_pid: int) -> int:
    """The descendant of the server that took the most CPU over half a second."""
    pids = compare.descendants(server_pid)
    before = {pid: loadgen.tree_cpu_seconds([pid]) for pid in pids}
    time.sleep(0.5)
    return max(pids, key=lambda pid: loadgen.tree_cpu_seconds([pid]) - before[pid])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", choices=("softhsm", "file"), default="softhsm")
    parser.add_argument("--seconds", type=float, default=8.0, help="py-spy's sampling time")
    parser.add_argument("--count", type=int, default=12000, help="requests at most")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--raw-out", type=Path, help="keep py-spy's collapsed stacks here")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        sys.exit("py-spy is not installed: pip install py-spy")

    scenario = compare.Scenario("scep-fast", "rsa2048", "post", compare.HEADLINE_CONCURRENCY,
                                keys=args.keys)
    load = argparse.Namespace(duration=args.seconds + 3, timeout=30.0, verify="all")
    token_context = compare.softhsm_keys() if args.keys == "softhsm" else None
    with tempfile.TemporaryDirectory(prefix="scep-bench-profile-") as tmp:
        run_dir = Path(tmp)
        raw_path = args.raw_out or run_dir / "stacks.txt"
        with token_context or contextlib.nullcontext(None) as token:
            ra = token.ra if token is not None else compare.ra_certificate("scep-fast",
                                                                            "rsa2048")
            loadgen.prepare(ra, args.count, loadgen.Params(challenge=compare.CHALLENGE))
            server = (compare.token_server(scenario, args.workers, run_dir, token)
                      if token is not None
                      else compare.ScepFastServer(scenario, args.workers, run_dir))
            try:
                result: dict[str, Any] = {}
                with contextlib.ExitStack() as stack:
                    pool = stack.enter_context(ThreadPoolExecutor(1))
                    running = pool.submit(compare.run_loadgen, scenario, load, args.count,
                                          run_dir, [server])
                    time.sleep(1.0)
                    worker = busiest_worker(server.proc.pid)
                    subprocess.run([py_spy, "record", "--native", "--format", "raw",
                                    "--rate", str(args.rate), "--duration",
                                    str(int(args.seconds)), "--pid", str(worker),
                                    "--output", str(raw_path)],
                                   check=True, capture_output=True)
                    result = running.result()
            finally:
                server.stop()
            by_bucket, samples = shares(raw_path.read_text())
    cpu = result.get("cpu_ms_per_enroll")
    print(f"keys {args.keys}: {result.get('enroll_per_s', 0):.0f} enroll/s, "
          f"{compare._num(cpu, 3)} ms CPU per enrollment, failures {result.get('failures')}; "
          f"{samples} samples of worker {worker}")
    print("| where | share | ms per enrollment (share x CPU) |")
    print("|---|---:|---:|")
    for name, share in by_bucket.items():
        print(f"| {name} | {share:.1%} | {compare._num(share * cpu if cpu else None, 3)} |")
    print(json.dumps({"keys": args.keys, "enroll_per_s": result.get("enroll_per_s"),
                      "cpu_ms_per_enroll": cpu, "samples": samples, "shares": by_bucket}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
