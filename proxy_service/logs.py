"""Structured JSON logs: one object a line, level from config.

Log records carry their context in `extra=` fields (image_id, status, tier ...); this formatter
writes them out. Nothing here adds URLs or settings: callers never pass presigned URLs, and the
config is logged only through `Config.redacted()`.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

# Record attributes that are not context (uvicorn's color_message duplicates msg with escapes).
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            out["error"] = record.exc_info[0].__name__
        return orjson.dumps(out, default=str).decode()


def setup(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # uvicorn's access log is replaced by ours (one JSON line a request, from the handler).
    logging.getLogger("uvicorn.access").disabled = True
    logging.Formatter.converter = time.gmtime
