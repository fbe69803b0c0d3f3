"""One line per event, as text or JSON, on stderr or in a file mpsd rotates itself.

launchd never rotates StandardErrorPath, so a long-running service would fill
the disk; with `[daemon] log_file` set, mpsd writes there instead, rolling the
file over at `log_max_size` and keeping `log_backups` old ones. Worker output
is relayed through the same logger, so it rotates too.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import pathlib
import sys
import time


# Fields a log call may attach with extra={...}: a worker's events carry who and what state,
# so a log pipeline can filter by worker without parsing the message.
EVENT_FIELDS = ("worker", "model", "pid", "state", "from_state", "reason")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update({key: getattr(record, key) for key in EVENT_FIELDS if hasattr(record, key)})
        return json.dumps(line)


def setup_logging(log_format: str, log_file: pathlib.Path | None = None, max_bytes: int = 0, backups: int = 0) -> None:
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.handlers.RotatingFileHandler(
            log_file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
