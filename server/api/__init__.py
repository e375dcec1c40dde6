"""The HTTP layer on FastAPI: one `APIRouter` per family of routes, and what they share.

- `deps`: typed dependencies (`ServerDep`, `SettingsDep`, `TaskName`) instead of closures over the settings;
- `auth`: who calls (the bearer credential), checked for whole routers by `create_app`;
- `schemas`: the pydantic models of bodies and answers (the OpenAPI schema comes from them);
- `errors`: the one place that maps domain exceptions to status codes and `{"detail": ...}` bodies;
- `middleware`: request metrics and the body-size limit, plain ASGI;
- `tasks`, `ops`, `oip`, `hf`, `dashboard`: the routers (predict and the store; backbone, memory, health, metrics;
  the Open Inference Protocol; the Hugging Face shapes; the dashboard's files).

`server.app.create_app` assembles them.
"""
