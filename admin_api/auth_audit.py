"""Which failed admin authentications reach the audit log: enough to see an attack, never a flood's worth.

Each wrong admin key gets an `admin_auth.failure` row, and an address that the failure limit stops gets one
`admin_auth.throttled` row per window; after that it is answered 429 without a row. All addresses together get
at most `rows_per_window` such rows per window: then one `admin_auth.failures_suppressed` row says that more
failures came than were written, and the number left out is logged when the window ends. So however many
requests a flood sends, from however many addresses, the audit log grows by at most `rows_per_window + 1` rows
per window.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from gateway.tokens import AuditEvent

log = logging.getLogger(__name__)

ROWS_PER_WINDOW = 100


class FailedAuthAudit:
    def __init__(
        self, *, window: float, rows_per_window: int = ROWS_PER_WINDOW, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._window = window
        self._rows_per_window = rows_per_window
        self._clock = clock
        self._started = -float("inf")
        self._rows = 0
        self._suppressed = 0
        self._throttled: set[str] = set()

    def events(self, code: str, source: str, details: dict[str, Any]) -> list[AuditEvent]:
        """The rows to append for one refused request (`invalid_admin_key` or `too_many_failures`), or none."""
        now = self._clock()
        if now - self._started >= self._window:
            if self._suppressed:
                log.warning(
                    "admin API: %d failed authentications in %.0f s were left out of the audit log",
                    self._suppressed,
                    self._window,
                )
            self._started, self._rows, self._suppressed = now, 0, 0
            self._throttled.clear()
        if code == "too_many_failures":
            if source in self._throttled:
                return []
            action = "admin_auth.throttled"
        else:
            action = "admin_auth.failure"
        if self._rows >= self._rows_per_window:
            self._suppressed += 1
            if self._suppressed > 1:
                return []
            log.warning("admin API: more failed authentications than the audit log records; counting the rest")
            return [
                AuditEvent(
                    action="admin_auth.failures_suppressed",
                    actor="anonymous",
                    token_id=None,
                    details={"rows_per_window": self._rows_per_window, "window_seconds": self._window},
                )
            ]
        self._rows += 1
        if action == "admin_auth.throttled":
            self._throttled.add(source)
        what = "throttled wrong admin keys" if action == "admin_auth.throttled" else "rejected an invalid admin key"
        log.warning("admin API: %s from %s", what, details.get("source_ip"))
        return [AuditEvent(action=action, actor="anonymous", token_id=None, details=details)]
