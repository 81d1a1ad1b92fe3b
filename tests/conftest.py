"""Fixtures and hooks shared by every test directory.

Peers (the Debian packages in PEERS.md's table: micromdm's scepclient and
scepserver, certmonger's scep-submit, Prometheus, PostgreSQL) and root (for a private
network namespace) are optional on a developer's machine: a test that lacks
one is skipped with the reason. In CI they are not: with
SCEP_FAST_REQUIRE_PEERS=1 in the environment (``.ci/run`` sets it) the same
test fails instead, so a missing package cannot turn the interop tests into a
green run that tested nothing.

Every such skip goes through :func:`missing_peer`, either directly or through
the :func:`needs_peer` / :func:`needs_root` markers. As a net for a skip that
does not, a test under tests/interop or tests/integration that skips anyway
fails too when peers are required (an expected failure, xfail, is not a skip).
"""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path
from typing import NoReturn

import pytest

VECTORS = Path(__file__).resolve().parent / "vectors"

REQUIRE_PEERS = "SCEP_FAST_REQUIRE_PEERS"
# Directories whose tests talk to peers: under REQUIRE_PEERS none of their tests may skip.
PEER_DIRECTORIES = frozenset({"interop", "integration"})
_HOW_TO_GET_PEERS = ("install them with `make test-deps` (Debian packages scep, certmonger, "
                     "prometheus, postgresql, softhsm2, libengine-pkcs11-openssl, opensc) and run "
                     "as root where a network namespace is needed")


@pytest.fixture(scope="session")
def vectors() -> Path:
    return VECTORS


def peers_required() -> bool:
    """Whether missing peers fail tests instead of skipping them."""
    return os.environ.get(REQUIRE_PEERS, "") not in ("", "0")


def missing_peer(reason: str) -> NoReturn:
    """Skips the test for want of a peer or of root; fails it when peers are required.

    ``reason`` says what is missing, e.g. "micromdm scepclient is not installed
    (Debian package `scep`)".
    """
    if peers_required():
        pytest.fail(f"{reason}; {REQUIRE_PEERS}=1 requires every peer: {_HOW_TO_GET_PEERS}",
                    pytrace=False)
    pytest.skip(reason)


def needs_peer(available: bool, reason: str) -> pytest.MarkDecorator:
    """A marker for a test that needs a peer: unless ``available``, missing_peer(reason)."""
    return pytest.mark.peer(available=available, reason=reason)


def needs_root() -> pytest.MarkDecorator:
    """A marker for a test that needs root (for a private network namespace)."""
    return needs_peer(os.geteuid() == 0, "a private network namespace needs root")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "peer(available, reason): the test needs a third-party peer or root; "
                   "see tests/conftest.py")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # tryfirst: decided before any fixture starts a server for nothing.
    for mark in item.iter_markers("peer"):
        if not mark.kwargs["available"]:
            missing_peer(mark.kwargs["reason"])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
        item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, object, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if (report.skipped and not hasattr(report, "wasxfail") and peers_required()
            and item.path.parent.name in PEER_DIRECTORIES):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        report.outcome = "failed"
        report.longrepr = (f"{reason}; {REQUIRE_PEERS}=1 forbids skipping tests in "
                           f"tests/{item.path.parent.name}: {_HOW_TO_GET_PEERS}")


@pytest.fixture(scope="session")
def postgres() -> Generator[object, None, None]:
    """One real PostgreSQL server for the session (see ``tests/postgres.py``).

    Tests that use it make a database each with ``postgres.new_database()``.
    """
    from tests.postgres import postgres_server

    with postgres_server() as server:
        yield server
