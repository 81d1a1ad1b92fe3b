"""Fixtures for the tests that drive the enrollment service directly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from scep_fast.runtime.ledger_lmdb import LmdbLedger
from scep_fast.service.ledger import Ledger
from scep_fast.service.ledger_memory import MemoryLedger
from tests.unit.harness import Clock, Pki, Service


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


@pytest.fixture(params=["memory", "lmdb", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    if request.param == "memory":
        yield MemoryLedger()
        return
    if request.param == "postgresql":
        # The service's rules hold on the ledger several nodes share, too.
        from scep_fast.runtime.ledger_pg import PgLedger, migrate

        server = request.getfixturevalue("postgres")
        url = server.url(server.new_database())
        migrate(url)
        with PgLedger(url) as pg_ledger:
            yield pg_ledger
        return
    with LmdbLedger(tmp_path / "ledger") as lmdb_ledger:
        yield lmdb_ledger


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def service(pki: Pki, ledger: Ledger, clock: Clock) -> Service:
    return Service(pki, ledger, clock)
