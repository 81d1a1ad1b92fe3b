"""The supervisor's restart policy: at once, unless a worker keeps dying as it starts."""

from __future__ import annotations

from scep_fast.runtime.supervisor import (
    FIRST_BACKOFF_SECONDS,
    MAX_RESTART_DELAY_SECONDS,
    QUICK_DEATH_SECONDS,
    RestartBackoff,
)

QUICK = QUICK_DEATH_SECONDS / 10
LONG = QUICK_DEATH_SECONDS * 10


def test_a_death_after_a_long_life_is_restarted_at_once() -> None:
    backoff = RestartBackoff()
    assert [backoff.delay_after(LONG) for _ in range(5)] == [0.0] * 5


def test_the_first_quick_death_is_restarted_at_once() -> None:
    assert RestartBackoff().delay_after(QUICK) == 0.0


def test_quick_deaths_in_a_row_back_off_exponentially_up_to_the_cap() -> None:
    backoff = RestartBackoff()
    delays = [backoff.delay_after(QUICK) for _ in range(10)]
    assert delays[:5] == [0.0, FIRST_BACKOFF_SECONDS, 2 * FIRST_BACKOFF_SECONDS,
                          4 * FIRST_BACKOFF_SECONDS, 8 * FIRST_BACKOFF_SECONDS]
    assert max(delays) == delays[-1] == MAX_RESTART_DELAY_SECONDS
    assert delays == sorted(delays)


def test_a_worker_that_lived_long_enough_resets_the_back_off() -> None:
    backoff = RestartBackoff()
    for _ in range(6):
        backoff.delay_after(QUICK)
    assert backoff.delay_after(QUICK_DEATH_SECONDS) == 0.0
    assert backoff.delay_after(QUICK) == 0.0
    assert backoff.delay_after(QUICK) == FIRST_BACKOFF_SECONDS
