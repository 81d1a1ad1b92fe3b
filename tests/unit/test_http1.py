"""The HTTP/1-only rule shared by every port, without a network."""

from __future__ import annotations

import pytest

from scep_fast.runtime.http1 import (
    CODING_REFUSED,
    FRAMING_REFUSED,
    HTTP10_CODING_REFUSED,
    SERVE,
    UPGRADE_REFUSED,
    VERSION_REFUSED,
    Verdict,
    judge,
)

HOST = (b"Host", b"x")


@pytest.mark.parametrize(("version", "headers", "verdict"), [
    ("1.1", [HOST], SERVE),
    ("1.0", [], SERVE),
    # RFC 9112 section 2.3: a higher minor version is served as the highest we know.
    ("1.2", [HOST], SERVE),
    ("1.1", [HOST, (b"Content-Length", b"5")], SERVE),
    ("1.1", [HOST, (b"Transfer-Encoding", b"chunked")], SERVE),
    # The HTTP/2 prior-knowledge preface is the request line PRI * HTTP/2.0.
    ("2.0", [], Verdict(VERSION_REFUSED)),
    ("0.9", [], Verdict(VERSION_REFUSED)),
    ("9.9", [HOST], Verdict(VERSION_REFUSED)),
    ("1.1", [HOST, (b"content-length", b"5"), (b"transfer-encoding", b"chunked")],
     Verdict(FRAMING_REFUSED)),
    ("1.1", [HOST, (b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"0")],
     Verdict(FRAMING_REFUSED)),
    ("1.0", [(b"Transfer-Encoding", b"chunked")], Verdict(HTTP10_CODING_REFUSED)),
    ("1.1", [HOST, (b"Transfer-Encoding", b" Chunked ")], SERVE),
    ("1.1", [HOST, (b"Transfer-Encoding", b"gzip")], Verdict(CODING_REFUSED)),
    ("1.1", [HOST, (b"Transfer-Encoding", b"gzip, chunked")], Verdict(CODING_REFUSED)),
    ("1.1", [HOST, (b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")],
     Verdict(CODING_REFUSED)),
    ("1.1", [HOST, (b"Transfer-Encoding", b"identity")], Verdict(CODING_REFUSED)),
    ("1.1", [HOST, (b"Connection", b"Upgrade, HTTP2-Settings"), (b"Upgrade", b"h2c"),
             (b"HTTP2-Settings", b"AAMAAABkAAQAAP__")], Verdict(ignore_upgrade=True)),
    ("1.1", [HOST, (b"Upgrade", b" H2C ")], Verdict(ignore_upgrade=True)),
    ("1.1", [HOST, (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")],
     Verdict(UPGRADE_REFUSED)),
    ("1.1", [HOST, (b"Upgrade", b"h2c, websocket")], Verdict(UPGRADE_REFUSED)),
    ("1.1", [HOST, (b"Upgrade", b"h2c"), (b"Upgrade", b"TLS/1.2")], Verdict(UPGRADE_REFUSED)),
    ("1.1", [HOST, (b"Upgrade", b"foo/1")], Verdict(UPGRADE_REFUSED)),
    # RFC 9110 section 7.8: an Upgrade in an HTTP/1.0 request is ignored.
    ("1.0", [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")],
     Verdict(ignore_upgrade=True)),
])
def test_judge(version: str, headers: list[tuple[bytes, bytes]], verdict: Verdict) -> None:
    assert judge(version, headers) == verdict
