"""Structured logs: ``edgeinspect --log-format json`` writes one JSON object per log record (for journald,
Loki, Elastic and other collectors on a line box)."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """``{"ts": ISO 8601 UTC, "level", "logger", "message"}`` (and ``"exc"`` with a traceback) per record."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(level: int, fmt: str = "text") -> None:
    """Log to stderr at ``level`` as text lines or JSON objects (``fmt``: text | json)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
    # FAISS's loader reports at INFO which SIMD build it loaded, with an ImportError text on CPUs its wheel has
    # no separate build for (an AVX2 CPU: "Could not load library with AVX2 support ... ModuleNotFoundError")
    logging.getLogger("faiss.loader").setLevel(level if level <= logging.DEBUG else logging.WARNING)
