"""One warning when a dependency (Redis, the upstream, the store) stops answering, one line when it is back.

An outage is many failures: a line (or a traceback) per failed request or retry buries the one thing an
operator needs, which is when it started, where, why, and when it ended. Each dependency's users share one
OutageLog; `failed` on every failure, `recovered` on a success (cheap when nothing was down).
"""

from __future__ import annotations

import logging


def describe(error: BaseException) -> str:
    """The error's type and message on one line, never its traceback."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class OutageLog:
    def __init__(self, logger: logging.Logger, name: str) -> None:
        self._log = logger
        self.name = name  # "redis at 127.0.0.1:6379", "upstream http://api:9000"
        self.down = False
        self.failures = 0  # while down

    def failed(self, error: BaseException, consequence: str) -> None:
        if self.down:
            self.failures += 1
            self._log.debug("%s still fails: %s", self.name, describe(error))
            return
        self.down = True
        self.failures = 1
        self._log.warning("%s is failing (%s); %s", self.name, describe(error), consequence)

    def recovered(self) -> None:
        if self.down:
            self.down = False
            self._log.warning("%s answers again (%d failure(s) while it was down)", self.name, self.failures)
