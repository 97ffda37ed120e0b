"""Log output of every command: readable lines, or one JSON object a line for log
pipelines (Loki, Elasticsearch, Cloud Logging), chosen by ``CRMSCORE_LOG_FORMAT``.

>>> record = logging.LogRecord("flows.main", logging.INFO, "", 0, "started %s", ("x",), None)
>>> record.created = 1_800_000_000.5
>>> print(JsonFormatter().format(record))
{"time":"2027-01-15T08:00:00.500Z","level":"INFO","logger":"flows.main","message":"started x"}
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import orjson

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC), level, logger, message, and the
    exception's traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry).decode()


def configure(log_format: str, verbose: bool = False) -> None:
    """Log to standard error at INFO (DEBUG when ``verbose``) in ``log_format``;
    ValueError when it is neither 'text' nor 'json'."""
    chosen = log_format.strip().lower()
    if chosen not in FORMATS:
        raise ValueError(f"CRMSCORE_LOG_FORMAT: expected 'text' or 'json', got {log_format!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if chosen == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler],
                        force=True)
