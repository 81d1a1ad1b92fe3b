"""The validation stage under trio: bounded, timed, fail closed, and many requests at once."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from scep_fast.runtime.batcher import Batcher, Pipeline
from scep_fast.runtime.validation_stage import ValidationStage
from scep_fast.service.validation import ValidationFailed, ValidationRequest, Verdict

ALLOW = Verdict(True)


def _request(i: int) -> ValidationRequest:
    return ValidationRequest(transaction_id=f"t{i}", message_type="PKCSReq", csr_der=b"csr",
                             subject=f"CN=d{i}", sans=(), challenge="secret")


@dataclass
class FakeBatch:
    """What the stage reads and writes of a PreparedBatch."""

    requests: list[ValidationRequest]
    verdicts: list[Verdict | BaseException] = field(default_factory=list)

    def validation_requests(self) -> list[ValidationRequest]:
        return self.requests

    def set_verdicts(self, verdicts: Sequence[Verdict | BaseException]) -> None:
        self.verdicts = list(verdicts)


class Scripted:
    """A validator whose answer depends on the request, counting calls in flight."""

    def __init__(self, name: str, answers: dict[str, Verdict | BaseException | float],
                 default: Verdict | BaseException | float = ALLOW,
                 delay: float = 0.0) -> None:
        self.name = name
        self._answers, self._default, self._delay = answers, default, delay
        self.calls: list[str] = []
        self.in_flight = self.most_in_flight = 0

    async def validate(self, request: ValidationRequest) -> Verdict:
        self.calls.append(request.transaction_id)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            answer = self._answers.get(request.transaction_id, self._default)
            await trio.sleep(answer if isinstance(answer, float) else self._delay)
            if isinstance(answer, BaseException):
                raise answer
            if isinstance(answer, float):
                return Verdict(True)
            return answer
        finally:
            self.in_flight -= 1


def _run(stage: ValidationStage, batch: FakeBatch) -> FakeBatch:
    trio.run(stage, batch)  # type: ignore[arg-type]
    return batch


def test_every_validator_must_allow_and_the_first_refusal_or_failure_decides() -> None:
    calls: list[tuple[str, str]] = []
    first = Scripted("first", {"t1": Verdict(False, "no"), "t2": ValidationFailed("500")})
    second = Scripted("second", {"t3": Verdict(False, "second says no")})
    stage = ValidationStage([first, second], timeout_seconds=1, max_in_flight=8,
                            on_call=lambda v, r, _s: calls.append((v, r)))
    batch = _run(stage, FakeBatch([_request(i) for i in range(4)]))
    allowed, denied, failed, denied_second = batch.verdicts
    assert allowed == Verdict(True)
    assert denied == Verdict(False, "no")
    assert isinstance(failed, ValidationFailed)
    assert denied_second == Verdict(False, "second says no")
    # A refusal or failure stops there: the second validator is not asked.
    assert sorted(second.calls) == ["t0", "t3"]
    assert ("first", "deny") in calls and ("first", "error") in calls
    assert ("second", "deny") in calls and calls.count(("first", "allow")) == 2


def test_a_validator_that_does_not_answer_in_time_refuses_within_the_timeout() -> None:
    slow = Scripted("slow", {}, default=30.0)
    results: list[str] = []
    stage = ValidationStage([slow], timeout_seconds=0.2, max_in_flight=8,
                            on_call=lambda _v, r, _s: results.append(r))
    started = time.monotonic()
    batch = _run(stage, FakeBatch([_request(0), _request(1)]))
    assert time.monotonic() - started < 5
    assert all(isinstance(v, ValidationFailed) for v in batch.verdicts)
    assert results == ["timeout", "timeout"]


def test_validators_that_choose_different_profiles_refuse() -> None:
    a = Scripted("a", {}, default=Verdict(True, profile="wifi"))
    b = Scripted("b", {"t1": Verdict(True, profile="vpn")}, default=Verdict(True, profile="wifi"))
    batch = _run(ValidationStage([a, b], timeout_seconds=1, max_in_flight=8),
                 FakeBatch([_request(0), _request(1)]))
    assert batch.verdicts[0] == Verdict(True, profile="wifi")
    assert batch.verdicts[1] == Verdict(False, "the validators chose different profiles")


def test_requests_are_validated_at_once_up_to_the_bound() -> None:
    hook = Scripted("hook", {}, delay=0.05)
    batch = _run(ValidationStage([hook], timeout_seconds=5, max_in_flight=6),
                 FakeBatch([_request(i) for i in range(40)]))
    assert hook.most_in_flight == 6
    assert all(v == Verdict(True) for v in batch.verdicts)


def test_batches_waiting_for_validation_do_not_hold_up_the_next_ones() -> None:
    """A batch waiting for its validators holds no stage: later batches are
    authenticated and validated meanwhile."""
    waiting = 0
    most_waiting = 0

    async def validate(_batch: list[bytes]) -> None:
        nonlocal waiting, most_waiting
        waiting += 1
        most_waiting = max(most_waiting, waiting)
        await trio.sleep(0.1)
        waiting -= 1

    batcher: Batcher[list[bytes], bytes] = Batcher(
        Pipeline(list, lambda b: b, validate=validate), max_size=1, window_seconds=0,
        queue_size=64)

    async def main() -> list[bytes]:
        answers: list[bytes] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(batcher.run)
            async with trio.open_nursery() as clients:
                for i in range(8):
                    async def one(i: int = i) -> None:
                        answers.append(await batcher.submit(b"%d" % i))
                    clients.start_soon(one)
            batcher.close()
        return answers

    answers = trio.run(main)
    assert sorted(answers) == sorted(b"%d" % i for i in range(8))
    assert most_waiting >= 3
