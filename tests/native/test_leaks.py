"""Leak check of the native core: thousands of calls must not grow the process.

Each scenario runs its entry points, on the good path and on failing paths,
a few thousand times after a warm-up (OpenSSL fills its algorithm and
provider caches on first use), then compares memory before and after:

* the resident set size from /proc/self/statm must grow by less than
  RSS_BUDGET; with at least CALLS_FOR_RSS native calls that catches a leak of
  about 200 bytes per call;
* where glibc offers mallinfo2, the bytes malloc has handed out (which is what
  OpenSSL and the core allocate with) must grow by less than HEAP_BUDGET,
  which catches a leak of a few dozen bytes per call.

The sanitizer build (tests/native/sanitize.sh) skips this file: ASan's
allocator and quarantine change what RSS and mallinfo report.
"""

from __future__ import annotations

import ctypes
import gc
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from scep_fast.crypto import (
    CertRepSpec,
    InvalidArgument,
    IssueRequest,
    NativeError,
    ScepContext,
    certs_only,
)
from tests.native.hostile_helpers import B, Device, flip, raw_issue, signature_span

pytestmark = [
    pytest.mark.skipif(os.environ.get("SCEP_FAST_SANITIZED") == "1",
                       reason="memory use under AddressSanitizer says nothing about leaks"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm"),
]

RSS_BUDGET = 2 * 1024 * 1024
HEAP_BUDGET = 256 * 1024
CALLS_FOR_RSS = 10_000  # RSS_BUDGET / CALLS_FOR_RSS is about 210 bytes per call
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
NOW = int(time.time())


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _mallinfo2() -> Callable[[], int] | None:
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError):
        return None
    fn.restype = _MallInfo2
    fn.argtypes = []

    def in_use() -> int:
        info = fn()
        return int(info.uordblks + info.hblkhd)

    return in_use


heap_in_use = _mallinfo2()


def assert_no_leak(step: Callable[[], int], iterations: int, warmup: int = 300,
                   min_calls: int = CALLS_FOR_RSS) -> None:
    """Runs step (which returns how many native calls it made) and checks memory."""
    for _ in range(warmup):
        step()
    gc.collect()
    rss_before = rss()
    heap_before = heap_in_use() if heap_in_use else 0
    calls = 0
    for _ in range(iterations):
        calls += step()
    gc.collect()
    rss_growth = rss() - rss_before
    heap_growth = (heap_in_use() - heap_before) if heap_in_use else 0
    assert calls >= min_calls, "too few calls to see a small leak"
    assert rss_growth < RSS_BUDGET, (
        f"RSS grew by {rss_growth} bytes over {calls} calls ({rss_growth / calls:.0f} per call)")
    assert heap_growth < HEAP_BUDGET, (
        f"malloc'd memory grew by {heap_growth} bytes over {calls} calls "
        f"({heap_growth / calls:.1f} per call)")


@pytest.fixture(scope="module")
def message(vectors: Path) -> bytes:
    return (vectors / "oaep-aes256-sha512-pkcsreq.der").read_bytes()


@pytest.fixture(scope="module")
def device() -> Device:
    return Device.load()


def test_good_cycle(ctx: ScepContext, ca: tuple[bytes, bytes], message: bytes) -> None:
    """unwrap, issue (from the request and from DER), SUCCESS and PENDING CertReps."""

    def step() -> int:
        request = ctx.unwrap(message)
        assert request.csr is not None
        certs = ctx.issue_batch([
            IssueRequest(request=request, serial=0x1234, not_before=NOW, not_after=NOW + 60),
            IssueRequest(csr_der=request.content, serial=0x1235, not_before=NOW,
                         not_after=NOW + 60, extensions_der=b"\x30\x00"),
        ])
        assert all(isinstance(c, bytes) for c in certs)
        replies = ctx.wrap_batch([
            CertRepSpec(request=request, status=0, certs=[certs[0], ca[0]]),
            CertRepSpec(request=request, status=3),
        ])
        assert all(isinstance(r, bytes) for r in replies)
        return 5

    assert_no_leak(step, iterations=2000, warmup=200)


def test_failing_unwraps(ctx: ScepContext, message: bytes, vectors: Path,
                         device: Device) -> None:
    """Random bytes, truncations, a bad signature, a wrong recipient, refused algorithms."""
    rng = random.Random(1)
    garbage = [rng.randbytes(rng.randrange(1, 4000)) for _ in range(8)]
    start, _ = signature_span(message)
    failing = [
        *garbage,
        b"",
        message[:-1],
        message[: len(message) // 2],
        message[:300],
        message + b"\x00",
        flip(message, start + 11),
        (vectors / "wrong-recipient-pkcsreq.der").read_bytes(),
        device.pkcsreq(digest="md5"),
        device.pkcsreq(transaction_id=B.octets(b"x")),
        device.pkcsreq(device.envelope(device.csr())[:-1]),
        b"\x30\x80" * 2000 + b"\x00\x00" * 2000,
    ]

    def step() -> int:
        results = ctx.unwrap_batch(failing)
        assert all(r.error is not None for r in results)
        return len(results)

    assert_no_leak(step, iterations=700, warmup=100)


def test_failing_issues(ctx: ScepContext, message: bytes, device: Device) -> None:
    """Garbage and badly signed CSRs, bad names and extensions, requests without a CSR."""
    request = ctx.unwrap(message)
    csr = request.content
    no_csr = ctx.unwrap_batch([b"garbage"])[0]
    bad_sig = flip(csr, len(csr) - 2)
    spki = device.spki()
    spki_bits = spki[spki.index(b"\x03\x82"):]  # the subjectPublicKey BIT STRING
    twice = B.seq(B.oid("2.5.29.19"), B.octets(b"\x30\x00"))
    items = [
        IssueRequest(csr_der=b"\x30\x03garbage", serial=1, not_before=NOW, not_after=NOW + 60),
        IssueRequest(csr_der=bad_sig, serial=1, not_before=NOW, not_after=NOW + 60),
        IssueRequest(request=no_csr, serial=1, not_before=NOW, not_after=NOW + 60),
        IssueRequest(request=request, serial=1, not_before=NOW, not_after=NOW),
        IssueRequest(request=request, serial=1, not_before=0, not_after=2**62),
        IssueRequest(request=request, serial=1, not_before=NOW, not_after=NOW + 60,
                     subject_der=b"\x30\x03\x02\x01\x01"),
        IssueRequest(request=request, serial=1, not_before=NOW, not_after=NOW + 60,
                     extensions_der=b"\x30\x03\x02\x01\x01"),
        IssueRequest(csr_der=device.csr_with_spki(B.seq(B.seq(
            B.oid("1.2.840.113549.1.1.1"), B.integer(5)), b"\x03\x01\x00")),
            serial=1, not_before=NOW, not_after=NOW + 60),
        # Refused after the certificate is under construction: a key that is not in
        # canonical form, a five-digit year, an extension given twice.
        IssueRequest(csr_der=device.csr_with_spki(B.seq(
            B.alg_id("1.2.840.113549.1.1.1", B.oid("1.2.3")), spki_bits)),
            serial=1, not_before=NOW, not_after=NOW + 60),
        IssueRequest(request=request, serial=1, not_before=NOW, not_after=253402300800),
        IssueRequest(request=request, serial=1, not_before=NOW, not_after=NOW + 60,
                     extensions_der=B.seq(twice, twice)),
    ]

    def step() -> int:
        results = ctx.issue_batch(items)
        assert all(isinstance(r, NativeError) for r in results), results
        status, _, _ = raw_issue(ctx, csr, b"\x00", NOW, NOW + 60)
        assert status == InvalidArgument.status
        return len(results) + 1

    assert_no_leak(step, iterations=1300, warmup=100)


def test_failing_wraps_and_certs_only(ctx: ScepContext, message: bytes) -> None:
    """Invalid CertRep specs, unauthenticated requests, and certs-only encodings."""
    request = ctx.unwrap(message)
    unauthenticated = ctx.unwrap_batch([b"\x30\x00"])[0]
    specs = [
        CertRepSpec(request=request, status=2),
        CertRepSpec(request=request, status=3, fail_info=1),
        CertRepSpec(request=request, status=0),
        CertRepSpec(request=request, status=7),
        CertRepSpec(request=unauthenticated, status=2, fail_info=2),
        CertRepSpec(request=request, status=2, fail_info=2, fail_info_text="x" * 5000),
        CertRepSpec(request=request, status=0, fail_info=2, certs=[request.signer_cert]),
    ]

    def step() -> int:
        results = ctx.wrap_batch(specs)
        assert all(isinstance(r, NativeError) for r in results), results
        certs_only([request.signer_cert], [b"\x30\x00"])
        certs_only([])
        return len(results) + 2

    assert_no_leak(step, iterations=1300, warmup=100)


def test_contexts(ra: tuple[bytes, bytes], ca: tuple[bytes, bytes]) -> None:
    """Loading and freeing contexts, and refusing bad key material."""
    bad = [
        {"recipients": [(ra[0], b"garbage")], "signer": ra},
        {"recipients": [(ra[0], ca[1])], "signer": ra},
        {"recipients": [ra], "signer": (b"\x30\x03garbage", ra[1])},
        {"recipients": [ra], "signer": ra, "issuer": (ca[0], ra[1])},
    ]

    def step() -> int:
        ScepContext(recipients=[ra], signer=ra, issuer=ca, allow_legacy=True)
        for kwargs in bad:
            with pytest.raises(InvalidArgument):
                ScepContext(**kwargs)  # type: ignore[arg-type]
        return 1 + len(bad)

    # Each context parses RSA keys, which is slow in OpenSSL 3.0: fewer calls, so this
    # scenario relies on the malloc count more than on RSS.
    assert_no_leak(step, iterations=500, warmup=50, min_calls=2500)
