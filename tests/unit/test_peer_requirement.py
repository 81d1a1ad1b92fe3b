"""SCEP_FAST_REQUIRE_PEERS: a missing peer skips a test on a developer's machine, fails it in CI.

The helper is called directly; the marker and the net for other skips are
checked on small test files run by an inner pytest (pytester), with this
suite's own tests/conftest.py as their conftest.
"""

from __future__ import annotations

import pytest

from tests.conftest import REQUIRE_PEERS, missing_peer

pytest_plugins = ["pytester"]

REASON = "examplepeer is not installed (Debian package `example`)"

# What the inner runs see: the real hooks, imported as their conftest.
_CONFTEST = "from tests.conftest import *  # noqa: F403\n"

_PEER_TESTS = f"""
import pytest

from tests.conftest import missing_peer, needs_peer


@needs_peer(False, {REASON!r})
def test_marked() -> None:
    pass


@needs_peer(True, "never shown")
def test_marked_and_available() -> None:
    pass


def test_missing_peer_called() -> None:
    missing_peer({REASON!r})
"""

_OTHER_SKIPS = """
import pytest


@pytest.mark.skipif(True, reason="a plain skipif")
def test_plain_skipif() -> None:
    pass


def test_plain_skip() -> None:
    pytest.skip("a plain skip")


@pytest.mark.xfail(strict=True, reason="known")
def test_expected_failure() -> None:
    raise AssertionError
"""


def test_missing_peer_skips_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REQUIRE_PEERS, raising=False)
    with pytest.raises(pytest.skip.Exception, match="examplepeer is not installed"):
        missing_peer(REASON)


@pytest.mark.parametrize("value", ["", "0"])
def test_an_empty_or_zero_variable_requires_nothing(monkeypatch: pytest.MonkeyPatch,
                                                    value: str) -> None:
    monkeypatch.setenv(REQUIRE_PEERS, value)
    with pytest.raises(pytest.skip.Exception):
        missing_peer(REASON)


def test_missing_peer_fails_with_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REQUIRE_PEERS, "1")
    with pytest.raises(pytest.fail.Exception) as failed:
        missing_peer(REASON)
    message = str(failed.value)
    assert REASON in message and f"{REQUIRE_PEERS}=1" in message and "make test-deps" in message


def _run(pytester: pytest.Pytester, directory: str, source: str) -> pytest.RunResult:
    pytester.makeconftest(_CONFTEST)
    pytester.mkpydir(directory)
    (pytester.path / directory / "test_inner.py").write_text(source)
    return pytester.runpytest_inprocess("-p", "no:cacheprovider", "-rA", directory)


def test_marked_tests_skip_without_the_variable(pytester: pytest.Pytester,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REQUIRE_PEERS, raising=False)
    result = _run(pytester, "interop", _PEER_TESTS)
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines([f"*{REASON}*"])


def test_marked_tests_fail_with_the_variable(pytester: pytest.Pytester,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REQUIRE_PEERS, "1")
    # Any directory: the marker and the helper do not depend on where the test lives.
    result = _run(pytester, "unit", _PEER_TESTS)
    result.assert_outcomes(passed=1, errors=1, failed=1)
    result.stdout.fnmatch_lines([f"*{REASON}; {REQUIRE_PEERS}=1 requires every peer*"])


def test_other_skips_in_peer_directories_fail_with_the_variable(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REQUIRE_PEERS, "1")
    result = _run(pytester, "integration", _OTHER_SKIPS)
    # The skipif fails at setup (an error), the skip in the test body a failure;
    # an expected failure stays what it is.
    result.assert_outcomes(errors=1, failed=1, xfailed=1)
    result.stdout.fnmatch_lines([f"*a plain skipif; {REQUIRE_PEERS}=1 forbids skipping*",
                                 f"*a plain skip; {REQUIRE_PEERS}=1 forbids skipping*"])


def test_other_skips_elsewhere_still_skip(pytester: pytest.Pytester,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REQUIRE_PEERS, "1")
    result = _run(pytester, "native", _OTHER_SKIPS)
    result.assert_outcomes(skipped=2, xfailed=1)


def test_other_skips_in_peer_directories_skip_without_the_variable(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REQUIRE_PEERS, raising=False)
    result = _run(pytester, "integration", _OTHER_SKIPS)
    result.assert_outcomes(skipped=2, xfailed=1)
