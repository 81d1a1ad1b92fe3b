"""Thousands of hostile PKCSReqs among valid enrollments, against a running two-worker server.

Every hostile message must get an answer below 500 (a signed CertRep or a
4xx), every valid enrollment its certificate, and no worker may die. The
number of hostile messages is ``SCEP_FAST_HOSTILE_MESSAGES`` (default 1500,
bounded in time too); ``make hostile`` runs a long version. A failure prints
the seed (``SCEP_FAST_HOSTILE_SEED`` repeats a run).
"""

from __future__ import annotations

import collections
import http.client
import os
import random
import threading
import time
from pathlib import Path

from scep_fast.client import parse_cert_rep
from scep_fast.protocol import PKIStatus
from tests.integration.conftest import CHALLENGE, init_dir, set_config, start_server
from tests.integration.load import make_requests
from tests.integration.mutations import Mutator
from tests.integration.test_workers import ra_of, wait_for_workers, worker_pids

HOSTILE = int(os.environ.get("SCEP_FAST_HOSTILE_MESSAGES", "1500"))
VALID_EVERY = 10            # one valid enrollment among this many messages
CONCURRENCY = 16
MAX_SECONDS = float(os.environ.get("SCEP_FAST_HOSTILE_SECONDS", "240"))


def _post_all(port: int, bodies: list[bytes], deadline: float) -> list[tuple[int | None, bytes]]:
    results: list[tuple[int | None, bytes]] = [(None, b"")] * len(bodies)
    order = iter(range(len(bodies)))
    lock = threading.Lock()

    def worker() -> None:
        conn: http.client.HTTPConnection | None = None
        while time.monotonic() < deadline:
            with lock:
                index = next(order, None)
            if index is None:
                break
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("POST", "/scep?operation=PKIOperation", body=bodies[index])
                response = conn.getresponse()
                results[index] = (response.status, response.read())
                if response.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                results[index] = (None, b"")
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=worker) for _ in range(CONCURRENCY)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(1.0, deadline - time.monotonic() + 35))
    return results


def test_hostile_messages_harm_no_valid_enrollment(tmp_path: Path) -> None:
    seed = int(os.environ.get("SCEP_FAST_HOSTILE_SEED", str(random.randrange(2**32))))
    directory = init_dir(tmp_path / "scep")
    set_config(directory, "server", "workers", "2")
    server = start_server(directory)
    try:
        pids = wait_for_workers(server, 2)
        ra = ra_of(server)
        mutator = Mutator(random.Random(seed), ra, CHALLENGE)
        hostile = [mutator.message() for _ in range(HOSTILE)]
        valid = make_requests(ra, HOSTILE // (VALID_EVERY - 1) + 1, CHALLENGE, prefix="valid")
        bodies: list[bytes] = []
        valid_at: dict[int, int] = {}
        for i, body in enumerate(hostile):
            if i % (VALID_EVERY - 1) == 0 and len(valid_at) < len(valid):
                valid_at[len(bodies)] = len(valid_at)
                bodies.append(valid[len(valid_at) - 1].message)
            bodies.append(body)
        results = _post_all(server.port, bodies, time.monotonic() + MAX_SECONDS)
        print(f"seed {seed}: answers by HTTP status",
              collections.Counter(status for status, _ in results))

        unanswered = [i for i, (status, _) in enumerate(results) if status is None]
        server_errors = [(i, status) for i, (status, _) in enumerate(results)
                         if status is not None and status >= 500]
        assert not unanswered, f"seed {seed}: {len(unanswered)} messages got no answer"
        assert not server_errors, f"seed {seed}: 5xx answers {server_errors[:10]}"
        for index, which in valid_at.items():
            status, body = results[index]
            assert status == 200, f"seed {seed}: a valid enrollment got HTTP {status}"
            reply = parse_cert_rep(body, valid[which], ra_certs=[ra])
            assert reply.status is PKIStatus.SUCCESS, (seed, reply.fail_info_text)
        assert worker_pids(server) == pids, f"seed {seed}: a worker died"
        assert server.process.poll() is None
    finally:
        server.stop()
    # An exception caught by the per-message isolation is logged with its
    # traceback: none is expected from hostile input.
    assert "Traceback" not in server.log(), f"seed {seed}"
