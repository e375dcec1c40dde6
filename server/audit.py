"""The audit log (`--audit-log PATH`, or `-` for stdout): one JSON line per write, delete, refused credential
and quota refusal, so that an operator can answer "who changed or tried what, when".

Each line: `time` (UTC, ISO 8601), `tenant` (null for the operator or an unknown caller), `key_id` (the
first 8 hex digits of the key's sha256, never the key: enough to tell keys apart, useless to a reader
of the log), `route` (method and route template), `task`, `version`, `outcome` (`created`, `replaced`,
`deleted`, or the refusal's status and sentence). Lines are written whole under a lock and flushed,
so a crash loses at most the line being written.
"""

from __future__ import annotations

import json
import sys
import threading
from datetime import datetime, timezone
from typing import IO, Any

from server.tenants import Caller


class AuditLog:
    def __init__(self, target: str | None) -> None:
        """`target` a file path (appended to), `-` for stdout, None for no log."""
        self._lock = threading.Lock()
        self._owned = target not in (None, "-")
        self._out: IO[str] | None = (sys.stdout if target == "-" else
                                     open(target, "a", encoding="utf-8") if target is not None else None)  # noqa: SIM115

    @property
    def enabled(self) -> bool:
        return self._out is not None

    def record(self, caller: Caller | None, route: str, outcome: str, task: str | None = None,
               version: int | None = None) -> None:
        if self._out is None:
            return
        entry: dict[str, Any] = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "tenant": caller.tenant if caller is not None else None,
            "key_id": caller.key_id if caller is not None else None,
            "route": route, "task": task, "version": version, "outcome": outcome,
        }
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self._lock:
            self._out.write(line)
            self._out.flush()

    def close(self) -> None:
        with self._lock:
            if self._owned and self._out is not None:
                self._out.close()
            self._out = None
