"""How the processes' own logs look on stderr: text for people, or one JSON object per line for collectors.

Both planes (the proxy and the admin API) log through `logging`; `configure_logging` is called once per
process by the command line. The access log is not `logging` (see access_log.py) but follows the same format.
"""

from __future__ import annotations

import json
import logging
import sys
import time

TEXT_FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """`{"time": ..., "level": ..., "pid": ..., "logger": ..., "message": ...}`, plus `exception` (the
    traceback as one string) when a record has one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.created % 1 * 1000):03d}Z",
            "level": record.levelname,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
