"""Tenants: who may use which tasks, within which limits, with which share of the engine (`--tenants-file`).

The file is TOML, one table per tenant:

    [tenants.acme]
    keys = ["sha256:<hex sha256 of the key>"]   # the plain key never sits on disk
    max_tasks = 20                              # optional
    max_delta_bytes = 50000000                  # optional
    weight = 1.0                                # optional: its share of the engine under contention

A request's `Authorization: Bearer <key>` is hashed and looked up; a key id (the first 8 hex
digits of its sha256) names it in the audit log, never the key. Every problem is reported with
the line it is on, so an operator can fix the file at once: at start the server refuses to run
(exit 2); on a reload (SIGHUP, or the file changed) the tenants in force stay and the error is
logged. Nothing here knows HTTP: `server.api.auth` turns a bearer credential into a `Caller`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from adapters_store.store import Quota

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

log = logging.getLogger("deltaserve")

TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
KEY_HASH = re.compile(r"^sha256:([0-9a-f]{64})$")
FIELDS = ("keys", "max_tasks", "max_delta_bytes", "weight")

Role = Literal["admin", "reader", "tenant", "anonymous"]


def key_hash(key: str) -> str:
    """The hex sha256 of a key, as the tenants file holds it (without its `sha256:` prefix)."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Caller:
    """Who makes a request: the operator (`admin`), the `--api-key` holder (`reader`), a tenant, or anyone
    (`anonymous`, where the server asks no credential). `key_id` names the key in the audit log."""

    role: Role
    tenant: str | None = None
    key_id: str | None = None

    @property
    def owner(self) -> str | None:
        """The owner the store checks writes and reads against: None sees and writes everything."""
        return self.tenant if self.role == "tenant" else None


OPERATOR = Caller("admin")


@dataclass(frozen=True)
class Tenant:
    name: str
    key_hashes: frozenset[str]
    max_tasks: int | None = None
    max_delta_bytes: int | None = None
    weight: float = 1.0

    @property
    def quota(self) -> Quota:
        return Quota(self.max_tasks, self.max_delta_bytes)


@dataclass(frozen=True)
class Tenants:
    """One reading of the tenants file: the tenants by name and by key hash."""

    by_name: dict[str, Tenant] = field(default_factory=dict)
    by_hash: dict[str, Tenant] = field(default_factory=dict)

    def find(self, key: str) -> Tenant | None:
        return self.by_hash.get(key_hash(key))

    def weight(self, name: str | None) -> float:
        tenant = self.by_name.get(name) if name is not None else None
        return tenant.weight if tenant is not None else 1.0


class TenantsFileError(ValueError):
    """The tenants file cannot be used; the message names the file and the line."""


def parse_tenants(text: str, where: str) -> Tenants:
    """The tenants of `text` (the file's content; `where` names it in errors), or TenantsFileError."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:  # its message names the line and column
        raise TenantsFileError(f"{where}: not valid TOML: {err}") from None
    lines = _Lines(text, where)
    for key in raw:
        if key != "tenants":
            raise lines.error(f"unknown table or field {key!r}: the file holds [tenants.<name>] tables only",
                              None, key)
    tables = raw.get("tenants", {})
    if not isinstance(tables, dict):
        raise lines.error("'tenants' must be a table of [tenants.<name>] tables", None, "tenants")
    by_name: dict[str, Tenant] = {}
    by_hash: dict[str, Tenant] = {}
    for name, entry in tables.items():
        if not TENANT_NAME.fullmatch(name):
            raise lines.error(f"tenant name {name!r} must match {TENANT_NAME.pattern}", name)
        if not isinstance(entry, dict):
            raise lines.error(f"tenant {name!r} must be a table ([tenants.{name}])", name)
        tenant = _tenant(name, entry, lines)
        for digest in tenant.key_hashes:
            if digest in by_hash:
                raise lines.error(f"tenant {name!r} has a key that tenant {by_hash[digest].name!r} has too; "
                                  "each key belongs to one tenant", name, "keys", digest)
            by_hash[digest] = tenant
        by_name[name] = tenant
    return Tenants(by_name, by_hash)


def _tenant(name: str, entry: dict[str, Any], lines: _Lines) -> Tenant:
    for key in entry:
        if key not in FIELDS:
            raise lines.error(f"tenant {name!r}: unknown field {key!r} (known: {', '.join(FIELDS)})", name, key)
    keys = entry.get("keys")
    if not isinstance(keys, list) or not keys:
        raise lines.error(f"tenant {name!r}: 'keys' must be a non-empty list of \"sha256:<64 hex digits>\"",
                          name, "keys")
    hashes = set()
    for number, key in enumerate(keys, 1):
        match = KEY_HASH.fullmatch(key) if isinstance(key, str) else None
        if match is None:  # the value is not repeated: it may be a plain key put there by mistake
            raise lines.error(f"tenant {name!r}: key {number} is not \"sha256:<64 lowercase hex digits>\" (the "
                              "hash of the key, never the key itself)", name, "keys", str(key))
        hashes.add(match.group(1))
    limits: dict[str, int | None] = {}
    for quota in ("max_tasks", "max_delta_bytes"):
        value = entry.get(quota)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise lines.error(f"tenant {name!r}: {quota} must be a whole number >= 0, not {value!r}", name, quota)
        limits[quota] = value
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
        raise lines.error(f"tenant {name!r}: weight must be a number > 0, not {weight!r}", name, "weight")
    return Tenant(name, frozenset(hashes), limits["max_tasks"], limits["max_delta_bytes"], float(weight))


class _Lines:
    """Finds the line a problem is on (tomllib gives values, not positions): the tenant's table, then the field."""

    def __init__(self, text: str, where: str) -> None:
        self.lines = text.splitlines()
        self.where = where

    def error(self, message: str, tenant: str | None, field: str | None = None, value: str | None = None
              ) -> TenantsFileError:
        return TenantsFileError(f"{self.where}:{self.find(tenant, field, value)}: {message}")

    def find(self, tenant: str | None, field: str | None, value: str | None) -> int:
        start, end = self._section(tenant)
        patterns = []
        if value is not None:
            patterns.append(re.escape(value))
        if field is not None:  # `field =`, also inside an inline table, or a table `[field...]`
            patterns.append(rf"(^|[{{,\s])\"?{re.escape(field)}\"?\s*=|^\s*\[\s*{re.escape(field)}\b")
        for pattern in patterns:
            for i in range(start, end):
                if re.search(pattern, self.lines[i]):
                    return i + 1
        return start + 1

    def _section(self, tenant: str | None) -> tuple[int, int]:
        """The lines [start, end) of the tenant's table (`[tenants.<name>]` or an inline `<name> = {...}`)."""
        if tenant is None:
            return 0, len(self.lines)
        name = re.escape(tenant)
        header = re.compile(rf"^\s*\[\s*tenants\s*\.\s*(\"?){name}\1\s*\]")
        for i, line in enumerate(self.lines):
            if header.match(line):
                after = [j for j in range(i + 1, len(self.lines)) if self.lines[j].lstrip().startswith("[")]
                return i, after[0] if after else len(self.lines)
        inline = re.compile(rf"^\s*(tenants\s*\.\s*)?\"?{name}\"?\s*=")
        for i, line in enumerate(self.lines):
            if inline.match(line):
                return i, i + 1
        return 0, len(self.lines)


def load_tenants(path: Path) -> Tenants:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise TenantsFileError(f"cannot read the tenants file {str(path)!r}: {err}") from None
    return parse_tenants(text, str(path))


class TenantsFile:
    """The tenants in force, from a file re-read on `reload()` (SIGHUP) and when it changes (a poll of its
    modification time, size and inode). A reload that fails keeps the tenants in force and logs why."""

    def __init__(self, path: Path, poll_s: float = 1.0,
                 on_reload: Callable[[Tenants], None] | None = None) -> None:
        self.path = Path(path)
        self.poll_s = poll_s
        self.on_reload = on_reload
        self._stamp = self._stat()
        self.current = load_tenants(self.path)  # at start an invalid file raises: the server does not start
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def weight(self, tenant: str | None) -> float:
        """`tenant`'s weight as the file in force says (1 for the operator and for a tenant since removed)."""
        return self.current.weight(tenant)

    def reload(self) -> bool:
        """Read the file again; True when the new tenants are in force."""
        with self._lock:
            self._stamp = self._stat()
            try:
                tenants = load_tenants(self.path)
            except TenantsFileError as err:
                log.error("tenants file not reloaded, the previous tenants stay in force: %s", err)
                return False
            self.current = tenants
        log.info("tenants file %s reloaded: %d tenants", self.path, len(tenants.by_name))
        if self.on_reload is not None:
            self.on_reload(tenants)
        return True

    def start_watching(self) -> None:
        if self._watcher is None and self.poll_s > 0:
            self._watcher = threading.Thread(target=self._watch, name="deltaserve-tenants-watch", daemon=True)
            self._watcher.start()

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self._stat() != self._stamp:
                self.reload()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino
