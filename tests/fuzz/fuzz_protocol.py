"""atheris harness for ``scep_fast.protocol.parse_request``.

    python tests/fuzz/fuzz_protocol.py [libFuzzer flags] [corpus directories]

One invariant, as in h11's fuzzer: for any method, raw query and body,
``parse_request`` returns one of the request types, or raises our protocol
error (a ``RequestError``, which carries a plain HTTP status: 400, 405 or
413), nothing else. A returned request is checked too: a PKIOperation
message is non-empty bytes within the size limit, a CA name is printable.

Input layout: one octet (method, and bit 7 picks a small size limit), the
raw query with a two-octet length, then the body.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from scep_fast.protocol import RequestError
    from scep_fast.protocol.request import (
        DEFAULT_MAX_MESSAGE_BYTES,
        MAX_CA_IDENT_CHARS,
        GetCACaps,
        GetCACert,
        GetNextCACert,
        PKIOperation,
        parse_request,
    )

METHODS = ("GET", "POST", "HEAD", "PUT", "get", "", "OPTIONS", "POST ")
SMALL_LIMIT = 64
STATUSES = frozenset({400, 405, 413})


def test_one_input(data: bytes) -> None:
    first = data[0] if data else 0
    method = METHODS[first % len(METHODS)]
    limit = SMALL_LIMIT if first & 0x80 else DEFAULT_MAX_MESSAGE_BYTES
    query_len = int.from_bytes(data[1:3], "big")
    query = data[3 : 3 + query_len]
    body = data[3 + query_len :]
    try:
        request = parse_request(method, query, body, max_message_bytes=limit)
    except RequestError as exc:
        if exc.http_status not in STATUSES:
            status = exc.http_status
            raise AssertionError(f"{type(exc).__name__} with HTTP status {status}") from exc
        return
    if isinstance(request, PKIOperation):
        if not isinstance(request.message, bytes) or not 0 < len(request.message) <= limit:
            raise AssertionError("PKIOperation message empty or over the limit")
        if method not in ("GET", "POST") or request.via_get != (method == "GET"):
            raise AssertionError(f"PKIOperation accepted over {method!r}")
    elif isinstance(request, GetCACaps | GetCACert | GetNextCACert):
        if len(request.ca_ident) > MAX_CA_IDENT_CHARS or not request.ca_ident.isprintable():
            raise AssertionError("CA name unbounded or not printable")
        if method not in ("GET", "POST", "HEAD"):
            raise AssertionError(f"{type(request).__name__} accepted over {method!r}")
    else:
        raise AssertionError(f"unexpected result {request!r}")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
