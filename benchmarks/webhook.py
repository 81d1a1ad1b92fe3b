"""Throughput with a validation webhook against without, in one run.

    python benchmarks/webhook.py [--rounds 3] [--seconds 10] [--delay-ms 20] \\
        [--concurrency 64] [--workers N] [--notify]

Each round runs two fresh scep-fast servers one after the other, at the same
concurrency, with the load generator of ``loadgen.py`` (every answer
verified): one without validation, one whose ``[validation.webhook]`` asks
a receiver that answers each request after ``--delay-ms`` (20 ms: an MDM's
inventory lookup). The receiver runs in its own process on the same
machine: its CPU is measured and reported apart, as the database's is in
the PostgreSQL runs. The figure that matters is the ratio of enrollments per
second with the webhook to without, taken round by round: whether a batch
waiting for its validators holds up the next ones (the target is 90%).

The receiver is a minimal asyncio HTTP/1.1 server (keep-alive, Content-Length
framing), not the tests' fake, so that its own cost stays small beside the
server's. It checks every request's signature and signs its answers with
the delivery id, as a real receiver must.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import compare  # noqa: E402
import loadgen  # noqa: E402

SECRET = b"benchmark-webhook-secret-0123456789"


# ---------------------------------------------------------------- the receiver


class _Receiver(asyncio.Protocol):
    def __init__(self, delay: float) -> None:
        self._delay = delay
        self._buffer = b""
        self._transport: asyncio.Transport | None = None
        self.checked = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            head_end = self._buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self._buffer[:head_end].decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, v in
                       (line.split(":", 1) for line in head[1:] if ":" in line)}
            length = int(headers.get("content-length", "0"))
            if len(self._buffer) < head_end + 4 + length:
                return
            body = self._buffer[head_end + 4:head_end + 4 + length]
            self._buffer = self._buffer[head_end + 4 + length:]
            asyncio.get_running_loop().call_later(self._delay, self._answer, headers, body)

    def _answer(self, headers: dict[str, str], body: bytes) -> None:
        from scep_fast.runtime.webhook import DELIVERY_HEADER, signed_headers, verify

        if self._transport is None or self._transport.is_closing():
            return
        if not verify(SECRET, headers, body, time.time()):
            self._transport.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
            return
        answer = b'{"allow":true}'
        signed = signed_headers(SECRET, answer, time.time(),
                                headers[DELIVERY_HEADER.lower()])
        lines = "".join(f"{k}: {v}\r\n" for k, v in signed.items())
        self._transport.write(
            (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{lines}"
             f"Content-Length: {len(answer)}\r\n\r\n").encode() + answer)


def serve_receiver(port: int, delay: float) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Receiver(delay), "127.0.0.1", port,
                                          backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# ------------------------------------------------------------------ the runs


def _server(scenario: compare.Scenario, args: argparse.Namespace, run_dir: Path,
            webhook_port: int | None) -> compare.ScepFastServer:
    directory = run_dir / "server"
    compare.scep_fast_dir(directory, scenario)
    if webhook_port is not None:
        secret = directory / "webhook-secret"
        secret.write_bytes(SECRET)
        secret.chmod(0o600)
        config = directory / "scep-fast.toml"
        text = config.read_text().replace(
            '[validation.webhook]\nurl = ""',
            f'[validation.webhook]\nurl = "http://127.0.0.1:{webhook_port}/validate"')
        if args.notify:
            text = text.replace('notify_url = ""',
                                f'notify_url = "http://127.0.0.1:{webhook_port}/notify"')
        config.write_text(text)
    workers = args.webhook_workers if webhook_port is not None and args.webhook_workers \
        else args.workers
    return compare.ScepFastServer(scenario, workers, run_dir, directory=directory,
                                  log_name=f"webhook-{'on' if webhook_port else 'off'}")


def one_run(args: argparse.Namespace, webhook_port: int | None,
            receiver_pid: int | None) -> dict[str, Any]:
    scenario = compare.Scenario(server="scep-fast", ca_key="rsa2048", method="post",
                                concurrency=args.concurrency)
    with tempfile.TemporaryDirectory(prefix="scep-bench-") as tmp:
        run_dir = Path(tmp)
        server = _server(scenario, args, run_dir, webhook_port)
        receiver_before = loadgen.tree_cpu_seconds(receiver_pid) if receiver_pid else None
        try:
            result = compare.run_loadgen(scenario, args, args.count, run_dir, [server])
        finally:
            server.stop()
        if receiver_pid:
            assert receiver_before is not None
            result["receiver_cpu_s"] = loadgen.tree_cpu_seconds(receiver_pid) - receiver_before
    result["webhook"] = webhook_port is not None
    return result


def report(rounds: list[tuple[dict[str, Any], dict[str, Any]]],
           args: argparse.Namespace) -> str:
    lines = [
        "| round | without: enroll/s | with webhook: enroll/s | ratio | "
        "p99 ms without / with | server CPU ms/enroll without / with | "
        "receiver CPU ms/enroll | failures |",
        "|---|---|---|---|---|---|---|---|"]
    ratios = []
    for i, (off, on) in enumerate(rounds, 1):
        ratio = on["enroll_per_s"] / off["enroll_per_s"] if off["enroll_per_s"] else 0.0
        ratios.append(ratio)
        enrolled = max(1, on["enrollments"])
        lines.append(
            f"| {i} | {off['enroll_per_s']:,.0f} | {on['enroll_per_s']:,.0f} | {ratio:.2f} | "
            f"{off['latency_ms']['p99']:,.0f} / {on['latency_ms']['p99']:,.0f} | "
            f"{off['cpu_ms_per_enroll'] or 0:.2f} / {on['cpu_ms_per_enroll'] or 0:.2f} | "
            f"{1000 * on.get('receiver_cpu_s', 0) / enrolled:.2f} | "
            f"{off['failures']} / {on['failures']} |")
    lines.append("")
    lines.append(f"Median ratio: **{statistics.median(ratios):.2f}** "
                 f"(webhook answering after {args.delay_ms:g} ms"
                 f"{', notifications on' if args.notify else ''}, c={args.concurrency}, "
                 f"{args.seconds:g} s per run, {len(rounds)} rounds alternating).")
    return "\n".join(lines) + "\n"


def _wait_listening(port: int, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    receiver = sub.add_parser("receiver", help="(internal) the webhook receiver")
    receiver.add_argument("--port", type=int, required=True)
    receiver.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=compare.HEADLINE_CONCURRENCY)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--webhook-workers", type=int,
                        help="workers of the server with the webhook (default: --workers)")
    parser.add_argument("--count", type=int, default=30_000)
    parser.add_argument("--notify", action="store_true",
                        help="also send the notifications (issued) to the receiver, through "
                             "the outbox")
    args = parser.parse_args(argv)
    if args.command == "receiver":
        serve_receiver(args.port, args.delay_ms / 1000)
        return 0
    # What compare.run_loadgen reads.
    args.duration, args.timeout, args.verify = args.seconds, 30.0, "all"
    scenario = compare.Scenario(server="scep-fast", ca_key="rsa2048", method="post",
                                concurrency=args.concurrency)
    compare.prepare_requests([scenario], args)
    port = compare.free_port()
    receiver_proc = subprocess.Popen(
        [sys.executable, __file__, "receiver", "--port", str(port),
         "--delay-ms", str(args.delay_ms)], cwd=compare.ROOT,
        env={**os.environ, "PYTHONPATH": str(compare.ROOT)})
    rounds = []
    try:
        _wait_listening(port)
        for i in range(args.rounds):
            compare.log(f"round {i + 1}: without the webhook")
            off = one_run(args, None, None)
            compare.log(f"  {off['enroll_per_s']:,.0f}/s; with the webhook")
            on = one_run(args, port, receiver_proc.pid)
            compare.log(f"  {on['enroll_per_s']:,.0f}/s")
            rounds.append((off, on))
    finally:
        compare.stop_process(receiver_proc, 15)
    compare.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = compare.RESULTS_DIR / (f"webhook-c{args.concurrency}"
                                  + ("-notify" if args.notify else ""))
    stem.with_suffix(".json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items()},
                                        "rounds": rounds}, indent=1, default=str))
    text = report(rounds, args)
    command = "python benchmarks/webhook.py " + " ".join(argv or sys.argv[1:])
    stem.with_suffix(".md").write_text(f"# Validation webhook\n\n`{command.strip()}`\n\n{text}")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
