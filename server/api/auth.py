"""Who is calling: the bearer credential of every protected route, resolved once per request to a `Caller`.

`create_app` puts `Authenticated` on every router but the open ones (health, the probes, the
dashboard's files), so a route added to a protected router is guarded without asking for it;
tests/test_auth.py walks `app.routes` to keep it so. FastAPI's `HTTPBearer` reads the header and
puts the bearer scheme in the OpenAPI schema.

Credentials: the admin token (`--admin-token`, the operator's: everything), the API key
(`--api-key`: read and predict everything). Without an API key, reading and predicting stay open;
without an admin token, so do uploads and deletes. Every refusal says the same sentence for a
missing, malformed or unknown credential: nothing tells a client what exists.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from server.settings import Settings

Role = Literal["admin", "reader", "anonymous"]

bearer = HTTPBearer(auto_error=False, description="the admin token or the API key")


@dataclass(frozen=True)
class Caller:
    """The authenticated caller of one request."""

    role: Role


def _matches(given: str, token: str | None) -> bool:
    # Constant time: how much of a token matched must not show in the timing.
    return token is not None and hmac.compare_digest(given.encode(), token.encode())


def unauthorized(what: str) -> HTTPException:
    return HTTPException(401, f"this route needs 'Authorization: Bearer <{what}>'",
                         headers={"WWW-Authenticate": "Bearer"})


def authenticate(request: Request,
                 credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]) -> Caller:
    """The caller, or 401 where this server asks a credential of every protected route."""
    settings: Settings = request.app.state.settings
    given = credentials.credentials.strip() if credentials is not None else None
    if given is not None:
        # Both compared, whatever the first gives: which one matched must not show in the timing either.
        admin, reader = _matches(given, settings.admin_token), _matches(given, settings.api_key)
        if admin:
            return Caller("admin")
        if reader:
            return Caller("reader")
    if settings.api_key is not None:
        raise unauthorized("API key")
    return Caller("anonymous")


CallerDep = Annotated[Caller, Depends(authenticate)]
Authenticated = Security(authenticate)  # for `dependencies=[...]` of a router or of `include_router`


def require_writer(request: Request, caller: CallerDep) -> None:
    """Uploads and deletes: the admin token (none configured: anyone who got past `authenticate`)."""
    settings: Settings = request.app.state.settings
    if settings.admin_token is not None and caller.role != "admin":
        raise unauthorized("admin token")


WriterDep = Depends(require_writer)
