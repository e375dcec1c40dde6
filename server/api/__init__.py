"""The HTTP layer on FastAPI: one `APIRouter` per family of routes, and what they share.

- `deps`: typed dependencies (`ServerDep`, `SettingsDep`, `AdminDep`) instead of closures over the settings;
- `schemas`: the pydantic models of bodies and answers (the OpenAPI schema comes from them);
- `errors`: the one place that maps domain exceptions to status codes and `{"detail": ...}` bodies;
- `middleware`: request metrics and the body-size limit, plain ASGI;
- `tasks`, `ops`: the routers (predict and the store; backbone, memory, health, metrics).

`server.app.create_app` assembles them.
"""
