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


@pytest.fixture(params=["memory", "lmdb"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    if request.param == "memory":
        yield MemoryLedger()
        return
    with LmdbLedger(tmp_path / "ledger") as lmdb_ledger:
        yield lmdb_ledger


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def service(pki: Pki, ledger: Ledger, clock: Clock) -> Service:
    return Service(pki, ledger, clock)
