"""pytest plugin for scripts/mutation's runs: in a forked mutant's pytest, bound each test and leave at the verdict.

- Each test gets 20 s plus 5 times its call's time in mutmut's stats run, for setup, call and teardown. A mutant
  that hangs the event loop (a settled read never cleared, so `get` spins) is stopped at its first test
  rather than at mutmut's bound for the whole selection (5 x the sum of every test's time), and it is stopped
  by an exception inside the test, so fixtures are torn down and no redis-server is left behind. Such a
  mutant ends with mutmut's "timeout" exit code (36): counted as killed, and shown as a timeout.
- pytest would go on to unconfigure, where its unraisable-exception plugin collects garbage several times
  over a heap inherited from mutmut's process: a third of a short mutant's CPU time. The verdict is known by
  then and every fixture is torn down, so the child leaves with that verdict instead.

The stats, clean and forced-fail runs (in mutmut's own process) are left alone.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Generator
from types import FrameType

import pytest

TIMEOUT_EXIT_CODE = 36  # mutmut's "timeout"
BASE_SECONDS = 20.0
FACTOR = 5.0


class TestOverran(BaseException):
    """Raised in a test that ran past its bound: a BaseException, so asyncio lets it through to the test."""


_overran: list[str] = []


def _in_mutant() -> bool:
    return "__mutmut_" in os.environ.get("MUTANT_UNDER_TEST", "")


def _measured(nodeid: str) -> float:
    from mutmut.state import state  # imported late: the plugin loads before mutmut has set anything

    return float(state().duration_by_test.get(nodeid, 0.0))


def _overrun(signum: int, frame: FrameType | None) -> None:
    if _overran:  # the teardown after an overrun hangs too: leave now
        os._exit(TIMEOUT_EXIT_CODE)
    _overran.append("overran")
    signal.setitimer(signal.ITIMER_REAL, BASE_SECONDS)
    raise TestOverran("the test ran past its bound under this mutant")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    if not _in_mutant():
        return (yield)
    signal.signal(signal.SIGALRM, _overrun)
    signal.setitimer(signal.ITIMER_REAL, BASE_SECONDS + FACTOR * _measured(item.nodeid))
    try:
        return (yield)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _in_mutant():
        os._exit(TIMEOUT_EXIT_CODE if _overran else int(exitstatus))
