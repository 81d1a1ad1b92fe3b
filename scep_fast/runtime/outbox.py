"""Delivery of the ledger's outbox: notices out to their sinks, at least once.

Every worker runs one delivery loop. It claims the notices that are due
(the claim is a lease stored in the ledger, so that no other worker or node
takes them meanwhile, and one that dies mid-delivery leaves them to be
claimed again when the lease runs out), delivers them concurrently, and
then settles each: delivered ones leave the outbox; failed ones wait, twice
as long after each failure up to ``max_retry_seconds``; refused ones (the
sink said never) and ones older than ``max_age_seconds`` are dropped,
counted and logged. The loop runs right after each commit (``wake``) and
otherwise every ``poll_seconds``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import trio

from scep_fast.runtime.logs import CountedLine
from scep_fast.service.ledger import Ledger, NoticeRetry
from scep_fast.service.notices import Notice, NoticeRejected, Notifier

log = logging.getLogger(__name__)
_R = TypeVar("_R")

# How a delivery ended, as the metrics name it.
RESULTS = ("delivered", "retry", "rejected", "expired")
CLAIM_LIMIT = 64
FIRST_RETRY_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class _Settled:
    notice: Notice
    result: str          # one of RESULTS
    error: str = ""


class OutboxDelivery:
    """One worker's delivery loop over the ledger's outbox."""

    def __init__(self, ledger: Ledger, notifiers: Mapping[str, Notifier], *,
                 poll_seconds: float, lease_seconds: float, timeout_seconds: float,
                 max_retry_seconds: float, max_age_seconds: float,
                 clock: Callable[[], float] = time.time,
                 on_result: Callable[[str, str], None] = lambda _sink, _result: None,
                 on_backlog: Callable[[int], None] = lambda _count: None) -> None:
        self._ledger = ledger
        self._notifiers = dict(notifiers)
        self._poll = poll_seconds
        self._lease = lease_seconds
        self._timeout = timeout_seconds
        self._max_retry = max_retry_seconds
        self._max_age = max_age_seconds
        self._clock = clock
        self._on_result = on_result
        self._on_backlog = on_backlog
        self._wake = trio.Event()
        # Notices waiting at the last look (every round, at least every poll).
        self.backlog = 0
        # One ledger call at a time, off the trio thread (they sync to disk).
        self._ledger_thread = trio.CapacityLimiter(1)
        self._retry_line = CountedLine(log, "notice delivery failed; will retry")

    def wake(self) -> None:
        """Look for due notices now (a commit wrote some)."""
        self._wake.set()

    async def run(self) -> None:
        """Delivers until cancelled."""
        while True:
            self._wake = trio.Event()
            try:
                claimed = await self._in_thread(self._ledger.claim_notices, self._clock(),
                                                CLAIM_LIMIT, self._lease)
                if claimed:
                    settled = await self._deliver_all(claimed)
                    await self._in_thread(self._settle, settled)
                self.backlog = await self._in_thread(self._ledger.count_notices)
                self._on_backlog(self.backlog)
            except Exception:  # noqa: BLE001 - the ledger may be away; try again later
                log.exception("outbox delivery round failed")
                claimed = []
            if len(claimed) == CLAIM_LIMIT:
                continue  # more are due
            with trio.move_on_after(self._poll):
                await self._wake.wait()

    async def _in_thread(self, call: Callable[..., _R], *args: object) -> _R:
        return await trio.to_thread.run_sync(call, *args, limiter=self._ledger_thread)

    async def _deliver_all(self, notices: Sequence[Notice]) -> list[_Settled]:
        settled: list[_Settled] = []

        async def deliver(notice: Notice) -> None:
            settled.append(await self._deliver(notice))

        async with trio.open_nursery() as nursery:
            for notice in notices:
                nursery.start_soon(deliver, notice)
        return settled

    async def _deliver(self, notice: Notice) -> _Settled:
        notifier = self._notifiers.get(notice.sink)
        if notifier is None or notice.event not in notifier.events:
            # The sink was configured when the notice was written and is not now.
            return _Settled(notice, "rejected", f"no sink {notice.sink} for {notice.event}")
        error = f"no answer within {self._timeout:g} s"
        with trio.move_on_after(self._timeout):
            try:
                await notifier.deliver(notice)
                return _Settled(notice, "delivered")
            except NoticeRejected as e:
                return _Settled(notice, "rejected", str(e))
            except Exception as e:  # noqa: BLE001 - any failure: try again later
                error = str(e) or type(e).__name__
        if self._clock() - notice.created_at > self._max_age:
            return _Settled(notice, "expired", error)
        return _Settled(notice, "retry", error)

    def _settle(self, settled: Sequence[_Settled]) -> None:
        """In a thread: the round's outcomes written to the ledger in one transaction,
        then counted and, unless delivered, logged."""
        now = self._clock()
        retries: list[NoticeRetry] = []
        for s in settled:
            if s.result == "retry":
                attempts = s.notice.attempts + 1
                pause = min(self._max_retry, FIRST_RETRY_SECONDS * 2 ** min(attempts - 1, 30))
                # Spread retries so that a recovered sink is not hit by all at once.
                retries.append((s.notice.notice_id, attempts,
                                now + pause * random.uniform(0.5, 1.0)))  # noqa: S311
        self._ledger.settle_notices(
            [s.notice.notice_id for s in settled if s.result != "retry"], retries)
        for s in settled:
            notice = s.notice
            self._on_result(notice.sink, s.result)
            fields = {"sink": notice.sink, "event": notice.event, "result": s.result,
                      "notice": notice.notice_id.hex(), "attempts": notice.attempts + 1,
                      "error": s.error}
            if s.result == "retry":
                # A sink outage fails every notice again and again: a counted line.
                self._retry_line.note(**fields)
            elif s.result != "delivered":
                log.warning("notice dropped", extra={"fields": fields})
