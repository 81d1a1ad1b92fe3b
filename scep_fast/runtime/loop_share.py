"""Under overload, the connection loop yields the CPU to the batch in progress.

A worker is two kinds of work on one core: the trio thread (accepting,
reading, refusing, answering) and the batch threads (the native core, the
ledger). The kernel shares a core evenly between busy threads, and Python
hands the interpreter lock back and forth the same way, so when refusals
keep the trio thread busy all the time (clients that come back every half
second whatever Retry-After said) the batch gets half the core and goodput
halves, however cheap each refusal is.

So while the worker sheds load and a batch is being prepared, a task in
the trio thread measures that thread's own CPU time over short ticks and,
when it has taken more than ``share`` of the time, blocks the thread (a
plain sleep: no interpreter lock, no CPU) for long enough to bring it back
to ``share``. Refusals wait in the kernel's socket buffers meanwhile; they
cost the same, later. Without overload it never sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

# How often the share is checked, and the longest single pause: short, so
# that answers of finished batches leave without a noticeable delay.
TICK_SECONDS = 0.005
MAX_PAUSE_SECONDS = 0.02


async def keep_loop_share(share: float, contended: Callable[[], bool]) -> None:
    """Runs until cancelled; ``contended()`` says the batch wants the CPU now."""
    cpu, wall = time.thread_time(), time.perf_counter()
    while True:
        await trio.sleep(TICK_SECONDS)
        used = time.thread_time() - cpu
        elapsed = time.perf_counter() - wall
        if contended():
            pause = used / share - elapsed
            if pause > 0:
                # Blocking the trio thread is the point: it lets go of the core.
                time.sleep(min(pause, MAX_PAUSE_SECONDS))  # noqa: ASYNC251
        cpu, wall = time.thread_time(), time.perf_counter()
