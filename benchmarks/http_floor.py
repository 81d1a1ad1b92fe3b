"""What the HTTP layer alone costs: a trivial ASGI app under hypercorn, three ways.

    python benchmarks/http_floor.py                  # 3 rounds of 5 s per variant
    python benchmarks/http_floor.py --rounds 5 --duration 8

The app answers GetCACert with scep-fast's real CA/RA certificates (the load
generator asks for them first) and every PKIOperation with 2,600 bytes
without looking at them; the load generator sends its cached 3.5 KB PKCSReqs
by POST over keep-alive connections, as in ``compare.py``. One server
process, on 127.0.0.1. Variants, taken in turn in each round so that the
machine's drift falls on all of them:

- ``hypercorn``: ``hypercorn.trio.serve`` as shipped, CPython's default GC;
- ``hypercorn+gc``: the same with the workers' GC settings
  (``scep_fast.runtime.server.tune_gc``);
- ``scep-fast``: ``scep_fast.runtime.http_server.serve`` (hypercorn's
  protocol, our connection loop) with those GC settings: what a worker runs.

Prints server CPU per request (utime + stime of the server process, from
``/proc``) and requests/s per variant and round, then the medians.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

import compare  # noqa: E402
import loadgen  # noqa: E402

from scep_fast.runtime.app import answer_lifespan  # noqa: E402

VARIANTS = ("hypercorn", "hypercorn+gc", "scep-fast")
REPLY = b"\x30" * 2600


def _app(ca_body: bytes, ca_type: bytes) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        while (await receive()).get("more_body"):
            pass
        body, kind = (ca_body, ca_type) if b"GetCACert" in scope["query_string"] \
            else (REPLY, b"application/x-pki-message")
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", kind),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return app


def serve(variant: str, port: int, server_dir: Path) -> None:
    """The server process of one variant."""
    import trio
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.trio import serve as hypercorn_serve

    from scep_fast.crypto import certs_only
    from scep_fast.runtime import http_server
    from scep_fast.runtime.app import CT_CA_RA_CERT
    from scep_fast.runtime.server import tune_gc

    ders = [x509.load_pem_x509_certificate((server_dir / name).read_bytes()).public_bytes(
        Encoding.DER) for name in ("ra.pem", "ca.pem")]
    app = _app(certs_only(ders), CT_CA_RA_CERT)
    hc = HypercornConfig()
    hc.bind = [f"127.0.0.1:{port}"]
    hc.keep_alive_timeout = 15
    hc.include_server_header = False
    hc.accesslog = None
    hc.errorlog = None
    stop = trio.Event()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async def on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        stop.set()
                        return

            nursery.start_soon(on_signal)
            if variant == "scep-fast":
                await http_server.serve(app, hc, shutdown_trigger=stop.wait)
            else:
                await hypercorn_serve(app, hc, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
            nursery.cancel_scope.cancel()

    if variant != "hypercorn":
        tune_gc()
    trio.run(main)


def measure(variant: str, args: argparse.Namespace, server_dir: Path) -> dict[str, float]:
    port = compare.free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", variant, "--port", str(port),
                               "--server-dir", str(server_dir)], cwd=ROOT)
    try:
        compare.wait_http("127.0.0.1", port, server)
        with tempfile.TemporaryDirectory(prefix="http-floor-") as tmp:
            out = Path(tmp) / "run.json"
            subprocess.run(
                [sys.executable, str(BENCH_DIR / "loadgen.py"), "run",
                 f"http://127.0.0.1:{port}/scep", "--challenge", compare.CHALLENGE,
                 "--count", str(args.count), "--concurrency", str(args.concurrency),
                 "--duration", str(args.duration), "--server-pid", str(server.pid),
                 "--verify", "0", "--quiet", "--json-out", str(out)],
                check=False, capture_output=True, timeout=args.duration + 120, cwd=ROOT)
            result = json.loads(out.read_text())
    finally:
        compare.stop_process(server, signal.SIGTERM)
    answered = max(1, int(result["answered_200"]))
    return {"cpu_ms_per_request": 1000 * float(result["server_cpu_s"]) / answered,
            "requests_per_s": float(result["responses_per_s"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--count", type=int, default=50_000, help="requests per run (at most)")
    parser.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--server-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.server_dir)
        return 0

    server_dir = compare.scep_fast_template("rsa2048")
    loadgen.prepare(compare.ra_certificate("scep-fast", "rsa2048"), args.count,
                    loadgen.Params(challenge=compare.CHALLENGE))
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for round_ in range(1, args.rounds + 1):
        for variant in VARIANTS:
            run = measure(variant, args, server_dir)
            runs[variant].append(run)
            print(f"round {round_} {variant:13s} {run['cpu_ms_per_request']:.3f} ms CPU/request"
                  f"  {run['requests_per_s']:,.0f} requests/s", flush=True)
    summary = {v: {"cpu_ms_per_request": statistics.median(r["cpu_ms_per_request"] for r in rs),
                   "requests_per_s": statistics.median(r["requests_per_s"] for r in rs)}
               for v, rs in runs.items()}
    for variant, numbers in summary.items():
        print(f"median {variant:13s} {numbers['cpu_ms_per_request']:.3f} ms CPU/request"
              f"  {numbers['requests_per_s']:,.0f} requests/s")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
