"""Routes of the operations family: the backbone, the memory report, Prometheus metrics; and `/health`,
in its own `probes` router because it is open to everyone (a load balancer has no key)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from server.api.auth import CallerDep, OperatorDep
from server.api.deps import ServerDep, ServerIfBuiltDep
from server.api.schemas import MemoryReport
from server.metrics import Metrics

router = APIRouter(tags=["operations"])
probes = APIRouter(tags=["operations"])


@router.get("/backbone")
async def backbone_info(server: ServerDep) -> dict[str, Any]:
    return server.backbone.describe()


@router.get("/memory", response_model=MemoryReport)
async def memory(server: ServerDep, caller: CallerDep) -> Response:
    """A tenant sees its own tasks and usage; the operator everything, with every tenant's usage."""
    return JSONResponse(server.memory(caller))


@probes.get("/health", responses={503: {"description": "not ready: loading, shutting down, the batcher stopped or "
                                                      "the store unreachable; `status` and `problem` say which "
                                                      "(Retry-After)"}})
async def health(server: ServerIfBuiltDep) -> Response:
    """200 `{"status": "ok", ...}` when this server takes work; 503 otherwise, so that a load balancer or an
    orchestrator's readiness probe sends the work elsewhere (`GET /v2/health/live` is the liveness probe)."""
    if server is None:
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
    problem = server.not_ready()
    body = {"status": "ok" if problem is None else "shutting down" if server.draining else "unavailable",
            "backbone": server.backbone.name, "tasks": len(server.store.list()), "queue_depth": server.batcher.depth,
            **server.backend_report()}
    if problem is not None:
        body["problem"] = problem
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
    return JSONResponse(body)


@router.get("/metrics", response_class=Response, dependencies=[OperatorDep])  # it names every tenant's tasks
async def metrics(server: ServerDep) -> Response:
    server.metrics.tasks.set(len(server.store.list()))
    return Response(server.metrics.render(), media_type=Metrics.CONTENT_TYPE)
