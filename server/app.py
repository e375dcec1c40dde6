"""The HTTP API (docs/http-api.md, docs/protocols.md), on FastAPI: `create_app(settings)` assembles it.

The service (`server.service.Server`: backbone, store, engine, cache, batcher) is built at startup
and closed at shutdown, after the batcher has finished every request it accepted. The routes
live in `server.api` (one router per family), with their schemas, typed dependencies, error
mapping and middleware; this module only puts them together. The HTTP layer sees only JSON,
bytes and the store's `TaskInfo`: tensors stay behind the batcher.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.api import dashboard, hf, oip, openai_compat, ops, tasks, tei
from server.api.auth import Authenticated, document_security
from server.api.errors import install_error_handlers
from server.api.examples import add_examples
from server.api.middleware import (
    BodyLimitMiddleware,
    DisconnectMiddleware,
    HeaderLimitMiddleware,
    InternalErrorMiddleware,
    MethodsMiddleware,
    MetricsMiddleware,
    RequestIdMiddleware,
    ShutdownMiddleware,
)
from server.backbone import Backbone
from server.extras import MissingExtra
from server.service import Server, StoreNotWritable
from server.settings import Settings

log = logging.getLogger("deltaserve")

PROTECTED_ROUTERS = (tasks.router, ops.router, oip.router, hf.router, openai_compat.router, tei.router)
# Open to anyone: the health and the live/ready probes (a load balancer has no key), the dashboard's files
# (the page asks for the key and sends it with every request).
OPEN_ROUTERS = (ops.probes, oip.probes, dashboard.router)


def listen_for_sighup(reload: Callable[[], object]) -> None:
    """`kill -HUP <pid>` re-reads the tenants file. Only the main thread's loop can take signals (under
    uvicorn it is; a test's or an embedding's loop may not be): there, the file's change is watched anyway."""
    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)
    except (RuntimeError, ValueError, NotImplementedError, AttributeError) as err:  # not the main thread; Windows
        log.info("SIGHUP does not reload the tenants file here (%s); a change of the file does", err)


def create_app(settings: Settings | None = None, *, backbone: Backbone | None = None,
               on_build: Callable[[Server], None] | None = None,
               on_load_failure: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The application; `backbone` skips loading one (tests pass a tiny one); `on_build(server)` runs after
    the service is built and before it serves (Ray Serve's replicas swap in their batcher there).

    With `on_load_failure` (as `deltaserve serve` runs it) the service is built in the background after
    start-up, so the port answers at once: the health probes 503 `loading` and every other route 503 with
    Retry-After until it is built; a failed build calls `on_load_failure(error)` (serve stops, exit 3).
    Without it the start-up itself builds the service (tests, Ray's replicas): served means ready.
    """
    settings = settings or Settings()

    async def build(app: FastAPI) -> Server:
        server = await asyncio.to_thread(Server.build, settings, backbone)
        if on_build is not None:
            on_build(server)
        server.batcher.start()
        app.state.server = server
        if server.tenants is not None:
            listen_for_sighup(server.tenants.reload)
        log.info("deltaserve ready: backbone %s, %d tasks", server.backbone.name, len(server.store.list()))
        return server

    async def build_in_background(app: FastAPI) -> Server | None:
        try:
            return await build(app)
        except (StoreNotWritable, MissingExtra) as err:  # the operator's to fix, said in one line
            log.error("deltaserve could not start: %s", err)
            assert on_load_failure is not None
            on_load_failure(err)
            return None
        except Exception as err:
            log.exception("deltaserve could not start")
            assert on_load_failure is not None
            on_load_failure(err)
            return None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if on_load_failure is None:
            server: Server | None = await build(app)
            try:
                yield
            finally:
                await server.close()
            return
        loading = asyncio.get_running_loop().create_task(build_in_background(app), name="deltaserve-load")
        try:
            yield
        finally:
            server = await loading  # a load under way is finished (a thread cannot be stopped), then closed
            if server is not None:
                await server.close()

    app = FastAPI(title="deltaserve", version="1",
                  description="One frozen encoder, many task deltas, any mix of tasks in one forward pass.",
                  lifespan=lifespan)
    app.state.settings = settings
    # Outermost last: the metrics middleware also counts what the body limit refuses, and the
    # internal-error one is innermost so that it answers a 500 before Starlette's closes the connection.
    app.add_middleware(InternalErrorMiddleware)
    app.add_middleware(MethodsMiddleware, router=app.router)
    app.add_middleware(DisconnectMiddleware)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_bytes)
    app.add_middleware(HeaderLimitMiddleware, max_bytes=settings.max_header_bytes, max_count=settings.max_headers)
    app.add_middleware(ShutdownMiddleware)
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(RequestIdMiddleware)  # outermost: every answer, a refusal too, carries the id
    # Every router but the open ones needs a credential, given here once for all their routes, so that
    # no route can forget it (tests/test_auth.py walks app.routes to keep it so).
    for router in PROTECTED_ROUTERS:
        app.include_router(router, dependencies=[Authenticated])
    for router in OPEN_ROUTERS:
        app.include_router(router)
    install_error_handlers(app)
    add_examples(app)
    document_security(app, settings)
    return app
