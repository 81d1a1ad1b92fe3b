"""Small, bounded load for integration tests: distinct PKCSReqs fired from threads."""

from __future__ import annotations

import http.client
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509

from scep_fast.client import (
    PkiRequest,
    build_csr,
    build_pki_message,
    build_signer_certificate,
    generate_key,
    parse_cert_rep,
)
from scep_fast.protocol import MessageType, PKIStatus


def make_requests(ra: x509.Certificate, count: int, challenge: str, *,
                  pool_size: int = 4, prefix: str = "load") -> list[PkiRequest]:
    """``count`` distinct PKCSReqs: unique CNs and transactionIDs, keys from a small pool."""
    keys = [generate_key() for _ in range(pool_size)]
    signers = [build_signer_certificate(k, f"{prefix}-signer-{i}") for i, k in enumerate(keys)]
    requests = []
    for i in range(count):
        key, signer = keys[i % pool_size], signers[i % pool_size]
        csr = build_csr(key, f"{prefix}-{i}", challenge=challenge)
        requests.append(build_pki_message(
            MessageType.PKCS_REQ, csr, recipient=ra, signer_key=key, signer_cert=signer,
            transaction_id=uuid.uuid4().hex, device_key=key, csr=csr))
    return requests


@dataclass
class Result:
    request: PkiRequest
    status: int | None = None      # HTTP status, None when the connection failed
    body: bytes = b""
    error: str = ""

    def certificate(self, ra: x509.Certificate) -> x509.Certificate | None:
        """The issued certificate if this is a verified SUCCESS CertRep, else None."""
        if self.status != 200:
            return None
        reply = parse_cert_rep(self.body, self.request, ra_certs=[ra])
        if reply.status is not PKIStatus.SUCCESS:
            return None
        return reply.certificates[0]


def fire(port: int, requests: Sequence[PkiRequest], *, concurrency: int,
         max_seconds: float = 60.0) -> list[Result]:
    """POSTs every request once over keep-alive connections; bounded by ``max_seconds``."""
    results = [Result(r) for r in requests]
    next_index = iter(range(len(results)))
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds

    def worker() -> None:
        conn: http.client.HTTPConnection | None = None
        while time.monotonic() < deadline:
            with lock:
                index = next(next_index, None)
            if index is None:
                break
            result = results[index]
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("POST", "/scep?operation=PKIOperation",
                             body=result.request.message)
                response = conn.getresponse()
                result.body = response.read()
                result.status = response.status
                if response.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                result.error = f"{type(e).__name__}: {e}"
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(0.1, deadline - time.monotonic()) + 35)
    return results
