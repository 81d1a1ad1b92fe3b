"""The batcher: batches form, a full queue answers Overloaded at once, errors reach callers."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest
import trio

from scep_fast.protocol import Overloaded
from scep_fast.runtime.batcher import EARLY_SHARE, Batcher, BatchStats, Pipeline, _Pending


def _as_is(answers: list[bytes]) -> list[bytes]:
    return answers


def test_messages_are_batched_and_answered_in_order() -> None:
    seen: list[list[bytes]] = []
    stats: list[BatchStats] = []

    def handle(batch: Sequence[bytes]) -> list[bytes]:
        seen.append(list(batch))
        return [m.upper() for m in batch]

    async def main() -> list[bytes]:
        batcher = Batcher(Pipeline(handle, _as_is), max_size=8, window_seconds=0.05,
                          queue_size=64,
                          on_batch=stats.append)
        answers: list[bytes] = [b""] * 20
        async with trio.open_nursery() as nursery:
            nursery.start_soon(batcher.run)

            async def one(i: int) -> None:
                answers[i] = await batcher.submit(b"m%d" % i)

            async with trio.open_nursery() as clients:
                for i in range(20):
                    clients.start_soon(one, i)
            batcher.close()
        return answers

    answers = trio.run(main)
    assert answers == [b"M%d" % i for i in range(20)]
    assert max(len(b) for b in seen) == 8
    assert len(seen) < 20
    assert sum(s.size for s in stats) == 20


def test_full_queue_is_refused_at_once_with_retry_after() -> None:
    entered = threading.Event()
    release = threading.Event()

    def handle(batch: Sequence[bytes]) -> list[bytes]:
        entered.set()
        release.wait(timeout=30)
        return list(batch)

    async def main() -> tuple[int, int]:
        batcher = Batcher(Pipeline(handle, _as_is), max_size=1, window_seconds=0, queue_size=2)
        outcomes = {"ok": 0, "busy": 0}
        seven_refused = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(batcher.run)

            async def one() -> None:
                try:
                    await batcher.submit(b"x")
                    outcomes["ok"] += 1
                except Overloaded as e:
                    assert e.http_status == 503 and e.retry_after_seconds >= 1
                    outcomes["busy"] += 1
                    if outcomes["busy"] == 7:
                        seven_refused.set()

            with trio.fail_after(10):
                async with trio.open_nursery() as clients:
                    clients.start_soon(one)
                    # The first message is in the (blocked) handler before the rest come.
                    await trio.to_thread.run_sync(entered.wait, 10)
                    for _ in range(9):
                        clients.start_soon(one)
                    # The refusals come back while the handler is still blocked.
                    await seven_refused.wait()
                    release.set()
            batcher.close()
        return outcomes["ok"], outcomes["busy"]

    ok, busy = trio.run(main)
    # One message in the handler, two in the queue; the other seven are refused.
    assert (ok, busy) == (3, 7)


def test_a_failing_batch_fails_each_of_its_callers() -> None:
    def handle(batch: Sequence[bytes]) -> list[bytes]:
        raise RuntimeError("native core exploded")

    async def main() -> None:
        batcher = Batcher(Pipeline(handle, _as_is), max_size=4, window_seconds=0.01, queue_size=8)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(batcher.run)
            with pytest.raises(RuntimeError, match="exploded"):
                await batcher.submit(b"x")
            batcher.close()

    trio.run(main)


def test_the_next_batch_is_prepared_while_the_last_one_finishes() -> None:
    events: list[str] = []
    second_prepared = threading.Event()

    def prepare(batch: Sequence[bytes]) -> list[bytes]:
        events.append(f"prepare {b','.join(batch).decode()}")
        if batch[0] == b"b":
            second_prepared.set()
        return list(batch)

    def finish(batch: list[bytes]) -> list[bytes]:
        if batch[0] == b"a":
            # Blocks until the second batch has been prepared: without the
            # overlap this would wait out its timeout.
            assert second_prepared.wait(timeout=10)
        events.append(f"finish {b','.join(batch).decode()}")
        return [m.upper() for m in batch]

    async def main() -> dict[bytes, bytes]:
        batcher = Batcher(Pipeline(prepare, finish), max_size=1, window_seconds=0, queue_size=8)
        answers: dict[bytes, bytes] = {}
        answered_early: list[bytes] = []

        async def one(message: bytes) -> None:
            answers[message] = await batcher.submit(message)
            if b"finish " + message not in [e.encode() for e in events]:
                answered_early.append(message)

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(batcher.run)
                async with trio.open_nursery() as clients:
                    for message in (b"a", b"b", b"c"):
                        clients.start_soon(one, message)
                        await trio.sleep(0.01)
                batcher.close()
        assert answered_early == []  # nobody is answered before its batch finished
        return answers

    answers = trio.run(main)
    assert answers == {b"a": b"A", b"b": b"B", b"c": b"C"}
    assert events.index("prepare b") < events.index("finish a")
    # Batches finish one at a time, in order.
    assert [e for e in events if e.startswith("finish")] == ["finish a", "finish b", "finish c"]


def test_a_failing_finish_fails_its_callers_and_the_next_batch_still_runs() -> None:
    def finish(batch: list[bytes]) -> list[bytes]:
        if batch == [b"bad"]:
            raise RuntimeError("ledger full")
        return batch

    async def main() -> bytes:
        batcher = Batcher(Pipeline(list, finish), max_size=1, window_seconds=0, queue_size=8)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(batcher.run)
            with pytest.raises(RuntimeError, match="ledger full"):
                await batcher.submit(b"bad")
            good = await batcher.submit(b"good")
            batcher.close()
        return good

    assert trio.run(main) == b"good"


def test_the_queue_is_bounded_by_waiting_time() -> None:
    # Each message costs 10 ms to prepare; the target wait is 50 ms. Of 60
    # requests arriving together, about the first target's worth are served
    # and the rest are refused at once, and nobody admitted waits much past
    # the target plus one batch.
    cost, target = 0.01, 0.05
    shed: list[str] = []

    def prepare(batch: Sequence[bytes]) -> list[bytes]:
        time.sleep(cost * len(batch))
        return list(batch)

    async def main() -> tuple[list[float], list[int], float]:
        batcher = Batcher(Pipeline(prepare, _as_is), max_size=4, window_seconds=0, queue_size=1000,
                          max_wait_seconds=target,
                          on_shed=lambda reason, _count: shed.append(reason))
        # Two requests first, so the batcher has measured the cost (the first
        # batch only warms up).
        async with trio.open_nursery() as nursery:
            nursery.start_soon(batcher.run)
            await batcher.submit(b"warm")
            await batcher.submit(b"measured")
            waits: list[float] = []
            retry_after: list[int] = []
            started = time.perf_counter()

            async def one() -> None:
                sent = time.perf_counter()
                try:
                    await batcher.submit(b"x")
                    waits.append(time.perf_counter() - sent)
                except Overloaded as e:
                    assert time.perf_counter() - sent < 0.005  # refused without waiting
                    retry_after.append(e.retry_after_seconds)

            with trio.fail_after(10):
                async with trio.open_nursery() as clients:
                    for _ in range(60):
                        clients.start_soon(one)
            batcher.close()
        return waits, retry_after, time.perf_counter() - started

    waits, retry_after, _elapsed = trio.run(main)
    assert len(waits) + len(retry_after) == 60
    assert 3 <= len(waits) <= 15, len(waits)
    assert retry_after and all(r >= 1 for r in retry_after)
    # The target, plus one batch of up to 4 messages, plus scheduling slack.
    assert max(waits) < target + 4 * cost + 0.05, max(waits)
    assert set(shed) <= {"expected_wait", "waited_too_long"} and shed


def test_without_a_time_bound_only_the_count_bounds_the_queue() -> None:
    def prepare(batch: Sequence[bytes]) -> list[bytes]:
        time.sleep(0.002 * len(batch))
        return list(batch)

    async def main() -> int:
        batcher = Batcher(Pipeline(prepare, _as_is), max_size=4, window_seconds=0, queue_size=1000)
        served = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(batcher.run)

            async def one() -> None:
                nonlocal served
                await batcher.submit(b"x")
                served += 1

            async with trio.open_nursery() as clients:
                for _ in range(50):
                    clients.start_soon(one)
            batcher.close()
        return served

    assert trio.run(main) == 50


def test_the_connection_loop_refuses_early_and_submission_at_the_target() -> None:
    # The loop's early check and submission look at the same queue a moment
    # apart; the loop refuses below the target, so that a request it let
    # through is refused late only when the wait grew past the target itself.
    batcher: Batcher[list[bytes], bytes] = Batcher(Pipeline(list, _as_is), max_size=1,
                                                   window_seconds=0, queue_size=100,
                                                   max_wait_seconds=1.0)
    batcher._cost["prepare"] = 0.1
    for _ in range(9):  # 9 queued x 0.1 s: past the early bound, within the target
        batcher._send.send_nowait(_Pending(b"x"))
    assert batcher.early_refusal() is not None
    assert batcher.refusal() is None
    for _ in range(2):  # 11 x 0.1 s: past the target too
        batcher._send.send_nowait(_Pending(b"x"))
    assert batcher.refusal() is not None


def test_requests_the_connection_loop_let_through_count_before_they_are_submitted() -> None:
    # A crowd arrives faster than the loop hands requests to the app: the
    # queue is empty while the loop judges them, yet each one it lets
    # through will be ahead of the next.
    batcher: Batcher[list[bytes], bytes] = Batcher(Pipeline(list, _as_is), max_size=1,
                                                   window_seconds=0, queue_size=100,
                                                   max_wait_seconds=0.05)
    batcher._cost["prepare"] = 0.005
    verdicts = [batcher.early_refusal() for _ in range(30)]
    early_bound = round(EARLY_SHARE * 0.05 / 0.005)  # requests' worth
    assert verdicts[:early_bound] == [None] * early_bound  # about that many let through
    assert all(v is not None for v in verdicts[early_bound + 2:])
    # Ones that never arrive (the client went away) stop counting after the target.
    time.sleep(0.06)
    assert batcher.early_refusal() is None


def test_retry_after_grows_with_the_crowd_that_was_refused() -> None:
    batcher: Batcher[list[bytes], bytes] = Batcher(Pipeline(list, _as_is), max_size=1,
                                                   window_seconds=0, queue_size=8)
    assert batcher.retry_after(0.2) == 1  # nothing refused lately: the queue's own wait
    for _ in range(100):
        batcher._count(refused=False)
    for _ in range(300):
        batcher._count(refused=True)
    # Three refused for every one served: come back after several windows' worth.
    assert batcher.retry_after(0.2) >= 5
    for _ in range(100_000):
        batcher._count(refused=True)
    assert batcher.retry_after(0.2) == 120  # bounded
