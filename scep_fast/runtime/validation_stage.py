"""The validation stage: every granted request of a batch put to the validators.

Runs in the worker's trio loop, so a batch waiting for its validators holds
no thread and the next batch is authenticated meanwhile. Each request's
validators are asked one after the other (a refusal stops there); many
requests are in flight at once, up to ``max_in_flight`` calls per worker.
Every call has a timeout, and any error, timeout or refusal refuses the
request (fail closed): the issue stage turns a missing or failed verdict
into a signed FAILURE badRequest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import trio

from scep_fast.service.enrollment import PreparedBatch
from scep_fast.service.validation import ValidationFailed, ValidationRequest, Validator, Verdict

log = logging.getLogger(__name__)

# How a call ended, as the metrics name it.
RESULTS = ("allow", "deny", "error", "timeout")


class ValidationStage:
    """The ``validate`` stage of the pipeline, over the configured validators."""

    def __init__(self, validators: Sequence[Validator], *, timeout_seconds: float,
                 max_in_flight: int,
                 on_call: Callable[[str, str, float], None] = lambda _v, _r, _s: None) -> None:
        self._validators = list(validators)
        self._timeout = timeout_seconds
        self._limiter = trio.CapacityLimiter(max_in_flight)
        # Told each call's validator name, result (one of RESULTS) and seconds.
        self._on_call = on_call

    async def __call__(self, batch: PreparedBatch) -> None:
        requests = batch.validation_requests()
        if not requests:
            return
        verdicts: list[Verdict | BaseException] = [
            ValidationFailed("not validated")] * len(requests)

        async def validate(index: int, request: ValidationRequest) -> None:
            verdicts[index] = await self._verdict(request)

        async with trio.open_nursery() as nursery:
            for index, request in enumerate(requests):
                nursery.start_soon(validate, index, request)
        batch.set_verdicts(verdicts)

    async def _verdict(self, request: ValidationRequest) -> Verdict | BaseException:
        """Every validator's allowance, or the first refusal or failure."""
        profile = ""
        for validator in self._validators:
            verdict = await self._call(validator, request)
            if isinstance(verdict, BaseException) or not verdict.allow:
                return verdict
            if verdict.profile:
                if profile and verdict.profile != profile:
                    return Verdict(allow=False, reason="the validators chose different profiles")
                profile = verdict.profile
        return Verdict(allow=True, profile=profile)

    async def _call(self, validator: Validator,
                    request: ValidationRequest) -> Verdict | BaseException:
        async with self._limiter:
            started = time.perf_counter()
            result: Verdict | BaseException = ValidationFailed(
                f"{validator.name}: no answer within {self._timeout:g} s")
            outcome = "timeout"
            with trio.move_on_after(self._timeout):
                try:
                    result = await validator.validate(request)
                    if not isinstance(result, Verdict):
                        raise ValidationFailed(f"{validator.name} gave no verdict")
                    outcome = "allow" if result.allow else "deny"
                except Exception as e:  # noqa: BLE001 - any failure refuses this request only
                    result, outcome = e, "error"
            seconds = time.perf_counter() - started
        self._on_call(validator.name, outcome, seconds)
        if outcome in ("error", "timeout"):
            # The request's transactionID and the failure; never the challenge.
            log.warning("validation failed", extra={"fields": {
                "validator": validator.name, "transaction_id": request.transaction_id,
                "result": outcome, "error": str(result)}})
        return result
