"""Batches PKIOperation messages into one native call each.

Requests wait in a bounded trio memory channel: when it is full the request
is refused at once with Overloaded (503 + Retry-After) rather than queued
without bound. One task collects up to ``max_size`` messages (waiting at
most ``window_seconds`` for more when others are queued) and runs the whole
batch in two stages, each in a worker thread where the GIL is released while
C code or the disk works: ``prepare`` (the CPU work) and ``finish`` (the
synced ledger commit, after which the answers may leave). While one batch's
commit waits for the disk, the next batch is prepared; at most one batch is
in each stage, and batches finish in the order they were prepared.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

from scep_fast.protocol import Overloaded

P = TypeVar("P")
T = TypeVar("T")


@dataclass(slots=True)
class _Pending(Generic[T]):
    message: bytes
    done: trio.Event = field(default_factory=trio.Event)
    result: T | None = None
    error: BaseException | None = None
    queued_at: float = 0.0


@dataclass(frozen=True, slots=True)
class BatchStats:
    size: int
    wait_seconds: float  # how long the oldest message waited before its batch ran
    queued: int  # messages left waiting when the batch finished


class Batcher(Generic[P, T]):
    """Collects messages and hands them to ``prepare``, then ``finish``, a batch at a time."""

    def __init__(
        self,
        prepare: Callable[[Sequence[bytes]], P],
        finish: Callable[[P], list[T]],
        *,
        max_size: int,
        window_seconds: float,
        queue_size: int,
        on_batch: Callable[[BatchStats], None] = lambda _s: None,
    ) -> None:
        self._prepare = prepare
        self._finish = finish
        self._max_size = max_size
        self._window = window_seconds
        self._send, self._receive = trio.open_memory_channel[_Pending[T]](queue_size)
        # One thread per stage per worker: the native core already runs a batch
        # flat out on one core, and a second thread would only contend for it.
        self._preparing = trio.CapacityLimiter(1)
        self._finishing = trio.CapacityLimiter(1)
        # Taken before a finish task starts, so commits run one at a time and in order.
        self._finish_slot = trio.Semaphore(1)
        self._on_batch = on_batch

    async def submit(self, message: bytes) -> T:
        pending: _Pending[T] = _Pending(message, queued_at=time.perf_counter())
        try:
            self._send.send_nowait(pending)
        except trio.WouldBlock:
            raise Overloaded(1) from None
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None  # noqa: S101 - set together with done
        return pending.result

    def queued(self) -> int:
        return self._receive.statistics().current_buffer_used

    async def run(self) -> None:
        """Serves batches until the channel is closed and drained."""
        async with self._receive, trio.open_nursery() as finishing:
            async for first in self._receive:
                batch = [first]
                if self._max_size > 1:
                    await self._collect(batch)
                started = time.perf_counter()
                try:
                    with trio.CancelScope(shield=True):
                        prepared = await trio.to_thread.run_sync(
                            self._prepare, [p.message for p in batch], limiter=self._preparing)
                except BaseException as e:  # noqa: BLE001 - handed to every waiter
                    _fail(batch, e)
                    continue
                # The previous batch's commit must be done before this one's starts.
                with trio.CancelScope(shield=True):
                    await self._finish_slot.acquire()
                finishing.start_soon(self._finish_batch, batch, prepared, started)

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

    def _drain(self, batch: list[_Pending[T]]) -> None:
        while len(batch) < self._max_size:
            try:
                batch.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return

    async def _finish_batch(self, batch: list[_Pending[T]], prepared: P,
                            started: float) -> None:
        """The second stage. Like the first it runs to completion even if the
        requests are cancelled (clients gone): certificates are recorded
        either way."""
        try:
            try:
                with trio.CancelScope(shield=True):
                    results = await trio.to_thread.run_sync(self._finish, prepared,
                                                            limiter=self._finishing)
                for pending, result in zip(batch, results, strict=True):
                    pending.result = result
                    pending.done.set()
            except BaseException as e:  # noqa: BLE001 - handed to every waiter
                _fail(batch, e)
            self._on_batch(BatchStats(size=len(batch),
                                      wait_seconds=started - batch[0].queued_at,
                                      queued=self.queued()))
        finally:
            self._finish_slot.release()

    def close(self) -> None:
        """No new messages; ``run`` finishes what is queued, then returns."""
        self._send.close()


def _fail(batch: list[_Pending[T]], error: BaseException) -> None:
    for pending in batch:
        if not pending.done.is_set():
            pending.error = error
            pending.done.set()
