"""Structured logs: one JSON object a line on stderr, in the spirit of logrus's JSON formatter.

Add fields with ``log.info("msg", extra={"fields": {"container_id": cid}})`` or bind them once
with ``with_fields(log, container_id=cid)``.
"""

from __future__ import annotations

import json
import logging
import sys
import time

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

_LEVELS = {
    "trace": TRACE, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
    "warning": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL,
}
_NAMES = {TRACE: "trace", logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
          logging.ERROR: "error", logging.CRITICAL: "fatal"}


class JSONFormatter(logging.Formatter):
    def __init__(self, names: dict[int, str] | None = None) -> None:
        super().__init__()
        self.names = names or _NAMES  # level number -> the name written

    def format(self, record: logging.LogRecord) -> str:
        t = record.created
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z",
            "level": self.names.get(record.levelno, record.levelname.lower()),
            "msg": record.getMessage(),
            "source": "agent",
            "name": record.name,
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update({k: v for k, v in fields.items() if k not in ("time", "level", "msg")})
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class FieldsAdapter(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        extra = kwargs.setdefault("extra", {})
        extra["fields"] = {**self.extra, **extra.get("fields", {})}
        return msg, kwargs


def with_fields(logger: logging.Logger, **fields) -> FieldsAdapter:
    return FieldsAdapter(logger, fields)


def setup(level: str = "info", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Other libraries (grpc, asyncio) speak at warning and above; the agent at the chosen level.
    root.setLevel(max(_LEVELS[level], logging.WARNING))
    logging.getLogger("agent").setLevel(_LEVELS[level])


def report_settings(cfg) -> None:
    """Log what agent.config noted about the kernel command line (bad values, ignored keys)."""
    logger = logging.getLogger("agent.config")
    for level, message in cfg.notes:
        logger.log(_LEVELS[level], message)
