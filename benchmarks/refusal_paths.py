"""What a refusal for load costs a worker's HTTP server, by the way it reaches it.

    python benchmarks/refusal_paths.py [--requests 40000] [--concurrency 32]

The worker's own HTTP server (``runtime/http_server.serve``) runs in a child
process pinned to the first core, in front of an app that is never reached:
its load says overloaded throughout, so every PKIOperation POST is answered
503 by the refusal paths. The load generator (asyncio, pinned to the second
core) sends ``--requests`` 3.5 KB PKIOperation POSTs, ``--concurrency`` at a
time. The figure is the server's CPU (user and system, every thread) per
refusal, measured after the first 2,000:

- ``kept-alive, thread``: each client keeps its connection; the trio loop
  hands a connection it has refused to the refusal thread, which answers the
  rest (the code as it is);
- ``kept-alive, trio``: the same, with the hand-over switched off in the
  child, so that the trio loop answers every request;
- ``new connection each``: a connection per request, closed by the client
  after its answer; the refusal thread accepts them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import compare  # noqa: E402

BODY = b"x" * 3500
REQUEST = (b"POST /scep?operation=PKIOperation HTTP/1.1\r\nhost: x\r\n"
           b"content-type: application/x-pki-message\r\ncontent-length: %d\r\n\r\n"
           % len(BODY)) + BODY
WARM_UP = 2000

SERVER = """
import resource, socket, sys, trio
from functools import partial
from hypercorn.config import Config
from scep_fast.runtime import http_server, refusal_thread
from scep_fast.runtime.fast_refusal import FastRefusal

port, park = int(sys.argv[1]), sys.argv[2] == "park"
if not park:
    refusal_thread.RefusalThread.park = lambda self, detach: False

class Over:
    def overloaded(self): return True
    def relieved(self): return False
    def retry_after_now(self): return 5
    def note_refused(self, count): pass

load = Over()
counted = [0]
refusal = FastRefusal(refuse=lambda: 5, max_body=65536, load=load)
refusal.refused = lambda elapsed: counted.__setitem__(0, counted[0] + 1)
refusal.refused_elsewhere = lambda count: counted.__setitem__(0, counted[0] + count)

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    raise RuntimeError("the app is not to be reached")

sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", port))
config = Config()
config.bind = [f"fd://{sock.detach()}"]
config.backlog = 4096
config.accesslog = None
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])

async def main():
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(http_server.serve, app, config, shutdown_trigger=stop.wait,
                                   fast_refusal=refusal))
        await trio.sleep(0.3)
        print("ready", flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline)
        mark = (cpu(), counted[0])
        print("marked", flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline)
        await trio.sleep(0.05)  # the watcher folds the thread's last refusals in
        print(f"{(cpu() - mark[0]) * 1e6 / max(counted[0] - mark[1], 1):.1f} "
              f"{counted[0] - mark[1]}", flush=True)
        stop.set()

trio.run(main)
"""


async def _load(port: int, requests: int, concurrency: int, keep_alive: bool,
                mark: asyncio.Future[None] | None) -> float:
    left = requests
    done = 0
    started = time.perf_counter()

    async def read_answer(reader: asyncio.StreamReader) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        await reader.readexactly(length)

    async def client() -> None:
        nonlocal left, done
        reader = writer = None
        while left > 0:
            left -= 1
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert reader is not None
            writer.write(REQUEST)
            await read_answer(reader)
            done += 1
            if done == WARM_UP and mark is not None:
                mark.set_result(None)
            if not keep_alive:
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return requests / (time.perf_counter() - started)


def _run(name: str, park: bool, keep_alive: bool, args: argparse.Namespace) -> None:
    port = compare.free_port()
    server = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", SERVER,
                               str(port), "park" if park else "no-park"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert server.stdin is not None and server.stdout is not None
    try:
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{name}: the server did not start")
        os.sched_setaffinity(0, {1})

        async def drive() -> float:
            loop = asyncio.get_running_loop()
            mark: asyncio.Future[None] = loop.create_future()

            async def marker() -> None:
                await mark
                assert server.stdin is not None and server.stdout is not None
                server.stdin.write("mark\n")
                server.stdin.flush()
                await loop.run_in_executor(None, server.stdout.readline)

            task = asyncio.create_task(marker())
            rate = await _load(port, args.requests, args.concurrency, keep_alive, mark)
            await task
            return rate

        rate = asyncio.run(drive())
        server.stdin.write("report\n")
        server.stdin.flush()
        cost, counted = server.stdout.readline().split()
        print(f"| {name} | {float(cost):.1f} | {rate:,.0f} | {counted} |", flush=True)
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    if (os.cpu_count() or 1) < 2:
        parser.error("needs two cores: the server on one, the load on the other")
    print("| path | server CPU us per refusal | refusals/s | measured |")
    print("|---|---:|---:|---:|")
    _run("kept-alive, thread", True, True, args)
    _run("kept-alive, trio", False, True, args)
    _run("new connection each", True, False, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
