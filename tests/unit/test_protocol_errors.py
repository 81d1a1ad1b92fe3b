"""The error hierarchy of DESIGN.md: statuses, failInfo values, safe reasons."""

from __future__ import annotations

import pickle

import pytest

from scep_fast.protocol import (
    BadAlg,
    BadCertId,
    BadMessageCheck,
    BadRequest,
    BadTime,
    BodyTooLarge,
    FailInfo,
    InternalError,
    MalformedRequest,
    MessageError,
    MethodNotAllowed,
    Overloaded,
    RequestError,
    ScepError,
    StorageFull,
    StorageUnavailable,
    UnknownOperation,
)


@pytest.mark.parametrize(
    ("cls", "parent", "status"),
    [
        (MalformedRequest, RequestError, 400),
        (UnknownOperation, MalformedRequest, 400),
        (MethodNotAllowed, RequestError, 405),
        (BodyTooLarge, RequestError, 413),
        (Overloaded, RequestError, 503),
        (InternalError, ScepError, 500),
    ],
)
def test_plain_http_errors(cls: type[ScepError], parent: type[ScepError], status: int) -> None:
    assert issubclass(cls, parent)
    assert issubclass(cls, ScepError)
    assert not issubclass(cls, MessageError)
    assert cls.http_status == status
    assert cls.fail_info is None


@pytest.mark.parametrize(
    ("cls", "fail_info", "number"),
    [
        (BadAlg, FailInfo.BAD_ALG, 0),
        (BadMessageCheck, FailInfo.BAD_MESSAGE_CHECK, 1),
        (BadRequest, FailInfo.BAD_REQUEST, 2),
        (BadTime, FailInfo.BAD_TIME, 3),
        (BadCertId, FailInfo.BAD_CERT_ID, 4),
    ],
)
def test_message_errors_carry_rfc_fail_info(
    cls: type[MessageError], fail_info: FailInfo, number: int
) -> None:
    assert issubclass(cls, MessageError)
    assert not issubclass(cls, RequestError)
    assert cls.fail_info is fail_info
    assert int(cls.fail_info) == number
    # A refused but authenticated request gets a signed CertRep, never 4xx/5xx.
    assert cls.http_status is None
    error = cls()
    assert error.fail_info is fail_info
    assert str(error)


def test_reason_is_the_string_and_defaults_per_class() -> None:
    assert str(MalformedRequest("bad base64")) == "bad base64"
    assert MalformedRequest("bad base64").reason == "bad base64"
    assert str(BodyTooLarge()) == "message too large"
    assert str(BadAlg()) != str(BadTime())


def test_reason_is_made_safe_for_clients() -> None:
    error = MalformedRequest("line1\r\nSet-Cookie: x\x00\u00e9" + "y" * 1000)
    reason = str(error)
    assert "\r" not in reason
    assert "\n" not in reason
    assert "\x00" not in reason
    assert reason.isascii()
    assert reason.isprintable()
    assert len(reason) <= 200
    assert reason.startswith("line1??Set-Cookie: x??y")
    assert reason.endswith("...")


def test_internal_error_never_shows_its_detail() -> None:
    error = InternalError("ledger commit failed: secret detail")
    assert str(error) == "internal error"
    assert "secret" not in str(error)
    assert error.detail == "ledger commit failed: secret detail"


def test_overloaded_carries_retry_after() -> None:
    error = Overloaded(5)
    assert error.retry_after_seconds == 5
    assert error.http_status == 503
    for bad in (-1, 1.5, True, "5"):
        with pytest.raises(ValueError, match="retry_after_seconds"):
            Overloaded(bad)  # type: ignore[arg-type]


def test_storage_full_is_a_503_with_retry_after_that_keeps_its_detail_to_itself() -> None:
    error = StorageFull(detail="ledger /x is full (map size 16777216 bytes)")
    assert isinstance(error, Overloaded)
    assert error.http_status == 503
    assert error.retry_after_seconds == StorageFull.DEFAULT_RETRY_AFTER_SECONDS
    assert "map size" not in str(error)


def test_storage_unavailable_is_a_503_with_a_shorter_retry_after() -> None:
    error = StorageUnavailable(detail="ledger postgresql://db/scep is unavailable")
    assert isinstance(error, Overloaded)
    assert error.http_status == 503
    assert 0 < error.retry_after_seconds < StorageFull.DEFAULT_RETRY_AFTER_SECONDS
    assert "postgresql" not in str(error)


def test_method_not_allowed_names_allowed_methods() -> None:
    assert MethodNotAllowed().allowed == ("GET", "POST")
    assert MethodNotAllowed(allowed=("GET",)).allowed == ("GET",)


@pytest.mark.parametrize(
    "error",
    [
        MalformedRequest("x"),
        UnknownOperation("y"),
        BodyTooLarge(),
        Overloaded(7, "busy"),
        StorageFull(30, detail="disk full"),
        StorageUnavailable(5, detail="database restarting"),
        MethodNotAllowed("no", allowed=("GET", "POST", "HEAD")),
        BadTime("clock"),
        InternalError("detail"),
    ],
)
def test_errors_survive_pickling(error: ScepError) -> None:
    # Errors may cross a worker-thread or process boundary intact.
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert vars(copy) == vars(error)
