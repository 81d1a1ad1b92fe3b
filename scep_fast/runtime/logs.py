"""Logging, configured in one place: one JSON object per line on stderr.

A request's log line carries its fields under ``extra={"fields": {...}}``;
the formatter puts them beside the time, level and message. Nothing that
reaches a log line is a secret: the challenge and keys never travel in
``fields``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"), default=str)


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


@dataclass
class CountedLine:
    """A log line for something that may come in a flood (refusals): at most one line a
    second, carrying how many happened since the last line and over how long."""

    logger: logging.Logger
    message: str
    fields: dict[str, object] = field(default_factory=dict)
    _count: int = 0
    _since: float = 0.0

    def note(self, **extra: object) -> None:
        """One more; ``extra`` goes on the line if this one writes it."""
        self.note_many(1, **extra)

    def note_many(self, count: int, **extra: object) -> None:
        """``count`` more, as ``note``."""
        self._count += count
        now = time.monotonic()
        if now - self._since >= 1.0:
            self.logger.info(self.message, extra={"fields": {
                **self.fields, **extra, "count": self._count,
                "seconds": round(now - self._since, 3) if self._since else 0}})
            self._count, self._since = 0, now
