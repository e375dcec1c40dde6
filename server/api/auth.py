"""Who is calling: the bearer credential of every protected route, resolved once per request to a `Caller`.

`create_app` puts `Authenticated` on every router but the open ones (health, the probes, the
dashboard's files), so a route added to a protected router is guarded without asking for it;
tests/test_auth.py walks `app.routes` to keep it so. FastAPI's `HTTPBearer` reads the header and
puts the bearer scheme in the OpenAPI schema.

Credentials: the admin token (`--admin-token`, the operator's: everything), the API key
(`--api-key`: read and predict everything), a tenant's key (`--tenants-file`: its own tasks only).
Without an API key or tenants, reading and predicting stay open; without an admin token or tenants,
so do uploads and deletes. Every refusal says the same sentence for a missing, malformed or unknown
credential (nothing tells a client what exists), and goes to the audit log.

Tenants' tasks: a route that takes the caller (`CallerDep`) passes it on (`Server.task`,
`Server.predict`, `Server.put_task`, ...), which answer another tenant's task as absent, in the route's
own words; for any other route with a `{name}` path parameter (those added later included),
`Authenticated` answers 404 before it runs. Writes are checked again by the store, atomically with
the write.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from adapters_store.store import TaskNotFound
from server.api.deps import get_server
from server.api.openapi import edit_operations
from server.service import Server
from server.settings import Settings
from server.tenants import Caller, key_hash

bearer = HTTPBearer(auto_error=False, description="the admin token, the API key, or a tenant's key")


def _matches(given: str, token: str | None) -> bool:
    # Constant time: how much of a token matched must not show in the timing.
    return token is not None and hmac.compare_digest(given.encode(), token.encode())


def route_of(request: Request) -> str:
    """`METHOD /route/{template}` of the request, for the audit log."""
    return f"{request.method} {getattr(request.scope.get('route'), 'path', request.url.path)}"


def refuse(request: Request, caller: Caller | None, what: str) -> HTTPException:
    """The 401 for a credential that does not open this route, audited."""
    server: Server = get_server(request)  # Loading (503) while `serve` loads it
    server.audit.record(caller, route_of(request), f"401 refused credential (needs the {what})",
                        request.path_params.get("name"))
    return HTTPException(401, f"this route needs 'Authorization: Bearer <{what}>'",
                         headers={"WWW-Authenticate": "Bearer"})


def authenticate(request: Request,
                 credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]) -> Caller:
    """The caller, or 401 where this server asks a credential of every protected route."""
    settings: Settings = request.app.state.settings
    server: Server = get_server(request)  # Loading (503) while `serve` loads it
    tenants = server.tenants.current if server.tenants is not None else None
    given = credentials.credentials.strip() if credentials is not None else None
    caller = None
    if given:
        key_id = key_hash(given)[:8]
        # All compared, whatever the first gives: which one matched must not show in the timing either.
        admin, reader = _matches(given, settings.admin_token), _matches(given, settings.api_key)
        tenant = tenants.find(given) if tenants is not None else None
        if admin:
            caller = Caller("admin", key_id=key_id)
        elif reader:
            caller = Caller("reader", key_id=key_id)
        elif tenant is not None:
            caller = Caller("tenant", tenant.name, key_id)
        else:
            caller = Caller("anonymous", key_id=key_id)  # a wrong key: as good as none
    if caller is None or caller.role == "anonymous":
        if tenants is not None:
            raise refuse(request, caller, "key")
        if settings.api_key is not None:
            raise refuse(request, caller, "API key")
        return Caller("anonymous")
    name = request.path_params.get("name")
    if name and caller.owner is not None and not _answers_for_caller(request.scope.get("route")):
        info = server.store.get_info(name)
        if info is not None and info.owner != caller.owner:
            raise TaskNotFound(name)  # another tenant's task: as if absent
    return caller


def _answers_for_caller(route: object) -> bool:
    """Whether a route takes the `Caller` (a `CallerDep` parameter) and so answers another tenant's task as
    absent itself, in its own words (the route-walk test holds it to the words of a truly absent name)."""
    dependant = getattr(route, "dependant", None)
    return dependant is not None and any(d.call is authenticate and d.name for d in dependant.dependencies)


CallerDep = Annotated[Caller, Depends(authenticate)]
Authenticated = Security(authenticate)  # for `dependencies=[...]` of a router or of `include_router`


def require_writer(request: Request, caller: CallerDep) -> None:
    """Uploads and deletes: the admin token or a tenant's key (no admin token nor tenants: anyone)."""
    settings: Settings = request.app.state.settings
    server: Server = get_server(request)  # Loading (503) while `serve` loads it
    if server.tenants is not None:
        if caller.role not in ("admin", "tenant"):
            raise refuse(request, caller, "key")
    elif settings.admin_token is not None and caller.role != "admin":
        raise refuse(request, caller, "admin token")


def require_operator(request: Request, caller: CallerDep) -> None:
    """Routes that name every tenant's tasks (`/metrics`): with tenants, the admin token only."""
    server: Server = get_server(request)  # Loading (503) while `serve` loads it
    if server.tenants is not None and caller.role != "admin":
        raise refuse(request, caller, "admin token")


WriterDep = Depends(require_writer)
OperatorDep = Depends(require_operator)


def credential_required(settings: Settings, method: str, path: str) -> bool:
    """Whether a protected route refuses a request that has no credential, as the dependencies above
    decide; the OpenAPI schema says so (`document_security`), so that clients and fuzzers know."""
    if settings.tenants_file is not None or settings.api_key is not None:
        return True
    return method.upper() in ("PUT", "DELETE") and settings.admin_token is not None


def document_security(app: FastAPI, settings: Settings) -> None:
    """Mark the bearer credential optional (OpenAPI's empty requirement `{}`) on the operations this server
    answers without one: e.g. reading and predicting when it has no API key nor tenants."""
    def optional_where_not_required(path: str, method: str, operation: dict[str, Any]) -> None:
        if "security" in operation and not credential_required(settings, method, path):
            operation["security"].append({})

    edit_operations(app, optional_where_not_required)
