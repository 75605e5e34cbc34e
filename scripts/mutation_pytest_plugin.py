"""pytest plugin for scripts/mutation's runs: a forked mutant's pytest ends as soon as its session has.

mutmut forks one child per mutant, and pytest in that child would go on to unconfigure: its
unraisable-exception plugin collects garbage several times over a heap inherited from the parent, a third of a
short mutant's CPU time. The verdict is known by then and every fixture (redis-server included) is torn down,
so the child leaves with that verdict instead. The stats, clean and forced-fail runs (in mutmut's own process)
are left alone.
"""

from __future__ import annotations

import os

import pytest


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if "__mutmut_" in os.environ.get("MUTANT_UNDER_TEST", ""):
        os._exit(int(exitstatus))
