"""The dashboard: `GET /` and its static files (server/static/), as one APIRouter.

The page is plain HTML, CSS and JavaScript: no build step, no framework, no CDN. It reads the
public routes (/tasks, /memory, /metrics, ...) like any other client, so it shows nothing the
API does not. Files are served from a fixed list made at import, so a request path can never
reach outside the folder; `no-cache` makes browsers revalidate, so an upgrade shows at once.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException

STATIC = Path(__file__).resolve().parents[1] / "static"
FILES = {path.name: path for path in STATIC.iterdir() if path.is_file()}
HEADERS = {"Cache-Control": "no-cache"}

router = APIRouter(tags=["dashboard"])


@router.get("/", include_in_schema=False)
async def dashboard() -> FileResponse:
    return FileResponse(FILES["index.html"], headers=HEADERS)


@router.get("/static/{file}", include_in_schema=False)
async def static_file(file: str) -> FileResponse:
    path = FILES.get(file)
    if path is None:
        raise HTTPException(404, f"no static file {file!r}")
    return FileResponse(path, headers=HEADERS)
