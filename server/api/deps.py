"""Typed dependencies of the routes: `ServerDep`, `SettingsDep`, `AdminDep`.

The settings live on `app.state.settings` from `create_app` on, the built service on `app.state.server`
from startup on; routes ask for them by type instead of closing over the settings, so a router
module can be written, read and tested apart from the app that mounts it.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi import Path as PathParam
from starlette.exceptions import HTTPException

from adapters_store.storage import NAME_PATTERN
from server.service import Server
from server.settings import Settings


def get_server(request: Request) -> Server:
    return request.app.state.server


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


ServerDep = Annotated[Server, Depends(get_server)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def require_admin(request: Request, settings: SettingsDep) -> None:
    """401 unless the request carries the admin token (no token configured: everyone is admin)."""
    token = settings.admin_token
    if not token:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(401, "this route needs 'Authorization: Bearer <admin token>'",
                            headers={"WWW-Authenticate": "Bearer"})


AdminDep = Depends(require_admin)  # for `dependencies=[AdminDep]`: the route needs no value from it

TaskName = Annotated[str, PathParam(description=f"task name, {NAME_PATTERN.pattern}")]
