"""Batches PKIOperation messages into one native call each.

Requests wait in a bounded trio memory channel: when it is full the request
is refused at once with Overloaded (503 + Retry-After) rather than queued
without bound. One task collects up to ``max_size`` messages (waiting at
most ``window_seconds`` for more when others are queued) and runs the whole
batch in a worker thread, where cffi releases the GIL while the C core works.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

from scep_fast.protocol import Overloaded

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


class Batcher(Generic[T]):
    """Collects messages and hands them to ``handle`` a batch at a time."""

    def __init__(
        self,
        handle: Callable[[Sequence[bytes]], list[T]],
        *,
        max_size: int,
        window_seconds: float,
        queue_size: int,
        on_batch: Callable[[BatchStats], None] = lambda _s: None,
    ) -> None:
        self._handle = handle
        self._max_size = max_size
        self._window = window_seconds
        self._send, self._receive = trio.open_memory_channel[_Pending[T]](queue_size)
        # One batch at a time per worker: the native core already runs a batch
        # flat out on one core, and a second thread would only contend for it.
        self._limiter = trio.CapacityLimiter(1)
        self._on_batch = on_batch

    async def submit(self, message: bytes) -> T:
        pending: _Pending[T] = _Pending(message, queued_at=time.perf_counter())
        try:
            self._send.send_nowait(pending)
        except trio.WouldBlock:
            raise Overloaded(1) from None
        # The batch runs to completion even if this request is cancelled
        # (client gone): its certificate is recorded either way.
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None  # noqa: S101 - set together with done
        return pending.result

    def queued(self) -> int:
        return self._receive.statistics().current_buffer_used

    async def run(self) -> None:
        """Serves batches until the channel is closed and drained."""
        async with self._receive:
            async for first in self._receive:
                batch = [first]
                if self._max_size > 1:
                    await self._collect(batch)
                await self._run_batch(batch)

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

    async def _run_batch(self, batch: list[_Pending[T]]) -> None:
        started = time.perf_counter()
        messages = [p.message for p in batch]
        try:
            with trio.CancelScope(shield=True):
                results = await trio.to_thread.run_sync(self._handle, messages,
                                                        limiter=self._limiter)
            for pending, result in zip(batch, results, strict=True):
                pending.result = result
        except BaseException as e:  # noqa: BLE001 - handed to every waiter
            for pending in batch:
                pending.error = e
        finally:
            for pending in batch:
                pending.done.set()
        self._on_batch(BatchStats(size=len(batch), wait_seconds=started - batch[0].queued_at,
                                  queued=self.queued()))

    def close(self) -> None:
        """No new messages; ``run`` finishes what is queued, then returns."""
        self._send.close()
