"""Under overload the trio thread keeps to its share of the CPU, and only then."""

from __future__ import annotations

import time

import trio
import trio.lowlevel

from scep_fast.runtime.loop_share import keep_loop_share


def _busy_share(contended: bool, seconds: float = 0.6) -> float:
    """The trio thread's CPU over wall time while a task keeps it busy."""

    async def main() -> float:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_loop_share, 0.3, lambda: contended)
            cpu, wall = time.thread_time(), time.perf_counter()
            while time.perf_counter() - wall < seconds:
                spin = time.perf_counter()
                while time.perf_counter() - spin < 0.001:  # a refusal's worth of work, and more
                    pass
                await trio.lowlevel.checkpoint()
            share = (time.thread_time() - cpu) / (time.perf_counter() - wall)
            nursery.cancel_scope.cancel()
            return share

    return trio.run(main)


def test_a_busy_loop_yields_down_to_its_share_while_the_batch_wants_the_cpu() -> None:
    assert _busy_share(contended=True) < 0.45


def test_without_contention_the_loop_is_never_held_back() -> None:
    # On a machine shared with other work the thread may get less than all of
    # a core, but far more than its share under load.
    assert _busy_share(contended=False) > 0.6
