"""LeakSanitizer's check for the sanitizer run (a pytest plugin that sanitize.sh loads).

LSan normally checks once, from an atexit handler, when the process ends. For an
interpreter that is the wrong moment: CPython has torn itself down by then and
deliberately leaves some of its objects behind, and a process that ends through
``os._exit`` or a signal never runs atexit handlers, so nothing is checked at all
and the run still passes. sanitize.sh therefore turns the exit check off
(``leak_check_at_exit=0``) and this plugin asks for the check itself, once, when
the test session finishes: the interpreter is still whole, every object it holds
is reachable, and a block that nothing points to is memory that was lost, such as
an error path of the core that forgets to free. LSan prints its report on
standard error (with the suppressions it used, tests/native/lsan.supp) and the
session fails.

The outcome is also written to the file named by SCEP_FAST_LEAK_CHECK_RESULT,
so that the script can tell a clean check from a check that never ran.
"""

from __future__ import annotations

import ctypes
import gc
import os
from pathlib import Path

import pytest

RESULT_FILE = "SCEP_FAST_LEAK_CHECK_RESULT"


def _leak_check() -> int:
    """LSan's recoverable check of the whole process: 1 if it found leaks, else 0."""
    # The sanitizer runtime is preloaded, so its interface is in the global namespace.
    check = ctypes.CDLL(None).__lsan_do_recoverable_leak_check
    check.restype = ctypes.c_int
    check.argtypes = []
    return int(check())


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Objects in unreachable cycles still own their native pointers: collect
    # them first, so that what remains unreferenced really was lost.
    gc.collect()
    leaked = _leak_check()
    outcome = "leaks" if leaked else "clean"
    result = os.environ.get(RESULT_FILE)
    if result:
        Path(result).write_text(outcome + "\n")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if leaked:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if reporter is not None:
            reporter.write_line("LeakSanitizer: memory leaks found (report above)", red=True)
    elif reporter is not None:
        reporter.write_line("LeakSanitizer: no leaks")
