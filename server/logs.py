"""Logging set-up: text lines, or one JSON object per line (`--log-format json`) for log collectors, and the
request id of the request each line was written in.

The id is the client's `X-Request-Id` when it sends a usable one (a proxy's or a caller's trace id), else
one made here; `RequestIdMiddleware` (server/api/middleware.py) sets it for the request's task and echoes
it in the answer, so a client can quote it and an operator find every line of that request, uvicorn's
access line included (it is written from within the request's task).
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any

REQUEST_ID_HEADER = "x-request-id"
# What a client's id may be: short, and nothing that could forge a log line or a header.
_USABLE_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

request_id: ContextVar[str | None] = ContextVar("deltaserve_request_id", default=None)


def request_id_from(header: bytes | None) -> str:
    """The client's id when usable, else a new one (32 hex digits)."""
    if header:
        text = header.decode("latin-1")
        if _USABLE_ID.fullmatch(text):
            return text
    return uuid.uuid4().hex


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, request_id, and the
    exception's traceback when there is one. uvicorn's access lines carry their fields too."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = request_id.get()
        if rid is not None:
            entry["request_id"] = rid
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, path, http_version, status = record.args
            entry.update(client=client, method=method, path=path, http_version=http_version, status=status)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: str) -> dict[str, Any] | None:
    """Set up the root logger for `serve`; returns the `log_config` to give uvicorn.

    Text keeps uvicorn's own coloured set-up (its default, returned as such); JSON gives uvicorn none
    (`None`), so that its loggers propagate to the root logger and are written as JSON too.
    """
    root = logging.getLogger()
    if not root.handlers:  # as logging.basicConfig: a host that set up logging (pytest, an embedder) keeps it
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
        root.addHandler(handler)
    root.setLevel(level.upper())
    if log_format == "json":
        # Progress bars are not log lines: a collector reading JSON would choke on them.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            logging.getLogger(name).handlers[:] = []
            logging.getLogger(name).propagate = True
        return None
    from uvicorn.config import LOGGING_CONFIG

    return LOGGING_CONFIG
