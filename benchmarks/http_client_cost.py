"""CPU per call of the integrations' HTTP client, and of httpx if it is installed.

    python benchmarks/http_client_cost.py [--calls 2000] [--concurrency 32]

Both post the same 2 KB body to a local receiver that answers each after
20 ms (``webhook.py receiver``), from one trio loop, over keep-alive
connections; the figure is this process's CPU time per call. httpx is not
a dependency of scep-fast (``runtime/http_client.py`` says why): install it
into the environment to compare (``pip install httpx``).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import compare  # noqa: E402
import webhook  # noqa: E402

from scep_fast.runtime.http_client import HttpClient  # noqa: E402

BODY = b"x" * 2048


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _measure(call: Callable[[], Awaitable[object]], calls: int,
                   concurrency: int) -> tuple[float, float]:
    limiter = trio.CapacityLimiter(concurrency)

    async def one() -> None:
        async with limiter:
            await call()

    for _ in range(concurrency):  # connections opened before the clock starts
        await one()
    started, cpu = time.perf_counter(), _cpu()
    async with trio.open_nursery() as nursery:
        for _ in range(calls):
            nursery.start_soon(one)
    return calls / (time.perf_counter() - started), 1000 * (_cpu() - cpu) / calls


async def ours(url: str, calls: int, concurrency: int) -> tuple[float, float]:
    client = HttpClient(max_connections=concurrency)
    try:
        return await _measure(lambda: client.request("POST", url, body=BODY), calls, concurrency)
    finally:
        await client.aclose()


async def with_httpx(url: str, calls: int, concurrency: int) -> tuple[float, float] | None:
    try:
        import httpx  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits) as client:
        return await _measure(lambda: client.post(url, content=BODY), calls, concurrency)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    port = compare.free_port()
    receiver = subprocess.Popen([sys.executable, str(BENCH_DIR / "webhook.py"), "receiver",
                                 "--port", str(port)], cwd=compare.ROOT)
    try:
        webhook._wait_listening(port)  # noqa: SLF001 - the same wait, not a copy
        url = f"http://127.0.0.1:{port}/validate"
        for name, run in (("scep-fast http_client", ours), ("httpx", with_httpx)):
            result = trio.run(run, url, args.calls, args.concurrency)
            if result is None:
                print(f"{name}: not installed")
                continue
            rate, cpu_ms = result
            print(f"{name}: {rate:,.0f} calls/s, {cpu_ms:.3f} ms CPU per call "
                  f"(concurrency {args.concurrency})")
    finally:
        compare.stop_process(receiver, 15)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
