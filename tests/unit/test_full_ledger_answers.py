"""A full ledger turns the answers of the batch it refused into 503s, and no other answer."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from scep_fast.protocol import InternalError, StorageFull
from scep_fast.runtime import metrics
from scep_fast.runtime.server import _observe_full, answering_full_ledger_with_503
from scep_fast.service.enrollment import Answer
from scep_fast.service.ledger import LedgerFull


def _batch(*answers: Answer) -> Any:
    return SimpleNamespace(items=[SimpleNamespace(answer=a) for a in answers])


def _counted() -> float:
    return metrics.LEDGER_FULL._value.get()  # type: ignore[attr-defined,no-any-return]


def test_the_answers_a_full_commit_refused_become_503() -> None:
    waiting, refused_before = Answer(status="SUCCESS"), Answer(error=InternalError("wrap"))

    def finish(_batch: Any) -> list[Answer]:
        # What the enrollment service does when its commit raises.
        _observe_full("commit", LedgerFull("the map size is used up"))
        waiting.error = InternalError("ledger commit: the map size is used up")
        waiting.status = "HTTP 500"
        return [waiting, refused_before]

    before = _counted()
    answers = answering_full_ledger_with_503(finish)(_batch(waiting, refused_before))
    assert isinstance(answers[0].error, StorageFull)
    assert answers[0].error.http_status == 503 and answers[0].status == "HTTP 503"
    assert "map size" in answers[0].error.detail and "map size" not in str(answers[0].error)
    # Refused for another reason before the commit: still the 500 it was.
    assert type(answers[1].error) is InternalError
    assert _counted() == before + 1


def test_other_commit_failures_stay_500() -> None:
    waiting = Answer(status="SUCCESS")

    def finish(_batch: Any) -> list[Answer]:
        waiting.error = InternalError("ledger commit: disk on fire")
        return [waiting]

    # A full write elsewhere on this thread earlier does not count for this batch.
    _observe_full("revoke", LedgerFull("full"))
    answers = answering_full_ledger_with_503(finish)(_batch(waiting))
    assert type(answers[0].error) is InternalError
