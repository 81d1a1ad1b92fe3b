"""Batches PKIOperation messages into one native call each.

Requests wait in a bounded trio memory channel, and the bound that matters
is time: a request that would wait longer than ``max_wait_seconds`` for its
batch to start is refused at once with Overloaded (503 + Retry-After),
before anything is spent on it. The expected wait is the number of messages
ahead of it times the recent cost of preparing one (a moving average of the
batches' own timing); a message that waited past the target anyway (a burst
the estimate did not foresee) is shed when its batch forms rather than
served late (the connection loop's early refusal uses a lower bound, see
``EARLY_SHARE``). So under overload the worker keeps serving at capacity,
and every admitted request is answered within about the target plus one
batch, instead of every request waiting in a long queue. A full channel is refused
the same way. One task collects up to ``max_size`` messages (waiting at
most ``window_seconds`` for more when others are queued) and sends the
batch through the stages of a :class:`Pipeline`, in order: authenticate,
validate, issue, sign, record, notify. The CPU stages run in one worker
thread at a time (the GIL is released while C code works), a batch past
validation before a new one is authenticated, the record stage
(the synced ledger commit, after which the answers may leave) in another,
and validation in the trio loop, where a batch waiting for its validators
holds no thread: while one batch waits for them or for the disk, the next is
authenticated. At most ``MAX_BATCHES_IN_FLIGHT`` batches are past the first
stage at once.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

from scep_fast.protocol import Overloaded

B = TypeVar("B")
T = TypeVar("T")
S = TypeVar("S")
R = TypeVar("R")
# Batches between authentication and their answers: enough for validation of
# a few batches to overlap without holding many requests in memory.
MAX_BATCHES_IN_FLIGHT = 4


async def _no_validation(_batch: object) -> None:
    return None


def _nothing(_batch: object) -> None:
    return None


@dataclass(frozen=True, slots=True)
class Pipeline(Generic[B, T]):
    """What happens to a batch, stage by stage, in the order the stages run."""

    authenticate: Callable[[Sequence[bytes]], B]   # thread: open, verify, decide
    record: Callable[[B], list[T]]                 # thread: the durable commit; the answers
    issue: Callable[[B], None] = _nothing          # thread: issue the certificates
    sign: Callable[[B], None] = _nothing           # thread: sign the replies
    validate: Callable[[B], Awaitable[None]] = _no_validation  # trio: external validators
    notify: Callable[[B], None] = _nothing         # trio, after record: wake the outbox


@dataclass(slots=True)
class _Pending(Generic[T]):
    message: bytes
    done: trio.Event = field(default_factory=trio.Event)
    result: T | None = None
    error: BaseException | None = None
    queued_at: float = 0.0


# Why a request was refused for load, as the metrics name it.
SHED_REASONS = ("queue_full", "expected_wait", "waited_too_long")
# Weight of the newest batch in the moving average of the cost per message.
_COST_SMOOTHING = 0.2
# Retry-After tells a refused client to come back once the clients refused
# lately could have been served at the rate requests were admitted, so a
# crowd spreads itself out instead of returning all at once.
_DEMAND_WINDOW_SECONDS = 2.0
MAX_RETRY_AFTER_SECONDS = 120
# A request is judged twice: by the connection loop as its bytes arrive
# (``early_refusal``, the cheap 503) and again when it is submitted. In
# between, the requests ahead of it in the loop may have filled the queue
# past the target, and a 503 given that late costs the whole HTTP path,
# several times the early one, for nothing saved. So the early judgement
# refuses at this share of the target, leaving room for those, and for the
# estimate's error: under a crowd of refusals the batches slow down after
# their requests were admitted. At 0.8, requests admitted just before such a
# slowdown waited past the target and were shed when their batch formed
# (hundreds a run at 4x with clients ignoring Retry-After); at 0.6, almost
# none, and the queue still holds many batches (benchmarks/RESULTS.md).
EARLY_SHARE = 0.6


@dataclass(frozen=True, slots=True)
class BatchStats:
    size: int
    wait_seconds: float  # how long the oldest message waited before its batch ran
    queued: int  # messages left waiting when the batch finished


class Batcher(Generic[B, T]):
    """Collects messages and sends them through a :class:`Pipeline`, a batch at a time."""

    def __init__(
        self,
        pipeline: Pipeline[B, T],
        *,
        max_size: int,
        window_seconds: float,
        queue_size: int,
        max_wait_seconds: float = 0.0,
        on_batch: Callable[[BatchStats], None] = lambda _s: None,
        on_shed: Callable[[str, int], None] = lambda _reason, _count: None,
    ) -> None:
        self._pipeline = pipeline
        self._max_size = max_size
        self._window = window_seconds
        self._send, self._receive = trio.open_memory_channel[_Pending[T]](queue_size)
        # One thread for the CPU stages and one for the commits, per worker: the
        # native core already runs a batch flat out on one core, and a second
        # thread would only contend for it. Commits run in the order they come;
        # the CPU goes to a validated batch before a new one (see _CpuSlot).
        self._cpu = _CpuSlot()
        self._recording = trio.CapacityLimiter(1)
        self._in_flight = trio.Semaphore(MAX_BATCHES_IN_FLIGHT)
        self._on_batch = on_batch
        self._on_shed = on_shed
        # 0: no bound by time, only by count.
        self._max_wait = max_wait_seconds
        # Seconds per message to prepare and per batch to finish, recent
        # batches weighted most; absent until a batch has run the stage.
        self._cost: dict[str, float] = {}
        self._warm: set[str] = set()
        # Messages taken from the queue whose CPU stages are not done (ahead of
        # every queued one).
        self._preparing_now = 0
        # When the connection loop let each request through that has not been
        # submitted yet (see early_refusal): ahead of any request judged now.
        self._incoming: collections.deque[float] = collections.deque()
        # Refused and admitted PKIOperations: this window's and the last one's.
        self._window_start = time.monotonic()
        self._counts = [0, 0]          # refused, admitted in this window
        self._last_counts = (0, 0)

    def expected_wait(self) -> float:
        """How long a request submitted now would wait for its batch to start.

        Preparing costs about the same per message; the commit costs about the
        same per batch (one sync to disk), and the two stages overlap, so the
        slower of the two sets the pace. A request that fits in the next batch
        waits for the batch being prepared at most: never refuse it for time.
        """
        queued = self.queued() + self._still_incoming()
        if not self._cost or queued < self._max_size:
            return 0.0
        ahead = queued + self._preparing_now
        batches = math.ceil(ahead / self._max_size)
        return max(ahead * self._cost.get("prepare", 0.0),
                   batches * self._cost.get("finish", 0.0))

    def _count(self, refused: bool, count: int = 1) -> None:
        now = time.monotonic()
        if now - self._window_start >= _DEMAND_WINDOW_SECONDS:
            self._last_counts = (self._counts[0], self._counts[1])
            self._counts = [0, 0]
            self._window_start = now
        self._counts[0 if refused else 1] += count

    def retry_after(self, wait: float) -> int:
        """Seconds a refused client should stay away: the queue ahead of it, or
        longer when more were refused than served lately (the crowd's backlog)."""
        refused = self._counts[0] + self._last_counts[0]
        admitted = self._counts[1] + self._last_counts[1]
        covered = time.monotonic() - self._window_start + _DEMAND_WINDOW_SECONDS
        # The refused crowd, served at the rate requests were admitted.
        backlog = refused * covered / max(admitted, 1)
        return min(MAX_RETRY_AFTER_SECONDS, max(1, math.ceil(max(wait, backlog))))

    def _shed(self, reason: str, wait: float) -> Overloaded:
        self._on_shed(reason, 1)
        self._count(refused=True)
        return Overloaded(self.retry_after(wait))

    def refusal(self, share: float = 1.0) -> Overloaded | None:
        """The 503 for a message that would wait longer than ``share`` of the target
        for its batch to start, or None."""
        if self._max_wait > 0:
            expected = self.expected_wait()
            if expected > self._max_wait * share:
                return self._shed("expected_wait", expected)
        return None

    def overloaded(self) -> bool:
        """Whether the connection loop would refuse a PKIOperation now (see early_refusal)."""
        return self._max_wait > 0 and self.expected_wait() > self._max_wait * EARLY_SHARE

    def relieved(self) -> bool:
        """Whether the queue has fallen to half of where refusing starts."""
        return self.expected_wait() <= self._max_wait * EARLY_SHARE / 2

    def retry_after_now(self) -> int:
        return self.retry_after(self.expected_wait())

    def note_refused(self, count: int) -> None:
        """Requests refused outside the event loop (the refusal thread), counted as shed."""
        self._on_shed("expected_wait", count)
        self._count(refused=True, count=count)

    def early_refusal(self) -> Overloaded | None:
        """``refusal`` for the connection loop, as a request's bytes arrive: a request
        it lets through counts as queued from now until it is submitted, so a
        crowd arriving faster than the loop parses it is not all let through
        on the length of the queue before it."""
        refused = self.refusal(EARLY_SHARE)
        if refused is None and self._max_wait > 0:
            self._incoming.append(time.monotonic())
        return refused

    def _still_incoming(self) -> int:
        """Requests let through by the connection loop and not submitted yet. One
        that takes longer than the target to arrive (its client went away, or
        the app answered it without submitting) stops counting."""
        incoming = self._incoming
        if incoming:
            stale = time.monotonic() - self._max_wait
            while incoming and incoming[0] < stale:
                incoming.popleft()
        return len(incoming)

    async def submit(self, message: bytes) -> T:
        if self._incoming:
            self._incoming.popleft()
        refused = self.refusal()
        if refused is not None:
            raise refused
        pending: _Pending[T] = _Pending(message, queued_at=time.perf_counter())
        try:
            self._send.send_nowait(pending)
        except trio.WouldBlock:
            raise self._shed("queue_full", self.expected_wait()) from None
        self._count(refused=False)
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None  # noqa: S101 - set together with done
        return pending.result

    def queued(self) -> int:
        return self._receive.statistics().current_buffer_used

    async def run(self) -> None:
        """Serves batches until the channel is closed and drained."""
        async with self._receive, trio.open_nursery() as in_flight:
            async for first in self._receive:
                batch = [first]
                if self._max_size > 1:
                    await self._collect(batch)
                with trio.CancelScope(shield=True):
                    await self._cpu.acquire(LATER)
                try:
                    # What arrived while an earlier batch had the CPU joins this
                    # one: fewer, fuller batches, as when the stages were one call.
                    self._drain(batch)
                    started = time.perf_counter()
                    batch = self._shed_stale(batch, started)
                    if not batch:
                        continue
                    self._preparing_now += len(batch)
                    try:
                        with trio.CancelScope(shield=True):
                            authenticated = await trio.to_thread.run_sync(
                                self._pipeline.authenticate, [p.message for p in batch])
                    except BaseException as e:  # noqa: BLE001 - handed to every waiter
                        self._preparing_now -= len(batch)
                        _fail(batch, e)
                        continue
                    cpu_seconds = time.perf_counter() - started
                finally:
                    self._cpu.release()
                with trio.CancelScope(shield=True):
                    await self._in_flight.acquire()
                in_flight.start_soon(self._rest, batch, authenticated, started, cpu_seconds)

    async def _cpu_stage(self, stage: Callable[[S], R], argument: S,
                         priority: int) -> tuple[R, float]:
        """The stage's result, and the seconds it ran (its wait for the CPU left out:
        that is the queue's, which expected_wait counts apart)."""
        # Shielded: a batch runs to completion even if its requests are
        # cancelled (clients gone), so that certificates are recorded either way.
        with trio.CancelScope(shield=True):
            result = await self._cpu.run(stage, argument, priority)
        return result

    def _issue_and_sign(self, authenticated: B) -> None:
        # One turn of the CPU for both: another batch's authentication does
        # not come between them and hold these requests' answers back.
        self._pipeline.issue(authenticated)
        self._pipeline.sign(authenticated)

    async def _rest(self, batch: list[_Pending[T]], authenticated: B, started: float,
                    cpu_seconds: float) -> None:
        """The stages after the first, for one batch; its waiters get the answers."""
        pipeline = self._pipeline
        preparing = len(batch)
        try:
            try:
                with trio.CancelScope(shield=True):
                    await pipeline.validate(authenticated)
                _, seconds = await self._cpu_stage(self._issue_and_sign, authenticated, SOONER)
                cpu_seconds += seconds
                self._preparing_now -= preparing
                preparing = 0
                self._learn_cost("prepare", cpu_seconds / len(batch))
                record_started = time.perf_counter()
                with trio.CancelScope(shield=True):
                    results = await trio.to_thread.run_sync(
                        pipeline.record, authenticated, limiter=self._recording)
                self._learn_cost("finish", time.perf_counter() - record_started)
                for pending, result in zip(batch, results, strict=True):
                    pending.result = result
                    pending.done.set()
                pipeline.notify(authenticated)
            except BaseException as e:  # noqa: BLE001 - handed to every waiter
                _fail(batch, e)
            self._on_batch(BatchStats(size=len(batch),
                                      wait_seconds=started - batch[0].queued_at,
                                      queued=self.queued()))
        finally:
            self._preparing_now -= preparing
            self._in_flight.release()

    async def _collect(self, batch: list[_Pending[T]]) -> None:
        """Adds what is queued, then, only if others were queued too, waits for more.

        A lone message means an idle worker: it runs at once, so a quiet
        server answers without the window's delay. Several queued messages
        mean load: waiting up to the window fills the batch, which spreads
        the per-batch costs (the ledger sync above all) over more requests.
        """
        self._drain(batch)
        if len(batch) == 1 or len(batch) >= self._max_size or self._window <= 0:
            return
        with trio.move_on_after(self._window):
            while len(batch) < self._max_size:
                try:
                    batch.append(await self._receive.receive())
                except trio.EndOfChannel:
                    return
                self._drain(batch)

    def _shed_stale(self, batch: list[_Pending[T]], now: float) -> list[_Pending[T]]:
        """The batch less what already waited past the target: those get 503 now.

        Not before the worker is warm: its first batch is slow once, not
        because the worker is overloaded.
        """
        if self._max_wait <= 0 or "prepare" not in self._cost:
            return batch
        fresh = []
        for pending in batch:
            waited = now - pending.queued_at
            if waited > self._max_wait:
                _fail([pending], self._shed("waited_too_long", self.expected_wait()))
            else:
                fresh.append(pending)
        return fresh

    def _learn_cost(self, stage: str, seconds: float) -> None:
        """``seconds`` per message for prepare, per batch for finish (see expected_wait)."""
        if stage not in self._warm:
            # A worker's first batch pays for warming up (imports, caches,
            # the ledger's first pages): not what the next ones will cost.
            self._warm.add(stage)
            return
        last = self._cost.get(stage)
        self._cost[stage] = seconds if last is None else (
            (1 - _COST_SMOOTHING) * last + _COST_SMOOTHING * seconds)

    def _drain(self, batch: list[_Pending[T]]) -> None:
        while len(batch) < self._max_size:
            try:
                batch.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return

    def close(self) -> None:
        """No new messages; ``run`` finishes what is queued, then returns."""
        self._send.close()


# Priorities of the CPU stages: a batch past validation is finished before
# another is authenticated, so that requests in flight are answered (and
# their clients come back) sooner than new ones are started.
SOONER, LATER = 0, 1


class _CpuSlot:
    """One CPU stage at a time, in a worker thread; waiting stages by priority, then
    in order of arrival."""

    def __init__(self) -> None:
        self._busy = False
        self._waiting = (trio.lowlevel.ParkingLot(), trio.lowlevel.ParkingLot())

    async def run(self, stage: Callable[[S], R], argument: S,
                  priority: int) -> tuple[R, float]:
        """The stage's result and the seconds it ran, once it had the slot."""
        await self.acquire(priority)
        try:
            started = time.perf_counter()
            result = await trio.to_thread.run_sync(stage, argument)
            return result, time.perf_counter() - started
        finally:
            self.release()

    async def acquire(self, priority: int) -> None:
        if self._busy:
            # Woken with the slot handed over (see release). Callers shield
            # this wait, so it is never cancelled half-way.
            await self._waiting[priority].park()
        else:
            self._busy = True

    def release(self) -> None:
        for waiting in self._waiting:
            if waiting:
                waiting.unpark()
                return
        self._busy = False


def _fail(batch: list[_Pending[T]], error: BaseException) -> None:
    for pending in batch:
        if not pending.done.is_set():
            pending.error = error
            pending.done.set()
