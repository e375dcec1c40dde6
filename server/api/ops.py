"""Routes of the operations family: the backbone, the memory report, health and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from server.api.deps import ReaderDep, ServerDep
from server.api.schemas import MemoryReport
from server.metrics import Metrics

router = APIRouter(tags=["operations"])


@router.get("/backbone", dependencies=[ReaderDep])
async def backbone_info(server: ServerDep) -> dict[str, Any]:
    return server.backbone.describe()


@router.get("/memory", response_model=MemoryReport, dependencies=[ReaderDep])
async def memory(server: ServerDep) -> Response:
    return JSONResponse(server.memory())


@router.get("/health")
async def health(server: ServerDep) -> dict[str, Any]:
    return {"status": "ok", "backbone": server.backbone.name, "tasks": len(server.store.list()),
            "queue_depth": server.batcher.depth}


@router.get("/metrics", response_class=Response)
async def metrics(server: ServerDep) -> Response:
    server.metrics.tasks.set(len(server.store.list()))
    return Response(server.metrics.render(), media_type=Metrics.CONTENT_TYPE)
