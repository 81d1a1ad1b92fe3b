"""What refusing a request on a new connection costs the server, by how it is done.

    python benchmarks/refusal_floor.py [--connections 6000] [--concurrency 32]

Under overload every new device opens a connection that is to be answered
503 and closed; at 4x capacity that is thousands a second, and what each
costs the server's core comes out of the enrollments it can still serve
(RESULTS.md, "Overload"). Each variant below listens on 127.0.0.1, pinned to
the first core, and for every connection reads the request, writes a 503
and closes; the load generator (asyncio, pinned to the second core) opens
``--connections`` connections, ``--concurrency`` at a time, each sending a
3.5 KB PKIOperation POST. The figure is the server's CPU (user and system)
per connection, measured in the server after its first 100:

- ``c``: accept, recv, send, close in a C loop (compiled here with cc);
- ``python-blocking``: the same loop in Python, blocking sockets, no event loop;
- ``trio``: ``trio.serve_tcp`` with a handler that does the same (a task per
  connection, as a worker's connection loop has).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import compare  # noqa: E402

RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Length: 0\r\n"
            b"Connection: close\r\n\r\n")
REQUEST = (b"POST /scep?operation=PKIOperation HTTP/1.1\r\nHost: x\r\n"
           b"Content-Type: application/x-pki-message\r\nContent-Length: 3500\r\n\r\n"
           + b"x" * 3500)
WARM_UP = 100

C_SERVER = r"""
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>
static const char answer[] = "%s";
static double cpu_us(const struct rusage *u) {
    return (u->ru_utime.tv_sec + u->ru_stime.tv_sec) * 1e6
        + u->ru_utime.tv_usec + u->ru_stime.tv_usec;
}
int main(int argc, char **argv) {
    int port = atoi(argv[1]), n = atoi(argv[2]), one = 1;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port),
                            .sin_addr.s_addr = htonl(0x7f000001)};
    if (bind(s, (void *)&a, sizeof a) || listen(s, 4096)) return 1;
    printf("ready\n");
    fflush(stdout);
    static char buf[65536];
    struct rusage u0 = {0}, u1;
    for (int i = 0; i < n; i++) {
        if (i == %d) getrusage(RUSAGE_SELF, &u0);
        int c = accept(s, 0, 0);
        if (c < 0) continue;
        (void)recv(c, buf, sizeof buf, 0);
        (void)send(c, answer, sizeof answer - 1, MSG_NOSIGNAL);
        close(c);
    }
    getrusage(RUSAGE_SELF, &u1);
    printf("%%.1f\n", (cpu_us(&u1) - cpu_us(&u0)) / (n - %d));
    return 0;
}
"""

PY_SERVER = """
import resource, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
answer = {answer!r}
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen(4096)
print("ready", flush=True)
cpu = lambda u: u.ru_utime + u.ru_stime
for i in range(n):
    if i == {warm}:
        before = cpu(resource.getrusage(resource.RUSAGE_SELF))
    c, _ = s.accept()
    c.recv(65536)
    c.sendall(answer)
    c.close()
after = cpu(resource.getrusage(resource.RUSAGE_SELF))
print(f"{{(after - before) * 1e6 / (n - {warm}):.1f}}", flush=True)
"""

TRIO_SERVER = """
import os, resource, sys, trio
port, n = int(sys.argv[1]), int(sys.argv[2])
answer = {answer!r}
cpu = lambda u: u.ru_utime + u.ru_stime
state = {{"count": 0, "before": 0.0}}

async def handler(stream):
    state["count"] += 1
    if state["count"] == {warm}:
        state["before"] = cpu(resource.getrusage(resource.RUSAGE_SELF))
    await stream.receive_some(65536)
    await stream.send_all(answer)
    await stream.aclose()
    if state["count"] == n:
        after = cpu(resource.getrusage(resource.RUSAGE_SELF))
        print(f"{{(after - state['before']) * 1e6 / (n - {warm}):.1f}}", flush=True)
        os._exit(0)

async def main():
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1", backlog=4096)
    print("ready", flush=True)
    await trio.serve_listeners(handler, listeners)

trio.run(main)
"""


async def _load(port: int, connections: int, concurrency: int) -> float:
    limiter = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with limiter:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(REQUEST)
                await writer.drain()
                await reader.read()
                writer.close()
            except OSError:
                pass

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(connections)))
    return connections / (time.perf_counter() - started)


def _run(name: str, command: list[str], args: argparse.Namespace) -> dict[str, float]:
    port = compare.free_port()
    server = subprocess.Popen(["taskset", "-c", "0", *command, str(port),
                               str(args.connections)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{name}: the server did not start")
        os.sched_setaffinity(0, {1})
        rate = asyncio.run(_load(port, args.connections, args.concurrency))
        cost = float(server.stdout.readline())
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
    return {"server_cpu_us_per_connection": cost, "connections_per_s": rate}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=6000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    if (os.cpu_count() or 1) < 2:
        parser.error("needs two cores: the server on one, the load on the other")
    with tempfile.TemporaryDirectory(prefix="refusal-floor-") as tmp:
        variants: list[tuple[str, list[str]]] = []
        compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if compiler:
            source = Path(tmp) / "refuse.c"
            escaped = RESPONSE.decode().replace("\r", "\\r").replace("\n", "\\n")
            source.write_text(C_SERVER % (escaped, WARM_UP, WARM_UP))
            binary = Path(tmp) / "refuse"
            subprocess.run([compiler, "-O2", "-o", str(binary), str(source)], check=True)
            variants.append(("c", [str(binary)]))
        for name, template in (("python-blocking", PY_SERVER), ("trio", TRIO_SERVER)):
            script = Path(tmp) / f"refuse_{name.replace('-', '_')}.py"
            script.write_text(template.format(answer=RESPONSE, warm=WARM_UP))
            variants.append((name, [sys.executable, str(script)]))
        print("| variant | server CPU us per connection | connections/s |")
        print("|---|---:|---:|")
        for name, command in variants:
            result = _run(name, command, args)
            print(f"| {name} | {result['server_cpu_us_per_connection']:.1f} | "
                  f"{result['connections_per_s']:,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
