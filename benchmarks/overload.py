"""Overload: open-loop enrollment load at 1x, 2x and 4x the measured capacity.

    python benchmarks/overload.py [--seconds 12] [--levels 1,2,4] [--server-cpus 0]

One scep-fast server (RSA-2048 CA, the default configuration, so
``batch.max_wait_seconds`` = 1 s), pinned to half of the machine's cores
(one worker per core), and the load generator pinned to the other half: at
4x the load generator's own work (thousands of attempts a second) would
otherwise come out of the server's CPU, and the run would measure the
client. First a closed-loop run at c=64 measures
its capacity C (verified enrollments per second). Then, for each level k and
for two kinds of client, new devices arrive at k x C per second, each with a
distinct PKCSReq, for ``--seconds``:

* ``honour``: a device answered 503 waits the Retry-After it was given (with
  20% jitter) and tries again, at most four tries;
* ``ignore``: it retries after 0.5 s whatever the server said, at most four.

Every answer is kept and, after the clock stops, every 200 is verified (the
CertRep signed by the RA, opened with the device key, the certificate ours).
Reported per run: goodput (verified enrollments answered while the load
lasted, per second of it), goodput over C and over the open-loop peak (the
best goodput of any level of the same run), the p50/p99 latency of admitted
attempts (those answered 200), how many attempts were shed (503), and how many got no answer at all
(a connection error or a timeout), which must be none. The table goes to
``benchmarks/results/overload.md``, the numbers to ``overload.json``, the plot
to ``overload.png``. Last, a burst: ``--burst`` (4,096) connections opened at
once, one PKCSReq each; every one must be answered (SUCCESS or 503). Each
run is bounded in time and count.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import compare  # noqa: E402
import loadgen  # noqa: E402

RESULTS_DIR = loadgen.RESULTS_DIR
MAX_TRIES = 4
IGNORE_RETRY_SECONDS = 0.5
REQUEST_TIMEOUT_SECONDS = 30.0
MAX_CONNECTIONS = 4096


class _Connection(loadgen._Connection):
    """loadgen's connection, also reading Retry-After."""

    retry_after: float = 0.0

    def _parse_head(self, head: bytes, start: int) -> tuple[int, int, int, bool, bool] | None:
        self.retry_after = 0.0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"retry-after":
                with contextlib.suppress(ValueError):
                    self.retry_after = float(value.strip())
        return super()._parse_head(head, start)


@dataclass
class Device:
    """One arrival: its tries and how they ended."""

    index: int
    tries: int = 0
    shed: int = 0
    status: int = 0            # of the last try; 0 when nothing answered it
    error: str = ""
    latency: float = 0.0       # of the try answered 200
    done_at: float = 0.0
    body: bytes = b""


@dataclass
class OpenLoop:
    host: str
    port: int
    wire: list[bytes]
    rate: float
    seconds: float
    honour: bool
    idle: list[_Connection] = field(default_factory=list)
    open_connections: int = 0
    started: float = 0.0

    async def _connection(self) -> _Connection:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Connection, self.host, self.port)
        self.open_connections += 1
        return conn

    def _release(self, conn: _Connection, close: bool) -> None:
        if close or conn.closed:
            if conn.transport is not None:
                conn.transport.close()
            self.open_connections -= 1
        else:
            self.idle.append(conn)

    async def _device(self, device: Device, rng: random.Random) -> None:
        loop = asyncio.get_running_loop()
        while device.tries < MAX_TRIES:
            device.tries += 1
            started = time.perf_counter()
            try:
                conn = await self._connection()
                future = conn.send(self.wire[device.index])
                timer = loop.call_later(REQUEST_TIMEOUT_SECONDS, loadgen._expire, future)
                try:
                    status, body, close = await future
                finally:
                    timer.cancel()
            except (TimeoutError, loadgen._Closed, OSError) as exc:
                device.status, device.error = 0, loadgen._short(exc)
                return
            self._release(conn, close)
            device.status, device.error = status, ""
            if status != 503:
                device.latency = time.perf_counter() - started
                device.done_at = time.perf_counter() - self.started
                device.body = body
                return
            device.shed += 1
            wait = conn.retry_after if self.honour else IGNORE_RETRY_SECONDS
            await asyncio.sleep(wait * rng.uniform(0.8, 1.2))
        device.done_at = time.perf_counter() - self.started

    async def run(self) -> tuple[list[Device], float]:
        rng = random.Random(7)
        arrivals = min(len(self.wire), int(self.rate * self.seconds))
        devices = [Device(i) for i in range(arrivals)]
        started = self.started = time.perf_counter()
        tasks = []
        for device in devices:
            delay = started + device.index / self.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self._device(device, rng)))
        await asyncio.gather(*tasks)
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        return devices, max((d.done_at for d in devices), default=0.0)


async def burst(host: str, port: int, wire: list[bytes]) -> list[Device]:
    """Every request on its own new connection, all opened at once."""
    loop = asyncio.get_running_loop()
    devices = [Device(i, tries=1) for i in range(len(wire))]

    async def one(device: Device) -> None:
        started = time.perf_counter()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(_Connection, host, port), REQUEST_TIMEOUT_SECONDS)
            future = conn.send(wire[device.index])
            status, body, _close = await asyncio.wait_for(future, REQUEST_TIMEOUT_SECONDS)
            if conn.transport is not None:
                conn.transport.close()
        except (TimeoutError, loadgen._Closed, OSError) as exc:
            device.error = loadgen._short(exc)
            return
        device.status, device.body = status, body
        device.shed = int(status == 503)
        device.latency = device.done_at = time.perf_counter() - started

    await asyncio.gather(*(one(d) for d in devices))
    return devices


def summarise(devices: list[Device], elapsed: float, reqset: loadgen.RequestSet,
              ras: list[bytes], ca: bytes | None, offset: int,
              window: float | None = None) -> dict[str, Any]:
    answered = [(offset + d.index, d.body) for d in devices if d.status == 200]
    outcomes = loadgen.verify(reqset, answered, ras, ca, quiet=True)
    good = sum(1 for _, outcome, _ in outcomes if outcome == "ok")
    ok = {index for index, outcome, _ in outcomes if outcome == "ok"}
    # Goodput while the load lasts: verified enrollments answered within the
    # arrival window, over that window (late retries after it do not dilute it).
    window = window or elapsed
    in_window = sum(1 for d in devices if offset + d.index in ok and d.done_at <= window)
    latencies = [d.latency for d in devices if d.status == 200]
    final: collections.Counter[str] = collections.Counter(
        str(d.status) if d.status else f"no answer: {d.error}" for d in devices)
    return {
        "arrivals": len(devices),
        "attempts": sum(d.tries for d in devices),
        "shed_503": sum(d.shed for d in devices),
        "gave_up_after_503": sum(1 for d in devices if d.status == 503),
        "unanswered": sum(1 for d in devices if d.status == 0),
        "final_status": dict(final),
        "enrollments": good,
        "elapsed_s": elapsed,
        "goodput_per_s": in_window / window if window else 0.0,
        "admitted_latency_ms": {"p50": loadgen.percentile(latencies, 50) * 1000,
                                "p99": loadgen.percentile(latencies, 99) * 1000,
                                "max": max(latencies, default=0.0) * 1000},
    }


def write_markdown(path: Path, capacity: dict[str, Any], runs: list[dict[str, Any]],
                   meta: dict[str, Any], burst_summary: dict[str, Any]) -> None:
    lines = [
        "# Overload", "",
        f"`{meta['command']}` on {meta['cpu']} ({meta['cores']} cores): the server on "
        f"cores {meta['server_cpus']} ({meta['workers']} workers), the load generator on "
        f"{meta['client_cpus']}; batch.max_wait_seconds {meta['max_wait_s']}.", "",
        f"Capacity C (closed loop, c=64): **{capacity['enroll_per_s']:.0f} enrollments/s**, "
        f"p99 {capacity['latency_ms']['p99']:.0f} ms. The bound for admitted requests: the "
        f"target plus one batch of {BATCH} at C per worker = "
        f"**{_admitted_bound_ms(capacity, meta):.0f} ms**.", "",
        "| load | clients | arrivals/s | goodput/s | goodput/C | of open-loop peak | "
        "admitted p50 ms | admitted p99 ms | 503s | gave up | unanswered | server CPU s | "
        "client CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    peak = open_loop_peak(runs)
    for run in runs:
        lines.append(
            f"| {run['level']}x | {run['clients']} | {run['rate']:.0f} | "
            f"{run['goodput_per_s']:.0f} | {run['goodput_per_s'] / capacity['enroll_per_s']:.2f} | "
            f"{run['goodput_per_s'] / peak:.2f} | "
            f"{run['admitted_latency_ms']['p50']:.0f} | {run['admitted_latency_ms']['p99']:.0f} | "
            f"{run['shed_503']} | {run['gave_up_after_503']} | {run['unanswered']} | "
            f"{run['server_cpu_s']:.1f} | {run['client_cpu_s']:.1f} |")
    lines += ["", "Open-loop peak: the highest goodput of any level and kind of client in this "
              f"run, {peak:.0f}/s (the closed loop that measures C keeps 64 connections busy; "
              "the open loop costs more per enrollment).",
              "", f"Burst: {burst_summary['arrivals']} connections opened at once, one PKCSReq "
              f"each: final statuses {burst_summary['final_status']}, "
              f"{burst_summary['enrollments']} verified enrollments, "
              f"{burst_summary['unanswered']} unanswered."]
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, capacity: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        compare.log("matplotlib is not installed: no plot")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for clients, marker in (("honour", "o"), ("ignore", "s")):
        chosen = [r for r in runs if r["clients"] == clients]
        levels = [r["level"] for r in chosen]
        left.plot(levels, [r["goodput_per_s"] for r in chosen], marker=marker,
                  label=f"{clients} Retry-After")
        right.plot(levels, [r["admitted_latency_ms"]["p99"] for r in chosen], marker=marker,
                   label=f"{clients} Retry-After")
    left.axhline(capacity["enroll_per_s"], color="grey", linestyle="--", label="capacity")
    left.axhline(0.8 * capacity["enroll_per_s"], color="grey", linestyle=":", label="80%")
    left.set(xlabel="offered load (x capacity)", ylabel="verified enrollments/s",
             title="goodput", ylim=(0, None))
    right.set(xlabel="offered load (x capacity)", ylabel="ms", title="p99 of admitted",
              ylim=(0, None))
    for ax in (left, right):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


BATCH = 32  # batch.max_size of the default configuration


def open_loop_peak(runs: list[dict[str, Any]]) -> float:
    """The best goodput of the run's open-loop levels: what the server sustains when
    devices arrive on their own, against which the goodput at 4x is also read."""
    return max((run["goodput_per_s"] for run in runs), default=0.0) or 1.0


def _admitted_bound_ms(capacity: dict[str, Any], meta: dict[str, Any]) -> float:
    per_worker = capacity["enroll_per_s"] / meta["workers"]
    return 1000 * (meta["max_wait_s"] + BATCH / per_worker)


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "model name":
            return value.strip()
    return "an unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=12.0, help="length of each run")
    parser.add_argument("--levels", default="1,2,4", help="offered load, times capacity")
    cpus = sorted(os.sched_getaffinity(0))
    parser.add_argument("--server-cpus", default=",".join(map(str, cpus[:max(1, len(cpus) // 2)])),
                        help="cores for the server (one worker each); the load generator "
                        "gets the others (default: the first half)")
    parser.add_argument("--burst", type=int, default=4096,
                        help="connections opened at once in the burst run")
    args = parser.parse_args(argv)
    levels = [float(x) for x in args.levels.split(",")]
    server_cpus = [int(x) for x in args.server_cpus.split(",")]
    client_cpus = [cpu for cpu in cpus if cpu not in server_cpus] or cpus
    os.sched_setaffinity(0, client_cpus)
    workers = len(server_cpus)

    run_dir = RESULTS_DIR / "overload-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    scenario = compare.Scenario("scep-fast", "rsa2048", "post", 64)
    server = compare.ScepFastServer(scenario, workers, run_dir, cpus=server_cpus)
    try:
        ras, ca = loadgen.fetch_ca(server.url)
        params = loadgen.Params(challenge=compare.CHALLENGE)
        capacity_count = int(args.seconds * 2500)
        reqset = loadgen.prepare(ras[0], capacity_count, params)
        compare.log("capacity: closed loop at c=64")
        capacity = loadgen.run(server.url, reqset, ra_ders=ras, ca_der=ca,
                               count=capacity_count, concurrency=64, duration=args.seconds,
                               server_pid=server.proc.pid, quiet=True)
        compare.log(f"capacity {capacity['enroll_per_s']:.0f}/s")
        needed = sum(int(level * capacity["enroll_per_s"] * args.seconds) + 1
                     for level in levels) * 2 + args.burst
        reqset = loadgen.prepare(ras[0], capacity_count + needed, params)
        parts = urllib.parse.urlsplit(server.url)
        offset = capacity_count
        runs = []
        for level in levels:
            for clients in ("honour", "ignore"):
                rate = level * capacity["enroll_per_s"]
                count = int(rate * args.seconds) + 1
                wire = loadgen.build_wire(reqset, range(offset, offset + count),
                                          "127.0.0.1", server.port, parts.path, "post")
                compare.log(f"{level}x ({rate:.0f}/s), clients {clients} Retry-After")
                loop = OpenLoop("127.0.0.1", server.port, wire, rate, args.seconds,
                                honour=clients == "honour")
                cpu_before = loadgen.tree_cpu_seconds(server.proc.pid)
                client_before = resource.getrusage(resource.RUSAGE_SELF)
                devices, elapsed = asyncio.run(loop.run())
                client_after = resource.getrusage(resource.RUSAGE_SELF)
                server_cpu = loadgen.tree_cpu_seconds(server.proc.pid) - cpu_before
                summary = summarise(devices, elapsed, reqset, ras, ca, offset,
                                    window=args.seconds)
                summary["client_cpu_s"] = (client_after.ru_utime + client_after.ru_stime
                                           - client_before.ru_utime - client_before.ru_stime)
                # What a 503 costs the server: its CPU beyond what the
                # enrollments cost at capacity, spread over the 503s.
                enroll_cpu = summary["enrollments"] * (capacity["cpu_ms_per_enroll"] or 0) / 1000
                summary.update(level=level, clients=clients, rate=rate, server_cpu_s=server_cpu,
                               cpu_ms_per_503=(server_cpu - enroll_cpu) / summary["shed_503"]
                               * 1000 if summary["shed_503"] else None)
                compare.log(f"  goodput {summary['goodput_per_s']:.0f}/s, admitted p99 "
                            f"{summary['admitted_latency_ms']['p99']:.0f} ms, "
                            f"503s {summary['shed_503']}, unanswered {summary['unanswered']}, "
                            f"server CPU {server_cpu:.1f} s, client CPU "
                            f"{summary['client_cpu_s']:.1f} s, run {elapsed:.1f} s")
                runs.append(summary)
                offset += count
                time.sleep(2)  # let the queues drain between runs
        compare.log(f"burst: {args.burst} connections at once, one PKCSReq each")
        wire = loadgen.build_wire(reqset, range(offset, offset + args.burst), "127.0.0.1",
                                  server.port, parts.path, "post")
        devices = asyncio.run(burst("127.0.0.1", server.port, wire))
        burst_summary = summarise(devices, max(d.done_at for d in devices), reqset, ras, ca,
                                  offset)
        compare.log(f"  {burst_summary['final_status']}, enrollments "
                    f"{burst_summary['enrollments']}, unanswered {burst_summary['unanswered']}")
    finally:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.proc.kill()
    meta = {"command": "python benchmarks/overload.py " + " ".join(argv or sys.argv[1:]),
            "cpu": _cpu_model(),
            "cores": compare.os.cpu_count(), "server_cpus": server_cpus,
            "client_cpus": client_cpus, "workers": workers, "max_wait_s": 1.0}
    (RESULTS_DIR / "overload.json").write_text(json.dumps(
        {"meta": meta, "capacity": capacity, "runs": runs, "burst": burst_summary},
        indent=2, default=str) + "\n")
    write_markdown(RESULTS_DIR / "overload.md", capacity, runs, meta, burst_summary)
    write_plot(RESULTS_DIR / "overload.png", capacity, runs)
    compare.log(f"wrote {RESULTS_DIR / 'overload.md'}, overload.png and overload.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
