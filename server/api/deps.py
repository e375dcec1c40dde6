"""Typed dependencies of the routes: `ServerDep`, `SettingsDep`, `TaskName` (who calls: `server.api.auth`).

The settings live on `app.state.settings` from `create_app` on, the built service on `app.state.server`
from startup on; routes ask for them by type instead of closing over the settings, so a router
module can be written, read and tested apart from the app that mounts it.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi import Path as PathParam

from adapters_store.store import NAME_PATTERN
from server.service import Loading, Server
from server.settings import Settings


def get_server(request: Request) -> Server:
    """The built service; `Loading` (503, Retry-After) while `serve` still loads it in the background."""
    server = getattr(request.app.state, "server", None)
    if server is None:
        raise Loading()
    return server


def get_server_if_built(request: Request) -> Server | None:
    """The built service, or None while it loads (the health probes answer that themselves)."""
    return getattr(request.app.state, "server", None)


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


ServerDep = Annotated[Server, Depends(get_server)]
ServerIfBuiltDep = Annotated[Server | None, Depends(get_server_if_built)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


# The pattern is documented in the schema; `check_name` enforces it with its own readable 422.
TaskName = Annotated[str, PathParam(description=f"task name, {NAME_PATTERN.pattern}",
                                    json_schema_extra={"pattern": NAME_PATTERN.pattern, "minLength": 1})]
