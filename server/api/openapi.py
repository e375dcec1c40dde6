"""Edits of the generated OpenAPI schema (`/openapi.json`, `/docs`), made once per app.

FastAPI builds the schema from the routes on the first `app.openapi()` call and caches it in
`app.openapi_schema`. Those parts of the schema that the routes cannot say themselves (the
examples, which operations need no credential) are filled in by wrapping that call:
`edit_operations(app, edit)` runs `edit` on every operation of the freshly generated schema and
caches the result the same way, so each edit runs once and wrappers stack in the order added.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

OperationEdit = Callable[[str, str, dict[str, Any]], None]  # (path, method, operation): changes the operation


def edit_operations(app: FastAPI, edit: OperationEdit) -> None:
    """Make `app.openapi()` return the schema it generated with `edit(path, method, operation)` applied to
    each operation."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                edit(path, method, operation)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
