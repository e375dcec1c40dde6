"""Typed dependencies of the routes: `ServerDep`, `SettingsDep`, `AdminDep`, `ReaderDep`.

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


def _bearer_is(request: Request, tokens: list[str]) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    given_bytes = given.strip().encode()
    # Every token compared, in constant time each: which one matched must not show in the timing.
    matched = [hmac.compare_digest(given_bytes, token.encode()) for token in tokens]
    return scheme.lower() == "bearer" and any(matched)


def require_admin(request: Request, settings: SettingsDep) -> None:
    """401 unless the request carries the admin token (no token configured: everyone is admin).

    Settings never hold an empty token (an empty one once meant "no authentication" by accident).
    """
    token = settings.admin_token
    if token is None:
        return
    if not _bearer_is(request, [token]):
        raise HTTPException(401, "this route needs 'Authorization: Bearer <admin token>'",
                            headers={"WWW-Authenticate": "Bearer"})


def require_reader(request: Request, settings: SettingsDep) -> None:
    """With `--api-key`, predict and the read routes need it (or the admin token); without, they are open."""
    if settings.api_key is None:
        return
    tokens = [settings.api_key] + ([settings.admin_token] if settings.admin_token else [])
    if not _bearer_is(request, tokens):
        raise HTTPException(401, "this route needs 'Authorization: Bearer <API key>'",
                            headers={"WWW-Authenticate": "Bearer"})


AdminDep = Depends(require_admin)  # for `dependencies=[AdminDep]`: the route needs no value from it
ReaderDep = Depends(require_reader)

# The pattern is documented in the schema; `check_name` enforces it with its own readable 422.
TaskName = Annotated[str, PathParam(description=f"task name, {NAME_PATTERN.pattern}",
                                    json_schema_extra={"pattern": NAME_PATTERN.pattern, "minLength": 1})]
